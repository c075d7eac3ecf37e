//! Delivery, through the real binary: webhook and file destinations fed by a programmable
//! HTTP receiver that records every request and answers by rule (200, 500, 429 +
//! Retry-After, 400, 503, or hangs). Checks the delivery semantics (README, "Delivery";
//! docs/OPERATIONS.md, "Destinations, retries and dead letters"): at least once, per-user order, retries and backoff, dead letters and replay,
//! independent destinations, kill -9, and disk space given back once a backlog drains.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::receiver::{always, rule, url_for, Received, Receiver, Reply};
use common::{
    check_user_order, event_padded, free_port, metric, mid, ordering_key, wait_for, Server,
    WRITE_KEY,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------
// Events, sending, waiting, checking
// ---------------------------------------------------------------------------------------

fn post(server: &Server, path: &str, body: &Value) {
    let r = common::client()
        .post(server.url(path))
        .basic_auth(WRITE_KEY, Some(""))
        .json(body)
        .send()
        .unwrap();
    let status = r.status();
    assert_eq!(status, 200, "{path}: {}", r.text().unwrap_or_default());
}

/// Sends the events in order, each call one event (`/v1/track`) or a batch of 2 to 8
/// (`/v1/batch`), chosen at random; every call must be acknowledged.
fn send_mixed(server: &Server, events: &[Value], rng: &mut StdRng) {
    let mut i = 0;
    while i < events.len() {
        if rng.gen_bool(0.4) {
            post(server, "/v1/track", &events[i]);
            i += 1;
        } else {
            let n = rng.gen_range(2..=8).min(events.len() - i);
            post(server, "/v1/batch", &json!({ "batch": &events[i..i + n] }));
            i += n;
        }
    }
}

fn mids(events: &[Value]) -> Vec<&str> {
    events.iter().map(mid).collect()
}

fn ids(events: &[Value]) -> HashSet<String> {
    events.iter().map(|e| mid(e).to_string()).collect()
}

fn status(server: &Server) -> Value {
    common::admin_get(server, "/v1/status")
}

fn dest_status(server: &Server, id: &str) -> Value {
    let s = status(server);
    s["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no destination {id} in {s}"))
}

fn dead_letters(server: &Server, id: &str) -> Vec<Value> {
    serde_json::from_value(common::admin_get(
        server,
        &format!("/v1/dead-letters?destination={id}"),
    ))
    .unwrap()
}

/// A webhook destination table.
fn webhook(id: &str, url: &str, extra: &str) -> String {
    format!(
        r#"
[[destinations]]
id = "{id}"
type = "webhook"
sources = ["web"]
url = "{url}"
{extra}
"#
    )
}

/// Retries that never give up within a test (and back off quickly).
const PATIENT: &str = r#"retry = { max_attempts = 1000000, retry_window = "1h", min_backoff = "20ms", max_backoff = "200ms" }"#;

/// How many deliveries beyond the first of each messageId.
fn duplicates(delivered: &[Value]) -> usize {
    delivered.len() - ids(delivered).len()
}

/// `ballast log dump --meta`: (position, event) of every stored event.
fn dump_meta(data_dir: &Path) -> Vec<(u64, Value)> {
    common::log_dump(data_dir, &["--meta"])
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["position"].as_u64().unwrap(), v["event"].clone())
        })
        .collect()
}

