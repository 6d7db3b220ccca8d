//! Tests of the harness itself (need root; they fail, never skip, without it).

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::*;

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("running ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn leftovers(prefix: &str) -> Vec<String> {
    let tag = format!("{prefix}-");
    netns_list()
        .lines()
        .filter(|l| l.starts_with(&tag))
        .map(|l| l.to_string())
        .collect()
}

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

#[test]
fn wait_until_times_out_with_the_name() {
    let e = wait_until(Duration::from_millis(20), "the sky to fall", || false).unwrap_err();
    assert!(e.to_string().contains("the sky to fall"), "{e}");
    let mut n = 0;
    wait_until(Duration::from_secs(1), "three polls", || {
        n += 1;
        n == 3
    })
    .expect("succeeds");
    let e = retry_until(Duration::from_millis(20), "x", || -> anyhow::Result<()> {
        anyhow::bail!("inner reason")
    })
    .unwrap_err();
    assert!(format!("{e:#}").contains("inner reason"), "{e:#}");
}

#[test]
fn big_file_is_deterministic() {
    let a = big_file_contents();
    assert_eq!(a.len(), BIG_FILE_SIZE);
    assert_eq!(a, big_file_contents());
    assert_eq!(parse_backend("backend 3\n"), Some(3));
    assert_eq!(parse_backend("lb-host"), None);
}

#[test]
fn stale_name_parsing() {
    use crate::topology::prefix_pid_for_tests as p;
    assert_eq!(p("lbt1234x0-lb"), Some(1234));
    assert_eq!(p("lbt1234x12"), Some(1234));
    assert_eq!(p("lbt1234x12-b3"), Some(1234));
    assert_eq!(p("lbt1234x"), None);
    assert_eq!(p("lbt1234x1y"), None);
    assert_eq!(p("lbtx1-lb"), None);
    assert_eq!(p("nlt1234-2a"), None);
}

#[test]
fn default_options() {
    // No namespaces needed: options only.
    let opts = TopologyOptions::default();
    assert_eq!(opts.backends, 3);
    assert_eq!(opts.clients, 2);
    assert_eq!(opts.addresses_per_client, 40);
}

