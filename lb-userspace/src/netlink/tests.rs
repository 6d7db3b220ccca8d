//! These tests need root: each builds its own pair of network namespaces joined by a veth
//! pair and runs the code on a thread inside the first one.

use super::*;
use super::{neighbour::POLL_INTERVAL, parse::parse_link};
use netlink_packet_route::link::{InfoData, InfoVlan, LinkAttribute, LinkInfo, LinkMessage};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::time::Instant;

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

const A_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
const B_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
/// Behind B (A routes 192.0.2.128/25 via B); nobody holds it.
const FAR_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 200));
/// On the link, but nobody holds it.
const NOBODY_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99));
const A_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
const B_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2));
/// Behind B (A routes 2001:db8::1:0/112 via B); nobody holds it.
const FAR_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 1, 5));
const NOBODY_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99));

/// Two namespaces `a` and `b` joined by a veth pair: `veth0` in `a` (192.0.2.1/25,
/// 2001:db8::1/120, MTU 1400), `veth1` in `b` (192.0.2.2/25, 2001:db8::2/120). In `a`,
/// 192.0.2.128/25 and 2001:db8::1:0/112 are routed via b. Both namespaces are deleted on drop,
/// also when the test panics.
struct Lab {
    a: String,
    b: String,
}

impl Lab {
    fn new() -> Lab {
        Self::build(false)
    }

    /// Like `new`, but the link-local address of `veth0` stays tentative (duplicate address
    /// detection with 30 probes) for the whole test.
    fn with_slow_dad() -> Lab {
        Self::build(true)
    }

    fn build(slow_dad: bool) -> Lab {
        let n = NEXT_LAB.fetch_add(1, Ordering::SeqCst);
        let base = format!("nlt{}-{n}", std::process::id());
        // Built before any namespace exists so that Drop cleans up a half-built lab too.
        let lab = Lab {
            a: format!("{base}a"),
            b: format!("{base}b"),
        };
        let (a, b) = (lab.a.as_str(), lab.b.as_str());
        ip(&["netns", "add", a]);
        ip(&["netns", "add", b]);
        ip(&[
            "-n", a, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", b,
        ]);
        ip(&["-n", a, "link", "set", "veth0", "mtu", "1400"]);
        if slow_dad {
            let knob = "net.ipv6.conf.veth0.dad_transmits=30";
            ip(&["netns", "exec", a, "sysctl", "-qw", knob]);
        }
        ip(&["-n", a, "addr", "add", "192.0.2.1/25", "dev", "veth0"]);
        ip(&[
            "-n",
            a,
            "addr",
            "add",
            "2001:db8::1/120",
            "dev",
            "veth0",
            "nodad",
        ]);
        ip(&["-n", b, "addr", "add", "192.0.2.2/25", "dev", "veth1"]);
        ip(&[
            "-n",
            b,
            "addr",
            "add",
            "2001:db8::2/120",
            "dev",
            "veth1",
            "nodad",
        ]);
        for (ns, dev) in [(a, "lo"), (a, "veth0"), (b, "lo"), (b, "veth1")] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        ip(&[
            "-n",
            a,
            "route",
            "add",
            "192.0.2.128/25",
            "via",
            "192.0.2.2",
        ]);
        ip(&[
            "-n",
            a,
            "-6",
            "route",
            "add",
            "2001:db8::1:0/112",
            "via",
            "2001:db8::2",
        ]);
        lab
    }

