//! Settling deliveries: ack, nack, reject, defer, lease extension; requeueing.

use super::*;

#[derive(Debug, Clone, Copy)]
pub(super) enum Settle {
    Ack,
    Requeue,
    Drop,
    /// Requeue when due (unix ms).
    Defer(u64),
}

/// Puts an outstanding entry back in its queue; returns the bytes that became ready. An entry
/// at its queue's delivery limit leaves instead: dead-lettered (`delivery_limit`) or dropped.
pub(super) fn requeue_entry(
    queue: &mut Queue,
    qid: QueueId,
    timers: &mut Timers,
    mut entry: Entry,
    later: Option<u64>,
    dead_letters: &mut VecDeque<DeadLetter>,
    effects: &mut Vec<Effect>,
) -> u64 {
    if queue
        .features
        .delivery_limit
        .is_some_and(|limit| u64::from(entry.delivery_count) >= limit)
    {
        queue.stats.dropped += 1;
        dead_letters.extend(DeadLetter::of(queue, &entry, DeathReason::DeliveryLimit));
        if let Some(durable_id) = entry.durable_id {
            effects.push(Effect::DurableSettled {
                durable_id,
                queue: queue.key.clone(),
            });
        }
        return 0;
    }
    entry.redelivered = true;
    if let Some(due) = later {
        hold(queue, qid, timers, entry, due);
        return 0;
    }
    let size = entry.message.size_bytes();
    let expires = entry.expires_at.is_some();
    queue.ready.requeue(entry);
    if expires {
        arm_ttl(queue, qid, timers);
    }
    size
}

impl Broker {
    pub(super) fn settle(
        &mut self,
        connection: ConnectionId,
        tag: DeliveryTag,
        multiple: bool,
        how: Settle,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let conn = self.connections.get_mut(&connection).ok_or_else(|| {
            CoreError::not_found(EntityKind::Connection, connection.0.to_string())
        })?;
        if !multiple {
            // The common case, without the allocations of the general path.
            let Some(unacked) = conn.unacked.remove(tag.0) else {
                if conn.lapsed.remove(tag.0) {
                    // Its lease lapsed and it went back to the queue: nothing to settle.
                    return Ok(Reply::Settled { count: 0 });
                }
                return Err(CoreError::UnknownDeliveryTag { tag: tag.0 });
            };
            let qid = unacked.queue;
            if self.settle_one(connection, unacked, how, effects) {
                self.to_dispatch.push(qid);
            }
            self.finish_dead_letters_and_dispatch(effects);
            return Ok(Reply::Settled { count: 1 });
        }
        let settled: Vec<(u64, Unacked)> = {
            let upto = if tag.0 == 0 { u64::MAX } else { tag.0 };
            if tag.0 != 0 && !conn.unacked.contains(tag.0) && !conn.lapsed.contains(tag.0) {
                return Err(CoreError::UnknownDeliveryTag { tag: tag.0 });
            }
            conn.forget_lapsed(0, upto);
            conn.unacked.remove_range(0, upto)
        };
        let count = settled.len() as u32;
        let mut touched: Vec<QueueId> = Vec::new();
        for (_, unacked) in settled {
            let qid = unacked.queue;
            if self.settle_one(connection, unacked, how, effects) && !touched.contains(&qid) {
                touched.push(qid);
            }
        }
        self.to_dispatch.extend(touched);
        self.finish_dead_letters_and_dispatch(effects);
        Ok(Reply::Settled { count })
    }

