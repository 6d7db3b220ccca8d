//! `lbctl trace`: while lbd traces (`Config::trace`), each packet of the traced service (or of
//! every service) is written into `TRACE_EVENTS` as the program handled it
//! (`lb_common::TraceEvent`). Otherwise a packet costs one read of `CONFIG` and a branch.

use lb_common::{NO_BACKEND, TRACE_ALL, trace_flags};

use crate::{
    maps::{CONFIG, TRACE_EVENTS},
    packet::{Frag, Packet},
};

/// What the program did with a packet, at its exit.
pub struct Note {
    pub service: u32,
    pub backend: u32,
    pub action: u32,
    /// `Reason as u32`, or a `trace_reason`.
    pub reason: u32,
    /// `trace_table`.
    pub table: u32,
    pub len: u32,
}

impl Note {
    /// A packet of `service` that no backend was chosen for.
    #[inline(always)]
    pub fn unplaced(service: u32, action: u32, reason: u32, len: u32) -> Note {
        Note {
            service,
            backend: NO_BACKEND,
            action,
            reason,
            table: 0,
            len,
        }
    }
}

/// Whether packets of `service` are traced now.
#[inline(always)]
pub fn wanted(service: u32) -> bool {
    match CONFIG.get(0) {
        Some(c) => c.trace != 0 && (c.trace == TRACE_ALL || c.trace == service.wrapping_add(1)),
        None => false,
    }
}

/// Writes the packet's event. A full ring loses it (lbd reads as events come). A call of its
/// own, made only while tracing: its frame is not the main program's.
#[inline(never)]
pub fn sample(p: &Packet, note: &Note) {
    let Some(mut entry) = TRACE_EVENTS.reserve(0) else {
        return;
    };
    let e = entry.as_mut_ptr();
    let flags = if p.syn { trace_flags::SYN } else { 0 }
        | if p.closing { trace_flags::CLOSING } else { 0 }
        | if p.icmp_error {
            trace_flags::ICMP_ERROR
        } else {
            0
        }
        | if p.frag != Frag::None {
            trace_flags::FRAGMENT
        } else {
            0
        };
    // SAFETY: `e` is the reserved entry, valid and writable until submitted; written field by
    // field (no copy of a whole event on this frame).
    unsafe {
        (*e).flow.src = p.src;
        (*e).flow.dst = p.dst;
        (*e).flow.sport = p.sport;
        (*e).flow.dport = p.dport;
        (*e).flow.proto = p.proto;
        (*e).flow.family = p.family;
        (*e).flow._pad = [0; 2];
        (*e).service = note.service;
        (*e).backend = note.backend;
        (*e).action = note.action;
        (*e).reason = note.reason;
        (*e).table = note.table;
        (*e).len = note.len;
        (*e).flags = flags;
        (*e)._pad = 0;
    }
    entry.submit(0);
}
