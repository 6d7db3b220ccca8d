//! Data-path tests through BPF_PROG_TEST_RUN: the real program, loaded by lbd's datapath code
//! with its maps filled, run on hand-built frames. Needs root (fails loudly without it).

use std::{net::Ipv4Addr, path::PathBuf};

use lb_common::{
    Backend, Reason, ServiceKey, ServiceValue, backend_flags,
    maglev::{MaglevBackend, build_table},
    source_slot,
};
use lb_tests::cases::{Case, run_cases};
use lb_tests::packet::{Frame, ipv4_tcp, ipv4_udp};
use lb_userspace::{
    datapath::{self, Datapath},
    state::to_addr,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const SEED: [u64; 2] = [0x0123_4567_89ab_cdef, 0x0fed_cba9_8765_4321];
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x65];
const TABLE_SIZE: u32 = 65_537;

fn backend_mac(i: u32) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x0b, i as u8]
}

fn backend_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 11 + i as u8)
}

/// A loaded program with one TCP service on VIP:80 over three backends, pinned in a folder of
/// its own that is removed on drop.
struct Fixture {
    dp: Datapath,
    dir: PathBuf,
    table: Vec<u32>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = datapath::cleanup(&self.dir);
    }
}

fn service_key(port: u16) -> ServiceKey {
    ServiceKey {
        addr: to_addr(VIP.into()),
        port: port.to_be(),
        proto: 6,
        family: 4,
    }
}

fn fixture(weights: [u32; 3]) -> Fixture {
    let dir = lb_tests::dpfixture::pin_dir("dp");
    let mut dp = lb_tests::dpfixture::open_datapath(&dir);
    dp.set_config(SEED).unwrap();
    let mut live = vec![];
    for i in 0..3u32 {
        let b = Backend {
            addr: to_addr(backend_ip(i).into()),
            tunnel_src: [0; 4],
            mac: backend_mac(i),
            src_mac: LB_MAC,
            ifindex: 1,
            service: 0,
            family: 4,
            flags: backend_flags::VALID,
            mtu: 1500,
            ..Default::default()
        };
        dp.set_backend(i, &b).unwrap();
        live.push(MaglevBackend {
            id: i,
            addr: b.addr,
            salt: 0,
            weight: weights[i as usize],
        });
    }
    let table = build_table(&SEED, &live, TABLE_SIZE);
    dp.set_service(&service_key(80), &service_value(0, TABLE_SIZE), &table)
        .unwrap();
    Fixture { dp, dir, table }
}

/// Service `id`'s value, without flags, with a table of `table_size` slots.
fn service_value(id: u32, table_size: u32) -> ServiceValue {
    ServiceValue {
        id,
        flags: 0,
        table_size,
        _pad: 0,
    }
}

fn client(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, i)
}

fn vip_syn(src: Ipv4Addr) -> Frame {
    ipv4_tcp(CLIENT_MAC, LB_MAC, src, VIP, 40000, 80, 0x02, b"")
}

/// The backend lb-common predicts for a client: what `lbctl lookup` will say.
fn predicted(table: &[u32], src: Ipv4Addr) -> u32 {
    table[source_slot(&SEED, TABLE_SIZE, &to_addr(src.into())).unwrap() as usize]
}

#[test]
fn vip_packet_is_sent_to_the_predicted_backend_with_only_macs_changed() {
    let f = fixture([100, 100, 100]);
    let mut seen = [0u32; 3];
    let cases: Vec<Case> = (1..=60u8)
        .map(|i| {
            let src = client(i);
            let frame = vip_syn(src);
            let b = predicted(&f.table, src);
            seen[b as usize] += 1;
            let mut expected = frame.bytes.clone();
            expected[0..6].copy_from_slice(&backend_mac(b));
            expected[6..12].copy_from_slice(&LB_MAC);
            Case::gives(
                format!("client {src} goes to backend {b} unchanged but for MACs"),
                frame.bytes,
                XDP_TX,
                expected,
            )
        })
        .collect();
    run_cases("dsr-to-the-predicted-backend", &cases, |frame| {
        f.dp.test_run(frame).unwrap()
    });
    assert!(
        seen.iter().all(|&n| n > 0),
        "every backend gets some of 60 clients: {seen:?}"
    );
    let stats = f.dp.service_counter(0);
    assert_eq!(stats.packets, 60);
    let per_backend: u64 = (0..3).map(|b| f.dp.backend_counter(b).packets).sum();
    assert_eq!(per_backend, 60);
    assert_eq!(f.dp.backend_counter(0).packets, seen[0] as u64);
}

