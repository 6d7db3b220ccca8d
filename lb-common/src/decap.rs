//! The decapsulation program backends run (`lbd decap`): it strips the outer header of
//! IPv4-in-IPv4 and IPv6-in-IPv6 packets addressed to the interface's own addresses, sent from
//! an allowed source (the balancers) to an inner destination of this host. `lbd decap` keeps
//! the addresses in `ADDRS` and the allowed sources in `ALLOW` (one map of each per
//! interface); the program counts what it did in `STATS`.

use crate::Addr;

/// Name of the XDP program in the `lb-decap` object.
pub const PROGRAM_NAME: &str = "lb_decap";
/// Name of the map of this host's addresses (keys: [`AddrKey`], values: [`addr_flags`]).
pub const ADDRS: &str = "DECAP_ADDRS";
/// Addresses the map holds at most (the interface's and every other one of the host, VIPs
/// on `lo` included).
pub const MAX_ADDRS: u32 = 4096;
/// Name of the longest-prefix-match map of allowed outer sources (keys: an
/// [`AllowData`] behind its prefix length, see [`allow_prefix_len`]; values: 1).
pub const ALLOW: &str = "DECAP_ALLOW";
/// Allowed source prefixes at most.
pub const MAX_ALLOW: u32 = 256;
/// Name of the per-CPU packet counters, indexed by [`Stat`].
pub const STATS: &str = "DECAP_STATS";
/// Version of the decapsulation maps' layout; part of their pin names, so a `lbd decap`
/// never opens a map of another layout as its own. 2: `ADDRS` values are flags, `ALLOW`
/// and `STATS` added.
pub const LAYOUT_VERSION: u32 = 2;

/// What an address in `ADDRS` is.
pub mod addr_flags {
    /// An address of the interface: tunnel packets sent to it are unwrapped.
    pub const OUTER: u8 = 1;
    /// An address of this host: an inner packet sent to it may be let in.
    pub const INNER: u8 = 2;
}

/// Key of `ADDRS`: an address of the interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    /// As on the wire; an IPv4 address fills the first word, the rest are zero.
    pub addr: Addr,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 3],
}

/// The data of an `ALLOW` key: the family, then the address, matched bit by bit from the
/// start. The family and the padding (always zero) take the first 32 bits of every prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllowData {
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 3],
    /// As on the wire; an IPv4 address fills the first word, the rest are zero.
    pub addr: Addr,
}

/// The prefix length of an `ALLOW` key for a CIDR of `len` bits.
pub const fn allow_prefix_len(len: u32) -> u32 {
    32 + len
}

/// The prefix length a lookup gives: every bit of an [`AllowData`].
pub const ALLOW_LOOKUP_LEN: u32 = allow_prefix_len(128);

/// What the program did with a tunnel packet sent to the interface (`STATS` index). Every
/// packet it does not unwrap goes on unchanged.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Unwrapped: the inner packet went to the kernel.
    Decapsulated = 0,
    /// The outer source is in no allowed prefix.
    SourceNotAllowed = 1,
    /// The inner destination is no address of this host.
    InnerNotLocal = 2,
    /// Lengths that do not match the frame.
    Malformed = 3,
}

impl Stat {
    pub const COUNT: u32 = 4;
    pub const ALL: [Stat; Stat::COUNT as usize] = [
        Stat::Decapsulated,
        Stat::SourceNotAllowed,
        Stat::InnerNotLocal,
        Stat::Malformed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Stat::Decapsulated => "decapsulated",
            Stat::SourceNotAllowed => "source_not_allowed",
            Stat::InnerNotLocal => "inner_not_local",
            Stat::Malformed => "malformed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<AddrKey>(), 20);
        assert_eq!(core::mem::size_of::<AllowData>(), 20);
        assert_eq!(ALLOW_LOOKUP_LEN, 160);
    }

    #[test]
    fn stats_are_indexed_in_order() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integers and integer arrays only, padding spelled out as a field.
    unsafe impl aya::Pod for super::AddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AllowData {}
}
