//! The decapsulation program and its maps: where they are pinned, loading the program on them,
//! and reading and filling the maps.

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, IterableMap as _, LpmTrie, MapData, PerCpuArray},
    programs::Xdp,
};
use lb_common::decap::{
    ADDRS, ALLOW, AddrKey, AllowData, LAYOUT_VERSION, MAX_ADDRS, MAX_ALLOW, PROGRAM_NAME, STATS,
    Stat,
};

use super::{
    DECAP_OBJECT,
    cidr::{Cidr, addr_key, key_addr},
};
use crate::datapath;

/// Where the address map of `interface` is pinned.
pub fn addrs_pin(bpffs_dir: &Path, interface: &str) -> PathBuf {
    map_pin(bpffs_dir, "addrs", interface)
}

/// Where the map of allowed sources of `interface` is pinned.
pub fn allow_pin(bpffs_dir: &Path, interface: &str) -> PathBuf {
    map_pin(bpffs_dir, "allow", interface)
}

/// Where the packet counters of `interface` are pinned.
pub fn stats_pin(bpffs_dir: &Path, interface: &str) -> PathBuf {
    map_pin(bpffs_dir, "stats", interface)
}

pub(super) const MAP_KINDS: [&str; 3] = ["addrs", "allow", "stats"];

pub(super) fn map_pin(bpffs_dir: &Path, kind: &str, interface: &str) -> PathBuf {
    bpffs_dir.join(format!("{kind}_v{LAYOUT_VERSION}_{interface}"))
}

/// The map pins of `interface` under `bpffs_dir`, of any layout (`<kind>_v<N>_<interface>`).
pub(super) fn map_pins_of_any_layout(bpffs_dir: &Path, interface: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(bpffs_dir) else {
        return vec![];
    };
    let mut pins: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            MAP_KINDS.iter().any(|kind| {
                name.strip_prefix(kind)
                    .and_then(|r| r.strip_prefix("_v"))
                    .and_then(|r| r.split_once('_'))
                    .is_some_and(|(n, iface)| {
                        !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && iface == interface
                    })
            })
        })
        .map(|e| e.path())
        .collect();
    pins.sort();
    pins
}

/// What `want` has that `have` lacks, and what `have` has that `want` lacks.
fn differences<T: PartialEq + Copy>(have: &[T], want: &[T]) -> (Vec<T>, Vec<T>) {
    let added = want.iter().filter(|x| !have.contains(x)).copied().collect();
    let removed = have.iter().filter(|x| !want.contains(x)).copied().collect();
    (added, removed)
}

/// The decapsulation program's maps.
pub(super) struct Maps {
    addrs: HashMap<MapData, AddrKey, u8>,
    allow: LpmTrie<MapData, AllowData, u8>,
    stats: PerCpuArray<MapData, u64>,
}

impl Maps {
    fn build(mut get: impl FnMut(&str) -> Result<aya::maps::Map>) -> Result<Maps> {
        Ok(Maps {
            addrs: HashMap::try_from(get(ADDRS)?).context("opening the address map")?,
            allow: LpmTrie::try_from(get(ALLOW)?).context("opening the map of allowed sources")?,
            stats: PerCpuArray::try_from(get(STATS)?).context("opening the packet counters")?,
        })
    }

    /// The maps of `interface` as pinned under `bpffs_dir` (for `--status`).
    pub(super) fn from_pins(bpffs_dir: &Path, interface: &str) -> Result<Maps> {
        Maps::build(|name| {
            let pin = match name {
                ADDRS => addrs_pin(bpffs_dir, interface),
                ALLOW => allow_pin(bpffs_dir, interface),
                _ => stats_pin(bpffs_dir, interface),
            };
            let data = MapData::from_pin(&pin)
                .with_context(|| format!("opening the pinned map {}", pin.display()))?;
            Ok(aya::maps::Map::from_map_data(data)?)
        })
    }

    /// The addresses in the map with `flag` (`addr_flags`).
    pub(super) fn addrs_with(&self, flag: u8) -> Vec<IpAddr> {
        self.addrs()
            .into_iter()
            .filter(|(_, f)| f & flag != 0)
            .map(|(a, _)| a)
            .collect()
    }

    /// Every address in the map, with its flags.
    pub(super) fn addrs(&self) -> Vec<(IpAddr, u8)> {
        let mut v: Vec<(IpAddr, u8)> = self
            .addrs
            .iter()
            .filter_map(|r| r.ok())
            .filter_map(|(k, f)| Some((key_addr(&k)?, f)))
            .collect();
        v.sort();
        v
    }

    pub(super) fn allowed(&self) -> Vec<Cidr> {
        let mut v: Vec<Cidr> = self
            .allow
            .keys()
            .filter_map(|k| k.ok())
            .filter_map(|k| Cidr::of_key(&k))
            .collect();
        v.sort();
        v
    }

    pub(super) fn stats(&self) -> Vec<(Stat, u64)> {
        Stat::ALL
            .iter()
            .map(|&s| (s, datapath::per_cpu_total(&self.stats, s as u32)))
            .collect()
    }
}

