//! What every outbox backend must do, run against each (redb, and PostgreSQL with two
//! replicas on one database).

use serde_json::json;

use super::{Entry, Outbox, Raise};
use crate::alerts::{Action, Alert, Severity};

fn entry(notifier: &str, key: &str, action: Action, at_ms: u64) -> Entry {
    Entry {
        notifier: notifier.into(),
        alert: Alert {
            key: key.into(),
            action,
            severity: Severity::Critical,
            summary: format!("{key} {action:?}"),
            details: json!({ "at": at_ms }),
            at_ms,
            source: "node-1".into(),
        },
        attempts: 0,
        next_at_ms: 0,
    }
}

fn raise(o: &dyn Outbox, idempotency: &str, key: &str, action: Action, at_ms: u64) -> bool {
    let entries = [
        entry("pagerduty", key, action, at_ms),
        entry("slack", key, action, at_ms),
    ];
    o.raise(&Raise {
        idempotency,
        condition: key,
        action,
        at_ms,
        entries: &entries,
    })
    .unwrap()
}

/// `a` and `b` are two handles on one outbox (two replicas of the PostgreSQL store, or
/// the one redb twice): what one raises, the other sees and can send. Leaves the
/// condition "storage" open since 40 and one entry (slack's trigger of it) pending.
pub(crate) fn raise_send_and_conditions(a: &dyn Outbox, b: &dyn Outbox) {
    assert_eq!(a.pending().unwrap(), 0);
    assert!(raise(a, "degraded:1", "degraded", Action::Trigger, 10));
    assert!(
        !raise(b, "degraded:1", "degraded", Action::Trigger, 11),
        "a transition is written once, whoever raises it again"
    );
    assert_eq!(b.pending().unwrap(), 2, "one entry per notifier");
    assert_eq!(b.open_since("degraded").unwrap(), Some(10));
    assert!(raise(b, "degraded:2", "degraded", Action::Resolve, 20));
    assert_eq!(a.open_since("degraded").unwrap(), None, "resolved");
    assert!(raise(a, "storage:1", "storage", Action::Trigger, 30));
    assert!(raise(a, "storage:2", "storage", Action::Trigger, 40));
    assert_eq!(
        b.open_since("storage").unwrap(),
        Some(40),
        "a condition triggered again is open since its last trigger"
    );
    let mut open = b.open_conditions().unwrap();
    open.sort();
    assert_eq!(open, vec![("storage".to_string(), 40)]);

    // Entries come back in the order raised, with their content.
    let entries = b.entries().unwrap();
    assert_eq!(entries.len(), 8);
    let order: Vec<_> = entries
        .iter()
        .map(|(_, e)| (e.notifier.as_str(), e.alert.key.as_str(), e.alert.at_ms))
        .collect();
    assert_eq!(
        order,
        vec![
            ("pagerduty", "degraded", 10),
            ("slack", "degraded", 10),
            ("pagerduty", "degraded", 20),
            ("slack", "degraded", 20),
            ("pagerduty", "storage", 30),
            ("slack", "storage", 30),
            ("pagerduty", "storage", 40),
            ("slack", "storage", 40),
        ]
    );
    assert!(entries.windows(2).all(|w| w[0].0 < w[1].0), "ids ascend");
    assert_eq!(entries[2].1.alert.action, Action::Resolve);
    assert_eq!(entries[0].1.alert.details, json!({ "at": 10 }));

    // A retry is saved; a send removes the entry, whichever replica does it.
    let (id, mut first) = entries[0].clone();
    first.attempts = 3;
    first.next_at_ms = 12_345;
    a.reschedule(id, &first).unwrap();
    let again = b.entries().unwrap();
    assert_eq!(again[0].0, id);
    assert_eq!(again[0].1.attempts, 3);
    assert_eq!(again[0].1.next_at_ms, 12_345);
    for (id, e) in &entries {
        if !(e.notifier == "slack" && e.alert.at_ms == 40) {
            b.finish(*id).unwrap();
        }
    }
    assert_eq!(a.pending().unwrap(), 1);
    let left = a.entries().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].1.notifier, "slack");
}

/// A fresh handle on the outbox `raise_send_and_conditions` left: it is all there.
pub(crate) fn after_reopen(o: &dyn Outbox) {
    assert_eq!(o.pending().unwrap(), 1);
    assert_eq!(o.open_since("storage").unwrap(), Some(40));
    assert!(
        !raise(o, "storage:2", "storage", Action::Trigger, 41),
        "transitions written before are remembered"
    );
    assert_eq!(o.entries().unwrap()[0].1.alert.at_ms, 40);
}
