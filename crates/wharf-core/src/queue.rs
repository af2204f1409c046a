//! Queues: ready messages in FIFO order, the consumers attached, and per-queue statistics.

use crate::message::{Headers, Message};
use crate::{ConnectionId, ConsumerTag};
use std::collections::VecDeque;
use std::sync::Arc;

/// Properties fixed when a queue is declared; a redeclare must repeat them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueOptions {
    /// Survives a broker restart; its persistent messages are logged.
    pub durable: bool,
    /// Owned by the declaring connection: only it may use the queue, and it is deleted when
    /// that connection closes.
    pub exclusive: bool,
    /// Deleted when its last consumer leaves (once it has had one).
    pub auto_delete: bool,
    /// Only one consumer at a time receives messages; the next takes over when it leaves.
    pub single_active_consumer: bool,
    /// Extra arguments, kept for the queue features (limits, TTL, dead-lettering, ...).
    pub arguments: Headers,
}

/// How a consumer receives messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerOptions {
    /// For manual-ack consumers, the most unacked deliveries it may hold; for auto-ack
    /// consumers, the initial and maximal credit. 0 means unlimited.
    pub prefetch: u32,
    /// Deliveries count as acked when sent.
    pub auto_ack: bool,
    /// No other consumer may attach to the queue while this one is attached.
    pub exclusive: bool,
    /// Higher priorities are served first while they have capacity.
    pub priority: i32,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            prefetch: 100,
            auto_ack: false,
            exclusive: false,
            priority: 0,
        }
    }
}

/// A message in a queue: shared message plus this queue's delivery state.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Position in the queue's arrival order; ready entries are kept sorted by it.
    pub seq: u64,
    pub message: Arc<Message>,
    pub redelivered: bool,
    pub delivery_count: u32,
    /// Set when the message is persistent and the queue durable: the id its log records use.
    pub durable_id: Option<u64>,
}

/// Ready messages, sorted by arrival; a requeued message goes back to its arrival place.
#[derive(Debug, Default, Clone)]
pub(crate) struct Ready {
    entries: VecDeque<Entry>,
    bytes: u64,
}

impl Ready {
    pub(crate) fn push_back(&mut self, entry: Entry) {
        if let Some(last) = self.entries.back() {
            assert!(last.seq < entry.seq, "arrival order is strictly increasing");
        }
        self.bytes += entry.message.size_bytes();
        self.entries.push_back(entry);
    }

    /// Puts a requeued entry back at its arrival position (usually at or near the head).
    pub(crate) fn requeue(&mut self, entry: Entry) {
        let pos = self
            .entries
            .partition_point(|existing| existing.seq < entry.seq);
        if let Some(existing) = self.entries.get(pos) {
            assert!(existing.seq != entry.seq, "a message is never ready twice");
        }
        self.bytes += entry.message.size_bytes();
        self.entries.insert(pos, entry);
    }

