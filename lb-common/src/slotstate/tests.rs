//! The guarantees of docs/design/slot-state.md on simulated tables: a connection table of
//! `RecordSet`s, flows placed by lb-common's own hashes and Maglev tables, lbd's scans.

use std::collections::HashSet;

use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

use super::*;
use crate::{
    FlowKey, ServiceValue, hash,
    maglev::{MaglevBackend, build_table},
    maglev_slot,
};

const SEED: [u64; 2] = [0x5107_57a7_e000_0001, 0x0123_4567_89ab_cdef];
const SVC: u32 = 3;
const SIZE: u32 = 1009;
/// Table clock ticks per second (jiffies / 64 at HZ=1000).
const HZ: u32 = 16;
const LIMITS: Limits = Limits {
    udp_idle: 30 * HZ,
    close_grace: 10 * HZ,
    udp_adopt: 60,
    idle_hold: 3 * 3600,
};
/// Ticks a confirmed record is unseen before it may make room (the idle hold).
const STALE: u32 = 3 * 3600 * HZ;

#[derive(Clone, Copy)]
struct B {
    valid: bool,
    down: bool,
    weight: u32,
}

impl B {
    fn up(weight: u32) -> B {
        B {
            valid: true,
            down: false,
            weight,
        }
    }
}

struct Pool(Vec<B>);

impl Backends for Pool {
    fn usable(&self, id: u32) -> bool {
        self.0.get(id as usize).is_some_and(|b| b.valid && !b.down)
    }
}

struct Sim {
    service: ServiceValue,
    pool: Pool,
    slots: SlotTable,
    sets: Vec<RecordSet>,
    limits: Limits,
    secs: u64,
    tick: u32,
    packets: u64,
    on_changed: u64,
    lookups: u64,
    /// Packets on unchanged slots that read or wrote the connection table (must stay 0).
    touched_unchanged: u64,
    records: u64,
    /// New flows that were not recorded (no way to take, or over the budget).
    unrecorded: u64,
    /// How many more new records the rate limit allows (`u64::MAX`: no limit).
    new_flow_budget: u64,
}

impl Sim {
    fn new(weights: &[u32], sets: usize) -> Sim {
        let pool = Pool(weights.iter().map(|&w| B::up(w)).collect());
        let mut sim = Sim {
            service: ServiceValue {
                id: SVC,
                flags: 0,
                table_size: SIZE,
                _pad: 0,
            },
            pool,
            slots: SlotTable::fresh(&[]),
            sets: vec![RecordSet::default(); sets],
            limits: LIMITS,
            secs: 1_000,
            tick: 12_345,
            packets: 0,
            on_changed: 0,
            lookups: 0,
            touched_unchanged: 0,
            records: 0,
            unrecorded: 0,
            new_flow_budget: u64::MAX,
        };
        sim.slots = SlotTable::fresh(&sim.maglev());
        sim
    }

    /// lbd's Maglev table for the pool: backends filled in, up, of non-zero weight.
    fn maglev(&self) -> Vec<u32> {
        let live: Vec<MaglevBackend> = (0..self.pool.0.len() as u32)
            .filter(|&i| self.pool.usable(i))
            .map(|i| MaglevBackend {
                id: i,
                addr: [(0xc000_0200u32 + i).to_be(), 0, 0, 0],
                salt: 0,
                weight: self.pool.0[i as usize].weight,
            })
            .collect();
        build_table(&SEED, &live, SIZE)
    }

    /// lbd applies a change of the pool: the new table, changed slots marked.
    fn change(&mut self) {
        self.slots = self.slots.rebuilt(&self.maglev(), self.secs);
    }

    /// lbd's periodic scan: pins from the mapped table, then clearing.
    fn scan(&mut self) {
        let pinned = pins(
            &self.sets,
            SVC,
            &self.slots,
            self.now(),
            &self.limits,
            &self.pool,
        );
        self.slots
            .clear(&pinned, self.secs, &self.limits, &self.pool);
    }

    fn pass(&mut self, secs: u64) {
        self.secs += secs;
        self.tick = self.tick.wrapping_add((secs as u32).wrapping_mul(HZ));
    }

    fn now(&self) -> u32 {
        self.tick | 1
    }

    fn slot(&self, f: &FlowKey) -> u32 {
        maglev_slot(&SEED, &self.service, f).unwrap().index
    }

