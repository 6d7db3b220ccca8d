//! lbd as a process: start (config, lock, seed, interfaces, data path, runtime state, hops,
//! maps, then the control socket and metrics once everything is ready), signals (SIGHUP
//! reloads the file, SIGTERM and SIGINT stop lbd with the data path forwarding), sd_notify,
//! shutdown and `lbd --cleanup`. The one place that wires `daemon`, `announce` and `api`
//! together.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use log::{error, info, warn};
use tokio::sync::mpsc;

use crate::{
    announce, api, config,
    daemon::{
        ConntrackUse, Daemon, Shared, follow::follow, interfaces::check_pinned_link, plan, resolve,
    },
    datapath::{self, Datapath, Start},
    health,
    netlink::Netlink,
    state, sync,
};

/// Starts lbd with the config at `config_path` and runs until SIGTERM or SIGINT. On return the
/// data path stays attached and forwarding.
/// With `reseed`, a configured seed that differs from the running data path's replaces it
/// (see `state::hash_seed`).
pub async fn daemon(config_path: &Path, reseed: bool) -> anyhow::Result<()> {
    let loaded = config::load(config_path)?;
    for w in &loaded.warnings {
        warn!("{}: {w}", config_path.display());
    }
    let config = loaded.config;
    // Read before anything is touched: a missing or malformed key stops lbd here.
    let sync_key = match &config.daemon.sync {
        Some(s) => Some(sync::read_key(&s.key_file)?),
        None => None,
    };
    // Before anything is touched: the kernel has every feature the program uses (one error
    // naming all that are missing).
    datapath::kernel::check_and_log(datapath::kernel::Needs::Daemon)?;
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

    let datapath = Datapath::open_sized(
        &config.daemon.bpffs_dir,
        config.daemon.conntrack_entries,
        config.nat_tables(),
        &config.daemon.interfaces,
    )?;
    let pinned = plan::Pinned {
        services: datapath
            .service_keys()
            .into_iter()
            .map(|(k, v)| (k, v.id))
            .collect(),
        backends: datapath
            .backend_entries()
            .into_iter()
            .map(|(id, b)| ((b.service, b.addr, b.port), (id, b.flags)))
            .collect(),
    };
    let adopting = datapath.start != Start::Fresh;
    let mut services = plan::initial(&config, &pinned, adopting, SystemTime::now())?;
    resolve::resolve_all(&mut services).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut daemon = Daemon::new(
        config_path.to_owned(),
        config,
        seed,
        datapath,
        services,
        health::Monitor::new(tx),
    );
    daemon.start(&interfaces)?;

    // The routes follow the serving VIPs from now on: the runtime state is filled and the
    // program attached, so a restarted lbd finds its routes as it left them (no flap).
    let announcer = daemon
        .take_announce_ends()
        .map(|(cfg, serving, report)| tokio::spawn(announce::follow(cfg, serving, report)));
    let bpffs_dir = daemon.config.daemon.bpffs_dir.clone();
    let conntrack_use = daemon.conntrack.clone();
    let socket_path = daemon.config.daemon.socket.clone();
    let metrics_addr = daemon.config.daemon.metrics;
    let shared = Shared::new(daemon);
    spawn_conntrack_scanner(bpffs_dir, shared.clone(), conntrack_use);
    // Stops its threads when dropped, at exit.
    let _sync = match sync_key {
        Some(key) => Some(start_sync(&shared, key).await?),
        None => None,
    };
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
    // The VIP routes stay (a restart or upgrade does not withdraw them).
    if let Some(a) = announcer {
        a.abort();
    }
    shared.lock().await.stop();
    socket_file.remove();
    Ok(())
}

/// Starts sharing connection state with the peers of `[daemon.sync]`.
async fn start_sync(shared: &Shared, key: [u8; 32]) -> anyhow::Result<sync::Sync> {
    let (settings, events) = {
        let mut d = shared.lock().await;
        let cfg = d
            .config
            .daemon
            .sync
            .clone()
            .context("daemon.sync is not configured")?;
        let events = d
            .datapath
            .take_sync_events()
            .context("the data path's SYNC_EVENTS ring buffer was already taken")?;
        let settings = sync::Settings {
            listen: cfg.listen,
            peers: cfg.peers,
            key,
            node: d.config.daemon.node_name(),
            seed: d.seed,
        };
        (settings, events)
    };
    let running = sync::start(settings, Arc::new(SyncedDaemon(shared.clone())), events)?;
    shared.lock().await.sync_status = Some(running.status.clone());
    Ok(running)
}

/// The daemon as the sync threads see it (from threads outside the runtime).
struct SyncedDaemon(Shared);

impl sync::Node for SyncedDaemon {
    fn describe(&self, events: &[lb_common::SyncEvent]) -> Vec<Option<sync::SyncedFlow>> {
        let d = self.0.blocking_lock();
        events
            .iter()
            .map(|e| d.datapath.describe_event(e))
            .collect()
    }

