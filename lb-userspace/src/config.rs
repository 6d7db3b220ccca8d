//! The TOML configuration: parsing, validation (every problem named with its key and line) and
//! the validated, plain form the rest of lbd works with.
//!
//! This file holds the types (the validated config, and the file as written, with spans) and
//! reading a file; `check` turns the text into a [`Config`] or every [`Problem`] it has. Nothing
//! here depends on the rest of lbd but `cidr` (prefixes, which depend on nothing).

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use lb_common::{
    DEFAULT_TABLE_SIZE, MAX_BACKENDS, MAX_FILTER_PREFIXES, MAX_SERVICES, MAX_TABLE_SIZE,
};
use serde::{Deserialize, Serialize};
use toml::Spanned;

pub use crate::cidr::Cidr;

mod check;
mod checker;
mod health;
#[cfg(test)]
mod tests;

pub use check::{is_prime, name_problem, parse, parse_mac, port_problem, table_size_problem};
pub use health::{
    DEFAULT_EXEC_USER, DEFAULT_PGSQL_USER, HEALTH_KEYS, from_hex, parse_health, to_hex,
};

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// Dotted key, e.g. `service[2].table_size`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "`{}`: {}", self.key, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}:\n{}", problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    Native,
    Generic,
    #[default]
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    #[default]
    Dsr,
    Tunnel,
    /// Destination address and port rewritten to the backend's, replies rewritten back: the
    /// backends route their replies through lb.
    Nat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, clap::ValueEnum)]
pub enum HashMode {
    #[default]
    #[serde(rename = "source")]
    Source,
    #[serde(rename = "5-tuple")]
    #[value(name = "5-tuple")]
    FiveTuple,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    Tcp,
    Http,
    Https,
    Udp,
    Dns,
    Pgsql,
    Redis,
    Exec,
    #[default]
    None,
}

impl CheckKind {
    /// The name written in the config (`check = "NAME"`).
    pub fn name(self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Https => "https",
            CheckKind::Udp => "udp",
            CheckKind::Dns => "dns",
            CheckKind::Pgsql => "pgsql",
            CheckKind::Redis => "redis",
            CheckKind::Exec => "exec",
            CheckKind::None => "none",
        }
    }
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The role a `pgsql` (`primary`, `replica`) or `redis` (`master`, `replica`) check requires of
/// the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Master,
    Replica,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Master => "master",
            Role::Replica => "replica",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a `udp` check sends: `send` (text) or `send_hex`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Text(String),
    Hex(Vec<u8>),
}

impl Payload {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Payload::Text(t) => t.as_bytes(),
            Payload::Hex(b) => b,
        }
    }
}

impl Default for Payload {
    fn default() -> Self {
        Payload::Text(String::new())
    }
}

// ---- the validated configuration ----

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub daemon: Daemon,
    pub services: Vec<Service>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Daemon {
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    pub socket: PathBuf,
    pub bpffs_dir: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub conntrack_entries: u32,
    /// Flows each NAT table (`NAT_FLOWS`, `NAT_REPLIES`) holds while a `nat` service needs
    /// them (`Config::nat_tables`).
    pub nat_entries: u32,
    /// Whether the file sets `nat_entries`: the tables then have that size even while no
    /// service uses NAT (room for `nat` services added at run time).
    pub nat_entries_set: bool,
    /// Seconds a connection idle across a backend change (so it has no record) keeps its
    /// backend after the change, at least (docs/design/slot-state.md).
    pub idle_hold_s: u64,
    /// New flows each CPU records per second at most (0: no limit); above it they are
    /// balanced without a record (`lb_common::NewFlow::OverLimit`).
    pub new_flow_limit: u32,
    pub state_dir: PathBuf,
    pub hash_seed: Option<[u64; 2]>,
    pub log_level: Option<String>,
    /// `node_name`: as configured; the host name when None (see [`Daemon::node_name`]).
    pub node_name: Option<String>,
    /// `[daemon.announce]`: the VIP host routes lbd keeps for a routing daemon, if configured.
    pub announce: Option<Announce>,
    /// `[daemon.sync]`: connection state shared with other lb nodes, if configured.
    pub sync: Option<SyncPeers>,
}

/// `[daemon.sync]`: where this node listens for its peers' datagrams, who they are, and the
/// key every datagram is sealed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPeers {
    pub listen: SocketAddr,
    pub peers: Vec<SocketAddr>,
    /// Read when lbd starts (not by `lbd --check`): 64 hex digits.
    pub key_file: PathBuf,
}

