//! De-duplication by messageId per source (`dedup_window`, on by default): a copy of an
//! event stored within the window is answered 200 and not stored again, counted in
//! `ballast_ingest_duplicates_total`; the ids survive a kill -9; `"0s"` turns it off.

mod common;

use std::sync::Arc;

use serde_json::{json, Value};

use common::{client, event, metric, Server, WRITE_KEY};

fn post(server: &Server, ids: &[&str]) {
    let batch: Vec<Value> = ids.iter().map(|id| event("u", id)).collect();
    let r = client()
        .post(server.url("/v1/batch"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({ "batch": batch }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text());
}

fn stored_ids(server: &Server) -> Vec<String> {
    server
        .dump()
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn copies_are_answered_200_and_stored_once_across_a_kill_9() {
    let config = common::config("");
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut server = Server::start_in(dir.clone(), &config, &[]);
    post(&server, &["a", "b"]);
    // A copy of both, one repeat inside the request, one new event.
    post(&server, &["a", "c", "b", "c"]);
    assert_eq!(stored_ids(&server), ["a", "b", "c"]);
    assert_eq!(
        metric(&server, "ballast_ingest_duplicates_total{source=\"web\"}"),
        Some(3.0)
    );
    // All copies: nothing stored, still 200.
    post(&server, &["b"]);
    assert_eq!(stored_ids(&server).len(), 3);

    server.kill9();
    drop(server);
    let server = Server::start_in(dir.clone(), &config, &[]);
    post(&server, &["a", "d", "c"]);
    assert_eq!(stored_ids(&server), ["a", "b", "c", "d"]);
    assert_eq!(
        metric(&server, "ballast_ingest_duplicates_total{source=\"web\"}"),
        Some(2.0)
    );
}

#[test]
fn a_zero_window_stores_every_copy() {
    let config = common::config("").replacen(
        "write_key = \"test-write-key\"",
        "write_key = \"test-write-key\"\ndedup_window = \"0s\"",
        1,
    );
    let server = Server::start(&config);
    post(&server, &["a"]);
    post(&server, &["a"]);
    assert_eq!(stored_ids(&server), ["a", "a"]);
}
