//! lbd's runtime state: each service and backend with the id the data path knows it by, where
//! a backend's frames go (`Hop`), its health, and the Maglev table of what may take new
//! clients. Plain data and the small functions that read it; nothing here does I/O.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::SystemTime};

use lb_common::{
    Backend, ServiceKey, ServiceValue, backend_flags,
    maglev::{MaglevBackend, build_table, port_salts, table_fingerprint},
    service_flags,
};

use crate::{
    config::{self, BackendKey, Forwarding, HashMode},
    health,
    netlink::{NetlinkError, Vlan},
    state,
};

/// Where a backend's frames go.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Hop {
    /// The interface the route leaves by (where the neighbour entry lives).
    pub ifindex: u32,
    /// Set when that interface is an 802.1Q VLAN device: frames leave by its parent, with its
    /// tag (a VLAN device cannot take XDP redirects).
    pub vlan: Option<Vlan>,
    pub mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// The egress interface's MTU.
    pub mtu: u16,
    /// `tunnel`: the outer source address.
    pub tunnel_src: Option<IpAddr>,
    /// Whose MAC `mac` is: the backend (dsr) or the gateway towards it.
    pub via: IpAddr,
}

impl Hop {
    /// The interface the data path sends the backend's frames out of.
    pub fn egress(&self) -> u32 {
        self.vlan.map_or(self.ifindex, |v| v.parent)
    }
}

/// What resolving a backend's hop needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct HopRequest {
    pub(super) backend: config::Backend,
    pub(super) forwarding: Forwarding,
    pub(super) tunnel_source: Option<IpAddr>,
}

impl HopRequest {
    pub(super) fn of(s: &config::Service, b: &config::Backend) -> HopRequest {
        HopRequest {
            backend: b.clone(),
            forwarding: s.forwarding,
            tunnel_source: s.tunnel_source,
        }
    }
}

/// Why a backend has no hop (yet).
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(
        "backend {backend} is behind gateway {gateway}: dsr needs backends on a directly connected network (tunnel forwarding does not)"
    )]
    BehindGateway { backend: IpAddr, gateway: IpAddr },
    #[error("interface {ifindex} of the route to {backend} vanished")]
    InterfaceVanished { ifindex: u32, backend: IpAddr },
    #[error("the parent (ifindex {parent}) of {vlan}, the route to {backend}, vanished")]
    VlanParentVanished {
        parent: u32,
        vlan: String,
        backend: IpAddr,
    },
    #[error(
        "backend {backend} is reached by {vlan} (VLAN {id} with protocol {protocol:#06x}): the data path writes 802.1Q tags (0x8100) only"
    )]
    VlanProtocol {
        backend: IpAddr,
        vlan: String,
        id: u16,
        protocol: u16,
    },
    #[error(
        "backend {backend} is reached by {vlan}, a VLAN on the VLAN {parent}: the data path writes one 802.1Q tag, not two"
    )]
    VlanOnVlan {
        backend: IpAddr,
        vlan: String,
        parent: String,
    },
    #[error(
        "no {family} address on {iface} to use as the tunnel source for {backend}: set tunnel_source"
    )]
    NoTunnelSource {
        family: &'static str,
        iface: String,
        backend: IpAddr,
    },
    #[error("not resolved within the first {0:?} (retried in the background)")]
    TooSlow(std::time::Duration),
    #[error("opening a netlink connection: {0}")]
    NoNetlink(String),
    #[error("not resolved yet (retried in the background)")]
    NotYet,
}

impl ResolveError {
    /// Only the neighbour did not answer (the route and interface are known): a backend that
    /// has a hop keeps it.
    pub fn neighbour_only(&self) -> bool {
        matches!(
            self,
            ResolveError::Netlink(NetlinkError::Unresolved { .. } | NetlinkError::Neighbour { .. })
        )
    }
}

/// Resolved hops by service name and backend address, as `Daemon::reconcile` takes them (a
/// hop depends on the address only: backends of one address on several ports share it).
pub type Hops = HashMap<(String, IpAddr), Result<Hop, ResolveError>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Up,
    Down,
    Draining,
}

impl std::fmt::Display for BackendState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendState::Up => "up",
            BackendState::Down => "down",
            BackendState::Draining => "draining",
        })
    }
}

/// The last health check of a backend.
#[derive(Debug, Clone)]
pub struct LastCheck {
    pub result: health::CheckResult,
    pub detail: String,
    pub at: SystemTime,
}

