//! A minimal HTTP/1.0 client, a fixed-answer HTTP server and a byte-counting sink, std-only.

use std::borrow::Cow;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Sets the receive buffer (SO_RCVBUF) of `stream` to `bytes`, turning its autotuning off: a
/// reader that pauses then holds the sender back after about that much, instead of letting a
/// whole download land in a buffer of several MiB. Best set before the request is sent.
pub fn set_recv_buffer(stream: &TcpStream, bytes: usize) -> Result<()> {
    crate::sys::set_recv_buffer(stream, bytes).context("setting SO_RCVBUF")
}

/// A parsed HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Header fields in the order received (names as sent).
    pub headers: Vec<(String, String)>,
    /// The body, exactly as received.
    pub body: Vec<u8>,
}

impl HttpReply {
    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }

    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `GET path` (HTTP/1.0, `Connection: close`) over an already connected stream and
/// reads the whole response; the whole exchange must finish within `timeout`.
pub fn get_on_stream(
    mut stream: TcpStream,
    host: &str,
    path: &str,
    timeout: Duration,
) -> Result<HttpReply> {
    let deadline = Instant::now() + timeout;
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: lb-tests\r\nConnection: close\r\n\r\n"
    );
    stream
        .set_write_timeout(Some(timeout))
        .context("setting write timeout")?;
    stream
        .write_all(req.as_bytes())
        .context("sending HTTP request")?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "HTTP response not complete after {timeout:?} ({} bytes so far)",
                buf.len()
            );
        }
        stream
            .set_read_timeout(Some(left))
            .context("setting read timeout")?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!(
                    "HTTP response not complete after {timeout:?} ({} bytes so far)",
                    buf.len()
                )
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("reading HTTP response ({} bytes so far)", buf.len())
                });
            }
        }
    }
    parse_response(&buf)
}

/// Parses a complete HTTP/1.x response (read until EOF). A `Content-Length` that disagrees
/// with the bytes received is an error (a truncated transfer).
pub fn parse_response(buf: &[u8]) -> Result<HttpReply> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of HTTP header in {} bytes received", buf.len()))?;
    let head = std::str::from_utf8(&buf[..end]).context("HTTP header is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1 status line: {status_line:?}");
    }
    let status: u16 = parts
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("bad status in {status_line:?}"))?;
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| anyhow!("malformed header line {line:?}"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let body = buf[end + 4..].to_vec();
    let reply = HttpReply {
        status,
        headers,
        body,
    };
    if let Some(len) = reply.header("content-length") {
        let len: usize = len
            .parse()
            .with_context(|| format!("bad Content-Length {len:?}"))?;
        if len != reply.body.len() {
            bail!(
                "truncated HTTP body: Content-Length {len}, received {}",
                reply.body.len()
            );
        }
    }
    Ok(reply)
}

/// One `GET /keep` on a kept-alive connection to `host` (the harness's nginx backends): the
/// backend that answered, by its `X-Backend` header, which must agree with the body.
pub fn ask_kept(stream: &mut TcpStream, host: &str) -> Result<usize> {
    stream.write_all(
        format!("GET /keep HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-tests\r\n\r\n").as_bytes(),
    )?;
    let reply = read_kept_response(stream)?;
    anyhow::ensure!(reply.status == 200, "status {}", reply.status);
    let by_header: usize = reply
        .header("x-backend")
        .ok_or_else(|| anyhow!("no X-Backend header"))?
        .parse()?;
    anyhow::ensure!(
        crate::parse_backend(&reply.text()) == Some(by_header),
        "X-Backend {by_header} but body {:?}",
        reply.text()
    );
    Ok(by_header)
}

