//! Interfaces, routes and neighbours through rtnetlink.
//!
//! Everything lbd needs to know about the host's network (an interface's index, MAC, MTU and
//! addresses; the route to a backend; the MAC of the next hop) comes from here, over a
//! NETLINK_ROUTE socket and never from /sys/class/net: under `nsenter --net` /sys still shows the
//! host's interfaces, while a netlink socket always talks to the namespace it was created in.
//!
//! The netlink socket belongs to the network namespace of the thread that calls [`Netlink::new`].
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

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressFlags},
    link::{InfoData, InfoVlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, LinkXdp},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType, RouteVia},
};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use tokio::time::Instant;

/// How often [`Netlink::resolve_neighbour`] looks at the neighbour table.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Neighbour states whose link-layer address may be used to send frames:
/// NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_NOARP | NUD_PERMANENT.
const NUD_USABLE: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;
const NUD_NOARP: u16 = 0x40;
const NUD_STALE: u16 = 0x04;
const NUD_FAILED: u16 = 0x20;

/// How long [`Netlink::resolve_neighbour`] waits for NTF_USE to work before it also sends a UDP
/// datagram to the address.
const UDP_FALLBACK_AFTER: Duration = Duration::from_millis(100);

/// Errors of this module. Each message names the interface or address concerned and the cause.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The NETLINK_ROUTE socket could not be opened.
    #[error("cannot open a netlink route socket: {0}")]
    Connect(std::io::Error),
    /// [`Netlink::new`] was called outside a tokio runtime.
    #[error("cannot open a netlink route socket: not called from within a tokio runtime")]
    NoRuntime,
    /// The kernel refused a link query (a missing interface is `Ok(None)`, not this).
    #[error("netlink query for interface {iface} failed: {}", Cause(.cause))]
    Link {
        iface: String,
        cause: rtnetlink::Error,
    },
    /// An interface that must exist (e.g. a route's output interface) does not.
    #[error("interface {iface} does not exist")]
    NoSuchInterface { iface: String },
    #[error("cannot list the addresses of interface {iface}: {}", Cause(.cause))]
    Address {
        iface: String,
        cause: rtnetlink::Error,
    },
    /// The route lookup failed for another reason than the absence of a route.
    #[error("route lookup for {dst} failed: {}", Cause(.cause))]
    Route {
        dst: IpAddr,
        cause: rtnetlink::Error,
    },
    /// The kernel has no usable route (none, unreachable, prohibit, blackhole).
    #[error("no route to {dst}: {reason}")]
    NoRoute { dst: IpAddr, reason: String },
    /// The destination is not reached through a unicast next hop (it is local, broadcast or
    /// multicast).
    #[error(
        "{dst} has no next hop: its route is of type {kind} (this host's own address, broadcast or multicast)"
    )]
    LocalDestination { dst: IpAddr, kind: String },
    /// The kernel refused a neighbour table query or update.
    #[error("neighbour table query for {addr} on {iface} failed: {}", Cause(.cause))]
    Neighbour {
        addr: IpAddr,
        iface: String,
        cause: rtnetlink::Error,
    },
    /// Nobody answered ARP/ND for the address within the timeout.
    #[error(
        "could not resolve the link-layer address of {addr} on {iface} within {timeout:?}: {detail}"
    )]
    Unresolved {
        addr: IpAddr,
        iface: String,
        timeout: Duration,
        detail: String,
    },
}

/// The host's own address in an address message: IFA_LOCAL is the interface's own address;
/// IFA_ADDRESS is the peer's on point-to-point links and the same as IFA_LOCAL elsewhere (IPv6
/// only has it).
fn own_address(msg: &netlink_packet_route::address::AddressMessage) -> Option<IpAddr> {
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    local.or(address)
}

impl NetlinkError {
    /// The errno of a request the kernel refused, if that is what this error is.
    pub fn os_error(&self) -> Option<i32> {
        match self {
            Self::Connect(e) => e.raw_os_error(),
            Self::Link { cause, .. }
            | Self::Address { cause, .. }
            | Self::Route { cause, .. }
            | Self::Neighbour { cause, .. } => errno(cause),
            _ => None,
        }
    }
}

/// Shows an rtnetlink error as "No such device (os error 19)" rather than its verbose Display.
struct Cause<'a>(&'a rtnetlink::Error);

