//! Validation: from the config text to a [`Config`] or every [`Problem`] found, each named with
//! its dotted key and line.

use super::checker::{Checker, key_at};
use super::*;

/// Parses and validates config text: the config, or every problem found.
pub fn parse(src: &str) -> Result<Loaded, Vec<Problem>> {
    let raw: RawConfig = match toml::from_str(src) {
        Ok(raw) => raw,
        Err(e) => {
            let mut checker = Checker::new(src);
            let line = e.span().map(|s| checker.line(s.start));
            checker.problems.push(Problem {
                line,
                key: e
                    .span()
                    .and_then(|s| key_at(src, s.start))
                    .unwrap_or_default(),
                message: e.message().trim().to_string(),
            });
            return Err(checker.problems);
        }
    };
    let mut c = Checker::new(src);
    let daemon = check_daemon(&mut c, raw.daemon.into_inner());
    let services = check_services(&mut c, raw.service);
    if c.problems.is_empty() {
        Ok(Loaded {
            config: Config { daemon, services },
            warnings: c.warnings,
        })
    } else {
        Err(c.problems)
    }
}

fn absolute_path(
    c: &mut Checker,
    v: Option<Spanned<PathBuf>>,
    key: &str,
    default: &str,
) -> PathBuf {
    match v {
        None => PathBuf::from(default),
        Some(p) => {
            if !p.get_ref().is_absolute() {
                c.error(
                    &p,
                    key,
                    format!("{} is not an absolute path", p.get_ref().display()),
                );
            }
            p.into_inner()
        }
    }
}

