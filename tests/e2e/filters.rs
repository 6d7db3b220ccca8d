//! Client filters (each service's `allow` and `deny` lists) and the per-service drop counters,
//! through BPF_PROG_TEST_RUN: the real program on the five-service fixture, run on hand-built
//! frames (the end-to-end test through lbd is in filters_lbd.rs). Needs root (fails loudly
//! without it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{NO_BACKEND, Reason};
use lb_tests::{
    cases::{Case, run_cases},
    dpfixture::{CLIENT_MAC, Fixture, LB_MAC, TABLE, VIP, VIP_5TUPLE, VIP6, XDP_DROP, XDP_TX, mac},
    packet::{Frame, ipv4_raw, ipv4_tcp, ipv6, ipv6_frag, ipv6_tcp},
};

/// The IPv4 and IPv6 dsr services of the fixture.
const V4: usize = 0;
const V6: usize = 1;

fn fixture() -> Fixture {
    lb_tests::dpfixture::fixture("flt")
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn syn4(src: Ipv4Addr) -> Frame {
    ipv4_tcp(CLIENT_MAC, LB_MAC, src, VIP, 40000, 80, 0x02, b"")
}

fn syn6(src: Ipv6Addr) -> Frame {
    ipv6_tcp(CLIENT_MAC, LB_MAC, src, VIP6, 40000, 80, 0x02, &[])
}

/// A case: `frame` from `src` to service `sid` is forwarded to its predicted backend (only the
/// MACs change), or dropped untouched.
fn case(f: &Fixture, sid: usize, src: IpAddr, frame: Frame, forwarded: bool, why: &str) -> Case {
    let what = format!("{src} to service {sid}: {why}");
    if !forwarded {
        return Case::gives(
            format!("{what}: dropped"),
            frame.bytes.clone(),
            XDP_DROP,
            frame.bytes,
        );
    }
    let mut out = frame.bytes.clone();
    out[0..6].copy_from_slice(&mac(f.predicted(sid, src)));
    out[6..12].copy_from_slice(&LB_MAC);
    Case::gives(format!("{what}: forwarded"), frame.bytes, XDP_TX, out)
}

fn c4(f: &Fixture, src: &str, forwarded: bool, why: &str) -> Case {
    let src = v4(src);
    case(f, V4, src.into(), syn4(src), forwarded, why)
}

fn c6(f: &Fixture, src: &str, forwarded: bool, why: &str) -> Case {
    let src = v6(src);
    case(f, V6, src.into(), syn6(src), forwarded, why)
}

#[test]
fn each_list_alone_and_both_decide_with_deny_first_for_ipv4_and_ipv6() {
    let mut f = fixture();

    // No lists: every client.
    let cases = vec![
        c4(&f, "198.51.100.66", true, "no lists"),
        c4(&f, "192.0.2.200", true, "no lists"),
        c6(&f, "2001:db8:c::66", true, "no lists"),
    ];
    run_cases("filters-none", &cases, |fr| f.run(fr));

    // A deny list alone: only its clients are dropped.
    f.set_lists(V4, &[], &["198.51.100.66/32", "192.0.2.128/25"]);
    f.set_lists(V6, &[], &["2001:db8:c::66/128", "2001:db8:d::/48"]);
    let cases = vec![
        c4(&f, "198.51.100.66", false, "deny /32"),
        c4(&f, "198.51.100.67", true, "next to deny /32"),
        c4(&f, "192.0.2.200", false, "in deny /25"),
        c4(&f, "192.0.2.127", true, "below deny /25"),
        c6(&f, "2001:db8:c::66", false, "deny /128"),
        c6(&f, "2001:db8:c::67", true, "next to deny /128"),
        c6(&f, "2001:db8:d:ffff::1", false, "in deny /48"),
        c6(&f, "2001:db8:e::1", true, "outside deny /48"),
    ];
    run_cases("filters-deny", &cases, |fr| f.run(fr));

    // An allow list alone: unlisted clients are dropped.
    f.set_lists(V4, &["198.51.100.0/24"], &[]);
    f.set_lists(V6, &["2001:db8:c::/48"], &[]);
    let cases = vec![
        c4(&f, "198.51.100.66", true, "in allow /24"),
        c4(&f, "198.51.100.1", true, "in allow /24"),
        c4(&f, "198.51.101.1", false, "unlisted"),
        c4(&f, "192.0.2.200", false, "unlisted"),
        c6(&f, "2001:db8:c::66", true, "in allow /48"),
        c6(&f, "2001:db8:c:1234::1", true, "in allow /48"),
        c6(&f, "2001:db8:d::1", false, "unlisted"),
    ];
    run_cases("filters-allow", &cases, |fr| f.run(fr));

    // Both, overlapping either way: deny /32 inside allow /24, allow /16 inside deny /8 (deny
    // wins over the longer allow prefix), and a client only the allow list has.
    f.set_lists(
        V4,
        &["198.51.100.0/24", "10.1.0.0/16"],
        &["198.51.100.66/32", "10.0.0.0/8"],
    );
    f.set_lists(
        V6,
        &["2001:db8:c::/48", "2001:db8:f:1::/64"],
        &["2001:db8:c::66/128", "2001:db8:f::/48"],
    );
    let cases = vec![
        c4(&f, "198.51.100.66", false, "deny /32 inside allow /24"),
        c4(&f, "198.51.100.65", true, "allow /24"),
        c4(&f, "10.1.2.3", false, "allow /16 inside deny /8"),
        c4(&f, "10.2.0.1", false, "deny /8"),
        c4(&f, "192.0.2.1", false, "on neither list"),
        c6(&f, "2001:db8:c::66", false, "deny /128 inside allow /48"),
        c6(&f, "2001:db8:c::65", true, "allow /48"),
        c6(&f, "2001:db8:f:1::1", false, "allow /64 inside deny /48"),
        c6(&f, "2001:db8:a::1", false, "on neither list"),
    ];
    run_cases("filters-both", &cases, |fr| f.run(fr));

    // Another service of the same VIP family is not filtered by these lists, and lists taken
    // away let every client in again.
    let five = ipv4_tcp(
        CLIENT_MAC,
        LB_MAC,
        v4("10.2.0.1"),
        VIP_5TUPLE,
        40000,
        443,
        0x02,
        b"",
    );
    assert_eq!(
        f.run(&five.bytes).0,
        XDP_TX,
        "the 5-tuple service has no lists"
    );
    f.set_lists(V4, &[], &[]);
    f.set_lists(V6, &[], &[]);
    assert!(f.dp.fill().filters.is_empty(), "every prefix removed");
    let cases = vec![
        c4(&f, "198.51.100.66", true, "lists removed"),
        c4(&f, "10.1.2.3", true, "lists removed"),
        c6(&f, "2001:db8:f:1::1", true, "lists removed"),
    ];
    run_cases("filters-removed", &cases, |fr| f.run(fr));
}

#[test]
fn later_fragments_of_a_denied_client_are_dropped_too() {
    let mut f = fixture();
    let datagram = |src: Ipv4Addr, id: u16| {
        let whole = ipv4_tcp(CLIENT_MAC, LB_MAC, src, VIP, 40000, 80, 0x10, &[7; 64]);
        let l4 = whole.bytes[34..].to_vec();
        let first = ipv4_raw(CLIENT_MAC, LB_MAC, src, VIP, 6, id, 0x2000, &l4[..48]);
        let later = ipv4_raw(CLIENT_MAC, LB_MAC, src, VIP, 6, id, 48 / 8, &l4[48..]);
        (first, later)
    };
    let (denied, allowed) = (v4("198.51.100.66"), v4("198.51.100.67"));
    f.set_lists(V4, &[], &["198.51.100.66/32"]);
    let before = f.service_reason(V4, Reason::Denied);
    // The first fragment, then a later one: both dropped (the later one finds no first
    // fragment's choice and is placed by the VIP's only service, whose lists refuse it).
    let (first, later) = datagram(denied, 0x5151);
    assert_eq!(f.run(&first.bytes).0, XDP_DROP, "first fragment");
    assert_eq!(f.run(&later.bytes).0, XDP_DROP, "later fragment");
    // A later fragment that comes first: dropped as well.
    let (_, orphan) = datagram(denied, 0x5252);
    assert_eq!(f.run(&orphan.bytes).0, XDP_DROP, "orphan later fragment");
    assert_eq!(f.service_reason(V4, Reason::Denied), before + 3);

    // A datagram begun while its client was allowed: once the client is denied, its later
    // fragments are dropped although the first fragment's choice is remembered.
    let (first, later) = datagram(allowed, 0x5353);
    assert_eq!(f.run(&first.bytes).0, XDP_TX);
    f.set_lists(V4, &[], &["198.51.100.66/32", "198.51.100.67/32"]);
    assert_eq!(
        f.run(&later.bytes).0,
        XDP_DROP,
        "denied after its first fragment"
    );
    assert_eq!(f.service_reason(V4, Reason::Denied), before + 4);

    // IPv6: the fragment header; a client outside the allow list.
    f.set_lists(V6, &["2001:db8:c::/48"], &[]);
    let out6 = v6("2001:db8:9::1");
    let first6 = ipv6_tcp(
        CLIENT_MAC,
        LB_MAC,
        out6,
        VIP6,
        40000,
        80,
        0x10,
        &[ipv6_frag(0, true, 91)],
    );
    let later6 = ipv6(
        CLIENT_MAC,
        LB_MAC,
        out6,
        VIP6,
        &[ipv6_frag(3, false, 91)],
        6,
        &[9; 24],
    );
    assert_eq!(f.run(&first6.bytes).0, XDP_DROP);
    assert_eq!(f.run(&later6.bytes).0, XDP_DROP);
    assert_eq!(f.service_reason(V6, Reason::Denied), 2);
    let in6 = v6("2001:db8:c::9");
    let later6 = ipv6(
        CLIENT_MAC,
        LB_MAC,
        in6,
        VIP6,
        &[ipv6_frag(3, false, 92)],
        6,
        &[9; 24],
    );
    assert_eq!(
        f.run(&later6.bytes).0,
        XDP_TX,
        "an allowed client's orphan fragment"
    );
}

#[test]
fn every_refusal_of_a_known_service_is_counted_for_it_and_the_totals_stay_the_sum() {
    let mut f = fixture();
    f.set_lists(V4, &[], &["198.51.100.66/32"]);
    f.set_lists(V6, &["2001:db8:c::/48"], &[]);
    let denied_before = f.reason(Reason::Denied);
    for _ in 0..5 {
        assert_eq!(f.run(&syn4(v4("198.51.100.66")).bytes).0, XDP_DROP);
    }
    for i in 0..3u16 {
        let src = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, i + 1);
        assert_eq!(f.run(&syn6(src).bytes).0, XDP_DROP);
    }
    let forwarded_before = f.forwarded(V4);
    assert_eq!(f.run(&syn4(v4("198.51.100.67")).bytes).0, XDP_TX);
    assert_eq!(
        f.forwarded(V4).0,
        forwarded_before.0 + 1,
        "allowed and counted as forwarded"
    );
    assert_eq!(f.service_reason(V4, Reason::Denied), 5);
    assert_eq!(f.service_reason(V6, Reason::Denied), 3);
    assert_eq!(f.service_reason(2, Reason::Denied), 0);
    assert_eq!(f.reason(Reason::Denied), denied_before + 8);

    // Another reason: no usable backend, on service 0 only.
    f.dp.swap_table(V4 as u32, &vec![NO_BACKEND; TABLE as usize])
        .unwrap();
    for _ in 0..4 {
        assert_eq!(f.run(&syn4(v4("198.51.100.67")).bytes).0, XDP_DROP);
    }
    assert_eq!(f.service_reason(V4, Reason::NoBackend), 4);
    assert_eq!(f.service_reason(V6, Reason::NoBackend), 0);
    // Denied comes first: a denied client of a service without backends counts as denied.
    assert_eq!(f.run(&syn4(v4("198.51.100.66")).bytes).0, XDP_DROP);
    assert_eq!(f.service_reason(V4, Reason::Denied), 6);
    assert_eq!(f.service_reason(V4, Reason::NoBackend), 4);

    // A refusal whose service is not known (an orphan later fragment of a 5-tuple VIP, which
    // no single service places) is counted in the total only.
    let l4 = ipv4_tcp(
        CLIENT_MAC,
        LB_MAC,
        v4("198.51.100.5"),
        VIP_5TUPLE,
        1,
        443,
        0x10,
        &[7; 64],
    );
    let orphan = ipv4_raw(
        CLIENT_MAC,
        LB_MAC,
        v4("198.51.100.5"),
        VIP_5TUPLE,
        6,
        0x6161,
        6,
        &l4.bytes[82..],
    );
    assert_eq!(f.run(&orphan.bytes).0, lb_tests::cases::XDP_PASS);
    let per_service =
        |r: Reason| -> u64 { (0..f.svcs.len()).map(|s| f.service_reason(s, r)).sum() };
    assert_eq!(f.reason(Reason::UnsupportedFragment), 1);
    assert_eq!(per_service(Reason::UnsupportedFragment), 0);
    // Every other reason: the total is the services' sum.
    for r in Reason::ALL {
        if r != Reason::UnsupportedFragment {
            assert_eq!(f.reason(r), per_service(r), "{r:?}");
        }
    }
}

