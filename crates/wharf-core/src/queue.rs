//! Queues: ready messages in FIFO order, the consumers attached, and per-queue statistics.

use crate::error::CoreError;
use crate::id_runs::IdRuns;
use crate::message::{HeaderValue, Headers, Message};
use crate::{ConnectionId, ConsumerTag};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// Queue argument: the highest message priority the queue orders by (1..=255).
pub const ARG_MAX_PRIORITY: &str = "x-max-priority";
/// Queue argument: the most ready messages the queue holds.
pub const ARG_MAX_LENGTH: &str = "x-max-length";
/// Queue argument: the most body bytes of ready messages the queue holds.
pub const ARG_MAX_LENGTH_BYTES: &str = "x-max-length-bytes";
/// Queue argument: what a full queue does, `drop-head` (default) or `reject-publish`.
pub const ARG_OVERFLOW: &str = "x-overflow";
/// Queue argument: the exchange dead-lettered messages are republished to (`""`: default).
pub const ARG_DEAD_LETTER_EXCHANGE: &str = "x-dead-letter-exchange";
/// Queue argument: the routing key of dead-lettered messages (default: their own).
pub const ARG_DEAD_LETTER_ROUTING_KEY: &str = "x-dead-letter-routing-key";
/// Queue argument: deliveries after which a message is dead-lettered instead of requeued.
pub const ARG_DELIVERY_LIMIT: &str = "x-delivery-limit";
/// Queue argument: milliseconds a message may stay ready before it expires (dropped, or
/// dead-lettered with reason `expired`).
pub const ARG_MESSAGE_TTL: &str = "x-message-ttl";
/// Queue argument: milliseconds without consumers (or a redeclare) after which the queue is
/// deleted.
pub const ARG_EXPIRES: &str = "x-expires";
/// Queue argument: the retry schedule, a list of delays in milliseconds: a message nacked or
/// rejected with requeue for the n-th time is redelivered after the n-th delay; nacked once
/// more after the last, it is dead-lettered (reason `rejected`) or dropped.
pub const ARG_RETRY: &str = "x-retry";
/// Queue argument: milliseconds during which a message id, once enqueued, makes later
/// messages with the same id duplicates (dropped, their publish confirmed as duplicate).
pub const ARG_DEDUP_WINDOW: &str = "x-dedup-window";
/// Queue argument: when the log record of a persistent message routed to this durable queue
/// is fsynced, overriding the broker's policy: `"always"` (before the confirm), `"interval=MS"`
/// (within MS after the confirm) or `"never"` (**unsafe**: at the OS's leisure).
pub const ARG_SYNC: &str = "x-sync";
/// Queue argument (bool): only one consumer at a time receives messages; the next takes over
/// when it leaves (RabbitMQ's name). Read into [`QueueOptions::single_active_consumer`].
pub const ARG_SINGLE_ACTIVE_CONSUMER: &str = "x-single-active-consumer";
/// Consumer argument (integer ms in `1..=DURATION_MS_MAX`, manual-ack consumers only): the
/// lease of each delivery (RabbitMQ's `x-consumer-timeout` is per queue; this is per consumer).
/// Read into [`ConsumerOptions::ack_timeout_ms`].
pub const ARG_ACK_TIMEOUT: &str = "x-ack-timeout";
pub use crate::limits::{DURATION_MS_MAX, RETRY_STEPS_MAX};

/// What a queue at its length limit does with a new message (`x-overflow`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Overflow {
    /// Accept it and drop the ready messages at the head until the queue fits again.
    #[default]
    DropHead,
    /// Refuse the publish ([`CoreError::QueueFull`]).
    RejectPublish,
    /// Refuse the publish and dead-letter the refused message (reason `maxlen`), as RabbitMQ's
    /// `reject-publish-dlx`.
    RejectPublishDlx,
}

impl Overflow {
    /// Whether a full queue refuses new messages (instead of dropping old ones).
    pub fn rejects(self) -> bool {
        matches!(self, Overflow::RejectPublish | Overflow::RejectPublishDlx)
    }
}

/// A durable queue's sync policy (`x-sync`), overriding the broker's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueSync {
    /// Confirm only after the fsync covering the message.
    Always,
    /// Confirm after the write; fsync within this many ms.
    Interval(u64),
    /// Confirm after the write; never fsync on purpose (unsafe).
    Never,
}

impl QueueSync {
    /// The stronger of two needs: `Always` over any interval over `Never`; the shorter
    /// interval of two.
    pub fn stronger(self, other: QueueSync) -> QueueSync {
        match (self, other) {
            (QueueSync::Always, _) | (_, QueueSync::Always) => QueueSync::Always,
            (QueueSync::Interval(a), QueueSync::Interval(b)) => QueueSync::Interval(a.min(b)),
            (QueueSync::Interval(ms), QueueSync::Never)
            | (QueueSync::Never, QueueSync::Interval(ms)) => QueueSync::Interval(ms),
            (QueueSync::Never, QueueSync::Never) => QueueSync::Never,
        }
    }
}

/// What the durable queues a logged message entered ask of its log record: the strongest of
/// their `x-sync` overrides, and whether any of them follows the broker's policy (which then
/// counts too: see [`DurableSync::resolve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DurableSync {
    /// The strongest override among the queues, if any has one.
    pub strongest: Option<QueueSync>,
    /// Some queue has no override.
    pub uses_default: bool,
}

impl DurableSync {
    /// Adds one queue's override (`None`: it follows the broker).
    pub fn add(&mut self, queue: Option<QueueSync>) {
        match queue {
            Some(sync) => {
                self.strongest = Some(self.strongest.map_or(sync, |other| other.stronger(sync)));
            }
            None => self.uses_default = true,
        }
    }

    /// The need, given the broker's policy.
    pub fn resolve(self, default: QueueSync) -> QueueSync {
        match (self.strongest, self.uses_default) {
            (Some(sync), true) => sync.stronger(default),
            (Some(sync), false) => sync,
            (None, _) => default,
        }
    }

    /// The stronger need of two records' worth of messages.
    pub fn merge(&mut self, other: DurableSync) {
        if let Some(sync) = other.strongest {
            self.add(Some(sync));
        }
        self.uses_default |= other.uses_default;
    }
}

