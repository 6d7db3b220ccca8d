//! The data-path fixture of the BPF_PROG_TEST_RUN tests: the real program, loaded by lbd's
//! datapath code into a pin folder of its own (removed on drop, also when loading fails), with
//! five services filled in: IPv4 and IPv6 `dsr`, IPv4 and IPv6 `tunnel`, and a 5-tuple one.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use lb_common::{
    Backend, FilterData, Reason, ServiceKey, ServiceValue, VipKey, backend_flags, filter_list,
    maglev::{MaglevBackend, build_table},
    service_flags, source_slot,
};
use lb_userspace::{
    cidr::Cidr,
    datapath::{self, Datapath, FilterEntry},
    state::{family, to_addr},
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub const SEED: [u64; 2] = [0x1111_2222_3333_4444, 0x5555_6666_7777_8888];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x65];
pub const TABLE: u32 = 65_537;
/// Every backend's egress MTU.
pub const MTU: usize = 1500;
/// The interface test runs arrive on: `lo` (BPF_PROG_TEST_RUN's default), ifindex 1, which is
/// also every fixture backend's egress unless moved.
pub const INGRESS_IFINDEX: u32 = 1;
/// An interface index no test run arrives on: backends moved there are "behind another
/// interface" (reached by redirect through DEVMAP, where nothing puts it).
pub const OTHER_IFINDEX: u32 = 1000;

pub const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const VIP_TUNNEL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
pub const VIP_5TUPLE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 30);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
pub const VIP6_TUNNEL: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x20);
pub const TUNNEL_SRC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const TUNNEL_SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);

/// The MAC of backend `id`: its id in the last byte.
pub fn mac(id: u32) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x0b, id as u8]
}

/// One service of the fixture.
pub struct Svc {
    pub vip: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub flags: u32,
    pub backends: Vec<IpAddr>,
    pub tunnel_src: Option<IpAddr>,
}

impl Svc {
    pub fn tunnel(&self) -> bool {
        self.flags & service_flags::TUNNEL != 0
    }

    pub fn five_tuple(&self) -> bool {
        self.flags & service_flags::HASH_5TUPLE != 0
    }
}

/// The five services, in service-id order.
pub fn services() -> Vec<Svc> {
    let v4 = |last: u8| IpAddr::V4(Ipv4Addr::new(192, 0, 2, last));
    let v6 = |last: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last));
    let svc = |vip: IpAddr, port, proto, flags, backends, tunnel_src| Svc {
        vip,
        port,
        proto,
        flags,
        backends,
        tunnel_src,
    };
    vec![
        svc(VIP.into(), 80, 6, 0, vec![v4(11), v4(12), v4(13)], None),
        svc(
            VIP6.into(),
            80,
            6,
            0,
            vec![v6(0x11), v6(0x12), v6(0x13)],
            None,
        ),
        svc(
            VIP_TUNNEL.into(),
            53,
            17,
            service_flags::TUNNEL,
            vec![v4(21), v4(22)],
            Some(TUNNEL_SRC.into()),
        ),
        svc(
            VIP_5TUPLE.into(),
            443,
            6,
            service_flags::HASH_5TUPLE,
            vec![v4(31), v4(32)],
            None,
        ),
        svc(
            VIP6_TUNNEL.into(),
            53,
            17,
            service_flags::TUNNEL,
            vec![v6(0x21), v6(0x22)],
            Some(TUNNEL_SRC6.into()),
        ),
    ]
}

