//! The invariants of the broker state, checked from scratch: every cached counter is recounted
//! from the data it summarises, and every invariant of `docs/ARCHITECTURE.md` ("Invariants of
//! the state") that the data structures allow checking is checked.
//!
//! [`Broker::check_invariants`] is O(state). The model-based and paging property tests call it
//! after every step; debug builds call it after every command while the state is small (see
//! [`Broker::small_enough_to_check`]).

use super::{Broker, Connection, Unacked};
use crate::exchange::Destination;
use crate::queue::Queue;
use crate::timers::TimerKind;
use crate::{ConnectionId, ConsumerTag, QueueId};
use std::collections::{BTreeSet, HashMap, HashSet};

/// Debug builds check the invariants after a command only while the state holds at most this
/// many items (queues, ready messages, outstanding deliveries, timers, bindings): the check is
/// O(state), so this keeps it to a few microseconds per command.
#[cfg(debug_assertions)]
pub(super) const DEBUG_CHECK_ITEMS_MAX: usize = 4_096;

/// An invariant of the broker state (see `docs/ARCHITECTURE.md`, wharf-core).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Invariant {
    /// The broker's `ready_bytes_total` is the sum of its queues' ready bytes in memory.
    ReadyBytesTotal,
    /// The broker's `delayed_total` is the number of delayed messages held by timers.
    DelayedTotal,
    /// The broker's count of reject-publish queues is the number of queues that refuse
    /// publishes when full.
    RejectPublishQueues,
    /// A queue's cached count and bytes of ready messages match its ready messages.
    QueueReadyCount,
    /// A queue's ready messages are sorted by priority, then arrival (strictly).
    ReadyOrder,
    /// A queue's expiry index holds exactly its ready messages with a TTL.
    ExpiryIndex,
    /// A queue's `unacked` is the number of deliveries outstanding from it, and its
    /// `unacked_bytes` their body bytes.
    QueueUnacked,
    /// A queue's `delayed` is the number of its messages held by timers.
    QueueDelayed,
    /// A consumer's `unacked` is the number of deliveries outstanding to it.
    ConsumerUnacked,
    /// A consumer holds no more than its prefetch allows (credit, unacked deliveries).
    ConsumerCapacity,
    /// A consumer is registered both on its queue and on its (live) connection.
    ConsumerIndex,
    /// A message copy is in exactly one place: no arrival position or log id of a queue is
    /// both ready and outstanding, twice in either, delayed twice or paged twice.
    OnePlace,
    /// A connection's delivery tags are strictly increasing and were issued by it.
    DeliveryTags,
    /// An outstanding delivery belongs to a live consumer of a live queue, or to a queue
    /// deleted while it was outstanding.
    DeliveryOwner,
    /// Queue ids were issued by the broker (never reused) and the name index matches them.
    QueueIds,
    /// A delayed message's timer belongs to a live queue.
    DelayedOwner,
    /// A queue's paged tails are consistent: counted only in pageable queues, one per
    /// priority level in use, their id runs ordered and within their counts.
    PagedTail,
    /// At most one page-in per queue is outstanding, only for a level holding paged messages,
    /// and one is when the next message to deliver is paged and a consumer could take it.
    PageIn,
    /// A queue with ready messages that expire has a TTL timer at or before the first expiry.
    TtlTimer,
    /// An outstanding delivery with a lease has a timer at the lease's end.
    LeaseTimer,
    /// A queue with `x-expires` has an expiry timer.
    QueueExpiryTimer,
    /// An exclusive queue is owned by a live connection that lists it.
    ExclusiveOwner,
    /// An exchange's binding count matches its bindings (and its topic trie's).
    ExchangeBindings,
    /// Bindings lead to live queues and exchanges, and each queue lists the bindings to it.
    BindingIndex,
    /// Dispatch is eager: no queue has both ready messages and a consumer with capacity.
    EagerDispatch,
    /// Nothing a command leaves to its end (dead letters, queues to dispatch) is left over.
    CommandLeftovers,
}

/// A broken invariant: which one, where, and what was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invariant {invariant:?} broken (queue: {queue:?}, consumer: {consumer:?}): {detail}")]
pub struct InvariantViolation {
    /// The invariant.
    pub invariant: Invariant,
    /// The queue involved, by name (or `#id` for a deleted one), if any.
    pub queue: Option<String>,
    /// The connection (and consumer) involved, if any.
    pub consumer: Option<(ConnectionId, Option<ConsumerTag>)>,
    /// What was found.
    pub detail: String,
}

impl InvariantViolation {
    fn new(invariant: Invariant, detail: String) -> Self {
        InvariantViolation {
            invariant,
            queue: None,
            consumer: None,
            detail,
        }
    }

    fn queue(mut self, name: &str) -> Self {
        self.queue = Some(name.to_owned());
        self
    }

    fn consumer(mut self, connection: ConnectionId, tag: Option<ConsumerTag>) -> Self {
        self.consumer = Some((connection, tag));
        self
    }
}

