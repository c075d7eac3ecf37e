use super::*;
use crate::destinations::{Destination, Event, Outcome};
use std::sync::Arc;

fn ev(n: usize) -> Event {
    Event {
        json: bytes::Bytes::from(format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(40)).into_bytes()),
        message_id: format!("m{n}").into(),
    }
}

#[tokio::test]
async fn writes_lines_and_rotates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out").join("events.jsonl");
    let sink = FileSink::new(&FileConfig {
        path: path.clone(),
        max_file_bytes: 200,
    })
    .unwrap();
    for i in 0..10 {
        assert_eq!(sink.deliver(&[ev(i)]).await, Outcome::Delivered);
    }
    let mut lines = Vec::new();
    let mut files = 0;
    for entry in std::fs::read_dir(path.parent().unwrap()).unwrap() {
        files += 1;
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            lines.push(v["n"].as_u64().unwrap());
        }
    }
    lines.sort();
    assert_eq!(lines, (0..10).collect::<Vec<_>>());
    assert!(files > 1, "rotated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deliveries_share_fsyncs_and_every_line_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let sink = Arc::new(
        FileSink::new(&FileConfig {
            path: path.clone(),
            max_file_bytes: 1 << 30,
        })
        .unwrap(),
    );
    let mut tasks = Vec::new();
    for t in 0..32 {
        let sink = sink.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let n = t * 1000 + i;
                assert_eq!(
                    sink.deliver(&[ev(n), ev(n + 500)]).await,
                    Outcome::Delivered
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["n"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(lines.len(), 32 * 25 * 2);
    // Each delivery's events are written together, in order.
    for pair in text.lines().collect::<Vec<_>>().chunks(2) {
        let a: serde_json::Value = serde_json::from_str(pair[0]).unwrap();
        let b: serde_json::Value = serde_json::from_str(pair[1]).unwrap();
        assert_eq!(a["n"].as_u64().unwrap() + 500, b["n"].as_u64().unwrap());
    }
    lines.sort();
    lines.dedup();
    assert_eq!(lines.len(), 32 * 25 * 2, "no line twice");
    let stats = sink.stats();
    let deliveries = stats.deliveries.load(std::sync::atomic::Ordering::Relaxed);
    let syncs = stats.syncs.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(deliveries, 32 * 25);
    assert!(
        syncs < deliveries,
        "group commit: {syncs} fsyncs for {deliveries} deliveries"
    );
}
