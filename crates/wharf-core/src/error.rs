//! The core's one error type: everything a user can get wrong about topology, consuming and acks.

use std::fmt;

/// What kind of entity an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntityKind {
    /// A queue.
    Queue,
    /// An exchange.
    Exchange,
    /// A consumer, identified by its tag on a connection.
    Consumer,
    /// A connection known to the broker core.
    Connection,
    /// A virtual host.
    Vhost,
}

impl fmt::Display for EntityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EntityKind::Queue => "queue",
            EntityKind::Exchange => "exchange",
            EntityKind::Consumer => "consumer",
            EntityKind::Connection => "connection",
            EntityKind::Vhost => "virtual host",
        })
    }
}

/// An operating error: the command was refused and the broker state is unchanged.
///
/// Every variant is something the user can act on; none of them means the broker is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// The named queue, exchange, consumer or connection does not exist.
    #[error("{kind} '{name}' not found")]
    NotFound {
        /// What was looked up.
        kind: EntityKind,
        /// The name (or tag) that was not found.
        name: String,
    },
    /// A name is empty, too long, or contains control characters.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The offending name (truncated to the first 300 bytes).
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// Names beginning with `wharf.` belong to the broker; `amq.` is kept for RabbitMQ's
    /// built-in names (docs/protocol.md).
    #[error("name '{name}' is reserved: the `{prefix}` prefix belongs to the broker")]
    ReservedName {
        /// The offending name.
        name: String,
        /// The reserved prefix it starts with.
        prefix: &'static str,
    },
    /// The entity exists but not in the state or shape the command requires
    /// (redeclare with other properties, delete if-unused while in use, ...).
    #[error("precondition failed for {kind} '{name}': {reason}")]
    PreconditionFailed {
        /// What the command was about.
        kind: EntityKind,
        /// Its name.
        name: String,
        /// What did not hold.
        reason: String,
    },
    /// The queue is exclusive to another connection, or has an exclusive consumer.
    #[error("queue '{name}' is locked: {reason}")]
    ResourceLocked {
        /// The queue.
        name: String,
        /// Exclusive owner or exclusive consumer.
        reason: &'static str,
    },
    /// The command is not allowed on this entity (built-in exchange, internal exchange, ...).
    #[error("access refused: {reason}")]
    AccessRefused {
        /// Why.
        reason: String,
    },
    /// An ack, nack or reject named a delivery tag that is not outstanding on this connection.
    #[error(
        "unknown delivery tag {tag}: not outstanding on this connection (already acked, or never delivered)"
    )]
    UnknownDeliveryTag {
        /// The tag the client sent.
        tag: u64,
    },
    /// The consumer tag is already used by another consumer of this connection.
    #[error("consumer tag {tag} is already in use on this connection")]
    ConsumerTagInUse {
        /// The tag.
        tag: u32,
    },
    /// An argument has the wrong type or value (e.g. `x-match` on a headers binding).
    #[error("invalid argument: {reason}")]
    InvalidArgument {
        /// What is wrong with it.
        reason: String,
    },
    /// A queue with `x-overflow = reject-publish` is at its length limit (`x-max-length` or
    /// `x-max-length-bytes`) and refused the message; retry once consumers have made room.
    #[error("queue '{queue}' is full (x-overflow = reject-publish)")]
    QueueFull {
        /// The full queue.
        queue: String,
    },
    /// A configured limit would be exceeded (queues, bindings, consumers, ...).
    #[error("limit exceeded: at most {limit} {what}")]
    LimitExceeded {
        /// What is limited.
        what: &'static str,
        /// The limit in force.
        limit: usize,
    },
}

impl CoreError {
    pub(crate) fn not_found(kind: EntityKind, name: impl Into<String>) -> Self {
        CoreError::NotFound {
            kind,
            name: name.into(),
        }
    }

    pub(crate) fn precondition(kind: EntityKind, name: &str, reason: impl Into<String>) -> Self {
        CoreError::PreconditionFailed {
            kind,
            name: name.to_owned(),
            reason: reason.into(),
        }
    }
}
