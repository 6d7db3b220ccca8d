//! End to end over IPv6: a service on an IPv6 VIP next to an IPv4 one in the same lbd, real
//! nginx backends answering over IPv6 (direct server return), real HTTP from 80 IPv6 client
//! addresses; health checks over IPv6 taking a backend out and back in; and a long download
//! that survives a backend being added and weights changing under it, over IPv4 and over
//! IPv6. Needs root (fails loudly without it).
//!
//! Addresses (see the harness's topology module): backend i is 192.0.2.(10+i) and
//! 2001:db8::(10+i), clients' IPv6 sources are 2001:db8:cI::1..=40.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use lb_common::{
    hash,
    maglev::{MaglevBackend, build_table},
    source_slot,
};
use lb_tests::{
    BIG_FILE_SIZE, Topology, TopologyOptions, big_file_contents,
    lbd::{Lbd, LbdPaths, start_lbd},
    require_root, wait_until,
};
use lb_userspace::state::to_addr;
use serde_json::Value;

const VIP4: &str = "203.0.113.10";
const VIP6: &str = "2001:db8::10";
const SEED_HEX: &str = "5f0c1d2e3f4051627384950a1b2c3d4e";
const TABLE_SIZE: u32 = 65_537;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn service(self) -> &'static str {
        match self {
            Family::V4 => "web",
            Family::V6 => "web6",
        }
    }

    fn vip(self) -> SocketAddr {
        let ip = match self {
            Family::V4 => VIP4,
            Family::V6 => VIP6,
        };
        SocketAddr::new(ip.parse().unwrap(), 80)
    }

    /// Address of backend `i` (1-based) as the harness assigns it.
    fn backend(self, t: &Topology, i: usize) -> IpAddr {
        match self {
            Family::V4 => t.backend_addr(i),
            Family::V6 => t.backend_addr_v6(i),
        }
    }

    fn sources(self, t: &Topology, client: usize) -> Vec<IpAddr> {
        match self {
            Family::V4 => t.client_sources(client),
            Family::V6 => t.client_sources_v6(client),
        }
    }
}

/// The 1-based index of backend address `a` (either family).
fn bindex(t: &Topology, a: IpAddr) -> usize {
    (1..=t.backends())
        .find(|&i| t.backend_addr(i) == a || t.backend_addr_v6(i) == a)
        .unwrap_or_else(|| panic!("{a} is not a backend address"))
}

/// `[[service]]` NAME on VIP:80/tcp (dsr) with backends `(index, weight)`.
fn service(t: &Topology, f: Family, backends: &[(usize, u32)]) -> String {
    let mut c = format!(
        "\n[[service]]\nname = \"{}\"\nvip = \"{}\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"dsr\"\n\n",
        f.service(),
        f.vip().ip()
    );
    for &(i, w) in backends {
        c.push_str(&format!(
            "[[service.backend]]\naddress = \"{}\"\nweight = {w}\n\n",
            f.backend(t, i)
        ));
    }
    c
}

fn topology() -> Topology {
    require_root();
    Topology::new(TopologyOptions {
        vips: vec![VIP4.parse().unwrap(), VIP6.parse().unwrap()],
        ..Default::default()
    })
    .expect("building the namespace topology")
}

/// `lbctl --json lookup SERVICE SRC [--port P]`.
fn lookup_json(lbd: &Lbd, service: &str, src: IpAddr, port: Option<u16>) -> Value {
    let src = src.to_string();
    let port = port.map(|p| p.to_string());
    let mut args = vec!["lookup", service, &src];
    if let Some(p) = &port {
        args.extend(["--port", p]);
    }
    lbd.lbctl_json(&args)
        .unwrap_or_else(|e| panic!("{e:#}\nlbd log:\n{}", lbd.log_tail()))
}

/// The backend (1-based index) `lbctl lookup` names for `src`.
fn lookup(t: &Topology, lbd: &Lbd, service: &str, src: IpAddr) -> usize {
    let v = lookup_json(lbd, service, src, None);
    let b = v["backend"]
        .as_str()
        .unwrap_or_else(|| panic!("lookup of {src} names no backend: {v}"));
    bindex(t, b.parse().unwrap())
}

/// The backend (1-based) lb-common's functions choose for `src` among backends 1..=3 of
/// family `f`, all of weight 100: what the data path must do, computed independently of lbd.
fn predicted_backend(t: &Topology, f: Family, src: IpAddr) -> usize {
    let seed = hash::parse_seed(SEED_HEX).unwrap();
    let backends: Vec<MaglevBackend> = (1..=3)
        .map(|i| MaglevBackend {
            id: i as u32,
            addr: to_addr(f.backend(t, i)),
            salt: 0,
            weight: 100,
        })
        .collect();
    let table = build_table(&seed, &backends, TABLE_SIZE);
    let slot = source_slot(&seed, TABLE_SIZE, &to_addr(src)).unwrap();
    table[slot as usize] as usize
}

