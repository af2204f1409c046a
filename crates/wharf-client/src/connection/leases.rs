//! Leases: the deliveries the application holds unsettled, kept alive by the lease extender
//! task.

use super::{Command, ConnectionShared, ConsumerShared};
use std::sync::Arc;
use tokio::time::Instant;
use wharf_protocol::{Frame, Touch};

/// A delivery of a consumer with an ack timeout that the application holds unsettled: the
/// extender touches it at `touch_at`, then every `lease_interval` of its consumer.
pub(super) struct Lease {
    pub(super) consumer: Arc<ConsumerShared>,
    pub(super) touch_at: Instant,
}

impl ConnectionShared {
    /// The application took `delivery_tag` (received at `received_at`) from a consumer with an
    /// ack timeout: keep its lease alive until it is settled or released. The first touch is
    /// due half the timeout after it was received (at once if it waited that long in the
    /// consumer's buffer).
    pub(crate) fn hold_lease(
        &self,
        consumer: &Arc<ConsumerShared>,
        delivery_tag: u64,
        received_at: Instant,
    ) {
        let Some(interval) = consumer.lease_interval else {
            return;
        };
        let touch_at = received_at + interval;
        let mut state = self.lock();
        if state.open_error().is_some() {
            return;
        }
        state.leases.insert(
            delivery_tag,
            Lease {
                consumer: consumer.clone(),
                touch_at,
            },
        );
        if state.lease_wake_at.is_none_or(|wake_at| touch_at < wake_at) {
            state.lease_wake_at = Some(touch_at);
            self.lease_wake.notify_one();
        }
    }

    /// Stops extending the lease of `delivery_tag` (the application dropped it unsettled: the
    /// broker takes it back when the lease lapses).
    pub(crate) fn release_lease(&self, delivery_tag: u64) {
        self.lock().leases.remove(&delivery_tag);
    }

    /// The extender's round: queues a `Touch` for every lease due, forgets the leases of ended
    /// consumers, and returns when the next one is due (`Ok(None)`: none held). `Err` once the
    /// connection is closing or over: the extender stops.
    fn touch_due_leases(&self) -> Result<Option<Instant>, ()> {
        let mut state = self.lock();
        if state.open_error().is_some() {
            state.leases.clear();
            return Err(());
        }
        let now = Instant::now();
        let mut due = Vec::new();
        let mut wake_at: Option<Instant> = None;
        state.leases.retain(|&delivery_tag, lease| {
            let Some(interval) = lease.consumer.lease_interval else {
                return false;
            };
            if lease.consumer.is_cancelled() {
                // Cancelled or ended: the broker requeued its deliveries; never touch them.
                return false;
            }
            if lease.touch_at <= now {
                due.push(delivery_tag);
                lease.touch_at = now + interval;
            }
            wake_at = Some(wake_at.map_or(lease.touch_at, |at| at.min(lease.touch_at)));
            true
        });
        state.lease_wake_at = wake_at;
        for delivery_tag in due {
            // Queued under the lock: ordered with settlements (see `send_settlement`).
            match self.encode(&Frame::Touch(Touch { delivery_tag })) {
                Ok(bytes) => {
                    if self.commands.send(Command::Frame(bytes)).is_err() {
                        return Err(());
                    }
                }
                Err(err) => tracing::warn!(delivery_tag, "cannot encode a Touch: {err}"),
            }
        }
        Ok(wake_at)
    }
}

/// Touches the leases of held deliveries when they are due (see [`ConnectionShared::hold_lease`]);
/// sleeps while none is due. Ends with the connection.
pub(super) async fn run_lease_extender(shared: Arc<ConnectionShared>) {
    let mut stop = shared.hard_shutdown.subscribe();
    loop {
        let Ok(wake_at) = shared.touch_due_leases() else {
            return;
        };
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            _ = shared.lease_wake.notified() => {}
            _ = tokio::time::sleep_until(wake_at.unwrap_or_else(Instant::now)), if wake_at.is_some() => {}
        }
    }
}
