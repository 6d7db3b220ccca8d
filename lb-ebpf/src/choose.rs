//! Which backend a classified packet goes to: the one place that decides it.
//!
//! - A packet classified by its destination takes its Maglev slot (`lb_common::maglev_slot`)
//!   and reads the slot's hot half (`slotstate::Hot`). On an unchanged slot (the steady state:
//!   every slot) its backend is the slot's current one, and nothing else is read or written. On
//!   a slot whose backend changed since some live flow began, the connection table decides
//!   (`conntrack::on_changed_slot`). A first fragment also leaves its choice in `FRAGS` for the
//!   later ones.
//! - A later fragment: where its first fragment went (`FRAGS`); else, for a VIP with a single
//!   source-hashed service, where an unrecorded flow of its client goes
//!   (`slotstate::later_fragment`: no port needed).

use lb_common::{
    Backend, FragValue, MAGLEV_SLOTS_PER_WORD, NO_BACKEND, Reason, ServiceValue, backend_flags,
    in_default_tables, maglev_slot, service_flags,
    slotstate::{self, Backends, Hot, Side},
};

use core::mem::MaybeUninit;

use crate::{
    classify::Class,
    conntrack::{self, SlotChoice},
    filter,
    maps::{BACKENDS, CONFIG, FRAGS, MAGLEV, MAGLEV_DEFAULT},
    packet::{Frag, Packet},
    verdict::{Chosen, Placed, Skip},
};

/// The backend of a packet classified as `class`, written into `out` (`Placed::Chosen`), or its
/// changed slot, written into `at` (`Placed::OnChangedSlot`: `on_changed_slot` decides). Written
/// where they are found, not returned in an enum: LLVM splits the pointer of a `Chosen` moved
/// out of one into 32-bit stores, which the verifier refuses.
#[inline(always)]
pub fn choose(
    p: &Packet,
    class: Class,
    out: &mut MaybeUninit<Chosen>,
    at: &mut MaybeUninit<SlotChoice>,
) -> Result<Placed, Skip> {
    match class {
        Class::ByDestination(service) => for_flow(p, service, out, at),
        Class::LaterFragment(service) => {
            out.write(for_later_fragment(p, service)?);
            Ok(Placed::Chosen)
        }
    }
}

/// The backend of a packet whose slot `at` is changed: the connection table's choice
/// (`conntrack::on_changed_slot`, a call of its own: its frame is not added to the classifying
/// one's).
#[inline(always)]
pub fn on_changed_slot(p: &Packet, at: &mut SlotChoice) -> Result<Chosen, Reason> {
    conntrack::on_changed_slot(p, at)?;
    let chosen = chosen(at.service, at.backend)?;
    remember_first_fragment(p, &chosen);
    Ok(chosen)
}

/// A first fragment leaves its choice for the later ones, which carry no ports.
#[inline(always)]
fn remember_first_fragment(p: &Packet, chosen: &Chosen) {
    if p.frag == Frag::First {
        let _ = FRAGS.insert(
            p.frag_key(),
            FragValue {
                backend: chosen.backend_id,
                service: chosen.service,
            },
            0,
        );
    }
}

/// The slot's current backend when the slot is unchanged; else the slot, for the connection
/// table to decide.
#[inline(always)]
fn for_flow(
    p: &Packet,
    service: ServiceValue,
    out: &mut MaybeUninit<Chosen>,
    at: &mut MaybeUninit<SlotChoice>,
) -> Result<Placed, Skip> {
    let config = CONFIG.get(0).ok_or(Reason::MissingState)?;
    let slot = maglev_slot(&config.hash_key, &service, &p.flow_key())
        .ok_or(Reason::MissingState)?
        .index;
    let hot = hot_lane(&service, slot)?;
    if !hot.changed() {
        let chosen = out.write(chosen(service, hot.current())?);
        remember_first_fragment(p, chosen);
        return Ok(Placed::Chosen);
    }
    at.write(SlotChoice {
        service,
        slot,
        hot,
        backend: NO_BACKEND,
        table: 0,
    });
    Ok(Placed::OnChangedSlot)
}

