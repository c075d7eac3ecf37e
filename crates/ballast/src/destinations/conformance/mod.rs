//! The conformance suite every destination type passes (docs/DESTINATIONS.md): a type
//! provides a [`Target`] (a real target on loopback or disk, which the suite can read
//! back, break and heal) and calls [`run`] from a test of its own in this folder.
//!
//! What it checks: what `deliver` calls Delivered is durable at the target (read back
//! through the target, by a fresh reader); a temporary failure of the target is Retry
//! and a refusal is Abort; a failed batch leaves nothing of itself at the target, and the
//! same batch delivered again later lands whole; re-delivering the same messageIds does
//! not duplicate them where the target can prevent it (and loses none where it cannot).

mod file;
mod postgres;
mod webhook;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use super::{Destination, Event, Outcome};

#[async_trait]
pub trait Target: Send + Sync {
    /// A new sink on the target (as `serve` would build it).
    async fn sink(&self) -> Arc<dyn Destination>;
    /// The messageIds durable at the target, read from the target itself.
    async fn stored(&self) -> Vec<String>;
    /// Makes the target fail temporarily; false if this type cannot be made to.
    async fn break_temporarily(&self) -> bool;
    /// Makes the target refuse what it gets for good; false if this type has no such
    /// answer.
    async fn refuse(&self) -> bool;
    /// Undoes `break_temporarily` and `refuse`.
    async fn heal(&self);
    /// Whether the target keeps one copy of a messageId delivered twice.
    fn deduplicates(&self) -> bool;
}

/// A track event as the gateway stores it (enriched).
pub fn event(tag: &str, n: usize) -> Event {
    let id = format!("{tag}-{n}");
    let json = serde_json::json!({
        "type": "track",
        "event": "Conformance Checked",
        "messageId": id,
        "userId": format!("user-{}", n % 3),
        "anonymousId": "anon-1",
        "properties": { "n": n, "tag": tag, "ok": true },
        "context": { "library": { "name": "conformance" } },
        "timestamp": "2026-11-29T08:00:00.000Z",
        "sentAt": "2026-11-29T08:00:00.000Z",
        "originalTimestamp": "2026-11-29T08:00:00.000Z",
        "receivedAt": "2026-11-29T08:00:01.000Z",
        "request_ip": "127.0.0.1",
    });
    Event {
        json: bytes::Bytes::from(json.to_string()),
        message_id: id.as_str().into(),
    }
}

fn batch(tag: &str, n: usize) -> Vec<Event> {
    (0..n).map(|i| event(tag, i)).collect()
}

fn counts(ids: &[String]) -> HashMap<&str, usize> {
    let mut m = HashMap::new();
    for id in ids {
        *m.entry(id.as_str()).or_insert(0) += 1;
    }
    m
}

fn ids(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.message_id.to_string()).collect()
}

/// Runs every check against `target`, in order (each starts from what the ones before
/// left at the target).
pub async fn run(target: &dyn Target) {
    // Delivered = durable: read back by the target, not through the sink.
    let a = batch("a", 5);
    {
        let sink = target.sink().await;
        assert_eq!(sink.deliver(&a[..1]).await, Outcome::Delivered, "one event");
        assert_eq!(sink.deliver(&a[1..]).await, Outcome::Delivered, "a batch");
    }
    let stored = target.stored().await;
    let c = counts(&stored);
    for id in ids(&a) {
        assert_eq!(
            c.get(id.as_str()),
            Some(&1),
            "{id} durable once: {stored:?}"
        );
    }

    // A temporary failure is Retry and leaves nothing of the batch behind; the same
    // batch later lands whole.
    let b = batch("b", 4);
    if target.break_temporarily().await {
        let sink = target.sink().await;
        let outcome = sink.deliver(&b).await;
        assert!(
            matches!(outcome, Outcome::Retry { .. }),
            "temporary failure: {outcome:?}"
        );
        let stored = target.stored().await;
        assert!(
            ids(&b).iter().all(|id| !stored.contains(id)),
            "a failed batch left part of itself: {stored:?}"
        );
        target.heal().await;
        assert_eq!(sink.deliver(&b).await, Outcome::Delivered, "after healing");
        let stored = target.stored().await;
        for id in ids(&b) {
            assert!(stored.contains(&id), "{id} after the retry: {stored:?}");
        }
    }

    // A refusal is Abort.
    if target.refuse().await {
        let sink = target.sink().await;
        let outcome = sink.deliver(&batch("c", 2)).await;
        assert!(
            matches!(outcome, Outcome::Abort { .. }),
            "refusal: {outcome:?}"
        );
        target.heal().await;
    }

    // Re-delivery: none lost, and no duplicate where the target can prevent it.
    {
        let sink = target.sink().await;
        assert_eq!(sink.deliver(&a).await, Outcome::Delivered, "re-delivery");
        assert_eq!(
            sink.deliver(&a[2..]).await,
            Outcome::Delivered,
            "re-delivery"
        );
    }
    let stored = target.stored().await;
    let c = counts(&stored);
    for id in ids(&a) {
        let n = c.get(id.as_str()).copied().unwrap_or(0);
        if target.deduplicates() {
            assert_eq!(n, 1, "{id} re-delivered: {stored:?}");
        } else {
            assert!(n >= 1, "{id} lost: {stored:?}");
        }
    }
}
