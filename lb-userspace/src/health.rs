//! Health checks: one Tokio task per checked backend, each sending a [`Report`] per check.
//!
//! This module never touches the data path: it only says what it saw. The daemon consumes the
//! reports (counts `lb_health_checks_total`, keeps the last detail for `lbctl backend list`, and
//! acts on `transition`).
//!
//! A checker runs a `tcp` or `http` check against `backend:spec.port` every `interval_ms`
//! (jittered: the first check after a random delay in `[0, interval)`, each later one
//! `interval × [0.9, 1.1]` after the start of the previous one), each check bounded as a whole by
//! `timeout_ms`. `rise` consecutive successes make a down backend up, `fall` consecutive failures
//! make an up backend down. Checks use plain Tokio sockets, so they run from the network namespace
//! of the calling process.
//!
//! A check that cannot run for lack of lbd's own resources (out of file descriptors, memory,
//! socket buffers or local ports) is reported as [`CheckResult::Error`]: it says nothing about
//! the backend, so it counts neither towards `rise` nor towards `fall`.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{CheckKind, Health};

/// What to check: a backend of a service, with the service's health settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub service: String,
    pub backend: IpAddr,
    pub spec: Health,
}

/// The state a checker starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Up: `fall` consecutive failures make it down.
    Up,
    /// Joins (becomes up) after its first successful check; counts as down until then.
    PendingFirstCheck,
    /// Down: `rise` consecutive successes make it up.
    Down,
}

/// What one check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CheckResult {
    /// The backend answered as expected.
    Pass,
    /// The backend did not (refused, timed out, answered wrong...).
    Fail,
    /// The check could not run for lack of lbd's own resources (no file descriptor, no
    /// memory, no buffer space, no local port): lbd's error, which says nothing about the
    /// backend, so it counts neither way towards `rise` or `fall`.
    Error,
}

impl CheckResult {
    /// The `result` label of `lb_health_checks_total`.
    pub fn label(self) -> &'static str {
        match self {
            CheckResult::Pass => "ok",
            CheckResult::Fail => "fail",
            CheckResult::Error => "error",
        }
    }
}

/// The result of one check.
#[derive(Clone, Debug)]
pub struct Report {
    pub service: String,
    pub backend: IpAddr,
    /// This check's result.
    pub result: CheckResult,
    /// "HTTP 200", "connected", or the failure reason: "connection refused", "HTTP 503",
    /// "timeout after 500 ms", "no route to host", "connection reset", "malformed HTTP
    /// response"..., or why it could not run ("could not run: too many open files").
    pub detail: String,
    /// `Some(true)` became up, `Some(false)` became down, with this check (rise/fall reached).
    pub transition: Option<bool>,
    /// When the check ended.
    pub at: SystemTime,
}

impl Report {
    /// Whether the check passed.
    pub fn ok(&self) -> bool {
        self.result == CheckResult::Pass
    }
}

/// One running checker: its task, and the flag that lets [`Monitor`] guarantee that no report is
/// sent once it has been stopped.
struct Checker {
    handle: JoinHandle<()>,
    alive: Arc<Mutex<bool>>,
}

impl Checker {
    fn stop(self) {
        // Once the flag is down (taken under the lock the task holds while sending), the task
        // can send nothing more, even if it is running on another worker thread right now.
        *self.alive.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.handle.abort();
    }
}

/// Owns one Tokio task per checked backend, keyed by (service, backend).
pub struct Monitor {
    tx: UnboundedSender<Report>,
    checkers: HashMap<(String, IpAddr), Checker>,
}

impl Monitor {
    /// Reports of every checker go to `tx`.
    pub fn new(tx: UnboundedSender<Report>) -> Self {
        Monitor {
            tx,
            checkers: HashMap::new(),
        }
    }

