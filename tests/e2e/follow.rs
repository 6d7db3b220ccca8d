//! End to end: lbd follows the system and keeps its maps exact. After every kind of change
//! (lbctl, SIGHUP, health, a backend's MAC) the maps hold exactly what a fresh lbd with the same
//! state fills in; the daemon lock is not held across neighbour resolution. Real lbd, real XDP,
//! real nginx. Needs root.

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use lb_tests::{
    BackendSide, Topology, TopologyOptions,
    lbd::{Lbd, LbdPaths, decapsulate_on, spawn_lbd, spawn_lbd_in, start_lbd},
    netns, require_root, retry_until, wait_until,
};
use lb_userspace::{
    daemon::mac_string,
    datapath::{Fill, read_pinned_frags},
};
use serde_json::Value;

const VIP: &str = "203.0.113.10";
const VIP2: &str = "203.0.113.20";
const SEED_HEX: &str = "5f0c1d2e3f4051627384950a1b2c3d4e";
/// Backend 4, on the backend side (the LB's `eth1`, 203.0.113.129/26).
const SIDE: &str = "203.0.113.130";

fn topology() -> Topology {
    require_root();
    Topology::new(TopologyOptions {
        vips: vec![VIP.parse().unwrap(), VIP2.parse().unwrap()],
        ..Default::default()
    })
    .expect("building the namespace topology")
}

/// `topology()` with a backend side: backend 4 (203.0.113.130) on the LB's second interface,
/// `eth1`, so it is reached through another interface than the one clients arrive on
/// (XDP_REDIRECT through DEVMAP); lbd is attached to both.
fn topology_with_side() -> Topology {
    require_root();
    Topology::new(TopologyOptions {
        vips: vec![VIP.parse().unwrap(), VIP2.parse().unwrap()],
        backend_side: Some(BackendSide {
            direct: 1,
            ..Default::default()
        }),
        ..Default::default()
    })
    .expect("building the namespace topology")
}

fn health() -> &'static str {
    "[service.health]\ncheck = \"http\"\npath = \"/healthz\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 2\n"
}

/// A `[[service]]` table; `backends` are `(address, weight)`.
fn service(name: &str, head: &str, health: &str, backends: &[(&str, u32)]) -> String {
    let mut s = format!("\n[[service]]\nname = \"{name}\"\n{head}\n{health}\n");
    for (a, w) in backends {
        s.push_str(&format!(
            "[[service.backend]]\naddress = \"{a}\"\nweight = {w}\n\n"
        ));
    }
    s
}

fn backends(lbd: &Lbd, service: &str) -> Vec<Value> {
    lbd.lbctl_json(&["backend", "list", service])
        .expect("lbctl backend list")
        .as_array()
        .expect("an array")
        .clone()
}

/// Waits until every backend of `service` is in the state `want` gives for its address.
fn wait_states(lbd: &Lbd, service: &str, want: &[(&str, &str)]) {
    let ok = wait_until(
        Duration::from_secs(10),
        &format!("{service}'s backends to be {want:?}"),
        || {
            let list = backends(lbd, service);
            list.len() == want.len()
                && want
                    .iter()
                    .all(|(a, s)| list.iter().any(|r| r["address"] == *a && r["state"] == *s))
        },
    );
    if let Err(e) = ok {
        panic!(
            "{e:#}: {:?}\nlbd log:\n{}",
            backends(lbd, service),
            lbd.log_tail()
        );
    }
}

/// Waits until web's backends 1 and 4 are up and backend 2 is `b2`.
fn web_states(lbd: &Lbd, b2: &str) {
    wait_states(
        lbd,
        "web",
        &[("192.0.2.11", "up"), ("192.0.2.12", b2), (SIDE, "up")],
    );
}

/// Drives one lbd through changes and, after each, compares its maps with a fresh fill.
struct Run<'t> {
    t: &'t Topology,
    paths: LbdPaths,
    lbd: Lbd<'t>,
    /// Every difference found, by step.
    drift: Vec<String>,
}

