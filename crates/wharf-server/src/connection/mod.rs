//! One client connection: the handshake (`handshake.rs`), a reader loop (here) that applies
//! what the client sends to the broker, every complete frame in the read buffer as one command
//! batch (`frames.rs`, requests in `requests.rs`), then writes the small outputs of that batch
//! itself; backpressure on the reader (`flow.rs`); confirms and the log's completions
//! (`confirms.rs`). The connection's writer task (`output.rs`) drains the rest of its outbox.

use crate::access::{Access, Resource, Right};
use crate::context::{Context, now_ms};
use crate::convert::{
    PublishNames, bind_target, core_kind, error_code, message_from_wire, queue_info, queue_info_v2,
    table_to_headers, wire_kind,
};
use crate::limits::{
    FLOW_DRAIN_HORIZON, FLOW_RESUME_PERCENT, FLOW_SLOW_BACKOFF, FLOW_WINDOW, OUTBOX_BYTES_MAX,
    READ_BUFFER_BYTES, READY_BYTES_LOW_WATERMARK_PERCENT,
};
use crate::outbox::Outbox;
use crate::output::{Output, write_loop};
use crate::persist::journal::Outcome;
use crate::state::{Published, State};
use crate::transport::{ReadHalf, Stream, WriteHalf};
use crate::writer::Sink;
use bytes::{Buf, BytesMut};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tracing::{debug, info, warn};
use wharf_core::{
    Command, ConnectionId, ConsumerOptions, ConsumerTag, CoreError, Declarer, DeliveryTag,
    ExchangeOptions, Message, QueueFlow, QueueId, QueueOptions, Reply,
};
use wharf_protocol::limits::READ_RESERVE_BYTES_MAX;
use wharf_protocol::{
    Close, Confirm, ConfirmRange, ConfirmStatus, Durability, ErrorCode, ExchangeInfo, Frame,
    HelloOk, Preamble, Request, Response, ServerLimits, decode, encode,
};
use wharf_storage::{Leader, SyncCoverage, WalError};

mod admin;
mod confirms;
mod flow;
mod frames;
mod handshake;
mod requests;

use confirms::{Confirms, Deferred, refused};
use flow::{wait_for_flow, wait_for_memory, wait_for_outbox_room};
use frames::{apply_frames, commit_log};
pub(crate) use handshake::refuse;
use requests::handle_request;

/// What the handshake settled for this connection.
#[derive(Debug)]
struct Negotiated {
    /// Its id, registered with the core (in `vhost`).
    connection: ConnectionId,
    /// The virtual host it works in.
    vhost: Arc<str>,
    /// Who logged in.
    principal: crate::auth::Principal,
    /// What it may do.
    access: Access,
    /// Its place in the user's connection count, given back when the connection ends.
    _user_slot: handshake::UserSlot,
    /// The protocol minor version both sides speak: a frame of a later minor is a violation.
    minor: u16,
    heartbeat: Duration,
    /// Largest frame we may send (the client's limit).
    send_frame_bytes_max: u32,
    /// Largest frame we accept.
    recv_frame_bytes_max: u32,
}

/// Checks a routing key (publish: `Write`) or binding key (bind: `Read`) against the user's
/// topic permissions on `exchange`, if it has some there and the exchange is a topic exchange
/// (the exchange's kind is looked up only then).
fn check_topic(
    state: &State,
    access: &mut Access,
    exchange: &str,
    right: Right,
    key: &str,
) -> Result<(), CoreError> {
    if access.has_topic_permissions(exchange)
        && state
            .broker
            .exchange_info(access.vhost(), exchange)
            .is_some_and(|info| info.kind == wharf_core::ExchangeKind::Topic)
    {
        access.check_topic(exchange, right, key)?;
    }
    Ok(())
}

/// Why a connection's reader stopped.
#[derive(Debug)]
enum Exit {
    /// The client went away (end of stream, or `CloseOk` to our `Close`) or the socket failed.
    Gone,
    /// The client sent `Close`: answered with `CloseOk` once the broker has let the
    /// connection go (its unacked deliveries requeued, its exclusive queues deleted, its
    /// place in its virtual host given back), so a client whose close returned sees that.
    ClosedByClient,
    /// We close with this code and reason.
    Close(ErrorCode, String),
}

