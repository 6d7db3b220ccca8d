//! End to end: real lbd, real XDP on a veth, real nginx backends, real HTTP from many client
//! addresses. Needs root (fails loudly without it).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use lb_common::{
    hash,
    maglev::{MaglevBackend, build_table},
    source_slot,
};
use lb_tests::{
    Topology, TopologyOptions,
    lbd::{LbdPaths, bin, cleanup_lbd, spawn_lbd, start_lbd},
    require_root, retry_until,
};
use lb_userspace::state::to_addr;

const VIP: &str = "203.0.113.10";
const SEED_HEX: &str = "5f0c1d2e3f4051627384950a1b2c3d4e";
const TABLE_SIZE: u32 = 65_537;

fn vip_port(port: u16) -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), port)
}

fn config(paths: &LbdPaths) -> String {
    let mut c = paths.daemon_section(&format!("hash_seed = \"{SEED_HEX}\""));
    c.push_str(&format!(
        r#"
[[service]]
name = "web"
vip = "{VIP}"
port = 80
protocol = "tcp"

[[service.backend]]
address = "192.0.2.11"

[[service.backend]]
address = "192.0.2.12"

[[service.backend]]
address = "192.0.2.13"
"#
    ));
    c
}

fn topology() -> Topology {
    require_root();
    let t = Topology::new(TopologyOptions {
        vips: vec![VIP.parse().unwrap()],
        ..Default::default()
    })
    .expect("building the namespace topology");
    // The LB host owns the VIP too, so traffic to the VIP that lb does not balance (another
    // port) visibly reaches its own stack.
    t.exec_ok(
        t.lb_ns(),
        &["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"],
    )
    .unwrap();
    t
}

/// The backend (1-based, as the servers name themselves) lb-common's functions choose for
/// `src`: what the data path must do, and what `lbctl lookup` will print.
fn predicted_backend(src: IpAddr) -> usize {
    let seed = hash::parse_seed(SEED_HEX).unwrap();
    let backends: Vec<MaglevBackend> = (0..3u32)
        .map(|i| MaglevBackend {
            id: i,
            addr: to_addr(format!("192.0.2.{}", 11 + i).parse().unwrap()),
            salt: 0,
            weight: 100,
        })
        .collect();
    let table = build_table(&seed, &backends, TABLE_SIZE);
    let slot = source_slot(&seed, TABLE_SIZE, &to_addr(src)).unwrap();
    table[slot as usize] as usize + 1
}

#[test]
fn http_through_lb_is_balanced_and_sticky_and_other_traffic_is_untouched() {
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    let lbd = start_lbd(&t, &config(&paths)).expect("starting lbd");

    // Every client address: 5 requests, always the same backend, the predicted one.
    let sources = t.all_client_sources();
    assert!(sources.len() >= 60, "{} client addresses", sources.len());
    let mut per_backend: HashMap<usize, usize> = HashMap::new();
    for &src in &sources {
        let expected = predicted_backend(src);
        for attempt in 0..5 {
            let got = t.which_backend(src, vip_port(80)).unwrap_or_else(|e| {
                panic!(
                    "request {attempt} from {src}: {e:#}\nlbd log:\n{}",
                    lbd.log()
                )
            });
            assert_eq!(
                got, expected,
                "client {src}, request {attempt}: served by backend {got}, lb-common says {expected}"
            );
        }
        *per_backend.entry(expected).or_default() += 1;
    }
    // Balance: with three equal weights each backend's share of 80 clients is binomial
    // (mean 26.7, sd 4.2); every backend serves some, none fewer than 4 sd below the mean.
    for b in 1..=3 {
        let n = per_backend.get(&b).copied().unwrap_or(0);
        assert!(
            n >= 10,
            "backend {b} served {n} of {} clients: {per_backend:?}",
            sources.len()
        );
    }
    eprintln!("clients per backend: {per_backend:?}");

    // Not a VIP, and the VIP on another port: the LB's own stack answers.
    let own = SocketAddr::new(t.lb_addr(), 80);
    t.serve_fixed(t.lb_ns(), own, "lb-host").unwrap();
    t.serve_fixed(t.lb_ns(), vip_port(8080), "lb-vip-8080")
        .unwrap();
    let client_ns = t.client_ns(1);
    let src = t.client_sources(1)[0];
    assert_eq!(
        t.http_get(client_ns, src, own, "/").unwrap().text(),
        "lb-host"
    );
    assert_eq!(
        t.http_get(client_ns, src, vip_port(8080), "/")
            .unwrap()
            .text(),
        "lb-vip-8080"
    );

    // lbctl sees the daemon and the counters the traffic made.
    let status = lbd.lbctl_json(&["status"]).unwrap();
    assert_eq!(status["interfaces"][0]["name"], "eth0");
    assert_eq!(status["interfaces"][0]["mode"], "native");
    let stats = lbd.lbctl_json(&["stats"]).unwrap();
    let web = &stats["services"][0];
    assert_eq!(web["service"], "web");
    assert!(
        web["packets"].as_u64().unwrap() >= (sources.len() * 5 * 3) as u64,
        "{stats}"
    );
    for b in web["backends"].as_array().unwrap() {
        assert!(b["packets"].as_u64().unwrap() > 0, "{stats}");
    }
    let human = lbd.lbctl(&["status"]).unwrap();
    assert!(human.status.success());
    assert!(String::from_utf8_lossy(&human.stdout).contains("INTERFACE"));
}

