//! Write-through of lbctl changes to the config file, keeping the operator's comments and layout.
//!
//! [`ConfigFile`] holds the file as a `toml_edit` document. Each edit changes only the tables and
//! keys it concerns:
//! - `set_weight` replaces the value and keeps what surrounds it (`weight = 50  # half` becomes
//!   `weight = 75  # half`); a backend without a `weight` key gets one, after `address`.
//! - Removing a service or backend removes its table (sub-tables included), with the comment lines
//!   directly above its header. A comment block separated from the header by a blank line is taken
//!   for a section comment and stays where it was.
//! - Added tables go after the last table of their kind and write only the required keys and the
//!   keys that differ from their defaults, in the order of SPEC.md. Their key column and
//!   indentation follow a neighbouring table of the same kind.
//!
//! Services are found by `name`, backends by `address` compared as IP addresses (so
//! "2001:db8::1" matches "2001:0db8::1"). Both the `[[service]]` / `[[service.backend]]` form and
//! arrays of inline tables (`backend = [{ address = "..." }, ...]`) are edited; any other shape
//! of `service` or `backend` is refused with [`EditError::Unsupported`].
//!
//! [`ConfigFile::save`] validates the result with [`config::parse`] and writes it atomically
//! (temporary file in the same directory with the original's mode and owner, fsync, rename,
//! fsync of the directory). It refuses to overwrite a file that changed on disk since it was read.

use std::{
    fs,
    io::{self, Write as _},
    net::IpAddr,
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use toml_edit::{
    Array, ArrayOfTables, Decor, DocumentMut, InlineTable, Item, Key, Table, TableLike, Value,
};

use crate::config::{self, Backend, CheckKind, Forwarding, HashMode, Health, Problem, Service};

/// Why an edit or a save was refused.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("config file {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("config file is not valid TOML: {0}")]
    Parse(String),
    #[error("no service named {0:?}")]
    NoSuchService(String),
    #[error("service {service:?} has no backend {address}")]
    NoSuchBackend { service: String, address: IpAddr },
    #[error("a service named {0:?} already exists")]
    ServiceExists(String),
    #[error("service {service:?} already has a backend {address}")]
    BackendExists { service: String, address: IpAddr },
    /// The edited text fails validation (line numbers refer to the edited text, not the file).
    #[error("the change would make the config invalid (nothing was written):\n{}",
        .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
    /// The file is laid out in a way these edits do not handle.
    #[error("cannot edit the config file: {0}")]
    Unsupported(String),
    /// The file on disk is no longer what was read: someone else changed it.
    #[error(
        "config file {} changed on disk since it was read; nothing was written (re-read it and retry)",
        .0.display()
    )]
    Conflict(PathBuf),
}

/// A config file being edited.
#[derive(Debug)]
pub struct ConfigFile {
    path: PathBuf,
    /// The text as read (or given to [`ConfigFile::from_text`]).
    text: String,
    doc: DocumentMut,
    /// What the file is expected to hold now: `text`, then what the last `save` wrote.
    on_disk: Mutex<String>,
}

