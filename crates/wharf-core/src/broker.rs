//! The broker state and the one way to change it: [`Broker::apply`] a [`Command`].

use crate::error::{CoreError, EntityKind};
use crate::exchange::{
    BindingKey, Destination, Exchange, ExchangeKind, ExchangeOptions, HeadersMatch,
};
use crate::limits::{DEAD_LETTERS_PER_COMMAND_MAX, EXCHANGE_HOPS_MAX, HEADER_DEPTH_MAX, Limits};
use crate::message::{HeaderValue, Headers, Message};
use crate::name::{RESERVED_PREFIX, validate_name, validate_routing_key, validate_user_name};
use crate::outstanding::Outstanding;
use crate::queue::{
    Consumer, ConsumerOptions, DURATION_MS_MAX, DurableSync, Entry, Overflow, PagedEntry, Queue,
    QueueFeatures, QueueOptions, QueueStats,
};
use crate::timers::{TimerKind, Timers};
use crate::{ConnectionId, ConsumerTag, DeliveryTag, FixedState, QueueId};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

mod invariants;
pub use invariants::{Invariant, InvariantViolation};

/// The name of the default exchange, which routes to the queue named by the routing key.
pub const DEFAULT_EXCHANGE: &str = "";

/// The built-in exchanges every broker has: `(name, kind)`.
pub const BUILTIN_EXCHANGES: [(&str, ExchangeKind); 5] = [
    (DEFAULT_EXCHANGE, ExchangeKind::Direct),
    ("wharf.direct", ExchangeKind::Direct),
    ("wharf.fanout", ExchangeKind::Fanout),
    ("wharf.topic", ExchangeKind::Topic),
    ("wharf.headers", ExchangeKind::Headers),
];

/// Where a binding leads, by name (the command form of [`Destination`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindTarget {
    /// A queue.
    Queue(String),
    /// An exchange (exchange-to-exchange binding).
    Exchange(String),
}

/// A state change. Applying the same commands in the same order to the same state always gives
/// the same state, replies and effects: this is what the log records and what replication will
/// replicate.
#[derive(Debug, Clone)]
pub enum Command {
    /// A client connected.
    OpenConnection {
        /// Chosen by the server, unique for the broker's life.
        connection: ConnectionId,
    },
    /// A client went away: its consumers are cancelled, its unacked messages requeued, its
    /// exclusive queues deleted.
    CloseConnection {
        /// The connection.
        connection: ConnectionId,
    },
    /// Create an exchange, or check that an equivalent one exists.
    DeclareExchange {
        /// Name (`wharf.` is reserved).
        name: String,
        /// Routing kind.
        kind: ExchangeKind,
        /// Properties.
        options: ExchangeOptions,
        /// Only check that it exists.
        passive: bool,
    },
    /// Delete an exchange and its bindings.
    DeleteExchange {
        /// Name.
        name: String,
        /// Refuse if it has bindings.
        if_unused: bool,
    },
    /// Create a queue, or check that an equivalent one exists. An empty name asks the broker
    /// to generate one (`wharf.gen-N`).
    DeclareQueue {
        /// The declaring connection (owner when exclusive).
        connection: ConnectionId,
        /// Name, or empty for a generated name.
        name: String,
        /// Properties.
        options: QueueOptions,
        /// Only check that it exists.
        passive: bool,
    },
    /// Delete a queue: its consumers are cancelled and its messages dropped.
    DeleteQueue {
        /// The connection asking.
        connection: ConnectionId,
        /// Name.
        name: String,
        /// Refuse if it has consumers.
        if_unused: bool,
        /// Refuse if it has ready messages.
        if_empty: bool,
    },
    /// Drop every ready message of a queue (unacked ones are untouched).
    PurgeQueue {
        /// The connection asking.
        connection: ConnectionId,
        /// Name.
        name: String,
    },
    /// Bind a queue or exchange to a source exchange.
    Bind {
        /// The exchange messages come from.
        source: String,
        /// Where they go.
        target: BindTarget,
        /// Key or pattern (topic) the binding matches.
        routing_key: String,
        /// Arguments (headers exchanges: `x-match` and the headers to match).
        arguments: Headers,
    },
    /// Remove a binding.
    Unbind {
        /// The exchange messages come from.
        source: String,
        /// Where they went.
        target: BindTarget,
        /// Key or pattern.
        routing_key: String,
        /// Arguments, as bound.
        arguments: Headers,
    },
    /// Route a message to the queues whose bindings match.
    Publish {
        /// Exchange and routing key are inside the message.
        message: Arc<Message>,
    },
    /// Attach a consumer to a queue.
    Subscribe {
        /// The consuming connection.
        connection: ConnectionId,
        /// The queue.
        queue: String,
        /// Chosen by the client, unique on its connection.
        consumer_tag: ConsumerTag,
        /// Prefetch, ack mode, exclusivity, priority.
        options: ConsumerOptions,
    },
    /// Detach a consumer; its unacked messages are requeued.
    Cancel {
        /// The connection.
        connection: ConnectionId,
        /// The consumer.
        consumer_tag: ConsumerTag,
    },
    /// Grant an auto-ack consumer more deliveries (up to its prefetch).
    Credit {
        /// The connection.
        connection: ConnectionId,
        /// The consumer.
        consumer_tag: ConsumerTag,
        /// Deliveries to add.
        credit: u32,
    },
    /// The consumer processed a delivery (or, with `multiple`, every one up to it; tag 0 with
    /// `multiple` means all outstanding).
    Ack {
        /// The connection.
        connection: ConnectionId,
        /// The delivery.
        delivery_tag: DeliveryTag,
        /// Up to and including this tag.
        multiple: bool,
    },
    /// The consumer failed a delivery: requeue it or drop it.
    Nack {
        /// The connection.
        connection: ConnectionId,
        /// The delivery.
        delivery_tag: DeliveryTag,
        /// Up to and including this tag (0: all outstanding).
        multiple: bool,
        /// Back to the queue (flagged redelivered) instead of dropped.
        requeue: bool,
    },
    /// Ack every outstanding delivery whose tag lies in `first..=last` (tags of the range that
    /// are not outstanding are skipped; a range with none outstanding is an unknown tag).
    AckRange {
        /// The connection.
        connection: ConnectionId,
        /// First tag of the range.
        first: DeliveryTag,
        /// Last tag of the range (inclusive).
        last: DeliveryTag,
    },
    /// Recovery: put a logged message back in a durable queue, at the end, flagged
    /// redelivered (it may have been delivered before the restart). Ids must increase per queue.
    Restore {
        /// The queue.
        queue: String,
        /// The message's id in the log.
        durable_id: u64,
        /// The message.
        message: Arc<Message>,
        /// When it became (or, if later than now, becomes) ready in the queue: its delay ends
        /// then and its TTL counts from then (see [`Effect::DurableEnqueued`]).
        ready_at_ms: u64,
    },
    /// Recovery: remember a message id in a durable queue's dedup window until `until_ms`.
    RestoreDedup {
        /// The queue.
        queue: String,
        /// The message id.
        message_id: String,
        /// When the window forgets it.
        until_ms: u64,
    },
    /// Fire every timer due at the command's time: delayed messages enter their queues, TTLs
    /// expire ready messages, lapsed leases return deliveries, unused queues with `x-expires`
    /// are deleted. The server applies it at [`Broker::next_deadline`].
    Tick,
    /// Nack one delivery and requeue it after `delay_ms` (flagged redelivered), at the back of
    /// its queue. The delivery limit applies as for a requeue.
    Defer {
        /// The connection.
        connection: ConnectionId,
        /// The delivery.
        delivery_tag: DeliveryTag,
        /// How long the message waits before it is ready again.
        delay_ms: u64,
    },
    /// Extend the lease of an outstanding delivery by its consumer's `ack_timeout_ms` from
    /// now ("still in progress"). A delivery without a lease, or whose lease already lapsed,
    /// is left as it is.
    Touch {
        /// The connection.
        connection: ConnectionId,
        /// The delivery.
        delivery_tag: DeliveryTag,
    },
    /// Move dead-lettered ready messages of `queue` back to the queue they last died in (from
    /// their `x-death` record), with their original exchange and routing key and without
    /// their death records. Messages without a record, or whose queue is gone or full, stay.
    Redrive {
        /// The connection asking.
        connection: ConnectionId,
        /// The dead-letter queue.
        queue: String,
        /// Most messages to move (0: all).
        max: u64,
    },
    /// The server's answer to [`Effect::PageIn`]: the oldest paged messages of `queue`, in
    /// order, as they were paged out. Ignored when stale (the tail was discarded since: purge,
    /// delete) or unasked.
    PageIn {
        /// The queue.
        queue: String,
        /// The tail's epoch, from the effect.
        epoch: u64,
        /// The oldest paged entries, at most the number asked for.
        entries: Vec<PagedEntry>,
    },
    /// Nack of exactly one delivery.
    Reject {
        /// The connection.
        connection: ConnectionId,
        /// The delivery.
        delivery_tag: DeliveryTag,
        /// Back to the queue instead of dropped.
        requeue: bool,
    },
}

/// What a successful command returns to its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Done, nothing to report.
    Done,
    /// The queue exists (created or checked).
    QueueDeclared {
        /// Its name (generated when the declare gave none).
        name: Arc<str>,
        /// Ready messages.
        ready: u64,
        /// Consumers attached.
        consumers: u32,
    },
    /// The queue was deleted with this many ready messages.
    QueueDeleted {
        /// Messages dropped.
        messages: u64,
    },
    /// The queue was purged.
    Purged {
        /// Messages dropped.
        messages: u64,
    },
    /// The message was routed.
    Published {
        /// Queues it was enqueued in (0: unroutable, dropped).
        routed: u32,
        /// A target queue that refused its copy because it is full (`x-overflow =
        /// reject-publish`) while other targets took theirs. The publish must then be refused
        /// to the publisher (as RabbitMQ nacks it), but the copies enqueued elsewhere stay.
        /// (When every target refuses, the command fails with [`CoreError::QueueFull`] and
        /// nothing changes.)
        refused_by: Option<Arc<str>>,
        /// Target queues that dropped their copy because its message id is in their dedup
        /// window. With `routed == 0` the publish was a duplicate.
        duplicates: u32,
    },
    /// Dead-lettered messages moved back (see [`Command::Redrive`]).
    Redriven {
        /// Messages moved.
        moved: u64,
    },
    /// Acks, nacks and rejects: how many deliveries were settled.
    Settled {
        /// Deliveries settled.
        count: u32,
    },
}

/// A message handed to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The consumer's connection.
    pub connection: ConnectionId,
    /// The consumer.
    pub consumer_tag: ConsumerTag,
    /// Identifies the delivery for ack / nack / reject; increasing per connection.
    pub delivery_tag: DeliveryTag,
    /// The queue it came from.
    pub queue: Arc<str>,
    /// The message (shared, never copied).
    pub message: Arc<Message>,
    /// It was delivered before (requeued after a nack, cancel or disconnect).
    pub redelivered: bool,
    /// Deliveries of this message from this queue, this one included.
    pub delivery_count: u32,
}

/// Why the broker cancelled a consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// Its queue was deleted.
    QueueDeleted,
}

