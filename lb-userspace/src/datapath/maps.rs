//! Every map of the program, opened from the loaded object or from their pins, and the sums
//! of per-CPU counters.

use std::path::Path;

use aya::{
    Ebpf,
    maps::{Array, ArrayOfMaps, HashMap, IterableMap as _, LpmTrie, MapData, PerCpuArray, RingBuf},
};
use lb_common::{
    Backend, Config, Counter, FilterData, FragKey, FragValue, RecordSet, ServiceEntry,
    ServiceIndexEntry, ServiceKey, ServiceValue, VipKey, maps,
};

use super::error::{DatapathError, Result, map_err};

/// Every map, opened.
pub(super) struct Maps {
    pub(super) services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub(super) service_by_id: Array<MapData, ServiceEntry>,
    pub(super) service_index: Array<MapData, ServiceIndexEntry>,
    pub(super) vip_filter: Array<MapData, u64>,
    pub(super) nat_filter: Array<MapData, u64>,
    /// Maglev tables of any size but the default (`lb_common::in_default_tables`).
    pub(super) maglev: ArrayOfMaps<MapData, Array<MapData, u64>>,
    /// Maglev tables of the default size.
    pub(super) maglev_default: ArrayOfMaps<MapData, Array<MapData, u64>>,
    pub(super) backends: Array<MapData, Backend>,
    pub(super) config: Array<MapData, Config>,
    pub(super) conntrack: Array<MapData, RecordSet>,
    pub(super) frags: HashMap<MapData, FragKey, FragValue>,
    /// `nat` flows' backends (the program writes them; lbd only reads them).
    pub(super) nat_flows: HashMap<MapData, lb_common::FlowKey, lb_common::nat::NatFlow>,
    pub(super) vips: HashMap<MapData, VipKey, ServiceValue>,
    pub(super) devmap: aya::maps::DevMapHash<MapData>,
    pub(super) service_stats: PerCpuArray<MapData, Counter>,
    /// `nat`: each service's replies rewritten and sent on.
    pub(super) service_reply_stats: PerCpuArray<MapData, Counter>,
    pub(super) backend_stats: PerCpuArray<MapData, Counter>,
    pub(super) reason_stats: PerCpuArray<MapData, u64>,
    pub(super) new_flow_stats: PerCpuArray<MapData, u64>,
    pub(super) service_reason_stats: PerCpuArray<MapData, u64>,
    /// The services' client filters (`lb_common::filter`).
    pub(super) filters: LpmTrie<MapData, FilterData, u8>,
    /// The program's reports of the records it writes, until the sync thread takes them
    /// (`Datapath::take_sync_events`).
    pub(super) sync_events: Option<RingBuf<MapData>>,
    /// The packets of a trace, while no trace has them (`Datapath::take_trace_events`).
    pub(super) trace_events: Option<RingBuf<MapData>>,
}

impl Maps {
    /// The array of maps that holds a service's Maglev table of `table_size` slots.
    pub(super) fn tables_for(&self, table_size: u32) -> &ArrayOfMaps<MapData, Array<MapData, u64>> {
        if lb_common::in_default_tables(table_size) {
            &self.maglev_default
        } else {
            &self.maglev
        }
    }

    /// `tables_for`, to write.
    pub(super) fn tables_for_mut(
        &mut self,
        table_size: u32,
    ) -> &mut ArrayOfMaps<MapData, Array<MapData, u64>> {
        if lb_common::in_default_tables(table_size) {
            &mut self.maglev_default
        } else {
            &mut self.maglev
        }
    }

    /// `NAT_FLOWS`' size.
    pub(super) fn nat_flows_size(&self) -> Result<u32> {
        Ok(self
            .nat_flows
            .map()
            .info()
            .map_err(map_err(maps::NAT_FLOWS))?
            .max_entries())
    }