/// Builds the default topology and checks names, addresses, the switch's XDP program and the
/// backends' HTTP servers (directly, no load balancer involved).
#[test]
fn topology_builds_and_backends_answer_directly() {
    require_root();
    let vip: IpAddr = "203.0.113.10".parse().expect("vip");
    let t = Topology::new(TopologyOptions {
        vips: vec![vip],
        ..Default::default()
    })
    .expect("topology");
    let listed = leftovers(t.prefix());
    assert_eq!(listed.len(), 1 + 1 + 3 + 2, "namespaces: {listed:?}");

    // Addresses per the documented formula.
    let c1 = t.client_sources(1);
    let c2 = t.client_sources(2);
    assert_eq!(c1.len(), 40);
    assert_eq!(c1[0].to_string(), "198.51.100.1");
    assert_eq!(c1[39].to_string(), "198.51.100.40");
    assert_eq!(c2[0].to_string(), "198.51.100.129");
    assert_eq!(c2[39].to_string(), "198.51.100.168");
    assert_eq!(t.all_client_sources().len(), 80);
    assert_eq!(t.client_ns_of(c2[5]), Some(t.client_ns(2)));
    assert_eq!(t.backend_addr(3).to_string(), "192.0.2.13");

    // The XDP_PASS program sits on every switch-side veth end.
    for ns in [t.lb_ns(), t.backend_ns(1), t.client_ns(2)] {
        let port = t.switch_port(ns).expect("port");
        let out = Command::new("ip")
            .args(["-n", t.switch_ns(), "link", "show", port])
            .output()
            .expect("ip link show");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("xdp"), "no xdp on {port}: {text}");
    }

    // Backends: eth0 address, VIP on lo, no TX checksum offload, DSR sysctls.
    let addrs = t
        .exec_ok(t.backend_ns(2), &["ip", "-4", "-o", "addr"])
        .expect("ip addr");
    assert!(
        addrs.contains("192.0.2.12/24") && addrs.contains("203.0.113.10/32"),
        "{addrs}"
    );
    let feat = t
        .exec_ok(t.backend_ns(2), &["ethtool", "-k", "eth0"])
        .expect("ethtool");
    assert!(feat.contains("tx-checksumming: off"), "{feat}");
    let arp = t
        .exec_ok(
            t.backend_ns(2),
            &["sysctl", "-n", "net.ipv4.conf.eth0.arp_ignore"],
        )
        .expect("sysctl");
    assert_eq!(arp.trim(), "1");
    let routes = t
        .exec_ok(t.client_ns(1), &["ip", "-4", "route"])
        .expect("ip route");
    assert!(routes.contains("203.0.113.10 via 192.0.2.2"), "{routes}");

    // A client's eth0 address straight to backend 1.
    let r = t
        .http_get(
            t.client_ns(1),
            t.client_addr(1),
            sa(t.backend_addr(1), 80),
            "/",
        )
        .expect("GET / from client 1");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "backend 1\n");
    assert_eq!(r.header("x-backend"), Some("1"));
    let r = t
        .http_get(
            t.client_ns(1),
            t.client_addr(1),
            sa(t.backend_addr(3), 80),
            "/healthz",
        )
        .expect("GET /healthz");
    assert_eq!((r.status, r.text().as_ref()), (200, "ok\n"));
    let r = t
        .http_get(
            t.client_ns(1),
            t.client_addr(1),
            sa(t.backend_addr(3), 80),
            "/nope",
        )
        .expect("GET /nope");
    assert_eq!(r.status, 404);
}

/// Extra source addresses reach the backends directly, so the backends' return routes work;
/// the big file arrives whole.
#[test]
fn extra_source_addresses_reach_backends() {
    require_root();
    let t = Topology::new(TopologyOptions::default()).expect("topology");
    // Several threads at once, each from its own source address.
    let srcs: Vec<IpAddr> = vec![
        t.client_sources(1)[0],
        t.client_sources(1)[39],
        t.client_sources(2)[0],
        t.client_sources(2)[39],
    ];
    std::thread::scope(|s| {
        let handles: Vec<_> = srcs
            .iter()
            .enumerate()
            .map(|(k, &src)| {
                let t = &t;
                s.spawn(move || {
                    let b = k % 3 + 1;
                    let got = t
                        .which_backend(src, sa(t.backend_addr(b), 80))
                        .unwrap_or_else(|e| panic!("from {src}: {e:#}"));
                    assert_eq!(got, b, "from {src}");
                })
            })
            .collect();
        for h in handles {
            h.join().expect("request thread");
        }
    });
    let src = t.client_sources(2)[7];
    let r = t
        .http_get(t.client_ns(2), src, sa(t.backend_addr(2), 80), "/big")
        .expect("GET /big");
    assert_eq!(r.status, 200);
    assert!(r.body == big_file_contents(), "big file differs");
}

