//! The status page on the admin port (`GET /`, docs/OPERATIONS.md "The status page") in a real
//! headless Chromium driven by chromedriver, as tests/browser.rs does (offline): it
//! shows the mode and each destination with its backlog and dead letters, draws its
//! charts, replays a destination's dead letters (re-delivered to a webhook that refused
//! them first), switches the mode, both after a confirmation; it sends no request off
//! 127.0.0.1 and logs no console error. With an admin token it asks for the token and
//! sends it. Screenshots go to `target/status-page/`.
//!
//! Needs `chromium` and `chromedriver` (Debian: `chromium`, `chromium-driver`; `.ci/run`
//! and `scripts/test` install them).

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::receiver::{rule, Receiver, Reply};
use common::webdriver::Browser;
use common::{admin_get, mid, wait_for, Server, WRITE_KEY};
use serde_json::{json, Value};

/// A webhook receiver: refuses (400) the events whose messageId starts with "bad-" while
/// `refuse` is set, answers 503 to everything on /slow, 200 otherwise.
fn receiver(refuse: Arc<AtomicBool>) -> Receiver {
    Receiver::start(rule(move |h| {
        if h.path == "/slow" {
            Reply::Status(503)
        } else if refuse.load(Ordering::SeqCst)
            && h.events.iter().any(|e| mid(e).starts_with("bad-"))
        {
            Reply::Status(400)
        } else {
            Reply::Status(200)
        }
    }))
}

/// `target/status-page/NAME`.
fn artifact(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("status-page")
        .join(name)
}

fn event(user: &str, id: &str) -> Value {
    json!({
        "type": "track",
        "event": "Status Page Test",
        "userId": user,
        "messageId": id,
        "properties": { "pad": "x".repeat(200) },
    })
}

