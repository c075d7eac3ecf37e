//! Against a real throwaway PostgreSQL (`crate::pgtest`): the schema the sample events
//! make, column by column; re-delivery; `users`; discards; a refused event; the column
//! limit; concurrent schema changes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls};

use super::*;
use crate::destinations::{Destination, Event, Outcome};
use crate::pgtest::PgCluster;

pub(crate) async fn admin(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

pub(crate) fn sink(url: &str, schema: &str) -> PostgresSink {
    sink_with(url, schema, |_| {})
}

/// A sink with settings changed by `f`.
pub(crate) fn sink_with(
    url: &str,
    schema: &str,
    f: impl FnOnce(&mut PostgresConfig),
) -> PostgresSink {
    let mut c = PostgresConfig {
        url: url.to_string(),
        schema: schema.to_string(),
        flush_interval: Duration::from_secs(30),
        max_tables: 1000,
        max_shared_columns: 1000,
    };
    f(&mut c);
    PostgresSink::named(&c, "warehouse").unwrap()
}

fn ev(v: Value) -> Event {
    let id = v["messageId"].as_str().unwrap().to_string();
    Event {
        json: bytes::Bytes::from(v.to_string()),
        message_id: id.as_str().into(),
    }
}

fn base(kind: &str, id: &str, at: &str) -> Value {
    json!({
        "type": kind,
        "messageId": id,
        "userId": "u1",
        "anonymousId": "a1",
        "channel": "web",
        "context": {
            "library": {"name": "analytics.js", "version": "3.0.0"},
            "userAgent": "Mozilla/5.0",
            "page": {"path": "/cart"},
        },
        "timestamp": at,
        "sentAt": at,
        "originalTimestamp": at,
        "receivedAt": at,
        "request_ip": "10.0.0.1",
    })
}

fn with(mut v: Value, extra: Value) -> Value {
    if let (Value::Object(o), Value::Object(e)) = (&mut v, extra) {
        o.extend(e);
    }
    v
}

/// The sample: every type, nested properties, arrays, booleans, timestamps, a trait
/// named `user_id`, an event named `tracks`.
fn sample() -> Vec<Event> {
    let t = "2026-11-29T08:00:00.000Z";
    vec![
        ev(with(
            base("track", "t1", t),
            json!({"event": "Order Completed", "properties": {
                "orderId": "o-1", "revenue": 10, "total": 12.5, "coupon": null,
                "products": [{"sku": "a"}, {"sku": "b"}], "shipped": false,
                "shippedAt": "2026-11-30T10:00:00Z",
                "address": {"city": "Oslo", "geo": {"lat": 59.9}},
                "1st": "first", "order": "reserved word"}}),
        )),
        ev(with(
            base("track", "t2", t),
            json!({"event": "tracks", "properties": {"n": 1}}),
        )),
        ev(with(
            base("identify", "i1", t),
            json!({"traits": {"email": "a@example.com", "user_id": "legacy-7",
                   "plan": "free", "logins": 3, "company": {"name": "Acme"}}}),
        )),
        ev(with(
            base("page", "p1", t),
            json!({"name": "Cart", "properties": {"url": "https://x/cart", "title": "Cart"}}),
        )),
        ev(with(
            base("screen", "s1", t),
            json!({"name": "Home", "properties": {"launched": true}}),
        )),
        ev(with(
            base("group", "g1", t),
            json!({"groupId": "g-1", "traits": {"employees": 42, "industry": "retail"}}),
        )),
        ev(with(base("alias", "al1", t), json!({"previousId": "a1"}))),
    ]
}

async fn columns(c: &Client, schema: &str, table: &str) -> BTreeMap<String, String> {
    c.query(
        "SELECT column_name::text, data_type::text FROM information_schema.columns \
         WHERE table_schema = $1 AND table_name = $2",
        &[&schema, &table],
    )
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

const TS: &str = "timestamp with time zone";

fn expect(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// The columns every table has from `base`.
fn common() -> Vec<(&'static str, &'static str)> {
    vec![
        ("id", "text"),
        ("anonymous_id", "text"),
        ("user_id", "text"),
        ("received_at", TS),
        ("sent_at", TS),
        ("timestamp", TS),
        ("original_timestamp", TS),
        ("uuid_ts", TS),
        ("context_request_ip", "text"),
        ("channel", "text"),
        ("context_library_name", "text"),
        ("context_library_version", "text"),
        ("context_user_agent", "text"),
        ("context_page_path", "text"),
    ]
}

fn table(extra: &[(&'static str, &'static str)]) -> BTreeMap<String, String> {
    let mut all = common();
    all.extend_from_slice(extra);
    expect(&all)
}

#[tokio::test]
async fn the_sample_makes_rudderstacks_schema() {
    let pg = PgCluster::start();
    pg.create_db("wh").await;
    let url = pg.url("wh");
    let s = sink(&url, "web_prod");
    assert_eq!(s.deliver(&sample()).await, Outcome::Delivered);
    let c = admin(&url).await;
    let tracks_cols = [("event", "text"), ("event_text", "text")];
    assert_eq!(columns(&c, "web_prod", "tracks").await, table(&tracks_cols));
    let mut order = tracks_cols.to_vec();
    order.extend_from_slice(&[
        ("order_id", "text"),
        ("revenue", "bigint"),
        ("total", "numeric"),
        ("products", "text"),
        ("shipped", "boolean"),
        ("shipped_at", TS),
        ("address_city", "text"),
        ("address_geo_lat", "numeric"),
        ("_1st", "text"),
        ("_order", "text"),
    ]);
    assert_eq!(
        columns(&c, "web_prod", "order_completed").await,
        table(&order)
    );
    let mut named_tracks = tracks_cols.to_vec();
    named_tracks.push(("n", "bigint"));
    assert_eq!(
        columns(&c, "web_prod", "_tracks").await,
        table(&named_tracks)
    );
    let traits = [
        ("email", "text"),
        ("_user_id", "text"),
        ("plan", "text"),
        ("logins", "bigint"),
        ("company_name", "text"),
    ];
    assert_eq!(columns(&c, "web_prod", "identifies").await, table(&traits));
    let mut users = table(&traits);
    for gone in ["user_id", "sent_at", "timestamp", "original_timestamp"] {
        users.remove(gone);
    }
    assert_eq!(columns(&c, "web_prod", "users").await, users);
    assert_eq!(
        columns(&c, "web_prod", "pages").await,
        table(&[("name", "text"), ("url", "text"), ("title", "text")])
    );
    assert_eq!(
        columns(&c, "web_prod", "screens").await,
        table(&[("name", "text"), ("launched", "boolean")])
    );
    assert_eq!(
        columns(&c, "web_prod", "groups").await,
        table(&[
            ("group_id", "text"),
            ("employees", "bigint"),
            ("industry", "text")
        ])
    );
    assert_eq!(
        columns(&c, "web_prod", "aliases").await,
        table(&[("previous_id", "text")])
    );
    assert_eq!(
        columns(&c, "web_prod", "rudder_discards").await,
        expect(&[
            ("table_name", "text"),
            ("row_id", "text"),
            ("column_name", "text"),
            ("column_value", "text"),
            ("received_at", TS),
            ("uuid_ts", TS),
            ("reason", "text"),
        ])
    );
    // Values.
    let r = c
        .query_one(
            "SELECT event, event_text, products, address_geo_lat::text, shipped, \
             shipped_at = '2026-11-30T10:00:00Z'::timestamptz, uuid_ts IS NOT NULL \
             FROM web_prod.order_completed",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "order_completed");
    assert_eq!(r.get::<_, String>(1), "Order Completed");
    assert_eq!(r.get::<_, String>(2), r#"[{"sku":"a"},{"sku":"b"}]"#);
    assert_eq!(r.get::<_, String>(3), "59.9");
    assert!(!r.get::<_, bool>(4));
    assert!(r.get::<_, bool>(5) && r.get::<_, bool>(6));
    let r = c
        .query_one("SELECT user_id, _user_id FROM web_prod.identifies", &[])
        .await
        .unwrap();
    assert_eq!(
        (r.get::<_, String>(0), r.get::<_, String>(1)),
        ("u1".into(), "legacy-7".into())
    );
    assert_eq!(count(&c, "SELECT count(*) FROM web_prod.tracks").await, 2);
    assert_eq!(
        count(&c, "SELECT count(*) FROM web_prod.rudder_discards").await,
        0
    );

    // A value whose type changes: the column keeps its type, what does not fit is
    // discarded with the reason; an int in a numeric column and a bool in text fit.
    let t = "2026-11-29T09:00:00Z";
    let changed = vec![ev(with(
        base("track", "t3", t),
        json!({"event": "Order Completed", "properties": {
            "revenue": "lots", "total": 13, "order_id": true, "shipped": "no",
            "shippedAt": "soon", "newKey": 1}}),
    ))];
    assert_eq!(s.deliver(&changed).await, Outcome::Delivered);
    let discards: Vec<(String, String, String, String)> = c
        .query(
            "SELECT table_name, column_name, column_value, reason FROM web_prod.rudder_discards \
             WHERE row_id = 't3' ORDER BY column_name",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let d = |col: &str, val: &str, reason: &str| {
        (
            "order_completed".to_string(),
            col.to_string(),
            val.to_string(),
            reason.to_string(),
        )
    };
    assert_eq!(
        discards,
        vec![
            d(
                "revenue",
                "lots",
                "incompatible schema conversion from string to int"
            ),
            d(
                "shipped",
                "no",
                "incompatible schema conversion from string to boolean"
            ),
            d(
                "shipped_at",
                "soon",
                "incompatible schema conversion from string to datetime"
            ),
        ]
    );
    let r = c
        .query_one(
            "SELECT total::text, order_id, new_key, revenue IS NULL FROM web_prod.order_completed \
             WHERE id = 't3'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "13");
    assert_eq!(r.get::<_, String>(1), "true");
    assert_eq!(r.get::<_, i64>(2), 1);
    assert!(r.get::<_, bool>(3));

    // Print the tables as `\d` would list them (for the notes).
    for t in [
        "tracks",
        "order_completed",
        "_tracks",
        "identifies",
        "users",
        "pages",
        "screens",
        "groups",
        "aliases",
        "rudder_discards",
    ] {
        let cols = c
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns \
                 WHERE table_schema = 'web_prod' AND table_name = $1 ORDER BY ordinal_position",
                &[&t],
            )
            .await
            .unwrap();
        println!("Table \"web_prod.{t}\"");
        for r in cols {
            println!("  {:<26} {}", r.get::<_, String>(0), r.get::<_, String>(1));
        }
    }
}

#[tokio::test]
async fn redelivery_and_users_keep_one_row_each() {
    let pg = PgCluster::start();
    pg.create_db("wh").await;
    let url = pg.url("wh");
    let s = sink(&url, "w");
    let events = sample();
    assert_eq!(s.deliver(&events).await, Outcome::Delivered);
    // New rows: loaded as plain inserts, nothing learnt.
    assert_eq!(s.careful_loads(), 0);
    // Again, whole and in parts, and with a copy of an event inside one batch: the plain
    // insert meets ids the tables have, the load goes again with ON CONFLICT, and so do
    // the next ones.
    assert_eq!(s.deliver(&events).await, Outcome::Delivered);
    assert_eq!(s.careful_loads(), sink::CAREFUL_LOADS);
    let mut doubled = events[..3].to_vec();
    doubled.extend_from_slice(&events[..3]);
    assert_eq!(s.deliver(&doubled).await, Outcome::Delivered);
    assert_eq!(s.careful_loads(), sink::CAREFUL_LOADS - 1);
    // A second sink (another replica) too.
    let other = sink(&url, "w");
    assert_eq!(other.deliver(&events).await, Outcome::Delivered);
    assert_eq!(other.careful_loads(), sink::CAREFUL_LOADS);
    let c = admin(&url).await;
    for (t, n) in [
        ("tracks", 2),
        ("order_completed", 1),
        ("_tracks", 1),
        ("identifies", 1),
        ("users", 1),
        ("pages", 1),
        ("screens", 1),
        ("groups", 1),
        ("aliases", 1),
    ] {
        assert_eq!(
            count(&c, &format!("SELECT count(*) FROM w.{t}")).await,
            n,
            "{t}"
        );
    }

    // users: the latest value of each trait; an older identify sent again changes
    // nothing, its traits the newer ones lack are kept.
    let older = ev(with(
        base("identify", "i0", "2026-11-28T08:00:00Z"),
        json!({"traits": {"plan": "trial", "referrer": "ad"}}),
    ));
    let newer = ev(with(
        base("identify", "i2", "2026-11-30T08:00:00Z"),
        json!({"traits": {"plan": "pro"}}),
    ));
    assert_eq!(
        s.deliver(&[newer.clone(), older.clone()]).await,
        Outcome::Delivered
    );
    assert_eq!(s.deliver(&[older]).await, Outcome::Delivered);
    let r = c
        .query_one(
            "SELECT plan, email, referrer, logins, received_at = '2026-11-30T08:00:00Z' \
             FROM w.users WHERE id = 'u1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "pro");
    assert_eq!(r.get::<_, String>(1), "a@example.com");
    assert_eq!(r.get::<_, String>(2), "ad");
    assert_eq!(r.get::<_, i64>(3), 3);
    assert!(r.get::<_, bool>(4));
    assert_eq!(count(&c, "SELECT count(*) FROM w.identifies").await, 3);

    // Discards are not duplicated by re-delivery either.
    let bad = ev(with(
        base("track", "t9", "2026-11-29T08:00:00Z"),
        json!({"event": "tracks", "properties": {"n": "not a number"}}),
    ));
    for _ in 0..3 {
        assert_eq!(
            s.deliver(std::slice::from_ref(&bad)).await,
            Outcome::Delivered
        );
    }
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM w.rudder_discards WHERE row_id = 't9'"
        )
        .await,
        1
    );

    // A plain insert of a load whose rows are partly in the tables already: rolled back
    // whole, loaded again; the new row once, the old ones still once.
    let mixed = ev(with(
        base("track", "t-mixed", "2026-11-29T09:00:00Z"),
        json!({"event": "Mixed Thing", "properties": {"n": 1}}),
    ));
    let third = sink(&url, "w");
    assert_eq!(
        third.deliver(&[events[0].clone(), mixed]).await,
        Outcome::Delivered
    );
    assert_eq!(third.careful_loads(), sink::CAREFUL_LOADS);
    assert_eq!(count(&c, "SELECT count(*) FROM w.mixed_thing").await, 1);
    assert_eq!(
        count(&c, "SELECT count(*) FROM w.tracks WHERE id = 't-mixed'").await,
        1
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM w.tracks WHERE id = 't1'").await,
        1
    );
}

/// The warehouse schema is the source of truth: an operator's column type the event's
/// value cannot be read as makes the database refuse the load. The others of its batch
/// load; the sink names that event alone as refused (the router dead-letters it).
#[tokio::test]
async fn an_event_the_database_refuses_blocks_nobody() {
    let pg = PgCluster::start();
    pg.create_db("wh").await;
    let url = pg.url("wh");
    let s = sink(&url, "w");
    assert_eq!(s.deliver(&sample()[..1]).await, Outcome::Delivered);
    let c = admin(&url).await;
    c.batch_execute("ALTER TABLE w.order_completed ADD COLUMN ref uuid")
        .await
        .unwrap();
    let s = sink(&url, "w"); // a fresh sink: no cached columns
    let t = "2026-11-29T10:00:00Z";
    let mk = |id: &str, r: &str| {
        ev(with(
            base("track", id, t),
            json!({"event": "Order Completed", "properties": {"ref": r}}),
        ))
    };
    let mut batch: Vec<Event> = (0..9)
        .map(|i| mk(&format!("ok{i}"), "6f1c2f9e-8f3a-4a43-9a40-1d7a1f1a2b3c"))
        .collect();
    batch.insert(5, mk("bad", "not-a-uuid"));
    let refused = |o: Outcome| match o {
        Outcome::DeliveredExcept { refused } => refused,
        other => panic!("expected DeliveredExcept, got {other:?}"),
    };
    let r = refused(s.deliver(&batch).await);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].0, 5);
    assert!(r[0].1.contains("uuid"), "{}", r[0].1);
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM w.order_completed WHERE id LIKE 'ok%'"
        )
        .await,
        9
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM w.tracks WHERE id = 'bad'").await,
        0
    );
    // Not in the discards: the dead letters keep it whole, for a replay once an operator
    // has fixed the column.
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM w.rudder_discards WHERE row_id = 'bad'"
        )
        .await,
        0
    );
    // Alone too; and a batch of only refused events.
    let r = refused(s.deliver(&batch[5..6]).await);
    assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), [0]);
    let two = [mk("bad2", "x"), mk("bad3", "y")];
    let r = refused(s.deliver(&two).await);
    assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), [0, 1]);
    // Fixed by the operator: a replay loads it.
    c.batch_execute("ALTER TABLE w.order_completed ALTER COLUMN ref TYPE text")
        .await
        .unwrap();
    assert_eq!(s.deliver(&batch[5..6]).await, Outcome::Delivered);
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM w.order_completed WHERE id = 'bad'"
        )
        .await,
        1
    );
}