/// Something the caller (the server) must carry out after a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send a message to a consumer.
    Deliver(Delivery),
    /// Tell a client that the broker cancelled its consumer.
    ConsumerCancelled {
        /// The consumer's connection.
        connection: ConnectionId,
        /// The consumer.
        consumer_tag: ConsumerTag,
        /// Why.
        reason: CancelReason,
    },
    /// A queue was deleted (explicitly, exclusive owner gone, or auto-delete).
    QueueDeleted {
        /// Its name.
        name: Arc<str>,
        /// Whether it was durable (the server forgets it on disk).
        durable: bool,
    },
    /// An exchange was deleted (explicitly or auto-delete).
    ExchangeDeleted {
        /// Its name.
        name: Arc<str>,
        /// Whether it was durable (the server forgets it on disk).
        durable: bool,
    },
    /// A persistent message entered durable queues: the server logs it before confirming.
    /// Always emitted before any effect that concerns the same message.
    DurableEnqueued {
        /// The message's id in the log, increasing in publish order.
        durable_id: u64,
        /// The durable queues it entered.
        queues: Vec<Arc<str>>,
        /// The message.
        message: Arc<Message>,
        /// When it is ready in those queues: now, or when its delay ends. Recovery passes it
        /// back in [`Command::Restore`].
        ready_at_ms: u64,
        /// What those queues' sync policies (`x-sync`) ask of its log record.
        sync: DurableSync,
    },
    /// A logged message left a durable queue for good (acked, dropped, purged, auto-acked).
    DurableSettled {
        /// The message's id in the log.
        durable_id: u64,
        /// The queue it left.
        queue: Arc<str>,
    },
    /// Logged messages with consecutive ids left a durable queue for good (a purge of its
    /// paged tail): every id in `first..first + count` was in the queue.
    DurableSettledRange {
        /// The first id.
        first: u64,
        /// How many.
        count: u64,
        /// The queue they left.
        queue: Arc<str>,
    },
    /// A ready message joins the paged tail of a queue larger than memory: the server keeps it
    /// (in order, per queue and epoch) until the core asks for it back with
    /// [`Effect::PageIn`]. Logged messages are still logged as usual.
    PageOut {
        /// The queue.
        queue: Arc<str>,
        /// The tail's epoch (see [`Effect::PagesDropped`]).
        epoch: u64,
        /// The message and its queue state.
        entry: Box<PagedEntry>,
    },
    /// The queue wants up to `max` of its oldest paged messages back, and no more body bytes
    /// than `max_bytes` past the first: answer with [`Command::PageIn`] (at least one entry).
    /// At most one request per queue is outstanding.
    PageIn {
        /// The queue.
        queue: Arc<str>,
        /// The tail's epoch.
        epoch: u64,
        /// Most entries wanted (at least 1, never more than are paged).
        max: u64,
        /// Body bytes wanted at most (the first entry is taken whatever its size).
        max_bytes: u64,
    },
    /// The paged tail of `queue` at `epoch` was discarded (purge, queue deleted): the server
    /// may forget what it kept.
    PagesDropped {
        /// The queue.
        queue: Arc<str>,
        /// The epoch discarded.
        epoch: u64,
    },
}

#[derive(Debug, Clone)]
struct Unacked {
    queue: QueueId,
    consumer_tag: ConsumerTag,
    entry: Entry,
    /// (lapses at, ack timeout) when the consumer has an ack timeout.
    lease: Option<(u64, u64)>,
}

/// Delivery tags whose lease lapsed that a connection remembers, so that settling one late is
/// a harmless no-op instead of an unknown tag; the oldest are forgotten past this.
const LAPSED_TAGS_MAX: usize = 65_536;

/// Timers fired by one [`Command::Tick`] at most; the rest stay due, so the server ticks again
/// at once, and other commands get the broker in between.
const TIMERS_PER_TICK_MAX: usize = 65_536;

pub use crate::limits::ROUTED_TRACKED_MAX;

/// A queue's backlog and progress, for the server's publisher flow control
/// ([`Broker::queue_flow`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFlow {
    /// Ready messages (paged ones included).
    pub ready: u64,
    /// Body bytes of the ready messages.
    pub ready_bytes: u64,
    /// Consumers attached.
    pub consumers: u32,
    /// Those of them on the publishing connection itself (holding its reads would hold their
    /// acks and credit too).
    pub own_consumers: u32,
    /// Deliveries made so far: it advances while consumers are taking messages.
    pub delivered: u64,
}

#[derive(Debug, Clone, Default)]
struct Connection {
    next_delivery_tag: u64,
    unacked: Outstanding<Unacked>,
    consumers: BTreeMap<ConsumerTag, QueueId>,
    exclusive_queues: Vec<QueueId>,
    /// Deliveries whose lease lapsed (they went back to their queue).
    lapsed: BTreeSet<u64>,
}

impl Connection {
    fn lapse(&mut self, tag: u64) {
        self.lapsed.insert(tag);
        if self.lapsed.len() > LAPSED_TAGS_MAX {
            self.lapsed.pop_first();
        }
    }

    /// Forgets the lapsed tags in `first..=last`; whether there were any.
    fn forget_lapsed(&mut self, first: u64, last: u64) -> bool {
        let lapsed: Vec<u64> = self.lapsed.range(first..=last).copied().collect();
        for tag in &lapsed {
            self.lapsed.remove(tag);
        }
        !lapsed.is_empty()
    }
}

/// Summary of an exchange, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeInfo {
    /// Name (`""` is the default exchange).
    pub name: String,
    /// Routing kind.
    pub kind: ExchangeKind,
    /// Properties.
    pub options: ExchangeOptions,
    /// Built in (cannot be deleted).
    pub builtin: bool,
    /// Bindings whose source it is.
    pub bindings: usize,
}

/// Summary of a binding, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingInfo {
    /// Source exchange.
    pub source: String,
    /// Destination queue or exchange.
    pub target: BindTarget,
    /// Key or pattern.
    pub routing_key: String,
    /// Arguments.
    pub arguments: Headers,
}

/// The whole broker state: exchanges, queues, consumers and outstanding deliveries.
#[derive(Debug, Clone)]
pub struct Broker {
    limits: Limits,
    exchanges: HashMap<Arc<str>, Exchange, FixedState>,
    queues: HashMap<QueueId, Queue, FixedState>,
    queue_names: HashMap<Arc<str>, QueueId, FixedState>,
    connections: HashMap<ConnectionId, Connection, FixedState>,
    next_queue_id: u64,
    next_generated_name: u64,
    route_scratch: Vec<QueueId>,
    /// Queues that publishes were routed to since [`Broker::take_routed`] (distinct, at most
    /// [`ROUTED_TRACKED_MAX`]): what the server's publisher flow control looks at.
    routed: Vec<QueueId>,
    now_ms: u64,
    /// Body bytes of ready messages across all queues (for the server's memory watermark).
    ready_bytes_total: u64,
    /// The next id for a logged (persistent, durable-queue) message.
    next_durable_id: u64,
    /// Queues whose overflow mode is reject-publish: while 0, publishes skip that check.
    n_reject_publish_queues: usize,
    /// Messages that left a queue with a dead-letter exchange during the current command and
    /// are still to be republished (in order).
    dead_letters: VecDeque<DeadLetter>,
    /// Queues that received dead letters during the current command, to dispatch at its end.
    to_dispatch: Vec<QueueId>,
    /// Delays, TTLs, leases and queue expiry.
    timers: Timers,
    /// Delayed messages held by timers (all queues).
    delayed_total: u64,
}

/// Why a message was dead-lettered (the `reason` of its `x-death` record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeathReason {
    /// Nacked or rejected without requeue.
    Rejected,
    /// Dropped from the head by the queue's length limit.
    MaxLen,
    /// Would have been requeued after its queue's delivery limit.
    DeliveryLimit,
    /// Its TTL passed while it was ready.
    Expired,
}

impl DeathReason {
    fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::MaxLen => "maxlen",
            DeathReason::DeliveryLimit => "delivery_limit",
            DeathReason::Expired => "expired",
        }
    }
}

/// A message on its way from a queue to that queue's dead-letter exchange.
#[derive(Debug, Clone)]
struct DeadLetter {
    message: Arc<Message>,
    queue: Arc<str>,
    reason: DeathReason,
    exchange: Arc<str>,
    routing_key: Option<Arc<str>>,
}

impl DeadLetter {
    /// The dead letter of `entry` leaving `queue`, if the queue has a dead-letter exchange.
    fn of(queue: &Queue, entry: &Entry, reason: DeathReason) -> Option<DeadLetter> {
        Some(DeadLetter {
            message: entry.message.clone(),
            queue: queue.name.clone(),
            reason,
            exchange: queue.features.dead_letter_exchange.clone()?,
            routing_key: queue.features.dead_letter_routing_key.clone(),
        })
    }
}

/// Header of the list of death records, most recent first.
const X_DEATH: &str = "x-death";

fn is_death_of(record: &HeaderValue, queue: &str, reason: &str) -> bool {
    matches!(record, HeaderValue::Map(map)
        if map.get("queue").and_then(HeaderValue::as_str) == Some(queue)
            && map.get("reason").and_then(HeaderValue::as_str) == Some(reason))
}

/// The message as republished to the dead-letter exchange: its `x-death` list gets a record for
/// this death in front (an earlier record for the same queue and reason has its count
/// incremented and moves to the front, as RabbitMQ does), `x-first-death-*` are set on the first
/// death; exchange and routing key become the dead-letter ones.
fn dead_lettered(dead: &DeadLetter, now_ms: u64) -> Message {
    let message = &dead.message;
    let reason = dead.reason.as_str();
    let mut headers = message.headers.clone();
    let mut deaths = match headers.get(X_DEATH) {
        Some(HeaderValue::List(records)) => records.clone(),
        _ => Vec::new(),
    };
    let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
    let record = match deaths
        .iter()
        .position(|record| is_death_of(record, &dead.queue, reason))
    {
        Some(idx) => {
            let HeaderValue::Map(mut record) = deaths.remove(idx) else {
                unreachable!("is_death_of matched a map")
            };
            let count = match record.get("count") {
                Some(HeaderValue::Int(count)) => count.saturating_add(1),
                _ => 1,
            };
            record.insert("count", count);
            record.insert("time", now);
            record
        }
        None => Headers::new()
            .with("count", 1i64)
            .with("reason", reason)
            .with("queue", &*dead.queue)
            .with("time", now)
            .with("exchange", &*message.exchange)
            .with(
                "routing-keys",
                HeaderValue::List(vec![HeaderValue::from(&*message.routing_key)]),
            ),
    };
    deaths.insert(0, HeaderValue::Map(record));
    headers.insert(X_DEATH, HeaderValue::List(deaths));
    if headers.get("x-first-death-reason").is_none() {
        headers.insert("x-first-death-reason", reason);
        headers.insert("x-first-death-queue", &*dead.queue);
        headers.insert("x-first-death-exchange", &*message.exchange);
    }
    // Like RabbitMQ, the copy loses its TTL (so it does not expire again where it lands) and
    // its delay (it was already held once).
    Message {
        exchange: dead.exchange.clone(),
        routing_key: dead
            .routing_key
            .clone()
            .unwrap_or_else(|| message.routing_key.clone()),
        headers,
        expiration_ms: None,
        delay_ms: None,
        ..Message::clone(message)
    }
}

impl Default for Broker {
    fn default() -> Self {
        Broker::new(Limits::default())
    }
}

impl Broker {
    /// A broker with the built-in exchanges and no queues.
    pub fn new(limits: Limits) -> Self {
        let mut broker = Broker {
            limits,
            exchanges: HashMap::default(),
            queues: HashMap::default(),
            queue_names: HashMap::default(),
            connections: HashMap::default(),
            next_queue_id: 1,
            next_generated_name: 1,
            route_scratch: Vec::new(),
            routed: Vec::new(),
            now_ms: 0,
            ready_bytes_total: 0,
            next_durable_id: 1,
            n_reject_publish_queues: 0,
            dead_letters: VecDeque::new(),
            to_dispatch: Vec::new(),
            timers: Timers::default(),
            delayed_total: 0,
        };
        for (name, kind) in BUILTIN_EXCHANGES {
            let options = ExchangeOptions {
                durable: true,
                ..ExchangeOptions::default()
            };
            broker
                .exchanges
                .insert(name.into(), Exchange::new(name.into(), kind, options, true));
        }
        broker
    }

