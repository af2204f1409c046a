//! The broker state shared by all connections: the core, where each connection's output goes,
//! and the log of durable changes. One mutex guards it; it is held only while commands are
//! applied, their effects queued and their log record handed to the WAL writer — never across
//! I/O.

use crate::outbox::Out;
use crate::output::Output;
use crate::persist::journal::{Log, Outcome, PendingAppend};
use crate::persist::record::{Op, StagedOp, bind_op, declare_exchange_op, declare_queue_op};
use crate::persist::spool::Spools;
use rustc_hash::FxHashMap;
use std::sync::Arc;
use tracing::debug;
use wharf_core::{
    Broker, CancelReason, Command, ConnectionId, CoreError, DurableSync, Effect, Message, Reply,
};
use wharf_protocol::{ConsumerCancelled, ErrorCode, Frame};

/// What became of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Enqueued, and logged: confirm once the log record is on disk.
    Logged,
    /// Enqueued in memory only (or routed nowhere): confirm now.
    InMemory,
    /// Every queue with a dedup window had its id: nothing stored; confirm as duplicate.
    Duplicate,
}

/// The core, the connection registry and the pending log operations.
#[derive(Debug, Default)]
pub struct State {
    /// The broker core.
    pub broker: Broker,
    outboxes: FxHashMap<ConnectionId, Arc<Output>>,
    /// Deliveries being gathered for one outbox, pushed under one lock per burst.
    burst: Vec<Out>,
    effects: Vec<Effect>,
    /// Durable changes applied but not yet handed to the log.
    log_ops: Vec<StagedOp>,
    log: Option<Arc<Log>>,
    /// The paged tails of queues larger than memory (present when the broker pages).
    spools: Option<Spools>,
    /// What the queues of the messages in `log_ops` ask of their record (`x-sync`).
    log_sync: DurableSync,
    /// Between [`State::hold_output`] and [`State::release_output`]: deliveries are queued
    /// without waking the writers, and their outboxes listed here for the caller to flush.
    holding: bool,
    held: Vec<Arc<Output>>,
}

impl State {
    /// A state around a recovered broker, its log and its spools.
    pub fn with_log(broker: Broker, log: Arc<Log>, spools: Spools) -> Self {
        State {
            broker,
            log: Some(log),
            spools: Some(spools),
            ..State::default()
        }
    }

    /// The spools, if the broker has them.
    pub fn spools(&mut self) -> Option<&mut Spools> {
        self.spools.as_mut()
    }

    /// Bytes of paged messages the spools hold in memory (O(spools): the resource monitor's).
    pub fn spool_memory_bytes(&self) -> usize {
        self.spools.as_ref().map_or(0, Spools::bytes_in_memory)
    }

    /// The log, if the broker has one.
    pub fn log(&self) -> Option<&Arc<Log>> {
        self.log.as_ref()
    }

    /// From now until [`State::release_output`], deliveries are queued in their connections'
    /// outboxes without waking the writers: the caller (a reader applying a batch) sends them
    /// itself once it has released the lock, with `writer::flush_or_wake`, so a delivery at a
    /// low rate is written by the thread that routed it.
    pub fn hold_output(&mut self) {
        self.holding = true;
    }

    /// Ends [`State::hold_output`]: appends to `into` every outbox that was given output since
    /// (an outbox may be listed twice), which the caller must flush or wake.
    pub fn release_output(&mut self, into: &mut Vec<Arc<Output>>) {
        self.holding = false;
        into.append(&mut self.held);
    }

    /// Registers a connection with the core, in `vhost`; refused when the virtual host does
    /// not exist or has its `max_connections` open. Its outbox comes with
    /// [`State::attach`].
    pub fn open(
        &mut self,
        now_ms: u64,
        connection: ConnectionId,
        vhost: Arc<str>,
    ) -> Result<(), CoreError> {
        self.broker.apply(
            now_ms,
            Command::OpenConnection { connection, vhost },
            &mut self.effects,
        )?;
        self.route_effects();
        Ok(())
    }

