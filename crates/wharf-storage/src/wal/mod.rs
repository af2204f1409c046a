//! The write-ahead log: the public [`Wal`] API, its configuration and report types, and the
//! state every part shares (the segment index, `WalShared`).
//!
//! Threads: callers submit batches from any thread through a `Mutex` + `Condvar` queue. One
//! *committer* at a time holds the `Tail` of the log, the active segment being appended to
//! (the `busy` flag of the queue is the token; the tail itself sits behind an uncontended
//! mutex): either the dedicated *writer thread* (group commits, interval fsyncs, rollover,
//! segment deletion) or a *leader*, a caller that announced with [`Wal::lead`] that it will
//! commit the queue on its own thread once it has released its own locks, so an append to an
//! idle log costs no thread hand-off. Readers and `release` only take the short index lock.
//!
//! The parts: `commit` (the queue, the tail, the writer thread, leaders: group commit and
//! rollover), `gc` (releasing records, deleting dead segments, rolling a dead active segment),
//! `read` (random and sequential reads: the cursor and [`Records`]), `recover` (opening: the
//! recovery rules of docs/storage.md).

mod commit;
mod gc;
mod read;
mod recover;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;

use crate::error::WalError;
use crate::format::{Damage, Lsn, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use crate::limits::{
    BATCH_RECORDS_MAX, PENDING_BYTES_MAX_DEFAULT, RECORD_BYTES_MAX, SEGMENT_BYTES_DEFAULT,
    SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN,
};
use crate::storage::{Storage, StorageFile};

pub use commit::Leader;
pub use read::Records;
pub(crate) use recover::recover;

use commit::{Queue, Submission, Tail};

/// When an append is fsynced relative to its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncPolicy {
    /// Complete an append only after the fsync covering it (group commit shares one fsync
    /// among every append that arrived while the previous fsync was in flight). The only
    /// policy under which a completion means "survives power loss".
    #[default]
    Always,
    /// Complete after the write; fsync at most this long afterwards. A power loss may lose
    /// the last interval of completed appends. Watch [`Wal::durable_lsn`] to learn coverage.
    Interval(Duration),
    /// Never fsync except at rollover and close. **Unsafe**: a power loss may lose any
    /// number of completed appends. For tests and throw-away data only.
    Never,
}

/// `always`, `never` or `interval=MS` (MS ≥ 1): the form configuration files and flags use.
impl std::str::FromStr for SyncPolicy {
    type Err = ParseSyncPolicyError;

    fn from_str(text: &str) -> Result<SyncPolicy, ParseSyncPolicyError> {
        match text {
            "always" => Ok(SyncPolicy::Always),
            "never" => Ok(SyncPolicy::Never),
            other => match other.strip_prefix("interval=").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms > 0 => Ok(SyncPolicy::Interval(Duration::from_millis(ms))),
                _ => Err(ParseSyncPolicyError {
                    text: other.to_owned(),
                }),
            },
        }
    }
}

/// The form [`SyncPolicy::from_str`](std::str::FromStr) reads.
impl fmt::Display for SyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyncPolicy::Always => f.write_str("always"),
            SyncPolicy::Interval(interval) => write!(f, "interval={}", interval.as_millis()),
            SyncPolicy::Never => f.write_str("never"),
        }
    }
}

/// A sync policy that is not `always`, `never` or `interval=MS` with MS ≥ 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sync policy must be always, never or interval=MS (MS >= 1), not {text:?}")]
pub struct ParseSyncPolicyError {
    /// The text given.
    pub text: String,
}

/// Which guarantee covered a completed append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncCoverage {
    /// An fsync covering the records returned before the completion ran.
    Fsynced,
    /// Written, to be fsynced within the [`SyncPolicy::Interval`]; not yet durable.
    IntervalPending,
    /// Written, never explicitly fsynced ([`SyncPolicy::Never`]); not durable.
    Unsynced,
}

/// A successful append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The LSN of each record of the batch, in submission order.
    pub lsns: Vec<Lsn>,
    /// The LSN just past the batch.
    pub end: Lsn,
    /// Whether the records were fsynced before this completion.
    pub coverage: SyncCoverage,
}

impl Committed {
    /// True if the records survive a power loss (they were fsynced).
    pub fn is_durable(&self) -> bool {
        self.coverage == SyncCoverage::Fsynced
    }
}