impl ConfigFile {
    /// Reads `path` for editing. Only TOML syntax is checked here; [`ConfigFile::save`] validates.
    pub fn load(path: &Path) -> Result<Self, EditError> {
        let text = fs::read_to_string(path).map_err(|source| EditError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_text(path, &text)
    }

    /// Edits `text` as the content of `path` (which need not exist: `save` then creates it, mode
    /// 0600). `save` still refuses to overwrite a `path` whose content differs from `text`.
    pub fn from_text(path: &Path, text: &str) -> Result<Self, EditError> {
        let doc = text
            .parse::<DocumentMut>()
            .map_err(|e| EditError::Parse(format!("{}: {e}", path.display())))?;
        Ok(ConfigFile {
            path: path.to_owned(),
            text: text.to_owned(),
            doc,
            on_disk: Mutex::new(text.to_owned()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The text as read, before any edit.
    pub fn original_text(&self) -> &str {
        &self.text
    }

    /// The edited text.
    pub fn text(&self) -> String {
        self.doc.to_string()
    }

    /// Validates the edited text: the config it describes, or every problem.
    pub fn validate(&self) -> Result<config::Loaded, EditError> {
        config::parse(&self.text()).map_err(EditError::Invalid)
    }

    /// Appends a `[[service]]` table (with `[service.health]` when `check` is not `none`, and a
    /// `[[service.backend]]` per backend). Only the required keys and those that differ from the
    /// defaults are written.
    pub fn add_service(&mut self, s: &Service) -> Result<(), EditError> {
        if let Some(c) = collection(self.doc.as_table_mut(), "service")?
            && c.find(|t| is_service(t, &s.name)).is_some()
        {
            return Err(EditError::ServiceExists(s.name.clone()));
        }
        let service_tpl = last_service_table(&self.doc).cloned();
        let health_tpl = any_subtable(&self.doc, "health").cloned();
        let backend_tpl = any_subtable(&self.doc, "backend").cloned();
        let table = service_table(
            s,
            service_tpl.as_ref(),
            health_tpl.as_ref(),
            backend_tpl.as_ref(),
        );
        let root = self.doc.as_table_mut();
        match collection(&mut *root, "service")? {
            Some(Collection::Tables(a)) => a.push(table),
            Some(Collection::Inline(a)) => {
                array_push(a, Value::InlineTable(table.into_inline_table()))
            }
            None => {
                let mut a = ArrayOfTables::new();
                a.push(table);
                root.insert("service", Item::ArrayOfTables(a));
            }
        }
        Ok(())
    }

    /// Removes the service's table with its health and backend tables.
    pub fn remove_service(&mut self, name: &str) -> Result<(), EditError> {
        renumber(&mut self.doc);
        let root = self.doc.as_table_mut();
        let no_such = || EditError::NoSuchService(name.to_owned());
        let c = collection(&mut *root, "service")?.ok_or_else(no_such)?;
        let i = c.find(|t| is_service(t, name)).ok_or_else(no_such)?;
        let (removed, now_empty) = c.remove(i);
        if now_empty {
            root.remove("service");
        }
        if let Some(t) = removed {
            keep_detached_comments(&mut self.doc, &t);
        }
        Ok(())
    }

    /// Appends a `[[service.backend]]` table (`address`, `weight` unless 100, `mac` if set).
    pub fn add_backend(&mut self, service: &str, b: &Backend) -> Result<(), EditError> {
        let template = {
            let node = service_node(&mut self.doc, service)?;
            if let Some(c) = collection(node.into_like(), "backend")? {
                if c.find(|t| is_backend(t, b.address)).is_some() {
                    return Err(EditError::BackendExists {
                        service: service.to_owned(),
                        address: b.address,
                    });
                }
                if let Collection::Tables(a) = c {
                    a.iter().last().cloned()
                } else {
                    None
                }
            } else {
                None
            }
        };
        let template = template.or_else(|| any_subtable(&self.doc, "backend").cloned());
        let table = backend_table(b, template.as_ref());
        match service_node(&mut self.doc, service)? {
            Node::Table(t) => match collection(&mut *t, "backend")? {
                Some(Collection::Tables(a)) => a.push(table),
                Some(Collection::Inline(a)) => {
                    array_push(a, Value::InlineTable(table.into_inline_table()))
                }
                None => {
                    let mut a = ArrayOfTables::new();
                    a.push(table);
                    t.insert("backend", Item::ArrayOfTables(a));
                }
            },
            Node::Inline(t) => match collection(&mut *t, "backend")? {
                Some(Collection::Tables(_)) => unreachable!("an inline table holds only values"),
                Some(Collection::Inline(a)) => {
                    array_push(a, Value::InlineTable(table.into_inline_table()))
                }
                None => {
                    let mut a = Array::new();
                    a.push(Value::InlineTable(table.into_inline_table()));
                    inline_insert_after(t, &[], Key::new("backend"), Value::Array(a));
                }
            },
        }
        Ok(())
    }

    /// Removes the backend's table and the comment lines directly above it.
    pub fn remove_backend(&mut self, service: &str, address: IpAddr) -> Result<(), EditError> {
        renumber(&mut self.doc);
        let no_such = || EditError::NoSuchBackend {
            service: service.to_owned(),
            address,
        };
        let removed = {
            let mut node = service_node(&mut self.doc, service)?;
            let c = collection(node.like(), "backend")?.ok_or_else(no_such)?;
            let i = c.find(|t| is_backend(t, address)).ok_or_else(no_such)?;
            let (removed, now_empty) = c.remove(i);
            if now_empty {
                node.like().remove("backend");
            }
            removed
        };
        if let Some(t) = removed {
            keep_detached_comments(&mut self.doc, &t);
        }
        Ok(())
    }

    /// Sets a backend's weight, keeping what surrounds the value (alignment, trailing comment).
    /// A backend without a `weight` key gets one after its `address`.
    pub fn set_weight(
        &mut self,
        service: &str,
        address: IpAddr,
        weight: u32,
    ) -> Result<(), EditError> {
        let no_such = || EditError::NoSuchBackend {
            service: service.to_owned(),
            address,
        };
        let mut node = service_node(&mut self.doc, service)?;
        let c = collection(node.like(), "backend")?.ok_or_else(no_such)?;
        let i = c.find(|t| is_backend(t, address)).ok_or_else(no_such)?;
        let value = Value::from(i64::from(weight));
        match c.into_node(i) {
            Node::Table(t) => match t.get_mut("weight").and_then(Item::as_value_mut) {
                Some(v) => replace_keeping_decor(v, value),
                None => {
                    let key = styled_key("weight", &style_of(t));
                    let mut value = value;
                    style_value(&mut value, &style_of(t));
                    table_insert_after(t, &["address"], key, Item::Value(value));
                }
            },
            Node::Inline(t) => match t.get_mut("weight") {
                Some(v) => replace_keeping_decor(v, value),
                None => inline_insert_after(t, &["address"], Key::new("weight"), value),
            },
        }
        Ok(())
    }

    /// Validates the edited text with [`config::parse`] (an edit that would make the file invalid
    /// is refused with [`EditError::Invalid`] and nothing is written), then writes it atomically:
    /// a temporary file in the same directory with the original file's mode (and owner, when
    /// permitted), fsync, rename over the original, fsync of the directory. A symlinked path is
    /// followed, so the link stays a link. Refuses with [`EditError::Conflict`] when the file no
    /// longer holds what was read (or last saved). Writes nothing when the file already holds
    /// the edited text.
    pub fn save(&self) -> Result<(), EditError> {
        let text = self.text();
        self.validate()?;
        let mut on_disk = self.on_disk.lock().unwrap_or_else(|e| e.into_inner());
        write_atomically(&self.path, &text, &on_disk)?;
        *on_disk = text;
        Ok(())
    }
}

// ---- finding services and backends, whatever the layout ----

/// A `[[...]]` array of tables or an array of inline tables.
enum Collection<'a> {
    Tables(&'a mut ArrayOfTables),
    Inline(&'a mut Array),
}

/// A service or backend: a table or an inline table.
enum Node<'a> {
    Table(&'a mut Table),
    Inline(&'a mut InlineTable),
}

impl<'a> Node<'a> {
    fn like(&mut self) -> &mut dyn TableLike {
        match self {
            Node::Table(t) => &mut **t,
            Node::Inline(t) => &mut **t,
        }
    }
    fn into_like(self) -> &'a mut dyn TableLike {
        match self {
            Node::Table(t) => t,
            Node::Inline(t) => t,
        }
    }
}

impl<'a> Collection<'a> {
    /// Removes entry `i`. Returns the removed `[[...]]` table, whose detached comments the
    /// caller keeps, and whether that emptied an array of tables, whose key should then go.
    fn remove(self, i: usize) -> (Option<Table>, bool) {
        match self {
            Collection::Tables(a) => {
                let t = a.remove(i);
                (Some(t), a.is_empty())
            }
            Collection::Inline(a) => {
                array_remove(a, i);
                (None, false)
            }
        }
    }
    fn find(&self, pred: impl Fn(&dyn TableLike) -> bool) -> Option<usize> {
        match self {
            Collection::Tables(a) => a.iter().position(|t| pred(t)),
            Collection::Inline(a) => a
                .iter()
                .position(|v| v.as_inline_table().is_some_and(|t| pred(t))),
        }
    }
    fn into_node(self, i: usize) -> Node<'a> {
        match self {
            Collection::Tables(a) => Node::Table(a.get_mut(i).expect("index from find")),
            Collection::Inline(a) => Node::Inline(
                a.get_mut(i)
                    .and_then(Value::as_inline_table_mut)
                    .expect("index from find"),
            ),
        }
    }
}

fn collection<'a>(
    parent: &'a mut dyn TableLike,
    key: &str,
) -> Result<Option<Collection<'a>>, EditError> {
    match parent.get_mut(key) {
        None | Some(Item::None) => Ok(None),
        Some(Item::ArrayOfTables(a)) => Ok(Some(Collection::Tables(a))),
        Some(Item::Value(Value::Array(a))) if a.iter().all(Value::is_inline_table) => {
            Ok(Some(Collection::Inline(a)))
        }
        Some(_) => Err(EditError::Unsupported(format!(
            "`{key}` is neither [[{key}]] tables nor an array of inline tables; \
             write each {key} as a [[...{key}]] table"
        ))),
    }
}

fn is_service(t: &dyn TableLike, name: &str) -> bool {
    t.get("name").and_then(Item::as_str) == Some(name)
}

fn is_backend(t: &dyn TableLike, address: IpAddr) -> bool {
    t.get("address")
        .and_then(Item::as_str)
        .and_then(|a| a.trim().parse::<IpAddr>().ok())
        == Some(address)
}

fn service_node<'a>(doc: &'a mut DocumentMut, name: &str) -> Result<Node<'a>, EditError> {
    let no_such = || EditError::NoSuchService(name.to_owned());
    let c = collection(doc.as_table_mut(), "service")?.ok_or_else(no_such)?;
    let i = c.find(|t| is_service(t, name)).ok_or_else(no_such)?;
    Ok(c.into_node(i))
}

fn service_tables(doc: &DocumentMut) -> impl Iterator<Item = &Table> {
    doc.as_table()
        .get("service")
        .and_then(Item::as_array_of_tables)
        .into_iter()
        .flat_map(|a| a.iter())
}

fn last_service_table(doc: &DocumentMut) -> Option<&Table> {
    service_tables(doc).last()
}

/// The last `health` table or `[[backend]]` table found in any service: a style template.
fn any_subtable<'d>(doc: &'d DocumentMut, key: &str) -> Option<&'d Table> {
    service_tables(doc)
        .filter_map(|s| match s.get(key)? {
            Item::Table(t) => Some(t),
            Item::ArrayOfTables(a) => a.iter().last(),
            _ => None,
        })
        .last()
}