    /// Gives an open connection its outbox (what the core sends it goes there from now on).
    pub fn attach(&mut self, connection: ConnectionId, outbox: Arc<Output>) {
        self.outboxes.insert(connection, outbox);
    }

    /// Removes a connection: its consumers go, its unacked messages are requeued (and may be
    /// delivered to others right away), its exclusive queues are deleted.
    pub fn close(&mut self, now_ms: u64, connection: ConnectionId) {
        self.outboxes.remove(&connection);
        match self.broker.apply(
            now_ms,
            Command::CloseConnection { connection },
            &mut self.effects,
        ) {
            Ok(_) | Err(CoreError::NotFound { .. }) => {}
            Err(err) => panic!("closing a connection failed: {err}"),
        }
    }

    /// Number of connections registered.
    pub fn n_connections(&self) -> usize {
        self.outboxes.len()
    }

    /// Bytes queued in the connections' outboxes and in their read buffers (frames on their
    /// way in), summed over every connection (O(connections): the resource monitor's).
    pub fn held_by_connections(&self) -> (usize, usize) {
        self.outboxes
            .values()
            .fold((0, 0), |(queued, read), output| {
                (queued + output.queued_bytes(), read + output.read_bytes())
            })
    }

    /// Applies a command; effects are held until [`State::route_effects`], so the caller can
    /// queue its own reply first (a `Subscribed` response before the first delivery). Durable
    /// topology changes are queued for the log.
    pub fn apply(&mut self, now_ms: u64, command: Command) -> Result<Reply, CoreError> {
        let op = match &command {
            Command::DeclareExchange {
                vhost,
                name,
                kind,
                options,
                passive: false,
            } => declare_exchange_op(vhost, name, *kind, options),
            Command::Bind {
                vhost,
                source,
                target,
                routing_key,
                arguments,
            }
            | Command::Unbind {
                vhost,
                source,
                target,
                routing_key,
                arguments,
            } => bind_op(
                &self.broker,
                vhost,
                source,
                target,
                routing_key,
                arguments,
                matches!(command, Command::Bind { .. }),
            ),
            Command::AddVhost { name, limits } | Command::SetVhostLimits { name, limits } => {
                Some(Op::DeclareVhost {
                    name: name.clone(),
                    max_connections: limits.max_connections,
                    max_queues: limits.max_queues,
                })
            }
            _ => None,
        };
        let declared_queue = match &command {
            Command::DeclareQueue {
                vhost,
                options,
                passive: false,
                declarer,
                ..
            } if options.durable && !options.exclusive => Some((
                vhost.clone(),
                options.clone(),
                declarer.as_ref().map(|declarer| declarer.name.clone()),
            )),
            _ => None,
        };
        let deleted_vhost = match &command {
            Command::DeleteVhost { name } => Some(name.clone()),
            _ => None,
        };
        let reply = self.broker.apply(now_ms, command, &mut self.effects)?;
        if let Some(op) = op {
            self.log_ops.push(op.into());
        }
        if let (Some((vhost, options, declared_by)), Reply::QueueDeclared { name, .. }) =
            (declared_queue, &reply)
        {
            let op = declare_queue_op(&vhost, name, &options, declared_by.as_deref());
            self.log_ops.extend(op.map(StagedOp::from));
        }
        if let Some(name) = deleted_vhost {
            // After the deletes of what it held, which its effects log.
            self.route_effects();
            self.log_ops.push(Op::DeleteVhost { name }.into());
        }
        Ok(reply)
    }