/// Processes, backend restarts, fixed servers, teardown hooks.
#[test]
fn processes_servers_and_backend_restart() {
    require_root();
    let t = Topology::new(TopologyOptions {
        backends: 1,
        clients: 1,
        addresses_per_client: 2,
        ..Default::default()
    })
    .expect("topology");
    let src = t.client_sources(1)[1];

    // A fixed server in the LB namespace, reached from a client source address.
    let srv = t
        .serve_fixed(t.lb_ns(), sa(t.lb_addr(), 8080), "lb-host")
        .expect("serve_fixed");
    let r = t
        .http_get(t.client_ns(1), src, sa(t.lb_addr(), 8080), "/")
        .expect("GET lb-host");
    assert_eq!(r.text(), "lb-host");
    assert_eq!(t.fixed_hits(srv), 1);
    t.stop_fixed(srv);
    assert!(
        t.http_get(t.client_ns(1), src, sa(t.lb_addr(), 8080), "/")
            .is_err()
    );

    // Backend stop/start.
    let dst = sa(t.backend_addr(1), 80);
    t.stop_backend_server(1).expect("stop");
    assert!(!t.backend_server_running(1));
    let e = t.http_get(t.client_ns(1), src, dst, "/").unwrap_err();
    assert!(format!("{e:#}").contains("refused"), "{e:#}");
    t.start_backend_server(1).expect("start");
    assert_eq!(t.which_backend(src, dst).expect("after restart"), 1);

    // A tracked process with only its network namespace changed.
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "echo hello $LBT_VAR; ip -o addr show eth0; exec sleep 30",
    ])
    .env("LBT_VAR", "there");
    let h = t.spawn_nsenter(t.lb_ns(), &cmd).expect("spawn");
    wait_until(Duration::from_secs(5), "sh to print its address", || {
        t.log_of(h).contains("192.0.2.2/24")
    })
    .expect("log");
    assert!(t.log_of(h).contains("hello there"));
    assert!(t.is_running(h));
    let st = t.stop(h, Duration::from_secs(5)).expect("stop");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(libc::SIGTERM)
    );

    let h2 = t
        .spawn_nsenter(t.lb_ns(), Command::new("sleep").arg("30"))
        .expect("spawn");
    t.signal(h2, libc::SIGUSR1).expect("signal");
    t.wait_exit(h2, Duration::from_secs(5))
        .expect("exits on SIGUSR1");

    let hook_ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = hook_ran.clone();
    let lbns = t.lb_ns().to_string();
    t.on_teardown(move || {
        // Namespaces still exist while hooks run.
        assert!(netns_path(&lbns).exists());
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    // Left running: teardown must kill it.
    let _h3 = t
        .spawn_nsenter(t.backend_ns(1), Command::new("sleep").arg("60"))
        .expect("spawn");
    let prefix = t.prefix().to_string();
    let work = t.work_dir().to_path_buf();
    drop(t);
    assert!(hook_ran.load(std::sync::atomic::Ordering::SeqCst));
    assert!(leftovers(&prefix).is_empty(), "{:?}", leftovers(&prefix));
    assert!(!work.exists());
}

/// Dropping the topology removes every namespace and the work dir.
#[test]
fn teardown_leaves_nothing() {
    require_root();
    let t = Topology::new(TopologyOptions {
        backends: 2,
        clients: 1,
        addresses_per_client: 3,
        start_servers: false,
        vips: vec![],
        ..Default::default()
    })
    .expect("topology");
    let prefix = t.prefix().to_string();
    let work = t.work_dir().to_path_buf();
    assert_eq!(leftovers(&prefix).len(), 1 + 1 + 2 + 1);
    drop(t);
    assert!(leftovers(&prefix).is_empty(), "{:?}", leftovers(&prefix));
    assert!(!work.exists());
}

/// A panic while a topology is alive still tears it down.
#[test]
fn panic_tears_down() {
    require_root();
    let seen: Mutex<Option<String>> = Mutex::new(None);
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let t = Topology::new(TopologyOptions {
            backends: 1,
            clients: 1,
            addresses_per_client: 1,
            ..Default::default()
        })
        .expect("topology");
        *seen.lock().expect("lock") = Some(t.prefix().to_string());
        assert!(!leftovers(t.prefix()).is_empty());
        panic!("deliberate panic with a live topology");
    }));
    assert!(res.is_err());
    let prefix = seen.lock().expect("lock").clone().expect("prefix recorded");
    assert!(leftovers(&prefix).is_empty(), "{:?}", leftovers(&prefix));
}

