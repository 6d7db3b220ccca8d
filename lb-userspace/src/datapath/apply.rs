//! `apply`: the only writer of the maps lbd fills. It makes them hold a `Fill` exactly, writing
//! only what differs from its shadow, in an order no packet can see half-made; the writers it
//! uses (one per map) keep the shadow in step.

use std::collections::BTreeMap;

use aya::maps::{IterableMap as _, MapData};
use lb_common::{
    Backend, Config, FragKey, LAYOUT_VERSION, MAX_FILTER_PREFIXES, ServiceEntry, ServiceIndexEntry,
    ServiceKey, ServiceValue, VipKey, maps,
};
use log::{info, warn};

use super::{
    Datapath, Start,
    error::{DatapathError, Result, error_chain, io_err, is_not_found, map_err},
    fill::{Fill, FilterEntry},
    pins::maps_dir,
    sys::{ArrayMemory, map_delete},
};

impl Datapath {
    /// `CONFIG` for this program and connection table, with the hash seed `hash_key`; sync
    /// events off (the daemon turns them on with `[daemon.sync]`), the default protection
    /// (`Protection`).
    pub fn config_for(&self, hash_key: [u64; 2]) -> Result<Config> {
        let mut config = Config {
            hash_key,
            program_hash: self.program_hash,
            layout_version: LAYOUT_VERSION,
            flow_set_mask: self.conntrack_sets()? - 1,
            sync_events: 0,
            eviction: Default::default(),
            new_flow_interval_ns: 0,
            trace: 0,
            trace_session: 0,
        };
        super::Protection::default().write_into(&mut config);
        Ok(config)
    }

