//! What lbd writes into the maps, as one value (`Fill`), read back from the maps and compared.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    sync::Arc,
};

use aya::maps::{Array, IterableMap as _, MapData, lpm_trie::Key};
use lb_common::{
    Backend, Config, FILTER_HEAD_BITS, FilterData, MAX_BACKENDS, MAX_SERVICES, ServiceEntry,
    ServiceKey, ServiceValue, VIP_FILTER_WORDS, VipKey, filter_prefix_len, maps, vip_filter_bits,
};

use super::{
    error::{Result, io_err, map_err},
    maps::Maps,
    sys::read_mmapable_array,
};

/// What lbd writes into the maps: every map but the counters, the connection table and `FRAGS`
/// (which the program fills). The daemon computes it from its runtime state with one function,
/// at start and after every change; [`Datapath::apply`](super::Datapath::apply) makes the maps hold exactly it, and
/// `Fill::read_pinned` (tests) reads it back (to compare a running lbd's maps with a fresh fill).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fill {
    pub config: Config,
    pub services: StdHashMap<ServiceKey, ServiceValue>,
    /// The entries of `SERVICE_BY_ID` in use (the others are all zero).
    pub service_by_id: BTreeMap<u32, ServiceEntry>,
    /// `VIP_FILTER`'s words: the bits of every key of `services` (see [`vip_filter_words`]).
    pub vip_filter: Vec<u64>,
    /// Each service's Maglev table (a backend id or `NO_BACKEND` per slot); an id without a
    /// service has no table at all. Its array also holds the slots' state
    /// (`lb_common::slotstate`), which `Datapath` keeps besides the fill.
    pub maglev: BTreeMap<u32, Arc<[u32]>>,
    /// The entries of `BACKENDS` in use (the others are all zero).
    pub backends: BTreeMap<u32, Backend>,
    pub vips: StdHashMap<VipKey, ServiceValue>,
    /// `NAT_FILTER`'s words: the bits of every `nat` backend's address.
    pub nat_filter: Vec<u64>,
    /// `DEVMAP`: ifindex → the interface it redirects to (itself).
    pub devmap: BTreeMap<u32, u32>,
    /// `FILTERS`: every service's client filter prefixes (see [`FilterEntry`]).
    pub filters: BTreeSet<FilterEntry>,
}

/// One prefix of a service's `allow` or `deny` list: the key's data (service id, list, the
/// prefix's address) and the prefix's length in bits of the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FilterEntry {
    pub data: FilterData,
    pub len: u8,
}

impl FilterEntry {
    /// Its key in `FILTERS`.
    pub(super) fn key(&self) -> Key<FilterData> {
        Key::new(filter_prefix_len(u32::from(self.len)), self.data)
    }

    /// The entry of a key found in `FILTERS` (None for one lbd never writes).
    pub(super) fn of_key(key: &Key<FilterData>) -> Option<FilterEntry> {
        let len = key.prefix_len().checked_sub(FILTER_HEAD_BITS)?;
        Some(FilterEntry {
            data: key.data(),
            len: u8::try_from(len).ok().filter(|l| *l <= 128)?,
        })
    }
}

/// `VIP_FILTER`'s words for `keys`: the two bits of each key's address.
pub fn vip_filter_words<'a>(keys: impl IntoIterator<Item = &'a ServiceKey>) -> Vec<u64> {
    let mut words = vec![0u64; VIP_FILTER_WORDS as usize];
    for key in keys {
        for bit in vip_filter_bits(&key.addr) {
            words[(bit >> 6) as usize] |= 1 << (bit & 63);
        }
    }
    words
}

/// `NAT_FILTER`'s words for `addrs` (bits as `VIP_FILTER`'s).
pub fn address_filter_words(addrs: impl IntoIterator<Item = lb_common::Addr>) -> Vec<u64> {
    let mut words = vec![0u64; lb_common::nat::NAT_FILTER_WORDS as usize];
    for addr in addrs {
        for bit in vip_filter_bits(&addr) {
            words[(bit >> 6) as usize] |= 1 << (bit & 63);
        }
    }
    words
}

/// A service's Maglev array as found in the pinned maps: the words of both halves.
pub(super) struct PinnedTable {
    pub id: u32,
    pub key: ServiceKey,
    pub table_size: u32,
    pub words: Arc<[u64]>,
    pub inner: Array<MapData, u64>,
}

