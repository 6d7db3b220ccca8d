//! What a change of the config means for the runtime state, decided by pure functions (no
//! kernel, no lock, no I/O): which hops must be resolved first (`hops_needed`), then which
//! services and backends come, go or change, the ids the data path will know them by, and
//! which health checkers start (`plan`). `Daemon::reconcile` carries the plan out.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    time::SystemTime,
};

use lb_common::{MAX_BACKENDS, MAX_SERVICES, ServiceKey, backend_flags};

use super::model::{BackendRuntime, HopRequest, Hops, ResolveError, ServiceRuntime, service_key};
use crate::{
    config::{BackendKey, CheckKind, Cidr, Config, Protocol},
    health, state,
};

/// Why a plan cannot be made (nothing was changed).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// Every id the data path has for services (or backends) is taken, counting those freed by
    /// this very change (they are given again only in a later one).
    #[error("all {max} data-path slots are in use")]
    Full { max: u32 },
}

/// One change, as reported (`Display` is its line for the log and for lbctl).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    ServiceRemoved {
        service: String,
        id: u32,
        /// Its port and backends, whose checkers and drained weights go with it.
        port: u16,
        backends: Vec<BackendKey>,
    },
    ServiceAdded {
        service: String,
        id: u32,
    },
    BackendWeight {
        service: String,
        /// How lbd names the backend (`config::Service::backend_name`).
        name: String,
        from: u32,
        to: u32,
    },
    BackendAdded {
        service: String,
        backend: BackendKey,
        name: String,
        id: u32,
    },
    /// The service's address, port or protocol changed (its id stays).
    ServiceMoved {
        service: String,
        vip: IpAddr,
        port: u16,
        protocol: Protocol,
    },
    BackendRemoved {
        service: String,
        backend: BackendKey,
        name: String,
        id: u32,
    },
    /// Prefixes came to or left a client filter list (`list`: "allow" or "deny").
    Filters {
        service: String,
        list: &'static str,
        added: Vec<Cidr>,
        removed: Vec<Cidr>,
        /// Prefixes in the list now.
        now: usize,
    },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::ServiceRemoved { service, .. } => write!(f, "service {service} removed"),
            Change::ServiceAdded { service, .. } => write!(f, "service {service} added"),
            Change::BackendWeight {
                service,
                name,
                from,
                to,
            } => write!(f, "service {service}: backend {name} weight {from} -> {to}"),
            Change::BackendAdded { service, name, .. } => {
                write!(f, "service {service}: backend {name} added")
            }
            Change::ServiceMoved {
                service,
                vip,
                port,
                protocol,
            } => write!(f, "service {service}: now {vip} port {port} {protocol}"),
            Change::BackendRemoved { service, name, .. } => {
                write!(f, "service {service}: backend {name} removed")
            }
            Change::Filters {
                service,
                list,
                added,
                removed,
                now,
            } => {
                let shown = |v: &[Cidr]| {
                    let mut text: Vec<String> = v.iter().take(5).map(|c| c.to_string()).collect();
                    if v.len() > 5 {
                        text.push(format!("and {} more", v.len() - 5));
                    }
                    text.join(", ")
                };
                write!(f, "service {service}: {list} list")?;
                if !added.is_empty() {
                    write!(f, " +{}", shown(added))?;
                }
                if !removed.is_empty() {
                    write!(f, " -{}", shown(removed))?;
                }
                match (*list, *now) {
                    ("allow", 0) => write!(f, " (now empty: every client allowed)"),
                    (_, n) => write!(f, " ({n} prefix{})", if n == 1 { "" } else { "es" }),
                }
            }
        }
    }
}

/// A backend's health checker after the change: started anew (`restart`: a new backend, or
/// the service's health settings changed), or else only when it has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub service: String,
    pub backend: BackendKey,
    pub start: health::Start,
    pub restart: bool,
}

/// What `plan` decided.
#[derive(Debug)]
pub struct Plan {
    /// The runtime state to go to, in the file's order: what stays keeps its id, hop and
    /// health; what comes gets a free id.
    pub services: Vec<ServiceRuntime>,
    /// What changed, in the order it is reported.
    pub changes: Vec<Change>,
    /// Every backend's checker.
    pub checks: Vec<Check>,
}

/// What a backend is across a change of its service: its address and its own port, None when it
/// serves on the service's port (and so follows a change of it).
fn follows(b: &crate::config::Backend, service_port: u16) -> (IpAddr, Option<u16>) {
    (b.address, b.port.filter(|&p| p != service_port))
}

/// Lowest id in `0..max` not in `taken`, which then holds it.
fn take_id(taken: &mut Vec<u32>, max: u32) -> Result<u32, PlanError> {
    let id = (0..max)
        .find(|id| !taken.contains(id))
        .ok_or(PlanError::Full { max })?;
    taken.push(id);
    Ok(id)
}

