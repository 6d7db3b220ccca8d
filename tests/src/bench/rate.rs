//! Benchmark part `rate`: packets per second through the data path, with a packet generator of
//! the project's own built on BPF_PROG_TEST_RUN live frames.
//!
//! Topology: two namespaces joined by one veth pair, `lbb<pid>g` (generator and sink, `g0`) and
//! `lbb<pid>l` (the balancer, `l0`). The generator is an XDP program of the tests' own
//! (`generator` in lb-ebpf/src/testgen.rs, loaded with aya) that is test-run (not attached) in
//! live-frames mode with `ingress_ifindex = g0`: every run writes the whole 60-byte frame (a
//! 64-byte frame on the wire with its FCS) from its template, set at load time — a page comes
//! back from the page pool with whatever the data path wrote into it, so nothing of the previous
//! run may survive — takes its client address (and for SYNs its source port) from a per-CPU
//! counter, fixes the checksums incrementally and returns XDP_TX, which sends the frame out of
//! g0 into l0. There the program under test runs (lb, or the MAC-swapping floor, or an XDP_PASS
//! program in front of the kernel's stack with nftables) and sends the packet back out of l0 to
//! g0, where the sink (an attached XDP program, which is also what makes a veth accept XDP_TX
//! frames) counts IPv4 TCP/UDP/IP-in-IP frames per CPU and per destination MAC, then drops them.
//!
//! One live-frames call costs a fixed ~24 ms, so every measurement is one long call, and the
//! rate is taken from the sink's counter sampled (from the other CPU) while the call runs, not
//! from the call's duration. The test-run thread is pinned to one CPU: on veth the whole path
//! (generator, l0's program or stack, g0's sink) then runs on that CPU, in its softirq.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;

use aya::programs::xdp::XdpLink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use lb_common::{
    Backend, FlowValue, ServiceKey, ServiceValue, backend_flags,
    maglev::{MaglevBackend, build_table},
    service_flags, source_slot,
};
use lb_userspace::{
    config::{DEFAULT_CONNTRACK_ENTRIES, XdpMode},
    datapath::{self, Datapath, SlotTimes},
    state::to_addr,
};

use super::{Figure, Opts, thousands};
use crate::bpf::TestProg;
use crate::dpfixture::flow_key;
use crate::netns::{in_netns, netns_path, run_checked, set_sysctls};
use crate::sys::{nice_thread, pin_thread};

const SECTION: &str = "packet rate";

const G0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x65];
const L0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x02];
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// l0's address in the balancer namespace (also the tunnel's outer source).
const L0_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const UDP_PORT: u16 = 53;
const TCP_PORT: u16 = 80;
/// The UDP clients' source port (the SYN walk varies its port instead).
const UDP_SPORT: u16 = 40_000;
/// The `nat` service's backend port (VIP:53 → backend:8053).
const NAT_PORT: u16 = 8053;
const SEED: [u64; 2] = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];
const TABLE: u32 = 65_537;
/// Connection-table capacity; "full" means this many flows are in it.
const CONNTRACK: u32 = 65_536;
/// Capacity of the table the "empty table" SYN figures start from: more than a call's SYNs.
const ROOMY: u32 = 1 << 22;
/// Established UDP flows of the `UdpEst` stream.
const EST_FLOWS: u32 = 1_000;
/// Addresses of the walk (198.18.0.0/16).
const WALK: u32 = 65_536;
/// Client counts of the many-clients walks (the headline: the last).
const CLIENTS: [u32; 3] = [1_024, 16_384, 65_536];
/// Client counts of part `nat` (the headline first; 1,024 to see what the NAT tables' size
/// costs).
const NAT_CLIENTS: [u32; 2] = [65_536, 1_024];
/// Frame length without FCS: a 64-byte frame on the wire.
const FRAME: usize = 60;
/// Sink slots: 0 counts every frame, 1 + (last two bytes of the destination MAC & 1023) each
/// destination (backend i has MAC 02:00:00:0b:i>>8:i&255).
const SINK_SLOTS: u32 = 1025;
/// Frames per live-frames batch (the kernel's default, NAPI's budget).
const BATCH: u32 = 64;
/// A timed run whose CPU spent more than this share of the call elsewhere (other processes,
/// idle, hypervisor steal; the ~20 ms the call takes to start and end count as idle) is repeated.
const MAX_ELSEWHERE: f64 = 0.09;
const XDP_TX: i32 = 3;

/// The traffic a generator program makes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Stream {
    /// UDP from the 1,000 established flows, round robin.
    UdpEst,
    /// UDP from 65,536 client addresses in turn (each a flow of a full table).
    UdpWalk,
    /// TCP SYNs, every one a new connection: 65,536 addresses, then the next source port.
    Syn,
    /// UDP from this many client addresses in turn (at most 65,536): established once the
    /// first walk recorded them.
    UdpClients(u32),
    /// TCP SYNs from this many client addresses in turn (at most 65,536), then the next source
    /// port: every one a new connection.
    SynClients(u32),
    /// UDP replies of the NAT flows of this many clients (at most 65,536): from backend 0's
    /// address and `NAT_PORT` to each client address (198.18.0.0 + w, the destination) and
    /// `UDP_SPORT`.
    NatReplies(u32),
}

impl Stream {
    fn label(self) -> String {
        match self {
            Stream::UdpEst => "UDP established (1,000 flows)".into(),
            Stream::UdpWalk => "UDP, 65,536-address walk (as many flows as entries)".into(),
            Stream::Syn => "TCP SYN (every one a new connection, 65,536-address walk)".into(),
            Stream::UdpClients(n) => format!("UDP established, {} clients", thousands(n as u64)),
            Stream::SynClients(n) => format!(
                "TCP SYN, {} clients (every one a new connection)",
                thousands(n as u64)
            ),
            Stream::NatReplies(n) => format!(
                "UDP replies (backend:{NAT_PORT} → client), {} clients",
                thousands(n as u64)
            ),
        }
    }

    /// The flows (addresses) the generator cycles through.
    fn flows(self) -> u32 {
        match self {
            Stream::UdpEst => EST_FLOWS,
            Stream::UdpWalk | Stream::Syn => WALK,
            Stream::UdpClients(n) | Stream::SynClients(n) | Stream::NatReplies(n) => n,
        }
    }

    fn syn(self) -> bool {
        matches!(self, Stream::Syn | Stream::SynClients(_))
    }

    /// Offset of the variable address bytes: the destination's for replies, else the source's.
    fn addr_at(self) -> usize {
        if self.reply() { 30 } else { 26 }
    }

    fn reply(self) -> bool {
        matches!(self, Stream::NatReplies(_))
    }
}

/// The client address of walk index (or established flow) `w`: the generator stores `w` as a
/// little-endian u16 over the last two bytes of 198.18.0.0.
fn client(w: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, (w & 0xff) as u8, (w >> 8 & 0xff) as u8)
}

/// Backend `i` of lb: its address in maps (198.19.0.0/16, the benchmarking block's second half;
/// the clients use only the first, and with `dsr` it never appears in a packet) and its MAC.
fn backend_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (i >> 8) as u8, (i & 0xff) as u8)
}

fn backend_mac(i: u32) -> [u8; 6] {
    [0x02, 0, 0, 0x0b, (i >> 8) as u8, (i & 0xff) as u8]
}

// ---- frames and programs -------------------------------------------------------------------

/// One's-complement sum of little-endian 16-bit words, folded to 16 bits (not complemented).
/// The generator adds its variable fields as little-endian words too: the sum is byte-order
/// independent (RFC 1071), so the result stored little-endian is the right checksum.
fn sum_le(bytes: &[u8]) -> u32 {
    let mut s: u32 = bytes
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s
}

/// The template frame of a stream, with the variable fields (the client address's last two
/// bytes, the TCP source port, the checksums) zero, and the checksum bases: the folded sums of
/// the IP header and of the TCP pseudo-header and header without the variable fields.
fn template(stream: Stream) -> ([u8; FRAME], u32, u32) {
    let mut f = [0u8; FRAME];
    f[0..6].copy_from_slice(&L0_MAC);
    f[6..12].copy_from_slice(&G0_MAC);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let tcp = stream.syn();
    let ip_len: u16 = if tcp { 40 } else { 46 };
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
    ip[8] = 64;
    ip[9] = if tcp { 6 } else { 17 };
    if stream.reply() {
        ip[12..16].copy_from_slice(&backend_addr(0).octets());
        ip[16..20].copy_from_slice(&[198, 18, 0, 0]);
    } else {
        ip[12..16].copy_from_slice(&[198, 18, 0, 0]);
        ip[16..20].copy_from_slice(&VIP.octets());
    }
    let ip_base = sum_le(&f[14..34]);
    let mut l4_base = 0;
    if tcp {
        let t = &mut f[34..54];
        t[2..4].copy_from_slice(&TCP_PORT.to_be_bytes());
        t[4..8].copy_from_slice(&1u32.to_be_bytes()); // seq
        t[12] = 0x50; // data offset 5
        t[13] = 0x02; // SYN
        t[14..16].copy_from_slice(&64_240u16.to_be_bytes());
        let mut pseudo = vec![];
        pseudo.extend_from_slice(&f[26..34]); // source (last two bytes zero) and destination
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&f[34..54]);
        l4_base = sum_le(&pseudo);
    } else {
        let u = &mut f[34..42];
        let (sport, dport) = if stream.reply() {
            (NAT_PORT, UDP_SPORT)
        } else {
            (UDP_SPORT, UDP_PORT)
        };
        u[0..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&dport.to_be_bytes());
        u[4..6].copy_from_slice(&26u16.to_be_bytes());
        // Checksum 0: none (valid for UDP over IPv4).
    }
    (f, ip_base, l4_base)
}

/// The frame generator `stream` must make for counter value `n`.
fn check_frame(stream: Stream, n: u64, f: &[u8]) -> Result<()> {
    if f.len() != FRAME {
        bail!("{} bytes, not {FRAME}", f.len());
    }
    let flows = stream.flows() as u64;
    let w = (n % flows) as u32;
    let mut want = template(stream).0;
    let at = stream.addr_at();
    want[at..at + 4].copy_from_slice(&client(w).octets());
    let sport = 1024 + ((n / flows) & 0x7fff) as u16;
    if stream.syn() {
        // The generator stores the port as a little-endian word: its value on the wire is the
        // byte-swapped number, different for every walk.
        want[34..36].copy_from_slice(&sport.to_le_bytes());
    }
    let mut got = f.to_vec();
    got[24..26].fill(0);
    if stream.syn() {
        got[50..52].fill(0);
    }
    if got != want {
        bail!("frame {got:02x?}, expected {want:02x?}");
    }
    // Lengths and checksums, checked with etherparse.
    crate::packet::verify(f).map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Loads the generator of `stream` (lb-ebpf/src/testgen.rs): it writes the whole frame of
/// `stream` from its template, then the variable fields from its per-CPU counter `n` (slot 0
/// of its `SENT`, incremented: it counts the frames sent).
fn generator(stream: Stream) -> Result<TestProg> {
    let (frame, ip_base, l4_base) = template(stream);
    let mut whole = [0u8; 64];
    whole[..FRAME].copy_from_slice(&frame);
    // The program walks 65,536 addresses (the counter's low 16 bits) unless told a flow count.
    const _: () = assert!(WALK == 1 << 16);
    let flows = stream.flows();
    if flows == 0 || flows > WALK {
        bail!("{stream:?}: 1 to {WALK} flows, not {flows}");
    }
    let flows: u32 = if flows == WALK { 0 } else { flows };
    let syn = u32::from(stream.syn());
    let dst = u32::from(stream.reply());
    TestProg::load(
        "generator",
        &[
            ("GEN_FRAME", &whole),
            ("GEN_IP_BASE", &ip_base.to_ne_bytes()),
            ("GEN_L4_BASE", &l4_base.to_ne_bytes()),
            ("GEN_FLOWS", &flows.to_ne_bytes()),
            ("GEN_SYN", &syn.to_ne_bytes()),
            ("GEN_DST", &dst.to_ne_bytes()),
        ],
    )
    .with_context(|| format!("loading the generator of {stream:?}"))
}

// ---- the rig: namespaces, veth, sink, generators --------------------------------------------

/// Runs `ip ARGS`.
fn ip(args: &[&str]) -> Result<()> {
    run_checked(Command::new("ip").args(args), None).map(|_| ())
}

/// Removes namespaces and pin folders of earlier runs of this part whose process is gone.
fn reap_stale() {
    let dead = |pid: &str| {
        pid.parse::<u32>()
            .is_ok_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists())
    };
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for name in rd.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
            if let Some(rest) = name.strip_prefix("lbb")
                && let Some(pid) = rest.strip_suffix(['g', 'l'])
                && dead(pid)
            {
                let _ = ip(&["netns", "del", &name]);
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf") {
        for name in rd.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
            if let Some(rest) = name.strip_prefix("lbt-bench-rate-")
                && let Some((pid, _)) = rest.split_once('-')
                && dead(pid)
            {
                let _ = datapath::cleanup(&Path::new("/sys/fs/bpf").join(&name));
            }
        }
    }
}

