//! Packet-level fixtures through BPF_PROG_TEST_RUN for the complete data path: IPv6 (with
//! extension headers), fragments, ICMP errors about flows, tunnel encapsulation compared byte
//! for byte. Needs root (fails loudly without it).

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{EtherType, Ethernet2Header, IpHeaders, IpNumber, Ipv4Header, PacketBuilder};
use lb_common::{
    Reason, TOO_BIG_BURST, TOO_BIG_PER_SECOND,
    maglev::{MaglevBackend, build_table},
};
use lb_tests::{
    cases::{Case, run_cases},
    dpfixture::{
        CLIENT_MAC, Fixture, INGRESS_IFINDEX, LB_MAC, MTU, OTHER_IFINDEX, SEED, TABLE, TUNNEL_SRC,
        TUNNEL_SRC6, VIP, VIP_5TUPLE, VIP_TUNNEL, VIP6, VIP6_TUNNEL, XDP_DROP, XDP_REDIRECT,
        XDP_TX, mac,
    },
    packet::{
        Frame, checksum, icmp_frag_needed, icmpv6_too_big, ipv4_raw, ipv4_tcp, ipv4_udp, ipv6_ext,
        ipv6_frag, ipv6_tcp, tcp_ports, verify,
    },
};
use lb_userspace::state::to_addr;

fn fixture() -> Fixture {
    lb_tests::dpfixture::fixture("pk")
}

/// Assertions these fixtures share.
trait Checks {
    /// Runs a frame that must be forwarded by MAC rewrite only; returns the backend id.
    fn dsr(&self, frame: &Frame) -> u32;
    fn passes_unchanged(&self, what: &str, frame: &[u8]);
}

impl Checks for Fixture {
    fn dsr(&self, frame: &Frame) -> u32 {
        let (action, out) = self.run(&frame.bytes);
        assert_eq!(action, XDP_TX, "not forwarded");
        assert_eq!(&out[6..12], &LB_MAC);
        assert_eq!(&out[12..], &frame.bytes[12..], "only the MACs may change");
        let id = out[5] as u32;
        assert_eq!(out[0..6], mac(id));
        id
    }

    fn passes_unchanged(&self, what: &str, frame: &[u8]) {
        run_cases("packets", &[Case::passes(what, frame)], |f| self.run(f));
    }
}

fn c4(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, i)
}

fn c6(i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, i)
}

#[test]
fn ipv6_vip_is_forwarded_to_the_predicted_backend_also_through_extension_headers() {
    let f = fixture();
    for i in 1..=20u16 {
        let src = c6(i);
        let plain = ipv6_tcp(CLIENT_MAC, LB_MAC, src, VIP6, 40000, 80, 0x02, &[]);
        let want = f.predicted(1, src.into());
        assert_eq!(f.dsr(&plain), want, "client {src}");
        let with_ext = ipv6_tcp(
            CLIENT_MAC,
            LB_MAC,
            src,
            VIP6,
            40001,
            80,
            0x02,
            &[ipv6_ext(0), ipv6_ext(60), ipv6_ext(43)],
        );
        assert_eq!(
            f.dsr(&with_ext),
            want,
            "client {src} with extension headers"
        );
    }
    // VLAN-tagged too: it leaves as the backend is reached, untagged.
    let tagged = ipv6_tcp(CLIENT_MAC, LB_MAC, c6(1), VIP6, 40000, 80, 0x02, &[]).with_vlan(7);
    let (action, out) = f.run(&tagged.bytes);
    assert_eq!(action, XDP_TX);
    assert_eq!(&out[12..14], &[0x86, 0xdd]);
}

#[test]
fn ipv6_that_is_not_ours_passes_unchanged() {
    let f = fixture();
    let other = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99);
    let many: Vec<_> = (0..7).map(|_| ipv6_ext(60)).collect();
    let mut cases = vec![
        Case::passes(
            "non-VIP",
            ipv6_tcp(CLIENT_MAC, LB_MAC, c6(1), other, 1, 80, 2, &[]).bytes,
        ),
        Case::passes(
            "VIP, other port",
            ipv6_tcp(CLIENT_MAC, LB_MAC, c6(1), VIP6, 1, 81, 2, &[]).bytes,
        ),
        // More extension headers than the program walks: not classifiable, left alone.
        Case::passes(
            "7 extension headers",
            ipv6_tcp(CLIENT_MAC, LB_MAC, c6(1), VIP6, 1, 80, 2, &many).bytes,
        ),
    ];
    // Cut at every length: never read past the end, never rewritten.
    let full = ipv6_tcp(
        CLIENT_MAC,
        LB_MAC,
        c6(2),
        VIP6,
        40000,
        80,
        2,
        &[ipv6_ext(0)],
    )
    .bytes;
    for len in 14..full.len() {
        cases.push(Case::passes(format!("cut at {len}"), &full[..len]));
    }
    run_cases("ipv6-not-ours", &cases, |frame| f.run(frame));
}

