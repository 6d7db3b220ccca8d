//! Map keys and values shared by the XDP program and lbd, and the logic both sides must agree
//! on: the keyed client hash and the Maglev table.
//!
//! Every type here is `#[repr(C)]` with explicit padding so its bytes are the same on both sides
//! of the map. Addresses of either family are stored as four raw 32-bit words exactly as they
//! appear on the wire (network byte order in memory); an IPv4 address fills the first word and
//! the rest are zero.
#![cfg_attr(not(any(feature = "user", test)), no_std)]

pub mod hash;
/// The table builder needs allocation: userspace only.
#[cfg(any(feature = "user", test))]
pub mod maglev;

/// Version of the pinned map layout. Bump it whenever any map's key, value, size or set of
/// maps changes: lbd pins maps under `bpffs_dir/v{LAYOUT_VERSION}` and never opens pins of
/// another version as its own.
pub const LAYOUT_VERSION: u32 = 5;

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

/// Maglev slots per element of a service's table array: backend ids are stored in 16 bits, four
/// to a u64 element (an array element takes 8 bytes whatever its value size, so a u32 per slot
/// would take 8). A 65,537-slot table is then 128 KiB instead of 512 KiB, which matters to a
/// stream of new flows from many clients: every one reads a slot at random.
pub const MAGLEV_SLOTS_PER_WORD: u32 = 4;
/// A slot's 16-bit value for "no backend".
const NO_BACKEND_16: u64 = 0xffff;

/// The backend id of Maglev `slot` in its table word `word` (`slot / MAGLEV_SLOTS_PER_WORD`).
#[inline(always)]
pub fn maglev_slot_value(word: u64, slot: u32) -> u32 {
    let id = (word >> ((slot % MAGLEV_SLOTS_PER_WORD) * 16)) & 0xffff;
    if id == NO_BACKEND_16 {
        NO_BACKEND
    } else {
        id as u32
    }
}

/// A Maglev table (one backend id or `NO_BACKEND` per slot) as the words of its array.
#[cfg(any(feature = "user", test))]
pub fn maglev_words(table: &[u32]) -> Vec<u64> {
    table
        .chunks(MAGLEV_SLOTS_PER_WORD as usize)
        .map(|chunk| {
            let mut word = u64::MAX; // missing slots of the last word: no backend
            for (lane, &id) in chunk.iter().enumerate() {
                let v = if id == NO_BACKEND {
                    NO_BACKEND_16
                } else {
                    id as u64 & 0xffff
                };
                word &= !(0xffff << (lane * 16));
                word |= v << (lane * 16);
            }
            word
        })
        .collect()
}

/// `BPF_F_INNER_MAP`: lets inner arrays of the Maglev array-of-maps differ in size.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `BPF_F_MMAPABLE`: lbd fills a new Maglev table with one copy into its memory, not one
/// syscall per slot.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// The flags of every Maglev table (inner maps must match the template's).
pub const MAGLEV_TABLE_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;
/// The flags of the connection table: lbd counts and reads it through its memory.
pub const CONNTRACK_FLAGS: u32 = BPF_F_MMAPABLE;
/// Entries per set of the connection table: a set is one 64-byte cache line.
pub const FLOW_WAYS: usize = 4;
/// Smallest connection table (entries).
pub const MIN_CONNTRACK_ENTRIES: u32 = 64;

/// Number of sets of a connection table asked to hold `entries` flows: `entries` rounded up to
/// a power of two (the set index is a mask of the flow hash, not a division), at least
/// `MIN_CONNTRACK_ENTRIES`, divided by `FLOW_WAYS`.
pub const fn conntrack_sets(entries: u32) -> u32 {
    let entries = if entries < MIN_CONNTRACK_ENTRIES {
        MIN_CONNTRACK_ENTRIES
    } else {
        entries
    };
    entries.next_power_of_two() / FLOW_WAYS as u32
}

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Names of the maps, as declared in the XDP program and pinned by lbd.
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const MAGLEV: &str = "MAGLEV";
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
    /// Every map lbd pins, in one list so pinning and cleanup cannot disagree.
    pub const ALL: [&str; 13] = [
        SERVICES,
        SERVICE_BY_ID,
        VIP_FILTER,
        MAGLEV,
        BACKENDS,
        CONFIG,
        CONNTRACK,
        FRAGS,
        VIPS,
        DEVMAP,
        SERVICE_STATS,
        BACKEND_STATS,
        REASON_STATS,
    ];
}

