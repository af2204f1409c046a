//! A connection's outstanding (delivered, unacked) deliveries, by delivery tag.
//!
//! Tags are issued in increasing order, so entries are appended at the back and stay sorted;
//! lookups are a binary search (or O(1) for the oldest, the common in-order ack). A settled
//! entry becomes a tombstone; tombstones at the front are popped at once, and the whole deque
//! is compacted when tombstones outnumber live entries, so a stuck old delivery cannot make
//! memory grow with every later one. Amortized O(1) per insert and in-order settle.

use std::collections::VecDeque;

#[derive(Debug, Clone)]
pub(crate) struct Outstanding<T> {
    entries: VecDeque<(u64, Option<T>)>,
    live: usize,
    /// What the live entries weigh (their message bytes, for the server's memory budget).
    bytes: u64,
}

/// What an entry weighs in bytes (its message's body and overhead).
pub(crate) trait Weighed {
    fn weight(&self) -> u64;
}

impl Weighed for u64 {
    fn weight(&self) -> u64 {
        *self
    }
}

#[cfg(test)]
impl Weighed for () {
    fn weight(&self) -> u64 {
        0
    }
}

impl<T> Default for Outstanding<T> {
    fn default() -> Self {
        Outstanding {
            entries: VecDeque::new(),
            live: 0,
            bytes: 0,
        }
    }
}

/// Compaction happens only past this many entries, so small deques never pay for it.
const COMPACT_MIN_ENTRIES: usize = 64;

