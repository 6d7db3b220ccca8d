//! The control API's wire types: what lbctl sends and what lbd answers, as JSON.
//!
//! Plain data only: nothing here reads the daemon, the data path or the config file. The few
//! enums a field carries are the config's value types and the state enums lbd reports
//! (`BackendState`, `InterfaceState`, `Start`), all plain `serde` enums.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{
    config::{CheckKind, Cidr, Forwarding, HashMode, Protocol, Role},
    daemon::{BackendState, InterfaceState},
};

// ---- status and stats ----

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Status {
    pub pid: u32,
    pub version: String,
    pub config: String,
    pub uptime_s: u64,
    pub program_id: u32,
    pub layout_version: u32,
    pub bpffs_dir: String,
    pub start: crate::datapath::Start,
    pub interfaces: Vec<InterfaceStatus>,
    /// The node's name, drain, and what it serves and announces (flattened: `node_name`,
    /// `drained`, `serving`, `announced`, … at the top of the document).
    #[serde(flatten)]
    pub node: NodeStatus,
    pub services: Vec<ServiceStatus>,
    pub backends: usize,
    /// With `[daemon.sync]`: the other nodes, as this one hears them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<Vec<PeerStatus>>,
}

/// A peer of `[daemon.sync]` in `lbctl status`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PeerStatus {
    /// Its `listen` address, as configured here.
    pub address: String,
    /// The name it gave, once heard.
    pub node_name: Option<String>,
    /// Seconds since its last accepted datagram.
    pub last_heard_s: Option<f64>,
    /// Heard within the last 3 s.
    pub up: bool,
    /// Whether every service both nodes have has equal table fingerprints (from its last
    /// hello).
    pub agree: Option<bool>,
    /// Why its last datagram was refused (e.g. sent with another hash seed), if it was.
    pub refused: Option<String>,
    pub entries_sent: u64,
    pub entries_received: u64,
    /// Flows received that this node has no service or backend for (their tables differ).
    pub entries_unplaced: u64,
    /// Whether it says it is drained (from its last hello).
    pub drained: Option<bool>,
    /// Datagrams and bytes (UDP payload) sent to it, hellos included.
    pub datagrams_sent: u64,
    pub bytes_sent: u64,
}

/// `[daemon.announce]` as lbd runs with it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnounceConfig {
    pub table: u32,
    pub protocol: u8,
}

/// A service in `lbctl status`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// Backends up (taking new clients).
    pub up: usize,
    /// The Maglev table's fingerprint (`lb_common::maglev::table_fingerprint`, keyed with the
    /// hash seed), 16 hex digits: equal on nodes that place every client alike.
    pub fingerprint: String,
}

/// `GET /v1/node`: the node's name, drain and what it serves and announces.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NodeStatus {
    /// This node's name (`daemon.node_name`, else the host name).
    pub node_name: String,
    /// `lbctl node drain`: no VIP is announced.
    pub drained: bool,
    /// The VIPs this node serves (and, with `[daemon.announce]`, announces): `lbctl node
    /// check` succeeds when there is one.
    pub serving: Vec<String>,
    /// The VIPs whose host routes are in the announce table now (empty without
    /// `[daemon.announce]`).
    pub announced: Vec<String>,
    /// `[daemon.announce]`, if configured.
    pub announce: Option<AnnounceConfig>,
    /// Why the routes are not in step with the serving VIPs, if they are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_problem: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct InterfaceStatus {
    pub name: String,
    /// Its index now (0 while it is missing).
    pub ifindex: u32,
    pub mode: String,
    pub link_id: u32,
    /// Whether the program is on it now: `attached`, `missing` or `detached`.
    pub state: Option<InterfaceState>,
    /// Why its state could not be read, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Stats {
    pub services: Vec<ServiceStats>,
    pub dropped: Vec<ReasonCount>,
    pub conntrack: Conntrack,
    /// Flows each NAT table holds.
    #[serde(default)]
    pub nat_capacity: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Conntrack {
    pub entries: u64,
    pub capacity: u64,
    /// Maglev slots whose backend changed since a flow that may still live began (only flows
    /// on them are recorded).
    #[serde(default)]
    pub changed_slots: u64,
    /// New flows on changed slots by outcome (`recorded`, `over_limit`, `no_room`).
    #[serde(default)]
    pub new_flows: Vec<NewFlowCount>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NewFlowCount {
    pub outcome: String,
    /// Since the program was loaded.
    pub flows: u64,
    /// Over the last count (about a second).
    pub per_second: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ServiceStats {
    pub service: String,
    pub packets: u64,
    pub bytes: u64,
    /// A `nat` service's replies rewritten and sent on to their clients, and their bytes
    /// (frames as sent); absent for other services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_packets: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_bytes: Option<u64>,
    pub backends: Vec<BackendStats>,
    /// The service's packets not forwarded, by reason (every reason; also in `dropped` of
    /// `Stats`, which counts every service's and those of no known service).
    #[serde(default)]
    pub dropped: Vec<ReasonCount>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct BackendStats {
    pub address: String,
    /// The port it serves on.
    #[serde(default)]
    pub port: u16,
    /// How lbd names it: its address, or `address:port` when the service has that address
    /// more than once.
    #[serde(default)]
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ReasonCount {
    pub reason: String,
    pub packets: u64,
}

/// `?port=P` on a backend's URL (`/v1/services/NAME/backends/ADDRESS`): the backend at ADDRESS
/// serving on port P. Without it the address must name one backend of the service.
#[derive(Deserialize, Serialize, Default, Debug, Clone, Copy)]
pub struct PortQuery {
    pub port: Option<u16>,
}

/// `?service=NAME`: only that service (`/v1/stats`, `/v1/backends`).
#[derive(Deserialize)]
pub struct ServiceFilter {
    pub service: Option<String>,
}

// ---- services ----

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ServiceInfo {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub hash: HashMode,
    pub table_size: u32,
    pub check: CheckKind,
    pub backends: usize,
    pub up: usize,
    /// Client filters: only these clients (empty: every client)…
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// …and never these (checked first).
    #[serde(default)]
    pub deny: Vec<Cidr>,
}

/// A prefix for `lbctl service allow|deny|unlist`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NewPrefix {
    pub prefix: Cidr,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NewService {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default)]
    pub forwarding: Forwarding,
    #[serde(default)]
    pub hash: HashMode,
    /// The Maglev table size (default 65537).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_size: Option<u32>,
    /// `[service.health]`, as the keys of the config file (validated by lbd as the file's
    /// are); absent: no checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthOptions>,
}

/// The keys of a `[service.health]` table, each optional, named as in the config file.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_verify: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_hex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_hex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
}

impl HealthOptions {
    /// The lbctl option that sets a key of `[service.health]`.
    pub fn flag_of(key: &str) -> String {
        match key {
            "port" => "--check-port".into(),
            "command" => "the command after `--`".into(),
            k => format!("--{}", k.replace('_', "-")),
        }
    }
}

/// An answer to a change: what changed.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Changed {
    pub changes: Vec<String>,
}

