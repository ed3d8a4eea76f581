//! The layers of `src/` depend one way (the table is in the docs of `src/lib.rs`): every
//! `use crate::…` (grouped forms included) and every `crate::x::` path in code must be an edge
//! of [`ALLOWED`]. A file's layer is its top folder or file under `src/`.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What each layer may import (besides itself and `proto`, the generated types everyone uses).
/// `main` (the binary) and `operator` (the wiring) may import anything.
const ALLOWED: &[(&str, &[&str])] = &[
    ("protocol", &[]),
    ("api", &[]),
    ("http_server", &[]),
    ("fleet", &["protocol"]),
    ("opamp", &["fleet", "protocol", "http_server", "peers"]),
    ("routes", &["fleet", "api", "protocol", "http_server", "peers"]),
    ("controller", &["fleet", "routes", "api", "protocol", "opamp", "peers"]),
    ("peers", &["protocol"]),
    ("access", &["protocol"]),
    ("agents_api", &["access", "fleet", "protocol", "peers", "http_server"]),
    ("sim", &["protocol"]),
    ("metrics", &["fleet", "opamp", "routes", "controller", "peers", "agents_api"]),
];

/// Layers that may import anything.
const TOP: &[&str] = &["main", "lib", "operator"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its comments and the contents of its string and char literals.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i..].starts_with(b"/*") {
                        depth += 1;
                        i += 2;
                    } else if b[i..].starts_with(b"*/") {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                out.push(' ');
            }
            b'r' if matches!(b.get(i + 1), Some(b'"' | b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
                if b.get(i + 1 + hashes) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                let close = format!("\"{}", "#".repeat(hashes));
                i += 2 + hashes;
                while i < b.len() && !b[i..].starts_with(close.as_bytes()) {
                    i += 1;
                }
                i += close.len();
                out.push_str("\"\"");
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            // A char literal ('x', '\n', '"'), not a lifetime ('a).
            b'\'' if b.get(i + 2) == Some(&b'\'') || b.get(i + 1) == Some(&b'\\') => {
                i += 1;
                while i < b.len() && b[i] != b'\'' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("' '");
            }
            _ => {
                let len = text[i..].chars().next().unwrap().len_utf8();
                out.push_str(&text[i..i + len]);
                i += len;
            }
        }
    }
    out
}

fn ident(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules named by the `crate::` paths of some code: `crate::a::b`, and each
/// item of `crate::{a, b::c, …}`.
fn imported(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate".len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
            continue; // `$crate::`, `opamp_crate::`
        }
        let Some(after) = rest.trim_start().strip_prefix("::") else { continue };
        let after = after.trim_start();
        if let Some(group) = after.strip_prefix('{') {
            // The items at depth 0 of the group, each up to its first `::`, `,` or `}`.
            let mut depth = 0;
            let mut start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && !c.is_whitespace() => {
                        start = false;
                        let name = ident(&group[i..]);
                        if !name.is_empty() && name != "self" {
                            found.insert(name.to_owned());
                        }
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident(after);
            if !name.is_empty() {
                found.insert(name.to_owned());
            }
        }
    }
    found
}

fn layer_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_str().unwrap();
    first.strip_suffix(".rs").unwrap_or(first).to_owned()
}

#[test]
fn the_parser_sees_every_form() {
    let code = code_only(
        "use crate::a::B;\nuse crate::{b, c::{D, E}, self};\npub(crate) use crate :: { f::g };\n\
         let x = crate::h::i(); // crate::j\n/* crate::k */ let s = \"crate::l\"; let c = '\"';\n\
         let r = r#\"crate::m\"#; fn f<'a>(x: &'a crate::n::T) {}\n$crate::o::p!();",
    );
    let names: Vec<_> = imported(&code).into_iter().collect();
    assert_eq!(names, ["a", "b", "c", "f", "h", "n"]);
}

#[test]
fn the_allowed_table_has_no_cycles() {
    let table: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    fn visit<'a>(
        at: &'a str,
        table: &BTreeMap<&str, &[&'a str]>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if let Some(start) = path.iter().position(|&p| p == at) {
            panic!("the allowed table has a cycle: {} → {at}", path[start..].join(" → "));
        }
        if !done.insert(at) {
            return;
        }
        path.push(at);
        for &next in table.get(at).copied().unwrap_or_default() {
            visit(next, table, path, done);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for &(layer, _) in ALLOWED {
        visit(layer, &table, &mut Vec::new(), &mut done);
    }
}

#[test]
fn layers_import_only_what_the_table_allows() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let table: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut wrong = Vec::new();
    for file in &files {
        let layer = layer_of(&src, file);
        if TOP.contains(&layer.as_str()) {
            continue;
        }
        let Some(allowed) = table.get(layer.as_str()) else {
            wrong.push(format!("{}: layer {layer:?} is not in the table", file.display()));
            continue;
        };
        let code = code_only(&std::fs::read_to_string(file).unwrap());
        for target in imported(&code) {
            if target != layer && target != "proto" && !allowed.contains(&target.as_str()) {
                let rel = file.strip_prefix(&src).unwrap().display();
                wrong.push(format!("src/{rel}: {layer} → {target}"));
            }
        }
    }
    assert!(wrong.is_empty(), "edges outside the allowed table:\n{}", wrong.join("\n"));
}
