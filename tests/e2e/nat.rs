//! End to end, `forwarding = "nat"`: backends that know nothing of the VIP (no VIP on `lo`, no
//! ARP settings) on lb's backend side, their default route via lb, serving on port 8080 behind
//! VIP port 80. Real lbd, real XDP on both of lb's interfaces, real nginx, real TCP.
//!
//! One topology and one set of servers for the file; the cases run in order on it:
//! HTTP from 80 client addresses (the backends see the real client addresses, through health
//! checks that must go to port 8080), IPv6, a backend's own address reached directly (a flow
//! lb does not know: its replies pass to the kernel untouched), a 20 MB download byte-exact
//! across a backend added and its own backend drained, a kept-alive connection across lbd
//! SIGKILLed and restarted, a removed backend's connection reset from the VIP, and path-MTU
//! discovery through NAT (a gateway on the backend side with a
//! smaller MTU towards its backend: its ICMP "fragmentation needed", translated by lb, reaches
//! the client's socket), and one host serving a service on two ports (two backends of one
//! address: clients spread over both, each drained, removed and named on its own, a bare address
//! refused as ambiguous). Needs root.

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    BackendSide, Topology, TopologyOptions,
    http::upload,
    lbd::{LBD_START, Lbd, LbdPaths, cleanup_lbd, spawn_lbd, start_lbd},
    require_root, retry_until,
};
use serde_json::Value;

const VIP: &str = "203.0.113.10";
const VIP6: &str = "2001:db8:100::10";
/// The service of the path-MTU case: a TCP sink behind the far backend.
const VIP_UP: &str = "203.0.113.11";
/// The service of backend 1 on two ports.
const VIP_PAIR: &str = "203.0.113.12";
/// Backend 1's second port (nginx serves both).
const SECOND_PORT: u16 = 8081;
/// lbd's metrics, on its client-side address.
const METRICS: &str = "192.0.2.2:9917";
const UP_PORT: u16 = 9000;
const SINK_PORT: u16 = 9001;
const BACKEND_PORT: u16 = 8080;
/// The service whose replies the counting case checks: backend 1's nginx on a port of its own,
/// so only that case's replies leave it.
const VIP_COUNT: &str = "203.0.113.13";
const COUNT_PORT: u16 = 8082;
/// Size of the download file.
const BIG: usize = 20 << 20;
/// The MTU of the gateway's route to the far backend.
const SMALL_MTU: u32 = 1280;

fn vip() -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), 80)
}

fn vip6() -> SocketAddr {
    SocketAddr::new(VIP6.parse().unwrap(), 80)
}

/// Backends 1 and 2 on lb's side segment (203.0.113.130, .131), backend 3 on the far segment
/// behind gateway 1 (203.0.113.211); two clients with 40 extra addresses of each family.
fn topology() -> Topology {
    require_root();
    let t = Topology::new(TopologyOptions {
        backends: 0,
        clients: 2,
        addresses_per_client: 40,
        vips: vec![],
        start_servers: false,
        backend_side: Some(BackendSide {
            direct: 2,
            gateways: 1,
            behind: 1,
        }),
    })
    .expect("building the namespace topology");
    // NAT backends need nothing of DSR's: the harness's ARP settings go back to the defaults.
    for i in 1..=3 {
        t.exec_ok(
            t.backend_ns(i),
            &[
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.arp_ignore=0",
                "net.ipv4.conf.all.arp_announce=0",
                "net.ipv4.conf.eth0.arp_ignore=0",
                "net.ipv4.conf.eth0.arp_announce=0",
            ],
        )
        .unwrap();
    }
    // Clients reach the VIPs through lb (no backend holds them).
    let lb6 = t.lb_addr_v6().to_string();
    for c in 1..=t.clients() {
        let ns = t.client_ns(c);
        for (vip, via) in [
            (VIP, "192.0.2.2"),
            (VIP_UP, "192.0.2.2"),
            (VIP_COUNT, "192.0.2.2"),
            (VIP_PAIR, "192.0.2.2"),
            (VIP6, &lb6),
        ] {
            t.exec_ok(ns, &["ip", "route", "add", vip, "via", via])
                .unwrap();
        }
        // Small receive buffers keep a slowly read download on the wire to its end.
        t.exec_ok(ns, &["sysctl", "-qw", "net.ipv4.tcp_rmem=4096 32768 65536"])
            .unwrap();
    }
    // The gateway's route to the far segment has a smaller MTU than either end's link: a
    // client's full-size segment to the far backend gets "fragmentation needed" from it.
    let far = t.backend_addr(3);
    t.exec_ok(
        t.gateway_ns(1),
        &[
            "ip",
            "route",
            "replace",
            &format!("{far}/32"),
            "dev",
            "eth1",
            "mtu",
            &SMALL_MTU.to_string(),
        ],
    )
    .unwrap();
    t
}

/// The deterministic 20 MB download.
fn big_contents() -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut v = Vec::with_capacity(BIG);
    while v.len() < BIG {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(BIG);
    v
}

/// nginx on every backend, port 8080 (both families) and 8081 (IPv4): `/` answers with the
/// backend's number, the peer address it sees and the port it was reached on, `/big` is the
/// 20 MB file, `/healthz` the health check.
fn start_backends(t: &Topology) -> PathBuf {
    let big = t.work_dir().join("nat-big");
    std::fs::write(&big, big_contents()).unwrap();
    for i in 1..=3 {
        let dir = t.work_dir().join(format!("nat-nginx{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type text/plain;
    keepalive_timeout 300s;
    server {{
        listen 0.0.0.0:{BACKEND_PORT};
        listen [::]:{BACKEND_PORT} ipv6only=on;
        listen 0.0.0.0:{COUNT_PORT};
        listen 0.0.0.0:{SECOND_PORT};
        add_header X-Backend {i} always;
        location = / {{ return 200 "backend {i} $remote_addr $server_port\n"; }}
        location = /healthz {{ return 200 "ok\n"; }}
        location = /big {{ alias {big}; default_type application/octet-stream; }}
    }}
}}
"#,
            big = big.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let mut cmd = Command::new("nginx");
        cmd.arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-e", "stderr"]);
        t.spawn_nsenter(t.backend_ns(i), &cmd).unwrap();
        let dst = SocketAddr::new(t.backend_addr(i), BACKEND_PORT);
        retry_until(Duration::from_secs(30), &format!("nginx on {dst}"), || {
            t.in_netns(t.backend_ns(i), || {
                TcpStream::connect_timeout(&dst, Duration::from_millis(200))?;
                Ok(())
            })
        })
        .unwrap();
    }
    big
}

/// The health checks of the services that have them: nginx's /healthz on the backend's port.
const HEALTH: &str = "[service.health]\ncheck = \"http\"\npath = \"/healthz\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 1\nfall = 2";

fn config(t: &Topology, paths: &LbdPaths) -> String {
    let b = |i: usize| t.backend_addr(i);
    let b6 = |i: usize| t.backend_addr_v6(i);
    let mut c = paths.daemon_section(&format!("metrics = \"{METRICS}\""));
    c.push_str(&format!(
        r#"
[[service]]
name = "count"
vip = "{VIP_COUNT}"
port = 80
protocol = "tcp"
forwarding = "nat"

[[service.backend]]
address = "{b1}"
port = {COUNT_PORT}

[[service]]
name = "web"
vip = "{VIP}"
port = 80
protocol = "tcp"
forwarding = "nat"

{HEALTH}

[[service.backend]]
address = "{b1}"
port = {BACKEND_PORT}

[[service.backend]]
address = "{b2}"
port = {BACKEND_PORT}

[[service]]
name = "web6"
vip = "{VIP6}"
port = 80
protocol = "tcp"
forwarding = "nat"

[[service.backend]]
address = "{b61}"
port = {BACKEND_PORT}

[[service.backend]]
address = "{b62}"
port = {BACKEND_PORT}

[[service]]
name = "up"
vip = "{VIP_UP}"
port = {UP_PORT}
protocol = "tcp"
forwarding = "nat"

[[service.backend]]
address = "{b3}"
port = {SINK_PORT}

# Backend 1 on two ports: two backends.
[[service]]
name = "pair"
vip = "{VIP_PAIR}"
port = 80
protocol = "tcp"
forwarding = "nat"

{HEALTH}

[[service.backend]]
address = "{b1}"
port = {BACKEND_PORT}

[[service.backend]]
address = "{b1}"
port = {SECOND_PORT}
"#,
        b1 = b(1),
        b2 = b(2),
        b3 = b(3),
        b61 = b6(1),
        b62 = b6(2),
    ));
    c
}

