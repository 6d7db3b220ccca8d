//! Next hops: where each backend's frames go (route, neighbour's MAC, egress interface's MAC
//! and MTU, tunnel source), read from netlink. Runs without the daemon's lock: an address
//! nobody answers can take seconds.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use log::warn;

use super::model::{Hop, HopRequest, Hops, ResolveError, ServiceRuntime};
use crate::{
    config::Forwarding,
    netlink::{ETH_P_8021Q, Interface, Netlink, Vlan},
};

/// How long one backend's next hop may take to resolve before lbd goes on without it (it keeps
/// retrying in the background).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);
/// All of a round of resolutions ends within this, however many backends do not answer, so lbd
/// is ready well within the 10 s SPEC allows.
const RESOLVE_ROUND: Duration = Duration::from_secs(6);
/// Netlink connections used side by side when resolving many backends. The kernel serves one
/// dump at a time per netlink socket (a second gets EBUSY), so parallel resolution needs a
/// socket per worker; a backend that never answers then delays only its own worker.
const RESOLVE_WORKERS: usize = 8;

/// Finds where a backend's frames go: the MAC of the backend itself (dsr: from the config or
/// the neighbour table, resolving it when absent) or of the next hop towards it (tunnel), the
/// interface they leave by, its MAC and MTU, and (tunnel) the outer source address.
async fn resolve(
    netlink: &Netlink,
    req: &HopRequest,
    timeout: Duration,
) -> Result<Hop, ResolveError> {
    let addr = req.backend.address;
    let (ifindex, mac, via, prefsrc) = match req.backend.mac {
        Some(mac) => {
            let route = netlink.route_get(addr).await?;
            (route.oif, mac, route.gateway.unwrap_or(addr), route.prefsrc)
        }
        None => {
            let hop = netlink.next_hop(addr, timeout).await?;
            (hop.ifindex, hop.mac, hop.via, hop.prefsrc)
        }
    };
    if req.forwarding == Forwarding::Dsr && via != addr {
        return Err(ResolveError::BehindGateway {
            backend: addr,
            gateway: via,
        });
    }
    let iface =
        netlink
            .interface_by_index(ifindex)
            .await?
            .ok_or(ResolveError::InterfaceVanished {
                ifindex,
                backend: addr,
            })?;
    if let Some(vlan) = iface.vlan {
        check_vlan(netlink, &iface, vlan, addr).await?;
    }
    let tunnel_src = match (req.forwarding, req.tunnel_source) {
        (Forwarding::Dsr | Forwarding::Nat, _) => None,
        (Forwarding::Tunnel, Some(src)) => Some(src),
        (Forwarding::Tunnel, None) => Some(
            prefsrc
                .or_else(|| {
                    iface
                        .addrs
                        .iter()
                        .map(|(a, _)| *a)
                        .find(|a| a.is_ipv4() == addr.is_ipv4() && !is_link_local(a))
                })
                .ok_or_else(|| ResolveError::NoTunnelSource {
                    family: if addr.is_ipv4() { "IPv4" } else { "IPv6" },
                    iface: iface.name.clone(),
                    backend: addr,
                })?,
        ),
    };
    Ok(Hop {
        ifindex,
        vlan: iface.vlan,
        mac,
        src_mac: iface.mac,
        mtu: iface.mtu.min(u16::MAX as u32) as u16,
        tunnel_src,
        via,
    })
}

/// A backend whose route leaves by VLAN device `iface` is reached through its parent with its
/// tag: one 802.1Q tag on a plain interface, which the data path writes; anything else is
/// refused with the reason.
async fn check_vlan(
    netlink: &Netlink,
    iface: &Interface,
    vlan: Vlan,
    addr: IpAddr,
) -> Result<(), ResolveError> {
    if vlan.protocol != ETH_P_8021Q {
        return Err(ResolveError::VlanProtocol {
            backend: addr,
            vlan: iface.name.clone(),
            id: vlan.id,
            protocol: vlan.protocol,
        });
    }
    let parent = netlink
        .interface_by_index(vlan.parent)
        .await?
        .ok_or_else(|| ResolveError::VlanParentVanished {
            parent: vlan.parent,
            vlan: iface.name.clone(),
            backend: addr,
        })?;
    if parent.vlan.is_some() {
        return Err(ResolveError::VlanOnVlan {
            backend: addr,
            vlan: iface.name.clone(),
            parent: parent.name,
        });
    }
    Ok(())
}

fn is_link_local(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// Resolves the hops of `backends` (several at a time), in order.
pub(super) async fn resolve_many(backends: Vec<HopRequest>) -> Vec<Result<Hop, ResolveError>> {
    let deadline = Instant::now() + RESOLVE_ROUND;
    let workers = RESOLVE_WORKERS.min(backends.len()).max(1);
    let jobs = (0..workers).map(|w| {
        let mine: Vec<(usize, HopRequest)> = backends
            .iter()
            .cloned()
            .enumerate()
            .skip(w)
            .step_by(workers)
            .collect();
        async move {
            let mut out = vec![];
            match Netlink::new() {
                Ok(netlink) => {
                    for (i, b) in mine {
                        let left = deadline.saturating_duration_since(Instant::now());
                        out.push((
                            i,
                            if left.is_zero() {
                                Err(ResolveError::TooSlow(RESOLVE_ROUND))
                            } else {
                                resolve(&netlink, &b, left.min(RESOLVE_TIMEOUT)).await
                            },
                        ));
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    out.extend(
                        mine.into_iter()
                            .map(|(i, _)| (i, Err(ResolveError::NoNetlink(message.clone())))),
                    );
                }
            }
            out
        }
    });
    let mut results: Vec<Option<Result<Hop, ResolveError>>> =
        (0..backends.len()).map(|_| None).collect();
    for (i, r) in futures::future::join_all(jobs).await.into_iter().flatten() {
        results[i] = Some(r);
    }
    results
        .into_iter()
        .map(|r| r.expect("one result per backend"))
        .collect()
}

/// Resolves what `Daemon::hops_needed` asked for (several at a time; never holding the daemon's
/// lock, so lbctl, metrics and health changes go on meanwhile).
pub async fn resolve_hops(needed: Vec<(String, HopRequest)>) -> Hops {
    let results = resolve_many(needed.iter().map(|(_, r)| r.clone()).collect()).await;
    needed
        .into_iter()
        .zip(results)
        .map(|((service, req), r)| ((service, req.backend.address), r))
        .collect()
}

/// Resolves every backend's hop at start; one that does not resolve gets no traffic until it
/// does (retried in the background).
pub async fn resolve_all(services: &mut [ServiceRuntime]) {
    let all: Vec<HopRequest> = services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| HopRequest::of(&s.cfg, &b.cfg)))
        .collect();
    let mut hops = resolve_many(all).await.into_iter();
    for s in services {
        for b in &mut s.backends {
            let hop = hops.next().expect("one hop per backend");
            if let Err(e) = &hop {
                warn!(
                    "service {}: backend {} gets no traffic until it resolves: {e}",
                    s.cfg.name,
                    s.cfg.backend_name(&b.cfg)
                );
            }
            b.set_hop(hop);
        }
    }
}
