//! `plan`, `hops_needed` and `initial`: every kind of change a config can bring, decided
//! without a kernel.

use std::time::Duration;

use super::*;
use crate::{
    config::{self, Forwarding, HashMode},
    daemon::{model::BackendState, testing::hop},
    netlink::NetlinkError,
};

/// Two services: `web` (HTTP-checked, two backends) and `dns` (unchecked, one backend).
const BASE: &str = r#"
[daemon]
interfaces = ["eth0"]

[[service]]
name = "web"
vip = "203.0.113.10"
port = 80
protocol = "tcp"

[service.health]
check = "http"
path = "/healthz"

[[service.backend]]
address = "192.0.2.11"

[[service.backend]]
address = "192.0.2.12"
weight = 50

[[service]]
name = "dns"
vip = "203.0.113.10"
port = 53
protocol = "udp"

[[service.backend]]
address = "192.0.2.21"
"#;

const T0: SystemTime = SystemTime::UNIX_EPOCH;

fn later() -> SystemTime {
    T0 + Duration::from_secs(60)
}

fn base() -> Config {
    config::parse(BASE).expect("BASE is a valid config").config
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Backend `address` of a service of port 80 (`web`) on its service's port.
fn at80(address: &str) -> BackendKey {
    BackendKey {
        address: ip(address),
        port: 80,
    }
}

/// Every hop `hops_needed` asks for, resolved (MAC ending in the address's last byte).
fn resolved(needed: &[(String, HopRequest)]) -> Hops {
    needed
        .iter()
        .map(|(service, req)| {
            let address = req.backend.address;
            let last: u8 = match address {
                IpAddr::V4(a) => a.octets()[3],
                IpAddr::V6(a) => a.octets()[15],
            };
            ((service.clone(), address), Ok(hop(last.into())))
        })
        .collect()
}

/// Plans `new` from `current` the way lbd does: the hops it needs, resolved, then the plan.
fn step(current: &[ServiceRuntime], new: &Config, now: SystemTime) -> Plan {
    let hops = resolved(&hops_needed(current, new));
    plan(current, new, hops, now).expect("a plan")
}

/// The state lbd has after `BASE` was applied to an empty one, its checked backends up.
fn running() -> Vec<ServiceRuntime> {
    let mut services = step(&[], &base(), T0).services;
    for s in &mut services {
        for b in &mut s.backends {
            b.healthy = true;
        }
    }
    services
}

fn lines(p: &Plan) -> Vec<String> {
    p.changes.iter().map(|c| c.to_string()).collect()
}

fn ids(services: &[ServiceRuntime]) -> Vec<(String, u32, Vec<u32>)> {
    services
        .iter()
        .map(|s| {
            (
                s.cfg.name.clone(),
                s.id,
                s.backends.iter().map(|b| b.id).collect(),
            )
        })
        .collect()
}

fn backend<'a>(services: &'a [ServiceRuntime], service: &str, address: &str) -> &'a BackendRuntime {
    services
        .iter()
        .find(|s| s.cfg.name == service)
        .and_then(|s| s.backends.iter().find(|b| b.cfg.address == ip(address)))
        .expect("the backend is there")
}

fn service_mut<'a>(c: &'a mut Config, name: &str) -> &'a mut config::Service {
    c.services.iter_mut().find(|s| s.name == name).unwrap()
}

#[test]
fn a_first_config_adds_everything_with_the_lowest_ids() {
    let p = step(&[], &base(), T0);
    assert_eq!(
        lines(&p),
        [
            "service web added",
            "service web: backend 192.0.2.11 added",
            "service web: backend 192.0.2.12 added",
            "service dns added",
            "service dns: backend 192.0.2.21 added",
        ]
    );
    assert_eq!(
        ids(&p.services),
        [("web".into(), 0, vec![0, 1]), ("dns".into(), 1, vec![2])]
    );
    let web = backend(&p.services, "web", "192.0.2.11");
    assert_eq!(web.hop, Some(hop(11)));
    assert_eq!(web.since, T0);
    // A checked backend joins once its first check passes; an unchecked one at once.
    assert!(!web.healthy);
    assert!(backend(&p.services, "dns", "192.0.2.21").healthy);
    assert!(p.checks.iter().all(|c| c.restart));
    assert!(
        p.checks
            .iter()
            .all(|c| c.start == health::Start::PendingFirstCheck)
    );
    assert_eq!(p.checks.len(), 3);
}

