//! [`IdRuns`]: the log ids of a paged tail, oldest first, kept compact.
//!
//! A paged tail holds no messages in memory, only the ids of its logged ones (for a purge,
//! which settles them without reading the spool). A FIFO queue's ids are consecutive, one run
//! for millions of messages; a priority queue's levels interleave, so each level's ids have
//! gaps and most runs hold one id. Runs as `(u64, u64)` pairs would then cost 16 bytes per
//! paged message (160 MB for 10 M); encoded as varints they cost one or two bytes.
//!
//! Layout: the oldest run and the newest run are kept decoded (popping the front and pushing
//! the back are O(1)); the runs between them are bytes: per run, a varint of
//! `gap << 1 | single` (the gap from the previous run's end, at least 1; `single`: the run
//! holds one id) followed, unless single, by a varint of its length.

use std::collections::VecDeque;

/// Log ids, strictly increasing, as runs of consecutive ids (see the module docs).
#[derive(Debug, Clone, Default)]
pub(crate) struct IdRuns {
    /// The oldest run: (first id, how many, at least 1).
    front: Option<(u64, u64)>,
    /// The runs between `front` and `back`, encoded.
    middle: VecDeque<u8>,
    /// The end (last id + 1) of the run before `back`: the last one in `middle`, or `front`.
    middle_end: u64,
    /// The newest run, once there are two or more.
    back: Option<(u64, u64)>,
    /// Ids held.
    len: u64,
}

fn put_varint(bytes: &mut VecDeque<u8>, mut value: u64) {
    while value >= 0x80 {
        bytes.push_back((value as u8) | 0x80);
        value >>= 7;
    }
    bytes.push_back(value as u8);
}

fn take_varint(bytes: &mut VecDeque<u8>) -> u64 {
    let mut value = 0u64;
    let mut shift = 0;
    loop {
        let byte = bytes.pop_front().expect("encoded runs are whole");
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return value;
        }
        shift += 7;
    }
}

fn read_varint(bytes: &VecDeque<u8>, at: &mut usize) -> u64 {
    let mut value = 0u64;
    let mut shift = 0;
    loop {
        let byte = bytes[*at];
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return value;
        }
        shift += 7;
    }
}

impl IdRuns {
    /// Ids held.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Appends `id`, which must be larger than every id held.
    pub(crate) fn push(&mut self, id: u64) {
        self.len += 1;
        match (&mut self.front, &mut self.back) {
            (None, _) => self.front = Some((id, 1)),
            (Some((first, n)), None) => {
                assert!(id >= *first + *n, "ids are pushed in increasing order");
                if *first + *n == id {
                    *n += 1;
                } else {
                    self.middle_end = *first + *n;
                    self.back = Some((id, 1));
                }
            }
            (Some(_), Some((first, n))) => {
                assert!(id >= *first + *n, "ids are pushed in increasing order");
                if *first + *n == id {
                    *n += 1;
                } else {
                    let (run_first, run_n) = (*first, *n);
                    self.back = Some((id, 1));
                    let gap = run_first - self.middle_end;
                    put_varint(&mut self.middle, gap << 1 | u64::from(run_n == 1));
                    if run_n > 1 {
                        put_varint(&mut self.middle, run_n);
                    }
                    self.middle_end = run_first + run_n;
                }
            }
        }
    }

    /// Takes the oldest id.
    pub(crate) fn pop_front(&mut self) -> Option<u64> {
        let (first, n) = self.front?;
        self.len -= 1;
        self.front = if n > 1 {
            Some((first + 1, n - 1))
        } else if !self.middle.is_empty() {
            let tag = take_varint(&mut self.middle);
            let run_n = if tag & 1 == 1 {
                1
            } else {
                take_varint(&mut self.middle)
            };
            Some((first + 1 + (tag >> 1), run_n))
        } else {
            self.back.take()
        };
        Some(first)
    }

    /// The runs, oldest first: (first id, how many).
    pub(crate) fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let Some(front) = self.front else {
            return runs;
        };
        runs.push(front);
        let mut end = front.0 + front.1;
        let mut at = 0;
        while at < self.middle.len() {
            let tag = read_varint(&self.middle, &mut at);
            let n = if tag & 1 == 1 {
                1
            } else {
                read_varint(&self.middle, &mut at)
            };
            let first = end + (tag >> 1);
            runs.push((first, n));
            end = first + n;
        }
        runs.extend(self.back);
        runs
    }

    /// Bytes of the encoded runs (for tests and sizing).
    #[cfg(test)]
    pub(crate) fn encoded_bytes(&self) -> usize {
        self.middle.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn consecutive_ids_are_one_run_and_interleaved_ones_a_byte_each() {
        let mut fifo = IdRuns::default();
        for id in 0..1_000_000 {
            fifo.push(id);
        }
        assert_eq!(fifo.runs(), vec![(0, 1_000_000)]);
        assert_eq!(fifo.encoded_bytes(), 0);
        // One priority level of ten in turn: every tenth id.
        let mut level = IdRuns::default();
        for id in (3..1_000_000).step_by(10) {
            level.push(id);
        }
        assert_eq!(level.len(), 100_000);
        assert_eq!(
            level.encoded_bytes(),
            100_000 - 2,
            "one byte per middle run"
        );
        assert_eq!(level.pop_front(), Some(3));
        assert_eq!(level.pop_front(), Some(13));
    }

    proptest! {
        /// Whatever the gaps and the interleaving of pushes and pops, the ids come back in
        /// order, the runs are exactly the maximal runs of the ids held, and the length is
        /// right.
        #[test]
        fn behaves_as_a_queue_of_ids(
            steps in prop::collection::vec((any::<bool>(), 0u64..3, 1u64..300), 1..400),
        ) {
            let mut runs = IdRuns::default();
            let mut model: VecDeque<u64> = VecDeque::new();
            let mut next = 0u64;
            for (pop, kind, gap) in steps {
                if pop {
                    prop_assert_eq!(runs.pop_front(), model.pop_front());
                } else {
                    // Mostly consecutive, sometimes small gaps, sometimes huge ones.
                    next += match kind {
                        0 => 1,
                        1 => gap,
                        _ => gap << 40,
                    };
                    runs.push(next);
                    model.push_back(next);
                }
                prop_assert_eq!(runs.len(), model.len() as u64);
                let mut expected: Vec<(u64, u64)> = Vec::new();
                for &id in &model {
                    match expected.last_mut() {
                        Some((first, n)) if *first + *n == id => *n += 1,
                        _ => expected.push((id, 1)),
                    }
                }
                prop_assert_eq!(runs.runs(), expected);
            }
        }
    }
}
