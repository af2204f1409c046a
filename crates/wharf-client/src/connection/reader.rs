//! The reader task: decodes the server's frames and dispatches them.

use super::handshake::ReadHalf;
use super::{BUFFER_BYTES, Command, ConnectionShared, ConsumerEnd, ReceivedBatch};
use crate::confirms::Completed;
use crate::error::ClientError;
use bytes::BytesMut;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::time::{Instant, timeout};
use wharf_protocol::limits::FRAME_BYTES_MAX_FLOOR;
use wharf_protocol::{Close, ErrorCode, Frame};

impl ConnectionShared {
    /// Reader side: a frame arrived.
    fn dispatch(&self, frame: Frame) -> Flow {
        match frame {
            Frame::Response {
                correlation_id,
                response,
            } => {
                let sender = self.lock().requests.remove(&correlation_id);
                match sender {
                    Some(sender) => {
                        let _ = sender.send(Ok(response));
                    }
                    // The caller timed out, or a fire-and-forget cancel from a dropped consumer.
                    None => tracing::debug!(correlation_id, "response without a waiting request"),
                }
            }
            Frame::Confirm(confirm) => {
                let mut completed = Vec::new();
                let result = {
                    let mut state = self.lock();
                    confirm
                        .ranges
                        .iter()
                        .try_for_each(|range| state.confirms.apply(range, &mut completed))
                };
                completed.into_iter().for_each(Completed::notify);
                if let Err(detail) = result {
                    return self.violation("Confirm", detail);
                }
            }
            Frame::Deliver(deliver) => self.route(deliver.consumer_tag, vec![deliver.delivery]),
            Frame::DeliverBatch(batch) => self.route(batch.consumer_tag, batch.deliveries),
            Frame::Heartbeat => {}
            Frame::ConsumerCancelled(cancelled) => {
                let slot = {
                    let mut state = self.lock();
                    let slot = state.consumers.remove(&cancelled.consumer_tag);
                    if let Some(slot) = &slot {
                        slot.consumer.mark_ended(ConsumerEnd::ByServer);
                    }
                    slot
                };
                if let Some(slot) = slot {
                    let _ = slot.sender.send(Err(ClientError::ConsumerCancelled {
                        consumer_tag: cancelled.consumer_tag,
                        code: cancelled.code,
                        reason: cancelled.reason,
                    }));
                }
            }
            Frame::Close(close) => {
                if let Ok(bytes) = self.encode(&Frame::CloseOk) {
                    let _ = self.commands.send(Command::Frame(bytes));
                }
                let closing = self.lock().closing;
                let err = if closing {
                    ClientError::Closed
                } else {
                    ClientError::ServerClosed {
                        code: close.code,
                        reason: close.reason,
                    }
                };
                self.fail(err, false);
                return Flow::Stop;
            }
            Frame::CloseOk => {
                if !self.lock().closing {
                    return self.violation("CloseOk", "CloseOk without a Close");
                }
                self.fail(ClientError::Closed, false);
                return Flow::Stop;
            }
            other => {
                tracing::warn!(kind = other.kind(), "server sent a client-only frame");
                return self.violation("frame", "kind only a client may send");
            }
        }
        Flow::Continue
    }

    /// Hands a frame's deliveries to their consumer, as received: its stream wraps each one
    /// in a `Delivery` when the application takes it.
    fn route(&self, consumer_tag: u32, deliveries: Vec<wharf_protocol::Delivery>) {
        let state = self.lock();
        let Some(slot) = state.consumers.get(&consumer_tag) else {
            tracing::debug!(
                consumer_tag,
                "deliveries for an unknown or cancelled consumer dropped"
            );
            return;
        };
        let batch = ReceivedBatch {
            deliveries,
            received_at: Instant::now(),
        };
        // Unbounded, yet bounded by the consumer's prefetch / credit window: the server never
        // sends more than the window, so the reader never waits on a slow consumer. If the
        // consumer was dropped, its `Cancel` is in flight and the server requeues these
        // deliveries when it processes it: dropping them here is all there is to do.
        let _ = slot.sender.send(Ok(batch));
    }

    /// The server broke the protocol: tell it and end the connection.
    fn violation(&self, frame: &'static str, detail: &'static str) -> Flow {
        tracing::warn!(frame, detail, "protocol violation by the server");
        let close = Frame::Close(Close {
            code: ErrorCode::ProtocolViolation,
            reason: detail.to_owned(),
        });
        if let Ok(bytes) = self.encode(&close) {
            let _ = self.commands.send(Command::Frame(bytes));
        }
        self.fail(
            ClientError::Protocol(Arc::new(wharf_protocol::Error::Malformed { frame, detail })),
            false,
        );
        Flow::Stop
    }
}

