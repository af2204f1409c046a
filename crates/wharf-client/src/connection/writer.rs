//! The writer task: drains the command channel into one socket write at a time.

use super::coalesce::{CoalescedFrame, Coalescer, ack_frame};
use super::handshake::WriteHalf;
use super::{BUFFER_BYTES, Command, ConnectionShared};
use crate::error::ClientError;
use bytes::{Buf, Bytes, BytesMut};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;
use wharf_protocol::Frame;

/// Most commands drained into one write: bounds the work between two socket writes.
const COMMANDS_PER_WRITE_MAX: usize = 512;
/// Encoded frames at least this long are written from their own buffer (a vectored write)
/// instead of being copied into the write buffer: a publish batch is tens of KiB.
const WRITE_BY_REFERENCE_BYTES_MIN: usize = 4 * 1024;

/// What one socket write sends: small frames copied together, large ones by reference, in
/// order.
#[derive(Default)]
struct Outgoing {
    /// Small frames since the last large one.
    buf: BytesMut,
    /// Everything before `buf`, in order.
    chunks: Vec<Bytes>,
}

impl Outgoing {
    fn push(&mut self, bytes: Bytes) {
        if bytes.len() < WRITE_BY_REFERENCE_BYTES_MIN {
            self.buf.extend_from_slice(&bytes);
            return;
        }
        if !self.buf.is_empty() {
            self.chunks.push(self.buf.split().freeze());
        }
        self.chunks.push(bytes);
    }

    /// Registers a frame of coalesced publishes (if any) for its confirms and adds it; its
    /// outbound permits go to `permits`. Once the connection failed, the frame is dropped
    /// instead and its messages report the terminal error.
    fn push_coalesced(
        &mut self,
        shared: &ConnectionShared,
        frame: Option<CoalescedFrame>,
        permits: &mut Vec<OwnedSemaphorePermit>,
    ) {
        let Some(mut frame) = frame else { return };
        {
            let mut state = shared.lock();
            if state.terminal.is_some() {
                return;
            }
            // Numbered here, in socket order: nothing else assigns sequence numbers.
            frame.register(&mut state.confirms);
        }
        frame.chunks.into_iter().for_each(|chunk| self.push(chunk));
        permits.extend(frame.outbound);
    }

    /// Adds the frame acking `tags` (if any) and empties `tags`.
    fn push_acks(&mut self, shared: &ConnectionShared, tags: &mut Vec<u64>) {
        if let Some(frame) = ack_frame(tags) {
            // Only tags and ranges: always within the smallest frame limit.
            let bytes = shared.encode(&frame).expect("an ack frame encodes");
            self.push(bytes);
        }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.chunks.is_empty()
    }

    /// Writes everything, in order, then leaves this empty.
    async fn write_to(&mut self, write: &mut WriteHalf) -> io::Result<()> {
        if self.chunks.is_empty() {
            write.write_all(&self.buf).await?;
            self.buf.clear();
            // TLS holds what it encrypted until flushed (plain TCP: nothing to do).
            return write.flush().await;
        }
        if !self.buf.is_empty() {
            self.chunks.push(self.buf.split().freeze());
        }
        let mut first = 0;
        while first < self.chunks.len() {
            let slices: Vec<io::IoSlice<'_>> = self.chunks[first..]
                .iter()
                .take(IOV_PER_WRITE_MAX)
                .map(|chunk| io::IoSlice::new(chunk))
                .collect();
            let mut written = write.write_vectored(&slices).await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            while written > 0 {
                let chunk = &mut self.chunks[first];
                if written >= chunk.len() {
                    written -= chunk.len();
                    first += 1;
                } else {
                    chunk.advance(written);
                    written = 0;
                }
            }
        }
        self.chunks.clear();
        write.flush().await
    }
}

/// Slices per vectored write (Linux accepts 1,024): a batch of 4 KiB bodies is one slice per
/// body.
const IOV_PER_WRITE_MAX: usize = 512;