/// Hostile input: past 1,600 columns new keys go to the discards; the table stays usable.
#[tokio::test]
async fn the_column_limit_holds() {
    let pg = PgCluster::start();
    pg.create_db("wh").await;
    let url = pg.url("wh");
    let s = sink(&url, "w");
    let mut props = serde_json::Map::new();
    for i in 0..1700 {
        props.insert(format!("k{i:04}"), json!("x"));
    }
    let e = ev(with(
        base("track", "wide", "2026-11-29T08:00:00Z"),
        json!({"event": "Wide", "properties": props}),
    ));
    assert_eq!(s.deliver(&[e]).await, Outcome::Delivered);
    let c = admin(&url).await;
    assert_eq!(columns(&c, "w", "wide").await.len(), sink::MAX_COLUMNS);
    let discarded = count(
        &c,
        "SELECT count(*) FROM w.rudder_discards WHERE row_id = 'wide' AND reason LIKE '%1600%'",
    )
    .await;
    // 16 columns are the row's own (common ones, event, event_text).
    let own = 16;
    assert_eq!(discarded, (1700 + own - 1600) as i64);
    assert_eq!(count(&c, "SELECT count(*) FROM w.wide").await, 1);
}

/// Timestamps go to `timestamp with time zone` columns in binary, converted by the loader:
/// each must be the value PostgreSQL's own input function reads from the text (in the
/// destination's UTC session), for every form the loader takes as a timestamp: dates
/// alone, `T` or space, no seconds, no zone, `Z`/`z`, `±HH`, `±HHMM`, `±HH:MM`, and 1 to
/// 9 digits of fraction, those past six rounded as PostgreSQL rounds them (ties to even
/// on a double).
#[tokio::test]
async fn binary_timestamps_are_what_postgres_reads_from_the_text() {
    let pg = PgCluster::start();
    pg.create_db("wh").await;
    let c = admin(&pg.url("wh")).await;
    c.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    let mut texts: Vec<String> = [
        "2026-11-29",
        "2026-11-29T10:00",
        "2026-11-29 10:00:07",
        "2026-11-29T10:00:07z",
        "2026-11-29T10:00:07.5+01",
        "2026-11-29T10:00:07.25-0130",
        "2026-11-29T10:00:07.125-05:30",
        "2026-11-29T23:59:59.9999995+15:59",
        "0001-01-01T00:00:00-15:59",
        "0001-01-01T00:00:00.000001+15:59",
        "9999-12-31T23:59:59.999999999-15:59",
        "1999-12-31T23:59:59.9999995Z",
        "2000-02-29T12:00:00.0000005Z",
        "2000-01-01T00:00:00.0000015Z",
        "2000-01-01T00:00:00.0000025Z",
        "1970-01-01T00:00:00.1234565Z",
        "1970-01-01T00:00:00.99999949Z",
        "1969-12-31T23:59:59.999999500Z",
        "2100-02-28T00:00:00.000000001Z",
    ]
    .map(String::from)
    .to_vec();
    // And many more, from a fixed seed.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for _ in 0..5000 {
        let (y, m) = (1 + next(9999), 1 + next(12));
        let d = 1 + next(28);
        let mut t = format!("{y:04}-{m:02}-{d:02}");
        if next(8) > 0 {
            let sep = if next(2) == 0 { 'T' } else { ' ' };
            t.push_str(&format!("{sep}{:02}:{:02}", next(24), next(60)));
            if next(6) > 0 {
                t.push_str(&format!(":{:02}", next(60)));
                let digits = next(10) as usize;
                if digits > 0 {
                    let f: String = (0..digits)
                        .map(|_| char::from(b'0' + [0, 5, 9, next(10) as u8][next(4) as usize]))
                        .collect();
                    t.push('.');
                    t.push_str(&f);
                }
            }
            let (h, mi) = (next(16), next(60));
            let sign = if next(2) == 0 { '+' } else { '-' };
            match next(5) {
                0 => {}
                1 => t.push('Z'),
                2 => t.push_str(&format!("{sign}{h:02}")),
                3 => t.push_str(&format!("{sign}{h:02}{mi:02}")),
                _ => t.push_str(&format!("{sign}{h:02}:{mi:02}")),
            }
        }
        texts.push(t);
    }
    let mut binary = load::Array::new(load::Elem::Timestamptz);
    for t in &texts {
        assert!(schema::looks_like_timestamp(t), "{t}");
        binary
            .push_val(&schema::Val::Ts(t.as_str().into()))
            .unwrap();
    }
    let rows = c
        .query(
            "SELECT t, t::timestamptz::text, b::text \
             FROM unnest($1::text[], $2::timestamptz[]) AS x(t, b) \
             WHERE t::timestamptz IS DISTINCT FROM b",
            &[&texts, &binary],
        )
        .await
        .unwrap();
    let wrong: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(
        wrong.is_empty(),
        "text, as PostgreSQL reads it, as sent: {wrong:#?}"
    );
    let same: i64 = c
        .query_one(
            "SELECT count(*) FROM unnest($1::text[], $2::timestamptz[]) AS x(t, b) \
             WHERE t::timestamptz = b",
            &[&texts, &binary],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(same, texts.len() as i64);
}