/// Callback receiving the outcome of one submitted batch. It runs on the committing thread:
/// the writer thread, or the thread of a [`Leader`] (or the caller's thread if the append is
/// refused up front): keep it short, e.g. send on a channel or complete a
/// `tokio::sync::oneshot`. It must not block on the WAL itself ([`Wal::append_wait`],
/// [`Wal::quiesce`]): the committer would wait on itself.
pub type Completion = Box<dyn FnOnce(Result<Committed, WalError>) + Send + 'static>;

/// Test-only switches that break the WAL on purpose, for the harnesses' negative controls.
#[cfg(test)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TestHooks {
    /// Report appends as fsynced without calling fsync.
    pub skip_fsync: bool,
    /// Accept records without verifying their CRC during recovery.
    pub skip_crc: bool,
}

/// WAL configuration. Start from [`WalConfig::default`] and override fields.
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// Segment file size limit including its header (default 64 MiB).
    pub segment_bytes: u64,
    /// When appends are fsynced (default [`SyncPolicy::Always`]).
    pub sync_policy: SyncPolicy,
    /// The active segment is rolled (then deleted) once all its records are released and it
    /// holds at least this many bytes, so disk use returns near zero when everything is released.
    pub roll_dead_active_bytes: u64,
    /// Bound on bytes queued and not yet taken by a committer (the writer thread or a
    /// leader); beyond it appends fail with [`WalError::Overloaded`].
    pub pending_bytes_max: u64,
    #[cfg(test)]
    pub(crate) hooks: TestHooks,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            sync_policy: SyncPolicy::Always,
            roll_dead_active_bytes: 1024 * 1024,
            pending_bytes_max: PENDING_BYTES_MAX_DEFAULT,
            #[cfg(test)]
            hooks: TestHooks::default(),
        }
    }
}

impl WalConfig {
    fn validate(&self) -> Result<(), WalError> {
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&self.segment_bytes) {
            return Err(WalError::InvalidConfig {
                reason: "segment_bytes outside SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX",
            });
        }
        if let SyncPolicy::Interval(interval) = self.sync_policy
            && interval.is_zero()
        {
            return Err(WalError::InvalidConfig {
                reason: "sync interval must be positive",
            });
        }
        Ok(())
    }

    /// Bytes available for records in one segment.
    fn records_area(&self) -> u64 {
        self.segment_bytes - SEGMENT_HEADER_LEN
    }

    /// Largest payload a record may have under this configuration.
    pub fn record_bytes_max(&self) -> u64 {
        u64::from(RECORD_BYTES_MAX).min(self.records_area() - RECORD_HEADER_LEN)
    }
}

/// A torn tail removed by recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// Base LSN of the (last) segment that was cut.
    pub segment: u64,
    /// Path of that segment file.
    pub path: PathBuf,
    /// File offset the segment was cut at: the start of the first bad record.
    pub offset: u64,
    /// Bytes removed.
    pub bytes_dropped: u64,
    /// What was wrong with the first removed record.
    pub damage: Damage,
}

/// What recovery found and did when opening the WAL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files found (after recovery).
    pub segments: usize,
    /// Valid records found, including originals superseded by a compaction copy.
    pub records: u64,
    /// Records skipped because a copy of them with their origin LSN survived (their copies
    /// are yielded). Only logs written before compaction was removed (docs/storage.md) hold
    /// such copies; the WAL no longer writes them.
    pub superseded: u64,
    /// The LSN the next append gets.
    pub end_lsn: Lsn,
    /// The torn tail cut from the last segment, if any.
    pub truncated: Option<Truncation>,
    /// Base LSN of a last segment whose header was torn (crash during rollover) and rewritten.
    pub rewrote_segment_header: Option<u64>,
}

/// Counters of the WAL's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalStats {
    /// Segment files.
    pub segments: usize,
    /// Bytes in segment files, headers included.
    pub disk_bytes: u64,
    /// Records not yet released.
    pub live_records: u64,
    /// The LSN the next append gets.
    pub end_lsn: Lsn,
    /// Everything below this LSN is fsynced.
    pub durable_lsn: Lsn,
    /// Groups committed by leaders on their own threads ([`Wal::lead`]) since open.
    pub leader_commits: u64,
    /// Groups committed by the writer thread since open.
    pub writer_commits: u64,
}

/// One segment file and the live count of its records.
struct Segment {
    base: u64,
    path: PathBuf,
    file: Arc<dyn StorageFile>,
    /// LSN just past the last written record.
    end: u64,
    n_records: u64,
    n_live: u64,
    released: HashSet<u64>,
}

