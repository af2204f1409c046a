//! [`TagRuns`]: a connection's lapsed delivery tags (deliveries that went back to their queue
//! while outstanding: a lapsed lease, a cancelled consumer), as runs of consecutive tags.
//!
//! Settling one of them later is a harmless no-op, not an unknown tag, so they are
//! remembered. A consumer cancelled with many deliveries outstanding lapses their tags
//! together, mostly consecutive: one run each, however many. The number of runs is capped
//! (the oldest forgotten first), which bounds memory against tags lapsing one by one with
//! gaps between them.

use std::collections::BTreeMap;

/// Delivery tags as disjoint, non-adjacent runs `first..=last`, keyed by `first`.
#[derive(Debug, Clone, Default)]
pub(crate) struct TagRuns {
    runs: BTreeMap<u64, u64>,
}

impl TagRuns {
    /// The run holding `tag`, if any: `(first, last)`.
    fn run_of(&self, tag: u64) -> Option<(u64, u64)> {
        let (&first, &last) = self.runs.range(..=tag).next_back()?;
        (tag <= last).then_some((first, last))
    }

    /// Whether `tag` is in.
    pub(crate) fn contains(&self, tag: u64) -> bool {
        self.run_of(tag).is_some()
    }

    /// Adds `tag`, merging it with the runs it touches; past `runs_max` runs, the oldest run
    /// is forgotten.
    pub(crate) fn insert(&mut self, tag: u64, runs_max: usize) {
        if self.contains(tag) {
            return;
        }
        let before = tag
            .checked_sub(1)
            .and_then(|previous| self.run_of(previous));
        let after = tag
            .checked_add(1)
            .and_then(|next| self.runs.get(&next).map(|&last| (next, last)));
        let first = before.map_or(tag, |(first, _)| first);
        let last = after.map_or(tag, |(_, last)| last);
        if let Some((next, _)) = after {
            self.runs.remove(&next);
        }
        self.runs.insert(first, last);
        while self.runs.len() > runs_max {
            self.runs.pop_first();
        }
    }

    /// Removes `tag`; whether it was in.
    pub(crate) fn remove(&mut self, tag: u64) -> bool {
        self.remove_range(tag, tag)
    }

    /// Removes every tag in `first..=last`; whether any was in.
    pub(crate) fn remove_range(&mut self, first: u64, last: u64) -> bool {
        if first > last {
            return false;
        }
        // Runs overlapping the range: the one holding `first` (it may start before it), and
        // those starting inside it.
        let mut overlapping: Vec<(u64, u64)> = self.run_of(first).into_iter().collect();
        overlapping.extend(
            self.runs
                .range(first..=last)
                .map(|(&start, &end)| (start, end)),
        );
        overlapping.sort_unstable();
        overlapping.dedup();
        if overlapping.is_empty() {
            return false;
        }
        for (start, end) in overlapping {
            self.runs.remove(&start);
            if start < first {
                self.runs.insert(start, first - 1);
            }
            if end > last {
                self.runs.insert(last + 1, end);
            }
        }
        true
    }

    /// The highest tag in.
    pub(crate) fn last(&self) -> Option<u64> {
        self.runs.last_key_value().map(|(_, &last)| last)
    }

    /// Runs held.
    #[cfg(test)]
    pub(crate) fn n_runs(&self) -> usize {
        self.runs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn consecutive_tags_are_one_run_and_removal_splits_it() {
        let mut tags = TagRuns::default();
        for tag in (1..=100_000).rev() {
            tags.insert(tag, 4);
        }
        assert_eq!(tags.n_runs(), 1);
        assert!(tags.contains(1) && tags.contains(100_000) && !tags.contains(0));
        assert!(tags.remove(500));
        assert_eq!(tags.n_runs(), 2);
        assert!(!tags.contains(500) && tags.contains(499) && tags.contains(501));
        assert!(tags.remove_range(10, 20));
        assert!(!tags.remove_range(10, 20));
        assert_eq!(tags.last(), Some(100_000));
        // Past the cap, the oldest runs go.
        for tag in [200_002, 200_004, 200_006] {
            tags.insert(tag, 4);
        }
        assert_eq!(tags.n_runs(), 4);
        assert!(!tags.contains(1), "the oldest run was forgotten");
        assert!(tags.contains(200_006));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        Remove(u64),
        RemoveRange(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..64).prop_map(Op::Insert),
            1 => (0u64..64).prop_map(Op::Remove),
            1 => (0u64..64, 0u64..12).prop_map(|(first, n)| Op::RemoveRange(first, first + n)),
        ]
    }

    proptest! {
        /// Without the cap, the runs hold exactly the tags a plain set holds.
        #[test]
        fn runs_agree_with_a_set(ops in proptest::collection::vec(op(), 0..200)) {
            let mut runs = TagRuns::default();
            let mut set = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Insert(tag) => {
                        runs.insert(tag, usize::MAX);
                        set.insert(tag);
                    }
                    Op::Remove(tag) => prop_assert_eq!(runs.remove(tag), set.remove(&tag)),
                    Op::RemoveRange(first, last) => {
                        let inside: Vec<u64> = set.range(first..=last).copied().collect();
                        for tag in &inside {
                            set.remove(tag);
                        }
                        prop_assert_eq!(runs.remove_range(first, last), !inside.is_empty());
                    }
                }
                for tag in 0..80 {
                    prop_assert_eq!(runs.contains(tag), set.contains(&tag), "tag {}", tag);
                }
                prop_assert_eq!(runs.last(), set.last().copied());
                // Runs are disjoint and not adjacent (each is as long as it can be).
                let pairs: Vec<(u64, u64)> = runs.runs.iter().map(|(&a, &b)| (a, b)).collect();
                for pair in pairs.windows(2) {
                    prop_assert!(pair[0].1 + 1 < pair[1].0, "{:?}", pair);
                }
            }
        }
    }
}