    /// The program's choice for a packet of `f`, with its writes into the table.
    fn send(&mut self, f: &FlowKey, kind: Kind) -> u32 {
        let slot = self.slot(f);
        let h = hash::flow_hash(&SEED, f);
        let set = (h as usize) & (self.sets.len() - 1);
        let now = self.now();
        let hot = self.slots.hot[slot as usize];
        let side = self.slots.side[slot as usize];
        self.packets += 1;
        self.on_changed += hot.changed() as u64;
        let looked = self.lookups;
        let eviction = self.eviction();
        let (found, victim) = self.sets[set].place(h, SVC, slot, now, &eviction);
        let recorded = found.map(|w| self.sets[set].ways[w].backend());
        let lookups = &mut self.lookups;
        let (unrecorded, limit) = (&mut self.unrecorded, &mut self.new_flow_budget);
        let d = decide(
            hot,
            || side,
            kind,
            || {
                *lookups += 1;
                recorded
            },
            || {
                let room = victim.is_some() && *limit > 0;
                *limit = limit.saturating_sub(1);
                *unrecorded += !room as u64;
                room
            },
            &self.pool,
        );
        if !hot.changed() && (self.lookups != looked || d.write != Write::Nothing) {
            self.touched_unchanged += 1;
        }
        let flow = FlowAt {
            hash: h,
            service: SVC,
            slot,
            now,
            udp: if f.proto == crate::PROTO_UDP {
                record_flags::UDP
            } else {
                0
            },
            syn: kind == Kind::Syn,
        };
        if let Write::Record { .. } = d.write {
            self.records += 1;
        }
        let way = found.or(victim);
        if d.write != Write::Nothing {
            let way = way.expect("a write has a way");
            self.sets[set].apply(d.write, way, found.is_some(), &flow);
        }
        d.backend
    }

    fn eviction(&self) -> Eviction {
        Eviction::new(self.limits.udp_idle, self.limits.close_grace, STALE, HZ)
    }

    /// The record of `f`, if it has one.
    fn record(&self, f: &FlowKey) -> Option<Record> {
        let h = hash::flow_hash(&SEED, f);
        let set = &self.sets[(h as usize) & (self.sets.len() - 1)];
        set.find(h, SVC, self.slot(f)).copied()
    }

    fn current(&self, f: &FlowKey) -> u32 {
        self.slots.hot[self.slot(f) as usize].current()
    }

    fn used(&self) -> usize {
        self.sets
            .iter()
            .flat_map(|s| s.ways.iter())
            .filter(|r| r.seen != 0)
            .count()
    }
}

fn flow(rng: &mut StdRng, proto: u8) -> FlowKey {
    FlowKey {
        src: [rng.random::<u32>(), 0, 0, 0],
        dst: [u32::from_be(0xcb00_710a), 0, 0, 0],
        sport: rng.random(),
        dport: 80u16.to_be(),
        proto,
        family: 4,
        _pad: [0; 2],
    }
}

fn tcp_flows(sim: &mut Sim, rng: &mut StdRng, n: usize) -> Vec<(FlowKey, u32)> {
    (0..n)
        .map(|_| {
            let f = flow(rng, crate::PROTO_TCP);
            let current = sim.current(&f);
            let b = sim.send(&f, Kind::Syn);
            assert_eq!(b, current, "a SYN takes the current choice");
            (f, b)
        })
        .collect()
}

/// A simulation seeded `seed` with three backends of equal weight, a table of `sets` sets and
/// `n` connections begun with a SYN (and where each went).
fn established(seed: u64, sets: usize, n: usize) -> (StdRng, Sim, Vec<(FlowKey, u32)>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sim = Sim::new(&[100, 100, 100], sets);
    let flows = tcp_flows(&mut sim, &mut rng, n);
    (rng, sim, flows)
}

#[test]
fn the_halves_and_the_record_have_the_layout_the_maps_need() {
    assert_eq!(core::mem::size_of::<Hot>(), 2);
    assert_eq!(core::mem::size_of::<Side>(), 2);
    assert_eq!(core::mem::size_of::<Record>(), 16);
    assert_eq!(core::mem::size_of::<RecordSet>(), 64);
    // Every backend id and "none" fit in 15 bits.
    assert!(crate::MAX_BACKENDS < SLOT_NONE as u32);
    for id in [0, 1, crate::MAX_BACKENDS - 1, NO_BACKEND] {
        for c in [false, true] {
            assert_eq!(Hot::new(id, c).current(), id);
            assert_eq!(Hot::new(id, c).changed(), c);
            assert_eq!(Side::new(id, c).old(), id);
            assert_eq!(Side::new(id, c).adopt_udp(), c);
        }
    }
    // The words: hot half, then side half; each slot reads back from its lane.
    let mut rng = StdRng::seed_from_u64(1);
    let n = 13usize;
    let t = SlotTable {
        hot: (0..n).map(|_| Hot(rng.random())).collect(),
        side: (0..n).map(|_| Side(rng.random())).collect(),
        changed_at: vec![0; n],
        quiet: vec![0; n],
    };
    let words = t.words();
    let half = half_words(n as u32);
    assert_eq!(words.len(), 2 * half as usize);
    for s in 0..n as u32 {
        assert_eq!(lane(words[(s / 4) as usize], s), t.hot[s as usize].0);
        assert_eq!(
            lane(words[(half + s / 4) as usize], s),
            t.side[s as usize].0
        );
    }
    // The last word's missing lanes: no backend, unchanged.
    assert_eq!(Hot(lane(words[3], 13)), Hot::new(NO_BACKEND, false));
}

