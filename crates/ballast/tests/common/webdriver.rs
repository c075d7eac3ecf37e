//! chromedriver + headless Chromium over W3C WebDriver, offline (Debian's `chromium` and
//! `chromium-driver`; `scripts/test` installs them): the flags keep Chromium from
//! reaching out to the network, every page gets an error watcher (`window.__errors`), and
//! Chromium's browser and performance (network) logs are kept. Used by the browser tests.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::{free_port, wait_for};

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::blocking::Client,
}

pub fn find(names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(n))
                .find(|p| p.is_file())
                .map(|p| p.display().to_string())
        })
    })
}

/// Installed in every page before its own scripts: collects console errors, uncaught
/// errors, rejected promises and Content-Security-Policy violations.
const WATCH_ERRORS: &str = r#"
window.__errors = [];
const __origError = console.error.bind(console);
console.error = (...a) => { window.__errors.push('console.error: ' + a.map(String).join(' ')); __origError(...a); };
window.addEventListener('error', (e) => window.__errors.push('error: ' + (e.message || e.type)));
window.addEventListener('unhandledrejection', (e) => window.__errors.push('unhandled rejection: ' + String(e.reason)));
document.addEventListener('securitypolicyviolation', (e) => window.__errors.push('CSP: ' + e.blockedURI + ' ' + e.violatedDirective));
"#;

impl Browser {
    pub fn start() -> Browser {
        let driver_bin = find(&["chromedriver"]).expect(
            "chromedriver not found: install Debian's chromium and chromium-driver (scripts/test does)",
        );
        let chromium = find(&["chromium", "chromium-browser", "google-chrome"])
            .expect("chromium not found: install Debian's chromium (scripts/test does)");
        let port = free_port();
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .no_proxy()
            .build()
            .unwrap();
        let mut browser = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            http,
        };
        assert!(
            wait_for(20, || browser
                .http
                .get(format!("{}/status", browser.base))
                .send()
                .ok()
                .and_then(|r| r.json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"] == true)),
            "chromedriver did not become ready"
        );
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": { "browser": "ALL", "performance": "ALL" },
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--disable-default-apps",
                         "--hide-scrollbars", "--force-device-scale-factor=1"]
            }
        }}});
        let r: Value = browser
            .http
            .post(format!("{}/session", browser.base))
            .json(&caps)
            .send()
            .and_then(|r| r.json())
            .expect("create a WebDriver session");
        browser.session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {r}"))
            .to_string();
        browser.cmd(
            "goog/cdp/execute",
            json!({ "cmd": "Page.addScriptToEvaluateOnNewDocument", "params": { "source": WATCH_ERRORS } }),
        );
        browser.cmd(
            "window/rect",
            json!({ "x": 0, "y": 0, "width": 1440, "height": 1900 }),
        );
        browser
    }

    pub fn cmd(&self, path: &str, body: Value) -> Value {
        let r: Value = self
            .http
            .post(format!("{}/session/{}/{path}", self.base, self.session))
            .json(&body)
            .send()
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        if r["value"]["error"].is_string() {
            panic!("{path}: {r}");
        }
        r["value"].clone()
    }

    pub fn get(&self, path: &str) -> Value {
        let r: Value = self
            .http
            .get(format!("{}/session/{}/{path}", self.base, self.session))
            .send()
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        if r["value"]["error"].is_string() {
            panic!("{path}: {r}");
        }
        r["value"].clone()
    }

    /// Closes the current window (tab), as a user would; switch to another one after.
    pub fn close_window(&self) {
        let _ = self
            .http
            .delete(format!("{}/session/{}/window", self.base, self.session))
            .send();
    }

    pub fn goto(&self, url: &str) {
        self.cmd("url", json!({ "url": url }));
    }

    pub fn js(&self, script: &str) -> Value {
        self.cmd("execute/sync", json!({ "script": script, "args": [] }))
    }

    /// A real click (WebDriver's element click) on the first element matching `css`.
    pub fn click(&self, css: &str) {
        let el = self.cmd("element", json!({ "using": "css selector", "value": css }));
        let id = el
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("no element {css}: {el}"))
            .to_string();
        self.cmd(&format!("element/{id}/click"), json!({}));
    }

    /// Types into the element matching `css` (WebDriver's element send keys).
    pub fn type_into(&self, css: &str, text: &str) {
        let el = self.cmd("element", json!({ "using": "css selector", "value": css }));
        let id = el
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("no element {css}: {el}"))
            .to_string();
        self.cmd(&format!("element/{id}/value"), json!({ "text": text }));
    }

    pub fn text(&self, css: &str) -> String {
        let css = serde_json::to_string(css).unwrap();
        self.js(&format!(
            "const e = document.querySelector({css}); return e ? e.textContent : null"
        ))
        .as_str()
        .unwrap_or("")
        .to_string()
    }

    pub fn visible(&self, css: &str) -> bool {
        let css = serde_json::to_string(css).unwrap();
        self.js(&format!(
            "const e = document.querySelector({css}); return !!e && e.getClientRects().length > 0"
        )) == true
    }

    /// Saves a PNG of the viewport.
    pub fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine;
        let b64 = self.get("screenshot");
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("screenshot data"))
            .expect("screenshot base64");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }

    /// Chromium's own log entries (console messages, failed loads) since the last call.
    pub fn browser_log(&self) -> Vec<Value> {
        self.cmd("se/log", json!({ "type": "browser" }))
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The URLs of the network requests Chromium sent (the DevTools performance log).
    pub fn requested_urls(&self) -> Vec<String> {
        let entries = self.cmd("se/log", json!({ "type": "performance" }));
        let mut urls = Vec::new();
        for e in entries.as_array().into_iter().flatten() {
            let Some(msg) = e["message"]
                .as_str()
                .and_then(|m| serde_json::from_str::<Value>(m).ok())
            else {
                continue;
            };
            if msg["message"]["method"] == "Network.requestWillBeSent" {
                if let Some(u) = msg["message"]["params"]["request"]["url"].as_str() {
                    urls.push(u.to_string());
                }
            }
        }
        urls
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self
                .http
                .delete(format!("{}/session/{}", self.base, self.session))
                .send();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
