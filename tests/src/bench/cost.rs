//! Benchmark part `cost`: what the XDP program costs per packet, timed by the kernel with
//! BPF_PROG_TEST_RUN, beside a 2-instruction XDP_PASS program run on the same frames the same
//! way ("over the empty program"), and the program's size.
//!
//! The real program is loaded by lbd's own datapath code (`Datapath::open`, connection table at
//! its default 1,048,576 entries) into a pin folder of its own, with the five services of the
//! data-path tests (tests/src/dpfixture.rs).
//!
//! A repeated test run hands every repetition the buffer the previous one left: after an
//! encapsulation the next repetition sees an IP-in-IP packet (and measures the pass path), and a
//! new flow is new only once. So:
//! - paths whose rewrite leaves the path unchanged are run with repeat 1,000,000: a non-VIP
//!   packet (untouched), an established dsr flow over IPv4 and IPv6 (only the MACs change), a SYN
//!   of a flow already in the table (the table's choice is kept in place, MACs only);
//! - new flows (a fresh client address from 198.18.0.0/15, or 2001:2::/48, per packet) and
//!   tunnel packets (the frame grows) are run as many single runs (repeat 1): the figure is the
//!   mean of the kernel-reported durations. A single run carries an overhead of its own (the
//!   timer, and a program that runs cold after the syscall), so the established IPv4 flow is
//!   measured that way too, and the difference to its repeated figure is reported.
//!
//! A new flow's cost depends on the connection table: measured once on a near-empty table (the
//! flows earlier measurements added are deleted first) and once, in a last pass, on a table
//! filled to capacity, where every insert takes the place of its set's least recently seen flow.
//!
//! Every measurement proves its path with the program's own counters, or it fails: the service
//! and backend packet counters must have grown by exactly the number of runs (repetitions) and
//! nothing else may have moved; an established flow's recorded backend is first taken out of
//! its service's Maglev table, so a packet that missed the connection table would be counted on
//! another backend; every new flow must be in the table afterwards (and on the near-empty table,
//! the table must have grown by exactly one entry per packet). With `kernel.bpf_stats_enabled`
//! (set for a second pass, its old value restored) the program's run_cnt must grow by exactly
//! the number of runs, and run_time_ns / run_cnt is reported: the program's time alone, without
//! the test run's loop.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use aya::programs::loaded_programs;
use lb_common::{
    Backend, FlowKey, FlowValue, ServiceKey, ServiceValue, VipKey, backend_flags,
    maglev::{MaglevBackend, build_table},
    service_flags,
};
use lb_userspace::{
    datapath::{self, ConntrackCounter, Datapath, PROGRAM_OBJECT},
    state::{family, to_addr},
};

use super::{Figure, Opts, thousands};
use crate::{
    bpf::TestProg,
    dpfixture::{
        self, CLIENT_MAC, LB_MAC, MTU, SEED, Svc, TABLE, VIP, VIP_TUNNEL, VIP6, VIP6_TUNNEL,
        XDP_PASS, XDP_TX, flow_key,
    },
    packet,
};

const SECTION: &str = "per-packet cost (BPF_PROG_TEST_RUN)";
const SECTION_STATS: &str = "per-packet cost (bpf_stats run_time_ns / run_cnt)";
const SECTION_SIZE: &str = "program size";

/// Repetitions of one test run for the paths that can be repeated.
const REPEAT: u32 = 1_000_000;
/// The connection table's size: lbd's default `conntrack_entries`.
const CONNTRACK_ENTRIES: u32 = 1_048_576;
const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

