//! `NetlinkError`: what went wrong, naming the interface or address and the kernel's answer.

use std::{fmt, net::IpAddr, time::Duration};

/// Errors of this module. Each message names the interface or address concerned and the cause.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The NETLINK_ROUTE socket could not be opened.
    #[error("cannot open a netlink route socket: {0}")]
    Connect(std::io::Error),
    /// [`Netlink::new`](super::Netlink::new) was called outside a tokio runtime.
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
    /// The routes of a table could not be listed.
    #[error("cannot list the routes of table {table}: {}", Cause(.cause))]
    RouteTable { table: u32, cause: rtnetlink::Error },
    /// The kernel refused to add or remove a host route.
    #[error("{action} the route {dst} in table {table} (protocol {protocol}) failed: {}", Cause(.cause))]
    HostRoute {
        action: &'static str,
        dst: IpAddr,
        table: u32,
        protocol: u8,
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

impl NetlinkError {
    /// The errno of a request the kernel refused, if that is what this error is.
    pub fn os_error(&self) -> Option<i32> {
        match self {
            Self::Connect(e) => e.raw_os_error(),
            Self::Link { cause, .. }
            | Self::Address { cause, .. }
            | Self::Route { cause, .. }
            | Self::Neighbour { cause, .. }
            | Self::RouteTable { cause, .. }
            | Self::HostRoute { cause, .. } => errno(cause),
            _ => None,
        }
    }
}

/// Shows an rtnetlink error as "No such device (os error 19)" rather than its verbose Display.
pub(super) struct Cause<'a>(pub(super) &'a rtnetlink::Error);

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
pub(super) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() != 0 => Some(m.raw_code().abs()),
        _ => None,
    }
}
