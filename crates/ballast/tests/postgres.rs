//! The PostgreSQL store with the real binary: two replicas share one database, both
//! ingest, one at a time delivers (the destination's lease), and when that one is
//! killed (-9) the other takes over: nothing acknowledged is lost, each user's events
//! arrive in the order they were accepted. The database is a throwaway cluster
//! (`initdb`/`pg_ctl`, see `src/store/pgtest.rs`).

mod common;
#[path = "../src/store/pgtest.rs"]
mod pgtest;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{wait_for, Server, WRITE_KEY};
use pgtest::PgCluster;
use serde_json::{json, Value};

/// A webhook receiver on 127.0.0.1 that answers 200 and records every event it gets.
struct Receiver {
    port: u16,
    events: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ev, flag) = (events.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let ev = ev.clone();
                // One thread per connection (keep-alive: many requests each).
                std::thread::spawn(move || serve(stream, ev));
            }
        });
        Receiver {
            port,
            events,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }
}

fn serve(stream: std::net::TcpStream, events: Arc<Mutex<Vec<Value>>>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_or(true, |n| n == 0) {
            return;
        }
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).map_or(true, |n| n == 0) {
                return;
            }
            if h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if let Ok(v) = serde_json::from_slice::<Value>(&body) {
            let mut e = events.lock().unwrap();
            match v {
                Value::Array(items) => e.extend(items),
                other => e.push(other),
            }
        }
        if writer
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .is_err()
        {
            return;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn replica_config(db_url: &str, hook: &str) -> String {
    common::config(&format!(
        r#"
[[destinations]]
id = "hook"
type = "webhook"
sources = ["web"]
url = "{hook}"
batch_size = 10
retry = {{ max_attempts = 1000000, retry_window = "1h", min_backoff = "20ms", max_backoff = "200ms" }}
"#
    ))
    .replacen(
        "backend = \"embedded\"",
        &format!("backend = \"postgres\"\npostgres_url = \"{db_url}\""),
        1,
    )
}

fn send(server: &Server, e: &Value) {
    let r = common::client()
        .post(server.url("/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(e)
        .send()
        .unwrap();
    let status = r.status();
    assert_eq!(
        status,
        200,
        "{}\n{}",
        r.text().unwrap_or_default(),
        server.stderr()
    );
}

fn active(server: &Server) -> bool {
    common::client()
        .get(format!("{}/v1/status", server.admin))
        .send()
        .ok()
        .and_then(|r| r.json::<Value>().ok())
        .is_some_and(|s| s["destinations"][0]["active"] == true)
}

/// Per user, the first deliveries (duplicates removed) must be the accepted sequence.
fn check_user_order(sent: &[Value], got: &[Value]) {
    let mut want: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in sent {
        want.entry(e["userId"].as_str().unwrap().to_string())
            .or_default()
            .push(e["messageId"].as_str().unwrap().to_string());
    }
    let mut seen = HashSet::new();
    let mut firsts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in got {
        let id = e["messageId"].as_str().unwrap_or_default().to_string();
        if seen.insert(id.clone()) {
            firsts
                .entry(e["userId"].as_str().unwrap_or_default().to_string())
                .or_default()
                .push(id);
        }
    }
    assert_eq!(firsts, want);
}

fn ids(events: &[Value]) -> HashSet<String> {
    events
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn two_replicas_share_the_database_and_one_takes_over_delivery_when_the_other_dies() {
    let cluster = PgCluster::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(cluster.create_db("ballast"));
    let receiver = Receiver::start();
    let config = replica_config(&cluster.url("ballast"), &receiver.url());
    let mut a = Server::start(&config);
    let mut b = Server::start(&config);

    // Both ingest; events alternate between them, each acknowledged before the next,
    // so the accepted order per user is the sending order.
    let mut sent = Vec::new();
    for i in 0..200 {
        let e =
            json!({ "userId": format!("u{}", i % 7), "messageId": format!("m-{i}"), "event": "E" });
        send(if i % 2 == 0 { &a } else { &b }, &e);
        sent.push(e);
    }
    let delivered = || -> HashSet<String> {
        receiver
            .events()
            .iter()
            .filter_map(|e| e["messageId"].as_str().map(str::to_string))
            .collect()
    };
    let want = ids(&sent);
    assert!(
        wait_for(20, || want.is_subset(&delivered())),
        "not delivered: {}\n{}",
        want.difference(&delivered()).count(),
        cluster.log()
    );
    // Exactly one of them delivers.
    let (ta, tb) = (active(&a), active(&b));
    assert!(ta ^ tb, "active: a {ta}, b {tb}");

    // The delivering replica dies.
    let (dead, survivor) = if ta {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    dead.kill9();
    for i in 200..400 {
        let e =
            json!({ "userId": format!("u{}", i % 7), "messageId": format!("m-{i}"), "event": "E" });
        send(survivor, &e);
        sent.push(e);
    }
    let want = ids(&sent);
    assert!(
        wait_for(30, || want.is_subset(&delivered())),
        "after the failover {} not delivered\n{}",
        want.difference(&delivered()).count(),
        survivor.stderr()
    );
    assert!(active(survivor));
    check_user_order(&sent, &receiver.events());
    let got = receiver.events();
    eprintln!(
        "{} events accepted, {} deliveries ({} duplicates after the kill)",
        sent.len(),
        got.len(),
        got.len() - sent.len()
    );
    assert!(survivor.terminate().success());
}

/// Kubernetes semantics: while the database is down, `/readyz` is 503 (the pod leaves
/// the Service, clients retry elsewhere) but `/livez` stays 200 (a database outage must
/// not make the kubelet restart every replica); both come back by themselves.
#[test]
fn database_outage_fails_readiness_but_not_liveness() {
    let cluster = PgCluster::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(cluster.create_db("ballast"));
    let receiver = Receiver::start();
    let server = Server::start(&replica_config(&cluster.url("ballast"), &receiver.url()));
    let http = common::client();
    let status = |path: &str| {
        http.get(server.url(path))
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    assert!(
        wait_for(10, || status("/readyz") == 200),
        "{}",
        server.stderr()
    );
    assert_eq!(status("/livez"), 200);
    send(
        &server,
        &json!({ "userId": "u", "messageId": "before", "event": "E" }),
    );

    cluster.stop();
    // Without any event sent: readiness notices by itself.
    assert!(
        wait_for(15, || status("/readyz") == 503),
        "/readyz stayed {} with the database down\n{}",
        status("/readyz"),
        server.stderr()
    );
    assert_eq!(status("/livez"), 200, "{}", server.stderr());
    let r = http
        .post(server.url("/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({ "userId": "u", "messageId": "during", "event": "E" }))
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        503,
        "an event was acknowledged without a database"
    );
    assert_eq!(status("/livez"), 200);

    cluster.restart();
    assert!(
        wait_for(20, || status("/readyz") == 200),
        "not ready again after the database came back\n{}",
        server.stderr()
    );
    assert_eq!(status("/livez"), 200);
    send(
        &server,
        &json!({ "userId": "u", "messageId": "after", "event": "E" }),
    );
    let mut server = server;
    assert!(server.terminate().success());
}
