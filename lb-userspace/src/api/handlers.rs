//! The API's read-only handlers (status, stats, lists, lookup, what a removal
//! would move). The handlers that change something are in `edits`.
//!
//! Handlers read the daemon's runtime state (`daemon`) under its lock and answer with the wire
//! types of `types`; an error answer is a [`Refusal`].

use std::{net::IpAddr, time::SystemTime};

use axum::{
    Json,
    extract::{Path as UrlPath, Query, State},
    http::StatusCode,
};
use lb_common::{FlowKey, NO_BACKEND, Slot, maglev_slot, slotstate};

use super::{snapshot, types::*};
use crate::{
    config::{BackendKey, Forwarding, HashMode, NoBackend, Protocol},
    daemon::{BackendRuntime, BackendState, Daemon, ServiceRuntime, Shared},
    datapath::Attachment,
    state,
};

/// An error answer: the status and lbd's message, as `{"error": ...}`.
pub struct Refusal(StatusCode, String);

impl axum::response::IntoResponse for Refusal {
    fn into_response(self) -> axum::response::Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

pub(super) fn not_found(m: String) -> Refusal {
    Refusal(StatusCode::NOT_FOUND, m)
}
pub(super) fn bad(m: String) -> Refusal {
    Refusal(StatusCode::BAD_REQUEST, m)
}
pub(super) fn conflict(m: String) -> Refusal {
    Refusal(StatusCode::CONFLICT, m)
}
pub(super) fn internal(e: impl std::fmt::Display) -> Refusal {
    Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

pub(super) type Reply<T> = Result<Json<T>, Refusal>;

// ---- status and stats ----

fn interface_status(a: &Attachment) -> InterfaceStatus {
    InterfaceStatus {
        name: a.interface.clone(),
        ifindex: a.ifindex,
        mode: a.mode.clone(),
        link_id: a.link_id,
        state: None,
        problem: None,
    }
}

pub(super) async fn status(State(shared): State<Shared>) -> Json<Status> {
    let mut status = status_of(&*shared.lock().await);
    // Each interface as it is now (netlink and link info), and the routes in the announce
    // table, without holding the daemon.
    let bpffs_dir = std::path::PathBuf::from(&status.bpffs_dir);
    match crate::netlink::Netlink::new() {
        Ok(netlink) => {
            announced_now(&netlink, &mut status.node).await;
            for i in &mut status.interfaces {
                match crate::daemon::interface_now(&netlink, &bpffs_dir, &i.name).await {
                    Ok(now) => {
                        i.state = Some(now.state);
                        i.ifindex = now.ifindex.unwrap_or(0);
                    }
                    Err(e) => i.problem = Some(format!("{e:#}")),
                }
            }
        }
        Err(e) => {
            for i in &mut status.interfaces {
                i.problem = Some(e.to_string());
            }
            if status.node.announce.is_some() {
                status.node.announce_problem = Some(e.to_string());
            }
        }
    }
    Json(status)
}

/// The node as the daemon sees it; `announced` is what the announcer last reported (see
/// `announced_now` for the kernel's word).
pub(super) fn node_of(d: &Daemon) -> NodeStatus {
    let report = d.announce_report();
    let report = report.borrow();
    let announce = d.announcing().map(|a| AnnounceConfig {
        table: a.table,
        protocol: a.protocol,
    });
    NodeStatus {
        node_name: d.config.daemon.node_name(),
        drained: d.node_drained(),
        serving: d.serving_vips().iter().map(|v| v.to_string()).collect(),
        announced: match announce {
            Some(_) => report.installed.iter().map(|v| v.to_string()).collect(),
            None => vec![],
        },
        announce_problem: announce.and(report.error.clone()),
        announce,
    }
}

/// Reads the announce table: `announced` becomes the VIP routes actually there.
async fn announced_now(netlink: &crate::netlink::Netlink, node: &mut NodeStatus) {
    let Some(a) = node.announce else {
        return;
    };
    let cfg = crate::config::Announce {
        table: a.table,
        protocol: a.protocol,
    };
    match crate::announce::installed(netlink, &cfg).await {
        Ok(vips) => node.announced = vips.iter().map(|v| v.to_string()).collect(),
        Err(e) => node.announce_problem = Some(e.to_string()),
    }
}

pub(super) async fn node(State(shared): State<Shared>) -> Json<NodeStatus> {
    let mut node = node_of(&*shared.lock().await);
    match crate::netlink::Netlink::new() {
        Ok(netlink) => announced_now(&netlink, &mut node).await,
        Err(e) if node.announce.is_some() => node.announce_problem = Some(e.to_string()),
        Err(_) => {}
    }
    Json(node)
}

fn status_of(d: &Daemon) -> Status {
    Status {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
        config: d.config_path.display().to_string(),
        uptime_s: d.started.elapsed().as_secs(),
        program_id: d.datapath.program_id(),
        layout_version: lb_common::LAYOUT_VERSION,
        bpffs_dir: d.config.daemon.bpffs_dir.display().to_string(),
        start: d.datapath.start.clone(),
        interfaces: d
            .datapath
            .attachments
            .iter()
            .map(interface_status)
            .collect(),
        node: node_of(d),
        services: d
            .services
            .iter()
            .map(|s| ServiceStatus {
                name: s.cfg.name.clone(),
                vip: s.cfg.vip,
                port: s.cfg.port,
                protocol: s.cfg.protocol,
                up: s
                    .backends
                    .iter()
                    .filter(|b| b.state() == BackendState::Up)
                    .count(),
                fingerprint: format!("{:016x}", s.fingerprint()),
            })
            .collect(),
        backends: d.services.iter().map(|s| s.backends.len()).sum(),
        peers: d.sync_status.as_ref().map(|s| peer_statuses(s)),
    }
}

fn peer_statuses(s: &crate::sync::SyncStatus) -> Vec<super::types::PeerStatus> {
    let peers = s.peers.lock().unwrap_or_else(|e| e.into_inner());
    peers
        .iter()
        .map(|p| super::types::PeerStatus {
            address: p.addr.map(|a| a.to_string()).unwrap_or_default(),
            node_name: p.node.clone(),
            last_heard_s: p.last_heard.map(|t| t.elapsed().as_secs_f64()),
            up: p.up(),
            agree: p.agree,
            refused: p.refused.map(|r| r.to_string()),
            entries_sent: p.entries_sent,
            entries_received: p.entries_received,
            entries_unplaced: p.entries_unplaced,
            drained: p.drained,
            datagrams_sent: p.datagrams_sent,
            bytes_sent: p.bytes_sent,
        })
        .collect()
}

fn selected<'a>(
    d: &'a Daemon,
    service: &Option<String>,
) -> Result<Vec<&'a ServiceRuntime>, Refusal> {
    match service {
        None => Ok(d.services.iter().collect()),
        Some(name) => Ok(vec![d.find_service(name).map_err(not_found)?]),
    }
}