#[test]
fn a_record_belongs_to_its_flow_service_and_slot_only() {
    let h = 0x1234_5678_9abc_def0u64;
    let r = Record::new(h, 7, SVC, 99, record_flags::UDP, 5);
    assert!(r.belongs_to(h, SVC, 99));
    assert_eq!(
        (r.backend(), r.service(), r.flags()),
        (7, SVC, record_flags::UDP)
    );
    assert!(!r.belongs_to(h ^ 1 << 40, SVC, 99), "another flow");
    assert!(
        !r.belongs_to(h ^ 1 << 25, SVC, 99),
        "another flow, same high half"
    );
    assert_eq!(r.slot(), 99);
    assert!(!r.belongs_to(h, SVC + 1, 99), "another service");
    assert!(!r.belongs_to(h, SVC, 98), "another slot");
    assert!(!Record::default().belongs_to(0, 0, 0), "a free entry");
    let other = Record::new(0x0fed_cba9_8765_4321, 9, SVC, 99, 0, 5);
    let torn = Record {
        ids: other.ids,
        ..r
    };
    assert!(!torn.belongs_to(h, SVC, 99));
    assert!(!torn.belongs_to(0x0fed_cba9_8765_4321, SVC, 99));
}

#[test]
fn rebuilding_marks_the_slots_that_changed_and_keeps_the_first_old_backend() {
    let a = vec![0, 0, 1, 1, 2, 2];
    let t0 = SlotTable::fresh(&a);
    assert_eq!(t0.changed(), 0);
    let t1 = t0.rebuilt(&[0, 3, 1, 1, 2, 3], 50);
    assert_eq!(t1.changed(), 2);
    assert_eq!(t1.hot[1], Hot::new(3, true));
    assert_eq!(t1.side[1], Side::new(0, true));
    assert_eq!(t1.changed_at[1], 50);
    assert!(!t1.hot[0].changed() && t1.side[0] == Side::NONE);
    // A second change: slot 1 moves on (its unrecorded flows are still backend 0's, since
    // the first change), slot 2 changes for the first time.
    let t2 = t1.rebuilt(&[0, 4, 4, 1, 2, 3], 80);
    assert_eq!(
        (t2.hot[1], t2.side[1], t2.changed_at[1]),
        (Hot::new(4, true), Side::new(0, true), 50)
    );
    assert_eq!(
        (t2.hot[2], t2.side[2], t2.changed_at[2]),
        (Hot::new(4, true), Side::new(1, true), 80)
    );
    // Back to what it was: still changed (flows recorded meanwhile may need their backend).
    let t3 = t2.rebuilt(&a, 90);
    assert!(t3.hot[1].changed() && t3.hot[1].current() == 0);
}

#[test]
fn the_array_reads_back_as_the_state_it_was_written_from() {
    // What a restarted lbd adopts: both halves as written, every changed slot's hold started
    // again at the adoption.
    let t = SlotTable::fresh(&[0, 0, 1, 1, 2, 2, 0])
        .rebuilt(&[0, 3, 1, NO_BACKEND, 2, 3, 0], 50)
        .rebuilt(&[0, 3, 3, NO_BACKEND, 2, 3, 0], 60);
    let back = SlotTable::from_words(&t.words(), 7, 500).unwrap();
    assert_eq!((&back.hot, &back.side), (&t.hot, &t.side));
    for s in 0..7 {
        let expected = if t.hot[s].changed() { 500 } else { 0 };
        assert_eq!(back.changed_at[s], expected, "slot {s}");
    }
    assert_eq!(back.current(), vec![0, 3, 3, NO_BACKEND, 2, 3, 0]);
    // An array of another size is not this table's.
    assert_eq!(SlotTable::from_words(&t.words(), 9, 500), None);
}

