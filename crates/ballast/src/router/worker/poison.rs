//! Poison events and strikes: an event in flight when the process crashed (the crash
//! journal) or when a delivery task panicked gets a strike; suspects (with strikes) are
//! delivered alone; at `recovery.poison_threshold` strikes an event is quarantined to the
//! dead letters with an alert. Strikes and retry counts are saved once a second.

use std::sync::Arc;

use super::queue::Origin;
use super::{InFlight, Worker};
use crate::alerts::{Action, Severity};
use crate::event::identify;
use crate::store::{Position, StoredEvent};

/// What names an event's strikes: its messageId, else its position.
pub(crate) fn strike_key(message_id: &str, position: Position) -> String {
    if message_id.is_empty() {
        format!("@{position}")
    } else {
        message_id.to_string()
    }
}

/// The strike key of a stored event.
pub(crate) fn strike_key_of(e: &StoredEvent) -> String {
    match &e.ident {
        Some((_, mid)) => strike_key(mid, e.position),
        None => strike_key(&identify(&e.event).1, e.position),
    }
}

impl Worker {
    /// True when the user's head has strikes (it was in flight at a crash or a panic).
    pub(super) fn head_is_suspect(&self, user: &Arc<str>) -> bool {
        self.users
            .get(user)
            .and_then(|u| u.q.front())
            .is_some_and(|p| {
                !self.strikes.is_empty() && self.strikes.get(p.key()).copied().unwrap_or(0) > 0
            })
    }

    /// A worker panicked while holding these events: one strike each; at the threshold
    /// they are poison (quarantined when they reach the head again).
    pub(super) async fn strike(&mut self, id: tokio::task::Id) {
        let Some(InFlight { units, .. }) = self.inflight.get(&id) else {
            return;
        };
        // The events in flight are still the first of their users' queues.
        let keys: Vec<String> = units
            .iter()
            .filter_map(|u| Some(self.users.get(&u.user)?.q.iter().take(u.count)))
            .flatten()
            .map(|p| p.key().to_string())
            .collect();
        let events: Vec<(String, String)> = keys
            .iter()
            .map(|k| (self.config.id.clone(), k.to_string()))
            .collect();
        let counts = match self.db.add_strikes(&events).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(destination = %self.config.id, error = %e, "recording strikes failed");
                return;
            }
        };
        // At the threshold an event is poison: judged when it reaches the head
        // (`next_request`), not marked over every queue here.
        for (key, n) in keys.into_iter().zip(counts) {
            self.strikes.insert(key, n);
        }
    }

    /// Moves the user's head (a poison event) to the dead letters and raises the alert.
    pub(super) async fn quarantine(&mut self, user: &Arc<str>) {
        if self.load_head(user, 1).await == 0 {
            self.ready.push_back(user.clone());
            return;
        }
        // Marked, so that finishing it keeps its strikes (a copy sent again is
        // quarantined without new crashes).
        if let Some(p) = self.users.get_mut(user).and_then(|u| u.q.front_mut()) {
            p.poison = true;
        }
        let (pos, message_id, strikes) = match self.users.get(user).and_then(|u| u.q.front()) {
            Some(p) => {
                let pos = match p.origin {
                    Origin::Log(pos) => pos,
                    Origin::Replay(_) => 0,
                };
                let mid = p
                    .event
                    .as_ref()
                    .map(|e| e.message_id.to_string())
                    .unwrap_or_default();
                (pos, mid, self.strikes.get(p.key()).copied().unwrap_or(0))
            }
            None => return,
        };
        let reason = format!("poison: in flight at {strikes} crashes");
        let alert = self.alerts.alert(
            format!("poison:{}:{pos}", self.config.id),
            Action::Trigger,
            Severity::Error,
            format!(
                "ballast quarantined event {message_id} of destination {}: it was being processed at {strikes} crashes",
                self.config.id
            ),
            serde_json::json!({ "destination": self.config.id, "position": pos, "messageId": message_id, "strikes": strikes }),
        );
        let alerts = self.alerts.clone();
        let key = format!("poison:{}:{pos}", self.config.id);
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || alerts.raise(&key, alert)).await {
            tracing::error!(error = %e, "raising the poison alert failed");
        }
        self.dead_letter(user, 1, None, &reason, "poison").await;
    }

    pub(super) async fn save_retry_state(&mut self) {
        if !self.strike_clears.is_empty() {
            let clears = std::mem::take(&mut self.strike_clears);
            if let Err(e) = self.db.clear_strikes(&self.config.id, &clears).await {
                tracing::warn!(destination = %self.config.id, error = %e, "clearing strikes failed");
            }
        }
        if self.retry_changes.is_empty() {
            return;
        }
        let changes = std::mem::take(&mut self.retry_changes);
        if let Err(e) = self.db.save_retry(&self.config.id, &changes).await {
            tracing::warn!(destination = %self.config.id, error = %e, "saving retry state failed");
        }
    }
}