fn check_daemon(c: &mut Checker, d: RawDaemon) -> Daemon {
    let mut interfaces = vec![];
    if d.interfaces.get_ref().is_empty() {
        c.error(
            &d.interfaces,
            "daemon.interfaces",
            "lists no interface; name at least one, e.g. [\"eth0\"]",
        );
    }
    let mut seen = HashSet::new();
    for (i, name) in d.interfaces.get_ref().iter().enumerate() {
        let key = format!("daemon.interfaces[{i}]");
        let n = name.get_ref();
        if n.is_empty() || n.len() > 15 || n.contains(['/', ' ']) || n == "." || n == ".." {
            c.error(
                name,
                &key,
                format!(
                    "{n:?} is not a valid interface name (1 to 15 characters, no '/' or space)"
                ),
            );
        } else if !seen.insert(n.clone()) {
            c.error(name, &key, format!("interface {n:?} is listed twice"));
        }
        interfaces.push(n.clone());
    }
    let metrics = d
        .metrics
        .and_then(|m| match m.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                c.error(
                    &m,
                    "daemon.metrics",
                    format!(
                        "{:?} is not an address:port such as \"127.0.0.1:9917\"",
                        m.get_ref()
                    ),
                );
                None
            }
        });
    let conntrack_entries = match d.conntrack_entries {
        None => DEFAULT_CONNTRACK_ENTRIES,
        Some(n) => {
            if *n.get_ref() == 0 || *n.get_ref() > 1 << 27 {
                c.error(
                    &n,
                    "daemon.conntrack_entries",
                    format!("{} is out of range: 1 to 134217728", n.get_ref()),
                );
            }
            *n.get_ref()
        }
    };
    let nat_entries_set = d.nat_entries.is_some();
    let nat_entries = match d.nat_entries {
        None => lb_common::nat::NAT_ENTRIES,
        Some(n) => {
            let (min, max) = (
                lb_common::nat::MIN_NAT_ENTRIES,
                lb_common::nat::MAX_NAT_ENTRIES,
            );
            if !(min..=max).contains(n.get_ref()) {
                c.error(
                    &n,
                    "daemon.nat_entries",
                    format!("{} is out of range: {min} to {max}", n.get_ref()),
                );
            }
            *n.get_ref()
        }
    };
    let idle_hold_s = match d.idle_hold_s {
        None => lb_common::slotstate::DEFAULT_IDLE_HOLD_S,
        Some(n) => {
            if *n.get_ref() > MAX_IDLE_HOLD_S {
                c.error(
                    &n,
                    "daemon.idle_hold_s",
                    format!(
                        "{} is out of range: 0 to {MAX_IDLE_HOLD_S} (ten years)",
                        n.get_ref()
                    ),
                );
            }
            *n.get_ref()
        }
    };
    let new_flow_limit = match d.new_flow_limit {
        None => lb_common::DEFAULT_NEW_FLOW_LIMIT,
        Some(n) => {
            if *n.get_ref() > MAX_NEW_FLOW_LIMIT {
                c.error(
                    &n,
                    "daemon.new_flow_limit",
                    format!(
                        "{} is out of range: 0 (no limit) to {MAX_NEW_FLOW_LIMIT} new flows per second per CPU",
                        n.get_ref()
                    ),
                );
            }
            *n.get_ref()
        }
    };
    let hash_seed = d
        .hash_seed
        .and_then(|s| match lb_common::hash::parse_seed(s.get_ref()) {
            Some(seed) => Some(seed),
            None => {
                c.error(
                    &s,
                    "daemon.hash_seed",
                    "must be exactly 32 hex digits (128 bits), e.g. from `openssl rand -hex 16`",
                );
                None
            }
        });
    let log_level = d.log_level.map(|l| {
        let v = l.get_ref().to_ascii_lowercase();
        if !["error", "warn", "info", "debug", "trace", "off"].contains(&v.as_str()) {
            c.error(
                &l,
                "daemon.log_level",
                format!("{v:?} is not one of error, warn, info, debug, trace, off"),
            );
        }
        v
    });
    let node_name = d.node_name.map(|n| {
        if let Some(problem) = name_problem(n.get_ref()) {
            c.error(&n, "daemon.node_name", problem);
        }
        n.into_inner()
    });
    let announce = d.announce.map(|a| check_announce(c, a.into_inner()));
    let sync = d.sync.and_then(|s| {
        let span = s.span();
        check_sync(c, s.into_inner(), span)
    });
    Daemon {
        interfaces,
        xdp_mode: d.xdp_mode,
        socket: absolute_path(c, d.socket, "daemon.socket", DEFAULT_SOCKET),
        bpffs_dir: absolute_path(c, d.bpffs_dir, "daemon.bpffs_dir", DEFAULT_BPFFS_DIR),
        metrics,
        conntrack_entries,
        nat_entries,
        nat_entries_set,
        idle_hold_s,
        new_flow_limit,
        state_dir: absolute_path(c, d.state_dir, "daemon.state_dir", DEFAULT_STATE_DIR),
        hash_seed,
        log_level,
        node_name,
        announce,
        sync,
    }
}

