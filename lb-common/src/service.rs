//! What a packet's destination is matched against: services (`SERVICES`, `SERVICE_BY_ID`,
//! `VIPS`, the `VIP_FILTER`), their backends (`BACKENDS`) and the program's `CONFIG`.

use crate::Addr;

/// Key of `SERVICES`: what a packet's destination must match.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Destination port in network byte order; 0 matches every port of the VIP.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// Value of `SERVICE_BY_ID` (an array indexed by service id): a service with the key it answers
/// to (lbd's bookkeeping, read back by a restarted lbd). A free id has an all-zero entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    pub key: ServiceKey,
    pub value: ServiceValue,
}

/// Entries of `SERVICE_INDEX`.
pub const SERVICE_INDEX_SLOTS: u32 = 1024;

/// An entry of `SERVICE_INDEX`: a direct-mapped copy of `SERVICES` the program reads first (one
/// array read and a compare, where the hash map's lookup cost ~35 ns a packet). Each key is at
/// its slot (`service_index_slot`) unless another key holds it, in which case the slot says
/// `COLLIDED` and the program looks such keys up in `SERVICES`. `check` covers the rest of the
/// entry, so an entry read while lbd rewrites it in place is seen as invalid, and the program
/// asks `SERVICES` (always right) instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceIndexEntry {
    pub key: ServiceKey,
    pub value: ServiceValue,
    /// `service_index_state`.
    pub state: u32,
    /// `service_index_check` of the other fields; 0 for an empty entry.
    pub check: u32,
    /// To 48 bytes: the array's element size (values are 8-byte aligned), so lbd's mapping
    /// and the program agree on where an entry is.
    pub _pad: u32,
}

/// States of a `SERVICE_INDEX` entry.
pub mod service_index_state {
    /// The entry holds its key's service.
    pub const HELD: u32 = 1 << 0;
    /// Another key belongs at this slot too: keys not held here are in `SERVICES` only.
    pub const COLLIDED: u32 = 1 << 1;
}

/// A `check` no entry has: written first when lbd rewrites an entry.
pub const SERVICE_INDEX_REWRITING: u32 = 2;

/// The slot of `key` in `SERVICE_INDEX`: a multiply-xorshift of its words (unkeyed: only lbd
/// chooses keys).
#[inline(always)]
pub fn service_index_slot(key: &ServiceKey) -> u32 {
    let w0 = key.addr[0] as u64 | (key.addr[1] as u64) << 32;
    let w1 = key.addr[2] as u64 | (key.addr[3] as u64) << 32;
    let w2 = key.port as u64 | (key.proto as u64) << 16 | (key.family as u64) << 24;
    let mut h = (w0 ^ 0x2545_f491_4f6c_dd1d).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h = (h ^ (h >> 29) ^ w1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 31) ^ w2).wrapping_mul(0x94d0_49bb_1331_11eb);
    (h >> 54) as u32 & (SERVICE_INDEX_SLOTS - 1)
}

/// The `check` of an entry with these fields: 0 for an empty one (state 0), else odd.
#[inline(always)]
pub fn service_index_check(e: &ServiceIndexEntry) -> u32 {
    if e.state == 0 {
        return 0;
    }
    let k = &e.key;
    let v = &e.value;
    let words = [
        k.addr[0] as u64 | (k.addr[1] as u64) << 32,
        k.addr[2] as u64 | (k.addr[3] as u64) << 32,
        k.port as u64 | (k.proto as u64) << 16 | (k.family as u64) << 24 | (e.state as u64) << 32,
        v.id as u64 | (v.flags as u64) << 32,
        v.table_size as u64 | (v._pad as u64) << 32,
    ];
    // Independent products folded by xor: the program computes this for every packet to a
    // VIP, and a chain of dependent multiplies took several times as long. A torn read (old
    // and new words mixed) still fails the check but for a ~2^-31 chance.
    let h = (words[0] ^ 0x6a09_e667_f3bc_c908).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (words[1] ^ 0xbb67_ae85_84ca_a73b).wrapping_mul(0xbf58_476d_1ce4_e5b9)
        ^ (words[2] ^ 0x3c6e_f372_fe94_f82b).wrapping_mul(0x94d0_49bb_1331_11eb)
        ^ (words[3] ^ 0xa54f_f53a_5f1d_36f1).wrapping_mul(0xd6e8_feb8_6659_fd93)
        ^ (words[4] ^ 0x510e_527f_ade6_82d1).wrapping_mul(0xa076_1d64_78bd_642f);
    let h = h ^ (h >> 32);
    (h as u32) | 1
}