/// Everything the part creates; dropping it removes it all (links, pins, namespaces).
struct Rig {
    g: String,
    l: String,
    g0: u32,
    l0: u32,
    /// The sink (lb-ebpf/src/testgen.rs): counts IPv4 TCP, UDP and IP-in-IP frames in its
    /// `SINK` (slot 0, and the slot of the destination MAC), drops everything.
    sink: TestProg,
    /// The generators, each with its own counter of frames sent (`SENT`).
    gens: BTreeMap<Stream, TestProg>,
    /// The sink's link on g0 (dropping it detaches).
    sink_link: Option<XdpLink>,
    /// Pin folders of lb data paths made so far.
    pins: Vec<PathBuf>,
    gen_cpu: usize,
    sample_cpu: usize,
    namespaces: Vec<String>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.sink_link.take();
        for dir in &self.pins {
            if let Err(e) = datapath::cleanup(dir) {
                eprintln!("bench rate: removing {}: {e}", dir.display());
            }
        }
        for ns in &self.namespaces {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("bench rate: {e:#}");
            }
        }
    }
}

impl Rig {
    fn new() -> Result<Rig> {
        let pid = std::process::id();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut rig = Rig {
            g: format!("lbb{pid}g"),
            l: format!("lbb{pid}l"),
            g0: 0,
            l0: 0,
            sink: TestProg::load("sink", &[]).context("loading the sink")?,
            gens: BTreeMap::new(),
            sink_link: None,
            pins: vec![],
            gen_cpu: cpus - 1,
            sample_cpu: 0,
            namespaces: vec![],
        };
        for ns in [rig.g.clone(), rig.l.clone()] {
            ip(&["netns", "add", &ns])?;
            rig.namespaces.push(ns.clone());
            set_sysctls(
                &ns,
                &[
                    ("net.ipv6.conf.all.disable_ipv6".into(), "1".into()),
                    ("net.ipv6.conf.default.disable_ipv6".into(), "1".into()),
                ],
                true,
            )?;
        }
        let (g, l) = (rig.g.clone(), rig.l.clone());
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        ip(&[
            "-n",
            &g,
            "link",
            "add",
            "g0",
            "address",
            &mac(G0_MAC),
            "numtxqueues",
            "2",
            "numrxqueues",
            "2",
            "type",
            "veth",
            "peer",
            "name",
            "l0",
            "address",
            &mac(L0_MAC),
            "numtxqueues",
            "2",
            "numrxqueues",
            "2",
            "netns",
            &l,
        ])?;
        ip(&["-n", &g, "link", "set", "g0", "up"])?;
        ip(&["-n", &l, "link", "set", "lo", "up"])?;
        ip(&["-n", &l, "link", "set", "l0", "up"])?;
        ip(&[
            "-n",
            &l,
            "addr",
            "add",
            &format!("{L0_ADDR}/24"),
            "dev",
            "l0",
        ])?;
        // The balancer namespace's stack, for nftables: forwards, never sends redirects (the
        // packets leave by the interface they came in on), no reverse-path filter.
        let mut sysctls = vec![("net.ipv4.ip_forward".to_string(), "1".to_string())];
        for dev in ["all", "default", "l0"] {
            sysctls.push((format!("net.ipv4.conf.{dev}.rp_filter"), "0".into()));
            sysctls.push((format!("net.ipv4.conf.{dev}.send_redirects"), "0".into()));
        }
        set_sysctls(&l, &sysctls, false)?;
        rig.g0 = in_netns(&g, || Ok(crate::sys::if_nametoindex("g0")?))?;
        rig.l0 = in_netns(&l, || Ok(crate::sys::if_nametoindex("l0")?))?;
        let slots = rig.sink.slots("SINK")?;
        if slots != SINK_SLOTS {
            bail!("the sink has {slots} slots, this part counts on {SINK_SLOTS}");
        }
        let g0 = rig.g0;
        let sink = &mut rig.sink;
        let link = in_netns(&g, || sink.attach(g0).context("attaching the sink to g0"))?;
        rig.sink_link = Some(link);
        let mut streams = vec![Stream::UdpEst, Stream::UdpWalk, Stream::Syn];
        for n in CLIENTS {
            streams.extend([Stream::UdpClients(n), Stream::SynClients(n)]);
        }
        streams.extend(NAT_CLIENTS.map(Stream::NatReplies));
        for s in streams {
            rig.gens.insert(s, generator(s)?);
        }
        Ok(rig)
    }

    /// Checks the generators' frames: each of them run once (not live) on the calling thread's
    /// CPU, `cpu`, with chosen counter values; the frame must be the template with the flow's
    /// address (and port) and correct checksums. The counter is restored afterwards.
    fn check_generators(&mut self, cpu: usize) -> Result<()> {
        for (&stream, prog) in &mut self.gens {
            let saved = prog.per_cpu("SENT", 0)?;
            let result = (|| -> Result<()> {
                for n in [
                    0u64,
                    1,
                    999,
                    1_000,
                    0xffff,
                    0x1_0000,
                    0x1234_5678,
                    0x7fff_ffff,
                ] {
                    let mut v = saved.clone();
                    v[cpu] = n;
                    prog.set_per_cpu("SENT", 0, &v)?;
                    let (action, frame) = prog.test_run_once(&[0xaa; FRAME])?;
                    if action != XDP_TX as u32 {
                        bail!("generator {stream:?} returned {action}, not XDP_TX");
                    }
                    check_frame(stream, n, &frame)
                        .with_context(|| format!("generator {stream:?}, counter {n}"))?;
                }
                Ok(())
            })();
            prog.set_per_cpu("SENT", 0, &saved)?;
            result?;
        }
        Ok(())
    }

    /// Attaches program `name` of the tests' XDP object (`floor` or `pass`) to l0; detached
    /// when the returned link is dropped.
    fn attach_l0(&self, name: &'static str) -> Result<XdpLink> {
        Ok(self.attach_prog_l0(TestProg::load(name, &[])?)?.0)
    }

    /// Attaches `prog` to l0: its link (dropping it detaches) and the program's id.
    fn attach_prog_l0(&self, mut prog: TestProg) -> Result<(XdpLink, u32)> {
        let l0 = self.l0;
        // A link removed just before may still be going away (EBUSY meanwhile).
        let link = crate::retry_until(Duration::from_secs(5), "attaching to l0", || {
            in_netns(&self.l, || prog.attach(l0))
        })?;
        Ok((link, prog.id()?))
    }

    /// One more call of `stream`, sized for `mpps`, with kernel.bpf_stats_enabled on (the old
    /// value restored after): program `id`'s run_time_ns / run_cnt over the call, its run count,
    /// and the rate of this call (the accounting's clock reads included).
    fn live_cost(&self, stream: Stream, window: Window, mpps: f64, id: u32) -> Result<LiveCost> {
        let _on = super::cost::StatsOn::enable()?;
        let before = super::cost::run_stats(id)?;
        let repeat = (mpps.max(0.1) * 1e6 * (window.warmup + window.length) * 1.25 + 20_000.0)
            .min(4e9) as u32;
        let run = self.measure(stream, window, repeat, 0)?;
        let after = super::cost::run_stats(id)?;
        let runs = after.1 - before.1;
        if runs == 0 {
            bail!("bpf_stats: program {id} did not run during the call of {stream:?}");
        }
        Ok(LiveCost {
            ns: (after.0 - before.0) as f64 / runs as f64,
            runs,
            mpps: run.mpps,
        })
    }

    /// One live-frames call of `repeat` frames of `stream` from each CPU of `cpus` at once
    /// (a thread pinned to each): frames delivered to the sink per second (Mpps) from the
    /// threads' start to the last call's end (each call's fixed ~24 ms included).
    fn measure_cpus(&self, stream: Stream, cpus: &[usize], repeat: u32) -> Result<f64> {
        let (frame, _, _) = template(stream);
        let prog = &self.gens[&stream];
        let got0 = self.sink.sum("SINK", 0)?;
        let start = Instant::now();
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let threads: Vec<_> = cpus
                .iter()
                .map(|&cpu| {
                    s.spawn(move || -> Result<()> {
                        let ns = File::open(netns_path(&self.g))
                            .context("opening the generator namespace")?;
                        crate::sys::setns_net(ns.as_fd())
                            .context("entering the generator namespace")?;
                        pin_thread(cpu)?;
                        nice_thread(-20)?;
                        prog.test_run_live(&frame, self.g0, repeat, BATCH)
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .map_err(|_| anyhow!("a generator thread panicked"))?
                })
                .collect()
        });
        let secs = start.elapsed().as_secs_f64();
        for r in results {
            r?;
        }
        // Whatever is still in flight lands within the call; give stragglers a moment anyway.
        std::thread::sleep(Duration::from_millis(10));
        let got = self.sink.sum("SINK", 0)? - got0;
        Ok(got as f64 / secs / 1e6)
    }

    /// One live-frames call of `repeat` frames of `stream`, sampled from the other CPU.
    fn measure(&self, stream: Stream, window: Window, repeat: u32, slots: u32) -> Result<Run> {
        Ok(self.measure_with(stream, window, repeat, slots, None)?.0)
    }

