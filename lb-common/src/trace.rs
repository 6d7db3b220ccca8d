//! What the XDP program tells lbd about the packets it sees while an operator traces
//! (`lbctl trace`): one `TraceEvent` per packet of the traced service (or of every service) in
//! the `TRACE_EVENTS` ring buffer, written only while `Config::trace` is set. Otherwise the
//! program spends one branch on it.

use crate::FlowKey;

/// Bytes of the `TRACE_EVENTS` ring buffer (a power of two, a multiple of the page size):
/// ~800 events of 72 bytes (plus the ring's 8-byte headers) between two reads by lbd.
pub const TRACE_EVENTS_BYTES: u32 = 64 * 1024;

/// `Config::trace` for "every service".
pub const TRACE_ALL: u32 = u32::MAX;

/// `TraceEvent::service` of a packet to a VIP with no service for its port and protocol.
pub const TRACE_NO_SERVICE: u32 = u32::MAX;

/// One packet as the program saw and handled it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceEvent {
    /// The flow (client to VIP; for an ICMP error, the flow it quotes, turned around).
    pub flow: FlowKey,
    /// lbd's service id (`TRACE_NO_SERVICE`: none).
    pub service: u32,
    /// lbd's backend id (`NO_BACKEND`: none chosen).
    pub backend: u32,
    /// The XDP action returned (`XDP_TX`, `XDP_REDIRECT`, `XDP_PASS`, `XDP_DROP`).
    pub action: u32,
    /// `Reason as u32` when the packet was not forwarded, else `trace_reason::FORWARDED`.
    pub reason: u32,
    /// The connection table's part (`trace_table`).
    pub table: u32,
    /// Bytes of the frame.
    pub len: u32,
    /// `trace_flags`.
    pub flags: u32,
    pub _pad: u32,
}

/// `TraceEvent::reason` beyond `Reason`'s.
pub mod trace_reason {
    /// Forwarded to the backend (or answered with a "too big").
    pub const FORWARDED: u32 = 0xff;
    /// To a VIP, but no service has its port and protocol: passed to the kernel untouched.
    pub const NO_SERVICE: u32 = 0xfe;
}

/// `TraceEvent::table`: the lookup (bits 0-7) and what became of a new flow (bits 8-15).
pub mod trace_table {
    /// The slot is unchanged: the table was not read (its backend is every flow's).
    pub const NOT_READ: u32 = 0;
    /// The flow's record was found.
    pub const HIT: u32 = 1;
    /// The flow had no record.
    pub const MISS: u32 = 2;
    /// Mask of the lookup.
    pub const LOOKUP: u32 = 0xff;
    /// A new flow asked for a record: `NewFlow as u32 + 1` in bits 8-15 (0: none asked).
    pub const NEW_FLOW_SHIFT: u32 = 8;
}

/// `TraceEvent::flags`.
pub mod trace_flags {
    pub const SYN: u32 = 1;
    pub const CLOSING: u32 = 2;
    pub const ICMP_ERROR: u32 = 4;
    pub const FRAGMENT: u32 = 8;
}
