//! ICMP, both ways: an ICMP error about a VIP's flow that arrives ("fragmentation needed" /
//! "packet too big": `quoted_flow` makes the packet that flow's, so it reaches the flow's
//! backend), and the "too big" answer the program sends when a tunnel packet would not fit the
//! egress MTU once encapsulated (`answer_too_big`), so the client's path-MTU discovery
//! converges.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Addr, FAMILY_V4, PROTO_TCP, PROTO_UDP, Reason, TOO_BIG_INTERVAL_NS, TOO_BIG_TOLERANCE_NS,
};

use crate::{
    access,
    frame::{
        adjust_head, adjust_tail, fold, ipv4_checksum, read_at, read_hdr, sum_words, write_at,
        write_hdr,
    },
    headers::{ETH_HLEN, EthAddrs, IPV4_MIN_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr, VLAN_HLEN, Words},
    maps::TOO_BIG_BUCKET,
    packet::{Frag, Packet, Ports},
    verdict::Egress,
};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
/// ICMP "destination unreachable / fragmentation needed", ICMPv6 "packet too big".
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// The ICMP header: type, code, checksum, and 4 bytes (the MTU, for these errors).
const ICMP_HLEN: usize = 8;
/// The IPv4 answer quotes the offending header and 8 bytes after it (RFC 792).
const V4_QUOTE: usize = IPV4_MIN_HLEN + 8;
/// The IPv6 answer quotes the offending header and 64 bytes after it: enough for the sender to
/// find its socket, and a small answer.
const V6_QUOTE: usize = IPV6_HLEN + 64;
/// The hop limit of the answers.
const ANSWER_TTL: u8 = 64;

/// An ICMP "fragmentation needed" (IPv4) or "packet too big" (IPv6) quotes the start of a
/// packet the VIP sent (VIP → client); the packet is classified as that flow in the client's
/// direction, so it reaches the backend that owns the flow. Only an error addressed to the
/// quoted packet's source (the VIP) is: one sent to any other address (a forged or misrouted
/// error naming a VIP flow) is not ours, nor is other ICMP. The ICMP header starts at `l4`,
/// `l4_len` bytes of the IP packet from there.
#[inline(always)]
pub fn quoted_flow(ctx: &XdpContext, p: &mut Packet, l4: usize, l4_len: usize) -> Result<(), ()> {
    let [icmp_type, code]: [u8; 2] = access::read_at(ctx, l4)?;
    let quote = l4 + ICMP_HLEN;
    let (inner_src, inner_dst, inner_proto, ports_at) = if p.family == FAMILY_V4 {
        if icmp_type != ICMP_DEST_UNREACH || code != ICMP_FRAG_NEEDED {
            return Err(());
        }
        let inner: Ipv4Hdr = access::read_hdr(ctx, quote)?;
        let ihl = ((inner.version_ihl & 0x0f) as usize) * 4;
        if inner.version_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN {
            return Err(());
        }
        (
            [inner.saddr, 0, 0, 0],
            [inner.daddr, 0, 0, 0],
            inner.proto,
            quote + ihl,
        )
    } else {
        if icmp_type != ICMPV6_PACKET_TOO_BIG {
            return Err(());
        }
        let inner: Ipv6Hdr = access::read_hdr(ctx, quote)?;
        (
            inner.saddr,
            inner.daddr,
            inner.next_header,
            quote + IPV6_HLEN,
        )
    };
    if inner_proto != PROTO_TCP && inner_proto != PROTO_UDP || inner_src != p.dst {
        return Err(());
    }
    let ports: Ports = access::read_hdr(ctx, ports_at)?;
    if l4_len < ports_at + size_of::<Ports>() - l4 {
        p.malformed = true;
    }
    // The quoted packet went VIP → client: turned around.
    p.src = inner_dst;
    p.dst = inner_src;
    p.sport = ports.dst;
    p.dport = ports.src;
    p.proto = inner_proto;
    p.icmp_error = true;
    Ok(())
}

