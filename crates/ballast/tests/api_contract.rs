//! The public HTTP API contract (docs/API.md), row by row, against the
//! real binary: endpoints, auth forms, gzip, CORS, exact error answers, enrichment,
//! graceful shutdown and group commit.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use common::{metric, Server, WRITE_KEY};
use reqwest::blocking::{Client, RequestBuilder};
use reqwest::header::{self, HeaderMap};
use serde_json::{json, Value};

/// What a call answered.
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("header is text").to_string())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

fn call(rb: RequestBuilder) -> Reply {
    let r = rb.send().expect("request failed");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.bytes().expect("read body").to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

/// Asserts the exact status and body text.
#[track_caller]
fn expect(reply: &Reply, status: u16, body: &str) {
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (status, body),
        "unexpected answer"
    );
}

/// POST with Basic auth (write key as user, empty password) and a raw body.
fn post(http: &Client, server: &Server, path: &str, body: impl Into<String>) -> Reply {
    call(
        http.post(server.url(path))
            .basic_auth(WRITE_KEY, Some(""))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.into()),
    )
}

/// POST without any Authorization header.
fn post_anon(http: &Client, server: &Server, path: &str, body: impl Into<String>) -> Reply {
    call(
        http.post(server.url(path))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.into()),
    )
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Every stored event as its raw JSON text, exactly as `ballast log dump` prints it.
fn dump_raw(server: &Server) -> Vec<String> {
    common::log_dump(&server.data_dir(), &[])
}

/// Stored events by messageId (each must have a string messageId, and ids are unique).
fn by_message_id(events: &[Value]) -> BTreeMap<String, Value> {
    let mut map = BTreeMap::new();
    for e in events {
        let id = e["messageId"]
            .as_str()
            .unwrap_or_else(|| panic!("stored event without a string messageId: {e}"))
            .to_string();
        assert!(
            map.insert(id.clone(), e.clone()).is_none(),
            "messageId {id} stored twice"
        );
    }
    map
}

/// Stored events by userId.
fn by_user_id(events: &[Value]) -> BTreeMap<String, Value> {
    events
        .iter()
        .filter_map(|e| e["userId"].as_str().map(|u| (u.to_string(), e.clone())))
        .collect()
}

#[track_caller]
fn assert_uuid_v4(id: &Value) {
    let s = id
        .as_str()
        .unwrap_or_else(|| panic!("messageId not a string: {id}"));
    let u = uuid::Uuid::parse_str(s).unwrap_or_else(|e| panic!("messageId {s:?}: {e}"));
    assert_eq!(u.get_version_num(), 4, "messageId {s} is not a v4 UUID");
    assert_eq!(
        s,
        u.hyphenated().to_string(),
        "messageId is not lowercase hyphenated"
    );
}

/// `receivedAt` is RFC 3339 UTC with exactly three fractional digits, within the window.
#[track_caller]
fn assert_received_at(v: &Value, before: SystemTime, after: SystemTime) {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("receivedAt not a string: {v}"));
    let b = s.as_bytes();
    assert_eq!(
        s.len(),
        24,
        "receivedAt {s:?} is not YYYY-MM-DDTHH:MM:SS.mmmZ"
    );
    assert_eq!(
        (b[4], b[7], b[10], b[13], b[16], b[19], b[23]),
        (b'-', b'-', b'T', b':', b':', b'.', b'Z'),
        "receivedAt {s:?}"
    );
    assert!(b[20..23].iter().all(u8::is_ascii_digit), "receivedAt {s:?}");
    let t = humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("receivedAt {s:?}: {e}"));
    // Millisecond precision: allow the truncation, plus clock slack.
    assert!(
        t + Duration::from_millis(1_000) >= before && t <= after + Duration::from_millis(1_000),
        "receivedAt {s} is not close to now"
    );
}

// ---------------------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------------------

#[test]
fn every_ingest_endpoint_answers_ok_and_stores_its_events() {
    let server = Server::start(&common::config(""));
    let http = common::client();

    // Single-event routes: the route sets `type`, overriding the body's.
    let kinds = ["track", "identify", "page", "screen", "group", "alias"];
    for kind in kinds {
        let wrong = if kind == "track" { "identify" } else { "track" };
        let body = json!({
            "userId": format!("u-{kind}"),
            "messageId": format!("m-{kind}"),
            "type": wrong,
            "event": "Clicked",
        });
        let r = post(&http, &server, &format!("/v1/{kind}"), body.to_string());
        expect(&r, 200, "OK");
    }

    // Batch routes: types from the events, untouched.
    for path in ["/v1/batch", "/v1/import", "/v1/b"] {
        let tag = path.trim_start_matches("/v1/");
        let body = json!({"batch": [
            {"type": "track", "event": "A", "userId": "u", "messageId": format!("m-{tag}-1")},
            {"type": "identify", "userId": "u", "messageId": format!("m-{tag}-2")},
            {"anonymousId": "a", "messageId": format!("m-{tag}-3")},
        ]});
        let r = post(&http, &server, path, body.to_string());
        expect(&r, 200, "OK");
    }

    // Beacon: text/plain body, key in the query.
    let body = json!({"batch": [
        {"type": "page", "anonymousId": "a", "messageId": "m-beacon-1"},
        {"type": "track", "event": "Left", "anonymousId": "a", "messageId": "m-beacon-2"},
    ]});
    let r = call(
        http.post(server.url(&format!("/beacon/v1/batch?writeKey={WRITE_KEY}")))
            .header(header::CONTENT_TYPE, "text/plain;charset=UTF-8")
            .body(body.to_string()),
    );
    expect(&r, 200, "OK");

    let raw = dump_raw(&server);
    let stored = by_message_id(&server.dump());
    assert_eq!(stored.len(), 6 + 3 * 3 + 2, "{stored:#?}");
    assert_eq!(raw.len(), stored.len());
    for kind in kinds {
        let e = &stored[&format!("m-{kind}")];
        assert_eq!(e["type"], kind, "{e}");
        assert_eq!(e["userId"], format!("u-{kind}"));
        assert_eq!(e["event"], "Clicked");
    }
    // Exactly one "type" key in each stored single event.
    for line in raw.iter().filter(|l| l.contains("\"m-alias\"")) {
        assert_eq!(line.matches("\"type\"").count(), 1, "{line}");
    }
    for tag in ["batch", "import", "b"] {
        assert_eq!(stored[&format!("m-{tag}-1")]["type"], "track");
        assert_eq!(stored[&format!("m-{tag}-1")]["event"], "A");
        assert_eq!(stored[&format!("m-{tag}-2")]["type"], "identify");
        let untyped = &stored[&format!("m-{tag}-3")];
        assert!(
            untyped.get("type").is_none(),
            "batch gave a type: {untyped}"
        );
        assert_eq!(untyped["anonymousId"], "a");
    }
    assert_eq!(stored["m-beacon-1"]["type"], "page");
    assert_eq!(stored["m-beacon-2"]["event"], "Left");
}

