//! lb's XDP data path. It reads like the packet: parse (Ethernet, optional 802.1Q, IPv4, ports),
//! classify (is the destination a service?), choose (Maglev slot of the keyed client hash),
//! rewrite (direct server return: MACs only), count. Anything that is not a service packet is
//! passed to the kernel untouched; every VIP packet that is not forwarded is counted by reason.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, ArrayOfMaps, HashMap, LruHashMap, PerCpuArray},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::{
    Addr, BPF_F_INNER_MAP, Backend, Config, Counter, FAMILY_V4, FlowKey, FlowValue, MAX_BACKENDS,
    MAX_SERVICES, NO_BACKEND, PROTO_TCP, PROTO_UDP, Reason, ServiceKey, ServiceValue,
    backend_flags, hash, service_flags,
};

// ---- maps (names in lb_common::maps; lbd pins every one) ----

#[btf_map]
static SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }> = HashMap::new();

/// One Maglev table per service id. lbd builds a new inner array aside and swaps it in with a
/// single update, so the program never sees a half-built table. BPF_F_INNER_MAP lets each
/// service's table have its own size.
#[btf_map]
static MAGLEV: ArrayOfMaps<Array<u32, 1, { BPF_F_INNER_MAP as usize }>, { MAX_SERVICES as usize }> =
    ArrayOfMaps::new();

#[btf_map]
static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

#[btf_map]
static CONFIG: Array<Config, 1> = Array::new();

/// The connection table: flow 5-tuple → backend, so a flow keeps its backend when the table
/// changes. A shared LRU (not per-CPU): on veth, and with RPS, one flow's packets can be handled
/// on different CPUs, and every CPU must see its entry. lbd sizes it from
/// `daemon.conntrack_entries`; the LRU evicts the least recently used flows when full.
#[btf_map]
static CONNTRACK: LruHashMap<FlowKey, FlowValue, 65_536> = LruHashMap::new();

#[btf_map]
static SERVICE_STATS: PerCpuArray<Counter, { MAX_SERVICES as usize }> = PerCpuArray::new();

#[btf_map]
static BACKEND_STATS: PerCpuArray<Counter, { MAX_BACKENDS as usize }> = PerCpuArray::new();

#[btf_map]
static REASON_STATS: PerCpuArray<u64, { Reason::COUNT as usize }> = PerCpuArray::new();

// ---- wire headers ----

const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const IPV4_MIN_HLEN: usize = 20;
/// More-fragments flag and fragment offset bits of the IPv4 frag_off field (host order).
const IP_MF_OFFSET: u16 = 0x3fff;

#[repr(C)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    ether_type: u16,
}

#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    proto: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

/// The first four bytes of TCP and UDP headers alike.
#[repr(C)]
struct Ports {
    src: u16,
    dst: u16,
}

/// Offset of the flags byte in the TCP header, and the flags that matter here.
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Bounds check once, here: a pointer to a `T` at `offset` if the whole `T` lies inside the
/// packet. Every packet access goes through this.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

/// Reads a `T` from the packet. Packet data has no alignment guarantee.
#[inline(always)]
fn read_at<T>(ctx: &XdpContext, offset: usize) -> Result<T, ()> {
    let p = ptr_at::<T>(ctx, offset)?;
    // SAFETY: ptr_at checked that size_of::<T>() bytes at p lie inside the packet.
    Ok(unsafe { core::ptr::read_unaligned(p) })
}

// ---- the program ----

/// What parsing found out about a packet that might belong to a service.
struct Packet {
    /// The IP total length runs past the frame, or is too short for the ports: the packet is
    /// not forwarded even when it is addressed to a service.
    malformed: bool,
    /// A TCP SYN without ACK: a new connection, which always takes the current table's choice.
    syn: bool,
    src: Addr,
    dst: Addr,
    sport: u16,
    dport: u16,
    proto: u8,
    family: u8,
}

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
    let packet = parse(ctx)?;
    let service = classify(&packet)?;
    if packet.malformed {
        return Ok(give_up(Reason::Malformed));
    }
    let flow = FlowKey {
        src: packet.src,
        dst: packet.dst,
        sport: packet.sport,
        dport: packet.dport,
        proto: packet.proto,
        family: packet.family,
        _pad: [0; 2],
    };
    let (backend_id, backend) = match pick(&packet, &flow, &service) {
        Ok(chosen) => chosen,
        Err(reason) => return Ok(give_up(reason)),
    };
    rewrite_dsr(ctx, backend)?;
    count(ctx, service.id, backend_id);
    Ok(xdp_action::XDP_TX)
}

