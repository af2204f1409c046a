//! Checkpoints: the live durable state rewritten so that older records can be released.
//!
//! Under the broker lock a checkpoint only appends its `CheckpointBegin` and captures the state
//! ([`Captured`]: operations for the topology and dedup windows, shared references for the
//! messages). A thread of the log then encodes the state and the paged messages (read from
//! their spool files) into `CheckpointChunk` records of bounded size, each on disk before the
//! next is appended, and appends the `CheckpointEnd` only once the begin and every chunk are
//! durable; then every record of earlier epochs is released. A chunk that is refused or fails
//! abandons the checkpoint: no end, nothing released (docs/durability.md).

use super::journal::Log;
use super::record::RecordError;
use super::record::{
    Op, OpRecords, Record, StoredMessage, bind_op, declare_queue_op, stored_headers,
};
use super::spool::{SpoolError, SpoolRange, Spools};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tracing::{error, warn};
use wharf_core::{Broker, DEFAULT_VHOST, Message, VhostLimits, resource_key};
use wharf_storage::WalError;

/// Why a checkpoint was abandoned (no end record: the previous checkpoint and every record
/// since are kept).
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The log closed before the checkpoint's records were on disk.
    #[error("the log closed")]
    Closed,
    /// The WAL refused or failed a record of the checkpoint.
    #[error("appending a checkpoint record failed: {0}")]
    Append(#[source] WalError),
    /// An operation of the captured state does not fit in a record.
    #[error("a checkpoint operation does not encode: {0}")]
    Encode(#[source] RecordError),
    /// Paged messages could not be read back to be copied (the broker stops).
    #[error("paged messages cannot be read: {0}")]
    Spool(#[source] SpoolError),
}

/// Log bytes appended after which a checkpoint is considered (and the live state is at most
/// half of them, so a checkpoint never rewrites more than it frees).
pub const CHECKPOINT_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// A deferred checkpoint is retried early (see [`Log::maybe_checkpoint`]) only while the live
/// state in memory is at most this: it is captured under the broker lock, so a large one would
/// stall every connection (paged messages are copied without the lock and do not count).
const RECHECK_IN_MEMORY_BYTES_MAX: u64 = 32 * 1024 * 1024;
/// Encoded bytes per checkpoint chunk record: small enough that a chunk is one quick write
/// among the batches appended meanwhile, large enough that a chunk costs few records.
pub const CHECKPOINT_CHUNK_BYTES_DEFAULT: usize = 1024 * 1024;
/// A durable message as a checkpoint captures it: its id, the message, and the queues it is in
/// with the time each holds it until (delayed), if any.
type CapturedMessage = (u64, Arc<Message>, Vec<(Arc<str>, Option<u64>)>);

/// The live durable state, captured under the broker lock for a checkpoint: topology and dedup
/// windows as operations, messages as shared references. Turning the messages into log
/// operations ([`Captured::into_ops`]) and encoding them happen later, without the lock.
#[derive(Debug)]
pub struct Captured {
    ops: Vec<Op>,
    messages: Vec<CapturedMessage>,
    now_ms: u64,
}

/// The durable exchanges, queues and bindings of `vhost`, as operations.
fn capture_topology(broker: &Broker, vhost: &str, ops: &mut Vec<Op>) {
    for exchange in broker.list_exchanges(vhost) {
        if exchange.options.durable && !exchange.builtin {
            ops.push(Op::DeclareExchange {
                name: resource_key(vhost, &exchange.name),
                kind: exchange.kind.into(),
                auto_delete: exchange.options.auto_delete,
                internal: exchange.options.internal,
                arguments: stored_headers(&exchange.options.arguments),
            });
        }
    }
    for queue in broker.list_queues(vhost) {
        if let Some(options) = broker.queue_options(vhost, &queue.name)
            && options.durable
            && !options.exclusive
        {
            let declared_by = broker.queue_declarer(vhost, &queue.name);
            ops.extend(declare_queue_op(
                vhost,
                &queue.name,
                options,
                declared_by.map(|declarer| &**declarer),
            ));
        }
    }
    for binding in broker.list_bindings(vhost) {
        if let Some(op) = bind_op(
            broker,
            vhost,
            &binding.source,
            &binding.target,
            &binding.routing_key,
            &binding.arguments,
            true,
        ) {
            ops.push(op);
        }
    }
}

impl Captured {
    /// Captures `broker`'s durable state (paged messages are not in it: they are copied from
    /// their spool files).
    pub fn capture(broker: &Broker) -> Captured {
        let mut ops: Vec<Op> = Vec::new();
        let vhosts = broker.list_vhosts();
        // Virtual hosts first, without their limits: a limit lowered below what a virtual host
        // holds refuses only what comes next, so its queues must replay before it applies.
        for vhost in vhosts.iter().filter(|vhost| vhost.name != DEFAULT_VHOST) {
            ops.push(Op::DeclareVhost {
                name: vhost.name.clone(),
                max_connections: None,
                max_queues: None,
            });
        }
        for vhost in &vhosts {
            capture_topology(broker, &vhost.name, &mut ops);
        }
        for vhost in vhosts
            .iter()
            .filter(|vhost| vhost.limits != VhostLimits::default())
        {
            ops.push(Op::DeclareVhost {
                name: vhost.name.clone(),
                max_connections: vhost.limits.max_connections,
                max_queues: vhost.limits.max_queues,
            });
        }
        for (queue, message_id, until_ms) in broker.durable_dedup_entries() {
            ops.push(Op::Dedup {
                queue: queue.to_string(),
                message_id,
                until_ms,
            });
        }
        Captured {
            ops,
            messages: broker.durable_messages(),
            now_ms: broker.now_ms(),
        }
    }

    /// The broker's clock when it was captured.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// What it will take in the log, as [`Op::approx_bytes`] counts it.
    pub fn approx_bytes(&self) -> u64 {
        64 * self.ops.len() as u64
            + self
                .messages
                .iter()
                .map(|(_, message, _)| {
                    message.body.len() as u64 + crate::limits::MESSAGE_OVERHEAD_BYTES as u64
                })
                .sum::<u64>()
    }

    /// The operations that rebuild the state from nothing: topology, dedup windows, then every
    /// message in id order (one operation per distinct ready time, usually one: ready now).
    pub fn into_ops(self) -> impl Iterator<Item = Op> {
        let now_ms = self.now_ms;
        let messages = self
            .messages
            .into_iter()
            .flat_map(move |(durable_id, message, queues)| {
                let mut by_ready_at: BTreeMap<u64, Vec<String>> = BTreeMap::new();
                for (queue, delayed_until) in queues {
                    by_ready_at
                        .entry(delayed_until.unwrap_or(now_ms))
                        .or_default()
                        .push(queue.to_string());
                }
                let stored = StoredMessage::from(&*message);
                by_ready_at
                    .into_iter()
                    .map(move |(ready_at_ms, queues)| Op::EnqueueAt {
                        durable_id,
                        queues,
                        message: stored.clone(),
                        delay_ms: message.delay_ms,
                        ready_at_ms,
                    })
            });
        self.ops.into_iter().chain(messages)
    }
}

impl Log {
    /// Writes a checkpoint if enough log has accumulated and the live state is small next to
    /// it. Call with the broker lock held, after appending a batch.
    pub fn maybe_checkpoint(self: &Arc<Self>, broker: &Broker, spools: Option<&mut Spools>) {
        self.consider_checkpoint(broker, spools, false);
    }

    pub(super) fn consider_checkpoint(
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
            // plus MESSAGE_OVERHEAD_BYTES per ready message of durable queues; deliveries
            // outstanding and delayed messages are not counted, transient messages in durable
            // queues are): when it is too large, defer without capturing anything.
            let (n_ready, ready_bytes) = broker.durable_ready_totals();
            let (n_paged, paged_bytes) = broker.durable_paged_totals();
            let estimate = ready_bytes + crate::limits::MESSAGE_OVERHEAD_BYTES as u64 * n_ready;
            if estimate.saturating_mul(2) > reclaimable {
                if due {
                    book.next_checkpoint_bytes = since + estimate * 2;
                }
                return;
            }
            let in_memory = (ready_bytes - paged_bytes)
                + crate::limits::MESSAGE_OVERHEAD_BYTES as u64 * (n_ready - n_paged);
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
        let (n_paged, paged_bytes) = broker.durable_paged_totals();
        let epoch = {
            if self.book.lock().expect("log lock").checkpoint_running {
                return;
            }
            let captured = Captured::capture(broker);
            let live_bytes = captured.approx_bytes()
                + paged_bytes
                + crate::limits::MESSAGE_OVERHEAD_BYTES as u64 * n_paged;
            let mut book = self.book.lock().expect("log lock");
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
            (book.epoch, captured)
        };
        let (epoch, captured) = epoch;
        // Only durable queues' paged messages are logged (a transient queue's are not read).
        let mut ranges = spools.map(Spools::ranges).unwrap_or_default();
        ranges.retain(|range| broker.queue_is_durable(&range.queue));
        // The begin's place in the log is taken now, under the broker lock: every batch staged
        // before it precedes it in the log, and every batch staged after it follows it and the
        // state captured here (log order is core order); replay applies those batches after
        // the checkpoint's chunks. The thread appends the begin when its turn comes (after the
        // batches before it, which their own threads append once they release the lock), then
        // encodes and appends the chunks, one at a time, without the broker lock.
        let mut begin_ticket = self.ticket();
        let log = self.clone();
        let copier = std::thread::Builder::new()
            .name("wharf-checkpoint".to_owned())
            .spawn(move || {
                let (begun, begin_written) = std::sync::mpsc::sync_channel(1);
                {
                    let _turn = begin_ticket.wait();
                    log.append_part(
                        Record::CheckpointBegin { epoch }.encode(),
                        epoch,
                        Box::new(move |written| {
                            let _ = begun.send(written);
                        }),
                    );
                }
                let written = begin_written
                    .recv()
                    .unwrap_or(Err(CheckpointError::Closed))
                    .and_then(|()| log.stream_checkpoint(epoch, captured, ranges));
                if let Err(reason) = written {
                    // No end: replay keeps using the previous checkpoint and every record
                    // after it, none of which is released.
                    log.book.lock().expect("log lock").checkpoint_running = false;
                    warn!(
                        epoch,
                        "checkpoint abandoned: {reason}; the previous checkpoint and every \
                         record since are kept"
                    );
                }
            })
            .expect("spawning the checkpoint thread");
        let previous = self.copier.lock().expect("log lock").replace(copier);
        if let Some(previous) = previous {
            // Finished: a checkpoint starts only once the previous one ended.
            let _ = previous.join();
        }
    }

    /// Appends one record of checkpoint `epoch`; `written` learns whether it is on disk (with
    /// the reason if not).
    fn append_part(
        self: &Arc<Self>,
        record: bytes::Bytes,
        epoch: u64,
        written: Box<dyn FnOnce(Result<(), CheckpointError>) + Send>,
    ) {
        let log = Arc::downgrade(self);
        let _contiguous = self.append_lock.lock().expect("append lock");
        self.wal.append(
            vec![record],
            Box::new(move |outcome| {
                let Some(log) = log.upgrade() else {
                    written(Err(CheckpointError::Closed));
                    return;
                };
                match outcome {
                    Ok(committed) => {
                        log.track(epoch, committed.lsns);
                        written(Ok(()));
                    }
                    Err(err) => {
                        log.failed(&err);
                        written(Err(CheckpointError::Append(err)));
                    }
                }
            }),
        );
    }

    /// [`Log::append_part`], waiting until the record is on disk (the checkpoint thread: one
    /// chunk at a time, so a large checkpoint never floods the WAL).
    fn append_part_wait(
        self: &Arc<Self>,
        record: bytes::Bytes,
        epoch: u64,
    ) -> Result<(), CheckpointError> {
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        self.append_part(
            record,
            epoch,
            Box::new(move |written| {
                let _ = sender.send(written);
            }),
        );
        receiver.recv().unwrap_or(Err(CheckpointError::Closed))
    }

    /// The checkpoint thread, once the begin is on disk: the captured state, then the paged
    /// messages of `ranges`, as chunk records of about `chunk_bytes`, each on disk before the
    /// next is appended; then the end, and only then are the records it supersedes released.
    /// Any failure abandons the checkpoint (the caller keeps everything older).
    fn stream_checkpoint(
        self: &Arc<Self>,
        epoch: u64,
        captured: Captured,
        ranges: Vec<SpoolRange>,
    ) -> Result<(), CheckpointError> {
        let now_ms = captured.now_ms();
        let mut pending = OpRecords::default();
        let append = |op: Op, pending: &mut OpRecords| -> Result<(), CheckpointError> {
            pending
                .push(op, self.op_bytes_max())
                .map_err(CheckpointError::Encode)?;
            if pending.bytes() >= self.chunk_bytes {
                for record in std::mem::take(pending).chunks(epoch, self.chunk_bytes) {
                    self.append_part_wait(record, epoch)?;
                }
            }
            Ok(())
        };
        for op in captured.into_ops() {
            append(op, &mut pending)?;
        }
        for range in &ranges {
            let mut failed: Result<(), CheckpointError> = Ok(());
            let copied = range.for_each(|entry| {
                if failed.is_err() {
                    return;
                }
                let Some(durable_id) = entry.durable_id else {
                    return;
                };
                self.paged_copied.fetch_add(1, Ordering::Relaxed);
                failed = append(
                    Op::EnqueueAt {
                        durable_id,
                        queues: vec![range.queue.to_string()],
                        message: StoredMessage::from(&*entry.message),
                        delay_ms: entry.message.delay_ms,
                        ready_at_ms: now_ms,
                    },
                    &mut pending,
                );
            });
            if let Err(err) = copied {
                // Paged messages that cannot be read cannot be delivered either: fail-stop.
                error!("checkpoint: {err}: stopping");
                self.poisoned.store(true, Ordering::Release);
                (self.fail_stop)(err.to_string());
                return Err(CheckpointError::Spool(err));
            }
            failed?;
        }
        for record in pending.chunks(epoch, self.chunk_bytes) {
            self.append_part_wait(record, epoch)?;
        }
        self.append_part_wait(Record::CheckpointEnd { epoch }.encode(), epoch)?;
        // On disk after its begin and every chunk: everything of earlier epochs is superseded.
        {
            let mut book = self.book.lock().expect("log lock");
            book.checkpoint_running = false;
            let keep = book.lsns.split_off(&epoch);
            let old = std::mem::replace(&mut book.lsns, keep);
            book.released_below = epoch;
            book.to_release.extend(old.into_values().flatten());
        }
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