#[test]
fn udp_to_the_tcp_service_and_other_ports_and_addresses_pass_unchanged() {
    let f = fixture([100, 100, 100]);
    let cases = [
        Case::passes(
            "UDP to the VIP's TCP port",
            ipv4_udp(CLIENT_MAC, LB_MAC, client(1), VIP, 5000, 80, b"x").bytes,
        ),
        Case::passes(
            "TCP to the VIP on another port",
            ipv4_tcp(CLIENT_MAC, LB_MAC, client(1), VIP, 5000, 8080, 0x02, b"").bytes,
        ),
        Case::passes(
            "TCP to a non-VIP address",
            ipv4_tcp(
                CLIENT_MAC,
                LB_MAC,
                client(1),
                Ipv4Addr::new(192, 0, 2, 2),
                5000,
                80,
                0x02,
                b"",
            )
            .bytes,
        ),
    ];
    run_cases("not-the-service", &cases, |frame| {
        f.dp.test_run(frame).unwrap()
    });
    assert_eq!(f.dp.service_counter(0).packets, 0);
}

/// A tagged VIP packet leaves as its backend is reached: with the backend's VLAN tag (here the
/// one it came with), or untagged.
#[test]
fn vlan_tagged_vip_packet_leaves_with_the_backends_tag() {
    let mut f = fixture([100, 100, 100]);
    let frame = vip_syn(client(7)).with_vlan(42);
    let b = predicted(&f.table, client(7));
    let mut expected = vip_syn(client(7)).bytes;
    expected[0..6].copy_from_slice(&backend_mac(b));
    expected[6..12].copy_from_slice(&LB_MAC);
    let (action, out) = f.dp.test_run(&frame.bytes).unwrap();
    assert_eq!(action, XDP_TX);
    assert_eq!(out, expected, "an untagged backend: the tag removed");
    let mut entry = f.dp.backend(b).unwrap();
    entry.vlan = 42;
    f.dp.set_backend(b, &entry).unwrap();
    let (action, out) = f.dp.test_run(&frame.bytes).unwrap();
    assert_eq!(action, XDP_TX);
    expected.splice(12..12, [0x81, 0x00, 0x00, 42]);
    assert_eq!(out, expected, "a backend on VLAN 42: the tag kept");
}

#[test]
fn truncated_frames_pass_unchanged() {
    let f = fixture([100, 100, 100]);
    let full = vip_syn(client(3)).bytes;
    let malformed = |f: &Fixture| {
        f.dp.reason_counts()
            .iter()
            .find(|(r, _)| *r == Reason::Malformed)
            .unwrap()
            .1
    };
    // BPF_PROG_TEST_RUN needs at least an Ethernet header; every shorter cut of a VIP packet
    // (inside the IP header, the ports, the rest of TCP) must be passed, never read past its
    // end, and never rewritten.
    for len in 14..full.len() {
        let cut = &full[..len];
        let before = malformed(&f);
        let (action, out) = f.dp.test_run(cut).unwrap();
        assert_eq!(action, XDP_PASS, "cut at {len}");
        assert_eq!(out, cut, "cut at {len} must come out unchanged");
        if len >= 14 + 20 + 4 {
            // Ports present: recognisably a VIP packet, so counted as malformed.
            assert_eq!(
                malformed(&f),
                before + 1,
                "cut at {len} is counted as malformed"
            );
        }
    }
    assert_eq!(f.dp.service_counter(0).packets, 0);
}

#[test]
fn non_ip_and_malformed_ip_pass_unchanged() {
    let f = fixture([100, 100, 100]);
    // An ARP request for the VIP.
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&client(1).octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&VIP.octets());
    // A VIP packet claiming IP version 5, and one with a header length under 20 bytes.
    let mut v5 = vip_syn(client(1)).bytes;
    v5[14] = 0x55;
    let mut short_ihl = vip_syn(client(1)).bytes;
    short_ihl[14] = 0x44;
    let cases = [
        Case::passes("ARP", arp),
        Case::passes("IP version 5", v5),
        Case::passes("IHL 4", short_ihl),
    ];
    run_cases("non-ip-and-malformed-ip", &cases, |frame| {
        f.dp.test_run(frame).unwrap()
    });
}

#[test]
fn service_without_usable_backend_drops_and_counts() {
    let f = fixture([0, 0, 0]);
    assert!(f.table.iter().all(|&b| b == lb_common::NO_BACKEND));
    let before = f.dp.reason_counts();
    let (action, _) = f.dp.test_run(&vip_syn(client(9)).bytes).unwrap();
    assert_eq!(action, XDP_DROP);
    let after = f.dp.reason_counts();
    let count = |v: &[(Reason, u64)]| v.iter().find(|(r, _)| *r == Reason::NoBackend).unwrap().1;
    assert_eq!(count(&after), count(&before) + 1);
}

#[test]
fn weights_and_table_swaps_take_effect() {
    let mut f = fixture([100, 100, 100]);
    // Swap in a table where only backend 2 takes clients: every client goes there at once.
    let only_2 = build_table(
        &SEED,
        &[MaglevBackend {
            id: 2,
            addr: to_addr(backend_ip(2).into()),
            salt: 0,
            weight: 100,
        }],
        TABLE_SIZE,
    );
    f.dp.swap_table(0, &only_2).unwrap();
    for i in 1..=20u8 {
        let (action, out) = f.dp.test_run(&vip_syn(client(i)).bytes).unwrap();
        assert_eq!(action, XDP_TX);
        assert_eq!(&out[0..6], &backend_mac(2));
    }
}

