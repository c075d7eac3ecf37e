#![cfg(feature = "failpoints")]
//! High availability through the real binary (docs/OPERATIONS.md, "Running modes",
//! "Crash loops and poison events" and "Alerts"): a supervisor restarts the process whenever it exits, like
//! Kubernetes would, while fault-injection points make it abort or panic. Mock PagerDuty
//! and VictorOps endpoints check the documented alert fields; a mock webhook destination
//! records what is delivered.
//!
//! - a poison event is quarantined after `poison_threshold` crashes, the rest delivered
//!   in per-user order, the server stays in normal mode;
//! - a crash loop puts the server in degraded mode (accept and store, forward nothing),
//!   across a clean restart, until an operator switches it back: then the backlog is
//!   delivered in order and the alert is resolved;
//! - clean restarts never count as crashes, nor do crashes further apart than
//!   `crash_window`;
//! - an alert endpoint that is down gets each alert exactly once when it recovers;
//! - ingestion availability during a crash loop (figures printed);
//! - a panicking destination task is caught, the process stays up.
//!
//!
//! Run: `cargo test -p ballast --features failpoints --test high_availability`.

mod common;

use std::collections::HashSet;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::receiver::Background;
use common::{
    check_user_order, deliveries_of, event, mid, ordering_key, wait_for, Server, WRITE_KEY,
};
use serde_json::{json, Value};

/// Names this server in alerts, so dedup keys are known in advance.
const ALERT_SOURCE: &str = "ha-test";
const PD_ROUTING_KEY: &str = "R";
const VO_API_KEY: &str = "A";
const VO_ROUTING_KEY: &str = "K";
const SIGABRT: i32 = 6;

// ---------------------------------------------------------------------------------------
// Mock HTTP endpoints (PagerDuty, VictorOps, webhook destination)
// ---------------------------------------------------------------------------------------

/// One request a mock received.
#[derive(Debug, Clone)]
struct Hit {
    path: String,
    body: Value,
    /// The status it answered.
    status: u16,
    /// What was wrong with the request (empty: valid). Invalid requests get 400.
    problems: Vec<String>,
}

impl Hit {
    fn accepted(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Checks one request: (method, path, JSON body) → problems.
type Check = fn(&str, &str, &Value) -> Vec<String>;

#[derive(Clone)]
struct MockState {
    hits: Arc<Mutex<Vec<Hit>>>,
    unavailable: Arc<AtomicBool>,
    check: Check,
    ok: u16,
}

async fn mock_handle(
    axum::extract::State(s): axum::extract::State<MockState>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (body, mut problems) = match serde_json::from_slice::<Value>(&body) {
        Ok(v) => (v, Vec::new()),
        Err(e) => (
            Value::String(String::from_utf8_lossy(&body).into_owned()),
            vec![format!("body is not JSON: {e}")],
        ),
    };
    problems.extend((s.check)(method.as_str(), uri.path(), &body));
    let status = if !problems.is_empty() {
        400
    } else if s.unavailable.load(Ordering::SeqCst) {
        503
    } else {
        s.ok
    };
    s.hits.lock().unwrap().push(Hit {
        path: uri.path().to_string(),
        body,
        status,
        problems: problems.clone(),
    });
    let code = axum::http::StatusCode::from_u16(status).unwrap();
    let answer = match status {
        400 => json!({ "status": "invalid event", "errors": problems }),
        503 => json!({ "status": "unavailable" }),
        _ => json!({ "status": "success", "message": "Event processed" }),
    };
    (code, axum::Json(answer)).into_response()
}

/// A validating HTTP endpoint (PagerDuty, VictorOps, a webhook destination) on 127.0.0.1.
struct Mock {
    hits: Arc<Mutex<Vec<Hit>>>,
    unavailable: Arc<AtomicBool>,
    server: Background,
}

impl Mock {
    fn start(check: Check, ok: u16) -> Mock {
        let state = MockState {
            hits: Arc::new(Mutex::new(Vec::new())),
            unavailable: Arc::new(AtomicBool::new(false)),
            check,
            ok,
        };
        let (hits, unavailable) = (state.hits.clone(), state.unavailable.clone());
        let app = axum::Router::new().fallback(mock_handle).with_state(state);
        Mock {
            hits,
            unavailable,
            server: Background::start(app),
        }
    }

    fn pagerduty() -> Mock {
        Mock::start(check_pagerduty, 202)
    }

    fn victorops() -> Mock {
        Mock::start(check_victorops, 200)
    }

    fn webhook() -> Mock {
        Mock::start(check_webhook, 200)
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.port())
    }

    /// Answers 503 to every valid request while set.
    fn set_unavailable(&self, down: bool) {
        self.unavailable.store(down, Ordering::SeqCst);
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Bodies of the accepted requests, in arrival order.
    fn accepted(&self) -> Vec<Value> {
        self.hits()
            .into_iter()
            .filter(Hit::accepted)
            .map(|h| h.body)
            .collect()
    }

    /// Every problem found in any request so far.
    fn problems(&self) -> Vec<String> {
        self.hits()
            .into_iter()
            .flat_map(|h| {
                let path = h.path.clone();
                h.problems.into_iter().map(move |p| format!("{path}: {p}"))
            })
            .collect()
    }

    /// Events the destination accepted, in arrival order (duplicates kept).
    fn events(&self) -> Vec<Value> {
        self.accepted()
            .into_iter()
            .flat_map(|b| match b {
                Value::Array(items) => items,
                other => vec![other],
            })
            .collect()
    }

    fn delivered_ids(&self) -> HashSet<String> {
        self.events().iter().map(|e| mid(e).to_string()).collect()
    }
}

fn non_empty_str(v: &Value, name: &str, problems: &mut Vec<String>) {
    match v.as_str() {
        Some(s) if !s.trim().is_empty() => {}
        _ => problems.push(format!("{name} must be a non-empty string, got {v}")),
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// PagerDuty Events API v2 (`POST /v2/enqueue`), as documented.
fn check_pagerduty(method: &str, path: &str, b: &Value) -> Vec<String> {
    let mut p = Vec::new();
    if method != "POST" || path != "/v2/enqueue" {
        p.push(format!("expected POST /v2/enqueue, got {method} {path}"));
    }
    if b["routing_key"] != PD_ROUTING_KEY {
        p.push(format!("routing_key: {}", b["routing_key"]));
    }
    let action = b["event_action"].as_str().unwrap_or("");
    if !["trigger", "acknowledge", "resolve"].contains(&action) {
        p.push(format!("event_action: {}", b["event_action"]));
    }
    non_empty_str(&b["dedup_key"], "dedup_key", &mut p);
    if b["dedup_key"].as_str().is_some_and(|k| k.len() > 255) {
        p.push("dedup_key longer than 255 characters".into());
    }
    if action == "trigger" {
        let pl = &b["payload"];
        non_empty_str(&pl["summary"], "payload.summary", &mut p);
        if pl["summary"].as_str().is_some_and(|s| s.len() > 1024) {
            p.push("payload.summary longer than 1024 characters".into());
        }
        non_empty_str(&pl["source"], "payload.source", &mut p);
        let sev = pl["severity"].as_str().unwrap_or("");
        if !["critical", "error", "warning", "info"].contains(&sev) {
            p.push(format!("payload.severity: {}", pl["severity"]));
        }
        match pl["timestamp"].as_str().map(humantime::parse_rfc3339_weak) {
            Some(Ok(t)) => {
                let at = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
                if at.abs_diff(now_s()) > 3600 {
                    p.push(format!(
                        "payload.timestamp far from now: {}",
                        pl["timestamp"]
                    ));
                }
            }
            _ => p.push(format!(
                "payload.timestamp not ISO 8601: {}",
                pl["timestamp"]
            )),
        }
        for k in ["component", "group", "class"] {
            if !pl[k].is_null() && !pl[k].is_string() {
                p.push(format!("payload.{k} must be a string"));
            }
        }
        if !pl["custom_details"].is_null() && !pl["custom_details"].is_object() {
            p.push("payload.custom_details must be an object".into());
        }
    }
    p
}

/// VictorOps REST endpoint, as documented.
fn check_victorops(method: &str, path: &str, b: &Value) -> Vec<String> {
    let mut p = Vec::new();
    let want = format!("/integrations/generic/20131114/alert/{VO_API_KEY}/{VO_ROUTING_KEY}");
    if method != "POST" || path != want {
        p.push(format!("expected POST {want}, got {method} {path}"));
    }
    let t = b["message_type"].as_str().unwrap_or("");
    if !["CRITICAL", "WARNING", "INFO", "ACKNOWLEDGEMENT", "RECOVERY"].contains(&t) {
        p.push(format!("message_type: {}", b["message_type"]));
    }
    non_empty_str(&b["entity_id"], "entity_id", &mut p);
    non_empty_str(&b["entity_display_name"], "entity_display_name", &mut p);
    non_empty_str(&b["state_message"], "state_message", &mut p);
    match b["timestamp"].as_u64() {
        Some(ts) if ts.abs_diff(now_s()) <= 3600 => {}
        _ => p.push(format!(
            "timestamp must be epoch seconds, got {}",
            b["timestamp"]
        )),
    }
    p
}

/// The webhook destination: events (or arrays of events) with a messageId.
fn check_webhook(method: &str, path: &str, b: &Value) -> Vec<String> {
    let mut p = Vec::new();
    if method != "POST" || path != "/ingest" {
        p.push(format!("expected POST /ingest, got {method} {path}"));
    }
    let events = match b {
        Value::Array(items) => items.clone(),
        other => vec![other.clone()],
    };
    for e in &events {
        non_empty_str(&e["messageId"], "messageId", &mut p);
    }
    p
}

// ---------------------------------------------------------------------------------------
// Configuration, processes, the supervisor
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Ports {
    public: u16,
    admin: u16,
}

impl Ports {
    /// Fixed loopback ports, so that clients keep one address across restarts (like a
    /// Kubernetes Service): while the process is down they get "connection refused".
    fn pick() -> Ports {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Ports {
            public: a.local_addr().unwrap().port(),
            admin: b.local_addr().unwrap().port(),
        }
    }
    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.public)
    }
    fn admin(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin)
    }
}

/// A webhook destination `hook` to `receiver`, retrying fast and (almost) forever, plus
/// PagerDuty and VictorOps alerts to the mocks, plus `extra`.
fn ha_config(receiver: Option<&Mock>, pd: &Mock, vo: &Mock, extra: &str) -> String {
    let dest = receiver
        .map(|r| {
            format!(
                r#"
[[destinations]]
id = "hook"
type = "webhook"
sources = ["web"]
url = "{}/ingest"
retry = {{ max_attempts = 1000000, retry_window = "1h", min_backoff = "20ms", max_backoff = "200ms" }}
"#,
                r.base()
            )
        })
        .unwrap_or_default();
    common::config(&format!(
        r#"
{dest}
{extra}

[alerts]
source = "{ALERT_SOURCE}"

[alerts.pagerduty]
routing_key = "{PD_ROUTING_KEY}"
base_url = "{}"

[alerts.victorops]
api_key = "{VO_API_KEY}"
routing_key = "{VO_ROUTING_KEY}"
base_url = "{}"
"#,
        pd.base(),
        vo.base()
    ))
}

/// The binary, with the `failpoints` feature compiled in. Other cargo commands sharing
/// the target directory may re-link `target/debug/ballast` to a build without the
/// feature at any moment; a hard link taken once (checked) keeps this run's binary.
fn ballast_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_BIN_EXE_ballast"));
        let dst = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ballast-high-availability");
        let _ = std::fs::remove_file(&dst);
        if std::fs::hard_link(src, &dst).is_err() && !dst.exists() {
            std::fs::copy(src, &dst).expect("copy the ballast binary");
        }
        // With the feature, an invalid FAILPOINTS spec makes it panic at start.
        let out = Command::new(&dst)
            .arg("--version")
            .env("FAILPOINTS", "ha-test::probe=no-such-action")
            .output()
            .expect("run ballast");
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("unable to configure failpoint"),
            "{} was built without the `failpoints` feature (a concurrent cargo build without \
             it may have re-linked it); run again",
            src.display()
        );
        dst
    })
}