/// Setup errors are reported, and leave nothing behind.
#[test]
fn bad_options_fail_cleanly() {
    require_root();
    // IPv6 VIPs are supported, but not one that is a host's own address or not global.
    for bad in [
        "2001:db8::2",
        "2001:db8::12",
        "2001:db8:c2::3",
        "fe80::10",
        "ff02::1",
    ] {
        let e = Topology::new(TopologyOptions {
            vips: vec![bad.parse().expect("v6")],
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("IPv6 VIP"), "{bad}: {e:#}");
    }
    let e = Topology::new(TopologyOptions {
        clients: 3,
        addresses_per_client: 63,
        ..Default::default()
    })
    .unwrap_err();
    assert!(format!("{e:#}").contains("addresses per client"), "{e:#}");
}

fn mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).expect("hex"))
        .collect();
    v.try_into().expect("6 bytes")
}

/// What both DSR path tests check once the forwarder is attached: every client source reaches
/// `backend` through `vip`, a large response arrives whole, and traffic to the LB's own
/// address (`lb_addr`) still reaches its stack.
fn assert_dsr_path(t: &Topology, vip: IpAddr, backend: usize, sources: &[IpAddr], lb_addr: IpAddr) {
    for &src in sources {
        assert_eq!(t.which_backend(src, sa(vip, 80)).expect("via VIP"), backend);
    }
    let r = t
        .http_get(t.client_ns(1), sources[0], sa(vip, 80), "/big")
        .expect("GET /big via VIP");
    assert!(r.body == big_file_contents(), "big file differs via VIP");
    t.serve_fixed(t.lb_ns(), sa(lb_addr, 8081), "lb-host")
        .expect("serve");
    let r = t
        .http_get(t.client_ns(1), sources[1], sa(lb_addr, 8081), "/")
        .expect("GET lb-host");
    assert_eq!(r.text(), "lb-host");
}

/// The topology carries an L2 DSR flow end to end: client -> VIP via the LB, whose XDP
/// program sends it back out with XDP_TX to backend 2, which answers the client directly.
/// This is what the switch-side XDP_PASS programs and the checksum settings are for.
#[test]
fn xdp_tx_dsr_path_works() {
    require_root();
    let vip = std::net::Ipv4Addr::new(203, 0, 113, 10);
    let t = Topology::new(TopologyOptions {
        backends: 2,
        clients: 1,
        addresses_per_client: 4,
        vips: vec![IpAddr::V4(vip)],
        start_servers: true,
        ..Default::default()
    })
    .expect("topology");
    let mut prog = bpf::TestProg::dsr(IpAddr::V4(vip), mac(t.backend_mac(2)), mac(t.lb_mac()))
        .expect("loading the forwarder");
    let _link = netns::attach_xdp(t.lb_ns(), "eth0", &mut prog).expect("attach forwarder");
    assert_dsr_path(&t, IpAddr::V4(vip), 2, &t.client_sources(1), t.lb_addr());
}

