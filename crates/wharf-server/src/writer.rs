//! A connection's writer: encodes what the broker queued in the connection's [`Outbox`] and
//! writes it to the socket.
//!
//! Two parties write, one at a time (the [`Sink`] sits behind a mutex in the connection's
//! [`crate::output::Output`]): the
//! connection's writer task, woken by the outbox, and, for a small output queued by one
//! reader's batch, that reader itself, right after it released the broker lock
//! ([`crate::output::flush_or_wake`]). The inline write takes the writer task's wake-up (often a second
//! runtime worker's) off the path of a message at low rates: publish → delivery and
//! publish → confirm each cost one task fewer. Outputs larger than
//! [`INLINE_WRITE_BYTES_MAX`] stay with the writer task, so at high rates a publisher's reader
//! and its consumers' writers keep working on both CPUs.

use crate::limits::{READ_BUFFER_BYTES, WRITE_CHUNK_BYTES};
use crate::outbox::{Out, Outbox};
use crate::transport::WriteHalf;
use bytes::{Buf, Bytes, BytesMut};
use std::io;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};
use wharf_core::Message;
use wharf_protocol::limits::VECTORED_COPY_BYTES_MAX;
use wharf_protocol::{
    DeliveryRef, ErrorCode, Frame, Properties, Response, encode, encode_deliver_batch_head,
};

use crate::convert::properties_to_wire;

fn message_has_properties(message: &Message) -> bool {
    message.message_id.is_some()
        || !message.headers.is_empty()
        || message.content_type.is_some()
        || message.content_encoding.is_some()
        || message.timestamp_ms.is_some()
        || message.correlation_id.is_some()
        || message.reply_to.is_some()
        || message.priority != 0
        || message.expiration_ms.is_some()
        || message.delay_ms.is_some()
        || message.persistent
}

/// Buffers handed to one vectored write at most (the kernel's limit is 1,024).
const IOVECS_PER_WRITE_MAX: usize = 256;

/// Deliveries per `DeliverBatch` frame at most.
const DELIVERIES_PER_BATCH_MAX: usize = 512;
/// Body bytes per `DeliverBatch` frame at most: a client receives a frame into one buffer,
/// growing it as the frame arrives (64 KiB at a time, see `READ_RESERVE_BYTES_MAX`), so
/// multi-MiB frames of large bodies cost it copies and fresh pages; 256 KiB frames arrive in
/// place and still amortize the frame overhead over 64 bodies of 4 KiB.
const DELIVER_BATCH_BYTES_MAX: usize = 256 * 1024;

/// Encodes what the writer takes from the outbox. Consecutive deliveries to one consumer are
/// gathered and encoded as one `DeliverBatch`, straight from the core's deliveries (borrowed:
/// no owned wire copies of names, properties or bodies).
pub(crate) struct FrameWriter {
    /// Encoded bytes after `chunks`.
    buf: BytesMut,
    /// What goes before `buf`, in order: earlier encoded bytes and large bodies, sent by
    /// reference (a vectored write) instead of being copied into `buf`.
    chunks: Vec<Bytes>,
    chunks_bytes: usize,
    send_frame_bytes_max: u32,
    pending: Vec<wharf_core::Delivery>,
    pending_bytes: usize,
    properties: Vec<Properties>,
    /// Deliveries that cannot be encoded within the client's frame limit, set aside for the
    /// reader to requeue (see [`Outbox::set_aside`]).
    undeliverable: Vec<wharf_core::Delivery>,
}

impl FrameWriter {
    /// Bytes encoded and not yet written.
    fn queued_bytes(&self) -> usize {
        self.buf.len() + self.chunks_bytes
    }

    /// Appends a body: copied when small, by reference when large.
    fn push_body(&mut self, body: &Bytes) {
        if body.len() < VECTORED_COPY_BYTES_MAX {
            self.buf.extend_from_slice(body);
            return;
        }
        if !self.buf.is_empty() {
            self.chunks_bytes += self.buf.len();
            self.chunks.push(self.buf.split().freeze());
        }
        self.chunks_bytes += body.len();
        self.chunks.push(body.clone());
    }

    /// Whether anything is queued and not yet written.
    pub(crate) fn has_output(&self) -> bool {
        !self.buf.is_empty() || !self.chunks.is_empty() || !self.pending.is_empty()
    }

