//! Confirm bookkeeping, sans-IO: which publish sequence numbers wait for which caller.
//!
//! The writer task registers each publish frame just before writing it (so numbering follows
//! the socket order); the reader task applies `Confirm` ranges. Every sequence number is
//! confirmed exactly once; ranges may arrive in any order and may cover parts of batches, so
//! a frame's waiter completes when the last of its sequence numbers is confirmed, while a
//! coalesced frame's messages ([`Waiter::Each`]) complete one by one.

use crate::error::ClientError;
use std::collections::BTreeMap;
use std::sync::Arc;
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
    /// A `PublishBatch` the writer coalesced from single publishes: each message has its own
    /// waiter and window permits, completed and released when that message is confirmed.
    Each(Vec<MessageWaiter>),
}

/// One message of a coalesced frame: who waits for it and the window room it holds.
#[derive(Debug)]
pub(crate) struct MessageWaiter {
    pub(crate) sender: oneshot::Sender<Outcome>,
    pub(crate) permits: [Option<OwnedSemaphorePermit>; 2],
}

/// Window permits held until the publish is confirmed (released on drop).
pub(crate) type Permits = Vec<OwnedSemaphorePermit>;

/// Adds `permit` to the permit of the same semaphore in `permits` (released once, not once per
/// message), or appends it.
pub(crate) fn merge_permit(permits: &mut Permits, permit: OwnedSemaphorePermit) {
    match permits
        .iter_mut()
        .find(|held| Arc::ptr_eq(held.semaphore(), permit.semaphore()))
    {
        Some(held) => held.merge(permit),
        None => permits.push(permit),
    }
}

#[derive(Debug)]
enum Pending {
    /// `Waiter::One` or `Waiter::Many`: outcomes collected until the last one.
    Frame {
        outcomes: Vec<Option<Outcome>>,
        waiter: Waiter,
    },
    /// `Waiter::Each`: a message's slot is emptied when it is confirmed.
    Each(Vec<Option<MessageWaiter>>),
}

#[derive(Debug)]
struct Entry {
    n_messages: usize,
    n_left: usize,
    pending: Pending,
    _permits: Permits,
}

/// Confirmed publishes: hand the outcomes to their waiters (outside the connection's lock).
#[derive(Debug)]
pub(crate) enum Completed {
    /// A frame whose every message is confirmed.
    Frame {
        waiter: Waiter,
        outcomes: Vec<Outcome>,
        _permits: Permits,
    },
    /// Messages of coalesced frames, with their window permits merged per semaphore.
    Messages {
        outcomes: Vec<(oneshot::Sender<Outcome>, Outcome)>,
        _permits: Permits,
    },
}

