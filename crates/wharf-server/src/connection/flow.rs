//! Backpressure on a reading connection: a full outbox, the memory alarm, and publisher flow
//! control (a queue whose consumers are slower than its publisher holds the publisher).

use super::*;

/// Waits until this connection's outbox is under its limit.
pub(super) async fn wait_for_outbox_room(outbox: &Outbox) {
    while outbox.queued_bytes() > OUTBOX_BYTES_MAX {
        let drained = outbox.drained.notified();
        if outbox.queued_bytes() <= OUTBOX_BYTES_MAX {
            break;
        }
        // The writer notifies after every write; the timeout only guards against a missed race.
        let _ = tokio::time::timeout(Duration::from_millis(100), drained).await;
    }
}

/// The memory alarm: while the message bytes the broker holds (ready, unacked, queued for
/// sockets, in read buffers) are over the high watermark, a connection whose last batch
/// published to a *growing* queue (one whose backlog is over the flow limits, or whose ready
/// and unacked messages hold 1% of the watermark) is not read (its TCP window fills and its
/// client blocks) until they are below the low watermark. Publishers to queues that keep up
/// go on. When the memory is in outboxes rather than queues (ready and unacked messages are
/// under a tenth of the watermark, outboxes over it: consumers with no prefetch limit that do
/// not read), every publisher waits, as no queue tells which one feeds them; memory in read
/// buffers (frames on their way in) pauses nobody but the publishers of growing queues: only
/// `frame_timeout` frees it.
pub(super) async fn wait_for_memory(shared: &Context, reader: &Reader) {
    let high = shared.memory_high;
    {
        let state = shared.lock();
        let ready_bytes = state.broker.ready_bytes_total();
        if !shared.memory_pressed(ready_bytes) {
            return;
        }
        let (max_messages, max_bytes) = (
            shared.config.flow_ready_messages.max(1),
            shared.config.flow_ready_bytes.max(1),
        );
        let in_queues = ready_bytes + shared.unacked_bytes.load(Ordering::Relaxed) >= high / 10;
        let in_outboxes =
            !in_queues && shared.outbox_bytes.load(Ordering::Relaxed) as u64 >= high / 10;
        let grows = |qid: &QueueId| {
            state
                .broker
                .queue_flow(*qid, reader.connection)
                .is_some_and(|flow| {
                    flow.ready_bytes + flow.unacked_bytes >= high / 100
                        || over_flow_limit(&flow, max_messages, max_bytes, 100)
                })
        };
        if !in_outboxes && !reader.routed.iter().any(grows) {
            return;
        }
    }
    let low = high / 100 * READY_BYTES_LOW_WATERMARK_PERCENT;
    debug!(
        connection = reader.connection.0,
        high, "memory alarm: pausing a publisher"
    );
    loop {
        let freed = shared.memory_freed.notified();
        let ready_bytes = shared.lock().broker.ready_bytes_total();
        if ready_bytes <= low && !shared.memory_alarm.load(Ordering::Acquire) {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), freed).await;
    }
}

/// Queues a reader remembers as slow to drain at most (the oldest is forgotten first).
pub(super) const SLOW_TRACKED_MAX: usize = 16;

/// Publisher flow control: after a batch that published, if a queue it was routed to holds
/// more than the flow limit (`flow_ready_messages` / `flow_ready_bytes`) and has consumers
/// keeping up with it, the connection is not read (its TCP window fills and its client blocks)
/// until the consumers bring the queue down to `FLOW_RESUME_PERCENT` of the limit. A producer
/// faster than a stream's consumers then runs at their pace with a short backlog instead of
/// filling memory (the bodies stay in cache, the broker's memory is reused; RabbitMQ's credit
/// flow does the same). "Keeping up" is checked every `FLOW_WINDOW`: the consumers must have
/// taken enough to reach the resume level within `FLOW_DRAIN_HORIZON` at that pace. Slower
/// consumers (a job queue's workers, consumers out of prefetch, or gone quiet) release the
/// publisher, which is then not held for that queue for `FLOW_SLOW_BACKOFF`: their queue is a
/// store that grows as it would without flow control. Queues without consumers are never a
/// reason to wait, nor is a queue this connection consumes from itself (its acks and credit
/// arrive on this socket).
pub(super) async fn wait_for_flow(shared: &Context, reader: &mut Reader) {
    let (max_messages, max_bytes) = (
        shared.config.flow_ready_messages,
        shared.config.flow_ready_bytes,
    );
    if reader.routed.is_empty() || (max_messages == 0 && max_bytes == 0) {
        return;
    }
    let now = Instant::now();
    reader.slow.retain(|(_, until)| *until > now);
    let congested = {
        let state = shared.lock();
        reader.routed.iter().find_map(|qid| {
            if reader.slow.iter().any(|(slow, _)| slow == qid) {
                return None;
            }
            let flow = state.broker.queue_flow(*qid, reader.connection)?;
            holds_publisher(&flow, max_messages, max_bytes).then_some((*qid, flow.delivered))
        })
    };
    reader.routed.clear();
    let Some((qid, mut window_delivered)) = congested else {
        return;
    };
    let mut window_end = Instant::now() + FLOW_WINDOW;
    loop {
        let changed = shared.queues_changed.notified();
        let Some(flow) = shared.lock().broker.queue_flow(qid, reader.connection) else {
            return;
        };
        if flow.consumers == 0
            || !over_flow_limit(&flow, max_messages, max_bytes, FLOW_RESUME_PERCENT)
        {
            return;
        }
        let now = Instant::now();
        if now >= window_end {
            let taken = flow.delivered.saturating_sub(window_delivered);
            let excess = flow_excess(flow, max_messages, max_bytes);
            let windows_to_drain = FLOW_DRAIN_HORIZON.as_nanos() / FLOW_WINDOW.as_nanos();
            if u128::from(taken) * windows_to_drain < u128::from(excess) {
                if reader.slow.len() >= SLOW_TRACKED_MAX {
                    reader.slow.remove(0);
                }
                reader.slow.push((qid, now + FLOW_SLOW_BACKOFF));
                debug!(
                    connection = reader.connection.0,
                    taken,
                    excess,
                    "flow: the consumers of a queue drain it slowly; publishing resumes"
                );
                return;
            }
            window_delivered = flow.delivered;
            window_end = now + FLOW_WINDOW;
        }
        let _ = tokio::time::timeout(window_end - now, changed).await;
    }
}

