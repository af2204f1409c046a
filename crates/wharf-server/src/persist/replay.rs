//! Recovery: rebuilding the broker from its log, streamed from the WAL. The last complete
//! checkpoint, then every batch after its begin (a batch split over several records only once
//! its last part is read); a logged change that no longer applies stops recovery with the
//! record's LSN instead of being dropped.

use super::record::{
    KIND_BATCH, KIND_BEGIN, KIND_CHUNK, KIND_END, KIND_PART, Op, RECORD_FORMAT_VERSION, Record,
    RecordError, SYSTEM_CONNECTION, core_headers,
};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;
use wharf_core::{
    BindTarget, Broker, Command, Declarer, ExchangeOptions, Message, QueueFeatures, QueueOptions,
    VhostLimits, split_resource_key,
};

fn bind_target(to_queue: bool, destination: String) -> BindTarget {
    if to_queue {
        BindTarget::Queue(destination)
    } else {
        BindTarget::Exchange(destination)
    }
}

/// Rebuilds broker state from a log's records (in LSN order); see [`replay`]. Holds the
/// records in memory: for tests and small logs (the server streams them from the WAL).
#[derive(Debug, Default)]
pub struct Replay {
    records: Vec<(u64, Bytes)>,
}

/// What recovery found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Records read.
    pub records: u64,
    /// Durable queues, exchanges and bindings rebuilt (operations applied).
    pub topology_ops: u64,
    /// Messages put back (a message in two queues counts twice).
    pub messages: u64,
    /// The last complete checkpoint's epoch (0: none).
    pub epoch: u64,
}

impl Replay {
    /// Takes records already encoded (as the log holds them), in LSN order.
    pub fn from_encoded(records: Vec<(u64, Bytes)>) -> Replay {
        Replay { records }
    }

    /// Takes the records to replay; returns how many there are.
    pub fn plan(records: Vec<(u64, Record)>) -> (Replay, u64) {
        let n_records = records.len() as u64;
        let records = records
            .into_iter()
            .map(|(lsn, record)| (lsn, record.encode()))
            .collect();
        (Replay { records }, n_records)
    }

    /// Applies them to an empty broker (which must have `SYSTEM_CONNECTION` open); effects
    /// other than the log's (pages of queues larger than memory) go to `on_effect`.
    pub fn apply(
        self,
        broker: &mut Broker,
        now_ms: u64,
        on_effect: &mut dyn FnMut(wharf_core::Effect),
    ) -> Result<Recovered, RecordError> {
        let records = &self.records;
        replay::<RecordError, _>(
            || {
                records
                    .iter()
                    .map(|(lsn, payload)| Ok((*lsn, payload.clone())))
            },
            broker,
            now_ms,
            on_effect,
        )
    }
}

/// A record's kind and checkpoint epoch, read from its first bytes (its operations are not
/// decoded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    Batch,
    Begin(u64),
    Chunk(u64),
    End(u64),
    Part { more: bool },
}

fn head(lsn: u64, payload: &[u8]) -> Result<Head, RecordError> {
    let undecodable = |detail: &str| RecordError::Decode {
        lsn,
        detail: detail.to_owned(),
    };
    match payload.first() {
        Some(&RECORD_FORMAT_VERSION) => {}
        Some(&version) => return Err(RecordError::Version { lsn, version }),
        None => return Err(undecodable("empty payload")),
    }
    // Postcard: the variant index, then (for checkpoint records) the epoch, as varints.
    let (variant, rest) = postcard::take_from_bytes::<u32>(&payload[1..])
        .map_err(|err| undecodable(&err.to_string()))?;
    let epoch = || {
        postcard::take_from_bytes::<u64>(rest)
            .map(|(epoch, _)| epoch)
            .map_err(|err| undecodable(&err.to_string()))
    };
    Ok(match variant {
        KIND_BATCH => Head::Batch,
        KIND_BEGIN => Head::Begin(epoch()?),
        KIND_CHUNK => Head::Chunk(epoch()?),
        KIND_END => Head::End(epoch()?),
        KIND_PART => match rest.first() {
            Some(0) => Head::Part { more: false },
            Some(1) => Head::Part { more: true },
            _ => return Err(undecodable("a batch part without its flag")),
        },
        other => return Err(undecodable(&format!("unknown record kind {other}"))),
    })
}

