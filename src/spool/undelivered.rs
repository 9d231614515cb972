//! Which stored events still wait for Kafka, in memory that does not grow with their number.
//!
//! Sequence numbers are given out in order, so the undelivered events are every seq in
//! `[floor, end)` minus those known **done**: acknowledged, or never stored (a group refused after a
//! failed write, a frame lost to damage). Done seqs are kept as merged ranges; acknowledgements
//! arrive nearly in order, so a backlog of millions of undelivered events is one range-free
//! stretch, and the ranges number about the events in flight. When each event was received is kept
//! as runs of seqs received in the same second, at most [`AGE_RUNS`] of them: past that, the step
//! doubles (runs of the same 2 s, 4 s, … merge, keeping the earlier time), so the age of the oldest
//! undelivered event is never understated, and overstated by less than the step — a backlog
//! received over a week keeps a step of 256 s. Bytes and types of undelivered events are not kept per event: segments keep the
//! bytes of what they store (an estimate for a partly delivered segment), and the offline status
//! counts types by reading the segments again.

use std::collections::{BTreeMap, VecDeque};

/// Most receipt-time runs kept (16 bytes each).
pub(super) const AGE_RUNS: usize = 4096;

/// The undelivered events' index.
#[derive(Debug, Clone)]
pub(super) struct Undelivered {
    /// Every seq below is done (delivered, or in a deleted segment).
    floor: u64,
    /// Every seq from here on is not given out yet.
    end: u64,
    /// Done seqs in `[floor, end)`: range start → range end (inclusive), merged.
    done: BTreeMap<u64, u64>,
    /// Seqs `done` covers.
    done_len: u64,
    /// (first seq, earliest receipt time) of runs of seqs received within one step, oldest first.
    ages: VecDeque<(u64, i64)>,
    /// Seconds a receipt-time run spans at most.
    age_step: i64,
}

impl Undelivered {
    /// An index in which every seq below `floor` is done and none at or above it is given out.
    pub(super) fn new(floor: u64) -> Undelivered {
        Undelivered { floor, end: floor, done: BTreeMap::new(), done_len: 0, ages: VecDeque::new(), age_step: 1 }
    }

    /// `seq` was stored, received at `received_at`. Seqs skipped since the last one were never
    /// stored: they are done. A seq below the end (out of order) only stops being done.
    pub(super) fn stored(&mut self, seq: u64, received_at: i64) {
        if seq < self.floor {
            return;
        }
        if seq < self.end {
            self.remove_done(seq);
        } else {
            if seq > self.end {
                self.insert_done(self.end, seq - 1);
            }
            self.end = seq + 1;
        }
        let step = self.age_step;
        match self.ages.back_mut() {
            Some((first, at)) if *first > seq => *at = (*at).min(received_at),
            Some((_, at)) if at.div_euclid(step) == received_at.div_euclid(step) => *at = (*at).min(received_at),
            _ => {
                self.ages.push_back((seq, received_at));
                while self.ages.len() > AGE_RUNS {
                    self.coarsen_ages();
                }
            }
        }
    }

    /// `a..=b` was acknowledged; returns how many of those seqs were undelivered.
    pub(super) fn ack(&mut self, a: u64, b: u64) -> u64 {
        let (a, b) = (a.max(self.floor), b.min(self.end.saturating_sub(1)));
        if a > b || self.end == self.floor {
            return 0;
        }
        let before = self.done_len;
        self.insert_done(a, b);
        self.done_len - before
    }

    /// Whether `seq` was stored and is not delivered.
    pub(super) fn contains(&self, seq: u64) -> bool {
        seq >= self.floor && seq < self.end && !self.is_done(seq)
    }

