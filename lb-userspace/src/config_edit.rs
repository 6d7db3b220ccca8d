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
//! "2001:db8::1" matches "2001:0db8::1") and, when a port is given ([`BackendAt`]), by the port
//! they serve on (their `port`, else the service's). Both the `[[service]]` / `[[service.backend]]` form and
//! arrays of inline tables (`backend = [{ address = "..." }, ...]`) are edited; any other shape
//! of `service` or `backend` is refused with [`EditError::Unsupported`].
//!
//! [`ConfigFile::save`] validates the result with [`config::parse`] and writes it atomically
//! (temporary file in the same directory with the original's mode and owner, fsync, rename,
//! fsync of the directory). It refuses to overwrite a file that changed on disk since it was read.
//!
//! This file owns [`ConfigFile`] and its edits; `find` locates services and backends, `build`
//! makes new tables in their neighbours' style, `layout` changes the document in place, `write`
//! writes the file. They call nothing of lbd but `config`.

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

use crate::config::{
    self, Backend, CheckKind, Cidr, Forwarding, HashMode, Health, Payload, Problem, Service,
};

mod build;
mod find;
mod layout;
#[cfg(test)]
mod tests;
mod write;

use build::*;
use find::*;
use layout::*;
use write::*;

/// Why an edit or a save was refused.
/// Which backend of a service an edit names: the one at `address` serving on `port` (its own
/// `port` key, else the service's), or with no port the first at `address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendAt {
    pub address: IpAddr,
    pub port: Option<u16>,
}

impl From<IpAddr> for BackendAt {
    fn from(address: IpAddr) -> Self {
        BackendAt {
            address,
            port: None,
        }
    }
}

impl From<config::BackendKey> for BackendAt {
    fn from(k: config::BackendKey) -> Self {
        BackendAt {
            address: k.address,
            port: Some(k.port),
        }
    }
}

impl std::fmt::Display for BackendAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            None => write!(f, "{}", self.address),
            Some(port) => write!(
                f,
                "{}",
                config::BackendKey {
                    address: self.address,
                    port
                }
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("config file {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("config file is not valid TOML: {0}")]
    Parse(String),
    #[error("no service named {0:?}")]
    NoSuchService(String),
    #[error("service {service:?} has no backend {backend}")]
    NoSuchBackend { service: String, backend: BackendAt },
    #[error("a service named {0:?} already exists")]
    ServiceExists(String),
    #[error("service {service:?} already has a backend {backend}")]
    BackendExists { service: String, backend: BackendAt },
    #[error("{prefix} is already on the {list} list of service {service:?}")]
    PrefixExists {
        service: String,
        list: &'static str,
        prefix: Cidr,
    },
    #[error("{prefix} is on neither the allow nor the deny list of service {service:?}")]
    NoSuchPrefix { service: String, prefix: Cidr },
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

    /// Appends a `[[service.backend]]` table (`address`, `weight` unless 100, `mac` and `port`
    /// if set). Refused when the service has a backend at that address serving on that port.
    pub fn add_backend(&mut self, service: &str, b: &Backend) -> Result<(), EditError> {
        let template = {
            let node = service_node(&mut self.doc, service)?;
            let service_port = port_of(node.like_ref());
            let at = BackendAt {
                address: b.address,
                port: Some(b.port_or(service_port)),
            };
            if let Some(c) = collection(node.into_like(), "backend")? {
                if c.find(|t| is_backend(t, at, service_port)).is_some() {
                    return Err(EditError::BackendExists {
                        service: service.to_owned(),
                        backend: at,
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
    pub fn remove_backend(
        &mut self,
        service: &str,
        backend: impl Into<BackendAt>,
    ) -> Result<(), EditError> {
        let backend = backend.into();
        renumber(&mut self.doc);
        let no_such = || EditError::NoSuchBackend {
            service: service.to_owned(),
            backend,
        };
        let removed = {
            let mut node = service_node(&mut self.doc, service)?;
            let service_port = port_of(node.like_ref());
            let c = collection(node.like(), "backend")?.ok_or_else(no_such)?;
            let i = c
                .find(|t| is_backend(t, backend, service_port))
                .ok_or_else(no_such)?;
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
        backend: impl Into<BackendAt>,
        weight: u32,
    ) -> Result<(), EditError> {
        let backend = backend.into();
        let no_such = || EditError::NoSuchBackend {
            service: service.to_owned(),
            backend,
        };
        let mut node = service_node(&mut self.doc, service)?;
        let service_port = port_of(node.like_ref());
        let c = collection(node.like(), "backend")?.ok_or_else(no_such)?;
        let i = c
            .find(|t| is_backend(t, backend, service_port))
            .ok_or_else(no_such)?;
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

    /// Adds `prefix` to the service's client filter list `list` (`allow` or `deny`): at the end
    /// of its array, in the array's style; a service without that key gets one after its last
    /// plain key.
    pub fn add_prefix(
        &mut self,
        service: &str,
        list: &'static str,
        prefix: Cidr,
    ) -> Result<(), EditError> {
        let value = Value::from(prefix.to_string());
        let mut node = service_node(&mut self.doc, service)?;
        if let Some(a) = prefix_list(node.like(), list)? {
            if a.iter().any(|v| is_prefix(v, prefix)) {
                return Err(EditError::PrefixExists {
                    service: service.to_owned(),
                    list,
                    prefix,
                });
            }
            array_push(a, value);
            return Ok(());
        }
        let mut a = Array::new();
        a.push(value);
        match node {
            Node::Table(t) => {
                let style = style_of(t);
                let key = styled_key(list, &style);
                let mut value = Value::Array(a);
                style_value(&mut value, &style);
                let plain: Vec<String> = t
                    .iter()
                    .filter(|(_, item)| item.is_value())
                    .map(|(k, _)| k.to_owned())
                    .collect();
                let plain: Vec<&str> = plain.iter().map(String::as_str).collect();
                table_insert_after(t, &plain, key, Item::Value(value));
            }
            Node::Inline(t) => {
                // Before the backends and health check written inline, after the rest.
                let plain: Vec<String> = t
                    .iter()
                    .map(|(k, _)| k.to_owned())
                    .filter(|k| k != "backend" && k != "health")
                    .collect();
                let plain: Vec<&str> = plain.iter().map(String::as_str).collect();
                inline_insert_after(t, &plain, Key::new(list), Value::Array(a));
            }
        }
        Ok(())
    }

    /// Removes `prefix` from whichever client filter list of the service has it, and returns
    /// that list's name; a list left empty loses its key (no list: every client allowed, none
    /// denied).
    pub fn remove_prefix(
        &mut self,
        service: &str,
        prefix: Cidr,
    ) -> Result<&'static str, EditError> {
        let mut node = service_node(&mut self.doc, service)?;
        for list in ["deny", "allow"] {
            let Some(a) = prefix_list(node.like(), list)? else {
                continue;
            };
            let Some(i) = a.iter().position(|v| is_prefix(v, prefix)) else {
                continue;
            };
            array_remove(a, i);
            if a.is_empty() {
                node.like().remove(list);
            }
            return Ok(list);
        }
        Err(EditError::NoSuchPrefix {
            service: service.to_owned(),
            prefix,
        })
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
