//! Pipelined publishing: [`Publisher`], [`PublishTicket`] and batches.

use crate::confirms::{Outcome, Waiter};
use crate::connection::{
    BATCH_ENTRY_OVERHEAD_BYTES, BATCH_FRAME_OVERHEAD_BYTES, ConnectionHandle, ConnectionShared,
};
use crate::error::ClientError;
use crate::message::Message;

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{Semaphore, oneshot};
use wharf_protocol::{BatchMessage, Durability, Frame, PublishBatch, WireStr};

/// A pipelining publisher: many publishes in flight, each confirmed later.
///
/// At most `window` publishes from this publisher (and its clones) are unconfirmed at once;
/// [`Publisher::publish`] waits for room, then returns a [`PublishTicket`] that resolves when
/// the broker confirms. The connection's own window (`publishes_in_flight_max` from the
/// server) applies on top. A publisher keeps its connection open, as a
/// [`Client`](crate::Client) clone does.
///
/// ```no_run
/// # async fn example(client: wharf_client::Client) -> Result<(), wharf_client::ClientError> {
/// use wharf_client::Message;
///
/// let publisher = client.publisher();
/// let mut tickets = Vec::new();
/// for idx in 0..1000 {
///     tickets.push(publisher.publish("", "orders", Message::new(format!("order {idx}"))).await?);
/// }
/// for ticket in tickets {
///     ticket.await?; // the broker took responsibility for this message
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Publisher {
    connection: ConnectionHandle,
    window: Arc<Semaphore>,
    window_size: u32,
}

impl Publisher {
    pub(crate) fn new(connection: ConnectionHandle, window_size: u32) -> Publisher {
        let window_size = window_size.max(1);
        Publisher {
            connection,
            window: Arc::new(Semaphore::new(window_size as usize)),
            window_size,
        }
    }

    /// Most unconfirmed publishes of this publisher.
    pub fn window(&self) -> u32 {
        self.window_size
    }

    /// Publishes unconfirmed right now (sent or queued, awaiting their confirm).
    pub fn n_in_flight(&self) -> u32 {
        self.window_size
            - u32::try_from(self.window.available_permits()).unwrap_or(self.window_size)
    }

