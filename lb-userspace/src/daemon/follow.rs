//! Following the system while lbd runs: the kernel's notifications (links, routes,
//! addresses, neighbours) and a periodic refresh bring the configured interfaces and every
//! backend's hop up to date. Hops are resolved without the daemon's lock.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use log::{debug, error, warn};

use super::{
    apply::Shared,
    interfaces::{InterfaceState, follow_interfaces},
    model::Hop,
    resolve::resolve_many,
};
use crate::netlink::Netlink;

/// How often every backend's hop is resolved again and stale neighbours re-confirmed, besides
/// whenever the kernel announces a change (see `follow`).
const REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// How long lbd lets a burst of the kernel's notifications settle before acting on it.
const SETTLE: Duration = Duration::from_millis(50);
/// Refreshes that notifications cause come at most this often (a refresh re-confirming stale
/// neighbours causes notifications of its own).
const MIN_REFRESH_GAP: Duration = Duration::from_millis(250);

/// Follows the system until aborted: the configured interfaces (attached anew when one comes
/// back, see `follow_interfaces`) and the backends' hops (`refresh`: routes, next hops'
/// MACs, egress interfaces' MACs and MTUs), within a fraction of a second of the kernel
/// announcing a change of a link, route, address or of a neighbour the data path uses, and
/// every `REFRESH_INTERVAL` anyway (which also re-confirms stale neighbours).
pub async fn follow(shared: Shared) {
    use crate::netlink::Change;
    let mut changes = match crate::netlink::watch() {
        Ok(rx) => Some(rx),
        Err(e) => {
            warn!(
                "cannot follow the kernel's notifications ({e}): interfaces, routes and neighbours are re-read every {REFRESH_INTERVAL:?} only"
            );
            None
        }
    };
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + REFRESH_INTERVAL,
        REFRESH_INTERVAL,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut states: HashMap<String, InterfaceState> = HashMap::new();
    let names = shared.lock().await.config.daemon.interfaces.clone();
    if let Err(e) = follow_interfaces(&shared, &names, &mut states).await {
        error!("following the interfaces: {e:#}");
    }
    let mut last_refresh = Instant::now();
    let retrying = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        let names = shared.lock().await.config.daemon.interfaces.clone();
        // Whether to look at the interfaces, which backends to resolve again, and whether to
        // retry those without a hop.
        let (links, hops, unresolved) = tokio::select! {
            _ = tick.tick() => (true, Which::Resolved, true),
            change = async {
                match changes.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let Some(change) = change else {
                    warn!("the kernel's notifications stopped: interfaces, routes and neighbours are re-read every {REFRESH_INTERVAL:?} only");
                    changes = None;
                    continue;
                };
                // A burst (an interface recreated: addresses, routes, neighbours) settles
                // first, and refreshes come at most every MIN_REFRESH_GAP.
                let wait = SETTLE.max(MIN_REFRESH_GAP.saturating_sub(last_refresh.elapsed()));
                tokio::time::sleep(wait).await;
                let mut all = vec![change];
                if let Some(rx) = changes.as_mut() {
                    while let Ok(c) = rx.try_recv() {
                        all.push(c);
                    }
                }
                let links = all.iter().any(|c| match c {
                    Change::Link { name, .. } | Change::LinkGone { name, .. } => {
                        names.contains(name)
                    }
                    _ => false,
                });
                // A link, route or address change may move any backend; a neighbour entry's
                // change only those reached through it.
                let unresolved = all.iter().any(|c| !matches!(c, Change::Neighbour { .. }));
                let hops = if unresolved {
                    Which::Resolved
                } else {
                    Which::Via(
                        all.iter()
                            .filter_map(|c| match c {
                                Change::Neighbour { ifindex, addr: Some(a) } => Some((*ifindex, *a)),
                                _ => None,
                            })
                            .collect(),
                    )
                };
                (links, hops, unresolved)
            }
        };
        if links && let Err(e) = follow_interfaces(&shared, &names, &mut states).await {
            error!("following the interfaces: {e:#}");
        }
        if !matches!(&hops, Which::Via(v) if v.is_empty()) {
            last_refresh = Instant::now();
            if let Err(e) = refresh(&shared, &hops).await {
                error!("refreshing backends: {e:#}");
            }
        }
        // Backends without a hop are retried on a task of their own (one at a time), so one
        // that never answers holds up nothing else.
        if unresolved && !retrying.swap(true, std::sync::atomic::Ordering::AcqRel) {
            let (shared, retrying) = (shared.clone(), retrying.clone());
            tokio::spawn(async move {
                if let Err(e) = refresh(&shared, &Which::Unresolved).await {
                    error!("resolving backends: {e:#}");
                }
                retrying.store(false, std::sync::atomic::Ordering::Release);
            });
        }
    }
}

/// The backends a refresh resolves again.
enum Which {
    /// Those that have a hop (quick: their neighbours mostly answer at once).
    Resolved,
    /// Those that have none (up to `RESOLVE_ROUND` when some never answer).
    Unresolved,
    /// Those reached through one of these next hops (ifindex, address): their neighbour
    /// entries changed.
    Via(Vec<(u32, IpAddr)>),
}

impl Which {
    fn picks(&self, hop: Option<&Hop>) -> bool {
        match (self, hop) {
            (Which::Resolved, h) => h.is_some(),
            (Which::Unresolved, h) => h.is_none(),
            (Which::Via(vias), Some(h)) => vias.contains(&(h.ifindex, h.via)),
            (Which::Via(_), None) => false,
        }
    }
}

/// Resolves every backend's hop again (route, next hop's MAC, egress interface's MAC and
/// MTU, tunnel source) and applies what changed: a new gateway or egress interface, a new
/// MAC, a new MTU, a backend that now resolves. A backend whose neighbour stops answering
/// keeps its last hop (an entry that ages out must not take a working backend out of
/// service); one whose route or interface is gone loses it until it resolves again. Then
/// has the kernel re-confirm the stale neighbour entries the data path uses (XDP traffic
/// never does): one whose MAC changed fails, and the next refresh resolves it anew.
/// `which` picks the backends. Resolution runs without the daemon's lock.
async fn refresh(shared: &Shared, which: &Which) -> anyhow::Result<()> {
    let backends = shared.lock().await.hop_requests(|hop| which.picks(hop));
    if backends.is_empty() {
        return Ok(());
    }
    let results = resolve_many(backends.iter().map(|(_, r)| r.clone()).collect()).await;
    let mut in_use = shared
        .lock()
        .await
        .take_hops(backends.into_iter().zip(results))?;
    in_use.sort_unstable();
    in_use.dedup();
    let netlink = Netlink::new()?;
    for (ifindex, via) in in_use {
        match netlink.reconfirm_neighbour(ifindex, via).await {
            Ok(true) => {
                debug!("re-confirming the stale neighbour entry of {via} (ifindex {ifindex})")
            }
            Ok(false) => {}
            Err(e) => debug!("cannot re-confirm {via}: {e}"),
        }
    }
    Ok(())
}