pub fn run(opts: &Opts) -> Result<Vec<Figure>> {
    crate::require_root();
    let singles = if opts.quick { 5_000 } else { 20_000 };
    let reps = opts.repetitions.max(1);
    let dir = dpfixture::pin_dir("bench-cost");
    let _pins = Pins(dir.clone());
    let mut bench = Bench::new(&dir, singles).context("loading the program for `cost`")?;
    let mut paths = bench.paths()?;
    let load_before = loadavg();

    // Pass 1: kernel-timed test runs, bpf_stats as it was.
    let stats_during = std::fs::read_to_string(STATS_SYSCTL)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let mut timed: Vec<Vec<Sample>> = paths.iter().map(|_| vec![]).collect();
    for _ in 0..reps {
        for (i, p) in paths.iter_mut().enumerate() {
            if p.table == Table::Full {
                continue;
            }
            let s = bench
                .measure(p, false)
                .with_context(|| format!("measuring `{}`", p.name))?;
            timed[i].push(s);
        }
    }
    // Pass 2: the same with kernel.bpf_stats_enabled = 1.
    let mut stats: Vec<Vec<Sample>> = paths.iter().map(|_| vec![]).collect();
    {
        let _stats = StatsOn::enable()?;
        for _ in 0..reps {
            for (i, p) in paths.iter_mut().enumerate() {
                if p.table == Table::Full {
                    continue;
                }
                let s = bench
                    .measure(p, true)
                    .with_context(|| format!("measuring `{}` with bpf_stats", p.name))?;
                stats[i].push(s);
            }
        }
    }
    // Pass 3: new flows into a full table, both ways.
    let (full_before, capacity) = bench.fill()?;
    for _ in 0..reps {
        for (i, p) in paths.iter_mut().enumerate() {
            if p.table != Table::Full {
                continue;
            }
            let s = bench
                .measure(p, false)
                .with_context(|| format!("measuring `{}`", p.name))?;
            timed[i].push(s);
            let _stats = StatsOn::enable()?;
            let s = bench
                .measure(p, true)
                .with_context(|| format!("measuring `{}` with bpf_stats", p.name))?;
            stats[i].push(s);
        }
    }
    let (full_after, _) = bench.flows.count();
    let load_after = loadavg();
    let context = format!(
        "1-minute load average {load_before} before the part, {load_after} after (2 CPUs, shared with whatever else runs)"
    );

    let median = |v: Vec<f64>| Figure::from_samples("", "", "", v, "").median;
    let index = |key: &str| paths.iter().position(|p| p.key == key).expect("defined");
    let (est_repeat, est_single) = (index("est4"), index("est4-single"));
    let est_single_median = median(column(&timed[est_single], |s| s.lb));
    let est_single_stats = median(column(&stats[est_single], |s| s.lb_stats));
    let method = |p: &PathDef| match p.method {
        Method::Repeat => format!(
            "one BPF_PROG_TEST_RUN with repeat {}, the kernel's mean per repetition",
            thousands(REPEAT as u64)
        ),
        Method::Single => format!(
            "mean of {} BPF_PROG_TEST_RUNs with repeat 1 on {} frames (the kernel's duration of each)",
            thousands(singles as u64),
            if p.fresh { "fresh" } else { "identical" }
        ),
    };
    // What a single-run figure compares with: the established flow timed the same way.
    let beside = |p: &PathDef, own: f64, est: f64| -> String {
        if p.method == Method::Single && p.key != "est4-single" {
            format!(
                "; the established IPv4 flow timed the same way: {est:.1} ns, so this path adds {:+.1} ns",
                own - est
            )
        } else {
            String::new()
        }
    };
    let full_note = format!(
        " The table ({} entries, lbd's default) held {} flows after filling and {} after the last measurement (every entry taken: each new flow took the place of another).",
        thousands(capacity),
        thousands(full_before),
        thousands(full_after)
    );

    let mut figures = vec![];
    for (p, samples) in paths.iter().zip(&timed) {
        let own = median(column(samples, |s| s.lb));
        figures.push(Figure::from_samples(
            SECTION,
            &p.name,
            "ns/packet",
            column(samples, |s| s.lb),
            &format!(
                "{}{}. Proven every time: {}.{}",
                method(p),
                beside(p, own, est_single_median),
                p.proof,
                if p.table == Table::Full {
                    full_note.as_str()
                } else {
                    ""
                }
            ),
        ));
    }
    for (p, samples) in paths.iter().zip(&timed) {
        figures.push(Figure::from_samples(
            SECTION,
            &format!("{}: over the empty program", p.name),
            "ns/packet",
            column(samples, |s| s.lb - s.empty),
            &format!(
                "each sample: the path minus the empty XDP_PASS program run right after it on the same frames the same way (empty: median {:.1} ns); target ≤ 50 ns",
                median(column(samples, |s| s.empty))
            ),
        ));
    }
    figures.push(Figure::from_samples(
        SECTION,
        "empty XDP program (r0 = XDP_PASS; exit), repeat",
        "ns/packet",
        column(&timed[est_repeat], |s| s.empty),
        &format!(
            "2 instructions (`pass` of the tests' XDP object, loaded with aya), run on the established flow's frame with repeat {}; bpf_stats was {stats_during} during this pass; {context}",
            thousands(REPEAT as u64)
        ),
    ));
    figures.push(Figure::from_samples(
        SECTION,
        "empty XDP program, single runs",
        "ns/packet",
        column(&timed[est_single], |s| s.empty),
        &format!(
            "run like the established flow's single runs: {} runs with repeat 1; this is the test run's own timing overhead per call",
            thousands(singles as u64)
        ),
    ));
    figures.push(Figure::from_samples(
        SECTION,
        "single-run overhead: established IPv4 flow, single runs − repeat",
        "ns/packet",
        timed[est_single]
            .iter()
            .zip(&timed[est_repeat])
            .map(|(s, r)| s.lb - r.lb)
            .collect(),
        &format!(
            "the same packet and path timed both ways in each repetition: what a single-run figure carries on top of a repeated one. Part is the timer (the empty program's single − repeat: {:.1} ns); the rest is the program itself running cold after the syscall (bpf_stats, which times the program alone: {:.1} ns single vs {:.1} ns repeated)",
            median(
                timed[est_single]
                    .iter()
                    .zip(&timed[est_repeat])
                    .map(|(s, r)| s.empty - r.empty)
                    .collect()
            ),
            est_single_stats,
            median(column(&stats[est_repeat], |s| s.lb_stats))
        ),
    ));

    for (p, samples) in paths.iter().zip(&stats) {
        let n = match p.method {
            Method::Repeat => REPEAT as u64,
            Method::Single => singles as u64,
        };
        let own = median(column(samples, |s| s.lb_stats));
        figures.push(Figure::from_samples(
            SECTION_STATS,
            &p.name,
            "ns/packet",
            column(samples, |s| s.lb_stats),
            &format!(
                "kernel.bpf_stats_enabled=1 (old value restored after): run_cnt grew by exactly {} per measurement, run_time_ns / run_cnt; the empty program the same way: {:.1} ns (the accounting's own clock reads), so {:.1} ns over it{}; counters proven as in the BPF_PROG_TEST_RUN section",
                thousands(n),
                median(column(samples, |s| s.empty_stats)),
                median(column(samples, |s| s.lb_stats - s.empty_stats)),
                beside(p, own, est_single_stats)
            ),
        ));
    }

    figures.extend(bench.size_figures());
    Ok(figures)
}

/// The 1-minute load average.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn column(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> Vec<f64> {
    samples.iter().map(f).collect()
}

/// Removes the pin folder (maps of the program under test) when dropped.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = datapath::cleanup(&self.0);
    }
}

/// Sets kernel.bpf_stats_enabled to 1 and puts the old value back when dropped.
pub(super) struct StatsOn {
    old: String,
}

