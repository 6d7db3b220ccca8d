//! Following the kernel's notifications of links, routes, neighbours and addresses.

use std::net::IpAddr;

use futures::StreamExt;
use netlink_packet_route::{
    RouteNetlinkMessage,
    neighbour::{NeighbourAddress, NeighbourAttribute},
};
use rtnetlink::packet_core::NetlinkPayload;

use super::{NetlinkError, parse::parse_link};

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
