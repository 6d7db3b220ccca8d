//! End to end with two LB interfaces (issue 10, item 5): clients on eth0, backends behind eth1
//! (directly on its segment for `dsr`, behind a gateway router for `tunnel`), lbd's XDP program
//! on both. Real lbd, real nginx, real TCP from many client addresses; the backends answer the
//! clients through the LB's kernel, which routes between its segments. Needs root (fails loudly
//! without it).

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use lb_tests::{
    BackendSide, Topology, TopologyOptions,
    http::upload,
    lbd::{Lbd, LbdPaths, decapsulate_on, start_lbd},
    require_root,
};

const VIP_DSR: &str = "203.0.113.10";
const VIP_TUN: &str = "203.0.113.20";
const VIP6_TUN: &str = "2001:db8:113::20";
const SEED_HEX: &str = "5f0c1d2e3f4051627384950a1b2c3d4e";
/// The sinks' port (tunnel services for uploads).
const SINK: u16 = 9000;

fn vip(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr.parse().unwrap(), port)
}

/// Backends 1-2 on eth1's segment, 3-4 behind gateway 1.
fn topology() -> Topology {
    require_root();
    Topology::new(TopologyOptions {
        backends: 0,
        clients: 2,
        addresses_per_client: 12,
        vips: vec![
            VIP_DSR.parse().unwrap(),
            VIP_TUN.parse().unwrap(),
            VIP6_TUN.parse().unwrap(),
        ],
        backend_side: Some(BackendSide {
            direct: 2,
            gateways: 1,
            behind: 2,
        }),
        ..Default::default()
    })
    .expect("building the namespace topology")
}

fn config(t: &Topology, paths: &LbdPaths) -> String {
    let mut c = paths.daemon_section(&format!("hash_seed = \"{SEED_HEX}\""));
    let backends = |ids: &[usize], v6: bool| -> String {
        ids.iter()
            .map(|&i| {
                let a = if v6 {
                    t.backend_addr_v6(i)
                } else {
                    t.backend_addr(i)
                };
                format!("\n[[service.backend]]\naddress = \"{a}\"\n")
            })
            .collect()
    };
    let service = |name: &str, vip: &str, port: u16, forwarding: &str, b: String| {
        format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\nprotocol = \"tcp\"\nforwarding = \"{forwarding}\"\n{b}"
        )
    };
    c.push_str(&service(
        "dsr",
        VIP_DSR,
        80,
        "dsr",
        backends(&[1, 2], false),
    ));
    c.push_str(&service(
        "tun",
        VIP_TUN,
        80,
        "tunnel",
        backends(&[3, 4], false),
    ));
    c.push_str(&service(
        "tun-up",
        VIP_TUN,
        SINK,
        "tunnel",
        backends(&[3, 4], false),
    ));
    c.push_str(&service(
        "tun6-up",
        VIP6_TUN,
        SINK,
        "tunnel",
        backends(&[3, 4], true),
    ));
    c
}

/// The backend (1-based) `lbctl lookup` names for `src` in `service`.
fn looked_up(t: &Topology, lbd: &Lbd, service: &str, src: IpAddr) -> usize {
    let v = lbd
        .lbctl_json(&["lookup", service, &src.to_string()])
        .expect("lbctl lookup");
    let named: IpAddr = v["backend"]
        .as_str()
        .unwrap_or_else(|| panic!("lookup of {src} names no backend: {v}"))
        .parse()
        .unwrap();
    (1..=t.backends())
        .find(|&i| t.backend_addr(i) == named || t.backend_addr_v6(i) == named)
        .unwrap_or_else(|| panic!("lookup names {named}, not a backend"))
}

/// The path MTU the kernel of namespace `ns` holds for `dst` (from `ip route get`), if any.
fn path_mtu(ns: &str, dst: IpAddr) -> Option<u32> {
    let out = Command::new("ip")
        .args(["-n", ns, "route", "get", &dst.to_string()])
        .output()
        .expect("ip route get");
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "mtu")
        .and_then(|w| w[1].parse().ok())
}

