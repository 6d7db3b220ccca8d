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
/// to. An established flow's entry names its service; the program checks that service's key
/// against the packet here instead of looking the destination up in `SERVICES` (a hash lookup,
/// ~10 ns). A free id has an all-zero entry (family 0 matches no packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    pub key: ServiceKey,
    pub value: ServiceValue,
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
    pub _pad: u16,
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
