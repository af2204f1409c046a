//! One connection: the handshake, the writer task, the reader task and the state they share.
//!
//! - Every frame goes through one unbounded command channel to the **writer task**, which
//!   drains everything queued (`recv_many`) into one buffer per `write` syscall. Publish
//!   sequence numbers are assigned there, in channel order = socket order, so they can never
//!   race. The channel is unbounded, but everything in it is bounded elsewhere: publishes by
//!   the confirm windows and `outbound_bytes_max`, requests by their callers, settlements and
//!   credits by the consumers' prefetch.
//! - The **reader task** decodes frames and dispatches them: responses by correlation id to a
//!   oneshot, confirms by sequence number range to the publish waiters, deliveries by consumer
//!   tag to each consumer's channel, `Close` / `CloseOk` to the shutdown path.
//! - The **lease extender task** sends `Touch` for deliveries of consumers with an ack timeout
//!   that the application holds and has not settled, at about half the timeout (see
//!   [`ConnectionShared::hold_lease`]).
//! - The shared [`State`] sits behind a `std` mutex that is never held across an `.await`.

use crate::addr::ServerAddr;
use crate::confirms::{Completed, ConfirmTracker, Permits, Waiter};
use crate::consumer::{ConsumerEnd, ConsumerShared, Delivery};
use crate::error::ClientError;
use crate::options::{ClientOptions, Credentials};
use bytes::{Buf, Bytes, BytesMut};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::time::{Instant, timeout};
use wharf_protocol::limits::{FRAME_BYTES_MAX_FLOOR, PROTOCOL_MINOR};
use wharf_protocol::{
    Close, ErrorCode, Frame, Hello, HelloOk, Preamble, Request, Response, ServerLimits, Touch,
};

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

    fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.chunks.is_empty()
    }

    /// Writes everything, in order, then leaves this empty.
    async fn write_to(&mut self, write: &mut OwnedWriteHalf) -> io::Result<()> {
        if self.chunks.is_empty() {
            write.write_all(&self.buf).await?;
            self.buf.clear();
            return Ok(());
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
        Ok(())
    }
}

/// Slices per vectored write (Linux accepts 1,024): a batch of 4 KiB bodies is one slice per
/// body.
const IOV_PER_WRITE_MAX: usize = 512;

/// Capacity the read and write buffers start with and shrink back to after a large frame.
const BUFFER_BYTES: usize = 64 * 1024;

/// What the writer task is asked to do.
pub(crate) enum Command {
    /// Write a frame without bookkeeping (request, credit, close, close-ok).
    Frame(Bytes),
    /// Write a `Publish` or `PublishBatch` frame, registering its sequence numbers first. The
    /// frame comes in chunks: its header, and large bodies by reference (no copy).
    Publish {
        chunks: Vec<Bytes>,
        n_messages: usize,
        waiter: Waiter,
        /// Confirm-window permits, released when the publish is confirmed.
        permits: Permits,
        /// Outbound-buffer permit, released once the bytes are written.
        outbound: OwnedSemaphorePermit,
    },
    /// Write the client's `Close`; nothing but `CloseOk` may follow it.
    Close(Bytes),
    /// Write what precedes, then shut the socket's write side and stop.
    Shutdown,
}

/// A consumer as the reader sees it.
pub(crate) struct ConsumerSlot {
    /// Deliveries go to the consumer a frame's worth at a time (one channel operation per
    /// frame, not per message).
    pub(crate) sender: mpsc::UnboundedSender<Result<Vec<Delivery>, ClientError>>,
    pub(crate) consumer: Arc<ConsumerShared>,
}

/// A delivery of a consumer with an ack timeout that the application holds unsettled: the
/// extender touches it at `touch_at`, then every `lease_interval` of its consumer.
struct Lease {
    consumer: Arc<ConsumerShared>,
    touch_at: Instant,
}