    /// Starts checking (or restarts with the new spec/start state when already checked).
    /// `check = none` → nothing is started (and an existing checker for that key is stopped).
    ///
    /// Must be called from within a Tokio runtime (the checker is spawned on it).
    pub fn set(&mut self, target: Target, start: Start) {
        let key = (target.service.clone(), target.backend);
        if let Some(old) = self.checkers.remove(&key) {
            old.stop();
        }
        if target.spec.check == CheckKind::None {
            return;
        }
        let alive = Arc::new(Mutex::new(true));
        let handle = tokio::spawn(run_checker(
            target,
            start,
            self.tx.clone(),
            Arc::clone(&alive),
        ));
        self.checkers.insert(key, Checker { handle, alive });
    }

    /// Stops checking one backend (nothing happens when it is not checked). No report of it is
    /// sent after this returns (reports already in the channel stay there).
    pub fn remove(&mut self, service: &str, backend: IpAddr) {
        if let Some(old) = self.checkers.remove(&(service.to_string(), backend)) {
            old.stop();
        }
    }

    /// Stops checking every backend of a service.
    pub fn remove_service(&mut self, service: &str) {
        let keys: Vec<_> = self
            .checkers
            .keys()
            .filter(|(s, _)| s == service)
            .cloned()
            .collect();
        for key in keys {
            if let Some(old) = self.checkers.remove(&key) {
                old.stop();
            }
        }
    }

    /// Stops every checker (also done on drop).
    pub fn stop_all(&mut self) {
        for (_, old) in self.checkers.drain() {
            old.stop();
        }
    }

    /// Whether this backend has a running checker.
    pub fn is_checked(&self, service: &str, backend: IpAddr) -> bool {
        self.checkers.contains_key(&(service.to_string(), backend))
    }

    /// How many backends are checked.
    pub fn len(&self) -> usize {
        self.checkers.len()
    }

