//! User transformations through the real binary (docs/TRANSFORMATIONS.md): JavaScript in
//! RudderStack's API run by worker processes of the same binary in front of a webhook
//! destination fed to the programmable receiver. Masking, a bot dropped, a fan-out, an
//! async function; a throw, an infinite loop and a memory bomb each dead-letter only
//! their event (the worker replaced, later events flow); a worker killed with SIGKILL
//! mid-batch loses nothing and keeps each user's order.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::receiver::{always, Receiver};
use common::{check_user_order, event, metric, mid, wait_for, Server, WRITE_KEY};
use serde_json::{json, Value};

const JS: &str = r#"
export async function transformEvent(event, metadata) {
  const p = event.properties || {};
  const ua = (event.context && event.context.userAgent) || "";
  if (/bot/i.test(ua)) return null;
  if (p.kind === "throw") throw new Error("refused " + event.messageId);
  if (p.kind === "loop") { while (true) {} }
  if (p.kind === "bomb") { const a = []; while (true) a.push(new Array(1 << 16).fill(a.length)); }
  if (p.kind === "split") {
    return [{ ...event, messageId: event.messageId + "-1" }, { ...event, messageId: event.messageId + "-2" }];
  }
  if (p.kind === "async") {
    event.properties.dest = await Promise.resolve(metadata(event).destinationId);
  }
  if (p.kind === "slow") { const until = Date.now() + 20; while (Date.now() < until) {} }
  if (p.email) event.properties.email = "***";
  log("passed", event.messageId);
  return event;
}
"#;