#[test]
fn lbd_exit_leaves_forwarding_restart_replaces_and_cleanup_removes() {
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    let lbd = start_lbd(&t, &config(&paths)).expect("starting lbd");
    let src = t.client_sources(2)[3];
    let expected = predicted_backend(src);
    assert_eq!(t.which_backend(src, vip_port(80)).unwrap(), expected);

    // SIGTERM: lbd exits 0 and the pinned program goes on balancing.
    let status = lbd.stop().unwrap();
    assert!(
        status.success(),
        "lbd exited with {status}; log:\n{}",
        lbd.log()
    );
    assert!(
        !paths.socket.exists(),
        "the control socket is removed on exit"
    );
    for _ in 0..5 {
        assert_eq!(t.which_backend(src, vip_port(80)).unwrap(), expected);
    }

    // A new lbd over the existing pins takes over in place.
    let again = spawn_lbd(&t, &paths).unwrap();
    again.wait_ready(Duration::from_secs(10)).unwrap();
    let status = again.lbctl_json(&["status"]).unwrap();
    assert_eq!(status["interfaces"][0]["mode"], "adopted", "{status}");
    assert_eq!(t.which_backend(src, vip_port(80)).unwrap(), expected);
    assert!(again.stop().unwrap().success());

    // lbd --cleanup takes lb out of the path: the VIP's port 80 is now the LB host's own
    // (nothing listens there, so the connection is refused), and no pin is left.
    let out = cleanup_lbd(&t, &paths).unwrap();
    assert!(
        out.status.success(),
        "lbd --cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !paths.bpffs_dir.exists(),
        "pins left in {}",
        paths.bpffs_dir.display()
    );
    let after = retry_until(
        Duration::from_secs(5),
        "the VIP to stop being balanced",
        || match t.http_get(t.client_ns(2), src, vip_port(80), "/") {
            Ok(r) => anyhow::bail!("still answered: {}", r.text()),
            Err(e) => Ok(e),
        },
    );
    assert!(after.is_ok(), "{after:?}");
}

