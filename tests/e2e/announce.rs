//! End to end, several nodes' part of one node (issue 13): the VIP host routes lbd keeps in its
//! routing table for a routing daemon (`[daemon.announce]`), `lbctl node drain|undrain|check`,
//! the routes through a SIGKILL and a restart (sampled without a gap), `lbd --cleanup`, and the
//! Maglev table fingerprints in `lbctl status` and the metrics. Real lbd, real XDP, real nginx
//! backends, IPv4 and IPv6. Needs root.
//!
//! Routes are read as an operator would, with `ip -j -d route show table 100 proto 200` in the
//! load balancer's namespace.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_common::maglev::{MaglevBackend, table_fingerprint};
use lb_tests::{
    Topology, TopologyOptions,
    http::metric,
    lbd::{Lbd, LbdPaths, cleanup_lbd, spawn_lbd, start_lbd},
    require_root, wait_until,
};
use lb_userspace::state::to_addr;
use serde_json::Value;

const VIP4: &str = "203.0.113.10";
const VIP6: &str = "2001:db8::10";
/// A service whose only backend is drained: never serving.
const VIP_IDLE: &str = "203.0.113.20";
/// Services added at run time (lbctl, SIGHUP).
const VIP_ADDED: &str = "203.0.113.30";
/// A route of lbd's protocol in its table that no VIP of the config explains.
const STRAY: &str = "203.0.113.99";
/// A route of another protocol in lbd's table: never lbd's to touch.
const FOREIGN: &str = "198.51.100.77";
const SEED_HEX: &str = "5f0c1d2e3f4051627384950a1b2c3d4e";
const TABLE: &str = "100";
const PROTO: &str = "200";

const INTERVAL_MS: u64 = 200;
const FALL: u64 = 3;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn topology() -> Topology {
    require_root();
    Topology::new(TopologyOptions {
        vips: vec![ip(VIP4), ip(VIP6)],
        ..Default::default()
    })
    .expect("building the namespace topology")
}

fn health() -> String {
    format!(
        "[service.health]\ncheck = \"http\"\npath = \"/healthz\"\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = 100\nrise = 2\nfall = {FALL}\n\n"
    )
}

/// `[[service]]` NAME on VIP:80/tcp with `health` (or none) and backends `(address, weight)`.
fn service(name: &str, vip: &str, health: Option<&str>, backends: &[(IpAddr, u32)]) -> String {
    let mut c = format!(
        "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\n\n"
    );
    if let Some(h) = health {
        c.push_str(h);
    }
    for (a, w) in backends {
        c.push_str(&format!(
            "[[service.backend]]\naddress = \"{a}\"\nweight = {w}\n\n"
        ));
    }
    c
}

/// The `[daemon]` section (node "lb-a", the fixed seed, `extra`), with `[daemon.announce]` on
/// table 100, protocol 200 when `announce`.
fn daemon(paths: &LbdPaths, announce: bool, extra: &str) -> String {
    let mut c = paths.daemon_section(&format!(
        "hash_seed = \"{SEED_HEX}\"\nnode_name = \"lb-a\"\n{extra}"
    ));
    if announce {
        c.push_str(&format!(
            "[daemon.announce]\ntable = {TABLE}\nprotocol = {PROTO}\n"
        ));
    }
    c
}

/// Backends 1..=3 of `family` ("4" or "6") with `weight`.
fn three(t: &Topology, family: &str, weight: u32) -> Vec<(IpAddr, u32)> {
    (1..=3)
        .map(|i| match family {
            "4" => (t.backend_addr(i), weight),
            _ => (t.backend_addr_v6(i), weight),
        })
        .collect()
}