#[test]
fn unknown_single_event_route_is_not_found() {
    let server = Server::start(&common::config(""));
    let http = common::client();
    let r = post(&http, &server, "/v1/frobnicate", r#"{"userId":"u"}"#);
    assert_eq!(r.status, 404, "{}", r.text());
    let r = call(http.get(server.url("/pixel/v1/identify?writeKey=test-write-key&anonymousId=a")));
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(server.dump().is_empty());
}

#[test]
fn pixel_calls_answer_a_gif_and_store_nested_events() {
    let server = Server::start(&common::config(""));
    let http = common::client();

    let gif = |r: &Reply| {
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type").as_deref(), Some("image/gif"));
        assert!(r.body.starts_with(b"GIF89a"), "{:?}", r.body);
        assert_eq!(r.body.last(), Some(&0x3b), "GIF trailer");
    };

    let r = call(http.get(server.url(
        "/pixel/v1/track?writeKey=test-write-key&anonymousId=px-track&event=Signed%20Up\
         &context.page.path=%2Fpricing&properties.plan=pro",
    )));
    gif(&r);
    let before = SystemTime::now();
    let r = call(http.get(server.url(
        "/pixel/v1/page?writeKey=test-write-key&anonymousId=px-page&name=Home\
         &context.page.path=/home&context.page.title=H%C3%A9llo",
    )));
    let after = SystemTime::now();
    gif(&r);

    // Not stored, but still a GIF: no write key, unknown key, disabled source, track
    // without an event name.
    for q in [
        "/pixel/v1/page?anonymousId=no-key&context.page.path=/nokey",
        "/pixel/v1/track?anonymousId=no-key&event=E",
        "/pixel/v1/track?writeKey=&anonymousId=no-key&event=E",
        "/pixel/v1/track?writeKey=nope&anonymousId=no-key&event=E",
        "/pixel/v1/page?writeKey=disabled-key&anonymousId=no-key",
        "/pixel/v1/track?writeKey=test-write-key&anonymousId=no-key",
    ] {
        let r = call(http.get(server.url(q)));
        gif(&r);
    }

    let stored = server.dump();
    assert_eq!(stored.len(), 2, "{stored:#?}");
    let anon: BTreeMap<String, Value> = stored
        .iter()
        .map(|e| (e["anonymousId"].as_str().unwrap().to_string(), e.clone()))
        .collect();
    let t = &anon["px-track"];
    assert_eq!(t["type"], "track");
    assert_eq!(t["event"], "Signed Up");
    assert_eq!(t["context"]["page"]["path"], "/pricing");
    assert_eq!(t["properties"]["plan"], "pro");
    assert!(t.get("writeKey").is_none(), "write key stored: {t}");
    assert!(
        t.get("context.page.path").is_none(),
        "dotted key kept flat: {t}"
    );
    assert_uuid_v4(&t["messageId"]);
    assert_eq!(t["request_ip"], "127.0.0.1");

    let p = &anon["px-page"];
    assert_eq!(p["type"], "page");
    assert_eq!(p["name"], "Home");
    assert_eq!(p["context"]["page"]["path"], "/home");
    assert_eq!(p["context"]["page"]["title"], "Héllo");
    assert_uuid_v4(&p["messageId"]);
    assert_received_at(&p["receivedAt"], before, after);
}

#[test]
fn source_config_answers_for_basic_auth_or_query_key() {
    let server = Server::start(&common::config(""));
    let http = common::client();

    let check = |r: &Reply| {
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            r.header("content-type")
                .unwrap_or_default()
                .starts_with("application/json"),
            "{:?}",
            r.header("content-type")
        );
        let v = r.json();
        let s = &v["source"];
        assert_eq!(s["id"], "web", "{v}");
        assert_eq!(s["config"], json!({}), "{v}");
        assert_eq!(s["enabled"], true, "{v}");
        assert_eq!(s["destinations"], json!([]), "{v}");
        assert_eq!(s["writeKey"], WRITE_KEY, "{v}");
    };
    for path in ["/sourceConfig", "/sourceConfig/"] {
        check(&call(
            http.get(server.url(path)).basic_auth(WRITE_KEY, Some("")),
        ));
        check(&call(
            http.get(server.url(&format!("{path}?writeKey={WRITE_KEY}"))),
        ));
        // What the JS SDK sends: query parameters and Basic auth together.
        check(&call(
            http.get(server.url(&format!("{path}?p=npm&v=3.0.0&writeKey={WRITE_KEY}")))
                .basic_auth(WRITE_KEY, Some("")),
        ));
    }

    let no_key = "failed to read writekey from header";
    expect(&call(http.get(server.url("/sourceConfig/"))), 401, no_key);
    expect(&call(http.get(server.url("/sourceConfig"))), 401, no_key);
    expect(
        &call(http.get(server.url("/sourceConfig/?writeKey="))),
        401,
        no_key,
    );
    expect(
        &call(
            http.get(server.url("/sourceConfig/"))
                .basic_auth("nope", Some("")),
        ),
        401,
        "invalid write key",
    );
    expect(
        &call(http.get(server.url("/sourceConfig?writeKey=nope"))),
        401,
        "invalid write key",
    );
    expect(
        &call(
            http.get(server.url("/sourceConfig/"))
                .basic_auth("disabled-key", Some("")),
        ),
        404,
        "source is disabled",
    );
}

#[test]
fn health_livez_readyz_and_version_answer() {
    let server = Server::start(&common::config(""));
    let http = common::client();

    let r = call(http.get(server.url("/health")));
    assert_eq!(r.status, 200);
    let h = r.json();
    assert_eq!(h["server"], "UP", "{h}");
    assert_eq!(h["db"], "UP", "{h}");
    assert_eq!(h["acceptingEvents"], "TRUE", "{h}");
    assert_eq!(h["mode"], "NORMAL", "{h}");
    let routing = h["routingEvents"].as_str().unwrap_or_default();
    assert!(routing == "TRUE" || routing == "FALSE", "{h}");

    let r = call(http.get(server.url("/livez")));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call(http.get(server.url("/readyz")));
    assert_eq!(r.status, 200, "{}", r.text());

    let r = call(http.get(server.url("/version")));
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"), "{v}");
}

// ---------------------------------------------------------------------------------------
// Auth, gzip, CORS
// ---------------------------------------------------------------------------------------

