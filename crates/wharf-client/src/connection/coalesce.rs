//! Coalescing of single publishes: the writer turns the `publish` calls queued since its last
//! write into `PublishBatch` frames.
//!
//! A program that calls `publish` once per message should cost the client and the broker what
//! a batch costs. Each call queues a [`QueuedPublish`] (its message, its confirm waiter and its
//! permits) and returns; the writer, which drains everything queued before each socket write,
//! hands consecutive queued publishes to a [`Coalescer`], which emits one frame per run of them
//! (split at the server's batch and frame limits). Nothing waits to fill a batch: when the
//! connection is idle, the first publish is written at once, alone; under load a batch holds
//! whatever accumulated while the previous write was in the kernel. Confirms stay per message:
//! the frame's waiter is one sender per message ([`Waiter::Each`]).
//!
//! Plain acks are coalesced the same way: the tags acked since the last write become one
//! `AckRanges` frame of exact ranges ([`ack_frame`]).

use crate::confirms::{ConfirmTracker, MessageWaiter, Outcome, Permits, Waiter, merge_permit};
use crate::error::ClientError;
use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use wharf_protocol::{
    Ack, AckRanges, BatchMessage, Frame, Properties, Publish, PublishBatch, TagRange, WireStr,
};

/// Bytes of a `PublishBatch` frame besides its messages (prefix, kind, the two shared names
/// and their lengths, the count and payload length), rounded up: the split budget keeps this
/// much room.
pub(crate) const BATCH_FRAME_OVERHEAD_BYTES: usize = 1024;

/// Bytes of one batch entry besides body, properties and names (varints, option flags),
/// rounded up.
pub(crate) const BATCH_ENTRY_OVERHEAD_BYTES: usize = 64;

/// Upper bound of one message's encoded size inside a `PublishBatch` frame, names included as
/// if each were an override.
pub(crate) fn entry_bytes_max(
    exchange: &str,
    routing_key: &str,
    properties: &Properties,
    body: &Bytes,
) -> usize {
    body.len()
        + properties.as_bytes().len()
        + exchange.len()
        + routing_key.len()
        + BATCH_ENTRY_OVERHEAD_BYTES
}

/// The exchange and routing key of queued publishes.
pub(crate) type Route = (WireStr, WireStr);

/// One message of a `publish` call, queued for the writer.
pub(crate) struct QueuedPublish {
    /// The message's exchange and routing key if they differ from the previous queued
    /// publish's (`None`: the same; the first publish of a connection compares with the
    /// default exchange and an empty key). Queued publishes are sent to the writer in the
    /// order their routes were compared (see `ConnectionShared::queue_publish`), so a loop
    /// publishing to one queue copies and counts references to no name per message.
    pub(crate) route: Option<Route>,
    pub(crate) properties: Properties,
    pub(crate) body: Bytes,
    /// [`entry_bytes_max`] of this message.
    pub(crate) bytes_max: usize,
    pub(crate) waiter: oneshot::Sender<Outcome>,
    /// Confirm-window permits (the publisher's own, if any, and the connection's), released
    /// when its frame is confirmed.
    pub(crate) permits: [Option<OwnedSemaphorePermit>; 2],
    /// Outbound-buffer permit, released once the bytes are written.
    pub(crate) outbound: OwnedSemaphorePermit,
}

/// Limits a coalesced frame stays within.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FrameLimits {
    /// Most messages per frame (the server's `batch_messages_max` and in-flight window, the
    /// protocol's batch limit).
    pub(crate) n_messages_max: usize,
    /// The server's `frame_bytes_max`.
    pub(crate) frame_bytes_max: u32,
}

impl FrameLimits {
    /// Most bytes of entries ([`entry_bytes_max`] summed) per frame.
    pub(crate) fn entries_bytes_max(&self) -> usize {
        (self.frame_bytes_max as usize).saturating_sub(BATCH_FRAME_OVERHEAD_BYTES)
    }
}

