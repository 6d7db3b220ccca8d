//! The daemon: the runtime state with what it was made from, and the only code that changes
//! it and writes the maps (`sync`, from `fill`): at start, for a change of the config (the
//! `plan` carried out), a health check's result and a new resolution of hops. `Shared` is how
//! lbd's tasks reach it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use log::{error, info, warn};
use tokio::sync::{Mutex, watch};

use super::{
    fill::fill,
    model::{
        BackendRuntime, Hop, HopRequest, Hops, LastCheck, ResolveError, ServiceRuntime,
        drained_key, mac_string,
    },
    plan::{self, Change, Plan},
    serving::{AnnounceReport, Serving, serving_vips},
};
use crate::{
    config::{BackendKey, Config},
    datapath::{self, Datapath},
    health, state,
};

pub struct Daemon {
    pub config_path: PathBuf,
    /// The desired state, as in the file.
    pub config: Config,
    pub seed: [u64; 2],
    pub datapath: Datapath,
    pub services: Vec<ServiceRuntime>,
    pub started: Instant,
    monitor: health::Monitor,
    /// Weights of drained backends before their drain ("service address" → weight, or
    /// "service address:port" for a backend with a port of its own), kept in state_dir so
    /// `undrain` survives restarts.
    drained: BTreeMap<String, u32>,
    /// Health checks run: (service, backend name, result) → count (`lb_health_checks_total`).
    pub health_counts: BTreeMap<(String, String, health::CheckResult), u64>,
    /// Flows in the connection table and its capacity, counted in the background.
    pub conntrack: Arc<ConntrackUse>,
    /// The sync threads' peers and counters, with `[daemon.sync]` (set once they run).
    pub sync_status: Option<Arc<crate::sync::SyncStatus>>,
    /// `Config::trace` while `lbctl trace` runs (0: no trace).
    pub trace: u32,
    /// `Config::trace_session`: counts the traces this lbd ran.
    trace_session: u32,
    /// `lbctl node drain`: no VIP serves (kept in state_dir).
    node: state::NodeState,
    /// Whether the program is on the configured interfaces (set at start, and as `follow`
    /// finds them: false while none has it).
    attached: bool,
    /// The serving VIPs, published after every change (`publish_serving`).
    serving: watch::Sender<Serving>,
    /// What the announcer did last.
    announce_report: watch::Receiver<AnnounceReport>,
    /// The announcer's ends of both channels, until `run` hands them to it.
    announce_ends: Option<(watch::Receiver<Serving>, watch::Sender<AnnounceReport>)>,
    /// `[daemon.announce]` as the announcer runs with it (read at start: a SIGHUP does not
    /// change it).
    announcing: Option<crate::config::Announce>,
}

/// The connection table's use as last counted, and the Maglev slots changed then.
#[derive(Default)]
pub struct ConntrackUse {
    pub entries: std::sync::atomic::AtomicU64,
    pub capacity: std::sync::atomic::AtomicU64,
    pub changed_slots: std::sync::atomic::AtomicU64,
    /// New flows per second over the last count, by `lb_common::NewFlow` index (recorded, over
    /// the limit, no room).
    pub new_flows_per_second: [std::sync::atomic::AtomicU64; lb_common::NewFlow::COUNT as usize],
}

