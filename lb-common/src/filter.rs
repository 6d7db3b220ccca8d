//! Client filters: each service's `allow` and `deny` lists of client prefixes, in one
//! longest-prefix-match trie (`FILTERS`) keyed by service id, list and address.
//!
//! The program checks them right after a packet's service is known, and only for a service
//! whose flags say it has such a list (`service_flags::HAS_DENY`, `HAS_ALLOW`): a service
//! without lists pays one branch. Deny first: a client in a deny prefix is dropped, whatever
//! its allow list says; then, for a service with an allow list, a client in none of its
//! prefixes is dropped. Both are counted under `Reason::Denied`.

use crate::Addr;

/// Which list an entry of `FILTERS` belongs to (`FilterData::list`).
pub mod filter_list {
    pub const DENY: u8 = 1;
    pub const ALLOW: u8 = 2;
}

/// Prefixes `FILTERS` holds over every service together (one service may take them all). The
/// trie allocates its entries as they are added (`BPF_F_NO_PREALLOC`), so the size costs
/// nothing until used.
pub const MAX_FILTER_PREFIXES: u32 = 262_144;

/// The data of a `FILTERS` key (behind its prefix length, see [`filter_prefix_len`]): matched
/// bit by bit from the start, so every key's prefix covers the service id, the list and the
/// padding (the first 64 bits), then as many bits of the address as the CIDR has.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FilterData {
    /// The service id (always matched whole, so its byte order does not matter).
    pub service: u32,
    /// `filter_list::DENY` or `filter_list::ALLOW`.
    pub list: u8,
    pub _pad: [u8; 3],
    /// As on the wire; an IPv4 address fills the first word, the rest are zero.
    pub addr: Addr,
}

/// Bits of a `FilterData` before the address.
pub const FILTER_HEAD_BITS: u32 = 64;

/// The prefix length of a `FILTERS` key for a CIDR of `len` bits.
pub const fn filter_prefix_len(len: u32) -> u32 {
    FILTER_HEAD_BITS + len
}

/// The prefix length of a lookup: every bit of a `FilterData`.
pub const FILTER_LOOKUP_LEN: u32 = filter_prefix_len(128);
