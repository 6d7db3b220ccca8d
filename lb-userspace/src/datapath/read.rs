//! Reading the data path back: what lbd's maps hold (the shadow), the connection table's
//! flows, and the counters. Nothing here writes a map.

use std::path::Path;

use aya::maps::{IterableMap as _, MapData};
use lb_common::{
    Backend, Counter, FlowEntry, FlowKey, FlowSet, FlowValue, Reason, ServiceKey, ServiceValue,
    backend_flags, maps,
};

use super::{
    Datapath,
    error::{Result, io_err, map_err},
    maps::{per_cpu_total, sum_counters},
    pins::maps_dir,
    sys::ArrayMemory,
};

impl Datapath {
    pub fn program_id(&self) -> u32 {
        self.program_id
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

    /// Where the connection table keeps `key`: its set index and its hash.
    pub(super) fn flow_place(&self, key: &FlowKey) -> Option<(u32, u64)> {
        let config = self.maps.config.get(&0, 0).ok()?;
        let hash = lb_common::hash::flow_hash(&config.hash_key, key);
        Some((hash as u32 & config.flow_set_mask, hash))
    }

    /// What the connection table says about a flow.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        self.stored_flow(key).map(|e| e.value())
    }

    /// The connection-table entry of a flow, as stored (with its `seen` stamp).
    pub(super) fn stored_flow(&self, key: &FlowKey) -> Option<FlowEntry> {
        let (index, hash) = self.flow_place(key)?;
        let set = self.maps.conntrack.get(&index, 0).ok()?;
        set.find(hash).copied()
    }

    pub fn service_counter(&self, id: u32) -> Counter {
        sum_counters(self.maps.service_stats.get(&id, 0).ok())
    }

    pub fn backend_counter(&self, id: u32) -> Counter {
        sum_counters(self.maps.backend_stats.get(&id, 0).ok())
    }

    pub fn reason_counts(&self) -> Vec<(Reason, u64)> {
        Reason::ALL
            .iter()
            .map(|&r| (r, per_cpu_total(&self.maps.reason_stats, r as u32)))
            .collect()
    }
}

/// Counts the connection table's flows on its own read-only mapping of the pinned table, so
/// counting (a scan of its memory: ~16 MiB at the default size) never holds up the daemon and
/// costs no syscalls.
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
        let memory = ArrayMemory::map(&map, sets * size_of::<FlowSet>(), false)
            .map_err(io_err(format!("mapping {}", path.display())))?;
        Ok(ConntrackCounter {
            _map: map,
            memory,
            sets,
        })
    }

    /// Flows in the table now (used entries), and its capacity.
    pub fn count(&self) -> (u64, u64) {
        let entries = self.sets * lb_common::FLOW_WAYS;
        let seen = std::mem::offset_of!(FlowEntry, seen);
        // The program writes entries meanwhile: only the one field needed is read.
        let used = (0..entries)
            .filter(|&i| {
                self.memory
                    .read_at::<u32>(i * size_of::<FlowEntry>() + seen)
                    != 0
            })
            .count();
        (used as u64, entries as u64)
    }
}