/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "lb_xdp";

/// An address of either family: four words as they appear on the wire.
pub type Addr = [u32; 4];

/// Key of `SERVICES`: what a packet's destination must match.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Destination port in network byte order; 0 matches every port of the VIP.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// Value of `SERVICE_BY_ID` (an array indexed by service id): a service with the key it answers
/// to. An established flow's entry names its service; the program checks that service's key
/// against the packet here instead of looking the destination up in `SERVICES` (a hash lookup,
/// ~10 ns). A free id has an all-zero entry (family 0 matches no packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    pub key: ServiceKey,
    pub value: ServiceValue,
}

/// 64-bit words of `VIP_FILTER`: a 65,536-bit Bloom filter of the VIP addresses.
pub const VIP_FILTER_WORDS: u32 = 1024;

/// The two bits of `VIP_FILTER` an address sets (lbd) and needs (the program): a packet whose
/// destination lacks either is no VIP's and passes after two array reads, where `SERVICES`
/// would cost two hash lookups (exact port, then port 0). Unkeyed: a false positive (about
/// (VIPs / 65,536)² for an address) only costs the full lookup.
#[inline(always)]
pub fn vip_filter_bits(addr: &Addr) -> [u32; 2] {
    let w0 = addr[0] as u64 | (addr[1] as u64) << 32;
    let w1 = addr[2] as u64 | (addr[3] as u64) << 32;
    // One multiply: each bit of the product depends on every input bit below it, so the top
    // 32 bits (the two indexes) see all of them. The rotation brings the last word of an IPv6
    // address (where addresses of one prefix differ) down to the low half; an IPv4 address's
    // last byte sits at bits 24-31 already.
    let h = (w0 ^ w1.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    [(h >> 48) as u32, (h >> 32) as u32 & 0xffff]
}

/// Forwarding and hashing flags of a service.
pub mod service_flags {
    /// Encapsulate in IP-in-IP instead of rewriting MACs.
    pub const TUNNEL: u32 = 1 << 0;
    /// Hash the 5-tuple instead of the client address.
    pub const HASH_5TUPLE: u32 = 1 << 1;
    /// In `VIPS`: the VIP has no single source-hashed service for this protocol, so a
    /// fragment that arrives before its first fragment cannot be placed.
    pub const NO_LATE_FRAGMENTS: u32 = 1 << 2;
}

/// Value of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Index in `MAGLEV` and `SERVICE_STATS`.
    pub id: u32,
    /// `service_flags`.
    pub flags: u32,
    /// Number of slots of this service's Maglev table (the modulus of the hash).
    pub table_size: u32,
    pub _pad: u32,
}

/// Flags of a backend entry.
pub mod backend_flags {
    /// The entry is filled in (an unused index has flags 0).
    pub const VALID: u8 = 1 << 0;
    /// Failed its health checks: established flows leave it too (they are rehashed). A drained
    /// backend is not down: it only stops taking new flows (it is absent from the table).
    pub const DOWN: u8 = 1 << 1;
}

/// Value of `BACKENDS`, indexed by backend id (the value stored in Maglev slots).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr,
    /// Outer source address for `tunnel` forwarding.
    pub tunnel_src: Addr,
    /// Destination MAC: the backend's (dsr) or its next hop's (tunnel).
    pub mac: [u8; 6],
    /// Source MAC: the egress interface's.
    pub src_mac: [u8; 6],
    /// Egress interface (for a VLAN, the VLAN device's parent).
    pub ifindex: u32,
    /// The service this backend belongs to: a connection-table entry is honoured only for its
    /// own service, and a restarted lbd recovers its ids from it.
    pub service: u32,
    pub family: u8,
    /// `backend_flags`.
    pub flags: u8,
    /// MTU of the egress interface (`tunnel`: an encapsulated packet must fit it).
    pub mtu: u16,
    /// The 802.1Q VLAN id frames to this backend carry on `ifindex` (its route leaves by a VLAN
    /// device on that interface), whatever tag they arrived with; 0: untagged.
    pub vlan: u16,
    pub _pad: u16,
}

