//! The frame types: everything a client and the server say to each other after the preamble.
//!
//! Control frames derive serde and travel as postcard; the hot frames ([`Publish`],
//! [`PublishBatch`], [`Deliver`], [`DeliverBatch`]) are encoded by hand in `codec.rs` in the
//! same postcard encoding, so that their strings, tables and bodies decode as zero-copy slices.

use crate::code::ErrorCode;
use crate::properties::Properties;
use crate::table::Table;
use crate::wire_str::WireStr;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// One frame. The kind number on the wire is listed on each variant; numbers are append-only.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // Boxing would cost an allocation per single publish.
pub enum Frame {
    /// Kind 0, client → server, first frame after the preambles.
    Hello(Hello),
    /// Kind 1, server → client: the handshake succeeded; the server's limits.
    HelloOk(HelloOk),
    /// Kind 2, either way: the sender closes the connection; the receiver answers `CloseOk`.
    Close(Close),
    /// Kind 3, either way: answer to `Close`; then the socket is shut down.
    CloseOk,
    /// Kind 4, either way: sent when nothing else was sent for `heartbeat_ms`.
    Heartbeat,
    /// Kind 5, client → server: a request answered by one `Response` with the same id.
    Request {
        /// Chosen by the client, echoed in the response; unique among its pending requests.
        correlation_id: u64,
        /// What is asked.
        request: Request,
    },
    /// Kind 6, server → client: the answer to the request with `correlation_id`.
    Response {
        /// The request's correlation id.
        correlation_id: u64,
        /// The outcome.
        response: Response,
    },
    /// Kind 7, client → server: publish one message (consumes one publish sequence number).
    Publish(Publish),
    /// Kind 8, client → server: publish many messages (consumes one sequence number each).
    PublishBatch(PublishBatch),
    /// Kind 9, server → client: the outcome of publishes, by sequence number range.
    Confirm(Confirm),
    /// Kind 10, server → client: one delivery to a consumer.
    Deliver(Deliver),
    /// Kind 11, server → client: several deliveries to one consumer.
    DeliverBatch(DeliverBatch),
    /// Kind 12, client → server: settle delivery tags as processed.
    Ack(Ack),
    /// Kind 13, client → server: settle delivery tags as failed.
    Nack(Nack),
    /// Kind 14, client → server: settle one delivery tag as failed.
    Reject(Reject),
    /// Kind 15, client → server: ack inclusive ranges of delivery tags.
    AckRanges(AckRanges),
    /// Kind 16, client → server: grant a consumer more deliveries.
    Credit(Credit),
    /// Kind 17, server → client: the server ended a subscription (e.g. its queue was deleted).
    ConsumerCancelled(ConsumerCancelled),
    /// Kind 18, client → server, protocol 1.1: settle one delivery as failed and requeue its
    /// message after a delay.
    Defer(Defer),
    /// Kind 19, client → server, protocol 1.1: the delivery is still being worked on; restart
    /// its lease (`x-ack-timeout`).
    Touch(Touch),
}

/// Wire kind numbers of [`Frame`] variants. Append-only; a retired number is never reused.
pub mod kind {
    /// [`Frame::Hello`](super::Frame::Hello).
    pub const HELLO: u32 = 0;
    /// [`Frame::HelloOk`](super::Frame::HelloOk).
    pub const HELLO_OK: u32 = 1;
    /// [`Frame::Close`](super::Frame::Close). Its layout is frozen across major versions.
    pub const CLOSE: u32 = 2;
    /// [`Frame::CloseOk`](super::Frame::CloseOk).
    pub const CLOSE_OK: u32 = 3;
    /// [`Frame::Heartbeat`](super::Frame::Heartbeat).
    pub const HEARTBEAT: u32 = 4;
    /// [`Frame::Request`](super::Frame::Request).
    pub const REQUEST: u32 = 5;
    /// [`Frame::Response`](super::Frame::Response).
    pub const RESPONSE: u32 = 6;
    /// [`Frame::Publish`](super::Frame::Publish).
    pub const PUBLISH: u32 = 7;
    /// [`Frame::PublishBatch`](super::Frame::PublishBatch).
    pub const PUBLISH_BATCH: u32 = 8;
    /// [`Frame::Confirm`](super::Frame::Confirm).
    pub const CONFIRM: u32 = 9;
    /// [`Frame::Deliver`](super::Frame::Deliver).
    pub const DELIVER: u32 = 10;
    /// [`Frame::DeliverBatch`](super::Frame::DeliverBatch).
    pub const DELIVER_BATCH: u32 = 11;
    /// [`Frame::Ack`](super::Frame::Ack).
    pub const ACK: u32 = 12;
    /// [`Frame::Nack`](super::Frame::Nack).
    pub const NACK: u32 = 13;
    /// [`Frame::Reject`](super::Frame::Reject).
    pub const REJECT: u32 = 14;
    /// [`Frame::AckRanges`](super::Frame::AckRanges).
    pub const ACK_RANGES: u32 = 15;
    /// [`Frame::Credit`](super::Frame::Credit).
    pub const CREDIT: u32 = 16;
    /// [`Frame::ConsumerCancelled`](super::Frame::ConsumerCancelled).
    pub const CONSUMER_CANCELLED: u32 = 17;
    /// [`Frame::Defer`](super::Frame::Defer) (protocol 1.1).
    pub const DEFER: u32 = 18;
    /// [`Frame::Touch`](super::Frame::Touch) (protocol 1.1).
    pub const TOUCH: u32 = 19;
}

