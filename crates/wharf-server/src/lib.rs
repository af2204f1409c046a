//! # wharf-server: the Wharf broker
//!
//! Ties the sans-IO core (`wharf-core`) to sockets and the runtime. One mutex guards the
//! broker state and is held only while commands are applied — never across I/O. Each client
//! connection has a reader loop, which decodes every complete frame in its buffer and applies
//! them under one lock and then writes the small outputs it queued itself, and a writer task,
//! which drains the connection's [`outbox::Outbox`] of the rest into as few socket writes as
//! it can, coalescing deliveries into `DeliverBatch` frames.
//! It is a library: the `wharf` binary (crate `wharf`, `crates/wharf`) resolves a
//! [`ServerConfig`] with [`config::resolve`] and runs a [`Server`]. See docs/ARCHITECTURE.md.

pub mod access;
pub mod auth;
mod batch;
pub mod config;
mod connection;
mod context;
pub mod convert;
pub mod data_dir;
pub mod dev_ca;
pub mod limits;
pub mod outbox;
pub mod output;
pub mod persist;
pub mod resources;
mod server;
pub mod state;
pub mod transport;
mod writer;

pub use config::{LogFormat, ServerConfig};
pub use server::{RunningServer, Server, ShutdownHandle};