/// Value of `CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The 128-bit hash seed as two SipHash key words.
    pub hash_key: [u64; 2],
    /// Fingerprint of the program object lbd loaded: an lbd with the same program adopts the
    /// running one instead of reloading it.
    pub program_hash: u64,
    /// `LAYOUT_VERSION` of the lbd that filled the maps.
    pub layout_version: u32,
    /// Sets of `CONNTRACK` minus one (a power of two minus one): a flow's set is its hash
    /// masked with this.
    pub flow_set_mask: u32,
}

/// A flow's 5-tuple as seen on the wire: what `hash::flow_hash` hashes for the connection table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    /// Ports in network byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// What the connection table says about a flow: the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub backend: u32,
    pub service: u32,
}

/// One entry of the connection table: a flow, known by its 64-bit keyed hash
/// (`hash::flow_hash`), and its backend.
///
/// `check` is the flow's hash XOR `ids`. An entry belongs to a flow when `check ^ hash == ids`:
/// the 64-bit hash tells flows apart (the flows of one set share the hash's low bits, the set
/// index; that two of them share the rest is a chance of 2^-46 at the default 262,144 sets),
/// and an entry torn by two CPUs writing it at once (one's `ids`, the other's `check`)
/// belongs to no flow, so it can send no flow to the wrong backend. An all-zero entry is free.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    pub check: u64,
    /// Backend id (low 16 bits) and service id (high 16 bits).
    pub ids: u32,
    /// When the flow was last seen: a coarse clock (jiffies / 64), never 0 in a used entry; the
    /// set's least recently seen entry makes room for a new flow.
    pub seen: u32,
}

impl FlowEntry {
    #[inline(always)]
    pub const fn ids_of(backend: u32, service: u32) -> u32 {
        (backend & 0xffff) | service << 16
    }

    #[inline(always)]
    pub const fn new(hash: u64, backend: u32, service: u32, seen: u32) -> FlowEntry {
        let ids = Self::ids_of(backend, service);
        FlowEntry {
            check: hash ^ ids as u64,
            ids,
            seen,
        }
    }

    /// Whether this entry is the flow of `hash`.
    #[inline(always)]
    pub const fn belongs_to(&self, hash: u64) -> bool {
        self.check ^ hash == self.ids as u64 && self.seen != 0
    }

    #[inline(always)]
    pub const fn value(&self) -> FlowValue {
        FlowValue {
            backend: self.ids & 0xffff,
            service: self.ids >> 16,
        }
    }
}

/// Value of `CONNTRACK` (an array indexed by `flow_hash & Config::flow_set_mask`): the
/// `FLOW_WAYS` entries of one set, one cache line. A flow is looked for in its set only;
/// when all of a set's entries are taken, the least recently seen one makes room.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSet {
    pub ways: [FlowEntry; FLOW_WAYS],
}

impl FlowSet {
    /// Where the flow of `hash` stands in this set at time `now` (the table's clock): the way
    /// holding its entry, if any, and the way a new entry takes — a free one, else the least
    /// recently seen (the first of equals). The program and lbd choose alike through this.
    #[inline(always)]
    pub fn place(&self, hash: u64, now: u32) -> (Option<usize>, usize) {
        let mut victim = 0;
        let mut oldest = 0u32;
        let mut i = 0;
        while i < FLOW_WAYS {
            let e = &self.ways[i];
            if e.belongs_to(hash) {
                return (Some(i), i);
            }
            let age = if e.seen == 0 {
                u32::MAX
            } else {
                now.wrapping_sub(e.seen)
            };
            if age > oldest {
                oldest = age;
                victim = i;
            }
            i += 1;
        }
        (None, victim)
    }

    /// The entry of the flow of `hash`, if the set has one.
    #[inline(always)]
    pub fn find(&self, hash: u64) -> Option<&FlowEntry> {
        self.ways.iter().find(|e| e.belongs_to(hash))
    }
}

/// Key of `FRAGS`: one fragmented datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: Addr,
    pub dst: Addr,
    /// The IP identification (IPv4: 16 bits, IPv6: the fragment header's 32 bits).
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Value of `FRAGS`: where the datagram's first fragment went, so the others follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    pub backend: u32,
    pub service: ServiceValue,
}

