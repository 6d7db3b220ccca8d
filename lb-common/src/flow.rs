//! The connection table's geometry (`CONNTRACK`: a set-associative cache in an array of
//! `slotstate::RecordSet`s) and the fragments table (`FRAGS`): where a flow's and a datagram's
//! packets go once placed.

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

/// What the connection table says about a flow (`slotstate::Record::value`): the backend it
/// was sent to, of which service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub backend: u32,
    pub service: u32,
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
}
