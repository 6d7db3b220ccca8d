//! The demo behind `cargo xtask demo`: a namespace harness with clients, the load balancer and
//! three nginx backends; lbd on a demo config; HTTP from many client addresses; a table of which
//! backend served how many clients. `--keep` leaves it all up until Ctrl-C and prints how to
//! use lbctl on it.

use std::{collections::BTreeMap, net::SocketAddr, process::ExitCode, time::Instant};

use anyhow::{Context as _, Result};
use lb_tests::{
    Topology, TopologyOptions,
    lbd::{LbdPaths, bin, start_lbd},
};

const VIP: &str = "203.0.113.10";

fn demo_config(paths: &LbdPaths) -> String {
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
"#
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
        "demo: building the namespace harness (2 client hosts with 40 addresses each, the load balancer, 3 nginx backends)"
    );
    let t = Topology::new(TopologyOptions {
        vips: vec![VIP.parse()?],
        ..Default::default()
    })
    .context("building the demo topology")?;
    let paths = LbdPaths::for_topology(&t);
    let config = demo_config(&paths);
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
    let mut clients_per_backend: BTreeMap<usize, usize> = BTreeMap::new();
    let mut responses = 0usize;
    let mut failures = 0usize;
    for &src in &sources {
        let mut served_by = None;
        for _ in 0..3 {
            match t.which_backend(src, vip) {
                Ok(b) => {
                    responses += 1;
                    if served_by.is_some_and(|prev| prev != b) {
                        println!("demo: client {src} moved between backends!");
                    }
                    served_by = Some(b);
                }
                Err(e) => {
                    failures += 1;
                    println!("demo: request from {src} failed: {e:#}");
                }
            }
        }
        if let Some(b) = served_by {
            *clients_per_backend.entry(b).or_default() += 1;
        }
    }
    println!("\n  BACKEND     ADDRESS      CLIENTS  SHARE");
    for (b, n) in &clients_per_backend {
        println!(
            "  backend {b}   {:<11}  {n:>7}  {:>4.1}%",
            t.backend_addr(*b).to_string(),
            100.0 * *n as f64 / sources.len() as f64
        );
    }
    println!("  {responses} HTTP responses, {failures} failed; every client stayed on one backend");

    let stats = lbd.lbctl(&["stats"])?;
    print!(
        "\n$ lbctl stats\n{}",
        String::from_utf8_lossy(&stats.stdout)
    );

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