/// `Ok` when a cached counter equals its recount.
fn counter<T: PartialEq + std::fmt::Debug>(
    invariant: Invariant,
    what: &str,
    cached: T,
    actual: T,
) -> Result<(), InvariantViolation> {
    if cached == actual {
        return Ok(());
    }
    Err(InvariantViolation::new(
        invariant,
        format!("{what} is {cached:?}, recounted {actual:?}"),
    ))
}

/// `Ok` when `holds`; otherwise the violation `detail` describes.
fn ensure(
    holds: bool,
    invariant: Invariant,
    detail: impl FnOnce() -> String,
) -> Result<(), InvariantViolation> {
    if holds {
        Ok(())
    } else {
        Err(InvariantViolation::new(invariant, detail()))
    }
}

/// What the connections and timers say about each queue, gathered in one pass.
#[derive(Default)]
struct Index {
    /// Outstanding deliveries per queue.
    unacked: HashMap<QueueId, u64>,
    unacked_bytes: HashMap<QueueId, u64>,
    /// Outstanding deliveries per (queue, connection, consumer).
    consumer_unacked: HashMap<(QueueId, ConnectionId, ConsumerTag), u64>,
    /// Arrival positions of outstanding deliveries per queue.
    outstanding_seqs: HashMap<QueueId, Vec<u64>>,
    /// Log ids held outside the ready messages (outstanding, delayed) per queue.
    held_ids: HashMap<QueueId, Vec<u64>>,
    /// Delayed messages per queue.
    delayed: HashMap<QueueId, u64>,
    /// Delayed messages in all.
    delayed_total: u64,
    /// TTL timers: (queue, due).
    ttl_timers: HashSet<(QueueId, u64)>,
    /// Lease timers: (connection, tag, due).
    lease_timers: HashSet<(ConnectionId, u64, u64)>,
    /// Queues with an expiry timer.
    expiry_timers: HashSet<QueueId>,
    /// Bindings to each queue.
    bindings_to: HashMap<QueueId, usize>,
}