    /// (ifindex, MAC) of `dev` in `ns` as `ip -j link` reports them.
    fn link(&self, ns: &str, dev: &str) -> (u32, [u8; 6]) {
        let out = ip(&["-n", ns, "-j", "link", "show", "dev", dev]);
        let json: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
        let index = json[0]["ifindex"].as_u64().expect("ifindex") as u32;
        let text = json[0]["address"].as_str().expect("address");
        let bytes: Vec<u8> = text
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).expect("hex MAC"))
            .collect();
        (index, bytes.try_into().expect("6-byte MAC"))
    }

    /// Whether `veth0` in `a` still has a tentative address (DAD not finished).
    fn tentative(&self) -> bool {
        let out = ip(&[
            "-n",
            &self.a,
            "-6",
            "addr",
            "show",
            "dev",
            "veth0",
            "tentative",
        ]);
        !out.trim().is_empty()
    }

    /// Runs `f` with a Netlink opened inside namespace `a`.
    fn in_a<T, F, Fut>(&self, f: F) -> T
    where
        F: FnOnce(Netlink) -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        in_netns(&self.a, f)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Runs `ip ARGS`, panics with its stderr when it fails, returns its stdout.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Moves the calling thread (only it) into the network namespace /run/netns/NAME.
fn enter_netns(name: &str) -> std::io::Result<()> {
    let file = std::fs::File::open(format!("/run/netns/{name}"))?;
    // SAFETY: setns(2) gets a file descriptor that stays open for the call (owned by `file`)
    // and CLONE_NEWNET; it changes nothing but this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Runs `f` on a new thread inside namespace `ns`, on a current-thread runtime built there,
/// so that the Netlink socket it gets is the namespace's. Panics propagate.
fn in_netns<T, F, Fut>(ns: &str, f: F) -> T
where
    F: FnOnce(Netlink) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let ns = ns.to_string();
    let thread = std::thread::spawn(move || {
        enter_netns(&ns).unwrap_or_else(|e| panic!("setns into {ns}: {e}"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime.block_on(async move {
            let nl = Netlink::new().expect("netlink socket");
            f(nl).await
        })
    });
    thread
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// lbd shares one Netlink between tasks of a multi-threaded runtime and wraps errors in anyhow.
#[test]
fn types_and_futures_are_send() {
    fn send<T: Send>(_: &T) {}
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<Netlink>();
    send_sync::<NetlinkError>();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let _guard = runtime.enter();
    let nl = Netlink::new().expect("netlink socket");
    let t = Duration::from_millis(1);
    send(&nl.interface_by_name("lo"));
    send(&nl.interface_by_index(1));
    send(&nl.route_get(A_V4));
    send(&nl.neighbour(1, A_V4));
    send(&nl.resolve_neighbour(1, A_V4, t));
    send(&nl.next_hop(A_V4, t));
}

#[test]
fn new_outside_a_runtime_is_an_error() {
    assert!(matches!(Netlink::new(), Err(NetlinkError::NoRuntime)));
}

/// A link message as the kernel sends it for `ip link add link eth0 name eth0.100 type vlan
/// id 100 [protocol 802.1ad]` (encoded, then parsed like a reply). This machine kind's
/// kernel has no 802.1Q support (CONFIG_VLAN_8021Q), so no real VLAN device can be made.
fn vlan_link(index: u32, parent: Option<u32>, info: Vec<InfoVlan>) -> Interface {
    use netlink_packet_route::link::InfoKind;
    use rtnetlink::packet_core::{Emitable, Parseable};
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.attributes
        .push(LinkAttribute::IfName(format!("eth0.{index}")));
    msg.attributes.push(LinkAttribute::Mtu(1500));
    if let Some(parent) = parent {
        msg.attributes.push(LinkAttribute::Link(parent));
    }
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Vlan),
        LinkInfo::Data(InfoData::Vlan(info)),
    ]));
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.emit(&mut buf);
    let parsed = LinkMessage::parse(&buf[..]).expect("parsing it back");
    parse_link(&parsed)
}

