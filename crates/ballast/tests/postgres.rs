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

/// The storage config of a single replica on `db_url` with `partitions` partitions.
fn pg_storage(config: &str, db_url: &str, partitions: u32) -> String {
    config.replacen(
        "backend = \"embedded\"",
        &format!("backend = \"postgres\"\npostgres_url = \"{db_url}\"\npartitions = {partitions}"),
        1,
    )
}

/// A webhook receiver that only counts: distinct messageIds, and first arrivals that came
/// before an earlier event of their user from the same sender (events are
/// `m{user}_{thread}-{n}`, n rising per user and sending thread).
/// (distinct messageIds, last number per user and sender, first arrivals out of order).
type Seen = Arc<Mutex<(HashSet<String>, std::collections::HashMap<String, u64>, u64)>>;

struct Counter {
    seen: Seen,
    server: common::receiver::Background,
}

impl Counter {
    fn start() -> Counter {
        #[derive(serde::Deserialize)]
        struct Ev {
            #[serde(rename = "messageId")]
            message_id: String,
        }
        let seen: Seen = Arc::default();
        let state = seen.clone();
        let app = axum::Router::new().route(
            "/in",
            axum::routing::post(move |body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    // A batch is an array, a single event an object.
                    let events = match serde_json::from_slice::<Vec<Ev>>(&body) {
                        Ok(events) => events,
                        Err(_) => match serde_json::from_slice::<Ev>(&body) {
                            Ok(one) => vec![one],
                            Err(_) => return axum::http::StatusCode::BAD_REQUEST,
                        },
                    };
                    let mut guard = state.lock().unwrap();
                    let s = &mut *guard;
                    for e in events {
                        if !s.0.insert(e.message_id.clone()) {
                            continue;
                        }
                        let Some((user, n)) = e.message_id[1..]
                            .split_once('-')
                            .and_then(|(u, n)| Some((u.to_string(), n.parse::<u64>().ok()?)))
                        else {
                            continue;
                        };
                        let last = s.1.entry(user).or_insert(0);
                        if n < *last {
                            s.2 += 1;
                        }
                        *last = n.max(*last);
                    }
                    axum::http::StatusCode::OK
                }
            }),
        );
        Counter {
            seen,
            server: common::receiver::Background::start(app),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/in", self.server.port())
    }

    fn distinct(&self) -> usize {
        self.seen.lock().unwrap().0.len()
    }

    fn out_of_order(&self) -> u64 {
        self.seen.lock().unwrap().2
    }
}

/// Posts `total` events of `users` users in `/v1/batch` requests of 100 from `threads`
/// threads; every request must be acknowledged. Each event carries ~200 bytes that
/// compress poorly, as real properties do.
fn ingest(server: &Server, total: usize, users: usize, threads: usize) {
    let per_thread = total / threads;
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let http = common::client();
                let mut i = t * per_thread;
                let end = i + per_thread;
                while i < end {
                    let n = 100.min(end - i);
                    let batch: Vec<Value> = (i..i + n)
                        .map(|k| {
                            // User k % users; numbered in the order this thread sent
                            // them (the threads' requests interleave).
                            json!({
                                "type": "track",
                                "userId": format!("u{}", k % users),
                                "messageId": format!("m{}_{t}-{k:09}", k % users),
                                "event": "Order Completed",
                                "properties": {
                                    "revenue": k,
                                    "sku": format!("{:x}", (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                                    "session": format!("{:x}{:x}", (k as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f), (k as u64).wrapping_mul(0x1656_67b1_9e37_79f9)),
                                    "note": "a burst of traffic, then the backlog drains"
                                }
                            })
                        })
                        .collect();
                    let r = http
                        .post(server.url("/v1/batch"))
                        .basic_auth(WRITE_KEY, Some(""))
                        .timeout(Duration::from_secs(60))
                        .json(&json!({ "batch": batch }))
                        .send()
                        .expect("post");
                    assert_eq!(r.status(), 200, "{}", server.stderr());
                    i += n;
                }
            });
        }
    });
}

