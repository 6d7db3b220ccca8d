//! Packet access for both programs (the balancer and the decapsulator): bounds checked once,
//! here, in `ptr_at`; every read and write of packet bytes goes through it.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

/// A pointer to a `T` at `offset` if the whole `T` lies inside the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

/// Reads a `T` from the packet. Packet data has no alignment guarantee.
#[inline(always)]
pub fn read_at<T>(ctx: &XdpContext, offset: usize) -> Result<T, ()> {
    let p = ptr_at::<T>(ctx, offset)?;
    // SAFETY: ptr_at checked that size_of::<T>() bytes at p lie inside the packet.
    Ok(unsafe { core::ptr::read_unaligned(p) })
}

/// Writes a `T` into the packet at `offset`.
#[inline(always)]
pub fn write_at<T>(ctx: &XdpContext, offset: usize, value: T) -> Result<(), ()> {
    let p = ptr_at::<T>(ctx, offset)?;
    // SAFETY: ptr_at checked that size_of::<T>() bytes at p lie inside the packet.
    unsafe { core::ptr::write_unaligned(p, value) };
    Ok(())
}

/// Reads a header type of alignment 2 (`#[repr(C, packed(2))]`) with 16-bit loads: half the loads
/// of a byte-wise unaligned read. Every header the programs read starts at an even offset, and
/// frames start at even addresses (XDP headroom, NET_IP_ALIGN of 0 or 2, and both programs only
/// move the start by even amounts), so the alignment holds.
#[inline(always)]
pub fn read_hdr<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, ()> {
    let p = ptr_at::<T>(ctx, offset)?;
    // SAFETY: ptr_at checked the bytes lie inside the packet; T has alignment 2 and p is even
    // (see above).
    Ok(unsafe { core::ptr::read(p) })
}

/// Writes a header type of alignment 2 (`#[repr(C, packed(2))]`) with 16-bit stores (see
/// `read_hdr` for why the alignment holds).
#[inline(always)]
#[allow(dead_code)] // the balancer's; lb-decap, which shares this module, writes no header
pub fn write_hdr<T: Copy>(ctx: &XdpContext, offset: usize, value: T) -> Result<(), ()> {
    let p = ptr_at::<T>(ctx, offset)?;
    // SAFETY: ptr_at checked the bytes lie inside the packet; T has alignment 2 and p is even.
    unsafe { core::ptr::write(p, value) };
    Ok(())
}
