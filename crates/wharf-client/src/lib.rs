//! The async (tokio) Rust client for the Wharf message broker.
//!
//! One [`Client`] is one TCP connection, shared by every clone and task. It speaks the wire
//! protocol of `wharf-protocol` (docs/protocol.md): a writer task coalesces every queued frame
//! into one `write`, a reader task dispatches responses, confirms and deliveries.
//!
//! - Topology: [`Client::declare_queue`], [`Client::declare_exchange`], [`Client::bind_queue`],
//!   ... return builders you `.await`.
//! - Publishing: [`Client::publish`] waits for the broker's confirm; a [`Publisher`] pipelines
//!   publishes under a confirm window and sends batches ([`Publisher::publish_batch`]). Single
//!   publishes queued while the connection is busy travel together in one `PublishBatch`
//!   frame (confirms stay per message), and plain acks in one `AckRanges` frame, so a loop of
//!   `publish` or `ack` calls costs about what a batch does; nothing waits to fill a batch.
//! - Consuming: [`Client::consume`] returns a [`Consumer`], a `Stream` of [`Delivery`]s you
//!   ack, nack or reject.
//! - Queue features of protocol 1.1: delayed publishes ([`Message::delay`]), deferred nacks
//!   ([`Delivery::defer`]), leases ([`ConsumeOptions::ack_timeout`], extended automatically
//!   while the application holds a delivery; [`Delivery::in_progress`], [`Delivery::process`]),
//!   dedup ([`ClientError::Duplicate`]), [`Client::redrive`] and [`Client::queue_stats_v2`].
//!   Against a 1.0 server they fail locally with [`ClientError::NotSupported`].
//! - TLS: a `wharfs://` address connects over TLS (rustls), verifying the broker against
//!   [`TlsOptions::ca_file`] or the system's roots; a client certificate may be presented, and
//!   [`Credentials::External`] logs in as its subject.
//! - Administration (protocol 1.2, users with the `administrator` tag): [`Client::add_user`],
//!   [`Client::set_permissions`], [`Client::list_users`] and the rest.
//! - Virtual hosts (protocol 1.3): the address's path names one
//!   (`wharf://user:password@host/staging`, [`ServerAddr::vhost`]) or
//!   [`ClientOptions::vhost`] does; administrators manage them with [`Client::add_vhost`],
//!   [`Client::list_vhosts`], [`Client::set_vhost_limits`] and [`Client::delete_vhost`].
//! - Users' own limits (protocol 1.3, administrators): [`Client::set_user_limits`] and
//!   [`Client::list_user_limits`] (RabbitMQ's `set_user_limits` / `list_user_limits`).
//! - Errors: one [`ClientError`] enum; server errors carry the wire [`ErrorCode`].
//!
//! ```no_run
//! use futures::StreamExt;
//! use wharf_client::{Client, ConsumeOptions, ExchangeKind, Message};
//!
//! # async fn example() -> Result<(), wharf_client::ClientError> {
//! let client = Client::connect("wharf://127.0.0.1:5800").await?;
//!
//! client.declare_exchange("shop", ExchangeKind::Topic).durable(true).await?;
//! client.declare_queue("orders").durable(true).single_active_consumer(true).await?;
//! client.bind_queue("orders", "shop", "order.*").await?;
//!
//! // One publish, confirmed.
//! let durability = client
//!     .publish("shop", "order.created", Message::new("{\"id\":42}").persistent(true))
//!     .await?;
//! println!("stored: {durability:?}");
//!
//! // Pipelined publishes under a confirm window, then a batch.
//! let publisher = client.publisher();
//! let mut tickets = Vec::new();
//! for idx in 0..100 {
//!     tickets.push(publisher.publish("shop", "order.created", Message::new(format!("{idx}"))).await?);
//! }
//! for ticket in tickets {
//!     ticket.await?;
//! }
//! let outcomes = publisher
//!     .publish_batch("shop", "order.paid", vec![Message::new("a"), Message::new("b")])
//!     .await?;
//! assert!(outcomes.iter().all(Result::is_ok));
//!
//! // Consume with manual acks.
//! let mut consumer = client.consume("orders", ConsumeOptions { prefetch: 50, ..Default::default() }).await?;
//! while let Some(delivery) = consumer.next().await {
//!     let delivery = delivery?;
//!     println!("{} {:?}", delivery.routing_key(), delivery.body());
//!     delivery.ack().await?;
//!     # break;
//! }
//! consumer.cancel().await?;
//! client.close().await?;
//! # Ok(()) }
//! ```

mod addr;
mod admin;
mod client;
mod confirms;
mod connection;
mod consumer;
mod error;
pub mod limits;
mod message;
mod options;
mod publisher;
mod tls;

pub use addr::{DEFAULT_PORT, DEFAULT_TLS_PORT, SCHEME, ServerAddr, TLS_SCHEME};
pub use client::{
    Bind, Client, DeclareExchange, DeclareQueue, DeclaredQueue, DeleteExchange, DeleteQueue,
    HeadersMatch, Overflow,
};
pub use consumer::{Consumer, Delivery};
pub use error::ClientError;
pub use message::{IntoValue, Message};
pub use options::{ClientOptions, ConsumeOptions, Credentials, PREFETCH_MAX};
pub use publisher::{PublishTicket, Publisher};
pub use tls::TlsOptions;

/// The protocol crate, for types not re-exported here.
pub use wharf_protocol;
pub use wharf_protocol::{
    Durability, ErrorCode, ExchangeInfo, ExchangeKind, PermissionInfo, Properties, QueueInfo,
    QueueInfoV2, ServerLimits, Table, TableRef, TopicPermissionInfo, UserInfo, UserLimits,
    UserLimitsInfo, Value, ValueRef, VhostInfo, VhostLimits,
};