#[test]
fn fragments_follow_their_first_fragment_or_the_source_hash() {
    let f = fixture();
    // A UDP-sized TCP datagram in two fragments: the first carries the ports.
    let src = c4(40);
    let whole = ipv4_tcp(CLIENT_MAC, LB_MAC, src, VIP, 40000, 80, 0x10, &[7; 64]);
    let l4 = &whole.bytes[34..];
    let first = ipv4_raw(CLIENT_MAC, LB_MAC, src, VIP, 6, 0x4242, 0x2000, &l4[..48]);
    let later = ipv4_raw(CLIENT_MAC, LB_MAC, src, VIP, 6, 0x4242, 48 / 8, &l4[48..]);
    let b = f.dsr(&first);
    assert_eq!(f.dsr(&later), b, "the later fragment follows the first");
    // A later fragment whose first was never seen: the VIP's source-hashed service places it.
    let orphan = ipv4_raw(CLIENT_MAC, LB_MAC, c4(41), VIP, 6, 0x4343, 6, &l4[48..]);
    assert_eq!(f.dsr(&orphan), f.predicted(0, c4(41).into()));

    // 5-tuple hashing cannot place an orphan fragment: passed up and counted.
    let before = f.reason(Reason::UnsupportedFragment);
    let orphan5 = ipv4_raw(
        CLIENT_MAC,
        LB_MAC,
        c4(42),
        VIP_5TUPLE,
        6,
        0x4444,
        6,
        &l4[48..],
    );
    f.passes_unchanged("orphan fragment of a 5-tuple service", &orphan5.bytes);
    assert_eq!(f.reason(Reason::UnsupportedFragment), before + 1);
    // ...but follows its first fragment when that came first.
    let whole5 = ipv4_tcp(
        CLIENT_MAC,
        LB_MAC,
        c4(42),
        VIP_5TUPLE,
        40000,
        443,
        0x10,
        &[7; 64],
    );
    let first5 = ipv4_raw(
        CLIENT_MAC,
        LB_MAC,
        c4(42),
        VIP_5TUPLE,
        6,
        0x4545,
        0x2000,
        &whole5.bytes[34..82],
    );
    let later5 = ipv4_raw(
        CLIENT_MAC,
        LB_MAC,
        c4(42),
        VIP_5TUPLE,
        6,
        0x4545,
        6,
        &whole5.bytes[82..],
    );
    let b5 = f.dsr(&first5);
    assert_eq!(f.dsr(&later5), b5);

    // IPv6: the fragment header.
    let src6 = c6(40);
    let first6 = ipv6_tcp(
        CLIENT_MAC,
        LB_MAC,
        src6,
        VIP6,
        40000,
        80,
        0x10,
        &[ipv6_frag(0, true, 77)],
    );
    let b6 = f.dsr(&first6);
    let mut later6 = lb_tests::packet::ipv6(
        CLIENT_MAC,
        LB_MAC,
        src6,
        VIP6,
        &[ipv6_frag(3, false, 77)],
        6,
        &[9; 24],
    );
    assert_eq!(f.dsr(&later6), b6);
    later6 = lb_tests::packet::ipv6(
        CLIENT_MAC,
        LB_MAC,
        c6(41),
        VIP6,
        &[ipv6_frag(3, false, 78)],
        6,
        &[9; 24],
    );
    assert_eq!(f.dsr(&later6), f.predicted(1, c6(41).into()));
}

/// A SYN from `client`:41000 to the IPv6 dsr service.
fn syn6(client: Ipv6Addr) -> Frame {
    ipv6_tcp(CLIENT_MAC, LB_MAC, client, VIP6, 41000, 80, 0x02, &[])
}

