//! ballast's own browser SDK (`sdk/js`, docs/SDK-JS.md) in real headless Chromium: the
//! bundle the server serves at `/sdk/v1/ballast.min.js`, on a page of another origin.
//! - an outage with reloads and three tabs: every event tracked while the server is down
//!   reaches a file destination once, each tab's in the order the page called them;
//! - a flapping data plane (503s, a 429 with `Retry-After`, an oversized event refused
//!   with 413): the refused event is alone in the dead-letter store and `onError`, the
//!   rest arrive once, in order;
//! - a full queue: new events are refused (the Promise rejects, `onError`, a counter),
//!   none stored is evicted, and the stored ones are all delivered later;
//! - an analytics-js (v3) user keeps their anonymousId when the site switches SDKs.
//!
//! Needs `chromium` and `chromedriver` (Debian: `chromium`, `chromium-driver`;
//! `scripts/test` installs them); the analytics-js test also needs `npm`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::receiver::Background;
use common::webdriver::Browser;
use common::{client, free_port, wait_for, Server, WRITE_KEY};

/// The bundle as the server compiles it in.
fn bundle() -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gateway/sdk/ballast.min.js"))
        .expect("the committed SDK bundle")
}

type Files = Vec<(&'static str, &'static str, Vec<u8>)>;

/// A static file server on 127.0.0.1 (another origin than ballast's, as on a real site):
/// (path, content type, body); the query string is ignored. Stops when dropped.
fn static_site(files: Files) -> Background {
    use axum::response::IntoResponse;
    let files = Arc::new(files);
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let files = files.clone();
        async move {
            match files.iter().find(|(p, _, _)| *p == uri.path()) {
                Some((_, ctype, body)) => {
                    ([(axum::http::header::CONTENT_TYPE, *ctype)], body.clone()).into_response()
                }
                None => (axum::http::StatusCode::NOT_FOUND, "not found").into_response(),
            }
        }
    });
    Background::start(app)
}

/// A page that loads the SDK against `data_plane` with fast retries and `extra` load
/// options; `tab` comes from the query string. `send(from, to)` tracks `Seq` events
/// `{tab, seq}` and resolves once all are durable; `sendSettled` says which were stored.
fn page(data_plane: &str, extra: &str) -> Vec<u8> {
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>ballast sdk test</title>
<script src="/ballast.min.js"></script>
<script>
  window.errs = [];
  const tab = Number(new URLSearchParams(location.search).get('tab') || 0);
  ballast.load("{WRITE_KEY}", "{data_plane}", {{
    retryBaseMs: 100, retryCapMs: 1000, pollMs: 500,
    onError: (e) => window.errs.push({{ code: e.code, status: e.status || 0,
      seq: e.event && e.event.properties ? e.event.properties.seq : null }}),
    {extra}
  }});
  window.send = (from, to, pad) => {{
    const ps = [];
    for (let i = from; i < to; i++) {{
      const p = {{ tab, seq: i }};
      if (pad && pad[i]) p.pad = 'x'.repeat(pad[i]);
      ps.push(ballast.track('Seq', p));
    }}
    return Promise.all(ps).then(() => true);
  }};
  window.sendSettled = (from, to) => {{
    const ps = [];
    for (let i = from; i < to; i++) ps.push(ballast.track('Seq', {{ tab, seq: i }}));
    return Promise.allSettled(ps).then((rs) => rs.map((r) => r.status === 'fulfilled'));
  }};
</script></head><body>ballast</body></html>"#
    )
    .into_bytes()
}

/// The config of the tests that go through ballast: the public port fixed (the page must
/// find the server again after a restart), a file destination.
fn config_with_file(port: u16, out: &Path) -> String {
    common::config(&format!(
        r#"
[[destinations]]
id = "archive"
type = "file"
sources = ["web"]
path = "{}"
"#,
        out.display()
    ))
    .replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
        1,
    )
}

/// The `Seq` events in the file destination, in file order.
fn delivered(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == "Seq")
        .collect()
}

/// Per tab, the seqs in arrival order.
fn seqs_by_tab(events: &[Value]) -> BTreeMap<i64, Vec<i64>> {
    let mut by: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for e in events {
        by.entry(e["properties"]["tab"].as_i64().unwrap_or(-1))
            .or_default()
            .push(e["properties"]["seq"].as_i64().unwrap_or(-1));
    }
    by
}

