//! Benchmark part `http`: whole-path HTTP through lb, through HAProxy, and to one nginx directly.
//!
//! One topology: the LB namespace, three nginx backends (one worker process each), three client
//! namespaces. Every measurement runs one `wrk -t1 -c32 --latency` in each client namespace at
//! once (96 connections in all); wrk cannot choose its source address, so each wrk uses its
//! namespace's 192.0.2.10x, and with three clients every backend can get one. The paths:
//!
//! - **lb**: lbd (dsr, `hash = "source"`, 3 backends, no health checks) on the LB namespace's
//!   eth0, VIP 203.0.113.10 (held by the backends on `lo`); the hash seed is chosen (searched
//!   with lb-common's functions, the data path's own) so that the three client addresses land
//!   on three different backends.
//! - **HAProxy**: `mode tcp`, `balance source`, running in the LB namespace on a VIP of its
//!   own, 203.0.113.20, which the LB namespace holds on `lo` (a proxied path: HAProxy
//!   terminates the client's TCP connection and opens its own to 192.0.2.1x:80; that the
//!   backends also hold that address on `lo` plays no part). lb has no service on it, so its
//!   XDP program passes these packets up (about 20 ns each: the VIP filter tells them apart; see BENCHMARKS.md).
//! - **direct**: the three wrk to backend 1's own address, one nginx, no balancer.
//!
//! All three are up at once and their rounds are interleaved (order rotated every repetition),
//! so background load on this shared 2-core machine falls on every path alike. Each path gets a
//! one-second warm-up first. Which backends served is read from the backends' eth0 receive
//! counters; for lb, `lbctl stats` also counts what it forwarded.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use lb_common::{
    maglev::{MaglevBackend, build_table},
    source_slot,
};
use lb_userspace::state::to_addr;

use super::{Figure, Opts};
use crate::{
    BackendSide, Topology, TopologyOptions,
    lbd::{LbdPaths, start_lbd},
    wait_until,
};

const SECTION: &str = "whole-path HTTP";
/// Part `nat`'s section (its own: the same paths measured again in another run).
const NAT_SECTION: &str = "whole-path HTTP through nat";
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// HAProxy's VIP: held by the LB namespace itself (on `lo`); no lb service.
const HAPROXY_VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// The `nat` service's VIP (part `nat`): no host holds it; the clients route it via lb.
const NAT_VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 30);
const BACKENDS: usize = 3;
const CLIENTS: usize = 3;
const TABLE_SIZE: u32 = 65_537;
const CONNECTIONS: usize = 32;

pub fn run(opts: &Opts) -> Result<Vec<Figure>> {
    run_paths(opts, false)
}

/// Part `nat`'s HTTP half: the same paths as `run`, plus lb with a `nat` service (VIP
/// 203.0.113.30:80 → three more nginx on lb's backend side, port 80, whose default route is
/// lb), all interleaved in one run.
pub fn run_nat(opts: &Opts) -> Result<Vec<Figure>> {
    run_paths(opts, true)
}

