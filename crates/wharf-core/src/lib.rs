//! # wharf-core: the broker's deterministic heart
//!
//! Exchanges, queues, consumers and acknowledgements, with no I/O: no sockets, files, threads,
//! clocks or randomness. The only way to change the state is [`Broker::apply`] with a
//! [`Command`] and a logical time; it returns a [`Reply`] (or a [`CoreError`], leaving the
//! state unchanged) and appends the [`Effect`]s the caller must carry out — deliveries to send,
//! consumers to cancel, queues that disappeared. The same commands in the same order always give
//! the same state, replies and effects, which is what lets the server log commands, the tests
//! compare the broker with a reference model, and (later) replicas replay them.
//!
//! ```
//! use std::sync::Arc;
//! use wharf_core::{Broker, Command, ConnectionId, ConsumerTag, ConsumerOptions, DEFAULT_VHOST, Effect, Message, QueueOptions};
//!
//! let mut broker = Broker::default();
//! let mut effects = Vec::new();
//! let conn = ConnectionId(1);
//! let vhost: Arc<str> = DEFAULT_VHOST.into();
//! broker.apply(0, Command::OpenConnection { connection: conn, vhost: vhost.clone() }, &mut effects).unwrap();
//! broker.apply(0, Command::DeclareQueue { vhost: vhost.clone(), connection: conn,
//!     name: "jobs".into(), options: QueueOptions::default(), passive: false, declarer: None },
//!     &mut effects).unwrap();
//! broker.apply(0, Command::Subscribe { vhost: vhost.clone(), connection: conn, queue: "jobs".into(),
//!     consumer_tag: ConsumerTag(1), options: ConsumerOptions::default() }, &mut effects).unwrap();
//! broker.apply(1, Command::Publish { vhost: vhost.clone(), message: Arc::new(Message::new("jobs", "hello")) },
//!     &mut effects).unwrap();
//! let Some(Effect::Deliver(delivery)) = effects.pop() else { panic!("delivered") };
//! assert_eq!(&delivery.message.body[..], b"hello");
//! broker.apply(2, Command::Ack { connection: conn, delivery_tag: delivery.delivery_tag, multiple: false }, &mut effects).unwrap();
//! assert_eq!(broker.queue_stats(DEFAULT_VHOST, "jobs").unwrap().acked, 1);
//! ```

mod broker;
mod error;
mod exchange;
mod id_runs;
pub mod limits;
mod message;
mod name;
mod outstanding;
mod queue;
mod tag_runs;
mod timers;
pub mod topic;

pub use broker::{
    BUILTIN_EXCHANGES, BindTarget, BindingInfo, Broker, CancelReason, Command, DEFAULT_EXCHANGE,
    DEFAULT_VHOST, Declarer, Delivery, Effect, ExchangeInfo, Invariant, InvariantViolation,
    QueueFlow, ROUTED_TRACKED_MAX, Reply, VhostInfo, VhostLimits, resource_key, split_resource_key,
};
pub use error::{CoreError, EntityKind};
pub use exchange::{Destination, ExchangeKind, ExchangeOptions};
pub use limits::Limits;
pub use message::{HeaderValue, Headers, Message};
pub use name::{
    AMQ_PREFIX, RESERVED_PREFIX, validate_name, validate_routing_key, validate_user_name,
};
pub use queue::{
    ARG_ACK_TIMEOUT, ARG_DEAD_LETTER_EXCHANGE, ARG_DEAD_LETTER_ROUTING_KEY, ARG_DEDUP_WINDOW,
    ARG_DELIVERY_LIMIT, ARG_EXPIRES, ARG_MAX_LENGTH, ARG_MAX_LENGTH_BYTES, ARG_MAX_PRIORITY,
    ARG_MESSAGE_TTL, ARG_OVERFLOW, ARG_RETRY, ARG_SINGLE_ACTIVE_CONSUMER, ARG_SYNC,
    ConsumerOptions, DURATION_MS_MAX, DurableSync, Overflow, PagedEntry, QueueFeatures,
    QueueOptions, QueueStats, QueueSync, RETRY_STEPS_MAX,
};

/// Deterministic, fast hashing (FxHash): no random keys, so the core stays reproducible, and a
/// few nanoseconds per lookup on the hot path (SipHash cost a third of a publish→ack cycle).
/// Effects never depend on hash-map iteration order. Names are length-limited and declaring
/// needs a connection, which bounds what a hash-flooding client could do.
pub(crate) type FixedState = rustc_hash::FxBuildHasher;

/// A client connection, numbered by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

/// A consumer, numbered by its client, unique on its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerTag(pub u32);

/// A delivery on a connection: 1, 2, 3, ... in the order the connection's deliveries were made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryTag(pub u64);

/// A queue's identity for its lifetime; never reused, so a deleted and redeclared queue of the
/// same name is a different queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u64);
