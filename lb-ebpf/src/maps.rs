//! The maps of the balancer program (names in `lb_common::maps`; lbd pins every one but the
//! per-CPU scratch of the program's own: `TOO_BIG_BUCKET`, `NEW_FLOW_BUCKET`, `TRACE_PACKET`).

use aya_ebpf::{
    btf_maps::{
        Array, ArrayOfMaps, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf,
    },
    macros::btf_map,
};
use lb_common::{
    BPF_F_MMAPABLE, Backend, CONNTRACK_FLAGS, Config, Counter, DEFAULT_TABLE_FLAGS,
    DEFAULT_TABLE_WORDS, FilterData, FlowKey, FragKey, FragValue, MAGLEV_TABLE_FLAGS, MAX_BACKENDS,
    MAX_FILTER_PREFIXES, MAX_SERVICES, NewFlow, REASONS_PER_SERVICE, RateBucket, Reason, RecordSet,
    SERVICE_INDEX_SLOTS, SYNC_EVENTS_BYTES, ServiceEntry, ServiceIndexEntry, ServiceKey,
    ServiceValue, SyncEvent, TRACE_EVENTS_BYTES, TooBigBucket, TraceEvent, VIP_FILTER_WORDS,
    VipKey,
    nat::{NAT_ENTRIES, NAT_FILTER_WORDS, NatFlow, NatReply},
};

#[btf_map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }> = HashMap::new();

/// A direct-mapped copy of `SERVICES`, read first (`lb_common::ServiceIndexEntry`); lbd
/// rewrites its entries in place through the array's memory.
#[btf_map]
pub static SERVICE_INDEX: Array<
    ServiceIndexEntry,
    { SERVICE_INDEX_SLOTS as usize },
    { BPF_F_MMAPABLE as usize },
> = Array::new();

/// Services by id, each with its key (lbd's bookkeeping: the program does not read it).
#[btf_map]
pub static SERVICE_BY_ID: Array<ServiceEntry, { MAX_SERVICES as usize }> = Array::new();

/// A Bloom filter of the VIP addresses (two bits each, see `lb_common::vip_filter_bits`): most
/// packets that are no VIP's leave after two array reads.
#[btf_map]
pub static VIP_FILTER: Array<u64, { VIP_FILTER_WORDS as usize }, { BPF_F_MMAPABLE as usize }> =
    Array::new();

/// One Maglev table per service id, with its slot state (`lb_common::slotstate`): the hot half
/// (each slot's backend and whether it changed), then the side half. lbd builds a new inner
/// array aside and swaps it in with a single update, so the program never sees a half-built
/// table, and clears changed slots in place. BPF_F_INNER_MAP lets each service's table have its
/// own size. Only tables of a size other than the default are here (`MAGLEV_DEFAULT`).
#[btf_map]
pub static MAGLEV: ArrayOfMaps<
    Array<u64, 1, { MAGLEV_TABLE_FLAGS as usize }>,
    { MAX_SERVICES as usize },
> = ArrayOfMaps::new();

/// The same for tables of the default size (`lb_common::in_default_tables`), all of one size:
/// the verifier inlines a read of them, where a read of `MAGLEV` is a call.
#[btf_map]
pub static MAGLEV_DEFAULT: ArrayOfMaps<
    Array<u64, { DEFAULT_TABLE_WORDS as usize }, { DEFAULT_TABLE_FLAGS as usize }>,
    { MAX_SERVICES as usize },
> = ArrayOfMaps::new();

#[btf_map]
pub static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

#[btf_map]
pub static CONFIG: Array<Config, 1> = Array::new();

/// The connection table: flow → backend, for flows on changed Maglev slots only, so a flow
/// keeps its backend when the table changes. A set-associative cache in an array (see
/// `RecordSet`): finding a flow is one hash of
/// the program's own and one inlined array access, and recording one is a few stores, where a
/// kernel LRU hash spends ~150 ns taking an element off its lists under a lock. Shared, not
/// per-CPU: on veth, and with RPS, one flow's packets can be handled on different CPUs, and
/// every CPU must see its entry. lbd sizes it from `daemon.conntrack_entries`.
#[btf_map]
pub static CONNTRACK: Array<RecordSet, 16_384, { CONNTRACK_FLAGS as usize }> = Array::new();

/// Where the first fragment of a datagram went: the later ones (which carry no ports) follow.
#[btf_map]
pub static FRAGS: LruHashMap<FragKey, FragValue, 8192> = LruHashMap::new();