/// Spawns `ballast serve` on the directory (as `Server::start_in` does) on fixed ports,
/// without waiting for it.
fn spawn(
    dir: &Arc<tempfile::TempDir>,
    config: &str,
    env: &[(String, String)],
    ports: Ports,
) -> Server {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let args = [
        "--listen".to_string(),
        format!("127.0.0.1:{}", ports.public),
        "--admin-listen".to_string(),
        format!("127.0.0.1:{}", ports.admin),
    ];
    let mut server = Server::spawn(ballast_bin(), dir.clone(), config, &env, &args);
    server.base = ports.base();
    server.admin = ports.admin();
    server
}

/// True when `server.json` names this process.
fn listening(server: &Server) -> bool {
    let Some(pid) = server.child.as_ref().map(|c| c.id()) else {
        return false;
    };
    std::fs::read_to_string(server.data_dir().join("server.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| v["pid"].as_u64() == Some(pid as u64))
}

/// Spawns and waits until it listens; panics if it exits first.
fn start(
    dir: &Arc<tempfile::TempDir>,
    config: &str,
    env: &[(String, String)],
    ports: Ports,
) -> Server {
    let mut server = spawn(dir, config, env, ports);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !listening(&server) {
        if let Some(status) = server.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
            panic!("ballast exited early with {status}:\n{}", server.stderr());
        }
        assert!(
            Instant::now() < deadline,
            "ballast did not start:\n{}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    server
}

fn failpoints(spec: &str) -> Vec<(String, String)> {
    vec![("FAILPOINTS".to_string(), spec.to_string())]
}

#[derive(Default)]
struct SupShared {
    stop: AtomicBool,
    current: Mutex<Option<Server>>,
    starts: AtomicUsize,
    exits: Mutex<Vec<ExitStatus>>,
    /// stderr of the processes that exited.
    log: Mutex<String>,
}

/// Restarts the process in the same directory whenever it exits (a bounded number of
/// times, within a bounded time), like Kubernetes restarting a pod.
struct Supervisor {
    shared: Arc<SupShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervisor {
    fn start(
        dir: &Arc<tempfile::TempDir>,
        config: &str,
        env: Vec<(String, String)>,
        ports: Ports,
        max_starts: usize,
    ) -> Supervisor {
        Supervisor::start_with_delay(
            dir,
            config,
            env,
            ports,
            max_starts,
            Duration::from_millis(50),
        )
    }

    /// `restart_delay`: how long it waits before starting again after an exit.
    fn start_with_delay(
        dir: &Arc<tempfile::TempDir>,
        config: &str,
        env: Vec<(String, String)>,
        ports: Ports,
        max_starts: usize,
        restart_delay: Duration,
    ) -> Supervisor {
        let shared = Arc::new(SupShared::default());
        let (sh, dir, config) = (shared.clone(), dir.clone(), config.to_string());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(90);
            while !sh.stop.load(Ordering::SeqCst)
                && sh.starts.load(Ordering::SeqCst) < max_starts
                && Instant::now() < deadline
            {
                *sh.current.lock().unwrap() = Some(spawn(&dir, &config, &env, ports));
                sh.starts.fetch_add(1, Ordering::SeqCst);
                // Watch it: it may die before or after it listens.
                loop {
                    if sh.stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                        return;
                    }
                    let exited = {
                        let mut cur = sh.current.lock().unwrap();
                        cur.as_mut()
                            .and_then(|s| s.child.as_mut())
                            .and_then(|c| c.try_wait().unwrap())
                    };
                    if let Some(status) = exited {
                        std::thread::sleep(Duration::from_millis(20)); // let stderr drain
                        if let Some(mut dead) = sh.current.lock().unwrap().take() {
                            dead.child = None;
                            let mut log = sh.log.lock().unwrap();
                            log.push_str(&format!("---- exited with {status} ----\n"));
                            log.push_str(&dead.stderr());
                        }
                        sh.exits.lock().unwrap().push(status);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                // Kubernetes would back off longer.
                std::thread::sleep(restart_delay);
            }
        });
        Supervisor {
            shared,
            thread: Some(thread),
        }
    }

    fn starts(&self) -> usize {
        self.shared.starts.load(Ordering::SeqCst)
    }

    fn exits(&self) -> Vec<ExitStatus> {
        self.shared.exits.lock().unwrap().clone()
    }

    /// The pid of the current process if it listens.
    fn listening_pid(&self) -> Option<u32> {
        let cur = self.shared.current.lock().unwrap();
        let s = cur.as_ref()?;
        listening(s).then(|| s.child.as_ref().map(|c| c.id()))?
    }

    /// Waits until one process has been listening for `stable` without exiting.
    fn wait_stable(&self, stable: Duration, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut since: Option<(u32, Instant)> = None;
        while Instant::now() < deadline {
            match (self.listening_pid(), since) {
                (Some(pid), Some((p, t))) if p == pid => {
                    if t.elapsed() >= stable {
                        return true;
                    }
                }
                (Some(pid), _) => since = Some((pid, Instant::now())),
                (None, _) => since = None,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// stderr of every process so far.
    fn logs(&self) -> String {
        let mut out = self.shared.log.lock().unwrap().clone();
        if let Some(s) = self.shared.current.lock().unwrap().as_ref() {
            out.push_str("---- running ----\n");
            out.push_str(&s.stderr());
        }
        out
    }

    /// Stops supervising; returns the running process.
    fn stop(mut self) -> Server {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let logs = self.logs();
        let server = self.shared.current.lock().unwrap().take();
        server.unwrap_or_else(|| panic!("no process is running:\n{logs}"))
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // The current Server (if any) kills its process when dropped.
        self.shared.current.lock().unwrap().take();
    }
}

fn aborted(s: &ExitStatus) -> bool {
    s.signal() == Some(SIGABRT)
}

// ---------------------------------------------------------------------------------------
// Events, clients, checks
// ---------------------------------------------------------------------------------------

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .unwrap()
}

/// Posts until it gets 200, retrying on connection errors and 503 (the server is
/// restarting), like an SDK; bounded in time. Panics on other answers.
fn post_until_acked(http: &reqwest::blocking::Client, base: &str, path: &str, body: &Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    for _ in 0..3000 {
        if Instant::now() > deadline {
            break;
        }
        match http
            .post(format!("{base}{path}"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(body)
            .send()
        {
            Ok(r) if r.status() == 200 => return,
            Ok(r) if r.status() == 503 => last = "503".into(),
            Ok(r) => panic!("{path}: unexpected {}: {:?}", r.status(), r.text()),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{path} never acknowledged: {last}");
}

/// Posts once; must be 200.
fn post_ok(http: &reqwest::blocking::Client, base: &str, path: &str, body: &Value) {
    let r = http
        .post(format!("{base}{path}"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(body)
        .send()
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let status = r.status();
    assert_eq!(status, 200, "{path}: {}", r.text().unwrap_or_default());
}

fn get_json(url: &str) -> Value {
    http()
        .get(url)
        .send()
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .json()
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// What a failing test prints: the server's status, what is stored, what was delivered.
fn diag(admin: &str, dir: &tempfile::TempDir, hook: &Mock) -> String {
    let status = http()
        .get(format!("{admin}/v1/status"))
        .send()
        .ok()
        .and_then(|r| r.json::<Value>().ok());
    let stored: Vec<String> = common::dump(&dir.path().join("data"))
        .iter()
        .map(|e| format!("{}/{}", ordering_key(e), mid(e)))
        .collect();
    let delivered: Vec<String> = hook
        .events()
        .iter()
        .map(|e| format!("{}/{}", ordering_key(e), mid(e)))
        .collect();
    format!("status: {status:?}\nstored: {stored:?}\ndelivered: {delivered:?}")
}

/// Waits (40 s nominal) until the supervised server listens and says DEGRADED.
fn comes_up_degraded(sup: &Supervisor, base: &str) -> bool {
    wait_for(40, || {
        sup.listening_pid().is_some()
            && http()
                .get(format!("{base}/health"))
                .send()
                .ok()
                .and_then(|r| r.json::<Value>().ok())
                .is_some_and(|h| h["mode"] == "DEGRADED")
    })
}

fn health(base: &str) -> Value {
    get_json(&format!("{base}/health"))
}

/// True when the dead letters hold `message_id`; false also when the server cannot be
/// asked (it may be between crash and restart under the supervisor).
fn quarantined(admin: &str, message_id: &str) -> bool {
    http()
        .get(format!("{admin}/v1/dead-letters?destination=hook"))
        .send()
        .ok()
        .and_then(|r| r.json::<Value>().ok())
        .and_then(|v| v.as_array().cloned())
        .is_some_and(|l| l.iter().any(|d| d["event"]["messageId"] == message_id))
}

fn dead_letters(admin: &str) -> Vec<Value> {
    get_json(&format!("{admin}/v1/dead-letters?destination=hook"))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// `ballast ARGS…`: (success, stdout, stderr).
fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args(args)
        .output()
        .expect("run ballast");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ballast mode --admin URL set MODE` (the form the CLI accepts; see
/// `cli_mode_set_takes_admin_after_the_subcommand`); returns stdout.
fn mode_set(admin: &str, mode: &str) -> String {
    let (ok, out, err) = cli(&["mode", "--admin", admin, "set", mode]);
    assert!(ok, "ballast mode set {mode} failed: {out}{err}");
    out
}

/// Alerts accepted by PagerDuty with this action and a dedup_key ending in `key`.
fn pd_accepted(pd: &Mock, action: &str, key: &str) -> Vec<Value> {
    pd.accepted()
        .into_iter()
        .filter(|b| b["event_action"] == action)
        .filter(|b| b["dedup_key"].as_str().is_some_and(|k| k.ends_with(key)))
        .collect()
}

/// Alerts accepted by VictorOps of this type whose entity_id ends in `key`.
fn vo_accepted(vo: &Mock, message_type: &str, key: &str) -> Vec<Value> {
    vo.accepted()
        .into_iter()
        .filter(|b| b["message_type"] == message_type)
        .filter(|b| b["entity_id"].as_str().is_some_and(|k| k.ends_with(key)))
        .collect()
}

fn assert_alerts_valid(pd: &Mock, vo: &Mock) {
    assert_eq!(pd.problems(), Vec::<String>::new(), "PagerDuty requests");
    assert_eq!(vo.problems(), Vec::<String>::new(), "VictorOps requests");
}

const DEGRADED_KEY: &str = "ballast/ha-test/degraded";

// ---------------------------------------------------------------------------------------
// 1. Poison event
// ---------------------------------------------------------------------------------------

/// 50 events of 5 users; the 21st (user u0) is "poison-1".
fn poison_events() -> Vec<Value> {
    (0..50)
        .map(|i| {
            let id = if i == 20 {
                "poison-1".to_string()
            } else {
                format!("e-{i}")
            };
            event(&format!("u{}", i % 5), &id)
        })
        .collect()
}

#[test]
fn poison_event_is_quarantined_after_three_crashes_and_the_rest_delivered_in_order() {
    let (pd, vo, hook) = (Mock::pagerduty(), Mock::victorops(), Mock::webhook());
    let config = ha_config(Some(&hook), &pd, &vo, "");
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let ports = Ports::pick();
    let sup = Supervisor::start(
        &dir,
        &config,
        failpoints("router::deliver=return(poison-1)"),
        ports,
        10,
    );
    assert!(sup.wait_stable(Duration::from_millis(200), Duration::from_secs(30)));
    let base = ports.base();
    let client = http();
    let events = poison_events();

    // Before the first crash: 20 events, delivered.
    for e in &events[..20] {
        post_ok(&client, &base, "/v1/track", e);
    }
    let first: HashSet<String> = events[..20].iter().map(|e| mid(e).to_string()).collect();
    assert!(
        wait_for(20, || first.is_subset(&hook.delivered_ids())),
        "{}",
        sup.logs()
    );
    // Let the router record them as finished (crash journal, cursor).
    std::thread::sleep(Duration::from_millis(400));
    // The poison event. The process may die before it answers; it is stored either way
    // (the router only reads durable events), so it is not re-sent.
    let poison_post = match client
        .post(format!("{base}/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&events[20])
        .send()
    {
        Ok(r) => r.status().to_string(),
        Err(e) => format!("{e:?}"),
    };
    // The rest while the supervisor restarts it: refused while it is down, then accepted.
    for e in &events[21..] {
        post_until_acked(&client, &base, "/v1/track", e);
    }

    let innocent: Vec<Value> = events
        .iter()
        .filter(|e| mid(e) != "poison-1")
        .cloned()
        .collect();
    let all: HashSet<String> = innocent.iter().map(|e| mid(e).to_string()).collect();
    assert!(
        wait_for(40, || sup.listening_pid().is_some()
            && quarantined(&ports.admin(), "poison-1")
            && all.is_subset(&hook.delivered_ids())),
        "not quarantined and delivered; poison post: {poison_post}; exits {:?}\n{}\n{}",
        sup.exits(),
        diag(&ports.admin(), &dir, &hook),
        sup.logs()
    );
    assert!(sup.wait_stable(Duration::from_secs(1), Duration::from_secs(10)));

    // Exactly poison_threshold crashes, each an abort by the failpoint.
    let exits = sup.exits();
    assert_eq!(exits.len(), 3, "{exits:?}\n{}", sup.logs());
    assert!(exits.iter().all(aborted), "{exits:?}");
    assert_eq!(sup.starts(), 4);
    let mut server = sup.stop();

    let letters = dead_letters(&server.admin);
    assert_eq!(letters.len(), 1, "only the poison event: {letters:#?}");
    assert_eq!(letters[0]["kind"], "poison");
    assert_eq!(letters[0]["event"]["messageId"], "poison-1");
    assert_eq!(letters[0]["event"]["userId"], "u0");
    assert!(
        letters[0]["reason"].as_str().unwrap().contains("3 crashes"),
        "{}",
        letters[0]
    );
    assert!(!hook.delivered_ids().contains("poison-1"));

    let h = health(&server.base);
    assert_eq!(h["mode"], "NORMAL", "{h}");
    assert_eq!(h["routingEvents"], "TRUE", "{h}");
    let mode = get_json(&format!("{}/v1/mode", server.admin));
    assert_eq!(mode["crashes_in_window"], 3, "{mode}");

    check_user_order(&innocent, &deliveries_of(&innocent, &hook.events())).unwrap();

    // The quarantine alert, once, with the documented fields.
    assert!(wait_for(10, || !pd_accepted(&pd, "trigger", "").is_empty()
        && !vo_accepted(&vo, "CRITICAL", "").is_empty()));
    std::thread::sleep(Duration::from_millis(300));
    let triggers = pd_accepted(&pd, "trigger", "");
    assert_eq!(triggers.len(), 1, "{triggers:#?}");
    let key = triggers[0]["dedup_key"].as_str().unwrap();
    assert!(key.contains("poison"), "{key}");
    assert!(
        triggers[0]["payload"]["summary"]
            .as_str()
            .unwrap()
            .contains("poison-1"),
        "{}",
        triggers[0]
    );
    let vo_crit = vo_accepted(&vo, "CRITICAL", "");
    assert_eq!(vo_crit.len(), 1, "{vo_crit:#?}");
    assert_eq!(vo_crit[0]["entity_id"], key);
    assert_alerts_valid(&pd, &vo);
    assert!(pd_accepted(&pd, "trigger", "/degraded").is_empty());

    assert!(server.terminate().success());
}

/// An SDK batch mixes users: the poison event goes out with other users' events, which
/// are in flight at every crash too. Only the poison event may be quarantined.
#[test]
fn poison_event_in_a_batch_with_other_users_quarantines_only_the_poison_event() {
    let (pd, vo, hook) = (Mock::pagerduty(), Mock::victorops(), Mock::webhook());
    let config = ha_config(Some(&hook), &pd, &vo, "");
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let ports = Ports::pick();
    let sup = Supervisor::start(
        &dir,
        &config,
        failpoints("router::deliver=return(poison-1)"),
        ports,
        10,
    );
    assert!(sup.wait_stable(Duration::from_millis(200), Duration::from_secs(30)));
    let base = ports.base();
    let client = http();
    let batch = vec![
        event("u1", "b-1"),
        event("u2", "b-2"),
        event("u0", "poison-1"),
        event("u3", "b-3"),
    ];
    let _ = client
        .post(format!("{base}/v1/batch"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({ "batch": batch }))
        .send();
    let after: Vec<Value> = (0..8)
        .map(|i| event(&format!("u{}", i % 4), &format!("a-{i}")))
        .collect();
    for e in &after {
        post_until_acked(&client, &base, "/v1/track", e);
    }
    let innocent: Vec<Value> = batch
        .iter()
        .chain(after.iter())
        .filter(|e| mid(e) != "poison-1")
        .cloned()
        .collect();
    let all: HashSet<String> = innocent.iter().map(|e| mid(e).to_string()).collect();
    let settled = wait_for(40, || {
        sup.listening_pid().is_some() && quarantined(&ports.admin(), "poison-1")
    });
    assert!(settled, "exits {:?}\n{}", sup.exits(), sup.logs());
    assert!(sup.wait_stable(Duration::from_secs(1), Duration::from_secs(10)));
    let server = sup.stop();
    let letters: Vec<String> = dead_letters(&server.admin)
        .iter()
        .map(|d| format!("{} ({})", d["event"]["messageId"], d["kind"]))
        .collect();
    assert_eq!(letters, vec!["\"poison-1\" (\"poison\")".to_string()]);
    assert!(wait_for(20, || all.is_subset(&hook.delivered_ids())));
    check_user_order(&innocent, &deliveries_of(&innocent, &hook.events())).unwrap();
}

/// The process dies right after the poison event is durable, often before it answers,
/// so an SDK sends the event again: the log holds two copies (same messageId). The
/// server must still end up with the event quarantined and stay in normal mode.
#[test]
fn resent_poison_event_is_quarantined_without_a_crash_loop() {
    let (pd, vo, hook) = (Mock::pagerduty(), Mock::victorops(), Mock::webhook());
    let config = ha_config(Some(&hook), &pd, &vo, "");
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let ports = Ports::pick();
    let sup = Supervisor::start(
        &dir,
        &config,
        failpoints("router::deliver=return(poison-1)"),
        ports,
        12,
    );
    assert!(sup.wait_stable(Duration::from_millis(200), Duration::from_secs(30)));
    let base = ports.base();
    let client = http();
    let before: Vec<Value> = (0..4)
        .map(|i| event(&format!("u{i}"), &format!("e-{i}")))
        .collect();
    for e in &before {
        post_ok(&client, &base, "/v1/track", e);
    }
    let ids: HashSet<String> = before.iter().map(|e| mid(e).to_string()).collect();
    assert!(wait_for(20, || ids.is_subset(&hook.delivered_ids())));
    std::thread::sleep(Duration::from_millis(400));
    // The first copy (its answer may be lost), then the SDK's retry.
    let poison = event("u0", "poison-1");
    let _ = client
        .post(format!("{base}/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&poison)
        .send();
    post_until_acked(&client, &base, "/v1/track", &poison);
    let after: Vec<Value> = (0..4)
        .map(|i| event(&format!("u{i}"), &format!("a-{i}")))
        .collect();
    for e in &after {
        post_until_acked(&client, &base, "/v1/track", e);
    }
    let settled = wait_for(30, || {
        sup.wait_stable(Duration::from_secs(2), Duration::from_secs(4))
            && http()
                .get(format!("{}/v1/status", ports.admin()))
                .send()
                .ok()
                .and_then(|r| r.json::<Value>().ok())
                .is_some_and(|s| {
                    s["mode"] == "DEGRADED" || s["destinations"][0]["buffered_events"] == 0
                })
    });
    let exits = sup.exits();
    let server = sup.stop();
    let h = health(&server.base);
    assert_eq!(h["mode"], "NORMAL", "exits {exits:?}: {h}");
    assert!(settled, "exits {exits:?}, health {h}");
    assert!(exits.len() < 5, "{exits:?}");
    let letters = dead_letters(&server.admin);
    assert!(!letters.is_empty());
    assert!(letters
        .iter()
        .all(|d| d["kind"] == "poison" && d["event"]["messageId"] == "poison-1"));
    let innocent: Vec<Value> = before.iter().chain(after.iter()).cloned().collect();
    check_user_order(&innocent, &deliveries_of(&innocent, &hook.events())).unwrap();
}

// ---------------------------------------------------------------------------------------
// 2. Crash loop → degraded mode → operator → normal
// ---------------------------------------------------------------------------------------

#[test]
fn crash_loop_enters_degraded_mode_keeps_accepting_and_resumes_in_order_when_the_operator_says_so()
{
    let (pd, vo, hook) = (Mock::pagerduty(), Mock::victorops(), Mock::webhook());
    let config = ha_config(Some(&hook), &pd, &vo, "");
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let ports = Ports::pick();
    let (base, admin) = (ports.base(), ports.admin());
    let sup = Supervisor::start(
        &dir,
        &config,
        failpoints("router::dispatch=return"),
        ports,
        12,
    );
    // Five crashes (crash_threshold), then the sixth start comes up degraded and stays.
    let degraded = comes_up_degraded(&sup, &base);
    assert!(degraded, "exits {:?}\n{}", sup.exits(), sup.logs());
    assert!(sup.wait_stable(Duration::from_millis(1500), Duration::from_secs(10)));
    let exits = sup.exits();
    assert_eq!(exits.len(), 5, "{exits:?}\n{}", sup.logs());
    assert!(exits.iter().all(aborted), "{exits:?}");
    assert_eq!(sup.starts(), 6);

    let h = health(&base);
    assert_eq!(h["mode"], "DEGRADED", "{h}");
    assert_eq!(h["routingEvents"], "FALSE", "{h}");
    assert_eq!(h["acceptingEvents"], "TRUE", "{h}");
    assert_eq!(
        http()
            .get(format!("{base}/readyz"))
            .send()
            .unwrap()
            .status(),
        200
    );
    let mode = get_json(&format!("{admin}/v1/mode"));
    assert_eq!(mode["mode"], "DEGRADED", "{mode}");
    assert_eq!(mode["reason"], "crash-loop", "{mode}");
    assert_eq!(mode["crashes_in_window"], 5, "{mode}");

    // Degraded: every request is acknowledged and durable, nothing is forwarded.
    let client = http();
    let mut sent = Vec::new();
    for i in 0..30 {
        let e = event(&format!("u{}", i % 4), &format!("d-{i}"));
        if i % 3 == 0 {
            post_ok(
                &client,
                &base,
                "/v1/batch",
                &json!({ "batch": [e.clone()] }),
            );
        } else {
            post_ok(&client, &base, "/v1/track", &e);
        }
        sent.push(e);
    }
    let stored: Vec<String> = common::dump(&dir.path().join("data"))
        .iter()
        .map(|e| mid(e).to_string())
        .collect();
    let want: Vec<String> = sent.iter().map(|e| mid(e).to_string()).collect();
    assert_eq!(stored, want);

    // Alerts: PagerDuty trigger and VictorOps CRITICAL.
    assert!(
        wait_for(10, || pd_accepted(&pd, "trigger", DEGRADED_KEY).len() == 1
            && vo_accepted(&vo, "CRITICAL", DEGRADED_KEY).len() == 1),
        "pd {:#?}\nvo {:#?}",
        pd.hits(),
        vo.hits()
    );
    let trigger = &pd_accepted(&pd, "trigger", DEGRADED_KEY)[0];
    assert_eq!(trigger["payload"]["severity"], "critical");
    assert_eq!(trigger["payload"]["source"], ALERT_SOURCE);
    let critical = vo_accepted(&vo, "CRITICAL", DEGRADED_KEY)[0].clone();
    let entity = critical["entity_id"].as_str().unwrap().to_string();
    assert_alerts_valid(&pd, &vo);

    // A clean restart without the failpoint: still degraded.
    let mut server = sup.stop();
    let status = server.terminate();
    assert!(status.success(), "{status}");
    drop(server);
    let mut server = start(&dir, &config, &[], ports);
    let h = health(&base);
    assert_eq!(h["mode"], "DEGRADED", "after a clean restart: {h}");
    assert_eq!(h["routingEvents"], "FALSE", "{h}");
    for i in 30..40 {
        let e = event(&format!("u{}", i % 4), &format!("d-{i}"));
        post_ok(&client, &base, "/v1/track", &e);
        sent.push(e);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(hook.events().is_empty(), "degraded mode forwards nothing");
    let (ok, out, _) = cli(&["mode", "--admin", &admin]);
    assert!(ok && out.contains("DEGRADED"), "{out}");

    // The operator switches back: the backlog is delivered in per-user order.
    let out = mode_set(&admin, "normal");
    assert!(out.contains("NORMAL"), "{out}");
    let all: HashSet<String> = sent.iter().map(|e| mid(e).to_string()).collect();
    assert!(
        wait_for(20, || all.is_subset(&hook.delivered_ids())),
        "{}",
        server.stderr()
    );
    check_user_order(&sent, &deliveries_of(&sent, &hook.events())).unwrap();
    let h = health(&base);
    assert_eq!(h["mode"], "NORMAL", "{h}");
    assert_eq!(h["routingEvents"], "TRUE", "{h}");
    let mode = get_json(&format!("{admin}/v1/mode"));
    assert_eq!(
        mode["crashes_in_window"], 0,
        "the switch clears the crash history: {mode}"
    );

    // Resolved, with the same keys; each alert exactly once.
    assert!(
        wait_for(10, || pd_accepted(&pd, "resolve", DEGRADED_KEY).len() == 1
            && vo_accepted(&vo, "RECOVERY", DEGRADED_KEY).len() == 1),
        "pd {:#?}\nvo {:#?}",
        pd.hits(),
        vo.hits()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(pd_accepted(&pd, "trigger", DEGRADED_KEY).len(), 1);
    assert_eq!(pd_accepted(&pd, "resolve", DEGRADED_KEY).len(), 1);
    let recovery = &vo_accepted(&vo, "RECOVERY", DEGRADED_KEY)[0];
    assert_eq!(recovery["entity_id"], entity.as_str());
    assert_eq!(vo_accepted(&vo, "CRITICAL", DEGRADED_KEY).len(), 1);
    assert_alerts_valid(&pd, &vo);
    assert!(server.terminate().success());
}

/// Crashes further apart than `crash_window` never add up to a crash loop.
#[test]
fn crashes_spread_wider_than_the_crash_window_never_degrade() {
    let (pd, vo, hook) = (Mock::pagerduty(), Mock::victorops(), Mock::webhook());
    let config = ha_config(Some(&hook), &pd, &vo, "[recovery]\ncrash_window = \"1s\"\n");
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let ports = Ports::pick();
    let sup = Supervisor::start_with_delay(
        &dir,
        &config,
        failpoints("router::dispatch=return"),
        ports,
        7,
        Duration::from_millis(1300),
    );
    // Every start aborts (it would stay up only if degraded).
    assert!(wait_for(40, || sup.exits().len() == 7), "{:?}", sup.exits());
    assert_eq!(sup.starts(), 7);
    assert!(sup.exits().iter().all(aborted), "{:?}", sup.exits());
    drop(sup);
    let mut server = start(&dir, &config, &[], ports);
    let h = health(&server.base);
    assert_eq!(h["mode"], "NORMAL", "{h}");
    let mode = get_json(&format!("{}/v1/mode", server.admin));
    assert_eq!(mode["crashes_in_window"], 1, "{mode}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(pd.hits().is_empty(), "{:#?}", pd.hits());
    assert!(server.terminate().success());
}

// ---------------------------------------------------------------------------------------
// 3. Clean restarts
// ---------------------------------------------------------------------------------------

#[test]
fn ten_clean_restarts_never_enter_degraded_mode() {
    let (pd, vo, hook) = (Mock::pagerduty(), Mock::victorops(), Mock::webhook());
    let config = ha_config(Some(&hook), &pd, &vo, "");
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let ports = Ports::pick();
    let client = http();
    let mut sent = Vec::new();
    let mut server = start(&dir, &config, &[], ports);
    for round in 0..=10 {
        let h = health(&server.base);
        assert_eq!(h["mode"], "NORMAL", "start {round}: {h}");
        let mode = get_json(&format!("{}/v1/mode", server.admin));
        assert_eq!(mode["crashes_in_window"], 0, "start {round}: {mode}");
        for i in 0..3 {
            let e = event(&format!("u{i}"), &format!("r{round}-{i}"));
            post_ok(&client, &server.base, "/v1/track", &e);
            sent.push(e);
        }
        if round == 10 {
            break;
        }
        let status = server.terminate();
        assert!(status.success(), "round {round}: {status}");
        drop(server);
        server = start(&dir, &config, &[], ports);
    }
    let (ok, out, err) = cli(&["mode", "--admin", &server.admin]);
    assert!(ok, "{err}");
    assert!(
        out.contains("NORMAL") && out.contains("0 crash(es)"),
        "{out}"
    );
    let all: HashSet<String> = sent.iter().map(|e| mid(e).to_string()).collect();
    assert!(wait_for(20, || all.is_subset(&hook.delivered_ids())));
    check_user_order(&sent, &deliveries_of(&sent, &hook.events())).unwrap();
    // No alert at all.
    std::thread::sleep(Duration::from_millis(300));
    assert!(pd.hits().is_empty(), "{:#?}", pd.hits());
    assert!(vo.hits().is_empty(), "{:#?}", vo.hits());
    assert!(server.terminate().success());
}

// ---------------------------------------------------------------------------------------
// 4. Alert endpoint down
// ---------------------------------------------------------------------------------------

/// The degraded-mode alert is written to the outbox while PagerDuty answers 503; the
/// process is restarted twice while it is down; once it recovers, the trigger arrives
/// exactly once, and so does the resolve; nothing is re-sent after another restart.
#[test]
fn degraded_alert_reaches_a_recovering_pagerduty_exactly_once_across_restarts() {
    let (pd, vo) = (Mock::pagerduty(), Mock::victorops());
    pd.set_unavailable(true);
    let config = ha_config(None, &pd, &vo, "");
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let ports = Ports::pick();
    let admin = ports.admin();
    let mut server = start(&dir, &config, &[], ports);

    let out = mode_set(&admin, "degraded");
    assert!(out.contains("DEGRADED"), "{out}");
    assert_eq!(health(&server.base)["mode"], "DEGRADED");
    // The first attempt is refused (503); VictorOps gets its CRITICAL meanwhile.
    assert!(wait_for(10, || pd.hits().iter().any(|h| h.status == 503)));
    assert!(wait_for(10, || vo_accepted(&vo, "CRITICAL", DEGRADED_KEY)
        .len()
        == 1));
    // Setting the same mode again is no new transition.
    mode_set(&admin, "degraded");

    // Restarted while PagerDuty is down: the outbox survives, the new process retries
    // (2 s after the first attempt).
    assert!(server.terminate().success());
    drop(server);
    let mut server = start(&dir, &config, &[], ports);
    assert_eq!(health(&server.base)["mode"], "DEGRADED");
    assert!(
        wait_for(15, || pd.hits().iter().filter(|h| h.status == 503).count()
            >= 2),
        "the new process retries: {:#?}\n{}",
        pd.hits(),
        server.stderr()
    );
    // PagerDuty recovers; restarted once more (a restart also avoids waiting out the
    // sender's 60 s idle sleep, see `alert_retry_follows_its_backoff`).
    pd.set_unavailable(false);
    assert!(server.terminate().success());
    drop(server);
    let mut server = start(&dir, &config, &[], ports);
    assert!(
        wait_for(20, || pd_accepted(&pd, "trigger", DEGRADED_KEY).len() == 1),
        "{:#?}\n{}",
        pd.hits(),
        server.stderr()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        pd.hits().iter().filter(|h| h.accepted()).count(),
        1,
        "{:#?}",
        pd.hits()
    );
    assert_eq!(health(&server.base)["mode"], "DEGRADED");

    // Back to normal: exactly one resolve.
    let out = mode_set(&admin, "normal");
    assert!(out.contains("NORMAL"), "{out}");
    assert!(wait_for(10, || pd_accepted(&pd, "resolve", DEGRADED_KEY)
        .len()
        == 1
        && vo_accepted(&vo, "RECOVERY", DEGRADED_KEY).len() == 1));

    // Nothing is sent again, not even after another restart.
    assert!(server.terminate().success());
    drop(server);
    let mut server = start(&dir, &config, &[], ports);
    assert_eq!(health(&server.base)["mode"], "NORMAL");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(pd_accepted(&pd, "trigger", DEGRADED_KEY).len(), 1);
    assert_eq!(pd_accepted(&pd, "resolve", DEGRADED_KEY).len(), 1);
    assert_eq!(pd.hits().iter().filter(|h| h.accepted()).count(), 2);
    assert_eq!(vo_accepted(&vo, "CRITICAL", DEGRADED_KEY).len(), 1);
    assert_eq!(vo_accepted(&vo, "RECOVERY", DEGRADED_KEY).len(), 1);
    assert_eq!(vo.hits().len(), 2, "{:#?}", vo.hits());
    assert_eq!(
        vo_accepted(&vo, "CRITICAL", DEGRADED_KEY)[0]["entity_id"],
        vo_accepted(&vo, "RECOVERY", DEGRADED_KEY)[0]["entity_id"]
    );
    assert_alerts_valid(&pd, &vo);
    assert!(server.terminate().success());
}

/// alerts/mod.rs documents a retry with backoff (2 s, 4 s, 8 s, … up to 5 min) on 5xx.
/// PagerDuty answers 503 twice, then recovers: the alert must arrive on the third
/// attempt, about 6 s after the first, without a restart.
#[test]
fn alert_retry_follows_its_backoff() {
    let (pd, vo) = (Mock::pagerduty(), Mock::victorops());
    pd.set_unavailable(true);
    let config = ha_config(None, &pd, &vo, "");
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let ports = Ports::pick();
    let mut server = start(&dir, &config, &[], ports);
    mode_set(&server.admin, "degraded");
    let t0 = Instant::now();
    assert!(wait_for(10, || !pd.hits().is_empty()));
    // The second attempt is due 2 s after the first.
    let second = wait_for(8, || pd.hits().len() >= 2);
    let after = t0.elapsed();
    pd.set_unavailable(false);
    assert!(second, "no second attempt within 8 s: {:#?}", pd.hits());
    // The third 4 s after the second.
    assert!(
        wait_for(15, || pd_accepted(&pd, "trigger", DEGRADED_KEY).len() == 1),
        "second attempt after {after:?}; no third within 15 s: {:#?}",
        pd.hits()
    );
    assert!(server.terminate().success());
}

// ---------------------------------------------------------------------------------------
// 5. Ingestion availability during a crash loop
// ---------------------------------------------------------------------------------------

const PHASES: [&str; 5] = [
    "crash loop",
    "degraded",
    "clean restart",
    "degraded again",
    "normal",
];

#[derive(Default, Clone, Copy, Debug)]
struct Tally {
    sent: u64,
    acked: u64,
    refused: u64,
    other: u64,
}

#[test]
fn ingestion_stays_available_through_a_crash_loop_and_nothing_acknowledged_is_lost() {
    let (pd, vo, hook) = (Mock::pagerduty(), Mock::victorops(), Mock::webhook());
    let config = ha_config(Some(&hook), &pd, &vo, "");
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let ports = Ports::pick();
    let (base, admin) = (ports.base(), ports.admin());

    let phase = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tallies = Arc::new(Mutex::new([Tally::default(); 5]));
    let acked: Arc<Mutex<Vec<Value>>> = Arc::new(Mutex::new(Vec::new()));
    let client = {
        let (phase, stop, tallies, acked, base) = (
            phase.clone(),
            stop.clone(),
            tallies.clone(),
            acked.clone(),
            base.clone(),
        );
        std::thread::spawn(move || {
            let http = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(5))
                .no_proxy()
                .build()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut n = 0u64;
            // Bounded by the stop flag, by count and by time.
            while !stop.load(Ordering::SeqCst) && n < 20_000 && Instant::now() < deadline {
                let e = event(&format!("u{}", n % 6), &format!("c-{n}"));
                n += 1;
                let p = phase.load(Ordering::SeqCst);
                let r = http
                    .post(format!("{base}/v1/track"))
                    .basic_auth(WRITE_KEY, Some(""))
                    .json(&e)
                    .send();
                let mut t = tallies.lock().unwrap();
                t[p].sent += 1;
                match r {
                    Ok(r) if r.status() == 200 => {
                        t[p].acked += 1;
                        acked.lock().unwrap().push(e);
                    }
                    Err(e) if e.is_connect() => t[p].refused += 1,
                    _ => t[p].other += 1,
                }
                drop(t);
                std::thread::sleep(Duration::from_millis(3));
            }
        })
    };
    let started = Instant::now();
    let mut marks = Vec::new();

    let sup = Supervisor::start(
        &dir,
        &config,
        failpoints("router::dispatch=return"),
        ports,
        12,
    );
    let degraded = comes_up_degraded(&sup, &base);
    assert!(degraded, "exits {:?}\n{}", sup.exits(), sup.logs());
    marks.push(started.elapsed());
    phase.store(1, Ordering::SeqCst);
    assert!(sup.wait_stable(Duration::from_millis(1500), Duration::from_secs(10)));
    assert_eq!(sup.exits().len(), 5, "{:?}", sup.exits());

    phase.store(2, Ordering::SeqCst);
    let mut server = sup.stop();
    assert!(server.terminate().success());
    drop(server);
    let mut server = start(&dir, &config, &[], ports);
    marks.push(started.elapsed());
    phase.store(3, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1000));

    mode_set(&admin, "normal");
    phase.store(4, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::SeqCst);
    client.join().unwrap();
    let total = started.elapsed();

    let t = *tallies.lock().unwrap();
    let acked = acked.lock().unwrap().clone();
    eprintln!("ingestion during the crash-loop scenario ({total:.1?} in all; degraded after {:.1?}, back after the clean restart at {:.1?}):", marks[0], marks[1]);
    eprintln!(
        "{:>16} {:>7} {:>7} {:>8} {:>6}",
        "phase", "sent", "acked", "refused", "other"
    );
    for (name, x) in PHASES.iter().zip(t.iter()) {
        eprintln!(
            "{name:>16} {:>7} {:>7} {:>8} {:>6}",
            x.sent, x.acked, x.refused, x.other
        );
    }
    let sum = t.iter().fold(Tally::default(), |a, x| Tally {
        sent: a.sent + x.sent,
        acked: a.acked + x.acked,
        refused: a.refused + x.refused,
        other: a.other + x.other,
    });
    eprintln!(
        "{:>16} {:>7} {:>7} {:>8} {:>6}",
        "total", sum.sent, sum.acked, sum.refused, sum.other
    );
    assert_eq!(sum.acked as usize, acked.len());
    // While a process is up (degraded or normal), every request is acknowledged.
    for p in [1, 3, 4] {
        assert_eq!(t[p].acked, t[p].sent, "phase {}: {:?}", PHASES[p], t[p]);
        assert!(t[p].sent > 0, "phase {}: {:?}", PHASES[p], t[p]);
    }

    // Every acknowledged event is stored and, back in normal mode, delivered in order.
    let stored: HashSet<String> = server.dump().iter().map(|e| mid(e).to_string()).collect();
    let missing: Vec<&str> = acked
        .iter()
        .map(mid)
        .filter(|m| !stored.contains(*m))
        .collect();
    assert!(missing.is_empty(), "acknowledged, not stored: {missing:?}");
    let all: HashSet<String> = acked.iter().map(|e| mid(e).to_string()).collect();
    assert!(
        wait_for(30, || all.is_subset(&hook.delivered_ids())),
        "{} of {} delivered",
        all.intersection(&hook.delivered_ids()).count(),
        all.len()
    );
    check_user_order(&acked, &deliveries_of(&acked, &hook.events())).unwrap();
    assert!(server.terminate().success());
}

// ---------------------------------------------------------------------------------------
// 6. A panic in a destination task
// ---------------------------------------------------------------------------------------

#[test]
fn destination_panic_is_caught_and_the_event_quarantined_after_three_panics() {
    a_panic_is_contained_and_its_event_quarantined("router::deliver_panic");
}

/// A panic inside one destination's worker is caught and counted like a crash of that
/// worker (docs/OPERATIONS.md, "Crash loops and poison events") — here the delivery loop itself panics (not a delivery task):
/// it is restarted from its cursor, and the event it was dispatching gets a strike.
#[test]
fn delivery_loop_panic_restarts_the_loop_and_quarantines_the_event() {
    a_panic_is_contained_and_its_event_quarantined("router::loop_panic");
}

/// The failpoint `failpoint` panics whenever the event "panic-1" is handed to it.
fn a_panic_is_contained_and_its_event_quarantined(failpoint: &str) {
    let (pd, vo, hook) = (Mock::pagerduty(), Mock::victorops(), Mock::webhook());
    let config = ha_config(Some(&hook), &pd, &vo, "");
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let ports = Ports::pick();
    let mut server = start(
        &dir,
        &config,
        &failpoints(&format!("{failpoint}=return(panic-1)")),
        ports,
    );
    let pid = server.child.as_ref().unwrap().id();
    let client = http();
    let events: Vec<Value> = (0..30)
        .map(|i| {
            let id = if i == 10 {
                "panic-1".to_string()
            } else {
                format!("p-{i}")
            };
            event(&format!("u{}", i % 3), &id)
        })
        .collect();
    for e in &events {
        post_ok(&client, &server.base, "/v1/track", e);
    }
    let innocent: Vec<Value> = events
        .iter()
        .filter(|e| mid(e) != "panic-1")
        .cloned()
        .collect();
    let all: HashSet<String> = innocent.iter().map(|e| mid(e).to_string()).collect();
    assert!(
        wait_for(20, || dead_letters(&server.admin)
            .iter()
            .any(|d| d["event"]["messageId"] == "panic-1")
            && all.is_subset(&hook.delivered_ids())),
        "{}",
        server.stderr()
    );

    // The same process, alive and well.
    assert!(server.child.as_mut().unwrap().try_wait().unwrap().is_none());
    assert!(listening(&server));
    assert_eq!(server.child.as_ref().unwrap().id(), pid);
    let r = client.get(format!("{}/livez", server.base)).send().unwrap();
    assert_eq!(r.status(), 200);
    let h = health(&server.base);
    assert_eq!(h["mode"], "NORMAL", "{h}");

    // Quarantined after exactly poison_threshold panics.
    let panics = server
        .stderr()
        .matches(&format!("failpoint {failpoint} for panic-1"))
        .count();
    assert_eq!(panics, 3, "{}", server.stderr());
    let letters = dead_letters(&server.admin);
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0]["kind"], "poison");
    assert_eq!(letters[0]["event"]["messageId"], "panic-1");
    assert!(!hook.delivered_ids().contains("panic-1"));
    check_user_order(&innocent, &deliveries_of(&innocent, &hook.events())).unwrap();
    // Its alert.
    assert!(wait_for(10, || pd_accepted(&pd, "trigger", "").len() == 1));
    assert!(pd_accepted(&pd, "trigger", "")[0]["dedup_key"]
        .as_str()
        .unwrap()
        .contains("poison"));
    assert_alerts_valid(&pd, &vo);
    assert!(server.terminate().success());
}

// ---------------------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------------------

/// `ballast mode set normal|degraded` changes the mode through the admin API, and
/// commands that talk to a running server take `--admin URL` (README, "Commands").
#[test]
fn cli_mode_set_takes_admin_after_the_subcommand() {
    let (pd, vo) = (Mock::pagerduty(), Mock::victorops());
    let config = ha_config(None, &pd, &vo, "");
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let ports = Ports::pick();
    let mut server = start(&dir, &config, &[], ports);
    let (ok, out, err) = cli(&["mode", "set", "degraded", "--admin", &server.admin]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("DEGRADED"), "{out}");
    assert_eq!(health(&server.base)["mode"], "DEGRADED");
    let (ok, out, err) = cli(&["mode", "set", "normal", "--admin", &server.admin]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("NORMAL"), "{out}");
    assert!(server.terminate().success());
}

// ---------------------------------------------------------------------------------------
// Storage failure alert
// ---------------------------------------------------------------------------------------

/// A failed fsync pages before the process exits (the next start may fail too), and the
/// next start, having recovered the log, resolves that page under the same dedup_key and
/// entity_id. A later clean restart does not resolve it again.
#[test]
fn a_failed_fsync_pages_and_the_recovered_start_resolves_it() {
    let (pd, vo) = (Mock::pagerduty(), Mock::victorops());
    let config = ha_config(None, &pd, &vo, "");
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let ports = Ports::pick();
    let mut server = start(
        &dir,
        &config,
        &failpoints("ballast_log::fsync=return"),
        ports,
    );
    let r = http()
        .post(format!("{}/v1/track", server.base))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&event("u1", "during-failure"))
        .send();
    if let Ok(r) = r {
        assert_eq!(r.status(), 503, "never acknowledged");
    }
    let status = server.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "{}", server.stderr());
    // Sent before the process exited.
    let triggers = pd_accepted(&pd, "trigger", "/fsync");
    assert_eq!(triggers.len(), 1, "{:#?}\n{}", pd.hits(), server.stderr());
    assert_eq!(vo_accepted(&vo, "CRITICAL", "/fsync").len(), 1);
    assert!(pd_accepted(&pd, "resolve", "/fsync").is_empty());

    let mut server = start(&dir, &config, &[], ports);
    assert!(
        wait_for(10, || pd_accepted(&pd, "resolve", "/fsync").len() == 1
            && vo_accepted(&vo, "RECOVERY", "/fsync").len() == 1),
        "{:#?}\n{}",
        pd.hits(),
        server.stderr()
    );
    let resolve = &pd_accepted(&pd, "resolve", "/fsync")[0];
    assert_eq!(resolve["dedup_key"], triggers[0]["dedup_key"]);
    post_ok(&http(), &server.base, "/v1/track", &event("u1", "after"));
    assert!(server.terminate().success());

    // A clean restart: nothing new to say. Another alert sent after it (degraded mode)
    // arrives after anything the start would have sent.
    let mut server = start(&dir, &config, &[], ports);
    mode_set(&server.admin, "degraded");
    assert!(wait_for(10, || pd_accepted(&pd, "trigger", DEGRADED_KEY)
        .len()
        == 1));
    assert_eq!(pd_accepted(&pd, "resolve", "/fsync").len(), 1);
    assert_eq!(pd_accepted(&pd, "trigger", "/fsync").len(), 1);
    assert_alerts_valid(&pd, &vo);
    mode_set(&server.admin, "normal");
    assert!(server.terminate().success());
}
