//! The only code that touches the XDP program and its maps: loading, attaching and pinning,
//! filling the maps, swapping Maglev tables, reading counters, and removing it all.
//!
//! Pins live under `bpffs_dir`:
//! - `link_<interface>`: the program's bpf_link on each interface (removing it detaches);
//! - `v<LAYOUT_VERSION>/<MAP>`: every map. A layout change gets a new folder, so an lbd never
//!   opens maps of a layout it does not know as its own.
//!
//! Its parts, each of which may call only those listed after it (this file holds the
//! `Datapath` value and its types, `Start` and `Attachment`):
//! - `test_hooks` (feature `test-hooks`, for tests and benchmarks only): test runs, writes of
//!   single entries, the connection table by hand;
//! - `attach`: putting the program on interfaces (attach, swap into pinned links, reattach),
//!   and swapping the traced program in and out for `lbctl trace`;
//! - `load`: loading the program, `Datapath::open` (fresh, adopt, upgrade, new layout,
//!   reattach) and `finish_start`;
//! - `apply`: `Datapath::apply`, the only writer of the maps lbd fills, and its per-map writers;
//! - `slots`: each service's slot state (changed slots, their previous backends), the
//!   connection table's scan and the clearing of slots no flow needs any more;
//! - `read`: what the maps hold, flows, counters, `ConntrackCounter`;
//! - `fill`: the `Fill` value (what lbd writes), read from the maps, compared;
//! - `maps`: every map, opened from the object or from the pins;
//! - `link`: XDP links, shared with `lbd decap`: pin, attach, replace, facts, place, unpin;
//! - `pins`: the pin folder on bpffs, layouts, the pinned seed, `cleanup`;
//! - `kernel`: what the running kernel must offer, probed before anything is touched;
//! - `sys`: the few syscalls aya 0.14 does not make, and checked access to mmapped arrays
//!   (every `unsafe` of the data path lives there);
//! - `error`: `DatapathError`, `LinkError` and their adapters.

mod apply;
mod attach;
mod error;
mod fill;
pub mod kernel;
pub mod link;
mod load;
mod maps;
mod peer;
mod pins;
mod read;
mod slots;
mod sys;
#[cfg(any(test, feature = "test-hooks"))]
mod test_hooks;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use aya::Ebpf;
use lb_common::Config;

pub use attach::{TraceLoad, TracePrograms};
pub use error::{DatapathError, error_chain};
pub use fill::{Fill, FilterEntry, address_filter_words, vip_filter_words};
pub use link::{LinkFacts, LinkPlace, link_facts, link_pin};
pub use load::{PROGRAM_OBJECT, program_hash};
pub(crate) use maps::per_cpu_total;
pub use peer::{Adopted, PeerFlow};
pub use pins::{cleanup, maps_dir, pinned_seed, prepare_bpffs};
pub use read::{ConntrackCounter, TableClock};
pub use slots::{Protection, SlotScan, SlotTimes, SlotView, slot_seconds};
#[cfg(any(test, feature = "test-hooks"))]
pub use test_hooks::read_pinned_frags;

use maps::Maps;

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

pub struct Datapath {
    /// The program this lbd loaded; None when it adopted the running one.
    ebpf: Option<Ebpf>,
    /// The traced program (`lb_common::TRACED_PROGRAM_NAME`), once a trace asked for it
    /// (`attach`'s `set_traced`).
    traced: Option<Ebpf>,
    /// Whether the links run the traced program now.
    tracing: bool,
    /// The traced program's id, once loaded.
    traced_id: u32,
    bpffs_dir: PathBuf,
    maps: Maps,
    /// What lbd's maps hold (read at open, kept up to date by every write): `apply` writes
    /// only what differs from it.
    shadow: Fill,
    /// Each service's slot state, by id (`slots`): what its Maglev array holds besides the
    /// table in `shadow.maglev`.
    slots: std::collections::BTreeMap<u32, slots::ServiceSlots>,
    /// Counts changes of the tables and backends: a scan of the connection table made before
    /// one is not used to clear slots (`Datapath::clear_slots`).
    slot_generation: u64,
    /// Whether `FRAGS` was checked against the fill since the maps were opened.
    frags_checked: bool,
    pub attachments: Vec<Attachment>,
    program_id: u32,
    program_hash: u64,
    pub start: Start,
    /// `CONFIG` as it must be once this lbd's program is in place, while an older program
    /// still runs on these maps (see `write_config`).
    pending_config: Option<Config>,
}