/// VIP and protocol → the VIP's source-hashed service, for fragments that come before their
/// first fragment (or `NO_LATE_FRAGMENTS` when there is no single such service).
#[btf_map]
pub static VIPS: HashMap<VipKey, ServiceValue, { MAX_SERVICES as usize }> = HashMap::new();

/// Egress interfaces other than the receiving one (tunnel next hops), by ifindex.
#[btf_map]
pub static DEVMAP: DevMapHash<64> = DevMapHash::new();

#[btf_map]
pub static SERVICE_STATS: PerCpuArray<Counter, { MAX_SERVICES as usize }> = PerCpuArray::new();

/// `nat`: the replies each service's backends sent through the program (rewritten and sent
/// on to the client; replies of flows it does not know are not counted).
#[btf_map]
pub static SERVICE_REPLY_STATS: PerCpuArray<Counter, { MAX_SERVICES as usize }> =
    PerCpuArray::new();

#[btf_map]
pub static BACKEND_STATS: PerCpuArray<Counter, { MAX_BACKENDS as usize }> = PerCpuArray::new();

#[btf_map]
pub static REASON_STATS: PerCpuArray<u64, { Reason::COUNT as usize }> = PerCpuArray::new();

/// Every refused packet of a known service, once more by service and reason
/// (`lb_common::service_reason_index`).
#[btf_map]
pub static SERVICE_REASON_STATS: PerCpuArray<
    u64,
    { (MAX_SERVICES * REASONS_PER_SERVICE) as usize },
> = PerCpuArray::new();

/// Each service's client filters (`lb_common::filter`): its `deny` and `allow` prefixes,
/// keyed by service id and list (value unused, 1).
#[btf_map]
pub static FILTERS: LpmTrie<FilterData, u8, { MAX_FILTER_PREFIXES as usize }> = LpmTrie::new();

/// Each CPU's budget of "too big" answers. Not pinned (nothing outside the program reads it):
/// a newly loaded program starts with full buckets.
#[btf_map]
pub static TOO_BIG_BUCKET: PerCpuArray<TooBigBucket, 1> = PerCpuArray::new();

/// What became of the new flows that asked for a record (`lb_common::NewFlow`), per CPU.
#[btf_map]
pub static NEW_FLOW_STATS: PerCpuArray<u64, { NewFlow::COUNT as usize }> = PerCpuArray::new();

/// Each CPU's budget of new records (`Config::new_flow_interval_ns`). Not pinned, like
/// `TOO_BIG_BUCKET`.
#[btf_map]
pub static NEW_FLOW_BUCKET: PerCpuArray<RateBucket, 1> = PerCpuArray::new();

/// The packets of a trace (`lb_common::TraceEvent`), written only while `Config::trace` is set.
#[btf_map]
pub static TRACE_EVENTS: RingBuf<TraceEvent, { TRACE_EVENTS_BYTES as usize }> = RingBuf::new();

/// Each CPU's copy of the packet under way, parsed at the program's start while a trace runs
/// (`crate::trace`).
#[btf_map]
pub static TRACE_PACKET: PerCpuArray<crate::trace::Captured, 1> = PerCpuArray::new();

/// The records the program writes, for lbd to share with other nodes (`lb_common::SyncEvent`);
/// written only while `Config::sync_events` is set.
#[btf_map]
pub static SYNC_EVENTS: RingBuf<SyncEvent, { SYNC_EVENTS_BYTES as usize }> = RingBuf::new();

/// `nat`: each flow's backend, by the request's flow (client → VIP; `lb_common::nat`).
#[btf_map]
pub static NAT_FLOWS: LruHashMap<FlowKey, NatFlow, { NAT_ENTRIES as usize }> = LruHashMap::new();

/// `nat`: what a reply needs, by the reply's flow (backend → client).
#[btf_map]
pub static NAT_REPLIES: LruHashMap<FlowKey, NatReply, { NAT_ENTRIES as usize }> = LruHashMap::new();

/// `nat`: a Bloom filter of the NAT backends' addresses (bits as `VIP_FILTER`'s): a packet
/// from any other source is no NAT reply and passes after two array reads.
#[btf_map]
pub static NAT_FILTER: Array<u64, { NAT_FILTER_WORDS as usize }, { BPF_F_MMAPABLE as usize }> =
    Array::new();

/// `nat`: each CPU's room for the keys and values a new NAT flow writes (not pinned).
#[btf_map]
pub static NAT_SCRATCH: PerCpuArray<crate::nat::Scratch, 1> = PerCpuArray::new();
