//! Prometheus metrics: rendered on every scrape from a [`Snapshot`] of the daemon's totals.
//!
//! The packet and byte totals live in BPF per-CPU maps and the health-check counts in the health
//! checker; the daemon sums them into a [`Snapshot`] and this module only encodes it. Counters are
//! therefore reported as constant values through a custom [`Collector`] (`ConstCounter`,
//! `ConstGauge`), not incremented in place. The text is OpenMetrics, produced by
//! prometheus-client's encoder, and ends with `# EOF`.
//!
//! Exported (see SPEC "Metrics"):
//! `lb_service_packets_total{service}`, `lb_service_bytes_total{service}`,
//! `lb_service_reply_packets_total{service}`, `lb_service_reply_bytes_total{service}` (`nat`
//! services only: the replies lb rewrote and sent on to their clients),
//! `lb_backend_packets_total{service,backend}`, `lb_backend_up{service,backend}` (0/1),
//! `lb_backend_weight{service,backend}`, `lb_conntrack_entries`, `lb_conntrack_capacity`, `lb_nat_capacity`, `lb_changed_slots`, `lb_new_flows_total{outcome}`,
//! `lb_dropped_total{reason}`, `lb_service_dropped_total{service,reason}` (the refused packets
//! of known services again, by service: `lb_dropped_total` is their sum plus the refused
//! packets whose service is not known), `lb_health_checks_total{service,backend,result}`,
//! With `[daemon.sync]`: `lb_sync_entries_sent_total{peer}`, `lb_sync_entries_received_total{peer}`,
//! `lb_sync_peer_up{peer}`, `lb_sync_rejected_total{reason}`.
//! `lb_service_table_fingerprint{service}` (the low 52 bits of the Maglev table's fingerprint:
//! a float holds them exactly), `lb_node_drained` (0/1), `lb_announced_vips`.

use std::future::Future;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// The content type of the OpenMetrics text format that [`render`] produces.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Everything one scrape reports, as plain totals.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<ServiceMetrics>,
    pub conntrack_entries: u64,
    pub conntrack_capacity: u64,
    /// Flows each NAT table holds (`NAT_FLOWS`, `NAT_REPLIES`).
    pub nat_capacity: u64,
    /// Maglev slots (all services) whose backend changed since a flow that may still live
    /// began: only their packets read the connection table.
    pub changed_slots: u64,
    /// Drop reason label → packets.
    pub dropped: Vec<(String, u64)>,
    /// What became of new flows that asked for a record: outcome label → (flows, flows per
    /// second over the last count).
    pub new_flows: Vec<(String, u64, u64)>,
    pub health_checks: Vec<HealthCount>,
    /// `lbctl node drain`.
    pub node_drained: bool,
    /// VIP routes in the announce table, as the announcer last found them (0 without
    /// `[daemon.announce]`).
    pub announced_vips: u64,
    /// With `[daemon.sync]`.
    pub sync: Option<SyncMetrics>,
}

/// The sync threads' counters.
#[derive(Clone, Debug, Default)]
pub struct SyncMetrics {
    pub peers: Vec<PeerMetrics>,
    /// Refusal reason label → datagrams.
    pub rejected: Vec<(String, u64)>,
}

#[derive(Clone, Debug, Default)]
pub struct PeerMetrics {
    pub peer: String,
    pub entries_sent: u64,
    pub entries_received: u64,
    pub up: bool,
}

/// The part of a 64-bit fingerprint a metric value carries: its low 52 bits, which a float64
/// (Prometheus' sample type) holds exactly; the last 13 hex digits of the fingerprint
/// `lbctl status` shows.
pub fn fingerprint_metric(fingerprint: u64) -> u64 {
    fingerprint & ((1 << 52) - 1)
}

#[derive(Clone, Debug, Default)]
pub struct ServiceMetrics {
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
    /// A `nat` service's replies rewritten and sent on to their clients: (packets, bytes as
    /// sent). None for other services (their replies do not cross lb).
    pub replies: Option<(u64, u64)>,
    pub backends: Vec<BackendMetrics>,
    /// The Maglev table's fingerprint (all 64 bits).
    pub fingerprint: u64,
    /// The service's refused packets: drop reason label → packets (every reason).
    pub dropped: Vec<(String, u64)>,
}

