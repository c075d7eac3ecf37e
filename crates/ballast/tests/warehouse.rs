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

fn warehouse_config(url: &str) -> String {
    common::config(&format!(
        r#"
[[destinations]]
id = "warehouse"
type = "postgres"
sources = ["web"]
url = "{url}"
schema = "web_prod"
flush_interval = "5s"
concurrency = 4
retry = {{ max_attempts = 1000000, retry_window = "1h", min_backoff = "50ms", max_backoff = "500ms" }}
"#
    ))
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(cluster.create_db("analytics"));
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(cluster.create_db("analytics"));
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