fn wait_until_delivered(out: &Path, want: usize, secs: u64) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got = delivered(out);
        if got.len() >= want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn new_tab(browser: &Browser) -> String {
    let r = browser.cmd("window/new", json!({ "type": "tab" }));
    r["handle"].as_str().expect("new tab handle").to_string()
}

fn switch_to(browser: &Browser, handle: &str) {
    browser.cmd("window", json!({ "handle": handle }));
}

#[test]
fn outage_with_reloads_and_three_tabs_delivers_every_event_once_in_order() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let out: PathBuf = dir.path().join("out").join("events.jsonl");
    let port = free_port();
    let config = config_with_file(port, &out);
    let mut server = Server::start_in(dir.clone(), &config, &[]);

    // The server serves the bundle it compiled in, with an ETag, a short max-age, CORS.
    let http = client();
    let r = http
        .get(server.url("/sdk/v1/ballast.min.js"))
        .header("Origin", "http://example.test")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(r.headers()["cache-control"], "public, max-age=300");
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/javascript"));
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://example.test"
    );
    let sdk = r.bytes().unwrap().to_vec();
    assert_eq!(sdk, bundle());
    let r = http
        .get(server.url("/sdk/v1/ballast.min.js"))
        .header("If-None-Match", &etag)
        .send()
        .unwrap();
    assert_eq!(r.status(), 304);

    let ballast = format!("http://127.0.0.1:{port}");
    let site = static_site(vec![
        ("/", "text/html", page(&ballast, "")),
        ("/ballast.min.js", "application/javascript", sdk),
    ]);
    let url = |tab: usize| format!("http://127.0.0.1:{}/?tab={tab}", site.port());
    let browser = Browser::start();
    let first = browser.get("window").as_str().unwrap().to_string();
    browser.goto(&url(0));

    // Online: delivered, shaped as analytics-js sends it.
    assert_eq!(browser.js("return window.send(0, 10)"), true);
    let got = wait_until_delivered(&out, 10, 30);
    assert_eq!(got.len(), 10, "{got:?}");
    let e = &got[0];
    assert_eq!(e["type"], "track");
    assert_eq!(e["channel"], "web");
    assert_eq!(e["context"]["library"]["name"], "ballast JavaScript SDK");
    assert!(e["context"]["userAgent"]
        .as_str()
        .unwrap()
        .contains("Chrome"));
    assert!(e["context"]["locale"].is_string());
    assert_eq!(e["context"]["page"]["url"], url(0));
    assert_eq!(e["context"]["page"]["path"], "/");
    assert!(e["context"]["traits"].is_object());
    for k in ["messageId", "anonymousId", "originalTimestamp", "sentAt"] {
        assert!(e[k].as_str().is_some_and(|s| !s.is_empty()), "{k}: {e}");
    }
    let anon = browser.js("return ballast.getAnonymousId()");
    assert_eq!(e["anonymousId"], anon);

    // The server goes away; three tabs track in bursts, each reloaded after its burst.
    assert!(server.terminate().success());
    drop(server);
    let tabs = vec![first.clone(), new_tab(&browser), new_tab(&browser)];
    for (i, h) in tabs.iter().enumerate().skip(1) {
        switch_to(&browser, h);
        browser.goto(&url(i));
    }
    let (bursts, per_burst) = (4, 40);
    let mut next = [10i64, 0, 0];
    for _ in 0..bursts {
        for (i, h) in tabs.iter().enumerate() {
            switch_to(&browser, h);
            let (from, to) = (next[i], next[i] + per_burst);
            assert_eq!(
                browser.js(&format!("return window.send({from}, {to})")),
                true,
                "tab {i}: {}",
                browser.js("return JSON.stringify(window.errs)")
            );
            next[i] = to;
            browser.cmd("refresh", json!({}));
        }
    }
    let queued = browser.js("return ballast.queueSize().then((s) => s.events)");
    assert_eq!(
        queued.as_i64(),
        Some(3 * bursts * per_burst),
        "every event is in the device's queue"
    );
    assert_eq!(delivered(&out).len(), 10, "nothing got through the outage");

    // Back on the same address: everything arrives, once, each tab's in order.
    let server = Server::start_in(dir.clone(), &config, &[]);
    let total = 10 + (3 * bursts * per_burst) as usize;
    let got = wait_until_delivered(&out, total, 90);
    let want: BTreeMap<i64, Vec<i64>> =
        (0..3).map(|t| (t as i64, (0..next[t]).collect())).collect();
    assert_eq!(
        seqs_by_tab(&got),
        want,
        "lost, duplicated or reordered events"
    );
    // Nothing more comes later (no late copies).
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(delivered(&out).len(), total);
    assert!(wait_for(10, || browser
        .js("return ballast.queueSize().then((s) => s.events)")
        .as_i64()
        == Some(0)));
    for h in &tabs {
        switch_to(&browser, h);
        let errs = browser.js("return window.errs.concat(window.__errors || [])");
        assert_eq!(errs, json!([]), "errors on the page");
    }
    drop(server);
}