    /// Body bytes of ready messages in memory across all queues (paged ones are not).
    pub fn ready_bytes_total(&self) -> u64 {
        self.ready_bytes_total
    }

    /// Ready messages and their body bytes across durable queues (whose persistent messages
    /// are logged), paged ones included (O(queues)).
    pub fn durable_ready_totals(&self) -> (u64, u64) {
        let durable = self.queues.values().filter(|queue| queue.is_durable());
        durable.fold((0, 0), |(count, bytes), queue| {
            (
                count + queue.ready_total(),
                bytes + queue.ready.bytes() + queue.paged.bytes,
            )
        })
    }

    /// Messages and body bytes paged out of memory across all queues (O(queues)).
    pub fn paged_totals(&self) -> (u64, u64) {
        self.queues.values().fold((0, 0), |(count, bytes), queue| {
            (count + queue.paged.count, bytes + queue.paged.bytes)
        })
    }

    /// The logical time of the last command applied.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Applies one command at logical time `now_ms`. On success the effects to carry out are
    /// appended to `effects`; on error the state is unchanged and nothing is appended.
    pub fn apply(
        &mut self,
        now_ms: u64,
        command: Command,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        self.now_ms = self.now_ms.max(now_ms);
        let reply = self.apply_command(command, effects);
        if reply.is_ok() && !self.dead_letters.is_empty() {
            // Messages found expired while dispatching at the end of the command.
            self.finish_dead_letters_and_dispatch(effects);
        }
        // Debug builds check every invariant after every command while the state is small
        // (at most a few thousand queues, messages, deliveries, timers and bindings in all:
        // see `invariants::DEBUG_CHECK_ITEMS_MAX`), where the O(state) check costs little. A
        // panic here is a bug in the core, never a user mistake.
        #[cfg(debug_assertions)]
        if self.small_enough_to_check()
            && let Err(violation) = self.check_invariants()
        {
            panic!("wharf-core broke an invariant of its state: {violation}");
        }
        reply
    }

