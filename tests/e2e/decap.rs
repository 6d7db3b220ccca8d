//! The backends' decapsulation program (`lbd decap`): byte-exact BPF_PROG_TEST_RUN fixtures
//! (only tunnel packets from an allowed source to an address of this host are unwrapped, the
//! others counted by why), `lbd decap` run twice and removed in a namespace, spoofed tunnel
//! packets sent to a backend, and a `tunnel` service end to end (lbd encapsulates, each
//! backend's `lbd decap --allow` strips, the backend answers the client directly). Needs root
//! (fails loudly without it).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::decap::{AddrKey, Stat, addr_flags};
use lb_tests::{
    Topology, TopologyOptions, big_file_contents,
    lbd::{LbdPaths, bin, decap_dir, lbd_decap, start_lbd},
    packet::{Frame, checksum, ipv4_raw, ipv4_tcp, ipv4_udp, ipv6_tcp},
    require_root,
};
use lb_userspace::{
    datapath,
    decap::{self, Cidr, Decap, addr_key},
};

const XDP_PASS: u32 = 2;

const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x02];
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0b, 0x01];
const LB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const BACKEND: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const OTHER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 12);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x12);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 7);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 0x20);

// ---- fixtures through BPF_PROG_TEST_RUN --------------------------------------------------------

/// The program loaded through lbd's code, its address map pinned in a folder of its own.
struct Fixture {
    decap: Decap,
    dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The sources the fixtures allow: the LB (in 192.0.2.0/30) and its IPv6 address.
const ALLOWED: [&str; 2] = ["192.0.2.0/30", "2001:db8::2/128"];

/// A fixture whose interface holds `own`, whose host also holds the VIPs, allowing `ALLOWED`.
fn fixture(own: &[IpAddr]) -> Fixture {
    fixture_with(own, &[VIP.into(), VIP6.into()], &ALLOWED)
}

fn fixture_with(own: &[IpAddr], host: &[IpAddr], allow: &[&str]) -> Fixture {
    require_root();
    static N: AtomicU32 = AtomicU32::new(0);
    // `lbt<pid>x<n>-...`: the harness reaps it should this process die before its Drop.
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/lbt{}x0-dcrun{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    datapath::prepare_bpffs(&dir).expect("bpffs folder");
    let mut decap = Decap::load(&dir, "test0").expect("loading the decapsulation program");
    // The addresses filled directly through the pin, as an outsider would.
    let pin = decap::addrs_pin(&dir, "test0");
    let mut map: HashMap<MapData, AddrKey, u8> =
        HashMap::try_from(Map::from_map_data(MapData::from_pin(&pin).unwrap()).unwrap()).unwrap();
    for a in own {
        map.insert(addr_key(*a), addr_flags::OUTER | addr_flags::INNER, 0)
            .unwrap();
    }
    for a in host {
        map.insert(addr_key(*a), addr_flags::INNER, 0).unwrap();
    }
    let allow: Vec<Cidr> = allow.iter().map(|c| c.parse().unwrap()).collect();
    decap.set_allowed(&allow).unwrap();
    Fixture { decap, dir }
}

impl Fixture {
    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.decap.test_run(frame).expect("test run")
    }

    /// `frame` decapsulates to exactly `inner`, and the kernel gets it.
    fn strips(&self, what: &str, frame: &[u8], inner: &[u8]) {
        let (action, out) = self.run(frame);
        assert_eq!(action, XDP_PASS, "{what}: action");
        assert_eq!(out, inner, "{what}: not exactly the inner frame");
    }

    fn passes_unchanged(&self, what: &str, frame: &[u8]) {
        let (action, out) = self.run(frame);
        assert_eq!(action, XDP_PASS, "{what}: action");
        assert_eq!(out, frame, "{what}: the frame was changed");
    }
}

/// The L2 header length of `f` (14, or 18 with a VLAN tag).
fn l2_len(f: &Frame) -> usize {
    if f.bytes[12..14] == [0x81, 0x00] {
        18
    } else {
        14
    }
}

/// `inner` (a frame) wrapped in an outer IPv4 header `src` → `dst` of protocol `proto`: the
/// frame LB sends a backend.
fn ipip(inner: &Frame, src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Vec<u8> {
    let l2 = l2_len(inner);
    let ip = &inner.bytes[l2..];
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + ip.len()) as u16).to_be_bytes());
    h[6] = 0x40;
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let mut b = inner.bytes[..l2].to_vec();
    b.extend_from_slice(&h);
    b.extend_from_slice(ip);
    b
}