/// A frame the coalescer encoded, not yet registered for its confirms.
pub(crate) struct CoalescedFrame {
    /// The encoded frame, for the socket.
    pub(crate) chunks: Vec<Bytes>,
    /// Outbound permits, to hold until the chunks are written.
    pub(crate) outbound: Permits,
    waiters: Vec<MessageWaiter>,
}

impl CoalescedFrame {
    /// Registers the frame's messages for their confirms (their sequence numbers are the next
    /// ones: call this in socket order). Dropping the frame instead fails every message with
    /// the connection's terminal error.
    pub(crate) fn register(&mut self, confirms: &mut ConfirmTracker) {
        let waiters = std::mem::take(&mut self.waiters);
        confirms.register(waiters.len(), Waiter::Each(waiters), Permits::new());
    }
}

/// Collects a run of queued publishes into one frame.
pub(crate) struct Coalescer {
    limits: FrameLimits,
    /// The route of the last publish pushed (what `QueuedPublish::route: None` means).
    current: Route,
    /// Whether `current`'s exchange and routing key differ from `route`'s.
    current_differs: (bool, bool),
    /// The first message's names: the batch's shared names.
    route: Option<Route>,
    messages: Vec<BatchMessage>,
    waiters: Vec<MessageWaiter>,
    /// Outbound permits, merged.
    outbound: Permits,
    bytes: usize,
}

impl Coalescer {
    pub(crate) fn new(limits: FrameLimits) -> Coalescer {
        assert!(limits.n_messages_max >= 1);
        Coalescer {
            limits,
            current: Route::default(),
            current_differs: (false, false),
            route: None,
            messages: Vec::new(),
            waiters: Vec::new(),
            outbound: Vec::new(),
            bytes: 0,
        }
    }

    /// Adds `publish`; first emits what was collected if `publish` would not fit beside it.
    pub(crate) fn push(&mut self, publish: QueuedPublish) -> Option<CoalescedFrame> {
        let full = !self.messages.is_empty()
            && (self.messages.len() >= self.limits.n_messages_max
                || self.bytes + publish.bytes_max > self.limits.entries_bytes_max());
        let emitted = if full { self.emit() } else { None };
        let QueuedPublish {
            route,
            properties,
            body,
            bytes_max,
            waiter,
            permits,
            outbound,
        } = publish;
        self.follow(route);
        let (exchange, routing_key) = match &self.route {
            None => {
                self.route = Some(self.current.clone());
                (None, None)
            }
            Some(_) => (
                self.current_differs.0.then(|| self.current.0.clone()),
                self.current_differs.1.then(|| self.current.1.clone()),
            ),
        };
        self.messages.push(BatchMessage {
            exchange,
            routing_key,
            properties,
            body,
        });
        self.waiters.push(MessageWaiter {
            sender: waiter,
            permits,
        });
        merge_permit(&mut self.outbound, outbound);
        self.bytes += bytes_max;
        emitted
    }

    /// Drops `publish` (its waiter reports the connection's terminal error) but follows its
    /// route, which later publishes may refer to.
    pub(crate) fn skip(&mut self, publish: QueuedPublish) {
        self.follow(publish.route);
    }

    fn follow(&mut self, route: Option<Route>) {
        if let Some(route) = route {
            self.current = route;
            self.current_differs = match &self.route {
                Some((exchange, routing_key)) => {
                    (self.current.0 != *exchange, self.current.1 != *routing_key)
                }
                None => (false, false),
            };
        }
    }

