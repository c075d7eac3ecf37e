//! Test harness shared by every integration test: starts the real `ballast` binary on
//! loopback ports in a temp directory and talks HTTP to it (every server is killed when
//! its handle drops); events, the per-user order check, admin and metrics helpers, free
//! ports. `receiver.rs` the programmable HTTP receiver destinations deliver to;
//! `webdriver.rs` headless Chromium for the browser tests.
#![allow(dead_code)]

pub mod receiver;
pub mod webdriver;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const WRITE_KEY: &str = "test-write-key";

/// A config with one enabled source (`web`, key `test-write-key`), one disabled source
/// (`off`, key `disabled-key`), listening on free loopback ports. `extra` is appended.
pub fn config(extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_timeout = "10s"

[storage]
backend = "embedded"
segment_bytes = "1MiB"

[[sources]]
id = "web"
write_key = "{WRITE_KEY}"

[[sources]]
id = "off"
write_key = "disabled-key"
enabled = false
{extra}
"#
    )
}

pub struct Server {
    pub dir: Arc<tempfile::TempDir>,
    pub config_path: PathBuf,
    pub child: Option<Child>,
    pub base: String,
    pub admin: String,
    pub stderr: Arc<Mutex<String>>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ballast")
}

impl Server {
    /// Starts a server with `config` in a new temp dir and waits until it listens.
    pub fn start(config: &str) -> Server {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        Server::start_in(dir, config, &[])
    }

    /// Starts (or restarts) a server on an existing directory.
    pub fn start_in(dir: Arc<tempfile::TempDir>, config: &str, env: &[(&str, &str)]) -> Server {
        let mut server = Server::spawn(Path::new(bin()), dir, config, env, &[]);
        server.wait_listening();
        server
    }

    /// Starts a server through another executable (e.g. a script that lowers a limit,
    /// then `exec`s the binary with its arguments) and waits until it listens.
    pub fn start_with(
        bin: &Path,
        dir: Arc<tempfile::TempDir>,
        config: &str,
        env: &[(&str, &str)],
    ) -> Server {
        let mut server = Server::spawn(bin, dir, config, env, &[]);
        server.wait_listening();
        server
    }

    /// Spawns `BIN serve --config … --data-dir … ARGS` on the directory without waiting
    /// for it to listen (`base`/`admin` stay empty until `wait_listening`). Its stderr is
    /// collected.
    pub fn spawn(
        bin: &Path,
        dir: Arc<tempfile::TempDir>,
        config: &str,
        env: &[(&str, &str)],
        args: &[String],
    ) -> Server {
        let config_path = dir.path().join("ballast.toml");
        std::fs::write(&config_path, config).expect("write config");
        let data = dir.path().join("data");
        let _ = std::fs::remove_file(data.join("server.json"));
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn ballast");
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(err) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    let mut s = sink.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        Server {
            dir,
            config_path,
            child: Some(child),
            base: String::new(),
            admin: String::new(),
            stderr,
        }
    }

