//! `tunnel` forwarding: IPv4-in-IPv4 / IPv6-in-IPv6 encapsulation towards the backend, and the
//! ICMP "fragmentation needed" / "packet too big" answer when the encapsulated packet would not
//! fit the egress MTU, so the client's path-MTU discovery converges.

use aya_ebpf::programs::XdpContext;
use lb_common::{Backend, FAMILY_V4, Reason};

use crate::headers::{ETH_P_IP, ETH_P_IPV6, EthAddrs, Words};
use crate::packet::{
    Frag, IP_DF, IPV4_MIN_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr, Packet, ptr_at, read_at, read_hdr,
};
use crate::{Egress, l2};

const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const OUTER_TTL: u8 = 64;

/// Moves the start of the frame by `delta` bytes (negative: grows it at the front); a frame
/// that cannot grow is missing state here.
#[inline(always)]
fn adjust_head(ctx: &XdpContext, delta: i32) -> Result<(), Reason> {
    l2::adjust_head(ctx, delta).map_err(|()| Reason::MissingState)
}

/// Writes a `T` into the packet at `offset`; a frame too short for it is missing state here (the
/// room was made just before).
#[inline(always)]
fn write_at<T>(ctx: &XdpContext, offset: usize, value: T) -> Result<(), Reason> {
    crate::access::write_at(ctx, offset, value).map_err(|()| Reason::MissingState)
}

/// One's-complement sum of 16-bit words, folded.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
fn sum_words<const N: usize>(words: &[u16; N]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < N {
        sum += words[i] as u32;
        i += 1;
    }
    sum
}

#[inline(always)]
fn ipv4_checksum(h: &Ipv4Hdr) -> u16 {
    // SAFETY: Ipv4Hdr is 20 bytes of plain integers, readable as ten u16 words.
    let words: [u16; 10] = unsafe { core::mem::transmute_copy(h) };
    fold(sum_words(&words))
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
    // Ethertype, or the VLAN tag and the inner ethertype.
    if l3 == 14 {
        let t: Words<1> = read_hdr(ctx, grown + 12).map_err(|()| Reason::MissingState)?;
        write_hdr(ctx, 12, t)
    } else {
        let t: Words<3> = read_hdr(ctx, grown + 12).map_err(|()| Reason::MissingState)?;
        write_hdr(ctx, 12, t)
    }
}

/// Writes a header of alignment 2 (`#[repr(C, packed(2))]`) with 16-bit stores; a frame too
/// short for it is missing state here (the room was made just before).
#[inline(always)]
fn write_hdr<T: Copy>(ctx: &XdpContext, offset: usize, value: T) -> Result<(), Reason> {
    crate::access::write_hdr(ctx, offset, value).map_err(|()| Reason::MissingState)
}

/// Encapsulates the packet for `backend`, or turns it into a "too big" answer to the sender
/// when it would not fit. A function of its own (a BPF-to-BPF call): its headers do not share
/// the main frame's stack.
#[inline(never)]
pub fn encapsulate(ctx: &XdpContext, p: &Packet, b: &Backend) -> Result<Egress, Reason> {
    let overhead = if p.family == FAMILY_V4 {
        IPV4_MIN_HLEN
    } else {
        IPV6_HLEN
    };
    if b.mtu != 0 && p.ip_len + overhead > b.mtu as usize {
        let mtu = b.mtu as usize - overhead;
        // No ICMP error about an ICMP error, nor about a fragment after the first (RFC 1122,
        // RFC 4443): those are dropped and counted.
        if p.icmp_error || p.frag == Frag::Later {
            return Err(Reason::TooBig);
        }
        // Without DF the sender's path may fragment, but we do not: dropped and counted. With
        // IPv4 options the fixed-size quote of the answer does not fit: the same.
        let v4 = p.family == FAMILY_V4;
        if v4 && (!p.dont_fragment || p.l4 - p.l3 != IPV4_MIN_HLEN) {
            return Err(Reason::TooBig);
        }
        // Answers are rate-limited, as ICMP errors must be (RFC 4443 §2.4(f)).
        if !crate::may_answer_too_big() {
            return Err(Reason::TooBigSuppressed);
        }
        return if v4 {
            too_big_v4(ctx, p.l3, mtu as u16)
        } else {
            too_big_v6(ctx, p.l3, mtu as u32)
        };
    }
    let l3 = p.l3;
    if l3 != 14 && l3 != 18 {
        return Err(Reason::Malformed);
    }
    // The backend's MACs and VLAN tag (or none) in front of the outer header.
    let ethertype = if p.family == FAMILY_V4 {
        ETH_P_IP
    } else {
        ETH_P_IPV6
    };
    let l3 =
        l2::grow_for_outer(ctx, l3, overhead, ethertype, b).map_err(|()| Reason::MissingState)?;
    if p.family == FAMILY_V4 {
        let mut outer = Ipv4Hdr {
            version_ihl: 0x45,
            tos: 0,
            tot_len: ((p.ip_len + IPV4_MIN_HLEN) as u16).to_be(),
            id: 0,
            // RFC 2003: the outer DF follows the inner one.
            frag_off: if p.dont_fragment { IP_DF.to_be() } else { 0 },
            ttl: OUTER_TTL,
            proto: IPPROTO_IPIP,
            check: 0,
            saddr: b.tunnel_src[0],
            daddr: b.addr[0],
        };
        outer.check = ipv4_checksum(&outer);
        write_hdr(ctx, l3, outer)?;
    } else {
        let outer = Ipv6Hdr {
            vtc_flow: (6u32 << 28).to_be(),
            payload_len: (p.ip_len as u16).to_be(),
            next_header: IPPROTO_IPV6,
            hop_limit: OUTER_TTL,
            saddr: b.tunnel_src,
            daddr: b.addr,
        };
        write_hdr(ctx, l3, outer)?;
    }
    Ok(Egress::ToBackend)
}

