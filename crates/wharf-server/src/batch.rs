//! The command batch: the one sequence by which commands change the broker, whoever sends
//! them (a connection's frames, the timer task, the pager, a connection's open and close, and
//! the protocol front ends to come). In order:
//!
//! 1. [`Context::batch`]: lock the broker state and hold its output (deliveries and responses
//!    are queued in outboxes without waking any writer task);
//! 2. apply commands through the batch (it derefs to [`State`]); `State::apply` stages the
//!    durable topology changes as log operations, `State::route_effects` sends each effect to
//!    its outbox and stages the durable message changes;
//! 3. [`Batch::finish`]: route what is left; announce the log leader if asked (before the
//!    append, so the append wakes nobody); stage the operations for the log as one batch,
//!    which takes its place in the log now (log order is core order; the completion set with
//!    [`Batch::on_durable`] runs once it is on disk: the confirms); wake the timer task if a
//!    command made an earlier deadline; let publishers paused on memory or flow control look
//!    again; unlock;
//! 4. [`AfterUnlock::flush`]: encode the staged batch and append it once the batches staged
//!    before it have (`PendingAppend::run`); write the held output (small outputs inline, else
//!    wake writer tasks) and hand back the leader, whose commit (write, fsync, completions)
//!    runs without the lock.
//!
//! The batch's place in the log is taken in step 3, under the lock: that is what makes log
//! order core order. Its operations hold messages by `Arc` (no copy) until step 4 encodes
//! them, without the lock. Changing this order changes what a confirm means
//! (docs/durability.md).

use crate::context::Context;
use crate::limits::READY_BYTES_LOW_WATERMARK_PERCENT;
use crate::output::{Output, flush_or_wake};
use crate::persist::journal::{Outcome, PendingAppend};
use crate::state::State;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, MutexGuard};
use wharf_storage::Leader;

/// One command batch in progress: the broker lock is held until [`Batch::finish`] (or drop).
pub(crate) struct Batch<'a> {
    shared: &'a Context,
    state: MutexGuard<'a, State>,
    done: Option<Box<dyn FnOnce(Outcome) + Send>>,
    lead: bool,
    finished: bool,
}

/// What a finished batch leaves to do once the broker lock is released.
#[must_use = "held output must be flushed"]
pub(crate) struct AfterUnlock {
    held: Vec<Arc<Output>>,
    leader: Option<Leader>,
    /// The staged log batch, appended first thing after unlocking.
    pending: Option<PendingAppend>,
}

impl Context {
    /// Starts a command batch: locks the broker state and holds its output.
    pub fn batch(&self) -> Batch<'_> {
        let mut state = self.lock();
        state.hold_output();
        Batch {
            shared: self,
            state,
            done: None,
            lead: false,
            finished: false,
        }
    }
}

impl Batch<'_> {
    /// Runs `done` once the batch's log operations are on disk (or the append failed); at once,
    /// with the strongest outcome, if the batch logs nothing. With `lead`, the caller commits
    /// the log itself after unlocking (see `Log::lead`): for a client most likely waiting for
    /// exactly this batch.
    pub fn on_durable(&mut self, done: Box<dyn FnOnce(Outcome) + Send>, lead: bool) {
        assert!(self.done.is_none(), "one completion per batch");
        self.done = Some(done);
        self.lead = lead;
    }

    /// Ends the batch: commits its log operations, notifies, unlocks.
    pub fn finish(mut self) -> AfterUnlock {
        self.end()
        // The lock is released as `self` drops here.
    }

    fn end(&mut self) -> AfterUnlock {
        assert!(!self.finished, "a batch ends once");
        self.finished = true;
        let state = &mut *self.state;
        state.route_effects();
        // Announced before the append, so that the append does not wake the WAL's writer.
        let leader = match (&self.done, self.lead) {
            (Some(_), true) => state.log().map(|log| log.lead()),
            _ => None,
        };
        let pending = state.commit(self.done.take());
        let high = self.shared.memory_high;
        if state.broker.ready_bytes_total() <= high / 100 * READY_BYTES_LOW_WATERMARK_PERCENT
            && !self
                .shared
                .memory_alarm
                .load(std::sync::atomic::Ordering::Acquire)
        {
            self.shared.memory_freed.notify_waiters();
        }
        self.shared.queues_changed.notify_waiters();
        self.shared.wake_timer_if_earlier(state);
        let mut held = Vec::new();
        state.release_output(&mut held);
        AfterUnlock {
            held,
            leader,
            pending,
        }
    }
}

impl Drop for Batch<'_> {
    /// A batch left early (an error path) still commits what it applied and releases its
    /// output: nothing staged is left for a later batch to log out of order.
    fn drop(&mut self) {
        if !self.finished && !std::thread::panicking() {
            let after = self.end();
            if let Some(leader) = after.flush(None) {
                leader.commit();
            }
        }
    }
}

impl Deref for Batch<'_> {
    type Target = State;

    fn deref(&self) -> &State {
        &self.state
    }
}

impl DerefMut for Batch<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

impl AfterUnlock {
    /// Appends the staged log batch (encoded now, without the lock, in its place in the log),
    /// then writes the held output: the deliveries to every connection first (what someone is
    /// waiting for), then `own`, the caller's outbox (its responses and confirms, pushed held
    /// after the batch). Returns the log leader to commit, if the batch took one.
    ///
    /// Between [`Batch::finish`] and this, the caller must not take the broker lock: a batch
    /// staged later may be waiting, under that lock, for this one's append.
    pub fn flush(mut self, own: Option<&Arc<Output>>) -> Option<Leader> {
        if let Some(pending) = self.pending.take() {
            pending.run();
        }
        for held in &self.held {
            flush_or_wake(held);
        }
        if let Some(own) = own {
            flush_or_wake(own);
        }
        self.leader
    }
}

#[cfg(test)]
mod tests {
    /// The sequence has one home: no other module commits the log, holds or releases output,
    /// or announces a leader for a batch (they would drift from the order above).
    #[test]
    fn only_the_command_batch_commits_staged_operations_or_holds_output() {
        let sources = [
            ("connection/mod.rs", include_str!("connection/mod.rs")),
            (
                "connection/confirms.rs",
                include_str!("connection/confirms.rs"),
            ),
            ("connection/flow.rs", include_str!("connection/flow.rs")),
            ("connection/frames.rs", include_str!("connection/frames.rs")),
            (
                "connection/handshake.rs",
                include_str!("connection/handshake.rs"),
            ),
            (
                "connection/requests.rs",
                include_str!("connection/requests.rs"),
            ),
            ("context.rs", include_str!("context.rs")),
            ("output.rs", include_str!("output.rs")),
            ("server.rs", include_str!("server.rs")),
            ("writer.rs", include_str!("writer.rs")),
            ("outbox.rs", include_str!("outbox.rs")),
            ("persist/journal.rs", include_str!("persist/journal.rs")),
            (
                "persist/checkpoint.rs",
                include_str!("persist/checkpoint.rs"),
            ),
        ];
        for (file, text) in sources {
            for needle in [
                "state.commit(",
                ".hold_output(",
                ".release_output(",
                "log.lead()",
            ] {
                assert!(
                    !text.contains(needle),
                    "{file} calls `{needle}`: go through `Context::batch` (batch.rs)"
                );
            }
        }
    }
}
