//! The command lines of lbd and lbctl (clap definitions), in the library so completions and
//! man pages are generated from the same definitions the binaries parse.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use clap::{Parser, Subcommand};

use crate::config::{CheckKind, Cidr, Forwarding, HashMode, Protocol, Role};

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

// Parsed once per run: the size of the `service add` variant (its check options) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Daemon, interfaces (attached, missing or detached), mode, program id, uptime.
    Status,
    /// Services: list, add, remove, and their client filters (allow, deny, unlist).
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

#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum ServiceCommand {
    /// Every service with its VIP, port and backends up.
    List,
    /// Add a service (no backends yet; add them with `lbctl backend add`).
    ///
    /// Health check options are the keys of `[service.health]` (README, "Health checks"),
    /// checked as the config file's; an `exec` check's command follows `--`, e.g.
    /// `--check exec -- /usr/local/bin/check --fast`.
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
        /// Maglev table size, a prime (default 65537).
        #[arg(long)]
        table_size: Option<u32>,
        #[command(flatten)]
        check: CheckArgs,
    },
    /// Remove a service and all its backends.
    Remove { name: String },
    /// Let only clients of this prefix (and of the others on the list) reach the service.
    /// The lists are checked in the data path, before the host firewall ever sees a packet.
    Allow {
        service: String,
        /// An address or a prefix: 198.51.100.0/24, 2001:db8::/32, 198.51.100.66.
        #[arg(value_name = "CIDR")]
        prefix: Cidr,
    },
    /// Drop every packet of clients in this prefix (checked before the allow list).
    Deny {
        service: String,
        #[arg(value_name = "CIDR")]
        prefix: Cidr,
    },
    /// Take a prefix off whichever of the service's lists has it.
    Unlist {
        service: String,
        #[arg(value_name = "CIDR")]
        prefix: Cidr,
    },
}

/// The health check options of `lbctl service add`: the keys of `[service.health]`.
#[derive(clap::Args, Debug, Default, Clone)]
#[command(next_help_heading = "Health check")]
pub struct CheckArgs {
    /// The check. Without it: `tcp` when another check option is given (as a `[service.health]`
    /// table without `check`), else no checks.
    #[arg(long, value_enum)]
    pub check: Option<CheckKind>,
    /// The port checked (default: the service port).
    #[arg(long, value_name = "N")]
    pub check_port: Option<u16>,
    /// Time from one check to the next (default 1000).
    #[arg(long, value_name = "MS")]
    pub interval_ms: Option<u64>,
    /// Time a check may take (default 500).
    #[arg(long, value_name = "MS")]
    pub timeout_ms: Option<u64>,
    /// Consecutive successes to become up (default 2).
    #[arg(long, value_name = "N")]
    pub rise: Option<u32>,
    /// Consecutive failures to become down (default 3).
    #[arg(long, value_name = "N")]
    pub fall: Option<u32>,
    /// http, https: the path requested (default /).
    #[arg(long)]
    pub path: Option<String>,
    /// http, https: the status that means healthy (default 200).
    #[arg(long, value_name = "STATUS")]
    pub expect: Option<u16>,
    /// https: verify the certificate (against --ca-file, else the webpki roots).
    #[arg(long)]
    pub tls_verify: bool,
    /// https: the server name sent (default: none, the backend is an IP address).
    #[arg(long, value_name = "NAME")]
    pub sni: Option<String>,
    /// https with --tls-verify: PEM file of the CA certificates to trust.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// udp: the datagram sent, as text.
    #[arg(long, value_name = "TEXT")]
    pub send: Option<String>,
    /// udp: the datagram sent, in hex.
    #[arg(long, value_name = "HEX")]
    pub send_hex: Option<String>,
    /// udp: the bytes (hex) a reply must start with (default: any reply).
    #[arg(long, value_name = "HEX")]
    pub expect_hex: Option<String>,
    /// dns: the name asked for (default ".", asking for the root's NS records).
    #[arg(long, value_name = "NAME")]
    pub query_name: Option<String>,
    /// dns: the record type asked for (default A with --query-name).
    #[arg(long, value_name = "TYPE")]
    pub query_type: Option<String>,
    /// pgsql: the role logged in as (default lb); exec: the user the command runs as
    /// (default nobody).
    #[arg(long)]
    pub user: Option<String>,
    /// pgsql: the database (default postgres).
    #[arg(long)]
    pub database: Option<String>,
    /// pgsql (primary, replica), redis (master, replica): the role the server must have.
    #[arg(long, value_enum)]
    pub role: Option<Role>,
    /// pgsql, redis: file holding the password (read at each check).
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// exec: the program (absolute path) and its arguments, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum BackendCommand {
    /// Address, weight, state, health detail, packets and port of every backend.
    List {
        /// Only this service's backends.
        service: Option<String>,
    },
    /// Add a backend (with health checks it joins once its first check passes).
    ///
    /// A `nat` service may have one address on several ports (one host running several
    /// instances): add each with its --port.
    Add {
        service: String,
        /// The backend's address; ADDRESS:PORT ([V6]:PORT) gives its port too.
        #[arg(value_name = "ADDRESS")]
        address: BackendAddr,
        #[arg(long, default_value_t = crate::config::DEFAULT_WEIGHT)]
        weight: u32,
        /// The port the backend serves on (`nat` services only; default: the service's).
        #[arg(long)]
        port: Option<u16>,
    },
    /// Remove a backend: its clients move, established flows too.
    Remove {
        service: String,
        #[command(flatten)]
        backend: BackendName,
        /// Only say which share of clients would move.
        #[arg(long)]
        dry_run: bool,
    },
    /// No new clients; established flows continue.
    Drain {
        service: String,
        #[command(flatten)]
        backend: BackendName,
    },
    /// Back to the weight it had before the drain.
    Undrain {
        service: String,
        #[command(flatten)]
        backend: BackendName,
    },
    /// Set the relative share of new clients.
    Weight {
        service: String,
        #[command(flatten)]
        backend: BackendName,
        weight: u32,
    },
}