#[test]
fn a_vlan_device_names_its_id_parent_and_protocol() {
    use netlink_packet_route::link::VlanProtocol;
    let iface = vlan_link(7, Some(2), vec![InfoVlan::Id(100)]);
    assert_eq!(
        iface.vlan,
        Some(Vlan {
            id: 100,
            parent: 2,
            protocol: ETH_P_8021Q
        })
    );
    assert_eq!((iface.name.as_str(), iface.mtu), ("eth0.7", 1500));
    let ad = vlan_link(
        8,
        Some(2),
        vec![
            InfoVlan::Protocol(VlanProtocol::Ieee8021Ad),
            InfoVlan::Id(5),
        ],
    );
    assert_eq!(ad.vlan.map(|v| (v.id, v.protocol)), Some((5, 0x88a8)));
    // Without its parent or its id it is no usable VLAN.
    assert_eq!(vlan_link(9, None, vec![InfoVlan::Id(100)]).vlan, None);
    assert_eq!(vlan_link(10, Some(2), vec![]).vlan, None);
}

#[test]
fn interface_by_name_and_index() {
    let lab = Lab::new();
    let (index, mac) = lab.link(&lab.a, "veth0");
    let (by_name, by_index, missing_name, missing_index) = lab.in_a(move |nl| async move {
        (
            nl.interface_by_name("veth0").await.unwrap(),
            nl.interface_by_index(index).await.unwrap(),
            nl.interface_by_name("nosuch0").await.unwrap(),
            nl.interface_by_index(99_999).await.unwrap(),
        )
    });
    let iface = by_name.expect("veth0 exists");
    assert_eq!(iface.index, index);
    assert_eq!(iface.name, "veth0");
    assert_eq!(iface.mac, mac);
    assert_eq!(iface.mtu, 1400);
    assert!(iface.up);
    assert_eq!(
        iface.vlan, None,
        "a veth names its peer as its link, but is no VLAN"
    );
    assert!(iface.addrs.contains(&(A_V4, 25)), "{:?}", iface.addrs);
    assert!(iface.addrs.contains(&(A_V6, 120)), "{:?}", iface.addrs);
    assert_eq!(by_index, Some(iface));
    assert_eq!(missing_name, None);
    assert_eq!(missing_index, None);
}

#[test]
fn route_get_on_link_via_gateway_and_none() {
    let lab = Lab::new();
    let (index, _) = lab.link(&lab.a, "veth0");
    let (routes, none) = lab.in_a(|nl| async move {
        let mut routes = Vec::new();
        for dst in [B_V4, FAR_V4, B_V6, FAR_V6] {
            routes.push(nl.route_get(dst).await.unwrap());
        }
        (routes, nl.route_get("198.51.100.1".parse().unwrap()).await)
    });
    let expect = |gateway, prefsrc| Route {
        oif: index,
        gateway,
        prefsrc: Some(prefsrc),
    };
    assert_eq!(routes[0], expect(None, A_V4));
    assert_eq!(routes[1], expect(Some(B_V4), A_V4));
    assert_eq!(routes[2], expect(None, A_V6));
    assert_eq!(routes[3], expect(Some(B_V6), A_V6));
    let err = none.expect_err("no route to 198.51.100.1 in the lab");
    assert!(matches!(err, NetlinkError::NoRoute { .. }), "{err}");
    assert!(err.to_string().contains("198.51.100.1"), "{err}");
}

#[test]
fn resolve_neighbour_returns_the_peers_mac() {
    let lab = Lab::new();
    let (index, _) = lab.link(&lab.a, "veth0");
    let (_, peer_mac) = lab.link(&lab.b, "veth1");
    for addr in [B_V4, B_V6] {
        let (before, resolved, after) = lab.in_a(move |nl| async move {
            let before = nl.neighbour(index, addr).await.unwrap();
            let resolved = nl
                .resolve_neighbour(index, addr, Duration::from_secs(3))
                .await;
            let after = nl.neighbour(index, addr).await.unwrap();
            (before, resolved, after)
        });
        assert_eq!(before, None, "{addr}: no entry before resolution");
        assert_eq!(resolved.unwrap(), peer_mac, "{addr}");
        assert_eq!(after, Some(peer_mac), "{addr}: the entry stays");
    }
}

