//! lb's XDP data path. It reads like the packet: parse (Ethernet, optional 802.1Q, IPv4 or IPv6
//! with its extension headers, then the ports, or the flow an ICMP error quotes), classify (the
//! VIP filter; an established flow's entry names its service, checked against the packet;
//! otherwise the destination is looked up in `SERVICES`), choose (connection table, else the
//! Maglev slot of the keyed hash), rewrite (direct server return: MACs and VLAN tag only;
//! tunnel: IP-in-IP), send (the receiving interface, or a redirect), count. Anything that is not
//! a service packet is passed to the kernel untouched; every VIP packet that is not forwarded is
//! counted by reason.
#![no_std]
#![no_main]

mod access;
mod headers;
mod l2;
mod packet;
mod tunnel;

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, ArrayOfMaps, DevMapHash, HashMap, LruHashMap, PerCpuArray},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use headers::ETH_HLEN;
use lb_common::{
    BPF_F_MMAPABLE, Backend, CONNTRACK_FLAGS, Config, Counter, FLOW_WAYS, FlowEntry, FlowSet,
    FragKey, FragValue, MAGLEV_SLOTS_PER_WORD, MAGLEV_TABLE_FLAGS, MAX_BACKENDS, MAX_SERVICES,
    NO_BACKEND, Reason, ServiceEntry, ServiceKey, ServiceValue, TooBigBucket, VIP_FILTER_WORDS,
    VipKey, backend_flags, hash, maglev_slot_value, service_flags, vip_filter_bits,
};
use packet::{Frag, Packet, write_hdr};

// ---- maps (names in lb_common::maps; lbd pins every one) ----

#[btf_map]
static SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }> = HashMap::new();

/// Services by id, each with its key: an established flow's service, checked against the packet
/// without a hash lookup.
#[btf_map]
static SERVICE_BY_ID: Array<ServiceEntry, { MAX_SERVICES as usize }> = Array::new();

/// A Bloom filter of the VIP addresses (two bits each, see `lb_common::vip_filter_bits`): most
/// packets that are no VIP's leave after two array reads.
#[btf_map]
static VIP_FILTER: Array<u64, { VIP_FILTER_WORDS as usize }, { BPF_F_MMAPABLE as usize }> =
    Array::new();

/// One Maglev table per service id. lbd builds a new inner array aside and swaps it in with a
/// single update, so the program never sees a half-built table. BPF_F_INNER_MAP lets each
/// service's table have its own size.
#[btf_map]
static MAGLEV: ArrayOfMaps<
    Array<u64, 1, { MAGLEV_TABLE_FLAGS as usize }>,
    { MAX_SERVICES as usize },
> = ArrayOfMaps::new();

#[btf_map]
static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

#[btf_map]
static CONFIG: Array<Config, 1> = Array::new();

/// The connection table: flow → backend, so a flow keeps its backend when the Maglev table
/// changes. A set-associative cache in an array (see `FlowSet`): finding a flow is one hash of
/// the program's own and one inlined array access, and recording one is a few stores, where a
/// kernel LRU hash spends ~150 ns taking an element off its lists under a lock. Shared, not
/// per-CPU: on veth, and with RPS, one flow's packets can be handled on different CPUs, and
/// every CPU must see its entry. lbd sizes it from `daemon.conntrack_entries`.
#[btf_map]
static CONNTRACK: Array<FlowSet, 16_384, { CONNTRACK_FLAGS as usize }> = Array::new();

/// Where the first fragment of a datagram went: the later ones (which carry no ports) follow.
#[btf_map]
static FRAGS: LruHashMap<FragKey, FragValue, 8192> = LruHashMap::new();

/// VIP and protocol → the VIP's source-hashed service, for fragments that come before their
/// first fragment (or `NO_LATE_FRAGMENTS` when there is no single such service).
#[btf_map]
static VIPS: HashMap<VipKey, ServiceValue, { MAX_SERVICES as usize }> = HashMap::new();

/// Egress interfaces other than the receiving one (tunnel next hops), by ifindex.
#[btf_map]
static DEVMAP: DevMapHash<64> = DevMapHash::new();

#[btf_map]
static SERVICE_STATS: PerCpuArray<Counter, { MAX_SERVICES as usize }> = PerCpuArray::new();