fn post_batch(server: &Server, batch: &[Value]) {
    let r = common::client()
        .post(server.url("/v1/batch"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({ "batch": batch }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

fn dead_count(server: &Server, id: &str) -> usize {
    admin_get(server, &format!("/v1/dead-letters?destination={id}"))
        .as_array()
        .map(|a| a.len())
        .unwrap_or(0)
}

const BAD: usize = 12;

#[test]
fn the_status_page_shows_the_destinations_replays_dead_letters_and_switches_the_mode() {
    let refuse = Arc::new(AtomicBool::new(true));
    let rx = receiver(refuse.clone());
    let out = tempfile::tempdir().unwrap();
    let extra = format!(
        r#"
[[destinations]]
id = "hook"
type = "webhook"
sources = ["web"]
url = "http://127.0.0.1:{port}/hook"
retry = {{ max_attempts = 1000000, retry_window = "1h", min_backoff = "20ms", max_backoff = "200ms" }}

[[destinations]]
id = "slow-crm"
type = "webhook"
sources = ["web"]
url = "http://127.0.0.1:{port}/slow"
retry = {{ max_attempts = 1000000, retry_window = "1h", min_backoff = "300ms", max_backoff = "1s" }}

[[destinations]]
id = "archive"
type = "file"
sources = ["web"]
path = "{file}"
"#,
        port = rx.port(),
        file = out.path().join("archive.jsonl").display()
    );
    let config = common::config(&extra).replacen(
        "shutdown_timeout = \"10s\"",
        "shutdown_timeout = \"10s\"\nhistory_interval = \"1s\"",
        1,
    );
    let server = Server::start(&config);

    // Events the hook refuses for now (dead letters at once), and others it takes.
    let bad: Vec<Value> = (0..BAD)
        .map(|i| event(&format!("user-{}", i % 3), &format!("bad-{i}")))
        .collect();
    post_batch(&server, &bad);
    assert!(
        wait_for(20, || dead_count(&server, "hook") == BAD),
        "{}",
        admin_get(&server, "/v1/status")
    );

    let browser = Browser::start();
    let page = format!("{}/?refresh=1", server.admin);
    browser.goto(&page);
    assert!(
        wait_for(20, || browser.js("return document.body.dataset.loaded")
            == "1"),
        "the page did not load its data: {}",
        browser.js("return [document.getElementById('error').textContent, window.__errors]")
    );

    // Under load: a batch every 200 ms for a few seconds while the page refreshes.
    for i in 0..20 {
        let batch: Vec<Value> = (0..5)
            .map(|j| event(&format!("user-{j}"), &format!("load-{i}-{j}")))
            .collect();
        post_batch(&server, &batch);
        std::thread::sleep(Duration::from_millis(200));
    }

    // Mode, readiness and storage.
    assert_eq!(browser.text("#mode"), "NORMAL");
    assert_eq!(browser.text("#ready"), "ready");
    assert!(
        browser.text("#storage-detail").contains("quota"),
        "{}",
        browser.text("#storage-detail")
    );
    // Every destination, with its backlog and dead letters.
    assert!(wait_for(10, || {
        browser.text("tr[data-destination='hook'] td.dead") == BAD.to_string()
    }));
    for id in ["hook", "slow-crm", "archive"] {
        let row = format!("tr[data-destination='{id}']");
        assert!(browser.visible(&row), "no row for {id}");
        assert!(!browser.text(&format!("{row} td.backlog")).is_empty());
        assert!(!browser.text(&format!("{row} td.dead")).is_empty());
    }
    // slow-crm answers 503 to everything: its backlog stays and grows.
    assert!(
        wait_for(10, || browser
            .text("tr[data-destination='slow-crm'] td.backlog")
            != "0"),
        "{}",
        browser.text("tr[data-destination='slow-crm']")
    );
    assert_eq!(browser.text("tr[data-destination='archive'] td.dead"), "0");
    // ... and the age of its oldest event waiting.
    assert!(
        wait_for(10, || browser
            .text("tr[data-destination='slow-crm'] td.oldest")
            .ends_with(" s")),
        "{}",
        browser.text("tr[data-destination='slow-crm'] td.oldest")
    );
    // The delivery request latency of the destination that takes events.
    assert!(
        wait_for(10, || browser
            .text("tr[data-destination='hook'] td.latency")
            .contains(" / ")),
        "{}",
        browser.text("tr[data-destination='hook']")
    );
    // ... and its delivery lag (accepted → delivered).
    assert!(
        wait_for(10, || browser
            .text("tr[data-destination='hook'] td.lag")
            .contains(" / ")),
        "{}",
        browser.text("tr[data-destination='hook']")
    );
    // The charts: eight SVGs with a line per destination.
    assert!(
        wait_for(10, || browser.js(
            "return document.querySelectorAll('#charts svg.chart').length === 8 \
             && document.querySelectorAll('#charts svg.chart path.series').length >= 12"
        ) == true),
        "{}",
        browser.js("return document.getElementById('charts').innerHTML.length")
    );
    assert!(browser.text("#history-detail").contains("every 1 s"));
    browser.screenshot(&artifact("status-page.png"));

    // The dead letters of hook, with their reasons.
    browser.click("tr[data-destination='hook'] button");
    assert!(wait_for(10, || browser.js(
        "return document.querySelectorAll('#dead-letters tr.dead-letter').length"
    ) == BAD));
    let reason = browser.text("#dead-letters tr.dead-letter td.reason");
    assert!(!reason.is_empty(), "no reason shown");
    assert_eq!(
        browser.text("#dead-letters tr.dead-letter td.status"),
        "400",
        "{reason}"
    );
    browser.screenshot(&artifact("dead-letters.png"));

    // Replay asks first; cancelling does nothing.
    refuse.store(false, Ordering::SeqCst);
    browser.click("#replay-all");
    assert!(browser.visible("#confirm"));
    assert!(browser.text("#confirm-text").contains("hook"));
    browser.click("#confirm-no");
    assert!(!browser.visible("#confirm"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(dead_count(&server, "hook"), BAD, "cancelled, yet replayed");
    // Replay since a time: none died after tomorrow, so nothing moves.
    browser.js(
        "const t = new Date(Date.now() + 86400e3); t.setSeconds(0, 0); \
         const p = (n) => String(n).padStart(2, '0'); \
         document.getElementById('replay-since').value = \
           `${t.getFullYear()}-${p(t.getMonth() + 1)}-${p(t.getDate())}T${p(t.getHours())}:${p(t.getMinutes())}:00`;",
    );
    browser.click("#replay-since-button");
    assert!(browser.text("#confirm-text").contains("since"));
    browser.click("#confirm-yes");
    assert!(
        wait_for(10, || browser
            .text("#replay-result")
            .contains("0 dead letter(s) of hook re-enqueued")),
        "{}",
        browser.text("#replay-result")
    );
    assert_eq!(dead_count(&server, "hook"), BAD);
    // Confirmed: every dead letter is delivered to the hook, which now takes them.
    browser.click("#replay-all");
    assert!(browser.visible("#confirm"));
    browser.click("#confirm-yes");
    let want: HashSet<String> = (0..BAD).map(|i| format!("bad-{i}")).collect();
    assert!(
        wait_for(20, || want.is_subset(&rx.ok_ids())),
        "not re-delivered: {:?}",
        want.difference(&rx.ok_ids()).collect::<Vec<_>>()
    );
    assert!(wait_for(10, || browser
        .text("#replay-result")
        .contains(&format!("{BAD} dead letter(s) of hook re-enqueued"))));
    assert_eq!(dead_count(&server, "hook"), 0);
    assert!(wait_for(10, || browser
        .text("tr[data-destination='hook'] td.dead")
        == "0"));

    // The mode: cancel, then degraded, then back to normal; the API agrees each time.
    assert_eq!(browser.text("#mode-switch"), "Switch to degraded");
    browser.click("#mode-switch");
    browser.click("#confirm-no");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(admin_get(&server, "/v1/mode")["mode"], "NORMAL");
    browser.click("#mode-switch");
    assert!(browser.text("#confirm-text").contains("DEGRADED"));
    browser.click("#confirm-yes");
    assert!(wait_for(10, || browser.text("#mode") == "DEGRADED"));
    let mode = admin_get(&server, "/v1/mode");
    assert_eq!(
        (mode["mode"].as_str(), mode["reason"].as_str()),
        (Some("DEGRADED"), Some("operator"))
    );
    assert!(
        wait_for(10, || browser.text("#alerts").contains("degraded")),
        "{}",
        browser.text("#alerts")
    );
    assert!(browser.text("#mode-detail").contains("operator"));
    browser.screenshot(&artifact("degraded.png"));
    browser.click("#mode-switch");
    browser.click("#confirm-yes");
    assert!(wait_for(10, || browser.text("#mode") == "NORMAL"));
    assert_eq!(admin_get(&server, "/v1/mode")["mode"], "NORMAL");

    // Nothing left 127.0.0.1: neither what the page loaded nor what Chromium sent.
    let origin = server.admin.clone();
    let entries = browser.js(
        "return performance.getEntries().filter(e => e.name && e.name.includes('://')).map(e => e.name)",
    );
    let entries: Vec<String> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        entries.iter().any(|u| u.contains("/v1/status")),
        "{entries:?}"
    );
    for u in &entries {
        assert!(u.starts_with(&format!("{origin}/")), "a request to {u}");
    }
    let sent = browser.requested_urls();
    assert!(sent.iter().any(|u| u.contains("/v1/history")), "{sent:?}");
    for u in &sent {
        assert!(
            u.starts_with("http://127.0.0.1:") || u.starts_with("data:"),
            "Chromium sent a request to {u}"
        );
    }
    // No console error, uncaught error or CSP violation.
    assert_eq!(browser.js("return window.__errors"), json!([]));
    let severe: Vec<Value> = browser
        .browser_log()
        .into_iter()
        .filter(|e| e["level"] == "SEVERE")
        .collect();
    assert!(severe.is_empty(), "console errors: {severe:?}");
}

#[test]
fn without_a_token_another_site_cannot_act_through_the_browser() {
    let server = Server::start(&common::config(""));
    let http = common::client();
    let admin = server.admin.clone();
    // Another site's page posting to the loopback admin API (a form needs no preflight).
    let r = http
        .post(format!("{admin}/v1/dead-letters/replay?destination=x"))
        .header("Origin", "https://evil.example")
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(format!("{admin}/v1/mode"))
        .header("Origin", "https://evil.example")
        .json(&json!({ "mode": "degraded" }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(admin_get(&server, "/v1/mode")["mode"], "NORMAL");
    // Its name rebound to 127.0.0.1 (DNS rebinding): refused, reads too.
    let r = http
        .get(format!("{admin}/v1/dead-letters"))
        .header("Host", "evil.example")
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    // The page's own origin, and the CLI (no Origin), are served.
    let r = http
        .post(format!("{admin}/v1/mode"))
        .header("Origin", admin.as_str())
        .json(&json!({ "mode": "normal" }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let out = std::process::Command::new(common::bin())
        .args(["mode", "--admin", &admin])
        .env_remove("BALLAST_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn with_an_admin_token_the_page_asks_for_it_and_every_data_call_needs_it() {
    const TOKEN: &str = "page-s3cret";
    let server = Server::start_in(
        Arc::new(tempfile::tempdir().unwrap()),
        &common::config(""),
        &[("BALLAST_SERVER__ADMIN_TOKEN", TOKEN)],
    );
    let http = common::client();
    // The page and its assets hold no data: open. Every data call: the token.
    for path in ["/", "/ui/app.js", "/ui/app.css"] {
        let r = http.get(format!("{}{path}", server.admin)).send().unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("connect-src 'self'"));
    }
    for path in [
        "/v1/status",
        "/v1/mode",
        "/v1/history",
        "/v1/alerts",
        "/v1/dead-letters",
    ] {
        let r = http.get(format!("{}{path}", server.admin)).send().unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let r = http
            .get(format!("{}{path}", server.admin))
            .bearer_auth(TOKEN)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let r = http
        .post(format!("{}/v1/mode", server.admin))
        .json(&json!({ "mode": "degraded" }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    // Only the exact static paths are open.
    for path in ["/ui/", "/ui/other.js", "/v1/status/"] {
        let r = http.get(format!("{}{path}", server.admin)).send().unwrap();
        assert_ne!(r.status(), 200, "{path}");
    }

    let browser = Browser::start();
    browser.goto(&format!("{}/?refresh=1", server.admin));
    assert!(wait_for(10, || browser.visible("#token-panel")));
    assert!(!browser.visible("#main"));
    // A wrong token is refused and said so.
    browser.type_into("#token-input", "wrong");
    browser.click("#token-save");
    assert!(wait_for(10, || browser
        .text("#token-error")
        .contains("refused")));
    // The right one: the page shows the server, and keeps the token for the tab only.
    browser.type_into("#token-input", TOKEN);
    browser.click("#token-save");
    assert!(wait_for(10, || browser.text("#mode") == "NORMAL"));
    assert!(!browser.visible("#token-panel"));
    assert_eq!(
        browser.js("return sessionStorage.getItem('ballast-admin-token')"),
        TOKEN
    );
    assert_eq!(browser.js("return localStorage.length"), 0);
    // The mode switch goes through with the token.
    browser.click("#mode-switch");
    browser.click("#confirm-yes");
    assert!(wait_for(10, || browser.text("#mode") == "DEGRADED"));
    let r: Value = http
        .get(format!("{}/v1/mode", server.admin))
        .bearer_auth(TOKEN)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(r["mode"], "DEGRADED");
    assert_eq!(browser.js("return window.__errors"), json!([]));
}
