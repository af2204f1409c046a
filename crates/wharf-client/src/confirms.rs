//! Confirm bookkeeping, sans-IO: which publish sequence numbers wait for which caller.
//!
//! The writer task registers each publish frame just before writing it (so numbering follows
//! the socket order); the reader task applies `Confirm` ranges. Every sequence number is
//! confirmed exactly once; ranges may arrive in any order and may cover parts of batches, so
//! a waiter completes when the last of its sequence numbers is confirmed.

use crate::error::ClientError;
use std::collections::BTreeMap;
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use wharf_protocol::{ConfirmRange, ConfirmStatus, Durability, ErrorCode};

/// The outcome of one published message.
pub(crate) type Outcome = Result<Durability, ClientError>;

/// Who waits for a publish frame's confirms.
#[derive(Debug)]
pub(crate) enum Waiter {
    /// A single `Publish`.
    One(oneshot::Sender<Outcome>),
    /// A `PublishBatch`: one outcome per message, in order.
    Many(oneshot::Sender<Vec<Outcome>>),
}

/// Window permits held until the publish is confirmed (released on drop).
pub(crate) type Permits = Vec<OwnedSemaphorePermit>;

#[derive(Debug)]
struct Entry {
    outcomes: Vec<Option<Outcome>>,
    n_left: usize,
    waiter: Waiter,
    _permits: Permits,
}

/// A publish frame whose every message is confirmed: hand the outcomes to its waiter.
#[derive(Debug)]
pub(crate) struct Completed {
    waiter: Waiter,
    outcomes: Vec<Outcome>,
    _permits: Permits,
}

impl Completed {
    /// Sends the outcomes; a waiter that stopped waiting (timeout, dropped ticket) is ignored.
    pub(crate) fn notify(self) {
        match self.waiter {
            Waiter::One(sender) => {
                if let Some(outcome) = self.outcomes.into_iter().next() {
                    let _ = sender.send(outcome);
                }
            }
            Waiter::Many(sender) => {
                let _ = sender.send(self.outcomes);
            }
        }
    }
}

/// Converts a confirm status into a message outcome.
pub(crate) fn outcome_of(status: &ConfirmStatus) -> Outcome {
    match status {
        ConfirmStatus::Confirmed(durability) => Ok(*durability),
        ConfirmStatus::Refused {
            code: ErrorCode::Backpressure,
            reason,
        } => Err(ClientError::Backpressure {
            reason: reason.clone(),
        }),
        ConfirmStatus::Refused { code, reason } => Err(ClientError::PublishRefused {
            code: *code,
            reason: reason.clone(),
        }),
        ConfirmStatus::Duplicate => Err(ClientError::Duplicate),
    }
}

const TWICE: &str = "sequence number confirmed twice";

/// Pending publishes by first sequence number.
#[derive(Debug)]
pub(crate) struct ConfirmTracker {
    next_seq: u64,
    entries: BTreeMap<u64, Entry>,
}

impl ConfirmTracker {
    /// No publish sent yet; the first gets sequence number 1.
    pub(crate) fn new() -> ConfirmTracker {
        ConfirmTracker {
            next_seq: 1,
            entries: BTreeMap::new(),
        }
    }

    /// Registers a frame of `n_messages` publishes about to be written; returns its first
    /// sequence number. Must be called in socket order.
    pub(crate) fn register(&mut self, n_messages: usize, waiter: Waiter, permits: Permits) -> u64 {
        assert!(
            n_messages >= 1,
            "a publish frame carries at least one message"
        );
        assert!(
            matches!(waiter, Waiter::Many(_)) || n_messages == 1,
            "a single waiter waits for one message"
        );
        let first_seq = self.next_seq;
        self.next_seq += n_messages as u64;
        let entry = Entry {
            outcomes: (0..n_messages).map(|_| None).collect(),
            n_left: n_messages,
            waiter,
            _permits: permits,
        };
        self.entries.insert(first_seq, entry);
        first_seq
    }

