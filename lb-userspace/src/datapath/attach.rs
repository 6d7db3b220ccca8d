//! Putting lbd's program on its interfaces: attaching it and pinning its links, or swapping it
//! into the links an earlier lbd pinned, and attaching it anew where a link was lost. The links
//! themselves are `link`'s business.

use aya::programs::Xdp;
use lb_common::PROGRAM_NAME;
use log::{info, warn};

use super::{
    Attachment, Datapath, Start,
    error::{DatapathError, Result, io_err},
    link::{self, link_pin},
    load::load_program,
    pins::maps_dir,
};
use crate::config;

impl Datapath {
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
