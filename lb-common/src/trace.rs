//! What the XDP program tells lbd about the packets it sees while an operator traces
//! (`lbctl trace`): one `TraceEvent` per packet of the traced service (or of every service) in
//! the `TRACE_EVENTS` ring buffer, written only while `Config::trace` is set. Otherwise the
//! program spends a branch at each step that would note something.
//!
//! The traced build of the program (`lb_xdp_traced`, see lb-ebpf's `trace`) builds the event in
//! a note per CPU as the packet goes through its steps (each step stores what it decided), and
//! submits it once, at its exit.

use crate::FlowKey;

/// Bytes of the `TRACE_EVENTS` ring buffer (a power of two, a multiple of the page size):
/// ~1,000 events of 56 bytes (plus the ring's 8-byte headers) between two reads by lbd.
pub const TRACE_EVENTS_BYTES: u32 = 64 * 1024;

/// `Config::trace` for "every service".
pub const TRACE_ALL: u32 = u32::MAX;

/// One packet as the program saw and handled it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceEvent {
    /// The flow (client to VIP; for an ICMP error, the flow it quotes, turned around).
    pub flow: FlowKey,
    /// What the program did with it (`Verdict`), as the program's exit had it.
    pub verdict: u64,
    /// Bytes of the IP packet and the link-layer header before it.
    pub len: u32,
    /// The packet's kind as the parser saw it: a TCP SYN, a FIN or RST, an ICMP error, and
    /// the fragment (0 none, 1 first, 2 later). One byte each, copied as parsed.
    pub syn: u8,
    pub closing: u8,
    pub icmp_error: u8,
    pub fragment: u8,
}

/// What became of a packet to a VIP's address, in one register: the XDP action, why, the
/// service and backend, and the connection table's part. The program builds it at each exit
/// and lbd reads it apart (the program itself never branches on it: a value the verifier sees
/// branched on must be exact in every state it keeps, which multiplied its work past its
/// limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct Verdict(pub u64);

impl Verdict {
    const ACTION: u64 = 0x7;
    const SERVICE_KNOWN: u64 = 1 << 3;
    const TABLE_SHIFT: u32 = 4;
    const TABLE: u64 = 0xf;
    const BACKEND_SHIFT: u32 = 8;
    const NO_BACKEND: u64 = 0xffff;
    const SERVICE_SHIFT: u32 = 24;
    const OUTCOME_SHIFT: u32 = 32;

    /// Sent (`action`) to backend `backend` of service `service`; `table`: the connection
    /// table's part (`trace_table`).
    #[inline(always)]
    pub const fn forwarded(action: u32, service: u32, backend: u32, table: u32) -> Verdict {
        Verdict(
            action as u64
                | Self::SERVICE_KNOWN
                | ((table as u64) & Self::TABLE) << Self::TABLE_SHIFT
                | ((backend as u64) & Self::NO_BACKEND) << Self::BACKEND_SHIFT
                | ((service as u64) & 0xff) << Self::SERVICE_SHIFT,
        )
    }

    /// Handled (`action`) as `outcome` says (`trace_outcome`), without a backend.
    #[inline(always)]
    pub const fn refused(action: u32, outcome: u32) -> Verdict {
        Verdict(
            action as u64
                | Self::NO_BACKEND << Self::BACKEND_SHIFT
                | (outcome as u64) << Self::OUTCOME_SHIFT,
        )
    }

    /// This verdict with the connection table's part `table` (`trace_table`).
    #[inline(always)]
    pub const fn with_table(self, table: u32) -> Verdict {
        Verdict(self.0 | ((table as u64) & Self::TABLE) << Self::TABLE_SHIFT)
    }

    /// This verdict, but for `outcome` (`trace_outcome`).
    #[inline(always)]
    pub const fn because(self, outcome: u32) -> Verdict {
        Verdict(self.0 | (outcome as u64) << Self::OUTCOME_SHIFT)
    }

    /// The XDP action.
    #[inline(always)]
    pub const fn action(self) -> u32 {
        (self.0 & Self::ACTION) as u32
    }