    /// `measure`, and with `change` = (seconds, action): the sampling thread runs the action
    /// that long after the first frame arrived. Also returns the sink's samples (time, total)
    /// and when the action had ended.
    fn measure_with(
        &self,
        stream: Stream,
        window: Window,
        repeat: u32,
        slots: u32,
        mut change: Option<(f64, &mut (dyn FnMut() -> Result<()> + Send))>,
    ) -> Result<(Run, Samples, Option<Instant>)> {
        let (frame, _, _) = template(stream);
        let prog = &self.gens[&stream];
        let sent0 = prog.sum("SENT", 0)?;
        let cpu0 = self.sink.per_cpu("SINK", 0)?;
        let got0: u64 = cpu0.iter().sum();
        let slots0: Vec<u64> = (1..=slots)
            .map(|s| self.sink.sum("SINK", s))
            .collect::<Result<_>>()?;
        let cpu_before = cpu_times(self.gen_cpu)?;
        let done = AtomicBool::new(false);
        let ns = File::open(netns_path(&self.g)).context("opening the generator namespace")?;
        let period = Duration::from_micros(200);
        let (gen_result, samples) = std::thread::scope(|s| {
            let generator = s.spawn(|| {
                let r = (|| {
                    crate::sys::setns_net(ns.as_fd())
                        .context("entering the generator namespace")?;
                    pin_thread(self.gen_cpu)?;
                    nice_thread(-20)?;
                    prog.test_run_live(&frame, self.g0, repeat, BATCH)
                })();
                done.store(true, Ordering::SeqCst);
                r
            });
            let change = &mut change;
            let sampler = s.spawn(|| -> Result<(Samples, Option<Instant>)> {
                pin_thread(self.sample_cpu)?;
                nice_thread(-20)?;
                let mut v = Vec::with_capacity(1 << 16);
                let mut first: Option<Instant> = None;
                let mut changed = None;
                loop {
                    let finished = done.load(Ordering::SeqCst);
                    let before = Instant::now();
                    let count = self.sink.sum("SINK", 0)?;
                    let took = before.elapsed();
                    // A sample whose read was held up (preempted) has no precise time: skipped.
                    if took < Duration::from_micros(50) {
                        v.push((before + took / 2, count));
                    }
                    if finished {
                        // The last one, precise or not: it tells when the traffic had ended.
                        if took >= Duration::from_micros(50) {
                            v.push((before + took / 2, count));
                        }
                        return Ok((v, changed));
                    }
                    if first.is_none() && count > got0 {
                        first = Some(before);
                    }
                    if let (Some(t0), Some((after, action)), None) =
                        (first, change.as_mut(), changed)
                        && before >= t0 + Duration::from_secs_f64(*after)
                    {
                        action()?;
                        changed = Some(Instant::now());
                    }
                    std::thread::sleep(period);
                }
            });
            (
                generator
                    .join()
                    .map_err(|_| anyhow!("the generator thread panicked")),
                sampler
                    .join()
                    .map_err(|_| anyhow!("the sampler thread panicked")),
            )
        });
        gen_result??;
        let (samples, changed) = samples??;
        let cpu_after = cpu_times(self.gen_cpu)?;
        // Whatever is still in flight lands within the call; give stragglers a moment anyway.
        std::thread::sleep(Duration::from_millis(10));
        let sent = prog.sum("SENT", 0)? - sent0;
        let cpu1 = self.sink.per_cpu("SINK", 0)?;
        let delivered: u64 = cpu1.iter().sum::<u64>() - got0;
        let on_cpu = cpu1[self.gen_cpu] - cpu0[self.gen_cpu];
        let per_slot = (1..=slots)
            .map(|s| Ok(self.sink.sum("SINK", s)? - slots0[s as usize - 1]))
            .collect::<Result<Vec<u64>>>()?;
        // No usable window (the call ended too early): a run of zero length, which `series`
        // repeats with a longer call.
        let (pps, secs) = window.rate(&samples, got0).unwrap_or((0.0, 0.0));
        if std::env::var_os("LB_BENCH_DEBUG").is_some() {
            let t0 = samples[0].0;
            let first = samples.iter().find(|s| s.1 > got0).map(|s| s.0 - t0);
            let last = samples.last().map_or(0, |s| s.1);
            let stop = samples.iter().find(|s| s.1 == last).map(|s| s.0 - t0);
            eprintln!(
                "rate: {stream:?} repeat {repeat}: {:.3} Mpps over {secs:.3} s, sent {sent}, delivered {delivered}, {} samples, traffic {first:?}..{stop:?}, call {:?}, elsewhere {:.1}%",
                pps / 1e6,
                samples.len(),
                samples.last().map(|s| s.0 - t0),
                cpu_times(self.gen_cpu)?.elsewhere_since(&cpu_before) * 100.0
            );
        }
        let run = Run {
            mpps: pps / 1e6,
            sent,
            delivered,
            window: secs,
            on_gen_cpu: if delivered == 0 {
                0.0
            } else {
                on_cpu as f64 / delivered as f64
            },
            per_slot,
            elsewhere: cpu_after.elsewhere_since(&cpu_before),
        };
        Ok((run, samples, changed))
    }

    /// `reps` measurements of `stream` over `window`, each after `before`; a time window gets
    /// a calibration call first, which sizes the calls so that each covers warm-up and window.
    fn series(
        &self,
        stream: Stream,
        window: Window,
        reps: usize,
        slots: u32,
        mut before: impl FnMut() -> Result<()>,
    ) -> Result<Vec<Run>> {
        let Window { warmup, length } = window;
        let mut runs = vec![];
        before()?;
        let cal = self.measure(
            stream,
            Window {
                warmup: 0.005,
                length: f64::INFINITY,
            },
            200_000,
            slots,
        )?;
        let mut pps = cal.mpps * 1e6;
        for _ in 0..reps {
            let (mut short, mut contended) = (0, 0);
            loop {
                before()?;
                pps = pps.max(100_000.0);
                let repeat = (pps * (warmup + length) * 1.25 + 20_000.0).min(4e9) as u32;
                let run = self.measure(stream, window, repeat, slots)?;
                if run.window < 0.9 * length {
                    // The call ended early: the rate was above the estimate.
                    short += 1;
                    if short > 4 {
                        bail!(
                            "the call ended before its window ({:.3} s of {length} s)",
                            run.window
                        );
                    }
                    pps = (pps * 2.0).max(run.mpps * 1e6 * 1.5);
                    continue;
                }
                pps = run.mpps * 1e6;
                // A call that shared its CPU with other work is repeated (a few times).
                if run.elsewhere > MAX_ELSEWHERE && contended < 3 {
                    contended += 1;
                    continue;
                }
                runs.push(run);
                break;
            }
        }
        Ok(runs)
    }
}

/// How the rate is read from the sink's samples: over `length` seconds, starting `warmup`
/// seconds after the first frame arrived, and before the traffic ended.
#[derive(Clone, Copy)]
struct Window {
    warmup: f64,
    length: f64,
}

impl Window {
    /// Packets per second and the window's length, from (time, counter) samples.
    fn rate(&self, samples: &[(Instant, u64)], base: u64) -> Option<(f64, f64)> {
        let first = samples.iter().find(|s| s.1 > base)?.0;
        let last = samples.last()?.1;
        // The first sample that saw the final count: the traffic had ended by then.
        let stop = samples.iter().position(|s| s.1 == last)?;
        let during = &samples[..stop];
        let start_at = first + Duration::from_secs_f64(self.warmup);
        let a = *during.iter().find(|s| s.0 >= start_at)?;
        let end_at = a.0 + Duration::from_secs_f64(self.length.min(1e6));
        let b = *during.iter().rev().find(|s| s.0 <= end_at)?;
        let secs = b.0.duration_since(a.0).as_secs_f64();
        (secs > 0.0 && b.1 > a.1).then(|| ((b.1 - a.1) as f64 / secs, secs))
    }
}

/// The sink's total at times during a call.
type Samples = Vec<(Instant, u64)>;

/// A program's own time per run during live frames (bpf_stats).
struct LiveCost {
    ns: f64,
    runs: u64,
    /// The rate during that call (with the accounting on).
    mpps: f64,
}

/// One measurement.
struct Run {
    mpps: f64,
    sent: u64,
    delivered: u64,
    window: f64,
    /// Share of the delivered frames counted on the generator's CPU.
    on_gen_cpu: f64,
    /// Frames per sink slot 1..=slots (destination MACs of backends 0..slots).
    per_slot: Vec<u64>,
    /// Share of the generator CPU's time during the call that went to anything but this
    /// benchmark's kernel work (user time of any process, idle, steal by the hypervisor).
    elsewhere: f64,
}

/// A CPU's times from /proc/stat (USER_HZ ticks).
struct CpuTimes {
    elsewhere: u64,
    total: u64,
}

impl CpuTimes {
    fn elsewhere_since(&self, before: &CpuTimes) -> f64 {
        let total = self.total.saturating_sub(before.total);
        if total == 0 {
            return 0.0;
        }
        self.elsewhere.saturating_sub(before.elsewhere) as f64 / total as f64
    }
}

