//! The neighbour table (ARP/ND): reading an entry, having one re-confirmed, resolving one.
//!
//! Neighbour resolution: [`Netlink::resolve_neighbour`] asks the kernel to resolve an address
//! with an RTM_NEWNEIGH carrying NTF_USE (the kernel creates the entry if needed and calls
//! `neigh_event_send()` on it, as for a packet waiting on the entry: it sends an ARP request /
//! neighbour solicitation), then polls the entry with RTM_GETNEIGH every 20 ms.
//!
//! Checked on kernel 6.18 (see the tests): NTF_USE alone resolves ARP entries, and ND entries
//! too, except while the interface has no usable IPv6 link-local address (it is tentative for
//! about a second after the link comes up, while DAD runs; `addrgenmode none` has none at all):
//! a solicitation the kernel sends without a packet takes the link-local address as its source,
//! and with none usable it sends nothing, leaving the entry INCOMPLETE until its next retry.
//! So for IPv6 on such an interface resolve_neighbour first sends an empty UDP datagram to
//! `addr:9` (discard): the kernel then solicits at once, from the datagram's source address.
//! The same datagram is sent when NTF_USE is refused or the entry is still unresolved 100 ms
//! after it. The datagram follows the routing table, so it reaches `ifindex` only when the route
//! to `addr` goes out there (always so for [`Netlink::next_hop`]).

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket},
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressFlags},
    link::LinkFlags,
    neighbour::{NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState},
};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use tokio::time::Instant;

use super::{
    Netlink, NetlinkError,
    error::Cause,
    parse::{family, is_unicast_link_local, neigh_addr},
};

/// How often [`Netlink::resolve_neighbour`] looks at the neighbour table.
pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Neighbour states whose link-layer address may be used to send frames:
/// NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_NOARP | NUD_PERMANENT.
const NUD_USABLE: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;
const NUD_NOARP: u16 = 0x40;
const NUD_STALE: u16 = 0x04;
const NUD_FAILED: u16 = 0x20;

/// How long [`Netlink::resolve_neighbour`] waits for NTF_USE to work before it also sends a UDP
/// datagram to the address.
const UDP_FALLBACK_AFTER: Duration = Duration::from_millis(100);

/// A neighbour table entry, as far as this module cares.
struct NeighEntry {
    state: u16,
    lladdr: Option<[u8; 6]>,
}

impl NeighEntry {
    fn usable_mac(&self) -> Option<[u8; 6]> {
        if self.state & NUD_USABLE != 0 {
            self.lladdr
        } else {
            None
        }
    }
}

impl Netlink {
    /// Current neighbour entry (ARP/ND) for `addr` on `ifindex`, if it has a usable link-layer
    /// address (states reachable, stale, delay, probe, permanent, noarp); None when the entry is
    /// absent, incomplete or failed.
    pub async fn neighbour(
        &self,
        ifindex: u32,
        addr: IpAddr,
    ) -> Result<Option<[u8; 6]>, NetlinkError> {
        match self.neighbour_entry(ifindex, addr).await {
            Ok(entry) => Ok(entry.and_then(|e| e.usable_mac())),
            Err(cause) => Err(self.neighbour_error(ifindex, addr, cause).await),
        }
    }

    /// A refused neighbour request about `addr` on `ifindex`, naming the interface.
    async fn neighbour_error(
        &self,
        ifindex: u32,
        addr: IpAddr,
        cause: rtnetlink::Error,
    ) -> NetlinkError {
        NetlinkError::Neighbour {
            addr,
            iface: self.iface_label(ifindex).await,
            cause,
        }
    }