    /// The earliest time at which [`Command::Tick`] has something to do (unix ms), if any. May
    /// be earlier than needed (a timer that turns out stale), never later.
    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.next_due()
    }

    /// Delayed messages waiting in every queue: O(1).
    pub fn delayed_total(&self) -> u64 {
        self.delayed_total
    }

    fn apply_command(
        &mut self,
        command: Command,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        match command {
            Command::OpenConnection { connection } => {
                self.connections.entry(connection).or_default();
                Ok(Reply::Done)
            }
            Command::CloseConnection { connection } => self.close_connection(connection, effects),
            Command::DeclareExchange {
                name,
                kind,
                options,
                passive,
            } => self.declare_exchange(name, kind, options, passive),
            Command::DeleteExchange { name, if_unused } => {
                self.delete_exchange(&name, if_unused, effects)
            }
            Command::DeclareQueue {
                connection,
                name,
                options,
                passive,
            } => self.declare_queue(connection, name, options, passive),
            Command::DeleteQueue {
                connection,
                name,
                if_unused,
                if_empty,
            } => self.delete_queue_cmd(connection, &name, if_unused, if_empty, effects),
            Command::PurgeQueue { connection, name } => {
                let qid = self.queue_for(connection, &name)?;
                let queue = self
                    .queues
                    .get_mut(&qid)
                    .expect("queue ids in the name map exist");
                self.ready_bytes_total -= queue.ready.bytes();
                for entry in queue.ready.iter() {
                    if let Some(durable_id) = entry.durable_id {
                        effects.push(Effect::DurableSettled {
                            durable_id,
                            queue: queue.name.clone(),
                        });
                    }
                }
                let messages = queue.ready.clear() as u64 + discard_paged(queue, effects);
                Ok(Reply::Purged { messages })
            }
            Command::Bind {
                source,
                target,
                routing_key,
                arguments,
            } => self.bind(&source, target, routing_key, arguments, effects),
            Command::Unbind {
                source,
                target,
                routing_key,
                arguments,
            } => self.unbind(&source, target, routing_key, arguments, effects),
            Command::Publish { message } => self.publish(message, effects),
            Command::Subscribe {
                connection,
                queue,
                consumer_tag,
                options,
            } => self.subscribe(connection, &queue, consumer_tag, options, effects),
            Command::Cancel {
                connection,
                consumer_tag,
            } => self.cancel(connection, consumer_tag, effects),
            Command::Credit {
                connection,
                consumer_tag,
                credit,
            } => self.credit(connection, consumer_tag, credit, effects),
            Command::Ack {
                connection,
                delivery_tag,
                multiple,
            } => self.settle(connection, delivery_tag, multiple, Settle::Ack, effects),
            Command::Nack {
                connection,
                delivery_tag,
                multiple,
                requeue,
            } => {
                let how = if requeue {
                    Settle::Requeue
                } else {
                    Settle::Drop
                };
                self.settle(connection, delivery_tag, multiple, how, effects)
            }
            Command::AckRange {
                connection,
                first,
                last,
            } => self.ack_range(connection, first, last, effects),
            Command::Restore {
                queue,
                durable_id,
                message,
                ready_at_ms,
            } => self.restore(&queue, durable_id, message, ready_at_ms, effects),
            Command::RestoreDedup {
                queue,
                message_id,
                until_ms,
            } => {
                let qid = *self
                    .queue_names
                    .get(queue.as_str())
                    .ok_or_else(|| CoreError::not_found(EntityKind::Queue, &queue))?;
                let now_ms = self.now_ms;
                let queue = self.queues.get_mut(&qid).expect("names map to live queues");
                queue.dedup.insert(&message_id, until_ms, now_ms);
                Ok(Reply::Done)
            }
            Command::Tick => Ok(self.tick(effects)),
            Command::PageIn {
                queue,
                epoch,
                entries,
            } => Ok(self.page_in(&queue, epoch, entries, effects)),
            Command::Defer {
                connection,
                delivery_tag,
                delay_ms,
            } => {
                if delay_ms > DURATION_MS_MAX {
                    return Err(CoreError::InvalidArgument {
                        reason: format!("a delay must be at most {DURATION_MS_MAX} ms"),
                    });
                }
                let due = self.now_ms.saturating_add(delay_ms);
                self.settle(connection, delivery_tag, false, Settle::Defer(due), effects)
            }
            Command::Touch {
                connection,
                delivery_tag,
            } => self.touch(connection, delivery_tag),
            Command::Redrive {
                connection,
                queue,
                max,
            } => self.redrive(connection, &queue, max, effects),
            Command::Reject {
                connection,
                delivery_tag,
                requeue,
            } => {
                let how = if requeue {
                    Settle::Requeue
                } else {
                    Settle::Drop
                };
                self.settle(connection, delivery_tag, false, how, effects)
            }
        }
    }

    // ----- queries -----

    /// Moves the queues that publishes were routed to since the last call into `into`
    /// (cleared first; distinct, the first [`ROUTED_TRACKED_MAX`] of them). Observation only:
    /// no state the commands depend on.
    pub fn take_routed(&mut self, into: &mut Vec<QueueId>) {
        into.clear();
        std::mem::swap(&mut self.routed, into);
    }

    /// What publisher flow control needs to know of a queue, as seen by the publishing
    /// `connection`, or `None` if the queue is gone.
    pub fn queue_flow(&self, qid: QueueId, connection: ConnectionId) -> Option<QueueFlow> {
        let queue = self.queues.get(&qid)?;
        Some(QueueFlow {
            ready: queue.ready_total(),
            ready_bytes: queue.ready.bytes() + queue.paged.bytes,
            consumers: queue.consumers.len() as u32,
            own_consumers: queue
                .consumers
                .iter()
                .filter(|consumer| consumer.connection == connection)
                .count() as u32,
            delivered: queue.stats.delivered,
        })
    }

    /// Statistics of one queue.
    pub fn queue_stats(&self, name: &str) -> Result<QueueStats, CoreError> {
        let qid = self
            .queue_names
            .get(name)
            .ok_or_else(|| CoreError::not_found(EntityKind::Queue, name))?;
        Ok(self.queues[qid].stats())
    }

    /// Statistics of every queue, sorted by name.
    pub fn list_queues(&self) -> Vec<QueueStats> {
        let mut all: Vec<QueueStats> = self.queues.values().map(Queue::stats).collect();
        all.sort_by(|left, right| left.name.cmp(&right.name));
        all
    }

    /// Every exchange, sorted by name.
    pub fn list_exchanges(&self) -> Vec<ExchangeInfo> {
        let mut all: Vec<ExchangeInfo> = self.exchanges.values().map(exchange_info).collect();
        all.sort_by(|left, right| left.name.cmp(&right.name));
        all
    }

    /// Every binding, sorted by source, then destination.
    pub fn list_bindings(&self) -> Vec<BindingInfo> {
        let mut names: Vec<&Arc<str>> = self.exchanges.keys().collect();
        names.sort();
        let mut all = Vec::new();
        for name in names {
            for key in self.exchanges[name].bindings() {
                let target = match &key.destination {
                    Destination::Queue(qid) => BindTarget::Queue(self.queues[qid].name.to_string()),
                    Destination::Exchange(exchange) => BindTarget::Exchange(exchange.to_string()),
                };
                all.push(BindingInfo {
                    source: name.to_string(),
                    target,
                    routing_key: key.routing_key.to_string(),
                    arguments: key.arguments,
                });
            }
        }
        all
    }

    /// One exchange's summary.
    pub fn exchange_info(&self, name: &str) -> Option<ExchangeInfo> {
        self.exchanges.get(name).map(exchange_info)
    }

    /// Options of a queue (for persisting durable topology).
    pub fn queue_options(&self, name: &str) -> Option<&QueueOptions> {
        self.queue_names
            .get(name)
            .map(|qid| &self.queues[qid].options)
    }

    /// Deliveries outstanding (unacked) on a connection.
    pub fn unacked_count(&self, connection: ConnectionId) -> usize {
        self.connections
            .get(&connection)
            .map_or(0, |conn| conn.unacked.len())
    }

    // ----- connections -----

    fn connection(&self, connection: ConnectionId) -> Result<&Connection, CoreError> {
        self.connections
            .get(&connection)
            .ok_or_else(|| CoreError::not_found(EntityKind::Connection, connection.0.to_string()))
    }

    fn close_connection(
        &mut self,
        connection: ConnectionId,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        self.connection(connection)?;
        let mut conn = self.connections.remove(&connection).expect("checked above");
        let mut touched: Vec<QueueId> = Vec::new();
        let mut lost_consumers: Vec<QueueId> = Vec::new();
        for (tag, qid) in &conn.consumers {
            if let Some(queue) = self.queues.get_mut(qid) {
                if let Some(idx) = queue.consumer_idx(connection, *tag) {
                    queue.consumers.remove(idx);
                    queue.cursor = 0;
                }
                if !touched.contains(qid) {
                    touched.push(*qid);
                    lost_consumers.push(*qid);
                }
            }
        }
        for (_, unacked) in conn.unacked.drain() {
            if let Some(queue) = self.queues.get_mut(&unacked.queue) {
                queue.unacked -= 1;
                self.ready_bytes_total += requeue_entry(
                    queue,
                    unacked.queue,
                    &mut self.timers,
                    unacked.entry,
                    None,
                    &mut self.dead_letters,
                    effects,
                );
                if !touched.contains(&unacked.queue) {
                    touched.push(unacked.queue);
                }
            }
        }
        // Messages over their delivery limit were dead-lettered: republish them first (into
        // this connection's exclusive queues too, which are then deleted with them).
        self.republish_dead_letters(effects);
        for qid in conn.exclusive_queues {
            if self.queues.contains_key(&qid) {
                self.remove_queue(qid, effects);
            }
        }
        for qid in touched {
            let Some(queue) = self.queues.get_mut(&qid) else {
                continue;
            };
            if queue.consumers.is_empty() {
                queue.last_used_ms = self.now_ms;
            }
            if queue.options.auto_delete
                && queue.consumers.is_empty()
                && lost_consumers.contains(&qid)
            {
                self.remove_queue(qid, effects);
            } else {
                self.dispatch(qid, effects);
            }
        }
        self.dispatch_touched(effects);
        Ok(Reply::Done)
    }

    // ----- exchanges -----

    fn declare_exchange(
        &mut self,
        name: String,
        kind: ExchangeKind,
        options: ExchangeOptions,
        passive: bool,
    ) -> Result<Reply, CoreError> {
        if name != DEFAULT_EXCHANGE {
            validate_name(&name)?;
        }
        if let Some(existing) = self.exchanges.get(name.as_str()) {
            if passive {
                return Ok(Reply::Done);
            }
            if existing.kind != kind || existing.options != options {
                if existing.builtin {
                    return Err(CoreError::AccessRefused {
                        reason: format!("exchange '{name}' is built in"),
                    });
                }
                return Err(CoreError::precondition(
                    EntityKind::Exchange,
                    &name,
                    format!(
                        "declared as {} {:?}, redeclared as {} {:?}",
                        existing.kind, existing.options, kind, options
                    ),
                ));
            }
            return Ok(Reply::Done);
        }
        if passive {
            return Err(CoreError::not_found(EntityKind::Exchange, name));
        }
        if name == DEFAULT_EXCHANGE || name.starts_with(RESERVED_PREFIX) {
            validate_user_name(&name)?;
        }
        if self.exchanges.len() >= self.limits.exchanges_max {
            return Err(CoreError::LimitExceeded {
                what: "exchanges",
                limit: self.limits.exchanges_max,
            });
        }
        check_header_depth(&options.arguments)?;
        let name: Arc<str> = name.into();
        self.exchanges
            .insert(name.clone(), Exchange::new(name, kind, options, false));
        Ok(Reply::Done)
    }

    fn delete_exchange(
        &mut self,
        name: &str,
        if_unused: bool,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let exchange = self
            .exchanges
            .get(name)
            .ok_or_else(|| CoreError::not_found(EntityKind::Exchange, name))?;
        if exchange.builtin {
            return Err(CoreError::AccessRefused {
                reason: format!("exchange '{name}' is built in and cannot be deleted"),
            });
        }
        if if_unused && exchange.n_bindings() > 0 {
            return Err(CoreError::precondition(
                EntityKind::Exchange,
                name,
                format!("it has {} bindings", exchange.n_bindings()),
            ));
        }
        let name = exchange.name.clone();
        self.remove_exchange(&name, effects);
        Ok(Reply::Done)
    }

    /// Removes an exchange, every binding from it and every binding to it (which may
    /// auto-delete further exchanges).
    fn remove_exchange(&mut self, name: &Arc<str>, effects: &mut Vec<Effect>) {
        let Some(exchange) = self.exchanges.remove(name) else {
            return;
        };
        for key in exchange.bindings() {
            if let Destination::Queue(qid) = key.destination
                && let Some(queue) = self.queues.get_mut(&qid)
                && let Some(pos) =
                    queue
                        .bound_from
                        .iter()
                        .position(|(source, routing_key, args)| {
                            source == name
                                && *routing_key == key.routing_key
                                && *args == key.arguments
                        })
            {
                queue.bound_from.swap_remove(pos);
            }
        }
        effects.push(Effect::ExchangeDeleted {
            name: name.clone(),
            durable: exchange.options.durable,
        });
        let destination = Destination::Exchange(name.clone());
        let mut sources: Vec<Arc<str>> = self
            .exchanges
            .values()
            .filter(|source| {
                source
                    .bindings()
                    .iter()
                    .any(|key| key.destination == destination)
            })
            .map(|source| source.name.clone())
            .collect();
        sources.sort();
        for source in sources {
            let keys: Vec<BindingKey> = self.exchanges[&source]
                .bindings()
                .into_iter()
                .filter(|key| key.destination == destination)
                .collect();
            for key in keys {
                self.remove_binding(&source, &key, effects);
            }
        }
    }

    /// Removes one binding; an auto-delete source left without bindings is deleted.
    fn remove_binding(
        &mut self,
        source: &Arc<str>,
        key: &BindingKey,
        effects: &mut Vec<Effect>,
    ) -> bool {
        let Some(exchange) = self.exchanges.get_mut(source) else {
            return false;
        };
        if !exchange.remove_binding(key) {
            return false;
        }
        let now_unused =
            exchange.options.auto_delete && exchange.n_bindings() == 0 && !exchange.builtin;
        if let Destination::Queue(qid) = &key.destination
            && let Some(queue) = self.queues.get_mut(qid)
            && let Some(pos) = queue
                .bound_from
                .iter()
                .position(|(from, routing_key, args)| {
                    from == source && *routing_key == key.routing_key && *args == key.arguments
                })
        {
            queue.bound_from.swap_remove(pos);
        }
        if now_unused {
            let source = source.clone();
            self.remove_exchange(&source, effects);
        }
        true
    }

    fn resolve_target(&self, target: &BindTarget) -> Result<Destination, CoreError> {
        match target {
            BindTarget::Queue(name) => self
                .queue_names
                .get(name.as_str())
                .map(|qid| Destination::Queue(*qid))
                .ok_or_else(|| CoreError::not_found(EntityKind::Queue, name.clone())),
            BindTarget::Exchange(name) => self
                .exchanges
                .get_key_value(name.as_str())
                .map(|(key, _)| Destination::Exchange(key.clone()))
                .ok_or_else(|| CoreError::not_found(EntityKind::Exchange, name.clone())),
        }
    }

    fn binding_source(&self, source: &str) -> Result<Arc<str>, CoreError> {
        if source == DEFAULT_EXCHANGE {
            return Err(CoreError::AccessRefused {
                reason: "the default exchange binds every queue by name implicitly; it takes no explicit bindings".to_owned(),
            });
        }
        self.exchanges
            .get_key_value(source)
            .map(|(key, _)| key.clone())
            .ok_or_else(|| CoreError::not_found(EntityKind::Exchange, source))
    }

    fn bind(
        &mut self,
        source: &str,
        target: BindTarget,
        routing_key: String,
        arguments: Headers,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let _ = effects;
        validate_routing_key(&routing_key)?;
        check_header_depth(&arguments)?;
        let source = self.binding_source(source)?;
        let destination = self.resolve_target(&target)?;
        if let Destination::Exchange(dest) = &destination
            && *dest == DEFAULT_EXCHANGE.into()
        {
            return Err(CoreError::AccessRefused {
                reason: "the default exchange cannot be a binding destination".to_owned(),
            });
        }
        let exchange = &self.exchanges[&source];
        if exchange.kind == ExchangeKind::Headers {
            HeadersMatch::parse(&arguments)?;
        }
        let key = BindingKey {
            destination: destination.clone(),
            routing_key: routing_key.into(),
            arguments,
        };
        if exchange.has_binding(&key) {
            return Ok(Reply::Done);
        }
        if exchange.n_bindings() >= self.limits.bindings_per_exchange_max {
            return Err(CoreError::LimitExceeded {
                what: "bindings per exchange",
                limit: self.limits.bindings_per_exchange_max,
            });
        }
        if let Destination::Queue(qid) = &destination {
            let queue = self.queues.get_mut(qid).expect("resolved above");
            queue.bound_from.push((
                source.clone(),
                key.routing_key.clone(),
                key.arguments.clone(),
            ));
        }
        self.exchanges
            .get_mut(&source)
            .expect("resolved above")
            .add_binding(key)?;
        Ok(Reply::Done)
    }

    fn unbind(
        &mut self,
        source: &str,
        target: BindTarget,
        routing_key: String,
        arguments: Headers,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let source = self.binding_source(source)?;
        let destination = self.resolve_target(&target)?;
        let key = BindingKey {
            destination,
            routing_key: routing_key.into(),
            arguments,
        };
        if !self.exchanges[&source].has_binding(&key) {
            return Err(CoreError::not_found(
                EntityKind::Exchange,
                format!("binding {source} -> {target:?} '{}'", key.routing_key),
            ));
        }
        self.remove_binding(&source, &key, effects);
        Ok(Reply::Done)
    }

    // ----- queues -----

    fn declare_queue(
        &mut self,
        connection: ConnectionId,
        name: String,
        options: QueueOptions,
        passive: bool,
    ) -> Result<Reply, CoreError> {
        self.connection(connection)?;
        if passive {
            let qid = self.queue_for(connection, &name)?;
            return Ok(self.declared(qid));
        }
        let generated = name.is_empty();
        if !generated {
            validate_user_name(&name)?;
        }
        check_header_depth(&options.arguments)?;
        let features = QueueFeatures::try_from(&options.arguments)?;
        if let Some(&qid) = self.queue_names.get(name.as_str()) {
            let queue = &self.queues[&qid];
            check_exclusive_access(queue, connection)?;
            if queue.options != options {
                return Err(CoreError::precondition(
                    EntityKind::Queue,
                    &name,
                    format!(
                        "declared with {:?}, redeclared with {:?}",
                        queue.options, options
                    ),
                ));
            }
            return Ok(self.declared(qid));
        }
        if self.queues.len() >= self.limits.queues_max {
            return Err(CoreError::LimitExceeded {
                what: "queues",
                limit: self.limits.queues_max,
            });
        }
        let name: Arc<str> = if generated {
            loop {
                let candidate = format!("wharf.gen-{}", self.next_generated_name);
                self.next_generated_name += 1;
                if !self.queue_names.contains_key(candidate.as_str()) {
                    break candidate.into();
                }
            }
        } else {
            name.into()
        };
        let qid = QueueId(self.next_queue_id);
        self.next_queue_id += 1;
        let owner = options.exclusive.then_some(connection);
        if owner.is_some() {
            self.connections
                .get_mut(&connection)
                .expect("checked")
                .exclusive_queues
                .push(qid);
        }
        if features.overflow.rejects() {
            self.n_reject_publish_queues += 1;
        }
        if let Some(expires) = features.expires {
            self.timers.push(
                self.now_ms.saturating_add(expires),
                TimerKind::QueueExpiry { queue: qid },
            );
        }
        let pageable = self.limits.paging_threshold > 0
            && options.durable
            && !options.exclusive
            && features.max_priority.is_none()
            && features.max_length.is_none()
            && features.max_length_bytes.is_none();
        let mut queue = Queue::new(name.clone(), options, features, owner);
        queue.last_used_ms = self.now_ms;
        if pageable {
            queue.paged.threshold = Some(self.limits.paging_threshold);
            queue.paged.threshold_bytes = match self.limits.paging_threshold_bytes {
                0 => u64::MAX,
                bytes => bytes,
            };
        }
        self.queues.insert(qid, queue);
        self.queue_names.insert(name.clone(), qid);
        Ok(Reply::QueueDeclared {
            name,
            ready: 0,
            consumers: 0,
        })
    }

    /// The reply to a declare of an existing queue, which counts as a use (`x-expires`).
    fn declared(&mut self, qid: QueueId) -> Reply {
        let queue = self.queues.get_mut(&qid).expect("caller found it");
        queue.last_used_ms = self.now_ms;
        Reply::QueueDeclared {
            name: queue.name.clone(),
            ready: queue.ready_total(),
            consumers: queue.consumers.len() as u32,
        }
    }

    /// Looks a queue up for `connection`, refusing exclusive queues of other connections.
    fn queue_for(&self, connection: ConnectionId, name: &str) -> Result<QueueId, CoreError> {
        let qid = *self
            .queue_names
            .get(name)
            .ok_or_else(|| CoreError::not_found(EntityKind::Queue, name))?;
        check_exclusive_access(&self.queues[&qid], connection)?;
        Ok(qid)
    }

    fn delete_queue_cmd(
        &mut self,
        connection: ConnectionId,
        name: &str,
        if_unused: bool,
        if_empty: bool,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let qid = self.queue_for(connection, name)?;
        let queue = &self.queues[&qid];
        if if_unused && !queue.consumers.is_empty() {
            return Err(CoreError::precondition(
                EntityKind::Queue,
                name,
                format!("it has {} consumers", queue.consumers.len()),
            ));
        }
        if if_empty && queue.ready_total() > 0 {
            return Err(CoreError::precondition(
                EntityKind::Queue,
                name,
                format!("it has {} ready messages", queue.ready_total()),
            ));
        }
        let messages = self.remove_queue(qid, effects);
        Ok(Reply::QueueDeleted { messages })
    }

    /// Deletes a queue: bindings removed, consumers cancelled (told so), ready messages
    /// dropped. Deliveries outstanding from it stay with their connections; settling them
    /// later is accepted and does nothing. Returns the ready messages dropped.
    fn remove_queue(&mut self, qid: QueueId, effects: &mut Vec<Effect>) -> u64 {
        let mut queue = self
            .queues
            .remove(&qid)
            .expect("caller checked the queue exists");
        // Its logged messages go with the queue's `QueueDeleted`: no settlement per message.
        let paged = queue.paged.count;
        if paged > 0 {
            effects.push(Effect::PagesDropped {
                queue: queue.name.clone(),
                epoch: queue.paged.epoch,
            });
            queue.paged.discard();
        }
        if queue.features.overflow.rejects() {
            self.n_reject_publish_queues -= 1;
        }
        self.queue_names.remove(&queue.name);
        self.ready_bytes_total -= queue.ready.bytes();
        if queue.stats.delayed > 0 {
            // Its delayed messages go with it (rare: a scan of the timers).
            self.delayed_total -= self.timers.remove_delayed_of(qid);
        }
        if let Some(owner) = queue.owner
            && let Some(conn) = self.connections.get_mut(&owner)
        {
            conn.exclusive_queues.retain(|id| *id != qid);
        }
        for consumer in &queue.consumers {
            if let Some(conn) = self.connections.get_mut(&consumer.connection) {
                conn.consumers.remove(&consumer.tag);
            }
            effects.push(Effect::ConsumerCancelled {
                connection: consumer.connection,
                consumer_tag: consumer.tag,
                reason: CancelReason::QueueDeleted,
            });
        }
        let mut bound_from = queue.bound_from.clone();
        bound_from.sort_by(|left, right| (&left.0, &left.1).cmp(&(&right.0, &right.1)));
        for (source, routing_key, arguments) in bound_from {
            let key = BindingKey {
                destination: Destination::Queue(qid),
                routing_key,
                arguments,
            };
            self.remove_binding(&source, &key, effects);
        }
        effects.push(Effect::QueueDeleted {
            name: queue.name.clone(),
            durable: queue.is_durable(),
        });
        queue.ready.len() as u64 + paged
    }

    // ----- publishing -----

    fn publish(
        &mut self,
        message: Arc<Message>,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        validate_routing_key(&message.routing_key)?;
        check_header_depth(&message.headers)?;
        let mut targets = std::mem::take(&mut self.route_scratch);
        targets.clear();
        let routed = self.route(&message, &mut targets, false);
        if let Err(err) = routed {
            self.route_scratch = targets;
            return Err(err);
        }
        // Queues that reject-publish when full refuse their copy before anything changes.
        let mut refused_dlx = Vec::new();
        let refused_by = self.refuse_full(message.size_bytes(), &mut targets, &mut refused_dlx);
        if targets.is_empty()
            && refused_dlx.is_empty()
            && let Some(queue) = refused_by
        {
            self.route_scratch = targets;
            return Err(CoreError::QueueFull {
                queue: queue.to_string(),
            });
        }
        for qid in &refused_dlx {
            // reject-publish-dlx: refused to the publisher, and dead-lettered.
            let queue = self
                .queues
                .get_mut(qid)
                .expect("routing yields live queues");
            queue.stats.dropped += 1;
            let entry = queue.new_entry(message.clone(), None, false);
            self.dead_letters
                .extend(DeadLetter::of(queue, &entry, DeathReason::MaxLen));
        }
        let duplicates = self.drop_duplicates(&message, &mut targets);
        self.enqueue_routed(&message, &targets, effects);
        let routed = targets.len() as u32;
        // A batch usually publishes to the same queues again and again (route order is
        // deterministic): then the list already starts with them, and nothing is searched.
        if !self.routed.starts_with(&targets) {
            for qid in &targets {
                if self.routed.len() < ROUTED_TRACKED_MAX && !self.routed.contains(qid) {
                    self.routed.push(*qid);
                }
            }
        }
        self.to_dispatch.extend_from_slice(&targets);
        self.route_scratch = targets;
        self.finish_dead_letters_and_dispatch(effects);
        Ok(Reply::Published {
            routed,
            refused_by,
            duplicates,
        })
    }

    /// Removes the targets whose dedup window holds the message's id (counting them); the
    /// other targets with a window remember it from now on.
    fn drop_duplicates(&mut self, message: &Message, targets: &mut Vec<QueueId>) -> u32 {
        let Some(id) = message.message_id.as_deref() else {
            return 0;
        };
        let now_ms = self.now_ms;
        let queues = &mut self.queues;
        let mut duplicates = 0;
        targets.retain(|qid| {
            let queue = queues.get_mut(qid).expect("routing yields live queues");
            let Some(window) = queue.features.dedup_window else {
                return true;
            };
            if queue.dedup.contains(id, now_ms) {
                queue.stats.duplicates += 1;
                duplicates += 1;
                return false;
            }
            queue
                .dedup
                .insert(id, now_ms.saturating_add(window), now_ms);
            true
        });
        duplicates
    }

    /// Removes the targets that are full and refuse publishes; returns the first of them.
    /// Those with `reject-publish-dlx` are also listed in `refused_dlx`.
    fn refuse_full(
        &self,
        size: u64,
        targets: &mut Vec<QueueId>,
        refused_dlx: &mut Vec<QueueId>,
    ) -> Option<Arc<str>> {
        if self.n_reject_publish_queues == 0 {
            // The common case: no queue refuses publishes, nothing to look up.
            return None;
        }
        let mut refused_by: Option<Arc<str>> = None;
        targets.retain(|qid| {
            let queue = &self.queues[qid];
            let fits = !queue.features.overflow.rejects()
                || !queue
                    .features
                    .over_limit(queue.ready.len() as u64 + 1, queue.ready.bytes() + size);
            if !fits && refused_by.is_none() {
                refused_by = Some(queue.name.clone());
            }
            if !fits && queue.features.overflow == Overflow::RejectPublishDlx {
                refused_dlx.push(*qid);
            }
            fits
        });
        refused_by
    }

    /// Enqueues a routed message in every target (logging it if persistent and a target is
    /// durable) and applies drop-head limits. Does not dispatch.
    fn enqueue_routed(
        &mut self,
        message: &Arc<Message>,
        targets: &[QueueId],
        effects: &mut Vec<Effect>,
    ) {
        let now_ms = self.now_ms;
        let delay = message.delay_ms.filter(|delay| *delay > 0);
        let ready_at_ms = now_ms.saturating_add(delay.unwrap_or(0));
        let durable_id =
            if message.persistent && targets.iter().any(|qid| self.queues[qid].is_durable()) {
                let durable_id = self.next_durable_id;
                self.next_durable_id += 1;
                let mut sync = DurableSync::default();
                let queues = targets
                    .iter()
                    .map(|qid| &self.queues[qid])
                    .filter(|queue| queue.is_durable())
                    .map(|queue| {
                        sync.add(queue.features.sync);
                        queue.name.clone()
                    })
                    .collect();
                effects.push(Effect::DurableEnqueued {
                    durable_id,
                    queues,
                    message: message.clone(),
                    ready_at_ms,
                    sync,
                });
                Some(durable_id)
            } else {
                None
            };
        for qid in targets {
            let queue = self
                .queues
                .get_mut(qid)
                .expect("routing yields live queues");
            let entry_id = durable_id.filter(|_| queue.is_durable());
            queue.stats.published += 1;
            let entry = queue.new_entry(message.clone(), entry_id, false);
            if delay.is_some() {
                hold(queue, *qid, &mut self.timers, entry, ready_at_ms);
                self.delayed_total += 1;
                continue;
            }
            self.ready_bytes_total +=
                make_ready(queue, *qid, &mut self.timers, entry, now_ms, effects);
            self.ready_bytes_total -= drop_head_over_limit(queue, &mut self.dead_letters, effects);
        }
    }

    /// Republishes the pending dead letters (which may drop and dead-letter further messages
    /// from full queues), then dispatches every queue the command touched. Every command that
    /// may dead-letter ends with this, so that all enqueues and drops of a command happen
    /// before any of its deliveries.
    fn finish_dead_letters_and_dispatch(&mut self, effects: &mut Vec<Effect>) {
        loop {
            self.republish_dead_letters(effects);
            self.dispatch_touched(effects);
            // Dispatching may find expired messages, which dead-letter in turn; this ends
            // because each round only moves messages that expired, and the cycle guard drops
            // a message that expires twice in the same queue.
            if self.dead_letters.is_empty() {
                break;
            }
        }
    }

    /// Republishes the pending dead letters, in order (see
    /// [`Broker::finish_dead_letters_and_dispatch`]).
    fn republish_dead_letters(&mut self, effects: &mut Vec<Effect>) {
        let mut n_dead_letters = 0;
        while let Some(dead) = self.dead_letters.pop_front() {
            n_dead_letters += 1;
            if n_dead_letters > DEAD_LETTERS_PER_COMMAND_MAX {
                continue;
            }
            self.republish_dead_letter(&dead, effects);
        }
    }

    /// Dispatches the queues the command touched (see
    /// [`Broker::finish_dead_letters_and_dispatch`]).
    fn dispatch_touched(&mut self, effects: &mut Vec<Effect>) {
        let mut to_dispatch = std::mem::take(&mut self.to_dispatch);
        for qid in to_dispatch.drain(..) {
            // A queue deleted earlier in the command is skipped by `dispatch` itself.
            self.dispatch(qid, effects);
        }
        self.to_dispatch = to_dispatch;
    }

    /// Republishes one dead letter to its dead-letter exchange. It is dropped instead when the
    /// exchange does not exist, when no queue takes it, and — the cycle guard — when it already
    /// died in the same queue for the same reason, unless that reason is `rejected` (a consumer
    /// decision, not an automatic loop), as RabbitMQ does.
    fn republish_dead_letter(&mut self, dead: &DeadLetter, effects: &mut Vec<Effect>) {
        if dead.reason != DeathReason::Rejected
            && let Some(HeaderValue::List(records)) = dead.message.headers.get(X_DEATH)
            && records
                .iter()
                .any(|record| is_death_of(record, &dead.queue, dead.reason.as_str()))
        {
            return;
        }
        let message = Arc::new(dead_lettered(dead, self.now_ms));
        let mut targets = Vec::new();
        if self.route(&message, &mut targets, true).is_err() {
            return;
        }
        // A dead letter refused by a full queue is dropped (even with reject-publish-dlx: no
        // dead-lettering a dead letter in a loop).
        self.refuse_full(message.size_bytes(), &mut targets, &mut Vec::new());
        self.enqueue_routed(&message, &targets, effects);
        self.to_dispatch.extend_from_slice(&targets);
    }

    /// Collects the queues a message reaches, each once, in a deterministic order.
    ///
    /// Dead letters (`dead_letter`) may go to internal exchanges.
    fn route(
        &mut self,
        message: &Message,
        targets: &mut Vec<QueueId>,
        dead_letter: bool,
    ) -> Result<(), CoreError> {
        let exchange_name: &str = &message.exchange;
        if exchange_name == DEFAULT_EXCHANGE {
            if let Some(qid) = self.queue_names.get(&*message.routing_key) {
                targets.push(*qid);
            }
            return Ok(());
        }
        let exchange = self
            .exchanges
            .get_mut(exchange_name)
            .ok_or_else(|| CoreError::not_found(EntityKind::Exchange, exchange_name))?;
        if exchange.options.internal && !dead_letter {
            return Err(CoreError::AccessRefused {
                reason: format!("exchange '{exchange_name}' is internal"),
            });
        }
        let mut pending: Vec<Arc<str>> = Vec::new();
        let mut visited: Vec<Arc<str>> = vec![exchange.name.clone()];
        exchange.route(message, |dest| match dest {
            Destination::Queue(qid) => targets.push(*qid),
            Destination::Exchange(name) => pending.push(name.clone()),
        });
        let mut hops = 0;
        while let Some(next) = pending.pop() {
            if visited.contains(&next) {
                continue;
            }
            hops += 1;
            if hops > EXCHANGE_HOPS_MAX {
                break;
            }
            visited.push(next.clone());
            if let Some(exchange) = self.exchanges.get_mut(&next) {
                exchange.route(message, |dest| match dest {
                    Destination::Queue(qid) => targets.push(*qid),
                    Destination::Exchange(name) => pending.push(name.clone()),
                });
            }
        }
        if targets.len() > 1 {
            targets.sort_unstable();
            targets.dedup();
        }
        Ok(())
    }

    // ----- consuming -----

    fn subscribe(
        &mut self,
        connection: ConnectionId,
        queue_name: &str,
        tag: ConsumerTag,
        options: ConsumerOptions,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let conn = self.connection(connection)?;
        if conn.consumers.contains_key(&tag) {
            return Err(CoreError::ConsumerTagInUse { tag: tag.0 });
        }
        if options
            .ack_timeout_ms
            .is_some_and(|timeout| !(1..=DURATION_MS_MAX).contains(&timeout))
        {
            // A zero timeout would lapse every lease as soon as it is granted.
            return Err(CoreError::InvalidArgument {
                reason: format!("an ack timeout must be from 1 to {DURATION_MS_MAX} ms"),
            });
        }
        let qid = self.queue_for(connection, queue_name)?;
        let queue = &self.queues[&qid];
        if options.exclusive && !queue.consumers.is_empty() {
            return Err(CoreError::ResourceLocked {
                name: queue_name.to_owned(),
                reason: "it already has consumers, so it cannot get an exclusive one",
            });
        }
        if queue
            .consumers
            .iter()
            .any(|consumer| consumer.options.exclusive)
        {
            return Err(CoreError::ResourceLocked {
                name: queue_name.to_owned(),
                reason: "it has an exclusive consumer",
            });
        }
        if queue.consumers.len() >= self.limits.consumers_per_queue_max {
            return Err(CoreError::LimitExceeded {
                what: "consumers per queue",
                limit: self.limits.consumers_per_queue_max,
            });
        }
        self.connections
            .get_mut(&connection)
            .expect("checked")
            .consumers
            .insert(tag, qid);
        let queue = self.queues.get_mut(&qid).expect("checked");
        queue.last_used_ms = self.now_ms;
        queue.consumers.push(Consumer {
            connection,
            tag,
            credit: options.prefetch,
            options,
            unacked: 0,
        });
        self.dispatch(qid, effects);
        Ok(Reply::Done)
    }

    fn consumer_queue(
        &self,
        connection: ConnectionId,
        tag: ConsumerTag,
    ) -> Result<QueueId, CoreError> {
        self.connection(connection)?
            .consumers
            .get(&tag)
            .copied()
            .ok_or_else(|| CoreError::not_found(EntityKind::Consumer, tag.0.to_string()))
    }

    fn cancel(
        &mut self,
        connection: ConnectionId,
        tag: ConsumerTag,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let qid = self.consumer_queue(connection, tag)?;
        let conn = self.connections.get_mut(&connection).expect("checked");
        conn.consumers.remove(&tag);
        let returned = conn
            .unacked
            .remove_where(|unacked| unacked.consumer_tag == tag && unacked.queue == qid);
        let queue = self
            .queues
            .get_mut(&qid)
            .expect("consumers point at live queues");
        for (_, unacked) in returned {
            queue.unacked -= 1;
            self.ready_bytes_total += requeue_entry(
                queue,
                qid,
                &mut self.timers,
                unacked.entry,
                None,
                &mut self.dead_letters,
                effects,
            );
        }
        let idx = queue
            .consumer_idx(connection, tag)
            .expect("consumer registered on its queue");
        queue.consumers.remove(idx);
        queue.cursor = 0;
        queue.last_used_ms = self.now_ms;
        let auto_deleted = queue.options.auto_delete && queue.consumers.is_empty();
        // Messages over their delivery limit were dead-lettered: republish them before anything
        // is dispatched or deleted.
        self.republish_dead_letters(effects);
        if auto_deleted {
            self.remove_queue(qid, effects);
        } else {
            self.dispatch(qid, effects);
        }
        self.dispatch_touched(effects);
        Ok(Reply::Done)
    }

    fn credit(
        &mut self,
        connection: ConnectionId,
        tag: ConsumerTag,
        credit: u32,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let qid = self.consumer_queue(connection, tag)?;
        let queue = self
            .queues
            .get_mut(&qid)
            .expect("consumers point at live queues");
        let idx = queue
            .consumer_idx(connection, tag)
            .expect("consumer registered on its queue");
        let consumer = &mut queue.consumers[idx];
        if consumer.options.prefetch > 0 {
            consumer.credit = consumer
                .credit
                .saturating_add(credit)
                .min(consumer.options.prefetch);
        }
        self.dispatch(qid, effects);
        Ok(Reply::Done)
    }

    fn settle(
        &mut self,
        connection: ConnectionId,
        tag: DeliveryTag,
        multiple: bool,
        how: Settle,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let conn = self.connections.get_mut(&connection).ok_or_else(|| {
            CoreError::not_found(EntityKind::Connection, connection.0.to_string())
        })?;
        if !multiple {
            // The common case, without the allocations of the general path.
            let Some(unacked) = conn.unacked.remove(tag.0) else {
                if conn.lapsed.remove(&tag.0) {
                    // Its lease lapsed and it went back to the queue: nothing to settle.
                    return Ok(Reply::Settled { count: 0 });
                }
                return Err(CoreError::UnknownDeliveryTag { tag: tag.0 });
            };
            let qid = unacked.queue;
            if self.settle_one(connection, unacked, how, effects) {
                self.to_dispatch.push(qid);
            }
            self.finish_dead_letters_and_dispatch(effects);
            return Ok(Reply::Settled { count: 1 });
        }
        let settled: Vec<(u64, Unacked)> = {
            let upto = if tag.0 == 0 { u64::MAX } else { tag.0 };
            if tag.0 != 0 && !conn.unacked.contains(tag.0) && !conn.lapsed.contains(&tag.0) {
                return Err(CoreError::UnknownDeliveryTag { tag: tag.0 });
            }
            conn.forget_lapsed(0, upto);
            conn.unacked.remove_range(0, upto)
        };
        let count = settled.len() as u32;
        let mut touched: Vec<QueueId> = Vec::new();
        for (_, unacked) in settled {
            let qid = unacked.queue;
            if self.settle_one(connection, unacked, how, effects) && !touched.contains(&qid) {
                touched.push(qid);
            }
        }
        self.to_dispatch.extend(touched);
        self.finish_dead_letters_and_dispatch(effects);
        Ok(Reply::Settled { count })
    }

    fn ack_range(
        &mut self,
        connection: ConnectionId,
        first: DeliveryTag,
        last: DeliveryTag,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let conn = self.connections.get_mut(&connection).ok_or_else(|| {
            CoreError::not_found(EntityKind::Connection, connection.0.to_string())
        })?;
        if first > last {
            return Err(CoreError::InvalidArgument {
                reason: format!("ack range {}..={} is empty", first.0, last.0),
            });
        }
        let settled = conn.unacked.remove_range(first.0, last.0);
        let lapsed = conn.forget_lapsed(first.0, last.0);
        if settled.is_empty() && !lapsed {
            return Err(CoreError::UnknownDeliveryTag { tag: first.0 });
        }
        let count = settled.len() as u32;
        let mut touched: Vec<QueueId> = Vec::new();
        for (_, unacked) in settled {
            let qid = unacked.queue;
            if self.settle_one(connection, unacked, Settle::Ack, effects) && !touched.contains(&qid)
            {
                touched.push(qid);
            }
        }
        for qid in touched {
            self.dispatch(qid, effects);
        }
        Ok(Reply::Settled { count })
    }

    /// Settles one outstanding delivery; false when its queue is gone (deleted while the
    /// delivery was outstanding), in which case there is nothing to do.
    fn settle_one(
        &mut self,
        connection: ConnectionId,
        unacked: Unacked,
        how: Settle,
        effects: &mut Vec<Effect>,
    ) -> bool {
        let Some(queue) = self.queues.get_mut(&unacked.queue) else {
            return false;
        };
        queue.unacked -= 1;
        if let Some(idx) = queue.consumer_idx(connection, unacked.consumer_tag) {
            queue.consumers[idx].unacked -= 1;
        }
        let mut entry = unacked.entry;
        let due = match how {
            Settle::Ack => {
                queue.stats.acked += 1;
                None
            }
            Settle::Drop => Some(None),
            Settle::Requeue => match &queue.features.retry {
                // A retry schedule turns a requeue into a delayed one, until it runs out.
                Some(schedule) => match schedule.get(entry.retries as usize) {
                    Some(delay) => {
                        entry.retries += 1;
                        Some(Some(self.now_ms.saturating_add(*delay)))
                    }
                    None => Some(None),
                },
                None => Some(Some(self.now_ms)),
            },
            Settle::Defer(due) => Some(Some(due)),
        };
        match due {
            None => {}
            Some(None) => {
                queue.stats.dropped += 1;
                self.dead_letters
                    .extend(DeadLetter::of(queue, &entry, DeathReason::Rejected));
            }
            Some(Some(due)) => {
                let later = (due > self.now_ms).then_some(due);
                let held = later.is_some();
                let n_delayed = queue.stats.delayed;
                self.ready_bytes_total += requeue_entry(
                    queue,
                    unacked.queue,
                    &mut self.timers,
                    entry,
                    later,
                    &mut self.dead_letters,
                    effects,
                );
                if held && queue.stats.delayed > n_delayed {
                    self.delayed_total += 1;
                }
                return true;
            }
        }
        if let Some(durable_id) = entry.durable_id {
            effects.push(Effect::DurableSettled {
                durable_id,
                queue: queue.name.clone(),
            });
        }
        true
    }

    fn restore(
        &mut self,
        queue_name: &str,
        durable_id: u64,
        message: Arc<Message>,
        ready_at_ms: u64,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let qid = *self
            .queue_names
            .get(queue_name)
            .ok_or_else(|| CoreError::not_found(EntityKind::Queue, queue_name))?;
        let queue = self.queues.get_mut(&qid).expect("names map to live queues");
        if !queue.is_durable() {
            return Err(CoreError::precondition(
                EntityKind::Queue,
                queue_name,
                "only durable queues hold logged messages",
            ));
        }
        self.next_durable_id = self.next_durable_id.max(durable_id + 1);
        queue.stats.published += 1;
        if let (Some(window), Some(id)) = (queue.features.dedup_window, &message.message_id) {
            let enqueued_at = ready_at_ms.saturating_sub(message.delay_ms.unwrap_or(0));
            queue
                .dedup
                .insert(id, enqueued_at.saturating_add(window), self.now_ms);
        }
        let entry = queue.new_entry(message, Some(durable_id), true);
        if ready_at_ms > self.now_ms {
            hold(queue, qid, &mut self.timers, entry, ready_at_ms);
            self.delayed_total += 1;
            return Ok(Reply::Done);
        }
        // Its TTL counts from when it became ready before the restart.
        self.ready_bytes_total +=
            make_ready(queue, qid, &mut self.timers, entry, ready_at_ms, effects);
        self.dispatch(qid, effects);
        Ok(Reply::Done)
    }

    /// Every remembered message id of durable queues' dedup windows, with its deadline:
    /// what a log checkpoint must keep (see [`Command::RestoreDedup`]).
    pub fn durable_dedup_entries(&self) -> Vec<(Arc<str>, String, u64)> {
        let mut all = Vec::new();
        let mut queues: Vec<&Queue> = self
            .queues
            .values()
            .filter(|queue| queue.is_durable() && queue.dedup.len() > 0)
            .collect();
        queues.sort_by(|left, right| left.name.cmp(&right.name));
        for queue in queues {
            for (id, until) in queue.dedup.entries() {
                if until > self.now_ms {
                    all.push((queue.name.clone(), id.to_owned(), until));
                }
            }
        }
        all
    }

    /// Every logged message still in a durable queue (ready, outstanding or delayed), by id,
    /// with the durable queues it is in and when it is ready in them (`None`: now; `Some(t)`:
    /// delayed until `t`): what a log checkpoint must keep.
    #[allow(clippy::type_complexity)]
    pub fn durable_messages(&self) -> Vec<(u64, Arc<Message>, Vec<(Arc<str>, Option<u64>)>)> {
        type ById = BTreeMap<u64, (Arc<Message>, Vec<(Arc<str>, Option<u64>)>)>;
        let mut by_id: ById = BTreeMap::new();
        let mut add = |entry: &Entry, queue: &Queue, delayed_until: Option<u64>| {
            if let Some(durable_id) = entry.durable_id {
                by_id
                    .entry(durable_id)
                    .or_insert_with(|| (entry.message.clone(), Vec::new()))
                    .1
                    .push((queue.name.clone(), delayed_until));
            }
        };
        for queue in self.queues.values().filter(|queue| queue.is_durable()) {
            for entry in queue.ready.iter() {
                add(entry, queue, None);
            }
        }
        for conn in self.connections.values() {
            for unacked in conn.unacked.values() {
                if let Some(queue) = self.queues.get(&unacked.queue) {
                    add(&unacked.entry, queue, None);
                }
            }
        }
        for (due, timer) in self.timers.iter() {
            if let TimerKind::Delayed { queue, entry } = timer
                && let Some(queue) = self.queues.get(queue)
            {
                add(entry, queue, Some(due));
            }
        }
        by_id
            .into_iter()
            .map(|(durable_id, (message, mut queues))| {
                queues.sort();
                (durable_id, message, queues)
            })
            .collect()
    }

    // ----- timers -----

    fn tick(&mut self, effects: &mut Vec<Effect>) -> Reply {
        let now_ms = self.now_ms;
        for _ in 0..TIMERS_PER_TICK_MAX {
            let Some((_, timer)) = self.timers.pop_due(now_ms) else {
                break;
            };
            match timer {
                TimerKind::Delayed { queue: qid, entry } => {
                    self.delayed_total -= 1;
                    let Some(queue) = self.queues.get_mut(&qid) else {
                        continue;
                    };
                    queue.stats.delayed -= 1;
                    if queue.features.overflow.rejects()
                        && queue.features.over_limit(
                            queue.ready.len() as u64 + 1,
                            queue.ready.bytes() + entry.message.size_bytes(),
                        )
                    {
                        // A full reject-publish queue cannot refuse a message that was
                        // confirmed long ago: it leaves as if its length limit dropped it.
                        queue.stats.dropped += 1;
                        self.dead_letters.extend(DeadLetter::of(
                            queue,
                            &entry,
                            DeathReason::MaxLen,
                        ));
                        if let Some(durable_id) = entry.durable_id {
                            effects.push(Effect::DurableSettled {
                                durable_id,
                                queue: queue.name.clone(),
                            });
                        }
                        continue;
                    }
                    self.ready_bytes_total +=
                        make_ready(queue, qid, &mut self.timers, *entry, now_ms, effects);
                    self.ready_bytes_total -=
                        drop_head_over_limit(queue, &mut self.dead_letters, effects);
                    self.to_dispatch.push(qid);
                }
                TimerKind::Ttl { queue: qid } => {
                    let Some(queue) = self.queues.get_mut(&qid) else {
                        continue;
                    };
                    if queue.ttl_armed.is_some_and(|armed| armed <= now_ms) {
                        queue.ttl_armed = None;
                    }
                    while let Some(entry) = queue.ready.pop_expired(now_ms) {
                        self.ready_bytes_total -= entry.message.size_bytes();
                        expire_entry(queue, entry, &mut self.dead_letters, effects);
                    }
                    arm_ttl(queue, qid, &mut self.timers);
                    request_page_in(queue, effects);
                }
                TimerKind::Lease { connection, tag } => {
                    self.lapse_lease(connection, tag, effects);
                }
                TimerKind::QueueExpiry { queue: qid } => {
                    let Some(queue) = self.queues.get(&qid) else {
                        continue;
                    };
                    let expires = queue.features.expires.expect("only set with x-expires");
                    let deadline = queue.last_used_ms.saturating_add(expires);
                    if !queue.consumers.is_empty() {
                        // In use: look again after another period.
                        self.timers.push(
                            now_ms.saturating_add(expires),
                            TimerKind::QueueExpiry { queue: qid },
                        );
                    } else if deadline > now_ms {
                        self.timers
                            .push(deadline, TimerKind::QueueExpiry { queue: qid });
                    } else {
                        self.remove_queue(qid, effects);
                    }
                }
            }
        }
        self.finish_dead_letters_and_dispatch(effects);
        Reply::Done
    }

    /// A lease timer fired: the delivery goes back to its queue if it is still outstanding
    /// and its lease was not extended since.
    fn lapse_lease(&mut self, connection: ConnectionId, tag: u64, effects: &mut Vec<Effect>) {
        let now_ms = self.now_ms;
        let Some(conn) = self.connections.get_mut(&connection) else {
            return;
        };
        let lapsed = conn
            .unacked
            .get_mut(tag)
            .is_some_and(|unacked| unacked.lease.is_some_and(|(until, _)| until <= now_ms));
        if !lapsed {
            return;
        }
        let unacked = conn.unacked.remove(tag).expect("checked");
        conn.lapse(tag);
        let qid = unacked.queue;
        let Some(queue) = self.queues.get_mut(&qid) else {
            return;
        };
        queue.unacked -= 1;
        if let Some(idx) = queue.consumer_idx(connection, unacked.consumer_tag) {
            queue.consumers[idx].unacked -= 1;
            // Another consumer, if there is one, gets it next.
            queue.cursor = (idx + 1) % queue.consumers.len();
        }
        self.ready_bytes_total += requeue_entry(
            queue,
            qid,
            &mut self.timers,
            unacked.entry,
            None,
            &mut self.dead_letters,
            effects,
        );
        self.to_dispatch.push(qid);
    }

    fn touch(&mut self, connection: ConnectionId, tag: DeliveryTag) -> Result<Reply, CoreError> {
        let now_ms = self.now_ms;
        let conn = self.connections.get_mut(&connection).ok_or_else(|| {
            CoreError::not_found(EntityKind::Connection, connection.0.to_string())
        })?;
        let Some(unacked) = conn.unacked.get_mut(tag.0) else {
            if conn.lapsed.contains(&tag.0) {
                return Ok(Reply::Done);
            }
            return Err(CoreError::UnknownDeliveryTag { tag: tag.0 });
        };
        if let Some((until, timeout)) = &mut unacked.lease {
            let extended = now_ms.saturating_add(*timeout);
            if extended > *until {
                *until = extended;
                self.timers.push(
                    extended,
                    TimerKind::Lease {
                        connection,
                        tag: tag.0,
                    },
                );
            }
        }
        Ok(Reply::Done)
    }

    // ----- dead-letter queues -----

    fn redrive(
        &mut self,
        connection: ConnectionId,
        queue_name: &str,
        max: u64,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let qid = self.queue_for(connection, queue_name)?;
        let limit = if max == 0 { u64::MAX } else { max };
        let mut kept: Vec<Entry> = Vec::new();
        let mut moved = 0;
        while moved < limit {
            let queue = self.queues.get_mut(&qid).expect("checked");
            let Some(entry) = queue.ready.pop_front() else {
                break;
            };
            let size = entry.message.size_bytes();
            self.ready_bytes_total -= size;
            if entry.expired(self.now_ms) {
                // Past its TTL here: it expires (as dispatch would), it is not moved.
                expire_entry(queue, entry, &mut self.dead_letters, effects);
                continue;
            }
            let origin = death_origin(&entry.message, &queue.name);
            let target = origin
                .as_ref()
                .and_then(|(name, _, _)| self.queue_names.get(name.as_str()).copied())
                .filter(|target| *target != qid);
            let (Some(target), Some((_, exchange, routing_key))) = (target, origin) else {
                kept.push(entry);
                continue;
            };
            let mut targets = vec![target];
            self.refuse_full(size, &mut targets, &mut Vec::new());
            if targets.is_empty() {
                kept.push(entry);
                continue;
            }
            let queue = self.queues.get_mut(&qid).expect("checked");
            queue.stats.acked += 1;
            if let Some(durable_id) = entry.durable_id {
                effects.push(Effect::DurableSettled {
                    durable_id,
                    queue: queue.name.clone(),
                });
            }
            let mut headers = entry.message.headers.clone();
            for key in [
                X_DEATH,
                "x-first-death-reason",
                "x-first-death-queue",
                "x-first-death-exchange",
            ] {
                headers.remove(key);
            }
            let message = Arc::new(Message {
                exchange,
                routing_key,
                headers,
                ..Message::clone(&entry.message)
            });
            self.enqueue_routed(&message, &targets, effects);
            self.to_dispatch.push(target);
            moved += 1;
        }
        let queue = self.queues.get_mut(&qid).expect("checked");
        for entry in kept {
            self.ready_bytes_total += entry.message.size_bytes();
            queue.ready.requeue(entry);
        }
        request_page_in(queue, effects);
        self.finish_dead_letters_and_dispatch(effects);
        Ok(Reply::Redriven { moved })
    }

    /// Hands ready messages to consumers with capacity until one side runs out.
    fn dispatch(&mut self, qid: QueueId, effects: &mut Vec<Effect>) {
        let Broker {
            queues,
            connections,
            ready_bytes_total,
            timers,
            dead_letters,
            now_ms,
            ..
        } = self;
        let now_ms = *now_ms;
        let Some(queue) = queues.get_mut(&qid) else {
            // Deleted earlier in the same command (auto-delete, dead-letter cascade).
            return;
        };
        while !queue.ready.is_empty() {
            let Some(idx) = queue.pick_consumer() else {
                break;
            };
            let mut entry = queue.ready.pop_front().expect("checked non-empty");
            *ready_bytes_total -= entry.message.size_bytes();
            if entry.expired(now_ms) {
                // Never deliver a message past its TTL, even before its timer fires.
                expire_entry(queue, entry, dead_letters, effects);
                continue;
            }
            entry.delivery_count += 1;
            let consumer = &mut queue.consumers[idx];
            let conn = connections
                .get_mut(&consumer.connection)
                .expect("consumers belong to live connections");
            conn.next_delivery_tag += 1;
            let delivery_tag = conn.next_delivery_tag;
            queue.stats.delivered += 1;
            if entry.redelivered {
                queue.stats.redelivered += 1;
            }
            effects.push(Effect::Deliver(Delivery {
                connection: consumer.connection,
                consumer_tag: consumer.tag,
                delivery_tag: DeliveryTag(delivery_tag),
                queue: queue.name.clone(),
                message: entry.message.clone(),
                redelivered: entry.redelivered,
                delivery_count: entry.delivery_count,
            }));
            if consumer.options.auto_ack {
                if consumer.options.prefetch > 0 {
                    consumer.credit -= 1;
                }
                queue.stats.acked += 1;
                if let Some(durable_id) = entry.durable_id {
                    effects.push(Effect::DurableSettled {
                        durable_id,
                        queue: queue.name.clone(),
                    });
                }
            } else {
                consumer.unacked += 1;
                queue.unacked += 1;
                let lease = consumer.options.ack_timeout_ms.map(|timeout| {
                    let until = now_ms.saturating_add(timeout);
                    timers.push(
                        until,
                        TimerKind::Lease {
                            connection: consumer.connection,
                            tag: delivery_tag,
                        },
                    );
                    (until, timeout)
                });
                conn.unacked.insert(
                    delivery_tag,
                    Unacked {
                        queue: qid,
                        consumer_tag: consumer.tag,
                        entry,
                        lease,
                    },
                );
            }
        }
        request_page_in(queue, effects);
    }

    fn page_in(
        &mut self,
        name: &str,
        epoch: u64,
        entries: Vec<PagedEntry>,
        effects: &mut Vec<Effect>,
    ) -> Reply {
        let Some(&qid) = self.queue_names.get(name) else {
            // Deleted since it asked.
            return Reply::Done;
        };
        let queue = self.queues.get_mut(&qid).expect("names map to live queues");
        if queue.paged.epoch != epoch || !queue.paged.page_in_pending {
            return Reply::Done;
        }
        queue.paged.page_in_pending = false;
        for entry in entries {
            if queue.paged.count == 0 {
                break;
            }
            self.ready_bytes_total += queue.page_in(entry);
        }
        arm_ttl(queue, qid, &mut self.timers);
        // Delivers what came back, and asks for more if it was not enough.
        self.dispatch(qid, effects);
        self.finish_dead_letters_and_dispatch(effects);
        Reply::Done
    }
}

