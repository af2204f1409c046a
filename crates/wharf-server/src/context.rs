//! The server context: the broker state behind its one lock, the configuration, and the
//! wake-ups shared by the connections and the server's tasks (timers, pager, housekeeping).
//! The command batch that goes through the lock is in `batch.rs`.

use crate::config::ServerConfig;
use crate::persist::journal::FailStop;
use crate::state::State;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, watch};
use tracing::warn;
use wharf_core::Command;

/// Milliseconds since the Unix epoch: the logical time the core is given.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// What the server's connections and tasks share: the broker state behind its lock, the
/// configuration, and the wake-ups between them.
pub(crate) struct Context {
    pub config: ServerConfig,
    /// The broker's users (logins are checked against them).
    pub(crate) users: Arc<crate::auth::Users>,
    /// Password checks running at once (`KDF_CONCURRENCY_MAX`).
    pub(crate) kdf: Arc<tokio::sync::Semaphore>,
    /// Open connections per user (`connections_per_user_max`).
    pub(crate) user_connections: Mutex<std::collections::HashMap<String, usize>>,
    /// Held by an administration request that checks a virtual host exists and then relies
    /// on it (adding or deleting one, permissions in one): two such requests never interleave.
    pub(crate) vhost_admin: Mutex<()>,
    pub(crate) state: Mutex<State>,
    /// Set when the log failed: the server stops and `run` reports it (fail-stop).
    pub failure: Arc<Mutex<Option<String>>>,
    pub next_connection: AtomicU64,
    pub shutdown: watch::Receiver<bool>,
    /// Notified when ready bytes fall below the low watermark (see the memory alarm).
    pub memory_freed: Notify,
    /// Notified after every batch of commands: publishers paused by flow control look at
    /// their queue again (see `connection::wait_for_flow`).
    pub queues_changed: Notify,
    /// When the timer task will next apply `Command::Tick` (unix ms; `u64::MAX`: no timer).
    /// Read and written with the state lock held, so it always matches the core's timers as
    /// of the last command batch.
    pub(crate) timer_at: AtomicU64,
    /// Wakes the timer task before `timer_at` (a command created an earlier timer).
    pub(crate) timer_wake: Notify,
    /// Wakes the pager task (a queue asked for paged messages).
    pub(crate) pager_wake: Arc<Notify>,
    /// Stops the server on a failure it must not survive.
    pub(crate) fail_stop: FailStop,
    /// Accepted sockets not yet closed, handshaking ones included.
    pub(crate) sockets: AtomicUsize,
    /// Sockets accepted at most: `connections_max`, lowered to what the open-file limit
    /// leaves once the log's and spools' reserve is kept back.
    pub(crate) sockets_max: usize,
    /// Refusals being sent to sockets over `sockets_max` (bounded: past it they are dropped).
    pub(crate) refusing: AtomicUsize,
    /// The memory alarm's threshold in bytes (absolute, or the fraction of the machine's).
    pub(crate) memory_high: u64,
    /// Set by the resource monitor while the message bytes the broker holds (ready, unacked,
    /// queued in outboxes) are over `memory_high`, until they fall below the low watermark.
    pub(crate) memory_alarm: AtomicBool,
    /// Bytes queued in every connection's outbox, as of the resource monitor's last look.
    pub(crate) outbox_bytes: AtomicUsize,
    /// Bytes of delivered, unsettled messages, as of the resource monitor's last look.
    pub(crate) unacked_bytes: AtomicU64,
    /// Bytes of frames on their way in, in every connection's read buffer, as of the
    /// resource monitor's last look.
    pub(crate) read_buffer_bytes: AtomicUsize,
    /// Bytes of paged messages held in memory by the spools (not yet written, or waiting
    /// for a file: `SPOOL_FILES_OPEN_MAX`), as of the last resource check.
    pub(crate) spool_memory_bytes: AtomicUsize,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// Message bytes held besides the ready ones, as of the resource monitor's last look
    /// (every 100 ms: no counter shared by every connection on the hot path): unacked, queued
    /// for sockets and in read buffers.
    pub fn held_bytes(&self) -> u64 {
        self.unacked_bytes.load(Ordering::Relaxed)
            + self.outbox_bytes.load(Ordering::Relaxed) as u64
            + self.read_buffer_bytes.load(Ordering::Relaxed) as u64
            + self.spool_memory_bytes.load(Ordering::Relaxed) as u64
    }

    /// Whether the memory alarm is on: the message bytes held (ready, unacked, queued for
    /// sockets) over the high watermark.
    pub fn memory_pressed(&self, ready_bytes: u64) -> bool {
        self.memory_alarm.load(Ordering::Acquire)
            || ready_bytes + self.held_bytes() > self.memory_high
    }

    /// The broker state. Held only while applying commands: never across an `.await`.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("a panic while holding the broker lock is fatal")
    }

    /// Call with the state lock held after applying commands: if they created a timer due
    /// before the timer task's planned wake-up (a delayed publish, a lease, a TTL, an unused
    /// queue with `x-expires`), wake it. One atomic load per batch when nothing changed.
    pub fn wake_timer_if_earlier(&self, state: &State) {
        if let Some(deadline) = state.broker.next_deadline()
            && deadline < self.timer_at.load(Ordering::Acquire)
        {
            self.timer_at.store(deadline, Ordering::Release);
            self.timer_wake.notify_one();
        }
    }

    /// Fires the core's due timers (`Command::Tick` at the current time), routes their effects
    /// (deliveries of messages that became ready, dead letters, requeued deliveries whose lease
    /// lapsed, deleted queues) and hands their durable changes to the log, like any command
    /// batch. Returns the next deadline (unix ms), recorded as the timer task's wake-up.
    pub(crate) fn fire_timers(&self) -> Option<u64> {
        let mut batch = self.batch();
        let now = now_ms();
        if batch
            .broker
            .next_deadline()
            .is_some_and(|deadline| deadline <= now)
        {
            if let Err(err) = batch.apply(now, Command::Tick) {
                warn!("firing timers failed: {err}");
            }
            batch.route_effects();
        }
        let next = batch.broker.next_deadline();
        // Recorded before the batch ends, so that ending it does not wake this task again.
        self.timer_at
            .store(next.unwrap_or(u64::MAX), Ordering::Release);
        if let Some(leader) = batch.finish().flush(None) {
            leader.commit();
        }
        next
    }
}