#[derive(Debug, Clone)]
pub struct BackendRuntime {
    pub id: u32,
    pub cfg: config::Backend,
    pub hop: Option<Hop>,
    /// Why the hop is missing.
    pub hop_error: Option<String>,
    /// Health: false once `fall` checks failed (or until the first check passes for a backend
    /// added at run time).
    pub healthy: bool,
    pub last: Option<LastCheck>,
    /// When the state (up, down, draining) last changed.
    pub since: SystemTime,
}

impl BackendRuntime {
    /// Whether new clients may be sent here.
    pub fn in_table(&self) -> bool {
        self.hop.is_some() && self.healthy && self.cfg.weight > 0
    }

    pub fn state(&self) -> BackendState {
        if self.cfg.weight == 0 {
            BackendState::Draining
        } else if self.in_table() {
            BackendState::Up
        } else {
            BackendState::Down
        }
    }

    /// Takes a resolution of the hop: the hop, or why there is none.
    pub(super) fn set_hop(&mut self, hop: Result<Hop, ResolveError>) {
        self.hop_error = hop.as_ref().err().map(|e| e.to_string());
        self.hop = hop.ok();
    }

    /// Takes a resolution of the hop shared with the other backends of its address.
    pub(super) fn set_hop_of(&mut self, hop: &Result<Hop, ResolveError>) {
        self.hop_error = hop.as_ref().err().map(|e| e.to_string());
        self.hop = hop.as_ref().ok().cloned();
    }

