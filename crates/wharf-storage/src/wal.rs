//! The write-ahead log: group commit (by a leader or the writer thread), recovery, reads,
//! release and GC.
//!
//! Threads: callers submit batches from any thread through a `Mutex` + `Condvar` queue. One
//! committer at a time holds the active segment's tail (the `busy` flag of the queue is the
//! token; the tail itself sits behind an uncontended mutex): either the dedicated writer thread
//! (group commits, interval fsyncs, rollover, compaction, segment deletion) or a *leader*, a
//! caller that announced with [`Wal::lead`] that it will commit the queue on its own thread
//! once it has released its own locks, so an append to an idle log costs no thread hand-off.
//! Readers and `release` only take the short index lock.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::error::WalError;
use crate::format::{
    self, Damage, Lsn, ORIGIN_NONE, RECORD_HEADER_LEN, RecordHeader, SEGMENT_HEADER_LEN,
    SegmentHeader,
};
use crate::limits::{
    BATCH_RECORDS_MAX, GROUP_BYTES_MAX, LEADER_GROUP_BYTES_MAX, PENDING_BYTES_MAX_DEFAULT,
    READ_AHEAD_BYTES, RECORD_BYTES_MAX, SEGMENT_BYTES_DEFAULT, SEGMENT_BYTES_MAX,
    SEGMENT_BYTES_MIN,
};
use crate::storage::{Storage, StorageFile};

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

/// A record moved by compaction: it now lives at `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relocation {
    /// The LSN the owner knew.
    pub from: Lsn,
    /// The record's new LSN (same payload).
    pub to: Lsn,
}

/// Called on the writer thread after compaction moved records (see [`WalConfig::on_relocate`]).
pub type RelocateHook = Arc<dyn Fn(&[Relocation]) + Send + Sync + 'static>;

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
#[derive(Clone)]
pub struct WalConfig {
    /// Segment file size limit including its header (default 64 MiB).
    pub segment_bytes: u64,
    /// When appends are fsynced (default [`SyncPolicy::Always`]).
    pub sync_policy: SyncPolicy,
    /// A sealed segment whose live records fall below this fraction of its records is
    /// compacted: live records are re-appended and the segment deleted. 0 disables compaction.
    pub compact_live_ratio: f64,
    /// The active segment is rolled (then deleted) once all its records are released and it
    /// holds at least this many bytes, so disk use returns near zero when everything is released.
    pub roll_dead_active_bytes: u64,
    /// Bound on bytes queued for the writer; beyond it appends fail with [`WalError::Overloaded`].
    pub pending_bytes_max: u64,
    /// Told about records moved by compaction. Optional: [`Wal::read`] and [`Wal::release`]
    /// accept the old LSN too (the WAL forwards it until the record is released).
    pub on_relocate: Option<RelocateHook>,
    #[cfg(test)]
    pub(crate) hooks: TestHooks,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            sync_policy: SyncPolicy::Always,
            compact_live_ratio: 0.25,
            roll_dead_active_bytes: 1024 * 1024,
            pending_bytes_max: PENDING_BYTES_MAX_DEFAULT,
            on_relocate: None,
            #[cfg(test)]
            hooks: TestHooks::default(),
        }
    }
}

impl fmt::Debug for WalConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WalConfig")
            .field("segment_bytes", &self.segment_bytes)
            .field("sync_policy", &self.sync_policy)
            .field("compact_live_ratio", &self.compact_live_ratio)
            .field("roll_dead_active_bytes", &self.roll_dead_active_bytes)
            .field("pending_bytes_max", &self.pending_bytes_max)
            .field("on_relocate", &self.on_relocate.is_some())
            .finish()
    }
}

