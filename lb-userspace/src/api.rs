//! The control API: HTTP/JSON on a unix socket (mode 0600, owner root), versioned under `/v1`.

use std::{future::Future, os::unix::fs::PermissionsExt, path::Path};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde::Serialize;
use tokio::net::UnixListener;

use crate::{daemon::Shared, datapath::Attachment};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// Binds the control socket. Called only once lbd is ready: a stale socket left by a killed lbd
/// is replaced here, not earlier, so a script waiting for the socket waits for readiness.
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let shown = path.display().to_string();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ApiError::Io {
            what: "creating the socket's folder",
            path: dir.display().to_string(),
            source,
        })?;
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ApiError::Io {
            what: "setting the mode of",
            path: shown,
            source,
        }
    })?;
    Ok(listener)
}

pub async fn serve(
    listener: UnixListener,
    shared: Shared,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/stats", get(stats))
        .with_state(shared);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct Status {
    pub pid: u32,
    pub version: String,
    pub config: String,
    pub uptime_s: u64,
    pub program_id: u32,
    pub layout_version: u32,
    pub bpffs_dir: String,
    pub interfaces: Vec<InterfaceStatus>,
    pub services: usize,
    pub backends: usize,
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    pub mode: String,
    pub link_id: u32,
}

impl From<&Attachment> for InterfaceStatus {
    fn from(a: &Attachment) -> Self {
        InterfaceStatus {
            name: a.interface.clone(),
            ifindex: a.ifindex,
            mode: a.mode.clone(),
            link_id: a.link_id,
        }
    }
}

async fn status(State(shared): State<Shared>) -> Json<Status> {
    let d = shared.lock().await;
    Json(Status {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
        config: d.config_path.display().to_string(),
        uptime_s: d.started.elapsed().as_secs(),
        program_id: d.datapath.program_id(),
        layout_version: lb_common::LAYOUT_VERSION,
        bpffs_dir: d.config.daemon.bpffs_dir.display().to_string(),
        interfaces: d
            .datapath
            .attachments
            .iter()
            .map(InterfaceStatus::from)
            .collect(),
        services: d.services.len(),
        backends: d.services.iter().map(|s| s.backends.len()).sum(),
    })
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct Stats {
    pub services: Vec<ServiceStats>,
    pub dropped: Vec<ReasonCount>,
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct ServiceStats {
    pub service: String,
    pub packets: u64,
    pub bytes: u64,
    pub backends: Vec<BackendStats>,
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct BackendStats {
    pub address: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct ReasonCount {
    pub reason: String,
    pub packets: u64,
}

async fn stats(State(shared): State<Shared>) -> Result<Json<Stats>, (StatusCode, String)> {
    let d = shared.lock().await;
    let services = d
        .services
        .iter()
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
    Ok(Json(Stats { services, dropped }))
}
