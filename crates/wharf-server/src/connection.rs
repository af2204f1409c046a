//! One client connection: the handshake, a reader loop that applies what the client sends to
//! the broker (batching every complete frame in the read buffer under one lock) and then writes
//! the small outputs of that batch itself, and the connection's writer task (`writer.rs`), which
//! drains the rest of its outbox into as few socket writes as it can.

use crate::convert::{PublishNames, error_code, message_from_wire, table_to_headers};
use crate::limits::{
    FLOW_DRAIN_HORIZON, FLOW_RESUME_PERCENT, FLOW_SLOW_BACKOFF, FLOW_WINDOW, OUTBOX_BYTES_MAX,
    READ_BUFFER_BYTES, READY_BYTES_LOW_WATERMARK_PERCENT,
};
use crate::outbox::Outbox;
use crate::persist::journal::Outcome;
use crate::server::{ServerShared, now_ms};
use crate::state::{Published, State};
use crate::writer::{Sink, write_loop};
use bytes::{Buf, BytesMut};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;
use tracing::{debug, info, warn};
use wharf_core::{
    BindTarget, Command, ConnectionId, ConsumerOptions, ConsumerTag, CoreError, DeliveryTag,
    ExchangeOptions, Message, QueueFlow, QueueId, QueueOptions, QueueStats, Reply,
};
use wharf_protocol::limits::DURATION_MS_MAX;
use wharf_protocol::{
    Close, Confirm, ConfirmRange, ConfirmStatus, Destination, Durability, ErrorCode, ExchangeInfo,
    ExchangeKind, Frame, HelloOk, Preamble, QueueInfo, QueueInfoV2, Request, Response,
    ServerLimits, Table, ValueRef, decode, encode,
};
use wharf_storage::{Leader, SyncCoverage, WalError};

/// What the handshake settled for this connection.
#[derive(Debug, Clone, Copy)]
struct Negotiated {
    /// The protocol minor version both sides speak: a frame of a later minor is a violation.
    minor: u16,
    heartbeat: Duration,
    /// Largest frame we may send (the client's limit).
    send_frame_bytes_max: u32,
    /// Largest frame we accept.
    recv_frame_bytes_max: u32,
}

/// Why a connection's reader stopped.
#[derive(Debug)]
enum Exit {
    /// The client closed (Close frame or EOF) or the socket failed.
    Gone,
    /// We close with this code and reason.
    Close(ErrorCode, String),
}