impl Broker {
    /// Checks every invariant of the state from scratch (O(state)): cached counters against
    /// recounts, ready order, message copies in one place, delivery tags and owners, queue
    /// ids, timers, the paged tail, binding indexes and eager dispatch. `Ok` between commands
    /// of a correct broker; an `Err` is a bug in the core.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        ensure(
            self.dead_letters.is_empty() && self.to_dispatch.is_empty(),
            Invariant::CommandLeftovers,
            || {
                format!(
                    "{} dead letters and {} queues to dispatch left",
                    self.dead_letters.len(),
                    self.to_dispatch.len()
                )
            },
        )?;
        let index = self.index()?;
        for (&qid, queue) in &self.queues {
            self.check_queue(qid, queue, &index)
                .map_err(|violation| violation.queue(&queue.name))?;
        }
        counter(
            Invariant::ReadyBytesTotal,
            "ready_bytes_total",
            self.ready_bytes_total,
            self.queues.values().map(|queue| queue.ready.bytes()).sum(),
        )?;
        counter(
            Invariant::DelayedTotal,
            "delayed_total",
            self.delayed_total,
            index.delayed_total,
        )?;
        counter(
            Invariant::RejectPublishQueues,
            "n_reject_publish_queues",
            self.n_reject_publish_queues,
            self.queues
                .values()
                .filter(|queue| queue.features.overflow.rejects())
                .count(),
        )?;
        counter(
            Invariant::QueueIds,
            "the name index's size",
            self.vhosts.values().map(|ns| ns.queue_names.len()).sum(),
            self.queues.len(),
        )?;
        let mut declared: HashMap<&std::sync::Arc<str>, u32> = HashMap::new();
        for queue in self.queues.values() {
            if let Some(declarer) = &queue.declared_by {
                *declared.entry(declarer).or_default() += 1;
            }
        }
        counter(
            Invariant::QueueIds,
            "declarers counted",
            self.queues_by_declarer.len(),
            declared.len(),
        )?;
        for (declarer, count) in declared {
            counter(
                Invariant::QueueIds,
                "a declarer's queue count",
                self.queues_by_declarer.get(declarer).copied().unwrap_or(0) as usize,
                count as usize,
            )?;
        }
        for (name, ns) in &self.vhosts {
            counter(
                Invariant::QueueIds,
                "a virtual host's connection count",
                ns.connections as usize,
                self.connections
                    .values()
                    .filter(|conn| conn.vhost == *name && conn.vhost_epoch == ns.epoch)
                    .count(),
            )?;
        }
        for (&connection, conn) in &self.connections {
            self.check_connection(connection, conn, &index)
                .map_err(|violation| match violation.consumer {
                    Some(_) => violation,
                    None => violation.consumer(connection, None),
                })?;
        }
        self.check_exchanges()
    }

    /// Whether the state is small enough for debug builds to check it after a command
    /// (see [`DEBUG_CHECK_ITEMS_MAX`]); O(queues + connections + exchanges).
    #[cfg(debug_assertions)]
    pub(super) fn small_enough_to_check(&self) -> bool {
        let ready: usize = self.queues.values().map(|queue| queue.ready.len()).sum();
        let outstanding: usize = self
            .connections
            .values()
            .map(|conn| conn.unacked.len())
            .sum();
        let bindings: usize = self
            .vhosts
            .values()
            .flat_map(|ns| ns.exchanges.values())
            .map(|exchange| exchange.n_bindings())
            .sum();
        self.queues.len() + ready + outstanding + self.timers.len() + bindings
            <= DEBUG_CHECK_ITEMS_MAX
    }

    /// Gathers, per queue, what connections and timers hold of it.
    fn index(&self) -> Result<Index, InvariantViolation> {
        let mut index = Index::default();
        for (&connection, conn) in &self.connections {
            for unacked in conn.unacked.values() {
                let qid = unacked.queue;
                *index.unacked.entry(qid).or_default() += 1;
                *index.unacked_bytes.entry(qid).or_default() += unacked.entry.message.size_bytes();
                *index
                    .consumer_unacked
                    .entry((qid, connection, unacked.consumer_tag))
                    .or_default() += 1;
                index
                    .outstanding_seqs
                    .entry(qid)
                    .or_default()
                    .push(unacked.entry.seq);
                index
                    .held_ids
                    .entry(qid)
                    .or_default()
                    .extend(unacked.entry.durable_id);
            }
        }
        for (due, timer) in self.timers.iter() {
            match timer {
                TimerKind::Delayed { queue, entry } => {
                    ensure(
                        self.queues.contains_key(queue),
                        Invariant::DelayedOwner,
                        || format!("a delayed message of deleted queue #{}", queue.0),
                    )?;
                    *index.delayed.entry(*queue).or_default() += 1;
                    index.delayed_total += 1;
                    index
                        .held_ids
                        .entry(*queue)
                        .or_default()
                        .extend(entry.durable_id);
                }
                TimerKind::Ttl { queue } => {
                    index.ttl_timers.insert((*queue, due));
                }
                TimerKind::Lease { connection, tag } => {
                    index.lease_timers.insert((*connection, *tag, due));
                }
                TimerKind::QueueExpiry { queue } => {
                    index.expiry_timers.insert(*queue);
                }
            }
        }
        for exchange in self.vhosts.values().flat_map(|ns| ns.exchanges.values()) {
            for key in exchange.bindings() {
                if let Destination::Queue(qid) = key.destination {
                    *index.bindings_to.entry(qid).or_default() += 1;
                }
            }
        }
        Ok(index)
    }

    fn check_queue(
        &self,
        qid: QueueId,
        queue: &Queue,
        index: &Index,
    ) -> Result<(), InvariantViolation> {
        ensure(
            qid.0 >= 1 && qid.0 < self.next_queue_id,
            Invariant::QueueIds,
            || format!("id {} not issued (next {})", qid.0, self.next_queue_id),
        )?;
        let names = self.vhosts.get(&queue.vhost).map(|ns| &ns.queue_names);
        let indexed = names.and_then(|names| names.get(&queue.name));
        ensure(indexed == Some(&qid), Invariant::QueueIds, || {
            format!(
                "the name index of virtual host '{}' maps it to {indexed:?}",
                queue.vhost
            )
        })?;
        check_ready(queue)?;
        let seqs = index
            .outstanding_seqs
            .get(&qid)
            .map_or(&[][..], Vec::as_slice);
        let ids = index.held_ids.get(&qid).map_or(&[][..], Vec::as_slice);
        check_one_place(queue, seqs, ids)?;
        counter(
            Invariant::QueueUnacked,
            "unacked",
            queue.unacked,
            index.unacked.get(&qid).copied().unwrap_or(0),
        )?;
        counter(
            Invariant::QueueUnacked,
            "unacked_bytes",
            queue.unacked_bytes,
            index.unacked_bytes.get(&qid).copied().unwrap_or(0),
        )?;
        counter(
            Invariant::QueueDelayed,
            "stats.delayed",
            queue.stats.delayed,
            index.delayed.get(&qid).copied().unwrap_or(0),
        )?;
        self.check_consumers(qid, queue, index)?;
        check_paged(queue)?;
        check_timers(qid, queue, index)?;
        if let Some(owner) = queue.owner {
            ensure(
                self.connections
                    .get(&owner)
                    .is_some_and(|conn| conn.exclusive_queues.contains(&qid)),
                Invariant::ExclusiveOwner,
                || format!("owner {owner:?} is gone or does not list it"),
            )?;
        }
        ensure(
            queue.options.exclusive == queue.owner.is_some(),
            Invariant::ExclusiveOwner,
            || {
                format!(
                    "exclusive {} with owner {:?}",
                    queue.options.exclusive, queue.owner
                )
            },
        )?;
        for (source, routing_key, arguments) in &queue.bound_from {
            let exchanges = self.vhosts.get(&queue.vhost).map(|ns| &ns.exchanges);
            let exchange = exchanges.and_then(|exchanges| exchanges.get(source));
            let bound = exchange.is_some_and(|exchange| {
                exchange.has_binding(&crate::exchange::BindingKey {
                    destination: Destination::Queue(qid),
                    routing_key: routing_key.clone(),
                    arguments: arguments.clone(),
                })
            });
            ensure(bound, Invariant::BindingIndex, || {
                format!("lists a binding from {source} '{routing_key}' its exchange lacks")
            })?;
        }
        counter(
            Invariant::BindingIndex,
            "bindings listed",
            queue.bound_from.len(),
            index.bindings_to.get(&qid).copied().unwrap_or(0),
        )
    }

    fn check_consumers(
        &self,
        qid: QueueId,
        queue: &Queue,
        index: &Index,
    ) -> Result<(), InvariantViolation> {
        for consumer in &queue.consumers {
            let (connection, tag) = (consumer.connection, consumer.tag);
            let blame = |violation: InvariantViolation| violation.consumer(connection, Some(tag));
            ensure(
                self.connections
                    .get(&connection)
                    .is_some_and(|conn| conn.consumers.get(&tag) == Some(&qid)),
                Invariant::ConsumerIndex,
                || "its connection is gone or does not list it".to_owned(),
            )
            .map_err(blame)?;
            let outstanding = index
                .consumer_unacked
                .get(&(qid, connection, tag))
                .copied()
                .unwrap_or(0);
            counter(
                Invariant::ConsumerUnacked,
                "unacked",
                u64::from(consumer.unacked),
                outstanding,
            )
            .map_err(blame)?;
            let prefetch = consumer.options.prefetch;
            let within = (prefetch == 0 || consumer.credit <= prefetch)
                && (consumer.options.initial_credit.is_some() || consumer.credit == 0)
                && (!consumer.options.auto_ack || consumer.unacked == 0)
                && (prefetch == 0 || consumer.unacked <= prefetch);
            ensure(within, Invariant::ConsumerCapacity, || {
                format!(
                    "credit {} and unacked {} with prefetch {prefetch} (auto-ack {})",
                    consumer.credit, consumer.unacked, consumer.options.auto_ack
                )
            })
            .map_err(blame)?;
        }
        let can_take = if queue.options.single_active_consumer {
            queue
                .consumers
                .first()
                .is_some_and(|first| first.has_capacity())
        } else {
            queue
                .consumers
                .iter()
                .any(|consumer| consumer.has_capacity())
        };
        // The next message to deliver may be paged: it waits for its page-in, which must be
        // on its way, or the queue would never deliver again.
        let blocked = queue.paged.blocks(queue.ready.top_priority());
        ensure(
            queue.ready.is_empty() || !can_take || blocked,
            Invariant::EagerDispatch,
            || {
                format!(
                    "{} ready messages and a consumer with capacity",
                    queue.ready.len()
                )
            },
        )?;
        ensure(
            !blocked || !can_take || queue.paged.page_in_pending.is_some(),
            Invariant::PageIn,
            || {
                format!(
                    "the next message is paged (level {:?}), a consumer has capacity and no \
                     page-in is pending",
                    queue.paged.top_level()
                )
            },
        )
    }

    fn check_connection(
        &self,
        connection: ConnectionId,
        conn: &Connection,
        index: &Index,
    ) -> Result<(), InvariantViolation> {
        let mut previous: Option<u64> = None;
        let mut live = 0;
        for (tag, slot) in conn.unacked.slots_iter() {
            ensure(
                previous.is_none_or(|previous| previous < tag) && tag <= conn.next_delivery_tag,
                Invariant::DeliveryTags,
                || {
                    format!(
                        "tag {tag} after {previous:?} (last issued {})",
                        conn.next_delivery_tag
                    )
                },
            )?;
            previous = Some(tag);
            if let Some(unacked) = slot {
                live += 1;
                ensure(!conn.lapsed.contains(tag), Invariant::DeliveryTags, || {
                    format!("tag {tag} is both outstanding and lapsed")
                })?;
                self.check_delivery(connection, tag, unacked, index)?;
            }
        }
        counter(
            Invariant::DeliveryTags,
            "outstanding deliveries",
            conn.unacked.len(),
            live,
        )?;
        ensure(
            conn.lapsed
                .last()
                .is_none_or(|last| last <= conn.next_delivery_tag),
            Invariant::DeliveryTags,
            || {
                format!(
                    "a lapsed tag past the last issued, {}",
                    conn.next_delivery_tag
                )
            },
        )?;
        for (&tag, qid) in &conn.consumers {
            let registered = self
                .queues
                .get(qid)
                .is_some_and(|queue| queue.consumer_idx(connection, tag).is_some());
            ensure(registered, Invariant::ConsumerIndex, || {
                format!("listed on queue #{} which is gone or lacks it", qid.0)
            })
            .map_err(|violation| violation.consumer(connection, Some(tag)))?;
        }
        for qid in &conn.exclusive_queues {
            let owned = self
                .queues
                .get(qid)
                .is_some_and(|queue| queue.owner == Some(connection));
            ensure(owned, Invariant::ExclusiveOwner, || {
                format!("lists queue #{} which is gone or not its own", qid.0)
            })?;
        }
        Ok(())
    }

    fn check_delivery(
        &self,
        connection: ConnectionId,
        tag: u64,
        unacked: &Unacked,
        index: &Index,
    ) -> Result<(), InvariantViolation> {
        let owner = unacked.consumer_tag;
        let blame = |violation: InvariantViolation| {
            let violation = violation.consumer(connection, Some(owner));
            match self.queues.get(&unacked.queue) {
                Some(queue) => violation.queue(&queue.name),
                None => violation.queue(&format!("#{}", unacked.queue.0)),
            }
        };
        let owned = match self.queues.get(&unacked.queue) {
            Some(queue) => {
                queue.consumer_idx(connection, owner).is_some()
                    && self.connections[&connection].consumers.get(&owner) == Some(&unacked.queue)
            }
            // Deleted while the delivery was outstanding (ids are never reused).
            None => unacked.queue.0 < self.next_queue_id,
        };
        ensure(owned, Invariant::DeliveryOwner, || {
            format!("delivery {tag} has no live consumer")
        })
        .map_err(blame)?;
        if let Some((until, _)) = unacked.lease {
            ensure(
                index.lease_timers.contains(&(connection, tag, until)),
                Invariant::LeaseTimer,
                || format!("delivery {tag}'s lease ends at {until} without a timer"),
            )
            .map_err(blame)?;
        }
        Ok(())
    }

    fn check_exchanges(&self) -> Result<(), InvariantViolation> {
        for (vhost, ns) in &self.vhosts {
            self.check_exchanges_of(vhost, ns)?;
        }
        Ok(())
    }

    fn check_exchanges_of(
        &self,
        vhost: &str,
        ns: &super::Namespace,
    ) -> Result<(), InvariantViolation> {
        for exchange in ns.exchanges.values() {
            let in_exchange = |violation: InvariantViolation| InvariantViolation {
                detail: format!("exchange '{}': {}", exchange.name, violation.detail),
                ..violation
            };
            let bindings = exchange.bindings();
            counter(
                Invariant::ExchangeBindings,
                "n_bindings",
                exchange.n_bindings(),
                bindings.len(),
            )
            .map_err(in_exchange)?;
            if let Some((cached, actual)) = exchange.topic_counts() {
                counter(
                    Invariant::ExchangeBindings,
                    "the topic matcher's len",
                    cached,
                    actual,
                )
                .map_err(in_exchange)?;
            }
            for key in bindings {
                let live = match &key.destination {
                    // Nothing binds across virtual hosts.
                    Destination::Queue(qid) => self
                        .queues
                        .get(qid)
                        .is_some_and(|queue| *queue.vhost == *vhost),
                    Destination::Exchange(name) => ns.exchanges.contains_key(name),
                };
                ensure(live, Invariant::BindingIndex, || {
                    format!("binds to {:?}, which is gone", key.destination)
                })
                .map_err(in_exchange)?;
            }
        }
        Ok(())
    }
}

