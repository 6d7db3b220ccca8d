//! Per-slot state: "per-packet state only where the backend set changed" (issue 12). The XDP
//! program and lbd share it: the layout of a service's Maglev array, the connection table's
//! records, the per-packet choice (`decide`) and lbd's bookkeeping (`SlotTable`, `pins`).
//! docs/design/slot-state.md is the design; its tests (`slotstate/tests.rs`) prove the
//! guarantees on simulated tables.
//!
//! - Each Maglev slot has a *hot* half (16 bits, four to a word, read by every packet): the
//!   current backend and a `CHANGED` bit; and a *side* half (16 bits, read only when `CHANGED`):
//!   the backend of the slot's *unrecorded* flows (`old`) and `ADOPT_UDP`.
//! - A packet on an unchanged slot goes to the current backend: no connection-table access.
//! - On a changed slot the connection table decides (`decide`): a SYN takes the current backend
//!   and is recorded; a recorded flow follows its record; an unrecorded one is older than the
//!   change and goes to `old` (recorded then).
//! - Records (`Record`, the proposed connection-table entry) name their slot, so lbd sees from
//!   the mapped table which changed slots a live flow still needs (`pins`), and clears the others
//!   (`SlotTable::clear`).

use crate::NO_BACKEND;

/// A slot's backend in 15 bits (`MAX_BACKENDS` is 2^14): this value is "no backend".
pub const SLOT_NONE: u16 = 0x7fff;
/// Hot half: the slot's backend changed and a live flow may still need another one.
pub const SLOT_CHANGED: u16 = 0x8000;
/// Side half: an unrecorded UDP flow on this slot is taken as older than the change.
pub const SIDE_ADOPT_UDP: u16 = 0x8000;
/// Slots per 64-bit word of either half.
pub const SLOTS_PER_WORD: u32 = crate::MAGLEV_SLOTS_PER_WORD;
/// Side half's `old` for "the unrecorded flows of this slot belong to the VIP's every-port
/// service": the slots of an exact-port service created while its VIP had an every-port one,
/// whose connections in progress on that port must stay with it. No backend id (they are
/// below `MAX_BACKENDS`, 2^14) has this value.
pub const DEFER: u32 = 0x7ffe;

#[inline(always)]
const fn to16(id: u32) -> u16 {
    if id == NO_BACKEND {
        SLOT_NONE
    } else {
        (id & 0x7fff) as u16
    }
}

#[inline(always)]
const fn to32(v: u16) -> u32 {
    let id = v & 0x7fff;
    if id == SLOT_NONE {
        NO_BACKEND
    } else {
        id as u32
    }
}

/// The hot half of a slot: current backend (bits 0-14), `SLOT_CHANGED` (bit 15).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hot(pub u16);

impl Hot {
    #[inline(always)]
    pub const fn new(current: u32, changed: bool) -> Hot {
        Hot(to16(current) | if changed { SLOT_CHANGED } else { 0 })
    }
    /// The backend new flows take (`NO_BACKEND`: none).
    #[inline(always)]
    pub const fn current(self) -> u32 {
        to32(self.0)
    }
    #[inline(always)]
    pub const fn changed(self) -> bool {
        self.0 & SLOT_CHANGED != 0
    }
}

/// The side half of a slot: the backend of its unrecorded flows (bits 0-14), `SIDE_ADOPT_UDP`.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Side(pub u16);

impl Side {
    pub const NONE: Side = Side(SLOT_NONE);
    #[inline(always)]
    pub const fn new(old: u32, adopt_udp: bool) -> Side {
        Side(to16(old) | if adopt_udp { SIDE_ADOPT_UDP } else { 0 })
    }
    #[inline(always)]
    pub const fn old(self) -> u32 {
        to32(self.0)
    }
    #[inline(always)]
    pub const fn adopt_udp(self) -> bool {
        self.0 & SIDE_ADOPT_UDP != 0
    }
}

/// Words of one half of a table of `table_size` slots. A service's inner array holds the hot
/// words, then as many side words: the side half of `slot` is in word `hot_words + slot / 4`.
#[inline(always)]
pub const fn half_words(table_size: u32) -> u32 {
    table_size.div_ceil(SLOTS_PER_WORD)
}

/// The 16-bit lane of `slot` in its word.
#[inline(always)]
pub const fn lane(word: u64, slot: u32) -> u16 {
    (word >> ((slot % SLOTS_PER_WORD) * 16)) as u16
}

