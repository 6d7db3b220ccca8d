//! Client filters end to end: real lbd, real XDP on a veth, real nginx backends, real TCP
//! clients over IPv4 and IPv6. An allowed client connects; a denied one does not, and its
//! packets never reach a backend (nftables counters in every backend's namespace, before
//! anything else there sees them), whether the lists change at run time through lbctl or in
//! the file with a SIGHUP. Needs root (fails loudly without it).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use lb_tests::{
    Topology, TopologyOptions,
    lbd::{Lbd, LbdPaths, start_lbd},
    require_root,
};

const VIP4: &str = "203.0.113.10";
const VIP6: &str = "2001:db8::10";

fn service(t: &Topology, name: &str, vip: &str, v6: bool, lists: &str) -> String {
    let mut c = format!(
        "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\n{lists}"
    );
    for i in 1..=t.backends() {
        let a = if v6 {
            t.backend_addr_v6(i)
        } else {
            t.backend_addr(i)
        };
        c.push_str(&format!("\n[[service.backend]]\naddress = \"{a}\"\n"));
    }
    c
}

fn metrics(t: &Topology) -> SocketAddr {
    SocketAddr::new(t.lb_addr(), 9917)
}

fn config(t: &Topology, paths: &LbdPaths, web_lists: &str, web6_lists: &str) -> String {
    let mut c = paths.daemon_section(&format!("metrics = \"{}\"", metrics(t)));
    c.push_str(&service(t, "web", VIP4, false, web_lists));
    c.push_str(&service(t, "web6", VIP6, true, web6_lists));
    c
}

/// Counts, in every backend's namespace, the packets from `sources` (before anything else
/// there sees them): whether a denied client's packets reach a backend.
struct BackendCounters<'t> {
    t: &'t Topology,
    sources: Vec<IpAddr>,
}

