//! One check of one backend: a TCP connect or an HTTP request, bounded by its timeout, and
//! what its failure means (the backend's fault, or lbd's own lack of resources).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::CheckResult;
use crate::config::{CheckKind, Health};

/// Why a check did not pass: a failure of the backend, or lbd's own error, with its detail.
#[derive(Debug, PartialEq)]
pub(super) struct Failed(pub(super) CheckResult, pub(super) String);

impl Failed {
    pub(super) fn backend(detail: impl Into<String>) -> Failed {
        Failed(CheckResult::Fail, detail.into())
    }
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

/// Runs one check, bounded as a whole by `timeout_ms`. `Ok(detail)` when healthy.
pub(super) async fn check(addr: SocketAddr, spec: &Health) -> Result<String, Failed> {
    let timeout = Duration::from_millis(spec.timeout_ms);
    let exchange = async {
        match spec.check {
            CheckKind::Tcp => {
                let stream = TcpStream::connect(addr).await.map_err(io_failure)?;
                drop(stream);
                Ok("connected".to_string())
            }
            CheckKind::Http => http_check(addr, spec).await,
            CheckKind::None => Ok("not checked".to_string()),
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(Failed::backend(format!(
            "timeout after {} ms",
            spec.timeout_ms
        ))),
    }
}

/// The request sent by an `http` check.
pub(super) fn http_request(path: &str, backend: IpAddr) -> String {
    let host = match backend {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: lbd-health-check\r\nConnection: close\r\n\r\n"
    )
}

pub(super) async fn http_check(addr: SocketAddr, spec: &Health) -> Result<String, Failed> {
    let mut stream = TcpStream::connect(addr).await.map_err(io_failure)?;
    stream
        .write_all(http_request(&spec.path, addr.ip()).as_bytes())
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
    let status = parse_status(&buf).ok_or_else(|| Failed::backend("malformed HTTP response"))?;
    let detail = format!("HTTP {status}");
    if status == spec.expect {
        Ok(detail)
    } else {
        Err(Failed::backend(detail))
    }
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
