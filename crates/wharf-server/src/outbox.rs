//! A connection's outbound queue: everything the broker wants to send to one client, taken in
//! bulk by the connection's writer task, which coalesces it into as few writes as it can.
//!
//! Pushing never blocks and never does I/O, so it is safe under the broker lock. The writer
//! is woken only on the empty → non-empty transition, so a burst of deliveries costs one
//! wake-up; a reader's batch queues its output *held* (no wake-up at all) and sends it itself
//! once it released the lock (`output::flush_or_wake`).

use crate::limits::INLINE_WRITE_BYTES_MAX;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::sync::Notify;
use wharf_protocol::Frame;

/// Something to send.
#[derive(Debug)]
pub enum Out {
    /// A ready-made frame (response, confirm, cancel notice, close, heartbeat). Boxed: frames
    /// are rare next to deliveries, and a small `Out` is cheaper to move in bulk.
    Frame(Box<Frame>),
    /// A delivery, converted to wire form by the writer (outside the broker lock).
    Deliver(wharf_core::Delivery),
}

impl Out {
    fn approx_bytes(&self) -> usize {
        match self {
            Out::Frame(_) => 64,
            Out::Deliver(delivery) => {
                crate::limits::MESSAGE_OVERHEAD_BYTES + delivery.message.body.len()
            }
        }
    }
}

/// The queue itself.
#[derive(Debug, Default)]
pub struct Outbox {
    items: Mutex<Vec<Out>>,
    bytes: AtomicUsize,
    /// Wakes the writer when items arrive or the connection is closing.
    pub(crate) wake: Notify,
    /// Wakes a reader waiting for the writer to drain.
    pub(crate) drained: Notify,
    closing: AtomicBool,
    /// Wakes the reader when the writer task ends (a stored permit if it is not waiting).
    pub(crate) writer_end: Notify,
    /// Why the writer ended, if the client is to blame for it (a slow consumer).
    writer_failure: Mutex<Option<String>>,
    /// Bytes of a frame on its way in, in the connection's read buffer (set by its reader;
    /// the memory budget counts them).
    read_bytes: AtomicUsize,
    /// Deliveries the writer could not encode within the client's frame limit, for the
    /// reader to hand back to the broker (their consumer is cancelled, the messages requeued).
    undeliverable: Mutex<Vec<wharf_core::Delivery>>,
    /// Wakes the reader when deliveries are set aside.
    pub(crate) set_aside_wake: Notify,
}

