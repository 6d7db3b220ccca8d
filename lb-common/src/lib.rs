//! Map keys and values shared by the XDP program and lbd, and the logic both sides must agree
//! on: the keyed client hash, which Maglev slot a flow takes, the connection table's sets.
//!
//! Every type here is `#[repr(C)]` with explicit padding so its bytes are the same on both sides
//! of the map. Addresses of either family are stored as four raw 32-bit words exactly as they
//! appear on the wire (network byte order in memory); an IPv4 address fills the first word and
//! the rest are zero.
//!
//! Modules (everything is re-exported here, so `lb_common::X` names every item):
//! - `service`: what a destination is matched against (services, VIPs, backends, config);
//! - `flow`: the connection table and the fragments table;
//! - `slot`: which Maglev slot a service's flow takes, and what a slot holds;
//! - `stats`: what the program counts, and why it does not forward (`Reason`);
//! - `filter`: each service's client filters (`allow` and `deny` prefixes);
//! - `hash`: the keyed hashes; `maglev` (userspace): the table builder;
//! - `decap`: the decapsulation program's maps;
//! - `sync`: what the program reports to lbd for other nodes (`SyncEvent`);
//! - `trace`: what the program reports while an operator traces (`TraceEvent`);
//! - `slotstate`: per-slot state (docs/design/slot-state.md): what a Maglev slot holds besides
//!   its backend, the connection table's records, and the per-packet choice both sides share.
#![cfg_attr(not(any(feature = "user", test)), no_std)]

pub mod decap;
mod filter;
mod flow;
pub mod hash;
/// The table builder needs allocation: userspace only.
#[cfg(any(feature = "user", test))]
pub mod maglev;
/// `nat` forwarding's flow tables.
pub mod nat;
mod service;
mod slot;
pub mod slotstate;
mod stats;
mod sync;
mod trace;

pub use filter::{
    FILTER_HEAD_BITS, FILTER_LOOKUP_LEN, FilterData, MAX_FILTER_PREFIXES, filter_list,
    filter_prefix_len,
};
pub use flow::{
    CONNTRACK_FLAGS, FLOW_WAYS, FlowKey, FlowValue, FragKey, FragValue, MIN_CONNTRACK_ENTRIES,
    conntrack_sets,
};
#[cfg(any(feature = "user", test))]
pub use service::service_index;
pub use service::{
    Backend, Config, SERVICE_INDEX_REWRITING, SERVICE_INDEX_SLOTS, ServiceEntry, ServiceIndexEntry,
    ServiceKey, ServiceValue, VIP_FILTER_WORDS, VipKey, backend_flags, service_flags,
    service_index_check, service_index_slot, service_index_state, vip_filter_bits,
};
pub use slot::{MAGLEV_SLOTS_PER_WORD, Slot, maglev_slot, source_slot};
pub use slotstate::{Record, RecordSet};
pub use stats::{
    Counter, DEFAULT_NEW_FLOW_LIMIT, NEW_FLOW_BURST_NS, NewFlow, REASONS_PER_SERVICE, RateBucket,
    Reason, TOO_BIG_BURST, TOO_BIG_INTERVAL_NS, TOO_BIG_PER_SECOND, TOO_BIG_TOLERANCE_NS,
    TooBigBucket, service_reason_index,
};
pub use sync::{SYNC_EVENTS_BYTES, SyncEvent, sync_event_flags};
pub use trace::{TRACE_ALL, TRACE_EVENTS_BYTES, TraceEvent, Verdict, trace_outcome, trace_table};

/// Version of the pinned map layout. Bump it whenever any map's key, value, size or set of
/// maps changes: lbd pins maps under `bpffs_dir/v{LAYOUT_VERSION}` and never opens pins of
/// another version as its own.
pub const LAYOUT_VERSION: u32 = 13;

/// Services the data path can hold (also the outer size of the Maglev array of maps).
pub const MAX_SERVICES: u32 = 256;
/// Backends over all services (index space of `BACKENDS` and the backend counters).
pub const MAX_BACKENDS: u32 = 16_384;
/// Largest Maglev table a service may ask for.
pub const MAX_TABLE_SIZE: u32 = 655_373;
/// Default Maglev table size (SPEC).
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
/// Value in a Maglev slot meaning "no backend" (the service has no usable backend).
pub const NO_BACKEND: u32 = u32::MAX;

/// `BPF_F_INNER_MAP`: lets inner arrays of the Maglev array-of-maps differ in size.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `BPF_F_MMAPABLE`: lbd fills a new Maglev table with one copy into its memory, not one
/// syscall per slot.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// The flags of a Maglev table in `MAGLEV` (inner maps must match the template's): any size.
pub const MAGLEV_TABLE_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;
/// The flags of a Maglev table in `MAGLEV_DEFAULT`: no `BPF_F_INNER_MAP`, so every inner array
/// has the template's size and the verifier inlines the program's read of it (a read from
/// `MAGLEV` is a call into the kernel, whose return costs a misprediction on CPUs with
/// return-thunk mitigations).
pub const DEFAULT_TABLE_FLAGS: u32 = BPF_F_MMAPABLE;
/// Words of a table of `DEFAULT_TABLE_SIZE` slots, both halves (`slotstate::half_words`).
pub const DEFAULT_TABLE_WORDS: u32 = 2 * slotstate::half_words(DEFAULT_TABLE_SIZE);