impl fmt::Display for Cause<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            rtnetlink::Error::NetlinkError(e) => write!(f, "{}", e.to_io()),
            rtnetlink::Error::RequestFailed => write!(f, "the netlink connection is closed"),
            other => write!(f, "{other}"),
        }
    }
}

/// The (positive) errno of a netlink error reply.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() != 0 => Some(m.raw_code().abs()),
        _ => None,
    }
}

/// A network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    /// The link-layer address; all zeros when the interface has no 6-byte (Ethernet) address.
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Every address on the interface with its prefix length (IPv6 link-local ones included).
    pub addrs: Vec<(IpAddr, u8)>,
    /// Administratively up (IFF_UP, `ip link set IF up`).
    pub up: bool,
    /// Set when the interface is a VLAN device (`ip link add link eth0 name eth0.100 type
    /// vlan id 100`): its tag and the interface it sits on.
    pub vlan: Option<Vlan>,
    /// Ids of the XDP programs attached to it (IFLA_XDP), in any mode.
    pub xdp_programs: Vec<u32>,
}

/// What makes an interface a VLAN device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Vlan {
    /// The VLAN id its frames carry on the parent.
    pub id: u16,
    /// The index of the interface it sits on.
    pub parent: u32,
    /// The tag's protocol: 802.1Q (0x8100), or 802.1ad (0x88a8, a service tag).
    pub protocol: u16,
}

/// The kernel's answer to `ip route get DST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Output interface index.
    pub oif: u32,
    /// The gateway, or None when the destination is on-link.
    pub gateway: Option<IpAddr>,
    /// The source address the kernel would use.
    pub prefsrc: Option<IpAddr>,
}

/// Where to send a frame for a destination: egress interface and both MACs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    /// The next hop's MAC (the gateway's, or the destination's when on-link).
    pub mac: [u8; 6],
    /// The egress interface's own MAC.
    pub src_mac: [u8; 6],
    /// The gateway, or the destination itself when on-link.
    pub via: IpAddr,
    pub prefsrc: Option<IpAddr>,
}

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

