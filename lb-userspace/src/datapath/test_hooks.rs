//! Calls only the tests and benchmarks make (cargo feature `test-hooks`, which the tests crate
//! turns on; lbd and lbctl are built without it): running the loaded program with
//! BPF_PROG_TEST_RUN, writing one map entry at a time (lbd itself writes only through
//! `apply`), and filling, reading and emptying the connection table by hand.

use std::path::Path;

use aya::{maps::IterableMap as _, programs::Xdp};
use lb_common::{
    Backend, FlowKey, FlowValue, FragKey, FragValue, PROGRAM_NAME, Record, RecordSet, ServiceEntry,
    ServiceKey, ServiceValue, VipKey,
};

use super::{
    Datapath,
    error::{DatapathError, Result, io_err, map_err, prog_err},
    fill::{Fill, FilterEntry, vip_filter_words},
    maps::Maps,
    pins::maps_dir,
    read::ConntrackCounter,
    sys::ArrayMemory,
};

impl Datapath {
    /// The program this process loaded (not when it adopted the running one).
    fn loaded_program(&self) -> Result<&Xdp> {
        let ebpf = self.ebpf.as_ref().ok_or_else(|| {
            DatapathError::Other("no program loaded by this process to test-run".into())
        })?;
        Ok(ebpf
            .program(PROGRAM_NAME)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("the program was checked at load"))
    }