/// `inner` wrapped in an outer IPv6 header `src` → `dst` with next header `next`.
fn ip6ip6(inner: &Frame, src: Ipv6Addr, dst: Ipv6Addr, next: u8) -> Vec<u8> {
    let l2 = l2_len(inner);
    let ip = &inner.bytes[l2..];
    let mut b = inner.bytes[..l2].to_vec();
    b.extend_from_slice(&[0x60, 0, 0, 0]);
    b.extend_from_slice(&(ip.len() as u16).to_be_bytes());
    b.push(next);
    b.push(64);
    b.extend_from_slice(&src.octets());
    b.extend_from_slice(&dst.octets());
    b.extend_from_slice(ip);
    b
}

fn inner_v4(payload: &[u8]) -> Frame {
    ipv4_tcp(LB_MAC, BACKEND_MAC, CLIENT, VIP, 40000, 80, 0x18, payload)
}

fn inner_v6() -> Frame {
    ipv6_tcp(LB_MAC, BACKEND_MAC, CLIENT6, VIP6, 40000, 80, 0x02, &[])
}

fn own() -> Vec<IpAddr> {
    vec![BACKEND.into(), BACKEND6.into()]
}

#[test]
fn ipip_to_an_own_address_becomes_exactly_the_inner_frame() {
    let f = fixture(&own());
    let inner = inner_v4(b"GET / HTTP/1.0\r\n\r\n");
    f.strips("IPv4-in-IPv4", &ipip(&inner, LB, BACKEND, 4), &inner.bytes);

    let inner6 = inner_v6();
    let (action, out) = f.run(&ip6ip6(&inner6, LB6, BACKEND6, 41));
    assert_eq!(action, XDP_PASS);
    assert_eq!(
        out, inner6.bytes,
        "IPv6-in-IPv6: not exactly the inner frame"
    );
    assert_eq!(out[12..14], [0x86, 0xdd], "ethertype of the inner family");

    // The VLAN tag stays, the ethertype behind it too.
    let tagged = inner.clone().with_vlan(42);
    f.strips(
        "IPv4-in-IPv4 behind a VLAN tag",
        &ipip(&tagged, LB, BACKEND, 4),
        &tagged.bytes,
    );
    assert_eq!(tagged.bytes[12..18], [0x81, 0x00, 0, 42, 0x08, 0x00]);
    let tagged6 = inner6.with_vlan(7);
    f.strips(
        "IPv6-in-IPv6 behind a VLAN tag",
        &ip6ip6(&tagged6, LB6, BACKEND6, 41),
        &tagged6.bytes,
    );

    // Ethernet padding after the outer packet stays after the inner one (the kernel trims it).
    let mut padded = ipip(&inner_v4(b""), LB, BACKEND, 4);
    padded.extend_from_slice(&[0; 6]);
    let mut expected = inner_v4(b"").bytes;
    expected.extend_from_slice(&[0; 6]);
    f.strips("padded frame", &padded, &expected);

    // A large inner packet.
    let big = inner_v4(&[0xab; 1400]);
    f.strips(
        "1460-byte inner packet",
        &ipip(&big, LB, BACKEND, 4),
        &big.bytes,
    );
}