impl StatsOn {
    pub(super) fn enable() -> Result<StatsOn> {
        let old = std::fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("reading {STATS_SYSCTL}"))?
            .trim()
            .to_string();
        // Already on (another user may hold it on): leave it, and leave it on afterwards.
        if old != "1" {
            std::fs::write(STATS_SYSCTL, "1").with_context(|| format!("writing {STATS_SYSCTL}"))?;
        }
        Ok(StatsOn { old })
    }
}

impl Drop for StatsOn {
    fn drop(&mut self) {
        if self.old != "1" {
            let _ = std::fs::write(STATS_SYSCTL, &self.old);
        }
    }
}

fn program_info(id: u32) -> Result<aya::programs::ProgramInfo> {
    loaded_programs()
        .filter_map(|p| p.ok())
        .find(|p| p.id() == id)
        .ok_or_else(|| anyhow!("program {id} is not loaded"))
}

/// (run_time_ns, run_cnt) of program `id` as bpf_stats counted them.
pub(super) fn run_stats(id: u32) -> Result<(u64, u64)> {
    let info = program_info(id)?;
    Ok((info.run_time().as_nanos() as u64, info.run_count()))
}

// ---- the paths ----

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Method {
    /// One test run with repeat `REPEAT`.
    Repeat,
    /// `singles` test runs with repeat 1.
    Single,
}

/// What the counters must show after a measurement of `n` packets.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Passed up untouched: no service, backend or reason counter moves.
    Untouched,
    /// Forwarded by service `sid`: it counted `n` packets; so did `backend` (when given, and no
    /// other backend did), else the service's backends together. No reason counter moves.
    Forwarded { sid: usize, backend: Option<u32> },
}

struct PathDef {
    key: &'static str,
    name: String,
    method: Method,
    fresh: bool,
    /// The frames of one measurement: one for `Repeat`, `count` for `Single`.
    frames: Box<dyn FnMut(usize) -> Vec<Vec<u8>>>,
    action: u32,
    expect: Expect,
    /// Connection-table entries each packet must add (checked when given).
    flows_per_packet: Option<u64>,
    /// The connection table this path is measured on.
    table: Table,
    /// What a measurement proves (for the figure's note).
    proof: String,
}

/// The state of the connection table a path is measured on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Table {
    /// Whatever the earlier measurements left (a few flows).
    AsIs,
    /// Emptied of the new flows earlier measurements added: it holds the few established flows
    /// and then this measurement's new flows only.
    Emptied,
    /// Filled to capacity first (the third pass): every insert takes the place of another.
    Full,
}

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    /// Kernel-timed ns per run.
    lb: f64,
    empty: f64,
    /// bpf_stats run_time_ns / run_cnt (second pass only).
    lb_stats: f64,
    empty_stats: f64,
}

/// Packet counters of every service and backend, and the reason counters.
#[derive(Debug, PartialEq, Eq)]
struct Counts {
    services: Vec<u64>,
    backends: Vec<u64>,
    reasons: Vec<u64>,
}

/// The program a measurement times.
#[derive(Clone, Copy)]
enum Prog {
    /// lb's, as the data path loaded it.
    Lb,
    /// The empty one (XDP_PASS).
    Empty,
}

struct Bench {
    dp: Datapath,
    dir: PathBuf,
    /// Per service: its backends (id, address).
    backends: Vec<Vec<(u32, IpAddr)>>,
    lb_id: u32,
    /// The empty program (XDP_PASS) of the tests' XDP object.
    empty: TestProg,
    empty_id: u32,
    flows: ConntrackCounter,
    /// New flows added by the last measurements, removed before the next `Table::Emptied` one.
    inserted: Vec<FlowKey>,
    singles: usize,
}

/// Client addresses of the established flows (outside 198.18.0.0/15, where new flows come from).
const C4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const C4_SYN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);
const T4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 8);
const C6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 7);
const T6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 8);
/// Not a VIP: the balancer's own address.
const NOT_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const SPORT: u16 = 40_000;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const UDP_PAYLOAD: [u8; 64] = [0x5a; 64];

fn tcp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    packet::ipv4_tcp(CLIENT_MAC, LB_MAC, src, dst, sport, dport, flags, b"").bytes
}

fn tcp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    packet::ipv6_tcp(CLIENT_MAC, LB_MAC, src, dst, sport, dport, flags, &[]).bytes
}

fn udp4(src: Ipv4Addr, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    packet::ipv4_udp(CLIENT_MAC, LB_MAC, src, dst, SPORT, dport, &UDP_PAYLOAD).bytes
}

/// A UDP datagram over IPv6 with a correct checksum (packet.rs builds TCP only for IPv6).
fn udp6(src: Ipv6Addr, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
    let len = 8 + UDP_PAYLOAD.len();
    let mut udp = vec![0u8; 8];
    udp[0..2].copy_from_slice(&SPORT.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&(len as u16).to_be_bytes());
    udp.extend_from_slice(&UDP_PAYLOAD);
    let mut pseudo = 0u32;
    for pair in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        pseudo += u16::from_be_bytes([pair[0], pair[1]]) as u32;
    }
    pseudo += len as u32 + 17;
    let c = packet::checksum(&udp, pseudo);
    udp[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    packet::ipv6(CLIENT_MAC, LB_MAC, src, dst, &[], 17, &udp).bytes
}

/// The `i`-th fresh IPv4 flow: client addresses from 198.18.0.0/15, then the next source port.
fn fresh4(i: u64) -> (Ipv4Addr, u16) {
    let addr = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (i % 131_072) as u32;
    (Ipv4Addr::from(addr), 1024 + (i / 131_072) as u16)
}

/// The `i`-th fresh IPv6 client: 2001:2::/48 (RFC 5180, benchmarking).
fn fresh6(i: u64) -> Ipv6Addr {
    Ipv6Addr::from((0x2001_0002u128 << 96) | (i as u128 + 1))
}

