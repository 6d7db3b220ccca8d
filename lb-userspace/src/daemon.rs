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
use log::{error, info, warn};
use tokio::sync::{Mutex, mpsc};

use crate::{
    api,
    config::{self, CheckKind, Config, Forwarding, HashMode},
    datapath::{self, Datapath, Start},
    health,
    netlink::Netlink,
    state,
};

/// How long one backend's next hop may take to resolve before lbd goes on without it (it keeps
/// retrying in the background).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);
/// All of a round of resolutions ends within this, however many backends do not answer, so lbd
/// is ready well within the 10 s SPEC allows.
const RESOLVE_ROUND: Duration = Duration::from_secs(6);
/// How often neighbours are re-read, to follow MAC changes and retry unresolved backends.
const REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// Netlink connections used side by side when resolving many backends. The kernel serves one
/// dump at a time per netlink socket (a second gets EBUSY), so parallel resolution needs a
/// socket per worker; a backend that never answers then delays only its own worker.
const RESOLVE_WORKERS: usize = 8;

/// Where a backend's frames go.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Hop {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// The egress interface's MTU.
    pub mtu: u16,
    /// `tunnel`: the outer source address.
    pub tunnel_src: Option<IpAddr>,
    /// Whose MAC `mac` is: the backend (dsr) or the gateway towards it.
    pub via: IpAddr,
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
            ifindex: hop.ifindex,
            service,
            family: state::family(self.cfg.address),
            flags: backend_flags::VALID | if self.healthy { 0 } else { backend_flags::DOWN },
            mtu: hop.mtu,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServiceRuntime {
    pub id: u32,
    pub cfg: config::Service,
    pub backends: Vec<BackendRuntime>,
    /// The Maglev table the data path has now.
    pub table: Vec<u32>,
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
        let live: Vec<MaglevBackend> = self
            .backends
            .iter()
            .filter(|b| b.in_table() && Some(b.cfg.address) != left_out)
            .map(|b| MaglevBackend {
                id: b.id,
                addr: state::to_addr(b.cfg.address),
                weight: b.cfg.weight,
            })
            .collect();
        build_table(seed, &live, self.cfg.table_size)
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

pub type Shared = Arc<Mutex<Daemon>>;

fn drained_key(service: &str, address: IpAddr) -> String {
    format!("{service} {address}")
}

/// What resolving a backend's hop needs to know.
#[derive(Debug, Clone, PartialEq)]
struct HopRequest {
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
        mac,
        src_mac: iface.mac,
        mtu: iface.mtu.min(u16::MAX as u32) as u16,
        tunnel_src,
        via,
    })
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

    /// Rebuilds a service's table and swaps it in when it changed.
    fn sync_table(&mut self, si: usize) -> anyhow::Result<()> {
        let table = self.services[si].table_without(&self.seed, None);
        if table != self.services[si].table {
            let id = self.services[si].id;
            self.datapath.swap_table(id, &table)?;
            self.services[si].table = table;
        }
        Ok(())
    }

    /// Writes a service completely: its backends, its table, its key.
    fn install_service(&mut self, si: usize) -> anyhow::Result<()> {
        let s = &self.services[si];
        for b in &s.backends {
            self.datapath.set_backend(b.id, &b.entry(s.id))?;
        }
        let table = s.table_without(&self.seed, None);
        self.datapath.set_service(&s.key(), &s.value(), &table)?;
        self.services[si].table = table;
        Ok(())
    }

    /// Brings the daemon and the data path to `new`, keeping the runtime state (ids, hops,
    /// health) of what stays. Used at SIGHUP and for every lbctl change. Returns a line per
    /// change.
    pub async fn reconcile(&mut self, new: Config) -> anyhow::Result<Vec<String>> {
        let mut changes = vec![];
        let old_daemon = &self.config.daemon;
        if new.daemon != *old_daemon {
            warn!("[daemon] settings changed in the file; they take effect when lbd restarts");
        }
        // Services that went away: key first (no new packet finds them), then table and
        // backends.
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
            self.datapath.remove_service(&s.key())?;
            self.datapath.remove_table(s.id)?;
            for b in &s.backends {
                self.datapath.clear_backend(b.id)?;
            }
            self.monitor.remove_service(&s.cfg.name);
            changes.push(format!("service {} removed", s.cfg.name));
        }
        // New backends (of new or existing services) need their hops first.
        let mut to_resolve = vec![];
        for ns in &new.services {
            let existing = self.services.iter().find(|s| s.cfg.name == ns.name);
            let same_forwarding = existing.is_some_and(|s| {
                s.cfg.forwarding == ns.forwarding && s.cfg.tunnel_source == ns.tunnel_source
            });
            for nb in &ns.backends {
                let known = existing.and_then(|s| s.backend(nb.address));
                if !same_forwarding || known.is_none_or(|b| b.cfg.mac != nb.mac) {
                    to_resolve.push((ns.name.clone(), HopRequest::of(ns, nb)));
                }
            }
        }
        let mut hops: HashMap<(String, IpAddr), anyhow::Result<Hop>> = HashMap::new();
        let results = resolve_many(to_resolve.iter().map(|(_, r)| r.clone()).collect()).await;
        for ((service, req), r) in to_resolve.into_iter().zip(results) {
            hops.insert((service, req.backend.address), r);
        }
        let now = SystemTime::now();
        // Ids of backends removed in this pass stay reserved until their entries are cleared
        // below, so a backend added in the same pass never gets (and loses) one of them.
        let mut reserved: Vec<u32> = vec![];
        for ns in &new.services {
            let si = match self.services.iter().position(|s| s.cfg.name == ns.name) {
                Some(si) => si,
                None => {
                    let id = free_id(&self.used_service_ids(), MAX_SERVICES)?;
                    self.services.push(ServiceRuntime {
                        id,
                        cfg: ns.clone(),
                        backends: vec![],
                        table: vec![],
                    });
                    changes.push(format!("service {} added", ns.name));
                    self.services.len() - 1
                }
            };
            let old_key = self.services[si].key();
            let old_cfg = self.services[si].cfg.clone();
            // Backends that went away: out of the table first, then their entries.
            let removed: Vec<BackendRuntime> = {
                let s = &mut self.services[si];
                let (keep, gone): (Vec<_>, Vec<_>) = s
                    .backends
                    .drain(..)
                    .partition(|b| ns.backends.iter().any(|n| n.address == b.cfg.address));
                s.backends = keep;
                gone
            };
            reserved.extend(removed.iter().map(|b| b.id));
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
                        used.extend_from_slice(&reserved);
                        let id = free_id(&used, MAX_BACKENDS)?;
                        let hop = hop.unwrap_or_else(|| Err(anyhow::anyhow!("not resolved")));
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
            if self.services[si].key() != old_key {
                self.datapath.remove_service(&old_key)?;
                changes.push(format!(
                    "service {}: now {} port {} {}",
                    ns.name, ns.vip, ns.port, ns.protocol
                ));
            }
            if old_cfg.table_size != ns.table_size {
                // A new size changes the hash's modulus: the table is installed whole.
                self.services[si].table.clear();
            }
            if self.services[si].table.is_empty() {
                self.install_service(si)?;
            } else {
                let s = &self.services[si];
                for b in &s.backends {
                    self.datapath.set_backend(b.id, &b.entry(s.id))?;
                }
                self.sync_table(si)?;
                let s = &self.services[si];
                self.datapath.set_service_key(&s.key(), &s.value())?;
            }
            for b in &removed {
                self.datapath.clear_backend(b.id)?;
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
        self.save_drained();
        for c in &changes {
            info!("{c}");
        }
        Ok(changes)
    }

    /// The VIP-level entries fragments without ports need, and the egress interfaces of every
    /// resolved backend as redirect targets.
    fn sync_vips_and_egress(&mut self) -> anyhow::Result<()> {
        let mut by_vip: HashMap<lb_common::VipKey, Vec<&ServiceRuntime>> = HashMap::new();
        for s in &self.services {
            let key = lb_common::VipKey {
                addr: state::to_addr(s.cfg.vip),
                proto: s.cfg.protocol.number(),
                family: state::family(s.cfg.vip),
                _pad: [0; 2],
            };
            by_vip.entry(key).or_default().push(s);
        }
        let entries: Vec<(lb_common::VipKey, ServiceValue)> = by_vip
            .into_iter()
            .map(|(k, list)| {
                let mut v = list[0].value();
                // Only a VIP with one source-hashed service for the protocol can place a
                // fragment without ports.
                if list.len() != 1 || list[0].cfg.hash != HashMode::Source {
                    v.flags |= service_flags::NO_LATE_FRAGMENTS;
                }
                (k, v)
            })
            .collect();
        self.datapath.set_vips(&entries)?;
        let mut egress: Vec<u32> = self
            .services
            .iter()
            .flat_map(|s| {
                s.backends
                    .iter()
                    .filter_map(|b| b.hop.as_ref().map(|h| h.ifindex))
            })
            .collect();
        egress.sort_unstable();
        egress.dedup();
        for ifindex in egress {
            self.datapath.add_egress(ifindex)?;
        }
        Ok(())
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
        let sid = self.services[si].id;
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
        let entry = b.entry(sid);
        let id = b.id;
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
        // usable first, then into the table.
        self.datapath.set_backend(id, &entry)?;
        self.sync_table(si)
    }

    /// Re-reads neighbours: follows MAC changes, picks up backends that now resolve.
    async fn refresh(shared: &Shared) -> anyhow::Result<()> {
        // Resolved backends: one neighbour lookup each, to follow a MAC that changed. Unresolved
        // ones: the whole resolution again.
        let (known, unknown): (Vec<_>, Vec<_>) = {
            let d = shared.lock().await;
            d.services
                .iter()
                .flat_map(|s| {
                    s.backends.iter().map(|b| {
                        (
                            s.cfg.name.clone(),
                            HopRequest::of(&s.cfg, &b.cfg),
                            b.hop.clone(),
                        )
                    })
                })
                .partition(|(_, req, hop)| hop.is_some() && req.backend.mac.is_none())
        };
        // Without holding the lock: lbctl stays responsive.
        let mut requests = vec![];
        let mut results = vec![];
        let mut resolve: Vec<(String, HopRequest)> = unknown
            .into_iter()
            .filter(|(_, _, hop)| hop.is_none())
            .map(|(name, req, _)| (name, req))
            .collect();
        if !known.is_empty() {
            let netlink = Netlink::new()?;
            for (name, req, hop) in known {
                let hop = hop.expect("partitioned on it");
                match netlink.neighbour(hop.ifindex, hop.via).await {
                    Ok(Some(mac)) if mac == hop.mac => {}
                    Ok(Some(mac)) => {
                        requests.push((name, req));
                        results.push(Ok(Hop { mac, ..hop }));
                    }
                    // Gone from the table (or unreadable): resolve it again, which also asks
                    // the kernel to resolve it; until then the last known MAC stays in use.
                    _ => resolve.push((name, req)),
                }
            }
        }
        results.extend(resolve_many(resolve.iter().map(|(_, r)| r.clone()).collect()).await);
        requests.extend(resolve);
        let mut d = shared.lock().await;
        let d = &mut *d;
        for ((name, req), hop) in requests.into_iter().zip(results) {
            let Ok(hop) = hop else { continue };
            let Some(si) = d.services.iter().position(|s| {
                s.cfg.name == name
                    && HopRequest::of(&s.cfg, &req.backend) == req
                    && s.backend(req.backend.address).is_some()
            }) else {
                continue;
            };
            let cfg = req.backend;
            let s = &mut d.services[si];
            let sid = s.id;
            let b = s
                .backends
                .iter_mut()
                .find(|b| b.cfg.address == cfg.address)
                .expect("found above");
            // A backend that stops resolving keeps its last known hop: a neighbour entry that
            // ages out must not take a working backend out of service.
            if b.hop.as_ref() == Some(&hop) {
                continue;
            }
            info!(
                "service {name}: backend {} now reached at {} on ifindex {}",
                cfg.address,
                mac_string(&hop.mac),
                hop.ifindex
            );
            let was_missing = b.hop.is_none();
            b.hop = Some(hop);
            b.hop_error = None;
            let (id, entry) = (b.id, b.entry(sid));
            d.datapath.set_backend(id, &entry)?;
            if was_missing {
                d.sync_table(si)?;
            }
            d.sync_vips_and_egress()?;
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
        services.push(ServiceRuntime {
            id,
            cfg: s.clone(),
            backends,
            table: vec![],
        });
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

    // Fill every map before the program goes in place, so its first packet finds every table.
    daemon.datapath.set_config(seed)?;
    for si in 0..daemon.services.len() {
        daemon.install_service(si)?;
    }
    let keep: Vec<ServiceKey> = daemon.services.iter().map(|s| s.key()).collect();
    for (key, value) in daemon.datapath.service_keys() {
        if !keep.contains(&key) {
            info!(
                "removing service {} left from an earlier configuration",
                value.id
            );
            daemon.datapath.remove_service(&key)?;
            daemon.datapath.remove_table(value.id)?;
        }
    }
    let used = daemon.used_backend_ids();
    for (id, _) in daemon.datapath.backend_entries() {
        if !used.contains(&id) {
            daemon.datapath.clear_backend(id)?;
        }
    }
    daemon.sync_vips_and_egress()?;
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
    let shared: Shared = Arc::new(Mutex::new(daemon));
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
    let refresher = {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REFRESH_INTERVAL).await;
                if let Err(e) = Daemon::refresh(&shared).await {
                    error!("refreshing backends: {e:#}");
                }
            }
        })
    };
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
    refresher.abort();
    health_task.abort();
    shared.lock().await.monitor.stop_all();
    socket_file.remove();
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

/// SIGHUP: re-read the file and apply the difference; a broken file changes nothing.
async fn reload(shared: &Shared) {
    notify(&[sd_notify::NotifyState::Reloading]);
    let mut d = shared.lock().await;
    let path = d.config_path.clone();
    match config::load(&path) {
        Err(e) => error!("SIGHUP: {e}; the running state is unchanged"),
        Ok(loaded) => {
            for w in &loaded.warnings {
                warn!("{}: {w}", path.display());
            }
            match d.reconcile(loaded.config).await {
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
