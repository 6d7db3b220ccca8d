//! lbd's main loop: load the config, open (or adopt) the data path, fill it, open the control
//! socket once everything is ready, then follow health checks, neighbours, SIGHUP and lbctl
//! until told to stop. Every change, whatever its origin, goes through `Daemon::reconcile`.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use lb_common::{
    Backend, MAX_BACKENDS, MAX_SERVICES, ServiceKey, ServiceValue, backend_flags,
    maglev::{MaglevBackend, build_table},
    service_flags,
};
use log::{debug, error, info, warn};
use tokio::sync::{Mutex, mpsc};

use crate::{
    api,
    config::{self, CheckKind, Config, Forwarding, HashMode},
    datapath::{self, Datapath, Fill, LinkPlace, Start},
    health,
    netlink::{ETH_P_8021Q, Interface, Netlink, NetlinkError, Vlan},
    state,
};

/// How long one backend's next hop may take to resolve before lbd goes on without it (it keeps
/// retrying in the background).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);
/// All of a round of resolutions ends within this, however many backends do not answer, so lbd
/// is ready well within the 10 s SPEC allows.
const RESOLVE_ROUND: Duration = Duration::from_secs(6);
/// How often every backend's hop is resolved again and stale neighbours re-confirmed, besides
/// whenever the kernel announces a change (see `follow`).
const REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// Netlink connections used side by side when resolving many backends. The kernel serves one
/// dump at a time per netlink socket (a second gets EBUSY), so parallel resolution needs a
/// socket per worker; a backend that never answers then delays only its own worker.
const RESOLVE_WORKERS: usize = 8;

/// Where a backend's frames go.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Hop {
    /// The interface the route leaves by (where the neighbour entry lives).
    pub ifindex: u32,
    /// Set when that interface is an 802.1Q VLAN device: frames leave by its parent, with its
    /// tag (a VLAN device cannot take XDP redirects).
    pub vlan: Option<Vlan>,
    pub mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// The egress interface's MTU.
    pub mtu: u16,
    /// `tunnel`: the outer source address.
    pub tunnel_src: Option<IpAddr>,
    /// Whose MAC `mac` is: the backend (dsr) or the gateway towards it.
    pub via: IpAddr,
}

impl Hop {
    /// The interface the data path sends the backend's frames out of.
    pub fn egress(&self) -> u32 {
        self.vlan.map_or(self.ifindex, |v| v.parent)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Up,
    Down,
    Draining,
}

impl std::fmt::Display for BackendState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendState::Up => "up",
            BackendState::Down => "down",
            BackendState::Draining => "draining",
        })
    }
}

/// The last health check of a backend.
#[derive(Debug, Clone)]
pub struct LastCheck {
    pub result: health::CheckResult,
    pub detail: String,
    pub at: SystemTime,
}

#[derive(Debug, Clone)]
pub struct BackendRuntime {
    pub id: u32,
    pub cfg: config::Backend,
    pub hop: Option<Hop>,
    /// Why the hop is missing.
    pub hop_error: Option<String>,
    /// Health: false once `fall` checks failed (or until the first check passes for a backend
    /// added at run time).
    pub healthy: bool,
    pub last: Option<LastCheck>,
    /// When the state (up, down, draining) last changed.
    pub since: SystemTime,
}

impl BackendRuntime {
    /// Whether new clients may be sent here.
    pub fn in_table(&self) -> bool {
        self.hop.is_some() && self.healthy && self.cfg.weight > 0
    }

    pub fn state(&self) -> BackendState {
        if self.cfg.weight == 0 {
            BackendState::Draining
        } else if self.in_table() {
            BackendState::Up
        } else {
            BackendState::Down
        }
    }