/// The backends of `service` (`lbctl --json backend list`) and their states.
fn states(lbd: &Lbd, service: &str) -> Vec<(String, String)> {
    let v = lbd
        .lbctl_json(&["backend", "list", service])
        .expect("lbctl backend list");
    v.as_array()
        .expect("an array")
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_string(),
                b["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn wait_up(lbd: &Lbd, service: &str, addresses: &[IpAddr]) {
    retry_until(
        Duration::from_secs(20),
        &format!("{addresses:?} of {service} up"),
        || {
            let s = states(lbd, service);
            for a in addresses {
                let a = a.to_string();
                match s.iter().find(|(addr, _)| *addr == a) {
                    Some((_, state)) if state == "up" => {}
                    other => anyhow::bail!("{a}: {other:?} (all: {s:?})"),
                }
            }
            Ok(())
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\nlbd log:\n{}", lbd.log()));
}

/// `GET /` from `src` (a client address) to `dst`: the backend number and the peer address it
/// saw.
fn who(t: &Topology, src: IpAddr, dst: SocketAddr) -> (usize, IpAddr) {
    let ns = t.client_ns_of(src).expect("a client address");
    let reply = t
        .http_get(ns, src, dst, "/")
        .unwrap_or_else(|e| panic!("GET / from {src} to {dst}: {e:#}"));
    assert_eq!(reply.status, 200, "GET / from {src} to {dst}");
    let text = reply.text();
    let mut words = text.split_whitespace();
    assert_eq!(words.next(), Some("backend"), "body {text:?}");
    let n = words.next().and_then(|w| w.parse().ok());
    let peer = words.next().and_then(|w| w.parse().ok());
    match (n, peer) {
        (Some(n), Some(peer)) => (n, peer),
        _ => panic!("GET / from {src} to {dst}: body {text:?}"),
    }
}

/// The value of header `name` in a response head.
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Reads a response head (up to the blank line) from `s`; the body bytes read past it too.
fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            return (head, buf[end + 4..].to_vec());
        }
        let n = s.read(&mut chunk).expect("reading a response head");
        assert!(n > 0, "connection closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Case: every client address reaches a backend through the VIP, the backend sees that very
/// address, and both backends take clients.
fn http_from_many_clients(t: &Topology) {
    let sources = t.all_client_sources();
    assert!(sources.len() >= 64, "{} client addresses", sources.len());
    let mut per_backend = [0usize; 4];
    for &src in &sources {
        let (n, peer) = who(t, src, vip());
        assert_eq!(peer, src, "backend {n} saw {peer} for client {src}");
        assert!(n == 1 || n == 2, "backend {n} is not in the service");
        per_backend[n] += 1;
        // Sticky: the same client again, the same backend.
        assert_eq!(who(t, src, vip()).0, n, "client {src} moved");
    }
    assert!(
        per_backend[1] >= 10 && per_backend[2] >= 10,
        "clients per backend: {per_backend:?}"
    );
}

/// Case: `lbctl trace` of the NAT service names, for each packet, the backend that served its
/// client (the NAT flow's own), forwarded.
fn traced_packets_name_their_backend(t: &Topology, lbd: &Lbd) {
    let sources = t.all_client_sources();
    let mut served: std::collections::BTreeMap<IpAddr, usize> = Default::default();
    let lines = std::thread::scope(|scope| {
        let trace = scope.spawn(|| lbd.lbctl_json(&["trace", "web", "--count", "20"]));
        // The first trace starts once lbd has loaded the traced program (seconds).
        let deadline = std::time::Instant::now()
            + lb_tests::lbd::LBD_START
            + std::time::Duration::from_secs(20);
        let mut i = 0;
        while !trace.is_finished() && std::time::Instant::now() < deadline {
            let src = sources[i % sources.len()];
            i += 1;
            let (n, _) = who(t, src, vip());
            assert_eq!(*served.entry(src).or_insert(n), n, "client {src} moved");
        }
        trace
            .join()
            .expect("the trace's thread")
            .expect("lbctl trace")
    });
    let lines = lines.as_array().expect("an array");
    assert_eq!(lines.len(), 20, "{lines:?}");
    for l in lines {
        let client: IpAddr = l["client"].as_str().unwrap().parse().unwrap();
        let n = served
            .get(&client)
            .unwrap_or_else(|| panic!("traced a packet of {client}, who sent none: {l}"));
        assert_eq!(l["service"], "web", "{l}");
        assert_eq!(l["backend"], t.backend_addr(*n).to_string(), "{l}");
        assert_eq!(l["reason"], "forwarded", "{l}");
        assert!(l["action"] == "tx" || l["action"] == "redirect", "{l}");
    }
}

/// Case: the replies lb sends on are counted per service, byte-exact: what backend 1 sent
/// to a client on the counting service's port (nftables, at its output hook, IP lengths) is
/// what `lbctl stats` and the metrics say the service's replies were (frames: 14 bytes of
/// Ethernet more each). Replies of a flow lb does not know (the client reaching the backend
/// directly) are not counted.
fn replies_are_counted(t: &Topology, lbd: &Lbd) {
    const REQUESTS: u64 = 20;
    let src = t.client_sources(1)[11];
    let ns = t.backend_ns(1);
    let nft = |args: &[&str]| {
        let mut all = vec!["nft"];
        all.extend_from_slice(args);
        t.exec_ok(ns, &all).unwrap()
    };
    nft(&["add", "table", "inet", "lbreply"]);
    nft(&[
        "add",
        "chain",
        "inet",
        "lbreply",
        "out",
        "{ type filter hook output priority 0; }",
    ]);
    let (b1, client, port) = (
        t.backend_addr(1).to_string(),
        src.to_string(),
        COUNT_PORT.to_string(),
    );
    nft(&[
        "add", "rule", "inet", "lbreply", "out", "ip", "saddr", &b1, "ip", "daddr", &client, "tcp",
        "sport", &port, "counter",
    ]);
    // (packets, bytes) backend 1 sent to the client from the counting port.
    let sent = || -> (u64, u64) {
        let out = nft(&["list", "chain", "inet", "lbreply", "out"]);
        let words: Vec<&str> = out.split_whitespace().collect();
        let after = |w: &str| -> u64 {
            let i = words
                .iter()
                .position(|x| *x == w)
                .unwrap_or_else(|| panic!("no {w} in {out}"));
            words[i + 1].parse().unwrap()
        };
        (after("packets"), after("bytes"))
    };
    // (packets, bytes) of the counting service's replies, by lbctl.
    let counted = || -> (u64, u64) {
        let v = lbd
            .lbctl_json(&["stats", "count"])
            .expect("lbctl stats count");
        let svc = &v["services"][0];
        assert_eq!(svc["service"], "count", "{v}");
        (
            svc["reply_packets"].as_u64().expect("reply_packets"),
            svc["reply_bytes"].as_u64().expect("reply_bytes"),
        )
    };
    assert_eq!(sent(), (0, 0), "backend 1 sent nothing yet");
    let before = counted();
    let vip_count = SocketAddr::new(VIP_COUNT.parse().unwrap(), 80);
    for _ in 0..REQUESTS {
        assert_eq!(who(t, src, vip_count), (1, src));
    }
    let (sent_now, counted_now) = retry_until(
        Duration::from_secs(10),
        "the reply counters to match what the backend sent",
        || {
            let (packets, bytes) = sent();
            let c = counted();
            let want = (before.0 + packets, before.1 + bytes + 14 * packets);
            anyhow::ensure!(
                c == want,
                "sent {packets} packets, {bytes} bytes (IP): counted {c:?}, want {want:?}"
            );
            Ok(((packets, bytes), c))
        },
    )
    .unwrap();
    eprintln!(
        "replies of {REQUESTS} requests: backend sent {} packets, {} bytes (IP); lb counted {} packets, {} bytes (frames)",
        sent_now.0,
        sent_now.1,
        counted_now.0 - before.0,
        counted_now.1 - before.1
    );
    // At least a SYN-ACK, the response and the FIN per request.
    assert!(
        sent_now.0 >= 3 * REQUESTS,
        "{REQUESTS} requests, {sent_now:?} sent"
    );
    // `lbctl stats` has the row, and the metrics the same numbers.
    let table = String::from_utf8(lbd.lbctl(&["stats", "count"]).unwrap().stdout).unwrap();
    assert!(
        table.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w == [
                "count",
                "(replies)",
                &counted_now.0.to_string(),
                &counted_now.1.to_string(),
            ]
        }),
        "no replies row {counted_now:?} in:\n{table}"
    );
    let metrics: SocketAddr = METRICS.parse().unwrap();
    let reply = t
        .http_get(t.client_ns(1), t.client_addr(1), metrics, "/metrics")
        .unwrap();
    let text = reply.text();
    let sample = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    };
    assert_eq!(
        (
            sample(r#"lb_service_reply_packets_total{service="count"}"#),
            sample(r#"lb_service_reply_bytes_total{service="count"}"#)
        ),
        (Some(counted_now.0), Some(counted_now.1)),
        "{text}"
    );
    assert!(
        sample(r#"lb_service_reply_packets_total{service="web"}"#).unwrap_or(0) > 0,
        "web's replies: {text}"
    );
    // The client reaching backend 1's counting port directly: replies lb does not know.
    let direct = SocketAddr::new(t.backend_addr(1), COUNT_PORT);
    assert_eq!(who(t, src, direct), (1, src));
    retry_until(Duration::from_secs(10), "the direct replies at nft", || {
        anyhow::ensure!(sent().0 >= sent_now.0 + 3, "{:?}", sent());
        Ok(())
    })
    .unwrap();
    assert_eq!(counted(), counted_now, "replies of a flow lb does not know");
}

/// Case: the same over IPv6.
fn http_over_ipv6(t: &Topology) {
    let sources = t.all_client_sources_v6();
    let mut seen = [0usize; 4];
    for &src in sources.iter().take(24) {
        let (n, peer) = who(t, src, vip6());
        assert_eq!(peer, src, "backend {n} saw {peer} for client {src}");
        seen[n] += 1;
    }
    assert!(
        seen[1] > 0 && seen[2] > 0,
        "IPv6 clients per backend: {seen:?}"
    );
}

/// Case: a client reaching a backend's own address (a flow lb does not know, whose replies
/// come from a NAT backend): lb passes them to the kernel untouched, which routes them on.
fn unknown_flow_passes(t: &Topology) {
    let src = t.client_sources(1)[0];
    let dst = SocketAddr::new(t.backend_addr(1), BACKEND_PORT);
    let (n, peer) = who(t, src, dst);
    assert_eq!(
        (n, peer),
        (1, src),
        "direct to backend 1: answered untranslated"
    );
}

/// Case: a 20 MB download, read slowly, byte-exact while backend 3 is added and the
/// download's own backend is drained; afterwards the client's new connections go elsewhere.
fn download_across_add_and_drain(t: &Topology, lbd: &Lbd) {
    let src = t.client_sources(2)[3];
    let ns = t.client_ns(2);
    let mut s = t
        .connect_tcp(ns, Some(src), vip(), Duration::from_secs(2))
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /big HTTP/1.0\r\nHost: lb\r\n\r\n")
        .unwrap();
    let (head, mut body) = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "head {head:?}");
    let serving: usize = header(&head, "X-Backend").unwrap().parse().unwrap();
    let serving_addr = t.backend_addr(serving).to_string();
    let mut changed = false;
    let mut chunk = vec![0u8; 64 * 1024];
    let began = Instant::now();
    loop {
        if !changed && body.len() >= 2 << 20 {
            let b3 = t.backend_addr(3).to_string();
            lbd.lbctl_ok(&[
                "backend",
                "add",
                "web",
                &b3,
                "--port",
                &BACKEND_PORT.to_string(),
            ]);
            lbd.lbctl_ok(&["backend", "drain", "web", &serving_addr]);
            changed = true;
            // lookup says what the data path does: the flow stays on its drained backend.
            let port = s.local_addr().unwrap().port().to_string();
            let l = lbd
                .lbctl_json(&["lookup", "web", &src.to_string(), "--port", &port])
                .unwrap();
            assert_eq!(
                (l["backend"].as_str(), l["reason"].as_str()),
                (Some(serving_addr.as_str()), Some("nat-flow")),
                "{l}"
            );
        }
        let n = s
            .read(&mut chunk)
            .unwrap_or_else(|e| panic!("download at {} bytes: {e}", body.len()));
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
        // Paced: the download spans the changes.
        std::thread::sleep(Duration::from_millis(2));
        assert!(
            began.elapsed() < Duration::from_secs(120),
            "download too slow"
        );
    }
    assert!(changed, "the download ended before the changes");
    assert_eq!(body.len(), BIG, "downloaded length");
    assert!(body == big_contents(), "the download's bytes differ");
    wait_up(lbd, "web", &[t.backend_addr(3)]);
    // New connections of the client leave the drained backend.
    let (n, _) = who(t, src, vip());
    assert_ne!(
        n, serving,
        "a new connection went to the drained backend {serving}"
    );
}

/// Case: a kept-alive connection whose backend is removed: its next request is answered by
/// another backend's reset, from the VIP (the connection fails at once, no timeout).
fn removed_backend_resets(t: &Topology, lbd: &Lbd) {
    let src = t.client_sources(1)[5];
    let ns = t.client_ns(1);
    let mut s = t
        .connect_tcp(ns, Some(src), vip(), Duration::from_secs(2))
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n";
    s.write_all(request).unwrap();
    let (head, _) = read_head(&mut s);
    let serving: usize = header(&head, "X-Backend").unwrap().parse().unwrap();
    let addr = t.backend_addr(serving).to_string();
    lbd.lbctl_ok(&["backend", "remove", "web", &addr]);
    let began = Instant::now();
    let _ = s.write_all(request);
    let mut buf = [0u8; 4096];
    let result = loop {
        match s.read(&mut buf) {
            Ok(0) => break Ok(0),
            // Leftovers of the first response's body.
            Ok(n) if began.elapsed() < Duration::from_millis(200) && n < 64 => continue,
            other => break other,
        }
    };
    match result {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!(
            "after backend {serving} was removed, the connection's next request got {other:?}, not a reset"
        ),
    }
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "the reset took {:?}",
        began.elapsed()
    );
}

/// Case: a 2 MB upload to the far backend, whose gateway's route has a 1280-byte MTU: the
/// client's full-size segments get "fragmentation needed" from the gateway, which lb
/// translates (the quoted packet back to client → VIP), so the client's path MTU drops and
/// the upload completes.
fn path_mtu_through_nat(t: &Topology) {
    let sink = SocketAddr::new(t.backend_addr(3), SINK_PORT);
    t.serve_sink(t.backend_ns(3), sink).unwrap();
    let src = t.client_sources(1)[7];
    let stream = t
        .connect_tcp(
            t.client_ns(1),
            Some(src),
            SocketAddr::new(VIP_UP.parse().unwrap(), UP_PORT),
            Duration::from_secs(2),
        )
        .unwrap();
    let len = 2 << 20;
    let got = upload(stream, len, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("upload through a smaller MTU: {e:#}"));
    assert_eq!(got, len as u64, "bytes the sink read");
    // The client's kernel learnt the smaller MTU for the VIP.
    let route = t
        .exec_ok(
            t.client_ns(1),
            &["ip", "route", "get", VIP_UP, "from", &src.to_string()],
        )
        .unwrap();
    assert!(
        route.contains(&format!("mtu {SMALL_MTU}")),
        "the client's route to {VIP_UP} has no learnt MTU: {route}"
    );
}

/// Case: lbd SIGKILLed and started again (it adopts the running program and its pinned maps):
/// a kept-alive NAT connection goes on, on its backend, through the restart.
fn flows_survive_a_restart<'t>(t: &'t Topology, lbd: Lbd<'t>, paths: &LbdPaths) -> Lbd<'t> {
    let src = t.client_sources(2)[9];
    let mut s = t
        .connect_tcp(t.client_ns(2), Some(src), vip(), Duration::from_secs(2))
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n";
    let ask = |s: &mut TcpStream| -> String {
        s.write_all(request).unwrap();
        let (head, mut body) = read_head(s);
        let len: usize = header(&head, "Content-Length").unwrap().parse().unwrap();
        while body.len() < len {
            let mut chunk = [0u8; 256];
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "connection closed mid-body");
            body.extend_from_slice(&chunk[..n]);
        }
        assert!(body.starts_with(b"backend "), "body {body:?}");
        header(&head, "X-Backend").unwrap()
    };
    let before = ask(&mut s);
    t.kill(lbd.handle).expect("SIGKILL lbd");
    drop(lbd);
    let again = spawn_lbd(t, paths).expect("starting lbd again");
    let status = again
        .wait_answering(Duration::from_secs(20))
        .expect("the new lbd");
    assert_eq!(status["start"], "adopted", "{status}");
    let after = ask(&mut s);
    assert_eq!(after, before, "the kept-alive connection changed backend");
    again
}

