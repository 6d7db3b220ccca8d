//! Which VIPs this node serves (SPEC "Several nodes"), and what the announcer reports back.
//! Plain data and a pure function; the daemon publishes the set after every change
//! (`Daemon::publish_serving`), and the announcer (the `announce` module, which uses this one)
//! keeps the routes in step.

use std::{collections::BTreeSet, net::IpAddr};

use super::model::{BackendState, ServiceRuntime};

/// A VIP is *serving* while the data path is attached, at least one service on it has an `up`
/// backend (health passed, next hop resolved) of non-zero weight, and the node is not drained.
pub fn serving_vips(
    services: &[ServiceRuntime],
    attached: bool,
    drained: bool,
) -> BTreeSet<IpAddr> {
    if !attached || drained {
        return BTreeSet::new();
    }
    services
        .iter()
        .filter(|s| {
            s.backends
                .iter()
                .any(|b| b.state() == BackendState::Up && b.cfg.weight > 0)
        })
        .map(|s| s.cfg.vip)
        .collect()
}

/// The serving VIPs as last published, numbered: each change of the set takes the next
/// generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Serving {
    pub generation: u64,
    pub vips: BTreeSet<IpAddr>,
}

/// What the announcer did last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnnounceReport {
    /// The generation of [`Serving`] the routes were last brought to (0: not yet).
    pub generation: u64,
    /// The VIPs whose routes were in the table after that.
    pub installed: BTreeSet<IpAddr>,
    /// Why the last attempt failed, if it did (it is retried).
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::testing;

    fn service(vip: &str, backends: Vec<(u32, bool)>) -> ServiceRuntime {
        let cfg = crate::config::Service {
            name: format!("web-{vip}"),
            vip: vip.parse().unwrap(),
            port: 80,
            protocol: crate::config::Protocol::Tcp,
            forwarding: crate::config::Forwarding::Dsr,
            hash: crate::config::HashMode::Source,
            table_size: 65_537,
            tunnel_source: None,
            health: crate::config::Health::default(),
            backends: vec![],
            allow: vec![],
            deny: vec![],
        };
        let backends = backends
            .into_iter()
            .enumerate()
            .map(|(i, (weight, healthy))| {
                let address = if vip.contains(':') {
                    format!("2001:db8::{}", 11 + i)
                } else {
                    format!("192.0.2.{}", 11 + i)
                };
                testing::backend(i as u32, &address, weight, Some(testing::hop(1)), healthy)
            })
            .collect();
        ServiceRuntime::new(1, cfg, backends)
    }

    fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn a_vip_serves_with_one_up_backend_of_some_weight() {
        let services = vec![
            service("203.0.113.10", vec![(100, true), (100, false)]),
            // Every backend down or drained: not serving.
            service("203.0.113.20", vec![(100, false), (0, true)]),
            service("2001:db8::10", vec![(1, true)]),
            // No backend at all.
            service("203.0.113.30", vec![]),
        ];
        assert_eq!(
            serving_vips(&services, true, false),
            ips(&["203.0.113.10", "2001:db8::10"])
        );
        assert!(serving_vips(&services, true, true).is_empty(), "drained");
        assert!(serving_vips(&services, false, false).is_empty(), "detached");
    }

    #[test]
    fn one_serving_service_is_enough_for_its_vip() {
        let mut other_port = service("203.0.113.10", vec![(100, true)]);
        other_port.cfg.port = 443;
        let services = vec![service("203.0.113.10", vec![(100, false)]), other_port];
        assert_eq!(serving_vips(&services, true, false), ips(&["203.0.113.10"]));
    }

    #[test]
    fn an_unresolved_backend_does_not_serve() {
        let mut s = service("203.0.113.10", vec![(100, true)]);
        s.backends[0].hop = None;
        assert!(serving_vips(&[s], true, false).is_empty());
    }
}
