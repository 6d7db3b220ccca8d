//! `nat` forwarding (`lb_common::nat`): a request's destination is rewritten to its backend's
//! address and port (the client's address kept), a reply's source back to the VIP and service
//! port; both sent on from here, never through the host stack. ICMP "fragmentation needed" /
//! "packet too big" errors about a NAT flow are translated both ways (the outer address, the
//! quoted header's address and port, and the checksums), so path-MTU discovery works through
//! the translation. Checksums are updated incrementally (RFC 1624); an IPv4 UDP checksum of 0
//! (none) stays 0.
//!
//! Each step is a call of its own with a small interface, so the verifier sees the NAT work
//! once, not once per path of the code before it; the reply path leaves the main program right
//! after the VIP filter missed (`maybe_reply`: two array reads for any other packet).

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    programs::XdpContext,
};
use lb_common::{
    Addr, Backend, FAMILY_V4, FlowKey, PROTO_TCP, Reason, Verdict, backend_flags,
    nat::{NAT_REFRESH_TICKS, NatFlow, NatReply},
    trace_outcome, vip_filter_bits,
};

use crate::{
    access::{ptr_at, read_at, read_hdr, write_hdr},
    frame::fold,
    headers::{ETH_HLEN, EthAddrs, IPV6_HLEN, VLAN_HLEN},
    icmp, l2,
    maps::{
        BACKEND_STATS, BACKENDS, DEVMAP, NAT_FILTER, NAT_FLOWS, NAT_REPLIES, NAT_SCRATCH,
        SERVICE_REPLY_STATS, SERVICE_STATS,
    },
    packet::{Frag, Packet},
    verdict::{Chosen, Egress, NotOurs, Refusal, Skip},
};

/// Furthest transport header offset the rewrites accept (Ethernet, a tag, IPv6 and its
/// extension headers fit well inside).
const MAX_L4: usize = 512;
/// Furthest offset of an ICMP error's quoted transport header: after the ICMP header (8 bytes)
/// and the quoted IP header (at most 60).
const MAX_QUOTED_L4: usize = MAX_L4 + 8 + 60;

/// This CPU's room for the keys and values `flow_backend` writes (`NAT_SCRATCH`): off the
/// stack, which the main program's frames nearly fill.
#[repr(C)]
pub struct Scratch {
    key: FlowKey,
    /// The reply path's: the Ethernet header of a reply whose 802.1Q tag changes.
    hop: Backend,
    reply_key: FlowKey,
    flow: NatFlow,
    reply: NatReply,
}

/// A request of NAT service `service` whose backend the Maglev and connection tables chose
/// (`backend`): sent to the flow's own backend (`flow_backend`), or answered "too big" when it
/// would not fit that backend's interface. The XDP action.
///
/// A global function (`extern "C"`, exported): the verifier checks it once, on its own, with
/// `p` as any packet, where a static call would be checked again for every state the main
/// program reaches it in (that took the main program past the verifier's 1,000,000
/// instructions). So it assumes nothing of `p` the checks here do not establish.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_nat_forward(
    ctx: *mut xdp_md,
    p: *const Packet,
    service: u32,
    backend: u32,
) -> u64 {
    let ctx = XdpContext::new(ctx);
    // SAFETY: the caller passes its parsed Packet; a null pointer (never passed) passes the
    // packet up.
    let Some(p) = (unsafe { p.as_ref() }) else {
        return Verdict::refused(xdp_action::XDP_PASS, trace_outcome::NOT_REWRITTEN).0;
    };
    match forward_to(&ctx, p, service, backend) {
        Ok(verdict) => verdict.0,
        Err(reason) => crate::give_up(Skip::refused(reason, service)).0,
    }
}

/// The main program's side of `lb_nat_forward`: its verdict, with the connection table's part
/// (`table`) of the choice it was given.
#[inline(always)]
pub fn forward(ctx: &XdpContext, p: &Packet, chosen: &Chosen, table: u32) -> Verdict {
    Verdict(lb_nat_forward(
        ctx.ctx,
        p,
        chosen.service.id,
        chosen.backend_id,
    ))
    .with_table(table)
}