#[test]
fn everything_else_passes_unchanged() {
    let f = fixture(&own());
    let inner = inner_v4(b"x");
    let inner6 = inner_v6();

    f.passes_unchanged(
        "IPv4-in-IPv4 to another address",
        &ipip(&inner, LB, OTHER, 4),
    );
    f.passes_unchanged(
        "IPv6-in-IPv6 to another address",
        &ip6ip6(&inner6, LB6, OTHER6, 41),
    );
    f.passes_unchanged(
        "IPv4-in-IPv4 to the VIP (not an own address)",
        &ipip(&inner, LB, VIP, 4),
    );
    // Plain packets to the own addresses.
    f.passes_unchanged(
        "plain TCP/IPv4",
        &ipv4_tcp(LB_MAC, BACKEND_MAC, CLIENT, BACKEND, 1, 80, 0x02, b"").bytes,
    );
    f.passes_unchanged(
        "plain TCP/IPv6",
        &ipv6_tcp(LB_MAC, BACKEND_MAC, CLIENT6, BACKEND6, 1, 80, 0x02, &[]).bytes,
    );
    f.passes_unchanged(
        "plain TCP/IPv4 with a VLAN tag",
        &ipv4_tcp(LB_MAC, BACKEND_MAC, CLIENT, BACKEND, 1, 80, 0x02, b"")
            .with_vlan(3)
            .bytes,
    );
    // Mixed families are not this program's (IPv6-in-IPv4, IPv4-in-IPv6).
    let mut six_in_four = ipip(&inner6, LB, BACKEND, 41);
    six_in_four[12..14].copy_from_slice(&[0x08, 0x00]);
    f.passes_unchanged("IPv6-in-IPv4", &six_in_four);
    let mut four_in_six = ip6ip6(&inner, LB6, BACKEND6, 4);
    four_in_six[12..14].copy_from_slice(&[0x86, 0xdd]);
    f.passes_unchanged("IPv4-in-IPv6", &four_in_six);
    // An outer protocol of 4 whose payload is no IPv4 header, or 41 with no IPv6 header.
    let mut not_v4 = ipip(&inner, LB, BACKEND, 4);
    not_v4[34] = 0x65;
    f.passes_unchanged("IPv4-in-IPv4 with inner version 6", &not_v4);
    let mut not_v6 = ip6ip6(&inner6, LB6, BACKEND6, 41);
    not_v6[54] = 0x45;
    f.passes_unchanged("IPv6-in-IPv6 with inner version 4", &not_v6);
    // Outer IPv4 with options, or a fragment of a tunnel packet.
    let with_options = {
        let ip = &inner.bytes[14..];
        let mut l4 = vec![0x01, 0x01, 0x01, 0x00];
        l4.extend_from_slice(ip);
        let mut fr = ipv4_raw(LB_MAC, BACKEND_MAC, LB, BACKEND, 4, 1, 0x4000, &l4);
        // Turn the 4 leading payload bytes (NOPs, EOL) into header options: IHL 6.
        fr.bytes[14] = 0x46;
        let c = {
            fr.bytes[24..26].copy_from_slice(&[0, 0]);
            checksum(&fr.bytes[14..38], 0)
        };
        fr.bytes[24..26].copy_from_slice(&c.to_be_bytes());
        fr.bytes
    };
    f.passes_unchanged("outer IPv4 with options", &with_options);
    let fragment = ipv4_raw(
        LB_MAC,
        BACKEND_MAC,
        LB,
        BACKEND,
        4,
        9,
        0x2000,
        &inner.bytes[14..],
    );
    f.passes_unchanged("first fragment of a tunnel packet", &fragment.bytes);
    let later = ipv4_raw(
        LB_MAC,
        BACKEND_MAC,
        LB,
        BACKEND,
        4,
        9,
        0x0010,
        &inner.bytes[14..],
    );
    f.passes_unchanged("later fragment of a tunnel packet", &later.bytes);
    // Outer lengths that do not match the frame.
    let mut long = ipip(&inner, LB, BACKEND, 4);
    let n = u16::from_be_bytes([long[16], long[17]]) + 1;
    long[16..18].copy_from_slice(&n.to_be_bytes());
    f.passes_unchanged("outer IPv4 total length past the frame", &long);
    let mut short = ipip(&inner, LB, BACKEND, 4);
    short[16..18].copy_from_slice(&39u16.to_be_bytes());
    f.passes_unchanged("outer IPv4 total length short of an inner header", &short);
    let mut long6 = ip6ip6(&inner6, LB6, BACKEND6, 41);
    let n = u16::from_be_bytes([long6[18], long6[19]]) + 1;
    long6[18..20].copy_from_slice(&n.to_be_bytes());
    f.passes_unchanged("outer IPv6 payload length past the frame", &long6);
    // Not IP at all.
    let mut arp = inner.bytes.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    f.passes_unchanged("ARP", &arp);

    // With no own address, nothing is stripped.
    let empty = fixture(&[]);
    empty.passes_unchanged("IPv4-in-IPv4, empty map", &ipip(&inner, LB, BACKEND, 4));
    empty.passes_unchanged(
        "IPv6-in-IPv6, empty map",
        &ip6ip6(&inner6, LB6, BACKEND6, 41),
    );
}

