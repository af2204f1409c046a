//! The API: what a caller sends ([`Command`]) and gets back ([`Reply`], [`Effect`]), and the
//! summaries the queries return.

use super::*;

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

/// Who declares a queue: a label the queue keeps for life (the server passes its user's
/// name), and that label's limit of queues existing at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declarer {
    /// The label.
    pub name: Arc<str>,
    /// Most queues with this label at once (`None`: no limit of its own).
    pub max_queues: Option<u32>,
}

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
        /// The virtual host it works in (refused when missing, or when it has its
        /// `max_connections` open).
        vhost: Arc<str>,
    },
    /// A client went away: its consumers are cancelled, its unacked messages requeued, its
    /// exclusive queues deleted.
    CloseConnection {
        /// The connection.
        connection: ConnectionId,
    },
    /// Create an exchange, or check that an equivalent one exists.
    DeclareExchange {
        /// The virtual host names resolve in.
        vhost: Arc<str>,
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
        /// The virtual host names resolve in.
        vhost: Arc<str>,
        /// Name.
        name: String,
        /// Refuse if it has bindings.
        if_unused: bool,
    },
    /// Create a queue, or check that an equivalent one exists. An empty name asks the broker
    /// to generate one (`wharf.gen-N`).
    DeclareQueue {
        /// The virtual host names resolve in.
        vhost: Arc<str>,
        /// The declaring connection (owner when exclusive).
        connection: ConnectionId,
        /// Name, or empty for a generated name.
        name: String,
        /// Properties.
        options: QueueOptions,
        /// Only check that it exists.
        passive: bool,
        /// Who declares it, counted against its own queue limit (the server's user; opaque
        /// to the core). A queue keeps its declarer for life.
        declarer: Option<Declarer>,
    },
    /// Delete a queue: its consumers are cancelled and its messages dropped.
    DeleteQueue {
        /// The virtual host names resolve in.
        vhost: Arc<str>,
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
        /// The virtual host names resolve in.
        vhost: Arc<str>,
        /// The connection asking.
        connection: ConnectionId,
        /// Name.
        name: String,
    },
    /// Bind a queue or exchange to a source exchange.
    Bind {
        /// The virtual host names resolve in.
        vhost: Arc<str>,
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
        /// The virtual host names resolve in.
        vhost: Arc<str>,
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
        /// The virtual host names resolve in.
        vhost: Arc<str>,
        /// Exchange and routing key are inside the message.
        message: Arc<Message>,
    },
    /// Attach a consumer to a queue.
    Subscribe {
        /// The virtual host names resolve in.
        vhost: Arc<str>,
        /// The consuming connection.
        connection: ConnectionId,
        /// The queue.
        queue: String,
        /// Chosen by the client, unique on its connection.
        consumer_tag: ConsumerTag,
        /// Prefetch, ack mode, exclusivity, priority.
        options: ConsumerOptions,
    },
    /// Detach a consumer; its unacked messages are requeued (settling one of them later is a
    /// harmless no-op, as for a lapsed lease).
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
        /// The virtual host names resolve in.
        vhost: Arc<str>,
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
        /// The virtual host names resolve in.
        vhost: Arc<str>,
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
    /// their death records. Messages without a record, or whose queue is gone, full, exclusive
    /// to another connection or not among `into`, stay.
    Redrive {
        /// The virtual host names resolve in.
        vhost: Arc<str>,
        /// The connection asking.
        connection: ConnectionId,
        /// The dead-letter queue.
        queue: String,
        /// Most messages to move (0: all).
        max: u64,
        /// The queues messages may be moved into (`None`: any). A message names its own
        /// target (its `x-death` header, which a publisher can write), so the server passes
        /// the queues the connection's user may write to.
        into: Option<std::collections::BTreeSet<String>>,
    },
    /// The server's answer to [`Effect::PageIn`]: the oldest paged messages of `queue`'s tail
    /// `level`, in order, as they were paged out. Ignored when stale (the tails were discarded
    /// since: purge, delete) or unasked.
    PageIn {
        /// The virtual host names resolve in.
        vhost: Arc<str>,
        /// The queue.
        queue: String,
        /// The tails' epoch, from the effect.
        epoch: u64,
        /// The tail's priority level, from the effect.
        level: u8,
        /// The oldest paged entries, at most the number asked for.
        entries: Vec<PagedEntry>,
    },
    /// Create a virtual host with the built-in exchanges, or set the limits of an existing
    /// one.
    AddVhost {
        /// Its name.
        name: String,
        /// Its limits.
        limits: VhostLimits,
    },
    /// Delete a virtual host and everything in it (not the default one).
    DeleteVhost {
        /// Its name.
        name: String,
    },
    /// Set a virtual host's limits (limits already exceeded refuse only new connections and
    /// queues).
    SetVhostLimits {
        /// Its name.
        name: String,
        /// Its limits.
        limits: VhostLimits,
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
///
/// The queues and exchanges of the effects that the server logs or spools (deleted, durable
/// and paging effects) are named by their resource key ([`resource_key`](super::resource_key):
/// the name in the default virtual host, qualified by its virtual host elsewhere).
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
    /// A ready message joins a paged tail of a queue larger than memory: the server keeps it
    /// (in order, per queue, priority level and epoch) until the core asks for it back with
    /// [`Effect::PageIn`]. Logged messages are still logged as usual. A queue has one tail per
    /// priority level holding paged messages (level 0 only without `x-max-priority`).
    PageOut {
        /// The queue.
        queue: Arc<str>,
        /// The tails' epoch (see [`Effect::PagesDropped`]).
        epoch: u64,
        /// The tail: the message's priority level in the queue.
        level: u8,
        /// The message and its queue state.
        entry: Box<PagedEntry>,
    },
    /// The queue wants up to `max` of the oldest paged messages of its tail `level` back, and
    /// no more body bytes than `max_bytes` past the first: answer with [`Command::PageIn`] (at
    /// least one entry). At most one request per queue is outstanding.
    PageIn {
        /// The queue.
        queue: Arc<str>,
        /// The tails' epoch.
        epoch: u64,
        /// The tail's priority level.
        level: u8,
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
    /// Body bytes delivered and not yet settled.
    pub unacked_bytes: u64,
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