/// The destinations of table 100's routes with protocol 200 in the LB namespace; panics on
/// one that is not a unicast host route on `lo`.
fn routes(t: &Topology) -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    for family in ["-4", "-6"] {
        let o = Command::new("ip")
            .args(["-n", t.lb_ns(), family, "-j", "-d", "route", "show"])
            .args(["table", TABLE, "proto", PROTO])
            .output()
            .expect("running ip route show");
        // A table nothing was ever added to does not exist (IPv4 says so).
        if String::from_utf8_lossy(&o.stderr).contains("FIB table does not exist") {
            continue;
        }
        assert!(
            o.status.success(),
            "ip route show: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let text = String::from_utf8_lossy(&o.stdout);
        if text.trim().is_empty() {
            continue;
        }
        let list: Value = serde_json::from_str(&text).expect("ip -j output");
        for r in list.as_array().expect("a list of routes") {
            assert_eq!(r["dev"], "lo", "not a route on lo: {r}");
            assert_eq!(r["type"], "unicast", "not a unicast route: {r}");
            assert!(r["gateway"].is_null(), "a route with a gateway: {r}");
            let dst = r["dst"].as_str().expect("dst");
            assert!(!dst.contains('/'), "not a host route: {r}");
            out.insert(ip(dst));
        }
    }
    out
}

fn set(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|s| ip(s)).collect()
}

/// Waits up to `deadline` until the routes are `want`; returns how long it took.
fn wait_routes(t: &Topology, lbd: &Lbd, want: &BTreeSet<IpAddr>, deadline: Duration) -> Duration {
    let start = Instant::now();
    let mut last = BTreeSet::new();
    wait_until(deadline, &format!("the VIP routes to be {want:?}"), || {
        last = routes(t);
        last == *want
    })
    .unwrap_or_else(|e| panic!("{e:#}; they are {last:?}\nlbd log:\n{}", lbd.log_tail()));
    start.elapsed()
}

/// `lbctl node check`: its exit code.
fn node_check(lbd: &Lbd) -> i32 {
    let out = lbd.lbctl(&["node", "check"]).expect("running lbctl");
    out.status.code().expect("an exit code")
}

fn status(lbd: &Lbd) -> Value {
    lbd.lbctl_json(&["status"])
        .unwrap_or_else(|e| panic!("{e:#}\nlbd log:\n{}", lbd.log_tail()))
}

/// `status[key]` as a set of addresses.
fn addresses(v: &Value) -> BTreeSet<IpAddr> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|a| ip(a.as_str().expect("an address string")))
        .collect()
}

