//! Connection state shared with other lb nodes (lbd's sync threads): the program's reports of the
//! records it writes, turned into addresses, and a peer's flows written into this node's
//! connection table, in this node's ids.

use std::net::IpAddr;

use aya::maps::{IterableMap as _, MapData, RingBuf};
use lb_common::{
    FlowKey, PROTO_UDP, Record, RecordSet, ServiceKey, ServiceValue, SyncEvent, maglev_slot,
    slotstate::record_flags, sync_event_flags,
};

use super::{
    Datapath,
    error::{Result, io_err},
    slots::slot_seconds,
    sys::ArrayMemory,
};
use crate::state::{family, from_addr, to_addr};

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
    /// The port the backend serves on (host order), given only when the backend's service has
    /// its address more than once (one host serving a `nat` service on several ports): the
    /// address alone names every other backend, as it did before ports named backends.
    pub backend_port: Option<u16>,
    pub closing: bool,
}

/// What became of a peer's flow here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adopted {
    /// Recorded: this node's next packet of the flow goes to the peer's backend (its slot,
    /// when unchanged here, marked changed so the record is read: the peer saw a backend
    /// change this node has not made, or made differently).
    Recorded,
    /// Nothing to write: its slot is unchanged here and already names that backend.
    AlreadyThere,
    /// This node has no such service or backend (a flow of a service that differs between
    /// the nodes is not this node's to decide).
    Unknown,
    /// Its set of the connection table holds only this node's established flows' records:
    /// a peer's flow does not push one out.
    NoRoom,
}

impl Datapath {
    /// Takes the program's reports of the records it writes (once: the sync thread reads them).
    pub fn take_sync_events(&mut self) -> Option<RingBuf<MapData>> {
        self.maps.sync_events.take()
    }

    /// The ring buffer of a trace's packets (`lb_common::TraceEvent`), for one trace at a time;
    /// `None` while a trace has it. Given back with `give_back_trace_events`.
    pub fn take_trace_events(&mut self) -> Option<RingBuf<MapData>> {
        self.maps.trace_events.take()
    }

    pub fn give_back_trace_events(&mut self, events: RingBuf<MapData>) {
        self.maps.trace_events = Some(events);
    }

    /// A reported record in terms another node understands (addresses, not ids); `None` when
    /// its service or backend is not (or no longer) in the maps.
    pub fn describe_event(&self, e: &SyncEvent) -> Option<PeerFlow> {
        let service = self.shadow.service_by_id.get(&e.service)?;
        let backend = self.shadow.backends.get(&e.backend)?;
        if backend.service != e.service {
            return None;
        }
        let repeated =
            self.shadow.backends.iter().any(|(&id, o)| {
                id != e.backend && o.service == e.service && o.addr == backend.addr
            });
        Some(PeerFlow {
            client: from_addr(&e.flow.src, e.flow.family),
            vip: from_addr(&e.flow.dst, e.flow.family),
            proto: e.flow.proto,
            sport: u16::from_be(e.flow.sport),
            dport: u16::from_be(e.flow.dport),
            every_port: service.key.port == 0,
            backend: from_addr(&backend.addr, backend.family),
            backend_port: repeated.then(|| u16::from_be(backend.port)),
            closing: e.flags & sync_event_flags::CLOSING != 0,
        })
    }

    /// Writes peers' flows into this node's connection table, stamped `now` (the table's
    /// clock), as this node's program would record them: same set, same slot, this node's
    /// ids. What became of each. When a flow's slot is unchanged here and names another
    /// backend, the slot is marked changed first with its current backend as the previous one
    /// (`SlotTable::mark_changed`), so nothing but that flow moves; the scanner clears it once
    /// no live record needs it.
    pub fn adopt_peer_flows(&mut self, flows: &[PeerFlow], now: u32) -> Result<Vec<Adopted>> {
        let config = self.shadow.config;
        let sets = config.flow_set_mask as usize + 1;
        let memory = ArrayMemory::map(
            self.maps.conntrack.map(),
            sets * size_of::<RecordSet>(),
            true,
        )
        .map_err(io_err("mapping CONNTRACK"))?;
        let mut marked = false;
        let adopted = flows
            .iter()
            .map(|f| {
                let Some((flow, service, backend)) = self.place_of(f) else {
                    return Adopted::Unknown;
                };
                let Some(slot) = maglev_slot(&config.hash_key, &service, &flow).map(|s| s.index)
                else {
                    return Adopted::Unknown;
                };
                let Some(slots) = self.slots.get_mut(&service.id) else {
                    return Adopted::Unknown;
                };
                let Some(&hot) = slots.table.hot.get(slot as usize) else {
                    return Adopted::Unknown;
                };
                if !hot.changed() && hot.current() == backend {
                    return Adopted::AlreadyThere;
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
                let index = (hash as u32 & config.flow_set_mask) as usize;
                let set: RecordSet = memory.read(index);
                let (_, Some(way)) = set.place(hash, service.id, slot, now, &config.eviction)
                else {
                    return Adopted::NoRoom;
                };
                // Confirmed, as it was on the peer that sent it (only confirmed records travel).
                memory.write(
                    index * lb_common::FLOW_WAYS + way,
                    Record::new(hash, backend, service.id, slot, flags, now),
                );
                if !hot.changed() {
                    slots.table.mark_changed(slot as usize, slot_seconds());
                    slots.write_slot(slot as usize);
                    marked = true;
                }
                Adopted::Recorded
            })
            .collect();
        if marked {
            // A scan taken before saw those slots unchanged: it must not be used to clear them.
            self.slot_generation += 1;
        }
        Ok(adopted)
    }

    /// A peer's flow in this node's terms: its key, its service here, its backend's id here;
    /// `None` when this node has no such service or backend.
    fn place_of(&self, f: &PeerFlow) -> Option<(FlowKey, ServiceValue, u32)> {
        let af = family(f.vip);
        if family(f.client) != af {
            return None;
        }
        let flow = FlowKey {
            src: to_addr(f.client),
            dst: to_addr(f.vip),
            sport: f.sport.to_be(),
            dport: f.dport.to_be(),
            proto: f.proto,
            family: af,
            _pad: [0; 2],
        };
        let service = *self.shadow.services.get(&ServiceKey {
            addr: flow.dst,
            port: if f.every_port { 0 } else { flow.dport },
            proto: flow.proto,
            family: af,
        })?;
        // The backend at that address (and port, when the peer gave one): one only, else the
        // nodes' backends differ and the flow is not this node's to place.
        let backend_addr = to_addr(f.backend);
        let mut at = self.shadow.backends.iter().filter(|(_, b)| {
            b.service == service.id
                && b.addr == backend_addr
                && f.backend_port.is_none_or(|p| b.port == p.to_be())
        });
        let (&backend, _) = at.next()?;
        if at.next().is_some() {
            return None;
        }
        Some((flow, service, backend))
    }
}