    pub(crate) fn pop_front(&mut self) -> Option<Entry> {
        let entry = self.entries.pop_front()?;
        self.bytes -= entry.message.size_bytes();
        Some(entry)
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(crate) fn clear(&mut self) -> usize {
        let n_entries = self.entries.len();
        self.entries.clear();
        self.bytes = 0;
        n_entries
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Consumer {
    pub connection: ConnectionId,
    pub tag: ConsumerTag,
    pub options: ConsumerOptions,
    /// Auto-ack consumers: deliveries still allowed before the client grants more.
    pub credit: u32,
    /// Manual-ack consumers: deliveries not yet acked.
    pub unacked: u32,
}

impl Consumer {
    pub(crate) fn has_capacity(&self) -> bool {
        if self.options.prefetch == 0 {
            return true;
        }
        if self.options.auto_ack {
            self.credit > 0
        } else {
            self.unacked < self.options.prefetch
        }
    }
}

/// Per-queue statistics, as reported by [`crate::Broker::queue_stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Queue name.
    pub name: String,
    /// Whether the queue is durable.
    pub durable: bool,
    /// Whether the queue is exclusive to a connection.
    pub exclusive: bool,
    /// Whether the queue is deleted when its last consumer leaves.
    pub auto_delete: bool,
    /// Messages waiting for a consumer.
    pub ready: u64,
    /// Body bytes of the ready messages.
    pub ready_bytes: u64,
    /// Messages delivered and not yet acked.
    pub unacked: u64,
    /// Consumers attached.
    pub consumers: u32,
    /// Messages enqueued since the queue was declared.
    pub published: u64,
    /// Deliveries made (redeliveries included).
    pub delivered: u64,
    /// Deliveries of messages that had been delivered before.
    pub redelivered: u64,
    /// Messages acked (auto-ack deliveries count as acked when sent).
    pub acked: u64,
    /// Messages nacked or rejected without requeue (dropped).
    pub dropped: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Queue {
    pub name: Arc<str>,
    pub options: QueueOptions,
    pub owner: Option<ConnectionId>,
    pub ready: Ready,
    pub unacked: u64,
    pub consumers: Vec<Consumer>,
    /// Round-robin position among consumers.
    pub cursor: usize,
    pub next_seq: u64,
    /// Bindings that lead here: (source exchange, routing key, arguments).
    pub bound_from: Vec<(Arc<str>, Arc<str>, Headers)>,
    pub stats: QueueStats,
}

impl Queue {
    pub(crate) fn new(name: Arc<str>, options: QueueOptions, owner: Option<ConnectionId>) -> Self {
        Queue {
            stats: QueueStats {
                name: name.to_string(),
                durable: options.durable,
                exclusive: options.exclusive,
                auto_delete: options.auto_delete,
                ..QueueStats::default()
            },
            name,
            options,
            owner,
            ready: Ready::default(),
            unacked: 0,
            consumers: Vec::new(),
            cursor: 0,
            next_seq: 0,
            bound_from: Vec::new(),
        }
    }

    pub(crate) fn enqueue(
        &mut self,
        message: Arc<Message>,
        durable_id: Option<u64>,
        redelivered: bool,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.stats.published += 1;
        self.ready.push_back(Entry {
            seq,
            message,
            redelivered,
            delivery_count: 0,
            durable_id,
        });
    }

    /// Whether persistent messages in this queue are logged.
    pub(crate) fn is_durable(&self) -> bool {
        self.options.durable && !self.options.exclusive
    }

    pub(crate) fn consumer_idx(&self, connection: ConnectionId, tag: ConsumerTag) -> Option<usize> {
        self.consumers
            .iter()
            .position(|consumer| consumer.connection == connection && consumer.tag == tag)
    }

    /// The consumer that gets the next message: the highest priority with capacity, round
    /// robin among equals; with single-active-consumer, only the first attached.
    pub(crate) fn pick_consumer(&mut self) -> Option<usize> {
        let n_consumers = self.consumers.len();
        if n_consumers == 0 {
            return None;
        }
        if self.options.single_active_consumer {
            return self.consumers[0].has_capacity().then_some(0);
        }
        if n_consumers == 1 {
            return self.consumers[0].has_capacity().then_some(0);
        }
        let top_priority = self
            .consumers
            .iter()
            .map(|consumer| consumer.options.priority)
            .max()
            .unwrap_or(0);
        let mut best: Option<usize> = None;
        for step in 0..n_consumers {
            let idx = (self.cursor + step) % n_consumers;
            let consumer = &self.consumers[idx];
            if !consumer.has_capacity() {
                continue;
            }
            if best.is_none_or(|best_idx| {
                consumer.options.priority > self.consumers[best_idx].options.priority
            }) {
                best = Some(idx);
                if consumer.options.priority == top_priority {
                    break;
                }
            }
        }
        if let Some(idx) = best {
            self.cursor = (idx + 1) % n_consumers;
        }
        best
    }

    pub(crate) fn stats(&self) -> QueueStats {
        let mut stats = self.stats.clone();
        stats.ready = self.ready.len() as u64;
        stats.ready_bytes = self.ready.bytes();
        stats.unacked = self.unacked;
        stats.consumers = self.consumers.len() as u32;
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64) -> Entry {
        Entry {
            seq,
            message: Arc::new(Message::new("k", vec![0u8; 3])),
            redelivered: false,
            delivery_count: 0,
            durable_id: None,
        }
    }

    #[test]
    fn requeued_entries_return_to_their_arrival_position() {
        let mut ready = Ready::default();
        for seq in [2, 5, 7] {
            ready.push_back(entry(seq));
        }
        ready.requeue(entry(1));
        ready.requeue(entry(6));
        let order: Vec<u64> = ready.iter().map(|entry| entry.seq).collect();
        assert_eq!(order, vec![1, 2, 5, 6, 7]);
        assert_eq!(ready.bytes(), 15);
        assert_eq!(ready.pop_front().unwrap().seq, 1);
        assert_eq!(ready.bytes(), 12);
    }

    #[test]
    #[should_panic(expected = "strictly increasing")]
    fn pushing_out_of_order_is_a_broken_invariant() {
        let mut ready = Ready::default();
        ready.push_back(entry(3));
        ready.push_back(entry(2));
    }
}
