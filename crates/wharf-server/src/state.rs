//! The broker state shared by all connections: the core plus where each connection's output
//! goes. One mutex guards it; it is held only while commands are applied and their effects
//! queued — never across I/O.

use crate::outbox::{Out, Outbox};
use std::collections::HashMap;
use std::sync::Arc;
use tracing::debug;
use wharf_core::{Broker, CancelReason, Command, ConnectionId, CoreError, Effect, Reply};
use wharf_protocol::{ConsumerCancelled, ErrorCode, Frame};

/// The core and the connection registry.
#[derive(Debug, Default)]
pub struct State {
    /// The broker core.
    pub broker: Broker,
    outboxes: HashMap<ConnectionId, Arc<Outbox>>,
    effects: Vec<Effect>,
}

impl State {
    /// Registers a connection and its outbox with the core.
    pub fn open(&mut self, now_ms: u64, connection: ConnectionId, outbox: Arc<Outbox>) {
        self.outboxes.insert(connection, outbox);
        self.broker
            .apply(
                now_ms,
                Command::OpenConnection { connection },
                &mut self.effects,
            )
            .expect("opening a fresh connection cannot fail");
        self.route_effects();
    }

    /// Removes a connection: its consumers go, its unacked messages are requeued (and may be
    /// delivered to others right away), its exclusive queues are deleted.
    pub fn close(&mut self, now_ms: u64, connection: ConnectionId) {
        self.outboxes.remove(&connection);
        match self.broker.apply(
            now_ms,
            Command::CloseConnection { connection },
            &mut self.effects,
        ) {
            Ok(_) | Err(CoreError::NotFound { .. }) => {}
            Err(err) => panic!("closing a connection failed: {err}"),
        }
        self.route_effects();
    }

    /// Number of connections registered.
    pub fn n_connections(&self) -> usize {
        self.outboxes.len()
    }

    /// Applies a command; effects are held until [`State::route_effects`], so the caller can
    /// queue its own reply first (a `Subscribed` response before the first delivery).
    pub fn apply(&mut self, now_ms: u64, command: Command) -> Result<Reply, CoreError> {
        self.broker.apply(now_ms, command, &mut self.effects)
    }

    /// Sends every pending effect to the outbox of the connection it concerns.
    pub fn route_effects(&mut self) {
        for effect in self.effects.drain(..) {
            match effect {
                Effect::Deliver(delivery) => {
                    if let Some(outbox) = self.outboxes.get(&delivery.connection) {
                        outbox.push(Out::Deliver(delivery));
                    }
                }
                Effect::ConsumerCancelled {
                    connection,
                    consumer_tag,
                    reason,
                } => {
                    if let Some(outbox) = self.outboxes.get(&connection) {
                        let reason = match reason {
                            CancelReason::QueueDeleted => "queue deleted",
                        };
                        outbox.push_frame(Frame::ConsumerCancelled(ConsumerCancelled {
                            consumer_tag: consumer_tag.0,
                            code: ErrorCode::NotFound,
                            reason: reason.to_owned(),
                        }));
                    }
                }
                Effect::QueueDeleted { name, durable } => {
                    debug!(queue = %name, durable, "queue deleted")
                }
                Effect::ExchangeDeleted { name } => debug!(exchange = %name, "exchange deleted"),
            }
        }
    }
}
