//! What the broker writes to its write-ahead log, and how it rebuilds itself from it.
//!
//! The log holds *operations on durable state*, never transient ones: durable topology
//! (exchanges, queues, bindings whose both ends are durable), persistent messages that reached
//! durable queues (`Enqueue`, one record per message however many queues it reached), and
//! their settlement (`Settle`: acked, dropped, purged, auto-acked). Replay applies them in log
//! order. To keep the log from growing forever, the broker periodically writes a
//! **checkpoint**: the whole live durable state as one batch of records
//! (`CheckpointBegin`, `CheckpointChunk`s, `CheckpointEnd`, appended contiguously under the
//! broker lock, so nothing interleaves), and once it is on disk every older record is released.
//! Recovery starts from the last complete checkpoint and replays the batches after it.
//!
//! WAL compaction is disabled for this log: moving a record would change replay order.
//! See docs/durability.md for what a confirm promises.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use wharf_core::{
    BindTarget, Broker, Command, ConnectionId, ExchangeKind, ExchangeOptions, HeaderValue, Headers,
    Message, QueueFeatures, QueueOptions,
};

/// The connection id recovery uses to declare queues (real connections start at 1).
pub const SYSTEM_CONNECTION: ConnectionId = ConnectionId(0);

/// Version byte in front of every record payload; bumped only with a documented migration.
pub const RECORD_FORMAT_VERSION: u8 = 1;

/// A header value as stored in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StoredValue {
    /// Text.
    Str(String),
    /// Integer.
    Int(i64),
    /// Double.
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// Raw bytes.
    Bytes(Bytes),
    /// List.
    List(Vec<StoredValue>),
    /// Nested map.
    Map(Vec<(String, StoredValue)>),
}

impl From<&HeaderValue> for StoredValue {
    fn from(value: &HeaderValue) -> Self {
        match value {
            HeaderValue::Str(text) => StoredValue::Str(text.clone()),
            HeaderValue::Int(number) => StoredValue::Int(*number),
            HeaderValue::Float(number) => StoredValue::Float(*number),
            HeaderValue::Bool(flag) => StoredValue::Bool(*flag),
            HeaderValue::Bytes(bytes) => StoredValue::Bytes(bytes.clone()),
            HeaderValue::List(values) => {
                StoredValue::List(values.iter().map(StoredValue::from).collect())
            }
            HeaderValue::Map(map) => StoredValue::Map(stored_headers(map)),
        }
    }
}

impl From<StoredValue> for HeaderValue {
    fn from(value: StoredValue) -> Self {
        match value {
            StoredValue::Str(text) => HeaderValue::Str(text),
            StoredValue::Int(number) => HeaderValue::Int(number),
            StoredValue::Float(number) => HeaderValue::Float(number),
            StoredValue::Bool(flag) => HeaderValue::Bool(flag),
            StoredValue::Bytes(bytes) => HeaderValue::Bytes(bytes),
            StoredValue::List(values) => {
                HeaderValue::List(values.into_iter().map(HeaderValue::from).collect())
            }
            StoredValue::Map(map) => HeaderValue::Map(core_headers(map)),
        }
    }
}

fn stored_headers(headers: &Headers) -> Vec<(String, StoredValue)> {
    headers
        .iter()
        .map(|(key, value)| (key.to_owned(), StoredValue::from(value)))
        .collect()
}

fn core_headers(entries: Vec<(String, StoredValue)>) -> Headers {
    entries
        .into_iter()
        .map(|(key, value)| (key, HeaderValue::from(value)))
        .collect()
}

/// A message as stored in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    exchange: String,
    routing_key: String,
    message_id: Option<String>,
    headers: Vec<(String, StoredValue)>,
    content_type: Option<String>,
    content_encoding: Option<String>,
    timestamp_ms: Option<u64>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    priority: u8,
    expiration_ms: Option<u64>,
    body: Bytes,
}

impl StoredMessage {
    /// Bytes it takes in the log, roughly: the body dominates, metadata is bounded.
    pub fn approx_bytes(&self) -> u64 {
        self.body.len() as u64 + 64
    }

    /// Body bytes.
    pub fn body_len(&self) -> usize {
        self.body.len()
    }
}