impl ConntrackUse {
    pub fn get(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.entries.load(Relaxed), self.capacity.load(Relaxed))
    }

    /// `new_flows_per_second` as numbers.
    pub fn new_flow_rates(&self) -> [u64; lb_common::NewFlow::COUNT as usize] {
        self.new_flows_per_second
            .each_ref()
            .map(|a| a.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn changed_slots(&self) -> u64 {
        self.changed_slots
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The daemon, shared by lbd's tasks. `lock` is held only for a moment at a time (a look, or
/// applying a change to the runtime state and the maps): never across neighbour resolution,
/// which can take seconds for an address nobody answers. `change` serialises whole changes
/// (lbctl, SIGHUP): one is prepared under `lock`, its hops resolved without it, then applied
/// under `lock` again; as no other change can come in between, what it prepared still holds
/// (health results and neighbour refreshes meanwhile only touch the health and hops of
/// backends it leaves alone, and are kept).
#[derive(Clone)]
pub struct Shared {
    daemon: Arc<Mutex<Daemon>>,
    changes: Arc<Mutex<()>>,
}

impl Shared {
    pub fn new(daemon: Daemon) -> Shared {
        Shared {
            daemon: Arc::new(Mutex::new(daemon)),
            changes: Arc::new(Mutex::new(())),
        }
    }

    /// The daemon, for a moment.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, Daemon> {
        self.daemon.lock().await
    }

    /// The daemon, for a moment, from a thread outside the runtime (the connection-table
    /// scanner).
    pub fn blocking_lock(&self) -> tokio::sync::MutexGuard<'_, Daemon> {
        self.daemon.blocking_lock()
    }

    /// The right to make a change (config file and runtime state), held for all of it.
    pub async fn change(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.changes.lock().await
    }

    /// Brings the runtime state and the maps to `new` (the caller holds `change`): the hops
    /// it needs are resolved without the lock, then `Daemon::reconcile` applies it. The changes
    /// made, one line each.
    pub async fn reconcile_to(&self, new: Config) -> anyhow::Result<Vec<String>> {
        let needed = self.lock().await.hops_needed(&new);
        let hops = super::resolve::resolve_hops(needed).await;
        self.lock().await.reconcile(new, hops)
    }
}

impl Daemon {
    /// A daemon for `services` (from `plan::initial`, hops resolved) on `datapath`; health
    /// reports go to `monitor`'s channel. Nothing is written until `start`.
    pub fn new(
        config_path: PathBuf,
        config: Config,
        seed: [u64; 2],
        datapath: Datapath,
        services: Vec<ServiceRuntime>,
        monitor: health::Monitor,
    ) -> Daemon {
        let (serving, serving_rx) = watch::channel(Serving::default());
        let (report_tx, announce_report) = watch::channel(AnnounceReport::default());
        Daemon {
            node: state::load_node(&config.daemon.state_dir),
            attached: false,
            serving,
            announce_report,
            announce_ends: Some((serving_rx, report_tx)),
            announcing: None,
            config_path,
            drained: state::load_drained(&config.daemon.state_dir),
            seed,
            datapath,
            services,
            started: Instant::now(),
            monitor,
            health_counts: BTreeMap::new(),
            trace: 0,
            trace_session: 0,
            conntrack: Arc::new(ConntrackUse::default()),
            sync_status: None,
            config,
        }
    }

    /// Makes room for `new`'s `nat` services: while the NAT tables are the small ones lbd made
    /// at start because nothing used NAT (`Config::nat_tables`), a config with a `nat` service
    /// grows them to `daemon.nat_entries` (`Datapath::grow_nat_tables`: the program loaded
    /// again with new, empty tables and swapped in without a gap; the small ones held no flow).
    /// A table's size is fixed when it is made: flows beyond it would be evicted, breaking
    /// connections silently.
    pub fn make_nat_room(&mut self, new: &Config) -> anyhow::Result<()> {
        let entries = self.config.daemon.nat_entries;
        let had = self.datapath.nat_capacity();
        if had >= entries {
            return Ok(());
        }
        let Some(s) = new
            .services
            .iter()
            .find(|s| s.forwarding == crate::config::Forwarding::Nat)
        else {
            return Ok(());
        };
        info!(
            "service {:?} uses nat: growing the NAT tables from {had} to {entries} flows (daemon.nat_entries)",
            s.name
        );
        self.datapath.grow_nat_tables(entries).map_err(|e| {
            anyhow::anyhow!(
                "service {:?}: forwarding = \"nat\" needs NAT tables of {entries} flows (daemon.nat_entries), and growing them from {had} failed: {e}",
                s.name
            )
        })
    }

    /// Fills every map before the program goes in place (so its first packet finds every
    /// table; what an earlier configuration left in pinned maps goes), attaches it to
    /// `interfaces` (name, index) and starts the health checks.
    pub fn start(&mut self, interfaces: &[(String, u32)]) -> anyhow::Result<()> {
        self.sync()?;
        let mode = self.config.daemon.xdp_mode;
        for (name, index) in interfaces {
            self.datapath.attach(name, *index, mode)?;
        }
        self.datapath.finish_start()?;
        // Now that the interfaces are known: the redirect targets of `nat` replies.
        self.sync()?;
        self.attached = true;
        self.publish_serving();
        for s in &self.services {
            for b in &s.backends {
                let start = if b.healthy {
                    health::Start::Up
                } else {
                    health::Start::Down
                };
                self.monitor.set(s.health_target(b), start);
            }
        }
        Ok(())
    }

    /// Stops every health check (at exit).
    pub fn stop(&mut self) {
        self.monitor.stop_all();
        if self.trace != 0
            && let Err(e) = self.set_trace(0)
        {
            warn!("stopping the running trace at exit: {e:#}");
        }
    }

    /// Makes every map hold what `fill` computes from the runtime state now: the one way the
    /// data path is written, at start and after every change.
    fn sync(&mut self) -> anyhow::Result<()> {
        let mut config = self.datapath.config_for(self.seed)?;
        // The program reports the records it writes only for a node that shares them.
        config.sync_events = u32::from(self.config.daemon.sync.is_some());
        let daemon = &self.config.daemon;
        datapath::Protection {
            times: datapath::SlotTimes {
                idle_hold: Duration::from_secs(daemon.idle_hold_s),
                ..Default::default()
            },
            new_flow_limit: daemon.new_flow_limit,
        }
        .write_into(&mut config);
        config.trace = self.trace;
        config.trace_session = self.trace_session;
        let mut want = fill(config, &self.seed, &mut self.services);
        // `nat` replies leave by the interface their request came in on: every attached one
        // is a redirect target.
        if self
            .services
            .iter()
            .any(|s| s.cfg.forwarding == crate::config::Forwarding::Nat)
        {
            for a in &self.datapath.attachments {
                want.devmap.insert(a.ifindex, a.ifindex);
            }
        }
        self.datapath.apply(&want)?;
        self.publish_serving();
        Ok(())
    }

    /// Starts (`lb_common::TRACE_ALL`, or a service id plus one) or stops (0) the data path's
    /// sampling of packets for `lbctl trace`: `CONFIG` says what to sample, and the links run
    /// the traced program only meanwhile (loaded here unless `Datapath::keep_trace_programs`
    /// brought it: loading it takes seconds).
    pub fn set_trace(&mut self, trace: u32) -> anyhow::Result<()> {
        if trace == 0 {
            // The plain program back first: nothing samples once it runs.
            let swapped = self.datapath.set_traced(false);
            self.trace = 0;
            self.sync()?;
            return Ok(swapped?);
        }
        // A session of its own (never 0): packets the program parsed for an earlier trace
        // are not this one's.
        self.trace_session = self.trace_session.wrapping_add(1).max(1);
        self.trace = trace;
        self.sync()?;
        if let Err(e) = self.datapath.set_traced(true) {
            // No half-started trace: the plain program everywhere again.
            if let Err(back) = self.set_trace(0) {
                warn!("undoing the trace's start: {back:#}");
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// The VIPs this node serves now (`serving::serving_vips`).
    pub fn serving_vips(&self) -> BTreeSet<IpAddr> {
        serving_vips(&self.services, self.attached, self.node.drained)
    }

    /// Publishes the serving VIPs to the announcer when they changed; returns the generation
    /// published now (the announcer reports it once the routes follow).
    fn publish_serving(&mut self) -> u64 {
        let vips = self.serving_vips();
        self.serving.send_if_modified(|s| {
            if s.vips == vips {
                return false;
            }
            info!(
                "serving VIPs: {}",
                if vips.is_empty() {
                    "none".to_string()
                } else {
                    vips.iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
            s.vips = vips;
            s.generation += 1;
            true
        });
        self.serving.borrow().generation
    }

    /// Whether the node is drained (`lbctl node drain`).
    pub fn node_drained(&self) -> bool {
        self.node.drained
    }

    /// Drains or undrains the node: kept in state_dir first (refused, changing nothing, when
    /// that fails), then published. Returns the generation of the serving VIPs to wait for.
    pub fn set_node_drained(&mut self, drained: bool) -> Result<u64, state::StateError> {
        let node = state::NodeState { drained };
        if node != self.node {
            state::save_node(&self.config.daemon.state_dir, &node)?;
            self.node = node;
            if drained {
                warn!("node drained: no VIP is announced until `lbctl node undrain`");
            } else {
                info!("node undrained: serving VIPs are announced again");
            }
        }
        Ok(self.publish_serving())
    }

    /// Whether the program is on the configured interfaces now (`follow` tells).
    pub fn set_attached(&mut self, attached: bool) {
        if attached != self.attached {
            self.attached = attached;
            self.publish_serving();
        }
    }

    /// For the announcer, when `[daemon.announce]` is configured: its settings and its ends of
    /// the channels (the serving VIPs to follow, where to report). Once only (`run` starts the
    /// announcer with them).
    pub fn take_announce_ends(
        &mut self,
    ) -> Option<(
        crate::config::Announce,
        watch::Receiver<Serving>,
        watch::Sender<AnnounceReport>,
    )> {
        let cfg = self.config.daemon.announce?;
        let (serving, report) = self.announce_ends.take()?;
        self.announcing = Some(cfg);
        Some((cfg, serving, report))
    }

    /// `[daemon.announce]` as the running announcer uses it (None: no routes are kept).
    pub fn announcing(&self) -> Option<crate::config::Announce> {
        self.announcing
    }

    /// What the announcer did last (a fresh receiver, e.g. to wait for a generation).
    pub fn announce_report(&self) -> watch::Receiver<AnnounceReport> {
        self.announce_report.clone()
    }

    /// The hops `reconcile` to `new` needs resolved (see `plan::hops_needed`).
    pub fn hops_needed(&self, new: &Config) -> Vec<(String, HopRequest)> {
        plan::hops_needed(&self.services, new)
    }

    /// Brings the daemon and the data path to `new`, keeping the runtime state (ids, hops,
    /// health) of what stays; `hops` holds the resolutions `hops_needed` asked for (one
    /// missing is retried in the background). Used at SIGHUP and for every lbctl change. A
    /// change that cannot be planned changes nothing. Returns a line per change.
    pub fn reconcile(&mut self, new: Config, hops: Hops) -> anyhow::Result<Vec<String>> {
        if new.daemon != self.config.daemon {
            warn!("[daemon] settings changed in the file; they take effect when lbd restarts");
        }
        self.make_nat_room(&new)?;
        let plan = plan::plan(&self.services, &new, hops, SystemTime::now())?;
        self.carry_out(plan, new)
    }

    fn carry_out(&mut self, plan: Plan, new: Config) -> anyhow::Result<Vec<String>> {
        let Plan {
            mut services,
            changes,
            checks,
        } = plan;
        for c in &changes {
            match c {
                Change::ServiceRemoved {
                    service,
                    port,
                    backends,
                    ..
                } => {
                    self.monitor.remove_service(service);
                    for key in backends {
                        self.drained.remove(&drained_key(service, *port, *key));
                    }
                }
                Change::BackendRemoved {
                    service, backend, ..
                } => {
                    self.monitor.remove(service, backend.address, backend.port);
                    // The service as it was (its port names the key).
                    let port = self
                        .services
                        .iter()
                        .find(|s| s.cfg.name == *service)
                        .map_or(backend.port, |s| s.cfg.port);
                    self.drained.remove(&drained_key(service, port, *backend));
                }
                Change::BackendAdded {
                    service,
                    backend,
                    name: address,
                    ..
                } => {
                    let b = services
                        .iter()
                        .find(|s| s.cfg.name == *service)
                        .and_then(|s| s.backend(*backend));
                    if let Some(BackendRuntime {
                        hop: None,
                        hop_error: Some(e),
                        ..
                    }) = b
                    {
                        warn!(
                            "service {service}: backend {address} gets no traffic until it resolves: {e}"
                        );
                    }
                }
                _ => {}
            }
        }
        // What stays keeps its Maglev table (rebuilt only if what it is built from changed).
        // An id is never given to what comes in the change that frees it, so the id names the
        // same service before and after.
        let mut before: HashMap<u32, ServiceRuntime> =
            self.services.drain(..).map(|s| (s.id, s)).collect();
        for s in &mut services {
            if let Some(old) = before.remove(&s.id) {
                s.keep_table_of(old);
            }
        }
        self.services = services;
        for c in checks {
            if !c.restart
                && self
                    .monitor
                    .is_checked(&c.service, c.backend.address, c.backend.port)
            {
                continue;
            }
            let Some(s) = self.services.iter().find(|s| s.cfg.name == c.service) else {
                continue;
            };
            if let Some(b) = s.backend(c.backend) {
                self.monitor.set(s.health_target(b), c.start);
            }
        }
        self.config = new;
        self.sync()?;
        self.save_drained();
        let lines: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
        for line in &lines {
            info!("{line}");
        }
        Ok(lines)
    }

    fn save_drained(&self) {
        if let Err(e) = state::save_drained(&self.config.daemon.state_dir, &self.drained) {
            warn!("cannot keep the drained weights: {e}");
        }
    }

    /// One health check's result: counted, shown, and on a state change applied to the data
    /// path before the new state is visible.
    pub fn on_health(&mut self, r: health::Report) -> anyhow::Result<()> {
        let Some(si) = self.services.iter().position(|s| s.cfg.name == r.service) else {
            return Ok(());
        };
        let key = BackendKey {
            address: r.backend,
            port: r.port,
        };
        let s = &mut self.services[si];
        let Some(bi) = s.backends.iter().position(|b| s.key_of(b) == key) else {
            return Ok(());
        };
        let name = s.name_of(&s.backends[bi]);
        *self
            .health_counts
            .entry((r.service.clone(), name.clone(), r.result))
            .or_default() += 1;
        let b = &mut s.backends[bi];
        // lbd's own trouble is logged when it starts and when it ends, not at every check.
        let was_error = b
            .last
            .as_ref()
            .is_some_and(|l| l.result == health::CheckResult::Error);
        match (was_error, r.result == health::CheckResult::Error) {
            (false, true) => error!(
                "service {}: the health check of backend {} {} (a problem of lbd's own, not of the backend: it keeps its state, {})",
                r.service,
                name,
                r.detail,
                b.state()
            ),
            (true, false) => info!(
                "service {}: health checks of backend {} run again",
                r.service, name
            ),
            _ => {}
        }
        b.last = Some(LastCheck {
            result: r.result,
            detail: r.detail.clone(),
            at: r.at,
        });
        let Some(up) = r.transition else {
            return Ok(());
        };
        if b.healthy == up {
            return Ok(());
        }
        b.healthy = up;
        b.since = r.at;
        if up {
            info!(
                "service {}: backend {} is up ({})",
                r.service, name, r.detail
            );
        } else {
            warn!(
                "service {}: backend {} is down ({})",
                r.service, name, r.detail
            );
        }
        // Down: flagged first (its flows move at once), then out of the table. Up: flagged
        // usable first, then into the table (`apply`'s order).
        self.sync()
    }

    /// The backends `picks` (given each one's hop) chooses, as resolution requests: one per
    /// address of a service (its backends on several ports share the hop).
    pub fn hop_requests(&self, picks: impl Fn(Option<&Hop>) -> bool) -> Vec<(String, HopRequest)> {
        let mut seen = std::collections::HashSet::new();
        self.services
            .iter()
            .flat_map(|s| {
                s.backends
                    .iter()
                    .filter(|b| picks(b.hop.as_ref()))
                    .map(|b| (s.cfg.name.clone(), HopRequest::of(&s.cfg, &b.cfg)))
            })
            .filter(|(name, req)| seen.insert((name.clone(), req.backend.address)))
            .collect()
    }

    /// Takes new resolutions of hops (`hop_requests` with their results) and applies what
    /// changed; each only while its backend is still there, asked for the same way. Returns
    /// the neighbours (ifindex, address) the data path now uses that lbd looked up itself.
    pub fn take_hops(
        &mut self,
        resolved: impl IntoIterator<Item = ((String, HopRequest), Result<Hop, ResolveError>)>,
    ) -> anyhow::Result<Vec<(u32, IpAddr)>> {
        let mut in_use = vec![];
        let mut changed = false;
        for ((name, req), result) in resolved {
            let Some(s) = self
                .services
                .iter_mut()
                .find(|s| s.cfg.name == name && HopRequest::of(&s.cfg, &req.backend) == req)
            else {
                continue;
            };
            // Every backend at that address (one host on several ports) takes the hop.
            let port = s.cfg.port;
            let repeated = s.cfg.repeats(req.backend.address);
            for b in s
                .backends
                .iter_mut()
                .filter(|b| b.cfg.address == req.backend.address)
            {
                let backend = if repeated {
                    b.cfg.key(port).to_string()
                } else {
                    b.cfg.address.to_string()
                };
                changed |= follow_hop(&name, &backend, b, &result);
                if let Some(hop) = &b.hop
                    && b.cfg.mac.is_none()
                {
                    in_use.push((hop.ifindex, hop.via));
                }
            }
        }
        if changed {
            self.sync()?;
        }
        Ok(in_use)
    }

    pub fn find_service(&self, name: &str) -> Result<&ServiceRuntime, String> {
        self.services
            .iter()
            .find(|s| s.cfg.name == name)
            .ok_or_else(|| format!("no service named {name:?} (see `lbctl service list`)"))
    }

    /// Weight a drained backend had before its drain. A backend with a port of its own whose
    /// address is unique in its service may have been kept by its address alone (as lbd kept
    /// every backend before ports were part of a backend's identity).
    pub fn weight_before_drain(&self, service: &str, key: BackendKey) -> Option<u32> {
        let s = self.services.iter().find(|s| s.cfg.name == service)?;
        self.drained
            .get(&drained_key(service, s.cfg.port, key))
            .or_else(|| {
                (!s.cfg.repeats(key.address))
                    .then(|| self.drained.get(&drained_key(service, key.port, key)))
                    .flatten()
            })
            .copied()
    }

    /// The key `service`'s backend `key` is kept under in the drained weights.
    fn drained_key_of(&self, service: &str, key: BackendKey) -> String {
        let port = self
            .services
            .iter()
            .find(|s| s.cfg.name == service)
            .map_or(key.port, |s| s.cfg.port);
        drained_key(service, port, key)
    }

    pub fn remember_drain(&mut self, service: &str, key: BackendKey, weight: u32) {
        self.drained
            .insert(self.drained_key_of(service, key), weight);
    }

    /// Forgets the weight kept for a drained backend (under either key `weight_before_drain`
    /// reads).
    pub fn forget_drain(&mut self, service: &str, key: BackendKey) {
        self.drained.remove(&self.drained_key_of(service, key));
        let unique = self
            .services
            .iter()
            .find(|s| s.cfg.name == service)
            .is_some_and(|s| !s.cfg.repeats(key.address));
        if unique {
            self.drained.remove(&drained_key(service, key.port, key));
        }
    }
}

/// Applies a new resolution of backend `b`'s hop (of service `service`, the backend named
/// `address` in the log); returns whether its hop changed.
fn follow_hop(
    service: &str,
    address: &str,
    b: &mut BackendRuntime,
    result: &Result<Hop, ResolveError>,
) -> bool {
    match result {
        Ok(hop) if b.hop.as_ref() == Some(hop) => false,
        Ok(hop) => {
            match &b.hop {
                None => info!(
                    "service {service}: backend {address} resolved: {} via {} on ifindex {} (MTU {})",
                    mac_string(&hop.mac),
                    hop.via,
                    hop.ifindex,
                    hop.mtu
                ),
                Some(old) => info!(
                    "service {service}: backend {address} now reached at {} via {} on ifindex {} (MTU {}; was {} via {} on ifindex {}, MTU {})",
                    mac_string(&hop.mac),
                    hop.via,
                    hop.ifindex,
                    hop.mtu,
                    mac_string(&old.mac),
                    old.via,
                    old.ifindex,
                    old.mtu
                ),
            }
            b.hop = Some(hop.clone());
            b.hop_error = None;
            true
        }
        Err(e) => {
            if e.neighbour_only() || b.hop.is_none() {
                // The last hop stays (or there is none): a neighbour that stops answering for
                // a while must not take a working backend out of service.
                if b.hop.is_none() {
                    b.hop_error = Some(e.to_string());
                }
                return false;
            }
            warn!("service {service}: backend {address} gets no traffic until it resolves: {e}");
            b.hop = None;
            b.hop_error = Some(e.to_string());
            true
        }
    }
}

#[cfg(test)]
mod tests {
    //! `follow_hop`: what a new resolution does to a backend's hop.

    use super::*;
    use crate::{
        daemon::testing::{self, hop},
        netlink::NetlinkError,
    };

    fn backend(hop: Option<Hop>) -> BackendRuntime {
        testing::backend(0, "192.0.2.11", 100, hop, true)
    }

    fn silent_neighbour() -> ResolveError {
        ResolveError::Netlink(NetlinkError::Unresolved {
            addr: "192.0.2.11".parse().unwrap(),
            iface: "eth1".into(),
            timeout: Duration::from_secs(3),
            detail: "no answer".into(),
        })
    }

    fn no_route() -> ResolveError {
        ResolveError::Netlink(NetlinkError::NoRoute {
            dst: "192.0.2.11".parse().unwrap(),
            reason: "unreachable".into(),
        })
    }

    #[test]
    fn a_new_mac_replaces_the_hop_and_the_same_one_changes_nothing() {
        let mut b = backend(Some(hop(1)));
        assert!(!follow_hop("web", "192.0.2.11", &mut b, &Ok(hop(1))));
        assert!(follow_hop("web", "192.0.2.11", &mut b, &Ok(hop(2))));
        assert_eq!(b.hop, Some(hop(2)));
    }

    #[test]
    fn a_silent_neighbour_keeps_the_last_hop_but_a_lost_route_drops_it() {
        let mut b = backend(Some(hop(1)));
        assert!(!follow_hop(
            "web",
            "192.0.2.11",
            &mut b,
            &Err(silent_neighbour())
        ));
        assert_eq!((b.hop.clone(), b.hop_error.clone()), (Some(hop(1)), None));
        assert!(follow_hop("web", "192.0.2.11", &mut b, &Err(no_route())));
        assert_eq!(b.hop, None);
        assert_eq!(
            b.hop_error.as_deref(),
            Some("no route to 192.0.2.11: unreachable")
        );
    }

    #[test]
    fn an_unresolved_backend_says_why_and_joins_once_it_resolves() {
        let mut b = backend(None);
        assert!(!follow_hop(
            "web",
            "192.0.2.11",
            &mut b,
            &Err(silent_neighbour())
        ));
        assert!(b.hop_error.as_deref().unwrap().contains("no answer"));
        assert!(follow_hop("web", "192.0.2.11", &mut b, &Ok(hop(1))));
        assert_eq!((b.hop.clone(), b.hop_error.clone()), (Some(hop(1)), None));
    }
}
