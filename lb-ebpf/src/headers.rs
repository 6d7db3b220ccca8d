//! Wire layouts and constants both programs read: Ethernet, 802.1Q, IPv4 and IPv6 headers.
//! The structs have alignment 2 so `read_hdr` can load them 16 bits at a time.

use lb_common::Addr;

pub const ETH_HLEN: usize = 14;
/// Where the ethertype (or an 802.1Q tag's type) follows the two addresses.
pub const ETH_TYPE_AT: usize = 12;
pub const VLAN_HLEN: usize = 4;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const IPV4_MIN_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;

#[repr(C, packed(2))]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

#[repr(C, packed(2))]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    pub vtc_flow: u32,
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr: Addr,
    pub daddr: Addr,
}

/// The destination and source MACs of an Ethernet header, as 16-bit words: written with six
/// 16-bit stores (a `[u8; 12]` copy compiles to 24 byte loads and stores, twice).
#[repr(C, packed(2))]
#[derive(Clone, Copy)]
#[allow(dead_code)] // the balancer's; lb-decap shares this module
pub struct EthAddrs([u16; 6]);

#[allow(dead_code)]
impl EthAddrs {
    #[inline(always)]
    pub fn new(dst: &[u8; 6], src: &[u8; 6]) -> EthAddrs {
        let w = |a: u8, b: u8| u16::from_ne_bytes([a, b]);
        EthAddrs([
            w(dst[0], dst[1]),
            w(dst[2], dst[3]),
            w(dst[4], dst[5]),
            w(src[0], src[1]),
            w(src[2], src[3]),
            w(src[4], src[5]),
        ])
    }

    /// The addresses from their 16-bit words as they lie in memory.
    #[inline(always)]
    pub fn from_words(dst: [u16; 3], src: [u16; 3]) -> EthAddrs {
        EthAddrs([dst[0], dst[1], dst[2], src[0], src[1], src[2]])
    }
}

/// 16-bit words of a header, for copying it (an ethertype, a VLAN tag and its ethertype).
#[repr(C, packed(2))]
#[derive(Clone, Copy)]
#[allow(dead_code)] // the balancer's; lb-decap shares this module
pub struct Words<const N: usize>(pub [u16; N]);