#[derive(Clone, Debug, Default)]
pub struct BackendMetrics {
    pub address: String,
    /// The port it serves on.
    pub port: u16,
    /// Its `backend` label: its address, or `address:port` when its service has that address
    /// more than once (`config::Service::backend_name`), so existing label values never change.
    pub name: String,
    pub packets: u64,
    /// Carried for callers such as lbctl; not exported (SPEC has no `lb_backend_bytes_total`).
    pub bytes: u64,
    pub up: bool,
    pub weight: u32,
}

#[derive(Clone, Debug, Default)]
pub struct HealthCount {
    pub service: String,
    pub backend: String,
    /// "ok" | "fail".
    pub result: String,
    pub count: u64,
}

/// Encodes a [`Snapshot`] on each scrape.
#[derive(Debug)]
struct SnapshotCollector(Snapshot);

/// Writes one metric family: a descriptor, then one sample per label set.
///
/// `name` is the family name; the OpenMetrics encoder appends `_total` to counter samples.
fn family<L, M>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error>
where
    L: EncodeLabelSet,
    M: EncodeMetric + TypedMetric,
{
    let mut metric = encoder.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let backends = || {
            s.services.iter().flat_map(|svc| {
                svc.backends
                    .iter()
                    .map(move |b| (svc.name.as_str(), b.name.as_str(), b))
            })
        };

        family(
            &mut encoder,
            "lb_service_packets",
            "Packets forwarded for the service.",
            s.services.iter().map(|svc| {
                (
                    [("service", svc.name.as_str())],
                    ConstCounter::new(svc.packets),
                )
            }),
        )?;
        family(
            &mut encoder,
            "lb_service_bytes",
            "Bytes forwarded for the service.",
            s.services.iter().map(|svc| {
                (
                    [("service", svc.name.as_str())],
                    ConstCounter::new(svc.bytes),
                )
            }),
        )?;
        let replies = || {
            s.services
                .iter()
                .filter_map(|svc| Some((svc.name.as_str(), svc.replies?)))
        };
        family(
            &mut encoder,
            "lb_service_reply_packets",
            "Replies of the nat service's backends rewritten and sent on to their clients.",
            replies().map(|(name, (packets, _))| ([("service", name)], ConstCounter::new(packets))),
        )?;
        family(
            &mut encoder,
            "lb_service_reply_bytes",
            "Bytes (frames as sent) of the nat service's replies sent on to their clients.",
            replies().map(|(name, (_, bytes))| ([("service", name)], ConstCounter::new(bytes))),
        )?;
        family(
            &mut encoder,
            "lb_backend_packets",
            "Packets forwarded to the backend.",
            backends().map(|(svc, addr, b)| {
                (
                    [("service", svc), ("backend", addr)],
                    ConstCounter::new(b.packets),
                )
            }),
        )?;
        family(
            &mut encoder,
            "lb_backend_up",
            "Whether the backend is up (1) or down (0) by its health check.",
            backends().map(|(svc, addr, b)| {
                (
                    [("service", svc), ("backend", addr)],
                    ConstGauge::new(u64::from(b.up)),
                )
            }),
        )?;
        family(
            &mut encoder,
            "lb_backend_weight",
            "Configured weight of the backend (0: drained).",
            backends().map(|(svc, addr, b)| {
                (
                    [("service", svc), ("backend", addr)],
                    ConstGauge::new(b.weight),
                )
            }),
        )?;
        family(
            &mut encoder,
            "lb_service_table_fingerprint",
            "Low 52 bits of the fingerprint of the service's Maglev table (keyed with the hash \
             seed; the last 13 hex digits of lbctl status's): equal on every node that places \
             every client of the service alike.",
            s.services.iter().map(|svc| {
                (
                    [("service", svc.name.as_str())],
                    ConstGauge::new(fingerprint_metric(svc.fingerprint)),
                )
            }),
        )?;
        let metric = encoder.encode_descriptor(
            "lb_node_drained",
            "Whether the node is drained (lbctl node drain): it announces no VIP.",
            None,
            ConstGauge::<u64>::TYPE,
        )?;
        ConstGauge::new(u64::from(s.node_drained)).encode(metric)?;
        let metric = encoder.encode_descriptor(
            "lb_announced_vips",
            "VIP host routes in the announce table ([daemon.announce]; 0 without it).",
            None,
            ConstGauge::<u64>::TYPE,
        )?;
        ConstGauge::new(s.announced_vips).encode(metric)?;
        if let Some(sync) = &s.sync {
            let peer = |p: &PeerMetrics| [("peer", p.peer.clone())];
            family(
                &mut encoder,
                "lb_sync_entries_sent",
                "Flows sent to the peer ([daemon.sync]).",
                sync.peers
                    .iter()
                    .map(|p| (peer(p), ConstCounter::new(p.entries_sent))),
            )?;
            family(
                &mut encoder,
                "lb_sync_entries_received",
                "Flows received from the peer and taken ([daemon.sync]).",
                sync.peers
                    .iter()
                    .map(|p| (peer(p), ConstCounter::new(p.entries_received))),
            )?;
            family(
                &mut encoder,
                "lb_sync_peer_up",
                "Whether the peer was heard within the last 3 s.",
                sync.peers
                    .iter()
                    .map(|p| (peer(p), ConstGauge::new(u64::from(p.up)))),
            )?;
            family(
                &mut encoder,
                "lb_sync_rejected",
                "Sync datagrams refused, by reason.",
                sync.rejected
                    .iter()
                    .map(|(r, n)| ([("reason", r.clone())], ConstCounter::new(*n))),
            )?;
        }
        let metric = encoder.encode_descriptor(
            "lb_conntrack_entries",
            "Entries in the connection table.",
            None,
            ConstGauge::<u64>::TYPE,
        )?;
        ConstGauge::new(s.conntrack_entries).encode(metric)?;
        let metric = encoder.encode_descriptor(
            "lb_conntrack_capacity",
            "Capacity of the connection table.",
            None,
            ConstGauge::<u64>::TYPE,
        )?;
        ConstGauge::new(s.conntrack_capacity).encode(metric)?;
        let metric = encoder.encode_descriptor(
            "lb_nat_capacity",
            "Flows each NAT table holds (the smallest size while no service uses nat and \
             daemon.nat_entries is not set).",
            None,
            ConstGauge::<u64>::TYPE,
        )?;
        ConstGauge::new(s.nat_capacity).encode(metric)?;
        let metric = encoder.encode_descriptor(
            "lb_changed_slots",
            "Maglev slots (all services) whose backend changed since a flow that may still \
             live began: only packets on them read and write the connection table.",
            None,
            ConstGauge::<u64>::TYPE,
        )?;
        ConstGauge::new(s.changed_slots).encode(metric)?;
        family(
            &mut encoder,
            "lb_dropped",
            "VIP packets not forwarded by the XDP program, by reason: dropped (no_backend, \
             no_egress, too_big_suppressed), answered with ICMP or dropped (too_big), or passed \
             up to the kernel (malformed, unsupported_fragment, missing_state), or dropped for \
             the service's client filters (denied).",
            s.dropped.iter().map(|(reason, packets)| {
                ([("reason", reason.as_str())], ConstCounter::new(*packets))
            }),
        )?;
        family(
            &mut encoder,
            "lb_new_flows",
            "New flows on changed Maglev slots (the only ones that need a record), by outcome: \
             recorded, over_limit (above daemon.new_flow_limit: balanced without a record) or \
             no_room (their set held only established flows' records).",
            s.new_flows.iter().map(|(outcome, flows, _)| {
                ([("outcome", outcome.as_str())], ConstCounter::new(*flows))
            }),
        )?;
        family(
            &mut encoder,
            "lb_service_dropped",
            "The service's VIP packets not forwarded by the XDP program, by reason (as \
             lb_dropped, which also counts those whose service is not known).",
            s.services.iter().flat_map(|svc| {
                svc.dropped.iter().map(|(reason, packets)| {
                    (
                        [("service", svc.name.as_str()), ("reason", reason.as_str())],
                        ConstCounter::new(*packets),
                    )
                })
            }),
        )?;
        family(
            &mut encoder,
            "lb_health_checks",
            "Health checks run, by result.",
            s.health_checks.iter().map(|h| {
                (
                    [
                        ("service", h.service.as_str()),
                        ("backend", h.backend.as_str()),
                        ("result", h.result.as_str()),
                    ],
                    ConstCounter::new(h.count),
                )
            }),
        )?;
        Ok(())
    }
}

