//! Parsing: bounds checked once, through `ptr_at`; every header read through `read_at`.

use aya_ebpf::programs::XdpContext;

use crate::access::{read_at, read_hdr};
use crate::headers::{
    ETH_HLEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, ETH_TYPE_AT, IPV4_MIN_HLEN, IPV6_HLEN, Ipv4Hdr,
    Ipv6Hdr, VLAN_HLEN,
};
use crate::icmp::{self, PROTO_ICMP, PROTO_ICMPV6};
use lb_common::{Addr, FAMILY_V4, FAMILY_V6, FlowKey, FragKey, PROTO_TCP, PROTO_UDP};

/// More-fragments flag and fragment offset of IPv4's frag_off field (host order).
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
pub const IP_DF: u16 = 0x4000;
/// IPv6 extension headers skipped on the way to the transport header.
const EXT_HOP_BY_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_AUTH: u8 = 51;
const EXT_DEST_OPTS: u8 = 60;
/// At most this many extension headers are skipped; a packet with more is passed up.
const MAX_EXT_HEADERS: usize = 6;
/// Offset of the flags byte in the TCP header, and the flags that matter here.
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The first four bytes of TCP and UDP headers alike.
#[repr(C, packed(2))]
#[derive(Clone, Copy)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
}

#[repr(C, packed(2))]
#[derive(Clone, Copy)]
struct ExtHdr {
    next_header: u8,
    len: u8,
}

#[repr(C, packed(2))]
#[derive(Clone, Copy)]
struct FragHdr {
    next_header: u8,
    _reserved: u8,
    offset_flags: u16,
    id: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// Not a fragment.
    None,
    /// The first fragment: it has the transport header.
    First,
    /// A later fragment: no transport header.
    Later,
}

/// What parsing found out about a packet that might belong to a service. For an ICMP error the
/// addresses, ports and protocol are those of the flow it quotes, turned around to the client's
/// direction (client → VIP), so it is classified and placed like that flow's packets.
pub struct Packet {
    /// Offset of the IP header (after Ethernet and an optional VLAN tag).
    pub l3: usize,
    /// Offset of the transport (or ICMP) header, after IPv6 extension headers.
    pub l4: usize,
    /// Length of the IP packet (header included), as its header says.
    pub ip_len: usize,
    /// The IP total length runs past the frame, or is too short for the headers: the packet is
    /// not forwarded even when it is addressed to a service.
    pub malformed: bool,
    /// A TCP SYN without ACK: a new connection, which always takes the current table's choice.
    pub syn: bool,
    /// A TCP FIN or RST from the client: its record, if it has one, lives only a short grace.
    pub closing: bool,
    /// IPv4 with DF set (IPv6 never fragments on the way).
    pub dont_fragment: bool,
    /// An ICMP "fragmentation needed" / "packet too big" about a flow.
    pub icmp_error: bool,
    pub frag: Frag,
    pub frag_id: u32,
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    /// The protocol of the IP header itself (differs from `proto` for ICMP errors).
    pub ip_proto: u8,
}