impl Fill {
    /// What the maps hold now, the Maglev tables (`maglev`) left out: they come back as the
    /// arrays found, whose slot state `Datapath` adopts.
    pub(super) fn read(maps: &Maps) -> Result<(Fill, Vec<PinnedTable>)> {
        let config = maps.config.get(&0, 0).map_err(map_err("reading CONFIG"))?;
        let services = maps
            .services
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err("reading SERVICES"))?;
        let service_by_id: BTreeMap<u32, ServiceEntry> =
            used_entries(&maps.service_by_id, MAX_SERVICES, maps::SERVICE_BY_ID)?;
        let mut tables = vec![];
        for (&id, entry) in &service_by_id {
            match maps.tables_for(entry.value.table_size).get(&id, 0) {
                Ok(inner) => {
                    let what = || format!("reading the Maglev table of service {id}");
                    let len = inner.map().info().map_err(map_err(what()))?.max_entries() as usize;
                    tables.push(PinnedTable {
                        id,
                        key: entry.key,
                        table_size: entry.value.table_size,
                        words: read_mmapable_array(inner.map(), len).map_err(io_err(what()))?,
                        inner,
                    });
                }
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => {
                    return Err(map_err(format!("reading the Maglev table of service {id}"))(e));
                }
            }
        }
        let vip_filter = read_mmapable_array(maps.vip_filter.map(), VIP_FILTER_WORDS as usize)
            .map_err(io_err("reading VIP_FILTER"))?
            .to_vec();
        let nat_filter = read_mmapable_array(
            maps.nat_filter.map(),
            lb_common::nat::NAT_FILTER_WORDS as usize,
        )
        .map_err(io_err("reading NAT_FILTER"))?
        .to_vec();
        let backends = used_entries(&maps.backends, MAX_BACKENDS, maps::BACKENDS)?;
        let vips = maps
            .vips
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err("reading VIPS"))?;
        let devmap = maps
            .devmap
            .iter()
            .map(|r| r.map(|(k, v)| (k, v.if_index)))
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err("reading DEVMAP"))?;
        let filters = maps
            .filters
            .keys()
            .map(|k| k.map(|k| FilterEntry::of_key(&k)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(map_err("reading FILTERS"))?
            .into_iter()
            .flatten()
            .collect();
        let fill = Fill {
            config,
            services,
            service_by_id,
            vip_filter,
            nat_filter,
            maglev: BTreeMap::new(),
            backends,
            vips,
            devmap,
            filters,
        };
        Ok((fill, tables))
    }

    #[cfg(any(test, feature = "test-hooks"))]
    /// Where `self` and `other` differ, entry by entry, for messages ("SERVICES key …: …").
    pub fn diff(&self, other: &Fill) -> Vec<String> {
        let mut out = vec![];
        // One map seen through `view` in both fills, as (key, value) pairs.
        let mut map = |name: &str, view: &dyn Fn(&Fill) -> Vec<(String, String)>| {
            let (mut a, mut b) = (view(self), view(other));
            a.sort();
            b.sort();
            for (k, v) in &a {
                match b.iter().find(|(bk, _)| bk == k) {
                    None => out.push(format!("{name} {k}: {v} / missing")),
                    Some((_, w)) if w != v => out.push(format!("{name} {k}: {v} / {w}")),
                    _ => {}
                }
            }
            for (k, w) in &b {
                if !a.iter().any(|(ak, _)| ak == k) {
                    out.push(format!("{name} {k}: missing / {w}"));
                }
            }
        };
        fn shown<K: std::fmt::Debug, V: std::fmt::Debug>(
            pairs: impl Iterator<Item = (K, V)>,
        ) -> Vec<(String, String)> {
            pairs
                .map(|(k, v)| (format!("{k:?}"), format!("{v:?}")))
                .collect()
        }
        map("CONFIG", &|f| shown([(0, f.config)].into_iter()));
        map("SERVICES", &|f| {
            shown(
                f.services
                    .iter()
                    .map(|(k, v)| ((k.addr, u16::from_be(k.port), k.proto), v)),
            )
        });
        map("SERVICE_BY_ID", &|f| shown(f.service_by_id.iter()));
        map("VIP_FILTER", &|f| {
            shown(f.vip_filter.iter().enumerate().filter(|(_, w)| **w != 0))
        });
        map("NAT_FILTER", &|f| {
            shown(f.nat_filter.iter().enumerate().filter(|(_, w)| **w != 0))
        });
        map("MAGLEV", &|f| {
            shown(f.maglev.iter().map(|(id, w)| (id, TableSummary(w.clone()))))
        });
        map("BACKENDS", &|f| shown(f.backends.iter()));
        map("VIPS", &|f| {
            shown(f.vips.iter().map(|(k, v)| ((k.addr, k.proto), v)))
        });
        map("DEVMAP", &|f| shown(f.devmap.iter()));
        map("FILTERS", &|f| shown(f.filters.iter().map(|e| (e, 1))));
        out
    }
}

/// The entries of array `map` (of `len` entries) that are not all zero, by index.
fn used_entries<V: aya::Pod + Default + PartialEq>(
    map: &Array<MapData, V>,
    len: u32,
    name: &str,
) -> Result<BTreeMap<u32, V>> {
    let mut used = BTreeMap::new();
    for i in 0..len {
        let v = map
            .get(&i, 0)
            .map_err(map_err(format!("reading {name}[{i}]")))?;
        if v != V::default() {
            used.insert(i, v);
        }
    }
    Ok(used)
}

#[cfg(any(test, feature = "test-hooks"))]
/// A Maglev table in a diff: compared whole, shown by its size and a checksum.
#[derive(Clone, PartialEq)]
struct TableSummary(Arc<[u32]>);

#[cfg(any(test, feature = "test-hooks"))]
impl std::fmt::Debug for TableSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} words, sum {:x}",
            self.0.len(),
            self.0
                .iter()
                .fold(0u64, |a, &w| a.rotate_left(5) ^ u64::from(w))
        )
    }
}
