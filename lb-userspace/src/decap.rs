//! `lbd decap`: puts lb's decapsulation program on a backend's interface, for `tunnel`
//! services on hosts without an ipip device. The program strips the outer header of
//! IPv4-in-IPv4 and IPv6-in-IPv6 packets addressed to one of the interface's own addresses,
//! sent from an allowed source (`--allow CIDR`: the balancers) to an inner destination that is
//! an address of this host, and passes everything else untouched, counting the tunnel packets
//! it does not unwrap by why. This module loads it, fills its maps (the host's addresses from
//! netlink, the allowed sources from the command line), attaches it (native XDP, else generic),
//! pins link and maps, reports what is pinned and counted (`--status`), and takes them away
//! again.
//!
//! Pins, under `bpffs_dir` (default `/sys/fs/bpf/lb-decap`):
//! - `link_<interface>`: the program's bpf_link (removing it detaches the program);
//! - `addrs_v<layout>_<interface>`: the host's addresses, the interface's own flagged;
//! - `allow_v<layout>_<interface>`: the allowed outer source prefixes;
//! - `stats_v<layout>_<interface>`: the per-CPU packet counters.
//!
//! Interface names are only unique within a network namespace: hosts that run `lbd decap` in
//! several namespaces give each namespace its own `--bpffs-dir`.
//!
//! Running it again changes nothing when the pinned link is still the one on the interface and
//! runs this very program: only the address map is brought up to date (so re-running it after
//! an address change is how the map follows the host), and the allowed sources when `--allow`
//! is given. A different build of the program is swapped in atomically through the pinned link
//! (pins of an older map layout are removed then); a link whose interface is gone is replaced.
//! While it works, `lbd decap` holds a lock on `bpffs_dir` (see `lock`).

use std::{
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, IterableMap as _, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{
        Xdp,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpMode},
    },
};
use lb_common::{
    FAMILY_V4, FAMILY_V6,
    decap::{
        ADDRS, ALLOW, AddrKey, AllowData, LAYOUT_VERSION, MAX_ADDRS, MAX_ALLOW, PROGRAM_NAME,
        STATS, Stat, addr_flags, allow_prefix_len,
    },
};
use log::{info, warn};

use crate::{
    datapath::{self, LinkFacts, LinkPlace, link_facts},
    lock,
    netlink::{Interface, Netlink},
    state,
};

/// The decapsulation program, built by build.rs from lb-ebpf's `lb-decap` bin and embedded.
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));

/// Where `lbd decap` pins by default.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/lb-decap";

/// Where the link of `interface` is pinned.
pub fn link_pin(bpffs_dir: &Path, interface: &str) -> PathBuf {
    bpffs_dir.join(format!("link_{interface}"))
}

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

const MAP_KINDS: [&str; 3] = ["addrs", "allow", "stats"];

fn map_pin(bpffs_dir: &Path, kind: &str, interface: &str) -> PathBuf {
    bpffs_dir.join(format!("{kind}_v{LAYOUT_VERSION}_{interface}"))
}

/// The map pins of `interface` under `bpffs_dir`, of any layout (`<kind>_v<N>_<interface>`).
fn map_pins_of_any_layout(bpffs_dir: &Path, interface: &str) -> Vec<PathBuf> {
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

/// A prefix of allowed tunnel sources (`--allow`): `192.0.2.0/24`, `2001:db8::/64`, or one
/// address (`/32` or `/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    fn max_len(addr: IpAddr) -> u8 {
        if addr.is_ipv4() { 32 } else { 128 }
    }

    /// The address with the bits past `len` cleared.
    fn network(addr: IpAddr, len: u8) -> IpAddr {
        match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        }
    }

    fn key(&self) -> Key<AllowData> {
        Key::new(
            allow_prefix_len(u32::from(self.len)),
            AllowData {
                family: state::family(self.addr),
                _pad: [0; 3],
                addr: state::to_addr(self.addr),
            },
        )
    }

    fn of_key(key: &Key<AllowData>) -> Option<Cidr> {
        let data = key.data();
        let addr = key_addr(&AddrKey {
            addr: data.addr,
            family: data.family,
            _pad: [0; 3],
        })?;
        let len = key.prefix_len().checked_sub(allow_prefix_len(0))?;
        Some(Cidr {
            addr,
            len: u8::try_from(len).ok()?,
        })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, len) = match s.split_once('/') {
            Some((a, len)) => (a, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| {
            format!("{s:?} is not an address or a prefix such as 192.0.2.0/24 or 2001:db8::/64")
        })?;
        let max = Cidr::max_len(addr);
        let len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        let network = Cidr::network(addr, len);
        if network != addr {
            return Err(format!(
                "{s:?} has bits set past its prefix length: did you mean {network}/{len}?"
            ));
        }
        Ok(Cidr { addr, len })
    }
}