    /// Undelivered events.
    pub(super) fn len(&self) -> u64 {
        self.end - self.floor - self.done_len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Undelivered events in `[from, to)`.
    pub(super) fn count_in(&self, from: u64, to: u64) -> u64 {
        let (from, to) = (from.max(self.floor), to.min(self.end));
        if from >= to {
            return 0;
        }
        let mut done = 0;
        // The range that may start before `from`, then every one starting inside.
        let first = self.done.range(..from).next_back().map(|(&s, &e)| (s, e));
        for (s, e) in first.into_iter().chain(self.done.range(from..to).map(|(&s, &e)| (s, e))) {
            let (s, e) = (s.max(from), e.min(to - 1));
            if s <= e {
                done += e - s + 1;
            }
        }
        (to - from) - done
    }

    /// The oldest undelivered seq.
    pub(super) fn oldest(&self) -> Option<u64> {
        let mut seq = self.floor;
        // Done ranges are merged: at most one starts at or covers `seq`.
        if let Some((_, &e)) = self.done.range(..=seq).next_back().filter(|(_, &e)| e >= seq) {
            seq = e + 1;
        }
        (seq < self.end).then_some(seq)
    }

    /// When the oldest undelivered event was received (or earlier, within a merged run).
    pub(super) fn oldest_received_at(&self) -> Option<i64> {
        let seq = self.oldest()?;
        let i = self.ages.partition_point(|&(first, _)| first <= seq);
        self.ages.get(i.checked_sub(1)?).map(|&(_, at)| at)
    }

    /// Every seq below `floor` is gone (its segment was deleted): forgets what it knew of them.
    pub(super) fn raise_floor(&mut self, floor: u64) {
        let floor = floor.min(self.end);
        if floor <= self.floor {
            return;
        }
        // Every seq below the new floor must have been done: nothing undelivered is forgotten.
        debug_assert_eq!(self.count_in(self.floor, floor), 0, "raising the floor over undelivered events");
        let below: Vec<(u64, u64)> = self.done.range(..floor).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in below {
            self.done.remove(&s);
            self.done_len -= e - s + 1;
            if e >= floor {
                self.done.insert(floor, e);
                self.done_len += e - floor + 1;
            }
        }
        self.floor = floor;
        while self.ages.len() > 1 && self.ages[1].0 <= floor {
            self.ages.pop_front();
        }
    }

    fn is_done(&self, seq: u64) -> bool {
        self.done.range(..=seq).next_back().is_some_and(|(_, &e)| e >= seq)
    }

    /// Adds `a..=b` to the done ranges, merging.
    fn insert_done(&mut self, mut a: u64, mut b: u64) {
        if let Some((&s, &e)) = self.done.range(..=a).next_back() {
            if e.saturating_add(1) >= a {
                if e >= b {
                    return;
                }
                a = s;
                b = b.max(e);
                self.done.remove(&s);
                self.done_len -= e - s + 1;
            }
        }
        let overlapped: Vec<(u64, u64)> = self.done.range(a..=b.saturating_add(1)).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in overlapped {
            self.done.remove(&s);
            self.done_len -= e - s + 1;
            b = b.max(e);
        }
        self.done.insert(a, b);
        self.done_len += b - a + 1;
    }

    /// Takes `seq` out of the done ranges.
    fn remove_done(&mut self, seq: u64) {
        let Some((&s, &e)) = self.done.range(..=seq).next_back().filter(|(_, &e)| e >= seq) else { return };
        self.done.remove(&s);
        self.done_len -= e - s + 1;
        if s < seq {
            self.done.insert(s, seq - 1);
            self.done_len += seq - s;
        }
        if seq < e {
            self.done.insert(seq + 1, e);
            self.done_len += e - seq;
        }
    }

    /// Doubles the step: neighbouring runs within one step become one, starting where the first
    /// did, with the earlier time.
    fn coarsen_ages(&mut self) {
        self.age_step = self.age_step.saturating_mul(2);
        let step = self.age_step;
        for (first, at) in std::mem::take(&mut self.ages) {
            match self.ages.back_mut() {
                Some((_, prev)) if prev.div_euclid(step) == at.div_euclid(step) => *prev = (*prev).min(at),
                _ => self.ages.push_back((first, at)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_in_any_order_leave_exactly_the_rest() {
        let mut u = Undelivered::new(10);
        for seq in 10..20 {
            u.stored(seq, 100 + seq as i64);
        }
        // 20..22 burned by a failed group, then more stored.
        for seq in 23..30 {
            u.stored(seq, 200);
        }
        assert_eq!(u.len(), 17);
        assert_eq!(u.ack(12, 14), 3);
        assert_eq!(u.ack(13, 13), 0, "twice is once");
        assert_eq!(u.ack(20, 22), 0, "never stored, never counted");
        assert_eq!(u.ack(10, 10), 1);
        assert_eq!(u.len(), 13);
        assert_eq!(u.oldest(), Some(11));
        assert_eq!(u.oldest_received_at(), Some(111));
        assert_eq!(u.ack(11, 11), 1);
        assert_eq!(u.oldest(), Some(15));
        assert!(!u.contains(21) && !u.contains(12) && u.contains(15) && u.contains(29) && !u.contains(30));
        assert_eq!(u.count_in(10, 23), 5);
        assert_eq!(u.count_in(23, 100), 7);
        assert_eq!(u.ack(15, 29), 12);
        assert!(u.is_empty());
        assert_eq!(u.oldest(), None);
        u.raise_floor(30);
        assert_eq!((u.done.len(), u.ages.len() <= 1), (0, true), "nothing below the floor is kept");
    }

    #[test]
    fn memory_does_not_follow_the_backlog() {
        let mut u = Undelivered::new(1);
        for seq in 1..1_000_000u64 {
            // A new second every 10 events, acknowledged in order up to 600,000.
            u.stored(seq, (seq / 10) as i64);
        }
        assert_eq!(u.ack(1, 600_000), 600_000);
        assert_eq!(u.done.len(), 1);
        assert!(u.ages.len() <= AGE_RUNS);
        assert_eq!(u.len(), 999_999 - 600_000);
        // The oldest undelivered is 600,001, received at second 60,000: runs merged keep an earlier
        // time, never a later one, and earlier by less than the step (32 s for 100,000 seconds).
        let at = u.oldest_received_at().unwrap();
        assert!(at <= 60_000 && at > 60_000 - u.age_step, "{at} step {}", u.age_step);
        assert!(u.age_step <= 32, "{}", u.age_step);
    }

    #[test]
    fn a_seq_stored_out_of_order_is_undelivered_again() {
        let mut u = Undelivered::new(1);
        u.stored(1, 1);
        u.stored(5, 1);
        assert_eq!(u.len(), 2);
        u.stored(3, 1);
        assert_eq!(u.len(), 3);
        assert!(u.contains(3) && !u.contains(2) && !u.contains(4));
    }
}
