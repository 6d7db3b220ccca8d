//! `[service.health]`: every key of every check kind, validated with its line, and a key that
//! does not belong to the chosen kind refused. The same code validates the options of `lbctl
//! service add` ([`parse_health`]).

use super::checker::{Checker, key_at};
use super::*;

use CheckKind as K;

/// Every key of `[service.health]` with the kinds it belongs to (empty: every kind).
pub const HEALTH_KEYS: &[(&str, &[CheckKind])] = &[
    ("check", &[]),
    ("port", &[]),
    ("interval_ms", &[]),
    ("timeout_ms", &[]),
    ("rise", &[]),
    ("fall", &[]),
    ("path", &[K::Http, K::Https]),
    ("expect", &[K::Http, K::Https]),
    ("tls_verify", &[K::Https]),
    ("sni", &[K::Https]),
    ("ca_file", &[K::Https]),
    ("send", &[K::Udp]),
    ("send_hex", &[K::Udp]),
    ("expect_hex", &[K::Udp]),
    ("query_name", &[K::Dns]),
    ("query_type", &[K::Dns]),
    ("user", &[K::Pgsql, K::Exec]),
    ("database", &[K::Pgsql]),
    ("role", &[K::Pgsql, K::Redis]),
    ("password_file", &[K::Pgsql, K::Redis]),
    ("command", &[K::Exec]),
];

/// Default `user` of a `pgsql` check, and of an `exec` check.
pub const DEFAULT_PGSQL_USER: &str = "lb";
pub const DEFAULT_EXEC_USER: &str = "nobody";

/// Bytes as lower-case hex digits.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex digits (either case; spaces and ':' between bytes allowed) as bytes.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = s.bytes().filter(|b| !matches!(b, b' ' | b':')).collect();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

/// Validates the keys of a `[service.health]` table given as TOML text (without its header):
/// the options of `lbctl service add`, checked exactly as the file's. Problems are keyed
/// `health.KEY` and carry no line.
pub fn parse_health(table: &str, service_port: u16) -> Result<Health, Vec<Problem>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Wrapped {
        health: Spanned<RawHealth>,
    }
    let src = format!("[health]\n{table}");
    let unlined = |mut problems: Vec<Problem>| {
        for p in &mut problems {
            p.line = None;
        }
        problems
    };
    let raw: Wrapped = toml::from_str(&src).map_err(|e| {
        vec![Problem {
            line: None,
            key: e
                .span()
                .and_then(|s| key_at(&src, s.start))
                .unwrap_or_else(|| "health".into()),
            message: e.message().trim().to_string(),
        }]
    })?;
    let mut c = Checker::new(&src);
    let health = check_health(&mut c, "health", service_port, Some(raw.health));
    if c.problems.is_empty() {
        Ok(health)
    } else {
        Err(unlined(c.problems))
    }
}

/// The kinds a key belongs to, as `check = "a" or "b"`.
fn kinds_of(kinds: &[CheckKind]) -> String {
    let names: Vec<String> = kinds.iter().map(|k| format!("{:?}", k.name())).collect();
    format!("check = {}", names.join(" or "))
}