    /// Number of publish frames waiting for a confirm.
    #[cfg(test)]
    pub(crate) fn n_pending(&self) -> usize {
        self.entries.len()
    }

    /// Applies one confirm range. `Err` if the server confirmed a number never sent or
    /// confirmed one twice: a protocol violation that ends the connection.
    pub(crate) fn apply(
        &mut self,
        range: &ConfirmRange,
        completed: &mut Vec<Completed>,
    ) -> Result<(), &'static str> {
        if range.first_seq > range.last_seq
            || range.first_seq == 0
            || range.last_seq >= self.next_seq
        {
            return Err("confirm range outside the sequence numbers published");
        }
        let mut seq = range.first_seq;
        while seq <= range.last_seq {
            let Some((&first_seq, entry)) = self.entries.range_mut(..=seq).next_back() else {
                return Err(TWICE);
            };
            let end_seq = first_seq + entry.outcomes.len() as u64 - 1;
            if end_seq < seq {
                return Err(TWICE);
            }
            let last = end_seq.min(range.last_seq);
            for slot in
                &mut entry.outcomes[(seq - first_seq) as usize..=(last - first_seq) as usize]
            {
                if slot.is_some() {
                    return Err(TWICE);
                }
                *slot = Some(outcome_of(&range.status));
                entry.n_left -= 1;
            }
            if entry.n_left == 0 {
                let entry = self.entries.remove(&first_seq).expect("entry found above");
                completed.push(Completed {
                    waiter: entry.waiter,
                    outcomes: entry
                        .outcomes
                        .into_iter()
                        .map(|outcome| outcome.expect("all set"))
                        .collect(),
                    _permits: entry._permits,
                });
            }
            seq = last + 1;
        }
        Ok(())
    }

    /// Fails every unconfirmed publish with `err` (connection over); confirmed messages of a
    /// partly confirmed batch keep their outcome.
    pub(crate) fn fail_all(&mut self, err: &ClientError) -> Vec<Completed> {
        std::mem::take(&mut self.entries)
            .into_values()
            .map(|entry| Completed {
                waiter: entry.waiter,
                outcomes: entry
                    .outcomes
                    .into_iter()
                    .map(|outcome| outcome.unwrap_or_else(|| Err(err.clone())))
                    .collect(),
                _permits: entry._permits,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::sync::Semaphore;

    fn range(first_seq: u64, last_seq: u64, status: ConfirmStatus) -> ConfirmRange {
        ConfirmRange {
            first_seq,
            last_seq,
            status,
        }
    }

    const FSYNCED: ConfirmStatus = ConfirmStatus::Confirmed(Durability::Fsynced);

    fn apply(tracker: &mut ConfirmTracker, confirm: ConfirmRange) -> Result<usize, &'static str> {
        let mut completed = Vec::new();
        tracker.apply(&confirm, &mut completed)?;
        let n_completed = completed.len();
        completed.into_iter().for_each(Completed::notify);
        Ok(n_completed)
    }

    #[test]
    fn sequence_numbers_start_at_one_and_a_batch_consumes_one_per_message() {
        let mut tracker = ConfirmTracker::new();
        assert_eq!(
            tracker.register(1, Waiter::One(oneshot::channel().0), Vec::new()),
            1
        );
        assert_eq!(
            tracker.register(3, Waiter::Many(oneshot::channel().0), Vec::new()),
            2
        );
        assert_eq!(
            tracker.register(1, Waiter::One(oneshot::channel().0), Vec::new()),
            5
        );
        assert_eq!(tracker.n_pending(), 3);
    }

    #[test]
    fn ranges_spanning_frames_and_splitting_batches_complete_each_waiter_once() {
        let mut tracker = ConfirmTracker::new();
        let (one_tx, mut one_rx) = oneshot::channel();
        let (batch_tx, mut batch_rx) = oneshot::channel();
        let (last_tx, mut last_rx) = oneshot::channel();
        tracker.register(1, Waiter::One(one_tx), Vec::new());
        tracker.register(4, Waiter::Many(batch_tx), Vec::new());
        tracker.register(1, Waiter::One(last_tx), Vec::new());
        // Out of order: the tail of the batch and the last single first.
        let refused = ConfirmStatus::Refused {
            code: ErrorCode::Backpressure,
            reason: "full".into(),
        };
        assert_eq!(apply(&mut tracker, range(4, 6, refused)), Ok(1));
        assert!(last_rx.try_recv().unwrap().is_err());
        assert!(
            batch_rx.try_recv().is_err(),
            "batch still waits for 2 and 3"
        );
        assert_eq!(apply(&mut tracker, range(1, 3, FSYNCED)), Ok(2));
        assert_eq!(one_rx.try_recv().unwrap().unwrap(), Durability::Fsynced);
        let outcomes = batch_rx.try_recv().unwrap();
        assert_eq!(outcomes.len(), 4);
        assert!(outcomes[0].is_ok() && outcomes[1].is_ok());
        assert!(matches!(outcomes[2], Err(ClientError::Backpressure { .. })));
        assert!(matches!(outcomes[3], Err(ClientError::Backpressure { .. })));
        assert_eq!(tracker.n_pending(), 0);
    }

    #[test]
    fn refusals_map_to_typed_errors() {
        let refused = ConfirmStatus::Refused {
            code: ErrorCode::NotFound,
            reason: "no exchange".into(),
        };
        assert!(matches!(
            outcome_of(&refused),
            Err(ClientError::PublishRefused {
                code: ErrorCode::NotFound,
                ..
            })
        ));
        assert!(matches!(
            outcome_of(&ConfirmStatus::Duplicate),
            Err(ClientError::Duplicate)
        ));
        assert_eq!(
            outcome_of(&ConfirmStatus::Confirmed(Durability::InMemory)).unwrap(),
            Durability::InMemory
        );
    }

    #[test]
    fn confirming_unsent_or_twice_is_a_protocol_violation() {
        let mut tracker = ConfirmTracker::new();
        tracker.register(2, Waiter::Many(oneshot::channel().0), Vec::new());
        assert!(
            apply(&mut tracker, range(1, 3, FSYNCED)).is_err(),
            "3 was never sent"
        );
        assert!(
            apply(&mut tracker, range(0, 1, FSYNCED)).is_err(),
            "0 is never a sequence number"
        );
        assert!(
            apply(&mut tracker, range(2, 1, FSYNCED)).is_err(),
            "reversed range"
        );
        assert_eq!(apply(&mut tracker, range(1, 1, FSYNCED)), Ok(0));
        assert!(
            apply(&mut tracker, range(1, 1, FSYNCED)).is_err(),
            "1 confirmed twice inside a batch"
        );
        assert_eq!(apply(&mut tracker, range(2, 2, FSYNCED)), Ok(1));
        assert!(
            apply(&mut tracker, range(2, 2, FSYNCED)).is_err(),
            "2 confirmed after its batch completed"
        );
    }

    #[test]
    fn fail_all_keeps_confirmed_outcomes_and_releases_window_permits() {
        let window = Arc::new(Semaphore::new(4));
        let mut tracker = ConfirmTracker::new();
        let (batch_tx, mut batch_rx) = oneshot::channel();
        let permits = vec![window.clone().try_acquire_many_owned(3).unwrap()];
        tracker.register(3, Waiter::Many(batch_tx), permits);
        assert_eq!(window.available_permits(), 1);
        assert_eq!(apply(&mut tracker, range(2, 2, FSYNCED)), Ok(0));
        let lost = ClientError::lost(std::io::ErrorKind::UnexpectedEof, "eof");
        tracker
            .fail_all(&lost)
            .into_iter()
            .for_each(Completed::notify);
        let outcomes = batch_rx.try_recv().unwrap();
        assert!(matches!(outcomes[0], Err(ClientError::ConnectionLost(_))));
        assert!(outcomes[1].is_ok());
        assert!(matches!(outcomes[2], Err(ClientError::ConnectionLost(_))));
        assert_eq!(window.available_permits(), 4);
        assert_eq!(tracker.n_pending(), 0);
    }
}
