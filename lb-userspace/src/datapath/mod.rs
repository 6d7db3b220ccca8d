//! The only code that touches the XDP program and its maps: loading, attaching and pinning,
//! filling the maps, swapping Maglev tables, reading counters, and removing it all.
//!
//! Pins live under `bpffs_dir`:
//! - `link_<interface>`: the program's bpf_link on each interface (removing it detaches);
//! - `v<LAYOUT_VERSION>/<MAP>`: every map. A layout change gets a new folder, so an lbd never
//!   opens maps of a layout it does not know as its own.
//!
//! Its parts, each of which may call only those listed after it:
//! - `load`: loading the program, `Datapath::open` (fresh, adopt, upgrade, new layout,
//!   reattach) and `finish_start`;
//! - `attach`: putting the program on interfaces (attach, swap into pinned links, reattach);
//! - `apply`: `Datapath::apply`, the only writer of the maps lbd fills, and its per-map writers;
//! - `test_hooks` (feature `test-hooks`, for tests and benchmarks only): test runs, writes of
//!   single entries, the connection table by hand;
//! - `read`: what the maps hold, flows, counters, `ConntrackCounter`;
//! - `fill`: the `Fill` value (what lbd writes), read from the maps, compared;
//! - `maps`: every map, opened from the object or from the pins;
//! - `link`: XDP links, shared with `lbd decap`: pin, attach, replace, facts, place, unpin;
//! - `pins`: the pin folder on bpffs, layouts, the pinned seed, `cleanup`;
//! - `sys`: the few syscalls aya 0.14 does not make (the `unsafe` lives there);
//! - `error`: `DatapathError` and its adapters.

mod apply;
mod attach;
mod error;
mod fill;
pub mod link;
mod load;
mod maps;
mod pins;
mod read;
mod sys;
#[cfg(any(test, feature = "test-hooks"))]
mod test_hooks;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use aya::Ebpf;
use lb_common::Config;

pub use attach::Attachment;
pub use error::{DatapathError, error_chain};
pub use fill::{Fill, vip_filter_words};
pub use link::{LinkFacts, LinkPlace, link_facts, link_pin};
pub use load::{PROGRAM_OBJECT, Start, program_hash};
pub(crate) use maps::per_cpu_total;
pub use pins::{cleanup, maps_dir, pinned_seed, prepare_bpffs};
pub use read::ConntrackCounter;
#[cfg(any(test, feature = "test-hooks"))]
pub use test_hooks::read_pinned_frags;

use maps::Maps;

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
    /// still runs on these maps (see `write_config`).
    pending_config: Option<Config>,
}