fn run_paths(opts: &Opts, with_nat: bool) -> Result<Vec<Figure>> {
    let secs = if opts.quick { 2 } else { 5 };
    let section = if with_nat { NAT_SECTION } else { SECTION };
    let t = Topology::new(TopologyOptions {
        backends: BACKENDS,
        clients: CLIENTS,
        addresses_per_client: 1,
        vips: vec![IpAddr::V4(VIP), IpAddr::V4(HAPROXY_VIP)],
        start_servers: true,
        backend_side: with_nat.then_some(BackendSide {
            direct: BACKENDS,
            gateways: 0,
            behind: 0,
        }),
    })?;
    let main: Vec<usize> = (1..=BACKENDS).collect();
    let side: Vec<usize> = (BACKENDS + 1..=t.backends()).collect();
    if with_nat {
        // NAT backends need nothing of DSR's: the harness's ARP settings back to the defaults,
        // and the VIP (which the harness puts on every backend's lo) taken off theirs; clients
        // reach the NAT VIP through lb.
        for &i in &side {
            let ns = t.backend_ns(i);
            t.exec_ok(
                ns,
                &[
                    "sysctl",
                    "-qw",
                    "net.ipv4.conf.all.arp_ignore=0",
                    "net.ipv4.conf.all.arp_announce=0",
                    "net.ipv4.conf.eth0.arp_ignore=0",
                    "net.ipv4.conf.eth0.arp_announce=0",
                ],
            )?;
            for vip in [VIP, HAPROXY_VIP] {
                let _ = t.exec(
                    ns,
                    &["ip", "addr", "del", &format!("{vip}/32"), "dev", "lo"],
                );
            }
        }
        for c in 1..=t.clients() {
            t.exec_ok(
                t.client_ns(c),
                &[
                    "ip",
                    "route",
                    "add",
                    &NAT_VIP.to_string(),
                    "via",
                    "192.0.2.2",
                ],
            )?;
        }
    }

    // HAProxy on its own VIP, held by the LB namespace.
    t.exec_ok(
        t.lb_ns(),
        &[
            "ip",
            "addr",
            "add",
            &format!("{HAPROXY_VIP}/32"),
            "dev",
            "lo",
        ],
    )?;
    let cfg = t.work_dir().join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(&t, &main))
        .with_context(|| format!("writing {}", cfg.display()))?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&cfg);
    let haproxy = t.spawn_nsenter(t.lb_ns(), &cmd)?;
    let hvip = SocketAddr::new(IpAddr::V4(HAPROXY_VIP), 80);
    wait_until(
        Duration::from_secs(10),
        "HAProxy to accept connections",
        || {
            !t.is_running(haproxy)
                || t.connect_tcp(t.client_ns(1), None, hvip, Duration::from_millis(500))
                    .is_ok()
        },
    )
    .and_then(|()| {
        if t.is_running(haproxy) {
            Ok(())
        } else {
            Err(anyhow!("HAProxy exited"))
        }
    })
    .with_context(|| format!("HAProxy's log:\n{}", t.log_of(haproxy)))?;

    // lbd on VIP.
    let sets: Vec<&[usize]> = if with_nat {
        vec![&main, &side]
    } else {
        vec![&main]
    };
    let (seed_hex, placements) = seed_spreading_clients(&t, &sets)?;
    let lbd_paths = LbdPaths::for_topology(&t);
    let lbd = start_lbd(&t, &lb_config(&t, &lbd_paths, &seed_hex, &main, &side))?;
    for (service, placement) in ["web", "natweb"].iter().zip(&placements) {
        for (i, b) in placement.iter().enumerate() {
            let src = t.client_addr(i + 1).to_string();
            let v = lbd.lbctl_json(&["lookup", service, &src])?;
            let want = t.backend_addr(*b).to_string();
            if v["backend"].as_str() != Some(want.as_str()) {
                bail!(
                    "lbctl lookup places {src} on {} for {service}, lb-common on {want}",
                    v["backend"]
                );
            }
        }
    }
    let forwarded = |service: &str| -> Result<u64> {
        let v = lbd.lbctl_json(&["stats", service])?;
        v["services"][0]["packets"]
            .as_u64()
            .ok_or_else(|| anyhow!("no service packet counter in lbctl stats: {v}"))
    };
    let forwarded_dsr = || forwarded("web");
    let forwarded_nat = || forwarded("natweb");

    let mut paths = vec![
        Path::new(
            Kind::Direct,
            format!("http://{}/", t.backend_addr(1)),
            &main,
        ),
        Path::new(Kind::Haproxy, format!("http://{HAPROXY_VIP}/"), &main),
        Path::new(Kind::Lb, format!("http://{VIP}/"), &main),
    ];
    if with_nat {
        paths.push(Path::new(Kind::Nat, format!("http://{NAT_VIP}/"), &side));
    }
    let measured = (|| -> Result<()> {
        for p in &paths {
            round(&t, 1, &p.url).with_context(|| format!("warm-up round of {}", p.url))?;
        }
        for rep in 0..opts.repetitions {
            // Rotate the order, so no path always follows the same one.
            for k in 0..paths.len() {
                let i = (rep + k) % paths.len();
                let probe = match paths[i].kind {
                    Kind::Lb => Some(&forwarded_dsr as &dyn Fn() -> Result<u64>),
                    Kind::Nat => Some(&forwarded_nat as &dyn Fn() -> Result<u64>),
                    _ => None,
                };
                paths[i].measure_round(&t, secs, probe)?;
            }
        }
        Ok(())
    })();
    measured.with_context(|| {
        format!(
            "HAProxy's log:\n{}\nlbd's log:\n{}",
            t.log_of(haproxy),
            lbd.log()
        )
    })?;
    t.stop(haproxy, Duration::from_secs(5))?;

    let cpu = format!(
        "all on 2 cores: {CLIENTS} wrk (1 thread, {CONNECTIONS} connections each, one per client namespace), {} nginx (1 worker each), HAProxy (idle unless measured; its default thread count, one per CPU: 2), lbd (idle); rounds of the {} paths interleaved",
        t.backends(),
        paths.len()
    );
    let placed: Vec<String> = placements[0]
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{} → backend {b}", t.client_addr(i + 1)))
        .collect();
    let (direct, haproxy, lb) = (&paths[0], &paths[1], &paths[2]);
    let mut figures = vec![];
    figures.extend(direct.figures(
        "nginx directly (backend 1 only)",
        &format!("{cpu}; the three wrk against one nginx, no balancer on the path"),
        opts,
        secs,
        section,
    ));
    figures.extend(haproxy.figures(
        "HAProxy mode tcp, balance source, 3 backends",
        &format!(
            "{cpu}; HAProxy in the LB namespace on its own VIP {HAPROXY_VIP} (held on the LB's lo; proxied: two TCP connections per client connection; lb's XDP program passes these packets up after its VIP filter, about 20 ns each)"
        ),
        opts,
        secs,
        section,
    ));
    figures.extend(lb.figures(
        "lb (XDP, dsr), 3 backends",
        &format!(
            "{cpu}; lb's XDP program runs in the softirq of the CPU that sent each frame; hash seed chosen so that {}; replies go from the backends straight to the clients; lb counted {} packets for the service (lbctl stats) while the backends received {}",
            placed.join(", "),
            lb.probe,
            lb.received.iter().sum::<u64>()
        ),
        opts,
        secs,
        section,
    ));
    let nat = paths.get(3);
    if let Some(nat) = nat {
        let placed: Vec<String> = placements[1]
            .iter()
            .enumerate()
            .map(|(i, b)| format!("{} → backend {b}", t.client_addr(i + 1)))
            .collect();
        figures.extend(nat.figures(
            "lb (XDP, nat), 3 backends",
            &format!(
                "{cpu}; VIP {NAT_VIP}:80 → backends' own addresses, port 80 (rewritten, both directions), on lb's backend side (eth1), which route their default via lb and hold no VIP; requests and replies both through lb's XDP program (replies redirected from eth1 to eth0 in XDP); the same hash seed places {}; lb counted {} request packets for the service (lbctl stats) while the backends received {}",
                placed.join(", "),
                nat.probe,
                nat.received.iter().sum::<u64>()
            ),
            opts,
            secs,
            section,
        ));
    }

    let ratio = |a: &Path, b: &Path| a.rps_median() / b.rps_median();
    figures.push(Figure::value(
        section,
        "req/s ratio: lb ÷ HAProxy",
        "ratio",
        ratio(lb, haproxy),
        "ratio of the medians above",
    ));
    figures.push(Figure::value(
        section,
        "req/s ratio: lb ÷ nginx directly",
        "ratio",
        ratio(lb, direct),
        "ratio of the medians above (lb spreads over 3 nginx, direct loads one)",
    ));
    if let Some(nat) = nat {
        for (other, what, note) in [
            (
                lb,
                "lb dsr",
                "ratio of the medians above (both over 3 nginx)",
            ),
            (
                haproxy,
                "HAProxy",
                "ratio of the medians above (both over 3 nginx)",
            ),
            (
                direct,
                "nginx directly",
                "ratio of the medians above (nat spreads over 3 nginx, direct loads one)",
            ),
        ] {
            figures.push(Figure::value(
                section,
                &format!("req/s ratio: lb nat ÷ {what}"),
                "ratio",
                ratio(nat, other),
                note,
            ));
        }
    }
    Ok(figures)
}

