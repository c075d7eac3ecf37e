//! Finishing events as dead letters: stored durably first (retried until they are, so an
//! event is never finished without its copy), then counted and finished; replayed dead
//! letters that finish are recorded as replayed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::value::RawValue;

use super::queue::Origin;
use super::Worker;
use crate::router::state::{to_ms, DeadLetter};

impl Worker {
    /// Stores the first `n` events of the user's queue as dead letters (durably), then
    /// finishes them.
    pub(super) async fn dead_letter(
        &mut self,
        user: &Arc<str>,
        n: usize,
        status: Option<u16>,
        reason: &str,
        kind: &str,
    ) {
        let all: Vec<(usize, String)> = (0..n).map(|i| (i, reason.to_string())).collect();
        self.dead_letter_picked(user, n, &all, status, kind).await;
    }

    /// Stores the entries `picked` names (index among the user's first `n`, reason) as
    /// dead letters (durably), then finishes the first `n`; returns how many it finished.
    pub(super) async fn dead_letter_picked(
        &mut self,
        user: &Arc<str>,
        n: usize,
        picked: &[(usize, String)],
        status: Option<u16>,
        kind: &str,
    ) -> usize {
        let now = to_ms(SystemTime::now());
        let mut letters = Vec::new();
        if let Some(uq) = self.users.get(user) {
            for (i, reason) in picked {
                let Some(p) = uq.q.get(*i).filter(|_| *i < n) else {
                    continue;
                };
                let Some(e) = &p.event else { continue };
                let text = String::from_utf8_lossy(&e.json).into_owned();
                let event = RawValue::from_string(text)
                    .unwrap_or_else(|_| RawValue::from_string("null".into()).unwrap_or_default());
                letters.push(DeadLetter {
                    id: 0,
                    destination: self.config.id.clone(),
                    position: match p.origin {
                        Origin::Log(pos) => Some(pos),
                        Origin::Replay(_) => None,
                    },
                    source: p.source.to_string(),
                    event,
                    attempts: p.attempts.max(1),
                    first_attempt_ms: p.first_attempt.map(to_ms).unwrap_or(now),
                    dead_at_ms: now,
                    status,
                    reason: reason.to_string(),
                    kind: kind.to_string(),
                });
            }
        }
        let count = letters.len() as u64;
        let reason = picked.first().map_or("", |(_, r)| r.as_str());
        loop {
            match self.db.add_dead_letters(letters.clone()).await {
                Ok(_) => break,
                Err(e) => {
                    // Never finish an event that is not durably dead-lettered.
                    tracing::error!(destination = %self.config.id, error = %e, "storing dead letters failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        tracing::warn!(destination = %self.config.id, events = count, ?status, reason, "events moved to the dead letters");
        if kind == "aborted" && count > 0 {
            self.note_abort(status, reason).await;
        }
        self.stats.aborted.fetch_add(count, Ordering::Relaxed);
        self.stats.dead_letters.fetch_add(count, Ordering::Relaxed);
        metrics::counter!("ballast_destination_aborted_total", "destination" => self.config.id.clone()).increment(count);
        let (finished, replays) = self.finish(user, n, false);
        self.replays_done(replays).await;
        finished
    }

    pub(super) async fn replays_done(&mut self, ids: Vec<u64>) {
        if ids.is_empty() {
            return;
        }
        self.stats
            .replayed
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        if let Err(e) = self.db.replay_done(&self.config.id, &ids).await {
            tracing::error!(destination = %self.config.id, error = %e, "recording replayed events failed");
        }
    }
}
