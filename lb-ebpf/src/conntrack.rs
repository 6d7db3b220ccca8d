//! The choice on a changed Maglev slot (`lb_common::slotstate`): only there does a packet read
//! the slot's side half and its flow's set of the connection table (`CONNTRACK`), and write a
//! record. A packet on an unchanged slot never comes here (`choose::for_flow`).

use lb_common::{
    Config, NEW_FLOW_BURST_NS, NO_BACKEND, NewFlow, PROTO_UDP, Reason, RecordSet, ServiceValue,
    hash, maglev_slot,
    slotstate::{self, DEFER, FlowAt, Hot, Kind, RECORDED, Write, record_flags},
    sync_event_flags, trace_table,
};

use crate::{
    choose::{Usable, hot_lane, side_lane},
    classify,
    maps::{CONFIG, CONNTRACK, NEW_FLOW_BUCKET, NEW_FLOW_STATS, SYNC_EVENTS},
    packet::Packet,
};

/// A packet's flow in the connection table: its hash, its set, the table's clock.
struct Flow {
    hash: u64,
    set: &'static mut RecordSet,
    now: u32,
    /// `record_flags::UDP` for a UDP flow.
    udp: u32,
    kind: Kind,
}

/// A packet's place in its service's Maglev table, and the choice made there.
pub struct SlotChoice {
    pub service: ServiceValue,
    pub slot: u32,
    pub hot: Hot,
    /// The chosen backend (`NO_BACKEND` until chosen).
    pub backend: u32,
    /// What the connection table did, for `lbctl trace` (`lb_common::trace_table`).
    pub table: u32,
}

/// The service and backend of a packet of `service` whose `slot` is changed (`hot`): its record
/// if it has a usable one, else the slot's `old` backend for a flow older than the change, else
/// the current one (`slotstate::decide`); recorded or touched as `decide` says. A slot deferring
/// to the VIP's every-port service (`DEFER`) decides an unrecorded flow by that service instead.
/// A function of its own (a BPF-to-BPF call): the packet path of unchanged slots stays small.
/// `at` is the packet's service, slot and hot half on the way in; the chosen service and
/// backend on the way out (five arguments at most cross a BPF-to-BPF call). Called from the
/// main program, not from `place`: three frames deep at most (main, this, `decide_and_write`).
#[inline(never)]
pub fn on_changed_slot(p: &Packet, at: &mut SlotChoice) -> Result<(), Reason> {
    let config = CONFIG.get(0).ok_or(Reason::MissingState)?;
    let hash = flow_hash(p, &config.hash_key);
    let set = CONNTRACK
        .get_ptr_mut(hash as u32 & config.flow_set_mask)
        .ok_or(Reason::MissingState)?;
    let mut flow = Flow {
        hash,
        // SAFETY: a pointer returned by a map lookup is valid for this program run; other CPUs
        // may write the set meanwhile, which `Record::belongs_to` tolerates.
        set: unsafe { &mut *set },
        now: clock(),
        udp: if p.proto == PROTO_UDP {
            record_flags::UDP
        } else {
            0
        },
        kind: kind_of(p),
    };
    let mut wrote = decide_and_write(&mut flow, at);
    if at.backend == DEFER {
        // An unrecorded flow of a port that had no service of its own when it began: its VIP's
        // every-port service's, placed and recorded by that service (its slot taken as changed,
        // so the flow gets a record and the record keeps the deferring slots as they are).
        wrote = if every_port_slot(p, at).is_err() {
            record_current(&mut flow, at)
        } else {
            decide_and_write(&mut flow, at)
        };
    }
    // Only confirmed records travel: a flood's tentative ones stay on this node.
    if wrote & RECORDED != 0 && wrote & record_flags::TENTATIVE == 0 {
        report(p, at, wrote);
    }
    Ok(())
}

/// The packet's flow hash (`hash::flow_hash`). A call of its own: the flow key and the hash's
/// state stay off `on_changed_slot`'s frame, which the calls it makes next add to.
#[inline(never)]
fn flow_hash(p: &Packet, key: &[u64; 2]) -> u64 {
    hash::flow_hash(key, &p.flow_key())
}