#[test]
fn the_same_config_again_changes_nothing() {
    let current = running();
    assert!(hops_needed(&current, &base()).is_empty());
    let p = plan(&current, &base(), Hops::new(), later()).unwrap();
    assert!(p.changes.is_empty(), "{:?}", p.changes);
    assert_eq!(ids(&p.services), ids(&current));
    for (after, before) in p.services.iter().zip(&current) {
        assert_eq!(after.cfg, before.cfg);
        for (a, b) in after.backends.iter().zip(&before.backends) {
            assert_eq!((&a.hop, a.healthy, a.since), (&b.hop, b.healthy, b.since));
        }
    }
    // Checkers go on (started only where none runs), from the health they have.
    assert!(p.checks.iter().all(|c| !c.restart));
    assert!(p.checks.iter().all(|c| c.start == health::Start::Up));
}

#[test]
fn a_removed_service_takes_its_backends_along() {
    let current = running();
    let mut new = base();
    new.services.retain(|s| s.name != "web");
    let p = step(&current, &new, later());
    assert_eq!(
        p.changes,
        [Change::ServiceRemoved {
            service: "web".into(),
            id: 0,
            port: 80,
            backends: vec![at80("192.0.2.11"), at80("192.0.2.12")],
        }]
    );
    assert_eq!(lines(&p), ["service web removed"]);
    assert_eq!(ids(&p.services), [("dns".into(), 1, vec![2])]);
    assert!(p.checks.iter().all(|c| c.service == "dns"));
}

#[test]
fn services_removed_are_reported_first_and_last_removed_first() {
    let current = running();
    let mut new = base();
    new.services.clear();
    let p = step(&current, &new, later());
    assert_eq!(lines(&p), ["service dns removed", "service web removed"]);
    assert!(p.services.is_empty() && p.checks.is_empty());
}

#[test]
fn a_service_on_a_new_address_port_or_protocol_keeps_its_id_and_backends() {
    let current = running();
    let mut new = base();
    let web = service_mut(&mut new, "web");
    web.vip = ip("203.0.113.20");
    web.port = 8080;
    let p = step(&current, &new, later());
    assert_eq!(lines(&p), ["service web: now 203.0.113.20 port 8080 tcp"]);
    assert_eq!(ids(&p.services), ids(&current));
    assert_eq!(p.services[0].key(), service_key(&new.services[0]));
    assert_eq!(
        backend(&p.services, "web", "192.0.2.11").hop,
        backend(&current, "web", "192.0.2.11").hop
    );
}

#[test]
fn a_new_forwarding_resolves_every_backend_of_the_service_again() {
    let current = running();
    let mut new = base();
    let web = service_mut(&mut new, "web");
    web.forwarding = Forwarding::Tunnel;
    web.tunnel_source = Some(ip("198.51.100.1"));
    let needed = hops_needed(&current, &new);
    assert_eq!(
        needed
            .iter()
            .map(|(s, r)| (s.as_str(), r.backend.address, r.forwarding, r.tunnel_source))
            .collect::<Vec<_>>(),
        [
            (
                "web",
                ip("192.0.2.11"),
                Forwarding::Tunnel,
                Some(ip("198.51.100.1"))
            ),
            (
                "web",
                ip("192.0.2.12"),
                Forwarding::Tunnel,
                Some(ip("198.51.100.1"))
            ),
        ]
    );
    // One resolves anew, the other does not: it loses its hop (and says why).
    let mut hops = Hops::new();
    let mut tunnel_hop = hop(11);
    tunnel_hop.tunnel_src = Some(ip("198.51.100.1"));
    hops.insert(("web".into(), ip("192.0.2.11")), Ok(tunnel_hop.clone()));
    hops.insert(
        ("web".into(), ip("192.0.2.12")),
        Err(ResolveError::Netlink(NetlinkError::NoRoute {
            dst: ip("192.0.2.12"),
            reason: "unreachable".into(),
        })),
    );
    let p = plan(&current, &new, hops, later()).unwrap();
    assert!(p.changes.is_empty(), "forwarding changes are not reported");
    assert_eq!(ids(&p.services), ids(&current));
    assert_eq!(p.services[0].cfg.forwarding, Forwarding::Tunnel);
    assert_eq!(
        backend(&p.services, "web", "192.0.2.11").hop,
        Some(tunnel_hop)
    );
    let lost = backend(&p.services, "web", "192.0.2.12");
    assert_eq!(lost.hop, None);
    assert_eq!(
        lost.hop_error.as_deref(),
        Some("no route to 192.0.2.12: unreachable")
    );
    assert_eq!(backend(&p.services, "dns", "192.0.2.21").hop, Some(hop(21)));
}

