//! `src/app/` is layered: records at the bottom, the inventory and `App`
//! above them, one file per resource above those, report ingestion on top.
//! No file imports one that imports it back; this test reads every file's
//! `use` lines and inline module paths and fails naming any cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The node of `mod.rs`, the `app` module itself.
const ROOT: &str = "mod";

/// A file's text without comments (doc comments name other modules in
/// links that are not imports).
fn code(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifier at the start of `s`.
fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first identifier of each top-level entry of a `{a, b::{c, d}, E}`
/// group that `s` starts with.
fn group_heads(s: &str) -> Vec<&str> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut start = 1;
    for (i, c) in s.char_indices() {
        match c {
            '{' => {
                depth += 1;
                if depth == 1 {
                    start = i + 1;
                }
            }
            ',' if depth == 1 => {
                heads.push(ident(s[start..].trim_start()));
                start = i + 1;
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    heads.push(ident(s[start..].trim_start()));
                    break;
                }
            }
            _ => {}
        }
    }
    heads.into_iter().filter(|h| !h.is_empty()).collect()
}

/// The modules a path continuing after `prefix` at each occurrence names:
/// a child module by its name, anything else (an item of `mod.rs`) as the
/// root.
fn targets(text: &str, prefix: &str, modules: &BTreeSet<String>, out: &mut BTreeSet<String>) {
    let resolve = |head: &str| {
        if modules.contains(head) {
            head.to_string()
        } else {
            ROOT.to_string()
        }
    };
    for (i, _) in text.match_indices(prefix) {
        // `super::super::` is matched from its first `super::` only.
        if text[..i].ends_with("::") {
            continue;
        }
        let rest = &text[i + prefix.len()..];
        if rest.starts_with('{') {
            out.extend(group_heads(rest).into_iter().map(resolve));
        } else if rest.starts_with('*') {
            out.insert(ROOT.to_string());
        } else {
            let head = ident(rest);
            if head != "super" && !head.is_empty() {
                out.insert(resolve(head));
            }
        }
    }
}

/// Each module's imports of other modules of `app/`, from its source.
fn imports(files: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<String> = files.keys().filter(|m| *m != ROOT).cloned().collect();
    let mut graph = BTreeMap::new();
    for (module, text) in files {
        let text = code(text);
        // In a file's `mod tests`, `super::` is the file itself and
        // `super::super::` its parent.
        let (main, tests) = match text.find("#[cfg(test)]\nmod tests") {
            Some(i) => text.split_at(i),
            None => (text.as_str(), ""),
        };
        let mut out = BTreeSet::new();
        targets(main, "crate::app::", &modules, &mut out);
        targets(tests, "crate::app::", &modules, &mut out);
        if module == ROOT {
            // The root names its children directly (`use records::X`,
            // `inventory::load(..)`) or through `self::`.
            for child in &modules {
                let path = format!("{child}::");
                let named = main.match_indices(&path).any(|(i, _)| {
                    !main[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':')
                });
                if named || main.contains(&format!("self::{path}")) {
                    out.insert(child.clone());
                }
            }
        } else {
            targets(main, "super::", &modules, &mut out);
            targets(tests, "super::super::", &modules, &mut out);
        }
        out.remove(module);
        graph.insert(module.clone(), out);
    }
    graph
}

/// A cycle of the graph, as the modules along it (first one repeated at
/// the end), if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

fn app_sources() -> BTreeMap<String, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/app");
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("src/app") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let module = path
                .file_stem()
                .expect("stem")
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&path).expect("read");
            files.insert(module, text);
        }
    }
    assert!(
        files.len() > 5,
        "src/app/ should hold the application layer"
    );
    files
}

#[test]
fn app_modules_import_each_other_without_cycles() {
    let graph = imports(&app_sources());
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "src/app/ modules import each other in a circle: {}",
            cycle.join(" -> ")
        );
    }
}

/// The checker itself sees the import forms the code uses, and the cycles
/// they make.
#[test]
fn the_checker_finds_cycles_through_every_import_form() {
    let files = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(m, t)| (m.to_string(), t.to_string()))
            .collect::<BTreeMap<_, _>>()
    };
    /// Module sources, and the cycle expected among them.
    type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>);
    let cases: &[Case] = &[
        // Grouped `use super::{..}` naming a sibling.
        (
            &[
                ("mod", ""),
                ("a", "use super::{b::{X, Y}, App};"),
                ("b", "use super::a::Z;"),
            ],
            Some("a -> b -> a"),
        ),
        // An inline path, and the root importing a child back.
        (
            &[
                ("mod", "pub use a::Thing;"),
                ("a", "fn f() { super::App::g() }"),
            ],
            Some("a -> mod -> a"),
        ),
        // `crate::app::` paths, and `super::super::` inside `mod tests`.
        (
            &[
                ("mod", ""),
                ("a", "fn f() { crate::app::b::g() }"),
                (
                    "b",
                    "fn g() {}\n#[cfg(test)]\nmod tests {\n    use super::super::a::f;\n    use super::*;\n}",
                ),
            ],
            Some("a -> b -> a"),
        ),
        // Comments are not imports; `super::*` in tests is the file itself.
        (
            &[
                ("mod", "pub use records::R;\n// see [`a::f`]"),
                ("a", "use super::records::R;\n#[cfg(test)]\nmod tests {\n    use super::*;\n}"),
                ("records", ""),
            ],
            None,
        ),
    ];
    for (sources, want) in cases {
        let got = find_cycle(&imports(&files(sources))).map(|c| c.join(" -> "));
        assert_eq!(got.as_deref(), *want, "{sources:?}");
    }
}