    /// Encodes what was collected as one frame (a `Publish` for a single message); `None` if
    /// nothing was collected. A frame that cannot be encoded (which the size bound and the
    /// checks at `publish` rule out) fails its messages with the encoding error and emits
    /// nothing.
    pub(crate) fn emit(&mut self) -> Option<CoalescedFrame> {
        let (exchange, routing_key) = self.route.take()?;
        self.current_differs = (false, false);
        let mut messages = std::mem::take(&mut self.messages);
        let waiters = std::mem::take(&mut self.waiters);
        let outbound = std::mem::take(&mut self.outbound);
        self.bytes = 0;
        let n_messages = messages.len();
        let frame = if n_messages == 1 {
            let message = messages.pop().expect("one message");
            Frame::Publish(Publish {
                exchange,
                routing_key,
                properties: message.properties,
                body: message.body,
            })
        } else {
            Frame::PublishBatch(PublishBatch {
                exchange,
                routing_key,
                messages,
            })
        };
        let mut chunks = Vec::new();
        if let Err(err) =
            wharf_protocol::encode_vectored(&frame, self.limits.frame_bytes_max, &mut chunks)
        {
            let err = ClientError::encode(err);
            for waiter in waiters {
                let _ = waiter.sender.send(Err(err.clone()));
            }
            return None;
        }
        debug_assert_eq!(waiters.len(), n_messages);
        Some(CoalescedFrame {
            chunks,
            outbound,
            waiters,
        })
    }
}