#[derive(Debug, Clone, Copy)]
enum Settle {
    Ack,
    Requeue,
    Drop,
    /// Requeue when due (unix ms).
    Defer(u64),
}

fn exchange_info(exchange: &Exchange) -> ExchangeInfo {
    ExchangeInfo {
        name: exchange.name.to_string(),
        kind: exchange.kind,
        options: exchange.options.clone(),
        builtin: exchange.builtin,
        bindings: exchange.n_bindings(),
    }
}

/// Enforces a drop-head length limit after an enqueue: drops ready messages from the head
/// (the next to be delivered) until the queue fits. Returns the bytes dropped.
fn drop_head_over_limit(
    queue: &mut Queue,
    dead_letters: &mut VecDeque<DeadLetter>,
    effects: &mut Vec<Effect>,
) -> u64 {
    let mut dropped_bytes = 0;
    while queue.features.overflow == Overflow::DropHead
        && queue
            .features
            .over_limit(queue.ready.len() as u64, queue.ready.bytes())
    {
        let entry = queue
            .ready
            .pop_front()
            .expect("over a limit means not empty");
        dropped_bytes += entry.message.size_bytes();
        queue.stats.dropped += 1;
        dead_letters.extend(DeadLetter::of(queue, &entry, DeathReason::MaxLen));
        if let Some(durable_id) = entry.durable_id {
            effects.push(Effect::DurableSettled {
                durable_id,
                queue: queue.name.clone(),
            });
        }
    }
    dropped_bytes
}

