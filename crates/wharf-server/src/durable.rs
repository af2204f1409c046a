//! What the broker writes to its write-ahead log, and how it rebuilds itself from it.
//!
//! The log holds *operations on durable state*, never transient ones: durable topology
//! (exchanges, queues, bindings whose both ends are durable), persistent messages that reached
//! durable queues (`Enqueue`, one record per message however many queues it reached), and
//! their settlement (`Settle`: acked, dropped, purged, auto-acked). Replay applies them in log
//! order. One command batch is one `Batch` record, or several `BatchPart` records when it is
//! larger than a record may be ([`OpRecords`]; replay applies it only whole). To keep the log
//! from growing forever, the broker periodically writes a **checkpoint**: the whole live
//! durable state as `CheckpointBegin` (appended under the broker lock), `CheckpointChunk`s of
//! bounded size (appended by a thread; batches may land between them) and `CheckpointEnd`,
//! written only once the rest is durable; then every record older than the begin is released.
//! Recovery starts from the last complete checkpoint and replays the batches after its begin.
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
    /// Part of one batch too large for a single record (see [`OpRecords::batch`]). The parts
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
const KIND_BATCH: u32 = 0;
const KIND_BEGIN: u32 = 1;
const KIND_CHUNK: u32 = 2;
const KIND_END: u32 = 3;
const KIND_PART: u32 = 4;

/// Bytes a record's header takes before its operations: version byte, kind, epoch or `more`
/// flag, and the operation count (varints of at most 5, 10 and 10 bytes).
pub const RECORD_PREFIX_BYTES_MAX: usize = 1 + 5 + 10 + 10;

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
/// `encoded` starts with [`RECORD_PREFIX_BYTES_MAX`] spare bytes, so that a batch that fits in
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
            if !matches!(kind, Head::Part { .. }) {
                if let Some((_, first_lsn, _)) = split.take() {
                    tracing::warn!(
                        first_lsn,
                        "recovery: a batch split over several records ends before its last part \
                         (its append failed): it was never confirmed and is skipped"
                    );
                }
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
                    if in_checkpoint(first) || after(first) {
                        if let Record::BatchPart { ops, .. } = Record::decode(lsn, &payload)? {
                            split.as_mut().expect("just set").2.extend(ops);
                        }
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
            Op::DeleteQueue { .. } | Op::DeleteExchange { .. } | Op::Unbind { .. }
        );
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
                broker.apply(now_ms, command, effects).map_err(|err| {
                    format!("message {durable_id}'s dedup entry in queue '{queue}': {err}")
                })?;
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
        broker.apply(now_ms, command, effects).map_err(|err| {
            format!("message {durable_id} cannot go back to queue '{queue}': {err}")
        })?;
        recovered.messages += 1;
    }
    Ok(())
}

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