/// The queue features an [`QueueOptions::arguments`] map asks for, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueFeatures {
    /// `x-max-priority`: message priorities above it count as it; `None`: no ordering by
    /// priority (every message is equal, plain FIFO).
    pub max_priority: Option<u8>,
    /// `x-max-length`: most ready messages.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`: most body bytes of ready messages.
    pub max_length_bytes: Option<u64>,
    /// `x-overflow`.
    pub overflow: Overflow,
    /// `x-dead-letter-exchange`: where messages rejected without requeue or dropped by the
    /// length limit go; `None`: they are dropped.
    pub dead_letter_exchange: Option<Arc<str>>,
    /// `x-dead-letter-routing-key`: their routing key there; `None`: their own.
    pub dead_letter_routing_key: Option<Arc<str>>,
    /// `x-delivery-limit`: a message delivered this many times (or more) that would be
    /// requeued is dead-lettered (reason `delivery_limit`) or dropped instead.
    pub delivery_limit: Option<u64>,
    /// `x-message-ttl`: ms a message may stay ready.
    pub message_ttl: Option<u64>,
    /// `x-expires`: ms unused after which the queue is deleted (at least 1).
    pub expires: Option<u64>,
    /// `x-retry`: delays (ms) of successive requeues by consumers.
    pub retry: Option<Arc<[u64]>>,
    /// `x-dedup-window`: ms a message id is remembered (at least 1).
    pub dedup_window: Option<u64>,
    /// `x-sync`: the queue's own sync policy (durable queues; `None`: the broker's).
    pub sync: Option<QueueSync>,
}

fn text_argument(arguments: &Headers, key: &str) -> Result<Option<Arc<str>>, CoreError> {
    match arguments.get(key) {
        None => Ok(None),
        Some(HeaderValue::Str(text)) if text.len() <= crate::limits::NAME_BYTES_MAX => {
            Ok(Some(text.as_str().into()))
        }
        Some(other) => Err(CoreError::InvalidArgument {
            reason: format!("{key} must be a string of at most 255 bytes, not {other:?}"),
        }),
    }
}

fn non_negative_int(arguments: &Headers, key: &str) -> Result<Option<u64>, CoreError> {
    match arguments.get(key) {
        None => Ok(None),
        Some(HeaderValue::Int(value)) if *value >= 0 => Ok(Some(*value as u64)),
        Some(other) => Err(CoreError::InvalidArgument {
            reason: format!("{key} must be a non-negative integer, not {other:?}"),
        }),
    }
}

fn duration_argument(arguments: &Headers, key: &str, min: u64) -> Result<Option<u64>, CoreError> {
    match arguments.get(key) {
        None => Ok(None),
        Some(HeaderValue::Int(value))
            if *value >= 0 && (min..=DURATION_MS_MAX).contains(&(*value as u64)) =>
        {
            Ok(Some(*value as u64))
        }
        Some(other) => Err(CoreError::InvalidArgument {
            reason: format!(
                "{key} must be an integer number of milliseconds from {min} to {DURATION_MS_MAX}, not {other:?}"
            ),
        }),
    }
}

fn retry_argument(arguments: &Headers) -> Result<Option<Arc<[u64]>>, CoreError> {
    let Some(value) = arguments.get(ARG_RETRY) else {
        return Ok(None);
    };
    let invalid = || CoreError::InvalidArgument {
        reason: format!(
            "{ARG_RETRY} must be a list of 1 to {RETRY_STEPS_MAX} delays in milliseconds (integers from 0 to {DURATION_MS_MAX}), not {value:?}"
        ),
    };
    let HeaderValue::List(steps) = value else {
        return Err(invalid());
    };
    if steps.is_empty() || steps.len() > RETRY_STEPS_MAX {
        return Err(invalid());
    }
    steps
        .iter()
        .map(|step| match step {
            HeaderValue::Int(ms) if (0..=DURATION_MS_MAX as i64).contains(ms) => Ok(*ms as u64),
            _ => Err(invalid()),
        })
        .collect::<Result<Vec<u64>, CoreError>>()
        .map(|steps| Some(steps.into()))
}

impl TryFrom<&Headers> for QueueFeatures {
    type Error = CoreError;

    /// Reads the queue arguments Wharf implements; other arguments are kept and ignored.
    fn try_from(arguments: &Headers) -> Result<Self, CoreError> {
        let max_priority = match arguments.get(ARG_MAX_PRIORITY) {
            None => None,
            Some(HeaderValue::Int(value)) if (1..=255).contains(value) => Some(*value as u8),
            Some(other) => {
                return Err(CoreError::InvalidArgument {
                    reason: format!(
                        "{ARG_MAX_PRIORITY} must be an integer from 1 to 255, not {other:?}"
                    ),
                });
            }
        };
        let overflow = match arguments.get(ARG_OVERFLOW) {
            None => Overflow::DropHead,
            Some(HeaderValue::Str(mode)) if mode == "drop-head" => Overflow::DropHead,
            Some(HeaderValue::Str(mode)) if mode == "reject-publish" => Overflow::RejectPublish,
            Some(HeaderValue::Str(mode)) if mode == "reject-publish-dlx" => {
                Overflow::RejectPublishDlx
            }
            Some(other) => {
                return Err(CoreError::InvalidArgument {
                    reason: format!(
                        "{ARG_OVERFLOW} must be \"drop-head\", \"reject-publish\" or \"reject-publish-dlx\", not {other:?}"
                    ),
                });
            }
        };
        Ok(QueueFeatures {
            max_priority,
            max_length: non_negative_int(arguments, ARG_MAX_LENGTH)?,
            max_length_bytes: non_negative_int(arguments, ARG_MAX_LENGTH_BYTES)?,
            overflow,
            dead_letter_exchange: text_argument(arguments, ARG_DEAD_LETTER_EXCHANGE)?,
            dead_letter_routing_key: text_argument(arguments, ARG_DEAD_LETTER_ROUTING_KEY)?,
            delivery_limit: non_negative_int(arguments, ARG_DELIVERY_LIMIT)?,
            message_ttl: duration_argument(arguments, ARG_MESSAGE_TTL, 0)?,
            expires: duration_argument(arguments, ARG_EXPIRES, 1)?,
            retry: retry_argument(arguments)?,
            dedup_window: duration_argument(arguments, ARG_DEDUP_WINDOW, 1)?,
            sync: sync_argument(arguments)?,
        })
    }
}