impl Packet {
    #[inline(always)]
    pub fn flow_key(&self) -> FlowKey {
        FlowKey {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }

    #[inline(always)]
    pub fn frag_key(&self) -> FragKey {
        FragKey {
            src: self.src,
            dst: self.dst,
            id: self.frag_id,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }
}

/// Parses into `out`; true when the packet may be ours, and `out` then holds it (otherwise it
/// may be left uninitialised or half-filled: the caller must not read it). A function of its
/// own (a BPF-to-BPF call) so the header copies parsing makes stay off the main frame, whose
/// stack the tunnel's subprograms share the 512-byte budget with. It returns a register, not the struct (a struct returned by
/// pointer gets BTF the kernel refuses). `out` is a raw pointer so the caller need not zero it
/// first (zeroing the 72-byte struct compiled to a byte-wise `memset` loop, a fifth of the
/// program's time), and the IP parsers write the Packet straight into it (building it on this
/// frame and copying it out cost ~4 ns a packet).
#[inline(never)]
pub fn parse_into(ctx: &XdpContext, out: *mut Packet) -> bool {
    keep_context(ctx);
    parse(ctx, out).is_ok()
}

/// Makes the context pointer escape, so LLVM cannot replace a subprogram's `ctx` argument by the
/// packet pointers loaded in the caller (argument promotion): passed as plain integers they lose
/// their packet-pointer type and the verifier refuses them.
#[inline(always)]
pub fn keep_context(ctx: &XdpContext) {
    let mut slot: *const XdpContext = core::ptr::null();
    // SAFETY: a volatile store to a local; nothing reads it.
    unsafe { core::ptr::write_volatile(&mut slot, ctx) };
}

/// Writes `value` whole into the caller's Packet at `out` (no copy of it on this frame) and
/// lends it back for the transport header's fields.
#[inline(always)]
fn fill<'a>(out: *mut Packet, value: Packet) -> &'a mut Packet {
    // SAFETY: `out` points to the caller's Packet, which outlives the parse; it may be
    // uninitialised, and a write neither reads nor drops it; afterwards it may be borrowed.
    unsafe {
        out.write(value);
        &mut *out
    }
}

#[inline(always)]
fn parse(ctx: &XdpContext, out: *mut Packet) -> Result<(), ()> {
    let eth_type: u16 = read_hdr(ctx, ETH_TYPE_AT)?;
    let mut l3 = ETH_HLEN;
    let mut ether_type = u16::from_be(eth_type);
    if ether_type == ETH_P_8021Q {
        // One 802.1Q tag: the inner type follows the tag control field. The tag stays.
        let inner: u16 = read_hdr(ctx, ETH_TYPE_AT + VLAN_HLEN)?;
        ether_type = u16::from_be(inner);
        l3 += VLAN_HLEN;
    }
    match ether_type {
        ETH_P_IP => parse_ipv4::<true>(ctx, l3, out),
        ETH_P_IPV6 => parse_ipv6(ctx, l3, out),
        _ => Err(()),
    }
}

/// The common frame parsed inline, without `parse_into`'s call: untagged IPv4 carrying
/// anything but ICMP (TCP and UDP: others are not ours). `false` for any other frame, which
/// `parse_into` then parses. The same code as `parse_into`'s for such a frame, so the
/// verifier's states after either are alike and it prunes the second (with a fast path of
/// its own it explored the rest of the program twice, past its limit).
#[inline(always)]
pub fn parse_common(ctx: &XdpContext, out: *mut Packet) -> bool {
    matches!(read_hdr::<u16>(ctx, ETH_TYPE_AT), Ok(t) if t == ETH_P_IP.to_be())
        && parse_ipv4::<false>(ctx, ETH_HLEN, out).is_ok()
}

/// An IPv4 packet at `l3`; an ICMP error only with `ICMP` (`parse_common` leaves it to
/// `parse_into`).
#[inline(always)]
fn parse_ipv4<const ICMP: bool>(ctx: &XdpContext, l3: usize, out: *mut Packet) -> Result<(), ()> {
    let ip: Ipv4Hdr = read_hdr(ctx, l3)?;
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    if ip.version_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return Err(());
    }
    let ip_len = u16::from_be(ip.tot_len) as usize;
    let frag_off = u16::from_be(ip.frag_off);
    let frag = if frag_off & IP_OFFSET != 0 {
        Frag::Later
    } else if frag_off & IP_MF != 0 {
        Frag::First
    } else {
        Frag::None
    };
    let p = fill(
        out,
        Packet {
            l3,
            l4: 0,
            ip_len,
            malformed: ip_len < ihl || l3 + ip_len > ctx.data_end() - ctx.data(),
            syn: false,
            closing: false,
            dont_fragment: frag_off & IP_DF != 0,
            icmp_error: false,
            frag,
            frag_id: u16::from_be(ip.id) as u32,
            src: [ip.saddr, 0, 0, 0],
            dst: [ip.daddr, 0, 0, 0],
            sport: 0,
            dport: 0,
            proto: ip.proto,
            family: FAMILY_V4,
            ip_proto: ip.proto,
        },
    );
    p.l4 = l3 + ihl;
    if ICMP && ip.proto == PROTO_ICMP && frag == Frag::None {
        icmp::quoted_flow(ctx, p, l3 + ihl, ip_len.saturating_sub(ihl))?;
    } else {
        transport(ctx, p, l3 + ihl, ip_len.saturating_sub(ihl))?;
    }
    Ok(())
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, l3: usize, out: *mut Packet) -> Result<(), ()> {
    let ip: Ipv6Hdr = read_hdr(ctx, l3)?;
    let (src, dst) = (read_addr6(ctx, l3 + 8)?, read_addr6(ctx, l3 + 24)?);
    if u32::from_be(ip.vtc_flow) >> 28 != 6 {
        return Err(());
    }
    let ip_len = IPV6_HLEN + u16::from_be(ip.payload_len) as usize;
    let p = fill(
        out,
        Packet {
            l3,
            l4: 0,
            ip_len,
            malformed: l3 + ip_len > ctx.data_end() - ctx.data(),
            syn: false,
            closing: false,
            dont_fragment: true,
            icmp_error: false,
            frag: Frag::None,
            frag_id: 0,
            src,
            dst,
            sport: 0,
            dport: 0,
            proto: ip.next_header,
            family: FAMILY_V6,
            ip_proto: ip.next_header,
        },
    );
    // Extension headers, a bounded number of them.
    let mut off = l3 + IPV6_HLEN;
    let mut next = ip.next_header;
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        match next {
            EXT_HOP_BY_HOP | EXT_ROUTING | EXT_DEST_OPTS => {
                let h: ExtHdr = read_hdr(ctx, off)?;
                next = h.next_header;
                off += (h.len as usize + 1) * 8;
            }
            EXT_AUTH => {
                let h: ExtHdr = read_hdr(ctx, off)?;
                next = h.next_header;
                off += (h.len as usize + 2) * 4;
            }
            EXT_FRAGMENT => {
                let h: FragHdr = read_hdr(ctx, off)?;
                next = h.next_header;
                let offset_flags = u16::from_be(h.offset_flags);
                p.frag = if offset_flags & 0xfff8 != 0 {
                    Frag::Later
                } else if offset_flags & 1 != 0 {
                    Frag::First
                } else {
                    Frag::None
                };
                p.frag_id = h.id;
                off += 8;
            }
            _ => break,
        }
        i += 1;
    }
    p.proto = next;
    p.ip_proto = next;
    let header_bytes = off - l3;
    if header_bytes > ip_len {
        p.malformed = true;
    }
    p.l4 = off;
    if next == PROTO_ICMPV6 && p.frag == Frag::None {
        icmp::quoted_flow(ctx, p, off, ip_len.saturating_sub(header_bytes))?;
    } else {
        transport(ctx, p, off, ip_len.saturating_sub(header_bytes))?;
    }
    Ok(())
}