/// IPv6 addresses per the documented scheme, usable at once (never tentative), routes, the
/// backends' nginx on IPv6, and HTTP from IPv6 client sources straight to the backends.
#[test]
fn ipv6_addresses_routes_and_direct_http() {
    require_root();
    let vip6: IpAddr = "2001:db8::10".parse().expect("vip");
    let vip4: IpAddr = "203.0.113.10".parse().expect("vip");
    let t = Topology::new(TopologyOptions {
        vips: vec![vip4, vip6],
        ..Default::default()
    })
    .expect("topology");

    assert_eq!(t.lb_addr_v6().to_string(), "2001:db8::2");
    assert_eq!(t.backend_addr_v6(1).to_string(), "2001:db8::11");
    assert_eq!(t.backend_addr_v6(3).to_string(), "2001:db8::13");
    assert_eq!(t.client_addr_v6(2).to_string(), "2001:db8::102");
    let c1 = t.client_sources_v6(1);
    let c2 = t.client_sources_v6(2);
    assert_eq!(c1.len(), 40);
    assert_eq!(c1[0].to_string(), "2001:db8:c1::1");
    assert_eq!(c1[9].to_string(), "2001:db8:c1::10");
    assert_eq!(c1[39].to_string(), "2001:db8:c1::40");
    assert_eq!(c2[0].to_string(), "2001:db8:c2::1");
    assert_eq!(t.all_client_sources_v6().len(), 80);
    assert_eq!(t.client_of(c2[5]), Some(2));
    assert_eq!(t.client_of(t.client_addr_v6(1)), Some(1));
    assert_eq!(t.client_ns_of(c1[3]), Some(t.client_ns(1)));
    assert_eq!(t.client_of("2001:db8:c3::1".parse().unwrap()), None);

    // Addresses: none tentative (nodad, accept_dad=0), the link-local one included.
    let addrs = t
        .exec_ok(t.backend_ns(2), &["ip", "-6", "-o", "addr"])
        .expect("ip addr");
    assert!(
        addrs.contains("2001:db8::12/64") && addrs.contains("2001:db8::10/128"),
        "{addrs}"
    );
    assert!(addrs.contains("fe80::"), "{addrs}");
    for ns in [t.lb_ns(), t.backend_ns(1), t.client_ns(1)] {
        let a = t.exec_ok(ns, &["ip", "-6", "-o", "addr"]).expect("ip addr");
        assert!(!a.contains("tentative"), "{ns}: {a}");
        let dad = t
            .exec_ok(
                ns,
                &[
                    "sysctl",
                    "-n",
                    "net.ipv6.conf.eth0.accept_dad",
                    "net.ipv6.conf.eth0.accept_ra",
                ],
            )
            .expect("sysctl");
        assert_eq!(
            dad.split_whitespace().collect::<Vec<_>>(),
            ["0", "0"],
            "{ns}"
        );
    }
    let a = t
        .exec_ok(
            t.client_ns(2),
            &["ip", "-6", "-o", "addr", "show", "dev", "lo"],
        )
        .expect("ip addr");
    assert!(
        a.contains("2001:db8:c2::1/128") && a.contains("2001:db8:c2::40/128"),
        "{a}"
    );
    // The switch keeps IPv6 off: no addresses of its own.
    let sw = t
        .exec_ok(t.switch_ns(), &["ip", "-6", "-o", "addr"])
        .expect("ip addr");
    assert!(sw.trim().is_empty(), "switch has IPv6 addresses: {sw}");

    // Routes: clients reach the VIPs via the LB, backends and LB the clients' blocks.
    let routes = t
        .exec_ok(t.client_ns(1), &["ip", "-6", "route"])
        .expect("ip route");
    assert!(routes.contains("2001:db8::10 via 2001:db8::2"), "{routes}");
    let routes4 = t
        .exec_ok(t.client_ns(1), &["ip", "-4", "route"])
        .expect("ip route");
    assert!(routes4.contains("203.0.113.10 via 192.0.2.2"), "{routes4}");
    for ns in [t.backend_ns(3), t.lb_ns()] {
        let routes = t.exec_ok(ns, &["ip", "-6", "route"]).expect("ip route");
        assert!(
            routes.contains("2001:db8:c1::/48 via 2001:db8::101")
                && routes.contains("2001:db8:c2::/48 via 2001:db8::102"),
            "{ns}: {routes}"
        );
    }

    // HTTP over IPv6, from extra sources and eth0 addresses, several threads at once.
    let cases: Vec<(IpAddr, usize)> = vec![
        (c1[0], 1),
        (c1[39], 2),
        (c2[0], 3),
        (c2[39], 1),
        (t.client_addr_v6(2), 2),
    ];
    std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|&(src, b)| {
                let t = &t;
                s.spawn(move || {
                    let got = t
                        .which_backend(src, sa(t.backend_addr_v6(b), 80))
                        .unwrap_or_else(|e| panic!("from {src}: {e:#}"));
                    assert_eq!(got, b, "from {src}");
                })
            })
            .collect();
        for h in handles {
            h.join().expect("request thread");
        }
    });
    let r = t
        .http_get(t.client_ns(2), c2[7], sa(t.backend_addr_v6(2), 80), "/big")
        .expect("GET /big over IPv6");
    assert_eq!(r.status, 200);
    assert!(r.body == big_file_contents(), "big file differs");
    // The fixed server and the LB's own IPv6 stack.
    t.serve_fixed(t.lb_ns(), sa(t.lb_addr_v6(), 8080), "lb-host-v6")
        .expect("serve_fixed");
    let r = t
        .http_get(t.client_ns(1), c1[1], sa(t.lb_addr_v6(), 8080), "/")
        .expect("GET lb-host over IPv6");
    assert_eq!(r.text(), "lb-host-v6");
}