fn cpu_times(cpu: usize) -> Result<CpuTimes> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let prefix = format!("cpu{cpu} ");
    let line = stat
        .lines()
        .find(|l| l.starts_with(&prefix))
        .ok_or_else(|| anyhow!("no {prefix}line in /proc/stat"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal: ours are system and softirq.
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Ok(CpuTimes {
        elsewhere: at(0) + at(1) + at(3) + at(4) + at(7),
        total: v.iter().sum(),
    })
}

// ---- lb ---------------------------------------------------------------------------------------

/// The Maglev table of backends 0..n, equal weights.
fn maglev(n: u32) -> Vec<u32> {
    let live: Vec<MaglevBackend> = (0..n)
        .map(|i| MaglevBackend {
            id: i,
            addr: to_addr(IpAddr::V4(backend_addr(i))),
            salt: 0,
            weight: 100,
        })
        .collect();
    build_table(&SEED, &live, TABLE)
}

/// lb's program loaded by lbd's datapath code into a pin folder of the rig, with one service
/// and `n` backends, attached to l0.
struct Lb {
    dp: Datapath,
    dir: PathBuf,
    /// The Maglev table `service` installs (backends 0..n).
    table: Vec<u32>,
    /// Backends configured (0..n).
    n: u32,
    flags: u32,
}

impl Lb {
    fn new(rig: &mut Rig, n: u32, tunnel: bool, capacity: u32) -> Result<Lb> {
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/lbt-bench-rate-{}-{}",
            std::process::id(),
            rig.pins.len()
        ));
        rig.pins.push(dir.clone());
        let mut dp = Datapath::open(&dir, capacity, &[])?;
        dp.set_config(SEED)?;
        for i in 0..n {
            let addr = to_addr(IpAddr::V4(backend_addr(i)));
            let b = Backend {
                addr,
                tunnel_src: to_addr(IpAddr::V4(L0_ADDR)),
                mac: backend_mac(i),
                port: 0,
                src_mac: L0_MAC,
                ifindex: rig.l0,
                service: 0,
                family: 4,
                flags: backend_flags::VALID,
                mtu: 1500,
                ..Default::default()
            };
            dp.set_backend(i, &b)?;
        }
        let table = maglev(n);
        let l0 = rig.l0;
        let l = rig.l.clone();
        crate::retry_until(Duration::from_secs(5), "attaching lb to l0", || {
            in_netns(&l, || {
                dp.attach("l0", l0, XdpMode::Native)
                    .map_err(|e| anyhow!("attaching lb to l0: {e}"))
            })
        })?;
        Ok(Lb {
            dp,
            dir,
            table,
            n,
            flags: if tunnel { service_flags::TUNNEL } else { 0 },
        })
    }

    /// Makes the service a `nat` one: every backend on `NAT_PORT`, their addresses in
    /// `NAT_FILTER` (the reply path's pre-filter). `service` or `steady` then installs it.
    fn make_nat(&mut self) -> Result<()> {
        let mut addrs = vec![];
        for i in 0..self.n {
            let mut b = self.dp.backend(i)?;
            b.port = NAT_PORT.to_be();
            self.dp.set_backend(i, &b)?;
            addrs.push(b.addr);
        }
        self.dp.set_nat_filter(&addrs)?;
        self.flags = service_flags::NAT;
        Ok(())
    }

    fn key(proto: u8) -> ServiceKey {
        ServiceKey {
            addr: to_addr(IpAddr::V4(VIP)),
            port: if proto == 6 { TCP_PORT } else { UDP_PORT }.to_be(),
            proto,
            family: 4,
        }
    }

    /// Makes the one service the `proto` one (the other protocol's key is removed).
    fn service(&mut self, proto: u8) -> Result<()> {
        let other = Lb::key(if proto == 6 { 17 } else { 6 });
        if self.dp.service_keys().iter().any(|(k, _)| *k == other) {
            self.dp.remove_service(&other)?;
        }
        let value = ServiceValue {
            id: 0,
            flags: self.flags,
            table_size: TABLE,
            _pad: 0,
        };
        let table = self.table.clone();
        self.dp.set_service(&Lb::key(proto), &value, &table)?;
        Ok(())
    }

    fn clear(&mut self) -> Result<()> {
        Ok(self.dp.clear_flows()?)
    }

    /// Back to the steady state: the connection table emptied, then lbd's clearing (two scans,
    /// `QUIET_SCANS`) with every hold at zero, so that every slot is unchanged again (checked).
    fn settle(&mut self) -> Result<()> {
        self.clear()?;
        let zero = Duration::ZERO;
        let times = SlotTimes {
            udp_idle: zero,
            close_grace: zero,
            udp_adopt: zero,
            idle_hold: zero,
        };
        for _ in 0..lb_common::slotstate::QUIET_SCANS {
            self.dp.scan_slots(&times)?;
        }
        let state = self
            .dp
            .slot_state(0)
            .context("service 0 has no slot state")?;
        ensure!(
            state.changed() == 0,
            "{} slots still changed after clearing",
            state.changed()
        );
        Ok(())
    }

    /// The one service the `proto` one, its table `self.table`, every slot unchanged and the
    /// connection table empty: the steady state, where no packet touches the connection table.
    fn steady(&mut self, proto: u8) -> Result<()> {
        self.service(proto)?;
        self.settle()?;
        let current = self.dp.slot_state(0).map(|s| s.current());
        ensure!(
            current.as_deref() == Some(&self.table[..]),
            "service 0's table is not the one installed"
        );
        Ok(())
    }

    /// Right after a change that moved every slot: the table in which each slot has the next
    /// backend (b → b + 1 mod n) swapped in as lbd applies a change, so that every slot is
    /// changed, its backend before the change its `old` (with `ADOPT_UDP`): every packet then
    /// takes the changed-slot path (reads its flow's set), which is what every packet cost
    /// before issue 12. From the steady state; checked in the slot state.
    fn change_every_slot(&mut self) -> Result<()> {
        let n = self.n;
        let moved: Vec<u32> = self.table.iter().map(|&b| (b + 1) % n).collect();
        self.dp.swap_table(0, &moved)?;
        let state = self
            .dp
            .slot_state(0)
            .context("service 0 has no slot state")?;
        ensure!(
            state.changed() == self.table.len()
                && state
                    .side
                    .iter()
                    .zip(&self.table)
                    .all(|(side, &b)| side.old() == b && side.adopt_udp()),
            "after the change {} of {} slots changed, or an `old` is not the backend before",
            state.changed(),
            self.table.len()
        );
        Ok(())
    }

    /// The UDP flows of clients 0..`flows` whose slot has another backend in `after` than in
    /// `before`, by what the connection table holds for each: (records naming the backend of
    /// `before`, records naming another, no record); and how many clients of the other slots
    /// have a record (none should: nothing writes one on an unchanged slot).
    fn udp_records(&self, flows: u32, before: &[u32], after: &[u32]) -> ((u32, u32, u32), u32) {
        let (mut kept, mut other, mut none, mut stray) = (0, 0, 0, 0);
        for w in 0..flows {
            let src = to_addr(IpAddr::V4(client(w)));
            let key = flow_key(client(w).into(), VIP.into(), UDP_SPORT, UDP_PORT, 17);
            let s = source_slot(&SEED, TABLE, &src).unwrap() as usize;
            let found = self.dp.flow(&key);
            if before[s] == after[s] {
                stray += u32::from(found.is_some());
                continue;
            }
            match found {
                Some(v) if v.backend == before[s] => kept += 1,
                Some(_) => other += 1,
                None => none += 1,
            }
        }
        ((kept, other, none), stray)
    }

    /// Detaches the program (its link is pinned) and removes its maps.
    fn remove(self) -> Result<()> {
        let dir = self.dir.clone();
        drop(self);
        datapath::cleanup(&dir).map_err(|e| anyhow!("removing {}: {e}", dir.display()))?;
        Ok(())
    }

    /// Fills every entry of the connection table (made-up flows): each new flow then takes the
    /// place of another.
    fn fill_all(&mut self) -> Result<()> {
        Ok(self.dp.fill_flows(FlowValue {
            backend: 0,
            service: 0,
        })?)
    }

    fn flows(&self) -> usize {
        self.dp
            .flow_count()
            .map(|(used, _)| used as usize)
            .unwrap_or(0)
    }
}

// ---- the part -------------------------------------------------------------------------------

/// One reported configuration and its runs.
struct Series {
    name: String,
    runs: Vec<Run>,
    extra: String,
}

impl Series {
    fn median(&self) -> f64 {
        Figure::from_samples("", "", "", self.runs.iter().map(|r| r.mpps).collect(), "").median
    }

    /// Its figure (Mpps) in `section`: `note`, then the series' own remarks.
    fn figure(&self, section: &str, mut note: String) -> Figure {
        if !self.extra.is_empty() {
            note.push_str("; ");
            note.push_str(&self.extra);
        }
        Figure::from_samples(
            section,
            &self.name,
            "Mpps",
            self.runs.iter().map(|r| r.mpps).collect(),
            &note,
        )
    }

    fn sent(&self) -> u64 {
        self.runs.iter().map(|r| r.sent).sum()
    }

    fn lost(&self) -> u64 {
        self.runs
            .iter()
            .map(|r| r.sent.saturating_sub(r.delivered))
            .sum()
    }
}

/// What both rate parts start with: the rig, checked, this thread pinned to the sampling CPU
/// (it fills and empties maps between calls: on the other CPU than the data path's, so it does
/// not evict the data path's caches), repetitions and window.
fn start(opts: &Opts) -> Result<(Rig, crate::sys::Pinned, usize, Window)> {
    crate::require_root();
    reap_stale();
    let (reps, time) = timing(opts);
    let mut rig = Rig::new()?;
    let pinned = crate::sys::Pinned::to(rig.sample_cpu)?;
    rig.check_generators(rig.sample_cpu)?;
    Ok((rig, pinned, reps, time))
}

/// Repetitions and window of the part's series.
fn timing(opts: &Opts) -> (usize, Window) {
    let quick = opts.quick;
    let reps = if quick {
        opts.repetitions.min(3)
    } else {
        opts.repetitions.max(5)
    };
    let length = if quick { 0.25 } else { 0.5 };
    (
        reps,
        Window {
            warmup: 0.1,
            length,
        },
    )
}

/// The program under test on l0 in the many-clients walks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Under {
    Floor,
    Toy,
    /// lb in the steady state: every slot unchanged (no connection-table access).
    Lb,
    /// lb right after a change that moved every slot: every packet on a changed slot.
    LbChanged,
}

impl Under {
    fn label(self) -> &'static str {
        match self {
            Under::Floor => "floor (MAC swap + XDP_TX)",
            Under::Toy => "toy (stateless: hash lookup of the VIP, jhash % 3, MACs, XDP_TX)",
            Under::Lb => {
                "lb dsr, 3 backends, lbd's default 1,048,576-entry table, every slot unchanged (steady state)"
            }
            Under::LbChanged => {
                "lb dsr, 3 backends, lbd's default 1,048,576-entry table, every slot changed (right after a change)"
            }
        }
    }
}

/// Part `clients`, the headline: what users run (lbd's default connection table, 3 dsr
/// backends) under walks of 1,024, 16,384 and 65,536 clients, against the floor and a
/// stateless toy balancer measured side by side in the same run. lb twice: in the steady state
/// (every slot unchanged: no packet touches the connection table) and right after a change that
/// moved every slot (every packet reads its flow's set: the worst case, what every packet cost
/// before issue 12). Per configuration: the rate (bpf_stats as it was), then one more call with
/// kernel.bpf_stats_enabled for the program's own live ns per run.
pub fn run_clients(opts: &Opts) -> Result<Vec<Figure>> {
    let (mut rig, _pinned, reps, time) = start(opts)?;
    let cpu = rig.gen_cpu;
    let section = "packet rate, many clients (lbd's default table)";
    let mut figures = vec![];
    // (clients, syn, under) -> (median Mpps, live ns per run)
    let mut got: BTreeMap<(u32, bool, u8), (f64, f64)> = BTreeMap::new();
    for n in CLIENTS {
        for under in [Under::Floor, Under::Toy, Under::Lb, Under::LbChanged] {
            let macs: Vec<[u8; 6]> = (0..3).map(backend_mac).collect();
            let (mut lb, _link, id) = match under {
                Under::Floor => {
                    let (link, id) = rig.attach_prog_l0(TestProg::load("floor", &[])?)?;
                    (None, Some(link), id)
                }
                Under::Toy => {
                    let toy = TestProg::toy(VIP, &macs, L0_MAC, SEED[0] as u32)?;
                    let (link, id) = rig.attach_prog_l0(toy)?;
                    (None, Some(link), id)
                }
                Under::Lb | Under::LbChanged => {
                    let lb = Lb::new(&mut rig, 3, false, DEFAULT_CONNTRACK_ENTRIES)?;
                    let id = lb.dp.program_id();
                    (Some(lb), None, id)
                }
            };
            let slots = if under == Under::Floor { 0 } else { 3 };
            for stream in [Stream::UdpClients(n), Stream::SynClients(n)] {
                let syn = stream.syn();
                if let Some(lb) = lb.as_mut() {
                    lb.steady(if syn { 6 } else { 17 })?;
                    if under == Under::LbChanged {
                        lb.change_every_slot()?;
                    }
                }
                let runs = rig.series(stream, time, reps, slots, || Ok(()))?;
                let s = Series {
                    name: format!("{}, {}", under.label(), stream.label()),
                    extra: share_note(&runs, slots),
                    runs,
                };
                let mpps = s.median();
                let live = rig.live_cost(stream, time, mpps, id)?;
                let flows = lb.as_ref().map(|lb| lb.flows());
                let mut note = format!(
                    "{:.0} ns/packet for the whole path; lost {} of {} sent; the program's own live cost (bpf_stats, one more call): {:.1} ns per run over {} runs ({:.2} Mpps with the accounting on)",
                    1e3 / mpps,
                    s.lost(),
                    s.sent(),
                    live.ns,
                    live.runs,
                    live.mpps
                );
                if let Some(&(floor, _)) = got.get(&(n, syn, Under::Floor as u8)) {
                    note.push_str(&format!(
                        "; {:.2}× floor ({:+.0} ns/packet)",
                        mpps / floor,
                        1e3 / mpps - 1e3 / floor
                    ));
                }
                if let (Some(lb), Some(flows)) = (lb.as_ref(), flows) {
                    let changed = lb.dp.slot_state(0).map_or(0, |s| s.changed());
                    note.push_str(&format!(
                        "; {} of {} slots changed during the series; {flows} flows in the table after (emptied before the series",
                        thousands(changed as u64),
                        thousands(TABLE as u64)
                    ));
                    note.push_str(&match (under, syn) {
                        (Under::LbChanged, true) => {
                            "; every SYN, on a changed slot, recorded on its slot's current backend: the table fills up, then every SYN takes the place of its set's least recently seen flow)".to_string()
                        }
                        (Under::LbChanged, false) => {
                            let moved = lb.dp.slot_state(0).map(|s| s.current()).unwrap_or_default();
                            let ((old, other, none), _) = lb.udp_records(n, &lb.table, &moved);
                            format!(
                                "; the first walk after the change (the calibration call) recorded every client on its slot's previous backend, every later packet follows its record: the windows measure table hits; after the series {old} of {n} clients had a record naming their slot's previous backend, {other} another backend, {none} none)"
                            )
                        }
                        _ => {
                            "; no packet on an unchanged slot writes the table)".to_string()
                        }
                    });
                }
                figures.push(s.figure(section, note));
                got.insert((n, syn, under as u8), (mpps, live.ns));
            }
            if let Some(lb) = lb {
                lb.remove()?;
            }
        }
    }
    // The issue's table: live ns per run of each program, and rates as × floor.
    for n in CLIENTS {
        let at = |syn: bool, u: Under| got.get(&(n, syn, u as u8)).copied();
        for syn in [false, true] {
            let what = if syn { "TCP SYN" } else { "UDP established" };
            let (Some(floor), Some(toy), Some(lb)) = (
                at(syn, Under::Floor),
                at(syn, Under::Toy),
                at(syn, Under::Lb),
            ) else {
                continue;
            };
            let clients = thousands(n as u64);
            let changed = at(syn, Under::LbChanged);
            figures.push(Figure::value(
                section,
                &format!("live ns per run (bpf_stats), {what}, {clients} clients: lb"),
                "ns",
                lb.1,
                &format!(
                    "every slot unchanged (the steady state); floor {:.1} ns, toy {:.1} ns; lb = {:.2}× the toy's (target ≤ 1.5× with 65,536 clients){}",
                    floor.1,
                    toy.1,
                    lb.1 / toy.1,
                    changed.map_or(String::new(), |c| format!(
                        "; with every slot changed {:.1} ns ({:+.1} ns)",
                        c.1,
                        c.1 - lb.1
                    ))
                ),
            ));
            figures.push(Figure::value(
                section,
                &format!("ratio lb/floor, {what}, {clients} clients"),
                "×",
                lb.0 / floor.0,
                &format!(
                    "every slot unchanged (the steady state); {:.2} vs {:.2} Mpps; toy {:.2}× floor (target for lb with 65,536 clients: ≥ {})",
                    lb.0,
                    floor.0,
                    toy.0 / floor.0,
                    if syn { "0.70" } else { "0.80" }
                ),
            ));
            if let Some(c) = changed {
                figures.push(Figure::value(
                    section,
                    &format!(
                        "live ns per run (bpf_stats), {what}, {clients} clients: lb, every slot changed"
                    ),
                    "ns",
                    c.1,
                    &format!(
                        "right after a change that moved every slot ({}): the worst case, what every packet cost before issue 12; {:.2}× the toy's, {:.2}× lb's with every slot unchanged",
                        if syn {
                            "every SYN recorded"
                        } else {
                            "every packet a table hit of its flow's record"
                        },
                        c.1 / toy.1,
                        c.1 / lb.1
                    ),
                ));
                figures.push(Figure::value(
                    section,
                    &format!("ratio lb/floor, {what}, {clients} clients, every slot changed"),
                    "×",
                    c.0 / floor.0,
                    &format!(
                        "{:.2} vs {:.2} Mpps; {:.2}× lb's rate with every slot unchanged",
                        c.0,
                        floor.0,
                        c.0 / lb.0
                    ),
                ));
            }
        }
    }
    change_rate(&mut rig, reps, section, &mut figures)?;
    two_cpus(&mut rig, reps.min(3), section, &mut figures)?;
    figures.push(Figure::value(
        section,
        "how these were measured",
        "",
        f64::NAN,
        &format!(
            "generator, program under test and sink share CPU {cpu}; clients 198.18.0.0 + i (i < clients), one UDP flow each, or SYNs whose source port changes with every walk; per client count the floor, the toy, lb with every slot unchanged and lb right after a change that moved every slot (a table of each slot's next backend swapped in, as lbd applies a change) one after the other; rates with bpf_stats as it was, then one call with kernel.bpf_stats_enabled=1 for run_time_ns / run_cnt of the program on l0"
        ),
    ));
    Ok(figures)
}

