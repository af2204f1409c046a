//! Everything the broker must do at a later time, in one min-heap keyed by due time: delayed
//! messages entering their queue, message TTLs, delivery leases and queue expiry.
//!
//! The core has no clock: the server passes `now_ms` with every command and applies
//! [`Command::Tick`](crate::Command::Tick) at [`Broker::next_deadline`](crate::Broker::next_deadline).
//! A timer is never cancelled in place: TTL, lease and expiry timers are checked against the
//! current state when they fire and skipped when stale (the lease was settled or extended,
//! the queue was used), so cancelling is O(1) and firing is O(log n). Message TTLs use one
//! timer per queue (the queue keeps its ready messages' expiries in order), so messages that
//! leave early leave no timer behind. Delayed messages are owned by their timer until due.

use crate::queue::Entry;
use crate::{ConnectionId, QueueId};
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// What a timer does when due.
#[derive(Debug, Clone)]
pub(crate) enum TimerKind {
    /// A delayed message (published with a delay, or deferred by a consumer) that enters the
    /// back of its queue when due.
    Delayed {
        /// The queue.
        queue: QueueId,
        /// The message, with its delivery state (boxed: the heap moves timers around, and
        /// small ones move faster).
        entry: Box<Entry>,
    },
    /// The earliest expiry among a queue's ready messages: those due are expired (dropped or
    /// dead-lettered). One per queue at a time (re-armed when an earlier expiry appears).
    Ttl {
        /// The queue.
        queue: QueueId,
    },
    /// A delivery's lease: if still outstanding and not extended, it goes back to its queue.
    Lease {
        /// The connection holding it.
        connection: ConnectionId,
        /// Its delivery tag.
        tag: u64,
    },
    /// A queue with `x-expires` may have been unused long enough to be deleted.
    QueueExpiry {
        /// The queue.
        queue: QueueId,
    },
}

#[derive(Debug, Clone)]
struct Timer {
    due_ms: u64,
    /// Insertion order: timers due at the same time fire in the order they were set.
    order: u64,
    kind: TimerKind,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        (self.due_ms, self.order) == (other.due_ms, other.order)
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timer {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due_ms, other.order).cmp(&(self.due_ms, self.order))
    }
}

/// The broker's timers.
#[derive(Debug, Clone, Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Timer>,
    next_order: u64,
}

impl Timers {
    /// Sets a timer; O(log n).
    pub(crate) fn push(&mut self, due_ms: u64, kind: TimerKind) {
        let order = self.next_order;
        self.next_order += 1;
        self.heap.push(Timer {
            due_ms,
            order,
            kind,
        });
    }

    /// The earliest due time, if any timer is set.
    pub(crate) fn next_due(&self) -> Option<u64> {
        self.heap.peek().map(|timer| timer.due_ms)
    }

    /// Removes and returns the earliest timer if it is due at `now_ms`.
    pub(crate) fn pop_due(&mut self, now_ms: u64) -> Option<(u64, TimerKind)> {
        if self.heap.peek()?.due_ms > now_ms {
            return None;
        }
        self.heap.pop().map(|timer| (timer.due_ms, timer.kind))
    }

    /// Removes the delayed messages of a deleted queue; returns how many. O(n).
    pub(crate) fn remove_delayed_of(&mut self, deleted: QueueId) -> u64 {
        let before = self.heap.len();
        self.heap.retain(
            |timer| !matches!(&timer.kind, TimerKind::Delayed { queue, .. } if *queue == deleted),
        );
        (before - self.heap.len()) as u64
    }

    /// Every timer, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &TimerKind)> {
        self.heap.iter().map(|timer| (timer.due_ms, &timer.kind))
    }

    /// Timers set (stale ones included): sizes the debug invariant check.
    #[cfg(any(debug_assertions, test))]
    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_fire_in_due_order_then_insertion_order() {
        let mut timers = Timers::default();
        for (due, conn) in [(30, 1), (10, 2), (20, 3), (10, 4)] {
            timers.push(
                due,
                TimerKind::Lease {
                    connection: ConnectionId(conn),
                    tag: 0,
                },
            );
        }
        assert_eq!(timers.next_due(), Some(10));
        assert!(timers.pop_due(9).is_none());
        let mut fired = Vec::new();
        while let Some((due, TimerKind::Lease { connection, .. })) = timers.pop_due(25) {
            fired.push((due, connection.0));
        }
        assert_eq!(fired, vec![(10, 2), (10, 4), (20, 3)]);
        assert_eq!(timers.len(), 1);
        assert_eq!(timers.next_due(), Some(30));
    }
}