#[test]
fn a_new_port_service_defers_its_unrecorded_flows_to_the_every_port_one_for_the_hold() {
    let pool = Pool(vec![B::up(100), B::up(100)]);
    let mut t = SlotTable::deferring(&[0, 1, 0], 100);
    assert_eq!(t.changed(), 3);
    let side = t.side[0];
    let found = |b: Option<u32>| move || b;
    // A connection in progress (no record here, no SYN): decided again by the every-port
    // service; a new one takes the new service's backend and is recorded.
    for kind in [Kind::Tcp, Kind::TcpClosing, Kind::IcmpError, Kind::Udp] {
        let d = decide(t.hot[0], || side, kind, found(None), || true, &pool);
        assert_eq!(
            d,
            Decision {
                backend: DEFER,
                write: Write::Nothing
            },
            "{kind:?}"
        );
    }
    let d = decide(t.hot[0], || side, Kind::Syn, found(None), || true, &pool);
    assert_eq!(d.backend, 0);
    assert_eq!(
        d.write,
        Write::Record {
            backend: 0,
            closing: false
        }
    );
    // A flow recorded under the new service follows its record.
    assert_eq!(
        decide(t.hot[1], || side, Kind::Tcp, found(Some(1)), || true, &pool).backend,
        1
    );
    // A later fragment without its first has no flow to defer: the current backend.
    assert_eq!(later_fragment(t.hot[2], || side, false, &pool), 0);
    // Unpinned, the slots keep deferring until the hold has passed; UDP flows only while the
    // slot adopts them.
    let none = vec![false; 3];
    t.clear(&none, 100 + LIMITS.udp_adopt, &LIMITS, &pool);
    t.clear(&none, 100 + LIMITS.udp_adopt, &LIMITS, &pool);
    assert_eq!(t.changed(), 3);
    assert!(!t.side[0].adopt_udp());
    let d = decide(
        t.hot[0],
        || t.side[0],
        Kind::Udp,
        found(None),
        || true,
        &pool,
    );
    assert_eq!(
        d.backend, 0,
        "a UDP flow after the window takes the new service's backend"
    );
    let later = 100 + LIMITS.idle_hold;
    t.clear(&[true, false, false], later, &LIMITS, &pool);
    t.clear(&[true, false, false], later, &LIMITS, &pool);
    assert_eq!(t.changed(), 1, "only the pinned slot is left");
    assert!(t.hot[0].changed() && t.side[0].old() == DEFER);
}

#[test]
fn an_unchanged_slot_never_touches_the_connection_table() {
    let mut rng = StdRng::seed_from_u64(2);
    let mut sim = Sim::new(&[100, 100, 100], 1 << 12);
    let table = sim.maglev();
    for i in 0..20_000 {
        let proto = if i % 2 == 0 {
            crate::PROTO_TCP
        } else {
            crate::PROTO_UDP
        };
        let f = flow(&mut rng, proto);
        let kinds: &[Kind] = if proto == crate::PROTO_TCP {
            &[Kind::Syn, Kind::Tcp, Kind::TcpClosing, Kind::IcmpError]
        } else {
            &[Kind::Udp, Kind::IcmpError]
        };
        let kind = kinds[rng.random_range(0..kinds.len())];
        assert_eq!(sim.send(&f, kind), table[sim.slot(&f) as usize]);
    }
    assert_eq!((sim.lookups, sim.records, sim.used()), (0, 0, 0));
    assert_eq!(sim.touched_unchanged, 0);
}

/// The guarantee: a connection keeps its backend when backends are added, weights change or
/// one is drained (here all three, with flows idle across some of them and lbd scanning in
/// between); SYNs take the current choice; only packets on changed slots look anything up.
#[test]
fn connections_keep_their_backend_through_adds_weight_changes_and_drains() {
    let mut rng = StdRng::seed_from_u64(3);
    let mut sim = Sim::new(&[100, 100, 100], 1 << 14);
    let mut flows = tcp_flows(&mut sim, &mut rng, 4_000);
    let steps: [&dyn Fn(&mut Pool); 4] = [
        &|p| p.0.push(B::up(100)),
        &|p| p.0[0].weight = 300,
        &|p| p.0[1].weight = 0,
        &|p| p.0[2].weight = 50,
    ];
    for step in steps {
        step(&mut sim.pool);
        sim.change();
        assert!(sim.slots.changed() > 0);
        for _ in 0..3 {
            for (f, b) in &flows {
                // Some flows stay idle across the change.
                if rng.random_bool(0.6) {
                    assert_eq!(
                        sim.send(f, Kind::Tcp),
                        *b,
                        "an established connection moved"
                    );
                }
            }
            sim.pass(20);
            sim.scan();
        }
        flows.extend(tcp_flows(&mut sim, &mut rng, 1_000));
    }
    for (f, b) in &flows {
        assert_eq!(
            sim.send(f, Kind::Tcp),
            *b,
            "an established connection moved"
        );
    }
    assert_eq!(sim.touched_unchanged, 0, "the table only for changed slots");
    assert!(sim.lookups <= sim.on_changed);
    eprintln!(
        "{} packets, {} on changed slots ({:.1}%), {} records, {} changed slots of {SIZE}",
        sim.packets,
        sim.on_changed,
        100.0 * sim.on_changed as f64 / sim.packets as f64,
        sim.used(),
        sim.slots.changed()
    );
}

