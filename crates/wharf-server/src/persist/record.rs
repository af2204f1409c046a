//! What the broker writes to its write-ahead log, and how it rebuilds itself from it.
//!
//! The log holds *operations on durable state*, never transient ones: durable topology
//! (exchanges, queues, bindings whose both ends are durable), persistent messages that reached
//! durable queues (`Enqueue`, one record per message however many queues it reached), and
//! their settlement (`Settle`: acked, dropped, purged, auto-acked). Replay applies them in log
//! order. One command batch is one `Batch` record, or several `BatchPart` records when it is
//! larger than a record may be ([`OpRecords`]; replay applies it only whole). To keep the log
//! from growing forever, the broker periodically writes a **checkpoint**: the whole live
//! durable state as `CheckpointBegin` (its place in the log taken under the broker lock),
//! `CheckpointChunk`s of
//! bounded size (appended by a thread; batches may land between them) and `CheckpointEnd`,
//! written only once the rest is durable; then every record older than the begin is released.
//! Recovery starts from the last complete checkpoint and replays the batches after its begin.
//!
//! The WAL never moves a record, so replay order is log order (checkpoints reclaim space).
//! See docs/durability.md for what a confirm promises.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use wharf_core::{
    BindTarget, Broker, ConnectionId, ExchangeKind, ExchangeOptions, HeaderValue, Headers, Message,
    QueueOptions, resource_key,
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

pub(crate) fn stored_headers(headers: &Headers) -> Vec<(String, StoredValue)> {
    headers
        .iter()
        .map(|(key, value)| (key.to_owned(), StoredValue::from(value)))
        .collect()
}

pub(crate) fn core_headers(entries: Vec<(String, StoredValue)>) -> Headers {
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
        self.body.len() as u64 + crate::limits::MESSAGE_OVERHEAD_BYTES as u64
    }

    /// Body bytes.
    pub fn body_len(&self) -> usize {
        self.body.len()
    }
}

