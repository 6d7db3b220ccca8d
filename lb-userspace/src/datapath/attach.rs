//! Putting lbd's program on its interfaces: attaching it and pinning its links, or swapping it
//! into the links an earlier lbd pinned, and attaching it anew where a link was lost. The links
//! themselves are `link`'s business.

use std::path::PathBuf;

use aya::{Ebpf, programs::Xdp};
use lb_common::{PROGRAM_NAME, TRACED_PROGRAM_NAME};
use log::{info, warn};

use super::{
    Attachment, Datapath, Start,
    error::{DatapathError, Result, io_err},
    link::{self, link_pin},
    load::load_program,
    pins::maps_dir,
};
use crate::config;

/// What loading the programs a trace needs takes, out of the data path: the load (seconds of
/// verification) then runs without it (`Datapath::trace_load`, `TraceLoad::load`,
/// `Datapath::keep_trace_programs`).
pub struct TraceLoad {
    dir: PathBuf,
    sets: u32,
    nat: u32,
    /// Whether the plain program must be loaded too (an lbd that adopted the running one has
    /// none of its own to swap back in).
    plain: bool,
}

/// The programs `TraceLoad::load` loaded, each with its id, and the NAT tables' size they
/// were loaded with.
pub struct TracePrograms {
    plain: Option<(Ebpf, u32)>,
    traced: (Ebpf, u32),
    nat: u32,
}

impl TraceLoad {
    /// Loads (verifies) the traced program, and the plain one when needed, on the pinned maps.
    pub fn load(self) -> Result<TracePrograms> {
        let plain = if self.plain {
            Some(load_program(&self.dir, self.sets, self.nat, PROGRAM_NAME)?)
        } else {
            None
        };
        let traced = load_program(&self.dir, self.sets, self.nat, TRACED_PROGRAM_NAME)?;
        Ok(TracePrograms {
            plain,
            traced,
            nat: self.nat,
        })
    }
}

/// Program `name` of a loaded object.
fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut Xdp {
    ebpf.program_mut(name)
        .and_then(|p| <&mut Xdp>::try_from(p).ok())
        .expect("the program was checked at load")
}

impl Datapath {
    /// The program the links run now: the plain one, or the traced one while a trace runs.
    fn program(&mut self) -> &mut Xdp {
        if self.tracing
            && let Some(traced) = self.traced.as_mut()
        {
            return xdp_program(traced, TRACED_PROGRAM_NAME);
        }
        xdp_program(
            self.ebpf
                .as_mut()
                .expect("a loaded program (not called when adopting)"),
            PROGRAM_NAME,
        )
    }

    /// What loading the programs a trace needs takes; None when they are loaded already.
    pub fn trace_load(&self) -> Result<Option<TraceLoad>> {
        if self.traced.is_some() && self.ebpf.is_some() {
            return Ok(None);
        }
        Ok(Some(TraceLoad {
            dir: maps_dir(&self.bpffs_dir),
            sets: self.conntrack_sets()?,
            nat: self.nat_entries()?,
            plain: self.ebpf.is_none(),
        }))
    }

    /// Keeps the programs a `TraceLoad` loaded, for this and later traces.
    /// Programs loaded on NAT tables that have been replaced since (`grow_nat_tables` ran
    /// while they loaded) are dropped: `set_traced` then loads them again.
    pub fn keep_trace_programs(&mut self, programs: TracePrograms) {
        if self.nat_entries().ok() != Some(programs.nat) {
            warn!("the NAT tables grew while the traced program loaded: loading it again");
            return;
        }
        if let Some((ebpf, id)) = programs.plain
            && self.ebpf.is_none()
        {
            // The adopted program runs until the trace's swap, which replaces it; this one
            // goes back in after the trace.
            info!("loaded {PROGRAM_NAME} again (program {id}) to swap back in after a trace");
            self.ebpf = Some(ebpf);
            self.program_id = id;
        }
        let (ebpf, id) = programs.traced;
        self.traced = Some(ebpf);
        self.traced_id = id;
    }

    /// Swaps the traced program (`on`) or the plain one into every link: a trace's packets are
    /// seen only while the traced program runs, and the plain one has no trace's check. The
    /// programs are loaded here if `keep_trace_programs` did not bring them. Every link is
    /// tried; the first failure is returned.
    pub fn set_traced(&mut self, on: bool) -> Result<()> {
        if on == self.tracing {
            return Ok(());
        }
        if let Some(load) = self.trace_load()? {
            let programs = load.load()?;
            self.keep_trace_programs(programs);
        }
        self.tracing = on;
        self.swap_into_links(if on {
            "the traced program"
        } else {
            "the plain program"
        })
    }

