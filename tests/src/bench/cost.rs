//! Benchmark part `cost`: what the XDP program costs per packet, timed by the kernel with
//! BPF_PROG_TEST_RUN, beside a 2-instruction XDP_PASS program run on the same frames the same
//! way ("over the empty program"), and the program's size.
//!
//! The real program is loaded by lbd's own datapath code (`Datapath::open`, connection table at
//! its default 1,048,576 entries) into a pin folder of its own, with the five services of the
//! data-path tests (tests/src/dpfixture.rs).
//!
//! The paths are those of the slot-state data path (docs/design/slot-state.md): a packet on an
//! *unchanged* Maglev slot (every slot in the steady state) goes to the slot's backend without
//! touching the connection table; only on a *changed* slot (after a backend add, drain or
//! weight change, until lbd clears it) does it read its flow's set. So the services 0 (IPv4)
//! and 1 (IPv6) get a change first, through `swap_table` as lbd applies one: every odd slot
//! moves to the service's next backend (half the slots changed, their first backend kept as
//! `old`), every even slot stays. Each path's flows are picked on the kind of slot it measures:
//! - established packet on an unchanged slot (the common case), IPv4 and IPv6, repeated and as
//!   single runs; a record naming another backend is planted for its flow first, so a packet
//!   that read the table would be counted elsewhere, and the record must be byte for byte as
//!   planted afterwards;
//! - established packet of a recorded flow on a changed slot (a table hit): its SYN recorded it
//!   on the slot's current backend, then a second change moved the slot on to the third
//!   backend, so its record names neither the slot's current nor its previous backend;
//! - an unrecorded non-SYN (TCP ACK of a flow never seen) on a changed slot: goes to the slot's
//!   previous backend and is recorded there;
//! - a SYN on an unchanged slot (nothing written) and on a changed slot (recorded on the current
//!   backend), from fresh clients, the latter on a near-empty and on a full table; a SYN
//!   repeated on each kind of slot (on the changed one the flow's record is found and written
//!   again: port reuse);
//! - tunnel packets (IPv4-in-IPv4, IPv6-in-IPv6) of UDP flows on unchanged slots (the tunnel
//!   services are never changed), and a non-VIP packet.
//!
//! A repeated test run hands every repetition the buffer the previous one left: after an
//! encapsulation the next repetition sees an IP-in-IP packet (and measures the pass path), and a
//! new flow is new only once. So paths whose rewrite leaves the path unchanged are run with
//! repeat 1,000,000 (non-VIP, dsr established, a SYN of the same flow), and fresh flows (a new
//! client address from 198.18.0.0/15, or 2001:2::/48, per packet, kept only when its slot is of
//! the path's kind) and tunnel packets (the frame grows) as many single runs (repeat 1): the
//! figure is the mean of the kernel-reported durations. A single run carries an overhead of its
//! own (the timer, and a program that runs cold after the syscall), so the established IPv4 flow
//! is measured that way too, and the difference to its repeated figure is reported.
//!
//! Recording a new flow depends on the connection table: measured on a near-empty table (the
//! flows earlier measurements added are deleted first) and, in a last pass, on a table filled to
//! capacity, where every insert takes the place of its set's least recently seen flow.
//!
//! Every measurement proves its path, or it fails: the service counter must have grown by
//! exactly the number of runs, every backend counter by exactly the packets predicted for it
//! (the slot's current backend, its previous one, or the flow's record, as the path says), and
//! nothing else may have moved; afterwards each fresh flow must have a record naming its
//! predicted backend, or none where nothing may be written, and the table must have grown by
//! exactly one entry per recorded packet (none elsewhere). With `kernel.bpf_stats_enabled` (set
//! for a second pass, its old value restored) the program's run_cnt must grow by exactly the
//! number of runs, and run_time_ns / run_cnt is reported: the program's time alone, without the
//! test run's loop.
//!
//! Client filters: the established IPv4 packet on an unchanged slot again, its service given a
//! deny and an allow list of 10, then of 10,000 prefixes each (half /32s, half /24s, spread
//! over 10.0.0.0/8 and 172.16.0.0/12; the client is in no deny prefix and in one allow prefix,
//! so every packet reads both lists: the most a forwarded packet pays), beside the same packet
//! with no lists, in the same repetitions; proven as the other paths (forwarded to its backend,
//! no reason counter moved).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use aya::programs::loaded_programs;
use lb_common::{
    Backend, FilterData, FlowKey, FlowValue, Record, ServiceKey, ServiceValue, VipKey,
    backend_flags, filter_list,
    maglev::{MaglevBackend, build_table},
    maglev_slot, service_flags,
};
use lb_userspace::{
    datapath::{self, ConntrackCounter, Datapath, FilterEntry, PROGRAM_OBJECT},
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
    // Pass 3: client filter lists of growing size on the established IPv4 path (before the
    // table is filled: the path's planted record must still be there).
    let est4 = paths.iter().position(|p| p.key == "est4").expect("defined");
    let mut filtered: Vec<(usize, Vec<Sample>)> =
        FILTER_SIZES.iter().map(|&n| (n, vec![])).collect();
    for _ in 0..reps {
        for (n, samples) in filtered.iter_mut() {
            bench
                .set_lists(&mut paths[est4], *n)
                .with_context(|| format!("giving service 0 lists of {n} prefixes"))?;
            let timed = bench
                .measure(&mut paths[est4], false)
                .with_context(|| format!("measuring `est4` with lists of {n} prefixes"))?;
            let with_stats = {
                let _stats = StatsOn::enable()?;
                bench
                    .measure(&mut paths[est4], true)
                    .with_context(|| format!("measuring `est4` with lists of {n}, bpf_stats"))?
            };
            samples.push(Sample {
                lb_stats: with_stats.lb_stats,
                empty_stats: with_stats.empty_stats,
                ..timed
            });
        }
    }
    bench.set_lists(&mut paths[est4], 0)?;
    // Pass 4: new flows into a full table, both ways.
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
            if p.fresh() { "fresh" } else { "identical" }
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

    let none = &filtered[0].1;
    for (n, samples) in &filtered {
        let lists = match n {
            0 => "no lists".to_string(),
            n => format!(
                "deny and allow lists of {} prefixes each",
                thousands(*n as u64)
            ),
        };
        figures.push(Figure::from_samples(
            SECTION,
            &format!("client filters, established IPv4 TCP ACK, unchanged slot, {lists}, repeat"),
            "ns/packet",
            column(samples, |s| s.lb),
            &format!(
                "{}. The client is in no deny prefix and in one allow prefix: both lists are read (one LPM trie lookup each). Proven every time: {}",
                method(&paths[est4]),
                paths[est4].proof
            ),
        ));
        if *n > 0 {
            figures.push(Figure::from_samples(
                SECTION,
                &format!("client filters: {lists}, over no lists"),
                "ns/packet",
                samples.iter().zip(none).map(|(s, z)| s.lb - z.lb).collect(),
                "each sample: the packet with the lists minus the same packet without, timed in the same repetition",
            ));
            figures.push(Figure::from_samples(
                SECTION_STATS,
                &format!("client filters: {lists}, over no lists"),
                "ns/packet",
                samples
                    .iter()
                    .zip(none)
                    .map(|(s, z)| s.lb_stats - z.lb_stats)
                    .collect(),
                "run_time_ns / run_cnt with the lists minus without, in the same repetition (kernel.bpf_stats_enabled=1)",
            ));
        }
    }

    figures.extend(bench.size_figures());
    Ok(figures)
}