/// After a burst, the backlog on the PostgreSQL store drains completely, in each
/// user's order, without a single store call timing out (the old code stalled for 30 s at
/// a time: reads and acknowledgements timed out in waves; a wait on an idle database is a
/// wait on ballast itself). Bounded in time, not a speed assertion.
#[test]
fn a_large_backlog_on_postgres_drains_with_no_store_timeout() {
    const EVENTS: usize = 300_000;
    let cluster = database();
    let counter = Counter::start();
    // Few partitions and many concurrent requests: large chunks, so that a read's answer
    // is far more than a connection buffers (as after a real burst).
    let base = pg_storage(&common::config(""), &cluster.url("ballast"), 2);
    // The burst, with no destination yet: all of it becomes the backlog.
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut server = Server::start_in(dir.clone(), &base, &[]);
    ingest(&server, EVENTS, 100, 16);
    assert!(server.terminate().success(), "{}", server.stderr());
    let with_hook = format!(
        "{base}\n[[destinations]]\nid = \"hook\"\ntype = \"webhook\"\nsources = [\"web\"]\nurl = \"{}\"\nbatch_size = 100\nconcurrency = 32\n",
        counter.url()
    );
    let mut server = Server::start_in(dir, &with_hook, &[]);
    // Until drained, or a store call timed out (then the assertions below fail at once).
    let drained = wait_for(600, || {
        counter.distinct() >= EVENTS || server.stderr().contains("timed out")
    }) && counter.distinct() >= EVENTS;
    let log = server.stderr();
    let timeouts: Vec<&str> = log.lines().filter(|l| l.contains("timed out")).collect();
    assert!(
        timeouts.is_empty(),
        "store calls timed out:\n{}",
        timeouts.join("\n")
    );

    assert!(
        drained,
        "{} of {EVENTS} delivered\n{}",
        counter.distinct(),
        log.lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(counter.distinct(), EVENTS);
    assert_eq!(counter.out_of_order(), 0, "a user's events out of order");
    let text = common::client()
        .get(format!("{}/metrics", server.admin))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let counted: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("ballast_storage_timeouts_total"))
        .collect();
    assert!(
        !counted.is_empty(),
        "no ballast_storage_timeouts_total in /metrics"
    );
    for l in counted {
        assert!(l.ends_with(" 0"), "{l}");
    }
    // Status is answered from memory at once, with the age of the store's figures.
    let status = common::admin_get(&server, "/v1/status");
    assert!(
        status["storage"]["figures_age_s"].as_f64().is_some(),
        "{status}"
    );
    assert!(server.terminate().success(), "{}", server.stderr());
}

/// Shutdown is bounded by `server.shutdown_timeout` plus its margin (5 s)
/// whatever the store does: with the database frozen (SIGSTOP: connections open, nothing
/// answers) and a request waiting for its commit, SIGTERM ends the process within the
/// bound; past `shutdown_timeout` it says what it was still waiting for and exits 3.
#[test]
fn shutdown_is_bounded_while_the_database_hangs() {
    let cluster = database();
    let counter = Counter::start();
    let config = pg_storage(&common::config(""), &cluster.url("ballast"), 4)
        .replace("shutdown_timeout = \"10s\"", "shutdown_timeout = \"2s\"");
    let config = format!(
        "{config}\n[[destinations]]\nid = \"hook\"\ntype = \"webhook\"\nsources = [\"web\"]\nurl = \"{}\"\nbatch_size = 10\n",
        counter.url()
    );
    let mut server = Server::start(&config);
    ingest(&server, 400, 4, 4);
    assert!(
        wait_for(30, || counter.distinct() >= 400),
        "{}",
        server.stderr()
    );

    cluster.freeze();
    // A request now waits for a commit that does not come.
    let url = server.url("/v1/track");
    let waiting = std::thread::spawn(move || {
        common::client()
            .post(url)
            .basic_auth(WRITE_KEY, Some(""))
            .timeout(Duration::from_secs(60))
            .json(&json!({ "userId": "u", "messageId": "frozen", "event": "E" }))
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    });
    std::thread::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    let mut child = server.child.take().unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let bound = Duration::from_secs(2 + 5 + 4);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            cluster.thaw();
            panic!("still running 60 s after SIGTERM\n{}", server.stderr());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    cluster.thaw();
    let log = server.stderr();
    assert!(
        took <= bound,
        "shutdown took {took:?} (bound {bound:?})\n{log}"
    );
    // The request was not acknowledged (its commit never came).
    assert_ne!(waiting.join().unwrap(), 200);
    match status.code() {
        Some(0) => assert!(log.contains("stopped cleanly"), "{log}"),
        Some(3) => assert!(log.contains("shutdown did not finish"), "{log}"),
        other => panic!("exit {other:?}\n{log}"),
    }
}