/// Owns a NETLINK_ROUTE connection whose I/O task runs on the tokio runtime.
pub struct Netlink {
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// Opens a netlink route socket in the calling thread's network namespace and spawns its
    /// connection task on the current tokio runtime (which needs its I/O driver enabled).
    pub fn new() -> Result<Self, NetlinkError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime)?;
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        runtime.spawn(conn);
        Ok(Self { handle })
    }

    /// The interface called `name`, or None when there is none.
    pub async fn interface_by_name(&self, name: &str) -> Result<Option<Interface>, NetlinkError> {
        let req = self.handle.link().get().match_name(name);
        self.interface(req, name.to_string()).await
    }

    /// The interface with index `index`, or None when there is none.
    pub async fn interface_by_index(&self, index: u32) -> Result<Option<Interface>, NetlinkError> {
        let req = self.handle.link().get().match_index(index);
        self.interface(req, format!("with index {index}")).await
    }

    async fn interface(
        &self,
        req: rtnetlink::LinkGetRequest,
        label: String,
    ) -> Result<Option<Interface>, NetlinkError> {
        let link = match req.execute().try_next().await {
            Ok(Some(link)) => link,
            Ok(None) => return Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => return Ok(None),
            Err(cause) => {
                return Err(NetlinkError::Link {
                    iface: label,
                    cause,
                });
            }
        };
        let mut iface = parse_link(&link);
        let label = format!("{} (ifindex {})", iface.name, iface.index);
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(iface.index)
            .execute();
        loop {
            match addrs.try_next().await {
                Ok(Some(msg)) => {
                    if let Some(ip) = own_address(&msg) {
                        iface.addrs.push((ip, msg.header.prefix_len));
                    }
                }
                Ok(None) => break,
                Err(cause) => {
                    return Err(NetlinkError::Address {
                        iface: label,
                        cause,
                    });
                }
            }
        }
        Ok(Some(iface))
    }

    /// Every address of every interface in this network namespace (`ip addr`), `lo`'s too.
    pub async fn all_addresses(&self) -> Result<Vec<IpAddr>, NetlinkError> {
        let mut addrs = self.handle.address().get().execute();
        let mut out = vec![];
        loop {
            match addrs.try_next().await {
                Ok(Some(msg)) => out.extend(own_address(&msg)),
                Ok(None) => return Ok(out),
                Err(cause) => {
                    return Err(NetlinkError::Address {
                        iface: "any".into(),
                        cause,
                    });
                }
            }
        }
    }

    /// Route lookup like `ip route get DST`: the output interface, the gateway if any, the
    /// preferred source.
    pub async fn route_get(&self, dst: IpAddr) -> Result<Route, NetlinkError> {
        self.route_lookup(dst).await.map(|(route, _)| route)
    }

    async fn route_lookup(&self, dst: IpAddr) -> Result<(Route, RouteType), NetlinkError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(dst);
        msg.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
        msg.attributes.push(RouteAttribute::Destination(dst.into()));
        let reply = match self.handle.route().get(msg).execute().try_next().await {
            Ok(Some(reply)) => reply,
            Ok(None) => {
                return Err(NetlinkError::NoRoute {
                    dst,
                    reason: "the kernel returned no route".into(),
                });
            }
            Err(cause) => {
                return Err(match errno(&cause) {
                    // What `ip route get` reports for no route, unreachable, prohibit, blackhole.
                    Some(
                        code @ (libc::ENETUNREACH
                        | libc::EHOSTUNREACH
                        | libc::EACCES
                        | libc::EINVAL
                        | libc::ESRCH),
                    ) => NetlinkError::NoRoute {
                        dst,
                        reason: std::io::Error::from_raw_os_error(code).to_string(),
                    },
                    _ => NetlinkError::Route { dst, cause },
                });
            }
        };
        let kind = reply.header.kind;
        if matches!(
            kind,
            RouteType::BlackHole | RouteType::Unreachable | RouteType::Prohibit | RouteType::Throw
        ) {
            return Err(NetlinkError::NoRoute {
                dst,
                reason: format!("the route is of type {kind:?}"),
            });
        }
        let mut oif = None;
        let mut gateway = None;
        let mut prefsrc = None;
        for attr in &reply.attributes {
            match attr {
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Gateway(a) => gateway = route_addr(a),
                RouteAttribute::Via(RouteVia::Inet(a)) => gateway = Some(IpAddr::V4(*a)),
                RouteAttribute::Via(RouteVia::Inet6(a)) => gateway = Some(IpAddr::V6(*a)),
                RouteAttribute::PrefSource(a) => prefsrc = route_addr(a),
                _ => {}
            }
        }
        let oif = oif.ok_or_else(|| NetlinkError::NoRoute {
            dst,
            reason: "the kernel's route has no output interface".into(),
        })?;
        Ok((
            Route {
                oif,
                gateway,
                prefsrc,
            },
            kind,
        ))
    }

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
    async fn trigger_resolution(&self, ifindex: u32, addr: IpAddr) -> Result<(), rtnetlink::Error> {
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

    /// Resolves the L2 next hop for a destination: route_get, then the neighbour of the gateway
    /// (or of the destination itself when on-link), resolving it if needed within `timeout`.
    pub async fn next_hop(&self, dst: IpAddr, timeout: Duration) -> Result<NextHop, NetlinkError> {
        let (route, kind) = self.route_lookup(dst).await?;
        if matches!(
            kind,
            RouteType::Local | RouteType::Broadcast | RouteType::Multicast
        ) {
            return Err(NetlinkError::LocalDestination {
                dst,
                kind: format!("{kind:?}").to_lowercase(),
            });
        }
        let iface = self.interface_by_index(route.oif).await?.ok_or_else(|| {
            NetlinkError::NoSuchInterface {
                iface: format!("with index {} (the route to {dst})", route.oif),
            }
        })?;
        let via = route.gateway.unwrap_or(dst);
        let mac = self.resolve_neighbour(route.oif, via, timeout).await?;
        Ok(NextHop {
            ifindex: route.oif,
            mac,
            src_mac: iface.mac,
            via,
            prefsrc: route.prefsrc,
        })
    }

    /// "eth0 (ifindex 3)" for error messages, or "ifindex 3" when the name cannot be found.
    async fn iface_label(&self, ifindex: u32) -> String {
        let req = self.handle.link().get().match_index(ifindex);
        match req.execute().try_next().await {
            Ok(Some(link)) => format!("{} (ifindex {ifindex})", parse_link(&link).name),
            _ => format!("ifindex {ifindex}"),
        }
    }
}