/// The ready messages: each level strictly by arrival, of its own priority, higher levels
/// non-empty; cached count, bytes and expiry index exact; arrival positions issued.
fn check_ready(queue: &Queue) -> Result<(), InvariantViolation> {
    let (mut len, mut bytes) = (0usize, 0u64);
    let mut expiring = BTreeSet::new();
    for (priority, level) in queue.ready.levels() {
        ensure(
            priority == 0 || !level.is_empty(),
            Invariant::ReadyOrder,
            || format!("priority level {priority} is empty"),
        )?;
        let mut previous: Option<u64> = None;
        for entry in level {
            ensure(
                entry.priority == priority
                    && previous.is_none_or(|previous| previous < entry.seq)
                    && entry.seq < queue.next_seq,
                Invariant::ReadyOrder,
                || {
                    format!(
                        "seq {} of priority {} after {previous:?} in level {priority} (next seq {})",
                        entry.seq, entry.priority, queue.next_seq
                    )
                },
            )?;
            previous = Some(entry.seq);
            len += 1;
            bytes += entry.message.size_bytes();
            if let Some(at) = entry.expires_at {
                expiring.insert((at, entry.priority, entry.seq));
            }
        }
    }
    counter(
        Invariant::QueueReadyCount,
        "ready.len",
        queue.ready.len(),
        len,
    )?;
    counter(
        Invariant::QueueReadyCount,
        "ready.bytes",
        queue.ready.bytes(),
        bytes,
    )?;
    ensure(
        *queue.ready.expiring() == expiring,
        Invariant::ExpiryIndex,
        || {
            format!(
                "index {:?}, ready entries with a TTL {expiring:?}",
                queue.ready.expiring()
            )
        },
    )
}