impl From<&Message> for StoredMessage {
    fn from(message: &Message) -> Self {
        StoredMessage {
            exchange: message.exchange.to_string(),
            routing_key: message.routing_key.to_string(),
            message_id: message.message_id.clone(),
            headers: stored_headers(&message.headers),
            content_type: message.content_type.clone(),
            content_encoding: message.content_encoding.clone(),
            timestamp_ms: message.timestamp_ms,
            correlation_id: message.correlation_id.clone(),
            reply_to: message.reply_to.clone(),
            priority: message.priority,
            expiration_ms: message.expiration_ms,
            body: message.body.clone(),
        }
    }
}

impl From<StoredMessage> for Message {
    fn from(stored: StoredMessage) -> Self {
        Message {
            exchange: stored.exchange.into(),
            routing_key: stored.routing_key.into(),
            message_id: stored.message_id,
            headers: core_headers(stored.headers),
            content_type: stored.content_type,
            content_encoding: stored.content_encoding,
            timestamp_ms: stored.timestamp_ms,
            correlation_id: stored.correlation_id,
            reply_to: stored.reply_to,
            priority: stored.priority,
            expiration_ms: stored.expiration_ms,
            delay_ms: None,
            persistent: true,
            body: stored.body,
        }
    }
}

/// Exchange kinds as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredKind {
    /// Direct.
    Direct,
    /// Fanout.
    Fanout,
    /// Topic.
    Topic,
    /// Headers.
    Headers,
}

impl From<ExchangeKind> for StoredKind {
    fn from(kind: ExchangeKind) -> Self {
        match kind {
            ExchangeKind::Direct => StoredKind::Direct,
            ExchangeKind::Fanout => StoredKind::Fanout,
            ExchangeKind::Topic => StoredKind::Topic,
            ExchangeKind::Headers => StoredKind::Headers,
        }
    }
}

impl From<StoredKind> for ExchangeKind {
    fn from(kind: StoredKind) -> Self {
        match kind {
            StoredKind::Direct => ExchangeKind::Direct,
            StoredKind::Fanout => ExchangeKind::Fanout,
            StoredKind::Topic => ExchangeKind::Topic,
            StoredKind::Headers => ExchangeKind::Headers,
        }
    }
}

/// One change to durable state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// A durable exchange was declared.
    DeclareExchange {
        /// Name.
        name: String,
        /// Kind.
        kind: StoredKind,
        /// Deleted with its last binding.
        auto_delete: bool,
        /// Not publishable directly.
        internal: bool,
        /// Arguments.
        arguments: Vec<(String, StoredValue)>,
    },
    /// A durable exchange was deleted.
    DeleteExchange {
        /// Name.
        name: String,
    },
    /// A durable queue was declared.
    DeclareQueue {
        /// Name.
        name: String,
        /// Deleted with its last consumer.
        auto_delete: bool,
        /// One consumer at a time.
        single_active_consumer: bool,
        /// Arguments.
        arguments: Vec<(String, StoredValue)>,
    },
    /// A durable queue was deleted (its messages with it).
    DeleteQueue {
        /// Name.
        name: String,
    },
    /// A binding between durable ends was added.
    Bind {
        /// Source exchange.
        source: String,
        /// Destination is a queue (else an exchange).
        to_queue: bool,
        /// Destination name.
        destination: String,
        /// Key or pattern.
        routing_key: String,
        /// Arguments.
        arguments: Vec<(String, StoredValue)>,
    },
    /// A binding between durable ends was removed.
    Unbind {
        /// Source exchange.
        source: String,
        /// Destination is a queue (else an exchange).
        to_queue: bool,
        /// Destination name.
        destination: String,
        /// Key or pattern.
        routing_key: String,
        /// Arguments.
        arguments: Vec<(String, StoredValue)>,
    },
    /// A persistent message entered durable queues.
    Enqueue {
        /// Its id, increasing in publish order.
        durable_id: u64,
        /// The durable queues it entered.
        queues: Vec<String>,
        /// The message.
        message: StoredMessage,
    },
    /// A logged message left a durable queue for good.
    Settle {
        /// Its id.
        durable_id: u64,
        /// The queue.
        queue: String,
    },
    /// A persistent message entered durable queues, with when it is ready there (written
    /// instead of `Enqueue` since delayed delivery; `Enqueue` is still read: ready at once).
    EnqueueAt {
        /// Its id, increasing in publish order.
        durable_id: u64,
        /// The durable queues it entered.
        queues: Vec<String>,
        /// The message.
        message: StoredMessage,
        /// Its publish delay, if any (kept with the message).
        delay_ms: Option<u64>,
        /// When it is (or was) ready in those queues, unix ms: later than the recovery time
        /// means it is still delayed; its TTL counts from then.
        ready_at_ms: u64,
    },
    /// A durable queue's dedup window remembers a message id until `until_ms` (checkpoints).
    Dedup {
        /// The queue.
        queue: String,
        /// The message id.
        message_id: String,
        /// When the window forgets it (unix ms).
        until_ms: u64,
    },
    /// Logged messages `first..first + count` left a durable queue for good (a purge of a
    /// paged tail: the broker keeps runs of ids, not the messages).
    SettleRange {
        /// The first id.
        first: u64,
        /// How many.
        count: u64,
        /// The queue.
        queue: String,
    },
}