/// A change the kernel announced (rtnetlink notifications), as far as lbd follows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// An interface appeared or changed (name, MAC, MTU, state, XDP program): its index and
    /// name.
    Link { index: u32, name: String },
    /// An interface went.
    LinkGone { index: u32, name: String },
    /// A route was added, changed or removed.
    Route,
    /// The neighbour entry of `addr` on interface `ifindex` changed (or went).
    Neighbour { ifindex: u32, addr: Option<IpAddr> },
    /// An address was added to or removed from interface `ifindex`.
    Address { ifindex: u32 },
}

/// Subscribes to the kernel's notifications of links, routes (IPv4 and IPv6), neighbours and
/// addresses in the calling thread's network namespace: every one is sent to the returned
/// channel as it comes, until the receiver is dropped. Needs a tokio runtime.
pub fn watch() -> Result<tokio::sync::mpsc::UnboundedReceiver<Change>, NetlinkError> {
    use rtnetlink::MulticastGroup as G;
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime)?;
    let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        G::Link,
        G::Ipv4Route,
        G::Ipv6Route,
        G::Neigh,
        G::Ipv4Ifaddr,
        G::Ipv6Ifaddr,
    ])
    .map_err(NetlinkError::Connect)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let connection = runtime.spawn(conn);
    runtime.spawn(async move {
        while let Some((message, _)) = messages.next().await {
            let NetlinkPayload::InnerMessage(m) = message.payload else {
                continue;
            };
            let change = match m {
                RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::SetLink(l) => {
                    let i = parse_link(&l);
                    Change::Link {
                        index: i.index,
                        name: i.name,
                    }
                }
                RouteNetlinkMessage::DelLink(l) => {
                    let i = parse_link(&l);
                    Change::LinkGone {
                        index: i.index,
                        name: i.name,
                    }
                }
                RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::DelRoute(_) => {
                    Change::Route
                }
                RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n) => {
                    Change::Neighbour {
                        ifindex: n.header.ifindex,
                        addr: n.attributes.iter().find_map(|a| match a {
                            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                                Some(IpAddr::V4(*a))
                            }
                            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                                Some(IpAddr::V6(*a))
                            }
                            _ => None,
                        }),
                    }
                }
                RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => {
                    Change::Address {
                        ifindex: a.header.index,
                    }
                }
                _ => continue,
            };
            if tx.send(change).is_err() {
                break;
            }
        }
        connection.abort();
    });
    Ok(rx)
}

/// An Interface without its addresses.
fn parse_link(link: &LinkMessage) -> Interface {
    let mut iface = Interface {
        index: link.header.index,
        name: String::new(),
        mac: [0; 6],
        mtu: 0,
        addrs: Vec::new(),
        up: link.header.flags.contains(LinkFlags::Up),
        vlan: None,
        xdp_programs: Vec::new(),
    };
    let mut parent = None;
    let mut vlan_info = None;
    for attr in &link.attributes {
        match attr {
            LinkAttribute::IfName(n) => iface.name = n.clone(),
            LinkAttribute::Xdp(nlas) => {
                for nla in nlas {
                    if let LinkXdp::ProgId(id)
                    | LinkXdp::DrvProgId(id)
                    | LinkXdp::SkbProgId(id)
                    | LinkXdp::HwProgId(id) = nla
                        && *id != 0
                        && !iface.xdp_programs.contains(id)
                    {
                        iface.xdp_programs.push(*id);
                    }
                }
            }
            LinkAttribute::Address(a) => {
                if let Ok(mac) = <[u8; 6]>::try_from(&a[..]) {
                    iface.mac = mac;
                }
            }
            LinkAttribute::Mtu(m) => iface.mtu = *m,
            LinkAttribute::Link(index) => parent = Some(*index),
            LinkAttribute::LinkInfo(infos) => {
                vlan_info = infos.iter().find_map(|i| match i {
                    LinkInfo::Data(InfoData::Vlan(v)) => Some(v),
                    _ => None,
                })
            }
            _ => {}
        }
    }
    if let (Some(parent), Some(info)) = (parent, vlan_info) {
        let id = info.iter().find_map(|v| match v {
            InfoVlan::Id(id) => Some(*id),
            _ => None,
        });
        let protocol = info
            .iter()
            .find_map(|v| match v {
                InfoVlan::Protocol(p) => Some(u16::from(*p)),
                _ => None,
            })
            .unwrap_or(ETH_P_8021Q);
        iface.vlan = id.map(|id| Vlan {
            id,
            parent,
            protocol,
        });
    }
    iface
}

