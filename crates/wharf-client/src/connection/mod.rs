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
//!
//! This module holds the shared state ([`ConnectionShared`]: requests, publishes, settlements,
//! consumers' registration, closing and failing) and [`open`], which ties the parts together;
//! `handshake` opens the socket, `reader` and `writer` are the two tasks, `leases` is the lease
//! extender and the leases it keeps alive, `subscription` is a consumer as the connection sees
//! it. The connection knows nothing of the public `Consumer` and `Delivery` (`consumer.rs`):
//! the reader hands each consumer the wire deliveries, which its stream wraps.

mod coalesce;
mod handshake;
mod leases;
mod reader;
mod subscription;
mod writer;

pub(crate) use subscription::{ConsumerEnd, ConsumerShared, ConsumerSlot, ReceivedBatch};

use crate::addr::ServerAddr;
use crate::confirms::{Completed, ConfirmTracker, Outcome, Permits, Waiter};
use crate::error::ClientError;
use crate::message::Message;
use crate::options::ClientOptions;
use bytes::{Bytes, BytesMut};
pub(crate) use coalesce::{BATCH_ENTRY_OVERHEAD_BYTES, BATCH_FRAME_OVERHEAD_BYTES};
use coalesce::{FrameLimits, QueuedPublish, entry_bytes_max};
use handshake::handshake;
use leases::{Lease, run_lease_extender};
use reader::run_reader;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::time::{Instant, timeout};
use wharf_protocol::limits::{BATCH_MESSAGES_MAX, NAME_BYTES_MAX, PROTOCOL_MINOR};
use wharf_protocol::{Close, ErrorCode, Frame, Publish, Request, Response, ServerLimits, WireStr};
use writer::run_writer;

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
    /// Write one message of a `publish` call, coalesced with the publishes queued next to it
    /// into one `PublishBatch` frame (see `coalesce`).
    PublishOne(QueuedPublish),
    /// Ack one delivery; consecutive acks become one `AckRanges` frame, written after any
    /// publish queued before or among them and before any other frame queued after them.
    Ack(u64),
    /// Write the client's `Close`; nothing but `CloseOk` may follow it.
    Close(Bytes),
    /// Write what precedes, then shut the socket's write side and stop.
    Shutdown,
}

/// What [`ConnectionShared::send_settlement`] queues.
pub(crate) enum Settlement {
    /// A plain ack of the delivery: the writer sends the acks queued together as one
    /// `AckRanges` frame.
    Ack,
    /// An encoded frame (`Nack`, `Reject`, `Defer`, `Ack { multiple }`, `Touch`).
    Frame(Bytes),
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
    /// `coalesced_frame_limits().entries_bytes_max()`, computed once: a publish larger than
    /// this goes alone, encoded at the call.
    coalesced_entries_bytes_max: usize,
    /// The exchange and routing key of the last publish queued for coalescing (see
    /// `coalesce::QueuedPublish::route`).
    last_route: Mutex<(String, String)>,
    /// Set (under the state lock) once `closing` or `terminal` is: lets [`check_open`] skip
    /// the lock on the hot path of publishes.
    ///
    /// [`check_open`]: ConnectionShared::check_open
    not_open: AtomicBool,
    /// `true` stops both tasks at once (lost connection, close timeout).
    hard_shutdown: watch::Sender<bool>,
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
        if !self.not_open.load(Ordering::Acquire) {
            return Ok(());
        }
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

    /// Limits of the frames the writer coalesces single publishes into.
    pub(crate) fn coalesced_frame_limits(&self) -> FrameLimits {
        coalesced_frame_limits(&self.limits)
    }

    /// Queues one publish once the windows (`own_window`: the publisher's, if any, then the
    /// connection's) and the outbound buffer have room, and returns what its confirm will be
    /// sent on. The writer coalesces it with its neighbours into one `PublishBatch` frame
    /// (`coalesce`); a message too large to share a frame goes alone, encoded here, and an
    /// error here means nothing was sent.
    pub(crate) async fn queue_publish(
        &self,
        own_window: Option<&Arc<Semaphore>>,
        exchange: &str,
        routing_key: &str,
        message: Message,
    ) -> Result<oneshot::Receiver<Outcome>, ClientError> {
        self.check_open()?;
        let (properties, body) = message.into_wire(self.protocol_minor)?;
        let bytes_max = entry_bytes_max(exchange, routing_key, &properties, &body);
        let (waiter, receiver) = oneshot::channel();
        if exchange.len() > NAME_BYTES_MAX
            || routing_key.len() > NAME_BYTES_MAX
            || bytes_max > self.coalesced_entries_bytes_max
        {
            // Encoding has the last word on what is too large or too long.
            let chunks = self.encode_publish_frame(&Frame::Publish(Publish {
                exchange: WireStr::copy_from_str(exchange),
                routing_key: WireStr::copy_from_str(routing_key),
                properties,
                body,
            }))?;
            let permits = self.window_permits(own_window).await?;
            let permits = permits.into_iter().flatten().collect();
            self.send_publish(chunks, 1, Waiter::One(waiter), permits)
                .await?;
            return Ok(receiver);
        }
        let permits = self.window_permits(own_window).await?;
        let n_permits = bytes_max.clamp(1, self.options.outbound_bytes_max.max(1));
        let n_permits = u32::try_from(n_permits).unwrap_or(u32::MAX);
        let outbound = match self
            .outbound_bytes
            .clone()
            .try_acquire_many_owned(n_permits)
        {
            Ok(permit) => permit,
            Err(_) => self
                .outbound_bytes
                .clone()
                .acquire_many_owned(n_permits)
                .await
                .map_err(|_| self.terminal_error())?,
        };
        // Compared and queued under one lock, so the writer sees routes in the order they
        // were compared: `route: None` means "the previous queued publish's".
        let mut last = self
            .last_route
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let route = if last.0 != exchange || last.1 != routing_key {
            last.0.clear();
            last.0.push_str(exchange);
            last.1.clear();
            last.1.push_str(routing_key);
            Some((
                WireStr::copy_from_str(exchange),
                WireStr::copy_from_str(routing_key),
            ))
        } else {
            None
        };
        // Sending on the unbounded channel never blocks, so it may happen under the lock.
        self.send(Command::PublishOne(QueuedPublish {
            route,
            properties,
            body,
            bytes_max,
            waiter,
            permits,
            outbound,
        }))?;
        drop(last);
        Ok(receiver)
    }