/// An IPv6 address at `off`, read as eight 16-bit words (reading it as part of `Ipv6Hdr`
/// compiled to 16 byte loads and stores). The program is little-endian: the first word of a
/// pair is the low half of the u32 the address word is on the wire.
#[inline(always)]
fn read_addr6(ctx: &XdpContext, off: usize) -> Result<Addr, ()> {
    let w: crate::headers::Words<8> = read_hdr(ctx, off)?;
    let w = w.0;
    let pair = |i: usize| w[i] as u32 | (w[i + 1] as u32) << 16;
    Ok([pair(0), pair(2), pair(4), pair(6)])
}

/// Ports (and the SYN flag) of a TCP or UDP packet whose transport header starts at `l4`;
/// later fragments have none. `Err` for other protocols and for a frame too short to show the
/// ports; a transport header that the IP length or the frame cuts short marks it malformed.
#[inline(always)]
fn transport(ctx: &XdpContext, p: &mut Packet, l4: usize, l4_len: usize) -> Result<(), ()> {
    if p.proto != PROTO_TCP && p.proto != PROTO_UDP {
        return Err(());
    }
    if p.frag == Frag::Later {
        return Ok(());
    }
    let ports: Ports = read_hdr(ctx, l4)?;
    p.sport = ports.src;
    p.dport = ports.dst;
    // The whole fixed header must lie inside the IP packet: bytes past it (Ethernet padding)
    // must not decide anything, and a first fragment too short for it is not forwarded.
    let header = if p.proto == PROTO_TCP {
        TCP_MIN_HLEN
    } else {
        UDP_HLEN
    };
    if l4_len < header {
        p.malformed = true;
    }
    if p.proto == PROTO_TCP {
        // Data offset and flags as one read: single-byte reads at variable offsets get bounds
        // checks the verifier cannot follow once LLVM rewrites them.
        match read_at::<[u8; 2]>(ctx, l4 + TCP_FLAGS_OFFSET - 1) {
            Ok([_, flags]) => {
                p.syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
                p.closing = flags & (TCP_FIN | TCP_RST) != 0;
            }
            Err(()) => p.malformed = true,
        }
    }
    Ok(())
}
