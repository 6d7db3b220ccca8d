//! Host routes of one routing table and protocol: listing, adding and removing them (the VIP
//! routes `announce` keeps for a routing daemon to advertise).
//!
//! A route here is `ADDRESS/32` (or `/128`), type unicast, out of one interface, no gateway, in
//! table `table` with rtnetlink protocol `protocol`: what `ip route add ADDRESS dev lo table
//! TABLE proto PROTOCOL` makes (scope link, as iproute2 gives a route without a gateway).

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::{
    AddressFamily,
    route::{RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
};

use super::{Netlink, NetlinkError, parse::route_addr};

/// A route found in the table with the protocol asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableRoute {
    pub dst: IpAddr,
    pub prefix_len: u8,
    pub kind: RouteType,
    /// The output interface, if it has one (no gateway is expected).
    pub oif: Option<u32>,
    pub has_gateway: bool,
}

impl TableRoute {
    /// Whether it is exactly the host route `add_host_route` makes out of `oif`.
    pub fn is_host_route_on(&self, oif: u32) -> bool {
        self.prefix_len == if self.dst.is_ipv4() { 32 } else { 128 }
            && self.kind == RouteType::Unicast
            && self.oif == Some(oif)
            && !self.has_gateway
    }
}

/// A route message for `dst/32` (`/128`) in `table` with `protocol`.
fn host_route_message(dst: IpAddr, table: u32, protocol: u8) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = super::parse::family(dst);
    msg.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
    // The header holds 8 bits; RTA_TABLE, which the kernel prefers, holds them all.
    msg.header.table = u8::try_from(table).unwrap_or(0);
    msg.header.protocol = RouteProtocol::from(protocol);
    msg.header.kind = RouteType::Unicast;
    msg.attributes.push(RouteAttribute::Destination(dst.into()));
    msg.attributes.push(RouteAttribute::Table(table));
    msg
}

impl Netlink {
    /// Every route of either family in `table` with protocol `protocol` (`ip route show table
    /// TABLE proto PROTOCOL`, both families).
    pub async fn table_routes(
        &self,
        table: u32,
        protocol: u8,
    ) -> Result<Vec<TableRoute>, NetlinkError> {
        let mut out = vec![];
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            let mut dump = self.handle.route().get(msg).execute();
            loop {
                let route = match dump.try_next().await {
                    Ok(Some(route)) => route,
                    Ok(None) => break,
                    Err(cause) => return Err(NetlinkError::RouteTable { table, cause }),
                };
                let in_table = route
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Table(t) => Some(*t),
                        _ => None,
                    })
                    .unwrap_or(route.header.table as u32);
                if in_table != table || u8::from(route.header.protocol) != protocol {
                    continue;
                }
                let mut dst = None;
                let mut oif = None;
                let mut has_gateway = false;
                for a in &route.attributes {
                    match a {
                        RouteAttribute::Destination(d) => dst = route_addr(d),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Gateway(_)
                        | RouteAttribute::Via(_)
                        | RouteAttribute::MultiPath(_) => has_gateway = true,
                        _ => {}
                    }
                }
                let dst = dst.unwrap_or(match family {
                    AddressFamily::Inet => IpAddr::from([0u8; 4]),
                    _ => IpAddr::from([0u8; 16]),
                });
                out.push(TableRoute {
                    dst,
                    prefix_len: route.header.destination_prefix_length,
                    kind: route.header.kind,
                    oif,
                    has_gateway,
                });
            }
        }
        Ok(out)
    }

    /// Adds (or replaces) the host route `dst/32` (`/128`) out of interface `oif` in `table`
    /// with `protocol`.
    pub async fn add_host_route(
        &self,
        dst: IpAddr,
        oif: u32,
        table: u32,
        protocol: u8,
    ) -> Result<(), NetlinkError> {
        let mut msg = host_route_message(dst, table, protocol);
        msg.header.scope = RouteScope::Link;
        msg.attributes.push(RouteAttribute::Oif(oif));
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|cause| NetlinkError::HostRoute {
                action: "adding",
                dst,
                table,
                protocol,
                cause,
            })
    }

    /// Removes the route to `dst/prefix_len` in `table` with `protocol` (whatever its
    /// interface and scope); one already gone is no error.
    pub async fn remove_route(
        &self,
        dst: IpAddr,
        prefix_len: u8,
        table: u32,
        protocol: u8,
    ) -> Result<(), NetlinkError> {
        let mut msg = host_route_message(dst, table, protocol);
        msg.header.destination_prefix_length = prefix_len;
        msg.header.kind = RouteType::Unspec;
        // Any scope (what `ip route del` sends).
        msg.header.scope = RouteScope::NoWhere;
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if super::error::errno(&e) == Some(libc::ESRCH) => Ok(()),
            Err(cause) => Err(NetlinkError::HostRoute {
                action: "removing",
                dst,
                table,
                protocol,
                cause,
            }),
        }
    }
}