#[test]
fn a_new_table_size_or_hash_keeps_ids_hops_and_health() {
    let current = running();
    let mut new = base();
    service_mut(&mut new, "web").table_size = 257;
    service_mut(&mut new, "dns").hash = HashMode::FiveTuple;
    assert!(hops_needed(&current, &new).is_empty());
    let p = plan(&current, &new, Hops::new(), later()).unwrap();
    assert!(p.changes.is_empty());
    assert_eq!(ids(&p.services), ids(&current));
    assert_eq!(p.services[0].cfg.table_size, 257);
    assert_eq!(p.services[1].cfg.hash, HashMode::FiveTuple);
    assert!(
        p.services
            .iter()
            .flat_map(|s| &s.backends)
            .all(|b| b.healthy && b.hop.is_some())
    );
    assert!(p.checks.iter().all(|c| !c.restart));
}

#[test]
fn new_health_settings_restart_the_services_checkers_from_their_health() {
    let mut current = running();
    current[0].backends[1].healthy = false;
    let mut new = base();
    service_mut(&mut new, "web").health.rise = 5;
    let p = step(&current, &new, later());
    assert!(p.changes.is_empty());
    let web: Vec<_> = p.checks.iter().filter(|c| c.service == "web").collect();
    assert_eq!(
        web.iter()
            .map(|c| (c.backend, c.start, c.restart))
            .collect::<Vec<_>>(),
        [
            (at80("192.0.2.11"), health::Start::Up, true),
            (at80("192.0.2.12"), health::Start::Down, true),
        ]
    );
    assert!(
        p.checks
            .iter()
            .filter(|c| c.service == "dns")
            .all(|c| !c.restart)
    );
}

#[test]
fn an_added_backend_gets_the_lowest_free_id_and_waits_for_its_first_check() {
    let current = running();
    let mut new = base();
    service_mut(&mut new, "web").backends.insert(
        1,
        config::Backend {
            address: ip("192.0.2.13"),
            weight: 100,
            mac: None,
            port: None,
        },
    );
    assert_eq!(hops_needed(&current, &new).len(), 1);
    let p = step(&current, &new, later());
    assert_eq!(
        p.changes,
        [Change::BackendAdded {
            service: "web".into(),
            backend: at80("192.0.2.13"),
            name: "192.0.2.13".into(),
            id: 3,
        }]
    );
    // The file's order.
    assert_eq!(ids(&p.services)[0], ("web".into(), 0, vec![0, 3, 1]));
    let b = backend(&p.services, "web", "192.0.2.13");
    assert_eq!(
        (b.healthy, b.since, b.hop.clone()),
        (false, later(), Some(hop(13)))
    );
    let check = p
        .checks
        .iter()
        .find(|c| c.backend == at80("192.0.2.13"))
        .unwrap();
    assert_eq!(
        (check.start, check.restart),
        (health::Start::PendingFirstCheck, true)
    );
}

#[test]
fn an_added_backend_without_a_resolution_is_there_without_a_hop() {
    let current = running();
    let mut new = base();
    service_mut(&mut new, "dns").backends.push(config::Backend {
        address: ip("192.0.2.22"),
        weight: 100,
        mac: None,
        port: None,
    });
    let p = plan(&current, &new, Hops::new(), later()).unwrap();
    let b = backend(&p.services, "dns", "192.0.2.22");
    assert_eq!(b.hop, None);
    assert_eq!(
        b.hop_error.as_deref(),
        Some("not resolved yet (retried in the background)")
    );
    assert!(b.healthy, "dns is not checked");
    assert!(!b.in_table());
}

