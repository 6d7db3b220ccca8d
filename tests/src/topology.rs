//! The test topology: one L2 segment (a bridge in its own "switch" namespace) joining a load
//! balancer namespace, backend namespaces running nginx, and client namespaces.
//!
//! Addressing (all indices are 1-based, like the names and the `backend N` bodies):
//!
//! | host        | namespace      | eth0 IPv4        | eth0 IPv6 (/64)      | eth0 MAC            | switch port |
//! |-------------|----------------|------------------|----------------------|---------------------|-------------|
//! | LB          | `PREFIX-lb`    | 192.0.2.2/24     | 2001:db8::2          | 02:00:00:00:0a:02   | `lb`        |
//! | backend i   | `PREFIX-bI`    | 192.0.2.(10+i)   | 2001:db8::(10+i)     | 02:00:00:00:0b:0i   | `bI`        |
//! | client i    | `PREFIX-cI`    | 192.0.2.(100+i)  | 2001:db8::(100+i)    | 02:00:00:00:0c:0i   | `cI`        |
//! | switch      | `PREFIX-sw`    | bridge `br0`     |                      |                     |             |
//!
//! IPv6 addresses are "hex-named" after the IPv4 ones: the decimal digits of the last IPv4
//! octet are written as the last IPv6 group, so backend 1 is 2001:db8::11 (192.0.2.11) and
//! client 2 is 2001:db8::102 (192.0.2.102). Every host also has its EUI-64 link-local address.
//!
//! Client i's extra source addresses (/32 on its `lo`): with M clients, the 198.51.100.0/24
//! block is cut into `B = 256 / M.next_power_of_two()` addresses per client, and client i
//! holds `198.51.100.(B*(i-1) + 1) ..= 198.51.100.(B*(i-1) + K)` (K = addresses per client,
//! at most B - 2). For M = 2: client 1 has .1..=.40, client 2 has .129..=.168. Backends and the
//! LB route each client's block (198.51.100.(B*(i-1))/(24+log2 M')) via 192.0.2.(100+i).
//!
//! Client i also holds K extra IPv6 source addresses (/128 on its `lo`), hex-named too:
//! `2001:db8:cI::1 ..= 2001:db8:cI::K` with I and each k written in decimal digits, e.g. client
//! 1's 40th is 2001:db8:c1::40 and client 12's first is 2001:db8:c12::1. Backends and the LB
//! route each client's block 2001:db8:cI::/48 via 2001:db8::(100+i).
//!
//! Every IPv6 address is added with `nodad`, and every host has `accept_dad=0` and
//! `accept_ra=0` (so no address, link-local ones included, is ever tentative, and no host sends
//! router solicitations): addresses are usable as soon as `Topology::new` returns.
//!
//! VIPs (`TopologyOptions::vips`, either family) are held by every backend on `lo` (/32 or
//! /128) and routed by the clients via the LB's address of the VIP's family. Backends do not
//! answer ARP for an IPv4 VIP (`arp_ignore=1`, `arp_announce=2`); for IPv6 nothing is needed:
//! Linux answers a neighbour solicitation only for addresses on the interface it arrived on
//! (or proxied ones), never for one held on `lo` (checked by the harness tests).
//!
//! The switch namespace has IPv6 disabled, so the bridge and its ports hold no addresses and
//! send nothing of their own; the bridge still forwards IPv6 frames (it works at L2). Its
//! multicast snooping is off, so neighbour solicitations are always flooded.
//!
//! PREFIX is `lbt<pid>x<n>` (n counts topologies made by this process), so neither parallel
//! test threads nor concurrent processes collide.
//!
//! ## A backend side (`TopologyOptions::backend_side`)
//!
//! Backends can also sit on a segment of their own, which the LB reaches by a second
//! interface, `eth1`, on a bridge `br1`. Behind that side segment, gateway routers join a far
//! segment (bridge `br2`) where more backends live. The LB forwards (IPv4 and IPv6) between its
//! segments, so backends answer clients through it (far backends through a gateway and then
//! it); clients route the side and far segments via the LB.
//!
//! | host              | namespace   | interface         | IPv4                 | IPv6 (/64)           |
//! |-------------------|-------------|-------------------|----------------------|----------------------|
//! | LB, side          | `PREFIX-lb` | `eth1` (`br1`)    | 203.0.113.129/26     | 2001:db8:b::129      |
//! | side backend k    | `PREFIX-bI` | `eth0` (`br1`)    | 203.0.113.(129+k)/26 | 2001:db8:b::(129+k)  |
//! | gateway g, side   | `PREFIX-gG` | `eth0` (`br1`)    | 203.0.113.(180+g)/26 | 2001:db8:b::(180+g)  |
//! | gateway g, far    | `PREFIX-gG` | `eth1` (`br2`)    | 203.0.113.(192+g)/26 | 2001:db8:f::(192+g)  |
//! | far backend k     | `PREFIX-bI` | `eth0` (`br2`)    | 203.0.113.(210+k)/26 | 2001:db8:f::(210+k)  |
//!
//! Backends are numbered across segments: 1..=`backends` on the main segment, then the side's
//! `direct` ones, then the far ones (I = `backends` + k, or `backends` + `direct` + k), each
//! serving `backend I`. IPv6 addresses are hex-named after the last IPv4 octet. The LB routes
//! the far segment (203.0.113.192/26, 2001:db8:f::/64) via gateway 1; `route_backend_via` moves
//! one far backend's route to another gateway. Side backends and gateways route by default via
//! the LB, far backends via gateway 1.

use std::ffi::OsStr;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use aya::programs::xdp::XdpLink;

use crate::bpf::TestProg;
use crate::http::{self, FixedServer, HttpReply};
use crate::netns::{self, describe, run_checked, run_output};
use crate::{sys, wait_until};

/// Size of the file every backend serves at `GET /big`.
pub const BIG_FILE_SIZE: usize = 4 << 20;

/// Default connect timeout of the HTTP helpers.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default whole-exchange timeout of the HTTP helpers.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

static TOPOLOGY_COUNTER: AtomicUsize = AtomicUsize::new(0);
/// Serialises `ip netns add/del` within this process (the first `ip netns add` on a machine
/// sets up the /run/netns mount, which races when done concurrently).
static NETNS_LOCK: Mutex<()> = Mutex::new(());

static REAP_STALE: std::sync::Once = std::sync::Once::new();

/// The pid in a name made by this harness (`lbt<pid>x<n>...`), if it is one.
fn prefix_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("lbt")?;
    let (pid, rest) = rest.split_once('x')?;
    let n_end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    if n_end == 0 || !(n_end == rest.len() || rest[n_end..].starts_with('-')) {
        return None;
    }
    pid.parse().ok()
}

#[cfg(test)]
pub(crate) fn prefix_pid_for_tests(name: &str) -> Option<u32> {
    prefix_pid(name)
}

/// Removes what an earlier test process killed before its teardown (Ctrl-C, SIGKILL) left
/// behind: namespaces under /run/netns (and the processes still in them), work dirs in the
/// temp dir and bpffs folders under /sys/fs/bpf named `lbt<pid>x<n>...`, but only where no
/// process `<pid>` exists any more. Runs once per process, before its first topology.
fn reap_stale() {
    let dead = |name: &str| {
        prefix_pid(name).is_some_and(|pid| {
            pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
        })
    };
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| dead(n))
                    .collect()
            })
            .unwrap_or_default()
    };
    let _g = lock(&NETNS_LOCK);
    for ns in names(Path::new("/run/netns")) {
        eprintln!("lb-tests: removing namespace {ns} left behind by a dead test process");
        for pid in netns::pids_in_netns(&ns).unwrap_or_default() {
            let _ = sys::kill(pid, libc::SIGKILL);
        }
        if let Err(e) = run_checked(Command::new("ip").args(["netns", "del", &ns]), None) {
            eprintln!("lb-tests: {e:#}");
        }
    }
    for dir in [std::env::temp_dir(), PathBuf::from("/sys/fs/bpf")] {
        for name in names(&dir) {
            let path = dir.join(&name);
            eprintln!(
                "lb-tests: removing {} left behind by a dead test process",
                path.display()
            );
            if let Err(e) = std::fs::remove_dir_all(&path) {
                eprintln!("lb-tests: removing {}: {e}", path.display());
            }
        }
    }
}