/// The hops going from `current` to `new` needs resolved: those of new backends, and of every
/// backend of a service whose forwarding (or tunnel source) or fixed MAC changes.
pub fn hops_needed(current: &[ServiceRuntime], new: &Config) -> Vec<(String, HopRequest)> {
    let mut needed = vec![];
    for ns in &new.services {
        let existing = current.iter().find(|s| s.cfg.name == ns.name);
        let same_forwarding = existing.is_some_and(|s| {
            s.cfg.forwarding == ns.forwarding && s.cfg.tunnel_source == ns.tunnel_source
        });
        for nb in &ns.backends {
            let known = existing.and_then(|s| s.backend(ns.key_of(nb)));
            // One request per address: its backends on several ports share the hop.
            let asked = needed.iter().any(|(n, r): &(String, HopRequest)| {
                *n == ns.name && r.backend.address == nb.address
            });
            if !asked && (!same_forwarding || known.is_none_or(|b| b.cfg.mac != nb.mac)) {
                needed.push((ns.name.clone(), HopRequest::of(ns, nb)));
            }
        }
    }
    needed
}

/// Goes from `current` to `new`, keeping the runtime state (ids, hops, health) of what stays;
/// `hops` holds the resolutions `hops_needed` asked for (a new backend without one gets no
/// traffic until the background retry resolves it). `now` is when states change.
///
/// Ids freed by this change are not given again before the data path has let go of them (in a
/// later change), so no packet of what went meets what comes under the same id.
pub fn plan(
    current: &[ServiceRuntime],
    new: &Config,
    hops: Hops,
    now: SystemTime,
) -> Result<Plan, PlanError> {
    let mut changes = vec![];
    let mut checks = vec![];
    let mut service_ids: Vec<u32> = current.iter().map(|s| s.id).collect();
    let mut backend_ids: Vec<u32> = current
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| b.id))
        .collect();
    for s in current.iter().rev() {
        if !new.services.iter().any(|n| n.name == s.cfg.name) {
            changes.push(Change::ServiceRemoved {
                service: s.cfg.name.clone(),
                id: s.id,
                port: s.cfg.port,
                backends: s.backends.iter().map(|b| s.key_of(b)).collect(),
            });
        }
    }
    let mut services = vec![];
    for ns in &new.services {
        let existing = current.iter().find(|s| s.cfg.name == ns.name);
        let id = match existing {
            Some(s) => s.id,
            None => {
                let id = take_id(&mut service_ids, MAX_SERVICES)?;
                changes.push(Change::ServiceAdded {
                    service: ns.name.clone(),
                    id,
                });
                id
            }
        };
        let old: &[BackendRuntime] = existing.map_or(&[], |s| &s.backends);
        let health_on = ns.health.check != CheckKind::None;
        let mut backends = vec![];
        let mut added = vec![];
        // A backend stays (keeping its id, hop and health) when the new config has it: the same
        // address on the same port of its own, or on the service's port (whatever that is now).
        let old_port = existing.map_or(ns.port, |s| s.cfg.port);
        for nb in &ns.backends {
            let key = ns.key_of(nb);
            // Backends of one address share its hop.
            let hop = hops.get(&(ns.name.clone(), nb.address));
            let same = |b: &&BackendRuntime| follows(&b.cfg, old_port) == follows(nb, ns.port);
            match old.iter().find(same) {
                Some(b) => {
                    let mut b = b.clone();
                    if b.cfg.weight != nb.weight {
                        changes.push(Change::BackendWeight {
                            service: ns.name.clone(),
                            name: ns.backend_name(nb),
                            from: b.cfg.weight,
                            to: nb.weight,
                        });
                        if (b.cfg.weight == 0) != (nb.weight == 0) {
                            b.since = now;
                        }
                    }
                    b.cfg = nb.clone();
                    if let Some(hop) = hop {
                        b.set_hop_of(hop);
                    }
                    backends.push(b);
                }
                None => {
                    let bid = take_id(&mut backend_ids, MAX_BACKENDS)?;
                    let mut b = BackendRuntime {
                        id: bid,
                        cfg: nb.clone(),
                        hop: None,
                        hop_error: None,
                        // Joins once its first check passes.
                        healthy: !health_on,
                        last: None,
                        since: now,
                    };
                    match hop {
                        Some(hop) => b.set_hop_of(hop),
                        None => b.set_hop(Err(ResolveError::NotYet)),
                    }
                    backends.push(b);
                    added.push(key);
                    changes.push(Change::BackendAdded {
                        service: ns.name.clone(),
                        backend: key,
                        name: ns.backend_name(nb),
                        id: bid,
                    });
                }
            }
        }
        if let Some(s) = existing {
            if service_key(&s.cfg) != service_key(ns) {
                changes.push(Change::ServiceMoved {
                    service: ns.name.clone(),
                    vip: ns.vip,
                    port: ns.port,
                    protocol: ns.protocol,
                });
            }
            for b in old {
                let key = s.key_of(b);
                if !ns
                    .backends
                    .iter()
                    .any(|n| follows(n, ns.port) == follows(&b.cfg, s.cfg.port))
                {
                    changes.push(Change::BackendRemoved {
                        service: ns.name.clone(),
                        backend: key,
                        name: s.name_of(b),
                        id: b.id,
                    });
                }
            }
        }
        let old_lists =
            existing.map_or((&[][..], &[][..]), |s| (&s.cfg.allow[..], &s.cfg.deny[..]));
        for (list, old, new) in [
            ("allow", old_lists.0, &ns.allow[..]),
            ("deny", old_lists.1, &ns.deny[..]),
        ] {
            let (old_set, new_set): (BTreeSet<&Cidr>, BTreeSet<&Cidr>) =
                (old.iter().collect(), new.iter().collect());
            let added: Vec<Cidr> = new
                .iter()
                .filter(|c| !old_set.contains(c))
                .copied()
                .collect();
            let removed: Vec<Cidr> = old
                .iter()
                .filter(|c| !new_set.contains(c))
                .copied()
                .collect();
            if !added.is_empty() || !removed.is_empty() {
                changes.push(Change::Filters {
                    service: ns.name.clone(),
                    list,
                    added,
                    removed,
                    now: new.len(),
                });
            }
        }
        // Health checkers follow the service's settings.
        // With `nat` a backend is checked on its own port: a change of forwarding or of that
        // port restarts its checker too.
        let spec_changed = existing
            .is_some_and(|s| s.cfg.health != ns.health || s.cfg.forwarding != ns.forwarding);
        for b in &backends {
            let key = b.cfg.key(ns.port);
            let is_new = added.contains(&key);
            // On the service's port, which changed: checked on the new one.
            let port_changed = old
                .iter()
                .any(|o| o.id == b.id && o.cfg.port_or(old_port) != key.port);
            checks.push(Check {
                service: ns.name.clone(),
                backend: key,
                start: if is_new {
                    health::Start::PendingFirstCheck
                } else if b.healthy {
                    health::Start::Up
                } else {
                    health::Start::Down
                },
                restart: spec_changed || is_new || port_changed,
            });
        }
        services.push(ServiceRuntime::new(id, ns.clone(), backends));
    }
    Ok(Plan {
        services,
        changes,
        checks,
    })
}