/// How a frame queued by [`ConnectionShared::send_settlement`] affects its delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Settles this delivery (`Ack`, `Nack`, `Reject`, `Defer`).
    One,
    /// Settles this delivery and every outstanding one with a smaller tag (`Ack { multiple }`).
    UpTo,
    /// Does not settle: restarts the delivery's lease (`Touch`).
    Touch,
}

/// Everything the tasks and the handles share, behind one mutex.
struct State {
    /// Why the connection is over; `None` while it is open.
    terminal: Option<ClientError>,
    /// `close()` was called or the last `Client` dropped: no new operation starts.
    closing: bool,
    requests: HashMap<u64, oneshot::Sender<Result<Response, ClientError>>>,
    confirms: ConfirmTracker,
    consumers: HashMap<u32, ConsumerSlot>,
    /// Woken when the connection is over.
    ended_waiters: Vec<oneshot::Sender<()>>,
    /// Held deliveries whose leases the extender keeps alive, by delivery tag.
    leases: BTreeMap<u64, Lease>,
    /// When the extender wakes next (`None`: only when notified).
    lease_wake_at: Option<Instant>,
}

impl State {
    fn open_error(&self) -> Option<ClientError> {
        match &self.terminal {
            Some(err) => Some(err.clone()),
            None if self.closing => Some(ClientError::Closed),
            None => None,
        }
    }
}

/// The connection, shared by every handle and both tasks.
pub(crate) struct ConnectionShared {
    commands: mpsc::UnboundedSender<Command>,
    state: Mutex<State>,
    /// The server's limits from `HelloOk`.
    pub(crate) limits: ServerLimits,
    /// The server's software version from `HelloOk`.
    pub(crate) server_version: String,
    /// The protocol minor version both sides speak: what the client may send.
    pub(crate) protocol_minor: u16,
    /// Wakes the lease extender early (a lease due before its planned wake-up).
    lease_wake: Notify,
    pub(crate) options: ClientOptions,
    next_correlation_id: AtomicU64,
    next_consumer_tag: AtomicU32,
    /// Connection-wide confirm window: `publishes_in_flight_max` permits.
    pub(crate) publish_window: Arc<Semaphore>,
    /// Encoded publish bytes queued and not yet written: `outbound_bytes_max` permits.
    outbound_bytes: Arc<Semaphore>,
    /// `true` stops both tasks at once (lost connection, close timeout).
    hard_shutdown: watch::Sender<bool>,
    /// Lets the reader hand deliveries a strong reference (they settle through it).
    weak_self: Weak<ConnectionShared>,
}