/// Whether a queue's backlog is above `percent` of the flow limits (0: no limit).
pub(super) fn over_flow_limit(
    flow: &QueueFlow,
    max_messages: u64,
    max_bytes: u64,
    percent: u64,
) -> bool {
    (max_messages != 0 && flow.ready > max_messages / 100 * percent)
        || (max_bytes != 0 && flow.ready_bytes > max_bytes / 100 * percent)
}

/// Whether a queue holds the publishing connection it is seen from: it has consumers, none of
/// them on that connection, and more ready than the flow limits.
pub(super) fn holds_publisher(flow: &QueueFlow, max_messages: u64, max_bytes: u64) -> bool {
    flow.consumers > 0
        && flow.own_consumers == 0
        && over_flow_limit(flow, max_messages, max_bytes, 100)
}

/// Ready messages of a held queue above its resume level: by count, or by bytes converted to
/// messages of the queue's average size, whichever is more.
pub(super) fn flow_excess(flow: QueueFlow, max_messages: u64, max_bytes: u64) -> u64 {
    let by_count = if max_messages == 0 {
        0
    } else {
        flow.ready
            .saturating_sub(max_messages / 100 * FLOW_RESUME_PERCENT)
    };
    let by_bytes = if max_bytes == 0 || flow.ready_bytes == 0 {
        0
    } else {
        let excess_bytes = flow
            .ready_bytes
            .saturating_sub(max_bytes / 100 * FLOW_RESUME_PERCENT);
        (u128::from(flow.ready) * u128::from(excess_bytes) / u128::from(flow.ready_bytes)) as u64
    };
    by_count.max(by_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_holds_its_publisher_only_with_others_consuming_and_over_a_limit() {
        let flow = QueueFlow {
            ready: 5_000,
            ready_bytes: 500_000,
            consumers: 2,
            own_consumers: 0,
            delivered: 7,
            unacked_bytes: 0,
        };
        assert!(holds_publisher(&flow, 4_096, 0), "over the count limit");
        assert!(holds_publisher(&flow, 0, 400_000), "over the byte limit");
        assert!(!holds_publisher(&flow, 8_192, 1 << 20), "under both");
        assert!(!holds_publisher(&flow, 0, 0), "flow control off");
        let no_consumers = QueueFlow {
            consumers: 0,
            ..flow
        };
        assert!(!holds_publisher(&no_consumers, 4_096, 0), "a store");
        let own = QueueFlow {
            own_consumers: 1,
            ..flow
        };
        assert!(
            !holds_publisher(&own, 4_096, 0),
            "the publisher consumes from it itself: holding it would hold its acks"
        );
    }

    #[test]
    fn a_held_queues_excess_counts_bytes_in_messages_of_its_average_size() {
        let flow = QueueFlow {
            ready: 1_000,
            ready_bytes: 4_096_000,
            consumers: 1,
            own_consumers: 0,
            delivered: 0,
            unacked_bytes: 0,
        };
        // Resume levels: 2,048 messages (not reached: no excess by count), 1 MiB by bytes.
        assert_eq!(flow_excess(flow, 4_096, 0), 0);
        let excess_bytes = 4_096_000 - (2 << 20) / 100 * FLOW_RESUME_PERCENT;
        assert_eq!(flow_excess(flow, 4_096, 2 << 20), excess_bytes / 4_096);
        assert_eq!(flow_excess(flow, 100, 0), 1_000 - 50);
    }
}
