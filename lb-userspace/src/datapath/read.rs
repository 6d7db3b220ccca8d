//! Reading the data path back: what lbd's maps hold (the shadow), the connection table's
//! flows, and the counters. Nothing here writes a map.

use std::path::Path;

use aya::maps::{IterableMap as _, MapData};
use lb_common::{
    Backend, Counter, FlowKey, FlowValue, NewFlow, Reason, Record, RecordSet, ServiceKey,
    ServiceValue, backend_flags, maglev_slot, maps,
};

use super::{
    Datapath,
    error::{Result, io_err, map_err},
    maps::{per_cpu_total, sum_counters},
    pins::maps_dir,
    sys::ArrayMemory,
};

impl Datapath {
    /// The id of the program the links run (the traced one while a trace runs).
    pub fn program_id(&self) -> u32 {
        if self.tracing {
            self.traced_id
        } else {
            self.program_id
        }
    }

    /// Every service key in the map.
    pub fn service_keys(&self) -> Vec<(ServiceKey, ServiceValue)> {
        self.shadow.services.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// Every backend entry in use, by id (a restarted lbd keeps the ids the data path uses).
    pub fn backend_entries(&self) -> Vec<(u32, Backend)> {
        self.shadow
            .backends
            .iter()
            .filter(|(_, b)| b.flags & backend_flags::VALID != 0)
            .map(|(id, b)| (*id, *b))
            .collect()
    }

    /// Sets of the connection table (a power of two).
    pub(super) fn conntrack_sets(&self) -> Result<u32> {
        Ok(self
            .maps
            .conntrack
            .map()
            .info()
            .map_err(map_err("reading CONNTRACK"))?
            .max_entries())
    }

    /// The flows each NAT table holds now (0 when unreadable).
    pub fn nat_capacity(&self) -> u32 {
        self.nat_entries().unwrap_or(0)
    }

    /// The flows each NAT table holds (`NAT_FLOWS`' size; `NAT_REPLIES` has the same).
    pub fn nat_entries(&self) -> Result<u32> {
        self.maps.nat_flows_size()
    }

    /// Where the connection table keeps `key`: its set index and its hash.
    pub(super) fn flow_place(&self, key: &FlowKey) -> Option<(u32, u64)> {
        let config = self.maps.config.get(&0, 0).ok()?;
        let hash = lb_common::hash::flow_hash(&config.hash_key, key);
        Some((hash as u32 & config.flow_set_mask, hash))
    }

    /// The service a flow's packets are placed by, and the flow's slot in its table: the
    /// destination's service, then the VIP's every-port one (a flow of a deferring slot is
    /// recorded under it).
    pub(super) fn flow_services(&self, key: &FlowKey) -> Vec<(ServiceValue, u32)> {
        let Ok(config) = self.maps.config.get(&0, 0) else {
            return vec![];
        };
        let exact = ServiceKey {
            addr: key.dst,
            port: key.dport,
            proto: key.proto,
            family: key.family,
        };
        let every_port = ServiceKey { port: 0, ..exact };
        [exact, every_port]
            .iter()
            .filter_map(|k| self.shadow.services.get(k))
            .filter_map(|v| Some((*v, maglev_slot(&config.hash_key, v, key)?.index)))
            .collect()
    }

    /// The backend a `nat` flow (client → VIP) was given, if the program recorded it.
    pub fn nat_flow(&self, key: &FlowKey) -> Option<lb_common::nat::NatFlow> {
        self.maps.nat_flows.get(key, 0).ok()
    }

    /// What the connection table says about a flow (only flows on changed slots have a
    /// record).
    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        self.stored_flow(key).map(|e| e.value())
    }

    /// The connection-table record of a flow, as stored (with its `seen` stamp).
    pub(super) fn stored_flow(&self, key: &FlowKey) -> Option<Record> {
        let (index, hash) = self.flow_place(key)?;
        let set: RecordSet = self.maps.conntrack.get(&index, 0).ok()?;
        self.flow_services(key)
            .into_iter()
            .find_map(|(v, slot)| set.find(hash, v.id, slot).copied())
    }

    pub fn service_counter(&self, id: u32) -> Counter {
        sum_counters(self.maps.service_stats.get(&id, 0).ok())
    }

    /// The replies of `nat` service `id` the program rewrote and sent on to their clients.
    pub fn service_reply_counter(&self, id: u32) -> Counter {
        sum_counters(self.maps.service_reply_stats.get(&id, 0).ok())
    }

    pub fn backend_counter(&self, id: u32) -> Counter {
        sum_counters(self.maps.backend_stats.get(&id, 0).ok())
    }

