//! What every `RouterState` backend must do, run against each (redb and PostgreSQL).

use serde_json::value::RawValue;

use super::{from_ms, DeadLetter, RetryInfo, RouterState};

pub(crate) fn letter(dest: &str, n: u64, dead_at_ms: u64) -> DeadLetter {
    DeadLetter {
        id: 0,
        destination: dest.into(),
        position: Some(n * 100),
        source: "web".into(),
        event: RawValue::from_string(format!(r#"{{"n":{n}}}"#)).unwrap(),
        attempts: 1,
        first_attempt_ms: 1,
        dead_at_ms,
        status: Some(400),
        reason: "bad".into(),
        kind: "aborted".into(),
    }
}

/// `a` and `b` are two handles on one state (two replicas of the PostgreSQL store, or
/// the one redb of a data directory twice): what one writes, the other sees. Leaves
/// one dead letter of "a" and one of "b".
pub(crate) async fn dead_letters_retry_state_and_strikes(a: &dyn RouterState, b: &dyn RouterState) {
    let info = RetryInfo {
        attempts: 2,
        first_attempt_ms: 5,
    };
    a.save_retry("a", &[(100, Some(info))]).await.unwrap();
    assert_eq!(b.load_retry("a").await.unwrap()[&100], info);
    let ids = a
        .add_dead_letters(vec![
            letter("a", 1, 10),
            letter("a", 2, 20),
            letter("b", 3, 30),
        ])
        .await
        .unwrap();
    assert_eq!(ids.len(), 3);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    assert!(
        b.load_retry("a").await.unwrap().is_empty(),
        "dead letters clear retry state"
    );
    assert_eq!(b.count("a").await.unwrap(), 2);
    assert_eq!(b.list(None, 10).await.unwrap().len(), 3);
    assert_eq!(b.list(Some("a"), 10).await.unwrap()[0].id, ids[0]);
    assert_eq!(b.replay("a", Some(from_ms(15))).await.unwrap(), 1);
    assert_eq!(a.count("a").await.unwrap(), 1);
    let q = a.replay_queue("a").await.unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].event.get(), r#"{"n":2}"#);
    a.replay_done("a", &[q[0].id]).await.unwrap();
    assert!(b.replay_queue("a").await.unwrap().is_empty());
    assert_eq!(b.count("b").await.unwrap(), 1);
    let events = vec![("a".to_string(), "m1".to_string())];
    assert_eq!(a.add_strikes(&events).await.unwrap(), vec![1]);
    assert_eq!(b.add_strikes(&events).await.unwrap(), vec![2]);
    assert_eq!(a.load_strikes("a").await.unwrap()["m1"], 2);
    b.clear_strikes("a", &["m1".to_string()]).await.unwrap();
    assert!(a.load_strikes("a").await.unwrap().is_empty());
}