#[test]
fn every_write_key_form_is_accepted() {
    let server = Server::start(&common::config(""));
    let http = common::client();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);

    // Basic auth, empty password.
    let r = call(
        http.post(server.url("/v1/track"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&json!({"userId": "u", "messageId": "basic-empty", "event": "E"})),
    );
    expect(&r, 200, "OK");
    // Basic auth with a password.
    let r = call(
        http.post(server.url("/v1/track"))
            .basic_auth(WRITE_KEY, Some("whatever"))
            .json(&json!({"userId": "u", "messageId": "basic-password", "event": "E"})),
    );
    expect(&r, 200, "OK");
    // Basic auth, user name without a colon, lower-case scheme.
    let r = call(
        http.post(server.url("/v1/identify"))
            .header(header::AUTHORIZATION, format!("basic {}", b64(WRITE_KEY)))
            .json(&json!({"userId": "u", "messageId": "basic-no-colon"})),
    );
    expect(&r, 200, "OK");
    // Segment's Python library: batch body with the key, no Authorization header.
    let r = post_anon(
        &http,
        &server,
        "/v1/batch",
        json!({
            "batch": [
                {"type": "track", "event": "E", "userId": "u", "messageId": "body-batch-1"},
                {"type": "identify", "userId": "u", "messageId": "body-batch-2"},
            ],
            "sentAt": "2024-01-01T00:00:00.000Z",
            "writeKey": WRITE_KEY,
        })
        .to_string(),
    );
    expect(&r, 200, "OK");
    // A single event carrying the key.
    let r = post_anon(
        &http,
        &server,
        "/v1/track",
        json!({"userId": "u", "messageId": "body-single", "event": "E", "writeKey": WRITE_KEY})
            .to_string(),
    );
    expect(&r, 200, "OK");
    // Beacon: key in the query.
    let r = call(
        http.post(server.url(&format!("/beacon/v1/batch?writeKey={WRITE_KEY}")))
            .header(header::CONTENT_TYPE, "text/plain")
            .body(
                json!({"batch": [{"anonymousId": "a", "messageId": "beacon-query"}]}).to_string(),
            ),
    );
    expect(&r, 200, "OK");
    // Pixel: key in the query.
    let r = call(http.get(server.url(&format!(
        "/pixel/v1/track?writeKey={WRITE_KEY}&anonymousId=a&event=E&messageId=pixel-query"
    ))));
    assert_eq!(r.status, 200);

    let stored = by_message_id(&server.dump());
    let ids: BTreeSet<&str> = stored.keys().map(String::as_str).collect();
    assert_eq!(
        ids,
        BTreeSet::from([
            "basic-empty",
            "basic-password",
            "basic-no-colon",
            "body-batch-1",
            "body-batch-2",
            "body-single",
            "beacon-query",
            "pixel-query",
        ])
    );
}

#[test]
fn gzip_bodies_are_decoded() {
    let server = Server::start(&common::config(""));
    let http = common::client();

    let batch = json!({"batch": [
        {"type": "track", "event": "Zipped", "userId": "u", "messageId": "gz-batch-1",
         "properties": {"text": "é日本🚀"}},
        {"type": "identify", "userId": "u", "messageId": "gz-batch-2"},
    ]});
    let r = call(
        http.post(server.url("/v1/batch"))
            .basic_auth(WRITE_KEY, Some(""))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_ENCODING, "gzip")
            .body(gzip(batch.to_string().as_bytes())),
    );
    expect(&r, 200, "OK");

    let track = json!({"userId": "u", "messageId": "gz-track", "event": "Zipped"});
    let r = call(
        http.post(server.url("/v1/track"))
            .basic_auth(WRITE_KEY, Some(""))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_ENCODING, "gzip")
            .body(gzip(track.to_string().as_bytes())),
    );
    expect(&r, 200, "OK");

    // The Python SDK with gzip: key in the (compressed) body.
    let python = json!({
        "batch": [{"type": "track", "event": "E", "userId": "u", "messageId": "gz-python"}],
        "writeKey": WRITE_KEY,
    });
    let r = call(
        http.post(server.url("/v1/batch"))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_ENCODING, "gzip")
            .body(gzip(python.to_string().as_bytes())),
    );
    expect(&r, 200, "OK");

    // A body that says gzip but is not.
    let r = call(
        http.post(server.url("/v1/batch"))
            .basic_auth(WRITE_KEY, Some(""))
            .header(header::CONTENT_ENCODING, "gzip")
            .body(batch.to_string()),
    );
    expect(&r, 400, "invalid gzip body");

    let stored = by_message_id(&server.dump());
    assert_eq!(stored.len(), 4, "{stored:#?}");
    assert_eq!(stored["gz-batch-1"]["properties"]["text"], "é日本🚀");
    assert_eq!(stored["gz-batch-2"]["type"], "identify");
    assert_eq!(stored["gz-track"]["type"], "track");
    assert_eq!(stored["gz-track"]["event"], "Zipped");
    assert_eq!(stored["gz-python"]["event"], "E");
}

