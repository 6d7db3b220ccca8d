//! lb's XDP data path. It reads like the packet:
//!
//! 1. parse (`packet`): Ethernet, optional 802.1Q, IPv4 or IPv6 with its extension headers,
//!    then the ports, or the flow an ICMP error quotes (`icmp`);
//! 2. classify (`classify`): which service, if any, the packet belongs to, and whether that
//!    service takes packets from this client (`filter`);
//! 3. choose (`choose`): which of its backends: the current backend of the Maglev slot
//!    `lb_common::maglev_slot` names, unless that slot changed since a live flow began, when the
//!    connection table decides (`conntrack`); later fragments follow their first (`FRAGS`);
//! 4. rewrite: direct server return (`l2`: MACs and VLAN tag only), tunnel (`tunnel`:
//!    IP-in-IP, or the ICMP "too big" answer of `icmp`) or NAT (`nat`: addresses and ports,
//!    which also takes a NAT backend's replies back to the VIP: the branch after the VIP
//!    filter; both NAT steps are global functions, verified once);
//! 5. send (the receiving interface, or a redirect) and count.
//!
//! What each step decides is typed (`verdict`): `Chosen` (service and backend), `Skip` (not
//! ours: passed to the kernel untouched; or refused for a `Reason`: counted, then dropped or
//! passed up), `Egress` (to the backend, or an answer back to the sender).
#![no_std]
#![no_main]

mod access;
mod choose;
mod classify;
mod conntrack;
mod filter;
mod frame;
mod headers;
mod icmp;
mod l2;
mod maps;
mod nat;
mod packet;
mod runtime;
mod trace;
mod tunnel;
mod verdict;

use core::mem::MaybeUninit;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use conntrack::SlotChoice;
use lb_common::{Backend, Reason, Verdict, service_flags, service_reason_index, trace_outcome};
use maps::{BACKEND_STATS, DEVMAP, REASON_STATS, SERVICE_REASON_STATS, SERVICE_STATS};
use packet::Packet;
use verdict::{Chosen, Egress, NotOurs, Placed, Refusal, Skip, Status};

/// The program lbd runs: no trace's check anywhere.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    process::<false>(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

