//! Committing: the submission queue, the tail of the log, the writer thread and leaders.
//!
//! Whoever holds the queue's `busy` token (the writer thread, or a leader on its own thread)
//! is the *committer*: it takes a group of submissions, frames them into one buffer, writes
//! it at the tail with one write, fsyncs if a batch of the group needs it, and runs the
//! completions. A group that does not fit the active segment first seals it and rolls to a
//! new one.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{JoinHandle, ThreadId};
use std::time::Instant;

use bytes::Bytes;

use crate::error::WalError;
use crate::format::{self, Lsn, ORIGIN_NONE, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN, SegmentHeader};
use crate::limits::{GROUP_BYTES_MAX, LEADER_GROUP_BYTES_MAX};
use crate::storage::StorageFile;

use super::{Committed, Completion, Segment, SyncCoverage, SyncPolicy, WalShared, lock};

/// One batch submitted by [`Wal::append_with`](super::Wal::append_with), waiting for a
/// committer.
pub(super) struct Submission {
    pub(super) records: Vec<Bytes>,
    pub(super) framed_bytes: u64,
    /// What this batch needs before its completion (see
    /// [`Wal::append_with`](super::Wal::append_with)).
    pub(super) sync: SyncPolicy,
    pub(super) done: Completion,
}

/// Submissions waiting for a committer, and who commits.
#[derive(Default)]
pub(super) struct Queue {
    pub(super) pending: VecDeque<Submission>,
    pub(super) pending_bytes: u64,
    /// GC may have work (set at open and by a release that left a dead segment, see `gc`).
    pub(super) gc_wanted: bool,
    /// A committer (the writer thread or a leader) holds the tail and work taken from the
    /// queue. Only the holder of this flag touches the tail: it is the commit token.
    pub(super) busy: bool,
    /// The thread of the leader holding `busy`, if a leader holds it.
    pub(super) leader: Option<ThreadId>,
    /// Leaders announced ([`Wal::lead`](super::Wal::lead)) and not yet run: while there are
    /// any, appends leave the writer thread asleep (a leader commits them or wakes the thread).
    pub(super) leaders: usize,
    /// Callers blocked in [`Wal::quiesce`](super::Wal::quiesce) (`idle` is notified only when
    /// someone waits).
    pub(super) quiescers: usize,
    pub(super) shutdown: bool,
    /// A leader left written data with an interval deadline: the writer thread must look at
    /// its deadline again (it owns interval fsyncs).
    pub(super) deadline_moved: bool,
}

