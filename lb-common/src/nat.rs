//! `nat` forwarding's per-flow state: `NAT_FLOWS` (a request's flow, client → VIP, to the
//! backend it was given) and `NAT_REPLIES` (the reply's flow, backend → client, to what the
//! reply needs: the VIP and service port it must come from and how to reach the client), and
//! `NAT_FILTER`, a Bloom filter of NAT backends' addresses (the reply path's pre-filter, bits as
//! `vip_filter_bits`). Both tables are kernel LRU hashes keyed by `FlowKey`.
//!
//! Every NAT flow has both entries, written by its first packet (and rewritten by every SYN):
//! the Maglev table and the connection table choose a flow's backend only until it has one; from
//! then on `NAT_FLOWS` keeps it there while that backend is in the service (drained or not).

use crate::Addr;

/// Entries of each NAT table by default (`daemon.nat_entries`; a kernel LRU hash: the least
/// recently used flow makes room). The program's declaration; lbd sizes the tables at load.
pub const NAT_ENTRIES: u32 = 262_144;
/// The smallest and largest `daemon.nat_entries`.
pub const MIN_NAT_ENTRIES: u32 = 1024;
pub const MAX_NAT_ENTRIES: u32 = 1 << 24;

/// Value of `NAT_FLOWS`: the backend a NAT flow was given, and the address and port it had
/// then (a backend id reused by another backend does not take the flow over).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatFlow {
    pub backend_addr: Addr,
    /// The backend's port (network order; 0: the client's destination port kept).
    pub backend_port: u16,
    pub _pad: u16,
    /// Index in `BACKENDS`.
    pub backend: u32,
    pub service: u32,
    /// The NAT clock (`nat_clock`) when the reply entry was last written: it is written again
    /// once a second, so it follows the client's MAC and outlives LRU pressure while the flow
    /// is busy.
    pub stamp: u32,
}

/// Value of `NAT_REPLIES`: what a reply of the flow needs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatReply {
    /// The VIP the reply comes from.
    pub vip: Addr,
    /// The service port it comes from (network order), the client's original destination port.
    pub vip_port: u16,
    /// The 802.1Q tag control field the client's frames came with (host order; 0: untagged).
    pub tci: u16,
    /// Where the client's frames came from (the client's or its router's MAC: the reply's
    /// destination) and what they were sent to (lb's interface: the reply's source).
    pub client_mac: [u8; 6],
    pub our_mac: [u8; 6],
    /// The interface the client's frames arrived on: the reply leaves by it.
    pub ifindex: u32,
    /// Index in `BACKENDS` and `BACKEND_STATS`, and the service's id (for counting).
    pub backend: u32,
    pub service: u32,
}

/// Bloom filter words of `NAT_FILTER` (as `VIP_FILTER_WORDS`).
pub const NAT_FILTER_WORDS: u32 = 1024;

/// Ticks of the NAT clock between rewrites of a busy flow's reply entry.
pub const NAT_REFRESH_TICKS: u32 = 16;