/// The flow a TCP/UDP frame (IPv4 without options, or IPv6 without extension headers) belongs
/// to, as the program keys it.
fn flow_of(frame: &[u8]) -> Result<FlowKey> {
    let port = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    match frame.get(12..14) {
        Some([0x08, 0x00]) if frame.len() >= 38 => {
            let addr = |at: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    frame[at],
                    frame[at + 1],
                    frame[at + 2],
                    frame[at + 3],
                ))
            };
            Ok(flow_key(addr(26), addr(30), port(34), port(36), frame[23]))
        }
        Some([0x86, 0xdd]) if frame.len() >= 58 => {
            let addr = |at: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&frame[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(o))
            };
            Ok(flow_key(addr(22), addr(38), port(54), port(56), frame[20]))
        }
        _ => bail!("not a plain IPv4/IPv6 frame"),
    }
}

impl Bench {
    /// The program with the five services of the data-path fixture, the connection table at
    /// lbd's default size, and the empty program.
    fn new(dir: &Path, singles: usize) -> Result<Bench> {
        let mut dp = Datapath::open(dir, CONNTRACK_ENTRIES, &[])?;
        dp.set_config(SEED)?;
        let svcs = dpfixture::services();
        let mut next = 0u32;
        let mut backends = vec![];
        let mut vips = vec![];
        for (sid, s) in svcs.iter().enumerate() {
            let mut mine = vec![];
            let mut live = vec![];
            for addr in &s.backends {
                let b = Backend {
                    addr: to_addr(*addr),
                    tunnel_src: s.tunnel_src.map(to_addr).unwrap_or_default(),
                    mac: dpfixture::mac(next),
                    src_mac: LB_MAC,
                    ifindex: 1,
                    service: sid as u32,
                    family: family(*addr),
                    flags: backend_flags::VALID,
                    mtu: MTU as u16,
                    ..Default::default()
                };
                dp.set_backend(next, &b)?;
                live.push(MaglevBackend {
                    id: next,
                    addr: b.addr,
                    weight: 100,
                });
                mine.push((next, *addr));
                next += 1;
            }
            let table = build_table(&SEED, &live, TABLE);
            let value = ServiceValue {
                id: sid as u32,
                flags: s.flags,
                table_size: TABLE,
                _pad: 0,
            };
            let key = ServiceKey {
                addr: to_addr(s.vip),
                port: s.port.to_be(),
                proto: s.proto,
                family: family(s.vip),
            };
            dp.set_service(&key, &value, &table)?;
            let mut vip_value = value;
            if s.five_tuple() {
                vip_value.flags |= service_flags::NO_LATE_FRAGMENTS;
            }
            vips.push((
                VipKey {
                    addr: to_addr(s.vip),
                    proto: s.proto,
                    family: family(s.vip),
                    _pad: [0; 2],
                },
                vip_value,
            ));
            backends.push(mine);
        }
        dp.set_vips(&vips)?;
        let lb_id = dp.program_id();
        let empty = TestProg::pass().context("loading the empty XDP program")?;
        let empty_id = empty.id()?;
        let flows = ConntrackCounter::open(dir)?;
        check_services(&svcs)?;
        Ok(Bench {
            dp,
            dir: dir.to_owned(),
            backends,
            lb_id,
            empty,
            empty_id,
            flows,
            inserted: vec![],
            singles,
        })
    }

    fn counts(&self) -> Counts {
        let n_backends: u32 = self.backends.iter().map(|b| b.len() as u32).sum();
        Counts {
            services: (0..self.backends.len() as u32)
                .map(|s| self.dp.service_counter(s).packets)
                .collect(),
            backends: (0..n_backends)
                .map(|b| self.dp.backend_counter(b).packets)
                .collect(),
            reasons: self.dp.reason_counts().iter().map(|(_, n)| *n).collect(),
        }
    }

    /// Sends `frame` once (a flow's first packet), then takes the backend the connection table
    /// recorded for it out of service `sid`'s Maglev table: from then on only a table hit sends
    /// that flow's packets there. Returns that backend.
    fn establish(&mut self, sid: usize, frame: &[u8], key: &FlowKey) -> Result<u32> {
        let (action, _) = self.dp.test_run(frame)?;
        ensure!(
            action == XDP_TX,
            "first packet of service {sid}: action {action}"
        );
        let recorded = self
            .dp
            .flow(key)
            .context("the first packet left no connection-table entry")?
            .backend;
        let live: Vec<MaglevBackend> = self.backends[sid]
            .iter()
            .filter(|(id, _)| *id != recorded)
            .map(|(id, addr)| MaglevBackend {
                id: *id,
                addr: to_addr(*addr),
                weight: 100,
            })
            .collect();
        self.dp
            .swap_table(sid as u32, &build_table(&SEED, &live, TABLE))?;
        Ok(recorded)
    }

