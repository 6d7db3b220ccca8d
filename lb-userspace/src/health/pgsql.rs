//! The `pgsql` check.
//!
//! Without `role`: a startup message (protocol 3.0, `user`, `database`), healthy when the
//! server answers with an authentication request (or AuthenticationOk, under `trust`): it is
//! up and accepting connections. An ErrorResponse ("the database system is starting up", "sorry,
//! too many clients already", "no pg_hba.conf entry…") is down, with its message.
//!
//! With `role`: logs in (tokio-postgres: SCRAM-SHA-256, MD5 or cleartext, as the server asks;
//! no TLS), runs `SELECT pg_is_in_recovery()` and is healthy when the answer matches the role.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::SslMode;

use super::check::{Failed, describe, io_failure, read_secret};
use crate::config::{Health, Role};

/// The `application_name` lbd gives (seen in pg_stat_activity and the server's log).
const APPLICATION: &str = "lbd-health-check";
/// The largest message read from the server before login.
const MAX_MESSAGE: usize = 64 * 1024;

pub(super) async fn pgsql_check(addr: SocketAddr, spec: &Health) -> Result<String, Failed> {
    match spec.role {
        None => startup_check(addr, spec).await,
        Some(role) => role_check(addr, spec, role).await,
    }
}

/// The StartupMessage of protocol 3.0.
pub(super) fn startup_message(user: &str, database: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    body.extend_from_slice(&196_608u32.to_be_bytes());
    for (k, v) in [
        ("user", user),
        ("database", database),
        ("application_name", APPLICATION),
    ] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

/// The fields of an ErrorResponse or NoticeResponse body: the message ('M'), else the whole.
pub(super) fn error_message(body: &[u8]) -> String {
    let mut message = None;
    for field in body.split(|&b| b == 0) {
        if let Some((&b'M', text)) = field.split_first() {
            message = Some(String::from_utf8_lossy(text).into_owned());
        }
    }
    message.unwrap_or_else(|| "error response without a message".into())
}

async fn startup_check(addr: SocketAddr, spec: &Health) -> Result<String, Failed> {
    let mut stream = TcpStream::connect(addr).await.map_err(io_failure)?;
    stream
        .write_all(&startup_message(&spec.user, &spec.database))
        .await
        .map_err(io_failure)?;
    loop {
        let mut head = [0u8; 5];
        match stream.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(Failed::backend(
                    "pgsql: connection closed without an answer",
                ));
            }
            Err(e) => return Err(io_failure(e)),
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if !(4..=MAX_MESSAGE).contains(&len) {
            return Err(Failed::backend("pgsql: malformed answer (not PostgreSQL?)"));
        }
        let mut body = vec![0u8; len - 4];
        stream.read_exact(&mut body).await.map_err(io_failure)?;
        match head[0] {
            b'R' => {
                if body.len() >= 4 && body[..4] == [0, 0, 0, 0] {
                    // AuthenticationOk (trust): say goodbye properly.
                    let _ = stream.write_all(b"X\0\0\0\x04").await;
                }
                return Ok("pgsql: accepting connections".into());
            }
            b'E' => return Err(Failed::backend(format!("pgsql: {}", error_message(&body)))),
            // NoticeResponse, NegotiateProtocolVersion: read on.
            b'N' | b'v' => continue,
            other => {
                return Err(Failed::backend(format!(
                    "pgsql: unexpected answer {:?} (not PostgreSQL?)",
                    char::from(other)
                )));
            }
        }
    }
}

fn pg_failure(e: tokio_postgres::Error) -> Failed {
    if let Some(db) = e.as_db_error() {
        return Failed::backend(format!("pgsql: {}", db.message()));
    }
    let io = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>());
    match io {
        Some(io) => Failed::backend(format!(
            "pgsql: {e}: {}",
            describe(std::io::Error::new(io.kind(), io.to_string()))
        )),
        None => Failed::backend(format!("pgsql: {e}")),
    }
}

async fn role_check(addr: SocketAddr, spec: &Health, role: Role) -> Result<String, Failed> {
    let password = match &spec.password_file {
        Some(path) => read_secret(path).await?,
        None => return Err(Failed::lbd("a pgsql check with a role needs password_file")),
    };
    let mut config = tokio_postgres::Config::new();
    config
        .user(&spec.user)
        .dbname(&spec.database)
        .password(password)
        .application_name(APPLICATION)
        .ssl_mode(SslMode::Disable);
    let tcp = TcpStream::connect(addr).await.map_err(io_failure)?;
    let (client, connection) = config
        .connect_raw(tcp, tokio_postgres::NoTls)
        .await
        .map_err(pg_failure)?;
    let mut connection = std::pin::pin!(connection);
    let row = tokio::select! {
        row = client.query_one("SELECT pg_is_in_recovery()", &[]) => row.map_err(pg_failure)?,
        end = &mut connection => {
            return Err(match end {
                Err(e) => pg_failure(e),
                Ok(()) => Failed::backend("pgsql: connection closed by the server"),
            });
        }
    };
    let in_recovery: bool = row.try_get(0).map_err(pg_failure)?;
    // Closing the client makes the connection send Terminate and end.
    drop(client);
    let _ = connection.await;
    let is = if in_recovery { "replica" } else { "primary" };
    if is == role.name() {
        Ok(format!("pgsql: {is}"))
    } else {
        Err(Failed::backend(format!(
            "role {role} expected, server is a {is}"
        )))
    }
}