/// The sizes of the client filter lists measured (each list; 0: none).
const FILTER_SIZES: [usize; 3] = [0, 10, 10_000];

/// `n` distinct prefixes of `base` (an IPv4 /8 or /12 given as its first address and the
/// number of free bits), half /32s and half /24s, spread by a multiplicative hash.
fn spread_prefixes(base: u32, free_bits: u32, n: usize) -> Vec<(Ipv4Addr, u8)> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = vec![];
    let mut i: u64 = 0;
    while out.len() < n {
        let h = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32;
        let len: u8 = if i.is_multiple_of(2) { 32 } else { 24 };
        let mask = u32::MAX << (32 - u32::from(len));
        let addr = (base | (h & ((1 << free_bits) - 1))) & mask;
        if seen.insert((addr, len)) {
            out.push((Ipv4Addr::from(addr), len));
        }
        i += 1;
    }
    out
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

/// Which backend of its slot a fresh flow's packet must go to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Which {
    /// The slot's current backend (the Maglev table's choice now).
    Current,
    /// The slot's previous backend (`old`: its backend before the change).
    Old,
}

/// What the counters must show after a measurement of `n` packets.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Passed up untouched: no service, backend or reason counter moves.
    Untouched,
    /// Forwarded by service `sid` to `backend`: both counted `n` packets, no other service or
    /// backend counted any. No reason counter moves.
    Forwarded { sid: usize, backend: u32 },
    /// Every frame the first packet of a flow never seen before, of service `sid`: each must be
    /// counted on the backend predicted for its slot (`go`), so every backend's count grows by
    /// exactly the packets predicted for it; `recorded`: afterwards each flow has a record
    /// naming that backend, else none.
    Fresh {
        sid: usize,
        go: Which,
        recorded: bool,
    },
}

/// What the connection table must hold for a fixed-frame path's flow after a measurement.
#[derive(Clone, Copy, Debug)]
enum Keep {
    /// This record, untouched (its `seen` stamp included): the path wrote nothing.
    Exactly(Record),
    /// A record naming this backend.
    Names(u32),
    /// No record.
    Nothing,
}

struct PathDef {
    key: &'static str,
    name: String,
    method: Method,
    /// The frames of one measurement: one for `Repeat`, `count` for `Single`.
    frames: Box<dyn FnMut(usize) -> Vec<Vec<u8>>>,
    action: u32,
    expect: Expect,
    /// The flow of a fixed-frame path and what the table must hold for it afterwards.
    keep: Option<(FlowKey, Keep)>,
    /// Connection-table entries each packet must add (checked when given).
    flows_per_packet: Option<u64>,
    /// The connection table this path is measured on.
    table: Table,
    /// What a measurement proves (for the figure's note).
    proof: String,
}

