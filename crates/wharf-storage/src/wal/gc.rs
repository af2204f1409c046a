//! Garbage collection: the owner releases records, and the writer thread deletes sealed
//! segments with no live record left and rolls a dead active segment (so that it can be
//! deleted too), between groups.

use crate::error::WalError;
use crate::format::Lsn;

use super::commit::Tail;
use super::{Index, lock};

/// What the writer thread does next to reclaim space.
enum GcJob {
    /// Delete the sealed segment at this base: none of its records is live.
    Delete(u64),
    /// Roll the active segment: it holds no live record and at least
    /// `roll_dead_active_bytes`; once sealed, it is deleted like any other.
    RollActive,
}

impl Index {
    /// Marks the record at `lsn` dead. Returns whether the writer thread has GC work now: a
    /// sealed segment with no live record, or a dead active segment of at least
    /// `roll_dead_active_bytes`.
    pub(super) fn release(
        &mut self,
        lsn: Lsn,
        roll_dead_active_bytes: u64,
    ) -> Result<bool, WalError> {
        let active = self.active;
        let segment = self
            .segment_of_mut(lsn.0)
            .ok_or(WalError::UnknownLsn { lsn })?;
        if !segment.release(lsn.0) {
            return Err(WalError::AlreadyReleased { lsn });
        }
        Ok(segment.n_live == 0
            && (segment.base != active || segment.disk_bytes() >= roll_dead_active_bytes))
    }
}

impl Tail {
    /// The first dead sealed segment, else a dead active segment worth rolling.
    fn next_gc_job(&self) -> Option<GcJob> {
        let index = lock(&self.shared.index);
        let config = &self.shared.config;
        for segment in index.segments.values() {
            if segment.base == index.active {
                continue;
            }
            if segment.n_live == 0 {
                return Some(GcJob::Delete(segment.base));
            }
        }
        let active = &index.segments[&index.active];
        if active.n_records > 0
            && active.n_live == 0
            && active.disk_bytes() >= config.roll_dead_active_bytes
        {
            return Some(GcJob::RollActive);
        }
        None
    }

    /// Deletes dead sealed segments and rolls a dead active segment until none is left, or
    /// until a step fails (retried on the next release that wants GC).
    pub(super) fn collect_garbage(&mut self) {
        while !self.poisoned() {
            let Some(job) = self.next_gc_job() else {
                return;
            };
            let outcome = match job {
                GcJob::Delete(base) => self.delete_segment(base),
                GcJob::RollActive => self.roll(),
            };
            if let Err(error) = outcome {
                tracing::warn!(%error, "WAL garbage collection stopped; retried on the next release");
                return;
            }
        }
    }

    /// Deletes the sealed segment at `base` (none of its records is live).
    fn delete_segment(&mut self, base: u64) -> Result<(), WalError> {
        // A record is released because a later one supersedes it (an ack, a checkpoint's end).
        // Under `interval` and `never` that later record may still be unsynced: fsync it first,
        // or a power cut could keep the deletion and lose what superseded the deleted records
        // (a whole topology, when the lost record is a checkpoint's end).
        if self.write_lsn > self.durable_lsn || self.poisoned() {
            self.sync_active()?;
        }
        let segment = {
            let mut index = lock(&self.shared.index);
            assert_ne!(base, index.active, "the active segment is never deleted");
            index
                .segments
                .remove(&base)
                .expect("GC job names an indexed segment")
        };
        if let Err(error) = self.shared.storage.remove(&segment.path) {
            // Harmless: recovery replays its records again as live; the owner re-releases them.
            tracing::warn!(%error, path = %segment.path.display(), "could not remove dead segment");
        }
        self.sync_dir(base)
    }
}