/// Flags of a record (bits of `Record::ids` above the backend and service).
pub mod record_flags {
    /// A UDP flow: live while seen within `Limits::udp_idle`.
    pub const UDP: u32 = 1 << 22;
    /// A TCP flow the client sent FIN or RST on: live for `Limits::close_grace` after that.
    pub const CLOSING: u32 = 1 << 23;
    /// A flow seen once (a SYN, or the first packet of an unrecorded flow): live while seen
    /// within `Limits::udp_idle`, and never makes room for by a record that is not tentative
    /// itself (`Eviction`). Its next packet confirms it (clears the flag). A spoofed flood sends
    /// each flow's first packet only, so its records stay tentative and cannot push out the
    /// records of established flows.
    pub const TENTATIVE: u32 = 1 << 24;
}

/// An entry of the connection table (16 bytes, four to a 64-byte set): a flow's backend, of
/// which service, on which Maglev slot (so lbd can tell which changed slots live flows still
/// need), and when it was last seen. Only flows on changed slots have one.
///
/// `check` is the high half of the flow's 64-bit hash (the low bits chose the set) XOR a mix of
/// `ids` and `place`; `place` holds the slot and 12 more bits of the hash (bits 20-31, above
/// the default table's 18 set bits). An entry belongs to a flow when its check and hash bits
/// match and its service and slot are the packet's: 44 bits of the hash beyond the set index,
/// so another connection of the same client (same slot) matches by a 2^-44 chance per way. An
/// entry torn by two writers (one's ids, the other's check) matches neither flow but by a 2^-32
/// chance, and then only a flow of the same service and slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub check: u32,
    /// Backend id (bits 0-13), service id (bits 14-21), `record_flags`.
    pub ids: u32,
    /// The Maglev slot of the flow in its service's table (bits 0-19: `MAX_TABLE_SIZE` < 2^20),
    /// and in bits 20-31 the same bits of the flow's hash.
    pub place: u32,
    /// The table's clock when the flow was last seen, never 0 in a used entry.
    pub seen: u32,
}

