//! The broker state and the one way to change it: [`Broker::apply`] a [`Command`].
//!
//! This module holds the state ([`Broker`], connections, outstanding deliveries) and `apply`;
//! the commands' work is split by concern: `api` (the [`Command`], [`Reply`] and [`Effect`]
//! types), `topology` (exchanges, bindings, queues), `publish` (routing and enqueueing),
//! `consume` (consumers and dispatch), `settle` (acks, nacks, requeues), `dead_letter`
//! (dead-lettering and redrive), `tick` (timers), `paging` (queues larger than memory),
//! `recovery` (restoring logged messages), `queries` (read-only views) and `invariants`
//! ([`Broker::check_invariants`]).

use crate::error::{CoreError, EntityKind};
use crate::exchange::{
    BindingKey, Destination, Exchange, ExchangeKind, ExchangeOptions, HeadersMatch,
};
use crate::limits::{DEAD_LETTERS_PER_COMMAND_MAX, EXCHANGE_HOPS_MAX, HEADER_DEPTH_MAX, Limits};
use crate::message::{HeaderValue, Headers, Message};
use crate::name::{RESERVED_PREFIX, validate_name, validate_routing_key, validate_user_name};
use crate::outstanding::Outstanding;
use crate::queue::{
    Consumer, ConsumerOptions, DURATION_MS_MAX, DurableSync, Entry, Overflow, PagedEntry, Queue,
    QueueFeatures, QueueOptions, QueueStats,
};
use crate::timers::{TimerKind, Timers};
use crate::{ConnectionId, ConsumerTag, DeliveryTag, FixedState, QueueId};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

mod api;
mod consume;
mod dead_letter;
mod invariants;
mod paging;
mod publish;
mod queries;
mod recovery;
mod settle;
mod tick;
mod topology;
mod vhosts;

pub use api::{
    BUILTIN_EXCHANGES, BindTarget, BindingInfo, CancelReason, Command, DEFAULT_EXCHANGE, Declarer,
    Delivery, Effect, ExchangeInfo, QueueFlow, Reply,
};
use dead_letter::{DeadLetter, DeathReason};
pub use invariants::{Invariant, InvariantViolation};
use paging::{discard_paged, request_page_in};
use publish::{drop_head_over_limit, hold, make_ready};
use settle::{Settle, requeue_entry};
use tick::{arm_ttl, expire_entry};
use topology::check_header_depth;
use vhosts::Namespace;
pub use vhosts::{DEFAULT_VHOST, VhostInfo, VhostLimits, resource_key, split_resource_key};

#[derive(Debug, Clone)]
struct Unacked {
    queue: QueueId,
    consumer_tag: ConsumerTag,
    entry: Entry,
    /// (lapses at, ack timeout) when the consumer has an ack timeout.
    lease: Option<(u64, u64)>,
}

/// Runs of lapsed delivery tags (leases lapsed, consumers cancelled with deliveries
/// outstanding) a connection remembers, so that settling one late is a harmless no-op
/// instead of an unknown tag; the oldest are forgotten past this. A cancel lapses its
/// consumer's tags together, mostly in one run, however many.
const LAPSED_TAG_RUNS_MAX: usize = 65_536;

/// Timers fired by one [`Command::Tick`] at most; the rest stay due, so the server ticks again
/// at once, and other commands get the broker in between.
const TIMERS_PER_TICK_MAX: usize = 65_536;

pub use crate::limits::ROUTED_TRACKED_MAX;

#[derive(Debug, Clone)]
struct Connection {
    /// The virtual host it works in, and that virtual host's epoch when it connected.
    vhost: Arc<str>,
    vhost_epoch: u64,
    next_delivery_tag: u64,
    unacked: Outstanding<Unacked>,
    consumers: BTreeMap<ConsumerTag, QueueId>,
    exclusive_queues: Vec<QueueId>,
    /// Deliveries whose lease lapsed (they went back to their queue).
    lapsed: crate::tag_runs::TagRuns,
}

