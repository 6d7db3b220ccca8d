//! Several lb nodes behind a router: the multi-node test topology.
//!
//! Clients sit on a client segment (bridge `br1`) behind a **router**; the router reaches 2 or
//! more **lb nodes** on the node segment (bridge `br0`), where the 3 **backends** (nginx,
//! holding the VIPs on `lo`, [`crate::Topology`]'s own) are too. Each node runs a real lbd with
//! XDP on its `eth0` (dsr to the backends, the same `hash_seed` everywhere); backends answer
//! clients directly through the router (their default route).
//!
//! How the router reaches the VIP, by [`Announce`]:
//! - `Bgp`: every node runs BIRD 2 (`protocol kernel` on table 100 with `learn`, importing
//!   only routes of rtnetlink protocol 200, exported over BGP with `next hop self`); the router
//!   runs BIRD with one BGP session per node and family, BFD on each (100 ms × 3), and
//!   `merge paths on` in its kernel protocol: one multipath route over every node announcing,
//!   spread by L4 hash (`fib_multipath_hash_policy=1`).
//! - `Vrrp`: nodes 1 and 2 run keepalived (VRRP instance 51 on `eth0`, advert_int 1, node 1
//!   priority 150 and initially MASTER, node 2 100, `track_script`): the master holds the
//!   IPv4 VIP on its `eth0`, so its kernel answers ARP for it; the router has an on-link route
//!   to the VIP on the node segment (`203.0.113.10/32 dev eth0`). IPv4 only.
//!
//! With `Announce::Bgp` every node's lbd announces its serving VIPs itself (`[daemon.announce]
//! table = 100, protocol = 200`: `VIP/32` and `VIP6/128`, `dev lo`), which the node's BIRD
//! learns and advertises; [`Cluster::wait_announced`] waits for those routes.
//!
//! Addressing (RFC 5737 and 2001:db8::/32 only; IPv6 hex-named after the last IPv4 octet as
//! in [`crate::topology`]):
//!
//! | host        | namespace    | interface     | IPv4              | IPv6 (/64)          | MAC                 |
//! |-------------|--------------|---------------|-------------------|---------------------|---------------------|
//! | router      | `PREFIX-r`   | `eth0` (br0)  | 192.0.2.1/24      | 2001:db8::1         | 02:00:00:00:0f:01   |
//! | router      | `PREFIX-r`   | `eth1` (br1)  | 203.0.113.65/26   | 2001:db8:e::65      | 02:00:00:00:0f:02   |
//! | lb node 1   | `PREFIX-lb`  | `eth0` (br0)  | 192.0.2.2/24      | 2001:db8::2         | 02:00:00:00:0a:02   |
//! | lb node n   | `PREFIX-nN`  | `eth0` (br0)  | 192.0.2.(1+n)/24  | 2001:db8::(1+n)     | 02:00:00:00:0a:0n   |
//! | backend i   | `PREFIX-bI`  | `eth0` (br0)  | 192.0.2.(10+i)/24 | 2001:db8::(10+i)    | 02:00:00:00:0b:0i   |
//! | client i    | `PREFIX-cI`  | `eth0` (br1)  | 203.0.113.(100+i)/26 | 2001:db8:e::(100+i) | 02:00:00:00:0c:0i |
//! | switch      | `PREFIX-sw`  | bridges `br0`, `br1` |            |                     |                     |
//!
//! - VIPs: [`VIP`] 203.0.113.10 and [`VIP6`] 2001:db8:f00::10 (port 80, services `web` and
//!   `web6`), on every backend's `lo`.
//! - Client i's source addresses: [`ClusterOptions::addresses_per_client`] /32s on its `lo`
//!   from 198.51.100.0/24, cut as in [`crate::topology`] (B = 256 / M.next_power_of_two()
//!   per client: client i holds 198.51.100.(B*(i-1)+1) onwards); the router routes each block
//!   via its client. Clients route everything via the router (203.0.113.65, 2001:db8:e::65);
//!   backends too (192.0.2.1, 2001:db8::1).
//! - BGP: router AS 65000, nodes AS 65001; sessions `nN` (IPv4) and `nNv6` (IPv6) on the
//!   router, `up4` and `up6` on each node.
//! - Node n's lbd: config, socket and state under `WORK/nodeN/`, pins under
//!   `/sys/fs/bpf/PREFIX-nN`.
//!
//! Node 1 is the [`crate::Topology`]'s own LB namespace; the router, the other nodes and the
//! clients are hosts added with [`crate::Topology::add_host`]. Dropping the [`Cluster`] (also
//! during a panic) stops the routing daemons and then tears the topology down.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::lbd::{Lbd, LbdPaths, prepare_lbd_at, spawn_lbd_in};
use crate::netns::{self, run_checked};
use crate::routing::{self, Bird, Keepalived};
use crate::topology::{ExtraLink, client_block_sources, ip_batch};
use crate::{ProcHandle, Topology, TopologyOptions, big_file_contents, parse_backend, wait_until};