impl Run<'_> {
    /// The maps of the running lbd, then those a fresh lbd fills from the same state (the same
    /// file, and the pins it adopts, which keep every id): lbd is stopped and a new one started
    /// on the same pins; it goes on with the next step.
    fn compare(&mut self, step: &str) {
        let running = Fill::read_pinned(&self.paths.bpffs_dir).expect("reading the maps");
        assert!(
            self.lbd.stop().expect("stopping lbd").success(),
            "lbd exit status\n{}",
            self.lbd.log_tail()
        );
        self.lbd = spawn_lbd(self.t, &self.paths).expect("starting lbd");
        self.lbd
            .wait_answering(lb_tests::lbd::LBD_START)
            .expect("a fresh lbd");
        let fresh = Fill::read_pinned(&self.paths.bpffs_dir).expect("reading the maps");
        let diff = running.diff(&fresh);
        eprintln!(
            "after {step}: {} difference(s) from a fresh fill",
            diff.len()
        );
        if !diff.is_empty() {
            self.drift.push(format!(
                "after {step} (running / fresh):\n    {}",
                diff.join("\n    ")
            ));
        }
    }

    fn lbctl(&self, args: &[&str]) -> String {
        self.lbd.lbctl_ok(args)
    }

    /// Writes `config` and sends SIGHUP; fails unless lbd reports it applied it.
    fn reload(&self, config: &str) {
        std::fs::write(&self.paths.config, config).unwrap();
        let log = self.lbd.reload(Duration::from_secs(15)).unwrap();
        assert!(log.contains("reloaded"), "SIGHUP: {log}");
    }
}