impl PathDef {
    /// Fresh frames: every one a flow never seen before.
    fn fresh(&self) -> bool {
        matches!(self.expect, Expect::Fresh { .. })
    }
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
    /// Per service: its entry (for the slot of a flow).
    values: Vec<ServiceValue>,
    /// Per service: the Maglev table it was created with (each slot's backend before any
    /// change: the `old` of a changed slot).
    first: Vec<Vec<u32>>,
    /// Per service: its Maglev table now (each slot's current backend).
    now: Vec<Vec<u32>>,
    lb_id: u32,
    /// The empty program (XDP_PASS) of the tests' XDP object.
    empty: TestProg,
    empty_id: u32,
    flows: ConntrackCounter,
    /// New flows added by the last measurements, removed before the next `Table::Emptied` one.
    inserted: Vec<FlowKey>,
    singles: usize,
}

/// Not a VIP: the balancer's own address.
const NOT_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The client of the non-VIP packet.
const C4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const SPORT: u16 = 40_000;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const UDP_PAYLOAD: [u8; 64] = [0x5a; 64];
/// Where each fresh-flow path's clients start (`fresh4`, `fresh6`): apart, so that no path
/// ever sends a flow another one sent.
const FRESH_BLOCK: u64 = 1 << 28;

/// The slots the benchmark's change marks in services 0 and 1: every odd one (half the table).
fn marked(slot: u32) -> bool {
    slot % 2 == 1
}

/// The Maglev slot of `key` in the table of service `value`.
fn slot_of(value: &ServiceValue, key: &FlowKey) -> u32 {
    maglev_slot(&SEED, value, key).map_or(0, |s| s.index)
}

fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => tcp4(s, d, sport, dport, flags),
        (IpAddr::V6(s), IpAddr::V6(d)) => tcp6(s, d, sport, dport, flags),
        _ => unreachable!("a client and a VIP of different families"),
    }
}

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