impl Op {
    /// Body bytes (plus overhead) a message operation keeps alive in the log; 64 for others.
    pub fn approx_bytes(&self) -> u64 {
        match self {
            Op::Enqueue { message, .. } | Op::EnqueueAt { message, .. } => message.approx_bytes(),
            _ => 64,
        }
    }
}

/// One WAL record's payload (after the version byte).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    /// Operations of one batch of commands, in order.
    Batch(Vec<Op>),
    /// Start of checkpoint `epoch`.
    CheckpointBegin {
        /// Checkpoint number.
        epoch: u64,
    },
    /// Part of the state captured by checkpoint `epoch`.
    CheckpointChunk {
        /// Checkpoint number.
        epoch: u64,
        /// State, as operations that rebuild it from nothing.
        ops: Vec<Op>,
    },
    /// End of checkpoint `epoch`: everything before its `CheckpointBegin` is superseded.
    CheckpointEnd {
        /// Checkpoint number.
        epoch: u64,
    },
}

/// A log record that cannot be understood: recovery stops (never skip data).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// Unknown format version.
    #[error(
        "log record at lsn {lsn} has format version {version}, this build reads {RECORD_FORMAT_VERSION}"
    )]
    Version {
        /// Where.
        lsn: u64,
        /// What it says.
        version: u8,
    },
    /// The payload does not decode.
    #[error("log record at lsn {lsn} does not decode: {detail}")]
    Decode {
        /// Where.
        lsn: u64,
        /// Why.
        detail: String,
    },
}

impl Record {
    /// The record's payload bytes.
    pub fn encode(&self) -> Bytes {
        let mut out = vec![RECORD_FORMAT_VERSION];
        let encoded = postcard::to_allocvec(self).expect("log records always serialize");
        out.extend_from_slice(&encoded);
        Bytes::from(out)
    }

    /// Decodes a payload read back from the log.
    pub fn decode(lsn: u64, payload: &[u8]) -> Result<Record, RecordError> {
        match payload.first() {
            Some(&RECORD_FORMAT_VERSION) => {
                postcard::from_bytes(&payload[1..]).map_err(|err| RecordError::Decode {
                    lsn,
                    detail: err.to_string(),
                })
            }
            Some(&version) => Err(RecordError::Version { lsn, version }),
            None => Err(RecordError::Decode {
                lsn,
                detail: "empty payload".to_owned(),
            }),
        }
    }
}

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
    ) -> Recovered {
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
        .expect("records encoded here decode")
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
        0 => Head::Batch,
        1 => Head::Begin(epoch()?),
        2 => Head::Chunk(epoch()?),
        3 => Head::End(epoch()?),
        other => return Err(undecodable(&format!("unknown record kind {other}"))),
    })
}

/// Sets of ids kept as runs (acks are mostly in order, so a run per stretch of them).
#[derive(Debug, Default)]
struct IdRuns {
    /// start → end (exclusive).
    runs: BTreeMap<u64, u64>,
}

impl IdRuns {
    fn insert_range(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        // Merge with every run that overlaps or touches [start, end).
        if let Some((&before, &before_end)) = self.runs.range(..=start).next_back() {
            if before_end >= start {
                start = before;
                end = end.max(before_end);
            }
        }
        let touching: Vec<u64> = self.runs.range(start..=end).map(|(&s, _)| s).collect();
        for run_start in touching {
            let run_end = self.runs.remove(&run_start).expect("listed");
            end = end.max(run_end);
        }
        self.runs.insert(start, end);
    }

