//! The reference model: expected outcomes and the plain-data model of the broker.

use super::*;

// ----- expected outcomes -----

/// A [`CoreError`] without its context: what the model predicts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    NotFound(EntityKind),
    InvalidName,
    ReservedName,
    PreconditionFailed,
    ResourceLocked,
    AccessRefused,
    UnknownDeliveryTag,
    ConsumerTagInUse,
    InvalidArgument,
    LimitExceeded,
    QueueFull,
    Other(String),
}

impl From<&CoreError> for ErrorClass {
    fn from(err: &CoreError) -> Self {
        match err {
            CoreError::NotFound { kind, .. } => ErrorClass::NotFound(*kind),
            CoreError::InvalidName { .. } => ErrorClass::InvalidName,
            CoreError::ReservedName { .. } => ErrorClass::ReservedName,
            CoreError::PreconditionFailed { .. } => ErrorClass::PreconditionFailed,
            CoreError::ResourceLocked { .. } => ErrorClass::ResourceLocked,
            CoreError::AccessRefused { .. } => ErrorClass::AccessRefused,
            CoreError::UnknownDeliveryTag { .. } => ErrorClass::UnknownDeliveryTag,
            CoreError::ConsumerTagInUse { .. } => ErrorClass::ConsumerTagInUse,
            CoreError::InvalidArgument { .. } => ErrorClass::InvalidArgument,
            CoreError::LimitExceeded { .. } => ErrorClass::LimitExceeded,
            CoreError::QueueFull { .. } => ErrorClass::QueueFull,
            other => ErrorClass::Other(other.to_string()),
        }
    }
}

// ----- the reference model -----

/// One copy of a message in one queue (a fanout to two queues makes two copies).
#[derive(Debug, Clone)]
pub(crate) struct Copy {
    /// Arrival position in its queue: the back of the queue when it became ready from outside
    /// the queue (enqueued, or at the end of a delay); a requeue returns it there.
    pub(crate) seq: u64,
    /// The message's priority capped at the queue's `x-max-priority` (0 without one).
    pub(crate) priority: u8,
    pub(crate) message: Arc<Message>,
    pub(crate) redelivered: bool,
    pub(crate) delivery_count: u32,
    /// The log id of a persistent message in a durable queue.
    pub(crate) durable_id: Option<u64>,
    /// When it expires while ready: the shorter of the message's TTL and the queue's, counted
    /// from when it became ready. A requeue keeps it; the end of a delay sets a fresh one.
    pub(crate) expires_at: Option<u64>,
    /// Requeues by consumers that followed the queue's retry schedule so far.
    pub(crate) retries: u32,
    /// Coverage only: it waited for a delay before it became ready.
    pub(crate) was_delayed: bool,
    /// Coverage only: a lease on it lapsed.
    pub(crate) lapsed: bool,
}

impl Copy {
    pub(crate) fn new(queue: &ModelQueue, message: &Arc<Message>, durable_id: Option<u64>) -> Self {
        Copy {
            seq: 0,
            priority: queue
                .features
                .max_priority
                .map_or(0, |max| message.priority.min(max)),
            message: message.clone(),
            redelivered: false,
            delivery_count: 0,
            durable_id,
            expires_at: None,
            retries: 0,
            was_delayed: false,
            lapsed: false,
        }
    }

