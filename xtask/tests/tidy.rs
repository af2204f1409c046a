//! The tidy test: the habits docs/ARCHITECTURE.md and ../shared/STYLE.md claim, checked on
//! every `cargo xtask test` (as rust-analyzer's `tidy.rs` does). One place for all of them:
//!
//! - crate layering (what each crate must never depend on, from `cargo tree`);
//! - the core is sans-IO: no file system, network, threads or clocks in `wharf-core/src`;
//! - public limits (`pub const *_MAX | *_MIN | *_LIMIT`) of the crates under `crates/` live in
//!   their `limits` module;
//! - no `#[ignore]`d test, and every `should_panic` names the panic it expects.
//!
//! Each checker is a function over text, and `every_checker_catches_what_it_forbids` feeds
//! each one a violation, so a checker that stops finding anything fails here too.

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
}
