//! `tunnel` forwarding: IPv4-in-IPv4 / IPv6-in-IPv6 encapsulation towards the backend; a packet
//! that would not fit the egress MTU once encapsulated gets the ICMP answer instead
//! (`icmp::answer_too_big`).

use aya_ebpf::programs::XdpContext;
use lb_common::{Backend, FAMILY_V4, Reason};

use crate::{
    frame::{ipv4_checksum, write_hdr},
    headers::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV4_MIN_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr, VLAN_HLEN,
    },
    icmp, l2,
    packet::{IP_DF, Packet},
    verdict::Egress,
};

const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const OUTER_TTL: u8 = 64;

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
        return icmp::answer_too_big(ctx, p, b.mtu as usize - overhead);
    }
    let l3 = p.l3;
    if l3 != ETH_HLEN && l3 != ETH_HLEN + VLAN_HLEN {
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