/// No arrival position is both ready and outstanding (or twice either), and no log id is
/// held twice among ready, outstanding, delayed and paged copies of the queue.
fn check_one_place(
    queue: &Queue,
    outstanding: &[u64],
    held: &[u64],
) -> Result<(), InvariantViolation> {
    let mut seqs = HashSet::new();
    let ready_seqs = queue.ready.iter().map(|entry| entry.seq);
    for seq in ready_seqs.chain(outstanding.iter().copied()) {
        ensure(seqs.insert(seq), Invariant::OnePlace, || {
            format!("arrival position {seq} is in two places (ready or outstanding)")
        })?;
    }
    let mut ids = HashSet::new();
    let ready_ids = queue.ready.iter().filter_map(|entry| entry.durable_id);
    let paged_ids = queue
        .paged
        .tails
        .values()
        .flat_map(|tail| tail.ids.runs())
        .flat_map(|(first, n)| first..first.saturating_add(n));
    for id in ready_ids.chain(held.iter().copied()).chain(paged_ids) {
        ensure(ids.insert(id), Invariant::OnePlace, || {
            format!("log id {id} is in two places (ready, outstanding, delayed or paged)")
        })?;
    }
    Ok(())
}

/// The paged tails: only pageable queues page; only levels the queue orders by have tails;
/// every tail holds messages, the totals are the tails' sums, id runs are non-empty,
/// increasing, disjoint and cover at most the tail's messages; a page-in is pending only for
/// a level that holds paged messages.
fn check_paged(queue: &Queue) -> Result<(), InvariantViolation> {
    let paged = &queue.paged;
    ensure(
        paged.threshold.is_some() || (paged.count == 0 && paged.page_in_pending.is_none()),
        Invariant::PagedTail,
        || format!("{} paged in a queue that does not page", paged.count),
    )?;
    let (mut count, mut bytes) = (0u64, 0u64);
    for (&level, tail) in &paged.tails {
        ensure(
            level <= queue.features.max_priority.unwrap_or(0),
            Invariant::PagedTail,
            || format!("a tail at level {level} beyond the queue's priorities"),
        )?;
        ensure(tail.count > 0, Invariant::PagedTail, || {
            format!(
                "an empty tail at level {level} with {} bytes and {} ids",
                tail.bytes,
                tail.ids.len()
            )
        })?;
        count += tail.count;
        bytes += tail.bytes;
        let mut end: Option<u64> = None;
        let mut n_ids = 0u64;
        let runs = tail.ids.runs();
        for &(first, n) in &runs {
            ensure(
                n > 0 && end.is_none_or(|end| end < first),
                Invariant::PagedTail,
                || format!("id runs {runs:?} out of order, overlapping or empty"),
            )?;
            end = Some(first + n - 1);
            n_ids += n;
        }
        ensure(n_ids <= tail.count, Invariant::PagedTail, || {
            format!(
                "{n_ids} paged ids for {} paged messages at level {level}",
                tail.count
            )
        })?;
    }
    counter(Invariant::PagedTail, "paged.count", paged.count, count)?;
    counter(Invariant::PagedTail, "paged.bytes", paged.bytes, bytes)?;
    ensure(
        paged
            .page_in_pending
            .is_none_or(|level| paged.tails.contains_key(&level)),
        Invariant::PageIn,
        || {
            format!(
                "a page-in pending for level {:?}, which holds nothing paged",
                paged.page_in_pending
            )
        },
    )
}