/// What the fake data plane answers, by request number (from 1): 3 in 10 are 503, the
/// fifth a 429 with `Retry-After: 1`; a body over 20 kB is 413.
fn flap(n: usize, body_len: usize) -> (u16, Option<&'static str>) {
    if body_len > 20_000 {
        (413, None)
    } else if n == 5 {
        (429, Some("1"))
    } else if matches!(n % 10, 1 | 4 | 7) {
        (503, None)
    } else {
        (200, None)
    }
}

#[derive(Default)]
struct Plane {
    requests: Vec<(Instant, u16, usize)>,
    events: Vec<Value>,
    auth_ok: bool,
}

#[test]
fn flapping_server_retries_in_place_and_dead_letters_only_the_oversized_event() {
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    let plane = Arc::new(Mutex::new(Plane {
        auth_ok: true,
        ..Plane::default()
    }));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let origin = format!("http://127.0.0.1:{port}");
    let html = page(
        &origin,
        "maxBatchEvents: 20, retryBaseMs: 50, retryCapMs: 200,",
    );
    let sdk = bundle();
    let p = plane.clone();
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(move || {
                let html = html.clone();
                async move { ([("content-type", "text/html")], html).into_response() }
            }),
        )
        .route(
            "/ballast.min.js",
            axum::routing::get(move || {
                let sdk = sdk.clone();
                async move { ([("content-type", "application/javascript")], sdk).into_response() }
            }),
        )
        .route(
            "/v1/batch",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let p = p.clone();
                async move {
                    let mut plane = p.lock().unwrap();
                    let want = format!(
                        "Basic {}",
                        base64::Engine::encode(
                            &base64::engine::general_purpose::STANDARD,
                            format!("{WRITE_KEY}:")
                        )
                    );
                    if headers.get("authorization").and_then(|v| v.to_str().ok())
                        != Some(want.as_str())
                    {
                        plane.auth_ok = false;
                    }
                    let n = plane.requests.len() + 1;
                    let (status, retry_after) = flap(n, body.len());
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let count = v["batch"].as_array().map_or(0, Vec::len);
                    plane.requests.push((Instant::now(), status, count));
                    if status == 200 {
                        plane
                            .events
                            .extend(v["batch"].as_array().cloned().unwrap_or_default());
                    }
                    let mut r = (StatusCode::from_u16(status).unwrap(), "x").into_response();
                    if let Some(s) = retry_after {
                        r.headers_mut().insert("retry-after", s.parse().unwrap());
                    }
                    r
                }
            }),
        );
    let _plane_server = Background::serve(listener, app);
    let browser = Browser::start();
    browser.goto(&format!("{origin}/"));

    let n = 200;
    let big = 57;
    assert_eq!(
        browser.js(&format!("return window.send(0, {n}, {{ {big}: 40000 }})")),
        true
    );
    assert!(
        wait_for(60, || plane.lock().unwrap().events.len() >= n as usize - 1),
        "{} of {} arrived",
        plane.lock().unwrap().events.len(),
        n - 1
    );
    std::thread::sleep(Duration::from_millis(500));
    let plane = plane.lock().unwrap();
    assert!(
        plane.auth_ok,
        "a request without the write key's Basic auth"
    );
    let seqs: Vec<i64> = plane
        .events
        .iter()
        .map(|e| e["properties"]["seq"].as_i64().unwrap())
        .collect();
    let want: Vec<i64> = (0..n).filter(|&i| i != big).collect();
    assert_eq!(seqs, want, "lost, duplicated or reordered events");
    for e in &plane.events {
        assert!(e["sentAt"].is_string() && e["messageId"].is_string());
    }
    let statuses: Vec<u16> = plane.requests.iter().map(|r| r.1).collect();
    assert!(statuses.contains(&503) && statuses.contains(&429) && statuses.contains(&413));
    // The request after the 429 waited for its Retry-After (1 s), far above the backoff cap.
    let i = statuses.iter().position(|&s| s == 429).unwrap();
    let waited = plane.requests[i + 1].0 - plane.requests[i].0;
    assert!(
        waited >= Duration::from_millis(900),
        "Retry-After not honoured: {waited:?}"
    );
    // Only the oversized event was refused: alone in the dead-letter store and onError.
    let dead = browser.js("return ballast.deadLetters()");
    let dead = dead.as_array().unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["status"], 413);
    assert_eq!(dead[0]["event"]["properties"]["seq"], big);
    let errs = browser.js("return window.errs");
    assert_eq!(
        errs,
        json!([{ "code": "refused", "status": 413, "seq": big }])
    );
    let stats = browser.js("return ballast.stats()");
    assert_eq!(stats["deadLettered"], 1);
    assert_eq!(stats["sent"], n - 1);
    assert_eq!(stats["storage"], "indexeddb");
    assert_eq!(
        browser.js("return ballast.queueSize().then((s) => s.events)"),
        0
    );
}