#[test]
fn icmp_too_big_reaches_the_backend_of_the_flow_it_quotes() {
    let mut f = fixture();
    let client = c4(50);
    // The flow's SYN goes to the table's choice; then the table changes, the flow stays.
    let b = f.dsr(&ipv4_tcp(
        CLIENT_MAC, LB_MAC, client, VIP, 41000, 80, 0x02, b"",
    ));
    let other = if b == 0 { 1 } else { 0 };
    let only_other = build_table(
        &SEED,
        &[MaglevBackend {
            id: other,
            addr: to_addr(Ipv4Addr::new(192, 0, 2, 11 + other as u8).into()),
            salt: 0,
            weight: 1,
        }],
        TABLE,
    );
    f.dp.swap_table(0, &only_other).unwrap();
    let router = Ipv4Addr::new(198, 51, 100, 254);
    // The backend sent VIP:80 → client:41000; a router on the way answers "fragmentation
    // needed" to the VIP.
    let icmp = icmp_frag_needed(
        CLIENT_MAC, LB_MAC, router, VIP, VIP, client, 80, 41000, 1400,
    );
    assert_eq!(
        f.dsr(&icmp),
        b,
        "to the backend that owns the flow, not the table's choice"
    );
    // A flow the connection table does not know: where an unrecorded flow of its client goes.
    // Its slot changed, so the flow is taken for one older than the change: the slot's
    // previous backend (the table's choice before the swap) when that differs.
    let icmp = icmp_frag_needed(
        CLIENT_MAC,
        LB_MAC,
        router,
        VIP,
        VIP,
        c4(51),
        80,
        42000,
        1400,
    );
    assert_eq!(f.dsr(&icmp), f.predicted(0, c4(51).into()));
    // ICMP errors write nothing: that flow still has no record.
    assert_eq!(
        f.dp.flow(&lb_tests::dpfixture::flow_key(
            c4(51).into(),
            VIP.into(),
            42000,
            80,
            6
        )),
        None
    );

    // IPv6 "packet too big".
    let client6 = c6(50);
    let b6 = f.dsr(&syn6(client6));
    let router6 = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
    let ptb = icmpv6_too_big(
        CLIENT_MAC, LB_MAC, router6, VIP6, VIP6, client6, 80, 41000, 1280,
    );
    assert_eq!(f.dsr(&ptb), b6);

    // Other ICMP to the VIP (an echo request) is the host's business.
    let mut echo = vec![8, 0, 0, 0, 0, 1, 0, 1];
    let c = checksum(&echo, 0);
    echo[2..4].copy_from_slice(&c.to_be_bytes());
    let ping = ipv4_raw(CLIENT_MAC, LB_MAC, client, VIP, 1, 1, 0, &echo);
    f.passes_unchanged("echo request to the VIP", &ping.bytes);
    // An ICMP error quoting a flow of no service passes.
    let stray = icmp_frag_needed(
        CLIENT_MAC, LB_MAC, router, VIP, VIP, client, 8080, 41000, 1400,
    );
    f.passes_unchanged("frag-needed about a non-service flow", &stray.bytes);
    let _ = tcp_ports(0, 0);
}

/// A UDP datagram to the IPv4 tunnel service that fits the MTU but not once encapsulated (DF).
fn too_big4(src: Ipv4Addr) -> Frame {
    ipv4_udp(
        CLIENT_MAC,
        LB_MAC,
        src,
        VIP_TUNNEL,
        5353,
        53,
        &[0; 1481 - 28],
    )
}

/// The same for the IPv6 tunnel service.
fn too_big6(src: Ipv6Addr) -> Frame {
    let mut udp = vec![0u8; 8 + 1430];
    udp[0..2].copy_from_slice(&5353u16.to_be_bytes());
    udp[2..4].copy_from_slice(&53u16.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + 1430) as u16).to_be_bytes());
    lb_tests::packet::ipv6(CLIENT_MAC, LB_MAC, src, VIP6_TUNNEL, &[], 17, &udp)
}

/// The expected IPv4-in-IPv4 frame for `inner` sent to backend `id` at `backend`, built with
/// etherparse: an outer IPv4 header (identification 0, TTL 64, DF as the inner header has it)
/// from the tunnel source, the inner packet unchanged.
fn encapsulated_v4(inner: &Frame, id: u32, backend: Ipv4Addr) -> Vec<u8> {
    let ip = &inner.bytes[14..];
    let (inner_ip, _) = Ipv4Header::from_slice(ip).expect("an IPv4 inner packet");
    let mut outer = Ipv4Header::new(
        ip.len() as u16,
        64,
        IpNumber::IPV4,
        TUNNEL_SRC.octets(),
        backend.octets(),
    )
    .unwrap();
    outer.dont_fragment = inner_ip.dont_fragment;
    let mut out = vec![];
    Ethernet2Header {
        source: LB_MAC,
        destination: mac(id),
        ether_type: EtherType::IPV4,
    }
    .write(&mut out)
    .unwrap();
    outer.write(&mut out).unwrap();
    out.extend_from_slice(ip);
    out
}