/// Sets of ids kept as runs (acks are mostly in order, so a run per stretch of them).
#[derive(Debug, Default)]
pub(super) struct IdRuns {
    /// start → end (exclusive).
    pub(super) runs: BTreeMap<u64, u64>,
}

impl IdRuns {
    pub(super) fn insert_range(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        // Merge with every run that overlaps or touches [start, end).
        if let Some((&before, &before_end)) = self.runs.range(..=start).next_back()
            && before_end >= start
        {
            start = before;
            end = end.max(before_end);
        }
        let touching: Vec<u64> = self.runs.range(start..=end).map(|(&s, _)| s).collect();
        for run_start in touching {
            let run_end = self.runs.remove(&run_start).expect("listed");
            end = end.max(run_end);
        }
        self.runs.insert(start, end);
    }

    pub(super) fn contains(&self, id: u64) -> bool {
        self.runs
            .range(..=id)
            .next_back()
            .is_some_and(|(_, &end)| id < end)
    }
}

/// What the first pass learns: which logged messages are gone, without keeping any message.
#[derive(Debug, Default)]
struct Fates {
    /// Per queue, the ids settled in it.
    settled: BTreeMap<String, IdRuns>,
    /// Per queue, the highest id seen when it was last deleted: its messages up to that id
    /// went with it (ids grow in replay order).
    deleted_up_to: BTreeMap<String, u64>,
    max_id: u64,
}

impl Fates {
    fn learn(&mut self, op: &Op) {
        match op {
            Op::Enqueue { durable_id, .. } | Op::EnqueueAt { durable_id, .. } => {
                self.max_id = self.max_id.max(*durable_id);
            }
            Op::Settle { durable_id, queue } => self
                .settled
                .entry(queue.clone())
                .or_default()
                .insert_range(*durable_id, durable_id + 1),
            Op::SettleRange {
                first,
                count,
                queue,
            } => self
                .settled
                .entry(queue.clone())
                .or_default()
                .insert_range(*first, first.saturating_add(*count)),
            Op::DeleteQueue { name } => {
                self.deleted_up_to.insert(name.clone(), self.max_id);
            }
            _ => {}
        }
    }

    /// Whether message `durable_id` was deleted with (an earlier incarnation of) `queue`.
    fn deleted(&self, durable_id: u64, queue: &str) -> bool {
        self.deleted_up_to
            .get(queue)
            .is_some_and(|up_to| durable_id <= *up_to)
    }

    fn live(&self, durable_id: u64, queue: &str) -> bool {
        !self.deleted(durable_id, queue)
            && !self
                .settled
                .get(queue)
                .is_some_and(|settled| settled.contains(durable_id))
    }
}