/// The verdict on a NAT request: sent to its flow's own backend (`flow_backend`), or answered
/// "too big".
#[inline(always)]
fn forward_to(ctx: &XdpContext, p: &Packet, service: u32, chosen: u32) -> Result<Verdict, Reason> {
    let id = flow_backend(ctx, p, service, chosen).ok_or(Reason::MissingState)?;
    let b = BACKENDS.get(id).ok_or(Reason::MissingState)?;
    if b.mtu != 0 && p.ip_len > b.mtu as usize {
        return match icmp::answer_too_big(ctx, p, b.mtu as usize)? {
            Egress::ReplyToSender => {
                crate::count_reason(Reason::TooBig, Some(service));
                Ok(Verdict::forwarded(xdp_action::XDP_TX, service, id, 0)
                    .because(Refusal::of(Reason::TooBig, service).traced()))
            }
            Egress::ToBackend => Err(Reason::MissingState),
        };
    }
    let rewritten = if p.icmp_error {
        rewrite_icmp(ctx, p, false, &b.addr, b.port)
    } else {
        rewrite_l4(ctx, p, true, &b.addr, b.port)
    };
    rewritten.map_err(|()| Reason::Malformed)?;
    l2::rewrite_dsr(ctx, p.l3, b).map_err(|()| Reason::MissingState)?;
    let action = crate::send(ctx, b)?;
    // The frame as sent (it differs from the one received only by a VLAN tag changed): its
    // length taken here keeps one more value off this frame, which `icmp::too_big_v4`'s
    // sits on top of under the main program's.
    count(service, id, (ctx.data_end() - ctx.data()) as u64);
    Ok(Verdict::forwarded(action, service, id, 0))
}

