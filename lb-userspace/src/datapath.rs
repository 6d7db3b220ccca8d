//! The only code that touches the XDP program and its maps: loading, attaching and pinning,
//! filling the maps, swapping Maglev tables, reading counters, and removing it all.
//!
//! Pins live under `bpffs_dir`:
//! - `link_<interface>`: the program's bpf_link on each interface (removing it detaches);
//! - `v<LAYOUT_VERSION>/<MAP>`: every map. A layout change gets a new folder, so an lbd never
//!   opens maps of a layout it does not know as its own.

use std::{
    fs, io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
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
    Backend, Config, Counter, FlowEntry, FlowKey, FlowSet, FlowValue, LAYOUT_VERSION, MAX_BACKENDS,
    PROGRAM_NAME, Reason, ServiceEntry, ServiceKey, ServiceValue, VIP_FILTER_WORDS, VipKey,
    backend_flags, conntrack_sets, maps, vip_filter_bits,
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

/// A stable fingerprint of the program object (FNV-1a), kept in CONFIG: a restarted lbd whose
/// program is the running one adopts it instead of reloading.
pub fn program_hash(object: &[u8]) -> u64 {
    object.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
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
        let maps = Maps::from_ebpf(&mut ebpf)?;
        let start = if !old.is_empty() {
            let old_layouts: Vec<String> = old.iter().map(|p| p.display().to_string()).collect();
            info!(
                "pins of another map layout found ({}): this lbd (layout v{LAYOUT_VERSION}) replaces program and maps in one step, without migrating their contents",
                old_layouts.join(", ")
            );
            Start::Replaced { old_layouts }
        } else if interfaces.iter().any(|i| link_pin(bpffs_dir, i).exists()) {
            info!(
                "a different program is running: it will be replaced in place through its pinned link"
            );
            Start::Upgraded
        } else {
            Start::Fresh
        };
        Ok(Datapath {
            ebpf: Some(ebpf),
            bpffs_dir: bpffs_dir.to_owned(),
            maps,
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
        Ok(Some(Datapath {
            ebpf: None,
            bpffs_dir: bpffs_dir.to_owned(),
            maps,
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
            self.maps
                .config
                .set(0, value, 0)
                .map_err(map_err("writing CONFIG"))?;
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
                    self.attachments.push(Attachment {
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
                    self.attachments.push(Attachment {
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

    /// Writes `CONFIG`: the hash seed, this program's fingerprint, the connection table's
    /// mask.
    ///
    /// When upgrading, the old program keeps running on these maps (and on its own connection
    /// table, which may be smaller than the new one) until `attach` swaps the new one in. Until
    /// then `CONFIG` holds the smaller of the two masks, so neither program indexes its table
    /// past its end (the old one would pass such flows up unbalanced), and the old program's
    /// fingerprint, so an lbd that dies before the swap is followed by one that upgrades
    /// again rather than adopting the old program as its own. `finish_start` writes the rest.
    pub fn set_config(&mut self, hash_key: [u64; 2]) -> Result<()> {
        let sets = self.conntrack_sets()?;
        let value = Config {
            hash_key,
            program_hash: self.program_hash,
            layout_version: LAYOUT_VERSION,
            flow_set_mask: sets - 1,
        };
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
            .map_err(map_err("writing CONFIG"))
    }

    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.maps
            .backends
            .set(id, backend, 0)
            .map_err(map_err(format!("writing backend {id}")))
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
        self.sync_vip_filter(Some(key))?;
        self.maps
            .service_by_id
            .set(
                value.id,
                ServiceEntry {
                    key: *key,
                    value: *value,
                },
                0,
            )
            .map_err(map_err(format!("writing service {} by id", value.id)))?;
        self.maps
            .services
            .insert(key, value, 0)
            .map_err(map_err(format!("writing service {}", value.id)))
    }

    /// Sets `VIP_FILTER` to exactly the bits of the services' VIPs (and of `adding`'s).
    /// Written through the array's memory, a word at a time: a word only gains bits while a
    /// VIP is added, and loses them only once no key needs them any more.
    fn sync_vip_filter(&mut self, adding: Option<&ServiceKey>) -> Result<()> {
        let mut words = vec![0u64; VIP_FILTER_WORDS as usize];
        let keys = self.service_keys();
        for key in keys.iter().map(|(k, _)| k).chain(adding) {
            for bit in vip_filter_bits(&key.addr) {
                words[(bit >> 6) as usize] |= 1 << (bit & 63);
            }
        }
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
        Ok(())
    }

    /// Replaces the Maglev table of service `id` atomically.
    pub fn swap_table(&mut self, id: u32, table: &[u32]) -> Result<()> {
        let size = table.len() as u32;
        let words = lb_common::maglev_words(table);
        let inner =
            Array::<MapData, u64>::create(words.len() as u32, lb_common::MAGLEV_TABLE_FLAGS)
                .map_err(map_err(format!("creating a Maglev table of {size} slots")))?;
        fill_mmapable_array(inner.map(), &words)
            .map_err(io_err(format!("filling a Maglev table of {size} slots")))?;
        self.maps.maglev.set(id, &inner, 0).map_err(map_err(format!(
            "swapping in the Maglev table of service {id}"
        )))
    }

    /// Removes a service key: the key first (no new packet finds it), then its entry by id
    /// (unless the id now answers to another key) and its VIP's filter bits.
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        let id = self.maps.services.get(key, 0).ok().map(|v| v.id);
        match self.maps.services.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err("removing a service")(e)),
        }
        if let Some(id) = id
            && self
                .maps
                .service_by_id
                .get(&id, 0)
                .is_ok_and(|e| e.key == *key)
        {
            self.maps
                .service_by_id
                .set(id, ServiceEntry::default(), 0)
                .map_err(map_err(format!("clearing service {id} by id")))?;
        }
        self.sync_vip_filter(None)
    }

    /// Every service key in the map (to remove those the config no longer has).
    pub fn service_keys(&self) -> Vec<(ServiceKey, ServiceValue)> {
        self.maps.services.iter().filter_map(|r| r.ok()).collect()
    }

    /// Every backend entry in use, by id (a restarted lbd keeps the ids the data path uses).
    pub fn backend_entries(&self) -> Vec<(u32, Backend)> {
        (0..MAX_BACKENDS)
            .filter_map(|id| {
                let b = self.maps.backends.get(&id, 0).ok()?;
                (b.flags & backend_flags::VALID != 0).then_some((id, b))
            })
            .collect()
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
        }
        let stale: Vec<VipKey> = self
            .maps
            .vips
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !entries.iter().any(|(e, _)| e == k))
            .collect();
        for k in stale {
            let _ = self.maps.vips.remove(&k);
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
            })
    }

    /// Frees a removed service's Maglev table (after its key is gone): the slot gets a
    /// two-entry table without backends until the id is reused.
    pub fn remove_table(&mut self, id: u32) -> Result<()> {
        self.swap_table(id, &[lb_common::NO_BACKEND; 2])
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