/// Replays a log into an empty broker (which must have `SYSTEM_CONNECTION` open): the last
/// complete checkpoint (a checkpoint without its end, cut by a crash, is ignored), then every
/// batch after its begin — batches appended while a checkpoint copied paged messages lie
/// between its begin and its end, and follow its state. Everything before the checkpoint
/// used is ignored.
///
/// Memory stays bounded by what the broker keeps, not by the log: `source` is read three
/// times. The first pass finds the checkpoint from the records' first bytes; the second learns
/// which messages were settled or deleted (as runs of ids per queue); the third rebuilds the
/// topology and restores each live message as it is read, so a queue larger than memory pages
/// its tail out as it fills (its pages go to `on_effect`, with any other non-log effect).
/// Recovered messages are flagged redelivered, in log order per queue.
pub fn replay<E, I>(
    mut source: impl FnMut() -> I,
    broker: &mut Broker,
    now_ms: u64,
    on_effect: &mut dyn FnMut(wharf_core::Effect),
) -> Result<Recovered, E>
where
    E: From<RecordError>,
    I: Iterator<Item = Result<(u64, Bytes), E>>,
{
    // Pass 1: the last complete checkpoint, by record index.
    let mut begin_of: BTreeMap<u64, usize> = BTreeMap::new();
    let mut complete: Option<(u64, usize, usize)> = None;
    let mut n_records = 0usize;
    for item in source() {
        let (lsn, payload) = item?;
        match head(lsn, &payload)? {
            Head::Begin(epoch) => {
                begin_of.insert(epoch, n_records);
            }
            Head::End(epoch) => {
                if let Some(&begin) = begin_of.get(&epoch) {
                    complete = Some((epoch, begin, n_records));
                }
            }
            Head::Batch | Head::Chunk(_) | Head::Part { .. } => {}
        }
        n_records += 1;
    }
    let mut recovered = Recovered {
        records: n_records as u64,
        ..Recovered::default()
    };
    let checkpoint_epoch = complete.map(|(epoch, _, _)| epoch);
    let in_checkpoint =
        |idx: usize| complete.is_some_and(|(_, begin, end)| idx > begin && idx < end);
    let after = |idx: usize| complete.is_none_or(|(_, begin, _)| idx > begin);
    // Visits the replayed operations in replay order, each with the LSN of its record: the
    // checkpoint's chunks, then the batches after its begin (those inside the checkpoint are
    // held until its end). A batch split over several records is visited once its last part
    // is read; one cut short (its append failed, or the log ends) was never confirmed and is
    // skipped whole.
    let mut visit = |each: &mut dyn FnMut(u64, Op) -> Result<(), RecordError>| -> Result<(), E> {
        let mut held: Vec<(u64, Vec<Op>)> = Vec::new();
        // A split batch being read: the index and LSN of its first part, its operations so far.
        let mut split: Option<(usize, u64, Vec<Op>)> = None;
        for (idx, item) in source().enumerate() {
            let (lsn, payload) = item?;
            let kind = head(lsn, &payload)?;
            if !matches!(kind, Head::Part { .. })
                && let Some((_, first_lsn, _)) = split.take()
            {
                tracing::warn!(
                    first_lsn,
                    "recovery: a batch split over several records ends before its last part \
                         (its append failed): it was never confirmed and is skipped"
                );
            }
            let batch = match kind {
                Head::Chunk(epoch) if in_checkpoint(idx) && Some(epoch) == checkpoint_epoch => {
                    if let Record::CheckpointChunk { ops, .. } = Record::decode(lsn, &payload)? {
                        for op in ops {
                            each(lsn, op)?;
                        }
                    }
                    None
                }
                Head::Batch if in_checkpoint(idx) || after(idx) => {
                    match Record::decode(lsn, &payload)? {
                        Record::Batch(ops) => Some((idx, lsn, ops)),
                        _ => unreachable!("the head says batch"),
                    }
                }
                Head::Part { more } => {
                    let first = split.get_or_insert_with(|| (idx, lsn, Vec::new())).0;
                    if (in_checkpoint(first) || after(first))
                        && let Record::BatchPart { ops, .. } = Record::decode(lsn, &payload)?
                    {
                        split.as_mut().expect("just set").2.extend(ops);
                    }
                    if more { None } else { split.take() }
                }
                _ => None,
            };
            if let Some((first, lsn, ops)) = batch {
                if in_checkpoint(first) {
                    held.push((lsn, ops));
                } else if after(first) {
                    for op in ops {
                        each(lsn, op)?;
                    }
                }
            }
            if complete.is_some_and(|(_, _, end)| idx == end) {
                for (lsn, ops) in held.drain(..) {
                    for op in ops {
                        each(lsn, op)?;
                    }
                }
            }
        }
        if let Some((_, first_lsn, _)) = split {
            tracing::warn!(
                first_lsn,
                "recovery: the log ends inside a batch split over several records: it was never \
                 confirmed and is skipped"
            );
        }
        Ok(())
    };
    // Pass 2: what was settled or deleted.
    let mut fates = Fates::default();
    visit(&mut |_, op| {
        fates.learn(&op);
        Ok(())
    })?;
    // Pass 3: rebuild.
    recovered.epoch = complete.map_or(0, |(epoch, _, _)| epoch);
    let mut effects = Vec::new();
    visit(&mut |lsn, op| {
        let deletes = matches!(
            op,
            Op::DeleteQueue { .. }
                | Op::DeleteExchange { .. }
                | Op::Unbind { .. }
                | Op::DeleteVhost { .. }
        );
        // Names in the log are resource keys: the virtual host, then the name in it.
        let split = |key: String| -> (Arc<str>, String) {
            let (vhost, name) = split_resource_key(&key);
            (vhost.into(), name.to_owned())
        };
        let command = match op {
            Op::Enqueue { .. } | Op::EnqueueAt { .. } => {
                // `Enqueue` (older logs): ready at recovery.
                let (durable_id, queues, message, ready_at_ms) = match op {
                    Op::Enqueue {
                        durable_id,
                        queues,
                        message,
                    } => (durable_id, queues, Message::from(message), None),
                    Op::EnqueueAt {
                        durable_id,
                        queues,
                        message,
                        delay_ms,
                        ready_at_ms,
                    } => {
                        let message = Message {
                            delay_ms,
                            ..Message::from(message)
                        };
                        (durable_id, queues, message, Some(ready_at_ms))
                    }
                    _ => unreachable!("matched above"),
                };
                let restored = restore(
                    broker,
                    now_ms,
                    &fates,
                    durable_id,
                    queues,
                    message,
                    ready_at_ms,
                    &mut effects,
                    &mut recovered,
                );
                effects.drain(..).for_each(&mut *on_effect);
                return restored.map_err(|detail| RecordError::Inconsistent { lsn, detail });
            }
            Op::Settle { .. } | Op::SettleRange { .. } => return Ok(()),
            Op::Dedup {
                queue,
                message_id,
                until_ms,
            } => {
                let (vhost, queue) = split(queue);
                Command::RestoreDedup {
                    vhost,
                    queue,
                    message_id,
                    until_ms,
                }
            }
            Op::DeleteQueue { name } => {
                let (vhost, name) = split(name);
                Command::DeleteQueue {
                    vhost,
                    connection: SYSTEM_CONNECTION,
                    name,
                    if_unused: false,
                    if_empty: false,
                }
            }
            Op::DeclareVhost {
                name,
                max_connections,
                max_queues,
            } => Command::AddVhost {
                name,
                limits: VhostLimits {
                    max_connections,
                    max_queues,
                },
            },
            Op::DeleteVhost { name } => Command::DeleteVhost { name },
            Op::DeclareQueue { .. } | Op::DeclareQueueBy { .. } => {
                let (name, declared_by, auto_delete, single_active_consumer, arguments) = match op {
                    Op::DeclareQueue {
                        name,
                        auto_delete,
                        single_active_consumer,
                        arguments,
                    } => (name, None, auto_delete, single_active_consumer, arguments),
                    Op::DeclareQueueBy {
                        name,
                        declared_by,
                        auto_delete,
                        single_active_consumer,
                        arguments,
                    } => (
                        name,
                        Some(declared_by),
                        auto_delete,
                        single_active_consumer,
                        arguments,
                    ),
                    _ => unreachable!("matched above"),
                };
                let (vhost, name) = split(name);
                // Its declarer counts it again; no limit applies to what was logged.
                let declarer = declared_by.map(|declared_by| Declarer {
                    name: declared_by.into(),
                    max_queues: None,
                });
                Command::DeclareQueue {
                    vhost,
                    connection: SYSTEM_CONNECTION,
                    name,
                    options: QueueOptions {
                        durable: true,
                        exclusive: false,
                        auto_delete,
                        single_active_consumer,
                        arguments: core_headers(arguments),
                    },
                    passive: false,
                    declarer,
                }
            }
            Op::DeclareExchange {
                name,
                kind,
                auto_delete,
                internal,
                arguments,
            } => {
                let (vhost, name) = split(name);
                Command::DeclareExchange {
                    vhost,
                    name,
                    kind: kind.into(),
                    options: ExchangeOptions {
                        durable: true,
                        auto_delete,
                        internal,
                        arguments: core_headers(arguments),
                    },
                    passive: false,
                }
            }
            Op::DeleteExchange { name } => {
                let (vhost, name) = split(name);
                Command::DeleteExchange {
                    vhost,
                    name,
                    if_unused: false,
                }
            }
            Op::Bind {
                source,
                to_queue,
                destination,
                routing_key,
                arguments,
            } => {
                let (vhost, source) = split(source);
                Command::Bind {
                    vhost,
                    source,
                    target: bind_target(to_queue, split_resource_key(&destination).1.to_owned()),
                    routing_key,
                    arguments: core_headers(arguments),
                }
            }
            Op::Unbind {
                source,
                to_queue,
                destination,
                routing_key,
                arguments,
            } => {
                let (vhost, source) = split(source);
                Command::Unbind {
                    vhost,
                    source,
                    target: bind_target(to_queue, split_resource_key(&destination).1.to_owned()),
                    routing_key,
                    arguments: core_headers(arguments),
                }
            }
        };
        // Replaying what once succeeded succeeds again; a failure means the log and the core
        // disagree, and recovery stops rather than drop what the log holds. One exception: a
        // deletion of what is already gone. Deleting a queue or a binding deletes an
        // auto-delete exchange with it, in replay as it did live, and the log then holds that
        // exchange's deletion too.
        let applied = broker.apply(now_ms, command, &mut effects);
        effects.drain(..).for_each(&mut *on_effect);
        match applied {
            Ok(_) => {}
            Err(wharf_core::CoreError::NotFound { .. }) if deletes => {}
            Err(err) => {
                return Err(RecordError::Inconsistent {
                    lsn,
                    detail: err.to_string(),
                });
            }
        }
        recovered.topology_ops += 1;
        Ok(())
    })?;
    Ok(recovered)
}

