//! `lbd decap`: puts lb's decapsulation program on a backend's interface, for `tunnel`
//! services on hosts without an ipip device. The program strips the outer header of
//! IPv4-in-IPv4 and IPv6-in-IPv6 packets addressed to one of the interface's own addresses and
//! passes everything else untouched; this module loads it, fills its address map from netlink,
//! attaches it (native XDP, else generic), pins link and map, and takes them away again.
//!
//! Pins, under `bpffs_dir` (default `/sys/fs/bpf/lb-decap`):
//! - `link_<interface>`: the program's bpf_link (removing it detaches the program);
//! - `addrs_v<layout>_<interface>`: the interface's own addresses (one map per interface).
//!
//! Interface names are only unique within a network namespace: hosts that run `lbd decap` in
//! several namespaces give each namespace its own `--bpffs-dir`.
//!
//! Running it again changes nothing when the pinned link is still the one on the interface and
//! runs this very program: only the address map is brought up to date (so re-running it after
//! an address change is how the map follows the interface). A different build of the program
//! is swapped in atomically through the pinned link; a link whose interface is gone is replaced.

use std::{
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, IterableMap as _, MapData},
    programs::{
        Xdp,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpMode},
    },
};
use lb_common::{
    FAMILY_V4, FAMILY_V6,
    decap::{ADDRS, AddrKey, LAYOUT_VERSION, MAX_ADDRS, PROGRAM_NAME},
};
use log::{info, warn};

