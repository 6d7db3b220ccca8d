//! The command lines of lbd and lbctl (clap definitions), in the library so completions and
//! man pages are generated from the same definitions the binaries parse.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use clap::{Parser, Subcommand};

use crate::config::{Forwarding, HashMode, Protocol};

#[derive(Parser, Debug)]
#[command(
    name = "lbctl",
    version,
    about = "Control a running lbd (the lb load balancer daemon)"
)]
pub struct LbctlArgs {
    /// lbd's control socket.
    #[arg(
        long,
        env = "LB_SOCKET",
        default_value = "/run/lb/lbd.sock",
        global = true
    )]
    pub socket: PathBuf,
    /// Print one JSON document instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Daemon, interfaces (attached, missing or detached), mode, program id, uptime.
    Status,
    /// Services: list, add, remove.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Backends: list, add, remove, drain, undrain, weight.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Packets and bytes per service and backend, drop reasons, connection-table use.
    Stats {
        /// Only this service.
        service: Option<String>,
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// This node: drain, undrain, check (for keepalived's track_script).
    #[command(subcommand)]
    Node(NodeCommand),
    /// The backend a client reaches now, and why (hash and slot, or the connection table).
    Lookup {
        service: String,
        /// The client's address.
        client: IpAddr,
        /// The client's source port: consults the connection table for that flow (and is needed
        /// for 5-tuple hashing).
        #[arg(long)]
        port: Option<u16>,
    },
    /// The next packets of a service, a VIP or every service, live, as the data path saw them:
    /// client, ports, service, connection-table hit or miss, backend, action, reason.
    Trace {
        /// A service name or a VIP (default: every service).
        target: Option<String>,
        /// How many packets.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        count: u32,
    },
    /// Print a shell completion script.
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff); with --dir, write it and one page per subcommand there.
    #[command(hide = true)]
    Man {
        /// Write lbctl.8 and a page per subcommand (lbctl-backend-add.8, ...) into this folder.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ServiceCommand {
    /// Every service with its VIP, port and backends up.
    List,
    /// Add a service (no backends yet; add them with `lbctl backend add`).
    Add {
        name: String,
        #[arg(long)]
        vip: IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long, value_enum)]
        protocol: Protocol,
        #[arg(long, value_enum, default_value = "dsr")]
        forwarding: Forwarding,
        #[arg(long, value_enum, default_value = "source")]
        hash: HashMode,
    },
    /// Remove a service and all its backends.
    Remove { name: String },
}

#[derive(Subcommand, Debug)]
pub enum BackendCommand {
    /// Address, weight, state, health detail and packets of every backend.
    List {
        /// Only this service's backends.
        service: Option<String>,
    },
    /// Add a backend (with health checks it joins once its first check passes).
    Add {
        service: String,
        address: IpAddr,
        #[arg(long, default_value_t = crate::config::DEFAULT_WEIGHT)]
        weight: u32,
    },
    /// Remove a backend: its clients move, established flows too.
    Remove {
        service: String,
        address: IpAddr,
        /// Only say which share of clients would move.
        #[arg(long)]
        dry_run: bool,
    },
    /// No new clients; established flows continue.
    Drain { service: String, address: IpAddr },
    /// Back to the weight it had before the drain.
    Undrain { service: String, address: IpAddr },
    /// Set the relative share of new clients.
    Weight {
        service: String,
        address: IpAddr,
        weight: u32,
    },
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Withdraw every VIP route of this node (kept across restarts); flows that still arrive
    /// are forwarded.
    Drain,
    /// Announce the serving VIPs again.
    Undrain,
    /// Exit 0 when this node would announce at least one VIP (not drained, the data path
    /// attached, a service with a backend up), else 1: for keepalived's track_script.
    Check,
}

