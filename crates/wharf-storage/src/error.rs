//! The crate's single error type.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::Lsn;
use crate::format::Damage;

/// Everything that can go wrong in the write-ahead log.
///
/// `segment` is always the segment's base LSN, which is also its file name
/// (`{segment:020}.wal`); `offset` is a byte offset inside that file.
/// I/O sources are shared (`Arc`) because one failed write or fsync fails every submission
/// of the group it carried.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum WalError {
    /// The file system is out of space (`io::ErrorKind::StorageFull`). The append was refused,
    /// the segment was truncated back to its last good length, and later appends are accepted
    /// again once space returns.
    #[error("storage full appending to segment {segment} at offset {offset}")]
    StorageFull {
        /// Base LSN of the segment written to.
        segment: u64,
        /// File offset of the refused write.
        offset: u64,
        /// The underlying error.
        #[source]
        source: Arc<io::Error>,
    },
    /// An fsync failed. Fail-stop: the WAL is poisoned and every later append fails too,
    /// because after a failed fsync the kernel may have dropped the dirty pages (fsyncgate).
    #[error("fsync failed on segment {segment}; the WAL is poisoned")]
    SyncFailed {
        /// Base LSN of the segment (or directory, for a directory fsync) being synced.
        segment: u64,
        /// The underlying error.
        #[source]
        source: Arc<io::Error>,
    },
    /// An earlier fsync or write failure poisoned the WAL; reopen it (which runs recovery).
    #[error("the WAL is poisoned by an earlier failure ({reason}); reopen to recover")]
    Poisoned {
        /// The failure that poisoned the WAL.
        reason: String,
    },
    /// Any other I/O error.
    #[error("I/O error during {op} on segment {segment} at offset {offset}")]
    Io {
        /// What the WAL was doing.
        op: &'static str,
        /// Base LSN of the segment concerned (0 when none).
        segment: u64,
        /// File offset concerned (0 when none).
        offset: u64,
        /// The underlying error.
        #[source]
        source: Arc<io::Error>,
    },
    /// A record or header failed verification where damage cannot be a torn tail: in an earlier
    /// segment, or followed by records that were written after it had been fsynced.
    /// The WAL refuses to open rather than skip data.
    #[error("corrupt log: segment {segment} ({path}) at offset {offset}: {damage}")]
    Corrupt {
        /// Base LSN of the damaged segment.
        segment: u64,
        /// Path of the damaged segment file.
        path: PathBuf,
        /// File offset of the first damaged byte range (a record or the segment header).
        offset: u64,
        /// What is wrong there.
        damage: Damage,
    },
    /// A record payload is larger than the limit for this configuration.
    #[error("record of {bytes} bytes exceeds the limit of {limit} bytes")]
    RecordTooLarge {
        /// Payload size.
        bytes: u64,
        /// Limit in force.
        limit: u64,
    },
    /// A batch does not fit in one segment, or has too many records.
    #[error("batch of {records} records / {bytes} bytes exceeds a limit")]
    BatchTooLarge {
        /// Records in the batch.
        records: usize,
        /// Framed bytes of the batch.
        bytes: u64,
    },
    /// The batch has no records.
    #[error("empty batch")]
    EmptyBatch,
    /// Too many bytes are queued for the writer; retry later (backpressure).
    #[error("{pending_bytes} bytes already queued for the writer (limit {limit})")]
    Overloaded {
        /// Bytes queued now.
        pending_bytes: u64,
        /// The configured bound.
        limit: u64,
    },
    /// The LSN does not name a record the WAL holds.
    #[error("no record at LSN {lsn}")]
    UnknownLsn {
        /// The LSN asked for.
        lsn: Lsn,
    },
    /// The record was already released.
    #[error("record at LSN {lsn} was already released")]
    AlreadyReleased {
        /// The LSN released twice.
        lsn: Lsn,
    },
    /// The configuration is invalid.
    #[error("invalid WAL configuration: {reason}")]
    InvalidConfig {
        /// Which rule was broken.
        reason: &'static str,
    },
    /// The WAL was closed.
    #[error("the WAL is closed")]
    Closed,
}

impl WalError {
    pub(crate) fn io(op: &'static str, segment: u64, offset: u64, source: io::Error) -> Self {
        WalError::Io {
            op,
            segment,
            offset,
            source: Arc::new(source),
        }
    }
}
