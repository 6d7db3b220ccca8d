//! The datagrams lb nodes exchange (`[daemon.sync]`): their format, sealing and opening.
//!
//! ```text
//! header (authenticated, not encrypted; 32 bytes + name):
//!   magic "LBSY" | version u8 | kind u8 | name length u8 | 0u8
//!   seed tag u64      (a keyed hash of a constant under the sender's hash seed: equal seeds,
//!                      equal tags; the seed itself never leaves the node)
//!   sent at u64       (the sender's clock, ms since the Unix epoch: stale datagrams refused)
//!   sequence u64      (per sender, from a random start)
//!   node name         (UTF-8, at most 64 bytes)
//! nonce (24 bytes, random) | XChaCha20-Poly1305 of the body (+ 16-byte tag)
//! ```
//!
//! Bodies: `Hello` (every second): the node's drained flag and each service's table
//! fingerprint. `Flows`: flows the sender recorded, each in terms both nodes share (addresses
//! and ports, never lbd's ids):
//!
//! ```text
//! flags u8 (CLOSING 1, IPV6 2, BACKEND_IPV6 4, EVERY_PORT 8, BACKEND_PORT 16) | proto u8
//! sport u16 | dport u16
//! client address | VIP address (4 or 16 bytes each, by IPV6) | backend address (by BACKEND_IPV6)
//! backend port u16 (only with BACKEND_PORT)
//! ```
//! An IPv4 flow takes 18 bytes, an IPv6 one 54. BACKEND_PORT (2 bytes more) is set only for a
//! backend whose address its service has more than once (one host serving a `nat` service on
//! several ports): every other flow is encoded as version 1 always encoded it, so nodes of
//! earlier versions (which refuse such configs) and of this one understand each other.

use std::net::IpAddr;

pub use crate::datapath::PeerFlow as SyncedFlow;

use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, KeyInit, Payload},
};

/// Bytes of the header before the node name.
const FIXED_HEADER: usize = 32;
const MAGIC: &[u8; 4] = b"LBSY";
const VERSION: u8 = 1;
const NONCE: usize = 24;
const TAG: usize = 16;
/// Longest node name carried.
pub const MAX_NAME: usize = 64;
/// Largest datagram a node sends: with its IP and UDP headers it fits the smallest IPv6 MTU
/// (1,280 bytes), so no path fragments it.
pub const MAX_DATAGRAM: usize = 1200;

/// Why a datagram was refused (the label of `lb_sync_rejected_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("malformed")]
    Malformed,
    #[error("authentication failed (another key?)")]
    Authentication,
    #[error("sent with another hash seed")]
    OtherSeed,
    #[error("too old or from the future (clocks more than 30 s apart?)")]
    Stale,
    #[error("from an address that is no configured peer")]
    UnknownPeer,
    #[error("replayed")]
    Replayed,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Refused::Malformed => "malformed",
            Refused::Authentication => "authentication",
            Refused::OtherSeed => "other_seed",
            Refused::Stale => "stale",
            Refused::UnknownPeer => "unknown_peer",
            Refused::Replayed => "replayed",
        }
    }

    pub const ALL: [Refused; 6] = [
        Refused::Malformed,
        Refused::Authentication,
        Refused::OtherSeed,
        Refused::Stale,
        Refused::UnknownPeer,
        Refused::Replayed,
    ];
}

/// A service's table fingerprint, as a hello carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub service: String,
    pub fingerprint: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Hello {
        drained: bool,
        fingerprints: Vec<Fingerprint>,
    },
    Flows(Vec<SyncedFlow>),
}

/// A datagram, opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub seed_tag: u64,
    pub sent_at_ms: u64,
    pub sequence: u64,
    pub node: String,
    pub body: Body,
}

const KIND_HELLO: u8 = 1;
const KIND_FLOWS: u8 = 2;