#[test]
fn ten_thousand_prefixes_on_a_list_hold_and_decide() {
    let mut f = fixture();
    // 10,000 /32s in 10.0.0.0/16 and a /24 allow list beside them.
    let deny: Vec<String> = (0..10_000u32)
        .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
        .collect();
    let deny: Vec<&str> = deny.iter().map(String::as_str).collect();
    f.set_lists(V4, &["10.0.0.0/16", "198.51.100.0/24"], &deny);
    assert_eq!(f.dp.fill().filters.len(), 10_002);
    let cases = vec![
        c4(&f, "10.0.0.0", false, "first of 10,000 denied"),
        c4(&f, "10.0.39.15", false, "last of 10,000 denied"),
        c4(&f, "10.0.39.16", true, "allowed beyond them"),
        c4(&f, "198.51.100.7", true, "allowed"),
        c4(&f, "192.0.2.7", false, "on neither list"),
    ];
    run_cases("filters-10k", &cases, |fr| f.run(fr));
}

/// The verifier's work stays within its limit of 1,000,000 instructions with room to spare.
/// The client filters' lookups are a call of their own (inlined, the check alone took it to
/// 728,498 from 361,177); with the flood protection's eviction by kind it measured 751,841,
/// with `lbctl trace`'s verdict and start 785,460, with NAT forwarding (its work in global functions,
/// verified once on their own) 805,984; with the trace's checks moved into a program of their
/// own (`lb_xdp_traced`, swapped in only while a trace runs) 785,129 and 803,177; with NAT's
/// quoted transport checksums and reply counters 794,890 and 812,938; with the common frame
/// parsed inline and default-size Maglev tables read inline 835,377 and 855,672. Both count.
/// A change that takes it past 900,000 must buy the room back first.
#[test]
fn the_verifier_keeps_its_headroom() {
    let mut f = fixture();
    let verified = |id: u32| {
        aya::programs::loaded_programs()
            .filter_map(|p| p.ok())
            .find(|p| p.id() == id)
            .expect("the program is loaded")
            .verified_instruction_count()
            .expect("the kernel reports verified_insns")
    };
    let plain = verified(f.dp.program_id());
    // The traced program (`lbctl trace`), loaded and swapped in as a trace does (no link
    // here: nothing is attached).
    f.dp.set_traced(true).expect("loading the traced program");
    let traced_id = f.dp.program_id();
    let traced = verified(traced_id);
    f.dp.set_traced(false).expect("back to the plain program");
    assert_ne!(f.dp.program_id(), traced_id);
    eprintln!("verified_insns: {plain} (lb_xdp), {traced} (lb_xdp_traced)");
    for (name, n) in [("lb_xdp", plain), ("lb_xdp_traced", traced)] {
        assert!(
            n < 900_000,
            "the verifier processed {n} instructions for {name} (limit 1,000,000)"
        );
    }
}