    /// Makes the maps hold exactly `want`, writing only what differs, in an order that never
    /// lets a packet find a half-made change: new redirect targets first; keys that go before
    /// anything they name; fragments of ids that change hands forgotten; backend entries
    /// (down ones flagged) before the tables that name them; tables before the keys that lead
    /// to them; the VIP filter's bits and new client filter prefixes before new keys and the
    /// service flags that make the program read them; what nothing names any more last (a
    /// list that changes is, for an instant, the union of old and new).
    pub fn apply(&mut self, want: &Fill) -> Result<()> {
        if self.shadow.config != want.config {
            self.write_config(want.config)?;
        }
        for (&ifindex, &target) in &want.devmap {
            if self.shadow.devmap.get(&ifindex) != Some(&target)
                && let Err(e) = self.write_egress(ifindex)
            {
                // The interface went meanwhile (its backends follow once their hops are
                // resolved again): only the redirects to it fail, and they are counted.
                warn!("{e}; retried at the next change");
            }
        }
        let gone: Vec<ServiceKey> = absent(self.shadow.services.keys(), |k| {
            want.services.contains_key(k)
        });
        for key in &gone {
            self.remove_service_key(key)?;
        }
        let gone: Vec<VipKey> = absent(self.shadow.vips.keys(), |k| want.vips.contains_key(k));
        for key in &gone {
            match self.maps.vips.remove(key) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err("removing a VIP from VIPS")(e)),
            }
            self.shadow.vips.remove(key);
        }
        self.forget_stale_fragments(want)?;
        for (&id, b) in &want.backends {
            if self.shadow.backends.get(&id) != Some(b) {
                self.write_backend(id, b)?;
            }
        }
        let mut installed = vec![];
        for (&id, table) in &want.maglev {
            let key = want
                .service_by_id
                .get(&id)
                .map_or_else(ServiceKey::default, |e| e.key);
            let same_service = self.slots.get(&id).is_some_and(|s| s.key == key);
            if self.shadow.maglev.get(&id) != Some(table) || !same_service {
                self.install_table(id, &key, table.clone())?;
                installed.push((id, table.len() as u32));
            }
        }
        if self.shadow.vip_filter != want.vip_filter {
            self.write_vip_filter(&want.vip_filter)?;
        }
        if self.shadow.nat_filter != want.nat_filter {
            self.write_nat_filter(&want.nat_filter)?;
        }
        self.add_filters(want)?;
        for (&id, e) in &want.service_by_id {
            if self.shadow.service_by_id.get(&id) != Some(e) {
                self.write_service_by_id(id, *e)?;
            }
        }
        for (k, v) in &want.services {
            if self.shadow.services.get(k) != Some(v) {
                self.write_service_key(k, v)?;
            }
        }
        self.drop_stale_tables(&installed)?;
        for (k, v) in &want.vips {
            if self.shadow.vips.get(k) != Some(v) {
                self.maps
                    .vips
                    .insert(k, v, 0)
                    .map_err(map_err("writing VIPS"))?;
                self.shadow.vips.insert(*k, *v);
            }
        }
        // What nothing names any more.
        let ids: Vec<u32> = absent(self.shadow.service_by_id.keys(), |k| {
            want.service_by_id.contains_key(k)
        });
        for id in ids {
            self.write_service_by_id(id, ServiceEntry::default())?;
        }
        let ids: Vec<u32> = absent(self.shadow.maglev.keys(), |k| want.maglev.contains_key(k));
        for id in ids {
            self.delete_table(id)?;
        }
        let ids: Vec<u32> = absent(self.shadow.backends.keys(), |k| {
            want.backends.contains_key(k)
        });
        for id in ids {
            self.write_backend(id, &Backend::default())?;
        }
        self.remove_filters(want)?;
        let ids: Vec<u32> = absent(self.shadow.devmap.keys(), |k| want.devmap.contains_key(k));
        for ifindex in ids {
            match self.maps.devmap.remove(ifindex) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    return Err(map_err(format!("removing interface {ifindex} from DEVMAP"))(e));
                }
            }
            self.shadow.devmap.remove(&ifindex);
        }
        Ok(())
    }

    /// Writes the client filter prefixes of `want` that `FILTERS` lacks. Should old and new
    /// not fit the map together, the old ones go first (the lists then briefly lack them).
    pub(super) fn add_filters(&mut self, want: &Fill) -> Result<()> {
        let new: Vec<FilterEntry> = want
            .filters
            .difference(&self.shadow.filters)
            .copied()
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        if self.shadow.filters.len() + new.len() > MAX_FILTER_PREFIXES as usize {
            warn!(
                "{} new client filter prefixes do not fit beside the {} in place: removing the old ones first",
                new.len(),
                self.shadow.filters.len()
            );
            self.remove_filters(want)?;
        }
        for e in &new {
            self.maps
                .filters
                .insert(&e.key(), 1, 0)
                .map_err(map_err(format!(
                    "writing a client filter prefix of service {} to FILTERS",
                    e.data.service
                )))?;
            self.shadow.filters.insert(*e);
        }
        Ok(())
    }

    /// Removes the client filter prefixes `want` does not have.
    pub(super) fn remove_filters(&mut self, want: &Fill) -> Result<()> {
        let gone: Vec<FilterEntry> = self
            .shadow
            .filters
            .difference(&want.filters)
            .copied()
            .collect();
        for e in &gone {
            match self.maps.filters.remove(&e.key()) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err("removing a client filter prefix from FILTERS")(e)),
            }
            self.shadow.filters.remove(e);
        }
        Ok(())
    }

    /// Removes the `FRAGS` entries that would send a datagram's later fragments where its
    /// first fragment did not go: those of a service or backend id whose entry is gone, new or
    /// changes meaning with `want` (a removed service's id reused, a service whose flags
    /// change, a backend id given to another backend). Scans `FRAGS` only when some id comes,
    /// goes or changes (and once after the maps were opened).
    fn forget_stale_fragments(&mut self, want: &Fill) -> Result<()> {
        let same_backend = |a: &Backend, b: &Backend| {
            a.addr == b.addr && a.service == b.service && a.family == b.family
        };
        let backends_change = |a: &BTreeMap<u32, Backend>, b: &BTreeMap<u32, Backend>| {
            a.iter()
                .any(|(id, x)| !b.get(id).is_some_and(|y| same_backend(x, y)))
        };
        let ids_change = self.shadow.service_by_id != want.service_by_id
            || backends_change(&self.shadow.backends, &want.backends)
            || backends_change(&want.backends, &self.shadow.backends);
        if self.frags_checked && !ids_change {
            return Ok(());
        }
        let stale: Vec<FragKey> = self
            .maps
            .frags
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, v)| {
                let sid = v.service.id;
                let service_stays = match (
                    self.shadow.service_by_id.get(&sid),
                    want.service_by_id.get(&sid),
                ) {
                    (Some(now), Some(next)) => {
                        now == next
                            && next.value == v.service
                            && next.key.addr == k.dst
                            && next.key.proto == k.proto
                            && next.key.family == k.family
                    }
                    _ => false,
                };
                let backend_stays = match (
                    self.shadow.backends.get(&v.backend),
                    want.backends.get(&v.backend),
                ) {
                    (Some(now), Some(next)) => same_backend(now, next) && next.service == sid,
                    _ => false,
                };
                !(service_stays && backend_stays)
            })
            .map(|(k, _)| k)
            .collect();
        for k in &stale {
            match self.maps.frags.remove(k) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err("removing a stale FRAGS entry")(e)),
            }
        }
        if !stale.is_empty() {
            info!(
                "forgot {} fragment entries of services or backends that changed",
                stale.len()
            );
        }
        self.frags_checked = true;
        Ok(())
    }

    /// Writes `CONFIG`: the hash seed, this program's fingerprint, the connection table's
    /// mask.
    ///
    /// When upgrading, the old program keeps running on these maps (and on its own connection
    /// table, which may be smaller than the new one) until `attach` swaps the new one in. Until
    /// then `CONFIG` holds the smaller of the two masks, so neither program indexes its table
    /// past its end (the old one would pass such flows up unbalanced), and the old program's
    /// fingerprint, so an lbd that dies before the swap is followed by one that upgrades
    /// again rather than adopting the old program as its own. `finish_start` writes the rest.
    pub(super) fn write_config(&mut self, value: Config) -> Result<()> {
        let now = match self.maps.config.get(&0, 0) {
            Ok(running) if self.start == Start::Upgraded && self.attachments.is_empty() => {
                self.pending_config = Some(value);
                Config {
                    program_hash: running.program_hash,
                    flow_set_mask: value.flow_set_mask.min(running.flow_set_mask),
                    ..value
                }
            }
            _ => {
                self.pending_config = None;
                value
            }
        };
        self.maps
            .config
            .set(0, now, 0)
            .map_err(map_err("writing CONFIG"))?;
        self.shadow.config = now;
        Ok(())
    }

    pub(super) fn write_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.maps
            .backends
            .set(id, backend, 0)
            .map_err(map_err(format!("writing backend {id}")))?;
        // Which records may keep their flows changed: a scan from before is not used.
        self.slot_generation += 1;
        if *backend == Backend::default() {
            self.shadow.backends.remove(&id);
        } else {
            self.shadow.backends.insert(id, *backend);
        }
        Ok(())
    }

    /// Writes a service key: into `SERVICES`, then its copy in `SERVICE_INDEX`.
    pub(super) fn write_service_key(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
    ) -> Result<()> {
        self.maps
            .services
            .insert(key, value, 0)
            .map_err(map_err(format!("writing service {}", value.id)))?;
        self.shadow.services.insert(*key, *value);
        self.write_service_index()
    }

    /// Removes a service key: from `SERVICE_INDEX` first (the program then asks `SERVICES`),
    /// then from `SERVICES`.
    pub(super) fn remove_service_key(&mut self, key: &ServiceKey) -> Result<()> {
        let value = self.shadow.services.remove(key);
        self.write_service_index()?;
        match self.maps.services.remove(key) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                if let Some(v) = value {
                    self.shadow.services.insert(*key, v);
                }
                return Err(map_err("removing a service")(e));
            }
        }
        Ok(())
    }

    /// Makes `SERVICE_INDEX` the index of the services in the shadow, rewriting in place only
    /// the entries that differ: each one's check first to a value no entry has, then its
    /// fields, then its check, so a packet that reads it meanwhile sees it invalid and asks
    /// `SERVICES` (`lb_common::ServiceIndexEntry`).
    fn write_service_index(&mut self) -> Result<()> {
        let want = lb_common::service_index(self.shadow.services.iter());
        let memory = ArrayMemory::map(
            self.maps.service_index.map(),
            want.len() * size_of::<ServiceIndexEntry>(),
            true,
        )
        .map_err(io_err("mapping SERVICE_INDEX"))?;
        let check_at = std::mem::offset_of!(ServiceIndexEntry, check);
        for (i, e) in want.iter().enumerate() {
            if memory.read::<ServiceIndexEntry>(i) == *e {
                continue;
            }
            let at = i * size_of::<ServiceIndexEntry>();
            memory.write_at(at + check_at, lb_common::SERVICE_INDEX_REWRITING);
            memory.write_at(
                at,
                ServiceIndexEntry {
                    check: lb_common::SERVICE_INDEX_REWRITING,
                    ..*e
                },
            );
            memory.write_at(at + check_at, e.check);
        }
        Ok(())
    }

    pub(super) fn write_service_by_id(&mut self, id: u32, entry: ServiceEntry) -> Result<()> {
        self.maps
            .service_by_id
            .set(id, entry, 0)
            .map_err(map_err(format!("writing service {id} by id")))?;
        if entry == ServiceEntry::default() {
            self.shadow.service_by_id.remove(&id);
        } else {
            self.shadow.service_by_id.insert(id, entry);
        }
        Ok(())
    }

    /// Writes `VIP_FILTER` through the array's memory, a word at a time (the program reads
    /// whole aligned words): a word changes once, from its old bits to its new ones.
    pub(super) fn write_vip_filter(&mut self, words: &[u64]) -> Result<()> {
        let memory = ArrayMemory::map(self.maps.vip_filter.map(), words.len() * 8, true)
            .map_err(io_err("mapping VIP_FILTER"))?;
        for (i, w) in words.iter().enumerate() {
            // The program reads whole aligned words: each changes once, old bits to new.
            if memory.read::<u64>(i) != *w {
                memory.write(i, *w);
            }
        }
        self.shadow.vip_filter = words.to_vec();
        Ok(())
    }

    /// Writes `NAT_FILTER` (as `write_vip_filter`).
    pub(super) fn write_nat_filter(&mut self, words: &[u64]) -> Result<()> {
        let memory = ArrayMemory::map(self.maps.nat_filter.map(), words.len() * 8, true)
            .map_err(io_err("mapping NAT_FILTER"))?;
        for (i, w) in words.iter().enumerate() {
            if memory.read::<u64>(i) != *w {
                memory.write(i, *w);
            }
        }
        self.shadow.nat_filter = words.to_vec();
        Ok(())
    }

    /// Empties the Maglev slots (in both arrays of maps) of a service id that has no service
    /// any more.
    fn delete_table(&mut self, id: u32) -> Result<()> {
        for outer in [maps::MAGLEV, maps::MAGLEV_DEFAULT] {
            self.delete_inner(outer, id)?;
        }
        self.shadow.maglev.remove(&id);
        self.forget_slots(id);
        Ok(())
    }

    /// Removes, once the services' sizes are written, the old table of each service whose
    /// table was just installed (`installed`: id and size) from the array of maps its size no
    /// longer uses: its size changed between the default and another (`install_table`).
    pub(super) fn drop_stale_tables(&mut self, installed: &[(u32, u32)]) -> Result<()> {
        for &(id, size) in installed {
            let stale = if lb_common::in_default_tables(size) {
                maps::MAGLEV
            } else {
                maps::MAGLEV_DEFAULT
            };
            self.delete_inner(stale, id)?;
        }
        Ok(())
    }

    /// Empties slot `id` of the array of maps `outer` (nothing to do when it is empty).
    fn delete_inner(&self, outer: &str, id: u32) -> Result<()> {
        // aya's ArrayOfMaps lends out no descriptor: the pin gives one.
        let pin = maps_dir(&self.bpffs_dir).join(outer);
        let map = MapData::from_pin(&pin)
            .map_err(map_err(format!("opening the pinned map {}", pin.display())))?;
        match map_delete(&map, id) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(io_err(format!(
                "removing the Maglev table of service {id} from {outer}"
            ))(e)),
        }
    }

    /// Makes `ifindex` a redirect target (a backend reached through another interface).
    pub(super) fn write_egress(&mut self, ifindex: u32) -> Result<()> {
        self.maps
            .devmap
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| {
                DatapathError::Other(format!(
                    "adding interface {ifindex} to DEVMAP: {}",
                    error_chain(&e)
                ))
            })?;
        self.shadow.devmap.insert(ifindex, ifindex);
        Ok(())
    }
}

/// The keys of `have` that `keep` does not keep (what `apply` removes).
fn absent<'a, K: Copy + 'a>(
    have: impl Iterator<Item = &'a K>,
    keep: impl Fn(&K) -> bool,
) -> Vec<K> {
    have.filter(|k| !keep(k)).copied().collect()
}
