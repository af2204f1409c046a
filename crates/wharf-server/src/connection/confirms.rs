//! Confirms: publish outcomes merged into ranges, and what the log's completion of a batch
//! sends (confirms and the responses of durable topology changes, or their refusals).

use super::*;

/// Builds confirm ranges: consecutive sequence numbers with the same outcome share a range.
#[derive(Default)]
pub(super) struct Confirms {
    pub(super) ranges: Vec<ConfirmRange>,
}

impl Confirms {
    pub(super) fn push(&mut self, seq: u64, status: ConfirmStatus) {
        if let Some(last) = self.ranges.last_mut()
            && last.last_seq + 1 == seq
            && last.status == status
        {
            last.last_seq = seq;
            return;
        }
        self.ranges.push(ConfirmRange {
            first_seq: seq,
            last_seq: seq,
            status,
        });
    }
}

/// What the log's completion must do for one batch: confirm the durable publishes and send
/// the responses of durable topology changes.
#[derive(Default)]
pub(super) struct Deferred {
    pub(super) seqs: Vec<u64>,
    pub(super) frames: Vec<Frame>,
}

pub(super) fn durability_of(coverage: SyncCoverage) -> Durability {
    match coverage {
        SyncCoverage::Fsynced => Durability::Fsynced,
        SyncCoverage::IntervalPending | SyncCoverage::Unsynced => Durability::UnsafeNotSynced,
    }
}

/// The error a client sees for a batch the log refused. Only a failure of the log itself is
/// `Internal`; a refusal of this one batch (disk full, too large, overloaded) says so.
pub(super) fn refusal_of(err: &WalError) -> (ErrorCode, String) {
    match err {
        WalError::StorageFull { .. } => (ErrorCode::ResourceLimit, format!("disk full: {err}")),
        WalError::RecordTooLarge { .. } | WalError::BatchTooLarge { .. } => (
            ErrorCode::ResourceLimit,
            format!("too large for the write-ahead log: {err}"),
        ),
        WalError::Overloaded { .. } => (ErrorCode::Backpressure, format!("log overloaded: {err}")),
        _ => (
            ErrorCode::Internal,
            format!("the write-ahead log failed: {err}"),
        ),
    }
}

impl Deferred {
    pub(super) fn complete(self, outbox: &Outbox, in_flight: &InFlight, outcome: Outcome) {
        let n_seqs = self.seqs.len() as u64;
        let mut confirms = Confirms::default();
        let status = match &outcome {
            Ok(coverage) => ConfirmStatus::Confirmed(durability_of(*coverage)),
            Err(err) => {
                let (code, reason) = refusal_of(err);
                ConfirmStatus::Refused { code, reason }
            }
        };
        for seq in self.seqs {
            confirms.push(seq, status.clone());
        }
        if !confirms.ranges.is_empty() {
            outbox.push_frame(Frame::Confirm(Confirm {
                ranges: confirms.ranges,
            }));
        }
        for frame in self.frames {
            match (&outcome, frame) {
                (Err(err), Frame::Response { correlation_id, .. }) => {
                    let (code, reason) = refusal_of(err);
                    let message = format!("applied in memory but not logged: {reason}");
                    outbox.push_frame(Frame::Response {
                        correlation_id,
                        response: Response::Error { code, message },
                    });
                }
                (_, frame) => outbox.push_frame(frame),
            }
        }
        if n_seqs > 0 {
            in_flight.count.fetch_sub(n_seqs, Ordering::AcqRel);
            in_flight.confirmed.notify_waiters();
        }
    }
}

pub(super) fn refused(code: ErrorCode, reason: impl Into<String>) -> ConfirmStatus {
    ConfirmStatus::Refused {
        code,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_merge_consecutive_equal_outcomes_into_ranges() {
        let mut confirms = Confirms::default();
        let ok = ConfirmStatus::Confirmed(Durability::InMemory);
        let refused = ConfirmStatus::Refused {
            code: ErrorCode::NotFound,
            reason: "x".into(),
        };
        for seq in 1..=3 {
            confirms.push(seq, ok.clone());
        }
        confirms.push(4, refused.clone());
        confirms.push(5, ok.clone());
        confirms.push(7, ok.clone());
        let ranges: Vec<(u64, u64)> = confirms
            .ranges
            .iter()
            .map(|range| (range.first_seq, range.last_seq))
            .collect();
        assert_eq!(ranges, vec![(1, 3), (4, 4), (5, 5), (7, 7)]);
    }

    #[test]
    fn a_refusal_of_one_batch_is_not_reported_as_an_internal_failure() {
        let code = |err: WalError| refusal_of(&err).0;
        assert_eq!(
            code(WalError::RecordTooLarge { bytes: 9, limit: 8 }),
            ErrorCode::ResourceLimit
        );
        assert_eq!(
            code(WalError::BatchTooLarge {
                records: 1,
                bytes: 9
            }),
            ErrorCode::ResourceLimit
        );
        assert_eq!(
            code(WalError::Overloaded {
                pending_bytes: 9,
                limit: 8
            }),
            ErrorCode::Backpressure
        );
        assert_eq!(code(WalError::Closed), ErrorCode::Internal);
    }
}