/// Renders a snapshot as OpenMetrics text (ending with `# EOF`), served with [`CONTENT_TYPE`].
pub fn render(s: &Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(s.clone())));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("encoding into a String does not fail");
    out
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes, rendering `snapshot()` on every
/// scrape, at most `limits::METRICS.connections` connections at a time (idle ones are closed). Every other path answers 404 (and another method on `/metrics` too; HEAD is answered
/// like GET, without a body).
pub async fn serve<F, Fut>(
    listener: tokio::net::TcpListener,
    snapshot: F,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Snapshot> + Send,
{
    let scrape = move || async move {
        let text = render(&snapshot().await);
        ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
    };
    let app = Router::new()
        .route("/metrics", get(scrape).fallback(not_found))
        .fallback(not_found);
    axum::serve(
        crate::limits::Bounded::new(listener, crate::limits::METRICS),
        app,
    )
    .with_graceful_shutdown(shutdown)
    .await
}

async fn not_found() -> Response {
    StatusCode::NOT_FOUND.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn backend(address: &str, packets: u64, up: bool, weight: u32) -> BackendMetrics {
        BackendMetrics {
            address: address.into(),
            port: 80,
            name: address.into(),
            packets,
            bytes: packets * 100,
            up,
            weight,
        }
    }

    fn sample() -> Snapshot {
        Snapshot {
            services: vec![
                ServiceMetrics {
                    name: "web".into(),
                    packets: 1000,
                    bytes: 150_000,
                    replies: Some((800, 960_000)),
                    backends: vec![
                        backend("192.0.2.11", 600, true, 100),
                        backend("192.0.2.12", 400, false, 50),
                        // One host on two ports: each named with its port.
                        BackendMetrics {
                            name: "192.0.2.13:8080".into(),
                            ..backend("192.0.2.13", 3, true, 100)
                        },
                        BackendMetrics {
                            name: "192.0.2.13:8081".into(),
                            ..backend("192.0.2.13", 5, false, 100)
                        },
                    ],
                    fingerprint: 0xfedc_ba98_7654_3210,
                    dropped: vec![("no_backend".into(), 4), ("denied".into(), 9)],
                },
                ServiceMetrics {
                    name: "dns".into(),
                    packets: 7,
                    bytes: 420,
                    replies: None,
                    backends: vec![backend("2001:db8::53", 7, true, 0)],
                    fingerprint: 1,
                    dropped: vec![],
                },
            ],
            node_drained: true,
            announced_vips: 2,
            sync: Some(SyncMetrics {
                peers: vec![PeerMetrics {
                    peer: "192.0.2.3:9918".into(),
                    entries_sent: 5,
                    entries_received: 7,
                    up: true,
                }],
                rejected: vec![("other_seed".into(), 2)],
            }),
            conntrack_entries: 12,
            conntrack_capacity: 1_048_576,
            nat_capacity: 262_144,
            changed_slots: 7,
            dropped: vec![("malformed".into(), 3), ("no_backend".into(), 5)],
            new_flows: vec![("recorded".into(), 11, 2), ("over_limit".into(), 4, 0)],
            health_checks: vec![
                HealthCount {
                    service: "web".into(),
                    backend: "192.0.2.11".into(),
                    result: "ok".into(),
                    count: 42,
                },
                HealthCount {
                    service: "web".into(),
                    backend: "192.0.2.12".into(),
                    result: "fail".into(),
                    count: 9,
                },
            ],
        }
    }

    /// Every sample line "name{labels} value" of the exposition.
    fn samples(text: &str) -> Vec<(String, String)> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("sample line");
                (series.to_string(), value.to_string())
            })
            .collect()
    }

    const EXPECTED: &[(&str, &str)] = &[
        (r#"lb_service_packets_total{service="web"}"#, "1000"),
        (r#"lb_service_packets_total{service="dns"}"#, "7"),
        (r#"lb_service_bytes_total{service="web"}"#, "150000"),
        (r#"lb_service_bytes_total{service="dns"}"#, "420"),
        (r#"lb_service_reply_packets_total{service="web"}"#, "800"),
        (r#"lb_service_reply_bytes_total{service="web"}"#, "960000"),
        (
            r#"lb_backend_packets_total{service="web",backend="192.0.2.11"}"#,
            "600",
        ),
        (
            r#"lb_backend_packets_total{service="web",backend="192.0.2.12"}"#,
            "400",
        ),
        (
            r#"lb_backend_packets_total{service="web",backend="192.0.2.13:8080"}"#,
            "3",
        ),
        (
            r#"lb_backend_packets_total{service="web",backend="192.0.2.13:8081"}"#,
            "5",
        ),
        (
            r#"lb_backend_packets_total{service="dns",backend="2001:db8::53"}"#,
            "7",
        ),
        (r#"lb_backend_up{service="web",backend="192.0.2.11"}"#, "1"),
        (r#"lb_backend_up{service="web",backend="192.0.2.12"}"#, "0"),
        (
            r#"lb_backend_up{service="web",backend="192.0.2.13:8080"}"#,
            "1",
        ),
        (
            r#"lb_backend_up{service="web",backend="192.0.2.13:8081"}"#,
            "0",
        ),
        (
            r#"lb_backend_up{service="dns",backend="2001:db8::53"}"#,
            "1",
        ),
        (
            r#"lb_backend_weight{service="web",backend="192.0.2.11"}"#,
            "100",
        ),
        (
            r#"lb_backend_weight{service="web",backend="192.0.2.12"}"#,
            "50",
        ),
        (
            r#"lb_backend_weight{service="web",backend="192.0.2.13:8080"}"#,
            "100",
        ),
        (
            r#"lb_backend_weight{service="web",backend="192.0.2.13:8081"}"#,
            "100",
        ),
        (
            r#"lb_backend_weight{service="dns",backend="2001:db8::53"}"#,
            "0",
        ),
        (
            r#"lb_service_table_fingerprint{service="web"}"#,
            "3582863703552528",
        ),
        (r#"lb_service_table_fingerprint{service="dns"}"#, "1"),
        ("lb_node_drained", "1"),
        ("lb_announced_vips", "2"),
        (r#"lb_sync_entries_sent_total{peer="192.0.2.3:9918"}"#, "5"),
        (
            r#"lb_sync_entries_received_total{peer="192.0.2.3:9918"}"#,
            "7",
        ),
        (r#"lb_sync_peer_up{peer="192.0.2.3:9918"}"#, "1"),
        (r#"lb_sync_rejected_total{reason="other_seed"}"#, "2"),
        ("lb_conntrack_entries", "12"),
        ("lb_conntrack_capacity", "1048576"),
        ("lb_nat_capacity", "262144"),
        ("lb_changed_slots", "7"),
        (r#"lb_dropped_total{reason="malformed"}"#, "3"),
        (r#"lb_dropped_total{reason="no_backend"}"#, "5"),
        (r#"lb_new_flows_total{outcome="recorded"}"#, "11"),
        (r#"lb_new_flows_total{outcome="over_limit"}"#, "4"),
        (
            r#"lb_service_dropped_total{service="web",reason="no_backend"}"#,
            "4",
        ),
        (
            r#"lb_service_dropped_total{service="web",reason="denied"}"#,
            "9",
        ),
        (
            r#"lb_health_checks_total{service="web",backend="192.0.2.11",result="ok"}"#,
            "42",
        ),
        (
            r#"lb_health_checks_total{service="web",backend="192.0.2.12",result="fail"}"#,
            "9",
        ),
    ];

    #[test]
    fn metrics_render_every_sample() {
        let text = render(&sample());
        let got = samples(&text);
        let expected: Vec<(String, String)> = EXPECTED
            .iter()
            .map(|(s, v)| (s.to_string(), v.to_string()))
            .collect();
        assert_eq!(got, expected, "full text:\n{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn metrics_render_help_and_type() {
        let text = render(&sample());
        for (name, kind) in [
            ("lb_service_packets", "counter"),
            ("lb_service_bytes", "counter"),
            ("lb_service_reply_packets", "counter"),
            ("lb_service_reply_bytes", "counter"),
            ("lb_backend_packets", "counter"),
            ("lb_backend_up", "gauge"),
            ("lb_backend_weight", "gauge"),
            ("lb_conntrack_entries", "gauge"),
            ("lb_conntrack_capacity", "gauge"),
            ("lb_nat_capacity", "gauge"),
            ("lb_service_table_fingerprint", "gauge"),
            ("lb_service_dropped", "counter"),
            ("lb_node_drained", "gauge"),
            ("lb_announced_vips", "gauge"),
            ("lb_sync_entries_sent", "counter"),
            ("lb_sync_entries_received", "counter"),
            ("lb_sync_peer_up", "gauge"),
            ("lb_sync_rejected", "counter"),
            ("lb_dropped", "counter"),
            ("lb_health_checks", "counter"),
        ] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("# HELP {name} "))),
                "no HELP for {name}:\n{text}"
            );
            assert!(
                text.lines().any(|l| l == format!("# TYPE {name} {kind}")),
                "no TYPE {kind} for {name}:\n{text}"
            );
        }
    }

    /// `lb_dropped_total` counts every VIP packet not forwarded, most of them passed up to the
    /// kernel: its help names each reason with what became of its packets, not "dropped".
    #[test]
    fn metrics_dropped_help_is_true() {
        let text = render(&sample());
        let help = text
            .lines()
            .find_map(|l| l.strip_prefix("# HELP lb_dropped "))
            .expect("a HELP line for lb_dropped");
        assert!(!help.starts_with("Packets dropped"), "{help}");
        for word in ["not forwarded", "passed up", "dropped", "ICMP"] {
            assert!(help.contains(word), "{word:?} missing from {help:?}");
        }
        for reason in lb_common::Reason::ALL {
            assert!(
                help.contains(reason.label()),
                "reason {} missing from {help:?}",
                reason.label()
            );
        }
    }

    #[test]
    fn metrics_render_empty_and_escaped() {
        let text = render(&Snapshot::default());
        assert_eq!(
            samples(&text),
            vec![
                ("lb_node_drained".to_string(), "0".to_string()),
                ("lb_announced_vips".to_string(), "0".to_string()),
                ("lb_conntrack_entries".to_string(), "0".to_string()),
                ("lb_conntrack_capacity".to_string(), "0".to_string()),
                ("lb_nat_capacity".to_string(), "0".to_string()),
                ("lb_changed_slots".to_string(), "0".to_string()),
            ]
        );
        assert!(text.ends_with("# EOF\n"));

        let s = Snapshot {
            dropped: vec![("a\"b\\c\nd".into(), 1)],
            ..Default::default()
        };
        let text = render(&s);
        assert!(
            text.contains(r#"lb_dropped_total{reason="a\"b\\c\nd"} 1"#),
            "{text}"
        );
    }

    async fn request(addr: std::net::SocketAddr, method: &str, path: &str) -> (String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
        (head.to_string(), body.to_string())
    }

    fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    #[tokio::test]
    async fn metrics_serve_over_tcp() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, || async { sample() }, async {
            let _ = stopped.await;
        }));

        let (head, body) = request(addr, "GET", "/metrics").await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert_eq!(header(&head, "content-type"), Some(CONTENT_TYPE));
        assert_eq!(body, render(&sample()));

        let (head, _) = request(addr, "GET", "/other").await;
        assert!(head.starts_with("HTTP/1.1 404 "), "{head}");
        let (head, _) = request(addr, "GET", "/").await;
        assert!(head.starts_with("HTTP/1.1 404 "), "{head}");

        let (head, _) = request(addr, "POST", "/metrics").await;
        assert!(head.starts_with("HTTP/1.1 404 "), "{head}");

        stop.send(()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("server stops on shutdown")
            .unwrap()
            .unwrap();
    }
}