impl WalConfig {
    fn validate(&self) -> Result<(), WalError> {
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&self.segment_bytes) {
            return Err(WalError::InvalidConfig {
                reason: "segment_bytes outside SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX",
            });
        }
        if !(0.0..=1.0).contains(&self.compact_live_ratio) {
            return Err(WalError::InvalidConfig {
                reason: "compact_live_ratio outside 0..=1",
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
    /// Valid records found, including copies superseded by compaction.
    pub records: u64,
    /// Records skipped because compaction had already copied them (their copies are yielded).
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
}

struct Index {
    segments: BTreeMap<u64, Segment>,
    active: u64,
    /// Old LSN → new LSN for records moved by compaction and not yet released.
    forward: HashMap<u64, u64>,
    /// New LSN → old LSN (so releasing by the new LSN drops the forwarding entry).
    reverse: HashMap<u64, u64>,
    /// Originals found at recovery whose compaction copies also survived.
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

    fn mark_released(&mut self, lsn: u64) -> bool {
        let Some(segment) = self.segment_of_mut(lsn) else {
            return false;
        };
        if !segment.released.insert(lsn) {
            return false;
        }
        assert!(
            segment.n_live > 0,
            "live count underflow in segment {}",
            segment.base
        );
        segment.n_live -= 1;
        true
    }
}

struct Submission {
    records: Vec<Bytes>,
    framed_bytes: u64,
    /// What this batch needs before its completion (see [`Wal::append_with`]).
    sync: SyncPolicy,
    done: Completion,
}

#[derive(Default)]
struct Queue {
    pending: VecDeque<Submission>,
    pending_bytes: u64,
    gc_wanted: bool,
    /// A committer (the writer thread or a leader) holds the tail and work taken from the
    /// queue. Only the holder of this flag touches the tail: it is the commit token.
    busy: bool,
    /// The thread of the leader holding `busy`, if a leader holds it.
    leader: Option<ThreadId>,
    /// Leaders announced ([`Wal::lead`]) and not yet run: while there are any, appends leave
    /// the writer thread asleep (a leader commits them or wakes the thread).
    leaders: usize,
    /// Callers blocked in [`Wal::quiesce`] (`idle` is notified only when someone waits).
    quiescers: usize,
    shutdown: bool,
    /// A leader left written data with an interval deadline: the writer thread must look at
    /// its deadline again (it owns interval fsyncs).
    deadline_moved: bool,
}

impl Queue {
    fn has_work(&self) -> bool {
        !self.pending.is_empty() || self.gc_wanted || self.shutdown
    }

    /// Takes the next group: submissions in order while their framed bytes stay within
    /// `bytes_max` (at least one).
    fn take_group(&mut self, bytes_max: u64) -> Vec<Submission> {
        let mut group = Vec::new();
        let mut group_bytes = 0u64;
        while let Some(next) = self.pending.front() {
            if !group.is_empty() && group_bytes + next.framed_bytes > bytes_max {
                break;
            }
            let submission = self.pending.pop_front().expect("front exists");
            group_bytes += submission.framed_bytes;
            self.pending_bytes -= submission.framed_bytes;
            group.push(submission);
        }
        group
    }
}

struct Shared {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    config: WalConfig,
    index: Mutex<Index>,
    queue: Mutex<Queue>,
    /// Wakes the writer thread (only the writer waits on it).
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

impl Shared {
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

    /// Ends a commit: gives the token back, wakes the writer thread if work is left (it was
    /// queued during this commit and forms the next group; the writer thread itself looks
    /// again without being woken), and wakes `quiesce` callers.
    fn release_token(&self, mut queue: MutexGuard<'_, Queue>, by_writer: bool) {
        queue.busy = false;
        queue.leader = None;
        let wake_writer = !by_writer && queue.has_work();
        let wake_quiescers = queue.quiescers > 0;
        drop(queue);
        if wake_writer {
            self.wake.notify_one();
        }
        if wake_quiescers {
            self.idle.notify_all();
        }
    }
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.wal"))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".wal")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segmented write-ahead log. `Send + Sync`: share it in an `Arc`.
///
/// See the crate documentation for a usage example and docs/storage.md for the format.
pub struct Wal {
    shared: Arc<Shared>,
    /// The tail: locked by whoever holds the queue's `busy` token.
    tail: Arc<Mutex<Writer>>,
    writer: Mutex<Option<JoinHandle<()>>>,
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
        let active = recovered.index.segments[&recovered.index.active]
            .file
            .clone();
        let shared = Arc::new(Shared {
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
        let tail = Arc::new(Mutex::new(Writer {
            shared: Arc::clone(&shared),
            active_file: active,
            active_base: report_active_base(&shared),
            write_lsn: report.end_lsn.0,
            durable_lsn: report.end_lsn.0,
            sync_due: None,
        }));
        let handle = {
            let (shared, tail) = (Arc::clone(&shared), Arc::clone(&tail));
            std::thread::Builder::new()
                .name("wharf-wal-writer".into())
                .spawn(move || run_writer(&shared, &tail))
                .map_err(|source| WalError::io("spawn writer thread", 0, 0, source))?
        };
        Ok((
            Wal {
                shared,
                tail,
                writer: Mutex::new(Some(handle)),
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
                // An announced leader commits it (or wakes the writer): no wake-up here.
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
        Leader {
            shared: Arc::clone(&self.shared),
            tail: Arc::clone(&self.tail),
            armed,
        }
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
    /// CRC verified). The old LSN of a record moved by compaction is forwarded.
    pub fn read(&self, lsn: Lsn) -> Result<Bytes, WalError> {
        let (file, base, path, target) = {
            let index = lock(&self.shared.index);
            let target = index.forward.get(&lsn.0).copied().unwrap_or(lsn.0);
            let segment = index
                .segment_of(target)
                .ok_or(WalError::UnknownLsn { lsn })?;
            (
                Arc::clone(&segment.file),
                segment.base,
                segment.path.clone(),
                target,
            )
        };
        let offset = SEGMENT_HEADER_LEN + (target - base);
        let mut header = [0u8; RECORD_HEADER_LEN as usize];
        file.read_at(offset, &mut header)
            .map_err(|source| WalError::io("read record header", base, offset, source))?;
        let parsed = RecordHeader::decode(&header);
        if parsed.lsn != target || parsed.payload_len > RECORD_BYTES_MAX {
            // Not a record boundary (a caller bug), or damage.
            return Err(WalError::UnknownLsn { lsn });
        }
        let mut framed = vec![0u8; RECORD_HEADER_LEN as usize + parsed.payload_len as usize];
        framed[..RECORD_HEADER_LEN as usize].copy_from_slice(&header);
        file.read_at(
            offset + RECORD_HEADER_LEN,
            &mut framed[RECORD_HEADER_LEN as usize..],
        )
        .map_err(|source| WalError::io("read record payload", base, offset, source))?;
        format::check_record(&framed, target, true).map_err(|damage| WalError::Corrupt {
            segment: base,
            path,
            offset,
            damage,
        })?;
        Ok(Bytes::from(framed).slice(RECORD_HEADER_LEN as usize..))
    }

    /// Sequential reader over the records from `from` to the end written when the iterator is
    /// created. `from` must be an LSN the WAL returned (or [`Wal::first_lsn`]); reading starts
    /// directly at its position. Reads [`READ_AHEAD_BYTES`] at a time.
    /// Yields released records too, but not originals superseded by surviving compaction
    /// copies: right after [`Wal::open`], `records(first_lsn())` is the recovery replay.
    pub fn records(&self, from: Lsn) -> Records {
        let index = lock(&self.shared.index);
        let from = index.forward.get(&from.0).copied().unwrap_or(from.0);
        let segments = index
            .segments
            .values()
            .filter(|segment| segment.end > from)
            .map(|segment| {
                (
                    segment.base,
                    Arc::clone(&segment.file),
                    segment.end,
                    segment.path.clone(),
                )
            })
            .collect::<VecDeque<_>>();
        Records {
            segments,
            cursor: None,
            from,
            superseded: index.superseded.clone(),
            verify_crc: true,
            failed: false,
        }
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
    /// segment file is deleted; a sparse sealed segment is compacted (see
    /// [`WalConfig::compact_live_ratio`]). Both happen on the writer thread, not in this call.
    /// Releases are not persisted: after a restart every surviving record is live again.
    pub fn release(&self, lsn: Lsn) -> Result<(), WalError> {
        let wake = {
            let mut index = lock(&self.shared.index);
            let target = match index.forward.remove(&lsn.0) {
                Some(new) => {
                    index.reverse.remove(&new);
                    new
                }
                None => {
                    if let Some(old) = index.reverse.remove(&lsn.0) {
                        index.forward.remove(&old);
                    }
                    lsn.0
                }
            };
            let active = index.active;
            let ratio = self.shared.config.compact_live_ratio;
            let roll_bytes = self.shared.config.roll_dead_active_bytes;
            let segment = index
                .segment_of_mut(target)
                .ok_or(WalError::UnknownLsn { lsn })?;
            if !segment.released.insert(target) {
                return Err(WalError::AlreadyReleased { lsn });
            }
            assert!(
                segment.n_live > 0,
                "live count underflow in segment {}",
                segment.base
            );
            segment.n_live -= 1;
            if segment.base == active {
                segment.n_live == 0 && segment.disk_bytes() >= roll_bytes
            } else {
                segment.n_live == 0 || (segment.n_live as f64) < ratio * segment.n_records as f64
            }
        };
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
        // Batches an announced leader has not committed yet are the writer's now.
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
        let mut writer = lock(&self.writer);
        // The last reference can be dropped inside a completion, i.e. on the writer thread
        // itself or on a leader's thread while it holds the tail: joining the writer there
        // would wait on ourselves. The writer has been told to shut down and exits once the
        // completion returns and the tail is free.
        if leading_here
            || writer
                .as_ref()
                .is_some_and(|handle| handle.thread().id() == std::thread::current().id())
        {
            return;
        }
        if let Some(handle) = writer.take() {
            drop(writer);
            let _ = handle.join();
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.close();
    }
}

fn report_active_base(shared: &Shared) -> u64 {
    lock(&shared.index).active
}

/// Runs a completion; a panicking callback is logged and must not take the writer down.
fn complete(done: Completion, outcome: Result<Committed, WalError>) {
    if catch_unwind(AssertUnwindSafe(|| done(outcome))).is_err() {
        tracing::error!("WAL completion callback panicked");
    }
}

/// If a committer panics (a broken invariant) while holding the tail, poison the WAL and fail
/// everything queued, so no caller waits forever for a completion. `writer_thread`: the
/// writer thread itself died, so nothing will ever commit again.
struct PanicGuard {
    shared: Arc<Shared>,
    writer_thread: bool,
    /// Created during an unwind (a leader run from a destructor): that panic is not ours.
    unwinding_already: bool,
}

impl PanicGuard {
    fn new(shared: &Arc<Shared>, writer_thread: bool) -> Self {
        PanicGuard {
            shared: Arc::clone(shared),
            writer_thread,
            unwinding_already: std::thread::panicking(),
        }
    }
}

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if !std::thread::panicking() || self.unwinding_already {
            return;
        }
        let who = if self.writer_thread {
            "the WAL writer thread"
        } else {
            "a WAL leader"
        };
        self.shared
            .poison(format!("{who} panicked while committing"));
        let pending = {
            let mut queue = lock(&self.shared.queue);
            if self.writer_thread {
                queue.shutdown = true;
            }
            queue.busy = false;
            queue.leader = None;
            queue.gc_wanted = false;
            queue.pending_bytes = 0;
            std::mem::take(&mut queue.pending)
        };
        for submission in pending {
            complete(submission.done, Err(self.shared.poisoned_error()));
        }
        self.shared.wake.notify_one();
        self.shared.idle.notify_all();
    }
}

/// A caller's promise to commit the queue on its own thread (see [`Wal::lead`]).
///
/// Typical use: announce the leader, append under your own lock (so the log order is your
/// order), release the lock, then [`Leader::commit`].
#[must_use = "an announced leader holds back the writer thread until it commits or is dropped"]
pub struct Leader {
    shared: Arc<Shared>,
    tail: Arc<Mutex<Writer>>,
    /// Counted in `Queue::leaders` and not yet run.
    armed: bool,
}

impl fmt::Debug for Leader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leader")
            .field("armed", &self.armed)
            .finish()
    }
}

impl Leader {
    /// If no commit is in flight, commits the queued batches (up to
    /// [`LEADER_GROUP_BYTES_MAX`]) on this thread: one write, one fsync, then their completions,
    /// here. Batches queued meanwhile, or left over, go to the writer thread as the next group.
    /// If a commit is in flight, returns at once: its committer picks the queue up when it
    /// finishes. Returns whether this thread committed.
    ///
    /// Blocks for a write and an fsync: from an async runtime, call it where blocking the
    /// worker for that long is acceptable.
    pub fn commit(mut self) -> bool {
        if !self.armed {
            return false;
        }
        self.armed = false;
        let group = {
            let mut queue = lock(&self.shared.queue);
            queue.leaders -= 1;
            let free = !queue.busy && !queue.shutdown;
            // A large first batch (a checkpoint) is the writer thread's job: a leader may be
            // an async runtime's worker.
            let small = queue
                .pending
                .front()
                .is_some_and(|first| first.framed_bytes <= LEADER_GROUP_BYTES_MAX as u64);
            if !free || !small {
                let wake = !queue.busy && queue.has_work();
                drop(queue);
                if wake {
                    self.shared.wake.notify_one();
                }
                return false;
            }
            queue.busy = true;
            queue.leader = Some(std::thread::current().id());
            queue.take_group(LEADER_GROUP_BYTES_MAX as u64)
        };
        let guard = PanicGuard::new(&self.shared, false);
        // The tail is free: every committer unlocks it before giving the token back.
        let deadline = {
            let mut tail = lock(&self.tail);
            tail.commit_group(group);
            tail.interval_deadline()
        };
        drop(guard);
        self.shared.leader_commits.fetch_add(1, Ordering::Relaxed);
        let mut queue = lock(&self.shared.queue);
        if deadline.is_some() {
            // Batches that asked for an interval fsync: the writer thread owns those.
            queue.deadline_moved = true;
            self.shared.wake.notify_one();
        }
        self.shared.release_token(queue, false);
        true
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut queue = lock(&self.shared.queue);
        queue.leaders -= 1;
        let wake = !queue.busy && queue.has_work();
        drop(queue);
        if wake {
            self.shared.wake.notify_one();
        }
    }
}

/// The writer thread: commits groups when woken (no leader took them), runs interval fsyncs
/// and garbage collection, and the final fsync at shutdown.
fn run_writer(shared: &Arc<Shared>, tail: &Mutex<Writer>) {
    let _guard = PanicGuard::new(shared, true);
    // A leader that leaves data with an interval deadline sets `deadline_moved`, so the
    // deadline this thread waits for is recomputed.
    let mut interval_deadline = lock(tail).interval_deadline();
    loop {
        let (group, gc, shutdown) = {
            let mut queue = lock(&shared.queue);
            loop {
                // Queued batches are an announced leader's to commit (a wake-up here would
                // be spurious, or for GC or shutdown): the thread only takes them once no
                // leader is left to come, or when someone waits in `quiesce`.
                let ready = queue.shutdown
                    || queue.gc_wanted
                    || queue.deadline_moved
                    || (!queue.pending.is_empty() && (queue.leaders == 0 || queue.quiescers > 0));
                if ready && !queue.busy {
                    break;
                }
                match interval_deadline.filter(|_| !queue.busy) {
                    Some(deadline) => {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        queue = shared
                            .wake
                            .wait_timeout(queue, deadline - now)
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .0;
                    }
                    None => {
                        queue = shared
                            .wake
                            .wait(queue)
                            .unwrap_or_else(|poisoned| poisoned.into_inner());
                    }
                }
            }
            let group = queue.take_group(GROUP_BYTES_MAX as u64);
            let gc = std::mem::take(&mut queue.gc_wanted);
            queue.deadline_moved = false;
            queue.busy = true;
            (group, gc, queue.shutdown && queue.pending.is_empty())
        };
        {
            let mut writer = lock(tail);
            if !group.is_empty() {
                writer.commit_group(group);
                shared.writer_commits.fetch_add(1, Ordering::Relaxed);
            }
            if writer
                .interval_deadline()
                .is_some_and(|deadline| Instant::now() >= deadline)
            {
                writer.sync_or_poison();
            }
            if gc && !writer.poisoned() {
                writer.collect_garbage();
            }
            if shutdown && !writer.poisoned() && writer.write_lsn > writer.durable_lsn {
                writer.sync_or_poison();
            }
            interval_deadline = writer.interval_deadline();
        }
        shared.release_token(lock(&shared.queue), true);
        if shutdown {
            return;
        }
    }
}

/// The tail of the log: only the holder of the queue's `busy` token touches it.
struct Writer {
    shared: Arc<Shared>,
    active_file: Arc<dyn StorageFile>,
    active_base: u64,
    write_lsn: u64,
    durable_lsn: u64,
    /// When data written without an fsync must be fsynced at the latest (the earliest
    /// interval of the batches written since the last fsync).
    sync_due: Option<Instant>,
}

enum GcJob {
    Delete(u64),
    Compact(u64),
    RollActive,
}

impl Writer {
    fn poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::SeqCst)
    }

    fn interval_deadline(&self) -> Option<Instant> {
        self.sync_due
            .filter(|_| self.write_lsn > self.durable_lsn && !self.poisoned())
    }

    fn fits(&self, pending: u64) -> bool {
        (self.write_lsn - self.active_base) + pending <= self.shared.config.records_area()
    }

    fn commit_group(&mut self, group: Vec<Submission>) {
        let mut buf = Vec::new();
        let mut batch: Vec<(Submission, Vec<Lsn>)> = Vec::new();
        for submission in group {
            if self.poisoned() {
                complete(submission.done, Err(self.shared.poisoned_error()));
                continue;
            }
            if !self.fits(buf.len() as u64 + submission.framed_bytes) {
                // Seal the segment: everything in it is fsynced before the next one exists,
                // so a torn tail can only ever be in the last segment.
                self.flush(std::mem::take(&mut buf), std::mem::take(&mut batch), true);
                if let Err(error) = self.roll() {
                    complete(submission.done, Err(error));
                    continue;
                }
            }
            let mut lsns = Vec::with_capacity(submission.records.len());
            for record in &submission.records {
                let lsn = self.write_lsn + buf.len() as u64;
                lsns.push(Lsn(lsn));
                format::encode_record(&mut buf, lsn, self.durable_lsn, ORIGIN_NONE, record);
            }
            batch.push((submission, lsns));
        }
        let sync_now = batch
            .iter()
            .any(|(submission, _)| submission.sync == SyncPolicy::Always);
        self.flush(buf, batch, sync_now);
    }

    /// Writes `buf` (framed records) at the tail with one write; completes the batch.
    fn flush(&mut self, buf: Vec<u8>, batch: Vec<(Submission, Vec<Lsn>)>, sync_now: bool) {
        if batch.is_empty() {
            return;
        }
        let n_records = batch.iter().map(|(_, lsns)| lsns.len() as u64).sum();
        if let Err(error) = self.write_tail(&buf, n_records) {
            for (submission, _) in batch {
                complete(submission.done, Err(error.clone()));
            }
            return;
        }
        if sync_now && let Err(error) = self.sync_active() {
            for (submission, _) in batch {
                complete(submission.done, Err(error.clone()));
            }
            return;
        }
        for (submission, lsns) in batch {
            let coverage = if sync_now {
                SyncCoverage::Fsynced
            } else if let SyncPolicy::Interval(interval) = submission.sync {
                let due = Instant::now() + interval;
                self.sync_due = Some(self.sync_due.map_or(due, |earlier| earlier.min(due)));
                SyncCoverage::IntervalPending
            } else {
                SyncCoverage::Unsynced
            };
            let end = lsns.last().map_or(0, |lsn| lsn.0)
                + RECORD_HEADER_LEN
                + submission
                    .records
                    .last()
                    .map_or(0, |record| record.len() as u64);
            complete(
                submission.done,
                Ok(Committed {
                    lsns,
                    end: Lsn(end),
                    coverage,
                }),
            );
        }
    }

    /// One write of framed records at the tail of the active segment. On failure the segment
    /// is truncated back to its last good length, so no partial record stays behind.
    fn write_tail(&mut self, buf: &[u8], n_records: u64) -> Result<(), WalError> {
        if self.poisoned() {
            return Err(self.shared.poisoned_error());
        }
        assert!(self.fits(buf.len() as u64), "writer overran the segment");
        let offset = SEGMENT_HEADER_LEN + (self.write_lsn - self.active_base);
        if let Err(source) = self.active_file.write_at(offset, buf) {
            let kind = source.kind();
            let undo = self.active_file.truncate(offset);
            let error = if kind == io::ErrorKind::StorageFull {
                WalError::StorageFull {
                    segment: self.active_base,
                    offset,
                    source: Arc::new(source),
                }
            } else {
                WalError::io("append", self.active_base, offset, source)
            };
            if let Err(undo_error) = undo {
                self.shared.poison(format!(
                    "cannot truncate segment {} back to {offset}: {undo_error}",
                    self.active_base
                ));
            } else if kind != io::ErrorKind::StorageFull {
                // Any write error but "full" means the device is misbehaving: fail-stop.
                self.shared.poison(format!(
                    "write failed on segment {} at {offset}: {error}",
                    self.active_base
                ));
            }
            return Err(error);
        }
        self.write_lsn += buf.len() as u64;
        let mut index = lock(&self.shared.index);
        let segment = index
            .segments
            .get_mut(&self.active_base)
            .expect("active segment is indexed");
        segment.end = self.write_lsn;
        segment.n_records += n_records;
        segment.n_live += n_records;
        Ok(())
    }

    fn sync_active(&mut self) -> Result<(), WalError> {
        if self.poisoned() {
            return Err(self.shared.poisoned_error());
        }
        #[cfg(test)]
        let skip = self.shared.config.hooks.skip_fsync;
        #[cfg(not(test))]
        let skip = false;
        if !skip && let Err(source) = self.active_file.sync() {
            let error = WalError::SyncFailed {
                segment: self.active_base,
                source: Arc::new(source),
            };
            self.shared.poison(error.to_string());
            return Err(error);
        }
        self.durable_lsn = self.write_lsn;
        self.sync_due = None;
        self.shared
            .durable_lsn
            .store(self.durable_lsn, Ordering::SeqCst);
        Ok(())
    }

    fn sync_or_poison(&mut self) {
        // sync_active poisons on failure; nobody else is waiting on this result.
        let _ = self.sync_active();
    }

    fn sync_dir(&self, segment: u64) -> Result<(), WalError> {
        self.shared
            .storage
            .sync_dir(&self.shared.dir)
            .map_err(|source| {
                let error = WalError::SyncFailed {
                    segment,
                    source: Arc::new(source),
                };
                self.shared
                    .poison(format!("directory fsync failed: {error}"));
                error
            })
    }

    /// Seals the active segment (fsync) and makes a new empty one at the current end durable
    /// (create, header, fsync, directory fsync) before any record is written to it.
    fn roll(&mut self) -> Result<(), WalError> {
        if self.write_lsn > self.durable_lsn || self.poisoned() {
            self.sync_active()?;
        }
        let base = self.write_lsn;
        let path = self.shared.segment_path(base);
        let storage = &self.shared.storage;
        let file = match storage.create(&path) {
            Ok(file) => file,
            // Left over by an earlier failed roll at the same LSN: it holds no records.
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => storage
                .open(&path)
                .and_then(|file| file.truncate(0).map(|()| file))
                .map_err(|source| WalError::io("reuse segment file", base, 0, source))?,
            Err(source) if source.kind() == io::ErrorKind::StorageFull => {
                return Err(WalError::StorageFull {
                    segment: base,
                    offset: 0,
                    source: Arc::new(source),
                });
            }
            Err(source) => return Err(WalError::io("create segment", base, 0, source)),
        };
        if let Err(source) = file.write_at(0, &SegmentHeader { base_lsn: base }.encode()) {
            let _ = storage.remove(&path);
            return Err(if source.kind() == io::ErrorKind::StorageFull {
                WalError::StorageFull {
                    segment: base,
                    offset: 0,
                    source: Arc::new(source),
                }
            } else {
                WalError::io("write segment header", base, 0, source)
            });
        }
        if let Err(source) = file.sync() {
            let error = WalError::SyncFailed {
                segment: base,
                source: Arc::new(source),
            };
            self.shared.poison(error.to_string());
            return Err(error);
        }
        self.sync_dir(base)?;
        let mut index = lock(&self.shared.index);
        index.segments.insert(
            base,
            Segment {
                base,
                path,
                file: Arc::clone(&file),
                end: base,
                n_records: 0,
                n_live: 0,
                released: HashSet::new(),
            },
        );
        index.active = base;
        drop(index);
        self.active_file = file;
        self.active_base = base;
        Ok(())
    }

    fn next_gc_job(&self) -> Option<GcJob> {
        let index = lock(&self.shared.index);
        let config = &self.shared.config;
        for segment in index.segments.values() {
            if segment.base == index.active {
                continue;
            }
            if segment.n_live == 0 {
                return Some(GcJob::Delete(segment.base));
            }
            if (segment.n_live as f64) < config.compact_live_ratio * segment.n_records as f64 {
                return Some(GcJob::Compact(segment.base));
            }
        }
        let active = &index.segments[&index.active];
        if active.n_records > 0
            && active.n_live == 0
            && active.disk_bytes() >= config.roll_dead_active_bytes
        {
            return Some(GcJob::RollActive);
        }
        None
    }

    fn collect_garbage(&mut self) {
        while !self.poisoned() {
            let Some(job) = self.next_gc_job() else {
                return;
            };
            let outcome = match job {
                GcJob::Delete(base) => self.delete_segment(base),
                GcJob::Compact(base) => self.compact(base),
                GcJob::RollActive => self.roll(),
            };
            if let Err(error) = outcome {
                tracing::warn!(%error, "WAL garbage collection stopped; retried on the next release");
                return;
            }
        }
    }

    fn delete_segment(&mut self, base: u64) -> Result<(), WalError> {
        // A record is released because a later one supersedes it (an ack, a checkpoint's end).
        // Under `interval` and `never` that later record may still be unsynced: fsync it first,
        // or a power cut could keep the deletion and lose what superseded the deleted records
        // (a whole topology, when the lost record is a checkpoint's end).
        if self.write_lsn > self.durable_lsn || self.poisoned() {
            self.sync_active()?;
        }
        let segment = {
            let mut index = lock(&self.shared.index);
            assert_ne!(base, index.active, "the active segment is never deleted");
            index
                .segments
                .remove(&base)
                .expect("GC job names an indexed segment")
        };
        if let Err(error) = self.shared.storage.remove(&segment.path) {
            // Harmless: recovery replays its records again as live; the owner re-releases them.
            tracing::warn!(%error, path = %segment.path.display(), "could not remove dead segment");
        }
        self.sync_dir(base)
    }

    /// Re-appends the live records of a sparse sealed segment (one write, fsynced), then
    /// deletes the segment. Each copy carries its origin LSN, so if a crash keeps both the
    /// copy and the old segment, recovery yields the record once (the copy).
    fn compact(&mut self, base: u64) -> Result<(), WalError> {
        let (file, end, released, path) = {
            let index = lock(&self.shared.index);
            let segment = &index.segments[&base];
            (
                Arc::clone(&segment.file),
                segment.end,
                segment.released.clone(),
                segment.path.clone(),
            )
        };
        let mut cursor = Cursor::new(file, base, end, true);
        let mut live = Vec::new();
        while let Some((header, payload)) = cursor
            .next_record()
            .map_err(|error| error.into_wal_error(&path))?
        {
            if !released.contains(&header.lsn) {
                live.push((header.lsn, payload));
            }
        }
        let framed: u64 = live
            .iter()
            .map(|(_, payload)| RECORD_HEADER_LEN + payload.len() as u64)
            .sum();
        if !self.fits(framed) {
            self.roll()?;
        }
        let mut buf = Vec::with_capacity(framed as usize);
        let mut moves = Vec::with_capacity(live.len());
        for (old, payload) in &live {
            let new = self.write_lsn + buf.len() as u64;
            format::encode_record(&mut buf, new, self.durable_lsn, *old, payload);
            moves.push(Relocation {
                from: Lsn(*old),
                to: Lsn(new),
            });
        }
        if !buf.is_empty() {
            self.write_tail(&buf, moves.len() as u64)?;
            self.sync_active()?;
        }
        {
            let mut index = lock(&self.shared.index);
            let old_segment = index.segments.remove(&base).expect("still indexed");
            for relocation in &moves {
                let (old, new) = (relocation.from.0, relocation.to.0);
                if old_segment.released.contains(&old) {
                    // Released while we copied: the copy is dead on arrival.
                    assert!(index.mark_released(new));
                    if let Some(origin) = index.reverse.remove(&old) {
                        index.forward.remove(&origin);
                    }
                    continue;
                }
                let origin = index.reverse.remove(&old).unwrap_or(old);
                index.forward.insert(origin, new);
                index.reverse.insert(new, origin);
            }
        }
        if let Err(error) = self.shared.storage.remove(&path) {
            tracing::warn!(%error, path = %path.display(), "could not remove compacted segment");
        }
        self.sync_dir(base)?;
        if !moves.is_empty()
            && let Some(hook) = &self.shared.config.on_relocate
            && catch_unwind(AssertUnwindSafe(|| hook(&moves))).is_err()
        {
            tracing::error!("on_relocate hook panicked");
        }
        Ok(())
    }
}

/// Why a cursor stopped.
enum CursorError {
    Damaged {
        segment: u64,
        offset: u64,
        damage: Damage,
    },
    Io {
        segment: u64,
        offset: u64,
        source: io::Error,
    },
}

impl CursorError {
    fn into_wal_error(self, path: &Path) -> WalError {
        match self {
            CursorError::Damaged {
                segment,
                offset,
                damage,
            } => WalError::Corrupt {
                segment,
                path: path.to_path_buf(),
                offset,
                damage,
            },
            CursorError::Io {
                segment,
                offset,
                source,
            } => WalError::io("sequential read", segment, offset, source),
        }
    }
}

/// Reads one segment's records in order with large reads.
struct Cursor {
    file: Arc<dyn StorageFile>,
    base: u64,
    /// File offset where records end (exclusive).
    limit: u64,
    /// File offset of the next record.
    pos: u64,
    buf: Vec<u8>,
    buf_offset: u64,
    verify_crc: bool,
}

impl Cursor {
    fn new(file: Arc<dyn StorageFile>, base: u64, end_lsn: u64, verify_crc: bool) -> Self {
        Cursor {
            file,
            base,
            limit: SEGMENT_HEADER_LEN + (end_lsn - base),
            pos: SEGMENT_HEADER_LEN,
            buf: Vec::new(),
            buf_offset: SEGMENT_HEADER_LEN,
            verify_crc,
        }
    }

    fn lsn_at(&self, offset: u64) -> u64 {
        self.base + (offset - SEGMENT_HEADER_LEN)
    }

    /// Makes `buf` hold the file bytes `[pos, pos + need)` (`need` ≤ bytes left).
    fn fill(&mut self, need: u64) -> Result<(), CursorError> {
        let have_end = self.buf_offset + self.buf.len() as u64;
        if self.pos >= self.buf_offset && self.pos + need <= have_end {
            return Ok(());
        }
        let len = need.max(READ_AHEAD_BYTES as u64).min(self.limit - self.pos);
        self.buf.resize(len as usize, 0);
        self.buf_offset = self.pos;
        self.file
            .read_at(self.pos, &mut self.buf)
            .map_err(|source| CursorError::Io {
                segment: self.base,
                offset: self.pos,
                source,
            })
    }

    fn damaged(&self, damage: Damage) -> CursorError {
        CursorError::Damaged {
            segment: self.base,
            offset: self.pos,
            damage,
        }
    }

    fn next_record(&mut self) -> Result<Option<(RecordHeader, Bytes)>, CursorError> {
        if self.pos >= self.limit {
            return Ok(None);
        }
        let left = self.limit - self.pos;
        if left < RECORD_HEADER_LEN {
            return Err(self.damaged(Damage::TornHeader));
        }
        self.fill(RECORD_HEADER_LEN)?;
        let at = (self.pos - self.buf_offset) as usize;
        let header = RecordHeader::decode(&self.buf[at..]);
        let expected = self.lsn_at(self.pos);
        if header.lsn != expected {
            return Err(self.damaged(Damage::LsnMismatch { found: header.lsn }));
        }
        if header.payload_len > RECORD_BYTES_MAX {
            return Err(self.damaged(Damage::LengthTooLarge {
                len: header.payload_len,
            }));
        }
        let total = RECORD_HEADER_LEN + u64::from(header.payload_len);
        if total > left {
            return Err(self.damaged(Damage::TornPayload));
        }
        self.fill(total)?;
        let at = (self.pos - self.buf_offset) as usize;
        let framed = &self.buf[at..at + total as usize];
        let header = format::check_record(framed, expected, self.verify_crc)
            .map_err(|damage| self.damaged(damage))?;
        let payload = Bytes::copy_from_slice(&framed[RECORD_HEADER_LEN as usize..]);
        self.pos += total;
        Ok(Some((header, payload)))
    }
}

/// Iterator over records in LSN order (see [`Wal::records`]).
pub struct Records {
    segments: VecDeque<(u64, Arc<dyn StorageFile>, u64, PathBuf)>,
    cursor: Option<(Cursor, PathBuf)>,
    from: u64,
    superseded: HashSet<u64>,
    verify_crc: bool,
    failed: bool,
}

impl fmt::Debug for Records {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Records")
            .field("from", &self.from)
            .field("segments_left", &self.segments.len())
            .finish()
    }
}

impl Iterator for Records {
    type Item = Result<(Lsn, Bytes), WalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            if self.cursor.is_none() {
                let (base, file, end, path) = self.segments.pop_front()?;
                let mut cursor = Cursor::new(file, base, end, self.verify_crc);
                if self.from > base && self.from < end {
                    // LSNs are positions: start reading at the record itself.
                    cursor.pos = SEGMENT_HEADER_LEN + (self.from - base);
                    cursor.buf_offset = cursor.pos;
                }
                self.cursor = Some((cursor, path));
            }
            let (cursor, path) = self.cursor.as_mut().expect("set above");
            match cursor.next_record() {
                Ok(None) => self.cursor = None,
                Ok(Some((header, payload))) => {
                    if header.lsn >= self.from && !self.superseded.contains(&header.lsn) {
                        return Some(Ok((Lsn(header.lsn), payload)));
                    }
                }
                Err(error) => {
                    self.failed = true;
                    return Some(Err(error.into_wal_error(path)));
                }
            }
        }
    }
}

pub(crate) struct Recovered {
    index: Index,
    pub(crate) report: RecoveryReport,
}

/// Recovery: see docs/storage.md "Recovery rules".
pub(crate) fn recover(
    storage: &dyn Storage,
    dir: &Path,
    config: &WalConfig,
) -> Result<Recovered, WalError> {
    #[cfg(test)]
    let verify_crc = !config.hooks.skip_crc;
    #[cfg(not(test))]
    let verify_crc = true;
    let _ = config;
    storage
        .create_dir_all(dir)
        .map_err(|source| WalError::io("create WAL directory", 0, 0, source))?;
    let names = storage
        .list_dir(dir)
        .map_err(|source| WalError::io("list WAL directory", 0, 0, source))?;
    let mut bases: Vec<u64> = names
        .iter()
        .filter_map(|name| parse_segment_name(name))
        .collect();
    bases.sort_unstable();
    let mut report = RecoveryReport::default();
    let mut segments = BTreeMap::new();
    if bases.is_empty() {
        let path = segment_path(dir, 0);
        let file = storage
            .create(&path)
            .map_err(|source| WalError::io("create segment", 0, 0, source))?;
        write_fresh_header(file.as_ref(), 0)?;
        storage
            .sync_dir(dir)
            .map_err(|source| WalError::SyncFailed {
                segment: 0,
                source: Arc::new(source),
            })?;
        // A brand-new directory's own entry must be durable too, or the whole log can vanish.
        if let Some(parent) = dir.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            storage
                .sync_dir(parent)
                .map_err(|source| WalError::SyncFailed {
                    segment: 0,
                    source: Arc::new(source),
                })?;
        }
        bases.push(0);
    }
    let mut origins = Vec::new();
    let mut prev_end = 0u64;
    let n_segments = bases.len();
    for (segment_idx, &base) in bases.iter().enumerate() {
        let is_last = segment_idx + 1 == n_segments;
        let path = segment_path(dir, base);
        let corrupt = |offset: u64, damage: Damage| WalError::Corrupt {
            segment: base,
            path: path.clone(),
            offset,
            damage,
        };
        let file = storage
            .open(&path)
            .map_err(|source| WalError::io("open segment", base, 0, source))?;
        let file_len = file
            .len()
            .map_err(|source| WalError::io("stat segment", base, 0, source))?;
        let mut header_bytes = vec![0u8; file_len.min(SEGMENT_HEADER_LEN) as usize];
        file.read_at(0, &mut header_bytes)
            .map_err(|source| WalError::io("read segment header", base, 0, source))?;
        let header = SegmentHeader::decode(&header_bytes).and_then(|header| {
            if header.base_lsn == base {
                Ok(header)
            } else {
                Err(Damage::BaseMismatch {
                    found: header.base_lsn,
                })
            }
        });
        if let Err(damage) = header {
            // Records are written only after the header is fsynced, so a bad header with no
            // room for records is a rollover interrupted by the crash, nothing else.
            if is_last && file_len <= SEGMENT_HEADER_LEN && base >= prev_end {
                tracing::warn!(path = %path.display(), %damage, "rewriting torn header of the last segment");
                file.truncate(0)
                    .map_err(|source| WalError::io("truncate torn segment", base, 0, source))?;
                write_fresh_header(file.as_ref(), base)?;
                report.rewrote_segment_header = Some(base);
            } else {
                return Err(corrupt(0, damage));
            }
        }
        if base < prev_end {
            return Err(corrupt(0, Damage::BaseMismatch { found: base }));
        }
        let file_len = file_len.max(SEGMENT_HEADER_LEN);
        let end_lsn = base + (file_len - SEGMENT_HEADER_LEN);
        let mut cursor = Cursor::new(Arc::clone(&file), base, end_lsn, verify_crc);
        let mut n_records = 0u64;
        let mut valid_end = base;
        loop {
            match cursor.next_record() {
                Ok(None) => break,
                Ok(Some((header, _))) => {
                    n_records += 1;
                    valid_end = header.lsn + RECORD_HEADER_LEN + u64::from(header.payload_len);
                    if header.origin_lsn != ORIGIN_NONE {
                        origins.push(header.origin_lsn);
                    }
                }
                Err(CursorError::Io {
                    segment,
                    offset,
                    source,
                }) => {
                    return Err(WalError::io("recovery read", segment, offset, source));
                }
                Err(CursorError::Damaged { offset, damage, .. }) => {
                    if !is_last {
                        return Err(corrupt(offset, damage));
                    }
                    if let Some(vouched_at) =
                        find_vouching_record(file.as_ref(), base, offset, file_len, verify_crc)?
                    {
                        tracing::error!(path = %path.display(), offset, vouched_at, %damage, "damaged record followed by records written after it was fsynced");
                        return Err(corrupt(offset, damage));
                    }
                    tracing::warn!(
                        path = %path.display(), offset, bytes_dropped = file_len - offset, %damage,
                        "truncating torn tail of the last WAL segment"
                    );
                    file.truncate(offset).map_err(|source| {
                        WalError::io("truncate torn tail", base, offset, source)
                    })?;
                    report.truncated = Some(Truncation {
                        segment: base,
                        path: path.clone(),
                        offset,
                        bytes_dropped: file_len - offset,
                        damage,
                    });
                    break;
                }
            }
        }
        if is_last {
            // Whatever survived may be only in the page cache (after kill -9): make it durable
            // before the broker rebuilds state from it.
            file.sync().map_err(|source| WalError::SyncFailed {
                segment: base,
                source: Arc::new(source),
            })?;
        }
        report.records += n_records;
        prev_end = valid_end;
        segments.insert(
            base,
            Segment {
                base,
                path,
                file,
                end: valid_end,
                n_records,
                n_live: n_records,
                released: HashSet::new(),
            },
        );
    }
    storage
        .sync_dir(dir)
        .map_err(|source| WalError::SyncFailed {
            segment: prev_end,
            source: Arc::new(source),
        })?;
    let active = *segments.keys().next_back().expect("at least one segment");
    let mut index = Index {
        segments,
        active,
        forward: HashMap::new(),
        reverse: HashMap::new(),
        superseded: HashSet::new(),
    };
    for origin in origins {
        if index.mark_released(origin) {
            index.superseded.insert(origin);
        }
    }
    report.superseded = index.superseded.len() as u64;
    report.segments = index.segments.len();
    report.end_lsn = Lsn(prev_end);
    Ok(Recovered { index, report })
}

fn write_fresh_header(file: &dyn StorageFile, base: u64) -> Result<(), WalError> {
    file.write_at(0, &SegmentHeader { base_lsn: base }.encode())
        .map_err(|source| WalError::io("write segment header", base, 0, source))?;
    file.sync().map_err(|source| WalError::SyncFailed {
        segment: base,
        source: Arc::new(source),
    })
}

/// After damage at file offset `bad`, looks for any valid record further on whose header says
/// the log was fsynced past `bad` when it was written. Such a record proves the damaged bytes
/// had been durable: that is corruption, not a torn write, and recovery must refuse.
/// Returns the file offset of the first such record.
fn find_vouching_record(
    file: &dyn StorageFile,
    base: u64,
    bad: u64,
    file_len: u64,
    verify_crc: bool,
) -> Result<Option<u64>, WalError> {
    let mut rest = vec![0u8; (file_len - bad) as usize];
    file.read_at(bad, &mut rest)
        .map_err(|source| WalError::io("read damaged tail", base, bad, source))?;
    let bad_lsn = base + (bad - SEGMENT_HEADER_LEN);
    for at in 1..rest.len() {
        if rest.len() - at < RECORD_HEADER_LEN as usize {
            break;
        }
        let lsn = bad_lsn + at as u64;
        // Cheap filter first: a record names its own LSN.
        if RecordHeader::decode(&rest[at..]).lsn != lsn {
            continue;
        }
        if let Ok(header) = format::check_record(&rest[at..], lsn, verify_crc)
            && header.durable_lsn > bad_lsn
        {
            return Ok(Some(bad + at as u64));
        }
    }
    Ok(None)
}

#[cfg(test)]
pub(crate) fn test_config(segment_bytes: u64) -> WalConfig {
    WalConfig {
        segment_bytes,
        roll_dead_active_bytes: 1,
        ..WalConfig::default()
    }
}