    /// Queues one publish once the window has room; the ticket resolves at its confirm.
    /// Errors here mean nothing was sent (closed connection, message that cannot be encoded).
    ///
    /// Publishes queued while the connection's writer is busy travel together in one
    /// `PublishBatch` frame, so a loop of `publish` calls costs about what `publish_batch`
    /// does; an idle connection writes a publish at once (nothing waits to fill a batch).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
    ) -> Result<PublishTicket, ClientError> {
        let shared = self.connection.shared();
        let receiver = shared
            .queue_publish(Some(&self.window), exchange, routing_key, message)
            .await?;
        Ok(PublishTicket {
            receiver,
            shared: shared.clone(),
        })
    }

    /// Publishes `messages` to one exchange and routing key in as few `PublishBatch` frames
    /// as the server's limits allow, and waits for every confirm. Returns one outcome per
    /// message, in order. `Err` only if nothing could be sent (the connection is closed).
    pub async fn publish_batch(
        &self,
        exchange: &str,
        routing_key: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Outcome>, ClientError> {
        self.send_batch(
            exchange,
            routing_key,
            messages
                .into_iter()
                .map(|message| (None, message))
                .collect(),
        )
        .await
    }

    /// Like [`Publisher::publish_batch`], each message with its own routing key.
    pub async fn publish_batch_routed(
        &self,
        exchange: &str,
        messages: Vec<(String, Message)>,
    ) -> Result<Vec<Outcome>, ClientError> {
        let routed = messages
            .into_iter()
            .map(|(routing_key, message)| (Some(routing_key), message))
            .collect();
        self.send_batch(exchange, "", routed).await
    }

    /// Waits until none of this publisher's publishes is unconfirmed (publishes started
    /// meanwhile are waited for too). Outcomes are reported by the tickets; this returns the
    /// connection's error if it ended.
    pub async fn wait_confirms(&self) -> Result<(), ClientError> {
        let shared = self.connection.shared();
        let all = self
            .window
            .acquire_many(self.window_size)
            .await
            .map_err(|_| shared.terminal_error())?;
        drop(all);
        if shared.is_ended() {
            return Err(shared.terminal_error());
        }
        Ok(())
    }

    async fn send_batch(
        &self,
        exchange: &str,
        routing_key: &str,
        messages: Vec<(Option<String>, Message)>,
    ) -> Result<Vec<Outcome>, ClientError> {
        let shared = self.connection.shared();
        shared.check_open()?;
        let n_messages = messages.len();
        let mut outcomes: Vec<Option<Outcome>> = (0..n_messages).map(|_| None).collect();
        let mut entries = Vec::with_capacity(n_messages);
        for (message_idx, (routing_key, message)) in messages.into_iter().enumerate() {
            match message.into_wire(shared.protocol_minor) {
                Ok((properties, body)) => {
                    let routing_key = routing_key.map(WireStr::from);
                    entries.push((
                        message_idx,
                        BatchMessage {
                            exchange: None,
                            routing_key,
                            properties,
                            body,
                        },
                    ));
                }
                Err(err) => outcomes[message_idx] = Some(Err(err)),
            }
        }
        let n_per_frame_max = [
            shared.limits.batch_messages_max,
            shared.limits.publishes_in_flight_max,
            self.window_size,
        ]
        .into_iter()
        .min()
        .unwrap_or(1)
        .max(1) as usize;
        let frame_bytes_budget =
            (shared.limits.frame_bytes_max as usize).saturating_sub(BATCH_FRAME_OVERHEAD_BYTES);
        let mut chunks: VecDeque<Vec<(usize, BatchMessage)>> =
            split_batch(entries, n_per_frame_max, frame_bytes_budget);
        let exchange = WireStr::copy_from_str(exchange);
        let routing_key = WireStr::copy_from_str(routing_key);
        let mut in_flight = Vec::new();
        let mut send_error = None;
        while let Some(chunk) = chunks.pop_front() {
            if let Some(err) = &send_error {
                chunk.iter().for_each(|(message_idx, _)| {
                    outcomes[*message_idx] = Some(Err(ClientError::clone(err)))
                });
                continue;
            }
            let (indexes, batch_messages): (Vec<usize>, Vec<BatchMessage>) =
                chunk.into_iter().unzip();
            let frame = Frame::PublishBatch(PublishBatch {
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
                messages: batch_messages,
            });
            let bytes = match shared.encode_publish_frame(&frame) {
                Ok(chunks) => chunks,
                Err(err) => {
                    let Frame::PublishBatch(batch) = frame else {
                        unreachable!("built above")
                    };
                    if indexes.len() > 1 {
                        // The size estimate was short: halve and retry.
                        let mut entries: Vec<(usize, BatchMessage)> =
                            indexes.into_iter().zip(batch.messages).collect();
                        let back = entries.split_off(entries.len() / 2);
                        chunks.push_front(back);
                        chunks.push_front(entries);
                    } else {
                        outcomes[indexes[0]] = Some(Err(err));
                    }
                    continue;
                }
            };
            let n_chunk =
                u32::try_from(indexes.len()).expect("chunk length bounded by a u32 limit");
            let sent = async {
                let own = self
                    .window
                    .clone()
                    .acquire_many_owned(n_chunk)
                    .await
                    .map_err(|_| shared.terminal_error())?;
                let connection = shared
                    .publish_window
                    .clone()
                    .acquire_many_owned(n_chunk)
                    .await
                    .map_err(|_| shared.terminal_error())?;
                let (sender, receiver) = oneshot::channel();
                shared
                    .send_publish(
                        bytes,
                        indexes.len(),
                        Waiter::Many(sender),
                        vec![own, connection],
                    )
                    .await?;
                Ok::<_, ClientError>(receiver)
            }
            .await;
            match sent {
                Ok(receiver) => in_flight.push((indexes, receiver)),
                Err(err) => {
                    if in_flight.is_empty() && outcomes.iter().all(Option::is_none) {
                        return Err(err);
                    }
                    indexes
                        .iter()
                        .for_each(|message_idx| outcomes[*message_idx] = Some(Err(err.clone())));
                    send_error = Some(err);
                }
            }
        }
        for (indexes, receiver) in in_flight {
            match receiver.await {
                Ok(frame_outcomes) => {
                    for (message_idx, outcome) in indexes.into_iter().zip(frame_outcomes) {
                        outcomes[message_idx] = Some(outcome);
                    }
                }
                Err(_) => {
                    let err = shared.terminal_error();
                    indexes
                        .into_iter()
                        .for_each(|message_idx| outcomes[message_idx] = Some(Err(err.clone())));
                }
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|outcome| outcome.expect("every message has an outcome"))
            .collect())
    }
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("window", &self.window_size)
            .field("in_flight", &self.n_in_flight())
            .finish()
    }
}

