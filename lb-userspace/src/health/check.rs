//! What a check's failure means (the backend's fault, or lbd's own lack of resources), and the
//! checks over plain TCP: a connect, or an HTTP request (also sent over TLS by `tls`).

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::CheckResult;
use crate::config::Health;

/// Why a check did not pass: a failure of the backend, or lbd's own error, with its detail.
#[derive(Debug, PartialEq)]
pub(super) struct Failed(pub(super) CheckResult, pub(super) String);

impl Failed {
    pub(super) fn backend(detail: impl Into<String>) -> Failed {
        Failed(CheckResult::Fail, detail.into())
    }

    /// lbd's own error (a file it must read, a user it must run as...): says nothing about
    /// the backend.
    pub(super) fn lbd(detail: impl std::fmt::Display) -> Failed {
        Failed(CheckResult::Error, format!("could not run: {detail}"))
    }
}

/// Reads a secret file at the start of a check (so a rotated file is followed): its text
/// without the line end. Unreadable or empty: lbd's own error.
pub(super) async fn read_secret(path: &std::path::Path) -> Result<String, Failed> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| Failed::lbd(format!("password_file {}: {}", path.display(), describe(e))))?;
    let secret = text.trim_end_matches(['\n', '\r']).to_string();
    if secret.is_empty() {
        return Err(Failed::lbd(format!(
            "password_file {} is empty",
            path.display()
        )));
    }
    Ok(secret)
}

/// A socket error of a check: lbd's own lack of resources, or the backend's failure.
pub(super) fn io_failure(e: io::Error) -> Failed {
    match e.raw_os_error() {
        // Out of descriptors (process or system), memory, socket buffers, or local ports.
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS | libc::EADDRNOTAVAIL) => {
            Failed(
                CheckResult::Error,
                format!("could not run: {}", describe(e)),
            )
        }
        _ => Failed::backend(describe(e)),
    }
}

/// A TCP connect: healthy once connected.
pub(super) async fn tcp_check(addr: SocketAddr) -> Result<String, Failed> {
    let stream = TcpStream::connect(addr).await.map_err(io_failure)?;
    drop(stream);
    Ok("connected".to_string())
}

/// The `Host` header for a backend address.
pub(super) fn host_of(backend: IpAddr) -> String {
    match backend {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

/// The request sent by an `http` check.
pub(super) fn http_request(path: &str, host: &str) -> String {
    format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: lbd-health-check\r\nConnection: close\r\n\r\n"
    )
}

pub(super) async fn http_check(addr: SocketAddr, spec: &Health) -> Result<String, Failed> {
    let mut stream = TcpStream::connect(addr).await.map_err(io_failure)?;
    let status = http_exchange(&mut stream, &host_of(addr.ip()), &spec.path).await?;
    let detail = format!("HTTP {status}");
    if status == spec.expect {
        Ok(detail)
    } else {
        Err(Failed::backend(detail))
    }
}

/// Sends the request on an open stream and reads the status of the answer.
pub(super) async fn http_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    host: &str,
    path: &str,
) -> Result<u16, Failed> {
    stream
        .write_all(http_request(path, host).as_bytes())
        .await
        .map_err(io_failure)?;
    // Read up to the end of the status line (or at most 1 KiB of it).
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 1024 {
        let n = stream.read(&mut chunk).await.map_err(io_failure)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if buf.is_empty() {
        return Err(Failed::backend("connection closed without a response"));
    }
    parse_status(&buf).ok_or_else(|| Failed::backend("malformed HTTP response"))
}

/// The status code of an HTTP status line (`HTTP/1.1 200 OK`), from the start of a response.
pub(super) fn parse_status(response: &[u8]) -> Option<u16> {
    let line_end = response
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(response.len());
    let line = std::str::from_utf8(&response[..line_end]).ok()?;
    let mut parts = line.trim_end_matches('\r').split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    code.parse().ok()
}

/// A short lower-case description of a socket error.
pub(super) fn describe(e: io::Error) -> String {
    use io::ErrorKind as K;
    let known = match e.kind() {
        K::ConnectionRefused => Some("connection refused"),
        K::ConnectionReset => Some("connection reset"),
        K::ConnectionAborted => Some("connection aborted"),
        K::HostUnreachable => Some("no route to host"),
        K::NetworkUnreachable => Some("network unreachable"),
        K::NetworkDown => Some("network down"),
        K::TimedOut => Some("connection timed out"),
        K::BrokenPipe => Some("connection closed by the backend"),
        K::AddrNotAvailable => Some("address not available"),
        K::PermissionDenied => Some("permission denied"),
        _ => None,
    };
    if let Some(s) = known {
        return s.to_string();
    }
    // "Some error (os error 22)" → "some error".
    let text = e.to_string();
    let text = match text.find(" (os error ") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "i/o error".to_string(),
    }
}