impl<T: Weighed> Outstanding<T> {
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    /// What the live entries weigh.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(crate) fn insert(&mut self, tag: u64, value: T) {
        if let Some((last, _)) = self.entries.back() {
            assert!(*last < tag, "delivery tags increase");
        }
        self.bytes += value.weight();
        self.entries.push_back((tag, Some(value)));
        self.live += 1;
    }

    fn position(&self, tag: u64) -> Option<usize> {
        match self.entries.front() {
            Some((front, _)) if *front == tag => Some(0),
            _ => self
                .entries
                .binary_search_by_key(&tag, |(entry_tag, _)| *entry_tag)
                .ok(),
        }
    }

    pub(crate) fn contains(&self, tag: u64) -> bool {
        self.position(tag)
            .is_some_and(|idx| self.entries[idx].1.is_some())
    }

    pub(crate) fn get_mut(&mut self, tag: u64) -> Option<&mut T> {
        let idx = self.position(tag)?;
        self.entries[idx].1.as_mut()
    }

    pub(crate) fn remove(&mut self, tag: u64) -> Option<T> {
        let idx = self.position(tag)?;
        let value = self.entries[idx].1.take()?;
        self.live -= 1;
        self.bytes -= value.weight();
        self.tidy();
        Some(value)
    }

    /// Removes and returns every live entry with a tag in `first..=last`, in tag order.
    pub(crate) fn remove_range(&mut self, first: u64, last: u64) -> Vec<(u64, T)> {
        let start = self.entries.partition_point(|(tag, _)| *tag < first);
        let end = self.entries.partition_point(|(tag, _)| *tag <= last);
        let mut out = Vec::new();
        for idx in start..end {
            let (tag, slot) = &mut self.entries[idx];
            if let Some(value) = slot.take() {
                out.push((*tag, value));
            }
        }
        self.live -= out.len();
        self.bytes -= out.iter().map(|(_, value)| value.weight()).sum::<u64>();
        self.tidy();
        out
    }

    /// Removes and returns every live entry matching `pred`, in tag order.
    pub(crate) fn remove_where(&mut self, mut pred: impl FnMut(&T) -> bool) -> Vec<(u64, T)> {
        let mut out = Vec::new();
        for (tag, slot) in self.entries.iter_mut() {
            if slot.as_ref().is_some_and(&mut pred) {
                out.push((*tag, slot.take().expect("checked")));
            }
        }
        self.live -= out.len();
        self.bytes -= out.iter().map(|(_, value)| value.weight()).sum::<u64>();
        self.tidy();
        out
    }

    /// Every live entry, in tag order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().filter_map(|(_, slot)| slot.as_ref())
    }

    /// Every slot (tag, live entry or tombstone) in storage order, for the invariant checks.
    pub(crate) fn slots_iter(&self) -> impl Iterator<Item = (u64, Option<&T>)> {
        self.entries.iter().map(|(tag, slot)| (*tag, slot.as_ref()))
    }

    /// Breaks the cached live count on purpose (invariant check tests).
    #[cfg(test)]
    pub(crate) fn corrupt_len(&mut self) {
        self.live += 1;
    }

    /// Every live entry, in tag order, leaving this empty.
    pub(crate) fn drain(&mut self) -> Vec<(u64, T)> {
        self.live = 0;
        self.bytes = 0;
        self.entries
            .drain(..)
            .filter_map(|(tag, slot)| slot.map(|value| (tag, value)))
            .collect()
    }

    fn tidy(&mut self) {
        while matches!(self.entries.front(), Some((_, None))) {
            self.entries.pop_front();
        }
        if self.entries.len() > COMPACT_MIN_ENTRIES && self.entries.len() > 2 * self.live {
            self.entries.retain(|(_, slot)| slot.is_some());
        }
        debug_assert_eq!(
            self.live,
            self.entries
                .iter()
                .filter(|(_, slot)| slot.is_some())
                .count()
        );
    }

    #[cfg(test)]
    fn slots(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_entries_weight_follows_every_way_they_leave() {
        let mut outstanding: Outstanding<u64> = Outstanding::default();
        for tag in 1..=10 {
            outstanding.insert(tag, 100 * tag);
        }
        assert_eq!(outstanding.bytes(), 5_500);
        outstanding.remove(1);
        assert_eq!(outstanding.bytes(), 5_400);
        outstanding.remove_range(2, 3);
        assert_eq!(outstanding.bytes(), 4_900);
        outstanding.remove_where(|weight| *weight == 1_000);
        assert_eq!(outstanding.bytes(), 3_900);
        outstanding.drain();
        assert_eq!(outstanding.bytes(), 0);
    }

    #[test]
    fn in_order_settles_pop_from_the_front_and_ranges_skip_settled_tags() {
        let mut outstanding = Outstanding::default();
        for tag in 1..=10u64 {
            outstanding.insert(tag, tag * 10);
        }
        assert_eq!(outstanding.remove(1), Some(10));
        assert_eq!(outstanding.remove(1), None);
        assert_eq!(outstanding.remove(5), Some(50));
        let taken: Vec<u64> = outstanding
            .remove_range(3, 7)
            .into_iter()
            .map(|(tag, _)| tag)
            .collect();
        assert_eq!(taken, vec![3, 4, 6, 7]);
        assert!(outstanding.contains(2) && !outstanding.contains(3));
        assert_eq!(outstanding.len(), 4);
        let even: Vec<u64> = outstanding
            .remove_where(|value| value % 20 == 0)
            .into_iter()
            .map(|(tag, _)| tag)
            .collect();
        assert_eq!(even, vec![2, 8, 10]);
        assert_eq!(
            outstanding
                .drain()
                .into_iter()
                .map(|(tag, _)| tag)
                .collect::<Vec<_>>(),
            vec![9]
        );
        assert_eq!(outstanding.len(), 0);
    }

    #[test]
    fn a_stuck_old_delivery_does_not_grow_memory_with_every_later_one() {
        let mut outstanding = Outstanding::default();
        outstanding.insert(1, ());
        for tag in 2..100_000u64 {
            outstanding.insert(tag, ());
            outstanding.remove(tag);
        }
        assert_eq!(outstanding.len(), 1);
        assert!(
            outstanding.slots() <= 2 * COMPACT_MIN_ENTRIES,
            "slots: {}",
            outstanding.slots()
        );
    }

    #[test]
    #[should_panic(expected = "delivery tags increase")]
    fn tags_out_of_order_are_a_broken_invariant() {
        let mut outstanding = Outstanding::default();
        outstanding.insert(5, ());
        outstanding.insert(4, ());
    }
}