    /// Sets up the flows and defines every measured path, with one-off checks of what the
    /// program makes of each frame.
    fn paths(&mut self) -> Result<Vec<PathDef>> {
        let vip4 = IpAddr::V4(VIP);
        let vip6 = IpAddr::V6(VIP6);

        // Established flows, their recorded backends out of the tables.
        let est4 = tcp4(C4, VIP, SPORT, 80, ACK);
        let b4 = self.establish(
            0,
            &tcp4(C4, VIP, SPORT, 80, SYN),
            &flow_key(C4.into(), vip4, SPORT, 80, 6),
        )?;
        let est6 = tcp6(C6, VIP6, SPORT, 80, ACK);
        let b6 = self.establish(
            1,
            &tcp6(C6, VIP6, SPORT, 80, SYN),
            &flow_key(C6.into(), vip6, SPORT, 80, 6),
        )?;
        let tun4 = udp4(T4, VIP_TUNNEL, 53);
        let bt4 = self.establish(
            2,
            &tun4,
            &flow_key(T4.into(), VIP_TUNNEL.into(), SPORT, 53, 17),
        )?;
        let tun6 = udp6(T6, VIP6_TUNNEL, 53);
        let bt6 = self.establish(
            4,
            &tun6,
            &flow_key(T6.into(), VIP6_TUNNEL.into(), SPORT, 53, 17),
        )?;
        // A SYN of a flow already in the table (after the swap: the table's choice stays).
        let syn = tcp4(C4_SYN, VIP, SPORT, 80, SYN);
        let (action, _) = self.dp.test_run(&syn)?;
        ensure!(action == XDP_TX, "SYN: action {action}");
        let bsyn = self
            .dp
            .flow(&flow_key(C4_SYN.into(), vip4, SPORT, 80, 6))
            .context("the SYN left no entry")?
            .backend;
        let non_vip = tcp4(C4, NOT_VIP, SPORT, 80, ACK);

        // One-off checks of the output frames.
        let (action, out) = self.dp.test_run(&non_vip)?;
        ensure!(
            action == XDP_PASS && out == non_vip,
            "non-VIP packet: action {action}, frame changed: {}",
            out != non_vip
        );
        for (frame, b) in [(&est4, b4), (&est6, b6)] {
            let (action, out) = self.dp.test_run(frame)?;
            ensure!(
                action == XDP_TX
                    && out[..6] == dpfixture::mac(b)
                    && out[6..12] == LB_MAC
                    && out[12..] == frame[12..],
                "dsr: action {action}, frame {out:02x?}"
            );
        }
        let backend_addr = |sid: usize, b: u32| {
            self.backends[sid]
                .iter()
                .find(|(id, _)| *id == b)
                .map(|(_, a)| *a)
        };
        let (action, out) = self.dp.test_run(&tun4)?;
        let IpAddr::V4(dst4) = backend_addr(2, bt4).context("tunnel backend")? else {
            bail!("an IPv6 backend in the IPv4 tunnel service")
        };
        ensure!(
            action == XDP_TX
                && out.len() == tun4.len() + 20
                && out[12..14] == [0x08, 0x00]
                && out[14 + 9] == 4
                && out[14 + 16..14 + 20] == dst4.octets()
                && out[34..] == tun4[14..],
            "IPv4 tunnel: action {action}, frame {out:02x?}"
        );
        let (action, out) = self.dp.test_run(&tun6)?;
        let IpAddr::V6(dst6) = backend_addr(4, bt6).context("tunnel backend")? else {
            bail!("an IPv4 backend in the IPv6 tunnel service")
        };
        ensure!(
            action == XDP_TX
                && out.len() == tun6.len() + 40
                && out[12..14] == [0x86, 0xdd]
                && out[14 + 6] == 41
                && out[14 + 24..14 + 40] == dst6.octets()
                && out[54..] == tun6[14..],
            "IPv6 tunnel: action {action}, frame {out:02x?}"
        );

        let fixed = |frame: Vec<u8>, method: Method| -> Box<dyn FnMut(usize) -> Vec<Vec<u8>>> {
            Box::new(move |count| match method {
                Method::Repeat => vec![frame.clone()],
                Method::Single => vec![frame.clone(); count],
            })
        };
        let hit = |b: u32| {
            format!(
                "every packet counted on backend {b}, the flow's recorded backend, which is no longer in the service's Maglev table: the service and that backend grew by exactly the number of runs, no other counter moved, so every run hit the connection table"
            )
        };
        let mut next4 = 0u64;
        let mut next6 = 0u64;
        // The full-table paths' clients: further on in the same blocks.
        let mut next4_full = 1u64 << 24;
        let mut next6_full = 1u64 << 40;
        Ok(vec![
            PathDef {
                key: "nonvip",
                name: "non-VIP packet (IPv4 TCP to the balancer's own address), repeat".into(),
                method: Method::Repeat,
                fresh: false,
                frames: fixed(non_vip, Method::Repeat),
                action: XDP_PASS,
                expect: Expect::Untouched,
                flows_per_packet: None,
                table: Table::AsIs,
                proof: "XDP_PASS, frame unchanged (checked once), no service, backend or reason counter moved; bpf_stats run_cnt grew by exactly the repeat count (second pass)".into(),
            },
            PathDef {
                key: "est4",
                name: "established flow, IPv4 TCP ACK, dsr, repeat".into(),
                method: Method::Repeat,
                fresh: false,
                frames: fixed(est4.clone(), Method::Repeat),
                action: XDP_TX,
                expect: Expect::Forwarded {
                    sid: 0,
                    backend: Some(b4),
                },
                flows_per_packet: None,
                table: Table::AsIs,
                proof: format!("XDP_TX, MACs rewritten (checked once); {}", hit(b4)),
            },
            PathDef {
                key: "est6",
                name: "established flow, IPv6 TCP ACK, dsr, repeat".into(),
                method: Method::Repeat,
                fresh: false,
                frames: fixed(est6, Method::Repeat),
                action: XDP_TX,
                expect: Expect::Forwarded {
                    sid: 1,
                    backend: Some(b6),
                },
                flows_per_packet: None,
                table: Table::AsIs,
                proof: format!("XDP_TX, MACs rewritten (checked once); {}", hit(b6)),
            },
            PathDef {
                key: "syn",
                name: "SYN of a flow already in the table (port reuse), IPv4, repeat".into(),
                method: Method::Repeat,
                fresh: false,
                frames: fixed(syn, Method::Repeat),
                action: XDP_TX,
                expect: Expect::Forwarded {
                    sid: 0,
                    backend: Some(bsyn),
                },
                flows_per_packet: Some(0),
                table: Table::AsIs,
                proof: format!(
                    "XDP_TX; the service and backend {bsyn} (the table's choice, already recorded) grew by exactly the repeat count, the connection table did not grow: the Maglev choice was made and the entry kept in place every time"
                ),
            },
            PathDef {
                key: "est4-single",
                name: "established flow, IPv4 TCP ACK, dsr, single runs".into(),
                method: Method::Single,
                fresh: false,
                frames: fixed(est4, Method::Single),
                action: XDP_TX,
                expect: Expect::Forwarded {
                    sid: 0,
                    backend: Some(b4),
                },
                flows_per_packet: None,
                table: Table::AsIs,
                proof: format!("XDP_TX every run; {}", hit(b4)),
            },
            PathDef {
                key: "new4",
                name: "new flow, IPv4 TCP SYN from a fresh client, single runs, near-empty table"
                    .into(),
                method: Method::Single,
                fresh: true,
                frames: Box::new(move |count| {
                    (0..count)
                        .map(|_| {
                            let (src, sport) = fresh4(next4);
                            next4 += 1;
                            tcp4(src, VIP, sport, 80, SYN)
                        })
                        .collect()
                }),
                action: XDP_TX,
                expect: Expect::Forwarded {
                    sid: 0,
                    backend: None,
                },
                flows_per_packet: Some(1),
                table: Table::Emptied,
                proof: "XDP_TX every run; the service's packet count grew by exactly the number of runs, the connection table by exactly one entry per run and every packet's flow is in it afterwards (a flow never seen before, hashed and inserted each time); clients from 198.18.0.0/15; before each measurement the flows earlier ones added are deleted, so the table holds the few established flows and this measurement's new ones".into(),
            },
            PathDef {
                key: "new6",
                name: "new flow, IPv6 TCP SYN from a fresh client, single runs, near-empty table"
                    .into(),
                method: Method::Single,
                fresh: true,
                frames: Box::new(move |count| {
                    (0..count)
                        .map(|_| {
                            let src = fresh6(next6);
                            next6 += 1;
                            tcp6(src, VIP6, SPORT, 80, SYN)
                        })
                        .collect()
                }),
                action: XDP_TX,
                expect: Expect::Forwarded {
                    sid: 1,
                    backend: None,
                },
                flows_per_packet: Some(1),
                table: Table::Emptied,
                proof: "XDP_TX every run; the service's packet count grew by exactly the number of runs, the connection table by exactly one entry per run and every packet's flow is in it afterwards; clients from 2001:2::/48; the table emptied of earlier new flows before each measurement".into(),
            },
            PathDef {
                key: "tun4",
                name: "tunnel, IPv4-in-IPv4, established UDP flow, single runs".into(),
                method: Method::Single,
                fresh: false,
                frames: fixed(tun4, Method::Single),
                action: XDP_TX,
                expect: Expect::Forwarded {
                    sid: 2,
                    backend: Some(bt4),
                },
                flows_per_packet: None,
                table: Table::AsIs,
                proof: format!(
                    "XDP_TX every run, the frame grows by the 20-byte outer header towards the backend (checked once); {}",
                    hit(bt4)
                ),
            },
            PathDef {
                key: "tun6",
                name: "tunnel, IPv6-in-IPv6, established UDP flow, single runs".into(),
                method: Method::Single,
                fresh: false,
                frames: fixed(tun6, Method::Single),
                action: XDP_TX,
                expect: Expect::Forwarded {
                    sid: 4,
                    backend: Some(bt6),
                },
                flows_per_packet: None,
                table: Table::AsIs,
                proof: format!(
                    "XDP_TX every run, the frame grows by the 40-byte outer header towards the backend (checked once); {}",
                    hit(bt6)
                ),
            },
            PathDef {
                key: "new4-full",
                name: "new flow, IPv4 TCP SYN from a fresh client, single runs, full table".into(),
                method: Method::Single,
                fresh: true,
                frames: Box::new(move |count| {
                    (0..count)
                        .map(|_| {
                            let (src, sport) = fresh4(next4_full);
                            next4_full += 1;
                            tcp4(src, VIP, sport, 80, SYN)
                        })
                        .collect()
                }),
                action: XDP_TX,
                expect: Expect::Forwarded {
                    sid: 0,
                    backend: None,
                },
                flows_per_packet: None,
                table: Table::Full,
                proof: "XDP_TX every run; the service's packet count grew by exactly the number of runs and every packet's flow is in the table afterwards, which was filled to capacity first: each insert took the place of its set's least recently seen flow".into(),
            },
            PathDef {
                key: "new6-full",
                name: "new flow, IPv6 TCP SYN from a fresh client, single runs, full table".into(),
                method: Method::Single,
                fresh: true,
                frames: Box::new(move |count| {
                    (0..count)
                        .map(|_| {
                            let src = fresh6(next6_full);
                            next6_full += 1;
                            tcp6(src, VIP6, SPORT, 80, SYN)
                        })
                        .collect()
                }),
                action: XDP_TX,
                expect: Expect::Forwarded {
                    sid: 1,
                    backend: None,
                },
                flows_per_packet: None,
                table: Table::Full,
                proof: "XDP_TX every run; the service's packet count grew by exactly the number of runs and every packet's flow is in the table afterwards, which was filled to capacity first: each insert took the place of its set's least recently seen flow".into(),
            },
        ])
    }

