//! What the program decides for a packet, as types: `Chosen` (a service packet's service and
//! backend), `Skip` (why a packet is not forwarded: `NotOurs`, or refused for a `Reason`) and
//! `Egress` (where the rewritten frame goes). Steps return `Result<_, Skip>` (or `Reason`, or
//! `NotOurs`, which convert into it with `?`); `Status` carries one across a BPF-to-BPF call.

use lb_common::{Backend, Reason, ServiceValue, trace_outcome};

/// The service and backend of a packet that is to be forwarded.
#[derive(Clone, Copy)]
pub struct Chosen {
    pub service: ServiceValue,
    /// Index of `backend` in `BACKENDS` (and `BACKEND_STATS`).
    pub backend_id: u32,
    /// The `BACKENDS` entry: valid for this program run.
    pub backend: &'static Backend,
}

/// Why a packet is not forwarded.
#[derive(Clone, Copy)]
pub enum Skip {
    /// Not a service packet (no VIP's, not TCP or UDP, not IP, or the maps are not filled in
    /// yet), or one that cannot be read: passed to the kernel untouched and not counted.
    NotOurs,
    /// A service packet that is not forwarded: counted under its reason (and its service's,
    /// when the service is known), then dropped or passed up (`Skip::drops`).
    Refused(Refusal),
}

/// Why a service packet is refused, and the service it counts for when the packet's service is
/// known: one register (the reason in the low byte, `SERVICE_KNOWN`, the service id in the
/// high half), so it crosses calls and `Status` whole.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Refusal(u32);

impl Refusal {
    const REASON: u32 = trace_outcome::REASON;
    const SERVICE_KNOWN: u32 = trace_outcome::SERVICE_KNOWN;
    const SERVICE_SHIFT: u32 = trace_outcome::SERVICE_SHIFT;

    /// Refused for `reason`, for service `id`.
    #[inline(always)]
    pub fn of(reason: Reason, id: u32) -> Refusal {
        Refusal(reason as u32 | Self::SERVICE_KNOWN | id << Self::SERVICE_SHIFT)
    }

    #[inline(always)]
    pub fn reason(self) -> Reason {
        Reason::from_index(self.0 & Self::REASON)
    }

    /// The refusal as a trace notes it (`lb_common::trace_outcome`).
    #[inline(always)]
    pub fn traced(self) -> u32 {
        trace_outcome::REFUSED | self.0
    }

    /// The service id the refusal counts for, if known.
    #[inline(always)]
    pub fn service(self) -> Option<u32> {
        (self.0 & Self::SERVICE_KNOWN != 0).then_some(self.0 >> Self::SERVICE_SHIFT)
    }
}

/// A service id no service has: a refusal for it counts for no service.
pub const NO_SERVICE: u32 = u32::MAX;

/// `Skip::NotOurs` as a type of its own, for steps that can only find a packet not ours: its
/// `Result` carries no undefined reason bytes (LLVM stores those, and the verifier refuses a
/// store of an uninitialised register).
#[derive(Clone, Copy)]
pub struct NotOurs;

impl From<NotOurs> for Skip {
    #[inline(always)]
    fn from(_: NotOurs) -> Skip {
        Skip::NotOurs
    }
}

/// A refusal of a step that does not know the service (the caller names it: `for_service`).
impl From<Reason> for Skip {
    #[inline(always)]
    fn from(reason: Reason) -> Skip {
        Skip::Refused(Refusal(reason as u32))
    }
}

impl Skip {
    /// Refused for `reason`, for service `id`.
    #[inline(always)]
    pub fn refused(reason: Reason, id: u32) -> Skip {
        Skip::Refused(Refusal::of(reason, id))
    }

    /// A refusal whose service is not known yet counts for service `id` (`NO_SERVICE`: none).
    #[inline(always)]
    pub fn for_service(self, id: u32) -> Skip {
        match self {
            Skip::Refused(r) if r.0 & Refusal::SERVICE_KNOWN == 0 && id != NO_SERVICE => {
                Skip::Refused(Refusal::of(r.reason(), id))
            }
            other => other,
        }
    }

    /// Whether the packet is dropped (no usable backend: the client retries; too big; no
    /// egress; a filtered client), else passed up (the kernel decides).
    #[inline(always)]
    pub fn drops(self) -> bool {
        match self {
            Skip::NotOurs => false,
            Skip::Refused(r) => matches!(
                r.reason(),
                Reason::NoBackend
                    | Reason::TooBig
                    | Reason::TooBigSuppressed
                    | Reason::NoEgress
                    | Reason::Denied
            ),
        }
    }
}

/// What `place` did with a packet it did not refuse: chose its backend, or found its slot
/// changed (the connection table decides, in a call of its own from the main program).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    Chosen,
    OnChangedSlot,
}

/// A `Result<Placed, Skip>` as the one register a BPF-to-BPF call returns, encoded and decoded
/// here only. (A `Result<Chosen, Skip>` written whole into the caller's frame does not do: the bytes
/// of the variant not taken are undefined, and the verifier refuses the stores LLVM makes of
/// them.)
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Status(u32);

impl Status {
    const OK: u32 = 0;
    const NOT_OURS: u32 = 1;
    const CHANGED_SLOT: u32 = 2;
    /// `Refused(refusal)`: this bit, and the refusal's bits (which never use it). The same
    /// encoding as a trace's outcome (`lb_common::trace_outcome`).
    const REFUSED: u32 = trace_outcome::REFUSED;

    #[inline(always)]
    pub fn encode(result: Result<Placed, Skip>) -> Status {
        Status(match result {
            Ok(Placed::Chosen) => Self::OK,
            Ok(Placed::OnChangedSlot) => Self::CHANGED_SLOT,
            Err(Skip::NotOurs) => Self::NOT_OURS,
            Err(Skip::Refused(refusal)) => Self::REFUSED | refusal.0,
        })
    }

    #[inline(always)]
    pub fn decode(self) -> Result<Placed, Skip> {
        match self.0 {
            Self::OK => Ok(Placed::Chosen),
            Self::CHANGED_SLOT => Ok(Placed::OnChangedSlot),
            Self::NOT_OURS => Err(Skip::NotOurs),
            code => Err(Skip::Refused(Refusal(code & !Self::REFUSED))),
        }
    }
}

/// Where the rewrite sent the frame. Only a frame rewritten for the backend leaves by the
/// backend's interface and counts as the service's and backend's traffic; an answer to the
/// sender goes back out of the receiving interface.
pub enum Egress {
    /// Rewritten for the backend (dsr MACs, or encapsulated).
    ToBackend,
    /// Turned into an answer to the sender (ICMP "fragmentation needed" / "packet too big").
    ReplyToSender,
}