#[test]
fn cors_preflight_allows_the_sdk_headers_and_posts_get_the_origin() {
    let server = Server::start(&common::config(""));
    let http = common::client();
    let wanted = [
        "authorization",
        "content-type",
        "anonymousid",
        "sentat",
        "rsa-retry-attempt",
        "rsa-since-last-attempt",
        "rsa-since-first-attempt",
        "rsa-retry-reason",
        "rsa-recovered",
    ];
    for path in ["/v1/batch", "/v1/track", "/beacon/v1/batch"] {
        let r = call(
            http.request(reqwest::Method::OPTIONS, server.url(path))
                .header(header::ORIGIN, "http://example.com")
                .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
                .header(header::ACCESS_CONTROL_REQUEST_HEADERS, wanted.join(",")),
        );
        assert!(
            (200..300).contains(&r.status),
            "preflight {path}: {} {}",
            r.status,
            r.text()
        );
        let origin = r.header("access-control-allow-origin");
        assert!(
            origin.as_deref() == Some("http://example.com") || origin.as_deref() == Some("*"),
            "{path}: allow-origin {origin:?}"
        );
        let allowed: BTreeSet<String> = r
            .header("access-control-allow-headers")
            .unwrap_or_default()
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .collect();
        for h in wanted {
            assert!(
                allowed.contains(h) || allowed.contains("*"),
                "{path}: {h} not allowed by {allowed:?}"
            );
        }
        let methods: BTreeSet<String> = r
            .header("access-control-allow-methods")
            .unwrap_or_default()
            .split(',')
            .map(|m| m.trim().to_ascii_uppercase())
            .collect();
        assert!(
            methods.contains("POST") || methods.contains("*"),
            "{path}: methods {methods:?}"
        );
    }

    let r = call(
        http.post(server.url("/v1/track"))
            .basic_auth(WRITE_KEY, Some(""))
            .header(header::ORIGIN, "http://example.com")
            .json(&json!({"userId": "u", "messageId": "cors-post"})),
    );
    expect(&r, 200, "OK");
    let origin = r.header("access-control-allow-origin");
    assert!(
        origin.as_deref() == Some("http://example.com") || origin.as_deref() == Some("*"),
        "allow-origin {origin:?}"
    );
    assert_eq!(server.dump().len(), 1);
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// How an error row's request carries its write key.
#[derive(Debug, Clone, Copy)]
enum Auth {
    /// Basic auth with the source's key, JSON content type.
    Key,
    /// Basic auth with this key, no content type.
    Basic(&'static str),
    /// No Authorization header, JSON content type (a key, if any, is in the body).
    Anonymous,
    /// A beacon call: text/plain, no Authorization header (a key, if any, in the query).
    Beacon,
}

/// The documented error answers (docs/API.md, "Errors"): each row is one request and the
/// exact status and body it gets.
const NO_KEY: &str = "failed to read writekey from header";
const INVALID_KEY: &str = "invalid write key";
const DISABLED: &str = "source is disabled";
const INVALID_JSON: &str = "invalid json";
const NOT_AN_EVENT: &str = "event is not a valid rudder event";
const EMPTY_BATCH: &str = "empty batch payload";
const NO_ID: &str = "request neither has anonymousId nor userId";

const OK_EVENT: &str = r#"{"userId":"u","event":"E"}"#;
const OK_BATCH: &str = r#"{"batch":[{"userId":"u","event":"E"}]}"#;

#[rustfmt::skip]
const ERROR_ROWS: &[(Auth, &str, &str, u16, &str)] = &[
    // No write key.
    (Auth::Anonymous, "/v1/track", OK_EVENT, 401, NO_KEY),
    (Auth::Anonymous, "/v1/batch", OK_BATCH, 401, NO_KEY),
    (Auth::Anonymous, "/v1/track", "{not json", 401, NO_KEY),
    (Auth::Beacon, "/beacon/v1/batch", OK_BATCH, 401, NO_KEY),
    (Auth::Beacon, "/beacon/v1/batch?writeKey=", OK_BATCH, 401, NO_KEY),
    // Unknown write key. A key in the header is judged before the body: wrong key,
    // broken body → 401.
    (Auth::Basic("no-such-key"), "/v1/track", OK_EVENT, 401, INVALID_KEY),
    (Auth::Basic("no-such-key"), "/v1/track", "{not json", 401, INVALID_KEY),
    (Auth::Basic("no-such-key"), "/v1/batch", OK_BATCH, 401, INVALID_KEY),
    (Auth::Basic("no-such-key"), "/v1/batch", "{not json", 401, INVALID_KEY),
    (Auth::Anonymous, "/v1/batch", r#"{"batch":[{"userId":"u"}],"writeKey":"no-such-key"}"#, 401, INVALID_KEY),
    (Auth::Anonymous, "/v1/track", r#"{"userId":"u","writeKey":"no-such-key"}"#, 401, INVALID_KEY),
    (Auth::Beacon, "/beacon/v1/batch?writeKey=no-such-key", OK_BATCH, 401, INVALID_KEY),
    // Disabled source.
    (Auth::Basic("disabled-key"), "/v1/track", OK_EVENT, 404, DISABLED),
    (Auth::Anonymous, "/v1/batch", r#"{"batch":[{"userId":"u"}],"writeKey":"disabled-key"}"#, 404, DISABLED),
    (Auth::Beacon, "/beacon/v1/batch?writeKey=disabled-key", OK_BATCH, 404, DISABLED),
    // Malformed JSON.
    (Auth::Key, "/v1/track", r#"{"userId":"u""#, 400, INVALID_JSON),
    (Auth::Key, "/v1/track", r#"{"userId":"u"} trailing"#, 400, INVALID_JSON),
    (Auth::Key, "/v1/track", "", 400, INVALID_JSON),
    (Auth::Key, "/v1/identify", "not json", 400, INVALID_JSON),
    (Auth::Key, "/v1/batch", r#"{"batch":[{"userId":"u"}"#, 400, INVALID_JSON),
    (Auth::Key, "/v1/batch", "not json", 400, INVALID_JSON),
    (Auth::Key, "/v1/batch", "", 400, INVALID_JSON),
    (Auth::Key, "/v1/import", r#"{"batch":"nope"}"#, 400, INVALID_JSON),
    (Auth::Key, "/v1/b", "{", 400, INVALID_JSON),
    // A batch element that is not an object.
    (Auth::Key, "/v1/batch", r#"{"batch":[{"userId":"u"},42]}"#, 400, NOT_AN_EVENT),
    (Auth::Key, "/v1/batch", r#"{"batch":["event"]}"#, 400, NOT_AN_EVENT),
    (Auth::Key, "/v1/batch", r#"{"batch":[null]}"#, 400, NOT_AN_EVENT),
    (Auth::Key, "/v1/batch", r#"{"batch":[[{"userId":"u"}]]}"#, 400, NOT_AN_EVENT),
    // Empty or missing batch (`test-write-key` is `common::WRITE_KEY`).
    (Auth::Key, "/v1/batch", r#"{"batch":[]}"#, 400, EMPTY_BATCH),
    (Auth::Key, "/v1/batch", "{}", 400, EMPTY_BATCH),
    (Auth::Key, "/v1/batch", r#"{"batch":null}"#, 400, EMPTY_BATCH),
    (Auth::Key, "/v1/batch", r#"{"sentAt":"x"}"#, 400, EMPTY_BATCH),
    (Auth::Anonymous, "/v1/batch", r#"{"batch":[],"writeKey":"test-write-key"}"#, 400, EMPTY_BATCH),
    // Neither userId nor anonymousId.
    (Auth::Key, "/v1/track", r#"{"event":"E"}"#, 400, NO_ID),
    (Auth::Key, "/v1/identify", r#"{"userId":"","anonymousId":null}"#, 400, NO_ID),
    (Auth::Key, "/v1/track", r#"{"userId":"   ","event":"E"}"#, 400, NO_ID),
    (Auth::Key, "/v1/page", r#"{"userId":null,"anonymousId":"  "}"#, 400, NO_ID),
    (Auth::Key, "/v1/batch", r#"{"batch":[{"event":"E"}]}"#, 400, NO_ID),
    (Auth::Key, "/v1/batch", r#"{"batch":[{"userId":"u"},{"anonymousId":""}]}"#, 400, NO_ID),
];

#[test]
fn every_error_row_has_its_exact_status_and_body_and_stores_nothing() {
    assert_eq!(WRITE_KEY, "test-write-key", "the rows name the key");
    let server = Server::start(&common::config(""));
    let http = common::client();
    for &(auth, path, body, status, answer) in ERROR_ROWS {
        let rb = http.post(server.url(path));
        let rb = match auth {
            Auth::Key => rb
                .basic_auth(WRITE_KEY, Some(""))
                .header(header::CONTENT_TYPE, "application/json"),
            Auth::Basic(key) => rb.basic_auth(key, Some("")),
            Auth::Anonymous => rb.header(header::CONTENT_TYPE, "application/json"),
            Auth::Beacon => rb.header(header::CONTENT_TYPE, "text/plain"),
        };
        let r = call(rb.body(body));
        assert_eq!(
            (r.status, r.text().as_str()),
            (status, answer),
            "{auth:?} {path} {body:?}"
        );
    }

    assert_eq!(server.dump(), Vec::<Value>::new(), "an error stored events");

    // The server still works after all that.
    expect(&post(&http, &server, "/v1/track", OK_EVENT), 200, "OK");
    assert_eq!(server.dump().len(), 1);
}

#[test]
fn a_batch_with_one_bad_event_stores_none_of_them() {
    let server = Server::start(&common::config(""));
    let http = common::client();
    let r = post(
        &http,
        &server,
        "/v1/batch",
        json!({"batch": [
            {"userId": "u1", "messageId": "bad-1"},
            {"anonymousId": "a2", "messageId": "bad-2"},
            {"event": "no identity", "messageId": "bad-3"},
        ]})
        .to_string(),
    );
    expect(&r, 400, "request neither has anonymousId nor userId");
    let r = post(
        &http,
        &server,
        "/v1/batch",
        r#"{"batch":[{"userId":"u1","messageId":"bad-4"},{"userId":"u2","messageId":"bad-5"},"x"]}"#,
    );
    expect(&r, 400, "event is not a valid rudder event");
    assert_eq!(server.dump(), Vec::<Value>::new());

    let r = post(
        &http,
        &server,
        "/v1/batch",
        json!({"batch": [
            {"userId": "u1", "messageId": "good-1"},
            {"anonymousId": "a2", "messageId": "good-2"},
            {"userId": "u3", "messageId": "good-3"},
        ]})
        .to_string(),
    );
    expect(&r, 200, "OK");
    let ids: Vec<String> = server
        .dump()
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["good-1", "good-2", "good-3"]);
}

#[test]
fn bodies_over_the_limit_get_413_plain_or_gzip() {
    let server = Server::start_in(
        Arc::new(tempfile::tempdir().unwrap()),
        &common::config(""),
        &[("BALLAST_SERVER__MAX_REQUEST_BYTES", "2000")],
    );
    // No connection reuse: after a 413 whose body was not read to the end, the server may
    // close the connection (without `Connection: close`), and a pooled connection would
    // then fail the next request with a transport error.
    let http = Client::builder()
        .timeout(Duration::from_secs(30))
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let too_large = "request size exceeds max limit";

    // A track body of exactly `len` bytes.
    let body_of = |id: &str, len: usize| {
        let head = format!(r#"{{"userId":"u","messageId":"{id}","pad":""#);
        let tail = "\"}";
        let pad = len - head.len() - tail.len();
        let s = format!("{head}{}{tail}", "x".repeat(pad));
        assert_eq!(s.len(), len);
        s
    };

    // At the limit: accepted; one byte over: refused.
    expect(
        &post(&http, &server, "/v1/track", body_of("at-limit", 2000)),
        200,
        "OK",
    );
    expect(
        &post(&http, &server, "/v1/track", body_of("over-limit", 2001)),
        413,
        too_large,
    );
    expect(
        &post(&http, &server, "/v1/track", body_of("far-over", 5000)),
        413,
        too_large,
    );

    // Without a Content-Length (chunked): refused too.
    let r = call(
        http.post(server.url("/v1/track"))
            .basic_auth(WRITE_KEY, Some(""))
            .body(reqwest::blocking::Body::new(std::io::Cursor::new(
                body_of("chunked-over", 2500).into_bytes(),
            ))),
    );
    expect(&r, 413, too_large);

    // Gzip: small on the wire, over the limit once decompressed.
    let big = body_of("gz-over", 50_000);
    let zipped = gzip(big.as_bytes());
    assert!(zipped.len() < 2000, "{} bytes compressed", zipped.len());
    let r = call(
        http.post(server.url("/v1/track"))
            .basic_auth(WRITE_KEY, Some(""))
            .header(header::CONTENT_ENCODING, "gzip")
            .body(zipped),
    );
    expect(&r, 413, too_large);
    let r = call(
        http.post(server.url("/v1/track"))
            .basic_auth(WRITE_KEY, Some(""))
            .header(header::CONTENT_ENCODING, "gzip")
            .body(gzip(body_of("gz-over-by-one", 2001).as_bytes())),
    );
    expect(&r, 413, too_large);
    let batch = format!(
        r#"{{"batch":[{}],"writeKey":"{WRITE_KEY}"}}"#,
        body_of("gz-batch-over", 3000)
    );
    let r = call(
        http.post(server.url("/v1/batch"))
            .header(header::CONTENT_ENCODING, "gzip")
            .body(gzip(batch.as_bytes())),
    );
    expect(&r, 413, too_large);
    // Gzip at exactly the limit once decompressed: accepted.
    let r = call(
        http.post(server.url("/v1/track"))
            .basic_auth(WRITE_KEY, Some(""))
            .header(header::CONTENT_ENCODING, "gzip")
            .body(gzip(body_of("gz-at-limit", 2000).as_bytes())),
    );
    expect(&r, 200, "OK");

    let ids: BTreeSet<String> = by_message_id(&server.dump()).into_keys().collect();
    assert_eq!(
        ids,
        BTreeSet::from(["at-limit".to_string(), "gz-at-limit".to_string()])
    );
}

#[test]
fn a_rate_limited_source_gets_429_with_retry_after() {
    let server = Server::start(&common::config(
        "[[sources]]\nid = \"limited\"\nwrite_key = \"limited-key\"\n\
         rate_limit = { requests_per_second = 0.001, burst = 2 }\n",
    ));
    let http = common::client();
    let send = |id: &str| {
        call(
            http.post(server.url("/v1/track"))
                .basic_auth("limited-key", Some(""))
                .json(&json!({"userId": "u", "messageId": id})),
        )
    };
    expect(&send("lim-1"), 200, "OK");
    expect(&send("lim-2"), 200, "OK");
    let r = send("lim-3");
    expect(&r, 429, "max requests limit reached");
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After header")
        .trim()
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry >= 1, "Retry-After {retry}");
    let r = call(
        http.post(server.url("/v1/batch"))
            .basic_auth("limited-key", Some(""))
            .json(&json!({"batch": [{"userId": "u", "messageId": "lim-4"}]})),
    );
    expect(&r, 429, "max requests limit reached");
    assert!(r.header("retry-after").is_some());

    // Other sources are not limited.
    expect(
        &post(
            &http,
            &server,
            "/v1/track",
            r#"{"userId":"u","messageId":"web-1"}"#,
        ),
        200,
        "OK",
    );

    let ids: BTreeSet<String> = by_message_id(&server.dump()).into_keys().collect();
    assert_eq!(
        ids,
        BTreeSet::from(["lim-1", "lim-2", "web-1"].map(String::from))
    );
}

#[test]
fn a_full_store_answers_503_and_acknowledges_nothing_more() {
    let server = Server::start_in(
        Arc::new(tempfile::tempdir().unwrap()),
        &common::config(""),
        &[("BALLAST_STORAGE__MAX_BYTES", "6000")],
    );
    let http = common::client();
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..100 {
        let id = format!("q-{i}");
        let r = post(
            &http,
            &server,
            "/v1/track",
            json!({"userId": "u", "messageId": id, "pad": "p".repeat(300)}).to_string(),
        );
        match r.status {
            200 => {
                assert_eq!(r.text(), "OK");
                acked.push(id);
            }
            503 => {
                refused = Some((id, r.text()));
                break;
            }
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    let (refused_id, reason) = refused.expect("the quota never refused");
    assert_eq!(reason, "storage quota exceeded");
    assert!(!acked.is_empty());
    let stored: Vec<String> = server
        .dump()
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(stored, acked);
    assert!(!stored.contains(&refused_id));
}

// ---------------------------------------------------------------------------------------
// Enrichment
// ---------------------------------------------------------------------------------------

/// The stored event minus the fields enrichment sets.
fn without(v: &Value, keys: &[&str]) -> Value {
    let mut m = v.as_object().expect("object").clone();
    for k in keys {
        m.remove(*k);
    }
    Value::Object(m)
}

#[test]
fn enrichment_adds_its_fields_and_changes_nothing_else() {
    let server = Server::start(&common::config(""));
    let http = common::client();

    // A rich event, as raw text: odd spacing, escapes, unicode, nesting, big numbers.
    let props = r#"{ "spaced" : [ 1 , 2.50 , -0 , 1e3 ] , "t" : "\u00e9\/\"q\"" }"#;
    let rich = format!(
        r#"{{"userId":"user-ü","messageId":"keep-me","event":"Order \"Completed\" 🚀","properties":{props},"context":{{"traits":{{"email":"a@b.c","tags":["x","y",null,true,false,{{}},[]]}},"locale":"日本語","library":{{"name":"rudder","version":"1.0"}}}},"a\"b":"back\\slash\nnew\ttab\u0001","ключ":{{"deep":{{"deeper":{{"deepest":[[[1]]]}}}}}},"big":18446744073709551615,"neg":-9223372036854775808,"float":0.1,"nothing":null,"timestamp":"2024-05-06T07:08:09.123Z","sentAt":"2024-05-06T07:08:10Z","integrations":{{"All":true}},"receivedAt":"1999-01-01T00:00:00.000Z","request_ip":"6.6.6.6"}}"#
    );
    let sent: Value = serde_json::from_str(&rich).expect("test event is JSON");
    let before = SystemTime::now();
    expect(&post(&http, &server, "/v1/track", rich.clone()), 200, "OK");
    let after = SystemTime::now();

    // messageId: kept when present, a fresh v4 UUID when missing or blank.
    let blanks = json!({"batch": [
        {"userId": "mid-missing", "type": "track"},
        {"userId": "mid-empty", "messageId": ""},
        {"userId": "mid-spaces", "messageId": "  "},
        {"userId": "mid-null", "messageId": null},
        {"userId": "mid-kept", "messageId": "m-kept"},
    ]});
    expect(
        &post(&http, &server, "/v1/batch", blanks.to_string()),
        200,
        "OK",
    );

    // request_ip: the first X-Forwarded-For entry when sent.
    let r = call(
        http.post(server.url("/v1/identify"))
            .basic_auth(WRITE_KEY, Some(""))
            .header("X-Forwarded-For", "203.0.113.9, 10.0.0.1")
            .body(r#"{"userId":"xff","messageId":"xff"}"#),
    );
    expect(&r, 200, "OK");

    // AnonymousId header: only a fallback.
    let with_anon_header = |path: &str, body: &str| {
        call(
            http.post(server.url(path))
                .basic_auth(WRITE_KEY, Some(""))
                .header("AnonymousId", "from-header")
                .body(body.to_string()),
        )
    };
    expect(
        &with_anon_header("/v1/track", r#"{"event":"E","messageId":"hdr-only"}"#),
        200,
        "OK",
    );
    expect(
        &with_anon_header(
            "/v1/track",
            r#"{"anonymousId":"from-body","messageId":"hdr-body-wins"}"#,
        ),
        200,
        "OK",
    );
    expect(
        &with_anon_header(
            "/v1/track",
            r#"{"userId":"u","anonymousId":"","messageId":"hdr-blank-body"}"#,
        ),
        200,
        "OK",
    );
    expect(
        &with_anon_header("/v1/page", r#"{"userId":"u","messageId":"hdr-user-only"}"#),
        200,
        "OK",
    );
    expect(
        &with_anon_header(
            "/v1/batch",
            r#"{"batch":[{"messageId":"hdr-batch-1"},{"anonymousId":"own","messageId":"hdr-batch-2"}]}"#,
        ),
        200,
        "OK",
    );

    let raw = dump_raw(&server);
    let events = server.dump();
    assert_eq!(events.len(), 1 + 5 + 1 + 6);
    let stored = by_message_id(&events);

    // The rich event: only the enrichment fields differ.
    let e = &stored["keep-me"];
    assert_eq!(e["type"], "track");
    assert_eq!(e["request_ip"], "127.0.0.1", "client-sent request_ip kept");
    assert_received_at(&e["receivedAt"], before, after);
    assert_eq!(
        without(e, &["type", "receivedAt", "request_ip"]),
        without(&sent, &["receivedAt", "request_ip"]),
    );
    let line = raw
        .iter()
        .find(|l| l.contains("\"keep-me\""))
        .expect("raw rich event");
    assert!(
        line.contains(&format!("\"properties\":{props}")),
        "raw value text changed:\n{line}"
    );
    for key in ["messageId", "receivedAt", "request_ip", "type"] {
        assert_eq!(
            line.matches(&format!("\"{key}\":")).count(),
            1,
            "{key} not exactly once in {line}"
        );
    }

    // messageIds.
    let users = by_user_id(&events);
    let mut fresh = BTreeSet::new();
    for u in ["mid-missing", "mid-empty", "mid-spaces", "mid-null"] {
        let e = &users[u];
        assert_uuid_v4(&e["messageId"]);
        assert!(fresh.insert(e["messageId"].as_str().unwrap().to_string()));
        assert_eq!(
            raw.iter()
                .filter(|l| l.contains(&format!("\"{u}\"")))
                .map(|l| l.matches("\"messageId\":").count())
                .collect::<Vec<_>>(),
            [1],
            "{u}"
        );
    }
    assert_eq!(users["mid-kept"]["messageId"], "m-kept");
    // Batch events keep their own type (or none).
    assert_eq!(users["mid-missing"]["type"], "track");
    assert!(users["mid-empty"].get("type").is_none());
    for u in [
        "mid-missing",
        "mid-empty",
        "mid-spaces",
        "mid-null",
        "mid-kept",
    ] {
        assert_eq!(users[u]["request_ip"], "127.0.0.1");
        assert_received_at(&users[u]["receivedAt"], before, SystemTime::now());
    }
    assert_eq!(
        without(&users["mid-kept"], &["receivedAt", "request_ip"]),
        json!({"userId": "mid-kept", "messageId": "m-kept"})
    );

    // request_ip from X-Forwarded-For, and the identify type.
    assert_eq!(stored["xff"]["request_ip"], "203.0.113.9");
    assert_eq!(stored["xff"]["type"], "identify");

    // AnonymousId header.
    assert_eq!(stored["hdr-only"]["anonymousId"], "from-header");
    assert_eq!(stored["hdr-body-wins"]["anonymousId"], "from-body");
    assert_eq!(stored["hdr-blank-body"]["anonymousId"], "from-header");
    assert_eq!(stored["hdr-user-only"]["anonymousId"], "from-header");
    assert_eq!(stored["hdr-user-only"]["userId"], "u");
    assert_eq!(stored["hdr-user-only"]["type"], "page");
    assert_eq!(stored["hdr-batch-1"]["anonymousId"], "from-header");
    assert_eq!(stored["hdr-batch-2"]["anonymousId"], "own");
    for id in ["hdr-only", "hdr-blank-body", "hdr-batch-1"] {
        let line = raw
            .iter()
            .find(|l| l.contains(&format!("\"{id}\"")))
            .unwrap();
        assert_eq!(line.matches("\"anonymousId\":").count(), 1, "{line}");
    }
    assert_eq!(
        without(&stored["hdr-only"], &["receivedAt", "request_ip"]),
        json!({"event": "E", "messageId": "hdr-only", "anonymousId": "from-header", "type": "track"})
    );
}

// ---------------------------------------------------------------------------------------
// Durability
// ---------------------------------------------------------------------------------------

#[test]
fn sigterm_exits_zero_and_keeps_everything_acknowledged() {
    let mut server = Server::start(&common::config(""));
    let http = common::client();
    let url = server.url("/v1/track");

    let mut acked = Vec::new();
    for i in 0..20 {
        let id = format!("before-{i}");
        let r = post(
            &http,
            &server,
            "/v1/track",
            json!({"userId": "u", "messageId": id}).to_string(),
        );
        expect(&r, 200, "OK");
        acked.push(id);
    }

    // Keep sending from a few threads while SIGTERM arrives.
    let during = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let (url, during, stop, http) =
                (url.clone(), during.clone(), stop.clone(), http.clone());
            std::thread::spawn(move || {
                for i in 0..500 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let id = format!("during-{t}-{i}");
                    let r = http
                        .post(&url)
                        .basic_auth(WRITE_KEY, Some(""))
                        .json(&json!({"userId": format!("u{t}"), "messageId": id}))
                        .send();
                    match r {
                        Ok(r) if r.status() == 200 => {
                            assert_eq!(r.text().unwrap(), "OK");
                            during.lock().unwrap().push(id);
                        }
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let text = r.text().unwrap_or_default();
                            assert_eq!(
                                (status, text.as_str()),
                                (503, "server is shutting down"),
                                "non-200 answer during shutdown"
                            );
                            break;
                        }
                        Err(_) => break, // connection refused or closed: not acknowledged
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let status = server.terminate();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in senders {
        s.join().expect("sender thread");
    }
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        server.stderr()
    );
    assert_eq!(status.code(), Some(0));

    let during = during.lock().unwrap().clone();
    eprintln!(
        "acknowledged: {} before, {} during shutdown",
        acked.len(),
        during.len()
    );
    let stored = by_message_id(&server.dump());
    for id in acked.iter().chain(&during) {
        assert!(stored.contains_key(id), "acknowledged {id} lost");
    }
    assert!(stored.len() >= acked.len() + during.len());
}

#[test]
fn concurrent_requests_share_fsyncs() {
    let server = Server::start(&common::config(""));
    let http = common::client();
    let url = server.url("/v1/track");
    const THREADS: usize = 32;
    const REQUESTS: usize = 400;

    let ok = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (http, url, ok) = (&http, &url, &ok);
            s.spawn(move || {
                for i in (t..REQUESTS).step_by(THREADS) {
                    let r =
                        call(http.post(url).basic_auth(WRITE_KEY, Some("")).json(
                            &json!({"userId": format!("u{t}"), "messageId": format!("gc-{i}")}),
                        ));
                    if r.status == 200 && r.body == b"OK" {
                        ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let ok = ok.into_inner();
    assert_eq!(ok, REQUESTS, "not every request succeeded");

    let fsyncs = metric(&server, "ballast_log_fsyncs_total").expect("ballast_log_fsyncs_total");
    eprintln!("{ok} requests, {fsyncs} fsyncs");
    assert!(fsyncs >= 1.0, "no fsync counted");
    assert!(
        fsyncs < ok as f64,
        "{fsyncs} fsyncs for {ok} requests: no group commit"
    );
    // Latency histograms: one sample per fsync and per request.
    assert!(
        metric(&server, "ballast_log_fsync_seconds_count")
            .expect("ballast_log_fsync_seconds_count")
            >= fsyncs
    );
    assert!(
        metric(&server, "ballast_log_fsync_seconds_sum").expect("ballast_log_fsync_seconds_sum")
            > 0.0
    );
    assert!(
        metric(&server, "ballast_ingest_request_seconds_count")
            .expect("ballast_ingest_request_seconds_count")
            >= ok as f64
    );
    let stored = by_message_id(&server.dump());
    assert_eq!(stored.len(), REQUESTS);
}

// ---------------------------------------------------------------------------------------
// Edge cases found in review
// ---------------------------------------------------------------------------------------

#[test]
fn multi_member_gzip_bodies_are_read_whole() {
    let server = Server::start(&common::config(""));
    let http = common::client();
    let text = r#"{"batch":[{"userId":"u","messageId":"multi-member"}]}"#;
    let (a, b) = text.split_at(20);
    let mut body = gzip(a.as_bytes());
    body.extend(gzip(b.as_bytes()));
    let r = call(
        http.post(server.url("/v1/batch"))
            .basic_auth(WRITE_KEY, Some(""))
            .header(header::CONTENT_ENCODING, "gzip")
            .body(body),
    );
    expect(&r, 200, "OK");
    assert!(by_message_id(&server.dump()).contains_key("multi-member"));
}

#[test]
fn duplicate_keys_cannot_blank_the_identity_or_message_id() {
    let server = Server::start(&common::config(""));
    let http = common::client();
    for body in [
        r#"{"userId":"u","userId":"","event":"dup-user"}"#,
        r#"{"userId":"u","messageId":"m","messageId":"","event":"dup-mid"}"#,
    ] {
        let r = post(&http, &server, "/v1/track", body);
        assert!(r.status == 200 || r.status == 400, "{body}: {}", r.text());
    }
    // As any JSON reader sees the stored events (the last duplicate wins).
    for e in server.dump() {
        let id = e["messageId"].as_str().unwrap_or_default();
        assert!(!id.trim().is_empty(), "stored without a messageId: {e}");
        let user = e["userId"].as_str().unwrap_or_default();
        let anon = e["anonymousId"].as_str().unwrap_or_default();
        assert!(
            !user.trim().is_empty() || !anon.trim().is_empty(),
            "stored without an identity: {e}"
        );
    }
}

#[test]
fn a_top_level_array_is_not_a_batch() {
    let server = Server::start(&common::config(""));
    let http = common::client();
    let r = post(&http, &server, "/v1/batch", r#"[[{"userId":"arr"}]]"#);
    expect(&r, 400, "invalid json");
    let r = call(
        http.post(server.url("/v1/batch"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(format!(r#"[[{{"userId":"arr2"}}],"{WRITE_KEY}"]"#)),
    );
    expect(&r, 401, "failed to read writekey from header");
    assert!(server.dump().is_empty());
}

/// `check-config` judges a config as `serve` would: what `serve` refuses, it refuses
/// too (exit non-zero, a message naming the destination and what is wrong).
#[test]
fn check_config_refuses_what_serve_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let run = |text: &str| {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(common::bin())
            .arg("check-config")
            .arg(&path)
            .output()
            .expect("run ballast check-config");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let dest = |settings: &str| {
        common::config(&format!(
            "[[destinations]]\nid = \"hook\"\ntype = \"webhook\"\nsources = [\"web\"]\n{settings}\n"
        ))
    };
    let (ok, out) = run(&dest("url = \"http://127.0.0.1:9/x\""));
    assert!(ok, "{out}");
    for (settings, says) in [
        ("url = \"not a url\"", "not a url"),
        ("url = \"ftp://127.0.0.1/x\"", "scheme"),
        ("url = \"http://127.0.0.1/x\"\nmethod = \"GET\"", "GET"),
        (
            "url = \"http://127.0.0.1/x\"\nheaders = { \"bad header\" = \"v\" }",
            "bad header",
        ),
        ("url = \"http://127.0.0.1/x\"\nurll = \"x\"", "urll"),
    ] {
        let (ok, out) = run(&dest(settings));
        assert!(!ok, "{settings}: accepted\n{out}");
        assert!(
            out.contains("hook") && out.contains(says),
            "{settings}: {out}"
        );
    }
}

/// SIGTERM with `server.shutdown_delay`: first not ready (`/readyz` 503) while still
/// alive (`/livez` 200) and still accepting events, then the drain and exit 0.
#[test]
fn after_sigterm_not_ready_but_alive_and_serving_during_the_shutdown_delay() {
    let config = common::config("").replacen(
        "shutdown_timeout = \"10s\"",
        "shutdown_timeout = \"10s\"\nshutdown_delay = \"3s\"",
        1,
    );
    let mut server = Server::start(&config);
    let http = common::client();
    expect(&call(http.get(server.url("/readyz"))), 200, "OK");
    let pid = server.child.as_ref().expect("running").id();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    assert!(
        common::wait_for(2, || call(http.get(server.url("/readyz"))).status == 503),
        "/readyz not 503 after SIGTERM\n{}",
        server.stderr()
    );
    expect(&call(http.get(server.url("/readyz"))), 503, "shutting down");
    expect(&call(http.get(server.url("/livez"))), 200, "OK");
    let r = post(
        &http,
        &server,
        "/v1/track",
        json!({"userId": "u", "messageId": "while-draining"}).to_string(),
    );
    expect(&r, 200, "OK");
    let status = server.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", server.stderr());
    let stored = server.dump();
    assert!(stored.iter().any(|e| e["messageId"] == "while-draining"));
}

/// Arrays and objects nested deeper than 100 levels are refused with 400 and a
/// clear text, single events and batches alike, and nothing is stored; 100 levels pass.
#[test]
fn json_nested_deeper_than_100_levels_is_refused() {
    let server = Server::start(&common::config(""));
    let http = common::client();
    let too_deep = "json nested deeper than 100 levels";
    // The event object is level 1; `deep` adds 200,000 levels.
    let deep = format!("{}1{}", "[".repeat(200_000), "]".repeat(200_000));
    let r = post(
        &http,
        &server,
        "/v1/track",
        format!(r#"{{"userId":"u","messageId":"deep","properties":{{"x":{deep}}}}}"#),
    );
    expect(&r, 400, too_deep);
    let r = post(
        &http,
        &server,
        "/v1/batch",
        format!(r#"{{"batch":[{{"userId":"u","messageId":"deep-b","p":{deep}}}]}}"#),
    );
    expect(&r, 400, too_deep);
    // Brackets inside strings do not count.
    let brackets = "[".repeat(1000);
    let r = post(
        &http,
        &server,
        "/v1/track",
        format!(r#"{{"userId":"u","messageId":"text","properties":{{"x":"{brackets}"}}}}"#),
    );
    expect(&r, 200, "OK");
    // Exactly 100 levels: the event (1), properties (2), 98 arrays.
    let at_limit = format!("{}1{}", "[".repeat(98), "]".repeat(98));
    let r = post(
        &http,
        &server,
        "/v1/track",
        format!(r#"{{"userId":"u","messageId":"limit","properties":{{"x":{at_limit}}}}}"#),
    );
    expect(&r, 200, "OK");
    let ids: BTreeSet<String> = by_message_id(&server.dump()).into_keys().collect();
    assert_eq!(
        ids,
        BTreeSet::from(["text".to_string(), "limit".to_string()])
    );
}

/// A `Content-Encoding` other than `gzip` or `identity` is refused with 415 from the
/// head, never read as plain JSON: a `deflate` or `br` body read as JSON was
/// stored as garbage or refused as `invalid json`, and a plain body under an unknown
/// encoding was stored as if it said nothing.
#[test]
fn an_unknown_content_encoding_gets_415_and_stores_nothing() {
    let server = Server::start(&common::config(""));
    let http = common::client();
    let event = json!({"userId": "u", "messageId": "enc", "event": "E"}).to_string();
    for encoding in [
        "deflate",
        "br",
        "x-gzip",
        "gzip, gzip",
        "compress",
        "zstd",
        "",
    ] {
        for (path, body) in [
            ("/v1/track", event.clone().into_bytes()),
            (
                "/v1/batch",
                gzip(format!(r#"{{"batch":[{event}]}}"#).as_bytes()),
            ),
        ] {
            let r = call(
                http.post(server.url(path))
                    .basic_auth(WRITE_KEY, Some(""))
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(header::CONTENT_ENCODING, encoding)
                    .body(body),
            );
            assert_eq!(
                (r.status, r.text().as_str()),
                (415, "unsupported content encoding (use gzip or none)"),
                "{encoding:?} {path}"
            );
        }
    }
    // Two headers, each gzip.
    let r = call(
        http.post(server.url("/v1/batch"))
            .basic_auth(WRITE_KEY, Some(""))
            .header(header::CONTENT_ENCODING, "gzip")
            .header(header::CONTENT_ENCODING, "gzip")
            .body(gzip(format!(r#"{{"batch":[{event}]}}"#).as_bytes())),
    );
    assert_eq!(r.status, 415, "{}", r.text());
    assert_eq!(
        server.dump(),
        Vec::<Value>::new(),
        "a refused body was stored"
    );
    // `identity` and `GZIP` are fine.
    let r = call(
        http.post(server.url("/v1/track"))
            .basic_auth(WRITE_KEY, Some(""))
            .header(header::CONTENT_ENCODING, "identity")
            .body(event.clone()),
    );
    expect(&r, 200, "OK");
    let r = call(
        http.post(server.url("/v1/track"))
            .basic_auth(WRITE_KEY, Some(""))
            .header(header::CONTENT_ENCODING, "GZIP")
            .body(gzip(event.replace("\"enc\"", "\"enc-2\"").as_bytes())),
    );
    expect(&r, 200, "OK");
    // Two distinct events (one messageId twice would be stored once: de-duplication).
    assert_eq!(server.dump().len(), 2);
}

/// A client that shuts its sending side (`shutdown(SHUT_WR)`) once its whole request is
/// written still reads the answer, and the event is stored once (it got no
/// answer, though its events were stored: a duplicate when it retried).
#[test]
fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    use std::io::Read;
    let server = Server::start(&common::config(""));
    let addr = server.base.trim_start_matches("http://").to_string();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:"));
    for i in 0..3 {
        let body =
            json!({"userId": "u", "messageId": format!("half-{i}"), "event": "E"}).to_string();
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "POST /v1/track HTTP/1.1\r\nHost: t\r\nAuthorization: Basic {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("OK"),
            "request {i}: {answer:?}"
        );
    }
    let ids: Vec<String> = server
        .dump()
        .iter()
        .map(|e| e["messageId"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(ids, ["half-0", "half-1", "half-2"]);
}
