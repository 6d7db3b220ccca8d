//! Interfaces, routes and neighbours through rtnetlink.
//!
//! Everything lbd needs to know about the host's network (an interface's index, MAC, MTU and
//! addresses; the route to a backend; the MAC of the next hop) comes from here, over a
//! NETLINK_ROUTE socket and never from /sys/class/net: under `nsenter --net` /sys still shows the
//! host's interfaces, while a netlink socket always talks to the namespace it was created in.
//!
//! The netlink socket belongs to the network namespace of the thread that calls [`Netlink::new`].
//!
//!
//! Its parts: `query` (interfaces, addresses, routes, next hops), `neighbour` (the
//! neighbour table, resolution) and `routes` (host routes of one table and protocol: list, add,
//! remove) make requests; `watch` follows the kernel's notifications;
//! `parse` reads the kernel's messages; `error` is `NetlinkError`. Each may call `parse` and
//! `error`; `query` calls `neighbour` (a next hop needs its MAC).

mod error;
mod neighbour;
mod parse;
mod query;
mod routes;
#[cfg(test)]
mod tests;
mod watch;

use std::net::IpAddr;

pub use error::NetlinkError;
pub use parse::ETH_P_8021Q;
pub use routes::TableRoute;
pub use watch::{Change, watch};

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
}