    /// Fills every entry of the connection table with a made-up flow (from userspace): from
    /// then on every new flow takes the place of another. Returns the flows it then holds, and
    /// its capacity.
    fn fill(&mut self) -> Result<(u64, u64)> {
        let value = FlowValue {
            backend: self.backends[0][0].0,
            service: 0,
        };
        self.dp
            .fill_flows(value)
            .context("filling the connection table")?;
        Ok(self.flows.count())
    }

    /// Times the program on `frames` (one test run with repeat `REPEAT`, or one run per frame):
    /// ns per run, each run's action checked.
    fn time(&self, prog: Prog, method: Method, frames: &[Vec<u8>], action: u32) -> Result<f64> {
        let run = |frame: &[u8], repeat: u32| -> Result<(u32, u64)> {
            let (a, d) = match prog {
                Prog::Lb => self.dp.test_run_repeat(frame, repeat)?,
                Prog::Empty => self.empty.test_run(frame, repeat)?,
            };
            Ok((a, d.as_nanos() as u64))
        };
        match method {
            Method::Repeat => {
                let (a, ns) = run(&frames[0], REPEAT)?;
                ensure!(a == action, "action {a}, expected {action}");
                Ok(ns as f64)
            }
            Method::Single => {
                let mut total = 0u64;
                for f in frames {
                    let (a, ns) = run(f, 1)?;
                    ensure!(a == action, "action {a}, expected {action}");
                    total += ns;
                }
                Ok(total as f64 / frames.len() as f64)
            }
        }
    }