/// A forwarded packet of `bytes` bytes, on its service's and its backend's counters (as the
/// main program's `count`, from ids: no `Chosen` on this frame).
#[inline(always)]
fn count(service: u32, backend: u32, bytes: u64) {
    for c in [
        SERVICE_STATS.get_ptr_mut(service),
        BACKEND_STATS.get_ptr_mut(backend),
    ]
    .into_iter()
    .flatten()
    {
        // SAFETY: per-CPU slot of this CPU; no other writer while the program runs here.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Backend `id` when it may take service `service`'s packets: filled in, not down, of this
/// service (as `choose::usable_backend`, from the id).
#[inline(always)]
fn usable(id: u32, service: u32) -> Option<&'static Backend> {
    let b = BACKENDS.get(id)?;
    (b.flags & (backend_flags::VALID | backend_flags::DOWN) == backend_flags::VALID
        && b.service == service)
        .then_some(b)
}

/// The backend of the request `p`'s flow: the one its `NAT_FLOWS` entry names while that is
/// still this service's, usable, with the same address and port; else (a SYN, a new flow, a
/// flow whose backend was removed or went down) `chosen`, recorded with its reply entry. A
/// flow rehashed off a removed backend thus reaches another one, whose TCP answers an
/// unknown connection's segment with a reset: the client's connection ends at once, from the
/// VIP. ICMP errors and later fragments record nothing. None when `chosen` is no usable
/// backend of the service.
#[inline(never)]
fn flow_backend(ctx: &XdpContext, p: &Packet, service: u32, chosen: u32) -> Option<u32> {
    crate::packet::keep_context(ctx);
    let s = NAT_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch entry; nothing else uses it while the program runs here.
    let s = unsafe { &mut *s };
    s.key = p.flow_key();
    let now = clock();
    if !p.syn
        && let Some(e) = NAT_FLOWS.get_ptr_mut(&s.key)
    {
        // SAFETY: a pointer returned by a map lookup is valid for this program run; another
        // CPU may write the entry meanwhile, which at worst rewrites the reply entry twice.
        let e = unsafe { &mut *e };
        let id = e.backend;
        if let Some(b) = usable(id, service)
            && b.addr == e.backend_addr
            && b.port == e.backend_port
        {
            if now.wrapping_sub(e.stamp) >= NAT_REFRESH_TICKS && !p.icmp_error {
                e.stamp = now;
                write_reply(ctx, p, s, id, b, service);
            }
            return Some(id);
        }
    }
    let b = usable(chosen, service)?;
    if p.icmp_error || p.frag == Frag::Later {
        return Some(chosen);
    }
    s.flow = NatFlow {
        backend_addr: b.addr,
        backend_port: b.port,
        _pad: 0,
        backend: chosen,
        service,
        stamp: now,
    };
    let _ = NAT_FLOWS.insert(&s.key, &s.flow, 0);
    write_reply(ctx, p, s, chosen, b, service);
    Some(chosen)
}

/// Writes the reply entry of request `p`'s flow to backend `b` (`id`): the VIP and port the
/// reply must come from, the client's MAC and lb's (the request's source and destination), its
/// 802.1Q tag and the interface it arrived on. Replies go back the way the request came, with
/// no route lookup (which would need IP forwarding on, and a FIB lookup per reply).
#[inline(always)]
fn write_reply(ctx: &XdpContext, p: &Packet, s: &mut Scratch, id: u32, b: &Backend, service: u32) {
    let Ok(macs) = read_at::<[u8; 12]>(ctx, 0) else {
        return;
    };
    let tci = if p.l3 == ETH_HLEN {
        0
    } else {
        match read_hdr::<u16>(ctx, ETH_HLEN) {
            Ok(t) => u16::from_be(t),
            Err(()) => return,
        }
    };
    s.reply = NatReply {
        vip: p.dst,
        vip_port: p.dport,
        tci,
        client_mac: [0; 6],
        our_mac: [0; 6],
        ifindex: ctx.ingress_ifindex() as u32,
        backend: id,
        service,
    };
    s.reply.our_mac.copy_from_slice(&macs[..6]);
    s.reply.client_mac.copy_from_slice(&macs[6..]);
    s.reply_key = FlowKey {
        src: b.addr,
        dst: p.src,
        sport: if b.port == 0 { p.dport } else { b.port },
        dport: p.sport,
        proto: p.proto,
        family: p.family,
        _pad: [0; 2],
    };
    let _ = NAT_REPLIES.insert(&s.reply_key, &s.reply, 0);
}

/// The reply path's pre-filter: `NotOurs` unless the source may be a NAT backend (both its
/// bits set in `NAT_FILTER`). A later fragment (no ports) is never a reply lb can place.
#[inline(always)]
pub fn maybe_reply(p: &Packet) -> Result<(), NotOurs> {
    if p.frag == Frag::Later {
        return Err(NotOurs);
    }
    let [a, b] = vip_filter_bits(&p.src);
    let has = |bit: u32| {
        NAT_FILTER
            .get(bit >> 6)
            .is_some_and(|w| *w & (1u64 << (bit & 63)) != 0)
    };
    if has(a) && has(b) {
        Ok(())
    } else {
        Err(NotOurs)
    }
}

/// A packet from a NAT backend: when it belongs to a NAT flow (its `NAT_REPLIES` entry; for an
/// ICMP error, the flow it quotes), its source becomes the VIP and service port and it goes to
/// the client the way the request came, counted on the service's reply counters; anything
/// else is passed to the kernel untouched (and not counted).
/// A global function, checked once on its own (see `lb_nat_forward`).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_nat_reply(ctx: *mut xdp_md, p: *const Packet) -> u32 {
    let ctx = XdpContext::new(ctx);
    // SAFETY: the caller passes its parsed Packet; a null pointer (never passed) passes the
    // packet up.
    match unsafe { p.as_ref() } {
        Some(p) => reply_to(&ctx, p),
        None => xdp_action::XDP_PASS,
    }
}

/// The main program's side of `lb_nat_reply`.
#[inline(always)]
pub fn reply(ctx: &XdpContext, p: &Packet) -> u32 {
    lb_nat_reply(ctx.ctx, p)
}

