//! The Ethernet header a frame leaves with towards a backend: the backend's (or its next
//! hop's) MAC, the egress interface's MAC, and the backend's 802.1Q tag (`Backend::vlan`, 0 for
//! none) whatever tag the frame arrived with. A tag that is replaced keeps the arrival's
//! priority and DEI bits; an added one has none.

use aya_ebpf::programs::XdpContext;
use lb_common::Backend;

use crate::access::{read_hdr, write_hdr};
use crate::headers::{ETH_HLEN, ETH_P_8021Q, ETH_TYPE_AT, EthAddrs, VLAN_HLEN};

// `addresses` reads the two MACs of a backend entry as 16-bit words: both lie at even offsets
// of a struct aligned to 4.
const _: () = assert!(
    core::mem::offset_of!(Backend, mac) % 2 == 0
        && core::mem::offset_of!(Backend, src_mac) % 2 == 0
        && core::mem::align_of::<Backend>() >= 2
);

/// The destination (the backend's or its next hop's) and source (the egress interface's) MACs
/// of a frame to `b`, read as six 16-bit words (`EthAddrs::new` on the byte arrays compiles
/// to twelve byte loads, shifted and joined).
#[inline(always)]
pub fn addresses(b: &Backend) -> EthAddrs {
    // SAFETY: `mac` and `src_mac` are 6 bytes each at 2-aligned places (asserted above), so
    // each reads as three u16 words; any bit pattern is a valid u16.
    let (dst, src) = unsafe {
        (
            core::ptr::read(b.mac.as_ptr().cast::<[u16; 3]>()),
            core::ptr::read(b.src_mac.as_ptr().cast::<[u16; 3]>()),
        )
    };
    EthAddrs::from_words(dst, src)
}

/// An Ethernet header's addresses and 802.1Q tag, as 16-bit words (network order).
#[repr(C, packed(2))]
#[derive(Clone, Copy)]
struct TaggedAddrs {
    addrs: EthAddrs,
    tpid: u16,
    tci: u16,
}

/// Writes the addresses and an 802.1Q tag with control field `tci` (host order) at the front.
#[inline(always)]
fn write_tagged(ctx: &XdpContext, addrs: EthAddrs, tci: u16) -> Result<(), ()> {
    write_hdr(
        ctx,
        0,
        TaggedAddrs {
            addrs,
            tpid: ETH_P_8021Q.to_be(),
            tci: tci.to_be(),
        },
    )
}

/// The priority and DEI bits of a tag's control field.
const TCI_PRIORITY: u16 = 0xf000;

/// The tag control field (host order) for a frame to VLAN `vlan` that arrived with its IP
/// header at `l3`: the arrival's priority and DEI bits when it was tagged.
#[inline(always)]
fn tci(ctx: &XdpContext, l3: usize, vlan: u16) -> Result<u16, ()> {
    if l3 == ETH_HLEN {
        return Ok(vlan);
    }
    // The tag control field follows the tag's ethertype (0x8100) at 12.
    let old: u16 = read_hdr(ctx, ETH_HLEN)?;
    Ok(u16::from_be(old) & TCI_PRIORITY | vlan)
}

/// Moves the start of the frame by `delta` bytes (negative: grows it at the front).
#[inline(always)]
pub fn adjust_head(ctx: &XdpContext, delta: i32) -> Result<(), ()> {
    // SAFETY: the helper checks its arguments; packet pointers are re-derived afterwards.
    let rc = unsafe { aya_ebpf::helpers::generated::bpf_xdp_adjust_head(ctx.ctx, delta) };
    if rc == 0 { Ok(()) } else { Err(()) }
}

/// Direct server return: the frame goes to the backend's MAC from the egress interface's MAC,
/// with the backend's VLAN tag or none (`retag` when that changes the header's length or tag);
/// IP and L4 stay as the client sent them (the backend holds the VIP). The arrival's IP header
/// is at `l3`.
#[inline(always)]
pub fn rewrite_dsr(ctx: &XdpContext, l3: usize, b: &Backend) -> Result<(), ()> {
    if l3 == ETH_HLEN && b.vlan == 0 {
        return write_hdr(ctx, 0, addresses(b));
    }
    retag(ctx, l3, b)
}

/// dsr, for a frame whose tag must change (added, replaced or removed; the caller rewrites an
/// untagged frame to an untagged backend itself): the backend's MACs and tag in place of the
/// arrival's header. The IP packet does not move. A function of its own (a BPF-to-BPF call):
/// off the common path.
#[inline(never)]
fn retag(ctx: &XdpContext, l3: usize, b: &Backend) -> Result<(), ()> {
    crate::packet::keep_context(ctx);
    if b.vlan == 0 {
        // Tagged → untagged: the front cut by the tag's length (the ethertype then follows
        // the addresses), the new addresses written over the old ones.
        adjust_head(ctx, VLAN_HLEN as i32)?;
        return write_hdr(ctx, 0, addresses(b));
    }
    let tci = tci(ctx, l3, b.vlan)?;
    if l3 == ETH_HLEN {
        // Untagged → tagged: room for the tag in front, the ethertype stays where it is.
        adjust_head(ctx, -(VLAN_HLEN as i32))?;
    }
    write_tagged(ctx, addresses(b), tci)
}

/// tunnel: the Ethernet header of a frame that grows by an outer IP header of `outer` bytes
/// (of ethertype `ethertype`), the arrival's IP header at `l3`. Grows the frame at the front
/// and writes the backend's MACs, tag and the ethertype; returns where the outer IP header
/// goes (`ETH_HLEN`, or `ETH_HLEN + VLAN_HLEN` with a tag).
#[inline(always)]
pub fn grow_for_outer(
    ctx: &XdpContext,
    l3: usize,
    outer: usize,
    ethertype: u16,
    b: &Backend,
) -> Result<usize, ()> {
    // The addresses are read from the backend after the helper call: read before, they would
    // be kept on the stack across it.
    if b.vlan == 0 {
        adjust_head(ctx, l3 as i32 - (ETH_HLEN + outer) as i32)?;
        write_hdr(ctx, 0, addresses(b))?;
        write_hdr(ctx, ETH_TYPE_AT, ethertype.to_be())?;
        return Ok(ETH_HLEN);
    }
    let tci = tci(ctx, l3, b.vlan)?;
    let l2 = ETH_HLEN + VLAN_HLEN;
    adjust_head(ctx, l3 as i32 - (l2 + outer) as i32)?;
    write_tagged(ctx, addresses(b), tci)?;
    write_hdr(ctx, ETH_TYPE_AT + VLAN_HLEN, ethertype.to_be())?;
    Ok(l2)
}
