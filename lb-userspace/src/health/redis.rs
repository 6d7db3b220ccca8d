//! The `redis` check, in RESP by hand: `AUTH` (with `password_file`), `PING` (healthy on
//! `+PONG`), and with `role` also `ROLE`, whose first element must match ("slave" is Redis's
//! word for a replica). The commands are sent in one write and the replies read in order.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::check::{Failed, io_failure, read_secret};
use crate::config::{Health, Role};

/// The most bytes of replies read.
const MAX_REPLIES: usize = 64 * 1024;

/// One RESP reply (only what the check looks at is kept).
#[derive(Debug, PartialEq)]
pub(super) enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// A command as a RESP array of bulk strings.
pub(super) fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Parses one reply at the start of `buf`: `Ok(Some((reply, used)))`, `Ok(None)` when more
/// bytes are needed, `Err` when it is not RESP.
pub(super) fn parse(buf: &[u8], depth: usize) -> Result<Option<(Reply, usize)>, ()> {
    if depth > 8 {
        return Err(());
    }
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    if end == 0 {
        return Err(());
    }
    let kind = buf[0];
    let line = std::str::from_utf8(&buf[1..end]).map_err(|_| ())?;
    let after = end + 2;
    match kind {
        b'+' => Ok(Some((Reply::Simple(line.into()), after))),
        b'-' => Ok(Some((Reply::Error(line.into()), after))),
        b':' => Ok(Some((Reply::Integer(line.parse().map_err(|_| ())?), after))),
        b'$' => {
            let n: i64 = line.parse().map_err(|_| ())?;
            if n < 0 {
                return Ok(Some((Reply::Bulk(None), after)));
            }
            let n = n as usize;
            if n > MAX_REPLIES {
                return Err(());
            }
            if buf.len() < after + n + 2 {
                return Ok(None);
            }
            Ok(Some((
                Reply::Bulk(Some(buf[after..after + n].to_vec())),
                after + n + 2,
            )))
        }
        b'*' => {
            let n: i64 = line.parse().map_err(|_| ())?;
            if n < 0 {
                return Ok(Some((Reply::Array(None), after)));
            }
            let mut items = vec![];
            let mut at = after;
            for _ in 0..n {
                match parse(&buf[at..], depth + 1)? {
                    Some((item, used)) => {
                        items.push(item);
                        at += used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(Some(items)), at)))
        }
        _ => Err(()),
    }
}

/// The role a `ROLE` reply names: "master", "replica" (Redis says "slave") or what it says.
pub(super) fn role_of(reply: &Reply) -> Option<String> {
    let Reply::Array(Some(items)) = reply else {
        return None;
    };
    let first = match items.first()? {
        Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
        Reply::Simple(s) => s.clone(),
        _ => return None,
    };
    Some(if first == "slave" {
        "replica".into()
    } else {
        first
    })
}

pub(super) async fn redis_check(addr: SocketAddr, spec: &Health) -> Result<String, Failed> {
    let password = match &spec.password_file {
        Some(path) => Some(read_secret(path).await?),
        None => None,
    };
    let mut out = vec![];
    if let Some(p) = &password {
        out.extend(command(&[b"AUTH", p.as_bytes()]));
    }
    out.extend(command(&[b"PING"]));
    if spec.role.is_some() {
        out.extend(command(&[b"ROLE"]));
    }
    let expected = 1 + usize::from(password.is_some()) + usize::from(spec.role.is_some());
    let mut stream = TcpStream::connect(addr).await.map_err(io_failure)?;
    stream.write_all(&out).await.map_err(io_failure)?;

    let mut buf = Vec::with_capacity(512);
    let mut replies = vec![];
    let mut at = 0;
    let mut chunk = [0u8; 4096];
    while replies.len() < expected {
        match parse(&buf[at..], 0) {
            Err(()) => return Err(Failed::backend("redis: malformed reply (not Redis?)")),
            Ok(Some((reply, used))) => {
                at += used;
                // An error ends the exchange: the later replies only repeat it.
                if let Reply::Error(e) = &reply {
                    return Err(Failed::backend(format!("redis: {e}")));
                }
                replies.push(reply);
                continue;
            }
            Ok(None) => {}
        }
        if buf.len() >= MAX_REPLIES {
            return Err(Failed::backend("redis: reply too long"));
        }
        let n = stream.read(&mut chunk).await.map_err(io_failure)?;
        if n == 0 {
            return Err(Failed::backend("redis: connection closed before the reply"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let mut replies = replies.into_iter().skip(usize::from(password.is_some()));
    match replies.next() {
        Some(Reply::Simple(s)) if s == "PONG" => {}
        other => {
            return Err(Failed::backend(format!(
                "redis: unexpected reply to PING: {other:?}"
            )));
        }
    }
    let Some(want) = spec.role else {
        return Ok("redis PONG".into());
    };
    let is = replies
        .next()
        .as_ref()
        .and_then(role_of)
        .ok_or_else(|| Failed::backend("redis: malformed reply to ROLE"))?;
    let want = match want {
        Role::Primary | Role::Master => "master",
        Role::Replica => "replica",
    };
    if is == want {
        Ok(format!("redis {is}"))
    } else {
        Err(Failed::backend(format!(
            "role {want} expected, server is a {is}"
        )))
    }
}
