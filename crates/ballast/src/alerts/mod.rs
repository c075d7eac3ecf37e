//! Alerts: a durable outbox (`<data_dir>/alerts.redb`) and one notifier per configured
//! service (PagerDuty, VictorOps, Slack, generic webhooks).
//!
//! An alert is written to the outbox, once per notifier, *before* the state change it
//! reports takes effect, under an idempotency key naming the transition (so a crash
//! between the two does not send it twice). A sender task delivers the outbox: 2xx
//! removes an entry; 429, 5xx and network errors are retried with backoff (across
//! restarts); other 4xx are logged and dropped.

mod config;
pub mod pagerduty;
pub mod slack;
pub mod victorops;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::time::to_ms;
pub use config::AlertsConfig;

const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const SEEN: TableDefinition<&str, u64> = TableDefinition::new("seen");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Conditions triggered and not yet resolved: key → when triggered (ms). Lets a later
/// run resolve what an earlier one raised (fsync failure, full storage).
const OPEN: TableDefinition<&str, u64> = TableDefinition::new("open");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Trigger,
    Resolve,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Error,
    Warning,
    Info,
}

/// One alert: a condition (stable `key`) that starts (`Trigger`) or clears (`Resolve`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Alert {
    /// Stable per condition: "degraded", "poison:<destination>:<position>", ...
    pub key: String,
    pub action: Action,
    pub severity: Severity,
    pub summary: String,
    pub details: serde_json::Value,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The server that raised it.
    pub source: String,
}

impl Alert {
    /// The class of the condition (the key up to its first ':').
    pub fn class(&self) -> &str {
        self.key.split(':').next().unwrap_or(&self.key)
    }
}

/// How a notifier sends one alert.
pub struct Request {
    pub url: String,
    pub body: serde_json::Value,
}

pub trait Notifier: Send + Sync {
    fn name(&self) -> String;
    fn request(&self, alert: &Alert) -> Request;
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    notifier: String,
    alert: Alert,
    attempts: u32,
    next_at_ms: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("alert outbox: {0}")]
pub struct AlertError(String);

fn e<E: std::fmt::Display>(x: E) -> AlertError {
    AlertError(x.to_string())
}

/// Outbox entries due now (id, entry), and when the next one is due.
type Due = (Vec<(u64, Entry)>, Option<u64>);

pub struct Alerts {
    db: Database,
    notifiers: Vec<Arc<dyn Notifier>>,
    source: String,
    aborts_clear_after: Duration,
    wake: Notify,
    client: reqwest::Client,
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "ballast".into())
}

