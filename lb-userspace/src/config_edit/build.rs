//! Building new service and backend tables in the style (indentation, key column) of their
//! neighbours.

use super::*;

pub(super) fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub(super) fn int(v: impl Into<i64>) -> Value {
    Value::from(v.into())
}

pub(super) fn service_table(
    s: &Service,
    tpl: Option<&Table>,
    health_tpl: Option<&Table>,
    backend_tpl: Option<&Table>,
) -> Table {
    let mut pairs: Vec<(&str, Value)> = vec![
        ("name", Value::from(s.name.as_str())),
        ("vip", Value::from(s.vip.to_string())),
        ("port", int(s.port)),
        ("protocol", Value::from(s.protocol.to_string())),
    ];
    match s.forwarding {
        Forwarding::Dsr => {}
        Forwarding::Tunnel => pairs.push(("forwarding", Value::from("tunnel"))),
        Forwarding::Nat => pairs.push(("forwarding", Value::from("nat"))),
    }
    if s.hash != HashMode::default() {
        pairs.push(("hash", Value::from("5-tuple")));
    }
    if s.table_size != lb_common::DEFAULT_TABLE_SIZE {
        pairs.push(("table_size", int(s.table_size)));
    }
    if let Some(t) = s.tunnel_source {
        pairs.push(("tunnel_source", Value::from(t.to_string())));
    }
    for (list, prefixes) in [("allow", &s.allow), ("deny", &s.deny)] {
        if !prefixes.is_empty() {
            let a: Array = prefixes.iter().map(|p| p.to_string()).collect();
            pairs.push((list, Value::Array(a)));
        }
    }
    let mut table = styled_table(pairs, tpl);
    if s.health.check != CheckKind::None {
        let pairs = health_pairs(&s.health, s.port);
        table.insert("health", Item::Table(styled_table(pairs, health_tpl)));
    }
    if !s.backends.is_empty() {
        let mut a = ArrayOfTables::new();
        for b in &s.backends {
            a.push(backend_table(b, backend_tpl));
        }
        table.insert("backend", Item::ArrayOfTables(a));
    }
    table
}

/// The keys of a `[service.health]` table: `check`, and every key whose value differs from
/// its default for that kind (a `dns` check writes its question in full).
pub(super) fn health_pairs(h: &Health, service_port: u16) -> Vec<(&'static str, Value)> {
    let d = Health::default();
    let text = |s: &str| Value::from(s);
    let path = |p: &std::path::Path| Value::from(p.display().to_string());
    let mut pairs = vec![("check", text(h.check.name()))];
    if h.port != service_port || h.port_given {
        pairs.push(("port", int(h.port)));
    }
    if h.interval_ms != d.interval_ms {
        pairs.push(("interval_ms", int(h.interval_ms as i64)));
    }
    if h.timeout_ms != d.timeout_ms {
        pairs.push(("timeout_ms", int(h.timeout_ms as i64)));
    }
    if h.rise != d.rise {
        pairs.push(("rise", int(h.rise)));
    }
    if h.fall != d.fall {
        pairs.push(("fall", int(h.fall)));
    }
    match h.check {
        CheckKind::Http | CheckKind::Https => {
            if h.path != d.path {
                pairs.push(("path", text(&h.path)));
            }
            if h.expect != d.expect {
                pairs.push(("expect", int(h.expect)));
            }
            if h.check == CheckKind::Https {
                if h.tls_verify {
                    pairs.push(("tls_verify", Value::from(true)));
                }
                if let Some(sni) = &h.sni {
                    pairs.push(("sni", text(sni)));
                }
                if let Some(f) = &h.ca_file {
                    pairs.push(("ca_file", path(f)));
                }
            }
        }
        CheckKind::Udp => {
            match &h.send {
                Payload::Text(t) => pairs.push(("send", text(t))),
                Payload::Hex(b) => pairs.push(("send_hex", text(&config::to_hex(b)))),
            }
            if let Some(x) = &h.expect_hex {
                pairs.push(("expect_hex", text(&config::to_hex(x))));
            }
        }
        CheckKind::Dns => {
            if h.query_name != d.query_name || h.query_type != d.query_type {
                pairs.push(("query_name", text(&h.query_name)));
                pairs.push(("query_type", text(&h.query_type)));
            }
        }
        CheckKind::Pgsql | CheckKind::Redis => {
            if h.check == CheckKind::Pgsql {
                if h.user != config::DEFAULT_PGSQL_USER {
                    pairs.push(("user", text(&h.user)));
                }
                if h.database != d.database {
                    pairs.push(("database", text(&h.database)));
                }
            }
            if let Some(r) = h.role {
                pairs.push(("role", text(r.name())));
            }
            if let Some(f) = &h.password_file {
                pairs.push(("password_file", path(f)));
            }
        }
        CheckKind::Exec => {
            let mut a = Array::new();
            for arg in &h.command {
                a.push(arg.as_str());
            }
            pairs.push(("command", Value::Array(a)));
            if h.user != config::DEFAULT_EXEC_USER {
                pairs.push(("user", text(&h.user)));
            }
        }
        CheckKind::Tcp | CheckKind::None => {}
    }
    pairs
}