    /// Publishes; says whether the message must reach the log before it is confirmed, or
    /// was a duplicate that no queue took.
    pub fn publish(
        &mut self,
        now_ms: u64,
        vhost: &Arc<str>,
        message: Arc<Message>,
    ) -> Result<Published, CoreError> {
        // The hot path: no topology to log, so straight to the core.
        if message.persistent
            && let Some(log) = &self.log
            && let Some((bytes, limit)) = log.refuses_message(&message)
        {
            debug!(
                bytes,
                limit, "a persistent message too large to log was refused"
            );
            return Err(CoreError::LimitExceeded {
                what: "bytes in a persistent message as logged",
                limit,
            });
        }
        let start = self.effects.len();
        let reply = self.broker.apply(
            now_ms,
            Command::Publish {
                vhost: vhost.clone(),
                message,
            },
            &mut self.effects,
        )?;
        if let Reply::Published {
            refused_by: Some(queue),
            ..
        } = reply
        {
            // A full reject-publish queue refused its copy: the publish is refused (as RabbitMQ
            // nacks it) although the other queues kept theirs, whose effects still apply.
            return Err(CoreError::QueueFull {
                queue: queue.to_string(),
            });
        }
        if let Reply::Published {
            routed: 0,
            duplicates: 1..,
            ..
        } = reply
        {
            return Ok(Published::Duplicate);
        }
        let logged = self.effects[start..]
            .iter()
            .any(|effect| matches!(effect, Effect::DurableEnqueued { .. }));
        Ok(if logged {
            Published::Logged
        } else {
            Published::InMemory
        })
    }

    /// Writes a checkpoint now (tests and tools; the log decides when on its own otherwise).
    pub fn checkpoint_now(&mut self) {
        if let Some(log) = self.log.clone() {
            log.checkpoint_forced(&self.broker, self.spools.as_mut());
        }
    }

    /// The log's periodic work (see [`Log::housekeeping`]).
    pub fn housekeeping(&mut self) {
        if let Some(log) = self.log.clone() {
            log.housekeeping(&self.broker, self.spools.as_mut());
        }
    }

