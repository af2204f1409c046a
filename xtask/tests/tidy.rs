//! The tidy test: the habits docs/ARCHITECTURE.md and ../shared/STYLE.md claim, checked on
//! every `cargo xtask test` (as rust-analyzer's `tidy.rs` does). One place for all of them:
//!
//! - crate layering (what each crate must never depend on, from `cargo tree`);
//! - the core is sans-IO: no file system, network, threads or clocks in `wharf-core/src`;
//! - public limits (`pub const *_MAX | *_MIN | *_LIMIT`) of the crates under `crates/` live in
//!   their `limits` module;
//! - no cycle among a crate's top-level modules (`crate::X` paths, for every crate under
//!   `crates/` and the Python binding's Rust side);
//! - no `#[ignore]`d test, and every `should_panic` names the panic it expects.
//!
//! Each checker is a function over text, and `every_checker_catches_what_it_forbids` feeds
//! each one a violation, so a checker that stops finding anything fails here too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Every `.rs` file under `dir`, skipping build output and fuzz corpora.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if path.is_dir() {
                if !matches!(
                    name.as_ref(),
                    "target" | ".git" | "node_modules" | "corpus" | "artifacts" | ".venv"
                ) {
                    stack.push(path);
                }
            } else if name.ends_with(".rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The Rust sources of the project: the workspace crates, xtask, the benches, the fuzz targets
/// and the Python binding's Rust side.
fn project_files() -> Vec<PathBuf> {
    ["crates", "benches", "xtask", "fuzz", "bindings"]
        .iter()
        .flat_map(|dir| rust_files(&root().join(dir)))
        .collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// A line without its `//` comment (doc comments included); good enough for code that keeps
/// `//` out of string literals on the lines these checks look at.
fn code_of(line: &str) -> &str {
    line.split_once("//").map_or(line, |(code, _)| code)
}

// ---------------------------------------------------------------------------------------------
// Checkers: pure functions from text to violations.

/// Packages of `cargo tree -e normal --prefix none` output that `banned` forbids.
fn layering_violations(krate: &str, tree: &str, banned: &[&str]) -> Vec<String> {
    let mut found: Vec<String> = tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|dep| *dep != krate && banned.iter().any(|banned| dep == banned))
        .map(|dep| format!("{krate} depends on {dep}"))
        .collect();
    found.sort();
    found.dedup();
    found
}

/// What the sans-IO core must not name: the file system, the network, threads, processes,
/// the environment and clocks (time comes in as numbers through commands).
const CORE_FORBIDDEN: &[&str] = &[
    "std::fs",
    "std::net",
    "std::thread",
    "std::process",
    "std::env",
    "SystemTime",
    "Instant",
    "tokio",
];

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `word` in `code` as a whole word (or path), not part of a longer identifier.
fn contains_word(code: &str, word: &str) -> bool {
    code.match_indices(word).any(|(at, _)| {
        let before = code[..at].chars().next_back();
        let after = code[at + word.len()..].chars().next();
        !before.is_some_and(is_word_char) && !after.is_some_and(is_word_char)
    })
}

fn sans_io_violations(file: &str, text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (idx, line) in text.lines().enumerate() {
        let code = code_of(line);
        // `use std::{fs, ...}` names a module without the `std::` prefix next to it.
        let grouped = code.contains("std::{");
        for word in CORE_FORBIDDEN {
            let short = word.strip_prefix("std::");
            if contains_word(code, word)
                || (grouped && short.is_some_and(|short| contains_word(code, short)))
            {
                found.push(format!("{file}:{}: `{word}` in the sans-IO core", idx + 1));
            }
        }
    }
    found
}

/// `pub const NAME` with a limit's name outside a `limits.rs`.
fn limit_violations(file: &str, text: &str) -> Vec<String> {
    if file.ends_with("/limits.rs") {
        return Vec::new();
    }
    let mut found = Vec::new();
    for (idx, line) in text.lines().enumerate() {
        let code = code_of(line).trim_start();
        let Some(rest) = code.strip_prefix("pub const ") else {
            continue;
        };
        let Some((name, ty)) = rest.split_once(':') else {
            continue;
        };
        let name = name.trim();
        let is_limit = ["_MAX", "_MIN", "_LIMIT"]
            .iter()
            .any(|suffix| name.ends_with(suffix));
        // Argument names (`"x-delivery-limit"`) are strings, not limits.
        if is_limit && !ty.trim_start().starts_with("&") {
            found.push(format!(
                "{file}:{}: public limit `{name}` belongs in the crate's `limits` module",
                idx + 1
            ));
        }
    }
    found
}

fn test_attribute_violations(file: &str, text: &str) -> Vec<String> {
    let ignore = concat!("#[", "ignore");
    let should_panic = concat!("#[", "should_panic");
    let mut found = Vec::new();
    for (idx, line) in text.lines().enumerate() {
        let code = code_of(line).trim_start();
        if code.starts_with(ignore) {
            found.push(format!(
                "{file}:{}: an ignored test; gate slow tiers by an env var or xtask flag instead",
                idx + 1
            ));
        }
        if code.starts_with(should_panic) && !code.contains("expected") {
            found.push(format!(
                "{file}:{}: `should_panic` without `expected = \"...\"`",
                idx + 1
            ));
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Module cycles: a crate's top-level modules depend on each other one way only.

fn is_word_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_'
}

/// Blanks `buf[range]` byte for byte, keeping line breaks (so offsets and line numbers stay).
fn blank(buf: &mut [u8], range: std::ops::Range<usize>) {
    for byte in &mut buf[range] {
        if *byte != b'\n' {
            *byte = b' ';
        }
    }
}

/// The end of the raw string literal (`r"…"`, `r#"…"#`, `br"…"`) starting at `start`, if one does.
fn raw_string_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut idx = start + usize::from(bytes[start] == b'b');
    if bytes.get(idx) != Some(&b'r') {
        return None;
    }
    idx += 1;
    let n_hashes = bytes[idx..]
        .iter()
        .take_while(|&&byte| byte == b'#')
        .count();
    idx += n_hashes;
    if bytes.get(idx) != Some(&b'"') {
        return None; // `r#ident`, or an identifier starting with `r`
    }
    let closing: Vec<u8> = std::iter::once(b'"')
        .chain(std::iter::repeat_n(b'#', n_hashes))
        .collect();
    let end = bytes[idx + 1..]
        .windows(closing.len())
        .position(|window| window == closing.as_slice())
        .map_or(bytes.len(), |at| idx + 1 + at + closing.len());
    Some(end)
}

/// The end of the character literal starting at the `'` at `start`; `None` for a lifetime or
/// a label.
fn char_literal_end(text: &str, start: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    if bytes.get(start + 1) == Some(&b'\\') {
        // '\n', '\'', '\u{1F600}': the escaped character, then up to the closing quote.
        let close = bytes
            .get(start + 3..)?
            .iter()
            .position(|&byte| byte == b'\'')?;
        return Some(start + 3 + close + 1);
    }
    let len = text[start + 1..].chars().next()?.len_utf8();
    (bytes.get(start + 1 + len) == Some(&b'\'')).then_some(start + 2 + len)
}

/// `text` with its comments blanked (doc comments included), and a copy with its string and
/// character literals blanked too, in which brackets can be matched. Both keep every offset.
/// The first keeps string literals because code names paths in them (serde's
/// `deserialize_with = "crate::…"`).
fn blank_comments_and_literals(text: &str) -> (Vec<u8>, Vec<u8>) {
    let bytes = text.as_bytes();
    let mut code = bytes.to_vec();
    let mut bare = bytes.to_vec();
    let mut idx = 0;
    while idx < bytes.len() {
        let rest = &bytes[idx..];
        let after_word = idx > 0 && is_word_byte(bytes[idx - 1]);
        if rest.starts_with(b"//") {
            let end = rest
                .iter()
                .position(|&byte| byte == b'\n')
                .map_or(bytes.len(), |at| idx + at);
            blank(&mut code, idx..end);
            blank(&mut bare, idx..end);
            idx = end;
        } else if rest.starts_with(b"/*") {
            // Block comments nest.
            let (mut end, mut depth) = (idx + 2, 1);
            while end < bytes.len() && depth > 0 {
                if bytes[end..].starts_with(b"/*") {
                    depth += 1;
                    end += 2;
                } else if bytes[end..].starts_with(b"*/") {
                    depth -= 1;
                    end += 2;
                } else {
                    end += 1;
                }
            }
            let end = end.min(bytes.len());
            blank(&mut code, idx..end);
            blank(&mut bare, idx..end);
            idx = end;
        } else if let Some(end) = (!after_word).then(|| raw_string_end(bytes, idx)).flatten() {
            blank(&mut bare, idx..end);
            idx = end;
        } else if bytes[idx] == b'"' {
            let mut end = idx + 1;
            while end < bytes.len() && bytes[end] != b'"' {
                end += if bytes[end] == b'\\' { 2 } else { 1 };
            }
            let end = (end + 1).min(bytes.len());
            blank(&mut bare, idx..end);
            idx = end;
        } else if let Some(end) = (bytes[idx] == b'\'')
            .then(|| char_literal_end(text, idx))
            .flatten()
        {
            blank(&mut bare, idx..end);
            idx = end;
        } else {
            idx += 1;
        }
    }
    (code, bare)
}

/// The end of the bracketed group (`(…)`, `[…]` or `{…}`) opening at `open`, in text whose
/// literals are blanked.
fn group_end(bare: &[u8], open: usize) -> usize {
    let mut depth = 0_usize;
    for (idx, &byte) in bare.iter().enumerate().skip(open) {
        match byte {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    return idx + 1;
                }
            }
            _ => {}
        }
    }
    bare.len()
}