/// Key of `VIPS`: a VIP and protocol, whatever the port (for fragments without ports).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: Addr,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
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
    /// The Maglev table or backend entry was missing (lbd mid-change): passed up.
    MissingState = 4,
    /// The backend's interface cannot be redirected to (absent from `DEVMAP`): dropped.
    NoEgress = 5,
    /// Too big for the tunnel, and this CPU's "too big" answers are over their rate
    /// (`TooBigBucket`): dropped without an answer.
    TooBigSuppressed = 6,
}

impl Reason {
    pub const COUNT: u32 = 7;
    pub const ALL: [Reason; Reason::COUNT as usize] = [
        Reason::NoBackend,
        Reason::Malformed,
        Reason::UnsupportedFragment,
        Reason::TooBig,
        Reason::MissingState,
        Reason::NoEgress,
        Reason::TooBigSuppressed,
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

/// The per-CPU token bucket of "too big" answers, as one number (the generic cell rate
/// algorithm): `due` is when the bucket would hold no token if every answer so far had taken
/// one at the allowed rate. An answer may go while `due` lies at most `TOO_BIG_BURST - 1`
/// intervals ahead of now, and pushes it one interval further. A zero bucket is full.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TooBigBucket {
    /// Nanoseconds on the clock `take` is given (the program's: bpf_ktime_get_ns).
    pub due: u64,
}

impl TooBigBucket {
    const INTERVAL_NS: u64 = 1_000_000_000 / TOO_BIG_PER_SECOND;
    const TOLERANCE_NS: u64 = (TOO_BIG_BURST - 1) * Self::INTERVAL_NS;

    /// Whether an answer may be sent at `now_ns`; if so its token is taken.
    #[inline(always)]
    pub fn take(&mut self, now_ns: u64) -> bool {
        let due = if self.due > now_ns { self.due } else { now_ns };
        if due - now_ns > Self::TOLERANCE_NS {
            return false;
        }
        self.due = due + Self::INTERVAL_NS;
        true
    }
}

#[cfg(test)]
mod too_big_bucket_tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_burst_then_the_rate() {
        let mut b = TooBigBucket::default();
        let t0 = 5_000 * MS;
        let burst = (0..200).filter(|_| b.take(t0)).count() as u64;
        assert_eq!(
            burst, TOO_BIG_BURST,
            "a full bucket gives its burst at once"
        );
        assert!(
            !b.take(t0 + MS / 2),
            "no token before an interval has passed"
        );
        assert!(b.take(t0 + MS), "one token per interval");
        assert!(!b.take(t0 + MS));
        // Offered 10 answers per ms for a second: the rate is what goes out.
        let mut sent = 0;
        for i in 0..10_000u64 {
            sent += b.take(t0 + 2 * MS + i * MS / 10) as u64;
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
        while b.take(t0) {}
        let later = t0 + 3_600_000 * MS;
        let burst = (0..200).filter(|_| b.take(later)).count() as u64;
        assert_eq!(burst, TOO_BIG_BURST);
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], made only of integers and integer arrays, with every
    // padding byte spelled out as a field, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::ServiceEntry {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::FlowSet {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragValue {}
    unsafe impl aya::Pod for super::VipKey {}
}

#[cfg(test)]
mod flow_tests {
    use super::*;

    #[test]
    fn conntrack_sets_round_up_to_a_power_of_two() {
        assert_eq!(conntrack_sets(1_048_576), 262_144);
        assert_eq!(conntrack_sets(1_000_000), 262_144);
        assert_eq!(conntrack_sets(65_536), 16_384);
        assert_eq!(conntrack_sets(1), 16);
        assert_eq!(conntrack_sets(1 << 27), 1 << 25);
    }

    #[test]
    fn a_new_flow_takes_a_free_way_else_the_least_recently_seen() {
        let mut set = FlowSet::default();
        set.ways[0] = FlowEntry::new(10, 1, 0, 100);
        set.ways[2] = FlowEntry::new(12, 1, 0, 90);
        assert_eq!(set.place(10, 101), (Some(0), 0));
        assert_eq!(set.place(99, 101), (None, 1), "the first free way");
        set.ways[1] = FlowEntry::new(11, 1, 0, 95);
        set.ways[3] = FlowEntry::new(13, 1, 0, 100);
        assert_eq!(set.place(99, 101), (None, 2), "seen longest ago");
        // Ages count across the clock's wrap: a stamp from just before it is the oldest.
        set.ways[2].seen = u32::MAX - 5;
        set.ways[1].seen = 3;
        assert_eq!(set.place(99, 101), (None, 2));
    }