    /// Swaps the program the links should run (`program`) into every link; each is tried, the
    /// first failure returned. `what` names that program in messages.
    fn swap_into_links(&mut self, what: &str) -> Result<()> {
        let mut first_error = None;
        let interfaces: Vec<String> = self
            .attachments
            .iter()
            .map(|a| a.interface.clone())
            .collect();
        for interface in interfaces {
            let pin = link_pin(&self.bpffs_dir, &interface);
            if let Err(e) = self.replace_in_link(&pin) {
                warn!("{interface}: swapping {what} into the link failed: {e}");
                first_error.get_or_insert(DatapathError::Other(format!(
                    "{interface}: swapping {what} into its link: {e}"
                )));
            }
        }
        first_error.map_or(Ok(()), Err)
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
                    link::unpin(&pin).map_err(io_err(format!("removing {}", pin.display())))?;
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
            let (ebpf, program_id) = load_program(
                &maps_dir(&self.bpffs_dir),
                self.conntrack_sets()?,
                self.nat_entries()?,
                PROGRAM_NAME,
            )?;
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
        link::unpin(&pin).map_err(io_err(format!("removing {}", pin.display())))?;
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
        let program = self.program();
        let attached = link::attach(
            program,
            "the XDP program",
            interface,
            ifindex,
            link::modes(mode),
            &pin,
        )?;
        info!(
            "{interface}: XDP program attached in {} mode (link {})",
            attached.mode, attached.link_id
        );
        self.record(Attachment {
            interface: interface.into(),
            ifindex,
            mode: attached.mode.into(),
            link_id: attached.link_id,
        });
        Ok(())
    }

    /// Swaps the loaded program into the link pinned at `pin`: the link's id.
    fn replace_in_link(
        &mut self,
        pin: &std::path::Path,
    ) -> std::result::Result<u32, link::LinkError> {
        link::replace(self.program(), pin)
    }
}

impl Datapath {
    /// Replaces the NAT tables by empty ones of `entries` flows each, while lbd runs: lbd made
    /// them at their smallest because no service used `nat` (`config::Config::nat_tables`),
    /// and one now does. Those tables hold no flow (no service could write them), so nothing is
    /// lost: the program is loaded again on the other pinned maps with new NAT tables, which
    /// are pinned, and swapped into every link (as an upgrade: traffic sees no gap). The old
    /// tables' pins are set aside first and put back if the load fails.
    pub fn grow_nat_tables(&mut self, entries: u32) -> Result<()> {
        let had = self.nat_entries()?;
        if had >= entries {
            return Ok(());
        }
        if self.tracing {
            return Err(DatapathError::Other(
                "the NAT tables cannot grow while lbctl trace runs: stop the trace and try again"
                    .into(),
            ));
        }
        let dir = maps_dir(&self.bpffs_dir);
        let names = [lb_common::maps::NAT_FLOWS, lb_common::maps::NAT_REPLIES];
        let aside = |name: &str| dir.join(format!("{name}_replaced"));
        // (bpffs refuses names with a dot.)
        for name in names {
            std::fs::rename(dir.join(name), aside(name)).map_err(io_err(format!(
                "setting the pin of {name} aside in {}",
                dir.display()
            )))?;
        }
        let loaded = load_program(&dir, self.conntrack_sets()?, entries, PROGRAM_NAME).and_then(
            |(mut ebpf, id)| {
                let nat_flows = super::maps::Maps::nat_flows_of(&mut ebpf)?;
                Ok((ebpf, id, nat_flows))
            },
        );
        let (ebpf, id, nat_flows) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                for name in names {
                    let _ = std::fs::remove_file(dir.join(name));
                    if let Err(back) = std::fs::rename(aside(name), dir.join(name)) {
                        warn!("putting the pin of {name} back: {back}");
                    }
                }
                return Err(e);
            }
        };
        // The traced program reads the old tables: loaded again by the next trace.
        self.traced = None;
        self.ebpf = Some(ebpf);
        self.program_id = id;
        self.maps.nat_flows = nat_flows;
        let swapped = self.swap_into_links("the program with the larger NAT tables");
        for name in names {
            if let Err(e) = std::fs::remove_file(aside(name)) {
                warn!("removing the set-aside pin of {name}: {e}");
            }
        }
        info!("NAT tables grown from {had} to {entries} flows each (program {id} swapped in)");
        swapped
    }
}
