//! lbd's side of the per-slot state (`lb_common::slotstate`, docs/design/slot-state.md): each
//! service's Maglev array holds, per slot, its backend and whether it changed since a live flow
//! began (hot half), and the backend of its unrecorded flows (side half). Here:
//! - a new table of a service becomes a new array whose changed slots are marked
//!   (`SlotTable::rebuilt`), swapped in with one update;
//! - a scan of the connection table (`SlotView::scan`, on the counting thread, off the daemon's
//!   lock) finds which changed slots live records still need, and `Datapath::clear_slots`
//!   clears the others in place, once their unrecorded flows need them no longer.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use aya::maps::{Array, IterableMap as _, MapData};
use lb_common::{
    Config, Record, ServiceKey, backend_flags,
    slotstate::{
        Backends, DEFAULT_IDLE_HOLD_S, DEFER, Eviction, Hot, Limits, Side, SlotTable, half_words,
    },
};

use super::{
    Datapath,
    error::{Result, io_err, map_err},
    sys::{ArrayMemory, fill_mmapable_array},
};

/// How long slot state is kept for flows lbd cannot see (docs/design/slot-state.md, section 9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotTimes {
    /// A UDP record not seen this long is a flow that ended.
    pub udp_idle: Duration,
    /// A TCP record after the client's FIN or RST, not seen this long, is a flow that ended.
    /// Long (5 min): with direct server return lb sees only the client's half, and a client's
    /// FIN is a half-close; the server may go on sending, and the client's next packet (an
    /// acknowledgement, an answer to a zero-window probe backed off up to 120 s) may come
    /// minutes later.
    pub close_grace: Duration,
    /// After a slot's first change, an unrecorded UDP flow on it is taken as older than the
    /// change (goes to the previous backend) for this long.
    pub udp_adopt: Duration,
    /// After a slot's first change, its unrecorded flows (idle since before the change) keep
    /// the previous backend for at least this long (`daemon.idle_hold_s`).
    pub idle_hold: Duration,
}

impl Default for SlotTimes {
    fn default() -> SlotTimes {
        SlotTimes {
            udp_idle: Duration::from_secs(30),
            close_grace: Duration::from_secs(300),
            udp_adopt: Duration::from_secs(60),
            idle_hold: Duration::from_secs(DEFAULT_IDLE_HOLD_S),
        }
    }
}

impl SlotTimes {
    /// The limits in the units each side counts in: table-clock ticks (`ticks_per_second`) for
    /// the records' ages, lbd's seconds for the slots' holds.
    pub fn limits(&self, ticks_per_second: u32) -> Limits {
        let ticks = |d: Duration| {
            (d.as_millis() as u64 * u64::from(ticks_per_second))
                .div_ceil(1000)
                .min(u64::from(u32::MAX / 2)) as u32
        };
        Limits {
            udp_idle: ticks(self.udp_idle),
            close_grace: ticks(self.close_grace),
            udp_adopt: self.udp_adopt.as_secs(),
            idle_hold: self.idle_hold.as_secs(),
        }
    }
}

/// How long a tentative record keeps its way from a new record: a handshake's time (a SYN's
/// ACK within it confirms the record), on a slow path.
pub const TENTATIVE_HOLD: Duration = Duration::from_secs(1);

/// What `CONFIG` says about new records: how long records of each kind live for eviction, and
/// the new-flow limit (`daemon.idle_hold_s`, `daemon.new_flow_limit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protection {
    pub times: SlotTimes,
    /// New records per second per CPU; 0: no limit.
    pub new_flow_limit: u32,
}

impl Default for Protection {
    fn default() -> Protection {
        Protection {
            times: SlotTimes::default(),
            new_flow_limit: lb_common::DEFAULT_NEW_FLOW_LIMIT,
        }
    }
}

impl Protection {
    /// Writes itself into `config`. Ticks are counted at the fastest table clock (HZ=1000):
    /// at a slower one a record is kept longer than its nominal time, never shorter.
    pub fn write_into(&self, config: &mut Config) {
        let tps = super::TableClock::default().ticks_per_second();
        let limits = self.times.limits(tps);
        let stale = (self.times.idle_hold.as_secs() * u64::from(tps)).min(u64::from(u32::MAX / 2));
        let handshake = SlotTimes {
            udp_idle: TENTATIVE_HOLD,
            ..self.times
        }
        .limits(tps)
        .udp_idle;
        config.eviction =
            Eviction::new(limits.udp_idle, limits.close_grace, stale as u32, handshake);
        config.new_flow_interval_ns = match self.new_flow_limit {
            0 => 0,
            n => (1_000_000_000 / n).max(1),
        };
    }
}

