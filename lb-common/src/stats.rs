//! What the program counts (`SERVICE_STATS`, `BACKEND_STATS`, `REASON_STATS`, and every
//! refused packet of a known service once more in `SERVICE_REASON_STATS`) and the budget of its
//! "too big" answers (`TOO_BIG_BUCKET`).

/// Reasons each service has room for in `SERVICE_REASON_STATS` (a power of two, at least
/// `Reason::COUNT`): its counters are at `service id × REASONS_PER_SERVICE + reason`.
pub const REASONS_PER_SERVICE: u32 = 16;
const _: () = assert!(Reason::COUNT <= REASONS_PER_SERVICE);

/// The index in `SERVICE_REASON_STATS` of `reason` for service `id`.
#[inline(always)]
pub const fn service_reason_index(id: u32, reason: Reason) -> u32 {
    id * REASONS_PER_SERVICE + reason as u32
}

/// Per-CPU packet and byte counter (`SERVICE_STATS`, `BACKEND_STATS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Why the program dropped a packet or passed a VIP packet up instead of forwarding it.
/// Indexes `REASON_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A VIP packet whose service has no usable backend: dropped.
    NoBackend = 0,
    /// A VIP packet whose headers are inconsistent (bad lengths): passed up.
    Malformed = 1,
    /// A fragment the data path cannot place: passed up.
    UnsupportedFragment = 2,
    /// Does not fit the egress MTU once encapsulated: answered with ICMP "fragmentation
    /// needed" / "packet too big" (DF set, or IPv6), else dropped.
    TooBig = 3,
    /// State the program needs was not there: the Maglev table or the backend entry it names
    /// (lbd mid-change), or room in the frame (a kernel helper refused to grow, cut or checksum
    /// it for a tunnel packet or a "too big" answer): passed up.
    MissingState = 4,
    /// The backend's interface cannot be redirected to (absent from `DEVMAP`): dropped.
    NoEgress = 5,
    /// Too big for the tunnel, and this CPU's "too big" answers are over their rate
    /// (`TooBigBucket`): dropped without an answer.
    TooBigSuppressed = 6,
    /// The client is on the service's `deny` list, or the service has an `allow` list and
    /// the client is on none of it: dropped.
    Denied = 7,
}

impl Reason {
    pub const COUNT: u32 = 8;
    pub const ALL: [Reason; Reason::COUNT as usize] = [
        Reason::NoBackend,
        Reason::Malformed,
        Reason::UnsupportedFragment,
        Reason::TooBig,
        Reason::MissingState,
        Reason::NoEgress,
        Reason::TooBigSuppressed,
        Reason::Denied,
    ];
    /// The reason at `index` (`Reason as u32`); out-of-range indexes read as `MissingState`.
    pub const fn from_index(index: u32) -> Reason {
        match index {
            0 => Reason::NoBackend,
            1 => Reason::Malformed,
            2 => Reason::UnsupportedFragment,
            3 => Reason::TooBig,
            5 => Reason::NoEgress,
            6 => Reason::TooBigSuppressed,
            7 => Reason::Denied,
            _ => Reason::MissingState,
        }
    }

    /// The `reason` label of `lb_dropped_total`.
    pub const fn label(self) -> &'static str {
        match self {
            Reason::NoBackend => "no_backend",
            Reason::Malformed => "malformed",
            Reason::UnsupportedFragment => "unsupported_fragment",
            Reason::TooBig => "too_big",
            Reason::MissingState => "missing_state",
            Reason::NoEgress => "no_egress",
            Reason::TooBigSuppressed => "too_big_suppressed",
            Reason::Denied => "denied",
        }
    }
}

#[cfg(test)]
mod reason_tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_index_and_label() {
        assert_eq!(Reason::ALL.len(), Reason::COUNT as usize);
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32, "{r:?} is listed at its index");
            assert_eq!(Reason::from_index(i as u32), *r);
            let same_label = Reason::ALL
                .iter()
                .filter(|o| o.label() == r.label())
                .count();
            assert_eq!(same_label, 1, "{} is the label of one reason", r.label());
        }
    }
}

/// "Too big" answers (ICMP "fragmentation needed" / "packet too big") each CPU may send per
/// second, after a burst of `TOO_BIG_BURST`: RFC 4443 §2.4(f) asks ICMP senders to limit their
/// errors; these are the figures of Linux's own ICMP limit (`icmp_msgs_per_sec`,
/// `icmp_msgs_burst`). A client sends a too-big packet once per path-MTU change and flow, so
/// only a flood goes over it.
pub const TOO_BIG_PER_SECOND: u64 = 1_000;
pub const TOO_BIG_BURST: u64 = 50;