#[inline(always)]
fn adjust_tail(ctx: &XdpContext, delta: i32) -> Result<(), Reason> {
    // SAFETY: the helper checks its arguments; packet pointers are re-derived afterwards.
    let rc = unsafe { aya_ebpf::helpers::generated::bpf_xdp_adjust_tail(ctx.ctx, delta) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Reason::MissingState)
    }
}

/// The one's-complement partial sum of `N` packet bytes at `offset` (N a multiple of 4), by the
/// kernel's csum_diff helper: no loop over packet offsets for the verifier to follow.
#[inline(always)]
fn packet_sum<const N: usize>(ctx: &XdpContext, offset: usize) -> Result<u32, Reason> {
    let p = ptr_at::<[u8; N]>(ctx, offset).map_err(|()| Reason::MissingState)?;
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

/// Folds a 32-bit sum of 16-bit words and complements it.
#[inline(always)]
fn fold32(sum: u64) -> u16 {
    let mut s = sum;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// The answer goes back where the packet came from: (destination, source) MACs swapped.
#[inline(always)]
fn swapped_macs(ctx: &XdpContext) -> Result<([u8; 6], [u8; 6]), Reason> {
    let macs: [u8; 12] = read_at(ctx, 0).map_err(|()| Reason::MissingState)?;
    let mut dst = [0u8; 6];
    let mut src = [0u8; 6];
    dst.copy_from_slice(&macs[6..]);
    src.copy_from_slice(&macs[..6]);
    Ok((dst, src))
}

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// The IPv4 answer quotes the offending header and 8 bytes after it (RFC 792).
const V4_QUOTE: usize = IPV4_MIN_HLEN + 8;
/// The IPv6 answer quotes the offending header and 64 bytes after it: enough for the sender to
/// find its socket, and a small answer.
const V6_QUOTE: usize = IPV6_HLEN + 64;
const ICMP_HLEN: usize = 8;

/// Turns the frame into an ICMP "fragmentation needed" from the VIP to the sender, carrying
/// `mtu`, and sends it back.
#[inline(never)]
fn too_big_v4(ctx: &XdpContext, l3: usize, mtu: u16) -> Result<Egress, Reason> {
    if l3 != 14 && l3 != 18 {
        return Err(Reason::Malformed);
    }
    let (dst, src) = swapped_macs(ctx)?;
    let addrs: [u32; 2] = read_at(ctx, l3 + 12).map_err(|()| Reason::MissingState)?;
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
        ttl: OUTER_TTL,
        proto: IPPROTO_ICMP,
        check: 0,
        saddr: addrs[1],
        daddr: addrs[0],
    };
    ip.check = ipv4_checksum(&ip);
    write_at(ctx, l3, ip)?;
    // Type 3 "destination unreachable", code 4 "fragmentation needed", the next-hop MTU.
    let header: [u16; 4] = [u16::from_be_bytes([3, 4]).to_be(), 0, 0, mtu.to_be()];
    let quoted = packet_sum::<V4_QUOTE>(ctx, l3 + grown)?;
    let check = fold32(sum_words(&header) as u64 + quoted as u64);
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
    if l3 != 14 && l3 != 18 {
        return Err(Reason::Malformed);
    }
    let frame_len = ctx.data_end() - ctx.data();
    let (dst, src) = swapped_macs(ctx)?;
    let grown = IPV6_HLEN + ICMP_HLEN;
    adjust_head(ctx, -(grown as i32))?;
    move_l2(ctx, l3, grown, &dst, &src)?;
    // The new header: the offending one (now `grown` bytes further) with addresses swapped.
    let old_src: lb_common::Addr =
        read_at(ctx, l3 + grown + 8).map_err(|()| Reason::MissingState)?;
    let old_dst: lb_common::Addr =
        read_at(ctx, l3 + grown + 24).map_err(|()| Reason::MissingState)?;
    let len = ICMP_HLEN + V6_QUOTE;
    write_at(
        ctx,
        l3,
        Ipv6Hdr {
            vtc_flow: (6u32 << 28).to_be(),
            payload_len: (len as u16).to_be(),
            next_header: IPPROTO_ICMPV6,
            hop_limit: OUTER_TTL,
            saddr: old_dst,
            daddr: old_src,
        },
    )?;
    // Type 2 "packet too big", code 0, the MTU as 32 bits.
    let mtu = mtu.to_be();
    let header: [u16; 4] = [
        u16::from_be_bytes([2, 0]).to_be(),
        0,
        mtu as u16,
        (mtu >> 16) as u16,
    ];
    // Pseudo-header: the two addresses, the upper-layer length, the next header.
    let addrs = packet_sum::<32>(ctx, l3 + 8)?;
    let pseudo = (len as u16).to_be() as u64 + (IPPROTO_ICMPV6 as u16).to_be() as u64;
    let quoted = packet_sum::<V6_QUOTE>(ctx, l3 + grown)?;
    let check = fold32(addrs as u64 + pseudo + sum_words(&header) as u64 + quoted as u64);
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