#[test]
fn a_full_queue_refuses_new_events_and_evicts_none() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let out: PathBuf = dir.path().join("out").join("events.jsonl");
    let port = free_port();
    let ballast = format!("http://127.0.0.1:{port}");
    let site = static_site(vec![
        ("/", "text/html", page(&ballast, "maxQueueBytes: 20000,")),
        ("/ballast.min.js", "application/javascript", bundle()),
    ]);
    let browser = Browser::start();
    browser.goto(&format!("http://127.0.0.1:{}/", site.port()));

    // Nothing listens: the queue fills up, then refuses.
    let stored: Vec<bool> =
        serde_json::from_value(browser.js("return window.sendSettled(0, 60)")).unwrap();
    let accepted = stored.iter().take_while(|s| **s).count();
    assert!(accepted > 0 && accepted < 60, "{stored:?}");
    assert!(
        stored[accepted..].iter().all(|s| !s),
        "once full, every later event is refused: {stored:?}"
    );
    // Later calls are refused too, each with onError and the counter.
    let later: Vec<bool> =
        serde_json::from_value(browser.js("return window.sendSettled(60, 70)")).unwrap();
    assert!(later.iter().all(|s| !s));
    let refused = 60 - accepted + 10;
    let errs = browser.js("return window.errs");
    let errs = errs.as_array().unwrap();
    assert_eq!(errs.len(), refused);
    assert!(errs.iter().all(|e| e["code"] == "queue_full"));
    let seqs: Vec<i64> = errs.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (accepted as i64..70).collect::<Vec<_>>());
    assert_eq!(browser.js("return ballast.stats().refused"), refused);
    let size = browser.js("return ballast.queueSize()");
    assert_eq!(size["events"], accepted);
    assert!(size["bytes"].as_i64().unwrap() <= 20000);

    // The server comes: the stored events all arrive, in order; the refused never do.
    let server = Server::start_in(dir.clone(), &config_with_file(port, &out), &[]);
    let got = wait_until_delivered(&out, accepted, 60);
    std::thread::sleep(Duration::from_millis(500));
    let got_seqs = seqs_by_tab(&delivered(&out));
    assert_eq!(got.len(), accepted);
    assert_eq!(
        got_seqs.get(&0).cloned().unwrap_or_default(),
        (0..accepted as i64).collect::<Vec<_>>()
    );
    drop(server);
}