/// The timers a queue needs: one at or before its first ready expiry, one for `x-expires`.
fn check_timers(qid: QueueId, queue: &Queue, index: &Index) -> Result<(), InvariantViolation> {
    if let Some(next) = queue.ready.next_expiry() {
        let armed = queue
            .ttl_armed
            .filter(|armed| *armed <= next && index.ttl_timers.contains(&(qid, *armed)));
        ensure(armed.is_some(), Invariant::TtlTimer, || {
            format!(
                "first expiry at {next}, TTL timer armed at {:?}",
                queue.ttl_armed
            )
        })?;
    }
    ensure(
        queue.features.expires.is_none() || index.expiry_timers.contains(&qid),
        Invariant::QueueExpiryTimer,
        || "x-expires without an expiry timer".to_owned(),
    )
}

#[cfg(test)]
mod tests {
    //! Each check can fail: a sound broker passes, and breaking one counter, index or order on
    //! purpose yields the matching violation.

    use super::*;
    use crate::{
        ARG_EXPIRES, ARG_MAX_LENGTH, ARG_MAX_PRIORITY, ARG_MESSAGE_TTL, ARG_OVERFLOW, BindTarget,
    };
    use crate::{Command, ConsumerOptions, Headers, Limits, Message, QueueOptions};
    use std::sync::Arc;