/// The pinned NAT tables' size (`NAT_FLOWS`, `NAT_REPLIES`: the same for both).
fn nat_table_size(paths: &LbdPaths) -> u32 {
    let sizes: Vec<u32> = ["NAT_FLOWS", "NAT_REPLIES"]
        .iter()
        .map(|map| {
            let pin = paths
                .bpffs_dir
                .join(format!("v{}", lb_common::LAYOUT_VERSION))
                .join(map);
            aya::maps::MapInfo::from_pin(&pin)
                .unwrap_or_else(|e| panic!("the pinned {map}: {e}"))
                .max_entries()
        })
        .collect();
    assert_eq!(sizes[0], sizes[1], "NAT_FLOWS and NAT_REPLIES");
    sizes[0]
}

/// Case (last; it replaces lbd): an lbd whose config has no `nat` service and does not set
/// `daemon.nat_entries` makes the NAT tables at their smallest size; a `nat` service added at
/// run time grows them to the default size first (a new program on new tables, swapped into
/// the link), then runs; an lbd restarted on the file that now has it adopts that program.
fn unused_nat_tables_stay_small_until_needed<'t>(
    t: &'t Topology,
    lbd: Lbd<'t>,
    paths: &LbdPaths,
) -> Lbd<'t> {
    lbd.stop().expect("stopping lbd");
    drop(lbd);
    let out = cleanup_lbd(t, paths).expect("lbd --cleanup");
    assert!(out.status.success(), "lbd --cleanup: {out:?}");
    let daemon = paths.daemon_section("");
    assert!(daemon.contains("nat_entries = 16384\n"), "{daemon}");
    let mut config = daemon.replace("nat_entries = 16384\n", "");
    config.push_str(&format!(
        r#"
[[service]]
name = "plain"
vip = "{VIP}"
port = 80
protocol = "tcp"

[[service.backend]]
address = "{}"
"#,
        t.backend_addr(1)
    ));
    let lbd = start_lbd(t, &config).expect("starting lbd without nat");
    assert_eq!(
        nat_table_size(paths),
        lb_common::nat::MIN_NAT_ENTRIES,
        "no nat service"
    );
    let names = |lbd: &Lbd| -> Vec<String> {
        let v = lbd.lbctl_json(&["service", "list"]).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    let program = |lbd: &Lbd| lbd.lbctl_json(&["status"]).unwrap()["program_id"].clone();
    let capacity = |lbd: &Lbd| lbd.lbctl_json(&["stats"]).unwrap()["nat_capacity"].clone();
    assert_eq!(
        capacity(&lbd),
        lb_common::nat::MIN_NAT_ENTRIES,
        "lbctl stats"
    );
    let before = program(&lbd);
    lbd.lbctl_ok(&[
        "service",
        "add",
        "late",
        "--vip",
        VIP_COUNT,
        "--port",
        "80",
        "--protocol",
        "tcp",
        "--forwarding",
        "nat",
    ]);
    assert_eq!(
        nat_table_size(paths),
        lb_common::nat::NAT_ENTRIES,
        "grown for the nat service"
    );
    assert_ne!(
        program(&lbd),
        before,
        "the program on the new tables is the one running"
    );
    assert_eq!(capacity(&lbd), lb_common::nat::NAT_ENTRIES, "lbctl stats");
    lbd.lbctl_ok(&[
        "backend",
        "add",
        "late",
        &t.backend_addr(1).to_string(),
        "--port",
        &COUNT_PORT.to_string(),
    ]);
    assert_eq!(names(&lbd), ["plain", "late"]);
    wait_up(&lbd, "late", &[t.backend_addr(1)]);
    let late = SocketAddr::new(VIP_COUNT.parse().unwrap(), 80);
    let src = t.client_sources(1)[12];
    assert_eq!(who(t, src, late), (1, src));
    let file = std::fs::read_to_string(&paths.config).unwrap();
    assert!(
        file.contains("forwarding = \"nat\""),
        "written through: {file}"
    );
    // Restarted on the file that now has a nat service: the tables are the size it asks for,
    // so the running program is adopted.
    lbd.stop().expect("stopping lbd");
    drop(lbd);
    let again = spawn_lbd(t, paths).expect("starting lbd again");
    let status = again
        .wait_answering(LBD_START)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(status["start"], "adopted", "{status}");
    assert_eq!(nat_table_size(paths), lb_common::nat::NAT_ENTRIES);
    assert_eq!(who(t, src, late), (1, src));
    again
}