/// `[daemon.announce]`: where lbd keeps a host route for each serving VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announce {
    /// The kernel routing table (RTA_TABLE) the routes go into.
    pub table: u32,
    /// Their rtnetlink protocol (rtm_protocol): how lbd, and the routing daemon, tell them apart.
    pub protocol: u8,
}

pub const DEFAULT_ANNOUNCE_TABLE: u32 = 100;
pub const DEFAULT_ANNOUNCE_PROTOCOL: u8 = 200;

impl Default for Announce {
    fn default() -> Self {
        Announce {
            table: DEFAULT_ANNOUNCE_TABLE,
            protocol: DEFAULT_ANNOUNCE_PROTOCOL,
        }
    }
}

impl Daemon {
    /// This node's name: `node_name`, else the host name (of lbd's UTS namespace), else
    /// "unnamed" when even that cannot be read.
    pub fn node_name(&self) -> String {
        self.node_name
            .clone()
            .or_else(host_name)
            .unwrap_or_else(|| "unnamed".into())
    }
}

/// The host name (gethostname(2)), if it can be read and is UTF-8.
pub fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for writes of its whole length, which is what we pass.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..end]).ok()?.trim();
    (!name.is_empty()).then(|| name.to_string())
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub hash: HashMode,
    pub table_size: u32,
    pub tunnel_source: Option<IpAddr>,
    pub health: Health,
    pub backends: Vec<Backend>,
    /// Client filters (`lb_common::filter`): only clients in these prefixes (empty: every
    /// client)…
    pub allow: Vec<Cidr>,
    /// …and never clients in these (checked first).
    pub deny: Vec<Cidr>,
}

impl Service {
    /// Why the client filters refuse `client` (as the data path decides: deny first, then the
    /// allow list), or None when they let it in.
    pub fn refuses(&self, client: IpAddr) -> Option<String> {
        if let Some(p) = self.deny.iter().find(|p| p.contains(client)) {
            return Some(format!("{client} is in {p} on the deny list"));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|p| p.contains(client)) {
            return Some(format!(
                "{client} is in none of the {} prefixes of the allow list",
                self.allow.len()
            ));
        }
        None
    }

    /// The identity of backend `b` of this service: its address and the port it serves on.
    pub fn key_of(&self, b: &Backend) -> BackendKey {
        b.key(self.port)
    }

    /// Whether more than one backend of this service has `address` (one host serving a `nat`
    /// service on several ports): each is then named with its port.
    pub fn repeats(&self, address: IpAddr) -> bool {
        self.backends
            .iter()
            .filter(|b| b.address == address)
            .nth(1)
            .is_some()
    }

    /// The name of backend `b` in lbd's output, logs and metric labels: its address, as
    /// always, unless another backend of the service has the same address; then
    /// `address:port` (`[v6]:port`).
    pub fn backend_name(&self, b: &Backend) -> String {
        if self.repeats(b.address) {
            self.key_of(b).to_string()
        } else {
            b.address.to_string()
        }
    }

    /// The backend at `address` and, when given, `port` (the port it serves on): what an
    /// lbctl command names. A bare address that two backends have is an error naming both.
    pub fn select(&self, address: IpAddr, port: Option<u16>) -> Result<&Backend, NoBackend> {
        let mut at = self.backends.iter().filter(|b| b.address == address);
        match port {
            Some(port) => {
                at.find(|b| b.port_or(self.port) == port)
                    .ok_or_else(|| NoBackend::Missing {
                        service: self.name.clone(),
                        backend: BackendKey { address, port }.to_string(),
                    })
            }
            None => {
                let all: Vec<&Backend> = at.collect();
                match all[..] {
                    [] => Err(NoBackend::Missing {
                        service: self.name.clone(),
                        backend: address.to_string(),
                    }),
                    [one] => Ok(one),
                    _ => Err(NoBackend::Ambiguous {
                        service: self.name.clone(),
                        address,
                        ports: all.iter().map(|b| b.port_or(self.port)).collect(),
                    }),
                }
            }
        }
    }