/// The sink slot that counts frames to `mac` (see `SINK_SLOTS`).
fn sink_slot(mac: [u8; 6]) -> u32 {
    1 + (u32::from(u16::from_be_bytes([mac[4], mac[5]])) & (SINK_SLOTS - 2))
}

/// A series of `stream` on what is attached to l0 (program `id`), then one more call for its
/// live cost; with `to`, checks that every delivered frame went to that MAC.
fn nat_row(
    rig: &Rig,
    name: String,
    stream: Stream,
    id: u32,
    reps: usize,
    time: Window,
    to: Option<[u8; 6]>,
) -> Result<(Series, LiveCost)> {
    let slot = to.map(sink_slot);
    let before = slot.map(|s| rig.sink.sum("SINK", s)).transpose()?;
    let runs = rig.series(stream, time, reps, 0, || Ok(()))?;
    let s = Series {
        name,
        runs,
        extra: String::new(),
    };
    if let (Some(slot), Some(before), Some(mac)) = (slot, before, to) {
        let got = rig.sink.sum("SINK", slot)? - before;
        let delivered: u64 = s.runs.iter().map(|r| r.delivered).sum();
        // The calibration call also delivers: at least the series' frames went to `mac`.
        ensure!(
            got >= delivered,
            "{}: {got} frames to {mac:02x?}, but the series delivered {delivered}",
            s.name
        );
    }
    let live = rig.live_cost(stream, time, s.median(), id)?;
    Ok((s, live))
}

/// Part `nat`, packet rate: UDP walks of 65,536 and 1,024 clients through the floor, lb with a
/// `dsr` service and lb with a `nat` service (VIP:53 → backend:8053), requests and replies, one
/// after the other in one run. One backend (198.19.0.0) in both services: a reply must come
/// from its flow's backend, and the generator varies only the client's address; a request
/// costs lb the same whatever the backend count (one Maglev table read). The replies' entries
/// are written by the request series before them (each client's first request records its
/// flow and reply entry), checked in `NAT_FLOWS` before the replies are measured.
pub fn run_nat(opts: &Opts) -> Result<Vec<Figure>> {
    let (mut rig, _pinned, reps, time) = start(opts)?;
    let cpu = rig.gen_cpu;
    let section = "NAT packet rate";
    let walk = Stream::UdpClients(WALK);
    let floor_row = {
        let (_link, id) = rig.attach_prog_l0(TestProg::load("floor", &[])?)?;
        nat_row(
            &rig,
            format!("floor (MAC swap + XDP_TX), {}", walk.label()),
            walk,
            id,
            reps,
            time,
            Some(G0_MAC),
        )?
    };
    let floor = floor_row.0.median();
    let mut figures = vec![];
    let mut note = |(s, live): &(Series, LiveCost), base: Option<&(Series, LiveCost)>| {
        let mpps = s.median();
        let mut note = format!(
            "{:.0} ns/packet for the whole path; lost {} of {} sent; the program's own live cost (bpf_stats, one more call): {:.1} ns per run over {} runs ({:.2} Mpps with the accounting on)",
            1e3 / mpps,
            s.lost(),
            s.sent(),
            live.ns,
            live.runs,
            live.mpps
        );
        if base.is_some() || !s.name.starts_with("floor") {
            note.push_str(&format!(
                "; {:.2}× floor ({:+.0} ns/packet)",
                mpps / floor,
                1e3 / mpps - 1e3 / floor
            ));
        }
        if let Some((d, dl)) = base {
            note.push_str(&format!(
                "; {:.2}× lb dsr with as many clients ({:+.1} ns live per run)",
                mpps / d.median(),
                live.ns - dl.ns
            ));
        }
        figures.push(s.figure(section, note));
    };
    note(&floor_row, None);
    let mut summary = vec![];
    for n in NAT_CLIENTS {
        let requests = Stream::UdpClients(n);
        let dsr = {
            let mut lb = Lb::new(&mut rig, 1, false, DEFAULT_CONNTRACK_ENTRIES)?;
            lb.steady(17)?;
            let id = lb.dp.program_id();
            let row = nat_row(
                &rig,
                format!(
                    "lb dsr, 1 backend, every slot unchanged, requests: {}",
                    requests.label()
                ),
                requests,
                id,
                reps,
                time,
                Some(backend_mac(0)),
            )?;
            lb.remove()?;
            row
        };
        let mut lb = Lb::new(&mut rig, 1, false, DEFAULT_CONNTRACK_ENTRIES)?;
        lb.make_nat()?;
        lb.steady(17)?;
        let id = lb.dp.program_id();
        let req = nat_row(
            &rig,
            format!(
                "lb nat, 1 backend, requests (VIP:{UDP_PORT} → backend:{NAT_PORT}): {}",
                requests.label()
            ),
            requests,
            id,
            reps,
            time,
            Some(backend_mac(0)),
        )?;
        // Every client's flow (and so its reply entry) is recorded by now.
        let recorded = (0..n)
            .filter(|&w| {
                let key = flow_key(client(w).into(), VIP.into(), UDP_SPORT, UDP_PORT, 17);
                lb.dp.nat_flow(&key).is_some_and(|f| f.backend == 0)
            })
            .count();
        ensure!(
            recorded == n as usize,
            "only {recorded} of {n} clients have a NAT flow after the request series"
        );
        let rep = nat_row(
            &rig,
            format!("lb nat, 1 backend, {}", Stream::NatReplies(n).label()),
            Stream::NatReplies(n),
            id,
            reps,
            time,
            Some(G0_MAC),
        )?;
        lb.remove()?;
        note(&dsr, None);
        note(&req, Some(&dsr));
        note(&rep, Some(&dsr));
        summary.push((n, dsr, req, rep));
    }
    for (n, dsr, req, rep) in &summary {
        let clients = thousands(*n as u64);
        for (row, what) in [(req, "requests"), (rep, "replies")] {
            let mpps = row.0.median();
            figures.push(Figure::value(
                section,
                &format!("ratio lb nat/floor, {what}, {clients} clients"),
                "×",
                mpps / floor,
                &format!(
                    "{mpps:.2} vs {floor:.2} Mpps; lb dsr {:.2}× floor",
                    dsr.0.median() / floor
                ),
            ));
            figures.push(Figure::value(
                section,
                &format!("live ns per run (bpf_stats), lb nat {what}, {clients} clients"),
                "ns",
                row.1.ns,
                &format!("lb dsr {:.1} ns, floor {:.1} ns", dsr.1.ns, floor_row.1.ns),
            ));
        }
    }
    figures.push(Figure::value(
        section,
        "how these were measured",
        "",
        f64::NAN,
        &format!(
            "generator, program under test and sink share CPU {cpu}; clients 198.18.0.0 + i (i < 65,536, then i < 1,024), one UDP flow each (checksum 0: IPv4 UDP without checksum, which nat leaves 0; TCP would add two incremental checksum updates); lbd's default connection table, nat tables of lbd's default 262,144 entries, a fresh data path for every lb row; the floor (65,536 clients), then per client count lb dsr, lb nat requests and lb nat replies (backend 198.19.0.0:{NAT_PORT} → client:{UDP_SPORT}, to the client's MAC the way the request came, XDP_TX) one after the other; every series checked to have reached the right MAC (the backend's for requests, the client's for replies); the replies' entries written by the request series (every client's first request), all checked in NAT_FLOWS before; rates with bpf_stats as it was, then one call with kernel.bpf_stats_enabled=1 for run_time_ns / run_cnt of the program on l0"
        ),
    ));
    Ok(figures)
}