#[inline(always)]
fn reply_to(ctx: &XdpContext, p: &Packet) -> u32 {
    if p.malformed {
        return xdp_action::XDP_PASS;
    }
    let Some(s) = NAT_SCRATCH.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: this CPU's scratch entry; nothing else uses it while the program runs here.
    let s = unsafe { &mut *s };
    s.key = p.flow_key();
    let Some(r) = NAT_REPLIES.get_ptr(&s.key) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    let r = unsafe { &*r };
    let rewritten = if p.icmp_error {
        rewrite_icmp(ctx, p, true, &r.vip, r.vip_port)
    } else {
        rewrite_l4(ctx, p, false, &r.vip, r.vip_port)
    };
    if rewritten.is_err() {
        // Nothing was written (the rewrites check every header before writing one).
        return xdp_action::XDP_PASS;
    }
    if reply_l2(ctx, p.l3, r, &mut s.hop).is_err() {
        crate::count_reason(Reason::MissingState, Some(r.service));
        return xdp_action::XDP_DROP;
    }
    let action = if r.ifindex == ctx.ingress_ifindex() as u32 {
        xdp_action::XDP_TX
    } else {
        match DEVMAP.redirect(r.ifindex, 0) {
            Ok(action) => action,
            Err(_) => {
                crate::count_reason(Reason::NoEgress, Some(r.service));
                return xdp_action::XDP_DROP;
            }
        }
    };
    count_reply(r.service, (ctx.data_end() - ctx.data()) as u64);
    action
}

