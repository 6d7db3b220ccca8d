//! The only code that touches the XDP program and its maps: loading, attaching and pinning,
//! filling the maps, swapping Maglev tables, reading counters, and removing it all.
//!
//! Pins live under `bpffs_dir`:
//! - `link_<interface>`: the program's bpf_link on each interface (removing it detaches);
//! - `v<LAYOUT_VERSION>/<MAP>`: every map. A layout change gets a new folder, so an lbd never
//!   opens maps of a layout it does not know as its own.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    fs, io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, ArrayOfMaps, HashMap, IterableMap as _, MapData, PerCpuArray},
    programs::{
        Xdp,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpMode},
    },
};
use lb_common::{
    Backend, Config, Counter, FlowEntry, FlowKey, FlowSet, FlowValue, FragKey, FragValue,
    LAYOUT_VERSION, MAX_BACKENDS, MAX_SERVICES, PROGRAM_NAME, Reason, ServiceEntry, ServiceKey,
    ServiceValue, VIP_FILTER_WORDS, VipKey, backend_flags, conntrack_sets, maps, vip_filter_bits,
};
use log::{info, warn};

use crate::config;

/// The XDP program, built by build.rs from lb-ebpf and embedded so `lbd` is self-contained.
pub static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this lbd was built without its XDP program (AYA_BUILD_SKIP was set): rebuild it normally"
    )]
    NoProgram,
    // The causes are kept as text with their whole chain (aya's errors keep the errno in
    // their sources), so a message says everything once, however it is printed.
    #[error("{what}: {cause}")]
    Io { what: String, cause: String },
    #[error("loading the XDP program: {0}")]
    Load(String),
    #[error("{what}: {cause}")]
    Program { what: String, cause: String },
    #[error("{what}: {cause}")]
    Map { what: String, cause: String },
    #[error("{0}")]
    Other(String),
}

type Result<T> = std::result::Result<T, DatapathError>;

/// An error and its sources, each message once: "failed to create map `X`: Operation not
/// permitted (os error 1)".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Wrappers often repeat their source's message; keep what is new.
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DatapathError {
    let what = what.into();
    move |e| DatapathError::Io {
        what,
        cause: error_chain(&e),
    }
}

/// Whether a map operation failed only because the key was not there (aya reports a missing
/// key as `KeyNotFound` for some calls and as the syscall's ENOENT for others).
fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn map_err(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    let what = what.into();
    move |e| DatapathError::Map {
        what,
        cause: error_chain(&e),
    }
}

fn prog_err(what: impl Into<String>) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    let what = what.into();
    move |e| DatapathError::Program {
        what,
        cause: error_chain(&e),
    }
}

impl From<aya::EbpfError> for DatapathError {
    fn from(e: aya::EbpfError) -> Self {
        DatapathError::Load(error_chain(&e))
    }
}

/// Where an interface's link is pinned.
pub fn link_pin(bpffs_dir: &Path, interface: &str) -> PathBuf {
    bpffs_dir.join(format!("link_{interface}"))
}

/// The folder of this layout's map pins.
pub fn maps_dir(bpffs_dir: &Path) -> PathBuf {
    bpffs_dir.join(format!("v{LAYOUT_VERSION}"))
}

/// Whether `path` is on a bpf filesystem.
fn on_bpffs(path: &Path) -> io::Result<bool> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: statfs writes into the zeroed struct we own; c is a valid NUL-terminated string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type == libc::BPF_FS_MAGIC)
}

/// Makes sure `bpffs_dir` exists on a bpffs: mounts one at /sys/fs/bpf (mode 0700: pins are
/// root's business) when the folder lies under it and nothing is mounted there (SPEC), creates
/// the folder (mode 0700), and refuses a folder elsewhere that is not on a bpffs, or one that
/// others could change (whoever may write there can remove or replace the pins).
pub fn prepare_bpffs(bpffs_dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if bpffs_dir.starts_with(root) && !on_bpffs(root).unwrap_or(false) {
        info!("no bpffs mounted at /sys/fs/bpf: mounting one (mode 0700)");
        let src = c"bpf";
        let target = c"/sys/fs/bpf";
        let options = c"mode=0700";
        // SAFETY: all pointers are valid NUL-terminated strings; bpffs reads `options` as text.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(DatapathError::Io {
                what: "mounting bpffs at /sys/fs/bpf".into(),
                cause: io::Error::last_os_error().to_string(),
            });
        }
    }
    if !bpffs_dir.exists() {
        fs::create_dir_all(bpffs_dir)
            .map_err(io_err(format!("creating {}", bpffs_dir.display())))?;
        fs::set_permissions(bpffs_dir, fs::Permissions::from_mode(0o700)).map_err(io_err(
            format!("setting the mode of {}", bpffs_dir.display()),
        ))?;
    }
    if !on_bpffs(bpffs_dir).map_err(io_err(format!("inspecting {}", bpffs_dir.display())))? {
        return Err(DatapathError::Other(format!(
            "daemon.bpffs_dir {} is not on a bpf filesystem: use a folder under /sys/fs/bpf or mount a bpffs there",
            bpffs_dir.display()
        )));
    }
    crate::state::check_private_dir("the pin folder", "pins", bpffs_dir)
        .map_err(|e| DatapathError::Other(e.to_string()))
}

/// The hash seed of the data path pinned under `bpffs_dir`, if one is pinned and filled: the
/// seed its clients are placed by. Read from this layout's `CONFIG`, else from another
/// layout's (the seed is the first 16 bytes of `CONFIG[0]` in every layout), before anything is
/// loaded or replaced.
pub fn pinned_seed(bpffs_dir: &Path) -> Option<[u64; 2]> {
    let mut dirs = vec![maps_dir(bpffs_dir)];
    let mut others = other_layouts(bpffs_dir);
    others.sort();
    dirs.extend(others.into_iter().rev());
    dirs.iter()
        .filter_map(|d| read_first_value(&d.join(maps::CONFIG)))
        .find_map(|v| {
            let word = |i: usize| -> Option<u64> {
                Some(u64::from_ne_bytes(v[i * 8..i * 8 + 8].try_into().ok()?))
            };
            let seed: [u64; 2] = [word(0)?, word(1)?];
            (seed != [0, 0]).then_some(seed)
        })
}

/// The bytes of element 0 of the array map pinned at `pin`, whatever its value size (aya 0.14
/// reads only values of a type known at compile time).
fn read_first_value(pin: &Path) -> Option<Vec<u8>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    let map = MapData::from_pin(pin).ok()?;
    let size = map.info().ok()?.value_size() as usize;
    if size < 16 {
        return None;
    }
    let key = 0u32;
    let mut value = vec![0u8; size];
    // bpf_attr for BPF_MAP_LOOKUP_ELEM: map_fd (u32, padded), key, value, flags.
    let mut attr = [0u64; 16];
    attr[0] = map.fd().as_fd().as_raw_fd() as u32 as u64;
    attr[1] = &key as *const u32 as u64;
    attr[2] = value.as_mut_ptr() as u64;
    // SAFETY: attr names a valid map fd, a 4-byte key and a writable buffer of the map's value
    // size, all alive for the call; the kernel writes only `size` bytes into `value`.
    unsafe { bpf_syscall(BPF_MAP_LOOKUP_ELEM, &mut attr) }.ok()?;
    Some(value)
}