impl crate::outstanding::Weighed for Unacked {
    fn weight(&self) -> u64 {
        self.entry.message.size_bytes()
    }
}

impl Connection {
    fn new(vhost: Arc<str>, vhost_epoch: u64) -> Connection {
        Connection {
            vhost,
            vhost_epoch,
            next_delivery_tag: 0,
            unacked: Outstanding::default(),
            consumers: BTreeMap::new(),
            exclusive_queues: Vec::new(),
            lapsed: crate::tag_runs::TagRuns::default(),
        }
    }

    fn lapse(&mut self, tag: u64) {
        self.lapsed.insert(tag, LAPSED_TAG_RUNS_MAX);
    }

    /// Forgets the lapsed tags in `first..=last`; whether there were any.
    fn forget_lapsed(&mut self, first: u64, last: u64) -> bool {
        self.lapsed.remove_range(first, last)
    }
}

/// The whole broker state: exchanges, queues, consumers and outstanding deliveries.
#[derive(Debug, Clone)]
pub struct Broker {
    limits: Limits,
    /// Virtual hosts by name: each its own exchanges and queue names.
    vhosts: HashMap<Arc<str>, Namespace, FixedState>,
    next_vhost_epoch: u64,
    queues: HashMap<QueueId, Queue, FixedState>,
    /// Queues existing per declarer label ([`Declarer`]).
    queues_by_declarer: HashMap<Arc<str>, u32, FixedState>,
    connections: HashMap<ConnectionId, Connection, FixedState>,
    next_queue_id: u64,
    next_generated_name: u64,
    route_scratch: Vec<QueueId>,
    /// Queues that publishes were routed to since [`Broker::take_routed`] (distinct, at most
    /// [`ROUTED_TRACKED_MAX`]): what the server's publisher flow control looks at.
    routed: Vec<QueueId>,
    now_ms: u64,
    /// Body bytes of ready messages across all queues (for the server's memory watermark).
    ready_bytes_total: u64,
    /// The next id for a logged (persistent, durable-queue) message.
    next_durable_id: u64,
    /// Queues whose overflow mode is reject-publish: while 0, publishes skip that check.
    n_reject_publish_queues: usize,
    /// Messages that left a queue with a dead-letter exchange during the current command and
    /// are still to be republished (in order).
    dead_letters: VecDeque<DeadLetter>,
    /// Queues that received dead letters during the current command, to dispatch at its end.
    to_dispatch: Vec<QueueId>,
    /// Delays, TTLs, leases and queue expiry.
    timers: Timers,
    /// Delayed messages held by timers (all queues).
    delayed_total: u64,
}

impl Default for Broker {
    fn default() -> Self {
        Broker::new(Limits::default())
    }
}

impl Broker {
    /// A broker with the default virtual host (`/`, with the built-in exchanges) and no
    /// queues.
    pub fn new(limits: Limits) -> Self {
        let mut broker = Broker {
            limits,
            vhosts: HashMap::default(),
            next_vhost_epoch: 0,
            queues: HashMap::default(),
            queues_by_declarer: HashMap::default(),
            connections: HashMap::default(),
            next_queue_id: 1,
            next_generated_name: 1,
            route_scratch: Vec::new(),
            routed: Vec::new(),
            now_ms: 0,
            ready_bytes_total: 0,
            next_durable_id: 1,
            n_reject_publish_queues: 0,
            dead_letters: VecDeque::new(),
            to_dispatch: Vec::new(),
            timers: Timers::default(),
            delayed_total: 0,
        };
        broker
            .add_vhost(DEFAULT_VHOST.to_owned(), VhostLimits::default())
            .expect("the default virtual host is valid");
        broker
    }

    /// Body bytes of ready messages in memory across all queues (paged ones are not).
    pub fn ready_bytes_total(&self) -> u64 {
        self.ready_bytes_total
    }