/// The key of `addr` in the address map.
pub fn addr_key(addr: IpAddr) -> AddrKey {
    AddrKey {
        addr: state::to_addr(addr),
        family: state::family(addr),
        _pad: [0; 3],
    }
}

fn key_addr(key: &AddrKey) -> Option<IpAddr> {
    let bytes: Vec<u8> = key.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match key.family {
        FAMILY_V4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        FAMILY_V6 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(bytes).ok()?,
        ))),
        _ => None,
    }
}

/// The decapsulation program's maps.
struct Maps {
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
    fn from_pins(bpffs_dir: &Path, interface: &str) -> Result<Maps> {
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
    fn addrs_with(&self, flag: u8) -> Vec<IpAddr> {
        self.addrs()
            .into_iter()
            .filter(|(_, f)| f & flag != 0)
            .map(|(a, _)| a)
            .collect()
    }

    /// Every address in the map, with its flags.
    fn addrs(&self) -> Vec<(IpAddr, u8)> {
        let mut v: Vec<(IpAddr, u8)> = self
            .addrs
            .iter()
            .filter_map(|r| r.ok())
            .filter_map(|(k, f)| Some((key_addr(&k)?, f)))
            .collect();
        v.sort();
        v
    }

    fn allowed(&self) -> Vec<Cidr> {
        let mut v: Vec<Cidr> = self
            .allow
            .keys()
            .filter_map(|k| k.ok())
            .filter_map(|k| Cidr::of_key(&k))
            .collect();
        v.sort();
        v
    }

    fn stats(&self) -> Vec<(Stat, u64)> {
        Stat::ALL
            .iter()
            .map(|&s| (s, datapath::per_cpu_total(&self.stats, s as u32)))
            .collect()
    }
}

/// The decapsulation program, loaded (verified) but not attached, and its maps.
pub struct Decap {
    ebpf: Ebpf,
    maps: Maps,
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