/// The IPv6 DSR path end to end, as for IPv4: client -> IPv6 VIP via the LB, XDP_TX to backend
/// 3, which holds the VIP on lo and answers the client directly. And no backend answers a
/// neighbour solicitation for the VIP (held on lo, not on eth0).
#[test]
fn xdp_tx_dsr_path_works_v6() {
    require_root();
    let vip = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
    let t = Topology::new(TopologyOptions {
        backends: 3,
        clients: 1,
        addresses_per_client: 4,
        vips: vec![IpAddr::V6(vip)],
        start_servers: true,
        ..Default::default()
    })
    .expect("topology");
    let mut prog = bpf::TestProg::dsr(IpAddr::V6(vip), mac(t.backend_mac(3)), mac(t.lb_mac()))
        .expect("loading the forwarder");
    let _link = netns::attach_xdp(t.lb_ns(), "eth0", &mut prog).expect("attach forwarder");
    assert_dsr_path(
        &t,
        IpAddr::V6(vip),
        3,
        &t.client_sources_v6(1),
        t.lb_addr_v6(),
    );

    // The VIP lies in the LB's on-link 2001:db8::/64: a datagram to it makes the LB solicit
    // it. No backend may answer (each answers for its eth0 address, as checked first).
    let neigh = |addr: IpAddr| -> String {
        t.exec_ok(
            t.lb_ns(),
            &[
                "ip",
                "-6",
                "neigh",
                "show",
                &addr.to_string(),
                "dev",
                "eth0",
            ],
        )
        .expect("ip neigh")
    };
    let poke = |addr: IpAddr| {
        t.in_netns(t.lb_ns(), || {
            let s = std::net::UdpSocket::bind("[::]:0")?;
            s.send_to(b"", sa(addr, 9))?;
            Ok(())
        })
        .expect("UDP datagram from the LB")
    };
    let b1 = t.backend_addr_v6(1);
    poke(b1);
    wait_until(
        Duration::from_secs(5),
        "backend 1's IPv6 neighbour entry",
        || neigh(b1).contains("lladdr 02:00:00:00:0b:01"),
    )
    .expect("backend 1 answers solicitations for its own address");
    poke(IpAddr::V6(vip));
    // Proving a negative: give the backends a second (they answer in microseconds).
    let answered = wait_until(Duration::from_secs(1), "an answer for the VIP", || {
        neigh(IpAddr::V6(vip)).contains("lladdr")
    });
    let entry = neigh(IpAddr::V6(vip));
    assert!(
        answered.is_err(),
        "a backend answered a neighbour solicitation for the VIP: {entry}"
    );
    // The LB did solicit it (so the silence above means something).
    assert!(
        entry.contains("INCOMPLETE") || entry.contains("FAILED"),
        "no neighbour entry for the VIP: {entry:?}"
    );
}