fn vip_ack(src: Ipv4Addr) -> Frame {
    ipv4_tcp(CLIENT_MAC, LB_MAC, src, VIP, 40000, 80, 0x10, b"")
}

fn sent_to(f: &Fixture, frame: &Frame) -> u32 {
    let (action, out) = f.dp.test_run(&frame.bytes).unwrap();
    assert_eq!(action, XDP_TX);
    (0..3)
        .find(|&b| out[0..6] == backend_mac(b))
        .expect("a backend's MAC")
}

fn only(b: u32) -> Vec<u32> {
    build_table(
        &SEED,
        &[MaglevBackend {
            id: b,
            addr: to_addr(backend_ip(b).into()),
            salt: 0,
            weight: 100,
        }],
        TABLE_SIZE,
    )
}

#[test]
fn established_flows_keep_their_backend_when_the_table_changes_but_syns_do_not() {
    let mut f = fixture([100, 100, 100]);
    let src = client(11);
    let first = sent_to(&f, &vip_syn(src));
    assert_eq!(first, predicted(&f.table, src));
    let other = (first + 1) % 3;
    f.dp.swap_table(0, &only(other)).unwrap();
    // The connection in progress stays where it is...
    for _ in 0..3 {
        assert_eq!(sent_to(&f, &vip_ack(src)), first);
    }
    // ...a new connection (a SYN, even reusing the same ports) follows the new table, and the
    // flow's later packets follow it there.
    assert_eq!(sent_to(&f, &vip_syn(src)), other);
    assert_eq!(sent_to(&f, &vip_ack(src)), other);
    // A flow never seen since the change, arriving without SYN (a connection idle across the
    // change) cannot be told from one older than the change: on a slot that changed it goes
    // to the slot's previous backend, is recorded there, and keeps it after a second change.
    let late = (12..=250)
        .map(client)
        .find(|&c| predicted(&f.table, c) != other)
        .expect("a client whose slot changed");
    let before = predicted(&f.table, late);
    assert_eq!(sent_to(&f, &vip_ack(late)), before);
    assert_eq!(
        f.dp.flow(&flow_key(late, 40000)).map(|v| v.backend),
        Some(before)
    );
    // A flow on a slot whose backend did not change goes to it without a record.
    let unchanged = (12..=250)
        .map(client)
        .find(|&c| predicted(&f.table, c) == other)
        .expect("a client whose slot kept its backend");
    assert_eq!(sent_to(&f, &vip_ack(unchanged)), other);
    assert_eq!(f.dp.flow(&flow_key(unchanged, 40000)), None);
    let third = 3 - first - other;
    f.dp.swap_table(0, &only(third)).unwrap();
    assert_eq!(sent_to(&f, &vip_ack(late)), before);
}

#[test]
fn flows_of_a_down_or_removed_backend_are_rehashed() {
    let mut f = fixture([100, 100, 100]);
    let src = client(21);
    let first = sent_to(&f, &vip_syn(src));
    let survivor = (first + 1) % 3;
    f.dp.swap_table(0, &only(survivor)).unwrap();
    assert_eq!(sent_to(&f, &vip_ack(src)), first, "still established");
    // Health checks mark it down: its flows move to the table's choice and stay there.
    let mut b = f.dp.backend(first).unwrap();
    b.flags |= lb_common::backend_flags::DOWN;
    f.dp.set_backend(first, &b).unwrap();
    assert_eq!(sent_to(&f, &vip_ack(src)), survivor);
    b.flags &= !lb_common::backend_flags::DOWN;
    f.dp.set_backend(first, &b).unwrap();
    assert_eq!(
        sent_to(&f, &vip_ack(src)),
        survivor,
        "the flow was re-recorded on the survivor"
    );

    // Removed (entry cleared): the same.
    let src2 = client(22);
    f.dp.swap_table(0, &only(first)).unwrap();
    assert_eq!(sent_to(&f, &vip_syn(src2)), first);
    f.dp.swap_table(0, &only(survivor)).unwrap();
    f.dp.clear_backend(first).unwrap();
    assert_eq!(sent_to(&f, &vip_ack(src2)), survivor);
}

#[test]
fn a_flow_entry_is_honoured_only_for_its_own_service() {
    let mut f = fixture([100, 100, 100]);
    let src = client(31);
    let first = sent_to(&f, &vip_syn(src));
    let other = (first + 1) % 3;
    f.dp.swap_table(0, &only(other)).unwrap();
    // The backend's id now belongs to another service (an id reused after a removal).
    let mut b = f.dp.backend(first).unwrap();
    b.service = 7;
    f.dp.set_backend(first, &b).unwrap();
    assert_eq!(sent_to(&f, &vip_ack(src)), other);
}

