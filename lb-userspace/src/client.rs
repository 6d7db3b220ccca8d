//! lbctl's side of the control API: HTTP/1.1 over the unix socket.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "lbd is not running: no control socket at {0} (start lbd, or pass --socket / LB_SOCKET)"
    )]
    NotRunning(PathBuf),
    #[error("permission denied on {0}: the control socket is root's (run lbctl as root)")]
    PermissionDenied(PathBuf),
    #[error("talking to lbd at {path}: {message}")]
    Transport { path: PathBuf, message: String },
    /// lbd refused the request; the message is lbd's own.
    #[error("{0}")]
    Refused(String),
}

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Client {
            socket: socket.to_owned(),
        }
    }

    async fn connect(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.socket)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    ClientError::NotRunning(self.socket.clone())
                }
                std::io::ErrorKind::PermissionDenied => {
                    ClientError::PermissionDenied(self.socket.clone())
                }
                _ => self.transport(e),
            })
    }

    fn transport(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Transport {
            path: self.socket.clone(),
            message: e.to_string(),
        }
    }

    /// Sends one request with a JSON `body` over a connection of its own; the answer's head.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: String,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.transport(e))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "lbd")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| self.transport(e))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| self.transport(e))
    }

    /// Sends one request and decodes the JSON answer; a non-2xx answer becomes
    /// `ClientError::Refused` with lbd's `error` message.
    pub async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, ClientError> {
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let resp = self.send(method, path, bytes).await?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.transport(e))?
            .to_bytes();
        if !status.is_success() {
            return Err(ClientError::Refused(refusal(status, &body)));
        }
        serde_json::from_slice(&body)
            .map_err(|e| self.transport(format!("undecodable answer: {e}")))
    }

    /// Posts `body` to `path` and hands each line of the streamed answer to `line` as it comes;
    /// a non-2xx answer becomes `ClientError::Refused`.
    pub async fn post_lines(
        &self,
        path: &str,
        body: serde_json::Value,
        started: impl FnOnce(),
        mut line: impl FnMut(&str) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let resp = self.send(Method::POST, path, body.to_string()).await?;
        let status = resp.status();
        if status.is_success() {
            started();
        }
        let mut body = resp.into_body();
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.transport(e))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(data);
            if !status.is_success() {
                continue;
            }
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let text = String::from_utf8_lossy(&pending[..end]).into_owned();
                pending.drain(..=end);
                line(&text)?;
            }
        }
        if !status.is_success() {
            return Err(ClientError::Refused(refusal(status, &pending)));
        }
        Ok(())
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.request(Method::GET, path, None).await
    }
}

/// lbd's `error` message of a refusal, or the status and body when there is none.
fn refusal(status: hyper::StatusCode, body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| format!("lbd answered {status}: {}", String::from_utf8_lossy(body)))
}