fn sync_argument(arguments: &Headers) -> Result<Option<QueueSync>, CoreError> {
    let Some(value) = arguments.get(ARG_SYNC) else {
        return Ok(None);
    };
    let parsed = match value {
        HeaderValue::Str(text) => match text.as_str() {
            "always" => Some(QueueSync::Always),
            "never" => Some(QueueSync::Never),
            other => other
                .strip_prefix("interval=")
                .and_then(|ms| ms.parse::<u64>().ok())
                .filter(|ms| (1..=DURATION_MS_MAX).contains(ms))
                .map(QueueSync::Interval),
        },
        _ => None,
    };
    parsed.map(Some).ok_or_else(|| CoreError::InvalidArgument {
        reason: format!(
            "{ARG_SYNC} must be \"always\", \"never\" or \"interval=MS\" (MS 1..={DURATION_MS_MAX}), not {value:?}"
        ),
    })
}

impl QueueOptions {
    /// Takes [`ARG_SINGLE_ACTIVE_CONSUMER`] out of `arguments` (it is an option of the queue,
    /// not a feature argument): `false` when absent, an invalid argument unless a bool.
    pub fn take_single_active_consumer(arguments: &mut Headers) -> Result<bool, CoreError> {
        match arguments.remove(ARG_SINGLE_ACTIVE_CONSUMER) {
            None => Ok(false),
            Some(HeaderValue::Bool(flag)) => Ok(flag),
            Some(other) => Err(CoreError::InvalidArgument {
                reason: format!("{ARG_SINGLE_ACTIVE_CONSUMER} must be a bool, not {other:?}"),
            }),
        }
    }
}

impl ConsumerOptions {
    /// The lease a consumer's arguments ask for ([`ARG_ACK_TIMEOUT`]): `None` when absent; an
    /// integer of ms in `1..=DURATION_MS_MAX` for a manual-ack consumer; anything else, or any
    /// lease on an auto-ack consumer, is an invalid argument.
    pub fn ack_timeout_of(arguments: &Headers, auto_ack: bool) -> Result<Option<u64>, CoreError> {
        let Some(value) = arguments.get(ARG_ACK_TIMEOUT) else {
            return Ok(None);
        };
        let invalid = |reason: String| Err(CoreError::InvalidArgument { reason });
        match value {
            HeaderValue::Int(timeout_ms) => match u64::try_from(*timeout_ms) {
                Ok(timeout_ms @ 1..=DURATION_MS_MAX) if !auto_ack => Ok(Some(timeout_ms)),
                Ok(1..=DURATION_MS_MAX) => invalid(format!(
                    "{ARG_ACK_TIMEOUT} needs manual acks: auto-ack deliveries have no lease"
                )),
                _ => invalid(format!(
                    "{ARG_ACK_TIMEOUT} must be in 1..={DURATION_MS_MAX} ms, got {timeout_ms}"
                )),
            },
            other => invalid(format!(
                "{ARG_ACK_TIMEOUT} must be an integer number of ms, got {other:?}"
            )),
        }
    }
}

impl QueueFeatures {
    /// The priority a message is ordered by in this queue: its own, capped at the queue's
    /// maximum; 0 for every message when the queue has none.
    pub fn effective_priority(&self, message: &Message) -> u8 {
        self.max_priority
            .map_or(0, |max_priority| message.priority.min(max_priority))
    }

    /// Whether `n_messages` ready messages of `n_bytes` exceed the length limits.
    pub fn over_limit(&self, n_messages: u64, n_bytes: u64) -> bool {
        self.max_length.is_some_and(|max| n_messages > max)
            || self.max_length_bytes.is_some_and(|max| n_bytes > max)
    }
}

/// Properties fixed when a queue is declared; a redeclare must repeat them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueOptions {
    /// Survives a broker restart; its persistent messages are logged.
    pub durable: bool,
    /// Owned by the declaring connection: only it may use the queue, and it is deleted when
    /// that connection closes.
    pub exclusive: bool,
    /// Deleted when its last consumer leaves (once it has had one).
    pub auto_delete: bool,
    /// Only one consumer at a time receives messages; the next takes over when it leaves.
    pub single_active_consumer: bool,
    /// Extra arguments, kept for the queue features (limits, TTL, dead-lettering, ...).
    pub arguments: Headers,
}

/// How a consumer receives messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerOptions {
    /// For manual-ack consumers, the most unacked deliveries it may hold; in credit mode, also
    /// the most credit it may hold. 0 means unlimited.
    pub prefetch: u32,
    /// Credit mode (the protocol's `initial_credit`): `Some(n)` starts the consumer with `n`
    /// credits (at most `prefetch` when that is set); each delivery uses one, none is sent at
    /// zero, and [`Command::Credit`](crate::Command::Credit) adds more (again up to
    /// `prefetch`). `None`: only `prefetch` applies and credit is ignored, so an auto-ack
    /// consumer is sent whatever is ready.
    pub initial_credit: Option<u32>,
    /// Deliveries count as acked when sent.
    pub auto_ack: bool,
    /// No other consumer may attach to the queue while this one is attached.
    pub exclusive: bool,
    /// Higher priorities are served first while they have capacity.
    pub priority: i32,
    /// Lease for manual-ack deliveries: one not acked (or extended with
    /// [`Command::Touch`](crate::Command::Touch)) this many ms after it was delivered goes
    /// back to the queue for another consumer. `None`: no lease.
    pub ack_timeout_ms: Option<u64>,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            prefetch: 100,
            initial_credit: None,
            auto_ack: false,
            exclusive: false,
            priority: 0,
            ack_timeout_ms: None,
        }
    }
}

/// A message in a queue: shared message plus this queue's delivery state.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Position in the queue's arrival order; ready entries of one priority are kept sorted
    /// by it.
    pub seq: u64,
    /// The priority the queue orders it by (see [`QueueFeatures::effective_priority`]).
    pub priority: u8,
    pub message: Arc<Message>,
    pub redelivered: bool,
    pub delivery_count: u32,
    /// Set when the message is persistent and the queue durable: the id its log records use.
    pub durable_id: Option<u64>,
    /// When it expires if still ready (the message's or the queue's TTL, whichever is first).
    pub expires_at: Option<u64>,
    /// Requeues by consumers so far that followed the queue's retry schedule.
    pub retries: u32,
}