/// `SERVICE_INDEX` for the services `services` (every key, whatever its port): each key at its
/// slot, the first of colliding keys (in key order) held there and the slot marked `COLLIDED`.
#[cfg(any(feature = "user", test))]
pub fn service_index<'a>(
    services: impl IntoIterator<Item = (&'a ServiceKey, &'a ServiceValue)>,
) -> Vec<ServiceIndexEntry> {
    let mut entries = vec![ServiceIndexEntry::default(); SERVICE_INDEX_SLOTS as usize];
    let mut keys: Vec<(&ServiceKey, &ServiceValue)> = services.into_iter().collect();
    keys.sort_by_key(|(k, _)| (k.addr, k.port, k.proto, k.family));
    for (k, v) in keys {
        let e = &mut entries[service_index_slot(k) as usize];
        if e.state & service_index_state::HELD == 0 {
            e.key = *k;
            e.value = *v;
            e.state |= service_index_state::HELD;
        } else {
            e.state |= service_index_state::COLLIDED;
        }
    }
    for e in &mut entries {
        e.check = service_index_check(e);
    }
    entries
}

/// 64-bit words of `VIP_FILTER`: a 65,536-bit Bloom filter of the VIP addresses.
pub const VIP_FILTER_WORDS: u32 = 1024;

/// The two bits of `VIP_FILTER` an address sets (lbd) and needs (the program): a packet whose
/// destination lacks either is no VIP's and passes after two array reads, where `SERVICES`
/// would cost two hash lookups (exact port, then port 0). Unkeyed: a false positive (about
/// (VIPs / 65,536)² for an address) only costs the full lookup.
#[inline(always)]
pub fn vip_filter_bits(addr: &Addr) -> [u32; 2] {
    let w0 = addr[0] as u64 | (addr[1] as u64) << 32;
    let w1 = addr[2] as u64 | (addr[3] as u64) << 32;
    // One multiply: each bit of the product depends on every input bit below it, so the top
    // 32 bits (the two indexes) see all of them. The rotation brings the last word of an IPv6
    // address (where addresses of one prefix differ) down to the low half; an IPv4 address's
    // last byte sits at bits 24-31 already.
    let h = (w0 ^ w1.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    [(h >> 48) as u32, (h >> 32) as u32 & 0xffff]
}

/// Forwarding and hashing flags of a service.
pub mod service_flags {
    /// Encapsulate in IP-in-IP instead of rewriting MACs.
    pub const TUNNEL: u32 = 1 << 0;
    /// Hash the 5-tuple instead of the client address.
    pub const HASH_5TUPLE: u32 = 1 << 1;
    /// In `VIPS`: the VIP has no single source-hashed service for this protocol, so a
    /// fragment that arrives before its first fragment cannot be placed.
    pub const NO_LATE_FRAGMENTS: u32 = 1 << 2;
    /// The service has a `deny` list in `FILTERS` (`lb_common::filter`).
    pub const HAS_DENY: u32 = 1 << 3;
    /// The service has an `allow` list in `FILTERS`: a client in none of it is dropped.
    pub const HAS_ALLOW: u32 = 1 << 4;
    /// `nat` forwarding: destination rewritten to the backend's address and port, replies
    /// rewritten back (`lb_common::nat`).
    pub const NAT: u32 = 1 << 5;
}

/// Value of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Index in `MAGLEV` and `SERVICE_STATS`.
    pub id: u32,
    /// `service_flags`.
    pub flags: u32,
    /// Number of slots of this service's Maglev table (the modulus of the hash).
    pub table_size: u32,
    pub _pad: u32,
}

/// Flags of a backend entry.
pub mod backend_flags {
    /// The entry is filled in (an unused index has flags 0).
    pub const VALID: u8 = 1 << 0;
    /// Failed its health checks: established flows leave it too (they are rehashed). A drained
    /// backend is not down: it only stops taking new flows (it is absent from the table).
    pub const DOWN: u8 = 1 << 1;
}