    pub(super) fn ack_range(
        &mut self,
        connection: ConnectionId,
        first: DeliveryTag,
        last: DeliveryTag,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let conn = self.connections.get_mut(&connection).ok_or_else(|| {
            CoreError::not_found(EntityKind::Connection, connection.0.to_string())
        })?;
        if first > last {
            return Err(CoreError::InvalidArgument {
                reason: format!("ack range {}..={} is empty", first.0, last.0),
            });
        }
        let settled = conn.unacked.remove_range(first.0, last.0);
        let lapsed = conn.forget_lapsed(first.0, last.0);
        if settled.is_empty() && !lapsed {
            return Err(CoreError::UnknownDeliveryTag { tag: first.0 });
        }
        let count = settled.len() as u32;
        let mut touched: Vec<QueueId> = Vec::new();
        for (_, unacked) in settled {
            let qid = unacked.queue;
            if self.settle_one(connection, unacked, Settle::Ack, effects) && !touched.contains(&qid)
            {
                touched.push(qid);
            }
        }
        for qid in touched {
            self.dispatch(qid, effects);
        }
        Ok(Reply::Settled { count })
    }

    /// Settles one outstanding delivery; false when its queue is gone (deleted while the
    /// delivery was outstanding), in which case there is nothing to do.
    pub(super) fn settle_one(
        &mut self,
        connection: ConnectionId,
        unacked: Unacked,
        how: Settle,
        effects: &mut Vec<Effect>,
    ) -> bool {
        let Some(queue) = self.queues.get_mut(&unacked.queue) else {
            return false;
        };
        queue.unacked -= 1;
        queue.unacked_bytes -= unacked.entry.message.size_bytes();
        if let Some(idx) = queue.consumer_idx(connection, unacked.consumer_tag) {
            queue.consumers[idx].unacked -= 1;
        }
        let mut entry = unacked.entry;
        let due = match how {
            Settle::Ack => {
                queue.stats.acked += 1;
                None
            }
            Settle::Drop => Some(None),
            Settle::Requeue => match &queue.features.retry {
                // A retry schedule turns a requeue into a delayed one, until it runs out.
                Some(schedule) => match schedule.get(entry.retries as usize) {
                    Some(delay) => {
                        entry.retries += 1;
                        Some(Some(self.now_ms.saturating_add(*delay)))
                    }
                    None => Some(None),
                },
                None => Some(Some(self.now_ms)),
            },
            Settle::Defer(due) => Some(Some(due)),
        };
        match due {
            None => {}
            Some(None) => {
                queue.stats.dropped += 1;
                self.dead_letters
                    .extend(DeadLetter::of(queue, &entry, DeathReason::Rejected));
            }
            Some(Some(due)) => {
                let later = (due > self.now_ms).then_some(due);
                let held = later.is_some();
                let n_delayed = queue.stats.delayed;
                self.ready_bytes_total += requeue_entry(
                    queue,
                    unacked.queue,
                    &mut self.timers,
                    entry,
                    later,
                    &mut self.dead_letters,
                    effects,
                );
                if held && queue.stats.delayed > n_delayed {
                    self.delayed_total += 1;
                }
                return true;
            }
        }
        if let Some(durable_id) = entry.durable_id {
            effects.push(Effect::DurableSettled {
                durable_id,
                queue: queue.key.clone(),
            });
        }
        true
    }

    pub(super) fn touch(
        &mut self,
        connection: ConnectionId,
        tag: DeliveryTag,
    ) -> Result<Reply, CoreError> {
        let now_ms = self.now_ms;
        let conn = self.connections.get_mut(&connection).ok_or_else(|| {
            CoreError::not_found(EntityKind::Connection, connection.0.to_string())
        })?;
        let Some(unacked) = conn.unacked.get_mut(tag.0) else {
            if conn.lapsed.contains(tag.0) {
                return Ok(Reply::Done);
            }
            return Err(CoreError::UnknownDeliveryTag { tag: tag.0 });
        };
        if let Some((until, timeout)) = &mut unacked.lease {
            let extended = now_ms.saturating_add(*timeout);
            if extended > *until {
                *until = extended;
                self.timers.push(
                    extended,
                    TimerKind::Lease {
                        connection,
                        tag: tag.0,
                    },
                );
            }
        }
        Ok(Reply::Done)
    }
}
