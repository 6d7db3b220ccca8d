//! The handlers that change something: each edits the config file in memory, and `change`
//! validates the result, applies it to the data path (`Daemon::reconcile`) and writes the file.

use axum::{
    Json,
    extract::{Path as UrlPath, Query, State},
};

use super::{handlers::*, types::*};
use crate::{
    config,
    config_edit::ConfigFile,
    daemon::{Daemon, Shared},
};

/// Applies an edit of the config file: edit in memory (`edit` also checks what it needs of the
/// daemon's state), validate, apply to the data path, then write the file. An invalid result
/// changes nothing. One change at a time; the hops of new backends are resolved without
/// holding the daemon's lock, so status, metrics and health changes go on meanwhile (see
/// `Shared`).
async fn change(
    shared: &Shared,
    edit: impl FnOnce(&mut Daemon, &mut ConfigFile) -> Result<(), Refusal>,
) -> Reply<Changed> {
    let _one_change_at_a_time = shared.change().await;
    let (file, new) = {
        let mut d = shared.lock().await;
        let mut file = ConfigFile::load(&d.config_path).map_err(internal)?;
        edit(&mut d, &mut file)?;
        let loaded = config::parse(&file.text()).map_err(|problems| {
            bad(problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; "))
        })?;
        if loaded.config.daemon != d.config.daemon {
            return Err(conflict(format!(
                "{} was edited by hand since lbd read it ([daemon] differs): send lbd a SIGHUP (or restart it) first",
                d.config_path.display()
            )));
        }
        (file, loaded.config)
    };
    let changes = shared
        .reconcile_to(new)
        .await
        .map_err(|e| internal(format!("{e:#}")))?;
    file.save().map_err(|e| {
        internal(format!(
            "the data path changed but writing the config failed: {e}"
        ))
    })?;
    Ok(Json(Changed { changes }))
}

fn edit_error(e: crate::config_edit::EditError) -> Refusal {
    use crate::config_edit::EditError as E;
    match e {
        E::NoSuchService(_) | E::NoSuchBackend { .. } => not_found(e.to_string()),
        E::NoSuchPrefix { .. } => not_found(e.to_string()),
        E::ServiceExists(_) | E::BackendExists { .. } | E::PrefixExists { .. } | E::Conflict(_) => {
            conflict(e.to_string())
        }
        E::Invalid(_) | E::Parse(_) | E::Unsupported(_) => bad(e.to_string()),
        other => internal(other),
    }
}

pub(super) async fn service_add(
    State(shared): State<Shared>,
    Json(n): Json<NewService>,
) -> Reply<Changed> {
    if let Some(problem) = config::name_problem(&n.name) {
        return Err(bad(format!("service name: {problem}")));
    }
    let table_size = n.table_size.unwrap_or(lb_common::DEFAULT_TABLE_SIZE);
    if let Some((true, problem)) = config::table_size_problem(table_size, 0) {
        return Err(bad(format!("--table-size: {problem}")));
    }
    let health = match &n.health {
        None => config::Health {
            port: n.port,
            ..config::Health::default()
        },
        Some(options) => health_of(options, n.port)?,
    };
    let service = config::Service {
        name: n.name,
        vip: n.vip,
        port: n.port,
        protocol: n.protocol,
        forwarding: n.forwarding,
        hash: n.hash,
        table_size,
        tunnel_source: None,
        health,
        backends: vec![],
        allow: vec![],
        deny: vec![],
    };
    change(&shared, |d, f| {
        if d.services.iter().any(|s| s.cfg.name == service.name) {
            return Err(conflict(format!(
                "a service named {:?} exists already",
                service.name
            )));
        }
        f.add_service(&service).map_err(edit_error)
    })
    .await
}

/// The health settings of a new service, validated as a `[service.health]` table of the file
/// (one rule for both); each problem names the lbctl option.
fn health_of(options: &HealthOptions, service_port: u16) -> Result<config::Health, Refusal> {
    let table = toml::to_string(options).map_err(|e| bad(format!("health options: {e}")))?;
    config::parse_health(&table, service_port).map_err(|problems| {
        bad(problems
            .iter()
            .map(|p| {
                let key = p.key.strip_prefix("health.").unwrap_or(&p.key);
                format!(
                    "health check {} ({}): {}",
                    key,
                    HealthOptions::flag_of(key),
                    p.message
                )
            })
            .collect::<Vec<_>>()
            .join("; "))
    })
}

pub(super) async fn service_remove(
    State(shared): State<Shared>,
    UrlPath(name): UrlPath<String>,
) -> Reply<Changed> {
    change(&shared, |d, f| {
        d.find_service(&name).map_err(not_found)?;
        f.remove_service(&name).map_err(edit_error)
    })
    .await
}

pub(super) async fn service_allow(
    State(shared): State<Shared>,
    UrlPath(name): UrlPath<String>,
    Json(p): Json<NewPrefix>,
) -> Reply<Changed> {
    add_prefix(&shared, name, "allow", p.prefix).await
}

pub(super) async fn service_deny(
    State(shared): State<Shared>,
    UrlPath(name): UrlPath<String>,
    Json(p): Json<NewPrefix>,
) -> Reply<Changed> {
    add_prefix(&shared, name, "deny", p.prefix).await
}

/// Puts `prefix` on the service's `list`: refused when it is of the other family than the
/// VIP's, or already on either list (on the other one it must be unlisted first: deny would
/// win, and one of the two is a mistake).
async fn add_prefix(
    shared: &Shared,
    name: String,
    list: &'static str,
    prefix: config::Cidr,
) -> Reply<Changed> {
    change(shared, |d, f| {
        let s = d.find_service(&name).map_err(not_found)?;
        if prefix.addr.is_ipv4() != s.cfg.vip.is_ipv4() {
            return Err(bad(format!(
                "{prefix} is not of the VIP's address family ({})",
                s.cfg.vip
            )));
        }
        let (this, other, other_name) = match list {
            "allow" => (&s.cfg.allow, &s.cfg.deny, "deny"),
            _ => (&s.cfg.deny, &s.cfg.allow, "allow"),
        };
        if this.contains(&prefix) {
            return Err(conflict(format!(
                "{prefix} is already on the {list} list of service {name}"
            )));
        }
        if other.contains(&prefix) {
            return Err(conflict(format!(
                "{prefix} is on the {other_name} list of service {name}: `lbctl service unlist {name} {prefix}` first"
            )));
        }
        f.add_prefix(&name, list, prefix).map_err(edit_error)
    })
    .await
}

/// Takes `prefix` off whichever list of the service has it (an error when none does).
pub(super) async fn service_unlist(
    State(shared): State<Shared>,
    UrlPath(name): UrlPath<String>,
    Json(p): Json<NewPrefix>,
) -> Reply<Changed> {
    change(&shared, |d, f| {
        d.find_service(&name).map_err(not_found)?;
        f.remove_prefix(&name, p.prefix)
            .map(|_| ())
            .map_err(edit_error)
    })
    .await
}

fn check_weight(w: u32) -> Result<u32, Refusal> {
    if w > config::MAX_WEIGHT {
        return Err(bad(format!(
            "weight {w} is larger than the maximum {}",
            config::MAX_WEIGHT
        )));
    }
    Ok(w)
}

pub(super) async fn backend_add(
    State(shared): State<Shared>,
    UrlPath(name): UrlPath<String>,
    Json(n): Json<NewBackend>,
) -> Reply<Changed> {
    let weight = check_weight(n.weight.unwrap_or(config::DEFAULT_WEIGHT))?;
    let backend = config::Backend {
        address: n.address,
        weight,
        mac: None,
        port: n.port,
    };
    change(&shared, |d, f| {
        let s = d.find_service(&name).map_err(not_found)?;
        if let Some(port) = n.port
            && let Some(problem) = config::port_problem(s.cfg.forwarding, s.cfg.port, port)
        {
            return Err(bad(format!("--port: {problem}")));
        }
        let key = backend.key(s.cfg.port);
        if s.backend(key).is_some() {
            let shown = if key.port == s.cfg.port {
                key.address.to_string()
            } else {
                key.to_string()
            };
            return Err(conflict(format!(
                "service {name} already has backend {shown}"
            )));
        }
        if n.address.is_ipv4() != s.cfg.vip.is_ipv4() {
            return Err(bad(format!(
                "{} is not of the VIP's address family ({})",
                n.address, s.cfg.vip
            )));
        }
        f.add_backend(&name, &backend).map_err(edit_error)
    })
    .await
}

pub(super) async fn backend_remove(
    State(shared): State<Shared>,
    UrlPath((name, address)): UrlPath<(String, String)>,
    Query(q): Query<PortQuery>,
) -> Reply<Changed> {
    change(&shared, |d, f| {
        let (key, _) = existing(d, &name, &address, q.port)?;
        f.remove_backend(&name, key).map_err(edit_error)
    })
    .await
}

/// How a refusal names backend `key` of service `name`: as lbd names it everywhere.
fn shown(d: &Daemon, name: &str, key: config::BackendKey) -> String {
    d.find_service(name)
        .ok()
        .and_then(|s| s.backend(key).map(|b| s.name_of(b)))
        .unwrap_or_else(|| key.to_string())
}

pub(super) async fn backend_drain(
    State(shared): State<Shared>,
    UrlPath((name, address)): UrlPath<(String, String)>,
    Query(q): Query<PortQuery>,
) -> Reply<Changed> {
    let mut remembered = None;
    let result = change(&shared, |d, f| {
        let (key, weight) = existing(d, &name, &address, q.port)?;
        if weight == 0 {
            return Err(conflict(format!(
                "backend {} of {name} is already drained",
                shown(d, &name, key)
            )));
        }
        d.remember_drain(&name, key, weight);
        remembered = Some(key);
        f.set_weight(&name, key, 0).map_err(edit_error)
    })
    .await;
    if let (Err(_), Some(key)) = (&result, remembered) {
        shared.lock().await.forget_drain(&name, key);
    }
    result
}

pub(super) async fn backend_undrain(
    State(shared): State<Shared>,
    UrlPath((name, address)): UrlPath<(String, String)>,
    Query(q): Query<PortQuery>,
) -> Reply<Changed> {
    let mut undrained = None;
    let result = change(&shared, |d, f| {
        let (key, weight) = existing(d, &name, &address, q.port)?;
        if weight != 0 {
            return Err(conflict(format!(
                "backend {} of {name} is not drained (weight {weight})",
                shown(d, &name, key)
            )));
        }
        let before = d
            .weight_before_drain(&name, key)
            .unwrap_or(config::DEFAULT_WEIGHT);
        undrained = Some(key);
        f.set_weight(&name, key, before).map_err(edit_error)
    })
    .await;
    if let (Ok(_), Some(key)) = (&result, undrained) {
        shared.lock().await.forget_drain(&name, key);
    }
    result
}

pub(super) async fn backend_weight(
    State(shared): State<Shared>,
    UrlPath((name, address)): UrlPath<(String, String)>,
    Query(q): Query<PortQuery>,
    Json(w): Json<NewWeight>,
) -> Reply<Changed> {
    let weight = check_weight(w.weight)?;
    change(&shared, |d, f| {
        let (key, _) = existing(d, &name, &address, q.port)?;
        if weight == 0 {
            return Err(bad(
                "weight 0 drains a backend: use `lbctl backend drain` (undrain restores the weight)"
                    .into(),
            ));
        }
        d.forget_drain(&name, key);
        f.set_weight(&name, key, weight).map_err(edit_error)
    })
    .await
}

// ---- the node ----

/// How long `lbctl node drain` and `undrain` wait for the routes to follow.
const ROUTES_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

pub(super) async fn node_drain(State(shared): State<Shared>) -> Reply<Changed> {
    set_node_drained(&shared, true).await
}

pub(super) async fn node_undrain(State(shared): State<Shared>) -> Reply<Changed> {
    set_node_drained(&shared, false).await
}

/// Drains or undrains the node (kept in state_dir, not in the config file) and, with
/// `[daemon.announce]`, answers once the routes follow. Draining a drained node (or undraining
/// one that is not) changes nothing and is no error: scripts may repeat it.
async fn set_node_drained(shared: &Shared, drained: bool) -> Reply<Changed> {
    let _one_change_at_a_time = shared.change().await;
    let (name, was, before, after, generation, mut report, announce) = {
        let mut d = shared.lock().await;
        let was = d.node_drained();
        let before = d.serving_vips();
        let generation = d.set_node_drained(drained).map_err(|e| {
            internal(format!(
                "the node's state could not be kept, nothing changed: {e}"
            ))
        })?;
        (
            d.config.daemon.node_name(),
            was,
            before,
            d.serving_vips(),
            generation,
            d.announce_report(),
            d.announcing(),
        )
    };
    let list = |vips: &std::collections::BTreeSet<std::net::IpAddr>| {
        vips.iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let line = match (was, drained) {
        (true, true) => format!("node {name} is already drained: nothing changed"),
        (false, false) => format!("node {name} is not drained: nothing changed"),
        (false, true) if before.is_empty() => {
            format!("node {name} drained (it served no VIP)")
        }
        (false, true) => format!("node {name} drained: no longer serving {}", list(&before)),
        (true, false) if after.is_empty() => {
            format!("node {name} undrained: no VIP serves yet (no service has a backend up)")
        }
        (true, false) => format!("node {name} undrained: serving {}", list(&after)),
    };
    if announce.is_some() {
        let followed = tokio::time::timeout(
            ROUTES_DEADLINE,
            report.wait_for(|r| r.generation >= generation),
        )
        .await;
        let problem = match followed {
            Ok(Ok(r)) => r.error.clone(),
            Ok(Err(_)) => Some("lbd's announcer is not running".into()),
            Err(_) => Some(format!(
                "not done within {ROUTES_DEADLINE:?} (see lbd's log)"
            )),
        };
        if let Some(problem) = problem {
            return Err(internal(format!(
                "{line}, but the VIP routes did not follow: {problem}"
            )));
        }
    }
    Ok(Json(Changed {
        changes: vec![line],
    }))
}