/// Blanks, in `code`, every item under `#[cfg(test)]` (a `mod tests { … }`, a test-only `fn`
/// or `use`); returns the test modules that are files of their own (`#[cfg(test)] mod
/// sim_tests;`). A file under `#![cfg(test)]` is blanked whole.
fn blank_test_items(code: &mut [u8], bare: &[u8]) -> Vec<String> {
    const CFG_TEST: &[u8] = b"#[cfg(test)]";
    const CFG_TEST_INNER: &[u8] = b"#![cfg(test)]";
    if bare
        .windows(CFG_TEST_INNER.len())
        .any(|window| window == CFG_TEST_INNER)
    {
        blank(code, 0..code.len());
        return Vec::new();
    }
    let mut test_files = Vec::new();
    let mut from = 0;
    while let Some(at) = bare[from..]
        .windows(CFG_TEST.len())
        .position(|window| window == CFG_TEST)
    {
        let start = from + at;
        let mut idx = start + CFG_TEST.len();
        // Other attributes of the same item.
        loop {
            while idx < bare.len() && bare[idx].is_ascii_whitespace() {
                idx += 1;
            }
            if bare[idx..].starts_with(b"#[") {
                idx = group_end(bare, idx + 1);
            } else {
                break;
            }
        }
        // The item ends with its `;` or its block; a field, variant or argument at its `,`
        // (outside generics) or at the `}` closing what holds it.
        let item_start = idx;
        let mut end = bare.len();
        let mut n_angles = 0_usize;
        while idx < bare.len() {
            match bare[idx] {
                b';' => {
                    end = idx + 1;
                    break;
                }
                b'{' => {
                    end = group_end(bare, idx);
                    break;
                }
                b',' if n_angles == 0 => {
                    end = idx;
                    break;
                }
                b'}' => {
                    end = idx;
                    break;
                }
                b'(' | b'[' => {
                    idx = group_end(bare, idx);
                    continue;
                }
                b'<' => n_angles += 1,
                // Not the `>` of `->` or `=>`.
                b'>' if !matches!(bare[idx - 1], b'-' | b'=') => {
                    n_angles = n_angles.saturating_sub(1)
                }
                _ => {}
            }
            idx += 1;
        }
        let item = String::from_utf8_lossy(&bare[item_start..end]);
        if let Some(name) = item
            .trim()
            .strip_suffix(';')
            .and_then(|decl| decl.rsplit_once("mod "))
            .map(|(_, name)| name.trim())
            .filter(|name| name.bytes().all(is_word_byte))
        {
            test_files.push(name.to_owned());
        }
        blank(code, start..end);
        from = end.max(start + 1);
    }
    test_files
}