/// The same program with `lbctl trace`'s two checks (`trace`): lbd swaps it into the links
/// only while a trace runs, so a data path that is not traced pays nothing for tracing.
#[xdp]
pub fn lb_xdp_traced(ctx: XdpContext) -> u32 {
    trace::capture(&ctx);
    process::<true>(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

/// The action for a packet; `NotOurs` passes it up untouched. A packet to a VIP's address
/// leaves by one exit, where a trace (`TRACED`) sees its verdict.
#[inline(always)]
fn process<const TRACED: bool>(ctx: &XdpContext) -> Result<u32, NotOurs> {
    // Parse.
    let mut packet = MaybeUninit::<Packet>::uninit();
    if !packet::parse_common(ctx, packet.as_mut_ptr())
        && !packet::parse_into(ctx, packet.as_mut_ptr())
    {
        return Err(NotOurs);
    }
    // SAFETY: parse_common or parse_into returned true, so it wrote the whole Packet.
    let packet = unsafe { packet.assume_init_ref() };
    // Classify (most packets that are no VIP's leave here, before any call; a NAT backend's
    // reply leaves for `nat::reply`).
    if classify::vip_filter(packet).is_err() {
        nat::maybe_reply(packet)?;
        return Ok(nat::reply(ctx, packet));
    }
    let verdict = serve(ctx, packet);
    if TRACED {
        trace::end(verdict);
    }
    Ok(verdict.action())
}

/// The verdict on a packet to a VIP's address: classified, chosen, rewritten, sent and
/// counted. A service packet that is not forwarded is given up (`give_up`) right where a step
/// refuses it, not at one exit for every reason: one such exit multiplied the verifier's work
/// past its limit of 1,000,000 instructions (from 160,000).
#[inline(always)]
fn serve(ctx: &XdpContext, packet: &Packet) -> Verdict {
    // Classify and choose.
    let mut chosen = MaybeUninit::<Chosen>::uninit();
    let mut at = MaybeUninit::<SlotChoice>::uninit();
    let (chosen, table) = match place(packet, &mut chosen, &mut at).decode() {
        Err(skip) => return give_up(skip),
        // SAFETY: place returned Chosen, so it wrote `chosen`.
        Ok(Placed::Chosen) => (unsafe { chosen.assume_init() }, 0),
        // SAFETY: place returned OnChangedSlot, so it wrote `at`.
        Ok(Placed::OnChangedSlot) => {
            let at = unsafe { at.assume_init_mut() };
            match choose::on_changed_slot(packet, at) {
                Ok(chosen) => (chosen, at.table),
                Err(reason) => return give_up(Skip::refused(reason, at.service.id)),
            }
        }
    };
    // Rewrite.
    if chosen.service.flags & service_flags::NAT != 0 {
        return nat::forward(ctx, packet, &chosen, table);
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let egress = if chosen.service.flags & service_flags::TUNNEL != 0 {
        match tunnel::encapsulate(ctx, packet, chosen.backend) {
            Ok(egress) => egress,
            Err(reason) => return give_up(Skip::refused(reason, chosen.service.id)),
        }
    } else if l2::rewrite_dsr(ctx, packet.l3, chosen.backend).is_ok() {
        Egress::ToBackend
    } else {
        // A frame that cannot be rewritten (none that parsed) is passed up uncounted.
        return forwarded(xdp_action::XDP_PASS, &chosen, table)
            .because(trace_outcome::NOT_REWRITTEN);
    };
    // Send and count.
    match egress {
        Egress::ToBackend => match send(ctx, chosen.backend) {
            Ok(action) => {
                count(&chosen, bytes);
                forwarded(action, &chosen, table)
            }
            Err(reason) => give_up(Skip::refused(reason, chosen.service.id)),
        },
        Egress::ReplyToSender => {
            count_reason(Reason::TooBig, Some(chosen.service.id));
            forwarded(xdp_action::XDP_TX, &chosen, table)
                .because(Refusal::of(Reason::TooBig, chosen.service.id).traced())
        }
    }
}

/// The service and backend of a packet: classified, then chosen. The choice is written into
/// the caller's `out` (`Placed::Chosen`), or the packet's changed slot into `at`
/// (`Placed::OnChangedSlot`: the caller has the connection table decide, in a call of its own);
/// `NotOurs` comes back as a status like any refusal. Inlined: as a BPF-to-BPF call of its own
/// (which kept its map keys and hashes off the main frame) it cost 10-15 ns a packet, and the
/// frames fit since the connection table's part moved into `conntrack::on_changed_slot`.
#[inline(always)]
fn place(p: &Packet, out: &mut MaybeUninit<Chosen>, at: &mut MaybeUninit<SlotChoice>) -> Status {
    // A match, not a closure: a closure is only a hint to inline, and with two programs
    // calling `place` LLVM made it a call of its own.
    let class = match classify::classify(p) {
        Ok(class) => class,
        Err(skip) => return Status::encode(Err(skip)),
    };
    let id = class.counted_service();
    match choose::choose(p, class, out, at) {
        Ok(placed) => Status::encode(Ok(placed)),
        Err(skip) => Status::encode(Err(skip.for_service(id))),
    }
}

/// Sends a frame rewritten for `backend` out of the backend's interface: XDP_TX when that is
/// the receiving one, else a redirect through `DEVMAP`; `NoEgress` when the interface is not
/// there (only a frame actually sent counts as forwarded).
#[inline(always)]
fn send(ctx: &XdpContext, backend: &Backend) -> Result<u32, Reason> {
    if backend.ifindex == 0 || backend.ifindex == ctx.ingress_ifindex() as u32 {
        return Ok(xdp_action::XDP_TX);
    }
    DEVMAP
        .redirect(backend.ifindex, 0)
        .map_err(|_| Reason::NoEgress)
}

/// A packet that is not forwarded: one of no service passes untouched; a service packet is
/// counted under its reason (and its service's, when known), then dropped or passed up
/// (`Skip::drops`).
#[inline(always)]
fn give_up(skip: Skip) -> Verdict {
    let outcome = match skip {
        Skip::Refused(refusal) => {
            count_reason(refusal.reason(), refusal.service());
            refusal.traced()
        }
        Skip::NotOurs => trace_outcome::NO_SERVICE,
    };
    let action = if skip.drops() {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    };
    Verdict::refused(action, outcome)
}

/// The verdict on a packet sent (`action`) as `chosen` says.
#[inline(always)]
fn forwarded(action: u32, chosen: &Chosen, table: u32) -> Verdict {
    Verdict::forwarded(action, chosen.service.id, chosen.backend_id, table)
}

/// A refused packet on its reason's counter, and on its service's counter of that reason.
#[inline(always)]
fn count_reason(reason: Reason, service: Option<u32>) {
    if let Some(c) = REASON_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot of this CPU; no other writer while the program runs here.
        unsafe { *c += 1 };
    }
    if let Some(id) = service
        && let Some(c) = SERVICE_REASON_STATS.get_ptr_mut(service_reason_index(id, reason))
    {
        // SAFETY: as above.
        unsafe { *c += 1 };
    }
}

/// A forwarded packet of `bytes` bytes, on its service's and its backend's counters.
#[inline(always)]
fn count(chosen: &Chosen, bytes: u64) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(chosen.service.id) {
        // SAFETY: per-CPU slot of this CPU; no other writer while the program runs here.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(chosen.backend_id) {
        // SAFETY: as above.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}