#[derive(Parser, Debug)]
#[command(name = "lbd", version, about = "lb daemon: XDP layer-4 load balancer")]
pub struct LbdArgs {
    /// The configuration file.
    #[arg(long, short, default_value = "/etc/lb/lb.toml", global = true)]
    pub config: PathBuf,
    /// Validate the configuration file and exit (touches nothing on the system).
    #[arg(long, conflicts_with = "cleanup")]
    pub check: bool,
    /// Detach the program and remove every pin: takes lb out of the path (refused while an lbd
    /// runs on this config).
    #[arg(long)]
    pub cleanup: bool,
    /// Apply the configured hash seed (without one: state_dir's, else a new random one) even
    /// though the running data path uses another. Nearly every client moves to another backend
    /// and established connections are reset. Without it lbd refuses a configured seed that
    /// differs from the running one.
    #[arg(long, conflicts_with_all = ["check", "cleanup"])]
    pub reseed: bool,
    /// Print the man page (roff) and exit.
    #[arg(long, hide = true)]
    pub man: bool,
    /// Write lbd.8 and a page per subcommand (lbd-decap.8) into this folder and exit.
    #[arg(long, hide = true, value_name = "DIR")]
    pub man_dir: Option<PathBuf>,
    /// Print a shell completion script and exit.
    #[arg(long, hide = true, value_name = "SHELL")]
    pub completions: Option<clap_complete::Shell>,
    #[command(subcommand)]
    pub command: Option<LbdCommand>,
}

/// lbd's subcommands (without one, lbd runs the daemon).
#[derive(Subcommand, Debug)]
pub enum LbdCommand {
    /// Backends of `tunnel` services: attach lb's decapsulation program to an interface.
    ///
    /// The program strips the outer header of IPv4-in-IPv4 and IPv6-in-IPv6 packets addressed
    /// to the interface's own addresses, sent from a source given with --allow to an inner
    /// destination that is an address of this host, and passes everything else untouched
    /// (counting the tunnel packets it does not unwrap: see --status). lbd decap pins it and
    /// exits; running it again changes nothing but the address map, which it brings up to date
    /// (run it again after an address change, a VIP added on lo included), and the allowed
    /// sources when --allow is given. `--remove` detaches it.
    Decap {
        /// The interface the tunnelled packets arrive on.
        #[arg(long, short)]
        interface: String,
        /// Where the link and the maps are pinned (one folder per network namespace).
        #[arg(long, default_value = crate::decap::DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        /// An outer source tunnel packets are accepted from, as an address or a prefix
        /// (192.0.2.2, 192.0.2.0/28, 2001:db8::/64): lb's balancers. Repeatable; given, the
        /// list replaces the pinned one. Required the first time; later runs without it keep
        /// the pinned list.
        #[arg(long, value_name = "CIDR")]
        allow: Vec<crate::decap::Cidr>,
        /// Detach the program from the interface and remove its pins.
        #[arg(long, conflicts_with_all = ["allow", "status"])]
        remove: bool,
        /// Print the pinned link, the allowed sources, the addresses and the packet counters
        /// (decapsulated, and passed up unchanged by reason), and change nothing.
        #[arg(long, conflicts_with = "allow")]
        status: bool,
    },
}

/// `cmd`'s man page in section 8 (system administration, where the unit's
/// `Documentation=man:lbd(8) man:lbctl(8)` looks), without clap's `help` subcommand (which has
/// no page).
pub fn man_page(cmd: clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(cmd.disable_help_subcommand(true))
        .section("8")
        .source(concat!("lb ", env!("CARGO_PKG_VERSION")))
}

/// Writes `cmd`'s man page and one for each visible subcommand, at every depth, into `dir`
/// (`lbctl.8`, `lbctl-backend.8`, `lbctl-backend-add.8`, ...: the names the pages' SUBCOMMANDS
/// sections refer to). Returns the files written, parents first.
pub fn write_man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    fn write(cmd: clap::Command, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        out.push(man_page(cmd.clone()).generate_to(dir)?);
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub.clone(), dir, out)?;
        }
        Ok(())
    }
    let mut cmd = cmd.disable_help_subcommand(true);
    // Building names the subcommands after their parents (`lbctl-backend-add`).
    cmd.build();
    let mut out = vec![];
    write(cmd, dir, &mut out)?;
    Ok(out)
}