/// The protocol minor version that introduced the queue-feature additions: the `Defer` and
/// `Touch` frames, the `Redrive`, `QueueStatsV2` and `ListQueuesV2` requests and their
/// responses. A peer only sends them when the negotiated minor is at least this.
pub const MINOR_QUEUE_FEATURES: u16 = 1;

const _: () = assert!(MINOR_QUEUE_FEATURES <= crate::limits::PROTOCOL_MINOR);

/// The protocol minor version that introduced online administration: the requests on users
/// and permissions (tags 15 to 25) and their responses (tags 12 to 14).
pub const MINOR_ADMIN: u16 = 2;

const _: () = assert!(MINOR_ADMIN <= crate::limits::PROTOCOL_MINOR);

/// The protocol minor version that introduced virtual hosts: [`Hello::vhost`] (a trailing
/// field, sent only when it is not `/`), the requests on virtual hosts (tags 26 to 29) and the
/// `Vhosts` response (tag 15); also the requests on users' own limits (tags 30 and 31) and the
/// `UserLimits` response (tag 16).
pub const MINOR_VHOSTS: u16 = 3;

const _: () = assert!(MINOR_VHOSTS <= crate::limits::PROTOCOL_MINOR);

/// The virtual host of a connection that names none: the only one before protocol 1.3.
pub const DEFAULT_VHOST: &str = "/";

impl Frame {
    /// The frame's kind number on the wire (see [`kind`]).
    pub fn kind(&self) -> u32 {
        match self {
            Frame::Hello(_) => kind::HELLO,
            Frame::HelloOk(_) => kind::HELLO_OK,
            Frame::Close(_) => kind::CLOSE,
            Frame::CloseOk => kind::CLOSE_OK,
            Frame::Heartbeat => kind::HEARTBEAT,
            Frame::Request { .. } => kind::REQUEST,
            Frame::Response { .. } => kind::RESPONSE,
            Frame::Publish(_) => kind::PUBLISH,
            Frame::PublishBatch(_) => kind::PUBLISH_BATCH,
            Frame::Confirm(_) => kind::CONFIRM,
            Frame::Deliver(_) => kind::DELIVER,
            Frame::DeliverBatch(_) => kind::DELIVER_BATCH,
            Frame::Ack(_) => kind::ACK,
            Frame::Nack(_) => kind::NACK,
            Frame::Reject(_) => kind::REJECT,
            Frame::AckRanges(_) => kind::ACK_RANGES,
            Frame::Credit(_) => kind::CREDIT,
            Frame::ConsumerCancelled(_) => kind::CONSUMER_CANCELLED,
            Frame::Defer(_) => kind::DEFER,
            Frame::Touch(_) => kind::TOUCH,
        }
    }

    /// The lowest protocol minor version that defines this frame (kind, and request or
    /// response variant). A peer sends a frame only if the negotiated minor is at least this;
    /// receiving one above the negotiated minor is a protocol violation (docs/protocol.md §8).
    pub fn minor_required(&self) -> u16 {
        match self {
            Frame::Defer(_) | Frame::Touch(_) => MINOR_QUEUE_FEATURES,
            Frame::Hello(hello) if hello.vhost != DEFAULT_VHOST => MINOR_VHOSTS,
            Frame::Request { request, .. } => request.minor_required(),
            Frame::Response { response, .. } => response.minor_required(),
            _ => 0,
        }
    }