/// A packet that would not fit the egress MTU once encapsulated (`mtu`: the room left for it):
/// turned into a "too big" answer to its sender, or refused (`TooBig`) when no answer is due —
/// about an ICMP error or a fragment after the first (RFC 1122, RFC 4443), an IPv4 packet
/// without DF (the sender's path may fragment, but we do not) or with options (the fixed-size
/// quote does not fit) — or `TooBigSuppressed` over the answers' rate (RFC 4443 §2.4(f)).
#[inline(always)]
pub fn answer_too_big(ctx: &XdpContext, p: &Packet, mtu: usize) -> Result<Egress, Reason> {
    if p.icmp_error || p.frag == Frag::Later {
        return Err(Reason::TooBig);
    }
    let v4 = p.family == FAMILY_V4;
    if v4 && (!p.dont_fragment || p.l4 - p.l3 != IPV4_MIN_HLEN) {
        return Err(Reason::TooBig);
    }
    if !may_answer() {
        return Err(Reason::TooBigSuppressed);
    }
    if v4 {
        too_big_v4(ctx, p.l3, mtu as u16)
    } else {
        too_big_v6(ctx, p.l3, mtu as u32)
    }
}

/// Whether this CPU may send a "too big" answer now (its token bucket, `TooBigBucket`); if so
/// the answer's token is taken. Runs only for a packet about to be answered.
#[inline(always)]
fn may_answer() -> bool {
    let Some(bucket) = TOO_BIG_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    // SAFETY: per-CPU slot of this CPU; no other writer while the program runs here.
    unsafe { (*bucket).take(now, TOO_BIG_INTERVAL_NS, TOO_BIG_TOLERANCE_NS) }
}

/// Turns the frame into an ICMP "fragmentation needed" from the VIP to the sender, carrying
/// `mtu`, and sends it back.
#[inline(never)]
fn too_big_v4(ctx: &XdpContext, l3: usize, mtu: u16) -> Result<Egress, Reason> {
    if l3 != ETH_HLEN && l3 != ETH_HLEN + VLAN_HLEN {
        return Err(Reason::Malformed);
    }
    let (dst, src) = swapped_macs(ctx)?;
    // The sender's and the VIP's addresses, at 12 in the IPv4 header.
    let addrs: [u32; 2] = read_at(ctx, l3 + 12)?;
    let frame_len = ctx.data_end() - ctx.data();
    let grown = IPV4_MIN_HLEN + ICMP_HLEN;
    adjust_head(ctx, -(grown as i32))?;
    move_l2(ctx, l3, grown, &dst, &src)?;
    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0,
        tot_len: ((grown + V4_QUOTE) as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: ANSWER_TTL,
        proto: PROTO_ICMP,
        check: 0,
        saddr: addrs[1],
        daddr: addrs[0],
    };
    ip.check = ipv4_checksum(&ip);
    write_at(ctx, l3, ip)?;
    // "Destination unreachable", "fragmentation needed", the next-hop MTU.
    let header: [u16; 4] = [
        u16::from_be_bytes([ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED]).to_be(),
        0,
        0,
        mtu.to_be(),
    ];
    let quoted = packet_sum::<V4_QUOTE>(ctx, l3 + grown)?;
    let check = fold(sum_words(&header) + quoted as u64);
    write_at(
        ctx,
        l3 + IPV4_MIN_HLEN,
        [header[0], check, header[2], header[3]],
    )?;
    adjust_tail(
        ctx,
        (l3 + grown + V4_QUOTE) as i32 - (frame_len + grown) as i32,
    )?;
    Ok(Egress::ReplyToSender)
}

