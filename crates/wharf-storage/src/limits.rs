//! Every limit of the log in one place, each with the reason it exists.
//!
//! The server configuration may lower the configurable ones ([`crate::WalConfig`]); the
//! format limits are fixed because recovery must be able to read what any writer produced.

/// Largest record payload: one message body plus broker metadata; also bounds the buffer a
/// reader allocates from a length field it has not yet verified.
pub const RECORD_BYTES_MAX: u32 = 16 * 1024 * 1024;

/// Most records in one submitted batch: bounds the per-batch LSN vector handed back to the caller.
pub const BATCH_RECORDS_MAX: usize = 65_536;

/// Most bytes the writer thread gathers into one group-commit write: bounds its memory and the
/// latency a single write adds to everyone in the group.
pub const GROUP_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Most bytes a leader ([`crate::Wal::lead`]) commits on its own thread: leaders are often an
/// async runtime's workers, which must not be held up writing a checkpoint; a larger group
/// (or a larger first batch) is left to the writer thread.
pub const LEADER_GROUP_BYTES_MAX: usize = 1024 * 1024;

/// Smallest segment: room for the segment header and a few small records, so rollover logic
/// is exercised by tests without degenerate one-record segments.
pub const SEGMENT_BYTES_MIN: u64 = 4 * 1024;

/// Largest segment: recovery holds the damaged tail of the last segment in memory to look for
/// valid records after the damage.
pub const SEGMENT_BYTES_MAX: u64 = 1024 * 1024 * 1024;

/// Default segment size: large enough that create + directory fsync on rollover is rare,
/// small enough that a few long-lived records pin little dead data (a segment is deleted only
/// once all its records are released).
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

/// Chunk size of sequential reads (recovery and [`crate::Wal::records`]): large reads let the
/// kernel read ahead and keep syscalls per record low.
pub const READ_AHEAD_BYTES: usize = 1024 * 1024;

/// Default bound on bytes queued for the writer thread and not yet written: backpressure
/// instead of unbounded memory when the disk is slower than the publishers.
pub const PENDING_BYTES_MAX_DEFAULT: u64 = 256 * 1024 * 1024;
