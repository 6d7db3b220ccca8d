//! The demo behind `cargo xtask demo`: a namespace harness with clients, the load balancer and
//! three nginx backends; lbd on a demo config; HTTP from many client addresses; a table of which
//! backend served how many clients; then a `nat` service whose two backends, on lb's second
//! interface, hold no VIP and route through lb (VIP port 8080 to their port 80). `--keep`
//! leaves it all up until Ctrl-C and prints how to use lbctl on it.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lb_tests::{
    BackendSide, Topology, TopologyOptions,
    lbd::{Lbd, LbdPaths, bin, start_lbd},
};

/// Who served whom in one round of requests.
struct Survey {
    served_by: HashMap<IpAddr, usize>,
    responses: usize,
    failures: usize,
}

/// Three GETs from every client address.
fn survey(t: &Topology, sources: &[IpAddr], vip: SocketAddr) -> Survey {
    let mut s = Survey {
        served_by: HashMap::new(),
        responses: 0,
        failures: 0,
    };
    for &src in sources {
        for _ in 0..3 {
            match t.which_backend(src, vip) {
                Ok(b) => {
                    s.responses += 1;
                    if s.served_by.insert(src, b).is_some_and(|prev| prev != b) {
                        println!("demo: client {src} moved between backends!");
                    }
                }
                Err(e) => {
                    s.failures += 1;
                    println!("demo: request from {src} failed: {e:#}");
                }
            }
        }
    }
    s
}

impl Survey {
    fn print(&self, t: &Topology, clients: usize) {
        let mut per_backend: BTreeMap<usize, usize> = BTreeMap::new();
        for &b in self.served_by.values() {
            *per_backend.entry(b).or_default() += 1;
        }
        println!("\n  BACKEND     ADDRESS        CLIENTS  SHARE");
        for (b, n) in &per_backend {
            println!(
                "  backend {b}   {:<13}  {n:>7}  {:>4.1}%",
                t.backend_addr(*b).to_string(),
                100.0 * *n as f64 / clients as f64
            );
        }
        println!(
            "  {} HTTP responses, {} failed; every client stayed on one backend",
            self.responses, self.failures
        );
    }
}

/// The state `lbctl backend list` shows for a backend.
fn backend_state(lbd: &Lbd, address: &str) -> Option<String> {
    let list = lbd.lbctl_json(&["backend", "list", "web"]).ok()?;
    list.as_array()?
        .iter()
        .find(|b| b["address"] == address)
        .and_then(|b| b["state"].as_str().map(str::to_owned))
}

const VIP: &str = "203.0.113.10";
/// The `nat` service's VIP (no backend holds it; clients route it via lb).
const NAT_VIP: &str = "203.0.113.20";

fn demo_config(t: &Topology, paths: &LbdPaths) -> String {
    let mut c = paths.daemon_section("");
    c.push_str(&format!(
        r#"
[[service]]
name = "web"
vip = "{VIP}"
port = 80
protocol = "tcp"

[service.health]
check = "http"
path = "/healthz"
interval_ms = 500
timeout_ms = 300

[[service.backend]]
address = "192.0.2.11"

[[service.backend]]
address = "192.0.2.12"

[[service.backend]]
address = "192.0.2.13"

[[service]]
name = "app"
vip = "{NAT_VIP}"
port = 8080
protocol = "tcp"
forwarding = "nat"

[service.health]
check = "http"
path = "/healthz"
interval_ms = 500
timeout_ms = 300

[[service.backend]]
address = "{b4}"
port = 80

[[service.backend]]
address = "{b5}"
port = 80
"#,
        b4 = t.backend_addr(4),
        b5 = t.backend_addr(5),
    ));
    c
}

/// Blocks until SIGINT or SIGTERM (the topology is then dropped, which removes it).
fn wait_for_interrupt() {
    // SAFETY: plain libc signal-set handling on this thread; the signals are blocked first so
    // sigwait can take them.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
}

