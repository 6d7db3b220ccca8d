//! The interfaces lbd is configured for: whether the program is on each (`lbctl status`), a
//! pinned link left where it cannot serve (checked at start), and an interface that comes back
//! (the program attached anew).

use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, bail};
use log::{error, info, warn};

use super::apply::Shared;
use crate::{
    datapath::{self, LinkPlace},
    netlink::Netlink,
};

/// Whether the program is on an interface lbd is configured for (`lbctl status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InterfaceState {
    /// The interface exists here and its pinned link is on it.
    Attached,
    /// No interface of that name in this network namespace.
    Missing,
    /// The interface exists, but the program is not on it: its link is gone, detached (the
    /// interface was deleted and recreated), or on another interface.
    Detached,
}

/// An interface lbd is configured for, as it is now.
#[derive(Debug, Clone)]
pub struct InterfaceNow {
    pub state: InterfaceState,
    /// Its index here, when it exists.
    pub ifindex: Option<u32>,
    /// The pinned link, and where it is, when there is one.
    pub link: Option<(datapath::LinkFacts, LinkPlace)>,
}

/// Looks at interface `name` and its pinned link under `bpffs_dir` (link info and netlink).
pub async fn interface_now(
    netlink: &Netlink,
    bpffs_dir: &Path,
    name: &str,
) -> anyhow::Result<InterfaceNow> {
    let iface = netlink.interface_by_name(name).await?;
    let pin = datapath::link_pin(bpffs_dir, name);
    let link = match datapath::link_facts(&pin) {
        Ok(facts) => {
            let at_index = match facts.ifindex {
                0 => None,
                i => netlink.interface_by_index(i).await?,
            };
            Some((facts, LinkPlace::of(&facts, at_index.as_ref(), name)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(e).with_context(|| format!("reading the pinned link {}", pin.display()));
        }
    };
    let state = match (&iface, &link) {
        (None, _) => InterfaceState::Missing,
        (Some(_), Some((_, LinkPlace::Here))) => InterfaceState::Attached,
        (Some(_), _) => InterfaceState::Detached,
    };
    Ok(InterfaceNow {
        state,
        ifindex: iface.map(|i| i.index),
        link,
    })
}

/// At start, before the pins are opened: refuses a link pinned for `name` that is attached in
/// another network namespace (an lbd there uses the same `bpffs_dir`), and removes one that
/// is detached or on another interface here, so that the program is attached anew.
pub async fn check_pinned_link(
    netlink: &Netlink,
    bpffs_dir: &Path,
    name: &str,
) -> anyhow::Result<()> {
    let pin = datapath::link_pin(bpffs_dir, name);
    let Some((facts, place)) = interface_now(netlink, bpffs_dir, name).await?.link else {
        return Ok(());
    };
    match place {
        LinkPlace::Here => return Ok(()),
        LinkPlace::Foreign => bail!(
            "{} holds link {} attached to ifindex {} of another network namespace, not to {name} here: an lbd there uses the same daemon.bpffs_dir; give each network namespace's lbd a bpffs_dir of its own (nothing was changed)",
            pin.display(),
            facts.id,
            facts.ifindex
        ),
        LinkPlace::Defunct => warn!(
            "{name}: the pinned link {} is detached (its interface was deleted, or moved to another namespace): attaching anew",
            facts.id
        ),
        LinkPlace::OtherInterface { name: other } => warn!(
            "{name}: the pinned link {} is on {other} (renamed?), not on {name}: attaching anew to {name}",
            facts.id
        ),
    }
    std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))
}

/// Looks at every configured interface: logs what changed since `states`, and attaches the
/// program anew to one that is back (deleted and recreated, or renamed back while another
/// took its name) with its link detached or elsewhere. A link pin removed by hand (`lbd
/// --cleanup` of a running lbd) is left alone: the interface shows `detached`.
pub(super) async fn follow_interfaces(
    shared: &Shared,
    names: &[String],
    states: &mut HashMap<String, InterfaceState>,
) -> anyhow::Result<()> {
    let netlink = Netlink::new()?;
    let (bpffs_dir, mode) = {
        let d = shared.lock().await;
        (d.config.daemon.bpffs_dir.clone(), d.config.daemon.xdp_mode)
    };
    for name in names {
        let mut now = interface_now(&netlink, &bpffs_dir, name).await?;
        if let (Some(ifindex), Some((_, LinkPlace::Defunct | LinkPlace::OtherInterface { .. }))) =
            (now.ifindex, &now.link)
        {
            let mut d = shared.lock().await;
            match d.datapath.reattach(name, ifindex, mode) {
                Ok(()) => {
                    info!("{name} is back (ifindex {ifindex}): the program is attached to it anew");
                    now.state = InterfaceState::Attached;
                }
                Err(e) => {
                    error!("{name} is back (ifindex {ifindex}) but cannot take the program: {e}")
                }
            }
        }
        let before = states.insert(name.clone(), now.state);
        if before.is_some_and(|b| b != now.state) {
            match now.state {
                InterfaceState::Attached => info!("{name}: attached"),
                InterfaceState::Missing => warn!(
                    "{name} is gone: nothing is balanced there until it comes back (lbd attaches the program to it then)"
                ),
                InterfaceState::Detached => warn!(
                    "{name}: the program is not on it (its link pin {} is gone or elsewhere)",
                    datapath::link_pin(&bpffs_dir, name).display()
                ),
            }
        }
    }
    // The VIPs serve while the program is on at least one of the interfaces.
    let attached = names
        .iter()
        .any(|n| states.get(n) == Some(&InterfaceState::Attached));
    shared.lock().await.set_attached(attached);
    Ok(())
}