#[test]
fn lbd_check_validates_without_touching_the_system() {
    let dir = std::env::temp_dir().join(format!("lb-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[daemon]\ninterfaces = [\"does-not-exist0\"]\nbpffs_dir = \"/sys/fs/bpf/lb-check-never-created\"\n\n[[service]]\nname = \"web\"\nvip = \"203.0.113.10\"\nport = 80\nprotocol = \"tcp\"\n\n[[service.backend]]\naddress = \"192.0.2.11\"\n",
    )
    .unwrap();
    let out = Command::new(bin("lbd"))
        .arg("--check")
        .arg("--config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 service"));
    assert!(!std::path::Path::new("/sys/fs/bpf/lb-check-never-created").exists());

    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[daemon]\ninterfaces = [\"eth0\"]\n\n[[service]]\nname = \"web\"\nvip = \"203.0.113.10\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 1000\n\n[[service.backend]]\naddress = \"2001:db8::1\"\n",
    )
    .unwrap();
    let out = Command::new(bin("lbd"))
        .arg("--check")
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 9") && err.contains("table_size"),
        "{err}"
    );
    assert!(
        err.contains("line 12") && err.contains("backend[0].address"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Requests from a few clients in a loop on another thread until stopped; returns (ok, failed).
fn background_load(t: &Topology, stop: &std::sync::atomic::AtomicBool) -> (usize, Vec<String>) {
    let sources = t.client_sources(1);
    let (mut ok, mut failed) = (0, vec![]);
    let mut i = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && ok + failed.len() < 100_000 {
        let src = sources[i % 8];
        i += 1;
        match t.which_backend(src, vip_port(80)) {
            Ok(b) if b == predicted_backend(src) => ok += 1,
            Ok(b) => failed.push(format!("{src} served by backend {b}")),
            Err(e) => failed.push(format!("{src}: {e:#}")),
        }
    }
    (ok, failed)
}

/// Overwrites the program fingerprint lbd keeps in the pinned CONFIG map, as if another
/// build's program were running.
fn pretend_another_program_runs(paths: &LbdPaths) {
    let pin = paths
        .bpffs_dir
        .join(format!("v{}", lb_common::LAYOUT_VERSION))
        .join(lb_common::maps::CONFIG);
    let map = aya::maps::MapData::from_pin(&pin).unwrap();
    let mut config: aya::maps::Array<_, lb_common::Config> =
        aya::maps::Array::try_from(aya::maps::Map::from_map_data(map).unwrap()).unwrap();
    let mut value = config.get(&0, 0).unwrap();
    value.program_hash ^= 1;
    config.set(0, value, 0).unwrap();
}

#[test]
fn a_new_program_or_map_layout_replaces_the_running_one_without_a_gap() {
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    let first = start_lbd(&t, &config(&paths)).expect("starting lbd");
    let before = first.lbctl_json(&["status"]).unwrap();
    assert_eq!(before["start"], "fresh", "{before}");
    let link = before["interfaces"][0]["link_id"].clone();
    assert!(first.stop().unwrap().success());

    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let load = scope.spawn(|| background_load(&t, &stop));
        // A failing assertion below stops the load too (else the scope would wait for ever).
        let _stop = lb_tests::StopOnDrop(&stop);

        // Same layout, different program: loaded on the same maps, swapped in through the link.
        pretend_another_program_runs(&paths);
        let upgraded = spawn_lbd(&t, &paths).unwrap();
        upgraded.wait_ready(Duration::from_secs(30)).unwrap();
        let status = upgraded.lbctl_json(&["status"]).unwrap();
        assert_eq!(status["start"], "upgraded", "{status}\n{}", upgraded.log());
        assert_ne!(status["program_id"], before["program_id"]);
        assert_eq!(
            status["interfaces"][0]["link_id"], link,
            "the same link, updated in place"
        );
        assert!(upgraded.stop().unwrap().success());

        // Pins of another layout: new maps of this layout, program swapped in one step, the old
        // layout's pins removed afterwards.
        let own = paths
            .bpffs_dir
            .join(format!("v{}", lb_common::LAYOUT_VERSION));
        let old = paths.bpffs_dir.join("v0");
        std::fs::rename(&own, &old).unwrap();
        let replaced = spawn_lbd(&t, &paths).unwrap();
        replaced.wait_ready(Duration::from_secs(30)).unwrap();
        let status = replaced.lbctl_json(&["status"]).unwrap();
        assert!(
            status["start"]["replaced"].is_object(),
            "{status}\n{}",
            replaced.log()
        );
        assert_eq!(status["interfaces"][0]["link_id"], link);
        assert!(!old.exists(), "the old layout's pins are gone");
        assert!(own.exists());
        let src = t.client_sources(2)[0];
        assert_eq!(
            t.which_backend(src, vip_port(80)).unwrap(),
            predicted_backend(src)
        );

        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (ok, failed) = load.join().unwrap();
        assert!(
            failed.is_empty(),
            "{} of {} requests failed or went astray: {:?}",
            failed.len(),
            ok + failed.len(),
            &failed[..failed.len().min(5)]
        );
        assert!(
            ok > 20,
            "only {ok} requests ran across the two replacements"
        );
        eprintln!("{ok} requests across the replacements, none failed");
    });
}