#[inline(always)]
const fn mix(ids: u32, place: u32) -> u32 {
    ((((ids as u64) << 32) | place as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32
}

/// Bits of `Record::place` that hold the slot.
const PLACE_SLOT: u32 = (1 << 20) - 1;

/// A record's `place`: the slot and bits 20-31 of the flow's hash.
#[inline(always)]
const fn place_of(hash: u64, slot: u32) -> u32 {
    (slot & PLACE_SLOT) | (hash as u32 & !PLACE_SLOT)
}

impl Record {
    #[inline(always)]
    pub const fn ids_of(backend: u32, service: u32, flags: u32) -> u32 {
        (backend & 0x3fff) | (service & 0xff) << 14 | flags
    }

    #[inline(always)]
    pub const fn new(
        hash: u64,
        backend: u32,
        service: u32,
        slot: u32,
        flags: u32,
        seen: u32,
    ) -> Record {
        let ids = Self::ids_of(backend, service, flags);
        let place = place_of(hash, slot);
        Record {
            check: (hash >> 32) as u32 ^ mix(ids, place),
            ids,
            place,
            seen,
        }
    }

    /// How readily this entry makes room for a new record at `now`: 0 not at all (a record
    /// alive by its kind's `Eviction` limit), else the larger the older (a free entry's the
    /// largest). Two branches: in the XDP program every branch here, four ways over,
    /// multiplies the verifier's paths.
    #[inline(always)]
    fn room_rank(&self, now: u32, limits: &Eviction) -> u64 {
        if self.seen == 0 {
            return u64::MAX;
        }
        let age = now.wrapping_sub(self.seen);
        if age < limits.ticks[((self.ids >> 22) & 7) as usize] {
            return 0;
        }
        age as u64 + 1
    }

    /// Whether this entry is the flow of `hash`, of `service`, on `slot`.
    #[inline(always)]
    pub const fn belongs_to(&self, hash: u64, service: u32, slot: u32) -> bool {
        self.seen != 0
            && self.place == place_of(hash, slot)
            && self.service() == service
            && self.check == (hash >> 32) as u32 ^ mix(self.ids, self.place)
    }

    /// What the record says about its flow.
    #[inline(always)]
    pub const fn value(&self) -> crate::FlowValue {
        crate::FlowValue {
            backend: self.backend(),
            service: self.service(),
        }
    }

    /// The flow's Maglev slot.
    #[inline(always)]
    pub const fn slot(&self) -> u32 {
        self.place & PLACE_SLOT
    }

    #[inline(always)]
    pub const fn backend(&self) -> u32 {
        self.ids & 0x3fff
    }
    #[inline(always)]
    pub const fn service(&self) -> u32 {
        (self.ids >> 14) & 0xff
    }
    #[inline(always)]
    pub const fn flags(&self) -> u32 {
        self.ids & (record_flags::UDP | record_flags::CLOSING | record_flags::TENTATIVE)
    }

    #[inline(always)]
    pub const fn tentative(&self) -> bool {
        self.ids & record_flags::TENTATIVE != 0
    }

    /// Whether lbd must take this record as a flow that may still send, at clock `now`. A TCP
    /// record lives as long as it is in the table (however long it was idle: its age is never
    /// read); a UDP or tentative one while seen within `udp_idle`, a closing one within
    /// `close_grace`. Ages count modulo the clock's wrap, so a wrap can only make a dead record
    /// look alive (its slot stays changed a little longer), never a live one (seen within the
    /// limit) look dead.
    pub const fn live(&self, now: u32, limits: &Limits) -> bool {
        self.alive(now, limits.udp_idle, limits.close_grace)
    }

    /// `live` with the two limits it reads (the program has them from `Config`).
    #[inline(always)]
    pub const fn alive(&self, now: u32, udp_idle: u32, close_grace: u32) -> bool {
        if self.seen == 0 {
            return false;
        }
        let age = now.wrapping_sub(self.seen);
        if self.ids & record_flags::CLOSING != 0 {
            age < close_grace
        } else if self.ids & (record_flags::UDP | record_flags::TENTATIVE) != 0 {
            age < udp_idle
        } else {
            true
        }
    }
}

/// Entries per set of the connection table.
pub const RECORD_WAYS: usize = crate::FLOW_WAYS;

/// How long a record of each kind keeps its way from a new record, in table clock ticks,
/// indexed by its flags (`record_flags` shifted down by 22: UDP 1, CLOSING 2, TENTATIVE 4). A
/// record unseen for at least its kind's limit may make room, the least recently seen first.
/// The program reads it from `Config`, lbd builds it from its limits (`Eviction::new`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Eviction {
    pub ticks: [u32; 8],
}

impl Eviction {
    /// A confirmed TCP record keeps its way while seen within `stale` (lbd's idle hold: a
    /// connection idle that long without a keepalive has most likely gone), a confirmed UDP
    /// one within `udp_idle`, a closing one within `close_grace`, a tentative one within
    /// `handshake`: long enough for a real client's SYN to see its ACK before a flood's SYNs may
    /// take its way (its ACK would otherwise find no record and go to the slot's previous
    /// backend), short enough that a flood's records soon make room again.
    pub const fn new(udp_idle: u32, close_grace: u32, stale: u32, handshake: u32) -> Eviction {
        let mut ticks = [handshake; 8];
        ticks[0] = stale;
        ticks[1] = udp_idle;
        ticks[2] = close_grace;
        ticks[3] = close_grace;
        Eviction { ticks }
    }
}

/// A flow as `RecordSet::apply` writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowAt {
    /// `hash::flow_hash` of its 5-tuple.
    pub hash: u64,
    pub service: u32,
    pub slot: u32,
    /// The table's clock.
    pub now: u32,
    /// `record_flags::UDP` for a UDP flow, else 0.
    pub udp: u32,
    /// The packet is a TCP SYN: what it records stays tentative.
    pub syn: bool,
}

/// In what `RecordSet::apply` returns: a record was written.
pub const RECORDED: u32 = 1 << 31;

/// One set of the connection table (`CONNTRACK`, an array indexed by `flow_hash &
/// Config::flow_set_mask`): one cache line. A flow is looked for in its set only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordSet {
    pub ways: [Record; RECORD_WAYS],
}

