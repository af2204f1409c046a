//! A connection's output: the [`Outbox`] the broker queues into under its lock, and the
//! socket writer (`Sink`) that drains it, behind an async mutex shared by the connection's
//! writer task and the readers that write a small output inline. `outbox.rs` is the queue,
//! `writer.rs` the encoder and socket writes; this module composes them and runs the writer
//! task, so neither of those two depends on the other's owner.

use crate::limits::INLINE_WRITE_BYTES_MAX;
use crate::outbox::Outbox;
use crate::writer::{OutputError, Sink};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};
use wharf_protocol::Frame;

/// A connection's output: its outbox (dereferenced to, for queueing) and its socket writer.
#[derive(Debug, Default)]
pub struct Output {
    outbox: Outbox,
    /// The connection's socket writer, shared by its writer task and the readers that write a
    /// small output inline (`None` until the connection installs it and once it is shut).
    pub(crate) sink: tokio::sync::Mutex<Option<Sink>>,
}

impl std::ops::Deref for Output {
    type Target = Outbox;

    fn deref(&self) -> &Outbox {
        &self.outbox
    }
}

/// Sends what `outbox` holds: written here and now if it is small and nobody is writing to the
/// connection, otherwise by its writer task, which is woken. Called by a reader once it has
/// released the broker lock, for every outbox its batch queued output in without waking the
/// writer ([`Outbox::push_many_held`], [`Outbox::push_frame_held`]).
pub(crate) fn flush_or_wake(outbox: &Output) {
    if outbox.queued_bytes() <= INLINE_WRITE_BYTES_MAX
        && !outbox.is_closing()
        && let Ok(mut sink) = outbox.sink.try_lock()
        && let Some(sink) = sink.as_mut()
        && !sink.failed
        && !sink.out.has_output()
        && sink.flush_inline(outbox)
    {
        return;
    }
    outbox.wake.notify_one();
}

