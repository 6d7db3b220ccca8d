//! lbd's main loop: load the config, bring the data path up, fill it, open the control socket
//! once everything is ready, and keep following neighbours until told to stop.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lb_common::{
    Backend, ServiceKey, ServiceValue, backend_flags,
    maglev::{MaglevBackend, build_table},
    service_flags,
};
use log::{error, info, warn};
use tokio::sync::Mutex;

use crate::{
    api,
    config::{self, Config, Forwarding, HashMode},
    datapath::{self, Datapath},
    netlink::Netlink,
    state,
};

/// How long one backend's next hop may take to resolve before lbd goes on without it (it keeps
/// retrying in the background). Several resolve in parallel, so readiness stays well under 10 s.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often neighbours are re-read, to follow MAC changes and retry unresolved backends.
const REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// Where a backend's frames go.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Hop {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub src_mac: [u8; 6],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Up,
    Down,
    Draining,
}

#[derive(Debug, Clone)]
pub struct BackendRuntime {
    pub id: u32,
    pub cfg: config::Backend,
    pub hop: Option<Hop>,
    pub state: BackendState,
    pub since: Instant,
}

impl BackendRuntime {
    /// Whether new clients may be sent here.
    fn in_table(&self) -> bool {
        self.hop.is_some() && self.state == BackendState::Up && self.cfg.weight > 0
    }
}

#[derive(Debug, Clone)]
pub struct ServiceRuntime {
    pub id: u32,
    pub cfg: config::Service,
    pub backends: Vec<BackendRuntime>,
}

impl ServiceRuntime {
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            addr: state::to_addr(self.cfg.vip),
            port: self.cfg.port.to_be(),
            proto: self.cfg.protocol.number(),
            family: state::family(self.cfg.vip),
        }
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

    /// The Maglev table for the backends that may take new clients now.
    pub fn table(&self, seed: &[u64; 2]) -> Vec<u32> {
        let live: Vec<MaglevBackend> = self
            .backends
            .iter()
            .filter(|b| b.in_table())
            .map(|b| MaglevBackend {
                id: b.id,
                addr: state::to_addr(b.cfg.address),
                weight: b.cfg.weight,
            })
            .collect();
        build_table(seed, &live, self.cfg.table_size)
    }
}

pub struct Daemon {
    pub config_path: PathBuf,
    pub config: Config,
    pub seed: [u64; 2],
    pub datapath: Datapath,
    pub services: Vec<ServiceRuntime>,
    pub started: Instant,
}

pub type Shared = Arc<Mutex<Daemon>>;

/// Services and backends with ids: services by position, backends numbered across services in
/// config order, so the same config always gives the same ids (a restart rewrites identical
/// map entries).
fn runtime_of(config: &Config) -> Vec<ServiceRuntime> {
    let mut next_backend = 0u32;
    config
        .services
        .iter()
        .enumerate()
        .map(|(i, s)| ServiceRuntime {
            id: i as u32,
            cfg: s.clone(),
            backends: s
                .backends
                .iter()
                .map(|b| {
                    let id = next_backend;
                    next_backend += 1;
                    BackendRuntime {
                        id,
                        cfg: b.clone(),
                        hop: None,
                        state: if b.weight == 0 {
                            BackendState::Draining
                        } else {
                            BackendState::Up
                        },
                        since: Instant::now(),
                    }
                })
                .collect(),
        })
        .collect()
}

