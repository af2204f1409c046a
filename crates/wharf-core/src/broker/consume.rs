//! Consumers and dispatch: subscribe, cancel, credit, and handing ready messages to consumers.

use super::*;

impl Broker {
    pub(super) fn subscribe(
        &mut self,
        vhost: &str,
        connection: ConnectionId,
        queue_name: &str,
        tag: ConsumerTag,
        options: ConsumerOptions,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let conn = self.connection(connection)?;
        if conn.consumers.contains_key(&tag) {
            return Err(CoreError::ConsumerTagInUse { tag: tag.0 });
        }
        if conn.consumers.len() >= self.limits.consumers_per_connection_max {
            return Err(CoreError::LimitExceeded {
                what: "consumers per connection",
                limit: self.limits.consumers_per_connection_max,
            });
        }
        if options
            .ack_timeout_ms
            .is_some_and(|timeout| !(1..=DURATION_MS_MAX).contains(&timeout))
        {
            // A zero timeout would lapse every lease as soon as it is granted.
            return Err(CoreError::InvalidArgument {
                reason: format!("an ack timeout must be from 1 to {DURATION_MS_MAX} ms"),
            });
        }
        let qid = self.queue_for(vhost, connection, queue_name)?;
        let queue = &self.queues[&qid];
        if options.exclusive && !queue.consumers.is_empty() {
            return Err(CoreError::ResourceLocked {
                name: queue_name.to_owned(),
                reason: "it already has consumers, so it cannot get an exclusive one",
            });
        }
        if queue
            .consumers
            .iter()
            .any(|consumer| consumer.options.exclusive)
        {
            return Err(CoreError::ResourceLocked {
                name: queue_name.to_owned(),
                reason: "it has an exclusive consumer",
            });
        }
        if queue.consumers.len() >= self.limits.consumers_per_queue_max {
            return Err(CoreError::LimitExceeded {
                what: "consumers per queue",
                limit: self.limits.consumers_per_queue_max,
            });
        }
        let conn = self.connections.get_mut(&connection).expect("checked");
        conn.consumers.insert(tag, qid);
        let first_delivery_tag = conn.next_delivery_tag + 1;
        let queue = self.queues.get_mut(&qid).expect("checked");
        queue.last_used_ms = self.now_ms;
        let mut consumer = Consumer {
            connection,
            tag,
            credit: 0,
            options,
            unacked: 0,
            first_delivery_tag,
        };
        consumer.credit = consumer.credit_after(consumer.options.initial_credit.unwrap_or(0));
        queue.consumers.push(consumer);
        self.dispatch(qid, effects);
        Ok(Reply::Done)
    }

    /// Whether `delivery_tag` went to the consumer that now has `tag` on `connection`: `false`
    /// if no consumer has that tag, or if the delivery was made to an earlier consumer of the
    /// same tag (cancelled, and the tag subscribed again since).
    pub fn delivered_to_current_consumer(
        &self,
        connection: ConnectionId,
        tag: ConsumerTag,
        delivery_tag: DeliveryTag,
    ) -> bool {
        let Ok(qid) = self.consumer_queue(connection, tag) else {
            return false;
        };
        self.queues[&qid]
            .consumers
            .iter()
            .find(|consumer| consumer.connection == connection && consumer.tag == tag)
            .is_some_and(|consumer| consumer.first_delivery_tag <= delivery_tag.0)
    }

    pub(super) fn consumer_queue(
        &self,
        connection: ConnectionId,
        tag: ConsumerTag,
    ) -> Result<QueueId, CoreError> {
        self.connection(connection)?
            .consumers
            .get(&tag)
            .copied()
            .ok_or_else(|| CoreError::not_found(EntityKind::Consumer, tag.0.to_string()))
    }

    pub(super) fn cancel(
        &mut self,
        connection: ConnectionId,
        tag: ConsumerTag,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let qid = self.consumer_queue(connection, tag)?;
        let conn = self.connections.get_mut(&connection).expect("checked");
        conn.consumers.remove(&tag);
        let returned = conn
            .unacked
            .remove_where(|unacked| unacked.consumer_tag == tag && unacked.queue == qid);
        // The client may still be working on them: a late settle is a harmless no-op, as for
        // a lapsed lease, not an unknown tag that would close its connection.
        for (delivery_tag, _) in &returned {
            conn.lapse(*delivery_tag);
        }
        let queue = self
            .queues
            .get_mut(&qid)
            .expect("consumers point at live queues");
        for (_, unacked) in returned {
            queue.unacked -= 1;
            queue.unacked_bytes -= unacked.entry.message.size_bytes();
            self.ready_bytes_total += requeue_entry(
                queue,
                qid,
                &mut self.timers,
                unacked.entry,
                None,
                &mut self.dead_letters,
                effects,
            );
        }
        let idx = queue
            .consumer_idx(connection, tag)
            .expect("consumer registered on its queue");
        queue.consumers.remove(idx);
        queue.cursor = 0;
        queue.last_used_ms = self.now_ms;
        let auto_deleted = queue.options.auto_delete && queue.consumers.is_empty();
        // Messages over their delivery limit were dead-lettered: republish them before anything
        // is dispatched or deleted.
        self.republish_dead_letters(effects);
        if auto_deleted {
            self.remove_queue(qid, effects);
        } else {
            self.dispatch(qid, effects);
        }
        self.dispatch_touched(effects);
        Ok(Reply::Done)
    }