/// Part `flood`: the SYN walk of 65,536 clients (every SYN a new connection) right after a
/// backend is added (3 → 4, the table swapped in as lbd applies an add: the slots the add moved
/// are changed, so every SYN on them asks for a record), lb with lbd's default table and the
/// default new-flow limit, against the floor measured in the same run; and lb the same way with
/// no limit (every SYN on a changed slot recorded), to show what the limit saves. Every call
/// starts from the steady state with the add applied again (table emptied, slots cleared, then
/// the add), so each call is "right after the change".
pub fn run_flood(opts: &Opts) -> Result<Vec<Figure>> {
    let (mut rig, _pinned, reps, time) = start(opts)?;
    let section = "packet rate, SYN flood right after a backend add";
    let stream = Stream::SynClients(WALK);
    let mut figures = vec![];
    let floor = {
        let (_link, _) = rig.attach_prog_l0(TestProg::load("floor", &[])?)?;
        let s = Series {
            name: format!("floor (MAC swap + XDP_TX), {}", stream.label()),
            extra: String::new(),
            runs: rig.series(stream, time, reps, 0, || Ok(()))?,
        };
        let mpps = s.median();
        figures.push(s.figure(
            section,
            format!("{:.0} ns/packet for the whole path", 1e3 / mpps),
        ));
        mpps
    };
    let (three, four) = (maglev(3), maglev(4));
    let moved = three.iter().zip(&four).filter(|(a, b)| a != b).count();
    for limit in [lb_common::DEFAULT_NEW_FLOW_LIMIT, 0] {
        let what = match limit {
            0 => "no new-flow limit".to_string(),
            n => format!(
                "the default new_flow_limit ({}/s per CPU)",
                thousands(n as u64)
            ),
        };
        let mut lb = Lb::new(&mut rig, 4, false, DEFAULT_CONNTRACK_ENTRIES)?;
        lb.dp.set_config_with(
            SEED,
            &datapath::Protection {
                new_flow_limit: limit,
                ..Default::default()
            },
        )?;
        lb.table = three.clone();
        let counts_before = lb.dp.new_flow_counts();
        let runs = rig.series(stream, time, reps, 4, || {
            lb.steady(6)?;
            lb.dp.swap_table(0, &four)?;
            Ok(())
        })?;
        let counts = lb.dp.new_flow_counts();
        let [recorded, over, no_room] =
            [0, 1, 2].map(|i| counts[i].saturating_sub(counts_before[i]));
        let changed = lb.dp.slot_state(0).map_or(0, |s| s.changed());
        let s = Series {
            name: format!(
                "lb dsr, lbd's default table, right after a backend add (3 → 4), {what}, {}",
                stream.label()
            ),
            extra: String::new(),
            runs,
        };
        let mpps = s.median();
        figures.push(s.figure(
            section,
            format!(
                "{:.0} ns/packet for the whole path; {:.2}× floor ({:+.0} ns/packet); the add changed {} of {} slots ({} after the last call); new flows over all calls: {} recorded, {} over the limit, {} without room; lost {} of {} sent",
                1e3 / mpps,
                mpps / floor,
                1e3 / mpps - 1e3 / floor,
                thousands(moved as u64),
                thousands(TABLE as u64),
                thousands(changed as u64),
                thousands(recorded),
                thousands(over),
                thousands(no_room),
                s.lost(),
                s.sent()
            ),
        ));
        figures.push(Figure::value(
            section,
            &format!("ratio lb/floor, TCP SYN right after a backend add, {what}"),
            "×",
            mpps / floor,
            &format!(
                "{mpps:.2} vs {floor:.2} Mpps{}",
                if limit == 0 {
                    ""
                } else {
                    " (target: ≥ 0.70 with the default config)"
                }
            ),
        ));
        lb.remove()?;
    }
    Ok(figures)
}

/// The sink's rate between `from` and `to` (while traffic still came), and the window's length.
fn rate_between(samples: &[(Instant, u64)], from: Instant, to: Instant) -> Option<(f64, f64)> {
    let last = samples.last()?.1;
    let stop = samples.iter().position(|s| s.1 == last)?;
    let during = &samples[..stop];
    let a = during.iter().find(|s| s.0 >= from)?;
    let b = during.iter().rev().find(|s| s.0 <= to)?;
    let secs = b.0.saturating_duration_since(a.0).as_secs_f64();
    (secs > 0.0).then(|| ((b.1 - a.1) as f64 / secs, secs))
}

