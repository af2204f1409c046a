//! Publishing: routing, reject-publish and dedup checks, enqueueing (ready, delayed or paged),
//! drop-head limits.

use super::*;

/// Enforces a drop-head length limit after an enqueue: drops ready messages from the head
/// (the next to be delivered) until the queue fits, paged messages counted. Returns the bytes
/// dropped. When the head is paged ([`Paged::blocks`](crate::queue::Paged::blocks): the next
/// message to deliver is not in memory), the queue stays over its limit until the page-in the
/// dispatch asks for brings the head back, which drops it then (`Broker::page_in`).
pub(super) fn drop_head_over_limit(
    queue: &mut Queue,
    dead_letters: &mut VecDeque<DeadLetter>,
    effects: &mut Vec<Effect>,
) -> u64 {
    let mut dropped_bytes = 0;
    while queue.features.overflow == Overflow::DropHead
        && queue
            .features
            .over_limit(queue.ready_total(), queue.ready_bytes())
        && !queue.paged.blocks(queue.ready.top_priority())
    {
        let entry = queue
            .ready
            .pop_front()
            .expect("over a limit means not empty");
        dropped_bytes += entry.message.size_bytes();
        queue.stats.dropped += 1;
        dead_letters.extend(DeadLetter::of(queue, &entry, DeathReason::MaxLen));
        if let Some(durable_id) = entry.durable_id {
            effects.push(Effect::DurableSettled {
                durable_id,
                queue: queue.key.clone(),
            });
        }
    }
    dropped_bytes
}

/// Holds an entry until `due`, when [`Command::Tick`] puts it at the back of the queue. The
/// caller counts it in `Broker::delayed_total`.
pub(super) fn hold(queue: &mut Queue, qid: QueueId, timers: &mut Timers, entry: Entry, due: u64) {
    queue.stats.delayed += 1;
    timers.push(
        due,
        TimerKind::Delayed {
            queue: qid,
            entry: Box::new(entry),
        },
    );
}

/// Appends an entry to the ready messages, its TTL counted from `since_ms`, with a timer for
/// the TTL; returns the bytes that became ready in memory. In a queue larger than memory the
/// entry joins the paged tail instead ([`Effect::PageOut`]).
pub(super) fn make_ready(
    queue: &mut Queue,
    qid: QueueId,
    timers: &mut Timers,
    entry: Entry,
    since_ms: u64,
    effects: &mut Vec<Effect>,
) -> u64 {
    let level = entry.priority;
    if queue
        .paged
        .takes(level, queue.ready.len(), queue.ready.bytes())
    {
        let paged = queue.page_out(entry, since_ms);
        effects.push(Effect::PageOut {
            queue: queue.key.clone(),
            epoch: queue.paged.epoch,
            level,
            entry: Box::new(paged),
        });
        return 0;
    }
    let size = entry.message.size_bytes();
    if queue.push_ready(entry, since_ms).is_some() {
        arm_ttl(queue, qid, timers);
    }
    size
}

impl Broker {
    pub(super) fn publish(
        &mut self,
        vhost: &str,
        message: Arc<Message>,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        validate_routing_key(&message.routing_key)?;
        check_header_depth(&message.headers)?;
        if let Some(delay_ms) = message.delay_ms
            && delay_ms > DURATION_MS_MAX
        {
            // A deadline this far out would be held forever (docs/protocol.md, limits).
            return Err(CoreError::InvalidArgument {
                reason: format!("a delay must be at most {DURATION_MS_MAX} ms, got {delay_ms}"),
            });
        }
        let mut targets = std::mem::take(&mut self.route_scratch);
        targets.clear();
        let routed = self.route(vhost, &message, &mut targets, false);
        if let Err(err) = routed {
            self.route_scratch = targets;
            return Err(err);
        }
        // Queues that reject-publish when full refuse their copy before anything changes.
        let mut refused_dlx = Vec::new();
        let refused_by = self.refuse_full(message.size_bytes(), &mut targets, &mut refused_dlx);
        if targets.is_empty()
            && refused_dlx.is_empty()
            && let Some(queue) = refused_by
        {
            self.route_scratch = targets;
            return Err(CoreError::QueueFull {
                queue: queue.to_string(),
            });
        }
        for qid in &refused_dlx {
            // reject-publish-dlx: refused to the publisher, and dead-lettered.
            let queue = self
                .queues
                .get_mut(qid)
                .expect("routing yields live queues");
            queue.stats.dropped += 1;
            let entry = queue.new_entry(message.clone(), None, false);
            self.dead_letters
                .extend(DeadLetter::of(queue, &entry, DeathReason::MaxLen));
        }
        let duplicates = self.drop_duplicates(&message, &mut targets);
        self.enqueue_routed(&message, &targets, effects);
        let routed = targets.len() as u32;
        // A batch usually publishes to the same queues again and again (route order is
        // deterministic): then the list already starts with them, and nothing is searched.
        if !self.routed.starts_with(&targets) {
            for qid in &targets {
                if self.routed.len() < ROUTED_TRACKED_MAX && !self.routed.contains(qid) {
                    self.routed.push(*qid);
                }
            }
        }
        self.to_dispatch.extend_from_slice(&targets);
        self.route_scratch = targets;
        self.finish_dead_letters_and_dispatch(effects);
        Ok(Reply::Published {
            routed,
            refused_by,
            duplicates,
        })
    }