    /// The data path's entry: invalid while unresolved; DOWN makes its flows leave it.
    /// `nat_port`: the port a `nat` service's packets are sent to (network order), else 0.
    pub(super) fn entry(&self, service: u32, nat_port: u16) -> Backend {
        let Some(hop) = &self.hop else {
            return Backend::default();
        };
        Backend {
            addr: state::to_addr(self.cfg.address),
            tunnel_src: hop.tunnel_src.map(state::to_addr).unwrap_or_default(),
            mac: hop.mac,
            port: nat_port,
            src_mac: hop.src_mac,
            ifindex: hop.egress(),
            service,
            family: state::family(self.cfg.address),
            flags: backend_flags::VALID | if self.healthy { 0 } else { backend_flags::DOWN },
            mtu: hop.mtu,
            vlan: hop.vlan.map_or(0, |v| v.id),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServiceRuntime {
    pub id: u32,
    pub cfg: config::Service,
    pub backends: Vec<BackendRuntime>,
    /// The Maglev table of the backends that may take new clients now (the data path's once
    /// the daemon has synced it), and what it was built from: it is rebuilt only when that
    /// changes (shared with the fills that name it).
    pub table: Arc<[u32]>,
    built_from: Option<([u64; 2], u32, Vec<MaglevBackend>)>,
    /// `table`'s fingerprint (`lb_common::maglev::table_fingerprint`), and whether it was taken
    /// for 5-tuple hashing (None: not taken yet for this table).
    fingerprint: (u64, Option<bool>),
}

pub fn service_key(s: &config::Service) -> ServiceKey {
    ServiceKey {
        addr: state::to_addr(s.vip),
        port: s.port.to_be(),
        proto: s.protocol.number(),
        family: state::family(s.vip),
    }
}

impl ServiceRuntime {
    pub fn new(id: u32, cfg: config::Service, backends: Vec<BackendRuntime>) -> ServiceRuntime {
        ServiceRuntime {
            id,
            cfg,
            backends,
            table: Arc::from([]),
            built_from: None,
            fingerprint: (0, None),
        }
    }

    pub fn key(&self) -> ServiceKey {
        service_key(&self.cfg)
    }

    /// The port (network order) the data path sends `b`'s packets to: its own with `nat`
    /// (0: the client's destination port, for a `nat` service of every port without one),
    /// else 0 (the port is not rewritten).
    pub fn nat_port(&self, b: &BackendRuntime) -> u16 {
        if self.cfg.forwarding == Forwarding::Nat {
            b.cfg.port_or(self.cfg.port).to_be()
        } else {
            0
        }
    }

    /// The address of backend `id`, if it is this service's.
    pub fn address_of(&self, id: u32) -> Option<IpAddr> {
        self.by_id(id).map(|b| b.cfg.address)
    }

    /// Backend `id`, if it is this service's.
    pub fn by_id(&self, id: u32) -> Option<&BackendRuntime> {
        self.backends.iter().find(|b| b.id == id)
    }

    /// The identity of `b` (address and the port it serves on).
    pub fn key_of(&self, b: &BackendRuntime) -> BackendKey {
        b.cfg.key(self.cfg.port)
    }

    /// How lbd names `b` (`config::Service::backend_name`): its address, or `address:port`
    /// when the service has that address more than once.
    pub fn name_of(&self, b: &BackendRuntime) -> String {
        self.cfg.backend_name(&b.cfg)
    }

    pub(crate) fn value(&self) -> ServiceValue {
        let mut flags = 0;
        if self.cfg.forwarding == Forwarding::Tunnel {
            flags |= service_flags::TUNNEL;
        }
        if self.cfg.forwarding == Forwarding::Nat {
            flags |= service_flags::NAT;
        }
        if self.cfg.hash == HashMode::FiveTuple {
            flags |= service_flags::HASH_5TUPLE;
        }
        if !self.cfg.deny.is_empty() {
            flags |= service_flags::HAS_DENY;
        }
        if !self.cfg.allow.is_empty() {
            flags |= service_flags::HAS_ALLOW;
        }
        ServiceValue {
            id: self.id,
            flags,
            table_size: self.cfg.table_size,
            _pad: 0,
        }
    }

    /// The Maglev table for the backends that may take new clients now, or with some of them
    /// left out (`--dry-run`).
    pub fn table_without(&self, seed: &[u64; 2], left_out: Option<u32>) -> Vec<u32> {
        build_table(seed, &self.live(left_out), self.cfg.table_size)
    }

    /// The backends that may take new clients now, but backend `left_out`. Each one's
    /// permutation comes from its address, and from its port too when it repeats an address
    /// (`lb_common::maglev::port_salts`, over every backend of the service: a drain or a
    /// failed check changes no other backend's permutation).
    fn live(&self, left_out: Option<u32>) -> Vec<MaglevBackend> {
        let identities: Vec<(lb_common::Addr, u16)> = self
            .backends
            .iter()
            .map(|b| (state::to_addr(b.cfg.address), b.cfg.port_or(self.cfg.port)))
            .collect();
        let salts = port_salts(self.cfg.port, &identities);
        self.backends
            .iter()
            .zip(salts)
            .filter(|(b, _)| b.in_table() && Some(b.id) != left_out)
            .map(|(b, salt)| MaglevBackend {
                id: b.id,
                addr: state::to_addr(b.cfg.address),
                salt,
                weight: b.cfg.weight,
            })
            .collect()
    }

    /// Brings `table` up to date with the backends, their state and the table size.
    pub(super) fn refresh_table(&mut self, seed: &[u64; 2]) {
        let inputs = (*seed, self.cfg.table_size, self.live(None));
        if self.built_from.as_ref() != Some(&inputs) {
            self.table = build_table(seed, &inputs.2, self.cfg.table_size).into();
            self.built_from = Some(inputs);
            self.fingerprint.1 = None;
        }
        let five_tuple = self.cfg.hash == HashMode::FiveTuple;
        if self.fingerprint.1 != Some(five_tuple)
            && let Some((_, _, live)) = &self.built_from
        {
            let fp = table_fingerprint(
                seed,
                &self.table,
                live,
                state::family(self.cfg.vip),
                five_tuple,
            );
            self.fingerprint = (fp, Some(five_tuple));
        }
    }

    /// The fingerprint of the Maglev table (`lb_common::maglev::table_fingerprint`): equal on
    /// every node with the same seed, backends, weights, table size and hash. 0 until the
    /// table is first built.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint.0
    }

    /// Takes over the table `old` (the same service before a change) built, so that it is
    /// rebuilt only if what it is built from changed.
    pub(super) fn keep_table_of(&mut self, old: ServiceRuntime) {
        self.table = old.table;
        self.built_from = old.built_from;
        self.fingerprint = old.fingerprint;
    }

    /// The backend of identity `key`.
    pub fn backend(&self, key: BackendKey) -> Option<&BackendRuntime> {
        self.backends.iter().find(|b| self.key_of(b) == key)
    }

    /// What checking `b` means. A `nat` backend is checked on its own port unless the health
    /// table names one.
    pub(super) fn health_target(&self, b: &BackendRuntime) -> health::Target {
        let mut spec = self.cfg.health.clone();
        if self.cfg.forwarding == Forwarding::Nat && !spec.port_given {
            spec.port = b.cfg.port_or(self.cfg.port);
        }
        health::Target {
            service: self.cfg.name.clone(),
            backend: b.cfg.address,
            port: b.cfg.port_or(self.cfg.port),
            spec,
        }
    }
}

/// The key under which a drained backend's weight before its drain is kept: "service address"
/// for a backend on the service's port (as lbd always kept it), "service address:port" for one
/// with a port of its own.
pub(super) fn drained_key(service: &str, service_port: u16, key: BackendKey) -> String {
    if key.port == service_port {
        format!("{service} {}", key.address)
    } else {
        format!("{service} {key}")
    }
}

pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