#[test]
fn tunnel_encapsulation_is_exact_and_oversized_packets_are_refused() {
    let f = fixture();
    for i in 1..=10u8 {
        let src = c4(60 + i);
        let inner = ipv4_udp(CLIENT_MAC, LB_MAC, src, VIP_TUNNEL, 5353, 53, b"query");
        let id = f.predicted(2, src.into());
        let backend = Ipv4Addr::new(192, 0, 2, 21 + (id - f.tables[2].0) as u8);
        let (action, out) = f.run(&inner.bytes);
        assert_eq!(action, XDP_TX, "client {src}");
        assert_eq!(
            out,
            encapsulated_v4(&inner, id, backend),
            "client {src}: byte for byte"
        );
        // The outer header's checksum verifies, and the inner packet's.
        assert_eq!(checksum(&out[14..34], 0), 0);
        assert_eq!(verify(&out), Ok(()), "client {src}: outer header");
        let mut unwrapped = out[..14].to_vec();
        unwrapped.extend_from_slice(&out[34..]);
        assert_eq!(verify(&unwrapped), Ok(()), "client {src}: inner packet");
    }
    // IPv6-in-IPv6.
    let src6 = c6(60);
    let inner6 = {
        let mut udp = vec![0u8; 8];
        udp[0..2].copy_from_slice(&5353u16.to_be_bytes());
        udp[2..4].copy_from_slice(&53u16.to_be_bytes());
        udp[4..6].copy_from_slice(&8u16.to_be_bytes());
        lb_tests::packet::ipv6(CLIENT_MAC, LB_MAC, src6, VIP6_TUNNEL, &[], 17, &udp)
    };
    let id6 = f.predicted(4, src6.into());
    let (action, out) = f.run(&inner6.bytes);
    assert_eq!(action, XDP_TX);
    assert_eq!(&out[0..6], &mac(id6));
    assert_eq!(&out[12..14], &[0x86, 0xdd]);
    assert_eq!(out[14] >> 4, 6);
    assert_eq!(
        u16::from_be_bytes([out[18], out[19]]) as usize,
        inner6.bytes.len() - 14
    );
    assert_eq!(out[20], 41, "next header: IPv6");
    assert_eq!(&out[22..38], &TUNNEL_SRC6.octets());
    assert_eq!(
        &out[54..],
        &inner6.bytes[14..],
        "the inner packet unchanged"
    );

    // A packet that would exceed the MTU once encapsulated, DF set: the client is told, with an
    // ICMP "fragmentation needed" from the VIP carrying the tunnel's MTU, so its path-MTU
    // discovery converges.
    let before = f.reason(Reason::TooBig);
    let big = too_big4(c4(70));
    let (action, out) = f.run(&big.bytes);
    assert_eq!(action, XDP_TX);
    assert_eq!(f.reason(Reason::TooBig), before + 1);
    // Built with etherparse: from the VIP to the client, MACs swapped, IPv4 identification 0,
    // no DF, TTL 64; ICMP type 3 code 4 with the tunnel's MTU, quoting the IP header and 8
    // bytes.
    let mut ip =
        Ipv4Header::new(0, 64, IpNumber::ICMP, VIP_TUNNEL.octets(), c4(70).octets()).unwrap();
    ip.dont_fragment = false;
    let [hi, lo] = ((MTU - 20) as u16).to_be_bytes();
    let mut want = vec![];
    PacketBuilder::ethernet2(LB_MAC, CLIENT_MAC)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .icmpv4_raw(3, 4, [0, 0, hi, lo])
        .write(&mut want, &big.bytes[14..14 + 28])
        .unwrap();
    assert_eq!(&big.bytes[0..6], &LB_MAC);
    assert_eq!(out, want, "the fragmentation-needed answer, byte for byte");

    // Without DF: dropped and counted (the sender's path may fragment; we do not).
    let mut no_df = big.bytes.clone();
    no_df[20] = 0;
    no_df[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&no_df[14..34], 0);
    no_df[24..26].copy_from_slice(&c.to_be_bytes());
    let (action, _) = f.run(&no_df);
    assert_eq!(action, XDP_DROP);
    assert_eq!(f.reason(Reason::TooBig), before + 2);

    // IPv6: "packet too big" with the MTU, quoting the packet's first 104 bytes.
    let src6 = c6(70);
    let big6 = too_big6(src6);
    let (action, out) = f.run(&big6.bytes);
    assert_eq!(action, XDP_TX);
    assert_eq!(f.reason(Reason::TooBig), before + 3);
    assert_eq!(out.len(), 14 + 40 + 8 + 104);
    assert_eq!(&out[0..6], &big6.bytes[6..12]);
    assert_eq!(&out[6..12], &big6.bytes[0..6]);
    assert_eq!(out[20], 58);
    assert_eq!(&out[22..38], &VIP6_TUNNEL.octets());
    assert_eq!(&out[38..54], &src6.octets());
    assert_eq!(&out[54..56], &[2, 0]);
    assert_eq!(
        u32::from_be_bytes([out[58], out[59], out[60], out[61]]),
        MTU as u32 - 40
    );
    assert_eq!(&out[62..], &big6.bytes[14..14 + 104]);
    // The ICMPv6 checksum (over the pseudo-header) verifies.
    assert_eq!(verify(&out), Ok(()), "ICMPv6 packet too big");
    // One that just fits is sent.
    let fits = ipv4_udp(
        CLIENT_MAC,
        LB_MAC,
        c4(70),
        VIP_TUNNEL,
        5353,
        53,
        &[0; 1480 - 28],
    );
    assert_eq!(f.run(&fits.bytes).0, XDP_TX);
}

