//! Which service a packet belongs to: decided in this module only, in three steps the program
//! runs in order (`flow_place`, `established`, `classify`).
//!
//! - A fragment after the first (it has no ports): its VIP's entry in `VIPS` for its protocol.
//! - Anything else must pass the VIP filter, then finds its flow's place in the connection table
//!   (`flow_place`). An established flow (a plain packet whose flow has an entry) stays with the
//!   service the entry names, as long as that service still answers to the packet's destination
//!   (`SERVICE_BY_ID`, no hash lookup) and the entry's backend may still take it; it stays even
//!   if a more exact service (a port of a VIP that had an every-port service) appeared since
//!   (`established`: the fast path, which also yields the backend).
//! - Otherwise the destination is looked up in `SERVICES`: the exact (VIP, port, protocol), then
//!   the VIP's every-port service (port 0) (`classify`).
//!
//! A packet of no service is `Skip::NotOurs`; a malformed packet of a service is refused.

use lb_common::{Addr, Reason, ServiceKey, ServiceValue, VipKey, vip_filter_bits};

use crate::{
    choose::usable_backend,
    conntrack::FlowSlot,
    maps::{CONFIG, SERVICE_BY_ID, SERVICES, VIP_FILTER, VIPS},
    packet::{Frag, Packet},
    verdict::{Chosen, NotOurs, Skip},
};

/// A packet's service, and what backend selection has to go on.
pub enum Class<'a> {
    /// The service of the destination (`SERVICES`), with the flow's place in the connection
    /// table.
    ByDestination {
        service: ServiceValue,
        flow: &'a mut FlowSlot,
    },
    /// A fragment after the first: its VIP's source-hashed service for the protocol (`VIPS`),
    /// or an entry marked `NO_LATE_FRAGMENTS`.
    LaterFragment(ServiceValue),
}

/// The first step for every packet: the flow's place in the connection table, `None` for a
/// later fragment (it has no ports). `NotOurs` for a destination that is no VIP's (the VIP
/// filter), and when the maps are not filled in yet.
#[inline(always)]
pub fn flow_place(p: &Packet) -> Result<Option<FlowSlot>, NotOurs> {
    if p.frag == Frag::Later {
        return Ok(None);
    }
    if !maybe_vip(&p.dst) {
        return Err(NotOurs);
    }
    let config = CONFIG.get(0).ok_or(NotOurs)?;
    FlowSlot::find(p, config).map(Some).ok_or(NotOurs)
}

/// An established flow's service and backend: a plain packet (no SYN, no fragment, no ICMP
/// error, well formed) whose flow has an entry, whose recorded service still answers to the
/// packet's destination and whose backend is still usable for it. Its entry is marked seen.
/// Cheap (array reads only), so the program runs it inline; any other packet is `classify`'s.
#[inline(always)]
pub fn established(p: &Packet, flow: &mut FlowSlot) -> Option<Chosen> {
    if p.syn || p.icmp_error || p.malformed || p.frag != Frag::None {
        return None;
    }
    let way = flow.found?;
    let recorded = flow.way(way).value();
    let entry = SERVICE_BY_ID.get(recorded.service)?;
    let key = &entry.key;
    if key.addr != p.dst
        || key.proto != p.proto
        || key.family != p.family
        || (key.port != p.dport && key.port != 0)
    {
        return None;
    }
    let backend = usable_backend(recorded.backend, &entry.value)?;
    flow.touch(way);
    Some(Chosen {
        service: entry.value,
        backend_id: recorded.backend,
        backend,
    })
}

/// The service of a packet that is no established flow's (see the module's description);
/// `flow` is its `flow_place`.
#[inline(always)]
pub fn classify<'a>(p: &Packet, flow: Option<&'a mut FlowSlot>) -> Result<Class<'a>, Skip> {
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
    let flow = flow.ok_or(Skip::NotOurs)?;
    let service = by_destination(p).ok_or(Skip::NotOurs)?;
    refuse_malformed(p)?;
    Ok(Class::ByDestination { service, flow })
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

/// A copy of the value of `key` in a hash map of services.
#[inline(always)]
fn lookup<K, const N: usize>(
    map: &aya_ebpf::btf_maps::HashMap<K, ServiceValue, N>,
    key: &K,
) -> Option<ServiceValue> {
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    map.get_ptr(key).map(|v| unsafe { *v })
}
