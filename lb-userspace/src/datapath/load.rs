//! Loading the program and opening the data path: a fresh start, adopting the running program
//! untouched, or loading a new one on the pinned maps (upgrade, new layout, reattach).

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{Ebpf, EbpfLoader, maps::IterableMap as _, programs::Xdp};
use lb_common::{LAYOUT_VERSION, PROGRAM_NAME, conntrack_sets, maps};
use log::{info, warn};

use super::{
    Attachment, Datapath, Start,
    error::{DatapathError, Result, io_err, map_err, prog_err},
    fill::Fill,
    link::{link_facts, link_pin},
    maps::Maps,
    pins::{maps_dir, other_layouts, prepare_bpffs},
};

/// The XDP program, built by build.rs from lb-ebpf and embedded so `lbd` is self-contained.
pub static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// Loads program `name` of the object (`PROGRAM_NAME`, or `TRACED_PROGRAM_NAME`; verified, not
/// attached) on the maps pinned in `dir` (creating and pinning those that are missing), with a
/// connection table of `sets` sets and NAT tables of `nat` flows each: the object and the
/// program's id.
pub(super) fn load_program(dir: &Path, sets: u32, nat: u32, name: &str) -> Result<(Ebpf, u32)> {
    let pins: Vec<(&str, PathBuf)> = maps::ALL.iter().map(|m| (*m, dir.join(m))).collect();
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(maps::CONNTRACK, sets);
    loader.map_max_entries(maps::NAT_FLOWS, nat);
    loader.map_max_entries(maps::NAT_REPLIES, nat);
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(PROGRAM_OBJECT)?;
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| DatapathError::Other(format!("program {name} missing from the object")))?
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

/// Whether the program of id `id` is lbd's plain program (`PROGRAM_NAME`), as the kernel names
/// it.
fn runs_plain_program(id: u32) -> bool {
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .find(|p| p.id() == id)
        .is_some_and(|p| p.name_as_str() == Some(PROGRAM_NAME))
}

/// A stable fingerprint of the program object (FNV-1a), kept in CONFIG: a restarted lbd whose
/// program is the running one adopts it instead of reloading.
pub fn program_hash(object: &[u8]) -> u64 {
    object.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Datapath {
    /// Opens the data path for `interfaces`. When every interface has a pinned link and the
    /// pinned maps of this layout hold this very program's fingerprint, the running program is
    /// adopted untouched (no reload, no blip). Otherwise the program is loaded, reusing the pinned
    /// maps of this layout (so tables, counters and flows survive an upgrade); `attach` then puts
    /// it in place.
    pub fn open(bpffs_dir: &Path, conntrack_entries: u32, interfaces: &[String]) -> Result<Self> {
        Self::open_sized(
            bpffs_dir,
            conntrack_entries,
            lb_common::nat::NAT_ENTRIES,
            interfaces,
        )
    }

    /// `open` with NAT tables of `nat_entries` flows each (`daemon.nat_entries`).
    pub fn open_sized(
        bpffs_dir: &Path,
        conntrack_entries: u32,
        nat_entries: u32,
        interfaces: &[String],
    ) -> Result<Self> {
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
            let sizes = (conntrack_entries, nat_entries);
            match Self::adopt(bpffs_dir, &dir, hash, sizes, interfaces) {
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
        for name in [maps::NAT_FLOWS, maps::NAT_REPLIES] {
            let pin = dir.join(name);
            if let Ok(info) = aya::maps::MapInfo::from_pin(&pin)
                && info.max_entries() != nat_entries
            {
                // As the connection table: a new size is a new table, whose NAT flows start
                // again (their next packets are placed afresh, their replies are not known
                // until then).
                warn!(
                    "{name} is pinned with {} entries, config asks for {nat_entries} (daemon.nat_entries): replacing it",
                    info.max_entries()
                );
                fs::remove_file(&pin).map_err(io_err(format!("removing {}", pin.display())))?;
            }
        }
        let ours = Maps::from_pins(&dir)
            .ok()
            .and_then(|m| m.config.get(&0, 0).ok())
            .is_some_and(|c| c.program_hash == hash && c.layout_version == LAYOUT_VERSION);
        let (mut ebpf, program_id) = load_program(&dir, sets, nat_entries, PROGRAM_NAME)?;
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
        Datapath::opened(Some(ebpf), bpffs_dir, maps, vec![], program_id, hash, start)
    }

    /// The data path on `maps`, with what they hold read back: the fill, and each service's
    /// slot state (whose holds start again now).
    fn opened(
        ebpf: Option<Ebpf>,
        bpffs_dir: &Path,
        maps: Maps,
        attachments: Vec<Attachment>,
        program_id: u32,
        program_hash: u64,
        start: Start,
    ) -> Result<Datapath> {
        let (shadow, tables) = Fill::read(&maps)?;
        let mut dp = Datapath {
            ebpf,
            traced: None,
            tracing: false,
            traced_id: 0,
            bpffs_dir: bpffs_dir.to_owned(),
            maps,
            shadow,
            slots: Default::default(),
            slot_generation: 0,
            frags_checked: false,
            attachments,
            program_id,
            program_hash,
            start,
            pending_config: None,
        };
        for t in tables {
            if let Some(current) =
                dp.adopt_slots(t.id, t.key, t.table_size, &t.words, t.inner.map())?
            {
                dp.shadow.maglev.insert(t.id, current);
            }
        }
        Ok(dp)
    }

    /// The pinned data path, if it runs this very program on maps of this layout and size.
    fn adopt(
        bpffs_dir: &Path,
        dir: &Path,
        hash: u64,
        (conntrack_entries, nat_entries): (u32, u32),
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
        if maps.nat_flows_size()? != nat_entries {
            return Ok(None);
        }
        let mut attachments = vec![];
        let mut program_id = 0;
        for interface in interfaces {
            let pin = link_pin(bpffs_dir, interface);
            let facts = link_facts(&pin).map_err(|e| {
                DatapathError::Other(format!("reading the pinned link {}: {e}", pin.display()))
            })?;
            program_id = facts.program_id;
            if !runs_plain_program(facts.program_id) {
                // An lbd stopped while `lbctl trace` ran: its link still runs the traced
                // program, whose checks cost every packet. The plain one is loaded and
                // swapped in (no gap).
                info!(
                    "{interface}: the pinned link runs program {} (not {PROGRAM_NAME}, e.g. the traced one of a trace that was running): loading {PROGRAM_NAME} to replace it",
                    facts.program_id
                );
                return Ok(None);
            }
            attachments.push(Attachment {
                interface: interface.clone(),
                ifindex: 0,
                mode: "adopted".into(),
                link_id: facts.id,
            });
        }
        info!("adopted the running program {program_id} and its pinned maps (no reload)");
        Datapath::opened(
            None,
            bpffs_dir,
            maps,
            attachments,
            program_id,
            hash,
            Start::Adopted,
        )
        .map(Some)
    }

    /// After the program is in place: writes `CONFIG` whole (see `write_config`), then removes
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
}