impl ConnectionShared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent maps (no invariant spans an
        // unlock), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `Err` if no new operation may start.
    pub(crate) fn check_open(&self) -> Result<(), ClientError> {
        match self.lock().open_error() {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// The error to report when a waiter was dropped because the connection ended.
    pub(crate) fn terminal_error(&self) -> ClientError {
        self.lock().open_error().unwrap_or_else(|| {
            ClientError::lost(io::ErrorKind::BrokenPipe, "the connection's writer stopped")
        })
    }

    /// Whether the connection is over (closed, lost or closed by the server).
    pub(crate) fn is_ended(&self) -> bool {
        self.lock().terminal.is_some()
    }

    /// Encodes a publish frame with the server's frame size limit, as chunks for a vectored
    /// write: bodies of 512 bytes or more are referenced, not copied.
    pub(crate) fn encode_publish_frame(&self, frame: &Frame) -> Result<Vec<Bytes>, ClientError> {
        let mut chunks = Vec::new();
        wharf_protocol::encode_vectored(frame, self.limits.frame_bytes_max, &mut chunks)
            .map_err(ClientError::encode)?;
        Ok(chunks)
    }

    /// Encodes `frame` with the server's frame size limit.
    pub(crate) fn encode(&self, frame: &Frame) -> Result<Bytes, ClientError> {
        let mut buf = BytesMut::new();
        wharf_protocol::encode(frame, self.limits.frame_bytes_max, &mut buf)
            .map_err(ClientError::encode)?;
        Ok(buf.freeze())
    }

    /// Queues a command for the writer.
    pub(crate) fn send(&self, command: Command) -> Result<(), ClientError> {
        self.commands
            .send(command)
            .map_err(|_| self.terminal_error())
    }

    /// `Err(NotSupported)` unless the server speaks at least protocol minor `minor_required`.
    pub(crate) fn require_minor(
        &self,
        feature: &'static str,
        minor_required: u16,
    ) -> Result<(), ClientError> {
        if self.protocol_minor < minor_required {
            return Err(ClientError::NotSupported {
                feature,
                minor_required,
                server_minor: self.protocol_minor,
            });
        }
        Ok(())
    }

    /// A fresh consumer tag (1, 2, 3, ... per connection).
    pub(crate) fn next_consumer_tag(&self) -> u32 {
        self.next_consumer_tag.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh correlation id.
    fn next_correlation_id(&self) -> u64 {
        self.next_correlation_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends a request and waits (at most `request_timeout`) for its response;
    /// `Response::Error` becomes [`ClientError::Server`].
    pub(crate) async fn request(&self, request: Request) -> Result<Response, ClientError> {
        self.request_with(request, || {}).await
    }

    /// [`ConnectionShared::request`], running `on_queued` under the state lock in the same critical
    /// section that queues the frame for the writer (only if it is queued). Anything else
    /// queued under the lock (settlements, see [`ConnectionShared::send_settlement`]) is therefore
    /// either before both or after both in socket order.
    pub(crate) async fn request_with(
        &self,
        request: Request,
        on_queued: impl FnOnce(),
    ) -> Result<Response, ClientError> {
        let (correlation_id, receiver) = self.start_request(request, on_queued)?;
        self.response(correlation_id, receiver).await
    }

    /// The synchronous half of [`ConnectionShared::request_with`]: registers the request and
    /// queues its frame (running `on_queued` under the same lock); returns what to wait on.
    pub(crate) fn start_request(
        &self,
        request: Request,
        on_queued: impl FnOnce(),
    ) -> Result<(u64, oneshot::Receiver<Result<Response, ClientError>>), ClientError> {
        let correlation_id = self.next_correlation_id();
        let bytes = self.encode(&Frame::Request {
            correlation_id,
            request,
        })?;
        let (sender, receiver) = oneshot::channel();
        let queued = {
            let mut state = self.lock();
            if let Some(err) = state.open_error() {
                return Err(err);
            }
            // Sending on the unbounded channel never blocks, so it may happen under the lock.
            let queued = self.commands.send(Command::Frame(bytes)).is_ok();
            if queued {
                state.requests.insert(correlation_id, sender);
                on_queued();
            }
            queued
        };
        if !queued {
            return Err(self.terminal_error());
        }
        Ok((correlation_id, receiver))
    }

    /// Waits (at most `request_timeout`) for the response to a started request.
    async fn response(
        &self,
        correlation_id: u64,
        receiver: oneshot::Receiver<Result<Response, ClientError>>,
    ) -> Result<Response, ClientError> {
        let request_timeout = self.options.request_timeout;
        match timeout(request_timeout, receiver).await {
            Ok(Ok(Ok(Response::Error { code, message }))) => {
                Err(ClientError::Server { code, message })
            }
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.terminal_error()),
            Err(_) => {
                self.lock().requests.remove(&correlation_id);
                Err(ClientError::Timeout {
                    operation: "request",
                    after: request_timeout,
                })
            }
        }
    }

    /// Queues an encoded publish frame once the outbound buffer has room for it.
    pub(crate) async fn send_publish(
        &self,
        chunks: Vec<Bytes>,
        n_messages: usize,
        waiter: Waiter,
        permits: Permits,
    ) -> Result<(), ClientError> {
        let n_bytes: usize = chunks.iter().map(Bytes::len).sum();
        // A frame larger than the whole budget takes all of it rather than waiting forever.
        let n_permits = n_bytes.clamp(1, self.options.outbound_bytes_max.max(1));
        let n_permits = u32::try_from(n_permits).unwrap_or(u32::MAX);
        let outbound = self
            .outbound_bytes
            .clone()
            .acquire_many_owned(n_permits)
            .await
            .map_err(|_| self.terminal_error())?;
        self.check_open()?;
        self.send(Command::Publish {
            chunks,
            n_messages,
            waiter,
            permits,
            outbound,
        })
    }

    /// Queues a settlement frame (`Ack`, `Nack`, `Reject`, `Defer`) or a `Touch` of
    /// `delivery_tag`, unless the connection is over, the delivery's consumer is cancelled, or
    /// `settled` was already set (settlements set it here). The check and the queueing happen
    /// under the state lock, as does a client-side cancel's marking and queueing of `Cancel`
    /// ([`ConnectionShared::request_with`]), so a settlement can never reach the socket after its
    /// consumer's `Cancel`: after `Cancel` the server has requeued the delivery and would close
    /// the connection (`UnknownDeliveryTag`). The lease extender's touches are queued under the
    /// same lock and only for leases still registered, and settling removes the lease first,
    /// so no `Touch` ever follows the settlement of its tag either.
    pub(crate) fn send_settlement(
        &self,
        consumer: &ConsumerShared,
        delivery_tag: u64,
        settled: &AtomicBool,
        bytes: Bytes,
        settle: Settle,
    ) -> Result<(), ClientError> {
        let queued = {
            let mut state = self.lock();
            if let Some(err) = state.open_error() {
                return Err(err);
            }
            if let Some(reason) = consumer.not_settleable_reason() {
                return Err(ClientError::NotSettleable {
                    delivery_tag,
                    reason,
                });
            }
            let already_settled = match settle {
                Settle::Touch => settled.load(Ordering::Acquire),
                Settle::One | Settle::UpTo => settled.swap(true, Ordering::AcqRel),
            };
            if already_settled {
                return Err(ClientError::NotSettleable {
                    delivery_tag,
                    reason: "it was already settled",
                });
            }
            match settle {
                Settle::One => {
                    state.leases.remove(&delivery_tag);
                }
                Settle::UpTo => {
                    // Every delivery up to this tag is settled, whichever consumer it is of.
                    state.leases = match delivery_tag.checked_add(1) {
                        Some(above) => state.leases.split_off(&above),
                        None => BTreeMap::new(),
                    };
                }
                Settle::Touch => {
                    if let (Some(lease), Some(interval)) =
                        (state.leases.get_mut(&delivery_tag), consumer.lease_interval)
                    {
                        lease.touch_at = Instant::now() + interval;
                    }
                }
            }
            self.commands.send(Command::Frame(bytes)).is_ok()
        };
        if queued {
            Ok(())
        } else {
            Err(self.terminal_error())
        }
    }

    /// The application took `delivery_tag` (received at `received_at`) from a consumer with an
    /// ack timeout: keep its lease alive until it is settled or released. The first touch is
    /// due half the timeout after it was received (at once if it waited that long in the
    /// consumer's buffer).
    pub(crate) fn hold_lease(
        &self,
        consumer: &Arc<ConsumerShared>,
        delivery_tag: u64,
        received_at: Instant,
    ) {
        let Some(interval) = consumer.lease_interval else {
            return;
        };
        let touch_at = received_at + interval;
        let mut state = self.lock();
        if state.open_error().is_some() {
            return;
        }
        state.leases.insert(
            delivery_tag,
            Lease {
                consumer: consumer.clone(),
                touch_at,
            },
        );
        if state.lease_wake_at.is_none_or(|wake_at| touch_at < wake_at) {
            state.lease_wake_at = Some(touch_at);
            self.lease_wake.notify_one();
        }
    }

    /// Stops extending the lease of `delivery_tag` (the application dropped it unsettled: the
    /// broker takes it back when the lease lapses).
    pub(crate) fn release_lease(&self, delivery_tag: u64) {
        self.lock().leases.remove(&delivery_tag);
    }

    /// The extender's round: queues a `Touch` for every lease due, forgets the leases of ended
    /// consumers, and returns when the next one is due (`Ok(None)`: none held). `Err` once the
    /// connection is closing or over: the extender stops.
    fn touch_due_leases(&self) -> Result<Option<Instant>, ()> {
        let mut state = self.lock();
        if state.open_error().is_some() {
            state.leases.clear();
            return Err(());
        }
        let now = Instant::now();
        let mut due = Vec::new();
        let mut wake_at: Option<Instant> = None;
        state.leases.retain(|&delivery_tag, lease| {
            let Some(interval) = lease.consumer.lease_interval else {
                return false;
            };
            if lease.consumer.is_cancelled() {
                // Cancelled or ended: the broker requeued its deliveries; never touch them.
                return false;
            }
            if lease.touch_at <= now {
                due.push(delivery_tag);
                lease.touch_at = now + interval;
            }
            wake_at = Some(wake_at.map_or(lease.touch_at, |at| at.min(lease.touch_at)));
            true
        });
        state.lease_wake_at = wake_at;
        for delivery_tag in due {
            // Queued under the lock: ordered with settlements (see `send_settlement`).
            match self.encode(&Frame::Touch(Touch { delivery_tag })) {
                Ok(bytes) => {
                    if self.commands.send(Command::Frame(bytes)).is_err() {
                        return Err(());
                    }
                }
                Err(err) => tracing::warn!(delivery_tag, "cannot encode a Touch: {err}"),
            }
        }
        Ok(wake_at)
    }

    /// Registers a consumer before its `Subscribe` is sent, so no delivery can miss it.
    pub(crate) fn add_consumer(
        &self,
        consumer_tag: u32,
        slot: ConsumerSlot,
    ) -> Result<(), ClientError> {
        let mut state = self.lock();
        if let Some(err) = state.open_error() {
            return Err(err);
        }
        state.consumers.insert(consumer_tag, slot);
        Ok(())
    }

    /// Forgets a consumer: deliveries still arriving for it are dropped (after a `Cancel` the
    /// broker requeues them).
    pub(crate) fn remove_consumer(&self, consumer_tag: u32) {
        self.lock().consumers.remove(&consumer_tag);
    }

    /// Starts an orderly close (idempotent) and returns a receiver woken when the
    /// connection is over; `None` if it already is.
    pub(crate) fn begin_close(&self) -> Option<oneshot::Receiver<()>> {
        let (sender, receiver) = oneshot::channel();
        let send_close = {
            let mut state = self.lock();
            if state.terminal.is_some() {
                return None;
            }
            state.ended_waiters.push(sender);
            !std::mem::replace(&mut state.closing, true)
        };
        if send_close {
            let close = Frame::Close(Close {
                code: ErrorCode::Normal,
                reason: String::new(),
            });
            match self.encode(&close) {
                Ok(bytes) => {
                    let _ = self.commands.send(Command::Close(bytes));
                }
                Err(_) => self.fail(ClientError::Closed, true),
            }
        }
        Some(receiver)
    }

    /// Ends the connection with `err` (the first error wins): fails every pending request,
    /// publish and consumer, and stops the tasks (`hard`: at once; otherwise after the writer
    /// wrote what is queued, bounded by `close_timeout`).
    pub(crate) fn fail(&self, err: ClientError, hard: bool) {
        let (err, requests, completed, consumers, ended_waiters) = {
            let mut state = self.lock();
            let first = state.terminal.is_none();
            let err = state.terminal.get_or_insert(err).clone();
            if !first {
                drop(state);
                if hard {
                    self.hard_shutdown.send_replace(true);
                }
                return;
            }
            let requests = std::mem::take(&mut state.requests);
            let completed = state.confirms.fail_all(&err);
            let consumers = std::mem::take(&mut state.consumers);
            let ended_waiters = std::mem::take(&mut state.ended_waiters);
            state.leases.clear();
            (err, requests, completed, consumers, ended_waiters)
        };
        tracing::debug!(error = %err, "wharf connection ended");
        self.publish_window.close();
        self.outbound_bytes.close();
        for (_, sender) in requests {
            let _ = sender.send(Err(err.clone()));
        }
        completed.into_iter().for_each(Completed::notify);
        for (_, slot) in consumers {
            slot.consumer.mark_ended(ConsumerEnd::ConnectionEnded);
            // A consumer of a client closed on purpose just ends; otherwise it sees why.
            if !matches!(err, ClientError::Closed) {
                let _ = slot.sender.send(Err(err.clone()));
            }
        }
        for waiter in ended_waiters {
            let _ = waiter.send(());
        }
        self.lease_wake.notify_one();
        let _ = self.commands.send(Command::Shutdown);
        if hard {
            self.hard_shutdown.send_replace(true);
        } else {
            self.schedule_hard_shutdown();
        }
    }

    /// Stops the tasks after `close_timeout` in case the writer is stuck on a dead socket.
    fn schedule_hard_shutdown(&self) {
        let grace = self.options.close_timeout;
        let hard_shutdown = self.hard_shutdown.clone();
        let mut stopped = hard_shutdown.subscribe();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    // Ends early once someone else stopped the tasks.
                    let _ = timeout(grace, stopped.wait_for(|stop| *stop)).await;
                    hard_shutdown.send_replace(true);
                });
            }
            Err(_) => {
                hard_shutdown.send_replace(true);
            }
        }
    }

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
            Frame::Deliver(deliver) => {
                self.route(deliver.consumer_tag, std::iter::once(deliver.delivery))
            }
            Frame::DeliverBatch(batch) => {
                self.route(batch.consumer_tag, batch.deliveries.into_iter())
            }
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

    /// Hands deliveries to their consumer.
    fn route(&self, consumer_tag: u32, deliveries: impl Iterator<Item = wharf_protocol::Delivery>) {
        let state = self.lock();
        let Some(slot) = state.consumers.get(&consumer_tag) else {
            tracing::debug!(
                consumer_tag,
                "deliveries for an unknown or cancelled consumer dropped"
            );
            return;
        };
        let shared = self.self_ref();
        let received_at = Instant::now();
        let batch: Vec<Delivery> = deliveries
            .map(|delivery| {
                Delivery::new(delivery, slot.consumer.clone(), shared.clone(), received_at)
            })
            .collect();
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

    fn self_ref(&self) -> Arc<ConnectionShared> {
        self.weak_self
            .upgrade()
            .expect("the reader runs while the connection is referenced")
    }
}