/// A reply of service `service` sent on, `bytes` bytes as sent (its frame), on the service's
/// reply counters (`SERVICE_REPLY_STATS`).
#[inline(always)]
fn count_reply(service: u32, bytes: u64) {
    if let Some(c) = SERVICE_REPLY_STATS.get_ptr_mut(service) {
        // SAFETY: per-CPU slot of this CPU; no other writer while the program runs here.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// The reply's Ethernet header: to the client's MAC from lb's, with the request's tag.
#[inline(always)]
fn reply_l2(ctx: &XdpContext, l3: usize, r: &NatReply, hop: &mut Backend) -> Result<(), ()> {
    if l3 == ETH_HLEN && r.tci == 0 {
        return write_hdr(ctx, 0, EthAddrs::new(&r.client_mac, &r.our_mac));
    }
    if l3 != ETH_HLEN && l3 != ETH_HLEN + VLAN_HLEN {
        return Err(());
    }
    hop.mac = r.client_mac;
    hop.src_mac = r.our_mac;
    hop.vlan = r.tci & 0x0fff;
    l2::rewrite_dsr(ctx, l3, hop)
}

/// The checksum change of a 16-bit word going from `old` to `new` (RFC 1624: ~m + m').
#[inline(always)]
fn diff16(old: u16, new: u16) -> u64 {
    (!old) as u64 + new as u64
}

/// A checksum after changes summing to `diff`.
#[inline(always)]
fn apply(check: u16, diff: u64) -> u16 {
    fold((!check) as u64 + diff)
}

/// What the rewrites' bounds checks depend on, each read from the Packet once: in a global
/// function the Packet is memory the verifier knows nothing of, and a field LLVM loaded twice
/// (one load deciding a header's checked size, the other the offset read in it) would be two
/// unrelated values to it.
struct Shape {
    l3: usize,
    l4: usize,
    v4: bool,
    tcp: bool,
}

#[inline(always)]
fn shape(p: &Packet) -> Result<Shape, ()> {
    // SAFETY: fields of the caller's Packet; a volatile read is one load LLVM keeps.
    let (l3, l4, family, proto) = unsafe {
        (
            core::ptr::read_volatile(&p.l3),
            core::ptr::read_volatile(&p.l4),
            core::ptr::read_volatile(&p.family),
            core::ptr::read_volatile(&p.proto),
        )
    };
    if (l3 != ETH_HLEN && l3 != ETH_HLEN + VLAN_HLEN) || l4 > MAX_L4 {
        return Err(());
    }
    Ok(Shape {
        l3,
        l4,
        v4: family == FAMILY_V4,
        tcp: proto == PROTO_TCP,
    })
}

/// A header of `N` bytes at `off`, bounds checked once: its fields are then read and written
/// in place at constant offsets (`rd16`, `wr16`), with no copy on the stack.
#[inline(always)]
fn hdr<const N: usize>(ctx: &XdpContext, off: usize) -> Result<*mut u8, ()> {
    ptr_at::<[u8; N]>(ctx, off).map(|p| p.cast())
}

/// The 16-bit word at `off` of a header from `hdr` (even offsets: see `access::read_hdr` for
/// why packet headers are 2-aligned here).
///
/// # Safety
/// `h` came from `hdr` with `off + 2` at most its `N`.
#[inline(always)]
unsafe fn rd16(h: *mut u8, off: usize) -> u16 {
    // SAFETY: as the caller promises; 2-aligned (see above).
    unsafe { core::ptr::read(h.add(off).cast::<u16>()) }
}

/// Writes the 16-bit word at `off` of a header from `hdr`.
///
/// # Safety
/// As `rd16`.
#[inline(always)]
unsafe fn wr16(h: *mut u8, off: usize, v: u16) {
    // SAFETY: as the caller promises.
    unsafe { core::ptr::write(h.add(off).cast::<u16>(), v) }
}

/// Replaces the address at `off` of header `h` (one word for IPv4, four for IPv6) with
/// `addr`: the checksum change.
///
/// # Safety
/// As `rd16`, for the whole address.
#[inline(always)]
unsafe fn swap_addr(h: *mut u8, off: usize, addr: &Addr, v4: bool) -> u64 {
    // SAFETY: as the caller promises.
    unsafe {
        let diff = addr_change(h, off, addr, v4);
        put_addr(h, off, addr, v4);
        diff
    }
}

/// The checksum change of replacing the address at `off` of header `h` with `addr` (nothing
/// written). The program is little-endian: a word's low half is its first two bytes on the
/// wire.
///
/// # Safety
/// As `rd16`, for the whole address.
#[inline(always)]
unsafe fn addr_change(h: *mut u8, off: usize, addr: &Addr, v4: bool) -> u64 {
    let words = if v4 { 1 } else { 4 };
    let mut diff = 0;
    let mut i = 0;
    while i < 4 {
        if i >= words {
            break;
        }
        let at = off + 4 * i;
        // SAFETY: as the caller promises.
        unsafe {
            diff += diff16(rd16(h, at), addr[i] as u16)
                + diff16(rd16(h, at + 2), (addr[i] >> 16) as u16);
        }
        i += 1;
    }
    diff
}

/// Writes `addr` at `off` of header `h`.
///
/// # Safety
/// As `rd16`, for the whole address.
#[inline(always)]
unsafe fn put_addr(h: *mut u8, off: usize, addr: &Addr, v4: bool) {
    let words = if v4 { 1 } else { 4 };
    let mut i = 0;
    while i < 4 {
        if i >= words {
            break;
        }
        let at = off + 4 * i;
        // SAFETY: as the caller promises.
        unsafe {
            wr16(h, at, addr[i] as u16);
            wr16(h, at + 2, (addr[i] >> 16) as u16);
        }
        i += 1;
    }
}

/// Whether the addresses at `a_off` of `a` and `b_off` of `b` are equal.
///
/// # Safety
/// As `rd16`, for both addresses.
#[inline(always)]
unsafe fn same_addr(a: *mut u8, a_off: usize, b: *mut u8, b_off: usize, v4: bool) -> bool {
    let words = if v4 { 2 } else { 8 };
    let mut i = 0;
    while i < 8 {
        if i >= words {
            break;
        }
        // SAFETY: as the caller promises.
        if unsafe { rd16(a, a_off + 2 * i) != rd16(b, b_off + 2 * i) } {
            return false;
        }
        i += 1;
    }
    true
}

/// Offset of the source (or, `dst`, destination) address in an IP header.
#[inline(always)]
fn addr_at(v4: bool, dst: bool) -> usize {
    match (v4, dst) {
        (true, false) => 12,
        (true, true) => 16,
        (false, false) => 8,
        (false, true) => 24,
    }
}

/// A TCP or UDP packet's destination (`dst`) or source becomes `addr`:`port` (port 0: kept),
/// with the IPv4 header's and the transport checksums. Every header is checked before anything
/// is written, so an `Err` (a header that is not there, which parsing already rules out)
/// leaves the packet as it was. A call of its own (from the global functions, so checked once
/// each).
#[inline(never)]
fn rewrite_l4(ctx: &XdpContext, p: &Packet, dst: bool, addr: &Addr, port: u16) -> Result<(), ()> {
    crate::packet::keep_context(ctx);
    let Shape { l3, l4, v4, tcp } = shape(p)?;
    let ip = if v4 {
        hdr::<20>(ctx, l3)?
    } else {
        hdr::<40>(ctx, l3)?
    };
    // SAFETY: a field of the caller's Packet, read once (see `shape`).
    let later = unsafe { core::ptr::read_volatile(&p.frag) } == Frag::Later;
    let at = addr_at(v4, dst);
    // SAFETY: the address lies inside the IP header checked above.
    let diff = unsafe { addr_change(ip, at, addr, v4) };
    // The transport header first: it is checked before anything is written, so an `Err`
    // leaves the packet as it was.
    if !later {
        let port_at = if dst { 2 } else { 0 };
        if tcp {
            // Ports, sequence and acknowledgement numbers, offset and flags, window, checksum.
            header_changed(transport::<18, 16>(ctx, l4, port_at, port, diff))?;
        } else {
            // Ports, length, checksum; an IPv4 UDP checksum of 0 (none) stays 0.
            let how = port_at | (v4 as usize) << 8;
            header_changed(transport::<8, 6>(ctx, l4, how, port, diff))?;
        }
    }
    // SAFETY: inside the IP header checked above.
    unsafe {
        put_addr(ip, at, addr, v4);
        if v4 {
            wr16(ip, 10, apply(rd16(ip, 10), diff));
        }
    }
    Ok(())
}

/// The transport header's part of `rewrite_l4` (and of `rewrite_icmp`, for the quoted
/// packet's): its `N` bytes at `l4`, the port at `how & 0xff` becomes `port` (0: kept), the
/// checksum at `CHECK` changes by `diff` and the port's; with `how & 0x100` a UDP checksum of
/// 0 (none) stays 0, and for UDP a computed 0 is sent as 0xffff. Checks the header before
/// writing anything. Returns the change of the bytes it rewrote (port and checksum), for a
/// checksum that covers them (an ICMP error's), or `NO_HEADER` (a plain u64: a `Result` would
/// be returned through memory, one argument more than BPF calls have). A call of its own per
/// header size: inlined, LLVM chose the checked size and the checksum's offset by two selects
/// the verifier could not relate.
#[inline(never)]
fn transport<const N: usize, const CHECK: usize>(
    ctx: &XdpContext,
    l4: usize,
    how: usize,
    port: u16,
    diff: u64,
) -> u64 {
    crate::packet::keep_context(ctx);
    if l4 > MAX_QUOTED_L4 {
        return NO_HEADER;
    }
    let Ok(t) = hdr::<N>(ctx, l4) else {
        return NO_HEADER;
    };
    let udp = CHECK == 6;
    // SAFETY: the port (at 0 or 2) and the checksum (at CHECK) lie inside the N checked bytes.
    unsafe {
        let mut diff = diff;
        let mut changed = 0;
        if port != 0 {
            let at = if how & 0xff == 2 { 2 } else { 0 };
            let d = diff16(rd16(t, at), port);
            diff += d;
            changed += d;
            wr16(t, at, port);
        }
        let check = rd16(t, CHECK);
        if udp && how & 0x100 != 0 && check == 0 {
            return changed;
        }
        let new = apply(check, diff);
        let new = if udp && new == 0 { 0xffff } else { new };
        wr16(t, CHECK, new);
        changed + diff16(check, new)
    }
}

/// `transport`'s answer when the header is not there (no sum of a few 16-bit changes is).
const NO_HEADER: u64 = u64::MAX;

/// `transport`'s answer as a `Result`.
#[inline(always)]
fn header_changed(changed: u64) -> Result<u64, ()> {
    if changed == NO_HEADER {
        Err(())
    } else {
        Ok(changed)
    }
}

/// An ICMP error quoting a NAT flow's packet: the quoted packet's destination (`quoted_dst`:
/// a request the backend side could not forward) or source (a reply the client side could not)
/// becomes `addr`:`port` (port 0: kept), and so does the outer address that equals the one
/// replaced (the VIP an error about a reply was sent to; the backend, when the backend itself
/// sent the error). The checksums follow: the quoted IPv4 header's, the quoted TCP or UDP
/// checksum when the quote holds it (its change is the addresses' and the port's, as for the
/// packet itself, though most of the segment it covers is not quoted; a quoted UDP checksum of
/// 0 stays 0), the outer IPv4 header's, and the ICMP checksum over every quoted byte changed.
/// A quote that stops before its transport checksum (an IPv4 router need quote only 8 bytes
/// past the IP header) gets its addresses and ports translated, its checksum left unread: a
/// receiver cannot check a checksum whose segment it does not have. Every header is bounds
/// checked before the first write. A call of its own, like `rewrite_l4`.
#[inline(never)]
fn rewrite_icmp(
    ctx: &XdpContext,
    p: &Packet,
    quoted_dst: bool,
    addr: &Addr,
    port: u16,
) -> Result<(), ()> {
    crate::packet::keep_context(ctx);
    let Shape {
        l3,
        l4: icmp_at,
        v4,
        tcp,
    } = shape(p)?;
    // SAFETY: a field of the caller's Packet, read once (see `shape`).
    let ip_len = unsafe { core::ptr::read_volatile(&p.ip_len) };
    let quote = icmp_at + 8;
    let icmp = hdr::<8>(ctx, icmp_at)?;
    let outer = if v4 {
        hdr::<20>(ctx, l3)?
    } else {
        hdr::<40>(ctx, l3)?
    };
    let q = if v4 {
        hdr::<20>(ctx, quote)?
    } else {
        hdr::<40>(ctx, quote)?
    };
    let ihl = if v4 {
        // SAFETY: the quoted header's first byte, inside the 20 checked.
        (unsafe { *q } & 0x0f) as usize * 4
    } else {
        IPV6_HLEN
    };
    if !(20..=60).contains(&ihl) {
        return Err(());
    }
    let q_l4 = quote + ihl;
    let ports = hdr::<4>(ctx, q_l4)?;
    // The quoted transport header's bytes in the message (the IP length, not the frame, which
    // may be padded).
    let quoted = (l3 + ip_len).saturating_sub(q_l4);
    let q_at = addr_at(v4, quoted_dst);
    let o_at = addr_at(v4, !quoted_dst);
    let port_at = if quoted_dst { 2 } else { 0 };
    // SAFETY: every offset below lies inside the header checked above (ICMP 8 bytes, IPv4 20,
    // IPv6 40, ports 4); `transport` checks its own.
    unsafe {
        let outer_too = same_addr(outer, o_at, q, q_at, v4);
        let a_diff = addr_change(q, q_at, addr, v4);
        // The quoted transport header first: `transport` checks it before writing, so an
        // `Err` leaves the packet as it was.
        let mut icmp_diff = if tcp && quoted >= 18 {
            header_changed(transport::<18, 16>(ctx, q_l4, port_at, port, a_diff))?
        } else if !tcp && quoted >= 8 {
            header_changed(transport::<8, 6>(ctx, q_l4, port_at | 0x100, port, a_diff))?
        } else if port != 0 {
            let d = diff16(rd16(ports, port_at), port);
            wr16(ports, port_at, port);
            d
        } else {
            0
        };
        put_addr(q, q_at, addr, v4);
        icmp_diff += a_diff;
        if v4 {
            let old = rd16(q, 10);
            let new = apply(old, a_diff);
            wr16(q, 10, new);
            icmp_diff += diff16(old, new);
        }
        if outer_too {
            let d = swap_addr(outer, o_at, addr, v4);
            if v4 {
                wr16(outer, 10, apply(rd16(outer, 10), d));
            } else {
                // ICMPv6's checksum covers the addresses (its pseudo-header).
                icmp_diff += d;
            }
        }
        wr16(icmp, 2, apply(rd16(icmp, 2), icmp_diff));
    }
    Ok(())
}

/// The NAT clock: jiffies / 64 (64 ms at HZ=1000).
#[inline(always)]
fn clock() -> u32 {
    // SAFETY: a helper without arguments.
    let jiffies = unsafe { aya_ebpf::helpers::bpf_jiffies64() };
    (jiffies >> 6) as u32
}