    /// How many publish sequence numbers this frame consumes (1 per published message).
    pub fn n_publishes(&self) -> u64 {
        match self {
            Frame::Publish(_) => 1,
            Frame::PublishBatch(batch) => batch.messages.len() as u64,
            _ => 0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake and connection control.

/// Client credentials: a mechanism name and its opaque data (SASL-like).
///
/// Mechanisms: `"ANONYMOUS"` (empty data), `"PLAIN"` (data = `\0user\0password`, UTF-8).
/// The server may refuse any mechanism with `Close { code: AccessRefused }`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// Mechanism name, upper case.
    pub mechanism: String,
    /// Mechanism-specific bytes.
    pub data: Bytes,
}

/// First frame from the client.
///
/// Encoded by hand in `codec.rs`: the 1.0 fields, then `vhost` as one trailing string only when
/// it is not [`DEFAULT_VHOST`], so a `Hello` for `/` is byte for byte the 1.0 `Hello` and an
/// old client's `Hello` decodes with `vhost = "/"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Free-form client name for logs and management (e.g. `"wharf-client/0.1 orders-svc"`).
    pub client_name: String,
    /// The client's credentials.
    pub credentials: Credentials,
    /// Largest frame the client accepts; the server sends no larger frame. At least
    /// [`FRAME_BYTES_MAX_FLOOR`](crate::limits::FRAME_BYTES_MAX_FLOOR).
    pub frame_bytes_max: u32,
    /// Heartbeat interval the client asks for; 0 = accept the server's.
    pub heartbeat_ms: u32,
    /// Virtual host to connect to (protocol 1.3); [`DEFAULT_VHOST`] (`/`) unless the client
    /// names another. Non-empty, at most `NAME_BYTES_MAX` bytes, no control characters.
    pub vhost: String,
}

impl Default for Hello {
    fn default() -> Hello {
        Hello {
            client_name: String::new(),
            credentials: Credentials::default(),
            frame_bytes_max: 0,
            heartbeat_ms: 0,
            vhost: DEFAULT_VHOST.to_owned(),
        }
    }
}

/// Limits the server enforces on this connection, announced in [`HelloOk`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerLimits {
    /// Largest frame the server accepts (the length prefix, excluding itself).
    pub frame_bytes_max: u32,
    /// Negotiated heartbeat interval; 0 = heartbeats disabled.
    pub heartbeat_ms: u32,
    /// Most publishes the client may have unconfirmed; beyond it the server stops reading.
    pub publishes_in_flight_max: u32,
    /// Most messages in a `PublishBatch`.
    pub batch_messages_max: u32,
}

impl Default for ServerLimits {
    fn default() -> ServerLimits {
        ServerLimits {
            frame_bytes_max: crate::limits::FRAME_BYTES_MAX,
            heartbeat_ms: crate::limits::HEARTBEAT_MS,
            publishes_in_flight_max: crate::limits::PUBLISHES_IN_FLIGHT_MAX,
            batch_messages_max: crate::limits::BATCH_MESSAGES_MAX,
        }
    }
}

/// The server accepted the `Hello`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloOk {
    /// Server software name and version, e.g. `"wharf/0.1.0"`.
    pub server_version: String,
    /// Protocol minor version the server speaks (the major matched in the preamble). Each side
    /// only sends what `min(own minor, peer minor)` defines.
    pub protocol_minor: u16,
    /// The connection's limits.
    pub limits: ServerLimits,
}

/// Closes the connection. Layout frozen across major versions (see docs/protocol.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Close {
    /// Why; [`ErrorCode::Normal`] for a requested close.
    pub code: ErrorCode,
    /// Human-readable detail, at most [`REASON_BYTES_MAX`](crate::limits::REASON_BYTES_MAX).
    pub reason: String,
}

// ---------------------------------------------------------------------------------------------
// Requests and responses.

/// Exchange routing algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExchangeKind {
    /// Routes to bindings whose key equals the routing key.
    Direct,
    /// Routes to every binding.
    Fanout,
    /// Routes by dotted pattern (`*` one word, `#` zero or more words).
    Topic,
    /// Routes by message headers against binding arguments (`x-match` = `all` / `any`).
    Headers,
}

/// The destination of a binding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Destination {
    /// Bind a queue.
    Queue(String),
    /// Bind an exchange (exchange-to-exchange routing).
    Exchange(String),
}

/// A binding between a source exchange and a destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// Queue or exchange receiving the routed messages.
    pub destination: Destination,
    /// Exchange the messages are published to.
    pub source: String,
    /// Binding key (direct: exact, topic: pattern, fanout/headers: ignored).
    pub routing_key: String,
    /// Binding arguments (headers exchanges: match headers and `x-match`).
    pub arguments: Table,
}