/// What triggers resolution on this kernel: RTM_NEWNEIGH with NTF_USE alone, without the UDP
/// fallback, resolves an ARP entry, and an ND entry once the link-local address is no longer
/// tentative.
#[test]
fn ntf_use_alone_triggers_resolution() {
    let lab = Lab::new();
    let (index, _) = lab.link(&lab.a, "veth0");
    let (_, peer_mac) = lab.link(&lab.b, "veth1");
    let dad_done = Instant::now() + Duration::from_secs(10);
    while lab.tentative() {
        assert!(Instant::now() < dad_done, "DAD on veth0 does not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    for addr in [B_V4, B_V6] {
        let mac = lab.in_a(move |nl| async move {
            nl.trigger_resolution(index, addr)
                .await
                .expect("NTF_USE request");
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if let Some(mac) = nl.neighbour(index, addr).await.unwrap() {
                    return Some(mac);
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            None
        });
        assert_eq!(mac, Some(peer_mac), "{addr} resolved by NTF_USE alone");
    }
}

/// While the link-local address is tentative NTF_USE sends no solicitation for an IPv6
/// neighbour; the UDP fallback resolves it anyway, well within a second.
#[test]
fn resolve_neighbour_v6_while_link_local_is_tentative() {
    let lab = Lab::with_slow_dad();
    let (index, _) = lab.link(&lab.a, "veth0");
    let (_, peer_mac) = lab.link(&lab.b, "veth1");
    assert!(
        lab.tentative(),
        "the lab's link-local address should be tentative"
    );
    let (resolved, elapsed) = lab.in_a(move |nl| async move {
        let start = Instant::now();
        let resolved = nl
            .resolve_neighbour(index, B_V6, Duration::from_secs(3))
            .await;
        (resolved, start.elapsed())
    });
    assert_eq!(resolved.unwrap(), peer_mac);
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    assert!(
        lab.tentative(),
        "DAD finished during the test: it proved nothing"
    );
}

#[test]
fn resolve_neighbour_times_out_for_an_absent_host() {
    let lab = Lab::new();
    let (index, _) = lab.link(&lab.a, "veth0");
    let timeout = Duration::from_millis(300);
    for addr in [NOBODY_V4, NOBODY_V6] {
        let (result, elapsed) = lab.in_a(move |nl| async move {
            let start = std::time::Instant::now();
            let result = nl.resolve_neighbour(index, addr, timeout).await;
            (result, start.elapsed())
        });
        let err = result.expect_err("nobody answers");
        assert!(matches!(err, NetlinkError::Unresolved { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&addr.to_string()), "{text}");
        assert!(text.contains("veth0"), "{text}");
        assert!(elapsed >= timeout, "{addr}: gave up after {elapsed:?}");
        assert!(
            elapsed < timeout + Duration::from_millis(500),
            "{addr}: took {elapsed:?}"
        );
    }
}

#[test]
fn next_hop_through_a_gateway_and_on_link() {
    let lab = Lab::new();
    let (index, own_mac) = lab.link(&lab.a, "veth0");
    let (_, peer_mac) = lab.link(&lab.b, "veth1");
    let timeout = Duration::from_secs(3);
    let (hops, local) = lab.in_a(move |nl| async move {
        let mut hops = Vec::new();
        for dst in [FAR_V4, FAR_V6, B_V4, B_V6] {
            hops.push(nl.next_hop(dst, timeout).await.unwrap());
        }
        (hops, nl.next_hop(A_V4, timeout).await)
    });
    for (hop, via, prefsrc) in [
        (hops[0], B_V4, A_V4),
        (hops[1], B_V6, A_V6),
        (hops[2], B_V4, A_V4),
        (hops[3], B_V6, A_V6),
    ] {
        let expected = NextHop {
            ifindex: index,
            mac: peer_mac,
            src_mac: own_mac,
            via,
            prefsrc: Some(prefsrc),
        };
        assert_eq!(hop, expected);
    }
    let err = local.expect_err("own address");
    assert!(
        matches!(err, NetlinkError::LocalDestination { .. }),
        "{err}"
    );
}

/// Host routes of one table and protocol (the announcer's): added on lo in both families, in a
/// table past 255 too, listed as `ip` shows them, other protocols' routes in the same table
/// neither listed nor removed; removing one already gone is no error. Then the announcer's
/// `reconcile` on that table: it adopts what is there, removes what should not be, adds what
/// is missing, and leaves other protocols' routes alone.
#[test]
fn host_routes_of_a_table_and_protocol() {
    let lab = Lab::new();
    let (lo, _) = lab.link(&lab.a, "lo");
    let vip4: IpAddr = "203.0.113.10".parse().unwrap();
    let vip6: IpAddr = "2001:db8::10".parse().unwrap();
    let other: IpAddr = "203.0.113.99".parse().unwrap();
    ip(&[
        "-n",
        &lab.a,
        "route",
        "add",
        "203.0.113.99/32",
        "dev",
        "lo",
        "table",
        "100",
        "proto",
        "201",
    ]);
    let listed = lab.in_a(move |nl| async move {
        nl.add_host_route(vip4, lo, 100, 200).await.unwrap();
        nl.add_host_route(vip6, lo, 100, 200).await.unwrap();
        // Again: replaced, not an error.
        nl.add_host_route(vip4, lo, 100, 200).await.unwrap();
        nl.add_host_route(vip4, lo, 70_000, 200).await.unwrap();
        (
            nl.table_routes(100, 200).await.unwrap(),
            nl.table_routes(70_000, 200).await.unwrap(),
        )
    });
    let dsts: Vec<IpAddr> = listed.0.iter().map(|r| r.dst).collect();
    assert_eq!(dsts, vec![vip4, vip6], "{listed:?}");
    assert!(
        listed.0.iter().all(|r| r.is_host_route_on(lo)),
        "{listed:?}"
    );
    assert_eq!(listed.1.len(), 1, "{listed:?}");
    let shown = ip(&["-n", &lab.a, "-d", "route", "show", "table", "100"]);
    assert!(
        shown.contains("unicast 203.0.113.10 dev lo proto 200 scope link"),
        "{shown}"
    );
    assert!(shown.contains("203.0.113.99 dev lo proto 201"), "{shown}");
    let shown6 = ip(&["-n", &lab.a, "-6", "-d", "route", "show", "table", "100"]);
    assert!(
        shown6.contains("unicast 2001:db8::10 dev lo proto 200"),
        "{shown6}"
    );

    let after = lab.in_a(move |nl| async move {
        nl.remove_route(vip6, 128, 100, 200).await.unwrap();
        nl.remove_route(vip6, 128, 100, 200).await.unwrap();
        nl.remove_route(vip4, 32, 70_000, 200).await.unwrap();
        nl.table_routes(100, 200).await.unwrap()
    });
    assert_eq!(
        after.iter().map(|r| r.dst).collect::<Vec<_>>(),
        vec![vip4],
        "{after:?}"
    );

    // The announcer: a route of its protocol that is not a host route on lo is replaced, one
    // of a VIP that does not serve removed, a missing one added; proto 201's stays.
    ip(&[
        "-n",
        &lab.a,
        "route",
        "add",
        "198.51.100.0/24",
        "dev",
        "veth0",
        "table",
        "100",
        "proto",
        "200",
    ]);
    let cfg = crate::config::Announce {
        table: 100,
        protocol: 200,
    };
    let want: std::collections::BTreeSet<IpAddr> = [vip6].into_iter().collect();
    let (done, now) = lab.in_a(move |nl| async move {
        let done = crate::announce::reconcile(&nl, &cfg, &want).await.unwrap();
        (done, crate::announce::installed(&nl, &cfg).await.unwrap())
    });
    assert_eq!(done, now);
    assert_eq!(now.into_iter().collect::<Vec<_>>(), vec![vip6]);
    let shown = ip(&["-n", &lab.a, "route", "show", "table", "100"]);
    assert!(!shown.contains("198.51.100.0"), "{shown}");
    assert!(!shown.contains("203.0.113.10"), "{shown}");
    assert!(shown.contains(&other.to_string()), "{shown}");
}