    /// Runs the loaded (not attached) program once on `frame` with BPF_PROG_TEST_RUN: the XDP
    /// action and the frame as the program left it. For the data-path tests and benchmarks.
    pub fn test_run(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let program = self.loaded_program()?;
        // Room for programs that grow the frame (encapsulation).
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let result = program
            .test_run(opts)
            .map_err(prog_err("BPF_PROG_TEST_RUN"))?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// Runs the program `repeat` times on `frame` in one BPF_PROG_TEST_RUN call: the action
    /// and the kernel's mean time per run. Every repetition sees the frame as the previous one
    /// left it.
    pub fn test_run_repeat(&self, frame: &[u8], repeat: u32) -> Result<(u32, std::time::Duration)> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let program = self.loaded_program()?;
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        };
        let result = program
            .test_run(opts)
            .map_err(prog_err("BPF_PROG_TEST_RUN"))?;
        Ok((result.return_value, result.duration))
    }

    /// Writes `CONFIG` for this program with the hash seed `hash_key`.
    pub fn set_config(&mut self, hash_key: [u64; 2]) -> Result<()> {
        let value = self.config_for(hash_key)?;
        self.write_config(value)
    }

    /// Writes `CONFIG` for this program with the hash seed `hash_key` and `protection` (the
    /// eviction times and the new-flow limit) instead of the default one.
    pub fn set_config_with(
        &mut self,
        hash_key: [u64; 2],
        protection: &super::Protection,
    ) -> Result<()> {
        let mut value = self.config_for(hash_key)?;
        protection.write_into(&mut value);
        self.write_config(value)
    }

    /// Writes backend entry `id`.
    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.write_backend(id, backend)
    }

    /// The backend entry at `id` as the data path sees it.
    pub fn backend(&self, id: u32) -> Result<Backend> {
        self.maps
            .backends
            .get(&id, 0)
            .map_err(map_err(format!("reading backend {id}")))
    }

    pub fn clear_backend(&mut self, id: u32) -> Result<()> {
        self.set_backend(id, &Backend::default())
    }

    /// Installs a service's Maglev table, then its key. The table is filled aside in a new
    /// inner map and swapped in with one update, so a packet sees the old table or the new one,
    /// never a mix; its slot state is that of a new service (or of the same service's next
    /// table, when `key` already had this id), as `apply` makes it.
    pub fn set_service(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
        table: &[u32],
    ) -> Result<()> {
        self.install_table(value.id, key, table.into())?;
        self.set_service_key(key, value)?;
        self.drop_stale_tables(&[(value.id, table.len() as u32)])
    }

    /// Writes a service's key when its table is already in place (a change of flags or of the
    /// key itself): no table is rebuilt. The VIP's filter bits and the service's entry by id
    /// come first, so the program never finds the key without them.
    pub fn set_service_key(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        let words = vip_filter_words(self.shadow.services.keys().chain([key]));
        self.write_vip_filter(&words)?;
        self.write_service_by_id(
            value.id,
            ServiceEntry {
                key: *key,
                value: *value,
            },
        )?;
        self.write_service_key(key, value)
    }

    /// Replaces the Maglev table of service `id` atomically, as `apply` does: the slots whose
    /// backend changes are marked changed.
    pub fn swap_table(&mut self, id: u32, table: &[u32]) -> Result<()> {
        let key = self
            .shadow
            .service_by_id
            .get(&id)
            .map_or_else(ServiceKey::default, |e| e.key);
        self.install_table(id, &key, table.into())
    }

    /// The slot state of service `id`: each slot's hot and side halves as the map holds them.
    pub fn slot_state(&self, id: u32) -> Option<lb_common::slotstate::SlotTable> {
        self.slots.get(&id).map(|s| s.table.clone())
    }

    /// Removes a service key: the key first (no new packet finds it), then its entry by id
    /// (unless the id now answers to another key) and its VIP's filter bits.
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        let id = self.shadow.services.get(key).map(|v| v.id);
        self.remove_service_key(key)?;
        if let Some(id) = id
            && self
                .shadow
                .service_by_id
                .get(&id)
                .is_some_and(|e| e.key == *key)
        {
            self.write_service_by_id(id, ServiceEntry::default())?;
        }
        let words = vip_filter_words(self.shadow.services.keys());
        self.write_vip_filter(&words)
    }

    /// What the maps hold, as far as lbd fills them.
    pub fn fill(&self) -> &Fill {
        &self.shadow
    }

    /// The connection-table record of a flow, as stored (with its `seen` stamp).
    pub fn flow_entry(&self, key: &FlowKey) -> Option<Record> {
        self.stored_flow(key)
    }

    /// The connection table's set of a flow (for tests that fill one set).
    pub fn flow_set(&self, key: &FlowKey) -> Option<u32> {
        self.flow_place(key).map(|(index, _)| index)
    }

    /// Writes `record` for a flow: its own entry if it has one, else the set's victim as the
    /// program picks it at clock `now`. For tests that age a record.
    pub fn set_flow_entry(&mut self, key: &FlowKey, record: Record, now: u32) -> Result<()> {
        let (index, hash) = self
            .flow_place(key)
            .ok_or_else(|| DatapathError::Other("CONFIG is not set".into()))?;
        let mut set: RecordSet = self
            .maps
            .conntrack
            .get(&index, 0)
            .map_err(map_err("reading CONNTRACK"))?;
        let eviction = self.shadow.config.eviction;
        let (_, Some(way)) = set.place(hash, record.service(), record.slot(), now, &eviction)
        else {
            return Err(DatapathError::Other(
                "the flow's set holds only confirmed live records".into(),
            ));
        };
        set.ways[way] = record;
        self.maps
            .conntrack
            .set(index, set, 0)
            .map_err(map_err("writing CONNTRACK"))
    }

    /// The record the program would write for a flow of service `value.service` sent to
    /// `value.backend`, seen at clock `seen`, with `flags` (`slotstate::record_flags`).
    pub fn record_for(
        &self,
        key: &FlowKey,
        value: FlowValue,
        flags: u32,
        seen: u32,
    ) -> Result<Record> {
        let (_, hash) = self
            .flow_place(key)
            .ok_or_else(|| DatapathError::Other("CONFIG is not set".into()))?;
        let (_, slot) = self
            .flow_services(key)
            .into_iter()
            .find(|(v, _)| v.id == value.service)
            .ok_or_else(|| {
                DatapathError::Other(format!(
                    "service {} does not answer to the flow's destination",
                    value.service
                ))
            })?;
        Ok(Record::new(
            hash,
            value.backend,
            value.service,
            slot,
            flags,
            seen,
        ))
    }

    /// Records `value` for a flow the way the program does (`RecordSet::place`), as seen at
    /// clock 1 (long ago): for benchmarks and tests that fill the table.
    pub fn set_flow(&mut self, key: &FlowKey, value: FlowValue) -> Result<()> {
        let flags = if key.proto == lb_common::PROTO_UDP {
            lb_common::slotstate::record_flags::UDP
        } else {
            0
        };
        let record = self.record_for(key, value, flags, 1)?;
        self.set_flow_entry(key, record, 1)
    }

    /// Removes a flow's record, if it has one.
    pub fn forget_flow(&mut self, key: &FlowKey) -> Result<()> {
        let Some((index, hash)) = self.flow_place(key) else {
            return Ok(());
        };
        let mut set: RecordSet = self
            .maps
            .conntrack
            .get(&index, 0)
            .map_err(map_err("reading CONNTRACK"))?;
        let mut found = false;
        for (v, slot) in self.flow_services(key) {
            if let Some(way) = set.find_way(hash, v.id, slot) {
                set.ways[way] = Record::default();
                found = true;
            }
        }
        if found {
            self.maps
                .conntrack
                .set(index, set, 0)
                .map_err(map_err("writing CONNTRACK"))?;
        }
        Ok(())
    }

    /// One round of lbd's scanner (`run::spawn_conntrack_scanner`): the connection table read
    /// through its mapping at the table's clock now, then the changed slots no flow needs
    /// cleared. The number of slots cleared.
    pub fn scan_slots(&mut self, times: &super::SlotTimes) -> Result<usize> {
        let view = self.slot_view();
        let counter = ConntrackCounter::open(&self.bpffs_dir)?;
        let mut clock = super::TableClock::default();
        let now = clock
            .now()
            .ok_or_else(|| DatapathError::Other("cannot read jiffies".into()))?;
        let limits = times.limits(clock.ticks_per_second());
        let scan = view.scan(counter.records(), now, &limits);
        Ok(self.clear_slots(&scan, &limits))
    }

    /// The table's clock now, as the program reads it.
    pub fn table_clock(&self) -> Result<u32> {
        super::TableClock::default()
            .now()
            .ok_or_else(|| DatapathError::Other("cannot read jiffies".into()))
    }

    /// Flows in the connection table now, and its capacity.
    pub fn flow_count(&self) -> Result<(u64, u64)> {
        Ok(ConntrackCounter::open(&self.bpffs_dir)?.count())
    }

    /// Fills every entry of the connection table with a made-up flow sent to `value` (their
    /// hashes are random 64-bit values no real flow is likely to have): a full table, for
    /// benchmarks of the path that has to make room.
    pub fn fill_flows(&mut self, value: FlowValue) -> Result<()> {
        let sets = self.conntrack_sets()? as usize;
        let memory = ArrayMemory::map(
            self.maps.conntrack.map(),
            sets * size_of::<RecordSet>(),
            true,
        )
        .map_err(io_err("mapping CONNTRACK"))?;
        let mut x: u64 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        for i in 0..sets * lb_common::FLOW_WAYS {
            // xorshift64*: distinct, well-spread hashes.
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let hash = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
            memory.write(
                i,
                Record::new(
                    hash,
                    value.backend,
                    value.service,
                    hash as u32 % 65_537,
                    0,
                    1,
                ),
            );
        }
        Ok(())
    }

    /// Empties the connection table (every flow then takes the Maglev table's choice).
    pub fn clear_flows(&mut self) -> Result<()> {
        let sets = self.conntrack_sets()? as usize;
        let memory = ArrayMemory::map(
            self.maps.conntrack.map(),
            sets * size_of::<RecordSet>(),
            true,
        )
        .map_err(io_err("mapping CONNTRACK"))?;
        memory.zero();
        Ok(())
    }

    /// Sets the VIP-level entries (fragments without ports) to exactly `entries`.
    pub fn set_vips(&mut self, entries: &[(VipKey, ServiceValue)]) -> Result<()> {
        for (k, v) in entries {
            self.maps
                .vips
                .insert(k, v, 0)
                .map_err(map_err("writing VIPS"))?;
            self.shadow.vips.insert(*k, *v);
        }
        let stale: Vec<VipKey> = self
            .shadow
            .vips
            .keys()
            .filter(|k| !entries.iter().any(|(e, _)| e == *k))
            .copied()
            .collect();
        for k in stale {
            let _ = self.maps.vips.remove(&k);
            self.shadow.vips.remove(&k);
        }
        Ok(())
    }

    /// Sets the client filter prefixes to exactly `entries`, as `apply` does (new ones first,
    /// then the gone ones). The services' flags are the caller's (`set_service_key`, `set_vips`).
    pub fn set_filters(&mut self, entries: impl IntoIterator<Item = FilterEntry>) -> Result<()> {
        let want = Fill {
            filters: entries.into_iter().collect(),
            ..self.shadow.clone()
        };
        self.add_filters(&want)?;
        self.remove_filters(&want)
    }

    /// Sets `NAT_FILTER` to the bits of `addrs` (the `nat` backends' addresses).
    pub fn set_nat_filter(&mut self, addrs: &[lb_common::Addr]) -> Result<()> {
        let words = super::fill::address_filter_words(addrs.iter().copied());
        self.write_nat_filter(&words)
    }

    /// Makes `ifindex` a redirect target (a backend reached through another interface).
    pub fn add_egress(&mut self, ifindex: u32) -> Result<()> {
        self.write_egress(ifindex)
    }
}

/// Every `FRAGS` entry in the pinned maps under `bpffs_dir`.
pub fn read_pinned_frags(bpffs_dir: &Path) -> Result<Vec<(FragKey, FragValue)>> {
    let maps = Maps::from_pins(&maps_dir(bpffs_dir))?;
    maps.frags
        .iter()
        .collect::<std::result::Result<_, _>>()
        .map_err(map_err("reading FRAGS"))
}

impl Fill {
    /// What the pinned maps of this layout under `bpffs_dir` hold now, each Maglev table as
    /// its slots' current backends.
    pub fn read_pinned(bpffs_dir: &Path) -> Result<Fill> {
        let (mut fill, tables) = Fill::read(&Maps::from_pins(&maps_dir(bpffs_dir))?)?;
        for t in tables {
            if let Some(state) =
                lb_common::slotstate::SlotTable::from_words(&t.words, t.table_size, 0)
            {
                fill.maglev.insert(t.id, state.current().into());
            }
        }
        Ok(fill)
    }
}