/// Calls bpf(2) with `attr` as its `union bpf_attr` (zero past what the command reads), for the
/// few commands aya 0.14 does not expose: the call's non-negative result (a descriptor for the
/// commands that make one), or the error.
///
/// # Safety
/// Every pointer `attr` holds must be valid for the command for the duration of the call:
/// readable where the kernel reads, writable for as many bytes as the command says it writes.
pub(crate) unsafe fn bpf_syscall(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<i64> {
    // SAFETY: attr is a buffer the size of bpf_attr; what it points to is the caller's promise.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            size_of_val(attr) as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// How the program ended up attached to one interface.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    /// "native" or "generic", or "adopted" when an existing pinned link was updated in place.
    pub mode: String,
    pub link_id: u32,
}

/// How `Datapath::open` found the system.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// Nothing was pinned: program loaded, maps created.
    Fresh,
    /// The pinned program is this lbd's own program: kept running, maps opened from their pins.
    Adopted,
    /// A different program was running on maps of this layout: the new one is loaded on the
    /// same maps and replaces it atomically in the pinned links.
    Upgraded,
    /// Pins of another map layout were found: the new program gets new maps of its own layout
    /// and replaces the old program in one step; the old maps are removed after the swap.
    Replaced { old_layouts: Vec<String> },
    /// The pinned maps hold this very program's fingerprint, but the link of some interface
    /// was missing or detached (its interface deleted and recreated): the program is loaded
    /// again on the same maps, attached anew there and swapped in through the links that work.
    Reattached,
}

/// Every map, opened.
struct Maps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    service_by_id: Array<MapData, ServiceEntry>,
    vip_filter: Array<MapData, u64>,
    maglev: ArrayOfMaps<MapData, Array<MapData, u64>>,
    backends: Array<MapData, Backend>,
    config: Array<MapData, Config>,
    conntrack: Array<MapData, FlowSet>,
    frags: HashMap<MapData, FragKey, FragValue>,
    vips: HashMap<MapData, VipKey, ServiceValue>,
    devmap: aya::maps::DevMapHash<MapData>,
    service_stats: PerCpuArray<MapData, Counter>,
    backend_stats: PerCpuArray<MapData, Counter>,
    reason_stats: PerCpuArray<MapData, u64>,
}

impl Maps {
    fn build(mut get: impl FnMut(&str) -> Result<aya::maps::Map>) -> Result<Maps> {
        Ok(Maps {
            services: HashMap::try_from(get(maps::SERVICES)?).map_err(map_err(maps::SERVICES))?,
            service_by_id: Array::try_from(get(maps::SERVICE_BY_ID)?)
                .map_err(map_err(maps::SERVICE_BY_ID))?,
            vip_filter: Array::try_from(get(maps::VIP_FILTER)?)
                .map_err(map_err(maps::VIP_FILTER))?,
            maglev: ArrayOfMaps::try_from(get(maps::MAGLEV)?).map_err(map_err(maps::MAGLEV))?,
            backends: Array::try_from(get(maps::BACKENDS)?).map_err(map_err(maps::BACKENDS))?,
            config: Array::try_from(get(maps::CONFIG)?).map_err(map_err(maps::CONFIG))?,
            conntrack: Array::try_from(get(maps::CONNTRACK)?).map_err(map_err(maps::CONNTRACK))?,
            frags: HashMap::try_from(get(maps::FRAGS)?).map_err(map_err(maps::FRAGS))?,
            vips: HashMap::try_from(get(maps::VIPS)?).map_err(map_err(maps::VIPS))?,
            devmap: aya::maps::DevMapHash::try_from(get(maps::DEVMAP)?)
                .map_err(map_err(maps::DEVMAP))?,
            service_stats: PerCpuArray::try_from(get(maps::SERVICE_STATS)?)
                .map_err(map_err(maps::SERVICE_STATS))?,
            backend_stats: PerCpuArray::try_from(get(maps::BACKEND_STATS)?)
                .map_err(map_err(maps::BACKEND_STATS))?,
            reason_stats: PerCpuArray::try_from(get(maps::REASON_STATS)?)
                .map_err(map_err(maps::REASON_STATS))?,
        })
    }

    fn from_ebpf(ebpf: &mut Ebpf) -> Result<Maps> {
        Maps::build(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| DatapathError::Other(format!("map {name} missing from the object")))
        })
    }

    fn from_pins(dir: &Path) -> Result<Maps> {
        Maps::build(|name| {
            let path = dir.join(name);
            let what = format!("opening the pinned map {}", path.display());
            MapData::from_pin(&path)
                .and_then(aya::maps::Map::from_map_data)
                .map_err(map_err(what))
        })
    }
}

/// What lbd writes into the maps: every map but the counters, the connection table and `FRAGS`
/// (which the program fills). The daemon computes it from its runtime state with one function,
/// at start and after every change; [`Datapath::apply`] makes the maps hold exactly it, and
/// [`Fill::read_pinned`] reads it back (to compare a running lbd's maps with a fresh fill).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fill {
    pub config: Config,
    pub services: StdHashMap<ServiceKey, ServiceValue>,
    /// The entries of `SERVICE_BY_ID` in use (the others are all zero).
    pub service_by_id: BTreeMap<u32, ServiceEntry>,
    /// `VIP_FILTER`'s words: the bits of every key of `services` (see [`vip_filter_words`]).
    pub vip_filter: Vec<u64>,
    /// The words of each service's Maglev table (`lb_common::maglev_words`); an id without a
    /// service has no table at all.
    pub maglev: BTreeMap<u32, Arc<[u64]>>,
    /// The entries of `BACKENDS` in use (the others are all zero).
    pub backends: BTreeMap<u32, Backend>,
    pub vips: StdHashMap<VipKey, ServiceValue>,
    /// `DEVMAP`: ifindex → the interface it redirects to (itself).
    pub devmap: BTreeMap<u32, u32>,
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