use crate::{
    datapath::{self, LinkFacts, LinkPlace, link_facts},
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
    bpffs_dir.join(format!("addrs_v{LAYOUT_VERSION}_{interface}"))
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

/// The decapsulation program, loaded (verified) but not attached, and its address map.
pub struct Decap {
    ebpf: Ebpf,
    addrs: HashMap<MapData, AddrKey, u8>,
}

impl Decap {
    /// Loads the program with its address map pinned at `addrs_pin`: an existing pin is
    /// reused, else the map is created and pinned there (its folder must be on a bpffs).
    pub fn load(addrs_pin: &Path) -> Result<Decap> {
        if DECAP_OBJECT.is_empty() {
            bail!(
                "this lbd was built without its decapsulation program (AYA_BUILD_SKIP was set): rebuild it normally"
            );
        }
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(ADDRS, addrs_pin)
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
        let map = ebpf
            .take_map(ADDRS)
            .ok_or_else(|| anyhow!("map {ADDRS} missing from the object"))?;
        let addrs = HashMap::try_from(map).context("opening the address map")?;
        Ok(Decap { ebpf, addrs })
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

    /// The kernel's id of the address map.
    pub fn addrs_map_id(&self) -> Result<u32> {
        Ok(self
            .addrs
            .map()
            .info()
            .context("reading the address map's info")?
            .id())
    }

    /// The addresses in the map.
    pub fn addrs(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self
            .addrs
            .keys()
            .filter_map(|k| k.ok())
            .filter_map(|k| key_addr(&k))
            .collect();
        v.sort();
        v
    }

    /// Makes the map hold exactly `addrs`: returns what was added and what removed.
    pub fn set_addrs(&mut self, addrs: &[IpAddr]) -> Result<(Vec<IpAddr>, Vec<IpAddr>)> {
        if addrs.len() > MAX_ADDRS as usize {
            bail!(
                "{} addresses: the decapsulation map holds at most {MAX_ADDRS}",
                addrs.len()
            );
        }
        let current = self.addrs();
        let added: Vec<IpAddr> = addrs
            .iter()
            .filter(|a| !current.contains(a))
            .copied()
            .collect();
        let removed: Vec<IpAddr> = current
            .iter()
            .filter(|a| !addrs.contains(a))
            .copied()
            .collect();
        // New ones first: an address that stays is never missing.
        for a in &added {
            self.addrs
                .insert(addr_key(*a), 1, 0)
                .with_context(|| format!("adding {a} to the address map"))?;
        }
        for a in &removed {
            self.addrs
                .remove(&addr_key(*a))
                .with_context(|| format!("removing {a} from the address map"))?;
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
    /// The pinned link already ran this program on this map: left as it was.
    Kept,
    /// The pinned link ran another build of the program (or on another map): replaced
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
    /// Every address now in the map, and the changes made to it.
    pub addrs: Vec<IpAddr>,
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
}

/// The interface as netlink sees it in this network namespace (with the ids of the XDP
/// programs attached to it), and its addresses, sorted.
struct Target {
    iface: Interface,
    addrs: Vec<IpAddr>,
}

async fn look_up(interface: &str) -> Result<Option<Target>> {
    let nl = Netlink::new()?;
    let Some(iface) = nl.interface_by_name(interface).await? else {
        return Ok(None);
    };
    let mut addrs: Vec<IpAddr> = iface.addrs.iter().map(|(a, _)| *a).collect();
    addrs.sort();
    addrs.dedup();
    Ok(Some(Target { iface, addrs }))
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
/// address map with the interface's addresses and pins both under `bpffs_dir` (mounting a
/// bpffs at /sys/fs/bpf when the folder lies under it and none is there). When the pinned link
/// is already on the interface, only the address map is brought up to date (and a different
/// build of the program swapped in through the link).
pub fn install(interface: &str, bpffs_dir: &Path) -> Result<Report> {
    if DECAP_OBJECT.is_empty() {
        bail!(
            "this lbd was built without its decapsulation program (AYA_BUILD_SKIP was set): rebuild it normally"
        );
    }
    let target = target(interface)?
        .ok_or_else(|| anyhow!("no interface {interface} in this network namespace"))?;
    datapath::prepare_bpffs(bpffs_dir)
        .with_context(|| format!("preparing the pin folder {}", bpffs_dir.display()))?;
    let link = link_pin(bpffs_dir, interface);
    let map = addrs_pin(bpffs_dir, interface);
    let pinned = inspect_pin(&link, interface, Some(&target))?;
    if let Pinned::Defunct = pinned {
        warn!(
            "{}: its interface is gone; attaching anew to {interface}",
            link.display()
        );
        fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
    }
    let map_existed = map.exists();
    let result = (|| {
        let mut decap = Decap::load(&map)?;
        let (added, removed) = decap.set_addrs(&target.addrs)?;
        let (action, link_id) = match &pinned {
            Pinned::Working(facts) => {
                let (_, tag) = decap.program_id_and_tag()?;
                let running = aya::programs::loaded_programs()
                    .filter_map(|p| p.ok())
                    .find(|p| p.id() == facts.program_id);
                let same_map = running
                    .as_ref()
                    .and_then(|p| p.map_ids().ok().flatten())
                    .is_some_and(|ids| decap.addrs_map_id().is_ok_and(|m| ids.contains(&m)));
                if running.is_some_and(|p| p.tag() == tag) && same_map {
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
        Ok(Report {
            interface: interface.to_string(),
            ifindex: target.iface.index,
            action,
            link_id,
            program_id,
            addrs: decap.addrs(),
            added,
            removed,
        })
    })();
    if result.is_err() && !map_existed && !link.exists() {
        // Leave nothing behind from a failed first attach.
        let _ = fs::remove_file(&map);
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
/// address map pin, then the folder if nothing else is left in it. Returns the paths removed;
/// nothing pinned is not an error.
pub fn remove(interface: &str, bpffs_dir: &Path) -> Result<Vec<PathBuf>> {
    let link = link_pin(bpffs_dir, interface);
    let map = addrs_pin(bpffs_dir, interface);
    let mut removed = vec![];
    if link.exists() {
        let target = target(interface)?;
        // Refuses a link of another namespace's interface of the same name.
        inspect_pin(&link, interface, target.as_ref())?;
        fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        removed.push(link);
    }
    if map.exists() {
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

fn list(addrs: &[IpAddr]) -> String {
    if addrs.is_empty() {
        return "none".into();
    }
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `lbd decap`: install (or with `remove`, remove) and log what was done.
pub fn run(interface: &str, bpffs_dir: &Path, remove_it: bool) -> Result<()> {
    if remove_it {
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
    let r = install(interface, bpffs_dir)?;
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
            "{interface}: the pinned link ran another build of the program, or on another address map: replaced by program {} in link {}",
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
    if r.addrs.is_empty() {
        warn!(
            "{interface} has no addresses: nothing is decapsulated until it has (run lbd decap again then)"
        );
    } else {
        info!(
            "{interface}: decapsulating IP-in-IP packets to {}",
            list(&r.addrs)
        );
    }
    Ok(())
}
