//! The control socket: binding it (never over a socket another process answers on), accepting
//! root peers only (others get a hand-written HTTP 403 that says why) and serving the API's
//! router on it.

use std::{future::Future, os::unix::fs::PermissionsExt, path::Path};

use tokio::{
    io::AsyncWriteExt,
    net::{UnixListener, UnixStream},
};

use axum::{
    Router,
    routing::{get, post, put},
};

use super::{edits::*, handlers::*};
use crate::daemon::Shared;
pub use crate::lock::socket_answers;

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

/// Serves the API on `listener` (root peers only, within `limits::CONTROL`) until `shutdown`
/// completes.
pub async fn serve(
    listener: UnixListener,
    shared: Shared,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        crate::limits::Bounded::new(RootOnly::new(listener), crate::limits::CONTROL),
        router(shared),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// Every route of the API, on the daemon `shared`.
pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/stats", get(stats))
        .route("/v1/services", get(service_list).post(service_add))
        .route("/v1/services/{name}", axum::routing::delete(service_remove))
        .route("/v1/services/{name}/allow", post(service_allow))
        .route("/v1/services/{name}/deny", post(service_deny))
        .route("/v1/services/{name}/unlist", post(service_unlist))
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
        .route("/v1/node", get(node))
        .route("/v1/trace", post(super::trace::trace))
        .route("/v1/node/drain", post(node_drain))
        .route("/v1/node/undrain", post(node_undrain))
        .with_state(shared)
}