/// Frames of flows never seen before to service `value` at `dst` port 80: TCP with `flags`
/// from clients of 198.18.0.0/15 (the source port moving on after each pass over them) or of
/// 2001:2::/48, from the `start`-th on, keeping only those whose slot is marked changed or not,
/// as `changed` asks.
fn fresh_frames(
    value: ServiceValue,
    dst: IpAddr,
    start: u64,
    changed: bool,
    flags: u8,
) -> Box<dyn FnMut(usize) -> Vec<Vec<u8>>> {
    let mut next = start;
    Box::new(move |count| {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let i = next;
            next += 1;
            let (src, sport) = match dst {
                IpAddr::V4(_) => {
                    let (a, p) = fresh4(i);
                    (IpAddr::V4(a), p)
                }
                IpAddr::V6(_) => (IpAddr::V6(fresh6(i)), SPORT),
            };
            if marked(slot_of(&value, &flow_key(src, dst, sport, 80, 6))) == changed {
                out.push(tcp(src, dst, sport, 80, flags));
            }
        }
        out
    })
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
        let mut values = vec![];
        let mut tables = vec![];
        for (sid, s) in svcs.iter().enumerate() {
            let mut mine = vec![];
            let mut live = vec![];
            for addr in &s.backends {
                let b = Backend {
                    addr: to_addr(*addr),
                    tunnel_src: s.tunnel_src.map(to_addr).unwrap_or_default(),
                    mac: dpfixture::mac(next),
                    port: 0,
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
                    salt: 0,
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
            values.push(value);
            tables.push(table);
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
            values,
            now: tables.clone(),
            first: tables,
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

    /// The slot of `key` in service `sid`'s table.
    fn slot(&self, sid: usize, key: &FlowKey) -> usize {
        slot_of(&self.values[sid], key) as usize
    }

    /// The backend after `b` among service `sid`'s (the last one's next is the first).
    fn rotate(&self, sid: usize, b: u32) -> u32 {
        let ids: Vec<u32> = self.backends[sid].iter().map(|(id, _)| *id).collect();
        let at = ids.iter().position(|&id| id == b).unwrap_or(0);
        ids[(at + 1) % ids.len()]
    }

    /// Gives service `sid` the Maglev table `table` through `swap_table`, as lbd applies a
    /// change, and checks the slot state it left: a slot is changed exactly when its backend
    /// differs from the service's first table (nothing clears slots here), with that first
    /// backend as its `old`.
    fn swap(&mut self, sid: usize, table: Vec<u32>) -> Result<()> {
        self.dp.swap_table(sid as u32, &table)?;
        let state = self
            .dp
            .slot_state(sid as u32)
            .context("no slot state after swapping a table in")?;
        ensure!(
            state.hot.len() == table.len(),
            "slot state of {} slots",
            state.hot.len()
        );
        for (s, &b) in table.iter().enumerate() {
            let (hot, side) = (state.hot[s], state.side[s]);
            let first = self.first[sid][s];
            ensure!(
                hot.current() == b
                    && hot.changed() == (b != first)
                    && (!hot.changed() || side.old() == first),
                "service {sid} slot {s}: current {} changed {} old {} after swapping in backend {b} (first {first})",
                hot.current(),
                hot.changed(),
                side.old()
            );
        }
        self.now[sid] = table;
        Ok(())
    }

    /// Whether slot `s` of service `sid` is changed, as the slot state says.
    fn changed(&self, sid: usize, s: usize) -> bool {
        self.dp
            .slot_state(sid as u32)
            .is_some_and(|st| st.hot[s].changed())
    }

    /// The next client (after `*next`) of 198.51.100.0/24 (IPv4 VIPs) or 2001:db8:c1::/64 (IPv6
    /// VIPs) whose flow to `dst`:`dport` lands on a marked slot of service `sid`, or on an
    /// unmarked one, as `changed` asks.
    fn pick(
        &self,
        sid: usize,
        next: &mut u16,
        dst: IpAddr,
        dport: u16,
        proto: u8,
        changed: bool,
    ) -> Result<(IpAddr, FlowKey)> {
        for _ in 0..100 {
            *next += 1;
            let src = match dst {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(198, 51, 100, *next as u8)),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, *next)),
            };
            let key = flow_key(src, dst, SPORT, dport, proto);
            if marked(self.slot(sid, &key) as u32) == changed {
                return Ok((src, key));
            }
        }
        bail!("no client of service {sid} on a slot with changed = {changed}")
    }

    /// Runs `frame` once: XDP_TX, dsr to `backend` (its MAC, ours as the source, the rest of
    /// the frame unchanged).
    fn once_dsr(&self, frame: &[u8], backend: u32, what: &str) -> Result<()> {
        let (action, out) = self.dp.test_run(frame)?;
        ensure!(
            action == XDP_TX
                && out[..6] == dpfixture::mac(backend)
                && out[6..12] == LB_MAC
                && out[12..] == frame[12..],
            "{what}: action {action}, frame {out:02x?}, expected dsr to backend {backend}"
        );
        Ok(())
    }

    /// Plants a record for `key` (service `sid`, on an unchanged slot) naming another backend
    /// than its slot's: a packet that read the connection table would go there. Returns the
    /// slot's backend and the record as stored.
    fn plant(&mut self, sid: usize, key: &FlowKey) -> Result<(u32, Record)> {
        let s = self.slot(sid, key);
        ensure!(!self.changed(sid, s), "service {sid} slot {s} is changed");
        let current = self.now[sid][s];
        let other = self.rotate(sid, current);
        self.dp.set_flow(
            key,
            FlowValue {
                backend: other,
                service: sid as u32,
            },
        )?;
        let record = self
            .dp
            .flow_entry(key)
            .context("the planted record is not in the table")?;
        ensure!(
            record.backend() == other && other != current,
            "planted record {record:?}"
        );
        Ok((current, record))
    }

    /// Sets up the flows and the change, and defines every measured path, with one-off checks
    /// of what the program makes of each frame.
    fn paths(&mut self) -> Result<Vec<PathDef>> {
        let vip4 = IpAddr::V4(VIP);
        let vip6 = IpAddr::V6(VIP6);

        // The change: services 0 (IPv4) and 1 (IPv6) get a table in which every odd slot has
        // the next of the service's backends, swapped in as lbd applies a change: those slots
        // are changed, with their first backend as `old`; the even ones are as they were.
        for sid in [0, 1] {
            let t: Vec<u32> = self.first[sid]
                .iter()
                .enumerate()
                .map(|(s, &b)| {
                    if marked(s as u32) {
                        self.rotate(sid, b)
                    } else {
                        b
                    }
                })
                .collect();
            self.swap(sid, t)?;
        }
        let (mut n4, mut n6) = (9u16, 0u16);

        // Recorded flows on changed slots: each SYN is recorded on its slot's current backend;
        // then a second change moves those slots on to the service's third backend, so that
        // the record names neither the slot's current backend nor its previous one: a packet
        // that missed its record would go elsewhere.
        let mut recorded = vec![];
        for (sid, vip, next) in [(0usize, vip4, &mut n4), (1, vip6, &mut n6)] {
            let (src, key) = self.pick(sid, next, vip, 80, 6, true)?;
            let s = self.slot(sid, &key);
            ensure!(
                self.changed(sid, s),
                "service {sid} slot {s} is not changed"
            );
            let current = self.now[sid][s];
            self.once_dsr(
                &tcp(src, vip, SPORT, 80, SYN),
                current,
                "SYN on a changed slot",
            )?;
            let r = self
                .dp
                .flow(&key)
                .context("a SYN on a changed slot left no record")?
                .backend;
            ensure!(
                r == current,
                "a SYN on a changed slot was recorded on {r}, not on the slot's current {current}"
            );
            let mut t = self.now[sid].clone();
            t[s] = self.rotate(sid, t[s]);
            self.swap(sid, t)?;
            let (now, old) = (self.now[sid][s], self.first[sid][s]);
            ensure!(
                r != now && r != old && self.changed(sid, s),
                "record {r}, slot now {now}, old {old}"
            );
            let ack = tcp(src, vip, SPORT, 80, ACK);
            self.once_dsr(&ack, r, "established packet of a recorded flow")?;
            recorded.push((sid, key, ack, r));
        }

        // Established flows on unchanged slots, each with a planted record naming another
        // backend than its slot's.
        let mut unchanged = vec![];
        for (sid, vip, next) in [(0usize, vip4, &mut n4), (1, vip6, &mut n6)] {
            let (src, key) = self.pick(sid, next, vip, 80, 6, false)?;
            let (b, record) = self.plant(sid, &key)?;
            let ack = tcp(src, vip, SPORT, 80, ACK);
            self.once_dsr(&ack, b, "established packet on an unchanged slot")?;
            ensure!(
                self.dp.flow_entry(&key) == Some(record),
                "a packet on an unchanged slot touched the flow's record"
            );
            unchanged.push((sid, key, ack, b, record));
        }

        // A SYN on an unchanged slot, repeated: nothing is written.
        let (src, syn_u_key) = self.pick(0, &mut n4, vip4, 80, 6, false)?;
        let syn_u = tcp(src, vip4, SPORT, 80, SYN);
        let syn_u_b = self.now[0][self.slot(0, &syn_u_key)];
        self.once_dsr(&syn_u, syn_u_b, "SYN on an unchanged slot")?;
        ensure!(
            self.dp.flow(&syn_u_key).is_none(),
            "a SYN on an unchanged slot left a record"
        );
        // A SYN on a changed slot, repeated: the first one records the flow on the slot's
        // current backend, every later one finds that record and writes it again (a new
        // connection on the same port: port reuse).
        let (src, syn_c_key) = self.pick(0, &mut n4, vip4, 80, 6, true)?;
        let syn_c = tcp(src, vip4, SPORT, 80, SYN);
        let syn_c_b = self.now[0][self.slot(0, &syn_c_key)];
        self.once_dsr(&syn_c, syn_c_b, "SYN on a changed slot")?;
        ensure!(
            self.dp.flow(&syn_c_key).map(|v| v.backend) == Some(syn_c_b),
            "a SYN on a changed slot was not recorded on the slot's current backend"
        );

        // Tunnel flows (UDP) on unchanged slots of the tunnel services (no change there), each
        // with a planted record naming the service's other backend.
        let (t4, tun4_key) = self.pick(2, &mut n4, VIP_TUNNEL.into(), 53, 17, false)?;
        let IpAddr::V4(t4) = t4 else { unreachable!() };
        let tun4 = udp4(t4, VIP_TUNNEL, 53);
        let (bt4, tun4_record) = self.plant(2, &tun4_key)?;
        let (t6, tun6_key) = self.pick(4, &mut n6, VIP6_TUNNEL.into(), 53, 17, false)?;
        let IpAddr::V6(t6) = t6 else { unreachable!() };
        let tun6 = udp6(t6, VIP6_TUNNEL, 53);
        let (bt6, tun6_record) = self.plant(4, &tun6_key)?;
        let non_vip = tcp4(C4, NOT_VIP, SPORT, 80, ACK);

        // One-off checks of the output frames.
        let (action, out) = self.dp.test_run(&non_vip)?;
        ensure!(
            action == XDP_PASS && out == non_vip,
            "non-VIP packet: action {action}, frame changed: {}",
            out != non_vip
        );
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
        for (key, record) in [(&tun4_key, tun4_record), (&tun6_key, tun6_record)] {
            ensure!(
                self.dp.flow_entry(key) == Some(record),
                "a tunnel packet on an unchanged slot touched the flow's record"
            );
        }

        let fixed = |frame: Vec<u8>, method: Method| -> Box<dyn FnMut(usize) -> Vec<Vec<u8>>> {
            Box::new(move |count| match method {
                Method::Repeat => vec![frame.clone()],
                Method::Single => vec![frame.clone(); count],
            })
        };
        let untouched = |b: u32| {
            format!(
                "every packet counted on backend {b}, the slot's, and no other; the flow has a planted record naming another backend, which no packet followed and which is byte for byte as planted afterwards (its `seen` stamp included), and the table did not grow: the connection table was neither consulted nor written"
            )
        };
        let hit = |b: u32| {
            format!(
                "every packet counted on backend {b}, the flow's recorded backend, which is neither the slot's current backend nor its previous one (a second change moved the slot on after the flow's SYN was recorded): the service and that backend grew by exactly the number of runs, no other counter moved, so every run found the record; the record still names {b} afterwards and the table did not grow"
            )
        };
        let [(rsid4, rkey4, rack4, rb4), (rsid6, rkey6, rack6, rb6)]: [_; 2] = recorded
            .try_into()
            .map_err(|_| anyhow!("two recorded flows"))?;
        let [
            (usid4, ukey4, uack4, ub4, urec4),
            (usid6, ukey6, uack6, ub6, urec6),
        ]: [_; 2] = unchanged
            .try_into()
            .map_err(|_| anyhow!("two flows on unchanged slots"))?;
        let (v0, v1) = (self.values[0], self.values[1]);
        let fresh = |k: u64| k * FRESH_BLOCK;
        let mut paths = vec![
            PathDef {
                key: "nonvip",
                name: "non-VIP packet (IPv4 TCP to the balancer's own address), repeat".into(),
                method: Method::Repeat,
                frames: fixed(non_vip, Method::Repeat),
                action: XDP_PASS,
                expect: Expect::Untouched,
                keep: None,
                flows_per_packet: None,
                table: Table::AsIs,
                proof: "XDP_PASS, frame unchanged (checked once), no service, backend or reason counter moved; bpf_stats run_cnt grew by exactly the repeat count (second pass)".into(),
            },
            PathDef {
                key: "est4",
                name: "established, unchanged slot (no table access), IPv4 TCP ACK, dsr, repeat"
                    .into(),
                method: Method::Repeat,
                frames: fixed(uack4.clone(), Method::Repeat),
                action: XDP_TX,
                expect: Expect::Forwarded {
                    sid: usid4,
                    backend: ub4,
                },
                keep: Some((ukey4, Keep::Exactly(urec4))),
                flows_per_packet: Some(0),
                table: Table::AsIs,
                proof: format!("XDP_TX, MACs rewritten (checked once); {}", untouched(ub4)),
            },
            PathDef {
                key: "est6",
                name: "established, unchanged slot (no table access), IPv6 TCP ACK, dsr, repeat"
                    .into(),
                method: Method::Repeat,
                frames: fixed(uack6, Method::Repeat),
                action: XDP_TX,
                expect: Expect::Forwarded {
                    sid: usid6,
                    backend: ub6,
                },
                keep: Some((ukey6, Keep::Exactly(urec6))),
                flows_per_packet: Some(0),
                table: Table::AsIs,
                proof: format!("XDP_TX, MACs rewritten (checked once); {}", untouched(ub6)),
            },
            PathDef {
                key: "rec4",
                name: "established, recorded flow on a changed slot (table hit), IPv4 TCP ACK, dsr, repeat".into(),
                method: Method::Repeat,
                frames: fixed(rack4, Method::Repeat),
                action: XDP_TX,
                expect: Expect::Forwarded {
                    sid: rsid4,
                    backend: rb4,
                },
                keep: Some((rkey4, Keep::Names(rb4))),
                flows_per_packet: Some(0),
                table: Table::AsIs,
                proof: format!("XDP_TX, MACs rewritten (checked once); {}", hit(rb4)),
            },
            PathDef {
                key: "rec6",
                name: "established, recorded flow on a changed slot (table hit), IPv6 TCP ACK, dsr, repeat".into(),
                method: Method::Repeat,
                frames: fixed(rack6, Method::Repeat),
                action: XDP_TX,
                expect: Expect::Forwarded {
                    sid: rsid6,
                    backend: rb6,
                },
                keep: Some((rkey6, Keep::Names(rb6))),
                flows_per_packet: Some(0),
                table: Table::AsIs,
                proof: format!("XDP_TX, MACs rewritten (checked once); {}", hit(rb6)),
            },
            PathDef {
                key: "syn4",
                name: "SYN on an unchanged slot (nothing written), IPv4, repeat".into(),
                method: Method::Repeat,
                frames: fixed(syn_u, Method::Repeat),
                action: XDP_TX,
                expect: Expect::Forwarded {
                    sid: 0,
                    backend: syn_u_b,
                },
                keep: Some((syn_u_key, Keep::Nothing)),
                flows_per_packet: Some(0),
                table: Table::AsIs,
                proof: format!(
                    "XDP_TX; the service and backend {syn_u_b} (the slot's) grew by exactly the repeat count, no other counter moved; the flow has no record afterwards and the table did not grow"
                ),
            },
            PathDef {
                key: "synrec4",
                name: "SYN of a recorded flow on a changed slot (port reuse: the record written again), IPv4, repeat".into(),
                method: Method::Repeat,
                frames: fixed(syn_c, Method::Repeat),
                action: XDP_TX,
                expect: Expect::Forwarded {
                    sid: 0,
                    backend: syn_c_b,
                },
                keep: Some((syn_c_key, Keep::Names(syn_c_b))),
                flows_per_packet: Some(0),
                table: Table::AsIs,
                proof: format!(
                    "XDP_TX; the service and backend {syn_c_b} (the changed slot's current backend, not its previous one) grew by exactly the repeat count, no other counter moved; the flow's record names {syn_c_b} afterwards and the table did not grow: each SYN found the flow's own entry and wrote it again"
                ),
            },
            PathDef {
                key: "est4-single",
                name: "established, unchanged slot, IPv4 TCP ACK, dsr, single runs".into(),
                method: Method::Single,
                frames: fixed(uack4, Method::Single),
                action: XDP_TX,
                expect: Expect::Forwarded {
                    sid: usid4,
                    backend: ub4,
                },
                keep: Some((ukey4, Keep::Exactly(urec4))),
                flows_per_packet: Some(0),
                table: Table::AsIs,
                proof: format!("XDP_TX every run; {}", untouched(ub4)),
            },
        ];
        let old_proof = |clients: &str| {
            format!(
                "XDP_TX every run; every packet counted on its slot's previous backend (`old`, the backend before the change, which differs from the slot's current one on every changed slot): each backend's count grew by exactly the packets predicted for it, no other counter moved; afterwards every flow has a record naming that backend and the table grew by exactly one entry per run; clients from {clients}, only those on changed slots; the table emptied of earlier measurements' new flows before each one"
            )
        };
        let syn_u_proof = |clients: &str| {
            format!(
                "XDP_TX every run; every packet counted on its slot's backend (each backend's count grew by exactly the packets predicted for it, no other counter moved); afterwards no flow has a record and the table did not grow; clients from {clients}, only those on unchanged slots"
            )
        };
        let syn_c_proof = |clients: &str, full: bool| {
            format!(
                "XDP_TX every run; every packet counted on its slot's current backend, not the previous one (each backend's count grew by exactly the packets predicted for it, no other counter moved); afterwards every flow has a record naming that backend{}; clients from {clients}, only those on changed slots",
                if full {
                    ", in a table filled to capacity first: each insert took the place of its set's least recently seen flow"
                } else {
                    " and the table grew by exactly one entry per run; the table emptied of earlier measurements' new flows before each measurement"
                }
            )
        };
        for (v, vip, sid, family, clients, k) in [
            (v0, vip4, 0usize, "IPv4", "198.18.0.0/15", 0u64),
            (v1, vip6, 1, "IPv6", "2001:2::/48", 0),
        ] {
            paths.push(PathDef {
                key: if sid == 0 { "old4" } else { "old6" },
                name: format!(
                    "unrecorded non-SYN on a changed slot (to the previous backend, recorded), {family} TCP ACK from a fresh client, single runs, near-empty table"
                ),
                method: Method::Single,
                frames: fresh_frames(v, vip, fresh(k), true, ACK),
                action: XDP_TX,
                expect: Expect::Fresh {
                    sid,
                    go: Which::Old,
                    recorded: true,
                },
                keep: None,
                flows_per_packet: Some(1),
                table: Table::Emptied,
                proof: old_proof(clients),
            });
            paths.push(PathDef {
                key: if sid == 0 { "new4" } else { "new6" },
                name: format!(
                    "new flow on an unchanged slot (nothing written), {family} TCP SYN from a fresh client, single runs"
                ),
                method: Method::Single,
                frames: fresh_frames(v, vip, fresh(k + 1), false, SYN),
                action: XDP_TX,
                expect: Expect::Fresh {
                    sid,
                    go: Which::Current,
                    recorded: false,
                },
                keep: None,
                flows_per_packet: Some(0),
                table: Table::AsIs,
                proof: syn_u_proof(clients),
            });
            paths.push(PathDef {
                key: if sid == 0 { "newc4" } else { "newc6" },
                name: format!(
                    "new flow on a changed slot (recorded), {family} TCP SYN from a fresh client, single runs, near-empty table"
                ),
                method: Method::Single,
                frames: fresh_frames(v, vip, fresh(k + 2), true, SYN),
                action: XDP_TX,
                expect: Expect::Fresh {
                    sid,
                    go: Which::Current,
                    recorded: true,
                },
                keep: None,
                flows_per_packet: Some(1),
                table: Table::Emptied,
                proof: syn_c_proof(clients, false),
            });
        }
        paths.extend([
            PathDef {
                key: "tun4",
                name: "tunnel, IPv4-in-IPv4, UDP flow on an unchanged slot, single runs".into(),
                method: Method::Single,
                frames: fixed(tun4, Method::Single),
                action: XDP_TX,
                expect: Expect::Forwarded {
                    sid: 2,
                    backend: bt4,
                },
                keep: Some((tun4_key, Keep::Exactly(tun4_record))),
                flows_per_packet: Some(0),
                table: Table::AsIs,
                proof: format!(
                    "XDP_TX every run, the frame grows by the 20-byte outer header towards the backend (checked once); {}",
                    untouched(bt4)
                ),
            },
            PathDef {
                key: "tun6",
                name: "tunnel, IPv6-in-IPv6, UDP flow on an unchanged slot, single runs".into(),
                method: Method::Single,
                frames: fixed(tun6, Method::Single),
                action: XDP_TX,
                expect: Expect::Forwarded {
                    sid: 4,
                    backend: bt6,
                },
                keep: Some((tun6_key, Keep::Exactly(tun6_record))),
                flows_per_packet: Some(0),
                table: Table::AsIs,
                proof: format!(
                    "XDP_TX every run, the frame grows by the 40-byte outer header towards the backend (checked once); {}",
                    untouched(bt6)
                ),
            },
        ]);
        for (v, vip, sid, family, clients) in [
            (v0, vip4, 0usize, "IPv4", "198.18.0.0/15"),
            (v1, vip6, 1, "IPv6", "2001:2::/48"),
        ] {
            paths.push(PathDef {
                key: if sid == 0 { "newc4-full" } else { "newc6-full" },
                name: format!(
                    "new flow on a changed slot (recorded), {family} TCP SYN from a fresh client, single runs, full table"
                ),
                method: Method::Single,
                frames: fresh_frames(v, vip, fresh(3), true, SYN),
                action: XDP_TX,
                expect: Expect::Fresh {
                    sid,
                    go: Which::Current,
                    recorded: true,
                },
                keep: None,
                flows_per_packet: None,
                table: Table::Full,
                proof: syn_c_proof(clients, true),
            });
        }
        Ok(paths)
    }

    /// Gives service 0 a deny and an allow list of `n` prefixes each (none for 0), as lbd does
    /// (prefixes first, then the service's flags): the client of `path` (a fixed-frame IPv4
    /// path of service 0) is in one allow prefix (its /32) and in no deny prefix.
    fn set_lists(&mut self, path: &mut PathDef, n: usize) -> Result<()> {
        let client = match flow_of(&(path.frames)(1)[0])?.src {
            [a, 0, 0, 0] => Ipv4Addr::from(u32::from_be(a)),
            other => bail!("not an IPv4 client: {other:?}"),
        };
        let entry = |list: u8, addr: Ipv4Addr, len: u8| FilterEntry {
            data: FilterData {
                service: 0,
                list,
                _pad: [0; 3],
                addr: to_addr(addr.into()),
            },
            len,
        };
        let mut entries = vec![];
        if n > 0 {
            for (a, len) in spread_prefixes(0x0a00_0000, 24, n) {
                entries.push(entry(filter_list::DENY, a, len));
            }
            for (a, len) in spread_prefixes(0xac10_0000, 20, n - 1) {
                entries.push(entry(filter_list::ALLOW, a, len));
            }
            entries.push(entry(filter_list::ALLOW, client, 32));
        }
        self.dp.set_filters(entries.iter().copied())?;
        ensure!(
            self.dp.fill().filters.len() == entries.len(),
            "{} prefixes in FILTERS, {} written",
            self.dp.fill().filters.len(),
            entries.len()
        );
        let s = &dpfixture::services()[0];
        let key = ServiceKey {
            addr: to_addr(s.vip),
            port: s.port.to_be(),
            proto: s.proto,
            family: family(s.vip),
        };
        let mut value = self.values[0];
        if n > 0 {
            value.flags |= service_flags::HAS_ALLOW | service_flags::HAS_DENY;
        }
        self.dp.set_service_key(&key, &value)?;
        Ok(())
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
    /// counters and the connection table (and, with `stats`, with bpf_stats' run_cnt).
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
        // Fresh frames: each flow's key and the backend predicted for it.
        let mut predicted: Vec<(FlowKey, u32)> = vec![];
        if let Expect::Fresh { sid, go, .. } = path.expect {
            for f in &frames {
                let key = flow_of(f)?;
                let s = self.slot(sid, &key);
                let b = match go {
                    Which::Current => self.now[sid][s],
                    Which::Old => self.first[sid][s],
                };
                predicted.push((key, b));
            }
        }
        let recording = matches!(path.expect, Expect::Fresh { recorded: true, .. });
        // A set holds FLOW_WAYS flows: where more of this measurement's recorded flows share
        // one, the latest take the earlier ones' entries (with these many flows in a big
        // table, rarely any).
        let mut per_set: std::collections::HashMap<u32, u64> = Default::default();
        if recording {
            for (key, _) in &predicted {
                let set = self
                    .dp
                    .flow_set(key)
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
        self.check(&before, &after, path.expect, n, &predicted)?;
        if let (Some(per), Some(b)) = (path.flows_per_packet, flows_before) {
            let a = self.flows.count().0;
            let displaced = if per > 0 { displaced } else { 0 };
            let expected = b + per * n - displaced;
            ensure!(
                a == expected,
                "connection table: {b} flows before, {a} after {n} packets, expected {expected} ({displaced} displaced by new flows of their own set)",
            );
        }
        for (key, b) in &predicted {
            let found = self.dp.flow(key);
            if recording {
                let crowded =
                    self.dp.flow_set(key).and_then(|s| per_set.get(&s)).copied() > Some(ways);
                ensure!(
                    found.map(|v| v.backend) == Some(*b) || (found.is_none() && crowded),
                    "a new flow's record after its packet: {found:?}, expected one naming backend {b}: {key:?}"
                );
                if path.table == Table::Emptied {
                    self.inserted.push(*key);
                }
            } else {
                ensure!(
                    found.is_none(),
                    "a packet on an unchanged slot left a record: {found:?} for {key:?}"
                );
            }
        }
        if let Some((key, keep)) = &path.keep {
            match *keep {
                Keep::Exactly(record) => {
                    let now = self.dp.flow_entry(key);
                    ensure!(
                        now == Some(record),
                        "the flow's record was {record:?} before, {now:?} after: the path touched the connection table"
                    );
                }
                Keep::Names(b) => {
                    let now = self.dp.flow(key);
                    ensure!(
                        now.map(|v| v.backend) == Some(b),
                        "the flow's record names {now:?}, expected backend {b}"
                    );
                }
                Keep::Nothing => {
                    ensure!(
                        self.dp.flow(key).is_none(),
                        "the flow has a record: {:?}",
                        self.dp.flow(key)
                    );
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

    /// The counters after `n` packets against `expect`; `predicted`: each fresh flow's backend.
    fn check(
        &self,
        before: &Counts,
        after: &Counts,
        expect: Expect,
        n: u64,
        predicted: &[(FlowKey, u32)],
    ) -> Result<()> {
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
        let mut want: std::collections::BTreeMap<u32, u64> = Default::default();
        let sid = match expect {
            Expect::Untouched => None,
            Expect::Forwarded { sid, backend } => {
                want.insert(backend, n);
                Some(sid)
            }
            Expect::Fresh { sid, .. } => {
                ensure!(
                    predicted.len() as u64 == n,
                    "{} predictions for {n} packets",
                    predicted.len()
                );
                for (_, b) in predicted {
                    *want.entry(*b).or_default() += 1;
                }
                Some(sid)
            }
        };
        for (s, &d) in services.iter().enumerate() {
            let w = if Some(s) == sid { n } else { 0 };
            ensure!(
                d == w,
                "service {s} counted {d} packets, expected {w}: {services:?}"
            );
        }
        for (b, &d) in backends.iter().enumerate() {
            let w = want.get(&(b as u32)).copied().unwrap_or(0);
            ensure!(
                d == w,
                "backend {b} counted {d} packets, expected {w} (the backends predicted for the packets: {want:?}): {backends:?}"
            );
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