/// The IPv4 VIP (service `web`, port 80).
pub const VIP: &str = "203.0.113.10";
/// The IPv6 VIP (service `web6`, port 80).
pub const VIP6: &str = "2001:db8:f00::10";
/// The seed every node's lbd hashes with.
pub const SEED_HEX: &str = "5f0c1d2e3f4051627384950a1b2c3d4e";
/// The routing table and rtnetlink protocol of the VIP routes (lbd's `[daemon.announce]`).
pub const ANNOUNCE_TABLE: u32 = 100;
pub const ANNOUNCE_PROTOCOL: u32 = 200;
/// BFD timers of every session: a dead peer is declared down after 3 × 100 ms.
pub const BFD_INTERVAL_MS: u32 = 100;
pub const BFD_MULTIPLIER: u32 = 3;

const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const ROUTER_OUT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 65);
const ROUTER_OUT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 0x65);

/// How the router reaches the VIP (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    Bgp,
    Vrrp,
}

/// What to build. `Default`: 3 nodes over BGP, 2 clients with 40 source addresses each, every
/// backend in the services.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// lb nodes (2..=8; `Vrrp` uses exactly 2).
    pub nodes: usize,
    pub announce: Announce,
    /// Client namespaces (1..=8).
    pub clients: usize,
    /// Source addresses per client from 198.51.100.0/24.
    pub addresses_per_client: usize,
    /// Backends 1..=N (of 3) in the services at start.
    pub backends_in_service: usize,
    /// Every node shares connection state with the others (`[daemon.sync]`, UDP port
    /// `SYNC_PORT` on the node segment, one key file for all).
    pub sync: bool,
    /// Services check their backends over HTTP (`/healthz`, every 200 ms, down after 2
    /// failures, up after 2 successes); without, every backend is up.
    pub health: bool,
    /// This node (1-based) is given another `hash_seed` than the others.
    pub other_seed: Option<usize>,
}

/// The seed of `ClusterOptions::other_seed`'s node.
pub const OTHER_SEED_HEX: &str = "00112233445566778899aabbccddeeff";

/// The UDP port of `[daemon.sync]` on every node.
pub const SYNC_PORT: u16 = 9918;

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            announce: Announce::Bgp,
            clients: 2,
            addresses_per_client: 40,
            backends_in_service: 3,
            sync: false,
            health: false,
            other_seed: None,
        }
    }
}

/// A live cluster; see the module docs. Everything goes on drop.
pub struct Cluster {
    // Declared before `t`: dropped (stopped) before the topology is torn down.
    birds: Mutex<Vec<Option<Bird>>>,
    keepaliveds: Mutex<Vec<Option<Keepalived>>>,
    opts: ClusterOptions,
    router_ns: String,
    node_ns: Vec<String>,
    client_ns: Vec<String>,
    lbds: Vec<(LbdPaths, ProcHandle)>,
    block: usize,
    t: Topology,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The IPv6 group written with the decimal digits of `n`: 65 -> 0x65.
fn hex_named(n: usize) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).expect("at most 4 decimal digits")
}

/// Node `n`'s (1-based) address on the node segment.
pub fn node_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 1 + n as u8)
}

/// Node `n`'s IPv6 address on the node segment.
pub fn node_addr6(n: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, hex_named(1 + n))
}

/// Node `n`'s eth0 MAC.
pub fn node_mac(n: usize) -> String {
    format!("02:00:00:00:0a:{:02x}", 1 + n)
}

/// Backend `i`'s (1-based) IPv4 address.
pub fn backend_addr(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10 + i as u8))
}

/// Backend `i`'s IPv6 address.
pub fn backend_addr6(i: usize) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(
        0x2001,
        0xdb8,
        0,
        0,
        0,
        0,
        0,
        hex_named(10 + i),
    ))
}

/// The IPv4 VIP and port 80.
pub fn vip() -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), 80)
}

/// The IPv6 VIP and port 80.
pub fn vip6() -> SocketAddr {
    SocketAddr::new(VIP6.parse().unwrap(), 80)
}