    /// Bytes of the messages delivered and not yet settled, across all connections (for the
    /// server's memory budget; O(connections)).
    pub fn unacked_bytes_total(&self) -> u64 {
        self.connections
            .values()
            .map(|connection| connection.unacked.bytes())
            .sum()
    }

    /// Ready messages and their body bytes across durable queues (whose persistent messages
    /// are logged), paged ones included (O(queues)).
    pub fn durable_ready_totals(&self) -> (u64, u64) {
        let durable = self.queues.values().filter(|queue| queue.is_durable());
        durable.fold((0, 0), |(count, bytes), queue| {
            (
                count + queue.ready_total(),
                bytes + queue.ready.bytes() + queue.paged.bytes,
            )
        })
    }

    /// Messages and body bytes paged out of memory across all queues (O(queues)).
    pub fn paged_totals(&self) -> (u64, u64) {
        self.queues.values().fold((0, 0), |(count, bytes), queue| {
            (count + queue.paged.count, bytes + queue.paged.bytes)
        })
    }

    /// Messages and body bytes paged out of memory in durable queues (what a checkpoint
    /// copies from their spools; O(queues)).
    pub fn durable_paged_totals(&self) -> (u64, u64) {
        let durable = self.queues.values().filter(|queue| queue.is_durable());
        durable.fold((0, 0), |(count, bytes), queue| {
            (count + queue.paged.count, bytes + queue.paged.bytes)
        })
    }

    /// Whether the queue that `key` ([`resource_key`]) names is durable (its logged messages
    /// are what a checkpoint keeps).
    pub fn queue_is_durable(&self, key: &str) -> bool {
        let (vhost, name) = split_resource_key(key);
        self.queue_options(vhost, name)
            .is_some_and(|options| options.durable && !options.exclusive)
    }

    /// The logical time of the last command applied.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Applies one command at logical time `now_ms`. On success the effects to carry out are
    /// appended to `effects`; on error the state is unchanged and nothing is appended.
    pub fn apply(
        &mut self,
        now_ms: u64,
        command: Command,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        self.now_ms = self.now_ms.max(now_ms);
        let reply = self.apply_command(command, effects);
        if reply.is_ok() && !self.dead_letters.is_empty() {
            // Messages found expired while dispatching at the end of the command.
            self.finish_dead_letters_and_dispatch(effects);
        }
        // Debug builds check every invariant after every command while the state is small
        // (at most a few thousand queues, messages, deliveries, timers and bindings in all:
        // see `invariants::DEBUG_CHECK_ITEMS_MAX`), where the O(state) check costs little. A
        // panic here is a bug in the core, never a user mistake.
        #[cfg(debug_assertions)]
        if self.small_enough_to_check()
            && let Err(violation) = self.check_invariants()
        {
            panic!("wharf-core broke an invariant of its state: {violation}");
        }
        reply
    }