#[test]
fn two_changes_in_a_row_keep_the_flows_of_both_and_a_change_undone_keeps_the_middle_ones() {
    let (mut rng, mut sim, before) = established(4, 1 << 14, 3_000);
    sim.pool.0[0].weight = 300;
    sim.change();
    // Flows begun between the changes; the older ones stay idle.
    let between = tcp_flows(&mut sim, &mut rng, 3_000);
    sim.pool.0[0].weight = 100;
    sim.change();
    // The table is the first one again, but flows recorded on backend 0 in between are not its
    // slots' current backend: their slots stay changed, however much time passes.
    assert_eq!(
        sim.maglev(),
        sim.slots
            .hot
            .iter()
            .map(|h| h.current())
            .collect::<Vec<_>>()
    );
    sim.limits.idle_hold = 0;
    sim.pass(100_000);
    sim.scan();
    let moved_between = between.iter().filter(|(f, b)| sim.current(f) != *b).count();
    assert!(moved_between > 0 && sim.slots.changed() >= 1);
    for (f, b) in before.iter().chain(&between) {
        assert_eq!(sim.send(f, Kind::Tcp), *b);
    }
    // A third change; everything still holds.
    sim.pool.0[1].weight = 0;
    sim.change();
    for (f, b) in before.iter().chain(&between) {
        assert_eq!(sim.send(f, Kind::Tcp), *b);
    }
}

#[test]
fn a_drain_during_a_long_download_keeps_it_until_it_ends_then_the_slot_clears() {
    let mut rng = StdRng::seed_from_u64(5);
    let mut sim = Sim::new(&[100, 100, 100], 1 << 10);
    let (f, b) = tcp_flows(&mut sim, &mut rng, 1)[0];
    let slot = sim.slot(&f) as usize;
    sim.pool.0[b as usize].weight = 0;
    sim.change();
    assert!(sim.slots.hot[slot].changed());
    sim.limits.idle_hold = 600;
    // Two days of download, a packet a minute, lbd scanning every minute: long past the hold.
    for _ in 0..2 * 24 * 60 {
        assert_eq!(sim.send(&f, Kind::Tcp), b);
        sim.pass(60);
        sim.scan();
        assert!(
            sim.slots.hot[slot].changed(),
            "the download's record keeps its slot changed"
        );
    }
    // New connections of the same client go to the current backend.
    let g = FlowKey {
        sport: f.sport ^ 1,
        ..f
    };
    assert_ne!(sim.send(&g, Kind::Syn), b);
    // The download ends (client FIN, its last ACK); after the grace the slot clears...
    assert_eq!(sim.send(&f, Kind::TcpClosing), b);
    assert_eq!(sim.send(&f, Kind::Tcp), b);
    sim.pass(60);
    sim.scan();
    assert!(
        sim.slots.hot[slot].changed(),
        "one quiet scan is not enough"
    );
    sim.scan();
    assert_eq!(
        sim.slots.changed(),
        0,
        "no live record, hold passed: cleared"
    );
    // ...and the new connection needs no record to stay where it is.
    assert_eq!(sim.send(&g, Kind::Tcp), sim.current(&g));
    let looked = sim.lookups;
    assert_eq!(sim.send(&g, Kind::Tcp), sim.current(&g));
    assert_eq!(sim.lookups, looked);
}

#[test]
fn an_idle_flow_keeps_its_backend_within_the_hold_and_a_recorded_one_past_the_clocks_wrap() {
    let (_, mut sim, flows) = established(6, 1 << 12, 2_000);
    sim.pool.0.push(B::up(100));
    sim.change();
    let moved: Vec<_> = flows
        .iter()
        .filter(|(f, b)| sim.current(f) != *b)
        .copied()
        .collect();
    assert!(moved.len() > 100);
    let (woken, asleep) = moved.split_at(moved.len() / 2);
    // Idle for most of the hold, lbd scanning: nothing records them, the hold keeps them.
    for _ in 0..10 {
        sim.pass(LIMITS.idle_hold / 11);
        sim.scan();
    }
    // They wake: a request, and the ACK of its answer. The first packet records each flow
    // tentatively (a spoofed flood's packets look the same); the second confirms it.
    for (f, b) in woken {
        assert_eq!(sim.send(f, Kind::Tcp), *b, "idle within the hold");
        assert!(sim.record(f).unwrap().tentative());
        assert_eq!(sim.send(f, Kind::Tcp), *b);
        assert!(!sim.record(f).unwrap().tentative());
    }
    // Now recorded: idle longer than the table clock's wrap (2^32 ticks), they keep it.
    let wrap_secs = (1u64 << 32) / HZ as u64;
    for _ in 0..3 {
        sim.pass(wrap_secs / 2 + 12_345);
        sim.scan();
    }
    for (f, b) in woken {
        assert_eq!(
            sim.send(f, Kind::Tcp),
            *b,
            "a recorded flow idle past the wrap"
        );
    }
    // The flows that never sent since the change are past the hold: they follow the table (the
    // price of keeping no state for unchanged slots; the design document says so).
    // (A flow whose slot a woken flow's record still pins keeps its backend.)
    let mut gone = 0;
    for (f, b) in asleep {
        let pinned = sim.slots.hot[sim.slot(f) as usize].changed();
        let to = sim.send(f, Kind::Tcp);
        assert_eq!(to, if pinned { *b } else { sim.current(f) });
        gone += (to != *b) as usize;
    }
    assert!(gone > 0);
}

