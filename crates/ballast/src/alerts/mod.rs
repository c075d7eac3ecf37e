//! Alerts: a durable outbox and one notifier per configured service (PagerDuty,
//! VictorOps, Slack, generic webhooks).
//!
//! An alert is written to the outbox, once per notifier, *before* the state change it
//! reports takes effect, under an idempotency key naming the transition (so a crash
//! between the two does not send it twice). A sender task delivers the outbox: 2xx
//! removes an entry; 429, 5xx and network errors are retried with backoff (across
//! restarts); other 4xx are logged and dropped.
//!
//! The outbox (`outbox/`) is `<data_dir>/alerts.redb` with the embedded store, and
//! tables in the shared database with the PostgreSQL store: every replica raises into
//! it and one sends it. There, the conditions of one replica (its running mode, its view
//! of the storage) are named with its source (`degraded@pod-a`) so that one replica's
//! resolve does not close another's trigger, while shared conditions (a destination
//! aborting, a poison event) are one condition whoever raises them.

mod config;
pub mod outbox;
pub mod pagerduty;
pub mod slack;
pub mod victorops;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use self::outbox::{Entry, Outbox, Raise};
use crate::time::to_ms;
pub use config::AlertsConfig;

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

#[derive(Debug, thiserror::Error)]
#[error("alert outbox: {0}")]
pub struct AlertError(pub(crate) String);

pub(crate) fn e<E: std::fmt::Display>(x: E) -> AlertError {
    AlertError(x.to_string())
}

/// How often a replica that does not send the shared outbox asks for the sender's place.
const NOT_SENDER_RETRY: Duration = Duration::from_secs(1);

/// Outbox entries due now (id, entry), and when the next one is due.
type Due = (Vec<(u64, Entry)>, Option<u64>);

pub struct Alerts {
    outbox: Box<dyn Outbox>,
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
    /// The outbox in a redb file (embedded store).
    pub fn open(path: &std::path::Path, config: &AlertsConfig) -> anyhow::Result<Arc<Alerts>> {
        let outbox = outbox::redb::RedbOutbox::open(path)?;
        Alerts::with_outbox(Box::new(outbox), config)
    }

    /// The outbox in the shared database (PostgreSQL store). Blocks while it connects.
    pub fn open_postgres(url: &str, config: &AlertsConfig) -> anyhow::Result<Arc<Alerts>> {
        let outbox = outbox::postgres::PgOutbox::open(url)?;
        Alerts::with_outbox(Box::new(outbox), config)
    }

    fn with_outbox(outbox: Box<dyn Outbox>, config: &AlertsConfig) -> anyhow::Result<Arc<Alerts>> {
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
            outbox,
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
    /// the same `idempotency` key was written before. Logs it in any case. For
    /// conditions every replica shares (a destination aborting, a poison event).
    pub fn raise(&self, idempotency: &str, alert: Alert) -> Result<bool, AlertError> {
        let condition = alert.key.clone();
        self.write(idempotency, &condition, alert)
    }

    /// `raise` for a condition of this process (its running mode, its storage): with a
    /// shared outbox, the idempotency key and the condition are named with the source.
    pub fn raise_local(&self, idempotency: &str, alert: Alert) -> Result<bool, AlertError> {
        let condition = self.local(&alert.key);
        self.write(&self.local(idempotency), &condition, alert)
    }

    fn write(&self, idempotency: &str, condition: &str, alert: Alert) -> Result<bool, AlertError> {
        match alert.action {
            Action::Trigger => {
                tracing::warn!(alert = %alert.key, summary = %alert.summary, "alert")
            }
            Action::Resolve => {
                tracing::info!(alert = %alert.key, summary = %alert.summary, "alert resolved")
            }
        }
        let entries: Vec<Entry> = self
            .notifiers
            .iter()
            .map(|n| Entry {
                notifier: n.name(),
                alert: alert.clone(),
                attempts: 0,
                next_at_ms: 0,
            })
            .collect();
        let fresh = self.outbox.raise(&Raise {
            idempotency,
            condition,
            action: alert.action,
            at_ms: alert.at_ms,
            entries: &entries,
        })?;
        if fresh {
            self.wake.notify_one();
        }
        Ok(fresh)
    }

    /// A name of this process's own: `name@source` with a shared outbox.
    fn local(&self, name: &str) -> String {
        if self.outbox.shared() {
            format!("{name}@{}", self.source)
        } else {
            name.to_string()
        }
    }

    /// When the condition `key` was triggered, if it has not been resolved since (in
    /// this run or an earlier one).
    pub fn open_since(&self, key: &str) -> Result<Option<u64>, AlertError> {
        self.outbox.open_since(key)
    }

    /// `open_since` for a condition raised with `raise_local`.
    pub fn open_since_local(&self, key: &str) -> Result<Option<u64>, AlertError> {
        self.outbox.open_since(&self.local(key))
    }

    /// The conditions triggered and not resolved yet (key, when triggered in ms), oldest
    /// first: the status page's "open alerts". With a shared outbox, every replica's.
    pub fn open_alerts(&self) -> Result<Vec<(String, u64)>, AlertError> {
        let mut out = self.outbox.open_conditions()?;
        out.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        Ok(out)
    }

    /// Entries not yet delivered.
    pub fn pending(&self) -> Result<usize, AlertError> {
        self.outbox.pending()
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
        let mut due = Vec::new();
        let mut next: Option<u64> = None;
        // Per notifier, the alerts of one condition go out in the order raised: a
        // `resolve` never overtakes its `trigger` that is waiting for a retry.
        let mut waiting: std::collections::HashSet<(String, String)> = Default::default();
        for (id, entry) in self.outbox.entries()? {
            let pair = (entry.notifier.clone(), entry.alert.key.clone());
            if waiting.contains(&pair) {
                continue;
            }
            if entry.next_at_ms <= now_ms {
                due.push((id, entry));
            } else {
                waiting.insert(pair);
                next = Some(next.map_or(entry.next_at_ms, |n| n.min(entry.next_at_ms)));
            }
        }
        Ok((due, next))
    }

    fn finish(&self, id: u64) -> Result<(), AlertError> {
        self.outbox.finish(id)
    }

    fn reschedule(&self, id: u64, entry: &Entry) -> Result<(), AlertError> {
        self.outbox.reschedule(id, entry)
    }

    /// Delivers the outbox until `stop`.
    pub async fn run_sender(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            // A shared outbox is sent by one replica at a time; the others wait for
            // their turn (the sender's death ends its lock).
            let this = self.clone();
            if !tokio::task::spawn_blocking(move || this.outbox.is_sender())
                .await
                .unwrap_or(false)
            {
                tokio::select! {
                    _ = tokio::time::sleep(NOT_SENDER_RETRY) => {}
                    _ = stop.changed() => return,
                }
                continue;
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
                .min(self.outbox.poll_interval().unwrap_or(Duration::MAX))
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