/// What the pinned maps of a running (or earlier) data path hold: each service's id by key,
/// each backend's id and flags by service id, address and port (the entry's: network order,
/// 0 but with `nat`).
#[derive(Debug, Default)]
pub struct Pinned {
    pub services: HashMap<ServiceKey, u32>,
    pub backends: HashMap<(u32, lb_common::Addr, u16), (u32, u8)>,
}

/// The runtime state lbd starts from: services with ids, from the config and what the pinned
/// maps already hold, so a restarted lbd keeps every id the data path (and its connection
/// table) uses. With `adopting` (the data path was running), a backend keeps the health its
/// checks last gave, until lbd's own checks have run. No hop is resolved yet.
pub fn initial(
    config: &Config,
    pinned: &Pinned,
    adopting: bool,
    now: SystemTime,
) -> Result<Vec<ServiceRuntime>, PlanError> {
    let mut services: Vec<ServiceRuntime> = vec![];
    let mut service_ids: Vec<u32> = pinned.services.values().copied().collect();
    let mut backend_ids: Vec<u32> = pinned.backends.values().map(|(id, _)| *id).collect();
    for s in &config.services {
        let id = match pinned.services.get(&service_key(s)) {
            Some(&id) if !services.iter().any(|x| x.id == id) => id,
            _ => take_id(&mut service_ids, MAX_SERVICES)?,
        };
        let mut backends = vec![];
        for b in &s.backends {
            let port = if s.forwarding == crate::config::Forwarding::Nat {
                b.port_or(s.port).to_be()
            } else {
                0
            };
            let pinned = pinned.backends.get(&(id, state::to_addr(b.address), port));
            let bid = match pinned {
                Some(&(bid, _)) => bid,
                None => take_id(&mut backend_ids, MAX_BACKENDS)?,
            };
            let healthy = match pinned {
                Some(&(_, flags)) if adopting => flags & backend_flags::DOWN == 0,
                _ => true,
            };
            backends.push(BackendRuntime {
                id: bid,
                cfg: b.clone(),
                hop: None,
                hop_error: None,
                healthy,
                last: None,
                since: now,
            });
        }
        services.push(ServiceRuntime::new(id, s.clone(), backends));
    }
    Ok(services)
}

#[cfg(test)]
mod tests;