fn flow_key(src: Ipv4Addr, sport: u16) -> lb_common::FlowKey {
    lb_tests::dpfixture::flow_key(src.into(), VIP.into(), sport, 80, 6)
}

/// A full set: a new flow takes the way of a tentative record (a SYN never answered) once a
/// handshake's time has passed, never a confirmed one's; until then it gets no record and goes
/// where its unrecorded packets go (the slot's previous backend), so it is not split.
#[test]
fn a_full_set_gives_a_new_flow_only_a_stale_tentative_entry() {
    use lb_common::FLOW_WAYS;
    let mut f = fixture([100, 100, 100]);
    let src = client(31);
    let first = predicted(&f.table, src);
    let other = (first + 1) % 3;
    // The client's slot changes backend: its new connections are recorded from then on.
    f.dp.swap_table(0, &only(other)).unwrap();
    // FLOW_WAYS + 1 connections of one client whose flows share a set of the table.
    let mut by_set: std::collections::HashMap<u32, Vec<u16>> = Default::default();
    let ports = (1024..u16::MAX)
        .find_map(|port| {
            let set = f.dp.flow_set(&flow_key(src, port)).unwrap();
            let ports = by_set.entry(set).or_default();
            ports.push(port);
            (ports.len() == FLOW_WAYS + 1).then(|| ports.clone())
        })
        .expect("five flows in one set");
    let tcp = |port: u16, flags: u8| ipv4_tcp(CLIENT_MAC, LB_MAC, src, VIP, port, 80, flags, b"");
    let entry = |f: &Fixture, port: u16| f.dp.flow_entry(&flow_key(src, port));
    // The first connection's SYN is never answered (its record stays tentative); the others
    // complete their handshakes (confirmed).
    for (i, &port) in ports[..FLOW_WAYS].iter().enumerate() {
        assert_eq!(sent_to(&f, &tcp(port, 0x02)), other, "a new connection");
        if i > 0 {
            assert_eq!(sent_to(&f, &tcp(port, 0x10)), other, "its ACK");
        }
        let e = entry(&f, port).expect("recorded");
        assert_eq!(e.backend(), other);
        assert_eq!(e.tentative(), i == 0);
    }
    // Within a handshake's time of the first SYN, the fifth connection finds no way to take:
    // not recorded, it goes to the slot's previous backend, its ACK too.
    let fifth = ports[FLOW_WAYS];
    assert_eq!(
        sent_to(&f, &tcp(fifth, 0x02)),
        first,
        "no room: the previous backend"
    );
    assert_eq!(entry(&f, fifth), None);
    assert_eq!(sent_to(&f, &tcp(fifth, 0x10)), first, "not split");
    // Once the tentative record is older than the hold, a retransmitted SYN takes its way.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while entry(&f, fifth).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the tentative record kept its way for 15 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
        sent_to(&f, &tcp(fifth, 0x02));
    }
    assert_eq!(entry(&f, fifth).unwrap().backend(), other);
    assert_eq!(
        entry(&f, ports[0]),
        None,
        "the unanswered SYN's record made room"
    );
    for &port in &ports[1..FLOW_WAYS] {
        assert_eq!(
            sent_to(&f, &tcp(port, 0x10)),
            other,
            "established flows keep theirs"
        );
        assert!(!entry(&f, port).unwrap().tentative());
    }
}

#[test]
fn established_flows_of_a_removed_or_moved_service_pass_unchanged() {
    let mut f = fixture([100, 100, 100]);
    let src = client(41);
    let first = sent_to(&f, &vip_syn(src));
    assert_eq!(sent_to(&f, &vip_ack(src)), first, "established");
    // The service moves to another port: the old destination is no service's any more, even
    // for a flow the connection table still names it for.
    let value = service_value(0, TABLE_SIZE);
    f.dp.set_service_key(&service_key(8080), &value).unwrap();
    f.dp.remove_service(&service_key(80)).unwrap();
    let ack = vip_ack(src);
    assert_eq!(
        f.dp.test_run(&ack.bytes).unwrap(),
        (XDP_PASS, ack.bytes.clone())
    );
    // Removed altogether: the VIP's packets all pass.
    f.dp.remove_service(&service_key(8080)).unwrap();
    let moved = ipv4_tcp(CLIENT_MAC, LB_MAC, src, VIP, 40000, 8080, 0x10, b"");
    assert_eq!(
        f.dp.test_run(&moved.bytes).unwrap(),
        (XDP_PASS, moved.bytes.clone())
    );
    assert_eq!(
        f.dp.test_run(&ack.bytes).unwrap(),
        (XDP_PASS, ack.bytes.clone())
    );
}