    pub(super) fn credit(
        &mut self,
        connection: ConnectionId,
        tag: ConsumerTag,
        credit: u32,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let qid = self.consumer_queue(connection, tag)?;
        let queue = self
            .queues
            .get_mut(&qid)
            .expect("consumers point at live queues");
        let idx = queue
            .consumer_idx(connection, tag)
            .expect("consumer registered on its queue");
        let consumer = &mut queue.consumers[idx];
        // Outside credit mode a grant means nothing (docs/protocol.md, "Flow control").
        if consumer.options.initial_credit.is_some() {
            consumer.credit = consumer.credit_after(credit);
        }
        self.dispatch(qid, effects);
        Ok(Reply::Done)
    }

    /// Dispatches the queues the command touched (see
    /// [`Broker::finish_dead_letters_and_dispatch`]).
    pub(super) fn dispatch_touched(&mut self, effects: &mut Vec<Effect>) {
        let mut to_dispatch = std::mem::take(&mut self.to_dispatch);
        for qid in to_dispatch.drain(..) {
            // A queue deleted earlier in the command is skipped by `dispatch` itself.
            self.dispatch(qid, effects);
        }
        self.to_dispatch = to_dispatch;
    }

    /// Hands ready messages to consumers with capacity until one side runs out.
    pub(super) fn dispatch(&mut self, qid: QueueId, effects: &mut Vec<Effect>) {
        let Broker {
            queues,
            connections,
            ready_bytes_total,
            timers,
            dead_letters,
            now_ms,
            ..
        } = self;
        let now_ms = *now_ms;
        let Some(queue) = queues.get_mut(&qid) else {
            // Deleted earlier in the same command (auto-delete, dead-letter cascade).
            return;
        };
        // A paged higher priority waits for its page-in: no lower one overtakes it.
        while !queue.ready.is_empty() && !queue.paged.blocks(queue.ready.top_priority()) {
            let Some(idx) = queue.pick_consumer() else {
                break;
            };
            let mut entry = queue.ready.pop_front().expect("checked non-empty");
            *ready_bytes_total -= entry.message.size_bytes();
            if entry.expired(now_ms) {
                // Never deliver a message past its TTL, even before its timer fires.
                expire_entry(queue, entry, dead_letters, effects);
                continue;
            }
            entry.delivery_count += 1;
            let consumer = &mut queue.consumers[idx];
            let conn = connections
                .get_mut(&consumer.connection)
                .expect("consumers belong to live connections");
            conn.next_delivery_tag += 1;
            let delivery_tag = conn.next_delivery_tag;
            queue.stats.delivered += 1;
            if entry.redelivered {
                queue.stats.redelivered += 1;
            }
            effects.push(Effect::Deliver(Delivery {
                connection: consumer.connection,
                consumer_tag: consumer.tag,
                delivery_tag: DeliveryTag(delivery_tag),
                queue: queue.name.clone(),
                message: entry.message.clone(),
                redelivered: entry.redelivered,
                delivery_count: entry.delivery_count,
            }));
            if consumer.options.initial_credit.is_some() {
                consumer.credit -= 1;
            }
            if consumer.options.auto_ack {
                queue.stats.acked += 1;
                if let Some(durable_id) = entry.durable_id {
                    effects.push(Effect::DurableSettled {
                        durable_id,
                        queue: queue.key.clone(),
                    });
                }
            } else {
                consumer.unacked += 1;
                queue.unacked += 1;
                queue.unacked_bytes += entry.message.size_bytes();
                let lease = consumer.options.ack_timeout_ms.map(|timeout| {
                    let until = now_ms.saturating_add(timeout);
                    timers.push(
                        until,
                        TimerKind::Lease {
                            connection: consumer.connection,
                            tag: delivery_tag,
                        },
                    );
                    (until, timeout)
                });
                conn.unacked.insert(
                    delivery_tag,
                    Unacked {
                        queue: qid,
                        consumer_tag: consumer.tag,
                        entry,
                        lease,
                    },
                );
            }
        }
        request_page_in(queue, effects);
    }
}