/// For every client address of family `f`: `lbctl lookup` names a backend, (with `predict`)
/// lb-common predicts the same one for backends 1..=3 of equal weights, and `requests` new
/// connections from that address are all served by it. Returns address -> backend. One thread
/// per client namespace.
fn check_every_client(
    t: &Topology,
    lbd: &Lbd,
    f: Family,
    requests: usize,
    predict: bool,
) -> BTreeMap<IpAddr, usize> {
    let results: Vec<Result<Vec<(IpAddr, usize)>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..=t.clients())
            .map(|c| {
                s.spawn(move || {
                    let mut out = vec![];
                    for src in f.sources(t, c) {
                        let named = lookup(t, lbd, f.service(), src);
                        let predicted = if predict {
                            predicted_backend(t, f, src)
                        } else {
                            named
                        };
                        if named != predicted {
                            return Err(format!(
                                "{src}: lbctl lookup names backend {named}, lb-common predicts {predicted}"
                            ));
                        }
                        for attempt in 0..requests {
                            let got = t.which_backend(src, f.vip()).map_err(|e| {
                                format!("request {attempt} from {src} to {}: {e:#}", f.vip())
                            })?;
                            if got != named {
                                return Err(format!(
                                    "request {attempt} from {src}: served by backend {got}, lbctl lookup names {named}"
                                ));
                            }
                        }
                        out.push((src, named));
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
    map
}

fn per_backend(m: &BTreeMap<IpAddr, usize>) -> BTreeMap<usize, usize> {
    let mut c = BTreeMap::new();
    for &b in m.values() {
        *c.entry(b).or_default() += 1;
    }
    c
}

// ---- 1 ----------------------------------------------------------------------------------------

#[test]
fn ipv6_service_serves_real_http() {
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    let all = [(1, 100), (2, 100), (3, 100)];
    let mut config = paths.daemon_section(&format!("hash_seed = \"{SEED_HEX}\""));
    config.push_str(&service(&t, Family::V6, &all));
    config.push_str(&service(&t, Family::V4, &all));
    let lbd = start_lbd(&t, &config).expect("starting lbd");

    let list = lbd.lbctl_json(&["backend", "list", "web6"]).unwrap();
    let listed: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["address"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed.len(),
        3,
        "backend list web6: {list}\nlbd log:\n{}",
        lbd.log_tail()
    );
    for i in 1..=3 {
        assert!(
            listed.contains(&t.backend_addr_v6(i).to_string().as_str()),
            "{list}"
        );
    }

    // Every IPv6 client address: 5 requests, always the backend lbctl lookup names.
    let sources = t.all_client_sources_v6();
    assert!(
        sources.len() >= 40,
        "{} IPv6 client addresses",
        sources.len()
    );
    let m6 = check_every_client(&t, &lbd, Family::V6, 5, true);
    assert_eq!(m6.len(), sources.len());
    let per6 = per_backend(&m6);
    eprintln!("IPv6 clients per backend: {per6:?}");
    // With three equal weights each backend's share of 80 clients is binomial (mean 26.7,
    // sd 4.2): every backend serves some, none fewer than 4 sd below the mean.
    for b in 1..=3 {
        let n = per6.get(&b).copied().unwrap_or(0);
        assert!(
            n >= 10,
            "backend {b} served {n} of {} IPv6 clients: {per6:?}",
            m6.len()
        );
    }

    // The IPv4 service of the same lbd still works (mixed families).
    let m4 = check_every_client(&t, &lbd, Family::V4, 2, true);
    assert_eq!(m4.len(), t.all_client_sources().len());
    let per4 = per_backend(&m4);
    eprintln!("IPv4 clients per backend: {per4:?}");
    assert_eq!(per4.len(), 3, "{per4:?}");

    // A whole /big over IPv6 through the balancer.
    let src = t.client_sources_v6(2)[17];
    let b = lookup(&t, &lbd, "web6", src);
    let r = t
        .http_get(t.client_ns(2), src, Family::V6.vip(), "/big")
        .expect("GET /big over IPv6");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-backend"), Some(b.to_string().as_str()));
    assert!(r.body == big_file_contents(), "the /big bytes differ");

    // The counters of both services saw the traffic.
    let stats = lbd.lbctl_json(&["stats"]).unwrap();
    for (name, min) in [("web6", m6.len() * 5 * 3), ("web", m4.len() * 2 * 3)] {
        let s = stats["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"] == name)
            .unwrap_or_else(|| panic!("no {name} in {stats}"));
        assert!(
            s["packets"].as_u64().unwrap() >= min as u64,
            "{name}: {stats}"
        );
        for b in s["backends"].as_array().unwrap() {
            assert!(b["packets"].as_u64().unwrap() > 0, "{name}: {stats}");
        }
    }
}

/// Health checks over IPv6: lbd checks the backends at their IPv6 addresses; a backend whose
/// nginx stops goes down and its clients move, and it comes back once nginx does.
#[test]
fn ipv6_health_failover() {
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    let mut config = paths.daemon_section(&format!("hash_seed = \"{SEED_HEX}\""));
    config.push_str(&service(&t, Family::V6, &[(1, 100), (2, 100), (3, 100)]));
    config.push_str(
        "[service.health]\ncheck = \"http\"\npath = \"/healthz\"\ninterval_ms = 200\ntimeout_ms = 100\nrise = 2\nfall = 3\n",
    );
    let lbd = start_lbd(&t, &config).expect("starting lbd");
    let rows = || -> Vec<Value> {
        lbd.lbctl_json(&["backend", "list", "web6"])
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    let state = |i: usize| -> String {
        let a = t.backend_addr_v6(i).to_string();
        rows()
            .iter()
            .find(|r| r["address"] == a)
            .and_then(|r| r["state"].as_str().map(String::from))
            .unwrap_or_default()
    };
    wait_until(
        Duration::from_secs(5),
        "every backend's first IPv6 check to pass",
        || {
            rows()
                .iter()
                .all(|r| r["state"] == "up" && r["last_check_ok"] == true)
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}: {:?}\nlbd log:\n{}", rows(), lbd.log_tail()));
    let before = check_every_client(&t, &lbd, Family::V6, 1, true);

    t.stop_backend_server(2).unwrap();
    wait_until(Duration::from_secs(5), "backend 2 down", || {
        state(2) == "down"
    })
    .unwrap_or_else(|e| panic!("{e:#}: {:?}\nlbd log:\n{}", rows(), lbd.log_tail()));
    let during = check_every_client(&t, &lbd, Family::V6, 1, false);
    assert!(during.values().all(|&b| b != 2), "{during:?}");
    // Clients of the other backends stay where they were.
    for (src, &b) in &before {
        if b != 2 {
            assert_eq!(during[src], b, "{src} moved off a healthy backend");
        }
    }

    t.start_backend_server(2).unwrap();
    wait_until(Duration::from_secs(5), "backend 2 up again", || {
        state(2) == "up"
    })
    .unwrap_or_else(|e| panic!("{e:#}: {:?}\nlbd log:\n{}", rows(), lbd.log_tail()));
    assert_eq!(check_every_client(&t, &lbd, Family::V6, 1, true), before);
}

// ---- 2 ----------------------------------------------------------------------------------------

/// Packets lb has sent to backend address `a` of `service` so far.
fn backend_packets(lbd: &Lbd, service: &str, a: IpAddr) -> u64 {
    let stats = lbd.lbctl_json(&["stats", service]).unwrap();
    stats["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == a.to_string())
        .unwrap_or_else(|| panic!("no {a} in {stats}"))["packets"]
        .as_u64()
        .unwrap()
}

/// A download of /big from client 1, started with backends 1 and 2 and paused after its first
/// part; meanwhile backend 3 is added, the streaming backend's weight goes down to 1 and the
/// other's up to 500. New connections follow the new table at once; the download, read on
/// slowly with a small receive window (so the rest must still cross lb as it goes: every ACK
/// and window update of the client passes through the balancer to the backend), completes
/// byte-exact from the backend it started on.
fn stream_survives_changes(f: Family) {
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    let mut config = paths.daemon_section(&format!("hash_seed = \"{SEED_HEX}\""));
    config.push_str(&service(&t, f, &[(1, 100), (2, 100)]));
    let lbd = start_lbd(&t, &config).expect("starting lbd");
    let svc = f.service();
    let src = f.sources(&t, 1)[0];
    let ns = t.client_ns(1);
    let b = lookup(&t, &lbd, svc, src);
    assert!(b == 1 || b == 2, "lookup names backend {b}");
    assert_eq!(t.which_backend(src, f.vip()).unwrap(), b);

    let mut s = t
        .connect_tcp(ns, Some(src), f.vip(), Duration::from_secs(2))
        .unwrap();
    lb_tests::http::set_recv_buffer(&s, 32 * 1024).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let sport = s.local_addr().unwrap().port();
    s.write_all(
        format!(
            "GET /big HTTP/1.0\r\nHost: {}\r\nUser-Agent: lb-tests\r\nConnection: close\r\n\r\n",
            f.vip()
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
        got.len() < BIG_FILE_SIZE / 2,
        "the download is still in progress"
    );

    // The flow's slot has not changed: it needs no record, the slot's backend is its own.
    let flow = lookup_json(&lbd, svc, src, Some(sport));
    assert_eq!(flow["reason"], "hash", "{flow}");
    assert_eq!(flow["backend"], f.backend(&t, b).to_string(), "{flow}");

    // The changes, each applied to the data path before lbctl returns.
    let other = 3 - b;
    let (b_addr, other_addr, new_addr) = (
        f.backend(&t, b).to_string(),
        f.backend(&t, other).to_string(),
        f.backend(&t, 3).to_string(),
    );
    lbd.lbctl_ok(&["backend", "add", svc, &new_addr]);
    lbd.lbctl_ok(&["backend", "weight", svc, &b_addr, "1"]);
    lbd.lbctl_ok(&["backend", "weight", svc, &other_addr, "500"]);
    let list = lbd.lbctl_json(&["backend", "list", svc]).unwrap();
    let weights: BTreeMap<String, u64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["state"], "up", "{list}");
            (
                r["address"].as_str().unwrap().to_string(),
                r["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        weights,
        BTreeMap::from([
            (b_addr.clone(), 1),
            (other_addr.clone(), 500),
            (new_addr.clone(), 100)
        ])
    );

    // New connections from the same client follow the new table (weight 1 of 601: it is
    // no longer b), the established flow stays on b.
    let now = lookup(&t, &lbd, svc, src);
    assert_ne!(now, b, "lookup still names the backend weighted down to 1");
    for _ in 0..3 {
        assert_eq!(t.which_backend(src, f.vip()).unwrap(), now);
    }
    // Its slot changed: until its next packet the flow has no record and is taken for one
    // older than the change; reading on makes the client acknowledge through lb, which records
    // it on b.
    let flow = lookup_json(&lbd, svc, src, Some(sport));
    assert!(
        ["previous-backend", "connection-table"].contains(&flow["reason"].as_str().unwrap()),
        "{flow}"
    );
    assert_eq!(flow["backend"], f.backend(&t, b).to_string(), "{flow}");
    let read = got.len();
    assert!(
        lb_tests::http::read_until(&mut s, &mut got, read + 256 * 1024),
        "EOF early"
    );
    let flow = lookup_json(&lbd, svc, src, Some(sport));
    assert_eq!(flow["reason"], "connection-table", "{flow}");
    assert_eq!(flow["backend"], b_addr, "{flow}");
    // Each client address still reaches what lookup names, the new backend included.
    let mut seen = BTreeMap::<usize, usize>::new();
    for other_src in f.sources(&t, 2) {
        let expected = lookup(&t, &lbd, svc, other_src);
        assert_eq!(
            t.which_backend(other_src, f.vip()).unwrap(),
            expected,
            "{other_src}"
        );
        *seen.entry(expected).or_default() += 1;
    }
    assert!(
        seen.contains_key(&3),
        "no client on the added backend: {seen:?}"
    );

    // The rest, slowly, with a new connection half way.
    let packets_before = backend_packets(&lbd, svc, f.backend(&t, b));
    assert!(
        got.len() < BIG_FILE_SIZE / 2,
        "the download went on without the reader"
    );
    let mut half_way_checked = false;
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let n = s.read(&mut chunk).unwrap_or_else(|e| {
            panic!(
                "reading the download after {} bytes: {e}\nlbd log:\n{}",
                got.len(),
                lbd.log_tail()
            )
        });
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
        if !half_way_checked && got.len() > BIG_FILE_SIZE / 2 {
            assert_eq!(t.which_backend(src, f.vip()).unwrap(), now);
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
    // The client's ACKs for the rest went through lb to b (counters are summed on read; poll
    // rather than assume the last ones are already in).
    wait_until(Duration::from_secs(5), "b's packet counter to grow", || {
        backend_packets(&lbd, svc, f.backend(&t, b)) > packets_before + 50
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}: {packets_before} -> {}",
            backend_packets(&lbd, svc, f.backend(&t, b))
        )
    });
    eprintln!(
        "{f:?}: streamed from backend {b}; packets lb sent it after the changes: {}; new clients now on {now}; other clients per backend: {seen:?}",
        backend_packets(&lbd, svc, f.backend(&t, b)) - packets_before
    );
}

#[test]
fn stream_survives_backend_add_and_weight_changes() {
    stream_survives_changes(Family::V4);
}

#[test]
fn stream_survives_backend_add_and_weight_changes_v6() {
    stream_survives_changes(Family::V6);
}