mod flow_flags {
    pub const CLOSING: u8 = 1;
    pub const IPV6: u8 = 2;
    pub const BACKEND_IPV6: u8 = 4;
    pub const EVERY_PORT: u8 = 8;
    pub const BACKEND_PORT: u8 = 16;
}

/// The bytes a flow takes in a datagram.
pub fn flow_len(f: &SyncedFlow) -> usize {
    6 + 2 * addr_len(&f.client) + addr_len(&f.backend) + 2 * f.backend_port.is_some() as usize
}

/// The bytes of a `Flows` datagram's header, nonce, count and tag (its flows aside), for a
/// sender named `node`.
pub fn overhead(node: &str) -> usize {
    FIXED_HEADER + node.len().min(MAX_NAME) + NONCE + 2 + TAG
}

fn addr_len(a: &IpAddr) -> usize {
    match a {
        IpAddr::V4(_) => 4,
        IpAddr::V6(_) => 16,
    }
}

fn put_addr(out: &mut Vec<u8>, a: &IpAddr) {
    match a {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

/// A cursor over received bytes: every read checks the length.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Refused> {
        if self.0.len() < n {
            return Err(Refused::Malformed);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Refused> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Refused> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, Refused> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn addr(&mut self, v6: bool) -> Result<IpAddr, Refused> {
        Ok(if v6 {
            let b: [u8; 16] = self.take(16)?.try_into().unwrap();
            IpAddr::from(b)
        } else {
            let b: [u8; 4] = self.take(4)?.try_into().unwrap();
            IpAddr::from(b)
        })
    }
}

/// Seals `message` under `key` into one datagram.
pub fn seal(key: &[u8; 32], message: &Message) -> Vec<u8> {
    let name = &message.node.as_bytes()[..message.node.len().min(MAX_NAME)];
    let (kind, body) = match &message.body {
        Body::Hello {
            drained,
            fingerprints,
        } => {
            let mut b = vec![u8::from(*drained)];
            b.extend_from_slice(&(fingerprints.len() as u16).to_be_bytes());
            for f in fingerprints {
                let n = &f.service.as_bytes()[..f.service.len().min(255)];
                b.push(n.len() as u8);
                b.extend_from_slice(n);
                b.extend_from_slice(&f.fingerprint.to_be_bytes());
            }
            (KIND_HELLO, b)
        }
        Body::Flows(flows) => {
            let mut b = Vec::with_capacity(2 + flows.iter().map(flow_len).sum::<usize>());
            b.extend_from_slice(&(flows.len() as u16).to_be_bytes());
            for f in flows {
                let mut flags = 0;
                if f.closing {
                    flags |= flow_flags::CLOSING;
                }
                if f.client.is_ipv6() {
                    flags |= flow_flags::IPV6;
                }
                if f.backend.is_ipv6() {
                    flags |= flow_flags::BACKEND_IPV6;
                }
                if f.every_port {
                    flags |= flow_flags::EVERY_PORT;
                }
                if f.backend_port.is_some() {
                    flags |= flow_flags::BACKEND_PORT;
                }
                b.extend_from_slice(&[flags, f.proto]);
                b.extend_from_slice(&f.sport.to_be_bytes());
                b.extend_from_slice(&f.dport.to_be_bytes());
                put_addr(&mut b, &f.client);
                put_addr(&mut b, &f.vip);
                put_addr(&mut b, &f.backend);
                if let Some(port) = f.backend_port {
                    b.extend_from_slice(&port.to_be_bytes());
                }
            }
            (KIND_FLOWS, b)
        }
    };
    let mut out = Vec::with_capacity(FIXED_HEADER + name.len() + NONCE + body.len() + TAG);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, kind, name.len() as u8, 0]);
    out.extend_from_slice(&message.seed_tag.to_be_bytes());
    out.extend_from_slice(&message.sent_at_ms.to_be_bytes());
    out.extend_from_slice(&message.sequence.to_be_bytes());
    out.extend_from_slice(name);
    let header_len = out.len();
    let nonce: [u8; NONCE] = rand::random();
    let sealed = XChaCha20Poly1305::new(key.into())
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &body,
                aad: &out[..header_len],
            },
        )
        .expect("XChaCha20-Poly1305 seals any body shorter than 256 GiB");
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// Opens a datagram sealed under `key`: its message, or why it is refused. Nothing in it is
/// trusted before the tag checks out.
pub fn open(key: &[u8; 32], datagram: &[u8]) -> Result<Message, Refused> {
    let mut r = Reader(datagram);
    if r.take(4)? != MAGIC || r.u8()? != VERSION {
        return Err(Refused::Malformed);
    }
    let kind = r.u8()?;
    let name_len = r.u8()? as usize;
    r.u8()?;
    let seed_tag = r.u64()?;
    let sent_at_ms = r.u64()?;
    let sequence = r.u64()?;
    if name_len > MAX_NAME {
        return Err(Refused::Malformed);
    }
    let name = r.take(name_len)?;
    let header_len = FIXED_HEADER + name_len;
    let nonce = r.take(NONCE)?;
    if r.0.len() < TAG {
        return Err(Refused::Malformed);
    }
    let body = XChaCha20Poly1305::new(key.into())
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: r.0,
                aad: &datagram[..header_len],
            },
        )
        .map_err(|_| Refused::Authentication)?;
    let node = String::from_utf8(name.to_vec()).map_err(|_| Refused::Malformed)?;
    let mut b = Reader(&body);
    let body = match kind {
        KIND_HELLO => {
            let drained = b.u8()? != 0;
            let n = b.u16()?;
            let mut fingerprints = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let len = b.u8()? as usize;
                let service =
                    String::from_utf8(b.take(len)?.to_vec()).map_err(|_| Refused::Malformed)?;
                fingerprints.push(Fingerprint {
                    service,
                    fingerprint: b.u64()?,
                });
            }
            Body::Hello {
                drained,
                fingerprints,
            }
        }
        KIND_FLOWS => {
            let n = b.u16()?;
            let mut flows = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let flags = b.u8()?;
                let proto = b.u8()?;
                let sport = b.u16()?;
                let dport = b.u16()?;
                let v6 = flags & flow_flags::IPV6 != 0;
                let client = b.addr(v6)?;
                let vip = b.addr(v6)?;
                let backend = b.addr(flags & flow_flags::BACKEND_IPV6 != 0)?;
                let backend_port = if flags & flow_flags::BACKEND_PORT != 0 {
                    Some(b.u16()?)
                } else {
                    None
                };
                flows.push(SyncedFlow {
                    client,
                    vip,
                    proto,
                    sport,
                    dport,
                    every_port: flags & flow_flags::EVERY_PORT != 0,
                    backend,
                    backend_port,
                    closing: flags & flow_flags::CLOSING != 0,
                });
            }
            Body::Flows(flows)
        }
        _ => return Err(Refused::Malformed),
    };
    if !b.0.is_empty() {
        return Err(Refused::Malformed);
    }
    Ok(Message {
        seed_tag,
        sent_at_ms,
        sequence,
        node,
        body,
    })
}