    /// The client filters in a few words (`, allow 3 prefixes, deny 1 prefix`), or nothing.
    pub fn filters_summary(&self) -> String {
        let count = |n: usize| format!("{n} prefix{}", if n == 1 { "" } else { "es" });
        let mut out = String::new();
        if !self.allow.is_empty() {
            out.push_str(&format!(", allow {}", count(self.allow.len())));
        }
        if !self.deny.is_empty() {
            out.push_str(&format!(", deny {}", count(self.deny.len())));
        }
        out
    }
}

/// `[service.health]`, validated. The keys of one kind only are set from the file; the others
/// keep their defaults (a key of another kind is a config error).
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub check: CheckKind,
    pub port: u16,
    /// `port` was written in the config: with `nat` a check without it goes to each backend's
    /// own port instead.
    pub port_given: bool,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
    /// `http`, `https`: the request path and the status that means healthy.
    pub path: String,
    pub expect: u16,
    /// `https`: verify the certificate (against `ca_file`, else the webpki roots), and the
    /// server name to send (none by default: the backend is an IP address).
    pub tls_verify: bool,
    pub sni: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// `udp`: the datagram sent, and the prefix a reply must start with (any reply without).
    pub send: Payload,
    pub expect_hex: Option<Vec<u8>>,
    /// `dns`: the question asked (default ". NS"; with a `query_name`, type A by default).
    pub query_name: String,
    pub query_type: String,
    /// `pgsql` (default "lb") and `exec` (default "nobody"): who the check is.
    pub user: String,
    /// `pgsql`: the database named in the startup message.
    pub database: String,
    /// `pgsql`, `redis`: the role the server must have.
    pub role: Option<Role>,
    /// `pgsql` (required with `role`), `redis`: read at each check.
    pub password_file: Option<PathBuf>,
    /// `exec`: the program (absolute path) and its arguments.
    pub command: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub address: IpAddr,
    pub weight: u32,
    pub mac: Option<[u8; 6]>,
    /// The port the backend serves on (`nat` only; None: the service's port).
    pub port: Option<u16>,
}

impl Backend {
    /// The port the backend serves the service `service_port` on.
    pub fn port_or(&self, service_port: u16) -> u16 {
        self.port.unwrap_or(service_port)
    }

    /// Its identity in a service of port `service_port`.
    pub fn key(&self, service_port: u16) -> BackendKey {
        BackendKey {
            address: self.address,
            port: self.port_or(service_port),
        }
    }
}

/// What identifies a backend within its service: its address and the port it serves on (the
/// service's, but with `nat` and a `port` of its own). Only a `nat` service may have one address
/// on several ports. Shown as `address:port` (`[v6]:port`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub address: IpAddr,
    pub port: u16,
}

impl fmt::Display for BackendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.address {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

/// Why a command's backend names none of a service's backends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoBackend {
    #[error("service {service} has no backend {backend} (see `lbctl backend list {service}`)")]
    Missing { service: String, backend: String },
    #[error(
        "service {service} has {} backends at {address} (ports {}): name one with --port, e.g. `{address} --port {}`",
        ports.len(),
        ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", "),
        ports[0]
    )]
    Ambiguous {
        service: String,
        address: IpAddr,
        ports: Vec<u16>,
    },
}

pub const DEFAULT_SOCKET: &str = "/run/lb/lbd.sock";
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/lb";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/lb";
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 1_048_576;
pub const DEFAULT_WEIGHT: u32 = 100;
/// Largest weight a backend may have (keeps weighted sums far from overflow).
pub const MAX_WEIGHT: u32 = 1_000_000;