/// Adds a route with `ip route add ARGS` in the LB namespace.
fn ip_route_add(t: &Topology, args: &[&str]) {
    let o = Command::new("ip")
        .args(["-n", t.lb_ns(), "route", "add"])
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

// ---- 1 ----------------------------------------------------------------------------------------

/// Routes for the serving VIPs only (IPv4 and IPv6; a stray route of lbd's protocol removed at
/// start, another protocol's left alone), withdrawn within 3 s when every backend of a VIP
/// fails its health check and back when they recover; a service added and drained with
/// lbctl, and one added and removed by SIGHUP, each followed within 1 s.
#[test]
fn routes_follow_the_serving_vips() {
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    ip_route_add(&t, &[STRAY, "dev", "lo", "table", TABLE, "proto", PROTO]);
    ip_route_add(&t, &[FOREIGN, "dev", "lo", "table", TABLE, "proto", "201"]);
    let h = health();
    let mut config = daemon(&paths, true, "");
    config.push_str(&service("web", VIP4, Some(&h), &three(&t, "4", 100)));
    config.push_str(&service("web6", VIP6, Some(&h), &three(&t, "6", 100)));
    config.push_str(&service("idle", VIP_IDLE, None, &[(t.backend_addr(1), 0)]));
    let lbd = start_lbd(&t, &config).expect("starting lbd");

    let both = set(&[VIP4, VIP6]);
    wait_routes(&t, &lbd, &both, Duration::from_secs(2));
    let foreign = Command::new("ip")
        .args([
            "-n",
            t.lb_ns(),
            "route",
            "show",
            "table",
            TABLE,
            "proto",
            "201",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&foreign.stdout).contains(FOREIGN),
        "another protocol's route in the table was touched"
    );
    let s = status(&lbd);
    assert_eq!(s["node_name"], "lb-a", "{s}");
    assert_eq!(s["drained"], false, "{s}");
    assert_eq!(addresses(&s["announced"]), both, "{s}");
    assert_eq!(addresses(&s["serving"]), both, "{s}");
    assert_eq!(s["announce"]["table"], 100, "{s}");
    let services = s["services"].as_array().expect("services is a list");
    assert_eq!(services.len(), 3, "{s}");
    for svc in services {
        let fp = svc["fingerprint"].as_str().unwrap_or_default();
        assert!(
            fp.len() == 16 && fp.bytes().all(|b| b.is_ascii_hexdigit()),
            "{svc}"
        );
    }
    assert_eq!(node_check(&lbd), 0);

    // Every backend's server stops: both VIPs stop serving (health fall counts).
    for i in 1..=3 {
        t.stop_backend_server(i).unwrap();
    }
    let took = wait_routes(&t, &lbd, &BTreeSet::new(), Duration::from_secs(10));
    eprintln!(
        "routes withdrawn {} ms after the servers stopped (interval {INTERVAL_MS} ms, fall {FALL})",
        took.as_millis()
    );
    assert!(
        took <= Duration::from_secs(3),
        "the routes went {took:?} after every backend stopped (bound 3 s)"
    );
    assert_eq!(node_check(&lbd), 1, "no VIP serves: node check fails");
    for i in 1..=3 {
        t.start_backend_server(i).unwrap();
    }
    let took = wait_routes(&t, &lbd, &both, Duration::from_secs(10));
    assert!(
        took <= Duration::from_secs(3),
        "the routes came back {took:?} after the backends (bound 3 s)"
    );
    assert_eq!(node_check(&lbd), 0);

    // A service added with lbctl: serving once it has a backend up (no checks: at once).
    let added = set(&[VIP4, VIP6, VIP_ADDED]);
    lbd.lbctl_ok(&[
        "service",
        "add",
        "added",
        "--vip",
        VIP_ADDED,
        "--port",
        "80",
        "--protocol",
        "tcp",
    ]);
    assert_eq!(
        routes(&t),
        both,
        "a service without backends does not serve"
    );
    lbd.lbctl_ok(&["backend", "add", "added", &t.backend_addr(2).to_string()]);
    let took = wait_routes(&t, &lbd, &added, Duration::from_secs(5));
    assert!(took <= Duration::from_secs(1), "added after {took:?}");
    // Its only backend drained (weight 0): not serving.
    lbd.lbctl_ok(&["backend", "drain", "added", &t.backend_addr(2).to_string()]);
    let took = wait_routes(&t, &lbd, &both, Duration::from_secs(5));
    assert!(took <= Duration::from_secs(1), "withdrawn after {took:?}");
    lbd.lbctl_ok(&[
        "backend",
        "undrain",
        "added",
        &t.backend_addr(2).to_string(),
    ]);
    wait_routes(&t, &lbd, &added, Duration::from_secs(1));
    lbd.lbctl_ok(&["service", "remove", "added"]);
    let took = wait_routes(&t, &lbd, &both, Duration::from_secs(5));
    assert!(took <= Duration::from_secs(1), "withdrawn after {took:?}");

    // SIGHUP: a service added to the file, then taken out of it.
    let before = std::fs::read_to_string(&paths.config).unwrap();
    let with = format!(
        "{before}{}",
        service("hup", VIP_ADDED, None, &[(t.backend_addr(3), 100)])
    );
    std::fs::write(&paths.config, &with).unwrap();
    lbd.reload(Duration::from_secs(10)).unwrap();
    let took = wait_routes(&t, &lbd, &added, Duration::from_secs(5));
    assert!(took <= Duration::from_secs(1), "added after {took:?}");
    std::fs::write(&paths.config, &before).unwrap();
    lbd.reload(Duration::from_secs(10)).unwrap();
    let took = wait_routes(&t, &lbd, &both, Duration::from_secs(5));
    assert!(took <= Duration::from_secs(1), "withdrawn after {took:?}");
    let log = lbd.log();
    assert!(log.contains(&format!("withdrawn: {STRAY}")), "{log}");
}

// ---- 2 ----------------------------------------------------------------------------------------

/// `lbctl node drain` withdraws every route before it returns while traffic to the VIPs is
/// still forwarded, `node check` fails; the drain is kept in state_dir (not in the config)
/// and survives a restart; `undrain` brings the routes back.
#[test]
fn node_drain_withdraws_keeps_forwarding_and_survives_a_restart() {
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    let mut config = daemon(&paths, true, "");
    config.push_str(&service("web", VIP4, None, &three(&t, "4", 100)));
    config.push_str(&service("web6", VIP6, None, &three(&t, "6", 100)));
    let lbd = start_lbd(&t, &config).expect("starting lbd");
    let both = set(&[VIP4, VIP6]);
    wait_routes(&t, &lbd, &both, Duration::from_secs(2));

    let out = lbd.lbctl_ok(&["node", "drain"]);
    assert!(out.contains("drained"), "{out}");
    // Gone when the command returns.
    assert_eq!(routes(&t), BTreeSet::new(), "routes left after node drain");
    assert_eq!(node_check(&lbd), 1);
    let s = status(&lbd);
    assert_eq!(s["drained"], true, "{s}");
    assert_eq!(addresses(&s["announced"]), BTreeSet::new(), "{s}");
    // The data path is untouched: flows that still arrive are forwarded.
    let src4 = t.client_sources(1)[0];
    let src6 = t.client_sources_v6(1)[0];
    for (src, vip) in [(src4, VIP4), (src6, VIP6)] {
        let b = t
            .which_backend(src, SocketAddr::new(ip(vip), 80))
            .unwrap_or_else(|e| panic!("{vip} while drained: {e:#}"));
        assert!((1..=3).contains(&b));
    }
    // Draining again changes nothing and is no error.
    let out = lbd.lbctl_ok(&["node", "drain"]);
    assert!(out.contains("already drained"), "{out}");
    let kept = std::fs::read_to_string(paths.state_dir.join("node.json")).unwrap();
    assert!(kept.contains("\"drained\":true"), "{kept}");
    assert!(
        !std::fs::read_to_string(&paths.config)
            .unwrap()
            .contains("drain"),
        "the drain went into the config file"
    );

    // A restart keeps the drain.
    lbd.stop().unwrap();
    assert_eq!(routes(&t), BTreeSet::new());
    let lbd = spawn_lbd(&t, &paths).unwrap();
    let s = lbd.wait_answering(lb_tests::lbd::LBD_START).unwrap();
    assert_eq!(s["drained"], true, "{s}");
    assert_eq!(node_check(&lbd), 1);
    assert_eq!(
        routes(&t),
        BTreeSet::new(),
        "a drained node announced after restart"
    );

    let out = lbd.lbctl_ok(&["node", "undrain"]);
    assert!(out.contains("undrained"), "{out}");
    assert_eq!(routes(&t), both, "routes not back when undrain returned");
    assert_eq!(node_check(&lbd), 0);
    assert_eq!(status(&lbd)["drained"], false);
}

// ---- 3 ----------------------------------------------------------------------------------------

/// The routes stay when lbd is SIGKILLed; a new lbd starting on the same config never takes
/// them away, not even for a moment (the table sampled every few milliseconds across the
/// restart); `lbd --cleanup` removes them.
#[test]
fn routes_stay_through_kill_and_restart_and_go_with_cleanup() {
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    let h = health();
    let mut config = daemon(&paths, true, "");
    config.push_str(&service("web", VIP4, Some(&h), &three(&t, "4", 100)));
    config.push_str(&service("web6", VIP6, Some(&h), &three(&t, "6", 100)));
    let lbd = start_lbd(&t, &config).expect("starting lbd");
    let both = set(&[VIP4, VIP6]);
    wait_routes(&t, &lbd, &both, Duration::from_secs(2));

    t.kill(lbd.handle).unwrap();
    let killed = Instant::now();
    let stop = AtomicBool::new(false);
    let samples: Mutex<Vec<(Duration, BTreeSet<IpAddr>)>> = Mutex::new(vec![]);
    let new_lbd = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let r = routes(&t);
                samples.lock().unwrap().push((killed.elapsed(), r));
            }
        });
        let result = (|| {
            // Dead for a while: the routes stay.
            wait_until(Duration::from_secs(5), "samples while lbd is dead", || {
                samples.lock().unwrap().len() >= 20
            })?;
            let lbd = spawn_lbd(&t, &paths)?;
            let s = lbd.wait_answering(lb_tests::lbd::LBD_START)?;
            anyhow::ensure!(s["start"] == "adopted", "{s}");
            // Until the new lbd has looked at its table (it reports what it found) and a
            // little after.
            wait_until(
                Duration::from_secs(5),
                "the new lbd to report its routes",
                || {
                    lbd.lbctl_json(&["status"])
                        .is_ok_and(|s| addresses(&s["announced"]) == both)
                },
            )?;
            let seen = samples.lock().unwrap().len();
            wait_until(Duration::from_secs(5), "more samples", || {
                samples.lock().unwrap().len() >= seen + 50
            })?;
            Ok(lbd)
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })
    .unwrap_or_else(|e: anyhow::Error| panic!("{e:#}"));
    let samples = samples.into_inner().unwrap();
    let missing: Vec<_> = samples.iter().filter(|(_, r)| *r != both).collect();
    eprintln!(
        "{} samples of the table over {} ms across the kill and the restart",
        samples.len(),
        samples.last().map_or(0, |(at, _)| at.as_millis())
    );
    assert!(samples.len() >= 70, "only {} samples", samples.len());
    assert!(
        missing.is_empty(),
        "the routes were not both there at {} samples, first {:?}\nnew lbd's log:\n{}",
        missing.len(),
        missing.first(),
        new_lbd.log()
    );
    let log = new_lbd.log();
    assert!(
        !log.contains("withdrawn:") && !log.contains("announced:"),
        "the new lbd changed routes that were right:\n{log}"
    );

    // SIGTERM: the routes stay; --cleanup removes them, and nothing else.
    new_lbd.stop().unwrap();
    assert_eq!(routes(&t), both);
    let out = cleanup_lbd(&t, &paths).unwrap();
    assert!(
        out.status.success(),
        "lbd --cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(routes(&t), BTreeSet::new(), "routes left after --cleanup");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains(&format!("withdrawn: {VIP4}")), "{said}");
}