impl Cluster {
    /// Builds the cluster, starts every lbd, the routing daemons and the stand-in
    /// announcements, and returns once the router reaches the VIP through every node (`Bgp`:
    /// a multipath route over all of them in the kernel) or node 1 holds it (`Vrrp`).
    pub fn new(opts: ClusterOptions) -> Result<Cluster> {
        let nodes_ok = match opts.announce {
            Announce::Bgp => (2..=8).contains(&opts.nodes),
            Announce::Vrrp => opts.nodes == 2,
        };
        if !nodes_ok
            || !(1..=8).contains(&opts.clients)
            || !(1..=3).contains(&opts.backends_in_service)
        {
            bail!("unsupported cluster options {opts:?}");
        }
        let block = 256 / opts.clients.next_power_of_two();
        if opts.addresses_per_client > block - 2 {
            bail!(
                "at most {} addresses per client with {} clients",
                block - 2,
                opts.clients
            );
        }
        for (program, package) in [
            ("bird", "bird2"),
            ("birdc", "bird2"),
            ("keepalived", "keepalived"),
        ] {
            routing::require_program(program, package)?;
        }
        let mut t = Topology::new(TopologyOptions {
            backends: 3,
            clients: 0,
            vips: vec![VIP.parse().unwrap(), VIP6.parse().unwrap()],
            start_servers: true,
            ..Default::default()
        })?;
        let router_ns = t.add_host(
            "r",
            &[
                ExtraLink {
                    bridge: "br0",
                    dev: "eth0",
                    mac: "02:00:00:00:0f:01".into(),
                    addr: ROUTER,
                    plen: 24,
                    addr6: ROUTER6,
                },
                ExtraLink {
                    bridge: "br1",
                    dev: "eth1",
                    mac: "02:00:00:00:0f:02".into(),
                    addr: ROUTER_OUT,
                    plen: 26,
                    addr6: ROUTER_OUT6,
                },
            ],
        )?;
        let mut node_ns = vec![t.lb_ns().to_string()];
        for n in 2..=opts.nodes {
            node_ns.push(t.add_host(
                &format!("n{n}"),
                &[ExtraLink {
                    bridge: "br0",
                    dev: "eth0",
                    mac: node_mac(n),
                    addr: node_addr(n),
                    plen: 24,
                    addr6: node_addr6(n),
                }],
            )?);
        }
        let mut client_ns = Vec::new();
        for i in 1..=opts.clients {
            client_ns.push(t.add_host(
                &format!("c{i}"),
                &[ExtraLink {
                    bridge: "br1",
                    dev: "eth0",
                    mac: format!("02:00:00:00:0c:{i:02x}"),
                    addr: Ipv4Addr::new(203, 0, 113, 100 + i as u8),
                    plen: 26,
                    addr6: Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, hex_named(100 + i)),
                }],
            )?);
        }
        let mut c = Cluster {
            birds: Mutex::new(Vec::new()),
            keepaliveds: Mutex::new(Vec::new()),
            opts,
            router_ns,
            node_ns,
            client_ns,
            lbds: Vec::new(),
            block,
            t,
        };
        c.route()?;
        c.start_lbds()?;
        match c.opts.announce {
            Announce::Bgp => c.start_bgp()?,
            Announce::Vrrp => c.start_vrrp()?,
        }
        Ok(c)
    }

    /// Forwarding and L4 multipath hashing on the router; every host's routes; client sysctls.
    fn route(&self) -> Result<()> {
        let kv = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        netns::set_sysctls(
            &self.router_ns,
            &kv(&[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
                ("net.ipv4.fib_multipath_hash_policy", "1"),
                ("net.ipv6.fib_multipath_hash_policy", "1"),
            ]),
            false,
        )?;
        let plen = 24 + self.opts.clients.next_power_of_two().trailing_zeros();
        let mut router = String::new();
        for i in 1..=self.opts.clients {
            router.push_str(&format!(
                "route add 198.51.100.{}/{plen} via 203.0.113.{}\n",
                self.block * (i - 1),
                100 + i
            ));
        }
        if self.opts.announce == Announce::Vrrp {
            // The VIP is on the node segment, where the VRRP master answers ARP for it.
            router.push_str(&format!("route add {VIP}/32 dev eth0\n"));
        }
        ip_batch(&self.router_ns, &router)?;
        for i in 1..=self.opts.clients {
            let ns = &self.client_ns[i - 1];
            let mut b = format!(
                "route add default via {ROUTER_OUT}\nroute add default via {ROUTER_OUT6}\n"
            );
            for a in self.client_sources(i) {
                b.push_str(&format!("addr add {a}/32 dev lo\n"));
            }
            ip_batch(ns, &b)?;
            // ARP from the eth0 address, not from a source on lo; small receive buffers keep
            // rate-limited downloads on the wire (see TOOLCHAIN.md).
            netns::set_sysctls(
                ns,
                &kv(&[
                    ("net.ipv4.conf.all.arp_announce", "2"),
                    ("net.ipv4.conf.eth0.arp_announce", "2"),
                    ("net.ipv4.tcp_rmem", "4096 32768 65536"),
                ]),
                false,
            )?;
        }
        for i in 1..=3 {
            ip_batch(
                self.t.backend_ns(i),
                &format!("route add default via {ROUTER}\nroute add default via {ROUTER6}\n"),
            )?;
        }
        Ok(())
    }

    /// The key file every node's `[daemon.sync]` names (written by `start_lbds`).
    pub fn sync_key_file(&self) -> PathBuf {
        self.t.work_dir().join("sync.key")
    }

    fn node_dir(&self, n: usize) -> PathBuf {
        self.t.work_dir().join(format!("node{n}"))
    }

    /// Node `n`'s lbd paths (see the module docs).
    pub fn lbd_paths(&self, n: usize) -> LbdPaths {
        let dir = self.node_dir(n);
        LbdPaths {
            config: dir.join("lb.toml"),
            socket: dir.join("run/lbd.sock"),
            bpffs_dir: PathBuf::from(format!("/sys/fs/bpf/{}-n{n}", self.t.prefix())),
            state_dir: dir.join("state"),
            interfaces: vec!["eth0".into()],
        }
    }

    /// Node `n`'s lbd config: services `web` (VIP:80) and `web6` (VIP6:80), dsr, backends
    /// 1..=`backends_in_service`, the common seed.
    fn lbd_config(&self, paths: &LbdPaths) -> String {
        let n = (1..=self.opts.nodes)
            .find(|&n| self.lbd_paths(n).config == paths.config)
            .expect("a node's paths");
        let seed = if self.opts.other_seed == Some(n) {
            OTHER_SEED_HEX
        } else {
            SEED_HEX
        };
        let mut c =
            paths.daemon_section(&format!("hash_seed = \"{seed}\"\nnode_name = \"node{n}\""));
        if self.opts.announce == Announce::Bgp {
            c.push_str(&format!(
                "\n[daemon.announce]\ntable = {ANNOUNCE_TABLE}\nprotocol = {ANNOUNCE_PROTOCOL}\n"
            ));
        }
        if self.opts.sync {
            let peers: Vec<String> = (1..=self.opts.nodes)
                .filter(|&p| p != n)
                .map(|p| format!("\"{}:{SYNC_PORT}\"", node_addr(p)))
                .collect();
            c.push_str(&format!(
                "\n[daemon.sync]\nlisten = \"{}:{SYNC_PORT}\"\npeers = [{}]\nkey_file = \"{}\"\n",
                node_addr(n),
                peers.join(", "),
                self.sync_key_file().display()
            ));
        }
        for (name, vip, v6) in [("web", VIP, false), ("web6", VIP6, true)] {
            c.push_str(&format!(
                "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"dsr\"\n\n"
            ));
            if self.opts.health {
                c.push_str(
                    "[service.health]\ncheck = \"http\"\npath = \"/healthz\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 2\n\n",
                );
            }
            for i in 1..=self.opts.backends_in_service {
                let a = if v6 {
                    backend_addr6(i)
                } else {
                    backend_addr(i)
                };
                c.push_str(&format!(
                    "[[service.backend]]\naddress = \"{a}\"\nweight = 100\n\n"
                ));
            }
        }
        c
    }

    fn start_lbds(&mut self) -> Result<()> {
        if self.opts.sync {
            let key: String = (0..32).map(|i| format!("{:02x}", i * 7 + 3)).collect();
            std::fs::write(self.sync_key_file(), format!("{key}\n"))?;
        }
        for n in 1..=self.opts.nodes {
            let paths = self.lbd_paths(n);
            prepare_lbd_at(&self.t, &paths, &self.lbd_config(&paths))?;
            let lbd = spawn_lbd_in(&self.t, &self.node_ns[n - 1], &paths)?;
            lbd.wait_ready(crate::lbd::LBD_START)
                .with_context(|| format!("lbd of node {n}"))?;
            let handle = lbd.handle;
            self.lbds.push((paths, handle));
        }
        // Every backend resolved and up on every node before traffic flows.
        for n in 1..=self.opts.nodes {
            let lbd = self.lbd(n);
            for (service, addr) in [
                ("web", backend_addr as fn(usize) -> IpAddr),
                ("web6", backend_addr6),
            ] {
                wait_until(
                    Duration::from_secs(15),
                    &format!("node {n}'s {service} backends up"),
                    || {
                        lbd.lbctl_json(&["backend", "list", service])
                            .is_ok_and(|l| {
                                let rows = l.as_array().cloned().unwrap_or_default();
                                (1..=self.opts.backends_in_service).all(|i| {
                                    rows.iter().any(|r| {
                                        r["address"] == addr(i).to_string().as_str()
                                            && r["state"] == "up"
                                            && r["mac"].is_string()
                                    })
                                })
                            })
                    },
                )
                .with_context(|| {
                    format!(
                        "{:?}\nlbd log:\n{}",
                        lbd.lbctl_json(&["backend", "list", service]),
                        lbd.log_tail()
                    )
                })?;
            }
        }
        Ok(())
    }

    /// The router's BIRD config.
    fn router_bird_config(&self) -> String {
        let mut c = format!(
            "log stderr all;\nrouter id {ROUTER};\nprotocol device {{ }}\n\
             protocol kernel kern4 {{ merge paths on; ipv4 {{ import none; export all; }}; }}\n\
             protocol kernel kern6 {{ merge paths on; ipv6 {{ import none; export all; }}; }}\n\
             {}",
            bfd_protocol()
        );
        for n in 1..=self.opts.nodes {
            c.push_str(&bgp_session(
                &format!("n{n}"),
                &ROUTER.to_string(),
                65000,
                &node_addr(n).to_string(),
                65001,
                "ipv4 { import all; export none; }",
            ));
            c.push_str(&bgp_session(
                &format!("n{n}v6"),
                &ROUTER6.to_string(),
                65000,
                &node_addr6(n).to_string(),
                65001,
                "ipv6 { import all; export none; }",
            ));
        }
        c
    }

    /// Node `n`'s BIRD config: learns table 100's protocol-200 routes, exports them over BGP.
    fn node_bird_config(&self, n: usize) -> String {
        let mut c = format!(
            "log stderr all;\nrouter id {};\nprotocol device {{ }}\n\
             protocol kernel k100 {{ kernel table {ANNOUNCE_TABLE}; learn; ipv4 {{ import where krt_source = {ANNOUNCE_PROTOCOL}; export none; }}; }}\n\
             protocol kernel k100v6 {{ kernel table {ANNOUNCE_TABLE}; learn; ipv6 {{ import where krt_source = {ANNOUNCE_PROTOCOL}; export none; }}; }}\n\
             {}",
            node_addr(n),
            bfd_protocol()
        );
        c.push_str(&bgp_session(
            "up4",
            &node_addr(n).to_string(),
            65001,
            &ROUTER.to_string(),
            65000,
            "ipv4 { import none; export where proto = \"k100\"; next hop self; }",
        ));
        c.push_str(&bgp_session(
            "up6",
            &node_addr6(n).to_string(),
            65001,
            &ROUTER6.to_string(),
            65000,
            "ipv6 { import none; export where proto = \"k100v6\"; next hop self; }",
        ));
        c
    }

    fn start_bgp(&mut self) -> Result<()> {
        let dir = self.t.work_dir().to_path_buf();
        let router = Bird::start(
            &self.router_ns,
            &dir,
            "bird-router",
            &self.router_bird_config(),
        )?;
        lock(&self.birds).push(Some(router));
        for n in 1..=self.opts.nodes {
            let b = Bird::start(
                &self.node_ns[n - 1],
                &dir,
                &format!("bird-n{n}"),
                &self.node_bird_config(n),
            )?;
            lock(&self.birds).push(Some(b));
            self.wait_announced(n)?;
        }
        let names: Vec<String> = (1..=self.opts.nodes)
            .flat_map(|n| [format!("n{n}"), format!("n{n}v6")])
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.with_bird(0, |b| b.wait_established(&names, Duration::from_secs(30)))?;
        let all: Vec<IpAddr> = (1..=self.opts.nodes).map(|n| node_addr(n).into()).collect();
        let all6: Vec<IpAddr> = (1..=self.opts.nodes)
            .map(|n| node_addr6(n).into())
            .collect();
        for (dst, want) in [(VIP, all), (VIP6, all6)] {
            let mut last = Vec::new();
            wait_until(
                Duration::from_secs(15),
                &format!("the router's multipath route to {dst} over every node"),
                || {
                    last = routing::kernel_next_hops(&self.router_ns, dst).unwrap_or_default();
                    want.iter().all(|a| last.contains(a))
                },
            )
            .with_context(|| format!("the router's kernel route has next hops {last:?}"))?;
        }
        Ok(())
    }

    fn start_vrrp(&mut self) -> Result<()> {
        let dir = self.t.work_dir().to_path_buf();
        for n in 1..=2 {
            let k = Keepalived::start(
                &self.node_ns[n - 1],
                &dir,
                &format!("keepalived-n{n}"),
                &keepalived_config(n, &self.lbd_paths(n).socket),
            )?;
            lock(&self.keepaliveds).push(Some(k));
        }
        let vip: IpAddr = VIP.parse().unwrap();
        wait_until(
            Duration::from_secs(10),
            "node 1 (VRRP master) to hold the VIP",
            || routing::holds_address(&self.node_ns[0], vip).unwrap_or(false),
        )
        .with_context(|| format!("keepalived log:\n{}", self.keepalived_log(1)))?;
        Ok(())
    }

    /// Waits until node `n`'s lbd has its VIP routes in table 100 (protocol 200): `VIP/32`
    /// and `VIP6/128`, which the node's BIRD learns and advertises.
    pub fn wait_announced(&self, n: usize) -> Result<()> {
        let ns = &self.node_ns[n - 1];
        wait_until(
            Duration::from_secs(10),
            &format!("node {n}'s lbd announcing {VIP} and {VIP6}"),
            || {
                [("-4", VIP.to_string()), ("-6", VIP6.to_string())]
                    .iter()
                    .all(|(family, vip)| {
                        netns::run_output_within(
                            Command::new("ip").args([
                                "-n",
                                ns,
                                family,
                                "route",
                                "show",
                                "table",
                                &ANNOUNCE_TABLE.to_string(),
                                "proto",
                                &ANNOUNCE_PROTOCOL.to_string(),
                            ]),
                            Duration::from_secs(5),
                        )
                        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(vip.as_str()))
                    })
            },
        )
    }

    // ---- access ------------------------------------------------------------------------------

    /// The topology underneath (backends, processes, work folder).
    pub fn topology(&self) -> &Topology {
        &self.t
    }

    pub fn nodes(&self) -> usize {
        self.opts.nodes
    }

    pub fn router_ns(&self) -> &str {
        &self.router_ns
    }

    /// Node `n`'s (1-based) namespace.
    pub fn node_ns(&self, n: usize) -> &str {
        &self.node_ns[n - 1]
    }

    /// Node `n`'s lbd.
    pub fn lbd(&self, n: usize) -> Lbd<'_> {
        let (paths, handle) = &self.lbds[n - 1];
        Lbd::adopt(&self.t, paths.clone(), *handle)
    }

    /// Runs `f` on BIRD `i` (0: the router, n: node n); an error if it was never started.
    pub fn with_bird<R>(&self, i: usize, f: impl FnOnce(&mut Bird) -> Result<R>) -> Result<R> {
        let mut birds = lock(&self.birds);
        let b = birds
            .get_mut(i)
            .and_then(Option::as_mut)
            .ok_or_else(|| anyhow!("no BIRD {i} in this cluster"))?;
        f(b)
    }

    fn keepalived_log(&self, n: usize) -> String {
        lock(&self.keepaliveds)
            .get(n - 1)
            .and_then(Option::as_ref)
            .map(Keepalived::log)
            .unwrap_or_default()
    }

    /// The gateways of the router's kernel route to `dst` (VIP or VIP6).
    pub fn router_next_hops(&self, dst: &str) -> Result<Vec<IpAddr>> {
        routing::kernel_next_hops(&self.router_ns, dst)
    }

    /// Client `i`'s namespace.
    pub fn client_ns(&self, i: usize) -> &str {
        &self.client_ns[i - 1]
    }

    /// Client `i`'s (1-based) source addresses.
    pub fn client_sources(&self, i: usize) -> Vec<IpAddr> {
        client_block_sources(self.block, i, self.opts.addresses_per_client)
    }

    /// Every client's source addresses, client 1's first.
    pub fn all_client_sources(&self) -> Vec<IpAddr> {
        (1..=self.opts.clients)
            .flat_map(|i| self.client_sources(i))
            .collect()
    }

    /// Client `i`'s own eth0 IPv6 address.
    pub fn client_addr6(&self, i: usize) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0xe,
            0,
            0,
            0,
            0,
            hex_named(100 + i),
        ))
    }

    /// The namespace of the client owning `src` (a source address, or a client's IPv6 address).
    pub fn client_ns_of(&self, src: IpAddr) -> Option<&str> {
        (1..=self.opts.clients)
            .find(|&i| self.client_sources(i).contains(&src) || self.client_addr6(i) == src)
            .map(|i| self.client_ns(i))
    }

    /// `GET /` from `src` to `dst`: N of the `backend N` answer.
    pub fn which_backend(&self, src: IpAddr, dst: SocketAddr) -> Result<usize> {
        let ns = self
            .client_ns_of(src)
            .ok_or_else(|| anyhow!("{src} is no client's"))?;
        let reply = self.t.http_get(ns, src, dst, "/")?;
        parse_backend(&reply.text()).ok_or_else(|| anyhow!("GET / from {src}: {:?}", reply.text()))
    }

    /// The backend (1-based index) node `n`'s `lbctl lookup SERVICE CLIENT` names.
    pub fn lookup(&self, n: usize, service: &str, client: IpAddr) -> Result<usize> {
        let v = self
            .lbd(n)
            .lbctl_json(&["lookup", service, &client.to_string()])?;
        let a: IpAddr = v["backend"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("lookup {client} on node {n}: {v}"))?;
        (1..=3)
            .find(|&i| backend_addr(i) == a || backend_addr6(i) == a)
            .ok_or_else(|| anyhow!("lookup {client} on node {n} names {a}, no backend"))
    }

    /// Packets node `n`'s lbd forwarded for `service` (`lbctl stats`).
    pub fn forwarded_packets(&self, n: usize, service: &str) -> Result<u64> {
        let v = self.lbd(n).lbctl_json(&["stats", service])?;
        v["services"][0]["packets"]
            .as_u64()
            .ok_or_else(|| anyhow!("no packet count in node {n}'s stats: {v}"))
    }

    // ---- losing a node ---------------------------------------------------------------------

    /// Node `n` dies: its switch port goes down first (nothing more leaves it: no TCP FIN of
    /// BIRD's sessions, no VRRP priority 0), then its BIRD, keepalived and lbd get SIGKILL.
    /// Returns when the port went down. (lbd's pinned XDP link stays until teardown.)
    pub fn kill_node(&self, n: usize) -> Result<Instant> {
        let port = self
            .t
            .switch_port(&self.node_ns[n - 1])
            .ok_or_else(|| anyhow!("node {n} has no switch port"))?
            .to_string();
        run_checked(
            Command::new("ip").args(["-n", self.t.switch_ns(), "link", "set", &port, "down"]),
            None,
        )?;
        let at = Instant::now();
        if let Some(Some(b)) = lock(&self.birds).get_mut(n) {
            b.kill();
        }
        if let Some(Some(k)) = lock(&self.keepaliveds).get_mut(n - 1) {
            k.kill();
        }
        self.t.kill(self.lbds[n - 1].1)?;
        Ok(at)
    }

    /// SIGKILLs node `n`'s lbd and starts a new one on the same config and pins (the way an
    /// upgrade or a crash and restart goes); returns once the new one is ready.
    pub fn restart_lbd(&mut self, n: usize) -> Result<()> {
        self.t.kill(self.lbds[n - 1].1)?;
        let paths = self.lbd_paths(n);
        let lbd = spawn_lbd_in(&self.t, &self.node_ns[n - 1], &paths)?;
        lbd.wait_ready(crate::lbd::LBD_START)
            .with_context(|| format!("the restarted lbd of node {n}"))?;
        self.lbds[n - 1].1 = lbd.handle;
        Ok(())
    }

    /// Polls (every 5 ms) until `done` holds, for at most `deadline`; returns how long it took.
    pub fn time_until(
        &self,
        since: Instant,
        deadline: Duration,
        what: &str,
        mut done: impl FnMut() -> bool,
    ) -> Result<Duration> {
        loop {
            if done() {
                return Ok(since.elapsed());
            }
            if since.elapsed() > deadline {
                bail!("{what}: not after {deadline:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn bfd_protocol() -> String {
    format!(
        "protocol bfd {{ interface \"eth0\" {{ min rx interval {BFD_INTERVAL_MS} ms; min tx interval {BFD_INTERVAL_MS} ms; multiplier {BFD_MULTIPLIER}; }}; }}\n"
    )
}

/// One eBGP session with BFD and short retry timers (a peer that starts later is met within
/// about a second).
fn bgp_session(
    name: &str,
    local: &str,
    local_as: u32,
    neighbor: &str,
    neighbor_as: u32,
    channel: &str,
) -> String {
    format!(
        "protocol bgp {name} {{\n  local {local} as {local_as};\n  neighbor {neighbor} as {neighbor_as};\n  \
         bfd on;\n  connect delay time 1;\n  connect retry time 2;\n  error wait time 1, 4;\n  {channel};\n}}\n"
    )
}

/// Keepalived's config on VRRP node `n` (1 or 2; node 1 starts as MASTER with the higher
/// priority), tracking `lbctl node check` of the node's lbd (at `socket`): a node that would
/// not serve the VIP gives it up.
fn keepalived_config(n: usize, socket: &std::path::Path) -> String {
    let check = format!(
        "{} --socket {} node check",
        crate::lbd::bin("lbctl").display(),
        socket.display()
    );
    let (state, priority) = if n == 1 {
        ("MASTER", 150)
    } else {
        ("BACKUP", 100)
    };
    format!(
        "global_defs {{\n  router_id lb{n}\n  script_user root\n  enable_script_security\n}}\n\
         vrrp_script node_check {{\n  script \"{check}\"\n  interval 1\n  fall 2\n  rise 1\n}}\n\
         vrrp_instance lb {{\n  state {state}\n  interface eth0\n  virtual_router_id 51\n  priority {priority}\n  advert_int 1\n  \
         virtual_ipaddress {{\n    {VIP}/32 dev eth0\n  }}\n  track_script {{\n    node_check\n  }}\n}}\n"
    )
}

// ---- long-lived connections ------------------------------------------------------------------

/// What one long-lived connection saw.
#[derive(Debug, Clone)]
pub struct FlowOutcome {
    pub src: IpAddr,
    /// A paced download of `/big` (else a keep-alive session asking `GET /keep` every 100 ms).
    pub download: bool,
    /// The backend that answered first.
    pub backend: Option<usize>,
    /// Requests answered (sessions), bytes of the body received (downloads).
    pub progress: u64,
    /// Why the connection broke: an error, EOF early, another backend, bytes that differ.
    pub broken: Option<String>,
}

/// Long-lived connections running on threads of their own; see [`Cluster::start_flows`].
pub struct Flows {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<FlowOutcome>>,
}

impl Flows {
    /// Tells sessions to finish (downloads run to their end), then collects every outcome.
    pub fn finish(mut self) -> Vec<FlowOutcome> {
        self.stop.store(true, Ordering::Relaxed);
        std::mem::take(&mut self.threads)
            .into_iter()
            .map(|t| t.join().expect("a flow thread panicked"))
            .collect()
    }
}

impl Drop for Flows {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Read and write timeouts of the long-lived connections: longer than a VRRP takeover plus
/// TCP's retransmission backoff.
const FLOW_TIMEOUT: Duration = Duration::from_secs(30);

impl Cluster {
    /// Opens `sessions` keep-alive HTTP/1.1 sessions (each asks `GET /keep` every 100 ms and
    /// must always hear the same backend) and `downloads` paced downloads of `/big` (about
    /// 1 MiB/s with a 32 KiB receive buffer, so each lasts ~4 s on the wire; compared byte for
    /// byte), from `to` (VIP or VIP6 with port), source addresses taken in turn from `srcs`.
    /// Returns once every connection is established and has had its first answer bytes.
    pub fn start_flows(
        &self,
        srcs: &[IpAddr],
        to: SocketAddr,
        sessions: usize,
        downloads: usize,
    ) -> Result<Flows> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut started = Vec::new();
        for k in 0..sessions + downloads {
            let src = srcs[k % srcs.len()];
            let ns = self
                .client_ns_of(src)
                .ok_or_else(|| anyhow!("{src} is no client's"))?;
            let s = self
                .t
                .connect_tcp(ns, Some(src), to, Duration::from_secs(5))?;
            s.set_read_timeout(Some(FLOW_TIMEOUT))?;
            s.set_write_timeout(Some(FLOW_TIMEOUT))?;
            let download = k >= sessions;
            let (tx, rx) = std::sync::mpsc::channel();
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("flow-{k}"))
                    .spawn(move || {
                        let mut o = FlowOutcome {
                            src,
                            download,
                            backend: None,
                            progress: 0,
                            broken: None,
                        };
                        let r = if download {
                            run_download(s, to, &mut o, &tx)
                        } else {
                            run_session(s, to, &mut o, &tx, &stop)
                        };
                        if let Err(e) = r {
                            o.broken = Some(format!("{e:#}"));
                        }
                        let _ = tx.send(());
                        o
                    })?,
            );
            started.push(rx);
        }
        for rx in started {
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
        Ok(Flows { stop, threads })
    }
}

fn run_session(
    mut s: TcpStream,
    to: SocketAddr,
    o: &mut FlowOutcome,
    started: &std::sync::mpsc::Sender<()>,
    stop: &AtomicBool,
) -> Result<()> {
    let req = format!("GET /keep HTTP/1.1\r\nHost: {to}\r\nUser-Agent: lb-tests\r\n\r\n");
    loop {
        s.write_all(req.as_bytes()).context("sending a request")?;
        let reply = crate::http::read_kept_response(&mut s)?;
        if reply.status != 200 {
            bail!("status {}", reply.status);
        }
        let text = reply.text();
        let b = parse_backend(&text).ok_or_else(|| anyhow!("answer {text:?}"))?;
        match o.backend {
            None => {
                o.backend = Some(b);
                let _ = started.send(());
            }
            Some(first) if first != b => bail!("backend {first} first, then backend {b}"),
            Some(_) => {}
        }
        o.progress += 1;
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_download(
    mut s: TcpStream,
    to: SocketAddr,
    o: &mut FlowOutcome,
    started: &std::sync::mpsc::Sender<()>,
) -> Result<()> {
    crate::http::set_recv_buffer(&s, 32 * 1024)?;
    s.write_all(
        format!("GET /big HTTP/1.0\r\nHost: {to}\r\nUser-Agent: lb-tests\r\n\r\n").as_bytes(),
    )?;
    let want = big_file_contents();
    let mut buf = Vec::with_capacity(want.len() + 1024);
    let mut chunk = [0u8; 16 * 1024];
    let mut body_at = None;
    // About 1 MiB/s: 16 KiB, then a pause of ~15 ms.
    loop {
        let n = s.read(&mut chunk).context("reading the download")?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if body_at.is_none() {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                body_at = Some(end + 4);
                let head = String::from_utf8_lossy(&buf[..end]);
                o.backend = head
                    .lines()
                    .find_map(|l| l.strip_prefix("X-Backend: ")?.trim().parse().ok());
                let _ = started.send(());
            }
        }
        if let Some(at) = body_at {
            o.progress = (buf.len() - at) as u64;
        }
        std::thread::sleep(Duration::from_millis(15));
    }
    let at = body_at.ok_or_else(|| anyhow!("no HTTP header in {} bytes", buf.len()))?;
    let body = &buf[at..];
    if body.len() != want.len() {
        bail!("downloaded {} bytes of {}", body.len(), want.len());
    }
    if body != want.as_slice() {
        let first = body
            .iter()
            .zip(&want)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        bail!("the download differs from byte {first} on");
    }
    Ok(())
}

/// What [`Cluster::measure_node_loss_after_backend_add`] saw.
#[derive(Debug, Clone, Default)]
pub struct SyncGap {
    /// Sessions opened before the backend was added, and how many of them broke.
    pub before: usize,
    pub before_broken: usize,
    /// Sessions opened after it, and how many of them broke.
    pub after: usize,
    pub after_broken: usize,
    /// How many of the sessions opened after it answered from the new backend.
    pub after_on_new: usize,
}

impl Cluster {
    /// The case connection-state sync between nodes (`[daemon.sync]`) is for, measured rather
    /// than asserted: `before` keep-alive sessions open, backend `new` (not in the services
    /// yet: build with `backends_in_service` below it) is added on every node, `after` more
    /// sessions open, `settle` later node `kill` dies, and 3 s after that every session is
    /// checked. A session breaks when the node that now carries it has no record of it and
    /// chooses another backend than the one it began on.
    pub fn measure_node_loss_after_backend_add(
        &self,
        new: usize,
        kill: usize,
        before: usize,
        after: usize,
        settle: Duration,
    ) -> Result<SyncGap> {
        let sources = self.all_client_sources();
        let old = self.start_flows(&sources, vip(), before, 0)?;
        for n in 1..=self.opts.nodes {
            let lbd = self.lbd(n);
            let out = lbd.lbctl(&["backend", "add", "web", &backend_addr(new).to_string()])?;
            if !out.status.success() {
                bail!(
                    "lbctl backend add on node {n}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        for n in 1..=self.opts.nodes {
            let lbd = self.lbd(n);
            wait_until(Duration::from_secs(10), "the new backend up", || {
                lbd.lbctl_json(&["backend", "list", "web"]).is_ok_and(|l| {
                    l.as_array().into_iter().flatten().any(|r| {
                        r["address"] == backend_addr(new).to_string().as_str() && r["state"] == "up"
                    })
                })
            })?;
        }
        // Sources in reverse order, so the new sessions are not the old ones' twins.
        let rev: Vec<IpAddr> = sources.iter().rev().copied().collect();
        let young = self.start_flows(&rev, vip(), after, 0)?;
        std::thread::sleep(settle);
        self.kill_node(kill)?;
        std::thread::sleep(Duration::from_secs(3));
        let old = old.finish();
        let young = young.finish();
        Ok(SyncGap {
            before: old.len(),
            before_broken: old.iter().filter(|o| o.broken.is_some()).count(),
            after: young.len(),
            after_broken: young.iter().filter(|o| o.broken.is_some()).count(),
            after_on_new: young.iter().filter(|o| o.backend == Some(new)).count(),
        })
    }
}
