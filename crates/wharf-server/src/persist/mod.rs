//! Persistence: what the broker writes to its write-ahead log, and how it rebuilds itself.
//!
//! - [`record`]: the log's operations and records (the on-disk format of the broker's payloads,
//!   frozen by golden bytes), and their packing into records no larger than the WAL takes;
//! - [`journal`]: the log at run time ([`journal::Log`]): appends a command batch's operations
//!   in as many records and submissions as it needs, tracks which records each checkpoint
//!   supersedes, releases them, classifies failures (fail-stop, disk full);
//! - [`checkpoint`]: capturing the live state under the broker lock and streaming it in
//!   bounded chunks from a thread; the end only once everything before it is durable;
//! - [`replay`]: recovery, streamed from the WAL: the last complete checkpoint, then the
//!   batches after its begin; a split batch only whole; a change that no longer applies stops
//!   the broker;
//! - [`spool`]: the spool files of queues larger than memory (not durable: the log is).
//!
//! See docs/durability.md for what a confirm promises.

pub mod checkpoint;
pub mod journal;
pub mod record;
pub mod replay;
pub mod spool;

#[cfg(test)]
mod tests;