    const CONN: ConnectionId = ConnectionId(1);
    const TAG: ConsumerTag = ConsumerTag(1);

    /// A broker with a bit of everything: queue `work` (priorities, TTL, expiry, a topic
    /// binding) with one leased delivery outstanding, two ready messages and one delayed;
    /// `capped` (reject-publish); `paged` (durable, two of four messages paged).
    fn sound() -> Broker {
        let mut broker = Broker::new(Limits {
            paging_threshold: 2,
            ..Limits::default()
        });
        let mut effects = Vec::new();
        let mut ok = |broker: &mut Broker, command: Command| {
            broker.apply(1, command, &mut effects).unwrap();
        };
        ok(
            &mut broker,
            Command::OpenConnection {
                vhost: crate::DEFAULT_VHOST.into(),
                connection: CONN,
            },
        );
        let work = Headers::new()
            .with(ARG_MAX_PRIORITY, 5i64)
            .with(ARG_MESSAGE_TTL, 60_000i64)
            .with(ARG_EXPIRES, 600_000i64);
        let capped = Headers::new()
            .with(ARG_OVERFLOW, "reject-publish")
            .with(ARG_MAX_LENGTH, 10i64);
        for (name, durable, arguments) in [
            ("work", false, work),
            ("capped", false, capped),
            ("paged", true, Headers::new()),
        ] {
            let options = QueueOptions {
                durable,
                arguments,
                ..QueueOptions::default()
            };
            let name = name.to_owned();
            let (connection, passive) = (CONN, false);
            let declare = Command::DeclareQueue {
                vhost: crate::DEFAULT_VHOST.into(),
                connection,
                name,
                options,
                passive,
                declarer: None,
            };
            ok(&mut broker, declare);
        }
        ok(
            &mut broker,
            Command::Bind {
                vhost: crate::DEFAULT_VHOST.into(),
                source: "wharf.topic".to_owned(),
                target: BindTarget::Queue("work".to_owned()),
                routing_key: "a.*".to_owned(),
                arguments: Headers::new(),
            },
        );
        ok(
            &mut broker,
            Command::Subscribe {
                vhost: crate::DEFAULT_VHOST.into(),
                connection: CONN,
                queue: "work".into(),
                consumer_tag: TAG,
                options: ConsumerOptions {
                    prefetch: 1,
                    ack_timeout_ms: Some(30_000),
                    ..ConsumerOptions::default()
                },
            },
        );
        for (queue, persistent, delay_ms) in [
            ("work", false, None),
            ("work", false, None),
            ("work", false, None),
            ("work", false, Some(5_000)),
            ("capped", false, None),
        ]
        .into_iter()
        .chain([("paged", true, None); 4])
        {
            let message = Message {
                persistent,
                delay_ms,
                ..Message::new(queue, "body")
            };
            ok(
                &mut broker,
                Command::Publish {
                    vhost: crate::DEFAULT_VHOST.into(),
                    message: Arc::new(message),
                },
            );
        }
        broker
    }

    fn qid(broker: &Broker, name: &str) -> QueueId {
        broker.vhosts[crate::DEFAULT_VHOST].queue_names[name]
    }

    /// Breaks `sound()` with `corrupt` and returns what the check finds.
    fn broken(corrupt: impl FnOnce(&mut Broker)) -> InvariantViolation {
        let mut broker = sound();
        corrupt(&mut broker);
        broker
            .check_invariants()
            .expect_err("the corruption is detected")
    }

    /// Breaks queue `name` of `sound()` with `corrupt`; asserts the violation and its queue.
    fn broken_queue(name: &str, invariant: Invariant, corrupt: impl FnOnce(&mut Queue)) {
        let violation = broken(|broker| {
            let qid = qid(broker, name);
            corrupt(broker.queues.get_mut(&qid).unwrap());
        });
        assert_eq!(violation.invariant, invariant, "{violation}");
        assert_eq!(violation.queue.as_deref(), Some(name), "{violation}");
    }

    #[test]
    fn a_sound_broker_passes_with_everything_in_place() {
        let broker = sound();
        broker.check_invariants().unwrap();
        let work = &broker.queues[&qid(&broker, "work")];
        assert_eq!(
            (work.ready.len(), work.unacked, work.stats.delayed),
            (2, 1, 1)
        );
        assert_eq!(broker.queues[&qid(&broker, "paged")].paged.count, 2);
        assert_eq!(broker.n_reject_publish_queues, 1);
    }