#[test]
fn without_indexeddb_the_queue_falls_back_to_local_storage_visibly() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let out: PathBuf = dir.path().join("out").join("events.jsonl");
    let port = free_port();
    let ballast = format!("http://127.0.0.1:{port}");
    // IndexedDB is taken away before the SDK loads (as in some private modes).
    let html = String::from_utf8(page(&ballast, "")).unwrap().replacen(
        "<script src=\"/ballast.min.js\">",
        "<script>Object.defineProperty(window, 'indexedDB', { value: undefined });</script>\n<script src=\"/ballast.min.js\">",
        1,
    );
    let site = static_site(vec![
        ("/", "text/html", html.into_bytes()),
        ("/ballast.min.js", "application/javascript", bundle()),
    ]);
    let browser = Browser::start();
    browser.goto(&format!("http://127.0.0.1:{}/", site.port()));
    // Tracked while the server is down, across a reload.
    assert_eq!(browser.js("return window.send(0, 20)"), true);
    assert_eq!(browser.js("return ballast.stats().storage"), "localStorage");
    let errs = browser.js("return window.errs");
    assert_eq!(errs.as_array().map(Vec::len), Some(1), "{errs}");
    assert_eq!(errs[0]["code"], "storage");
    browser.cmd("refresh", json!({}));
    assert_eq!(browser.js("return window.send(20, 30)"), true);
    let server = Server::start_in(dir.clone(), &config_with_file(port, &out), &[]);
    let got = wait_until_delivered(&out, 30, 30);
    assert_eq!(
        seqs_by_tab(&got).get(&0).cloned().unwrap_or_default(),
        (0..30).collect::<Vec<_>>()
    );
    drop(server);
}

/// In front of ballast: serves the page and the SDK (one origin) and forwards
/// `/v1/batch` to ballast, holding the first answer until released (ballast has stored
/// the events, the page has not heard so).
struct HoldingProxy {
    forwarded: std::sync::atomic::AtomicUsize,
    released: std::sync::atomic::AtomicBool,
}

#[test]
fn a_tab_closed_mid_flight_has_its_events_delivered_by_another_tab_once() {
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use std::sync::atomic::Ordering;

    let dir = Arc::new(tempfile::tempdir().unwrap());
    let out: PathBuf = dir.path().join("out").join("events.jsonl");
    let port = free_port();
    let server = Server::start_in(dir.clone(), &config_with_file(port, &out), &[]);
    let target = format!("http://127.0.0.1:{port}/v1/batch");

    let proxy = Arc::new(HoldingProxy {
        forwarded: Default::default(),
        released: Default::default(),
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let origin = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let html = page(&origin, "");
    let sdk = bundle();
    let p = proxy.clone();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(move || {
                let html = html.clone();
                async move { ([("content-type", "text/html")], html).into_response() }
            }),
        )
        .route(
            "/ballast.min.js",
            axum::routing::get(move || {
                let sdk = sdk.clone();
                async move { ([("content-type", "application/javascript")], sdk).into_response() }
            }),
        )
        .route(
            "/v1/batch",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let (p, http, target) = (p.clone(), http.clone(), target.clone());
                async move {
                    let n = p.forwarded.fetch_add(1, Ordering::SeqCst) + 1;
                    let mut req = http.post(&target).body(body);
                    for h in ["authorization", "content-type"] {
                        if let Some(v) = headers.get(h) {
                            req = req.header(h, v.clone());
                        }
                    }
                    let (status, text) = match req.send().await {
                        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                        Err(_) => (502, String::new()),
                    };
                    if n == 1 {
                        let deadline = Instant::now() + Duration::from_secs(60);
                        while !p.released.load(Ordering::SeqCst) && Instant::now() < deadline {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    (StatusCode::from_u16(status).unwrap(), text).into_response()
                }
            }),
        );
    let _proxy_server = Background::serve(listener, app);

    let browser = Browser::start();
    let first = browser.get("window").as_str().unwrap().to_string();
    browser.goto(&format!("{origin}/?tab=0"));
    assert_eq!(browser.js("return window.send(0, 50)"), true);
    // ballast stores the batch; its answer is held.
    assert!(wait_for(30, || delivered(&out).len() >= 50));
    assert_eq!(proxy.forwarded.load(Ordering::SeqCst), 1);
    assert_eq!(browser.js("return ballast.stats().sender"), true);

    // A second tab waits for the lock; the sending tab is closed mid-flight.
    let second = new_tab(&browser);
    switch_to(&browser, &second);
    browser.goto(&format!("{origin}/?tab=1"));
    assert_eq!(browser.js("return ballast.stats().sender"), false);
    switch_to(&browser, &first);
    browser.close_window();
    switch_to(&browser, &second);
    // The second tab takes over, sends the rows the first never saw answered (ballast keeps
    // one copy of each), then its own.
    assert!(wait_for(30, || browser.js("return ballast.stats().sender") == true));
    assert_eq!(browser.js("return window.send(0, 10)"), true);
    assert!(wait_for(30, || browser
        .js("return ballast.queueSize().then((s) => s.events)")
        .as_i64()
        == Some(0)));
    proxy.released.store(true, Ordering::SeqCst);
    let got = wait_until_delivered(&out, 60, 30);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(delivered(&out).len(), 60, "copies were stored");
    let want: BTreeMap<i64, Vec<i64>> = [(0, (0..50).collect()), (1, (0..10).collect())]
        .into_iter()
        .collect();
    assert_eq!(seqs_by_tab(&got), want);
    assert!(proxy.forwarded.load(Ordering::SeqCst) >= 2);
    let dups = common::metric(&server, "ballast_ingest_duplicates_total{source=\"web\"}");
    assert!(
        dups.unwrap_or(0.0) >= 50.0,
        "the first tab's rows were sent again and dropped as copies: {dups:?}"
    );
}

const RUDDER_PACKAGE: &str = "@rudderstack/analytics-js@3.34.1";
const RUDDER_FILE: &str =
    "node_modules/@rudderstack/analytics-js/dist/npm/modern/bundled/umd/index.js";

/// RudderStack's bundled UMD build, installed once into `target/tmp`.
fn rudder_js() -> &'static Path {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = PATH.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-sdk");
        let file = dir.join(RUDDER_FILE);
        if file.exists() {
            return Ok(file);
        }
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let out = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
            .arg(&dir)
            .arg(RUDDER_PACKAGE)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("npm: {e}"))?;
        if !out.status.success() || !file.exists() {
            return Err(format!(
                "npm install {RUDDER_PACKAGE} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(file)
    });
    r.as_deref()
        .unwrap_or_else(|e| panic!("installing analytics-js: {e}"))
}