#[test]
fn every_reason_is_counted() {
    let f = fixture();
    // malformed: IP total length past the frame.
    let mut m = ipv4_tcp(CLIENT_MAC, LB_MAC, c4(80), VIP, 1, 80, 2, b"").bytes;
    m[16..18].copy_from_slice(&200u16.to_be_bytes());
    let before = f.reason(Reason::Malformed);
    f.passes_unchanged("IP length past the frame", &m);
    assert_eq!(f.reason(Reason::Malformed), before + 1);
    // unsupported fragment and too big: see the tests above; no backend:
    let mut f = f;
    f.dp.swap_table(0, &vec![lb_common::NO_BACKEND; TABLE as usize])
        .unwrap();
    let before = f.reason(Reason::NoBackend);
    let (action, _) = f.run(&ipv4_tcp(CLIENT_MAC, LB_MAC, c4(81), VIP, 1, 80, 2, b"").bytes);
    assert_eq!(action, XDP_DROP);
    assert_eq!(f.reason(Reason::NoBackend), before + 1);
    // missing state: the table names a backend id whose entry is not filled in (lbd between
    // two writes): passed up, never sent to a stale MAC.
    f.dp.swap_table(0, &vec![200; TABLE as usize]).unwrap();
    let before = f.reason(Reason::MissingState);
    f.passes_unchanged(
        "a table naming an empty backend entry",
        &ipv4_tcp(CLIENT_MAC, LB_MAC, c4(82), VIP, 1, 80, 2, b"").bytes,
    );
    assert_eq!(f.reason(Reason::MissingState), before + 1);
}

#[test]
fn ipv4_options_are_skipped_to_the_ports() {
    let f = fixture();
    let src = c4(90);
    let plain = ipv4_tcp(CLIENT_MAC, LB_MAC, src, VIP, 40000, 80, 0x02, b"");
    // The same segment with a 4-byte option (NOP, NOP, NOP, end of list): IHL 6.
    let mut b = plain.bytes[..34].to_vec();
    b.extend_from_slice(&[1, 1, 1, 0]);
    b.extend_from_slice(&plain.bytes[34..]);
    b[14] = 0x46;
    let total = (b.len() - 14) as u16;
    b[16..18].copy_from_slice(&total.to_be_bytes());
    b[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&b[14..38], 0);
    b[24..26].copy_from_slice(&c.to_be_bytes());
    let with_options = Frame { bytes: b };
    assert_eq!(f.dsr(&with_options), f.predicted(0, src.into()));
    assert_eq!(f.dsr(&plain), f.predicted(0, src.into()));
}

/// Issue 10, item 1: a tunnel backend behind another interface than the receiving one. The
/// "too big" answer goes back to the sender out of the receiving interface (XDP_TX, never a
/// redirect towards the backend's interface) and counts only as `too_big`: neither the service
/// nor a backend forwarded anything.
#[test]
fn too_big_answer_leaves_by_the_receiving_interface_and_is_not_counted_as_forwarded() {
    let mut f = fixture();
    f.move_backends(2, OTHER_IFINDEX);
    f.move_backends(4, OTHER_IFINDEX);
    for (what, sid, frame) in [("IPv4", 2, too_big4(c4(71))), ("IPv6", 4, too_big6(c6(71)))] {
        let too_big = f.reason(Reason::TooBig);
        let (action, out) = f.run(&frame.bytes);
        assert_eq!(
            action, XDP_TX,
            "{what}: the answer must leave by the receiving interface (3 = XDP_TX; 4 would be a redirect, 1 a drop)"
        );
        assert_eq!(&out[0..6], &CLIENT_MAC, "{what}: addressed to the sender");
        let icmp_type = if sid == 2 {
            (out[23], out[34])
        } else {
            (out[20], out[54])
        };
        assert!(
            icmp_type == (1, 3) || icmp_type == (58, 2),
            "{what}: not an ICMP too-big answer: {icmp_type:?}"
        );
        assert_eq!(
            f.reason(Reason::TooBig),
            too_big + 1,
            "{what}: counted as too_big"
        );
        assert_eq!(
            f.forwarded(sid),
            (0, 0),
            "{what}: (service, backends) packets: the answer is not forwarded traffic"
        );
    }
}

/// Issue 10, item 2: a backend behind an interface the redirect cannot reach (absent from
/// DEVMAP): the packet is dropped, counted under a reason, and counted as forwarded by neither
/// the service nor the backend.
#[test]
fn a_failed_redirect_is_dropped_counted_and_not_forwarded() {
    let mut f = fixture();
    f.move_backends(0, OTHER_IFINDEX);
    f.move_backends(2, OTHER_IFINDEX);
    let dropped = |f: &Fixture| f.dp.reason_counts().iter().map(|(_, n)| n).sum::<u64>();
    for (what, sid, frame) in [
        (
            "dsr",
            0,
            ipv4_tcp(CLIENT_MAC, LB_MAC, c4(72), VIP, 40000, 80, 0x02, b""),
        ),
        (
            "tunnel",
            2,
            ipv4_udp(CLIENT_MAC, LB_MAC, c4(72), VIP_TUNNEL, 5353, 53, b"query"),
        ),
    ] {
        let (before, no_egress) = (dropped(&f), f.reason(Reason::NoEgress));
        let (action, _) = f.run(&frame.bytes);
        assert_eq!(action, XDP_DROP, "{what}");
        assert_eq!(
            dropped(&f),
            before + 1,
            "{what}: the drop is counted under a reason"
        );
        assert_eq!(
            f.reason(Reason::NoEgress),
            no_egress + 1,
            "{what}: as no_egress"
        );
        assert_eq!(
            f.forwarded(sid),
            (0, 0),
            "{what}: (service, backends) packets: nothing was sent"
        );
    }
}