    #[test]
    fn broker_counters_are_recounted() {
        for (invariant, corrupt) in [
            (
                Invariant::ReadyBytesTotal,
                (|broker: &mut Broker| broker.ready_bytes_total += 1) as fn(&mut Broker),
            ),
            (Invariant::DelayedTotal, |broker| broker.delayed_total += 1),
            (Invariant::RejectPublishQueues, |broker| {
                broker.n_reject_publish_queues -= 1
            }),
            (Invariant::CommandLeftovers, |broker| {
                broker.to_dispatch.push(QueueId(1))
            }),
            (Invariant::QueueIds, |broker| broker.next_queue_id = 2),
            (Invariant::DelayedOwner, |broker| {
                let entry = broker.queues[&qid(broker, "work")]
                    .ready
                    .iter()
                    .next()
                    .cloned();
                broker.timers.push(
                    9,
                    TimerKind::Delayed {
                        queue: QueueId(99),
                        entry: Box::new(entry.unwrap()),
                    },
                );
            }),
        ] {
            assert_eq!(broken(corrupt).invariant, invariant);
        }
    }

    #[test]
    fn queue_counters_order_and_indexes_are_checked() {
        broken_queue("work", Invariant::QueueReadyCount, |queue| {
            queue.ready.corrupt_bytes(1)
        });
        broken_queue("work", Invariant::ReadyOrder, |queue| {
            queue.ready.corrupt_order()
        });
        broken_queue("work", Invariant::ExpiryIndex, |queue| {
            queue.ready.corrupt_expiring()
        });
        broken_queue("work", Invariant::QueueUnacked, |queue| queue.unacked += 1);
        broken_queue("work", Invariant::QueueUnacked, |queue| {
            queue.unacked_bytes += 1
        });
        broken_queue("work", Invariant::QueueDelayed, |queue| {
            queue.stats.delayed -= 1
        });
        broken_queue("work", Invariant::TtlTimer, |queue| queue.ttl_armed = None);
        broken_queue("work", Invariant::BindingIndex, |queue| {
            queue.bound_from.clear()
        });
        broken_queue("work", Invariant::ExclusiveOwner, |queue| {
            queue.owner = Some(CONN)
        });
        broken_queue("capped", Invariant::QueueExpiryTimer, |queue| {
            queue.features.expires = Some(1)
        });
        broken_queue("work", Invariant::PagedTail, |queue| queue.paged.count = 1);
        broken_queue("paged", Invariant::PageIn, |queue| {
            queue.paged.discard();
            queue.paged.page_in_pending = Some(0);
        });
        broken_queue("work", Invariant::OnePlace, |queue| {
            let mut copy = queue.ready.iter().next().cloned().unwrap();
            copy.seq = 0; // the position of the delivery outstanding
            queue.ready.requeue(copy);
        });
    }

    #[test]
    fn consumers_and_deliveries_are_checked() {
        let consumer = |corrupt: fn(&mut crate::queue::Consumer)| {
            move |queue: &mut Queue| corrupt(&mut queue.consumers[0])
        };
        broken_queue(
            "work",
            Invariant::ConsumerUnacked,
            consumer(|consumer| consumer.unacked += 1),
        );
        broken_queue(
            "work",
            Invariant::ConsumerCapacity,
            consumer(|consumer| consumer.credit = 2),
        );
        broken_queue(
            "work",
            Invariant::EagerDispatch,
            consumer(|consumer| consumer.options.prefetch = 5),
        );
        for (invariant, corrupt) in [
            (
                Invariant::DeliveryTags,
                (|conn: &mut Connection| conn.unacked.corrupt_len()) as fn(&mut Connection),
            ),
            (Invariant::DeliveryTags, |conn| conn.next_delivery_tag = 0),
            (Invariant::ConsumerIndex, |conn| conn.consumers.clear()),
            (Invariant::LeaseTimer, |conn| {
                let lease = &mut conn.unacked.get_mut(1).unwrap().lease;
                *lease = lease.map(|(until, timeout)| (until + 1, timeout));
            }),
        ] {
            let violation = broken(|broker| corrupt(broker.connections.get_mut(&CONN).unwrap()));
            assert_eq!(violation.invariant, invariant, "{violation}");
            assert_eq!(violation.consumer.map(|(conn, _)| conn), Some(CONN));
        }
        let violation = broken(|broker| {
            let qid = qid(broker, "work");
            broker.queues.get_mut(&qid).unwrap().consumers.clear();
        });
        assert_eq!(violation.invariant, Invariant::DeliveryOwner);
        assert_eq!(violation.consumer, Some((CONN, Some(TAG))));
    }

    #[test]
    fn exchange_binding_counts_are_recounted() {
        for topic in [false, true] {
            let violation = broken(|broker| {
                let exchange = broker
                    .vhosts
                    .get_mut(crate::DEFAULT_VHOST)
                    .unwrap()
                    .exchanges
                    .get_mut("wharf.topic")
                    .unwrap();
                exchange.corrupt_counts(topic);
            });
            assert_eq!(violation.invariant, Invariant::ExchangeBindings);
            assert!(violation.detail.contains("wharf.topic"), "{violation}");
        }
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "broke an invariant")]
    fn debug_builds_panic_when_a_command_leaves_a_broken_state() {
        let mut broker = sound();
        broker.ready_bytes_total += 1;
        broker.apply(2, Command::Tick, &mut Vec::new()).unwrap();
    }
}