impl RecordSet {
    /// The way holding the flow's record, if any, and the way a new record may take (`None`:
    /// none, the flow is not recorded): a free way, else the least recently seen of the
    /// records unseen past their kind's `Eviction` limit (a tentative one's is short), ages
    /// counted across the clock's wrap. So a tentative record (a flood's) never takes the way
    /// of a confirmed one that is alive. The program and lbd choose alike through this.
    #[inline(always)]
    pub fn place(
        &self,
        hash: u64,
        service: u32,
        slot: u32,
        now: u32,
        limits: &Eviction,
    ) -> (Option<usize>, Option<usize>) {
        let mut victim = None;
        let mut best = 0u64;
        let mut i = 0;
        while i < RECORD_WAYS {
            let e = &self.ways[i];
            if e.belongs_to(hash, service, slot) {
                return (Some(i), Some(i));
            }
            let rank = e.room_rank(now, limits);
            if rank > best {
                best = rank;
                victim = Some(i);
            }
            i += 1;
        }
        (None, victim)
    }

    /// Carries out `write` for `flow` on way `way` (the flow's own record when `found`, else
    /// the way `place` gave). A record written anew, or by a SYN, is `TENTATIVE`; one written
    /// over the flow's own entry, or touched, is confirmed. Returns the record's flags with
    /// `RECORDED` added when a record was written (a flow recorded, moved to another backend,
    /// confirmed or marked closing), 0 when nothing was or only its stamp. `check` is written
    /// last: until then the entry belongs to no flow. The program and lbd write alike through
    /// this.
    #[inline(always)]
    pub fn apply(&mut self, write: Write, way: usize, found: bool, flow: &FlowAt) -> u32 {
        let e = &mut self.ways[way % RECORD_WAYS];
        let was_closing = e.ids & record_flags::CLOSING != 0;
        let (backend, closing, tentative) = match write {
            Write::Nothing => return 0,
            Write::Touch { closing } => {
                if !e.tentative() && (was_closing || !closing) {
                    // A store only when the coarse clock has moved.
                    if e.seen != flow.now {
                        e.seen = flow.now;
                    }
                    return 0;
                }
                (e.backend(), closing || was_closing, false)
            }
            Write::Record { backend, closing } => (backend, closing, !found || flow.syn),
        };
        let flags = flow.udp
            | if closing { record_flags::CLOSING } else { 0 }
            | if tentative {
                record_flags::TENTATIVE
            } else {
                0
            };
        let r = Record::new(flow.hash, backend, flow.service, flow.slot, flags, flow.now);
        if e.ids == r.ids && e.check == r.check && e.place == r.place {
            if e.seen != r.seen {
                e.seen = r.seen;
            }
            return 0;
        }
        e.ids = r.ids;
        e.place = r.place;
        e.seen = r.seen;
        e.check = r.check;
        flags | RECORDED
    }

    /// The way of the record of the flow of `hash`, of `service`, on `slot`, if the set has one.
    pub fn find_way(&self, hash: u64, service: u32, slot: u32) -> Option<usize> {
        self.ways
            .iter()
            .position(|e| e.belongs_to(hash, service, slot))
    }

    /// The record of the flow of `hash`, of `service`, on `slot`, if the set has one.
    #[inline(always)]
    pub fn find(&self, hash: u64, service: u32, slot: u32) -> Option<&Record> {
        self.ways.iter().find(|e| e.belongs_to(hash, service, slot))
    }
}

/// lbd's default `idle_hold` (`daemon.idle_hold_s`): 2 h 30 min, past Linux's first TCP
/// keepalive probe (7,200 s idle), so a connection with keepalives on is recorded within the
/// hold.
pub const DEFAULT_IDLE_HOLD_S: u64 = 9_000;

/// What lbd's clearing and the records' liveness go by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Table clock ticks a UDP record lives unseen.
    pub udp_idle: u32,
    /// Table clock ticks a closing TCP record lives unseen.
    pub close_grace: u32,
    /// lbd seconds after a slot's first change during which an unrecorded UDP flow is taken as
    /// older than the change (`SIDE_ADOPT_UDP`).
    pub udp_adopt: u64,
    /// lbd seconds after a slot's first change during which its unrecorded flows (idle since
    /// before the change) keep `old`, records or not. `u64::MAX`: for as long as `old` is
    /// usable.
    pub idle_hold: u64,
}

/// What the packet is, as far as the choice goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// TCP SYN (without ACK): a new connection.
    Syn,
    /// Any other TCP packet.
    Tcp,
    /// TCP FIN or RST from the client.
    TcpClosing,
    Udp,
    /// An ICMP error quoting a flow: follows it, never records.
    IcmpError,
}