fn post(server: &Server, body: &Value) {
    let r = common::client()
        .post(server.url("/v1/batch"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

fn dead_letters(server: &Server) -> Vec<Value> {
    serde_json::from_value(common::admin_get(
        server,
        "/v1/dead-letters?destination=hook",
    ))
    .unwrap()
}

fn with(user: &str, id: &str, props: Value, ua: Option<&str>) -> Value {
    let mut e = event(user, id);
    for (k, v) in props.as_object().unwrap() {
        e["properties"][k] = v.clone();
    }
    if let Some(ua) = ua {
        e["context"]["userAgent"] = json!(ua);
    }
    e
}

fn config(rx: &Receiver, transform: &str, extra: &str) -> String {
    common::config(&format!(
        r#"
[transform]
workers = 2
memory_limit = "8MiB"
{transform}

[[transformations]]
id = "t"
file = "t.js"

[[destinations]]
id = "hook"
type = "webhook"
sources = ["web"]
url = "{}"
batch_size = 10
transformations = ["t"]
retry = {{ max_attempts = 1000000, retry_window = "1h", min_backoff = "20ms", max_backoff = "200ms" }}
{extra}
"#,
        rx.url()
    ))
}

fn start(config: &str) -> Server {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    std::fs::write(dir.path().join("t.js"), JS).unwrap();
    Server::start_in(dir, config, &[])
}

/// The pids of the server's transformation workers.
fn workers(server: &Server) -> Vec<u32> {
    let Some(parent) = server.child.as_ref().map(|c| c.id()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let ppid: Option<u32> = after.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(parent) && String::from_utf8_lossy(&cmd).contains("transform-worker") {
            out.push(pid);
        }
    }
    out
}

#[test]
fn transformations_mask_drop_fan_out_and_dead_letter_only_what_fails() {
    let rx = Receiver::start(always(200));
    let server = start(&config(&rx, r#"timeout = "2s""#, ""));
    let sent = vec![
        with("u1", "mask-1", json!({"email": "a@example.com"}), None),
        with("u1", "bot-1", json!({}), Some("Googlebot/2.1")),
        with("u2", "split-1", json!({"kind": "split"}), None),
        with("u1", "async-1", json!({"kind": "async"}), None),
        with("u2", "throw-1", json!({"kind": "throw"}), None),
        with("u1", "after-throw", json!({}), None),
        with("u3", "loop-1", json!({"kind": "loop"}), None),
        with("u3", "after-loop", json!({"email": "b@example.com"}), None),
        with("u2", "bomb-1", json!({"kind": "bomb"}), None),
        with("u2", "after-bomb", json!({}), None),
    ];
    post(&server, &json!({ "batch": sent }));
    // And later events still flow through the respawned workers.
    let later: Vec<Value> = (0..20)
        .map(|i| {
            with(
                &format!("u{}", i % 3 + 1),
                &format!("later-{i}"),
                json!({}),
                None,
            )
        })
        .collect();
    post(&server, &json!({ "batch": later }));
    let want: HashSet<String> = [
        "mask-1",
        "split-1-1",
        "split-1-2",
        "async-1",
        "after-throw",
        "after-loop",
        "after-bomb",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(later.iter().map(|e| mid(e).to_string()))
    .collect();
    assert!(
        wait_for(60, || rx.has_all(&want) && dead_letters(&server).len() == 3),
        "delivered {:?}, dead letters {:?}\n{}",
        rx.ok_ids(),
        dead_letters(&server),
        server.stderr()
    );
    let got = rx.ok_events();
    let by_id = |id: &str| got.iter().find(|e| mid(e) == id).cloned().unwrap();
    assert_eq!(by_id("mask-1")["properties"]["email"], "***");
    assert_eq!(by_id("after-loop")["properties"]["email"], "***");
    assert_eq!(by_id("async-1")["properties"]["dest"], "hook");
    let ids = rx.ok_ids();
    for gone in ["bot-1", "throw-1", "loop-1", "bomb-1", "split-1"] {
        assert!(!ids.contains(gone), "{gone} was delivered");
    }
    // Per user, what came out in the order it went in.
    let expected: Vec<Value> = sent
        .iter()
        .chain(later.iter())
        .flat_map(|e| match mid(e) {
            "bot-1" | "throw-1" | "loop-1" | "bomb-1" => vec![],
            "split-1" => vec![
                json!({"userId": "u2", "messageId": "split-1-1"}),
                json!({"userId": "u2", "messageId": "split-1-2"}),
            ],
            _ => vec![e.clone()],
        })
        .collect();
    check_user_order(&expected, &got).unwrap();
    // The dead letters: each with its transformation's error.
    let dead = dead_letters(&server);
    let reason = |id: &str| {
        dead.iter()
            .find(|d| d["event"]["messageId"] == id)
            .map(|d| d["reason"].as_str().unwrap_or("").to_string())
            .unwrap_or_else(|| panic!("{id} is not dead-lettered: {dead:?}"))
    };
    let thrown = reason("throw-1");
    assert!(thrown.contains("refused throw-1"), "{thrown}");
    assert!(thrown.contains("transformEvent"), "no stack: {thrown}");
    assert!(
        reason("loop-1").contains("timed out"),
        "{}",
        reason("loop-1")
    );
    let bomb = reason("bomb-1");
    assert!(bomb.contains("out of memory"), "{bomb}");
    // Counted.
    let m = |name: &str| metric(&server, &format!("{name}{{transformation=\"t\"}}")).unwrap_or(0.0);
    assert_eq!(m("ballast_transform_events_failed_total"), 3.0);
    assert!(m("ballast_transform_events_dropped_total") >= 1.0);
    assert!(m("ballast_transform_events_out_total") >= want.len() as f64);
    // A worker that ran out of time or memory was replaced (once per batch holding one).
    assert!(
        metric(
            &server,
            "ballast_transform_workers_replaced_total{reason=\"limit\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    // log() reached the server's log with the transformation's id.
    assert!(server.stderr().contains("passed"), "{}", server.stderr());
    // The node stays normal.
    assert_eq!(common::admin_get(&server, "/v1/status")["mode"], "NORMAL");
}

#[test]
fn a_worker_killed_mid_batch_loses_nothing_and_keeps_order() {
    let rx = Receiver::start(always(200));
    let server = start(&config(&rx, r#"timeout = "2s""#, ""));
    // 20 ms per event: batches of 10 take 200 ms in a worker.
    let sent: Vec<Value> = (0..150)
        .map(|i| {
            with(
                &format!("u{}", i % 5),
                &format!("e-{i}"),
                json!({"kind": "slow"}),
                None,
            )
        })
        .collect();
    for chunk in sent.chunks(30) {
        post(&server, &json!({ "batch": chunk }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut killed = 0;
    while killed < 3 && Instant::now() < deadline && rx.ok_count() < sent.len() {
        std::thread::sleep(Duration::from_millis(150));
        if let Some(&pid) = workers(&server).first() {
            // SAFETY: kill(2) on a pid of our own server's child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            killed += 1;
        }
    }
    assert!(killed >= 1, "no worker found to kill");
    let want: HashSet<String> = sent.iter().map(|e| mid(e).to_string()).collect();
    assert!(
        wait_for(60, || rx.has_all(&want)),
        "missing {:?}\n{}",
        want.difference(&rx.ok_ids()).collect::<Vec<_>>(),
        server.stderr()
    );
    check_user_order(&sent, &rx.ok_events()).unwrap();
    assert!(
        dead_letters(&server).is_empty(),
        "{:?}",
        dead_letters(&server)
    );
    assert!(
        metric(
            &server,
            "ballast_transform_workers_replaced_total{reason=\"died\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(common::admin_get(&server, "/v1/status")["mode"], "NORMAL");
}

#[test]
fn workers_outlive_a_sigterm_to_the_group_and_end_with_the_server() {
    let rx = Receiver::start(always(200));
    let mut server = start(&config(&rx, r#"timeout = "2s""#, ""));
    let pids = workers(&server);
    assert!(!pids.is_empty(), "a worker is started with the server");
    // SAFETY: kill(2) on our own server's child.
    unsafe { libc::kill(pids[0] as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(workers(&server), pids, "the worker ignored SIGTERM");
    post(
        &server,
        &json!({ "batch": [with("u1", "after-term", json!({}), None)] }),
    );
    assert!(wait_for(20, || rx.ok_ids().contains("after-term")));
    assert!(server.terminate().success());
    let gone = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
    };
    assert!(
        wait_for(10, || pids.iter().all(|&p| gone(p))),
        "workers outlived the server"
    );
}

#[test]
fn an_unknown_transformation_is_a_config_error_naming_it() {
    let rx = Receiver::start(always(200));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        config(&rx, "", "").replace(
            r#"transformations = ["t"]"#,
            r#"transformations = ["t", "nope"]"#,
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("t.js"), JS).unwrap();
    let out = std::process::Command::new(common::bin())
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"nope\"") && err.contains("hook"), "{err}");
}

#[test]
fn check_config_compiles_the_transformations() {
    let rx = Receiver::start(always(200));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config(&rx, "", "")).unwrap();
    let check = || {
        std::process::Command::new(common::bin())
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap()
    };
    std::fs::write(dir.path().join("t.js"), JS).unwrap();
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        dir.path().join("t.js"),
        "export function transformEvent(e {",
    )
    .unwrap();
    let out = check();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("transformation \"t\"") && err.contains("SyntaxError"),
        "{err}"
    );
}

#[test]
fn transform_test_prints_what_would_be_sent() {
    let rx = Receiver::start(always(200));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config(&rx, "", "")).unwrap();
    std::fs::write(dir.path().join("t.js"), JS).unwrap();
    let events = dir.path().join("events.jsonl");
    let lines: Vec<String> = [
        with("u1", "m1", json!({"email": "a@b.c"}), None),
        with("u1", "b1", json!({}), Some("bot")),
        with("u1", "s1", json!({"kind": "split"}), None),
        with("u1", "x1", json!({"kind": "throw"}), None),
    ]
    .iter()
    .map(|e| e.to_string())
    .collect();
    std::fs::write(&events, lines.join("\n")).unwrap();
    let out = std::process::Command::new(common::bin())
        .args(["transform", "test", "--config"])
        .arg(&path)
        .args(["--transformation", "t", "--events"])
        .arg(&events)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    let sent: Vec<Value> = text
        .lines()
        .filter(|l| !l.starts_with("//"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        sent.iter().map(mid).collect::<Vec<_>>(),
        vec!["m1", "s1-1", "s1-2"]
    );
    assert_eq!(sent[0]["properties"]["email"], "***");
    assert!(text.contains("// event 2: dropped"), "{text}");
    assert!(
        text.contains("// event 4: transformation \"t\" failed (error): Error: refused x1"),
        "{text}"
    );
    assert!(text.contains("// log [t]: passed m1"), "{text}");
}

/// An event on which the worker process dies every time (a crash in the engine, injected)
/// is struck like a processing panic and quarantined as poison at
/// `recovery.poison_threshold`; the node stays normal and the rest is delivered in order.
#[cfg(feature = "failpoints")]
#[test]
fn an_event_that_kills_the_worker_every_time_is_quarantined() {
    let rx = Receiver::start(always(200));
    let dir = Arc::new(tempfile::tempdir().unwrap());
    std::fs::write(dir.path().join("t.js"), JS).unwrap();
    let server = Server::start_in(
        dir,
        &config(&rx, r#"timeout = "2s""#, ""),
        &[("FAILPOINTS", "transform::worker_abort=return(poison-1)")],
    );
    let mut sent: Vec<Value> = (0..30)
        .map(|i| with(&format!("u{}", i % 3), &format!("e-{i}"), json!({}), None))
        .collect();
    sent.insert(10, with("u1", "poison-1", json!({}), None));
    post(&server, &json!({ "batch": sent }));
    let innocent: Vec<Value> = sent
        .iter()
        .filter(|e| mid(e) != "poison-1")
        .cloned()
        .collect();
    let want: HashSet<String> = innocent.iter().map(|e| mid(e).to_string()).collect();
    assert!(
        wait_for(90, || rx.has_all(&want) && dead_letters(&server).len() == 1),
        "delivered {}, dead letters {:?}\n{}",
        rx.ok_ids().len(),
        dead_letters(&server),
        server.stderr()
    );
    let dead = dead_letters(&server);
    assert_eq!(dead[0]["event"]["messageId"], "poison-1");
    assert_eq!(dead[0]["kind"], "poison");
    assert!(!rx.ok_ids().contains("poison-1"));
    check_user_order(&innocent, &rx.ok_events()).unwrap();
    assert_eq!(common::admin_get(&server, "/v1/status")["mode"], "NORMAL");
    let alerts = common::admin_get(&server, "/v1/alerts").to_string();
    assert!(alerts.contains("poison"), "{alerts}");
}
