//! Health checks: one Tokio task per checked backend, each sending a [`Report`] per check.
//!
//! This module never touches the data path: it only says what it saw. The daemon consumes the
//! reports (counts `lb_health_checks_total`, keeps the last detail for `lbctl backend list`, and
//! acts on `transition`).
//!
//! A checker runs its check (`tcp`, `http`, `https`, `udp`, `dns`, `pgsql`, `redis` or `exec`)
//! against `backend:spec.port` every `interval_ms`
//! (jittered: the first check after a random delay in `[0, interval)`, each later one
//! `interval × [0.9, 1.1]` after the start of the previous one), each check bounded as a whole by
//! `timeout_ms`. `rise` consecutive successes make a down backend up, `fall` consecutive failures
//! make an up backend down. Checks use plain Tokio sockets, so they run from the network namespace
//! of the calling process.
//!
//! A check that cannot run for lack of lbd's own resources (out of file descriptors, memory,
//! socket buffers or local ports) is reported as [`CheckResult::Error`]: it says nothing about
//! the backend, so it counts neither towards `rise` nor towards `fall`.
//!
//! This file owns the scheduling (the [`Monitor`], one checker task per backend, its jittered
//! timing and the rise/fall tracker) and runs one check by its kind: `check` says what a
//! failure means and holds the TCP and HTTP checks, `tls` the HTTPS one, `udp` the UDP and DNS
//! ones, `pgsql`, `redis` and `exec` theirs. None calls anything of lbd but `config`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{CheckKind, Health};

mod check;
mod exec;
mod pgsql;
mod redis;
#[cfg(test)]
mod tests;
mod tls;
mod udp;

use check::Failed;

/// What to check: a backend of a service, with the service's health settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub service: String,
    pub backend: IpAddr,
    /// The port the backend serves on: with `backend`, its identity in the service (one host
    /// may serve a `nat` service on several ports). The check itself goes to `spec.port`.
    pub port: u16,
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
    /// The backend's port ([`Target::port`]).
    pub port: u16,
    /// This check's result.
    pub result: CheckResult,
    /// "HTTP 200", "connected", "DNS NOERROR", "pgsql: replica", "exit 0"..., or the failure
    /// reason: "connection refused", "HTTP 503", "timeout after 500 ms", "port unreachable",
    /// "DNS SERVFAIL", "role primary expected, server is a replica", "exit 1: …"..., or why it
    /// could not run ("could not run: too many open files").
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

/// Owns one Tokio task per checked backend, keyed by (service, backend address, backend port).
pub struct Monitor {
    tx: UnboundedSender<Report>,
    checkers: HashMap<(String, IpAddr, u16), Checker>,
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
        let key = (target.service.clone(), target.backend, target.port);
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
    pub fn remove(&mut self, service: &str, backend: IpAddr, port: u16) {
        if let Some(old) = self.checkers.remove(&(service.to_string(), backend, port)) {
            old.stop();
        }
    }

    /// Stops checking every backend of a service.
    pub fn remove_service(&mut self, service: &str) {
        let keys: Vec<_> = self
            .checkers
            .keys()
            .filter(|(s, _, _)| s == service)
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
    pub fn is_checked(&self, service: &str, backend: IpAddr, port: u16) -> bool {
        self.checkers
            .contains_key(&(service.to_string(), backend, port))
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

/// Runs one check of `addr` for `service`, bounded as a whole by `timeout_ms` (an `exec`
/// check bounds itself: it kills its process group). `Ok(detail)` when healthy.
async fn check(service: &str, addr: SocketAddr, spec: &Health) -> Result<String, Failed> {
    if spec.check == CheckKind::Exec {
        return exec::exec_check(service, addr, spec).await;
    }
    let timeout = Duration::from_millis(spec.timeout_ms);
    let exchange = async {
        match spec.check {
            CheckKind::Tcp => check::tcp_check(addr).await,
            CheckKind::Http => check::http_check(addr, spec).await,
            CheckKind::Https => tls::https_check(addr, spec).await,
            CheckKind::Udp => udp::udp_check(addr, spec).await,
            CheckKind::Dns => udp::dns_check(addr, spec).await,
            CheckKind::Pgsql => pgsql::pgsql_check(addr, spec).await,
            CheckKind::Redis => redis::redis_check(addr, spec).await,
            CheckKind::Exec => exec::exec_check(service, addr, spec).await,
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
        port,
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
        let (result, detail) = match check(&service, addr, &spec).await {
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
            port,
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