/// The backends as the choice sees them.
pub trait Backends {
    /// Filled in, not down, of this service: a record naming it is honoured.
    fn usable(&self, id: u32) -> bool;
}

/// What the choice writes into the connection table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    Nothing,
    /// Mark the flow's record seen (with `CLOSING` added when `closing`), and confirmed: its
    /// `TENTATIVE` flag cleared.
    Touch {
        closing: bool,
    },
    /// Record the flow on `backend`: over its own entry if it has one (confirmed then: the flow
    /// was seen before), else in the way `RecordSet::place` gave (`TENTATIVE`).
    Record {
        backend: u32,
        closing: bool,
    },
}

/// The choice for one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The backend (`NO_BACKEND`: none, the packet is dropped and counted).
    pub backend: u32,
    pub write: Write,
}

/// The backend of a packet of `kind` on a slot whose hot half is `hot`. `side` reads the slot's
/// side half and `lookup` the connection table (the backend the flow's record names, if any):
/// both are called only when the slot is changed, so a packet on an unchanged slot touches
/// neither the side half nor the table. `room` says whether a flow without a record may have
/// one now (a way to take, and the new-flow rate allows it); it is asked once at most, and only
/// for such a flow. A flow that gets none goes where its packets without a record will keep
/// going: a SYN too, so a new connection is never split between two backends (it takes the
/// slot's previous backend, as a connection older than the change would). `DEFER` (nothing
/// written): an unrecorded flow of a slot whose `old` is `DEFER`; the caller decides it again
/// by the VIP's every-port service, or by `current` when there is none.
#[inline(always)]
pub fn decide<B: Backends>(
    hot: Hot,
    side: impl FnOnce() -> Side,
    kind: Kind,
    lookup: impl FnOnce() -> Option<u32>,
    room: impl FnOnce() -> bool,
    backends: &B,
) -> Decision {
    let current = hot.current();
    if !hot.changed() {
        return Decision {
            backend: current,
            write: Write::Nothing,
        };
    }
    let closing = kind == Kind::TcpClosing;
    let record = |backend: u32| Decision {
        backend,
        write: if backend == NO_BACKEND || kind == Kind::IcmpError {
            Write::Nothing
        } else {
            Write::Record { backend, closing }
        },
    };
    let found = lookup();
    match found {
        // A SYN takes the current backend over its own (older) record.
        Some(_) if kind == Kind::Syn => record(current),
        Some(b) if backends.usable(b) => Decision {
            backend: b,
            write: if kind == Kind::IcmpError {
                Write::Nothing
            } else {
                Write::Touch { closing }
            },
        },
        // Its backend went away (down, removed, another service's now): rehashed.
        Some(_) => record(current),
        None => {
            if kind == Kind::Syn {
                // No backend takes new connections: none is recorded, none goes to `old`.
                if current == NO_BACKEND || room() {
                    return record(current);
                }
                return unrecorded(hot, side, kind, || false, backends);
            }
            unrecorded(hot, side, kind, room, backends)
        }
    }
}

/// The backend of a flow without a record on a changed slot, recorded when `room` allows (a SYN
/// that got no room comes here with a `room` that says no).
#[inline(always)]
fn unrecorded<B: Backends>(
    hot: Hot,
    side: impl FnOnce() -> Side,
    kind: Kind,
    room: impl FnOnce() -> bool,
    backends: &B,
) -> Decision {
    let current = hot.current();
    let side = side();
    let older = kind != Kind::Udp || side.adopt_udp();
    let old = side.old();
    let backend = if older && old == DEFER {
        // Decided again by the every-port service (its `decide`, its records).
        return Decision {
            backend: DEFER,
            write: Write::Nothing,
        };
    } else if older && old != NO_BACKEND && backends.usable(old) {
        old
    } else {
        current
    };
    let recordable = backend != NO_BACKEND && kind != Kind::IcmpError && room();
    if recordable {
        Decision {
            backend,
            write: Write::Record {
                backend,
                closing: kind == Kind::TcpClosing,
            },
        }
    } else {
        Decision {
            backend,
            write: Write::Nothing,
        }
    }
}

