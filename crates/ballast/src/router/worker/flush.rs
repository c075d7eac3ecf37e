//! Fuller batches for destinations with a `flush_interval` (the `postgres` warehouse: one
//! transaction per batch, so few large ones beat many small ones). While fewer than
//! `batch_size` events are ready, nothing is sent until `batch_size` are or the wait
//! began `flush_interval` ago; then the batch goes with what is ready. Only sending is
//! delayed, so per-user order and every acknowledgement rule stay as they are.
//!
//! The bound is the oldest event's, not the wait's: a wait begins when the oldest ready
//! head was read (`reads` keeps when each read of the log came back), so a user that
//! was busy when a wait ended (its earlier load still in flight), or a backlog's last
//! partial batch, goes as soon as it is ready if its head was read `flush_interval` ago.
//! Without this, what those users had queued waited a whole new `flush_interval`, then
//! the few left behind again another (the last 8,812 of a 500,000-event backlog took
//! 30 s, their last 9 another 60 s).
//!
//! Cost: how many events are ready is counted once when a wait begins (a walk of the
//! ready users, stopping at `batch_size` events: no more than building the batch would
//! take), then only kept up to date by adding what is read meanwhile and the queues of
//! users that become ready again (a hot user whose load just committed: its next batch
//! goes at once). It may count events twice or of a user busy meanwhile (a batch goes a
//! little early): the bound holds either way.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::queue::{Origin, UserState};
use super::Worker;
use crate::router::retry::deadline_after;
use crate::store::Position;

pub(super) struct Filling {
    interval: Duration,
    /// When the current wait began (None: not waiting).
    since: Option<Instant>,
    /// Events ready, about, since the wait began.
    ready: usize,
    /// When the log was read: (the position after a read, when it came back), oldest
    /// first, for the reads whose events are not all finished.
    reads: VecDeque<(Position, Instant)>,
}

/// Read times kept at most: past it, a read is counted as the last one kept (its events
/// look older than they are and go a little early, never late).
const MAX_READS: usize = 4096;

impl Filling {
    pub(super) fn new(interval: Option<Duration>) -> Option<Filling> {
        interval.map(|interval| Filling {
            interval,
            since: None,
            ready: 0,
            reads: VecDeque::new(),
        })
    }

    /// `n` events may have become ready: one read into a queue, or a user's queue
    /// ready again (its delivery finished, its retry timer fired).
    pub(super) fn add(&mut self, n: usize) {
        if self.since.is_some() {
            self.ready += n;
        }
    }

    /// A read of the log up to `next` came back now; reads wholly before `unfinished`
    /// (the oldest event not finished) are forgotten.
    pub(super) fn note_read(&mut self, next: Position, unfinished: Option<Position>) {
        if let Some(u) = unfinished {
            while self.reads.front().is_some_and(|r| r.0 <= u) {
                self.reads.pop_front();
            }
        }
        let full = self.reads.len() >= MAX_READS;
        match self.reads.back_mut() {
            Some(last) if full => last.0 = last.0.max(next),
            _ => self.reads.push_back((next, Instant::now())),
        }
    }

    /// When the event at `pos` was read, if known.
    fn read_at(&self, pos: Position) -> Option<Instant> {
        let i = self.reads.partition_point(|r| r.0 <= pos);
        self.reads.get(i).map(|r| r.1)
    }

    /// When the current wait ends, if waiting.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.since.map(|t| deadline_after(t, self.interval))
    }

    /// Whether the router should read more of the log now (to fill the batch).
    pub(super) fn waiting(&self) -> bool {
        self.since.is_some()
    }
}

impl Worker {
    /// True while the next request should wait for a fuller batch.
    pub(super) fn hold_for_fuller_batch(&mut self) -> bool {
        let max = self.config.batch_size;
        let Some(f) = &self.filling else {
            return false;
        };
        let now = Instant::now();
        if let Some(since) = f.since {
            if f.ready < max && now < deadline_after(since, f.interval) {
                return true;
            }
            if let Some(f) = &mut self.filling {
                f.since = None;
            }
            return false;
        }
        // Not waiting yet: is a full batch ready? Retries on their own (the users of a
        // failed batch, split in cohorts; a suspect) are not held back.
        let mut ready = 0;
        let mut oldest = None;
        for user in self.ready.iter().take(max) {
            let Some(uq) = self.users.get(user) else {
                continue;
            };
            if uq.state != UserState::Idle {
                continue;
            }
            if uq.cohort.is_some() || self.head_is_suspect(user) {
                return false;
            }
            if let Some(Origin::Log(pos)) = uq.q.front().map(|p| p.origin) {
                oldest = Some(oldest.map_or(pos, |o: Position| o.min(pos)));
            }
            ready += uq.q.len();
            if ready >= max {
                return false;
            }
        }
        if ready == 0 {
            return false;
        }
        // The wait began when the oldest ready head was read.
        let since = oldest
            .and_then(|pos| f.read_at(pos))
            .map_or(now, |t| t.min(now));
        if now >= since + f.interval {
            return false;
        }
        if let Some(f) = &mut self.filling {
            f.since = Some(since);
            f.ready = ready;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filling() -> Filling {
        Filling::new(Some(Duration::from_secs(30))).unwrap()
    }

    #[test]
    fn an_event_is_as_old_as_the_read_that_brought_it() {
        let mut f = filling();
        f.note_read(100, None);
        let first = f.reads[0].1;
        std::thread::sleep(Duration::from_millis(5));
        f.note_read(250, Some(0));
        let second = f.reads[1].1;
        assert!(second > first);
        assert_eq!(f.read_at(0), Some(first));
        assert_eq!(f.read_at(99), Some(first));
        assert_eq!(f.read_at(100), Some(second));
        assert_eq!(f.read_at(249), Some(second));
        assert_eq!(f.read_at(250), None, "not read yet");
        // Every event of the first read finished: it is forgotten.
        f.note_read(300, Some(120));
        assert_eq!(f.reads.len(), 2);
        assert_eq!(f.read_at(120), Some(second));
    }

    #[test]
    fn past_the_cap_reads_count_as_the_last_kept_one() {
        let mut f = filling();
        for i in 0..MAX_READS as u64 {
            f.note_read(10 * (i + 1), None);
        }
        let last = f.reads[MAX_READS - 1].1;
        std::thread::sleep(Duration::from_millis(5));
        f.note_read(10 * MAX_READS as u64 + 500, None);
        assert_eq!(f.reads.len(), MAX_READS);
        // Its events look older than they are: they go a little early, never late.
        assert_eq!(f.read_at(10 * MAX_READS as u64 + 499), Some(last));
    }
}
