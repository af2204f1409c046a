//! Shared helpers for the `wharf` binary's tests: the server crate's in-process test broker
//! and raw protocol peer (`crates/wharf-server/tests/common`, compiled in here rather than
//! copied), and (in [`process`]) the real `wharf serve` process for tests that kill it.
#![allow(dead_code)]

#[path = "../../../wharf-server/tests/common/mod.rs"]
mod server;

pub mod process;

pub use server::*;
use std::process::{Command, Output};

/// Runs `wharf ARGS --server SERVER`.
pub fn online(args: &[&str], server: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(args)
        .args(["--server", server])
        .output()
        .expect("run wharf")
}

/// The output's stdout as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Asserts the command succeeded.
pub fn assert_success(output: &Output) {
    assert!(output.status.success(), "{output:?}");
}

/// Asserts the command exited with `code` and said `stderr_contains` on stderr.
pub fn assert_exit(output: &Output, code: i32, stderr_contains: &str) {
    assert_eq!(output.status.code(), Some(code), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(stderr_contains),
        "expected {stderr_contains:?} in {output:?}"
    );
}
