//! Timers firing: delayed messages, TTL expiry, lapsed leases, queue expiry.

use super::*;

/// Makes sure a TTL timer is set for the queue's earliest ready expiry.
pub(super) fn arm_ttl(queue: &mut Queue, qid: QueueId, timers: &mut Timers) {
    if let Some(next) = queue.ready.next_expiry()
        && queue.ttl_armed.is_none_or(|armed| next < armed)
    {
        queue.ttl_armed = Some(next);
        timers.push(next, TimerKind::Ttl { queue: qid });
    }
}

/// A ready entry whose TTL passed leaves its queue: dead-lettered (`expired`) or dropped.
pub(super) fn expire_entry(
    queue: &mut Queue,
    entry: Entry,
    dead_letters: &mut VecDeque<DeadLetter>,
    effects: &mut Vec<Effect>,
) {
    queue.stats.expired += 1;
    dead_letters.extend(DeadLetter::of(queue, &entry, DeathReason::Expired));
    if let Some(durable_id) = entry.durable_id {
        effects.push(Effect::DurableSettled {
            durable_id,
            queue: queue.key.clone(),
        });
    }
}

impl Broker {
    pub(super) fn tick(&mut self, effects: &mut Vec<Effect>) -> Reply {
        let now_ms = self.now_ms;
        for _ in 0..TIMERS_PER_TICK_MAX {
            let Some((_, timer)) = self.timers.pop_due(now_ms) else {
                break;
            };
            match timer {
                TimerKind::Delayed { queue: qid, entry } => {
                    self.delayed_total -= 1;
                    let Some(queue) = self.queues.get_mut(&qid) else {
                        continue;
                    };
                    queue.stats.delayed -= 1;
                    if queue.features.overflow.rejects()
                        && queue.features.over_limit(
                            queue.ready_total() + 1,
                            queue.ready_bytes() + entry.message.size_bytes(),
                        )
                    {
                        // A full reject-publish queue cannot refuse a message that was
                        // confirmed long ago: it leaves as if its length limit dropped it.
                        queue.stats.dropped += 1;
                        self.dead_letters.extend(DeadLetter::of(
                            queue,
                            &entry,
                            DeathReason::MaxLen,
                        ));
                        if let Some(durable_id) = entry.durable_id {
                            effects.push(Effect::DurableSettled {
                                durable_id,
                                queue: queue.key.clone(),
                            });
                        }
                        continue;
                    }
                    self.ready_bytes_total +=
                        make_ready(queue, qid, &mut self.timers, *entry, now_ms, effects);
                    self.ready_bytes_total -=
                        drop_head_over_limit(queue, &mut self.dead_letters, effects);
                    self.to_dispatch.push(qid);
                }
                TimerKind::Ttl { queue: qid } => {
                    let Some(queue) = self.queues.get_mut(&qid) else {
                        continue;
                    };
                    if queue.ttl_armed.is_some_and(|armed| armed <= now_ms) {
                        queue.ttl_armed = None;
                    }
                    while let Some(entry) = queue.ready.pop_expired(now_ms) {
                        self.ready_bytes_total -= entry.message.size_bytes();
                        expire_entry(queue, entry, &mut self.dead_letters, effects);
                    }
                    arm_ttl(queue, qid, &mut self.timers);
                    request_page_in(queue, effects);
                }
                TimerKind::Lease { connection, tag } => {
                    self.lapse_lease(connection, tag, effects);
                }
                TimerKind::QueueExpiry { queue: qid } => {
                    let Some(queue) = self.queues.get(&qid) else {
                        continue;
                    };
                    let expires = queue.features.expires.expect("only set with x-expires");
                    let deadline = queue.last_used_ms.saturating_add(expires);
                    if !queue.consumers.is_empty() {
                        // In use: look again after another period.
                        self.timers.push(
                            now_ms.saturating_add(expires),
                            TimerKind::QueueExpiry { queue: qid },
                        );
                    } else if deadline > now_ms {
                        self.timers
                            .push(deadline, TimerKind::QueueExpiry { queue: qid });
                    } else {
                        self.remove_queue(qid, effects);
                    }
                }
            }
        }
        self.finish_dead_letters_and_dispatch(effects);
        Reply::Done
    }

    /// A lease timer fired: the delivery goes back to its queue if it is still outstanding
    /// and its lease was not extended since.
    pub(super) fn lapse_lease(
        &mut self,
        connection: ConnectionId,
        tag: u64,
        effects: &mut Vec<Effect>,
    ) {
        let now_ms = self.now_ms;
        let Some(conn) = self.connections.get_mut(&connection) else {
            return;
        };
        let lapsed = conn
            .unacked
            .get_mut(tag)
            .is_some_and(|unacked| unacked.lease.is_some_and(|(until, _)| until <= now_ms));
        if !lapsed {
            return;
        }
        let unacked = conn.unacked.remove(tag).expect("checked");
        conn.lapse(tag);
        let qid = unacked.queue;
        let Some(queue) = self.queues.get_mut(&qid) else {
            return;
        };
        queue.unacked -= 1;
        queue.unacked_bytes -= unacked.entry.message.size_bytes();
        if let Some(idx) = queue.consumer_idx(connection, unacked.consumer_tag) {
            queue.consumers[idx].unacked -= 1;
            // Another consumer, if there is one, gets it next.
            queue.cursor = (idx + 1) % queue.consumers.len();
        }
        self.ready_bytes_total += requeue_entry(
            queue,
            qid,
            &mut self.timers,
            unacked.entry,
            None,
            &mut self.dead_letters,
            effects,
        );
        self.to_dispatch.push(qid);
    }
}