fn dropped(lbd: &Lbd, reason: &str) -> u64 {
    let stats = lbd.lbctl_json(&["stats"]).expect("lbctl stats");
    stats["dropped"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["reason"] == reason))
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or_else(|| panic!("no {reason} in {stats}"))
}

#[test]
fn clients_on_one_interface_reach_backends_behind_another_and_path_mtu_discovery_works() {
    let t = topology();
    assert_eq!(t.lb_interfaces(), ["eth0", "eth1"]);
    let paths = LbdPaths::for_topology(&t);
    let lbd = start_lbd(&t, &config(&t, &paths)).expect("starting lbd");
    let status = lbd.lbctl_json(&["status"]).expect("lbctl status");
    assert_eq!(
        status["interfaces"].as_array().map(Vec::len),
        Some(2),
        "attached to eth0 and eth1: {status}"
    );
    for i in 3..=4 {
        let (lb4, lb6) = t.lb_side_addrs();
        decapsulate_on(&t, i, &[lb4, lb6]);
    }

    // dsr to the backends on eth1's segment, tunnel to those behind the gateway: every client
    // address reaches the backend lbctl names, twice.
    let sources = t.all_client_sources();
    for (service, vip, on) in [
        ("dsr", vip(VIP_DSR, 80), 1..=2),
        ("tun", vip(VIP_TUN, 80), 3..=4),
    ] {
        let mut served = [0usize; 5];
        for &src in &sources {
            let expected = looked_up(&t, &lbd, service, src);
            assert!(
                on.contains(&expected),
                "{service}: lookup names backend {expected}"
            );
            for attempt in 0..2 {
                let got = t.which_backend(src, vip).unwrap_or_else(|e| {
                    panic!(
                        "{service}: GET {attempt} from {src}: {e:#}\nlbd log:\n{}",
                        lbd.log_tail()
                    )
                });
                assert_eq!(got, expected, "{service}: client {src}");
            }
            served[expected] += 1;
        }
        for b in on {
            assert!(
                served[b] > 0,
                "{service}: backend {b} served nobody: {served:?}"
            );
        }
    }

    // Path-MTU discovery through the tunnel: a client's full-size segments no longer fit once
    // encapsulated. The balancer answers "too big" out of eth0, where the client is (not out of
    // eth1, towards the backend), the client lowers its path MTU to the VIP, and a whole upload
    // arrives.
    for i in 3..=4 {
        t.serve_sink(
            t.backend_ns(i),
            SocketAddr::new("::".parse().unwrap(), SINK),
        )
        .expect("a sink on the tunnel backend");
    }
    let too_big = dropped(&lbd, "too_big");
    for (src, vip, mtu) in [
        (t.client_sources(1)[0], vip(VIP_TUN, SINK), 1500 - 20),
        (t.client_sources_v6(2)[0], vip(VIP6_TUN, SINK), 1500 - 40),
    ] {
        let ns = t.client_ns_of(src).unwrap();
        assert_eq!(
            path_mtu(ns, vip.ip()),
            None,
            "no path MTU known yet for {vip}"
        );
        let stream = t
            .connect_tcp(ns, Some(src), vip, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connecting {src} -> {vip}: {e:#}"));
        const LEN: usize = 256 * 1024;
        let received = upload(stream, LEN, Duration::from_secs(10)).unwrap_or_else(|e| {
            panic!(
                "uploading {LEN} bytes from {src} to {vip} (path MTU {:?}): {e:#}\nlbd log:\n{}",
                path_mtu(ns, vip.ip()),
                lbd.log_tail()
            )
        });
        assert_eq!(received, LEN as u64, "{src} -> {vip}: the sink's count");
        assert_eq!(
            path_mtu(ns, vip.ip()),
            Some(mtu),
            "{src} learnt the tunnel's MTU for {vip}"
        );
    }
    assert!(
        dropped(&lbd, "too_big") > too_big,
        "the balancer answered too big"
    );
    assert_eq!(dropped(&lbd, "no_egress"), 0, "every redirect found eth1");
}
