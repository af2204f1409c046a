//! Dead letters: death records, republishing to the dead-letter exchange, redrive.

use super::*;

/// Why a message was dead-lettered (the `reason` of its `x-death` record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DeathReason {
    /// Nacked or rejected without requeue.
    Rejected,
    /// Dropped from the head by the queue's length limit.
    MaxLen,
    /// Would have been requeued after its queue's delivery limit.
    DeliveryLimit,
    /// Its TTL passed while it was ready.
    Expired,
}

impl DeathReason {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::MaxLen => "maxlen",
            DeathReason::DeliveryLimit => "delivery_limit",
            DeathReason::Expired => "expired",
        }
    }
}

/// A message on its way from a queue to that queue's dead-letter exchange.
#[derive(Debug, Clone)]
pub(super) struct DeadLetter {
    message: Arc<Message>,
    /// The virtual host of the queue it left, where its dead-letter exchange is.
    vhost: Arc<str>,
    queue: Arc<str>,
    reason: DeathReason,
    exchange: Arc<str>,
    routing_key: Option<Arc<str>>,
}

impl DeadLetter {
    /// The dead letter of `entry` leaving `queue`, if the queue has a dead-letter exchange.
    pub(super) fn of(queue: &Queue, entry: &Entry, reason: DeathReason) -> Option<DeadLetter> {
        Some(DeadLetter {
            message: entry.message.clone(),
            vhost: queue.vhost.clone(),
            queue: queue.name.clone(),
            reason,
            exchange: queue.features.dead_letter_exchange.clone()?,
            routing_key: queue.features.dead_letter_routing_key.clone(),
        })
    }
}

/// Header of the list of death records, most recent first.
pub(super) const X_DEATH: &str = "x-death";

pub(super) fn is_death_of(record: &HeaderValue, queue: &str, reason: &str) -> bool {
    matches!(record, HeaderValue::Map(map)
        if map.get("queue").and_then(HeaderValue::as_str) == Some(queue)
            && map.get("reason").and_then(HeaderValue::as_str) == Some(reason))
}

/// The message as republished to the dead-letter exchange: its `x-death` list gets a record for
/// this death in front (an earlier record for the same queue and reason has its count
/// incremented and moves to the front, as RabbitMQ does), `x-first-death-*` are set on the first
/// death; exchange and routing key become the dead-letter ones.
pub(super) fn dead_lettered(dead: &DeadLetter, now_ms: u64) -> Message {
    let message = &dead.message;
    let reason = dead.reason.as_str();
    let mut headers = message.headers.clone();
    let mut deaths = match headers.get(X_DEATH) {
        Some(HeaderValue::List(records)) => records.clone(),
        _ => Vec::new(),
    };
    let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
    let record = match deaths
        .iter()
        .position(|record| is_death_of(record, &dead.queue, reason))
    {
        Some(idx) => {
            let HeaderValue::Map(mut record) = deaths.remove(idx) else {
                unreachable!("is_death_of matched a map")
            };
            let count = match record.get("count") {
                Some(HeaderValue::Int(count)) => count.saturating_add(1),
                _ => 1,
            };
            record.insert("count", count);
            record.insert("time", now);
            record
        }
        None => Headers::new()
            .with("count", 1i64)
            .with("reason", reason)
            .with("queue", &*dead.queue)
            .with("time", now)
            .with("exchange", &*message.exchange)
            .with(
                "routing-keys",
                HeaderValue::List(vec![HeaderValue::from(&*message.routing_key)]),
            ),
    };
    deaths.insert(0, HeaderValue::Map(record));
    headers.insert(X_DEATH, HeaderValue::List(deaths));
    if headers.get("x-first-death-reason").is_none() {
        headers.insert("x-first-death-reason", reason);
        headers.insert("x-first-death-queue", &*dead.queue);
        headers.insert("x-first-death-exchange", &*message.exchange);
    }
    // Like RabbitMQ, the copy loses its TTL (so it does not expire again where it lands) and
    // its delay (it was already held once).
    Message {
        exchange: dead.exchange.clone(),
        routing_key: dead
            .routing_key
            .clone()
            .unwrap_or_else(|| message.routing_key.clone()),
        headers,
        expiration_ms: None,
        delay_ms: None,
        ..Message::clone(message)
    }
}

/// Where a dead-lettered message came from: the queue of its latest death record other than
/// `here`, with the exchange and routing key it was published with there.
pub(super) fn death_origin(message: &Message, here: &str) -> Option<(String, Arc<str>, Arc<str>)> {
    let Some(HeaderValue::List(records)) = message.headers.get(X_DEATH) else {
        return None;
    };
    records.iter().find_map(|record| {
        let HeaderValue::Map(record) = record else {
            return None;
        };
        let queue = record.get("queue")?.as_str()?;
        if queue == here {
            return None;
        }
        let exchange = record.get("exchange")?.as_str()?;
        let routing_key = match record.get("routing-keys") {
            Some(HeaderValue::List(keys)) => keys.first()?.as_str()?,
            _ => return None,
        };
        Some((queue.to_owned(), exchange.into(), routing_key.into()))
    })
}