/// Loads that create the same new tables at once (a server's first loads, several
/// replicas starting together): each commits on its first try, none fails over the race
/// of `CREATE TABLE IF NOT EXISTS` (which PostgreSQL can lose with "type ... already
/// exists", a unique violation in its catalog, or "relation ... already exists").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_loads_of_the_same_tables() {
    let pg = PgCluster::start();
    pg.create_db("wh").await;
    let url = pg.url("wh");
    for round in 0..6 {
        let schema = format!("first{round}");
        let mut tasks = Vec::new();
        for w in 0..8 {
            let (url, schema) = (url.clone(), schema.clone());
            tasks.push(tokio::spawn(async move {
                let s = sink(&url, &schema);
                let batch: Vec<Event> = ["Alpha", "Beta", "Gamma"]
                    .iter()
                    .enumerate()
                    .map(|(i, name)| {
                        ev(with(
                            base("track", &format!("w{w}-{i}"), "2026-11-29T08:00:00Z"),
                            json!({"event": name, "properties": {"n": i}}),
                        ))
                    })
                    .collect();
                s.deliver(&batch).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Outcome::Delivered, "round {round}");
        }
        let c = admin(&url).await;
        assert_eq!(
            count(&c, &format!("SELECT count(*) FROM {schema}.tracks")).await,
            8 * 3
        );
    }
}

/// Loads that add different columns to the same table at once (several sinks, as
/// several replicas or partitions would): all commit, every column is there once.
#[tokio::test]
async fn concurrent_schema_changes() {
    let pg = PgCluster::start();
    pg.create_db("wh").await;
    let url = pg.url("wh");
    let mut tasks = Vec::new();
    for w in 0..6 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let s = sink(&url, "w");
            for round in 0..5 {
                let batch: Vec<Event> = (0..20)
                    .map(|i| {
                        ev(with(
                            base(
                                "track",
                                &format!("w{w}-r{round}-{i}"),
                                "2026-11-29T08:00:00Z",
                            ),
                            json!({"event": "Busy", "properties": {
                                format!("from_{w}_{round}"): i, "shared": i}}),
                        ))
                    })
                    .collect();
                let mut tries = 0;
                loop {
                    tries += 1;
                    match s.deliver(&batch).await {
                        Outcome::Delivered => break,
                        other if tries < 5 => {
                            eprintln!("retrying: {other:?}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        other => panic!("{other:?}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let c = admin(&url).await;
    assert_eq!(count(&c, "SELECT count(*) FROM w.busy").await, 6 * 5 * 20);
    let cols = columns(&c, "w", "busy").await;
    for w in 0..6 {
        for round in 0..5 {
            assert_eq!(
                cols.get(&format!("from_{w}_{round}")).map(String::as_str),
                Some("bigint")
            );
        }
    }
}

/// A realistic mix (tracks of 12 event names with 8-15 properties, identifies, pages,
/// screens, groups, aliases) of `n` events.
pub(crate) fn mix(n: usize, seed: &str) -> Vec<Event> {
    let names = [
        "Product Viewed",
        "Product Added",
        "Cart Viewed",
        "Checkout Started",
        "Order Completed",
        "Signed In",
        "Signed Out",
        "Search Performed",
        "Video Played",
        "Video Paused",
        "Coupon Applied",
        "Review Submitted",
    ];
    (0..n)
        .map(|i| {
            let id = format!("{seed}-{i}");
            let at = "2026-11-29T08:00:00.000Z";
            let mut b = base("track", &id, at);
            b["userId"] = json!(format!("user-{}", i % 5000));
            let v = match i % 20 {
                0..=12 => {
                    let mut props = serde_json::Map::new();
                    for k in 0..(8 + i % 8) {
                        props.insert(format!("prop{k}"), json!(k * i));
                    }
                    props.insert("sku".into(), json!(format!("sku-{}", i % 977)));
                    props.insert("price".into(), json!(9.99));
                    props.insert("inStock".into(), json!(true));
                    props.insert("tags".into(), json!(["a", "b"]));
                    with(
                        b,
                        json!({"event": names[i % names.len()], "properties": props}),
                    )
                }
                13..=15 => {
                    b["type"] = json!("identify");
                    with(
                        b,
                        json!({"traits": {"email": format!("u{i}@example.com"),
                               "plan": "pro", "logins": i, "address": {"city": "Oslo"}}}),
                    )
                }
                16..=17 => {
                    b["type"] = json!("page");
                    with(
                        b,
                        json!({"name": "Home", "properties": {"url": "https://x/", "path": "/"}}),
                    )
                }
                18 => {
                    b["type"] = json!("screen");
                    with(b, json!({"name": "Main"}))
                }
                _ => {
                    b["type"] = json!("group");
                    with(b, json!({"groupId": "g1", "traits": {"employees": 10}}))
                }
            };
            ev(v)
        })
        .collect()
}

/// Load rate: `BALLAST_BENCH_WAREHOUSE_URL` (a database; see scripts/bench-warehouse,
/// which starts one with fsync on) or a throwaway cluster (fsync off). Prints events/s
/// loaded (through `deliver`, batches of 10,000, 4 at once) and the rate of turning
/// events into rows alone (no database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_load_rate() {
    let (_pg, url) = match std::env::var("BALLAST_BENCH_WAREHOUSE_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let pg = PgCluster::start();
            pg.create_db("wh").await;
            let url = pg.url("wh");
            (Some(pg), url)
        }
    };
    let total: usize = std::env::var("BALLAST_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let events = Arc::new(mix(total, "bench"));
    let started = std::time::Instant::now();
    let mut rows = 0;
    for e in events.iter() {
        rows += schema::rows_of(&e.json, &e.message_id).rows.len();
    }
    let transform = started.elapsed();
    // Warm up: the tables and columns exist before timing.
    let s = Arc::new(sink(&url, "bench"));
    assert_eq!(s.deliver(&mix(2000, "warm")).await, Outcome::Delivered);
    let started = std::time::Instant::now();
    let (cpu_before, pg_before) = (process_cpu(), postgres_cpu());
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (s, events) = (s.clone(), events.clone());
        tasks.push(tokio::spawn(async move {
            for (k, chunk) in events.chunks(10_000).enumerate() {
                if k % 4 == w {
                    assert_eq!(s.deliver(chunk).await, Outcome::Delivered);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let load = started.elapsed();
    let per_event = |secs: f64| secs * 1e6 / total as f64;
    let cpu = per_event(process_cpu() - cpu_before);
    let pg = per_event(postgres_cpu() - pg_before);
    let transform_rate = total as f64 / transform.as_secs_f64();
    let load_rate = total as f64 / load.as_secs_f64();
    println!(
        "events {total}, rows {rows}: transform only {transform_rate:.0} events/s (one thread); \
         loaded {load_rate:.0} events/s ({:.0} rows/s) in {load:.2?}: {:.2}x the transform alone; \
         CPU per event loaded: this process {cpu:.1} µs, postgres processes {pg:.1} µs",
        rows as f64 / load.as_secs_f64(),
        load_rate / transform_rate,
    );
}

/// CPU seconds (user + system) this process has used.
fn process_cpu() -> f64 {
    cpu_of("/proc/self/stat", 12)
}

/// CPU seconds every process named `postgres` on this machine has used (with their
/// waited-for children): the cluster under load, and any other running here.
fn postgres_cpu() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.flatten()
        .filter(|p| {
            std::fs::read_to_string(p.path().join("comm")).is_ok_and(|c| c.trim() == "postgres")
        })
        .map(|p| cpu_of(&p.path().join("stat").to_string_lossy(), 14))
        .sum()
}

/// utime + stime (`upto` 12), and cutime + cstime (`upto` 14), of a `/proc/*/stat`, in
/// seconds.
fn cpu_of(stat: &str, upto: usize) -> f64 {
    let Ok(text) = std::fs::read_to_string(stat) else {
        return 0.0;
    };
    // SAFETY: sysconf reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let fields: Vec<&str> = text
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    fields.get(11..=upto).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    }) / ticks
}

// ---- Nothing silently lost: a corpus of hostile events, and a walker over the tables ----

/// The text a messageId is stored as (docs/DESTINATIONS.md, "Ids"): as sent, unless it
/// holds a NUL (PostgreSQL text cannot) or begins with the escape's own prefix; then
/// `~esc:` and the id with `\` written `\\` and NUL written `\0`. Written out here from the
/// documented rule, not taken from the loader.
fn stored_id(id: &str) -> String {
    if !id.contains('\0') && !id.starts_with("~esc:") {
        return id.to_string();
    }
    let mut s = String::from("~esc:");
    for c in id.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '\0' => s.push_str("\\0"),
            c => s.push(c),
        }
    }
    s
}

/// Where a stored value may be found: its text forms, so a leaf value can be looked up
/// whatever column type or discard holds it.
fn stored_forms(v: &Value, out: &mut std::collections::HashSet<String>) {
    match v {
        Value::String(s) => {
            out.insert(s.clone());
            if let Some(k) = schema::timestamp_key(s) {
                out.insert(format!("ts:{k}"));
            }
            if let Ok(f) = s.parse::<f64>() {
                out.insert(format!("num:{f:?}"));
            }
            if let Ok(j @ (Value::Array(_) | Value::Object(_))) = serde_json::from_str::<Value>(s) {
                out.insert(format!("json:{j}"));
            }
        }
        Value::Number(n) => {
            if let Some(f) = n.as_f64() {
                out.insert(format!("num:{f:?}"));
            }
            out.insert(n.to_string());
        }
        Value::Bool(b) => {
            out.insert(format!("bool:{b}"));
        }
        _ => {}
    }
}

/// The forms a leaf value sent may take where it is stored.
fn leaf_forms(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => {
            let mut f = vec![s.clone(), serde_json::to_string(s).unwrap()];
            if let Some(k) = schema::timestamp_key(s) {
                f.push(format!("ts:{k}"));
            }
            f
        }
        Value::Number(n) => {
            let mut f = vec![n.to_string()];
            if let Some(x) = n.as_f64() {
                f.push(format!("num:{x:?}"));
            }
            f
        }
        Value::Bool(b) => vec![format!("bool:{b}"), b.to_string()],
        Value::Array(_) | Value::Object(_) => vec![format!("json:{v}"), v.to_string()],
        Value::Null => vec![],
    }
}

/// What the walker saw of one event in the warehouse.
struct Found {
    /// Tables holding a row with the event's id.
    tables: Vec<String>,
    /// Text forms of every value of those rows.
    columns: std::collections::HashSet<String>,
    /// Text forms of the event's discarded values (each with a reason).
    discards: std::collections::HashSet<String>,
    /// Discarded values as stored (for values cut to their first KiB).
    discard_values: Vec<String>,
}

async fn find(c: &Client, schema: &str, id: &str) -> Found {
    let tables: Vec<String> = c
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 \
             AND table_name <> 'rudder_discards'",
            &[&schema],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    let mut f = Found {
        tables: Vec::new(),
        columns: Default::default(),
        discards: Default::default(),
        discard_values: Vec::new(),
    };
    for t in tables {
        let rows = c
            .query(
                &format!(
                    // `r.*`: the row, even when the table has a column named `r`.
                    "SELECT row_to_json(r.*)::text FROM {}.{} r WHERE id = $1",
                    sink::quote(schema),
                    sink::quote(&t)
                ),
                &[&id],
            )
            .await
            .unwrap_or_else(|e| panic!("reading {t:?} for {id:?}: {e:?}"));
        for r in rows {
            let row: Value = serde_json::from_str(&r.get::<_, String>(0)).unwrap();
            if let Value::Object(cols) = row {
                for (k, v) in cols {
                    if k != "id" {
                        stored_forms(&v, &mut f.columns);
                    }
                }
            }
            f.tables.push(t.clone());
        }
    }
    let discards = c
        .query(
            &format!(
                "SELECT column_value, coalesce(reason, '') FROM {}.rudder_discards \
                 WHERE row_id = $1",
                sink::quote(schema)
            ),
            &[&id],
        )
        .await
        .unwrap();
    for d in discards {
        let (value, reason): (Option<String>, String) = (d.get(0), d.get(1));
        assert!(!reason.is_empty(), "a discard of {id:?} without a reason");
        let value = value.unwrap_or_default();
        stored_forms(&Value::String(value.clone()), &mut f.discards);
        f.discard_values.push(value);
    }
    f
}

/// Whether `v` (a leaf, or an object whose leaves all are) is in a column or the discards.
fn kept(v: &Value, f: &Found, path: &str, lost: &mut Vec<String>) {
    if v.is_null() {
        return;
    }
    let forms = leaf_forms(v);
    let hit = forms
        .iter()
        .any(|x| f.columns.contains(x) || f.discards.contains(x))
        || f.discard_values.iter().any(|d| {
            d.len() >= 1000
                && forms
                    .iter()
                    .any(|x| x.starts_with(d.as_str()) || d.starts_with(x.as_str()))
        });
    if hit {
        return;
    }
    match v {
        // An object is its members (an empty one holds nothing).
        Value::Object(o) => {
            for (k, inner) in o {
                kept(inner, f, &format!("{path}.{k}"), lost);
            }
        }
        _ => {
            let mut text = v.to_string();
            if text.len() > 80 {
                text = format!("{}…", schema::cut(&text, 80));
            }
            lost.push(format!("{path} = {text}"));
        }
    }
}

/// Walks each event (its JSON as the loader should read it) against the tables: its row
/// is in its type's table (`tracks` for a track) and every value the warehouse schema takes
/// from it (the context, the properties or traits, the named top-level fields) is in a
/// column of one of its rows or in `rudder_discards` for its id. Returns what is missing.
async fn walk(c: &Client, schema: &str, events: &[Value]) -> Vec<String> {
    let mut lost = Vec::new();
    for e in events {
        let id = stored_id(e["messageId"].as_str().unwrap());
        let f = find(c, schema, &id).await;
        let kind = e["type"].as_str().unwrap_or("");
        let table = match kind {
            "track" => "tracks",
            "identify" => "identifies",
            "page" => "pages",
            "screen" => "screens",
            "group" => "groups",
            "alias" => "aliases",
            other => panic!("type {other}"),
        };
        if !f.tables.iter().any(|t| t == table) {
            lost.push(format!("{id:?}: no row in {table}"));
            continue;
        }
        let mut mine = Vec::new();
        let mut own = vec!["userId", "anonymousId", "channel", "context"];
        own.extend(match kind {
            "track" => &["event", "properties"][..],
            "page" | "screen" => &["name", "properties"][..],
            "identify" => &["traits"][..],
            "group" => &["groupId", "traits"][..],
            _ => &["previousId"][..],
        });
        for key in own {
            if let Some(v) = e.get(key) {
                kept(v, &f, key, &mut mine);
            }
        }
        lost.extend(mine.into_iter().map(|m| format!("{id:?}: {m}")));
    }
    lost
}

/// The hostile corpus, as the JSON texts the loader reads (lone surrogates and all), each
/// a track unless it says otherwise.
fn hostile() -> Vec<String> {
    let t = "2026-11-29T08:00:00Z";
    let track = |id: &str, extra: Value| with(base("track", id, t), extra).to_string();
    let mut out = vec![
        track(
            "cjk",
            json!({"event": "注文完了", "properties": {"金額": 100_001, "ok": 100_002}}),
        ),
        track(
            "bang",
            json!({"event": "!!!", "properties": {"!!!": "v-bang", "😀": "v-emoji",
                   "é": "v-e-acute", "\u{0}": "v-nul-key", "": "v-empty-key"}}),
        ),
        track("emoji-event", json!({"event": "😀", "properties": {"x": "v-emoji-event"}})),
        track(
            "no-name",
            json!({"event": "", "properties": {"": {"-": 973_768_989.586_180_3}, "z": "v-no-name"}}),
        ),
        track("e-acute", json!({"event": "é", "properties": {"y": "v-e-event"}})),
        // In this order (a `json!` object would sort them).
        track(
            "clash",
            json!({"event": "Clash", "properties": {"CLASH": 0}}),
        )
        .replace(
            r#""CLASH":0"#,
            r#""productID":200001,"product_id":200002,"Product ID":200003,"product-id":200004,"PRODUCT_ID":200005"#,
        ),
        track(
            "scripts",
            json!({"event": "Scripts", "properties": {"名前": "v-cjk-name",
                   "الاسم": "v-arabic", "שם": "v-hebrew", "🎉🎉": "v-party",
                   "e\u{301}": "v-combining", "Ünïcödé": "v-umlauts", "안녕": "v-hangul",
                   "value-cjk": "注文完了", "value-rtl": "مرحبا بالعالم",
                   "value-emoji": "😀👍🏽", "value-combining": "e\u{301}\u{302}"}}),
        ),
        track(
            "long-names",
            json!({"event": "x".repeat(1000), "properties": {
                "a".repeat(1000): "v-long-1", format!("{}b", "a".repeat(999)): "v-long-2",
                "字".repeat(400): "v-long-cjk"}}),
        ),
        track(
            "reserved",
            json!({"event": "select", "properties": {"select": 300_001, "from": "v-from",
                   "order": true, "id": "v-id", "user_id": "v-user-id", "uuid_ts": "v-uuid",
                   "table": "v-table", "event": "v-event", "received_at": "v-received"}}),
        ),
        track("nul-id-a", json!({"event": "Nul", "properties": {"n": 400_001}})),
        track("nul-value", json!({"event": "Nul", "properties": {"note": "a\u{0}b",
               "ok": "v-nul-neighbour"}})),
        track(
            "deep",
            json!({"event": "Deep", "properties": {"a": {"b": {"c": {"d": {"e": {"f":
                {"g": {"h": {"i": {"j": {"k": {"l": "v-deep"}}}}}}}}}}},
                "arr": [1, {"z": "v-in-array"}]}}),
        ),
        with(
            base("identify", "rtl-identify", t),
            json!({"traits": {"الاسم": "v-trait-arabic", "Email": "v-trait-email",
                   "email": "v-trait-email-2"}, "context": {"traits": {"plan": "v-ctx-plan"}}}),
        )
        .to_string(),
        with(
            base("page", "hebrew-page", t),
            json!({"name": "דף הבית", "properties": {"כתובת": "v-page-hebrew"}}),
        )
        .to_string(),
    ];
    // messageIds that differ only by a NUL: two events.
    let mut a = with(
        base("track", "ax", t),
        json!({"event": "Nul",
        "properties": {"n": 400_002}}),
    );
    out.push(a.to_string());
    a["messageId"] = json!("a\u{0}x");
    a["properties"]["n"] = json!(400_003);
    out.push(a.to_string());
    // A lone surrogate in a value and in a key (a browser cutting a string mid-emoji).
    out.push(
        track(
            "surrogate",
            json!({"event": "Cut", "properties": {"title": "LONE-HIGH", "LONE-KEY": "v-lone-key",
                   "fine": "v-fine"}}),
        )
        .replace("LONE-HIGH", "x \\ud83d")
        .replace("LONE-KEY", "k\\udc00"),
    );
    // Wide: 5,000 integer properties; 5,000 context keys.
    let mut wide = serde_json::Map::new();
    for i in 0..5000 {
        wide.insert(format!("k{i:04}"), json!(1_000_000 + i));
    }
    out.push(track(
        "wide-ints",
        json!({"event": "Wide", "properties": wide}),
    ));
    let mut ctx = base("track", "wide-context", t)["context"].clone();
    for i in 0..5000 {
        ctx[format!("c{i:04}")] = json!(format!("v-ctx-{i}"));
    }
    out.push(track(
        "wide-context",
        json!({"event": "Wide Context", "context": ctx, "properties": {"p": "v-after-wide"}}),
    ));
    // A track after those: its new context key still gets somewhere.
    let mut later = base("track", "after-wide", t)["context"].clone();
    later["zzBrandNew"] = json!("v-brand-new");
    out.push(track(
        "after-wide",
        json!({"event": "Later", "context": later}),
    ));
    out
}

/// The event as the walker reads it: a lone surrogate escape as U+FFFD (what the loader
/// keeps of it in the column; the discard keeps the escape as sent).
fn as_walked(text: &str) -> Value {
    serde_json::from_str(
        &text
            .replace("\\ud83d", "\\ufffd")
            .replace("\\udc00", "\\ufffd"),
    )
    .unwrap()
}

fn raw_event(text: &str) -> Event {
    let id = as_walked(text)["messageId"].as_str().unwrap().to_string();
    Event {
        json: bytes::Bytes::from(text.to_string()),
        message_id: id.as_str().into(),
    }
}

/// Every case of the hostile corpus loads (no event refused, none dead-lettered) and the
/// walker finds every value it sent in a column or in the discards with a reason.
#[tokio::test]
async fn nothing_in_the_hostile_corpus_is_lost() {
    let pg = PgCluster::start();
    pg.create_db("wh").await;
    let url = pg.url("wh");
    let s = sink(&url, "w");
    let texts = hostile();
    // One load, then each event alone again (re-delivery), then the last ones once more
    // in a batch of their own (the shared tables already wide).
    let events: Vec<Event> = texts.iter().map(|t| raw_event(t)).collect();
    assert_eq!(s.deliver(&events).await, Outcome::Delivered);
    for e in &events {
        assert_eq!(s.deliver(std::slice::from_ref(e)).await, Outcome::Delivered);
    }
    let c = admin(&url).await;
    let walked: Vec<Value> = texts.iter().map(|t| as_walked(t)).collect();
    let lost = walk(&c, "w", &walked).await;
    assert!(lost.is_empty(), "{} lost:\n{}", lost.len(), lost.join("\n"));
    // Re-delivery recorded no discard twice.
    let twice = count(
        &c,
        "SELECT count(*) FROM (SELECT 1 FROM w.rudder_discards GROUP BY table_name, row_id, \
         column_name, column_value, reason HAVING count(*) > 1) d",
    )
    .await;
    assert_eq!(twice, 0);
}

/// The discards of the corpus carry the reasons the docs name.
#[tokio::test]
async fn the_corpus_discards_say_why() {
    let pg = PgCluster::start();
    pg.create_db("wh").await;
    let url = pg.url("wh");
    let s = sink(&url, "w");
    let events: Vec<Event> = hostile().iter().map(|t| raw_event(t)).collect();
    assert_eq!(s.deliver(&events).await, Outcome::Delivered);
    let c = admin(&url).await;
    let n = |id: &str, like: &str| {
        format!(
            "SELECT count(*) FROM w.rudder_discards WHERE row_id = '{id}' AND reason LIKE '{like}'"
        )
    };
    // Four colliding keys, four discards (and the first sent has the column).
    assert_eq!(count(&c, &n("clash", "column name clash%")).await, 4);
    assert_eq!(
        count(&c, "SELECT product_id FROM w.clash WHERE id = 'clash'").await,
        200_001
    );
    assert_eq!(count(&c, &n("surrogate", "%lone surrogate%")).await, 2);
    assert_eq!(count(&c, &n("nul-value", "%NUL%")).await, 1);
    assert!(count(&c, &n("wide-ints", "%8160 bytes%")).await > 0);
    assert!(count(&c, &n("wide-context", "%limit of 1000 columns%")).await > 0);
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM w.rudder_discards WHERE row_id = 'after-wide' \
             AND column_name = 'context_zz_brand_new' AND reason LIKE '%limit of 1000 columns%'"
        )
        .await,
        1
    );
    assert_eq!(columns(&c, "w", "tracks").await.len(), 1000);
    // The two messageIds that differ by a NUL are two rows.
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM w.nul WHERE id IN ('ax', '~esc:a\\0x')"
        )
        .await,
        2
    );
    // Names: transliterated, or a hash when nothing is left.
    let cjk = columns(&c, "w", "zhu_wen_wan_liao").await;
    assert!(
        cjk.contains_key("jin_e") && cjk.contains_key("ok"),
        "{cjk:?}"
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM w.tracks WHERE event = 'zhu_wen_wan_liao'"
        )
        .await,
        1
    );
    let bang = schema::name_part("!!!");
    assert_eq!(
        count(
            &c,
            &format!("SELECT count(*) FROM w.tracks WHERE event = '{bang}'")
        )
        .await,
        1
    );
}