/// Serves one accepted socket until it closes.
pub(crate) async fn serve(shared: Arc<ServerShared>, socket: TcpStream, peer: SocketAddr) {
    if let Err(err) = socket.set_nodelay(true) {
        debug!(%peer, "set_nodelay failed: {err}");
    }
    let (mut reader, mut writer) = socket.into_split();
    let mut buf = BytesMut::with_capacity(READ_BUFFER_BYTES);
    let negotiated = match tokio::time::timeout(
        shared.config.handshake_timeout,
        handshake(&shared, &mut reader, &mut writer, &mut buf),
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
    let connection = ConnectionId(
        shared
            .next_connection
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    );
    let outbox = Arc::new(Outbox::default());
    *outbox
        .sink
        .try_lock()
        .expect("a new outbox is not shared yet") =
        Some(Sink::new(writer, negotiated.send_frame_bytes_max));
    {
        let mut batch = shared.batch();
        batch.open(now_ms(), connection, outbox.clone());
        // Nothing to log or deliver yet; nobody waits on a leader.
        let _ = batch.finish().flush(None);
    }
    debug!(%peer, connection = connection.0, "connection open");
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

/// Sends a `Close` frame (after our preamble has been sent) and shuts the socket.
async fn send_close(writer: &mut OwnedWriteHalf, code: ErrorCode, reason: String) {
    let mut out = BytesMut::new();
    if encode(
        &Frame::Close(Close { code, reason }),
        wharf_protocol::limits::FRAME_BYTES_MAX_FLOOR,
        &mut out,
    )
    .is_ok()
    {
        let _ = writer.write_all(&out).await;
    }
    let _ = writer.shutdown().await;
}

/// The handshake of docs/protocol.md §1: read the client's preamble (wrong magic: close
/// without a word, it is not a Wharf client), answer with ours at once, refuse an unsupported
/// major or a full server with `Close`, then expect `Hello` and answer `HelloOk`.
async fn handshake(
    shared: &ServerShared,
    reader: &mut OwnedReadHalf,
    writer: &mut OwnedWriteHalf,
    buf: &mut BytesMut,
) -> Result<Negotiated, String> {
    let preamble = loop {
        match Preamble::decode(buf) {
            Ok(Some(preamble)) => break preamble,
            Ok(None) => {}
            Err(err) => {
                let _ = writer.shutdown().await;
                return Err(err.to_string());
            }
        }
        if reader.read_buf(buf).await.map_err(|err| err.to_string())? == 0 {
            return Err("closed before the preamble".to_owned());
        }
    };
    buf.advance(Preamble::BYTES);
    writer
        .write_all(&Preamble::CURRENT.encode())
        .await
        .map_err(|err| err.to_string())?;
    if let Err(err) = preamble.check_supported() {
        send_close(writer, ErrorCode::UnsupportedVersion, err.to_string()).await;
        return Err(err.to_string());
    }
    if shared.lock().n_connections() >= shared.config.connections_max {
        let reason = format!(
            "the server has its maximum of {} connections",
            shared.config.connections_max
        );
        send_close(writer, ErrorCode::ResourceLimit, reason.clone()).await;
        return Err(reason);
    }
    let recv_frame_bytes_max = shared.config.frame_bytes_max;
    let hello = loop {
        match decode(buf, recv_frame_bytes_max) {
            Ok(Some(Frame::Hello(hello))) => break hello,
            Ok(Some(other)) => {
                let reason = format!("expected Hello, got frame kind {}", other.kind());
                send_close(writer, ErrorCode::ProtocolViolation, reason.clone()).await;
                return Err(reason);
            }
            Ok(None) => {}
            Err(err) => {
                send_close(writer, err.error_code(), err.to_string()).await;
                return Err(err.to_string());
            }
        }
        if reader.read_buf(buf).await.map_err(|err| err.to_string())? == 0 {
            return Err("closed before Hello".to_owned());
        }
    };
    let server_heartbeat_ms = shared.config.heartbeat.as_millis() as u32;
    let heartbeat_ms = match hello.heartbeat_ms {
        0 => server_heartbeat_ms,
        asked => asked.clamp(100, server_heartbeat_ms.max(100)),
    };
    let send_frame_bytes_max = hello
        .frame_bytes_max
        .max(wharf_protocol::limits::FRAME_BYTES_MAX_FLOOR);
    let limits = ServerLimits {
        frame_bytes_max: recv_frame_bytes_max,
        heartbeat_ms,
        publishes_in_flight_max: shared.config.publishes_in_flight_max,
        ..ServerLimits::default()
    };
    let hello_ok = Frame::HelloOk(HelloOk {
        server_version: format!("wharf/{}", env!("CARGO_PKG_VERSION")),
        protocol_minor: preamble.negotiated_minor(),
        limits,
    });
    let mut out = BytesMut::new();
    encode(&hello_ok, send_frame_bytes_max, &mut out).map_err(|err| err.to_string())?;
    writer
        .write_all(&out)
        .await
        .map_err(|err| err.to_string())?;
    debug!(client = %hello.client_name, mechanism = %hello.credentials.mechanism, "handshake done");
    Ok(Negotiated {
        minor: preamble.negotiated_minor(),
        heartbeat: Duration::from_millis(u64::from(heartbeat_ms)),
        send_frame_bytes_max,
        recv_frame_bytes_max,
    })
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
    shared: &ServerShared,
    connection: ConnectionId,
    reader: &mut OwnedReadHalf,
    mut buf: BytesMut,
    outbox: &Arc<Outbox>,
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
    };
    let in_flight_max = u64::from(shared.config.publishes_in_flight_max);
    let mut frames: Vec<Frame> = Vec::new();
    let mut shutdown = shared.shutdown.clone();
    let dead_after = negotiated.heartbeat * 2;
    loop {
        let mut decode_error = None;
        while frames.len() < FRAMES_PER_BATCH_MAX {
            match decode(&mut buf, negotiated.recv_frame_bytes_max) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(err) => {
                    decode_error = Some(Exit::Close(err.error_code(), err.to_string()));
                    break;
                }
            }
        }
        if !frames.is_empty() {
            let (exit, leader) = process(shared, &mut state, &mut frames, outbox);
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
        if frames.is_empty() && buf.len() >= 4 && !more_complete_frames(&buf) {
            // Make room for the whole frame being received in one go.
            let needed = 4 + u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            buf.reserve(needed.saturating_sub(buf.len()).max(READ_BUFFER_BYTES));
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
                wait_for_memory(shared).await;
                wait_for_flow(shared, &mut state).await;
            }
        };
        tokio::select! {
            // Usually ready at once: then the writer's end is not even looked at.
            biased;
            () = ready_to_read => {}
            // Nothing queued will drain and nothing more can be answered or delivered: end the
            // connection so that its deliveries return to their queues.
            () = outbox.writer_end.notified() => return Exit::Gone,
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(READ_BUFFER_BYTES);
        }
        let read = tokio::select! {
            read = tokio::time::timeout(dead_after, reader.read_buf(&mut buf)) => read,
            _ = async { shutdown.wait_for(|stop| *stop).await.is_ok() } => {
                return Exit::Close(ErrorCode::ConnectionForced, "the server is shutting down".to_owned());
            }
            // A failed write ended the writer: whatever the client still sends, nothing can
            // be answered or delivered, so its deliveries go back to their queues now.
            _ = outbox.writer_end.notified() => return Exit::Gone,
        };
        match read {
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

fn more_complete_frames(buf: &BytesMut) -> bool {
    if buf.len() < 4 {
        return false;
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    buf.len() >= 4 + len
}

/// Waits until this connection's outbox is under its limit.
async fn wait_for_outbox_room(outbox: &Outbox) {
    while outbox.queued_bytes() > OUTBOX_BYTES_MAX {
        let drained = outbox.drained.notified();
        if outbox.queued_bytes() <= OUTBOX_BYTES_MAX {
            break;
        }
        // The writer notifies after every write; the timeout only guards against a missed race.
        let _ = tokio::time::timeout(Duration::from_millis(100), drained).await;
    }
}

/// The memory alarm: while ready bytes across all queues exceed the high watermark, a
/// connection that publishes is not read (its TCP window fills and its client blocks).
async fn wait_for_memory(shared: &ServerShared) {
    let high = shared.config.ready_bytes_high_watermark;
    if shared.lock().broker.ready_bytes_total() <= high {
        return;
    }
    let low = high / 100 * READY_BYTES_LOW_WATERMARK_PERCENT;
    warn!(
        high,
        "memory alarm: ready messages exceed the high watermark; pausing publishers"
    );
    loop {
        let freed = shared.memory_freed.notified();
        if shared.lock().broker.ready_bytes_total() <= low {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), freed).await;
    }
}

/// Queues a reader remembers as slow to drain at most (the oldest is forgotten first).
const SLOW_TRACKED_MAX: usize = 16;

/// Publisher flow control: after a batch that published, if a queue it was routed to holds
/// more than the flow limit (`flow_ready_messages` / `flow_ready_bytes`) and has consumers
/// keeping up with it, the connection is not read (its TCP window fills and its client blocks)
/// until the consumers bring the queue down to `FLOW_RESUME_PERCENT` of the limit. A producer
/// faster than a stream's consumers then runs at their pace with a short backlog instead of
/// filling memory (the bodies stay in cache, the broker's memory is reused; RabbitMQ's credit
/// flow does the same). "Keeping up" is checked every `FLOW_WINDOW`: the consumers must have
/// taken enough to reach the resume level within `FLOW_DRAIN_HORIZON` at that pace. Slower
/// consumers (a job queue's workers, consumers out of prefetch, or gone quiet) release the
/// publisher, which is then not held for that queue for `FLOW_SLOW_BACKOFF`: their queue is a
/// store that grows as it would without flow control. Queues without consumers are never a
/// reason to wait, nor is a queue this connection consumes from itself (its acks and credit
/// arrive on this socket).
async fn wait_for_flow(shared: &ServerShared, reader: &mut Reader) {
    let (max_messages, max_bytes) = (
        shared.config.flow_ready_messages,
        shared.config.flow_ready_bytes,
    );
    if reader.routed.is_empty() || (max_messages == 0 && max_bytes == 0) {
        return;
    }
    let now = Instant::now();
    reader.slow.retain(|(_, until)| *until > now);
    let congested = {
        let state = shared.lock();
        reader.routed.iter().find_map(|qid| {
            if reader.slow.iter().any(|(slow, _)| slow == qid) {
                return None;
            }
            let flow = state.broker.queue_flow(*qid, reader.connection)?;
            holds_publisher(&flow, max_messages, max_bytes).then_some((*qid, flow.delivered))
        })
    };
    reader.routed.clear();
    let Some((qid, mut window_delivered)) = congested else {
        return;
    };
    let mut window_end = Instant::now() + FLOW_WINDOW;
    loop {
        let changed = shared.queues_changed.notified();
        let Some(flow) = shared.lock().broker.queue_flow(qid, reader.connection) else {
            return;
        };
        if flow.consumers == 0
            || !over_flow_limit(&flow, max_messages, max_bytes, FLOW_RESUME_PERCENT)
        {
            return;
        }
        let now = Instant::now();
        if now >= window_end {
            let taken = flow.delivered.saturating_sub(window_delivered);
            let excess = flow_excess(flow, max_messages, max_bytes);
            let windows_to_drain = FLOW_DRAIN_HORIZON.as_nanos() / FLOW_WINDOW.as_nanos();
            if u128::from(taken) * windows_to_drain < u128::from(excess) {
                if reader.slow.len() >= SLOW_TRACKED_MAX {
                    reader.slow.remove(0);
                }
                reader.slow.push((qid, now + FLOW_SLOW_BACKOFF));
                debug!(
                    connection = reader.connection.0,
                    taken,
                    excess,
                    "flow: the consumers of a queue drain it slowly; publishing resumes"
                );
                return;
            }
            window_delivered = flow.delivered;
            window_end = now + FLOW_WINDOW;
        }
        let _ = tokio::time::timeout(window_end - now, changed).await;
    }
}

/// Whether a queue's backlog is above `percent` of the flow limits (0: no limit).
fn over_flow_limit(flow: &QueueFlow, max_messages: u64, max_bytes: u64, percent: u64) -> bool {
    (max_messages != 0 && flow.ready > max_messages / 100 * percent)
        || (max_bytes != 0 && flow.ready_bytes > max_bytes / 100 * percent)
}

/// Whether a queue holds the publishing connection it is seen from: it has consumers, none of
/// them on that connection, and more ready than the flow limits.
fn holds_publisher(flow: &QueueFlow, max_messages: u64, max_bytes: u64) -> bool {
    flow.consumers > 0
        && flow.own_consumers == 0
        && over_flow_limit(flow, max_messages, max_bytes, 100)
}

/// Ready messages of a held queue above its resume level: by count, or by bytes converted to
/// messages of the queue's average size, whichever is more.
fn flow_excess(flow: QueueFlow, max_messages: u64, max_bytes: u64) -> u64 {
    let by_count = if max_messages == 0 {
        0
    } else {
        flow.ready
            .saturating_sub(max_messages / 100 * FLOW_RESUME_PERCENT)
    };
    let by_bytes = if max_bytes == 0 || flow.ready_bytes == 0 {
        0
    } else {
        let excess_bytes = flow
            .ready_bytes
            .saturating_sub(max_bytes / 100 * FLOW_RESUME_PERCENT);
        (u128::from(flow.ready) * u128::from(excess_bytes) / u128::from(flow.ready_bytes)) as u64
    };
    by_count.max(by_bytes)
}

/// Builds confirm ranges: consecutive sequence numbers with the same outcome share a range.
#[derive(Default)]
struct Confirms {
    ranges: Vec<ConfirmRange>,
}

impl Confirms {
    fn push(&mut self, seq: u64, status: ConfirmStatus) {
        if let Some(last) = self.ranges.last_mut()
            && last.last_seq + 1 == seq
            && last.status == status
        {
            last.last_seq = seq;
            return;
        }
        self.ranges.push(ConfirmRange {
            first_seq: seq,
            last_seq: seq,
            status,
        });
    }
}

/// What the log's completion must do for one batch: confirm the durable publishes and send
/// the responses of durable topology changes.
#[derive(Default)]
struct Deferred {
    seqs: Vec<u64>,
    frames: Vec<Frame>,
}

fn durability_of(coverage: SyncCoverage) -> Durability {
    match coverage {
        SyncCoverage::Fsynced => Durability::Fsynced,
        SyncCoverage::IntervalPending | SyncCoverage::Unsynced => Durability::UnsafeNotSynced,
    }
}

fn refusal_of(err: &WalError) -> (ErrorCode, String) {
    match err {
        WalError::StorageFull { .. } => (ErrorCode::ResourceLimit, format!("disk full: {err}")),
        WalError::Overloaded { .. } => (ErrorCode::Backpressure, format!("log overloaded: {err}")),
        _ => (
            ErrorCode::Internal,
            format!("the write-ahead log failed: {err}"),
        ),
    }
}

impl Deferred {
    fn complete(self, outbox: &Outbox, in_flight: &InFlight, outcome: Outcome) {
        let n_seqs = self.seqs.len() as u64;
        let mut confirms = Confirms::default();
        let status = match &outcome {
            Ok(coverage) => ConfirmStatus::Confirmed(durability_of(*coverage)),
            Err(err) => {
                let (code, reason) = refusal_of(err);
                ConfirmStatus::Refused { code, reason }
            }
        };
        for seq in self.seqs {
            confirms.push(seq, status.clone());
        }
        if !confirms.ranges.is_empty() {
            outbox.push_frame(Frame::Confirm(Confirm {
                ranges: confirms.ranges,
            }));
        }
        for frame in self.frames {
            match (&outcome, frame) {
                (Err(err), Frame::Response { correlation_id, .. }) => {
                    let (code, reason) = refusal_of(err);
                    let message = format!("applied in memory but not logged: {reason}");
                    outbox.push_frame(Frame::Response {
                        correlation_id,
                        response: Response::Error { code, message },
                    });
                }
                (_, frame) => outbox.push_frame(frame),
            }
        }
        if n_seqs > 0 {
            in_flight.count.fetch_sub(n_seqs, Ordering::AcqRel);
            in_flight.confirmed.notify_waiters();
        }
    }
}

fn refused(code: ErrorCode, reason: impl Into<String>) -> ConfirmStatus {
    ConfirmStatus::Refused {
        code,
        reason: reason.into(),
    }
}

/// Publishes one message: confirmed now (transient), deferred to the log (durable) or refused.
fn publish_one(
    state: &mut State,
    now: u64,
    message: Arc<Message>,
    seq: u64,
    confirms: &mut Confirms,
    deferred: &mut Deferred,
) {
    if message.persistent
        && let Some(reason) = state.refusing_durable()
    {
        confirms.push(seq, refused(ErrorCode::ResourceLimit, reason));
        return;
    }
    match state.publish(now, message) {
        Ok(Published::Logged) => deferred.seqs.push(seq),
        Ok(Published::InMemory) => {
            confirms.push(seq, ConfirmStatus::Confirmed(Durability::InMemory))
        }
        Ok(Published::Duplicate) => confirms.push(seq, ConfirmStatus::Duplicate),
        Err(err) => confirms.push(seq, refused(error_code(&err), err.to_string())),
    }
}

/// Commits the log record of a batch whose confirms or responses wait for it, as the log's
/// leader (docs/durability.md "Latency"): if no fsync is in flight, the record is written and
/// fsynced on this runtime worker and its completion queues the confirm for this connection's
/// writer task on the same worker, so no thread is woken on the way. It runs as a task of its
/// own, spawned on this worker: the reader finishes its turn first, and the writer tasks this
/// batch woke (deliveries to consumers) stay free for another worker to run while this one
/// waits on the disk, so deliveries are not held back by the fsync.
fn commit_log(leader: Leader) {
    tokio::spawn(async move {
        leader.commit();
    });
}

/// Applies a batch of frames under one lock. Returns why the connection must end, if it must,
/// and the log leader to commit, if the batch's confirms or responses wait for the log and the
/// client had nothing else waiting on it.
fn process(
    shared: &ServerShared,
    reader: &mut Reader,
    frames: &mut Vec<Frame>,
    outbox: &Arc<Outbox>,
) -> (Option<Exit>, Option<Leader>) {
    let now = now_ms();
    let mut confirms = Confirms::default();
    let mut deferred = Deferred::default();
    let mut exit = None;
    let connection = reader.connection;
    let after = {
        // Output is written by this reader once the lock is released (writer::flush_or_wake).
        let mut state = shared.batch();
        // Publishes made outside connections (recovery) are none of this reader's business.
        state.broker.take_routed(&mut reader.routed);
        for frame in frames.drain(..) {
            if exit.is_some() {
                continue;
            }
            let minor_required = frame.minor_required();
            if minor_required > reader.minor {
                // Only what the negotiated minor defines may be sent (docs/protocol.md §8).
                exit = Some(Exit::Close(
                    ErrorCode::ProtocolViolation,
                    format!(
                        "frame kind {} needs protocol 1.{minor_required}; this connection speaks 1.{}",
                        frame.kind(),
                        reader.minor
                    ),
                ));
                continue;
            }
            match frame {
                Frame::Publish(publish) => {
                    reader.publish_seq += 1;
                    reader.published = true;
                    let message = message_from_wire(
                        &mut reader.names,
                        &publish.exchange,
                        &publish.routing_key,
                        &publish.properties,
                        publish.body,
                    );
                    publish_one(
                        &mut state,
                        now,
                        message,
                        reader.publish_seq,
                        &mut confirms,
                        &mut deferred,
                    );
                }
                Frame::PublishBatch(batch) => {
                    reader.published = true;
                    for message in &batch.messages {
                        reader.publish_seq += 1;
                        let exchange = batch.exchange_of(message);
                        let routing_key = batch.routing_key_of(message);
                        let message = message_from_wire(
                            &mut reader.names,
                            exchange,
                            routing_key,
                            &message.properties,
                            message.body.clone(),
                        );
                        publish_one(
                            &mut state,
                            now,
                            message,
                            reader.publish_seq,
                            &mut confirms,
                            &mut deferred,
                        );
                    }
                }
                Frame::Ack(ack) => {
                    let command = Command::Ack {
                        connection,
                        delivery_tag: DeliveryTag(ack.delivery_tag),
                        multiple: ack.multiple,
                    };
                    exit = settle(&mut state, now, command);
                }
                Frame::Nack(nack) => {
                    let command = Command::Nack {
                        connection,
                        delivery_tag: DeliveryTag(nack.delivery_tag),
                        multiple: nack.multiple,
                        requeue: nack.requeue,
                    };
                    exit = settle(&mut state, now, command);
                }
                Frame::Reject(reject) => {
                    let command = Command::Reject {
                        connection,
                        delivery_tag: DeliveryTag(reject.delivery_tag),
                        requeue: reject.requeue,
                    };
                    exit = settle(&mut state, now, command);
                }
                Frame::AckRanges(ranges) => {
                    for range in ranges.ranges {
                        let command = Command::AckRange {
                            connection,
                            first: DeliveryTag(range.first),
                            last: DeliveryTag(range.last),
                        };
                        exit = settle(&mut state, now, command);
                        if exit.is_some() {
                            break;
                        }
                    }
                }
                Frame::Defer(defer) => {
                    let command = Command::Defer {
                        connection,
                        delivery_tag: DeliveryTag(defer.delivery_tag),
                        delay_ms: defer.delay_ms,
                    };
                    exit = settle(&mut state, now, command);
                }
                Frame::Touch(touch) => {
                    let command = Command::Touch {
                        connection,
                        delivery_tag: DeliveryTag(touch.delivery_tag),
                    };
                    exit = settle(&mut state, now, command);
                }
                Frame::Credit(credit) => {
                    let command = Command::Credit {
                        connection,
                        consumer_tag: ConsumerTag(credit.consumer_tag),
                        credit: credit.credit,
                    };
                    if let Err(err) = state.apply(now, command) {
                        // Credit for a consumer that was just cancelled is a benign race.
                        debug!(connection = connection.0, "credit ignored: {err}");
                    }
                }
                Frame::Request {
                    correlation_id,
                    request,
                } => {
                    let logged_before = state.pending_log_ops();
                    let response = handle_request(&mut state, connection, now, request);
                    if matches!(response, Response::Subscribed { .. }) {
                        // The answer precedes the consumer's first delivery (it logs nothing).
                        outbox.push_frame_held(Frame::Response {
                            correlation_id,
                            response,
                        });
                        state.route_effects();
                        continue;
                    }
                    state.route_effects();
                    let frame = Frame::Response {
                        correlation_id,
                        response,
                    };
                    if state.pending_log_ops() > logged_before {
                        // A durable change: answer once it is on disk.
                        deferred.frames.push(frame);
                    } else {
                        outbox.push_frame_held(frame);
                    }
                }
                Frame::Heartbeat => {}
                Frame::Close(close) => {
                    debug!(connection = connection.0, code = %close.code, "client closes: {}", close.reason);
                    outbox.push_frame_held(Frame::CloseOk);
                    exit = Some(Exit::Gone);
                }
                Frame::CloseOk => exit = Some(Exit::Gone),
                other => {
                    exit = Some(Exit::Close(
                        ErrorCode::ProtocolViolation,
                        format!("frame kind {} is not sent by clients", other.kind()),
                    ));
                }
            }
            state.route_effects();
        }
        if !deferred.seqs.is_empty() || !deferred.frames.is_empty() {
            let in_flight_before = reader
                .in_flight
                .count
                .fetch_add(deferred.seqs.len() as u64, Ordering::AcqRel);
            let (outbox, in_flight) = (outbox.clone(), reader.in_flight.clone());
            // Lead when nothing else of this client awaits the log: it is most likely waiting
            // for exactly these confirms, so their latency is what counts. A client with
            // publishes already in flight is pipelining: its batches join the writer thread's
            // group commits, and no runtime worker waits on the disk.
            state.on_durable(
                Box::new(move |outcome| deferred.complete(&outbox, &in_flight, outcome)),
                in_flight_before == 0,
            );
        }
        state.broker.take_routed(&mut reader.routed);
        state.finish()
    };
    if !confirms.ranges.is_empty() {
        outbox.push_frame_held(Frame::Confirm(Confirm {
            ranges: confirms.ranges,
        }));
    }
    // Deliveries first, then this connection's own responses, confirms and close.
    let leader = after.flush(Some(outbox));
    (exit, leader)
}

/// Applies an ack / nack / reject: an unknown delivery tag closes the connection (the client's
/// bookkeeping is broken; see docs/protocol.md).
fn settle(state: &mut State, now: u64, command: Command) -> Option<Exit> {
    match state.apply(now, command) {
        Ok(_) => None,
        Err(err) => Some(Exit::Close(error_code(&err), err.to_string())),
    }
}

fn core_kind(kind: ExchangeKind) -> wharf_core::ExchangeKind {
    match kind {
        ExchangeKind::Direct => wharf_core::ExchangeKind::Direct,
        ExchangeKind::Fanout => wharf_core::ExchangeKind::Fanout,
        ExchangeKind::Topic => wharf_core::ExchangeKind::Topic,
        ExchangeKind::Headers => wharf_core::ExchangeKind::Headers,
    }
}

fn wire_kind(kind: wharf_core::ExchangeKind) -> ExchangeKind {
    match kind {
        wharf_core::ExchangeKind::Direct => ExchangeKind::Direct,
        wharf_core::ExchangeKind::Fanout => ExchangeKind::Fanout,
        wharf_core::ExchangeKind::Topic => ExchangeKind::Topic,
        wharf_core::ExchangeKind::Headers => ExchangeKind::Headers,
    }
}

fn queue_info_v2(stats: QueueStats) -> QueueInfoV2 {
    QueueInfoV2 {
        name: stats.name,
        durable: stats.durable,
        exclusive: stats.exclusive,
        auto_delete: stats.auto_delete,
        ready: stats.ready,
        unacked: stats.unacked,
        consumers: stats.consumers,
        delayed: stats.delayed,
        ready_bytes: stats.ready_bytes,
        published: stats.published,
        delivered: stats.delivered,
        redelivered: stats.redelivered,
        acked: stats.acked,
        dropped: stats.dropped,
        expired: stats.expired,
        duplicates: stats.duplicates,
    }
}

/// The consumer argument that gives each delivery of a manual-ack consumer a lease, in ms
/// (protocol 1.1).
const ARG_ACK_TIMEOUT: &str = "x-ack-timeout";

/// The lease asked for in a `Subscribe`'s arguments: an integer of ms in
/// `1..=DURATION_MS_MAX`, for a manual-ack consumer; anything else is an invalid argument.
fn ack_timeout_of(arguments: &Table, auto_ack: bool) -> Result<Option<u64>, CoreError> {
    let Some(value) = arguments.get(ARG_ACK_TIMEOUT) else {
        return Ok(None);
    };
    let invalid = |reason: String| Err(CoreError::InvalidArgument { reason });
    match value {
        ValueRef::I64(timeout_ms) => match u64::try_from(timeout_ms) {
            Ok(timeout_ms @ 1..=DURATION_MS_MAX) if !auto_ack => Ok(Some(timeout_ms)),
            Ok(1..=DURATION_MS_MAX) => invalid(format!(
                "{ARG_ACK_TIMEOUT} needs manual acks: auto-ack deliveries have no lease"
            )),
            _ => invalid(format!(
                "{ARG_ACK_TIMEOUT} must be in 1..={DURATION_MS_MAX} ms, got {timeout_ms}"
            )),
        },
        other => invalid(format!(
            "{ARG_ACK_TIMEOUT} must be an integer number of ms, got {other:?}"
        )),
    }
}

fn queue_info(stats: QueueStats) -> QueueInfo {
    QueueInfo {
        name: stats.name,
        durable: stats.durable,
        exclusive: stats.exclusive,
        auto_delete: stats.auto_delete,
        ready: stats.ready,
        unacked: stats.unacked,
        consumers: stats.consumers,
    }
}

fn bind_target(destination: Destination) -> BindTarget {
    match destination {
        Destination::Queue(name) => BindTarget::Queue(name),
        Destination::Exchange(name) => BindTarget::Exchange(name),
    }
}

/// The queue argument that turns on single-active-consumer (as in RabbitMQ).
const ARG_SINGLE_ACTIVE_CONSUMER: &str = "x-single-active-consumer";

fn handle_request(
    state: &mut State,
    connection: ConnectionId,
    now: u64,
    request: Request,
) -> Response {
    let result: Result<Response, CoreError> = (|| match request {
        Request::DeclareQueue {
            name,
            durable,
            exclusive,
            auto_delete,
            passive,
            arguments,
        } => {
            let mut arguments = table_to_headers(&arguments);
            let single_active_consumer = match arguments.remove(ARG_SINGLE_ACTIVE_CONSUMER) {
                None => false,
                Some(wharf_core::HeaderValue::Bool(flag)) => flag,
                Some(_) => {
                    return Err(CoreError::InvalidArgument {
                        reason: format!("{ARG_SINGLE_ACTIVE_CONSUMER} must be a bool"),
                    });
                }
            };
            let options = QueueOptions {
                durable,
                exclusive,
                auto_delete,
                single_active_consumer,
                arguments,
            };
            match state.apply(
                now,
                Command::DeclareQueue {
                    connection,
                    name,
                    options,
                    passive,
                },
            )? {
                Reply::QueueDeclared {
                    name,
                    ready,
                    consumers,
                } => Ok(Response::QueueDeclared {
                    name: name.to_string(),
                    ready,
                    consumers,
                }),
                other => unreachable!("declare queue replied {other:?}"),
            }
        }
        Request::DeleteQueue {
            name,
            if_unused,
            if_empty,
        } => {
            match state.apply(
                now,
                Command::DeleteQueue {
                    connection,
                    name,
                    if_unused,
                    if_empty,
                },
            )? {
                Reply::QueueDeleted { messages } => Ok(Response::Deleted { messages }),
                other => unreachable!("delete queue replied {other:?}"),
            }
        }
        Request::PurgeQueue { name } => {
            match state.apply(now, Command::PurgeQueue { connection, name })? {
                Reply::Purged { messages } => Ok(Response::Purged { messages }),
                other => unreachable!("purge replied {other:?}"),
            }
        }
        Request::DeclareExchange {
            name,
            kind,
            durable,
            auto_delete,
            internal,
            passive,
            arguments,
        } => {
            let options = ExchangeOptions {
                durable,
                auto_delete,
                internal,
                arguments: table_to_headers(&arguments),
            };
            state.apply(
                now,
                Command::DeclareExchange {
                    name,
                    kind: core_kind(kind),
                    options,
                    passive,
                },
            )?;
            Ok(Response::Done)
        }
        Request::DeleteExchange { name, if_unused } => {
            state.apply(now, Command::DeleteExchange { name, if_unused })?;
            Ok(Response::Done)
        }
        Request::Bind(binding) => {
            state.apply(
                now,
                Command::Bind {
                    source: binding.source,
                    target: bind_target(binding.destination),
                    routing_key: binding.routing_key,
                    arguments: table_to_headers(&binding.arguments),
                },
            )?;
            Ok(Response::Done)
        }
        Request::Unbind(binding) => {
            state.apply(
                now,
                Command::Unbind {
                    source: binding.source,
                    target: bind_target(binding.destination),
                    routing_key: binding.routing_key,
                    arguments: table_to_headers(&binding.arguments),
                },
            )?;
            Ok(Response::Done)
        }
        Request::Subscribe {
            queue,
            consumer_tag,
            prefetch,
            auto_ack,
            exclusive,
            priority,
            initial_credit: _,
            arguments,
        } => {
            let ack_timeout_ms = ack_timeout_of(&arguments, auto_ack)?;
            let options = ConsumerOptions {
                prefetch,
                auto_ack,
                exclusive,
                priority,
                ack_timeout_ms,
            };
            state.apply(
                now,
                Command::Subscribe {
                    connection,
                    queue,
                    consumer_tag: ConsumerTag(consumer_tag),
                    options,
                },
            )?;
            Ok(Response::Subscribed { consumer_tag })
        }
        Request::Cancel { consumer_tag } => {
            state.apply(
                now,
                Command::Cancel {
                    connection,
                    consumer_tag: ConsumerTag(consumer_tag),
                },
            )?;
            Ok(Response::Done)
        }
        Request::QueueStats { name } => Ok(Response::Stats(queue_info(
            state.broker.queue_stats(&name)?,
        ))),
        Request::QueueStatsV2 { name } => Ok(Response::StatsV2(queue_info_v2(
            state.broker.queue_stats(&name)?,
        ))),
        Request::ListQueuesV2 => Ok(Response::QueuesV2(
            state
                .broker
                .list_queues()
                .into_iter()
                .map(queue_info_v2)
                .collect(),
        )),
        Request::Redrive { queue, max } => {
            match state.apply(
                now,
                Command::Redrive {
                    connection,
                    queue,
                    max,
                },
            )? {
                Reply::Redriven { moved } => Ok(Response::Redriven { moved }),
                other => unreachable!("redrive replied {other:?}"),
            }
        }
        Request::ListQueues => Ok(Response::Queues(
            state
                .broker
                .list_queues()
                .into_iter()
                .map(queue_info)
                .collect(),
        )),
        Request::ListExchanges => Ok(Response::Exchanges(
            state
                .broker
                .list_exchanges()
                .into_iter()
                .map(|info| ExchangeInfo {
                    name: info.name,
                    kind: wire_kind(info.kind),
                    durable: info.options.durable,
                })
                .collect(),
        )),
    })();
    result.unwrap_or_else(|err| Response::Error {
        code: error_code(&err),
        message: err.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_holds_its_publisher_only_with_others_consuming_and_over_a_limit() {
        let flow = QueueFlow {
            ready: 5_000,
            ready_bytes: 500_000,
            consumers: 2,
            own_consumers: 0,
            delivered: 7,
        };
        assert!(holds_publisher(&flow, 4_096, 0), "over the count limit");
        assert!(holds_publisher(&flow, 0, 400_000), "over the byte limit");
        assert!(!holds_publisher(&flow, 8_192, 1 << 20), "under both");
        assert!(!holds_publisher(&flow, 0, 0), "flow control off");
        let no_consumers = QueueFlow {
            consumers: 0,
            ..flow
        };
        assert!(!holds_publisher(&no_consumers, 4_096, 0), "a store");
        let own = QueueFlow {
            own_consumers: 1,
            ..flow
        };
        assert!(
            !holds_publisher(&own, 4_096, 0),
            "the publisher consumes from it itself: holding it would hold its acks"
        );
    }

    #[test]
    fn a_held_queues_excess_counts_bytes_in_messages_of_its_average_size() {
        let flow = QueueFlow {
            ready: 1_000,
            ready_bytes: 4_096_000,
            consumers: 1,
            own_consumers: 0,
            delivered: 0,
        };
        // Resume levels: 2,048 messages (not reached: no excess by count), 1 MiB by bytes.
        assert_eq!(flow_excess(flow, 4_096, 0), 0);
        let excess_bytes = 4_096_000 - (2 << 20) / 100 * FLOW_RESUME_PERCENT;
        assert_eq!(flow_excess(flow, 4_096, 2 << 20), excess_bytes / 4_096);
        assert_eq!(flow_excess(flow, 100, 0), 1_000 - 50);
    }

    #[test]
    fn confirms_merge_consecutive_equal_outcomes_into_ranges() {
        let mut confirms = Confirms::default();
        let ok = ConfirmStatus::Confirmed(Durability::InMemory);
        let refused = ConfirmStatus::Refused {
            code: ErrorCode::NotFound,
            reason: "x".into(),
        };
        for seq in 1..=3 {
            confirms.push(seq, ok.clone());
        }
        confirms.push(4, refused.clone());
        confirms.push(5, ok.clone());
        confirms.push(7, ok.clone());
        let ranges: Vec<(u64, u64)> = confirms
            .ranges
            .iter()
            .map(|range| (range.first_seq, range.last_seq))
            .collect();
        assert_eq!(ranges, vec![(1, 3), (4, 4), (5, 5), (7, 7)]);
    }
}