/// Sends one `len`-byte UDP datagram from client 1 to `to` (fragmented by the client's kernel
/// when longer than the MTU) and returns whether `receiver` got it whole within 3 s.
fn datagram_arrives(t: &Topology, receiver: &UdpSocket, to: SocketAddr, len: usize) -> bool {
    let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    netns::in_netns(t.client_ns(1), || {
        let s = UdpSocket::bind("192.0.2.101:0")?;
        s.send_to(&payload, to)?;
        Ok(())
    })
    .expect("sending the datagram");
    receiver
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut buf = vec![0u8; 65536];
    loop {
        match receiver.recv_from(&mut buf) {
            Ok((n, _)) if buf[..n] == payload[..] => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

/// Every kind of change leaves every map exactly as a fresh lbd with the same state fills it
/// (issue 10, item 9): lbctl (services and backends added and removed, drain, weight), health
/// transitions, SIGHUP (new services, a table size, a hash mode, a key moved), a backend whose
/// MAC changes. The three drifts the review found are checked by traffic too: the later
/// fragments of a datagram to a service added at run time, a backend behind another interface
/// than the receiving one added at run time, and fragments of a removed service whose id is
/// reused by a new one.
#[test]
fn maps_match_a_fresh_fill_after_every_change() {
    let t = topology_with_side();
    let paths = LbdPaths::for_topology(&t);
    let daemon = paths.daemon_section(&format!("hash_seed = \"{SEED_HEX}\"\n"));
    let web_head = format!("vip = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"");
    let lbd = start_lbd(
        &t,
        &(daemon.clone()
            + &service(
                "web",
                &web_head,
                health(),
                &[("192.0.2.11", 100), ("192.0.2.12", 100)],
            )),
    )
    .expect("starting lbd");
    let mut run = Run {
        t: &t,
        paths: paths.clone(),
        lbd,
        drift: vec![],
    };
    wait_states(
        &run.lbd,
        "web",
        &[("192.0.2.11", "up"), ("192.0.2.12", "up")],
    );
    run.compare("start");

    // A UDP service added at run time: its later fragments must follow the first.
    run.lbctl(&[
        "service",
        "add",
        "dns",
        "--vip",
        VIP,
        "--port",
        "53",
        "--protocol",
        "udp",
    ]);
    run.lbctl(&["backend", "add", "dns", "192.0.2.11"]);
    let dns: SocketAddr = format!("{VIP}:53").parse().unwrap();
    let receiver = netns::in_netns(t.backend_ns(1), || Ok(UdpSocket::bind(dns)?)).unwrap();
    let whole = datagram_arrives(&t, &receiver, dns, 3000);
    run.compare("lbctl service add dns, backend add");

    // A backend behind the LB's second interface, added at run time.
    run.lbctl(&["backend", "add", "web", SIDE]);
    web_states(&run.lbd, "up");
    let far_client = t
        .all_client_sources()
        .into_iter()
        .find(|s| {
            run.lbd
                .lbctl_json(&["lookup", "web", &s.to_string()])
                .unwrap()["backend"]
                == SIDE
        })
        .expect("some client is sent to the far backend");
    let vip80: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let far = t.which_backend(far_client, vip80);
    run.compare("lbctl backend add (behind eth1)");

    run.lbctl(&["backend", "drain", "web", "192.0.2.12"]);
    run.compare("lbctl backend drain");
    run.lbctl(&["backend", "weight", "web", "192.0.2.11", "50"]);
    run.compare("lbctl backend weight");
    run.lbctl(&["backend", "undrain", "web", "192.0.2.12"]);
    web_states(&run.lbd, "up");
    run.compare("lbctl backend undrain");

    t.stop_backend_server(2).unwrap();
    web_states(&run.lbd, "down");
    run.compare("health: a backend down");
    t.start_backend_server(2).unwrap();
    web_states(&run.lbd, "up");
    run.compare("health: back up");

    // Fragments recorded for dns; dns removed, and a new service takes its id.
    datagram_arrives(&t, &receiver, dns, 3000);
    let before = Fill::read_pinned(&paths.bpffs_dir).unwrap();
    let dns_key = before
        .services
        .iter()
        .find(|(k, _)| k.port == 53u16.to_be())
        .map(|(_, v)| *v)
        .expect("dns in SERVICES");
    let recorded: Vec<_> = read_pinned_frags(&paths.bpffs_dir)
        .unwrap()
        .into_iter()
        .filter(|(_, v)| v.service.id == dns_key.id)
        .collect();
    assert!(
        !recorded.is_empty(),
        "a first fragment to dns leaves a FRAGS entry"
    );
    run.lbctl(&["service", "remove", "dns"]);
    run.lbctl(&[
        "service",
        "add",
        "dns2",
        "--vip",
        VIP,
        "--port",
        "5353",
        "--protocol",
        "udp",
    ]);
    run.lbctl(&["backend", "add", "dns2", "192.0.2.11"]);
    let after = Fill::read_pinned(&paths.bpffs_dir).unwrap();
    let dns2 = after
        .services
        .iter()
        .find(|(k, _)| k.port == 5353u16.to_be())
        .map(|(_, v)| *v)
        .expect("dns2 in SERVICES");
    assert_eq!(
        dns2.id, dns_key.id,
        "dns2 reuses dns's id (else this proves nothing)"
    );
    let left: Vec<_> = read_pinned_frags(&paths.bpffs_dir)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| recorded.iter().any(|(r, _)| r == k))
        .collect();
    run.compare("lbctl service remove dns, service add dns2 (same id)");

    // SIGHUP: a tunnel service on another VIP (one backend behind eth1), web's table size, dns2
    // hashing the 5-tuple.
    let web_and_dns2 = |dns_port: u16| {
        daemon.clone()
            + &service(
                "web",
                &(web_head.clone() + "\ntable_size = 4099"),
                health(),
                &[("192.0.2.11", 50), ("192.0.2.12", 100), (SIDE, 100)],
            )
            + &service(
                "dns2",
                &format!(
                    "vip = \"{VIP}\"\nport = {dns_port}\nprotocol = \"udp\"\nhash = \"5-tuple\""
                ),
                "",
                &[("192.0.2.11", 100)],
            )
    };
    let reloaded = web_and_dns2(5353)
        + &service(
            "tun",
            &format!("vip = \"{VIP2}\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"tunnel\""),
            "",
            &[("192.0.2.12", 100), (SIDE, 100)],
        );
    run.reload(&reloaded);
    run.compare("SIGHUP: tunnel service, table size, 5-tuple");

    // Backend 1 gets a new MAC; the balancer's neighbour entry goes.
    let new_mac = "02:00:00:00:0b:99";
    t.set_backend_mac(1, new_mac).unwrap();
    t.exec_ok(t.lb_ns(), &["ip", "neigh", "flush", "to", "192.0.2.11"])
        .unwrap();
    run.lbd
        .wait_backend_mac("web", "192.0.2.11", new_mac, Duration::from_secs(20))
        .unwrap();
    run.compare("a backend's MAC changes");

    // SIGHUP: dns2 moves to another port (same id, new key), tun goes.
    let moved = web_and_dns2(5354);
    run.reload(&moved);
    run.compare("SIGHUP: a key moves, a service goes");

    run.lbctl(&["backend", "remove", "web", "192.0.2.12"]);
    run.lbctl(&["backend", "add", "web", "192.0.2.12"]);
    web_states(&run.lbd, "up");
    run.compare("lbctl backend remove, add again");

    let mut problems = run.drift.clone();
    if !whole {
        problems.push(
            "a 3,000-byte datagram to the service added at run time did not arrive whole".into(),
        );
    }
    match far {
        Ok(4) => {}
        other => problems.push(format!(
            "the client of the backend behind eth1 was not served by it: {other:?}"
        )),
    }
    if !left.is_empty() {
        problems.push(format!(
            "FRAGS entries of removed service dns survive its id's reuse by dns2: {left:?}"
        ));
    }
    assert_no_problems(&problems, &run.lbd);
}

/// `lbctl backend add` of an address nobody answers waits for neighbour resolution (3 s), but
/// not while holding lbd's lock (issue 10, item 14): `lbctl status`, a metrics scrape and a
/// health transition all answer while the add is still pending, which each answer shows by
/// itself: the new backend is not in it yet.
#[test]
fn a_silent_backend_add_does_not_stall_status_metrics_or_health() {
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    let config = paths.daemon_section(&format!(
        "hash_seed = \"{SEED_HEX}\"\nmetrics = \"192.0.2.2:9917\"\n"
    )) + &service(
        "web",
        &format!("vip = \"{VIP}\"\nport = 80\nprotocol = \"tcp\""),
        health(),
        &[("192.0.2.11", 100), ("192.0.2.12", 100)],
    );
    let lbd = start_lbd(&t, &config).expect("starting lbd");
    wait_states(&lbd, "web", &[("192.0.2.11", "up"), ("192.0.2.12", "up")]);
    let endpoint = SocketAddr::new(t.lb_addr(), 9917);
    const SILENT: &str = "192.0.2.99";
    let listed = |list: &[Value]| list.iter().any(|r| r["address"] == SILENT);

    // Backend 2 fails its checks from now on: lbd sees it down about 0.4 s later.
    t.stop_backend_server(2).unwrap();
    let started = Instant::now();
    std::thread::scope(|s| {
        // On-link, and nobody holds it: resolution gives up after 3 s.
        let add = s.spawn(|| {
            let out = lbd.lbctl(&["backend", "add", "web", SILENT]).unwrap();
            (started.elapsed(), out)
        });
        // Late enough that the add is under way (lbctl connects in milliseconds).
        std::thread::sleep(Duration::from_millis(300));
        let status = lbd.lbctl_json(&["status"]).unwrap();
        let status_at = started.elapsed();
        let scrape = t
            .http_get(t.client_ns(1), t.client_addr(1), endpoint, "/metrics")
            .unwrap();
        let scrape_at = started.elapsed();
        let mut down_list = vec![];
        let down = wait_until(Duration::from_secs(10), "backend 2 to be down", || {
            let list = backends(&lbd, "web");
            let down = list
                .iter()
                .any(|r| r["address"] == "192.0.2.12" && r["state"] == "down");
            if down {
                down_list = list;
            }
            down
        });
        let down_at = started.elapsed();
        let (add_at, out) = add.join().unwrap();
        eprintln!(
            "add returned at {add_at:?}; status at {status_at:?}, metrics at {scrape_at:?}, \
             backend 2 shown down at {down_at:?}"
        );
        assert!(
            out.status.success(),
            "lbctl backend add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(status["pid"].is_u64(), "{status}");
        assert_eq!(scrape.status, 200);
        down.unwrap_or_else(|e| panic!("{e:#}\n{}", lbd.log_tail()));
        let mut late = vec![];
        // Two backends before the add, three after.
        if status["backends"] != 2 {
            late.push(format!(
                "lbctl status answered at {status_at:?}, once the add was done"
            ));
        }
        if scrape.text().contains(SILENT) {
            late.push(format!(
                "a metrics scrape answered at {scrape_at:?}, once the add was done"
            ));
        }
        if listed(&down_list) {
            late.push(format!(
                "backend 2's health transition was shown at {down_at:?}, once the add was done"
            ));
        }
        assert!(
            late.is_empty(),
            "held up by the silent backend's resolution (the add returned at {add_at:?}):\n{}\nlbd log:\n{}",
            late.join("\n"),
            lbd.log_tail()
        );
    });
    let list = backends(&lbd, "web");
    let silent = list
        .iter()
        .find(|r| r["address"] == SILENT)
        .expect("the silent backend is listed once the add returned");
    assert_eq!(silent["state"], "down", "{silent}");
}

/// A plain config: "web" on VIP:80 over backends 1..=3, no health checks (nothing but the
/// interface changes under test).
fn plain_config(paths: &LbdPaths) -> String {
    paths.daemon_section(&format!("hash_seed = \"{SEED_HEX}\"\n"))
        + &service(
            "web",
            &format!("vip = \"{VIP}\"\nport = 80\nprotocol = \"tcp\""),
            "",
            &[
                ("192.0.2.11", 100),
                ("192.0.2.12", 100),
                ("192.0.2.13", 100),
            ],
        )
}

/// lbd on `plain_config`, and a client address with the backend that serves it.
fn start_plain(t: &Topology) -> (LbdPaths, Lbd<'_>, std::net::IpAddr, usize) {
    let paths = LbdPaths::for_topology(t);
    let lbd = start_lbd(t, &plain_config(&paths)).expect("starting lbd");
    let src = t.client_sources(1)[0];
    let backend = served(t, src).expect("served before");
    (paths, lbd, src, backend)
}

/// `lbctl status`'s entry for eth0.
fn eth0_status(lbd: &Lbd) -> Value {
    lbd.lbctl_json(&["status"]).expect("lbctl status")["interfaces"][0].clone()
}

/// Which backend serves `src` through the VIP, tried for up to 10 s (the interface may be
/// coming back).
fn served(t: &Topology, src: std::net::IpAddr) -> anyhow::Result<usize> {
    let vip80: SocketAddr = format!("{VIP}:80").parse().unwrap();
    retry_until(Duration::from_secs(10), "a request through the VIP", || {
        t.which_backend(src, vip80)
    })
}

/// Notes a problem unless `src` is served by backend `backend` (within 10 s).
fn check_served(
    t: &Topology,
    src: std::net::IpAddr,
    backend: usize,
    when: &str,
    problems: &mut Vec<String>,
) {
    match served(t, src) {
        Ok(b) if b == backend => {}
        other => problems.push(format!(
            "{when}: {src} was not served by backend {backend}: {other:?}"
        )),
    }
}

/// Notes a problem unless `lbctl status` shows eth0 `want` within 5 s.
fn check_eth0_state(lbd: &Lbd, want: &str, when: &str, problems: &mut Vec<String>) {
    if let Err(e) = wait_until(
        Duration::from_secs(5),
        &format!("eth0 shown {want}"),
        || eth0_status(lbd)["state"] == want,
    ) {
        problems.push(format!("{when}: {e}: {}", eth0_status(lbd)));
    }
}

/// Fails with every problem noted, and the end of lbd's log.
fn assert_no_problems(problems: &[String], lbd: &Lbd) {
    assert!(
        problems.is_empty(),
        "{}\nlbd log:\n{}",
        problems.join("\n"),
        lbd.log_tail()
    );
}

/// The interface lbd is attached to is deleted and recreated while lbd runs (a driver reload,
/// a recreated veth): `lbctl status` shows it `missing`, then lbd attaches the program to the
/// new interface, shows it `attached`, and traffic flows again (issue 10, item 6). Renamed
/// away it is `missing` too, and `attached` again once renamed back.
#[test]
fn an_interface_deleted_and_recreated_while_lbd_runs_is_attached_again() {
    let t = topology();
    let (_paths, lbd, src, backend) = start_plain(&t);
    let mut problems = vec![];
    check_eth0_state(&lbd, "attached", "before", &mut problems);

    t.exec_ok(t.lb_ns(), &["ip", "link", "del", "eth0"])
        .unwrap();
    check_eth0_state(&lbd, "missing", "deleted", &mut problems);
    let _switch_port = t.recreate_lb_eth0().expect("recreating eth0");
    check_eth0_state(&lbd, "attached", "recreated", &mut problems);
    check_served(&t, src, backend, "after eth0 came back", &mut problems);

    // Renamed away (the link stays on the device) and back.
    let ip = |cmd: &str| {
        t.exec_ok(
            t.lb_ns(),
            &format!("ip link set {cmd}").split(' ').collect::<Vec<_>>(),
        )
        .unwrap()
    };
    for cmd in ["eth0 down", "eth0 name eth0-old", "eth0-old up"] {
        ip(cmd);
    }
    check_eth0_state(&lbd, "missing", "renamed", &mut problems);
    for cmd in ["eth0-old down", "eth0-old name eth0", "eth0 up"] {
        ip(cmd);
    }
    check_eth0_state(&lbd, "attached", "renamed back", &mut problems);
    check_served(
        &t,
        src,
        backend,
        "after eth0 was renamed back",
        &mut problems,
    );
    assert_no_problems(&problems, &lbd);
}

/// The interface is deleted and recreated while lbd is stopped: the pinned link is detached
/// (its interface is gone), so the next lbd attaches anew instead of saying "adopted".
#[test]
fn a_link_left_detached_while_lbd_was_stopped_is_replaced() {
    let t = topology();
    let (paths, first, src, backend) = start_plain(&t);
    assert!(first.stop().unwrap().success());

    t.exec_ok(t.lb_ns(), &["ip", "link", "del", "eth0"])
        .unwrap();
    let _switch_port = t.recreate_lb_eth0().expect("recreating eth0");
    let second = spawn_lbd(&t, &paths).unwrap();
    let status = second.wait_answering(lb_tests::lbd::LBD_START).unwrap();
    let mut problems = vec![];
    if status["start"] == "adopted" {
        problems.push(format!("lbd says it adopted a detached link: {status}"));
    }
    if status["interfaces"][0]["state"] != "attached" {
        problems.push(format!("eth0 is not shown attached: {status}"));
    }
    check_served(&t, src, backend, "after the restart", &mut problems);
    assert_no_problems(&problems, &second);
}

/// An lbd in another network namespace given the same `bpffs_dir` finds pins whose link is
/// attached there, not here: it refuses them with a clear error and touches nothing.
#[test]
fn another_namespaces_pins_are_refused() {
    let t = topology();
    let (paths, first, src, backend) = start_plain(&t);
    // Stopped: its program keeps running in the LB's namespace, its pins stay.
    assert!(first.stop().unwrap().success());

    // Backend 3's namespace also has an eth0 (with the same ifindex, very likely).
    let work = paths.config.parent().unwrap().to_path_buf();
    let other = LbdPaths {
        config: work.join("other.toml"),
        socket: work.join("other/lbd.sock"),
        bpffs_dir: paths.bpffs_dir.clone(),
        state_dir: work.join("other-state"),
        interfaces: paths.interfaces.clone(),
    };
    std::fs::write(&other.config, plain_config(&other)).unwrap();
    let intruder = spawn_lbd_in(&t, t.backend_ns(3), &other).unwrap();
    let exit = t.wait_exit(intruder.handle, Duration::from_secs(10));
    let log = intruder.log();
    let mut problems = vec![];
    match exit {
        Ok(st) if st.code() == Some(1) => {}
        other => problems.push(format!(
            "an lbd in another namespace on the same pins: {other:?}, expected exit 1"
        )),
    }
    if !log.contains("another network namespace") {
        problems.push("its error does not name another network namespace".into());
    }
    check_served(
        &t,
        src,
        backend,
        "the first namespace's data path",
        &mut problems,
    );
    assert!(
        problems.is_empty(),
        "{}\nits log:\n{log}",
        problems.join("\n")
    );
}

/// The MAC of `dev` in namespace `ns`, as `ip -j link` reports it.
fn mac_of(t: &Topology, ns: &str, dev: &str) -> String {
    let out = t
        .exec_ok(ns, &["ip", "-j", "link", "show", "dev", dev])
        .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    v[0]["address"].as_str().unwrap().to_string()
}

/// Polls `f` every few milliseconds until it is true, for at most `deadline`: how long it took,
/// or None.
fn time_until(deadline: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// The pinned `BACKENDS` entry of the backend at `addr` (IPv4).
fn backend_entry(paths: &LbdPaths, addr: std::net::Ipv4Addr) -> Option<lb_common::Backend> {
    let want = u32::from_ne_bytes(addr.octets());
    Fill::read_pinned(&paths.bpffs_dir)
        .ok()?
        .backends
        .into_values()
        .find(|b| b.addr[0] == want)
}

/// Reaction time the issue asks for (item 12): lbd follows a route or MTU change within this.
const FOLLOW_WITHIN: Duration = Duration::from_secs(2);

/// A tunnel backend behind two gateway routers (issue 10, item 12). Under traffic, its route
/// moves from gateway 1 to gateway 2: lbd follows within 2 s, and once gateway 1 stops
/// forwarding to it every request still succeeds. Then the egress interface's MTU (the
/// too-big threshold) and MAC change: both are followed within 2 s.
#[test]
fn a_tunnel_backends_new_gateway_and_egress_mtu_are_followed() {
    require_root();
    let t = Topology::new(TopologyOptions {
        backends: 1,
        clients: 1,
        addresses_per_client: 4,
        vips: vec![VIP2.parse().unwrap()],
        backend_side: Some(BackendSide {
            direct: 0,
            gateways: 2,
            behind: 1,
        }),
        ..Default::default()
    })
    .expect("building the namespace topology");
    let far = 2;
    let far_addr = match t.backend_addr(far) {
        std::net::IpAddr::V4(a) => a,
        other => panic!("{other}"),
    };
    // The far backend strips the tunnel with lb's own decapsulation program, from the LB's
    // backend-side addresses (the tunnel leaves by eth1).
    let (lb4, lb6) = t.lb_side_addrs();
    decapsulate_on(&t, far, &[lb4, lb6]);

    let paths = LbdPaths::for_topology(&t);
    let config = paths.daemon_section(&format!("hash_seed = \"{SEED_HEX}\"\n"))
        + &service(
            "tun",
            &format!("vip = \"{VIP2}\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"tunnel\""),
            "",
            &[(&far_addr.to_string(), 100)],
        );
    let lbd = start_lbd(&t, &config).expect("starting lbd");
    let gw_mac = |g: usize| mac_of(&t, t.gateway_ns(g), "eth0");
    let shown_mac = || {
        backends(&lbd, "tun")[0]["mac"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(shown_mac(), gw_mac(1), "reached through gateway 1 first");
    let vip80: SocketAddr = format!("{VIP2}:80").parse().unwrap();
    let src = t.client_sources(1)[0];
    assert_eq!(t.which_backend(src, vip80).unwrap(), far);

    let stop = std::sync::atomic::AtomicBool::new(false);
    let blackholed = std::sync::atomic::AtomicBool::new(false);
    let mut problems = vec![];
    std::thread::scope(|s| {
        // Requests one after the other until stopped: (ok, failed) before and after gateway 1
        // stopped forwarding to the backend.
        let load = s.spawn(|| {
            let mut counts = [[0usize; 2]; 2];
            let mut errors = vec![];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let after = blackholed.load(std::sync::atomic::Ordering::Relaxed) as usize;
                match t.which_backend(src, vip80) {
                    Ok(b) if b == far => counts[after][0] += 1,
                    other => {
                        counts[after][1] += 1;
                        errors.push(format!("{other:?}"));
                    }
                }
            }
            (counts, errors)
        });
        std::thread::sleep(Duration::from_millis(300));
        t.route_backend_via(far, 2).unwrap();
        let followed = time_until(Duration::from_secs(10), || {
            shown_mac() == gw_mac(2)
                && backend_entry(&paths, far_addr).is_some_and(|b| mac_string(&b.mac) == gw_mac(2))
        });
        eprintln!("the route via gateway 2 was followed after {followed:?}");
        match followed {
            Some(d) if d <= FOLLOW_WITHIN => {}
            other => problems.push(format!(
                "the route moved to gateway 2 was not followed within {FOLLOW_WITHIN:?}: {other:?} (shown {})",
                shown_mac()
            )),
        }
        // Gateway 1 no longer forwards to the backend (its replies still go that way).
        t.exec_ok(
            t.gateway_ns(1),
            &["ip", "route", "add", "blackhole", &format!("{far_addr}/32")],
        )
        .unwrap();
        blackholed.store(true, std::sync::atomic::Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (counts, errors) = load.join().unwrap();
        eprintln!(
            "requests (ok, failed): before {:?}, after {:?}",
            counts[0], counts[1]
        );
        if counts[0][1] + counts[1][1] > 0 || counts[1][0] < 5 {
            problems.push(format!(
                "requests (ok, failed) while the route moved {:?}, once gateway 1 stopped forwarding {:?}: {:?}",
                counts[0],
                counts[1],
                &errors[..errors.len().min(3)]
            ));
        }
    });

    // The egress MTU: the too-big threshold of encapsulated packets.
    t.exec_ok(t.lb_ns(), &["ip", "link", "set", "eth1", "mtu", "1400"])
        .unwrap();
    let mtu = time_until(Duration::from_secs(10), || {
        backend_entry(&paths, far_addr).is_some_and(|b| b.mtu == 1400)
    });
    eprintln!("the MTU was followed after {mtu:?}");
    if mtu.is_none_or(|d| d > FOLLOW_WITHIN) {
        problems.push(format!(
            "eth1's MTU 1400 was not followed within {FOLLOW_WITHIN:?}: {mtu:?} ({:?})",
            backend_entry(&paths, far_addr).map(|b| b.mtu)
        ));
    }
    // The egress interface's own MAC: the source MAC of encapsulated frames.
    let new_mac = "02:00:00:00:0a:77";
    t.exec_ok(
        t.lb_ns(),
        &["ip", "link", "set", "eth1", "address", new_mac],
    )
    .unwrap();
    let own = time_until(Duration::from_secs(10), || {
        backend_entry(&paths, far_addr).is_some_and(|b| mac_string(&b.src_mac) == new_mac)
    });
    eprintln!("the egress MAC was followed after {own:?}");
    if own.is_none_or(|d| d > FOLLOW_WITHIN) {
        problems.push(format!(
            "eth1's new MAC was not followed within {FOLLOW_WITHIN:?}: {own:?}"
        ));
    }
    assert_no_problems(&problems, &lbd);
}

/// A backend without health checks whose MAC changes, the balancer's neighbour entry left as
/// it is: XDP traffic never confirms the entry, so it would keep the old MAC for ever; lbd
/// re-confirms the neighbours the data path uses once they go stale, and follows (item 12).
/// The LB's neighbour entries go stale 2–6 s after their last confirmation here
/// (`base_reachable_time_ms = 4000`, `delay_first_probe_time = 1`) rather than 15–45 s, to
/// keep the test short.
#[test]
fn a_stale_neighbour_is_reconfirmed_and_a_new_mac_followed() {
    let t = topology();
    netns::set_sysctls(
        t.lb_ns(),
        &[
            (
                "net.ipv4.neigh.eth0.base_reachable_time_ms".to_string(),
                "4000".to_string(),
            ),
            (
                "net.ipv4.neigh.eth0.delay_first_probe_time".to_string(),
                "1".to_string(),
            ),
        ],
        false,
    )
    .unwrap();
    let paths = LbdPaths::for_topology(&t);
    let lbd = start_lbd(&t, &plain_config(&paths)).expect("starting lbd");
    let src = t
        .all_client_sources()
        .into_iter()
        .find(|s| {
            lbd.lbctl_json(&["lookup", "web", &s.to_string()]).unwrap()["backend"] == "192.0.2.11"
        })
        .expect("a client of backend 1");
    assert_eq!(served(&t, src).unwrap(), 1);
    // The kernel probes an entry by itself only when it was used within delay_first_probe_time
    // (1 s here) of its expiry: once the entry was last used (resolved or confirmed) 2 s ago
    // and is not being probed, it goes STALE at its expiry and stays so, whatever MAC the
    // backend has by then, unless someone re-confirms it.
    let idle = || -> bool {
        let out = t
            .exec_ok(
                t.lb_ns(),
                &[
                    "ip",
                    "-s",
                    "-j",
                    "neigh",
                    "show",
                    "192.0.2.11",
                    "dev",
                    "eth0",
                ],
            )
            .unwrap();
        let v: Value = serde_json::from_str(&out).unwrap_or_default();
        let state = v[0]["state"][0].as_str().unwrap_or_default().to_string();
        v[0]["used"].as_u64().unwrap_or(0) >= 2 && (state == "REACHABLE" || state == "STALE")
    };
    wait_until(
        Duration::from_secs(20),
        "the entry of backend 1 to be idle",
        idle,
    )
    .unwrap();

    let new_mac = "02:00:00:00:0b:98";
    t.set_backend_mac(1, new_mac).unwrap();
    let changed = Instant::now();
    let followed = lbd.wait_backend_mac("web", "192.0.2.11", new_mac, Duration::from_secs(30));
    eprintln!("the new MAC was followed after {:?}", changed.elapsed());
    let neigh = t
        .exec_ok(t.lb_ns(), &["ip", "neigh", "show", "192.0.2.11"])
        .unwrap();
    assert!(
        followed.is_ok(),
        "backend 1's new MAC was not followed within 30 s ({followed:?}; neighbour entry: {neigh})\nlbd log:\n{}",
        lbd.log_tail()
    );
    assert_eq!(
        served(&t, src).unwrap(),
        1,
        "served by backend 1 at its new MAC"
    );
}