/// Estimated encoded size of a batch entry (an over-estimate; encoding has the last word).
fn entry_bytes_estimate(message: &BatchMessage) -> usize {
    let overrides = [&message.routing_key, &message.exchange]
        .into_iter()
        .map(|text| text.as_ref().map_or(0, |text| text.len() + 5))
        .sum::<usize>();
    message.body.len()
        + message.properties.as_bytes().len()
        + overrides
        + BATCH_ENTRY_OVERHEAD_BYTES
}

/// Splits messages, in order, into frames of at most `n_per_frame_max` messages and about
/// `frame_bytes_budget` bytes (a message larger than the budget gets a frame of its own).
fn split_batch<T>(
    entries: Vec<(T, BatchMessage)>,
    n_per_frame_max: usize,
    frame_bytes_budget: usize,
) -> VecDeque<Vec<(T, BatchMessage)>> {
    assert!(n_per_frame_max >= 1);
    // Find where frames start first, then cut from the back: the common single-frame batch
    // is handed on as it is (no element moved), and a longer one moves each element once.
    let mut starts = Vec::new();
    let (mut chunk_len, mut chunk_bytes) = (0usize, 0usize);
    for (idx, (_, message)) in entries.iter().enumerate() {
        let message_bytes = entry_bytes_estimate(message);
        if chunk_len > 0
            && (chunk_len == n_per_frame_max || chunk_bytes + message_bytes > frame_bytes_budget)
        {
            starts.push(idx);
            chunk_len = 0;
            chunk_bytes = 0;
        }
        chunk_len += 1;
        chunk_bytes += message_bytes;
    }
    let mut chunks = VecDeque::with_capacity(starts.len() + 1);
    let mut rest = entries;
    for start in starts.into_iter().rev() {
        chunks.push_front(rest.split_off(start));
    }
    if !rest.is_empty() {
        chunks.push_front(rest);
    }
    chunks
}

/// Resolves when the broker confirms one publish: `Ok(durability)`, or the refusal /
/// connection error. Dropping it does not cancel the publish.
#[must_use = "a ticket reports whether the broker took the message"]
pub struct PublishTicket {
    receiver: oneshot::Receiver<Outcome>,
    shared: Arc<ConnectionShared>,
}

impl Future for PublishTicket {
    type Output = Result<Durability, ClientError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match Pin::new(&mut this.receiver).poll(cx) {
            Poll::Ready(Ok(outcome)) => Poll::Ready(outcome),
            Poll::Ready(Err(_)) => Poll::Ready(Err(this.shared.terminal_error())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl fmt::Debug for PublishTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishTicket").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body_bytes: usize) -> BatchMessage {
        BatchMessage {
            body: bytes::Bytes::from(vec![0u8; body_bytes]),
            ..BatchMessage::default()
        }
    }

    #[test]
    fn batches_split_by_count_and_keep_order() {
        let entries: Vec<(usize, BatchMessage)> = (0..10).map(|idx| (idx, message(1))).collect();
        let chunks = split_batch(entries, 4, usize::MAX);
        let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
        assert_eq!(sizes, [4, 4, 2]);
        let order: Vec<usize> = chunks.into_iter().flatten().map(|(idx, _)| idx).collect();
        assert_eq!(order, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn batches_split_by_bytes_and_oversized_messages_travel_alone() {
        let budget = 10_000;
        let entries = vec![
            (0, message(4000)),
            (1, message(4000)),
            (2, message(50_000)),
            (3, message(10)),
        ];
        let chunks = split_batch(entries, 100, budget);
        let groups: Vec<Vec<usize>> = chunks
            .into_iter()
            .map(|chunk| chunk.into_iter().map(|(idx, _)| idx).collect())
            .collect();
        assert_eq!(groups, [vec![0, 1], vec![2], vec![3]]);
    }

    #[test]
    fn split_chunks_fit_the_frame_limit_when_encoded() {
        let frame_bytes_max = wharf_protocol::limits::FRAME_BYTES_MAX_FLOOR;
        let entries: Vec<(usize, BatchMessage)> =
            (0..100).map(|idx| (idx, message(3000))).collect();
        let chunks = split_batch(
            entries,
            1000,
            frame_bytes_max as usize - BATCH_FRAME_OVERHEAD_BYTES,
        );
        assert!(chunks.len() > 1);
        for chunk in chunks {
            let frame = Frame::PublishBatch(PublishBatch {
                exchange: WireStr::from("x".repeat(255)),
                routing_key: WireStr::from("k".repeat(255)),
                messages: chunk.into_iter().map(|(_, message)| message).collect(),
            });
            let mut buf = bytes::BytesMut::new();
            wharf_protocol::encode(&frame, frame_bytes_max, &mut buf).expect("chunk fits");
        }
    }
}
