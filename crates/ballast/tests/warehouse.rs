//! The `postgres` warehouse destination with the real binary: events sent over HTTP land
//! in RudderStack's tables in a throwaway PostgreSQL cluster; kill -9 of the server in
//! the middle of loads loses nothing and duplicates nothing (loads are idempotent by id).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast::pgtest::PgCluster;
use common::{wait_for, Server, WRITE_KEY};
use serde_json::{json, Value};

/// A server config with one `postgres` destination "warehouse" of source "web" into
/// `schema`, with the keys in `extra`.
fn warehouse(url: &str, schema: &str, extra: &str) -> String {
    common::config(&format!(
        r#"
[[destinations]]
id = "warehouse"
type = "postgres"
sources = ["web"]
url = "{url}"
schema = "{schema}"
{extra}
"#
    ))
}

fn warehouse_config(url: &str) -> String {
    warehouse(
        url,
        "web_prod",
        r#"flush_interval = "5s"
concurrency = 4
retry = { max_attempts = 1000000, retry_window = "1h", min_backoff = "50ms", max_backoff = "500ms" }"#,
    )
}

struct Db {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl Db {
    fn open(url: &str) -> Db {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            client
        });
        Db { rt, client }
    }

    /// `SELECT count(*)`-like queries; None while the table does not exist.
    fn count(&self, sql: &str) -> Option<i64> {
        self.rt
            .block_on(self.client.query_one(sql, &[]))
            .ok()
            .map(|r| r.get(0))
    }

    fn columns(&self, table: &str) -> BTreeMap<String, String> {
        self.rt
            .block_on(self.client.query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns \
                 WHERE table_schema = 'web_prod' AND table_name = $1",
                &[&table],
            ))
            .unwrap()
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }
}

fn send(server: &Server, path: &str, body: &Value) {
    let status = common::client()
        .post(server.url(path))
        .basic_auth(WRITE_KEY, Some(""))
        .json(body)
        .send()
        .unwrap()
        .status();
    assert_eq!(status, 200, "{path} {body}");
}

#[test]
fn events_sent_over_http_land_in_rudderstacks_tables() {
    let cluster = PgCluster::start();
    cluster.create_db_blocking("analytics");
    let url = cluster.url("analytics");
    let server = Server::start(&warehouse_config(&url));
    send(
        &server,
        "/v1/track",
        &json!({"userId": "u1", "messageId": "t1", "event": "Order Completed",
                "properties": {"revenue": 10, "products": [{"sku": "a"}], "gift": true},
                "context": {"library": {"name": "http"}}}),
    );
    send(
        &server,
        "/v1/identify",
        &json!({"userId": "u1", "messageId": "i1", "traits": {"plan": "pro", "user_id": "x"}}),
    );
    send(
        &server,
        "/v1/page",
        &json!({"anonymousId": "a1", "messageId": "p1", "name": "Home"}),
    );
    send(
        &server,
        "/v1/batch",
        &json!({"batch": [
            {"type": "screen", "userId": "u2", "messageId": "s1", "name": "Main"},
            {"type": "group", "userId": "u2", "messageId": "g1", "groupId": "g"},
            {"type": "alias", "userId": "u2", "messageId": "al1", "previousId": "a1"},
            {"type": "track", "userId": "u2", "messageId": "t2", "event": "tracks"},
        ]}),
    );
    let db = Db::open(&url);
    let tables = [
        "tracks",
        "order_completed",
        "_tracks",
        "identifies",
        "users",
        "pages",
        "screens",
        "groups",
        "aliases",
    ];
    let all_there = || {
        tables.iter().all(|t| {
            db.count(&format!("SELECT count(*) FROM web_prod.{t}"))
                .is_some_and(|n| n >= 1)
        })
    };
    assert!(wait_for(30, all_there), "{}", server.stderr());
    assert_eq!(db.count("SELECT count(*) FROM web_prod.tracks"), Some(2));
    let oc = db.columns("order_completed");
    assert_eq!(oc["revenue"], "bigint");
    assert_eq!(oc["gift"], "boolean");
    assert_eq!(oc["products"], "text");
    assert_eq!(oc["context_library_name"], "text");
    assert_eq!(oc["received_at"], "timestamp with time zone");
    assert_eq!(oc["context_request_ip"], "text");
    assert_eq!(db.columns("identifies")["_user_id"], "text");
    assert_eq!(
        db.count("SELECT count(*) FROM web_prod.users WHERE id = 'u1' AND plan = 'pro'"),
        Some(1)
    );
}