/// A per-CPU token bucket as one number (the generic cell rate algorithm): `due` is when the
/// bucket would hold no token if every event so far had taken one at the allowed rate (one per
/// `interval_ns`). An event may go while `due` lies at most `tolerance_ns` ahead of now (the
/// burst less one interval), and pushes it one interval further. A zero bucket is full. Used
/// for the "too big" answers (`TOO_BIG_PER_SECOND`) and new records (`daemon.new_flow_limit`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateBucket {
    /// Nanoseconds on the clock `take` is given (the program's: bpf_ktime_get_ns).
    pub due: u64,
}

impl RateBucket {
    /// Whether an event may go at `now_ns`; if so its token is taken.
    #[inline(always)]
    pub fn take(&mut self, now_ns: u64, interval_ns: u64, tolerance_ns: u64) -> bool {
        let due = if self.due > now_ns { self.due } else { now_ns };
        if due - now_ns > tolerance_ns {
            return false;
        }
        self.due = due + interval_ns;
        true
    }
}

/// The "too big" answers' bucket (`RateBucket`) and its figures.
pub type TooBigBucket = RateBucket;
/// Interval of the "too big" answers' bucket.
pub const TOO_BIG_INTERVAL_NS: u64 = 1_000_000_000 / TOO_BIG_PER_SECOND;
/// Tolerance of the "too big" answers' bucket: a burst of `TOO_BIG_BURST`.
pub const TOO_BIG_TOLERANCE_NS: u64 = (TOO_BIG_BURST - 1) * TOO_BIG_INTERVAL_NS;

/// lbd's default `daemon.new_flow_limit`: new records each CPU may write per second.
pub const DEFAULT_NEW_FLOW_LIMIT: u32 = 200_000;
/// The burst of new records above the rate: 100 ms worth at any limit.
pub const NEW_FLOW_BURST_NS: u64 = 100_000_000;

/// What became of a new flow that asked for a record (on a changed slot; flows on unchanged
/// slots need none). Indexes `NEW_FLOW_STATS` (per CPU).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewFlow {
    /// Recorded (tentatively, until its next packet).
    Recorded = 0,
    /// Not recorded: over this CPU's `new_flow_limit`.
    OverLimit = 1,
    /// Not recorded: its set of the connection table holds only established flows' records.
    NoRoom = 2,
}

impl NewFlow {
    pub const COUNT: u32 = 3;
    pub const ALL: [NewFlow; NewFlow::COUNT as usize] =
        [NewFlow::Recorded, NewFlow::OverLimit, NewFlow::NoRoom];

    /// The `outcome` label of `lb_new_flows_total`.
    pub const fn label(self) -> &'static str {
        match self {
            NewFlow::Recorded => "recorded",
            NewFlow::OverLimit => "over_limit",
            NewFlow::NoRoom => "no_room",
        }
    }
}

#[cfg(test)]
mod too_big_bucket_tests {
    use super::*;

    fn take(b: &mut TooBigBucket, now: u64) -> bool {
        b.take(now, TOO_BIG_INTERVAL_NS, TOO_BIG_TOLERANCE_NS)
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn a_burst_then_the_rate() {
        let mut b = TooBigBucket::default();
        let t0 = 5_000 * MS;
        let burst = (0..200).filter(|_| take(&mut b, t0)).count() as u64;
        assert_eq!(
            burst, TOO_BIG_BURST,
            "a full bucket gives its burst at once"
        );
        assert!(
            !take(&mut b, t0 + MS / 2),
            "no token before an interval has passed"
        );
        assert!(take(&mut b, t0 + MS), "one token per interval");
        assert!(!take(&mut b, t0 + MS));
        // Offered 10 answers per ms for a second: the rate is what goes out.
        let mut sent = 0;
        for i in 0..10_000u64 {
            sent += take(&mut b, t0 + 2 * MS + i * MS / 10) as u64;
        }
        assert!(
            (TOO_BIG_PER_SECOND - 1..=TOO_BIG_PER_SECOND + 1).contains(&sent),
            "{sent} in a second"
        );
    }

    #[test]
    fn a_quiet_spell_refills_the_burst_and_no_more() {
        let mut b = TooBigBucket::default();
        let t0 = 7 * MS;
        while take(&mut b, t0) {}
        let later = t0 + 3_600_000 * MS;
        let burst = (0..200).filter(|_| take(&mut b, later)).count() as u64;
        assert_eq!(burst, TOO_BIG_BURST);
    }
}