#[inline(always)]
fn parse(ctx: &XdpContext) -> Result<Packet, ()> {
    let eth: EthHdr = read_at(ctx, 0)?;
    let mut l3 = ETH_HLEN;
    let mut ether_type = u16::from_be(eth.ether_type);
    if ether_type == ETH_P_8021Q {
        // One 802.1Q tag: the inner type follows the tag control field. The tag stays.
        let inner: u16 = read_at(ctx, ETH_HLEN + 2)?;
        ether_type = u16::from_be(inner);
        l3 += VLAN_HLEN;
    }
    if ether_type != ETH_P_IP {
        return Err(());
    }
    let ip: Ipv4Hdr = read_at(ctx, l3)?;
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    if ip.version_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return Err(());
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP {
        return Err(());
    }
    // Fragments carry no ports past the first; they are left to the kernel for now.
    if u16::from_be(ip.frag_off) & IP_MF_OFFSET != 0 {
        return Err(());
    }
    let ports: Ports = read_at(ctx, l3 + ihl)?;
    let ip_len = u16::from_be(ip.tot_len) as usize;
    let frame_len = ctx.data_end() - ctx.data();
    let mut malformed = ip_len < ihl + size_of::<Ports>() || l3 + ip_len > frame_len;
    let mut syn = false;
    if ip.proto == PROTO_TCP {
        match read_at::<u8>(ctx, l3 + ihl + TCP_FLAGS_OFFSET) {
            Ok(flags) => syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
            Err(()) => malformed = true,
        }
    }
    Ok(Packet {
        malformed,
        syn,
        src: [ip.saddr, 0, 0, 0],
        dst: [ip.daddr, 0, 0, 0],
        sport: ports.src,
        dport: ports.dst,
        proto: ip.proto,
        family: FAMILY_V4,
    })
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

/// The backend of a flow: the one the connection table recorded, while it is still usable for
/// this service; otherwise (new flow, TCP SYN, backend down or removed) the Maglev table's
/// choice, which is then recorded.
#[inline(always)]
fn pick(
    p: &Packet,
    flow: &FlowKey,
    service: &ServiceValue,
) -> Result<(u32, &'static Backend), Reason> {
    let entry = CONNTRACK.get_ptr_mut(flow);
    if let Some(e) = entry
        && !p.syn
    {
        // SAFETY: a pointer returned by a map lookup is valid for this program run.
        let id = unsafe { (*e).backend };
        if let Some(b) = BACKENDS.get(id)
            && b.flags & (backend_flags::VALID | backend_flags::DOWN) == backend_flags::VALID
            && b.service == service.id
        {
            return Ok((id, b));
        }
    }
    let id = choose(p, flow, service)?;
    let backend = match BACKENDS.get(id) {
        Some(b) if b.flags & backend_flags::VALID != 0 => b,
        _ => return Err(Reason::MissingState),
    };
    let value = FlowValue {
        backend: id,
        service: service.id,
    };
    match entry {
        // An existing entry (a SYN reusing a port, a flow whose backend went away) is rewritten
        // in place: cheaper than an update, which allocates a new element.
        // SAFETY: as above; the value is two u32s, written whole.
        Some(e) => unsafe {
            if *e != value {
                *e = value;
            }
        },
        // A full table evicts its least recently used flow; an insert fails only for want of
        // memory, and the flow then simply stays on the table's choice.
        None => {
            let _ = CONNTRACK.insert(flow, value, 0);
        }
    }
    Ok((id, backend))
}

/// The backend for a new flow: Maglev table slot of the keyed hash.
#[inline(always)]
fn choose(p: &Packet, flow: &FlowKey, service: &ServiceValue) -> Result<u32, Reason> {
    let config = CONFIG.get(0).ok_or(Reason::MissingState)?;
    let h = if service.flags & service_flags::HASH_5TUPLE != 0 {
        hash::hash_5tuple(&config.hash_key, flow)
    } else {
        hash::hash_source(&config.hash_key, &p.src)
    };
    if service.table_size == 0 {
        return Err(Reason::MissingState);
    }
    let slot = hash::slot(h, service.table_size);
    let id = *MAGLEV
        .get_value(service.id, &slot)
        .ok_or(Reason::MissingState)?;
    if id == NO_BACKEND {
        return Err(Reason::NoBackend);
    }
    Ok(id)
}

/// Direct server return: the frame goes to the backend's MAC from the egress interface's MAC;
/// IP and L4 stay as the client sent them (the backend holds the VIP).
#[inline(always)]
fn rewrite_dsr(ctx: &XdpContext, backend: &Backend) -> Result<(), ()> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: ptr_at checked the Ethernet header lies inside the packet; [u8; 6] has alignment 1.
    unsafe {
        (*eth).dst = backend.mac;
        (*eth).src = backend.src_mac;
    }
    Ok(())
}

/// A VIP packet that is not forwarded: counted under its reason, then dropped (no usable
/// backend: the client retries) or passed up (the kernel decides).
#[inline(always)]
fn give_up(reason: Reason) -> u32 {
    if let Some(c) = REASON_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot of this CPU; no other writer while the program runs here.
        unsafe { *c += 1 };
    }
    match reason {
        Reason::NoBackend | Reason::TooBig => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn count(ctx: &XdpContext, service: u32, backend: u32) {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
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