/// Turns the frame into an ICMPv6 "packet too big" from the VIP to the sender, carrying `mtu`,
/// and sends it back.
#[inline(never)]
fn too_big_v6(ctx: &XdpContext, l3: usize, mtu: u32) -> Result<Egress, Reason> {
    if l3 != ETH_HLEN && l3 != ETH_HLEN + VLAN_HLEN {
        return Err(Reason::Malformed);
    }
    let frame_len = ctx.data_end() - ctx.data();
    let (dst, src) = swapped_macs(ctx)?;
    let grown = IPV6_HLEN + ICMP_HLEN;
    adjust_head(ctx, -(grown as i32))?;
    move_l2(ctx, l3, grown, &dst, &src)?;
    // The new header: the offending one (now `grown` bytes further) with addresses swapped.
    let old_src: Addr = read_at(ctx, l3 + grown + 8)?;
    let old_dst: Addr = read_at(ctx, l3 + grown + 24)?;
    let len = ICMP_HLEN + V6_QUOTE;
    write_at(
        ctx,
        l3,
        Ipv6Hdr {
            vtc_flow: (6u32 << 28).to_be(),
            payload_len: (len as u16).to_be(),
            next_header: PROTO_ICMPV6,
            hop_limit: ANSWER_TTL,
            saddr: old_dst,
            daddr: old_src,
        },
    )?;
    // "Packet too big", code 0, the MTU as 32 bits.
    let mtu = mtu.to_be();
    let header: [u16; 4] = [
        u16::from_be_bytes([ICMPV6_PACKET_TOO_BIG, 0]).to_be(),
        0,
        mtu as u16,
        (mtu >> 16) as u16,
    ];
    // Pseudo-header: the two addresses, the upper-layer length, the next header.
    let addrs = packet_sum::<32>(ctx, l3 + 8)?;
    let pseudo = (len as u16).to_be() as u64 + (PROTO_ICMPV6 as u16).to_be() as u64;
    let quoted = packet_sum::<V6_QUOTE>(ctx, l3 + grown)?;
    let check = fold(addrs as u64 + pseudo + sum_words(&header) + quoted as u64);
    write_at(
        ctx,
        l3 + IPV6_HLEN,
        [header[0], check, header[2], header[3]],
    )?;
    adjust_tail(
        ctx,
        (l3 + grown + V6_QUOTE) as i32 - (frame_len + grown) as i32,
    )?;
    Ok(Egress::ReplyToSender)
}

/// The answer goes back where the packet came from: (destination, source) MACs swapped.
#[inline(always)]
fn swapped_macs(ctx: &XdpContext) -> Result<([u8; 6], [u8; 6]), Reason> {
    let macs: [u8; 12] = read_at(ctx, 0)?;
    let mut dst = [0u8; 6];
    let mut src = [0u8; 6];
    dst.copy_from_slice(&macs[6..]);
    src.copy_from_slice(&macs[..6]);
    Ok((dst, src))
}

/// Rewrites the Ethernet header (and keeps a VLAN tag) of a frame that grew by `grown` bytes at
/// the front: the old header now sits `grown` bytes further in. 16-bit loads and stores
/// throughout (`grown` and `l3` are even).
#[inline(always)]
fn move_l2(
    ctx: &XdpContext,
    l3: usize,
    grown: usize,
    dst: &[u8; 6],
    src: &[u8; 6],
) -> Result<(), Reason> {
    write_hdr(ctx, 0, EthAddrs::new(dst, src))?;
    // The ethertype, or the VLAN tag and the inner ethertype, after the addresses.
    let at = ETH_HLEN - 2;
    if l3 == ETH_HLEN {
        let t: Words<1> = read_hdr(ctx, grown + at)?;
        write_hdr(ctx, at, t)
    } else {
        let t: Words<3> = read_hdr(ctx, grown + at)?;
        write_hdr(ctx, at, t)
    }
}

/// The one's-complement partial sum of `N` packet bytes at `offset` (N a multiple of 4), by the
/// kernel's csum_diff helper: no loop over packet offsets for the verifier to follow.
#[inline(always)]
fn packet_sum<const N: usize>(ctx: &XdpContext, offset: usize) -> Result<u32, Reason> {
    let p = access::ptr_at::<[u8; N]>(ctx, offset).map_err(|()| Reason::MissingState)?;
    // SAFETY: ptr_at checked the N bytes lie inside the packet; the helper only reads them.
    let sum = unsafe {
        aya_ebpf::helpers::generated::bpf_csum_diff(core::ptr::null_mut(), 0, p.cast(), N as u32, 0)
    };
    if sum < 0 {
        Err(Reason::MissingState)
    } else {
        Ok(sum as u32)
    }
}
