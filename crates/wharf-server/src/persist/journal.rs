//! The broker's write-ahead log at run time: appends batches of durable operations (staged
//! under the broker lock, which fixes their place: log order is core order; encoded and
//! written after it), tracks which records each checkpoint
//! supersedes, writes checkpoints, releases superseded records, and classifies failures:
//! a failed fsync is fail-stop; a full disk refuses durable publishes for a while.

use super::checkpoint::{CHECKPOINT_BYTES_DEFAULT, CHECKPOINT_CHUNK_BYTES_DEFAULT};
use super::replay::{Recovered, replay};
use crate::persist::record::{
    OpRecords, RECORD_PREFIX_BYTES_MAX, SYSTEM_CONNECTION, StagedOp, StoredMessage,
};
use crate::persist::spool::Spools;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tracing::{error, warn};
use wharf_core::{Broker, Command, Effect, QueueSync};
use wharf_storage::limits::BATCH_RECORDS_MAX;
use wharf_storage::{
    Lsn, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN, Storage, SyncCoverage, SyncPolicy, Wal, WalConfig,
    WalError,
};

/// An `EnqueueAt` operation's bytes besides its message, with one queue name of the longest
/// kind: variant, id, queue list, delay and ready time.
const ENQUEUE_OP_BYTES_MAX: usize = 1 + 10 + 5 + 5 + wharf_core::limits::NAME_BYTES_MAX + 11 + 10;
/// How long durable publishes are refused after the disk was found full, before trying again.
const DISK_FULL_BACKOFF: Duration = Duration::from_secs(1);

/// What an append's completion learns.
pub type Outcome = Result<SyncCoverage, WalError>;

/// Called when the log fails in a way the broker must not survive (fsync failure, I/O error).
pub type FailStop = Arc<dyn Fn(String) + Send + Sync>;

#[derive(Debug, Default)]
pub(super) struct Book {
    /// Current checkpoint epoch: records appended now are superseded by checkpoint epoch + 1.
    pub(super) epoch: u64,
    /// Record LSNs by the epoch they were appended in.
    pub(super) lsns: BTreeMap<u64, Vec<Lsn>>,
    /// Epochs whose records were released (a late completion of one releases at once).
    pub(super) released_below: u64,
    pub(super) bytes_since_checkpoint: u64,
    pub(super) next_checkpoint_bytes: u64,
    /// A checkpoint deferred because the live state was large is looked at again (cheaply)
    /// once the log reaches this, in case the live state shrank meanwhile.
    pub(super) recheck_at: u64,
    /// Bytes of live state the last checkpoint wrote: released by the next one, so part of
    /// what a checkpoint frees.
    pub(super) last_checkpoint_bytes: u64,
    pub(super) checkpoint_running: bool,
    /// Records superseded by a checkpoint, released by the next append on the broker's
    /// thread: a completion runs on the WAL's committing thread (its writer thread or a
    /// leader) and must not call back into it.
    pub(super) to_release: Vec<Lsn>,
}

/// Runs a batch's completion once every WAL submission of it has completed: with the first
/// error if any failed, else with the weakest sync coverage among them.
struct Gather {
    state: Mutex<GatherState>,
}

struct GatherState {
    left: usize,
    outcome: Outcome,
    done: Option<Box<dyn FnOnce(Outcome) + Send>>,
}

impl Gather {
    fn new(parts: usize, done: Box<dyn FnOnce(Outcome) + Send>) -> Arc<Gather> {
        assert!(parts > 0, "a batch has at least one submission");
        Arc::new(Gather {
            state: Mutex::new(GatherState {
                left: parts,
                outcome: Ok(SyncCoverage::Fsynced),
                done: Some(done),
            }),
        })
    }

    fn part(&self, outcome: Outcome) {
        let (outcome, done) = {
            let mut state = self.state.lock().expect("gather lock");
            state.outcome = match (
                std::mem::replace(&mut state.outcome, Err(WalError::Closed)),
                outcome,
            ) {
                (Err(first), _) | (Ok(_), Err(first)) => Err(first),
                (Ok(left), Ok(right)) => Ok(weakest(left, right)),
            };
            state.left -= 1;
            if state.left > 0 {
                return;
            }
            let outcome = std::mem::replace(&mut state.outcome, Err(WalError::Closed));
            (outcome, state.done.take().expect("runs once"))
        };
        done(outcome);
    }
}