/// The first segments of the `crate::` paths in `code`, with their offsets: `crate::a::B`
/// names `a`, `use crate::{a, b::C}` names `a` and `b`.
fn crate_path_heads(code: &str) -> Vec<(usize, String)> {
    let leading_ident = |text: &str| -> String {
        text.trim_start()
            .chars()
            .take_while(|&c| is_word_char(c))
            .collect()
    };
    let mut heads = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        if code[..at].chars().next_back().is_some_and(is_word_char) {
            continue; // `my_crate::`
        }
        let rest = code[at + "crate::".len()..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0_usize;
            let mut part_start = 0;
            for (idx, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' | ',' if depth == 0 => {
                        heads.push((at, leading_ident(&group[part_start..idx])));
                        part_start = idx + 1;
                        if c == '}' {
                            break;
                        }
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
        } else {
            heads.push((at, leading_ident(rest)));
        }
    }
    heads.retain(|(_, head)| !head.is_empty() && head != "self");
    heads
}

/// Tokens of a `use` tree: identifiers, `::`, and single punctuation characters.
fn use_tokens(tree: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut chars = tree.char_indices().peekable();
    while let Some((idx, c)) = chars.next() {
        if c.is_whitespace() {
            continue;
        }
        if is_word_char(c) {
            let mut end = idx + c.len_utf8();
            while let Some(&(next, c)) = chars.peek().filter(|&&(_, c)| is_word_char(c)) {
                end = next + c.len_utf8();
                chars.next();
            }
            tokens.push(tree[idx..end].to_owned());
        } else if c == ':' && chars.peek().is_some_and(|&(_, c)| c == ':') {
            chars.next();
            tokens.push("::".to_owned());
        } else {
            tokens.push(c.to_string());
        }
    }
    tokens
}