/// Whether the reader continues.
enum Flow {
    Continue,
    Stop,
}

/// Makes room for the rest of the frame whose start is in `buf`, if its length is within the
/// limit (`decode` refuses it otherwise), so that a large `DeliverBatch` arrives in place:
/// `decode` alone grows the buffer 64 KiB at a time (it must not trust a peer's length), which
/// reallocates and copies a 256 KiB frame twice over. The server is the only peer here.
fn reserve_whole_frame(buf: &mut BytesMut, frame_bytes_max: u32) {
    let Some(prefix) = buf.get(..4) else {
        return;
    };
    let frame_bytes = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    if frame_bytes <= frame_bytes_max {
        buf.reserve((4 + frame_bytes as usize).saturating_sub(buf.len()));
    }
}

pub(super) async fn run_reader(
    shared: Arc<ConnectionShared>,
    mut read: ReadHalf,
    mut buf: BytesMut,
    heartbeat: Option<Duration>,
) {
    let mut stop = shared.hard_shutdown.subscribe();
    let frame_bytes_max = shared.options.frame_bytes_max.max(FRAME_BYTES_MAX_FLOOR);
    // "Dead" means nothing read for twice the heartbeat interval; each read of any bytes counts.
    let dead_after = heartbeat.map(|interval| interval * 2);
    loop {
        let next = async {
            loop {
                reserve_whole_frame(&mut buf, frame_bytes_max);
                match wharf_protocol::decode(&mut buf, frame_bytes_max) {
                    Ok(Some(frame)) => return Ok(Some(frame)),
                    Ok(None) => {}
                    Err(err) => return Err(ClientError::Protocol(Arc::new(err))),
                }
                let read_once = read.read_buf(&mut buf);
                let n_read = match dead_after {
                    Some(dead_after) => match timeout(dead_after, read_once).await {
                        Ok(result) => result,
                        Err(_) => {
                            return Err(ClientError::lost(
                                io::ErrorKind::TimedOut,
                                "no frame from the server for twice the heartbeat interval",
                            ));
                        }
                    },
                    None => read_once.await,
                }
                .map_err(|err| ClientError::ConnectionLost(Arc::new(err)))?;
                if n_read == 0 {
                    return Ok(None);
                }
            }
        };
        let frame = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            frame = next => frame,
        };
        match frame {
            Ok(Some(frame)) => {
                if let Flow::Stop = shared.dispatch(frame) {
                    return;
                }
                if buf.capacity() > 4 * BUFFER_BYTES && buf.is_empty() {
                    buf = BytesMut::with_capacity(BUFFER_BYTES);
                }
            }
            Ok(None) => {
                shared.fail(
                    ClientError::lost(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ),
                    true,
                );
                return;
            }
            Err(err @ ClientError::Protocol(_)) => {
                let code = match &err {
                    ClientError::Protocol(protocol) => protocol.error_code(),
                    _ => ErrorCode::ProtocolViolation,
                };
                if let Ok(bytes) = shared.encode(&Frame::Close(Close {
                    code,
                    reason: "undecodable frame".into(),
                })) {
                    let _ = shared.commands.send(Command::Frame(bytes));
                }
                shared.fail(err, false);
                return;
            }
            Err(err) => {
                shared.fail(err, true);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partly_received_frame_gets_room_for_all_of_it_within_the_limit_only() {
        let mut buf = BytesMut::with_capacity(16);
        buf.extend_from_slice(&300_000_u32.to_be_bytes());
        buf.extend_from_slice(&[7; 10]);
        reserve_whole_frame(&mut buf, 1_000_000);
        assert!(buf.capacity() >= 4 + 300_000, "{}", buf.capacity());
        assert_eq!(&buf[4..], &[7; 10], "the received part is kept");

        let mut over = BytesMut::with_capacity(16);
        over.extend_from_slice(&300_000_u32.to_be_bytes());
        reserve_whole_frame(&mut over, 100_000);
        assert!(
            over.capacity() < 100_000,
            "a length over the limit reserves nothing"
        );

        let mut short = BytesMut::from(&[0_u8, 1][..]);
        reserve_whole_frame(&mut short, 1_000_000);
        assert_eq!(&short[..], &[0, 1], "no prefix yet: nothing to do");
    }
}