/// Finds where a backend's frames go: its own MAC (from the config or the neighbour table,
/// resolving it when absent) and the interface that reaches it.
async fn resolve(netlink: &Netlink, backend: &config::Backend) -> anyhow::Result<Hop> {
    let addr = backend.address;
    match backend.mac {
        Some(mac) => {
            let route = netlink.route_get(addr).await?;
            let iface = netlink
                .interface_by_index(route.oif)
                .await?
                .with_context(|| {
                    format!("interface {} of the route to {addr} vanished", route.oif)
                })?;
            Ok(Hop {
                ifindex: route.oif,
                mac,
                src_mac: iface.mac,
            })
        }
        None => {
            let hop = netlink.next_hop(addr, RESOLVE_TIMEOUT).await?;
            if hop.via != addr {
                bail!(
                    "backend {addr} is behind gateway {}: dsr needs backends on a directly connected network",
                    hop.via
                );
            }
            Ok(Hop {
                ifindex: hop.ifindex,
                mac: hop.mac,
                src_mac: hop.src_mac,
            })
        }
    }
}

/// Netlink connections used side by side when resolving many backends. The kernel serves one
/// dump at a time per netlink socket (a second gets EBUSY), so parallel resolution needs a
/// socket per worker; a backend that never answers then delays only its own worker.
const RESOLVE_WORKERS: usize = 8;