impl Fill {
    /// What the maps hold now.
    fn read(maps: &Maps) -> Result<Fill> {
        let config = maps.config.get(&0, 0).map_err(map_err("reading CONFIG"))?;
        let services = maps
            .services
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err("reading SERVICES"))?;
        let service_by_id = used_entries(&maps.service_by_id, MAX_SERVICES, maps::SERVICE_BY_ID)?;
        let mut maglev = BTreeMap::new();
        for id in 0..MAX_SERVICES {
            match maps.maglev.get(&id, 0) {
                Ok(inner) => {
                    let what = || format!("reading the Maglev table of service {id}");
                    let len = inner.map().info().map_err(map_err(what()))?.max_entries() as usize;
                    maglev.insert(
                        id,
                        read_mmapable_array(inner.map(), len).map_err(io_err(what()))?,
                    );
                }
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(format!("reading MAGLEV[{id}]"))(e)),
            }
        }
        let vip_filter = read_mmapable_array(maps.vip_filter.map(), VIP_FILTER_WORDS as usize)
            .map_err(io_err("reading VIP_FILTER"))?
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
        Ok(Fill {
            config,
            services,
            service_by_id,
            vip_filter,
            maglev,
            backends,
            vips,
            devmap,
        })
    }

    /// What the pinned maps of this layout under `bpffs_dir` hold now (for tests and tools).
    pub fn read_pinned(bpffs_dir: &Path) -> Result<Fill> {
        Fill::read(&Maps::from_pins(&maps_dir(bpffs_dir))?)
    }

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
        map("MAGLEV", &|f| {
            shown(f.maglev.iter().map(|(id, w)| (id, TableSummary(w.clone()))))
        });
        map("BACKENDS", &|f| shown(f.backends.iter()));
        map("VIPS", &|f| {
            shown(f.vips.iter().map(|(k, v)| ((k.addr, k.proto), v)))
        });
        map("DEVMAP", &|f| shown(f.devmap.iter()));
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

/// A Maglev table in a diff: compared whole, shown by its size and a checksum.
#[derive(Clone, PartialEq)]
struct TableSummary(Arc<[u64]>);

impl std::fmt::Debug for TableSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} words, sum {:x}",
            self.0.len(),
            self.0.iter().fold(0u64, |a, w| a.rotate_left(5) ^ w)
        )
    }
}

/// Every `FRAGS` entry in the pinned maps under `bpffs_dir` (for tests and tools).
pub fn read_pinned_frags(bpffs_dir: &Path) -> Result<Vec<(FragKey, FragValue)>> {
    let maps = Maps::from_pins(&maps_dir(bpffs_dir))?;
    maps.frags
        .iter()
        .collect::<std::result::Result<_, _>>()
        .map_err(map_err("reading FRAGS"))
}

/// Loads the program (verified, not attached) on the maps pinned in `dir` (creating and pinning
/// those that are missing), with a connection table of `sets` sets: the object and the
/// program's id.
fn load_program(dir: &Path, sets: u32) -> Result<(Ebpf, u32)> {
    let pins: Vec<(&str, PathBuf)> = maps::ALL.iter().map(|m| (*m, dir.join(m))).collect();
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(maps::CONNTRACK, sets);
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(PROGRAM_OBJECT)?;
    let program: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or_else(|| {
            DatapathError::Other(format!("program {PROGRAM_NAME} missing from the object"))
        })?
        .try_into()
        .map_err(prog_err("the program is not XDP"))?;
    program
        .load()
        .map_err(prog_err("verifying and loading the XDP program"))?;
    let program_id = program
        .info()
        .map_err(prog_err("reading program info"))?
        .id();
    Ok((ebpf, program_id))
}

/// A stable fingerprint of the program object (FNV-1a), kept in CONFIG: a restarted lbd whose
/// program is the running one adopts it instead of reloading.
pub fn program_hash(object: &[u8]) -> u64 {
    object.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What the kernel says of a pinned bpf_link (the head of its `bpf_link_info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkFacts {
    pub id: u32,
    pub program_id: u32,
    /// The interface an XDP link is attached to; 0 once that interface is gone (deleted, or
    /// moved to another network namespace): the link is then defunct.
    pub ifindex: u32,
    pub is_xdp: bool,
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_XDP: u32 = 6;

/// The facts of the link pinned at `pin`, read with BPF_OBJ_GET and BPF_OBJ_GET_INFO_BY_FD
/// (aya 0.14 does not expose the XDP part of a link's info: its interface).
pub fn link_facts(pin: &Path) -> io::Result<LinkFacts> {
    use std::os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    };
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd, file_flags: all others zero.
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: attr holds a valid NUL-terminated path, which outlives the call; the kernel only
    // reads it.
    let fd = unsafe { bpf_syscall(BPF_OBJ_GET, &mut attr) }?;
    // SAFETY: the kernel just returned this descriptor, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // The head of bpf_link_info: type, id, prog_id, padding, then (XDP) ifindex. The kernel
    // fills at most info_len bytes.
    let mut info = [0u32; 6];
    let mut attr = [0u64; 16];
    attr[0] = (fd.as_raw_fd() as u32 as u64) | ((size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: attr names a valid fd and a writable buffer of info_len bytes, which outlives
    // the call; the kernel writes at most info_len bytes into it.
    unsafe { bpf_syscall(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(LinkFacts {
        is_xdp: info[0] == BPF_LINK_TYPE_XDP,
        id: info[1],
        program_id: info[2],
        ifindex: info[4],
    })
}

/// Where a pinned XDP link is, seen from this network namespace, for interface `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkPlace {
    /// On the interface called `name` here, running its program.
    Here,
    /// Its interface is gone (deleted, or moved to another namespace): nothing is attached.
    Defunct,
    /// On another interface of this namespace (the one called `name` was renamed away, and
    /// perhaps another took its name).
    OtherInterface { name: String },
    /// On an interface of another network namespace (whose lbd uses the same pin folder).
    Foreign,
}

impl LinkPlace {
    /// Where the link of `facts` is, given the interface of this namespace with the link's
    /// ifindex (`at_index`, if there is one): it is that interface's only if that interface
    /// runs the link's program (an ifindex of another namespace may exist here too).
    pub fn of(
        facts: &LinkFacts,
        at_index: Option<&crate::netlink::Interface>,
        name: &str,
    ) -> LinkPlace {
        if facts.ifindex == 0 {
            return LinkPlace::Defunct;
        }
        match at_index {
            Some(i) if i.index == facts.ifindex && i.xdp_programs.contains(&facts.program_id) => {
                if i.name == name {
                    LinkPlace::Here
                } else {
                    LinkPlace::OtherInterface {
                        name: i.name.clone(),
                    }
                }
            }
            _ => LinkPlace::Foreign,
        }
    }
}

/// Folders of map pins of other layouts than this lbd's.
fn other_layouts(bpffs_dir: &Path) -> Vec<PathBuf> {
    let own = maps_dir(bpffs_dir);
    let Ok(entries) = fs::read_dir(bpffs_dir) else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && *p != own
                && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.len() > 1 && n.starts_with('v') && n[1..].bytes().all(|b| b.is_ascii_digit())
                })
        })
        .collect()
}

pub struct Datapath {
    /// The program this lbd loaded; None when it adopted the running one.
    ebpf: Option<Ebpf>,
    bpffs_dir: PathBuf,
    maps: Maps,
    /// What lbd's maps hold (read at open, kept up to date by every write): `apply` writes
    /// only what differs from it.
    shadow: Fill,
    /// Whether `FRAGS` was checked against the fill since the maps were opened.
    frags_checked: bool,
    pub attachments: Vec<Attachment>,
    program_id: u32,
    program_hash: u64,
    pub start: Start,
    /// `CONFIG` as it must be once this lbd's program is in place, while an older program
    /// still runs on these maps (see `set_config`).
    pending_config: Option<Config>,
}