#[test]
fn an_analytics_js_user_keeps_their_anonymous_id_and_user_id() {
    let server = Server::start(&common::config(""));
    let base = server.base.clone();
    let rudder_page = format!(
        r#"<!doctype html><html><head><script src="/rudder.js"></script><script>
  window.loaded = false;
  const ra = new rudderanalytics.RudderAnalytics();
  ra.load("{WRITE_KEY}", "{base}", {{ configUrl: "{base}", logLevel: "ERROR", loadIntegration: false,
    onLoaded: () => {{ ra.identify("known-user"); window.loaded = true; }} }});
  window.ra = ra;
</script></head><body>rudder</body></html>"#
    );
    let ballast_page = format!(
        r#"<!doctype html><html><head><script src="/ballast.min.js"></script><script>
  ballast.load("{WRITE_KEY}", "{base}");
</script></head><body>ballast</body></html>"#
    );
    let site = static_site(vec![
        ("/rudder", "text/html", rudder_page.into_bytes()),
        ("/ballast", "text/html", ballast_page.into_bytes()),
        (
            "/rudder.js",
            "application/javascript",
            std::fs::read(rudder_js()).unwrap(),
        ),
        ("/ballast.min.js", "application/javascript", bundle()),
    ]);
    let origin = format!("http://127.0.0.1:{}", site.port());
    let browser = Browser::start();
    browser.goto(&format!("{origin}/rudder"));
    assert!(wait_for(20, || browser.js("return window.loaded") == true));
    let anon = browser.js("return window.ra.getAnonymousId()");
    assert!(anon.as_str().is_some_and(|a| !a.is_empty()));
    // analytics-js v3 keeps it in a cookie, encoded (RS_ENC_v3_ + base64 of JSON).
    let cookie = browser.js("return document.cookie").to_string();
    assert!(cookie.contains("rl_anonymous_id="), "{cookie}");
    assert!(cookie.contains("RS_ENC_v3_"), "{cookie}");

    browser.goto(&format!("{origin}/ballast"));
    assert_eq!(browser.js("return ballast.getAnonymousId()"), anon);
    assert_eq!(browser.js("return ballast.getUserId()"), "known-user");
    // A tracked event carries them; a reset forgets the user but not the device.
    assert_eq!(
        browser.js("return ballast.track('After Switch').then(() => true)"),
        true
    );
    assert!(wait_for(20, || server
        .dump()
        .iter()
        .any(|e| e["event"] == "After Switch"
            && e["anonymousId"] == anon
            && e["userId"] == "known-user")));
    browser.js("ballast.reset()");
    browser.goto(&format!("{origin}/ballast"));
    assert_eq!(browser.js("return ballast.getAnonymousId()"), anon);
    assert_eq!(
        browser.js("return ballast.getUserId() ?? null"),
        Value::Null
    );
    // Each event carries the identity as of its call, however quickly the calls follow.
    browser.js(
        "ballast.identify('quick-user'); ballast.track('Quick A'); ballast.reset(); \
         return ballast.track('Quick B').then(() => true)",
    );
    assert!(wait_for(20, || server
        .dump()
        .iter()
        .any(|e| e["event"] == "Quick B")));
    let dump = server.dump();
    let quick = |name: &str| dump.iter().find(|e| e["event"] == name).cloned().unwrap();
    assert_eq!(quick("Quick A")["userId"], "quick-user");
    assert!(
        quick("Quick B").get("userId").is_none(),
        "{}",
        quick("Quick B")
    );
}

