//! XDP links, for lbd's data path and for `lbd decap` alike: where a link is pinned, attaching
//! a program and pinning its link (native mode, else generic, as asked), replacing the program
//! in a pinned link atomically (BPF_LINK_UPDATE: traffic sees no gap), reading what the kernel
//! says of a pinned link, where it is seen from this namespace, and detaching (removing the
//! pin). Pinned links keep their program attached after the process that made them exits.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::programs::{
    Xdp,
    links::{FdLink, PinnedLink},
    xdp::{XdpLink, XdpMode},
};
use log::warn;

pub use super::error::LinkError;
use super::{error::error_chain, sys};
use crate::config;

/// Where the link of `interface` is pinned under `bpffs_dir`: `link_<interface>`.
pub fn link_pin(bpffs_dir: &Path, interface: &str) -> PathBuf {
    bpffs_dir.join(format!("link_{interface}"))
}

/// The modes to try, in order, for a configured `mode`, each with its name in messages.
pub fn modes(mode: config::XdpMode) -> &'static [(XdpMode, &'static str)] {
    match mode {
        config::XdpMode::Native => &[(XdpMode::Driver, "native")],
        config::XdpMode::Generic => &[(XdpMode::Skb, "generic")],
        config::XdpMode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
    }
}

/// A program attached and its link pinned: the mode that worked, and the link's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    pub mode: &'static str,
    pub link_id: u32,
}

/// Attaches the loaded `program` (`what` it is, for messages) to `interface` in the first of
/// `modes` that works, and pins its link at `pin`.
pub fn attach(
    program: &mut Xdp,
    what: &'static str,
    interface: &str,
    ifindex: u32,
    modes: &[(XdpMode, &'static str)],
    pin: &Path,
) -> Result<Attached, LinkError> {
    let mut tried = vec![];
    for (n, &(mode, label)) in modes.iter().enumerate() {
        match program.attach_to_if_index(ifindex, mode) {
            Ok(id) => {
                let link = program.take_link(id).map_err(|e| LinkError::Take {
                    interface: interface.into(),
                    cause: error_chain(&e),
                })?;
                let fd_link = FdLink::try_from(link).map_err(|e| LinkError::NoBpfLink {
                    interface: interface.into(),
                    cause: error_chain(&e),
                })?;
                let link_id = fd_link.info().map(|i| i.id()).unwrap_or(0);
                fd_link.pin(pin).map_err(|e| LinkError::Pin {
                    interface: interface.into(),
                    path: pin.into(),
                    cause: error_chain(&e),
                })?;
                return Ok(Attached {
                    mode: label,
                    link_id,
                });
            }
            Err(e) => {
                let cause = error_chain(&e);
                if n + 1 < modes.len() {
                    warn!("{interface}: {label} XDP attach failed ({cause}); trying the next mode");
                }
                tried.push(format!("{label}: {cause}"));
            }
        }
    }
    Err(LinkError::Attach {
        interface: interface.into(),
        program: what,
        tried,
    })
}

/// Replaces the program of the XDP link pinned at `pin` by `program`, atomically
/// (BPF_LINK_UPDATE): the link's id. The link stays pinned and attached.
pub fn replace(program: &mut Xdp, pin: &Path) -> Result<u32, LinkError> {
    let failed = |what: &'static str| {
        move |cause: String| LinkError::Pinned {
            what,
            path: pin.into(),
            cause,
        }
    };
    let pinned = PinnedLink::from_pin(pin)
        .map_err(|e| failed("opening the pinned link")(error_chain(&e)))?;
    let fd_link: FdLink = pinned.into();
    let link_id = fd_link
        .info()
        .map(|i| i.id())
        .map_err(|e| failed("reading the pinned link")(error_chain(&e)))?;
    let xdp_link = XdpLink::try_from(fd_link)
        .map_err(|e| failed("using as an XDP link the pinned link")(error_chain(&e)))?;
    let id = program
        .attach_to_link(xdp_link)
        .map_err(|e| failed("replacing the program in the pinned link")(error_chain(&e)))?;
    // The link stays pinned; dropping our handle must not detach it.
    let link = program
        .take_link(id)
        .map_err(|e| failed("replacing the program in the pinned link")(error_chain(&e)))?;
    drop(link);
    Ok(link_id)
}

/// Removes the link pin at `pin`, which detaches its program unless something else holds the
/// link: whether there was one.
pub fn unpin(pin: &Path) -> io::Result<bool> {
    match fs::remove_file(pin) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
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

const BPF_LINK_TYPE_XDP: u32 = 6;

/// The facts of the link pinned at `pin` (aya 0.14 does not expose the XDP part of a link's
/// info: its interface).
pub fn link_facts(pin: &Path) -> io::Result<LinkFacts> {
    let info = sys::link_info_head(pin)?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