fn haproxy_config(t: &Topology, backends: &[usize]) -> String {
    let mut c = format!(
        "global\n    maxconn 4096\n\ndefaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\nfrontend fe\n    bind {HAPROXY_VIP}:80\n    default_backend be\n\nbackend be\n    balance source\n"
    );
    for &i in backends {
        c.push_str(&format!("    server b{i} {}:80\n", t.backend_addr(i)));
    }
    c
}

/// lbd's config: service `web` (dsr, VIP) on backends `main`, and with any `nat` backends
/// service `natweb` (nat, NAT_VIP, backend port 80) on them.
fn lb_config(
    t: &Topology,
    paths: &LbdPaths,
    seed_hex: &str,
    main: &[usize],
    nat: &[usize],
) -> String {
    let mut c = paths.daemon_section(&format!("hash_seed = \"{seed_hex}\""));
    c.push_str(&format!(
        "\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\ntable_size = {TABLE_SIZE}\n\n"
    ));
    for &i in main {
        c.push_str(&format!(
            "[[service.backend]]\naddress = \"{}\"\n\n",
            t.backend_addr(i)
        ));
    }
    if !nat.is_empty() {
        c.push_str(&format!(
            "[[service]]\nname = \"natweb\"\nvip = \"{NAT_VIP}\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"nat\"\ntable_size = {TABLE_SIZE}\n\n"
        ));
        for &i in nat {
            c.push_str(&format!(
                "[[service.backend]]\naddress = \"{}\"\nport = 80\n\n",
                t.backend_addr(i)
            ));
        }
    }
    c
}