    /// Waits until the server spawned listens (its `server.json` names it).
    pub fn wait_listening(&mut self) {
        let path = self.dir.path().join("data").join("server.json");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&path) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    let pid = self.child.as_ref().map(|c| c.id()).unwrap_or(0);
                    if v["pid"].as_u64() == Some(pid as u64) {
                        self.base = format!("http://{}", v["listen"].as_str().unwrap());
                        self.admin = format!("http://{}", v["admin_listen"].as_str().unwrap());
                        return;
                    }
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("ballast exited early with {status}:\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "ballast did not start:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe_sigterm(c.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("ballast did not stop on SIGTERM:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = c.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("ballast did not exit:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every stored event (parsed), via `ballast log dump`.
    pub fn dump(&self) -> Vec<serde_json::Value> {
        dump(&self.data_dir())
    }
}

pub fn dump(data_dir: &Path) -> Vec<serde_json::Value> {
    log_dump(data_dir, &[])
        .iter()
        .map(|l| serde_json::from_str(l).expect("dump line is JSON"))
        .collect()
}

/// The lines `ballast log dump ARGS --data-dir DIR` prints (one stored event each).
pub fn log_dump(data_dir: &Path, args: &[&str]) -> Vec<String> {
    let out = Command::new(bin())
        .args(["log", "dump"])
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run ballast log dump");
    assert!(
        out.status.success(),
        "log dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf8")
        .lines()
        .map(str::to_string)
        .collect()
}

fn unsafe_sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .no_proxy()
        .build()
        .expect("client")
}

/// How much longer than its nominal bound a wait may take before the test gives up.
/// Deadlines here only bound a failing test; they assert nothing about speed, and the
/// CI machines (2 shared cores, debug builds, tests running side by side) are slow.
pub const WAIT_SLACK: u64 = 3;

/// Polls `cond` every 20 ms until it holds (true) or `secs` × [`WAIT_SLACK`] pass (false).
pub fn wait_for(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs * WAIT_SLACK);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback port nothing listens on (for now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

// ---------------------------------------------------------------------------------------
// Events and the per-user order
// ---------------------------------------------------------------------------------------

/// A track event of `user` with messageId `id`.
pub fn event(user: &str, id: &str) -> serde_json::Value {
    event_padded(user, id, 0)
}

/// A track event of `user` with messageId `id` and `pad` bytes of padding.
pub fn event_padded(user: &str, id: &str, pad: usize) -> serde_json::Value {
    serde_json::json!({
        "type": "track",
        "event": "Test Event",
        "userId": user,
        "messageId": id,
        "properties": {"pad": "x".repeat(pad), "ü": "✓"},
        "context": {"library": {"name": "ballast-tests"}}
    })
}

pub fn mid(e: &serde_json::Value) -> &str {
    e["messageId"].as_str().unwrap_or("")
}

/// The ordering key: userId, else anonymousId.
pub fn ordering_key(e: &serde_json::Value) -> String {
    match e["userId"].as_str() {
        Some(u) if !u.is_empty() => format!("u:{u}"),
        _ => format!("a:{}", e["anonymousId"].as_str().unwrap_or("")),
    }
}

/// Per user: the messageIds of `delivered` in order, duplicates removed (first kept),
/// must equal the messageIds of `accepted` in order; no other user may appear.
pub fn check_user_order(
    accepted: &[serde_json::Value],
    delivered: &[serde_json::Value],
) -> Result<(), String> {
    let mut want: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for e in accepted {
        want.entry(ordering_key(e)).or_default().push(mid(e));
    }
    let mut got: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for e in delivered {
        if seen.insert(mid(e)) {
            got.entry(ordering_key(e)).or_default().push(mid(e));
        }
    }
    for (u, w) in &want {
        let g = got.get(u).cloned().unwrap_or_default();
        if &g != w {
            return Err(format!(
                "user {u}: accepted {} events {:?}\n delivered {} {:?}",
                w.len(),
                w,
                g.len(),
                g
            ));
        }
    }
    if let Some(extra) = got.keys().find(|u| !want.contains_key(*u)) {
        return Err(format!("delivered events of unknown user {extra}"));
    }
    Ok(())
}

/// The deliveries of the events in `sent` (by messageId), others dropped, in order.
pub fn deliveries_of(
    sent: &[serde_json::Value],
    delivered: &[serde_json::Value],
) -> Vec<serde_json::Value> {
    let wanted: HashSet<&str> = sent.iter().map(mid).collect();
    delivered
        .iter()
        .filter(|e| wanted.contains(mid(e)))
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------------------
// Admin API and metrics
// ---------------------------------------------------------------------------------------

/// `GET <admin><path>` (no token) as JSON.
pub fn admin_get(server: &Server, path: &str) -> serde_json::Value {
    client()
        .get(format!("{}{path}", server.admin))
        .send()
        .expect("admin GET")
        .json()
        .expect("admin answer is JSON")
}

/// A metric's value in the admin `/metrics` text (`name` may include its labels).
pub fn metric(server: &Server, name: &str) -> Option<f64> {
    let text = client()
        .get(format!("{}/metrics", server.admin))
        .send()
        .ok()?
        .text()
        .ok()?;
    metric_in(&text, name)
}

/// A metric's value in a `/metrics` text.
pub fn metric_in(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)
            .filter(|rest| rest.starts_with(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}