/// A backend's address as a command line gives it: `ADDRESS`, or `ADDRESS:PORT` (`[V6]:PORT`),
/// the name lbd gives a backend whose service has its address on several ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendAddr {
    pub address: IpAddr,
    pub port: Option<u16>,
}

impl std::str::FromStr for BackendAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(address) = s.parse::<IpAddr>() {
            return Ok(BackendAddr {
                address,
                port: None,
            });
        }
        match s.parse::<std::net::SocketAddr>() {
            Ok(a) => Ok(BackendAddr {
                address: a.ip(),
                port: Some(a.port()),
            }),
            Err(_) => Err(format!(
                "{s:?} is not an IP address (192.0.2.11, 2001:db8::11) nor one with a port (192.0.2.11:8080, [2001:db8::11]:8080)"
            )),
        }
    }
}

impl BackendAddr {
    /// The address and the port, from `ADDRESS:PORT` or `--port` (both: they must agree).
    pub fn with_port(self, port: Option<u16>) -> Result<(IpAddr, Option<u16>), String> {
        match (self.port, port) {
            (Some(a), Some(b)) if a != b => Err(format!(
                "{}:{a} and --port {b} name two ports: give one",
                self.address
            )),
            (a, b) => Ok((self.address, a.or(b))),
        }
    }
}

/// Which backend of a service a command means: its address, with its port when the service
/// has that address on several ports (`nat`).
#[derive(clap::Args, Debug)]
pub struct BackendName {
    /// The backend's address; ADDRESS:PORT ([V6]:PORT), as lbctl names a backend whose
    /// address serves the service on several ports, names one of those.
    #[arg(value_name = "ADDRESS")]
    pub address: BackendAddr,
    /// The port the backend serves on: needed when the service has the address on several
    /// ports (`nat`), else optional.
    #[arg(long)]
    pub port: Option<u16>,
}

impl BackendName {
    /// The address and, when given, the port.
    pub fn resolve(&self) -> Result<(IpAddr, Option<u16>), String> {
        self.address.with_port(self.port)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn backend_of(args: &[&str]) -> Result<(IpAddr, Option<u16>), String> {
        let parsed =
            LbctlArgs::try_parse_from(["lbctl"].iter().chain(args)).map_err(|e| e.to_string())?;
        match parsed.command {
            Command::Backend(
                BackendCommand::Drain { backend, .. }
                | BackendCommand::Undrain { backend, .. }
                | BackendCommand::Remove { backend, .. },
            ) => backend.resolve(),
            Command::Backend(BackendCommand::Weight {
                backend, weight, ..
            }) => {
                assert_eq!(weight, 30);
                backend.resolve()
            }
            Command::Backend(BackendCommand::Add { address, port, .. }) => address.with_port(port),
            other => panic!("{other:?}"),
        }
    }

    /// A backend is named by its address, with --port or as ADDRESS:PORT ([V6]:PORT) when its
    /// service has the address on several ports; both forms may be given if they agree.
    #[test]
    fn backends_are_named_by_address_and_port() {
        let v4: IpAddr = "192.0.2.11".parse().unwrap();
        let v6: IpAddr = "2001:db8::11".parse().unwrap();
        for (args, want) in [
            (&["backend", "drain", "web", "192.0.2.11"][..], (v4, None)),
            (
                &["backend", "drain", "web", "192.0.2.11", "--port", "8081"],
                (v4, Some(8081)),
            ),
            (
                &["backend", "undrain", "web", "192.0.2.11:8081"],
                (v4, Some(8081)),
            ),
            (
                &[
                    "backend",
                    "remove",
                    "web",
                    "[2001:db8::11]:8081",
                    "--dry-run",
                ],
                (v6, Some(8081)),
            ),
            (&["backend", "remove", "web", "2001:db8::11"], (v6, None)),
            (
                &[
                    "backend",
                    "weight",
                    "web",
                    "192.0.2.11",
                    "--port",
                    "8081",
                    "30",
                ],
                (v4, Some(8081)),
            ),
            (
                &["backend", "weight", "web", "192.0.2.11:8081", "30"],
                (v4, Some(8081)),
            ),
            (
                &["backend", "add", "web", "192.0.2.11:8081"],
                (v4, Some(8081)),
            ),
            (
                &["backend", "add", "web", "192.0.2.11", "--port", "8081"],
                (v4, Some(8081)),
            ),
            (
                &[
                    "backend",
                    "drain",
                    "web",
                    "192.0.2.11:8081",
                    "--port",
                    "8081",
                ],
                (v4, Some(8081)),
            ),
        ] {
            assert_eq!(backend_of(args), Ok(want), "{args:?}");
        }
        let two = backend_of(&[
            "backend",
            "drain",
            "web",
            "192.0.2.11:8081",
            "--port",
            "8080",
        ])
        .unwrap_err();
        assert!(two.contains("name two ports"), "{two}");
        let bad = backend_of(&["backend", "drain", "web", "192.0.2.11:http"]).unwrap_err();
        assert!(
            bad.contains("not an IP address") && bad.contains("[2001:db8::11]:8080"),
            "{bad}"
        );
    }
}