#[test]
fn liveness_reads_ages_across_the_clocks_wrap() {
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..100_000 {
        let now: u32 = rng.random::<u32>() | 1;
        let limit = rng.random_range(1..1 << 20);
        let limits = Limits {
            udp_idle: limit,
            close_grace: limit,
            ..LIMITS
        };
        let age = rng.random_range(0..limit);
        let seen = now.wrapping_sub(age) | 1;
        for flags in [record_flags::UDP, record_flags::CLOSING, 0] {
            let r = Record::new(rng.random(), 1, SVC, 5, flags, seen);
            assert!(r.live(now, &limits), "seen {age} ticks ago, limit {limit}");
            // TCP: alive whatever its age.
            let old = Record {
                seen: now.wrapping_add(rng.random_range(1..u32::MAX)) | 1,
                ..r
            };
            if flags == 0 {
                assert!(old.live(now, &limits));
            }
        }
    }
    // The victim of a full set is the least recently seen, across the wrap.
    let mut set = RecordSet::default();
    for (i, seen) in [100u32, u32::MAX - 5, 3, 90].into_iter().enumerate() {
        set.ways[i] = Record::new((i as u64 + 1) << 40, 1, SVC, 5, 0, seen);
    }
    let eviction = Eviction::new(10, 10, 1 << 30, 2);
    // Confirmed TCP records that are alive: none makes room, however long idle...
    assert_eq!(set.place(99 << 40, SVC, 5, 101, &eviction), (None, None));
    // ...but past `stale` they do, the least recently seen first, across the wrap.
    let stale = Eviction::new(10, 10, 90, 2);
    assert_eq!(set.place(99 << 40, SVC, 5, 101, &stale), (None, Some(1)));
}

#[test]
fn flows_of_a_down_or_removed_backend_are_rehashed_and_stay_rehashed() {
    let (mut rng, mut sim, flows) = established(8, 1 << 14, 3_000);
    // Backend 0 fails its checks: flagged down, table rebuilt without it.
    sim.pool.0[0].down = true;
    sim.change();
    let mut rehashed = vec![];
    for (f, b) in &flows {
        let to = sim.send(f, Kind::Tcp);
        if *b == 0 {
            assert_eq!(to, sim.current(f));
            assert_ne!(to, 0);
            rehashed.push((*f, to));
        } else {
            assert_eq!(to, *b, "the other flows stay");
        }
    }
    assert!(!rehashed.is_empty());
    // Back up and back in the table: the rehashed flows stay where they were re-recorded.
    sim.pool.0[0].down = false;
    sim.change();
    sim.pass(LIMITS.idle_hold + 1);
    sim.scan();
    for (f, b) in &rehashed {
        assert_eq!(sim.send(f, Kind::Tcp), *b);
    }
    // Removed (entry cleared): its flows are rehashed, recorded or not.
    let flows = tcp_flows(&mut sim, &mut rng, 2_000);
    sim.pool.0[1].valid = false;
    sim.change();
    for (f, b) in &flows {
        let to = sim.send(f, Kind::Tcp);
        assert_eq!(to, if *b == 1 { sim.current(f) } else { *b });
        assert_ne!(to, 1);
    }
}

#[test]
fn a_syn_takes_the_current_choice_over_a_stale_record() {
    let (_, mut sim, flows) = established(9, 1 << 12, 2_000);
    sim.pool.0[2].weight = 0;
    sim.change();
    for (f, b) in &flows {
        assert_eq!(sim.send(f, Kind::Tcp), *b); // recorded where its slot changed
        // The port is reused by a new connection: it takes the current choice, keeps it.
        let now = sim.current(f);
        assert_eq!(sim.send(f, Kind::Syn), now);
        assert_eq!(sim.send(f, Kind::Tcp), now);
    }
}