/// kill -9 while loads are committing: after a restart every event is in the table
/// once (what was loaded but not yet acknowledged is loaded again and merged away).
#[test]
fn kill_9_in_the_middle_of_loads_loses_and_duplicates_nothing() {
    let cluster = PgCluster::start();
    cluster.create_db_blocking("analytics");
    let url = cluster.url("analytics");
    let config = warehouse_config(&url);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut server = Server::start_in(dir.clone(), &config, &[]);
    let db = Db::open(&url);
    const USERS: usize = 20;
    const ROUNDS: usize = 40;
    let mut sent = 0usize;
    let mut killed = false;
    for round in 0..ROUNDS {
        let batch: Vec<Value> = (0..USERS)
            .map(|u| {
                json!({"type": "track", "userId": format!("u{u}"),
                       "messageId": format!("m-{round}-{u}"), "event": "Item Viewed",
                       "properties": {"round": round, format!("k{}", round % 7): u}})
            })
            .collect();
        send(&server, "/v1/batch", &json!({ "batch": batch }));
        sent += USERS;
        if !killed && round == ROUNDS / 2 {
            // Once loads are under way.
            let started = Instant::now();
            while db
                .count("SELECT count(*) FROM web_prod.item_viewed")
                .unwrap_or(0)
                == 0
                && started.elapsed() < Duration::from_secs(60)
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            server.kill9();
            server = Server::start_in(dir.clone(), &config, &[]);
            killed = true;
        }
    }
    let loaded = || {
        db.count("SELECT count(DISTINCT id) FROM web_prod.item_viewed")
            .unwrap_or(0)
            == sent as i64
    };
    assert!(wait_for(60, loaded), "{}", server.stderr());
    assert_eq!(
        db.count("SELECT count(*) FROM web_prod.item_viewed"),
        Some(sent as i64)
    );
    assert_eq!(
        db.count("SELECT count(*) FROM web_prod.tracks"),
        Some(sent as i64)
    );
    assert_eq!(
        db.count("SELECT count(*) FROM web_prod.rudder_discards"),
        Some(0)
    );
}

