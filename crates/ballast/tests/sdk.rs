//! The Rust SDK (`crates/ballast-sdk`) against the real server: its on-device queue keeps
//! events through the server's downtime and the app's restarts, stays within its bound,
//! and finds and drops only the events the server refuses.

mod common;

use std::time::Duration;

use ballast_sdk::{Client, Config, Error, User};
use common::{free_port, Server, WRITE_KEY};
use serde_json::json;

/// A client that retries fast (tests only; the defaults are 1 s to 5 min).
fn sdk_config(port: u16, queue: &std::path::Path) -> Config {
    let mut c = Config::new(format!("http://127.0.0.1:{port}"), WRITE_KEY, queue);
    c.flush_interval = Duration::from_millis(50);
    c.min_backoff = Duration::from_millis(20);
    c.max_backoff = Duration::from_millis(300);
    c.timeout = Duration::from_secs(10);
    c
}

/// The server's config listening on `port`, plus `extra`.
fn server_on(port: u16, extra: &str) -> String {
    common::config(extra).replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
        1,
    )
}

fn stored_ids(server: &Server) -> Vec<String> {
    server
        .dump()
        .iter()
        .map(|e| e["messageId"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn queued_events_survive_server_downtime_and_app_restarts() {
    let port = free_port();
    let device = tempfile::tempdir().unwrap();
    let mut sent = Vec::new();

    // The server is down: events are queued on the device, nothing is lost.
    let client = Client::open(sdk_config(port, device.path())).unwrap();
    for i in 0..40 {
        let user = User::id(format!("u{}", i % 4));
        sent.push(client.track(&user, "Played", json!({ "i": i })).unwrap());
    }
    assert!(
        !client.flush(Duration::from_millis(300)),
        "nothing to send to"
    );
    assert!(client.stats().failed_requests > 0);
    // The app is closed without sending.
    drop(client);

    // The app starts again, queues more, still offline.
    let client = Client::open(sdk_config(port, device.path())).unwrap();
    for i in 40..80 {
        let user = User::anonymous(format!("a{}", i % 3));
        sent.push(client.page(&user, "Home", json!({ "i": i })).unwrap());
    }

    // The server comes up on that address: everything arrives, once, in queue order.
    let server = Server::start(&server_on(port, ""));
    assert!(
        client.flush(Duration::from_secs(60)),
        "{:?}",
        client.stats()
    );
    assert_eq!(stored_ids(&server), sent);
    let stats = client.stats();
    assert_eq!((stats.sent, stats.rejected), (80, 0), "{stats:?}");
    let stored = server.dump();
    assert_eq!(stored[0]["context"]["library"]["name"], "ballast-sdk-rust");
    assert_eq!(stored[0]["type"], "track");
    assert_eq!(stored[79]["type"], "page");
    assert!(client.shutdown(Duration::from_secs(5)));

    // Reopened: nothing is sent twice.
    let client = Client::open(sdk_config(port, device.path())).unwrap();
    assert!(client.flush(Duration::from_secs(10)));
    assert_eq!(client.stats().sent, 0);
    assert_eq!(stored_ids(&server).len(), 80);
}

#[test]
fn a_full_queue_refuses_new_events_and_keeps_what_it_holds() {
    let port = free_port();
    let device = tempfile::tempdir().unwrap();
    let mut config = sdk_config(port, device.path());
    config.max_queue_bytes = 256 << 10;
    let client = Client::open(config).unwrap();
    let pad = "x".repeat(2000);
    let mut queued = Vec::new();
    let mut refused = 0;
    // Bounded: the queue holds ~120 such events.
    for i in 0..1000 {
        match client.track(&User::id("u"), "Big", json!({ "i": i, "pad": pad })) {
            Ok(id) => queued.push(id),
            Err(Error::QueueFull(limit)) => {
                assert_eq!(limit, 256 << 10);
                refused += 1;
                if refused == 5 {
                    break;
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(refused, 5, "the queue never filled");
    assert!(queued.len() > 50, "{}", queued.len());

    let server = Server::start(&server_on(port, ""));
    assert!(
        client.flush(Duration::from_secs(60)),
        "{:?}",
        client.stats()
    );
    assert_eq!(
        stored_ids(&server),
        queued,
        "everything queued arrives, in order"
    );
    // Sent segments are deleted: there is room again.
    let id = client
        .track(&User::id("u"), "Big", json!({ "pad": pad }))
        .expect("room again after sending");
    assert!(client.shutdown(Duration::from_secs(30)));
    assert_eq!(stored_ids(&server).last(), Some(&id));
}

#[test]
fn only_the_event_the_server_refuses_is_dropped() {
    let port = free_port();
    let device = tempfile::tempdir().unwrap();
    // The server takes requests of at most 20 000 bytes: one event of 30 000 can never go.
    let server = Server::start(&server_on(port, "").replacen(
        "[server]\n",
        "[server]\nmax_request_bytes = 20000\n",
        1,
    ));
    let mut config = sdk_config(port, device.path());
    config.flush_interval = Duration::from_secs(60); // batches only as flush sends them
    let client = Client::open(config).unwrap();
    let mut good = Vec::new();
    let mut bad = String::new();
    for i in 0..30 {
        let user = User::id(format!("u{}", i % 2));
        if i == 17 {
            bad = client
                .track(&user, "Huge", json!({ "pad": "y".repeat(30_000) }))
                .unwrap();
        } else {
            good.push(client.track(&user, "Small", json!({ "i": i })).unwrap());
        }
    }
    assert!(
        client.flush(Duration::from_secs(60)),
        "{:?}",
        client.stats()
    );
    let stored = stored_ids(&server);
    assert_eq!(stored, good, "all but the refused event, in order");
    assert!(!stored.contains(&bad));
    let stats = client.stats();
    assert_eq!((stats.sent, stats.rejected), (29, 1), "{stats:?}");
    assert!(client.shutdown(Duration::from_secs(5)));
}
