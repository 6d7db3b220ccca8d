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
//!
//! Its parts: `install` (install, remove, status: what `lbd decap` does) may call `program`
//! (the program and its maps, their pins) and `cidr` (prefixes and map keys); the XDP link is
//! `datapath::link`'s, shared with lbd's own data path.

mod cidr;
mod install;
mod program;
#[cfg(test)]
mod tests;

use std::{net::IpAddr, path::Path};

use anyhow::Result;
use log::{info, warn};

pub use crate::datapath::link::link_pin;
pub use cidr::{Cidr, addr_key};
use install::list;
pub use install::{Action, Report, install, remove, status};
pub use program::{Decap, addrs_pin, allow_pin, stats_pin};

/// The decapsulation program, built by build.rs from lb-ebpf's `lb-decap` bin and embedded.
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));

/// Where `lbd decap` pins by default.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/lb-decap";

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
        // Before anything is touched: the kernel has what the program uses.
        Mode::Install => {
            crate::datapath::kernel::check_and_log(crate::datapath::kernel::Needs::Decap)?
        }
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