    /// Whether no backend is checked.
    pub fn is_empty(&self) -> bool {
        self.checkers.is_empty()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// The up/down state of one backend, fed one check result at a time.
#[derive(Clone, Debug)]
struct Tracker {
    up: bool,
    /// Not up yet, and the first success makes it up whatever `rise` says.
    pending: bool,
    successes: u32,
    failures: u32,
    rise: u32,
    fall: u32,
}

impl Tracker {
    fn new(start: Start, rise: u32, fall: u32) -> Self {
        Tracker {
            up: start == Start::Up,
            pending: start == Start::PendingFirstCheck,
            successes: 0,
            failures: 0,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    /// Records one result; returns the transition it causes, if any.
    fn record(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.up && (self.pending || self.successes >= self.rise) {
                self.up = true;
                self.pending = false;
                self.successes = 0;
                return Some(true);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.up && self.failures >= self.fall {
                self.up = false;
                self.failures = 0;
                return Some(false);
            }
        }
        None
    }
}

/// Delay before the first check of a checker: uniform in `[0, interval)`.
fn first_delay<R: Rng + ?Sized>(interval: Duration, rng: &mut R) -> Duration {
    let micros = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX);
    if micros == 0 {
        return Duration::ZERO;
    }
    Duration::from_micros(rng.random_range(0..micros))
}

/// Time from the start of one check to the start of the next: `interval × [0.9, 1.1]`.
fn next_delay<R: Rng + ?Sized>(interval: Duration, rng: &mut R) -> Duration {
    interval.mul_f64(rng.random_range(0.9..=1.1))
}

async fn run_checker(
    target: Target,
    start: Start,
    tx: UnboundedSender<Report>,
    alive: Arc<Mutex<bool>>,
) {
    let Target {
        service,
        backend,
        spec,
    } = target;
    let mut rng = StdRng::from_os_rng();
    let interval = Duration::from_millis(spec.interval_ms.max(1));
    let addr = SocketAddr::new(backend, spec.port);
    let mut tracker = Tracker::new(start, spec.rise, spec.fall);
    let mut next = Instant::now() + first_delay(interval, &mut rng);
    loop {
        tokio::time::sleep_until(next).await;
        let began = Instant::now();
        let (result, detail) = match check(addr, &spec).await {
            Ok(detail) => (CheckResult::Pass, detail),
            Err(Failed(result, detail)) => (result, detail),
        };
        let transition = match result {
            CheckResult::Pass => tracker.record(true),
            CheckResult::Fail => tracker.record(false),
            CheckResult::Error => None,
        };
        let report = Report {
            service: service.clone(),
            backend,
            result,
            detail,
            transition,
            at: SystemTime::now(),
        };
        {
            let alive = alive.lock().unwrap_or_else(|e| e.into_inner());
            if !*alive || tx.send(report).is_err() {
                return;
            }
        }
        next = began + next_delay(interval, &mut rng);
    }
}

/// Why a check did not pass: a failure of the backend, or lbd's own error, with its detail.
#[derive(Debug, PartialEq)]
struct Failed(CheckResult, String);

impl Failed {
    fn backend(detail: impl Into<String>) -> Failed {
        Failed(CheckResult::Fail, detail.into())
    }
}

/// A socket error of a check: lbd's own lack of resources, or the backend's failure.
fn io_failure(e: io::Error) -> Failed {
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
async fn check(addr: SocketAddr, spec: &Health) -> Result<String, Failed> {
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
fn http_request(path: &str, backend: IpAddr) -> String {
    let host = match backend {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: lbd-health-check\r\nConnection: close\r\n\r\n"
    )
}

async fn http_check(addr: SocketAddr, spec: &Health) -> Result<String, Failed> {
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
fn parse_status(response: &[u8]) -> Option<u16> {
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
fn describe(e: io::Error) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc::{self, UnboundedReceiver};

    const WAIT: Duration = Duration::from_secs(3);

    fn spec(check: CheckKind, port: u16) -> Health {
        Health {
            check,
            port,
            path: "/healthz".into(),
            expect: 200,
            interval_ms: 50,
            timeout_ms: 30,
            rise: 2,
            fall: 3,
        }
    }

    fn target(service: &str, backend: IpAddr, spec: Health) -> Target {
        Target {
            service: service.into(),
            backend,
            spec,
        }
    }

    fn lo(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    async fn next(rx: &mut UnboundedReceiver<Report>) -> Report {
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("no report in time")
            .expect("channel closed")
    }

    /// Asserts that no report arrives within `d`.
    async fn quiet(rx: &mut UnboundedReceiver<Report>, d: Duration) {
        if let Ok(r) = tokio::time::timeout(d, rx.recv()).await {
            panic!("unexpected report {r:?}");
        }
    }

    /// A TCP server on `addr` that accepts and closes every connection; aborting the task (and
    /// awaiting it) closes the listener.
    async fn tcp_server(addr: SocketAddr) -> (u16, JoinHandle<()>) {
        let listener = TcpListener::bind(addr).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            loop {
                if let Ok((s, _)) = listener.accept().await {
                    drop(s);
                }
            }
        });
        (port, task)
    }

    async fn stop(task: JoinHandle<()>) {
        task.abort();
        let _ = task.await;
    }

    /// A tiny HTTP server: 200 on /healthz, 503 elsewhere. Sends each request it got on `reqs`.
    async fn http_server(addr: SocketAddr) -> (u16, UnboundedReceiver<String>, JoinHandle<()>) {
        let listener = TcpListener::bind(addr).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut chunk = [0u8; 512];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let req = String::from_utf8_lossy(&req).into_owned();
                    let response = if req.starts_with("GET /healthz ") {
                        "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    } else {
                        "HTTP/1.0 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nsick"
                    };
                    let _ = tx.send(req);
                    let _ = s.write_all(response.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        (port, rx, task)
    }

    #[test]
    fn tracker_rise_and_fall() {
        let mut t = Tracker::new(Start::Up, 2, 3);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None, "a success resets the failures");
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(false));
        assert_eq!(t.record(false), None, "already down");
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None, "a failure resets the successes");
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true));
        assert_eq!(t.record(true), None, "already up");

        let mut t = Tracker::new(Start::Down, 2, 3);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true));