    /// One confirm-window permit of `own_window` (if any) and one of the connection's,
    /// waiting for room.
    async fn window_permits(
        &self,
        own_window: Option<&Arc<Semaphore>>,
    ) -> Result<[Option<OwnedSemaphorePermit>; 2], ClientError> {
        let mut permits = [None, None];
        for (slot, window) in permits
            .iter_mut()
            .zip([own_window, Some(&self.publish_window)])
        {
            let Some(window) = window else { continue };
            *slot = Some(match window.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => window
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| self.terminal_error())?,
            });
        }
        Ok(permits)
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
        settlement: Settlement,
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
            let command = match settlement {
                Settlement::Ack => Command::Ack(delivery_tag),
                Settlement::Frame(bytes) => Command::Frame(bytes),
            };
            self.commands.send(command).is_ok()
        };
        if queued {
            Ok(())
        } else {
            Err(self.terminal_error())
        }
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
            self.not_open.store(true, Ordering::Release);
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
            self.not_open.store(true, Ordering::Release);
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
}

/// Limits of the frames the writer coalesces single publishes into, for a server's limits.
fn coalesced_frame_limits(limits: &ServerLimits) -> FrameLimits {
    let n_messages_max = [
        limits.batch_messages_max,
        limits.publishes_in_flight_max,
        BATCH_MESSAGES_MAX,
    ]
    .into_iter()
    .min()
    .unwrap_or(1)
    .max(1) as usize;
    FrameLimits {
        n_messages_max,
        frame_bytes_max: limits.frame_bytes_max,
    }
}

/// Opens a connection: TCP, preambles, `Hello` / `HelloOk` (bounded by `connect_timeout`),
/// then starts the reader and writer tasks.
pub(crate) async fn open(
    addr: ServerAddr,
    options: ClientOptions,
) -> Result<ConnectionHandle, ClientError> {
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
    let shared = Arc::new(ConnectionShared {
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
        coalesced_entries_bytes_max: coalesced_frame_limits(&limits).entries_bytes_max(),
        last_route: Mutex::new((String::new(), String::new())),
        not_open: AtomicBool::new(false),
        hard_shutdown,
    });
    let heartbeat =
        (limits.heartbeat_ms > 0).then(|| Duration::from_millis(u64::from(limits.heartbeat_ms)));
    let (read_half, write_half) = stream.split();
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
    Ok(ConnectionHandle {
        inner: Arc::new(KeepOpen { shared }),
    })
}

/// A handle that keeps the connection open: [`crate::Client`], [`crate::Consumer`] and
/// [`crate::Publisher`] each hold a clone, and when the last clone goes away the connection
/// closes (`Close`, then the tasks end within `close_timeout`). Deliveries hold only the
/// [`ConnectionShared`]: they do not keep the connection open.
#[derive(Clone)]
pub(crate) struct ConnectionHandle {
    inner: Arc<KeepOpen>,
}

impl ConnectionHandle {
    /// The connection's shared state.
    pub(crate) fn shared(&self) -> &Arc<ConnectionShared> {
        &self.inner.shared
    }
}

/// Closes the connection when the last [`ConnectionHandle`] clone goes away.
struct KeepOpen {
    shared: Arc<ConnectionShared>,
}

impl Drop for KeepOpen {
    fn drop(&mut self) {
        let Some(ended) = self.shared.begin_close() else {
            return;
        };
        let shared = self.shared.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if timeout(shared.options.close_timeout, ended).await.is_err() {
                        shared.fail(ClientError::Closed, true);
                    }
                });
            }
            Err(_) => shared.fail(ClientError::Closed, true),
        }
    }
}