impl Queue {
    pub(super) fn has_work(&self) -> bool {
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

impl WalShared {
    /// Ends a commit: gives the token back, wakes the writer thread if work is left (it was
    /// queued during this commit and forms the next group; the writer thread itself looks
    /// again without being woken), and wakes `quiesce` callers.
    fn release_token(&self, mut queue: MutexGuard<'_, Queue>, by_writer_thread: bool) {
        queue.busy = false;
        queue.leader = None;
        let wake_writer_thread = !by_writer_thread && queue.has_work();
        let wake_quiescers = queue.quiescers > 0;
        drop(queue);
        if wake_writer_thread {
            self.wake.notify_one();
        }
        if wake_quiescers {
            self.idle.notify_all();
        }
    }
}

/// Runs a completion; a panicking callback is logged and must not take its committer (the
/// writer thread or a leader) down.
fn complete(done: Completion, outcome: Result<Committed, WalError>) {
    if catch_unwind(AssertUnwindSafe(|| done(outcome))).is_err() {
        tracing::error!("WAL completion callback panicked");
    }
}

/// If a committer panics (a broken invariant) while holding the tail, poison the WAL and fail
/// everything queued, so no caller waits forever for a completion. `writer_thread`: the
/// writer thread itself died, so nothing will ever commit again.
struct PanicGuard {
    shared: Arc<WalShared>,
    writer_thread: bool,
    /// Created during an unwind (a leader run from a destructor): that panic is not ours.
    unwinding_already: bool,
}

impl PanicGuard {
    fn new(shared: &Arc<WalShared>, writer_thread: bool) -> Self {
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

/// A caller's promise to commit the queue on its own thread (see [`Wal::lead`](super::Wal::lead)).
///
/// Typical use: announce the leader, append under your own lock (so the log order is your
/// order), release the lock, then [`Leader::commit`].
#[must_use = "an announced leader holds back the writer thread until it commits or is dropped"]
pub struct Leader {
    shared: Arc<WalShared>,
    tail: Arc<Mutex<Tail>>,
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
    /// A leader for `tail`; `armed` if it was counted in `Queue::leaders`.
    pub(super) fn new(shared: &Arc<WalShared>, tail: &Arc<Mutex<Tail>>, armed: bool) -> Self {
        Leader {
            shared: Arc::clone(shared),
            tail: Arc::clone(tail),
            armed,
        }
    }

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

/// Starts the writer thread (see `run_writer_thread`).
pub(super) fn spawn_writer_thread(
    shared: &Arc<WalShared>,
    tail: &Arc<Mutex<Tail>>,
) -> Result<JoinHandle<()>, WalError> {
    let (shared, tail) = (Arc::clone(shared), Arc::clone(tail));
    std::thread::Builder::new()
        .name("wharf-wal-writer".into())
        .spawn(move || run_writer_thread(&shared, &tail))
        .map_err(|source| WalError::io("spawn writer thread", 0, 0, source))
}

/// The writer thread: commits groups when woken (no leader took them), runs interval fsyncs
/// and garbage collection, and the final fsync at shutdown.
fn run_writer_thread(shared: &Arc<WalShared>, tail: &Mutex<Tail>) {
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
            let mut tail = lock(tail);
            if !group.is_empty() {
                tail.commit_group(group);
                shared.writer_commits.fetch_add(1, Ordering::Relaxed);
            }
            if tail
                .interval_deadline()
                .is_some_and(|deadline| Instant::now() >= deadline)
            {
                tail.sync_or_poison();
            }
            if gc && !tail.poisoned() {
                tail.collect_garbage();
            }
            if shutdown && !tail.poisoned() && tail.write_lsn > tail.durable_lsn {
                tail.sync_or_poison();
            }
            interval_deadline = tail.interval_deadline();
        }
        shared.release_token(lock(&shared.queue), true);
        if shutdown {
            return;
        }
    }
}

/// The tail of the log, the active segment that records are appended to: only the committer
/// (the holder of the queue's `busy` token) touches it.
pub(super) struct Tail {
    pub(super) shared: Arc<WalShared>,
    active_file: Arc<dyn StorageFile>,
    active_base: u64,
    /// LSN just past the last record written.
    pub(super) write_lsn: u64,
    /// Everything below this LSN is fsynced.
    pub(super) durable_lsn: u64,
    /// When data written without an fsync must be fsynced at the latest (the earliest
    /// interval of the batches written since the last fsync).
    sync_due: Option<Instant>,
}

impl Tail {
    /// The tail of a log just recovered up to `end_lsn`: nothing unsynced.
    pub(super) fn new(shared: &Arc<WalShared>, end_lsn: u64) -> Self {
        let (active_file, active_base) = {
            let index = lock(&shared.index);
            (
                Arc::clone(&index.segments[&index.active].file),
                index.active,
            )
        };
        Tail {
            shared: Arc::clone(shared),
            active_file,
            active_base,
            write_lsn: end_lsn,
            durable_lsn: end_lsn,
            sync_due: None,
        }
    }

    pub(super) fn poisoned(&self) -> bool {
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
        assert!(
            self.fits(buf.len() as u64),
            "a committer overran the segment"
        );
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

    pub(super) fn sync_active(&mut self) -> Result<(), WalError> {
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

    pub(super) fn sync_dir(&self, segment: u64) -> Result<(), WalError> {
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
    pub(super) fn roll(&mut self) -> Result<(), WalError> {
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
}