    fn contains(&self, id: u64) -> bool {
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
            Head::Batch | Head::Chunk(_) => {}
        }
        n_records += 1;
    }
    let mut recovered = Recovered {
        records: n_records as u64,
        ..Recovered::default()
    };
    // Visits the replayed operations in replay order: the checkpoint's chunks, then the
    // batches after its begin (those inside the checkpoint are held until its end).
    let mut visit = |each: &mut dyn FnMut(Op)| -> Result<(), E> {
        let mut held: Vec<Record> = Vec::new();
        for (idx, item) in source().enumerate() {
            let (lsn, payload) = item?;
            let kind = head(lsn, &payload)?;
            let in_checkpoint = complete.is_some_and(|(_, begin, end)| idx > begin && idx < end);
            let after = match complete {
                Some((_, begin, _)) => idx > begin,
                None => true,
            };
            match kind {
                Head::Chunk(epoch) if in_checkpoint && Some(epoch) == complete.map(|c| c.0) => {
                    if let Record::CheckpointChunk { ops, .. } = Record::decode(lsn, &payload)? {
                        ops.into_iter().for_each(&mut *each);
                    }
                }
                Head::Batch if in_checkpoint => held.push(Record::decode(lsn, &payload)?),
                Head::Batch if after => {
                    if let Record::Batch(ops) = Record::decode(lsn, &payload)? {
                        ops.into_iter().for_each(&mut *each);
                    }
                }
                _ => {}
            }
            if complete.is_some_and(|(_, _, end)| idx == end) {
                for record in held.drain(..) {
                    if let Record::Batch(ops) = record {
                        ops.into_iter().for_each(&mut *each);
                    }
                }
            }
        }
        Ok(())
    };
    // Pass 2: what was settled or deleted.
    let mut fates = Fates::default();
    visit(&mut |op| fates.learn(&op))?;
    // Pass 3: rebuild.
    recovered.epoch = complete.map_or(0, |(epoch, _, _)| epoch);
    let mut effects = Vec::new();
    visit(&mut |op| {
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
                restore(
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
                return;
            }
            Op::Settle { .. } | Op::SettleRange { .. } => return,
            Op::Dedup {
                queue,
                message_id,
                until_ms,
            } => Command::RestoreDedup {
                queue,
                message_id,
                until_ms,
            },
            Op::DeleteQueue { name } => Command::DeleteQueue {
                connection: SYSTEM_CONNECTION,
                name,
                if_unused: false,
                if_empty: false,
            },
            Op::DeclareQueue {
                name,
                auto_delete,
                single_active_consumer,
                arguments,
            } => Command::DeclareQueue {
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
            },
            Op::DeclareExchange {
                name,
                kind,
                auto_delete,
                internal,
                arguments,
            } => Command::DeclareExchange {
                name,
                kind: kind.into(),
                options: ExchangeOptions {
                    durable: true,
                    auto_delete,
                    internal,
                    arguments: core_headers(arguments),
                },
                passive: false,
            },
            Op::DeleteExchange { name } => Command::DeleteExchange {
                name,
                if_unused: false,
            },
            Op::Bind {
                source,
                to_queue,
                destination,
                routing_key,
                arguments,
            } => Command::Bind {
                source,
                target: bind_target(to_queue, destination),
                routing_key,
                arguments: core_headers(arguments),
            },
            Op::Unbind {
                source,
                to_queue,
                destination,
                routing_key,
                arguments,
            } => Command::Unbind {
                source,
                target: bind_target(to_queue, destination),
                routing_key,
                arguments: core_headers(arguments),
            },
        };
        // Replaying what once succeeded succeeds again; a failure would mean the log and the
        // core disagree, which recovery reports rather than hides.
        if let Err(err) = broker.apply(now_ms, command, &mut effects) {
            tracing::warn!("recovery: a logged change no longer applies: {err}");
        }
        recovered.topology_ops += 1;
        effects.drain(..).for_each(&mut *on_effect);
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
) {
    let message = Arc::new(message);
    for queue in queues {
        if fates.deleted(durable_id, &queue) {
            continue;
        }
        if let (Some(id), Some(ready_at_ms)) = (&message.message_id, ready_at_ms) {
            let window = broker
                .queue_options(&queue)
                .and_then(|options| QueueFeatures::try_from(&options.arguments).ok())
                .and_then(|features| features.dedup_window);
            if let Some(window) = window {
                let enqueued_at = ready_at_ms.saturating_sub(message.delay_ms.unwrap_or(0));
                let command = Command::RestoreDedup {
                    queue: queue.clone(),
                    message_id: id.clone(),
                    until_ms: enqueued_at.saturating_add(window),
                };
                if let Err(err) = broker.apply(now_ms, command, effects) {
                    tracing::warn!("recovery: a dedup entry no longer applies: {err}");
                }
            }
        }
        if !fates.live(durable_id, &queue) {
            continue;
        }
        let command = Command::Restore {
            queue: queue.clone(),
            durable_id,
            message: message.clone(),
            ready_at_ms: ready_at_ms.unwrap_or(now_ms),
        };
        match broker.apply(now_ms, command, effects) {
            Ok(_) => recovered.messages += 1,
            Err(err) => {
                tracing::warn!(queue, durable_id, "recovery: message not restored: {err}")
            }
        }
    }
}