    /// Past its TTL: alive through the millisecond its TTL ends (so TTL 0 means "deliver
    /// now or never"), expired from the next.
    pub(crate) fn expired(&self, now_ms: u64) -> bool {
        self.expires_at.is_some_and(|at| at < now_ms)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ModelConsumer {
    pub(crate) connection: ConnectionId,
    pub(crate) tag: ConsumerTag,
    pub(crate) options: ConsumerOptions,
    pub(crate) credit: u32,
    pub(crate) unacked: u32,
}

impl ModelConsumer {
    /// Credit mode (`initial_credit: Some`) needs credit; prefetch caps unacked deliveries of
    /// a manual-ack consumer. Outside credit mode an auto-ack consumer takes everything.
    pub(crate) fn has_capacity(&self) -> bool {
        let credit = self.options.initial_credit.is_none() || self.credit > 0;
        let prefetch = match (self.options.prefetch, self.options.auto_ack) {
            (0, _) | (_, true) => true,
            (prefetch, false) => self.unacked < prefetch,
        };
        credit && prefetch
    }

    /// Credit after granting `granted`: saturating, capped at a non-zero prefetch.
    pub(crate) fn credit_after(&self, granted: u32) -> u32 {
        let credit = self.credit.saturating_add(granted);
        if self.options.prefetch > 0 {
            credit.min(self.options.prefetch)
        } else {
            credit
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ModelQueue {
    /// Identity for the queue's lifetime (a redeclared queue of the same name is another queue).
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) options: QueueOptions,
    pub(crate) features: ModelFeatures,
    pub(crate) owner: Option<ConnectionId>,
    /// Ready copies, sorted by arrival (delivery order is [`ModelQueue::head`]'s business).
    pub(crate) ready: Vec<Copy>,
    pub(crate) next_seq: u64,
    /// In attach order.
    pub(crate) consumers: Vec<ModelConsumer>,
    pub(crate) unacked: u64,
    pub(crate) published: u64,
    pub(crate) delivered: u64,
    pub(crate) redelivered: u64,
    pub(crate) acked: u64,
    pub(crate) dropped: u64,
    pub(crate) expired: u64,
    pub(crate) duplicates: u64,
    /// `x-dedup-window`: message id -> when it is forgotten (remembered while later than now).
    pub(crate) dedup: BTreeMap<String, u64>,
    /// `x-expires`: the last declare (or passive declare), subscribe, cancel, or loss of its
    /// last consumer.
    pub(crate) last_used_ms: u64,
    /// Due time of the queue's TTL timer, while one is armed (one per queue: a new one is set
    /// only for an earlier expiry; it disarms when it fires).
    pub(crate) ttl_armed: Option<u64>,
}

/// Queue arguments as the model reads them; `None` when one is invalid.
#[derive(Debug, Clone, Default)]
pub(crate) struct ModelFeatures {
    pub(crate) max_priority: Option<u8>,
    pub(crate) max_length: Option<u64>,
    pub(crate) max_length_bytes: Option<u64>,
    pub(crate) reject_publish: bool,
    pub(crate) dead_letter_exchange: Option<String>,
    pub(crate) dead_letter_routing_key: Option<String>,
    pub(crate) delivery_limit: Option<u64>,
    pub(crate) message_ttl: Option<u64>,
    pub(crate) expires: Option<u64>,
    pub(crate) retry: Option<Vec<u64>>,
    pub(crate) dedup_window: Option<u64>,
}

pub(crate) fn model_features(arguments: &Headers) -> Option<ModelFeatures> {
    let count = |key: &str| match arguments.get(key) {
        None => Some(None),
        Some(HeaderValue::Int(value)) if *value >= 0 => Some(Some(*value as u64)),
        Some(_) => None,
    };
    let duration = |key: &str, min: u64| match arguments.get(key) {
        None => Some(None),
        Some(HeaderValue::Int(value))
            if *value >= 0 && (min..=DURATION_MS_MAX).contains(&(*value as u64)) =>
        {
            Some(Some(*value as u64))
        }
        Some(_) => None,
    };
    let max_priority = match arguments.get("x-max-priority") {
        None => None,
        Some(HeaderValue::Int(value)) if (1..=255).contains(value) => Some(*value as u8),
        Some(_) => return None,
    };
    let reject_publish = match arguments.get("x-overflow").map(HeaderValue::as_str) {
        None | Some(Some("drop-head")) => false,
        Some(Some("reject-publish")) => true,
        Some(_) => return None,
    };
    let text = |key: &str| match arguments.get(key) {
        None => Some(None),
        Some(HeaderValue::Str(text)) if text.len() <= 255 => Some(Some(text.clone())),
        Some(_) => None,
    };
    let retry = match arguments.get("x-retry") {
        None => None,
        Some(HeaderValue::List(steps)) if (1..=RETRY_STEPS_MAX).contains(&steps.len()) => {
            let steps: Option<Vec<u64>> = steps
                .iter()
                .map(|step| match step {
                    HeaderValue::Int(ms) if *ms >= 0 && *ms as u64 <= DURATION_MS_MAX => {
                        Some(*ms as u64)
                    }
                    _ => None,
                })
                .collect();
            Some(steps?)
        }
        Some(_) => return None,
    };
    Some(ModelFeatures {
        dead_letter_exchange: text("x-dead-letter-exchange")?,
        dead_letter_routing_key: text("x-dead-letter-routing-key")?,
        delivery_limit: count("x-delivery-limit")?,
        max_priority,
        max_length: count("x-max-length")?,
        max_length_bytes: count("x-max-length-bytes")?,
        reject_publish,
        message_ttl: duration("x-message-ttl", 0)?,
        expires: duration("x-expires", 1)?,
        retry,
        dedup_window: duration("x-dedup-window", 1)?,
    })
}

/// A copy on its way from a queue to that queue's dead-letter exchange.
#[derive(Debug, Clone)]
pub(crate) struct ModelDeadLetter {
    pub(crate) message: Arc<Message>,
    pub(crate) queue: String,
    pub(crate) reason: &'static str,
    pub(crate) exchange: String,
    pub(crate) routing_key: Option<String>,
}

impl ModelDeadLetter {
    pub(crate) fn of(queue: &ModelQueue, copy: &Copy, reason: &'static str) -> Option<Self> {
        Some(ModelDeadLetter {
            message: copy.message.clone(),
            queue: queue.name.clone(),
            reason,
            exchange: queue.features.dead_letter_exchange.clone()?,
            routing_key: queue.features.dead_letter_routing_key.clone(),
        })
    }

    pub(crate) fn is_this_death(&self, record: &HeaderValue) -> bool {
        let HeaderValue::Map(record) = record else {
            return false;
        };
        record.get("queue") == Some(&HeaderValue::from(self.queue.as_str()))
            && record.get("reason") == Some(&HeaderValue::from(self.reason))
    }

    pub(crate) fn earlier_deaths(&self) -> Vec<HeaderValue> {
        match self.message.headers.get("x-death") {
            Some(HeaderValue::List(records)) => records.clone(),
            _ => Vec::new(),
        }
    }

    /// RabbitMQ's death record: a new one in front of `x-death`, or the earlier one for the
    /// same queue and reason counted up and moved to the front; `x-first-death-*` once. The
    /// copy loses its TTL and its delay (as in RabbitMQ: it does not expire again on arrival).
    pub(crate) fn republished(&self, now_ms: u64) -> Message {
        let original = &self.message;
        let mut deaths = self.earlier_deaths();
        let record = match deaths.iter().position(|record| self.is_this_death(record)) {
            Some(idx) => {
                let HeaderValue::Map(mut record) = deaths.remove(idx) else {
                    unreachable!()
                };
                let Some(HeaderValue::Int(count)) = record.get("count").cloned() else {
                    unreachable!("records carry a count")
                };
                record.insert("count", count + 1);
                record.insert("time", now_ms as i64);
                record
            }
            None => Headers::new()
                .with("count", 1i64)
                .with("reason", self.reason)
                .with("queue", self.queue.as_str())
                .with("time", now_ms as i64)
                .with("exchange", &*original.exchange)
                .with(
                    "routing-keys",
                    HeaderValue::List(vec![HeaderValue::from(&*original.routing_key)]),
                ),
        };
        deaths.insert(0, HeaderValue::Map(record));
        let mut headers = original.headers.clone();
        headers.insert("x-death", HeaderValue::List(deaths));
        if headers.get("x-first-death-reason").is_none() {
            headers.insert("x-first-death-reason", self.reason);
            headers.insert("x-first-death-queue", self.queue.as_str());
            headers.insert("x-first-death-exchange", &*original.exchange);
        }
        Message {
            exchange: self.exchange.as_str().into(),
            routing_key: match &self.routing_key {
                Some(key) => key.as_str().into(),
                None => original.routing_key.clone(),
            },
            headers,
            expiration_ms: None,
            delay_ms: None,
            ..Message::clone(original)
        }
    }
}

/// Where a redrive sends a dead letter back: the latest death record of another queue than
/// `here`, with the exchange and routing key the message had there.
pub(crate) fn death_origin(message: &Message, here: &str) -> Option<(String, String, String)> {
    let Some(HeaderValue::List(records)) = message.headers.get("x-death") else {
        return None;
    };
    records.iter().find_map(|record| {
        let HeaderValue::Map(record) = record else {
            return None;
        };
        let queue = record.get("queue")?.as_str()?;
        let exchange = record.get("exchange")?.as_str()?;
        let Some(HeaderValue::List(keys)) = record.get("routing-keys") else {
            return None;
        };
        let routing_key = keys.first()?.as_str()?;
        (queue != here).then(|| {
            (
                queue.to_owned(),
                exchange.to_owned(),
                routing_key.to_owned(),
            )
        })
    })
}

/// Puts a returned copy back (requeue, cancel, disconnect, lapsed lease; `later`: after a
/// delay, at the back), unless it reached the queue's delivery limit: then it leaves the
/// queue, dead-lettered (`delivery_limit`) or dropped.
pub(crate) fn requeue_or_give_up(
    queue: &mut ModelQueue,
    mut copy: Copy,
    later: Option<u64>,
    model: &mut ModelState,
    effects: &mut Vec<Effect>,
) {
    let over = queue
        .features
        .delivery_limit
        .is_some_and(|limit| u64::from(copy.delivery_count) >= limit);
    if over {
        queue.dropped += 1;
        model.ledger.dropped += 1;
        model
            .dead_letters
            .extend(ModelDeadLetter::of(queue, &copy, "delivery_limit"));
        if let Some(durable_id) = copy.durable_id {
            effects.push(Effect::DurableSettled {
                durable_id,
                queue: queue.name.as_str().into(),
            });
        }
        return;
    }
    if let Some(due) = later {
        copy.redelivered = true;
        model.timers.set(
            due,
            TimerKind::Delayed {
                queue_id: queue.id,
                copy,
            },
        );
        return;
    }
    let expires = copy.expires_at.is_some();
    queue.requeue(copy);
    if expires {
        queue.arm_ttl(&mut model.timers);
    }
}

impl ModelQueue {
    pub(crate) fn ready_bytes(&self) -> u64 {
        self.ready
            .iter()
            .map(|copy| copy.message.body.len() as u64)
            .sum()
    }

    /// Whether `extra` more ready copies of `extra_bytes` would exceed a length limit.
    pub(crate) fn over_limit(&self, extra: u64, extra_bytes: u64) -> bool {
        self.features
            .max_length
            .is_some_and(|max| self.ready.len() as u64 + extra > max)
            || self
                .features
                .max_length_bytes
                .is_some_and(|max| self.ready_bytes() + extra_bytes > max)
    }

    /// The ready copy delivered next: the highest priority, the oldest among those.
    pub(crate) fn head(&self) -> Option<usize> {
        let top = self.ready.iter().map(|copy| copy.priority).max()?;
        self.ready.iter().position(|copy| copy.priority == top)
    }

    pub(crate) fn requeue(&mut self, mut copy: Copy) {
        copy.redelivered = true;
        self.put_back(copy);
    }

    /// Back at its arrival position, flags unchanged.
    pub(crate) fn put_back(&mut self, copy: Copy) {
        let pos = self.ready.partition_point(|ready| ready.seq < copy.seq);
        self.ready.insert(pos, copy);
    }

    /// Makes sure a TTL timer is armed at the earliest ready expiry (a new one only when it
    /// is earlier than the one armed).
    pub(crate) fn arm_ttl(&mut self, timers: &mut ModelTimers) {
        let Some(next) = self.ready.iter().filter_map(|copy| copy.expires_at).min() else {
            return;
        };
        let due = next + 1;
        if self.ttl_armed.is_none_or(|armed| due < armed) {
            self.ttl_armed = Some(due);
            timers.set(due, TimerKind::Ttl { queue_id: self.id });
        }
    }

    /// A copy becomes ready at the back of the queue, its TTL counted from `since_ms`.
    pub(crate) fn make_ready(&mut self, mut copy: Copy, since_ms: u64, timers: &mut ModelTimers) {
        copy.seq = self.next_seq;
        self.next_seq += 1;
        let ttl = match (copy.message.expiration_ms, self.features.message_ttl) {
            (Some(own), Some(queue)) => Some(own.min(queue)),
            (own, queue) => own.or(queue),
        };
        copy.expires_at = ttl.map(|ttl| since_ms + ttl);
        let expires = copy.expires_at.is_some();
        self.ready.push(copy);
        if expires {
            self.arm_ttl(timers);
        }
    }

    /// drop-head: the queue never holds more ready copies than its limits, not even while a
    /// consumer waits (limits are enforced before dispatch). Returns how many were dropped.
    pub(crate) fn drop_head_over_limit(
        &mut self,
        model: &mut ModelState,
        effects: &mut Vec<Effect>,
    ) -> u64 {
        let mut n_dropped = 0;
        while !self.features.reject_publish && self.over_limit(0, 0) {
            let dropped = self.ready.remove(self.head().expect("over a limit"));
            n_dropped += 1;
            self.dropped += 1;
            model.ledger.dropped += 1;
            model
                .dead_letters
                .extend(ModelDeadLetter::of(self, &dropped, "maxlen"));
            if let Some(durable_id) = dropped.durable_id {
                effects.push(Effect::DurableSettled {
                    durable_id,
                    queue: self.name.as_str().into(),
                });
            }
        }
        n_dropped
    }

    /// A ready copy past its TTL leaves: dead-lettered (`expired`) or dropped.
    pub(crate) fn expire(&mut self, copy: Copy, model: &mut ModelState, effects: &mut Vec<Effect>) {
        self.expired += 1;
        model.ledger.expired += 1;
        model
            .dead_letters
            .extend(ModelDeadLetter::of(self, &copy, "expired"));
        if let Some(durable_id) = copy.durable_id {
            effects.push(Effect::DurableSettled {
                durable_id,
                queue: self.name.as_str().into(),
            });
        }
    }

    pub(crate) fn stats(&self, timers: &ModelTimers) -> QueueStats {
        QueueStats {
            name: self.name.clone(),
            durable: self.options.durable,
            exclusive: self.options.exclusive,
            auto_delete: self.options.auto_delete,
            ready: self.ready.len() as u64,
            ready_bytes: self.ready_bytes(),
            paged: 0,
            unacked: self.unacked,
            consumers: self.consumers.len() as u32,
            published: self.published,
            delivered: self.delivered,
            redelivered: self.redelivered,
            acked: self.acked,
            dropped: self.dropped,
            delayed: timers.held().filter(|(_, id, _)| *id == self.id).count() as u64,
            expired: self.expired,
            duplicates: self.duplicates,
        }
    }

    /// Whether a ready message must have been handed to someone (dispatch is eager).
    pub(crate) fn can_dispatch(&self) -> bool {
        if self.options.single_active_consumer {
            self.consumers
                .first()
                .is_some_and(ModelConsumer::has_capacity)
        } else {
            self.consumers.iter().any(ModelConsumer::has_capacity)
        }
    }
}

/// What a timer does when it fires.
#[derive(Debug, Clone)]
pub(crate) enum TimerKind {
    /// A copy waiting for its delay (owned by the timer); it enters the back of its queue.
    Delayed { queue_id: u64, copy: Copy },
    /// The queue's earliest ready expiry when armed: every ready copy expired by now leaves.
    Ttl { queue_id: u64 },
    /// A delivery's lease: it lapses if still outstanding and not extended since.
    Lease { connection: ConnectionId, tag: u64 },
    /// An `x-expires` queue may have been unused long enough.
    QueueExpiry { queue_id: u64 },
}

#[derive(Debug, Clone)]
pub(crate) struct ModelTimer {
    pub(crate) due_ms: u64,
    /// The order it was set in: timers due at the same time fire in that order.
    pub(crate) order: u64,
    pub(crate) kind: TimerKind,
}

/// Timers as a plain list, fired by due time then by the order they were set.
#[derive(Debug, Clone, Default)]
pub(crate) struct ModelTimers {
    pub(crate) list: Vec<ModelTimer>,
    pub(crate) next_order: u64,
}

impl ModelTimers {
    pub(crate) fn set(&mut self, due_ms: u64, kind: TimerKind) {
        let order = self.next_order;
        self.next_order += 1;
        self.list.push(ModelTimer {
            due_ms,
            order,
            kind,
        });
    }

    /// Removes and returns the first timer due at `now_ms`.
    pub(crate) fn pop_due(&mut self, now_ms: u64) -> Option<TimerKind> {
        let idx = (0..self.list.len())
            .filter(|idx| self.list[*idx].due_ms <= now_ms)
            .min_by_key(|idx| (self.list[*idx].due_ms, self.list[*idx].order))?;
        Some(self.list.remove(idx).kind)
    }

    /// Delayed copies: (due, queue id, copy).
    pub(crate) fn held(&self) -> impl Iterator<Item = (u64, u64, &Copy)> {
        self.list.iter().filter_map(|timer| match &timer.kind {
            TimerKind::Delayed { queue_id, copy } => Some((timer.due_ms, *queue_id, copy)),
            _ => None,
        })
    }

    /// Drops the delayed copies of a deleted queue; returns how many.
    pub(crate) fn remove_held_of(&mut self, deleted: u64) -> u64 {
        let before = self.list.len();
        self.list.retain(
            |timer| !matches!(&timer.kind, TimerKind::Delayed { queue_id, .. } if *queue_id == deleted),
        );
        (before - self.list.len()) as u64
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Outstanding {
    pub(crate) queue_id: u64,
    pub(crate) consumer_tag: ConsumerTag,
    pub(crate) copy: Copy,
    /// (lapses at, the consumer's ack timeout) for consumers with `ack_timeout_ms`.
    pub(crate) lease: Option<(u64, u64)>,
    /// Deliveries the model saw before this one (for the generator: the newest delivery).
    pub(crate) serial: u64,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct ModelConnection {
    pub(crate) last_delivery_tag: u64,
    pub(crate) unacked: BTreeMap<u64, Outstanding>,
    pub(crate) consumers: BTreeMap<ConsumerTag, u64>,
    /// Tags whose lease lapsed and that were not settled since (a late settle is harmless,
    /// once).
    pub(crate) lapsed: BTreeSet<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ModelTarget {
    Queue(u64),
    Exchange(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModelBinding {
    pub(crate) target: ModelTarget,
    pub(crate) routing_key: String,
    pub(crate) arguments: Headers,
}

#[derive(Debug, Clone)]
pub(crate) struct ModelExchange {
    pub(crate) kind: ExchangeKind,
    pub(crate) options: ExchangeOptions,
    pub(crate) builtin: bool,
    pub(crate) bindings: Vec<ModelBinding>,
}

/// Where every copy ever created went;
/// `created == ready + outstanding + delayed + settled` always.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ledger {
    pub(crate) created: u64,
    pub(crate) acked: u64,
    pub(crate) dropped: u64,
    pub(crate) purged: u64,
    pub(crate) expired: u64,
    pub(crate) deleted_with_queue: u64,
}

/// The broker's deliveries of the command being checked, taken in order by the model's
/// dispatch (which decides when one is due and checks it is legal).
#[derive(Debug, Clone, Default)]
pub(crate) struct Deliveries {
    pub(crate) pending: VecDeque<Delivery>,
    /// The first disagreement found while dispatching; dispatch stops there.
    pub(crate) error: Option<String>,
}

/// The parts of the model that queue-level helpers update while a queue is borrowed.
#[derive(Debug, Clone, Default)]
pub(crate) struct ModelState {
    pub(crate) ledger: Ledger,
    /// Dead letters of the command being predicted, republished in order (see
    /// [`Model::finish`]).
    pub(crate) dead_letters: Vec<ModelDeadLetter>,
    pub(crate) timers: ModelTimers,
}

/// The reference model: plain maps and vectors, no cleverness.
#[derive(Debug, Clone)]
pub(crate) struct Model {
    pub(crate) connections: BTreeMap<ConnectionId, ModelConnection>,
    pub(crate) queues: BTreeMap<String, ModelQueue>,
    pub(crate) exchanges: BTreeMap<String, ModelExchange>,
    pub(crate) next_queue_id: u64,
    pub(crate) state: ModelState,
    pub(crate) limits: Limits,
    /// The next log id for a persistent message reaching a durable queue.
    pub(crate) next_durable_id: u64,
    /// Settles the broker must report for auto-ack deliveries absorbed in this step.
    pub(crate) settled_by_deliveries: Vec<(u64, String)>,
    /// The logical time of the command being predicted.
    pub(crate) now_ms: u64,
    /// Queues to dispatch, in the order the command touched them.
    pub(crate) to_dispatch: Vec<u64>,
    pub(crate) deliveries: Deliveries,
    /// Dead letters so far, by reason republished or "cycle" (dropped by the cycle guard), for
    /// the coverage check.
    pub(crate) dead_letter_counts: BTreeMap<&'static str, u64>,
    /// Time-driven events so far, for the coverage check.
    pub(crate) events: BTreeMap<&'static str, u64>,
    /// Deliveries so far.
    pub(crate) n_deliveries: u64,
}

/// Names are 1..=255 bytes without control characters; user-created ones avoid `wharf.`.
pub(crate) fn name_error(name: &str, user: bool) -> Option<ErrorClass> {
    if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
        Some(ErrorClass::InvalidName)
    } else if user && name.starts_with("wharf.") {
        Some(ErrorClass::ReservedName)
    } else {
        None
    }
}

pub(crate) fn headers_arguments_valid(arguments: &Headers) -> bool {
    match arguments.get("x-match") {
        None => true,
        Some(HeaderValue::Str(mode)) => {
            ["all", "any", "all-with-x", "any-with-x"].contains(&mode.as_str())
        }
        Some(_) => false,
    }
}

/// RabbitMQ's headers matching, spelled out: `x-match` all (default) or any; `x-` keys are
/// ignored unless the mode ends in `-with-x`; values compare typed.
pub(crate) fn headers_binding_matches(arguments: &Headers, headers: &Headers) -> bool {
    let mode = arguments
        .get("x-match")
        .and_then(HeaderValue::as_str)
        .unwrap_or("all");
    let with_x = mode.ends_with("-with-x");
    let wanted: Vec<(&str, &HeaderValue)> = arguments
        .iter()
        .filter(|(key, _)| *key != "x-match" && (with_x || !key.starts_with("x-")))
        .collect();
    let hit = |(key, value): &(&str, &HeaderValue)| headers.get(key) == Some(*value);
    if mode.starts_with("all") {
        wanted.iter().all(hit)
    } else {
        wanted.iter().any(hit)
    }
}

pub(crate) fn binding_matches(
    kind: ExchangeKind,
    binding: &ModelBinding,
    message: &Message,
) -> bool {
    match kind {
        ExchangeKind::Direct => binding.routing_key == *message.routing_key,
        ExchangeKind::Fanout => true,
        ExchangeKind::Topic => topic_matches_naive(&binding.routing_key, &message.routing_key),
        ExchangeKind::Headers => headers_binding_matches(&binding.arguments, &message.headers),
    }
}

pub(crate) fn sorted_debug<T: std::fmt::Debug>(items: impl IntoIterator<Item = T>) -> Vec<String> {
    let mut all: Vec<String> = items.into_iter().map(|item| format!("{item:?}")).collect();
    all.sort();
    all
}

pub(crate) type Outcome = Result<Reply, ErrorClass>;

impl Model {
    pub(crate) fn new(limits: Limits) -> Self {
        let builtins = [
            ("", ExchangeKind::Direct),
            ("wharf.direct", ExchangeKind::Direct),
            ("wharf.fanout", ExchangeKind::Fanout),
            ("wharf.topic", ExchangeKind::Topic),
            ("wharf.headers", ExchangeKind::Headers),
        ];
        let exchanges = builtins
            .into_iter()
            .map(|(name, kind)| {
                let options = ExchangeOptions {
                    durable: true,
                    ..ExchangeOptions::default()
                };
                (
                    name.to_owned(),
                    ModelExchange {
                        kind,
                        options,
                        builtin: true,
                        bindings: Vec::new(),
                    },
                )
            })
            .collect();
        Model {
            connections: BTreeMap::new(),
            queues: BTreeMap::new(),
            exchanges,
            next_queue_id: 1,
            state: ModelState::default(),
            limits,
            next_durable_id: 1,
            settled_by_deliveries: Vec::new(),
            now_ms: 0,
            to_dispatch: Vec::new(),
            deliveries: Deliveries::default(),
            dead_letter_counts: BTreeMap::new(),
            events: BTreeMap::new(),
            n_deliveries: 0,
        }
    }
}

impl Model {
    // ----- the checker -----

    /// Checks one command's observed outcome and effects at `now_ms` against the model's
    /// prediction and moves the model forward. `Err` describes the first disagreement.
    pub(crate) fn observe(
        &mut self,
        now_ms: u64,
        command: &Command,
        outcome: &Result<Reply, CoreError>,
        effects: &[Effect],
    ) -> Result<(), String> {
        self.now_ms = now_ms;
        let mut predicted_effects = Vec::new();
        let before = self.clone();
        self.deliveries = Deliveries {
            pending: effects
                .iter()
                .filter_map(|effect| match effect {
                    Effect::Deliver(delivery) => Some(delivery.clone()),
                    _ => None,
                })
                .collect(),
            error: None,
        };
        let expected = self.predict(command, &mut predicted_effects);
        if expected.is_ok() && !self.state.dead_letters.is_empty() {
            // Copies found expired by the command's last dispatch.
            self.finish(&mut predicted_effects);
        }
        let deliveries = std::mem::take(&mut self.deliveries);
        let observed: Outcome = outcome.clone().map_err(|err| ErrorClass::from(&err));
        if expected != observed {
            return Err(format!(
                "expected {expected:?}, broker answered {outcome:?}"
            ));
        }
        if expected.is_err() {
            if !effects.is_empty() {
                return Err(format!("a failed command emitted effects: {effects:?}"));
            }
            // The model's state is unchanged too: prediction never mutates before deciding.
            debug_assert_eq!(format!("{before:?}"), format!("{self:?}"));
            return Ok(());
        }
        if let Some(err) = deliveries.error {
            return Err(err);
        }
        if let Some(unexpected) = deliveries.pending.front() {
            let why = self
                .check_delivery(unexpected)
                .err()
                .unwrap_or_else(|| "a delivery the model's dispatch did not make".to_owned());
            return Err(format!("{why}\n  delivery: {unexpected:?}"));
        }
        // Settles caused by auto-ack deliveries are known only once the deliveries are
        // absorbed, so log settles are compared separately, after that.
        let is_settle = |effect: &&Effect| matches!(effect, Effect::DurableSettled { .. });
        let observed_settles = sorted_debug(effects.iter().filter(is_settle));
        let mut predicted_settles: Vec<Effect> = predicted_effects
            .iter()
            .filter(is_settle)
            .cloned()
            .collect();
        let observed_effects = effects
            .iter()
            .filter(|effect| !matches!(effect, Effect::Deliver(_) | Effect::DurableSettled { .. }));
        let (observed_effects, predicted_effects) = (
            sorted_debug(observed_effects),
            sorted_debug(predicted_effects.iter().filter(|effect| !is_settle(effect))),
        );
        if observed_effects != predicted_effects {
            return Err(format!(
                "effects {observed_effects:?}, model predicted {predicted_effects:?}"
            ));
        }
        predicted_settles.extend(self.settled_by_deliveries.drain(..).map(
            |(durable_id, queue)| Effect::DurableSettled {
                durable_id,
                queue: queue.as_str().into(),
            },
        ));
        let predicted_settles = sorted_debug(&predicted_settles);
        if observed_settles != predicted_settles {
            return Err(format!(
                "log settles {observed_settles:?}, model predicted {predicted_settles:?}"
            ));
        }
        self.check_invariants()
    }

    pub(crate) fn event(&mut self, what: &'static str) {
        *self.events.entry(what).or_default() += 1;
    }

    /// Records the first disagreement found while dispatching.
    pub(crate) fn dispatch_error(&mut self, err: String) {
        self.deliveries.error.get_or_insert(err);
    }

    /// Hands ready copies of a queue to consumers with capacity until one side runs out,
    /// expiring the copies past their TTL it meets at the head (never delivered). Which
    /// consumer gets each copy is the broker's choice: the model takes the broker's next
    /// delivery, checks it is legal and the copy it expected, and records it.
    pub(crate) fn dispatch(&mut self, queue_id: u64, effects: &mut Vec<Effect>) {
        loop {
            if self.deliveries.error.is_some() {
                return;
            }
            let now_ms = self.now_ms;
            let Some(queue) = self.queues.values_mut().find(|queue| queue.id == queue_id) else {
                // Deleted earlier in the command.
                return;
            };
            if queue.ready.is_empty() || !queue.can_dispatch() {
                return;
            }
            let head_idx = queue.head().expect("not empty");
            if queue.ready[head_idx].expired(now_ms) {
                let copy = queue.ready.remove(head_idx);
                let delivered =
                    self.deliveries.pending.front().is_some_and(|next| {
                        *next.queue == *queue.name && next.message == copy.message
                    });
                if delivered {
                    let err = format!(
                        "delivered a message past its TTL (it expired at {:?}, now {now_ms}): {:?}",
                        copy.expires_at, copy.message.body
                    );
                    self.dispatch_error(err);
                    return;
                }
                queue.expire(copy, &mut self.state, effects);
                self.event("expired in dispatch");
                continue;
            }
            let name = queue.name.clone();
            let Some(delivery) = self.deliveries.pending.pop_front() else {
                self.dispatch_error(format!(
                    "work conservation: queue {name} has a ready message and a consumer with capacity, but the broker delivered nothing (more)"
                ));
                return;
            };
            let absorbed = if *delivery.queue != *name {
                let why = self.check_delivery(&delivery).err().unwrap_or_default();
                Err(format!(
                    "the model dispatches {name} next (a ready message and a consumer with capacity), the broker delivered from {} {why}",
                    delivery.queue
                ))
            } else {
                self.absorb_delivery(&delivery)
            };
            if let Err(err) = absorbed {
                self.dispatch_error(format!("{err}\n  delivery: {delivery:?}"));
                return;
            }
        }
    }

    /// Dispatches the queues the command touched, in that order.
    pub(crate) fn dispatch_touched(&mut self, effects: &mut Vec<Effect>) {
        for queue_id in std::mem::take(&mut self.to_dispatch) {
            self.dispatch(queue_id, effects);
        }
    }

    /// The end of every command that may dead-letter: the pending dead letters are
    /// republished, then the touched queues dispatched; copies that dispatch finds expired
    /// are dead letters of the next round.
    pub(crate) fn finish(&mut self, effects: &mut Vec<Effect>) {
        loop {
            self.republish_dead_letters(effects);
            self.dispatch_touched(effects);
            if self.state.dead_letters.is_empty() {
                break;
            }
        }
    }

    /// Whether a delivery chosen by the broker is legal in the model's current state: to an
    /// attached consumer with capacity and the right priority, of the copy delivered next,
    /// with the right flags and tag. Returns (consumer index, ready index).
    pub(crate) fn check_delivery(&self, delivery: &Delivery) -> Result<(usize, usize), String> {
        let conn = self
            .connections
            .get(&delivery.connection)
            .ok_or("delivery to a connection that is not open")?;
        let queue = self
            .queues
            .get(&*delivery.queue)
            .ok_or("delivery from a queue that does not exist")?;
        let consumer_idx = queue
            .consumers
            .iter()
            .position(|consumer| {
                consumer.connection == delivery.connection && consumer.tag == delivery.consumer_tag
            })
            .ok_or("delivery to a consumer that is not attached to the queue")?;
        let consumer = &queue.consumers[consumer_idx];
        if !consumer.has_capacity() {
            return Err(format!(
                "delivery to a consumer without capacity (prefetch/credit exceeded): {consumer:?}"
            ));
        }
        if queue.options.single_active_consumer {
            if consumer_idx != 0 {
                return Err("single-active-consumer queue delivered to a consumer that is not the active one".into());
            }
        } else {
            let top = queue
                .consumers
                .iter()
                .filter(|c| c.has_capacity())
                .map(|c| c.options.priority)
                .max();
            if Some(consumer.options.priority) != top {
                return Err(format!(
                    "delivery to priority {} while priority {top:?} has capacity",
                    consumer.options.priority
                ));
            }
        }
        // Not ready but waiting for its delay? (Checked only when it is not the head: a
        // redrive can make two copies of one message equal.)
        let held = || {
            let held = self
                .state
                .timers
                .held()
                .find(|(_, id, copy)| *id == queue.id && copy.message == delivery.message);
            held.map(|(due, _, _)| {
                format!(
                    "delivered a delayed message before it was due (due at {due}, now {})",
                    self.now_ms
                )
            })
        };
        let Some(head_idx) = queue.head() else {
            return Err(held().unwrap_or_else(|| {
                "delivery from a queue with no ready message (a duplicate or invented delivery)"
                    .into()
            }));
        };
        let head = &queue.ready[head_idx];
        if head.message != delivery.message
            && let Some(err) = held()
        {
            return Err(err);
        }
        // By value: a dead-lettered copy is a new message built by broker and model alike
        // (bodies are unique per publish, death records tell copies of one apart).
        if head.message != delivery.message {
            let later = queue
                .ready
                .iter()
                .position(|copy| copy.message == delivery.message);
            return Err(match later {
                Some(pos) => format!("FIFO violated: delivered ready message #{pos}, not the oldest of the highest priority ({:?})", head.message.body),
                None => "delivered a message that is not ready in this queue (a duplicate or invented delivery)".into(),
            });
        }
        if head.expired(self.now_ms) {
            return Err(format!(
                "delivered a message past its TTL (it expired at {:?}, now {})",
                head.expires_at, self.now_ms
            ));
        }
        if delivery.redelivered != head.redelivered {
            return Err(format!(
                "redelivered flag {} but the model says {}",
                delivery.redelivered, head.redelivered
            ));
        }
        if delivery.delivery_count != head.delivery_count + 1 {
            return Err(format!(
                "delivery_count {} but this is delivery #{}",
                delivery.delivery_count,
                head.delivery_count + 1
            ));
        }
        if delivery.delivery_tag != DeliveryTag(conn.last_delivery_tag + 1) {
            return Err(format!(
                "delivery tag {:?}, expected {}",
                delivery.delivery_tag,
                conn.last_delivery_tag + 1
            ));
        }
        Ok((consumer_idx, head_idx))
    }

    /// Checks that a delivery chosen by the broker is legal and records it (with a lease
    /// when the consumer has an ack timeout).
    pub(crate) fn absorb_delivery(&mut self, delivery: &Delivery) -> Result<(), String> {
        let (consumer_idx, head_idx) = self.check_delivery(delivery)?;
        let now_ms = self.now_ms;
        let conn = self
            .connections
            .get_mut(&delivery.connection)
            .expect("checked");
        let queue = self.queues.get_mut(&*delivery.queue).expect("checked");
        conn.last_delivery_tag += 1;
        self.n_deliveries += 1;
        let mut copy = queue.ready.remove(head_idx);
        copy.delivery_count += 1;
        queue.delivered += 1;
        if copy.redelivered {
            queue.redelivered += 1;
        }
        if copy.was_delayed {
            *self.events.entry("deliver a delayed message").or_default() += 1;
        }
        if copy.lapsed {
            *self
                .events
                .entry("redeliver after a lapsed lease")
                .or_default() += 1;
        }
        let consumer = &mut queue.consumers[consumer_idx];
        if consumer.options.initial_credit.is_some() {
            consumer.credit -= 1;
        }
        if consumer.options.auto_ack {
            queue.acked += 1;
            self.state.ledger.acked += 1;
            if let Some(durable_id) = copy.durable_id {
                self.settled_by_deliveries
                    .push((durable_id, queue.name.clone()));
            }
        } else {
            consumer.unacked += 1;
            queue.unacked += 1;
            let lease = consumer.options.ack_timeout_ms.map(|timeout| {
                let until = now_ms + timeout;
                self.state.timers.set(
                    until,
                    TimerKind::Lease {
                        connection: delivery.connection,
                        tag: conn.last_delivery_tag,
                    },
                );
                (until, timeout)
            });
            let outstanding = Outstanding {
                queue_id: queue.id,
                consumer_tag: consumer.tag,
                copy,
                lease,
                serial: self.n_deliveries,
            };
            conn.unacked.insert(conn.last_delivery_tag, outstanding);
        }
        Ok(())
    }

    /// Invariants of the model state after a command (and its deliveries).
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        for queue in self.queues.values() {
            if !queue.ready.is_empty() && queue.can_dispatch() {
                return Err(format!(
                    "work conservation: queue {} has {} ready messages and a consumer with capacity",
                    queue.name,
                    queue.ready.len()
                ));
            }
            for consumer in &queue.consumers {
                if !consumer.options.auto_ack
                    && consumer.options.prefetch > 0
                    && consumer.unacked > consumer.options.prefetch
                {
                    return Err(format!("consumer over prefetch: {consumer:?}"));
                }
            }
            if !queue.ready.windows(2).all(|pair| pair[0].seq < pair[1].seq) {
                return Err(format!(
                    "model bug: ready copies of {} out of arrival order",
                    queue.name
                ));
            }
        }
        let ready: u64 = self
            .queues
            .values()
            .map(|queue| queue.ready.len() as u64)
            .sum();
        let outstanding: u64 = self
            .connections
            .values()
            .map(|conn| conn.unacked.len() as u64)
            .sum();
        let delayed = self.state.timers.held().count() as u64;
        let ledger = &self.state.ledger;
        let settled = ledger.acked
            + ledger.dropped
            + ledger.purged
            + ledger.expired
            + ledger.deleted_with_queue;
        // Outstanding copies of deleted queues count as settled by the deletion, but they stay
        // acknowledgeable on their connection, so they are counted once, as outstanding.
        if ledger.created != ready + outstanding + delayed + settled {
            return Err(format!(
                "lost or duplicated copies: created {} != ready {ready} + outstanding {outstanding} + delayed {delayed} + settled {settled}",
                ledger.created
            ));
        }
        Ok(())
    }

    /// The earliest time something must happen on its own: a delayed copy is due, a ready
    /// copy expires, a lease lapses, an unused queue expires.
    pub(crate) fn next_real_deadline(&self) -> Option<u64> {
        let delayed = self.state.timers.held().map(|(due, _, _)| due);
        let expiries = self
            .queues
            .values()
            // A copy has expired from the millisecond after its TTL ends.
            .flat_map(|queue| {
                queue
                    .ready
                    .iter()
                    .filter_map(|copy| copy.expires_at.map(|at| at + 1))
            });
        let leases = self.connections.values().flat_map(|conn| {
            conn.unacked
                .values()
                .filter_map(|out| out.lease.map(|(until, _)| until))
        });
        let unused = self.queues.values().filter_map(|queue| {
            let expires = queue.features.expires?;
            queue
                .consumers
                .is_empty()
                .then_some(queue.last_used_ms + expires)
        });
        delayed.chain(expiries).chain(leases).chain(unused).min()
    }

    /// Compares everything the broker exposes with the model.
    pub(crate) fn check_broker(&self, broker: &Broker) -> Result<(), String> {
        // Logged copies by id: (queue, None when ready or outstanding, Some(due) when delayed).
        type Places = Vec<(String, Option<u64>)>;
        let mut durable: BTreeMap<u64, Places> = BTreeMap::new();
        for queue in self.queues.values() {
            for copy in &queue.ready {
                if let Some(durable_id) = copy.durable_id {
                    durable
                        .entry(durable_id)
                        .or_default()
                        .push((queue.name.clone(), None));
                }
            }
        }
        for conn in self.connections.values() {
            for outstanding in conn.unacked.values() {
                if let (Some(durable_id), Some(name)) = (
                    outstanding.copy.durable_id,
                    self.queue_name_by_id(outstanding.queue_id),
                ) {
                    durable.entry(durable_id).or_default().push((name, None));
                }
            }
        }
        for (due, queue_id, copy) in self.state.timers.held() {
            if let (Some(durable_id), Some(name)) =
                (copy.durable_id, self.queue_name_by_id(queue_id))
            {
                durable
                    .entry(durable_id)
                    .or_default()
                    .push((name, Some(due)));
            }
        }
        let expected: Vec<(u64, Places)> = durable
            .into_iter()
            .map(|(durable_id, mut queues)| {
                queues.sort();
                (durable_id, queues)
            })
            .collect();
        let listed: Vec<(u64, Places)> = broker
            .durable_messages()
            .into_iter()
            .map(|(durable_id, _, queues)| {
                (
                    durable_id,
                    queues
                        .iter()
                        .map(|(queue, due)| (queue.to_string(), *due))
                        .collect(),
                )
            })
            .collect();
        if listed != expected {
            return Err(format!(
                "durable_messages\n  broker: {listed:?}\n  model:  {expected:?}"
            ));
        }
        let mut dedup: Vec<(String, String, u64)> = self
            .queues
            .values()
            .filter(|queue| queue.options.durable && !queue.options.exclusive)
            .flat_map(|queue| {
                queue
                    .dedup
                    .iter()
                    .filter(|(_, until)| **until > self.now_ms)
                    .map(|(id, until)| (queue.name.clone(), id.clone(), *until))
            })
            .collect();
        dedup.sort();
        let mut listed: Vec<(String, String, u64)> = broker
            .durable_dedup_entries()
            .into_iter()
            .map(|(queue, id, until)| (queue.to_string(), id, until))
            .collect();
        listed.sort();
        if listed != dedup {
            return Err(format!(
                "durable_dedup_entries\n  broker: {listed:?}\n  model:  {dedup:?}"
            ));
        }
        let delayed = self.state.timers.held().count() as u64;
        if broker.delayed_total() != delayed {
            return Err(format!(
                "delayed_total() = {}, model has {delayed} delayed copies",
                broker.delayed_total()
            ));
        }
        // Documented: never later than needed (earlier is allowed: stale timers).
        if let Some(deadline) = self.next_real_deadline()
            && broker.next_deadline().is_none_or(|next| next > deadline)
        {
            return Err(format!(
                "next_deadline() = {:?}, but something is due at {deadline}",
                broker.next_deadline()
            ));
        }
        let timers = &self.state.timers;
        let expected: Vec<QueueStats> = self
            .queues
            .values()
            .map(|queue| queue.stats(timers))
            .collect();
        let listed = broker.list_queues(wharf_core::DEFAULT_VHOST);
        if listed != expected {
            return Err(format!(
                "list_queues\n  broker: {listed:?}\n  model:  {expected:?}"
            ));
        }
        for name in QUEUE_NAMES {
            let stats = broker.queue_stats(wharf_core::DEFAULT_VHOST, name);
            match (self.queues.get(name), stats) {
                (Some(queue), Ok(stats)) if stats == queue.stats(timers) => {}
                (
                    None,
                    Err(CoreError::NotFound {
                        kind: EntityKind::Queue,
                        ..
                    }),
                ) => {}
                (queue, stats) => {
                    return Err(format!(
                        "queue_stats({name}): broker {stats:?}, model {:?}",
                        queue.map(|queue| queue.stats(timers))
                    ));
                }
            }
        }
        let exchanges: Vec<String> = broker
            .list_exchanges(wharf_core::DEFAULT_VHOST)
            .iter()
            .map(|info| {
                format!(
                    "{} {:?} {:?} builtin={} bindings={}",
                    info.name, info.kind, info.options, info.builtin, info.bindings
                )
            })
            .collect();
        let expected: Vec<String> = self
            .exchanges
            .iter()
            .map(|(name, ex)| {
                format!(
                    "{name} {:?} {:?} builtin={} bindings={}",
                    ex.kind,
                    ex.options,
                    ex.builtin,
                    ex.bindings.len()
                )
            })
            .collect();
        if exchanges != expected {
            return Err(format!(
                "list_exchanges\n  broker: {exchanges:?}\n  model:  {expected:?}"
            ));
        }
        let bindings = sorted_debug(
            broker
                .list_bindings(wharf_core::DEFAULT_VHOST)
                .into_iter()
                .map(|info| (info.source, info.target, info.routing_key, info.arguments)),
        );
        let expected = sorted_debug(self.bindings());
        if bindings != expected {
            return Err(format!(
                "list_bindings\n  broker: {bindings:?}\n  model:  {expected:?}"
            ));
        }
        let ready_bytes: u64 = self.queues.values().map(ModelQueue::ready_bytes).sum();
        if broker.ready_bytes_total() != ready_bytes {
            return Err(format!(
                "ready_bytes_total() = {}, model has {ready_bytes}",
                broker.ready_bytes_total()
            ));
        }
        for (id, conn) in &self.connections {
            let count = broker.unacked_count(*id);
            if count != conn.unacked.len() {
                return Err(format!(
                    "unacked_count({id:?}) = {count}, model has {}",
                    conn.unacked.len()
                ));
            }
        }
        Ok(())
    }

    /// Every binding as `(source, target, routing key, arguments)`.
    pub(crate) fn bindings(
        &self,
    ) -> impl Iterator<Item = (String, BindTarget, String, Headers)> + '_ {
        self.exchanges.iter().flat_map(move |(source, exchange)| {
            exchange.bindings.iter().map(move |binding| {
                let target = match &binding.target {
                    ModelTarget::Queue(id) => BindTarget::Queue(
                        self.queue_by_id(*id)
                            .expect("bindings lead to live queues")
                            .name
                            .clone(),
                    ),
                    ModelTarget::Exchange(name) => BindTarget::Exchange(name.clone()),
                };
                (
                    source.clone(),
                    target,
                    binding.routing_key.clone(),
                    binding.arguments.clone(),
                )
            })
        })
    }

    // ----- prediction: the deterministic part of every command -----

    pub(crate) fn queue_by_id(&self, id: u64) -> Option<&ModelQueue> {
        self.queues.values().find(|queue| queue.id == id)
    }

    pub(crate) fn queue_name_by_id(&self, id: u64) -> Option<String> {
        self.queue_by_id(id).map(|queue| queue.name.clone())
    }

    /// The queue `name` as `connection` may use it (exclusive queues belong to their owner).
    pub(crate) fn queue_for(
        &self,
        connection: ConnectionId,
        name: &str,
    ) -> Result<&ModelQueue, ErrorClass> {
        let queue = self
            .queues
            .get(name)
            .ok_or(ErrorClass::NotFound(EntityKind::Queue))?;
        match queue.owner {
            Some(owner) if owner != connection => Err(ErrorClass::ResourceLocked),
            _ => Ok(queue),
        }
    }

    pub(crate) fn connection(
        &self,
        connection: ConnectionId,
    ) -> Result<&ModelConnection, ErrorClass> {
        self.connections
            .get(&connection)
            .ok_or(ErrorClass::NotFound(EntityKind::Connection))
    }

    /// Predicts the outcome; on success applies the command's state changes, dispatching
    /// where the command dispatches (taking the broker's deliveries, see [`Model::dispatch`]),
    /// and pushes the non-delivery effects it must emit. On error nothing is changed.
    pub(crate) fn predict(&mut self, command: &Command, effects: &mut Vec<Effect>) -> Outcome {
        match command {
            Command::Restore { .. } | Command::RestoreDedup { .. } | Command::PageIn { .. } => {
                unreachable!("recovery and paging commands are not generated")
            }
            Command::DeclareQueue {
                declarer: Some(_), ..
            } => {
                unreachable!(
                    "the model declares queues without a declarer (tests/broker.rs has them)"
                )
            }
            Command::AddVhost { .. }
            | Command::DeleteVhost { .. }
            | Command::SetVhostLimits { .. } => {
                unreachable!(
                    "the model works in the default virtual host (tests/broker.rs has virtual hosts)"
                )
            }
            Command::OpenConnection { connection, .. } => {
                self.connections.entry(*connection).or_default();
                Ok(Reply::Done)
            }
            Command::CloseConnection { connection } => {
                self.connection(*connection)?;
                self.close_connection(*connection, effects);
                Ok(Reply::Done)
            }
            Command::DeclareExchange {
                vhost: _,
                name,
                kind,
                options,
                passive,
            } => {
                if !name.is_empty()
                    && let Some(err) = name_error(name, false)
                {
                    return Err(err);
                }
                if let Some(existing) = self.exchanges.get(name) {
                    if *passive {
                        return Ok(Reply::Done);
                    }
                    if existing.kind != *kind || existing.options != *options {
                        return Err(if existing.builtin {
                            ErrorClass::AccessRefused
                        } else {
                            ErrorClass::PreconditionFailed
                        });
                    }
                    return Ok(Reply::Done);
                }
                if *passive {
                    return Err(ErrorClass::NotFound(EntityKind::Exchange));
                }
                if let Some(err) = name_error(name, true) {
                    return Err(err);
                }
                // Declared exchanges only: the built-in ones count against nothing.
                let declared = self.exchanges.len() - wharf_core::BUILTIN_EXCHANGES.len();
                if declared >= self.limits.exchanges_max {
                    return Err(ErrorClass::LimitExceeded);
                }
                let exchange = ModelExchange {
                    kind: *kind,
                    options: options.clone(),
                    builtin: false,
                    bindings: Vec::new(),
                };
                self.exchanges.insert(name.clone(), exchange);
                Ok(Reply::Done)
            }
            Command::DeleteExchange {
                name, if_unused, ..
            } => {
                let exchange = self
                    .exchanges
                    .get(name)
                    .ok_or(ErrorClass::NotFound(EntityKind::Exchange))?;
                if exchange.builtin {
                    return Err(ErrorClass::AccessRefused);
                }
                if *if_unused && !exchange.bindings.is_empty() {
                    return Err(ErrorClass::PreconditionFailed);
                }
                self.remove_exchange(name, effects);
                Ok(Reply::Done)
            }
            Command::DeclareQueue {
                vhost: _,
                connection,
                name,
                options,
                passive,
                declarer: None,
            } => {
                self.connection(*connection)?;
                if *passive {
                    self.queue_for(*connection, name)?;
                    return Ok(self.declared(name));
                }
                if let Some(err) = name_error(name, true) {
                    return Err(err);
                }
                let features =
                    model_features(&options.arguments).ok_or(ErrorClass::InvalidArgument)?;
                if self.queues.contains_key(name) {
                    let queue = self.queue_for(*connection, name)?;
                    if queue.options != *options {
                        return Err(ErrorClass::PreconditionFailed);
                    }
                    return Ok(self.declared(name));
                }
                if self.queues.len() >= self.limits.queues_max {
                    return Err(ErrorClass::LimitExceeded);
                }
                let queue = ModelQueue {
                    id: self.next_queue_id,
                    name: name.clone(),
                    options: options.clone(),
                    owner: options.exclusive.then_some(*connection),
                    ready: Vec::new(),
                    next_seq: 0,
                    consumers: Vec::new(),
                    unacked: 0,
                    published: 0,
                    delivered: 0,
                    redelivered: 0,
                    acked: 0,
                    dropped: 0,
                    expired: 0,
                    duplicates: 0,
                    dedup: BTreeMap::new(),
                    last_used_ms: self.now_ms,
                    ttl_armed: None,
                    features,
                };
                self.next_queue_id += 1;
                if let Some(expires) = queue.features.expires {
                    self.state.timers.set(
                        self.now_ms + expires,
                        TimerKind::QueueExpiry { queue_id: queue.id },
                    );
                }
                self.queues.insert(name.clone(), queue);
                Ok(self.declared(name))
            }
            Command::DeleteQueue {
                vhost: _,
                connection,
                name,
                if_unused,
                if_empty,
            } => {
                let queue = self.queue_for(*connection, name)?;
                if *if_unused && !queue.consumers.is_empty() {
                    return Err(ErrorClass::PreconditionFailed);
                }
                if *if_empty && !queue.ready.is_empty() {
                    return Err(ErrorClass::PreconditionFailed);
                }
                let messages = queue.ready.len() as u64;
                self.remove_queue(&name.clone(), effects);
                Ok(Reply::QueueDeleted { messages })
            }
            Command::PurgeQueue {
                connection, name, ..
            } => {
                self.queue_for(*connection, name)?;
                let queue = self.queues.get_mut(name).expect("checked");
                let messages = queue.ready.len() as u64;
                for copy in &queue.ready {
                    if let Some(durable_id) = copy.durable_id {
                        effects.push(Effect::DurableSettled {
                            durable_id,
                            queue: queue.name.as_str().into(),
                        });
                    }
                }
                queue.ready.clear();
                self.state.ledger.purged += messages;
                Ok(Reply::Purged { messages })
            }
            Command::Bind {
                vhost: _,
                source,
                target,
                routing_key,
                arguments,
            } => {
                let (source_exchange, binding) =
                    self.resolve_binding(source, target, routing_key, arguments)?;
                if let ModelTarget::Exchange(name) = &binding.target
                    && name.is_empty()
                {
                    return Err(ErrorClass::AccessRefused);
                }
                if source_exchange.kind == ExchangeKind::Headers
                    && !headers_arguments_valid(arguments)
                {
                    return Err(ErrorClass::InvalidArgument);
                }
                let exchange = self.exchanges.get_mut(source).expect("resolved");
                if exchange.bindings.contains(&binding) {
                    return Ok(Reply::Done);
                }
                if exchange.bindings.len() >= self.limits.bindings_per_exchange_max {
                    return Err(ErrorClass::LimitExceeded);
                }
                exchange.bindings.push(binding);
                Ok(Reply::Done)
            }
            Command::Unbind {
                vhost: _,
                source,
                target,
                routing_key,
                arguments,
            } => {
                let (source_exchange, binding) =
                    self.resolve_binding(source, target, routing_key, arguments)?;
                if !source_exchange.bindings.contains(&binding) {
                    return Err(ErrorClass::NotFound(EntityKind::Exchange));
                }
                self.remove_binding(source, &binding, effects);
                Ok(Reply::Done)
            }
            Command::Publish { message, .. } => {
                let mut targets = self.route(message)?;
                let size = message.body.len() as u64;
                let refused: Vec<u64> = targets
                    .iter()
                    .copied()
                    .filter(|id| {
                        let queue = self.queue_by_id(*id).expect("routed to live queues");
                        queue.features.reject_publish && queue.over_limit(1, size)
                    })
                    .collect();
                if !refused.is_empty() && refused.len() == targets.len() {
                    return Err(ErrorClass::QueueFull);
                }
                let refused_by: Option<Arc<str>> = refused
                    .first()
                    .map(|id| self.queue_name_by_id(*id).expect("live").as_str().into());
                for id in &refused {
                    targets.remove(id);
                }
                let duplicates = self.drop_duplicates(message, &mut targets);
                self.enqueue(message, &targets, effects);
                self.to_dispatch.extend(targets.iter().copied());
                self.finish(effects);
                Ok(Reply::Published {
                    routed: targets.len() as u32,
                    refused_by,
                    duplicates,
                })
            }
            Command::Subscribe {
                vhost: _,
                connection,
                queue,
                consumer_tag,
                options,
            } => {
                if self
                    .connection(*connection)?
                    .consumers
                    .contains_key(consumer_tag)
                {
                    return Err(ErrorClass::ConsumerTagInUse);
                }
                if self.connection(*connection)?.consumers.len()
                    >= self.limits.consumers_per_connection_max
                {
                    return Err(ErrorClass::LimitExceeded);
                }
                // A lease of 0 ms would lapse as soon as it is granted.
                if options
                    .ack_timeout_ms
                    .is_some_and(|timeout| !(1..=DURATION_MS_MAX).contains(&timeout))
                {
                    return Err(ErrorClass::InvalidArgument);
                }
                let model_queue = self.queue_for(*connection, queue)?;
                if options.exclusive && !model_queue.consumers.is_empty() {
                    return Err(ErrorClass::ResourceLocked);
                }
                if model_queue
                    .consumers
                    .iter()
                    .any(|consumer| consumer.options.exclusive)
                {
                    return Err(ErrorClass::ResourceLocked);
                }
                if model_queue.consumers.len() >= self.limits.consumers_per_queue_max {
                    return Err(ErrorClass::LimitExceeded);
                }
                let queue_id = model_queue.id;
                self.connections
                    .get_mut(connection)
                    .expect("checked")
                    .consumers
                    .insert(*consumer_tag, queue_id);
                let model_queue = self.queues.get_mut(queue).expect("checked");
                model_queue.last_used_ms = self.now_ms;
                let mut consumer = ModelConsumer {
                    connection: *connection,
                    tag: *consumer_tag,
                    options: options.clone(),
                    credit: 0,
                    unacked: 0,
                };
                consumer.credit = consumer.credit_after(options.initial_credit.unwrap_or(0));
                model_queue.consumers.push(consumer);
                self.dispatch(queue_id, effects);
                Ok(Reply::Done)
            }
            Command::Cancel {
                connection,
                consumer_tag,
            } => {
                let queue_id = self.consumer_queue(*connection, *consumer_tag)?;
                let name = self
                    .queue_name_by_id(queue_id)
                    .expect("consumers are attached to live queues");
                let conn = self.connections.get_mut(connection).expect("checked");
                conn.consumers.remove(consumer_tag);
                let returned: Vec<u64> = conn
                    .unacked
                    .iter()
                    .filter(|(_, out)| {
                        out.consumer_tag == *consumer_tag && out.queue_id == queue_id
                    })
                    .map(|(tag, _)| *tag)
                    .collect();
                let queue = self.queues.get_mut(&name).expect("live");
                for tag in returned {
                    let outstanding = conn.unacked.remove(&tag).expect("collected");
                    conn.lapsed.insert(tag);
                    queue.unacked -= 1;
                    requeue_or_give_up(queue, outstanding.copy, None, &mut self.state, effects);
                }
                queue.consumers.retain(|consumer| {
                    !(consumer.connection == *connection && consumer.tag == *consumer_tag)
                });
                queue.last_used_ms = self.now_ms;
                let auto_deleted = queue.options.auto_delete && queue.consumers.is_empty();
                self.republish_dead_letters(effects);
                if auto_deleted {
                    self.remove_queue(&name, effects);
                } else {
                    self.dispatch(queue_id, effects);
                }
                self.dispatch_touched(effects);
                Ok(Reply::Done)
            }
            Command::Credit {
                connection,
                consumer_tag,
                credit,
            } => {
                let queue_id = self.consumer_queue(*connection, *consumer_tag)?;
                let queue = self
                    .queues
                    .values_mut()
                    .find(|queue| queue.id == queue_id)
                    .expect("live");
                let consumer = queue
                    .consumers
                    .iter_mut()
                    .find(|consumer| {
                        consumer.connection == *connection && consumer.tag == *consumer_tag
                    })
                    .expect("attached");
                if consumer.options.initial_credit.is_some() {
                    consumer.credit = consumer.credit_after(*credit);
                }
                self.dispatch(queue_id, effects);
                Ok(Reply::Done)
            }
            Command::Ack {
                connection,
                delivery_tag,
                multiple,
            } => self.settle(*connection, *delivery_tag, *multiple, Settle::Ack, effects),
            Command::Nack {
                connection,
                delivery_tag,
                multiple,
                requeue,
            } => {
                let how = if *requeue {
                    Settle::Requeue
                } else {
                    Settle::Drop
                };
                self.settle(*connection, *delivery_tag, *multiple, how, effects)
            }
            Command::Reject {
                connection,
                delivery_tag,
                requeue,
            } => {
                let how = if *requeue {
                    Settle::Requeue
                } else {
                    Settle::Drop
                };
                self.settle(*connection, *delivery_tag, false, how, effects)
            }
            Command::Defer {
                connection,
                delivery_tag,
                delay_ms,
            } => {
                if *delay_ms > DURATION_MS_MAX {
                    return Err(ErrorClass::InvalidArgument);
                }
                let due = self.now_ms + delay_ms;
                self.settle(
                    *connection,
                    *delivery_tag,
                    false,
                    Settle::Defer(due),
                    effects,
                )
            }
            Command::AckRange {
                connection,
                first,
                last,
            } => {
                let conn = self.connection(*connection)?;
                if first > last {
                    return Err(ErrorClass::InvalidArgument);
                }
                let range = first.0..=last.0;
                let tags: Vec<u64> = conn
                    .unacked
                    .keys()
                    .copied()
                    .filter(|tag| range.contains(tag))
                    .collect();
                let lapsed = conn.lapsed.iter().any(|tag| range.contains(tag));
                if tags.is_empty() && !lapsed {
                    return Err(ErrorClass::UnknownDeliveryTag);
                }
                let conn = self.connections.get_mut(connection).expect("checked");
                conn.lapsed.retain(|tag| !range.contains(tag));
                if lapsed {
                    self.event("late settle of a lapsed tag");
                }
                let mut touched: Vec<u64> = Vec::new();
                for tag in &tags {
                    let conn = self.connections.get_mut(connection).expect("checked");
                    let outstanding = conn.unacked.remove(tag).expect("listed");
                    if let Some(queue_id) =
                        self.settle_one(*connection, outstanding, Settle::Ack, effects)
                        && !touched.contains(&queue_id)
                    {
                        touched.push(queue_id);
                    }
                }
                // Acks dead-letter nothing: the touched queues are dispatched right away.
                for queue_id in touched {
                    self.dispatch(queue_id, effects);
                }
                Ok(Reply::Settled {
                    count: tags.len() as u32,
                })
            }
            Command::Tick => {
                self.tick(effects);
                Ok(Reply::Done)
            }
            Command::Touch {
                connection,
                delivery_tag,
            } => {
                let now_ms = self.now_ms;
                let conn = self
                    .connections
                    .get_mut(connection)
                    .ok_or(ErrorClass::NotFound(EntityKind::Connection))?;
                let Some(outstanding) = conn.unacked.get_mut(&delivery_tag.0) else {
                    // A lapsed delivery's tag stays known (and is not forgotten by a touch).
                    return if conn.lapsed.contains(&delivery_tag.0) {
                        Ok(Reply::Done)
                    } else {
                        Err(ErrorClass::UnknownDeliveryTag)
                    };
                };
                if let Some((until, timeout)) = &mut outstanding.lease
                    && now_ms + *timeout > *until
                {
                    *until = now_ms + *timeout;
                    let kind = TimerKind::Lease {
                        connection: *connection,
                        tag: delivery_tag.0,
                    };
                    self.state.timers.set(*until, kind);
                    self.event("touch extended a lease");
                }
                Ok(Reply::Done)
            }
            Command::Redrive {
                vhost: _,
                connection,
                queue,
                max,
                into,
            } => {
                let queue_id = self.queue_for(*connection, queue)?.id;
                let moved = self.redrive(*connection, queue_id, *max, into.as_ref(), effects);
                Ok(Reply::Redriven { moved })
            }
        }
    }

    /// `Redrive`: takes ready copies from the head of the dead-letter queue and moves each to
    /// the queue of its latest death elsewhere (if that queue exists and is not full with
    /// reject-publish) as a new message with the exchange and routing key it had there and no
    /// death headers; the others stay where they were. Stops after `max` moves (0: no limit).
    pub(crate) fn redrive(
        &mut self,
        connection: ConnectionId,
        queue_id: u64,
        max: u64,
        into: Option<&BTreeSet<String>>,
        effects: &mut Vec<Effect>,
    ) -> u64 {
        let limit = if max == 0 { u64::MAX } else { max };
        let name = self.queue_name_by_id(queue_id).expect("checked");
        let mut kept: Vec<Copy> = Vec::new();
        let mut moved = 0;
        while moved < limit {
            let dead_letter_queue = self.queues.get_mut(&name).expect("checked");
            let Some(head_idx) = dead_letter_queue.head() else {
                break;
            };
            let copy = dead_letter_queue.ready.remove(head_idx);
            if copy.expired(self.now_ms) {
                dead_letter_queue.expire(copy, &mut self.state, effects);
                self.event("redrive expired a message");
                continue;
            }
            let origin = death_origin(&copy.message, &name);
            let target = origin.as_ref().and_then(|(target, _, _)| {
                if into.is_some_and(|into| !into.contains(target)) {
                    return None;
                }
                let target = self.queues.get(target)?;
                let size = copy.message.body.len() as u64;
                let full = target.features.reject_publish && target.over_limit(1, size);
                let locked = target.owner.is_some_and(|owner| owner != connection);
                (target.id != queue_id && !full && !locked).then_some(target.id)
            });
            let (Some(target), Some((_, exchange, routing_key))) = (target, origin) else {
                kept.push(copy);
                continue;
            };
            let dead_letter_queue = self.queues.get_mut(&name).expect("checked");
            dead_letter_queue.acked += 1;
            self.state.ledger.acked += 1;
            if let Some(durable_id) = copy.durable_id {
                effects.push(Effect::DurableSettled {
                    durable_id,
                    queue: name.as_str().into(),
                });
            }
            let mut headers = copy.message.headers.clone();
            for key in [
                "x-death",
                "x-first-death-reason",
                "x-first-death-queue",
                "x-first-death-exchange",
            ] {
                headers.remove(key);
            }
            let message = Arc::new(Message {
                exchange: exchange.as_str().into(),
                routing_key: routing_key.as_str().into(),
                headers,
                ..Message::clone(&copy.message)
            });
            self.enqueue(&message, &BTreeSet::from([target]), effects);
            self.to_dispatch.push(target);
            moved += 1;
            self.event("redrive moved a message");
        }
        if !kept.is_empty() {
            self.event("redrive kept a message");
        }
        let dead_letter_queue = self.queues.get_mut(&name).expect("checked");
        for copy in kept {
            dead_letter_queue.put_back(copy);
        }
        self.finish(effects);
        moved
    }

    /// `Tick`: fires every timer due now, first due first (ties: first set first), then
    /// republishes the dead letters and dispatches the touched queues.
    pub(crate) fn tick(&mut self, effects: &mut Vec<Effect>) {
        let now_ms = self.now_ms;
        while let Some(timer) = self.state.timers.pop_due(now_ms) {
            match timer {
                TimerKind::Delayed { queue_id, mut copy } => {
                    let queue = self
                        .queues
                        .values_mut()
                        .find(|queue| queue.id == queue_id)
                        .expect("a deleted queue's delayed copies go with it");
                    copy.was_delayed = true;
                    let size = copy.message.body.len() as u64;
                    if queue.features.reject_publish && queue.over_limit(1, size) {
                        // A full reject-publish queue drops what enters it late (`maxlen`).
                        queue.dropped += 1;
                        self.state.ledger.dropped += 1;
                        self.state
                            .dead_letters
                            .extend(ModelDeadLetter::of(queue, &copy, "maxlen"));
                        if let Some(durable_id) = copy.durable_id {
                            effects.push(Effect::DurableSettled {
                                durable_id,
                                queue: queue.name.as_str().into(),
                            });
                        }
                        self.event("a delayed message entered a full reject-publish queue");
                        continue;
                    }
                    queue.make_ready(copy, now_ms, &mut self.state.timers);
                    if queue.drop_head_over_limit(&mut self.state, effects) > 0 {
                        *self
                            .events
                            .entry("a delayed message entered a full queue")
                            .or_default() += 1;
                    }
                    self.to_dispatch.push(queue_id);
                    self.event("a delayed message entered its queue");
                }
                TimerKind::Ttl { queue_id } => {
                    let Some(queue) = self.queues.values_mut().find(|queue| queue.id == queue_id)
                    else {
                        continue;
                    };
                    if queue.ttl_armed.is_some_and(|armed| armed <= now_ms) {
                        queue.ttl_armed = None;
                    }
                    // In expiry order (ties: lower priority first, then arrival).
                    while let Some(idx) = (0..queue.ready.len())
                        .filter(|idx| queue.ready[*idx].expired(now_ms))
                        .min_by_key(|idx| {
                            let copy = &queue.ready[*idx];
                            (copy.expires_at, copy.priority, copy.seq)
                        })
                    {
                        let copy = queue.ready.remove(idx);
                        queue.expire(copy, &mut self.state, effects);
                        *self.events.entry("expired by a tick").or_default() += 1;
                    }
                    queue.arm_ttl(&mut self.state.timers);
                }
                TimerKind::Lease { connection, tag } => self.lapse(connection, tag, effects),
                TimerKind::QueueExpiry { queue_id } => {
                    let Some(queue) = self.queue_by_id(queue_id) else {
                        continue;
                    };
                    let expires = queue.features.expires.expect("only with x-expires");
                    let deadline = queue.last_used_ms + expires;
                    let kind = TimerKind::QueueExpiry { queue_id };
                    if !queue.consumers.is_empty() {
                        // In use: looked at again after another period.
                        self.state.timers.set(now_ms + expires, kind);
                    } else if deadline > now_ms {
                        self.state.timers.set(deadline, kind);
                    } else {
                        let name = queue.name.clone();
                        self.remove_queue(&name, effects);
                        self.event("queue expired");
                    }
                }
            }
        }
        // The documented contract, whatever the timer scheme: a tick leaves nothing due.
        if let Some(due) = self.next_real_deadline().filter(|due| *due <= now_ms) {
            self.dispatch_error(format!(
                "a Tick at {now_ms} left something due at {due} (a delayed copy, an expiry, a lease or an unused queue)"
            ));
        }
        self.finish(effects);
    }

    /// A lease timer fired: the delivery goes back to its queue if it is still outstanding
    /// and its lease was not extended since; its tag is remembered as lapsed.
    pub(crate) fn lapse(&mut self, connection: ConnectionId, tag: u64, effects: &mut Vec<Effect>) {
        let now_ms = self.now_ms;
        let Some(conn) = self.connections.get_mut(&connection) else {
            return;
        };
        let due = conn
            .unacked
            .get(&tag)
            .is_some_and(|out| out.lease.is_some_and(|(until, _)| until <= now_ms));
        if !due {
            return;
        }
        let mut outstanding = conn.unacked.remove(&tag).expect("checked");
        conn.lapsed.insert(tag);
        self.event("lease lapsed");
        let Some(queue) = self
            .queues
            .values_mut()
            .find(|queue| queue.id == outstanding.queue_id)
        else {
            // Its queue was deleted: the copy went with it.
            self.state.ledger.deleted_with_queue += 1;
            return;
        };
        queue.unacked -= 1;
        if let Some(consumer) = queue.consumers.iter_mut().find(|consumer| {
            consumer.connection == connection && consumer.tag == outstanding.consumer_tag
        }) {
            consumer.unacked -= 1;
        }
        outstanding.copy.lapsed = true;
        requeue_or_give_up(queue, outstanding.copy, None, &mut self.state, effects);
        self.to_dispatch.push(outstanding.queue_id);
    }

    /// The reply to a declare of an existing queue, which counts as a use (`x-expires`).
    pub(crate) fn declared(&mut self, name: &str) -> Reply {
        let queue = self.queues.get_mut(name).expect("caller checked");
        queue.last_used_ms = self.now_ms;
        Reply::QueueDeclared {
            name: queue.name.as_str().into(),
            ready: queue.ready.len() as u64,
            consumers: queue.consumers.len() as u32,
        }
    }

    pub(crate) fn consumer_queue(
        &self,
        connection: ConnectionId,
        tag: ConsumerTag,
    ) -> Result<u64, ErrorClass> {
        self.connection(connection)?
            .consumers
            .get(&tag)
            .copied()
            .ok_or(ErrorClass::NotFound(EntityKind::Consumer))
    }

    pub(crate) fn resolve_binding(
        &self,
        source: &str,
        target: &BindTarget,
        routing_key: &str,
        arguments: &Headers,
    ) -> Result<(&ModelExchange, ModelBinding), ErrorClass> {
        if source.is_empty() {
            return Err(ErrorClass::AccessRefused);
        }
        let exchange = self
            .exchanges
            .get(source)
            .ok_or(ErrorClass::NotFound(EntityKind::Exchange))?;
        let target = match target {
            BindTarget::Queue(name) => ModelTarget::Queue(
                self.queues
                    .get(name)
                    .ok_or(ErrorClass::NotFound(EntityKind::Queue))?
                    .id,
            ),
            BindTarget::Exchange(name) => {
                self.exchanges
                    .get(name)
                    .ok_or(ErrorClass::NotFound(EntityKind::Exchange))?;
                ModelTarget::Exchange(name.clone())
            }
        };
        Ok((
            exchange,
            ModelBinding {
                target,
                routing_key: routing_key.to_owned(),
                arguments: arguments.clone(),
            },
        ))
    }

    /// The naive router: every queue reachable through matching bindings, each exchange
    /// visited once.
    pub(crate) fn route(&self, message: &Message) -> Result<BTreeSet<u64>, ErrorClass> {
        self.route_from(message, false)
    }

    /// [`Model::route`]; dead letters (`dead_letter`) may enter internal exchanges.
    pub(crate) fn route_from(
        &self,
        message: &Message,
        dead_letter: bool,
    ) -> Result<BTreeSet<u64>, ErrorClass> {
        let mut targets = BTreeSet::new();
        let start: &str = &message.exchange;
        if start.is_empty() {
            if let Some(queue) = self.queues.get(&*message.routing_key) {
                targets.insert(queue.id);
            }
            return Ok(targets);
        }
        let exchange = self
            .exchanges
            .get(start)
            .ok_or(ErrorClass::NotFound(EntityKind::Exchange))?;
        if exchange.options.internal && !dead_letter {
            return Err(ErrorClass::AccessRefused);
        }
        let mut visited = vec![start.to_owned()];
        let mut pending = vec![start.to_owned()];
        while let Some(name) = pending.pop() {
            let exchange = &self.exchanges[&name];
            for binding in exchange
                .bindings
                .iter()
                .filter(|binding| binding_matches(exchange.kind, binding, message))
            {
                match &binding.target {
                    ModelTarget::Queue(id) => {
                        targets.insert(*id);
                    }
                    ModelTarget::Exchange(next) => {
                        if !visited.contains(next) {
                            visited.push(next.clone());
                            pending.push(next.clone());
                        }
                    }
                }
            }
        }
        Ok(targets)
    }

    pub(crate) fn settle(
        &mut self,
        connection: ConnectionId,
        tag: DeliveryTag,
        multiple: bool,
        how: Settle,
        effects: &mut Vec<Effect>,
    ) -> Outcome {
        let conn = self
            .connections
            .get_mut(&connection)
            .ok_or(ErrorClass::NotFound(EntityKind::Connection))?;
        let settled: Vec<Outstanding> = if multiple {
            if tag.0 != 0 && !conn.unacked.contains_key(&tag.0) && !conn.lapsed.contains(&tag.0) {
                return Err(ErrorClass::UnknownDeliveryTag);
            }
            let upto = if tag.0 == 0 { u64::MAX } else { tag.0 };
            // Lapsed tags up to it are settled too (nothing to do for them).
            let n_lapsed = conn.lapsed.len();
            conn.lapsed.retain(|lapsed| *lapsed > upto);
            let forgot_lapsed = conn.lapsed.len() < n_lapsed;
            let tags: Vec<u64> = conn.unacked.range(..=upto).map(|(t, _)| *t).collect();
            let settled = tags
                .iter()
                .map(|t| conn.unacked.remove(t).expect("listed"))
                .collect();
            if forgot_lapsed {
                self.event("late settle of a lapsed tag");
            }
            settled
        } else {
            match conn.unacked.remove(&tag.0) {
                Some(outstanding) => vec![outstanding],
                None if conn.lapsed.remove(&tag.0) => {
                    // Its lease lapsed and it went back to its queue: accepted once, no-op.
                    self.event("late settle of a lapsed tag");
                    return Ok(Reply::Settled { count: 0 });
                }
                None => return Err(ErrorClass::UnknownDeliveryTag),
            }
        };
        let count = settled.len() as u32;
        let mut touched: Vec<u64> = Vec::new();
        for outstanding in settled {
            if let Some(queue_id) = self.settle_one(connection, outstanding, how, effects)
                && !touched.contains(&queue_id)
            {
                touched.push(queue_id);
            }
        }
        self.to_dispatch.extend(touched);
        self.finish(effects);
        Ok(Reply::Settled { count })
    }

    /// Settles one outstanding delivery; returns its queue, unless that was deleted while the
    /// delivery was outstanding (then the copy went with it and there is nothing to do).
    pub(crate) fn settle_one(
        &mut self,
        connection: ConnectionId,
        outstanding: Outstanding,
        how: Settle,
        effects: &mut Vec<Effect>,
    ) -> Option<u64> {
        let now_ms = self.now_ms;
        let Some(queue) = self
            .queues
            .values_mut()
            .find(|queue| queue.id == outstanding.queue_id)
        else {
            self.state.ledger.deleted_with_queue += 1;
            return None;
        };
        queue.unacked -= 1;
        if let Some(consumer) = queue.consumers.iter_mut().find(|consumer| {
            consumer.connection == connection && consumer.tag == outstanding.consumer_tag
        }) {
            consumer.unacked -= 1;
        }
        let mut copy = outstanding.copy;
        // Back to the queue at this time (now: at once), or out of it (`None`).
        let back_at: Option<u64> = match how {
            Settle::Ack => {
                queue.acked += 1;
                self.state.ledger.acked += 1;
                None
            }
            Settle::Drop => {
                queue.dropped += 1;
                self.state.ledger.dropped += 1;
                self.state
                    .dead_letters
                    .extend(ModelDeadLetter::of(queue, &copy, "rejected"));
                None
            }
            Settle::Requeue => match &queue.features.retry {
                // The retry schedule delays the n-th requeue by its n-th step; past the last
                // step the copy is rejected for good.
                Some(schedule) => match schedule.get(copy.retries as usize) {
                    Some(delay) => {
                        copy.retries += 1;
                        *self.events.entry("retry delayed a requeue").or_default() += 1;
                        Some(now_ms + delay)
                    }
                    None => {
                        queue.dropped += 1;
                        self.state.ledger.dropped += 1;
                        let dead = ModelDeadLetter::of(queue, &copy, "rejected");
                        if dead.is_some() {
                            *self
                                .events
                                .entry("retries exhausted, dead-lettered")
                                .or_default() += 1;
                        }
                        self.state.dead_letters.extend(dead);
                        None
                    }
                },
                None => Some(now_ms),
            },
            Settle::Defer(due) => Some(due),
        };
        if let Some(due) = back_at {
            let later = (due > now_ms).then_some(due);
            if later.is_some() && matches!(how, Settle::Defer(_)) {
                *self.events.entry("defer held a message").or_default() += 1;
            }
            requeue_or_give_up(queue, copy, later, &mut self.state, effects);
            return Some(outstanding.queue_id);
        }
        if let Some(durable_id) = copy.durable_id {
            effects.push(Effect::DurableSettled {
                durable_id,
                queue: queue.name.as_str().into(),
            });
        }
        Some(outstanding.queue_id)
    }

    /// Drops the targets whose dedup window remembers the message's id (counted per queue);
    /// the other targets with a window remember it from now on. Returns how many dropped.
    pub(crate) fn drop_duplicates(
        &mut self,
        message: &Message,
        targets: &mut BTreeSet<u64>,
    ) -> u32 {
        let Some(id) = &message.message_id else {
            return 0;
        };
        let now_ms = self.now_ms;
        let mut duplicates = 0;
        for queue in self.queues.values_mut() {
            let Some(window) = queue.features.dedup_window else {
                continue;
            };
            if !targets.contains(&queue.id) {
                continue;
            }
            if queue.dedup.get(id).is_some_and(|until| *until > now_ms) {
                queue.duplicates += 1;
                duplicates += 1;
                targets.remove(&queue.id);
            } else {
                queue.dedup.insert(id.clone(), now_ms + window);
            }
        }
        duplicates
    }

    /// A routed message entering its target queues: logged if persistent and a target is
    /// durable; delayed copies wait in timers, the others become ready and each queue is
    /// trimmed to its drop-head limits (dropped copies dead-lettered).
    pub(crate) fn enqueue(
        &mut self,
        message: &Arc<Message>,
        targets: &BTreeSet<u64>,
        effects: &mut Vec<Effect>,
    ) {
        let now_ms = self.now_ms;
        let delay = message.delay_ms.filter(|delay| *delay > 0);
        let ready_at_ms = now_ms + delay.unwrap_or(0);
        // The model's queues never set `x-sync`: every durable queue follows the broker.
        let mut sync = wharf_core::DurableSync::default();
        let durable_queues: Vec<Arc<str>> = targets
            .iter()
            .filter_map(|id| self.queues.values().find(|queue| queue.id == *id))
            .filter(|queue| queue.options.durable && !queue.options.exclusive)
            .map(|queue| {
                assert!(queue.options.arguments.get(wharf_core::ARG_SYNC).is_none());
                sync.add(None);
                Arc::from(queue.name.as_str())
            })
            .collect();
        let durable_id = (message.persistent && !durable_queues.is_empty()).then(|| {
            let durable_id = self.next_durable_id;
            self.next_durable_id += 1;
            effects.push(Effect::DurableEnqueued {
                durable_id,
                queues: durable_queues,
                message: message.clone(),
                ready_at_ms,
                sync,
            });
            durable_id
        });
        for id in targets {
            let queue = self
                .queues
                .values_mut()
                .find(|queue| queue.id == *id)
                .expect("routed to live queues");
            queue.published += 1;
            let durable = queue.options.durable && !queue.options.exclusive;
            let copy = Copy::new(queue, message, durable_id.filter(|_| durable));
            self.state.ledger.created += 1;
            if delay.is_some() {
                let kind = TimerKind::Delayed {
                    queue_id: *id,
                    copy,
                };
                self.state.timers.set(ready_at_ms, kind);
                continue;
            }
            queue.make_ready(copy, now_ms, &mut self.state.timers);
            queue.drop_head_over_limit(&mut self.state, effects);
        }
    }

    /// Republishes the command's dead letters, first in first out (each may drop and
    /// dead-letter more): to their dead-letter exchange (internal ones too) unless it is missing
    /// or the message already died in that queue for that reason (other than `rejected`). Their
    /// targets are dispatched next.
    pub(crate) fn republish_dead_letters(&mut self, effects: &mut Vec<Effect>) {
        let mut n_dead_letters = 0;
        while !self.state.dead_letters.is_empty() {
            let dead = self.state.dead_letters.remove(0);
            n_dead_letters += 1;
            if n_dead_letters > wharf_core::limits::DEAD_LETTERS_PER_COMMAND_MAX {
                continue;
            }
            if dead.reason != "rejected"
                && dead
                    .earlier_deaths()
                    .iter()
                    .any(|record| dead.is_this_death(record))
            {
                *self.dead_letter_counts.entry("cycle").or_default() += 1;
                continue;
            }
            *self.dead_letter_counts.entry(dead.reason).or_default() += 1;
            let message = Arc::new(dead.republished(self.now_ms));
            let Ok(mut targets) = self.route_from(&message, true) else {
                continue;
            };
            let size = message.body.len() as u64;
            targets.retain(|id| {
                let queue = self.queue_by_id(*id).expect("routed to live queues");
                !(queue.features.reject_publish && queue.over_limit(1, size))
            });
            self.enqueue(&message, &targets, effects);
            self.to_dispatch.extend(targets.iter().copied());
        }
    }

    pub(crate) fn close_connection(&mut self, connection: ConnectionId, effects: &mut Vec<Effect>) {
        let conn = self.connections.remove(&connection).expect("checked");
        // Queues to dispatch (or auto-delete), in the order the connection touched them: its
        // consumers' queues by consumer tag, then the queues of its unacked deliveries.
        let mut touched: Vec<u64> = Vec::new();
        let mut lost_consumers: Vec<u64> = Vec::new();
        for (tag, queue_id) in &conn.consumers {
            if let Some(queue) = self.queues.values_mut().find(|queue| queue.id == *queue_id) {
                queue.consumers.retain(|consumer| {
                    !(consumer.connection == connection && consumer.tag == *tag)
                });
                if !touched.contains(queue_id) {
                    touched.push(*queue_id);
                    lost_consumers.push(*queue_id);
                }
            }
        }
        for outstanding in conn.unacked.into_values() {
            match self
                .queues
                .values_mut()
                .find(|queue| queue.id == outstanding.queue_id)
            {
                Some(queue) => {
                    queue.unacked -= 1;
                    requeue_or_give_up(queue, outstanding.copy, None, &mut self.state, effects);
                    if !touched.contains(&outstanding.queue_id) {
                        touched.push(outstanding.queue_id);
                    }
                }
                None => self.state.ledger.deleted_with_queue += 1,
            }
        }
        // Dead letters go out before the exclusive and auto-delete queues are deleted.
        self.republish_dead_letters(effects);
        let exclusive: Vec<String> = self
            .queues
            .values()
            .filter(|queue| queue.owner == Some(connection))
            .map(|queue| queue.name.clone())
            .collect();
        for name in exclusive {
            self.remove_queue(&name, effects);
        }
        for queue_id in touched {
            let now_ms = self.now_ms;
            let Some(queue) = self.queues.values_mut().find(|queue| queue.id == queue_id) else {
                continue;
            };
            if queue.consumers.is_empty() {
                queue.last_used_ms = now_ms;
            }
            if queue.options.auto_delete
                && queue.consumers.is_empty()
                && lost_consumers.contains(&queue_id)
            {
                let name = queue.name.clone();
                self.remove_queue(&name, effects);
            } else {
                self.dispatch(queue_id, effects);
            }
        }
        self.dispatch_touched(effects);
    }

    /// Deletes a queue: consumers cancelled (and told), bindings to it removed (auto-deleting
    /// sources left without bindings), ready and delayed copies dropped. Outstanding copies
    /// stay with their connections, acknowledgeable and ignored.
    pub(crate) fn remove_queue(&mut self, name: &str, effects: &mut Vec<Effect>) {
        let queue = self.queues.remove(name).expect("caller checked");
        for consumer in &queue.consumers {
            if let Some(conn) = self.connections.get_mut(&consumer.connection) {
                conn.consumers.remove(&consumer.tag);
            }
            effects.push(Effect::ConsumerCancelled {
                connection: consumer.connection,
                consumer_tag: consumer.tag,
                reason: CancelReason::QueueDeleted,
            });
        }
        self.state.ledger.deleted_with_queue +=
            queue.ready.len() as u64 + self.state.timers.remove_held_of(queue.id);
        let target = ModelTarget::Queue(queue.id);
        self.remove_bindings_to(&target, effects);
        effects.push(Effect::QueueDeleted {
            name: name.into(),
            // Exclusive queues are never on disk, whatever their `durable` flag says.
            durable: queue.options.durable && !queue.options.exclusive,
        });
    }

    pub(crate) fn remove_bindings_to(&mut self, target: &ModelTarget, effects: &mut Vec<Effect>) {
        let doomed: Vec<(String, ModelBinding)> = self
            .exchanges
            .iter()
            .flat_map(|(source, exchange)| {
                exchange
                    .bindings
                    .iter()
                    .filter(|binding| binding.target == *target)
                    .map(|binding| (source.clone(), binding.clone()))
            })
            .collect();
        for (source, binding) in doomed {
            self.remove_binding(&source, &binding, effects);
        }
    }

    pub(crate) fn remove_binding(
        &mut self,
        source: &str,
        binding: &ModelBinding,
        effects: &mut Vec<Effect>,
    ) {
        let Some(exchange) = self.exchanges.get_mut(source) else {
            return;
        };
        let Some(pos) = exchange
            .bindings
            .iter()
            .position(|existing| existing == binding)
        else {
            return;
        };
        exchange.bindings.remove(pos);
        if exchange.options.auto_delete && exchange.bindings.is_empty() && !exchange.builtin {
            self.remove_exchange(source, effects);
        }
    }

    pub(crate) fn remove_exchange(&mut self, name: &str, effects: &mut Vec<Effect>) {
        let Some(exchange) = self.exchanges.remove(name) else {
            return;
        };
        effects.push(Effect::ExchangeDeleted {
            name: name.into(),
            durable: exchange.options.durable,
        });
        self.remove_bindings_to(&ModelTarget::Exchange(name.to_owned()), effects);
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Settle {
    Ack,
    Requeue,
    Drop,
    /// Requeue when due (at once when already due).
    Defer(u64),
}