/// The connection's writer task: writes what the outbox holds whenever it is woken, sends a
/// heartbeat when nothing was written for `heartbeat`, and shuts the socket down once the
/// outbox is closing and empty, or after a failed write.
pub(crate) async fn write_loop(outbox: Arc<Output>, heartbeat: Duration) {
    let mut ticker = tokio::time::interval(heartbeat / 2);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut tick = false;
        if !outbox.is_closing() {
            tokio::select! {
                _ = outbox.wake.notified() => {}
                _ = ticker.tick() => tick = true,
            }
        }
        let mut sink = outbox.sink.lock().await;
        let Some(sink) = sink.as_mut() else {
            return;
        };
        if sink.failed {
            break;
        }
        if tick && sink.last_write.elapsed() >= heartbeat {
            outbox.push_frame(Frame::Heartbeat);
        }
        match sink.drain(&outbox).await {
            Ok(true) => {}
            Ok(false) if outbox.is_closing() => break,
            Ok(false) => {}
            Err(error) => {
                match &error {
                    // The peer went away or stopped reading: the reader cleans up.
                    OutputError::Socket(_) => debug!(%error, "connection output stopped"),
                    OutputError::SlowConsumer(_) => {
                        warn!(%error, "closing connection");
                        outbox.writer_failed(error.to_string());
                    }
                    OutputError::Frame(_) | OutputError::Delivery(_) => {
                        warn!(%error, "closing connection")
                    }
                }
                sink.failed = true;
                break;
            }
        }
    }
    let sink = outbox.sink.lock().await.take();
    if let Some(mut sink) = sink {
        let _ = sink.socket.shutdown().await;
    }
    outbox.end_writer();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Out;
    use bytes::BytesMut;
    use std::time::Instant;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpSocket, TcpStream};
    use wharf_protocol::{Confirm, ConfirmRange, ConfirmStatus, Durability, decode};

    const FRAME_BYTES_MAX: u32 = 1 << 20;

    /// An outbox whose sink writes to a loopback socket, and the peer's end of it. No writer
    /// task runs until a test spawns one. Small socket buffers, so that they fill quickly.
    async fn connected_outbox() -> (Arc<Output>, TcpStream) {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_send_buffer_size(4096).expect("send buffer");
        socket
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind");
        let address = socket.local_addr().expect("address");
        let listener: TcpListener = socket.listen(4).expect("listen");
        let client = TcpSocket::new_v4().expect("socket");
        client.set_recv_buffer_size(4096).expect("receive buffer");
        let (client, accepted) = tokio::join!(client.connect(address), listener.accept());
        let (server, _) = accepted.expect("accept");
        let (_, write_half) = crate::transport::Stream::Plain(server).split();
        let outbox = Arc::new(Output::default());
        *outbox.sink.try_lock().expect("not shared yet") = Some(Sink::new(
            write_half,
            FRAME_BYTES_MAX,
            Duration::from_secs(30),
        ));
        (outbox, client.expect("connect"))
    }

    fn confirm(seq: u64) -> Frame {
        Frame::Confirm(Confirm {
            ranges: vec![ConfirmRange {
                first_seq: seq,
                last_seq: seq,
                status: ConfirmStatus::Confirmed(Durability::InMemory),
            }],
        })
    }

    /// Whether the outbox's writer task would be woken (a `notify_one` permit is stored).
    async fn writer_woken(outbox: &Outbox) -> bool {
        tokio::time::timeout(Duration::ZERO, outbox.wake.notified())
            .await
            .is_ok()
    }

    /// Reads frames until `n_frames` arrived; checks that they are the confirms `first..` in
    /// order.
    async fn read_confirms(client: &mut TcpStream, first: u64, n_frames: u64) {
        let mut buf = BytesMut::new();
        let mut expected = first;
        let deadline = Instant::now() + Duration::from_secs(10);
        while expected < first + n_frames {
            while let Some(frame) = decode(&mut buf, FRAME_BYTES_MAX).expect("well-formed") {
                assert_eq!(frame, confirm(expected), "frames out of order");
                expected += 1;
            }
            if expected == first + n_frames {
                break;
            }
            let read = tokio::time::timeout_at(deadline.into(), client.read_buf(&mut buf))
                .await
                .expect("frames arrive within 10 s")
                .expect("read");
            assert!(read > 0, "the socket closed after {expected} frames");
        }
        assert!(buf.is_empty(), "nothing follows the last frame");
    }

    #[tokio::test]
    async fn a_small_held_output_is_written_inline_without_waking_the_writer() {
        let (outbox, mut client) = connected_outbox().await;
        outbox.push_frame_held(confirm(1));
        outbox.push_frame_held(confirm(2));
        flush_or_wake(&outbox);
        assert!(!writer_woken(&outbox).await, "the writer task was woken");
        assert_eq!(outbox.queued_bytes(), 0);
        // No writer task exists: the frames can only have been written inline.
        read_confirms(&mut client, 1, 2).await;
    }

    #[tokio::test]
    async fn flushing_an_empty_outbox_writes_nothing_and_keeps_the_heartbeat_clock() {
        let (outbox, _client) = connected_outbox().await;
        let last_write = |outbox: &Output| {
            outbox
                .sink
                .try_lock()
                .expect("idle")
                .as_ref()
                .expect("installed")
                .last_write
        };
        let before = last_write(&outbox);
        // A reader flushes its own outbox after every batch, even one that queued nothing
        // (a client's heartbeat): that is not a write, or server heartbeats would stop.
        let later = Instant::now() + Duration::from_millis(2);
        while Instant::now() < later {
            flush_or_wake(&outbox);
        }
        assert_eq!(last_write(&outbox), before);
        assert!(!writer_woken(&outbox).await);
    }

    #[tokio::test]
    async fn a_large_held_output_is_left_to_the_writer_task_which_writes_it_in_order() {
        let (outbox, mut client) = connected_outbox().await;
        let n_frames = (INLINE_WRITE_BYTES_MAX / 64 + 1) as u64;
        for seq in 1..=n_frames {
            outbox.push_frame_held(confirm(seq));
        }
        flush_or_wake(&outbox);
        assert!(writer_woken(&outbox).await, "the writer task was not woken");
        assert!(
            outbox.queued_bytes() > INLINE_WRITE_BYTES_MAX,
            "written inline"
        );
        outbox.wake.notify_one(); // the permit taken by the check above
        let writer = tokio::spawn(write_loop(outbox.clone(), Duration::from_secs(60)));
        read_confirms(&mut client, 1, n_frames).await;
        outbox.close();
        writer
            .await
            .expect("the writer task ends once the outbox is closed");
    }

    #[tokio::test]
    async fn held_deliveries_too_large_for_an_inline_write_wake_the_writer_at_once() {
        let (outbox, _client) = connected_outbox().await;
        let mut burst = vec![Out::Frame(Box::new(confirm(1)))];
        outbox.push_many_held(&mut burst);
        assert!(
            !writer_woken(&outbox).await,
            "a small burst woke the writer"
        );
        // The writer starts on a large output while the reader still applies its batch.
        let n_frames = INLINE_WRITE_BYTES_MAX / 64 + 1;
        let mut burst: Vec<Out> = (0..n_frames)
            .map(|seq| Out::Frame(Box::new(confirm(seq as u64 + 2))))
            .collect();
        outbox.push_many_held(&mut burst);
        assert!(
            writer_woken(&outbox).await,
            "a large burst did not wake the writer"
        );
    }

    #[tokio::test]
    async fn output_held_while_the_writer_task_writes_wakes_it_instead() {
        let (outbox, mut client) = connected_outbox().await;
        let busy = outbox.sink.try_lock().expect("idle");
        outbox.push_frame_held(confirm(1));
        flush_or_wake(&outbox);
        assert!(writer_woken(&outbox).await, "the writer task was not woken");
        assert!(
            outbox.queued_bytes() > 0,
            "written although the sink was busy"
        );
        drop(busy);
        outbox.wake.notify_one();
        let writer = tokio::spawn(write_loop(outbox.clone(), Duration::from_secs(60)));
        read_confirms(&mut client, 1, 1).await;
        outbox.close();
        writer.await.expect("writer ends");
    }

    #[tokio::test]
    async fn what_a_full_socket_leaves_of_an_inline_write_is_sent_first_by_the_writer_task() {
        let (outbox, mut client) = connected_outbox().await;
        // The client reads nothing, so the socket's buffers fill: an inline write stops part
        // way and leaves the rest of its output (maybe half a frame) for the writer task.
        let mut seq = 0;
        while !writer_woken(&outbox).await {
            assert!(seq < 10_000_000, "the socket never filled");
            for _ in 0..100 {
                seq += 1;
                outbox.push_frame_held(confirm(seq));
            }
            flush_or_wake(&outbox);
        }
        // Later output queues behind the leftover and must follow it on the wire.
        for _ in 0..100 {
            seq += 1;
            outbox.push_frame(confirm(seq));
        }
        let writer = tokio::spawn(write_loop(outbox.clone(), Duration::from_secs(60)));
        read_confirms(&mut client, 1, seq).await;
        outbox.close();
        writer.await.expect("writer ends");
    }

    #[tokio::test]
    async fn a_failed_inline_write_ends_the_writer_task() {
        let (outbox, client) = connected_outbox().await;
        drop(client);
        // Writes to a closed peer fail once the reset came back (the first may still succeed).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            outbox.push_frame_held(confirm(1));
            flush_or_wake(&outbox);
            if outbox
                .sink
                .try_lock()
                .expect("idle")
                .as_ref()
                .expect("installed")
                .failed
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "writes to a closed peer kept succeeding"
            );
            tokio::task::yield_now().await;
        }
        // A failed sink writes nothing more inline: its output goes to the writer task,
        // which is woken to end the connection's writing.
        let _ = writer_woken(&outbox).await;
        outbox.push_frame_held(confirm(2));
        flush_or_wake(&outbox);
        assert!(outbox.queued_bytes() > 0, "written inline to a failed sink");
        assert!(writer_woken(&outbox).await, "the writer task was not woken");
        let writer = tokio::spawn(write_loop(outbox.clone(), Duration::from_secs(60)));
        tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .expect("the writer task ends after a failed write")
            .expect("writer ends");
        assert!(
            outbox.sink.try_lock().expect("idle").is_none(),
            "socket shut"
        );
    }
}