    /// Whether durable publishes are being refused (disk full, log failed), and why.
    pub fn refusing_durable(&self) -> Option<&'static str> {
        self.log.as_ref().and_then(|log| log.refusing())
    }

    /// Durable operations queued and not yet committed.
    pub fn pending_log_ops(&self) -> usize {
        self.log_ops.len()
    }

    /// Stages the queued durable operations for the log as one batch (call with the lock held:
    /// log order is then core order) and returns it, to be encoded and appended with
    /// [`PendingAppend::run`] once the lock is released. `done` runs when the batch is on disk
    /// (or failed); with nothing to log it runs at once with the strongest outcome, and nothing
    /// is returned.
    #[must_use = "a staged batch is appended when run (or dropped)"]
    pub fn commit(
        &mut self,
        done: Option<Box<dyn FnOnce(Outcome) + Send>>,
    ) -> Option<PendingAppend> {
        let mut need = std::mem::take(&mut self.log_sync);
        let Some(log) = self.log.clone() else {
            self.log_ops.clear();
            if let Some(done) = done {
                done(Ok(wharf_storage::SyncCoverage::Unsynced));
            }
            return None;
        };
        if self.log_ops.is_empty() {
            if let Some(done) = done {
                done(Ok(wharf_storage::SyncCoverage::Fsynced));
            }
            return None;
        }
        // The strongest need of the queues its messages entered; the broker's policy for
        // anything else someone may wait for (topology changes).
        if self.log_ops.iter().any(|op| !op.is_message_op()) || need == DurableSync::default() {
            need.add(None);
        }
        let sync = need.resolve(log.default_sync());
        let pending = log.stage(
            std::mem::take(&mut self.log_ops),
            sync,
            done.unwrap_or_else(|| Box::new(|_| {})),
        );
        log.maybe_checkpoint(&self.broker, self.spools.as_mut());
        Some(pending)
    }

    /// Sends every pending effect to the outbox of the connection it concerns, and queues the
    /// durable ones for the log.
    pub fn route_effects(&mut self) {
        let mut burst_to: Option<ConnectionId> = None;
        let mut effects = std::mem::take(&mut self.effects);
        for effect in effects.drain(..) {
            if let Effect::Deliver(delivery) = effect {
                // Consecutive deliveries to one connection go to its outbox in one push.
                if burst_to != Some(delivery.connection) {
                    if let Some(connection) = burst_to {
                        self.flush_burst(connection);
                    }
                    burst_to = Some(delivery.connection);
                }
                self.burst.push(Out::Deliver(delivery));
                continue;
            }
            if let Some(connection) = burst_to.take() {
                self.flush_burst(connection);
            }
            match effect {
                Effect::Deliver(_) => unreachable!("handled above"),
                Effect::ConsumerCancelled {
                    connection,
                    consumer_tag,
                    reason,
                } => {
                    if let Some(outbox) = self.outboxes.get(&connection) {
                        let reason = match reason {
                            CancelReason::QueueDeleted => "queue deleted",
                        };
                        outbox.push_frame(Frame::ConsumerCancelled(ConsumerCancelled {
                            consumer_tag: consumer_tag.0,
                            code: ErrorCode::NotFound,
                            reason: reason.to_owned(),
                        }));
                    }
                }
                Effect::DurableEnqueued {
                    durable_id,
                    queues,
                    message,
                    ready_at_ms,
                    sync,
                } => {
                    self.log_sync.merge(sync);
                    // Staged as the core's shared message and names: encoded after the lock.
                    self.log_ops.push(StagedOp::EnqueueAt {
                        durable_id,
                        queues,
                        message,
                        ready_at_ms,
                    });
                }
                Effect::DurableSettled { durable_id, queue } => {
                    self.log_ops.push(StagedOp::Settle { durable_id, queue });
                }
                Effect::DurableSettledRange {
                    first,
                    count,
                    queue,
                } => {
                    self.log_ops.push(StagedOp::SettleRange {
                        first,
                        count,
                        queue,
                    });
                }
                Effect::PageOut {
                    queue,
                    epoch,
                    level,
                    entry,
                } => self
                    .spools
                    .as_mut()
                    .expect("a paging broker has spools")
                    .push(&queue, epoch, level, &entry),
                Effect::PageIn {
                    queue,
                    epoch,
                    level,
                    max,
                    max_bytes,
                } => self
                    .spools
                    .as_mut()
                    .expect("a paging broker has spools")
                    .request(queue, epoch, level, max, max_bytes),
                Effect::PagesDropped { queue, epoch } => {
                    if let Some(spools) = self.spools.as_mut() {
                        spools.drop_tail(&queue, epoch);
                    }
                }
                Effect::QueueDeleted { name, durable } => {
                    debug!(queue = %name, durable, "queue deleted");
                    if durable {
                        self.log_ops.push(
                            Op::DeleteQueue {
                                name: name.to_string(),
                            }
                            .into(),
                        );
                    }
                }
                Effect::ExchangeDeleted { name, durable } => {
                    debug!(exchange = %name, durable, "exchange deleted");
                    if durable {
                        self.log_ops.push(
                            Op::DeleteExchange {
                                name: name.to_string(),
                            }
                            .into(),
                        );
                    }
                }
            }
        }
        if let Some(connection) = burst_to {
            self.flush_burst(connection);
        }
        assert!(self.effects.is_empty(), "routing effects applies nothing");
        self.effects = effects;
    }

    fn flush_burst(&mut self, connection: ConnectionId) {
        let Some(outbox) = self.outboxes.get(&connection) else {
            self.burst.clear();
            return;
        };
        if !self.holding {
            outbox.push_many(&mut self.burst);
            return;
        }
        outbox.push_many_held(&mut self.burst);
        // Consecutive bursts to one connection are common (a batch of publishes to one queue):
        // list it once for them. A repeat elsewhere in the list only costs an empty flush.
        if !self
            .held
            .last()
            .is_some_and(|last| Arc::ptr_eq(last, outbox))
        {
            self.held.push(outbox.clone());
        }
    }
}