    fn program_mut(&mut self) -> &mut Xdp {
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
    fn map_ids(&self) -> Result<Vec<u32>> {
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

/// What `install` did to the program on the interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing was attached: attached in this mode ("native" or "generic") and pinned.
    Attached(&'static str),
    /// The pinned link already ran this program on these maps: left as it was.
    Kept,
    /// The pinned link ran another build of the program (or on other maps): replaced
    /// atomically through the link.
    Replaced,
}

/// What `install` found and did.
#[derive(Debug, Clone)]
pub struct Report {
    pub interface: String,
    pub ifindex: u32,
    pub action: Action,
    pub link_id: u32,
    pub program_id: u32,
    /// The interface's own addresses now in the map (tunnel packets to them are unwrapped).
    pub addrs: Vec<IpAddr>,
    /// This host's addresses now in the map (inner packets to them are let in).
    pub host_addrs: Vec<IpAddr>,
    /// The changes made to the address map.
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
    /// The allowed sources now, and the changes made to them.
    pub allowed: Vec<Cidr>,
    pub allow_added: Vec<Cidr>,
    pub allow_removed: Vec<Cidr>,
}

/// The interface as netlink sees it in this network namespace (with the ids of the XDP
/// programs attached to it), and its addresses, sorted.
struct Target {
    iface: Interface,
    addrs: Vec<IpAddr>,
    /// Every address of this host (of every interface, `lo`'s included).
    host_addrs: Vec<IpAddr>,
}

impl Target {
    /// The address map's contents: the host's addresses, the interface's own flagged as such.
    fn map_entries(&self) -> Vec<(IpAddr, u8)> {
        let mut all: Vec<IpAddr> = self.host_addrs.iter().chain(&self.addrs).copied().collect();
        all.sort();
        all.dedup();
        all.into_iter()
            .map(|a| {
                let own = if self.addrs.contains(&a) {
                    addr_flags::OUTER
                } else {
                    0
                };
                (a, own | addr_flags::INNER)
            })
            .collect()
    }
}

async fn look_up(interface: &str) -> Result<Option<Target>> {
    let nl = Netlink::new()?;
    let Some(iface) = nl.interface_by_name(interface).await? else {
        return Ok(None);
    };
    let mut addrs: Vec<IpAddr> = iface.addrs.iter().map(|(a, _)| *a).collect();
    addrs.sort();
    addrs.dedup();
    let mut host_addrs = nl.all_addresses().await?;
    host_addrs.sort();
    host_addrs.dedup();
    Ok(Some(Target {
        iface,
        addrs,
        host_addrs,
    }))
}

fn target(interface: &str) -> Result<Option<Target>> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime for netlink")?
        .block_on(look_up(interface))
}

/// What the pin at `link_pin(.., interface)` holds, if anything.
enum Pinned {
    None,
    /// The link of this interface, whose program is the one on it.
    Working(LinkFacts),
    /// A link whose interface is gone (deleted, or moved to another namespace).
    Defunct,
}

fn inspect_pin(pin: &Path, interface: &str, target: Option<&Target>) -> Result<Pinned> {
    if !pin.exists() {
        return Ok(Pinned::None);
    }
    let facts =
        link_facts(pin).with_context(|| format!("opening the pinned link {}", pin.display()))?;
    if !facts.is_xdp {
        bail!("{} is not an XDP link: remove it by hand", pin.display());
    }
    // Only the interface of that name is known here: a link on any other is not this one's.
    let at_index = target
        .map(|t| &t.iface)
        .filter(|i| i.index == facts.ifindex);
    match LinkPlace::of(&facts, at_index, interface) {
        LinkPlace::Defunct => Ok(Pinned::Defunct),
        LinkPlace::Here => Ok(Pinned::Working(facts)),
        LinkPlace::OtherInterface { .. } | LinkPlace::Foreign => bail!(
            "{} holds link {} attached to another interface (ifindex {}, perhaps in another network namespace), not to {interface} here: give this namespace its own --bpffs-dir",
            pin.display(),
            facts.id,
            facts.ifindex
        ),
    }
}

/// Attaches the decapsulation program to `interface` (native XDP, else generic), fills its
/// maps (this host's addresses, the interface's own flagged; the allowed sources `allow`) and
/// pins link and maps under `bpffs_dir` (mounting a bpffs at /sys/fs/bpf when the folder lies
/// under it and none is there). When the pinned link is already on the interface, only the
/// maps are brought up to date (and a different build of the program swapped in through the
/// link). An empty `allow` keeps the pinned allowed sources; with none pinned it is an error.
pub fn install(interface: &str, bpffs_dir: &Path, allow: &[Cidr]) -> Result<Report> {
    if DECAP_OBJECT.is_empty() {
        bail!(
            "this lbd was built without its decapsulation program (AYA_BUILD_SKIP was set): rebuild it normally"
        );
    }
    let target = target(interface)?
        .ok_or_else(|| anyhow!("no interface {interface} in this network namespace"))?;
    let no_allow = || {
        anyhow!(
            "lbd decap --interface {interface} needs --allow CIDR (repeatable): the addresses lb's balancers send tunnel packets from (their tunnel_source, or the address of the interface the tunnel leaves by), e.g. --allow 192.0.2.2/32; tunnel packets from anywhere else are passed up unchanged"
        )
    };
    if allow.is_empty() && !allow_pin(bpffs_dir, interface).exists() {
        return Err(no_allow());
    }
    let _lock = lock::decap(bpffs_dir)
        .with_context(|| format!("preparing the pin folder {}", bpffs_dir.display()))?;
    let link = link_pin(bpffs_dir, interface);
    let pinned = inspect_pin(&link, interface, Some(&target))?;
    if let Pinned::Defunct = pinned {
        warn!(
            "{}: its interface is gone; attaching anew to {interface}",
            link.display()
        );
        fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
    }
    let maps_existed: Vec<PathBuf> = map_pins_of_any_layout(bpffs_dir, interface);
    let result = (|| {
        let mut decap = Decap::load(bpffs_dir, interface)?;
        let (allow_added, allow_removed) = if allow.is_empty() {
            (vec![], vec![])
        } else {
            decap.set_allowed(allow)?
        };
        if decap.allowed().is_empty() {
            return Err(no_allow());
        }
        let (added, removed) = decap.set_addrs(&target.map_entries())?;
        let (action, link_id) = match &pinned {
            Pinned::Working(facts) => {
                let (_, tag) = decap.program_id_and_tag()?;
                let running = aya::programs::loaded_programs()
                    .filter_map(|p| p.ok())
                    .find(|p| p.id() == facts.program_id);
                let ours = decap.map_ids()?;
                let same_maps = running
                    .as_ref()
                    .and_then(|p| p.map_ids().ok().flatten())
                    .is_some_and(|ids| ours.iter().all(|m| ids.contains(m)));
                if running.is_some_and(|p| p.tag() == tag) && same_maps {
                    (Action::Kept, facts.id)
                } else {
                    replace_in_link(&mut decap, &link)?;
                    (Action::Replaced, facts.id)
                }
            }
            _ => {
                if let Some(other) = target.iface.xdp_programs.first() {
                    bail!(
                        "{interface} already runs XDP program {other} (not lb's decapsulation link in {}): detach it first",
                        bpffs_dir.display()
                    );
                }
                let (mode, link_id) = attach(&mut decap, interface, target.iface.index, &link)?;
                (Action::Attached(mode), link_id)
            }
        };
        let program_id = match action {
            Action::Kept => match &pinned {
                Pinned::Working(f) => f.program_id,
                _ => unreachable!("kept only a working link"),
            },
            _ => decap.program_id_and_tag()?.0,
        };
        // The program in the link now uses this layout's maps: older layouts' pins go.
        for old in map_pins_of_any_layout(bpffs_dir, interface) {
            if !MAP_KINDS
                .iter()
                .any(|kind| old == map_pin(bpffs_dir, kind, interface))
            {
                fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
                info!("removed {}, a map of an older layout", old.display());
            }
        }
        let with = |flag| decap.maps.addrs_with(flag);
        Ok(Report {
            interface: interface.to_string(),
            ifindex: target.iface.index,
            action,
            link_id,
            program_id,
            addrs: with(addr_flags::OUTER),
            host_addrs: with(addr_flags::INNER),
            added,
            removed,
            allowed: decap.allowed(),
            allow_added,
            allow_removed,
        })
    })();
    if result.is_err() && !link.exists() {
        // Leave nothing behind from a failed first attach.
        for pin in map_pins_of_any_layout(bpffs_dir, interface) {
            if !maps_existed.contains(&pin) {
                let _ = fs::remove_file(&pin);
            }
        }
        let _ = fs::remove_dir(bpffs_dir);
    }
    result
}

fn attach(
    decap: &mut Decap,
    interface: &str,
    ifindex: u32,
    pin: &Path,
) -> Result<(&'static str, u32)> {
    let program = decap.program_mut();
    let mut errors = vec![];
    for (mode, label) in [(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")] {
        match program.attach_to_if_index(ifindex, mode) {
            Ok(id) => {
                let link = program.take_link(id).context("taking the XDP link")?;
                let fd_link = FdLink::try_from(link).map_err(|e| {
                    anyhow!(
                        "{interface}: the kernel attached XDP without a bpf_link ({e}); lbd decap needs bpf_link support to stay attached after it exits"
                    )
                })?;
                let link_id = fd_link.info().map(|i| i.id()).unwrap_or(0);
                fd_link
                    .pin(pin)
                    .with_context(|| format!("pinning the link at {}", pin.display()))?;
                return Ok((label, link_id));
            }
            Err(e) => {
                warn!("{interface}: {label} XDP attach failed ({e})");
                errors.push(format!("{label}: {e}"));
            }
        }
    }
    bail!(
        "{interface} cannot take the decapsulation program ({})",
        errors.join("; ")
    )
}

fn replace_in_link(decap: &mut Decap, pin: &Path) -> Result<()> {
    let pinned = PinnedLink::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    let fd_link: FdLink = pinned.into();
    let xdp_link = XdpLink::try_from(fd_link).context("the pinned link is not an XDP link")?;
    let program = decap.program_mut();
    let id = program
        .attach_to_link(xdp_link)
        .context("replacing the program in the pinned link")?;
    // The link stays pinned: dropping our handle must not detach it.
    drop(program.take_link(id).context("taking the XDP link")?);
    Ok(())
}

/// Detaches the decapsulation program from `interface` (removes its link pin) and removes its
/// map pins (of any layout), then the folder if nothing else is left in it. Returns the paths
/// removed; nothing pinned is not an error.
pub fn remove(interface: &str, bpffs_dir: &Path) -> Result<Vec<PathBuf>> {
    let _lock = lock::decap_existing(bpffs_dir)?;
    let link = link_pin(bpffs_dir, interface);
    let mut removed = vec![];
    if link.exists() {
        let target = target(interface)?;
        // Refuses a link of another namespace's interface of the same name.
        inspect_pin(&link, interface, target.as_ref())?;
        fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        removed.push(link);
    }
    for map in map_pins_of_any_layout(bpffs_dir, interface) {
        fs::remove_file(&map).with_context(|| format!("removing {}", map.display()))?;
        removed.push(map);
    }
    match fs::remove_dir(bpffs_dir) {
        Ok(()) => removed.push(bpffs_dir.to_path_buf()),
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                || e.kind() == io::ErrorKind::DirectoryNotEmpty => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", bpffs_dir.display())),
    }
    Ok(removed)
}

/// What `lbd decap --status` prints: the link, the allowed sources, the addresses and the
/// packet counters of `interface`'s pins under `bpffs_dir`.
pub fn status(interface: &str, bpffs_dir: &Path) -> Result<String> {
    use std::fmt::Write as _;
    let link = link_pin(bpffs_dir, interface);
    if !link.exists() && !allow_pin(bpffs_dir, interface).exists() {
        bail!(
            "nothing of lbd decap is pinned for {interface} under {} (attach it with lbd decap --interface {interface} --allow CIDR)",
            bpffs_dir.display()
        );
    }
    let maps = Maps::from_pins(bpffs_dir, interface)?;
    let mut out = String::new();
    let _ = writeln!(out, "{:<20}{interface}", "interface");
    let link_text = match link_facts(&link) {
        Ok(f) if f.ifindex == 0 => {
            format!("{} (program {}), its interface is gone", f.id, f.program_id)
        }
        Ok(f) => format!("{} (program {}, ifindex {})", f.id, f.program_id, f.ifindex),
        Err(e) => format!("none ({}: {e})", link.display()),
    };
    let _ = writeln!(out, "{:<20}{link_text}", "link");
    let _ = writeln!(out, "{:<20}{}", "allowed sources", list(&maps.allowed()));
    let with = |flag| maps.addrs_with(flag);
    let _ = writeln!(
        out,
        "{:<20}{}",
        "own addresses",
        list(&with(addr_flags::OUTER))
    );
    let _ = writeln!(
        out,
        "{:<20}{}",
        "host addresses",
        list(&with(addr_flags::INNER))
    );
    for (stat, n) in maps.stats() {
        let _ = writeln!(out, "{:<20}{n}", stat.label());
    }
    Ok(out)
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".into();
    }
    items
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What `lbd decap` was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Attach (or bring up to date), with these allowed sources (none: keep the pinned ones).
    Install,
    /// Detach and remove the pins.
    Remove,
    /// Print what is pinned and counted.
    Status,
}

/// `lbd decap`: install, remove or show, and log what was done.
pub fn run(interface: &str, bpffs_dir: &Path, mode: Mode, allow: &[Cidr]) -> Result<()> {
    match mode {
        Mode::Install => {}
        Mode::Status => {
            print!("{}", status(interface, bpffs_dir)?);
            return Ok(());
        }
        Mode::Remove => {
            let removed = remove(interface, bpffs_dir)?;
            if removed.is_empty() {
                info!(
                    "{interface}: nothing pinned under {}: nothing to remove",
                    bpffs_dir.display()
                );
            } else {
                info!(
                    "{interface}: decapsulation program detached; removed {}",
                    removed
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            return Ok(());
        }
    }
    let r = install(interface, bpffs_dir, allow)?;
    match r.action {
        Action::Attached(mode) => info!(
            "{interface}: decapsulation program {} attached in {mode} mode (link {}, pinned at {})",
            r.program_id,
            r.link_id,
            link_pin(bpffs_dir, interface).display()
        ),
        Action::Kept => info!(
            "{interface}: decapsulation program {} already attached (link {}): kept",
            r.program_id, r.link_id
        ),
        Action::Replaced => info!(
            "{interface}: the pinned link ran another build of the program, or on other maps: replaced by program {} in link {}",
            r.program_id, r.link_id
        ),
    }
    if !r.added.is_empty() || !r.removed.is_empty() {
        info!(
            "{interface}: address map: added {}; removed {}",
            list(&r.added),
            list(&r.removed)
        );
    }
    if !r.allow_added.is_empty() || !r.allow_removed.is_empty() {
        info!(
            "{interface}: allowed sources: added {}; removed {}",
            list(&r.allow_added),
            list(&r.allow_removed)
        );
    }
    if r.addrs.is_empty() {
        warn!(
            "{interface} has no addresses: nothing is decapsulated until it has (run lbd decap again then)"
        );
    } else {
        info!(
            "{interface}: decapsulating IP-in-IP packets to {} from {} to this host's addresses ({})",
            list(&r.addrs),
            list(&r.allowed),
            list(&r.host_addrs)
        );
    }
    for (v4, family) in [(true, "IPv4"), (false, "IPv6")] {
        let own = r
            .addrs
            .iter()
            .any(|a| a.is_ipv4() == v4 && !is_link_local(a));
        if own && !r.allowed.iter().any(|c| c.addr.is_ipv4() == v4) {
            warn!(
                "{interface}: no {family} prefix given with --allow: every {family} tunnel packet is passed up unchanged"
            );
        }
    }
    Ok(())
}

fn is_link_local(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_say_what_is_wrong() {
        let c: Cidr = "192.0.2.0/24".parse().unwrap();
        assert_eq!((c.addr.to_string().as_str(), c.len), ("192.0.2.0", 24));
        assert_eq!("192.0.2.2".parse::<Cidr>().unwrap().len, 32);
        assert_eq!("2001:db8::/64".parse::<Cidr>().unwrap().len, 64);
        assert_eq!("2001:db8::2".parse::<Cidr>().unwrap().len, 128);
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().len, 0);
        assert_eq!(c.to_string(), "192.0.2.0/24");
        let e = "192.0.2.2/24".parse::<Cidr>().unwrap_err();
        assert!(e.contains("did you mean 192.0.2.0/24"), "{e}");
        let e = "2001:db8::1/64".parse::<Cidr>().unwrap_err();
        assert!(e.contains("did you mean 2001:db8::/64"), "{e}");
        assert!(
            "192.0.2.0/33"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("0 to 32")
        );
        assert!(
            "2001:db8::/129"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("0 to 128")
        );
        assert!(
            "lb1/24"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("not an address")
        );
        // Keys round-trip.
        for text in ["192.0.2.0/24", "2001:db8::/64", "0.0.0.0/0", "192.0.2.2/32"] {
            let c: Cidr = text.parse().unwrap();
            assert_eq!(Cidr::of_key(&c.key()), Some(c), "{text}");
        }
    }

    #[test]
    fn pins_of_any_layout_are_this_interfaces_only() {
        let dir = std::env::temp_dir().join(format!("lb-decap-pins-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        for name in [
            "addrs_v1_eth0",
            "addrs_v2_eth0",
            "stats_v2_eth0",
            "allow_v2_eth0",
            "addrs_v2_eth0.100",
            "addrs_v2_eth1",
            "link_eth0",
            "addrs_vx_eth0",
        ] {
            fs::write(dir.join(name), "").unwrap();
        }
        let names: Vec<String> = map_pins_of_any_layout(&dir, "eth0")
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "addrs_v1_eth0",
                "addrs_v2_eth0",
                "allow_v2_eth0",
                "stats_v2_eth0"
            ]
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