    #[test]
    fn an_entry_belongs_to_its_flow_only() {
        let e = FlowEntry::new(0x1234_5678_9abc_def0, 7, 3, 1);
        assert!(e.belongs_to(0x1234_5678_9abc_def0));
        assert!(!e.belongs_to(0x1234_5678_9abc_def1));
        assert_eq!(
            e.value(),
            FlowValue {
                backend: 7,
                service: 3
            }
        );
        // Free entries belong to nobody, not even the flow whose hash is 0.
        assert!(!FlowEntry::default().belongs_to(0));
        // Torn: one flow's ids with another's check.
        let other = FlowEntry::new(0x0fed_cba9_8765_4321, 9, 3, 1);
        let torn = FlowEntry {
            ids: other.ids,
            ..e
        };
        assert!(!torn.belongs_to(0x1234_5678_9abc_def0));
        assert!(!torn.belongs_to(0x0fed_cba9_8765_4321));
    }
}

#[cfg(test)]
mod maglev_word_tests {
    use super::*;

    #[test]
    fn every_slot_reads_back_from_its_word() {
        let table: Vec<u32> = (0..13u32)
            .map(|i| {
                if i % 5 == 4 {
                    NO_BACKEND
                } else {
                    i * 1000 % MAX_BACKENDS
                }
            })
            .collect();
        let words = maglev_words(&table);
        assert_eq!(words.len(), 4);
        for (slot, &id) in table.iter().enumerate() {
            let word = words[slot / MAGLEV_SLOTS_PER_WORD as usize];
            assert_eq!(maglev_slot_value(word, slot as u32), id, "slot {slot}");
        }
        // Backend ids fit in 16 bits, with room for the no-backend value.
        assert!(MAX_BACKENDS <= NO_BACKEND_16 as u32);
    }
}

#[cfg(test)]
mod vip_filter_tests {
    use super::*;

    #[test]
    fn vip_filter_bits_spread_addresses_of_both_families() {
        // 256 VIPs of one /24 and 256 of one IPv6 /120 set ~1,024 distinct bits; the chance that
        // another address (65,536 of other /16s tried) has both bits set stays near the
        // Bloom-filter estimate (1,024 / 65,536)² = 0.024%.
        let mut bits = vec![false; 65_536];
        for i in 0..256u32 {
            for a in [
                [u32::from_be(0xcb00_7100 | i), 0, 0, 0],
                [u32::from_be(0x2001_0db8), 0, 0, u32::from_be(0x100 | i)],
            ] {
                for b in vip_filter_bits(&a) {
                    assert!(b < 65_536);
                    bits[b as usize] = true;
                }
            }
        }
        let set = bits.iter().filter(|&&b| b).count();
        assert!(set > 950, "{set} bits set");
        let positives = (0..65_536u32)
            .filter(|i| {
                let a = [u32::from_be(0x0a00_0000 | i << 8 | 1), 0, 0, 0];
                vip_filter_bits(&a).iter().all(|&b| bits[b as usize])
            })
            .count();
        assert!(positives < 65, "{positives} false positives of 65,536");
    }
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
        assert_eq!(size_of::<Config>(), 32);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowValue>(), 8);
        assert_eq!(size_of::<FlowEntry>(), 16);
        assert_eq!(size_of::<FlowSet>(), 64);
        assert_eq!(size_of::<Counter>(), 16);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<FragValue>(), 20);
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<TooBigBucket>(), 8);
    }
}

/// The decapsulation program backends run (`lbd decap`): it strips the outer header of
/// IPv4-in-IPv4 and IPv6-in-IPv6 packets addressed to the interface's own addresses, sent from
/// an allowed source (the balancers) to an inner destination of this host. `lbd decap` keeps
/// the addresses in `ADDRS` and the allowed sources in `ALLOW` (one map of each per
/// interface); the program counts what it did in `STATS`.
pub mod decap {
    use super::Addr;

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
}

#[cfg(feature = "user")]
mod decap_pod {
    // SAFETY: #[repr(C)], integers and integer arrays only, padding spelled out as a field.
    unsafe impl aya::Pod for super::decap::AddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::decap::AllowData {}
}
