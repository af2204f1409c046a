//! Shared helpers for the criterion benches, and the loopback latency floor
//! (`cargo run --release -p wharf-benches --bin loopback-floor`).

pub mod floor;
