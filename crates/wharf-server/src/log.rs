//! The broker's write-ahead log at run time: appends batches of durable operations (always
//! under the broker lock, so log order is core order), tracks which records each checkpoint
//! supersedes, writes checkpoints, releases superseded records, and classifies failures:
//! a failed fsync is fail-stop; a full disk refuses durable publishes for a while.

use crate::durable::{Op, Record, Recovered, SYSTEM_CONNECTION, StoredMessage, replay, snapshot};
use crate::spool::{SpoolRange, Spools};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};
use wharf_core::{Broker, Command, Effect, QueueSync};
use wharf_storage::{Lsn, Storage, SyncCoverage, SyncPolicy, Wal, WalConfig, WalError};

/// Log bytes appended after which a checkpoint is considered (and the live state is at most
/// half of them, so a checkpoint never rewrites more than it frees).
pub const CHECKPOINT_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// A deferred checkpoint is retried early (see [`Log::maybe_checkpoint`]) only while the live
/// state in memory is at most this: it is captured under the broker lock, so a large one would
/// stall every connection (paged messages are copied without the lock and do not count).
const RECHECK_IN_MEMORY_BYTES_MAX: u64 = 32 * 1024 * 1024;
/// Message bytes per checkpoint chunk record.
const CHECKPOINT_CHUNK_BYTES: usize = 1024 * 1024;
/// How long durable publishes are refused after the disk was found full, before trying again.
const DISK_FULL_BACKOFF: Duration = Duration::from_secs(1);

/// What an append's completion learns.
pub type Outcome = Result<SyncCoverage, WalError>;

/// Called when the log fails in a way the broker must not survive (fsync failure, I/O error).
pub type FailStop = Arc<dyn Fn(String) + Send + Sync>;

#[derive(Debug, Default)]
struct Book {
    /// Current checkpoint epoch: records appended now are superseded by checkpoint epoch + 1.
    epoch: u64,
    /// Record LSNs by the epoch they were appended in.
    lsns: BTreeMap<u64, Vec<Lsn>>,
    /// Epochs whose records were released (a late completion of one releases at once).
    released_below: u64,
    bytes_since_checkpoint: u64,
    next_checkpoint_bytes: u64,
    /// A checkpoint deferred because the live state was large is looked at again (cheaply)
    /// once the log reaches this, in case the live state shrank meanwhile.
    recheck_at: u64,
    /// Bytes of live state the last checkpoint wrote: released by the next one, so part of
    /// what a checkpoint frees.
    last_checkpoint_bytes: u64,
    checkpoint_running: bool,
    /// Records superseded by a checkpoint, released by the next append on the broker's
    /// thread: a completion runs on the WAL's committing thread (its writer thread or a
    /// leader) and must not call back into it.
    to_release: Vec<Lsn>,
}