/// lbd's clock for slot bookkeeping: seconds since it first looked (monotonic).
pub fn slot_seconds() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

/// One service's slot state and its array in the map, mapped writable so that lbd clears
/// changed slots in place (the program only reads the array).
pub(super) struct ServiceSlots {
    pub(super) table: SlotTable,
    /// The service the state was built for: an id given to another service starts afresh.
    pub(super) key: ServiceKey,
    /// The array's memory (the mapping keeps the array alive, whatever becomes of its fd).
    memory: ArrayMemory,
}

impl ServiceSlots {
    fn new(table: SlotTable, key: ServiceKey, map: &MapData) -> Result<ServiceSlots> {
        let len = 2 * half_words(table.hot.len() as u32) as usize;
        let memory = ArrayMemory::map(map, len * 8, true).map_err(io_err(format!(
            "mapping a Maglev table of {} slots",
            table.hot.len()
        )))?;
        Ok(ServiceSlots { table, key, memory })
    }

    /// Writes the words of the array that hold `slot` (its side half's word first, then its
    /// hot half's: a packet that sees the slot changed finds its side half written).
    pub(super) fn write_slot(&self, slot: usize) {
        let w = slot / lb_common::MAGLEV_SLOTS_PER_WORD as usize;
        let half = half_words(self.table.hot.len() as u32) as usize;
        self.memory.write(half + w, self.table.side_word(w));
        self.memory.write(w, self.table.hot_word(w));
    }
}

/// What the scan needs of the slot state, taken under the daemon's lock.
pub struct SlotView {
    generation: u64,
    /// Per service id with changed slots: each slot's hot half.
    hot: BTreeMap<u32, Vec<Hot>>,
    /// (service, backend) of every usable backend.
    usable: BTreeSet<(u32, u32)>,
    /// Services whose records the data path may read: those with changed slots, and the
    /// every-port services that deferring slots send flows to (their records are read
    /// whatever their own slots' state). A record of any other service, or on an unchanged
    /// slot, is read by nobody.
    read: BTreeSet<u32>,
}

/// At most this many stale records are removed per scan (a bound on the time lbd's lock is
/// held for it: the rest go at the next scans).
const STALE_PER_SCAN: usize = 65_536;

/// What a scan of the connection table found.
pub struct SlotScan {
    generation: u64,
    /// Per service: the changed slots a live record needs.
    pinned: BTreeMap<u32, Vec<bool>>,
    /// Services with at least one live record (a slot deferring to such a service is kept).
    live_services: BTreeSet<u32>,
    /// Records nothing reads any more (on an unchanged slot, of no service), by index in the
    /// table, as read: removed unless they changed meanwhile.
    stale: Vec<(usize, Record)>,
    /// Records on changed slots that pin nothing (on the slot's current backend, of an
    /// unusable backend, or dead), as read: removed if their slot is cleared.
    clearable: Vec<(usize, Record)>,
    /// Used entries seen.
    pub used: u64,
}

struct UsableOf<'a> {
    usable: &'a BTreeSet<(u32, u32)>,
    service: u32,
}

impl Backends for UsableOf<'_> {
    fn usable(&self, id: u32) -> bool {
        self.usable.contains(&(self.service, id))
    }
}

impl SlotView {
    /// Services with changed slots.
    pub fn is_empty(&self) -> bool {
        self.hot.is_empty()
    }

    /// Which changed slots live `records` (by index in the table) need at table clock `now`:
    /// one whose record names a usable backend other than its slot's current one. And which
    /// records are stale: on a slot that is not changed (the data path reads no record there:
    /// every flow of an unchanged slot is its current backend's, so a record left from when it
    /// was changed would only pin the slot wrongly after a later change, or outlive its flow
    /// since the flow's FIN is never seen), or of a service with no table.
    pub fn scan(
        &self,
        records: impl Iterator<Item = (usize, Record)>,
        now: u32,
        limits: &Limits,
    ) -> SlotScan {
        let mut pinned: BTreeMap<u32, Vec<bool>> = BTreeMap::new();
        let mut live_services = BTreeSet::new();
        let mut stale = vec![];
        let mut clearable = vec![];
        let mut used = 0;
        for (i, r) in records {
            used += 1;
            let service = r.service();
            let slot = r.slot() as usize;
            let hot = self.hot.get(&service);
            let read = self.read.contains(&service)
                && hot.is_none_or(|hot| hot.get(slot).is_some_and(|h| h.changed()));
            if !read {
                if stale.len() < STALE_PER_SCAN {
                    stale.push((i, r));
                }
                continue;
            }
            let live = r.live(now, limits);
            if live {
                live_services.insert(service);
            }
            let Some(hot) = hot else {
                continue;
            };
            let Some(h) = hot.get(slot) else { continue };
            if live && r.backend() != h.current() && self.usable.contains(&(service, r.backend())) {
                pinned
                    .entry(service)
                    .or_insert_with(|| vec![false; hot.len()])[slot] = true;
            } else if clearable.len() < STALE_PER_SCAN {
                // Needed by nobody once its slot is cleared: removed with the clearing, before
                // its flow can end unseen on an unchanged slot.
                clearable.push((i, r));
            }
        }
        SlotScan {
            generation: self.generation,
            pinned,
            live_services,
            stale,
            clearable,
            used,
        }
    }
}