/// Serves one accepted socket until it closes.
pub(crate) async fn serve(shared: Arc<Context>, socket: Stream, peer: SocketAddr) {
    if let Err(err) = socket.set_nodelay() {
        debug!(%peer, "set_nodelay failed: {err}");
    }
    let certificate_user = socket.peer_common_name();
    let (mut reader, mut writer) = socket.split();
    let mut buf = BytesMut::with_capacity(READ_BUFFER_BYTES);
    let negotiated = match tokio::time::timeout(
        shared.config.handshake_timeout,
        handshake::handshake(
            &shared,
            peer,
            certificate_user,
            &mut reader,
            &mut writer,
            &mut buf,
        ),
    )
    .await
    {
        Ok(Ok(negotiated)) => negotiated,
        Ok(Err(reason)) => {
            debug!(%peer, "handshake refused: {reason}");
            return;
        }
        Err(_) => {
            debug!(%peer, "handshake timed out");
            return;
        }
    };
    let connection = negotiated.connection;
    let outbox = Arc::new(Output::default());
    *outbox
        .sink
        .try_lock()
        .expect("a new outbox is not shared yet") = Some(Sink::new(
        writer,
        negotiated.send_frame_bytes_max,
        shared.config.slow_consumer_timeout,
    ));
    {
        let mut batch = shared.batch();
        batch.attach(connection, outbox.clone());
        // Nothing to log or deliver yet; nobody waits on a leader.
        let _ = batch.finish().flush(None);
    }
    debug!(%peer, connection = connection.0, user = %negotiated.principal, vhost = %negotiated.vhost, "connection open");
    let writer_task = tokio::spawn(write_loop(outbox.clone(), negotiated.heartbeat));
    let exit = read_loop(&shared, connection, &mut reader, buf, &outbox, negotiated).await;
    {
        // Leaving requeues its unacked deliveries (to other consumers) and may start timers
        // (queues now unused, `x-expires`): a command batch like any other.
        let mut batch = shared.batch();
        batch.close(now_ms(), connection);
        if let Some(leader) = batch.finish().flush(None) {
            leader.commit();
        }
    }
    match &exit {
        Exit::Gone => debug!(connection = connection.0, "connection closed by peer"),
        Exit::ClosedByClient => {
            debug!(connection = connection.0, "connection closed by the client");
            outbox.push_frame(Frame::CloseOk);
        }
        Exit::Close(code, reason) => {
            info!(connection = connection.0, %code, "closing connection: {reason}");
            outbox.push_frame(Frame::Close(Close {
                code: *code,
                reason: reason.clone(),
            }));
        }
    }
    outbox.close();
    if tokio::time::timeout(shared.config.shutdown_timeout, writer_task)
        .await
        .is_err()
    {
        debug!(connection = connection.0, "writer did not finish in time");
    }
}

/// Per-connection reader state.
struct Reader {
    connection: ConnectionId,
    /// The negotiated protocol minor version.
    minor: u16,
    /// Sequence number of the last publish read (publishes are numbered 1, 2, 3, ...).
    publish_seq: u64,
    names: PublishNames,
    published: bool,
    /// Publishes waiting for the log before they are confirmed.
    in_flight: Arc<InFlight>,
    /// Queues the last batch's publishes were routed to (publisher flow control).
    routed: Vec<QueueId>,
    /// Queues whose consumers drained them too slowly to hold this publisher for, and until
    /// when they are not looked at again.
    slow: Vec<(QueueId, Instant)>,
    /// Its user's permissions.
    access: Access,
    /// Its administration requests' task.
    admin: admin::Admin,
    /// Logged in with `ANONYMOUS` (never an administrator, whatever user it acts as).
    anonymous: bool,
}

/// Unconfirmed publishes of one connection: the reader stops reading at the limit.
#[derive(Debug, Default)]
struct InFlight {
    count: AtomicU64,
    confirmed: Notify,
}

/// Frames decoded per lock acquisition at most: bounds the time the broker lock is held.
const FRAMES_PER_BATCH_MAX: usize = 1024;

