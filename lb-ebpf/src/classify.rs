//! Which service a packet belongs to: decided in this module only.
//!
//! - A fragment after the first (it has no ports): its VIP's entry in `VIPS` for its protocol.
//! - Anything else must pass the VIP filter (`VIP_FILTER`: most packets that are no VIP's leave
//!   after two array reads), then its destination is looked up in `SERVICES`: the exact (VIP,
//!   port, protocol), then the VIP's every-port service (port 0). A connection that began under
//!   the every-port service before its port got a service of its own stays with it: the new
//!   service's slots defer such flows to it (`slotstate::DEFER`, `every_port_service`).
//!
//! Then, first thing for its service, the client filters (`filter`): a later fragment's when
//! its VIP has a single service to place it by (else `choose` checks those of the service its
//! first fragment went to). A packet of no service is `Skip::NotOurs`; a filtered client's or
//! a malformed packet of a service is refused.

use core::mem::MaybeUninit;

use lb_common::{
    Addr, Reason, ServiceKey, ServiceValue, VipKey, service_flags, service_index_check,
    service_index_slot, service_index_state, vip_filter_bits,
};

use crate::{
    filter,
    maps::{SERVICE_INDEX, SERVICES, VIP_FILTER, VIPS},
    packet::{Frag, Packet},
    verdict::{NO_SERVICE, NotOurs, Skip},
};

/// A packet's service, and what backend selection has to go on.
pub enum Class {
    /// The service of the destination (`SERVICES`).
    ByDestination(ServiceValue),
    /// A fragment after the first: its VIP's source-hashed service for the protocol (`VIPS`),
    /// or an entry marked `NO_LATE_FRAGMENTS`.
    LaterFragment(ServiceValue),
}

impl Class {
    /// The id of the service a refusal of this packet counts for: its own, or for a later
    /// fragment the VIP's single service (`NO_SERVICE` when the VIP has several: which one the
    /// fragment is of is known only from its first fragment).
    #[inline(always)]
    pub fn counted_service(&self) -> u32 {
        match self {
            Class::ByDestination(s) => s.id,
            Class::LaterFragment(s) if s.flags & service_flags::NO_LATE_FRAGMENTS == 0 => s.id,
            Class::LaterFragment(_) => NO_SERVICE,
        }
    }
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
        let class = Class::LaterFragment(service);
        if service.flags & service_flags::NO_LATE_FRAGMENTS == 0 {
            filter::check(&p.src, &service)?;
        }
        refuse_malformed(p, class.counted_service())?;
        return Ok(class);
    }
    let service = by_destination(p).ok_or(Skip::NotOurs)?;
    filter::check(&p.src, &service)?;
    refuse_malformed(p, service.id)?;
    Ok(Class::ByDestination(service))
}

/// A packet whose headers are inconsistent is not forwarded, even to its service (`id`).
#[inline(always)]
fn refuse_malformed(p: &Packet, id: u32) -> Result<(), Skip> {
    if p.malformed {
        return Err(Skip::from(Reason::Malformed).for_service(id));
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
    if let Some(v) = service_of(&key) {
        return Some(v);
    }
    key.port = 0;
    service_of(&key)
}

/// The every-port service (port 0) of the packet's VIP and protocol, if it has one. From
/// `SERVICES` itself: a rare path (flows deferred to that service), already three calls deep,
/// where `index_lookup`'s frame would not fit the stack.
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

/// The service of `key` (see `index_lookup`).
#[inline(always)]
fn service_of(key: &ServiceKey) -> Option<ServiceValue> {
    let mut value = MaybeUninit::<ServiceValue>::uninit();
    // SAFETY: index_lookup returned true, so it wrote `value`.
    index_lookup(key, &mut value).then(|| unsafe { value.assume_init() })
}

/// The service of `key` into `out`: from its `SERVICE_INDEX` entry (an array read), else from
/// `SERVICES` when the entry cannot say (another key holds the slot, or lbd is rewriting it).
/// A call of its own: inlined at its three call sites it took the verifier past its limit.
#[inline(never)]
fn index_lookup(key: &ServiceKey, out: &mut MaybeUninit<ServiceValue>) -> bool {
    if let Some(e) = SERVICE_INDEX.get(service_index_slot(key)) {
        let e = *e;
        if e.check == service_index_check(&e) {
            if e.state & service_index_state::HELD != 0 && e.key == *key {
                out.write(e.value);
                return true;
            }
            if e.state & service_index_state::COLLIDED == 0 {
                return false;
            }
        }
    }
    match lookup(&SERVICES, key) {
        Some(v) => {
            out.write(v);
            true
        }
        None => false,
    }
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