/// Issue 10, item 3: an ICMP error is forwarded only when it is addressed to the VIP of the
/// flow it quotes (the quoted packet's source); sent to any other address (no VIP, or the VIP
/// of another service) it is not ours and passes untouched, uncounted.
#[test]
fn icmp_errors_not_addressed_to_the_quoted_vip_pass_untouched() {
    let f = fixture();
    let client = c4(52);
    let b = f.dsr(&ipv4_tcp(
        CLIENT_MAC, LB_MAC, client, VIP, 41000, 80, 0x02, b"",
    ));
    let router = Ipv4Addr::new(198, 51, 100, 254);
    let to = |dst: Ipv4Addr| {
        icmp_frag_needed(
            CLIENT_MAC, LB_MAC, router, dst, VIP, client, 80, 41000, 1400,
        )
    };
    // Addressed to the quoted VIP: forwarded to the flow's backend (see above).
    assert_eq!(f.dsr(&to(VIP)), b);
    let reasons = f.dp.reason_counts();
    let forwarded = f.forwarded(0);
    for (what, dst) in [
        ("a non-VIP address", Ipv4Addr::new(192, 0, 2, 99)),
        ("another service's VIP", VIP_5TUPLE),
        ("the LB's own address", Ipv4Addr::new(192, 0, 2, 2)),
    ] {
        f.passes_unchanged(
            &format!("frag-needed quoting a VIP flow, addressed to {what}"),
            &to(dst).bytes,
        );
    }
    let client6 = c6(52);
    let b6 = f.dsr(&syn6(client6));
    let router6 = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
    let to6 = |dst: Ipv6Addr| {
        icmpv6_too_big(
            CLIENT_MAC, LB_MAC, router6, dst, VIP6, client6, 80, 41000, 1280,
        )
    };
    assert_eq!(f.dsr(&to6(VIP6)), b6);
    let forwarded6 = f.forwarded(1);
    for (what, dst) in [
        (
            "a non-VIP address",
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99),
        ),
        ("another service's VIP", VIP6_TUNNEL),
    ] {
        f.passes_unchanged(
            &format!("packet-too-big quoting a VIP flow, addressed to {what}"),
            &to6(dst).bytes,
        );
    }
    assert_eq!(
        f.dp.reason_counts(),
        reasons,
        "not counted under any reason"
    );
    assert_eq!(f.forwarded(0), forwarded, "nor as forwarded");
    assert_eq!(f.forwarded(1), forwarded6, "nor as forwarded");
}

/// Issue 10, item 4: "too big" answers are rate-limited per CPU (a token bucket: a burst of
/// `TOO_BIG_BURST`, then `TOO_BIG_PER_SECOND`), as routers limit their ICMP errors (RFC 4443
/// §2.4(f)). A suppressed answer is dropped and counted as `too_big_suppressed`; the bucket
/// refills with time.
#[test]
fn too_big_answers_are_rate_limited_per_cpu() {
    let f = fixture();
    // One CPU's bucket: the runs stay on CPU 0.
    let _pinned = lb_tests::Pinned::to(0).expect("pinning the test thread to CPU 0");
    let big = too_big4(c4(73));
    let (too_big, suppressed) = (f.reason(Reason::TooBig), f.reason(Reason::TooBigSuppressed));
    const SENT: u64 = 4 * TOO_BIG_BURST;
    let started = std::time::Instant::now();
    let mut answered = 0;
    for _ in 0..SENT {
        match f.run(&big.bytes).0 {
            XDP_TX => answered += 1,
            XDP_DROP => {}
            other => panic!("a too-big packet got action {other}"),
        }
    }
    let ms = started.elapsed().as_millis() as u64;
    // The burst, and one more answer per millisecond the sending took at most.
    let allowed = TOO_BIG_BURST + (ms + 1) * TOO_BIG_PER_SECOND / 1000;
    assert!(
        answered >= TOO_BIG_BURST && answered <= allowed,
        "{answered} of {SENT} answered in {ms} ms; the bucket allows {TOO_BIG_BURST} at once and {TOO_BIG_PER_SECOND}/s"
    );
    assert_eq!(
        f.reason(Reason::TooBig),
        too_big + answered,
        "answers counted as too_big"
    );
    assert_eq!(
        f.reason(Reason::TooBigSuppressed),
        suppressed + SENT - answered,
        "the others dropped and counted as too_big_suppressed"
    );
    assert_eq!(f.forwarded(2), (0, 0));
    // The bucket refills: an answer goes out again soon.
    lb_tests::wait_until(
        std::time::Duration::from_secs(2),
        "an answer after the burst",
        || f.run(&big.bytes).0 == XDP_TX,
    )
    .unwrap();
}

