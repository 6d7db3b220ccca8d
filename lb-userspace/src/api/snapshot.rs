//! One snapshot of the counters, read under the daemon's lock, serves both `/v1/stats` (as
//! [`Stats`]) and `/metrics` (rendered by `metrics`): the two can never count differently.

use crate::{
    config::Forwarding,
    daemon::{BackendState, Daemon, ServiceRuntime},
    metrics::{BackendMetrics, HealthCount, ServiceMetrics, Snapshot},
};

use super::types::{BackendStats, Conntrack, NewFlowCount, ReasonCount, ServiceStats, Stats};

/// The counters of `services` (of the daemon `d`), the reasons' totals, the connection table's
/// fill and the health checks' counts.
pub fn counters<'a>(
    d: &Daemon,
    services: impl IntoIterator<Item = &'a ServiceRuntime>,
) -> Snapshot {
    let services = services
        .into_iter()
        .map(|s| {
            let c = d.datapath.service_counter(s.id);
            let replies = (s.cfg.forwarding == Forwarding::Nat).then(|| {
                let r = d.datapath.service_reply_counter(s.id);
                (r.packets, r.bytes)
            });
            ServiceMetrics {
                name: s.cfg.name.clone(),
                packets: c.packets,
                bytes: c.bytes,
                replies,
                backends: s
                    .backends
                    .iter()
                    .map(|b| {
                        let c = d.datapath.backend_counter(b.id);
                        BackendMetrics {
                            address: b.cfg.address.to_string(),
                            port: b.cfg.port_or(s.cfg.port),
                            name: s.name_of(b),
                            packets: c.packets,
                            bytes: c.bytes,
                            up: b.state() == BackendState::Up,
                            weight: b.cfg.weight,
                        }
                    })
                    .collect(),
                fingerprint: s.fingerprint(),
                dropped: d
                    .datapath
                    .service_reason_counts(s.id)
                    .into_iter()
                    .map(|(r, n)| (r.label().to_string(), n))
                    .collect(),
            }
        })
        .collect();
    let (entries, capacity) = d.conntrack.get();
    Snapshot {
        services,
        conntrack_entries: entries,
        conntrack_capacity: capacity,
        nat_capacity: d.datapath.nat_capacity() as u64,
        changed_slots: d.conntrack.changed_slots(),
        dropped: d
            .datapath
            .reason_counts()
            .into_iter()
            .map(|(r, n)| (r.label().to_string(), n))
            .collect(),
        new_flows: {
            let totals = d.datapath.new_flow_counts();
            let rates = d.conntrack.new_flow_rates();
            lb_common::NewFlow::ALL
                .iter()
                .map(|o| {
                    let i = *o as usize;
                    (o.label().to_string(), totals[i], rates[i])
                })
                .collect()
        },
        health_checks: d
            .health_counts
            .iter()
            .map(|((service, backend, result), count)| HealthCount {
                service: service.clone(),
                backend: backend.clone(),
                result: result.label().into(),
                count: *count,
            })
            .collect(),
        node_drained: d.node_drained(),
        announced_vips: match d.announcing() {
            Some(_) => d.announce_report().borrow().installed.len() as u64,
            None => 0,
        },
        sync: d.sync_status.as_ref().map(|s| crate::metrics::SyncMetrics {
            peers: s
                .peers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|p| crate::metrics::PeerMetrics {
                    peer: p.addr.map(|a| a.to_string()).unwrap_or_default(),
                    entries_sent: p.entries_sent,
                    entries_received: p.entries_received,
                    up: p.up(),
                })
                .collect(),
            rejected: crate::sync::Refused::ALL
                .iter()
                .map(|r| (r.label().to_string(), s.rejected(*r)))
                .collect(),
        }),
    }
}

/// What the metrics endpoint reports: the snapshot of every service.
pub fn metrics_snapshot(d: &Daemon) -> Snapshot {
    counters(d, &d.services)
}

