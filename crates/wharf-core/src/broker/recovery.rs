//! Recovery: restoring logged messages and what a log checkpoint must keep.

use super::*;

impl Broker {
    pub(super) fn restore(
        &mut self,
        vhost: &str,
        queue_name: &str,
        durable_id: u64,
        message: Arc<Message>,
        ready_at_ms: u64,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let qid = *self
            .ns(vhost)?
            .queue_names
            .get(queue_name)
            .ok_or_else(|| CoreError::not_found(EntityKind::Queue, queue_name))?;
        let queue = self.queues.get_mut(&qid).expect("names map to live queues");
        if !queue.is_durable() {
            return Err(CoreError::precondition(
                EntityKind::Queue,
                queue_name,
                "only durable queues hold logged messages",
            ));
        }
        self.next_durable_id = self.next_durable_id.max(durable_id + 1);
        queue.stats.published += 1;
        if let (Some(window), Some(id)) = (queue.features.dedup_window, &message.message_id) {
            let enqueued_at = ready_at_ms.saturating_sub(message.delay_ms.unwrap_or(0));
            queue
                .dedup
                .insert(id, enqueued_at.saturating_add(window), self.now_ms);
        }
        let entry = queue.new_entry(message, Some(durable_id), true);
        if ready_at_ms > self.now_ms {
            hold(queue, qid, &mut self.timers, entry, ready_at_ms);
            self.delayed_total += 1;
            return Ok(Reply::Done);
        }
        // Its TTL counts from when it became ready before the restart.
        self.ready_bytes_total +=
            make_ready(queue, qid, &mut self.timers, entry, ready_at_ms, effects);
        self.dispatch(qid, effects);
        Ok(Reply::Done)
    }

    /// Every remembered message id of durable queues' dedup windows (by queue resource key),
    /// with its deadline:
    /// what a log checkpoint must keep (see [`Command::RestoreDedup`]).
    pub fn durable_dedup_entries(&self) -> Vec<(Arc<str>, String, u64)> {
        let mut all = Vec::new();
        let mut queues: Vec<&Queue> = self
            .queues
            .values()
            .filter(|queue| queue.is_durable() && queue.dedup.len() > 0)
            .collect();
        queues.sort_by(|left, right| left.key.cmp(&right.key));
        for queue in queues {
            for (id, until) in queue.dedup.entries() {
                if until > self.now_ms {
                    all.push((queue.key.clone(), id.to_owned(), until));
                }
            }
        }
        all
    }

    /// Every logged message still in a durable queue (ready, outstanding or delayed), by id,
    /// with the durable queues it is in (by resource key) and when it is ready in them (`None`: now; `Some(t)`:
    /// delayed until `t`): what a log checkpoint must keep.
    #[allow(clippy::type_complexity)]
    pub fn durable_messages(&self) -> Vec<(u64, Arc<Message>, Vec<(Arc<str>, Option<u64>)>)> {
        type ById = BTreeMap<u64, (Arc<Message>, Vec<(Arc<str>, Option<u64>)>)>;
        let mut by_id: ById = BTreeMap::new();
        let mut add = |entry: &Entry, queue: &Queue, delayed_until: Option<u64>| {
            if let Some(durable_id) = entry.durable_id {
                by_id
                    .entry(durable_id)
                    .or_insert_with(|| (entry.message.clone(), Vec::new()))
                    .1
                    .push((queue.key.clone(), delayed_until));
            }
        };
        for queue in self.queues.values().filter(|queue| queue.is_durable()) {
            for entry in queue.ready.iter() {
                add(entry, queue, None);
            }
        }
        for conn in self.connections.values() {
            for unacked in conn.unacked.values() {
                if let Some(queue) = self.queues.get(&unacked.queue) {
                    add(&unacked.entry, queue, None);
                }
            }
        }
        for (due, timer) in self.timers.iter() {
            if let TimerKind::Delayed { queue, entry } = timer
                && let Some(queue) = self.queues.get(queue)
            {
                add(entry, queue, Some(due));
            }
        }
        by_id
            .into_iter()
            .map(|(durable_id, (message, mut queues))| {
                queues.sort();
                (durable_id, message, queues)
            })
            .collect()
    }
}