    /// What became of the new flows that asked for a record, summed over CPUs, by
    /// `NewFlow` index.
    pub fn new_flow_counts(&self) -> [u64; NewFlow::COUNT as usize] {
        NewFlow::ALL.map(|o| per_cpu_total(&self.maps.new_flow_stats, o as u32))
    }

    pub fn reason_counts(&self) -> Vec<(Reason, u64)> {
        Reason::ALL
            .iter()
            .map(|&r| (r, per_cpu_total(&self.maps.reason_stats, r as u32)))
            .collect()
    }

    /// The refused packets of service `id`, by reason (every reason, counted or not).
    pub fn service_reason_counts(&self, id: u32) -> Vec<(Reason, u64)> {
        Reason::ALL
            .iter()
            .map(|&r| {
                let index = lb_common::service_reason_index(id, r);
                (r, per_cpu_total(&self.maps.service_reason_stats, index))
            })
            .collect()
    }
}

/// Reads the connection table on its own read-only mapping of the pinned table, so counting and
/// scanning it (a read of its memory: 16 MiB at the default size) never hold up the daemon and
/// cost no syscalls.
pub struct ConntrackCounter {
    _map: MapData,
    memory: ArrayMemory,
    sets: usize,
}

impl ConntrackCounter {
    pub fn open(bpffs_dir: &Path) -> Result<ConntrackCounter> {
        let path = maps_dir(bpffs_dir).join(maps::CONNTRACK);
        let what = format!("opening the pinned map {}", path.display());
        let map = MapData::from_pin(&path).map_err(map_err(what.clone()))?;
        let sets = map.info().map(|i| i.max_entries() as usize).unwrap_or(0);
        let memory = ArrayMemory::map(&map, sets * size_of::<RecordSet>(), false)
            .map_err(io_err(format!("mapping {}", path.display())))?;
        Ok(ConntrackCounter {
            _map: map,
            memory,
            sets,
        })
    }

    /// Entries the table holds.
    pub fn capacity(&self) -> u64 {
        (self.sets * lb_common::FLOW_WAYS) as u64
    }

    /// Flows in the table now (used entries), and its capacity.
    pub fn count(&self) -> (u64, u64) {
        let entries = self.sets * lb_common::FLOW_WAYS;
        let seen = std::mem::offset_of!(Record, seen);
        // The program writes entries meanwhile: only the one field needed is read.
        let used = (0..entries)
            .filter(|&i| self.memory.read_at::<u32>(i * size_of::<Record>() + seen) != 0)
            .count();
        (used as u64, entries as u64)
    }

    /// Every used record with its index in the table, each read whole (the program may be
    /// writing it: a torn one names a flow that does not exist, and is read right by the next
    /// scan).
    pub fn records(&self) -> impl Iterator<Item = (usize, Record)> + '_ {
        (0..self.sets * lb_common::FLOW_WAYS)
            .map(|i| (i, self.memory.read::<Record>(i)))
            .filter(|(_, r)| r.seen != 0)
    }
}

/// The connection table's clock as the program reads it (`bpf_jiffies64() / 64`), for the ages
/// of records: the kernel's jiffies from /proc/timer_list (root only), and their rate measured
/// against lbd's monotonic clock. Until the rate is known, HZ=1000 is assumed: the fastest
/// tick, so limits in ticks last at least their nominal time at any HZ.
pub struct TableClock {
    first: Option<(std::time::Instant, u64)>,
    ticks_per_second: u32,
}

impl Default for TableClock {
    fn default() -> TableClock {
        TableClock {
            first: None,
            ticks_per_second: 1000 / 64 + 1,
        }
    }
}

impl TableClock {
    /// The table's clock now, `None` when jiffies cannot be read.
    pub fn now(&mut self) -> Option<u32> {
        let jiffies = read_jiffies()?;
        let at = std::time::Instant::now();
        match self.first {
            None => self.first = Some((at, jiffies)),
            Some((t0, j0)) if at.duration_since(t0).as_secs() >= 2 => {
                let hz = (jiffies - j0) as f64 / at.duration_since(t0).as_secs_f64();
                // CONFIG_HZ is one of 100, 250, 300, 1000.
                let hz = [100u32, 250, 300, 1000]
                    .into_iter()
                    .min_by_key(|&h| (f64::from(h) - hz).abs() as u64)
                    .unwrap_or(1000);
                self.ticks_per_second = hz.div_ceil(64);
            }
            Some(_) => {}
        }
        Some((jiffies >> 6) as u32 | 1)
    }

    /// Table-clock ticks per second (rounded up).
    pub fn ticks_per_second(&self) -> u32 {
        self.ticks_per_second
    }
}

/// The kernel's jiffies (its first "jiffies:" line of /proc/timer_list).
fn read_jiffies() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/timer_list").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("jiffies: "))
        .and_then(|v| v.trim().parse().ok())
}