/// The log.
pub struct Log {
    wal: Arc<Wal>,
    book: Arc<Mutex<Book>>,
    disk_full_since: Mutex<Option<Instant>>,
    poisoned: AtomicBool,
    fail_stop: FailStop,
    checkpoint_bytes: u64,
    sync_policy: SyncPolicy,
    /// Checkpoints written since start (for tests and metrics).
    pub checkpoints: Arc<AtomicU64>,
    /// Paged messages copied from spools into checkpoints since start (for tests and metrics).
    pub paged_copied: Arc<AtomicU64>,
    /// The thread copying paged messages into the running checkpoint, if any.
    copier: Mutex<Option<std::thread::JoinHandle<()>>>,
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
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            sync_policy: SyncPolicy::Always,
            segment_bytes: WalConfig::default().segment_bytes,
            checkpoint_bytes: CHECKPOINT_BYTES_DEFAULT,
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
    Record(#[from] crate::durable::RecordError),
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
            // Moving records would change replay order: checkpoints do the compaction.
            compact_live_ratio: 0.0,
            ..WalConfig::default()
        };
        let (wal, report) = Wal::open(storage, dir, wal_config)?;
        if let Some(cut) = &report.truncated {
            warn!(
                ?cut,
                "recovery cut a torn tail off the log (writes that were never confirmed)"
            );
        }
        broker
            .apply(
                now_ms,
                Command::OpenConnection {
                    connection: SYSTEM_CONNECTION,
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
                entry,
            } => spools.push(&queue, epoch, &entry),
            Effect::PageIn {
                queue,
                epoch,
                max,
                max_bytes,
            } => spools.request(queue, epoch, max, max_bytes),
            _ => {}
        })?;
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
            poisoned: AtomicBool::new(false),
            fail_stop,
            checkpoint_bytes: config.checkpoint_bytes,
            sync_policy: config.sync_policy,
            checkpoints: Arc::new(AtomicU64::new(0)),
            copier: Mutex::new(None),
            paged_copied: Arc::new(AtomicU64::new(0)),
        });
        if recovered.records > 0 {
            info!(
                records = recovered.records,
                messages = recovered.messages,
                "recovered from the log"
            );
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

    fn failed(&self, err: &WalError) {
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

    /// Appends one record under the broker's sync policy; see [`Log::append_with`].
    pub fn append(self: &Arc<Self>, record: &Record, done: Box<dyn FnOnce(Outcome) + Send>) {
        let sync = self.default_sync();
        self.append_with(record, sync, done);
    }

    /// Appends one record, fsynced as `sync` says (the strongest need of the queues its
    /// messages entered, see `x-sync`). Call with the broker lock held, so that log order is
    /// the order in which the core applied the commands. `done` runs on the committing thread:
    /// the WAL's writer thread, or a leader's (see [`Log::lead`]).
    pub fn append_with(
        self: &Arc<Self>,
        record: &Record,
        sync: QueueSync,
        done: Box<dyn FnOnce(Outcome) + Send>,
    ) {
        let sync = match sync {
            QueueSync::Always => SyncPolicy::Always,
            QueueSync::Interval(ms) => SyncPolicy::Interval(Duration::from_millis(ms)),
            QueueSync::Never => SyncPolicy::Never,
        };
        let payload = record.encode();
        let n_bytes = payload.len() as u64;
        let (epoch, to_release) = {
            let mut book = self.book.lock().expect("log lock");
            book.bytes_since_checkpoint += n_bytes;
            (book.epoch, std::mem::take(&mut book.to_release))
        };
        self.release_all(to_release);
        // Completions hold the log weakly: the last strong reference must never be dropped on
        // the WAL's committing thread (closing the WAL there would wait on itself).
        let log = Arc::downgrade(self);
        self.wal.append_with(
            vec![payload],
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

    fn track(&self, epoch: u64, lsns: Vec<Lsn>) {
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

    /// Writes a checkpoint if enough log has accumulated and the live state is small next to
    /// it. Call with the broker lock held, after appending a batch.
    pub fn maybe_checkpoint(self: &Arc<Self>, broker: &Broker, spools: Option<&mut Spools>) {
        self.consider_checkpoint(broker, spools, false);
    }

    fn consider_checkpoint(
        self: &Arc<Self>,
        broker: &Broker,
        spools: Option<&mut Spools>,
        idle: bool,
    ) {
        {
            let mut book = self.book.lock().expect("log lock");
            if book.checkpoint_running {
                return;
            }
            let since = book.bytes_since_checkpoint;
            // What a checkpoint now would free: the log since the last one, and the last one.
            let reclaimable = since + book.last_checkpoint_bytes;
            let due = since >= book.next_checkpoint_bytes;
            // A checkpoint deferred because the live state was large (a backlog) is looked at
            // again every quarter of `checkpoint_bytes` of log, and by the housekeeping
            // (`idle`): once the backlog has drained, the log is mostly garbage.
            let recheck = !due
                && reclaimable >= self.checkpoint_bytes
                && (idle || (since >= self.checkpoint_bytes && since >= book.recheck_at));
            if !due && !recheck {
                return;
            }
            if recheck {
                book.recheck_at = since + self.checkpoint_bytes / 4;
            }
            // An estimate of the live state, O(queues), as `Op::approx_bytes` counts it (body
            // plus 64 per ready message of durable queues; deliveries outstanding and delayed
            // messages are not counted, transient messages in durable queues are): when it is
            // too large, defer without capturing anything.
            let (n_ready, ready_bytes) = broker.durable_ready_totals();
            let (n_paged, paged_bytes) = broker.paged_totals();
            let estimate = ready_bytes + 64 * n_ready;
            if estimate.saturating_mul(2) > reclaimable {
                if due {
                    book.next_checkpoint_bytes = since + estimate * 2;
                }
                return;
            }
            let in_memory = (ready_bytes - paged_bytes) + 64 * (n_ready - n_paged);
            if recheck && in_memory > RECHECK_IN_MEMORY_BYTES_MAX {
                return;
            }
        }
        self.checkpoint(broker, spools);
    }

    /// Writes a checkpoint of `broker`'s durable state now, unless rewriting the live state
    /// would cost more than it frees (then it is deferred). Paged messages (queues larger than
    /// memory) are copied from their spools by a thread of the log, without the broker lock:
    /// batches appended meanwhile land between the checkpoint's begin and end, and replay
    /// applies every batch after the begin (docs/durability.md).
    pub fn checkpoint(self: &Arc<Self>, broker: &Broker, spools: Option<&mut Spools>) {
        self.write_checkpoint(broker, spools, false);
    }

    /// Writes a checkpoint now, whatever it costs (tests and tools), unless one is running.
    pub fn checkpoint_forced(self: &Arc<Self>, broker: &Broker, spools: Option<&mut Spools>) {
        self.write_checkpoint(broker, spools, true);
    }

    fn write_checkpoint(
        self: &Arc<Self>,
        broker: &Broker,
        spools: Option<&mut Spools>,
        force: bool,
    ) {
        let chunks = snapshot(broker, CHECKPOINT_CHUNK_BYTES);
        let (n_paged, paged_bytes) = broker.paged_totals();
        let live_bytes: u64 = chunks
            .iter()
            .flatten()
            .map(crate::durable::Op::approx_bytes)
            .sum::<u64>()
            + paged_bytes
            + 64 * n_paged;
        let epoch = {
            let mut book = self.book.lock().expect("log lock");
            if book.checkpoint_running {
                return;
            }
            let reclaimable = book.bytes_since_checkpoint + book.last_checkpoint_bytes;
            if !force && book.bytes_since_checkpoint > 0 && live_bytes * 2 > reclaimable {
                // Rewriting the live state would cost more than it frees: wait for more garbage.
                book.next_checkpoint_bytes = book.bytes_since_checkpoint + live_bytes * 2;
                return;
            }
            book.checkpoint_running = true;
            book.epoch += 1;
            book.bytes_since_checkpoint = 0;
            book.recheck_at = 0;
            book.last_checkpoint_bytes = live_bytes;
            book.next_checkpoint_bytes = self.checkpoint_bytes.max(live_bytes * 2);
            book.epoch
        };
        let mut records = vec![Record::CheckpointBegin { epoch }.encode()];
        records.extend(
            chunks
                .into_iter()
                .map(|ops| Record::CheckpointChunk { epoch, ops }.encode()),
        );
        let ranges = spools.map(Spools::ranges).unwrap_or_default();
        if ranges.is_empty() {
            records.push(Record::CheckpointEnd { epoch }.encode());
            self.append_checkpoint_end(epoch, records);
            return;
        }
        // The begin and the in-memory state now (log order is core order), the paged messages
        // from a thread, then the end.
        let log = Arc::downgrade(self);
        self.wal.append(
            records,
            Box::new(move |outcome| Self::track_checkpoint_part(&log, epoch, outcome)),
        );
        let log = self.clone();
        let now_ms = broker.now_ms();
        let copier = std::thread::Builder::new()
            .name("wharf-checkpoint".to_owned())
            .spawn(move || log.copy_paged(epoch, now_ms, ranges))
            .expect("spawning the checkpoint thread");
        let previous = self.copier.lock().expect("log lock").replace(copier);
        if let Some(previous) = previous {
            // Finished: a checkpoint starts only once the previous one ended.
            let _ = previous.join();
        }
    }

    fn track_checkpoint_part(
        log: &std::sync::Weak<Log>,
        epoch: u64,
        outcome: Result<wharf_storage::Committed, WalError>,
    ) {
        let Some(log) = log.upgrade() else { return };
        match outcome {
            Ok(committed) => log.track(epoch, committed.lsns),
            Err(err) => log.failed(&err),
        }
    }

    /// The checkpoint thread: appends the paged messages of `ranges` as checkpoint chunks, one
    /// at a time (waiting for each, so a large copy never floods the WAL), then the end.
    fn copy_paged(self: Arc<Self>, epoch: u64, now_ms: u64, ranges: Vec<SpoolRange>) {
        let append_chunk = |ops: Vec<Op>| -> bool {
            let (sender, receiver) = std::sync::mpsc::sync_channel(1);
            let log = Arc::downgrade(&self);
            self.wal.append(
                vec![Record::CheckpointChunk { epoch, ops }.encode()],
                Box::new(move |outcome| {
                    let ok = outcome.is_ok();
                    Self::track_checkpoint_part(&log, epoch, outcome);
                    let _ = sender.send(ok);
                }),
            );
            receiver.recv().unwrap_or(false)
        };
        let mut ops: Vec<Op> = Vec::new();
        let mut bytes = 0usize;
        let mut failed = false;
        for range in &ranges {
            let copied = range.for_each(|entry| {
                if failed {
                    return;
                }
                let Some(durable_id) = entry.durable_id else {
                    return;
                };
                bytes += entry.message.body.len() + 64;
                self.paged_copied.fetch_add(1, Ordering::Relaxed);
                ops.push(Op::EnqueueAt {
                    durable_id,
                    queues: vec![range.queue.to_string()],
                    message: StoredMessage::from(&*entry.message),
                    delay_ms: entry.message.delay_ms,
                    ready_at_ms: now_ms,
                });
                if bytes >= CHECKPOINT_CHUNK_BYTES {
                    bytes = 0;
                    failed = !append_chunk(std::mem::take(&mut ops));
                }
            });
            if let Err(err) = copied {
                // Paged messages that cannot be read cannot be delivered either: fail-stop.
                error!("checkpoint: {err}: stopping");
                self.poisoned.store(true, Ordering::Release);
                (self.fail_stop)(err);
                failed = true;
            }
            if failed {
                break;
            }
        }
        if !failed && !ops.is_empty() {
            failed = !append_chunk(ops);
        }
        if failed {
            // No end: replay keeps using the previous checkpoint and everything after it.
            self.book.lock().expect("log lock").checkpoint_running = false;
            return;
        }
        self.append_checkpoint_end(epoch, vec![Record::CheckpointEnd { epoch }.encode()]);
    }

    /// Appends the last records of checkpoint `epoch`; once they are on disk every record of
    /// earlier epochs is released.
    fn append_checkpoint_end(self: &Arc<Self>, epoch: u64, records: Vec<bytes::Bytes>) {
        let log = Arc::downgrade(self);
        self.wal.append(
            records,
            Box::new(move |outcome| {
                let Some(log) = log.upgrade() else { return };
                match outcome {
                    Ok(committed) => {
                        {
                            let mut book = log.book.lock().expect("log lock");
                            book.checkpoint_running = false;
                            book.lsns
                                .entry(epoch)
                                .or_default()
                                .extend(committed.lsns.iter().copied());
                            let keep = book.lsns.split_off(&epoch);
                            let old = std::mem::replace(&mut book.lsns, keep);
                            book.released_below = epoch;
                            book.to_release.extend(old.into_values().flatten());
                        }
                        log.checkpoints.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => {
                        log.book.lock().expect("log lock").checkpoint_running = false;
                        log.failed(&err);
                    }
                }
            }),
        );
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