/// A request; the variant order is the wire tag (append-only).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Tag 0: create a queue, or check it exists with the same flags.
    DeclareQueue {
        /// Queue name; empty = the server generates one (returned in `QueueDeclared`).
        name: String,
        /// Survives a broker restart.
        durable: bool,
        /// Usable only by this connection; deleted when it closes.
        exclusive: bool,
        /// Deleted when its last consumer cancels.
        auto_delete: bool,
        /// Only check existence: `NotFound` if missing, never create.
        passive: bool,
        /// Queue arguments (`x-max-length`, `x-message-ttl`, `x-dead-letter-exchange`, ...).
        arguments: Table,
    },
    /// Tag 1: delete a queue and its messages.
    DeleteQueue {
        /// Queue name.
        name: String,
        /// Fail with `PreconditionFailed` if it has consumers.
        if_unused: bool,
        /// Fail with `PreconditionFailed` if it has messages.
        if_empty: bool,
    },
    /// Tag 2: drop a queue's ready messages (unacked ones stay).
    PurgeQueue {
        /// Queue name.
        name: String,
    },
    /// Tag 3: create an exchange, or check it exists with the same kind and flags.
    DeclareExchange {
        /// Exchange name (not empty; `amq.` and `wharf.` prefixes are reserved).
        name: String,
        /// Routing algorithm.
        kind: ExchangeKind,
        /// Survives a broker restart.
        durable: bool,
        /// Deleted when its last binding is removed.
        auto_delete: bool,
        /// Only reachable from other exchanges, not by publishing.
        internal: bool,
        /// Only check existence.
        passive: bool,
        /// Exchange arguments (e.g. `alternate-exchange`).
        arguments: Table,
    },
    /// Tag 4: delete an exchange and its bindings.
    DeleteExchange {
        /// Exchange name.
        name: String,
        /// Fail with `PreconditionFailed` if it has bindings.
        if_unused: bool,
    },
    /// Tag 5: add a binding (idempotent).
    Bind(Binding),
    /// Tag 6: remove a binding (`NotFound` if absent).
    Unbind(Binding),
    /// Tag 7: start consuming from a queue.
    Subscribe {
        /// Queue name.
        queue: String,
        /// Client-chosen id, unique among this connection's consumers; names the consumer in
        /// deliveries, `Credit` and `Cancel`.
        consumer_tag: u32,
        /// Most unacked deliveries to this consumer; 0 = unlimited.
        prefetch: u32,
        /// Deliveries are settled when sent (no acks; at-most-once).
        auto_ack: bool,
        /// Refuse other consumers on the queue while this one exists.
        exclusive: bool,
        /// Higher-priority consumers are served first.
        priority: i32,
        /// `None`: no credit flow control (only `prefetch` limits). `Some(n)`: start with `n`
        /// credits; each delivery uses one; `Credit` frames add more.
        initial_credit: Option<u32>,
        /// Consumer arguments: `x-ack-timeout` (i64 ms > 0, protocol 1.1): the lease of each
        /// delivery; unknown keys are ignored.
        arguments: Table,
    },
    /// Tag 8: stop a consumer; its unacked deliveries stay unacked until settled or closed.
    Cancel {
        /// The consumer.
        consumer_tag: u32,
    },
    /// Tag 9: a queue's counters.
    QueueStats {
        /// Queue name.
        name: String,
    },
    /// Tag 10: every queue visible to this connection.
    ListQueues,
    /// Tag 11: every exchange.
    ListExchanges,
    /// Tag 12 (protocol 1.1): move dead-lettered messages of a queue back to the queues they
    /// died in.
    Redrive {
        /// The dead-letter queue to take the messages from.
        queue: String,
        /// Most messages to move; 0 = all of its ready dead-lettered messages.
        max: u64,
    },
    /// Tag 13 (protocol 1.1): a queue's counters, including those added in 1.1.
    QueueStatsV2 {
        /// Queue name.
        name: String,
    },
    /// Tag 14 (protocol 1.1): every queue visible to this connection, with the 1.1 counters.
    ListQueuesV2,
    /// Tag 15 (protocol 1.2, administrators): add a user, without permissions.
    AddUser {
        /// User name.
        name: String,
        /// Its password (sent as given: use TLS beyond loopback).
        password: Password,
        /// Its tags (`administrator`, `monitoring`, `management`, `policymaker`).
        tags: Vec<String>,
    },
    /// Tag 16 (protocol 1.2, administrators): delete a user and its permissions.
    DeleteUser {
        /// User name.
        name: String,
    },
    /// Tag 17 (protocol 1.2, administrators): set a user's password.
    ChangePassword {
        /// User name.
        name: String,
        /// The new password.
        password: Password,
    },
    /// Tag 18 (protocol 1.2, administrators): set a user's tags (replacing them).
    SetUserTags {
        /// User name.
        name: String,
        /// The tags.
        tags: Vec<String>,
    },
    /// Tag 19 (protocol 1.2, administrators): every user and its tags.
    ListUsers,
    /// Tag 20 (protocol 1.2, administrators): set a user's permissions in a virtual host.
    SetPermissions(PermissionInfo),
    /// Tag 21 (protocol 1.2, administrators): remove a user's permissions in a virtual host.
    ClearPermissions {
        /// User name.
        user: String,
        /// Virtual host.
        vhost: String,
    },
    /// Tag 22 (protocol 1.2, administrators): the permissions in a virtual host.
    ListPermissions {
        /// Virtual host.
        vhost: String,
    },
    /// Tag 23 (protocol 1.2, administrators): set a user's topic permissions on an exchange.
    SetTopicPermissions(TopicPermissionInfo),
    /// Tag 24 (protocol 1.2, administrators): remove a user's topic permissions.
    ClearTopicPermissions {
        /// User name.
        user: String,
        /// Virtual host.
        vhost: String,
        /// One exchange's; `None`: all of them in the virtual host.
        exchange: Option<String>,
    },
    /// Tag 25 (protocol 1.2, administrators): the topic permissions in a virtual host.
    ListTopicPermissions {
        /// Virtual host.
        vhost: String,
    },
    /// Tag 26 (protocol 1.3, administrators): add a virtual host (`PreconditionFailed` if it
    /// exists).
    AddVhost {
        /// Virtual host name.
        name: String,
        /// Its own limits.
        limits: VhostLimits,
    },
    /// Tag 27 (protocol 1.3, administrators): delete a virtual host, with its queues,
    /// exchanges and permissions.
    DeleteVhost {
        /// Virtual host name.
        name: String,
    },
    /// Tag 28 (protocol 1.3, administrators): every virtual host, its limits and its usage.
    ListVhosts,
    /// Tag 29 (protocol 1.3, administrators): set a virtual host's limits (replacing them).
    SetVhostLimits {
        /// Virtual host name.
        name: String,
        /// The limits; `None` fields lift that limit.
        limits: VhostLimits,
    },
    /// Tag 30 (protocol 1.3, administrators): set a user's own limits, replacing both
    /// (`NotFound` if the user does not exist).
    SetUserLimits {
        /// User name.
        user: String,
        /// The limits; `None` fields lift that limit.
        limits: UserLimits,
    },
    /// Tag 31 (protocol 1.3, administrators): every user and its own limits, sorted by name.
    ListUserLimits,
}

