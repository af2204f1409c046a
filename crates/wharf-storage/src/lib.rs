//! Wharf's segmented write-ahead log.
//!
//! Records are appended in batches to segment files in one directory, each framed with its
//! length and a CRC32C (format and recovery rules: `docs/storage.md`). A dedicated writer
//! thread commits everything submitted while the previous fsync was in flight with one write
//! and one fsync (group commit), then runs each batch's completion callback. The crate knows
//! no async runtime: the server bridges completions to a oneshot.
//!
//! ```
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use wharf_storage::{Lsn, MemStorage, Wal, WalConfig};
//!
//! // FileStorage in production; MemStorage simulates power loss in tests.
//! let storage = Arc::new(MemStorage::new(1));
//! let (wal, report) = Wal::open(storage, "/data/wal", WalConfig::default())?;
//! assert!(report.truncated.is_none());
//! // Replay what survived (empty here) to rebuild state.
//! for record in wal.records(wal.first_lsn()) {
//!     let (_lsn, _payload) = record?;
//! }
//! // Append; the callback runs once the batch is fsynced (SyncPolicy::Always).
//! let (tx, rx) = std::sync::mpsc::channel();
//! wal.append(vec![Bytes::from_static(b"m1"), Bytes::from_static(b"m2")], Box::new(move |outcome| {
//!     let _ = tx.send(outcome);
//! }));
//! let committed = rx.recv().unwrap()?;
//! assert!(committed.is_durable());
//! assert_eq!(wal.read(committed.lsns[1])?, Bytes::from_static(b"m2"));
//! // The owner releases records it no longer needs; dead segments are deleted.
//! for lsn in committed.lsns {
//!     wal.release(lsn)?;
//! }
//! # let _ = Lsn(0);
//! # Ok::<(), wharf_storage::WalError>(())
//! ```

mod error;
mod format;
pub mod limits;
mod mem;
// The damage-then-recover checker of the `wal_recover` fuzz target and tests/recover_damage.rs:
// test support, compiled only for them (the crate's own tests enable the feature too).
#[cfg(any(test, feature = "recovery-check"))]
#[doc(hidden)]
pub mod recovery_check;
mod storage;
mod wal;

pub use error::WalError;
pub use format::{
    Damage, FORMAT_VERSION, Lsn, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN, SEGMENT_MAGIC,
};
pub use mem::{Fault, MemStorage, SECTOR_BYTES, SplitMix64};
pub use storage::{FileStorage, Storage, StorageFile};
pub use wal::{
    Committed, Completion, Leader, ParseSyncPolicyError, Records, RecoveryReport, SyncCoverage,
    SyncPolicy, Truncation, Wal, WalConfig, WalStats,
};

#[cfg(test)]
mod sim_tests;