fn run(keep: bool) -> Result<()> {
    let started = Instant::now();
    println!(
        "demo: building the namespace harness (2 client hosts with 40 addresses each, the load balancer, 3 nginx backends, and 2 more behind lb's second interface for the nat service)"
    );
    let t = Topology::new(TopologyOptions {
        vips: vec![VIP.parse()?],
        backend_side: Some(BackendSide {
            direct: 2,
            ..Default::default()
        }),
        ..Default::default()
    })
    .context("building the demo topology")?;
    for c in 1..=t.clients() {
        t.exec_ok(
            t.client_ns(c),
            &["ip", "route", "add", NAT_VIP, "via", "192.0.2.2"],
        )?;
    }
    let paths = LbdPaths::for_topology(&t);
    let config = demo_config(&t, &paths);
    println!(
        "demo: starting lbd in namespace {} with {}:",
        t.lb_ns(),
        paths.config.display()
    );
    for line in config.lines().filter(|l| !l.is_empty()) {
        println!("    {line}");
    }
    let lbd = start_lbd(&t, &config)?;
    let status = lbd.lbctl(&["status"])?;
    print!(
        "\n$ lbctl status\n{}",
        String::from_utf8_lossy(&status.stdout)
    );

    let vip: SocketAddr = format!("{VIP}:80").parse()?;
    let sources = t.all_client_sources();
    println!(
        "\ndemo: GET http://{vip}/ from {} client addresses, 3 requests each",
        sources.len()
    );
    let before = survey(&t, &sources, vip);
    before.print(&t, sources.len());

    // lbd counts the connection table in the background, about every second.
    let _ = lb_tests::wait_until(
        Duration::from_secs(5),
        "the connection table to be counted",
        || {
            lbd.lbctl_json(&["stats"])
                .is_ok_and(|s| s["conntrack"]["entries"].as_u64().unwrap_or(0) > 0)
        },
    );
    let stats = lbd.lbctl(&["stats"])?;
    print!(
        "\n$ lbctl stats\n{}",
        String::from_utf8_lossy(&stats.stdout)
    );

    // Failover: backend 2's web server stops; health checks take it out of the table.
    println!("\ndemo: stopping nginx on backend 2 (192.0.2.12)");
    let stopped = Instant::now();
    t.stop_backend_server(2)?;
    lb_tests::wait_until(
        Duration::from_secs(10),
        "lbctl to report backend 2 down",
        || backend_state(&lbd, "192.0.2.12").as_deref() == Some("down"),
    )?;
    println!(
        "demo: lbctl reports 192.0.2.12 down after {:.2}s (interval 500 ms × fall 3, plus jitter)",
        stopped.elapsed().as_secs_f64()
    );
    let list = lbd.lbctl(&["backend", "list"])?;
    print!(
        "\n$ lbctl backend list\n{}",
        String::from_utf8_lossy(&list.stdout)
    );
    println!("\ndemo: the same {} clients again", sources.len());
    let after = survey(&t, &sources, vip);
    after.print(&t, sources.len());
    let moved = sources
        .iter()
        .filter(|s| before.served_by.get(s) == Some(&2))
        .filter(|s| after.served_by.get(s).is_some_and(|&b| b != 2))
        .count();
    let kept = sources
        .iter()
        .filter(|s| before.served_by.get(s).is_some_and(|&b| b != 2))
        .filter(|s| after.served_by.get(s) == before.served_by.get(s))
        .count();
    println!(
        "demo: {moved} clients of backend 2 moved to the others; {kept} of the other clients kept their backend; {} failed requests",
        after.failures
    );

    println!("\ndemo: starting nginx on backend 2 again");
    t.start_backend_server(2)?;
    lb_tests::wait_until(
        Duration::from_secs(10),
        "lbctl to report backend 2 up",
        || backend_state(&lbd, "192.0.2.12").as_deref() == Some("up"),
    )?;
    let list = lbd.lbctl(&["backend", "list"])?;
    print!(
        "$ lbctl backend list\n{}",
        String::from_utf8_lossy(&list.stdout)
    );
    // NAT: backends 4 and 5 know nothing of the VIP; lb rewrites requests to their address
    // and port 80, and their replies (routed through lb) back to the VIP and port 8080.
    lb_tests::wait_until(
        Duration::from_secs(10),
        "the nat service's backends up",
        || {
            lbd.lbctl_json(&["backend", "list", "app"]).is_ok_and(|l| {
                l.as_array()
                    .is_some_and(|a| a.iter().all(|b| b["state"] == "up"))
            })
        },
    )?;
    let nat_vip: SocketAddr = format!("{NAT_VIP}:8080").parse()?;
    println!(
        "\ndemo: nat service: GET http://{nat_vip}/ from the same clients (backends 4 and 5 serve on port 80, hold no VIP, route replies through lb)"
    );
    let nat = survey(&t, &sources, nat_vip);
    nat.print(&t, sources.len());
    let failures = before.failures + after.failures + nat.failures;

    if keep {
        println!("\ndemo: left running. Try, as root:");
        println!(
            "    {} --socket {} status",
            bin("lbctl").display(),
            paths.socket.display()
        );
        println!(
            "    {} --socket {} stats",
            bin("lbctl").display(),
            paths.socket.display()
        );
        println!(
            "    ip netns exec {} curl -s --interface {} http://{VIP}/",
            t.client_ns(1),
            t.client_sources(1)[0]
        );
        println!("    lbd's log: {}", t.log_path(lbd.handle).display());
        println!("demo: press Ctrl-C to tear it down");
        wait_for_interrupt();
    }
    println!(
        "demo: tearing down (lbd --cleanup, namespaces removed); took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    drop(lbd);
    drop(t);
    if failures > 0 {
        anyhow::bail!("{failures} requests failed");
    }
    Ok(())
}

fn main() -> ExitCode {
    let keep = std::env::args().skip(1).any(|a| a == "--keep");
    lb_tests::require_root();
    match run(keep) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