// ---- backends ----

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct BackendInfo {
    pub service: String,
    pub address: IpAddr,
    /// How lbd names it (in logs, metrics and lbctl's output): its address, or `address:port`
    /// when the service has that address more than once (see `port`).
    #[serde(default)]
    pub name: String,
    pub weight: u32,
    pub state: BackendState,
    /// Seconds in the current state.
    pub since_s: u64,
    pub check: CheckKind,
    pub last_check: Option<String>,
    pub last_check_ok: Option<bool>,
    /// Seconds since the last check.
    pub last_check_age_s: Option<u64>,
    pub mac: Option<String>,
    /// The port its packets go to (the service's, but with `nat` and a `port` of its own).
    #[serde(default)]
    pub port: u16,
    /// Why the backend cannot be reached (unresolved MAC), when it cannot.
    pub problem: Option<String>,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NewBackend {
    pub address: IpAddr,
    #[serde(default)]
    pub weight: Option<u32>,
    /// `nat` only: the port the backend serves on (default: the service's).
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Removal {
    pub service: String,
    pub address: IpAddr,
    /// The port the backend serves on.
    #[serde(default)]
    pub port: u16,
    /// How lbd names it (its address, or `address:port` when the service has that address more
    /// than once).
    #[serde(default)]
    pub name: String,
    pub table_size: u32,
    /// Slots (clients) that would change backend.
    pub moved_slots: u64,
    /// Share of all clients that would move.
    pub moved_share: f64,
    /// Share of all clients now on this backend (they all move).
    pub own_share: f64,
    /// Share of the other backends' clients that would move too.
    pub others_moved_share: f64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NewWeight {
    pub weight: u32,
}

// ---- lookup ----

/// `?service=NAME&client=ADDRESS[&port=PORT]`.
#[derive(Deserialize)]
pub struct LookupQuery {
    pub service: String,
    pub client: String,
    pub port: Option<u16>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Lookup {
    pub service: String,
    pub client: IpAddr,
    pub client_port: Option<u16>,
    /// The backend chosen, or None when the service has no usable backend.
    pub backend: Option<IpAddr>,
    /// The port that backend serves on.
    #[serde(default)]
    pub backend_port: Option<u16>,
    /// How lbd names it: its address, or `address:port` when the service has that address
    /// more than once.
    #[serde(default)]
    pub backend_name: Option<String>,
    /// With a port, what decides the flow's next packet (not a SYN): "connection-table" (its
    /// record), "previous-backend" (no record, on a slot that changed backend: the flow is
    /// taken for one older than the change), "every-port-service" (no record, on a port that
    /// got its own service after the flow began), "nat-flow" (a `nat` flow's recorded
    /// backend, still in the service); else, and without a port, "hash" (the
    /// Maglev slot's current backend: where a new connection goes); "denied" when the
    /// service's client filters drop the client's packets.
    pub reason: String,
    pub hash: u32,
    pub slot: u32,
    pub table_size: u32,
    /// With reason "denied": why the service's client filters drop this client's packets
    /// (`backend` is then null).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied: Option<String>,
}

/// `POST /v1/trace`: trace the next `count` packets of `target` (a service name, a VIP, or
/// every service when absent). The answer streams one `TraceLine` per line (JSON) as packets
/// come, and ends after `count` of them or when the client goes.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TraceRequest {
    #[serde(default)]
    pub target: Option<String>,
    pub count: u32,
}

/// One traced packet, as the data path saw and handled it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TraceLine {
    pub client: IpAddr,
    pub client_port: u16,
    pub vip: IpAddr,
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// `syn`, `closing`, `icmp-error`, `fragment`.
    pub flags: Vec<String>,
    /// The service's name (None: no service has this port and protocol of the VIP).
    pub service: Option<String>,
    /// The connection table: `not-read` (the slot is unchanged), `hit` or `miss`.
    pub table: String,
    pub backend: Option<IpAddr>,
    /// The port the backend serves on.
    #[serde(default)]
    pub backend_port: Option<u16>,
    /// How lbd names the backend: its address, or `address:port` when the service has that
    /// address more than once.
    #[serde(default)]
    pub backend_name: Option<String>,
    /// `tx`, `redirect`, `pass` or `drop`.
    pub action: String,
    /// `forwarded`, or why not (the labels of `lb_dropped_total`, or `no_service`).
    pub reason: String,
    pub bytes: u32,
}