impl Datapath {
    /// The state a new `table` of service `id` (answering to `key`) starts with at `now`: the
    /// same service's state rebuilt (its changed slots marked); for a new service on a port of
    /// a VIP that has an every-port service, every slot deferring to that one; else nothing
    /// changed.
    fn next_slot_table(&self, id: u32, key: &ServiceKey, table: &[u32], now: u64) -> SlotTable {
        if let Some(s) = self.slots.get(&id)
            && s.key == *key
            && s.table.hot.len() == table.len()
        {
            return s.table.rebuilt(table, now);
        }
        let every_port = ServiceKey { port: 0, ..*key };
        if key.port != 0 && self.shadow.services.contains_key(&every_port) {
            SlotTable::deferring(table, now)
        } else {
            SlotTable::fresh(table)
        }
    }

    /// Replaces the Maglev table of service `id` (answering to `key`) atomically: a new array
    /// with both halves, filled aside and swapped in with one update.
    pub(super) fn install_table(
        &mut self,
        id: u32,
        key: &ServiceKey,
        table: Arc<[u32]>,
    ) -> Result<()> {
        let state = self.next_slot_table(id, key, &table, slot_seconds());
        let words = state.words();
        let size = table.len() as u32;
        let inner = Array::<MapData, u64>::create(words.len() as u32, lb_common::table_flags(size))
            .map_err(map_err(format!("creating a Maglev table of {size} slots")))?;
        fill_mmapable_array(inner.map(), &words)
            .map_err(io_err(format!("filling a Maglev table of {size} slots")))?;
        // A table that changed between the default size and another is now in the other
        // array of maps than its old one, which stays until the service's new size is written
        // (`drop_stale_tables`): until then, packets still read the old table by the old size.
        self.maps
            .tables_for_mut(size)
            .set(id, &inner, 0)
            .map_err(map_err(format!(
                "swapping in the Maglev table of service {id}"
            )))?;
        self.slots
            .insert(id, ServiceSlots::new(state, *key, inner.map())?);
        self.shadow.maglev.insert(id, table);
        self.slot_generation += 1;
        Ok(())
    }

    /// Adopts the slot state of a service's array read back from the pinned maps (`words`,
    /// both halves), as a restarted lbd does: its changed slots' holds start again now.
    pub(super) fn adopt_slots(
        &mut self,
        id: u32,
        key: ServiceKey,
        table_size: u32,
        words: &[u64],
        map: &MapData,
    ) -> Result<Option<Arc<[u32]>>> {
        let Some(table) = SlotTable::from_words(words, table_size, slot_seconds()) else {
            return Ok(None);
        };
        let current: Arc<[u32]> = table.current().into();
        self.slots.insert(id, ServiceSlots::new(table, key, map)?);
        Ok(Some(current))
    }

    /// Forgets the slot state of a service id whose table is gone.
    pub(super) fn forget_slots(&mut self, id: u32) {
        self.slots.remove(&id);
        self.slot_generation += 1;
    }

    /// What a scan of the connection table needs (the hot halves of the services with changed
    /// slots, taken under the daemon's lock).
    pub fn slot_view(&self) -> SlotView {
        let hot: BTreeMap<u32, Vec<Hot>> = self
            .slots
            .iter()
            .filter(|(_, s)| s.table.hot.iter().any(|h| h.changed()))
            .map(|(&id, s)| (id, s.table.hot.clone()))
            .collect();
        let mut read: BTreeSet<u32> = hot.keys().copied().collect();
        for s in self.slots.values() {
            if s.table.side.iter().any(|side| side.old() == DEFER)
                && let Some(e) = self.shadow.services.get(&ServiceKey { port: 0, ..s.key })
            {
                read.insert(e.id);
            }
        }
        SlotView {
            generation: self.slot_generation,
            hot,
            usable: self.usable_backends(),
            read,
        }
    }