/// The weaker of two sync coverages (what a batch of both can promise).
fn weakest(left: SyncCoverage, right: SyncCoverage) -> SyncCoverage {
    match (left, right) {
        (SyncCoverage::Unsynced, _) | (_, SyncCoverage::Unsynced) => SyncCoverage::Unsynced,
        (SyncCoverage::IntervalPending, _) | (_, SyncCoverage::IntervalPending) => {
            SyncCoverage::IntervalPending
        }
        (SyncCoverage::Fsynced, SyncCoverage::Fsynced) => SyncCoverage::Fsynced,
    }
}

/// Log order is core order: a batch takes a ticket under the broker lock (its place in the
/// log) and appends, after encoding without the lock, only when every earlier ticket has
/// appended (or given up its place). The checkpoint's begin takes a ticket the same way.
#[derive(Debug, Default)]
pub(super) struct Turnstile {
    /// The next ticket to issue.
    issued: AtomicU64,
    /// The ticket whose turn it is.
    turn: Mutex<u64>,
    turned: Condvar,
}

/// A place in the log (see [`Turnstile`]). Waited for with [`Ticket::wait`]; a ticket dropped
/// unused gives up its place, so later ones never wait forever.
#[derive(Debug)]
pub(super) struct Ticket {
    turnstile: Arc<Turnstile>,
    number: u64,
    used: bool,
}

/// The turn of a [`Ticket`]: held while appending; the next ticket's turn comes when it drops.
pub(super) struct Turn<'a> {
    turnstile: &'a Turnstile,
    turn: Option<std::sync::MutexGuard<'a, u64>>,
}

impl Turnstile {
    /// The next place.
    pub(super) fn ticket(self: &Arc<Self>) -> Ticket {
        Ticket {
            turnstile: self.clone(),
            number: self.issued.fetch_add(1, Ordering::AcqRel),
            used: false,
        }
    }
}

impl Ticket {
    /// Waits until every earlier ticket has appended or given up its place.
    pub(super) fn wait(&mut self) -> Turn<'_> {
        self.used = true;
        let mut turn = self.turnstile.turn.lock().expect("turnstile lock");
        while *turn != self.number {
            turn = self.turnstile.turned.wait(turn).expect("turnstile lock");
        }
        Turn {
            turnstile: &self.turnstile,
            turn: Some(turn),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.used {
            drop(self.wait());
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut turn = self.turn.take().expect("a turn ends once");
        *turn += 1;
        drop(turn);
        self.turnstile.turned.notify_all();
    }
}

/// A batch of operations staged for the log under the broker lock, with its place in the log
/// ([`Log::stage`]); [`PendingAppend::run`] encodes and appends it after the lock is
/// released. Dropped without running, it runs then: a staged batch is never lost, and its
/// place never blocks later batches.
pub struct PendingAppend {
    log: Arc<Log>,
    ticket: Option<Ticket>,
    ops: Vec<StagedOp>,
    sync: SyncPolicy,
    epoch: u64,
    done: Option<Box<dyn FnOnce(Outcome) + Send>>,
}

impl PendingAppend {
    /// Encodes the batch and appends it once every batch staged before it has appended.
    /// Call without the broker lock (holding it is correct, but serializes the encoding).
    pub fn run(mut self) {
        let log = self.log.clone();
        log.append_staged(&mut self);
    }
}

impl Drop for PendingAppend {
    fn drop(&mut self) {
        let log = self.log.clone();
        log.append_staged(self);
    }
}

impl std::fmt::Debug for PendingAppend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingAppend")
            .field("ops", &self.ops.len())
            .field("epoch", &self.epoch)
            .finish()
    }
}