/// A hash seed under which, in every service (its backends in `sets`), the clients' own
/// addresses (192.0.2.101..) land on pairwise different backends; and per service each
/// client's backend (1-based).
fn seed_spreading_clients(t: &Topology, sets: &[&[usize]]) -> Result<(String, Vec<Vec<usize>>)> {
    'seeds: for k in 0..10_000u64 {
        let seed = [0x5f0c_1d2e_3f40_5162, 0x7384_950a_1b2c_0000 + k];
        let mut placements = vec![];
        for set in sets {
            let backends: Vec<MaglevBackend> = set
                .iter()
                .map(|&i| MaglevBackend {
                    id: i as u32,
                    addr: to_addr(t.backend_addr(i)),
                    salt: 0,
                    weight: 100,
                })
                .collect();
            let table = build_table(&seed, &backends, TABLE_SIZE);
            let placement: Vec<usize> = (1..=t.clients())
                .map(|c| {
                    let slot = source_slot(&seed, TABLE_SIZE, &to_addr(t.client_addr(c)));
                    table[slot.unwrap() as usize] as usize
                })
                .collect();
            let mut distinct = placement.clone();
            distinct.sort();
            distinct.dedup();
            if distinct.len() != placement.len().min(set.len()) {
                continue 'seeds;
            }
            placements.push(placement);
        }
        return Ok((format!("{:016x}{:016x}", seed[0], seed[1]), placements));
    }
    bail!("no seed spreads the clients over the backends")
}

