//! The network-namespace test harness of lb.
//!
//! [`Topology::new`] builds an L2 segment (a bridge in its own "switch" namespace) joining a
//! load-balancer namespace, backend namespaces running nginx, and client namespaces with many
//! source addresses; dropping the [`Topology`] (also during a panic) removes everything. See
//! the [`topology`] module for names and addresses.
//!
//! ```no_run
//! use lb_tests::{Topology, TopologyOptions, require_root};
//! require_root();
//! let t = Topology::new(TopologyOptions::default()).expect("topology");
//! let src = t.client_sources(1)[0];
//! let reply = t
//!     .http_get(t.client_ns(1), src, "192.0.2.11:80".parse().unwrap(), "/")
//!     .expect("GET");
//! assert_eq!(reply.text(), "backend 1\n");
//! ```

pub mod bench;
pub mod bpf;
pub mod cases;
pub mod cluster;
pub mod dpfixture;
pub mod flood;
pub mod http;
pub mod lbd;
pub mod netns;
pub mod packet;
pub mod routing;
mod sys;
pub mod topology;

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};

pub use http::HttpReply;
pub use netns::{in_netns, netns_path};
pub use sys::Pinned;
pub use topology::{
    BIG_FILE_SIZE, BackendSide, ExtraLink, ProcHandle, ServerHandle, Topology, TopologyOptions,
    big_file_contents, parse_backend,
};

pub(crate) const ROOT_MESSAGE: &str = "lb end-to-end tests need root: they create network \
     namespaces and attach XDP programs. Run them as root (e.g. `sudo -E cargo xtask test`).";

/// Panics with a clear message unless running as root. Tests that need root call this first,
/// so that they fail loudly instead of skipping silently.
pub fn require_root() {
    if !sys::is_root() {
        panic!("{ROOT_MESSAGE}");
    }
}

/// Sets a flag when dropped: stops load threads also when the scenario driving them panics
/// (else a thread scope would wait for them forever, and a failing test would hang).
pub struct StopOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Polls `f` until it returns true, for at most `deadline`; the error names `what`. Polls
/// every few milliseconds (backing off to 50 ms), so it is both quick and cheap.
pub fn wait_until(deadline: Duration, what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        if f() {
            return Ok(());
        }
        if start.elapsed() >= deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Like [`wait_until`], for a fallible probe: polls `f` until it returns `Ok`, for at most
/// `deadline`, and returns that value; on timeout the error names `what` and the last error.
pub fn retry_until<T>(
    deadline: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<T>,
) -> Result<T> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        let err = match f() {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if start.elapsed() >= deadline {
            return Err(anyhow!(
                "timed out after {deadline:?} waiting for {what}; last error: {err:#}"
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod harness_tests;