/// What to build. `Default` gives 3 backends, 2 clients with 40 extra source addresses each,
/// no VIPs, nginx started on every backend.
#[derive(Debug, Clone)]
pub struct TopologyOptions {
    /// Number of backend namespaces (0..=89).
    pub backends: usize,
    /// Number of client namespaces (0..=99).
    pub clients: usize,
    /// Extra source addresses per client, from 198.51.100.0/24, and as many IPv6 ones from
    /// 2001:db8:cI::/48 (see the module docs).
    pub addresses_per_client: usize,
    /// VIPs held by every backend on `lo` (/32, or /128 for IPv6) and routed by the clients
    /// via the LB's address of the same family. An IPv6 VIP must not be one of the harness's
    /// own addresses, nor a link-local, multicast, loopback or unspecified address.
    pub vips: Vec<IpAddr>,
    /// Start nginx on every backend (and wait until it accepts connections).
    pub start_servers: bool,
    /// Backends on a segment of their own behind the LB's second interface, and behind
    /// gateway routers there (see the module docs).
    pub backend_side: Option<BackendSide>,
}

impl Default for TopologyOptions {
    fn default() -> Self {
        TopologyOptions {
            backends: 3,
            clients: 2,
            addresses_per_client: 40,
            vips: Vec::new(),
            start_servers: true,
            backend_side: None,
        }
    }
}

/// The backend side of a topology (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendSide {
    /// Backends directly on the side segment (0..=40).
    pub direct: usize,
    /// Gateway routers between the side segment and the far segment (0..=9).
    pub gateways: usize,
    /// Backends on the far segment, behind the gateways (0..=40; needs a gateway).
    pub behind: usize,
}

/// One link of a host added with `Topology::add_host`: a veth pair, `dev` in the host's
/// namespace, the other end a port of `bridge` (made when new) in the switch namespace.
#[derive(Debug, Clone)]
pub struct ExtraLink {
    pub bridge: &'static str,
    pub dev: &'static str,
    pub mac: String,
    pub addr: Ipv4Addr,
    pub plen: u8,
    pub addr6: Ipv6Addr,
}

/// A process started through the harness (`Topology::spawn_nsenter`). Cheap to copy; the
/// `Topology` owns the process itself and kills it on teardown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcHandle {
    idx: usize,
    pid: u32,
}

impl ProcHandle {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

/// A fixed-answer server started with `Topology::serve_fixed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerHandle {
    idx: usize,
}

struct Tracked {
    label: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Tracked {
    fn poll(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for `{}`", self.label))?;
        }
        Ok(self.status)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Lb,
    Backend(usize),
    Client(usize),
    Gateway(usize),
    /// A host added after setup (`Topology::add_host`).
    Extra(usize),
}

/// One veth pair of a host: `port` on `bridge` in the switch namespace, `dev` in the host's.
#[derive(Debug, Clone)]
struct Link {
    port: String,
    bridge: &'static str,
    dev: &'static str,
    mac: String,
}

impl Link {
    /// `ip -batch` lines, in the switch namespace, making this veth pair with its host end in
    /// namespace `ns`.
    fn plug_batch(&self, ns: &str) -> String {
        format!(
            "link add {port} type veth peer name {dev} netns {ns}\nlink set {port} master {br}\nlink set {port} up\n",
            port = self.port,
            dev = self.dev,
            br = self.bridge,
        )
    }

    /// `ip -batch` lines, in the host's namespace, giving the host end its MAC and bringing it up.
    fn host_batch(&self) -> String {
        format!(
            "link set {dev} address {mac}\nlink set {dev} up\n",
            dev = self.dev,
            mac = self.mac
        )
    }
}

/// An address pair of a host and the device holding it.
#[derive(Debug, Clone)]
struct IfAddr {
    dev: &'static str,
    addr: Ipv4Addr,
    plen: u8,
    addr6: Ipv6Addr,
}

impl IfAddr {
    /// `ip -batch` lines adding the pair to its device.
    fn batch(&self) -> String {
        format!(
            "addr add {}/{} dev {dev}\naddr add {}/64 dev {dev} nodad\n",
            self.addr,
            self.plen,
            self.addr6,
            dev = self.dev
        )
    }
}

#[derive(Debug, Clone)]
struct Host {
    role: Role,
    ns: String,
    /// The first is the host's main link: its port is `switch_port`'s, its MAC the host's.
    links: Vec<Link>,
    /// The first is the host's own address pair (`backend_addr`, `client_addr`, ...).
    addrs: Vec<IfAddr>,
}

impl Host {
    fn port(&self) -> &str {
        &self.links[0].port
    }

    fn mac(&self) -> &str {
        &self.links[0].mac
    }

    fn addr(&self) -> Ipv4Addr {
        self.addrs[0].addr
    }

    fn addr6(&self) -> Ipv6Addr {
        self.addrs[0].addr6
    }
}

type Cleanup = Box<dyn FnOnce() + Send>;

/// A live topology. Everything it made (namespaces, veths, processes, servers, the work
/// directory) is removed when it is dropped, including while a test panics, and when
/// `Topology::new` fails half-way.
pub struct Topology {
    prefix: String,
    opts: TopologyOptions,
    /// Backends on every segment.
    n_backends: usize,
    work_dir: PathBuf,
    block: usize,
    switch_ns: String,
    hosts: Vec<Host>,
    created_ns: Vec<String>,
    /// Bridges made so far in the switch namespace.
    bridges: Vec<&'static str>,
    work_dir_created: bool,
    xdp_links: Vec<XdpLink>,
    procs: Mutex<Vec<Tracked>>,
    nginx: Mutex<Vec<Option<ProcHandle>>>,
    servers: Mutex<Vec<FixedServer>>,
    cleanups: Mutex<Vec<Cleanup>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const LB_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const LB_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// The backend side's and the far segment's prefixes (see the module docs).
const SIDE_NET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 128);
const FAR_NET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 192);
const SIDE_PLEN: u8 = 26;
const SIDE6: u16 = 0xb;
const FAR6: u16 = 0xf;
/// Last octets on the side and far segments.
const SIDE_LB: u8 = 129;
const SIDE_GATEWAY: u8 = 180;
const FAR_GATEWAY: u8 = 192;
const FAR_BACKEND: u8 = 210;

/// 203.0.113.`octet` and 2001:db8:`net6`::`octet` (hex-named).
fn side_pair(octet: u8, net6: u16) -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::new(203, 0, 113, octet),
        Ipv6Addr::new(0x2001, 0xdb8, net6, 0, 0, 0, 0, hex_named(octet as usize)),
    )
}

/// Whether `a` lies in the /26 starting at `net`.
fn in_net(a: Ipv4Addr, net: Ipv4Addr) -> bool {
    u32::from(a) & !0x3f == u32::from(net)
}

/// The IPv6 group written with the decimal digits of `n` (at most 4 of them): 11 -> 0x11.
fn hex_named(n: usize) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).expect("at most 4 decimal digits")
}

/// 2001:db8::`n`, hex-named (see the module docs).
fn harness_addr6(n: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, hex_named(n))
}

/// The third group of client `i`'s IPv6 source block: "cI" read as hex.
fn client_block6(i: usize) -> u16 {
    u16::from_str_radix(&format!("c{i}"), 16).expect("at most 3 decimal digits")
}

