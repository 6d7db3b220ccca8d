//! Which service a packet belongs to: decided in this module only.
//!
//! - A fragment after the first (it has no ports): its VIP's entry in `VIPS` for its protocol.
//! - Anything else must pass the VIP filter (`VIP_FILTER`: most packets that are no VIP's leave
//!   after two array reads), then its destination is looked up in `SERVICES`: the exact (VIP,
//!   port, protocol), then the VIP's every-port service (port 0). A connection that began under
//!   the every-port service before its port got a service of its own stays with it: the new
//!   service's slots defer such flows to it (`slotstate::DEFER`, `every_port_service`).
//!
//! A packet of no service is `Skip::NotOurs`; a malformed packet of a service is refused.

use lb_common::{Addr, Reason, ServiceKey, ServiceValue, VipKey, vip_filter_bits};

use crate::{
    maps::{SERVICES, VIP_FILTER, VIPS},
    packet::{Frag, Packet},
    verdict::{NotOurs, Skip},
};

/// A packet's service, and what backend selection has to go on.
pub enum Class {
    /// The service of the destination (`SERVICES`).
    ByDestination(ServiceValue),
    /// A fragment after the first: its VIP's source-hashed service for the protocol (`VIPS`),
    /// or an entry marked `NO_LATE_FRAGMENTS`.
    LaterFragment(ServiceValue),
}

/// The first step for every packet: `NotOurs` for one whose destination is no VIP's (the VIP
/// filter), but for a later fragment (its VIP's entry in `VIPS` decides).
#[inline(always)]
pub fn vip_filter(p: &Packet) -> Result<(), NotOurs> {
    if p.frag != Frag::Later && !maybe_vip(&p.dst) {
        return Err(NotOurs);
    }
    Ok(())
}

/// The service of a packet that passed `vip_filter` (see the module's description).
#[inline(always)]
pub fn classify(p: &Packet) -> Result<Class, Skip> {
    if p.frag == Frag::Later {
        // Every VIP has an entry per protocol: a miss means the fragment is not ours.
        let key = VipKey {
            addr: p.dst,
            proto: p.proto,
            family: p.family,
            _pad: [0; 2],
        };
        let service = lookup(&VIPS, &key).ok_or(Skip::NotOurs)?;
        refuse_malformed(p)?;
        return Ok(Class::LaterFragment(service));
    }
    let service = by_destination(p).ok_or(Skip::NotOurs)?;
    refuse_malformed(p)?;
    Ok(Class::ByDestination(service))
}

/// A packet whose headers are inconsistent is not forwarded, even to its service.
#[inline(always)]
fn refuse_malformed(p: &Packet) -> Result<(), Skip> {
    if p.malformed {
        return Err(Skip::Refused(Reason::Malformed));
    }
    Ok(())
}

/// Whether `addr` may be a VIP: both its bits are set in `VIP_FILTER`.
#[inline(always)]
fn maybe_vip(addr: &Addr) -> bool {
    let [a, b] = vip_filter_bits(addr);
    let has = |bit: u32| {
        VIP_FILTER
            .get(bit >> 6)
            .is_some_and(|w| *w & (1u64 << (bit & 63)) != 0)
    };
    has(a) && has(b)
}

/// The service of the destination: an exact (VIP, port, protocol) match first, then the VIP's
/// every-port service (port 0).
#[inline(always)]
fn by_destination(p: &Packet) -> Option<ServiceValue> {
    let mut key = ServiceKey {
        addr: p.dst,
        port: p.dport,
        proto: p.proto,
        family: p.family,
    };
    if let Some(v) = lookup(&SERVICES, &key) {
        return Some(v);
    }
    key.port = 0;
    lookup(&SERVICES, &key)
}

/// The every-port service (port 0) of the packet's VIP and protocol, if it has one.
#[inline(always)]
pub fn every_port_service(p: &Packet) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr: p.dst,
        port: 0,
        proto: p.proto,
        family: p.family,
    };
    lookup(&SERVICES, &key)
}

/// A copy of the value of `key` in a hash map of services.
#[inline(always)]
fn lookup<K, const N: usize>(
    map: &aya_ebpf::btf_maps::HashMap<K, ServiceValue, N>,
    key: &K,
) -> Option<ServiceValue> {
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    map.get_ptr(key).map(|v| unsafe { *v })
}