pub(super) async fn run_writer(
    shared: Arc<ConnectionShared>,
    mut write: WriteHalf,
    mut commands: mpsc::UnboundedReceiver<Command>,
    heartbeat: Option<Duration>,
) {
    let mut stop = shared.hard_shutdown.subscribe();
    let mut batch = Vec::with_capacity(COMMANDS_PER_WRITE_MAX);
    let mut out = Outgoing {
        buf: BytesMut::with_capacity(BUFFER_BYTES),
        chunks: Vec::new(),
    };
    let mut written_permits: Vec<OwnedSemaphorePermit> = Vec::new();
    let mut coalescer = Coalescer::new(shared.coalesced_frame_limits());
    // Tags of plain acks queued since the last frame of anything else.
    let mut acks: Vec<u64> = Vec::new();
    let heartbeat_bytes = shared
        .encode(&Frame::Heartbeat)
        .expect("a heartbeat always encodes");
    let mut last_write = Instant::now();
    let mut close_sent = false;
    let mut shutdown = false;
    while !shutdown {
        let heartbeat_at = heartbeat.map(|interval| last_write + interval);
        tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => return,
            n_received = commands.recv_many(&mut batch, COMMANDS_PER_WRITE_MAX) => {
                if n_received == 0 {
                    shutdown = true;
                }
            }
            _ = tokio::time::sleep_until(heartbeat_at.unwrap_or_else(Instant::now)), if heartbeat_at.is_some() => {
                out.push(heartbeat_bytes.clone());
            }
        }
        // The state lock is taken per frame that registers confirms, not for the whole
        // drain: `publish` calls on other threads check the state too.
        for command in batch.drain(..) {
            if shutdown {
                break;
            }
            if let Command::PublishOne(publish) = command {
                if close_sent {
                    // After our `Close` the waiter is dropped and reports the terminal error.
                    coalescer.skip(publish);
                } else {
                    let frame = coalescer.push(publish);
                    out.push_coalesced(&shared, frame, &mut written_permits);
                }
                continue;
            }
            if let Command::Ack(delivery_tag) = command {
                // Written after the publishes queued with it: an ack may go later than
                // queued, never earlier.
                acks.push(delivery_tag);
                continue;
            }
            // Whatever else comes next is written after the publishes and acks queued before
            // it.
            out.push_coalesced(&shared, coalescer.emit(), &mut written_permits);
            out.push_acks(&shared, &mut acks);
            match command {
                Command::Frame(bytes) => out.push(bytes),
                Command::Publish {
                    chunks,
                    n_messages,
                    waiter,
                    permits,
                    outbound,
                } => {
                    if close_sent {
                        continue;
                    }
                    {
                        let mut state = shared.lock();
                        // Once the connection failed, the waiter is dropped and reports the
                        // terminal error.
                        if state.terminal.is_some() {
                            continue;
                        }
                        // Numbered here, in socket order: nothing else assigns sequence
                        // numbers.
                        state.confirms.register(n_messages, waiter, permits);
                    }
                    chunks.into_iter().for_each(|chunk| out.push(chunk));
                    written_permits.push(outbound);
                }
                Command::Close(bytes) => {
                    close_sent = true;
                    out.push(bytes);
                }
                Command::Shutdown => shutdown = true,
                Command::PublishOne(_) | Command::Ack(_) => unreachable!("handled above"),
            }
        }
        out.push_coalesced(&shared, coalescer.emit(), &mut written_permits);
        out.push_acks(&shared, &mut acks);
        batch.clear();
        if out.is_empty() {
            continue;
        }
        let result = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => return,
            result = out.write_to(&mut write) => result,
        };
        if let Err(err) = result {
            shared.fail(ClientError::ConnectionLost(Arc::new(err)), true);
            return;
        }
        last_write = Instant::now();
        written_permits.clear();
        if out.buf.capacity() > 4 * BUFFER_BYTES || out.buf.capacity() < BUFFER_BYTES / 4 {
            out.buf = BytesMut::with_capacity(BUFFER_BYTES);
        }
    }
    let _ = write.shutdown().await;
}