/// Puts an outstanding entry back in its queue; returns the bytes that became ready. An entry
/// at its queue's delivery limit leaves instead: dead-lettered (`delivery_limit`) or dropped.
fn requeue_entry(
    queue: &mut Queue,
    qid: QueueId,
    timers: &mut Timers,
    mut entry: Entry,
    later: Option<u64>,
    dead_letters: &mut VecDeque<DeadLetter>,
    effects: &mut Vec<Effect>,
) -> u64 {
    if queue
        .features
        .delivery_limit
        .is_some_and(|limit| u64::from(entry.delivery_count) >= limit)
    {
        queue.stats.dropped += 1;
        dead_letters.extend(DeadLetter::of(queue, &entry, DeathReason::DeliveryLimit));
        if let Some(durable_id) = entry.durable_id {
            effects.push(Effect::DurableSettled {
                durable_id,
                queue: queue.name.clone(),
            });
        }
        return 0;
    }
    entry.redelivered = true;
    if let Some(due) = later {
        hold(queue, qid, timers, entry, due);
        return 0;
    }
    let size = entry.message.size_bytes();
    let expires = entry.expires_at.is_some();
    queue.ready.requeue(entry);
    if expires {
        arm_ttl(queue, qid, timers);
    }
    size
}

/// Makes sure a TTL timer is set for the queue's earliest ready expiry.
fn arm_ttl(queue: &mut Queue, qid: QueueId, timers: &mut Timers) {
    if let Some(next) = queue.ready.next_expiry()
        && queue.ttl_armed.is_none_or(|armed| next < armed)
    {
        queue.ttl_armed = Some(next);
        timers.push(next, TimerKind::Ttl { queue: qid });
    }
}