    /// One measurement of `path` and of the empty program on the same frames, proven with the
    /// counters (and, with `stats`, with bpf_stats' run_cnt).
    fn measure(&mut self, path: &mut PathDef, stats: bool) -> Result<Sample> {
        if path.table == Table::Emptied {
            for k in self.inserted.drain(..) {
                self.dp.forget_flow(&k)?;
            }
        }
        if path.table == Table::Full {
            // Every entry a made-up flow again, so this measurement's new flows only ever take
            // the place of those, not of earlier measurements' new flows.
            self.fill()?;
        }
        let frames = (path.frames)(self.singles);
        // A set holds FLOW_WAYS flows: where more of this measurement's new flows share one,
        // the latest take the earlier ones' entries (with these many flows in a big table,
        // rarely any).
        let mut per_set: std::collections::HashMap<u32, u64> = Default::default();
        if path.fresh {
            for f in &frames {
                let set = self
                    .dp
                    .flow_set(&flow_of(f)?)
                    .ok_or_else(|| anyhow!("CONFIG is not set"))?;
                *per_set.entry(set).or_default() += 1;
            }
        }
        let ways = lb_common::FLOW_WAYS as u64;
        let displaced: u64 = per_set.values().map(|&c| c.saturating_sub(ways)).sum();
        let n = match path.method {
            Method::Repeat => REPEAT as u64,
            Method::Single => frames.len() as u64,
        };
        let before = self.counts();
        let flows_before = path.flows_per_packet.map(|_| self.flows.count().0);
        let stats_before = if stats {
            Some(run_stats(self.lb_id)?)
        } else {
            None
        };
        let lb = self.time(Prog::Lb, path.method, &frames, path.action)?;
        let lb_stats = match stats_before {
            Some(b) => per_run(b, run_stats(self.lb_id)?, n, "the program")?,
            None => 0.0,
        };
        let after = self.counts();
        self.check(&before, &after, path.expect, n)?;
        if let (Some(per), Some(b)) = (path.flows_per_packet, flows_before) {
            let a = self.flows.count().0;
            let expected = b + per * n - displaced;
            ensure!(
                a == expected,
                "connection table: {b} flows before, {a} after {n} packets, expected {expected} ({displaced} displaced by new flows of their own set)",
            );
        }
        if path.fresh {
            for f in &frames {
                let key = flow_of(f)?;
                let crowded = self
                    .dp
                    .flow_set(&key)
                    .and_then(|s| per_set.get(&s))
                    .copied()
                    > Some(ways);
                ensure!(
                    self.dp.flow(&key).is_some() || crowded,
                    "a new flow is not in the connection table after its packet: {key:?}"
                );
                if path.table == Table::Emptied {
                    self.inserted.push(key);
                }
            }
        }
        let stats_before = if stats {
            Some(run_stats(self.empty_id)?)
        } else {
            None
        };
        let empty = self.time(Prog::Empty, path.method, &frames, XDP_PASS)?;
        let empty_stats = match stats_before {
            Some(b) => per_run(b, run_stats(self.empty_id)?, n, "the empty program")?,
            None => 0.0,
        };
        Ok(Sample {
            lb,
            empty,
            lb_stats,
            empty_stats,
        })
    }

    fn check(&self, before: &Counts, after: &Counts, expect: Expect, n: u64) -> Result<()> {
        let delta = |a: &[u64], b: &[u64]| -> Vec<u64> {
            a.iter().zip(b).map(|(a, b)| a.wrapping_sub(*b)).collect()
        };
        let services = delta(&after.services, &before.services);
        let backends = delta(&after.backends, &before.backends);
        let reasons = delta(&after.reasons, &before.reasons);
        ensure!(
            reasons.iter().all(|&r| r == 0),
            "reason counters moved: {reasons:?}"
        );
        match expect {
            Expect::Untouched => {
                ensure!(
                    services.iter().chain(&backends).all(|&c| c == 0),
                    "counters moved for a packet that must pass untouched: services {services:?}, backends {backends:?}"
                );
            }
            Expect::Forwarded { sid, backend } => {
                for (s, &d) in services.iter().enumerate() {
                    let want = if s == sid { n } else { 0 };
                    ensure!(
                        d == want,
                        "service {s} counted {d} packets, expected {want}: {services:?}"
                    );
                }
                let mine: Vec<u32> = self.backends[sid].iter().map(|(id, _)| *id).collect();
                let mut sum = 0;
                for (b, &d) in backends.iter().enumerate() {
                    let b = b as u32;
                    let want = match backend {
                        Some(only) if only == b => Some(n),
                        Some(_) => Some(0),
                        None if mine.contains(&b) => None,
                        None => Some(0),
                    };
                    if let Some(want) = want {
                        ensure!(
                            d == want,
                            "backend {b} counted {d} packets, expected {want}: {backends:?}"
                        );
                    }
                    if mine.contains(&b) {
                        sum += d;
                    }
                }
                ensure!(
                    sum == n,
                    "the service's backends counted {sum} packets, expected {n}"
                );
            }
        }
        Ok(())
    }