    /// The data path's entry: invalid while unresolved; DOWN makes its flows leave it.
    fn entry(&self, service: u32) -> Backend {
        let Some(hop) = &self.hop else {
            return Backend::default();
        };
        Backend {
            addr: state::to_addr(self.cfg.address),
            tunnel_src: hop.tunnel_src.map(state::to_addr).unwrap_or_default(),
            mac: hop.mac,
            src_mac: hop.src_mac,
            ifindex: hop.egress(),
            service,
            family: state::family(self.cfg.address),
            flags: backend_flags::VALID | if self.healthy { 0 } else { backend_flags::DOWN },
            mtu: hop.mtu,
            vlan: hop.vlan.map_or(0, |v| v.id),
            _pad: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServiceRuntime {
    pub id: u32,
    pub cfg: config::Service,
    pub backends: Vec<BackendRuntime>,
    /// The Maglev table of the backends that may take new clients now (the data path's once
    /// the daemon has synced it).
    pub table: Vec<u32>,
    /// `table` as the words of its array, and what it was built from: it is rebuilt only when
    /// that changes.
    words: Arc<[u64]>,
    built_from: Option<([u64; 2], u32, Vec<MaglevBackend>)>,
}

pub fn service_key(s: &config::Service) -> ServiceKey {
    ServiceKey {
        addr: state::to_addr(s.vip),
        port: s.port.to_be(),
        proto: s.protocol.number(),
        family: state::family(s.vip),
    }
}

impl ServiceRuntime {
    pub fn new(id: u32, cfg: config::Service, backends: Vec<BackendRuntime>) -> ServiceRuntime {
        ServiceRuntime {
            id,
            cfg,
            backends,
            table: vec![],
            words: Arc::from([]),
            built_from: None,
        }
    }

    pub fn key(&self) -> ServiceKey {
        service_key(&self.cfg)
    }

    fn value(&self) -> ServiceValue {
        let mut flags = 0;
        if self.cfg.forwarding == Forwarding::Tunnel {
            flags |= service_flags::TUNNEL;
        }
        if self.cfg.hash == HashMode::FiveTuple {
            flags |= service_flags::HASH_5TUPLE;
        }
        ServiceValue {
            id: self.id,
            flags,
            table_size: self.cfg.table_size,
            _pad: 0,
        }
    }

    /// The Maglev table for the backends that may take new clients now, or with some of them
    /// left out (`--dry-run`).
    pub fn table_without(&self, seed: &[u64; 2], left_out: Option<IpAddr>) -> Vec<u32> {
        build_table(seed, &self.live(left_out), self.cfg.table_size)
    }

    /// The backends that may take new clients now, but `left_out`.
    fn live(&self, left_out: Option<IpAddr>) -> Vec<MaglevBackend> {
        self.backends
            .iter()
            .filter(|b| b.in_table() && Some(b.cfg.address) != left_out)
            .map(|b| MaglevBackend {
                id: b.id,
                addr: state::to_addr(b.cfg.address),
                weight: b.cfg.weight,
            })
            .collect()
    }

    /// Brings `table` up to date with the backends, their state and the table size.
    fn refresh_table(&mut self, seed: &[u64; 2]) {
        let inputs = (*seed, self.cfg.table_size, self.live(None));
        if self.built_from.as_ref() != Some(&inputs) {
            self.table = build_table(seed, &inputs.2, self.cfg.table_size);
            self.words = lb_common::maglev_words(&self.table).into();
            self.built_from = Some(inputs);
        }
    }

    pub fn backend(&self, address: IpAddr) -> Option<&BackendRuntime> {
        self.backends.iter().find(|b| b.cfg.address == address)
    }

    fn health_target(&self, b: &BackendRuntime) -> health::Target {
        health::Target {
            service: self.cfg.name.clone(),
            backend: b.cfg.address,
            spec: self.cfg.health.clone(),
        }
    }
}

/// What every map must hold for `services` (whose Maglev tables it brings up to date): their
/// keys, entries by id and tables, every resolved backend's entry (flagged down while its
/// checks fail), the VIP filter, the VIP-level entries that place fragments without ports, and
/// every egress interface as a redirect target. The one function that decides map contents:
/// lbd fills the maps with it at start and after every change, so a running lbd's maps are
/// always those a fresh lbd with the same state would fill.
pub fn fill(config: lb_common::Config, seed: &[u64; 2], services: &mut [ServiceRuntime]) -> Fill {
    let mut f = Fill {
        config,
        ..Fill::default()
    };
    for s in services.iter_mut() {
        s.refresh_table(seed);
    }
    type VipGroup<'a> = (lb_common::VipKey, Vec<&'a ServiceRuntime>);
    let mut by_vip: BTreeMap<(lb_common::Addr, u8, u8), VipGroup> = BTreeMap::new();
    for s in services.iter() {
        let (key, value) = (s.key(), s.value());
        f.services.insert(key, value);
        f.service_by_id
            .insert(s.id, lb_common::ServiceEntry { key, value });
        f.maglev.insert(s.id, s.words.clone());
        for b in &s.backends {
            let entry = b.entry(s.id);
            if entry != Backend::default() {
                f.backends.insert(b.id, entry);
            }
            if let Some(hop) = &b.hop {
                f.devmap.insert(hop.egress(), hop.egress());
            }
        }
        let vip = lb_common::VipKey {
            addr: state::to_addr(s.cfg.vip),
            proto: s.cfg.protocol.number(),
            family: state::family(s.cfg.vip),
            _pad: [0; 2],
        };
        by_vip
            .entry((vip.addr, vip.proto, vip.family))
            .or_insert((vip, vec![]))
            .1
            .push(s);
    }
    f.vip_filter = datapath::vip_filter_words(f.services.keys());
    for (_, (key, list)) in by_vip {
        // Named by the VIP's lowest service id, whatever the services' order.
        let first = list
            .iter()
            .min_by_key(|s| s.id)
            .expect("a group has a service");
        let mut value = first.value();
        // Only a VIP with one source-hashed service for the protocol can place a fragment
        // without ports.
        if list.len() != 1 || first.cfg.hash != HashMode::Source {
            value.flags |= service_flags::NO_LATE_FRAGMENTS;
        }
        f.vips.insert(key, value);
    }
    f
}

pub struct Daemon {
    pub config_path: PathBuf,
    /// The desired state, as in the file.
    pub config: Config,
    pub seed: [u64; 2],
    pub datapath: Datapath,
    pub services: Vec<ServiceRuntime>,
    pub started: Instant,
    monitor: health::Monitor,
    /// Weights of drained backends before their drain ("service address" → weight), kept in
    /// state_dir so `undrain` survives restarts.
    drained: BTreeMap<String, u32>,
    /// Health checks run: (service, backend, result) → count.
    pub health_counts: BTreeMap<(String, IpAddr, health::CheckResult), u64>,
    /// Flows in the connection table and its capacity, counted in the background.
    pub conntrack: Arc<ConntrackUse>,
}

/// The connection table's use as last counted.
#[derive(Default)]
pub struct ConntrackUse {
    pub entries: std::sync::atomic::AtomicU64,
    pub capacity: std::sync::atomic::AtomicU64,
}

impl ConntrackUse {
    pub fn get(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.entries.load(Relaxed), self.capacity.load(Relaxed))
    }
}

/// The connection table's flows are counted (a scan of its memory, off the lock) at least this
/// often, and never spending more than 5% of a CPU on it: a big table is counted less often.
const CONNTRACK_COUNT_INTERVAL: Duration = Duration::from_secs(1);

/// Counts the connection table now and then, on a thread of its own (detached: it ends with
/// the process, or once the daemon is gone).
fn spawn_conntrack_counter(bpffs_dir: PathBuf, out: Arc<ConntrackUse>) {
    let spawned = std::thread::Builder::new()
        .name("conntrack-count".into())
        .spawn(move || {
            use std::sync::atomic::Ordering::Relaxed;
            let counter = match datapath::ConntrackCounter::open(&bpffs_dir) {
                Ok(c) => c,
                Err(e) => {
                    warn!("connection-table use will not be reported: {e}");
                    return;
                }
            };
            loop {
                let started = Instant::now();
                let (entries, capacity) = counter.count();
                out.entries.store(entries, Relaxed);
                out.capacity.store(capacity, Relaxed);
                if Arc::strong_count(&out) == 1 {
                    return; // the daemon is gone
                }
                std::thread::sleep(CONNTRACK_COUNT_INTERVAL.max(started.elapsed() * 20));
            }
        });
    if let Err(e) = spawned {
        warn!("connection-table use will not be reported: cannot start its thread: {e}");
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

    /// The right to make a change (config file and runtime state), held for all of it.
    pub async fn change(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.changes.lock().await
    }
}

fn drained_key(service: &str, address: IpAddr) -> String {
    format!("{service} {address}")
}

/// What resolving a backend's hop needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct HopRequest {
    backend: config::Backend,
    forwarding: Forwarding,
    tunnel_source: Option<IpAddr>,
}

impl HopRequest {
    fn of(s: &config::Service, b: &config::Backend) -> HopRequest {
        HopRequest {
            backend: b.clone(),
            forwarding: s.forwarding,
            tunnel_source: s.tunnel_source,
        }
    }
}

/// Finds where a backend's frames go: the MAC of the backend itself (dsr: from the config or
/// the neighbour table, resolving it when absent) or of the next hop towards it (tunnel), the
/// interface they leave by, its MAC and MTU, and (tunnel) the outer source address.
async fn resolve(netlink: &Netlink, req: &HopRequest, timeout: Duration) -> anyhow::Result<Hop> {
    let addr = req.backend.address;
    let (ifindex, mac, via, prefsrc) = match req.backend.mac {
        Some(mac) => {
            let route = netlink.route_get(addr).await?;
            (route.oif, mac, route.gateway.unwrap_or(addr), route.prefsrc)
        }
        None => {
            let hop = netlink.next_hop(addr, timeout).await?;
            (hop.ifindex, hop.mac, hop.via, hop.prefsrc)
        }
    };
    if req.forwarding == Forwarding::Dsr && via != addr {
        bail!(
            "backend {addr} is behind gateway {via}: dsr needs backends on a directly connected network (tunnel forwarding does not)"
        );
    }
    let iface = netlink
        .interface_by_index(ifindex)
        .await?
        .with_context(|| format!("interface {ifindex} of the route to {addr} vanished"))?;
    if let Some(vlan) = iface.vlan {
        check_vlan(netlink, &iface, vlan, addr).await?;
    }
    let tunnel_src = match (req.forwarding, req.tunnel_source) {
        (Forwarding::Dsr, _) => None,
        (Forwarding::Tunnel, Some(src)) => Some(src),
        (Forwarding::Tunnel, None) => Some(
            prefsrc
                .or_else(|| iface.addrs.iter().map(|(a, _)| *a).find(|a| a.is_ipv4() == addr.is_ipv4() && !is_link_local(a)))
                .with_context(|| format!("no {} address on {} to use as the tunnel source for {addr}: set tunnel_source", if addr.is_ipv4() { "IPv4" } else { "IPv6" }, iface.name))?,
        ),
    };
    Ok(Hop {
        ifindex,
        vlan: iface.vlan,
        mac,
        src_mac: iface.mac,
        mtu: iface.mtu.min(u16::MAX as u32) as u16,
        tunnel_src,
        via,
    })
}

/// A backend whose route leaves by VLAN device `iface` is reached through its parent with its
/// tag: one 802.1Q tag on a plain interface, which the data path writes; anything else is
/// refused with the reason.
async fn check_vlan(
    netlink: &Netlink,
    iface: &Interface,
    vlan: Vlan,
    addr: IpAddr,
) -> anyhow::Result<()> {
    if vlan.protocol != ETH_P_8021Q {
        bail!(
            "backend {addr} is reached by {} (VLAN {} with protocol {:#06x}): the data path writes 802.1Q tags (0x8100) only",
            iface.name,
            vlan.id,
            vlan.protocol
        );
    }
    let parent = netlink
        .interface_by_index(vlan.parent)
        .await?
        .with_context(|| {
            format!(
                "the parent (ifindex {}) of {}, the route to {addr}, vanished",
                vlan.parent, iface.name
            )
        })?;
    if parent.vlan.is_some() {
        bail!(
            "backend {addr} is reached by {}, a VLAN on the VLAN {}: the data path writes one 802.1Q tag, not two",
            iface.name,
            parent.name
        );
    }
    Ok(())
}

fn is_link_local(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// Resolves the hops of `backends` (several at a time), in order.
async fn resolve_many(backends: Vec<HopRequest>) -> Vec<anyhow::Result<Hop>> {
    let deadline = Instant::now() + RESOLVE_ROUND;
    let workers = RESOLVE_WORKERS.min(backends.len()).max(1);
    let jobs = (0..workers).map(|w| {
        let mine: Vec<(usize, HopRequest)> = backends
            .iter()
            .cloned()
            .enumerate()
            .skip(w)
            .step_by(workers)
            .collect();
        async move {
            let mut out = vec![];
            match Netlink::new() {
                Ok(netlink) => {
                    for (i, b) in mine {
                        let left = deadline.saturating_duration_since(Instant::now());
                        out.push((
                            i,
                            if left.is_zero() {
                                Err(anyhow::anyhow!(
                                    "not resolved within the first {RESOLVE_ROUND:?} (retried in the background)"
                                ))
                            } else {
                                resolve(&netlink, &b, left.min(RESOLVE_TIMEOUT)).await
                            },
                        ));
                    }
                }
                Err(e) => {
                    let message = format!("opening a netlink connection: {e}");
                    out.extend(
                        mine.into_iter()
                            .map(|(i, _)| (i, Err(anyhow::anyhow!(message.clone())))),
                    );
                }
            }
            out
        }
    });
    let mut results: Vec<Option<anyhow::Result<Hop>>> = (0..backends.len()).map(|_| None).collect();
    for (i, r) in futures::future::join_all(jobs).await.into_iter().flatten() {
        results[i] = Some(r);
    }
    results
        .into_iter()
        .map(|r| r.expect("one result per backend"))
        .collect()
}

/// Resolved hops by service name and backend address, as `Daemon::reconcile` takes them.
pub type Hops = HashMap<(String, IpAddr), anyhow::Result<Hop>>;

/// Resolves what `Daemon::hops_needed` asked for (several at a time; never holding the daemon's
/// lock, so lbctl, metrics and health changes go on meanwhile).
pub async fn resolve_hops(needed: Vec<(String, HopRequest)>) -> Hops {
    let results = resolve_many(needed.iter().map(|(_, r)| r.clone()).collect()).await;
    needed
        .into_iter()
        .zip(results)
        .map(|((service, req), r)| ((service, req.backend.address), r))
        .collect()
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

/// Applies a new resolution of backend `b`'s hop (of service `service`); returns whether its
/// hop changed.
fn follow_hop(service: &str, b: &mut BackendRuntime, result: anyhow::Result<Hop>) -> bool {
    let address = b.cfg.address;
    match result {
        Ok(hop) if b.hop.as_ref() == Some(&hop) => false,
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
            b.hop = Some(hop);
            b.hop_error = None;
            true
        }
        Err(e) => {
            let neighbour_only = e.downcast_ref::<NetlinkError>().is_some_and(|e| {
                matches!(
                    e,
                    NetlinkError::Unresolved { .. } | NetlinkError::Neighbour { .. }
                )
            });
            if neighbour_only || b.hop.is_none() {
                // The last hop stays (or there is none): a neighbour that stops answering for
                // a while must not take a working backend out of service.
                if b.hop.is_none() {
                    b.hop_error = Some(format!("{e:#}"));
                }
                return false;
            }
            warn!("service {service}: backend {address} gets no traffic until it resolves: {e:#}");
            b.hop = None;
            b.hop_error = Some(format!("{e:#}"));
            true
        }
    }
}

/// Lowest id in `0..max` not in `used`.
fn free_id(used: &[u32], max: u32) -> anyhow::Result<u32> {
    (0..max)
        .find(|id| !used.contains(id))
        .with_context(|| format!("all {max} data-path slots are in use"))
}

impl Daemon {
    fn used_backend_ids(&self) -> Vec<u32> {
        self.services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect()
    }

    fn used_service_ids(&self) -> Vec<u32> {
        self.services.iter().map(|s| s.id).collect()
    }

    /// Makes every map hold what `fill` computes from the runtime state now: the one way the
    /// data path is written, at start and after every change.
    fn sync(&mut self) -> anyhow::Result<()> {
        let config = self.datapath.config_for(self.seed)?;
        let want = fill(config, &self.seed, &mut self.services);
        self.datapath.apply(&want)?;
        Ok(())
    }

    /// The hops `reconcile` to `new` needs resolved: those of new backends, and of every
    /// backend of a service whose forwarding (or tunnel source) or fixed MAC changes.
    pub fn hops_needed(&self, new: &Config) -> Vec<(String, HopRequest)> {
        let mut needed = vec![];
        for ns in &new.services {
            let existing = self.services.iter().find(|s| s.cfg.name == ns.name);
            let same_forwarding = existing.is_some_and(|s| {
                s.cfg.forwarding == ns.forwarding && s.cfg.tunnel_source == ns.tunnel_source
            });
            for nb in &ns.backends {
                let known = existing.and_then(|s| s.backend(nb.address));
                if !same_forwarding || known.is_none_or(|b| b.cfg.mac != nb.mac) {
                    needed.push((ns.name.clone(), HopRequest::of(ns, nb)));
                }
            }
        }
        needed
    }

    /// Brings the daemon and the data path to `new`, keeping the runtime state (ids, hops,
    /// health) of what stays; `hops` holds the resolutions `hops_needed` asked for (one
    /// missing is retried in the background). Used at SIGHUP and for every lbctl change.
    /// Returns a line per change.
    pub fn reconcile(&mut self, new: Config, mut hops: Hops) -> anyhow::Result<Vec<String>> {
        let mut changes = vec![];
        let old_daemon = &self.config.daemon;
        if new.daemon != *old_daemon {
            warn!("[daemon] settings changed in the file; they take effect when lbd restarts");
        }
        // Ids freed in this pass are not given again before the data path has let go of them
        // (in the next pass), so no packet of what went meets what comes under the same id.
        let mut reserved_services: Vec<u32> = vec![];
        let mut reserved_backends: Vec<u32> = vec![];
        let gone: Vec<usize> = (0..self.services.len())
            .filter(|&i| {
                !new.services
                    .iter()
                    .any(|n| n.name == self.services[i].cfg.name)
            })
            .rev()
            .collect();
        for i in gone {
            let s = self.services.remove(i);
            reserved_services.push(s.id);
            reserved_backends.extend(s.backends.iter().map(|b| b.id));
            self.monitor.remove_service(&s.cfg.name);
            for b in &s.backends {
                self.drained
                    .remove(&drained_key(&s.cfg.name, b.cfg.address));
            }
            changes.push(format!("service {} removed", s.cfg.name));
        }
        let now = SystemTime::now();
        for ns in &new.services {
            let si = match self.services.iter().position(|s| s.cfg.name == ns.name) {
                Some(si) => si,
                None => {
                    let mut used = self.used_service_ids();
                    used.extend_from_slice(&reserved_services);
                    let id = free_id(&used, MAX_SERVICES)?;
                    self.services
                        .push(ServiceRuntime::new(id, ns.clone(), vec![]));
                    changes.push(format!("service {} added", ns.name));
                    self.services.len() - 1
                }
            };
            let old_cfg = self.services[si].cfg.clone();
            let removed: Vec<BackendRuntime> = {
                let s = &mut self.services[si];
                let (keep, gone): (Vec<_>, Vec<_>) = s
                    .backends
                    .drain(..)
                    .partition(|b| ns.backends.iter().any(|n| n.address == b.cfg.address));
                s.backends = keep;
                gone
            };
            reserved_backends.extend(removed.iter().map(|b| b.id));
            let mut added = vec![];
            for nb in &ns.backends {
                let health_on = ns.health.check != CheckKind::None;
                let hop = hops.remove(&(ns.name.clone(), nb.address));
                let s = &mut self.services[si];
                match s.backends.iter_mut().find(|b| b.cfg.address == nb.address) {
                    Some(b) => {
                        if b.cfg.weight != nb.weight {
                            changes.push(format!(
                                "service {}: backend {} weight {} -> {}",
                                ns.name, nb.address, b.cfg.weight, nb.weight
                            ));
                            if (b.cfg.weight == 0) != (nb.weight == 0) {
                                b.since = now;
                            }
                        }
                        b.cfg = nb.clone();
                        if let Some(hop) = hop {
                            b.hop_error = hop.as_ref().err().map(|e| format!("{e:#}"));
                            b.hop = hop.ok();
                        }
                    }
                    None => {
                        let mut used = self.used_backend_ids();
                        used.extend_from_slice(&reserved_backends);
                        let id = free_id(&used, MAX_BACKENDS)?;
                        let hop = hop.unwrap_or_else(|| {
                            Err(anyhow::anyhow!(
                                "not resolved yet (retried in the background)"
                            ))
                        });
                        if let Err(e) = &hop {
                            warn!(
                                "service {}: backend {} gets no traffic until it resolves: {e:#}",
                                ns.name, nb.address
                            );
                        }
                        let s = &mut self.services[si];
                        s.backends.push(BackendRuntime {
                            id,
                            cfg: nb.clone(),
                            hop_error: hop.as_ref().err().map(|e| format!("{e:#}")),
                            hop: hop.ok(),
                            // Joins once its first check passes.
                            healthy: !health_on,
                            last: None,
                            since: now,
                        });
                        added.push(nb.address);
                        changes.push(format!("service {}: backend {} added", ns.name, nb.address));
                    }
                }
            }
            // Keep the file's order, so listings follow it.
            self.services[si]
                .backends
                .sort_by_key(|b| ns.backends.iter().position(|n| n.address == b.cfg.address));
            self.services[si].cfg = ns.clone();
            if service_key(&old_cfg) != service_key(ns) {
                changes.push(format!(
                    "service {}: now {} port {} {}",
                    ns.name, ns.vip, ns.port, ns.protocol
                ));
            }
            for b in &removed {
                self.monitor.remove(&ns.name, b.cfg.address);
                self.drained.remove(&drained_key(&ns.name, b.cfg.address));
                changes.push(format!(
                    "service {}: backend {} removed",
                    ns.name, b.cfg.address
                ));
            }
            // Health checkers follow the service's settings.
            let s = &self.services[si];
            let spec_changed = old_cfg.health != ns.health;
            for b in &s.backends {
                let start = if added.contains(&b.cfg.address) {
                    health::Start::PendingFirstCheck
                } else if b.healthy {
                    health::Start::Up
                } else {
                    health::Start::Down
                };
                if spec_changed
                    || added.contains(&b.cfg.address)
                    || !self.monitor.is_checked(&ns.name, b.cfg.address)
                {
                    self.monitor.set(s.health_target(b), start);
                }
            }
        }
        // The file's order of services.
        self.services
            .sort_by_key(|s| new.services.iter().position(|n| n.name == s.cfg.name));
        self.config = new;
        self.sync()?;
        self.save_drained();
        for c in &changes {
            info!("{c}");
        }
        Ok(changes)
    }

    fn save_drained(&self) {
        if let Err(e) = state::save_drained(&self.config.daemon.state_dir, &self.drained) {
            warn!("cannot keep the drained weights: {e}");
        }
    }

    /// One health check's result: counted, shown, and on a state change applied to the data
    /// path before the new state is visible.
    fn on_health(&mut self, r: health::Report) -> anyhow::Result<()> {
        *self
            .health_counts
            .entry((r.service.clone(), r.backend, r.result))
            .or_default() += 1;
        let Some(si) = self.services.iter().position(|s| s.cfg.name == r.service) else {
            return Ok(());
        };
        let Some(b) = self.services[si]
            .backends
            .iter_mut()
            .find(|b| b.cfg.address == r.backend)
        else {
            return Ok(());
        };
        // lbd's own trouble is logged when it starts and when it ends, not at every check.
        let was_error = b
            .last
            .as_ref()
            .is_some_and(|l| l.result == health::CheckResult::Error);
        match (was_error, r.result == health::CheckResult::Error) {
            (false, true) => error!(
                "service {}: the health check of backend {} {} (lbd lacks resources; the backend keeps its state, {})",
                r.service,
                r.backend,
                r.detail,
                b.state()
            ),
            (true, false) => info!(
                "service {}: health checks of backend {} run again",
                r.service, r.backend
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
                r.service, r.backend, r.detail
            );
        } else {
            warn!(
                "service {}: backend {} is down ({})",
                r.service, r.backend, r.detail
            );
        }
        // Down: flagged first (its flows move at once), then out of the table. Up: flagged
        // usable first, then into the table (`apply`'s order).
        self.sync()
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
        let backends: Vec<(String, HopRequest)> = {
            let d = shared.lock().await;
            d.services
                .iter()
                .flat_map(|s| {
                    s.backends
                        .iter()
                        .filter(|b| which.picks(b.hop.as_ref()))
                        .map(|b| (s.cfg.name.clone(), HopRequest::of(&s.cfg, &b.cfg)))
                })
                .collect()
        };
        if backends.is_empty() {
            return Ok(());
        }
        let results = resolve_many(backends.iter().map(|(_, r)| r.clone()).collect()).await;
        let mut in_use: Vec<(u32, IpAddr)> = vec![];
        {
            let mut d = shared.lock().await;
            let d = &mut *d;
            let mut changed = false;
            for ((name, req), result) in backends.into_iter().zip(results) {
                // Applied only while the backend is still there, asked for the same way.
                let Some(s) = d
                    .services
                    .iter_mut()
                    .find(|s| s.cfg.name == name && HopRequest::of(&s.cfg, &req.backend) == req)
                else {
                    continue;
                };
                let Some(b) = s
                    .backends
                    .iter_mut()
                    .find(|b| b.cfg.address == req.backend.address)
                else {
                    continue;
                };
                changed |= follow_hop(&name, b, result);
                if let Some(hop) = &b.hop
                    && b.cfg.mac.is_none()
                {
                    in_use.push((hop.ifindex, hop.via));
                }
            }
            if changed {
                d.sync()?;
            }
        }
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

    pub fn find_service(&self, name: &str) -> Result<&ServiceRuntime, String> {
        self.services
            .iter()
            .find(|s| s.cfg.name == name)
            .ok_or_else(|| format!("no service named {name:?} (see `lbctl service list`)"))
    }

    /// Weight a drained backend had before its drain.
    pub fn weight_before_drain(&self, service: &str, address: IpAddr) -> Option<u32> {
        self.drained.get(&drained_key(service, address)).copied()
    }

    pub fn remember_drain(&mut self, service: &str, address: IpAddr, weight: u32) {
        self.drained.insert(drained_key(service, address), weight);
    }

    pub fn forget_drain(&mut self, service: &str, address: IpAddr) {
        self.drained.remove(&drained_key(service, address));
    }
}

pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Whether the program is on an interface lbd is configured for (`lbctl status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InterfaceState {
    /// The interface exists here and its pinned link is on it.
    Attached,
    /// No interface of that name in this network namespace.
    Missing,
    /// The interface exists, but the program is not on it: its link is gone, detached (the
    /// interface was deleted and recreated), or on another interface.
    Detached,
}

/// An interface lbd is configured for, as it is now.
#[derive(Debug, Clone)]
pub struct InterfaceNow {
    pub state: InterfaceState,
    /// Its index here, when it exists.
    pub ifindex: Option<u32>,
    /// The pinned link, and where it is, when there is one.
    pub link: Option<(datapath::LinkFacts, LinkPlace)>,
}

/// Looks at interface `name` and its pinned link under `bpffs_dir` (link info and netlink).
pub async fn interface_now(
    netlink: &Netlink,
    bpffs_dir: &Path,
    name: &str,
) -> anyhow::Result<InterfaceNow> {
    let iface = netlink.interface_by_name(name).await?;
    let pin = datapath::link_pin(bpffs_dir, name);
    let link = match datapath::link_facts(&pin) {
        Ok(facts) => {
            let at_index = match facts.ifindex {
                0 => None,
                i => netlink.interface_by_index(i).await?,
            };
            Some((facts, LinkPlace::of(&facts, at_index.as_ref(), name)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(e).with_context(|| format!("reading the pinned link {}", pin.display()));
        }
    };
    let state = match (&iface, &link) {
        (None, _) => InterfaceState::Missing,
        (Some(_), Some((_, LinkPlace::Here))) => InterfaceState::Attached,
        (Some(_), _) => InterfaceState::Detached,
    };
    Ok(InterfaceNow {
        state,
        ifindex: iface.map(|i| i.index),
        link,
    })
}

/// At start, before the pins are opened: refuses a link pinned for `name` that is attached in
/// another network namespace (an lbd there uses the same `bpffs_dir`), and removes one that
/// is detached or on another interface here, so that the program is attached anew.
async fn check_pinned_link(netlink: &Netlink, bpffs_dir: &Path, name: &str) -> anyhow::Result<()> {
    let pin = datapath::link_pin(bpffs_dir, name);
    let Some((facts, place)) = interface_now(netlink, bpffs_dir, name).await?.link else {
        return Ok(());
    };
    match place {
        LinkPlace::Here => return Ok(()),
        LinkPlace::Foreign => bail!(
            "{} holds link {} attached to ifindex {} of another network namespace, not to {name} here: an lbd there uses the same daemon.bpffs_dir; give each network namespace's lbd a bpffs_dir of its own (nothing was changed)",
            pin.display(),
            facts.id,
            facts.ifindex
        ),
        LinkPlace::Defunct => warn!(
            "{name}: the pinned link {} is detached (its interface was deleted, or moved to another namespace): attaching anew",
            facts.id
        ),
        LinkPlace::OtherInterface { name: other } => warn!(
            "{name}: the pinned link {} is on {other} (renamed?), not on {name}: attaching anew to {name}",
            facts.id
        ),
    }
    std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))
}

/// Services with ids, from the config and what the pinned maps already hold: a restarted lbd
/// keeps every id the data path (and its connection table) uses.
fn initial_runtime(config: &Config, datapath: &Datapath) -> anyhow::Result<Vec<ServiceRuntime>> {
    let pinned_services: HashMap<ServiceKey, u32> = datapath
        .service_keys()
        .into_iter()
        .map(|(k, v)| (k, v.id))
        .collect();
    let pinned_backends: HashMap<(u32, lb_common::Addr), (u32, u8)> = datapath
        .backend_entries()
        .into_iter()
        .map(|(id, b)| ((b.service, b.addr), (id, b.flags)))
        .collect();
    let adopting = datapath.start != Start::Fresh;
    let now = SystemTime::now();
    let mut services: Vec<ServiceRuntime> = vec![];
    let mut service_ids: Vec<u32> = pinned_services.values().copied().collect();
    let mut backend_ids: Vec<u32> = pinned_backends.values().map(|(id, _)| *id).collect();
    for s in &config.services {
        let id = match pinned_services.get(&service_key(s)) {
            Some(&id) if !services.iter().any(|x| x.id == id) => id,
            _ => {
                let id = free_id(&service_ids, MAX_SERVICES)?;
                service_ids.push(id);
                id
            }
        };
        let mut backends = vec![];
        for b in &s.backends {
            let pinned = pinned_backends.get(&(id, state::to_addr(b.address)));
            let bid = match pinned {
                Some(&(bid, _)) => bid,
                None => {
                    let bid = free_id(&backend_ids, MAX_BACKENDS)?;
                    backend_ids.push(bid);
                    bid
                }
            };
            // An adopted data path keeps the health its checks last gave, until lbd's own
            // checks have run.
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

/// Starts lbd with the config at `config_path` and runs until SIGTERM or SIGINT. On return the
/// data path stays attached and forwarding.
/// With `reseed`, a configured seed that differs from the running data path's replaces it
/// (see `state::hash_seed`).
pub async fn run(config_path: &Path, reseed: bool) -> anyhow::Result<()> {
    let loaded = config::load(config_path)?;
    for w in &loaded.warnings {
        warn!("{}: {w}", config_path.display());
    }
    let config = loaded.config;
    // Before anything is touched: no other lbd on these pins, this state or this socket.
    let _lock = crate::lock::daemon(&config.daemon)?;
    raise_open_files();
    let seed = state::hash_seed(
        config.daemon.hash_seed,
        &config.daemon.state_dir,
        datapath::pinned_seed(&config.daemon.bpffs_dir),
        reseed,
    )?;
    let netlink = Netlink::new().context("opening a netlink connection")?;
    let mut interfaces = vec![];
    for name in &config.daemon.interfaces {
        let iface = netlink.interface_by_name(name).await?.with_context(|| {
            format!("daemon.interfaces: there is no interface {name:?} in this network namespace")
        })?;
        interfaces.push((name.clone(), iface.index));
        check_pinned_link(&netlink, &config.daemon.bpffs_dir, name).await?;
    }
    drop(netlink);

    let datapath = Datapath::open(
        &config.daemon.bpffs_dir,
        config.daemon.conntrack_entries,
        &config.daemon.interfaces,
    )?;
    let mut services = initial_runtime(&config, &datapath)?;
    let all: Vec<HopRequest> = services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| HopRequest::of(&s.cfg, &b.cfg)))
        .collect();
    let mut hops = resolve_many(all).await.into_iter();
    for s in &mut services {
        for b in &mut s.backends {
            match hops.next().expect("one hop per backend") {
                Ok(hop) => b.hop = Some(hop),
                Err(e) => {
                    warn!(
                        "service {}: backend {} gets no traffic until it resolves: {e:#}",
                        s.cfg.name, b.cfg.address
                    );
                    b.hop_error = Some(format!("{e:#}"));
                }
            }
        }
    }
    let drained = state::load_drained(&config.daemon.state_dir);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut daemon = Daemon {
        config_path: config_path.to_owned(),
        seed,
        datapath,
        services,
        started: Instant::now(),
        monitor: health::Monitor::new(tx),
        drained,
        health_counts: BTreeMap::new(),
        conntrack: Arc::new(ConntrackUse::default()),
        config,
    };

    // Fill every map before the program goes in place, so its first packet finds every table;
    // what an earlier configuration left in pinned maps goes.
    daemon.sync()?;
    let mode = daemon.config.daemon.xdp_mode;
    for (name, index) in &interfaces {
        daemon.datapath.attach(name, *index, mode)?;
    }
    daemon.datapath.finish_start()?;
    for s in &daemon.services {
        for b in &s.backends {
            let start = if b.healthy {
                health::Start::Up
            } else {
                health::Start::Down
            };
            daemon.monitor.set(s.health_target(b), start);
        }
    }

    spawn_conntrack_counter(
        daemon.config.daemon.bpffs_dir.clone(),
        daemon.conntrack.clone(),
    );
    let socket_path = daemon.config.daemon.socket.clone();
    let metrics_addr = daemon.config.daemon.metrics;
    let shared = Shared::new(daemon);
    let metrics_listener = match metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("daemon.metrics: cannot listen on {addr}"))?,
        ),
        None => None,
    };
    // Signal handlers before the socket: a script may signal lbd as soon as the socket is there.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let (listener, socket_file) = api::bind(&socket_path)?;
    info!("ready: control socket {}", socket_path.display());
    notify(&[sd_notify::NotifyState::Ready]);

    let health_task = {
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some(report) = rx.recv().await {
                let mut d = shared.lock().await;
                if let Err(e) = d.on_health(report) {
                    error!("applying a health change: {e:#}");
                }
            }
        })
    };
    let follower = tokio::spawn(follow(shared.clone()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(listener) = metrics_listener {
        let shared = shared.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let snapshot = move || {
                let shared = shared.clone();
                async move { api::metrics_snapshot(&*shared.lock().await) }
            };
            let shutdown = async move {
                let _ = stop.changed().await;
            };
            if let Err(e) = crate::metrics::serve(listener, snapshot, shutdown).await {
                error!("metrics server: {e}");
            }
        });
    }
    let signals = {
        let shared = shared.clone();
        async move {
            loop {
                tokio::select! {
                    _ = term.recv() => { info!("SIGTERM: exiting; the data path keeps forwarding"); break }
                    _ = int.recv() => { info!("SIGINT: exiting; the data path keeps forwarding"); break }
                    _ = hup.recv() => reload(&shared).await,
                }
            }
            notify(&[sd_notify::NotifyState::Stopping]);
            let _ = stop_tx.send(true);
        }
    };
    api::serve(listener, shared.clone(), signals).await?;
    follower.abort();
    health_task.abort();
    shared.lock().await.monitor.stop_all();
    socket_file.remove();
    Ok(())
}

/// How long lbd lets a burst of the kernel's notifications settle before acting on it.
const SETTLE: Duration = Duration::from_millis(50);
/// Refreshes that notifications cause come at most this often (a refresh re-confirming stale
/// neighbours causes notifications of its own).
const MIN_REFRESH_GAP: Duration = Duration::from_millis(250);

/// Follows the system until aborted: the configured interfaces (attached anew when one comes
/// back, see `follow_interfaces`) and the backends' hops (`Daemon::refresh`: routes, next hops'
/// MACs, egress interfaces' MACs and MTUs), within a fraction of a second of the kernel
/// announcing a change of a link, route, address or of a neighbour the data path uses, and
/// every `REFRESH_INTERVAL` anyway (which also re-confirms stale neighbours).
async fn follow(shared: Shared) {
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
            if let Err(e) = Daemon::refresh(&shared, &hops).await {
                error!("refreshing backends: {e:#}");
            }
        }
        // Backends without a hop are retried on a task of their own (one at a time), so one
        // that never answers holds up nothing else.
        if unresolved && !retrying.swap(true, std::sync::atomic::Ordering::AcqRel) {
            let (shared, retrying) = (shared.clone(), retrying.clone());
            tokio::spawn(async move {
                if let Err(e) = Daemon::refresh(&shared, &Which::Unresolved).await {
                    error!("resolving backends: {e:#}");
                }
                retrying.store(false, std::sync::atomic::Ordering::Release);
            });
        }
    }
}

/// Looks at every configured interface: logs what changed since `states`, and attaches the
/// program anew to one that is back (deleted and recreated, or renamed back while another
/// took its name) with its link detached or elsewhere. A link pin removed by hand (`lbd
/// --cleanup` of a running lbd) is left alone: the interface shows `detached`.
async fn follow_interfaces(
    shared: &Shared,
    names: &[String],
    states: &mut HashMap<String, InterfaceState>,
) -> anyhow::Result<()> {
    let netlink = Netlink::new()?;
    let (bpffs_dir, mode) = {
        let d = shared.lock().await;
        (d.config.daemon.bpffs_dir.clone(), d.config.daemon.xdp_mode)
    };
    for name in names {
        let mut now = interface_now(&netlink, &bpffs_dir, name).await?;
        if let (Some(ifindex), Some((_, LinkPlace::Defunct | LinkPlace::OtherInterface { .. }))) =
            (now.ifindex, &now.link)
        {
            let mut d = shared.lock().await;
            match d.datapath.reattach(name, ifindex, mode) {
                Ok(()) => {
                    info!("{name} is back (ifindex {ifindex}): the program is attached to it anew");
                    now.state = InterfaceState::Attached;
                }
                Err(e) => {
                    error!("{name} is back (ifindex {ifindex}) but cannot take the program: {e}")
                }
            }
        }
        let before = states.insert(name.clone(), now.state);
        if before.is_some_and(|b| b != now.state) {
            match now.state {
                InterfaceState::Attached => info!("{name}: attached"),
                InterfaceState::Missing => warn!(
                    "{name} is gone: nothing is balanced there until it comes back (lbd attaches the program to it then)"
                ),
                InterfaceState::Detached => warn!(
                    "{name}: the program is not on it (its link pin {} is gone or elsewhere)",
                    datapath::link_pin(&bpffs_dir, name).display()
                ),
            }
        }
    }
    Ok(())
}

/// Raises the soft limit of open files to the hard one (logged).
fn raise_open_files() {
    match crate::limits::raise_open_files() {
        Ok((before, after)) if before != after => {
            info!("open files: soft limit raised from {before} to {after}")
        }
        Ok(_) => {}
        Err(e) => warn!("cannot raise the soft limit of open files: {e}"),
    }
}

/// SIGHUP: re-read the file and apply the difference; a broken file changes nothing. Like an
/// lbctl change, new hops are resolved without holding the daemon's lock.
async fn reload(shared: &Shared) {
    notify(&[sd_notify::NotifyState::Reloading]);
    let _one_change_at_a_time = shared.change().await;
    let path = shared.lock().await.config_path.clone();
    match config::load(&path) {
        Err(e) => error!("SIGHUP: {e}; the running state is unchanged"),
        Ok(loaded) => {
            for w in &loaded.warnings {
                warn!("{}: {w}", path.display());
            }
            let needed = shared.lock().await.hops_needed(&loaded.config);
            let hops = resolve_hops(needed).await;
            match shared.lock().await.reconcile(loaded.config, hops) {
                Ok(changes) if changes.is_empty() => {
                    info!("SIGHUP: {} reloaded, nothing changed", path.display())
                }
                Ok(changes) => info!(
                    "SIGHUP: {} reloaded, {} change(s)",
                    path.display(),
                    changes.len()
                ),
                Err(e) => error!("SIGHUP: applying {}: {e:#}", path.display()),
            }
        }
    }
    notify(&[sd_notify::NotifyState::Ready]);
}

/// Tells systemd (Type=notify) about readiness; nothing when not run by systemd.
fn notify(states: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some()
        && let Err(e) = sd_notify::notify(states)
    {
        warn!("cannot notify systemd: {e}");
    }
}

/// `lbd --cleanup`: detaches the program and removes every pin; refused while an lbd runs on
/// this config.
pub fn cleanup(config_path: &Path) -> anyhow::Result<()> {
    let config = config::load(config_path)?.config;
    let _lock = crate::lock::cleanup(&config.daemon)?;
    let removed = datapath::cleanup(&config.daemon.bpffs_dir)?;
    if removed.is_empty() {
        info!("nothing pinned under {}", config.daemon.bpffs_dir.display());
    }
    for r in removed {
        info!("removed {r}");
    }
    api::remove_stale_socket(&config.daemon.socket);
    Ok(())
}

#[cfg(test)]
mod tests {
    //! `fill`, the one function that decides what the maps hold: no kernel needed.

    use super::*;
    use crate::config::Protocol;

    const SEED: [u64; 2] = [1, 2];

    fn hop(ifindex: u32) -> Hop {
        Hop {
            ifindex,
            vlan: None,
            mac: [2, 0, 0, 0, 0, ifindex as u8],
            src_mac: [2, 0, 0, 0, 1, 1],
            mtu: 1500,
            tunnel_src: None,
            via: "192.0.2.1".parse().unwrap(),
        }
    }

    fn backend(
        id: u32,
        address: &str,
        weight: u32,
        hop: Option<Hop>,
        healthy: bool,
    ) -> BackendRuntime {
        BackendRuntime {
            id,
            cfg: config::Backend {
                address: address.parse().unwrap(),
                weight,
                mac: None,
            },
            hop,
            hop_error: None,
            healthy,
            last: None,
            since: SystemTime::UNIX_EPOCH,
        }
    }

    fn service(
        id: u32,
        vip: &str,
        port: u16,
        protocol: Protocol,
        hash: HashMode,
        backends: Vec<BackendRuntime>,
    ) -> ServiceRuntime {
        ServiceRuntime::new(
            id,
            config::Service {
                name: format!("s{id}"),
                vip: vip.parse().unwrap(),
                port,
                protocol,
                forwarding: Forwarding::Dsr,
                hash,
                table_size: 251,
                tunnel_source: None,
                health: config::Health::default(),
                backends: vec![],
            },
            backends,
        )
    }

    fn vip_key(vip: &str, protocol: Protocol) -> lb_common::VipKey {
        let vip: IpAddr = vip.parse().unwrap();
        lb_common::VipKey {
            addr: state::to_addr(vip),
            proto: protocol.number(),
            family: state::family(vip),
            _pad: [0; 2],
        }
    }

    #[test]
    fn every_map_follows_the_services() {
        let mut services = vec![
            service(
                3,
                "203.0.113.10",
                80,
                Protocol::Tcp,
                HashMode::Source,
                vec![
                    backend(0, "192.0.2.11", 100, Some(hop(2)), true),
                    // Down: its entry says so (its flows leave it), and no slot is its.
                    backend(1, "192.0.2.12", 100, Some(hop(2)), false),
                    // Drained: a valid entry (its flows stay), no slot.
                    backend(2, "192.0.2.13", 0, Some(hop(2)), true),
                    // Unresolved: no entry at all.
                    backend(4, "192.0.2.14", 100, None, true),
                    // Behind another interface: a redirect target.
                    backend(5, "198.51.100.5", 100, Some(hop(7)), true),
                ],
            ),
            service(
                1,
                "203.0.113.10",
                53,
                Protocol::Udp,
                HashMode::Source,
                vec![backend(6, "192.0.2.11", 100, Some(hop(2)), true)],
            ),
        ];
        let f = fill(lb_common::Config::default(), &SEED, &mut services);

        assert_eq!(f.services.len(), 2);
        for s in &services {
            let (key, value) = (s.key(), s.value());
            assert_eq!(f.services[&key], value);
            assert_eq!(
                f.service_by_id[&s.id],
                lb_common::ServiceEntry { key, value }
            );
            assert_eq!(
                &*f.maglev[&s.id],
                &lb_common::maglev_words(&s.table_without(&SEED, None))[..]
            );
        }
        assert_eq!(f.service_by_id.len(), 2);
        let table = &services[0].table;
        assert!(table.contains(&0) && table.contains(&5));
        assert!(!table.contains(&1) && !table.contains(&2) && !table.contains(&4));

        assert_eq!(
            f.backends.keys().copied().collect::<Vec<_>>(),
            [0, 1, 2, 5, 6]
        );
        assert_eq!(
            f.backends[&1].flags,
            backend_flags::VALID | backend_flags::DOWN
        );
        assert_eq!(f.backends[&2].flags, backend_flags::VALID);
        assert_eq!(f.backends[&5].ifindex, 7);
        assert_eq!(f.backends[&6].service, 1);
        assert_eq!(
            f.devmap.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(),
            [(2, 2), (7, 7)]
        );
        assert_eq!(
            f.vip_filter,
            datapath::vip_filter_words(services.iter().map(|s| s.key()).collect::<Vec<_>>().iter())
        );
        // One source-hashed service per VIP and protocol: later fragments can be placed.
        assert_eq!(f.vips.len(), 2);
        assert_eq!(
            f.vips[&vip_key("203.0.113.10", Protocol::Tcp)],
            services[0].value()
        );
        assert_eq!(
            f.vips[&vip_key("203.0.113.10", Protocol::Udp)],
            services[1].value()
        );
    }

    #[test]
    fn a_vip_with_several_services_or_a_5_tuple_hash_places_no_late_fragments() {
        let mut services = vec![
            service(
                4,
                "203.0.113.10",
                80,
                Protocol::Tcp,
                HashMode::Source,
                vec![],
            ),
            service(
                2,
                "203.0.113.10",
                443,
                Protocol::Tcp,
                HashMode::Source,
                vec![],
            ),
            service(
                0,
                "203.0.113.20",
                53,
                Protocol::Udp,
                HashMode::FiveTuple,
                vec![],
            ),
        ];
        let f = fill(lb_common::Config::default(), &SEED, &mut services);
        let shared = f.vips[&vip_key("203.0.113.10", Protocol::Tcp)];
        // Named by the VIP's lowest id, whatever the order of the services.
        assert_eq!(shared.id, 2);
        assert_ne!(shared.flags & service_flags::NO_LATE_FRAGMENTS, 0);
        let five = f.vips[&vip_key("203.0.113.20", Protocol::Udp)];
        assert_ne!(five.flags & service_flags::NO_LATE_FRAGMENTS, 0);
        services.reverse();
        assert_eq!(
            fill(lb_common::Config::default(), &SEED, &mut services),
            f,
            "the services' order does not matter"
        );
    }

    #[test]
    fn a_table_is_rebuilt_only_when_what_it_is_built_from_changes() {
        let mut services = vec![service(
            0,
            "203.0.113.10",
            80,
            Protocol::Tcp,
            HashMode::Source,
            vec![
                backend(0, "192.0.2.11", 100, Some(hop(2)), true),
                backend(1, "192.0.2.12", 100, Some(hop(2)), true),
            ],
        )];
        let first = fill(lb_common::Config::default(), &SEED, &mut services);
        let again = fill(lb_common::Config::default(), &SEED, &mut services);
        assert!(
            Arc::ptr_eq(&first.maglev[&0], &again.maglev[&0]),
            "not rebuilt"
        );
        services[0].backends[1].healthy = false;
        let down = fill(lb_common::Config::default(), &SEED, &mut services);
        assert!(!Arc::ptr_eq(&first.maglev[&0], &down.maglev[&0]));
        assert!(services[0].table.iter().all(|&id| id == 0));
        services[0].cfg.table_size = 257;
        let resized = fill(lb_common::Config::default(), &SEED, &mut services);
        assert_eq!(services[0].table.len(), 257);
        assert_eq!(resized.maglev[&0].len(), 257usize.div_ceil(4));
    }

    /// A backend whose route leaves by a VLAN device: its entry names the VLAN's parent as the
    /// egress (a VLAN device takes no XDP redirects) and the VLAN id as the tag to write.
    #[test]
    fn a_backend_behind_a_vlan_device_leaves_by_its_parent_with_its_tag() {
        let plain = Hop {
            ifindex: 7,
            vlan: None,
            mac: [2, 0, 0, 0, 0xb, 1],
            src_mac: [2, 0, 0, 0, 0xa, 2],
            mtu: 1500,
            tunnel_src: None,
            via: "203.0.113.130".parse().unwrap(),
        };
        let entry = backend(4, "203.0.113.130", 100, Some(plain.clone()), true).entry(3);
        assert_eq!((entry.ifindex, entry.vlan, entry.service), (7, 0, 3));
        let tagged = Hop {
            vlan: Some(Vlan {
                id: 100,
                parent: 2,
                protocol: ETH_P_8021Q,
            }),
            ..plain
        };
        assert_eq!(tagged.egress(), 2);
        let entry = backend(4, "203.0.113.130", 100, Some(tagged), true).entry(3);
        assert_eq!((entry.ifindex, entry.vlan), (2, 100));
        assert_eq!(entry.mac, [2, 0, 0, 0, 0xb, 1]);
        assert_eq!(entry.flags, backend_flags::VALID);
    }
}
