//! What the XDP program tells lbd about the records it writes, for other lb nodes
//! (`[daemon.sync]`, docs/design/sync.md).
//!
//! Only a flow on a changed Maglev slot has a record (`slotstate`), so only such flows need to
//! be shared: on another node an unrecorded flow goes where it goes here, by the same seed and
//! table. The program writes one `SyncEvent` into the `SYNC_EVENTS` ring buffer each time it
//! records a flow (a SYN on a changed slot, a flow older than the change adopted by its old
//! backend, a flow rehashed off a backend that went away, a record marked closing), while
//! `Config::sync_events` is set. Events name the flow by its 5-tuple and lbd's ids: lbd turns
//! them into addresses before they leave the node, since ids are each lbd's own.

use crate::FlowKey;

/// Bytes of the `SYNC_EVENTS` ring buffer (a power of two, a multiple of the page size):
/// ~4,600 events of 56 bytes (plus the ring's 8-byte headers) between two reads by lbd, which
/// reads it as events arrive.
pub const SYNC_EVENTS_BYTES: u32 = 256 * 1024;

/// A record the program wrote.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncEvent {
    /// The flow as the connection table hashes it (client to VIP).
    pub flow: FlowKey,
    /// lbd's service id the record names (the every-port service for a deferred flow).
    pub service: u32,
    /// lbd's backend id the record names.
    pub backend: u32,
    /// `sync_event_flags`.
    pub flags: u32,
    pub _pad: u32,
}

/// `SyncEvent::flags`.
pub mod sync_event_flags {
    /// The flow is closing (a FIN or RST was seen): its record lives a short while only.
    pub const CLOSING: u32 = 1;
}