impl Outbox {
    /// Records the bytes in the connection's read buffer (its reader, before each read).
    pub(crate) fn set_read_bytes(&self, bytes: usize) {
        self.read_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The bytes in the connection's read buffer, as last recorded.
    pub(crate) fn read_bytes(&self) -> usize {
        self.read_bytes.load(Ordering::Relaxed)
    }

    /// Appends to the queue under its lock, counting the bytes *before* the items can be taken:
    /// a taker on another thread (a writer, or a reader flushing inline) subtracts what it took
    /// once written, so counting after the items became visible could subtract first and leak
    /// the count for good (it saturates at zero), until the reader waited for room forever.
    /// Returns whether the queue was empty before and the bytes queued after.
    fn enqueue(&self, bytes: usize, append: impl FnOnce(&mut Vec<Out>)) -> (bool, usize) {
        let mut queued = self.items.lock().expect("outbox lock poisoned");
        let was_empty = queued.is_empty();
        let queued_bytes = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        append(&mut queued);
        (was_empty, queued_bytes)
    }

    /// Queues an item.
    pub fn push(&self, item: Out) {
        let (was_empty, _) = self.enqueue(item.approx_bytes(), |queued| queued.push(item));
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// Queues every item of `items` (leaving it empty), under one lock.
    pub fn push_many(&self, items: &mut Vec<Out>) {
        if items.is_empty() {
            return;
        }
        let bytes: usize = items.iter().map(Out::approx_bytes).sum();
        let (was_empty, _) = self.enqueue(bytes, |queued| queued.append(items));
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// Queues a frame.
    pub fn push_frame(&self, frame: Frame) {
        self.push(Out::Frame(Box::new(frame)));
    }

    /// Queues every item of `items` (leaving it empty) without waking the writer: the caller
    /// must send it with `output::flush_or_wake` once it has released the broker lock. Output
    /// too large to be written inline wakes the writer at once all the same, so that it starts
    /// on a large batch while the reader is still applying the rest.
    pub(crate) fn push_many_held(&self, items: &mut Vec<Out>) {
        let bytes: usize = items.iter().map(Out::approx_bytes).sum();
        let (_, queued_bytes) = self.enqueue(bytes, |queued| queued.append(items));
        if queued_bytes > INLINE_WRITE_BYTES_MAX {
            self.wake.notify_one();
        }
    }

    /// Queues a frame without waking the writer (see [`Outbox::push_many_held`]).
    pub(crate) fn push_frame_held(&self, frame: Frame) {
        let item = Out::Frame(Box::new(frame));
        self.enqueue(item.approx_bytes(), |queued| queued.push(item));
    }

    /// Takes everything queued, leaving `into` (cleared first) full and the queue empty.
    pub fn take_all(&self, into: &mut Vec<Out>) {
        into.clear();
        let mut items = self.items.lock().expect("outbox lock poisoned");
        std::mem::swap(&mut *items, into);
    }

    /// Records that `bytes` of taken items were written.
    pub fn written(&self, bytes: usize) {
        self.bytes.fetch_sub(
            bytes.min(self.bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        self.drained.notify_waiters();
    }

    /// Approximate bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Asks the writer to flush what is queued and then shut the socket down.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Records that the writer task ended (a failed write, or the connection closed): wakes
    /// the reader, which must not wait any more for a peer that cannot be written to.
    pub(crate) fn end_writer(&self) {
        self.writer_end.notify_one();
    }

    /// Sets aside deliveries the client cannot take (empties `deliveries`) and wakes the
    /// reader to deal with them.
    pub(crate) fn set_aside(&self, deliveries: &mut Vec<wharf_core::Delivery>) {
        if deliveries.is_empty() {
            return;
        }
        self.undeliverable
            .lock()
            .expect("outbox lock poisoned")
            .append(deliveries);
        self.set_aside_wake.notify_one();
    }

    /// The deliveries set aside since the last call.
    pub(crate) fn take_set_aside(&self) -> Vec<wharf_core::Delivery> {
        std::mem::take(&mut *self.undeliverable.lock().expect("outbox lock poisoned"))
    }

    /// Records that the writer stopped because of the client (its reader closes the
    /// connection with `SlowConsumer` and this reason).
    pub(crate) fn writer_failed(&self, reason: String) {
        *self.writer_failure.lock().expect("outbox lock poisoned") = Some(reason);
    }

    /// Why the writer stopped, if the client is to blame.
    pub(crate) fn writer_failure(&self) -> Option<String> {
        self.writer_failure
            .lock()
            .expect("outbox lock poisoned")
            .clone()
    }

    /// Whether [`Outbox::close`] was called.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Bytes an item accounts for (what [`Outbox::written`] must be given back).
    pub fn item_bytes(item: &Out) -> usize {
        item.approx_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_protocol::{Confirm, ConfirmRange, ConfirmStatus, Durability};

    fn confirm() -> Out {
        Out::Frame(Box::new(Frame::Confirm(Confirm {
            ranges: vec![ConfirmRange {
                first_seq: 1,
                last_seq: 1,
                status: ConfirmStatus::Confirmed(Durability::InMemory),
            }],
        })))
    }

    #[test]
    fn items_are_counted_before_a_taker_can_see_them() {
        // A taker on another thread (a writer, or a reader flushing inline) uncounts what it
        // took once written: were items visible before they were counted, it could uncount
        // first, and the count would leak for good (it saturates at zero). So at the moment
        // the items join the queue, their bytes must be counted already.
        let outbox = Outbox::default();
        outbox.push_frame_held(Frame::Heartbeat);
        let before = outbox.queued_bytes();
        let items = vec![confirm(), confirm()];
        let bytes: usize = items.iter().map(Outbox::item_bytes).sum();
        let mut items = Some(items);
        outbox.enqueue(bytes, |queued| {
            assert_eq!(
                outbox.queued_bytes(),
                before + bytes,
                "visible before counted"
            );
            queued.append(&mut items.take().expect("appended once"));
        });
        let mut taken = Vec::new();
        outbox.take_all(&mut taken);
        assert_eq!(taken.len(), 3);
        outbox.written(taken.iter().map(Outbox::item_bytes).sum());
        assert_eq!(outbox.queued_bytes(), 0);
    }
}