pub(super) fn check_health(
    c: &mut Checker,
    prefix: &str,
    service_port: u16,
    raw: Option<Spanned<RawHealth>>,
) -> Health {
    let Some(raw) = raw else {
        return Health {
            port: service_port,
            ..Health::default()
        };
    };
    let at = raw.span();
    let h = raw.into_inner();
    let key = |k: &str| format!("{prefix}.{k}");
    let kind = h.check;
    let d = Health::default();

    // Keys of other kinds.
    let given: [(&str, Option<std::ops::Range<usize>>); 15] = [
        ("path", h.path.as_ref().map(|v| v.span())),
        ("expect", h.expect.as_ref().map(|v| v.span())),
        ("tls_verify", h.tls_verify.as_ref().map(|v| v.span())),
        ("sni", h.sni.as_ref().map(|v| v.span())),
        ("ca_file", h.ca_file.as_ref().map(|v| v.span())),
        ("send", h.send.as_ref().map(|v| v.span())),
        ("send_hex", h.send_hex.as_ref().map(|v| v.span())),
        ("expect_hex", h.expect_hex.as_ref().map(|v| v.span())),
        ("query_name", h.query_name.as_ref().map(|v| v.span())),
        ("query_type", h.query_type.as_ref().map(|v| v.span())),
        ("user", h.user.as_ref().map(|v| v.span())),
        ("database", h.database.as_ref().map(|v| v.span())),
        ("role", h.role.as_ref().map(|v| v.span())),
        ("password_file", h.password_file.as_ref().map(|v| v.span())),
        ("command", h.command.as_ref().map(|v| v.span())),
    ];
    for (name, span) in given {
        let Some(span) = span else { continue };
        let kinds = HEALTH_KEYS
            .iter()
            .find(|(k, _)| *k == name)
            .map_or(&[][..], |(_, kinds)| *kinds);
        if !kinds.is_empty() && !kinds.contains(&kind) {
            c.error_at(
                span,
                key(name),
                format!(
                    "is not a key of check = {:?}: it belongs to {}",
                    kind.name(),
                    kinds_of(kinds)
                ),
            );
        }
    }
    let of_kind = |name: &str| {
        HEALTH_KEYS
            .iter()
            .any(|(k, kinds)| *k == name && kinds.contains(&kind))
    };

    let port = match &h.port {
        Some(p) => *p.get_ref(),
        None => service_port,
    };
    if port == 0 && kind != CheckKind::None {
        let line = Some(c.line(at.start));
        c.problems.push(Problem {
            line,
            key: key("port"),
            message: "is required when the service port is 0 (every port)".into(),
        });
    }
    let mut positive = |v: Option<Spanned<u64>>, k: &str, default: u64| match v {
        Some(v) => {
            if *v.get_ref() == 0 || *v.get_ref() > 3_600_000 {
                c.error(
                    &v,
                    key(k),
                    format!("{} is out of range: 1 to 3600000 ms", v.get_ref()),
                );
            }
            *v.get_ref()
        }
        None => default,
    };
    let interval_ms = positive(h.interval_ms, "interval_ms", d.interval_ms);
    let timeout_span = h.timeout_ms.as_ref().map(|t| t.span());
    let timeout_ms = positive(h.timeout_ms, "timeout_ms", d.timeout_ms);
    if timeout_ms > interval_ms {
        let line = Some(c.line(timeout_span.unwrap_or(at.clone()).start));
        c.problems.push(Problem {
            line,
            key: key("timeout_ms"),
            message: format!(
                "{timeout_ms} is longer than interval_ms ({interval_ms}); a check must end before the next"
            ),
        });
    }
    let mut count = |v: Option<Spanned<u32>>, k: &str, default: u32| match v {
        Some(v) => {
            if *v.get_ref() == 0 || *v.get_ref() > 1000 {
                c.error(
                    &v,
                    key(k),
                    format!("{} is out of range: 1 to 1000", v.get_ref()),
                );
            }
            *v.get_ref()
        }
        None => default,
    };
    let rise = count(h.rise, "rise", d.rise);
    let fall = count(h.fall, "fall", d.fall);

    let mut out = Health {
        check: kind,
        port,
        port_given: h.port.is_some(),
        interval_ms,
        timeout_ms,
        rise,
        fall,
        ..d
    };

    // http, https
    if let Some(p) = h.path.filter(|_| of_kind("path")) {
        if !p.get_ref().starts_with('/')
            || p.get_ref()
                .chars()
                .any(|ch| ch.is_ascii_control() || ch == ' ')
        {
            c.error(
                &p,
                key("path"),
                format!(
                    "{:?} must start with '/' and hold no space or control character",
                    p.get_ref()
                ),
            );
        }
        out.path = p.into_inner();
    }
    if let Some(e) = h.expect.filter(|_| of_kind("expect")) {
        if !(100..=599).contains(e.get_ref()) {
            c.error(
                &e,
                key("expect"),
                format!("{} is not an HTTP status (100 to 599)", e.get_ref()),
            );
        }
        out.expect = *e.get_ref();
    }
    // https
    if let Some(v) = h.tls_verify.as_ref().filter(|_| of_kind("tls_verify")) {
        out.tls_verify = *v.get_ref();
    }
    if let Some(s) = h.sni.filter(|_| of_kind("sni")) {
        match rustls::pki_types::ServerName::try_from(s.get_ref().as_str()) {
            Ok(rustls::pki_types::ServerName::DnsName(_)) => {}
            Ok(_) => c.error(
                &s,
                key("sni"),
                format!(
                    "{:?} is an IP address, which SNI cannot carry: give a DNS name, or leave `sni` out (no SNI is sent to an IP address)",
                    s.get_ref()
                ),
            ),
            Err(_) => c.error(
                &s,
                key("sni"),
                format!("{:?} is not a DNS name such as \"www.example.com\"", s.get_ref()),
            ),
        }
        out.sni = Some(s.into_inner());
    }
    if let Some(f) = h.ca_file.filter(|_| of_kind("ca_file")) {
        if !f.get_ref().is_absolute() {
            c.error(
                &f,
                key("ca_file"),
                format!("{} is not an absolute path", f.get_ref().display()),
            );
        }
        out.ca_file = Some(f.into_inner());
    }
    if kind == CheckKind::Https && out.ca_file.is_some() && !out.tls_verify {
        let span = h.tls_verify.as_ref().map_or(at.clone(), |v| v.span());
        c.error_at(
            span,
            key("ca_file"),
            "is only used with tls_verify = true (without it any certificate is accepted)",
        );
    }
    // udp
    if kind == CheckKind::Udp {
        match (h.send, h.send_hex) {
            (Some(_), Some(x)) => c.error(
                &x,
                key("send_hex"),
                "give either `send` (text) or `send_hex`, not both",
            ),
            (Some(t), None) => out.send = Payload::Text(t.into_inner()),
            (None, Some(x)) => match from_hex(x.get_ref()) {
                Some(bytes) if !bytes.is_empty() => out.send = Payload::Hex(bytes),
                _ => c.error(
                    &x,
                    key("send_hex"),
                    format!(
                        "{:?} is not an even number of hex digits, e.g. \"0d0a\"",
                        x.get_ref()
                    ),
                ),
            },
            (None, None) => c.error_at(
                at.clone(),
                key("send"),
                "required with check = \"udp\": the datagram to send, as `send = \"text\"` or `send_hex = \"…\"`",
            ),
        }
        if let Some(x) = h.expect_hex {
            match from_hex(x.get_ref()) {
                Some(bytes) if !bytes.is_empty() => out.expect_hex = Some(bytes),
                _ => c.error(
                    &x,
                    key("expect_hex"),
                    format!(
                        "{:?} is not an even number of hex digits, e.g. \"ff\"",
                        x.get_ref()
                    ),
                ),
            }
        }
    }
    // dns
    if kind == CheckKind::Dns {
        if let Some(n) = &h.query_name {
            let name = n.get_ref();
            if name.is_empty() || hickory_proto::rr::Name::from_ascii(name).is_err() {
                c.error(
                    n,
                    key("query_name"),
                    format!("{name:?} is not a domain name such as \"health.example.\""),
                );
            }
            out.query_name = name.clone();
            out.query_type = "A".into();
        }
        if let Some(t) = &h.query_type {
            let v = t.get_ref().to_ascii_uppercase();
            use std::str::FromStr as _;
            match hickory_proto::rr::RecordType::from_str(&v) {
                Ok(hickory_proto::rr::RecordType::Unknown(_)) | Err(_) => c.error(
                    t,
                    key("query_type"),
                    format!(
                        "{:?} is not a DNS record type such as \"A\", \"AAAA\", \"NS\", \"SOA\"",
                        t.get_ref()
                    ),
                ),
                Ok(_) => {}
            }
            out.query_type = v;
        }
    }
    // pgsql, exec
    if of_kind("user") {
        out.user = match kind {
            CheckKind::Pgsql => DEFAULT_PGSQL_USER.into(),
            _ => DEFAULT_EXEC_USER.into(),
        };
        if let Some(u) = h.user {
            let name = u.get_ref();
            let ok = match kind {
                CheckKind::Exec => {
                    !name.is_empty()
                        && name.len() <= 32
                        && !name.starts_with('-')
                        && name
                            .chars()
                            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
                }
                _ => !name.is_empty() && name.len() <= 63 && !name.contains('\0'),
            };
            if !ok {
                let rule = match kind {
                    CheckKind::Exec => {
                        "a user name of this host: 1 to 32 of a-z, A-Z, 0-9, '-', '_', '.'"
                    }
                    _ => "a PostgreSQL role name: 1 to 63 bytes",
                };
                c.error(&u, key("user"), format!("{name:?} is not {rule}"));
            }
            out.user = u.into_inner();
        }
    }
    if let Some(db) = h.database.filter(|_| of_kind("database")) {
        let name = db.get_ref();
        if name.is_empty() || name.len() > 63 || name.contains('\0') {
            c.error(
                &db,
                key("database"),
                format!("{name:?} is not a database name (1 to 63 bytes)"),
            );
        }
        out.database = db.into_inner();
    }
    // pgsql, redis
    if let Some(r) = h.role.as_ref().filter(|_| of_kind("role")) {
        let allowed: &[Role] = match kind {
            CheckKind::Pgsql => &[Role::Primary, Role::Replica],
            _ => &[Role::Master, Role::Replica],
        };
        if !allowed.contains(r.get_ref()) {
            c.error(
                r,
                key("role"),
                format!(
                    "{:?} is not a role of check = {:?}: {:?} or {:?}",
                    r.get_ref().name(),
                    kind.name(),
                    allowed[0].name(),
                    allowed[1].name()
                ),
            );
        }
        out.role = Some(*r.get_ref());
    }
    if let Some(f) = h.password_file.filter(|_| of_kind("password_file")) {
        if !f.get_ref().is_absolute() {
            c.error(
                &f,
                key("password_file"),
                format!("{} is not an absolute path", f.get_ref().display()),
            );
        }
        out.password_file = Some(f.into_inner());
    }
    if kind == CheckKind::Pgsql && out.role.is_some() && out.password_file.is_none() {
        let span = h.role.as_ref().map_or(at.clone(), |r| r.span());
        c.error_at(
            span,
            key("password_file"),
            "required with `role`: the check logs in to ask the server whether it is in recovery",
        );
    }
    // exec
    if kind == CheckKind::Exec {
        match h.command {
            None => c.error_at(
                at.clone(),
                key("command"),
                "required with check = \"exec\": the program and its arguments, e.g. [\"/usr/local/bin/check\", \"--fast\"]",
            ),
            Some(list) if list.get_ref().is_empty() => c.error(
                &list,
                key("command"),
                "is empty: give the program (an absolute path) and its arguments",
            ),
            Some(list) => {
                let first = &list.get_ref()[0];
                if !Path::new(first.get_ref()).is_absolute() {
                    c.error(
                        first,
                        key("command"),
                        format!(
                            "{:?} is not an absolute path: the program is run without a shell or PATH search",
                            first.get_ref()
                        ),
                    );
                }
                for arg in list.get_ref() {
                    if arg.get_ref().contains('\0') {
                        c.error(arg, key("command"), "an argument holds a NUL character");
                    }
                }
                out.command = list.into_inner().into_iter().map(|a| a.into_inner()).collect();
            }
        }
    }
    out
}
