//! The PostgreSQL store with the real binary: replicas share one database, all ingest,
//! and they share the delivery of a destination (each holds the leases of some of its
//! partitions). When one is killed (-9) under load, the others take its partitions
//! within seconds: nothing acknowledged is lost, each user's events arrive (first
//! arrivals) in the order they were accepted, and what is sent twice is bounded (only
//! what was in flight or not yet acknowledged, not the history). The database is a
//! throwaway cluster (`initdb`/`pg_ctl`, see `src/pgtest.rs`).

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast::pgtest::PgCluster;
use common::receiver::{rule, Receiver, Reply};
use common::{check_user_order, mid, wait_for, Server, WRITE_KEY};
use serde_json::{json, Value};

/// A webhook receiver that answers 200, except to requests holding a messageId in
/// `refuse`: 400.
fn receiver(refuse: Arc<Mutex<HashSet<String>>>) -> Receiver {
    Receiver::start(rule(move |h| {
        let refused = {
            let refuse = refuse.lock().unwrap();
            h.events.iter().any(|e| refuse.contains(mid(e)))
        };
        Reply::Status(if refused { 400 } else { 200 })
    }))
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
concurrency = 16
retry = {{ max_attempts = 1000000, retry_window = "1h", min_backoff = "20ms", max_backoff = "200ms" }}
"#
    ))
    .replacen(
        "backend = \"embedded\"",
        &format!("backend = \"postgres\"\npostgres_url = \"{db_url}\"\npartitions = {PARTITIONS}"),
        1,
    )
}

const PARTITIONS: u64 = 8;

/// How many of the destination's partitions a replica delivers (None: no answer).
fn held(server: &Server) -> Option<u64> {
    common::client()
        .get(format!("{}/v1/status", server.admin))
        .send()
        .ok()
        .and_then(|r| r.json::<Value>().ok())
        .and_then(|s| s["destinations"][0]["partitions_held"].as_u64())
}