    fn build(mut get: impl FnMut(&str) -> Result<aya::maps::Map>) -> Result<Maps> {
        Ok(Maps {
            services: HashMap::try_from(get(maps::SERVICES)?).map_err(map_err(maps::SERVICES))?,
            service_by_id: Array::try_from(get(maps::SERVICE_BY_ID)?)
                .map_err(map_err(maps::SERVICE_BY_ID))?,
            service_index: Array::try_from(get(maps::SERVICE_INDEX)?)
                .map_err(map_err(maps::SERVICE_INDEX))?,
            vip_filter: Array::try_from(get(maps::VIP_FILTER)?)
                .map_err(map_err(maps::VIP_FILTER))?,
            nat_filter: Array::try_from(get(maps::NAT_FILTER)?)
                .map_err(map_err(maps::NAT_FILTER))?,
            maglev: ArrayOfMaps::try_from(get(maps::MAGLEV)?).map_err(map_err(maps::MAGLEV))?,
            maglev_default: ArrayOfMaps::try_from(get(maps::MAGLEV_DEFAULT)?)
                .map_err(map_err(maps::MAGLEV_DEFAULT))?,
            backends: Array::try_from(get(maps::BACKENDS)?).map_err(map_err(maps::BACKENDS))?,
            config: Array::try_from(get(maps::CONFIG)?).map_err(map_err(maps::CONFIG))?,
            conntrack: Array::try_from(get(maps::CONNTRACK)?).map_err(map_err(maps::CONNTRACK))?,
            frags: HashMap::try_from(get(maps::FRAGS)?).map_err(map_err(maps::FRAGS))?,
            nat_flows: HashMap::try_from(get(maps::NAT_FLOWS)?)
                .map_err(map_err(maps::NAT_FLOWS))?,
            vips: HashMap::try_from(get(maps::VIPS)?).map_err(map_err(maps::VIPS))?,
            devmap: aya::maps::DevMapHash::try_from(get(maps::DEVMAP)?)
                .map_err(map_err(maps::DEVMAP))?,
            service_stats: PerCpuArray::try_from(get(maps::SERVICE_STATS)?)
                .map_err(map_err(maps::SERVICE_STATS))?,
            service_reply_stats: PerCpuArray::try_from(get(maps::SERVICE_REPLY_STATS)?)
                .map_err(map_err(maps::SERVICE_REPLY_STATS))?,
            backend_stats: PerCpuArray::try_from(get(maps::BACKEND_STATS)?)
                .map_err(map_err(maps::BACKEND_STATS))?,
            reason_stats: PerCpuArray::try_from(get(maps::REASON_STATS)?)
                .map_err(map_err(maps::REASON_STATS))?,
            new_flow_stats: PerCpuArray::try_from(get(maps::NEW_FLOW_STATS)?)
                .map_err(map_err(maps::NEW_FLOW_STATS))?,
            service_reason_stats: PerCpuArray::try_from(get(maps::SERVICE_REASON_STATS)?)
                .map_err(map_err(maps::SERVICE_REASON_STATS))?,
            filters: LpmTrie::try_from(get(maps::FILTERS)?).map_err(map_err(maps::FILTERS))?,
            sync_events: Some(
                RingBuf::try_from(get(maps::SYNC_EVENTS)?).map_err(map_err(maps::SYNC_EVENTS))?,
            ),
            trace_events: Some(
                RingBuf::try_from(get(maps::TRACE_EVENTS)?).map_err(map_err(maps::TRACE_EVENTS))?,
            ),
        })
    }

    /// `NAT_FLOWS` of a newly loaded object (`Datapath::grow_nat_tables`).
    pub(super) fn nat_flows_of(
        ebpf: &mut Ebpf,
    ) -> Result<HashMap<MapData, lb_common::FlowKey, lb_common::nat::NatFlow>> {
        let map = ebpf.take_map(maps::NAT_FLOWS).ok_or_else(|| {
            DatapathError::Other(format!("map {} missing from the object", maps::NAT_FLOWS))
        })?;
        HashMap::try_from(map).map_err(map_err(maps::NAT_FLOWS))
    }

    pub(super) fn from_ebpf(ebpf: &mut Ebpf) -> Result<Maps> {
        Maps::build(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| DatapathError::Other(format!("map {name} missing from the object")))
        })
    }

    pub(super) fn from_pins(dir: &Path) -> Result<Maps> {
        Maps::build(|name| {
            let path = dir.join(name);
            let what = format!("opening the pinned map {}", path.display());
            MapData::from_pin(&path)
                .and_then(aya::maps::Map::from_map_data)
                .map_err(map_err(what))
        })
    }
}

/// Element `index` of a per-CPU counter array, summed over the CPUs (0 when unreadable).
pub(crate) fn per_cpu_total(map: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    map.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

pub(super) fn sum_counters(values: Option<aya::maps::PerCpuValues<Counter>>) -> Counter {
    values
        .map(|v| {
            v.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            })
        })
        .unwrap_or_default()
}
