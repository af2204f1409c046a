//! Consuming: [`Consumer`] (a stream of [`Delivery`]) and settling deliveries.
//!
//! Built on the connection (`connection/`), which knows nothing of these types: its reader
//! hands a consumer the wire deliveries of each frame, and the stream wraps each one in a
//! [`Delivery`] when the application takes it.

use crate::connection::{
    Command, ConnectionHandle, ConnectionShared, ConsumerEnd, ConsumerShared, ReceivedBatch,
    Settle, Settlement,
};
use crate::error::ClientError;
use bytes::Bytes;
use futures::Stream;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use wharf_protocol::limits::DURATION_MS_MAX;
use wharf_protocol::{
    Ack, Credit, Defer, Frame, MINOR_QUEUE_FEATURES, Nack, Properties, Reject, Request, TableRef,
    Touch, ValueRef,
};

/// One message delivered to a [`Consumer`].
///
/// Settle it at most once with [`Delivery::ack`], [`Delivery::ack_multiple`],
/// [`Delivery::nack`], [`Delivery::reject`] or [`Delivery::defer`] (unless the consumer is
/// auto-ack), or hand it to [`Delivery::process`]. Settling is fire-and-forget on the wire:
/// awaiting it means the frame is queued for the socket, not that the broker processed it.
/// Deliveries never settled are requeued by the broker when their consumer is cancelled or the
/// connection closes.
///
/// **Leases.** With [`ConsumeOptions::ack_timeout`](crate::ConsumeOptions::ack_timeout), the
/// broker takes back a delivery not settled within the timeout and delivers it again (to
/// this or another consumer). As long as the application holds the `Delivery` (taken from the
/// stream, neither settled nor dropped), the client extends the lease by itself: a background
/// task sends `Touch` for it about every half timeout. A handler that runs for minutes thus
/// keeps its message without calling anything; [`Delivery::in_progress`] extends it at once
/// if needed. Dropping a delivery unsettled stops the extension: the broker redelivers it when
/// the lease lapses. If a lease lapses anyway (the process stalled longer than the timeout),
/// settling the delivery later is accepted by the broker and does nothing: the message belongs
/// to its new delivery.
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
    shared: Arc<ConnectionShared>,
    settled: AtomicBool,
    /// When the frame holding it arrived (its lease started a little earlier, on the broker).
    received_at: Instant,
    /// Its lease is registered with the extender.
    leased: AtomicBool,
}

impl Delivery {
    fn new(
        delivery: wharf_protocol::Delivery,
        consumer: Arc<ConsumerShared>,
        shared: Arc<ConnectionShared>,
        received_at: Instant,
    ) -> Delivery {
        Delivery {
            delivery,
            consumer,
            shared,
            settled: AtomicBool::new(false),
            received_at,
            leased: AtomicBool::new(false),
        }
    }

    /// The application took the delivery from the stream: from now on its lease (if its
    /// consumer has an ack timeout) is extended until it is settled or dropped.
    fn hold_lease(&self) {
        if self.consumer.lease_interval.is_none() || self.consumer.auto_ack {
            return;
        }
        self.leased.store(true, Ordering::Release);
        self.shared
            .hold_lease(&self.consumer, self.delivery.delivery_tag, self.received_at);
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
        // Queued as a bare tag: the writer sends the acks queued together as one `AckRanges`.
        self.settle_with(Settle::One, |_| Ok(Settlement::Ack))
    }

    /// Acks this delivery and every delivery with a smaller tag still outstanding on the
    /// connection (`Ack { multiple: true }`), whichever consumer received it. Returns once the
    /// `Ack` is queued for the socket.
    ///
    /// Only this delivery is marked settled locally: the application must not settle the
    /// others it covers again (the server would close the connection with
    /// `UnknownDeliveryTag`), nor call [`Delivery::in_progress`] on them; their leases are no
    /// longer extended. Deliveries of a consumer cancelled before are not covered: the broker
    /// requeued them when it processed the `Cancel`, which precedes this `Ack`.
    pub async fn ack_multiple(&self) -> Result<(), ClientError> {
        self.settle(Settle::UpTo, |delivery_tag| {
            Frame::Ack(Ack {
                delivery_tag,
                multiple: true,
            })
        })
    }

