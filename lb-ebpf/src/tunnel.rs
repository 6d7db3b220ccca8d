//! `tunnel` forwarding: IPv4-in-IPv4 / IPv6-in-IPv6 encapsulation towards the backend.

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_xdp_adjust_head, programs::XdpContext,
};
use lb_common::{Backend, FAMILY_V4, Reason};

use crate::packet::{IP_DF, IPV4_MIN_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr, Packet, ptr_at, read_at};

const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const OUTER_TTL: u8 = 64;

/// Moves the start of the frame by `delta` bytes (negative: grows it at the front).
#[inline(always)]
fn adjust_head(ctx: &XdpContext, delta: i32) -> Result<(), Reason> {
    // SAFETY: the helper checks its arguments; packet pointers are re-derived afterwards.
    let rc = unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Reason::MissingState)
    }
}

/// Writes a `T` into the packet at `offset` (bounds checked by ptr_at).
#[inline(always)]
fn write_at<T>(ctx: &XdpContext, offset: usize, value: T) -> Result<(), Reason> {
    let p = ptr_at::<T>(ctx, offset).map_err(|()| Reason::MissingState)?;
    // SAFETY: ptr_at checked that size_of::<T>() bytes at p lie inside the packet.
    unsafe { core::ptr::write_unaligned(p, value) };
    Ok(())
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
/// the front: the old header now sits `grown` bytes further in.
#[inline(always)]
fn move_l2(
    ctx: &XdpContext,
    l3: usize,
    grown: usize,
    dst: [u8; 6],
    src: [u8; 6],
) -> Result<(), Reason> {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&dst);
    macs[6..].copy_from_slice(&src);
    write_at(ctx, 0, macs)?;
    // Ethertype, or the VLAN tag and the inner ethertype.
    if l3 == 14 {
        let t: [u8; 2] = read_at(ctx, grown + 12).map_err(|()| Reason::MissingState)?;
        write_at(ctx, 12, t)
    } else {
        let t: [u8; 6] = read_at(ctx, grown + 12).map_err(|()| Reason::MissingState)?;
        write_at(ctx, 12, t)
    }
}

/// Encapsulates the packet for `backend`; one that would not fit the egress MTU is refused. A
/// function of its own (a BPF-to-BPF call): its headers do not share the main frame's stack.
#[inline(never)]
pub fn encapsulate(ctx: &XdpContext, p: &Packet, b: &Backend) -> Result<u32, Reason> {
    let overhead = if p.family == FAMILY_V4 {
        IPV4_MIN_HLEN
    } else {
        IPV6_HLEN
    };
    if b.mtu != 0 && p.ip_len + overhead > b.mtu as usize {
        // Dropped and counted. Answering with ICMP "fragmentation needed" / "packet too big"
        // (so the client's path-MTU discovery converges) is still to come.
        return Err(Reason::TooBig);
    }
    let l3 = p.l3;
    if l3 != 14 && l3 != 18 {
        return Err(Reason::Malformed);
    }
    adjust_head(ctx, -(overhead as i32))?;
    move_l2(ctx, l3, overhead, b.mac, b.src_mac)?;
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
        write_at(ctx, l3, outer)?;
    } else {
        let outer = Ipv6Hdr {
            vtc_flow: (6u32 << 28).to_be(),
            payload_len: (p.ip_len as u16).to_be(),
            next_header: IPPROTO_IPV6,
            hop_limit: OUTER_TTL,
            saddr: b.tunnel_src,
            daddr: b.addr,
        };
        write_at(ctx, l3, outer)?;
    }
    Ok(xdp_action::XDP_TX)
}