/// Every host of the topology `opts` describes, with its links and addresses (see the module
/// docs), in order: LB, backends, clients, gateways.
fn plan_hosts(prefix: &str, opts: &TopologyOptions) -> Vec<Host> {
    let link = |port: String, bridge, dev, mac: String| Link {
        port,
        bridge,
        dev,
        mac,
    };
    let host = |role, ns: String, links, dev, addr: Ipv4Addr, plen, addr6: Ipv6Addr| Host {
        role,
        ns,
        links,
        addrs: vec![IfAddr {
            dev,
            addr,
            plen,
            addr6,
        }],
    };
    let mut lb = host(
        Role::Lb,
        format!("{prefix}-lb"),
        vec![link("lb".into(), "br0", "eth0", "02:00:00:00:0a:02".into())],
        "eth0",
        LB_ADDR,
        24,
        LB_ADDR6,
    );
    let side = opts.backend_side.clone().unwrap_or_default();
    if opts.backend_side.is_some() {
        lb.links.push(link(
            "lb1".into(),
            "br1",
            "eth1",
            "02:00:00:00:0a:03".into(),
        ));
        let (addr, addr6) = side_pair(SIDE_LB, SIDE6);
        lb.addrs.push(IfAddr {
            dev: "eth1",
            addr,
            plen: SIDE_PLEN,
            addr6,
        });
    }
    let mut hosts = vec![lb];
    let backend = |i: usize, bridge, (addr, addr6): (Ipv4Addr, Ipv6Addr), plen| {
        host(
            Role::Backend(i),
            format!("{prefix}-b{i}"),
            vec![link(
                format!("b{i}"),
                bridge,
                "eth0",
                format!("02:00:00:00:0b:{i:02x}"),
            )],
            "eth0",
            addr,
            plen,
            addr6,
        )
    };
    for i in 1..=opts.backends {
        let main = (
            Ipv4Addr::new(192, 0, 2, (10 + i).min(255) as u8),
            harness_addr6((10 + i).min(9999)),
        );
        hosts.push(backend(i, "br0", main, 24));
    }
    for k in 1..=side.direct {
        let pair = side_pair(SIDE_LB + k.min(50) as u8, SIDE6);
        hosts.push(backend(opts.backends + k, "br1", pair, SIDE_PLEN));
    }
    for k in 1..=side.behind {
        let pair = side_pair(FAR_BACKEND + k.min(45) as u8, FAR6);
        hosts.push(backend(
            opts.backends + side.direct + k,
            "br2",
            pair,
            SIDE_PLEN,
        ));
    }
    for i in 1..=opts.clients {
        hosts.push(host(
            Role::Client(i),
            format!("{prefix}-c{i}"),
            vec![link(
                format!("c{i}"),
                "br0",
                "eth0",
                format!("02:00:00:00:0c:{i:02x}"),
            )],
            "eth0",
            Ipv4Addr::new(192, 0, 2, (100 + i).min(255) as u8),
            24,
            harness_addr6((100 + i).min(9999)),
        ));
    }
    for g in 1..=side.gateways {
        let (addr, addr6) = side_pair(SIDE_GATEWAY + g.min(9) as u8, SIDE6);
        let mut h = host(
            Role::Gateway(g),
            format!("{prefix}-g{g}"),
            vec![
                link(
                    format!("g{g}"),
                    "br1",
                    "eth0",
                    format!("02:00:00:00:0d:{g:02x}"),
                ),
                link(
                    format!("g{g}f"),
                    "br2",
                    "eth1",
                    format!("02:00:00:00:0e:{g:02x}"),
                ),
            ],
            "eth0",
            addr,
            SIDE_PLEN,
            addr6,
        );
        let (addr, addr6) = side_pair(FAR_GATEWAY + g.min(9) as u8, FAR6);
        h.addrs.push(IfAddr {
            dev: "eth1",
            addr,
            plen: SIDE_PLEN,
            addr6,
        });
        hosts.push(h);
    }
    hosts
}

impl Topology {
    /// Builds the topology described by `opts` (see the module docs for names and
    /// addresses). Needs root. On error, whatever was already made is removed.
    pub fn new(opts: TopologyOptions) -> Result<Topology> {
        if !sys::is_root() {
            bail!("{}", crate::ROOT_MESSAGE);
        }
        REAP_STALE.call_once(reap_stale);
        let n = TOPOLOGY_COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("lbt{}x{}", std::process::id(), n);
        let block = 256 / opts.clients.max(1).next_power_of_two();
        let hosts = plan_hosts(&prefix, &opts);
        let n_backends = hosts
            .iter()
            .filter(|h| matches!(h.role, Role::Backend(_)))
            .count();
        let mut t = Topology {
            work_dir: std::env::temp_dir().join(&prefix),
            switch_ns: format!("{prefix}-sw"),
            prefix,
            block,
            nginx: Mutex::new(vec![None; n_backends]),
            n_backends,
            opts,
            hosts,
            created_ns: Vec::new(),
            bridges: Vec::new(),
            work_dir_created: false,
            xdp_links: Vec::new(),
            procs: Mutex::new(Vec::new()),
            servers: Mutex::new(Vec::new()),
            cleanups: Mutex::new(Vec::new()),
        };
        // On error `t` is dropped here, which tears down whatever setup made.
        t.setup()
            .with_context(|| format!("setting up test topology {}", t.prefix))?;
        Ok(t)
    }