    /// RTM_GETNEIGH for one entry (not a dump): None when the kernel has no such entry.
    async fn neighbour_entry(
        &self,
        ifindex: u32,
        addr: IpAddr,
    ) -> Result<Option<NeighEntry>, rtnetlink::Error> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family(addr);
        msg.header.ifindex = ifindex;
        msg.attributes
            .push(NeighbourAttribute::Destination(neigh_addr(addr)));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbour(msg));
        req.header.flags = NLM_F_REQUEST;
        let mut replies = self.handle.clone().request(req)?;
        let mut entry = None;
        while let Some(reply) = replies.next().await {
            match reply.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) => {
                    let lladdr = n.attributes.iter().find_map(|a| match a {
                        NeighbourAttribute::LinkLayerAddress(l) => <[u8; 6]>::try_from(&l[..]).ok(),
                        _ => None,
                    });
                    entry = Some(NeighEntry {
                        state: u16::from(n.header.state),
                        lladdr,
                    });
                }
                NetlinkPayload::Error(e) if e.raw_code() == -libc::ENOENT => return Ok(None),
                NetlinkPayload::Error(e) if e.raw_code() != 0 => {
                    return Err(rtnetlink::Error::NetlinkError(e));
                }
                _ => {}
            }
        }
        Ok(entry)
    }

    /// Has the kernel re-confirm the neighbour entry of `addr` on `ifindex` now, if it is
    /// STALE: its state is set to PROBE (its MAC kept), so the kernel sends unicast probes at
    /// once and the entry becomes REACHABLE again if the neighbour answers, or FAILED within a
    /// few seconds if not (its MAC changed, or it is gone: it is then resolved anew). Traffic
    /// forwarded by XDP never confirms the entries it relies on, so without this an entry
    /// stays STALE with whatever MAC it had, for ever. Returns whether it asked.
    pub async fn reconfirm_neighbour(
        &self,
        ifindex: u32,
        addr: IpAddr,
    ) -> Result<bool, NetlinkError> {
        let error = |cause| self.neighbour_error(ifindex, addr, cause);
        let entry = match self.neighbour_entry(ifindex, addr).await {
            Ok(Some(e)) => e,
            Ok(None) => return Ok(false),
            Err(cause) => return Err(error(cause).await),
        };
        let (NUD_STALE, Some(mac)) = (entry.state, entry.lladdr) else {
            return Ok(false);
        };
        let mut msg = NeighbourMessage::default();
        msg.header.family = family(addr);
        msg.header.ifindex = ifindex;
        msg.header.state = NeighbourState::Probe;
        msg.attributes
            .push(NeighbourAttribute::Destination(neigh_addr(addr)));
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(msg));
        // Replace only: an entry that went meanwhile is not created again in PROBE.
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE;
        let mut replies = match self.handle.clone().request(req) {
            Ok(r) => r,
            Err(cause) => return Err(error(cause).await),
        };
        while let Some(reply) = replies.next().await {
            if let NetlinkPayload::Error(e) = reply.payload
                && e.raw_code() != 0
            {
                // Gone meanwhile: nothing to confirm.
                if e.raw_code() == -libc::ENOENT {
                    return Ok(false);
                }
                return Err(error(rtnetlink::Error::NetlinkError(e)).await);
            }
        }
        Ok(true)
    }

    /// Asks the kernel to resolve `addr` on `ifindex`: RTM_NEWNEIGH with NTF_USE creates the
    /// entry when missing and starts (or restarts) ARP / neighbour discovery for it, without
    /// touching an entry that is already valid.
    pub(super) async fn trigger_resolution(
        &self,
        ifindex: u32,
        addr: IpAddr,
    ) -> Result<(), rtnetlink::Error> {
        self.handle
            .neighbours()
            .add(ifindex, addr)
            // The state is not applied with NTF_USE, but a new entry created "permanent" would be
            // exempt from garbage collection: ask for none.
            .state(NeighbourState::None)
            .flags(NeighbourFlags::Use)
            .replace()
            .execute()
            .await
    }

    /// Whether `ifindex` has an IPv6 link-local address the kernel may send neighbour
    /// solicitations from (not tentative, optimistic or failed DAD). True when unsure.
    async fn has_usable_link_local(&self, ifindex: u32) -> bool {
        let mut req = self.handle.address().get().set_link_index_filter(ifindex);
        req.message_mut().header.family = AddressFamily::Inet6;
        let mut addrs = req.execute();
        let unusable = AddressFlags::Tentative | AddressFlags::Optimistic | AddressFlags::Dadfailed;
        loop {
            match addrs.try_next().await {
                Ok(Some(msg)) => {
                    let link_local = msg.attributes.iter().any(|a| {
                        matches!(a, AddressAttribute::Address(IpAddr::V6(ip)) if is_unicast_link_local(ip))
                    });
                    let flags = msg
                        .attributes
                        .iter()
                        .find_map(|a| match a {
                            AddressAttribute::Flags(f) => Some(*f),
                            _ => None,
                        })
                        .unwrap_or_else(|| {
                            AddressFlags::from_bits_retain(msg.header.flags.bits().into())
                        });
                    if link_local && !flags.intersects(unusable) {
                        return true;
                    }
                }
                Ok(None) => return false,
                Err(_) => return true,
            }
        }
    }

    /// Makes the kernel resolve `addr` on `ifindex` if no usable entry exists, then polls the
    /// table every 20 ms until it has a usable MAC or `timeout` passes.
    pub async fn resolve_neighbour(
        &self,
        ifindex: u32,
        addr: IpAddr,
        timeout: Duration,
    ) -> Result<[u8; 6], NetlinkError> {
        let deadline = Instant::now() + timeout;
        let lookup_error = |cause| self.neighbour_error(ifindex, addr, cause);
        let entry = match self.neighbour_entry(ifindex, addr).await {
            Ok(e) => e,
            Err(cause) => return Err(lookup_error(cause).await),
        };
        if let Some(mac) = entry.as_ref().and_then(NeighEntry::usable_mac) {
            return Ok(mac);
        }
        if let Some(e) = &entry {
            if e.state & NUD_NOARP != 0 {
                return Err(NetlinkError::Unresolved {
                    addr,
                    iface: self.iface_label(ifindex).await,
                    timeout,
                    detail: "the interface does not use ARP/ND and has no link-layer addresses"
                        .into(),
                });
            }
        }
        let mut udp_sent = false;
        if addr.is_ipv6() && !self.has_usable_link_local(ifindex).await {
            // The kernel would solicit from the link-local address and has none to use yet:
            // a datagram's own source address will do (see the module's documentation).
            log::debug!(
                "ifindex {ifindex} has no usable IPv6 link-local address; \
                 sending a UDP datagram to {addr} to resolve it"
            );
            udp_poke(ifindex, addr);
            udp_sent = true;
        }
        // Also after the datagram: should it have been routed out of another interface, this
        // still creates and solicits the entry on `ifindex`.
        let mut refused = None;
        if let Err(e) = self.trigger_resolution(ifindex, addr).await {
            let e = Cause(&e).to_string();
            log::debug!("NTF_USE neighbour request for {addr} on ifindex {ifindex} failed ({e})");
            refused = Some(e);
            if !udp_sent {
                udp_poke(ifindex, addr);
                udp_sent = true;
            }
        }
        let udp_after = Instant::now() + UDP_FALLBACK_AFTER;
        let last_state = loop {
            let entry = match self.neighbour_entry(ifindex, addr).await {
                Ok(e) => e,
                Err(cause) => return Err(lookup_error(cause).await),
            };
            if let Some(mac) = entry.as_ref().and_then(NeighEntry::usable_mac) {
                return Ok(mac);
            }
            if !udp_sent && Instant::now() >= udp_after {
                // NTF_USE did not do it (see the module's documentation): let a packet do it.
                log::debug!(
                    "{addr} on ifindex {ifindex} still unresolved {UDP_FALLBACK_AFTER:?} after \
                     NTF_USE; sending a UDP datagram to it"
                );
                udp_poke(ifindex, addr);
                udp_sent = true;
            }
            if entry.as_ref().is_some_and(|e| e.state & NUD_FAILED != 0) {
                // The kernel gave up after its probes: start again while we have time.
                let _ = self.trigger_resolution(ifindex, addr).await;
            }
            let now = Instant::now();
            if now >= deadline {
                break entry.map(|e| e.state);
            }
            tokio::time::sleep_until((now + POLL_INTERVAL).min(deadline)).await;
        };
        let mut detail = match (last_state, refused) {
            (None, Some(e)) => format!("no neighbour entry; the kernel refused to create one: {e}"),
            (None, None) => "no neighbour entry".to_string(),
            (Some(s), _) => format!(
                "no ARP/ND reply (neighbour state {})",
                NeighbourState::from(s)
            ),
        };
        if let Ok(Some(link)) = self
            .handle
            .link()
            .get()
            .match_index(ifindex)
            .execute()
            .try_next()
            .await
        {
            if !link.header.flags.contains(LinkFlags::Up) {
                detail.push_str("; the interface is down");
            } else if !link.header.flags.contains(LinkFlags::LowerUp) {
                detail.push_str("; the interface has no carrier");
            }
        }
        Err(NetlinkError::Unresolved {
            addr,
            iface: self.iface_label(ifindex).await,
            timeout,
            detail,
        })
    }
}

/// Fallback trigger: an empty UDP datagram to addr:9 (discard) makes the kernel resolve the
/// neighbour for it. Best effort; errors are only logged.
fn udp_poke(ifindex: u32, addr: IpAddr) {
    let (bind, target): (SocketAddr, SocketAddr) = match addr {
        IpAddr::V4(a) => (([0, 0, 0, 0], 0).into(), (a, 9).into()),
        IpAddr::V6(a) => {
            // Link-local addresses need the interface as scope.
            let scope = if is_unicast_link_local(&a) {
                ifindex
            } else {
                0
            };
            (
                (Ipv6Addr::UNSPECIFIED, 0).into(),
                SocketAddrV6::new(a, 9, 0, scope).into(),
            )
        }
    };
    let result = UdpSocket::bind(bind).and_then(|s| {
        s.set_nonblocking(true)?;
        s.connect(target)?;
        s.send(&[])
    });
    if let Err(e) = result {
        log::debug!("UDP datagram to {target} to trigger neighbour resolution: {e}");
    }
}
