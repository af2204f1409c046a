//! Consuming: [`Consumer`] (a stream of [`Delivery`]) and settling deliveries.

use crate::client::Client;
use crate::connection::{Command, Shared};
use crate::error::ClientError;
use bytes::Bytes;
use futures::Stream;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use wharf_protocol::{Ack, Credit, Frame, Nack, Properties, Reject, Request, TableRef, ValueRef};

/// What deliveries and the writer know about a consumer.
#[derive(Debug)]
pub(crate) struct ConsumerShared {
    pub(crate) consumer_tag: u32,
    pub(crate) auto_ack: bool,
    /// Set when the application cancels or drops the consumer, when the server cancels it, or
    /// when the connection ends: no more `Credit` is sent for it.
    cancelled: AtomicBool,
}

impl ConsumerShared {
    pub(crate) fn new(consumer_tag: u32, auto_ack: bool) -> ConsumerShared {
        ConsumerShared {
            consumer_tag,
            auto_ack,
            cancelled: AtomicBool::new(false),
        }
    }

    pub(crate) fn mark_cancelled(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }
}

/// One message delivered to a [`Consumer`].
///
/// Settle it exactly once with [`Delivery::ack`], [`Delivery::nack`] or [`Delivery::reject`]
/// (unless the consumer is auto-ack), also after its consumer was cancelled: per the protocol
/// a `Cancel` leaves unsettled deliveries outstanding. Settling is fire-and-forget on the wire:
/// awaiting it means the frame is queued for the socket, not that the broker processed it.
/// Deliveries never settled are requeued by the broker when the connection closes.
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
        let delivery_tag = self.begin_settle()?;
        self.settle(Frame::Ack(Ack {
            delivery_tag,
            multiple: false,
        }))
    }

    /// Nacks the delivery: failed; `requeue` puts the message back for redelivery, otherwise
    /// it is dead-lettered or dropped. Returns once the `Nack` is queued for the socket.
    pub async fn nack(&self, requeue: bool) -> Result<(), ClientError> {
        let delivery_tag = self.begin_settle()?;
        self.settle(Frame::Nack(Nack {
            delivery_tag,
            multiple: false,
            requeue,
        }))
    }

    /// Rejects the delivery without requeueing it (dead-lettered or dropped); use
    /// [`Delivery::nack`]`(true)` to requeue. Returns once the `Reject` is queued for the socket.
    pub async fn reject(&self) -> Result<(), ClientError> {
        let delivery_tag = self.begin_settle()?;
        self.settle(Frame::Reject(Reject {
            delivery_tag,
            requeue: false,
        }))
    }

    /// Checks the delivery may be settled and marks it settled.
    fn begin_settle(&self) -> Result<u64, ClientError> {
        let delivery_tag = self.delivery.delivery_tag;
        let refuse = |reason| {
            Err(ClientError::NotSettleable {
                delivery_tag,
                reason,
            })
        };
        if self.consumer.auto_ack {
            return refuse("it came from an auto-ack consumer");
        }
        self.shared.check_open()?;
        if self.settled.swap(true, Ordering::AcqRel) {
            return refuse("it was already settled");
        }
        Ok(delivery_tag)
    }

    fn settle(&self, frame: Frame) -> Result<(), ClientError> {
        let bytes = self.shared.encode(&frame)?;
        self.shared.send(Command::Frame(bytes))
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
/// Dropping a `Consumer` cancels it without waiting for the answer. A consumer keeps its
/// connection open (it holds a [`Client`]).
pub struct Consumer {
    client: Client,
    consumer: Arc<ConsumerShared>,
    receiver: mpsc::UnboundedReceiver<Result<Delivery, ClientError>>,
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
        receiver: mpsc::UnboundedReceiver<Result<Delivery, ClientError>>,
        queue: String,
        prefetch: u32,
    ) -> Consumer {
        Consumer {
            client,
            consumer,
            receiver,
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
    /// timeout). Deliveries already taken from the stream stay outstanding and may still be
    /// settled. Deliveries received but not yet taken are requeued (`Reject` with `requeue`),
    /// as are any that arrive before the server processed the `Cancel`.
    ///
    /// Cancelling a consumer the server already cancelled, or whose connection ended, is `Ok`.
    pub async fn cancel(mut self) -> Result<(), ClientError> {
        self.cancel_sent = true;
        let shared = self.client.shared().clone();
        let consumer_tag = self.consumer.consumer_tag;
        if self.consumer.is_cancelled() {
            shared.remove_consumer(consumer_tag);
            return Ok(());
        }
        self.consumer.mark_cancelled();
        let result = shared.request(Request::Cancel { consumer_tag }).await;
        shared.remove_consumer(consumer_tag);
        self.requeue_buffered();
        match result {
            Ok(_) => Ok(()),
            Err(err) if err.is_connection_error() => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Requeues the deliveries received but never taken by the application.
    fn requeue_buffered(&mut self) {
        self.receiver.close();
        while let Ok(item) = self.receiver.try_recv() {
            if let Ok(delivery) = item {
                if !self.consumer.auto_ack && delivery.begin_settle().is_ok() {
                    self.client.shared().requeue(delivery.delivery_tag());
                }
            }
        }
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
        match this.receiver.poll_recv(cx) {
            Poll::Ready(Some(Ok(delivery))) => {
                this.took_one();
                Poll::Ready(Some(Ok(delivery)))
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
        self.consumer.mark_cancelled();
        let shared = self.client.shared().clone();
        if shared.check_open().is_err() {
            return;
        }
        // Buffered deliveries go back now; later ones are requeued by the reader, since the
        // receiver is gone; the consumer is forgotten once the server answered the `Cancel`.
        self.requeue_buffered();
        let consumer_tag = self.consumer.consumer_tag;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let _ = shared.request(Request::Cancel { consumer_tag }).await;
                    shared.remove_consumer(consumer_tag);
                });
            }
            Err(_) => shared.remove_consumer(consumer_tag),
        }
    }
}