/// `/v1/stats` is the snapshot's packet, byte, reason and connection-table counts.
impl From<&Snapshot> for Stats {
    fn from(s: &Snapshot) -> Self {
        Stats {
            services: s
                .services
                .iter()
                .map(|svc| ServiceStats {
                    service: svc.name.clone(),
                    packets: svc.packets,
                    bytes: svc.bytes,
                    reply_packets: svc.replies.map(|(packets, _)| packets),
                    reply_bytes: svc.replies.map(|(_, bytes)| bytes),
                    backends: svc
                        .backends
                        .iter()
                        .map(|b| BackendStats {
                            address: b.address.clone(),
                            port: b.port,
                            name: b.name.clone(),
                            packets: b.packets,
                            bytes: b.bytes,
                        })
                        .collect(),
                    dropped: reason_counts(&svc.dropped),
                })
                .collect(),
            dropped: reason_counts(&s.dropped),
            nat_capacity: s.nat_capacity,
            conntrack: Conntrack {
                entries: s.conntrack_entries,
                capacity: s.conntrack_capacity,
                changed_slots: s.changed_slots,
                new_flows: s
                    .new_flows
                    .iter()
                    .map(|(outcome, flows, per_second)| NewFlowCount {
                        outcome: outcome.clone(),
                        flows: *flows,
                        per_second: *per_second,
                    })
                    .collect(),
            },
        }
    }
}

fn reason_counts(counts: &[(String, u64)]) -> Vec<ReasonCount> {
    counts
        .iter()
        .map(|(reason, packets)| ReasonCount {
            reason: reason.clone(),
            packets: *packets,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/v1/stats` reports exactly the snapshot's numbers, in its order: the counts `/metrics`
    /// renders from the same snapshot.
    #[test]
    fn stats_are_the_snapshot() {
        let backend = |address: &str, packets| BackendMetrics {
            address: address.into(),
            port: 80,
            name: address.into(),
            packets,
            bytes: packets * 60,
            up: packets % 2 == 0,
            weight: 100,
        };
        let snapshot = Snapshot {
            services: vec![
                ServiceMetrics {
                    name: "web".into(),
                    packets: 30,
                    bytes: 1800,
                    replies: Some((25, 2500)),
                    backends: vec![backend("192.0.2.11", 10), backend("192.0.2.12", 20)],
                    fingerprint: 7,
                    dropped: vec![("denied".into(), 2)],
                },
                ServiceMetrics {
                    name: "dns".into(),
                    packets: 0,
                    bytes: 0,
                    replies: None,
                    backends: vec![],
                    fingerprint: 8,
                    dropped: vec![],
                },
            ],
            conntrack_entries: 3,
            conntrack_capacity: 1024,
            nat_capacity: 1024,
            changed_slots: 2,
            dropped: vec![("no_backend".into(), 4), ("malformed".into(), 1)],
            new_flows: vec![("recorded".into(), 9, 3)],
            health_checks: vec![],
            node_drained: false,
            announced_vips: 0,
            sync: None,
        };
        let stats = serde_json::to_value(Stats::from(&snapshot)).unwrap();
        assert_eq!(
            stats,
            serde_json::json!({
                "services": [
                    { "service": "web", "packets": 30, "bytes": 1800,
                      "reply_packets": 25, "reply_bytes": 2500, "backends": [
                        { "address": "192.0.2.11", "port": 80, "name": "192.0.2.11", "packets": 10, "bytes": 600 },
                        { "address": "192.0.2.12", "port": 80, "name": "192.0.2.12", "packets": 20, "bytes": 1200 },
                    ], "dropped": [{ "reason": "denied", "packets": 2 }] },
                    { "service": "dns", "packets": 0, "bytes": 0, "backends": [], "dropped": [] },
                ],
                "dropped": [
                    { "reason": "no_backend", "packets": 4 },
                    { "reason": "malformed", "packets": 1 },
                ],
                "conntrack": {
                    "entries": 3,
                    "capacity": 1024,
                    "changed_slots": 2,
                    "new_flows": [{ "outcome": "recorded", "flows": 9, "per_second": 3 }],
                },
                "nat_capacity": 1024,
            })
        );
    }
}
