//! The broker's write-ahead log at run time: appends batches of durable operations (always
//! under the broker lock, so log order is core order), tracks which records each checkpoint
//! supersedes, writes checkpoints, releases superseded records, and classifies failures:
//! a failed fsync is fail-stop; a full disk refuses durable publishes for a while.

use crate::durable::{Record, Recovered, Replay, SYSTEM_CONNECTION, snapshot};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};
use wharf_core::{Broker, Command};
use wharf_storage::{Lsn, Storage, SyncCoverage, SyncPolicy, Wal, WalConfig, WalError};

/// Log bytes appended after which a checkpoint is considered (and the live state is at most
/// half of them, so a checkpoint never rewrites more than it frees).
pub const CHECKPOINT_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
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
    /// Checkpoints written since start (for tests and metrics).
    pub checkpoints: Arc<AtomicU64>,
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
        let mut records = Vec::new();
        let mut lsns = Vec::new();
        for item in wal.records(wal.first_lsn()) {
            let (lsn, payload) = item?;
            records.push((lsn.0, Record::decode(lsn.0, &payload)?));
            lsns.push(lsn);
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
        let (replay, _) = Replay::plan(records);
        let mut recovered = replay.apply(broker, now_ms);
        recovered.records = lsns.len() as u64;
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
            checkpoints: Arc::new(AtomicU64::new(0)),
        });
        if recovered.records > 0 {
            info!(
                records = recovered.records,
                messages = recovered.messages,
                "recovered from the log"
            );
            // Start from a clean checkpoint so the replayed history can be released.
            log.checkpoint(broker);
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

    /// Appends one record. Call with the broker lock held, so that log order is the order in
    /// which the core applied the commands. `done` runs on the committing thread: the WAL's
    /// writer thread, or a leader's (see [`Log::lead`]).
    pub fn append(self: &Arc<Self>, record: &Record, done: Box<dyn FnOnce(Outcome) + Send>) {
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
        self.wal.append(
            vec![payload],
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

    /// Writes a checkpoint if enough log has accumulated and the live state is small next to
    /// it. Call with the broker lock held, after appending a batch.
    pub fn maybe_checkpoint(self: &Arc<Self>, broker: &Broker) {
        {
            let book = self.book.lock().expect("log lock");
            if book.checkpoint_running || book.bytes_since_checkpoint < book.next_checkpoint_bytes {
                return;
            }
        }
        self.checkpoint(broker);
    }

    /// Writes a checkpoint of `broker`'s durable state now.
    pub fn checkpoint(self: &Arc<Self>, broker: &Broker) {
        let chunks = snapshot(broker, CHECKPOINT_CHUNK_BYTES);
        let live_bytes: u64 = chunks
            .iter()
            .flatten()
            .map(crate::durable::Op::approx_bytes)
            .sum();
        let epoch = {
            let mut book = self.book.lock().expect("log lock");
            if book.bytes_since_checkpoint > 0 && live_bytes * 2 > book.bytes_since_checkpoint {
                // Rewriting the live state would cost more than it frees: wait for more garbage.
                book.next_checkpoint_bytes = book.bytes_since_checkpoint + live_bytes * 2;
                return;
            }
            book.checkpoint_running = true;
            book.epoch += 1;
            book.bytes_since_checkpoint = 0;
            book.next_checkpoint_bytes = self.checkpoint_bytes.max(live_bytes * 2);
            book.epoch
        };
        let mut records = vec![Record::CheckpointBegin { epoch }.encode()];
        records.extend(
            chunks
                .into_iter()
                .map(|ops| Record::CheckpointChunk { epoch, ops }.encode()),
        );
        records.push(Record::CheckpointEnd { epoch }.encode());
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

    /// Commits what is queued, fsyncs, and stops the writer.
    pub fn close(&self) {
        self.wal.close();
    }
}
