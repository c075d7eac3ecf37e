//! The "destination is aborting events" alert: raised when events are aborted (again
//! each hour of the episode), resolved once the destination has delivered again and
//! aborted nothing for `alerts.aborts_clear_after`.

use std::time::{Instant, SystemTime};

use super::Worker;
use crate::alerts::{Action, Severity};
use crate::router::state::to_ms;

/// An open "destination is aborting events" alert: it resolves once the destination has
/// delivered again and aborted nothing for `alerts.aborts_clear_after`.
pub(super) struct AbortAlert {
    /// When this episode's first trigger was raised (ms): names its alerts.
    pub(super) since_ms: u64,
    pub(super) last_abort: Instant,
    pub(super) delivered_since: bool,
}

/// The condition key of a destination's "aborting events" alert.
pub(super) fn abort_alert_key(destination: &str) -> String {
    format!("aborts:{destination}")
}

impl Worker {
    /// Events were aborted: opens (or continues) the "aborting events" episode and raises
    /// its alert, again each hour of the episode (an operator may have closed it).
    pub(super) async fn note_abort(&mut self, status: Option<u16>, reason: &str) {
        let now_ms = to_ms(SystemTime::now());
        let episode = self.abort_alert.get_or_insert(AbortAlert {
            since_ms: now_ms,
            last_abort: Instant::now(),
            delivered_since: false,
        });
        episode.last_abort = Instant::now();
        episode.delivered_since = false;
        // Raised again each hour of the episode (an operator may have closed it).
        let hour = now_ms / 3_600_000;
        let since = episode.since_ms;
        let key = abort_alert_key(&self.config.id);
        let alert = self.alerts.alert(
            key.clone(),
            Action::Trigger,
            Severity::Warning,
            format!("destination {} is aborting events ({reason})", self.config.id),
            serde_json::json!({ "destination": self.config.id, "status": status, "reason": reason }),
        );
        let alerts = self.alerts.clone();
        let _ = tokio::task::spawn_blocking(move || {
            alerts.raise(&format!("{key}:{since}:{hour}"), alert)
        })
        .await;
    }

    /// Resolves the "aborting events" alert once the destination delivered again and
    /// aborted nothing for `alerts.aborts_clear_after`.
    pub(super) async fn resolve_abort_alert(&mut self) {
        let clear = self.alerts.aborts_clear_after();
        let Some(a) = &self.abort_alert else {
            return;
        };
        if !a.delivered_since || a.last_abort.elapsed() < clear {
            return;
        }
        let key = abort_alert_key(&self.config.id);
        let idempotency = format!("{key}:{}:resolved", a.since_ms);
        let alert = self.alerts.alert(
            key,
            Action::Resolve,
            Severity::Info,
            format!(
                "destination {} delivers again: nothing aborted for {}",
                self.config.id,
                humantime::format_duration(clear)
            ),
            serde_json::json!({ "destination": self.config.id }),
        );
        let alerts = self.alerts.clone();
        match tokio::task::spawn_blocking(move || alerts.raise(&idempotency, alert)).await {
            Ok(Ok(_)) => self.abort_alert = None,
            Ok(Err(e)) => {
                tracing::warn!(destination = %self.config.id, error = %e, "recording the alert failed; will retry")
            }
            Err(_) => {}
        }
    }
}