/// The live durable state as operations that rebuild it from nothing (for a checkpoint),
/// split into chunks of about `chunk_bytes` of message bodies.
pub fn snapshot(broker: &Broker, chunk_bytes: usize) -> Vec<Vec<Op>> {
    let mut chunks: Vec<Vec<Op>> = Vec::new();
    let mut ops: Vec<Op> = Vec::new();
    for exchange in broker.list_exchanges() {
        if exchange.options.durable && !exchange.builtin {
            ops.push(Op::DeclareExchange {
                name: exchange.name,
                kind: exchange.kind.into(),
                auto_delete: exchange.options.auto_delete,
                internal: exchange.options.internal,
                arguments: stored_headers(&exchange.options.arguments),
            });
        }
    }
    for queue in broker.list_queues() {
        if let Some(options) = broker.queue_options(&queue.name) {
            if options.durable && !options.exclusive {
                ops.push(Op::DeclareQueue {
                    name: queue.name.clone(),
                    auto_delete: options.auto_delete,
                    single_active_consumer: options.single_active_consumer,
                    arguments: stored_headers(&options.arguments),
                });
            }
        }
    }
    for binding in broker.list_bindings() {
        if let Some(op) = bind_op(
            broker,
            &binding.source,
            &binding.target,
            &binding.routing_key,
            &binding.arguments,
            true,
        ) {
            ops.push(op);
        }
    }
    for (queue, message_id, until_ms) in broker.durable_dedup_entries() {
        ops.push(Op::Dedup {
            queue: queue.to_string(),
            message_id,
            until_ms,
        });
    }
    let mut bytes = 0usize;
    let now_ms = broker.now_ms();
    for (durable_id, message, queues) in broker.durable_messages() {
        bytes += message.body.len() + 64;
        // One operation per distinct ready time (usually one: ready now).
        let mut by_ready_at: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (queue, delayed_until) in queues {
            by_ready_at
                .entry(delayed_until.unwrap_or(now_ms))
                .or_default()
                .push(queue.to_string());
        }
        for (ready_at_ms, queues) in by_ready_at {
            ops.push(Op::EnqueueAt {
                durable_id,
                queues,
                message: StoredMessage::from(&*message),
                delay_ms: message.delay_ms,
                ready_at_ms,
            });
        }
        if bytes >= chunk_bytes {
            chunks.push(std::mem::take(&mut ops));
            bytes = 0;
        }
    }
    if !ops.is_empty() || chunks.is_empty() {
        chunks.push(ops);
    }
    chunks
}

fn exchange_is_durable(broker: &Broker, name: &str) -> bool {
    broker
        .exchange_info(name)
        .is_some_and(|info| info.options.durable || info.builtin)
}

fn queue_is_durable(broker: &Broker, name: &str) -> bool {
    broker
        .queue_options(name)
        .is_some_and(|options| options.durable && !options.exclusive)
}

/// The log operation for a binding, when both its ends are durable.
pub fn bind_op(
    broker: &Broker,
    source: &str,
    target: &BindTarget,
    routing_key: &str,
    arguments: &Headers,
    bind: bool,
) -> Option<Op> {
    if !exchange_is_durable(broker, source) {
        return None;
    }
    let (to_queue, destination) = match target {
        BindTarget::Queue(name) => (true, name),
        BindTarget::Exchange(name) => (false, name),
    };
    let durable_end = if to_queue {
        queue_is_durable(broker, destination)
    } else {
        exchange_is_durable(broker, destination)
    };
    if !durable_end {
        return None;
    }
    let (source, destination, routing_key, arguments) = (
        source.to_owned(),
        destination.clone(),
        routing_key.to_owned(),
        stored_headers(arguments),
    );
    Some(if bind {
        Op::Bind {
            source,
            to_queue,
            destination,
            routing_key,
            arguments,
        }
    } else {
        Op::Unbind {
            source,
            to_queue,
            destination,
            routing_key,
            arguments,
        }
    })
}