/// Backend `id` of `service`, when it is filled in.
#[inline(always)]
fn chosen(service: ServiceValue, id: u32) -> Result<Chosen, Reason> {
    if id == NO_BACKEND {
        return Err(Reason::NoBackend);
    }
    match BACKENDS.get(id) {
        Some(backend) if backend.flags & backend_flags::VALID != 0 => Ok(Chosen {
            service,
            backend_id: id,
            backend,
        }),
        _ => Err(Reason::MissingState),
    }
}

/// Where the first fragment went; else where an unrecorded flow of the client goes in the
/// VIP's single source-hashed service.
#[inline(always)]
fn for_later_fragment(p: &Packet, service: ServiceValue) -> Result<Chosen, Skip> {
    if let Some(v) = FRAGS.get_ptr(p.frag_key()) {
        // SAFETY: a pointer returned by a map lookup is valid for this program run.
        let v = unsafe { *v };
        // The filters of the service the first fragment went to (lists may have changed since).
        filter::check(&p.src, &v.service)?;
        let backend = usable_backend(v.backend, &v.service)
            .ok_or(Skip::refused(Reason::UnsupportedFragment, v.service.id))?;
        return Ok(Chosen {
            service: v.service,
            backend_id: v.backend,
            backend,
        });
    }
    if service.flags & service_flags::NO_LATE_FRAGMENTS != 0 {
        return Err(Reason::UnsupportedFragment.into());
    }
    let config = CONFIG.get(0).ok_or(Reason::MissingState)?;
    let slot = maglev_slot(&config.hash_key, &service, &p.flow_key())
        .ok_or(Reason::MissingState)?
        .index;
    let hot = hot_lane(&service, slot)?;
    let id = slotstate::later_fragment(
        hot,
        || side_lane(&service, slot),
        p.proto == lb_common::PROTO_UDP,
        &Usable(&service),
    );
    if id == NO_BACKEND {
        return Err(Reason::NoBackend.into());
    }
    let backend = usable_backend(id, &service).ok_or(Reason::MissingState)?;
    Ok(Chosen {
        service,
        backend_id: id,
        backend,
    })
}

/// The hot half of `slot` in the service's Maglev array: its current backend, whether it
/// changed.
#[inline(always)]
pub fn hot_lane(service: &ServiceValue, slot: u32) -> Result<Hot, Reason> {
    let word = table_word(service, slot / MAGLEV_SLOTS_PER_WORD).ok_or(Reason::MissingState)?;
    Ok(Hot(slotstate::lane(word, slot)))
}

/// The side half of `slot` (after the hot half's words): the backend of its unrecorded flows.
/// `Side::NONE` when it cannot be read.
#[inline(always)]
pub fn side_lane(service: &ServiceValue, slot: u32) -> Side {
    let index = slotstate::half_words(service.table_size) + slot / MAGLEV_SLOTS_PER_WORD;
    match table_word(service, index) {
        Some(word) => Side(slotstate::lane(word, slot)),
        None => Side::NONE,
    }
}

/// Word `index` of the service's Maglev table: from `MAGLEV_DEFAULT` for a table of the
/// default size (a read the verifier inlines), else from `MAGLEV` (a call into the kernel).
#[inline(always)]
fn table_word(service: &ServiceValue, index: u32) -> Option<u64> {
    if in_default_tables(service.table_size) {
        MAGLEV_DEFAULT.get_value(service.id, &index).copied()
    } else {
        MAGLEV.get_value(service.id, &index).copied()
    }
}

/// The backends of one service as `slotstate` sees them.
pub struct Usable<'a>(pub &'a ServiceValue);

impl Backends for Usable<'_> {
    #[inline(always)]
    fn usable(&self, id: u32) -> bool {
        usable_backend(id, self.0).is_some()
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