/// One wrk's result.
#[derive(Debug, Clone, Default)]
struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    /// Socket errors (connect, read, write, timeout) and non-2xx/3xx responses.
    errors: u64,
}

/// Parses wrk's `--latency` output.
fn parse_wrk(out: &str) -> Result<Wrk> {
    let mut w = Wrk::default();
    let (mut rps, mut p50, mut p99) = (None, None, None);
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v, ..] => rps = v.parse::<f64>().ok(),
            ["50%", v, ..] => p50 = Some(parse_time_ms(v)?),
            ["99%", v, ..] => p99 = Some(parse_time_ms(v)?),
            [n, "requests", "in", ..] => w.requests = n.parse().unwrap_or(0),
            ["Non-2xx", "or", "3xx", "responses:", n, ..] => w.errors += n.parse().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                // connect N, read N, write N, timeout N
                for n in rest.iter().skip(1).step_by(2) {
                    w.errors += n.trim_end_matches(',').parse::<u64>().unwrap_or(0);
                }
            }
            _ => {}
        }
    }
    w.rps = rps.ok_or_else(|| anyhow!("no Requests/sec in wrk's output:\n{out}"))?;
    w.p50_ms = p50.ok_or_else(|| anyhow!("no 50% latency in wrk's output:\n{out}"))?;
    w.p99_ms = p99.ok_or_else(|| anyhow!("no 99% latency in wrk's output:\n{out}"))?;
    Ok(w)
}

/// A wrk time (`812.00us`, `1.23ms`, `2.00s`, `1.00m`) in milliseconds.
fn parse_time_ms(v: &str) -> Result<f64> {
    let units = [
        ("us", 1e-3),
        ("ms", 1.0),
        ("s", 1e3),
        ("m", 60e3),
        ("h", 3600e3),
    ];
    for (suffix, scale) in units {
        if let Some(Ok(x)) = v.strip_suffix(suffix).map(str::parse::<f64>) {
            return Ok(x * scale);
        }
    }
    bail!("unreadable wrk time {v:?}")
}