/// UDP has no SYN: an unrecorded UDP flow on a changed slot is taken as older than the change
/// while the slot's `ADOPT_UDP` lasts (recorded, it then keeps that backend while it lives);
/// after it, one goes to the current backend. So a drained backend stops getting new UDP flows
/// once the window ends, and its slots clear once its flows go quiet.
#[test]
fn udp_flows_follow_the_adoption_window_and_a_drain_completes() {
    let mut rng = StdRng::seed_from_u64(10);
    let mut sim = Sim::new(&[100, 100, 100], 1 << 14);
    sim.limits.idle_hold = 300;
    let flows: Vec<(FlowKey, u32)> = (0..3_000)
        .map(|_| {
            let f = flow(&mut rng, crate::PROTO_UDP);
            (f, sim.send(&f, Kind::Udp))
        })
        .collect();
    sim.pool.0[0].weight = 0;
    sim.change();
    let active: Vec<_> = flows
        .iter()
        .filter(|(_, b)| *b == 0)
        .take(200)
        .copied()
        .collect();
    for (f, b) in &active {
        assert_eq!(sim.send(f, Kind::Udp), *b, "within the window: adopted");
    }
    // A new UDP flow within the window also goes to the old backend (documented).
    let late: Vec<FlowKey> = (0..2_000)
        .map(|_| flow(&mut rng, crate::PROTO_UDP))
        .collect();
    let mut adopted_new = 0;
    for f in &late {
        if sim.slots.hot[sim.slot(f) as usize].changed() && sim.send(f, Kind::Udp) == 0 {
            adopted_new += 1;
        }
    }
    assert!(adopted_new > 0);
    // Past the window: active flows keep their backend, new ones never reach the drained one.
    for _ in 0..10 {
        sim.pass(LIMITS.udp_adopt / 5);
        sim.scan();
        for (f, b) in &active {
            assert_eq!(sim.send(f, Kind::Udp), *b);
        }
    }
    for _ in 0..2_000 {
        let f = flow(&mut rng, crate::PROTO_UDP);
        assert_ne!(
            sim.send(&f, Kind::Udp),
            0,
            "a new UDP flow after the window"
        );
    }
    // The flows go quiet: past udp_idle and the hold, every slot clears.
    sim.pass(LIMITS.udp_idle as u64 / HZ as u64 + sim.limits.idle_hold);
    for _ in 0..QUIET_SCANS {
        sim.scan();
    }
    assert_eq!(sim.slots.changed(), 0);
}

/// Under a SYN flood only SYNs on changed slots take entries: flows on unchanged slots are
/// untouched by it, and the flood's records are bounded by its share of changed slots.
#[test]
fn a_syn_flood_takes_entries_only_on_changed_slots() {
    let (mut rng, mut sim, flows) = established(11, 1 << 12, 2_000);
    sim.pool.0.push(B::up(100));
    sim.change();
    let changed: HashSet<u32> = (0..SIZE)
        .filter(|&s| sim.slots.hot[s as usize].changed())
        .collect();
    let (records, unrecorded, on_changed) = (sim.records, sim.unrecorded, sim.on_changed);
    let n = 100_000u64;
    for _ in 0..n {
        let f = flow(&mut rng, crate::PROTO_TCP);
        sim.send(&f, Kind::Syn);
    }
    let flood_changed = sim.on_changed - on_changed;
    // Every SYN on a changed slot asked for a record; those that found their set full of
    // fresh tentative ones (the flood's own, within a handshake) got none.
    assert_eq!(
        sim.records - records + sim.unrecorded - unrecorded,
        flood_changed
    );
    let share = changed.len() as f64 / SIZE as f64;
    assert!((flood_changed as f64 / n as f64 - share).abs() < 0.02);
    for (f, b) in &flows {
        if !changed.contains(&sim.slot(f)) {
            assert_eq!(
                sim.send(f, Kind::Tcp),
                *b,
                "unchanged slots: untouched by the flood"
            );
        }
    }
    eprintln!(
        "flood: {:.1}% of SYNs recorded ({} changed slots of {SIZE})",
        100.0 * flood_changed as f64 / n as f64,
        changed.len()
    );
}

#[test]
fn icmp_errors_follow_their_flow_and_record_nothing() {
    let (_, mut sim, flows) = established(12, 1 << 12, 1_000);
    sim.pool.0[1].weight = 0;
    sim.change();
    let records = sim.records;
    for (f, b) in &flows {
        assert_eq!(sim.send(f, Kind::IcmpError), *b);
    }
    assert_eq!(sim.records, records);
}

#[test]
fn a_later_fragment_without_its_first_goes_where_an_unrecorded_flow_of_its_client_goes() {
    let (mut rng, mut sim, tcp) = established(13, 1 << 12, 1_000);
    sim.pool.0[0].weight = 0;
    sim.change();
    let frag = |sim: &Sim, f: &FlowKey, udp: bool| {
        let s = sim.slot(f) as usize;
        later_fragment(sim.slots.hot[s], || sim.slots.side[s], udp, &sim.pool)
    };
    // TCP: an unrecorded flow keeps its backend, and so does its fragment.
    for (f, b) in &tcp {
        assert_eq!(frag(&sim, f, false), *b);
    }
    // UDP after the adoption window: a new flow takes the current backend, so does a fragment.
    sim.pass(LIMITS.udp_adopt);
    sim.scan();
    for _ in 0..1_000 {
        let f = flow(&mut rng, crate::PROTO_UDP);
        let fragment = frag(&sim, &f, true);
        assert_eq!(fragment, sim.send(&f, Kind::Udp));
        assert_eq!(fragment, sim.current(&f));
    }
}