    /// The earliest time at which [`Command::Tick`] has something to do (unix ms), if any. May
    /// be earlier than needed (a timer that turns out stale), never later.
    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.next_due()
    }

    /// Delayed messages waiting in every queue: O(1).
    pub fn delayed_total(&self) -> u64 {
        self.delayed_total
    }

    fn apply_command(
        &mut self,
        command: Command,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        match command {
            Command::OpenConnection { connection, vhost } => {
                self.open_connection(connection, &vhost)
            }
            Command::AddVhost { name, limits } => self.add_vhost(name, limits),
            Command::DeleteVhost { name } => self.delete_vhost(&name, effects),
            Command::SetVhostLimits { name, limits } => self.set_vhost_limits(&name, limits),
            Command::CloseConnection { connection } => self.close_connection(connection, effects),
            Command::DeclareExchange {
                vhost,
                name,
                kind,
                options,
                passive,
            } => self.declare_exchange(&vhost, name, kind, options, passive),
            Command::DeleteExchange {
                vhost,
                name,
                if_unused,
            } => self.delete_exchange(&vhost, &name, if_unused, effects),
            Command::DeclareQueue {
                vhost,
                connection,
                name,
                options,
                passive,
                declarer,
            } => self.declare_queue(&vhost, connection, name, options, passive, declarer),
            Command::DeleteQueue {
                vhost,
                connection,
                name,
                if_unused,
                if_empty,
            } => self.delete_queue_cmd(&vhost, connection, &name, if_unused, if_empty, effects),
            Command::PurgeQueue {
                vhost,
                connection,
                name,
            } => {
                let qid = self.queue_for(&vhost, connection, &name)?;
                let queue = self
                    .queues
                    .get_mut(&qid)
                    .expect("queue ids in the name map exist");
                self.ready_bytes_total -= queue.ready.bytes();
                for entry in queue.ready.iter() {
                    if let Some(durable_id) = entry.durable_id {
                        effects.push(Effect::DurableSettled {
                            durable_id,
                            queue: queue.key.clone(),
                        });
                    }
                }
                let messages = queue.ready.clear() as u64 + discard_paged(queue, effects);
                Ok(Reply::Purged { messages })
            }
            Command::Bind {
                vhost,
                source,
                target,
                routing_key,
                arguments,
            } => self.bind(&vhost, &source, target, routing_key, arguments, effects),
            Command::Unbind {
                vhost,
                source,
                target,
                routing_key,
                arguments,
            } => self.unbind(&vhost, &source, target, routing_key, arguments, effects),
            Command::Publish { vhost, message } => self.publish(&vhost, message, effects),
            Command::Subscribe {
                vhost,
                connection,
                queue,
                consumer_tag,
                options,
            } => self.subscribe(&vhost, connection, &queue, consumer_tag, options, effects),
            Command::Cancel {
                connection,
                consumer_tag,
            } => self.cancel(connection, consumer_tag, effects),
            Command::Credit {
                connection,
                consumer_tag,
                credit,
            } => self.credit(connection, consumer_tag, credit, effects),
            Command::Ack {
                connection,
                delivery_tag,
                multiple,
            } => self.settle(connection, delivery_tag, multiple, Settle::Ack, effects),
            Command::Nack {
                connection,
                delivery_tag,
                multiple,
                requeue,
            } => {
                let how = if requeue {
                    Settle::Requeue
                } else {
                    Settle::Drop
                };
                self.settle(connection, delivery_tag, multiple, how, effects)
            }
            Command::AckRange {
                connection,
                first,
                last,
            } => self.ack_range(connection, first, last, effects),
            Command::Restore {
                vhost,
                queue,
                durable_id,
                message,
                ready_at_ms,
            } => self.restore(&vhost, &queue, durable_id, message, ready_at_ms, effects),
            Command::RestoreDedup {
                vhost,
                queue,
                message_id,
                until_ms,
            } => {
                let qid = *self
                    .ns(&vhost)?
                    .queue_names
                    .get(queue.as_str())
                    .ok_or_else(|| CoreError::not_found(EntityKind::Queue, &queue))?;
                let now_ms = self.now_ms;
                let queue = self.queues.get_mut(&qid).expect("names map to live queues");
                queue.dedup.insert(&message_id, until_ms, now_ms);
                Ok(Reply::Done)
            }
            Command::Tick => Ok(self.tick(effects)),
            Command::PageIn {
                vhost,
                queue,
                epoch,
                level,
                entries,
            } => Ok(self.page_in(&vhost, &queue, epoch, level, entries, effects)),
            Command::Defer {
                connection,
                delivery_tag,
                delay_ms,
            } => {
                if delay_ms > DURATION_MS_MAX {
                    return Err(CoreError::InvalidArgument {
                        reason: format!("a delay must be at most {DURATION_MS_MAX} ms"),
                    });
                }
                let due = self.now_ms.saturating_add(delay_ms);
                self.settle(connection, delivery_tag, false, Settle::Defer(due), effects)
            }
            Command::Touch {
                connection,
                delivery_tag,
            } => self.touch(connection, delivery_tag),
            Command::Redrive {
                vhost,
                connection,
                queue,
                max,
                into,
            } => self.redrive(&vhost, connection, &queue, max, into.as_ref(), effects),
            Command::Reject {
                connection,
                delivery_tag,
                requeue,
            } => {
                let how = if requeue {
                    Settle::Requeue
                } else {
                    Settle::Drop
                };
                self.settle(connection, delivery_tag, false, how, effects)
            }
        }
    }

    fn connection(&self, connection: ConnectionId) -> Result<&Connection, CoreError> {
        self.connections
            .get(&connection)
            .ok_or_else(|| CoreError::not_found(EntityKind::Connection, connection.0.to_string()))
    }

    fn open_connection(
        &mut self,
        connection: ConnectionId,
        vhost: &str,
    ) -> Result<Reply, CoreError> {
        if self.connections.contains_key(&connection) {
            return Ok(Reply::Done);
        }
        let name = self.vhost_name(vhost)?;
        let ns = self.ns_mut(vhost)?;
        if let Some(max) = ns.limits.max_connections
            && ns.connections >= max
        {
            return Err(CoreError::LimitExceeded {
                what: "connections in the virtual host",
                limit: max as usize,
            });
        }
        ns.connections += 1;
        let epoch = ns.epoch;
        self.connections
            .insert(connection, Connection::new(name, epoch));
        Ok(Reply::Done)
    }

    fn close_connection(
        &mut self,
        connection: ConnectionId,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        self.connection(connection)?;
        let mut conn = self.connections.remove(&connection).expect("checked above");
        if let Some(ns) = self.vhosts.get_mut(&conn.vhost)
            && ns.epoch == conn.vhost_epoch
        {
            ns.connections -= 1;
        }
        let mut touched: Vec<QueueId> = Vec::new();
        let mut lost_consumers: Vec<QueueId> = Vec::new();
        for (tag, qid) in &conn.consumers {
            if let Some(queue) = self.queues.get_mut(qid) {
                if let Some(idx) = queue.consumer_idx(connection, *tag) {
                    queue.consumers.remove(idx);
                    queue.cursor = 0;
                }
                if !touched.contains(qid) {
                    touched.push(*qid);
                    lost_consumers.push(*qid);
                }
            }
        }
        for (_, unacked) in conn.unacked.drain() {
            if let Some(queue) = self.queues.get_mut(&unacked.queue) {
                queue.unacked -= 1;
                queue.unacked_bytes -= unacked.entry.message.size_bytes();
                self.ready_bytes_total += requeue_entry(
                    queue,
                    unacked.queue,
                    &mut self.timers,
                    unacked.entry,
                    None,
                    &mut self.dead_letters,
                    effects,
                );
                if !touched.contains(&unacked.queue) {
                    touched.push(unacked.queue);
                }
            }
        }
        // Messages over their delivery limit were dead-lettered: republish them first (into
        // this connection's exclusive queues too, which are then deleted with them).
        self.republish_dead_letters(effects);
        for qid in conn.exclusive_queues {
            if self.queues.contains_key(&qid) {
                self.remove_queue(qid, effects);
            }
        }
        for qid in touched {
            let Some(queue) = self.queues.get_mut(&qid) else {
                continue;
            };
            if queue.consumers.is_empty() {
                queue.last_used_ms = self.now_ms;
            }
            if queue.options.auto_delete
                && queue.consumers.is_empty()
                && lost_consumers.contains(&qid)
            {
                self.remove_queue(qid, effects);
            } else {
                self.dispatch(qid, effects);
            }
        }
        self.dispatch_touched(effects);
        Ok(Reply::Done)
    }
}
