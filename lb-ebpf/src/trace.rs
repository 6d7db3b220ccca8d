//! `lbctl trace`: while lbd traces (`Config::trace`), the program parses each packet once more
//! at its start into this CPU's `TRACE_PACKET`, and its exit for a packet to a VIP's address
//! sends that packet's flow with the program's verdict (`Verdict`: action, why, service,
//! backend, the connection table's part) to `TRACE_EVENTS` when its service is the traced one.
//! Only `lb_xdp_traced` has these checks, and lbd swaps it into the links only while a trace
//! runs: with 65,536 clients the two checks (a read of `CONFIG` and a branch at each end)
//! measured tens of ns per packet in `lb_xdp`, though nothing in hot-cache test runs.
//!
//! Why there and nothing between: the verifier's work follows the program's paths, and a branch
//! or a note anywhere between the parse and the last steps (a check of `Config::trace`, even a
//! map lookup's null check) doubled its work after that point, past its limit of 1,000,000
//! instructions. Before the parse nothing is known yet, and at the exit nothing follows; what
//! the steps decided reaches the exit in the one register the action is in anyway.

use aya_ebpf::programs::XdpContext;
use lb_common::{ServiceKey, TRACE_ALL, TraceEvent, Verdict};

use crate::{
    maps::{CONFIG, SERVICES, TRACE_EVENTS, TRACE_PACKET},
    packet::{self, Frag, Packet},
};

/// A CPU's packet under way, as parsed at the program's start.
pub struct Captured {
    pub packet: Packet,
    /// `Config::trace_session` when it was parsed; 0: nothing parsed (or already sent).
    pub session: u32,
}

/// The program's start: while a trace runs, the packet is parsed into this CPU's
/// `TRACE_PACKET`.
#[inline(always)]
pub fn capture(ctx: &XdpContext) {
    if let Some(config) = CONFIG.get(0)
        && config.trace != 0
    {
        parse_captured(ctx, config.trace_session);
    }
}

/// `capture`'s work, a call of its own: its branches stay out of the main program's.
#[inline(never)]
fn parse_captured(ctx: &XdpContext, session: u32) {
    let Some(c) = TRACE_PACKET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: `c` is this CPU's entry, valid for this program run; no other writer while the
    // program runs here. `parse_into` writes the whole packet when it returns true.
    unsafe {
        (*c).session = 0;
        if packet::parse_into(ctx, &raw mut (*c).packet) {
            (*c).session = session;
        }
    }
}

/// The program's exit for a packet to a VIP's address: its event goes out when a trace runs
/// and its service is the traced one.
#[inline(always)]
pub fn end(verdict: Verdict) {
    if let Some(config) = CONFIG.get(0)
        && config.trace != 0
    {
        submit(verdict);
    }
}

/// `end`'s work, a call of its own with the verdict as its one value from the caller, which it
/// stores and never branches on (see `lb_common::Verdict`), so the verifier sees it from a
/// handful of states.
#[inline(never)]
fn submit(verdict: Verdict) {
    let (Some(config), Some(c)) = (CONFIG.get(0), TRACE_PACKET.get_ptr_mut(0)) else {
        return;
    };
    // SAFETY: as in `parse_captured`.
    let c = unsafe { &mut *c };
    if c.session == 0 || c.session != config.trace_session {
        // Parsed before this trace began, or not at all: not this packet.
        return;
    }
    c.session = 0;
    let p = &c.packet;
    if config.trace != TRACE_ALL && !of_service(p, config.trace - 1) {
        return;
    }
    let event = TraceEvent {
        flow: p.flow_key(),
        verdict: verdict.0,
        len: (p.l3 + p.ip_len) as u32,
        syn: p.syn as u8,
        closing: p.closing as u8,
        icmp_error: p.icmp_error as u8,
        fragment: p.frag as u8,
    };
    // A full ring loses the event (lbd reads as events come).
    let _ = TRACE_EVENTS.output(&event, 0);
}

/// Whether packet `p` may be of service `id`: its destination's service (or its VIP's
/// every-port one) is; a later fragment (no ports) may be of any service of its VIP, and lbd
/// keeps those of the traced service by the verdict.
#[inline(always)]
fn of_service(p: &Packet, id: u32) -> bool {
    if p.frag == Frag::Later {
        return true;
    }
    let mut key = ServiceKey {
        addr: p.dst,
        port: p.dport,
        proto: p.proto,
        family: p.family,
    };
    if let Some(s) = SERVICES.get_ptr(&key) {
        // SAFETY: a pointer returned by a map lookup is valid for this program run.
        return unsafe { (*s).id } == id;
    }
    key.port = 0;
    // SAFETY: as above.
    SERVICES
        .get_ptr(&key)
        .is_some_and(|s| unsafe { (*s).id } == id)
}