/// The decapsulation program, loaded (verified) but not attached, and its maps.
pub struct Decap {
    ebpf: Ebpf,
    pub(super) maps: Maps,
}

impl Decap {
    /// Loads the program with the maps of `interface` pinned under `bpffs_dir`: existing pins
    /// are reused, else the maps are created and pinned there (the folder must be on a bpffs).
    pub fn load(bpffs_dir: &Path, interface: &str) -> Result<Decap> {
        if DECAP_OBJECT.is_empty() {
            bail!(
                "this lbd was built without its decapsulation program (AYA_BUILD_SKIP was set): rebuild it normally"
            );
        }
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(ADDRS, addrs_pin(bpffs_dir, interface))
            .map_pin_path(ALLOW, allow_pin(bpffs_dir, interface))
            .map_pin_path(STATS, stats_pin(bpffs_dir, interface))
            .load(DECAP_OBJECT)
            .context("loading the decapsulation program")?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| anyhow!("program {PROGRAM_NAME} missing from the object"))?
            .try_into()
            .context("the decapsulation program is not XDP")?;
        program
            .load()
            .context("verifying and loading the decapsulation program")?;
        let maps = Maps::build(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))
        })?;
        Ok(Decap { ebpf, maps })
    }

    fn program(&self) -> &Xdp {
        self.ebpf
            .program(PROGRAM_NAME)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("checked at load")
    }

    pub(super) fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .expect("checked at load")
    }

    /// The kernel's id and tag (a hash of the instructions, the same for every load of the same
    /// object) of the loaded program.
    pub fn program_id_and_tag(&self) -> Result<(u32, u64)> {
        let info = self.program().info().context("reading program info")?;
        Ok((info.id(), info.tag()))
    }

    /// The kernel's ids of the program's maps.
    pub(super) fn map_ids(&self) -> Result<Vec<u32>> {
        let id =
            |m: &MapData| -> Result<u32> { Ok(m.info().context("reading a map's info")?.id()) };
        Ok(vec![
            id(self.maps.addrs.map())?,
            id(self.maps.allow.map())?,
            id(self.maps.stats.map())?,
        ])
    }

    /// The addresses in the map, with their flags (`addr_flags`).
    pub fn addrs(&self) -> Vec<(IpAddr, u8)> {
        self.maps.addrs()
    }

    /// The allowed source prefixes.
    pub fn allowed(&self) -> Vec<Cidr> {
        self.maps.allowed()
    }

    /// The packet counters, summed over the CPUs.
    pub fn stats(&self) -> Vec<(Stat, u64)> {
        self.maps.stats()
    }

    /// Makes the address map hold exactly `addrs` (with their flags): returns the addresses
    /// added (or whose flags changed) and those removed.
    pub fn set_addrs(&mut self, addrs: &[(IpAddr, u8)]) -> Result<(Vec<IpAddr>, Vec<IpAddr>)> {
        if addrs.len() > MAX_ADDRS as usize {
            bail!(
                "{} addresses: the decapsulation map holds at most {MAX_ADDRS}",
                addrs.len()
            );
        }
        let (added, removed) = differences(&self.addrs(), addrs);
        // New ones first: an address that stays is never missing.
        for (a, flags) in &added {
            self.maps
                .addrs
                .insert(addr_key(*a), flags, 0)
                .with_context(|| format!("adding {a} to the address map"))?;
        }
        // An address whose flags changed was just written over: not removed.
        let removed: Vec<IpAddr> = removed
            .into_iter()
            .map(|(a, _)| a)
            .filter(|a| !addrs.iter().any(|(b, _)| b == a))
            .collect();
        for a in &removed {
            self.maps
                .addrs
                .remove(&addr_key(*a))
                .with_context(|| format!("removing {a} from the address map"))?;
        }
        Ok((added.into_iter().map(|(a, _)| a).collect(), removed))
    }

    /// Makes the allowed sources exactly `allow` (new ones first): returns what was added and
    /// what removed.
    pub fn set_allowed(&mut self, allow: &[Cidr]) -> Result<(Vec<Cidr>, Vec<Cidr>)> {
        if allow.len() > MAX_ALLOW as usize {
            bail!(
                "{} prefixes given with --allow: at most {MAX_ALLOW}",
                allow.len()
            );
        }
        let (added, removed) = differences(&self.allowed(), allow);
        for c in &added {
            self.maps
                .allow
                .insert(&c.key(), 1, 0)
                .with_context(|| format!("adding {c} to the allowed sources"))?;
        }
        for c in &removed {
            self.maps
                .allow
                .remove(&c.key())
                .with_context(|| format!("removing {c} from the allowed sources"))?;
        }
        Ok((added, removed))
    }

    #[cfg(any(test, feature = "test-hooks"))]
    /// Runs the loaded program once on `frame` (BPF_PROG_TEST_RUN): the XDP action and the
    /// frame as the program left it.
    pub fn test_run(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let mut out = vec![0u8; frame.len() + 64];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let result = self.program().test_run(opts).context("BPF_PROG_TEST_RUN")?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }
}