/// Holds an entry until `due`, when [`Command::Tick`] puts it at the back of the queue. The
/// caller counts it in `Broker::delayed_total`.
fn hold(queue: &mut Queue, qid: QueueId, timers: &mut Timers, entry: Entry, due: u64) {
    queue.stats.delayed += 1;
    timers.push(
        due,
        TimerKind::Delayed {
            queue: qid,
            entry: Box::new(entry),
        },
    );
}

/// Appends an entry to the ready messages, its TTL counted from `since_ms`, with a timer for
/// the TTL; returns the bytes that became ready in memory. In a queue larger than memory the
/// entry joins the paged tail instead ([`Effect::PageOut`]).
fn make_ready(
    queue: &mut Queue,
    qid: QueueId,
    timers: &mut Timers,
    entry: Entry,
    since_ms: u64,
    effects: &mut Vec<Effect>,
) -> u64 {
    if queue.paged.takes(queue.ready.len(), queue.ready.bytes()) {
        let paged = queue.page_out(entry, since_ms);
        effects.push(Effect::PageOut {
            queue: queue.name.clone(),
            epoch: queue.paged.epoch,
            entry: Box::new(paged),
        });
        return 0;
    }
    let size = entry.message.size_bytes();
    if queue.push_ready(entry, since_ms).is_some() {
        arm_ttl(queue, qid, timers);
    }
    size
}