    /// `trace_outcome`.
    pub const fn outcome(self) -> u32 {
        (self.0 >> Self::OUTCOME_SHIFT) as u32
    }

    /// The packet's service: a forwarded one's, or the one a refusal counts for.
    pub fn service(self) -> Option<u32> {
        if self.0 & Self::SERVICE_KNOWN != 0 {
            Some((self.0 >> Self::SERVICE_SHIFT) as u32 & 0xff)
        } else {
            trace_outcome::refused_service(self.outcome())
        }
    }

    /// The backend's id, if one was chosen.
    pub fn backend(self) -> Option<u32> {
        match (self.0 >> Self::BACKEND_SHIFT) & Self::NO_BACKEND {
            Self::NO_BACKEND => None,
            id => Some(id as u32),
        }
    }

    /// The connection table's part (`trace_table`).
    pub fn table(self) -> u32 {
        (self.0 >> Self::TABLE_SHIFT & Self::TABLE) as u32
    }
}

/// `TraceEvent::outcome`.
pub mod trace_outcome {
    /// Forwarded to the backend.
    pub const FORWARDED: u32 = 0;
    /// Refused: this bit, and the program's refusal below it (the `Reason` in bits 0-7, bit 8
    /// set when the service is known, its id in bits 16-31).
    pub const REFUSED: u32 = 1 << 9;
    /// To a VIP's address, but no service has its port and protocol: passed up untouched.
    pub const NO_SERVICE: u32 = 1 << 10;
    /// A service packet whose frame could not be rewritten: passed up untouched.
    pub const NOT_REWRITTEN: u32 = 1 << 11;
    /// The refusal's reason (`Reason::from_index`).
    pub const REASON: u32 = 0xff;
    /// The refusal's service is known, in `SERVICE_SHIFT`.
    pub const SERVICE_KNOWN: u32 = 1 << 8;
    pub const SERVICE_SHIFT: u32 = 16;

    /// The service of a refusal, if it names one.
    #[inline(always)]
    pub fn refused_service(outcome: u32) -> Option<u32> {
        (outcome & REFUSED != 0 && outcome & SERVICE_KNOWN != 0).then_some(outcome >> SERVICE_SHIFT)
    }
}

/// The connection table's part in a `Verdict`. (What became of a new flow's request for a
/// record is not in it: carrying it to the exit cost the verifier 33,000 instructions more;
/// `lb_new_flows_total` counts it.)
pub mod trace_table {
    /// The slot is unchanged: the table was not read (its backend is every flow's).
    pub const NOT_READ: u32 = 0;
    /// The flow's record was found.
    pub const HIT: u32 = 1;
    /// The flow had no record.
    pub const MISS: u32 = 2;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_reads_back_what_the_program_put_in() {
        let v = Verdict::forwarded(4, 255, 16_383, trace_table::MISS);
        assert_eq!(v.action(), 4);
        assert_eq!(v.service(), Some(255));
        assert_eq!(v.backend(), Some(16_383));
        assert_eq!(v.outcome(), trace_outcome::FORWARDED);
        assert_eq!(v.table(), trace_table::MISS);

        let refusal = trace_outcome::REFUSED | 7 | trace_outcome::SERVICE_KNOWN | 12 << 16;
        let v = Verdict::refused(1, refusal);
        assert_eq!((v.action(), v.service(), v.backend()), (1, Some(12), None));
        assert_eq!(v.outcome() & trace_outcome::REASON, 7);
        assert_eq!(v.table(), trace_table::NOT_READ);

        let v = Verdict::refused(2, trace_outcome::NO_SERVICE);
        assert_eq!((v.action(), v.service(), v.backend()), (2, None, None));

        let v = Verdict::forwarded(3, 0, 0, 0).because(trace_outcome::NOT_REWRITTEN);
        assert_eq!((v.service(), v.backend()), (Some(0), Some(0)));
        assert_eq!(v.outcome(), trace_outcome::NOT_REWRITTEN);
    }
}