#[test]
fn a_flow_of_an_every_port_service_keeps_its_backend_when_its_port_gets_a_service() {
    let mut f = fixture([100, 100, 100]);
    // The VIP's every-port service (id 0) instead of port 80.
    let every_port = service_value(0, TABLE_SIZE);
    f.dp.set_service_key(&service_key(0), &every_port).unwrap();
    f.dp.remove_service(&service_key(80)).unwrap();
    let src = client(51);
    let syn = ipv4_tcp(CLIENT_MAC, LB_MAC, src, VIP, 40000, 443, 0x02, b"");
    let ack = ipv4_tcp(CLIENT_MAC, LB_MAC, src, VIP, 40000, 443, 0x10, b"");
    let first = sent_to(&f, &syn);
    assert_eq!(sent_to(&f, &ack), first);
    // Port 443 gets a service of its own (id 1) with one backend (id 3).
    let b3 = Backend {
        addr: to_addr(backend_ip(3).into()),
        mac: [0x02, 0, 0, 0, 0x0b, 3],
        src_mac: LB_MAC,
        ifindex: 1,
        service: 1,
        family: 4,
        flags: backend_flags::VALID,
        mtu: 1500,
        ..Default::default()
    };
    f.dp.set_backend(3, &b3).unwrap();
    let table = build_table(
        &SEED,
        &[MaglevBackend {
            id: 3,
            addr: b3.addr,
            salt: 0,
            weight: 100,
        }],
        TABLE_SIZE,
    );
    let exact = service_value(1, TABLE_SIZE);
    f.dp.set_service(&service_key(443), &exact, &table).unwrap();
    // The connection in progress stays with the service it started under...
    assert_eq!(sent_to(&f, &ack), first);
    // ...a new one goes to the port's own service.
    let (action, out) = f.dp.test_run(&syn.bytes).unwrap();
    assert_eq!((action, &out[0..6]), (XDP_TX, &b3.mac[..]));
}

/// The slot of `src` in the fixture's table.
fn slot_of(src: Ipv4Addr) -> usize {
    source_slot(&SEED, TABLE_SIZE, &to_addr(src.into())).unwrap() as usize
}

#[test]
fn a_connection_idle_past_the_clocks_wrap_keeps_its_backend_and_its_slot_until_it_closes() {
    use lb_common::FlowValue;
    use lb_userspace::datapath::SlotTimes;
    let mut f = fixture([100, 100, 100]);
    let src = client(61);
    let first = predicted(&f.table, src);
    let other = (first + 1) % 3;
    let key = flow_key(src, 40000);
    // The table changes: the client's slot now names `other`.
    f.dp.swap_table(0, &only(other)).unwrap();
    let changed_at_first = f.dp.slot_state(0).unwrap().changed();
    assert!(f.dp.slot_state(0).unwrap().hot[slot_of(src)].changed());
    // The connection's record on `first`, last seen one tick after the table's clock now: as
    // old as a record can look (2^32 - 1 ticks: the clock has wrapped since, 8.7 years of
    // jiffies / 64 at HZ=1000).
    let now = f.dp.table_clock().unwrap();
    let record =
        f.dp.record_for(
            &key,
            FlowValue {
                backend: first,
                service: 0,
            },
            0,
            now.wrapping_add(2) | 1,
        )
        .unwrap();
    f.dp.set_flow_entry(&key, record, now).unwrap();
    // lbd's scans with no hold for flows without a record, and no grace for closed ones: the
    // record alone keeps its slot changed; every other slot is cleared.
    let times = SlotTimes {
        idle_hold: std::time::Duration::ZERO,
        close_grace: std::time::Duration::ZERO,
        ..Default::default()
    };
    let mut cleared = 0;
    for _ in 0..3 {
        cleared += f.dp.scan_slots(&times).unwrap();
    }
    let state = f.dp.slot_state(0).unwrap();
    assert!(
        state.hot[slot_of(src)].changed(),
        "the record pins its slot"
    );
    assert_eq!(state.changed(), 1, "of {changed_at_first} changed slots");
    assert_eq!(cleared, changed_at_first - 1);
    // The connection follows its record; a new one of the same client takes the table's choice
    // (recorded, since its slot is changed: it pins nothing, being on the current backend).
    assert_eq!(sent_to(&f, &vip_ack(src)), first);
    let syn = |port: u16| ipv4_tcp(CLIENT_MAC, LB_MAC, src, VIP, port, 80, 0x02, b"");
    assert_eq!(sent_to(&f, &syn(40001)), other);
    f.dp.scan_slots(&times).unwrap();
    f.dp.scan_slots(&times).unwrap();
    assert!(f.dp.slot_state(0).unwrap().hot[slot_of(src)].changed());
    assert_eq!(sent_to(&f, &vip_ack(src)), first, "still");
    // The client closes (FIN): with no grace the record lives no more, and two scans clear the
    // slot. From then on the client's flows need no record.
    let fin = ipv4_tcp(CLIENT_MAC, LB_MAC, src, VIP, 40000, 80, 0x11, b"");
    assert_eq!(sent_to(&f, &fin), first);
    assert_eq!(
        f.dp.scan_slots(&times).unwrap(),
        0,
        "one quiet scan is not enough"
    );
    assert_eq!(f.dp.scan_slots(&times).unwrap(), 1);
    assert_eq!(f.dp.slot_state(0).unwrap().changed(), 0);
    let ack = ipv4_tcp(CLIENT_MAC, LB_MAC, src, VIP, 40002, 80, 0x10, b"");
    assert_eq!(sent_to(&f, &ack), other);
    assert_eq!(f.dp.flow(&flow_key(src, 40002)), None);
    // The records the slot had (the closed connection's, the new one's on the current backend)
    // would be read by nobody now: they went with the clearing, so they cannot pin the slot
    // after a later change.
    assert_eq!(f.dp.flow_entry(&flow_key(src, 40000)), None);
    assert_eq!(f.dp.flow_entry(&flow_key(src, 40001)), None);
    assert_eq!(f.dp.flow_count().unwrap().0, 0);
}

