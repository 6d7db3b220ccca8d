//! Connection state shared with other lb nodes (lbd's sync threads): the program's reports of the
//! records it writes, turned into addresses, and a peer's flows written into this node's
//! connection table, in this node's ids.

use std::net::IpAddr;

use aya::maps::{IterableMap as _, MapData, RingBuf};
use lb_common::{
    FlowKey, PROTO_UDP, Record, RecordSet, ServiceKey, SyncEvent, maglev_slot,
    slotstate::{Hot, Side, half_words, record_flags},
    sync_event_flags,
};

use super::{
    Datapath,
    error::{Result, io_err},
    slots::slot_seconds,
    sys::ArrayMemory,
};
use crate::state::to_addr;

/// A flow one node recorded, as another node can place it (what the sync datagrams carry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerFlow {
    pub client: IpAddr,
    pub vip: IpAddr,
    pub proto: u8,
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    /// The record names the VIP's every-port service (port 0), not the destination port's.
    pub every_port: bool,
    pub backend: IpAddr,
    pub closing: bool,
}

/// What became of a peer's flow here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adopted {
    /// Recorded: this node's next packet of the flow goes to the peer's backend.
    Recorded,
    /// Recorded, and its slot, unchanged here, marked changed so the record is read (the peer
    /// saw a backend change this node has not made, or made differently).
    RecordedOnNewlyChangedSlot,
    /// Nothing to write: its slot is unchanged here and already names that backend.
    AlreadyThere,
    /// This node has no such service or backend (a flow of a service that differs between
    /// the nodes is not this node's to decide).
    Unknown,
}

impl Datapath {
    /// Takes the program's reports of the records it writes (once: the sync thread reads them).
    pub fn take_sync_events(&mut self) -> Option<RingBuf<MapData>> {
        self.maps.sync_events.take()
    }

    /// A reported record in terms another node understands (addresses, not ids); `None` when
    /// its service or backend is not (or no longer) in the maps.
    pub fn describe_event(&self, e: &SyncEvent) -> Option<PeerFlow> {
        let (key, _) = self
            .shadow
            .services
            .iter()
            .find(|(_, v)| v.id == e.service)?;
        let backend = self.shadow.backends.get(&e.backend)?;
        if backend.service != e.service {
            return None;
        }
        Some(PeerFlow {
            client: ip_of(&e.flow.src, e.flow.family),
            vip: ip_of(&e.flow.dst, e.flow.family),
            proto: e.flow.proto,
            sport: u16::from_be(e.flow.sport),
            dport: u16::from_be(e.flow.dport),
            every_port: key.port == 0,
            backend: ip_of(&backend.addr, backend.family),
            closing: e.flags & sync_event_flags::CLOSING != 0,
        })
    }

    /// Writes a peer's flow into this node's connection table, stamped `now` (the table's
    /// clock), as this node's program would record it: same set, same slot, this node's ids.
    /// When the flow's slot is unchanged here and names another backend, the slot is marked
    /// changed first, its unrecorded flows still on its current backend (`old` = current), so
    /// nothing but this flow moves; the scanner clears it once no live record needs it.
    pub fn adopt_peer_flow(&mut self, f: &PeerFlow, now: u32) -> Result<Adopted> {
        let family = crate::state::family(f.vip);
        if crate::state::family(f.client) != family {
            return Ok(Adopted::Unknown);
        }
        let flow = FlowKey {
            src: to_addr(f.client),
            dst: to_addr(f.vip),
            sport: f.sport.to_be(),
            dport: f.dport.to_be(),
            proto: f.proto,
            family,
            _pad: [0; 2],
        };
        let service_key = ServiceKey {
            addr: flow.dst,
            port: if f.every_port { 0 } else { flow.dport },
            proto: flow.proto,
            family,
        };
        let Some(service) = self.shadow.services.get(&service_key).copied() else {
            return Ok(Adopted::Unknown);
        };
        let backend_addr = to_addr(f.backend);
        let Some(backend) = self
            .shadow
            .backends
            .iter()
            .find(|(_, b)| b.service == service.id && b.addr == backend_addr)
            .map(|(id, _)| *id)
        else {
            return Ok(Adopted::Unknown);
        };
        let config = self.shadow.config;
        let Some(slot) = maglev_slot(&config.hash_key, &service, &flow).map(|s| s.index) else {
            return Ok(Adopted::Unknown);
        };
        let Some(slots) = self.slots.get_mut(&service.id) else {
            return Ok(Adopted::Unknown);
        };
        let Some(&hot) = slots.table.hot.get(slot as usize) else {
            return Ok(Adopted::Unknown);
        };
        let newly_changed = !hot.changed();
        if newly_changed && hot.current() == backend {
            return Ok(Adopted::AlreadyThere);
        }
        // The record first, then the slot: a packet that sees the slot changed finds it.
        let hash = lb_common::hash::flow_hash(&config.hash_key, &flow);
        let mut flags = if f.proto == PROTO_UDP {
            record_flags::UDP
        } else {
            0
        };
        if f.closing {
            flags |= record_flags::CLOSING;
        }
        let record = Record::new(hash, backend, service.id, slot, flags, now);
        let sets = config.flow_set_mask as usize + 1;
        let memory = ArrayMemory::map(
            self.maps.conntrack.map(),
            sets * size_of::<RecordSet>(),
            true,
        )
        .map_err(io_err("mapping CONNTRACK"))?;
        let index = (hash as u32 & config.flow_set_mask) as usize;
        let set: RecordSet = memory.read(index);
        let (found, victim) = set.place(hash, service.id, slot, now);
        let way = index * lb_common::FLOW_WAYS + found.unwrap_or(victim);
        memory.write(way, record);
        if !newly_changed {
            return Ok(Adopted::Recorded);
        }
        let s = slot as usize;
        slots.table.hot[s] = Hot::new(hot.current(), true);
        slots.table.side[s] = Side::new(hot.current(), true);
        slots.table.changed_at[s] = slot_seconds();
        slots.table.quiet[s] = 0;
        let w = s / lb_common::MAGLEV_SLOTS_PER_WORD as usize;
        let half = half_words(slots.table.hot.len() as u32) as usize;
        slots.write_word(half + w, slots.table.side_word(w));
        slots.write_word(w, slots.table.hot_word(w));
        // A scan taken before this saw the slot unchanged: it must not be used to clear it.
        self.slot_generation += 1;
        Ok(Adopted::RecordedOnNewlyChangedSlot)
    }
}

/// An address as the data path stores it, back as an `IpAddr`.
pub fn ip_of(addr: &lb_common::Addr, family: u8) -> IpAddr {
    let bytes = |i: usize| addr[i].to_ne_bytes();
    if family == lb_common::FAMILY_V6 {
        let mut o = [0u8; 16];
        for i in 0..4 {
            o[i * 4..i * 4 + 4].copy_from_slice(&bytes(i));
        }
        IpAddr::from(o)
    } else {
        IpAddr::from(bytes(0))
    }
}