#[test]
fn a_backend_whose_mac_changes_is_followed() {
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    let lbd = start_lbd(&t, &config(&paths)).expect("starting lbd");
    // A client of backend 1.
    let src = t
        .all_client_sources()
        .into_iter()
        .find(|&s| predicted_backend(s) == 1)
        .expect("some client maps to backend 1");
    assert_eq!(t.which_backend(src, vip_port(80)).unwrap(), 1);

    // Backend 1 gets a new MAC (a replaced NIC, a moved VM); the balancer's neighbour entry goes.
    let new_mac = "02:00:00:00:0b:99";
    t.set_backend_mac(1, new_mac).unwrap();
    t.exec_ok(t.lb_ns(), &["ip", "neigh", "flush", "to", "192.0.2.11"])
        .unwrap();

    // The kernel announces the entry's removal; lbd resolves the backend again and the data
    // path follows.
    let followed = lbd.wait_backend_mac("web", "192.0.2.11", new_mac, Duration::from_secs(20));
    assert!(followed.is_ok(), "{followed:?}\nlbd log:\n{}", lbd.log());
    assert_eq!(
        t.which_backend(src, vip_port(80)).unwrap(),
        1,
        "served by backend 1 at its new MAC"
    );
}

#[test]
fn ready_within_ten_seconds_when_many_backends_do_not_answer() {
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    let mut c = config(&paths);
    // 30 backends nobody answers ARP for, besides the three real ones.
    for i in 50..80 {
        c.push_str(&format!(
            "\n[[service.backend]]\naddress = \"192.0.2.{i}\"\n"
        ));
    }
    // SPEC: the socket appears within 10 s whatever the backends do (start_lbd waits 10 s).
    let lbd = start_lbd(&t, &c).expect("lbd ready within 10 s");
    let list = lbd.lbctl_json(&["backend", "list", "web"]).unwrap();
    let rows = list.as_array().unwrap();
    let state = |a: &str| {
        rows.iter()
            .find(|b| b["address"] == a)
            .map(|b| b["state"].clone())
    };
    assert_eq!(state("192.0.2.11"), Some("up".into()));
    assert_eq!(
        state("192.0.2.50"),
        Some("down".into()),
        "unresolved backends take no clients"
    );
    assert!(rows.iter().find(|b| b["address"] == "192.0.2.50").unwrap()["problem"].is_string());
    // Clients are served by the real backends only.
    for &src in t.client_sources(1).iter().take(10) {
        let b = t.which_backend(src, vip_port(80)).unwrap();
        assert!((1..=3).contains(&b));
    }
}

#[test]
fn replacing_a_backend_in_one_reload_serves_its_clients() {
    let t = topology();
    let paths = LbdPaths::for_topology(&t);
    let two = config(&paths).replace("\n[[service.backend]]\naddress = \"192.0.2.13\"\n", "");
    let lbd = start_lbd(&t, &two).expect("starting lbd");
    // One edit: .12 goes, .13 comes (it may take the id .12 had in the data path).
    std::fs::write(&paths.config, two.replace("192.0.2.12", "192.0.2.13")).unwrap();
    t.signal(lbd.handle, libc::SIGHUP).unwrap();
    let reloaded = retry_until(Duration::from_secs(10), "the reload", || {
        let list = lbd.lbctl_json(&["backend", "list", "web"])?;
        let addrs: Vec<String> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["address"].as_str().unwrap().to_owned())
            .collect();
        if addrs == ["192.0.2.11", "192.0.2.13"] {
            Ok(())
        } else {
            anyhow::bail!("{addrs:?}")
        }
    });
    assert!(reloaded.is_ok(), "{reloaded:?}\n{}", lbd.log());
    let mut served = [0usize; 4];
    for &src in &t.all_client_sources() {
        let b = t
            .which_backend(src, vip_port(80))
            .unwrap_or_else(|e| panic!("{src}: {e:#}\n{}", lbd.log()));
        served[b] += 1;
    }
    assert_eq!(
        served[2], 0,
        "the removed backend serves nobody: {served:?}"
    );
    assert!(served[3] > 0 && served[1] > 0, "{served:?}");
}