/// Recovery of one logged message: back into each queue it is still live in, and into the
/// dedup window of each queue it entered (acked since or not).
#[allow(clippy::too_many_arguments)]
fn restore(
    broker: &mut Broker,
    now_ms: u64,
    fates: &Fates,
    durable_id: u64,
    queues: Vec<String>,
    message: Message,
    ready_at_ms: Option<u64>,
    effects: &mut Vec<wharf_core::Effect>,
    recovered: &mut Recovered,
) -> Result<(), String> {
    let message = Arc::new(message);
    for queue in queues {
        if fates.deleted(durable_id, &queue) {
            continue;
        }
        let (vhost, name) = split_resource_key(&queue);
        let vhost: Arc<str> = vhost.into();
        if let (Some(id), Some(ready_at_ms)) = (&message.message_id, ready_at_ms) {
            let window = broker
                .queue_options(&vhost, name)
                .and_then(|options| QueueFeatures::try_from(&options.arguments).ok())
                .and_then(|features| features.dedup_window);
            if let Some(window) = window {
                let enqueued_at = ready_at_ms.saturating_sub(message.delay_ms.unwrap_or(0));
                let command = Command::RestoreDedup {
                    vhost: vhost.clone(),
                    queue: name.to_owned(),
                    message_id: id.clone(),
                    until_ms: enqueued_at.saturating_add(window),
                };
                broker.apply(now_ms, command, effects).map_err(|err| {
                    format!("message {durable_id}'s dedup entry in queue '{queue}': {err}")
                })?;
            }
        }
        if !fates.live(durable_id, &queue) {
            continue;
        }
        let command = Command::Restore {
            vhost,
            queue: name.to_owned(),
            durable_id,
            message: message.clone(),
            ready_at_ms: ready_at_ms.unwrap_or(now_ms),
        };
        broker.apply(now_ms, command, effects).map_err(|err| {
            format!("message {durable_id} cannot go back to queue '{queue}': {err}")
        })?;
        recovered.messages += 1;
    }
    Ok(())
}
