//! Changing a frame's size and writing headers into the room made (tunnel encapsulation, ICMP
//! answers), and the checksums of the headers written. A failure here (a helper's refusal, or a
//! frame shorter than the room just made) is counted as `Reason::MissingState`.

use aya_ebpf::programs::XdpContext;
use lb_common::Reason;

use crate::headers::Ipv4Hdr;

/// Moves the start of the frame by `delta` bytes (negative: grows it at the front).
#[inline(always)]
pub fn adjust_head(ctx: &XdpContext, delta: i32) -> Result<(), Reason> {
    crate::l2::adjust_head(ctx, delta).map_err(|()| Reason::MissingState)
}

/// Moves the end of the frame by `delta` bytes (negative: cuts it short).
#[inline(always)]
pub fn adjust_tail(ctx: &XdpContext, delta: i32) -> Result<(), Reason> {
    // SAFETY: the helper checks its arguments; packet pointers are re-derived afterwards.
    let rc = unsafe { aya_ebpf::helpers::generated::bpf_xdp_adjust_tail(ctx.ctx, delta) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Reason::MissingState)
    }
}

/// Reads a header of alignment 2 (`#[repr(C, packed(2))]`) from a frame just resized.
#[inline(always)]
pub fn read_hdr<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, Reason> {
    crate::access::read_hdr(ctx, offset).map_err(|()| Reason::MissingState)
}

/// Reads a `T` (no alignment) from a frame just resized.
#[inline(always)]
pub fn read_at<T>(ctx: &XdpContext, offset: usize) -> Result<T, Reason> {
    crate::access::read_at(ctx, offset).map_err(|()| Reason::MissingState)
}

/// Writes a `T` into the frame at `offset`.
#[inline(always)]
pub fn write_at<T>(ctx: &XdpContext, offset: usize, value: T) -> Result<(), Reason> {
    crate::access::write_at(ctx, offset, value).map_err(|()| Reason::MissingState)
}

/// Writes a header of alignment 2 (`#[repr(C, packed(2))]`) with 16-bit stores.
#[inline(always)]
pub fn write_hdr<T: Copy>(ctx: &XdpContext, offset: usize, value: T) -> Result<(), Reason> {
    crate::access::write_hdr(ctx, offset, value).map_err(|()| Reason::MissingState)
}

/// Folds a one's-complement sum (of 16-bit words and 32-bit partial sums; below 2^48) to 16
/// bits and complements it: the Internet checksum (RFC 1071).
#[inline(always)]
pub fn fold(sum: u64) -> u16 {
    let mut s = sum;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// The sum of `N` 16-bit words.
#[inline(always)]
pub fn sum_words<const N: usize>(words: &[u16; N]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < N {
        sum += words[i] as u64;
        i += 1;
    }
    sum
}

/// The header checksum of an IPv4 header (its `check` field 0).
#[inline(always)]
pub fn ipv4_checksum(h: &Ipv4Hdr) -> u16 {
    // SAFETY: Ipv4Hdr is 20 bytes of plain integers, readable as ten u16 words.
    let words: [u16; 10] = unsafe { core::mem::transmute_copy(h) };
    fold(sum_words(&words))
}