/// The log.
pub struct Log {
    pub(super) wal: Arc<Wal>,
    pub(super) book: Arc<Mutex<Book>>,
    pub(super) disk_full_since: Mutex<Option<Instant>>,
    /// Free space is below `disk_free_limit` (set by the server's resource monitor).
    disk_alarm: std::sync::atomic::AtomicBool,
    pub(super) poisoned: AtomicBool,
    pub(super) fail_stop: FailStop,
    pub(super) checkpoint_bytes: u64,
    pub(super) sync_policy: SyncPolicy,
    /// Largest record payload the WAL takes.
    pub(super) record_bytes_max: usize,
    /// Most framed bytes in one WAL submission (a segment's record area).
    pub(super) submission_bytes_max: u64,
    /// See [`CHECKPOINT_CHUNK_BYTES_DEFAULT`].
    pub(super) chunk_bytes: usize,
    /// Held while appending the records of one batch or one checkpoint part, so that the
    /// parts of a batch split over several submissions are contiguous in the log (replay
    /// needs them so) even while the checkpoint thread appends.
    pub(super) append_lock: Mutex<()>,
    /// Log order (see [`Turnstile`]).
    pub(super) turnstile: Arc<Turnstile>,
    /// Checkpoints written since start (for tests and metrics).
    pub checkpoints: Arc<AtomicU64>,
    /// Paged messages copied from spools into checkpoints since start (for tests and metrics).
    pub paged_copied: Arc<AtomicU64>,
    /// The thread copying paged messages into the running checkpoint, if any.
    pub(super) copier: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("checkpoint_bytes", &self.checkpoint_bytes)
            .finish()
    }
}

/// Log settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// When appends are fsynced.
    pub sync_policy: SyncPolicy,
    /// Segment file size.
    pub segment_bytes: u64,
    /// See [`CHECKPOINT_BYTES_DEFAULT`].
    pub checkpoint_bytes: u64,
    /// See [`CHECKPOINT_CHUNK_BYTES_DEFAULT`] (tests lower it to get many chunks).
    pub checkpoint_chunk_bytes: usize,
    /// Largest record payload, at most what the WAL allows for `segment_bytes` (tests lower
    /// it to split batches often).
    pub record_bytes_max: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            sync_policy: SyncPolicy::Always,
            segment_bytes: WalConfig::default().segment_bytes,
            checkpoint_bytes: CHECKPOINT_BYTES_DEFAULT,
            checkpoint_chunk_bytes: CHECKPOINT_CHUNK_BYTES_DEFAULT,
            record_bytes_max: usize::MAX,
        }
    }
}