#[test]
fn two_changes_in_a_row_keep_the_connections_begun_before_each() {
    let mut f = fixture([100, 100, 100]);
    // Clients whose slot names backend 0 before any change.
    let on_zero: Vec<Ipv4Addr> = (1..=250)
        .map(client)
        .filter(|&c| predicted(&f.table, c) == 0)
        .take(20)
        .collect();
    assert_eq!(on_zero.len(), 20);
    let conn = |src: Ipv4Addr, port: u16, flags: u8| {
        ipv4_tcp(CLIENT_MAC, LB_MAC, src, VIP, port, 80, flags, b"")
    };
    // Connections begun before the first change (SYN on an unchanged slot: no record).
    for &c in &on_zero {
        assert_eq!(sent_to(&f, &conn(c, 1000, 0x02)), 0);
        assert_eq!(f.dp.flow(&flow_key(c, 1000)), None);
    }
    // Change 1: everything to backend 1. Connections begun now are recorded on it.
    f.dp.swap_table(0, &only(1)).unwrap();
    for &c in &on_zero {
        assert_eq!(sent_to(&f, &conn(c, 2000, 0x02)), 1);
        assert_eq!(f.dp.flow(&flow_key(c, 2000)).map(|v| v.backend), Some(1));
    }
    // Change 2: everything to backend 2. The slots keep the backend from before the first
    // change for their flows without a record.
    f.dp.swap_table(0, &only(2)).unwrap();
    let state = f.dp.slot_state(0).unwrap();
    for &c in &on_zero {
        let s = slot_of(c);
        assert!(state.hot[s].changed() && state.hot[s].current() == 2);
        assert_eq!(
            state.side[s].old(),
            0,
            "the backend before the first change"
        );
        // Idle across both changes: still backend 0 (recorded now); begun between: 1; new: 2.
        assert_eq!(sent_to(&f, &conn(c, 1000, 0x10)), 0);
        assert_eq!(sent_to(&f, &conn(c, 2000, 0x10)), 1);
        assert_eq!(sent_to(&f, &conn(c, 3000, 0x02)), 2);
    }
    // Undone (back to the first table): the slots stay changed, every connection keeps its
    // backend, new ones take the table's choice again.
    f.dp.swap_table(0, &f.table.clone()).unwrap();
    for &c in &on_zero {
        assert!(f.dp.slot_state(0).unwrap().hot[slot_of(c)].changed());
        assert_eq!(sent_to(&f, &conn(c, 1000, 0x10)), 0);
        assert_eq!(sent_to(&f, &conn(c, 2000, 0x10)), 1);
        assert_eq!(sent_to(&f, &conn(c, 3000, 0x10)), 2);
        assert_eq!(sent_to(&f, &conn(c, 4000, 0x02)), 0);
    }
}