/// Whether a service's Maglev table of `table_size` slots lives in `MAGLEV_DEFAULT` (the
/// default size) or in `MAGLEV` (any other size); the program and lbd both decide by this.
#[inline(always)]
pub const fn in_default_tables(table_size: u32) -> bool {
    table_size == DEFAULT_TABLE_SIZE
}

/// The flags a Maglev table of `table_size` slots is created with (see `in_default_tables`).
pub const fn table_flags(table_size: u32) -> u32 {
    if in_default_tables(table_size) {
        DEFAULT_TABLE_FLAGS
    } else {
        MAGLEV_TABLE_FLAGS
    }
}

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Names of the maps, as declared in the XDP program and pinned by lbd.
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const MAGLEV: &str = "MAGLEV";
    pub const MAGLEV_DEFAULT: &str = "MAGLEV_DEFAULT";
    pub const BACKENDS: &str = "BACKENDS";
    pub const CONFIG: &str = "CONFIG";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const FRAGS: &str = "FRAGS";
    pub const VIPS: &str = "VIPS";
    pub const DEVMAP: &str = "DEVMAP";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const REASON_STATS: &str = "REASON_STATS";
    pub const SERVICE_BY_ID: &str = "SERVICE_BY_ID";
    pub const VIP_FILTER: &str = "VIP_FILTER";
    pub const SERVICE_INDEX: &str = "SERVICE_INDEX";
    pub const SYNC_EVENTS: &str = "SYNC_EVENTS";
    pub const NEW_FLOW_STATS: &str = "NEW_FLOW_STATS";
    pub const FILTERS: &str = "FILTERS";
    pub const SERVICE_REASON_STATS: &str = "SERVICE_REASON_STATS";
    pub const TRACE_EVENTS: &str = "TRACE_EVENTS";
    pub const NAT_FLOWS: &str = "NAT_FLOWS";
    pub const NAT_REPLIES: &str = "NAT_REPLIES";
    pub const NAT_FILTER: &str = "NAT_FILTER";
    pub const SERVICE_REPLY_STATS: &str = "SERVICE_REPLY_STATS";
    /// Every map lbd pins, in one list so pinning and cleanup cannot disagree.
    pub const ALL: [&str; 24] = [
        SERVICES,
        SERVICE_INDEX,
        SERVICE_BY_ID,
        VIP_FILTER,
        MAGLEV,
        MAGLEV_DEFAULT,
        BACKENDS,
        CONFIG,
        CONNTRACK,
        FRAGS,
        VIPS,
        DEVMAP,
        SERVICE_STATS,
        BACKEND_STATS,
        REASON_STATS,
        SYNC_EVENTS,
        NEW_FLOW_STATS,
        FILTERS,
        SERVICE_REASON_STATS,
        TRACE_EVENTS,
        NAT_FLOWS,
        NAT_REPLIES,
        NAT_FILTER,
        SERVICE_REPLY_STATS,
    ];
}

/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "lb_xdp";

/// Name of the same program with `lbctl trace`'s checks, which lbd swaps in only while a trace
/// runs (the kernel keeps 15 bytes of a program's name: this one fits).
pub const TRACED_PROGRAM_NAME: &str = "lb_xdp_traced";

/// An address of either family: four words as they appear on the wire.
pub type Addr = [u32; 4];

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], made only of integers and integer arrays, with every
    // padding byte spelled out as a field, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::ServiceEntry {}
    unsafe impl aya::Pod for super::ServiceIndexEntry {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::RecordSet {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragValue {}
    unsafe impl aya::Pod for super::SyncEvent {}
    unsafe impl aya::Pod for super::TraceEvent {}
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::FilterData {}
    unsafe impl aya::Pod for super::nat::NatFlow {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::nat::NatReply {}
}

#[cfg(test)]
mod layout_tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn sizes_have_no_hidden_padding() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(size_of::<ServiceEntry>(), 36);
        assert_eq!(size_of::<Backend>(), 60);
        assert_eq!(size_of::<Config>(), 80);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowValue>(), 8);
        assert_eq!(size_of::<Record>(), 16);
        assert_eq!(size_of::<RecordSet>(), 64);
        assert_eq!(size_of::<Counter>(), 16);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<FragValue>(), 20);
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<TooBigBucket>(), 8);
        assert_eq!(size_of::<SyncEvent>(), 56);
        assert_eq!(size_of::<nat::NatFlow>(), 32);
        assert_eq!(size_of::<nat::NatReply>(), 44);
        assert_eq!(size_of::<FilterData>() as u32 * 8, FILTER_HEAD_BITS + 128);
        assert_eq!(size_of::<TraceEvent>(), 56);
    }
}