/// `/readyz` as (status, text).
fn readyz_of(server: &Server) -> (u16, String) {
    match common::client()
        .get(server.url("/readyz"))
        .timeout(Duration::from_secs(10))
        .send()
    {
        Ok(r) => (r.status().as_u16(), r.text().unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// One event of `pad` bytes LZ4 cannot shrink; (status, text, seconds it took).
fn post_noise(server: &Server, id: &str, pad: usize, seed: &mut u64) -> (u16, String, f64) {
    let noise: String = (0..pad)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            char::from(b'a' + (*seed % 26) as u8)
        })
        .collect();
    let started = std::time::Instant::now();
    let r = common::client()
        .post(server.url("/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .timeout(Duration::from_secs(60))
        .json(&json!({ "userId": "u", "messageId": id, "event": "E", "properties": { "pad": noise } }))
        .send();
    let took = started.elapsed().as_secs_f64();
    match r {
        Ok(r) => (r.status().as_u16(), r.text().unwrap_or_default(), took),
        Err(_) => (0, String::new(), took),
    }
}

/// With the database frozen (SIGSTOP: connections open, nothing answers) a
/// request is answered 503 within seconds (not after the 30-second statement timeout),
/// `/readyz` turns 503 within about two seconds while `/livez` stays 200, and all comes
/// back when the database runs again.
#[test]
fn a_frozen_database_gives_fast_503s_and_readiness_follows() {
    let cluster = database();
    let server = Server::start(&pg_storage(&common::config(""), &cluster.url("ballast"), 4));
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    assert!(
        wait_for(10, || readyz_of(&server).0 == 200),
        "{}",
        server.stderr()
    );
    assert_eq!(post_noise(&server, "before", 100, &mut seed).0, 200);

    cluster.freeze();
    let frozen = std::time::Instant::now();
    let (status, _, took) = post_noise(&server, "during", 100, &mut seed);
    let ready_after = loop {
        if readyz_of(&server).0 == 503 {
            break frozen.elapsed();
        }
        if frozen.elapsed() > Duration::from_secs(40) {
            cluster.thaw();
            panic!(
                "/readyz stayed 200 with the database frozen\n{}",
                server.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let live = common::client()
        .get(server.url("/livez"))
        .timeout(Duration::from_secs(5))
        .send()
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    cluster.thaw();
    assert_eq!(status, 503, "an event acknowledged without its commit");
    assert!(
        took < 8.0,
        "the request waited {took:.1} s for a frozen database"
    );
    assert!(
        ready_after <= Duration::from_secs(5),
        "/readyz turned 503 only after {ready_after:?}"
    );
    assert_eq!(live, 200);
    assert!(
        wait_for(30, || readyz_of(&server).0 == 200),
        "not ready again after the database runs again\n{}",
        server.stderr()
    );
    assert!(
        wait_for(10, || post_noise(&server, "after", 100, &mut seed).0 == 200),
        "{}",
        server.stderr()
    );
}

/// A tmpfs for one test (needs root; `None` where mounting is not allowed).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).ok()?;
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0777"),
                "tmpfs",
            ])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// With the event table's tablespace full, appends are refused as "disk
/// full", and `/readyz` says so steadily (not flapping to 200, not "storage failed")
/// until there is room again; then it is ready by itself (a probe finds the room) and
/// takes events. Skipped where a tmpfs cannot be mounted.
#[test]
fn a_full_tablespace_is_reported_full_steadily_until_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let space = dir.path().join("space");
    let Some(_tmpfs) = Tmpfs::mount(&space, "6m") else {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    };
    let ts = space.join("ts");
    std::fs::create_dir_all(&ts).unwrap();
    // The tablespace's directory belongs to the server's user.
    let _ = std::process::Command::new("chown")
        .args(["postgres"])
        .arg(&ts)
        .status();
    let cluster = database();
    let server = Server::start(&pg_storage(&common::config(""), &cluster.url("ballast"), 1));
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    assert_eq!(post_noise(&server, "first", 100, &mut seed).0, 200);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&cluster.url("ballast"), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c.batch_execute(&format!(
            "CREATE TABLESPACE small LOCATION '{}'",
            ts.display()
        ))
        .await
        .unwrap();
        c.batch_execute("ALTER TABLE ballast_chunk SET TABLESPACE small")
            .await
            .unwrap();
    });
    // Fill the file system but for ~1 MB.
    let filler = space.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let len = f.metadata().unwrap().len();
        f.set_len(len.saturating_sub(1 << 20)).unwrap();
    }
    let mut acked = 0;
    let mut full = 0;
    for i in 0..400 {
        match post_noise(&server, &format!("f-{i}"), 20_000, &mut seed) {
            (200, _, _) => acked += 1,
            (503, text, _) if text == "disk full" => {
                full += 1;
                if full == 3 {
                    break;
                }
            }
            other => panic!("{other:?}\n{}", server.stderr()),
        }
    }
    assert_eq!(full, 3, "never full ({acked} acknowledged)");
    // Steadily full for 4 s: never ready, never "storage failed".
    for _ in 0..20 {
        assert_eq!(
            readyz_of(&server),
            (503, "disk full".into()),
            "{}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = common::admin_get(&server, "/v1/status");
    assert_eq!(status["storage"]["refusing"], "disk_full", "{status}");

    std::fs::remove_file(&filler).unwrap();
    assert!(
        wait_for(15, || readyz_of(&server).0 == 200),
        "not ready again once there is room: {:?}\n{}",
        readyz_of(&server),
        server.stderr()
    );
    assert_eq!(post_noise(&server, "after", 20_000, &mut seed).0, 200);
}