#[test]
fn a_removed_backend_is_reported_with_its_id_and_loses_its_checker() {
    let current = running();
    let mut new = base();
    service_mut(&mut new, "web").backends.remove(0);
    let p = step(&current, &new, later());
    assert_eq!(
        p.changes,
        [Change::BackendRemoved {
            service: "web".into(),
            backend: at80("192.0.2.11"),
            name: "192.0.2.11".into(),
            id: 0,
        }]
    );
    assert_eq!(lines(&p), ["service web: backend 192.0.2.11 removed"]);
    assert_eq!(ids(&p.services)[0], ("web".into(), 0, vec![1]));
    assert!(!p.checks.iter().any(|c| c.backend == at80("192.0.2.11")));
}

#[test]
fn a_new_weight_is_reported_and_draining_or_undraining_changes_the_state_time() {
    let current = running();
    let mut new = base();
    service_mut(&mut new, "web").backends[0].weight = 70;
    service_mut(&mut new, "web").backends[1].weight = 0;
    let drained = step(&current, &new, later());
    assert_eq!(
        lines(&drained),
        [
            "service web: backend 192.0.2.11 weight 100 -> 70",
            "service web: backend 192.0.2.12 weight 50 -> 0",
        ]
    );
    let kept = backend(&drained.services, "web", "192.0.2.11");
    assert_eq!((kept.since, kept.state()), (T0, BackendState::Up));
    let gone = backend(&drained.services, "web", "192.0.2.12");
    assert_eq!(
        (gone.since, gone.state()),
        (later(), BackendState::Draining)
    );
    assert!(
        gone.hop.is_some(),
        "a drained backend keeps serving its flows"
    );

    let back = later() + Duration::from_secs(60);
    let undrained = step(&drained.services, &base(), back);
    assert_eq!(
        lines(&undrained),
        [
            "service web: backend 192.0.2.11 weight 70 -> 100",
            "service web: backend 192.0.2.12 weight 0 -> 50",
        ]
    );
    let b = backend(&undrained.services, "web", "192.0.2.12");
    assert_eq!((b.since, b.state()), (back, BackendState::Up));
}

#[test]
fn a_fixed_mac_resolves_that_backend_again_and_only_it() {
    let current = running();
    let mut new = base();
    service_mut(&mut new, "web").backends[1].mac = Some([2, 0, 0, 0, 0, 0x99]);
    let needed = hops_needed(&current, &new);
    assert_eq!(needed.len(), 1);
    assert_eq!(
        (needed[0].0.as_str(), needed[0].1.backend.address),
        ("web", ip("192.0.2.12"))
    );
    let mut hops = Hops::new();
    let mut fixed = hop(12);
    fixed.mac = [2, 0, 0, 0, 0, 0x99];
    hops.insert(("web".into(), ip("192.0.2.12")), Ok(fixed.clone()));
    let p = plan(&current, &new, hops, later()).unwrap();
    assert!(p.changes.is_empty());
    let b = backend(&p.services, "web", "192.0.2.12");
    assert_eq!(
        (b.cfg.mac, b.hop.clone()),
        (Some([2, 0, 0, 0, 0, 0x99]), Some(fixed))
    );
}

#[test]
fn a_renamed_service_is_another_service() {
    let current = running();
    let mut new = base();
    service_mut(&mut new, "web").name = "www".into();
    let needed = hops_needed(&current, &new);
    assert_eq!(needed.len(), 2, "all of its backends are new");
    let p = step(&current, &new, later());
    assert_eq!(
        lines(&p),
        [
            "service web removed",
            "service www added",
            "service www: backend 192.0.2.11 added",
            "service www: backend 192.0.2.12 added",
        ]
    );
    // Nothing of what went is reused in the same change.
    assert_eq!(
        ids(&p.services),
        [("www".into(), 2, vec![3, 4]), ("dns".into(), 1, vec![2])]
    );
}