impl Completed {
    /// Sends the outcomes; a waiter that stopped waiting (timeout, dropped ticket) is ignored.
    pub(crate) fn notify(self) {
        match self {
            Completed::Frame {
                waiter, outcomes, ..
            } => match waiter {
                Waiter::One(sender) => {
                    if let Some(outcome) = outcomes.into_iter().next() {
                        let _ = sender.send(outcome);
                    }
                }
                Waiter::Many(sender) => {
                    let _ = sender.send(outcomes);
                }
                Waiter::Each(_) => unreachable!("coalesced frames complete per message"),
            },
            Completed::Messages { outcomes, .. } => {
                for (sender, outcome) in outcomes {
                    let _ = sender.send(outcome);
                }
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
        let pending = match waiter {
            Waiter::One(_) => {
                assert_eq!(n_messages, 1, "a single waiter waits for one message");
                Pending::Frame {
                    outcomes: vec![None],
                    waiter,
                }
            }
            Waiter::Many(_) => Pending::Frame {
                outcomes: (0..n_messages).map(|_| None).collect(),
                waiter,
            },
            Waiter::Each(waiters) => {
                assert_eq!(waiters.len(), n_messages, "one waiter per message");
                Pending::Each(waiters.into_iter().map(Some).collect())
            }
        };
        let first_seq = self.next_seq;
        self.next_seq += n_messages as u64;
        let entry = Entry {
            n_messages,
            n_left: n_messages,
            pending,
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
        let mut messages = Vec::new();
        let mut message_permits = Permits::new();
        let mut seq = range.first_seq;
        let result = loop {
            if seq > range.last_seq {
                break Ok(());
            }
            let Some((&first_seq, entry)) = self.entries.range_mut(..=seq).next_back() else {
                break Err(TWICE);
            };
            let end_seq = first_seq + entry.n_messages as u64 - 1;
            if end_seq < seq {
                break Err(TWICE);
            }
            let last = end_seq.min(range.last_seq);
            let slots = (seq - first_seq) as usize..=(last - first_seq) as usize;
            let applied = match &mut entry.pending {
                Pending::Frame { outcomes, .. } => {
                    outcomes[slots].iter_mut().try_for_each(|slot| {
                        if slot.is_some() {
                            return Err(TWICE);
                        }
                        *slot = Some(outcome_of(&range.status));
                        Ok(())
                    })
                }
                Pending::Each(waiters) => waiters[slots].iter_mut().try_for_each(|slot| {
                    let waiter = slot.take().ok_or(TWICE)?;
                    messages.push((waiter.sender, outcome_of(&range.status)));
                    waiter
                        .permits
                        .into_iter()
                        .flatten()
                        .for_each(|permit| merge_permit(&mut message_permits, permit));
                    Ok(())
                }),
            };
            if let Err(err) = applied {
                break Err(err);
            }
            entry.n_left -= (last - seq + 1) as usize;
            if entry.n_left == 0 {
                let entry = self.entries.remove(&first_seq).expect("entry found above");
                if let Pending::Frame { outcomes, waiter } = entry.pending {
                    completed.push(Completed::Frame {
                        waiter,
                        outcomes: outcomes
                            .into_iter()
                            .map(|outcome| outcome.expect("all set"))
                            .collect(),
                        _permits: entry._permits,
                    });
                }
            }
            seq = last + 1;
        };
        if !messages.is_empty() {
            completed.push(Completed::Messages {
                outcomes: messages,
                _permits: message_permits,
            });
        }
        result
    }

    /// Fails every unconfirmed publish with `err` (connection over); confirmed messages of a
    /// partly confirmed batch keep their outcome.
    pub(crate) fn fail_all(&mut self, err: &ClientError) -> Vec<Completed> {
        std::mem::take(&mut self.entries)
            .into_values()
            .map(|entry| match entry.pending {
                Pending::Frame { outcomes, waiter } => Completed::Frame {
                    waiter,
                    outcomes: outcomes
                        .into_iter()
                        .map(|outcome| outcome.unwrap_or_else(|| Err(err.clone())))
                        .collect(),
                    _permits: entry._permits,
                },
                Pending::Each(waiters) => {
                    let mut permits = entry._permits;
                    let outcomes = waiters
                        .into_iter()
                        .flatten()
                        .map(|waiter| {
                            waiter
                                .permits
                                .into_iter()
                                .flatten()
                                .for_each(|permit| merge_permit(&mut permits, permit));
                            (waiter.sender, Err(err.clone()))
                        })
                        .collect();
                    Completed::Messages {
                        outcomes,
                        _permits: permits,
                    }
                }
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
    fn coalesced_messages_complete_and_free_their_window_one_by_one() {
        let window = Arc::new(Semaphore::new(10));
        let connection_window = Arc::new(Semaphore::new(10));
        let mut tracker = ConfirmTracker::new();
        let mut receivers = Vec::new();
        let waiters = (0..3)
            .map(|_| {
                let (sender, receiver) = oneshot::channel();
                receivers.push(receiver);
                MessageWaiter {
                    sender,
                    permits: [
                        Some(window.clone().try_acquire_owned().unwrap()),
                        Some(connection_window.clone().try_acquire_owned().unwrap()),
                    ],
                }
            })
            .collect();
        assert_eq!(tracker.register(3, Waiter::Each(waiters), Vec::new()), 1);
        assert_eq!(window.available_permits(), 7);
        // The middle message first: it alone completes and gives its room back.
        assert_eq!(apply(&mut tracker, range(2, 2, FSYNCED)), Ok(1));
        assert_eq!(
            receivers[1].try_recv().unwrap().unwrap(),
            Durability::Fsynced
        );
        assert!(receivers[0].try_recv().is_err() && receivers[2].try_recv().is_err());
        assert_eq!(window.available_permits(), 8);
        assert_eq!(connection_window.available_permits(), 8);
        assert!(
            apply(&mut tracker, range(2, 2, FSYNCED)).is_err(),
            "2 confirmed twice"
        );
        let lost = ClientError::lost(std::io::ErrorKind::UnexpectedEof, "eof");
        tracker
            .fail_all(&lost)
            .into_iter()
            .for_each(Completed::notify);
        assert!(receivers[0].try_recv().unwrap().is_err());
        assert!(receivers[2].try_recv().unwrap().is_err());
        assert_eq!(window.available_permits(), 10);
        assert_eq!(connection_window.available_permits(), 10);
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