impl<'t> BackendCounters<'t> {
    fn install(t: &'t Topology, sources: Vec<IpAddr>) -> BackendCounters<'t> {
        for i in 1..=t.backends() {
            let ns = t.backend_ns(i);
            t.exec_ok(ns, &["nft", "add", "table", "inet", "lbt"])
                .unwrap();
            t.exec_ok(
                ns,
                &[
                    "nft",
                    "add",
                    "chain",
                    "inet",
                    "lbt",
                    "pre",
                    "{ type filter hook prerouting priority -400; }",
                ],
            )
            .unwrap();
            for s in &sources {
                let family = if s.is_ipv4() { "ip" } else { "ip6" };
                t.exec_ok(
                    ns,
                    &[
                        "nft",
                        "add",
                        "rule",
                        "inet",
                        "lbt",
                        "pre",
                        family,
                        "saddr",
                        &s.to_string(),
                        "counter",
                    ],
                )
                .unwrap();
            }
        }
        BackendCounters { t, sources }
    }

    /// Packets from `src` seen by all backends together.
    fn seen(&self, src: IpAddr) -> u64 {
        assert!(self.sources.contains(&src));
        let mut total = 0;
        for i in 1..=self.t.backends() {
            let out = self
                .t
                .exec_ok(
                    self.t.backend_ns(i),
                    &["nft", "list", "chain", "inet", "lbt", "pre"],
                )
                .unwrap();
            let line = out
                .lines()
                .find(|l| l.contains(&format!("saddr {src} ")))
                .unwrap_or_else(|| panic!("no counter for {src}:\n{out}"));
            let packets: u64 = line
                .split_whitespace()
                .skip_while(|w| *w != "packets")
                .nth(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no packet count in {line:?}"));
            total += packets;
        }
        total
    }
}

/// Whether a TCP client at `src` gets an answer from a backend through the VIP (a denied
/// client's SYNs are dropped: its connect times out).
fn served(t: &Topology, src: IpAddr, vip: &str) -> bool {
    t.which_backend(src, SocketAddr::new(vip.parse().unwrap(), 80))
        .is_ok()
}

fn lbctl_ok(lbd: &Lbd, args: &[&str]) -> String {
    let out = lbd.lbctl(args).unwrap();
    assert!(
        out.status.success(),
        "lbctl {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lbd.log_tail()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn lbctl_err(lbd: &Lbd, args: &[&str]) -> String {
    let out = lbd.lbctl(args).unwrap();
    assert!(!out.status.success(), "lbctl {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn denied_count(lbd: &Lbd, service: &str) -> u64 {
    let v = lbd.lbctl_json(&["stats", service]).unwrap();
    v["services"][0]["dropped"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["reason"] == "denied")
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or_else(|| panic!("no denied count for {service}: {v}"))
}

#[test]
fn allowed_clients_connect_denied_ones_never_reach_a_backend_at_run_time_and_after_sighup() {
    require_root();
    let t = Topology::new(TopologyOptions {
        vips: vec![VIP4.parse().unwrap(), VIP6.parse().unwrap()],
        ..Default::default()
    })
    .expect("building the namespace topology");
    let paths = LbdPaths::for_topology(&t);
    let lbd = start_lbd(&t, &config(&t, &paths, "", "")).expect("starting lbd");
    let (a, d) = (t.client_sources(1)[0], t.client_sources(2)[0]);
    let (a6, d6) = (t.client_sources_v6(1)[0], t.client_sources_v6(2)[0]);
    let counters = BackendCounters::install(&t, vec![d, d6]);
    for src in [a, d] {
        assert!(served(&t, src, VIP4), "{src} before any list");
    }
    for src in [a6, d6] {
        assert!(served(&t, src, VIP6), "{src} before any list");
    }
    let before = counters.seen(d);
    assert!(
        before > 0,
        "the counter sees {d}'s packets while it is served"
    );

    // At run time: deny d. It takes effect before lbctl returns.
    let out = lbctl_ok(&lbd, &["service", "deny", "web", &format!("{d}/32")]);
    assert!(out.contains(&format!("deny list +{d}/32")), "{out}");
    let (seen, denied) = (counters.seen(d), denied_count(&lbd, "web"));
    assert!(!served(&t, d, VIP4), "{d} is denied");
    assert!(served(&t, a, VIP4), "{a} is not");
    assert!(served(&t, d6, VIP6), "web6 has no list");
    assert_eq!(counters.seen(d), seen, "no packet of {d} reached a backend");
    let dropped = denied_count(&lbd, "web") - denied;
    assert!(dropped >= 1, "{d}'s SYNs counted as denied for web");
    let file = std::fs::read_to_string(&paths.config).unwrap();
    assert!(file.contains(&format!("deny = [\"{d}/32\"]")), "{file}");
    let l = lbd.lbctl_json(&["lookup", "web", &d.to_string()]).unwrap();
    assert_eq!(l["reason"], "denied", "{l}");
    assert!(l["backend"].is_null(), "{l}");
    let l = lbctl_ok(&lbd, &["lookup", "web", &d.to_string()]);
    assert!(l.contains("on the deny list"), "{l}");
    let list = lbd.lbctl_json(&["service", "list"]).unwrap();
    assert_eq!(
        list[0]["deny"],
        serde_json::json!([format!("{d}/32")]),
        "{list}"
    );
    assert_eq!(list[0]["allow"], serde_json::json!([]), "{list}");
    let human = lbctl_ok(&lbd, &["service", "list"]);
    assert!(
        human.lines().next().unwrap().contains("ALLOW  DENY"),
        "{human}"
    );
    let stats = lbctl_ok(&lbd, &["stats", "web"]);
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("web") && l.contains("denied")),
        "{stats}"
    );

    // An allow list on the IPv6 service: only a6.
    lbctl_ok(&lbd, &["service", "allow", "web6", &a6.to_string()]);
    assert!(served(&t, a6, VIP6), "{a6} is allowed");
    let seen6 = counters.seen(d6);
    assert!(!served(&t, d6, VIP6), "{d6} is not on web6's allow list");
    assert_eq!(
        counters.seen(d6),
        seen6,
        "no packet of {d6} reached a backend"
    );
    assert!(denied_count(&lbd, "web6") >= 1);

    // Mistakes are refused, naming what is wrong.
    let e = lbctl_err(&lbd, &["service", "deny", "web", "2001:db8::/32"]);
    assert!(e.contains("not of the VIP's address family"), "{e}");
    let e = lbctl_err(&lbd, &["service", "allow", "web", &format!("{d}/32")]);
    assert!(
        e.contains("on the deny list") && e.contains("unlist"),
        "{e}"
    );
    let e = lbctl_err(&lbd, &["service", "unlist", "web", "192.0.2.0/24"]);
    assert!(e.contains("neither the allow nor the deny list"), "{e}");
    let e = lbctl_err(&lbd, &["service", "deny", "web", "198.51.100.7/24"]);
    assert!(e.contains("did you mean 198.51.100.0/24"), "{e}");
    let e = lbctl_err(&lbd, &["service", "deny", "nosuch", "198.51.100.0/24"]);
    assert!(e.contains("nosuch"), "{e}");

    // Unlisted again: d is served.
    lbctl_ok(&lbd, &["service", "unlist", "web", &format!("{d}/32")]);
    assert!(served(&t, d, VIP4), "{d} unlisted");
    assert!(
        counters.seen(d) > seen,
        "{d}'s packets reach a backend again"
    );
    let file = std::fs::read_to_string(&paths.config).unwrap();
    assert!(!file.contains("deny ="), "{file}");
    assert!(file.contains(&format!("allow = [\"{a6}/128\"]")), "{file}");

    // SIGHUP: the file now allows only a on web and has no list on web6.
    let edited = config(&t, &paths, &format!("allow = [\"{a}/32\"]\n"), "");
    std::fs::write(&paths.config, edited).unwrap();
    let log = lbd.reload(Duration::from_secs(10)).unwrap();
    assert!(log.contains(&format!("allow list +{a}/32")), "{log}");
    let seen = counters.seen(d);
    assert!(!served(&t, d, VIP4), "{d} is not on web's allow list");
    assert!(served(&t, a, VIP4), "{a} is");
    assert_eq!(counters.seen(d), seen, "no packet of {d} reached a backend");
    assert!(served(&t, d6, VIP6), "web6's list is gone");
    let list = lbd.lbctl_json(&["service", "list"]).unwrap();
    assert_eq!(list[0]["allow"], serde_json::json!([format!("{a}/32")]));
    assert_eq!(list[1]["allow"], serde_json::json!([]));

    // The metrics have the per-service counters beside the total.
    let reply = t
        .http_get(t.client_ns(1), t.client_addr(1), metrics(&t), "/metrics")
        .unwrap();
    let text = reply.text();
    let sample = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert_eq!(
        sample(r#"lb_dropped_total{reason="denied"}"#),
        sample(r#"lb_service_dropped_total{service="web",reason="denied"}"#)
            + sample(r#"lb_service_dropped_total{service="web6",reason="denied"}"#),
        "{text}"
    );
    let m = lbd.lbctl_json(&["stats"]).unwrap();
    let total = m["dropped"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["reason"] == "denied")
        .unwrap()["packets"]
        .as_u64()
        .unwrap();
    assert_eq!(
        total,
        denied_count(&lbd, "web") + denied_count(&lbd, "web6"),
        "{m}"
    );
}
