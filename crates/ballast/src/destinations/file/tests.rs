use super::*;
use crate::destinations::{Destination, Event, Outcome};
use std::sync::Arc;

fn ev(n: usize) -> Event {
    Event {
        json: bytes::Bytes::from(format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(40)).into_bytes()),
        message_id: Arc::from(format!("m{n}")),
        source: Arc::from("web"),
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