/// Spoofed SYN and UDP floods (each source sends one packet) during a drain and an add, into a
/// table small enough that the flood fills every set: the flood's records stay tentative and
/// take only free, dead or tentative ways, so every established flow on a changed slot keeps
/// its record and its backend.
#[test]
fn a_flood_during_changes_never_evicts_an_established_flow() {
    let (mut rng, mut sim, _) = established(21, 1 << 8, 0);
    sim.pool.0.push(B::up(100));
    sim.change();
    // Connections that began after the change on changed slots: SYN, then ACK (confirmed).
    let mut live = Vec::new();
    while live.len() < 300 {
        let f = flow(&mut rng, crate::PROTO_TCP);
        if !sim.slots.hot[sim.slot(&f) as usize].changed() {
            continue;
        }
        let b = sim.send(&f, Kind::Syn);
        assert_eq!(sim.send(&f, Kind::Tcp), b);
        if sim.record(&f).is_some_and(|r| !r.tentative()) {
            live.push((f, b));
        }
    }
    let flood = |sim: &mut Sim, rng: &mut StdRng| {
        for i in 0..60_000 {
            let f = flow(rng, [crate::PROTO_TCP, crate::PROTO_UDP][i % 2]);
            let kind = [Kind::Syn, Kind::Udp][i % 2];
            sim.send(&f, kind);
        }
    };
    flood(&mut sim, &mut rng);
    sim.pool.0[0].weight = 0;
    sim.change();
    flood(&mut sim, &mut rng);
    sim.pool.0.push(B::up(100));
    sim.change();
    flood(&mut sim, &mut rng);
    let tentative = sim
        .sets
        .iter()
        .flat_map(|s| s.ways.iter())
        .filter(|r| r.tentative())
        .count();
    assert!(
        tentative > 600,
        "the flood filled the table's free ways ({tentative} tentative records)"
    );
    for (f, b) in &live {
        let r = sim.record(f).expect("an established flow keeps its record");
        assert!(!r.tentative());
        assert_eq!(sim.send(f, Kind::Tcp), *b, "and its backend");
    }
    assert!(sim.unrecorded > 0, "some flood packets found no room");
}

/// Over the new-flow limit (here: no new record at all), a SYN on a changed slot goes where its
/// later packets without a record go (the slot's previous backend while it is usable), so the
/// connection is balanced, never split; under the limit it takes the current backend.
#[test]
fn a_new_flow_over_the_limit_is_balanced_unrecorded_and_never_split() {
    let (mut rng, mut sim, _) = established(22, 1 << 12, 0);
    sim.pool.0.push(B::up(100));
    sim.change();
    sim.new_flow_budget = 0;
    let (mut checked, mut old) = (0, 0);
    while checked < 500 {
        let f = flow(&mut rng, crate::PROTO_TCP);
        let slot = sim.slot(&f) as usize;
        if !sim.slots.hot[slot].changed() {
            continue;
        }
        checked += 1;
        let b = sim.send(&f, Kind::Syn);
        assert_eq!(
            b,
            sim.slots.side[slot].old(),
            "the previous backend, usable"
        );
        old += (b != sim.current(&f)) as usize;
        for _ in 0..3 {
            assert_eq!(sim.send(&f, Kind::Tcp), b, "the connection is not split");
        }
        assert_eq!(sim.send(&f, Kind::TcpClosing), b);
        assert!(sim.record(&f).is_none(), "nothing recorded over the limit");
    }
    assert_eq!(
        old, checked,
        "every changed slot's previous backend is another"
    );
    sim.new_flow_budget = u64::MAX;
    let f = (0..)
        .map(|_| flow(&mut rng, crate::PROTO_TCP))
        .find(|f| sim.slots.hot[sim.slot(f) as usize].changed())
        .unwrap();
    assert_eq!(sim.send(&f, Kind::Syn), sim.current(&f));
    assert!(sim.record(&f).unwrap().tentative());
}

/// A real client's SYN keeps its record through a flood for a handshake's time: a set full of
/// fresh tentative records makes no room (the flood's next SYN goes unrecorded), and one a
/// handshake old does.
#[test]
fn a_fresh_tentative_record_keeps_its_way_for_a_handshake() {
    let eviction = Eviction::new(30 * HZ, 10 * HZ, STALE, HZ);
    let mut set = RecordSet::default();
    let now = 5_001;
    for i in 0..RECORD_WAYS {
        set.ways[i] = Record::new(
            (i as u64 + 1) << 40,
            1,
            SVC,
            5,
            record_flags::TENTATIVE,
            now - i as u32,
        );
    }
    assert_eq!(set.place(99 << 40, SVC, 5, now, &eviction), (None, None));
    // A handshake later, the oldest tentative record makes room.
    let later = now + HZ;
    assert_eq!(
        set.place(99 << 40, SVC, 5, later, &eviction),
        (None, Some(RECORD_WAYS - 1))
    );
}
