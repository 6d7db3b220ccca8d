//! Changing the document in place: values with their decor, keys after their neighbours,
//! elements of inline arrays, and the comments of removed tables.

use super::*;

/// Replaces a value, keeping its surroundings; a comment after it stays in its column (as far
/// as a space before it remains).
pub(super) fn replace_keeping_decor(v: &mut Value, new: Value) {
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
pub(super) fn table_insert_after(t: &mut Table, after: &[&str], key: Key, item: Item) {
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

pub(super) fn inline_insert_after(t: &mut InlineTable, after: &[&str], key: Key, mut value: Value) {
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
pub(super) fn split_head(s: &str) -> (&str, &str) {
    match s.find('\n') {
        Some(nl) if s[..nl].contains('#') => s.split_at(nl + 1),
        _ => ("", s),
    }
}

pub(super) fn array_remove(a: &mut Array, i: usize) {
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

pub(super) fn array_push(a: &mut Array, mut v: Value) {
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
pub(super) fn table_order(doc: &DocumentMut) -> Vec<(isize, Loc)> {
    pub(super) fn visit(t: &Table, loc: &mut Loc, last: &mut isize, out: &mut Vec<(isize, Loc)>) {
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

pub(super) fn table_at<'a>(doc: &'a mut DocumentMut, loc: &Loc) -> Option<&'a mut Table> {
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
pub(super) fn renumber(doc: &mut DocumentMut) {
    for (n, (_, loc)) in table_order(doc).into_iter().enumerate() {
        if let Some(t) = table_at(doc, &loc) {
            t.set_position(Some(n as isize + 1));
        }
    }
}

/// The part of a table's leading text that is not its own: everything up to and including the
/// last blank line (the comment lines directly above the header belong to the table).
pub(super) fn detached_part(prefix: &str) -> &str {
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

pub(super) fn strip_leading_blank_lines(s: &str) -> &str {
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
pub(super) fn keep_detached_comments(doc: &mut DocumentMut, removed: &Table) {
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