/// One SDK's page for the side-by-side run: `send(from, to)` tracks `Seq` events
/// `{tab, seq}` (each SDK with its defaults); `window.loaded` once it can track.
fn side_by_side_page(rudder: bool, data_plane: &str, site: &str) -> Vec<u8> {
    let body = if rudder {
        format!(
            r#"<script src="/rudder.js"></script><script>
  const ra = new rudderanalytics.RudderAnalytics();
  ra.load("{WRITE_KEY}", "{data_plane}", {{ configUrl: "{site}", logLevel: "NONE", loadIntegration: false,
    onLoaded: () => {{ window.loaded = true; }} }});
  window.send = (from, to) => {{ for (let i = from; i < to; i++) ra.track('Seq', {{ tab, seq: i }}); return true; }};
</script>"#
        )
    } else {
        format!(
            r#"<script src="/ballast.min.js"></script><script>
  ballast.load("{WRITE_KEY}", "{data_plane}");
  ballast.ready(() => {{ window.loaded = true; }});
  window.send = (from, to) => {{
    const ps = [];
    for (let i = from; i < to; i++) ps.push(ballast.track('Seq', {{ tab, seq: i }}));
    return Promise.allSettled(ps).then(() => true);
  }};
</script>"#
        )
    };
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><script>
  window.loaded = false;
  const tab = Number(new URLSearchParams(location.search).get('tab') || 0);
</script>{body}</head><body>side by side</body></html>"#
    )
    .into_bytes()
}

/// What one SDK lost, duplicated and reordered in the outage scenario.
struct Outcome {
    tracked: usize,
    delivered: usize,
    lost: usize,
    duplicated: usize,
    reordered: usize,
}

