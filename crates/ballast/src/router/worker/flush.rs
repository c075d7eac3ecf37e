//! Fuller batches for destinations with a `flush_interval` (the `postgres` warehouse: one
//! transaction per batch, so few large ones beat many small ones). While fewer than
//! `batch_size` events are ready, nothing is sent until `batch_size` are or the wait
//! began `flush_interval` ago; then the batch goes with what is ready. Only sending is
//! delayed, so per-user order and every acknowledgement rule stay as they are.
//!
//! The bound is the oldest event's, not the wait's: when a wait ends, every event read
//! by then is overdue, and a user whose head is overdue is not held back when it becomes
//! ready again (its earlier load was still in flight when the batch went). Without this,
//! what those users had queued waited a whole new `flush_interval`, then the few left
//! behind again another (the last 8,812 of a 500,000-event backlog took 30 s, their last
//! 9 another 60 s).
//!
//! Cost: how many events are ready is counted once when a wait begins (a walk of the
//! ready users, stopping at `batch_size` events: no more than building the batch would
//! take), then only kept up to date by adding what is read meanwhile and the queues of
//! users that become ready again (a hot user whose load just committed: its next batch
//! goes at once). It may count events twice or of a user busy meanwhile (a batch goes a
//! little early): the bound holds either way.

use std::time::{Duration, Instant};

use super::queue::{Origin, UserState};
use super::Worker;
use crate::store::Position;

pub(super) struct Filling {
    interval: Duration,
    /// When the current wait began (None: not waiting).
    since: Option<Instant>,
    /// Events ready, about, since the wait began.
    ready: usize,
    /// Events before this position were read before the last wait ended: they go as
    /// soon as their user is free.
    overdue: Position,
}

impl Filling {
    pub(super) fn new(interval: Option<Duration>) -> Option<Filling> {
        interval.map(|interval| Filling {
            interval,
            since: None,
            ready: 0,
            overdue: 0,
        })
    }

    /// `n` events may have become ready: one read into a queue, or a user's queue
    /// ready again (its delivery finished, its retry timer fired).
    pub(super) fn add(&mut self, n: usize) {
        if self.since.is_some() {
            self.ready += n;
        }
    }

    /// When the current wait ends, if waiting.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.since.map(|t| t + self.interval)
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
            if f.ready < max && now < since + f.interval {
                return true;
            }
            // Ended by the clock (not by a full batch): what was read by now is overdue.
            let overdue = (now >= since + f.interval).then_some(self.read_pos);
            if let Some(f) = &mut self.filling {
                f.since = None;
                if let Some(at) = overdue {
                    f.overdue = at;
                }
            }
            return false;
        }
        let overdue = f.overdue;
        // Not waiting yet: is a full batch ready? Retries on their own (the users of a
        // failed batch, split in cohorts; a suspect) are not held back.
        let mut ready = 0;
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
            if uq
                .q
                .front()
                .is_some_and(|p| matches!(p.origin, Origin::Log(pos) if pos < overdue))
            {
                return false;
            }
            ready += uq.q.len();
            if ready >= max {
                return false;
            }
        }
        if ready == 0 {
            return false;
        }
        if let Some(f) = &mut self.filling {
            f.since = Some(now);
            f.ready = ready;
        }
        true
    }
}
