//! The connection table (`CONNTRACK`: flow → backend, a set-associative cache in an array) and
//! the fragments table (`FRAGS`): where a flow's and a datagram's packets go once placed.

use crate::{Addr, BPF_F_MMAPABLE, ServiceValue};

/// The flags of the connection table: lbd counts and reads it through its memory.
pub const CONNTRACK_FLAGS: u32 = BPF_F_MMAPABLE;
/// Entries per set of the connection table: a set is one 64-byte cache line.
pub const FLOW_WAYS: usize = 4;
/// Smallest connection table (entries).
pub const MIN_CONNTRACK_ENTRIES: u32 = 64;

/// Number of sets of a connection table asked to hold `entries` flows: `entries` rounded up to
/// a power of two (the set index is a mask of the flow hash, not a division), at least
/// `MIN_CONNTRACK_ENTRIES`, divided by `FLOW_WAYS`.
pub const fn conntrack_sets(entries: u32) -> u32 {
    let entries = if entries < MIN_CONNTRACK_ENTRIES {
        MIN_CONNTRACK_ENTRIES
    } else {
        entries
    };
    entries.next_power_of_two() / FLOW_WAYS as u32
}

/// A flow's 5-tuple as seen on the wire: what `hash::flow_hash` hashes for the connection table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    /// Ports in network byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// What the connection table says about a flow: the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub backend: u32,
    pub service: u32,
}

/// One entry of the connection table: a flow, known by its 64-bit keyed hash
/// (`hash::flow_hash`), and its backend.
///
/// `check` is the flow's hash XOR `ids`. An entry belongs to a flow when `check ^ hash == ids`:
/// the 64-bit hash tells flows apart (the flows of one set share the hash's low bits, the set
/// index; that two of them share the rest is a chance of 2^-46 at the default 262,144 sets),
/// and an entry torn by two CPUs writing it at once (one's `ids`, the other's `check`)
/// belongs to no flow, so it can send no flow to the wrong backend. An all-zero entry is free.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    pub check: u64,
    /// Backend id (low 16 bits) and service id (high 16 bits).
    pub ids: u32,
    /// When the flow was last seen: a coarse clock (jiffies / 64), never 0 in a used entry; the
    /// set's least recently seen entry makes room for a new flow.
    pub seen: u32,
}

impl FlowEntry {
    #[inline(always)]
    pub const fn ids_of(backend: u32, service: u32) -> u32 {
        (backend & 0xffff) | service << 16
    }

    #[inline(always)]
    pub const fn new(hash: u64, backend: u32, service: u32, seen: u32) -> FlowEntry {
        let ids = Self::ids_of(backend, service);
        FlowEntry {
            check: hash ^ ids as u64,
            ids,
            seen,
        }
    }

    /// Whether this entry is the flow of `hash`.
    #[inline(always)]
    pub const fn belongs_to(&self, hash: u64) -> bool {
        self.check ^ hash == self.ids as u64 && self.seen != 0
    }

    #[inline(always)]
    pub const fn value(&self) -> FlowValue {
        FlowValue {
            backend: self.ids & 0xffff,
            service: self.ids >> 16,
        }
    }
}

/// Value of `CONNTRACK` (an array indexed by `flow_hash & Config::flow_set_mask`): the
/// `FLOW_WAYS` entries of one set, one cache line. A flow is looked for in its set only;
/// when all of a set's entries are taken, the least recently seen one makes room.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSet {
    pub ways: [FlowEntry; FLOW_WAYS],
}

impl FlowSet {
    /// Where the flow of `hash` stands in this set at time `now` (the table's clock): the way
    /// holding its entry, if any, and the way a new entry takes — a free one, else the least
    /// recently seen (the first of equals). The program and lbd choose alike through this.
    #[inline(always)]
    pub fn place(&self, hash: u64, now: u32) -> (Option<usize>, usize) {
        place_in(&self.ways, now, |e| e.belongs_to(hash), |e| e.seen)
    }