impl Request {
    /// The lowest protocol minor version that defines this request variant.
    pub fn minor_required(&self) -> u16 {
        match self {
            Request::Redrive { .. } | Request::QueueStatsV2 { .. } | Request::ListQueuesV2 => {
                MINOR_QUEUE_FEATURES
            }
            Request::AddVhost { .. }
            | Request::DeleteVhost { .. }
            | Request::ListVhosts
            | Request::SetVhostLimits { .. }
            | Request::SetUserLimits { .. }
            | Request::ListUserLimits => MINOR_VHOSTS,
            request if request.is_admin() => MINOR_ADMIN,
            _ => 0,
        }
    }

    /// Whether this is an administration request (users, their permissions and limits, and
    /// virtual hosts), which needs the `administrator` tag.
    pub fn is_admin(&self) -> bool {
        matches!(
            self,
            Request::AddUser { .. }
                | Request::DeleteUser { .. }
                | Request::ChangePassword { .. }
                | Request::SetUserTags { .. }
                | Request::ListUsers
                | Request::SetPermissions(_)
                | Request::ClearPermissions { .. }
                | Request::ListPermissions { .. }
                | Request::SetTopicPermissions(_)
                | Request::ClearTopicPermissions { .. }
                | Request::ListTopicPermissions { .. }
                | Request::AddVhost { .. }
                | Request::DeleteVhost { .. }
                | Request::ListVhosts
                | Request::SetVhostLimits { .. }
                | Request::SetUserLimits { .. }
                | Request::ListUserLimits
        )
    }
}

/// A password in an administration request: encoded as a string, never shown by `Debug`
/// (a request may be logged or end up in a panic message).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Password(pub String);

impl From<&str> for Password {
    fn from(password: &str) -> Password {
        Password(password.to_owned())
    }
}

impl From<String> for Password {
    fn from(password: String) -> Password {
        Password(password)
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A user and its tags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// User name.
    pub name: String,
    /// Its tags.
    pub tags: Vec<String>,
}

/// A user's permissions in a virtual host: RabbitMQ's three regular expressions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermissionInfo {
    /// User name.
    pub user: String,
    /// Virtual host.
    pub vhost: String,
    /// Resources it may declare and delete.
    pub configure: String,
    /// Resources it may publish to (exchanges) and bind into.
    pub write: String,
    /// Resources it may consume from, purge, and bind from.
    pub read: String,
}

/// A user's topic permissions on a topic exchange of a virtual host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicPermissionInfo {
    /// User name.
    pub user: String,
    /// Virtual host.
    pub vhost: String,
    /// The topic exchange.
    pub exchange: String,
    /// Routing keys it may publish with.
    pub write: String,
    /// Binding keys it may bind with.
    pub read: String,
}