#[test]
fn ids_freed_by_a_change_are_given_again_only_by_a_later_one() {
    let current = running();
    // web (id 0, backends 0 and 1) goes, api comes: it gets fresh ids.
    let mut new = base();
    service_mut(&mut new, "web").name = "api".into();
    let first = step(&current, &new, later());
    assert_eq!(ids(&first.services)[0], ("api".into(), 2, vec![3, 4]));
    // The next change may use them: the data path let go of them in the first.
    let mut next = new.clone();
    let mut web = base().services[0].clone();
    web.backends.truncate(1);
    next.services.push(web);
    let second = step(&first.services, &next, later());
    assert_eq!(ids(&second.services)[2], ("web".into(), 0, vec![0]));
    // A backend too: replaced in one change, its id comes back in the next.
    let mut swap = next.clone();
    service_mut(&mut swap, "dns").backends[0].address = ip("192.0.2.22");
    let third = step(&second.services, &swap, later());
    assert_eq!(ids(&third.services)[1], ("dns".into(), 1, vec![1]));
    let mut again = swap.clone();
    service_mut(&mut again, "dns")
        .backends
        .push(config::Backend {
            address: ip("192.0.2.23"),
            weight: 100,
            mac: None,
            port: None,
        });
    let fourth = step(&third.services, &again, later());
    assert_eq!(ids(&fourth.services)[1], ("dns".into(), 1, vec![1, 2]));
}

#[test]
fn a_change_with_no_free_id_fails_as_a_whole() {
    // Every service id in use: replacing one by another needs a 257th id.
    let mut full = base();
    let template = full.services[1].clone();
    full.services = (0..MAX_SERVICES)
        .map(|i| config::Service {
            name: format!("s{i}"),
            port: 1000 + i as u16,
            ..template.clone()
        })
        .collect();
    let current = step(&[], &full, T0).services;
    assert_eq!(current.last().map(|s| s.id), Some(MAX_SERVICES - 1));
    let mut new = full.clone();
    new.services[0].name = "other".into();
    let err = plan(&current, &new, Hops::new(), later()).unwrap_err();
    assert_eq!(err, PlanError::Full { max: MAX_SERVICES });
    assert_eq!(err.to_string(), "all 256 data-path slots are in use");
    // Removing it alone is fine, and the next change may add the other.
    let mut fewer = full.clone();
    fewer.services.remove(0);
    let removed = step(&current, &fewer, later());
    let added = step(&removed.services, &new, later());
    assert_eq!(added.services[0].id, 0);
}

#[test]
fn a_restart_keeps_the_pinned_ids_and_adopted_health() {
    let config = base();
    let mut pinned = Pinned::default();
    // web was service 5 with backends 7 (down) and 9; dns is new to the data path.
    pinned.services.insert(service_key(&config.services[0]), 5);
    pinned.backends.insert(
        (5, state::to_addr(ip("192.0.2.11")), 0),
        (7, backend_flags::VALID | backend_flags::DOWN),
    );
    pinned.backends.insert(
        (5, state::to_addr(ip("192.0.2.12")), 0),
        (9, backend_flags::VALID),
    );
    let adopted = initial(&config, &pinned, true, T0).unwrap();
    assert_eq!(
        ids(&adopted),
        [("web".into(), 5, vec![7, 9]), ("dns".into(), 0, vec![0])]
    );
    assert_eq!(
        adopted[0]
            .backends
            .iter()
            .map(|b| b.healthy)
            .collect::<Vec<_>>(),
        [false, true]
    );
    assert!(
        adopted
            .iter()
            .flat_map(|s| &s.backends)
            .all(|b| b.hop.is_none())
    );
    // A fresh data path (left-over pins) keeps the ids but not the health.
    let fresh = initial(&config, &pinned, false, T0).unwrap();
    assert_eq!(ids(&fresh), ids(&adopted));
    assert!(fresh.iter().flat_map(|s| &s.backends).all(|b| b.healthy));
}