/// `max_tables`: event names past it make no table; their tracks are in `tracks` and their
/// properties in the discards.
#[tokio::test]
async fn the_table_limit_holds() {
    let pg = PgCluster::start();
    pg.create_db("wh").await;
    let url = pg.url("wh");
    let s = sink_with(&url, "w", |c| c.max_tables = 3);
    let t = "2026-11-29T08:00:00Z";
    let events: Vec<Value> = (0..6)
        .map(|i| {
            with(
                base("track", &format!("e{i}"), t),
                json!({"event": format!("Event {i}"), "properties": {"v": format!("v-{i}")}}),
            )
        })
        .collect();
    for e in &events {
        assert_eq!(s.deliver(&[ev(e.clone())]).await, Outcome::Delivered);
    }
    let c = admin(&url).await;
    let tables = count(
        &c,
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'w' \
         AND table_name LIKE 'event_%'",
    )
    .await;
    assert_eq!(tables, 3);
    assert_eq!(count(&c, "SELECT count(*) FROM w.tracks").await, 6);
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM w.rudder_discards WHERE reason LIKE '%max_tables (3)%' \
             AND column_name = 'v'"
        )
        .await,
        3
    );
    let lost = walk(&c, "w", &events).await;
    assert!(lost.is_empty(), "{lost:#?}");
}