/// Value of `BACKENDS`, indexed by backend id (the value stored in Maglev slots).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr,
    /// Outer source address for `tunnel` forwarding.
    pub tunnel_src: Addr,
    /// Destination MAC: the backend's (dsr) or its next hop's (tunnel).
    pub mac: [u8; 6],
    /// Source MAC: the egress interface's.
    pub src_mac: [u8; 6],
    /// Egress interface (for a VLAN, the VLAN device's parent).
    pub ifindex: u32,
    /// The service this backend belongs to: a connection-table entry is honoured only for its
    /// own service, and a restarted lbd recovers its ids from it.
    pub service: u32,
    pub family: u8,
    /// `backend_flags`.
    pub flags: u8,
    /// MTU of the egress interface (`tunnel`: an encapsulated packet must fit it).
    pub mtu: u16,
    /// The 802.1Q VLAN id frames to this backend carry on `ifindex` (its route leaves by a VLAN
    /// device on that interface), whatever tag they arrived with; 0: untagged.
    pub vlan: u16,
    /// `nat`: the backend's port (network order; 0: the client's destination port kept).
    pub port: u16,
}

/// Value of `CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The 128-bit hash seed as two SipHash key words.
    pub hash_key: [u64; 2],
    /// Fingerprint of the program object lbd loaded: an lbd with the same program adopts the
    /// running one instead of reloading it.
    pub program_hash: u64,
    /// `LAYOUT_VERSION` of the lbd that filled the maps.
    pub layout_version: u32,
    /// Sets of `CONNTRACK` minus one (a power of two minus one): a flow's set is its hash
    /// masked with this.
    pub flow_set_mask: u32,
    /// Non-zero when lbd shares connection state with other nodes (`[daemon.sync]`): the
    /// program then reports every confirmed record it writes in `SYNC_EVENTS`.
    pub sync_events: u32,
    /// How long records of each kind keep their ways from new records.
    pub eviction: crate::slotstate::Eviction,
    /// Nanoseconds between new records each CPU may write (`daemon.new_flow_limit`); 0: no
    /// limit.
    pub new_flow_interval_ns: u32,
    /// While lbd traces packets (`lbctl trace`): the traced service's id plus one, or
    /// `TRACE_ALL`; 0 when no trace runs (the program then samples nothing).
    pub trace: u32,
    /// Counts traces (lbd's): a packet parsed for an earlier trace is not this one's.
    pub trace_session: u32,
}

/// Key of `VIPS`: a VIP and protocol, whatever the port (for fragments without ports).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: Addr,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

#[cfg(test)]
mod vip_filter_tests {
    use super::*;

    #[test]
    fn vip_filter_bits_spread_addresses_of_both_families() {
        // 256 VIPs of one /24 and 256 of one IPv6 /120 set ~1,024 distinct bits; the chance that
        // another address (65,536 of other /16s tried) has both bits set stays near the
        // Bloom-filter estimate (1,024 / 65,536)² = 0.024%.
        let mut bits = vec![false; 65_536];
        for i in 0..256u32 {
            for a in [
                [u32::from_be(0xcb00_7100 | i), 0, 0, 0],
                [u32::from_be(0x2001_0db8), 0, 0, u32::from_be(0x100 | i)],
            ] {
                for b in vip_filter_bits(&a) {
                    assert!(b < 65_536);
                    bits[b as usize] = true;
                }
            }
        }
        let set = bits.iter().filter(|&&b| b).count();
        assert!(set > 950, "{set} bits set");
        let positives = (0..65_536u32)
            .filter(|i| {
                let a = [u32::from_be(0x0a00_0000 | i << 8 | 1), 0, 0, 0];
                vip_filter_bits(&a).iter().all(|&b| bits[b as usize])
            })
            .count();
        assert!(positives < 65, "{positives} false positives of 65,536");
    }
}

#[cfg(test)]
mod service_index_tests {
    use super::*;

    fn key(i: u32, port: u16) -> ServiceKey {
        ServiceKey {
            addr: [0xcb00_710a_u32.wrapping_add(i << 24), 0, 0, 0],
            port: port.to_be(),
            proto: 6,
            family: 4,
        }
    }