pub(super) fn backend_table(b: &Backend, tpl: Option<&Table>) -> Table {
    let mut pairs = vec![("address", Value::from(b.address.to_string()))];
    if b.weight != config::DEFAULT_WEIGHT {
        pairs.push(("weight", int(b.weight)));
    }
    if let Some(mac) = b.mac {
        pairs.push(("mac", Value::from(mac_string(mac))));
    }
    if let Some(port) = b.port {
        pairs.push(("port", int(port)));
    }
    styled_table(pairs, tpl)
}

/// How the keys of a table are laid out: indentation, the column of `=`, the space after it.
#[derive(Default)]
pub(super) struct Style {
    indent: String,
    /// Width of key plus padding when keys are aligned (`weight  = 100`).
    column: Option<usize>,
    value_prefix: Option<String>,
}

pub(super) fn is_blank(s: &str) -> bool {
    s.chars().all(|c| c == ' ' || c == '\t')
}

pub(super) fn raw(r: Option<&toml_edit::RawString>, default: &str) -> String {
    r.and_then(|r| r.as_str()).unwrap_or(default).to_owned()
}

pub(super) fn style_of(tpl: &Table) -> Style {
    let mut style = Style::default();
    let mut first = true;
    let mut widest = 0;
    let mut padded = false;
    for (k, item) in tpl.iter() {
        let (Some(key), Some(value)) = (tpl.key(k), item.as_value()) else {
            continue;
        };
        let prefix = raw(key.leaf_decor().prefix(), "");
        let suffix = raw(key.leaf_decor().suffix(), " ");
        if first {
            first = false;
            let last_line = prefix.rsplit('\n').next().unwrap_or("");
            if is_blank(last_line) {
                style.indent = last_line.to_owned();
            }
            let vp = raw(value.decor().prefix(), " ");
            if is_blank(&vp) && !vp.is_empty() {
                style.value_prefix = Some(vp);
            }
        }
        if is_blank(&suffix) {
            padded |= suffix.len() > 1;
            widest = widest.max(key.display_repr().len() + suffix.len());
        }
    }
    if padded {
        style.column = Some(widest);
    }
    style
}

pub(super) fn styled_key(name: &str, style: &Style) -> Key {
    let pad = style
        .column
        .map_or(1, |c| c.saturating_sub(name.len()).max(1));
    Key::new(name).with_leaf_decor(Decor::new(style.indent.clone(), " ".repeat(pad)))
}

pub(super) fn style_value(v: &mut Value, style: &Style) {
    if let Some(p) = &style.value_prefix {
        v.decor_mut().set_prefix(p.clone());
    }
}

pub(super) fn styled_table(pairs: Vec<(&str, Value)>, tpl: Option<&Table>) -> Table {
    let style = tpl.map(style_of).unwrap_or_default();
    let mut t = Table::new();
    // Indent the header as the template's is.
    if let Some(tpl) = tpl {
        let prefix = raw(tpl.decor().prefix(), "");
        let indent = prefix.rsplit('\n').next().unwrap_or("");
        if !indent.is_empty() && is_blank(indent) {
            t.decor_mut().set_prefix(format!("\n{indent}"));
        }
    }
    for (k, mut v) in pairs {
        style_value(&mut v, &style);
        t.insert_formatted(&styled_key(k, &style), Item::Value(v));
    }
    t
}