impl Alerts {
    pub fn open(path: &std::path::Path, config: &AlertsConfig) -> anyhow::Result<Arc<Alerts>> {
        let db = Database::create(path).map_err(e)?;
        let txn = db.begin_write().map_err(e)?;
        {
            txn.open_table(OUTBOX).map_err(e)?;
            txn.open_table(SEEN).map_err(e)?;
            txn.open_table(META).map_err(e)?;
            txn.open_table(OPEN).map_err(e)?;
        }
        txn.commit().map_err(e)?;
        let mut notifiers: Vec<Arc<dyn Notifier>> = Vec::new();
        if let Some(c) = &config.pagerduty {
            notifiers.push(Arc::new(pagerduty::PagerDuty::new(c.clone())));
        }
        if let Some(c) = &config.victorops {
            notifiers.push(Arc::new(victorops::VictorOps::new(c.clone())));
        }
        if let Some(c) = &config.slack {
            notifiers.push(Arc::new(slack::Slack::new(c.clone())));
        }
        for (i, c) in config.webhook.iter().enumerate() {
            notifiers.push(Arc::new(webhook::WebhookNotifier::new(i, c.clone())));
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .map_err(e)?;
        Ok(Arc::new(Alerts {
            db,
            notifiers,
            source: config.source.clone().unwrap_or_else(host_name),
            aborts_clear_after: config.aborts_clear_after,
            wake: Notify::new(),
            client,
        }))
    }

    /// How long a destination must go without aborting for its alert to resolve.
    pub fn aborts_clear_after(&self) -> Duration {
        self.aborts_clear_after
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Builds an alert of this server.
    pub fn alert(
        &self,
        key: impl Into<String>,
        action: Action,
        severity: Severity,
        summary: impl Into<String>,
        details: serde_json::Value,
    ) -> Alert {
        Alert {
            key: key.into(),
            action,
            severity,
            summary: summary.into(),
            details,
            at_ms: to_ms(std::time::SystemTime::now()),
            source: self.source.clone(),
        }
    }

    /// Writes the alert durably to the outbox for every notifier, unless an alert with
    /// the same `idempotency` key was written before. Logs it in any case.
    pub fn raise(&self, idempotency: &str, alert: Alert) -> Result<bool, AlertError> {
        match alert.action {
            Action::Trigger => {
                tracing::warn!(alert = %alert.key, summary = %alert.summary, "alert")
            }
            Action::Resolve => {
                tracing::info!(alert = %alert.key, summary = %alert.summary, "alert resolved")
            }
        }
        let txn = self.db.begin_write().map_err(e)?;
        let fresh;
        {
            let mut seen = txn.open_table(SEEN).map_err(e)?;
            fresh = seen.get(idempotency).map_err(e)?.is_none();
            if fresh {
                let mut meta = txn.open_table(META).map_err(e)?;
                let mut next = meta.get("next").map_err(e)?.map(|v| v.value()).unwrap_or(1);
                let mut outbox = txn.open_table(OUTBOX).map_err(e)?;
                for n in &self.notifiers {
                    let entry = Entry {
                        notifier: n.name(),
                        alert: alert.clone(),
                        attempts: 0,
                        next_at_ms: 0,
                    };
                    let bytes = serde_json::to_vec(&entry).map_err(e)?;
                    outbox.insert(next, bytes.as_slice()).map_err(e)?;
                    next += 1;
                }
                meta.insert("next", next).map_err(e)?;
                seen.insert(idempotency, alert.at_ms).map_err(e)?;
                let mut open = txn.open_table(OPEN).map_err(e)?;
                match alert.action {
                    Action::Trigger => {
                        open.insert(alert.key.as_str(), alert.at_ms).map_err(e)?;
                    }
                    Action::Resolve => {
                        open.remove(alert.key.as_str()).map_err(e)?;
                    }
                }
            }
        }
        txn.commit().map_err(e)?;
        if fresh {
            self.wake.notify_one();
        }
        Ok(fresh)
    }

    /// When the condition `key` was triggered, if it has not been resolved since (in
    /// this run or an earlier one).
    pub fn open_since(&self, key: &str) -> Result<Option<u64>, AlertError> {
        let txn = self.db.begin_read().map_err(e)?;
        let t = txn.open_table(OPEN).map_err(e)?;
        Ok(t.get(key).map_err(e)?.map(|v| v.value()))
    }

    /// The conditions triggered and not resolved yet (key, when triggered in ms), oldest
    /// first: the status page's "open alerts".
    pub fn open_alerts(&self) -> Result<Vec<(String, u64)>, AlertError> {
        let txn = self.db.begin_read().map_err(e)?;
        let t = txn.open_table(OPEN).map_err(e)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(e)? {
            let (k, v) = item.map_err(e)?;
            out.push((k.value().to_string(), v.value()));
        }
        out.sort_by_key(|(_, at)| *at);
        Ok(out)
    }

    /// Entries not yet delivered.
    pub fn pending(&self) -> Result<usize, AlertError> {
        let txn = self.db.begin_read().map_err(e)?;
        let t = txn.open_table(OUTBOX).map_err(e)?;
        Ok(t.iter().map_err(e)?.count())
    }

    /// Waits until the outbox is empty or `within` has passed (the sender must be
    /// running): used before the process exits on a fatal error, so that the page goes
    /// out even if the next start fails too. True when everything was delivered.
    pub async fn flush(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.pending() {
                Ok(0) => return true,
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "reading the alert outbox failed");
                    return false;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Entries due now, and when the next one is due.
    fn due(&self, now_ms: u64) -> Result<Due, AlertError> {
        let txn = self.db.begin_read().map_err(e)?;
        let t = txn.open_table(OUTBOX).map_err(e)?;
        let mut due = Vec::new();
        let mut next: Option<u64> = None;
        // Per notifier, the alerts of one condition go out in the order raised: a
        // `resolve` never overtakes its `trigger` that is waiting for a retry.
        let mut waiting: std::collections::HashSet<(String, String)> = Default::default();
        for item in t.iter().map_err(e)? {
            let (k, v) = item.map_err(e)?;
            let entry: Entry = serde_json::from_slice(v.value()).map_err(e)?;
            let pair = (entry.notifier.clone(), entry.alert.key.clone());
            if waiting.contains(&pair) {
                continue;
            }
            if entry.next_at_ms <= now_ms {
                due.push((k.value(), entry));
            } else {
                waiting.insert(pair);
                next = Some(next.map_or(entry.next_at_ms, |n| n.min(entry.next_at_ms)));
            }
        }
        Ok((due, next))
    }

    fn finish(&self, id: u64) -> Result<(), AlertError> {
        let txn = self.db.begin_write().map_err(e)?;
        txn.open_table(OUTBOX).map_err(e)?.remove(id).map_err(e)?;
        txn.commit().map_err(e)
    }

    fn reschedule(&self, id: u64, entry: &Entry) -> Result<(), AlertError> {
        let txn = self.db.begin_write().map_err(e)?;
        {
            let bytes = serde_json::to_vec(entry).map_err(e)?;
            txn.open_table(OUTBOX)
                .map_err(e)?
                .insert(id, bytes.as_slice())
                .map_err(e)?;
        }
        txn.commit().map_err(e)
    }

    /// Delivers the outbox until `stop`.
    pub async fn run_sender(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            let now = to_ms(std::time::SystemTime::now());
            let this = self.clone();
            let (due, next) = match tokio::task::spawn_blocking(move || this.due(now)).await {
                Ok(Ok(x)) => x,
                Ok(Err(err)) => {
                    tracing::error!(error = %err, "reading the alert outbox failed");
                    (Vec::new(), Some(now + 5_000))
                }
                Err(_) => (Vec::new(), Some(now + 5_000)),
            };
            if !due.is_empty() {
                let mut failed: std::collections::HashSet<(String, String)> = Default::default();
                for (id, entry) in due {
                    let pair = (entry.notifier.clone(), entry.alert.key.clone());
                    if failed.contains(&pair) {
                        continue;
                    }
                    if !self.deliver(id, entry).await {
                        failed.insert(pair);
                    }
                }
                // Deliveries rescheduled what failed: look again for the next due time.
                continue;
            }
            let wait = next
                .map(|n| {
                    Duration::from_millis(n.saturating_sub(to_ms(std::time::SystemTime::now())))
                })
                .unwrap_or(Duration::from_secs(60))
                .max(Duration::from_millis(10));
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Sends an alert to every notifier once, without the outbox: for when the outbox
    /// cannot be written (its disk is full). Best effort: true when every notifier
    /// accepted it within `within`.
    pub async fn send_direct(&self, alert: &Alert, within: Duration) -> bool {
        let mut all = true;
        for n in &self.notifiers {
            let req = n.request(alert);
            let sent =
                tokio::time::timeout(within, self.client.post(&req.url).json(&req.body).send())
                    .await;
            match sent {
                Ok(Ok(resp)) if resp.status().is_success() => {}
                Ok(Ok(resp)) => {
                    tracing::warn!(notifier = %n.name(), status = resp.status().as_u16(), alert = %alert.key, "alert sent without the outbox was not accepted");
                    all = false;
                }
                Ok(Err(err)) => {
                    tracing::warn!(notifier = %n.name(), error = %err, alert = %alert.key, "sending an alert without the outbox failed");
                    all = false;
                }
                Err(_) => {
                    tracing::warn!(notifier = %n.name(), alert = %alert.key, "sending an alert without the outbox timed out");
                    all = false;
                }
            }
        }
        all
    }

    /// Sends one entry: false when it stays in the outbox for a retry.
    async fn deliver(self: &Arc<Self>, id: u64, mut entry: Entry) -> bool {
        let Some(n) = self.notifiers.iter().find(|n| n.name() == entry.notifier) else {
            tracing::warn!(notifier = %entry.notifier, "alert for a notifier no longer configured; dropped");
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || this.finish(id)).await;
            return true;
        };
        let req = n.request(&entry.alert);
        let result = self.client.post(&req.url).json(&req.body).send().await;
        let retry = match result {
            Ok(resp) if resp.status().is_success() => false,
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = resp.text().await.unwrap_or_default();
                if status == 429 || status >= 500 || status == 408 {
                    tracing::warn!(notifier = %entry.notifier, status, %body, "alert not accepted; will retry");
                    true
                } else {
                    tracing::error!(notifier = %entry.notifier, status, %body, alert = %entry.alert.key, "alert refused; dropped");
                    false
                }
            }
            Err(err) => {
                tracing::warn!(notifier = %entry.notifier, error = %err, "sending alert failed; will retry");
                true
            }
        };
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if retry {
                entry.attempts += 1;
                let backoff = (1_000u64 << entry.attempts.min(8)).min(300_000);
                entry.next_at_ms = to_ms(std::time::SystemTime::now()) + backoff;
                this.reschedule(id, &entry)
            } else {
                this.finish(id)
            }
        })
        .await;
        !retry
    }
}

#[cfg(test)]
mod tests;