/// `[daemon.sync]`: `listen` and `key_file` required, `peers` at least one address other than
/// `listen`, each an IP address with a port.
fn check_sync(c: &mut Checker, s: RawSync, span: std::ops::Range<usize>) -> Option<SyncPeers> {
    let addr = |c: &mut Checker, v: &Spanned<String>, key: &str| -> Option<SocketAddr> {
        match v.get_ref().parse::<SocketAddr>() {
            Ok(a) if a.port() != 0 && !a.ip().is_unspecified() => Some(a),
            _ => {
                c.error(
                    v,
                    key,
                    format!(
                        "{:?} is not an IP address with a port (e.g. \"192.0.2.1:9918\" or \"[2001:db8::1]:9918\")",
                        v.get_ref()
                    ),
                );
                None
            }
        }
    };
    let listen = match &s.listen {
        Some(l) => addr(c, l, "daemon.sync.listen"),
        None => {
            c.error_at(
                span.clone(),
                "daemon.sync.listen",
                "required: this node's UDP address for its peers (e.g. \"192.0.2.1:9918\")",
            );
            None
        }
    };
    let mut peers = vec![];
    match &s.peers {
        Some(list) if !list.get_ref().is_empty() => {
            for p in list.get_ref() {
                if let Some(a) = addr(c, p, "daemon.sync.peers") {
                    if Some(a) == listen {
                        c.error(
                            p,
                            "daemon.sync.peers",
                            format!(
                                "{a} is this node's own `listen` address: list the other nodes only"
                            ),
                        );
                    } else if peers.contains(&a) {
                        c.error(p, "daemon.sync.peers", format!("{a} is listed twice"));
                    } else {
                        peers.push(a);
                    }
                }
            }
        }
        Some(list) => c.error(
            list,
            "daemon.sync.peers",
            "empty: list the other nodes' `listen` addresses",
        ),
        None => c.error_at(
            span.clone(),
            "daemon.sync.peers",
            "required: the other nodes' `listen` addresses",
        ),
    }
    let key_file = match s.key_file {
        Some(k) if k.get_ref().is_absolute() => Some(k.into_inner()),
        Some(k) => {
            c.error(
                &k,
                "daemon.sync.key_file",
                format!("{} is not an absolute path", k.get_ref().display()),
            );
            None
        }
        None => {
            c.error_at(span, "daemon.sync.key_file", "required: a file of 64 hex digits (32 bytes) every node shares, e.g. made with `openssl rand -hex 32`");
            None
        }
    };
    Some(SyncPeers {
        listen: listen?,
        peers,
        key_file: key_file?,
    })
}

/// `[daemon.announce]`: a routing table and a protocol number that are lbd's alone.
fn check_announce(c: &mut Checker, a: RawAnnounce) -> Announce {
    let mut out = Announce::default();
    if let Some(t) = a.table {
        let v = *t.get_ref();
        match v {
            0 | 252..=255 => c.error(
                &t,
                "daemon.announce.table",
                format!(
                    "{v} is a table the kernel reserves (0 unspec, 252 compat, 253 default, 254 main, 255 local): lbd adds and removes every route of its protocol in its table, so give it a table of its own, 1 to 251 or 256 to 4294967295 (e.g. 100)"
                ),
            ),
            1..=0xffff_ffff => out.table = v as u32,
            _ => c.error(
                &t,
                "daemon.announce.table",
                format!("{v} is not a routing table id: 1 to 4294967295, not 252 to 255 (e.g. 100)"),
            ),
        }
    }
    if let Some(p) = a.protocol {
        let v = *p.get_ref();
        match v {
            0..=4 => c.error(
                &p,
                "daemon.announce.protocol",
                format!(
                    "{v} is reserved to the kernel (0 unspec, 1 redirect, 2 kernel, 3 boot, 4 static): routing daemons treat such routes as the kernel's or the operator's; choose a number of lbd's own, 5 to 255 (e.g. 200)"
                ),
            ),
            _ if ROUTING_DAEMON_PROTOCOLS.iter().any(|&(n, _)| n as i64 == v) => {
                let who = ROUTING_DAEMON_PROTOCOLS
                    .iter()
                    .find(|&&(n, _)| n as i64 == v)
                    .map_or("", |&(_, who)| who);
                c.error(
                    &p,
                    "daemon.announce.protocol",
                    format!(
                        "{v} is the protocol of {who}'s own routes: it would take lbd's routes for its own (and remove them); choose another number, 5 to 255 (e.g. 200)"
                    ),
                )
            }
            5..=255 => out.protocol = v as u8,
            _ => c.error(
                &p,
                "daemon.announce.protocol",
                format!("{v} is not an rtnetlink protocol number: 5 to 255 (e.g. 200)"),
            ),
        }
    }
    out
}

/// Protocol numbers (iproute2's rt_protos) under which routing daemons install routes of their
/// own, which they take back or flush at start: never lbd's.
const ROUTING_DAEMON_PROTOCOLS: [(u8, &str); 11] = [
    (11, "zebra (Quagga, FRR)"),
    (12, "BIRD"),
    (16, "a DHCP client"),
    (18, "keepalived"),
    (42, "babeld"),
    (186, "FRR's bgpd"),
    (187, "FRR's isisd"),
    (188, "FRR's ospfd"),
    (189, "FRR's ripd"),
    (192, "FRR's eigrpd"),
    (99, "Open/R"),
];

