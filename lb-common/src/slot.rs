//! Which Maglev slot a service's flow takes (what a slot holds is `slotstate`'s): the choice the XDP program
//! makes for a new flow, and that lbd (`lbctl lookup`) and the tests predict, in one place.

use crate::{Addr, FlowKey, ServiceValue, hash, service_flags};

/// Where a flow lands in its service's Maglev table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// The service's keyed hash of the flow (`lbctl lookup` shows it).
    pub hash: u32,
    /// The slot it selects: `hash % table_size`.
    pub index: u32,
}

/// The Maglev slot of `flow` in the table of `service`, under the hash seed `seed`: the hash the
/// service's flags name (`HASH_5TUPLE`: the 5-tuple; otherwise the client address alone, so every
/// packet and fragment of a client lands alike), modulo the service's table size. `None` for a
/// service without a table (size 0). The one definition: the program places new flows by it,
/// `lbctl lookup` and the tests predict them with it.
#[inline(always)]
pub fn maglev_slot(seed: &[u64; 2], service: &ServiceValue, flow: &FlowKey) -> Option<Slot> {
    let hash = if service.flags & service_flags::HASH_5TUPLE != 0 {
        hash::hash_5tuple(seed, flow)
    } else {
        hash::hash_source(seed, &flow.src)
    };
    if service.table_size == 0 {
        return None;
    }
    // The default size as a constant: the remainder is then a multiply and shifts, where a
    // variable divisor costs a division (tens of cycles) for every packet. The same value.
    let index = if service.table_size == crate::DEFAULT_TABLE_SIZE {
        hash % crate::DEFAULT_TABLE_SIZE
    } else {
        hash % service.table_size
    };
    Some(Slot { hash, index })
}

/// Maglev slots per element of a service's table array: each slot's lanes (`slotstate::Hot`,
/// `slotstate::Side`) are 16 bits, four to a u64 element (an array element takes 8 bytes
/// whatever its value size, so a u32 per slot would take 8). A 65,537-slot table's hot half is
/// then 128 KiB instead of 512 KiB, which matters with many clients: every packet reads a slot
/// at random.
pub const MAGLEV_SLOTS_PER_WORD: u32 = 4;

/// The slot of client `src` in the table of a source-hashed service of `table_size` slots:
/// `maglev_slot` of a flow known by its client alone, as the tests' oracles predict it. `None`
/// for a table of size 0.
pub fn source_slot(seed: &[u64; 2], table_size: u32, src: &Addr) -> Option<u32> {
    let service = ServiceValue {
        table_size,
        ..Default::default()
    };
    let flow = FlowKey {
        src: *src,
        ..Default::default()
    };
    maglev_slot(seed, &service, &flow).map(|slot| slot.index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::tests::flow;

    const SEED: [u64; 2] = [0x0123_4567_89ab_cdef, 0x0fed_cba9_8765_4321];

    fn service(flags: u32, table_size: u32) -> ServiceValue {
        ServiceValue {
            id: 3,
            flags,
            table_size,
            _pad: 0,
        }
    }

    #[test]
    fn a_source_hashed_service_places_a_client_by_its_address_alone() {
        let s = service(service_flags::TUNNEL, 65_537);
        let base = maglev_slot(&SEED, &s, &flow(7, 40_000)).unwrap();
        assert_eq!(base.hash, hash::hash_source(&SEED, &flow(7, 40_000).src));
        assert_eq!(base.index, base.hash % 65_537);
        // Other ports, destination, protocol: the same slot (fragments without ports follow).
        let other = FlowKey {
            dst: [1, 0, 0, 0],
            dport: 443u16.to_be(),
            proto: 17,
            ..flow(7, 1)
        };
        assert_eq!(maglev_slot(&SEED, &s, &other), Some(base));
        assert_eq!(
            maglev_slot(
                &SEED,
                &s,
                &FlowKey {
                    sport: 0,
                    dport: 0,
                    ..other
                }
            ),
            Some(base)
        );
        assert_ne!(maglev_slot(&SEED, &s, &flow(8, 40_000)), Some(base));
        assert_eq!(
            source_slot(&SEED, 65_537, &flow(7, 40_000).src),
            Some(base.index)
        );
        assert_eq!(source_slot(&SEED, 0, &flow(7, 40_000).src), None);
    }

    #[test]
    fn a_five_tuple_service_places_each_flow_by_its_five_tuple() {
        let s = service(service_flags::HASH_5TUPLE, 65_537);
        let f = flow(7, 40_000);
        let base = maglev_slot(&SEED, &s, &f).unwrap();
        assert_eq!(base.hash, hash::hash_5tuple(&SEED, &f));
        assert_eq!(base.index, base.hash % 65_537);
        assert_ne!(base.hash, hash::hash_source(&SEED, &f.src));
        let ports: std::collections::HashSet<u32> = (0..64)
            .map(|p| maglev_slot(&SEED, &s, &flow(7, 40_000 + p)).unwrap().index)
            .collect();
        assert!(
            ports.len() > 60,
            "one client's ports spread: {}",
            ports.len()
        );
    }

    #[test]
    fn every_slot_lies_in_the_table_and_a_tableless_service_has_none() {
        for size in [2, 13, 65_537, crate::MAX_TABLE_SIZE] {
            for flags in [0, service_flags::HASH_5TUPLE] {
                for i in 0..1_000 {
                    let slot = maglev_slot(&SEED, &service(flags, size), &flow(i, 1)).unwrap();
                    assert!(slot.index < size);
                    assert_eq!(
                        slot.index,
                        slot.hash % size,
                        "the remainder, whatever the size"
                    );
                }
            }
        }
        assert_eq!(maglev_slot(&SEED, &service(0, 0), &flow(1, 1)), None);
        assert_eq!(
            maglev_slot(&SEED, &service(service_flags::HASH_5TUPLE, 0), &flow(1, 1)),
            None
        );
    }
}