/// The tag of a hash seed that nodes compare: SipHash-1-3 of a fixed word under the seed.
pub fn seed_tag(seed: &[u64; 2]) -> u64 {
    lb_common::hash::siphash13(seed, &[0x6c62_2d73_796e_6331])
}

/// Parses a sync key file's text: 64 hex digits (32 bytes), surrounding whitespace allowed.
pub fn parse_key(text: &str) -> Result<[u8; 32], String> {
    let t = text.trim();
    if t.len() != 64 || !t.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "expected exactly 64 hex digits (32 bytes, e.g. from `openssl rand -hex 32`), found {} characters",
            t.len()
        ));
    }
    let mut key = [0u8; 32];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).expect("checked hex digits");
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    fn flows() -> Vec<SyncedFlow> {
        vec![
            SyncedFlow {
                client: "198.51.100.7".parse().unwrap(),
                vip: "203.0.113.10".parse().unwrap(),
                proto: 6,
                sport: 40_000,
                dport: 80,
                every_port: false,
                backend: "192.0.2.11".parse().unwrap(),
                backend_port: None,
                closing: false,
            },
            SyncedFlow {
                client: "2001:db8:c1::9".parse().unwrap(),
                vip: "2001:db8::10".parse().unwrap(),
                proto: 17,
                sport: 53_000,
                dport: 53,
                every_port: true,
                backend: "192.0.2.12".parse().unwrap(),
                backend_port: None,
                closing: true,
            },
            // A backend of a repeated address (one host on two ports) carries its port.
            SyncedFlow {
                client: "198.51.100.8".parse().unwrap(),
                vip: "203.0.113.10".parse().unwrap(),
                proto: 6,
                sport: 40_001,
                dport: 80,
                every_port: false,
                backend: "192.0.2.11".parse().unwrap(),
                backend_port: Some(8081),
                closing: false,
            },
        ]
    }

    fn message(body: Body) -> Message {
        Message {
            seed_tag: seed_tag(&[1, 2]),
            sent_at_ms: 1_800_000_000_000,
            sequence: 42,
            node: "lb1".into(),
            body,
        }
    }

    #[test]
    fn flows_and_hellos_come_back_as_sealed() {
        for body in [
            Body::Flows(flows()),
            Body::Hello {
                drained: true,
                fingerprints: vec![Fingerprint {
                    service: "web".into(),
                    fingerprint: 0x0123_4567_89ab_cdef,
                }],
            },
        ] {
            let m = message(body);
            assert_eq!(open(&KEY, &seal(&KEY, &m)), Ok(m));
        }
    }

    #[test]
    fn a_flow_takes_the_bytes_flow_len_says() {
        let f = flows();
        assert_eq!(flow_len(&f[0]), 18);
        let one = seal(&KEY, &message(Body::Flows(vec![f[0]])));
        assert_eq!(one.len(), overhead("lb1") + 18);
        let two = seal(&KEY, &message(Body::Flows(f[..2].to_vec())));
        assert_eq!(two.len(), overhead("lb1") + 18 + flow_len(&f[1]));
        // Only a repeated address's flow takes 2 bytes more (its port).
        assert_eq!(flow_len(&f[2]), 20);
        let all = seal(&KEY, &message(Body::Flows(f.clone())));
        assert_eq!(all.len(), two.len() + 20);
    }

    #[test]
    fn another_key_or_any_changed_byte_is_refused() {
        let d = seal(&KEY, &message(Body::Flows(flows())));
        assert_eq!(open(&[8; 32], &d), Err(Refused::Authentication));
        // Every single-byte change is refused: in the header (authenticated), the nonce, the
        // body or the tag; a change of the magic or version as malformed.
        for i in 0..d.len() {
            let mut bad = d.clone();
            bad[i] ^= 0x01;
            assert!(open(&KEY, &bad).is_err(), "byte {i} changed was accepted");
        }
        for n in 0..d.len() {
            assert!(
                open(&KEY, &d[..n]).is_err(),
                "a datagram cut to {n} bytes was accepted"
            );
        }
    }

    #[test]
    fn keys_are_64_hex_digits() {
        assert_eq!(parse_key(&format!("{}\n", "ab".repeat(32))), Ok([0xab; 32]));
        assert!(parse_key("ab").unwrap_err().contains("64 hex digits"));
        assert!(parse_key(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn seeds_have_different_tags() {
        assert_ne!(seed_tag(&[1, 2]), seed_tag(&[1, 3]));
        assert_eq!(seed_tag(&[1, 2]), seed_tag(&[1, 2]));
    }
}