/// Reads one response of a kept-alive HTTP/1.1 connection (its head, then as many body bytes
/// as its Content-Length says; no pipelining: nothing after it is read) and parses it. An
/// error when the connection closes first or the head has no Content-Length.
pub fn read_kept_response(stream: &mut impl Read) -> Result<HttpReply> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = stream.read(&mut chunk).context("reading an answer")?;
        if n == 0 {
            bail!(
                "the connection closed after {} bytes of the answer: {:?}",
                buf.len(),
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| anyhow!("no Content-Length in {head:?}"))?;
    while buf.len() < head_end + len {
        let n = stream.read(&mut chunk).context("reading an answer")?;
        if n == 0 {
            bail!("the connection closed in the body: {head:?}");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    parse_response(&buf[..head_end + len])
}

/// A running fixed-answer server (see `Topology::serve_fixed`).
pub(crate) struct FixedServer {
    pub(crate) addr: SocketAddr,
    pub(crate) hits: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FixedServer {
    /// Serves `body` to every HTTP request (any method and path) on `listener`, until stopped.
    pub(crate) fn start(listener: TcpListener, body: &str) -> Result<FixedServer> {
        let response = format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        Self::serve(listener, move |conn, hits| {
            answer(conn, response.as_bytes(), hits)
        })
    }

    /// A sink on `listener`, until stopped: reads each connection until the client shuts its
    /// sending side, then answers with the number of bytes it read (`N\n`) and closes.
    pub(crate) fn start_sink(listener: TcpListener) -> Result<FixedServer> {
        Self::serve(listener, sink)
    }

    /// Accepts connections on `listener` until stopped, each handled by `handle` on a thread of
    /// its own (a slow client cannot stall others; errors of one connection concern only that
    /// client).
    fn serve(
        listener: TcpListener,
        handle: impl Fn(TcpStream, &AtomicU64) -> std::io::Result<()> + Send + Sync + 'static,
    ) -> Result<FixedServer> {
        let addr = listener.local_addr().context("local address of listener")?;
        listener
            .set_nonblocking(true)
            .context("making the listener non-blocking")?;
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicU64::new(0));
        let handle = Arc::new(handle);
        let (stop2, hits2) = (stop.clone(), hits.clone());
        let thread = std::thread::Builder::new()
            .name(format!("fixed-{addr}"))
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let (handle, hits) = (handle.clone(), hits2.clone());
                            let _ = std::thread::Builder::new().name("fixed-conn".into()).spawn(
                                move || {
                                    let _ = handle(conn, &hits);
                                },
                            );
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
            .with_context(|| format!("spawning the server thread for {addr}"))?;
        Ok(FixedServer {
            addr,
            hits,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops accepting and joins the thread (the listening socket is closed).
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FixedServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn answer(mut conn: TcpStream, response: &[u8], hits: &AtomicU64) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut req = Vec::new();
    let mut chunk = [0u8; 4096];
    // Read the request head (or whatever arrives before EOF) so the client is not reset.
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 64 * 1024 {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&chunk[..n]);
    }
    // Counted before answering, so a client that got its answer sees the count.
    hits.fetch_add(1, Ordering::Relaxed);
    conn.write_all(response)?;
    conn.shutdown(Shutdown::Write)?;
    // Drain until the client closes, so closing does not turn into an RST.
    let _ = conn.read(&mut chunk);
    Ok(())
}

fn sink(mut conn: TcpStream, hits: &AtomicU64) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    let n = std::io::copy(&mut conn, &mut std::io::sink())?;
    hits.fetch_add(1, Ordering::Relaxed);
    conn.write_all(format!("{n}\n").as_bytes())?;
    conn.shutdown(Shutdown::Write)
}

/// Sends `len` bytes on `stream` (connected to a sink: `Topology::serve_sink`), shuts the
/// sending side and returns the count the sink answers; each step gives up after `timeout`.
pub fn upload(mut stream: TcpStream, len: usize, timeout: Duration) -> Result<u64> {
    stream.set_write_timeout(Some(timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    stream
        .write_all(&data)
        .with_context(|| format!("sending {len} bytes"))?;
    stream
        .shutdown(Shutdown::Write)
        .context("shutting the sending side")?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .context("reading the sink's count")?;
    answer
        .trim()
        .parse()
        .with_context(|| format!("the sink answered {answer:?}, not a count"))
}

/// Reads from `s` into `buf` until it holds at least `want` bytes or EOF; false at EOF.
pub fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, want: usize) -> bool {
    use std::io::Read as _;
    let mut chunk = [0u8; 16 * 1024];
    while buf.len() < want {
        let n = s.read(&mut chunk).expect("reading the download");
        if n == 0 {
            return false;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    true
}

/// The value of the sample `series` (e.g. `lb_conntrack_entries` or `x{a="b"}`) in a metrics
/// text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_response() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-Backend: 2\r\n\r\nbackend 2\n",
        )
        .expect("parse");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-backend"), Some("2"));
        assert_eq!(r.text(), "backend 2\n");
    }

    #[test]
    fn detects_truncation() {
        let e = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nbackend 2\n");
        assert!(e.is_err());
    }
}
