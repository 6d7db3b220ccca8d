//! lb's decapsulation program, for backends of `tunnel` services (`lbd decap`). It strips the
//! outer header of IPv4-in-IPv4 (outer protocol 4) and IPv6-in-IPv6 (outer next header 41)
//! packets whose outer destination is one of the interface's own addresses, whose outer source
//! lies in an allowed prefix (the balancers', `--allow`) and whose inner destination is an
//! address of this host (`DECAP_ADDRS` and `DECAP_ALLOW`, filled by `lbd decap`), moving the
//! Ethernet header (and one 802.1Q tag) forward over it, and passes the inner packet to the
//! kernel. Everything else, including anything too short or inconsistent, is passed untouched;
//! tunnel packets to the interface that are not unwrapped are counted by why (`DECAP_STATS`).
//! It never drops.
//!
//! Self-contained on purpose (the balancer's parser does far more than this needs): each header
//! is read whole, at a constant offset (`ETH_HLEN`, or `ETH_HLEN + VLAN_HLEN`), through one
//! bounds check.
#![no_std]
#![no_main]

mod access;
mod headers;
mod runtime;

use access::{read_at, read_hdr, write_at};
use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    helpers::generated::bpf_xdp_adjust_head,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use headers::{
    ETH_HLEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, ETH_TYPE_AT, IPV4_MIN_HLEN, IPV6_HLEN, Ipv4Hdr,
    Ipv6Hdr, VLAN_HLEN,
};
use lb_common::{
    Addr, FAMILY_V4, FAMILY_V6,
    decap::{ALLOW_LOOKUP_LEN, AddrKey, AllowData, MAX_ADDRS, MAX_ALLOW, Stat, addr_flags},
};

const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
/// More-fragments flag and fragment offset of IPv4's frag_off (host order).
const IP_MF_OFFSET: u16 = 0x3fff;

/// This host's addresses, with what each one is (`addr_flags`: the interface's own, whose
/// tunnel packets are unwrapped; any of the host's, which inner packets may be sent to).
#[btf_map]
static DECAP_ADDRS: HashMap<AddrKey, u8, { MAX_ADDRS as usize }> = HashMap::new();

/// The prefixes tunnel packets may come from (value unused, 1).
#[btf_map]
static DECAP_ALLOW: LpmTrie<AllowData, u8, { MAX_ALLOW as usize }> = LpmTrie::new();

/// Tunnel packets to the interface, by what was done with them (`Stat`).
#[btf_map]
static DECAP_STATS: PerCpuArray<u64, { Stat::COUNT as usize }> = PerCpuArray::new();

/// Moves the start of the frame `delta` bytes further in (drops that many bytes at the front).
#[inline(always)]
fn shrink_head(ctx: &XdpContext, delta: usize) -> Result<(), ()> {
    // SAFETY: the helper checks its arguments; packet pointers are re-derived afterwards (every
    // access goes through ptr_at, which reads ctx.data() anew).
    let rc = unsafe { bpf_xdp_adjust_head(ctx.ctx, delta as i32) };
    if rc == 0 { Ok(()) } else { Err(()) }
}

/// Whether `addr` is in `DECAP_ADDRS` with `flag`.
#[inline(always)]
fn has_flag(addr: Addr, family: u8, flag: u8) -> bool {
    let key = AddrKey {
        addr,
        family,
        _pad: [0; 3],
    };
    DECAP_ADDRS.get_ptr(key).is_some_and(|f| {
        // SAFETY: a pointer returned by a map lookup is valid for this program run.
        unsafe { *f & flag != 0 }
    })
}

/// Whether `addr` lies in an allowed prefix.
#[inline(always)]
fn allowed(addr: Addr, family: u8) -> bool {
    let key = Key::new(
        ALLOW_LOOKUP_LEN,
        AllowData {
            family,
            _pad: [0; 3],
            addr,
        },
    );
    DECAP_ALLOW.get(&key).is_some()
}

