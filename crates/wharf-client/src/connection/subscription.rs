//! A consumer as the connection sees it: what the tasks and the consumer's deliveries share
//! about it ([`ConsumerShared`]), the reader's slot for it ([`ConsumerSlot`]), and the batches of
//! deliveries the reader hands it ([`ReceivedBatch`]).
//!
//! The public `Consumer` stream and its `Delivery`s (`consumer.rs`) are built on these and on
//! [`ConnectionShared`](super::ConnectionShared); nothing here names them, so the connection
//! does not depend on `consumer.rs`. The reader sends the wire deliveries as they arrived, and
//! the stream wraps each one in a `Delivery` when the application takes it.

use crate::error::ClientError;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Why a consumer ended; the first reason recorded wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum ConsumerEnd {
    /// The application cancelled or dropped it (recorded when its `Cancel` is queued).
    ByClient = 1,
    /// The server sent `ConsumerCancelled` (its queue was deleted).
    ByServer = 2,
    /// The connection ended.
    ConnectionEnded = 3,
}

/// `ConsumerShared::state` while the consumer is active.
const ACTIVE: u8 = 0;

/// What the connection's tasks, the consumer's stream and its deliveries know about a
/// consumer.
#[derive(Debug)]
pub(crate) struct ConsumerShared {
    pub(crate) consumer_tag: u32,
    pub(crate) auto_ack: bool,
    /// With an ack timeout: how often the lease of a held delivery is extended (half the
    /// timeout).
    pub(crate) lease_interval: Option<Duration>,
    /// `ACTIVE` or a [`ConsumerEnd`]. Once ended, no more `Credit` is sent for the consumer
    /// and its deliveries cannot be settled. Transitions happen under the connection's state
    /// lock, where settlements check it (see `ConnectionShared::send_settlement`).
    state: AtomicU8,
}

impl ConsumerShared {
    pub(crate) fn new(
        consumer_tag: u32,
        auto_ack: bool,
        ack_timeout: Option<Duration>,
    ) -> ConsumerShared {
        ConsumerShared {
            consumer_tag,
            auto_ack,
            lease_interval: ack_timeout.map(|timeout| (timeout / 2).max(Duration::from_millis(1))),
            state: AtomicU8::new(ACTIVE),
        }
    }

    /// Records why the consumer ended, unless it already ended.
    pub(crate) fn mark_ended(&self, end: ConsumerEnd) {
        let _ = self
            .state
            .compare_exchange(ACTIVE, end as u8, Ordering::AcqRel, Ordering::Acquire);
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.state.load(Ordering::Acquire) != ACTIVE
    }

    /// Why a delivery of this consumer can no longer be settled; `None` while it is active.
    pub(crate) fn not_settleable_reason(&self) -> Option<&'static str> {
        match self.state.load(Ordering::Acquire) {
            ACTIVE => None,
            x if x == ConsumerEnd::ByClient as u8 => {
                Some("its consumer was cancelled, so the broker requeued it")
            }
            x if x == ConsumerEnd::ByServer as u8 => {
                Some("the server cancelled its consumer (its queue was deleted)")
            }
            _ => Some("its connection ended, so the broker requeued it"),
        }
    }
}

/// The deliveries of one `Deliver` or `DeliverBatch` frame, as the reader received them.
pub(crate) struct ReceivedBatch {
    pub(crate) deliveries: Vec<wharf_protocol::Delivery>,
    /// When the frame arrived (the deliveries' leases started a little earlier, on the
    /// broker).
    pub(crate) received_at: Instant,
}

/// A consumer as the reader sees it.
pub(crate) struct ConsumerSlot {
    /// Deliveries go to the consumer a frame's worth at a time (one channel operation per
    /// frame, not per message).
    pub(crate) sender: mpsc::UnboundedSender<Result<ReceivedBatch, ClientError>>,
    pub(crate) consumer: Arc<ConsumerShared>,
}