/// A virtual host's own limits (protocol 1.3). `None`: no limit of its own (the broker's
/// limits still apply).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VhostLimits {
    /// Most client connections to the virtual host at once; beyond it a login is refused.
    pub max_connections: Option<u32>,
    /// Most queues in the virtual host; beyond it a declare fails with `ResourceLimit`.
    pub max_queues: Option<u32>,
}

/// A virtual host, its limits and its usage (protocol 1.3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostInfo {
    /// Virtual host name.
    pub name: String,
    /// Its own limits.
    pub limits: VhostLimits,
    /// Client connections to it now.
    pub connections: u32,
    /// Queues in it now.
    pub queues: u32,
}

/// A user's own limits (protocol 1.3, RabbitMQ's user limits). `None`: no limit of its own
/// (the broker's `connections_per_user_max` still applies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UserLimits {
    /// Most connections of the user open at once; beyond it a login is refused.
    pub max_connections: Option<u32>,
    /// Most queues declared by the user that still exist; beyond it a declare of a new queue
    /// fails with `ResourceLimit`.
    pub max_queues: Option<u32>,
}

/// A user and its own limits (protocol 1.3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserLimitsInfo {
    /// User name.
    pub user: String,
    /// Its own limits.
    pub limits: UserLimits,
}

/// A queue's description and counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueInfo {
    /// Queue name.
    pub name: String,
    /// Survives restarts.
    pub durable: bool,
    /// Owned by one connection.
    pub exclusive: bool,
    /// Deleted with its last consumer.
    pub auto_delete: bool,
    /// Messages ready for delivery.
    pub ready: u64,
    /// Messages delivered and not yet settled.
    pub unacked: u64,
    /// Active consumers.
    pub consumers: u32,
}

/// A queue's description and counters as of protocol 1.1: [`QueueInfo`]'s fields, in the same
/// order, then the counters a 1.0 peer cannot read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueInfoV2 {
    /// Queue name.
    pub name: String,
    /// Survives restarts.
    pub durable: bool,
    /// Owned by one connection.
    pub exclusive: bool,
    /// Deleted with its last consumer.
    pub auto_delete: bool,
    /// Messages ready for delivery.
    pub ready: u64,
    /// Messages delivered and not yet settled.
    pub unacked: u64,
    /// Active consumers.
    pub consumers: u32,
    /// Messages waiting for their delay (published with `delay_ms`, deferred, or between two
    /// retries): not ready yet, not counted in `ready`.
    pub delayed: u64,
    /// Body bytes of the ready messages.
    pub ready_bytes: u64,
    /// Messages enqueued since the queue was declared.
    pub published: u64,
    /// Deliveries made (redeliveries included).
    pub delivered: u64,
    /// Deliveries of messages that had been delivered before.
    pub redelivered: u64,
    /// Messages acked.
    pub acked: u64,
    /// Messages that left the queue without an ack (nacked or rejected without requeue,
    /// length limit, delivery limit, retries exhausted), dead-lettered ones included.
    pub dropped: u64,
    /// Messages that expired (per-message or queue TTL), dead-lettered ones included.
    pub expired: u64,
    /// Publishes dropped because their message id was in the queue's dedup window.
    pub duplicates: u64,
}

impl From<QueueInfoV2> for QueueInfo {
    fn from(info: QueueInfoV2) -> QueueInfo {
        QueueInfo {
            name: info.name,
            durable: info.durable,
            exclusive: info.exclusive,
            auto_delete: info.auto_delete,
            ready: info.ready,
            unacked: info.unacked,
            consumers: info.consumers,
        }
    }
}

/// An exchange's description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangeInfo {
    /// Exchange name.
    pub name: String,
    /// Routing algorithm.
    pub kind: ExchangeKind,
    /// Survives restarts.
    pub durable: bool,
}