impl From<&Message> for StoredMessage {
    fn from(message: &Message) -> Self {
        // Exhaustive: a new `Message` field must be stored or named here as not stored.
        let Message {
            exchange,
            routing_key,
            message_id,
            headers,
            content_type,
            content_encoding,
            timestamp_ms,
            correlation_id,
            reply_to,
            priority,
            expiration_ms,
            // Logged in the operation (`Op::EnqueueAt`, the spool record) where it matters.
            delay_ms: _,
            // Only persistent messages are logged; spool records carry it themselves.
            persistent: _,
            body,
        } = message;
        StoredMessage {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            message_id: message_id.clone(),
            headers: stored_headers(headers),
            content_type: content_type.clone(),
            content_encoding: content_encoding.clone(),
            timestamp_ms: *timestamp_ms,
            correlation_id: correlation_id.clone(),
            reply_to: reply_to.clone(),
            priority: *priority,
            expiration_ms: *expiration_ms,
            body: body.clone(),
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

/// An operation as the command batch stages it under the broker lock. The message operations,
/// one or more per message, hold the core's shared message and queue names (reference counts,
/// no copy); each becomes an [`Op`] when its batch is encoded, after the lock is released
/// ([`StagedOp::into_op`]).
#[derive(Debug)]
pub enum StagedOp {
    /// See [`Op::EnqueueAt`].
    EnqueueAt {
        /// The message's id in the log.
        durable_id: u64,
        /// The durable queues it entered.
        queues: Vec<Arc<str>>,
        /// The message, shared with the queues.
        message: Arc<Message>,
        /// When it is ready in those queues (unix ms).
        ready_at_ms: u64,
    },
    /// See [`Op::Settle`].
    Settle {
        /// The message's id in the log.
        durable_id: u64,
        /// The queue it left.
        queue: Arc<str>,
    },
    /// See [`Op::SettleRange`].
    SettleRange {
        /// The first id of the run.
        first: u64,
        /// How many consecutive ids.
        count: u64,
        /// The queue they left.
        queue: Arc<str>,
    },
    /// Any other operation (topology: rare), built under the lock.
    Other(Box<Op>),
}

impl StagedOp {
    /// The operation to encode (its message's strings and headers copied now; the body is
    /// shared and copied once, into the record).
    pub fn into_op(self) -> Op {
        match self {
            StagedOp::EnqueueAt {
                durable_id,
                queues,
                message,
                ready_at_ms,
            } => Op::EnqueueAt {
                durable_id,
                queues: queues.iter().map(|queue| queue.to_string()).collect(),
                message: StoredMessage::from(&*message),
                delay_ms: message.delay_ms,
                ready_at_ms,
            },
            StagedOp::Settle { durable_id, queue } => Op::Settle {
                durable_id,
                queue: queue.to_string(),
            },
            StagedOp::SettleRange {
                first,
                count,
                queue,
            } => Op::SettleRange {
                first,
                count,
                queue: queue.to_string(),
            },
            StagedOp::Other(op) => *op,
        }
    }

    /// Whether it only records a message entering or leaving queues (synced as those
    /// queues' `x-sync` says), not a topology change (synced as the broker's policy).
    pub fn is_message_op(&self) -> bool {
        !matches!(
            self,
            StagedOp::Other(op)
                if !matches!(**op, Op::EnqueueAt { .. } | Op::Settle { .. } | Op::SettleRange { .. })
        )
    }
}

impl From<Op> for StagedOp {
    fn from(op: Op) -> StagedOp {
        StagedOp::Other(Box::new(op))
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
    /// A virtual host was added, or its limits were set. Every name in the other operations
    /// is a resource key (`wharf_core::resource_key`): the plain name in the default virtual
    /// host, as in logs written before virtual hosts existed.
    DeclareVhost {
        /// Its name.
        name: String,
        /// Its `max-connections`.
        max_connections: Option<u32>,
        /// Its `max-queues`.
        max_queues: Option<u32>,
    },
    /// A virtual host was deleted; the deletes of what it held come before this, in the same
    /// batch.
    DeleteVhost {
        /// Its name.
        name: String,
    },
    /// A durable queue was declared by a user with its own queue limit in mind: as
    /// `DeclareQueue`, with the user it counts against (written instead of `DeclareQueue`
    /// whenever the declarer is known).
    DeclareQueueBy {
        /// Name (a resource key).
        name: String,
        /// The user who declared it.
        declared_by: String,
        /// Deleted with its last consumer.
        auto_delete: bool,
        /// One consumer at a time.
        single_active_consumer: bool,
        /// Arguments.
        arguments: Vec<(String, StoredValue)>,
    },
}

impl Op {
    /// Body bytes (plus overhead) a message operation keeps alive in the log; the overhead
    /// alone for others.
    pub fn approx_bytes(&self) -> u64 {
        match self {
            Op::Enqueue { message, .. } | Op::EnqueueAt { message, .. } => message.approx_bytes(),
            _ => crate::limits::MESSAGE_OVERHEAD_BYTES as u64,
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
    /// Part of one batch too large for a single record (see [`OpRecords::into_batch`]). The parts
    /// of a batch are appended contiguously; replay applies the batch only once it reads the
    /// part with `more == false`. A batch whose last part never reached the disk was never
    /// confirmed, and is dropped whole: a batch is atomic whatever its size.
    BatchPart {
        /// More parts of this batch follow.
        more: bool,
        /// Its operations, in order.
        ops: Vec<Op>,
    },
}

/// `Record` variant indices as postcard writes them (serde declaration order). They are the
/// log format: append new variants at the end, never reorder (golden-bytes test).
pub(crate) const KIND_BATCH: u32 = 0;
pub(crate) const KIND_BEGIN: u32 = 1;
pub(crate) const KIND_CHUNK: u32 = 2;
pub(crate) const KIND_END: u32 = 3;
pub(crate) const KIND_PART: u32 = 4;

/// Bytes a record's header takes before its operations: version byte, kind, epoch or `more`
/// flag, and the operation count (varints of at most 5, 10 and 10 bytes).
pub(crate) const RECORD_PREFIX_BYTES_MAX: usize = 1 + 5 + 10 + 10;

/// Postcard's varint (LEB128, 7 bits a byte, least significant first).
fn push_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A postcard flavor appending to a `Vec` with `extend_from_slice` (postcard's `to_extend`
/// pushes a slice's bytes through an iterator).
struct Append<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Operations encoded one by one, packed into records of bounded size without encoding them
/// again: a record is its prefix followed by its operations' bytes, exactly what postcard
/// writes for the `Record` (checked by `packed_records_are_what_postcard_writes`).
/// `encoded` starts with `RECORD_PREFIX_BYTES_MAX` spare bytes, so that a batch that fits in
/// one record gets its prefix written in front of its operations without copying them.
#[derive(Debug)]
pub struct OpRecords {
    encoded: Vec<u8>,
    /// End offset of each operation in `encoded`.
    ends: Vec<usize>,
}

impl Default for OpRecords {
    fn default() -> Self {
        OpRecords {
            encoded: vec![0; RECORD_PREFIX_BYTES_MAX],
            ends: Vec::new(),
        }
    }
}

impl OpRecords {
    /// Encodes `ops`; an operation larger than `op_bytes_max` is split when it can be (a
    /// message that entered several queues becomes one operation per group of queues, which
    /// replay treats the same), else refused.
    pub fn encode(
        ops: impl IntoIterator<Item = Op>,
        op_bytes_max: usize,
    ) -> Result<OpRecords, RecordError> {
        let mut records = OpRecords::default();
        for op in ops {
            records.push(op, op_bytes_max)?;
        }
        Ok(records)
    }

    /// Encodes one more operation (see [`OpRecords::encode`]).
    pub fn push(&mut self, op: Op, op_bytes_max: usize) -> Result<(), RecordError> {
        let mut todo = vec![op];
        while let Some(op) = todo.pop() {
            let start = self.encoded.len();
            postcard::serialize_with_flavor(&op, Append(&mut self.encoded))
                .expect("log operations always serialize");
            let bytes = self.encoded.len() - start;
            if bytes <= op_bytes_max {
                self.ends.push(self.encoded.len());
                continue;
            }
            self.encoded.truncate(start);
            match op {
                Op::EnqueueAt {
                    durable_id,
                    mut queues,
                    message,
                    delay_ms,
                    ready_at_ms,
                } if queues.len() > 1 => {
                    // Pushed in reverse: the first half is encoded first.
                    let second = queues.split_off(queues.len() / 2);
                    for queues in [second, queues] {
                        todo.push(Op::EnqueueAt {
                            durable_id,
                            queues,
                            message: message.clone(),
                            delay_ms,
                            ready_at_ms,
                        });
                    }
                }
                _ => {
                    return Err(RecordError::OpTooLarge {
                        bytes: bytes as u64,
                        limit: op_bytes_max as u64,
                    });
                }
            }
        }
        Ok(())
    }

    /// How many operations.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Encoded bytes of all operations.
    pub fn bytes(&self) -> usize {
        self.encoded.len() - RECORD_PREFIX_BYTES_MAX
    }

    /// Where operation `idx` starts in `encoded`.
    fn start_of(&self, idx: usize) -> usize {
        match idx {
            0 => RECORD_PREFIX_BYTES_MAX,
            _ => self.ends[idx - 1],
        }
    }

    /// Groups of consecutive operations (index ranges) of at most `group_bytes` each (a group
    /// holds at least one operation).
    fn groups(&self, group_bytes: usize) -> Vec<std::ops::Range<usize>> {
        let mut groups = Vec::new();
        let (mut first, mut first_byte) = (0usize, RECORD_PREFIX_BYTES_MAX);
        for (idx, &end) in self.ends.iter().enumerate() {
            if idx > first && end - first_byte > group_bytes {
                groups.push(first..idx);
                first = idx;
                first_byte = self.ends[idx - 1];
            }
        }
        if first < self.ends.len() {
            groups.push(first..self.ends.len());
        }
        groups
    }

    fn prefix(kind: u32, tag: Option<u64>, n_ops: usize) -> Vec<u8> {
        let mut prefix = Vec::with_capacity(RECORD_PREFIX_BYTES_MAX);
        prefix.push(RECORD_FORMAT_VERSION);
        push_varint(&mut prefix, u64::from(kind));
        if let Some(tag) = tag {
            push_varint(&mut prefix, tag);
        }
        push_varint(&mut prefix, n_ops as u64);
        prefix
    }

    fn record(&self, kind: u32, tag: Option<u64>, range: std::ops::Range<usize>) -> Bytes {
        let start = self.start_of(range.start);
        let end = self.start_of(range.end);
        let mut out = Self::prefix(kind, tag, range.len());
        out.extend_from_slice(&self.encoded[start..end]);
        Bytes::from(out)
    }

    /// The records of one batch: a single `Batch` record when it fits in `record_bytes_max`
    /// (the usual case: its prefix goes in front of the operations, which are not copied),
    /// else `BatchPart`s of at most that size, in order.
    pub fn into_batch(mut self, record_bytes_max: usize) -> Vec<Bytes> {
        let room = record_bytes_max - RECORD_PREFIX_BYTES_MAX;
        if self.bytes() <= room {
            let prefix = Self::prefix(KIND_BATCH, None, self.len());
            let start = RECORD_PREFIX_BYTES_MAX - prefix.len();
            self.encoded[start..RECORD_PREFIX_BYTES_MAX].copy_from_slice(&prefix);
            return vec![Bytes::from(self.encoded).slice(start..)];
        }
        let groups = self.groups(room);
        let last = groups.len() - 1;
        groups
            .into_iter()
            .enumerate()
            .map(|(idx, range)| self.record(KIND_PART, Some(u64::from(idx < last)), range))
            .collect()
    }

    /// The chunk records of checkpoint `epoch`, each holding about `chunk_bytes` of operations
    /// (more only for a single operation larger than that).
    pub fn chunks(&self, epoch: u64, chunk_bytes: usize) -> Vec<Bytes> {
        self.groups(chunk_bytes)
            .into_iter()
            .map(|range| self.record(KIND_CHUNK, Some(epoch), range))
            .collect()
    }
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
    /// A logged change does not apply to the state rebuilt so far: the log and the broker
    /// disagree, and carrying on would drop or invent data.
    #[error(
        "log record at lsn {lsn} no longer applies: {detail}; refusing to start rather than drop it"
    )]
    Inconsistent {
        /// Where.
        lsn: u64,
        /// What did not apply, and why.
        detail: String,
    },
    /// One operation is larger than a log record may be (a message too large to log).
    #[error("a log operation of {bytes} bytes exceeds the largest record, {limit} bytes")]
    OpTooLarge {
        /// Its encoded size.
        bytes: u64,
        /// The limit.
        limit: u64,
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

fn exchange_is_durable(broker: &Broker, vhost: &str, name: &str) -> bool {
    broker
        .exchange_info(vhost, name)
        .is_some_and(|info| info.options.durable || info.builtin)
}

fn queue_is_durable(broker: &Broker, vhost: &str, name: &str) -> bool {
    broker
        .queue_options(vhost, name)
        .is_some_and(|options| options.durable && !options.exclusive)
}

/// The log operation for a binding in `vhost`, when both its ends are durable.
pub fn bind_op(
    broker: &Broker,
    vhost: &str,
    source: &str,
    target: &BindTarget,
    routing_key: &str,
    arguments: &Headers,
    bind: bool,
) -> Option<Op> {
    if !exchange_is_durable(broker, vhost, source) {
        return None;
    }
    let (to_queue, destination) = match target {
        BindTarget::Queue(name) => (true, name),
        BindTarget::Exchange(name) => (false, name),
    };
    let durable_end = if to_queue {
        queue_is_durable(broker, vhost, destination)
    } else {
        exchange_is_durable(broker, vhost, destination)
    };
    if !durable_end {
        return None;
    }
    let (source, destination, routing_key, arguments) = (
        resource_key(vhost, source),
        resource_key(vhost, destination),
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

/// The log operation for a successful, non-passive declare of a durable queue of `vhost`,
/// by `declared_by` if known.
pub fn declare_queue_op(
    vhost: &str,
    name: &str,
    options: &QueueOptions,
    declared_by: Option<&str>,
) -> Option<Op> {
    if !options.durable || options.exclusive {
        return None;
    }
    let (name, auto_delete, single_active_consumer, arguments) = (
        resource_key(vhost, name),
        options.auto_delete,
        options.single_active_consumer,
        stored_headers(&options.arguments),
    );
    Some(match declared_by {
        Some(declared_by) => Op::DeclareQueueBy {
            name,
            declared_by: declared_by.to_owned(),
            auto_delete,
            single_active_consumer,
            arguments,
        },
        None => Op::DeclareQueue {
            name,
            auto_delete,
            single_active_consumer,
            arguments,
        },
    })
}

/// The log operation for a successful, non-passive declare of a durable exchange of `vhost`.
pub fn declare_exchange_op(
    vhost: &str,
    name: &str,
    kind: ExchangeKind,
    options: &ExchangeOptions,
) -> Option<Op> {
    options.durable.then(|| Op::DeclareExchange {
        name: resource_key(vhost, name),
        kind: kind.into(),
        auto_delete: options.auto_delete,
        internal: options.internal,
        arguments: stored_headers(&options.arguments),
    })
}