// ---- building new tables ----

fn check_name(c: CheckKind) -> &'static str {
    match c {
        CheckKind::Tcp => "tcp",
        CheckKind::Http => "http",
        CheckKind::None => "none",
    }
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn int(v: impl Into<i64>) -> Value {
    Value::from(v.into())
}

fn service_table(
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
    if s.forwarding != Forwarding::default() {
        pairs.push(("forwarding", Value::from("tunnel")));
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
    let mut table = styled_table(pairs, tpl);
    if s.health.check != CheckKind::None {
        let h = &s.health;
        let d = Health::default();
        let mut pairs = vec![("check", Value::from(check_name(h.check)))];
        if h.port != s.port {
            pairs.push(("port", int(h.port)));
        }
        if h.path != d.path {
            pairs.push(("path", Value::from(h.path.as_str())));
        }
        if h.expect != d.expect {
            pairs.push(("expect", int(h.expect)));
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

fn backend_table(b: &Backend, tpl: Option<&Table>) -> Table {
    let mut pairs = vec![("address", Value::from(b.address.to_string()))];
    if b.weight != config::DEFAULT_WEIGHT {
        pairs.push(("weight", int(b.weight)));
    }
    if let Some(mac) = b.mac {
        pairs.push(("mac", Value::from(mac_string(mac))));
    }
    styled_table(pairs, tpl)
}

/// How the keys of a table are laid out: indentation, the column of `=`, the space after it.
#[derive(Default)]
struct Style {
    indent: String,
    /// Width of key plus padding when keys are aligned (`weight  = 100`).
    column: Option<usize>,
    value_prefix: Option<String>,
}

fn is_blank(s: &str) -> bool {
    s.chars().all(|c| c == ' ' || c == '\t')
}

fn raw(r: Option<&toml_edit::RawString>, default: &str) -> String {
    r.and_then(|r| r.as_str()).unwrap_or(default).to_owned()
}

fn style_of(tpl: &Table) -> Style {
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

fn styled_key(name: &str, style: &Style) -> Key {
    let pad = style
        .column
        .map_or(1, |c| c.saturating_sub(name.len()).max(1));
    Key::new(name).with_leaf_decor(Decor::new(style.indent.clone(), " ".repeat(pad)))
}

fn style_value(v: &mut Value, style: &Style) {
    if let Some(p) = &style.value_prefix {
        v.decor_mut().set_prefix(p.clone());
    }
}

fn styled_table(pairs: Vec<(&str, Value)>, tpl: Option<&Table>) -> Table {
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

// ---- changing keys in place ----

/// Replaces a value, keeping its surroundings; a comment after it stays in its column (as far
/// as a space before it remains).
fn replace_keeping_decor(v: &mut Value, new: Value) {
    let width = |v: &Value| {
        let mut bare = v.clone();
        bare.decor_mut().clear();
        bare.to_string().len()
    };
    let old_width = width(v);
    let mut decor = v.decor().clone();
    *v = new;
    let new_width = width(v);
    if let Some(suffix) = decor.suffix().and_then(|s| s.as_str()) {
        let comment = suffix.trim_start_matches([' ', '\t']);
        let gap = suffix.len() - comment.len();
        if comment.starts_with('#') && gap > 0 && suffix[..gap].chars().all(|c| c == ' ') {
            let gap = (gap + old_width).saturating_sub(new_width).max(1);
            decor.set_suffix(format!("{}{comment}", " ".repeat(gap)));
        }
    }
    *v.decor_mut() = decor;
}

/// Inserts `key` right after the last of `after` present in `t` (at the end when none is).
fn table_insert_after(t: &mut Table, after: &[&str], key: Key, item: Item) {
    let keys: Vec<String> = t.iter().map(|(k, _)| k.to_owned()).collect();
    let at = keys
        .iter()
        .rposition(|k| after.contains(&k.as_str()))
        .map_or(keys.len(), |i| i + 1);
    let tail: Vec<(Key, Item)> = keys[at..]
        .iter()
        .filter_map(|k| t.remove_entry(k))
        .collect();
    t.insert_formatted(&key, item);
    for (k, item) in tail {
        t.insert_formatted(&k, item);
    }
}

fn inline_insert_after(t: &mut InlineTable, after: &[&str], key: Key, mut value: Value) {
    let keys: Vec<String> = t.iter().map(|(k, _)| k.to_owned()).collect();
    let at = keys
        .iter()
        .rposition(|k| after.contains(&k.as_str()))
        .map_or(keys.len(), |i| i + 1);
    if at == keys.len() {
        // The old last value's suffix (the space before `}`) moves to the new last value.
        if let Some(last) = keys.last().and_then(|k| t.get_mut(k)) {
            let suffix = raw(last.decor().suffix(), "");
            if is_blank(&suffix) && !suffix.is_empty() {
                last.decor_mut().set_suffix("");
                value.decor_mut().set_suffix(suffix);
            }
        }
    }
    let tail: Vec<(Key, Value)> = keys[at..]
        .iter()
        .filter_map(|k| t.remove_entry(k))
        .collect();
    t.insert_formatted(&key, value);
    for (k, v) in tail {
        t.insert_formatted(&k, v);
    }
}

// ---- arrays of inline tables ----

/// Splits the text before an array element into the comment that ends the previous element's
/// line (it belongs to that element) and the rest (comment lines above this element, indent).
fn split_head(s: &str) -> (&str, &str) {
    match s.find('\n') {
        Some(nl) if s[..nl].contains('#') => s.split_at(nl + 1),
        _ => ("", s),
    }
}

fn array_remove(a: &mut Array, i: usize) {
    let removed = a.remove(i);
    let p_i = raw(removed.decor().prefix(), if i == 0 { "" } else { " " });
    let (head_i, body_i) = split_head(&p_i);
    if i < a.len() {
        let next = a.get_mut(i).expect("checked");
        let p_n = raw(next.decor().prefix(), " ");
        let (_, body_n) = split_head(&p_n);
        let mut prefix = format!("{head_i}{body_n}");
        if i == 0 && !prefix.contains('\n') {
            prefix = if body_i.contains('#') {
                String::new()
            } else {
                body_i.to_owned()
            };
        }
        next.decor_mut().set_prefix(prefix);
    } else {
        let t = raw(Some(a.trailing()), "");
        let (_, body_t) = split_head(&t);
        a.set_trailing(format!("{head_i}{body_t}"));
    }
}

fn array_push(a: &mut Array, mut v: Value) {
    if let Some(last) = a.iter().last() {
        let last_prefix = raw(last.decor().prefix(), "");
        let t = raw(Some(a.trailing()), "");
        let (head_t, body_t) = split_head(&t);
        let prefix = if last_prefix.contains('\n') {
            let indent = last_prefix.rsplit('\n').next().unwrap_or("");
            if head_t.is_empty() {
                format!("\n{indent}")
            } else {
                format!("{head_t}{indent}")
            }
        } else {
            format!("{head_t} ")
        };
        v.decor_mut().set_prefix(prefix);
        // The newline that ended the old last element's comment now ends the new element.
        a.set_trailing(if head_t.is_empty() {
            body_t.to_owned()
        } else {
            format!("\n{body_t}")
        });
        // A suffix of spaces only (the space before `]`) moves to the new last element.
        let n = a.len();
        let last = a.get_mut(n - 1).expect("not empty");
        let suffix = raw(last.decor().suffix(), "");
        if is_blank(&suffix) && !suffix.is_empty() {
            last.decor_mut().set_suffix("");
            v.decor_mut().set_suffix(suffix);
        }
    }
    a.push_formatted(v);
}

// ---- table order and comments of removed tables ----

type Loc = Vec<(String, Option<usize>)>;

/// Every non-root table, in the order the document renders them (as toml_edit does it).
fn table_order(doc: &DocumentMut) -> Vec<(isize, Loc)> {
    fn visit(t: &Table, loc: &mut Loc, last: &mut isize, out: &mut Vec<(isize, Loc)>) {
        if !t.is_dotted() {
            if let Some(p) = t.position() {
                *last = p;
            }
            if !loc.is_empty() {
                out.push((*last, loc.clone()));
            }
        }
        for (k, item) in t.iter() {
            match item {
                Item::Table(sub) => {
                    loc.push((k.to_owned(), None));
                    visit(sub, loc, last, out);
                    loc.pop();
                }
                Item::ArrayOfTables(a) => {
                    for (i, sub) in a.iter().enumerate() {
                        loc.push((k.to_owned(), Some(i)));
                        visit(sub, loc, last, out);
                        loc.pop();
                    }
                }
                _ => {}
            }
        }
    }
    let mut out = vec![];
    visit(doc.as_table(), &mut vec![], &mut 0, &mut out);
    out.sort_by_key(|(pos, _)| *pos);
    out
}

fn table_at<'a>(doc: &'a mut DocumentMut, loc: &Loc) -> Option<&'a mut Table> {
    let mut t = doc.as_table_mut();
    for (k, index) in loc {
        t = match (t.get_mut(k)?, index) {
            (Item::Table(sub), None) => sub,
            (Item::ArrayOfTables(a), Some(i)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(t)
}

/// Gives every table a distinct position in its current rendering order (the rendering is
/// unchanged), so the table that follows a removed one can be found.
fn renumber(doc: &mut DocumentMut) {
    for (n, (_, loc)) in table_order(doc).into_iter().enumerate() {
        if let Some(t) = table_at(doc, &loc) {
            t.set_position(Some(n as isize + 1));
        }
    }
}

/// The part of a table's leading text that is not its own: everything up to and including the
/// last blank line (the comment lines directly above the header belong to the table).
fn detached_part(prefix: &str) -> &str {
    let mut end = 0;
    let mut at = 0;
    for line in prefix.split_inclusive('\n') {
        at += line.len();
        if line.ends_with('\n') && line.trim().is_empty() {
            end = at;
        }
    }
    &prefix[..end]
}

fn strip_leading_blank_lines(s: &str) -> &str {
    let mut rest = s;
    while let Some(nl) = rest.find('\n') {
        if rest[..nl].trim().is_empty() {
            rest = &rest[nl + 1..];
        } else {
            break;
        }
    }
    rest
}

/// After `removed` (a table of `doc`, renumbered before) was taken out: a comment block above it
/// that was separated from it by a blank line moves to the table that now follows, or to the end.
fn keep_detached_comments(doc: &mut DocumentMut, removed: &Table) {
    let prefix = raw(removed.decor().prefix(), "");
    let keep = detached_part(&prefix);
    if !keep.contains('#') {
        return;
    }
    let next = removed.position().and_then(|p| {
        table_order(doc)
            .into_iter()
            .find(|(q, _)| *q > p)
            .map(|(_, loc)| loc)
    });
    match next.and_then(|loc| table_at(doc, &loc)) {
        Some(t) => {
            let p = raw(t.decor().prefix(), "\n");
            let p = format!("{keep}{}", strip_leading_blank_lines(&p));
            t.decor_mut().set_prefix(p);
        }
        None => {
            let trailing = raw(Some(doc.trailing()), "");
            doc.set_trailing(format!("{keep}{}", strip_leading_blank_lines(&trailing)));
        }
    }
}

// ---- writing ----

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn write_atomically(path: &Path, text: &str, expected: &str) -> Result<(), EditError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| EditError::Io { path, source }
    };
    // Follow a symlink so the link itself stays in place.
    let target = match fs::canonicalize(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => path.to_owned(),
        Err(e) => return Err(io_err(path)(e)),
    };
    let meta = match fs::metadata(&target) {
        Ok(meta) => {
            let current = fs::read(&target).map_err(io_err(&target))?;
            if current == text.as_bytes() {
                return Ok(());
            }
            if current != expected.as_bytes() {
                return Err(EditError::Conflict(path.to_owned()));
            }
            Some(meta)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(&target)(e)),
    };
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config".into());
    let tmp = dir.join(format!(
        ".{file_name}.{}.{}.tmp",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mode = meta.as_ref().map_or(0o600, |m| m.mode() & 0o7777);
    let result = (|| -> io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        if let Some(m) = &meta {
            // Keep the owner where permitted (lbd runs as root; a non-root caller cannot).
            match std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid())) {
                Err(e) if e.kind() != io::ErrorKind::PermissionDenied => return Err(e),
                _ => {}
            }
        }
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &target)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&target)(e));
    }
    // Make the rename itself durable.
    fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(&dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;

    const ORIGINAL: &str = r#"# lb configuration for the edge pair.
# Managed by hand and by lbctl.

[daemon]
interfaces  = ["eth0"]                # uplink
xdp_mode    = "auto"
bpffs_dir   = "/sys/fs/bpf/lbtest"    # test pin dir

# ---------------------------------------------------------------
# Services
# ---------------------------------------------------------------

# The public web front.
[[service]]
vip      = "203.0.113.10"   # anycast VIP
name     = "web"
protocol = "tcp"
port     = 80

# HTTP check against the app's health endpoint.
[service.health]
path  = "/healthz"    # served by every app node
check = "http"

# rack A
[[service.backend]]
address = "192.0.2.11"  # web-a1
weight  = 50  # half

# rack B
[[service.backend]]
weight = 100
address = "192.0.2.12"  # web-b1

[[service.backend]]
address = "192.0.2.13"
mac = "02:00:00:00:0b:03"   # static neighbour

# DNS over UDP, IPv6 only.
[[service]]
name = "dns"
vip = "2001:db8::53"
port = 53
protocol = "udp"

[[service.backend]]
address = "2001:0db8::1"   # ns1

[[service.backend]]
address = "2001:db8::2"    # ns2

# end of file
"#;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn file(text: &str) -> ConfigFile {
        ConfigFile::from_text(Path::new("/nonexistent/lb.toml"), text).unwrap()
    }

    /// (service, [(address, weight)]) as the edited text parses.
    fn summary(text: &str) -> Vec<(String, Vec<(IpAddr, u32)>)> {
        let c = config::parse(text)
            .unwrap_or_else(|p| panic!("edited text is invalid: {p:?}\n{text}"))
            .config;
        c.services
            .into_iter()
            .map(|s| {
                let b = s.backends.iter().map(|b| (b.address, b.weight)).collect();
                (s.name, b)
            })
            .collect()
    }

    fn comments(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.find('#').map(|i| l[i..].to_owned()))
            .collect()
    }

    /// Every comment of the original except `gone` is still in `text`, verbatim and in order.
    fn assert_comments_kept(text: &str, gone: &[&str]) {
        let now = comments(text);
        let expected: Vec<String> = comments(ORIGINAL)
            .into_iter()
            .filter(|c| !gone.iter().any(|g| c.contains(g)))
            .collect();
        assert_eq!(now, expected, "comments changed:\n{text}");
    }

    fn web(weights: &[(&str, u32)]) -> (String, Vec<(IpAddr, u32)>) {
        (
            "web".into(),
            weights.iter().map(|(a, w)| (ip(a), *w)).collect(),
        )
    }

    fn dns(weights: &[(&str, u32)]) -> (String, Vec<(IpAddr, u32)>) {
        (
            "dns".into(),
            weights.iter().map(|(a, w)| (ip(a), *w)).collect(),
        )
    }

    #[test]
    fn untouched_file_renders_verbatim() {
        assert_eq!(file(ORIGINAL).text(), ORIGINAL);
        summary(ORIGINAL);
    }

    #[test]
    fn set_weight_keeps_the_trailing_comment_and_alignment() {
        let mut f = file(ORIGINAL);
        f.set_weight("web", ip("192.0.2.11"), 75).unwrap();
        let text = f.text();
        assert_eq!(
            text,
            ORIGINAL.replace("weight  = 50  # half", "weight  = 75  # half")
        );
        assert_eq!(
            summary(&text),
            vec![
                web(&[("192.0.2.11", 75), ("192.0.2.12", 100), ("192.0.2.13", 100)]),
                dns(&[("2001:db8::1", 100), ("2001:db8::2", 100)])
            ]
        );
    }

    #[test]
    fn set_weight_keeps_the_comment_column() {
        let src = ORIGINAL.replace("weight  = 50  # half", "weight  = 50       # half");
        let mut f = file(&src);
        f.set_weight("web", ip("192.0.2.11"), 5).unwrap();
        assert!(
            f.text().contains("weight  = 5        # half\n"),
            "{}",
            f.text()
        );
        f.set_weight("web", ip("192.0.2.11"), 123_456).unwrap();
        assert!(
            f.text().contains("weight  = 123456   # half\n"),
            "{}",
            f.text()
        );
        f.set_weight("web", ip("192.0.2.11"), 12_345_678).unwrap();
        assert!(
            f.text().contains("weight  = 12345678 # half\n"),
            "{}",
            f.text()
        );
        // No space left: one stays.
        f.set_weight("web", ip("192.0.2.11"), 1_234_567_890)
            .unwrap();
        assert!(
            f.text().contains("weight  = 1234567890 # half\n"),
            "{}",
            f.text()
        );
    }

    #[test]
    fn new_tables_follow_an_indented_aligned_layout() {
        let src = "[daemon]\ninterfaces = [\"eth0\"]\n\n[[service]]\nname = \"web\"\n\
                   vip = \"203.0.113.10\"\nport = 80\nprotocol = \"tcp\"\n\n  [[service.backend]]\n  \
                   address = \"192.0.2.11\"\n  weight  = 100   # share\n";
        let mut f = file(src);
        f.add_backend(
            "web",
            &Backend {
                address: ip("192.0.2.12"),
                weight: 30,
                mac: None,
            },
        )
        .unwrap();
        assert_eq!(
            f.text(),
            format!("{src}\n  [[service.backend]]\n  address = \"192.0.2.12\"\n  weight  = 30\n")
        );
    }

    #[test]
    fn set_weight_adds_a_key_after_the_address() {
        let mut f = file(ORIGINAL);
        f.set_weight("web", ip("192.0.2.13"), 0).unwrap();
        // Matched as an address: the file spells it 2001:0db8::1.
        f.set_weight("dns", ip("2001:db8::1"), 20).unwrap();
        let text = f.text();
        let expected = ORIGINAL
            .replace(
                "address = \"192.0.2.13\"\nmac",
                "address = \"192.0.2.13\"\nweight = 0\nmac",
            )
            .replace(
                "address = \"2001:0db8::1\"   # ns1\n",
                "address = \"2001:0db8::1\"   # ns1\nweight = 20\n",
            );
        assert_eq!(text, expected);
        let c = config::parse(&text).unwrap().config;
        assert_eq!(c.services[0].backends[2].weight, 0);
        assert_eq!(c.services[0].backends[2].mac, Some([2, 0, 0, 0, 0x0b, 3]));
        assert_eq!(
            summary(&text),
            vec![
                web(&[("192.0.2.11", 50), ("192.0.2.12", 100), ("192.0.2.13", 0)]),
                dns(&[("2001:db8::1", 20), ("2001:db8::2", 100)])
            ]
        );
        assert_comments_kept(&text, &[]);
    }

    #[test]
    fn set_weight_follows_an_aligned_layout() {
        let src = ORIGINAL.replace(
            "address = \"192.0.2.13\"\nmac = ",
            "address   = \"192.0.2.13\"\nmac       = ",
        );
        let mut f = file(&src);
        f.set_weight("web", ip("192.0.2.13"), 7).unwrap();
        assert!(
            f.text()
                .contains("address   = \"192.0.2.13\"\nweight    = 7\nmac       = "),
            "{}",
            f.text()
        );
    }

    #[test]
    fn remove_backend_takes_its_table_and_leading_comments_only() {
        let mut f = file(ORIGINAL);
        f.remove_backend("web", ip("192.0.2.12")).unwrap();
        let text = f.text();
        let removed =
            "\n# rack B\n[[service.backend]]\nweight = 100\naddress = \"192.0.2.12\"  # web-b1\n";
        assert!(ORIGINAL.contains(removed));
        assert_eq!(text, ORIGINAL.replacen(removed, "", 1));
        assert_eq!(
            summary(&text),
            vec![
                web(&[("192.0.2.11", 50), ("192.0.2.13", 100)]),
                dns(&[("2001:db8::1", 100), ("2001:db8::2", 100)])
            ]
        );
        assert_comments_kept(&text, &["rack B", "web-b1"]);

        f.remove_backend("dns", ip("2001:db8::2")).unwrap();
        let text = f.text();
        assert_eq!(
            text,
            ORIGINAL.replacen(removed, "", 1).replacen(
                "\n[[service.backend]]\naddress = \"2001:db8::2\"    # ns2\n",
                "",
                1
            )
        );
        assert_comments_kept(&text, &["rack B", "web-b1", "ns2"]);
    }

    #[test]
    fn removing_every_backend_leaves_a_valid_service() {
        let mut f = file(ORIGINAL);
        f.remove_backend("dns", ip("2001:db8::1")).unwrap();
        f.remove_backend("dns", ip("2001:db8::2")).unwrap();
        let text = f.text();
        assert_eq!(summary(&text)[1], dns(&[]));
        assert!(
            text.ends_with("protocol = \"udp\"\n\n# end of file\n"),
            "{text}"
        );
        // And one can be added back.
        f.add_backend(
            "dns",
            &Backend {
                address: ip("2001:db8::9"),
                weight: 100,
                mac: None,
            },
        )
        .unwrap();
        assert_eq!(summary(&f.text())[1], dns(&[("2001:db8::9", 100)]));
    }

    #[test]
    fn remove_service_keeps_the_section_comment_above_it() {
        let mut f = file(ORIGINAL);
        f.remove_service("web").unwrap();
        let text = f.text();
        let start = ORIGINAL.find("# The public web front.").unwrap();
        let end = ORIGINAL.find("# DNS over UDP").unwrap();
        let expected = format!("{}{}", &ORIGINAL[..start], &ORIGINAL[end..]);
        assert_eq!(text, expected);
        assert_eq!(
            summary(&text),
            vec![dns(&[("2001:db8::1", 100), ("2001:db8::2", 100)])]
        );
        assert_comments_kept(
            &text,
            &[
                "public web",
                "anycast",
                "half",
                "HTTP check",
                "served by",
                "rack",
                "web-",
                "static",
            ],
        );
    }

    #[test]
    fn remove_last_service() {
        let mut f = file(ORIGINAL);
        f.remove_service("dns").unwrap();
        let text = f.text();
        let start = ORIGINAL.find("\n# DNS over UDP").unwrap();
        let end = ORIGINAL.find("\n# end of file").unwrap();
        let expected = format!("{}{}", &ORIGINAL[..start], &ORIGINAL[end..]);
        assert_eq!(text, expected);
        f.remove_service("web").unwrap();
        let text = f.text();
        assert!(summary(&text).is_empty());
        assert!(text.contains("# Services"), "{text}");
        assert!(text.ends_with("# end of file\n"), "{text}");
    }

    #[test]
    fn a_blank_line_separates_a_section_comment_from_a_backend() {
        let src = ORIGINAL.replace("# rack B\n", "# ---- rack B ----\n\n");
        let mut f = file(&src);
        f.remove_backend("web", ip("192.0.2.12")).unwrap();
        let text = f.text();
        assert!(!text.contains("192.0.2.12"));
        assert!(
            text.contains(
                "# half\n\n# ---- rack B ----\n\n[[service.backend]]\naddress = \"192.0.2.13\""
            ),
            "{text}"
        );
        // The last table: the section comment stays at the end.
        let src = ORIGINAL.replace(
            "\n[[service.backend]]\naddress = \"2001:db8::2\"",
            "\n# spare\n\n[[service.backend]]\naddress = \"2001:db8::2\"",
        );
        let mut f = file(&src);
        f.remove_backend("dns", ip("2001:db8::2")).unwrap();
        assert!(
            f.text().ends_with("# ns1\n\n# spare\n\n# end of file\n"),
            "{}",
            f.text()
        );
    }

    #[test]
    fn add_backend_appends_after_the_services_last_backend() {
        let mut f = file(ORIGINAL);
        f.add_backend(
            "web",
            &Backend {
                address: ip("192.0.2.14"),
                weight: 100,
                mac: None,
            },
        )
        .unwrap();
        f.add_backend(
            "web",
            &Backend {
                address: ip("192.0.2.15"),
                weight: 30,
                mac: Some([2, 0, 0, 0, 0x0b, 0x0f]),
            },
        )
        .unwrap();
        let text = f.text();
        let expected = ORIGINAL.replace(
            "# static neighbour\n",
            "# static neighbour\n\n[[service.backend]]\naddress = \"192.0.2.14\"\n\n\
             [[service.backend]]\naddress = \"192.0.2.15\"\nweight = 30\nmac = \"02:00:00:00:0b:0f\"\n",
        );
        assert_eq!(text, expected);
        assert_eq!(
            summary(&text)[0],
            web(&[
                ("192.0.2.11", 50),
                ("192.0.2.12", 100),
                ("192.0.2.13", 100),
                ("192.0.2.14", 100),
                ("192.0.2.15", 30)
            ])
        );
        let c = config::parse(&text).unwrap().config;
        assert_eq!(
            c.services[0].backends[4].mac,
            Some([2, 0, 0, 0, 0x0b, 0x0f])
        );
        assert_comments_kept(&text, &[]);
    }

    #[test]
    fn add_service_writes_only_what_differs_from_defaults() {
        let mut f = file(ORIGINAL);
        let api = Service {
            name: "api".into(),
            vip: ip("203.0.113.20"),
            port: 443,
            protocol: Protocol::Tcp,
            forwarding: Forwarding::Tunnel,
            hash: HashMode::FiveTuple,
            table_size: 65_537,
            tunnel_source: Some(ip("198.51.100.1")),
            health: Health {
                check: CheckKind::Tcp,
                port: 443,
                interval_ms: 2000,
                ..Health::default()
            },
            backends: vec![
                Backend {
                    address: ip("192.0.2.21"),
                    weight: 100,
                    mac: None,
                },
                Backend {
                    address: ip("192.0.2.22"),
                    weight: 10,
                    mac: None,
                },
            ],
        };
        f.add_service(&api).unwrap();
        let text = f.text();
        let added = "\n[[service]]\nname = \"api\"\nvip = \"203.0.113.20\"\nport = 443\n\
                     protocol = \"tcp\"\nforwarding = \"tunnel\"\nhash = \"5-tuple\"\n\
                     tunnel_source = \"198.51.100.1\"\n\n[service.health]\ncheck = \"tcp\"\n\
                     interval_ms = 2000\n\n[[service.backend]]\naddress = \"192.0.2.21\"\n\n\
                     [[service.backend]]\naddress = \"192.0.2.22\"\nweight = 10\n";
        assert_eq!(
            text,
            ORIGINAL.replace("# ns2\n", &format!("# ns2\n{added}")),
            "{text}"
        );
        let c = config::parse(&text).unwrap().config;
        assert_eq!(c.services.len(), 3);
        assert_eq!(c.services[2], api);
        assert_comments_kept(&text, &[]);

        // No health table for check = none; into a file without services.
        let mut f = file("[daemon]\ninterfaces = [\"eth0\"]  # only\n");
        let plain = Service {
            name: "p".into(),
            vip: ip("10.0.0.1"),
            port: 0,
            protocol: Protocol::Udp,
            forwarding: Forwarding::Dsr,
            hash: HashMode::Source,
            table_size: 65_537,
            tunnel_source: None,
            health: Health::default(),
            backends: vec![],
        };
        f.add_service(&plain).unwrap();
        assert_eq!(
            f.text(),
            "[daemon]\ninterfaces = [\"eth0\"]  # only\n\n[[service]]\nname = \"p\"\n\
             vip = \"10.0.0.1\"\nport = 0\nprotocol = \"udp\"\n"
        );
        assert_eq!(config::parse(&f.text()).unwrap().config.services[0], plain);
    }

    #[test]
    fn errors_name_what_is_missing_or_duplicated() {
        let mut f = file(ORIGINAL);
        let b = Backend {
            address: ip("192.0.2.11"),
            weight: 100,
            mac: None,
        };
        let e = f.set_weight("nope", ip("192.0.2.11"), 1).unwrap_err();
        assert!(
            matches!(&e, EditError::NoSuchService(n) if n == "nope"),
            "{e}"
        );
        assert!(e.to_string().contains("nope"));
        assert!(matches!(
            f.remove_service("nope"),
            Err(EditError::NoSuchService(_))
        ));
        assert!(matches!(
            f.add_backend("nope", &b),
            Err(EditError::NoSuchService(_))
        ));
        let e = f.remove_backend("web", ip("192.0.2.99")).unwrap_err();
        assert!(
            matches!(&e, EditError::NoSuchBackend { service, address } if service == "web" && *address == ip("192.0.2.99"))
        );
        assert!(e.to_string().contains("192.0.2.99"), "{e}");
        assert!(matches!(
            f.set_weight("web", ip("2001:db8::1"), 1),
            Err(EditError::NoSuchBackend { .. })
        ));
        let e = f.add_backend("web", &b).unwrap_err();
        assert!(matches!(e, EditError::BackendExists { .. }), "{e}");
        assert!(e.to_string().contains("192.0.2.11"));
        // Equal as an address, spelt differently.
        let b6 = Backend {
            address: ip("2001:db8:0:0::2"),
            weight: 100,
            mac: None,
        };
        assert!(matches!(
            f.add_backend("dns", &b6),
            Err(EditError::BackendExists { .. })
        ));
        let mut web = config::parse(ORIGINAL).unwrap().config.services[0].clone();
        web.vip = ip("203.0.113.99");
        let e = f.add_service(&web).unwrap_err();
        assert!(
            matches!(&e, EditError::ServiceExists(n) if n == "web"),
            "{e}"
        );
        // Nothing changed.
        assert_eq!(f.text(), ORIGINAL);
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "lb-config-edit-{tag}-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn entries(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn save_writes_atomically_and_keeps_the_mode() {
        let dir = temp_dir("save");
        let path = dir.join("lb.toml");
        fs::write(&path, ORIGINAL).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let inode = fs::metadata(&path).unwrap().ino();

        let mut f = ConfigFile::load(&path).unwrap();
        f.set_weight("web", ip("192.0.2.12"), 0).unwrap();
        f.save().unwrap();
        let on_disk = fs::read_to_string(&path).unwrap();
        assert_eq!(on_disk, f.text());
        assert_eq!(summary(&on_disk)[0].1[1].1, 0);
        assert_eq!(mode(&path), 0o640);
        assert_ne!(
            fs::metadata(&path).unwrap().ino(),
            inode,
            "not renamed over"
        );
        assert_eq!(entries(&dir), vec!["lb.toml"], "temporary file left behind");

        // A second edit and save through the same ConfigFile.
        f.set_weight("web", ip("192.0.2.12"), 100).unwrap();
        f.save().unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), f.text());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn save_refuses_an_invalid_result_and_leaves_the_file() {
        let dir = temp_dir("invalid");
        let path = dir.join("lb.toml");
        fs::write(&path, ORIGINAL).unwrap();
        let mut f = ConfigFile::load(&path).unwrap();
        f.add_backend(
            "web",
            &Backend {
                address: ip("2001:db8::7"),
                weight: 100,
                mac: None,
            },
        )
        .unwrap();
        let e = f.save().unwrap_err();
        match &e {
            EditError::Invalid(p) => {
                assert!(p.iter().any(|p| p.message.contains("2001:db8::7")), "{p:?}")
            }
            other => panic!("expected Invalid, got {other}"),
        }
        assert!(e.to_string().contains("family"), "{e}");
        assert_eq!(fs::read_to_string(&path).unwrap(), ORIGINAL);
        assert_eq!(entries(&dir), vec!["lb.toml"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn save_refuses_to_overwrite_a_file_changed_meanwhile() {
        let dir = temp_dir("conflict");
        let path = dir.join("lb.toml");
        fs::write(&path, ORIGINAL).unwrap();
        let mut f = ConfigFile::load(&path).unwrap();
        f.remove_service("dns").unwrap();
        let by_hand = ORIGINAL.replace("# uplink", "# uplink (edited by hand)");
        fs::write(&path, &by_hand).unwrap();
        assert!(matches!(f.save(), Err(EditError::Conflict(_))));
        assert_eq!(fs::read_to_string(&path).unwrap(), by_hand);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn save_through_a_symlink_keeps_the_link() {
        let dir = temp_dir("link");
        let real = dir.join("real.toml");
        let link = dir.join("lb.toml");
        fs::write(&real, ORIGINAL).unwrap();
        std::os::unix::fs::symlink("real.toml", &link).unwrap();
        let mut f = ConfigFile::load(&link).unwrap();
        f.remove_backend("web", ip("192.0.2.13")).unwrap();
        f.save().unwrap();
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read_to_string(&real).unwrap(), f.text());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn syntax_errors_are_reported_on_load() {
        let e = ConfigFile::from_text(Path::new("/etc/lb/lb.toml"), "[daemon\n").unwrap_err();
        assert!(
            matches!(&e, EditError::Parse(m) if m.contains("/etc/lb/lb.toml")),
            "{e}"
        );
    }

    const INLINE: &str = r#"[daemon]
interfaces = ["eth0"]

[[service]]
name = "web"
vip = "203.0.113.10"
port = 80
protocol = "tcp"
backend = [
  # first rack
  { address = "192.0.2.11", weight = 50 },  # a1
  { address = "192.0.2.12" },  # a2
  { address = "192.0.2.13" },  # a3
]

[[service]]
name = "one"
vip = "203.0.113.11"
port = 80
protocol = "tcp"
backend = [{ address = "192.0.2.31" }, { address = "192.0.2.32" }]
"#;

    #[test]
    fn inline_backend_arrays_are_edited_too() {
        let mut f = file(INLINE);
        f.set_weight("web", ip("192.0.2.11"), 60).unwrap();
        f.set_weight("web", ip("192.0.2.12"), 5).unwrap();
        let text = f.text();
        assert!(
            text.contains("{ address = \"192.0.2.11\", weight = 60 },  # a1"),
            "{text}"
        );
        assert!(
            text.contains("{ address = \"192.0.2.12\", weight = 5 },  # a2"),
            "{text}"
        );

        f.remove_backend("web", ip("192.0.2.12")).unwrap();
        let text = f.text();
        assert!(
            !text.contains("# a2") && !text.contains("192.0.2.12"),
            "{text}"
        );
        assert!(text.contains("# first rack") && text.contains("# a1") && text.contains("# a3"));
        f.remove_backend("web", ip("192.0.2.13")).unwrap();
        f.add_backend(
            "web",
            &Backend {
                address: ip("192.0.2.14"),
                weight: 100,
                mac: None,
            },
        )
        .unwrap();
        let text = f.text();
        assert!(
            text.contains(
                "backend = [\n  # first rack\n  { address = \"192.0.2.11\", weight = 60 },  # a1\n  { address = \"192.0.2.14\" },\n]"
            ),
            "{text}"
        );

        f.remove_backend("one", ip("192.0.2.31")).unwrap();
        f.add_backend(
            "one",
            &Backend {
                address: ip("192.0.2.33"),
                weight: 9,
                mac: None,
            },
        )
        .unwrap();
        let text = f.text();
        assert!(
            text.contains(
                "backend = [{ address = \"192.0.2.32\" }, { address = \"192.0.2.33\", weight = 9 }]"
            ),
            "{text}"
        );
        assert_eq!(
            summary(&text),
            vec![
                web(&[("192.0.2.11", 60), ("192.0.2.14", 100)]),
                (
                    "one".into(),
                    vec![(ip("192.0.2.32"), 100), (ip("192.0.2.33"), 9)]
                )
            ]
        );
        f.remove_service("one").unwrap();
        assert_eq!(summary(&f.text()).len(), 1);
    }

    #[test]
    fn other_layouts_are_refused_clearly() {
        let mut f = file("service = 3\n[daemon]\ninterfaces = [\"eth0\"]\n");
        let e = f.remove_service("web").unwrap_err();
        assert!(matches!(e, EditError::Unsupported(_)), "{e}");
        assert!(e.to_string().contains("[[service]]"), "{e}");
    }
}