impl Datapath {
    /// Opens the data path for `interfaces`. When every interface has a pinned link and the
    /// pinned maps of this layout hold this very program's fingerprint, the running program is
    /// adopted untouched (no reload, no blip). Otherwise the program is loaded, reusing the pinned
    /// maps of this layout (so tables, counters and flows survive an upgrade); `attach` then puts
    /// it in place.
    pub fn open(bpffs_dir: &Path, conntrack_entries: u32, interfaces: &[String]) -> Result<Self> {
        if PROGRAM_OBJECT.is_empty() {
            return Err(DatapathError::NoProgram);
        }
        prepare_bpffs(bpffs_dir)?;
        let dir = maps_dir(bpffs_dir);
        let hash = program_hash(PROGRAM_OBJECT);
        let old = other_layouts(bpffs_dir);
        let linked =
            !interfaces.is_empty() && interfaces.iter().all(|i| link_pin(bpffs_dir, i).exists());
        if linked && dir.exists() && old.is_empty() {
            match Self::adopt(bpffs_dir, &dir, hash, conntrack_entries, interfaces) {
                Ok(Some(dp)) => return Ok(dp),
                Ok(None) => {}
                Err(e) => {
                    warn!("the pinned data path cannot be adopted ({e}); loading the program anew")
                }
            }
        }
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let conntrack_pin = dir.join(maps::CONNTRACK);
        let sets = conntrack_sets(conntrack_entries);
        if let Ok(info) = aya::maps::MapInfo::from_pin(&conntrack_pin)
            && info.max_entries() != sets
        {
            // The table's size is fixed at creation: a new size needs a new table. Its flows
            // then take the Maglev table's choice once, which is where most of them already are.
            warn!(
                "connection table is pinned with {} entries, config asks for {}: replacing it",
                info.max_entries() as usize * lb_common::FLOW_WAYS,
                sets as usize * lb_common::FLOW_WAYS
            );
            fs::remove_file(&conntrack_pin)
                .map_err(io_err(format!("removing {}", conntrack_pin.display())))?;
        }
        let ours = Maps::from_pins(&dir)
            .ok()
            .and_then(|m| m.config.get(&0, 0).ok())
            .is_some_and(|c| c.program_hash == hash && c.layout_version == LAYOUT_VERSION);
        let (mut ebpf, program_id) = load_program(&dir, sets)?;
        let maps = Maps::from_ebpf(&mut ebpf)?;
        let start = if !old.is_empty() {
            let old_layouts: Vec<String> = old.iter().map(|p| p.display().to_string()).collect();
            info!(
                "pins of another map layout found ({}): this lbd (layout v{LAYOUT_VERSION}) replaces program and maps in one step, without migrating their contents",
                old_layouts.join(", ")
            );
            Start::Replaced { old_layouts }
        } else if ours && !linked {
            info!(
                "the pinned maps hold this program, but not every interface has a working link: loading it again on them and attaching it anew where needed"
            );
            Start::Reattached
        } else if interfaces.iter().any(|i| link_pin(bpffs_dir, i).exists()) {
            info!(
                "a different program is running: it will be replaced in place through its pinned link"
            );
            Start::Upgraded
        } else {
            Start::Fresh
        };
        let shadow = Fill::read(&maps)?;
        Ok(Datapath {
            ebpf: Some(ebpf),
            bpffs_dir: bpffs_dir.to_owned(),
            maps,
            shadow,
            frags_checked: false,
            attachments: vec![],
            program_id,
            program_hash: hash,
            start,
            pending_config: None,
        })
    }

    /// The pinned data path, if it runs this very program on maps of this layout and size.
    fn adopt(
        bpffs_dir: &Path,
        dir: &Path,
        hash: u64,
        conntrack_entries: u32,
        interfaces: &[String],
    ) -> Result<Option<Datapath>> {
        let maps = Maps::from_pins(dir)?;
        let config = maps.config.get(&0, 0).map_err(map_err("reading CONFIG"))?;
        if config.program_hash != hash || config.layout_version != LAYOUT_VERSION {
            return Ok(None);
        }
        let conntrack_size = maps
            .conntrack
            .map()
            .info()
            .map_err(map_err("reading CONNTRACK"))?
            .max_entries();
        if conntrack_size != conntrack_sets(conntrack_entries) {
            return Ok(None);
        }
        let mut attachments = vec![];
        let mut program_id = 0;
        for interface in interfaces {
            let pin = link_pin(bpffs_dir, interface);
            let link: FdLink = PinnedLink::from_pin(&pin)
                .map_err(|e| {
                    DatapathError::Other(format!("opening {}: {}", pin.display(), error_chain(&e)))
                })?
                .into();
            let info = link.info().map_err(|e| {
                DatapathError::Other(format!(
                    "reading link {}: {}",
                    pin.display(),
                    error_chain(&e)
                ))
            })?;
            program_id = info.program_id();
            attachments.push(Attachment {
                interface: interface.clone(),
                ifindex: 0,
                mode: "adopted".into(),
                link_id: info.id(),
            });
        }
        info!("adopted the running program {program_id} and its pinned maps (no reload)");
        let shadow = Fill::read(&maps)?;
        Ok(Some(Datapath {
            ebpf: None,
            bpffs_dir: bpffs_dir.to_owned(),
            maps,
            shadow,
            frags_checked: false,
            attachments,
            program_id,
            program_hash: hash,
            start: Start::Adopted,
            pending_config: None,
        }))
    }

    /// After the program is in place: writes `CONFIG` whole (see `set_config`), then removes
    /// the pins of replaced layouts.
    pub fn finish_start(&mut self) -> Result<()> {
        if let Some(value) = self.pending_config.take() {
            self.write_config(value)?;
        }
        if let Start::Replaced { old_layouts } = &self.start {
            for dir in old_layouts {
                fs::remove_dir_all(dir)
                    .map_err(io_err(format!("removing the old layout's pins {dir}")))?;
                info!("removed the pins of the replaced layout {dir}");
            }
        }
        Ok(())
    }

    pub fn program_id(&self) -> u32 {
        self.program_id
    }

    fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .as_mut()
            .expect("a loaded program (not called when adopting)")
            .program_mut(PROGRAM_NAME)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .expect("the program was checked at load")
    }

    /// Puts the program on `interface`. When a link is already pinned there (an earlier lbd),
    /// its program is replaced atomically through the link: traffic never sees a gap. Otherwise
    /// the program is attached in the configured mode and its link pinned.
    pub fn attach(&mut self, interface: &str, ifindex: u32, mode: config::XdpMode) -> Result<()> {
        if self.start == Start::Adopted {
            // The running program stays; only record where it is.
            if let Some(a) = self
                .attachments
                .iter_mut()
                .find(|a| a.interface == interface)
            {
                a.ifindex = ifindex;
                return Ok(());
            }
            return Err(DatapathError::Other(format!(
                "{interface} has no pinned link to adopt"
            )));
        }
        let pin = link_pin(&self.bpffs_dir, interface);
        if pin.exists() {
            match self.replace_in_link(&pin) {
                Ok(link_id) => {
                    info!(
                        "{interface}: replaced the program in the pinned link {link_id} (no detach)"
                    );
                    self.record(Attachment {
                        interface: interface.into(),
                        ifindex,
                        mode: "adopted".into(),
                        link_id,
                    });
                    return Ok(());
                }
                Err(e) => {
                    warn!("{interface}: the pinned link cannot be reused ({e}); attaching anew");
                    fs::remove_file(&pin).map_err(io_err(format!("removing {}", pin.display())))?;
                }
            }
        }
        self.attach_new(interface, ifindex, mode)
    }

    /// Attaches the program anew to `interface` while lbd runs, replacing its pinned link
    /// (detached, or on another interface): the interface was deleted and recreated, or
    /// another interface took its name. An adopted program is loaded again first, on the same
    /// maps, and swapped into the other interfaces' links too, so all run one program.
    pub fn reattach(&mut self, interface: &str, ifindex: u32, mode: config::XdpMode) -> Result<()> {
        if self.ebpf.is_none() {
            let (ebpf, program_id) =
                load_program(&maps_dir(&self.bpffs_dir), self.conntrack_sets()?)?;
            self.ebpf = Some(ebpf);
            self.program_id = program_id;
            let others: Vec<String> = self
                .attachments
                .iter()
                .map(|a| a.interface.clone())
                .filter(|i| i != interface)
                .collect();
            for other in others {
                let pin = link_pin(&self.bpffs_dir, &other);
                if let Err(e) = self.replace_in_link(&pin) {
                    warn!("{other}: the program could not be swapped into its link ({e})");
                }
            }
        }
        let pin = link_pin(&self.bpffs_dir, interface);
        match fs::remove_file(&pin) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("removing {}", pin.display()))(e)),
        }
        self.attach_new(interface, ifindex, mode)
    }

    /// Keeps `a` as the attachment of its interface (replacing an earlier one).
    fn record(&mut self, a: Attachment) {
        self.attachments.retain(|x| x.interface != a.interface);
        self.attachments.push(a);
    }

    /// Attaches the loaded program to `interface` in `mode` and pins its link.
    fn attach_new(&mut self, interface: &str, ifindex: u32, mode: config::XdpMode) -> Result<()> {
        let pin = link_pin(&self.bpffs_dir, interface);
        let tries: &[(XdpMode, &str)] = match mode {
            config::XdpMode::Native => &[(XdpMode::Driver, "native")],
            config::XdpMode::Generic => &[(XdpMode::Skb, "generic")],
            config::XdpMode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
        };
        let mut last_err = None;
        for &(xdp_mode, label) in tries {
            let program = self.program();
            match program.attach_to_if_index(ifindex, xdp_mode) {
                Ok(id) => {
                    let link = program
                        .take_link(id)
                        .map_err(prog_err("taking the XDP link"))?;
                    let fd_link = FdLink::try_from(link).map_err(|e| {
                        DatapathError::Other(format!(
                            "{interface}: the kernel attached XDP without a bpf_link ({e}); lb needs bpf_link support to stay attached after exit"
                        ))
                    })?;
                    let link_id = fd_link.info().map(|i| i.id()).unwrap_or(0);
                    fd_link.pin(&pin).map_err(|e| {
                        DatapathError::Other(format!(
                            "pinning the link of {interface} at {}: {e}",
                            pin.display()
                        ))
                    })?;
                    info!("{interface}: XDP program attached in {label} mode (link {link_id})");
                    self.record(Attachment {
                        interface: interface.into(),
                        ifindex,
                        mode: label.into(),
                        link_id,
                    });
                    return Ok(());
                }
                Err(e) => {
                    if tries.len() > 1 {
                        warn!(
                            "{interface}: {label} XDP attach failed ({}); trying the next mode",
                            error_chain(&e)
                        );
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(DatapathError::Program {
            what: format!("{interface} cannot take the XDP program in mode {mode:?}"),
            cause: error_chain(&last_err.expect("at least one mode was tried")),
        })
    }

    fn replace_in_link(&mut self, pin: &Path) -> std::result::Result<u32, String> {
        let pinned = PinnedLink::from_pin(pin).map_err(|e| error_chain(&e))?;
        let fd_link: FdLink = pinned.into();
        let link_id = fd_link
            .info()
            .map(|i| i.id())
            .map_err(|e| error_chain(&e))?;
        let xdp_link = XdpLink::try_from(fd_link).map_err(|e| error_chain(&e))?;
        let program = self.program();
        let id = program
            .attach_to_link(xdp_link)
            .map_err(|e| error_chain(&e))?;
        // The link stays pinned; dropping our handle must not detach it.
        let link = program.take_link(id).map_err(|e| error_chain(&e))?;
        drop(link);
        Ok(link_id)
    }

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

    /// `CONFIG` for this program and connection table, with the hash seed `hash_key`.
    pub fn config_for(&self, hash_key: [u64; 2]) -> Result<Config> {
        Ok(Config {
            hash_key,
            program_hash: self.program_hash,
            layout_version: LAYOUT_VERSION,
            flow_set_mask: self.conntrack_sets()? - 1,
        })
    }

    pub fn set_config(&mut self, hash_key: [u64; 2]) -> Result<()> {
        let value = self.config_for(hash_key)?;
        self.write_config(value)
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
    fn write_config(&mut self, value: Config) -> Result<()> {
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

    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.maps
            .backends
            .set(id, backend, 0)
            .map_err(map_err(format!("writing backend {id}")))?;
        if *backend == Backend::default() {
            self.shadow.backends.remove(&id);
        } else {
            self.shadow.backends.insert(id, *backend);
        }
        Ok(())
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
    /// never a mix.
    pub fn set_service(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
        table: &[u32],
    ) -> Result<()> {
        self.swap_table(value.id, table)?;
        self.set_service_key(key, value)
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

    fn write_service_key(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.maps
            .services
            .insert(key, value, 0)
            .map_err(map_err(format!("writing service {}", value.id)))?;
        self.shadow.services.insert(*key, *value);
        Ok(())
    }

    fn remove_service_key(&mut self, key: &ServiceKey) -> Result<()> {
        match self.maps.services.remove(key) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(map_err("removing a service")(e)),
        }
        self.shadow.services.remove(key);
        Ok(())
    }

    fn write_service_by_id(&mut self, id: u32, entry: ServiceEntry) -> Result<()> {
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
    fn write_vip_filter(&mut self, words: &[u64]) -> Result<()> {
        let memory = ArrayMemory::map(self.maps.vip_filter.map(), words.len() * 8, true)
            .map_err(io_err("mapping VIP_FILTER"))?;
        let base = memory.base.cast::<u64>();
        for (i, w) in words.iter().enumerate() {
            // SAFETY: word i lies inside the mapping of VIP_FILTER_WORDS words; the program only
            // reads them, a whole aligned word at a time.
            unsafe {
                if base.add(i).read_volatile() != *w {
                    base.add(i).write_volatile(*w);
                }
            }
        }
        self.shadow.vip_filter = words.to_vec();
        Ok(())
    }

    /// Replaces the Maglev table of service `id` atomically.
    pub fn swap_table(&mut self, id: u32, table: &[u32]) -> Result<()> {
        self.swap_words(id, lb_common::maglev_words(table).into())
    }

    /// Replaces the Maglev table of service `id` atomically, given as its array's words.
    fn swap_words(&mut self, id: u32, words: Arc<[u64]>) -> Result<()> {
        let slots = words.len() * lb_common::MAGLEV_SLOTS_PER_WORD as usize;
        let inner =
            Array::<MapData, u64>::create(words.len() as u32, lb_common::MAGLEV_TABLE_FLAGS)
                .map_err(map_err(format!("creating a Maglev table of {slots} slots")))?;
        fill_mmapable_array(inner.map(), &words)
            .map_err(io_err(format!("filling a Maglev table of {slots} slots")))?;
        self.maps
            .maglev
            .set(id, &inner, 0)
            .map_err(map_err(format!(
                "swapping in the Maglev table of service {id}"
            )))?;
        self.shadow.maglev.insert(id, words);
        Ok(())
    }

    /// Empties the Maglev slot of a service id that has no service any more.
    fn delete_table(&mut self, id: u32) -> Result<()> {
        // aya's ArrayOfMaps lends out no descriptor: the pin gives one.
        let pin = maps_dir(&self.bpffs_dir).join(maps::MAGLEV);
        let maglev = MapData::from_pin(&pin)
            .map_err(map_err(format!("opening the pinned map {}", pin.display())))?;
        match map_delete(&maglev, id) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(io_err(format!("removing the Maglev table of service {id}"))(e)),
        }
        self.shadow.maglev.remove(&id);
        Ok(())
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

    /// What the maps hold, as far as lbd fills them.
    pub fn fill(&self) -> &Fill {
        &self.shadow
    }

    /// Makes the maps hold exactly `want`, writing only what differs, in an order that never
    /// lets a packet find a half-made change: new redirect targets first; keys that go before
    /// anything they name; fragments of ids that change hands forgotten; backend entries
    /// (down ones flagged) before the tables that name them; tables before the keys that lead
    /// to them; the VIP filter's bits before new keys; what nothing names any more last.
    pub fn apply(&mut self, want: &Fill) -> Result<()> {
        if self.shadow.config != want.config {
            self.write_config(want.config)?;
        }
        for (&ifindex, &target) in &want.devmap {
            if self.shadow.devmap.get(&ifindex) != Some(&target)
                && let Err(e) = self.add_egress(ifindex)
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
                self.set_backend(id, b)?;
            }
        }
        for (&id, words) in &want.maglev {
            if self.shadow.maglev.get(&id) != Some(words) {
                self.swap_words(id, words.clone())?;
            }
        }
        if self.shadow.vip_filter != want.vip_filter {
            self.write_vip_filter(&want.vip_filter)?;
        }
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
            self.clear_backend(id)?;
        }
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

    /// Sets of the connection table (a power of two).
    fn conntrack_sets(&self) -> Result<u32> {
        Ok(self
            .maps
            .conntrack
            .map()
            .info()
            .map_err(map_err("reading CONNTRACK"))?
            .max_entries())
    }

    /// Where the connection table keeps `key`: its set index and its hash.
    fn flow_place(&self, key: &FlowKey) -> Option<(u32, u64)> {
        let config = self.maps.config.get(&0, 0).ok()?;
        let hash = lb_common::hash::flow_hash(&config.hash_key, key);
        Some((hash as u32 & config.flow_set_mask, hash))
    }

    /// What the connection table says about a flow.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        self.flow_entry(key).map(|e| e.value())
    }

    /// The connection-table entry of a flow, as stored (with its `seen` stamp).
    pub fn flow_entry(&self, key: &FlowKey) -> Option<FlowEntry> {
        let (index, hash) = self.flow_place(key)?;
        let set = self.maps.conntrack.get(&index, 0).ok()?;
        set.find(hash).copied()
    }

    /// The connection table's set of a flow (for tests that fill one set).
    pub fn flow_set(&self, key: &FlowKey) -> Option<u32> {
        self.flow_place(key).map(|(index, _)| index)
    }

    /// Records `value` for a flow the way the program does (`FlowSet::place`), as seen at clock
    /// 1 (long ago): for benchmarks and tests that fill the table.
    pub fn set_flow(&mut self, key: &FlowKey, value: FlowValue) -> Result<()> {
        let (index, hash) = self
            .flow_place(key)
            .ok_or_else(|| DatapathError::Other("CONFIG is not set".into()))?;
        let mut set = self
            .maps
            .conntrack
            .get(&index, 0)
            .map_err(map_err("reading CONNTRACK"))?;
        let (found, victim) = set.place(hash, 1);
        set.ways[found.unwrap_or(victim)] = FlowEntry::new(hash, value.backend, value.service, 1);
        self.maps
            .conntrack
            .set(index, set, 0)
            .map_err(map_err("writing CONNTRACK"))
    }

    /// Removes a flow's entry, if it has one.
    pub fn forget_flow(&mut self, key: &FlowKey) -> Result<()> {
        let Some((index, hash)) = self.flow_place(key) else {
            return Ok(());
        };
        let mut set = self
            .maps
            .conntrack
            .get(&index, 0)
            .map_err(map_err("reading CONNTRACK"))?;
        if let (Some(way), _) = set.place(hash, 1) {
            set.ways[way] = FlowEntry::default();
            self.maps
                .conntrack
                .set(index, set, 0)
                .map_err(map_err("writing CONNTRACK"))?;
        }
        Ok(())
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
        let memory = ArrayMemory::map(self.maps.conntrack.map(), sets * size_of::<FlowSet>(), true)
            .map_err(io_err("mapping CONNTRACK"))?;
        let base = memory.base.cast::<FlowEntry>();
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
            // SAFETY: entry i lies inside the mapping (sets × FLOW_WAYS entries).
            unsafe {
                base.add(i)
                    .write_volatile(FlowEntry::new(hash, value.backend, value.service, 1))
            };
        }
        Ok(())
    }

    /// Empties the connection table (every flow then takes the Maglev table's choice).
    pub fn clear_flows(&mut self) -> Result<()> {
        let sets = self.conntrack_sets()? as usize;
        let memory = ArrayMemory::map(self.maps.conntrack.map(), sets * size_of::<FlowSet>(), true)
            .map_err(io_err("mapping CONNTRACK"))?;
        // SAFETY: the mapping covers `sets` FlowSets; the program may write entries meanwhile,
        // and a byte-wise zeroing races with it harmlessly (a torn entry belongs to no flow).
        unsafe { std::ptr::write_bytes(memory.base.cast::<FlowSet>(), 0, sets) };
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

    /// Makes `ifindex` a redirect target (a backend reached through another interface).
    pub fn add_egress(&mut self, ifindex: u32) -> Result<()> {
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

/// Element `index` of a per-CPU counter array, summed over the CPUs (0 when unreadable).
pub(crate) fn per_cpu_total(map: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    map.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

fn sum_counters(values: Option<aya::maps::PerCpuValues<Counter>>) -> Counter {
    values
        .map(|v| {
            v.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            })
        })
        .unwrap_or_default()
}

/// The value area of a BPF_F_MMAPABLE array, mapped into this process (unmapped on drop).
struct ArrayMemory {
    base: *mut libc::c_void,
    len: usize,
}

impl ArrayMemory {
    /// Maps the first `bytes` of `map`'s values (rounded up to pages), shared.
    fn map(map: &MapData, bytes: usize, writable: bool) -> io::Result<ArrayMemory> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = bytes.max(1).div_ceil(page) * page;
        let fd = map.fd().as_fd().as_raw_fd();
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: mapping `len` bytes of the map's value area (the kernel sized it for every
        // element, rounded up to pages), shared; the result is checked below.
        let base = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(ArrayMemory { base, len })
    }
}

impl Drop for ArrayMemory {
    fn drop(&mut self) {
        // SAFETY: `base` and `len` are exactly what mmap returned and was given.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Writes `values` into a new BPF_F_MMAPABLE array of u64 through its memory: one copy instead
/// of a syscall per element (a 65,537-slot table: ~60 ms of syscalls otherwise).
fn fill_mmapable_array(map: &MapData, values: &[u64]) -> io::Result<()> {
    let memory = ArrayMemory::map(map, std::mem::size_of_val(values), true)?;
    // SAFETY: the mapping holds `values.len()` 8-byte elements; the map is new and not yet
    // visible to the program, so nothing else writes it.
    unsafe {
        std::ptr::copy_nonoverlapping(values.as_ptr(), memory.base.cast::<u64>(), values.len())
    };
    Ok(())
}

/// The keys of `have` that `keep` does not keep (what `apply` removes).
fn absent<'a, K: Copy + 'a>(
    have: impl Iterator<Item = &'a K>,
    keep: impl Fn(&K) -> bool,
) -> Vec<K> {
    have.filter(|k| !keep(k)).copied().collect()
}

/// The first `len` u64 values of a BPF_F_MMAPABLE array, read through its memory.
fn read_mmapable_array(map: &MapData, len: usize) -> io::Result<Arc<[u64]>> {
    let memory = ArrayMemory::map(map, len * 8, false)?;
    let base = memory.base.cast::<u64>();
    // SAFETY: the mapping holds at least `len` aligned 8-byte elements; the program may write
    // them meanwhile, hence volatile reads of whole words.
    Ok((0..len)
        .map(|i| unsafe { base.add(i).read_volatile() })
        .collect())
}

/// Deletes `key` from the map `map` (BPF_MAP_DELETE_ELEM): aya 0.14 has no `remove` for an
/// array of maps, where deleting an element empties its slot.
fn map_delete(map: &MapData, key: u32) -> io::Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    // bpf_attr for BPF_MAP_DELETE_ELEM: map_fd (u32), padding, key (u64 pointer).
    let mut attr = [0u64; 16];
    attr[0] = map.fd().as_fd().as_raw_fd() as u32 as u64;
    attr[1] = &key as *const u32 as u64;
    // SAFETY: attr names an open map fd and a key that outlives the call; the kernel only
    // reads both.
    unsafe { bpf_syscall(BPF_MAP_DELETE_ELEM, &mut attr) }.map(|_| ())
}

/// Counts the connection table's flows on its own read-only mapping of the pinned table, so
/// counting (a scan of its memory: ~16 MiB at the default size) never holds up the daemon and
/// costs no syscalls.
pub struct ConntrackCounter {
    _map: MapData,
    memory: ArrayMemory,
    sets: usize,
}

// SAFETY: the mapping is only read, through volatile loads; it stays valid as long as the
// counter (which holds the map open) lives.
unsafe impl Send for ConntrackCounter {}

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
        let base = self.memory.base.cast::<FlowEntry>();
        let used = (0..entries)
            // SAFETY: entry i lies inside the mapping (sets × FLOW_WAYS entries); the program
            // writes it meanwhile, hence a volatile read of the one field that is needed.
            .filter(|&i| unsafe { std::ptr::addr_of!((*base.add(i)).seen).read_volatile() } != 0)
            .count();
        (used as u64, entries as u64)
    }
}

/// Takes lb out of the path: removes every link pin under `bpffs_dir` (which detaches the
/// program) and every map pin, then the folders. Missing pins are not an error.
pub fn cleanup(bpffs_dir: &Path) -> Result<Vec<String>> {
    let mut removed = vec![];
    let entries = match fs::read_dir(bpffs_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(io_err(format!("reading {}", bpffs_dir.display()))(e)),
    };
    // Links first, so the program stops before its maps go.
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort_by_key(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("link_"))
    });
    for path in paths {
        if path.is_dir() {
            fs::remove_dir_all(&path).map_err(io_err(format!("removing {}", path.display())))?;
        } else {
            fs::remove_file(&path).map_err(io_err(format!("removing {}", path.display())))?;
        }
        removed.push(path.display().to_string());
    }
    match fs::remove_dir(bpffs_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("removing {}", bpffs_dir.display()))(e)),
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    //! `apply` on real maps (needs root and a bpffs at /sys/fs/bpf): whatever the maps held
    //! before, they hold exactly the fill afterwards, as maps filled from empty do.

    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A data path on maps of its own (program loaded, not attached); its pins go on drop.
    struct Scratch {
        dp: Datapath,
        dir: PathBuf,
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    fn scratch() -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        // `lbt<pid>x<n>-...`: the test harness's reaper removes it should this process die.
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/lbt{}x0-fill{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let dp = Datapath::open(&dir, 1024, &[]).expect("loading the program (needs root)");
        Scratch { dp, dir }
    }

    /// A small deterministic generator (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A fill of a few services (ids 0..8, keys on two VIPs), backends (ids 0..24), tables and
    /// VIP entries drawn at random; DEVMAP names only `lo` (it must name real interfaces).
    fn random_fill(rng: &mut Rng, config: Config) -> Fill {
        let mut f = Fill {
            config,
            ..Fill::default()
        };
        for id in 0..8u32 {
            if rng.below(3) == 0 {
                continue;
            }
            let key = ServiceKey {
                addr: [0x0a71_00cb + ((rng.below(2) as u32) << 24), 0, 0, 0],
                port: (rng.below(4) as u16 + 1).to_be(),
                proto: if rng.below(2) == 0 { 6 } else { 17 },
                family: 4,
            };
            if f.services.contains_key(&key) {
                continue;
            }
            let value = ServiceValue {
                id,
                flags: rng.below(2) as u32,
                table_size: 7,
                _pad: 0,
            };
            f.services.insert(key, value);
            f.service_by_id.insert(id, ServiceEntry { key, value });
            let words: Vec<u64> = (0..2 + rng.below(3)).map(|_| rng.below(4)).collect();
            f.maglev.insert(id, words.into());
            f.vips.insert(
                VipKey {
                    addr: key.addr,
                    proto: key.proto,
                    family: 4,
                    _pad: [0; 2],
                },
                value,
            );
        }
        for id in 0..24u32 {
            if rng.below(2) == 0 {
                continue;
            }
            let service = *f.service_by_id.keys().next().unwrap_or(&0);
            f.backends.insert(
                id,
                Backend {
                    addr: [rng.below(4) as u32 + 1, 0, 0, 0],
                    mac: [2, 0, 0, 0, 0, rng.below(3) as u8],
                    ifindex: 1,
                    service,
                    family: 4,
                    flags: backend_flags::VALID | (rng.below(2) as u8 * backend_flags::DOWN),
                    mtu: 1500,
                    ..Backend::default()
                },
            );
        }
        f.vip_filter = vip_filter_words(f.services.keys());
        if rng.below(2) == 0 {
            f.devmap.insert(1, 1);
        }
        f
    }

    #[test]
    fn where_a_pinned_link_is() {
        let facts = LinkFacts {
            id: 9,
            program_id: 42,
            ifindex: 3,
            is_xdp: true,
        };
        let iface = |index: u32, name: &str, programs: &[u32]| crate::netlink::Interface {
            index,
            name: name.into(),
            mac: [0; 6],
            mtu: 1500,
            addrs: vec![],
            up: true,
            vlan: None,
            xdp_programs: programs.to_vec(),
        };
        let here = iface(3, "eth0", &[42]);
        assert_eq!(LinkPlace::of(&facts, Some(&here), "eth0"), LinkPlace::Here);
        let renamed = iface(3, "eth0-old", &[42]);
        assert_eq!(
            LinkPlace::of(&facts, Some(&renamed), "eth0"),
            LinkPlace::OtherInterface {
                name: "eth0-old".into()
            }
        );
        // Index 3 here runs no program of that link: the link is another namespace's.
        let unrelated = iface(3, "eth0", &[]);
        assert_eq!(
            LinkPlace::of(&facts, Some(&unrelated), "eth0"),
            LinkPlace::Foreign
        );
        assert_eq!(LinkPlace::of(&facts, None, "eth0"), LinkPlace::Foreign);
        let defunct = LinkFacts {
            ifindex: 0,
            ..facts
        };
        assert_eq!(
            LinkPlace::of(&defunct, Some(&here), "eth0"),
            LinkPlace::Defunct
        );
    }

    #[test]
    fn apply_leaves_exactly_the_fill_whatever_came_before() {
        let mut running = scratch();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for step in 0..60 {
            let config = running.dp.config_for([step, step + 1]).unwrap();
            let want = random_fill(&mut rng, config);
            running.dp.apply(&want).unwrap();
            let held = Fill::read_pinned(&running.dir).unwrap();
            let diff = held.diff(&want);
            assert!(diff.is_empty(), "step {step}: {diff:#?}");
            assert_eq!(running.dp.fill(), &want, "step {step}: the shadow");
            if step % 20 == 19 {
                // The same fill on new, empty maps.
                let mut fresh = scratch();
                fresh.dp.apply(&want).unwrap();
                let diff = Fill::read_pinned(&fresh.dir).unwrap().diff(&held);
                assert!(diff.is_empty(), "step {step}, fresh: {diff:#?}");
            }
        }
        // And back to nothing.
        let empty = Fill {
            config: running.dp.config_for([0, 0]).unwrap(),
            vip_filter: vip_filter_words([]),
            ..Fill::default()
        };
        running.dp.apply(&empty).unwrap();
        assert_eq!(Fill::read_pinned(&running.dir).unwrap(), empty);
    }

    #[test]
    fn fragments_of_ids_that_change_meaning_are_forgotten() {
        let mut s = scratch();
        let mut rng = Rng(7);
        let config = s.dp.config_for([1, 2]).unwrap();
        let mut want = random_fill(&mut rng, config);
        while want.service_by_id.is_empty() || want.backends.is_empty() {
            want = random_fill(&mut rng, config);
        }
        let (&sid, entry) = want.service_by_id.iter().next().unwrap();
        let entry = *entry;
        let bid = *want.backends.keys().next().unwrap();
        for b in want.backends.values_mut() {
            b.service = sid;
        }
        s.dp.apply(&want).unwrap();
        let frag = |id: u32| FragKey {
            src: [id, 0, 0, 0],
            dst: entry.key.addr,
            id,
            proto: entry.key.proto,
            family: 4,
            _pad: [0; 2],
        };
        let value = FragValue {
            backend: bid,
            service: entry.value,
        };
        let keys = |s: &Scratch| -> Vec<u32> {
            let mut v: Vec<u32> = read_pinned_frags(&s.dir)
                .unwrap()
                .into_iter()
                .map(|(k, _)| k.id)
                .collect();
            v.sort();
            v
        };
        s.dp.maps.frags.insert(frag(1), value, 0).unwrap();
        // A change elsewhere keeps the datagram's entry.
        let mut other = want.clone();
        other.config.hash_key = [3, 4];
        s.dp.apply(&other).unwrap();
        assert_eq!(keys(&s), [1]);
        // The service's flags change (dsr to tunnel): its fragments are forgotten.
        let mut retyped = other.clone();
        let mut e = entry;
        e.value.flags ^= 1;
        retyped.service_by_id.insert(sid, e);
        retyped.services.insert(e.key, e.value);
        s.dp.apply(&retyped).unwrap();
        assert_eq!(keys(&s), Vec::<u32>::new());
        // The service goes, and a new one takes its id with the same value and backend id.
        s.dp.apply(&other).unwrap();
        s.dp.maps.frags.insert(frag(2), value, 0).unwrap();
        let mut gone = other.clone();
        gone.services.remove(&entry.key);
        gone.service_by_id.remove(&sid);
        gone.maglev.remove(&sid);
        gone.vip_filter = vip_filter_words(gone.services.keys());
        gone.backends.retain(|_, b| b.service != sid);
        s.dp.apply(&gone).unwrap();
        assert_eq!(
            keys(&s),
            Vec::<u32>::new(),
            "removing the service forgets them"
        );
        s.dp.maps.frags.insert(frag(3), value, 0).unwrap();
        s.dp.apply(&other).unwrap();
        assert_eq!(
            keys(&s),
            Vec::<u32>::new(),
            "an entry made while the id had no service is not honoured once it has one"
        );
    }
}
