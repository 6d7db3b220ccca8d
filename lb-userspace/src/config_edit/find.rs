//! Finding services and backends in the document, whatever their layout (`[[...]]` tables or
//! arrays of inline tables).

use super::*;

/// A `[[...]]` array of tables or an array of inline tables.
pub(super) enum Collection<'a> {
    Tables(&'a mut ArrayOfTables),
    Inline(&'a mut Array),
}

/// A service or backend: a table or an inline table.
pub(super) enum Node<'a> {
    Table(&'a mut Table),
    Inline(&'a mut InlineTable),
}

impl<'a> Node<'a> {
    pub(super) fn like(&mut self) -> &mut dyn TableLike {
        match self {
            Node::Table(t) => &mut **t,
            Node::Inline(t) => &mut **t,
        }
    }
    pub(super) fn like_ref(&self) -> &dyn TableLike {
        match self {
            Node::Table(t) => &**t,
            Node::Inline(t) => &**t,
        }
    }
    pub(super) fn into_like(self) -> &'a mut dyn TableLike {
        match self {
            Node::Table(t) => t,
            Node::Inline(t) => t,
        }
    }
}

impl<'a> Collection<'a> {
    /// Removes entry `i`. Returns the removed `[[...]]` table, whose detached comments the
    /// caller keeps, and whether that emptied an array of tables, whose key should then go.
    pub(super) fn remove(self, i: usize) -> (Option<Table>, bool) {
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
    pub(super) fn find(&self, pred: impl Fn(&dyn TableLike) -> bool) -> Option<usize> {
        match self {
            Collection::Tables(a) => a.iter().position(|t| pred(t)),
            Collection::Inline(a) => a
                .iter()
                .position(|v| v.as_inline_table().is_some_and(|t| pred(t))),
        }
    }
    pub(super) fn into_node(self, i: usize) -> Node<'a> {
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

pub(super) fn collection<'a>(
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

pub(super) fn is_service(t: &dyn TableLike, name: &str) -> bool {
    t.get("name").and_then(Item::as_str) == Some(name)
}

/// Whether `t` is the backend `at` of a service of port `service_port`.
pub(super) fn is_backend(t: &dyn TableLike, at: BackendAt, service_port: u16) -> bool {
    let address = t
        .get("address")
        .and_then(Item::as_str)
        .and_then(|a| a.trim().parse::<IpAddr>().ok());
    address == Some(at.address) && at.port.is_none_or(|p| serves_on(t, service_port) == p)
}

/// The port a backend table serves on: its `port`, else the service's.
fn serves_on(t: &dyn TableLike, service_port: u16) -> u16 {
    t.get("port")
        .and_then(Item::as_integer)
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(service_port)
}

/// A service table's `port` (0 when missing or not a port: the file is validated anyway).
pub(super) fn port_of(t: &dyn TableLike) -> u16 {
    t.get("port")
        .and_then(Item::as_integer)
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(0)
}

pub(super) fn service_node<'a>(
    doc: &'a mut DocumentMut,
    name: &str,
) -> Result<Node<'a>, EditError> {
    let no_such = || EditError::NoSuchService(name.to_owned());
    let c = collection(doc.as_table_mut(), "service")?.ok_or_else(no_such)?;
    let i = c.find(|t| is_service(t, name)).ok_or_else(no_such)?;
    Ok(c.into_node(i))
}

pub(super) fn service_tables(doc: &DocumentMut) -> impl Iterator<Item = &Table> {
    doc.as_table()
        .get("service")
        .and_then(Item::as_array_of_tables)
        .into_iter()
        .flat_map(|a| a.iter())
}

pub(super) fn last_service_table(doc: &DocumentMut) -> Option<&Table> {
    service_tables(doc).last()
}

/// The last `health` table or `[[backend]]` table found in any service: a style template.
pub(super) fn any_subtable<'d>(doc: &'d DocumentMut, key: &str) -> Option<&'d Table> {
    service_tables(doc)
        .filter_map(|s| match s.get(key)? {
            Item::Table(t) => Some(t),
            Item::ArrayOfTables(a) => a.iter().last(),
            _ => None,
        })
        .last()
}

/// The service's client filter list `list` (an array of strings), if it has one.
pub(super) fn prefix_list<'a>(
    service: &'a mut dyn TableLike,
    list: &str,
) -> Result<Option<&'a mut Array>, EditError> {
    match service.get_mut(list) {
        None | Some(Item::None) => Ok(None),
        Some(Item::Value(Value::Array(a))) => Ok(Some(a)),
        Some(_) => Err(EditError::Unsupported(format!(
            "`{list}` is not an array of prefixes; write it as {list} = [\"192.0.2.0/24\", ...]"
        ))),
    }
}

/// Whether an element of a filter list is `prefix` (compared as prefixes: "2001:db8::/32"
/// matches "2001:0db8::/32", and "192.0.2.1" matches "192.0.2.1/32").
pub(super) fn is_prefix(v: &Value, prefix: Cidr) -> bool {
    v.as_str().and_then(|s| s.trim().parse::<Cidr>().ok()) == Some(prefix)
}