    /// Removes the targets whose dedup window holds the message's id (counting them); the
    /// other targets with a window remember it from now on.
    pub(super) fn drop_duplicates(&mut self, message: &Message, targets: &mut Vec<QueueId>) -> u32 {
        let Some(id) = message.message_id.as_deref() else {
            return 0;
        };
        let now_ms = self.now_ms;
        let queues = &mut self.queues;
        let mut duplicates = 0;
        targets.retain(|qid| {
            let queue = queues.get_mut(qid).expect("routing yields live queues");
            let Some(window) = queue.features.dedup_window else {
                return true;
            };
            if queue.dedup.contains(id, now_ms) {
                queue.stats.duplicates += 1;
                duplicates += 1;
                return false;
            }
            queue
                .dedup
                .insert(id, now_ms.saturating_add(window), now_ms);
            true
        });
        duplicates
    }

    /// Removes the targets that are full and refuse publishes; returns the first of them.
    /// Those with `reject-publish-dlx` are also listed in `refused_dlx`.
    pub(super) fn refuse_full(
        &self,
        size: u64,
        targets: &mut Vec<QueueId>,
        refused_dlx: &mut Vec<QueueId>,
    ) -> Option<Arc<str>> {
        if self.n_reject_publish_queues == 0 {
            // The common case: no queue refuses publishes, nothing to look up.
            return None;
        }
        let mut refused_by: Option<Arc<str>> = None;
        targets.retain(|qid| {
            let queue = &self.queues[qid];
            let fits = !queue.features.overflow.rejects()
                || !queue
                    .features
                    .over_limit(queue.ready_total() + 1, queue.ready_bytes() + size);
            if !fits && refused_by.is_none() {
                refused_by = Some(queue.name.clone());
            }
            if !fits && queue.features.overflow == Overflow::RejectPublishDlx {
                refused_dlx.push(*qid);
            }
            fits
        });
        refused_by
    }

    /// Enqueues a routed message in every target (logging it if persistent and a target is
    /// durable) and applies drop-head limits. Does not dispatch.
    pub(super) fn enqueue_routed(
        &mut self,
        message: &Arc<Message>,
        targets: &[QueueId],
        effects: &mut Vec<Effect>,
    ) {
        let now_ms = self.now_ms;
        let delay = message.delay_ms.filter(|delay| *delay > 0);
        let ready_at_ms = now_ms.saturating_add(delay.unwrap_or(0));
        let durable_id =
            if message.persistent && targets.iter().any(|qid| self.queues[qid].is_durable()) {
                let durable_id = self.next_durable_id;
                self.next_durable_id += 1;
                let mut sync = DurableSync::default();
                let queues = targets
                    .iter()
                    .map(|qid| &self.queues[qid])
                    .filter(|queue| queue.is_durable())
                    .map(|queue| {
                        sync.add(queue.features.sync);
                        queue.key.clone()
                    })
                    .collect();
                effects.push(Effect::DurableEnqueued {
                    durable_id,
                    queues,
                    message: message.clone(),
                    ready_at_ms,
                    sync,
                });
                Some(durable_id)
            } else {
                None
            };
        for qid in targets {
            let queue = self
                .queues
                .get_mut(qid)
                .expect("routing yields live queues");
            let entry_id = durable_id.filter(|_| queue.is_durable());
            queue.stats.published += 1;
            let entry = queue.new_entry(message.clone(), entry_id, false);
            if delay.is_some() {
                hold(queue, *qid, &mut self.timers, entry, ready_at_ms);
                self.delayed_total += 1;
                continue;
            }
            self.ready_bytes_total +=
                make_ready(queue, *qid, &mut self.timers, entry, now_ms, effects);
            self.ready_bytes_total -= drop_head_over_limit(queue, &mut self.dead_letters, effects);
        }
    }

    /// Collects the queues a message reaches, each once, in a deterministic order.
    ///
    /// Dead letters (`dead_letter`) may go to internal exchanges.
    pub(super) fn route(
        &mut self,
        vhost: &str,
        message: &Message,
        targets: &mut Vec<QueueId>,
        dead_letter: bool,
    ) -> Result<(), CoreError> {
        let exchange_name: &str = &message.exchange;
        let ns = self
            .vhosts
            .get_mut(vhost)
            .ok_or_else(|| CoreError::not_found(EntityKind::Vhost, vhost))?;
        if exchange_name == DEFAULT_EXCHANGE {
            if let Some(qid) = ns.queue_names.get(&*message.routing_key) {
                targets.push(*qid);
            }
            return Ok(());
        }
        let exchange = ns
            .exchanges
            .get_mut(exchange_name)
            .ok_or_else(|| CoreError::not_found(EntityKind::Exchange, exchange_name))?;
        if exchange.options.internal && !dead_letter {
            return Err(CoreError::AccessRefused {
                reason: format!("exchange '{exchange_name}' is internal"),
            });
        }
        let mut pending: Vec<Arc<str>> = Vec::new();
        let mut visited: Vec<Arc<str>> = vec![exchange.name.clone()];
        exchange.route(message, |dest| match dest {
            Destination::Queue(qid) => targets.push(*qid),
            Destination::Exchange(name) => pending.push(name.clone()),
        });
        let mut hops = 0;
        while let Some(next) = pending.pop() {
            if visited.contains(&next) {
                continue;
            }
            hops += 1;
            if hops > EXCHANGE_HOPS_MAX {
                break;
            }
            visited.push(next.clone());
            if let Some(exchange) = ns.exchanges.get_mut(&next) {
                exchange.route(message, |dest| match dest {
                    Destination::Queue(qid) => targets.push(*qid),
                    Destination::Exchange(name) => pending.push(name.clone()),
                });
            }
        }
        if targets.len() > 1 {
            targets.sort_unstable();
            targets.dedup();
        }
        Ok(())
    }
}