    /// The entry of the flow of `hash`, if the set has one.
    #[inline(always)]
    pub fn find(&self, hash: u64) -> Option<&FlowEntry> {
        self.ways.iter().find(|e| e.belongs_to(hash))
    }
}

/// Where an entry stands in a set of `FLOW_WAYS` entries at time `now`: the way `belongs`
/// picks, if any, and the way a new entry takes: a free one (`seen` 0), else the least recently
/// seen (the first of equals), ages counted across the clock's wrap. The one placement of both
/// the connection table's entries and `slotstate`'s records.
#[inline(always)]
pub(crate) fn place_in<E>(
    ways: &[E; FLOW_WAYS],
    now: u32,
    belongs: impl Fn(&E) -> bool,
    seen: impl Fn(&E) -> u32,
) -> (Option<usize>, usize) {
    let mut victim = 0;
    let mut oldest = 0u32;
    let mut i = 0;
    while i < FLOW_WAYS {
        let e = &ways[i];
        if belongs(e) {
            return (Some(i), i);
        }
        let age = if seen(e) == 0 {
            u32::MAX
        } else {
            now.wrapping_sub(seen(e))
        };
        if age > oldest {
            oldest = age;
            victim = i;
        }
        i += 1;
    }
    (None, victim)
}

/// Key of `FRAGS`: one fragmented datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: Addr,
    pub dst: Addr,
    /// The IP identification (IPv4: 16 bits, IPv6: the fragment header's 32 bits).
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Value of `FRAGS`: where the datagram's first fragment went, so the others follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    pub backend: u32,
    pub service: ServiceValue,
}

#[cfg(test)]
mod flow_tests {
    use super::*;

    #[test]
    fn conntrack_sets_round_up_to_a_power_of_two() {
        assert_eq!(conntrack_sets(1_048_576), 262_144);
        assert_eq!(conntrack_sets(1_000_000), 262_144);
        assert_eq!(conntrack_sets(65_536), 16_384);
        assert_eq!(conntrack_sets(1), 16);
        assert_eq!(conntrack_sets(1 << 27), 1 << 25);
    }

    #[test]
    fn a_new_flow_takes_a_free_way_else_the_least_recently_seen() {
        let mut set = FlowSet::default();
        set.ways[0] = FlowEntry::new(10, 1, 0, 100);
        set.ways[2] = FlowEntry::new(12, 1, 0, 90);
        assert_eq!(set.place(10, 101), (Some(0), 0));
        assert_eq!(set.place(99, 101), (None, 1), "the first free way");
        set.ways[1] = FlowEntry::new(11, 1, 0, 95);
        set.ways[3] = FlowEntry::new(13, 1, 0, 100);
        assert_eq!(set.place(99, 101), (None, 2), "seen longest ago");
        // Ages count across the clock's wrap: a stamp from just before it is the oldest.
        set.ways[2].seen = u32::MAX - 5;
        set.ways[1].seen = 3;
        assert_eq!(set.place(99, 101), (None, 2));
    }

    #[test]
    fn an_entry_belongs_to_its_flow_only() {
        let e = FlowEntry::new(0x1234_5678_9abc_def0, 7, 3, 1);
        assert!(e.belongs_to(0x1234_5678_9abc_def0));
        assert!(!e.belongs_to(0x1234_5678_9abc_def1));
        assert_eq!(
            e.value(),
            FlowValue {
                backend: 7,
                service: 3
            }
        );
        // Free entries belong to nobody, not even the flow whose hash is 0.
        assert!(!FlowEntry::default().belongs_to(0));
        // Torn: one flow's ids with another's check.
        let other = FlowEntry::new(0x0fed_cba9_8765_4321, 9, 3, 1);
        let torn = FlowEntry {
            ids: other.ids,
            ..e
        };
        assert!(!torn.belongs_to(0x1234_5678_9abc_def0));
        assert!(!torn.belongs_to(0x0fed_cba9_8765_4321));
    }
}