#[btf_map]
static BACKEND_STATS: PerCpuArray<Counter, { MAX_BACKENDS as usize }> = PerCpuArray::new();

#[btf_map]
static REASON_STATS: PerCpuArray<u64, { Reason::COUNT as usize }> = PerCpuArray::new();

/// Each CPU's budget of "too big" answers. Not pinned (nothing outside the program reads it):
/// a newly loaded program starts with full buckets.
#[btf_map]
static TOO_BIG_BUCKET: PerCpuArray<TooBigBucket, 1> = PerCpuArray::new();

// ---- the program ----

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match process(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_PASS,
    }
}

/// `Err(())` means "not ours, or cannot be read": pass it up untouched.
#[inline(always)]
fn process(ctx: &XdpContext) -> Result<u32, ()> {
    let mut packet = core::mem::MaybeUninit::<Packet>::uninit();
    if !packet::parse_into(ctx, packet.as_mut_ptr()) {
        return Err(());
    }
    // SAFETY: parse_into returned true, so it wrote the whole Packet.
    let packet = unsafe { packet.assume_init_ref() };
    let mut flow = find_flow(packet)?;
    // An established flow is placed here, without the call into `choose_for`.
    let (service, backend_id, backend) = match flow.as_mut().and_then(|f| established(packet, f)) {
        Some(chosen) => chosen,
        None => {
            let mut chosen = ChoiceOut {
                service: ServiceValue::default(),
                backend_id: 0,
                backend: core::ptr::null(),
            };
            let flow = flow
                .as_mut()
                .map_or(core::ptr::null_mut(), |f| f as *mut FlowSlot);
            match choose_for(packet, flow, &mut chosen) {
                CHOSEN => {}
                NOT_OURS => return Err(()),
                reason => return Ok(give_up(Reason::from_index(reason))),
            }
            // SAFETY: choose_for set it to a BACKENDS entry, valid for this program run.
            (chosen.service, chosen.backend_id, unsafe {
                &*chosen.backend
            })
        }
    };
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let egress = if service.flags & service_flags::TUNNEL != 0 {
        match tunnel::encapsulate(ctx, packet, backend) {
            Ok(egress) => egress,
            Err(reason) => return Ok(give_up(reason)),
        }
    } else {
        rewrite_dsr(ctx, packet, backend)?;
        Egress::ToBackend
    };
    Ok(match egress {
        Egress::ToBackend => match to_backend(ctx, backend) {
            Ok(action) => {
                count(service.id, backend_id, bytes);
                action
            }
            Err(reason) => give_up(reason),
        },
        Egress::ReplyToSender => {
            count_reason(Reason::TooBig);
            xdp_action::XDP_TX
        }
    })
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

/// Sends a frame rewritten for `backend` out of the backend's interface: XDP_TX when that is
/// the receiving one, else a redirect through `DEVMAP`; `NoEgress` when the interface is not
/// there (only a frame actually sent counts as forwarded).
#[inline(always)]
fn to_backend(ctx: &XdpContext, backend: &Backend) -> Result<u32, Reason> {
    if backend.ifindex == 0 || backend.ifindex == ctx.ingress_ifindex() as u32 {
        return Ok(xdp_action::XDP_TX);
    }
    DEVMAP
        .redirect(backend.ifindex, 0)
        .map_err(|_| Reason::NoEgress)
}

type Choice = (ServiceValue, u32, &'static Backend);

/// What `choose_for` found, written into the caller's frame.
struct ChoiceOut {
    service: ServiceValue,
    backend_id: u32,
    backend: *const Backend,
}

/// `choose_for` results besides a `Reason` index.
const CHOSEN: u32 = u32::MAX;
const NOT_OURS: u32 = u32::MAX - 1;

/// The service and backend of a packet, as a small status (a BPF-to-BPF call returns a
/// register): CHOSEN (and `out` filled), NOT_OURS, or the index of the `Reason` it is not
/// forwarded for. A function of its own so its map keys stay off the main frame, whose stack the
/// tunnel's subprograms share the 512-byte budget with.
#[inline(never)]
fn choose_for(p: &Packet, flow: *mut FlowSlot, out: &mut ChoiceOut) -> u32 {
    // SAFETY: `flow` is null or points to the caller's FlowSlot, alive for this call.
    match classify_and_choose(p, unsafe { flow.as_mut() }) {
        Err(()) => NOT_OURS,
        Ok(Err(reason)) => reason as u32,
        Ok(Ok((service, backend_id, backend))) => {
            out.service = service;
            out.backend_id = backend_id;
            out.backend = backend;
            CHOSEN
        }
    }
}

/// The service and backend of a packet. The outer `Err(())` means "not a service packet" (pass
/// untouched); the inner `Err(reason)` means "a service packet that is not forwarded".
#[inline(always)]
fn classify_and_choose(
    p: &Packet,
    flow: Option<&mut FlowSlot>,
) -> Result<Result<Choice, Reason>, ()> {
    if p.frag == Frag::Later {
        return follow_first_fragment(p);
    }
    let (Some(flow), Some(config)) = (flow, CONFIG.get(0)) else {
        return Err(());
    };
    let service = classify(p)?;
    if p.malformed {
        return Ok(Err(Reason::Malformed));
    }
    let chosen = match pick(p, &service, config, flow) {
        Ok((id, b)) => (service, id, b),
        Err(reason) => return Ok(Err(reason)),
    };
    if p.frag == Frag::First {
        // Later fragments carry no ports: they follow this one.
        let _ = FRAGS.insert(
            p.frag_key(),
            FragValue {
                backend: chosen.1,
                service,
            },
            0,
        );
    }
    Ok(Ok(chosen))
}

/// The packet's place in the connection table; `None` for a later fragment (it has no ports:
/// `choose_for` places it by its first fragment). `Err(())` for a destination that is no VIP's
/// (the VIP filter), and when the maps are not filled in yet.
#[inline(always)]
fn find_flow(p: &Packet) -> Result<Option<FlowSlot>, ()> {
    if p.frag == Frag::Later {
        return Ok(None);
    }
    if !maybe_vip(&p.dst) {
        return Err(());
    }
    let config = CONFIG.get(0).ok_or(())?;
    FlowSlot::find(p, config).map(Some)
}

/// Whether `addr` may be a VIP: both its bits are set in `VIP_FILTER`.
#[inline(always)]
fn maybe_vip(addr: &lb_common::Addr) -> bool {
    let [a, b] = vip_filter_bits(addr);
    let has = |bit: u32| {
        VIP_FILTER
            .get(bit >> 6)
            .is_some_and(|w| *w & (1u64 << (bit & 63)) != 0)
    };
    has(a) && has(b)
}

/// The fast path of an established flow: a plain packet (no SYN, no fragment, no ICMP error,
/// well formed) whose flow has an entry, whose recorded service still answers to the packet's
/// destination and whose backend is still usable. The service comes from `SERVICE_BY_ID`, not
/// from `SERVICES`; a flow then stays with the service it started under even if a more exact
/// one (a port of a VIP that had an every-port service) appears later. Anything else takes the
/// full path.
#[inline(always)]
fn established(p: &Packet, flow: &mut FlowSlot) -> Option<Choice> {
    if p.syn || p.icmp_error || p.malformed || p.frag != Frag::None {
        return None;
    }
    let i = flow.found?;
    let value = flow.way(i).value();
    let entry = SERVICE_BY_ID.get(value.service)?;
    let key = &entry.key;
    if key.addr != p.dst
        || key.proto != p.proto
        || key.family != p.family
        || (key.port != p.dport && key.port != 0)
    {
        return None;
    }
    let backend = usable_backend(value.backend, &entry.value)?;
    flow.touch(i);
    Some((entry.value, value.backend, backend))
}

/// The service the destination belongs to: an exact (VIP, port, protocol) match first, then the
/// VIP's every-port service (port 0).
#[inline(always)]
fn classify(p: &Packet) -> Result<ServiceValue, ()> {
    let mut key = ServiceKey {
        addr: p.dst,
        port: p.dport,
        proto: p.proto,
        family: p.family,
    };
    if let Some(v) = SERVICES.get_ptr(&key) {
        // SAFETY: a pointer returned by a map lookup is valid for this program run.
        return Ok(unsafe { *v });
    }
    key.port = 0;
    match SERVICES.get_ptr(&key) {
        // SAFETY: as above.
        Some(v) => Ok(unsafe { *v }),
        None => Err(()),
    }
}

/// A fragment after the first: where its first fragment went; else, for a VIP with a single
/// source-hashed service, that service's choice for the client (no port needed).
#[inline(always)]
fn follow_first_fragment(p: &Packet) -> Result<Result<Choice, Reason>, ()> {
    // Every VIP has an entry per protocol: a miss means the fragment is not ours.
    let key = VipKey {
        addr: p.dst,
        proto: p.proto,
        family: p.family,
        _pad: [0; 2],
    };
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    let service = unsafe { *VIPS.get_ptr(&key).ok_or(())? };
    if p.malformed {
        return Ok(Err(Reason::Malformed));
    }
    if let Some(v) = FRAGS.get_ptr(&p.frag_key()) {
        // SAFETY: as above.
        let v = unsafe { *v };
        return Ok(match usable_backend(v.backend, &v.service) {
            Some(b) => Ok((v.service, v.backend, b)),
            None => Err(Reason::UnsupportedFragment),
        });
    }
    if service.flags & service_flags::NO_LATE_FRAGMENTS != 0 {
        return Ok(Err(Reason::UnsupportedFragment));
    }
    let Some(config) = CONFIG.get(0) else {
        return Ok(Err(Reason::MissingState));
    };
    Ok(choose(p, &service, config).and_then(|id| {
        usable_backend(id, &service)
            .map(|b| (service, id, b))
            .ok_or(Reason::MissingState)
    }))
}

/// A backend entry that may take this service's packets.
#[inline(always)]
fn usable_backend(id: u32, service: &ServiceValue) -> Option<&'static Backend> {
    let b = BACKENDS.get(id)?;
    (b.flags & (backend_flags::VALID | backend_flags::DOWN) == backend_flags::VALID
        && b.service == service.id)
        .then_some(b)
}

/// A packet's place in the connection table: its flow's hash and set, the way holding its entry
/// if there is one, and the way a new entry would take (a free one, else the least recently
/// seen).
struct FlowSlot {
    hash: u64,
    set: &'static mut FlowSet,
    found: Option<usize>,
    victim: usize,
    now: u32,
}

impl FlowSlot {
    #[inline(always)]
    fn find(p: &Packet, config: &Config) -> Result<FlowSlot, ()> {
        let hash = hash::flow_hash(&config.hash_key, &p.flow_key());
        let set = CONNTRACK
            .get_ptr_mut(hash as u32 & config.flow_set_mask)
            .ok_or(())?;
        // SAFETY: a pointer returned by a map lookup is valid for this program run; other CPUs
        // may write the set meanwhile, which `FlowEntry::belongs_to` tolerates.
        let set = unsafe { &mut *set };
        let now = clock();
        let (found, victim) = set.place(hash, now);
        Ok(FlowSlot {
            hash,
            set,
            found,
            victim,
            now,
        })
    }

    /// Way `i` of the set (`i % FLOW_WAYS`: the verifier must see the index is in bounds).
    #[inline(always)]
    fn way(&mut self, i: usize) -> &mut FlowEntry {
        &mut self.set.ways[i % FLOW_WAYS]
    }

    /// Marks way `i` seen now (a store only when the coarse clock has moved).
    #[inline(always)]
    fn touch(&mut self, i: usize) {
        let now = self.now;
        let e = self.way(i);
        if e.seen != now {
            e.seen = now;
        }
    }

    /// Records the flow on `backend` of `service`: its own entry if it has one (a SYN reusing
    /// a port, a flow whose backend went away), else the victim way.
    #[inline(always)]
    fn record(&mut self, backend: u32, service: u32) {
        let i = self.found.unwrap_or(self.victim);
        let ids = FlowEntry::ids_of(backend, service);
        let check = self.hash ^ ids as u64;
        let now = self.now;
        let e = self.way(i);
        if e.ids != ids || e.check != check {
            // `check` last: until it is written the entry belongs to no flow.
            e.ids = ids;
            e.seen = now;
            e.check = check;
        } else {
            self.touch(i);
        }
    }
}

/// The backend of a flow the fast path did not place: the one the connection table recorded,
/// while it is still usable for this service; otherwise (new flow, TCP SYN, backend down or
/// removed) the Maglev table's choice, which is then recorded. ICMP errors about a flow only
/// read the table.
#[inline(always)]
fn pick(
    p: &Packet,
    service: &ServiceValue,
    config: &Config,
    flow: &mut FlowSlot,
) -> Result<(u32, &'static Backend), Reason> {
    if let Some(i) = flow.found
        && !p.syn
    {
        let id = flow.way(i).value().backend;
        if let Some(b) = usable_backend(id, service) {
            flow.touch(i);
            return Ok((id, b));
        }
    }
    let id = choose(p, service, config)?;
    let backend = match BACKENDS.get(id) {
        Some(b) if b.flags & backend_flags::VALID != 0 => b,
        _ => return Err(Reason::MissingState),
    };
    if !p.icmp_error {
        flow.record(id, service.id);
    }
    Ok((id, backend))
}

/// The connection table's clock: jiffies / 64 (64 ms at HZ=1000, 256 ms at HZ=250), never 0
/// (0 marks a free entry). Coarse on purpose: an established flow then rewrites its entry's
/// stamp a few times a second, not on every packet. bpf_jiffies64 is inlined by the verifier
/// into a load of `jiffies`.
#[inline(always)]
fn clock() -> u32 {
    // SAFETY: a helper without arguments.
    let jiffies = unsafe { aya_ebpf::helpers::bpf_jiffies64() };
    (jiffies >> 6) as u32 | 1
}

/// The backend for a new flow: Maglev table slot of the keyed hash.
#[inline(always)]
fn choose(p: &Packet, service: &ServiceValue, config: &Config) -> Result<u32, Reason> {
    let h = if service.flags & service_flags::HASH_5TUPLE != 0 {
        hash::hash_5tuple(&config.hash_key, &p.flow_key())
    } else {
        hash::hash_source(&config.hash_key, &p.src)
    };
    if service.table_size == 0 {
        return Err(Reason::MissingState);
    }
    let slot = hash::slot(h, service.table_size);
    let word = *MAGLEV
        .get_value(service.id, &(slot / MAGLEV_SLOTS_PER_WORD))
        .ok_or(Reason::MissingState)?;
    let id = maglev_slot_value(word, slot);
    if id == NO_BACKEND {
        return Err(Reason::NoBackend);
    }
    Ok(id)
}

/// Direct server return: the frame goes to the backend's MAC from the egress interface's MAC,
/// with the backend's VLAN tag or none (`l2::retag` when that changes the header's length or
/// tag); IP and L4 stay as the client sent them (the backend holds the VIP).
#[inline(always)]
fn rewrite_dsr(ctx: &XdpContext, p: &Packet, backend: &Backend) -> Result<(), ()> {
    if p.l3 == ETH_HLEN && backend.vlan == 0 {
        return write_hdr(ctx, 0, l2::addresses(backend));
    }
    l2::retag(ctx, p.l3, backend)
}

/// A VIP packet that is not forwarded: counted under its reason, then dropped (no usable
/// backend: the client retries) or passed up (the kernel decides).
#[inline(always)]
fn give_up(reason: Reason) -> u32 {
    count_reason(reason);
    match reason {
        Reason::NoBackend | Reason::TooBig | Reason::TooBigSuppressed | Reason::NoEgress => {
            xdp_action::XDP_DROP
        }
        _ => xdp_action::XDP_PASS,
    }
}

/// Whether this CPU may send a "too big" answer now (its token bucket, `TooBigBucket`); if so
/// the answer's token is taken. Runs only for a packet about to be answered.
#[inline(always)]
fn may_answer_too_big() -> bool {
    let Some(bucket) = TOO_BIG_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    // SAFETY: per-CPU slot of this CPU; no other writer while the program runs here.
    unsafe { (*bucket).take(now) }
}

#[inline(always)]
fn count_reason(reason: Reason) {
    if let Some(c) = REASON_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot of this CPU; no other writer while the program runs here.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn count(service: u32, backend: u32, bytes: u64) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(service) {
        // SAFETY: per-CPU slot of this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend) {
        // SAFETY: per-CPU slot of this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
