//! The log positions a delivery loop has read and not finished (delivered or
//! dead-lettered), in log order: the oldest is the cursor, the gaps between them are what
//! an acknowledgement records as done.
//!
//! Positions are read in increasing order, so they are appended; a finished one is marked
//! and dropped once it reaches the front. Marks left behind a slow user's head are swept
//! out when they outnumber the positions still unfinished, so memory stays within a few
//! times the unfinished count and every operation is O(1) amortized, or O(log n) for the
//! binary search that finds a position. (A `BTreeSet` did the same with a node walk and
//! rebalancing for every event: 5 % of a drain's CPU.)

use std::collections::VecDeque;

use crate::store::Position;

/// Marks swept out at once at least (so that a sweep is rare with few positions).
const SWEEP_AT_LEAST: usize = 1024;

#[derive(Debug, Default)]
pub(super) struct Unfinished {
    /// Increasing positions, each with whether it is still unfinished (the front one is,
    /// or the deque is empty) and how far before it the record preceding it in the log
    /// starts (0: not known).
    slots: VecDeque<(Position, bool, u32)>,
    /// How many are unfinished.
    live: usize,
}

impl Unfinished {
    #[cfg(test)]
    pub(super) fn insert(&mut self, pos: Position) {
        self.insert_after(pos, None);
    }

    /// Inserts `pos`, knowing where the record just before it in the log starts (when
    /// known): an acknowledgement then records no finished range between the two if that
    /// record is unfinished too (with byte positions, `pos > previous + 1` says nothing).
    pub(super) fn insert_after(&mut self, pos: Position, previous: Option<Position>) {
        let after = previous
            .filter(|&p| p < pos)
            .and_then(|p| u32::try_from(pos - p).ok())
            .unwrap_or(0);
        match self.slots.back() {
            Some(&(last, _, _)) if last >= pos => {
                // Out of order (not done by the loop, which reads forward): keep the order.
                match self.slots.binary_search_by_key(&pos, |s| s.0) {
                    Ok(i) if !self.slots[i].1 => {
                        self.slots[i].1 = true;
                        self.live += 1;
                    }
                    Ok(_) => {}
                    Err(i) => {
                        self.slots.insert(i, (pos, true, 0));
                        self.live += 1;
                    }
                }
            }
            _ => {
                self.slots.push_back((pos, true, after));
                self.live += 1;
            }
        }
    }

    /// Marks `pos` finished; false when it was not unfinished.
    pub(super) fn remove(&mut self, pos: Position) -> bool {
        let Ok(i) = self.slots.binary_search_by_key(&pos, |s| s.0) else {
            return false;
        };
        if !std::mem::replace(&mut self.slots[i].1, false) {
            return false;
        }
        self.live -= 1;
        while self.slots.front().is_some_and(|s| !s.1) {
            self.slots.pop_front();
        }
        if self.slots.len() - self.live > self.live.max(SWEEP_AT_LEAST) {
            self.slots.retain(|s| s.1);
        }
        true
    }

    /// The oldest unfinished position.
    pub(super) fn first(&self) -> Option<Position> {
        self.slots.front().map(|s| s.0)
    }

    pub(super) fn len(&self) -> usize {
        self.live
    }

    /// The unfinished positions in increasing order.
    #[cfg(test)]
    pub(super) fn iter(&self) -> impl Iterator<Item = Position> + '_ {
        self.slots.iter().filter(|s| s.1).map(|s| s.0)
    }

    /// The unfinished positions in increasing order, each with where the record just
    /// before it in the log starts, when known.
    pub(super) fn iter_with_previous(
        &self,
    ) -> impl Iterator<Item = (Position, Option<Position>)> + '_ {
        self.slots
            .iter()
            .filter(|s| s.1)
            .map(|s| (s.0, (s.2 > 0).then(|| s.0 - u64::from(s.2))))
    }

    pub(super) fn clear(&mut self) {
        self.slots.clear();
        self.live = 0;
    }

    /// Slots held, marks included (for the tests' bound on memory).
    #[cfg(test)]
    fn slots(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[derive(Debug, Clone)]
    enum Op {
        /// Append the next position, this far past the last.
        Read(u8),
        /// Finish the unfinished position at this index (modulo their count).
        Finish(usize),
        /// Insert a position at or below the last one read (out of order).
        Back(u64),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (1u8..4).prop_map(Op::Read),
            8 => any::<usize>().prop_map(Op::Finish),
            1 => any::<u64>().prop_map(Op::Back),
            1 => Just(Op::Clear),
        ]
    }

    #[test]
    fn knows_which_unfinished_records_follow_each_other() {
        let mut u = Unfinished::default();
        u.insert_after(100, None);
        u.insert_after(130, Some(100));
        u.insert_after(170, Some(150));
        u.insert_after(90, Some(80)); // out of order: not kept
        let got: Vec<_> = u.iter_with_previous().collect();
        assert_eq!(
            got,
            vec![(90, None), (100, None), (130, Some(100)), (170, Some(150))]
        );
        assert!(u.remove(130));
        assert_eq!(
            u.iter_with_previous().map(|p| p.1).collect::<Vec<_>>(),
            vec![None, None, Some(150)]
        );
    }

    proptest! {
        /// Whatever the order of reads and finishes, it answers as an ordered set does,
        /// and holds at most about twice its unfinished positions (plus one sweep's worth).
        #[test]
        fn behaves_as_an_ordered_set(ops in proptest::collection::vec(op(), 1..600)) {
            let mut u = Unfinished::default();
            let mut model = BTreeSet::new();
            let mut last = 0u64;
            for op in ops {
                match op {
                    Op::Read(step) => {
                        last += u64::from(step);
                        u.insert(last);
                        model.insert(last);
                    }
                    Op::Finish(i) => {
                        let Some(&pos) = model.iter().nth(i % model.len().max(1)) else {
                            prop_assert!(!u.remove(last + 1));
                            continue;
                        };
                        prop_assert!(u.remove(pos));
                        model.remove(&pos);
                        prop_assert!(!u.remove(pos), "finished once");
                    }
                    Op::Back(p) => {
                        let pos = p % (last + 1);
                        u.insert(pos);
                        model.insert(pos);
                    }
                    Op::Clear => {
                        u.clear();
                        model.clear();
                    }
                }
                prop_assert_eq!(u.len(), model.len());
                prop_assert_eq!(u.first(), model.first().copied());
                prop_assert!(u.slots() <= 2 * u.len() + SWEEP_AT_LEAST + 1);
            }
            prop_assert_eq!(u.iter().collect::<Vec<_>>(), model.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_stuck_oldest_position_keeps_memory_bounded() {
        let mut u = Unfinished::default();
        u.insert(0);
        for p in 1..100_000 {
            u.insert(p);
            assert!(u.remove(p));
        }
        assert_eq!((u.len(), u.first()), (1, Some(0)));
        assert!(u.slots() <= SWEEP_AT_LEAST + 2, "{} slots", u.slots());
        assert!(u.remove(0));
        assert_eq!((u.len(), u.first(), u.slots()), (0, None, 0));
    }
}