/// A host on the backends' segment that is no balancer.
const SPOOFER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);
const SPOOFER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99);

#[test]
fn only_allowed_sources_to_this_hosts_addresses_are_unwrapped() {
    let f = fixture(&own());
    let inner = inner_v4(b"x");
    let inner6 = inner_v6();
    // From inside the allowed prefixes, to the VIP (held by the host): unwrapped.
    f.strips("from the LB", &ipip(&inner, LB, BACKEND, 4), &inner.bytes);
    let first = Ipv4Addr::new(192, 0, 2, 1);
    f.strips(
        "from 192.0.2.1, in 192.0.2.0/30",
        &ipip(&inner, first, BACKEND, 4),
        &inner.bytes,
    );
    f.strips(
        "IPv6 from the LB",
        &ip6ip6(&inner6, LB6, BACKEND6, 41),
        &inner6.bytes,
    );
    // An inner packet to the interface's own address: that is the host's too.
    let to_backend = ipv4_tcp(LB_MAC, BACKEND_MAC, CLIENT, BACKEND, 40000, 22, 0x02, b"");
    f.strips(
        "to the backend's own address",
        &ipip(&to_backend, LB, BACKEND, 4),
        &to_backend.bytes,
    );

    // From anywhere else: passed up unchanged.
    f.passes_unchanged(
        "IPv4-in-IPv4 from a source outside --allow",
        &ipip(&inner, SPOOFER, BACKEND, 4),
    );
    f.passes_unchanged(
        "IPv4-in-IPv4 from 192.0.2.4, just past 192.0.2.0/30",
        &ipip(&inner, Ipv4Addr::new(192, 0, 2, 4), BACKEND, 4),
    );
    f.passes_unchanged(
        "IPv6-in-IPv6 from a source outside --allow",
        &ip6ip6(&inner6, SPOOFER6, BACKEND6, 41),
    );
    // To an inner destination that is no address of this host: passed up unchanged.
    let elsewhere = ipv4_tcp(LB_MAC, BACKEND_MAC, CLIENT, OTHER, 40000, 80, 0x02, b"");
    f.passes_unchanged(
        "inner destination not of this host",
        &ipip(&elsewhere, LB, BACKEND, 4),
    );
    let elsewhere6 = ipv6_tcp(LB_MAC, BACKEND_MAC, CLIENT6, OTHER6, 40000, 80, 0x02, &[]);
    f.passes_unchanged(
        "IPv6 inner destination not of this host",
        &ip6ip6(&elsewhere6, LB6, BACKEND6, 41),
    );
    // Each counted by why.
    assert_eq!(
        f.decap.stats(),
        vec![
            (Stat::Decapsulated, 4),
            (Stat::SourceNotAllowed, 3),
            (Stat::InnerNotLocal, 2),
            (Stat::Malformed, 0)
        ]
    );

    // Nothing allowed: nothing unwrapped.
    let none = fixture_with(&own(), &[VIP.into()], &[]);
    none.passes_unchanged(
        "from the LB, nothing allowed",
        &ipip(&inner, LB, BACKEND, 4),
    );
    // Everything allowed (0.0.0.0/0): an IPv4 prefix allows no IPv6 source.
    let all4 = fixture_with(&own(), &[VIP.into(), VIP6.into()], &["0.0.0.0/0"]);
    all4.strips(
        "from a spoofer, 0.0.0.0/0 allowed",
        &ipip(&inner, SPOOFER, BACKEND, 4),
        &inner.bytes,
    );
    all4.passes_unchanged(
        "IPv6 from the LB, only 0.0.0.0/0 allowed",
        &ip6ip6(&inner6, LB6, BACKEND6, 41),
    );
}