/// Generated names (every script, emoji, combining marks, NUL, reserved words, long,
/// colliding) and values: the walker finds every value.
#[test]
fn generated_events_lose_nothing() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pg = PgCluster::start();
    rt.block_on(pg.create_db("wh"));
    let url = pg.url("wh");
    let s = sink(&url, "w");
    let c = rt.block_on(admin(&url));
    let name = prop_oneof![
        "[a-zA-Z _-]{0,12}",
        "[\u{4e00}-\u{4e40}]{1,4}",
        "[\u{0627}-\u{064a} ]{1,6}",
        "[\u{1F600}-\u{1F640}]{1,3}",
        "[a-e][\u{0300}-\u{0310}]{1,2}",
        "[\u{0}!?. ]{1,3}",
        prop::sample::select(vec![
            "select", "order", "id", "user_id", "uuid_ts", "event", "Event", "EVENT"
        ])
        .prop_map(String::from),
        "[a-c]{60,90}",
    ];
    let leaf = prop_oneof![
        any::<i32>().prop_map(|_| json!(null)),
        "[a-z\u{4e00}-\u{4e10}\u{1F600}\u{0}]{0,8}".prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        (-1e9f64..1e9).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
    ];
    let props = prop::collection::vec((name.clone(), leaf, prop::option::of(name.clone())), 0..12);
    let event = (
        name.clone(),
        props,
        prop::collection::vec((name, "[a-z]{1,5}"), 0..4),
    );
    let mut runner = TestRunner::new(Config {
        cases: 32,
        failure_persistence: None,
        ..Config::default()
    });
    let cases = std::cell::Cell::new(0usize);
    let t = "2026-11-29T08:00:00Z";
    runner
        .run(&prop::collection::vec(event, 1..4), |events| {
            cases.set(cases.get() + 1);
            let case = cases.get();
            let mut walked = Vec::new();
            for (i, (event, props, ctx)) in events.into_iter().enumerate() {
                // Values made unique (a suffix, or an offset), so finding one is finding it.
                let mut p = serde_json::Map::new();
                for (j, (k, v, nested)) in props.into_iter().enumerate() {
                    let tag = format!("{case}.{i}.{j}");
                    let v = match v {
                        Value::String(s) => json!(format!("{s}#{tag}")),
                        Value::Number(n) if n.is_i64() => {
                            json!(n.as_i64().unwrap_or(0) / 4096 * 4096 + (case * 64 + j) as i64)
                        }
                        other => other,
                    };
                    match nested {
                        Some(inner) => {
                            p.insert(k, json!({ inner: v }));
                        }
                        None => {
                            p.insert(k, v);
                        }
                    }
                }
                let mut e = with(
                    base("track", &format!("g{case}-{i}"), t),
                    json!({"event": event, "properties": p}),
                );
                for (k, v) in ctx {
                    e["context"][k] = json!(format!("{v}#{case}.{i}"));
                }
                walked.push(e);
            }
            let batch: Vec<Event> = walked.iter().map(|e| ev(e.clone())).collect();
            let outcome = rt.block_on(s.deliver(&batch));
            prop_assert_eq!(outcome, Outcome::Delivered);
            let lost = rt.block_on(walk(&c, "w", &walked));
            prop_assert!(lost.is_empty(), "{:#?}", lost);
            Ok(())
        })
        .unwrap();
}

/// How fast event tables are created: `BALLAST_BENCH_TABLES` (2,000) distinct event names
/// in loads of 500 events, one table each; prints tables/s. `max_tables` is raised to let
/// all of them be made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_table_creation() {
    let pg = PgCluster::start();
    pg.create_db("wh").await;
    let url = pg.url("wh");
    let n: usize = std::env::var("BALLAST_BENCH_TABLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let s = sink_with(&url, "w", |c| c.max_tables = 100_000);
    let events: Vec<Event> = (0..n)
        .map(|i| {
            ev(with(
                base("track", &format!("t{i}"), "2026-11-29T08:00:00Z"),
                json!({"event": format!("Event {i}"), "properties": {"v": i}}),
            ))
        })
        .collect();
    let started = std::time::Instant::now();
    for chunk in events.chunks(500) {
        assert_eq!(s.deliver(chunk).await, Outcome::Delivered);
    }
    let took = started.elapsed();
    let c = admin(&url).await;
    let tables = count(
        &c,
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'w'",
    )
    .await;
    println!(
        "{n} event names: {tables} tables in {took:.2?}, {:.0} tables/s",
        n as f64 / took.as_secs_f64()
    );
}