    /// Instructions, bytes and stack of the loaded program.
    fn size_figures(&self) -> Vec<Figure> {
        let mut out = vec![];
        match program_info(self.lb_id) {
            Ok(info) => {
                let xlated = info.size_translated().unwrap_or(0) as f64;
                out.push(Figure::value(
                    SECTION_SIZE,
                    "translated instructions",
                    "insns",
                    xlated / 8.0,
                    "bpf_prog_info xlated_prog_len / 8: the program as the kernel keeps it after verification (8 bytes an instruction)",
                ));
                out.push(Figure::value(
                    SECTION_SIZE,
                    "translated size",
                    "bytes",
                    xlated,
                    "bpf_prog_info xlated_prog_len",
                ));
                out.push(Figure::value(
                    SECTION_SIZE,
                    "JIT-compiled size",
                    "bytes",
                    info.size_jitted() as f64,
                    "bpf_prog_info jited_prog_len (x86-64 machine code)",
                ));
                out.push(Figure::value(
                    SECTION_SIZE,
                    "instructions processed by the verifier",
                    "insns",
                    info.verified_instruction_count().unwrap_or(0) as f64,
                    "bpf_prog_info verified_insns: the verifier's work over every path (limit 1,000,000), not the program's length",
                ));
                if let Ok(m) = info.memory_locked() {
                    out.push(Figure::value(
                        SECTION_SIZE,
                        "program memlock",
                        "bytes",
                        m as f64,
                        "fdinfo memlock of the program (maps not included)",
                    ));
                }
            }
            Err(e) => out.push(Figure::value(
                SECTION_SIZE,
                "program info",
                "–",
                f64::NAN,
                &format!("unavailable: {e:#}"),
            )),
        }
        out.push(match stack_depths(&self.dir) {
            Ok(depths) => Figure::value(
                SECTION_SIZE,
                "stack of the largest frame",
                "bytes",
                depths.iter().copied().max().unwrap_or(0) as f64,
                &format!(
                    "the verifier's `stack depth` per subprogram (main first): {} = {} bytes summed; the verifier bounds each call chain at 512 (from `bpftool -d prog load` of the same object)",
                    depths
                        .iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join("+"),
                    depths.iter().sum::<u64>()
                ),
            ),
            Err(e) => Figure::value(
                SECTION_SIZE,
                "stack of the largest frame",
                "bytes",
                f64::NAN,
                &format!("not measured: {e:#}"),
            ),
        });
        out
    }
}

/// The services the paths rely on are where the fixture puts them.
fn check_services(svcs: &[Svc]) -> Result<()> {
    let want: [(IpAddr, bool); 5] = [
        (VIP.into(), false),
        (VIP6.into(), false),
        (VIP_TUNNEL.into(), true),
        (dpfixture::VIP_5TUPLE.into(), false),
        (VIP6_TUNNEL.into(), true),
    ];
    ensure!(
        svcs.len() == want.len(),
        "the fixture has {} services",
        svcs.len()
    );
    for (s, (vip, tunnel)) in svcs.iter().zip(want) {
        ensure!(
            s.vip == vip && s.tunnel() == tunnel,
            "unexpected fixture service {}",
            s.vip
        );
    }
    Ok(())
}

/// ns per run from two bpf_stats readings, which must be exactly `n` runs apart.
fn per_run(before: (u64, u64), after: (u64, u64), n: u64, what: &str) -> Result<f64> {
    let runs = after.1 - before.1;
    ensure!(
        runs == n,
        "bpf_stats: run_cnt of {what} grew by {runs}, expected {n}"
    );
    Ok((after.0 - before.0) as f64 / runs as f64)
}

/// The verifier's stack depth of each subprogram: loads the same object once more with
/// `bpftool -d prog load` (verifier log with statistics), pinned under `dir`, then unpins it.
fn stack_depths(dir: &Path) -> Result<Vec<u64>> {
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let obj = Remove(std::env::temp_dir().join(format!("lb-bench-cost-{}.o", std::process::id())));
    std::fs::write(&obj.0, PROGRAM_OBJECT).context("writing the program object")?;
    let pin = Remove(dir.join("stack_probe"));
    let out = Command::new("bpftool")
        .arg("-d")
        .args(["prog", "load"])
        .arg(&obj.0)
        .arg(&pin.0)
        .args(["type", "xdp"])
        .output()
        .context("running bpftool")?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "bpftool prog load failed ({}): {}",
        out.status,
        text.lines().rev().take(5).collect::<Vec<_>>().join(" / ")
    );
    let line = text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("stack depth "))
        .context("no `stack depth` line in the verifier log")?;
    line.split('+')
        .map(|d| {
            d.trim()
                .parse::<u64>()
                .map_err(|e| anyhow!("`{line}`: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_048_576), "1,048,576");
    }

    #[test]
    fn fresh_flows_are_distinct_and_in_range() {
        let (a, p) = fresh4(0);
        assert_eq!((a, p), (Ipv4Addr::new(198, 18, 0, 0), 1024));
        let (a, p) = fresh4(131_071);
        assert_eq!((a, p), (Ipv4Addr::new(198, 19, 255, 255), 1024));
        let (a, p) = fresh4(131_072);
        assert_eq!((a, p), (Ipv4Addr::new(198, 18, 0, 0), 1025));
        assert_eq!(fresh6(0), "2001:2::1".parse::<Ipv6Addr>().unwrap());
    }
}
