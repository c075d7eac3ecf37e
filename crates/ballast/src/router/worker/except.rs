//! A delivery the destination took but for a few events it refused for good
//! (`Outcome::DeliveredExcept`): those events go to the dead letters, each with its
//! reason; the others of the request are delivered. Per-user order holds: every event of
//! the request is finished at once, as for a whole delivery.

use std::sync::atomic::Ordering;

use super::{Unit, Worker};

impl Worker {
    /// `refused`: (index in the request's events, reason), ascending. A request's events
    /// are its units' events in order (each unit the first `n` of its user's queue).
    pub(super) async fn delivered_except(
        &mut self,
        units: Vec<Unit>,
        refused: Vec<(usize, String)>,
    ) {
        let mut refused = refused.into_iter().peekable();
        let mut offset = 0;
        for Unit { user, count: n } in units {
            let mut picked = Vec::new();
            while let Some((i, reason)) = refused.next_if(|(i, _)| *i < offset + n) {
                if i >= offset {
                    picked.push((i - offset, reason));
                }
            }
            offset += n;
            if let Some(uq) = self.users.get_mut(&user) {
                uq.cohort = None;
            }
            let finished = if picked.is_empty() {
                let (finished, replays) = self.finish(&user, n, false);
                self.replays_done(replays).await;
                finished
            } else {
                self.dead_letter_picked(&user, n, &picked, None, "aborted")
                    .await
            };
            self.stats.delivered.fetch_add(
                finished.saturating_sub(picked.len()) as u64,
                Ordering::Relaxed,
            );
        }
    }
}