async fn read_loop(
    shared: &Arc<Context>,
    connection: ConnectionId,
    reader: &mut ReadHalf,
    mut buf: BytesMut,
    outbox: &Arc<Output>,
    negotiated: Negotiated,
) -> Exit {
    let mut state = Reader {
        connection,
        minor: negotiated.minor,
        publish_seq: 0,
        names: PublishNames::default(),
        published: false,
        in_flight: Arc::new(InFlight::default()),
        routed: Vec::new(),
        slow: Vec::new(),
        access: negotiated.access,
        admin: admin::Admin::default(),
        anonymous: negotiated.principal == crate::auth::Principal::Anonymous,
    };
    let in_flight_max = u64::from(shared.config.publishes_in_flight_max);
    let mut frames: Vec<Frame> = Vec::new();
    let mut shutdown = shared.shutdown.clone();
    let dead_after = negotiated.heartbeat * 2;
    // Reading time spent on the frame at the front of the buffer, while it is incomplete.
    let mut frame_reading = Duration::ZERO;
    loop {
        let mut decode_error = None;
        while frames.len() < FRAMES_PER_BATCH_MAX {
            match decode(&mut buf, negotiated.recv_frame_bytes_max) {
                Ok(Some(frame)) => {
                    // The frame at the front is a new one: its reading time starts afresh.
                    frame_reading = Duration::ZERO;
                    frames.push(frame);
                }
                Ok(None) => break,
                Err(err) => {
                    decode_error = Some(Exit::Close(err.error_code(), err.to_string()));
                    break;
                }
            }
        }
        if !frames.is_empty() {
            let (exit, leader) = apply_frames(shared, &mut state, &mut frames, outbox);
            if let Some(leader) = leader {
                commit_log(leader);
            }
            if let Some(exit) = exit {
                return exit;
            }
        }
        if let Some(exit) = decode_error {
            return exit;
        }
        // What is left is a frame on its way in: counted from now, not as it was before the
        // read that completed the frames just applied (a paused reader would otherwise hold
        // a stale count, and the memory alarm with it).
        outbox.set_read_bytes(buf.len());
        if frames.is_empty() && buf.len() >= 4 && !more_complete_frames(&buf) {
            reserve_for_partial_frame(&mut buf);
        } else if more_complete_frames(&buf) {
            continue;
        }
        // Before reading more: room in the outbox, a free in-flight slot, and (after a batch
        // that published) the memory alarm and publisher flow control. None of these waits
        // reads the socket, so a peer that dies meanwhile is noticed through the writer: its
        // next write (a delivery, a heartbeat) fails and ends the writer task.
        let ready_to_read = async {
            wait_for_outbox_room(outbox).await;
            while state.in_flight.count.load(Ordering::Acquire) >= in_flight_max {
                let confirmed = state.in_flight.confirmed.notified();
                if state.in_flight.count.load(Ordering::Acquire) < in_flight_max {
                    break;
                }
                // Confirms notify; the timeout only guards against a missed race.
                let _ = tokio::time::timeout(Duration::from_millis(100), confirmed).await;
            }
            if state.published {
                state.published = false;
                wait_for_memory(shared, &state).await;
                wait_for_flow(shared, &mut state).await;
            }
        };
        tokio::pin!(ready_to_read);
        loop {
            tokio::select! {
                // Usually ready at once: then the writer's end is not even looked at.
                biased;
                () = &mut ready_to_read => break,
                // Nothing queued will drain and nothing more can be answered or delivered: end
                // the connection so that its deliveries return to their queues.
                () = outbox.writer_end.notified() => return writer_ended(outbox),
                // Deliveries the client cannot take are dealt with while it waits too.
                () = outbox.set_aside_wake.notified() => cancel_undeliverable(
                    shared,
                    connection,
                    outbox,
                    negotiated.send_frame_bytes_max,
                ),
            }
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(READ_BUFFER_BYTES);
        }
        // A frame that has begun must arrive whole within `frame_timeout` of reading time
        // (time paused by backpressure above does not count): a peer trickling bytes cannot
        // pin its partial frame's buffer for ever by staying just inside the heartbeat.
        let partial = !buf.is_empty();
        let frame_left = shared.config.frame_timeout.saturating_sub(frame_reading);
        let wait = if partial {
            dead_after.min(frame_left)
        } else {
            dead_after
        };
        // The memory budget counts a frame on its way in (see `State::held_by_connections`).
        outbox.set_read_bytes(buf.len());
        let started = Instant::now();
        let read = tokio::select! {
            read = tokio::time::timeout(wait, reader.read_buf(&mut buf)) => read,
            _ = async { shutdown.wait_for(|stop| *stop).await.is_ok() } => {
                return Exit::Close(ErrorCode::ConnectionForced, "the server is shutting down".to_owned());
            }
            // A failed write ended the writer: whatever the client still sends, nothing can
            // be answered or delivered, so its deliveries go back to their queues now.
            _ = outbox.writer_end.notified() => return writer_ended(outbox),
            // The writer set aside deliveries the client cannot take (reading is cancel-safe:
            // what arrived is in `buf`).
            () = outbox.set_aside_wake.notified() => {
                cancel_undeliverable(shared, connection, outbox, negotiated.send_frame_bytes_max);
                continue;
            }
        };
        if partial {
            frame_reading += started.elapsed();
        }
        match read {
            Err(_) if partial && frame_reading >= shared.config.frame_timeout => {
                return Exit::Close(
                    ErrorCode::FrameTimeout,
                    format!(
                        "a frame begun was not complete after {} ms of reading ({} bytes of it arrived)",
                        shared.config.frame_timeout.as_millis(),
                        buf.len()
                    ),
                );
            }
            Err(_) => {
                return Exit::Close(
                    ErrorCode::HeartbeatTimeout,
                    format!(
                        "nothing received for {} ms (twice the heartbeat interval)",
                        dead_after.as_millis()
                    ),
                );
            }
            Ok(Ok(0)) => return Exit::Gone,
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                debug!(connection = connection.0, "read failed: {err}");
                return Exit::Gone;
            }
        }
    }
}