// ---- 4 ----------------------------------------------------------------------------------------

/// The fingerprint of web's table for backends 1..=3 with `weights` under the test's seed,
/// computed here from the addresses alone (ids chosen freely).
fn oracle(t: &Topology, weights: [u32; 3]) -> String {
    let seed = lb_common::hash::parse_seed(SEED_HEX).unwrap();
    let backends: Vec<MaglevBackend> = (1..=3)
        .map(|i| MaglevBackend {
            id: 1000 + 7 * i as u32,
            addr: to_addr(t.backend_addr(i)),
            salt: 0,
            weight: weights[i - 1],
        })
        .collect();
    let table = lb_common::maglev::build_table(&seed, &backends, 65_537);
    let fp = table_fingerprint(&seed, &table, &backends, lb_common::FAMILY_V4, false);
    format!("{fp:016x}")
}

fn web_fingerprint(lbd: &Lbd) -> String {
    let s = status(lbd);
    s["services"]
        .as_array()
        .and_then(|l| l.iter().find(|svc| svc["name"] == "web"))
        .and_then(|svc| svc["fingerprint"].as_str().map(String::from))
        .unwrap_or_else(|| panic!("no fingerprint for web: {s}"))
}

/// Without `[daemon.announce]`, `lbctl node check` answers by the serving rule (drained
/// backends, a drained node) and no route is made. Web's fingerprint is the one computed from
/// the backends' addresses and weights, the same for an lbd given the backends in another
/// order (other ids), another when a weight changes; the metric carries its low 52 bits.
#[test]
fn node_check_without_announce_and_fingerprints() {
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    let metrics = SocketAddr::new(t.lb_addr(), 9917);
    let extra = format!("metrics = \"{metrics}\"\n");
    let b = |i| t.backend_addr(i);
    let write = |order: [usize; 3]| {
        let mut c = daemon(&paths, false, &extra);
        let weights = [100, 100, 50];
        let listed: Vec<(IpAddr, u32)> = order.iter().map(|&i| (b(i), weights[i - 1])).collect();
        c.push_str(&service("web", VIP4, None, &listed));
        c
    };
    let lbd = start_lbd(&t, &write([1, 2, 3])).expect("starting lbd");
    assert_eq!(node_check(&lbd), 0);
    let s = status(&lbd);
    assert!(s["announce"].is_null(), "{s}");
    assert_eq!(addresses(&s["announced"]), BTreeSet::new(), "{s}");
    assert_eq!(addresses(&s["serving"]), set(&[VIP4]), "{s}");
    assert_eq!(routes(&t), BTreeSet::new());
    let first = web_fingerprint(&lbd);
    assert_eq!(first, oracle(&t, [100, 100, 50]));
    let scrape = || {
        let r = t
            .http_get(t.client_ns(1), t.client_addr(1), metrics, "/metrics")
            .expect("scraping the metrics");
        r.text().into_owned()
    };
    let text = scrape();
    let low52 = u64::from_str_radix(&first, 16).unwrap() & ((1 << 52) - 1);
    assert_eq!(
        metric(&text, r#"lb_service_table_fingerprint{service="web"}"#),
        Some(low52 as f64),
        "{text}"
    );
    assert_eq!(metric(&text, "lb_node_drained"), Some(0.0), "{text}");
    assert_eq!(metric(&text, "lb_announced_vips"), Some(0.0), "{text}");

    // Every backend drained: no VIP serves.
    for i in 1..=3 {
        lbd.lbctl_ok(&["backend", "drain", "web", &b(i).to_string()]);
    }
    assert_eq!(node_check(&lbd), 1);
    lbd.lbctl_ok(&["backend", "undrain", "web", &b(2).to_string()]);
    assert_eq!(node_check(&lbd), 0);
    lbd.lbctl_ok(&["node", "drain"]);
    assert_eq!(node_check(&lbd), 1);
    assert_eq!(metric(&scrape(), "lb_node_drained"), Some(1.0));
    lbd.lbctl_ok(&["node", "undrain"]);
    assert_eq!(node_check(&lbd), 0);
    for i in [1, 3] {
        lbd.lbctl_ok(&["backend", "undrain", "web", &b(i).to_string()]);
    }
    assert_eq!(web_fingerprint(&lbd), first, "back to the same table");

    // Another lbd (fresh: pins removed) given the backends in another order.
    lbd.stop().unwrap();
    let out = cleanup_lbd(&t, &paths).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&paths.config, write([3, 1, 2])).unwrap();
    let lbd = spawn_lbd(&t, &paths).unwrap();
    let s = lbd.wait_answering(lb_tests::lbd::LBD_START).unwrap();
    assert_eq!(s["start"], "fresh", "{s}");
    assert_eq!(web_fingerprint(&lbd), first, "listed in another order");
    lbd.lbctl_ok(&["backend", "weight", "web", &b(3).to_string(), "51"]);
    let changed = web_fingerprint(&lbd);
    assert_ne!(changed, first, "a weight changed");
    assert_eq!(changed, oracle(&t, [100, 100, 51]));
}