#[test]
fn every_service_is_found_through_the_index_collisions_and_removals_included() {
    use lb_common::{service_index, service_index_state};
    let mut f = fixture([100, 100, 100]);
    f.dp.remove_service(&service_key(80)).unwrap();
    // 200 services on ports of the VIP chosen so that 20 slots of the index are each wanted by
    // three of them; service i's only backend has id 10 + i.
    let n = 200u32;
    let mut by_slot: std::collections::BTreeMap<u32, Vec<u16>> = Default::default();
    for port in 1..u16::MAX {
        by_slot
            .entry(lb_common::service_index_slot(&service_key(port)))
            .or_default()
            .push(port);
    }
    let mut ports: Vec<u16> = by_slot
        .values()
        .take(20)
        .flat_map(|p| p[..3].to_vec())
        .collect();
    ports.extend(
        by_slot
            .values()
            .skip(20)
            .take(n as usize - ports.len())
            .map(|p| p[0]),
    );
    assert_eq!(ports.len(), n as usize);
    let value = |i: u32| service_value(i, 13);
    for i in 0..n {
        let b = Backend {
            addr: to_addr(Ipv4Addr::new(192, 0, 2, 20).into()),
            mac: [0x02, 0, 0, 0, (i >> 8) as u8 + 1, i as u8],
            src_mac: LB_MAC,
            ifindex: 1,
            service: i,
            family: 4,
            flags: backend_flags::VALID,
            mtu: 1500,
            ..Default::default()
        };
        f.dp.set_backend(10 + i, &b).unwrap();
        f.dp.set_service(&service_key(ports[i as usize]), &value(i), &[10 + i; 13])
            .unwrap();
    }
    // Some keys share a slot of the index: those are found through SERVICES.
    let keys: Vec<(ServiceKey, ServiceValue)> = (0..n)
        .map(|i| (service_key(ports[i as usize]), value(i)))
        .collect();
    let index = service_index(keys.iter().map(|(k, v)| (k, v)));
    let collided = index
        .iter()
        .filter(|e| e.state & service_index_state::COLLIDED != 0)
        .count();
    assert_eq!(collided, 20, "slots wanted by more than one key");
    let to_port = |port: u16| ipv4_tcp(CLIENT_MAC, LB_MAC, client(9), VIP, 40000, port, 0x02, b"");
    let reaches = |f: &Fixture, i: u32| -> Option<u32> {
        let frame = to_port(ports[i as usize]);
        let (action, out) = f.dp.test_run(&frame.bytes).unwrap();
        match action {
            XDP_TX => Some((u32::from(out[4]) - 1) << 8 | u32::from(out[5])),
            XDP_PASS => {
                assert_eq!(out, frame.bytes, "passed, but changed");
                None
            }
            other => panic!("service {i}: action {other}"),
        }
    };
    for i in 0..n {
        assert_eq!(
            reaches(&f, i),
            Some(i),
            "service {i} ({collided} slots collided)"
        );
    }
    // Half of them removed: their packets pass, the others still reach their own.
    for i in (0..n).step_by(2) {
        f.dp.remove_service(&service_key(ports[i as usize]))
            .unwrap();
    }
    for i in 0..n {
        let want = (i % 2 == 1).then_some(i);
        assert_eq!(reaches(&f, i), want, "service {i} after the removals");
    }
    // A port that never had a service passes.
    let frame = to_port(by_slot.values().nth(300).unwrap()[0]);
    assert_eq!(
        f.dp.test_run(&frame.bytes).unwrap(),
        (XDP_PASS, frame.bytes.clone())
    );
}