/// Tells lbd (`SYNC_EVENTS`) that the flow of `p` was recorded on `at`'s service and backend,
/// for other nodes (`lb_common::SyncEvent`), when lbd asked for it (`Config::sync_events`).
/// `written` is what `RecordSet::apply` returned. A full ring loses the event: the flow then has a
/// record on this node only. A call of its own: the rare path keeps its frame apart.
#[inline(never)]
fn report(p: &Packet, at: &SlotChoice, written: u32) {
    if CONFIG.get(0).is_none_or(|c| c.sync_events == 0) {
        return;
    }
    let Some(mut entry) = SYNC_EVENTS.reserve(0) else {
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` is the reserved entry, valid and writable until submitted. Written field by
    // field, not from a `SyncEvent` built first: a copy on this frame took the three frames
    // (main, `on_changed_slot`, this) past the verifier's 512 bytes.
    unsafe {
        (*e).flow.src = p.src;
        (*e).flow.dst = p.dst;
        (*e).flow.sport = p.sport;
        (*e).flow.dport = p.dport;
        (*e).flow.proto = p.proto;
        (*e).flow.family = p.family;
        (*e).flow._pad = [0; 2];
        (*e).service = at.service.id;
        (*e).backend = at.backend;
        (*e).flags = if written & record_flags::CLOSING != 0 {
            sync_event_flags::CLOSING
        } else {
            0
        };
        (*e)._pad = 0;
    }
    entry.submit(0);
}

/// Makes `at` the packet's slot in its VIP's every-port service, taken as changed (so its flow
/// is looked up and recorded there); `Err` when the VIP has no every-port service (any more).
/// A call of its own: its frame (a flow key, a slot hash) is not added to the caller's.
#[inline(never)]
fn every_port_slot(p: &Packet, at: &mut SlotChoice) -> Result<(), ()> {
    let config = CONFIG.get(0).ok_or(())?;
    let every_port = classify::every_port_service(p).ok_or(())?;
    let slot = maglev_slot(&config.hash_key, &every_port, &p.flow_key())
        .ok_or(())?
        .index;
    let hot = hot_lane(&every_port, slot).map_err(|_| ())?;
    *at = SlotChoice {
        service: every_port,
        slot,
        hot: Hot::new(hot.current(), true),
        backend: NO_BACKEND,
        table: at.table,
    };
    Ok(())
}

/// `decide` for the flow on `at`'s slot (its service, slot and hot half), and its write; the
/// backend into `at`. What `RecordSet::apply` returns. A call of its own: made twice (the
/// slot's service, the every-port one), its frame is not added to the caller's.
#[inline(never)]
fn decide_and_write(flow: &mut Flow, at: &mut SlotChoice) -> u32 {
    let service = &at.service;
    let slot = at.slot;
    let Some(config) = CONFIG.get(0) else {
        return 0;
    };
    let (found, way) = place(flow, service.id, slot, config);
    let recorded = match way {
        Some(w) if found => Some(flow.set.ways[w % lb_common::FLOW_WAYS].backend()),
        _ => None,
    };
    let d = slotstate::decide(
        at.hot,
        || side_lane(service, slot),
        flow.kind,
        || recorded,
        || room(way.is_some(), config.new_flow_interval_ns) == NewFlow::Recorded,
        &Usable(service),
    );
    at.backend = d.backend;
    // Arithmetic, not branches (see `lb_common::Verdict`): HIT is MISS - 1.
    at.table = trace_table::MISS - found as u32;
    match way {
        Some(way) => flow.write(d.write, way, found, service.id, slot),
        None => 0,
    }
}

/// The current backend of a deferring slot whose VIP has no every-port service any more,
/// recorded like a new flow's when there is room. What `RecordSet::apply` returns. A call of
/// its own (a rare path): its frame is not added to `on_changed_slot`'s.
#[inline(never)]
fn record_current(flow: &mut Flow, at: &mut SlotChoice) -> u32 {
    let backend = at.hot.current();
    at.backend = backend;
    if backend == NO_BACKEND || flow.kind == Kind::IcmpError {
        return 0;
    }
    let Some(config) = CONFIG.get(0) else {
        return 0;
    };
    let (found, way) = place(flow, at.service.id, at.slot, config);
    let way = match way {
        Some(way) if found || room(true, config.new_flow_interval_ns) == NewFlow::Recorded => way,
        _ => return 0,
    };
    let closing = flow.kind == Kind::TcpClosing;
    flow.write(
        Write::Record { backend, closing },
        way,
        found,
        at.service.id,
        at.slot,
    )
}

/// `RecordSet::place` for `flow` on `service`'s `slot`: whether the flow has a record, and the
/// way to write: its record's, else the way a new record may take (`None`: no room). One
/// index, not two: each distinct pair multiplied the verifier's paths after it.
#[inline(always)]
fn place(flow: &Flow, service: u32, slot: u32, config: &Config) -> (bool, Option<usize>) {
    let (found, way) = flow
        .set
        .place(flow.hash, service, slot, flow.now, &config.eviction);
    (found.is_some(), way)
}

/// Whether a flow without a record may have one now: `way` (its set has a way it may take)
/// and this CPU's new-flow budget allows it (`Config::new_flow_interval_ns`). Counted in
/// `NEW_FLOW_STATS` either way. `NewFlow::Recorded` when it may.
#[inline(always)]
fn room(way: bool, interval_ns: u32) -> NewFlow {
    let outcome = if !way {
        NewFlow::NoRoom
    } else if !within_limit(interval_ns) {
        NewFlow::OverLimit
    } else {
        NewFlow::Recorded
    };
    if let Some(c) = NEW_FLOW_STATS.get_ptr_mut(outcome as u32) {
        // SAFETY: per-CPU slot of this CPU; no other writer while the program runs here.
        unsafe { *c += 1 };
    }
    outcome
}

/// Takes a token of this CPU's new-flow budget: one per `interval_ns` (0: no limit), with a
/// burst of `NEW_FLOW_BURST_NS` worth.
#[inline(always)]
fn within_limit(interval_ns: u32) -> bool {
    if interval_ns == 0 {
        return true;
    }
    let Some(bucket) = NEW_FLOW_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    let interval = interval_ns as u64;
    // SAFETY: a helper without arguments.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    // SAFETY: per-CPU slot of this CPU; no other writer while the program runs here.
    unsafe { (*bucket).take(now, interval, NEW_FLOW_BURST_NS.saturating_sub(interval)) }
}

/// What the packet is, for `decide`.
#[inline(always)]
fn kind_of(p: &Packet) -> Kind {
    if p.icmp_error {
        Kind::IcmpError
    } else if p.proto == PROTO_UDP {
        Kind::Udp
    } else if p.syn {
        Kind::Syn
    } else if p.closing {
        Kind::TcpClosing
    } else {
        Kind::Tcp
    }
}

impl Flow {
    /// Carries out `write` on way `way` (the flow's own record when `found`, else the set's
    /// victim): `RecordSet::apply`.
    #[inline(always)]
    fn write(&mut self, write: Write, way: usize, found: bool, service: u32, slot: u32) -> u32 {
        let at = FlowAt {
            hash: self.hash,
            service,
            slot,
            now: self.now,
            udp: self.udp,
            syn: self.kind == Kind::Syn,
        };
        self.set.apply(write, way, found, &at)
    }
}

/// The connection table's clock: jiffies / 64 (64 ms at HZ=1000, 256 ms at HZ=250), never 0
/// (0 marks a free entry). Coarse on purpose: an established flow then rewrites its entry's
/// stamp a few times a second, not on every packet. bpf_jiffies64 is inlined by the verifier
/// into a load of `jiffies`.
#[inline(always)]
fn clock() -> u32 {
    // SAFETY: a helper without arguments.
    let jiffies = unsafe { aya_ebpf::helpers::bpf_jiffies64() };
    (jiffies >> 6) as u32 | 1
}