#[inline(always)]
fn count(stat: Stat) {
    if let Some(c) = DECAP_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot of this CPU; no other writer while the program runs here.
        unsafe { *c += 1 };
    }
}

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    // Whatever happens, the kernel gets the packet: decapsulated when it was ours, untouched
    // otherwise (every check comes before the first write).
    let _ = decap(&ctx);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> Result<(), ()> {
    let ether_type = u16::from_be(read_hdr::<u16>(ctx, ETH_TYPE_AT)?);
    if ether_type == ETH_P_8021Q {
        let inner = u16::from_be(read_hdr::<u16>(ctx, ETH_TYPE_AT + VLAN_HLEN)?);
        decap_at::<{ ETH_HLEN + VLAN_HLEN }>(ctx, inner)
    } else {
        decap_at::<ETH_HLEN>(ctx, ether_type)
    }
}

/// Decapsulates the packet whose IP header starts at `L3` (`ETH_HLEN`, or `ETH_HLEN + VLAN_HLEN`
/// behind a VLAN tag), if it is a tunnel packet for this host from an allowed source.
#[inline(always)]
fn decap_at<const L3: usize>(ctx: &XdpContext, ether_type: u16) -> Result<(), ()> {
    // Both headers are read before any length is compared with the frame's: LLVM would
    // otherwise drop the inner read's bounds check as implied by the comparison, in a form the
    // verifier cannot follow.
    let (outer_len, ip_len, src, inner_dst, family) = match ether_type {
        ETH_P_IP => {
            let outer: Ipv4Hdr = read_hdr(ctx, L3)?;
            let inner: Ipv4Hdr = read_hdr(ctx, L3 + IPV4_MIN_HLEN)?;
            // A plain 20-byte outer header (no options), not a fragment, for this interface.
            if outer.version_ihl != 0x45
                || outer.proto != IPPROTO_IPIP
                || u16::from_be(outer.frag_off) & IP_MF_OFFSET != 0
                || inner.version_ihl >> 4 != 4
                || !has_flag([outer.daddr, 0, 0, 0], FAMILY_V4, addr_flags::OUTER)
            {
                return Err(());
            }
            (
                IPV4_MIN_HLEN,
                u16::from_be(outer.tot_len) as usize,
                [outer.saddr, 0, 0, 0],
                [inner.daddr, 0, 0, 0],
                FAMILY_V4,
            )
        }
        ETH_P_IPV6 => {
            let outer: Ipv6Hdr = read_hdr(ctx, L3)?;
            let inner: Ipv6Hdr = read_hdr(ctx, L3 + IPV6_HLEN)?;
            if u32::from_be(outer.vtc_flow) >> 28 != 6
                || outer.next_header != IPPROTO_IPV6
                || u32::from_be(inner.vtc_flow) >> 28 != 6
                || !has_flag(outer.daddr, FAMILY_V6, addr_flags::OUTER)
            {
                return Err(());
            }
            (
                IPV6_HLEN,
                IPV6_HLEN + u16::from_be(outer.payload_len) as usize,
                outer.saddr,
                inner.daddr,
                FAMILY_V6,
            )
        }
        _ => return Err(()),
    };
    // The outer length must cover the inner header and lie inside the frame (which may carry
    // padding beyond it).
    if ip_len < 2 * outer_len || L3 + ip_len > ctx.data_end() - ctx.data() {
        count(Stat::Malformed);
        return Err(());
    }
    // Only the balancers may send tunnel packets (anyone else could slip a spoofed inner packet
    // past rp_filter), and only to this host (it is no router for them).
    if !allowed(src, family) {
        count(Stat::SourceNotAllowed);
        return Err(());
    }
    if !has_flag(inner_dst, family, addr_flags::INNER) {
        count(Stat::InnerNotLocal);
        return Err(());
    }
    // The Ethernet header (with its tag) as it is; the ethertype that ends it names the inner
    // family, the same as the outer one (IPv4-in-IPv4, IPv6-in-IPv6).
    let mut l2: [u8; L3] = read_at(ctx, 0)?;
    l2[L3 - 2..].copy_from_slice(&ether_type.to_be_bytes());
    shrink_head(ctx, outer_len)?;
    write_at(ctx, 0, l2)?;
    count(Stat::Decapsulated);
    Ok(())
}