/// Parses the use tree at `tokens[*pos]`, pushing (the path's first segment, the name it
/// brings in) for each leaf; globs bring in nothing known.
fn use_leaves(
    tokens: &[String],
    pos: &mut usize,
    head: Option<&str>,
    out: &mut Vec<(String, String)>,
) {
    let token = |pos: usize| tokens.get(pos).map_or("", String::as_str);
    if token(*pos) == "::" {
        *pos += 1;
    }
    if token(*pos) == "{" {
        *pos += 1;
        while !matches!(token(*pos), "}" | "") {
            let before = *pos;
            use_leaves(tokens, pos, head, out);
            if token(*pos) == "," {
                *pos += 1;
            }
            if *pos == before {
                *pos += 1; // not a use tree: skip the token
            }
        }
        *pos += 1;
        return;
    }
    let mut segments = Vec::new();
    while token(*pos).chars().next().is_some_and(is_word_char) {
        segments.push(token(*pos));
        *pos += 1;
        if token(*pos) != "::" {
            break;
        }
        *pos += 1;
        if matches!(token(*pos), "{" | "*") {
            break;
        }
    }
    let head = head.or_else(|| {
        segments
            .iter()
            .copied()
            .find(|segment| !matches!(*segment, "crate" | "self"))
    });
    match token(*pos) {
        "{" => return use_leaves(tokens, pos, head, out),
        "*" => {
            *pos += 1;
            return;
        }
        _ => {}
    }
    let mut name = segments.last().copied().unwrap_or("");
    if token(*pos) == "as" {
        name = token(*pos + 1);
        *pos += 2;
    }
    if let Some(head) = head.filter(|_| !matches!(name, "" | "self" | "_")) {
        out.push((head.to_owned(), name.to_owned()));
    }
}