/// Whether the reader continues.
enum Flow {
    Continue,
    Stop,
}

/// Opens a connection: TCP, preambles, `Hello` / `HelloOk` (bounded by `connect_timeout`),
/// then starts the reader and writer tasks.
pub(crate) async fn open(
    addr: ServerAddr,
    options: ClientOptions,
) -> Result<Arc<ConnectionShared>, ClientError> {
    let connect_timeout = options.connect_timeout;
    let (stream, read_buf, hello_ok) =
        match timeout(connect_timeout, handshake(&addr, &options)).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(ClientError::Timeout {
                    operation: "connect",
                    after: connect_timeout,
                });
            }
        };
    let limits = hello_ok.limits;
    let protocol_minor = hello_ok.protocol_minor.min(PROTOCOL_MINOR);
    tracing::debug!(%addr, server = %hello_ok.server_version, ?limits, protocol_minor, "wharf connection open");
    let (commands, command_receiver) = mpsc::unbounded_channel();
    let (hard_shutdown, _) = watch::channel(false);
    let outbound_bytes_max = options.outbound_bytes_max.clamp(1, Semaphore::MAX_PERMITS);
    let shared = Arc::new_cyclic(|weak_self| ConnectionShared {
        commands,
        state: Mutex::new(State {
            terminal: None,
            closing: false,
            requests: HashMap::new(),
            confirms: ConfirmTracker::new(),
            consumers: HashMap::new(),
            ended_waiters: Vec::new(),
            leases: BTreeMap::new(),
            lease_wake_at: None,
        }),
        limits,
        server_version: hello_ok.server_version,
        protocol_minor,
        lease_wake: Notify::new(),
        options,
        next_correlation_id: AtomicU64::new(1),
        next_consumer_tag: AtomicU32::new(1),
        publish_window: Arc::new(Semaphore::new(limits.publishes_in_flight_max as usize)),
        outbound_bytes: Arc::new(Semaphore::new(outbound_bytes_max)),
        hard_shutdown,
        weak_self: weak_self.clone(),
    });
    let heartbeat =
        (limits.heartbeat_ms > 0).then(|| Duration::from_millis(u64::from(limits.heartbeat_ms)));
    let (read_half, write_half) = stream.into_split();
    tokio::spawn(run_writer(
        shared.clone(),
        write_half,
        command_receiver,
        heartbeat,
    ));
    tokio::spawn(run_reader(shared.clone(), read_half, read_buf, heartbeat));
    if protocol_minor >= wharf_protocol::MINOR_QUEUE_FEATURES {
        tokio::spawn(run_lease_extender(shared.clone()));
    }
    Ok(shared)
}