impl Entry {
    /// Whether its TTL has passed at `now_ms`. A message is alive through the millisecond its
    /// TTL ends, so a TTL of 0 means "deliver now or never" (as in RabbitMQ): delivered if a
    /// consumer can take it at once, expired from the next millisecond.
    pub(crate) fn expired(&self, now_ms: u64) -> bool {
        self.expires_at.is_some_and(|at| at < now_ms)
    }
}

/// A ready message moved out of memory (see [`crate::Effect::PageOut`]): everything its queue
/// needs to take it back with [`crate::Command::PageIn`], unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagedEntry {
    /// Its position in the queue's arrival order.
    pub seq: u64,
    /// The message.
    pub message: Arc<Message>,
    /// Its id in the log, if logged.
    pub durable_id: Option<u64>,
    /// Whether it was delivered before.
    pub redelivered: bool,
    /// Deliveries so far.
    pub delivery_count: u32,
    /// When it expires (unix ms), if it has a TTL: fixed when it became ready.
    pub expires_at: Option<u64>,
    /// Retry steps taken so far.
    pub retries: u32,
}

/// The paged tails of a queue larger than memory: once a pageable queue holds its threshold of
/// ready messages in memory, every later arrival is paged, and every later arrival of a
/// priority level whose tail is not empty is paged too, until that tail has drained back. So
/// each priority level's paged messages are always its newest, and order within a level holds.
/// A queue without `x-max-priority` has one level, 0: a plain FIFO tail. The core keeps only
/// counts and the runs of logged ids of each tail (a compact index: one run per stretch of
/// consecutive ids).
///
/// Delivery order across levels: while the highest level holding paged messages has none in
/// memory ([`Paged::blocks`]), the queue delivers nothing and asks for that level back, so no
/// lower priority overtakes a paged higher one.
#[derive(Debug, Clone, Default)]
pub(crate) struct Paged {
    /// Ready messages kept in memory at most; `None`: this queue never pages.
    pub threshold: Option<usize>,
    /// Body bytes of ready messages kept in memory at most (with `threshold`).
    pub threshold_bytes: u64,
    /// Paged messages over every tail.
    pub count: u64,
    /// Their body bytes.
    pub bytes: u64,
    /// The non-empty tails, by priority level.
    pub tails: BTreeMap<u8, Tail>,
    /// Bumped when the paged tails are discarded (purge, delete): page-ins of an older epoch
    /// are stale.
    pub epoch: u64,
    /// The level a page-in was requested for and not yet answered (one at a time per queue).
    pub page_in_pending: Option<u8>,
}

/// The paged messages of one priority level of a queue, oldest first.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tail {
    pub count: u64,
    pub bytes: u64,
    /// Ids of the logged paged messages, oldest first, as compact runs.
    pub ids: IdRuns,
}

impl Paged {
    /// Whether an arrival of priority `level` must be paged: that level's tail is not empty
    /// (order within the level), or memory is full (by count or by bytes).
    pub(crate) fn takes(&self, level: u8, in_memory: usize, in_memory_bytes: u64) -> bool {
        self.threshold.is_some_and(|threshold| {
            self.tails.contains_key(&level)
                || in_memory >= threshold
                || in_memory_bytes >= self.threshold_bytes
        })
    }

    /// The highest priority level holding paged messages.
    pub(crate) fn top_level(&self) -> Option<u8> {
        self.tails.last_key_value().map(|(level, _)| *level)
    }

    /// Whether the next message to deliver is paged: a level holds paged messages and no
    /// ready message in memory (whose highest level is `top_in_memory`) is of that level or
    /// higher. The queue then waits for that level's page-in rather than deliver a lower
    /// priority first.
    pub(crate) fn blocks(&self, top_in_memory: Option<u8>) -> bool {
        self.top_level()
            .is_some_and(|level| top_in_memory.is_none_or(|top| top < level))
    }

    fn push(&mut self, level: u8, size: u64, durable_id: Option<u64>) {
        self.count += 1;
        self.bytes += size;
        let tail = self.tails.entry(level).or_default();
        tail.count += 1;
        tail.bytes += size;
        if let Some(durable_id) = durable_id {
            tail.ids.push(durable_id);
        }
    }

    fn pop(&mut self, level: u8, size: u64, durable_id: Option<u64>) {
        let mut tail = match self.tails.entry(level) {
            std::collections::btree_map::Entry::Occupied(tail) => tail,
            std::collections::btree_map::Entry::Vacant(_) => {
                panic!("a paged entry comes back to a level that holds paged messages")
            }
        };
        let paged = tail.get_mut();
        self.count -= 1;
        self.bytes -= size;
        paged.count -= 1;
        paged.bytes -= size;
        if let Some(durable_id) = durable_id {
            let first = paged.ids.pop_front();
            assert_eq!(first, Some(durable_id), "paged messages come back in order");
        }
        if paged.count == 0 {
            tail.remove();
        }
    }

    /// Forgets every tail; returns their id runs.
    pub(crate) fn discard(&mut self) -> Vec<(u64, u64)> {
        self.count = 0;
        self.bytes = 0;
        self.epoch += 1;
        self.page_in_pending = None;
        std::mem::take(&mut self.tails)
            .into_values()
            .flat_map(|tail| tail.ids.runs())
            .collect()
    }
}

/// Ready messages in delivery order: highest priority first, by arrival within a priority; a
/// requeued message goes back to its arrival place within its priority.
///
/// Priority 0 (every message of a queue without `x-max-priority`) lives in `base`, so plain
/// queues pay one `is_empty` check on a map for priorities; higher levels get a deque each,
/// created when first used and removed when emptied: O(log P) per operation for P levels in use.
#[derive(Debug, Default, Clone)]
pub(crate) struct Ready {
    base: VecDeque<Entry>,
    higher: BTreeMap<u8, VecDeque<Entry>>,
    len: usize,
    bytes: u64,
    /// Entries with an expiry, by (expires at, priority, seq): the next to expire is the
    /// first, whatever its place in delivery order. Kept exact as entries leave, so it never
    /// holds more than the ready entries.
    expiring: BTreeSet<(u64, u8, u64)>,
}

fn insert_by_seq(level: &mut VecDeque<Entry>, entry: Entry) {
    let pos = level.partition_point(|existing| existing.seq < entry.seq);
    if let Some(existing) = level.get(pos) {
        assert!(existing.seq != entry.seq, "a message is never ready twice");
    }
    level.insert(pos, entry);
}