#[test]
fn truncated_tunnel_packets_pass_unchanged_at_every_length() {
    let f = fixture(&own());
    let inner = inner_v4(b"0123456789");
    let inner6 = inner_v6();
    let frames = [
        ("IPv4-in-IPv4", ipip(&inner, LB, BACKEND, 4)),
        ("IPv6-in-IPv6", ip6ip6(&inner6, LB6, BACKEND6, 41)),
        (
            "IPv4-in-IPv4 with VLAN",
            ipip(&inner.clone().with_vlan(5), LB, BACKEND, 4),
        ),
        (
            "IPv6-in-IPv6 with VLAN",
            ip6ip6(&inner6.clone().with_vlan(5), LB6, BACKEND6, 41),
        ),
    ];
    for (what, full) in &frames {
        // The whole frame is stripped: the cut ones are not.
        assert_ne!(
            f.run(full).1,
            *full,
            "{what}: the whole frame is decapsulated"
        );
        // BPF_PROG_TEST_RUN refuses frames under 14 bytes.
        for len in 14..full.len() {
            f.passes_unchanged(&format!("{what} cut to {len} bytes"), &full[..len]);
        }
    }
}

// ---- lbd decap in a namespace ---------------------------------------------------------------

fn assert_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The ids of the XDP programs `ip link show eth0` reports in `ns`.
fn xdp_ids(ns: &str) -> Vec<u32> {
    let out = Command::new("ip")
        .args(["-n", ns, "link", "show", "eth0"])
        .output()
        .expect("ip link show");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .collect::<Vec<_>>()
        .windows(3)
        .filter(|w| w[0].starts_with("prog/xdp") && w[1] == "id")
        .map(|w| w[2].parse().expect("program id"))
        .collect()
}