/// Touches the leases of held deliveries when they are due (see [`ConnectionShared::hold_lease`]);
/// sleeps while none is due. Ends with the connection.
async fn run_lease_extender(shared: Arc<ConnectionShared>) {
    let mut stop = shared.hard_shutdown.subscribe();
    loop {
        let Ok(wake_at) = shared.touch_due_leases() else {
            return;
        };
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            _ = shared.lease_wake.notified() => {}
            _ = tokio::time::sleep_until(wake_at.unwrap_or_else(Instant::now)), if wake_at.is_some() => {}
        }
    }
}

async fn handshake(
    addr: &ServerAddr,
    options: &ClientOptions,
) -> Result<(TcpStream, BytesMut, HelloOk), ClientError> {
    let connect_error = |source: io::Error| ClientError::Connect {
        addr: addr.to_string(),
        source: Arc::new(source),
    };
    let mut stream = TcpStream::connect((addr.host(), addr.port()))
        .await
        .map_err(connect_error)?;
    // Small frames (acks, credits, requests) must not wait for Nagle; the writer coalesces.
    stream.set_nodelay(true).map_err(connect_error)?;
    stream
        .write_all(&Preamble::CURRENT.encode())
        .await
        .map_err(connect_error)?;

    let mut buf = BytesMut::with_capacity(BUFFER_BYTES);
    let preamble = loop {
        match Preamble::decode(&buf) {
            Ok(Some(preamble)) => break preamble,
            Ok(None) => {}
            Err(err) => {
                return Err(ClientError::Handshake {
                    detail: err.to_string(),
                });
            }
        }
        if stream.read_buf(&mut buf).await.map_err(connect_error)? == 0 {
            return Err(ClientError::Handshake {
                detail: "the server closed the connection before its preamble".into(),
            });
        }
    };
    buf.advance(Preamble::BYTES);
    if let Err(err) = preamble.check_supported() {
        // The server explains with a `Close` (its layout is the same in every version).
        return Err(
            match read_frame(&mut stream, &mut buf, options.frame_bytes_max).await {
                Ok(Some(Frame::Close(close))) => ClientError::ServerClosed {
                    code: close.code,
                    reason: close.reason,
                },
                _ => ClientError::ServerClosed {
                    code: ErrorCode::UnsupportedVersion,
                    reason: err.to_string(),
                },
            },
        );
    }

    let credentials = match (&options.credentials, addr.user()) {
        (Credentials::Anonymous, Some((username, password))) => {
            Credentials::plain(username, password)
        }
        (credentials, _) => credentials.clone(),
    };
    let hello = Frame::Hello(Hello {
        client_name: options.client_name.clone(),
        credentials: credentials.to_wire(),
        frame_bytes_max: options.frame_bytes_max.max(FRAME_BYTES_MAX_FLOOR),
        heartbeat_ms: options.heartbeat_ms,
    });
    let mut out = BytesMut::new();
    wharf_protocol::encode(&hello, FRAME_BYTES_MAX_FLOOR, &mut out).map_err(ClientError::encode)?;
    stream.write_all(&out).await.map_err(connect_error)?;

    match read_frame(
        &mut stream,
        &mut buf,
        options.frame_bytes_max.max(FRAME_BYTES_MAX_FLOOR),
    )
    .await?
    {
        Some(Frame::HelloOk(hello_ok)) => {
            let limits = hello_ok.limits;
            if limits.frame_bytes_max < FRAME_BYTES_MAX_FLOOR
                || limits.publishes_in_flight_max == 0
                || limits.batch_messages_max == 0
            {
                return Err(ClientError::Handshake {
                    detail: format!("the server announced unusable limits {limits:?}"),
                });
            }
            Ok((stream, buf, hello_ok))
        }
        Some(Frame::Close(close)) => {
            out.clear();
            if wharf_protocol::encode(&Frame::CloseOk, FRAME_BYTES_MAX_FLOOR, &mut out).is_ok() {
                let _ = stream.write_all(&out).await;
            }
            Err(ClientError::ServerClosed {
                code: close.code,
                reason: close.reason,
            })
        }
        Some(other) => Err(ClientError::Handshake {
            detail: format!("expected HelloOk, got frame kind {}", other.kind()),
        }),
        None => Err(ClientError::Handshake {
            detail: "the server closed the connection during the handshake".into(),
        }),
    }
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
async fn read_frame<R: AsyncRead + Unpin>(
    read: &mut R,
    buf: &mut BytesMut,
    frame_bytes_max: u32,
) -> Result<Option<Frame>, ClientError> {
    loop {
        match wharf_protocol::decode(buf, frame_bytes_max) {
            Ok(Some(frame)) => return Ok(Some(frame)),
            Ok(None) => {}
            Err(err) => return Err(ClientError::Protocol(Arc::new(err))),
        }
        let n_read = read
            .read_buf(buf)
            .await
            .map_err(|err| ClientError::ConnectionLost(Arc::new(err)))?;
        if n_read == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(ClientError::lost(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection mid-frame",
            ));
        }
    }
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

async fn run_reader(
    shared: Arc<ConnectionShared>,
    mut read: OwnedReadHalf,
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

async fn run_writer(
    shared: Arc<ConnectionShared>,
    mut write: OwnedWriteHalf,
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
        {
            let mut state = shared.lock();
            for command in batch.drain(..) {
                if shutdown {
                    break;
                }
                match command {
                    Command::Frame(bytes) => out.push(bytes),
                    Command::Publish {
                        chunks,
                        n_messages,
                        waiter,
                        permits,
                        outbound,
                    } => {
                        // After our `Close`, or once the connection failed, the waiter is
                        // dropped and reports the terminal error.
                        if close_sent || state.terminal.is_some() {
                            continue;
                        }
                        // Numbered here, in socket order: nothing else assigns sequence numbers.
                        state.confirms.register(n_messages, waiter, permits);
                        chunks.into_iter().for_each(|chunk| out.push(chunk));
                        written_permits.push(outbound);
                    }
                    Command::Close(bytes) => {
                        close_sent = true;
                        out.push(bytes);
                    }
                    Command::Shutdown => shutdown = true,
                }
            }
            batch.clear();
        }
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

    #[tokio::test]
    async fn read_frame_reports_clean_eof_and_mid_frame_eof_differently() {
        let mut buf = BytesMut::new();
        let mut empty: &[u8] = &[];
        assert!(
            read_frame(&mut empty, &mut buf, FRAME_BYTES_MAX_FLOOR)
                .await
                .unwrap()
                .is_none()
        );
        let mut encoded = BytesMut::new();
        wharf_protocol::encode(&Frame::Heartbeat, FRAME_BYTES_MAX_FLOOR, &mut encoded).unwrap();
        let mut partial: &[u8] = &encoded[..encoded.len() - 1];
        let err = read_frame(&mut partial, &mut buf, FRAME_BYTES_MAX_FLOOR)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::ConnectionLost(ref io) if io.kind() == io::ErrorKind::UnexpectedEof)
        );
    }
}
