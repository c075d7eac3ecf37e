//! RudderStack's JavaScript SDK (`@rudderstack/analytics-js`, bundled build, pinned) in a
//! real headless Chromium, against a ballast that goes down and comes back (the SDKs work
//! unchanged, docs/API.md): the events tracked while the server is down are kept in the
//! page's queue (localStorage) and retried until they are all stored.
//!
//! Needs `chromium` and `chromedriver` (Debian: `chromium`, `chromium-driver`; `.ci/run`
//! and `scripts/test` install them) and `npm` (the SDK is installed from the registry
//! into the target directory on first use).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::free_port;
use common::receiver::Background;
use common::webdriver::Browser;
use common::{wait_for, Server, WRITE_KEY};

const SDK_PACKAGE: &str = "@rudderstack/analytics-js@3.34.1";
const SDK_FILE: &str =
    "node_modules/@rudderstack/analytics-js/dist/npm/modern/bundled/umd/index.js";

/// The SDK's bundled UMD build, installed once into `target/tmp`.
fn sdk_js() -> &'static Path {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = PATH.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-sdk");
        let file = dir.join(SDK_FILE);
        if file.exists() {
            return Ok(file);
        }
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let out = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
            .arg(&dir)
            .arg(SDK_PACKAGE)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("npm: {e}"))?;
        if !out.status.success() || !file.exists() {
            return Err(format!(
                "npm install {SDK_PACKAGE} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(file)
    });
    r.as_deref()
        .unwrap_or_else(|e| panic!("installing the JS SDK: {e}"))
}

/// A static file server on 127.0.0.1 for the test page and the SDK (another origin
/// than ballast's, as on a real site): (path, content type, body). Stops when dropped.
fn static_site(files: Vec<(&'static str, &'static str, Vec<u8>)>) -> Background {
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

/// chromedriver driving a headless Chromium, through the W3C WebDriver protocol.
/// The page: loads the SDK against ballast, with fast retries, and exposes `send(n)`.
fn page(ballast: &str) -> String {
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>ballast browser test</title>
<script src="/sdk.js"></script>
<script>
  window.loaded = false;
  window.errors = [];
  window.addEventListener('error', (e) => window.errors.push(String(e.message)));
  const ra = new rudderanalytics.RudderAnalytics();
  ra.load("{WRITE_KEY}", "{ballast}", {{
    configUrl: "{ballast}",
    logLevel: "ERROR",
    loadIntegration: false,
    queueOptions: {{ minRetryDelay: 200, maxRetryDelay: 1000, backoffFactor: 2, maxAttempts: 1000, maxItems: 1000 }},
    onLoaded: () => {{ window.loaded = true; }},
  }});
  ra.identify("browser-user", {{ plan: "pro" }});
  window.send = (from, to) => {{
    for (let i = from; i < to; i++) ra.track("Browser Event", {{ i }});
  }};
</script></head><body>ballast</body></html>"#
    )
}

/// The `properties.i` of the stored "Browser Event"s.
fn stored_indexes(server: &Server) -> Vec<i64> {
    server
        .dump()
        .iter()
        .filter(|e| e["event"] == "Browser Event")
        .filter_map(|e| e["properties"]["i"].as_i64())
        .collect()
}

#[test]
fn js_sdk_keeps_events_while_the_server_is_down_and_delivers_them_when_it_is_back() {
    let sdk = std::fs::read(sdk_js()).unwrap();
    let port = free_port();
    let ballast = format!("http://127.0.0.1:{port}");
    let config = common::config("").replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
        1,
    );
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut server = Server::start_in(dir.clone(), &config, &[]);
    let site = static_site(vec![
        ("/", "text/html", page(&ballast).into_bytes()),
        ("/sdk.js", "application/javascript", sdk),
    ]);
    let browser = Browser::start();
    browser.goto(&format!("http://127.0.0.1:{}/", site.port()));
    assert!(
        wait_for(20, || browser.js("return window.loaded") == true),
        "the SDK did not load: {}",
        browser.js("return window.errors")
    );

    // Online: delivered.
    browser.js("window.send(0, 5)");
    assert!(
        wait_for(20, || stored_indexes(&server).len() >= 5),
        "{:?}",
        stored_indexes(&server)
    );

    // The server goes away; the page goes on tracking.
    assert!(server.terminate().success());
    drop(server);
    browser.js("window.send(5, 25)");
    // Let it fail and retry a few times while nothing listens.
    std::thread::sleep(Duration::from_millis(1500));
    let queued =
        browser.js("return Object.keys(localStorage).filter(k => k.includes('queue')).length");
    assert!(
        queued.as_u64().unwrap_or(0) > 0,
        "nothing queued in localStorage: {queued}"
    );

    // Back on the same address, with the same data: everything arrives.
    let server = Server::start_in(dir.clone(), &config, &[]);
    let want: Vec<i64> = (0..25).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = stored_indexes(&server);
    while Instant::now() < deadline {
        got = stored_indexes(&server);
        got.sort_unstable();
        got.dedup();
        if got == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        got, want,
        "events tracked while the server was down were lost"
    );
    let identify = server
        .dump()
        .into_iter()
        .find(|e| e["type"] == "identify")
        .expect("the identify call");
    assert_eq!(identify["userId"], "browser-user");
    assert_eq!(
        identify["context"]["library"]["name"],
        "RudderLabs JavaScript SDK"
    );
}