impl Ready {
    fn level_mut(&mut self, priority: u8) -> &mut VecDeque<Entry> {
        if priority == 0 {
            &mut self.base
        } else {
            self.higher.entry(priority).or_default()
        }
    }

    pub(crate) fn push_back(&mut self, entry: Entry) {
        self.len += 1;
        self.bytes += entry.message.size_bytes();
        if let Some(at) = entry.expires_at {
            self.expiring.insert((at, entry.priority, entry.seq));
        }
        let level = self.level_mut(entry.priority);
        if let Some(last) = level.back() {
            assert!(last.seq < entry.seq, "arrival order is strictly increasing");
        }
        level.push_back(entry);
    }

    /// Puts a requeued entry back at its arrival position in its priority (usually at or near
    /// the head).
    pub(crate) fn requeue(&mut self, entry: Entry) {
        self.len += 1;
        self.bytes += entry.message.size_bytes();
        if let Some(at) = entry.expires_at {
            self.expiring.insert((at, entry.priority, entry.seq));
        }
        insert_by_seq(self.level_mut(entry.priority), entry);
    }

    /// Removes the ready entry of arrival position `seq` in priority level `priority`, if it
    /// is there: O(log n) to find, O(distance to the nearer end) to remove (TTLs expire
    /// oldest-first, so usually at the head).
    pub(crate) fn remove(&mut self, priority: u8, seq: u64) -> Option<Entry> {
        let level = if priority == 0 {
            &mut self.base
        } else {
            self.higher.get_mut(&priority)?
        };
        let pos = level.partition_point(|existing| existing.seq < seq);
        if level.get(pos)?.seq != seq {
            return None;
        }
        let entry = level.remove(pos).expect("found above");
        if priority != 0 && level.is_empty() {
            self.higher.remove(&priority);
        }
        self.taken(&entry);
        Some(entry)
    }

    /// Bookkeeping for an entry that left.
    fn taken(&mut self, entry: &Entry) {
        self.len -= 1;
        self.bytes -= entry.message.size_bytes();
        if let Some(at) = entry.expires_at {
            self.expiring.remove(&(at, entry.priority, entry.seq));
        }
    }

    /// When the next ready entry has expired (the millisecond after its TTL ends).
    pub(crate) fn next_expiry(&self) -> Option<u64> {
        self.expiring.first().map(|(at, _, _)| at + 1)
    }

    /// Removes and returns a ready entry that has expired at `now_ms` (see [`Entry::expired`]),
    /// the earliest.
    pub(crate) fn pop_expired(&mut self, now_ms: u64) -> Option<Entry> {
        let &(at, priority, seq) = self.expiring.first()?;
        if at >= now_ms {
            return None;
        }
        let entry = self.remove(priority, seq);
        debug_assert!(entry.is_some(), "expiring entries are ready");
        entry
    }