    /// Encodes one item.
    fn push(&mut self, item: Out) -> Result<(), OutputError> {
        match item {
            Out::Frame(frame) => self.frame(&frame),
            Out::Deliver(delivery) => self.deliver(delivery),
        }
    }

    /// Moves the encoded bytes behind the chunks, so that the chunks hold everything, in order.
    fn seal(&mut self) {
        if !self.buf.is_empty() {
            self.chunks_bytes += self.buf.len();
            self.chunks.push(self.buf.split().freeze());
        }
    }

    /// The first chunks, as one vectored write takes them.
    fn slices(&self) -> Vec<io::IoSlice<'_>> {
        self.chunks
            .iter()
            .take(IOVECS_PER_WRITE_MAX)
            .map(|chunk| io::IoSlice::new(chunk))
            .collect()
    }

    /// Forgets the first `written` bytes of the chunks: the socket took them.
    fn consume(&mut self, mut written: usize) {
        self.chunks_bytes -= written;
        let mut n_done = 0;
        for chunk in &mut self.chunks {
            if written >= chunk.len() {
                written -= chunk.len();
                n_done += 1;
            } else {
                chunk.advance(written);
                break;
            }
        }
        self.chunks.drain(..n_done);
    }

    /// Writes everything queued, in order, and leaves the writer empty. A socket that takes
    /// nothing for `stall` fails the write with `TimedOut` (a slow consumer).
    async fn write_to(&mut self, writer: &mut WriteHalf, stall: Duration) -> io::Result<()> {
        let stalled = || io::Error::new(io::ErrorKind::TimedOut, "the socket took nothing");
        if self.chunks.is_empty() {
            let mut at = 0;
            while at < self.buf.len() {
                let written = tokio::time::timeout(stall, writer.write(&self.buf[at..]))
                    .await
                    .map_err(|_| stalled())??;
                if written == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                at += written;
            }
            self.buf.clear();
        } else {
            self.seal();
            while !self.chunks.is_empty() {
                let written = tokio::time::timeout(stall, writer.write_vectored(&self.slices()))
                    .await
                    .map_err(|_| stalled())??;
                if written == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                self.consume(written);
            }
        }
        // TLS holds what it encrypted until flushed (plain TCP: nothing to do).
        tokio::time::timeout(stall, writer.flush())
            .await
            .map_err(|_| stalled())?
    }

    /// Writes what the socket takes without waiting: `Ok(true)` once everything queued is
    /// written, `Ok(false)` if the socket's buffer filled first (the rest stays queued, in
    /// order, for [`FrameWriter::write_to`]).
    fn try_write_to(&mut self, writer: &WriteHalf) -> io::Result<bool> {
        while self.chunks.is_empty() && !self.buf.is_empty() {
            match writer.try_write(&self.buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => self.buf.advance(written),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        self.seal();
        while !self.chunks.is_empty() {
            match writer.try_write_vectored(&self.slices()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => self.consume(written),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(true)
    }

    /// Empties the writer after a write (or a failure), keeping its buffer unless it grew
    /// large or was handed to the chunks.
    fn reset(&mut self) {
        self.buf.clear();
        self.chunks.clear();
        self.chunks_bytes = 0;
        self.pending.clear();
        self.pending_bytes = 0;
        if self.buf.capacity() > 4 * WRITE_CHUNK_BYTES
            || self.buf.capacity() < READ_BUFFER_BYTES / 4
        {
            self.buf = BytesMut::with_capacity(READ_BUFFER_BYTES);
        }
    }

    fn frame(&mut self, frame: &Frame) -> Result<(), OutputError> {
        self.flush_pending()?;
        match encode(frame, self.send_frame_bytes_max, &mut self.buf) {
            Ok(()) => Ok(()),
            Err(err) => match frame {
                // A response too large for the client (a huge listing) becomes an error response.
                Frame::Response { correlation_id, .. } => {
                    let response = Response::Error {
                        code: ErrorCode::ResourceLimit,
                        message: format!("response too large: {err}"),
                    };
                    encode(
                        &Frame::Response {
                            correlation_id: *correlation_id,
                            response,
                        },
                        self.send_frame_bytes_max,
                        &mut self.buf,
                    )
                    .map_err(OutputError::Frame)
                }
                _ => Err(OutputError::Frame(err)),
            },
        }
    }

    fn deliver(&mut self, delivery: wharf_core::Delivery) -> Result<(), OutputError> {
        let body_bytes = delivery.message.body.len() + crate::limits::MESSAGE_OVERHEAD_BYTES;
        let fits = self.pending.first().is_some_and(|first| {
            first.consumer_tag == delivery.consumer_tag
                && self.pending.len() < DELIVERIES_PER_BATCH_MAX
                && self.pending_bytes + body_bytes
                    < DELIVER_BATCH_BYTES_MAX.min(self.send_frame_bytes_max as usize / 2)
        });
        if !fits {
            self.flush_pending()?;
        }
        self.pending_bytes += body_bytes;
        self.pending.push(delivery);
        Ok(())
    }

    /// Encodes the pending deliveries as one `DeliverBatch`; if that frame would exceed the
    /// client's limit, as one frame each, and sets aside those that do not fit alone (a
    /// message larger than the client's frame limit).
    fn flush_pending(&mut self) -> Result<(), OutputError> {
        if self.encode_pending().is_ok() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        for delivery in pending {
            self.pending.push(delivery);
            if self.encode_pending().is_err() {
                self.undeliverable.append(&mut self.pending);
            }
        }
        self.pending_bytes = 0;
        Ok(())
    }

    fn encode_pending(&mut self) -> Result<(), OutputError> {
        let Some(first) = self.pending.first() else {
            return Ok(());
        };
        let consumer_tag = first.consumer_tag.0;
        self.properties.clear();
        self.properties.extend(self.pending.iter().map(|delivery| {
            if message_has_properties(&delivery.message) {
                properties_to_wire(&delivery.message)
            } else {
                Properties::default()
            }
        }));
        let refs: Vec<DeliveryRef<'_>> = self
            .pending
            .iter()
            .zip(&self.properties)
            .map(|(delivery, properties)| DeliveryRef {
                delivery_tag: delivery.delivery_tag.0,
                redelivered: delivery.redelivered,
                delivery_count: delivery.delivery_count,
                exchange: &delivery.message.exchange,
                routing_key: &delivery.message.routing_key,
                properties,
                body: &delivery.message.body,
            })
            .collect();
        let encoded = encode_deliver_batch_head(
            consumer_tag,
            &refs,
            self.send_frame_bytes_max,
            &mut self.buf,
        )
        .map_err(OutputError::Delivery);
        drop(refs);
        if encoded.is_err() {
            // Left pending for the caller to split.
            return encoded.map(|_| ());
        }
        let mut pending = std::mem::take(&mut self.pending);
        for delivery in &pending {
            self.push_body(&delivery.message.body);
        }
        pending.clear();
        self.pending = pending;
        self.pending_bytes = 0;
        Ok(())
    }
}

/// Why a connection's output stopped: nothing more is written to it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OutputError {
    /// A frame could not be encoded (over the client's frame limit, and not a response that
    /// can be replaced by an error response).
    #[error("cannot send a frame: {0}")]
    Frame(#[source] wharf_protocol::Error),
    /// A batch of deliveries could not be encoded.
    #[error("cannot send a delivery: {0}")]
    Delivery(#[source] wharf_protocol::Error),
    /// The socket refused a write.
    #[error("socket write failed: {0}")]
    Socket(#[source] io::Error),
    /// The socket took nothing for the slow-consumer timeout while output waited.
    #[error("slow consumer: the socket took nothing for {} ms while output waited", .0.as_millis())]
    SlowConsumer(Duration),
}

/// A failed socket write as an [`OutputError`]: one that timed out is a slow consumer.
fn socket_error(error: io::Error, stall_timeout: Duration) -> OutputError {
    if error.kind() == io::ErrorKind::TimedOut {
        OutputError::SlowConsumer(stall_timeout)
    } else {
        OutputError::Socket(error)
    }
}

/// The writing end of a connection: its socket and encoder, shared (behind the outbox's mutex)
/// by the writer task and the readers that flush small outputs inline.
pub(crate) struct Sink {
    pub(crate) socket: WriteHalf,
    pub(crate) out: FrameWriter,
    /// Items taken from the outbox, being encoded (kept for its allocation).
    items: Vec<Out>,
    pub(crate) last_write: Instant,
    /// How long a write may make no progress before the client is a slow consumer.
    stall_timeout: Duration,
    /// A write or an encoding failed: nothing more is written and the writer task ends (the
    /// reader notices the broken socket, or the client's silence, and cleans up).
    pub(crate) failed: bool,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("queued_bytes", &self.out.queued_bytes())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Sink {
    /// A sink writing to `socket` frames of at most `send_frame_bytes_max` bytes (the client's
    /// limit).
    /// A socket that takes nothing for `stall_timeout` while output waits fails the writer
    /// ([`OutputError::SlowConsumer`]).
    pub(crate) fn new(
        socket: WriteHalf,
        send_frame_bytes_max: u32,
        stall_timeout: Duration,
    ) -> Self {
        Sink {
            socket,
            out: FrameWriter {
                buf: BytesMut::with_capacity(READ_BUFFER_BYTES),
                chunks: Vec::new(),
                chunks_bytes: 0,
                send_frame_bytes_max,
                pending: Vec::new(),
                pending_bytes: 0,
                properties: Vec::new(),
                undeliverable: Vec::new(),
            },
            items: Vec::new(),
            last_write: Instant::now(),
            stall_timeout,
            failed: false,
        }
    }

    /// Takes everything queued in `outbox` and writes it, with what an inline write left
    /// before it (writer task). `Ok(false)`: there was nothing to write; `Err`: the connection
    /// cannot be written to any more.
    pub(crate) async fn drain(&mut self, outbox: &Outbox) -> Result<bool, OutputError> {
        outbox.take_all(&mut self.items);
        if self.items.is_empty() && !self.out.has_output() {
            return Ok(false);
        }
        let mut accounted = 0;
        let mut result = Ok(true);
        for item in self.items.drain(..) {
            accounted += Outbox::item_bytes(&item);
            if let Err(error) = self.out.push(item) {
                result = Err(error);
                break;
            }
            if self.out.queued_bytes() >= WRITE_CHUNK_BYTES
                && let Err(error) = self
                    .out
                    .write_to(&mut self.socket, self.stall_timeout)
                    .await
            {
                result = Err(socket_error(error, self.stall_timeout));
                break;
            }
        }
        if result.is_ok()
            && let Err(error) = self.out.flush_pending()
        {
            result = Err(error);
        }
        if result.is_ok()
            && self.out.has_output()
            && let Err(error) = self
                .out
                .write_to(&mut self.socket, self.stall_timeout)
                .await
        {
            result = Err(socket_error(error, self.stall_timeout));
        }
        self.out.reset();
        self.last_write = Instant::now();
        outbox.set_aside(&mut self.out.undeliverable);
        outbox.written(accounted);
        result
    }

    /// Takes everything queued in `outbox`, encodes it and writes as much as the socket takes
    /// without waiting (a reader, inline). `true`: all of it was written; `false`: the rest is
    /// left in the encoder for the writer task (or the sink failed), which must be woken.
    pub(crate) fn flush_inline(&mut self, outbox: &Outbox) -> bool {
        outbox.take_all(&mut self.items);
        if self.items.is_empty() {
            // Nothing was written: the heartbeat clock must not move.
            return true;
        }
        let mut accounted = 0;
        for item in self.items.drain(..) {
            accounted += Outbox::item_bytes(&item);
            if let Err(error) = self.out.push(item) {
                warn!(%error, "closing connection");
                self.failed = true;
                break;
            }
        }
        if !self.failed
            && let Err(error) = self.out.flush_pending()
        {
            warn!(%error, "closing connection");
            self.failed = true;
        }
        let written = !self.failed
            && match self.out.try_write_to(&self.socket) {
                Ok(written) => written,
                Err(err) => {
                    debug!("inline write failed: {err}");
                    self.failed = true;
                    false
                }
            };
        if written {
            self.out.reset();
            self.last_write = Instant::now();
        }
        // What is left over (the socket's buffer was full) is at most about
        // INLINE_WRITE_BYTES_MAX, and the writer task writes it next.
        outbox.set_aside(&mut self.out.undeliverable);
        outbox.written(accounted);
        written
    }
}