/// A response; the variant order is the wire tag (append-only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Tag 0: answer to `DeclareQueue`.
    QueueDeclared {
        /// The queue's name (generated if the request's was empty).
        name: String,
        /// Ready messages.
        ready: u64,
        /// Active consumers.
        consumers: u32,
    },
    /// Tag 1: answer to `DeleteQueue`.
    Deleted {
        /// Messages dropped with the queue.
        messages: u64,
    },
    /// Tag 2: answer to `PurgeQueue`.
    Purged {
        /// Messages dropped.
        messages: u64,
    },
    /// Tag 3: answer to `QueueStats`.
    Stats(QueueInfo),
    /// Tag 4: answer to `ListQueues`.
    Queues(#[serde(deserialize_with = "crate::bounded_vec::deserialize")] Vec<QueueInfo>),
    /// Tag 5: answer to `ListExchanges`.
    Exchanges(#[serde(deserialize_with = "crate::bounded_vec::deserialize")] Vec<ExchangeInfo>),
    /// Tag 6: answer to `Subscribe`; deliveries may follow.
    Subscribed {
        /// The consumer's tag.
        consumer_tag: u32,
    },
    /// Tag 7: success without data (`DeclareExchange`, `DeleteExchange`, `Bind`, `Unbind`,
    /// `Cancel`).
    Done,
    /// Tag 8: the request failed; the connection stays open unless `code` says otherwise.
    Error {
        /// Why.
        code: ErrorCode,
        /// Human-readable detail (at most `REASON_BYTES_MAX`).
        message: String,
    },
    /// Tag 9 (protocol 1.1): answer to `Redrive`.
    Redriven {
        /// Messages moved back to the queues they were dead-lettered from.
        moved: u64,
    },
    /// Tag 10 (protocol 1.1): answer to `QueueStatsV2`.
    StatsV2(QueueInfoV2),
    /// Tag 11 (protocol 1.1): answer to `ListQueuesV2`.
    QueuesV2(#[serde(deserialize_with = "crate::bounded_vec::deserialize")] Vec<QueueInfoV2>),
    /// Tag 12 (protocol 1.2): answer to `ListUsers`.
    Users(#[serde(deserialize_with = "crate::bounded_vec::deserialize")] Vec<UserInfo>),
    /// Tag 13 (protocol 1.2): answer to `ListPermissions`.
    Permissions(#[serde(deserialize_with = "crate::bounded_vec::deserialize")] Vec<PermissionInfo>),
    /// Tag 14 (protocol 1.2): answer to `ListTopicPermissions`.
    TopicPermissions(
        #[serde(deserialize_with = "crate::bounded_vec::deserialize")] Vec<TopicPermissionInfo>,
    ),
    /// Tag 15 (protocol 1.3): answer to `ListVhosts`.
    Vhosts(#[serde(deserialize_with = "crate::bounded_vec::deserialize")] Vec<VhostInfo>),
    /// Tag 16 (protocol 1.3): answer to `ListUserLimits`.
    UserLimits(#[serde(deserialize_with = "crate::bounded_vec::deserialize")] Vec<UserLimitsInfo>),
}

impl Response {
    /// The lowest protocol minor version that defines this response variant.
    pub fn minor_required(&self) -> u16 {
        match self {
            Response::Redriven { .. } | Response::StatsV2(_) | Response::QueuesV2(_) => {
                MINOR_QUEUE_FEATURES
            }
            Response::Users(_) | Response::Permissions(_) | Response::TopicPermissions(_) => {
                MINOR_ADMIN
            }
            Response::Vhosts(_) | Response::UserLimits(_) => MINOR_VHOSTS,
            _ => 0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Messages.

/// Publish one message. The server numbers publishes 1, 2, 3, ... per connection in the order
/// it reads them; `Confirm` refers to these numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Publish {
    /// Exchange to publish to; empty = the default exchange (routes to the queue named by the
    /// routing key).
    pub exchange: WireStr,
    /// Routing key.
    pub routing_key: WireStr,
    /// Properties.
    pub properties: Properties,
    /// Body (zero-copy slice of the frame when decoded).
    pub body: Bytes,
}

/// One message of a [`PublishBatch`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchMessage {
    /// Overrides the batch's exchange for this message.
    pub exchange: Option<WireStr>,
    /// Overrides the batch's routing key for this message.
    pub routing_key: Option<WireStr>,
    /// Properties.
    pub properties: Properties,
    /// Body (zero-copy slice of the frame when decoded).
    pub body: Bytes,
}

/// Publish many messages in one frame: the fast path. Message `i` gets sequence number
/// `next + i`; the strings shared by the batch are sent once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishBatch {
    /// Exchange of every message without its own.
    pub exchange: WireStr,
    /// Routing key of every message without its own.
    pub routing_key: WireStr,
    /// The messages, at most [`BATCH_MESSAGES_MAX`](crate::limits::BATCH_MESSAGES_MAX).
    pub messages: Vec<BatchMessage>,
}

impl PublishBatch {
    /// The effective exchange of `message` (its override or the batch's).
    pub fn exchange_of<'a>(&'a self, message: &'a BatchMessage) -> &'a WireStr {
        message.exchange.as_ref().unwrap_or(&self.exchange)
    }

    /// The effective routing key of `message` (its override or the batch's).
    pub fn routing_key_of<'a>(&'a self, message: &'a BatchMessage) -> &'a WireStr {
        message.routing_key.as_ref().unwrap_or(&self.routing_key)
    }
}

// ---------------------------------------------------------------------------------------------
// Confirms.

/// How safe a confirmed publish is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Durability {
    /// Written and fsynced to disk (persistent message in a durable queue).
    Fsynced,
    /// Held in memory only (transient message or non-durable queue): lost on a broker crash.
    InMemory,
    /// Written but not fsynced (server configured with fsync off): lost on a machine crash.
    UnsafeNotSynced,
}

/// The outcome of a range of publishes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConfirmStatus {
    /// The broker took responsibility for the messages.
    Confirmed(Durability),
    /// The broker did not take the messages; the client may retry.
    Refused {
        /// Why (`Backpressure`, `PublishRefused`, `NotFound`, `ResourceLimit`, ...).
        code: ErrorCode,
        /// Human-readable detail.
        reason: String,
    },
    /// Already published (same message id within the dedup window): not stored again.
    Duplicate,
}

/// An inclusive range of publish sequence numbers with one outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmRange {
    /// First sequence number.
    pub first_seq: u64,
    /// Last sequence number (`>= first_seq`).
    pub last_seq: u64,
    /// Outcome of every publish in the range.
    pub status: ConfirmStatus,
}

/// Outcomes of publishes. Every sequence number is confirmed exactly once; ranges may arrive
/// out of order across frames.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirm {
    /// The ranges.
    #[serde(deserialize_with = "crate::bounded_vec::deserialize")]
    pub ranges: Vec<ConfirmRange>,
}

// ---------------------------------------------------------------------------------------------
// Deliveries and settlement.

/// One message delivered to a consumer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Per-connection, strictly increasing, starting at 1; used to settle the delivery.
    pub delivery_tag: u64,
    /// The message was delivered before (to any consumer) and not acked.
    pub redelivered: bool,
    /// How many times the message has been delivered, this one included.
    pub delivery_count: u32,
    /// Exchange the message was published to.
    pub exchange: WireStr,
    /// Routing key it was published with.
    pub routing_key: WireStr,
    /// Properties.
    pub properties: Properties,
    /// Body.
    pub body: Bytes,
}

/// One delivery.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deliver {
    /// The consumer (its tag from `Subscribe`).
    pub consumer_tag: u32,
    /// The delivery.
    pub delivery: Delivery,
}