pub(super) async fn stats(
    State(shared): State<Shared>,
    Query(f): Query<ServiceFilter>,
) -> Reply<Stats> {
    let d = shared.lock().await;
    let services = selected(&d, &f.service)?;
    Ok(Json(Stats::from(&snapshot::counters(&d, services))))
}

// ---- services ----

pub(super) async fn service_list(State(shared): State<Shared>) -> Json<Vec<ServiceInfo>> {
    let d = shared.lock().await;
    Json(
        d.services
            .iter()
            .map(|s| ServiceInfo {
                name: s.cfg.name.clone(),
                vip: s.cfg.vip,
                port: s.cfg.port,
                protocol: s.cfg.protocol,
                forwarding: s.cfg.forwarding,
                hash: s.cfg.hash,
                table_size: s.cfg.table_size,
                check: s.cfg.health.check,
                backends: s.backends.len(),
                up: s
                    .backends
                    .iter()
                    .filter(|b| b.state() == BackendState::Up)
                    .count(),
                allow: s.cfg.allow.clone(),
                deny: s.cfg.deny.clone(),
            })
            .collect(),
    )
}

// ---- backends ----

fn age(t: SystemTime) -> u64 {
    SystemTime::now()
        .duration_since(t)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(super) async fn backend_list(
    State(shared): State<Shared>,
    Query(f): Query<ServiceFilter>,
) -> Reply<Vec<BackendInfo>> {
    let d = shared.lock().await;
    let mut out = vec![];
    for s in selected(&d, &f.service)? {
        for b in &s.backends {
            let c = d.datapath.backend_counter(b.id);
            out.push(BackendInfo {
                service: s.cfg.name.clone(),
                address: b.cfg.address,
                name: s.name_of(b),
                weight: b.cfg.weight,
                state: b.state(),
                since_s: age(b.since),
                check: s.cfg.health.check,
                last_check: b.last.as_ref().map(|l| l.detail.clone()),
                last_check_ok: b
                    .last
                    .as_ref()
                    .map(|l| l.result == crate::health::CheckResult::Pass),
                last_check_age_s: b.last.as_ref().map(|l| age(l.at)),
                mac: b.hop.as_ref().map(|h| crate::daemon::mac_string(&h.mac)),
                port: if s.cfg.forwarding == Forwarding::Nat {
                    b.cfg.port_or(s.cfg.port)
                } else {
                    s.cfg.port
                },
                problem: b.hop_error.clone(),
                packets: c.packets,
                bytes: c.bytes,
            });
        }
    }
    Ok(Json(out))
}

pub(super) fn parse_address(s: &str) -> Result<IpAddr, Refusal> {
    s.parse()
        .map_err(|_| bad(format!("{s:?} is not an IP address")))
}

/// The backend a URL names (its address, and `?port=` when given), as its identity and weight;
/// a 404 naming what is missing, or a 400 listing the backends a bare address could mean.
pub(super) fn existing(
    d: &Daemon,
    name: &str,
    address: &str,
    port: Option<u16>,
) -> Result<(BackendKey, u32), Refusal> {
    let address = parse_address(address)?;
    let s = d.find_service(name).map_err(not_found)?;
    let b = s.cfg.select(address, port).map_err(|e| match e {
        NoBackend::Missing { .. } => not_found(e.to_string()),
        NoBackend::Ambiguous { .. } => bad(e.to_string()),
    })?;
    Ok((s.cfg.key_of(b), b.weight))
}

pub(super) async fn backend_remove_dry_run(
    State(shared): State<Shared>,
    UrlPath((name, address)): UrlPath<(String, String)>,
    Query(q): Query<PortQuery>,
) -> Reply<Removal> {
    let d = shared.lock().await;
    let (key, _) = existing(&d, &name, &address, q.port)?;
    let s = d.find_service(&name).map_err(not_found)?;
    let b = s.backend(key);
    let id = b.map(|b| b.id).unwrap_or(NO_BACKEND);
    let backend_name = b.map_or_else(|| key.to_string(), |b| s.name_of(b));
    let after = s.table_without(&d.seed, Some(id));
    let (mut moved, mut own, mut others, mut others_moved) = (0u64, 0u64, 0u64, 0u64);
    for (before, after) in s.table.iter().zip(&after) {
        moved += (before != after) as u64;
        if *before == id {
            own += 1;
        } else {
            others += 1;
            others_moved += (before != after) as u64;
        }
    }
    let total = s.table.len().max(1) as f64;
    Ok(Json(Removal {
        service: name,
        address: key.address,
        port: key.port,
        name: backend_name,
        table_size: s.cfg.table_size,
        moved_slots: moved,
        moved_share: moved as f64 / total,
        own_share: own as f64 / total,
        others_moved_share: if others == 0 {
            0.0
        } else {
            others_moved as f64 / others as f64
        },
    }))
}

// ---- lookup ----

pub(super) async fn lookup(
    State(shared): State<Shared>,
    Query(q): Query<LookupQuery>,
) -> Reply<Lookup> {
    let d = shared.lock().await;
    let client = parse_address(&q.client)?;
    let s = d.find_service(&q.service).map_err(not_found)?;
    if client.is_ipv4() != s.cfg.vip.is_ipv4() {
        return Err(bad(format!(
            "{client} is not of the VIP's address family ({})",
            s.cfg.vip
        )));
    }
    let flow = |sport: u16| FlowKey {
        src: state::to_addr(client),
        dst: state::to_addr(s.cfg.vip),
        sport: sport.to_be(),
        dport: s.cfg.port.to_be(),
        proto: s.cfg.protocol.number(),
        family: state::family(client),
        _pad: [0; 2],
    };
    if s.cfg.hash == HashMode::FiveTuple && q.port.is_none() {
        return Err(bad(format!(
            "service {} hashes the 5-tuple: give the client's port with --port",
            s.cfg.name
        )));
    }
    let Slot {
        hash: h,
        index: slot,
    } = maglev_slot(&d.seed, &s.value(), &flow(q.port.unwrap_or(0)))
        .ok_or_else(|| bad(format!("service {} has no Maglev table", s.cfg.name)))?;
    let by_id = |id: u32| s.by_id(id);
    let lookup = |backend: Option<(&ServiceRuntime, &BackendRuntime)>, reason: &str| {
        Ok(Json(Lookup {
            service: s.cfg.name.clone(),
            client,
            client_port: q.port,
            backend: backend.map(|(_, b)| b.cfg.address),
            backend_port: backend.map(|(sv, b)| b.cfg.port_or(sv.cfg.port)),
            backend_name: backend.map(|(sv, b)| sv.name_of(b)),
            reason: reason.into(),
            hash: h,
            slot,
            table_size: s.cfg.table_size,
            denied: None,
        }))
    };
    // The filters come first in the data path: a refused client reaches no backend.
    if let Some(why) = s.cfg.refuses(client) {
        let mut denied = lookup(None, "denied")?.0;
        denied.denied = Some(why);
        return Ok(Json(denied));
    }
    // With a port, a `nat` flow the program has recorded keeps the backend it was given
    // while that backend is in the service, usable, at the same address and port (as the
    // data path's `nat::flow_backend` decides).
    if let Some(port) = q.port
        && s.cfg.forwarding == Forwarding::Nat
        && let Some(e) = d.datapath.nat_flow(&flow(port))
        && e.service == s.id
        && let Some(b) = by_id(e.backend)
        && b.hop.is_some()
        && b.healthy
        && state::to_addr(b.cfg.address) == e.backend_addr
        && s.nat_port(b) == e.backend_port
    {
        return lookup(Some((s, b)), "nat-flow");
    }
    // With a port: what the flow's next packet (not a SYN) gets, decided as the data path
    // decides it (`slotstate::decide`) from the slot's state and the flow's record (read only
    // on a changed slot).
    if let Some(port) = q.port
        && let Some((hot, side)) = d.datapath.slot_lanes(s.id, slot)
    {
        let kind = if s.cfg.protocol == Protocol::Udp {
            slotstate::Kind::Udp
        } else {
            slotstate::Kind::Tcp
        };
        let decide = |sv: &ServiceRuntime, hot, side| {
            let record = || {
                d.datapath
                    .flow(&flow(port))
                    .filter(|e| e.service == sv.id)
                    .map(|e| e.backend)
            };
            slotstate::decide(hot, || side, kind, record, || true, &Usable(sv))
        };
        match decide(s, hot, side) {
            c if matches!(c.write, slotstate::Write::Touch { .. }) => {
                return lookup(by_service(s, c.backend), "connection-table");
            }
            c if c.backend == slotstate::DEFER => {
                // Decided again by the VIP's every-port service, its slot taken as changed.
                if let Some(every_port) = d.services.iter().find(|e| {
                    e.cfg.vip == s.cfg.vip && e.cfg.port == 0 && e.cfg.protocol == s.cfg.protocol
                }) && let Some(e_slot) = maglev_slot(&d.seed, &every_port.value(), &flow(port))
                    && let Some((e_hot, e_side)) =
                        d.datapath.slot_lanes(every_port.id, e_slot.index)
                {
                    let c = decide(
                        every_port,
                        slotstate::Hot::new(e_hot.current(), true),
                        e_side,
                    );
                    return lookup(by_service(every_port, c.backend), "every-port-service");
                }
            }
            c if hot.changed() && c.backend == side.old() && c.backend != hot.current() => {
                return lookup(by_service(s, c.backend), "previous-backend");
            }
            _ => {}
        }
    }
    let backend = s
        .table
        .get(slot as usize)
        .and_then(|&id| by_id(id))
        .map(|b| (s, b));
    lookup(backend, "hash")
}

/// Backend `id` of `s`, with its service.
fn by_service(s: &ServiceRuntime, id: u32) -> Option<(&ServiceRuntime, &BackendRuntime)> {
    s.by_id(id).map(|b| (s, b))
}

/// A service's backends as the data path's choice sees them (`slotstate::Backends`): in the
/// data path and not down (drained ones included).
struct Usable<'a>(&'a ServiceRuntime);

impl slotstate::Backends for Usable<'_> {
    fn usable(&self, id: u32) -> bool {
        self.0
            .backends
            .iter()
            .any(|b| b.id == id && b.hop.is_some() && b.healthy)
    }
}
