//! End to end, the control plane: health checks taking a backend out and back in, lbctl changes
//! that the data path follows before the command returns, a drained backend finishing its
//! established download, a SIGKILLed lbd restarted without losing a request, SIGHUP, metrics.
//! Real lbd, real XDP, real nginx, real HTTP from 80 client addresses. Needs root.

use lb_tests::http::metric;
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{IpAddr, SocketAddr},
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use lb_common::{PROGRAM_NAME, TRACED_PROGRAM_NAME};
use lb_tests::{
    BIG_FILE_SIZE, Topology, TopologyOptions, big_file_contents,
    lbd::{LBD_START, Lbd, LbdPaths, bin, spawn_lbd, start_lbd},
    require_root, retry_until, wait_until,
};
use serde_json::Value;

const VIP: &str = "203.0.113.10";
const SEED_HEX: &str = "5f0c1d2e3f4051627384950a1b2c3d4e";

const INTERVAL_MS: u64 = 200;
const RISE: u64 = 2;
const FALL: u64 = 3;
/// Room for scheduling on a small (2-core) machine running two tests at once.
const MARGIN: Duration = Duration::from_secs(1);

fn health_http() -> String {
    format!(
        "[service.health]\ncheck = \"http\"\npath = \"/healthz\"\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = 100\nrise = {RISE}\nfall = {FALL}\n"
    )
}

fn vip() -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), 80)
}

/// Address of backend `i` (1-based), as the harness assigns them: 192.0.2.(10+i).
fn baddr(i: usize) -> IpAddr {
    format!("192.0.2.{}", 10 + i).parse().unwrap()
}

/// The backend index (1-based) of a backend address.
fn bindex(a: IpAddr) -> usize {
    match a {
        IpAddr::V4(v4) => v4.octets()[3] as usize - 10,
        IpAddr::V6(_) => panic!("{a} is not a backend address"),
    }
}

/// A config with one service "web" on VIP:80/tcp, the given health table (or none) and
/// backends `(index, weight)`; `daemon_extra` goes into `[daemon]` after the fixed seed.
fn config(
    paths: &LbdPaths,
    daemon_extra: &str,
    health: Option<&str>,
    backends: &[(usize, u32)],
) -> String {
    let mut c = paths.daemon_section(&format!("hash_seed = \"{SEED_HEX}\"\n{daemon_extra}"));
    c.push_str(&format!(
        "\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\n\n"
    ));
    if let Some(h) = health {
        c.push_str(h);
        c.push('\n');
    }
    for &(i, w) in backends {
        c.push_str(&format!(
            "[[service.backend]]\naddress = \"{}\"\nweight = {w}\n\n",
            baddr(i)
        ));
    }
    c
}

fn topology() -> Topology {
    require_root();
    Topology::new(TopologyOptions {
        vips: vec![VIP.parse().unwrap()],
        ..Default::default()
    })
    .expect("building the namespace topology")
}

/// lbd with service `web` on the three backends, weight 100 each, no health checks.
fn start_with_three_backends(t: &Topology) -> Lbd<'_> {
    let paths = LbdPaths::for_topology(t);
    start_lbd(
        t,
        &config(&paths, "", None, &[(1, 100), (2, 100), (3, 100)]),
    )
    .expect("starting lbd")
}

fn backend_list(lbd: &Lbd) -> Vec<Value> {
    lbd.lbctl_json(&["backend", "list", "web"])
        .expect("lbctl backend list")
        .as_array()
        .expect("backend list is an array")
        .clone()
}