/// Several deliveries to one consumer, in increasing delivery-tag order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliverBatch {
    /// The consumer.
    pub consumer_tag: u32,
    /// The deliveries; tags strictly increasing (contiguous tags cost one byte each).
    pub deliveries: Vec<Delivery>,
}

/// Ack: the deliveries were processed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The delivery tag.
    pub delivery_tag: u64,
    /// Also ack every outstanding tag below it.
    pub multiple: bool,
}

/// Nack: the deliveries failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nack {
    /// The delivery tag.
    pub delivery_tag: u64,
    /// Also nack every outstanding tag below it.
    pub multiple: bool,
    /// Put the messages back for redelivery; otherwise dead-letter or drop them.
    pub requeue: bool,
}

/// Reject: one delivery failed (a `Nack` without `multiple`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// The delivery tag.
    pub delivery_tag: u64,
    /// Put the message back for redelivery.
    pub requeue: bool,
}

/// An inclusive range of delivery tags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRange {
    /// First tag.
    pub first: u64,
    /// Last tag (`>= first`).
    pub last: u64,
}

/// Ack every tag in the ranges (the batched form of `Ack`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckRanges {
    /// The ranges; every tag in them must be outstanding.
    #[serde(deserialize_with = "crate::bounded_vec::deserialize")]
    pub ranges: Vec<TagRange>,
}

/// Grant a credit-mode consumer `credit` more deliveries (additive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    /// The consumer.
    pub consumer_tag: u32,
    /// Deliveries added to its credit (saturating at `u32::MAX`).
    pub credit: u32,
}

/// Defer (protocol 1.1): the delivery failed for now; requeue its message after `delay_ms`.
///
/// Settles the delivery like a `Reject { requeue: true }`, except that the message becomes
/// ready again only once the delay has passed (flagged redelivered).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Defer {
    /// The delivery tag.
    pub delivery_tag: u64,
    /// Milliseconds until the message is ready again.
    pub delay_ms: u64,
}

/// Touch (protocol 1.1): the delivery is still being processed; its lease (the consumer's
/// `x-ack-timeout`) starts again from now. Does not settle it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Touch {
    /// The delivery tag.
    pub delivery_tag: u64,
}

/// The server cancelled a consumer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerCancelled {
    /// The consumer.
    pub consumer_tag: u32,
    /// Why (e.g. `NotFound` when the queue was deleted).
    pub code: ErrorCode,
    /// Human-readable detail.
    pub reason: String,
}