/// The 802.1Q tag's protocol (TPID).
pub const ETH_P_8021Q: u16 = 0x8100;

fn family(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn neigh_addr(addr: IpAddr) -> NeighbourAddress {
    match addr {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }
}

fn route_addr(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
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

fn is_unicast_link_local(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

#[cfg(test)]
mod tests {
    //! These tests need root: each builds its own pair of network namespaces joined by a veth
    //! pair and runs the code on a thread inside the first one.

    use super::*;
    use std::net::Ipv4Addr;
    use std::os::fd::AsRawFd;
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};

    static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

    const A_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
    /// Behind B (A routes 192.0.2.128/25 via B); nobody holds it.
    const FAR_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 200));
    /// On the link, but nobody holds it.
    const NOBODY_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99));
    const A_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
    const B_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2));
    /// Behind B (A routes 2001:db8::1:0/112 via B); nobody holds it.
    const FAR_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 1, 5));
    const NOBODY_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99));

    /// Two namespaces `a` and `b` joined by a veth pair: `veth0` in `a` (192.0.2.1/25,
    /// 2001:db8::1/120, MTU 1400), `veth1` in `b` (192.0.2.2/25, 2001:db8::2/120). In `a`,
    /// 192.0.2.128/25 and 2001:db8::1:0/112 are routed via b. Both namespaces are deleted on drop,
    /// also when the test panics.
    struct Lab {
        a: String,
        b: String,
    }

    impl Lab {
        fn new() -> Lab {
            Self::build(false)
        }

        /// Like `new`, but the link-local address of `veth0` stays tentative (duplicate address
        /// detection with 30 probes) for the whole test.
        fn with_slow_dad() -> Lab {
            Self::build(true)
        }

        fn build(slow_dad: bool) -> Lab {
            let n = NEXT_LAB.fetch_add(1, Ordering::SeqCst);
            let base = format!("nlt{}-{n}", std::process::id());
            // Built before any namespace exists so that Drop cleans up a half-built lab too.
            let lab = Lab {
                a: format!("{base}a"),
                b: format!("{base}b"),
            };
            let (a, b) = (lab.a.as_str(), lab.b.as_str());
            ip(&["netns", "add", a]);
            ip(&["netns", "add", b]);
            ip(&[
                "-n", a, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns",
                b,
            ]);
            ip(&["-n", a, "link", "set", "veth0", "mtu", "1400"]);
            if slow_dad {
                let knob = "net.ipv6.conf.veth0.dad_transmits=30";
                ip(&["netns", "exec", a, "sysctl", "-qw", knob]);
            }
            ip(&["-n", a, "addr", "add", "192.0.2.1/25", "dev", "veth0"]);
            ip(&[
                "-n",
                a,
                "addr",
                "add",
                "2001:db8::1/120",
                "dev",
                "veth0",
                "nodad",
            ]);
            ip(&["-n", b, "addr", "add", "192.0.2.2/25", "dev", "veth1"]);
            ip(&[
                "-n",
                b,
                "addr",
                "add",
                "2001:db8::2/120",
                "dev",
                "veth1",
                "nodad",
            ]);
            for (ns, dev) in [(a, "lo"), (a, "veth0"), (b, "lo"), (b, "veth1")] {
                ip(&["-n", ns, "link", "set", dev, "up"]);
            }
            ip(&[
                "-n",
                a,
                "route",
                "add",
                "192.0.2.128/25",
                "via",
                "192.0.2.2",
            ]);
            ip(&[
                "-n",
                a,
                "-6",
                "route",
                "add",
                "2001:db8::1:0/112",
                "via",
                "2001:db8::2",
            ]);
            lab
        }

        /// (ifindex, MAC) of `dev` in `ns` as `ip -j link` reports them.
        fn link(&self, ns: &str, dev: &str) -> (u32, [u8; 6]) {
            let out = ip(&["-n", ns, "-j", "link", "show", "dev", dev]);
            let json: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
            let index = json[0]["ifindex"].as_u64().expect("ifindex") as u32;
            let text = json[0]["address"].as_str().expect("address");
            let bytes: Vec<u8> = text
                .split(':')
                .map(|b| u8::from_str_radix(b, 16).expect("hex MAC"))
                .collect();
            (index, bytes.try_into().expect("6-byte MAC"))
        }

        /// Whether `veth0` in `a` still has a tentative address (DAD not finished).
        fn tentative(&self) -> bool {
            let out = ip(&[
                "-n",
                &self.a,
                "-6",
                "addr",
                "show",
                "dev",
                "veth0",
                "tentative",
            ]);
            !out.trim().is_empty()
        }

        /// Runs `f` with a Netlink opened inside namespace `a`.
        fn in_a<T, F, Fut>(&self, f: F) -> T
        where
            F: FnOnce(Netlink) -> Fut + Send + 'static,
            Fut: Future<Output = T>,
            T: Send + 'static,
        {
            in_netns(&self.a, f)
        }
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            for ns in [&self.a, &self.b] {
                let _ = Command::new("ip").args(["netns", "del", ns]).output();
            }
        }
    }

    /// Runs `ip ARGS`, panics with its stderr when it fails, returns its stdout.
    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// Moves the calling thread (only it) into the network namespace /run/netns/NAME.
    fn enter_netns(name: &str) -> std::io::Result<()> {
        let file = std::fs::File::open(format!("/run/netns/{name}"))?;
        // SAFETY: setns(2) gets a file descriptor that stays open for the call (owned by `file`)
        // and CLONE_NEWNET; it changes nothing but this thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Runs `f` on a new thread inside namespace `ns`, on a current-thread runtime built there,
    /// so that the Netlink socket it gets is the namespace's. Panics propagate.
    fn in_netns<T, F, Fut>(ns: &str, f: F) -> T
    where
        F: FnOnce(Netlink) -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let ns = ns.to_string();
        let thread = std::thread::spawn(move || {
            enter_netns(&ns).unwrap_or_else(|e| panic!("setns into {ns}: {e}"));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(async move {
                let nl = Netlink::new().expect("netlink socket");
                f(nl).await
            })
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// lbd shares one Netlink between tasks of a multi-threaded runtime and wraps errors in anyhow.
    #[test]
    fn types_and_futures_are_send() {
        fn send<T: Send>(_: &T) {}
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<Netlink>();
        send_sync::<NetlinkError>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let _guard = runtime.enter();
        let nl = Netlink::new().expect("netlink socket");
        let t = Duration::from_millis(1);
        send(&nl.interface_by_name("lo"));
        send(&nl.interface_by_index(1));
        send(&nl.route_get(A_V4));
        send(&nl.neighbour(1, A_V4));
        send(&nl.resolve_neighbour(1, A_V4, t));
        send(&nl.next_hop(A_V4, t));
    }

    #[test]
    fn new_outside_a_runtime_is_an_error() {
        assert!(matches!(Netlink::new(), Err(NetlinkError::NoRuntime)));
    }

    /// A link message as the kernel sends it for `ip link add link eth0 name eth0.100 type vlan
    /// id 100 [protocol 802.1ad]` (encoded, then parsed like a reply). This machine kind's
    /// kernel has no 802.1Q support (CONFIG_VLAN_8021Q), so no real VLAN device can be made.
    fn vlan_link(index: u32, parent: Option<u32>, info: Vec<InfoVlan>) -> Interface {
        use netlink_packet_route::link::InfoKind;
        use rtnetlink::packet_core::{Emitable, Parseable};
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes
            .push(LinkAttribute::IfName(format!("eth0.{index}")));
        msg.attributes.push(LinkAttribute::Mtu(1500));
        if let Some(parent) = parent {
            msg.attributes.push(LinkAttribute::Link(parent));
        }
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vlan),
            LinkInfo::Data(InfoData::Vlan(info)),
        ]));
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        let parsed = LinkMessage::parse(&buf[..]).expect("parsing it back");
        parse_link(&parsed)
    }

    #[test]
    fn a_vlan_device_names_its_id_parent_and_protocol() {
        use netlink_packet_route::link::VlanProtocol;
        let iface = vlan_link(7, Some(2), vec![InfoVlan::Id(100)]);
        assert_eq!(
            iface.vlan,
            Some(Vlan {
                id: 100,
                parent: 2,
                protocol: ETH_P_8021Q
            })
        );
        assert_eq!((iface.name.as_str(), iface.mtu), ("eth0.7", 1500));
        let ad = vlan_link(
            8,
            Some(2),
            vec![
                InfoVlan::Protocol(VlanProtocol::Ieee8021Ad),
                InfoVlan::Id(5),
            ],
        );
        assert_eq!(ad.vlan.map(|v| (v.id, v.protocol)), Some((5, 0x88a8)));
        // Without its parent or its id it is no usable VLAN.
        assert_eq!(vlan_link(9, None, vec![InfoVlan::Id(100)]).vlan, None);
        assert_eq!(vlan_link(10, Some(2), vec![]).vlan, None);
    }

    #[test]
    fn interface_by_name_and_index() {
        let lab = Lab::new();
        let (index, mac) = lab.link(&lab.a, "veth0");
        let (by_name, by_index, missing_name, missing_index) = lab.in_a(move |nl| async move {
            (
                nl.interface_by_name("veth0").await.unwrap(),
                nl.interface_by_index(index).await.unwrap(),
                nl.interface_by_name("nosuch0").await.unwrap(),
                nl.interface_by_index(99_999).await.unwrap(),
            )
        });
        let iface = by_name.expect("veth0 exists");
        assert_eq!(iface.index, index);
        assert_eq!(iface.name, "veth0");
        assert_eq!(iface.mac, mac);
        assert_eq!(iface.mtu, 1400);
        assert!(iface.up);
        assert_eq!(
            iface.vlan, None,
            "a veth names its peer as its link, but is no VLAN"
        );
        assert!(iface.addrs.contains(&(A_V4, 25)), "{:?}", iface.addrs);
        assert!(iface.addrs.contains(&(A_V6, 120)), "{:?}", iface.addrs);
        assert_eq!(by_index, Some(iface));
        assert_eq!(missing_name, None);
        assert_eq!(missing_index, None);
    }

    #[test]
    fn route_get_on_link_via_gateway_and_none() {
        let lab = Lab::new();
        let (index, _) = lab.link(&lab.a, "veth0");
        let (routes, none) = lab.in_a(|nl| async move {
            let mut routes = Vec::new();
            for dst in [B_V4, FAR_V4, B_V6, FAR_V6] {
                routes.push(nl.route_get(dst).await.unwrap());
            }
            (routes, nl.route_get("198.51.100.1".parse().unwrap()).await)
        });
        let expect = |gateway, prefsrc| Route {
            oif: index,
            gateway,
            prefsrc: Some(prefsrc),
        };
        assert_eq!(routes[0], expect(None, A_V4));
        assert_eq!(routes[1], expect(Some(B_V4), A_V4));
        assert_eq!(routes[2], expect(None, A_V6));
        assert_eq!(routes[3], expect(Some(B_V6), A_V6));
        let err = none.expect_err("no route to 198.51.100.1 in the lab");
        assert!(matches!(err, NetlinkError::NoRoute { .. }), "{err}");
        assert!(err.to_string().contains("198.51.100.1"), "{err}");
    }

    #[test]
    fn resolve_neighbour_returns_the_peers_mac() {
        let lab = Lab::new();
        let (index, _) = lab.link(&lab.a, "veth0");
        let (_, peer_mac) = lab.link(&lab.b, "veth1");
        for addr in [B_V4, B_V6] {
            let (before, resolved, after) = lab.in_a(move |nl| async move {
                let before = nl.neighbour(index, addr).await.unwrap();
                let resolved = nl
                    .resolve_neighbour(index, addr, Duration::from_secs(3))
                    .await;
                let after = nl.neighbour(index, addr).await.unwrap();
                (before, resolved, after)
            });
            assert_eq!(before, None, "{addr}: no entry before resolution");
            assert_eq!(resolved.unwrap(), peer_mac, "{addr}");
            assert_eq!(after, Some(peer_mac), "{addr}: the entry stays");
        }
    }

    /// What triggers resolution on this kernel: RTM_NEWNEIGH with NTF_USE alone, without the UDP
    /// fallback, resolves an ARP entry, and an ND entry once the link-local address is no longer
    /// tentative.
    #[test]
    fn ntf_use_alone_triggers_resolution() {
        let lab = Lab::new();
        let (index, _) = lab.link(&lab.a, "veth0");
        let (_, peer_mac) = lab.link(&lab.b, "veth1");
        let dad_done = Instant::now() + Duration::from_secs(10);
        while lab.tentative() {
            assert!(Instant::now() < dad_done, "DAD on veth0 does not finish");
            std::thread::sleep(Duration::from_millis(50));
        }
        for addr in [B_V4, B_V6] {
            let mac = lab.in_a(move |nl| async move {
                nl.trigger_resolution(index, addr)
                    .await
                    .expect("NTF_USE request");
                let deadline = Instant::now() + Duration::from_secs(2);
                while Instant::now() < deadline {
                    if let Some(mac) = nl.neighbour(index, addr).await.unwrap() {
                        return Some(mac);
                    }
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
                None
            });
            assert_eq!(mac, Some(peer_mac), "{addr} resolved by NTF_USE alone");
        }
    }

    /// While the link-local address is tentative NTF_USE sends no solicitation for an IPv6
    /// neighbour; the UDP fallback resolves it anyway, well within a second.
    #[test]
    fn resolve_neighbour_v6_while_link_local_is_tentative() {
        let lab = Lab::with_slow_dad();
        let (index, _) = lab.link(&lab.a, "veth0");
        let (_, peer_mac) = lab.link(&lab.b, "veth1");
        assert!(
            lab.tentative(),
            "the lab's link-local address should be tentative"
        );
        let (resolved, elapsed) = lab.in_a(move |nl| async move {
            let start = Instant::now();
            let resolved = nl
                .resolve_neighbour(index, B_V6, Duration::from_secs(3))
                .await;
            (resolved, start.elapsed())
        });
        assert_eq!(resolved.unwrap(), peer_mac);
        assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
        assert!(
            lab.tentative(),
            "DAD finished during the test: it proved nothing"
        );
    }

    #[test]
    fn resolve_neighbour_times_out_for_an_absent_host() {
        let lab = Lab::new();
        let (index, _) = lab.link(&lab.a, "veth0");
        let timeout = Duration::from_millis(300);
        for addr in [NOBODY_V4, NOBODY_V6] {
            let (result, elapsed) = lab.in_a(move |nl| async move {
                let start = std::time::Instant::now();
                let result = nl.resolve_neighbour(index, addr, timeout).await;
                (result, start.elapsed())
            });
            let err = result.expect_err("nobody answers");
            assert!(matches!(err, NetlinkError::Unresolved { .. }), "{err}");
            let text = err.to_string();
            assert!(text.contains(&addr.to_string()), "{text}");
            assert!(text.contains("veth0"), "{text}");
            assert!(elapsed >= timeout, "{addr}: gave up after {elapsed:?}");
            assert!(
                elapsed < timeout + Duration::from_millis(500),
                "{addr}: took {elapsed:?}"
            );
        }
    }

    #[test]
    fn next_hop_through_a_gateway_and_on_link() {
        let lab = Lab::new();
        let (index, own_mac) = lab.link(&lab.a, "veth0");
        let (_, peer_mac) = lab.link(&lab.b, "veth1");
        let timeout = Duration::from_secs(3);
        let (hops, local) = lab.in_a(move |nl| async move {
            let mut hops = Vec::new();
            for dst in [FAR_V4, FAR_V6, B_V4, B_V6] {
                hops.push(nl.next_hop(dst, timeout).await.unwrap());
            }
            (hops, nl.next_hop(A_V4, timeout).await)
        });
        for (hop, via, prefsrc) in [
            (hops[0], B_V4, A_V4),
            (hops[1], B_V6, A_V6),
            (hops[2], B_V4, A_V4),
            (hops[3], B_V6, A_V6),
        ] {
            let expected = NextHop {
                ifindex: index,
                mac: peer_mac,
                src_mac: own_mac,
                via,
                prefsrc: Some(prefsrc),
            };
            assert_eq!(hop, expected);
        }
        let err = local.expect_err("own address");
        assert!(
            matches!(err, NetlinkError::LocalDestination { .. }),
            "{err}"
        );
    }
}