/// A fresh pin folder for a test's data path: `/sys/fs/bpf/lbt-<tag>-<pid>-<n>`.
pub fn pin_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    PathBuf::from(format!(
        "/sys/fs/bpf/lbt-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Loads the program (not attached) with its maps pinned in `dir`; on failure removes what the
/// attempt pinned, then panics with the reason.
pub fn open_datapath(dir: &Path) -> Datapath {
    crate::require_root();
    // NAT tables of 16,384 flows, as the e2e harness's lbd: the default's 75 MB per fixture
    // add up when test binaries run side by side.
    match Datapath::open_sized(dir, 4096, 16_384, &[]) {
        Ok(dp) => dp,
        Err(e) => {
            let _ = datapath::cleanup(dir);
            panic!("loading the XDP program: {e}");
        }
    }
}

pub struct Fixture {
    pub dp: Datapath,
    pub dir: PathBuf,
    pub svcs: Vec<Svc>,
    /// Per service: (first backend id, Maglev table).
    pub tables: Vec<(u32, Vec<u32>)>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = datapath::cleanup(&self.dir);
    }
}

/// The program with the five services, their backends (ids numbered across services), tables
/// and VIP-level entries.
pub fn fixture(tag: &str) -> Fixture {
    let dir = pin_dir(tag);
    let mut dp = open_datapath(&dir);
    dp.set_config(SEED).unwrap();
    let mut next = 0u32;
    let mut tables = vec![];
    let mut vips = vec![];
    let svcs = services();
    for (sid, s) in svcs.iter().enumerate() {
        let first = next;
        let mut live = vec![];
        for addr in &s.backends {
            let b = Backend {
                addr: to_addr(*addr),
                tunnel_src: s.tunnel_src.map(to_addr).unwrap_or_default(),
                mac: mac(next),
                port: 0,
                src_mac: LB_MAC,
                ifindex: 1,
                service: sid as u32,
                family: family(*addr),
                flags: backend_flags::VALID,
                mtu: MTU as u16,
                ..Default::default()
            };
            dp.set_backend(next, &b).unwrap();
            live.push(MaglevBackend {
                id: next,
                addr: b.addr,
                salt: 0,
                weight: 100,
            });
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
        dp.set_service(&key, &value, &table).unwrap();
        let mut vip_value = value;
        if s.five_tuple() {
            vip_value.flags |= service_flags::NO_LATE_FRAGMENTS;
        }
        let vip_key = VipKey {
            addr: to_addr(s.vip),
            proto: s.proto,
            family: family(s.vip),
            _pad: [0; 2],
        };
        vips.push((vip_key, vip_value));
        tables.push((first, table));
    }
    dp.set_vips(&vips).unwrap();
    Fixture {
        dp,
        dir,
        svcs,
        tables,
    }
}

impl Fixture {
    /// The backend id lb-common chooses for client `src` of source-hashed service `sid`.
    pub fn predicted(&self, sid: usize, src: IpAddr) -> u32 {
        self.tables[sid].1[source_slot(&SEED, TABLE, &to_addr(src)).unwrap() as usize]
    }

    /// One run of the program on `frame`: the action and the frame it left.
    pub fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.dp.test_run(frame).unwrap()
    }

    /// The backend ids of service `sid`.
    pub fn backend_ids(&self, sid: usize) -> std::ops::Range<u32> {
        let first = self.tables[sid].0;
        first..first + self.svcs[sid].backends.len() as u32
    }

    /// Changes every backend entry of service `sid` with `change`.
    pub fn change_backends(&mut self, sid: usize, change: impl Fn(&mut Backend)) {
        for id in self.backend_ids(sid) {
            let mut b = self.dp.backend(id).unwrap();
            change(&mut b);
            self.dp.set_backend(id, &b).unwrap();
        }
    }

    /// Puts every backend of service `sid` behind interface `ifindex`.
    pub fn move_backends(&mut self, sid: usize, ifindex: u32) {
        self.change_backends(sid, |b| b.ifindex = ifindex);
    }

    /// Makes interface `ifindex` of network namespace `ns` a redirect target (`DEVMAP`), as lbd
    /// does for a backend's egress: the kernel checks the interface exists in the namespace of
    /// the thread that adds it.
    pub fn add_egress_in(&mut self, ns: &str, ifindex: u32) {
        let dp = &mut self.dp;
        crate::in_netns(ns, || Ok(dp.add_egress(ifindex)?))
            .unwrap_or_else(|e| panic!("adding ifindex {ifindex} of {ns} to DEVMAP: {e:#}"));
    }

    /// Packets counted as forwarded so far: by service `sid`, and by its backends together.
    pub fn forwarded(&self, sid: usize) -> (u64, u64) {
        let backends = self
            .backend_ids(sid)
            .map(|id| self.dp.backend_counter(id).packets)
            .sum();
        (self.dp.service_counter(sid as u32).packets, backends)
    }

    /// Gives service `sid` the client filter lists `allow` and `deny` (prefixes as written in
    /// the config; empty: no list), as lbd does: the prefixes first, then the service's flags
    /// in `SERVICES` and `VIPS`.
    pub fn set_lists(&mut self, sid: usize, allow: &[&str], deny: &[&str]) {
        let id = sid as u32;
        let mut entries: Vec<FilterEntry> = self
            .dp
            .fill()
            .filters
            .iter()
            .filter(|e| e.data.service != id)
            .copied()
            .collect();
        for (list, prefixes) in [(filter_list::DENY, deny), (filter_list::ALLOW, allow)] {
            for p in prefixes {
                let c: Cidr = p.parse().unwrap_or_else(|e| panic!("{e}"));
                entries.push(FilterEntry {
                    data: FilterData {
                        service: id,
                        list,
                        _pad: [0; 3],
                        addr: to_addr(c.addr),
                    },
                    len: c.len,
                });
            }
        }
        self.dp.set_filters(entries).unwrap();
        let lists = |flags: u32| {
            let mut f = flags & !(service_flags::HAS_ALLOW | service_flags::HAS_DENY);
            if !allow.is_empty() {
                f |= service_flags::HAS_ALLOW;
            }
            if !deny.is_empty() {
                f |= service_flags::HAS_DENY;
            }
            f
        };
        let s = &self.svcs[sid];
        let key = ServiceKey {
            addr: to_addr(s.vip),
            port: s.port.to_be(),
            proto: s.proto,
            family: family(s.vip),
        };
        let mut value = self.dp.fill().services[&key];
        value.flags = lists(value.flags);
        self.dp.set_service_key(&key, &value).unwrap();
        let vips: Vec<(VipKey, ServiceValue)> = self
            .dp
            .fill()
            .vips
            .iter()
            .map(|(k, v)| {
                let mut v = *v;
                if v.id == id {
                    v.flags = lists(v.flags);
                }
                (*k, v)
            })
            .collect();
        self.dp.set_vips(&vips).unwrap();
    }

    /// How many packets of service `sid` were counted under `r` so far.
    pub fn service_reason(&self, sid: usize, r: Reason) -> u64 {
        self.dp
            .service_reason_counts(sid as u32)
            .into_iter()
            .find(|(x, _)| *x == r)
            .unwrap()
            .1
    }

    /// How many packets were counted under `r` so far.
    pub fn reason(&self, r: Reason) -> u64 {
        self.dp
            .reason_counts()
            .into_iter()
            .find(|(x, _)| *x == r)
            .unwrap()
            .1
    }
}

/// The program's key of a TCP or UDP flow (`proto` 6 or 17), ports in host order.
pub fn flow_key(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8) -> lb_common::FlowKey {
    lb_common::FlowKey {
        src: to_addr(src),
        dst: to_addr(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        family: family(src),
        _pad: [0; 2],
    }
}