/// Issue 10, item 5: backends behind another interface than the receiving one, in `DEVMAP` as
/// lbd puts them. dsr and tunnel packets leave by redirect, rewritten byte for byte as for
/// XDP_TX and counted as forwarded; the "too big" answer still goes back out of the receiving
/// interface. (Test runs arrive on `lo`; the backends' interface is the eth0 of a namespace of
/// the harness, where the kernel finds it when DEVMAP takes it.)
#[test]
fn backends_behind_another_interface_are_reached_by_redirect() {
    lb_tests::require_root();
    let t = lb_tests::Topology::new(lb_tests::TopologyOptions {
        backends: 0,
        clients: 0,
        addresses_per_client: 0,
        start_servers: false,
        ..Default::default()
    })
    .expect("a namespace with an interface");
    let eth0 = t.ifindex(t.lb_ns(), "eth0").unwrap();
    assert_ne!(eth0, INGRESS_IFINDEX);
    let mut f = fixture();
    f.add_egress_in(t.lb_ns(), eth0);
    for sid in 0..f.svcs.len() {
        f.move_backends(sid, eth0);
    }
    // dsr, both families.
    for (sid, frame) in [
        (
            0,
            ipv4_tcp(CLIENT_MAC, LB_MAC, c4(74), VIP, 40000, 80, 0x02, b""),
        ),
        (
            1,
            ipv6_tcp(CLIENT_MAC, LB_MAC, c6(74), VIP6, 40000, 80, 0x02, &[]),
        ),
    ] {
        let forwarded = f.forwarded(sid);
        let (action, out) = f.run(&frame.bytes);
        assert_eq!(
            action, XDP_REDIRECT,
            "service {sid}: redirected to the backend's interface"
        );
        let id = out[5] as u32;
        assert!(
            f.backend_ids(sid).contains(&id),
            "service {sid}: backend {id}"
        );
        let mut want = frame.bytes.clone();
        want[0..6].copy_from_slice(&mac(id));
        want[6..12].copy_from_slice(&LB_MAC);
        assert_eq!(out, want, "service {sid}: only the MACs change");
        assert_eq!(f.forwarded(sid), (forwarded.0 + 1, forwarded.1 + 1));
    }
    // tunnel: encapsulated exactly as for XDP_TX.
    let src = c4(75);
    let inner = ipv4_udp(CLIENT_MAC, LB_MAC, src, VIP_TUNNEL, 5353, 53, b"query");
    let id = f.predicted(2, src.into());
    let backend = Ipv4Addr::new(192, 0, 2, 21 + (id - f.tables[2].0) as u8);
    let (action, out) = f.run(&inner.bytes);
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(out, encapsulated_v4(&inner, id, backend));
    let forwarded = f.forwarded(2);
    // The too-big answer: back where the packet came from, not counted as forwarded.
    let (action, out) = f.run(&too_big4(c4(75)).bytes);
    assert_eq!(
        action, XDP_TX,
        "the answer leaves by the receiving interface"
    );
    assert_eq!(&out[34..36], &[3, 4], "fragmentation needed");
    let (action, _) = f.run(&too_big6(c6(75)).bytes);
    assert_eq!(action, XDP_TX, "the IPv6 answer too");
    assert_eq!(f.forwarded(2), forwarded);
    assert_eq!(f.forwarded(4), (0, 0));
}

/// `frame` with an 802.1Q tag of VLAN `vid` and priority `pcp` after the MAC addresses.
fn tagged(frame: &Frame, vid: u16, pcp: u8) -> Frame {
    let mut f = frame.clone().with_vlan(vid);
    f.bytes[14] |= pcp << 5;
    f
}

