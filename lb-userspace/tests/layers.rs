//! lbd's modules depend on each other one way only (README, "How it works"): no module reaches,
//! through `crate::` paths, a module that reaches it back. Checked on the source text, at the
//! level of the crate's top modules and of each folder's parts (`crate::daemon::plan`,
//! `super::model`, …). Unit tests (`tests.rs`, `mod tests`) may reach anything.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// Every `.rs` file under `dir`, unit-test files left out.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().unwrap() != "tests" {
                out.extend(sources(&path));
            }
        } else if path.extension().is_some_and(|e| e == "rs")
            && path.file_name().unwrap() != "tests.rs"
        {
            out.push(path);
        }
    }
    out
}

/// The text of a source file without its `#[cfg(test)] mod tests { … }` (always last here).
fn code(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]\nmod tests") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

/// The first path segments that follow `prefix` in `text`: `crate::{a, b::c}` gives a and b.
fn names_after(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices(prefix) {
        let rest = &text[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.extend(first_word(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    item.push(ch);
                }
            }
            names.extend(first_word(&item));
        } else {
            names.extend(first_word(rest));
        }
    }
    names
}

fn first_word(s: &str) -> Option<String> {
    let w: String = s
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!w.is_empty() && w != "self").then_some(w)
}

/// Module → the modules it names, for the parts of `folder` (the crate's top modules when
/// `folder` is the source root).
fn graph(src: &Path, folder: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let nested = folder != src;
    let prefix = match folder.strip_prefix(src).unwrap().to_str().unwrap() {
        "" => "crate::".to_string(),
        sub => format!("crate::{}::", sub.replace('/', "::")),
    };
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in sources(folder) {
        let rel = path.strip_prefix(folder).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap();
        let module = first.trim_end_matches(".rs").to_string();
        if ["bin", "lib", "mod", "main"].contains(&module.as_str()) {
            continue;
        }
        let text = code(&path);
        let mut named = names_after(&text, &prefix);
        // A folder's parts name their siblings as `super::x` (from a file directly in it).
        if nested && rel.components().count() == 1 {
            named.extend(names_after(&text, "super::"));
        }
        named.remove(&module);
        g.entry(module).or_default().extend(named);
    }
    let modules: BTreeSet<String> = g.keys().cloned().collect();
    for targets in g.values_mut() {
        targets.retain(|t| modules.contains(t));
    }
    g
}

/// Pairs (a, b) where a names b and b reaches a back.
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<(String, String)> {
    let reaches = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(m) = todo.pop() {
            for next in &g[&m] {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    g.iter()
        .flat_map(|(a, targets)| targets.iter().map(move |b| (a.clone(), b.clone())))
        .filter(|(a, b)| reaches(b).contains(a))
        .collect()
}

#[test]
fn lbds_modules_depend_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut folders = vec![src.clone()];
    for entry in fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() && path.file_name().unwrap() != "bin" {
            folders.push(path);
        }
    }
    let mut found = vec![];
    for folder in &folders {
        let g = graph(&src, folder);
        assert!(
            folder != &src || (g.contains_key("daemon") && g["api"].contains("daemon")),
            "the scan no longer sees the crate's modules: {g:?}"
        );
        for (a, b) in cycles(&g) {
            found.push(format!("{}: {a} → {b} → … → {a}", folder.display()));
        }
    }
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

#[test]
fn a_cycle_is_seen() {
    let g = BTreeMap::from([
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
        ("d".to_string(), BTreeSet::from(["a".to_string()])),
    ]);
    assert_eq!(cycles(&g).len(), 3);
    assert_eq!(
        names_after(
            "use crate::{api::{x, y}, daemon, state::to_addr};",
            "crate::"
        ),
        BTreeSet::from(["api".into(), "daemon".into(), "state".into()])
    );
}