// ---- the file as written (every value that validation may complain about keeps its span) ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    daemon: Spanned<RawDaemon>,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    interfaces: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    xdp_mode: XdpMode,
    socket: Option<Spanned<PathBuf>>,
    bpffs_dir: Option<Spanned<PathBuf>>,
    metrics: Option<Spanned<String>>,
    conntrack_entries: Option<Spanned<u32>>,
    nat_entries: Option<Spanned<u32>>,
    idle_hold_s: Option<Spanned<u64>>,
    new_flow_limit: Option<Spanned<u32>>,
    state_dir: Option<Spanned<PathBuf>>,
    hash_seed: Option<Spanned<String>>,
    log_level: Option<Spanned<String>>,
    node_name: Option<Spanned<String>>,
    announce: Option<Spanned<RawAnnounce>>,
    sync: Option<Spanned<RawSync>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSync {
    listen: Option<Spanned<String>>,
    peers: Option<Spanned<Vec<Spanned<String>>>>,
    key_file: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnnounce {
    table: Option<Spanned<i64>>,
    protocol: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    vip: Spanned<IpAddr>,
    port: Spanned<u16>,
    protocol: Protocol,
    forwarding: Option<Spanned<Forwarding>>,
    #[serde(default)]
    hash: HashMode,
    table_size: Option<Spanned<u32>>,
    tunnel_source: Option<Spanned<IpAddr>>,
    health: Option<Spanned<RawHealth>>,
    #[serde(default)]
    backend: Vec<Spanned<RawBackend>>,
    allow: Option<Spanned<Vec<Spanned<String>>>>,
    deny: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default = "default_check")]
    check: CheckKind,
    port: Option<Spanned<u16>>,
    interval_ms: Option<Spanned<u64>>,
    timeout_ms: Option<Spanned<u64>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
    path: Option<Spanned<String>>,
    expect: Option<Spanned<u16>>,
    tls_verify: Option<Spanned<bool>>,
    sni: Option<Spanned<String>>,
    ca_file: Option<Spanned<PathBuf>>,
    send: Option<Spanned<String>>,
    send_hex: Option<Spanned<String>>,
    expect_hex: Option<Spanned<String>>,
    query_name: Option<Spanned<String>>,
    query_type: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    database: Option<Spanned<String>>,
    role: Option<Spanned<Role>>,
    password_file: Option<Spanned<PathBuf>>,
    command: Option<Spanned<Vec<Spanned<String>>>>,
}

fn default_check() -> CheckKind {
    CheckKind::Tcp
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<IpAddr>,
    weight: Option<Spanned<u32>>,
    mac: Option<Spanned<String>>,
    port: Option<Spanned<u16>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            check: CheckKind::None,
            port: 0,
            port_given: false,
            interval_ms: 1000,
            timeout_ms: 500,
            rise: 2,
            fall: 3,
            path: "/".into(),
            expect: 200,
            tls_verify: false,
            sni: None,
            ca_file: None,
            send: Payload::default(),
            expect_hex: None,
            query_name: ".".into(),
            query_type: "NS".into(),
            user: String::new(),
            database: "postgres".into(),
            role: None,
            password_file: None,
            command: vec![],
        }
    }
}

/// A config that passed validation, with the warnings it raised.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<Problem>,
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&src).map_err(|problems| ConfigError::Invalid {
        path: path.to_owned(),
        problems,
    })
}

impl Config {
    /// Flows each NAT table gets when lbd starts on this config: `daemon.nat_entries` when a
    /// service uses `nat` or the file sets it, else the smallest size (the tables are
    /// allocated whole, about 290 bytes a flow for the pair, whether used or not). A `nat`
    /// service added at run time needs tables of `daemon.nat_entries`
    /// (`Daemon::make_nat_room`).
    pub fn nat_tables(&self) -> u32 {
        if self.daemon.nat_entries_set
            || self
                .services
                .iter()
                .any(|s| s.forwarding == Forwarding::Nat)
        {
            self.daemon.nat_entries
        } else {
            lb_common::nat::MIN_NAT_ENTRIES
        }
    }

    /// A one-paragraph summary for `lbd --check`.
    pub fn summary(&self) -> String {
        let backends: usize = self.services.iter().map(|s| s.backends.len()).sum();
        let mut out = format!(
            "config OK: {} interface(s) ({}), {} service(s), {} backend(s)\n",
            self.daemon.interfaces.len(),
            self.daemon.interfaces.join(", "),
            self.services.len(),
            backends
        );
        for s in &self.services {
            out.push_str(&format!(
                "  service {}: {} port {} {} via {:?}, hash {:?}, table {}, {} backend(s), health {}{}\n",
                s.name,
                s.vip,
                s.port,
                s.protocol,
                s.forwarding,
                s.hash,
                s.table_size,
                s.backends.len(),
                s.health.check,
                s.filters_summary()
            ));
        }
        out.push_str(&format!("  node {}", self.daemon.node_name()));
        match self.daemon.announce {
            Some(a) => out.push_str(&format!(
                ", serving VIPs announced as host routes in table {} with protocol {}\n",
                a.table, a.protocol
            )),
            None => out.push_str(", VIPs not announced (no [daemon.announce])\n"),
        }
        if let Some(sync) = &self.daemon.sync {
            out.push_str(&format!(
                "  connection state shared from {} with {}\n",
                sync.listen,
                sync.peers
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        out
    }
}