        let mut t = Tracker::new(Start::PendingFirstCheck, 5, 3);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), Some(true), "the first success joins");
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(false));
        for _ in 0..4 {
            assert_eq!(t.record(true), None, "no longer pending: rise applies");
        }
        assert_eq!(t.record(true), Some(true));

        let mut t = Tracker::new(Start::Up, 1, 1);
        assert_eq!(t.record(false), Some(false));
        assert_eq!(t.record(true), Some(true));
    }

    #[test]
    fn delays_are_jittered() {
        let mut rng = StdRng::seed_from_u64(7);
        let interval = Duration::from_millis(1000);
        let firsts: Vec<_> = (0..1000).map(|_| first_delay(interval, &mut rng)).collect();
        assert!(firsts.iter().all(|d| *d < interval));
        let min = firsts.iter().min().unwrap();
        let max = firsts.iter().max().unwrap();
        assert!(*min < Duration::from_millis(50), "{min:?}");
        assert!(*max > Duration::from_millis(950), "{max:?}");

        let nexts: Vec<_> = (0..1000).map(|_| next_delay(interval, &mut rng)).collect();
        assert!(
            nexts
                .iter()
                .all(|d| *d >= Duration::from_millis(900) && *d <= Duration::from_millis(1100))
        );
        let min = nexts.iter().min().unwrap();
        let max = nexts.iter().max().unwrap();
        assert!(*min < Duration::from_millis(920), "{min:?}");
        assert!(*max > Duration::from_millis(1080), "{max:?}");
        assert_eq!(
            first_delay(Duration::ZERO, &mut rng),
            Duration::ZERO,
            "no panic on an empty range"
        );
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status(b"HTTP/1.0 503 Service Unavailable\r\nX: y"),
            Some(503)
        );
        assert_eq!(parse_status(b"HTTP/1.1 204\r\n"), Some(204));
        assert_eq!(parse_status(b"HTTP/1.1 204"), Some(204));
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH_9.2\r\n"), None);
        assert_eq!(parse_status(b"HTTP/1.1 20 OK\r\n"), None);
        assert_eq!(parse_status(b"HTTP/1.1 abc OK\r\n"), None);
        assert_eq!(parse_status(b"\r\n"), None);
    }

    #[test]
    fn request_format() {
        assert_eq!(
            http_request("/healthz", lo(9)),
            "GET /healthz HTTP/1.0\r\nHost: 127.0.0.9\r\nUser-Agent: lbd-health-check\r\nConnection: close\r\n\r\n"
        );
        assert!(
            http_request("/", "2001:db8::1".parse().unwrap()).contains("Host: [2001:db8::1]\r\n")
        );
    }

    #[test]
    fn error_descriptions() {
        let e = |k| describe(io::Error::from(k));
        assert_eq!(e(io::ErrorKind::ConnectionRefused), "connection refused");
        assert_eq!(e(io::ErrorKind::ConnectionReset), "connection reset");
        assert_eq!(e(io::ErrorKind::HostUnreachable), "no route to host");
        assert_eq!(
            describe(io::Error::from_raw_os_error(113)),
            "no route to host"
        );
        assert_eq!(
            describe(io::Error::from_raw_os_error(22)),
            "invalid argument"
        );
    }

    #[test]
    fn lack_of_resources_is_an_error_of_lbd() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOMEM,
            libc::ENOBUFS,
            libc::EADDRNOTAVAIL,
        ] {
            let f = io_failure(io::Error::from_raw_os_error(errno));
            assert_eq!(f.0, CheckResult::Error, "errno {errno}: {f:?}");
            assert!(f.1.starts_with("could not run: "), "{f:?}");
        }
        assert_eq!(
            io_failure(io::Error::from_raw_os_error(libc::EMFILE)).1,
            "could not run: too many open files"
        );
        for errno in [
            libc::ECONNREFUSED,
            libc::EHOSTUNREACH,
            libc::ETIMEDOUT,
            libc::ECONNRESET,
        ] {
            let f = io_failure(io::Error::from_raw_os_error(errno));
            assert_eq!(f.0, CheckResult::Fail, "errno {errno}: {f:?}");
        }
    }

    #[tokio::test]
    async fn tcp_fall_and_rise() {
        let addr = SocketAddr::new(lo(21), 0);
        let (port, server) = tcp_server(addr).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut m = Monitor::new(tx);
        let backend = lo(21);
        m.set(
            target("web", backend, spec(CheckKind::Tcp, port)),
            Start::Up,
        );
        assert!(m.is_checked("web", backend));
        for _ in 0..3 {
            let r = next(&mut rx).await;
            assert!(r.ok(), "{r:?}");
            assert_eq!(r.detail, "connected");
            assert_eq!(r.transition, None);
            assert_eq!(r.service, "web");
            assert_eq!(r.backend, backend);
        }

        stop(server).await;
        // A check already under way may still succeed; from the first failure on, count.
        let mut r = next(&mut rx).await;
        while r.ok() {
            r = next(&mut rx).await;
        }
        let mut failures = 1;
        loop {
            assert!(!r.ok(), "{r:?}");
            assert_eq!(r.detail, "connection refused");
            if r.transition.is_some() {
                break;
            }
            r = next(&mut rx).await;
            failures += 1;
        }
        assert_eq!(r.transition, Some(false));
        assert_eq!(failures, 3, "down after exactly `fall` failures");
        let r = next(&mut rx).await;
        assert!(!r.ok());
        assert_eq!(r.transition, None, "already down");

        let (_, server) = tcp_server(SocketAddr::new(backend, port)).await;
        let mut r = next(&mut rx).await;
        while !r.ok() {
            assert_eq!(r.transition, None);
            r = next(&mut rx).await;
        }
        assert_eq!(
            r.transition, None,
            "one success is not enough with rise = 2"
        );
        let r = next(&mut rx).await;
        assert!(r.ok());
        assert_eq!(r.transition, Some(true), "up after `rise` successes");
        let r = next(&mut rx).await;
        assert!(r.ok());
        assert_eq!(r.transition, None);
        m.stop_all();
        assert!(m.is_empty());
        stop(server).await;
    }

    #[tokio::test]
    async fn http_checks() {
        let (port, mut reqs, server) = http_server(SocketAddr::new(lo(22), 0)).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut m = Monitor::new(tx);
        let backend = lo(22);
        m.set(
            target("web", backend, spec(CheckKind::Http, port)),
            Start::Up,
        );
        for _ in 0..2 {
            let r = next(&mut rx).await;
            assert!(r.ok(), "{r:?}");
            assert_eq!(r.detail, "HTTP 200");
        }
        let req = tokio::time::timeout(WAIT, reqs.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(req, http_request("/healthz", backend));

        let mut other = spec(CheckKind::Http, port);
        other.path = "/other".into();
        other.fall = 2;
        m.set(target("web", backend, other), Start::Up);
        let r = next(&mut rx).await;
        // Best effort: a report of the old checker may already be in the channel.
        let r = if r.ok() { next(&mut rx).await } else { r };
        assert!(!r.ok(), "{r:?}");
        assert_eq!(r.detail, "HTTP 503");
        assert_eq!(r.transition, None);
        let r = next(&mut rx).await;
        assert!(!r.ok());
        assert_eq!(r.detail, "HTTP 503");
        assert_eq!(r.transition, Some(false));

        // expect = 503 makes a 503 healthy.
        let mut inverted = spec(CheckKind::Http, port);
        inverted.path = "/other".into();
        inverted.expect = 503;
        m.set(target("web", backend, inverted), Start::Down);
        let mut r = next(&mut rx).await;
        while !r.ok() {
            r = next(&mut rx).await;
        }
        assert_eq!(r.detail, "HTTP 503");
        drop(m);
        stop(server).await;
    }

    #[tokio::test]
    async fn malformed_and_closed_http() {
        let listener = TcpListener::bind(SocketAddr::new(lo(23), 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut n = 0u32;
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                n += 1;
                if n % 2 == 1 {
                    let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
                }
                let _ = s.shutdown().await;
            }
        });
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut m = Monitor::new(tx);
        m.set(
            target("web", lo(23), spec(CheckKind::Http, port)),
            Start::Up,
        );
        let mut details = Vec::new();
        for _ in 0..4 {
            let r = next(&mut rx).await;
            assert!(!r.ok());
            details.push(r.detail);
        }
        assert!(
            details.iter().any(|d| d == "malformed HTTP response"),
            "{details:?}"
        );
        assert!(
            details.iter().all(|d| d == "malformed HTTP response"
                || d == "connection closed without a response"
                || d == "connection reset"),
            "{details:?}"
        );
        drop(m);
        stop(server).await;
    }

    #[tokio::test]
    async fn timeout_when_the_backend_never_answers() {
        let listener = TcpListener::bind(SocketAddr::new(lo(24), 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                if let Ok((s, _)) = listener.accept().await {
                    held.push(s);
                }
            }
        });
        let http = spec(CheckKind::Http, port);

        // One check on its own takes about the timeout.
        let addr = SocketAddr::new(lo(24), port);
        for _ in 0..3 {
            let began = std::time::Instant::now();
            let result = check(addr, &http).await;
            let took = began.elapsed();
            assert_eq!(result, Err(Failed::backend("timeout after 30 ms")));
            assert!(
                took >= Duration::from_millis(25) && took <= Duration::from_millis(500),
                "{took:?}"
            );
        }

        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut m = Monitor::new(tx);
        m.set(target("web", lo(24), http), Start::Up);
        for i in 0..3 {
            let r = next(&mut rx).await;
            assert!(!r.ok());
            assert_eq!(r.detail, "timeout after 30 ms");
            assert_eq!(r.transition, (i == 2).then_some(false));
        }
        drop(m);
        stop(server).await;
    }

    #[tokio::test]
    async fn pending_first_check() {
        let (port, server) = tcp_server(SocketAddr::new(lo(25), 0)).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut m = Monitor::new(tx);
        let mut s = spec(CheckKind::Tcp, port);
        s.rise = 3;
        m.set(target("web", lo(25), s.clone()), Start::PendingFirstCheck);
        let r = next(&mut rx).await;
        assert!(r.ok());
        assert_eq!(r.transition, Some(true), "the first success joins at once");
        let r = next(&mut rx).await;
        assert_eq!(r.transition, None);

        // Start::Down needs `rise` successes.
        m.set(target("web", lo(25), s.clone()), Start::Down);
        let mut r = next(&mut rx).await;
        let mut seen = 1;
        while r.transition.is_none() {
            r = next(&mut rx).await;
            seen += 1;
        }
        assert_eq!(r.transition, Some(true));
        assert!(seen >= 3, "{seen}");

        // A pending backend that fails stays quietly down, then joins on its first success.
        stop(server).await;
        m.set(target("web", lo(25), s), Start::PendingFirstCheck);
        let mut r = next(&mut rx).await;
        while r.ok() {
            // A report of the previous checker, or a check that raced the listener's close.
            r = next(&mut rx).await;
        }
        for _ in 0..4 {
            assert!(!r.ok());
            assert_eq!(r.detail, "connection refused");
            assert_eq!(r.transition, None, "pending is already not up");
            r = next(&mut rx).await;
        }
        let (_, server) = tcp_server(SocketAddr::new(lo(25), port)).await;
        while !r.ok() {
            assert_eq!(r.transition, None);
            r = next(&mut rx).await;
        }
        assert_eq!(r.transition, Some(true));
        drop(m);
        stop(server).await;
    }

    #[tokio::test]
    async fn check_none_reports_nothing() {
        let (port, server) = tcp_server(SocketAddr::new(lo(26), 0)).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut m = Monitor::new(tx);
        m.set(
            target("web", lo(26), spec(CheckKind::None, port)),
            Start::Up,
        );
        assert!(!m.is_checked("web", lo(26)));
        quiet(&mut rx, Duration::from_millis(300)).await;

        // Setting `none` on a checked backend stops its checker.
        m.set(target("web", lo(26), spec(CheckKind::Tcp, port)), Start::Up);
        next(&mut rx).await;
        m.set(
            target("web", lo(26), spec(CheckKind::None, port)),
            Start::Up,
        );
        assert!(m.is_empty());
        while rx.try_recv().is_ok() {}
        quiet(&mut rx, Duration::from_millis(300)).await;
        stop(server).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn remove_stops_reports() {
        let (port, server) = tcp_server(SocketAddr::new(lo(27), 0)).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut m = Monitor::new(tx);
        m.set(target("a", lo(27), spec(CheckKind::Tcp, port)), Start::Up);
        m.set(target("b", lo(27), spec(CheckKind::Tcp, port)), Start::Up);
        m.set(target("b", lo(28), spec(CheckKind::Tcp, port)), Start::Up);
        assert_eq!(m.len(), 3);
        let mut seen = std::collections::HashSet::new();
        while seen.len() < 3 {
            let r = next(&mut rx).await;
            seen.insert((r.service, r.backend));
        }

        m.remove("a", lo(27));
        m.remove("a", lo(99)); // not checked: nothing happens
        assert_eq!(m.len(), 2);
        while rx.try_recv().is_ok() {}
        let deadline = Instant::now() + Duration::from_millis(300);
        while let Ok(Some(r)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            assert_eq!(r.service, "b", "{r:?}");
        }

        m.remove_service("b");
        assert!(m.is_empty());
        while rx.try_recv().is_ok() {}
        quiet(&mut rx, Duration::from_millis(300)).await;
        stop(server).await;
    }

    #[tokio::test]
    async fn drop_stops_checkers() {
        let (port, server) = tcp_server(SocketAddr::new(lo(29), 0)).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut m = Monitor::new(tx);
        m.set(target("web", lo(29), spec(CheckKind::Tcp, port)), Start::Up);
        next(&mut rx).await;
        drop(m);
        while rx.try_recv().is_ok() {}
        // Every sender is gone once the aborted task has been dropped: the channel closes.
        let closed = tokio::time::timeout(WAIT, rx.recv()).await;
        assert!(
            matches!(closed, Ok(None)),
            "report after drop, or channel still open: {closed:?}"
        );
        stop(server).await;
    }

    #[tokio::test]
    async fn checkers_do_not_fire_in_lockstep() {
        let (port, server) = tcp_server(SocketAddr::new(lo(30), 0)).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut m = Monitor::new(tx);
        let mut s = spec(CheckKind::Tcp, port);
        s.interval_ms = 200;
        s.timeout_ms = 100;
        let began = Instant::now();
        for i in 0..8 {
            m.set(target(&format!("svc{i}"), lo(30), s.clone()), Start::Up);
        }
        let mut firsts = HashMap::new();
        while firsts.len() < 8 {
            let r = next(&mut rx).await;
            firsts.entry(r.service).or_insert_with(|| began.elapsed());
        }
        let min = *firsts.values().min().unwrap();
        let max = *firsts.values().max().unwrap();
        // Eight uniform delays in [0, 200 ms) all within 5 ms of each other: practically never.
        assert!(max - min > Duration::from_millis(5), "{firsts:?}");
        assert!(max < Duration::from_millis(200 + 500), "{firsts:?}");
        drop(m);
        stop(server).await;
    }
}