impl Segment {
    fn contains(&self, lsn: u64) -> bool {
        lsn >= self.base && lsn < self.end
    }

    fn disk_bytes(&self) -> u64 {
        SEGMENT_HEADER_LEN + (self.end - self.base)
    }

    /// Marks the record at `lsn` (in this segment) dead; false if it already was.
    fn release(&mut self, lsn: u64) -> bool {
        if !self.released.insert(lsn) {
            return false;
        }
        assert!(
            self.n_live > 0,
            "live count underflow in segment {}",
            self.base
        );
        self.n_live -= 1;
        true
    }
}

/// Every segment on disk, by base LSN: the state readers, `release` and committers share.
struct Index {
    segments: BTreeMap<u64, Segment>,
    active: u64,
    /// Originals found at recovery whose compaction copies also survived (logs written before
    /// compaction was removed): they count as released and are never yielded.
    superseded: HashSet<u64>,
}

impl Index {
    fn segment_of(&self, lsn: u64) -> Option<&Segment> {
        self.segments
            .range(..=lsn)
            .next_back()
            .map(|(_, segment)| segment)
            .filter(|s| s.contains(lsn))
    }

    fn segment_of_mut(&mut self, lsn: u64) -> Option<&mut Segment> {
        self.segments
            .range_mut(..=lsn)
            .next_back()
            .map(|(_, segment)| segment)
            .filter(|s| s.contains(lsn))
    }
}

/// What the [`Wal`] handle, its leaders, the tail and the writer thread share.
struct WalShared {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    config: WalConfig,
    index: Mutex<Index>,
    queue: Mutex<Queue>,
    /// Wakes the writer thread (only the writer thread waits on it).
    wake: Condvar,
    /// Wakes [`Wal::quiesce`] callers when a committer goes idle.
    idle: Condvar,
    poisoned: AtomicBool,
    poison_reason: Mutex<Option<String>>,
    durable_lsn: AtomicU64,
    leader_commits: AtomicU64,
    writer_commits: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not cascade into every caller; the data is still consistent
    // because every critical section is a few field updates.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl WalShared {
    fn poison(&self, reason: String) {
        tracing::error!(%reason, "WAL poisoned: refusing all further appends (fail-stop)");
        let mut slot = lock(&self.poison_reason);
        if slot.is_none() {
            *slot = Some(reason);
        }
        self.poisoned.store(true, Ordering::SeqCst);
    }

    fn poisoned_error(&self) -> WalError {
        WalError::Poisoned {
            reason: lock(&self.poison_reason).clone().unwrap_or_default(),
        }
    }

    fn segment_path(&self, base: u64) -> PathBuf {
        segment_path(&self.dir, base)
    }
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.wal"))
}

/// The segmented write-ahead log. `Send + Sync`: share it in an `Arc`.
///
/// See the crate documentation for a usage example and docs/storage.md for the format.
pub struct Wal {
    shared: Arc<WalShared>,
    /// The tail: locked by whoever holds the queue's `busy` token.
    tail: Arc<Mutex<Tail>>,
    /// Joined by [`Wal::close`].
    writer_thread: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for Wal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.shared.dir)
            .field("config", &self.shared.config)
            .finish()
    }
}

impl Wal {
    /// Opens (or creates) the log in `dir`, running recovery: every segment is read in order
    /// and every record's CRC verified. A torn tail of the last segment is cut and reported;
    /// damage anywhere else fails with [`WalError::Corrupt`]. Then the writer thread starts.
    ///
    /// Replay the surviving records with [`Wal::records`] (from [`Wal::first_lsn`]).
    pub fn open(
        storage: Arc<dyn Storage>,
        dir: impl Into<PathBuf>,
        config: WalConfig,
    ) -> Result<(Wal, RecoveryReport), WalError> {
        config.validate()?;
        let dir = dir.into();
        let recovered = recover(storage.as_ref(), &dir, &config)?;
        let report = recovered.report.clone();
        let shared = Arc::new(WalShared {
            storage,
            dir,
            config,
            index: Mutex::new(recovered.index),
            queue: Mutex::new(Queue {
                gc_wanted: true,
                ..Queue::default()
            }),
            wake: Condvar::new(),
            idle: Condvar::new(),
            poisoned: AtomicBool::new(false),
            poison_reason: Mutex::new(None),
            durable_lsn: AtomicU64::new(report.end_lsn.0),
            leader_commits: AtomicU64::new(0),
            writer_commits: AtomicU64::new(0),
        });
        let tail = Arc::new(Mutex::new(Tail::new(&shared, report.end_lsn.0)));
        let handle = commit::spawn_writer_thread(&shared, &tail)?;
        Ok((
            Wal {
                shared,
                tail,
                writer_thread: Mutex::new(Some(handle)),
            },
            report,
        ))
    }