/// A service's table lives in `MAGLEV_DEFAULT` at the default size (read inline) and in
/// `MAGLEV` at any other: resized both ways, its clients reach the backends the new table names,
/// and the array of maps its size no longer uses holds nothing for it.
#[test]
fn a_table_resized_to_and_from_the_default_size_moves_between_the_arrays_of_maps() {
    use aya::maps::{Array, ArrayOfMaps, MapData};
    let mut f = fixture([100, 100, 100]);
    let live: Vec<MaglevBackend> = (0..3u32)
        .map(|i| MaglevBackend {
            id: i,
            addr: to_addr(backend_ip(i).into()),
            salt: 0,
            weight: 100,
        })
        .collect();
    let holds = |f: &Fixture, outer: &str| -> bool {
        let pin = f
            .dir
            .join(format!("v{}", lb_common::LAYOUT_VERSION))
            .join(outer);
        let map = MapData::from_pin(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
        let outer =
            ArrayOfMaps::<MapData, Array<MapData, u64>>::try_from(aya::maps::Map::ArrayOfMaps(map))
                .unwrap();
        match outer.get(&0, 0) {
            Ok(_) => true,
            Err(aya::maps::MapError::KeyNotFound) => false,
            Err(e) => panic!("reading {outer:?}: {e}"),
        }
    };
    for size in [TABLE_SIZE, 13, 257, TABLE_SIZE] {
        let table = build_table(&SEED, &live, size);
        f.dp.set_service(&service_key(80), &service_value(0, size), &table)
            .unwrap();
        let default = size == TABLE_SIZE;
        assert_eq!(
            holds(&f, lb_common::maps::MAGLEV_DEFAULT),
            default,
            "size {size}"
        );
        assert_eq!(holds(&f, lb_common::maps::MAGLEV), !default, "size {size}");
        for i in 1..=40u8 {
            let src = client(i);
            let want = table[source_slot(&SEED, size, &to_addr(src.into())).unwrap() as usize];
            let (action, out) = f.dp.test_run(&vip_syn(src).bytes).unwrap();
            assert_eq!(action, XDP_TX, "size {size}, client {src}");
            assert_eq!(out[0..6], backend_mac(want), "size {size}, client {src}");
        }
    }
}

/// A flow another node recorded (`[daemon.sync]`), written here by `adopt_peer_flows`: its next
/// packets follow it even where this node's slot was unchanged (the slot is then marked changed
/// with its own backend as the previous one), while every other flow of the slot stays where
/// it was; a flow already where this node sends it writes nothing, one of a backend this node
/// does not have is not placed.
#[test]
fn a_peers_flow_is_followed_and_moves_no_other_flow_of_its_slot() {
    use lb_userspace::datapath::{Adopted, PeerFlow};
    let mut f = fixture([100, 100, 100]);
    let src = client(11);
    let here = predicted(&f.table, src);
    let there = (here + 1) % 3;
    let peer = |client: Ipv4Addr, backend: Ipv4Addr| PeerFlow {
        client: client.into(),
        vip: VIP.into(),
        proto: 6,
        sport: 40000,
        dport: 80,
        every_port: false,
        backend: backend.into(),
        backend_port: None,
        closing: false,
    };
    let slot = source_slot(&SEED, TABLE_SIZE, &to_addr(src.into())).unwrap();
    assert!(!f.dp.slot_lanes(0, slot).unwrap().0.changed());
    let now = datapath::TableClock::default()
        .now()
        .expect("the table clock");
    let unchanged = client(12);
    let adopted =
        f.dp.adopt_peer_flows(
            &[
                peer(src, backend_ip(there)),
                peer(unchanged, backend_ip(predicted(&f.table, unchanged))),
                peer(client(13), Ipv4Addr::new(192, 0, 2, 99)),
            ],
            now,
        )
        .unwrap();
    assert_eq!(
        adopted,
        [Adopted::Recorded, Adopted::AlreadyThere, Adopted::Unknown]
    );
    // The peer's flow goes where the peer sent it, here too.
    assert_eq!(sent_to(&f, &vip_ack(src)), there);
    // Its slot is changed now, its previous backend the one it had: another unrecorded flow of
    // the same client (same slot) stays there, and so does a new connection.
    let (hot, side) = f.dp.slot_lanes(0, slot).unwrap();
    assert!(hot.changed());
    assert_eq!((hot.current(), side.old()), (here, here));
    let other_flow = ipv4_tcp(CLIENT_MAC, LB_MAC, src, VIP, 40001, 80, 0x10, b"");
    assert_eq!(sent_to(&f, &other_flow), here);
    let new_flow = ipv4_tcp(CLIENT_MAC, LB_MAC, src, VIP, 40002, 80, 0x02, b"");
    assert_eq!(sent_to(&f, &new_flow), here);
    // Nothing was written for the flow already in place: its slot stays unchanged.
    let unchanged_slot = source_slot(&SEED, TABLE_SIZE, &to_addr(unchanged.into())).unwrap();
    if unchanged_slot != slot {
        assert!(!f.dp.slot_lanes(0, unchanged_slot).unwrap().0.changed());
    }
    assert_eq!(f.dp.flow(&flow_key(unchanged, 40000)), None);
}

/// One host on two ports (a `nat` service's two backends of one address): the records the
/// program reports name their backend's port, so a peer places each on the right one; a flow
/// naming the address alone, which here means two backends, is not placed.
#[test]
fn a_peers_flow_names_the_port_of_a_repeated_address() {
    use lb_userspace::datapath::{Adopted, PeerFlow};
    let mut f = fixture([100, 100, 100]);
    for (i, port) in [(0u32, 8080u16), (1, 8081)] {
        let b = Backend {
            addr: to_addr(backend_ip(0).into()),
            tunnel_src: [0; 4],
            mac: backend_mac(i),
            src_mac: LB_MAC,
            ifindex: 1,
            service: 0,
            family: 4,
            flags: backend_flags::VALID,
            mtu: 1500,
            port: port.to_be(),
            ..Default::default()
        };
        f.dp.set_backend(i, &b).unwrap();
    }
    // Reported: a repeated address's record carries its port, any other none (as ever).
    let event = |backend: u32| lb_common::SyncEvent {
        flow: flow_key(client(21), 40000),
        service: 0,
        backend,
        flags: 0,
        _pad: 0,
    };
    let described = |backend| f.dp.describe_event(&event(backend)).unwrap();
    assert_eq!(
        (described(0).backend, described(0).backend_port),
        (backend_ip(0).into(), Some(8080))
    );
    assert_eq!(described(1).backend_port, Some(8081));
    assert_eq!(
        (described(2).backend, described(2).backend_port),
        (backend_ip(2).into(), None)
    );
    // Placed by address and port.
    let src = (21..60)
        .map(client)
        .find(|&c| predicted(&f.table, c) != 1)
        .unwrap();
    let peer = |client: Ipv4Addr, backend_port: Option<u16>| PeerFlow {
        client: client.into(),
        vip: VIP.into(),
        proto: 6,
        sport: 40000,
        dport: 80,
        every_port: false,
        backend: backend_ip(0).into(),
        backend_port,
        closing: false,
    };
    let now = datapath::TableClock::default()
        .now()
        .expect("the table clock");
    let adopted =
        f.dp.adopt_peer_flows(
            &[
                peer(src, Some(8081)),
                peer(client(61), None),
                peer(client(62), Some(9999)),
            ],
            now,
        )
        .unwrap();
    assert_eq!(
        adopted,
        [Adopted::Recorded, Adopted::Unknown, Adopted::Unknown]
    );
    assert_eq!(sent_to(&f, &vip_ack(src)), 1, "the flow of port 8081");
}