impl Captured {
    /// Captures `broker`'s durable state (paged messages are not in it: they are copied from
    /// their spool files).
    pub fn capture(broker: &Broker) -> Captured {
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
                .map(|(_, message, _)| message.body.len() as u64 + 64)
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
        let mut broker = broker_with_system_connection();
        let recovered = replay.apply(&mut broker, 0, &mut |_| {}).unwrap();
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
        let mut broker = broker_with_system_connection();
        replay.apply(&mut broker, now_ms, &mut |_| {}).unwrap();
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
        let chunks = vec![Captured::capture(&broker).into_ops().collect::<Vec<_>>()];
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

    fn declare_op(name: &str) -> Op {
        Op::DeclareQueue {
            name: name.into(),
            auto_delete: false,
            single_active_consumer: false,
            arguments: vec![],
        }
    }

    fn enqueue(durable_id: u64, queues: &[&str], body: &str) -> Op {
        Op::EnqueueAt {
            durable_id,
            queues: queues.iter().map(|queue| (*queue).to_owned()).collect(),
            message: message(body),
            delay_ms: None,
            ready_at_ms: 0,
        }
    }

    fn broker_with_system_connection() -> Broker {
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
        broker
    }

    fn replay_encoded(records: Vec<Bytes>) -> Result<(Broker, Recovered), RecordError> {
        let records = records
            .into_iter()
            .enumerate()
            .map(|(idx, bytes)| (idx as u64 * 100, bytes))
            .collect();
        let mut broker = broker_with_system_connection();
        let recovered = Replay::from_encoded(records).apply(&mut broker, 0, &mut |_| {})?;
        Ok((broker, recovered))
    }

    #[test]
    fn packed_records_are_exactly_what_postcard_writes_for_the_record() {
        let ops: Vec<Op> = (0..40)
            .map(|idx| enqueue(idx, &["a", "b"], &"x".repeat(idx as usize * 7)))
            .chain([
                declare_op("q"),
                Op::Settle {
                    durable_id: 3,
                    queue: "a".into(),
                },
            ])
            .collect();
        let encoded = OpRecords::encode(ops.clone(), 1 << 20).unwrap();
        assert_eq!(encoded.len(), ops.len());
        // Fits: one `Batch` record, byte for byte postcard's.
        assert_eq!(
            OpRecords::encode(ops.clone(), 1 << 20)
                .unwrap()
                .into_batch(1 << 20),
            vec![Record::Batch(ops.clone()).encode()]
        );
        // Does not fit: parts, each within the limit, that decode to the same operations.
        let parts = OpRecords::encode(ops.clone(), 1 << 20)
            .unwrap()
            .into_batch(600);
        assert!(parts.len() > 3, "{} parts", parts.len());
        let mut joined = Vec::new();
        for (idx, part) in parts.iter().enumerate() {
            assert!(part.len() <= 600, "part {idx} has {} bytes", part.len());
            match Record::decode(0, part).unwrap() {
                Record::BatchPart { more, ops } => {
                    assert_eq!(more, idx + 1 < parts.len());
                    assert_eq!(
                        *part,
                        Record::BatchPart {
                            more,
                            ops: ops.clone()
                        }
                        .encode()
                    );
                    joined.extend(ops);
                }
                other => panic!("expected a part, got {other:?}"),
            }
        }
        assert_eq!(joined, ops);
        // Checkpoint chunks: the same, with the epoch.
        let chunks = encoded.chunks(7, 500);
        let mut joined = Vec::new();
        for chunk in &chunks {
            match Record::decode(0, chunk).unwrap() {
                Record::CheckpointChunk { epoch: 7, ops } => {
                    assert_eq!(
                        *chunk,
                        Record::CheckpointChunk {
                            epoch: 7,
                            ops: ops.clone()
                        }
                        .encode()
                    );
                    joined.extend(ops);
                }
                other => panic!("expected a chunk of epoch 7, got {other:?}"),
            }
        }
        assert_eq!(joined, ops);
        // Large varints (an epoch past 2^35, more than 127 operations) are postcard's too.
        let many = OpRecords::encode(
            (0..300).map(|id| Op::Settle {
                durable_id: id,
                queue: "q".into(),
            }),
            1 << 20,
        )
        .unwrap();
        let chunk = many.chunks(1 << 40, 1 << 20);
        assert_eq!(chunk.len(), 1);
        assert!(
            matches!(Record::decode(0, &chunk[0]).unwrap(), Record::CheckpointChunk { epoch, ops } if epoch == 1 << 40 && ops.len() == 300)
        );
    }

    #[test]
    fn an_operation_too_large_for_a_record_is_split_by_queues_or_refused() {
        let queues: Vec<String> = (0..64)
            .map(|idx| format!("queue-with-a-long-name-{idx:03}"))
            .collect();
        let names: Vec<&str> = queues.iter().map(String::as_str).collect();
        let op = enqueue(9, &names, &"b".repeat(200));
        let encoded = OpRecords::encode([op], 400).unwrap();
        assert!(encoded.len() > 4, "split into {} operations", encoded.len());
        let (broker, recovered) = replay_encoded(
            std::iter::once(
                Record::Batch(queues.iter().map(|name| declare_op(name)).collect()).encode(),
            )
            .chain(encoded.into_batch(450))
            .collect(),
        )
        .unwrap();
        assert_eq!(recovered.messages, 64, "one copy per queue, none twice");
        for name in &queues {
            assert_eq!(ids_in(&broker, name), vec![9]);
        }
        let err = OpRecords::encode([enqueue(1, &["q"], &"b".repeat(500))], 400).unwrap_err();
        assert!(
            matches!(err, RecordError::OpTooLarge { limit: 400, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_split_batch_is_replayed_only_when_its_last_part_is_in_the_log() {
        let setup = Record::Batch(vec![declare_op("q")]).encode();
        let ops: Vec<Op> = (1..=20)
            .map(|id| enqueue(id, &["q"], &"m".repeat(50)))
            .collect();
        let parts = OpRecords::encode(ops, 1 << 20).unwrap().into_batch(400);
        assert!(parts.len() >= 3);
        let all: Vec<u64> = (1..=20).collect();
        // Whole: every message.
        let mut records = vec![setup.clone()];
        records.extend(parts.iter().cloned());
        let (broker, _) = replay_encoded(records).unwrap();
        assert_eq!(ids_in(&broker, "q"), all);
        // The log ends before its last part (a crash mid-write): none of it.
        let mut records = vec![setup.clone()];
        records.extend(parts[..parts.len() - 1].iter().cloned());
        let (broker, _) = replay_encoded(records).unwrap();
        assert_eq!(ids_in(&broker, "q"), Vec::<u64>::new());
        // Its append failed part way and the log went on: none of it, and what follows.
        let mut records = vec![setup];
        records.extend(parts[..2].iter().cloned());
        records.push(Record::Batch(vec![enqueue(21, &["q"], "after")]).encode());
        records.extend(parts.iter().cloned());
        let (broker, _) = replay_encoded(records).unwrap();
        let mut expected = all;
        expected.push(21);
        assert_eq!(ids_in(&broker, "q"), expected, "ids, in id order");
    }

    #[test]
    fn replay_stops_at_a_logged_change_that_no_longer_applies() {
        // A message logged for a queue the log never declared: refused, with its LSN.
        let err = replay_encoded(vec![
            Record::Batch(vec![declare_op("q")]).encode(),
            Record::Batch(vec![
                enqueue(1, &["q"], "ok"),
                enqueue(2, &["nowhere"], "lost"),
            ])
            .encode(),
        ])
        .unwrap_err();
        assert!(
            matches!(err, RecordError::Inconsistent { lsn: 100, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("nowhere"), "{err}");
        // A binding to a queue that does not exist.
        let err = replay_encoded(vec![
            Record::Batch(vec![Op::Bind {
                source: "amq.direct".into(),
                to_queue: true,
                destination: "missing".into(),
                routing_key: "k".into(),
                arguments: vec![],
            }])
            .encode(),
        ])
        .unwrap_err();
        assert!(
            matches!(err, RecordError::Inconsistent { lsn: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn replay_accepts_the_deletion_of_an_exchange_an_unbind_already_auto_deleted() {
        let (broker, _) = replay_encoded(vec![
            Record::Batch(vec![
                Op::DeclareExchange {
                    name: "x".into(),
                    kind: StoredKind::Direct,
                    auto_delete: true,
                    internal: false,
                    arguments: vec![],
                },
                declare_op("q"),
                Op::Bind {
                    source: "x".into(),
                    to_queue: true,
                    destination: "q".into(),
                    routing_key: "k".into(),
                    arguments: vec![],
                },
                Op::Unbind {
                    source: "x".into(),
                    to_queue: true,
                    destination: "q".into(),
                    routing_key: "k".into(),
                    arguments: vec![],
                },
                Op::DeleteExchange { name: "x".into() },
            ])
            .encode(),
        ])
        .unwrap();
        assert!(broker.exchange_info("x").is_none());
    }

    /// One record of every kind, with every operation and header value: the log format that
    /// postcard's encoding of serde's variant order makes, frozen (see [`golden_records`]).
    fn golden_records() -> Vec<Record> {
        let mut message = Message::new("rk", "body".to_owned());
        message.exchange = "ex".into();
        message.message_id = Some("id".into());
        message.content_type = Some("text/plain".into());
        message.content_encoding = Some("gzip".into());
        message.timestamp_ms = Some(1_700_000_000_000);
        message.correlation_id = Some("c".into());
        message.reply_to = Some("r".into());
        message.priority = 5;
        message.expiration_ms = Some(60_000);
        message.persistent = true;
        for (key, value) in [
            ("s", HeaderValue::Str("v".into())),
            ("i", HeaderValue::Int(-2)),
            ("f", HeaderValue::Float(1.5)),
            ("b", HeaderValue::Bool(true)),
            ("y", HeaderValue::Bytes(Bytes::from_static(b"\x00\xff"))),
            ("l", HeaderValue::List(vec![HeaderValue::Int(1)])),
        ] {
            message.headers.insert(key, value);
        }
        let mut nested = Headers::new();
        nested.insert("n", HeaderValue::Int(3));
        message.headers.insert("m", HeaderValue::Map(nested));
        let stored = StoredMessage::from(&message);
        let arguments = vec![("x-max-priority".to_owned(), StoredValue::Int(9))];
        let ops = vec![
            Op::DeclareExchange {
                name: "ex".into(),
                kind: StoredKind::Topic,
                auto_delete: true,
                internal: false,
                arguments: arguments.clone(),
            },
            Op::DeleteExchange { name: "ex".into() },
            Op::DeclareQueue {
                name: "q".into(),
                auto_delete: false,
                single_active_consumer: true,
                arguments,
            },
            Op::DeleteQueue { name: "q".into() },
            Op::Bind {
                source: "ex".into(),
                to_queue: true,
                destination: "q".into(),
                routing_key: "a.#".into(),
                arguments: vec![],
            },
            Op::Unbind {
                source: "ex".into(),
                to_queue: false,
                destination: "ex2".into(),
                routing_key: "k".into(),
                arguments: vec![],
            },
            Op::Enqueue {
                durable_id: 1,
                queues: vec!["q".into()],
                message: stored.clone(),
            },
            Op::Settle {
                durable_id: 1,
                queue: "q".into(),
            },
            Op::EnqueueAt {
                durable_id: 300,
                queues: vec!["q".into(), "q2".into()],
                message: stored,
                delay_ms: Some(1_000),
                ready_at_ms: 1_700_000_001_000,
            },
            Op::Dedup {
                queue: "q".into(),
                message_id: "id".into(),
                until_ms: 1_700_000_060_000,
            },
            Op::SettleRange {
                first: 10,
                count: 5,
                queue: "q".into(),
            },
        ];
        vec![
            Record::Batch(ops.clone()),
            Record::CheckpointBegin { epoch: 7 },
            Record::CheckpointChunk {
                epoch: 7,
                ops: ops[..3].to_vec(),
            },
            Record::CheckpointEnd { epoch: 7 },
            Record::BatchPart {
                more: true,
                ops: ops[8..9].to_vec(),
            },
        ]
    }

    /// A small log as this format wrote it: a queue, a message in the older `Enqueue` form and
    /// one in `EnqueueAt`, the first settled, all split over two batch parts.
    fn golden_log() -> Vec<Record> {
        let Record::Batch(ops) = golden_records().remove(0) else {
            unreachable!()
        };
        let Op::EnqueueAt { message, .. } = ops[8].clone() else {
            unreachable!()
        };
        vec![
            Record::Batch(vec![declare_op("q")]),
            Record::BatchPart {
                more: true,
                ops: vec![Op::Enqueue {
                    durable_id: 1,
                    queues: vec!["q".into()],
                    message: message.clone(),
                }],
            },
            Record::BatchPart {
                more: false,
                ops: vec![
                    Op::EnqueueAt {
                        durable_id: 2,
                        queues: vec!["q".into()],
                        message,
                        delay_ms: None,
                        ready_at_ms: 1_700_000_001_000,
                    },
                    Op::Settle {
                        durable_id: 1,
                        queue: "q".into(),
                    },
                ],
            },
        ]
    }

    /// [`golden_records`] as version 1 of the format writes them (hex).
    const GOLDEN_RECORDS: [&str; 5] = [
        concat!(
            "01000b00026578020100010e782d6d61782d7072696f726974790112010265780201710001010e78",
            "2d6d61782d7072696f7269747901120301710402657801017103612e230005026578000365783201",
            "6b00060101017102657802726b0102696407017300017601690103016602000000000000f83f0162",
            "03010179040200ff016c05010102016d0601016e0106010a746578742f706c61696e0104677a6970",
            "0180d095ffbc310101630101720501e0d40304626f64790701017108ac0202017102713202657802",
            "726b0102696407017300017601690103016602000000000000f83f016203010179040200ff016c05",
            "010102016d0601016e0106010a746578742f706c61696e0104677a69700180d095ffbc3101016301",
            "01720501e0d40304626f647901e807e8d795ffbc31090171026964e0a499ffbc310a0a050171",
        ),
        "010107",
        concat!(
            "0102070300026578020100010e782d6d61782d7072696f726974790112010265780201710001010e",
            "782d6d61782d7072696f726974790112",
        ),
        "010307",
        concat!(
            "0104010108ac0202017102713202657802726b010269640701730001760169010301660200000000",
            "0000f83f016203010179040200ff016c05010102016d0601016e0106010a746578742f706c61696e",
            "0104677a69700180d095ffbc310101630101720501e0d40304626f647901e807e8d795ffbc31",
        ),
    ];

    /// [`golden_log`] as version 1 of the format writes it (hex).
    const GOLDEN_LOG: [&str; 3] = [
        "010001020171000000",
        concat!(
            "01040101060101017102657802726b0102696407017300017601690103016602000000000000f83f",
            "016203010179040200ff016c05010102016d0601016e0106010a746578742f706c61696e0104677a",
            "69700180d095ffbc310101630101720501e0d40304626f6479",
        ),
        concat!(
            "01040002080201017102657802726b0102696407017300017601690103016602000000000000f83f",
            "016203010179040200ff016c05010102016d0601016e0106010a746578742f706c61696e0104677a",
            "69700180d095ffbc310101630101720501e0d40304626f647900e8d795ffbc3107010171",
        ),
    ];

    fn unhex(hex: &str) -> Bytes {
        (0..hex.len())
            .step_by(2)
            .map(|idx| u8::from_str_radix(&hex[idx..idx + 2], 16).unwrap())
            .collect::<Vec<u8>>()
            .into()
    }

    #[test]
    fn the_log_record_format_is_frozen_golden_bytes() {
        // A change here is a change of the log format: bump RECORD_FORMAT_VERSION and keep
        // reading the old one (docs/storage.md), never edit these bytes.
        for (record, hex) in golden_records()
            .into_iter()
            .chain(golden_log())
            .zip(GOLDEN_RECORDS.iter().chain(GOLDEN_LOG.iter()))
        {
            let bytes = unhex(hex);
            assert_eq!(
                record.encode(),
                bytes,
                "{record:?} encodes as it always did"
            );
            assert_eq!(Record::decode(0, &bytes).unwrap(), record);
        }
    }

    #[test]
    fn a_log_written_by_format_version_1_still_replays() {
        let records = GOLDEN_LOG.iter().map(|hex| unhex(hex)).collect();
        let (broker, recovered) = replay_encoded(records).unwrap();
        assert_eq!(recovered.messages, 1);
        assert_eq!(ids_in(&broker, "q"), vec![2]);
        let (_, message, _) = broker.durable_messages().remove(0);
        assert_eq!(&message.body[..], b"body");
        assert_eq!(message.priority, 5);
        assert_eq!(message.message_id.as_deref(), Some("id"));
        assert_eq!(message.headers.len(), 7);
    }
}