/// `flush_interval`: a destination holds ready events back until `batch_size` are ready
/// (then they load in one transaction: one `uuid_ts`, which is the transaction's time)
/// or the oldest has waited `flush_interval` (then what is ready loads).
#[test]
fn batches_wait_for_batch_size_or_flush_interval() {
    let cluster = PgCluster::start();
    cluster.create_db_blocking("analytics");
    let url = cluster.url("analytics");
    let config = common::config(&format!(
        r#"
[[destinations]]
id = "full"
type = "postgres"
sources = ["web"]
url = "{url}"
schema = "batched"
batch_size = 6
flush_interval = "1h"

[[destinations]]
id = "timely"
type = "postgres"
sources = ["web"]
url = "{url}"
schema = "timely"
batch_size = 1000
flush_interval = "1s"
"#
    ));
    let server = Server::start(&config);
    let db = Db::open(&url);
    for i in 0..5 {
        // Different users, sent one by one: without the wait each would be its own load.
        send(
            &server,
            "/v1/track",
            &json!({"userId": format!("u{i}"), "messageId": format!("m{i}"), "event": "Tick"}),
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The oldest waited a second: what was ready is loaded.
    let timely = || db.count("SELECT count(*) FROM timely.tracks") == Some(5);
    assert!(wait_for(30, timely), "{}", server.stderr());
    // Five of six: still held back.
    assert_eq!(
        db.count("SELECT count(*) FROM batched.tracks").unwrap_or(0),
        0
    );
    send(
        &server,
        "/v1/track",
        &json!({"userId": "u5", "messageId": "m5", "event": "Tick"}),
    );
    let full = || db.count("SELECT count(*) FROM batched.tracks") == Some(6);
    assert!(wait_for(30, full), "{}", server.stderr());
    assert_eq!(
        db.count("SELECT count(DISTINCT uuid_ts) FROM batched.tracks"),
        Some(1),
        "the six events loaded in one transaction"
    );
}

/// `flush_interval` bounds how long the oldest event waits, not how long one wait lasts:
/// an event whose user still had a load in flight when the wait ended goes as soon as
/// that load commits, not after a whole new `flush_interval`.
#[test]
fn an_event_left_behind_by_a_flush_goes_when_its_user_is_free() {
    let cluster = PgCluster::start();
    cluster.create_db_blocking("analytics");
    let url = cluster.url("analytics");
    let interval = Duration::from_secs(8);
    let config = warehouse(
        &url,
        "held",
        &format!(
            "batch_size = 2\nflush_interval = \"{}s\"",
            interval.as_secs()
        ),
    );
    let server = Server::start(&config);
    let db = Db::open(&url);
    let track = |user: &str, id: &str, event: &str| {
        send(
            &server,
            "/v1/track",
            &json!({"userId": user, "messageId": id, "event": event}),
        )
    };
    let loaded = |id: &str| {
        db.count(&format!(
            "SELECT count(*) FROM held.tracks WHERE id = '{id}'"
        )) == Some(1)
    };
    // Two events make a full batch: both tables are made at once.
    track("u0", "s0", "Slow");
    track("u0", "f0", "Fast");
    assert!(wait_for(30, || loaded("f0")), "{}", server.stderr());
    // An operator's lock holds every load that writes to `slow`.
    let locker = Db::open(&url);
    locker
        .rt
        .block_on(
            locker
                .client
                .batch_execute("BEGIN; LOCK TABLE held.slow IN EXCLUSIVE MODE"),
        )
        .unwrap();
    // u1's load (a full batch with u9's event) waits for the lock.
    track("u1", "s1", "Slow");
    track("u9", "f9", "Fast");
    let blocked = || {
        db.count(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND query LIKE 'INSERT INTO \"held\".\"slow\"%'",
        ) == Some(1)
    };
    assert!(wait_for(30, blocked), "{}", server.stderr());
    // u1's next event queues behind its load; u2's is ready alone and waits for the
    // flush, which sends it without u1's.
    track("u1", "f1", "Fast");
    track("u2", "f2", "Fast");
    assert!(wait_for(30, || loaded("f2")), "{}", server.stderr());
    assert!(!loaded("f1"));
    // The lock goes: u1's load commits, and f1, overdue since the flush, follows at once.
    locker
        .rt
        .block_on(locker.client.batch_execute("COMMIT"))
        .unwrap();
    let released = Instant::now();
    assert!(wait_for(30, || loaded("f1")), "{}", server.stderr());
    assert!(
        released.elapsed() < interval / 2,
        "f1 waited {:?} after its user's load committed: a new flush_interval",
        released.elapsed()
    );
}

/// A load the database refuses for one event's data: the others of the batch load (the
/// same user's later events too, in order), only that event goes to the dead letters,
/// and a replay loads it once an operator has fixed the column.
#[test]
fn an_event_the_database_refuses_is_dead_lettered_alone() {
    let cluster = PgCluster::start();
    cluster.create_db_blocking("analytics");
    let url = cluster.url("analytics");
    let db = Db::open(&url);
    // An operator's column type that the bad event's value cannot be read as.
    db.rt
        .block_on(db.client.batch_execute(
            "CREATE SCHEMA web_prod; CREATE TABLE web_prod.item_viewed (id text PRIMARY KEY, \
             received_at timestamptz, uuid_ts timestamptz, ref uuid)",
        ))
        .unwrap();
    let config = warehouse(
        &url,
        "web_prod",
        "batch_size = 8\nflush_interval = \"200ms\"",
    );
    let server = Server::start(&config);
    let good = "6f1c2f9e-8f3a-4a43-9a40-1d7a1f1a2b3c";
    let batch: Vec<Value> = (0..8)
        .map(|i| {
            let r = if i == 3 { "not-a-uuid" } else { good };
            json!({"type": "track", "userId": format!("u{}", i % 2), "messageId": format!("m{i}"),
                   "event": "Item Viewed", "properties": {"ref": r}})
        })
        .collect();
    send(&server, "/v1/batch", &json!({ "batch": batch }));
    let loaded = || db.count("SELECT count(*) FROM web_prod.item_viewed") == Some(7);
    assert!(wait_for(30, loaded), "{}", server.stderr());
    let letters = || -> Vec<Value> {
        common::client()
            .get(format!(
                "{}/v1/dead-letters?destination=warehouse",
                server.admin
            ))
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    assert!(wait_for(30, || letters().len() == 1), "{:?}", letters());
    let l = &letters()[0];
    assert_eq!(l["event"]["messageId"], "m3", "{l}");
    assert_eq!(l["kind"], "aborted", "{l}");
    assert!(l["reason"].as_str().unwrap().contains("uuid"), "{l}");
    assert_eq!(
        db.count("SELECT count(*) FROM web_prod.tracks WHERE id = 'm3'"),
        Some(0)
    );
    assert_eq!(
        db.count("SELECT count(*) FROM web_prod.rudder_discards"),
        Some(0)
    );
    // The operator fixes the column; a replay loads the event.
    db.rt
        .block_on(
            db.client
                .batch_execute("ALTER TABLE web_prod.item_viewed ALTER COLUMN ref TYPE text"),
        )
        .unwrap();
    let replayed = common::client()
        .post(format!(
            "{}/v1/dead-letters/replay?destination=warehouse",
            server.admin
        ))
        .send()
        .unwrap();
    assert_eq!(replayed.status(), 200);
    let all = || db.count("SELECT count(*) FROM web_prod.item_viewed") == Some(8);
    assert!(wait_for(30, all), "{}", server.stderr());
    assert!(wait_for(30, || letters().is_empty()), "{:?}", letters());
}

/// A user whose load just committed and who has a full batch more is not held back by a
/// wait that began while its load was in flight.
#[test]
fn a_hot_user_is_not_held_back_by_a_wait() {
    let cluster = PgCluster::start();
    cluster.create_db_blocking("analytics");
    let url = cluster.url("analytics");
    let config = warehouse(&url, "web_prod", "batch_size = 5\nflush_interval = \"1h\"");
    let server = Server::start(&config);
    let db = Db::open(&url);
    // u1's 12 events, then u2's one: [u1 x5] goes at once; while it loads only u2's one
    // event is ready, so a wait begins; when u1's load commits its 7 more end the wait:
    // [u2, u1 x4] goes; u1's last 3 are held (the wait is an hour).
    let mut batch: Vec<Value> = (0..12)
        .map(|i| json!({"type": "track", "userId": "u1", "messageId": format!("h{i}"), "event": "Hot"}))
        .collect();
    batch.push(json!({"type": "track", "userId": "u2", "messageId": "c0", "event": "Hot"}));
    send(&server, "/v1/batch", &json!({ "batch": batch }));
    let ten = || db.count("SELECT count(*) FROM web_prod.hot").unwrap_or(0) >= 10;
    assert!(
        wait_for(30, ten),
        "{:?} loaded\n{}",
        db.count("SELECT count(*) FROM web_prod.hot"),
        server.stderr()
    );
    assert_eq!(db.count("SELECT count(*) FROM web_prod.hot"), Some(10));
    assert_eq!(
        db.count("SELECT count(*) FROM web_prod.hot WHERE id IN ('h9', 'h10', 'h11')"),
        Some(0),
        "u1's last three wait, in order"
    );
}

/// Events real sites send, over HTTP: a Japanese event name, a lone surrogate (a string cut
/// mid-emoji), two messageIds that differ by a NUL. Each lands (nothing in the dead
/// letters), the changed value is in `rudder_discards` with its reason, and
/// `ballast_warehouse_discards_total` counts it for the destination.
#[test]
fn unusual_names_lone_surrogates_and_nul_ids_land() {
    let cluster = PgCluster::start();
    cluster.create_db_blocking("analytics");
    let url = cluster.url("analytics");
    let server = Server::start(&warehouse_config(&url));
    // Raw text: a JSON library would not write a lone surrogate.
    let body = r#"{"batch": [
        {"type": "track", "userId": "u1", "messageId": "jp", "event": "注文完了",
         "properties": {"金額": 100, "ok": 1}},
        {"type": "track", "userId": "u2", "messageId": "cut", "event": "Page Read",
         "properties": {"title": "x \ud83d"}},
        {"type": "track", "userId": "u3", "messageId": "ax", "event": "Nul", "properties": {"n": 1}},
        {"type": "track", "userId": "u3", "messageId": "a\u0000x", "event": "Nul", "properties": {"n": 2}}
    ]}"#;
    let status = common::client()
        .post(server.url("/v1/batch"))
        .basic_auth(WRITE_KEY, Some(""))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .unwrap()
        .status();
    assert_eq!(status, 200);
    let db = Db::open(&url);
    let landed = || {
        db.count("SELECT count(*) FROM web_prod.tracks")
            .is_some_and(|n| n == 4)
    };
    assert!(wait_for(30, landed), "{}", server.stderr());
    assert_eq!(
        db.count("SELECT count(*) FROM web_prod.zhu_wen_wan_liao WHERE jin_e = 100 AND ok = 1"),
        Some(1)
    );
    assert_eq!(
        db.count("SELECT count(*) FROM web_prod.page_read WHERE title = E'x \\uFFFD'"),
        Some(1)
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM web_prod.rudder_discards WHERE row_id = 'cut' \
             AND column_value = '\"x \\ud83d\"' AND reason LIKE '%lone surrogate%'"
        ),
        Some(1)
    );
    assert_eq!(
        db.count("SELECT count(*) FROM web_prod.nul WHERE id IN ('ax', '~esc:a\\0x')"),
        Some(2)
    );
    let counted = || {
        let text = common::client()
            .get(format!("{}/metrics", server.admin))
            .send()
            .and_then(|r| r.text())
            .unwrap_or_default();
        text.lines().any(|l| {
            l.starts_with("ballast_warehouse_discards_total{")
                && l.contains(r#"destination="warehouse""#)
                && l.contains(r#"reason="invalid_unicode""#)
        })
    };
    assert!(wait_for(10, counted));
    // `/v1/status` shows them per destination and reason.
    let status = common::admin_get(&server, "/v1/status");
    let wh = status["destinations"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["id"] == "warehouse"))
        .cloned()
        .unwrap_or_default();
    assert!(
        wh["warehouse_discards"]["invalid_unicode"].as_f64() >= Some(1.0),
        "{status}"
    );
    let dead = common::admin_get(&server, "/v1/dead-letters?destination=warehouse");
    assert_eq!(dead, json!([]), "{dead}");
    // The status page shows them in the destination's row, with the reasons in its title.
    let browser = common::webdriver::Browser::start();
    browser.goto(&format!("{}/?refresh=1", server.admin));
    let shown = "tr[data-destination='warehouse'] .discards";
    assert!(
        wait_for(20, || browser.text(shown).contains("discarded")),
        "{}",
        browser.text("tr[data-destination='warehouse']")
    );
    let title = browser
        .js("return document.querySelector(\"tr[data-destination='warehouse'] .discards\").title");
    assert!(
        title
            .as_str()
            .is_some_and(|t| t.contains("invalid_unicode")),
        "{title}"
    );
}