/// Largest `daemon.new_flow_limit`: one new record a nanosecond is the program's own limit
/// (`Config::new_flow_interval_ns` counts whole nanoseconds).
const MAX_NEW_FLOW_LIMIT: u32 = 1_000_000_000;

/// Largest `daemon.idle_hold_s`: ten years, "for as long as the old backend lives".
const MAX_IDLE_HOLD_S: u64 = 10 * 366 * 86_400;

/// What is wrong with a Maglev table size for `backends` backends: `(true, why)` an error,
/// `(false, why)` a warning. The same rule for the file and for `lbctl service add`.
pub fn table_size_problem(table_size: u32, backends: usize) -> Option<(bool, String)> {
    if !is_prime(table_size) {
        Some((
            true,
            format!("{table_size} is not a prime (Maglev needs a prime table size, e.g. 65537)"),
        ))
    } else if table_size > MAX_TABLE_SIZE {
        Some((
            true,
            format!("{table_size} is larger than the maximum {MAX_TABLE_SIZE}"),
        ))
    } else if (table_size as usize) < backends {
        Some((
            true,
            format!("{table_size} is smaller than the number of backends ({backends})"),
        ))
    } else if (table_size as usize) < 100 * backends {
        Some((
            false,
            format!(
                "{table_size} is less than 100 × the {backends} backends: balance drifts past 1%"
            ),
        ))
    } else {
        None
    }
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Checks a service name: the same rule for the file and for `lbctl service add`.
pub fn name_problem(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
    (!ok).then(|| format!("{name:?} is not a valid name (1 to 64 of a-z, A-Z, 0-9, '-', '_', '.')"))
}

/// Why a backend may not serve a service of port `service_port` forwarded by `forwarding` on
/// `port`: the same rule for the file and for `lbctl backend add --port`.
pub fn port_problem(forwarding: Forwarding, service_port: u16, port: u16) -> Option<String> {
    match forwarding {
        Forwarding::Nat if port == 0 => Some(
            "0 is not a port a backend can serve on (leave port out to keep the service's)".into(),
        ),
        Forwarding::Nat => None,
        _ if port == service_port => None,
        Forwarding::Dsr | Forwarding::Tunnel => Some(format!(
            "{port} differs from the service's port {service_port}: with forwarding = \"{}\" the backend receives the packet as the client sent it, so it cannot be moved to another port (use forwarding = \"nat\")",
            if forwarding == Forwarding::Dsr {
                "dsr"
            } else {
                "tunnel"
            }
        )),
    }
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return None;
        }
        mac[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

fn check_services(c: &mut Checker, raw: Vec<Spanned<RawService>>) -> Vec<Service> {
    if raw.len() > MAX_SERVICES as usize {
        c.problems.push(Problem {
            line: None,
            key: "service".into(),
            message: format!(
                "{} services configured; the data path holds at most {MAX_SERVICES}",
                raw.len()
            ),
        });
    }
    let mut names = HashSet::new();
    let mut endpoints = HashMap::new();
    let mut services = vec![];
    let mut total_backends = 0usize;
    let mut total_prefixes = 0usize;
    for (i, s) in raw.into_iter().enumerate() {
        let s = s.into_inner();
        let key = |k: &str| format!("service[{i}].{k}");
        if let Some(msg) = name_problem(s.name.get_ref()) {
            c.error(&s.name, key("name"), msg);
        } else if !names.insert(s.name.get_ref().clone()) {
            c.error(
                &s.name,
                key("name"),
                format!("a service named {:?} is already defined", s.name.get_ref()),
            );
        }
        let vip = *s.vip.get_ref();
        let endpoint = (vip, *s.port.get_ref(), s.protocol);
        if let Some(other) = endpoints.insert(endpoint, s.name.get_ref().clone()) {
            c.error(
                &s.vip,
                key("vip"),
                format!(
                    "{vip} port {} {} is already used by service {other:?}",
                    s.port.get_ref(),
                    s.protocol
                ),
            );
        }
        let forwarding = s
            .forwarding
            .as_ref()
            .map(|f| *f.get_ref())
            .unwrap_or_default();
        let tunnel_source = s.tunnel_source.map(|t| {
            if forwarding != Forwarding::Tunnel {
                c.error(
                    &t,
                    key("tunnel_source"),
                    "is only meaningful with forwarding = \"tunnel\"",
                );
            }
            if t.get_ref().is_ipv4() != vip.is_ipv4() {
                c.error(
                    &t,
                    key("tunnel_source"),
                    format!("{} is not of the VIP's address family ({vip})", t.get_ref()),
                );
            }
            *t.get_ref()
        });
        let backends = check_backends(c, i, vip, (forwarding, *s.port.get_ref()), s.backend);
        total_backends += backends.len();
        let table_size = match &s.table_size {
            None => DEFAULT_TABLE_SIZE,
            Some(t) => *t.get_ref(),
        };
        if let Some(t) = &s.table_size {
            match table_size_problem(table_size, backends.len()) {
                Some((true, msg)) => c.error(t, key("table_size"), msg),
                Some((false, msg)) => c.warn(t, key("table_size"), msg),
                None => {}
            }
        }
        let health = super::health::check_health(
            c,
            &format!("service[{i}].health"),
            *s.port.get_ref(),
            s.health,
        );
        let allow = check_prefixes(c, i, "allow", vip, s.allow);
        let deny = check_prefixes(c, i, "deny", vip, s.deny);
        let denied: HashMap<Cidr, usize> = deny.iter().map(|(d, at)| (*d, at.start)).collect();
        for (a, at) in &allow {
            if let Some(&d_at) = denied.get(a) {
                let line = c.line(d_at);
                c.error_at(
                    at.clone(),
                    key("allow"),
                    format!(
                        "{a} is also in deny (line {line}); deny wins, so one of them is a mistake: remove it from one list"
                    ),
                );
            }
        }
        total_prefixes += allow.len() + deny.len();
        services.push(Service {
            name: s.name.into_inner(),
            vip,
            port: *s.port.get_ref(),
            protocol: s.protocol,
            forwarding,
            hash: s.hash,
            table_size,
            tunnel_source,
            health,
            backends,
            allow: allow.into_iter().map(|(p, _)| p).collect(),
            deny: deny.into_iter().map(|(p, _)| p).collect(),
        });
    }
    if total_prefixes > MAX_FILTER_PREFIXES as usize {
        c.problems.push(Problem {
            line: None,
            key: "service.allow, service.deny".into(),
            message: format!(
                "{total_prefixes} client filter prefixes configured over all services; the data path holds at most {MAX_FILTER_PREFIXES}"
            ),
        });
    }
    if total_backends > MAX_BACKENDS as usize {
        c.problems.push(Problem {
            line: None,
            key: "service.backend".into(),
            message: format!(
                "{total_backends} backends configured; the data path holds at most {MAX_BACKENDS}"
            ),
        });
    }
    services
}

/// A service's `allow` or `deny` list (`list`): each prefix with its place in the file. Bad
/// syntax, host bits set past the length, a prefix of the other family than the VIP's, or one
/// listed twice: each an error naming the entry. An empty list is no list (a warning says so).
fn check_prefixes(
    c: &mut Checker,
    service: usize,
    list: &str,
    vip: IpAddr,
    raw: Option<Spanned<Vec<Spanned<String>>>>,
) -> Vec<(Cidr, std::ops::Range<usize>)> {
    let Some(raw) = raw else {
        return vec![];
    };
    if raw.get_ref().is_empty() {
        let meaning = if list == "allow" {
            "allows every client"
        } else {
            "denies no client"
        };
        c.warn(
            &raw,
            format!("service[{service}].{list}"),
            format!("is empty: it {meaning}, as if it were absent"),
        );
    }
    let mut out: Vec<(Cidr, std::ops::Range<usize>)> = vec![];
    let mut first_at: HashMap<Cidr, usize> = HashMap::new();
    for (j, text) in raw.into_inner().into_iter().enumerate() {
        let key = format!("service[{service}].{list}[{j}]");
        let prefix = match text.get_ref().trim().parse::<Cidr>() {
            Ok(p) => p,
            Err(e) => {
                c.error(&text, key, e);
                continue;
            }
        };
        if prefix.addr.is_ipv4() != vip.is_ipv4() {
            c.error(
                &text,
                key,
                format!("{prefix} is not of the VIP's address family ({vip})"),
            );
        } else if let Some(&first) = first_at.get(&prefix) {
            let line = c.line(first);
            c.error(
                &text,
                key,
                format!("{prefix} is listed twice (first on line {line})"),
            );
        } else {
            first_at.insert(prefix, text.span().start);
            out.push((prefix, text.span()));
        }
    }
    out
}

fn check_backends(
    c: &mut Checker,
    service: usize,
    vip: IpAddr,
    (forwarding, service_port): (Forwarding, u16),
    raw: Vec<Spanned<RawBackend>>,
) -> Vec<Backend> {
    // A backend is its address and the port it serves on: only `nat` may give one address
    // several ports. Each identity's first line.
    let mut first_at: HashMap<(IpAddr, u16), usize> = HashMap::new();
    let mut backends = vec![];
    for (j, b) in raw.into_iter().enumerate() {
        let b = b.into_inner();
        let key = |k: &str| format!("service[{service}].backend[{j}].{k}");
        let address = *b.address.get_ref();
        let serves_on = b.port.as_ref().map_or(service_port, |p| *p.get_ref());
        if address.is_ipv4() != vip.is_ipv4() {
            c.error(
                &b.address,
                key("address"),
                format!("{address} is not of the VIP's address family ({vip})"),
            );
        } else if let Some(&first) = first_at.get(&(address, serves_on)) {
            let line = c.line(first);
            let message = if forwarding == Forwarding::Nat {
                format!(
                    "backend {address} on port {serves_on} is listed twice in this service (first on line {line}); one host may serve a nat service on several ports, each listed once with its `port`"
                )
            } else {
                format!("backend {address} is listed twice in this service (first on line {line})")
            };
            c.error(&b.address, key("address"), message);
        } else {
            first_at.insert((address, serves_on), b.address.span().start);
        }
        let weight = match &b.weight {
            None => DEFAULT_WEIGHT,
            Some(w) => {
                if *w.get_ref() > MAX_WEIGHT {
                    c.error(
                        w,
                        key("weight"),
                        format!("{} is larger than the maximum {MAX_WEIGHT}", w.get_ref()),
                    );
                }
                *w.get_ref()
            }
        };
        let mac = b.mac.and_then(|m| {
            if forwarding != Forwarding::Dsr {
                c.error(
                    &m,
                    key("mac"),
                    "is only meaningful with forwarding = \"dsr\"",
                );
            }
            match parse_mac(m.get_ref()) {
                Some(mac) => Some(mac),
                None => {
                    c.error(
                        &m,
                        key("mac"),
                        format!(
                            "{:?} is not a MAC address like \"02:00:00:00:0b:01\"",
                            m.get_ref()
                        ),
                    );
                    None
                }
            }
        });
        let port = b.port.map(|p| {
            if let Some(msg) = port_problem(forwarding, service_port, *p.get_ref()) {
                c.error(&p, key("port"), msg);
            }
            *p.get_ref()
        });
        backends.push(Backend {
            address,
            weight,
            mac,
            port,
        });
    }
    backends
}
