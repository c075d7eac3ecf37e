use super::*;
use crate::alerts::AlertsConfig;
use serde_json::json;

fn config() -> AlertsConfig {
    AlertsConfig {
        aborts_clear_after: std::time::Duration::from_secs(3600),
        source: Some("node-1".into()),
        pagerduty: Some(pagerduty::PagerDutyConfig {
            routing_key: "R".into(),
            base_url: "http://127.0.0.1:1".into(),
        }),
        victorops: Some(victorops::VictorOpsConfig {
            api_key: "A".into(),
            routing_key: "K".into(),
            base_url: "http://127.0.0.1:1/".into(),
        }),
        slack: None,
        webhook: vec![],
    }
}

#[test]
fn pagerduty_and_victorops_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let alerts = Alerts::open(&dir.path().join("a.redb"), &config()).unwrap();
    let t = alerts.alert(
        "degraded",
        Action::Trigger,
        Severity::Critical,
        "degraded",
        json!({"crashes": 5}),
    );
    let r = alerts.alert(
        "degraded",
        Action::Resolve,
        Severity::Critical,
        "normal again",
        json!({}),
    );
    let pd = pagerduty::PagerDuty::new(config().pagerduty.unwrap());
    let req = pd.request(&t);
    assert_eq!(req.url, "http://127.0.0.1:1/v2/enqueue");
    assert_eq!(req.body["event_action"], "trigger");
    assert_eq!(req.body["routing_key"], "R");
    assert_eq!(req.body["dedup_key"], "ballast/node-1/degraded");
    assert_eq!(req.body["payload"]["severity"], "critical");
    assert_eq!(req.body["payload"]["source"], "node-1");
    assert_eq!(req.body["payload"]["custom_details"]["crashes"], 5);
    let req = pd.request(&r);
    assert_eq!(req.body["event_action"], "resolve");
    assert_eq!(req.body["dedup_key"], "ballast/node-1/degraded");
    let vo = victorops::VictorOps::new(config().victorops.unwrap());
    let req = vo.request(&t);
    assert_eq!(
        req.url,
        "http://127.0.0.1:1/integrations/generic/20131114/alert/A/K"
    );
    assert_eq!(req.body["message_type"], "CRITICAL");
    let rec = vo.request(&r);
    assert_eq!(rec.body["message_type"], "RECOVERY");
    assert_eq!(rec.body["entity_id"], req.body["entity_id"]);
    assert!(req.body["timestamp"].as_u64().unwrap() > 1_600_000_000);
}

#[test]
fn raise_is_durable_and_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.redb");
    {
        let alerts = Alerts::open(&path, &config()).unwrap();
        let t = alerts.alert(
            "degraded",
            Action::Trigger,
            Severity::Critical,
            "x",
            json!({}),
        );
        assert!(alerts.raise("degraded:trigger:1", t.clone()).unwrap());
        assert!(!alerts.raise("degraded:trigger:1", t).unwrap());
        assert_eq!(alerts.pending().unwrap(), 2, "one entry per notifier");
    }
    let alerts = Alerts::open(&path, &config()).unwrap();
    assert_eq!(alerts.pending().unwrap(), 2, "survives a restart");
}

#[test]
fn open_conditions_are_tracked_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.redb");
    let at;
    {
        let alerts = Alerts::open(&path, &config()).unwrap();
        assert_eq!(alerts.open_since("fsync").unwrap(), None);
        let t = alerts.alert("fsync", Action::Trigger, Severity::Critical, "x", json!({}));
        at = t.at_ms;
        alerts.raise("fsync:1", t).unwrap();
    }
    let alerts = Alerts::open(&path, &config()).unwrap();
    assert_eq!(alerts.open_since("fsync").unwrap(), Some(at));
    let r = alerts.alert("fsync", Action::Resolve, Severity::Info, "ok", json!({}));
    alerts.raise("fsync:resolved:1", r).unwrap();
    assert_eq!(alerts.open_since("fsync").unwrap(), None);
}

#[test]
fn a_resolve_waits_for_its_trigger_being_retried() {
    let dir = tempfile::tempdir().unwrap();
    let alerts = Alerts::open(&dir.path().join("a.redb"), &config()).unwrap();
    let raise = |key: &str, action, id: &str| {
        let a = alerts.alert(key, action, Severity::Critical, "x", json!({}));
        alerts.raise(id, a).unwrap();
    };
    raise("degraded", Action::Trigger, "d:t");
    raise("storage-90", Action::Trigger, "s:t");
    raise("degraded", Action::Resolve, "d:r");
    // Entries 1..=6: (pd, vo) for each of the three. The PagerDuty trigger of
    // "degraded" failed and waits for its retry.
    let (due, _) = alerts.due(0).unwrap();
    let (id, mut first) = due.into_iter().next().unwrap();
    assert_eq!(
        (first.notifier.as_str(), first.alert.key.as_str()),
        ("pagerduty", "degraded")
    );
    first.next_at_ms = 10_000;
    alerts.reschedule(id, &first).unwrap();

    let (due, next) = alerts.due(5_000).unwrap();
    let sent: Vec<(String, String, Action)> = due
        .iter()
        .map(|(_, e)| (e.notifier.clone(), e.alert.key.clone(), e.alert.action))
        .collect();
    assert_eq!(
        sent,
        vec![
            ("victorops".into(), "degraded".into(), Action::Trigger),
            ("pagerduty".into(), "storage-90".into(), Action::Trigger),
            ("victorops".into(), "storage-90".into(), Action::Trigger),
            ("victorops".into(), "degraded".into(), Action::Resolve),
        ],
        "PagerDuty's resolve of degraded waits behind its trigger; nothing else does"
    );
    assert_eq!(next, Some(10_000));
    // Once the trigger is due, both go, trigger first.
    let (due, _) = alerts.due(10_000).unwrap();
    let pd: Vec<Action> = due
        .iter()
        .filter(|(_, e)| e.notifier == "pagerduty" && e.alert.key == "degraded")
        .map(|(_, e)| e.alert.action)
        .collect();
    assert_eq!(pd, vec![Action::Trigger, Action::Resolve]);
}