async fn resolve_all(services: &mut [ServiceRuntime]) {
    let all: Vec<(String, config::Backend)> = services
        .iter()
        .flat_map(|s| {
            s.backends
                .iter()
                .map(move |b| (s.cfg.name.clone(), b.cfg.clone()))
        })
        .collect();
    let workers = RESOLVE_WORKERS.min(all.len()).max(1);
    let jobs = (0..workers).map(|w| {
        let mine: Vec<(usize, &config::Backend)> = all
            .iter()
            .enumerate()
            .skip(w)
            .step_by(workers)
            .map(|(i, (_, b))| (i, b))
            .collect();
        async move {
            let mut out = vec![];
            match Netlink::new() {
                Ok(netlink) => {
                    for (i, b) in mine {
                        out.push((i, resolve(&netlink, b).await));
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
    let mut results: Vec<Option<anyhow::Result<Hop>>> = (0..all.len()).map(|_| None).collect();
    for (i, r) in futures::future::join_all(jobs).await.into_iter().flatten() {
        results[i] = Some(r);
    }
    let mut results = results.into_iter();
    for s in services.iter_mut() {
        for b in s.backends.iter_mut() {
            match results.next().flatten().expect("one result per backend") {
                Ok(hop) => b.hop = Some(hop),
                Err(e) => {
                    warn!(
                        "service {}: backend {} gets no traffic until it resolves: {e:#}",
                        s.cfg.name, b.cfg.address
                    );
                    b.hop = None;
                }
            }
        }
    }
}

fn backend_entry(service: u32, b: &BackendRuntime) -> Backend {
    let Some(hop) = &b.hop else {
        return Backend::default();
    };
    Backend {
        addr: state::to_addr(b.cfg.address),
        tunnel_src: [0; 4],
        mac: hop.mac,
        src_mac: hop.src_mac,
        ifindex: hop.ifindex,
        service,
        family: state::family(b.cfg.address),
        flags: backend_flags::VALID,
        _pad: [0; 2],
    }
}

impl Daemon {
    /// Writes the whole desired state into the maps: backends first, then each service's table
    /// and key, then removes services the data path has but the state does not.
    fn apply(&mut self) -> anyhow::Result<()> {
        self.datapath.set_config(self.seed)?;
        for s in &self.services {
            for b in &s.backends {
                self.datapath.set_backend(b.id, &backend_entry(s.id, b))?;
            }
        }
        let mut keep = vec![];
        for s in &self.services {
            let table = s.table(&self.seed);
            self.datapath.set_service(&s.key(), &s.value(), &table)?;
            keep.push(s.key());
        }
        for (key, value) in self.datapath.service_keys() {
            if !keep.contains(&key) {
                info!(
                    "removing service {} left from an earlier configuration",
                    value.id
                );
                self.datapath.remove_service(&key)?;
            }
        }
        Ok(())
    }

    /// Re-reads neighbours: follows MAC changes, picks up backends that now resolve.
    async fn refresh(&mut self) -> anyhow::Result<()> {
        let mut services = self.services.clone();
        resolve_all(&mut services).await;
        for (s, fresh) in self.services.iter_mut().zip(services) {
            let mut table_changed = false;
            for (b, f) in s.backends.iter_mut().zip(fresh.backends) {
                if b.hop == f.hop {
                    continue;
                }
                // A backend that stops resolving keeps its last known hop: a neighbour entry
                // that ages out must not take a working backend out of service.
                let Some(hop) = f.hop else { continue };
                info!(
                    "service {}: backend {} now reached at {} on ifindex {}",
                    s.cfg.name,
                    b.cfg.address,
                    mac_string(&hop.mac),
                    hop.ifindex
                );
                table_changed |= b.hop.is_none();
                b.hop = Some(hop);
                self.datapath.set_backend(b.id, &backend_entry(s.id, b))?;
            }
            if table_changed {
                let table = s.table(&self.seed);
                self.datapath.swap_table(s.id, &table)?;
            }
        }
        Ok(())
    }
}

pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Starts lbd with the config at `config_path` and runs until SIGTERM or SIGINT. On return the
/// data path stays attached and forwarding.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let loaded = config::load(config_path)?;
    for w in &loaded.warnings {
        warn!("{}: {w}", config_path.display());
    }
    let config = loaded.config;
    let seed = state::hash_seed(config.daemon.hash_seed, &config.daemon.state_dir)?;
    let netlink = Netlink::new().context("opening a netlink connection")?;

    let mut interfaces = vec![];
    for name in &config.daemon.interfaces {
        let iface = netlink.interface_by_name(name).await?.with_context(|| {
            format!("daemon.interfaces: there is no interface {name:?} in this network namespace")
        })?;
        interfaces.push((name.clone(), iface.index));
    }

    let datapath = Datapath::load(&config.daemon.bpffs_dir, config.daemon.conntrack_entries)?;
    let mut services = runtime_of(&config);
    resolve_all(&mut services).await;

    let mut daemon = Daemon {
        config_path: config_path.to_owned(),
        seed,
        datapath,
        services,
        started: Instant::now(),
        config,
    };
    // Fill the maps before attaching, so the first packet the program sees finds every table.
    daemon.apply()?;
    let mode = daemon.config.daemon.xdp_mode;
    for (name, index) in &interfaces {
        daemon.datapath.attach(name, *index, mode)?;
    }

    let socket_path = daemon.config.daemon.socket.clone();
    let shared: Shared = Arc::new(Mutex::new(daemon));
    let listener = api::bind(&socket_path)?;
    info!("ready: control socket {}", socket_path.display());

    let refresher = tokio::spawn(refresh_loop(shared.clone()));
    let shutdown = async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: exiting, the data path keeps forwarding"); break }
                _ = int.recv() => { info!("SIGINT: exiting, the data path keeps forwarding"); break }
                _ = hup.recv() => warn!("SIGHUP: configuration reload is not supported yet; restart lbd to apply changes"),
            }
        }
    };
    api::serve(listener, shared.clone(), shutdown).await?;
    refresher.abort();
    let _ = std::fs::remove_file(&socket_path);
    Ok(())
}

async fn refresh_loop(shared: Shared) {
    loop {
        tokio::time::sleep(REFRESH_INTERVAL).await;
        let mut d = shared.lock().await;
        if let Err(e) = d.refresh().await {
            error!("refreshing backends: {e:#}");
        }
    }
}

/// `lbd --cleanup`: detaches the program and removes every pin.
pub fn cleanup(config_path: &Path) -> anyhow::Result<()> {
    let config = config::load(config_path)?.config;
    let removed = datapath::cleanup(&config.daemon.bpffs_dir)?;
    if removed.is_empty() {
        info!("nothing pinned under {}", config.daemon.bpffs_dir.display());
    }
    for r in removed {
        info!("removed {r}");
    }
    let _ = std::fs::remove_file(&config.daemon.socket);
    Ok(())
}