/// Sends one event to the first replica that acknowledges it (trying each in turn, as
/// a client behind a load balancer would once one is gone); bounded in time.
fn send_any(servers: &[&Server], start: usize, e: &Value) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut k = start;
    loop {
        let s = servers[k % servers.len()];
        let ok = common::client()
            .post(s.url("/v1/track"))
            .basic_auth(WRITE_KEY, Some(""))
            .timeout(Duration::from_secs(5))
            .json(e)
            .send()
            .is_ok_and(|r| r.status() == 200);
        if ok {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no replica took {e}");
        k += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until every acknowledged event was delivered; checks each user's order of first
/// arrivals and that what was sent twice is at most max(200, 5 %) of what was
/// acknowledged. Returns how many were sent twice.
fn all_delivered_in_order(receiver: &Receiver, sent: &[Value], server: &Server) -> usize {
    let delivered = || ids(&receiver.ok_events());
    let want = ids(sent);
    assert!(
        wait_for(60, || want.is_subset(&delivered())),
        "{} acknowledged events not delivered\n{}",
        want.difference(&delivered()).count(),
        server.stderr()
    );
    assert_eq!(check_user_order(sent, &receiver.ok_events()), Ok(()));
    let resent = receiver.ok_events().len() - delivered().len();
    assert!(
        resent <= 200.max(sent.len() * 5 / 100),
        "{resent} events sent twice of {} acknowledged",
        sent.len()
    );
    resent
}

/// A throwaway cluster with an empty database `ballast`.
fn database() -> PgCluster {
    let cluster = PgCluster::start();
    cluster.create_db_blocking("ballast");
    cluster
}

fn ids(events: &[Value]) -> HashSet<String> {
    events
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn replicas_share_delivery_and_the_survivors_take_over_a_killed_one_under_load() {
    let cluster = database();
    let receiver = receiver(Arc::default());
    let config = replica_config(&cluster.url("ballast"), &receiver.url());
    let mut a = Server::start(&config);
    let b = Server::start(&config);
    let c = Server::start(&config);
    let a_pid = a.child.as_ref().map(|c| c.id()).unwrap();

    // Delivery is shared: each replica holds some partitions, together all of them.
    assert!(
        wait_for(20, || {
            let h: Vec<Option<u64>> = [&a, &b, &c].iter().map(|s| held(s)).collect();
            h.iter().all(|x| x.is_some_and(|n| n >= 2))
                && h.iter().map(|x| x.unwrap_or(0)).sum::<u64>() == PARTITIONS
        }),
        "partitions held: a {:?} b {:?} c {:?}",
        held(&a),
        held(&b),
        held(&c)
    );

    // Load: 6 clients, each with its own users, sending one event at a time (so the
    // accepted order of a user is its client's order) to the replicas in turn; one
    // replica is killed (-9) a third of the way through, and the clients whose replica
    // is gone go on with the others.
    const CLIENTS: usize = 6;
    const PER_CLIENT: usize = 300;
    let killed = Arc::new(AtomicBool::new(false));
    let sent: Arc<Mutex<Vec<Value>>> = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|scope| {
        let servers = [&a, &b, &c];
        for client in 0..CLIENTS {
            let sent = sent.clone();
            let killed = killed.clone();
            scope.spawn(move || {
                for i in 0..PER_CLIENT {
                    let e = json!({
                        "userId": format!("c{client}-u{}", i % 5),
                        "messageId": format!("c{client}-m{i}"),
                        "event": "E",
                    });
                    // After the kill, never the dead one (index 0).
                    let live: Vec<&Server> = if killed.load(Ordering::SeqCst) {
                        servers[1..].to_vec()
                    } else {
                        servers.to_vec()
                    };
                    send_any(&live, client + i, &e);
                    sent.lock().unwrap().push(e);
                }
            });
        }
        // The kill, once a third is acknowledged (bounded wait).
        assert!(wait_for(60, || sent.lock().unwrap().len()
            >= CLIENTS * PER_CLIENT / 3));
        killed.store(true, Ordering::SeqCst);
        let status = std::process::Command::new("kill")
            .args(["-9", &a_pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    });
    a.kill9(); // reaps it
    let sent = sent.lock().unwrap().clone();
    let survivors = [&b, &c];
    // The survivors take the dead one's partitions within 10 s (+ slack).
    assert!(
        wait_for(10, || survivors
            .iter()
            .map(|s| held(s).unwrap_or(0))
            .sum::<u64>()
            == PARTITIONS),
        "partitions held after the kill: b {:?} c {:?}",
        held(&b),
        held(&c)
    );
    let resent = all_delivered_in_order(&receiver, &sent, &b);
    eprintln!("{} events acknowledged, {resent} sent again", sent.len());
    for s in [b, c] {
        let mut s = s;
        assert!(s.terminate().success());
    }
}

/// One ballast on a primary with a synchronous streaming standby, its URL naming both
/// (`target_session_attrs=read-write`). Under load the primary stops at once and the
/// standby is promoted: ingestion comes back by itself (no restart) within 15 s, nothing
/// acknowledged is lost, each user's order holds, and what is sent twice is bounded.
#[test]
fn a_database_failover_to_a_synchronous_standby_loses_nothing_acknowledged() {
    let primary = PgCluster::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(primary.create_db("ballast"));
    let standby = PgCluster::start_standby(&primary);
    rt.block_on(primary.require_sync_standby());
    let url = format!(
        "postgres://ballast@127.0.0.1:{},127.0.0.1:{}/ballast?target_session_attrs=read-write&connect_timeout=2",
        primary.port, standby.port
    );
    let receiver = receiver(Arc::default());
    let mut server = Server::start(&replica_config(&url, &receiver.url()));
    assert!(wait_for(20, || held(&server) == Some(PARTITIONS)));

    const CLIENTS: usize = 4;
    const PER_CLIENT: usize = 250;
    let sent: Arc<Mutex<Vec<Value>>> = Arc::new(Mutex::new(Vec::new()));
    let stopped_at: Arc<Mutex<Option<std::time::Instant>>> = Arc::new(Mutex::new(None));
    let first_ok_after: Arc<Mutex<Option<std::time::Instant>>> = Arc::new(Mutex::new(None));
    std::thread::scope(|scope| {
        for client in 0..CLIENTS {
            let (sent, stopped_at, first_ok_after) =
                (sent.clone(), stopped_at.clone(), first_ok_after.clone());
            let server = &server;
            scope.spawn(move || {
                for i in 0..PER_CLIENT {
                    let e = json!({
                        "userId": format!("c{client}-u{}", i % 5),
                        "messageId": format!("c{client}-m{i}"),
                        "event": "E",
                    });
                    let began = std::time::Instant::now();
                    // A client retries until acknowledged (503 while no primary).
                    send_any(&[server], 0, &e);
                    // The first acknowledgement of an event first sent after the stop.
                    if stopped_at.lock().unwrap().is_some_and(|at| began > at) {
                        first_ok_after
                            .lock()
                            .unwrap()
                            .get_or_insert(std::time::Instant::now());
                    }
                    sent.lock().unwrap().push(e);
                }
            });
        }
        assert!(wait_for(60, || sent.lock().unwrap().len()
            >= CLIENTS * PER_CLIENT / 3));
        primary.stop();
        *stopped_at.lock().unwrap() = Some(std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(500));
        standby.promote();
    });
    let outage = first_ok_after
        .lock()
        .unwrap()
        .zip(*stopped_at.lock().unwrap())
        .map(|(ok, at)| ok.duration_since(at))
        .expect("acknowledged again after the failover");
    assert!(
        outage < Duration::from_secs(15),
        "ingestion came back after {outage:?}"
    );
    let sent = sent.lock().unwrap().clone();
    let resent = all_delivered_in_order(&receiver, &sent, &server);
    eprintln!(
        "failover: ingestion back after {outage:?}; {} acknowledged, {resent} sent again",
        sent.len()
    );
    assert!(server.terminate().success());
}

/// Kubernetes semantics: while the database is down, `/readyz` is 503 (the pod leaves
/// the Service, clients retry elsewhere) but `/livez` stays 200 (a database outage must
/// not make the kubelet restart every replica); both come back by themselves.
#[test]
fn database_outage_fails_readiness_but_not_liveness() {
    let cluster = database();
    let receiver = receiver(Arc::default());
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
    send_any(
        &[&server],
        0,
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
    send_any(
        &[&server],
        0,
        &json!({ "userId": "u", "messageId": "after", "event": "E" }),
    );
    let mut server = server;
    assert!(server.terminate().success());
}

/// Dead letters live in the database: an event one replica gave up on (a 400) is listed
/// by the other, replayed from it, and delivered (by whichever replica holds partition 0).
#[test]
fn dead_letters_are_shared_by_the_replicas() {
    let cluster = database();
    let refuse = Arc::new(Mutex::new(HashSet::from(["bad-1".to_string()])));
    let receiver = receiver(refuse.clone());
    let config = replica_config(&cluster.url("ballast"), &receiver.url());
    let mut a = Server::start(&config);
    let mut b = Server::start(&config);
    for (i, id) in ["ok-1", "bad-1", "ok-2"].iter().enumerate() {
        let e = json!({ "userId": format!("u{i}"), "messageId": id, "event": "E" });
        send_any(&[&a], 0, &e);
    }
    let http = common::client();
    let listed = |s: &Server| -> Vec<String> {
        http.get(format!("{}/v1/dead-letters?destination=hook", s.admin))
            .send()
            .ok()
            .and_then(|r| r.json::<Vec<Value>>().ok())
            .unwrap_or_default()
            .iter()
            .filter_map(|l| l["event"]["messageId"].as_str().map(str::to_string))
            .collect()
    };
    assert!(
        wait_for(20, || listed(&b) == vec!["bad-1".to_string()]),
        "dead letters seen from b: {:?}\n{}",
        listed(&b),
        b.stderr()
    );
    assert_eq!(listed(&a), vec!["bad-1".to_string()]);
    refuse.lock().unwrap().clear();
    let r = http
        .post(format!(
            "{}/v1/dead-letters/replay?destination=hook",
            b.admin
        ))
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().unwrap_or_default());
    let got = || -> HashSet<String> {
        receiver
            .ok_events()
            .iter()
            .filter_map(|e| e["messageId"].as_str().map(str::to_string))
            .collect()
    };
    assert!(
        wait_for(20, || got().contains("bad-1")),
        "the replayed event was not delivered\n{}\n{}",
        a.stderr(),
        b.stderr()
    );
    assert!(listed(&a).is_empty());
    // The other two are delivered too, by whichever replica holds their partitions (one
    // may be moving from a to b, which joined after a had taken them all): not
    // necessarily before the replay, so waited for like it.
    assert!(
        wait_for(20, || got().contains("ok-1") && got().contains("ok-2")),
        "delivered: {:?}\n{}\n{}",
        got(),
        a.stderr(),
        b.stderr()
    );
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

/// The alert outbox is shared: an alert raised by a replica that is killed before any
/// notifier took it is sent by another (which takes the sender's place), named with the
/// replica that raised it; every replica lists that replica's open condition.
#[test]
fn an_alert_raised_by_a_killed_replica_is_sent_by_another() {
    let cluster = database();
    let hooks = receiver(Arc::default());
    // Nothing listens on the alert webhook's port until replica a is gone.
    let alert_port = common::free_port();
    let config = |source: &str| {
        format!(
            "{}\n[alerts]\nsource = \"{source}\"\n[[alerts.webhook]]\nurl = \"http://127.0.0.1:{alert_port}/alerts\"\n",
            replica_config(&cluster.url("ballast"), &hooks.url())
        )
    };
    // a starts first (so it is the outbox's sender) and degraded (so it raises an alert).
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut a = Server::spawn(
        std::path::Path::new(common::bin()),
        dir,
        &config("replica-a"),
        &[],
        &["--mode".to_string(), "degraded".to_string()],
    );
    let http = common::client();
    let open = |s: &Server| -> Vec<(String, String)> {
        http.get(format!("{}/v1/alerts", s.admin))
            .send()
            .ok()
            .and_then(|r| r.json::<Value>().ok())
            .and_then(|v| v["open"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|a| {
                (
                    a["key"].as_str().unwrap_or_default().to_string(),
                    a["class"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    a.wait_listening();
    let a_open = vec![("degraded@replica-a".to_string(), "degraded".to_string())];
    assert!(
        wait_for(30, || open(&a) == a_open),
        "replica a did not raise its degraded alert: {:?}\n{}",
        open(&a),
        a.stderr()
    );
    let b = Server::start(&config("replica-b"));
    assert_eq!(open(&b), a_open, "b lists a's condition");
    // a tried to send it (nobody listening: retried later), and dies.
    a.kill9();
    let alerts = Receiver::start_on(alert_port, common::receiver::always(200));
    let sent = || -> Vec<Value> {
        alerts
            .ok_events()
            .into_iter()
            .filter(|e| e["key"] == "degraded")
            .collect()
    };
    assert!(
        wait_for(40, || !sent().is_empty()),
        "the alert a raised was not sent\nb:\n{}",
        b.stderr()
    );
    let alert = &sent()[0];
    assert_eq!(alert["source"], "replica-a", "{alert}");
    assert_eq!(alert["action"], "trigger", "{alert}");
    assert_eq!(alert["class"], "degraded", "{alert}");
    // b, normal, raised nothing of its own; the outbox empties.
    let pending = || {
        http.get(format!("{}/v1/alerts", b.admin))
            .send()
            .ok()
            .and_then(|r| r.json::<Value>().ok())
            .and_then(|v| v["outbox_pending"].as_u64())
    };
    assert!(wait_for(20, || pending() == Some(0)), "{:?}", pending());
    assert!(alerts
        .ok_events()
        .iter()
        .all(|e| e["source"] == "replica-a"));
    let mut b = b;
    assert!(b.terminate().success());
}