/// The names the crate root's `use` items bring into `crate::` from the crate's own modules
/// (`pub use client::{Bind, Client}`: `Bind` and `Client` are `client`'s), so that a path
/// through a re-export (`crate::Client`) counts as naming the module.
fn root_imports(root_code: &str, modules: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut imports = BTreeMap::new();
    for (at, _) in root_code.match_indices("use ") {
        if root_code[..at]
            .chars()
            .next_back()
            .is_some_and(is_word_char)
        {
            continue;
        }
        let tree = &root_code[at + "use ".len()..];
        let tree = tree.split_once(';').map_or(tree, |(tree, _)| tree);
        let tokens = use_tokens(tree);
        let mut leaves = Vec::new();
        use_leaves(&tokens, &mut 0, None, &mut leaves);
        for (head, name) in leaves {
            if modules.contains(&head) {
                imports.insert(name, head);
            }
        }
    }
    imports
}

/// A crate's top-level modules that depend on each other in a circle. `files` are the crate's
/// sources (paths relative to `src_dir`, with `/`); a top-level module is `X.rs` or `X/**`
/// (`lib.rs` and `main.rs` are the root). Module X depends on Y when X's code, outside comments
/// and `#[cfg(test)]` items, names a path `crate::Y…` (in a `use crate::{Y, …}` group too, or
/// in a string such as serde's `deserialize_with`), or `crate::Name` for a `Name` the root
/// imports from Y. `super::` paths are not followed: in a submodule they stay inside its
/// top-level module. Reports each strongly connected component of more than one module, with
/// one cycle through it and where each of its edges is named.
fn module_cycle_violations(src_dir: &str, files: &[(String, String)]) -> Vec<String> {
    let is_root = |path: &str| matches!(path, "lib.rs" | "main.rs");
    let module_of = |path: &str| -> String {
        let first = path.split('/').next().unwrap_or(path);
        first.strip_suffix(".rs").unwrap_or(first).to_owned()
    };
    // Comments and test items blanked; the paths of test modules that are files of their own.
    let mut sources = Vec::new();
    let mut test_paths = Vec::new();
    for (path, text) in files {
        let (mut code, bare) = blank_comments_and_literals(text);
        // A file's child modules live in its directory: `a/mod.rs` and `a.rs` both hold `a/`'s.
        let dir = if is_root(path) {
            String::new()
        } else if let Some(dir) = path.strip_suffix("/mod.rs") {
            format!("{dir}/")
        } else {
            format!("{}/", path.trim_end_matches(".rs"))
        };
        for name in blank_test_items(&mut code, &bare) {
            test_paths.push(format!("{dir}{name}.rs"));
            test_paths.push(format!("{dir}{name}/"));
        }
        let code = String::from_utf8(code).expect("blanking keeps UTF-8");
        sources.push((path.as_str(), code));
    }
    // `src/bin/*` are crates of their own.
    sources.retain(|(path, _)| {
        !path.starts_with("bin/")
            && !test_paths
                .iter()
                .any(|test| path.starts_with(test.as_str()))
    });
    let modules: BTreeSet<String> = sources
        .iter()
        .filter(|(path, _)| !is_root(path))
        .map(|(path, _)| module_of(path))
        .collect();
    let imports: BTreeMap<String, String> = sources
        .iter()
        .filter(|(path, _)| is_root(path))
        .flat_map(|(_, code)| root_imports(code, &modules))
        .collect();

    // Edges, each with the first place that names it.
    let mut edges: BTreeMap<(String, String), String> = BTreeMap::new();
    for (path, code) in &sources {
        if is_root(path) {
            continue;
        }
        let from = module_of(path);
        for (at, head) in crate_path_heads(code) {
            let Some(to) = modules.get(&head).or_else(|| imports.get(&head)) else {
                continue;
            };
            if *to != from {
                let line = code[..at].matches('\n').count() + 1;
                edges
                    .entry((from.clone(), to.clone()))
                    .or_insert_with(|| format!("{src_dir}/{path}:{line} names `crate::{head}`"));
            }
        }
    }
    let successors = |module: &str| -> Vec<&String> {
        edges
            .keys()
            .filter(|(from, _)| from == module)
            .map(|(_, to)| to)
            .collect()
    };
    let reachable_from = |start: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![start.to_owned()];
        while let Some(module) = stack.pop() {
            for next in successors(&module) {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&String, BTreeSet<String>> = modules
        .iter()
        .map(|module| (module, reachable_from(module)))
        .collect();

    let mut found = Vec::new();
    let mut reported = BTreeSet::new();
    for module in &modules {
        if reported.contains(module) || !reach[module].contains(module) {
            continue;
        }
        let component: BTreeSet<&String> = modules
            .iter()
            .filter(|other| reach[module].contains(*other) && reach[*other].contains(module))
            .collect();
        reported.extend(component.iter().map(|other| (*other).clone()));
        // The shortest cycle through `module`, breadth first inside its component.
        let mut parent: BTreeMap<&String, &String> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([module]);
        'search: while let Some(at) = queue.pop_front() {
            for next in successors(at) {
                if !component.contains(next) || parent.contains_key(next) {
                    continue;
                }
                parent.insert(next, at);
                if next == module {
                    break 'search;
                }
                queue.push_back(next);
            }
        }
        let mut cycle = vec![module];
        let mut at = parent[module];
        while at != module {
            cycle.push(at);
            at = parent[at];
        }
        cycle.push(module);
        cycle.reverse();
        let names: Vec<&str> = cycle.iter().map(|module| module.as_str()).collect();
        let evidence: Vec<&str> = cycle
            .windows(2)
            .map(|pair| edges[&(pair[0].clone(), pair[1].clone())].as_str())
            .collect();
        let mut violation = format!(
            "{src_dir}: modules {} ({})",
            names.join(" -> "),
            evidence.join("; ")
        );
        if component.len() + 1 > cycle.len() {
            let members: Vec<&str> = component.iter().map(|module| module.as_str()).collect();
            violation.push_str(&format!("; all in one cycle: {}", members.join(", ")));
        }
        found.push(violation);
    }
    found
}

fn report(what: &str, violations: Vec<String>) {
    assert!(
        violations.is_empty(),
        "{what}:\n  {}",
        violations.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// The checks.

/// Each crate's forbidden dependencies (normal edges, transitively). The core and the protocol
/// know no runtime and no storage; the storage knows no runtime and no other Wharf crate; the
/// client knows only the protocol; the server library knows no client.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "wharf-core",
        &[
            "tokio",
            "mio",
            "socket2",
            "futures",
            "wharf-protocol",
            "wharf-storage",
            "wharf-server",
            "wharf-client",
        ],
    ),
    (
        "wharf-protocol",
        &[
            "wharf-core",
            "wharf-storage",
            "wharf-server",
            "wharf-client",
        ],
    ),
    (
        "wharf-storage",
        &[
            "tokio",
            "async-std",
            "futures",
            "wharf-core",
            "wharf-protocol",
            "wharf-server",
            "wharf-client",
        ],
    ),
    (
        "wharf-client",
        &["wharf-core", "wharf-storage", "wharf-server"],
    ),
    // The server is a library: the client, the CLI's and the load generator's dependencies
    // belong to the `wharf` binary crate.
    (
        "wharf-server",
        &["wharf-client", "hdrhistogram", "indicatif", "wharf"],
    ),
];

#[test]
fn crates_depend_only_on_the_layers_below_them() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut violations = Vec::new();
    for (krate, banned) in LAYERS {
        let out = Command::new(&cargo)
            .current_dir(root())
            .args(["tree", "-e", "normal", "--prefix", "none", "-p", krate])
            .output()
            .expect("running cargo tree");
        assert!(
            out.status.success(),
            "cargo tree -p {krate} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tree = String::from_utf8_lossy(&out.stdout);
        assert!(
            tree.lines()
                .next()
                .is_some_and(|line| line.starts_with(krate)),
            "cargo tree -p {krate} printed no tree"
        );
        violations.extend(layering_violations(krate, &tree, banned));
    }
    report("layering violated", violations);
}

#[test]
fn the_core_names_no_file_system_network_thread_or_clock() {
    let files = rust_files(&root().join("crates/wharf-core/src"));
    assert!(files.len() > 5, "found only {files:?}");
    let violations = files
        .iter()
        .flat_map(|path| sans_io_violations(&relative(path), &read(path)))
        .collect();
    report("wharf-core is sans-IO", violations);
}

#[test]
fn public_limits_live_in_limits_modules() {
    // The product's crates; the benchmark harnesses keep their own bounds beside their code.
    let violations = rust_files(&root().join("crates"))
        .iter()
        .flat_map(|path| limit_violations(&relative(path), &read(path)))
        .collect();
    report("limits outside `limits` modules", violations);
}

#[test]
fn no_test_is_ignored_and_every_should_panic_names_its_panic() {
    let files = project_files();
    assert!(files.len() > 50, "found only {} Rust files", files.len());
    let violations = files
        .iter()
        .flat_map(|path| test_attribute_violations(&relative(path), &read(path)))
        .collect();
    report("test attributes", violations);
}

#[test]
fn no_crate_has_a_cycle_among_its_top_level_modules() {
    let mut src_dirs: Vec<PathBuf> = std::fs::read_dir(root().join("crates"))
        .expect("reading crates/")
        .flatten()
        .map(|entry| entry.path().join("src"))
        .filter(|src_dir| src_dir.is_dir())
        .collect();
    src_dirs.push(root().join("bindings/python/src"));
    src_dirs.sort();
    let mut violations = Vec::new();
    let mut n_files = 0;
    for src_dir in &src_dirs {
        let files: Vec<(String, String)> = rust_files(src_dir)
            .iter()
            .map(|path| {
                let inside = path.strip_prefix(src_dir).expect("found under src/");
                (inside.to_string_lossy().replace('\\', "/"), read(path))
            })
            .collect();
        n_files += files.len();
        violations.extend(module_cycle_violations(&relative(src_dir), &files));
    }
    assert!(
        src_dirs.len() >= 7 && n_files > 50,
        "found only {n_files} files in {src_dirs:?}"
    );
    report("top-level modules in a cycle", violations);
}

/// The negative control: every checker finds a planted violation (and passes clean text).
#[test]
fn every_checker_catches_what_it_forbids() {
    let tree = "wharf-core v0.1.0 (/w/crates/wharf-core)\nbytes v1.12.0\ntokio v1.54.0\n";
    assert_eq!(
        layering_violations("wharf-core", tree, &["tokio"]),
        ["wharf-core depends on tokio"]
    );
    assert!(
        layering_violations("wharf-core", "wharf-core v0.1.0\nbytes v1\n", &["tokio"]).is_empty()
    );

    for planted in [
        "use std::fs::File;",
        "let t = std::time::Instant::now();",
        "use std::time::SystemTime;",
        "use std::{fs, io};",
        "std::thread::spawn(|| ());",
        "let s = std::net::TcpStream::connect(a);",
    ] {
        assert!(
            !sans_io_violations("core.rs", planted).is_empty(),
            "missed {planted}"
        );
    }
    for clean in [
        "// std::fs is absent on purpose",
        "let instant_ms = now_ms;",
        "struct Instants;",
        "use std::{collections::HashMap, io};",
    ] {
        assert!(
            sans_io_violations("core.rs", clean).is_empty(),
            "flagged {clean}"
        );
    }

    assert_eq!(
        limit_violations("crates/x/src/queue.rs", "pub const QUEUES_MAX: usize = 1;").len(),
        1
    );
    assert!(
        limit_violations("crates/x/src/limits.rs", "pub const QUEUES_MAX: usize = 1;").is_empty()
    );
    assert!(limit_violations("crates/x/src/queue.rs", "const BATCH_MAX: usize = 1;").is_empty());
    assert!(
        limit_violations(
            "crates/x/src/queue.rs",
            "pub const ARG_DELIVERY_LIMIT: &str = \"x-delivery-limit\";"
        )
        .is_empty()
    );

    let ignored = format!("#[{}]\nfn slow() {{}}", "ignore");
    let ignored_with_reason = format!("#[{} = \"slow\"]\nfn slow() {{}}", "ignore");
    let bare_panic = format!("#[{}]\nfn boom() {{}}", "should_panic");
    let named_panic = format!("#[{}(expected = \"boom\")]\nfn boom() {{}}", "should_panic");
    assert_eq!(test_attribute_violations("t.rs", &ignored).len(), 1);
    assert_eq!(
        test_attribute_violations("t.rs", &ignored_with_reason).len(),
        1
    );
    assert_eq!(test_attribute_violations("t.rs", &bare_panic).len(), 1);
    assert!(test_attribute_violations("t.rs", &named_panic).is_empty());

    let cycles = |files: &[(&str, &str)]| {
        let files: Vec<(String, String)> = files
            .iter()
            .map(|(path, text)| ((*path).to_owned(), (*text).to_owned()))
            .collect();
        module_cycle_violations("src", &files)
    };
    let lib = ("lib.rs", "mod a;\nmod b;\nmod c;\npub use b::B;\n");
    let a_names_b = ("a.rs", "use crate::b::B;\npub struct A;\n");
    let two_way = cycles(&[lib, a_names_b, ("b.rs", "pub struct B(pub crate::a::A);\n")]);
    assert_eq!(
        two_way,
        ["src: modules a -> b -> a (src/a.rs:1 names `crate::b`; src/b.rs:1 names `crate::a`)"]
    );
    let three_way = cycles(&[
        lib,
        a_names_b,
        ("b.rs", "pub struct B;\nfn f() { crate::c::g() }\n"),
        (
            "c.rs",
            "pub fn g() {}\nstatic A: crate::a::A = crate::a::A;\n",
        ),
    ]);
    assert_eq!(three_way.len(), 1, "{three_way:?}");
    assert!(
        three_way[0].contains("modules a -> b -> c -> a ("),
        "{three_way:?}"
    );
    // Other ways of naming a module: a group, a string (serde's `deserialize_with`), a re-export
    // of the crate root, a submodule's file, after a test-only item full of brackets.
    for b_names_a in [
        "use crate::{c, a::A};",
        "use crate::{\n    a::{self, A},\n};",
        "#[serde(deserialize_with = \"crate::a::bounded\")]\nstruct B;",
        "#[cfg(test)]\nfn braces() -> &'static str { \"}}\" }\nfn f(_: crate::a::A) {}",
        "enum E {\n    #[cfg(test)]\n    T(Vec<u8>),\n}\nfn f(_: crate::a::A) {}",
        "fn g(#[cfg(test)] t: u8, u: u8) {}\nfn f(_: crate::a::A) {}",
    ] {
        let found = cycles(&[
            lib,
            a_names_b,
            ("b/mod.rs", "mod inner;"),
            ("b/inner.rs", b_names_a),
        ]);
        assert_eq!(found.len(), 1, "missed {b_names_a:?}");
    }
    let through_reexport = cycles(&[
        lib,
        ("a.rs", "pub struct A(crate::B);\n"),
        ("b.rs", "use crate::a;\n"),
    ]);
    assert_eq!(through_reexport.len(), 1, "{through_reexport:?}");
    // Not a dependency: comments, test code (inline or a file of its own), `super::`, another
    // crate's `crate::`.
    for b_names_a in [
        "// crate::a::A",
        "/// See [`A`](crate::a::A).\nstruct B;",
        "/* crate::a /* nested */ crate::a */",
        "let url = \"http://x\"; // crate::a",
        "#[cfg(test)]\nmod tests {\n    use crate::a::A;\n}",
        "use super::inner;",
        "use my_crate::a::A;",
    ] {
        let found = cycles(&[
            lib,
            a_names_b,
            ("b.rs", b_names_a),
            ("b/inner.rs", "use super::B;"),
        ]);
        assert!(found.is_empty(), "flagged {b_names_a:?}: {found:?}");
    }
    let test_file = cycles(&[
        lib,
        a_names_b,
        ("b.rs", "#[cfg(test)]\nmod tests;\n"),
        ("b/tests.rs", "use crate::a::A;\n"),
    ]);
    assert!(test_file.is_empty(), "{test_file:?}");
}