/// Opening the log failed: recovery refused (damaged log) or the log cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The WAL refused to open (corruption in the middle of the log, I/O error, ...).
    #[error("write-ahead log: {0}")]
    Wal(#[from] WalError),
    /// A record does not decode.
    #[error(transparent)]
    Record(#[from] crate::persist::record::RecordError),
}

impl Log {
    /// Opens (recovers) the log in `dir` and rebuilds `broker` from it. `broker` must be
    /// fresh; the system connection is opened in it.
    pub fn open(
        storage: Arc<dyn Storage>,
        dir: &Path,
        config: LogConfig,
        broker: &mut Broker,
        spools: &mut Spools,
        now_ms: u64,
        fail_stop: FailStop,
    ) -> Result<(Arc<Log>, Recovered), LogError> {
        let wal_config = WalConfig {
            segment_bytes: config.segment_bytes,
            sync_policy: config.sync_policy,
            ..WalConfig::default()
        };
        let record_bytes_max = usize::try_from(wal_config.record_bytes_max())
            .unwrap_or(usize::MAX)
            .min(config.record_bytes_max);
        assert!(
            record_bytes_max > 2 * RECORD_PREFIX_BYTES_MAX,
            "records must have room for operations"
        );
        let submission_bytes_max = config.segment_bytes - SEGMENT_HEADER_LEN;
        let (wal, report) = Wal::open(storage, dir, wal_config)?;
        if let Some(cut) = &report.truncated {
            // Whether the cut records had been confirmed depends on the sync policy: under
            // `always` a confirm follows an fsync of its whole record, so a record left
            // incomplete was never confirmed; under `interval` or `never` it may have been.
            let confirmed = match config.sync_policy {
                SyncPolicy::Always => "none of them was confirmed (sync = always)",
                SyncPolicy::Interval(_) | SyncPolicy::Never => {
                    "under this sync policy some may have been confirmed without an fsync"
                }
            };
            warn!(
                ?cut,
                "recovery cut an incomplete write off the end of the log: {confirmed}"
            );
        }
        broker
            .apply(
                now_ms,
                Command::OpenConnection {
                    connection: SYSTEM_CONNECTION,
                    vhost: wharf_core::DEFAULT_VHOST.into(),
                },
                &mut Vec::new(),
            )
            .expect("a fresh broker accepts the system connection");
        // Streamed from the WAL (read three times, see `replay`): memory follows the broker,
        // not the log. The first read also lists the records' LSNs, for release.
        let lsns = std::cell::RefCell::new(Vec::new());
        let reads = std::cell::Cell::new(0u32);
        let source = || {
            let first = reads.get() == 0;
            reads.set(reads.get() + 1);
            let lsns = &lsns;
            wal.records(wal.first_lsn()).map(move |item| {
                let (lsn, payload) = item?;
                if first {
                    lsns.borrow_mut().push(lsn);
                }
                Ok::<_, LogError>((lsn.0, payload))
            })
        };
        // Queues larger than memory page their restored tails out as they fill.
        let recovered = replay(source, broker, now_ms, &mut |effect| match effect {
            Effect::PageOut {
                queue,
                epoch,
                level,
                entry,
            } => spools.push(&queue, epoch, level, &entry),
            Effect::PageIn {
                queue,
                epoch,
                level,
                max,
                max_bytes,
            } => spools.request(queue, epoch, level, max, max_bytes),
            _ => {}
        })?;
        // Recovery's connection leaves, so it counts against no virtual host's limit.
        broker
            .apply(
                now_ms,
                Command::CloseConnection {
                    connection: SYSTEM_CONNECTION,
                },
                &mut Vec::new(),
            )
            .expect("the system connection is open");
        let lsns = lsns.into_inner();
        let epoch = recovered.epoch;
        let mut book = Book {
            epoch,
            released_below: 0,
            next_checkpoint_bytes: config.checkpoint_bytes,
            ..Book::default()
        };
        book.lsns.insert(epoch, lsns);
        let log = Arc::new(Log {
            wal: Arc::new(wal),
            book: Arc::new(Mutex::new(book)),
            disk_full_since: Mutex::new(None),
            disk_alarm: std::sync::atomic::AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            fail_stop,
            checkpoint_bytes: config.checkpoint_bytes,
            sync_policy: config.sync_policy,
            record_bytes_max,
            submission_bytes_max,
            chunk_bytes: config
                .checkpoint_chunk_bytes
                .clamp(1, record_bytes_max - RECORD_PREFIX_BYTES_MAX),
            append_lock: Mutex::new(()),
            turnstile: Arc::default(),
            checkpoints: Arc::new(AtomicU64::new(0)),
            copier: Mutex::new(None),
            paged_copied: Arc::new(AtomicU64::new(0)),
        });
        if recovered.records > 0 {
            // (The server logs what was recovered, in words.)
            // Start from a clean checkpoint so the replayed history can be released.
            log.checkpoint(broker, Some(spools));
        }
        Ok((log, recovered))
    }

    /// Whether durable publishes are refused right now (the disk was found full recently, or
    /// the log failed).
    pub fn refusing(&self) -> Option<&'static str> {
        if self.poisoned.load(Ordering::Acquire) {
            return Some("the write-ahead log failed; the broker is stopping");
        }
        if self.disk_alarm.load(Ordering::Acquire) {
            return Some("free disk space is below disk_free_limit");
        }
        let mut since = self.disk_full_since.lock().expect("log lock");
        match *since {
            Some(at) if at.elapsed() < DISK_FULL_BACKOFF => Some("the disk is full"),
            Some(_) => {
                *since = None;
                None
            }
            None => None,
        }
    }

    /// Records whether free disk space is below `disk_free_limit` (durable publishes are
    /// refused while it is). Returns the new state if it changed.
    pub fn set_disk_alarm(&self, low: bool) -> Option<bool> {
        (self.disk_alarm.swap(low, Ordering::AcqRel) != low).then_some(low)
    }

    pub(super) fn failed(&self, err: &WalError) {
        match err {
            WalError::StorageFull { .. } => {
                warn!("disk full: refusing durable publishes: {err}");
                *self.disk_full_since.lock().expect("log lock") = Some(Instant::now());
            }
            WalError::Overloaded { .. }
            | WalError::RecordTooLarge { .. }
            | WalError::BatchTooLarge { .. } => {
                warn!("log append refused: {err}");
            }
            _ => {
                if !self.poisoned.swap(true, Ordering::AcqRel) {
                    error!(
                        "write-ahead log failed: {err}: stopping (fail-stop, nothing more is confirmed)"
                    );
                    (self.fail_stop)(err.to_string());
                }
            }
        }
    }

    /// Announces that the caller will commit the log on its own thread right after releasing
    /// the broker lock (leader-based commit, see [`Wal::lead`]): appends made meanwhile do not
    /// wake the WAL's writer thread, and [`wharf_storage::Leader::commit`] writes and fsyncs
    /// them on the caller's thread if no fsync is in flight. Take it before appending, with
    /// the broker lock held, and commit it without the lock.
    pub fn lead(&self) -> wharf_storage::Leader {
        self.wal.lead()
    }

    /// The broker's sync policy, as a queue's `x-sync` would say it.
    pub fn default_sync(&self) -> QueueSync {
        match self.sync_policy {
            SyncPolicy::Always => QueueSync::Always,
            SyncPolicy::Interval(interval) => QueueSync::Interval(
                u64::try_from(interval.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
            ),
            SyncPolicy::Never => QueueSync::Never,
        }
    }

    /// Stages one batch of operations for the log, fsynced as `sync` says (the strongest
    /// need of the queues its messages entered, see `x-sync`). Call with the broker lock held:
    /// the batch takes its place in the log now (a ticket), so that log order is the order
    /// in which the core applied the commands, but nothing is encoded or written until
    /// [`PendingAppend::run`], which the command batch calls after releasing the lock. `done`
    /// runs once, on the committing thread (the WAL's writer thread, or a leader's, see
    /// [`Log::lead`]), when every record of the batch is on disk or the append failed.
    ///
    /// A batch is one record when it fits (the usual case). A larger one is split at operation
    /// boundaries into `BatchPart` records, appended contiguously in as many WAL submissions
    /// as the segment size needs; replay applies it only once its last part is read, so a
    /// batch is atomic whatever its size.
    pub fn stage(
        self: &Arc<Self>,
        ops: Vec<StagedOp>,
        sync: QueueSync,
        done: Box<dyn FnOnce(Outcome) + Send>,
    ) -> PendingAppend {
        let sync = match sync {
            QueueSync::Always => SyncPolicy::Always,
            QueueSync::Interval(ms) => SyncPolicy::Interval(Duration::from_millis(ms)),
            QueueSync::Never => SyncPolicy::Never,
        };
        // The epoch now: a checkpoint begun after this batch (a later ticket) supersedes it.
        let epoch = self.book.lock().expect("log lock").epoch;
        PendingAppend {
            log: self.clone(),
            ticket: Some(self.ticket()),
            ops,
            sync,
            epoch,
            done: Some(done),
        }
    }

    /// A place in the log, in the order tickets are taken (under the broker lock).
    pub(super) fn ticket(&self) -> Ticket {
        self.turnstile.ticket()
    }

    /// Encodes and appends a staged batch once its turn comes (see [`PendingAppend::run`]).
    fn append_staged(self: &Arc<Self>, pending: &mut PendingAppend) {
        let (Some(ticket), Some(done)) = (pending.ticket.take(), pending.done.take()) else {
            return;
        };
        let ops = std::mem::take(&mut pending.ops);
        // Encoded without the broker lock, before waiting for the turn: batches encode in
        // parallel and append in ticket order.
        let records =
            match OpRecords::encode(ops.into_iter().map(StagedOp::into_op), self.op_bytes_max()) {
                Ok(encoded) => encoded.into_batch(self.record_bytes_max),
                Err(err) => {
                    drop(ticket);
                    warn!("log append refused: {err}");
                    let (bytes, limit) = match err {
                        crate::persist::record::RecordError::OpTooLarge { bytes, limit } => {
                            (bytes, limit)
                        }
                        _ => (0, self.record_bytes_max as u64),
                    };
                    done(Err(WalError::RecordTooLarge { bytes, limit }));
                    return;
                }
            };
        let n_bytes: u64 = records.iter().map(|record| record.len() as u64).sum();
        let to_release = {
            let mut book = self.book.lock().expect("log lock");
            book.bytes_since_checkpoint += n_bytes;
            std::mem::take(&mut book.to_release)
        };
        self.release_all(to_release);
        let mut submissions = self.submissions(records);
        let (sync, epoch) = (pending.sync, pending.epoch);
        let mut ticket = ticket;
        let _turn = ticket.wait();
        let _contiguous = self.append_lock.lock().expect("append lock");
        if submissions.len() == 1 {
            let records = submissions.pop().expect("one");
            self.append_submission(records, sync, epoch, done);
            return;
        }
        let gather = Gather::new(submissions.len(), done);
        for records in submissions {
            let gather = gather.clone();
            self.append_submission(
                records,
                sync,
                epoch,
                Box::new(move |outcome| gather.part(outcome)),
            );
        }
    }

    /// Appends one WAL submission of a batch appended in `epoch`; call with `append_lock`.
    fn append_submission(
        self: &Arc<Self>,
        records: Vec<bytes::Bytes>,
        sync: SyncPolicy,
        epoch: u64,
        done: Box<dyn FnOnce(Outcome) + Send>,
    ) {
        // Completions hold the log weakly: the last strong reference must never be dropped on
        // the WAL's committing thread (closing the WAL there would wait on itself).
        let log = Arc::downgrade(self);
        self.wal.append_with(
            records,
            sync,
            Box::new(move |outcome| match outcome {
                Ok(committed) => {
                    if let Some(log) = log.upgrade() {
                        log.track(epoch, committed.lsns);
                    }
                    done(Ok(committed.coverage));
                }
                Err(err) => {
                    if let Some(log) = log.upgrade() {
                        log.failed(&err);
                    }
                    done(Err(err));
                }
            }),
        );
    }

    /// Whether a persistent message is too large to be logged, with its size and the limit.
    /// A message is split by queues, never within itself, so it must fit in one record with
    /// one queue name. Only messages near the limit are measured (an encoding).
    pub fn refuses_message(&self, message: &wharf_core::Message) -> Option<(u64, usize)> {
        let limit = self.op_bytes_max() - ENQUEUE_OP_BYTES_MAX;
        if message.body.len() < limit / 2 {
            return None;
        }
        let bytes = postcard::to_allocvec(&StoredMessage::from(message))
            .expect("log operations always serialize")
            .len();
        (bytes > limit).then_some((bytes as u64, limit))
    }

    /// Largest encoded operation: what fits in a record after its prefix.
    pub(super) fn op_bytes_max(&self) -> usize {
        self.record_bytes_max - RECORD_PREFIX_BYTES_MAX
    }

    /// Groups records into WAL submissions the WAL accepts (a segment's record area, and
    /// [`BATCH_RECORDS_MAX`] records, at most).
    fn submissions(&self, records: Vec<bytes::Bytes>) -> Vec<Vec<bytes::Bytes>> {
        let mut submissions: Vec<Vec<bytes::Bytes>> = Vec::new();
        let mut framed = 0u64;
        for record in records {
            let bytes = RECORD_HEADER_LEN + record.len() as u64;
            match submissions.last_mut() {
                Some(last)
                    if framed + bytes <= self.submission_bytes_max
                        && last.len() < BATCH_RECORDS_MAX =>
                {
                    framed += bytes;
                    last.push(record);
                }
                _ => {
                    framed = bytes;
                    submissions.push(vec![record]);
                }
            }
        }
        submissions
    }

    pub(super) fn track(&self, epoch: u64, lsns: Vec<Lsn>) {
        let mut book = self.book.lock().expect("log lock");
        if epoch < book.released_below {
            // Appended before a checkpoint that already covers it: superseded at once.
            book.to_release.extend(lsns);
        } else {
            book.lsns.entry(epoch).or_default().extend(lsns);
        }
    }

    fn release_all(&self, lsns: Vec<Lsn>) {
        for lsn in lsns {
            if let Err(err) = self.wal.release(lsn) {
                warn!(lsn = lsn.0, "release failed: {err}");
            }
        }
    }

    /// Periodic work for an idle broker (call about once a second with the broker lock held):
    /// releases the records a finished checkpoint superseded (otherwise the next append does),
    /// and looks at a deferred checkpoint again: once a backlog has drained the log is mostly
    /// garbage, and no further append may come to notice it.
    pub fn housekeeping(self: &Arc<Self>, broker: &Broker, spools: Option<&mut Spools>) {
        let to_release = {
            let mut book = self.book.lock().expect("log lock");
            book.recheck_at = 0;
            std::mem::take(&mut book.to_release)
        };
        self.release_all(to_release);
        self.consider_checkpoint(broker, spools, true);
    }

    /// Whether a checkpoint is being written (its thread has not ended it or given it up).
    pub fn checkpoint_running(&self) -> bool {
        self.book.lock().expect("log lock").checkpoint_running
    }

    /// The WAL's counters.
    pub fn stats(&self) -> wharf_storage::WalStats {
        self.wal.stats()
    }

    /// Commits what is queued, fsyncs, and stops the writer (after the checkpoint thread,
    /// if one runs, has finished).
    pub fn close(&self) {
        let copier = self.copier.lock().expect("log lock").take();
        if let Some(copier) = copier {
            let _ = copier.join();
        }
        self.wal.close();
    }
}