/// Issue 10, item 10: a backend whose route leaves by a VLAN device gets its frames with that
/// VLAN's tag, whatever tag (or none) they arrived with: the tag is added, replaced (keeping the
/// priority bits) or removed; a backend reached untagged gets them untagged. For dsr and tunnel,
/// both families. The "too big" answer goes back on the VLAN the packet came from.
#[test]
fn the_backends_vlan_tag_is_written_whatever_the_frame_arrived_with() {
    let mut f = fixture();
    for sid in 0..f.svcs.len() {
        f.change_backends(sid, |b| b.vlan = 100);
    }
    // dsr: the frame with the backend's MACs and tag.
    let dsr_out =
        |f: &Fixture, arrived: &Frame, untagged: &Frame, sid: usize, want_tag: Option<[u8; 4]>| {
            let (action, out) = f.run(&arrived.bytes);
            assert_eq!(action, XDP_TX);
            let id = out[5] as u32;
            assert!(f.backend_ids(sid).contains(&id));
            let mut want = untagged.bytes.clone();
            want[0..6].copy_from_slice(&mac(id));
            want[6..12].copy_from_slice(&LB_MAC);
            if let Some(tag) = want_tag {
                want.splice(12..12, tag);
            }
            out == want
        };
    let v4 = ipv4_tcp(CLIENT_MAC, LB_MAC, c4(76), VIP, 40000, 80, 0x02, b"");
    let v6 = ipv6_tcp(CLIENT_MAC, LB_MAC, c6(76), VIP6, 40000, 80, 0x02, &[]);
    for (sid, plain) in [(0, &v4), (1, &v6)] {
        let to_100 = [0x81, 0x00, 0x00, 100];
        assert!(
            dsr_out(&f, plain, plain, sid, Some(to_100)),
            "service {sid}: untagged arrival, VLAN 100 backend: tag added"
        );
        assert!(
            dsr_out(
                &f,
                &tagged(plain, 7, 5),
                plain,
                sid,
                Some([0x81, 0x00, 5 << 5, 100])
            ),
            "service {sid}: VLAN 7 arrival (priority 5): tag replaced by 100, priority kept"
        );
        assert!(
            dsr_out(&f, &tagged(plain, 100, 0), plain, sid, Some(to_100)),
            "service {sid}: VLAN 100 arrival: tag kept"
        );
    }
    for sid in 0..f.svcs.len() {
        f.change_backends(sid, |b| b.vlan = 0);
    }
    for (sid, plain) in [(0, &v4), (1, &v6)] {
        assert!(
            dsr_out(&f, &tagged(plain, 7, 3), plain, sid, None),
            "service {sid}: VLAN 7 arrival, untagged backend: tag removed"
        );
    }

    // tunnel: the outer frame carries the backend's tag, the inner packet is unchanged.
    let src = c4(77);
    let inner = ipv4_udp(CLIENT_MAC, LB_MAC, src, VIP_TUNNEL, 5353, 53, b"query");
    let id = f.predicted(2, src.into());
    let backend = Ipv4Addr::new(192, 0, 2, 21 + (id - f.tables[2].0) as u8);
    let plain_out = encapsulated_v4(&inner, id, backend);
    let (action, out) = f.run(&tagged(&inner, 7, 0).bytes);
    assert_eq!(action, XDP_TX);
    assert_eq!(
        out, plain_out,
        "VLAN 7 arrival, untagged backend: tag removed"
    );
    f.change_backends(2, |b| b.vlan = 100);
    let tagged_out = Frame { bytes: plain_out }.with_vlan(100).bytes;
    for (what, arrived) in [
        ("untagged arrival: tag added", inner.clone()),
        ("VLAN 7 arrival: tag replaced", tagged(&inner, 7, 0)),
    ] {
        let (action, out) = f.run(&arrived.bytes);
        assert_eq!(action, XDP_TX, "{what}");
        assert_eq!(out, tagged_out, "{what}");
    }
    let mut udp = vec![0u8; 8];
    udp[0..2].copy_from_slice(&5353u16.to_be_bytes());
    udp[2..4].copy_from_slice(&53u16.to_be_bytes());
    udp[4..6].copy_from_slice(&8u16.to_be_bytes());
    let inner6 = lb_tests::packet::ipv6(CLIENT_MAC, LB_MAC, c6(77), VIP6_TUNNEL, &[], 17, &udp);
    for (vlan, arrived) in [
        (100, inner6.clone()),
        (0, tagged(&inner6, 7, 0)),
        (100, tagged(&inner6, 7, 0)),
    ] {
        f.change_backends(4, |b| b.vlan = vlan);
        let (action, out) = f.run(&arrived.bytes);
        assert_eq!(action, XDP_TX);
        let l2 = if vlan == 0 { 14 } else { 18 };
        if vlan != 0 {
            assert_eq!(&out[12..16], &[0x81, 0x00, 0, vlan as u8], "VLAN {vlan}");
        }
        assert_eq!(&out[l2 - 2..l2], &[0x86, 0xdd], "VLAN {vlan}: IPv6 follows");
        assert_eq!(out[l2 + 6], 41, "VLAN {vlan}: IPv6-in-IPv6");
        assert_eq!(
            &out[l2 + 40..],
            &inner6.bytes[14..],
            "VLAN {vlan}: the inner packet unchanged"
        );
    }

    // The too-big answer goes back to the sender on its own VLAN (or none).
    let big = too_big4(c4(78));
    let (action, out) = f.run(&tagged(&big, 7, 0).bytes);
    assert_eq!(action, XDP_TX);
    assert_eq!(
        &out[12..18],
        &[0x81, 0x00, 0, 7, 0x08, 0x00],
        "answered on VLAN 7"
    );
    assert_eq!(out[18 + 9], 1, "an ICMP answer");
    let (action, out) = f.run(&big.bytes);
    assert_eq!(action, XDP_TX);
    assert_eq!(&out[12..14], &[0x08, 0x00], "answered untagged");
}