/// The backend of a later fragment (no ports, so no flow hash) whose datagram left no entry in
/// `FRAGS`: where an unrecorded flow of its protocol on its slot goes. Right on an unchanged
/// slot; on a changed one it can miss a flow recorded elsewhere (as today's choice can after a
/// change).
#[inline(always)]
pub fn later_fragment<B: Backends>(
    hot: Hot,
    side: impl FnOnce() -> Side,
    udp: bool,
    backends: &B,
) -> u32 {
    let kind = if udp { Kind::Udp } else { Kind::Tcp };
    match decide(hot, side, kind, || None, || false, backends).backend {
        DEFER => hot.current(),
        b => b,
    }
}

#[cfg(any(feature = "user", test))]
pub use table::{QUIET_SCANS, SlotTable, pins};

#[cfg(any(feature = "user", test))]
mod table {
    use super::*;

    /// Consecutive scans that must find a changed slot clearable before lbd clears it: a record
    /// being written while lbd reads it may be missed by one scan, not by two.
    pub const QUIET_SCANS: u8 = 2;

    /// lbd's view of a service's slot state: both halves and, per slot, when it last went from
    /// unchanged to changed (lbd's clock, seconds) and how many scans in a row found it
    /// clearable (neither is in the map).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct SlotTable {
        pub hot: Vec<Hot>,
        pub side: Vec<Side>,
        pub changed_at: Vec<u64>,
        pub quiet: Vec<u8>,
    }

    impl SlotTable {
        /// The first table of a service (or one after a resize): nothing changed.
        pub fn fresh(table: &[u32]) -> SlotTable {
            SlotTable {
                hot: table.iter().map(|&b| Hot::new(b, false)).collect(),
                side: vec![Side::NONE; table.len()],
                changed_at: vec![0; table.len()],
                quiet: vec![0; table.len()],
            }
        }

        /// The first table of an exact-port service created while its VIP has an every-port
        /// service, at `now`: every slot changed, its unrecorded flows the every-port
        /// service's (`DEFER`; for UDP while `ADOPT_UDP` lasts), so connections in progress on
        /// the port stay where they are.
        pub fn deferring(table: &[u32], now: u64) -> SlotTable {
            SlotTable {
                hot: table.iter().map(|&b| Hot::new(b, true)).collect(),
                side: vec![Side::new(DEFER, true); table.len()],
                changed_at: vec![now; table.len()],
                quiet: vec![0; table.len()],
            }
        }

        /// The state read back from a service's array (`words`, both halves) of `table_size`
        /// slots, as a restarted lbd adopts it: every changed slot's hold starts again at `now`
        /// (lbd keeps no times across restarts: the conservative choice). `None` when `words`
        /// is not the array of such a table.
        pub fn from_words(words: &[u64], table_size: u32, now: u64) -> Option<SlotTable> {
            let half = half_words(table_size) as usize;
            if words.len() != 2 * half {
                return None;
            }
            let n = table_size as usize;
            let lanes = |base: usize| {
                (0..n).map(move |s| lane(words[base + s / SLOTS_PER_WORD as usize], s as u32))
            };
            let hot: Vec<Hot> = lanes(0).map(Hot).collect();
            let changed_at = hot
                .iter()
                .map(|h| if h.changed() { now } else { 0 })
                .collect();
            Some(SlotTable {
                hot,
                side: lanes(half).map(Side).collect(),
                changed_at,
                quiet: vec![0; n],
            })
        }

        /// The Maglev table: each slot's current backend.
        pub fn current(&self) -> Vec<u32> {
            self.hot.iter().map(|h| h.current()).collect()
        }

        /// The state after the Maglev table becomes `table` (same size) at `now`. A slot whose
        /// backend changes becomes changed, its unrecorded flows still the old backend's; a slot
        /// changed already keeps its `old`, `ADOPT_UDP` and first change time: the flows that
        /// began since were recorded (SYNs, UDP after the window), so the unrecorded ones are
        /// still those from before the first change.
        pub fn rebuilt(&self, table: &[u32], now: u64) -> SlotTable {
            assert_eq!(table.len(), self.hot.len(), "a resize starts a fresh table");
            let mut next = self.clone();
            for (s, &b) in table.iter().enumerate() {
                let hot = self.hot[s];
                if hot.changed() {
                    next.hot[s] = Hot::new(b, true);
                    next.quiet[s] = 0;
                } else if hot.current() != b {
                    next.mark_changed(s, now);
                    next.hot[s] = Hot::new(b, true);
                }
            }
            next
        }

        /// Marks unchanged slot `s` changed at `now` with its backend as it is: its unrecorded
        /// flows (UDP ones too, while `ADOPT_UDP` lasts) stay on that backend, whatever the slot
        /// names later, and a record on it is read.
        pub fn mark_changed(&mut self, s: usize, now: u64) {
            let current = self.hot[s].current();
            self.hot[s] = Hot::new(current, true);
            self.side[s] = Side::new(current, true);
            self.changed_at[s] = now;
            self.quiet[s] = 0;
        }

        /// Clears what lbd may at `now`: `ADOPT_UDP` once `udp_adopt` has passed; and a changed
        /// slot's state when no live record needs it (`pinned`, from `pins`) and its unrecorded
        /// flows need it no longer: `old` is the current backend, unusable, or `idle_hold` has
        /// passed, in `QUIET_SCANS` scans in a row. Time alone never clears a slot a record needs.
        pub fn clear<B: Backends>(
            &mut self,
            pinned: &[bool],
            now: u64,
            limits: &Limits,
            backends: &B,
        ) {
            for (s, &pinned) in pinned.iter().enumerate().take(self.hot.len()) {
                let hot = self.hot[s];
                if !hot.changed() {
                    continue;
                }
                let since = now.saturating_sub(self.changed_at[s]);
                let side = self.side[s];
                if side.adopt_udp() && since >= limits.udp_adopt {
                    self.side[s] = Side::new(side.old(), false);
                }
                let old = side.old();
                let unrecorded_need_old = (old == DEFER
                    || old != hot.current() && old != NO_BACKEND && backends.usable(old))
                    && since < limits.idle_hold;
                if pinned || unrecorded_need_old {
                    self.quiet[s] = 0;
                    continue;
                }
                self.quiet[s] += 1;
                if self.quiet[s] >= QUIET_SCANS {
                    self.hot[s] = Hot::new(hot.current(), false);
                    self.side[s] = Side::NONE;
                    self.quiet[s] = 0;
                }
            }
        }

        /// Slots changed now.
        pub fn changed(&self) -> usize {
            self.hot.iter().filter(|h| h.changed()).count()
        }

        /// The inner array's words: the hot half, then the side half.
        pub fn words(&self) -> Vec<u64> {
            let half = self.hot.len().div_ceil(SLOTS_PER_WORD as usize);
            let mut words: Vec<u64> = (0..half).map(|w| self.hot_word(w)).collect();
            words.extend((0..half).map(|w| self.side_word(w)));
            words
        }

        /// Word `w` of the hot half (slots `4w` to `4w + 3`; missing slots: no backend).
        pub fn hot_word(&self, w: usize) -> u64 {
            pack(w, |s| self.hot.get(s).map(|h| h.0))
        }

        /// Word `w` of the side half.
        pub fn side_word(&self, w: usize) -> u64 {
            pack(w, |s| self.side.get(s).map(|h| h.0))
        }
    }

    /// Word `w` of a half whose lanes `lane` gives (`None` past the end: `SLOT_NONE`).
    fn pack(w: usize, lane: impl Fn(usize) -> Option<u16>) -> u64 {
        let per = SLOTS_PER_WORD as usize;
        (0..per).fold(0, |word, i| {
            word | u64::from(lane(w * per + i).unwrap_or(SLOT_NONE)) << (i * 16)
        })
    }

    /// Which slots of `service` (state `table`) a live record needs at table clock `now`: one
    /// that names a usable backend other than the slot's current one. lbd reads the records
    /// through its read-only mapping of the connection table.
    pub fn pins<B: Backends>(
        sets: &[RecordSet],
        service: u32,
        table: &SlotTable,
        now: u32,
        limits: &Limits,
        backends: &B,
    ) -> Vec<bool> {
        let mut pinned = vec![false; table.hot.len()];
        for r in sets.iter().flat_map(|s| s.ways.iter()) {
            if r.service() != service || !r.live(now, limits) {
                continue;
            }
            let Some(hot) = table.hot.get(r.slot() as usize) else {
                continue;
            };
            if hot.changed() && r.backend() != hot.current() && backends.usable(r.backend()) {
                pinned[r.slot() as usize] = true;
            }
        }
        pinned
    }
}

#[cfg(test)]
mod tests;