    /// Nacks the delivery: failed; `requeue` puts the message back for redelivery, otherwise
    /// it is dead-lettered or dropped. Returns once the `Nack` is queued for the socket.
    /// With requeue, a queue with a retry schedule (`x-retry`) holds the message for the next
    /// delay of the schedule, and dead-letters it once the schedule is exhausted.
    pub async fn nack(&self, requeue: bool) -> Result<(), ClientError> {
        self.settle(Settle::One, |delivery_tag| {
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
        self.settle(Settle::One, |delivery_tag| {
            Frame::Reject(Reject {
                delivery_tag,
                requeue: false,
            })
        })
    }

    /// Defers the delivery (protocol 1.1): a nack whose message is requeued only after `delay`
    /// (millisecond precision; flagged redelivered, at the back of its queue; the delivery
    /// limit counts it as a requeue). Meanwhile the queue counts it as `delayed`. Returns once
    /// the `Defer` is queued for the socket. [`ClientError::InvalidArgument`] for a delay over
    /// [`DURATION_MS_MAX`] ms, [`ClientError::NotSupported`] with a 1.0 server; nothing is
    /// sent then and the delivery stays unsettled.
    pub async fn defer(&self, delay: Duration) -> Result<(), ClientError> {
        self.shared
            .require_minor("Delivery::defer", MINOR_QUEUE_FEATURES)?;
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        if delay_ms > DURATION_MS_MAX {
            return Err(ClientError::InvalidArgument {
                what: "defer delay",
                detail: format!("{delay:?} is over the maximum of {DURATION_MS_MAX} ms"),
            });
        }
        self.settle(Settle::One, |delivery_tag| {
            Frame::Defer(Defer {
                delivery_tag,
                delay_ms,
            })
        })
    }

    /// Tells the broker the delivery is still being worked on (protocol 1.1, `Touch`): its
    /// lease restarts from now. Not needed while the application holds the delivery (the
    /// client extends held leases by itself, see the type's docs), but harmless; without an
    /// ack timeout it does nothing. Does not settle. [`ClientError::NotSettleable`] once the
    /// delivery is settled or its consumer ended, [`ClientError::NotSupported`] with a 1.0
    /// server.
    pub async fn in_progress(&self) -> Result<(), ClientError> {
        self.shared
            .require_minor("Delivery::in_progress", MINOR_QUEUE_FEATURES)?;
        self.settle(Settle::Touch, |delivery_tag| {
            Frame::Touch(Touch { delivery_tag })
        })
    }

    /// Runs `handler` on the delivery, then settles it by the outcome: `Ok` acks it, `Err`
    /// nacks it with requeue (so a queue's retry schedule, `x-retry`, and delivery limit
    /// apply) and returns the handler's error. While the handler runs, the lease (if the
    /// consumer has an ack timeout) is extended automatically, however long it takes.
    ///
    /// The error type only needs `From<ClientError>` (as `ClientError` itself and
    /// `anyhow::Error` have): a failure to queue the ack is returned through it; a failure to
    /// queue the nack is logged and the handler's error returned.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use wharf_client::{ClientError, ConsumeOptions};
    ///
    /// # async fn example(client: wharf_client::Client) -> Result<(), ClientError> {
    /// let options = ConsumeOptions::default().ack_timeout(Duration::from_secs(30));
    /// let mut consumer = client.consume("reports", options).await?;
    /// while let Some(delivery) = consumer.next().await {
    ///     delivery?
    ///         .process(async |delivery| {
    ///             // Minutes of work on delivery.body(): the lease is extended meanwhile.
    ///             Ok::<_, ClientError>(delivery.body().len())
    ///         })
    ///         .await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn process<T, E>(
        self,
        handler: impl AsyncFnOnce(&Delivery) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<ClientError>,
    {
        match handler(&self).await {
            Ok(value) => {
                self.ack().await?;
                Ok(value)
            }
            Err(err) => {
                if let Err(nack_err) = self.nack(true).await {
                    tracing::warn!(
                        delivery_tag = self.delivery.delivery_tag,
                        "cannot nack a delivery whose handler failed: {nack_err}"
                    );
                }
                Err(err)
            }
        }
    }

    /// Queues the frame built by `frame` (a settlement, or a `Touch`), unless the delivery
    /// cannot be settled (auto-ack, already settled, consumer ended, connection over).
    fn settle(&self, settle: Settle, frame: impl FnOnce(u64) -> Frame) -> Result<(), ClientError> {
        self.settle_with(settle, |delivery_tag| {
            Ok(Settlement::Frame(self.shared.encode(&frame(delivery_tag))?))
        })
    }

    /// [`Delivery::settle`] with what to queue built by `settlement`.
    fn settle_with(
        &self,
        settle: Settle,
        settlement: impl FnOnce(u64) -> Result<Settlement, ClientError>,
    ) -> Result<(), ClientError> {
        let delivery_tag = self.delivery.delivery_tag;
        if self.consumer.auto_ack {
            return Err(ClientError::NotSettleable {
                delivery_tag,
                reason: "it came from an auto-ack consumer",
            });
        }
        let settlement = settlement(delivery_tag)?;
        self.shared.send_settlement(
            &self.consumer,
            delivery_tag,
            &self.settled,
            settlement,
            settle,
        )
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        // Settling removed the lease already; an unsettled delivery given up stops being
        // extended, so the broker redelivers it when its lease lapses. (Only deliveries the
        // application took are leased, and those are never dropped under the state lock, which
        // `release_lease` takes.)
        if self.leased.load(Ordering::Acquire) && !self.settled.load(Ordering::Acquire) {
            self.shared.release_lease(self.delivery.delivery_tag);
        }
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

/// A subscription to a queue: a [`Stream`] of deliveries, from
/// [`Client::consume`](crate::Client::consume).
///
/// The stream yields deliveries in the order the broker sent them. It ends:
/// - with `None` after [`Consumer::cancel`] or [`Client::close`](crate::Client::close);
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
/// connection open, as a [`Client`](crate::Client) clone does.
pub struct Consumer {
    connection: ConnectionHandle,
    consumer: Arc<ConsumerShared>,
    receiver: mpsc::UnboundedReceiver<Result<ReceivedBatch, ClientError>>,
    /// Deliveries received in one batch and not yet taken (taken from the batch in place:
    /// no copy into another buffer), as they came off the wire.
    buffered: std::vec::IntoIter<wharf_protocol::Delivery>,
    /// When the batch in `buffered` arrived.
    buffered_received_at: Instant,
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
        connection: ConnectionHandle,
        consumer: Arc<ConsumerShared>,
        receiver: mpsc::UnboundedReceiver<Result<ReceivedBatch, ClientError>>,
        queue: String,
        prefetch: u32,
    ) -> Consumer {
        Consumer {
            connection,
            consumer,
            receiver,
            buffered: Vec::new().into_iter(),
            buffered_received_at: Instant::now(),
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
        let shared = self.connection.shared().clone();
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
        self.buffered = Vec::new().into_iter();
        self.receiver.close();
        while self.receiver.try_recv().is_ok() {}
    }

    /// The application takes `delivery` from the stream: wrapped in a [`Delivery`] (settled
    /// through the connection's shared state), counted for credit, its lease held.
    fn hand_out(&mut self, delivery: wharf_protocol::Delivery) -> Delivery {
        let delivery = Delivery::new(
            delivery,
            self.consumer.clone(),
            self.connection.shared().clone(),
            self.buffered_received_at,
        );
        self.took_one();
        delivery.hold_lease();
        delivery
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
        let shared = self.connection.shared();
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
        if let Some(delivery) = this.buffered.next() {
            return Poll::Ready(Some(Ok(this.hand_out(delivery))));
        }
        match this.receiver.poll_recv(cx) {
            Poll::Ready(Some(Ok(batch))) => {
                this.buffered = batch.deliveries.into_iter();
                this.buffered_received_at = batch.received_at;
                match this.buffered.next() {
                    Some(delivery) => Poll::Ready(Some(Ok(this.hand_out(delivery)))),
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
        let shared = self.connection.shared().clone();
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