impl Broker {
    /// Republishes the pending dead letters (which may drop and dead-letter further messages
    /// from full queues), then dispatches every queue the command touched. Every command that
    /// may dead-letter ends with this, so that all enqueues and drops of a command happen
    /// before any of its deliveries.
    pub(super) fn finish_dead_letters_and_dispatch(&mut self, effects: &mut Vec<Effect>) {
        loop {
            self.republish_dead_letters(effects);
            self.dispatch_touched(effects);
            // Dispatching may find expired messages, which dead-letter in turn; this ends
            // because each round only moves messages that expired, and the cycle guard drops
            // a message that expires twice in the same queue.
            if self.dead_letters.is_empty() {
                break;
            }
        }
    }

    /// Republishes the pending dead letters, in order (see
    /// [`Broker::finish_dead_letters_and_dispatch`]).
    pub(super) fn republish_dead_letters(&mut self, effects: &mut Vec<Effect>) {
        let mut n_dead_letters = 0;
        while let Some(dead) = self.dead_letters.pop_front() {
            n_dead_letters += 1;
            if n_dead_letters > DEAD_LETTERS_PER_COMMAND_MAX {
                continue;
            }
            self.republish_dead_letter(&dead, effects);
        }
    }

    /// Republishes one dead letter to its dead-letter exchange. It is dropped instead when the
    /// exchange does not exist, when no queue takes it, and — the cycle guard — when it already
    /// died in the same queue for the same reason, unless that reason is `rejected` (a consumer
    /// decision, not an automatic loop), as RabbitMQ does.
    pub(super) fn republish_dead_letter(&mut self, dead: &DeadLetter, effects: &mut Vec<Effect>) {
        if dead.reason != DeathReason::Rejected
            && let Some(HeaderValue::List(records)) = dead.message.headers.get(X_DEATH)
            && records
                .iter()
                .any(|record| is_death_of(record, &dead.queue, dead.reason.as_str()))
        {
            return;
        }
        let message = Arc::new(dead_lettered(dead, self.now_ms));
        let mut targets = Vec::new();
        if self
            .route(&dead.vhost, &message, &mut targets, true)
            .is_err()
        {
            return;
        }
        // A dead letter refused by a full queue is dropped (even with reject-publish-dlx: no
        // dead-lettering a dead letter in a loop).
        self.refuse_full(message.size_bytes(), &mut targets, &mut Vec::new());
        self.enqueue_routed(&message, &targets, effects);
        self.to_dispatch.extend_from_slice(&targets);
    }

    pub(super) fn redrive(
        &mut self,
        vhost: &str,
        connection: ConnectionId,
        queue_name: &str,
        max: u64,
        into: Option<&std::collections::BTreeSet<String>>,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let qid = self.queue_for(vhost, connection, queue_name)?;
        let limit = if max == 0 { u64::MAX } else { max };
        let mut kept: Vec<Entry> = Vec::new();
        let mut moved = 0;
        while moved < limit {
            let queue = self.queues.get_mut(&qid).expect("checked");
            let Some(entry) = queue.ready.pop_front() else {
                break;
            };
            let size = entry.message.size_bytes();
            self.ready_bytes_total -= size;
            if entry.expired(self.now_ms) {
                // Past its TTL here: it expires (as dispatch would), it is not moved.
                expire_entry(queue, entry, &mut self.dead_letters, effects);
                continue;
            }
            let origin = death_origin(&entry.message, &queue.name);
            let target = origin
                .as_ref()
                .filter(|(name, _, _)| into.is_none_or(|into| into.contains(name)))
                .and_then(|(name, _, _)| {
                    let ns = self.vhosts.get(vhost)?;
                    ns.queue_names.get(name.as_str()).copied()
                })
                .filter(|target| {
                    *target != qid
                        && super::topology::check_exclusive_access(&self.queues[target], connection)
                            .is_ok()
                });
            let (Some(target), Some((_, exchange, routing_key))) = (target, origin) else {
                kept.push(entry);
                continue;
            };
            let mut targets = vec![target];
            self.refuse_full(size, &mut targets, &mut Vec::new());
            if targets.is_empty() {
                kept.push(entry);
                continue;
            }
            let queue = self.queues.get_mut(&qid).expect("checked");
            queue.stats.acked += 1;
            if let Some(durable_id) = entry.durable_id {
                effects.push(Effect::DurableSettled {
                    durable_id,
                    queue: queue.key.clone(),
                });
            }
            let mut headers = entry.message.headers.clone();
            for key in [
                X_DEATH,
                "x-first-death-reason",
                "x-first-death-queue",
                "x-first-death-exchange",
            ] {
                headers.remove(key);
            }
            let message = Arc::new(Message {
                exchange,
                routing_key,
                headers,
                ..Message::clone(&entry.message)
            });
            self.enqueue_routed(&message, &targets, effects);
            self.to_dispatch.push(target);
            moved += 1;
        }
        let queue = self.queues.get_mut(&qid).expect("checked");
        for entry in kept {
            self.ready_bytes_total += entry.message.size_bytes();
            queue.ready.requeue(entry);
        }
        request_page_in(queue, effects);
        self.finish_dead_letters_and_dispatch(effects);
        Ok(Reply::Redriven { moved })
    }
}
