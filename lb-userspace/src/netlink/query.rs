//! Asking the kernel: interfaces, addresses, routes, and the next hop to a destination.

use std::{net::IpAddr, time::Duration};

use futures::TryStreamExt;
use netlink_packet_route::route::{RouteAttribute, RouteMessage, RouteType, RouteVia};

use super::{
    Interface, Netlink, NetlinkError, NextHop, Route,
    error::errno,
    parse::{family, own_address, parse_link, route_addr},
};

impl Netlink {
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
    pub(super) async fn iface_label(&self, ifindex: u32) -> String {
        let req = self.handle.link().get().match_index(ifindex);
        match req.execute().try_next().await {
            Ok(Some(link)) => format!("{} (ifindex {ifindex})", parse_link(&link).name),
            _ => format!("ifindex {ifindex}"),
        }
    }
}
