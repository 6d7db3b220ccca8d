//! The control API: HTTP/JSON on a unix socket (mode 0600, owner root, root peers only),
//! versioned under `/v1`. Every change is applied to the data path and written through to the
//! config file before the answer is sent.

use std::{
    future::Future, net::IpAddr, os::unix::fs::PermissionsExt, path::Path, time::SystemTime,
};

use axum::{
    Json, Router,
    extract::{Path as UrlPath, Query, State},
    http::StatusCode,
    routing::{get, post, put},
};
use lb_common::{FlowKey, NO_BACKEND, ServiceValue, Slot, maglev_slot, service_flags};
use serde::{Deserialize, Serialize};
use tokio::{
    io::AsyncWriteExt,
    net::{UnixListener, UnixStream},
};

use crate::{
    config::{self, CheckKind, Forwarding, HashMode, Protocol},
    config_edit::ConfigFile,
    daemon::{BackendState, Daemon, InterfaceState, ServiceRuntime, Shared},
    datapath::Attachment,
    metrics, state,
};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(
        "a process (pid {pid}) answers on the control socket {path}: lbd never removes a socket in use; stop that process, or give this lbd another daemon.socket"
    )]
    InUse { path: String, pid: String },
}

/// Whether some process answers on the unix socket at `path`: `Some` with its pid (as the
/// kernel recorded it when the socket was bound, SO_PEERCRED) when a connection is accepted or
/// the backlog is full, `None` when nothing listens there (no file, not a socket, or a stale
/// socket file a killed process left).
pub fn socket_answers(path: &Path) -> Option<Option<u32>> {
    use std::os::unix::ffi::OsStrExt as _;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid; the path is copied in below within its bounds.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return None;
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the descriptor is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    use std::os::fd::AsRawFd as _;
    // SAFETY: a valid descriptor and a sockaddr_un of the size given.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        // EAGAIN: a listener whose backlog is full (alive, but busy).
        return (std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN))
            .then_some(None);
    }
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a valid descriptor, a ucred buffer and its length, both ours.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    Some((rc == 0 && cred.pid > 0).then_some(cred.pid as u32))
}

/// The control socket's file as this lbd bound it: at exit it is removed only if it is still
/// that very file (never one another lbd bound meanwhile).
pub struct SocketFile {
    path: std::path::PathBuf,
    id: Option<(u64, u64)>,
}

impl SocketFile {
    fn id(path: &Path) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()))
    }

    /// Removes the socket file if it is still the one bound.
    pub fn remove(self) {
        if self.id.is_some() && Self::id(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the control socket. Called only once lbd is ready: a stale socket left by a killed lbd
/// is replaced here, not earlier, so a script waiting for the socket waits for readiness. A
/// socket some process answers on is never removed.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketFile), ApiError> {
    let shown = path.display().to_string();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ApiError::Io {
            what: "creating the socket's folder",
            path: dir.display().to_string(),
            source,
        })?;
    }
    if let Some(pid) = socket_answers(path) {
        return Err(ApiError::InUse {
            path: shown,
            pid: pid.map_or("unknown".into(), |p| p.to_string()),
        });
    }
    match std::fs::remove_file(path) {
        Ok(()) => log::info!("removed a stale control socket {shown}"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ApiError::Io {
                what: "removing the stale socket",
                path: shown,
                source,
            });
        }
    }
    // Created with no permissions for others from the first instant, then set to 0600.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|source| ApiError::Io {
        what: "binding",
        path: shown.clone(),
        source,
    })?;
    let file = SocketFile {
        path: path.to_owned(),
        id: SocketFile::id(path),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ApiError::Io {
            what: "setting the mode of",
            path: shown,
            source,
        }
    })?;
    Ok((listener, file))
}

/// Removes the socket file at `path` unless a process answers on it (`lbd --cleanup`).
pub fn remove_stale_socket(path: &Path) {
    if socket_answers(path).is_none() {
        let _ = std::fs::remove_file(path);
    }
}

/// The control socket, accepting only root peers (SO_PEERCRED). Others get a 403 that says
/// why, and the connection is closed; the file mode already keeps them out unless it was
/// loosened.
pub struct RootOnly {
    listener: UnixListener,
    /// Refusals being answered at once (each holds its connection for up to 500 ms); past
    /// that, a refused peer's connection is closed without an answer.
    refusals: std::sync::Arc<tokio::sync::Semaphore>,
}