/// Part `alternating`: the floor, the toy, lb (steady state, 65,536 clients, lbd's default
/// table) and lb's traced program with no trace running, swapped in turn into one link on l0
/// (lb's), in an order that rotates every round, so that the machine's drift (this machine is
/// shared) falls on all alike. Per program and round: the rate (bpf_stats as it was), then the
/// live ns per run (bpf_stats on). The ratios are medians of per-round ratios. Also what
/// `lbctl trace`'s two checks would cost if lbd did not swap them out.
pub fn run_alternating(opts: &Opts) -> Result<Vec<Figure>> {
    const ROUNDS: usize = 8;
    let (mut rig, _pinned, _reps, time) = start(opts)?;
    let section = "side by side, alternating programs on one link (65,536 clients)";
    let mut figures = vec![];
    let n = CLIENTS[CLIENTS.len() - 1];
    let macs: Vec<[u8; 6]> = (0..3).map(backend_mac).collect();
    let mut floor = TestProg::load("floor", &[])?;
    let mut toy = TestProg::toy(VIP, &macs, L0_MAC, SEED[0] as u32)?;
    let mut lb = Lb::new(&mut rig, 3, false, DEFAULT_CONNTRACK_ENTRIES)?;
    let pin = lb_userspace::datapath::link_pin(&lb.dir, "l0");
    const NAMES: [&str; 4] = ["floor", "toy", "lb", "lb traced, no trace running"];
    for stream in [Stream::UdpClients(n), Stream::SynClients(n)] {
        lb.steady(if stream.syn() { 6 } else { 17 })?;
        // Per program: (Mpps, live ns) of each round.
        let mut got: [Vec<(f64, f64)>; 4] = Default::default();
        for round in 0..ROUNDS {
            for k in 0..NAMES.len() {
                let which = (k + round) % NAMES.len();
                let id = match which {
                    0 => floor.replace_in_link(&pin)?,
                    1 => toy.replace_in_link(&pin)?,
                    _ => {
                        // lb's own program back into its link: the plain or the traced one.
                        lb.dp.set_traced(which == 3)?;
                        let l0 = rig.l0;
                        let l = rig.l.clone();
                        in_netns(&l, || {
                            lb.dp
                                .attach("l0", l0, XdpMode::Native)
                                .map_err(|e| anyhow!("lb back into its link: {e}"))
                        })?;
                        lb.dp.program_id()
                    }
                };
                let repeat = (3e6 * (time.warmup + time.length) * 1.25 + 20_000.0) as u32;
                let run = rig.measure(stream, time, repeat, 0)?;
                let live = rig.live_cost(stream, time, run.mpps, id)?;
                got[which].push((run.mpps, live.ns));
            }
        }
        lb.dp.set_traced(false)?;
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let per_round = |i: usize, f: &dyn Fn((f64, f64), (f64, f64)) -> f64| -> Vec<f64> {
            (0..ROUNDS).map(|r| f(got[i][r], got[0][r])).collect()
        };
        for (i, name) in NAMES.iter().enumerate() {
            let rate = median(got[i].iter().map(|x| x.0).collect());
            let ns = median(got[i].iter().map(|x| x.1).collect());
            let mut note = format!(
                "median of {ROUNDS} rounds; live {ns:.1} ns per run (median); rates per round: {}",
                got[i]
                    .iter()
                    .map(|x| format!("{:.2}", x.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if i > 0 {
                let ratio = median(per_round(i, &|x, f| x.0 / f.0));
                let over_toy = median((0..ROUNDS).map(|r| got[i][r].1 / got[1][r].1).collect());
                note.push_str(&format!(
                    "; {ratio:.2}× floor (median of per-round ratios); live ns {over_toy:.2}× the toy's (median of per-round ratios)"
                ));
                figures.push(Figure::value(
                    section,
                    &format!("ratio {name}/floor, {}", stream.label()),
                    "×",
                    ratio,
                    &format!("targets for lb: UDP ≥ 0.80, SYN ≥ 0.70; live ns within 1.5× the toy's ({over_toy:.2}×)"),
                ));
            }
            figures.push(Figure::value(
                section,
                &format!("{name}, {}", stream.label()),
                "Mpps",
                rate,
                &note,
            ));
        }
        let checks: Vec<f64> = (0..ROUNDS).map(|r| got[3][r].1 - got[2][r].1).collect();
        figures.push(Figure::value(
            section,
            &format!(
                "live ns per run, {}: lb's traced program with no trace running, minus lb's",
                stream.label()
            ),
            "ns",
            median(checks.clone()),
            &format!(
                "what lbctl trace's two checks would cost if lbd did not swap them out; per round {}",
                checks
                    .iter()
                    .map(|d| format!("{d:+.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    lb.remove()?;
    Ok(figures)
}

/// A backend added while 65,536 clients send: lb (default table, backends 0-2 in the Maglev
/// table, backend 3 configured but in no slot) gets a table with all four in the middle of one
/// long call (0.5 s after the first frame). The rate over the second after the change, the
/// slowest 100 ms in it, against the same call's rate before the change (0.1-0.4 s). Every call
/// starts from the steady state (table emptied, every slot unchanged). For established UDP,
/// what moved: the packets the sink counted on the new backend's MAC (no flow went there before
/// the change, so each is a packet of an established flow that moved), and per flow what the
/// connection table holds after the call for the clients whose slot the change moved.
fn change_rate(rig: &mut Rig, reps: usize, section: &str, figures: &mut Vec<Figure>) -> Result<()> {
    let (three, four) = (maglev(3), maglev(4));
    let mut lb = Lb::new(rig, 4, false, DEFAULT_CONNTRACK_ENTRIES)?;
    lb.table = three.clone();
    let before_window = Window {
        warmup: 0.1,
        length: 0.3,
    };
    // The clients whose slot the add moves (their packets after it take the changed-slot
    // path); the others' slots keep their backend.
    let on_moved: u32 = (0..WALK)
        .filter(|&w| {
            let s = source_slot(&SEED, TABLE, &to_addr(IpAddr::V4(client(w)))).unwrap() as usize;
            three[s] != four[s]
        })
        .count() as u32;
    for stream in [Stream::UdpClients(WALK), Stream::SynClients(WALK)] {
        lb.steady(if stream.syn() { 6 } else { 17 })?;
        let cal = rig.measure(
            stream,
            Window {
                warmup: 0.005,
                length: f64::INFINITY,
            },
            200_000,
            0,
        )?;
        let mut pps = cal.mpps.max(0.1) * 1e6;
        let (mut after, mut before, mut worst, mut to_new) = (vec![], vec![], vec![], 0u64);
        // Per flow after each UDP call: records naming the backend before the change, another
        // backend, none (clients on moved slots only); and slots changed by the add.
        let (mut kept, mut moved, mut unrecorded, mut changed_slots) = (0u64, 0u64, 0u64, 0usize);
        for _ in 0..reps {
            let mut tries = 0;
            loop {
                lb.dp.swap_table(0, &three)?;
                lb.settle()?;
                let repeat = (pps * 1.6 * 1.5 + 20_000.0).min(4e9) as u32;
                let dp = &mut lb.dp;
                let mut add = || -> Result<()> { Ok(dp.swap_table(0, &four)?) };
                let (run, samples, changed) =
                    rig.measure_with(stream, before_window, repeat, 4, Some((0.5, &mut add)))?;
                let changed = changed.ok_or_else(|| anyhow!("the call ended before the change"))?;
                let second = rate_between(&samples, changed, changed + Duration::from_secs(1));
                pps = pps.max(run.mpps * 1e6);
                match second {
                    Some((rate, secs)) if secs >= 0.95 => {
                        let slowest = (0..10)
                            .filter_map(|i| {
                                let from = changed + Duration::from_millis(100 * i);
                                rate_between(&samples, from, from + Duration::from_millis(100))
                            })
                            .map(|(r, _)| r)
                            .fold(f64::INFINITY, f64::min);
                        after.push(rate / 1e6);
                        before.push(run.mpps);
                        worst.push(slowest / 1e6);
                        to_new += run.per_slot[3];
                        changed_slots = lb.dp.slot_state(0).map_or(0, |s| s.changed());
                        if !stream.syn() {
                            let ((k, o, none), stray) = lb.udp_records(WALK, &three, &four);
                            ensure!(
                                stray == 0,
                                "{stray} clients on slots the add did not move have a record"
                            );
                            kept += k as u64;
                            moved += o as u64;
                            unrecorded += none as u64;
                        }
                        break;
                    }
                    _ => {
                        tries += 1;
                        if tries > 3 {
                            bail!("{stream:?}: the calls ended before a second after the change");
                        }
                        pps *= 2.0;
                    }
                }
            }
        }
        let med = |v: &[f64]| Figure::from_samples("", "", "", v.to_vec(), "").median;
        figures.push(Figure::from_samples(
            section,
            &format!(
                "lb, the second after a backend is added (3 → 4), {}",
                stream.label()
            ),
            "Mpps",
            after.clone(),
            &format!(
                "{:.2}× the same calls' rate before the change (median {:.2} Mpps); slowest 100 ms in that second: median {:.2} Mpps; the add changed {} of {} slots ({} of the 65,536 clients on them); {to_new} packets to the new backend over all {} calls ({}); lbd's default table, emptied and every slot unchanged before each call",
                med(&after) / med(&before),
                med(&before),
                med(&worst),
                thousands(changed_slots as u64),
                thousands(TABLE as u64),
                thousands(on_moved as u64),
                after.len(),
                if stream.syn() {
                    "SYNs on changed slots take the new choice".to_string()
                } else {
                    format!(
                        "no flow went there before the change, so each is a packet of an established flow that moved; per flow, from the connection table after each call, over all calls: {kept} records of clients on changed slots name the backend from before the change (their packets after it went there: the first was decided by the slot's previous backend and recorded, the later ones followed the record), {moved} name another backend, {unrecorded} such clients had no record; the clients on unchanged slots have none, their packets went to the slot's backend, the same as before"
                    )
                }
            ),
        ));
    }
    lb.remove()
}

/// The same streams of 65,536 clients from both CPUs at once (two generator threads, each
/// pinned to its CPU; on veth each frame's whole path then runs on the CPU that sent it), the
/// floor's and lb's rate against one CPU, measured the same way (delivered frames over the
/// calls' wall time, ~1 s calls). Both CPUs walk the same clients, their counters apart (half a
/// walk for UDP, so a flow's packets come from both CPUs, unlike with RSS; 16,384 walks for
/// SYNs, so every SYN is still a new connection).
fn two_cpus(rig: &mut Rig, reps: usize, section: &str, figures: &mut Vec<Figure>) -> Result<()> {
    // The rig's CPUs (this thread is pinned to the sampling one by now).
    if rig.gen_cpu == rig.sample_cpu {
        bail!("two-CPU scaling needs two CPUs, this machine has one");
    }
    let (one, both) = ([rig.gen_cpu], [rig.sample_cpu, rig.gen_cpu]);
    let mut scaling: BTreeMap<(bool, u8), f64> = BTreeMap::new();
    for under in [Under::Floor, Under::Lb] {
        let (mut lb, _link) = match under {
            Under::Lb => (
                Some(Lb::new(rig, 3, false, DEFAULT_CONNTRACK_ENTRIES)?),
                None,
            ),
            _ => (
                None,
                Some(rig.attach_prog_l0(TestProg::load("floor", &[])?)?.0),
            ),
        };
        for stream in [Stream::UdpClients(WALK), Stream::SynClients(WALK)] {
            if let Some(lb) = lb.as_mut() {
                lb.steady(if stream.syn() { 6 } else { 17 })?;
            }
            let cal = rig.measure_cpus(stream, &one, 2_000_000)?;
            let repeat = (cal * 1e6).clamp(1e5, 4e9) as u32;
            let (mut single, mut double) = (vec![], vec![]);
            for _ in 0..reps {
                single.push(rig.measure_cpus(stream, &one, repeat)?);
                let generator = rig
                    .gens
                    .get_mut(&stream)
                    .expect("every stream has a generator");
                let mut sent = generator.per_cpu("SENT", 0)?;
                let apart: u64 = if stream.syn() { 0x4000_0000 } else { 0x8000 };
                sent[both[0]] = sent[both[1]] + apart;
                generator.set_per_cpu("SENT", 0, &sent)?;
                double.push(rig.measure_cpus(stream, &both, repeat)?);
            }
            let med = |v: &[f64]| Figure::from_samples("", "", "", v.to_vec(), "").median;
            let x = med(&double) / med(&single);
            scaling.insert((stream.syn(), under as u8), x);
            figures.push(Figure::from_samples(
                section,
                &format!("{}, {}, both CPUs", under.label(), stream.label()),
                "Mpps",
                double,
                &format!(
                    "{x:.2}× one CPU measured the same way (median {:.2} Mpps); delivered frames over the calls' wall time",
                    med(&single)
                ),
            ));
        }
        if let Some(lb) = lb {
            lb.remove()?;
        }
    }
    for syn in [false, true] {
        if let (Some(lb), Some(floor)) = (
            scaling.get(&(syn, Under::Lb as u8)),
            scaling.get(&(syn, Under::Floor as u8)),
        ) {
            figures.push(Figure::value(
                section,
                &format!(
                    "two-CPU scaling, lb against the floor, {}",
                    if syn { "TCP SYN" } else { "UDP established" }
                ),
                "×",
                lb / floor,
                &format!("lb {lb:.2}× from one CPU to two, the floor {floor:.2}×"),
            ));
        }
    }
    Ok(())
}

pub fn run(opts: &Opts) -> Result<Vec<Figure>> {
    let (mut rig, _pinned, reps, time) = start(opts)?;
    let cpu = rig.gen_cpu;
    let mut series: Vec<Series> = vec![];
    let mut floors: BTreeMap<Stream, f64> = BTreeMap::new();

    // The floor: MAC swap and XDP_TX on l0; measured first and again last (its runs are taken
    // together), so a machine that got busier or quieter meanwhile shows.
    let floor_runs = |rig: &Rig| -> Result<Vec<Vec<Run>>> {
        let _link = rig.attach_l0("floor")?;
        [Stream::UdpEst, Stream::Syn]
            .iter()
            .map(|&stream| rig.series(stream, time, reps, 0, || Ok(())))
            .collect()
    };
    let floor_first = floor_runs(&rig)?;

    // nftables: XDP_PASS on l0 (so the veth takes the generator's frames), then the kernel's
    // stack: conntrack, DNAT by a jhash of the source in a prerouting nat chain, forwarding,
    // a static neighbour per backend whose MAC leads back out of l0 to the sink.
    let mut nft: BTreeMap<Stream, f64> = BTreeMap::new();
    {
        let nft_backends = [11u8, 12, 13];
        let mut map = vec![];
        for (i, last) in nft_backends.iter().enumerate() {
            let addr = format!("192.0.2.{last}");
            ip(&[
                "-n",
                &rig.l,
                "neigh",
                "replace",
                &addr,
                "lladdr",
                &format!("02:00:00:0b:00:{i:02x}"),
                "dev",
                "l0",
                "nud",
                "permanent",
            ])?;
            map.push(format!("{i} : {addr}"));
        }
        let map = map.join(", ");
        let ruleset = format!(
            "table ip lbbench {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr {VIP} udp dport {UDP_PORT} dnat to jhash ip saddr mod 3 map {{ {map} }}\n    ip daddr {VIP} tcp dport {TCP_PORT} dnat to jhash ip saddr mod 3 map {{ {map} }}\n  }}\n}}\n"
        );
        run_checked(
            Command::new("ip").args(["netns", "exec", &rig.l, "nft", "-f", "-"]),
            Some(&ruleset),
        )?;
        let _link = rig.attach_l0("pass")?;
        for stream in [Stream::UdpEst, Stream::Syn] {
            let runs = rig.series(stream, time, reps, 3, || Ok(()))?;
            let conntrack = in_netns(&rig.l, || {
                let read = |k: &str| {
                    std::fs::read_to_string(crate::netns::sysctl_path(k))
                        .map(|v| v.trim().to_string())
                        .unwrap_or_else(|_| "?".into())
                };
                Ok((
                    read("net.netfilter.nf_conntrack_count"),
                    read("net.netfilter.nf_conntrack_max"),
                ))
            })?;
            let s = Series {
                name: format!(
                    "nftables (dnat to jhash ip saddr mod 3), {}",
                    stream.label()
                ),
                extra: format!(
                    "{}; {} conntrack entries after these runs (max {})",
                    share_note(&runs, 3),
                    conntrack.0,
                    conntrack.1
                ),
                runs,
            };
            nft.insert(stream, s.median());
            series.push(s);
        }
        run_checked(
            Command::new("ip").args([
                "netns", "exec", &rig.l, "nft", "delete", "table", "ip", "lbbench",
            ]),
            None,
        )?;
    }

    // lb, in the steady state (every slot unchanged: no packet touches the connection table)
    // and right after a change that moved every slot (every packet takes the changed-slot
    // path: reads its flow's set, and records it if it has no record).
    let mut shares: Vec<Vec<f64>> = vec![vec![]; 3];
    let mut share_from = String::new();
    // (index in series, stream, the headline configuration: dsr, 3 backends, steady state)
    let mut lb_names: Vec<(usize, Stream, bool)> = vec![];
    for tunnel in [false, true] {
        for n in [3u32, 100, 1000] {
            let mode = if tunnel { "tunnel" } else { "dsr" };
            let name =
                |what: &str, state: &str| format!("lb {mode}, {n} backends, {what}, {state}");
            let slots = if n == 3 { 3 } else { 0 };
            let mut lb = Lb::new(&mut rig, n, tunnel, CONNTRACK)?;
            // UDP: the 1,000 established flows on unchanged slots (no record written or read).
            lb.steady(17)?;
            let runs = rig.series(Stream::UdpEst, time, reps, slots, || Ok(()))?;
            let flows = lb.flows();
            lb_names.push((series.len(), Stream::UdpEst, !tunnel && n == 3));
            series.push(Series {
                name: name(&Stream::UdpEst.label(), "every slot unchanged"),
                extra: format!(
                    "{flows} flows in the table after (no packet on an unchanged slot writes one); {}",
                    share_note(&runs, slots)
                ),
                runs,
            });
            // The same flows right after a change that moved every slot: the first walk after
            // it (the calibration call) records each on its slot's previous backend, every later
            // packet is a table hit of its record. (Replaces the "full table" row of the design
            // before issue 12: on unchanged slots the table is never read, full or not.)
            lb.change_every_slot()?;
            let runs = rig.series(Stream::UdpEst, time, reps, slots, || Ok(()))?;
            let moved = lb.dp.slot_state(0).map(|s| s.current()).unwrap_or_default();
            let ((old, other, none), _) = lb.udp_records(EST_FLOWS, &lb.table, &moved);
            lb_names.push((series.len(), Stream::UdpEst, false));
            series.push(Series {
                name: name(
                    &Stream::UdpEst.label(),
                    "every slot changed (table hits), 65,536-entry table",
                ),
                extra: format!(
                    "after the series {old} of {EST_FLOWS} flows had a record naming their slot's previous backend, {other} another, {none} none; {}",
                    share_note(&runs, slots)
                ),
                runs,
            });
            if n == 3 || n == 1000 {
                // The walk's 65,536 flows right after a change that moved every slot, in a
                // table of as many entries: each is recorded at its first packet, but sets of 4
                // overflow, so some flows keep taking each other's entries (a miss goes to the
                // slot's previous backend and is recorded again). (Replaces the "full table"
                // row filled from userspace: on unchanged slots nothing is recorded.)
                lb.steady(17)?;
                lb.change_every_slot()?;
                let runs = rig.series(Stream::UdpWalk, time, reps, slots, || Ok(()))?;
                let after = lb.flows();
                series.push(Series {
                    name: name(
                        &Stream::UdpWalk.label(),
                        "every slot changed, 65,536-entry table",
                    ),
                    extra: format!("{after} flows in the table after"),
                    runs,
                });
            }
            // TCP SYNs, each a new connection, on unchanged slots: nothing written. (Replaces
            // the "full table" row: a SYN on an unchanged slot never reaches the table.)
            lb.steady(6)?;
            let runs = rig.series(Stream::Syn, time, reps, slots, || Ok(()))?;
            let after = lb.flows();
            if n == 3 && !tunnel {
                for r in &runs {
                    let total: u64 = r.per_slot.iter().sum();
                    for (i, c) in r.per_slot.iter().enumerate() {
                        shares[i].push(100.0 * *c as f64 / total.max(1) as f64);
                    }
                }
                share_from = format!(
                    "lb dsr, 3 backends, {}, every slot unchanged; {} runs",
                    Stream::Syn.label(),
                    runs.len()
                );
            }
            lb_names.push((series.len(), Stream::Syn, !tunnel && n == 3));
            series.push(Series {
                name: name(&Stream::Syn.label(), "every slot unchanged"),
                extra: format!(
                    "{after} flows in the table after (no SYN on an unchanged slot writes one); {}",
                    share_note(&runs, slots)
                ),
                runs,
            });
            // TCP SYNs on changed slots (right after a change that moved every slot) into a
            // full table: each is recorded on its slot's current backend, in the place of its
            // set's least recently seen flow (every entry refilled before each call). Kept from
            // before issue 12: SYNs on changed slots still take entries.
            lb.change_every_slot()?;
            let runs = rig.series(Stream::Syn, time, reps, slots, || lb.fill_all())?;
            let before = lb.flows();
            lb_names.push((series.len(), Stream::Syn, false));
            series.push(Series {
                name: name(
                    &Stream::Syn.label(),
                    "every slot changed, full 65,536-entry table",
                ),
                extra: format!(
                    "every one of the table's {before} entries taken before each call, so every SYN takes the place of its set's least recently seen flow; {}",
                    share_note(&runs, slots)
                ),
                runs,
            });
            lb.remove()?;
            // TCP SYNs on changed slots into an empty table with room for every one of them
            // (no eviction during a call): a table of ROOMY entries, emptied before each call.
            let mut lb = Lb::new(&mut rig, n, tunnel, ROOMY)?;
            lb.steady(6)?;
            lb.change_every_slot()?;
            let mut most = 0;
            let runs = rig.series(Stream::Syn, time, reps, slots, || lb.clear())?;
            for r in &runs {
                most = most.max(r.delivered);
            }
            lb_names.push((series.len(), Stream::Syn, false));
            series.push(Series {
                name: name(
                    &Stream::Syn.label(),
                    "every slot changed, empty 4,194,304-entry table",
                ),
                extra: format!(
                    "emptied before each call, which then recorded at most {most} flows (no eviction; a table of 64 MiB, far beyond the caches); {}",
                    share_note(&runs, slots)
                ),
                runs,
            });
            lb.remove()?;
        }
    }

    // The floor again, then its figures first.
    let floor_last = floor_runs(&rig)?;
    let mut floor_series = vec![];
    for (i, (first, last)) in floor_first.into_iter().zip(floor_last).enumerate() {
        let stream = [Stream::UdpEst, Stream::Syn][i];
        let median = |runs: &[Run]| {
            Figure::from_samples("", "", "", runs.iter().map(|r| r.mpps).collect(), "").median
        };
        let extra = format!(
            "medians {:.2} Mpps measured first, {:.2} Mpps measured last",
            median(&first),
            median(&last)
        );
        let s = Series {
            name: format!("floor (MAC swap + XDP_TX), {}", stream.label()),
            runs: first.into_iter().chain(last).collect(),
            extra,
        };
        floors.insert(stream, s.median());
        floor_series.push(s);
    }
    for s in floor_series.into_iter().rev() {
        series.insert(0, s);
    }
    for entry in lb_names.iter_mut() {
        entry.0 += 2;
    }

    // Figures.
    let mut figures = vec![];
    for (i, s) in series.iter().enumerate() {
        let mpps = s.median();
        let window = s.runs.iter().map(|r| r.window).sum::<f64>() / s.runs.len().max(1) as f64;
        let on_cpu = s.runs.iter().map(|r| r.on_gen_cpu).fold(1.0, f64::min);
        let elsewhere = Figure::from_samples(
            "",
            "",
            "",
            s.runs.iter().map(|r| r.elsewhere * 100.0).collect(),
            "",
        );
        let mut note = format!(
            "{:.0} ns/packet for the whole path (generator, program under test and sink on one CPU); lost {} of {} sent; {:.2} s windows",
            1e3 / mpps,
            s.lost(),
            s.sent(),
            window
        );
        if let Some(&(_, stream, _)) = lb_names.iter().find(|(j, _, _)| *j == i) {
            let stream = if stream == Stream::UdpWalk {
                Stream::UdpEst
            } else {
                stream
            };
            if let Some(f) = floors.get(&stream) {
                note.push_str(&format!(
                    "; {:.2}× floor ({:+.0} ns/packet)",
                    mpps / f,
                    1e3 / mpps - 1e3 / f
                ));
            }
            if let Some(x) = nft.get(&stream) {
                note.push_str(&format!("; {:.1}× nftables", mpps / x));
            }
        }
        if on_cpu < 0.999 {
            note.push_str(&format!(
                "; only {:.1}% counted on the generator's CPU",
                on_cpu * 100.0
            ));
        }
        if elsewhere.max > 10.0 {
            note.push_str(&format!(
                "; CPU {cpu} time elsewhere during the calls (other processes, idle, steal): median {:.0}%, max {:.0}%",
                elsewhere.median, elsewhere.max
            ));
        }
        figures.push(s.figure(SECTION, note));
    }
    let sharing = format!(
        "generator, data path and sink share CPU {cpu} (pinned test-run thread; on veth the whole path runs in its softirq); the rate is read from the sink's counter sampled from CPU {} during one long live-frames call",
        rig.sample_cpu
    );
    for (stream, target) in [(Stream::UdpEst, 0.80), (Stream::Syn, 0.70)] {
        let Some(&(i, _, _)) = lb_names
            .iter()
            .find(|(_, s, headline)| *s == stream && *headline)
        else {
            continue;
        };
        let lb = series[i].median();
        let worst = lb_names
            .iter()
            .filter(|(_, s, _)| *s == stream)
            .map(|(j, _, _)| (series[*j].median(), &series[*j].name))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        if let Some(f) = floors.get(&stream) {
            figures.push(Figure::value(
                SECTION,
                &format!("ratio lb/floor, {}", stream.label()),
                "×",
                lb / f,
                &format!(
                    "{} vs the floor (target ≥ {target:.2}); worst lb configuration: {}",
                    series[i].name,
                    worst.map_or(String::new(), |(w, n)| format!("{n}, {:.2}×", w / f))
                ),
            ));
        }
        if let Some(x) = nft.get(&stream) {
            figures.push(Figure::value(
                SECTION,
                &format!("ratio lb/nftables, {}", stream.label()),
                "×",
                lb / x,
                &format!(
                    "{} vs nftables with 3 backends (target ≥ 5); worst lb configuration: {}",
                    series[i].name,
                    worst.map_or(String::new(), |(w, n)| format!("{n}, {:.1}×", w / x))
                ),
            ));
        }
    }
    for (i, s) in shares.iter().enumerate() {
        if s.is_empty() {
            continue;
        }
        figures.push(Figure::from_samples(
            SECTION,
            &format!("lb backend {} of 3: share of delivered packets", i + 1),
            "%",
            s.clone(),
            &format!("{share_from} (target 30–37%)"),
        ));
    }
    let lb_series: Vec<&Series> = lb_names.iter().map(|(i, _, _)| &series[*i]).collect();
    let (lost, sent) = lb_series
        .iter()
        .fold((0, 0), |(l, t), s| (l + s.lost(), t + s.sent()));
    figures.push(Figure::value(
        SECTION,
        "lb: packets lost (sent by the generator, not delivered to the sink)",
        "packets",
        lost as f64,
        &format!(
            "over every lb run above: {lost} of {sent} sent; {sharing}; 60-byte frames (64 on the wire)"
        ),
    ));
    Ok(figures)
}

/// "backend shares 33.1/33.4/33.5%" over all runs, when the sink counted per backend.
fn share_note(runs: &[Run], slots: u32) -> String {
    if slots == 0 {
        return String::new();
    }
    let mut per = vec![0u64; slots as usize];
    for r in runs {
        for (i, c) in r.per_slot.iter().enumerate() {
            per[i] += c;
        }
    }
    let total: u64 = per.iter().sum();
    let shares: Vec<String> = per
        .iter()
        .map(|c| format!("{:.1}", 100.0 * *c as f64 / total.max(1) as f64))
        .collect();
    format!("backend shares {}%", shares.join("/"))
}

#[cfg(test)]
mod tests {
    /// What the rate part checks before it measures, as a test: each generator run once (not
    /// live) per chosen counter value makes the template frame with the flow's address (and
    /// port), and its lengths and checksums verify (etherparse).
    #[test]
    fn generators_make_the_frames_they_must() {
        crate::require_root();
        let mut rig = super::Rig::new().expect("the rate part's rig");
        // A test run runs on the calling thread's CPU: the counter slot set is that CPU's.
        let _pinned = crate::sys::Pinned::to(0).expect("pinning to CPU 0");
        rig.check_generators(0).expect("the generators' frames");
    }

    /// The toy balancer (the many-clients part's second reference) sends a frame to its VIP
    /// back out to one of its backends' MACs, the same one every time for a flow, spreads the
    /// walk's clients over all three, and lets a frame to another address pass unchanged.
    #[test]
    fn toy_balancer_spreads_clients_and_passes_the_rest() {
        use super::*;
        crate::require_root();
        let macs: Vec<[u8; 6]> = (0..3).map(backend_mac).collect();
        let toy = TestProg::toy(VIP, &macs, L0_MAC, 7).expect("loading the toy balancer");
        let mut seen = [0u32; 3];
        for w in 0..300 {
            let mut f = template(Stream::UdpClients(300)).0;
            f[26..30].copy_from_slice(&client(w).octets());
            let (action, out) = toy.test_run_once(&f).expect("a test run of the toy");
            assert_eq!(action, XDP_TX as u32, "client {w}");
            assert_eq!(out[6..12], L0_MAC, "client {w}: source MAC");
            assert_eq!(out[12..], f[12..], "client {w}: only the MACs change");
            let i = macs
                .iter()
                .position(|m| out[0..6] == m[..])
                .unwrap_or_else(|| panic!("client {w}: MAC {:02x?} is no backend's", &out[0..6]));
            assert_eq!(
                toy.test_run_once(&f).unwrap().1,
                out,
                "client {w}: same backend"
            );
            seen[i] += 1;
        }
        assert!(
            seen.iter().all(|&c| c > 60),
            "300 clients over 3 backends: {seen:?}"
        );
        let mut other = template(Stream::UdpClients(300)).0;
        other[30..34].copy_from_slice(&[203, 0, 113, 11]);
        let (action, out) = toy.test_run_once(&other).unwrap();
        assert_eq!(
            (action, &out[..]),
            (2, &other[..]),
            "another destination passes"
        );
    }
}