/// The `.seg` files of the log: how many, and their total size.
fn segments(data_dir: &Path) -> (usize, u64) {
    let mut n = 0;
    let mut bytes = 0;
    for e in std::fs::read_dir(data_dir.join("log")).unwrap() {
        let e = e.unwrap();
        if e.path().extension().map(|x| x == "seg").unwrap_or(false) {
            n += 1;
            bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    (n, bytes)
}

/// The cursor and the finished ranges above it saved for a consumer, read as the log
/// reads them: `log/cursors/<name>` (the cursor as text, as every release wrote it) and
/// `log/cursors/<name>+done` ("BLDR", version 1, cursor u64, count u32, varint gaps and
/// lengths, CRC32C; ballast-log's `cursor.rs`); the further cursor of the two counts.
fn saved_progress(data_dir: &Path, name: &str) -> (u64, Vec<(u64, u64)>) {
    let dir = data_dir.join("log").join("cursors");
    let mut cursor: u64 = std::fs::read_to_string(dir.join(name))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let Ok(b) = std::fs::read(dir.join(format!("{name}+done"))) else {
        return (cursor, Vec::new());
    };
    assert_eq!(
        (&b[..4], b[4]),
        (&b"BLDR"[..], 1),
        "a ranges file of version 1"
    );
    let base = u64::from_le_bytes(b[5..13].try_into().unwrap());
    let count = u32::from_le_bytes(b[13..17].try_into().unwrap());
    let mut at = 17;
    let mut varint = || {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let byte = b[at];
            at += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return v;
            }
            shift += 7;
        }
    };
    let mut prev = base;
    let mut done = Vec::new();
    for _ in 0..count {
        let start = prev + varint();
        let end = start + varint();
        done.push((start, end));
        prev = end;
    }
    cursor = cursor.max(base);
    let done = done
        .into_iter()
        .filter(|r| r.1 > cursor)
        .map(|(a, z)| (a.max(cursor), z))
        .collect();
    (cursor, done)
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(common::bin()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Deterministic pseudo-random number in 0..100 for (seed, messageId, attempt).
fn roll(seed: u64, id: &str, attempt: usize) -> u64 {
    let mut h = DefaultHasher::new();
    (seed, id, attempt).hash(&mut h);
    h.finish() % 100
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// 1. Every accepted event reaches the webhook once, as stored, with the configured
///    headers, `Content-Type: application/json` and `idempotency-key` = messageId.
#[test]
fn every_event_reaches_the_webhook_as_stored_with_headers() {
    let rx = Receiver::start(always(200));
    let extra = webhook(
        "hook",
        &rx.url(),
        &format!(
            "headers = {{ \"X-Token\" = \"secret\", \"X-Other\" = \"two words\" }}\n{PATIENT}"
        ),
    );
    let server = Server::start(&common::config(&extra));
    post(&server, "/v1/track", &event_padded("alice", "t-1", 3));
    // No messageId: the server makes one up, and it must be the idempotency key.
    post(
        &server,
        "/v1/identify",
        &json!({"userId": "bob", "traits": {"plan": "pro"}}),
    );
    post(
        &server,
        "/v1/page",
        &json!({"anonymousId": "anon-1", "messageId": "p-1", "name": "Home"}),
    );
    post(
        &server,
        "/v1/batch",
        &json!({"batch": [
            event_padded("alice", "t-2", 0),
            {"type": "group", "userId": "carol", "groupId": "g", "messageId": "g-1"},
            {"type": "screen", "anonymousId": "anon-1", "name": "S"},
            event_padded("alice", "t-3", 10),
        ]}),
    );
    let stored = server.dump();
    assert_eq!(stored.len(), 7);
    let all = ids(&stored);
    assert_eq!(all.len(), 7, "every stored event has its own messageId");
    assert!(
        wait_for(20, || rx.has_all(&all)),
        "not delivered: {:?}\n{}",
        rx.requests(),
        server.stderr()
    );
    // Give a duplicate the chance to show up.
    std::thread::sleep(Duration::from_millis(300));
    let reqs = rx.requests();
    assert_eq!(reqs.len(), 7, "one request per event: {reqs:?}");
    let by_id: HashMap<&str, &Value> = stored.iter().map(|e| (mid(e), e)).collect();
    for r in &reqs {
        assert_eq!(r.status, 200);
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/ingest");
        let id = mid(&r.body);
        assert_eq!(&r.body, by_id[id], "the body is the stored event");
        assert_eq!(r.headers.get("x-token").map(String::as_str), Some("secret"));
        assert_eq!(
            r.headers.get("x-other").map(String::as_str),
            Some("two words")
        );
        assert_eq!(
            r.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        assert_eq!(
            r.headers.get("idempotency-key").map(String::as_str),
            Some(id)
        );
    }
    check_user_order(&stored, &rx.ok_events()).unwrap();
    let d = dest_status(&server, "hook");
    assert_eq!(d["delivered"], 7, "{d}");
    assert_eq!(d["aborted"], 0, "{d}");
    assert_eq!(d["kind"], "webhook", "{d}");
}

/// 2. Property: whatever requests fail (500, 429, hangs past the timeout) for some users,
///    each user's events are delivered in the order they were accepted, every one
///    exactly once with a 200, and the other users are not held back for good.
#[test]
fn per_user_order_holds_while_the_receiver_fails_at_random() {
    let started = Instant::now();
    let base_seed: u64 = std::env::var("DELIVERY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0bad_5eed);
    const CASES: u64 = 6;
    for case in 0..CASES {
        let seed = base_seed.wrapping_add(case);
        let mut rng = StdRng::seed_from_u64(seed);
        let users: Vec<String> = (0..10).map(|u| format!("user-{u}")).collect();
        let flaky: BTreeSet<String> = users
            .iter()
            .filter(|_| rng.gen_bool(0.5))
            .map(|u| format!("u:{u}"))
            .collect();
        let fail_pct: u64 = rng.gen_range(20..=50);
        let batch_size = if case % 2 == 1 { 4 } else { 1 };
        let concurrency = [16, 3][(case / 2 % 2) as usize];
        let n = 200;
        let events: Vec<Value> = (0..n)
            .map(|i| {
                let u = &users[rng.gen_range(0..users.len())];
                event_padded(u, &format!("s{seed}-e{i}"), rng.gen_range(0..40))
            })
            .collect();
        let label = format!(
            "seed {seed}: flaky {flaky:?}, fail {fail_pct}%, batch_size {batch_size}, concurrency {concurrency}"
        );
        let flaky_rule = flaky.clone();
        let rx = Receiver::start(rule(move |h| {
            let any_flaky = h
                .events
                .iter()
                .any(|e| flaky_rule.contains(&ordering_key(e)));
            // Bounded: the 6th attempt of a request always succeeds.
            if !any_flaky || h.attempt >= 6 {
                return Reply::Status(200);
            }
            let r = roll(seed, h.mid(), h.attempt);
            if r >= fail_pct {
                return Reply::Status(200);
            }
            match r % 10 {
                0 => Reply::Hang(Duration::from_millis(3000)),
                1 => Reply::RetryAfter(429, 1),
                2..=4 => Reply::Status(429),
                5 => Reply::Status(503),
                _ => Reply::Status(500),
            }
        }));
        let extra = webhook(
            "hook",
            &rx.url(),
            &format!(
                "timeout = \"2s\"\nbatch_size = {batch_size}\nconcurrency = {concurrency}\n{PATIENT}"
            ),
        );
        let server = Server::start(&common::config(&extra));
        send_mixed(&server, &events, &mut rng);
        let stored = server.dump();
        assert_eq!(
            mids(&stored),
            mids(&events),
            "{label}: the log holds what was accepted"
        );
        let want = ids(&events);
        let done = wait_for(40, || rx.ok_count() >= n && rx.has_all(&want));
        let delivered = rx.ok_events();
        assert!(
            done,
            "{label}: only {} of {n} delivered after 40 s; status {}",
            rx.ok_distinct(),
            status(&server)
        );
        check_user_order(&events, &delivered).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(
            duplicates(&delivered),
            0,
            "{label}: an event answered 200 was sent again"
        );
        let failed = rx.requests().iter().filter(|r| r.status != 200).count();
        for r in rx.requests() {
            let key = match &r.body {
                Value::Array(items) => format!("{}+{}", mid(&items[0]), items.len()),
                one => mid(one).to_string(),
            };
            assert_eq!(r.headers.get("idempotency-key"), Some(&key), "{label}");
            assert!(
                r.events.len() <= batch_size,
                "{label}: {} events",
                r.events.len()
            );
        }
        assert!(
            wait_for(5, || dest_status(&server, "hook")["delivered"] == n),
            "{label}: {}",
            dest_status(&server, "hook")
        );
        let d = dest_status(&server, "hook");
        assert_eq!(d["aborted"], 0, "{label}: {d}");
        assert_eq!(d["dead_letters"], 0, "{label}: {d}");
        eprintln!(
            "order case {case} ({label}): {n} events, {failed} failed requests, {} ms",
            started.elapsed().as_millis()
        );
        if !flaky.is_empty() {
            assert!(failed > 0, "{label}: the rule failed nothing");
        }
    }
}

/// 3. A receiver that is not listening at all, and one that answers 503 to everything,
///    come back: each then gets every event once, in order per user.
#[test]
fn receivers_that_were_down_get_everything_in_order_when_back() {
    let port = free_port();
    let flaky = Receiver::start(always(503));
    let extra = format!(
        "{}{}",
        webhook("absent", &url_for(port), PATIENT),
        webhook("unavailable", &flaky.url(), PATIENT)
    );
    let server = Server::start(&common::config(&extra));
    let mut rng = StdRng::seed_from_u64(3);
    let events: Vec<Value> = (0..120)
        .map(|i| event_padded(&format!("user-{}", i % 6), &format!("d-{i}"), i % 17))
        .collect();
    send_mixed(&server, &events, &mut rng);
    assert!(
        wait_for(20, || {
            let a = dest_status(&server, "absent");
            let u = dest_status(&server, "unavailable");
            a["retries"].as_u64().unwrap() >= 12 && u["retries"].as_u64().unwrap() >= 12
        }),
        "{}",
        status(&server)
    );
    assert_eq!(dest_status(&server, "absent")["delivered"], 0);
    assert_eq!(dest_status(&server, "unavailable")["delivered"], 0);
    assert!(flaky.requests().iter().all(|r| r.status == 503));
    let attempts_while_down = flaky.requests().len();
    assert!(attempts_while_down >= 6, "{attempts_while_down}");

    let back = Receiver::start_on(port, always(200));
    flaky.set_rule(always(200));
    let want = ids(&events);
    assert!(
        wait_for(30, || back.has_all(&want) && flaky.has_all(&want)),
        "absent got {}, unavailable got {} of {}; {}",
        back.ok_distinct(),
        flaky.ok_distinct(),
        events.len(),
        status(&server)
    );
    for (name, rx) in [("absent", &back), ("unavailable", &flaky)] {
        let delivered = rx.ok_events();
        check_user_order(&events, &delivered).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(delivered.len(), events.len(), "{name}: each event once");
        assert!(
            wait_for(5, || dest_status(&server, name)["delivered"] == 120),
            "{}",
            dest_status(&server, name)
        );
        assert_eq!(dest_status(&server, name)["aborted"], 0);
    }
    assert_eq!(
        back.requests().len(),
        120,
        "nothing reached the absent receiver before it listened"
    );
}

/// 4. A 400 goes to the dead letters at once (one attempt), shows in the admin API and
///    `ballast dead-letters list`; replay (CLI and POST) delivers it once the receiver
///    takes it, and the list is empty afterwards.
#[test]
fn a_400_is_dead_lettered_at_once_and_replay_delivers_it() {
    let accept_bad = Arc::new(Mutex::new(false));
    let flag = accept_bad.clone();
    let rx = Receiver::start(rule(move |h| {
        if h.mid().starts_with("bad") && !*flag.lock().unwrap() {
            Reply::Status(400)
        } else {
            Reply::Status(200)
        }
    }));
    let extra = webhook("hook", &rx.url(), PATIENT);
    let server = Server::start(&common::config(&extra));
    let batch = [
        event_padded("u", "ok-1", 0),
        event_padded("u", "bad-1", 0),
        event_padded("u", "ok-2", 0),
        event_padded("v", "ok-3", 0),
    ];
    post(&server, "/v1/batch", &json!({ "batch": batch }));
    let stored = server.dump();
    assert!(
        wait_for(20, || dead_letters(&server, "hook").len() == 1
            && rx.has_all(&ids(&[
                batch[0].clone(),
                batch[2].clone(),
                batch[3].clone()
            ]))),
        "{:?} {}",
        rx.requests(),
        status(&server)
    );
    // The user's later event went on after the bad one.
    let order: Vec<String> = rx
        .requests()
        .iter()
        .filter(|r| ordering_key(&r.body) == "u:u")
        .map(|r| format!("{}:{}", mid(&r.body), r.status))
        .collect();
    assert_eq!(order, ["ok-1:200", "bad-1:400", "ok-2:200"]);
    assert_eq!(rx.attempts_of("bad-1").len(), 1, "no retry after a 400");

    let letters = dead_letters(&server, "hook");
    let l = &letters[0];
    assert_eq!(l["status"], 400, "{l}");
    assert_eq!(l["attempts"], 1, "{l}");
    assert_eq!(l["destination"], "hook", "{l}");
    assert_eq!(l["source"], "web", "{l}");
    assert_eq!(l["kind"], "aborted", "{l}");
    assert_eq!(l["reason"], "bad event", "{l}");
    assert_eq!(
        &l["event"], &stored[1],
        "the dead letter holds the stored event"
    );
    let d = dest_status(&server, "hook");
    assert_eq!(
        (d["aborted"].as_u64(), d["dead_letters"].as_u64()),
        (Some(1), Some(1)),
        "{d}"
    );
    assert_eq!(dead_letters(&server, "other"), Vec::<Value>::new());

    let admin = server.admin.as_str();
    let (ok, out, err) = cli(&[
        "dead-letters",
        "list",
        "--destination",
        "hook",
        "--admin",
        admin,
    ]);
    assert!(ok, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["event"]["messageId"], "bad-1");
    assert_eq!(lines[0]["status"], 400);

    // Replay while the receiver still refuses it: dead again, one more attempt.
    let (ok, out, err) = cli(&[
        "dead-letters",
        "replay",
        "--destination",
        "hook",
        "--admin",
        admin,
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "1 dead letter(s) of hook re-enqueued");
    assert!(
        wait_for(10, || rx.attempts_of("bad-1").len() == 2
            && dead_letters(&server, "hook").len() == 1),
        "{:?}",
        dead_letters(&server, "hook")
    );

    // Now the receiver takes it: replay through the CLI delivers it.
    *accept_bad.lock().unwrap() = true;
    let (ok, out, err) = cli(&[
        "dead-letters",
        "replay",
        "--destination",
        "hook",
        "--admin",
        admin,
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "1 dead letter(s) of hook re-enqueued");
    assert_eq!(dead_letters(&server, "hook"), Vec::<Value>::new());
    assert!(
        wait_for(10, || rx.has_all(&ids(&stored))),
        "{:?}",
        rx.requests()
    );
    let delivered: Vec<Received> = rx.attempts_of("bad-1");
    assert_eq!(delivered.len(), 3);
    assert_eq!(delivered[2].status, 200);
    assert_eq!(
        &delivered[2].body, &stored[1],
        "the replay sends the stored event"
    );
    assert_eq!(
        delivered[2]
            .headers
            .get("idempotency-key")
            .map(String::as_str),
        Some("bad-1")
    );
    assert!(
        wait_for(5, || dest_status(&server, "hook")["buffered_events"] == 0),
        "{}",
        dest_status(&server, "hook")
    );
    let (ok, out, _) = cli(&[
        "dead-letters",
        "list",
        "--destination",
        "hook",
        "--admin",
        admin,
    ]);
    assert!(ok);
    assert_eq!(out, "", "no dead letters left");
    let d = dest_status(&server, "hook");
    assert_eq!(d["dead_letters"], 0, "{d}");
    assert_eq!(d["delivered"], 4, "{d}\n{}", server.stderr());
    assert!(
        wait_for(5, || dest_status(&server, "hook")["backlog_bytes"] == 0),
        "the cursor did not move past the finished events: {}",
        dest_status(&server, "hook")
    );

    // The POST endpoint, with `since`.
    *accept_bad.lock().unwrap() = false;
    let before = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    post(&server, "/v1/track", &event_padded("u", "bad-2", 0));
    assert!(wait_for(10, || dead_letters(&server, "hook").len() == 1));
    *accept_bad.lock().unwrap() = true;
    let http = common::client();
    let replay = |q: &str| -> (u16, String) {
        let r = http
            .post(format!("{}/v1/dead-letters/replay?{q}", server.admin))
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    let future =
        humantime::format_rfc3339_millis(std::time::SystemTime::now() + Duration::from_secs(3600))
            .to_string();
    let (code, body) = replay(&format!("destination=hook&since={future}"));
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["replayed"], 0);
    assert_eq!(dead_letters(&server, "hook").len(), 1);
    assert_eq!(replay("destination=nope").0, 404);
    assert_eq!(replay("").0, 400);
    assert_eq!(replay("destination=hook&since=yesterday").0, 400);
    let (code, body) = replay(&format!("destination=hook&since={before}"));
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"destination": "hook", "replayed": 1})
    );
    assert_eq!(dead_letters(&server, "hook"), Vec::<Value>::new());
    assert!(wait_for(10, || rx
        .attempts_of("bad-2")
        .iter()
        .any(|r| r.status == 200)));
    assert_eq!(rx.attempts_of("bad-2").len(), 2);
}

/// 5. One destination down (503 forever, nothing aborts) does not keep a second
///    destination of the same source from getting every event.
#[test]
fn a_dead_destination_does_not_hold_back_another() {
    let a = Receiver::start(always(503));
    let b = Receiver::start(always(200));
    let extra = format!(
        "{}{}",
        webhook("down", &a.url(), PATIENT),
        webhook("up", &b.url(), PATIENT)
    );
    let server = Server::start(&common::config(&extra));
    let mut rng = StdRng::seed_from_u64(5);
    let events: Vec<Value> = (0..150)
        .map(|i| event_padded(&format!("user-{}", i % 7), &format!("b-{i}"), i % 23))
        .collect();
    send_mixed(&server, &events, &mut rng);
    let want = ids(&events);
    assert!(
        wait_for(30, || b.has_all(&want)),
        "up got {} of 150; {}",
        b.ok_distinct(),
        status(&server)
    );
    let delivered = b.ok_events();
    check_user_order(&events, &delivered).unwrap();
    assert_eq!(delivered.len(), 150, "each event once");
    assert!(!a.requests().is_empty(), "the down destination was tried");
    assert!(a.requests().iter().all(|r| r.status == 503));
    let down = dest_status(&server, "down");
    assert_eq!(down["delivered"], 0, "{down}");
    assert_eq!(down["aborted"], 0, "{down}");
    assert_eq!(down["dead_letters"], 0, "{down}");
    assert!(down["retries"].as_u64().unwrap() > 0, "{down}");
    assert!(down["backlog_bytes"].as_u64().unwrap() > 0, "{down}");
    assert!(
        wait_for(5, || dest_status(&server, "up")["delivered"] == 150),
        "{}",
        dest_status(&server, "up")
    );
    // `ballast status` shows the same.
    let (ok, out, err) = cli(&["status", "--admin", &server.admin, "--json"]);
    assert!(ok, "{err}");
    let st: Value = serde_json::from_str(&out).unwrap();
    let by_id = |id: &str| -> Value {
        st["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_id("up")["delivered"], 150, "{st}");
    assert_eq!(by_id("down")["delivered"], 0, "{st}");
    let (ok, out, err) = cli(&["status", "--admin", &server.admin]);
    assert!(ok, "{err}");
    let row = |id: &str| -> Vec<String> {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("no row {id}:\n{out}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    // destination, backlog, buffered, in flight, retrying, delivered, deliv/s, aborted,
    // dead, here (the only replica delivers both)
    assert_eq!(row("up")[5], "150", "{out}");
    assert_eq!(row("up")[9], "delivering", "{out}");
    assert_eq!(row("down")[5], "0", "{out}");
    assert_ne!(row("down")[1], "0", "{out}");
}

/// 6. kill -9 while events are being delivered, then a restart on the same directory:
///    every accepted event is delivered at least once, and the only duplicates are the
///    events at or after the destination's saved cursor that had reached the receiver
///    (in flight, or finished after the last cursor save).
#[test]
fn kill_9_during_delivery_loses_nothing() {
    let rx = Receiver::start(rule(|_| Reply::Delay(Duration::from_millis(30), 200)));
    let extra = webhook("hook", &rx.url(), &format!("concurrency = 8\n{PATIENT}"));
    let config = common::config(&extra);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut server = Server::start_in(dir.clone(), &config, &[]);
    let n = 1000;
    let events: Vec<Value> = (0..n)
        .map(|i| event_padded(&format!("user-{}", i % 25), &format!("k-{i}"), i % 50))
        .collect();
    for chunk in events.chunks(50) {
        post(&server, "/v1/batch", &json!({ "batch": chunk }));
    }
    assert!(
        wait_for(30, || rx.ok_distinct() >= 150),
        "delivery did not start: {}",
        status(&server)
    );
    server.kill9();
    // Let the requests that were on the wire land.
    std::thread::sleep(Duration::from_millis(300));
    let before_kill = rx.ok_distinct();
    let received_before: HashSet<String> = ids(&rx.ok_events());
    assert!(
        before_kill < n,
        "everything was delivered before the kill; slow the receiver down"
    );
    let (cursor, done) = saved_progress(&server.data_dir(), "dest.hook");
    let finished = |pos: u64| pos < cursor || done.iter().any(|r| r.0 <= pos && pos < r.1);
    let stored = dump_meta(&server.data_dir());
    assert_eq!(stored.len(), n);
    // Expected duplicates: delivered before the kill, neither behind the saved cursor nor
    // in a finished range saved above it.
    let expected_dups: HashSet<&str> = stored
        .iter()
        .filter(|(pos, e)| !finished(*pos) && received_before.contains(mid(e)))
        .map(|(_, e)| mid(e))
        .collect();
    let behind_cursor = stored.iter().filter(|(pos, _)| finished(*pos)).count();
    // What the cursor alone (without the ranges) would have had sent again.
    let cursor_only = stored
        .iter()
        .filter(|(pos, e)| *pos >= cursor && received_before.contains(mid(e)))
        .count();

    let server = Server::start_in(dir, &config, &[]);
    let want = ids(&events);
    assert!(
        wait_for(40, || rx.ok_count() >= n && rx.has_all(&want)),
        "after the restart only {} of {n} delivered; {}",
        rx.ok_distinct(),
        status(&server)
    );
    std::thread::sleep(Duration::from_millis(300));
    let delivered = rx.ok_events();
    let dups = duplicates(&delivered);
    eprintln!(
        "delivery crash test: {n} events, {before_kill} delivered before kill -9 \
         ({behind_cursor} behind the saved cursor or in its {} finished ranges), {dups} duplicates \
         ({cursor_only} with the cursor alone)",
        done.len()
    );
    check_user_order(&events, &delivered).unwrap();
    let mut count: HashMap<&str, usize> = HashMap::new();
    for e in &delivered {
        *count.entry(mid(e)).or_default() += 1;
    }
    for (id, c) in &count {
        let want = if expected_dups.contains(id) { 2 } else { 1 };
        assert_eq!(*c, want, "{id} delivered {c} times (cursor {cursor})");
    }
    assert_eq!(dups, expected_dups.len());
    assert!(
        wait_for(5, || dest_status(&server, "hook")["delivered"]
            == (n - behind_cursor) as u64),
        "{}",
        dest_status(&server, "hook")
    );
}

/// Ten users, one of them stuck on a receiver that refuses its events (503, retried)
/// while the other nine are delivered: the cursor stays at the stuck user's first event.
/// Returns the events sent and the receiver, once every other user's events were
/// delivered.
fn one_user_stuck(server: &Server, rx: &Receiver, per_user: usize) -> Vec<Value> {
    rx.set_rule(rule(|h| {
        if h.events.iter().any(|e| e["userId"] == "user-0") {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    }));
    let events: Vec<Value> = (0..per_user * 10)
        .map(|i| event_padded(&format!("user-{}", i % 10), &format!("k-{i}"), i % 40))
        .collect();
    for chunk in events.chunks(50) {
        post(server, "/v1/batch", &json!({ "batch": chunk }));
    }
    let others = ids(&events
        .iter()
        .filter(|e| e["userId"] != "user-0")
        .cloned()
        .collect::<Vec<_>>());
    assert!(
        wait_for(60, || rx.has_all(&others)),
        "the nine healthy users were not delivered: {} of {}; {}",
        rx.ok_distinct(),
        others.len(),
        status(server)
    );
    events
}

/// A clean restart (SIGTERM, start again on the same data directory) while one user is
/// stuck on a failing event re-sends nothing: the finished ranges above the stuck
/// cursor are saved with it and skipped after the restart. (Saving the cursor alone,
/// every event of the nine other users was sent again: 2,700 of 2,700 here.)
#[test]
fn a_restart_with_one_user_stuck_re_sends_nothing_already_delivered() {
    let rx = Receiver::start(always(200));
    let extra = webhook("hook", &rx.url(), &format!("concurrency = 8\n{PATIENT}"));
    let config = common::config(&extra);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut server = Server::start_in(dir.clone(), &config, &[]);
    let events = one_user_stuck(&server, &rx, 300);
    let delivered_before = rx.ok_distinct();
    assert!(server.terminate().success(), "{}", server.stderr());
    let (cursor, done) = saved_progress(&server.data_dir(), "dest.hook");
    rx.set_rule(always(200));
    let server = Server::start_in(dir, &config, &[]);
    let want = ids(&events);
    assert!(
        wait_for(60, || rx.has_all(&want)),
        "after the restart only {} of {} delivered; {}",
        rx.ok_distinct(),
        want.len(),
        status(&server)
    );
    std::thread::sleep(Duration::from_millis(500));
    let delivered = rx.ok_events();
    let resent = duplicates(&delivered);
    eprintln!(
        "restart with one user stuck: {} events, {delivered_before} delivered before SIGTERM, \
         saved cursor {cursor} with {} finished ranges, {resent} re-sent after the restart",
        events.len(),
        done.len()
    );
    check_user_order(&events, &delivered).unwrap();
    assert_eq!(
        resent, 0,
        "events delivered before the restart were sent again"
    );
    assert!(!done.is_empty(), "the finished ranges were saved");
}

/// A user stuck behind 5,000 of its own events, stored before 2,000 events of nine
/// other users that are delivered: the cursor stays at its first event, and the saved
/// ranges must reach past its 5,000 waiting events (byte positions: two waiting events
/// that follow each other have no finished range between them, so they do not use up
/// the 4,096 ranges a save keeps). After SIGTERM and a restart nothing is re-sent.
#[test]
fn a_restart_with_a_user_stuck_behind_thousands_of_its_events_re_sends_nothing() {
    let rx = Receiver::start(rule(|h| {
        if h.events.iter().any(|e| e["userId"] == "user-0") {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    }));
    let extra = webhook("hook", &rx.url(), &format!("concurrency = 8\n{PATIENT}"));
    let config = common::config(&extra);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut server = Server::start_in(dir.clone(), &config, &[]);
    let mut events: Vec<Value> = (0..5_000)
        .map(|i| event_padded("user-0", &format!("s-{i}"), 0))
        .collect();
    events.extend(
        (0..2_000).map(|i| event_padded(&format!("user-{}", 1 + i % 9), &format!("k-{i}"), i % 40)),
    );
    for chunk in events.chunks(250) {
        post(&server, "/v1/batch", &json!({ "batch": chunk }));
    }
    let others = ids(&events[5_000..]);
    assert!(
        wait_for(60, || rx.has_all(&others)),
        "the nine healthy users were not delivered: {}; {}",
        rx.ok_distinct(),
        status(&server)
    );
    assert!(server.terminate().success(), "{}", server.stderr());
    let (cursor, done) = saved_progress(&server.data_dir(), "dest.hook");
    rx.set_rule(always(200));
    let server = Server::start_in(dir, &config, &[]);
    let want = ids(&events);
    assert!(
        wait_for(90, || rx.has_all(&want)),
        "after the restart only {} of {} delivered; {}",
        rx.ok_distinct(),
        want.len(),
        status(&server)
    );
    std::thread::sleep(Duration::from_millis(500));
    let delivered = rx.ok_events();
    let resent = duplicates(&delivered);
    eprintln!(
        "restart with a user stuck behind 5,000 events: 2,000 delivered before SIGTERM, \
         saved cursor {cursor} with {} finished ranges, {resent} re-sent",
        done.len()
    );
    check_user_order(&events, &delivered).unwrap();
    assert_eq!(
        resent, 0,
        "events delivered before the restart were sent again"
    );
}

/// The operator's scenario: ten users, a receiver that answers 200 to the first 8,000
/// events and 503 from then on (users wait on their heads at different points), a
/// restart (SIGTERM), the receiver healthy again: nothing delivered is sent again.
#[test]
fn a_restart_after_the_receiver_turned_unhealthy_re_sends_nothing_already_delivered() {
    let rx = Receiver::start(always(200));
    let extra = webhook("hook", &rx.url(), &format!("concurrency = 16\n{PATIENT}"));
    let config = common::config(&extra);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut server = Server::start_in(dir.clone(), &config, &[]);
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = answered.clone();
    rx.set_rule(rule(move |h| {
        let n = count.fetch_add(h.events.len(), std::sync::atomic::Ordering::SeqCst);
        if n + h.events.len() <= 8_000 {
            Reply::Status(200)
        } else {
            Reply::Status(503)
        }
    }));
    let events: Vec<Value> = (0..16_000)
        .map(|i| event_padded(&format!("user-{}", i % 10), &format!("k-{i}"), i % 40))
        .collect();
    for chunk in events.chunks(200) {
        post(&server, "/v1/batch", &json!({ "batch": chunk }));
    }
    assert!(
        wait_for(60, || rx.ok_distinct() >= 7_900),
        "only {} delivered; {}",
        rx.ok_distinct(),
        status(&server)
    );
    std::thread::sleep(Duration::from_millis(500));
    let delivered_before = rx.ok_distinct();
    assert!(server.terminate().success(), "{}", server.stderr());
    let (cursor, done) = saved_progress(&server.data_dir(), "dest.hook");
    rx.set_rule(always(200));
    let server = Server::start_in(dir, &config, &[]);
    let want = ids(&events);
    assert!(
        wait_for(90, || rx.has_all(&want)),
        "after the restart only {} of {} delivered; {}",
        rx.ok_distinct(),
        want.len(),
        status(&server)
    );
    std::thread::sleep(Duration::from_millis(500));
    let delivered = rx.ok_events();
    let resent = duplicates(&delivered);
    eprintln!(
        "restart after the receiver turned unhealthy: {} events, {delivered_before} delivered \
         before SIGTERM, saved cursor {cursor} with {} finished ranges, {resent} re-sent",
        events.len(),
        done.len()
    );
    check_user_order(&events, &delivered).unwrap();
    assert_eq!(
        resent, 0,
        "events delivered before the restart were sent again"
    );
}

/// A data directory as the previous release left it (each consumer's cursor alone, as
/// text: no finished ranges beside it) opens and delivers everything, in order; what it
/// re-sends is what that release would have (everything at or past its cursor that was
/// delivered), and from then on the ranges are saved.
#[test]
fn a_data_dir_of_the_previous_release_opens_and_delivers_everything_in_order() {
    let rx = Receiver::start(always(200));
    let extra = webhook("hook", &rx.url(), &format!("concurrency = 8\n{PATIENT}"));
    let config = common::config(&extra);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut server = Server::start_in(dir.clone(), &config, &[]);
    let events = one_user_stuck(&server, &rx, 100);
    assert!(server.terminate().success(), "{}", server.stderr());
    // The previous release's layout: `cursors/dest.hook` holds "<position>\n" and nothing
    // else is there.
    let cursors = server.data_dir().join("log").join("cursors");
    let text = std::fs::read_to_string(cursors.join("dest.hook")).unwrap();
    let cursor: u64 = text.trim().parse().unwrap();
    assert_eq!(text, format!("{cursor}\n"));
    std::fs::remove_file(cursors.join("dest.hook+done")).unwrap();
    let stored = dump_meta(&server.data_dir());
    let delivered_before = ids(&rx.ok_events());
    let expected_resent = stored
        .iter()
        .filter(|(pos, e)| *pos >= cursor && delivered_before.contains(mid(e)))
        .count();
    assert!(expected_resent > 0);
    rx.set_rule(always(200));
    let server = Server::start_in(dir, &config, &[]);
    let want = ids(&events);
    assert!(
        wait_for(60, || rx.has_all(&want)),
        "after the upgrade only {} of {} delivered; {}",
        rx.ok_distinct(),
        want.len(),
        status(&server)
    );
    std::thread::sleep(Duration::from_millis(500));
    let delivered = rx.ok_events();
    check_user_order(&events, &delivered).unwrap();
    assert_eq!(ids(&delivered), want, "nothing lost");
    assert_eq!(duplicates(&delivered), expected_resent);
}

/// 7. 500 forever with `max_attempts = 3, retry_window = "0s"`: exactly 3 attempts, then
///    the dead letters, and the user's later events go on. A 429 with `Retry-After: 1`
///    delays the next attempt by at least a second although min_backoff is 20ms.
#[test]
fn retries_are_bounded_and_retry_after_is_honoured() {
    let rx = Receiver::start(rule(|h| match (h.mid(), h.attempt) {
        ("doomed", _) => Reply::Status(500),
        ("slow", 1) => Reply::RetryAfter(429, 1),
        ("unavailable", 1) => Reply::RetryAfter(503, 1),
        ("late", 1) => Reply::Status(408),
        ("gone", _) => Reply::Status(404),
        _ => Reply::Status(200),
    }));
    // Another destination: at least 2 attempts *and* 1.5 s.
    let rx2 = Receiver::start(rule(|h| match h.mid() {
        "doomed" => Reply::Status(500),
        _ => Reply::Status(200),
    }));
    let extra = format!(
        "{}{}",
        // `Retry-After` is honoured up to `max_backoff`: 2 s here, above the 1 s asked.
        webhook(
            "hook",
            &rx.url(),
            r#"retry = { max_attempts = 3, retry_window = "0s", min_backoff = "20ms", max_backoff = "2s" }"#,
        ),
        webhook(
            "windowed",
            &rx2.url(),
            r#"retry = { max_attempts = 2, retry_window = "1500ms", min_backoff = "20ms", max_backoff = "200ms" }"#,
        )
    );
    let server = Server::start(&common::config(&extra));
    let events = [
        event_padded("u", "first", 0),
        event_padded("u", "doomed", 0),
        event_padded("v", "slow", 0),
        event_padded("w", "unavailable", 0),
        event_padded("u", "after-1", 0),
        event_padded("u", "after-2", 0),
        event_padded("v", "after-slow", 0),
        event_padded("x", "late", 0),
        event_padded("y", "gone", 0),
        event_padded("y", "after-gone", 0),
    ];
    post(&server, "/v1/batch", &json!({ "batch": events }));
    let ok: HashSet<String> = ids(&events)
        .into_iter()
        .filter(|i| i != "doomed" && i != "gone")
        .collect();
    assert!(
        wait_for(20, || rx.has_all(&ok)),
        "{:?}\n{}",
        rx.requests(),
        status(&server)
    );
    // No further attempt of the doomed event.
    std::thread::sleep(Duration::from_millis(500));
    let doomed = rx.attempts_of("doomed");
    assert_eq!(doomed.len(), 3, "exactly max_attempts attempts");
    assert!(doomed.iter().all(|r| r.status == 500));
    let letters = dead_letters(&server, "hook");
    assert_eq!(letters.len(), 2, "{letters:?}");
    let gone = letters
        .iter()
        .find(|l| l["event"]["messageId"] == "gone")
        .unwrap();
    assert_eq!(gone["attempts"], 1, "{gone}");
    assert_eq!(gone["status"], 404, "{gone}");
    assert_eq!(rx.attempts_of("gone").len(), 1, "a 404 is not retried");
    assert_eq!(rx.attempts_of("late").len(), 2, "a 408 is retried");
    let letters: Vec<Value> = letters
        .into_iter()
        .filter(|l| l["event"]["messageId"] == "doomed")
        .collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["attempts"], 3);
    assert_eq!(letters[0]["status"], 500);
    assert!(
        letters[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("retries exhausted"),
        "{}",
        letters[0]
    );
    let reqs = rx.requests();
    let arrival = |id: &str| -> Vec<Instant> {
        reqs.iter()
            .filter(|r| mid(&r.body) == id)
            .map(|r| r.at)
            .collect()
    };
    // The user's later events were delivered after the third attempt, in order.
    let last_doomed = doomed[2].at;
    assert!(arrival("first")[0] < doomed[0].at);
    assert!(arrival("after-1")[0] > last_doomed);
    assert!(arrival("after-2")[0] > arrival("after-1")[0]);
    assert_eq!(arrival("after-1").len(), 1);
    assert_eq!(arrival("after-2").len(), 1);
    for id in ["slow", "unavailable"] {
        let a = arrival(id);
        assert_eq!(a.len(), 2, "{id}");
        let gap = a[1] - a[0];
        assert!(
            gap >= Duration::from_secs(1),
            "{id}: Retry-After: 1 not honoured, next attempt after {gap:?}"
        );
    }
    assert!(arrival("after-slow")[0] > arrival("slow")[1]);
    assert!(arrival("after-gone")[0] > arrival("gone")[0]);
    let d = dest_status(&server, "hook");
    assert_eq!(d["delivered"], 8, "{d}");
    assert_eq!(d["aborted"], 2, "{d}");
    assert_eq!(d["dead_letters"], 2, "{d}");
    // 2 retries of "doomed" plus the abort after its 3rd failure, and one each for
    // "slow", "unavailable" and "late".
    assert_eq!(d["retries"], 6, "{d}");

    // "windowed" gives up only once both 2 attempts and 1.5 s have passed.
    assert!(
        wait_for(20, || dead_letters(&server, "windowed").len() == 1),
        "{}",
        status(&server)
    );
    std::thread::sleep(Duration::from_millis(300));
    let l = &dead_letters(&server, "windowed")[0];
    let tries = rx2.attempts_of("doomed");
    assert!(
        tries.len() > 2,
        "only {} attempts within the window",
        tries.len()
    );
    assert_eq!(l["attempts"], tries.len(), "{l}");
    let lived = l["dead_at_ms"].as_u64().unwrap() - l["first_attempt_ms"].as_u64().unwrap();
    assert!(
        lived >= 1500,
        "aborted {lived} ms after the first attempt: {l}"
    );
    let later = ids(&events)
        .into_iter()
        .filter(|i| i != "doomed")
        .collect::<HashSet<_>>();
    assert!(wait_for(10, || rx2.has_all(&later)));
    assert!(rx2.attempts_of("after-1")[0].at > tries[tries.len() - 1].at);
}

/// 8. A backlog held by a down webhook keeps segments on disk; once it drains they are
///    deleted. The file destination writes every event as one JSON line.
#[test]
fn disk_use_falls_after_a_backlog_drains_and_file_gets_every_line() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let out: PathBuf = dir.path().join("out").join("events.jsonl");
    let port = free_port();
    let extra = format!(
        r#"
[[destinations]]
id = "archive"
type = "file"
sources = ["web"]
path = "{}"
{}"#,
        out.display(),
        webhook("hook", &url_for(port), PATIENT)
    );
    let config = common::config(&extra);
    let server = Server::start_in(
        dir.clone(),
        &config,
        &[("BALLAST_STORAGE__SEGMENT_BYTES", "65536")],
    );
    let data = server.data_dir();
    let (segs_empty, _) = segments(&data);
    let n = 1000;
    let events: Vec<Value> = (0..n)
        .map(|i| event_padded(&format!("user-{}", i % 13), &format!("f-{i}"), 2000))
        .collect();
    for chunk in events.chunks(10) {
        post(&server, "/v1/batch", &json!({ "batch": chunk }));
    }
    let stored = server.dump();
    assert_eq!(mids(&stored), mids(&events));
    let (segs_full, bytes_full) = segments(&data);
    assert!(
        segs_full >= 20 && bytes_full >= 2_000_000,
        "{segs_full} segments, {bytes_full} bytes (empty: {segs_empty})"
    );
    // The file destination gets everything while the webhook is down.
    assert!(
        wait_for(30, || dest_status(&server, "archive")["delivered"]
            == n as u64),
        "{}",
        status(&server)
    );
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON event"))
        .collect();
    assert!(text.ends_with('\n'));
    assert_eq!(lines.len(), n, "one line per event");
    check_user_order(&events, &lines).unwrap();
    let by_id: HashMap<&str, &Value> = stored.iter().map(|e| (mid(e), e)).collect();
    for l in &lines {
        assert_eq!(&l, &by_id[mid(l)], "the line is the stored event");
    }
    // The webhook's cursor holds the segments.
    std::thread::sleep(Duration::from_millis(500));
    let (segs_held, _) = segments(&data);
    assert_eq!(segs_held, segs_full, "segments kept for the down webhook");
    assert_eq!(dest_status(&server, "hook")["delivered"], 0);

    let rx = Receiver::start_on(port, always(200));
    assert!(
        wait_for(40, || rx.ok_count() >= n && rx.has_all(&ids(&events))),
        "webhook got {} of {n}; {}",
        rx.ok_distinct(),
        status(&server)
    );
    check_user_order(&events, &rx.ok_events()).unwrap();
    let drained = || {
        status(&server)["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["backlog_bytes"] == 0)
    };
    assert!(
        wait_for(10, || segments(&data).0 <= 2 && drained()),
        "segments not deleted after the drain: {:?}; {}",
        segments(&data),
        status(&server)
    );
    let (segs_after, bytes_after) = segments(&data);
    let st = status(&server);
    eprintln!(
        "disk test: {segs_full} segments / {bytes_full} bytes with the backlog, \
         {segs_after} / {bytes_after} after the drain"
    );
    assert!(bytes_after < 300_000, "{bytes_after} bytes left");
    assert!(st["storage"]["segments"].as_u64().unwrap() <= 2, "{st}");
    assert!(
        st["storage"]["bytes_used"].as_u64().unwrap() < 300_000,
        "{st}"
    );
    for d in st["destinations"].as_array().unwrap() {
        assert_eq!(d["backlog_bytes"], 0, "{d}");
    }
    // Nothing written twice to the file.
    let again = std::fs::read_to_string(&out).unwrap();
    assert_eq!(again.lines().count(), n);
}

/// With `batch_size > 1` a request carries the heads of several users. A permanent
/// failure of one user's event must still abort only that event: a failing
/// event blocks that user's later events for that destination, and nobody else's
/// (README, "Delivery").
#[test]
fn a_bad_event_in_a_batch_dead_letters_only_itself() {
    let rx = Receiver::start(rule(|h| {
        if h.events.iter().any(|e| mid(e) == "bad") {
            Reply::Status(400)
        } else {
            Reply::Status(200)
        }
    }));
    let extra = webhook(
        "hook",
        &rx.url(),
        &format!("batch_size = 4\nconcurrency = 1\n{PATIENT}"),
    );
    let server = Server::start(&common::config(&extra));
    let events = [
        event_padded("a", "bad", 0),
        event_padded("b", "b-1", 0),
        event_padded("b", "b-2", 0),
        event_padded("b", "b-3", 0),
    ];
    post(&server, "/v1/batch", &json!({ "batch": events }));
    // Wait for the outcome itself (the dead letter and the other user's events), not
    // for a status counter that may not yet show the events as read.
    assert!(
        wait_for(10, || !dead_letters(&server, "hook").is_empty()
            && rx.has_all(&ids(&events[1..]))
            && dest_status(&server, "hook")["buffered_events"] == 0),
        "{}",
        status(&server)
    );
    let letters: Vec<String> = dead_letters(&server, "hook")
        .iter()
        .map(|l| l["event"]["messageId"].as_str().unwrap().to_string())
        .collect();
    let reqs = rx.requests();
    let seen: Vec<(Vec<&str>, u16)> = reqs
        .iter()
        .map(|r| (r.events.iter().map(mid).collect(), r.status))
        .collect();
    assert_eq!(letters, ["bad"], "requests (messageIds, status): {seen:?}");
    assert!(rx.has_all(&ids(&events[1..])), "{seen:?}");
}

/// A batch of many users that fails once (a passing error) goes again in two halves,
/// not one request per user: a 10,000-event warehouse load of thousands of users that
/// failed once used to come back as thousands of loads.
#[test]
fn a_batch_that_fails_once_goes_again_in_halves() {
    let failed = std::sync::atomic::AtomicBool::new(false);
    let rx = Receiver::start(rule(move |_| {
        if failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            Reply::Status(200)
        } else {
            Reply::Status(503)
        }
    }));
    let extra = webhook(
        "hook",
        &rx.url(),
        &format!("batch_size = 100\nconcurrency = 1\n{PATIENT}"),
    );
    let server = Server::start(&common::config(&extra));
    let events: Vec<Value> = (0..64)
        .map(|i| event_padded(&format!("u{i}"), &format!("m{i}"), 0))
        .collect();
    post(&server, "/v1/batch", &json!({ "batch": events }));
    assert!(
        wait_for(10, || rx.has_all(&ids(&events))
            && dest_status(&server, "hook")["buffered_events"] == 0),
        "{}",
        status(&server)
    );
    let reqs = rx.requests();
    let seen: Vec<(Vec<&str>, u16)> = reqs
        .iter()
        .map(|r| (r.events.iter().map(mid).collect(), r.status))
        .collect();
    let first: HashSet<&str> = seen[0].0.iter().copied().collect();
    assert_eq!(seen[0].1, 503);
    assert!(first.len() >= 2, "{seen:?}");
    // The failed request's events came back in two requests, half of them in each.
    let again: Vec<usize> = seen[1..]
        .iter()
        .filter(|(mids, _)| mids.iter().any(|m| first.contains(m)))
        .map(|(mids, _)| mids.len())
        .collect();
    let half = first.len().div_ceil(2);
    assert_eq!(again, [half, first.len() - half], "{seen:?}");
    assert_eq!(rx.ok_count(), events.len(), "each event once: {seen:?}");
}

/// Waits up to `secs` for every one of `events` to reach `rx`, then checks that each
/// arrived once and in order per user.
fn delivered_once_in_order(server: &Server, rx: &Receiver, events: &[Value], secs: u64) {
    let n = events.len();
    let want = ids(events);
    assert!(
        wait_for(secs, || rx.ok_count() >= n && rx.has_all(&want)),
        "{} of {n} delivered; {}",
        rx.ok_distinct(),
        status(server)
    );
    let delivered = rx.ok_events();
    assert_eq!(delivered.len(), n, "each event once");
    check_user_order(events, &delivered).unwrap();
}

/// A backlog larger than the router keeps in memory (20 000 event bodies) while the
/// webhook is down: once it is back, every event arrives once, in order per user.
#[test]
fn a_backlog_beyond_memory_is_delivered_in_order() {
    let port = free_port();
    let extra = webhook(
        "hook",
        &url_for(port),
        &format!("concurrency = 64\n{PATIENT}"),
    );
    let server = Server::start(&common::config(&extra));
    let n = 22_000;
    let events: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "type": "track",
                "event": "e",
                "userId": format!("user-{}", i % 40),
                "messageId": format!("big-{i}"),
            })
        })
        .collect();
    for chunk in events.chunks(500) {
        post(&server, "/v1/batch", &json!({ "batch": chunk }));
    }
    assert!(
        wait_for(20, || dest_status(&server, "hook")["retries"]
            .as_u64()
            .unwrap()
            >= 40),
        "{}",
        status(&server)
    );
    let started = Instant::now();
    let rx = Receiver::start_on(port, always(200));
    delivered_once_in_order(&server, &rx, &events, 120);
    eprintln!(
        "backlog test: {n} events delivered in {} ms",
        started.elapsed().as_millis()
    );
    assert!(
        wait_for(5, || dest_status(&server, "hook")["backlog_bytes"] == 0),
        "{}",
        dest_status(&server, "hook")
    );
}

/// Builds a backlog of `n` events (whose user `user_of(i)` says) while the server is
/// degraded (stored, not forwarded), returns to normal mode, checks that every event
/// arrives once and in order per user, and that the router read at most `per_event`
/// events from the log for each (`what` names the case in the output).
fn check_reads_for_a_backlog(
    what: &str,
    n: usize,
    per_event: f64,
    user_of: impl Fn(usize) -> String,
) {
    let rx = Receiver::start(always(200));
    let extra = webhook("hook", &rx.url(), &format!("concurrency = 64\n{PATIENT}"));
    let server = Server::start(&common::config(&extra));
    let set_mode = |mode: &str| {
        let answer = common::client()
            .post(format!("{}/v1/mode", server.admin))
            .json(&json!({ "mode": mode }))
            .send()
            .expect("POST /v1/mode");
        assert_eq!(answer.status().as_u16(), 200, "setting mode {mode}");
    };
    set_mode("degraded");
    let events: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "type": "track",
                "event": "e",
                "userId": user_of(i),
                "messageId": format!("backlog-{i}"),
            })
        })
        .collect();
    for chunk in events.chunks(500) {
        post(&server, "/v1/batch", &json!({ "batch": chunk }));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rx.ok_count(), 0, "degraded mode forwards nothing");
    set_mode("normal");
    delivered_once_in_order(&server, &rx, &events, 120);
    let read = metric(
        &server,
        r#"ballast_destination_read_events_total{destination="hook"}"#,
    )
    .expect("the read-events counter");
    eprintln!("{what}: {n} events delivered, {read} read from the log");
    assert!(
        read <= per_event * n as f64,
        "{what}: {read} events read for {n} delivered"
    );
}

/// A hundred users' backlog, larger than the router keeps in memory: the log is read
/// once for it. The router used to leave entries without their body once one user
/// reached 256 bodies (or the budget ran out in the middle of a read), and then read the
/// log again for them, a thousand events per read for the few of one user: here it read
/// 59,938 events for 40,000; under `ballast-bench` load about ten times what it
/// delivered, so that a hundred users' backlog went out at a seventh of the rate of ten
/// thousand users'.
#[test]
fn a_hundred_users_backlog_is_read_about_once() {
    check_reads_for_a_backlog("a hundred users", 40_000, 1.25, |i| {
        format!("user-{}", i % 100)
    });
}

/// One user of ten with two thirds of a backlog reaches its share of the body budget
/// (a quarter): its later entries go without a body, so that the others go on, and are
/// read again when they come near delivery, densely (one read of the log gives that user
/// hundreds of bodies), so the log is read less than twice over (112,474 events for
/// 60,000 here), not once more for every few of that user's events.
#[test]
fn a_user_with_most_of_a_backlog_costs_at_most_a_second_read() {
    // user-0 has two events in three; users 1 to 9 share the rest.
    check_reads_for_a_backlog("one user with most", 60_000, 2.5, |i| {
        if i % 3 < 2 {
            "user-0".to_string()
        } else {
            format!("user-{}", 1 + (i / 3) % 9)
        }
    });
}

/// docs/OPERATIONS.md, "Alerts": a destination aborting events raises an alert, and its `resolve`
/// follows once the destination delivers again and aborts nothing for
/// `alerts.aborts_clear_after`. Another abort after that starts a new alert.
#[test]
fn the_aborting_alert_resolves_once_the_destination_delivers_again() {
    let rx = Receiver::start(rule(|h| {
        if h.events.iter().any(|e| mid(e).starts_with("bad")) {
            Reply::Status(400)
        } else {
            Reply::Status(200)
        }
    }));
    let alert_rx = Receiver::start(always(202));
    let extra = format!(
        "{}\n[alerts]\nsource = \"t\"\naborts_clear_after = \"1s\"\n[[alerts.webhook]]\nurl = \"{}/alerts\"\n",
        webhook("hook", &rx.url(), PATIENT),
        alert_rx.url()
    );
    let server = Server::start(&common::config(&extra));
    // (action, key) of the alerts received so far.
    let alerts = || -> Vec<(String, String)> {
        alert_rx
            .requests()
            .iter()
            .filter(|r| r.status == 202)
            .map(|r| {
                (
                    r.body["action"].as_str().unwrap_or("").to_string(),
                    r.body["key"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    let pair = |a: &str| (a.to_string(), "aborts:hook".to_string());

    post(&server, "/v1/track", &event_padded("a", "bad-1", 0));
    assert!(
        wait_for(10, || alerts() == [pair("trigger")]),
        "{:?}",
        alerts()
    );
    let aborted_at = Instant::now();
    // No delivery since the abort: it stays open however long that lasts.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(alerts(), [pair("trigger")]);
    post(&server, "/v1/track", &event_padded("b", "good-1", 0));
    assert!(
        wait_for(10, || alerts() == [pair("trigger"), pair("resolve")]),
        "{:?}",
        alerts()
    );
    assert!(aborted_at.elapsed() >= Duration::from_secs(1));
    // A new abort: a new trigger.
    post(&server, "/v1/track", &event_padded("a", "bad-2", 0));
    assert!(
        wait_for(10, || alerts()
            == [pair("trigger"), pair("resolve"), pair("trigger")]),
        "{:?}",
        alerts()
    );
    assert_eq!(dead_letters(&server, "hook").len(), 2);
}

// ---------------------------------------------------------------------------------------
// Hostile destinations: nothing a destination answers may panic the
// router, park a user past the retry rule, lose events or exhaust memory.
// ---------------------------------------------------------------------------------------

/// Quick retries within a test, `max_backoff` 1 s.
const CAPPED: &str = r#"retry = { max_attempts = 1000000, retry_window = "1h", min_backoff = "20ms", max_backoff = "1s" }"#;

/// `n` events each of `users` users, in one batch; returns them.
fn post_users(server: &Server, prefix: &str, users: usize, n: usize) -> Vec<Value> {
    let events: Vec<Value> = (0..n)
        .flat_map(|i| (0..users).map(move |u| (u, i)))
        .map(|(u, i)| event_padded(&format!("{prefix}-u{u}"), &format!("{prefix}-{u}-{i}"), 0))
        .collect();
    post(server, "/v1/batch", &json!({ "batch": events }));
    events
}

fn loop_panics(server: &Server) -> f64 {
    metric(
        server,
        "ballast_destination_loop_panics_total{destination=\"hook\"}",
    )
    .unwrap_or(0.0)
}

/// `Retry-After: 18446744073709551615` (u64::MAX seconds) panicked the delivery loop on
/// every retry (an `Instant` overflow); now it waits `max_backoff` and, once the
/// receiver is healthy, everything arrives once, in order per user.
#[test]
fn a_retry_after_of_u64_max_panics_nothing_and_waits_max_backoff() {
    let hostile = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let rx = {
        let hostile = hostile.clone();
        Receiver::start(rule(move |_| {
            if hostile.load(std::sync::atomic::Ordering::Relaxed) {
                Reply::RetryAfter(503, u64::MAX)
            } else {
                Reply::Status(200)
            }
        }))
    };
    let server = Server::start(&common::config(&webhook("hook", &rx.url(), CAPPED)));
    let events = post_users(&server, "max", 5, 10);
    // Several users' heads were refused with the hostile header, some more than once.
    assert!(
        wait_for(10, || rx.requests().len() >= 10),
        "{:?}",
        rx.requests().len()
    );
    hostile.store(false, std::sync::atomic::Ordering::Relaxed);
    delivered_once_in_order(&server, &rx, &events, 15);
    assert_eq!(loop_panics(&server), 0.0, "{}", server.stderr());
    assert!(!server.stderr().contains("panicked"), "{}", server.stderr());
    assert!(dead_letters(&server, "hook").is_empty());
}

/// `Retry-After: 99999999` (3 years) or an HTTP date in 9999 parked the user for years,
/// past `retry_window` and `max_attempts`; now the retry comes within `max_backoff`.
#[test]
fn a_retry_after_of_years_is_capped_at_max_backoff() {
    let rx = Receiver::start(rule(|h| match (h.attempt, h.events.first()) {
        (1, Some(e)) if e["userId"] == "years-u0" => Reply::RetryAfter(503, 99_999_999),
        (1, Some(e)) if e["userId"] == "years-u1" => {
            Reply::RetryAfterText(429, "Fri, 31 Dec 9999 23:59:59 GMT")
        }
        _ => Reply::Status(200),
    }));
    let server = Server::start(&common::config(&webhook("hook", &rx.url(), CAPPED)));
    let events = post_users(&server, "years", 2, 1);
    delivered_once_in_order(&server, &rx, &events, 10);
    for e in &events {
        let tries = rx.attempts_of(mid(e));
        assert_eq!(tries.len(), 2, "{}: {tries:?}", mid(e));
        let gap = tries[1].at - tries[0].at;
        // max_backoff is 1 s; the bound only catches a wait of years.
        assert!(
            gap < Duration::from_secs(30),
            "{}: retried after {gap:?}",
            mid(e)
        );
    }
}

/// A 301 was followed as a GET without the body, its target's 200 counted as delivered
/// (the events lost). Now no redirect is followed: a 3xx is a failure that is retried,
/// with the redirect in its reason, and the events arrive once it stops redirecting.
#[test]
fn a_redirect_is_not_followed_and_the_events_arrive_once_it_stops() {
    let redirecting = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let port = free_port();
    let rx = {
        let redirecting = redirecting.clone();
        Receiver::start_on(
            port,
            rule(move |h| {
                if h.path == "/redirected" {
                    Reply::Status(200)
                } else if redirecting.load(std::sync::atomic::Ordering::Relaxed) {
                    Reply::Redirect(if h.attempt % 2 == 0 { 307 } else { 301 }, port)
                } else {
                    Reply::Status(200)
                }
            }),
        )
    };
    let server = Server::start(&common::config(&webhook(
        "hook",
        &rx.url(),
        &format!("{CAPPED}\nheaders = {{ X-Api-Key = \"secret\" }}"),
    )));
    let events = post_users(&server, "moved", 3, 3);
    assert!(
        wait_for(10, || rx.requests().len() >= 9),
        "{:?}",
        rx.requests()
    );
    let d = dest_status(&server, "hook");
    assert_eq!(
        d["delivered"], 0,
        "redirected events counted delivered: {d}"
    );
    assert!(
        rx.requests().iter().all(|r| r.path == "/ingest"),
        "a redirect was followed: {:?}",
        rx.requests()
            .iter()
            .map(|r| (&r.method, &r.path))
            .collect::<Vec<_>>()
    );
    redirecting.store(false, std::sync::atomic::Ordering::Relaxed);
    delivered_once_in_order(&server, &rx, &events, 15);
    assert!(dead_letters(&server, "hook").is_empty());
    assert_eq!(dest_status(&server, "hook")["delivered"], events.len());
}

/// The peak resident memory of a process (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM in /proc/<pid>/status")
        * 1024
}

/// A 500 whose body is 200 MiB was read whole (`resp.text()`) before being cut to
/// 4 KiB: hundreds of MB of memory per delivery in flight. Now at most a few KiB of any
/// answer are read; the process's peak memory stays small.
#[test]
fn a_huge_error_body_is_not_read_into_memory() {
    const BODY: u64 = 200 << 20;
    let rx = Receiver::start(rule(|h| {
        if h.attempt <= 2 {
            Reply::HugeBody(500, BODY)
        } else {
            Reply::Status(200)
        }
    }));
    let server = Server::start(&common::config(&webhook("hook", &rx.url(), CAPPED)));
    let events = post_users(&server, "huge", 4, 1);
    delivered_once_in_order(&server, &rx, &events, 30);
    let pid = server.child.as_ref().unwrap().id();
    let peak = peak_rss(pid);
    eprintln!("peak RSS {} MiB", peak >> 20);
    assert!(
        peak < 300 << 20,
        "peak RSS {} MiB with 8 answers of {} MiB",
        peak >> 20,
        BODY >> 20
    );
}