    /// What the program does with the index (and `SERVICES`, given as `all`).
    fn find(
        index: &[ServiceIndexEntry],
        all: &[(ServiceKey, ServiceValue)],
        k: &ServiceKey,
    ) -> Option<ServiceValue> {
        let e = index[service_index_slot(k) as usize];
        let from_map = || all.iter().find(|(x, _)| x == k).map(|(_, v)| *v);
        if e.check != service_index_check(&e) {
            return from_map();
        }
        if e.state & service_index_state::HELD != 0 && e.key == *k {
            return Some(e.value);
        }
        if e.state & service_index_state::COLLIDED == 0 {
            return None;
        }
        from_map()
    }

    #[test]
    fn every_key_is_found_through_the_index_and_no_other() {
        let all: std::vec::Vec<(ServiceKey, ServiceValue)> = (0..256u32)
            .map(|i| {
                let value = ServiceValue {
                    id: i,
                    flags: i % 3,
                    table_size: 65_537,
                    _pad: 0,
                };
                (key(i % 40, (i / 40) as u16 * 1000), value)
            })
            .collect();
        let index = service_index(all.iter().map(|(k, v)| (k, v)));
        let held = index
            .iter()
            .filter(|e| e.state & service_index_state::HELD != 0)
            .count();
        let collided = index
            .iter()
            .filter(|e| e.state & service_index_state::COLLIDED != 0)
            .count();
        assert!(
            held > 200,
            "{held} of 256 keys held at their slot ({collided} slots collided)"
        );
        for (k, v) in &all {
            assert_eq!(find(&index, &all, k), Some(*v), "{k:?}");
        }
        for i in 0..1000u32 {
            let other = key(1000 + i, 7);
            assert_eq!(find(&index, &all, &other), None);
        }
        // An entry torn by a rewrite (its key changed, its check not yet): the map decides.
        let (k, v) = all[0];
        let mut torn = index.clone();
        let s = service_index_slot(&k) as usize;
        torn[s].value.id = 999;
        assert_eq!(find(&torn, &all, &k), Some(v));
        torn[s].check = SERVICE_INDEX_REWRITING;
        assert_eq!(find(&torn, &all, &k), Some(v));
        assert_eq!(service_index_check(&ServiceIndexEntry::default()), 0);
        assert_eq!(core::mem::size_of::<ServiceIndexEntry>(), 48);
    }

    /// An entry read while lbd rewrites it can mix any of the old entry's fields with the new
    /// one's: every such mix of two random entries fails the check of both. The seed is random
    /// unless `LB_TEST_SEED` gives one; a failure names it.
    #[test]
    fn a_torn_entry_fails_its_check() {
        use rand::{Rng as _, SeedableRng as _};
        let seed = std::env::var("LB_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let fields = |e: &ServiceIndexEntry| -> [u32; 11] {
            let k = &e.key;
            let v = &e.value;
            [
                k.addr[0],
                k.addr[1],
                k.addr[2],
                k.addr[3],
                k.port as u32 | (k.proto as u32) << 16 | (k.family as u32) << 24,
                v.id,
                v.flags,
                v.table_size,
                v._pad,
                e.state,
                0,
            ]
        };
        let entry = |f: [u32; 11]| ServiceIndexEntry {
            key: ServiceKey {
                addr: [f[0], f[1], f[2], f[3]],
                port: f[4] as u16,
                proto: (f[4] >> 16) as u8,
                family: (f[4] >> 24) as u8,
            },
            value: ServiceValue {
                id: f[5],
                flags: f[6],
                table_size: f[7],
                _pad: f[8],
            },
            state: f[9] | 1,
            check: 0,
            _pad: 0,
        };
        for _ in 0..64 {
            // Entries that differ in a few fields, as rewrites do, or in all of them.
            let old = entry(rng.random());
            let mut new_fields = fields(&old);
            for _ in 0..rng.random_range(1..=10) {
                new_fields[rng.random_range(0..10)] = rng.random();
            }
            let new = entry(new_fields);
            let (a, b) = (fields(&old), fields(&new));
            for mask in 1..(1u32 << 10) - 1 {
                let mixed = entry(core::array::from_fn(|i| {
                    if i < 10 && mask & (1 << i) != 0 {
                        b[i]
                    } else {
                        a[i]
                    }
                }));
                if mixed == old || mixed == new {
                    continue;
                }
                let c = service_index_check(&mixed);
                assert!(
                    c != service_index_check(&old) && c != service_index_check(&new),
                    "LB_TEST_SEED={seed}: a mix of {old:?} and {new:?} passes a check"
                );
            }
        }
    }
}
