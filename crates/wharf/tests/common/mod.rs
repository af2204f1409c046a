//! Shared helpers for the `wharf` binary's tests: the server crate's in-process test broker
//! and raw protocol peer (`crates/wharf-server/tests/common`, compiled in here rather than
//! copied), and (in [`process`]) the real `wharf serve` process for tests that kill it.
#![allow(dead_code)]

#[path = "../../../wharf-server/tests/common/mod.rs"]
mod server;

pub mod process;

pub use server::*;