#[test]
fn a_nat_backends_new_port_restarts_its_checker_on_that_port_only() {
    let mut nat = base();
    service_mut(&mut nat, "web").forwarding = Forwarding::Nat;
    // Forwarding changes: every backend of the service is resolved and checked again.
    let current = running();
    let p = step(&current, &nat, later());
    assert!(
        p.checks
            .iter()
            .filter(|c| c.service == "web")
            .all(|c| c.restart)
    );
    let current = p.services;
    let mut moved = nat.clone();
    service_mut(&mut moved, "web").backends[1].port = Some(8080);
    let p = step(&current, &moved, later());
    let web: Vec<_> = p
        .checks
        .iter()
        .filter(|c| c.service == "web")
        .map(|c| (c.backend, c.restart))
        .collect();
    // Another port is another backend (a new id), checked at once on its port.
    assert_eq!(
        web,
        [(at80("192.0.2.11"), false), (key("192.0.2.12", 8080), true)]
    );
    assert_eq!(
        lines(&p),
        [
            "service web: backend 192.0.2.12 added",
            "service web: backend 192.0.2.12 removed"
        ]
    );
    // The checker's target and the data path's entry follow the port.
    let web = p.services.iter().find(|s| s.cfg.name == "web").unwrap();
    let b = &web.backends[1];
    assert_eq!(web.health_target(b).spec.port, 8080);
    assert_eq!(web.health_target(&web.backends[0]).spec.port, web.cfg.port);
    assert_eq!(web.nat_port(b), 8080u16.to_be());
}

/// `web` as a `nat` service whose host 192.0.2.11 serves on `ports` (the service's port 80
/// where None), and 192.0.2.12.
fn nat_with(ports: &[Option<u16>]) -> Config {
    let mut c = base();
    let web = service_mut(&mut c, "web");
    web.forwarding = Forwarding::Nat;
    let other = web.backends[1].clone();
    web.backends = ports
        .iter()
        .map(|&port| config::Backend {
            address: ip("192.0.2.11"),
            weight: 100,
            mac: None,
            port,
        })
        .collect();
    web.backends.push(other);
    c
}

fn key(address: &str, port: u16) -> BackendKey {
    BackendKey {
        address: ip(address),
        port,
    }
}

/// Everything lbd keeps per backend follows (address, port): one host on two ports is two
/// backends with their own ids, hops (shared: the address's), checkers and lines.
#[test]
fn one_host_on_two_ports_is_two_backends() {
    // One resolution per address (web's two, dns's one).
    assert_eq!(
        hops_needed(&[], &nat_with(&[Some(8080), Some(8081)])).len(),
        3
    );
    let first = step(&[], &nat_with(&[Some(8080)]), T0);
    assert_eq!(ids(&first.services)[0], ("web".into(), 0, vec![0, 1]));
    let p = step(
        &first.services,
        &nat_with(&[Some(8080), Some(8081)]),
        later(),
    );
    assert_eq!(
        lines(&p),
        ["service web: backend 192.0.2.11:8081 added"],
        "the first port keeps its backend"
    );
    assert_eq!(ids(&p.services)[0], ("web".into(), 0, vec![0, 3, 1]));
    let web = &p.services[0];
    for port in [8080, 8081] {
        let b = web.backend(key("192.0.2.11", port)).expect("both ports");
        assert_eq!(b.hop, Some(hop(11)), "port {port} shares the address's hop");
        assert_eq!(web.nat_port(b), port.to_be());
        assert_eq!(web.health_target(b).port, port);
        assert_eq!(
            web.health_target(b).spec.port,
            port,
            "checked on its own port"
        );
    }
    let checks: Vec<(BackendKey, bool)> = p
        .checks
        .iter()
        .filter(|c| c.service == "web")
        .map(|c| (c.backend, c.restart))
        .collect();
    assert_eq!(
        checks,
        [
            (key("192.0.2.11", 8080), false),
            (key("192.0.2.11", 8081), true),
            (key("192.0.2.12", 80), false),
        ]
    );
    // Removing one port leaves the other: its id, hop and checker.
    let q = step(&p.services, &nat_with(&[Some(8081)]), later());
    assert_eq!(lines(&q), ["service web: backend 192.0.2.11:8080 removed"]);
    assert_eq!(
        q.changes[0],
        Change::BackendRemoved {
            service: "web".into(),
            backend: key("192.0.2.11", 8080),
            name: "192.0.2.11:8080".into(),
            id: 0,
        }
    );
    assert_eq!(ids(&q.services)[0], ("web".into(), 0, vec![3, 1]));
    // A weight change names the port it is about.
    let mut w = nat_with(&[Some(8080), Some(8081)]);
    service_mut(&mut w, "web").backends[1].weight = 0;
    let r = step(&p.services, &w, later());
    assert_eq!(
        lines(&r),
        ["service web: backend 192.0.2.11:8081 weight 100 -> 0"]
    );
}

