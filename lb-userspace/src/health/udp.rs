//! The `udp` and `dns` checks: one datagram out, one reply back, on a connected UDP socket (so
//! an ICMP port unreachable arrives as ECONNREFUSED: "port unreachable").

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr as _;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use tokio::net::UdpSocket;

use super::check::{Failed, io_failure};
use crate::config::{Health, to_hex};

/// The largest reply read (a DNS message over UDP with EDNS fits; the rest is cut).
const MAX_REPLY: usize = 65_535;

/// A UDP socket of the backend's family, connected to it.
async fn connected(addr: SocketAddr) -> Result<UdpSocket, Failed> {
    let local: SocketAddr = match addr.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(io_failure)?;
    socket.connect(addr).await.map_err(io_failure)?;
    Ok(socket)
}

/// A UDP socket error: ECONNREFUSED on a connected socket is an ICMP port unreachable.
fn udp_failure(e: io::Error) -> Failed {
    if e.kind() == io::ErrorKind::ConnectionRefused {
        Failed::backend("port unreachable")
    } else {
        io_failure(e)
    }
}

pub(super) async fn udp_check(addr: SocketAddr, spec: &Health) -> Result<String, Failed> {
    let socket = connected(addr).await?;
    socket.send(spec.send.bytes()).await.map_err(udp_failure)?;
    let mut buf = vec![0u8; MAX_REPLY];
    let n = socket.recv(&mut buf).await.map_err(udp_failure)?;
    let reply = &buf[..n];
    match &spec.expect_hex {
        Some(prefix) if !reply.starts_with(prefix) => Err(Failed::backend(format!(
            "UDP reply {} does not start with {}",
            preview(reply),
            to_hex(prefix)
        ))),
        _ => Ok(format!("UDP reply, {n} bytes")),
    }
}

/// The first bytes of a reply in hex ("" for an empty one).
fn preview(reply: &[u8]) -> String {
    if reply.is_empty() {
        return "(empty)".into();
    }
    let shown = &reply[..reply.len().min(16)];
    let more = if reply.len() > shown.len() { "…" } else { "" };
    format!("{}{more}", to_hex(shown))
}

/// The query of a `dns` check, with message id `id`.
pub(super) fn dns_query(spec: &Health, id: u16) -> Result<Vec<u8>, Failed> {
    let mut name = Name::from_ascii(&spec.query_name)
        .map_err(|e| Failed::lbd(format!("query_name {:?}: {e}", spec.query_name)))?;
    name.set_fqdn(true);
    let rtype = RecordType::from_str(&spec.query_type)
        .map_err(|e| Failed::lbd(format!("query_type {:?}: {e}", spec.query_type)))?;
    let mut msg = Message::new();
    msg.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(name, rtype));
    msg.to_vec()
        .map_err(|e| Failed::lbd(format!("encoding the DNS query: {e}")))
}

/// The name of a DNS response code, as dig prints it.
pub(super) fn rcode_name(code: u16) -> String {
    let name = match code {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        16 => "BADVERS",
        other => return format!("RCODE{other}"),
    };
    name.into()
}

/// What a reply to query `id` says: `Some(Ok(detail))` healthy, `Some(Err)` not, `None` not a
/// reply to this query (another id, or not a response): ignored.
pub(super) fn dns_answer(reply: &[u8], id: u16) -> Option<Result<String, Failed>> {
    if reply.len() < 12 || u16::from_be_bytes([reply[0], reply[1]]) != id {
        return None;
    }
    let msg = match Message::from_vec(reply) {
        Ok(m) => m,
        Err(_) => return Some(Err(Failed::backend("malformed DNS reply"))),
    };
    if msg.message_type() != MessageType::Response {
        return None;
    }
    let rcode = rcode_name(u16::from(msg.response_code()));
    let detail = format!("DNS {rcode}");
    Some(if rcode == "NOERROR" {
        Ok(detail)
    } else {
        Err(Failed::backend(detail))
    })
}

pub(super) async fn dns_check(addr: SocketAddr, spec: &Health) -> Result<String, Failed> {
    let id: u16 = rand::random();
    let query = dns_query(spec, id)?;
    let socket = connected(addr).await?;
    socket.send(&query).await.map_err(udp_failure)?;
    let mut buf = vec![0u8; MAX_REPLY];
    loop {
        let n = socket.recv(&mut buf).await.map_err(udp_failure)?;
        if let Some(answer) = dns_answer(&buf[..n], id) {
            return answer;
        }
    }
}
