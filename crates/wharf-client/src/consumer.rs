//! Consuming: [`Consumer`] (a stream of [`Delivery`]) and settling deliveries.

use crate::client::Client;
use crate::connection::{Command, Shared};
use crate::error::ClientError;
use bytes::Bytes;
use futures::Stream;
use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use wharf_protocol::{Ack, Credit, Frame, Nack, Properties, Reject, Request, TableRef, ValueRef};

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

/// What deliveries and the writer know about a consumer.
#[derive(Debug)]
pub(crate) struct ConsumerShared {
    pub(crate) consumer_tag: u32,
    pub(crate) auto_ack: bool,
    /// `ACTIVE` or a [`ConsumerEnd`]. Once ended, no more `Credit` is sent for the consumer
    /// and its deliveries cannot be settled. Transitions happen under the connection's state
    /// lock, where settlements check it (see `Shared::send_settlement`).
    state: AtomicU8,
}

impl ConsumerShared {
    pub(crate) fn new(consumer_tag: u32, auto_ack: bool) -> ConsumerShared {
        ConsumerShared {
            consumer_tag,
            auto_ack,
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

/// One message delivered to a [`Consumer`].
///
/// Settle it at most once with [`Delivery::ack`], [`Delivery::ack_multiple`],
/// [`Delivery::nack`] or [`Delivery::reject`] (unless the consumer is auto-ack). Settling is
/// fire-and-forget on the wire: awaiting it means the frame is queued for the socket, not that
/// the broker processed it. Deliveries never settled are requeued by the broker when their
/// consumer is cancelled or the connection closes.
///
/// Once its consumer has ended, a delivery cannot be settled: settling returns
/// [`ClientError::NotSettleable`] and sends nothing. This covers
/// - a consumer the application cancelled or dropped: the broker requeues every unsettled
///   delivery on `Cancel` (flagged `redelivered`), so a later settlement would name a tag that
///   is no longer outstanding and the server would close the connection. The client decides
///   "cancelled" and queues the `Cancel` in one step under its state lock, and a settlement
///   checks and queues under the same lock, so no settlement ever follows the `Cancel`;
/// - a consumer the server cancelled (`ConsumerCancelled`, its queue was deleted): the message
///   is gone with the queue and settling would do nothing on the broker, so the client refuses
///   it the same way rather than send a no-op. (One rule for every ended consumer.)
pub struct Delivery {
    delivery: wharf_protocol::Delivery,
    consumer: Arc<ConsumerShared>,
    shared: Arc<Shared>,
    settled: AtomicBool,
}

impl Delivery {
    pub(crate) fn new(
        delivery: wharf_protocol::Delivery,
        consumer: Arc<ConsumerShared>,
        shared: Arc<Shared>,
    ) -> Delivery {
        Delivery {
            delivery,
            consumer,
            shared,
            settled: AtomicBool::new(false),
        }
    }

    /// The message body (shares the received frame's buffer).
    pub fn body(&self) -> &Bytes {
        &self.delivery.body
    }

    /// Exchange the message was published to (empty: the default exchange).
    pub fn exchange(&self) -> &str {
        &self.delivery.exchange
    }

    /// Routing key the message was published with.
    pub fn routing_key(&self) -> &str {
        &self.delivery.routing_key
    }

    /// The message's properties (ids, content type, priority, timestamp, headers; read with
    /// their accessors, e.g. `properties().message_id()`).
    pub fn properties(&self) -> &Properties {
        &self.delivery.properties
    }

    /// The message's application headers (typed; read with [`TableRef::get`]).
    pub fn headers(&self) -> TableRef<'_> {
        self.delivery.properties.headers()
    }

    /// One application header (the first with this key).
    pub fn header(&self, key: &str) -> Option<ValueRef<'_>> {
        self.delivery.properties.header(key)
    }

    /// The message was delivered before and not acked.
    pub fn redelivered(&self) -> bool {
        self.delivery.redelivered
    }

    /// How many times the message has been delivered, this one included.
    pub fn delivery_count(&self) -> u32 {
        self.delivery.delivery_count
    }

    /// The delivery tag: per connection, strictly increasing.
    pub fn delivery_tag(&self) -> u64 {
        self.delivery.delivery_tag
    }

    /// The tag of the consumer that received it.
    pub fn consumer_tag(&self) -> u32 {
        self.consumer.consumer_tag
    }

    /// Acks the delivery: processed, the broker forgets the message. Returns once the `Ack`
    /// is queued for the socket.
    pub async fn ack(&self) -> Result<(), ClientError> {
        self.settle(|delivery_tag| {
            Frame::Ack(Ack {
                delivery_tag,
                multiple: false,
            })
        })
    }

    /// Acks this delivery and every delivery with a smaller tag still outstanding on the
    /// connection (`Ack { multiple: true }`), whichever consumer received it. Returns once the
    /// `Ack` is queued for the socket.
    ///
    /// Only this delivery is marked settled locally: the application must not settle the
    /// others it covers again (the server would close the connection with
    /// `UnknownDeliveryTag`). Deliveries of a consumer cancelled before are not covered: the
    /// broker requeued them when it processed the `Cancel`, which precedes this `Ack`.
    pub async fn ack_multiple(&self) -> Result<(), ClientError> {
        self.settle(|delivery_tag| {
            Frame::Ack(Ack {
                delivery_tag,
                multiple: true,
            })
        })
    }

    /// Nacks the delivery: failed; `requeue` puts the message back for redelivery, otherwise
    /// it is dead-lettered or dropped. Returns once the `Nack` is queued for the socket.
    pub async fn nack(&self, requeue: bool) -> Result<(), ClientError> {
        self.settle(|delivery_tag| {
            Frame::Nack(Nack {
                delivery_tag,
                multiple: false,
                requeue,
            })
        })
    }

    /// Rejects the delivery without requeueing it (dead-lettered or dropped); use
    /// [`Delivery::nack`]`(true)` to requeue. Returns once the `Reject` is queued for the socket.
    pub async fn reject(&self) -> Result<(), ClientError> {
        self.settle(|delivery_tag| {
            Frame::Reject(Reject {
                delivery_tag,
                requeue: false,
            })
        })
    }

    /// Queues the settlement frame built by `frame`, unless the delivery cannot be settled
    /// (auto-ack, already settled, consumer ended, connection over).
    fn settle(&self, frame: impl FnOnce(u64) -> Frame) -> Result<(), ClientError> {
        let delivery_tag = self.delivery.delivery_tag;
        if self.consumer.auto_ack {
            return Err(ClientError::NotSettleable {
                delivery_tag,
                reason: "it came from an auto-ack consumer",
            });
        }
        let bytes = self.shared.encode(&frame(delivery_tag))?;
        self.shared
            .send_settlement(&self.consumer, delivery_tag, &self.settled, bytes)
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("consumer_tag", &self.consumer.consumer_tag)
            .field("delivery_tag", &self.delivery.delivery_tag)
            .field("exchange", &self.delivery.exchange)
            .field("routing_key", &self.delivery.routing_key)
            .field("redelivered", &self.delivery.redelivered)
            .field("body_bytes", &self.delivery.body.len())
            .finish()
    }
}

/// A subscription to a queue: a [`Stream`] of deliveries, from [`Client::consume`].
///
/// The stream yields deliveries in the order the broker sent them. It ends:
/// - with `None` after [`Consumer::cancel`] or [`Client::close`];
/// - with one `Err(ClientError::ConsumerCancelled { .. })` and then `None` when the server
///   cancels the consumer (e.g. its queue was deleted), after the deliveries received before;
/// - with one `Err` carrying the connection error (e.g. `ConnectionLost`) and then `None` when
///   the connection breaks.
///
/// Its buffer is bounded by the prefetch: manual-ack consumers have at most `prefetch`
/// unsettled deliveries, auto-ack consumers get `prefetch` credits that the stream replenishes
/// as the application takes deliveries (in batches of half the prefetch).
///
/// Dropping a `Consumer` cancels it like [`Consumer::cancel`] (the broker requeues its
/// unsettled deliveries, which can no longer be settled) without waiting for the answer.
/// A consumer keeps its
/// connection open (it holds a [`Client`]).
pub struct Consumer {
    client: Client,
    consumer: Arc<ConsumerShared>,
    receiver: mpsc::UnboundedReceiver<Result<Vec<Delivery>, ClientError>>,
    /// Deliveries received in one frame and not yet taken.
    buffered: VecDeque<Delivery>,
    queue: String,
    prefetch: u32,
    /// Auto-ack: deliveries taken since the last `Credit`.
    n_taken: u32,
    /// The stream reported its final error; it only yields `None` from now on.
    ended: bool,
    /// `cancel()` ran (or the consumer is otherwise gone): dropping sends nothing.
    cancel_sent: bool,
}

impl Consumer {
    pub(crate) fn new(
        client: Client,
        consumer: Arc<ConsumerShared>,
        receiver: mpsc::UnboundedReceiver<Result<Vec<Delivery>, ClientError>>,
        queue: String,
        prefetch: u32,
    ) -> Consumer {
        Consumer {
            client,
            consumer,
            receiver,
            buffered: VecDeque::new(),
            queue,
            prefetch,
            n_taken: 0,
            ended: false,
            cancel_sent: false,
        }
    }