/// The log operation for a successful, non-passive declare of a durable queue.
pub fn declare_queue_op(name: &str, options: &QueueOptions) -> Option<Op> {
    (options.durable && !options.exclusive).then(|| Op::DeclareQueue {
        name: name.to_owned(),
        auto_delete: options.auto_delete,
        single_active_consumer: options.single_active_consumer,
        arguments: stored_headers(&options.arguments),
    })
}

/// The log operation for a successful, non-passive declare of a durable exchange.
pub fn declare_exchange_op(
    name: &str,
    kind: ExchangeKind,
    options: &ExchangeOptions,
) -> Option<Op> {
    options.durable.then(|| Op::DeclareExchange {
        name: name.to_owned(),
        kind: kind.into(),
        auto_delete: options.auto_delete,
        internal: options.internal,
        arguments: stored_headers(&options.arguments),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &str) -> StoredMessage {
        let mut message = Message::new("q", body.to_owned());
        message
            .headers
            .insert("h", HeaderValue::List(vec![HeaderValue::Int(1)]));
        message.persistent = true;
        StoredMessage::from(&message)
    }

    #[test]
    fn records_round_trip_and_unknown_versions_are_refused() {
        let record = Record::Batch(vec![
            Op::Enqueue {
                durable_id: 7,
                queues: vec!["a".into(), "b".into()],
                message: message("x"),
            },
            Op::Settle {
                durable_id: 7,
                queue: "a".into(),
            },
        ]);
        let bytes = record.encode();
        assert_eq!(Record::decode(1, &bytes).unwrap(), record);
        let mut wrong = bytes.to_vec();
        wrong[0] = 9;
        assert!(matches!(
            Record::decode(1, &wrong),
            Err(RecordError::Version { version: 9, .. })
        ));
        assert!(matches!(
            Record::decode(1, &bytes[..bytes.len() - 2]),
            Err(RecordError::Decode { .. })
        ));
    }

    #[test]
    fn replay_uses_the_last_complete_checkpoint_and_the_batches_after_it() {
        let declare = |name: &str| Op::DeclareQueue {
            name: name.into(),
            auto_delete: false,
            single_active_consumer: false,
            arguments: vec![],
        };
        let records = vec![
            (
                1,
                Record::Batch(vec![
                    declare("old"),
                    Op::Enqueue {
                        durable_id: 1,
                        queues: vec!["old".into()],
                        message: message("gone"),
                    },
                ]),
            ),
            (2, Record::CheckpointBegin { epoch: 1 }),
            (
                3,
                Record::CheckpointChunk {
                    epoch: 1,
                    ops: vec![
                        declare("q"),
                        Op::Enqueue {
                            durable_id: 2,
                            queues: vec!["q".into()],
                            message: message("kept"),
                        },
                    ],
                },
            ),
            (4, Record::CheckpointEnd { epoch: 1 }),
            (
                5,
                Record::Batch(vec![Op::Enqueue {
                    durable_id: 3,
                    queues: vec!["q".into()],
                    message: message("acked"),
                }]),
            ),
            (
                6,
                Record::Batch(vec![
                    Op::Settle {
                        durable_id: 3,
                        queue: "q".into(),
                    },
                    Op::Enqueue {
                        durable_id: 4,
                        queues: vec!["q".into()],
                        message: message("new"),
                    },
                ]),
            ),
            (7, Record::CheckpointBegin { epoch: 2 }),
            (
                8,
                Record::CheckpointChunk {
                    epoch: 2,
                    ops: vec![declare("torn")],
                },
            ),
        ];
        let (replay, n_records) = Replay::plan(records);
        assert_eq!(n_records, 8);
        let mut broker = Broker::default();
        broker
            .apply(
                0,
                Command::OpenConnection {
                    connection: SYSTEM_CONNECTION,
                },
                &mut Vec::new(),
            )
            .unwrap();
        let recovered = replay.apply(&mut broker, 0, &mut |_| {});
        assert_eq!(recovered.messages, 2);
        assert_eq!(recovered.epoch, 1);
        let names: Vec<String> = broker.list_queues().into_iter().map(|q| q.name).collect();
        assert_eq!(
            names,
            vec!["q".to_owned()],
            "pre-checkpoint and torn-checkpoint state ignored"
        );
        let ids: Vec<u64> = broker
            .durable_messages()
            .into_iter()
            .map(|(id, _, _)| id)
            .collect();
        assert_eq!(ids, vec![2, 4]);
    }

    /// A broker that logs into `log` the way the server does (effects → ops).
    fn apply_logged(broker: &mut Broker, now_ms: u64, command: Command, log: &mut Vec<Op>) {
        let mut effects = Vec::new();
        broker.apply(now_ms, command, &mut effects).unwrap();
        for effect in effects {
            match effect {
                wharf_core::Effect::DurableEnqueued {
                    durable_id,
                    queues,
                    message,
                    ready_at_ms,
                    ..
                } => log.push(Op::EnqueueAt {
                    durable_id,
                    queues: queues.iter().map(|queue| queue.to_string()).collect(),
                    message: StoredMessage::from(&*message),
                    delay_ms: message.delay_ms,
                    ready_at_ms,
                }),
                wharf_core::Effect::DurableSettled { durable_id, queue } => log.push(Op::Settle {
                    durable_id,
                    queue: queue.to_string(),
                }),
                _ => {}
            }
        }
    }

    fn recover(records: Vec<(u64, Record)>, now_ms: u64) -> Broker {
        let (replay, _) = Replay::plan(records);
        let mut broker = Broker::default();
        broker
            .apply(
                now_ms,
                Command::OpenConnection {
                    connection: SYSTEM_CONNECTION,
                },
                &mut Vec::new(),
            )
            .unwrap();
        replay.apply(&mut broker, now_ms, &mut |_| {});
        broker
    }

    fn ids_in(broker: &Broker, queue: &str) -> Vec<u64> {
        broker
            .durable_messages()
            .into_iter()
            .filter(|(_, _, queues)| queues.iter().any(|(q, _)| &**q == queue))
            .map(|(id, _, _)| id)
            .collect()
    }

    #[test]
    fn id_runs_merge_and_answer_membership() {
        let mut runs = IdRuns::default();
        for id in [5, 7, 6, 1, 2] {
            runs.insert_range(id, id + 1);
        }
        runs.insert_range(10, 20);
        runs.insert_range(15, 25);
        runs.insert_range(8, 10);
        assert_eq!(
            runs.runs.iter().map(|(s, e)| (*s, *e)).collect::<Vec<_>>(),
            vec![(1, 3), (5, 25)]
        );
        for id in [1, 2, 5, 9, 24] {
            assert!(runs.contains(id), "{id}");
        }
        for id in [0, 3, 4, 25, 100] {
            assert!(!runs.contains(id), "{id}");
        }
    }

    #[test]
    fn replay_settles_ranges_forgets_deleted_incarnations_and_applies_batches_held_inside_a_checkpoint()
     {
        let declare = |name: &str| Op::DeclareQueue {
            name: name.into(),
            auto_delete: false,
            single_active_consumer: false,
            arguments: vec![],
        };
        let enqueue = |id: u64, queue: &str| Op::EnqueueAt {
            durable_id: id,
            queues: vec![queue.into()],
            message: message(&format!("m{id}")),
            delay_ms: None,
            ready_at_ms: 0,
        };
        let records = vec![
            (1, Record::CheckpointBegin { epoch: 1 }),
            (
                2,
                Record::CheckpointChunk {
                    epoch: 1,
                    ops: vec![declare("q"), declare("r"), enqueue(1, "q"), enqueue(2, "q")],
                },
            ),
            // Appended while the checkpoint's paged messages were copied: after its state.
            (
                3,
                Record::Batch(vec![
                    enqueue(6, "q"),
                    Op::Settle {
                        durable_id: 3,
                        queue: "q".into(),
                    },
                ]),
            ),
            (
                4,
                Record::CheckpointChunk {
                    epoch: 1,
                    ops: vec![
                        enqueue(3, "q"),
                        enqueue(4, "q"),
                        enqueue(5, "q"),
                        enqueue(5, "r"),
                    ],
                },
            ),
            (5, Record::CheckpointEnd { epoch: 1 }),
            (
                6,
                Record::Batch(vec![
                    Op::SettleRange {
                        first: 4,
                        count: 2,
                        queue: "q".into(),
                    },
                    Op::DeleteQueue { name: "r".into() },
                    declare("r"),
                    enqueue(7, "r"),
                ]),
            ),
        ];
        let broker = recover(records, 0);
        assert_eq!(
            ids_in(&broker, "q"),
            vec![1, 2, 6],
            "3 settled, 4..=5 by range"
        );
        assert_eq!(
            ids_in(&broker, "r"),
            vec![7],
            "5 went with the first incarnation of r"
        );
    }

    #[test]
    fn delayed_messages_and_dedup_windows_survive_replay_from_batches_and_from_a_checkpoint() {
        let arguments = Headers::new().with(wharf_core::ARG_DEDUP_WINDOW, 10_000i64);
        let options = QueueOptions {
            durable: true,
            arguments: arguments.clone(),
            ..QueueOptions::default()
        };
        let mut broker = Broker::default();
        let mut log = vec![Op::DeclareQueue {
            name: "q".into(),
            auto_delete: false,
            single_active_consumer: false,
            arguments: stored_headers(&arguments),
        }];
        for command in [
            Command::OpenConnection {
                connection: SYSTEM_CONNECTION,
            },
            Command::DeclareQueue {
                connection: SYSTEM_CONNECTION,
                name: "q".into(),
                options,
                passive: false,
            },
        ] {
            apply_logged(&mut broker, 1_000, command, &mut log);
        }
        let publish = |body: &str, id: &str, delay_ms: Option<u64>| Command::Publish {
            message: Arc::new(Message {
                persistent: true,
                message_id: Some(id.into()),
                delay_ms,
                ..Message::new("q", body.to_owned())
            }),
        };
        apply_logged(
            &mut broker,
            1_000,
            publish("later", "id-1", Some(5_000)),
            &mut log,
        );
        apply_logged(&mut broker, 1_000, publish("now", "id-2", None), &mut log);
        assert_eq!(broker.queue_stats("q").unwrap().delayed, 1);

        // From the log's batches, recovering at 2,000: still delayed until 6,000; both ids are
        // still duplicates.
        let batches = vec![(1, Record::Batch(log.clone()))];
        let check = |mut recovered: Broker, how: &str| {
            let stats = recovered.queue_stats("q").unwrap();
            assert_eq!((stats.delayed, stats.ready), (1, 1), "{how}");
            assert_eq!(recovered.next_deadline(), Some(6_000), "{how}");
            let mut effects = Vec::new();
            for id in ["id-1", "id-2"] {
                let reply = recovered
                    .apply(2_000, publish("again", id, None), &mut effects)
                    .unwrap();
                assert!(
                    matches!(
                        reply,
                        wharf_core::Reply::Published {
                            routed: 0,
                            duplicates: 1,
                            ..
                        }
                    ),
                    "{how}: {id} is a duplicate after recovery: {reply:?}"
                );
            }
            recovered.apply(6_000, Command::Tick, &mut effects).unwrap();
            assert_eq!(recovered.queue_stats("q").unwrap().ready, 2, "{how}");
        };
        check(recover(batches, 2_000), "batches");

        // From a checkpoint, after the ready message was consumed and acked: its id stays in
        // the window, the delayed one stays delayed.
        let mut effects = Vec::new();
        broker
            .apply(
                1_500,
                Command::Subscribe {
                    connection: SYSTEM_CONNECTION,
                    queue: "q".into(),
                    consumer_tag: wharf_core::ConsumerTag(1),
                    options: wharf_core::ConsumerOptions {
                        auto_ack: true,
                        ..wharf_core::ConsumerOptions::default()
                    },
                },
                &mut effects,
            )
            .unwrap();
        assert_eq!(broker.queue_stats("q").unwrap().ready, 0);
        let chunks = snapshot(&broker, 1 << 20);
        let mut records = vec![(1, Record::CheckpointBegin { epoch: 1 })];
        for ops in chunks {
            records.push((2, Record::CheckpointChunk { epoch: 1, ops }));
        }
        records.push((3, Record::CheckpointEnd { epoch: 1 }));
        let mut recovered = recover(records, 2_000);
        let stats = recovered.queue_stats("q").unwrap();
        assert_eq!((stats.delayed, stats.ready), (1, 0));
        for id in ["id-1", "id-2"] {
            let reply = recovered
                .apply(2_000, publish("again", id, None), &mut effects)
                .unwrap();
            assert!(
                matches!(
                    reply,
                    wharf_core::Reply::Published {
                        routed: 0,
                        duplicates: 1,
                        ..
                    }
                ),
                "checkpoint: {id}: {reply:?}"
            );
        }
        recovered.apply(6_000, Command::Tick, &mut effects).unwrap();
        assert_eq!(recovered.queue_stats("q").unwrap().ready, 1);
    }
}