/// Waits until every backend is up with a passed check: the steady state tests start from.
fn wait_all_up(lbd: &Lbd) {
    wait_until(
        Duration::from_secs(5),
        "every backend's first check to pass",
        || {
            backend_list(lbd)
                .iter()
                .all(|r| r["state"] == "up" && r["last_check_ok"] == true)
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\nlbd log:\n{}", lbd.log_tail()));
}

/// The `backend list` row of backend `i`, if listed.
fn row(lbd: &Lbd, i: usize) -> Option<Value> {
    let a = baddr(i).to_string();
    backend_list(lbd).into_iter().find(|r| r["address"] == a)
}

fn state_of(lbd: &Lbd, i: usize) -> Option<String> {
    row(lbd, i).and_then(|r| r["state"].as_str().map(String::from))
}

/// `(address, weight)` of every listed backend.
fn weights(lbd: &Lbd) -> BTreeMap<String, u64> {
    backend_list(lbd)
        .iter()
        .map(|r| {
            (
                r["address"].as_str().unwrap().to_string(),
                r["weight"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The backend (1-based index) `lbctl lookup` names for `src`.
fn lookup(lbd: &Lbd, src: IpAddr) -> usize {
    let v = lbd
        .lbctl_json(&["lookup", "web", &src.to_string()])
        .expect("lbctl lookup");
    let b = v["backend"]
        .as_str()
        .unwrap_or_else(|| panic!("lookup of {src} names no backend: {v}"));
    bindex(b.parse().unwrap())
}

/// For every client address: `lbctl lookup` names a backend, and a new connection from that
/// address is served by exactly that backend. Returns address → backend. Two threads (one per
/// client namespace).
fn follow_lookup(t: &Topology, lbd: &Lbd, when: &str) -> BTreeMap<IpAddr, usize> {
    let results: Vec<Result<Vec<(IpAddr, usize)>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..=t.clients())
            .map(|c| {
                s.spawn(move || {
                    let mut out = vec![];
                    for src in t.client_sources(c) {
                        let expected = lookup(lbd, src);
                        let got = t
                            .which_backend(src, vip())
                            .map_err(|e| format!("{when}: GET from {src}: {e:#}"))?;
                        if got != expected {
                            return Err(format!(
                                "{when}: client {src} was served by backend {got}, lbctl lookup names {expected}"
                            ));
                        }
                        out.push((src, got));
                    }
                    Ok(out)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut map = BTreeMap::new();
    for r in results {
        match r {
            Ok(v) => map.extend(v),
            Err(e) => panic!("{e}\nlbd log:\n{}", lbd.log_tail()),
        }
    }
    assert_eq!(map.len(), t.all_client_sources().len());
    map
}

fn clients_per_backend(m: &BTreeMap<IpAddr, usize>) -> BTreeMap<usize, usize> {
    let mut c = BTreeMap::new();
    for &b in m.values() {
        *c.entry(b).or_default() += 1;
    }
    c
}

// ---- 1 ----------------------------------------------------------------------------------------

#[test]
fn health_failover() {
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    let h = health_http();
    let lbd = start_lbd(
        &t,
        &config(&paths, "", Some(&h), &[(1, 100), (2, 100), (3, 100)]),
    )
    .expect("starting lbd");

    // Steady state first: every backend up with a passed check.
    wait_all_up(&lbd);
    let before = follow_lookup(&t, &lbd, "all up");
    let of_b2: BTreeSet<IpAddr> = before
        .iter()
        .filter(|(_, b)| **b == 2)
        .map(|(s, _)| *s)
        .collect();
    assert!(!of_b2.is_empty(), "no client on backend 2: {before:?}");

    // Backend 2's server goes away: down within fall checks (+ one interval of phase).
    t.stop_backend_server(2).unwrap();
    let stopped = Instant::now();
    let bound = Duration::from_millis(INTERVAL_MS * FALL + INTERVAL_MS) + MARGIN;
    wait_until(Duration::from_secs(10), "backend 2 to be down", || {
        state_of(&lbd, 2).as_deref() == Some("down")
    })
    .unwrap_or_else(|e| panic!("{e:#}\nlbd log:\n{}", lbd.log_tail()));
    let detection = stopped.elapsed();
    eprintln!(
        "failover detection time: {} ms (interval {INTERVAL_MS} ms, fall {FALL}; bound {} ms)",
        detection.as_millis(),
        bound.as_millis()
    );
    assert!(
        detection <= bound,
        "backend 2 was marked down {detection:?} after its server stopped (bound {bound:?})"
    );
    let r = row(&lbd, 2).unwrap();
    assert_eq!(r["last_check_ok"], false, "{r}");
    assert_eq!(r["last_check"], "connection refused", "{r}");
    assert!(
        lbd.log().contains("192.0.2.12 is down"),
        "the state change is logged with its reason:\n{}",
        lbd.log_tail()
    );
    let svc = lbd.lbctl_json(&["service", "list"]).unwrap();
    assert_eq!(svc[0]["up"], 2, "{svc}");

    // From now on: nobody fails, nobody reaches backend 2; the others keep their clients.
    for round in 0..2 {
        let during = follow_lookup(&t, &lbd, &format!("backend 2 down, round {round}"));
        for (src, b) in &during {
            assert_ne!(*b, 2, "client {src} served by the down backend 2");
            if !of_b2.contains(src) {
                assert_eq!(
                    *b, before[src],
                    "client {src} of a healthy backend moved when backend 2 went down"
                );
            }
        }
    }

    // Back: up after rise successes.
    t.start_backend_server(2).unwrap();
    let started = Instant::now();
    let bound = Duration::from_millis(INTERVAL_MS * RISE + INTERVAL_MS) + MARGIN;
    wait_until(Duration::from_secs(10), "backend 2 to be up again", || {
        state_of(&lbd, 2).as_deref() == Some("up")
    })
    .unwrap_or_else(|e| panic!("{e:#}\nlbd log:\n{}", lbd.log_tail()));
    let recovery = started.elapsed();
    eprintln!(
        "recovery detection time: {} ms (rise {RISE}; bound {} ms)",
        recovery.as_millis(),
        bound.as_millis()
    );
    assert!(
        recovery <= bound,
        "backend 2 came back {recovery:?} after its server restarted (bound {bound:?})"
    );
    let r = row(&lbd, 2).unwrap();
    assert_eq!(r["last_check_ok"], true, "{r}");
    assert_eq!(r["last_check"], "HTTP 200", "{r}");
    let after = follow_lookup(&t, &lbd, "backend 2 back");
    let of_b2_after: BTreeSet<IpAddr> = after
        .iter()
        .filter(|(_, b)| **b == 2)
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(
        of_b2_after, of_b2,
        "backend 2's clients are served by it again, the same as before"
    );
    assert_eq!(after, before);
}

// ---- 2 ----------------------------------------------------------------------------------------

#[test]
fn live_changes_follow_lookup() {
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    // .12 has a weight of its own, so that undrain visibly restores it (not the default).
    let text = format!(
        "# lb config of the control tests: this comment must survive lbctl's edits\n{}",
        config(&paths, "", None, &[(1, 100), (2, 150)])
    );
    let lbd = start_lbd(&t, &text).expect("starting lbd");
    let m = follow_lookup(&t, &lbd, "start");
    assert_eq!(
        clients_per_backend(&m).keys().copied().collect::<Vec<_>>(),
        vec![1, 2]
    );

    // Add .13: it takes clients at once.
    lbd.lbctl_ok(&["backend", "add", "web", "192.0.2.13"]);
    let m = follow_lookup(&t, &lbd, "after backend add .13");
    let per = clients_per_backend(&m);
    assert!(per.get(&3).copied().unwrap_or(0) > 0, "{per:?}");
    assert_eq!(row(&lbd, 3).unwrap()["weight"], 100);
    assert_eq!(state_of(&lbd, 3).as_deref(), Some("up"));

    // Weight .11 300.
    let before_weight = per.get(&1).copied().unwrap_or(0);
    lbd.lbctl_ok(&["backend", "weight", "web", "192.0.2.11", "300"]);
    let m = follow_lookup(&t, &lbd, "after backend weight .11 300");
    let per = clients_per_backend(&m);
    assert!(
        per[&1] > before_weight,
        "weight 300 gives .11 more clients: {before_weight} -> {per:?}"
    );
    assert_eq!(row(&lbd, 1).unwrap()["weight"], 300);

    // Drain .12: no new client reaches it.
    let w12 = row(&lbd, 2).unwrap()["weight"].as_u64().unwrap();
    assert_eq!(w12, 150);
    lbd.lbctl_ok(&["backend", "drain", "web", "192.0.2.12"]);
    let m = follow_lookup(&t, &lbd, "after backend drain .12");
    assert!(
        m.values().all(|&b| b != 2),
        "a client reached drained .12: {m:?}"
    );
    let r = row(&lbd, 2).unwrap();
    assert_eq!(r["state"], "draining", "{r}");
    assert_eq!(r["weight"], 0, "{r}");

    // Undrain: back to its pre-drain weight.
    lbd.lbctl_ok(&["backend", "undrain", "web", "192.0.2.12"]);
    let m = follow_lookup(&t, &lbd, "after backend undrain .12");
    let r = row(&lbd, 2).unwrap();
    assert_eq!(r["state"], "up", "{r}");
    assert_eq!(
        r["weight"].as_u64(),
        Some(w12),
        "undrain restores the weight: {r}"
    );
    assert!(m.values().any(|&b| b == 2), "{m:?}");

    // Dry run of removing .13: only its own clients move.
    let own_ideal = 100.0 / (300.0 + 150.0 + 100.0);
    let dry = lbd
        .lbctl_json(&["backend", "remove", "web", "192.0.2.13", "--dry-run"])
        .unwrap();
    eprintln!("dry run: {dry}");
    let moved = dry["moved_share"].as_f64().unwrap();
    let own = dry["own_share"].as_f64().unwrap();
    let others = dry["others_moved_share"].as_f64().unwrap();
    assert!(
        (own - own_ideal).abs() < 0.005,
        "own_share {own}, weighted ideal {own_ideal}: {dry}"
    );
    assert!(
        moved >= own && moved - own < 0.01,
        "moved_share {moved} vs own_share {own}: {dry}"
    );
    assert!(others < 0.01, "{dry}");
    assert_eq!(
        row(&lbd, 3).unwrap()["state"],
        "up",
        "a dry run changes nothing"
    );
    assert_eq!(m, follow_lookup(&t, &lbd, "after the dry run"));

    // Remove .13: it serves nobody.
    lbd.lbctl_ok(&["backend", "remove", "web", "192.0.2.13"]);
    let m = follow_lookup(&t, &lbd, "after backend remove .13");
    assert!(
        m.values().all(|&b| b != 3),
        "removed .13 still serves: {m:?}"
    );
    assert!(row(&lbd, 3).is_none());
    assert_eq!(
        weights(&lbd),
        BTreeMap::from([
            ("192.0.2.11".to_string(), 300),
            ("192.0.2.12".to_string(), 150)
        ])
    );

    // The file was written through: valid, and holding the desired state.
    let out = Command::new(bin("lbd"))
        .arg("--check")
        .arg("--config")
        .arg(&paths.config)
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&paths.config).unwrap();
    assert!(
        out.status.success(),
        "lbd --check on the rewritten file: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = lb_userspace::config::load(&paths.config).unwrap().config;
    let listed: Vec<(IpAddr, u32)> = file.services[0]
        .backends
        .iter()
        .map(|b| (b.address, b.weight))
        .collect();
    assert_eq!(
        listed,
        vec![(baddr(1), 300), (baddr(2), 150)],
        "the config file:\n{text}"
    );
    assert!(!text.contains("192.0.2.13"), "{text}");
    assert!(
        text.starts_with("# lb config of the control tests: this comment must survive"),
        "comments are kept:\n{text}"
    );

    // The file holds the desired state: a SIGHUP re-reads it and changes nothing.
    let from = lbd.log().len();
    t.signal(lbd.handle, libc::SIGHUP).unwrap();
    wait_until(Duration::from_secs(5), "lbd to log the SIGHUP", || {
        lbd.log().get(from..).is_some_and(|l| l.contains("SIGHUP"))
    })
    .unwrap();
    let logged = lbd.log()[from..].to_string();
    assert!(logged.contains("nothing changed"), "{logged}");
    assert_eq!(
        weights(&lbd),
        BTreeMap::from([
            ("192.0.2.11".to_string(), 300),
            ("192.0.2.12".to_string(), 150)
        ])
    );
    assert_eq!(follow_lookup(&t, &lbd, "after SIGHUP"), m);
}

// ---- 3 ----------------------------------------------------------------------------------------

#[test]
fn drained_stream_completes_byte_exact() {
    let t = topology();
    let lbd = start_with_three_backends(&t);
    let src = t.client_sources(1)[0];
    let ns = t.client_ns(1);
    let b = lookup(&lbd, src);
    assert_eq!(t.which_backend(src, vip()).unwrap(), b);

    let mut s = t
        .connect_tcp(ns, Some(src), vip(), Duration::from_secs(2))
        .unwrap();
    // A small receive window keeps most of the file unsent until after the changes below, so
    // the flow really crosses the balancer while its backend is drained.
    lb_tests::http::set_recv_buffer(&s, 32 * 1024).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let sport = s.local_addr().unwrap().port();
    s.write_all(
        format!(
            "GET /big HTTP/1.0\r\nHost: {VIP}\r\nUser-Agent: lb-tests\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    // A first part, then the reader pauses (the transfer stalls on a full window).
    let mut got = Vec::with_capacity(BIG_FILE_SIZE + 1024);
    assert!(
        lb_tests::http::read_until(&mut s, &mut got, 512 * 1024),
        "EOF early"
    );
    assert!(
        got.len() < BIG_FILE_SIZE,
        "the download is still in progress"
    );

    let flow = lbd
        .lbctl_json(&[
            "lookup",
            "web",
            &src.to_string(),
            "--port",
            &sport.to_string(),
        ])
        .unwrap();
    // The flow's slot has not changed: it needs no record, the slot's backend is its own.
    assert_eq!(flow["reason"], "hash", "{flow}");
    assert_eq!(flow["backend"], baddr(b).to_string(), "{flow}");

    lbd.lbctl_ok(&["backend", "drain", "web", &baddr(b).to_string()]);
    let other = (1..=3).find(|&i| i != b).unwrap();
    lbd.lbctl_ok(&["backend", "weight", "web", &baddr(other).to_string(), "250"]);

    // New connections from the same client go elsewhere; the established flow stays on b.
    let now = lookup(&lbd, src);
    assert_ne!(now, b, "lookup still names the drained backend");
    for _ in 0..3 {
        assert_eq!(t.which_backend(src, vip()).unwrap(), now);
    }
    let flow_now = || {
        lbd.lbctl_json(&[
            "lookup",
            "web",
            &src.to_string(),
            "--port",
            &sport.to_string(),
        ])
        .unwrap()
    };
    // The flow's slot changed: until its next packet it has no record, and the data path
    // takes it for one older than the change (the slot's previous backend, b).
    let flow = flow_now();
    assert!(
        ["previous-backend", "connection-table"].contains(&flow["reason"].as_str().unwrap()),
        "{flow}"
    );
    assert_eq!(flow["backend"], baddr(b).to_string(), "{flow}");
    // Reading on makes the client acknowledge through lb: the flow is recorded on b.
    let read = got.len();
    assert!(
        lb_tests::http::read_until(&mut s, &mut got, read + 256 * 1024),
        "EOF early"
    );
    let flow = flow_now();
    assert_eq!(flow["reason"], "connection-table", "{flow}");
    assert_eq!(flow["backend"], baddr(b).to_string(), "{flow}");

    // The rest, slowly, with a new connection half way.
    let mut half_way_checked = false;
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let n = s.read(&mut chunk).expect("reading the download");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
        if !half_way_checked && got.len() > 2 * 1024 * 1024 {
            assert_eq!(t.which_backend(src, vip()).unwrap(), now);
            half_way_checked = true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(half_way_checked);
    let reply = lb_tests::http::parse_response(&got).expect("a complete HTTP response");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-backend"), Some(b.to_string().as_str()));
    assert_eq!(reply.body.len(), BIG_FILE_SIZE);
    assert!(
        reply.body == big_file_contents(),
        "the downloaded bytes differ from /big"
    );
    assert_eq!(state_of(&lbd, b).as_deref(), Some("draining"));
}

// ---- 4 ----------------------------------------------------------------------------------------

/// The parts of `backend list` and `service list` a restart must keep.
fn desired_view(lbd: &Lbd) -> (Vec<(String, String, u64, String)>, Value) {
    let backends = lbd
        .lbctl_json(&["backend", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["service"].as_str().unwrap().to_string(),
                r["address"].as_str().unwrap().to_string(),
                r["weight"].as_u64().unwrap(),
                r["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (backends, lbd.lbctl_json(&["service", "list"]).unwrap())
}

#[test]
fn sigkill_restart_is_hitless() {
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    let h = health_http();
    let lbd = start_lbd(
        &t,
        &config(&paths, "", Some(&h), &[(1, 100), (2, 120), (3, 80)]),
    )
    .expect("starting lbd");
    wait_all_up(&lbd);
    // A drained backend is part of the state the restart must keep (and undrain after it).
    lbd.lbctl_ok(&["backend", "drain", "web", "192.0.2.13"]);
    let expected = follow_lookup(&t, &lbd, "before the kill");
    assert!(expected.values().all(|&b| b != 3));
    let before = desired_view(&lbd);
    let status_before = lbd.lbctl_json(&["status"]).unwrap();

    let count = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let failures: Mutex<Vec<String>> = Mutex::new(vec![]);
    let slowest = Mutex::new(Duration::ZERO);
    let (after_kill, status_after, again) = std::thread::scope(|s| {
        for c in 1..=t.clients() {
            let (t, count, stop, failures, expected, slowest) =
                (&t, &count, &stop, &failures, &expected, &slowest);
            s.spawn(move || {
                let sources = t.client_sources(c);
                'outer: loop {
                    for &src in &sources {
                        if stop.load(Ordering::Relaxed) {
                            break 'outer;
                        }
                        let began = Instant::now();
                        let r = t.which_backend(src, vip());
                        let took = began.elapsed();
                        {
                            let mut sl = slowest.lock().unwrap();
                            *sl = (*sl).max(took);
                        }
                        count.fetch_add(1, Ordering::SeqCst);
                        match r {
                            Ok(b) if b == expected[&src] => {}
                            Ok(b) => failures.lock().unwrap().push(format!(
                                "{src}: served by backend {b}, expected {}",
                                expected[&src]
                            )),
                            Err(e) => failures.lock().unwrap().push(format!("{src}: {e:#}")),
                        }
                    }
                }
            });
        }
        // Whatever happens here, the request threads are told to stop before the scope ends.
        let run = || -> anyhow::Result<(usize, Value, Lbd<'_>)> {
            wait_until(Duration::from_secs(30), "traffic before the kill", || {
                count.load(Ordering::SeqCst) >= 200
            })?;
            let at_kill = count.load(Ordering::SeqCst);
            t.kill(lbd.handle)?;
            // The data path alone for a while: no lbd at all.
            wait_until(Duration::from_secs(30), "traffic without lbd", || {
                count.load(Ordering::SeqCst) - at_kill >= 300
            })?;
            let again = spawn_lbd(&t, &paths)?;
            let status = again.wait_answering(lb_tests::lbd::LBD_START)?;
            wait_until(
                Duration::from_secs(60),
                "2000 requests after the kill",
                || count.load(Ordering::SeqCst) - at_kill >= 2000,
            )?;
            Ok((count.load(Ordering::SeqCst) - at_kill, status, again))
        };
        let r = run();
        stop.store(true, Ordering::SeqCst);
        r
    })
    .expect("the kill and restart");
    let failures = failures.into_inner().unwrap();
    eprintln!(
        "{} requests in all, {after_kill} after the kill began, {} failed; slowest {:?}",
        count.load(Ordering::SeqCst),
        failures.len(),
        slowest.into_inner().unwrap()
    );
    assert!(
        failures.is_empty(),
        "{} of the requests failed, e.g. {:?}\nlbd log:\n{}",
        failures.len(),
        &failures[..failures.len().min(10)],
        again.log_tail()
    );
    assert!(after_kill >= 2000);

    assert_eq!(status_after["start"], "adopted", "{status_after}");
    assert_eq!(
        status_after["program_id"], status_before["program_id"],
        "the program was not reloaded: {status_before} vs {status_after}"
    );
    assert_eq!(
        status_after["interfaces"][0]["mode"], "adopted",
        "{status_after}"
    );
    assert_eq!(desired_view(&again), before, "right after the restart");
    // And once the new lbd's own checks have run.
    wait_until(
        Duration::from_secs(5),
        "the new lbd's checks to pass",
        || {
            backend_list(&again)
                .iter()
                .all(|r| r["last_check_ok"] == true)
        },
    )
    .unwrap();
    assert_eq!(desired_view(&again), before, "after the new lbd's checks");
    assert_eq!(follow_lookup(&t, &again, "after the restart"), expected);
}

/// A drain survives a restart, and `undrain` afterwards restores the weight from before the
/// drain (kept in `state_dir`, which lbd creates with mode 0700 when missing).
#[test]
fn undrain_after_restart_restores_the_weight() {
    use std::os::unix::fs::PermissionsExt as _;
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    let lbd = start_lbd(
        &t,
        &config(&paths, "", None, &[(1, 100), (2, 100), (3, 80)]),
    )
    .expect("starting lbd");
    lbd.lbctl_ok(&["backend", "drain", "web", "192.0.2.13"]);
    assert!(
        !lbd.log().contains("cannot keep the drained weights"),
        "{}",
        lbd.log_tail()
    );
    let mode = std::fs::metadata(&paths.state_dir)
        .unwrap_or_else(|e| panic!("state_dir {}: {e}", paths.state_dir.display()))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "state_dir mode {mode:o}");
    assert!(lbd.stop().unwrap().success());

    let again = spawn_lbd(&t, &paths).unwrap();
    again.wait_ready(Duration::from_secs(10)).unwrap();
    let r = row(&again, 3).unwrap();
    assert_eq!(r["state"], "draining", "{r}");
    again.lbctl_ok(&["backend", "undrain", "web", "192.0.2.13"]);
    let r = row(&again, 3).unwrap();
    assert_eq!(r["weight"], 80, "undrain after a restart: {r}");
    assert_eq!(r["state"], "up", "{r}");
    let m = follow_lookup(&t, &again, "after undrain");
    assert!(m.values().any(|&b| b == 3), "{m:?}");
}

// ---- 5 ----------------------------------------------------------------------------------------

#[test]
fn sighup_applies_the_file() {
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    let text = config(&paths, "", None, &[(1, 100), (2, 100)]);
    let lbd = start_lbd(&t, &text).expect("starting lbd");
    let m = follow_lookup(&t, &lbd, "start");
    assert!(m.values().all(|&b| b != 3));

    // By hand: .11's weight 100 -> 250, a new backend .13 with weight 50.
    let needle = "address = \"192.0.2.11\"\nweight = 100\n";
    assert!(text.contains(needle));
    let mut edited = text.replace(needle, "address = \"192.0.2.11\"\nweight = 250\n");
    edited
        .push_str("# added by hand\n[[service.backend]]\naddress = \"192.0.2.13\"\nweight = 50\n");
    std::fs::write(&paths.config, &edited).unwrap();
    t.signal(lbd.handle, libc::SIGHUP).unwrap();
    let want = BTreeMap::from([
        ("192.0.2.11".to_string(), 250),
        ("192.0.2.12".to_string(), 100),
        ("192.0.2.13".to_string(), 50),
    ]);
    wait_until(
        Duration::from_secs(5),
        "backend list to reflect the file",
        || weights(&lbd) == want,
    )
    .unwrap_or_else(|e| panic!("{e:#}: {:?}\nlbd log:\n{}", weights(&lbd), lbd.log_tail()));
    assert!(backend_list(&lbd).iter().all(|r| r["state"] == "up"));
    let m = follow_lookup(&t, &lbd, "after SIGHUP");
    let per = clients_per_backend(&m);
    assert!(per.get(&3).copied().unwrap_or(0) > 0, "{per:?}");
    assert!(per[&1] > per[&2], "weight 250 vs 100: {per:?}");
    assert!(lbd.log().contains("SIGHUP"), "{}", lbd.log_tail());

    // A broken file is refused and changes nothing.
    std::fs::write(
        &paths.config,
        edited.replace("weight = 50", "weight = \"lots\""),
    )
    .unwrap();
    t.signal(lbd.handle, libc::SIGHUP).unwrap();
    wait_until(Duration::from_secs(5), "the rejection to be logged", || {
        lbd.log().contains("the running state is unchanged")
    })
    .unwrap_or_else(|e| panic!("{e:#}\nlbd log:\n{}", lbd.log_tail()));
    assert_eq!(weights(&lbd), want);
    assert_eq!(follow_lookup(&t, &lbd, "after a broken SIGHUP"), m);
}

// ---- 6 ----------------------------------------------------------------------------------------

#[test]
fn metrics_endpoint() {
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    let h = health_http();
    let lbd = start_lbd(
        &t,
        &config(
            &paths,
            "metrics = \"192.0.2.2:9917\"",
            Some(&h),
            &[(1, 100), (2, 100), (3, 100)],
        ),
    )
    .expect("starting lbd");
    let endpoint = SocketAddr::new(t.lb_addr(), 9917);
    let scrape = || -> anyhow::Result<String> {
        let r = t.http_get(t.client_ns(1), t.client_addr(1), endpoint, "/metrics")?;
        anyhow::ensure!(r.status == 200, "status {}: {}", r.status, r.text());
        Ok(r.text().into_owned())
    };

    // Traffic: every client address once.
    let placed = follow_lookup(&t, &lbd, "traffic for the metrics");
    // A service without backends: its packets are dropped as no_backend.
    lbd.lbctl_ok(&[
        "service",
        "add",
        "empty",
        "--vip",
        VIP,
        "--port",
        "8081",
        "--protocol",
        "tcp",
    ]);
    let src = t.client_sources(2)[0];
    let r = t.connect_tcp(
        t.client_ns(2),
        Some(src),
        SocketAddr::new(VIP.parse().unwrap(), 8081),
        Duration::from_millis(300),
    );
    assert!(r.is_err(), "a service without backends answered");

    let text = retry_until(
        Duration::from_secs(5),
        "the metrics to show the traffic",
        || {
            let text = scrape()?;
            let ok = metric(
                &text,
                "lb_health_checks_total{service=\"web\",backend=\"192.0.2.11\",result=\"ok\"}",
            );
            let dropped = metric(&text, "lb_dropped_total{reason=\"no_backend\"}");
            anyhow::ensure!(ok.is_some_and(|v| v > 0.0), "no passed check counted yet");
            anyhow::ensure!(
                dropped.is_some_and(|v| v > 0.0),
                "no no_backend drop counted yet"
            );
            Ok(text)
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\nlbd log:\n{}", lbd.log_tail()));

    let packets =
        metric(&text, "lb_service_packets_total{service=\"web\"}").expect("service packets");
    assert!(packets >= 80.0 * 3.0, "{text}");
    assert!(metric(&text, "lb_service_bytes_total{service=\"web\"}").unwrap() > 0.0);
    let stats = lbd.lbctl_json(&["stats", "web"]).unwrap();
    assert!(
        stats["services"][0]["packets"].as_f64().unwrap() >= packets,
        "metrics and lbctl stats read the same counters: {stats}"
    );
    for i in 1..=3 {
        let b = baddr(i);
        assert_eq!(
            metric(
                &text,
                &format!("lb_backend_up{{service=\"web\",backend=\"{b}\"}}")
            ),
            Some(1.0),
            "{b}"
        );
        assert_eq!(
            metric(
                &text,
                &format!("lb_backend_weight{{service=\"web\",backend=\"{b}\"}}")
            ),
            Some(100.0),
            "{b}"
        );
        assert!(
            metric(
                &text,
                &format!("lb_backend_packets_total{{service=\"web\",backend=\"{b}\"}}")
            )
            .unwrap()
                > 0.0,
            "{b}"
        );
    }
    // Nothing changed since lbd started: no slot is changed, no flow needs a record.
    assert_eq!(metric(&text, "lb_changed_slots"), Some(0.0), "{text}");
    assert_eq!(metric(&text, "lb_conntrack_entries"), Some(0.0), "{text}");
    assert!(text.trim_end().ends_with("# EOF"));

    // A down backend shows as 0 and its failed checks are counted.
    t.stop_backend_server(3).unwrap();
    wait_until(Duration::from_secs(10), "backend 3 down", || {
        state_of(&lbd, 3).as_deref() == Some("down")
    })
    .unwrap();
    let text = scrape().unwrap();
    assert_eq!(
        metric(
            &text,
            "lb_backend_up{service=\"web\",backend=\"192.0.2.13\"}"
        ),
        Some(0.0)
    );
    assert!(
        metric(
            &text,
            "lb_health_checks_total{service=\"web\",backend=\"192.0.2.13\",result=\"fail\"}"
        )
        .unwrap()
            >= FALL as f64
    );
    // Its slots changed; connections on them are recorded. Both are counted in the
    // background, about every second.
    let gauge = |name: &'static str| {
        retry_until(Duration::from_secs(10), &format!("{name} > 0"), || {
            let text = scrape()?;
            match metric(&text, name) {
                Some(v) if v > 0.0 => Ok(v),
                other => anyhow::bail!("{name} is {other:?}"),
            }
        })
    };
    let changed = gauge("lb_changed_slots").unwrap();
    assert!(
        (65_537.0 / 3.0 * 0.8..65_537.0 / 3.0 * 1.2).contains(&changed),
        "about a third of the 65,537 slots moved off the down backend: {changed}"
    );
    // Clients that were on the down backend connect again: on their changed slots the new
    // connections are recorded.
    for (&src, _) in placed.iter().filter(|(_, b)| **b == 3) {
        t.which_backend(src, vip()).unwrap();
    }
    gauge("lb_conntrack_entries").unwrap();
    let r = t
        .http_get(t.client_ns(1), t.client_addr(1), endpoint, "/nothing")
        .unwrap();
    assert_eq!(r.status, 404);
}

// ---- 7 ----------------------------------------------------------------------------------------

/// Runs `lbctl --json trace ARGS` in the background; its parsed JSON array when it exits.
fn trace_in_background(lbd: &Lbd, args: &[&str]) -> std::thread::JoinHandle<Vec<Value>> {
    let socket = lbd.paths.socket.clone();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    std::thread::spawn(move || {
        let out = Command::new(bin("lbctl"))
            .arg("--socket")
            .arg(&socket)
            .arg("--json")
            .arg("trace")
            .args(&args)
            .output()
            .expect("running lbctl trace");
        assert!(
            out.status.success(),
            "lbctl trace {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("lbctl trace --json: an array")
    })
}

/// `lbctl trace ARGS` running, once lbd has begun its trace (lbctl prints its header then).
fn trace_begun(lbd: &Lbd, args: &[&str]) -> std::process::Child {
    let mut child = Command::new(bin("lbctl"))
        .arg("--socket")
        .arg(&lbd.paths.socket)
        .arg("trace")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting lbctl trace");
    let mut header = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().expect("lbctl's stdout")),
        &mut header,
    )
    .expect("reading lbctl trace's header");
    assert!(header.starts_with("CLIENT"), "{header:?}");
    child
}

/// The names of the XDP programs on the load balancer's `eth0`, as the kernel has them.
fn programs_on_lb(t: &Topology) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", t.lb_ns(), "link", "show", "eth0"])
        .output()
        .expect("ip link show");
    let text = String::from_utf8_lossy(&out.stdout);
    let ids: Vec<u32> = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(3)
        .filter(|w| w[0].starts_with("prog/xdp") && w[1] == "id")
        .map(|w| w[2].parse().expect("program id"))
        .collect();
    assert!(!ids.is_empty(), "no XDP program on the lb's eth0: {text}");
    ids.iter()
        .map(|id| {
            aya::programs::loaded_programs()
                .filter_map(|p| p.ok())
                .find(|p| p.id() == *id)
                .and_then(|p| p.name_as_str().map(str::to_owned))
                .unwrap_or_else(|| panic!("program {id} on eth0 is not loaded"))
        })
        .collect()
}

/// Waits until the lb's `eth0` runs `name` alone.
fn wait_for_program(t: &Topology, name: &str) {
    retry_until(
        Duration::from_secs(10),
        &format!("{name} on the lb's eth0"),
        || {
            let now = programs_on_lb(t);
            anyhow::ensure!(now == [name], "eth0 runs {now:?}");
            Ok(())
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
}

/// `lbctl trace` against known traffic: every traced packet names the client, the service and
/// the backend that actually answered that client (nginx says which), forwarded with XDP_TX; a
/// second trace while one runs is refused, and a trace whose lbctl goes away stops.
#[test]
fn trace_shows_what_each_packet_got() {
    let t = topology();
    let lbd = start_with_three_backends(&t);
    let sources = t.all_client_sources();
    // Without a trace the interface runs the program without the trace's checks.
    assert_eq!(programs_on_lb(&t), [PROGRAM_NAME]);
    const COUNT: usize = 40;
    let trace = trace_in_background(&lbd, &["web", "--count", &COUNT.to_string()]);
    // Requests until the trace has its packets (it starts once lbd has loaded the traced
    // program: seconds of verification, like lbd's start).
    let mut served: BTreeMap<IpAddr, usize> = BTreeMap::new();
    let deadline = Instant::now() + LBD_START + Duration::from_secs(20);
    let mut i = 0;
    while !trace.is_finished() && Instant::now() < deadline {
        let src = sources[i % sources.len()];
        i += 1;
        let b = t
            .which_backend(src, vip())
            .expect("a request through the VIP");
        assert_eq!(*served.entry(src).or_insert(b), b, "{src} changed backend");
    }
    assert!(
        trace.is_finished(),
        "the trace did not see {COUNT} packets in {} s",
        (LBD_START + Duration::from_secs(20)).as_secs()
    );
    let lines = trace.join().expect("the trace's thread");
    assert_eq!(lines.len(), COUNT, "{lines:?}");
    for l in &lines {
        let client: IpAddr = l["client"].as_str().unwrap().parse().unwrap();
        let got = served
            .get(&client)
            .unwrap_or_else(|| panic!("traced a packet of {client}, who sent none: {l}"));
        assert_eq!(l["vip"], VIP, "{l}");
        assert_eq!(l["port"], 80, "{l}");
        assert_eq!(l["protocol"], "tcp", "{l}");
        assert_eq!(l["service"], "web", "{l}");
        assert_eq!(l["backend"], baddr(*got).to_string(), "{l}");
        assert_eq!(l["action"], "tx", "{l}");
        assert_eq!(l["reason"], "forwarded", "{l}");
        assert_eq!(l["table"], "not-read", "no slot changed: {l}");
        assert!(l["bytes"].as_u64().unwrap() >= 54, "{l}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l["flags"].as_array().unwrap().iter().any(|f| f == "syn")),
        "the connections' SYNs are traced"
    );

    // One trace at a time; the second is refused and says why.
    let mut first = trace_begun(&lbd, &[VIP, "--count", "100000"]);
    // While it runs, the interface runs the traced program (swapped in through the link).
    assert_eq!(programs_on_lb(&t), [TRACED_PROGRAM_NAME]);
    let refused = retry_until(
        Duration::from_secs(10),
        "a second trace to be refused",
        || {
            let out = lbd.lbctl(&["trace", "--count", "1"])?;
            anyhow::ensure!(!out.status.success(), "the second trace ran");
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            anyhow::ensure!(err.contains("a trace is running"), "{err}");
            Ok(err)
        },
    )
    .expect("a second trace refused");
    assert!(refused.contains("one at a time"), "{refused}");
    // The first lbctl goes away: its trace stops, and a new one can run.
    first.kill().expect("killing lbctl trace");
    let _ = first.wait();
    // The trace stops: the program without its checks is back.
    wait_for_program(&t, PROGRAM_NAME);
    let again = trace_in_background(&lbd, &["--count", "2"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !again.is_finished() && Instant::now() < deadline {
        let _ = t.which_backend(sources[0], vip());
    }
    assert_eq!(again.join().expect("the trace's thread").len(), 2);
    // Bad targets.
    let out = lbd.lbctl(&["trace", "nosuch"]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no service named \"nosuch\""));
    let out = lbd.lbctl(&["trace", "198.51.100.99"]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no service has the VIP"));
    let out = lbd.lbctl(&["trace", "web", "--count", "0"]).unwrap();
    assert!(!out.status.success(), "a count of 0 is refused");

    // A denied client's packets: dropped, and the trace says why.
    let denied = sources[1];
    lbd.lbctl_ok(&["service", "deny", "web", &format!("{denied}/32")]);
    let trace = trace_in_background(&lbd, &[VIP, "--count", "1"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !trace.is_finished() && Instant::now() < deadline {
        assert!(
            t.which_backend(denied, vip()).is_err(),
            "denied {denied} was served"
        );
    }
    let lines = trace.join().expect("the trace's thread");
    let l = &lines[0];
    assert_eq!(l["client"], denied.to_string(), "{l}");
    assert_eq!(l["service"], "web", "{l}");
    assert_eq!(l["action"], "drop", "{l}");
    assert_eq!(l["reason"], "denied", "{l}");
    assert!(l["backend"].is_null(), "{l}");
    lbd.lbctl_ok(&["service", "unlist", "web", &format!("{denied}/32")]);

    // Packets on changed slots: backend 1 drained, the slots of its clients change, and their
    // new connections are looked up in the connection table (a SYN misses and is recorded,
    // the rest of the connection finds its record).
    let on_1: Vec<IpAddr> = sources
        .iter()
        .copied()
        .filter(|&s| t.which_backend(s, vip()).expect("a request") == 1)
        .collect();
    assert!(
        !on_1.is_empty(),
        "no client of {} on backend 1",
        sources.len()
    );
    lbd.lbctl_ok(&["backend", "drain", "web", &baddr(1).to_string()]);
    let trace = trace_in_background(&lbd, &["web", "--count", "30"]);
    let mut now_served: BTreeMap<IpAddr, usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    while !trace.is_finished() && Instant::now() < deadline {
        let src = on_1[i % on_1.len()];
        i += 1;
        let b = t.which_backend(src, vip()).expect("a request");
        assert_ne!(b, 1, "{src} reached drained backend 1");
        assert_eq!(
            *now_served.entry(src).or_insert(b),
            b,
            "{src} changed backend"
        );
    }
    let lines = trace.join().expect("the trace's thread");
    assert_eq!(lines.len(), 30, "{lines:?}");
    for l in &lines {
        let client: IpAddr = l["client"].as_str().unwrap().parse().unwrap();
        let got = now_served
            .get(&client)
            .unwrap_or_else(|| panic!("traced a packet of {client}, who sent none: {l}"));
        assert_eq!(l["backend"], baddr(*got).to_string(), "{l}");
        assert_eq!(l["reason"], "forwarded", "{l}");
        assert!(
            l["table"] == "hit" || l["table"] == "miss",
            "a changed slot: {l}"
        );
    }
    for table in ["hit", "miss"] {
        assert!(
            lines.iter().any(|l| l["table"] == table),
            "no packet's table part is {table}: {lines:?}"
        );
    }
    wait_for_program(&t, PROGRAM_NAME);

    // lbd killed while a trace runs: the link keeps the traced program, and the next lbd
    // does not adopt it but swaps the plain one in (no trace's checks left behind).
    let mut running = trace_begun(&lbd, &["--count", "100000"]);
    assert_eq!(programs_on_lb(&t), [TRACED_PROGRAM_NAME]);
    t.kill(lbd.handle).expect("killing lbd");
    let _ = running.kill();
    let _ = running.wait();
    assert_eq!(programs_on_lb(&t), [TRACED_PROGRAM_NAME], "after the kill");
    let again = spawn_lbd(&t, &lbd.paths).expect("starting lbd again");
    let status = again
        .wait_answering(LBD_START)
        .expect("the new lbd answers");
    assert_eq!(status["start"], "upgraded", "{status}");
    assert_eq!(programs_on_lb(&t), [PROGRAM_NAME]);
    // A client of a backend that was never drained keeps it.
    let (&src, &b) = served
        .iter()
        .find(|(_, b)| **b != 1)
        .expect("a client of backend 2 or 3");
    let now = t
        .which_backend(src, vip())
        .expect("served after the restart");
    assert_eq!(now, b, "{src} changed backend");
}