impl RootOnly {
    pub fn new(listener: UnixListener) -> Self {
        RootOnly {
            listener,
            refusals: std::sync::Arc::new(tokio::sync::Semaphore::new(16)),
        }
    }
}

impl axum::serve::Listener for RootOnly {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = match self.listener.accept().await {
                Ok(pair) => pair,
                Err(e) => {
                    log::warn!("control socket: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            match stream.peer_cred() {
                Ok(cred) if cred.uid() == 0 => return (stream, addr),
                Ok(cred) => {
                    let uid = cred.uid();
                    log::warn!(
                        "control socket: refused a peer with uid {uid} (only root may use lbd's API)"
                    );
                    if let Ok(permit) = self.refusals.clone().try_acquire_owned() {
                        tokio::spawn(async move {
                            refuse(
                                stream,
                                format!(
                                    "permission denied: lbd accepts only root on its control socket (your uid is {uid})"
                                ),
                            )
                            .await;
                            drop(permit);
                        });
                    }
                }
                Err(e) => log::warn!("control socket: cannot read the peer's credentials: {e}"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

async fn refuse(mut stream: UnixStream, message: String) {
    // Read the request first (briefly): a client still writing it would otherwise see its
    // write fail instead of reading the refusal.
    use tokio::io::AsyncReadExt;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let body = serde_json::json!({ "error": message }).to_string();
    let reply = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

pub async fn serve(
    listener: UnixListener,
    shared: Shared,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/stats", get(stats))
        .route("/v1/services", get(service_list).post(service_add))
        .route("/v1/services/{name}", axum::routing::delete(service_remove))
        .route("/v1/backends", get(backend_list))
        .route("/v1/services/{name}/backends", post(backend_add))
        .route(
            "/v1/services/{name}/backends/{address}",
            axum::routing::delete(backend_remove),
        )
        .route(
            "/v1/services/{name}/backends/{address}/removal",
            get(backend_remove_dry_run),
        )
        .route(
            "/v1/services/{name}/backends/{address}/drain",
            post(backend_drain),
        )
        .route(
            "/v1/services/{name}/backends/{address}/undrain",
            post(backend_undrain),
        )
        .route(
            "/v1/services/{name}/backends/{address}/weight",
            put(backend_weight),
        )
        .route("/v1/lookup", get(lookup))
        .with_state(shared);
    axum::serve(
        crate::limits::Bounded::new(RootOnly::new(listener), crate::limits::CONTROL),
        app,
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// An error answer: the status and lbd's message, as `{"error": ...}`.
pub struct Refusal(StatusCode, String);

impl axum::response::IntoResponse for Refusal {
    fn into_response(self) -> axum::response::Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

fn not_found(m: String) -> Refusal {
    Refusal(StatusCode::NOT_FOUND, m)
}
fn bad(m: String) -> Refusal {
    Refusal(StatusCode::BAD_REQUEST, m)
}
fn conflict(m: String) -> Refusal {
    Refusal(StatusCode::CONFLICT, m)
}
fn internal(e: impl std::fmt::Display) -> Refusal {
    Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

type Reply<T> = Result<Json<T>, Refusal>;

// ---- status and stats ----

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Status {
    pub pid: u32,
    pub version: String,
    pub config: String,
    pub uptime_s: u64,
    pub program_id: u32,
    pub layout_version: u32,
    pub bpffs_dir: String,
    pub start: crate::datapath::Start,
    pub interfaces: Vec<InterfaceStatus>,
    pub services: usize,
    pub backends: usize,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct InterfaceStatus {
    pub name: String,
    /// Its index now (0 while it is missing).
    pub ifindex: u32,
    pub mode: String,
    pub link_id: u32,
    /// Whether the program is on it now: `attached`, `missing` or `detached`.
    pub state: Option<InterfaceState>,
    /// Why its state could not be read, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl From<&Attachment> for InterfaceStatus {
    fn from(a: &Attachment) -> Self {
        InterfaceStatus {
            name: a.interface.clone(),
            ifindex: a.ifindex,
            mode: a.mode.clone(),
            link_id: a.link_id,
            state: None,
            problem: None,
        }
    }
}

async fn status(State(shared): State<Shared>) -> Json<Status> {
    let mut status = status_of(&*shared.lock().await);
    // Each interface as it is now (netlink and link info), without holding the daemon.
    let bpffs_dir = std::path::PathBuf::from(&status.bpffs_dir);
    match crate::netlink::Netlink::new() {
        Ok(netlink) => {
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
        }
    }
    Json(status)
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
            .map(InterfaceStatus::from)
            .collect(),
        services: d.services.len(),
        backends: d.services.iter().map(|s| s.backends.len()).sum(),
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Stats {
    pub services: Vec<ServiceStats>,
    pub dropped: Vec<ReasonCount>,
    pub conntrack: Conntrack,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Conntrack {
    pub entries: u64,
    pub capacity: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ServiceStats {
    pub service: String,
    pub packets: u64,
    pub bytes: u64,
    pub backends: Vec<BackendStats>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct BackendStats {
    pub address: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ReasonCount {
    pub reason: String,
    pub packets: u64,
}

#[derive(Deserialize)]
struct ServiceFilter {
    service: Option<String>,
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

async fn stats(State(shared): State<Shared>, Query(f): Query<ServiceFilter>) -> Reply<Stats> {
    let d = shared.lock().await;
    let services = selected(&d, &f.service)?
        .into_iter()
        .map(|s| {
            let c = d.datapath.service_counter(s.id);
            ServiceStats {
                service: s.cfg.name.clone(),
                packets: c.packets,
                bytes: c.bytes,
                backends: s
                    .backends
                    .iter()
                    .map(|b| {
                        let c = d.datapath.backend_counter(b.id);
                        BackendStats {
                            address: b.cfg.address.to_string(),
                            packets: c.packets,
                            bytes: c.bytes,
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    let dropped = d
        .datapath
        .reason_counts()
        .into_iter()
        .map(|(r, n)| ReasonCount {
            reason: r.label().into(),
            packets: n,
        })
        .collect();
    let (entries, capacity) = d.conntrack.get();
    Ok(Json(Stats {
        services,
        dropped,
        conntrack: Conntrack { entries, capacity },
    }))
}

/// What the metrics endpoint reports, read under the daemon's lock.
pub fn metrics_snapshot(d: &Daemon) -> metrics::Snapshot {
    let services = d
        .services
        .iter()
        .map(|s| {
            let c = d.datapath.service_counter(s.id);
            metrics::ServiceMetrics {
                name: s.cfg.name.clone(),
                packets: c.packets,
                bytes: c.bytes,
                backends: s
                    .backends
                    .iter()
                    .map(|b| {
                        let c = d.datapath.backend_counter(b.id);
                        metrics::BackendMetrics {
                            address: b.cfg.address.to_string(),
                            packets: c.packets,
                            bytes: c.bytes,
                            up: b.state() == BackendState::Up,
                            weight: b.cfg.weight,
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    let (entries, capacity) = d.conntrack.get();
    metrics::Snapshot {
        services,
        conntrack_entries: entries,
        conntrack_capacity: capacity,
        dropped: d
            .datapath
            .reason_counts()
            .into_iter()
            .map(|(r, n)| (r.label().to_string(), n))
            .collect(),
        health_checks: d
            .health_counts
            .iter()
            .map(|((service, backend, result), count)| metrics::HealthCount {
                service: service.clone(),
                backend: backend.to_string(),
                result: result.label().into(),
                count: *count,
            })
            .collect(),
    }
}

// ---- services ----

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ServiceInfo {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub hash: HashMode,
    pub table_size: u32,
    pub check: CheckKind,
    pub backends: usize,
    pub up: usize,
}

async fn service_list(State(shared): State<Shared>) -> Json<Vec<ServiceInfo>> {
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
            })
            .collect(),
    )
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NewService {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default)]
    pub forwarding: Forwarding,
    #[serde(default)]
    pub hash: HashMode,
}

/// An answer to a change: what changed.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Changed {
    pub changes: Vec<String>,
}

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
    let (file, new, needed) = {
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
        let needed = d.hops_needed(&loaded.config);
        (file, loaded.config, needed)
    };
    let hops = crate::daemon::resolve_hops(needed).await;
    let changes = shared
        .lock()
        .await
        .reconcile(new, hops)
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
        E::ServiceExists(_) | E::BackendExists { .. } | E::Conflict(_) => conflict(e.to_string()),
        E::Invalid(_) | E::Parse(_) | E::Unsupported(_) => bad(e.to_string()),
        other => internal(other),
    }
}

async fn service_add(State(shared): State<Shared>, Json(n): Json<NewService>) -> Reply<Changed> {
    if let Some(problem) = config::name_problem(&n.name) {
        return Err(bad(format!("service name: {problem}")));
    }
    let service = config::Service {
        name: n.name,
        vip: n.vip,
        port: n.port,
        protocol: n.protocol,
        forwarding: n.forwarding,
        hash: n.hash,
        table_size: lb_common::DEFAULT_TABLE_SIZE,
        tunnel_source: None,
        health: config::Health {
            port: n.port,
            ..config::Health::default()
        },
        backends: vec![],
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

async fn service_remove(
    State(shared): State<Shared>,
    UrlPath(name): UrlPath<String>,
) -> Reply<Changed> {
    change(&shared, |d, f| {
        d.find_service(&name).map_err(not_found)?;
        f.remove_service(&name).map_err(edit_error)
    })
    .await
}

// ---- backends ----

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct BackendInfo {
    pub service: String,
    pub address: IpAddr,
    pub weight: u32,
    pub state: BackendState,
    /// Seconds in the current state.
    pub since_s: u64,
    pub check: CheckKind,
    pub last_check: Option<String>,
    pub last_check_ok: Option<bool>,
    /// Seconds since the last check.
    pub last_check_age_s: Option<u64>,
    pub mac: Option<String>,
    /// Why the backend cannot be reached (unresolved MAC), when it cannot.
    pub problem: Option<String>,
    pub packets: u64,
    pub bytes: u64,
}

fn age(t: SystemTime) -> u64 {
    SystemTime::now()
        .duration_since(t)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn backend_list(
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
                problem: b.hop_error.clone(),
                packets: c.packets,
                bytes: c.bytes,
            });
        }
    }
    Ok(Json(out))
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NewBackend {
    pub address: IpAddr,
    #[serde(default)]
    pub weight: Option<u32>,
}

fn parse_address(s: &str) -> Result<IpAddr, Refusal> {
    s.parse()
        .map_err(|_| bad(format!("{s:?} is not an IP address")))
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

async fn backend_add(
    State(shared): State<Shared>,
    UrlPath(name): UrlPath<String>,
    Json(n): Json<NewBackend>,
) -> Reply<Changed> {
    let weight = check_weight(n.weight.unwrap_or(config::DEFAULT_WEIGHT))?;
    let backend = config::Backend {
        address: n.address,
        weight,
        mac: None,
    };
    change(&shared, |d, f| {
        let s = d.find_service(&name).map_err(not_found)?;
        if s.backend(n.address).is_some() {
            return Err(conflict(format!(
                "service {name} already has backend {}",
                n.address
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

/// The service and backend named in a URL, or a 404 naming what is missing.
fn existing(d: &Daemon, name: &str, address: &str) -> Result<(IpAddr, u32), Refusal> {
    let address = parse_address(address)?;
    let s = d.find_service(name).map_err(not_found)?;
    let b = s.backend(address).ok_or_else(|| {
        not_found(format!(
            "service {name} has no backend {address} (see `lbctl backend list {name}`)"
        ))
    })?;
    Ok((address, b.cfg.weight))
}

async fn backend_remove(
    State(shared): State<Shared>,
    UrlPath((name, address)): UrlPath<(String, String)>,
) -> Reply<Changed> {
    change(&shared, |d, f| {
        let (address, _) = existing(d, &name, &address)?;
        f.remove_backend(&name, address).map_err(edit_error)
    })
    .await
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Removal {
    pub service: String,
    pub address: IpAddr,
    pub table_size: u32,
    /// Slots (clients) that would change backend.
    pub moved_slots: u64,
    /// Share of all clients that would move.
    pub moved_share: f64,
    /// Share of all clients now on this backend (they all move).
    pub own_share: f64,
    /// Share of the other backends' clients that would move too.
    pub others_moved_share: f64,
}

async fn backend_remove_dry_run(
    State(shared): State<Shared>,
    UrlPath((name, address)): UrlPath<(String, String)>,
) -> Reply<Removal> {
    let d = shared.lock().await;
    let (address, _) = existing(&d, &name, &address)?;
    let s = d.find_service(&name).map_err(not_found)?;
    let id = s.backend(address).map(|b| b.id).unwrap_or(NO_BACKEND);
    let after = s.table_without(&d.seed, Some(address));
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
        address,
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

async fn backend_drain(
    State(shared): State<Shared>,
    UrlPath((name, address)): UrlPath<(String, String)>,
) -> Reply<Changed> {
    let mut remembered = None;
    let result = change(&shared, |d, f| {
        let (address, weight) = existing(d, &name, &address)?;
        if weight == 0 {
            return Err(conflict(format!(
                "backend {address} of {name} is already drained"
            )));
        }
        d.remember_drain(&name, address, weight);
        remembered = Some(address);
        f.set_weight(&name, address, 0).map_err(edit_error)
    })
    .await;
    if let (Err(_), Some(address)) = (&result, remembered) {
        shared.lock().await.forget_drain(&name, address);
    }
    result
}

async fn backend_undrain(
    State(shared): State<Shared>,
    UrlPath((name, address)): UrlPath<(String, String)>,
) -> Reply<Changed> {
    let mut undrained = None;
    let result = change(&shared, |d, f| {
        let (address, weight) = existing(d, &name, &address)?;
        if weight != 0 {
            return Err(conflict(format!(
                "backend {address} of {name} is not drained (weight {weight})"
            )));
        }
        let before = d
            .weight_before_drain(&name, address)
            .unwrap_or(config::DEFAULT_WEIGHT);
        undrained = Some(address);
        f.set_weight(&name, address, before).map_err(edit_error)
    })
    .await;
    if let (Ok(_), Some(address)) = (&result, undrained) {
        shared.lock().await.forget_drain(&name, address);
    }
    result
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NewWeight {
    pub weight: u32,
}

async fn backend_weight(
    State(shared): State<Shared>,
    UrlPath((name, address)): UrlPath<(String, String)>,
    Json(w): Json<NewWeight>,
) -> Reply<Changed> {
    let weight = check_weight(w.weight)?;
    change(&shared, |d, f| {
        let (address, _) = existing(d, &name, &address)?;
        if weight == 0 {
            return Err(bad(
                "weight 0 drains a backend: use `lbctl backend drain` (undrain restores the weight)"
                    .into(),
            ));
        }
        d.forget_drain(&name, address);
        f.set_weight(&name, address, weight).map_err(edit_error)
    })
    .await
}

// ---- lookup ----

#[derive(Deserialize)]
struct LookupQuery {
    service: String,
    client: String,
    port: Option<u16>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Lookup {
    pub service: String,
    pub client: IpAddr,
    pub client_port: Option<u16>,
    /// The backend chosen, or None when the service has no usable backend.
    pub backend: Option<IpAddr>,
    /// "connection-table" when an established flow decides, else "hash".
    pub reason: String,
    pub hash: u32,
    pub slot: u32,
    pub table_size: u32,
}

async fn lookup(State(shared): State<Shared>, Query(q): Query<LookupQuery>) -> Reply<Lookup> {
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
    let (flags, port) = match (s.cfg.hash, q.port) {
        (HashMode::Source, port) => (0, port.unwrap_or(0)),
        (HashMode::FiveTuple, Some(p)) => (service_flags::HASH_5TUPLE, p),
        (HashMode::FiveTuple, None) => {
            return Err(bad(format!(
                "service {} hashes the 5-tuple: give the client's port with --port",
                s.cfg.name
            )));
        }
    };
    let value = ServiceValue {
        flags,
        table_size: s.cfg.table_size,
        ..Default::default()
    };
    let Slot {
        hash: h,
        index: slot,
    } = maglev_slot(&d.seed, &value, &flow(port))
        .ok_or_else(|| bad(format!("service {} has no Maglev table", s.cfg.name)))?;
    let by_id = |id: u32| s.backends.iter().find(|b| b.id == id);
    // An established flow keeps its backend while that backend is usable: as the data path.
    if let Some(port) = q.port
        && let Some(entry) = d.datapath.flow(&flow(port))
        && entry.service == s.id
        && let Some(b) = by_id(entry.backend)
        && b.hop.is_some()
        && b.healthy
    {
        return Ok(Json(Lookup {
            service: s.cfg.name.clone(),
            client,
            client_port: q.port,
            backend: Some(b.cfg.address),
            reason: "connection-table".into(),
            hash: h,
            slot,
            table_size: s.cfg.table_size,
        }));
    }
    let backend = s
        .table
        .get(slot as usize)
        .and_then(|&id| by_id(id))
        .map(|b| b.cfg.address);
    Ok(Json(Lookup {
        service: s.cfg.name.clone(),
        client,
        client_port: q.port,
        backend,
        reason: "hash".into(),
        hash: h,
        slot,
        table_size: s.cfg.table_size,
    }))
}