    fn adopt(
        &self,
        flows: &[sync::SyncedFlow],
        now: u32,
    ) -> Result<Vec<datapath::Adopted>, datapath::DatapathError> {
        self.0.blocking_lock().datapath.adopt_peer_flows(flows, now)
    }

    fn hello(&self) -> (bool, Vec<sync::Fingerprint>) {
        let d = self.0.blocking_lock();
        let fingerprints = d
            .services
            .iter()
            .map(|s| sync::Fingerprint {
                service: s.cfg.name.clone(),
                fingerprint: s.fingerprint(),
            })
            .collect();
        (d.node_drained(), fingerprints)
    }
}

/// The connection table is counted and scanned (a read of its memory, off the lock) at least
/// this often, and never spending more than 5% of a CPU on it: a big table is read less often.
const CONNTRACK_SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// Reads the connection table now and then, on a thread of its own (detached: it ends with the
/// process, or once the daemon is gone): counts its flows and, while Maglev slots are changed,
/// finds which of them live flows still need and clears the others
/// (`Datapath::clear_slots`).
fn spawn_conntrack_scanner(bpffs_dir: PathBuf, shared: Shared, out: Arc<ConntrackUse>) {
    let spawned = std::thread::Builder::new()
        .name("conntrack-scan".into())
        .spawn(move || {
            use std::sync::atomic::Ordering::Relaxed;
            let counter = match datapath::ConntrackCounter::open(&bpffs_dir) {
                Ok(c) => c,
                Err(e) => {
                    warn!("connection-table use will not be reported, changed slots not cleared: {e}");
                    return;
                }
            };
            let mut clock = datapath::TableClock::default();
            let mut warned = false;
            let mut new_flows: Option<(Instant, [u64; lb_common::NewFlow::COUNT as usize])> =
                None;
            loop {
                let (view, times) = {
                    let d = shared.blocking_lock();
                    let times = datapath::SlotTimes {
                        idle_hold: Duration::from_secs(d.config.daemon.idle_hold_s),
                        ..Default::default()
                    };
                    (d.datapath.slot_view(), times)
                };
                // Only the reading counts towards the pause, not waits for the lock.
                let started = Instant::now();
                let scan = clock.now().map(|now| {
                    let limits = times.limits(clock.ticks_per_second());
                    (view.scan(counter.records(), now, &limits), limits)
                });
                let (entries, capacity) = match &scan {
                    Some((scan, _)) => (scan.used, counter.capacity()),
                    None => counter.count(),
                };
                let spent = started.elapsed();
                out.entries.store(entries, Relaxed);
                out.capacity.store(capacity, Relaxed);
                let mut d = shared.blocking_lock();
                match scan {
                    Some((scan, limits)) => {
                        let cleared = d.datapath.clear_slots(&scan, &limits);
                        if cleared > 0 {
                            let (changed, _) = d.datapath.changed_slots();
                            info!("{cleared} Maglev slots no live flow needs any more cleared; {changed} still changed");
                        }
                    }
                    None if !warned => {
                        warned = true;
                        warn!("cannot read the kernel's jiffies from /proc/timer_list: changed Maglev slots are not cleared (packets on them keep reading the connection table)");
                    }
                    None => {}
                }
                out.changed_slots
                    .store(d.datapath.changed_slots().0, Relaxed);
                let counts = d.datapath.new_flow_counts();
                drop(d);
                let at = Instant::now();
                if let Some((then, before)) = new_flows {
                    let secs = at.duration_since(then).as_secs_f64().max(1e-3);
                    for (i, rate) in out.new_flows_per_second.iter().enumerate() {
                        let n = counts[i].saturating_sub(before[i]);
                        rate.store((n as f64 / secs).round() as u64, Relaxed);
                    }
                }
                new_flows = Some((at, counts));
                if Arc::strong_count(&out) == 1 {
                    return; // the daemon is gone
                }
                std::thread::sleep(CONNTRACK_SCAN_INTERVAL.max(spent * 20));
            }
        });
    if let Err(e) = spawned {
        warn!("connection-table use will not be reported: cannot start its thread: {e}");
    }
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
            match shared.reconcile_to(loaded.config).await {
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
    // The VIP routes go first: the node stops attracting traffic before it stops balancing.
    if let Some(cfg) = config.daemon.announce {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime for netlink")?;
        let removed = runtime.block_on(announce::cleanup(&cfg)).with_context(|| {
            format!(
                "removing the VIP routes of table {} (protocol {})",
                cfg.table, cfg.protocol
            )
        })?;
        for vip in &removed {
            info!(
                "withdrawn: {vip} (route removed from table {}, protocol {})",
                cfg.table, cfg.protocol
            );
        }
        if removed.is_empty() {
            info!(
                "no VIP route in table {} with protocol {}",
                cfg.table, cfg.protocol
            );
        }
    }
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