/// A backend on the service's port follows a change of that port (the same backend, its id
/// kept, checked on the new port); one with a port of its own keeps it.
#[test]
fn a_service_port_change_keeps_its_backends() {
    let first = step(&[], &nat_with(&[None, Some(8081)]), T0);
    let mut moved = nat_with(&[None, Some(8081)]);
    service_mut(&mut moved, "web").port = 8000;
    service_mut(&mut moved, "web").health.port = 8000;
    let p = step(&first.services, &moved, later());
    assert_eq!(lines(&p), ["service web: now 203.0.113.10 port 8000 tcp"]);
    assert_eq!(ids(&p.services)[0], ids(&first.services)[0]);
    let web = &p.services[0];
    assert!(web.backend(key("192.0.2.11", 8000)).is_some());
    assert!(web.backend(key("192.0.2.11", 8081)).is_some());
}

/// The Maglev permutation of a backend is its address's as long as the address is unique, and
/// stays so when the host gets a second port: the second port takes its own permutation, so
/// adding it moves clients only to it (few others), and the nodes' tables agree whatever the
/// ids.
#[test]
fn a_second_port_takes_clients_only_for_itself() {
    let seed = [7, 9];
    let mut one = step(&[], &nat_with(&[Some(8080)]), T0).services;
    for s in &mut one {
        for b in &mut s.backends {
            b.healthy = true;
        }
        s.refresh_table(&seed);
    }
    let mut two = step(&one, &nat_with(&[Some(8080), Some(8081)]), later()).services;
    for s in &mut two {
        for b in &mut s.backends {
            b.healthy = true;
        }
        s.refresh_table(&seed);
    }
    let (before, after) = (&one[0].table, &two[0].table);
    let new_id = two[0].backend(key("192.0.2.11", 8081)).unwrap().id;
    let size = before.len();
    let elsewhere = before
        .iter()
        .zip(after.iter())
        .filter(|(b, a)| b != a && **a != new_id)
        .count();
    let to_new = after.iter().filter(|&&a| a == new_id).count();
    // Weights 100, 100 and 50 (192.0.2.12).
    assert!(
        (to_new as f64 - size as f64 * 0.4).abs() < size as f64 * 0.01,
        "the new port has {to_new} of {size} slots"
    );
    // Maglev moves a few more when a third backend joins two of unequal weights: 2,270 of
    // 65,537 slots here, as many as a backend at a new address moves (measured: 2,266 to
    // 2,282 for three seeds, against 2,270 to 2,273 for the second port).
    assert!(
        elsewhere < size / 20,
        "{elsewhere} slots moved between the backends that were there"
    );
    // Listed in the other order (other ids): the same table of identities.
    let mut reversed = nat_with(&[Some(8081), Some(8080)]);
    service_mut(&mut reversed, "web").backends.reverse();
    let mut other = step(&[], &reversed, T0).services;
    for b in &mut other[0].backends {
        b.healthy = true;
    }
    other[0].refresh_table(&seed);
    assert_eq!(other[0].fingerprint(), two[0].fingerprint());
    assert_ne!(one[0].fingerprint(), two[0].fingerprint());
}

/// Drained weights are kept under the keys lbd always used for backends on the service's
/// port; one with a port of its own is kept with it.
#[test]
fn drained_weights_are_kept_by_address_and_own_port() {
    use super::super::model::drained_key;
    assert_eq!(drained_key("web", 80, at80("192.0.2.11")), "web 192.0.2.11");
    assert_eq!(
        drained_key("web", 80, key("192.0.2.11", 8081)),
        "web 192.0.2.11:8081"
    );
    assert_eq!(
        drained_key("web", 80, key("2001:db8::1", 8081)),
        "web [2001:db8::1]:8081"
    );
}
