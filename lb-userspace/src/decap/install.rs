//! `lbd decap`'s three jobs on one interface: install (attach and fill, or bring up to date),
//! remove, and status; and what they find of the interface (netlink) and of its pinned link.

use std::{
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use lb_common::decap::addr_flags;
use log::{info, warn};

use super::{
    Cidr, DECAP_OBJECT,
    program::{Decap, MAP_KINDS, Maps, allow_pin, map_pin, map_pins_of_any_layout},
};
use crate::{
    config,
    datapath::link::{self, LinkFacts, LinkPlace, link_facts, link_pin},
    lock,
    netlink::{Interface, Netlink},
};

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
        link::unpin(&link).with_context(|| format!("removing {}", link.display()))?;
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
                    link::replace(decap.program_mut(), &link)?;
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
                let attached = link::attach(
                    decap.program_mut(),
                    "the decapsulation program",
                    interface,
                    target.iface.index,
                    link::modes(config::XdpMode::Auto),
                    &link,
                )?;
                (Action::Attached(attached.mode), attached.link_id)
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
        link::unpin(&link).with_context(|| format!("removing {}", link.display()))?;
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

pub(super) fn list<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".into();
    }
    items
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
