//! Queues larger than memory: page-in requests and answers, discarding the paged tail.

use super::*;

/// Asks the server for the oldest paged messages of the highest level holding any, unless a
/// page-in is already pending:
/// - once the ready messages in memory fell to half the threshold (so that they come back
///   before memory runs dry), up to the threshold;
/// - or when that level's next message is the next to deliver ([`Paged::blocks`]: only lower
///   priorities are in memory), up to an eighth of the threshold past it in memory, and at
///   least one. Memory thus stays within 1.125 thresholds (plus requeues and one entry per
///   level): small page-ins rather than many held messages.
pub(super) fn request_page_in(queue: &mut Queue, effects: &mut Vec<Effect>) {
    let Some(threshold) = queue.paged.threshold else {
        return;
    };
    if queue.paged.page_in_pending.is_some() {
        return;
    }
    let Some(level) = queue.paged.top_level() else {
        return;
    };
    let in_memory = queue.ready.len();
    let in_memory_bytes = queue.ready.bytes();
    let bytes_limit = queue.paged.threshold_bytes;
    let (max, max_bytes) = if in_memory <= threshold / 2 && in_memory_bytes <= bytes_limit / 2 {
        (
            threshold.saturating_sub(in_memory),
            bytes_limit.saturating_sub(in_memory_bytes),
        )
    } else if queue.paged.blocks(queue.ready.top_priority()) {
        (
            threshold
                .saturating_add(threshold / 8)
                .saturating_sub(in_memory),
            bytes_limit
                .saturating_add(bytes_limit / 8)
                .saturating_sub(in_memory_bytes),
        )
    } else {
        return;
    };
    let tail = &queue.paged.tails[&level];
    queue.paged.page_in_pending = Some(level);
    effects.push(Effect::PageIn {
        queue: queue.key.clone(),
        epoch: queue.paged.epoch,
        level,
        max: (max as u64).min(tail.count).max(1),
        max_bytes: max_bytes.max(1),
    });
}

/// Discards the paged tail (purge): its logged messages are settled by id runs. Returns how
/// many messages it held.
pub(super) fn discard_paged(queue: &mut Queue, effects: &mut Vec<Effect>) -> u64 {
    let count = queue.paged.count;
    if count == 0 {
        return 0;
    }
    effects.push(Effect::PagesDropped {
        queue: queue.key.clone(),
        epoch: queue.paged.epoch,
    });
    for (first, n) in queue.paged.discard() {
        effects.push(Effect::DurableSettledRange {
            first,
            count: n,
            queue: queue.key.clone(),
        });
    }
    count
}

impl Broker {
    pub(super) fn page_in(
        &mut self,
        vhost: &str,
        name: &str,
        epoch: u64,
        level: u8,
        entries: Vec<PagedEntry>,
        effects: &mut Vec<Effect>,
    ) -> Reply {
        let Some(&qid) = self
            .vhosts
            .get(vhost)
            .and_then(|ns| ns.queue_names.get(name))
        else {
            // Deleted since it asked.
            return Reply::Done;
        };
        let queue = self.queues.get_mut(&qid).expect("names map to live queues");
        if queue.paged.epoch != epoch || queue.paged.page_in_pending != Some(level) {
            return Reply::Done;
        }
        queue.paged.page_in_pending = None;
        for entry in entries {
            if !queue.paged.tails.contains_key(&level) {
                break;
            }
            self.ready_bytes_total += queue.page_in(level, entry);
        }
        arm_ttl(queue, qid, &mut self.timers);
        // A drop-head limit waits for a paged head to come back (see `drop_head_over_limit`).
        self.ready_bytes_total -= drop_head_over_limit(queue, &mut self.dead_letters, effects);
        // Delivers what came back, and asks for more if it was not enough.
        self.dispatch(qid, effects);
        self.finish_dead_letters_and_dispatch(effects);
        Reply::Done
    }
}