/// One round: a wrk in every client namespace at once, for `secs` seconds.
fn round(t: &Topology, secs: u64, url: &str) -> Result<Vec<Wrk>> {
    let dur = format!("-d{secs}s");
    let conns = format!("-c{CONNECTIONS}");
    std::thread::scope(|s| {
        let handles: Vec<_> = (1..=t.clients())
            .map(|c| {
                let (dur, conns) = (&dur, &conns);
                s.spawn(move || -> Result<Wrk> {
                    let out = t.exec_ok(
                        t.client_ns(c),
                        &["wrk", "-t1", conns, dur, "--latency", url],
                    )?;
                    parse_wrk(&out).with_context(|| format!("wrk in client {c}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Receive packet counters of backends `ids`' eth0.
fn backend_rx(t: &Topology, ids: &[usize]) -> Result<Vec<u64>> {
    ids.iter()
        .map(|&i| {
            let out = t.exec_ok(t.backend_ns(i), &["ip", "-j", "-s", "link", "show", "eth0"])?;
            let v: serde_json::Value = serde_json::from_str(&out)
                .with_context(|| format!("ip -j -s link printed {out:?}"))?;
            v[0]["stats64"]["rx"]["packets"]
                .as_u64()
                .ok_or_else(|| anyhow!("no rx packet counter in {out}"))
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Direct,
    Haproxy,
    Lb,
    Nat,
}

/// One path under test and what its rounds measured.
struct Path {
    kind: Kind,
    url: String,
    /// The backends this path's traffic may reach (1-based).
    backends: Vec<usize>,
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    requests: u64,
    errors: u64,
    /// Packets each backend received during this path's measured rounds.
    received: Vec<u64>,
    /// How much the probe's counter grew during this path's measured rounds.
    probe: u64,
}

impl Path {
    fn new(kind: Kind, url: String, backends: &[usize]) -> Path {
        Path {
            kind,
            url,
            backends: backends.to_vec(),
            rps: vec![],
            p50: vec![],
            p99: vec![],
            requests: 0,
            errors: 0,
            received: vec![0; backends.len()],
            probe: 0,
        }
    }

    /// One measured round; `probe`, if any, is a counter read before and after it.
    fn measure_round(
        &mut self,
        t: &Topology,
        secs: u64,
        probe: Option<&dyn Fn() -> Result<u64>>,
    ) -> Result<()> {
        let probe_before = probe.map(|p| p()).transpose()?;
        let before = backend_rx(t, &self.backends)?;
        let ws = round(t, secs, &self.url)?;
        let after = backend_rx(t, &self.backends)?;
        if let (Some(p), Some(b)) = (probe, probe_before) {
            self.probe += p()? - b;
        }
        if ws.iter().any(|w| w.requests == 0) {
            bail!("a wrk against {} completed no request: {ws:?}", self.url);
        }
        for (i, (a, b)) in after.iter().zip(&before).enumerate() {
            self.received[i] += a - b;
        }
        self.rps.push(ws.iter().map(|w| w.rps).sum());
        self.p50
            .push(ws.iter().map(|w| w.p50_ms).fold(0.0, f64::max));
        self.p99
            .push(ws.iter().map(|w| w.p99_ms).fold(0.0, f64::max));
        self.requests += ws.iter().map(|w| w.requests).sum::<u64>();
        self.errors += ws.iter().map(|w| w.errors).sum::<u64>();
        Ok(())
    }

    fn rps_median(&self) -> f64 {
        Figure::from_samples("", "", "", self.rps.clone(), "").median
    }

    fn figures(
        &self,
        name: &str,
        note: &str,
        opts: &Opts,
        secs: u64,
        section: &str,
    ) -> Vec<Figure> {
        let total = self.received.iter().sum::<u64>().max(1);
        let shares: Vec<String> = self
            .received
            .iter()
            .enumerate()
            .zip(&self.backends)
            .map(|((_, &r), b)| format!("b{b} {:.0}%", 100.0 * r as f64 / total as f64))
            .collect();
        let common = format!(
            "{note}; {} rounds of {secs} s after a 1 s warm-up; {} requests, {} errors; backend share of received packets: {}",
            opts.repetitions,
            self.requests,
            self.errors,
            shares.join(" ")
        );
        vec![
            Figure::from_samples(
                section,
                &format!("{name}: requests/s"),
                "req/s",
                self.rps.clone(),
                &format!("sum of the {CLIENTS} wrk; {common}"),
            ),
            Figure::from_samples(
                section,
                &format!("{name}: p50 latency"),
                "ms",
                self.p50.clone(),
                &format!("highest of the {CLIENTS} wrk's p50 in each round"),
            ),
            Figure::from_samples(
                section,
                &format!("{name}: p99 latency"),
                "ms",
                self.p99.clone(),
                &format!("highest of the {CLIENTS} wrk's p99 in each round"),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output() {
        let out = "Running 2s test @ http://203.0.113.10/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.10ms  600.00us  12.00ms   90.00%
    Req/Sec    29.00k     1.00k   31.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.20ms
     90%    1.80ms
     99%    3.50ms
  57000 requests in 2.00s, 8.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  28500.12
Transfer/sec:      4.00MB
";
        let w = parse_wrk(out).unwrap();
        assert_eq!(w.rps, 28500.12);
        assert!((w.p50_ms - 0.812).abs() < 1e-9);
        assert_eq!(w.p99_ms, 3.5);
        assert_eq!(w.requests, 57000);
        assert_eq!(w.errors, 7);
        assert_eq!(parse_time_ms("1.50s").unwrap(), 1500.0);
    }
}