#[test]
fn lbd_decap_twice_changes_nothing_and_remove_detaches() {
    require_root();
    let t = Topology::new(TopologyOptions {
        backends: 1,
        clients: 0,
        start_servers: false,
        ..Default::default()
    })
    .expect("topology");
    let ns = t.backend_ns(1).to_string();
    let dir = decap_dir(&t, 1);

    // Without --allow the first time: a clear error, nothing attached or pinned.
    let out = lbd_decap(&t, &ns, &dir, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("needs --allow"),
        "{err}"
    );
    assert!(xdp_ids(&ns).is_empty());
    assert!(!dir.exists(), "pins left in {}", dir.display());
    // A prefix with host bits set: refused, naming the prefix meant.
    let out = lbd_decap(&t, &ns, &dir, &["--allow", "192.0.2.2/24"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("192.0.2.0/24"),
        "{err}"
    );
    assert!(!dir.exists());

    let first = lbd_decap(&t, &ns, &dir, &["--allow", "192.0.2.2/32"]);
    assert_ok("first lbd decap", &first);
    let ids = xdp_ids(&ns);
    assert_eq!(ids.len(), 1, "one XDP program on eth0: {ids:?}");
    assert!(dir.join("link_eth0").exists());
    let log = String::from_utf8_lossy(&first.stderr);
    assert!(log.contains("attached in native mode"), "{log}");
    assert!(
        log.contains("192.0.2.11"),
        "the address map names eth0's address: {log}"
    );
    assert!(log.contains("from 192.0.2.2/32"), "{log}");

    // Without --allow, a later run keeps the pinned list.
    let second = lbd_decap(&t, &ns, &dir, &[]);
    assert_ok("second lbd decap", &second);
    assert_eq!(xdp_ids(&ns), ids, "the same program, still the only one");
    let log = String::from_utf8_lossy(&second.stderr);
    assert!(log.contains("kept"), "{log}");
    assert!(!log.contains("added"), "the map was up to date: {log}");
    assert!(log.contains("from 192.0.2.2/32"), "{log}");

    // A new address: a third run adds it and keeps the program.
    t.exec_ok(&ns, &["ip", "addr", "add", "192.0.2.211/24", "dev", "eth0"])
        .unwrap();
    let third = lbd_decap(&t, &ns, &dir, &["--allow", "192.0.2.0/28"]);
    assert_ok("third lbd decap", &third);
    assert_eq!(xdp_ids(&ns), ids);
    let log = String::from_utf8_lossy(&third.stderr);
    assert!(log.contains("added 192.0.2.211"), "{log}");
    assert!(
        log.contains("allowed sources: added 192.0.2.0/28; removed 192.0.2.2/32"),
        "--allow replaces the list: {log}"
    );
    let status = lbd_decap(&t, &ns, &dir, &["--status"]);
    assert_ok("lbd decap --status", &status);
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(
        out.contains("192.0.2.0/28") && out.contains("192.0.2.211") && out.contains("decapsulated"),
        "{out}"
    );

    // Maps pinned under an older layout's names (as an lbd decap of layout 1 left them): the
    // program is swapped in through the link with maps of this layout, the old pins removed.
    for kind in ["addrs", "allow", "stats"] {
        std::fs::rename(
            dir.join(format!("{kind}_v{}_eth0", lb_common::decap::LAYOUT_VERSION)),
            dir.join(format!("{kind}_v1_eth0")),
        )
        .unwrap();
    }
    let upgraded = lbd_decap(&t, &ns, &dir, &["--allow", "192.0.2.0/28"]);
    assert_ok("lbd decap over an older layout", &upgraded);
    let log = String::from_utf8_lossy(&upgraded.stderr);
    assert!(log.contains("replaced by program"), "{log}");
    assert!(log.contains("a map of an older layout"), "{log}");
    assert_eq!(xdp_ids(&ns).len(), 1, "still one XDP program on eth0");
    for kind in ["addrs", "allow", "stats"] {
        assert!(
            !dir.join(format!("{kind}_v1_eth0")).exists(),
            "{kind}_v1 left"
        );
        assert!(
            dir.join(format!("{kind}_v{}_eth0", lb_common::decap::LAYOUT_VERSION))
                .exists()
        );
    }

    let removed = lbd_decap(&t, &ns, &dir, &["--remove"]);
    assert_ok("lbd decap --remove", &removed);
    assert!(xdp_ids(&ns).is_empty(), "still attached after --remove");
    assert!(!dir.exists(), "pins left in {}", dir.display());
    // Removing again: nothing to do, not an error.
    assert_ok("second --remove", &lbd_decap(&t, &ns, &dir, &["--remove"]));

    // An interface that does not exist is a clear error.
    let mut cmd = Command::new(bin("lbd"));
    cmd.args(["decap", "--interface", "nosuch0", "--bpffs-dir"])
        .arg(&dir);
    let out = t.nsenter_output(&ns, &cmd).unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no interface nosuch0"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.exists());
}

// ---- a tunnel service end to end -------------------------------------------------------------

const TUNNEL_VIP: &str = "203.0.113.20";
const SEED_HEX: &str = "5f0c1d2e3f4051627384950a1b2c3d4e";

fn tunnel_config(paths: &LbdPaths) -> String {
    let mut c = paths.daemon_section(&format!("hash_seed = \"{SEED_HEX}\""));
    c.push_str(&format!(
        r#"
[[service]]
name = "tun"
vip = "{TUNNEL_VIP}"
port = 80
protocol = "tcp"
forwarding = "tunnel"

[[service.backend]]
address = "192.0.2.11"

[[service.backend]]
address = "192.0.2.12"

[[service.backend]]
address = "192.0.2.13"
"#
    ));
    c
}

/// rx packets of eth0 in `ns`.
fn rx_packets(ns: &str) -> u64 {
    let out = Command::new("ip")
        .args(["-j", "-s", "-n", ns, "link", "show", "eth0"])
        .output()
        .expect("ip -s link");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no rx packets in {v}"))
}

#[test]
fn tunnel_service_reaches_decapsulating_backends_which_answer_directly() {
    require_root();
    let t = Topology::new(TopologyOptions {
        vips: vec![TUNNEL_VIP.parse().unwrap()],
        ..Default::default()
    })
    .expect("topology");
    let paths = LbdPaths::for_topology(&t);
    let lbd = start_lbd(&t, &tunnel_config(&paths)).expect("starting lbd");

    for i in 1..=t.backends() {
        let dir = decap_dir(&t, i);
        let out = lbd_decap(&t, t.backend_ns(i), &dir, &["--allow", "192.0.2.2/32"]);
        assert_ok(&format!("lbd decap on backend {i}"), &out);
    }

    let vip = SocketAddr::new(TUNNEL_VIP.parse().unwrap(), 80);
    let service_packets = || -> u64 {
        let stats = lbd.lbctl_json(&["stats"]).unwrap();
        stats["services"][0]["packets"].as_u64().unwrap()
    };
    let lb_rx_before = rx_packets(t.lb_ns());
    let packets_before = service_packets();

    let sources = t.all_client_sources();
    assert!(sources.len() >= 40, "{} client addresses", sources.len());
    let mut per_backend: BTreeMap<usize, usize> = BTreeMap::new();
    for &src in &sources {
        let v = lbd
            .lbctl_json(&["lookup", "tun", &src.to_string()])
            .expect("lbctl lookup");
        let predicted: IpAddr = v["backend"]
            .as_str()
            .unwrap_or_else(|| panic!("lookup of {src} names no backend: {v}"))
            .parse()
            .unwrap();
        let expected = (1..=t.backends())
            .find(|&i| t.backend_addr(i) == predicted)
            .unwrap_or_else(|| panic!("lookup names {predicted}, not a backend"));
        for attempt in 0..3 {
            let got = t.which_backend(src, vip).unwrap_or_else(|e| {
                panic!(
                    "GET {attempt} from {src} to the tunnel VIP: {e:#}\nlbd log:\n{}",
                    lbd.log()
                )
            });
            assert_eq!(
                got, expected,
                "client {src}: served by backend {got}, lbctl lookup names {expected}"
            );
        }
        *per_backend.entry(expected).or_default() += 1;
    }
    eprintln!("clients per backend: {per_backend:?}");
    for b in 1..=t.backends() {
        assert!(
            per_backend.get(&b).copied().unwrap_or(0) > 0,
            "backend {b} served no client: {per_backend:?}"
        );
    }

    // Direct server return: only client → VIP packets cross the balancer. Every TCP exchange
    // has about as many packets back as forth; had the answers gone through the balancer, its
    // eth0 would have received about twice what its service counted.
    let counted = service_packets() - packets_before;
    let received = rx_packets(t.lb_ns()) - lb_rx_before;
    eprintln!("balancer: {counted} packets counted for the service, {received} received on eth0");
    let connections = (sources.len() * 3) as u64;
    assert!(
        counted >= connections * 4,
        "{counted} packets for {connections} connections"
    );
    assert!(
        received < counted + counted / 10 + 20,
        "the balancer received {received} packets but counted {counted} client → VIP ones: answers went through it"
    );

    // A whole /big: the answer does not go through the tunnel, so its size does not matter.
    let src = t.client_sources(1)[0];
    let reply = t
        .http_get(t.client_ns(1), src, vip, "/big")
        .expect("GET /big through the tunnel");
    assert_eq!(reply.status, 200);
    assert!(reply.body == big_file_contents(), "the /big bytes differ");
}

// ---- spoofed tunnel packets --------------------------------------------------------------------

/// An IPv4 UDP packet (no link header) from a client's address to `dst`:5300 carrying `tag`.
fn inner_udp(dst: Ipv4Addr, tag: &str) -> Vec<u8> {
    let client = Ipv4Addr::new(198, 51, 100, 1);
    ipv4_udp(LB_MAC, BACKEND_MAC, client, dst, 4000, 5300, tag.as_bytes()).bytes[14..].to_vec()
}

#[test]
fn spoofed_tunnel_packets_are_not_unwrapped() {
    require_root();
    let vip: Ipv4Addr = TUNNEL_VIP.parse().unwrap();
    let t = Topology::new(TopologyOptions {
        backends: 1,
        clients: 1,
        addresses_per_client: 2,
        vips: vec![vip.into()],
        start_servers: false,
        ..Default::default()
    })
    .expect("topology");
    let ns = t.backend_ns(1).to_string();
    let dir = decap_dir(&t, 1);
    // Only the balancer (192.0.2.2) may send tunnel packets.
    assert_ok(
        "lbd decap",
        &lbd_decap(&t, &ns, &dir, &["--allow", "192.0.2.2/32"]),
    );
    let backend = t.backend_addr(1);
    // What the inner packets are sent to: a UDP socket on the VIP, held by the backend on lo.
    let socket = t
        .in_netns(&ns, || Ok(std::net::UdpSocket::bind((vip, 5300))?))
        .unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let counter = |name: &str| -> u64 {
        let out = lbd_decap(&t, &ns, &dir, &["--status"]);
        assert_ok("lbd decap --status", &out);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} counter in:\n{text}"))
    };

    // From a host on the segment that is no balancer: refused, counted.
    t.send_ip(t.client_ns(1), backend, 4, &inner_udp(vip, "spoofed"))
        .unwrap();
    lb_tests::wait_until(
        std::time::Duration::from_secs(5),
        "the spoofed packet to be counted",
        || counter("source_not_allowed") >= 1,
    )
    .unwrap();
    // To an address that is not the host's, from the balancer: refused, counted.
    let elsewhere = Ipv4Addr::new(203, 0, 113, 99);
    t.send_ip(t.lb_ns(), backend, 4, &inner_udp(elsewhere, "elsewhere"))
        .unwrap();
    lb_tests::wait_until(
        std::time::Duration::from_secs(5),
        "the packet to another host to be counted",
        || counter("inner_not_local") >= 1,
    )
    .unwrap();
    // From the balancer to the VIP: delivered, and it is the first packet the socket gets.
    t.send_ip(t.lb_ns(), backend, 4, &inner_udp(vip, "from the balancer"))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = socket
        .recv(&mut buf)
        .expect("the balancer's packet arrives");
    assert_eq!(
        String::from_utf8_lossy(&buf[..n]),
        "from the balancer",
        "the spoofed packet from {} was unwrapped and delivered",
        t.client_addr(1)
    );
    assert_eq!(counter("decapsulated"), 1);
}
