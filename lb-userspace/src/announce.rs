//! Announcing the serving VIPs to a routing daemon (SPEC "Several nodes"): with
//! `[daemon.announce]`, lbd keeps one host route per serving VIP (`VIP/32` or `VIP/128`, type
//! unicast, `dev lo`, scope link, in `table`, protocol `protocol`) and no other route of that
//! protocol in that table. BIRD's `protocol kernel { kernel table T; learn; }` or FRR's
//! `ip import-table T` picks them up and advertises them.
//!
//! The daemon publishes the serving VIPs after every change (`daemon::serving`); the announcer
//! follows them on a task of its own: it lists the routes of its table and protocol, removes
//! those of VIPs that do not serve (and any of its protocol that is not such a host route),
//! and adds the missing ones. So it adopts what an earlier lbd left at start, and a restarted
//! lbd changes nothing when nothing changed (it starts only once its runtime state is filled).
//! The routes stay when lbd exits, however it ends; `lbd --cleanup` removes them (`cleanup`).
//! Besides following changes it lists its table again every `REPAIR_INTERVAL` (a route removed
//! by hand comes back) and retries every `RETRY_INTERVAL` after a failure.
//!
//! May call `netlink`, `config` and `daemon`'s serving types; called by `run` and `api`.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use log::{error, info, warn};
use tokio::sync::watch;

use crate::{
    config::Announce,
    daemon::serving::{AnnounceReport, Serving},
    netlink::{Netlink, NetlinkError},
};

/// How often the table is listed again when nothing changed, to put back a route someone
/// removed (or remove one someone added with lbd's protocol).
pub const REPAIR_INTERVAL: Duration = Duration::from_secs(10);
/// How soon a failed attempt is retried.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("opening a netlink connection for the VIP routes: {0}")]
    Netlink(#[from] NetlinkError),
    #[error(
        "there is no loopback interface \"lo\" in this network namespace: the VIP routes go out of it"
    )]
    NoLoopback,
}

/// The index of `lo`, which every VIP route goes out of.
async fn loopback(netlink: &Netlink) -> Result<u32, AnnounceError> {
    netlink
        .interface_by_name("lo")
        .await?
        .map(|i| i.index)
        .ok_or(AnnounceError::NoLoopback)
}

/// The VIPs whose host routes are in the table now (routes of the protocol in another shape
/// are not counted).
pub async fn installed(
    netlink: &Netlink,
    cfg: &Announce,
) -> Result<BTreeSet<IpAddr>, AnnounceError> {
    let lo = loopback(netlink).await?;
    Ok(netlink
        .table_routes(cfg.table, cfg.protocol)
        .await?
        .into_iter()
        .filter(|r| r.is_host_route_on(lo))
        .map(|r| r.dst)
        .collect())
}

/// Brings the table to `want`: a host route on `lo` for each of its VIPs, no other route of the
/// protocol. Carries on past a route that fails (each is logged) and returns the first error;
/// on success, the VIPs now announced.
pub async fn reconcile(
    netlink: &Netlink,
    cfg: &Announce,
    want: &BTreeSet<IpAddr>,
) -> Result<BTreeSet<IpAddr>, AnnounceError> {
    let lo = loopback(netlink).await?;
    let have = netlink.table_routes(cfg.table, cfg.protocol).await?;
    let mut first_error = None;
    let mut kept = BTreeSet::new();
    for r in &have {
        if want.contains(&r.dst) && r.is_host_route_on(lo) && !kept.contains(&r.dst) {
            kept.insert(r.dst);
            continue;
        }
        match netlink
            .remove_route(r.dst, r.prefix_len, cfg.table, cfg.protocol)
            .await
        {
            Ok(()) if want.contains(&r.dst) => info!(
                "replacing the route {}/{} in table {} (not a host route on lo)",
                r.dst, r.prefix_len, cfg.table
            ),
            Ok(()) => info!(
                "withdrawn: {} (route removed from table {}, protocol {})",
                r.dst, cfg.table, cfg.protocol
            ),
            Err(e) => {
                error!("{e}");
                first_error.get_or_insert(e);
            }
        }
    }
    for &vip in want.difference(&kept) {
        match netlink
            .add_host_route(vip, lo, cfg.table, cfg.protocol)
            .await
        {
            Ok(()) => info!(
                "announced: {vip} (route added to table {}, protocol {})",
                cfg.table, cfg.protocol
            ),
            Err(e) => {
                error!("{e}");
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(want.clone()),
    }
}

/// Follows the serving VIPs until their sender is gone, keeping the routes in step and
/// reporting each generation it brought them to (with what is installed, or why it failed).
pub async fn follow(
    cfg: Announce,
    mut serving: watch::Receiver<Serving>,
    report: watch::Sender<AnnounceReport>,
) {
    let netlink = match Netlink::new() {
        Ok(n) => n,
        Err(e) => {
            let message = AnnounceError::from(e).to_string();
            error!("the VIP routes are not kept: {message}");
            report.send_replace(AnnounceReport {
                error: Some(message),
                ..Default::default()
            });
            return;
        }
    };
    info!(
        "announcing serving VIPs as host routes on lo in table {} with protocol {}",
        cfg.table, cfg.protocol
    );
    let mut last_error: Option<String> = None;
    loop {
        let want = serving.borrow_and_update().clone();
        let wait = match reconcile(&netlink, &cfg, &want.vips).await {
            Ok(installed) => {
                if last_error.take().is_some() {
                    info!("the VIP routes are in step again");
                }
                report.send_replace(AnnounceReport {
                    generation: want.generation,
                    installed,
                    error: None,
                });
                REPAIR_INTERVAL
            }
            Err(e) => {
                let message = e.to_string();
                if last_error.as_deref() != Some(&message) {
                    warn!(
                        "the VIP routes are not in step ({message}): retrying every {RETRY_INTERVAL:?}"
                    );
                }
                let installed = installed(&netlink, &cfg).await.unwrap_or_default();
                report.send_replace(AnnounceReport {
                    generation: want.generation,
                    installed,
                    error: Some(message.clone()),
                });
                last_error = Some(message);
                RETRY_INTERVAL
            }
        };
        tokio::select! {
            changed = serving.changed() => {
                if changed.is_err() {
                    return; // the daemon is gone
                }
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// `lbd --cleanup`: removes every route of the table and protocol; returns the destinations
/// removed.
pub async fn cleanup(cfg: &Announce) -> Result<Vec<IpAddr>, AnnounceError> {
    let netlink = Netlink::new()?;
    let mut removed = vec![];
    for r in netlink.table_routes(cfg.table, cfg.protocol).await? {
        netlink
            .remove_route(r.dst, r.prefix_len, cfg.table, cfg.protocol)
            .await?;
        removed.push(r.dst);
    }
    Ok(removed)
}