    /// Takes the next message to deliver: the oldest of the highest priority.
    pub(crate) fn pop_front(&mut self) -> Option<Entry> {
        let entry = match self.higher.last_entry() {
            Some(mut level) => {
                let entry = level
                    .get_mut()
                    .pop_front()
                    .expect("empty levels are removed");
                if level.get().is_empty() {
                    level.remove();
                }
                entry
            }
            None => self.base.pop_front()?,
        };
        self.taken(&entry);
        Some(entry)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The highest priority level with a ready entry in memory.
    pub(crate) fn top_priority(&self) -> Option<u8> {
        match self.higher.last_key_value() {
            Some((priority, _)) => Some(*priority),
            None => (!self.base.is_empty()).then_some(0),
        }
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(crate) fn clear(&mut self) -> usize {
        let n_entries = self.len;
        self.base.clear();
        self.higher.clear();
        self.expiring.clear();
        self.len = 0;
        self.bytes = 0;
        n_entries
    }

    /// Every ready entry, in delivery order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.levels().flat_map(|(_, level)| level.iter())
    }

    /// The priority levels in delivery order (highest first, `0` last, always present), for
    /// the invariant checks.
    pub(crate) fn levels(&self) -> impl Iterator<Item = (u8, &VecDeque<Entry>)> {
        self.higher
            .iter()
            .rev()
            .map(|(priority, level)| (*priority, level))
            .chain(std::iter::once((0, &self.base)))
    }

    /// The expiry index: (expires at, priority, seq) of every ready entry with a TTL.
    pub(crate) fn expiring(&self) -> &BTreeSet<(u64, u8, u64)> {
        &self.expiring
    }

    /// Breaks the cached byte count on purpose (invariant check tests).
    #[cfg(test)]
    pub(crate) fn corrupt_bytes(&mut self, delta: u64) {
        self.bytes += delta;
    }

    /// Forgets the expiry index on purpose (invariant check tests).
    #[cfg(test)]
    pub(crate) fn corrupt_expiring(&mut self) {
        self.expiring.clear();
    }

    /// Swaps the first two entries of priority 0 on purpose (invariant check tests).
    #[cfg(test)]
    pub(crate) fn corrupt_order(&mut self) {
        self.base.swap(0, 1);
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Consumer {
    pub connection: ConnectionId,
    pub tag: ConsumerTag,
    pub options: ConsumerOptions,
    /// Credit mode ([`ConsumerOptions::initial_credit`]): deliveries still allowed before the
    /// client grants more; 0 otherwise.
    pub credit: u32,
    /// Manual-ack consumers: deliveries not yet acked.
    pub unacked: u32,
    /// The first delivery tag this subscription can have been given (its connection's next
    /// tag when it subscribed): tells its deliveries from those of an earlier consumer of the
    /// same tag.
    pub first_delivery_tag: u64,
}

impl Consumer {
    pub(crate) fn has_capacity(&self) -> bool {
        let credit = self.options.initial_credit.is_none() || self.credit > 0;
        let prefetch = self.options.prefetch == 0
            || self.options.auto_ack
            || self.unacked < self.options.prefetch;
        credit && prefetch
    }

    /// The credit a consumer holds after `granted` more: saturating, and at most its
    /// prefetch when it has one.
    pub(crate) fn credit_after(&self, granted: u32) -> u32 {
        let credit = self.credit.saturating_add(granted);
        match self.options.prefetch {
            0 => credit,
            prefetch => credit.min(prefetch),
        }
    }
}

/// Per-queue statistics, as reported by [`crate::Broker::queue_stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Queue name.
    pub name: String,
    /// Whether the queue is durable.
    pub durable: bool,
    /// Whether the queue is exclusive to a connection.
    pub exclusive: bool,
    /// Whether the queue is deleted when its last consumer leaves.
    pub auto_delete: bool,
    /// Messages waiting for a consumer.
    pub ready: u64,
    /// Body bytes of the ready messages.
    pub ready_bytes: u64,
    /// Ready messages paged out of memory (included in `ready`; see [`crate::Limits::paging_threshold`]).
    pub paged: u64,
    /// Messages delivered and not yet acked.
    pub unacked: u64,
    /// Consumers attached.
    pub consumers: u32,
    /// Messages enqueued since the queue was declared.
    pub published: u64,
    /// Deliveries made (redeliveries included).
    pub delivered: u64,
    /// Deliveries of messages that had been delivered before.
    pub redelivered: u64,
    /// Messages acked (auto-ack deliveries count as acked when sent).
    pub acked: u64,
    /// Messages that left the queue without an ack: nacked or rejected without requeue,
    /// dropped from the head by the length limit (`x-overflow = drop-head`), or over their
    /// delivery limit; dead-lettered ones included.
    pub dropped: u64,
    /// Messages waiting for their delay (published with one, deferred or retried) before
    /// they become ready.
    pub delayed: u64,
    /// Messages whose TTL passed while ready (dropped or dead-lettered; not in `dropped`).
    pub expired: u64,
    /// Publishes dropped as duplicates of a message id within the dedup window.
    pub duplicates: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Queue {
    pub name: Arc<str>,
    /// Its virtual host.
    pub vhost: Arc<str>,
    /// What the server logs and spools it under (`crate::resource_key`).
    pub key: Arc<str>,
    /// Who declared it (`crate::Declarer`), if the server said.
    pub declared_by: Option<Arc<str>>,
    pub options: QueueOptions,
    pub owner: Option<ConnectionId>,
    pub ready: Ready,
    pub unacked: u64,
    /// Body bytes of the unacked deliveries (the server's memory alarm: a queue whose
    /// deliveries pile up unacked grows too).
    pub unacked_bytes: u64,
    pub consumers: Vec<Consumer>,
    /// Round-robin position among consumers.
    pub cursor: usize,
    pub next_seq: u64,
    /// Priorities and length limits, read from `options.arguments` at declare time.
    pub features: QueueFeatures,
    /// Bindings that lead here: (source exchange, routing key, arguments).
    pub bound_from: Vec<(Arc<str>, Arc<str>, Headers)>,
    pub stats: QueueStats,
    /// Last time it was declared or had a consumer (for `x-expires`).
    pub last_used_ms: u64,
    /// Message ids seen within the dedup window.
    pub dedup: DedupWindow,
    /// The due time of the TTL timer set for this queue, if one is pending.
    pub ttl_armed: Option<u64>,
    /// Its paged tail (queues larger than memory).
    pub paged: Paged,
}

/// The message ids a queue with `x-dedup-window` has enqueued recently, with when each is
/// forgotten. Deadlines are `enqueue time + window` with a fixed window and a clock that never
/// goes back, so they are increasing and pruning pops the front: amortized O(1) per publish.
#[derive(Debug, Clone, Default)]
pub(crate) struct DedupWindow {
    until: std::collections::HashMap<Arc<str>, u64, crate::FixedState>,
    order: VecDeque<(u64, Arc<str>)>,
}

impl DedupWindow {
    fn prune(&mut self, now_ms: u64) {
        while let Some((until, _)) = self.order.front() {
            if *until > now_ms {
                break;
            }
            let (until, id) = self.order.pop_front().expect("peeked");
            if self.until.get(&id) == Some(&until) {
                self.until.remove(&id);
            }
        }
    }

    /// Whether `id` was seen and is still remembered at `now_ms`.
    pub(crate) fn contains(&mut self, id: &str, now_ms: u64) -> bool {
        self.prune(now_ms);
        self.until.contains_key(id)
    }

    /// Remembers `id` until `until_ms` (a later deadline than one it has replaces it).
    pub(crate) fn insert(&mut self, id: &str, until_ms: u64, now_ms: u64) {
        self.prune(now_ms);
        if until_ms <= now_ms {
            return;
        }
        let id: Arc<str> = id.into();
        let slot = self.until.entry(id.clone()).or_insert(0);
        if *slot < until_ms {
            *slot = until_ms;
            // Restored entries may come out of order: keep `order` sorted.
            let pos = self.order.partition_point(|(until, _)| *until <= until_ms);
            self.order.insert(pos, (until_ms, id));
        }
    }

    /// Every remembered id with its deadline, oldest first.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (&str, u64)> {
        self.order
            .iter()
            .filter(|(until, id)| self.until.get(id) == Some(until))
            .map(|(until, id)| (&**id, *until))
    }

    /// Ids remembered (some may be past their deadline until the next prune).
    pub(crate) fn len(&self) -> usize {
        self.until.len()
    }
}

impl Queue {
    pub(crate) fn new(
        vhost: Arc<str>,
        name: Arc<str>,
        options: QueueOptions,
        features: QueueFeatures,
        owner: Option<ConnectionId>,
    ) -> Self {
        Queue {
            features,
            stats: QueueStats {
                name: name.to_string(),
                durable: options.durable,
                exclusive: options.exclusive,
                auto_delete: options.auto_delete,
                ..QueueStats::default()
            },
            key: if &*vhost == crate::name::DEFAULT_VHOST {
                name.clone()
            } else {
                crate::name::resource_key(&vhost, &name).into()
            },
            vhost,
            name,
            declared_by: None,
            options,
            owner,
            ready: Ready::default(),
            unacked: 0,
            unacked_bytes: 0,
            consumers: Vec::new(),
            cursor: 0,
            next_seq: 0,
            bound_from: Vec::new(),
            last_used_ms: 0,
            dedup: DedupWindow::default(),
            ttl_armed: None,
            paged: Paged::default(),
        }
    }

    /// A new entry for `message` (not yet in the queue: see [`Queue::push_ready`]).
    pub(crate) fn new_entry(
        &self,
        message: Arc<Message>,
        durable_id: Option<u64>,
        redelivered: bool,
    ) -> Entry {
        Entry {
            seq: 0,
            priority: self.features.effective_priority(&message),
            message,
            redelivered,
            delivery_count: 0,
            durable_id,
            expires_at: None,
            retries: 0,
        }
    }

    /// Gives an arriving entry the next arrival position and, when the message or the queue
    /// has a TTL, its expiry counted from `now_ms`.
    fn stamp(&mut self, entry: &mut Entry, now_ms: u64) {
        entry.seq = self.next_seq;
        self.next_seq += 1;
        let ttl = match (entry.message.expiration_ms, self.features.message_ttl) {
            (Some(own), Some(queue)) => Some(own.min(queue)),
            (own, queue) => own.or(queue),
        };
        entry.expires_at = ttl.map(|ttl| now_ms.saturating_add(ttl));
    }

    /// Appends an entry to the ready messages with the next arrival position and, when the
    /// message or the queue has a TTL, its expiry counted from `now_ms`. Returns the expiry.
    pub(crate) fn push_ready(&mut self, mut entry: Entry, now_ms: u64) -> Option<u64> {
        self.stamp(&mut entry, now_ms);
        let expires_at = entry.expires_at;
        self.ready.push_back(entry);
        expires_at
    }

    /// Like [`Queue::push_ready`], but the entry joins the paged tail: it is counted, and
    /// returned for the server to keep.
    pub(crate) fn page_out(&mut self, mut entry: Entry, now_ms: u64) -> PagedEntry {
        self.stamp(&mut entry, now_ms);
        self.paged
            .push(entry.priority, entry.message.size_bytes(), entry.durable_id);
        PagedEntry {
            seq: entry.seq,
            message: entry.message,
            durable_id: entry.durable_id,
            redelivered: entry.redelivered,
            delivery_count: entry.delivery_count,
            expires_at: entry.expires_at,
            retries: entry.retries,
        }
    }

    /// Takes a paged entry of priority `level` back into memory, at the back of its level's
    /// ready messages (it is newer than all of them). Returns its size.
    pub(crate) fn page_in(&mut self, level: u8, paged: PagedEntry) -> u64 {
        let size = paged.message.size_bytes();
        let priority = self.features.effective_priority(&paged.message);
        assert_eq!(priority, level, "a paged entry comes back to its own level");
        self.paged.pop(level, size, paged.durable_id);
        let entry = Entry {
            seq: paged.seq,
            priority,
            message: paged.message,
            redelivered: paged.redelivered,
            delivery_count: paged.delivery_count,
            durable_id: paged.durable_id,
            expires_at: paged.expires_at,
            retries: paged.retries,
        };
        self.ready.push_back(entry);
        size
    }

    /// Ready messages, paged ones included.
    pub(crate) fn ready_total(&self) -> u64 {
        self.ready.len() as u64 + self.paged.count
    }

    /// Body bytes of the ready messages, paged ones included.
    pub(crate) fn ready_bytes(&self) -> u64 {
        self.ready.bytes() + self.paged.bytes
    }

    /// Whether persistent messages in this queue are logged.
    pub(crate) fn is_durable(&self) -> bool {
        self.options.durable && !self.options.exclusive
    }

    pub(crate) fn consumer_idx(&self, connection: ConnectionId, tag: ConsumerTag) -> Option<usize> {
        self.consumers
            .iter()
            .position(|consumer| consumer.connection == connection && consumer.tag == tag)
    }

    /// The consumer that gets the next message: the highest priority with capacity, round
    /// robin among equals; with single-active-consumer, only the first attached.
    pub(crate) fn pick_consumer(&mut self) -> Option<usize> {
        let n_consumers = self.consumers.len();
        if n_consumers == 0 {
            return None;
        }
        if self.options.single_active_consumer {
            return self.consumers[0].has_capacity().then_some(0);
        }
        if n_consumers == 1 {
            return self.consumers[0].has_capacity().then_some(0);
        }
        let top_priority = self
            .consumers
            .iter()
            .map(|consumer| consumer.options.priority)
            .max()
            .unwrap_or(0);
        let mut best: Option<usize> = None;
        for step in 0..n_consumers {
            let idx = (self.cursor + step) % n_consumers;
            let consumer = &self.consumers[idx];
            if !consumer.has_capacity() {
                continue;
            }
            if best.is_none_or(|best_idx| {
                consumer.options.priority > self.consumers[best_idx].options.priority
            }) {
                best = Some(idx);
                if consumer.options.priority == top_priority {
                    break;
                }
            }
        }
        if let Some(idx) = best {
            self.cursor = (idx + 1) % n_consumers;
        }
        best
    }

    pub(crate) fn stats(&self) -> QueueStats {
        let mut stats = self.stats.clone();
        stats.ready = self.ready_total();
        stats.ready_bytes = self.ready.bytes() + self.paged.bytes;
        stats.paged = self.paged.count;
        stats.unacked = self.unacked;
        stats.consumers = self.consumers.len() as u32;
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64) -> Entry {
        prioritized(seq, 0)
    }

    fn prioritized(seq: u64, priority: u8) -> Entry {
        Entry {
            seq,
            priority,
            message: Arc::new(Message::new("k", vec![0u8; 3])),
            redelivered: false,
            delivery_count: 0,
            durable_id: None,
            expires_at: None,
            retries: 0,
        }
    }

    #[test]
    fn requeued_entries_return_to_their_arrival_position() {
        let mut ready = Ready::default();
        for seq in [2, 5, 7] {
            ready.push_back(entry(seq));
        }
        ready.requeue(entry(1));
        ready.requeue(entry(6));
        let order: Vec<u64> = ready.iter().map(|entry| entry.seq).collect();
        assert_eq!(order, vec![1, 2, 5, 6, 7]);
        assert_eq!(ready.bytes(), 15);
        assert_eq!(ready.pop_front().unwrap().seq, 1);
        assert_eq!(ready.bytes(), 12);
    }

    #[test]
    fn higher_priorities_come_first_and_requeues_return_within_their_priority() {
        let mut ready = Ready::default();
        for (seq, priority) in [(0, 0), (1, 5), (2, 1), (3, 5), (4, 0)] {
            ready.push_back(prioritized(seq, priority));
        }
        let first = ready.pop_front().unwrap();
        assert_eq!((first.seq, first.priority), (1, 5));
        ready.requeue(first);
        let order: Vec<u64> = ready.iter().map(|entry| entry.seq).collect();
        assert_eq!(order, vec![1, 3, 2, 0, 4]);
        let mut popped = Vec::new();
        while let Some(entry) = ready.pop_front() {
            popped.push(entry.seq);
        }
        assert_eq!(popped, order);
        assert!(ready.is_empty() && ready.higher.is_empty());
        assert_eq!(ready.bytes(), 0);
    }

    #[test]
    fn queue_arguments_are_validated() {
        let features = |arguments: Headers| QueueFeatures::try_from(&arguments);
        assert_eq!(features(Headers::new()), Ok(QueueFeatures::default()));
        let full = Headers::new()
            .with(ARG_MAX_PRIORITY, 10i64)
            .with(ARG_MAX_LENGTH, 0i64)
            .with(ARG_MAX_LENGTH_BYTES, 100i64)
            .with(ARG_OVERFLOW, "reject-publish")
            .with("x-unknown", "kept");
        assert_eq!(
            features(full),
            Ok(QueueFeatures {
                max_priority: Some(10),
                max_length: Some(0),
                max_length_bytes: Some(100),
                overflow: Overflow::RejectPublish,
                dead_letter_exchange: None,
                dead_letter_routing_key: None,
                delivery_limit: None,
                message_ttl: None,
                expires: None,
                retry: None,
                dedup_window: None,
                sync: None,
            })
        );
        for (text, sync) in [
            ("always", QueueSync::Always),
            ("never", QueueSync::Never),
            ("interval=250", QueueSync::Interval(250)),
        ] {
            let parsed = features(Headers::new().with(ARG_SYNC, text)).unwrap();
            assert_eq!(parsed.sync, Some(sync));
        }
        for bad in [
            Headers::new().with(ARG_SYNC, "sometimes"),
            Headers::new().with(ARG_SYNC, "interval=0"),
            Headers::new().with(ARG_SYNC, "interval="),
            Headers::new().with(ARG_SYNC, 1i64),
            Headers::new().with(ARG_MAX_PRIORITY, 0i64),
            Headers::new().with(ARG_MAX_PRIORITY, 256i64),
            Headers::new().with(ARG_MAX_PRIORITY, "9"),
            Headers::new().with(ARG_MAX_LENGTH, -1i64),
            Headers::new().with(ARG_MAX_LENGTH_BYTES, 1.5f64),
            Headers::new().with(ARG_OVERFLOW, "reject-publish-dlq"),
            Headers::new().with(ARG_OVERFLOW, true),
            Headers::new().with(ARG_DEAD_LETTER_EXCHANGE, 1i64),
            Headers::new().with(ARG_DELIVERY_LIMIT, -3i64),
            Headers::new().with(ARG_DEAD_LETTER_ROUTING_KEY, "k".repeat(256)),
        ] {
            assert!(
                matches!(
                    features(bad.clone()),
                    Err(CoreError::InvalidArgument { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn single_active_consumer_and_ack_timeout_arguments_parse_or_are_refused() {
        let mut arguments = Headers::new()
            .with(ARG_SINGLE_ACTIVE_CONSUMER, true)
            .with("x-other", 1i64);
        assert_eq!(
            QueueOptions::take_single_active_consumer(&mut arguments),
            Ok(true)
        );
        assert!(
            arguments.get(ARG_SINGLE_ACTIVE_CONSUMER).is_none(),
            "taken out"
        );
        assert!(arguments.get("x-other").is_some(), "others kept");
        assert_eq!(
            QueueOptions::take_single_active_consumer(&mut arguments),
            Ok(false)
        );
        let mut wrong = Headers::new().with(ARG_SINGLE_ACTIVE_CONSUMER, "yes");
        assert!(matches!(
            QueueOptions::take_single_active_consumer(&mut wrong),
            Err(CoreError::InvalidArgument { .. })
        ));

        let lease = |value: HeaderValue, auto_ack: bool| {
            ConsumerOptions::ack_timeout_of(&Headers::new().with(ARG_ACK_TIMEOUT, value), auto_ack)
        };
        assert_eq!(
            ConsumerOptions::ack_timeout_of(&Headers::new(), false),
            Ok(None)
        );
        assert_eq!(lease(HeaderValue::Int(1), false), Ok(Some(1)));
        assert_eq!(
            lease(HeaderValue::Int(DURATION_MS_MAX as i64), false),
            Ok(Some(DURATION_MS_MAX))
        );
        for (value, auto_ack) in [
            (HeaderValue::Int(0), false),
            (HeaderValue::Int(-5), false),
            (HeaderValue::Int(DURATION_MS_MAX as i64 + 1), false),
            (HeaderValue::Str("30000".into()), false),
            (HeaderValue::Int(30_000), true),
        ] {
            assert!(
                matches!(
                    lease(value.clone(), auto_ack),
                    Err(CoreError::InvalidArgument { .. })
                ),
                "{value:?} auto_ack={auto_ack}"
            );
        }
    }

    #[test]
    fn the_strongest_sync_need_of_a_message_s_queues_wins() {
        use QueueSync::{Always, Interval, Never};
        let need = |queues: &[Option<QueueSync>]| {
            let mut need = DurableSync::default();
            queues.iter().for_each(|queue| need.add(*queue));
            need
        };
        assert_eq!(
            need(&[Some(Never)]).resolve(Always),
            Never,
            "an override replaces the broker's"
        );
        assert_eq!(
            need(&[Some(Never), None]).resolve(Always),
            Always,
            "a queue on the default counts"
        );
        assert_eq!(need(&[None]).resolve(Interval(5)), Interval(5));
        assert_eq!(
            need(&[Some(Interval(50)), Some(Interval(5)), Some(Never)]).resolve(Never),
            Interval(5)
        );
        assert_eq!(need(&[Some(Always), Some(Never)]).resolve(Never), Always);
        let mut merged = need(&[Some(Never)]);
        merged.merge(need(&[Some(Interval(9)), None]));
        assert_eq!(merged.resolve(Never), Interval(9));
        assert_eq!(merged.resolve(Always), Always);
    }

    #[test]
    #[should_panic(expected = "strictly increasing")]
    fn pushing_out_of_order_is_a_broken_invariant() {
        let mut ready = Ready::default();
        ready.push_back(entry(3));
        ready.push_back(entry(2));
    }
}