    /// (service, backend) of every backend a record may keep its flow on: filled in, not down.
    fn usable_backends(&self) -> BTreeSet<(u32, u32)> {
        self.shadow
            .backends
            .iter()
            .filter(|(_, b)| {
                b.flags & (backend_flags::VALID | backend_flags::DOWN) == backend_flags::VALID
            })
            .map(|(&id, b)| (b.service, id))
            .collect()
    }

    /// Clears the changed slots `scan` found unneeded (in `QUIET_SCANS` scans in a row), in
    /// place: hot half first, then side half; and removes the stale records it found (those
    /// still as read: the data path writes no record on an unchanged slot). A scan of tables
    /// that changed since its view was taken is ignored (the next one sees them). The number of
    /// slots cleared.
    pub fn clear_slots(&mut self, scan: &SlotScan, limits: &Limits) -> usize {
        if scan.generation != self.slot_generation {
            return 0;
        }
        if !scan.stale.is_empty()
            && let Err(e) = self.remove_stale(&scan.stale)
        {
            log::warn!("stale connection-table records not removed: {e}");
        }
        let usable = self.usable_backends();
        let now = slot_seconds();
        let mut cleared = 0;
        let mut cleared_slots = BTreeSet::new();
        for (&id, s) in self.slots.iter_mut() {
            if !s.table.hot.iter().any(|h| h.changed()) {
                continue;
            }
            let mut pinned = scan
                .pinned
                .get(&id)
                .cloned()
                .unwrap_or_else(|| vec![false; s.table.hot.len()]);
            let defer_live = self
                .shadow
                .services
                .get(&ServiceKey { port: 0, ..s.key })
                .is_some_and(|e| scan.live_services.contains(&e.id));
            if defer_live {
                for (p, side) in pinned.iter_mut().zip(&s.table.side) {
                    *p |= side.old() == DEFER;
                }
            }
            let before = s.table.clone();
            s.table.clear(
                &pinned,
                now,
                limits,
                &UsableOf {
                    usable: &usable,
                    service: id,
                },
            );
            let half = half_words(s.table.hot.len() as u32) as usize;
            let per = lb_common::MAGLEV_SLOTS_PER_WORD as usize;
            for w in 0..half {
                let range = w * per..((w + 1) * per).min(s.table.hot.len());
                let hot_moved = s.table.hot[range.clone()] != before.hot[range.clone()];
                let side_moved = s.table.side[range.clone()] != before.side[range.clone()];
                if hot_moved {
                    for i in range.filter(|&i| before.hot[i].changed() && !s.table.hot[i].changed())
                    {
                        cleared += 1;
                        cleared_slots.insert((id, i as u32));
                    }
                    s.memory.write(w, s.table.hot_word(w));
                }
                if side_moved {
                    s.memory.write(half + w, s.table.side_word(w));
                }
            }
        }
        let with_cleared: Vec<(usize, Record)> = scan
            .clearable
            .iter()
            .filter(|(_, r)| cleared_slots.contains(&(r.service(), r.slot())))
            .copied()
            .collect();
        if !with_cleared.is_empty()
            && let Err(e) = self.remove_stale(&with_cleared)
        {
            log::warn!("records of cleared slots not removed: {e}");
        }
        cleared
    }

    /// The hot and side halves of `slot` in service `id`'s array, as the program reads them.
    pub fn slot_lanes(&self, id: u32, slot: u32) -> Option<(Hot, Side)> {
        let s = self.slots.get(&id)?;
        Some((
            *s.table.hot.get(slot as usize)?,
            *s.table.side.get(slot as usize)?,
        ))
    }

    /// Removes `stale` records (index, as read) that are still as read.
    fn remove_stale(&mut self, stale: &[(usize, Record)]) -> Result<()> {
        let sets = self.conntrack_sets()? as usize;
        let memory = ArrayMemory::map(
            self.maps.conntrack.map(),
            sets * size_of::<lb_common::RecordSet>(),
            true,
        )
        .map_err(io_err("mapping CONNTRACK"))?;
        for &(i, r) in stale {
            if i < sets * lb_common::FLOW_WAYS && memory.read::<Record>(i) == r {
                memory.write(i, Record::default());
            }
        }
        Ok(())
    }

    /// Slots changed now, and slots in all, over every service.
    pub fn changed_slots(&self) -> (u64, u64) {
        self.slots.values().fold((0, 0), |(c, t), s| {
            (c + s.table.changed() as u64, t + s.table.hot.len() as u64)
        })
    }
}
