//! Queues larger than memory: page-in requests and answers, discarding the paged tail.

use super::*;

/// Asks the server for the oldest paged messages once the ready messages in memory fell to
/// half the threshold (so that they come back before memory runs dry), unless already asked.
pub(super) fn request_page_in(queue: &mut Queue, effects: &mut Vec<Effect>) {
    let Some(threshold) = queue.paged.threshold else {
        return;
    };
    let in_memory = queue.ready.len();
    let in_memory_bytes = queue.ready.bytes();
    let bytes_limit = queue.paged.threshold_bytes;
    if queue.paged.count == 0
        || queue.paged.page_in_pending
        || in_memory > threshold / 2
        || in_memory_bytes > bytes_limit / 2
    {
        return;
    }
    queue.paged.page_in_pending = true;
    effects.push(Effect::PageIn {
        queue: queue.name.clone(),
        epoch: queue.paged.epoch,
        max: (threshold.saturating_sub(in_memory) as u64)
            .min(queue.paged.count)
            .max(1),
        max_bytes: bytes_limit.saturating_sub(in_memory_bytes).max(1),
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
        queue: queue.name.clone(),
        epoch: queue.paged.epoch,
    });
    for (first, n) in queue.paged.discard() {
        effects.push(Effect::DurableSettledRange {
            first,
            count: n,
            queue: queue.name.clone(),
        });
    }
    count
}

impl Broker {
    pub(super) fn page_in(
        &mut self,
        name: &str,
        epoch: u64,
        entries: Vec<PagedEntry>,
        effects: &mut Vec<Effect>,
    ) -> Reply {
        let Some(&qid) = self.queue_names.get(name) else {
            // Deleted since it asked.
            return Reply::Done;
        };
        let queue = self.queues.get_mut(&qid).expect("names map to live queues");
        if queue.paged.epoch != epoch || !queue.paged.page_in_pending {
            return Reply::Done;
        }
        queue.paged.page_in_pending = false;
        for entry in entries {
            if queue.paged.count == 0 {
                break;
            }
            self.ready_bytes_total += queue.page_in(entry);
        }
        arm_ttl(queue, qid, &mut self.timers);
        // Delivers what came back, and asks for more if it was not enough.
        self.dispatch(qid, effects);
        self.finish_dead_letters_and_dispatch(effects);
        Reply::Done
    }
}