    /// The consumer's tag (chosen by the client, unique on its connection).
    pub fn consumer_tag(&self) -> u32 {
        self.consumer.consumer_tag
    }

    /// The queue consumed from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next delivery; `None` once the stream ended (see the type's docs).
    pub async fn next(&mut self) -> Option<Result<Delivery, ClientError>> {
        futures::StreamExt::next(self).await
    }

    /// Cancels the subscription and waits for the server's answer (bounded by the request
    /// timeout). The broker requeues every unsettled delivery of the consumer (flagged
    /// `redelivered`), as a closing connection does: deliveries received but not taken from the
    /// stream are dropped here, and deliveries already taken can no longer be settled (their
    /// `ack` / `nack` / `reject` return [`ClientError::NotSettleable`] and send nothing).
    /// Settle what you processed *before* cancelling.
    ///
    /// Cancelling a consumer the server already cancelled, or whose connection ended, is `Ok`.
    pub async fn cancel(mut self) -> Result<(), ClientError> {
        self.cancel_sent = true;
        self.discard_buffered();
        let shared = self.client.shared().clone();
        let consumer_tag = self.consumer.consumer_tag;
        if self.consumer.is_cancelled() {
            shared.remove_consumer(consumer_tag);
            return Ok(());
        }
        let consumer = self.consumer.clone();
        let result = shared
            .request_with(Request::Cancel { consumer_tag }, || {
                consumer.mark_ended(ConsumerEnd::ByClient)
            })
            .await;
        // Whatever happened, the application gave the consumer up.
        self.consumer.mark_ended(ConsumerEnd::ByClient);
        shared.remove_consumer(consumer_tag);
        match result {
            Ok(_) => Ok(()),
            Err(err) if err.is_connection_error() => Ok(()),
            // The subscription was acknowledged, so only the server can have ended it since
            // (queue deleted while our `Cancel` was on its way).
            Err(err) if err.is_not_found() => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Drops the deliveries received but never taken by the application: the broker requeues
    /// them itself when it processes the `Cancel`.
    fn discard_buffered(&mut self) {
        self.buffered.clear();
        self.receiver.close();
        while self.receiver.try_recv().is_ok() {}
    }

    /// Auto-ack: one more delivery taken; grant credit back in batches of half the window.
    fn took_one(&mut self) {
        if !self.consumer.auto_ack {
            return;
        }
        self.n_taken += 1;
        if self.n_taken < (self.prefetch / 2).max(1) || self.consumer.is_cancelled() {
            return;
        }
        let credit = Frame::Credit(Credit {
            consumer_tag: self.consumer.consumer_tag,
            credit: self.n_taken,
        });
        self.n_taken = 0;
        let shared = self.client.shared();
        if let Ok(bytes) = shared.encode(&credit) {
            // If the connection is over, the stream ends with its error soon enough.
            let _ = shared.send(Command::Frame(bytes));
        }
    }
}

impl Stream for Consumer {
    type Item = Result<Delivery, ClientError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some(delivery) = this.buffered.pop_front() {
            this.took_one();
            return Poll::Ready(Some(Ok(delivery)));
        }
        match this.receiver.poll_recv(cx) {
            Poll::Ready(Some(Ok(batch))) => {
                this.buffered.extend(batch);
                match this.buffered.pop_front() {
                    Some(delivery) => {
                        this.took_one();
                        Poll::Ready(Some(Ok(delivery)))
                    }
                    None => {
                        // An empty frame's worth: nothing to hand out yet.
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                }
            }
            Poll::Ready(Some(Err(err))) => {
                this.ended = true;
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("consumer_tag", &self.consumer.consumer_tag)
            .field("queue", &self.queue)
            .field("prefetch", &self.prefetch)
            .field("auto_ack", &self.consumer.auto_ack)
            .finish()
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if self.cancel_sent || self.consumer.is_cancelled() {
            return;
        }
        self.discard_buffered();
        let shared = self.client.shared().clone();
        let consumer_tag = self.consumer.consumer_tag;
        // Marked and queued now, under the state lock (no runtime needed): from here on the
        // consumer's deliveries cannot be settled. Nobody waits for the answer; deliveries
        // racing the `Cancel` find no consumer and are dropped (the broker requeues them).
        let consumer = self.consumer.clone();
        let _ = shared.start_request(Request::Cancel { consumer_tag }, || {
            consumer.mark_ended(ConsumerEnd::ByClient)
        });
        self.consumer.mark_ended(ConsumerEnd::ByClient);
        shared.remove_consumer(consumer_tag);
    }
}
