//! Which backend a classified packet goes to: the one place that decides it.
//!
//! - An established flow: the backend its connection-table entry recorded (`classify::established`
//!   checked it may still take the flow, and yields it).
//! - A packet classified by its destination: the backend the connection table recorded for the
//!   flow, while it is usable for this service and the packet is no SYN; otherwise (new flow,
//!   TCP SYN, backend down or removed) the Maglev table's choice (`lb_common::maglev_slot`),
//!   which is then recorded (ICMP errors about a flow only read the table). A first fragment
//!   also leaves its choice in `FRAGS` for the later ones.
//! - A later fragment: where its first fragment went (`FRAGS`); else, for a VIP with a single
//!   source-hashed service, that service's Maglev choice for the client (no port needed).

use lb_common::{
    Backend, FragValue, MAGLEV_SLOTS_PER_WORD, NO_BACKEND, Reason, ServiceValue, backend_flags,
    maglev_slot, maglev_slot_value, service_flags,
};

use crate::{
    classify::Class,
    conntrack::FlowSlot,
    maps::{BACKENDS, CONFIG, FRAGS, MAGLEV},
    packet::{Frag, Packet},
    verdict::{Chosen, Skip},
};

/// The backend of a packet classified as `class`.
#[inline(always)]
pub fn choose(p: &Packet, class: Class) -> Result<Chosen, Skip> {
    match class {
        Class::ByDestination { service, flow } => {
            let chosen = for_flow(p, service, flow)?;
            if p.frag == Frag::First {
                // Later fragments carry no ports: they follow this one.
                let _ = FRAGS.insert(
                    p.frag_key(),
                    FragValue {
                        backend: chosen.backend_id,
                        service,
                    },
                    0,
                );
            }
            Ok(chosen)
        }
        Class::LaterFragment(service) => for_later_fragment(p, service),
    }
}

/// The connection table's backend for the flow, else the Maglev table's (recorded).
#[inline(always)]
fn for_flow(p: &Packet, service: ServiceValue, flow: &mut FlowSlot) -> Result<Chosen, Reason> {
    if let Some(way) = flow.found
        && !p.syn
    {
        let id = flow.way(way).value().backend;
        if let Some(backend) = usable_backend(id, &service) {
            flow.touch(way);
            return Ok(Chosen {
                service,
                backend_id: id,
                backend,
            });
        }
    }
    let id = from_table(p, &service)?;
    let backend = match BACKENDS.get(id) {
        Some(b) if b.flags & backend_flags::VALID != 0 => b,
        _ => return Err(Reason::MissingState),
    };
    if !p.icmp_error {
        flow.record(id, service.id);
    }
    Ok(Chosen {
        service,
        backend_id: id,
        backend,
    })
}

/// Where the first fragment went; else the Maglev choice of the VIP's single source-hashed
/// service.
#[inline(always)]
fn for_later_fragment(p: &Packet, service: ServiceValue) -> Result<Chosen, Skip> {
    if let Some(v) = FRAGS.get_ptr(p.frag_key()) {
        // SAFETY: a pointer returned by a map lookup is valid for this program run.
        let v = unsafe { *v };
        let backend = usable_backend(v.backend, &v.service).ok_or(Reason::UnsupportedFragment)?;
        return Ok(Chosen {
            service: v.service,
            backend_id: v.backend,
            backend,
        });
    }
    if service.flags & service_flags::NO_LATE_FRAGMENTS != 0 {
        return Err(Reason::UnsupportedFragment.into());
    }
    let id = from_table(p, &service)?;
    let backend = usable_backend(id, &service).ok_or(Reason::MissingState)?;
    Ok(Chosen {
        service,
        backend_id: id,
        backend,
    })
}

/// The backend id in the service's Maglev table at the flow's slot.
#[inline(always)]
fn from_table(p: &Packet, service: &ServiceValue) -> Result<u32, Reason> {
    let config = CONFIG.get(0).ok_or(Reason::MissingState)?;
    let slot = maglev_slot(&config.hash_key, service, &p.flow_key()).ok_or(Reason::MissingState)?;
    let word = *MAGLEV
        .get_value(service.id, &(slot.index / MAGLEV_SLOTS_PER_WORD))
        .ok_or(Reason::MissingState)?;
    match maglev_slot_value(word, slot.index) {
        NO_BACKEND => Err(Reason::NoBackend),
        id => Ok(id),
    }
}

/// A backend entry that may take this service's packets: filled in, not down, of this service.
#[inline(always)]
pub fn usable_backend(id: u32, service: &ServiceValue) -> Option<&'static Backend> {
    let b = BACKENDS.get(id)?;
    (b.flags & (backend_flags::VALID | backend_flags::DOWN) == backend_flags::VALID
        && b.service == service.id)
        .then_some(b)
}