/// The frame that acks exactly `tags` (any order, each once): an `Ack` for one tag, else an
/// `AckRanges` of the runs of consecutive tags (a range never covers a tag not acked: the
/// server acks every outstanding tag in it). Leaves `tags` empty; `None` if it was.
pub(crate) fn ack_frame(tags: &mut Vec<u64>) -> Option<Frame> {
    let frame = match tags.as_slice() {
        [] => return None,
        [delivery_tag] => Frame::Ack(Ack {
            delivery_tag: *delivery_tag,
            multiple: false,
        }),
        _ => {
            tags.sort_unstable();
            let mut ranges: Vec<TagRange> = Vec::new();
            for &tag in tags.iter() {
                match ranges.last_mut() {
                    Some(range) if range.last.checked_add(1) == Some(tag) => range.last = tag,
                    Some(range) if range.last == tag => {}
                    _ => ranges.push(TagRange {
                        first: tag,
                        last: tag,
                    }),
                }
            }
            Frame::AckRanges(AckRanges { ranges })
        }
    };
    tags.clear();
    Some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::sync::Semaphore;
    use wharf_protocol::limits::FRAME_BYTES_MAX_FLOOR;

    struct Publishes {
        last_route: (String, String),
        window: Arc<Semaphore>,
        outbound: Arc<Semaphore>,
        receivers: Vec<oneshot::Receiver<Outcome>>,
    }

    impl Publishes {
        fn new() -> Publishes {
            Publishes {
                last_route: (String::new(), String::new()),
                window: Arc::new(Semaphore::new(1000)),
                outbound: Arc::new(Semaphore::new(1 << 30)),
                receivers: Vec::new(),
            }
        }

        fn publish(
            &mut self,
            exchange: &str,
            routing_key: &str,
            body_bytes: usize,
        ) -> QueuedPublish {
            let (waiter, receiver) = oneshot::channel();
            self.receivers.push(receiver);
            let body = Bytes::from(vec![7u8; body_bytes]);
            let properties = Properties::default();
            QueuedPublish {
                bytes_max: entry_bytes_max(exchange, routing_key, &properties, &body),
                route: (self.last_route != (exchange.to_owned(), routing_key.to_owned())).then(
                    || {
                        self.last_route = (exchange.to_owned(), routing_key.to_owned());
                        (
                            WireStr::copy_from_str(exchange),
                            WireStr::copy_from_str(routing_key),
                        )
                    },
                ),
                properties,
                body,
                waiter,
                permits: [Some(self.window.clone().try_acquire_owned().unwrap()), None],
                outbound: self
                    .outbound
                    .clone()
                    .try_acquire_many_owned(body_bytes.max(1) as u32)
                    .unwrap(),
            }
        }
    }

    fn decode(chunks: &[Bytes]) -> Frame {
        let bytes: Vec<u8> = chunks
            .iter()
            .flat_map(|chunk| chunk.iter().copied())
            .collect();
        let mut buf = bytes::BytesMut::from(&bytes[..]);
        match wharf_protocol::decode(&mut buf, wharf_protocol::limits::FRAME_BYTES_MAX) {
            Ok(Some(frame)) if buf.is_empty() => frame,
            other => panic!("not one frame: {other:?}"),
        }
    }

    fn limits(n_messages_max: usize) -> FrameLimits {
        FrameLimits {
            n_messages_max,
            frame_bytes_max: FRAME_BYTES_MAX_FLOOR,
        }
    }

    #[test]
    fn a_run_of_publishes_becomes_one_batch_with_overrides_only_where_names_differ() {
        let mut publishes = Publishes::new();
        let mut confirms = ConfirmTracker::new();
        let mut coalescer = Coalescer::new(limits(100));
        for (exchange, routing_key) in [("", "a"), ("", "a"), ("x", "a"), ("", "b")] {
            let publish = publishes.publish(exchange, routing_key, 10);
            assert!(coalescer.push(publish).is_none());
        }
        let mut frame = coalescer.emit().expect("a frame");
        frame.register(&mut confirms);
        assert_eq!(confirms.n_pending(), 1, "one confirm entry for the frame");
        let Frame::PublishBatch(batch) = decode(&frame.chunks) else {
            panic!("a batch")
        };
        let routes: Vec<(&str, &str)> = batch
            .messages
            .iter()
            .map(|message| {
                (
                    batch.exchange_of(message).as_str(),
                    batch.routing_key_of(message).as_str(),
                )
            })
            .collect();
        assert_eq!(routes, [("", "a"), ("", "a"), ("x", "a"), ("", "b")]);
        let overrides: Vec<(bool, bool)> = batch
            .messages
            .iter()
            .map(|message| (message.exchange.is_some(), message.routing_key.is_some()))
            .collect();
        assert_eq!(
            overrides,
            [(false, false), (false, false), (true, false), (false, true)]
        );
        // The window permits are released at the confirm.
        assert_eq!(publishes.window.available_permits(), 996);
        drop(frame);
        assert_eq!(
            publishes.outbound.available_permits(),
            1 << 30,
            "written: released"
        );
        let mut completed = Vec::new();
        confirms
            .apply(
                &wharf_protocol::ConfirmRange {
                    first_seq: 1,
                    last_seq: 4,
                    status: wharf_protocol::ConfirmStatus::Confirmed(
                        wharf_protocol::Durability::InMemory,
                    ),
                },
                &mut completed,
            )
            .expect("valid range");
        completed.into_iter().for_each(|done| done.notify());
        assert_eq!(publishes.window.available_permits(), 1000);
        for mut receiver in publishes.receivers {
            assert!(matches!(
                receiver.try_recv(),
                Ok(Ok(wharf_protocol::Durability::InMemory))
            ));
        }
    }

    #[test]
    fn routes_carry_over_frames_and_skipped_publishes() {
        let mut publishes = Publishes::new();
        let mut coalescer = Coalescer::new(limits(3));
        let mut frames = Vec::new();
        for routing_key in ["q", "q", "q", "r", "r"] {
            let publish = publishes.publish("", routing_key, 1);
            frames.extend(coalescer.push(publish));
        }
        // Dropped after a close, but later publishes still refer to its route.
        coalescer.skip(publishes.publish("x", "s", 1));
        frames.extend(coalescer.push(publishes.publish("x", "s", 1)));
        frames.extend(coalescer.emit());
        let routes: Vec<Vec<(String, String, bool)>> = frames
            .iter()
            .map(|frame| match decode(&frame.chunks) {
                Frame::PublishBatch(batch) => batch
                    .messages
                    .iter()
                    .map(|message| {
                        (
                            batch.exchange_of(message).as_str().to_owned(),
                            batch.routing_key_of(message).as_str().to_owned(),
                            message.exchange.is_some() || message.routing_key.is_some(),
                        )
                    })
                    .collect(),
                Frame::Publish(publish) => vec![(
                    publish.exchange.as_str().to_owned(),
                    publish.routing_key.as_str().to_owned(),
                    false,
                )],
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        let route = |exchange: &str, routing_key: &str, overridden: bool| {
            (exchange.to_owned(), routing_key.to_owned(), overridden)
        };
        assert_eq!(
            routes,
            [
                vec![route("", "q", false); 3],
                vec![
                    route("", "r", false),
                    route("", "r", false),
                    route("x", "s", true)
                ],
            ]
        );
    }

    #[test]
    fn acks_become_exact_ranges() {
        assert_eq!(ack_frame(&mut Vec::new()), None);
        let mut tags = vec![7];
        assert_eq!(
            ack_frame(&mut tags),
            Some(Frame::Ack(Ack {
                delivery_tag: 7,
                multiple: false
            }))
        );
        assert!(tags.is_empty());
        // 4 is outstanding but not acked: no range may cover it.
        let mut tags = vec![3, 1, 2, 5, 6, 9, u64::MAX];
        let range = |first, last| TagRange { first, last };
        assert_eq!(
            ack_frame(&mut tags),
            Some(Frame::AckRanges(AckRanges {
                ranges: vec![
                    range(1, 3),
                    range(5, 6),
                    range(9, 9),
                    range(u64::MAX, u64::MAX)
                ]
            }))
        );
    }

    #[test]
    fn one_publish_is_a_plain_publish_frame() {
        let mut publishes = Publishes::new();
        let mut coalescer = Coalescer::new(limits(100));
        assert!(coalescer.emit().is_none(), "nothing collected");
        let publish = publishes.publish("", "q", 3);
        assert!(coalescer.push(publish).is_none());
        let frame = coalescer.emit().expect("a frame");
        let Frame::Publish(publish) = decode(&frame.chunks) else {
            panic!("a publish")
        };
        assert_eq!(publish.routing_key.as_str(), "q");
        assert_eq!(&publish.body[..], &[7u8; 3]);
    }

    #[test]
    fn frames_split_at_the_message_count_and_byte_limits() {
        let mut publishes = Publishes::new();
        let mut coalescer = Coalescer::new(limits(3));
        let mut frames = Vec::new();
        for _ in 0..7 {
            let publish = publishes.publish("", "q", 1);
            frames.extend(coalescer.push(publish));
        }
        frames.extend(coalescer.emit());
        let sizes: Vec<usize> = frames
            .iter()
            .map(|frame| match decode(&frame.chunks) {
                Frame::PublishBatch(batch) => batch.messages.len(),
                Frame::Publish(_) => 1,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(sizes, [3, 3, 1]);

        // Bodies of a third of the frame limit: two per frame at most.
        let mut coalescer = Coalescer::new(limits(1000));
        let body_bytes = FRAME_BYTES_MAX_FLOOR as usize / 3;
        let mut frames = Vec::new();
        for _ in 0..5 {
            let publish = publishes.publish("", "q", body_bytes);
            frames.extend(coalescer.push(publish));
        }
        frames.extend(coalescer.emit());
        assert_eq!(frames.len(), 3);
        for frame in &frames {
            let bytes: usize = frame.chunks.iter().map(Bytes::len).sum();
            assert!(bytes <= FRAME_BYTES_MAX_FLOOR as usize + 4);
        }
    }

    #[test]
    fn a_frame_that_cannot_be_encoded_fails_its_messages_and_frees_their_permits() {
        let mut publishes = Publishes::new();
        // A frame limit below the message's size: only the encoder's own check stops it (the
        // checks at `publish` send such a message on its own path instead).
        let mut coalescer = Coalescer::new(FrameLimits {
            n_messages_max: 10,
            frame_bytes_max: 100,
        });
        let publish = publishes.publish("", "q", 200);
        assert!(coalescer.push(publish).is_none());
        assert!(coalescer.emit().is_none());
        assert_eq!(
            publishes.window.available_permits(),
            1000,
            "permits released"
        );
        assert_eq!(publishes.outbound.available_permits(), 1 << 30);
        for mut receiver in publishes.receivers {
            assert!(matches!(
                receiver.try_recv(),
                Ok(Err(ClientError::Encode(_)))
            ));
        }
    }
}