    fn setup(&mut self) -> Result<()> {
        self.validate()?;
        if self.work_dir.exists() {
            std::fs::remove_dir_all(&self.work_dir)
                .with_context(|| format!("removing stale work dir {}", self.work_dir.display()))?;
        }
        std::fs::create_dir_all(self.work_dir.join("logs"))
            .with_context(|| format!("creating work dir {}", self.work_dir.display()))?;
        self.work_dir_created = true;
        std::fs::set_permissions(&self.work_dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", self.work_dir.display()))?;

        // Namespaces, and the sysctls that must be in place before eth0 appears.
        let sw = self.switch_ns.clone();
        self.add_netns(&sw)?;
        let sw_sysctls = kv(&[
            ("net.bridge.bridge-nf-call-iptables", "0"),
            ("net.bridge.bridge-nf-call-ip6tables", "0"),
            ("net.bridge.bridge-nf-call-arptables", "0"),
            // The switch needs no addresses of its own: keep it quiet on the wire. The bridge
            // forwards IPv6 frames all the same (L2; see the module docs).
            ("net.ipv6.conf.all.disable_ipv6", "1"),
            ("net.ipv6.conf.default.disable_ipv6", "1"),
        ]);
        netns::set_sysctls(&sw, &sw_sysctls, true)?;
        for h in self.hosts.clone() {
            self.add_netns(&h.ns)?;
            netns::set_sysctls(&h.ns, &self.sysctls(&h, "default"), false)?;
        }

        self.plug(&self.hosts.clone())?;

        if self.n_backends > 0 {
            self.write_backend_files()?;
        }
        if self.opts.start_servers {
            for i in 1..=self.n_backends {
                self.spawn_nginx(i)?;
            }
            for i in 1..=self.n_backends {
                self.wait_backend_ready(i)?;
            }
        }
        Ok(())
    }

    /// Plugs `hosts` (their namespaces exist) into the switch: the bridges they need that do
    /// not exist yet, their veth pairs (made in the switch namespace with the host end put
    /// straight into the host's namespace), then on each host its sysctls, MACs, addresses and
    /// routes, no TX checksum offload, and XDP_PASS on every new switch-side end.
    fn plug(&mut self, hosts: &[Host]) -> Result<()> {
        let sw = self.switch_ns.clone();
        // Multicast snooping off: neighbour solicitations (to solicited-node groups) are
        // flooded to every port whatever MLD reports the bridge has seen.
        let mut batch = String::new();
        if self.bridges.is_empty() {
            batch.push_str("link set lo up\n");
        }
        for l in hosts.iter().flat_map(|h| &h.links) {
            if !self.bridges.contains(&l.bridge) {
                self.bridges.push(l.bridge);
                batch.push_str(&format!(
                    "link add {br} type bridge mcast_snooping 0\nlink set {br} up\n",
                    br = l.bridge
                ));
            }
        }
        for h in hosts {
            for l in &h.links {
                batch.push_str(&l.plug_batch(&h.ns));
            }
        }
        ip_batch(&sw, &batch)?;

        for h in hosts {
            for l in &h.links {
                netns::set_sysctls(&h.ns, &self.sysctls(h, l.dev), false)?;
            }
            netns::set_sysctls(&h.ns, &kv(&[("net.ipv4.conf.lo.rp_filter", "0")]), false)?;
            ip_batch(&h.ns, &self.host_batch(h))?;
            for l in &h.links {
                ethtool(&h.ns, &["-K", l.dev, "tx", "off"])?;
            }
        }

        // XDP_PASS on every switch-side veth end, so that frames an LB sends back with
        // XDP_TX are not dropped by the receiving veth (see TOOLCHAIN.md).
        let ports: Vec<String> = hosts
            .iter()
            .flat_map(|h| h.links.iter().map(|l| l.port.clone()))
            .collect();
        let mut pass = TestProg::pass().context("loading the XDP_PASS program")?;
        let links = netns::in_netns(&sw, || {
            let mut links = Vec::new();
            for p in &ports {
                let idx = sys::if_nametoindex(p)
                    .with_context(|| format!("ifindex of {p} in namespace {sw}"))?;
                links.push(
                    pass.attach(idx)
                        .with_context(|| format!("attaching XDP_PASS to {p} in {sw}"))?,
                );
            }
            Ok(links)
        })?;
        self.xdp_links.extend(links);
        Ok(())
    }

    /// Adds a host to the built topology: namespace `PREFIX-NAME`, with one veth pair per
    /// link (the first's switch port is called NAME, the others NAMEeK), each with its MAC
    /// and address pair (IPv6 /64, `nodad`), plugged as the setup's own hosts are (sysctls
    /// of a plain host: no rp_filter, no DAD, no router advertisements; no TX checksum
    /// offload; XDP_PASS on the switch's end). A new bridge is made when a link names one.
    /// Routes, forwarding and the rest are the caller's. Returns the namespace; it goes at
    /// teardown like every other.
    pub fn add_host(&mut self, name: &str, links: &[ExtraLink]) -> Result<String> {
        if links.is_empty() {
            bail!("host {name}: no links");
        }
        let extra = self
            .hosts
            .iter()
            .filter(|h| matches!(h.role, Role::Extra(_)))
            .count();
        let ns = format!("{}-{name}", self.prefix);
        let host = Host {
            role: Role::Extra(extra + 1),
            ns: ns.clone(),
            links: links
                .iter()
                .enumerate()
                .map(|(k, l)| Link {
                    port: if k == 0 {
                        name.to_string()
                    } else {
                        format!("{name}e{k}")
                    },
                    bridge: l.bridge,
                    dev: l.dev,
                    mac: l.mac.clone(),
                })
                .collect(),
            addrs: links
                .iter()
                .map(|l| IfAddr {
                    dev: l.dev,
                    addr: l.addr,
                    plen: l.plen,
                    addr6: l.addr6,
                })
                .collect(),
        };
        if self.hosts.iter().any(|h| h.ns == ns) {
            bail!("host {name} exists already");
        }
        self.add_netns(&ns)?;
        netns::set_sysctls(&ns, &self.sysctls(&host, "default"), false)?;
        self.hosts.push(host.clone());
        self.plug(&[host])
            .with_context(|| format!("adding host {name} to topology {}", self.prefix))?;
        Ok(ns)
    }

    fn validate(&self) -> Result<()> {
        let o = &self.opts;
        if o.backends > 89 {
            bail!(
                "at most 89 backends (192.0.2.11..=99), asked for {}",
                o.backends
            );
        }
        if o.clients > 99 {
            bail!(
                "at most 99 clients (192.0.2.101..=199), asked for {}",
                o.clients
            );
        }
        if o.clients > 0 && o.addresses_per_client > self.block - 2 {
            bail!(
                "at most {} addresses per client with {} clients, asked for {}",
                self.block - 2,
                o.clients,
                o.addresses_per_client
            );
        }
        if let Some(side) = &o.backend_side {
            if side.direct > 40 || side.gateways > 9 || side.behind > 40 {
                bail!(
                    "backend side: at most 40 direct backends, 9 gateways and 40 backends behind them, asked for {side:?}"
                );
            }
            if side.behind > 0 && side.gateways == 0 {
                bail!("backend side: {} backends behind no gateway", side.behind);
            }
        }
        for v in &o.vips {
            let IpAddr::V6(v6) = v else { continue };
            if v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
            {
                bail!("IPv6 VIP {v}: not a unicast global address");
            }
            let taken = self
                .hosts
                .iter()
                .any(|h| h.addrs.iter().any(|a| a.addr6 == *v6))
                || (1..=o.clients).any(|i| self.client_sources_v6(i).contains(v));
            if taken {
                bail!("IPv6 VIP {v}: already an address of a host of the harness");
            }
        }
        Ok(())
    }

    fn sysctls(&self, h: &Host, dev: &str) -> Vec<(String, String)> {
        let mut v = vec![(format!("net.ipv4.conf.{dev}.rp_filter"), "0".to_string())];
        if dev == "default" {
            v.push(("net.ipv4.conf.all.rp_filter".into(), "0".into()));
            // Routers: the LB between its segments, the gateways.
            let routes = match h.role {
                Role::Lb => self.opts.backend_side.is_some(),
                Role::Gateway(_) => true,
                _ => false,
            };
            if routes {
                v.push(("net.ipv4.ip_forward".into(), "1".into()));
                v.push(("net.ipv6.conf.all.forwarding".into(), "1".into()));
            }
        }
        let devs: &[&str] = if dev == "default" {
            &["all", "default"]
        } else {
            &[dev]
        };
        for d in devs {
            // No duplicate address detection (addresses usable at once, link-local ones
            // included), no router advertisements or solicitations.
            v.push((format!("net.ipv6.conf.{d}.accept_dad"), "0".into()));
            v.push((format!("net.ipv6.conf.{d}.accept_ra"), "0".into()));
            match h.role {
                // DSR: accept packets for the VIP held on lo, never answer ARP for it.
                Role::Backend(_) => {
                    v.push((format!("net.ipv4.conf.{d}.arp_ignore"), "1".into()));
                    v.push((format!("net.ipv4.conf.{d}.arp_announce"), "2".into()));
                }
                // ARP requests must come from 192.0.2.10x, not from an extra source on lo.
                Role::Client(_) => {
                    v.push((format!("net.ipv4.conf.{d}.arp_announce"), "2".into()));
                }
                Role::Lb | Role::Gateway(_) | Role::Extra(_) => {}
            }
        }
        v
    }

    fn host_batch(&self, h: &Host) -> String {
        let mut b = String::from("link set lo up\n");
        for l in &h.links {
            b.push_str(&l.host_batch());
        }
        for a in &h.addrs {
            b.push_str(&a.batch());
        }
        let default_via = |v4: Ipv4Addr, v6: Ipv6Addr| {
            format!("route add default via {v4}\nroute add default via {v6}\n")
        };
        let (lb_side, lb_side6) = side_pair(SIDE_LB, SIDE6);
        match h.role {
            Role::Backend(_) => {
                for v in &self.opts.vips {
                    match v {
                        IpAddr::V4(_) => b.push_str(&format!("addr add {v}/32 dev lo\n")),
                        IpAddr::V6(_) => b.push_str(&format!("addr add {v}/128 dev lo nodad\n")),
                    }
                }
                let a = h.addr();
                if in_net(a, SIDE_NET) {
                    b.push_str(&default_via(lb_side, lb_side6));
                } else if in_net(a, FAR_NET) {
                    let (gw, gw6) = side_pair(FAR_GATEWAY + 1, FAR6);
                    b.push_str(&default_via(gw, gw6));
                } else {
                    b.push_str(&self.client_block_routes());
                }
            }
            Role::Lb => {
                b.push_str(&self.client_block_routes());
                if self.gateways() > 0 {
                    let (gw, gw6) = side_pair(SIDE_GATEWAY + 1, SIDE6);
                    b.push_str(&format!(
                        "route add {FAR_NET}/{SIDE_PLEN} via {gw}\nroute add {}/64 via {gw6}\n",
                        Ipv6Addr::new(0x2001, 0xdb8, FAR6, 0, 0, 0, 0, 0)
                    ));
                }
            }
            Role::Client(i) => {
                for a in self.client_sources(i) {
                    b.push_str(&format!("addr add {a}/32 dev lo\n"));
                }
                for a in self.client_sources_v6(i) {
                    b.push_str(&format!("addr add {a}/128 dev lo nodad\n"));
                }
                for v in &self.opts.vips {
                    match v {
                        IpAddr::V4(_) => {
                            b.push_str(&format!("route add {v}/32 via {LB_ADDR} dev eth0\n"))
                        }
                        IpAddr::V6(_) => {
                            b.push_str(&format!("route add {v}/128 via {LB_ADDR6} dev eth0\n"))
                        }
                    }
                }
                if self.opts.backend_side.is_some() {
                    // The side and far segments (203.0.113.128/25 holds both).
                    b.push_str(&format!(
                        "route add {SIDE_NET}/25 via {LB_ADDR}\nroute add {}/64 via {LB_ADDR6}\nroute add {}/64 via {LB_ADDR6}\n",
                        Ipv6Addr::new(0x2001, 0xdb8, SIDE6, 0, 0, 0, 0, 0),
                        Ipv6Addr::new(0x2001, 0xdb8, FAR6, 0, 0, 0, 0, 0)
                    ));
                }
            }
            Role::Gateway(_) => b.push_str(&default_via(lb_side, lb_side6)),
            Role::Extra(_) => {}
        }
        b
    }

    fn client_block_routes(&self) -> String {
        if self.opts.addresses_per_client == 0 {
            return String::new();
        }
        let plen = 24
            + self
                .opts
                .clients
                .max(1)
                .next_power_of_two()
                .trailing_zeros();
        (1..=self.opts.clients)
            .map(|i| {
                format!(
                    "route add 198.51.100.{}/{plen} via 192.0.2.{} dev eth0\nroute add {}/48 via {} dev eth0\n",
                    self.block * (i - 1),
                    100 + i,
                    Ipv6Addr::new(0x2001, 0xdb8, client_block6(i), 0, 0, 0, 0, 0),
                    self.host(Role::Client(i)).addr6(),
                )
            })
            .collect()
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        let _g = lock(&NETNS_LOCK);
        if netns::netns_path(name).exists() {
            // Left behind by a dead process that had our pid: ours to remove.
            eprintln!("lb-tests: removing stale network namespace {name}");
            run_checked(Command::new("ip").args(["netns", "del", name]), None)?;
        }
        run_checked(Command::new("ip").args(["netns", "add", name]), None)?;
        self.created_ns.push(name.to_string());
        Ok(())
    }

    // ---- backends' nginx ---------------------------------------------------------------

    fn backend_dir(&self, i: usize) -> PathBuf {
        self.work_dir.join(format!("backend{i}"))
    }

    fn write_backend_files(&self) -> Result<()> {
        let www = self.work_dir.join("www");
        std::fs::create_dir_all(&www).with_context(|| format!("creating {}", www.display()))?;
        std::fs::write(www.join("big"), big_file_contents())
            .with_context(|| format!("writing {}", www.join("big").display()))?;
        for i in 1..=self.n_backends {
            let dir = self.backend_dir(i);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let conf = nginx_conf(&dir, &www, i);
            std::fs::write(dir.join("nginx.conf"), conf)
                .with_context(|| format!("writing {}/nginx.conf", dir.display()))?;
        }
        Ok(())
    }

    fn spawn_nginx(&self, i: usize) -> Result<()> {
        let dir = self.backend_dir(i);
        let mut cmd = Command::new("nginx");
        cmd.arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-e", "stderr"]);
        let h = self
            .spawn_nsenter(self.backend_ns(i), &cmd)
            .with_context(|| format!("starting nginx on backend {i}"))?;
        lock(&self.nginx)[i - 1] = Some(h);
        Ok(())
    }

    fn wait_backend_ready(&self, i: usize) -> Result<()> {
        let Some(h) = lock(&self.nginx)[i - 1] else {
            bail!("nginx of backend {i} was not started");
        };
        let dst = SocketAddr::new(self.backend_addr(i), 80);
        let ns = self.backend_ns(i).to_string();
        let mut exited = None;
        let r = wait_until(
            Duration::from_secs(10),
            &format!("nginx of backend {i} to accept connections"),
            || {
                if let Ok(Some(st)) = self.try_wait(h) {
                    exited = Some(st);
                    return true;
                }
                netns::in_netns(&ns, || {
                    Ok(sys::tcp_connect_from(
                        None,
                        dst,
                        Duration::from_millis(200),
                    )?)
                })
                .is_ok()
            },
        );
        if let Some(st) = exited {
            bail!(
                "nginx of backend {i} exited ({st}) at startup: {}",
                self.log_of(h).trim()
            );
        }
        r.with_context(|| format!("nginx log: {}", self.log_of(h).trim()))
    }

    /// Starts nginx on backend `i` (1-based) again and waits until it accepts connections.
    /// Fails when it is already running.
    pub fn start_backend_server(&self, i: usize) -> Result<()> {
        self.check_index("backend", i, self.n_backends);
        if self.backend_server_running(i) {
            bail!("nginx of backend {i} is already running");
        }
        if !self.backend_dir(i).join("nginx.conf").exists() {
            self.write_backend_files()?;
        }
        self.spawn_nginx(i)?;
        self.wait_backend_ready(i)
    }

    /// Stops nginx of backend `i` (1-based): SIGTERM, then SIGKILL if it has not exited
    /// within 5 s. Afterwards connections to it are refused. Stopping a stopped server is a
    /// no-op.
    pub fn stop_backend_server(&self, i: usize) -> Result<()> {
        self.check_index("backend", i, self.n_backends);
        let h = lock(&self.nginx)[i - 1].take();
        if let Some(h) = h {
            self.stop(h, Duration::from_secs(5))
                .with_context(|| format!("stopping nginx of backend {i}"))?;
        }
        Ok(())
    }

    /// Whether nginx of backend `i` (1-based) is running.
    pub fn backend_server_running(&self, i: usize) -> bool {
        self.check_index("backend", i, self.n_backends);
        let h = lock(&self.nginx)[i - 1];
        h.is_some_and(|h| matches!(self.try_wait(h), Ok(None)))
    }

    /// The file every backend serves at `GET /big` (`BIG_FILE_SIZE` bytes).
    pub fn big_file(&self) -> PathBuf {
        self.work_dir.join("www").join("big")
    }

    // ---- names, addresses --------------------------------------------------------------

    fn check_index(&self, what: &str, i: usize, n: usize) {
        assert!(
            (1..=n).contains(&i),
            "{what} index {i} out of range 1..={n} (indices are 1-based)"
        );
    }

    fn host(&self, role: Role) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.role == role)
            .unwrap_or_else(|| panic!("no host {role:?} in this topology"))
    }

    /// The per-run prefix of every name, e.g. `lbt1234x0`; namespaces are `PREFIX-...`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Names of every namespace this topology created (switch first).
    pub fn namespaces(&self) -> &[String] {
        &self.created_ns
    }

    /// Number of backends, on every segment.
    pub fn backends(&self) -> usize {
        self.n_backends
    }

    /// Number of gateway routers (on the backend side).
    pub fn gateways(&self) -> usize {
        self.opts.backend_side.as_ref().map_or(0, |s| s.gateways)
    }

    /// The interfaces the LB's XDP program goes on: `eth0`, and `eth1` with a backend side.
    pub fn lb_interfaces(&self) -> Vec<String> {
        self.host(Role::Lb)
            .links
            .iter()
            .map(|l| l.dev.to_string())
            .collect()
    }

    /// The LB's addresses on the backend side: 203.0.113.129 and 2001:db8:b::129.
    pub fn lb_side_addrs(&self) -> (IpAddr, IpAddr) {
        let (a, a6) = side_pair(SIDE_LB, SIDE6);
        (a.into(), a6.into())
    }

    /// Namespace of gateway `g` (1-based).
    pub fn gateway_ns(&self, g: usize) -> &str {
        self.check_index("gateway", g, self.gateways());
        &self.host(Role::Gateway(g)).ns
    }

    /// The addresses of gateway `g` (1-based) on the backend side (the LB's next hop towards the
    /// far segment): 203.0.113.(180+g) and 2001:db8:b::(180+g).
    pub fn gateway_addrs(&self, g: usize) -> (IpAddr, IpAddr) {
        self.check_index("gateway", g, self.gateways());
        let h = self.host(Role::Gateway(g));
        (h.addr().into(), h.addr6().into())
    }

    /// Routes backend `i` (1-based, on the far segment) from the LB via gateway `g`: a host
    /// route of each family (`ip route replace`), which takes precedence over the far segment's
    /// route via gateway 1.
    pub fn route_backend_via(&self, i: usize, g: usize) -> Result<()> {
        let (gw, gw6) = self.gateway_addrs(g);
        let batch = format!(
            "route replace {}/32 via {gw}\nroute replace {}/128 via {gw6}\n",
            self.backend_addr(i),
            self.backend_addr_v6(i)
        );
        ip_batch(self.lb_ns(), &batch)
    }

    /// Number of clients.
    pub fn clients(&self) -> usize {
        self.opts.clients
    }

    /// The VIPs the backends hold on `lo`.
    pub fn vips(&self) -> &[IpAddr] {
        &self.opts.vips
    }

    /// The switch namespace (holds the bridges `br0`, `br1`, `br2` and the switch-side veth ends).
    pub fn switch_ns(&self) -> &str {
        &self.switch_ns
    }

    /// The load balancer's namespace; its interface is `eth0` (192.0.2.2/24, 2001:db8::2/64).
    pub fn lb_ns(&self) -> &str {
        &self.host(Role::Lb).ns
    }

    /// Namespace of backend `i` (1-based).
    pub fn backend_ns(&self, i: usize) -> &str {
        self.check_index("backend", i, self.n_backends);
        &self.host(Role::Backend(i)).ns
    }

    /// Namespace of client `i` (1-based).
    pub fn client_ns(&self, i: usize) -> &str {
        self.check_index("client", i, self.opts.clients);
        &self.host(Role::Client(i)).ns
    }

    /// Name of the switch-side veth end (in `switch_ns()`) whose peer is `eth0` of namespace
    /// `ns`, e.g. `lb`, `b1`, `c2`.
    pub fn switch_port(&self, ns: &str) -> Option<&str> {
        self.hosts.iter().find(|h| h.ns == ns).map(|h| h.port())
    }

    /// `/run/netns/NAME` of namespace `ns` (for `nsenter --net=...`).
    pub fn netns_path(&self, ns: &str) -> PathBuf {
        netns::netns_path(ns)
    }

    /// Per-run directory (mode 0755, removed on teardown) where tests may write configs and
    /// state; process logs are under `logs/`.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// The LB's address, 192.0.2.2.
    pub fn lb_addr(&self) -> IpAddr {
        IpAddr::V4(LB_ADDR)
    }

    /// The LB's eth0 MAC address.
    pub fn lb_mac(&self) -> &str {
        self.host(Role::Lb).mac()
    }

    /// Address of backend `i` (1-based): 192.0.2.(10+i) on the main segment (see the module docs
    /// for the others).
    pub fn backend_addr(&self, i: usize) -> IpAddr {
        self.check_index("backend", i, self.n_backends);
        IpAddr::V4(self.host(Role::Backend(i)).addr())
    }

    /// eth0 MAC of backend `i` (1-based): 02:00:00:00:0b:II (I in hex).
    pub fn backend_mac(&self, i: usize) -> &str {
        self.check_index("backend", i, self.n_backends);
        self.host(Role::Backend(i)).mac()
    }

    /// eth0 address of client `i` (1-based): 192.0.2.(100+i).
    pub fn client_addr(&self, i: usize) -> IpAddr {
        self.check_index("client", i, self.opts.clients);
        IpAddr::V4(self.host(Role::Client(i)).addr())
    }

    /// The extra source addresses of client `i` (1-based), see the module docs.
    pub fn client_sources(&self, i: usize) -> Vec<IpAddr> {
        self.check_index("client", i, self.opts.clients);
        client_block_sources(self.block, i, self.opts.addresses_per_client)
    }

    /// The extra source addresses of every client, client 1's first.
    pub fn all_client_sources(&self) -> Vec<IpAddr> {
        (1..=self.opts.clients)
            .flat_map(|i| self.client_sources(i))
            .collect()
    }

    /// The LB's IPv6 address, 2001:db8::2.
    pub fn lb_addr_v6(&self) -> IpAddr {
        IpAddr::V6(LB_ADDR6)
    }

    /// IPv6 address of backend `i` (1-based): 2001:db8::(10+i), hex-named (backend 1 is
    /// 2001:db8::11).
    pub fn backend_addr_v6(&self, i: usize) -> IpAddr {
        self.check_index("backend", i, self.n_backends);
        IpAddr::V6(self.host(Role::Backend(i)).addr6())
    }

    /// eth0 IPv6 address of client `i` (1-based): 2001:db8::(100+i), hex-named.
    pub fn client_addr_v6(&self, i: usize) -> IpAddr {
        self.check_index("client", i, self.opts.clients);
        IpAddr::V6(self.host(Role::Client(i)).addr6())
    }

    /// The extra IPv6 source addresses of client `i` (1-based): 2001:db8:cI::1 ..= ::K,
    /// hex-named (see the module docs).
    pub fn client_sources_v6(&self, i: usize) -> Vec<IpAddr> {
        self.check_index("client", i, self.opts.clients);
        let block = client_block6(i);
        (1..=self.opts.addresses_per_client)
            .map(|k| {
                IpAddr::V6(Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    block,
                    0,
                    0,
                    0,
                    0,
                    hex_named(k),
                ))
            })
            .collect()
    }

    /// The extra IPv6 source addresses of every client, client 1's first.
    pub fn all_client_sources_v6(&self) -> Vec<IpAddr> {
        (1..=self.opts.clients)
            .flat_map(|i| self.client_sources_v6(i))
            .collect()
    }

    /// The client (1-based index) that owns `src`: an eth0 address or an extra source, of
    /// either family.
    pub fn client_of(&self, src: IpAddr) -> Option<usize> {
        (1..=self.opts.clients).find(|&i| match src {
            IpAddr::V4(_) => self.client_addr(i) == src || self.client_sources(i).contains(&src),
            IpAddr::V6(_) => {
                self.client_addr_v6(i) == src || self.client_sources_v6(i).contains(&src)
            }
        })
    }

    /// Namespace of the client that owns `src`.
    pub fn client_ns_of(&self, src: IpAddr) -> Option<&str> {
        self.client_of(src).map(|i| self.client_ns(i))
    }

    // ---- running things in namespaces ------------------------------------------------------

    /// Runs `f` on a short-lived thread inside namespace `ns` (see `netns::in_netns`).
    /// Sockets made inside keep belonging to `ns` and can be returned.
    pub fn in_netns<R: Send>(&self, ns: &str, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
        netns::in_netns(ns, f)
    }

    /// The index of interface `dev` in namespace `ns`.
    pub fn ifindex(&self, ns: &str, dev: &str) -> Result<u32> {
        netns::in_netns(ns, || {
            sys::if_nametoindex(dev).with_context(|| format!("ifindex of {dev} in namespace {ns}"))
        })
    }

    /// Sets sysctl `key` (dotted) to `value` inside namespace `ns`.
    pub fn sysctl(&self, ns: &str, key: &str, value: &str) -> Result<()> {
        netns::set_sysctls(ns, &kv(&[(key, value)]), false)
    }

    /// `ip netns exec NS ARGS...`: runs to completion and returns its output whatever the
    /// exit status (fails only if it cannot be started). Note that `ip netns exec` also
    /// remounts /sys (and so hides the root's bpffs): for lbd/lbctl use `nsenter_output`.
    pub fn exec<S: AsRef<OsStr>>(&self, ns: &str, args: &[S]) -> Result<Output> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(args);
        run_output(&mut cmd, None)
    }

    /// Like `exec`, but fails (naming the command and its stderr) unless it exits 0;
    /// returns stdout.
    pub fn exec_ok<S: AsRef<OsStr>>(&self, ns: &str, args: &[S]) -> Result<String> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(args);
        run_checked(&mut cmd, None)
    }

    /// Runs `cmd` to completion with only its network namespace changed to `ns`
    /// (`nsenter --net=/run/netns/NS -- ...`; program, arguments, environment and working
    /// directory are taken from `cmd`). Returns the output whatever the exit status.
    pub fn nsenter_output(&self, ns: &str, cmd: &Command) -> Result<Output> {
        run_output(&mut netns::nsenter_command(ns, cmd), None)
    }

    /// Starts `cmd` in the background with only its network namespace changed to `ns`
    /// (`nsenter --net=/run/netns/NS -- prog args`, so it keeps the root's mount namespace and
    /// bpffs). Program, arguments, environment and working directory come from `cmd`; its
    /// stdin is /dev/null and stdout+stderr go to a log file (`log_of`, `log_path`). The
    /// process is tracked: teardown sends SIGTERM, then SIGKILL after 2 s.
    pub fn spawn_nsenter(&self, ns: &str, cmd: &Command) -> Result<ProcHandle> {
        if !netns::netns_path(ns).exists() {
            bail!("no network namespace {ns}");
        }
        let label = describe(cmd);
        let mut procs = lock(&self.procs);
        let idx = procs.len();
        let base = Path::new(cmd.get_program())
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "proc".into());
        let log = self
            .work_dir
            .join("logs")
            .join(format!("{idx:02}-{base}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("duplicating {}", log.display()))?;
        let mut c = netns::nsenter_command(ns, cmd);
        c.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = c
            .spawn()
            .with_context(|| format!("starting `{label}` in namespace {ns}"))?;
        let pid = child.id();
        procs.push(Tracked {
            label: format!("{label} (in {ns}, pid {pid})"),
            child,
            log,
            status: None,
        });
        Ok(ProcHandle { idx, pid })
    }

    fn with_proc<R>(&self, h: ProcHandle, f: impl FnOnce(&mut Tracked) -> R) -> R {
        let mut procs = lock(&self.procs);
        let p = procs
            .get_mut(h.idx)
            .unwrap_or_else(|| panic!("{h:?} does not belong to this topology"));
        f(p)
    }

    /// The exit status of `h` if it has exited, without waiting.
    pub fn try_wait(&self, h: ProcHandle) -> Result<Option<ExitStatus>> {
        self.with_proc(h, |p| p.poll())
    }

    /// Whether `h` is still running.
    pub fn is_running(&self, h: ProcHandle) -> bool {
        matches!(self.try_wait(h), Ok(None))
    }

    /// Sends signal `sig` (e.g. `libc::SIGHUP`) to `h`; an error if it has already exited.
    pub fn signal(&self, h: ProcHandle, sig: i32) -> Result<()> {
        self.with_proc(h, |p| {
            if let Some(st) = p.poll()? {
                bail!("cannot signal `{}`: it already exited ({st})", p.label);
            }
            sys::kill(h.pid, sig).with_context(|| format!("kill -{sig} `{}`", p.label))
        })
    }

    /// Stops `h`: SIGTERM, then waits up to `deadline` for it to exit and returns its exit
    /// status. If it is still running at the deadline it is killed with SIGKILL and an error
    /// is returned. A process that had already exited just returns its status.
    pub fn stop(&self, h: ProcHandle, deadline: Duration) -> Result<ExitStatus> {
        if let Some(st) = self.try_wait(h)? {
            return Ok(st);
        }
        // It may exit between the check and the kill: ESRCH is harmless then (still unreaped,
        // so the pid cannot have been reused).
        let _ = sys::kill(h.pid, libc::SIGTERM);
        let end = Instant::now() + deadline;
        loop {
            if let Some(st) = self.try_wait(h)? {
                return Ok(st);
            }
            if Instant::now() >= end {
                let label = self.with_proc(h, |p| p.label.clone());
                let st = self.kill(h)?;
                bail!("`{label}` did not exit within {deadline:?} of SIGTERM; killed ({st})");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills `h` with SIGKILL and reaps it; returns its exit status.
    pub fn kill(&self, h: ProcHandle) -> Result<ExitStatus> {
        self.with_proc(h, |p| {
            if let Some(st) = p.poll()? {
                return Ok(st);
            }
            let _ = p.child.kill();
            let st = p
                .child
                .wait()
                .with_context(|| format!("waiting for `{}`", p.label))?;
            p.status = Some(st);
            Ok(st)
        })
    }

    /// Waits up to `deadline` for `h` to exit by itself; returns its status, or an error
    /// (leaving it running) at the deadline.
    pub fn wait_exit(&self, h: ProcHandle, deadline: Duration) -> Result<ExitStatus> {
        let end = Instant::now() + deadline;
        loop {
            if let Some(st) = self.try_wait(h)? {
                return Ok(st);
            }
            if Instant::now() >= end {
                let label = self.with_proc(h, |p| p.label.clone());
                bail!("`{label}` still running after {deadline:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Path of the file receiving stdout and stderr of `h`.
    pub fn log_path(&self, h: ProcHandle) -> PathBuf {
        self.with_proc(h, |p| p.log.clone())
    }

    /// Everything `h` wrote to stdout and stderr so far.
    pub fn log_of(&self, h: ProcHandle) -> String {
        std::fs::read(self.log_path(h))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Registers `f` to run at teardown, after the tracked processes were stopped and before
    /// the namespaces are deleted (e.g. to run `lbd --cleanup`). Runs in reverse order of
    /// registration; a panic inside is reported and ignored.
    pub fn on_teardown(&self, f: impl FnOnce() + Send + 'static) {
        lock(&self.cleanups).push(Box::new(f));
    }

    // ---- interfaces that come and go ------------------------------------------------------

    /// Gives backend `i` (1-based) a new MAC on its main interface (a replaced NIC, a moved
    /// VM). Nothing is announced: neighbours keep the old MAC until they ask again.
    pub fn set_backend_mac(&self, i: usize, mac: &str) -> Result<()> {
        self.check_index("backend", i, self.n_backends);
        let h = self.host(Role::Backend(i));
        ip_batch(
            &h.ns,
            &format!("link set {} address {mac}\n", h.links[0].dev),
        )
    }

    /// Gives the LB namespace a new `eth0` after a test deleted it (as a driver reload or a
    /// recreated veth would): a new veth pair to the switch's `lb` port, with the same MAC,
    /// addresses, routes, sysctls and offloads as at setup. Returns the link of the XDP_PASS
    /// program on the switch's end (without which the veth may drop frames the LB sends back
    /// with XDP_TX): keep it as long as the port is used.
    pub fn recreate_lb_eth0(&self) -> Result<XdpLink> {
        let h = self.host(Role::Lb).clone();
        let l = &h.links[0];
        ip_batch(&self.switch_ns, &l.plug_batch(&h.ns))?;
        netns::set_sysctls(&h.ns, &self.sysctls(&h, l.dev), false)?;
        let mut batch = l.host_batch();
        for a in h.addrs.iter().filter(|a| a.dev == l.dev) {
            batch.push_str(&a.batch());
        }
        batch.push_str(&self.client_block_routes());
        ip_batch(&h.ns, &batch)?;
        ethtool(&h.ns, &["-K", l.dev, "tx", "off"])?;
        netns::attach_xdp(&self.switch_ns, &l.port, &mut TestProg::pass()?)
    }

    // ---- TCP and HTTP ----------------------------------------------------------------------

    /// Opens a TCP connection from namespace `ns`, bound to `src` (any address if `None`,
    /// port chosen by the kernel), to `dst`, giving up after `timeout`. The stream can then be
    /// used from any thread.
    pub fn connect_tcp(
        &self,
        ns: &str,
        src: Option<IpAddr>,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<TcpStream> {
        netns::in_netns(ns, || {
            sys::tcp_connect_from(src, dst, timeout).with_context(|| match src {
                Some(s) => format!("TCP connect {s} -> {dst} from namespace {ns}"),
                None => format!("TCP connect -> {dst} from namespace {ns}"),
            })
        })
    }

    /// Sends `payload` as one IP packet of protocol `proto` from namespace `ns` to `dst`, the
    /// IP header written by the kernel there (e.g. protocol 4 and an IPv4 packet as payload:
    /// IP-in-IP from that host).
    pub fn send_ip(&self, ns: &str, dst: IpAddr, proto: i32, payload: &[u8]) -> Result<()> {
        netns::in_netns(ns, || {
            sys::send_ip(dst, proto, payload)
                .with_context(|| format!("sending a protocol {proto} packet to {dst} from {ns}"))
        })
    }

    /// `GET path` (HTTP/1.0, `Connection: close`) from namespace `ns` with source address
    /// `src` to `dst` (IPv4 or IPv6, as `src`): connect timeout 2 s, whole exchange 10 s.
    /// Safe to call from many threads at once.
    pub fn http_get(
        &self,
        ns: &str,
        src: IpAddr,
        dst: SocketAddr,
        path: &str,
    ) -> Result<HttpReply> {
        self.http_get_with(ns, Some(src), dst, path, CONNECT_TIMEOUT, HTTP_TIMEOUT)
    }

    /// `http_get` with an optional source address and explicit timeouts.
    pub fn http_get_with(
        &self,
        ns: &str,
        src: Option<IpAddr>,
        dst: SocketAddr,
        path: &str,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<HttpReply> {
        let stream = self.connect_tcp(ns, src, dst, connect_timeout)?;
        let from = src.map(|s| s.to_string()).unwrap_or_else(|| ns.to_string());
        http::get_on_stream(stream, &dst.to_string(), path, timeout)
            .with_context(|| format!("GET http://{dst}{path} from {from}"))
    }

    /// `GET /` from the client owning `src` (with source `src`) to `dst` (e.g. a VIP and
    /// port), and returns N of the `backend N` body: the 1-based index of the backend that
    /// answered. Either family: `src` and `dst` must be of the same one.
    pub fn which_backend(&self, src: IpAddr, dst: SocketAddr) -> Result<usize> {
        let ns = self
            .client_ns_of(src)
            .ok_or_else(|| anyhow!("{src} is not an address of any client"))?;
        let reply = self.http_get(ns, src, dst, "/")?;
        if reply.status != 200 {
            bail!("GET http://{dst}/ from {src}: status {}", reply.status);
        }
        parse_backend(&reply.text()).ok_or_else(|| {
            anyhow!(
                "GET http://{dst}/ from {src}: unexpected body {:?}",
                reply.text()
            )
        })
    }

    /// Starts an in-process HTTP server in namespace `ns` listening on `addr` that answers
    /// every request with 200 and `body`. It is listening when this returns and stops at
    /// teardown (or with `stop_fixed`).
    pub fn serve_fixed(&self, ns: &str, addr: SocketAddr, body: &str) -> Result<ServerHandle> {
        let server = FixedServer::start(listen_in(ns, addr)?, body)?;
        Ok(self.keep_server(server))
    }

    fn keep_server(&self, server: FixedServer) -> ServerHandle {
        let mut servers = lock(&self.servers);
        servers.push(server);
        ServerHandle {
            idx: servers.len() - 1,
        }
    }

    /// Starts an in-process TCP sink in namespace `ns` listening on `addr`: it reads each
    /// connection until the client shuts its sending side, then answers with the number of
    /// bytes it read (`N\n`; see `http::upload`). Listening when this returns; stops at
    /// teardown (or with `stop_fixed`); `fixed_hits` counts the connections it answered.
    pub fn serve_sink(&self, ns: &str, addr: SocketAddr) -> Result<ServerHandle> {
        let server = FixedServer::start_sink(listen_in(ns, addr)?)?;
        Ok(self.keep_server(server))
    }

    /// How many requests the fixed server `h` has answered.
    pub fn fixed_hits(&self, h: ServerHandle) -> u64 {
        lock(&self.servers)[h.idx].hits.load(Ordering::Relaxed)
    }

    /// The address the fixed server `h` listens on (useful when bound to port 0).
    pub fn fixed_addr(&self, h: ServerHandle) -> SocketAddr {
        lock(&self.servers)[h.idx].addr
    }

    /// Stops the fixed server `h` (its port is closed when this returns).
    pub fn stop_fixed(&self, h: ServerHandle) {
        lock(&self.servers)[h.idx].stop();
    }

    // ---- teardown ------------------------------------------------------------------------

    fn teardown(&mut self) {
        let panicking = std::thread::panicking();
        let mut problems: Vec<String> = Vec::new();

        for s in lock(&self.servers).iter_mut() {
            s.stop();
        }

        // Tracked processes: SIGTERM all, up to 2 s grace, then SIGKILL.
        let mut procs = std::mem::take(&mut *lock(&self.procs));
        for p in procs.iter_mut() {
            if matches!(p.poll(), Ok(None)) {
                let _ = sys::kill(p.child.id(), libc::SIGTERM);
            }
        }
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end && procs.iter_mut().any(|p| matches!(p.poll(), Ok(None))) {
            std::thread::sleep(Duration::from_millis(10));
        }
        for p in procs.iter_mut() {
            if matches!(p.poll(), Ok(None)) {
                let _ = p.child.kill();
                match p.child.wait() {
                    Ok(st) => p.status = Some(st),
                    Err(e) => problems.push(format!("reaping `{}`: {e}", p.label)),
                }
            }
        }
        if panicking {
            for p in &procs {
                let text = std::fs::read(&p.log)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!(
                    "---- lb-tests: last {} log lines of `{}` ({:?}) ----\n{}",
                    tail.len(),
                    p.label,
                    p.status,
                    tail.join("\n")
                );
            }
        }

        let cleanups = std::mem::take(&mut *lock(&self.cleanups));
        for f in cleanups.into_iter().rev() {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
                problems.push("a teardown hook panicked".into());
            }
        }

        // Anything else still living in our namespaces (spawned without the harness).
        for ns in &self.created_ns {
            let end = Instant::now() + Duration::from_secs(2);
            loop {
                let pids = netns::pids_in_netns(ns).unwrap_or_default();
                if pids.is_empty() {
                    break;
                }
                if Instant::now() >= end {
                    problems.push(format!("processes {pids:?} still in namespace {ns}"));
                    break;
                }
                for pid in pids {
                    let _ = sys::kill(pid, libc::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }

        self.xdp_links.clear();

        {
            let _g = lock(&NETNS_LOCK);
            for ns in self.created_ns.iter().rev() {
                if let Err(e) = run_checked(Command::new("ip").args(["netns", "del", ns]), None) {
                    problems.push(format!("{e:#}"));
                }
            }
        }
        self.created_ns.clear();

        if self.work_dir_created {
            if let Err(e) = std::fs::remove_dir_all(&self.work_dir) {
                problems.push(format!("removing {}: {e}", self.work_dir.display()));
            }
        }
        for p in problems {
            eprintln!("lb-tests: teardown of {}: {p}", self.prefix);
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.teardown();
    }
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("prefix", &self.prefix)
            .field("namespaces", &self.created_ns)
            .field("work_dir", &self.work_dir)
            .finish_non_exhaustive()
    }
}

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A TCP listener on `addr` in namespace `ns`.
fn listen_in(ns: &str, addr: SocketAddr) -> Result<std::net::TcpListener> {
    netns::in_netns(ns, || {
        std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding {addr} in namespace {ns}"))
    })
}

/// `ethtool ARGS` in namespace `ns` (only its network namespace entered).
fn ethtool(ns: &str, args: &[&str]) -> Result<()> {
    run_checked(
        Command::new("nsenter")
            .arg(format!("--net={}", netns::netns_path(ns).display()))
            .arg("--")
            .arg("ethtool")
            .args(args),
        None,
    )
    .map(|_| ())
    .with_context(|| format!("ethtool {} in {ns}", args.join(" ")))
}

/// `ip -n NS -batch -` fed `batch`; fails naming the namespace and ip's complaint.
pub fn ip_batch(ns: &str, batch: &str) -> Result<()> {
    run_checked(
        Command::new("ip").args(["-n", ns, "-batch", "-"]),
        Some(batch),
    )
    .map(|_| ())
    .with_context(|| format!("configuring namespace {ns}"))
}

/// Client `i`'s (1-based) `count` source addresses when 198.51.100.0/24 is cut into blocks
/// of `block` addresses: 198.51.100.(block*(i-1)+1) onwards (see the module docs).
pub(crate) fn client_block_sources(block: usize, i: usize, count: usize) -> Vec<IpAddr> {
    let base = block * (i - 1);
    (1..=count)
        .map(|k| IpAddr::V4(Ipv4Addr::new(198, 51, 100, (base + k) as u8)))
        .collect()
}

/// N of a `backend N` body.
pub fn parse_backend(body: &str) -> Option<usize> {
    body.trim().strip_prefix("backend ")?.trim().parse().ok()
}

/// The deterministic contents of the `/big` file (`BIG_FILE_SIZE` pseudo-random bytes), so
/// tests can compare what they received.
pub fn big_file_contents() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = Vec::with_capacity(BIG_FILE_SIZE);
    while v.len() < BIG_FILE_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(BIG_FILE_SIZE);
    v
}

fn nginx_conf(dir: &Path, www: &Path, n: usize) -> String {
    let d = dir.display();
    let www = www.display();
    format!(
        r#"# Generated by lb-tests for backend {n}.
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type text/plain;
    keepalive_timeout 5s;
    server {{
        listen 0.0.0.0:80 default_server;
        listen [::]:80 ipv6only=on default_server;
        server_name _;
        root {www};
        add_header X-Backend {n} always;
        location = / {{ return 200 "backend {n}\n"; }}
        location = /healthz {{ return 200 "ok\n"; }}
        # For tests that keep an HTTP/1.1 connection idle across changes (and restarts).
        location = /keep {{ keepalive_timeout 300s; return 200 "backend {n}\n"; }}
        location = /big {{ default_type application/octet-stream; }}
        location / {{ return 404 "not found\n"; }}
    }}
}}
"#
    )
}