/// `ip -n NS route get DST` (for where the kernel sends a destination).
fn route_get(ns: &str, dst: IpAddr) -> String {
    let out = Command::new("ip")
        .args(["-n", ns, "route", "get", &dst.to_string()])
        .output()
        .expect("ip route get");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A backend side behind the LB's second interface: backends on it and behind two gateways
/// answer clients (both families) through the LB (and a gateway); a far backend's route moves
/// from one gateway to the other. Bad side options are refused before anything is made.
#[test]
fn backend_side_on_a_second_interface_with_gateways() {
    require_root();
    let t = Topology::new(TopologyOptions {
        backends: 1,
        clients: 1,
        addresses_per_client: 2,
        backend_side: Some(BackendSide {
            direct: 1,
            gateways: 2,
            behind: 2,
        }),
        ..Default::default()
    })
    .expect("topology");
    assert_eq!(t.backends(), 1 + 1 + 2);
    assert_eq!(t.gateways(), 2);
    assert_eq!(t.lb_interfaces(), ["eth0", "eth1"]);
    assert_eq!(leftovers(t.prefix()).len(), 1 + 1 + 4 + 1 + 2);
    assert_eq!(t.backend_addr(2).to_string(), "203.0.113.130");
    assert_eq!(t.backend_addr_v6(2).to_string(), "2001:db8:b::130");
    assert_eq!(t.backend_addr(3).to_string(), "203.0.113.211");
    assert_eq!(t.backend_addr_v6(4).to_string(), "2001:db8:f::212");
    assert_eq!(t.gateway_addrs(2).0.to_string(), "203.0.113.182");
    // XDP_PASS on every switch port, the LB's second and the gateways' far ones included.
    for port in ["lb1", "g1", "g2f", "b4"] {
        let out = t
            .exec_ok(t.switch_ns(), &["ip", "link", "show", port])
            .expect("ip link show");
        assert!(out.contains("xdp"), "no xdp on {port}: {out}");
    }
    // Every backend answers a client directly addressed, whatever its segment.
    let src = t.client_sources(1)[0];
    let src6 = t.client_sources_v6(1)[0];
    for i in 1..=t.backends() {
        for (src, dst) in [(src, t.backend_addr(i)), (src6, t.backend_addr_v6(i))] {
            let r = t
                .http_get(t.client_ns(1), src, sa(dst, 80), "/")
                .unwrap_or_else(|e| panic!("GET backend {i} at {dst} from {src}: {e:#}"));
            assert_eq!(r.text(), format!("backend {i}\n"), "{dst}");
        }
    }
    // The far segment is routed via gateway 1; one backend moves to gateway 2 and stays
    // reachable.
    let (gw1, gw1_6) = t.gateway_addrs(1);
    let (gw2, gw2_6) = t.gateway_addrs(2);
    assert!(route_get(t.lb_ns(), t.backend_addr(4)).contains(&format!("via {gw1} dev eth1")));
    t.route_backend_via(4, 2).expect("moving backend 4's route");
    let via = route_get(t.lb_ns(), t.backend_addr(4));
    assert!(via.contains(&format!("via {gw2} dev eth1")), "{via}");
    let via6 = route_get(t.lb_ns(), t.backend_addr_v6(4));
    assert!(via6.contains(&format!("via {gw2_6} dev eth1")), "{via6}");
    assert!(route_get(t.lb_ns(), t.backend_addr_v6(3)).contains(&format!("via {gw1_6}")));
    let r = t
        .http_get(t.client_ns(1), src, sa(t.backend_addr(4), 80), "/")
        .expect("GET backend 4 via gateway 2");
    assert_eq!(r.text(), "backend 4\n");
    let e = Topology::new(TopologyOptions {
        backend_side: Some(BackendSide {
            behind: 1,
            ..Default::default()
        }),
        ..Default::default()
    })
    .unwrap_err();
    assert!(format!("{e:#}").contains("behind no gateway"), "{e:#}");
}