    /// Submits a batch: its records are framed and written with one write, contiguously, in
    /// order, and `done` runs once the batch is covered by the [`SyncPolicy`] (or failed).
    /// Batches submitted concurrently are committed in submission order and share fsyncs.
    pub fn append(&self, records: Vec<Bytes>, done: Completion) {
        self.append_with(records, self.shared.config.sync_policy, done);
    }

    /// Like [`Wal::append`], with this batch's own sync need instead of the configured
    /// policy: `Always` completes it after an fsync covering it (under any configured policy),
    /// `Interval(d)` after the write with an fsync within `d`, `Never` after the write. A group
    /// is fsynced if any of its batches needs it, and then every batch of the group completes
    /// as [`SyncCoverage::Fsynced`]: the coverage reports what happened, never less.
    pub fn append_with(&self, records: Vec<Bytes>, sync: SyncPolicy, done: Completion) {
        match self.admit(&records) {
            Ok(framed_bytes) => {
                let mut queue = lock(&self.shared.queue);
                if queue.shutdown {
                    drop(queue);
                    done(Err(WalError::Closed));
                    return;
                }
                let limit = self.shared.config.pending_bytes_max;
                if queue.pending_bytes > 0 && queue.pending_bytes + framed_bytes > limit {
                    let pending_bytes = queue.pending_bytes;
                    drop(queue);
                    done(Err(WalError::Overloaded {
                        pending_bytes,
                        limit,
                    }));
                    return;
                }
                queue.pending_bytes += framed_bytes;
                queue.pending.push_back(Submission {
                    records,
                    framed_bytes,
                    sync,
                    done,
                });
                // An announced leader commits it (or wakes the writer thread): no wake-up here.
                let wake = queue.leaders == 0;
                drop(queue);
                if wake {
                    self.shared.wake.notify_one();
                }
            }
            Err(error) => done(Err(error)),
        }
    }

    /// Announces a leader: the calling thread promises to call [`Leader::commit`] soon (after
    /// releasing its own locks), so until then [`Wal::append`] does not wake the writer thread.
    /// If no commit is in flight then, the leader writes and fsyncs the queued batches itself
    /// and runs their completions on its thread: an append to an idle log pays no thread
    /// hand-off. If a commit is in flight, the batches join the next group as usual.
    ///
    /// Only under [`SyncPolicy::Always`]; under the other policies the returned leader does
    /// nothing (the writer thread owns the interval fsync and does all the writing).
    /// Dropping the leader without committing hands the work to the writer thread.
    pub fn lead(&self) -> Leader {
        let armed = self.shared.config.sync_policy == SyncPolicy::Always;
        if armed {
            lock(&self.shared.queue).leaders += 1;
        }
        Leader::new(&self.shared, &self.tail, armed)
    }

