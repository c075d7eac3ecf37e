use super::*;
use crate::alerts::AlertsConfig;

fn alerts(dir: &Path) -> Arc<Alerts> {
    let cfg = AlertsConfig {
        aborts_clear_after: std::time::Duration::from_secs(3600),
        source: Some("t".into()),
        pagerduty: Some(crate::alerts::pagerduty::PagerDutyConfig {
            routing_key: "R".into(),
            base_url: "http://127.0.0.1:1".into(),
        }),
        ..Default::default()
    };
    Alerts::open(&dir.join("alerts.redb"), &cfg).unwrap()
}

fn cfg() -> RecoveryConfig {
    RecoveryConfig {
        crash_threshold: 3,
        crash_window: Duration::from_secs(300),
        poison_threshold: 3,
        degraded_quiet_period: None,
    }
}

#[test]
fn crashes_not_clean_restarts_lead_to_degraded() {
    let dir = tempfile::tempdir().unwrap();
    let a = alerts(dir.path());
    // Clean restarts never count.
    for _ in 0..10 {
        let (r, rep) = Recovery::start(dir.path(), cfg(), None, a.clone()).unwrap();
        assert!(!rep.crashed);
        assert_eq!(rep.mode, Mode::Normal);
        r.clean_shutdown().unwrap();
    }
    // Three starts after unclean exits.
    let mut last = None;
    for i in 1..=3 {
        let (r, rep) = Recovery::start(dir.path(), cfg(), None, a.clone()).unwrap();
        assert_eq!(rep.crashed, i > 1 || last.is_some());
        last = Some(r);
    }
    let (r, rep) = Recovery::start(dir.path(), cfg(), None, a.clone()).unwrap();
    assert!(rep.crashed);
    assert_eq!(rep.crashes_in_window, 3);
    assert_eq!(rep.mode, Mode::Degraded);
    assert_eq!(a.pending().unwrap(), 1, "degraded alert in the outbox");
    // It stays degraded across a clean restart…
    r.clean_shutdown().unwrap();
    let (r, rep) = Recovery::start(dir.path(), cfg(), None, a.clone()).unwrap();
    assert_eq!(rep.mode, Mode::Degraded);
    // …until an operator switches it back, which clears the crash history.
    r.set_mode(Mode::Normal).unwrap();
    assert_eq!(a.pending().unwrap(), 2, "resolve in the outbox");
    let (_r, rep) = Recovery::start(dir.path(), cfg(), None, a.clone()).unwrap();
    assert!(rep.crashed, "the previous run was not shut down cleanly");
    assert_eq!(rep.crashes_in_window, 1);
    assert_eq!(rep.mode, Mode::Normal);
}

#[test]
fn forced_mode_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let a = alerts(dir.path());
    let (r, rep) = Recovery::start(dir.path(), cfg(), Some(Mode::Degraded), a.clone()).unwrap();
    assert_eq!(rep.mode, Mode::Degraded);
    r.clean_shutdown().unwrap();
    let (_, rep) = Recovery::start(dir.path(), cfg(), None, a.clone()).unwrap();
    assert_eq!(rep.mode, Mode::Degraded, "durable");
}