/// Asks the server for the oldest paged messages once the ready messages in memory fell to
/// half the threshold (so that they come back before memory runs dry), unless already asked.
fn request_page_in(queue: &mut Queue, effects: &mut Vec<Effect>) {
    let Some(threshold) = queue.paged.threshold else {
        return;
    };
    let in_memory = queue.ready.len();
    let in_memory_bytes = queue.ready.bytes();
    let bytes_limit = queue.paged.threshold_bytes;
    if queue.paged.count == 0
        || queue.paged.page_in_pending
        || in_memory > threshold / 2
        || in_memory_bytes > bytes_limit / 2
    {
        return;
    }
    queue.paged.page_in_pending = true;
    effects.push(Effect::PageIn {
        queue: queue.name.clone(),
        epoch: queue.paged.epoch,
        max: (threshold.saturating_sub(in_memory) as u64)
            .min(queue.paged.count)
            .max(1),
        max_bytes: bytes_limit.saturating_sub(in_memory_bytes).max(1),
    });
}

/// Discards the paged tail (purge): its logged messages are settled by id runs. Returns how
/// many messages it held.
fn discard_paged(queue: &mut Queue, effects: &mut Vec<Effect>) -> u64 {
    let count = queue.paged.count;
    if count == 0 {
        return 0;
    }
    effects.push(Effect::PagesDropped {
        queue: queue.name.clone(),
        epoch: queue.paged.epoch,
    });
    for (first, n) in queue.paged.discard() {
        effects.push(Effect::DurableSettledRange {
            first,
            count: n,
            queue: queue.name.clone(),
        });
    }
    count
}

/// A ready entry whose TTL passed leaves its queue: dead-lettered (`expired`) or dropped.
fn expire_entry(
    queue: &mut Queue,
    entry: Entry,
    dead_letters: &mut VecDeque<DeadLetter>,
    effects: &mut Vec<Effect>,
) {
    queue.stats.expired += 1;
    dead_letters.extend(DeadLetter::of(queue, &entry, DeathReason::Expired));
    if let Some(durable_id) = entry.durable_id {
        effects.push(Effect::DurableSettled {
            durable_id,
            queue: queue.name.clone(),
        });
    }
}

/// Where a dead-lettered message came from: the queue of its latest death record other than
/// `here`, with the exchange and routing key it was published with there.
fn death_origin(message: &Message, here: &str) -> Option<(String, Arc<str>, Arc<str>)> {
    let Some(HeaderValue::List(records)) = message.headers.get(X_DEATH) else {
        return None;
    };
    records.iter().find_map(|record| {
        let HeaderValue::Map(record) = record else {
            return None;
        };
        let queue = record.get("queue")?.as_str()?;
        if queue == here {
            return None;
        }
        let exchange = record.get("exchange")?.as_str()?;
        let routing_key = match record.get("routing-keys") {
            Some(HeaderValue::List(keys)) => keys.first()?.as_str()?,
            _ => return None,
        };
        Some((queue.to_owned(), exchange.into(), routing_key.into()))
    })
}

fn check_exclusive_access(queue: &Queue, connection: ConnectionId) -> Result<(), CoreError> {
    match queue.owner {
        Some(owner) if owner != connection => Err(CoreError::ResourceLocked {
            name: queue.name.to_string(),
            reason: "it is exclusive to another connection",
        }),
        _ => Ok(()),
    }
}

fn check_header_depth(headers: &Headers) -> Result<(), CoreError> {
    if headers.depth() > HEADER_DEPTH_MAX {
        return Err(CoreError::InvalidArgument {
            reason: format!("headers nest deeper than {HEADER_DEPTH_MAX} levels"),
        });
    }
    Ok(())
}