    /// [`Wal::append`] that blocks the calling thread until the outcome is known.
    /// Not for async contexts: bridge [`Wal::append`] to a oneshot there.
    pub fn append_wait(&self, records: Vec<Bytes>) -> Result<Committed, WalError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.append(
            records,
            Box::new(move |outcome| {
                let _ = tx.send(outcome);
            }),
        );
        rx.recv().unwrap_or(Err(WalError::Closed))
    }

    fn admit(&self, records: &[Bytes]) -> Result<u64, WalError> {
        if self.shared.poisoned.load(Ordering::SeqCst) {
            return Err(self.shared.poisoned_error());
        }
        if records.is_empty() {
            return Err(WalError::EmptyBatch);
        }
        let config = &self.shared.config;
        let mut framed_bytes = 0u64;
        for record in records {
            let bytes = record.len() as u64;
            if bytes > config.record_bytes_max() {
                return Err(WalError::RecordTooLarge {
                    bytes,
                    limit: config.record_bytes_max(),
                });
            }
            framed_bytes += RECORD_HEADER_LEN + bytes;
        }
        if records.len() > BATCH_RECORDS_MAX || framed_bytes > config.records_area() {
            return Err(WalError::BatchTooLarge {
                records: records.len(),
                bytes: framed_bytes,
            });
        }
        Ok(framed_bytes)
    }

    /// Reads the record at `lsn` (random access: one segment lookup, two positional reads,
    /// CRC verified).
    pub fn read(&self, lsn: Lsn) -> Result<Bytes, WalError> {
        let (file, base, path) = {
            let index = lock(&self.shared.index);
            let segment = index
                .segment_of(lsn.0)
                .ok_or(WalError::UnknownLsn { lsn })?;
            (
                Arc::clone(&segment.file),
                segment.base,
                segment.path.clone(),
            )
        };
        read::read_record(file.as_ref(), base, &path, lsn)
    }

    /// Sequential reader over the records from `from` to the end written when the iterator is
    /// created. `from` must be an LSN the WAL returned (or [`Wal::first_lsn`]); reading starts
    /// directly at its position. Reads
    /// [`READ_AHEAD_BYTES`](crate::limits::READ_AHEAD_BYTES) at a time.
    /// Yields released records too, but not originals superseded by surviving compaction
    /// copies (logs written before compaction was removed): right after [`Wal::open`],
    /// `records(first_lsn())` is the recovery replay.
    pub fn records(&self, from: Lsn) -> Records {
        Records::new(&lock(&self.shared.index), from.0)
    }

    /// LSN of the oldest record still on disk.
    pub fn first_lsn(&self) -> Lsn {
        let index = lock(&self.shared.index);
        Lsn(*index
            .segments
            .keys()
            .next()
            .expect("there is always an active segment"))
    }

    /// Everything below this LSN is fsynced (survives power loss).
    pub fn durable_lsn(&self) -> Lsn {
        Lsn(self.shared.durable_lsn.load(Ordering::SeqCst))
    }

    /// Marks the record at `lsn` dead. When every record of a sealed segment is dead the
    /// segment file is deleted, on the writer thread, not in this call.
    /// Releases are not persisted: after a restart every surviving record is live again.
    pub fn release(&self, lsn: Lsn) -> Result<(), WalError> {
        let wake =
            lock(&self.shared.index).release(lsn, self.shared.config.roll_dead_active_bytes)?;
        if wake {
            lock(&self.shared.queue).gc_wanted = true;
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// Current counters.
    pub fn stats(&self) -> WalStats {
        let index = lock(&self.shared.index);
        WalStats {
            segments: index.segments.len(),
            disk_bytes: index.segments.values().map(Segment::disk_bytes).sum(),
            live_records: index.segments.values().map(|segment| segment.n_live).sum(),
            end_lsn: Lsn(index.segments[&index.active].end),
            durable_lsn: self.durable_lsn(),
            leader_commits: self.shared.leader_commits.load(Ordering::Relaxed),
            writer_commits: self.shared.writer_commits.load(Ordering::Relaxed),
        }
    }

    /// True once an fsync (or write) failure has poisoned the WAL.
    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::SeqCst)
    }

    /// Blocks until nothing is queued, no commit is in flight and no GC work is pending
    /// (tests, shutdown).
    pub fn quiesce(&self) {
        let mut queue = lock(&self.shared.queue);
        queue.quiescers += 1;
        // Batches an announced leader has not committed yet are the writer thread's now.
        self.shared.wake.notify_one();
        while (!queue.pending.is_empty() || queue.gc_wanted || queue.busy) && !queue.shutdown {
            queue = self
                .shared
                .idle
                .wait(queue)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        queue.quiescers -= 1;
    }

    /// Commits everything queued, fsyncs, and stops the writer thread. Also run by `Drop`.
    pub fn close(&self) {
        let leading_here = {
            let mut queue = lock(&self.shared.queue);
            queue.shutdown = true;
            queue.leader == Some(std::thread::current().id())
        };
        self.shared.wake.notify_all();
        self.shared.idle.notify_all();
        let mut writer_thread = lock(&self.writer_thread);
        // The last reference can be dropped inside a completion, i.e. on the writer thread
        // itself or on a leader's thread while it holds the tail: joining the writer thread
        // there would wait on ourselves. It has been told to shut down and exits once the
        // completion returns and the tail is free.
        if leading_here
            || writer_thread
                .as_ref()
                .is_some_and(|handle| handle.thread().id() == std::thread::current().id())
        {
            return;
        }
        if let Some(handle) = writer_thread.take() {
            drop(writer_thread);
            let _ = handle.join();
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.close();
    }
}

/// A configuration for tests: `segment_bytes`, and a dead active segment is rolled at once.
#[cfg(test)]
pub(crate) fn test_config(segment_bytes: u64) -> WalConfig {
    WalConfig {
        segment_bytes,
        roll_dead_active_bytes: 1,
        ..WalConfig::default()
    }
}
