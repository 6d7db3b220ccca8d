//! A probe for `lbd`'s kernel check (`datapath::kernel`): an XDP program that calls a global
//! function with a pointer argument, as the balancer's `nat` steps are (`lb_nat_forward`,
//! `lb_nat_reply`). A kernel that cannot verify such a function on its own (before Linux 5.12)
//! refuses to load it. It is loaded, never attached.
#![no_std]
#![no_main]

mod runtime;

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    macros::xdp,
    programs::XdpContext,
};

/// What the global function reads through its pointer.
#[repr(C)]
pub struct Probed {
    pub action: u32,
}

#[xdp]
pub fn lb_probe(ctx: XdpContext) -> u32 {
    let probed = Probed {
        action: xdp_action::XDP_PASS,
    };
    lb_probe_global(ctx.ctx, &probed)
}

/// A global function (exported, verified on its own) with a context and a pointer argument.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_probe_global(ctx: *mut xdp_md, p: *const Probed) -> u32 {
    // SAFETY: the verifier proves `p` readable for the struct's size or refuses the program;
    // null (never passed) passes the packet.
    match unsafe { p.as_ref() } {
        Some(p) if !ctx.is_null() => p.action,
        _ => xdp_action::XDP_PASS,
    }
}