/// The outage scenario, with each SDK's defaults and server-side de-duplication off (what
/// the SDK itself does): ballast is stopped; `tabs` tabs each track `bursts` bursts of
/// `per_burst` events, each tab reloaded after each burst when `reload`; ballast starts
/// again; whatever has arrived after `wait` is counted.
fn outage_run(
    rudder: bool,
    tabs: usize,
    bursts: usize,
    per_burst: usize,
    reload: bool,
    wait: Duration,
) -> Outcome {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let out: PathBuf = dir.path().join("out").join("events.jsonl");
    let port = free_port();
    let config = config_with_file(port, &out).replacen(
        "write_key = \"test-write-key\"",
        "write_key = \"test-write-key\"\ndedup_window = \"0s\"",
        1,
    );
    let mut server = Server::start_in(dir.clone(), &config, &[]);
    let source_config = client()
        .get(server.url("/sourceConfig/"))
        .basic_auth(WRITE_KEY, Some(""))
        .send()
        .unwrap()
        .bytes()
        .unwrap()
        .to_vec();
    let data_plane = format!("http://127.0.0.1:{port}");
    let site_port = free_port();
    let site_url = format!("http://127.0.0.1:{site_port}");
    let html = side_by_side_page(rudder, &data_plane, &site_url);
    let files: Files = vec![
        ("/", "text/html", html),
        ("/sourceConfig/", "application/json", source_config.clone()),
        ("/sourceConfig", "application/json", source_config),
        (
            "/rudder.js",
            "application/javascript",
            std::fs::read(rudder_js()).unwrap(),
        ),
        ("/ballast.min.js", "application/javascript", bundle()),
    ];
    let _site = {
        use axum::response::IntoResponse;
        let files = Arc::new(files);
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let files = files.clone();
            async move {
                match files.iter().find(|(p, _, _)| *p == uri.path()) {
                    Some((_, ctype, body)) => (
                        [
                            (axum::http::header::CONTENT_TYPE, *ctype),
                            (axum::http::header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
                        ],
                        body.clone(),
                    )
                        .into_response(),
                    None => (axum::http::StatusCode::NOT_FOUND, "not found").into_response(),
                }
            }
        });
        Background::serve(
            std::net::TcpListener::bind(("127.0.0.1", site_port)).unwrap(),
            app,
        )
    };
    let browser = Browser::start();
    let mut handles = vec![browser.get("window").as_str().unwrap().to_string()];
    while handles.len() < tabs {
        handles.push(new_tab(&browser));
    }
    for (i, h) in handles.iter().enumerate() {
        switch_to(&browser, h);
        browser.goto(&format!("{site_url}/?tab={i}"));
        assert!(wait_for(20, || browser.js("return window.loaded") == true));
    }
    assert!(server.terminate().success());
    drop(server);
    for b in 0..bursts {
        for h in &handles {
            switch_to(&browser, h);
            assert!(wait_for(20, || browser.js("return window.loaded") == true));
            let from = b * per_burst;
            browser.js(&format!("return window.send({from}, {})", from + per_burst));
            std::thread::sleep(Duration::from_millis(300));
            if reload {
                browser.cmd("refresh", json!({}));
            }
        }
    }
    let server = Server::start_in(dir.clone(), &config, &[]);
    std::thread::sleep(wait);
    let got = delivered(&out);
    drop(server);
    let tracked = tabs * bursts * per_burst;
    let mut distinct = std::collections::HashSet::new();
    let mut reordered = 0;
    let mut highest: BTreeMap<i64, i64> = BTreeMap::new();
    for e in &got {
        let (tab, seq) = (
            e["properties"]["tab"].as_i64().unwrap_or(-1),
            e["properties"]["seq"].as_i64().unwrap_or(-1),
        );
        if !distinct.insert((tab, seq)) {
            continue;
        }
        let top = highest.entry(tab).or_insert(-1);
        if seq < *top {
            reordered += 1;
        }
        *top = (*top).max(seq);
    }
    Outcome {
        tracked,
        delivered: got.len(),
        lost: tracked - distinct.len(),
        duplicated: got.len() - distinct.len(),
        reordered,
    }
}

/// Not a test: the issue's side-by-side comparison (docs/SDK-JS.md, "Side by side").
/// `cargo test -p ballast --all-features --test browser_sdk side_by_side -- --ignored --nocapture`
#[test]
#[ignore]
fn side_by_side_outage_report() {
    let wait = Duration::from_secs(90);
    let mut rows = Vec::new();
    for (scenario, tabs, bursts, per_burst, reload) in [
        (
            "2 tabs, 3 bursts of 50 each, reload after each",
            2,
            3,
            50,
            true,
        ),
        ("1 tab, 250 events, no reload", 1, 1, 250, false),
    ] {
        for (name, rudder) in [
            ("@rudderstack/analytics-js 3.34.1", true),
            ("ballast browser SDK", false),
        ] {
            let o = outage_run(rudder, tabs, bursts, per_burst, reload, wait);
            rows.push((scenario, name, o));
        }
    }
    println!("| scenario (server down while tracking) | SDK (defaults) | tracked | arrived | missing 90 s after the restart | duplicated | out of order |");
    println!("|---|---|---|---|---|---|---|");
    for (scenario, name, o) in rows {
        println!(
            "| {scenario} | {name} | {} | {} | {} | {} | {} |",
            o.tracked, o.delivered, o.lost, o.duplicated, o.reordered
        );
    }
}