/// Deliveries the writer could not encode within the client's frame limit (a message larger
/// than the limit the client asked for): their consumers are cancelled, with a
/// `ConsumerCancelled` saying why (`FrameTooLarge`), which returns their unacked messages to
/// the queue for consumers that can take them; a late settle of those is harmless. An
/// auto-ack delivery counts as settled when it is sent, so such a message is gone
/// (at-most-once). Before, the connection was closed without a word and the message went back
/// to the same client for ever.
fn cancel_undeliverable(
    shared: &Context,
    connection: ConnectionId,
    outbox: &Output,
    frame_bytes_max: u32,
) {
    let set_aside = outbox.take_set_aside();
    if set_aside.is_empty() {
        return;
    }
    let mut batch = shared.batch();
    let mut cancelled: Vec<(ConsumerTag, usize)> = Vec::new();
    for delivery in &set_aside {
        // A delivery of a consumer the client cancelled meanwhile went back to its queue with
        // that cancel; if the client subscribed the same tag again, the new consumer is not
        // the one that cannot take it (checked under the same lock as the cancel below).
        let current = batch.broker.delivered_to_current_consumer(
            connection,
            delivery.consumer_tag,
            delivery.delivery_tag,
        );
        if current
            && !cancelled
                .iter()
                .any(|(tag, _)| *tag == delivery.consumer_tag)
        {
            cancelled.push((delivery.consumer_tag, delivery.message.body.len()));
        }
    }
    for (consumer_tag, body_bytes) in cancelled {
        warn!(
            connection = connection.0,
            consumer = consumer_tag.0,
            body_bytes,
            frame_bytes_max,
            "a delivery does not fit the client's frame limit: cancelling its consumer"
        );
        let result = batch.apply(
            now_ms(),
            Command::Cancel {
                connection,
                consumer_tag,
            },
        );
        // Already gone (the client cancelled it meanwhile): nothing to tell.
        if result.is_ok() {
            outbox.push_frame(Frame::ConsumerCancelled(
                wharf_protocol::ConsumerCancelled {
                    consumer_tag: consumer_tag.0,
                    code: ErrorCode::FrameTooLarge,
                    reason: format!(
                        "a message of {body_bytes} bytes does not fit your frame limit of \
                     {frame_bytes_max} bytes; unacknowledged deliveries go back to their \
                     queue for other consumers (an auto-ack delivery was settled when sent \
                     and is gone)"
                    ),
                },
            ));
        }
    }
    if let Some(leader) = batch.finish().flush(None) {
        leader.commit();
    }
}

/// Why the connection ends now that its writer has: the client's fault (a slow consumer,
/// told with `SlowConsumer` if it ever reads again) or the socket's (gone).
fn writer_ended(outbox: &Output) -> Exit {
    match outbox.writer_failure() {
        Some(reason) => Exit::Close(ErrorCode::SlowConsumer, reason),
        None => Exit::Gone,
    }
}

/// Makes room for more of the partial frame at the front of `buf`: what is missing, but at
/// most `READ_RESERVE_BYTES_MAX` (64 KiB) past what was received, so memory follows the bytes
/// a peer sends, not the length it claims (a 16 MiB claim costs nothing until the bytes come;
/// docs/protocol.md). The buffer still grows geometrically as a large frame arrives.
fn reserve_for_partial_frame(buf: &mut BytesMut) {
    let needed = 4 + u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let missing = needed.saturating_sub(buf.len());
    buf.reserve(missing.clamp(READ_BUFFER_BYTES, READ_RESERVE_BYTES_MAX));
}

fn more_complete_frames(buf: &BytesMut) -> bool {
    if buf.len() < 4 {
        return false;
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    buf.len() >= 4 + len
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer claiming a 16 MiB frame and sending 10 bytes of it gets room for 64 KiB more,
    /// not 16 MiB (500 such peers took 11.7 GB of address space before, issue #17); a frame
    /// that keeps arriving still gets room as it comes.
    #[test]
    fn a_claimed_frame_size_reserves_at_most_64_kib_at_a_time() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&(16u32 * 1024 * 1024).to_be_bytes());
        buf.extend_from_slice(&[0; 10]);
        reserve_for_partial_frame(&mut buf);
        assert!(
            buf.capacity() <= buf.len() + 2 * READ_RESERVE_BYTES_MAX,
            "capacity {} for {} bytes received",
            buf.capacity(),
            buf.len()
        );
        assert!(buf.capacity() - buf.len() >= READ_BUFFER_BYTES);
        // A small frame gets exactly what it misses (at least the read buffer's size).
        let mut small = BytesMut::new();
        small.extend_from_slice(&100u32.to_be_bytes());
        reserve_for_partial_frame(&mut small);
        assert!(small.capacity() >= 104);
    }
}