/// `GET /` from `src` to `dst`: the backend number, the peer address it saw and the port it was
/// reached on.
fn who_port(t: &Topology, src: IpAddr, dst: SocketAddr) -> (usize, IpAddr, u16) {
    let ns = t.client_ns_of(src).expect("a client address");
    let reply = t
        .http_get(ns, src, dst, "/")
        .unwrap_or_else(|e| panic!("GET / from {src} to {dst}: {e:#}"));
    assert_eq!(reply.status, 200, "GET / from {src} to {dst}");
    let text = reply.text();
    let words: Vec<&str> = text.split_whitespace().collect();
    match words[..] {
        ["backend", n, peer, port] => (
            n.parse().unwrap(),
            peer.parse().unwrap(),
            port.parse().unwrap(),
        ),
        _ => panic!("GET / from {src} to {dst}: body {text:?}"),
    }
}

/// The backends of `service` as `lbctl --json backend list` names them: (name, port, state,
/// weight).
fn named(lbd: &Lbd, service: &str) -> Vec<(String, u16, String, u64)> {
    let v = lbd
        .lbctl_json(&["backend", "list", service])
        .expect("lbctl backend list");
    v.as_array()
        .expect("an array")
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["port"].as_u64().unwrap() as u16,
                b["state"].as_str().unwrap().to_string(),
                b["weight"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Waits until `service`'s backends are exactly `want` (name and state).
fn wait_named(lbd: &Lbd, service: &str, want: &[(String, &str)]) {
    retry_until(
        Duration::from_secs(20),
        &format!("{service}'s backends {want:?}"),
        || {
            let now: Vec<(String, String)> = named(lbd, service)
                .into_iter()
                .map(|(n, _, s, _)| (n, s))
                .collect();
            let want: Vec<(String, String)> = want
                .iter()
                .map(|(n, s)| (n.clone(), s.to_string()))
                .collect();
            anyhow::ensure!(now == want, "now {now:?}");
            Ok(())
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\nlbd log:\n{}", lbd.log_tail()));
}

/// One request on a kept-alive connection: the port the backend was reached on.
fn ask_port(s: &mut TcpStream) -> u16 {
    s.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n").unwrap();
    let (head, mut body) = read_head(s);
    let len: usize = header(&head, "Content-Length").unwrap().parse().unwrap();
    while body.len() < len {
        let mut chunk = [0u8; 256];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&body).to_string();
    text.split_whitespace()
        .nth(3)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("body {text:?}"))
}

/// The weights the config file holds for `service`'s backends, by port (written through).
fn file_weights(paths: &LbdPaths, service: &str) -> Vec<(u16, u32)> {
    let text = std::fs::read_to_string(&paths.config).unwrap();
    let c = lb_userspace::config::parse(&text)
        .unwrap_or_else(|p| panic!("the written config: {p:?}"))
        .config;
    let s = c.services.iter().find(|s| s.name == service).unwrap();
    s.backends
        .iter()
        .map(|b| (b.port_or(s.port), b.weight))
        .collect()
}

/// Case: backend 1 serves service `pair` on two ports, two backends of one address. Clients
/// spread over both; lookup, trace, stats and metrics name each with its port (other services'
/// names stay bare addresses); a bare address is refused as ambiguous, naming both ports; one
/// port is drained (its established connection goes on, new clients take the other), undrained
/// (its clients come back: the same table), and removed (the other stays, named by its address
/// again); a SIGHUP that adds the port back brings both.
fn one_host_on_two_ports(t: &Topology, lbd: &Lbd, paths: &LbdPaths) {
    let b1 = t.backend_addr(1);
    let b1s = b1.to_string();
    let name = |port: u16| format!("{b1}:{port}");
    let pair = SocketAddr::new(VIP_PAIR.parse().unwrap(), 80);
    // Each is checked on its own port and listed with its name.
    wait_named(
        lbd,
        "pair",
        &[(name(BACKEND_PORT), "up"), (name(SECOND_PORT), "up")],
    );

    // Clients spread over both ports.
    let sources = t.all_client_sources();
    let mut port_of = std::collections::BTreeMap::new();
    let mut per_port = std::collections::BTreeMap::<u16, usize>::new();
    for &src in &sources {
        let (n, peer, port) = who_port(t, src, pair);
        assert_eq!((n, peer), (1, src), "client {src}");
        port_of.insert(src, port);
        *per_port.entry(port).or_default() += 1;
    }
    eprintln!(
        "pair: {} client addresses per port of {b1}: {per_port:?}",
        sources.len()
    );
    assert!(
        per_port.get(&BACKEND_PORT) >= Some(&10) && per_port.get(&SECOND_PORT) >= Some(&10),
        "clients per port: {per_port:?}"
    );
    // lookup names the port each client reaches.
    for &src in sources.iter().take(12) {
        let l = lbd
            .lbctl_json(&["lookup", "pair", &src.to_string()])
            .unwrap();
        let port = port_of[&src];
        assert_eq!(l["backend"], b1s, "{l}");
        assert_eq!(l["backend_port"], port, "{l}");
        assert_eq!(l["backend_name"], name(port), "{l}");
    }
    // So does trace, packet by packet.
    let lines = std::thread::scope(|scope| {
        let trace = scope.spawn(|| lbd.lbctl_json(&["trace", "pair", "--count", "10"]));
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut i = 0;
        while !trace.is_finished() && Instant::now() < deadline {
            let src = sources[i % sources.len()];
            i += 1;
            assert_eq!(
                who_port(t, src, pair).2,
                port_of[&src],
                "client {src} moved"
            );
        }
        trace
            .join()
            .expect("the trace's thread")
            .expect("lbctl trace")
    });
    for l in lines.as_array().expect("an array") {
        let client: IpAddr = l["client"].as_str().unwrap().parse().unwrap();
        assert_eq!(l["backend_port"], port_of[&client], "{l}");
        assert_eq!(l["backend_name"], name(port_of[&client]), "{l}");
    }
    // stats and metrics: one row and one series per port; web's backends keep their labels.
    let stats = lbd.lbctl_json(&["stats", "pair"]).unwrap();
    let rows: Vec<(String, u64)> = stats["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().into(),
                b["packets"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
        [name(BACKEND_PORT), name(SECOND_PORT)],
        "{stats}"
    );
    assert!(rows.iter().all(|r| r.1 > 0), "{stats}");
    let metrics = t
        .http_get(
            t.client_ns(1),
            t.client_addr(1),
            METRICS.parse().unwrap(),
            "/metrics",
        )
        .expect("GET /metrics")
        .text()
        .into_owned();
    for series in [
        format!(
            "lb_backend_up{{service=\"pair\",backend=\"{}\"}} 1",
            name(BACKEND_PORT)
        ),
        format!(
            "lb_backend_up{{service=\"pair\",backend=\"{}\"}} 1",
            name(SECOND_PORT)
        ),
        format!("lb_backend_up{{service=\"web\",backend=\"{b1}\"}} 1"),
    ] {
        assert!(metrics.contains(&series), "no {series} in:\n{metrics}");
    }

    // A bare address names two backends: refused, naming both ports; nothing changes.
    for cmd in [
        vec!["backend", "drain", "pair", &b1s],
        vec!["backend", "remove", "pair", &b1s, "--dry-run"],
        vec!["backend", "weight", "pair", &b1s, "50"],
    ] {
        let out = lbd.lbctl(&cmd).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.contains(&format!("ports {BACKEND_PORT}, {SECOND_PORT}"))
                && err.contains("--port"),
            "lbctl {cmd:?}: {} {err}",
            out.status
        );
    }
    let out = lbd
        .lbctl(&["backend", "drain", "pair", &b1s, "--port", "9999"])
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no backend"),
        "{out:?}"
    );
    assert_eq!(
        file_weights(paths, "pair"),
        [(BACKEND_PORT, 100), (SECOND_PORT, 100)]
    );

    // Drain the second port: its established connection goes on, new clients take the first.
    let on_second = *port_of.iter().find(|(_, p)| **p == SECOND_PORT).unwrap().0;
    let mut kept = t
        .connect_tcp(
            t.client_ns_of(on_second).unwrap(),
            Some(on_second),
            pair,
            Duration::from_secs(2),
        )
        .unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(ask_port(&mut kept), SECOND_PORT);
    let port = SECOND_PORT.to_string();
    lbd.lbctl_ok(&["backend", "drain", "pair", &b1s, "--port", &port]);
    wait_named(
        lbd,
        "pair",
        &[(name(BACKEND_PORT), "up"), (name(SECOND_PORT), "draining")],
    );
    assert_eq!(
        file_weights(paths, "pair"),
        [(BACKEND_PORT, 100), (SECOND_PORT, 0)]
    );
    assert_eq!(
        ask_port(&mut kept),
        SECOND_PORT,
        "the drained port's connection moved"
    );
    for &src in sources.iter().take(24) {
        assert_eq!(who_port(t, src, pair).2, BACKEND_PORT, "client {src}");
    }
    drop(kept);

    // Undrained by its name: its clients come back (the table is the one it was).
    lbd.lbctl_ok(&["backend", "undrain", "pair", &name(SECOND_PORT)]);
    wait_named(
        lbd,
        "pair",
        &[(name(BACKEND_PORT), "up"), (name(SECOND_PORT), "up")],
    );
    for &src in sources.iter().take(24) {
        assert_eq!(who_port(t, src, pair).2, port_of[&src], "client {src}");
    }

    // Remove the first port: the second stays, and its address alone names it again.
    let first = BACKEND_PORT.to_string();
    lbd.lbctl_ok(&["backend", "remove", "pair", &b1s, "--port", &first]);
    wait_named(lbd, "pair", &[(b1s.clone(), "up")]);
    assert_eq!(named(lbd, "pair")[0].1, SECOND_PORT);
    for &src in sources.iter().take(24) {
        assert_eq!(who_port(t, src, pair).2, SECOND_PORT, "client {src}");
    }
    lbd.lbctl_ok(&["backend", "weight", "pair", &b1s, "60"]);
    assert_eq!(file_weights(paths, "pair"), [(SECOND_PORT, 60)]);

    // The first port back through the file and a SIGHUP (pair is the file's last service).
    let mut text = std::fs::read_to_string(&paths.config).unwrap();
    text.push_str(&format!(
        "\n[[service.backend]]\naddress = \"{b1}\"\nport = {BACKEND_PORT}\n"
    ));
    std::fs::write(&paths.config, text).unwrap();
    let log = lbd.reload(Duration::from_secs(10)).unwrap();
    assert!(
        log.contains(&format!(
            "service pair: backend {} added",
            name(BACKEND_PORT)
        )),
        "{log}"
    );
    wait_named(
        lbd,
        "pair",
        &[(name(SECOND_PORT), "up"), (name(BACKEND_PORT), "up")],
    );
    let mut ports = std::collections::BTreeSet::new();
    for &src in &sources {
        ports.insert(who_port(t, src, pair).2);
    }
    assert_eq!(
        ports.into_iter().collect::<Vec<_>>(),
        [BACKEND_PORT, SECOND_PORT]
    );
}

#[test]
fn nat_forwarding_end_to_end() {
    let t = topology();
    start_backends(&t);
    let paths = LbdPaths::for_topology(&t);
    let lbd = start_lbd(&t, &config(&t, &paths)).expect("starting lbd");
    // The health checks reach nginx on 8080 (it listens nowhere else).
    wait_up(&lbd, "web", &[t.backend_addr(1), t.backend_addr(2)]);
    let list: Value = lbd.lbctl_json(&["backend", "list", "web"]).unwrap();
    assert_eq!(list[0]["port"], BACKEND_PORT, "{list}");
    // The NAT tables have the size the config asks for (the harness's nat_entries).
    for map in ["NAT_FLOWS", "NAT_REPLIES"] {
        let pin = paths
            .bpffs_dir
            .join(format!("v{}", lb_common::LAYOUT_VERSION))
            .join(map);
        let info = aya::maps::MapInfo::from_pin(&pin).expect("the pinned NAT table");
        assert_eq!(info.max_entries(), 16_384, "{map}");
    }

    http_from_many_clients(&t);
    traced_packets_name_their_backend(&t, &lbd);
    replies_are_counted(&t, &lbd);
    one_host_on_two_ports(&t, &lbd, &paths);
    http_over_ipv6(&t);
    unknown_flow_passes(&t);
    path_mtu_through_nat(&t);
    let lbd = flows_survive_a_restart(&t, lbd, &paths);
    download_across_add_and_drain(&t, &lbd);
    removed_backend_resets(&t, &lbd);
    let _lbd = unused_nat_tables_stay_small_until_needed(&t, lbd, &paths);
}

// ---- data-path fixtures (BPF_PROG_TEST_RUN): both directions and malformed frames ----------

mod fixtures {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use etherparse::PacketBuilder;
    use lb_common::{
        Backend, ServiceKey, ServiceValue, backend_flags,
        maglev::{MaglevBackend, build_table},
        service_flags,
    };
    use lb_tests::{
        cases::{Case, run_cases},
        dpfixture::{CLIENT_MAC, Fixture, LB_MAC, SEED, TABLE, XDP_TX, mac},
        packet::{
            checksum, icmp_frag_needed, icmpv6_too_big, ipv4_tcp, ipv4_udp, ipv6_tcp, verify,
        },
    };
    use lb_userspace::state::{family, to_addr};

    const NAT_VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 40);
    const NAT_VIP_UDP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 41);
    const NAT_VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x40);
    const NAT_VIP6_UDP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x41);
    const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 250);
    const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x250);
    const BPORT: u16 = 8080;
    const UDP_BPORT: u16 = 5353;

    fn c4(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, i)
    }

    fn c6(i: u16) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, i)
    }

    /// The shared fixture's five services, and four `nat` ones: IPv4 TCP (ids 5; backends
    /// 192.0.2.41, .42 on 8080), IPv6 TCP (6; 2001:db8::41, ::42 on 8080), IPv4 UDP (7;
    /// 192.0.2.43 on 5353), IPv6 UDP (8; 2001:db8::44 on 5353).
    struct Nat {
        f: Fixture,
        /// Per NAT service: its backend ids.
        ids: Vec<Vec<u32>>,
    }

    fn nat_fixture() -> Nat {
        let mut f = lb_tests::dpfixture::fixture("nat");
        let mut next = f.backend_ids(4).end;
        let v4 = |last: u8| IpAddr::V4(Ipv4Addr::new(192, 0, 2, last));
        let v6 = |last: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last));
        let services: [(u32, IpAddr, u8, u16, Vec<IpAddr>); 4] = [
            (5, NAT_VIP.into(), 6, BPORT, vec![v4(41), v4(42)]),
            (6, NAT_VIP6.into(), 6, BPORT, vec![v6(0x41), v6(0x42)]),
            (7, NAT_VIP_UDP.into(), 17, UDP_BPORT, vec![v4(43)]),
            (8, NAT_VIP6_UDP.into(), 17, UDP_BPORT, vec![v6(0x44)]),
        ];
        let mut ids = vec![];
        let mut nat_addrs = vec![];
        for (sid, vip, proto, bport, backends) in services {
            let mut live = vec![];
            let mut these = vec![];
            for addr in backends {
                let b = Backend {
                    addr: to_addr(addr),
                    mac: mac(next),
                    port: bport.to_be(),
                    src_mac: LB_MAC,
                    ifindex: 1,
                    service: sid,
                    family: family(addr),
                    flags: backend_flags::VALID,
                    mtu: 1500,
                    ..Default::default()
                };
                f.dp.set_backend(next, &b).unwrap();
                live.push(MaglevBackend {
                    id: next,
                    addr: b.addr,
                    salt: 0,
                    weight: 100,
                });
                nat_addrs.push(b.addr);
                these.push(next);
                next += 1;
            }
            let key = ServiceKey {
                addr: to_addr(vip),
                port: if proto == 6 { 80u16 } else { 53 }.to_be(),
                proto,
                family: family(vip),
            };
            let value = ServiceValue {
                id: sid,
                flags: service_flags::NAT,
                table_size: TABLE,
                _pad: 0,
            };
            f.dp.set_service(&key, &value, &build_table(&SEED, &live, TABLE))
                .unwrap();
            ids.push(these);
        }
        f.dp.set_nat_filter(&nat_addrs).unwrap();
        Nat { f, ids }
    }

    fn ok(what: &str, frame: &[u8]) {
        if let Err(e) = verify(frame) {
            panic!("{what}: {e}");
        }
    }

    fn v4_at(frame: &[u8], at: usize) -> Ipv4Addr {
        Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3])
    }

    fn port_at(frame: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([frame[at], frame[at + 1]])
    }

    /// The backend (id, address) a request left for: its MAC names the id.
    fn backend_of(_: &Nat, out: &[u8]) -> u32 {
        let id = out[5] as u32;
        assert_eq!(out[0..6], mac(id), "destination MAC");
        assert_eq!(out[6..12], LB_MAC, "source MAC");
        id
    }

    #[test]
    fn nat_requests_and_replies_are_rewritten_both_ways() {
        let n = nat_fixture();
        let f = &n.f;
        for i in 1..=16u8 {
            let client = c4(i);
            let syn = ipv4_tcp(CLIENT_MAC, LB_MAC, client, NAT_VIP, 40000, 80, 0x02, &[]);
            let (action, out) = f.run(&syn.bytes);
            assert_eq!(action, XDP_TX, "request from {client}");
            let id = backend_of(&n, &out);
            assert!(n.ids[0].contains(&id), "backend {id}");
            let backend = Ipv4Addr::new(192, 0, 2, 41 + (id - n.ids[0][0]) as u8);
            assert_eq!(v4_at(&out, 26), client, "the client's address is kept");
            assert_eq!(v4_at(&out, 30), backend, "destination");
            assert_eq!(port_at(&out, 34), 40000, "source port");
            assert_eq!(port_at(&out, 36), BPORT, "destination port");
            ok("request", &out);
            // The flow's next segment, with data: the same backend.
            let data = ipv4_tcp(
                CLIENT_MAC, LB_MAC, client, NAT_VIP, 40000, 80, 0x18, b"GET /",
            );
            let (_, out) = f.run(&data.bytes);
            assert_eq!(backend_of(&n, &out), id);
            ok("request with data", &out);

            // The reply, from the backend to the client: from the VIP, to the client's MAC.
            let reply = ipv4_tcp(
                mac(id),
                LB_MAC,
                backend,
                client,
                BPORT,
                40000,
                0x12,
                b"HTTP",
            );
            let (action, out) = f.run(&reply.bytes);
            assert_eq!(action, XDP_TX, "reply to {client}");
            assert_eq!(out[0..6], CLIENT_MAC, "reply's destination MAC");
            assert_eq!(out[6..12], LB_MAC, "reply's source MAC");
            assert_eq!(v4_at(&out, 26), NAT_VIP, "reply's source");
            assert_eq!(v4_at(&out, 30), client, "reply's destination");
            assert_eq!(port_at(&out, 34), 80, "reply's source port");
            assert_eq!(port_at(&out, 36), 40000, "reply's destination port");
            assert_eq!(&out[54..], b"HTTP");
            ok("reply", &out);

            // An ICMP "fragmentation needed" from a router on the backend side about the
            // request: the quoted packet becomes client → VIP:80, sent to the client.
            let icmp = icmp_frag_needed(
                mac(id),
                LB_MAC,
                ROUTER,
                client,
                client,
                backend,
                40000,
                BPORT,
                1280,
            );
            let (action, out) = f.run(&icmp.bytes);
            assert_eq!(action, XDP_TX, "ICMP about a request");
            assert_eq!(out[0..6], CLIENT_MAC);
            assert_eq!(
                v4_at(&out, 26),
                ROUTER,
                "the router stays the error's source"
            );
            assert_eq!(v4_at(&out, 30), client);
            let q = 14 + 20 + 8;
            assert_eq!(v4_at(&out, q + 12), client, "quoted source");
            assert_eq!(v4_at(&out, q + 16), NAT_VIP, "quoted destination");
            assert_eq!(port_at(&out, q + 22), 80, "quoted destination port");
            assert_eq!(
                checksum(&out[q..q + 20], 0),
                0,
                "quoted IPv4 header checksum"
            );
            ok("ICMP about a request", &out);

            // And one from the client side about a reply (VIP:80 → client): it reaches the
            // backend, as backend:8080 → client.
            let icmp = icmp_frag_needed(
                CLIENT_MAC, LB_MAC, ROUTER, NAT_VIP, NAT_VIP, client, 80, 40000, 1280,
            );
            let (action, out) = f.run(&icmp.bytes);
            assert_eq!(action, XDP_TX, "ICMP about a reply");
            assert_eq!(backend_of(&n, &out), id, "to the flow's backend");
            assert_eq!(v4_at(&out, 30), backend, "outer destination");
            assert_eq!(v4_at(&out, q + 12), backend, "quoted source");
            assert_eq!(port_at(&out, q + 20), BPORT, "quoted source port");
            assert_eq!(
                checksum(&out[q..q + 20], 0),
                0,
                "quoted IPv4 header checksum"
            );
            ok("ICMP about a reply", &out);
        }
    }

    #[test]
    fn nat_over_ipv6_and_udp() {
        let n = nat_fixture();
        let f = &n.f;
        let client = c6(7);
        let syn = ipv6_tcp(CLIENT_MAC, LB_MAC, client, NAT_VIP6, 40000, 80, 0x02, &[]);
        let (action, out) = f.run(&syn.bytes);
        assert_eq!(action, XDP_TX);
        let id = backend_of(&n, &out);
        assert!(n.ids[1].contains(&id));
        let backend = Ipv6Addr::new(
            0x2001,
            0xdb8,
            0,
            0,
            0,
            0,
            0,
            0x41 + (id - n.ids[1][0]) as u16,
        );
        assert_eq!(out[22..38], client.octets());
        assert_eq!(out[38..54], backend.octets());
        assert_eq!(port_at(&out, 56), BPORT);
        ok("IPv6 request", &out);
        let reply = ipv6_tcp(mac(id), LB_MAC, backend, client, BPORT, 40000, 0x12, &[]);
        let (action, out) = f.run(&reply.bytes);
        assert_eq!(action, XDP_TX);
        assert_eq!(out[22..38], NAT_VIP6.octets());
        assert_eq!(port_at(&out, 54), 80);
        ok("IPv6 reply", &out);
        // ICMPv6 "packet too big" both ways.
        let tb = icmpv6_too_big(
            mac(id),
            LB_MAC,
            ROUTER6,
            client,
            client,
            backend,
            40000,
            BPORT,
            1280,
        );
        let (action, out) = f.run(&tb.bytes);
        assert_eq!(action, XDP_TX, "ICMPv6 about a request");
        let q = 14 + 40 + 8;
        assert_eq!(out[q + 24..q + 40], NAT_VIP6.octets(), "quoted destination");
        assert_eq!(port_at(&out, q + 40 + 2), 80);
        ok("ICMPv6 about a request", &out);
        let tb = icmpv6_too_big(
            CLIENT_MAC, LB_MAC, ROUTER6, NAT_VIP6, NAT_VIP6, client, 80, 40000, 1280,
        );
        let (action, out) = f.run(&tb.bytes);
        assert_eq!(action, XDP_TX, "ICMPv6 about a reply");
        assert_eq!(out[38..54], backend.octets(), "outer destination");
        assert_eq!(out[q + 8..q + 24], backend.octets(), "quoted source");
        assert_eq!(port_at(&out, q + 40), BPORT);
        ok("ICMPv6 about a reply", &out);

        // UDP over IPv4: a checksum stays right, and a zero checksum (none) stays zero.
        let client = c4(9);
        let dgram = ipv4_udp(CLIENT_MAC, LB_MAC, client, NAT_VIP_UDP, 5000, 53, b"query");
        let (action, out) = f.run(&dgram.bytes);
        assert_eq!(action, XDP_TX);
        assert_eq!(port_at(&out, 36), UDP_BPORT);
        assert_ne!(port_at(&out, 40), 0);
        ok("UDP request", &out);
        let mut unsummed = dgram.bytes.clone();
        unsummed[40..42].copy_from_slice(&[0, 0]);
        let (action, out) = f.run(&unsummed);
        assert_eq!(action, XDP_TX);
        assert_eq!(port_at(&out, 40), 0, "a zero UDP checksum stays zero");
        assert_eq!(v4_at(&out, 30), Ipv4Addr::new(192, 0, 2, 43));
        ok("UDP request without checksum", &out);
        let reply = ipv4_udp(
            mac(n.ids[2][0]),
            LB_MAC,
            Ipv4Addr::new(192, 0, 2, 43),
            client,
            UDP_BPORT,
            5000,
            b"answer",
        );
        let (action, out) = f.run(&reply.bytes);
        assert_eq!(action, XDP_TX);
        assert_eq!(v4_at(&out, 26), NAT_VIP_UDP);
        assert_eq!(port_at(&out, 34), 53);
        ok("UDP reply", &out);
    }

    #[test]
    fn nat_frames_lb_does_not_know_or_cannot_read_pass_untouched() {
        let n = nat_fixture();
        let f = &n.f;
        let client = c4(30);
        let b1 = Ipv4Addr::new(192, 0, 2, 41);
        // A flow, so that the backend has replies lb knows.
        let syn = ipv4_tcp(CLIENT_MAC, LB_MAC, client, NAT_VIP, 41000, 80, 0x02, &[]);
        let (_, out) = f.run(&syn.bytes);
        let id = backend_of(&n, &out);
        let backend = Ipv4Addr::new(192, 0, 2, 41 + (id - n.ids[0][0]) as u8);
        let reply = ipv4_tcp(mac(id), LB_MAC, backend, client, BPORT, 41000, 0x10, b"x");
        let mut cases = vec![
            Case::passes(
                "reply of a flow lb does not know (other client port)",
                ipv4_tcp(mac(id), LB_MAC, backend, client, BPORT, 41001, 0x10, b"x").bytes,
            ),
            Case::passes(
                "reply from another port of the backend",
                ipv4_tcp(mac(id), LB_MAC, backend, client, 22, 41000, 0x10, b"x").bytes,
            ),
            Case::passes(
                "a NAT backend's own traffic to elsewhere",
                ipv4_tcp(mac(id), LB_MAC, b1, c4(200), 33000, 443, 0x02, &[]).bytes,
            ),
            Case::passes(
                "ICMP about a flow lb does not know",
                icmp_frag_needed(
                    mac(id),
                    LB_MAC,
                    ROUTER,
                    client,
                    client,
                    backend,
                    41009,
                    BPORT,
                    1280,
                )
                .bytes,
            ),
        ];
        for len in 14..reply.bytes.len() {
            cases.push(Case::passes(
                format!("reply cut at {len}"),
                &reply.bytes[..len],
            ));
        }
        let request = ipv4_tcp(
            CLIENT_MAC, LB_MAC, client, NAT_VIP, 41000, 80, 0x18, b"GET /",
        );
        for len in 14..request.bytes.len() {
            cases.push(Case::passes(
                format!("request cut at {len}"),
                &request.bytes[..len],
            ));
        }
        let replies = f.dp.service_reply_counter(5);
        run_cases("nat-untouched", &cases, |frame| f.run(frame));
        assert_eq!(
            f.dp.service_reply_counter(5),
            replies,
            "frames passed untouched are not counted as replies"
        );
        // The whole reply is still translated (the cases changed nothing), and counted: one
        // packet, its frame's bytes.
        let (action, out) = f.run(&reply.bytes);
        assert_eq!(action, XDP_TX);
        assert_eq!(v4_at(&out, 26), NAT_VIP);
        let after = f.dp.service_reply_counter(5);
        assert_eq!(
            (after.packets, after.bytes),
            (replies.packets + 1, replies.bytes + out.len() as u64),
            "the reply's count"
        );
        // The service's requests are counted apart from its replies.
        assert!(f.dp.service_counter(5).packets >= 1);
        assert_eq!(
            f.dp.service_reply_counter(7).packets,
            0,
            "another service's"
        );
    }

    #[test]
    fn a_tagged_clients_replies_leave_with_its_tag() {
        let n = nat_fixture();
        let f = &n.f;
        let client = c4(70);
        // The request comes tagged (VLAN 7) and leaves untagged, as the backend is reached.
        let syn = ipv4_tcp(CLIENT_MAC, LB_MAC, client, NAT_VIP, 44000, 80, 0x02, &[]).with_vlan(7);
        let (action, out) = f.run(&syn.bytes);
        assert_eq!(action, XDP_TX);
        assert_eq!(out[12..14], [0x08, 0x00], "untagged towards the backend");
        let id = backend_of(&n, &out);
        let backend = Ipv4Addr::new(192, 0, 2, 41 + (id - n.ids[0][0]) as u8);
        ok("tagged request", &out);
        // The untagged reply gets the client's tag back.
        let reply = ipv4_tcp(mac(id), LB_MAC, backend, client, BPORT, 44000, 0x12, b"ok");
        let (action, out) = f.run(&reply.bytes);
        assert_eq!(action, XDP_TX);
        assert_eq!(out[0..6], CLIENT_MAC);
        assert_eq!(out[6..12], LB_MAC);
        assert_eq!(out[12..14], [0x81, 0x00], "tagged towards the client");
        assert_eq!(u16::from_be_bytes([out[14], out[15]]) & 0x0fff, 7, "VLAN 7");
        assert_eq!(out[16..18], [0x08, 0x00]);
        ok("tagged reply", &out);
        assert_eq!(v4_at(&out, 30), NAT_VIP, "reply's source");
        // A tagged reply to an untagged client loses its tag.
        let syn = ipv4_tcp(CLIENT_MAC, LB_MAC, client, NAT_VIP, 44001, 80, 0x02, &[]);
        let (_, out) = f.run(&syn.bytes);
        let id = backend_of(&n, &out);
        let backend = Ipv4Addr::new(192, 0, 2, 41 + (id - n.ids[0][0]) as u8);
        let reply =
            ipv4_tcp(mac(id), LB_MAC, backend, client, BPORT, 44001, 0x12, b"ok").with_vlan(9);
        let (action, out) = f.run(&reply.bytes);
        assert_eq!(action, XDP_TX);
        assert_eq!(out[12..14], [0x08, 0x00], "untagged towards the client");
        assert_eq!(v4_at(&out, 26), NAT_VIP);
        ok("reply untagged", &out);
    }

    #[test]
    fn a_nat_request_too_big_for_the_backends_interface_is_answered_from_the_vip() {
        let mut n = nat_fixture();
        for &id in &n.ids[0] {
            let mut b = n.f.dp.backend(id).unwrap();
            b.mtu = 576;
            n.f.dp.set_backend(id, &b).unwrap();
        }
        let client = c4(60);
        let big = lb_tests::packet::ipv4_raw(
            CLIENT_MAC,
            LB_MAC,
            client,
            NAT_VIP,
            6,
            7,
            0x4000,
            &ipv4_tcp(
                CLIENT_MAC, LB_MAC, client, NAT_VIP, 43000, 80, 0x10, &[1; 900],
            )
            .bytes[34..],
        );
        let (action, out) = n.f.run(&big.bytes);
        assert_eq!(action, XDP_TX, "answered");
        assert_eq!(out[0..6], CLIENT_MAC, "back to the sender");
        assert_eq!(out[23], 1, "ICMP");
        assert_eq!(v4_at(&out, 26), NAT_VIP, "from the VIP");
        assert_eq!(v4_at(&out, 30), client);
        assert_eq!((out[34], out[35]), (3, 4), "fragmentation needed");
        assert_eq!(port_at(&out, 40), 576, "the backend's MTU");
        ok("too big", &out);
    }

    #[test]
    fn a_nat_flow_keeps_a_drained_backend_and_leaves_a_removed_one() {
        let mut n = nat_fixture();
        let client = c4(50);
        let syn = ipv4_tcp(CLIENT_MAC, LB_MAC, client, NAT_VIP, 42000, 80, 0x02, &[]);
        let (_, out) = n.f.run(&syn.bytes);
        let id = backend_of(&n, &out);
        let other = *n.ids[0].iter().find(|&&b| b != id).unwrap();
        let next = ipv4_tcp(
            CLIENT_MAC, LB_MAC, client, NAT_VIP, 42000, 80, 0x10, b"more",
        );
        // Drained: the table has only the other backend, the flow's backend stays in place.
        let b_other = n.f.dp.backend(other).unwrap();
        let only_other = build_table(
            &SEED,
            &[MaglevBackend {
                id: other,
                addr: b_other.addr,
                salt: 0,
                weight: 100,
            }],
            TABLE,
        );
        n.f.dp.swap_table(5, &only_other).unwrap();
        let (action, out) = n.f.run(&next.bytes);
        assert_eq!(action, XDP_TX);
        assert_eq!(
            backend_of(&n, &out),
            id,
            "the drained backend keeps its flow"
        );
        // A new connection of the same client goes to the other backend.
        let new = ipv4_tcp(CLIENT_MAC, LB_MAC, client, NAT_VIP, 42001, 80, 0x02, &[]);
        assert_eq!(backend_of(&n, &n.f.run(&new.bytes).1), other);
        // Removed: the flow moves to the other backend (whose TCP resets it), and its replies
        // are translated from there.
        n.f.dp.clear_backend(id).unwrap();
        let (action, out) = n.f.run(&next.bytes);
        assert_eq!(action, XDP_TX);
        assert_eq!(
            backend_of(&n, &out),
            other,
            "rehashed off the removed backend"
        );
        let other_addr = Ipv4Addr::new(192, 0, 2, 41 + (other - n.ids[0][0]) as u8);
        let rst = ipv4_tcp(
            mac(other),
            LB_MAC,
            other_addr,
            client,
            BPORT,
            42000,
            0x04,
            &[],
        );
        let (action, out) = n.f.run(&rst.bytes);
        assert_eq!(action, XDP_TX, "the new backend's reset");
        assert_eq!(v4_at(&out, 26), NAT_VIP, "the reset comes from the VIP");
        ok("reset", &out);
    }

    /// An IP packet (no Ethernet header) of `proto` (TCP with ACK and PSH, or UDP) from
    /// `src`:`sport` to `dst`:`dport` with 100 bytes of data, every checksum computed by
    /// etherparse.
    fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        let data: Vec<u8> = (0..100u8).collect();
        let ip = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
            _ => panic!("{src} and {dst} of different families"),
        };
        let mut out = vec![];
        let written = if proto == 6 {
            ip.tcp(sport, dport, 0x1234_5678, 4000)
                .ack(0x0bad_cafe)
                .psh()
                .write(&mut out, &data)
        } else {
            ip.udp(sport, dport).write(&mut out, &data)
        };
        written.expect("a valid packet");
        out
    }

    /// `ip` in an Ethernet frame.
    fn in_frame(dst_mac: [u8; 6], src_mac: [u8; 6], ip: &[u8]) -> Vec<u8> {
        let mut f = dst_mac.to_vec();
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(if ip[0] >> 4 == 4 {
            &[0x08, 0x00]
        } else {
            &[0x86, 0xdd]
        });
        f.extend_from_slice(ip);
        f
    }

    /// An ICMP "fragmentation needed" (IPv4) or ICMPv6 "packet too big" from `router` to `to`,
    /// MTU 1280, quoting `quote`; its checksums computed by etherparse.
    fn icmp_error(
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        router: IpAddr,
        to: IpAddr,
        quote: &[u8],
    ) -> Vec<u8> {
        let l2 = PacketBuilder::ethernet2(src_mac, dst_mac);
        let mut b = vec![];
        match (router, to) {
            (IpAddr::V4(r), IpAddr::V4(t)) => l2
                .ipv4(r.octets(), t.octets(), 64)
                .icmpv4_raw(3, 4, [0, 0, 0x05, 0x00])
                .write(&mut b, quote),
            (IpAddr::V6(r), IpAddr::V6(t)) => l2
                .ipv6(r.octets(), t.octets(), 64)
                .icmpv6_raw(2, 0, 1280u32.to_be_bytes())
                .write(&mut b, quote),
            _ => panic!("{router} and {to} of different families"),
        }
        .expect("a valid ICMP message");
        b
    }

    /// ICMP errors about NAT flows, both ways, TCP and UDP, IPv4 and IPv6, whole and cut
    /// quotes: the quoted packet as lb leaves it is, byte for byte, the start of the packet
    /// the flow really has on that side, built from scratch (so its IPv4 header checksum and
    /// its TCP or UDP checksum are the ones computed over the translated packet), and the
    /// outer headers' and the ICMP checksums verify from scratch. A quote that stops before
    /// the end of its transport checksum keeps the checksum bytes it has as they were (nothing
    /// to check them against); a quoted UDP checksum of 0 (none) stays 0.
    #[test]
    fn icmp_errors_about_nat_flows_quote_the_translated_packet_with_its_checksums() {
        let n = nat_fixture();
        let f = &n.f;
        let ip = |a: Ipv4Addr| IpAddr::V4(a);
        let ip6 = |a: Ipv6Addr| IpAddr::V6(a);
        // Per NAT service: its VIP and port, the backends' port, the protocol, a client, and a
        // router on the way.
        let services = [
            (ip(NAT_VIP), 80, BPORT, 6u8, ip(c4(80)), ip(ROUTER)),
            (ip6(NAT_VIP6), 80, BPORT, 6, ip6(c6(80)), ip6(ROUTER6)),
            (ip(NAT_VIP_UDP), 53, UDP_BPORT, 17, ip(c4(81)), ip(ROUTER)),
            (
                ip6(NAT_VIP6_UDP),
                53,
                UDP_BPORT,
                17,
                ip6(c6(81)),
                ip6(ROUTER6),
            ),
        ];
        let mut checked = 0;
        for (i, (vip, vport, bport, proto, client, router)) in services.into_iter().enumerate() {
            let v4 = vip.is_ipv4();
            let family = if v4 { "IPv4" } else { "IPv6" };
            let kind = if proto == 6 { "TCP" } else { "UDP" };
            let ihl = if v4 { 20 } else { 40 };
            let (l4_len, check_at) = if proto == 6 {
                (20, ihl + 16)
            } else {
                (8, ihl + 6)
            };
            let cport = 45000 + i as u16;
            // The flow, by its first packet; its backend by the MAC it left for.
            let request = in_frame(
                LB_MAC,
                CLIENT_MAC,
                &ip_packet(client, vip, proto, cport, vport),
            );
            let (action, out) = f.run(&request);
            assert_eq!(action, XDP_TX, "{family} {kind} request");
            let id = backend_of(&n, &out);
            assert!(n.ids[i].contains(&id), "backend {id}");
            let backend = if v4 {
                ip(v4_at(&out, 30))
            } else {
                ip6(Ipv6Addr::from(<[u8; 16]>::try_from(&out[38..54]).unwrap()))
            };
            ok("request", &out);

            // (what, the packet quoted as sent, as the other side knows it, the error's
            // source MAC, its destination before and after lb)
            let directions = [
                (
                    "about a request, from the backend side",
                    ip_packet(client, backend, proto, cport, bport),
                    ip_packet(client, vip, proto, cport, vport),
                    mac(id),
                    client,
                    client,
                ),
                (
                    "about a reply, from the client side",
                    ip_packet(vip, client, proto, vport, cport),
                    ip_packet(backend, client, proto, bport, cport),
                    CLIENT_MAC,
                    vip,
                    backend,
                ),
            ];
            for (way, sent, translated, src_mac, to, to_after) in directions {
                let mut quotes = vec![
                    ("whole packet", sent.len()),
                    ("headers and 8 bytes of data", ihl + l4_len + 8),
                    ("8 bytes past the IP header", ihl + 8),
                    ("cut inside the transport checksum", check_at + 1),
                ];
                if proto == 6 {
                    quotes.push(("cut before the TCP checksum", check_at));
                }
                let mut variants = vec![("", sent.clone(), translated.clone())];
                if proto == 17 {
                    // No checksum (0): stays 0.
                    let zero = |p: &[u8]| {
                        let mut p = p.to_vec();
                        p[check_at..check_at + 2].copy_from_slice(&[0, 0]);
                        p
                    };
                    variants.push((" without checksum", zero(&sent), zero(&translated)));
                }
                for (variant, sent, translated) in &variants {
                    for &(cut, len) in &quotes {
                        let what = format!("{family} {kind}{variant} error {way}, quote: {cut}");
                        let frame = icmp_error(src_mac, LB_MAC, router, to, &sent[..len]);
                        let (action, out) = f.run(&frame);
                        assert_eq!(action, XDP_TX, "{what}");
                        assert_eq!(out.len(), frame.len(), "{what}: length");
                        let l3 = 14;
                        let (src_at, dst_at, q) = if v4 {
                            (l3 + 12, l3 + 16, l3 + 20 + 8)
                        } else {
                            (l3 + 8, l3 + 24, l3 + 40 + 8)
                        };
                        let addr_len = if v4 { 4 } else { 16 };
                        let octets = |a: IpAddr| match a {
                            IpAddr::V4(a) => a.octets().to_vec(),
                            IpAddr::V6(a) => a.octets().to_vec(),
                        };
                        assert_eq!(
                            out[src_at..src_at + addr_len],
                            octets(router),
                            "{what}: the router stays the error's source"
                        );
                        assert_eq!(
                            out[dst_at..dst_at + addr_len],
                            octets(to_after),
                            "{what}: the error's destination"
                        );
                        // The quote: the translated packet's start, except checksum bytes of
                        // a checksum the quote does not hold whole, which stay as sent.
                        let mut want = translated[..len].to_vec();
                        for at in check_at..check_at + 2 {
                            if len < check_at + 2 && at < len {
                                want[at] = sent[at];
                            }
                        }
                        let got = &out[q..];
                        if let Some(at) = (0..len).find(|&at| got[at] != want[at]) {
                            panic!(
                                "{what}: quoted byte {at} is {:#04x}, should be {:#04x}\n\
                                 got  {got:02x?}\nwant {want:02x?}",
                                got[at], want[at]
                            );
                        }
                        ok(&what, &out);
                        checked += 1;
                    }
                }
            }
        }
        // TCP: 2 families × 2 ways × 5 quotes; UDP: 2 families × 2 ways × 2 variants × 4.
        assert_eq!(checked, 2 * 2 * 5 + 2 * 2 * 2 * 4, "cases run");
    }
}
