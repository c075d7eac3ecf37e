//! RudderStack's and Segment's own SDKs (Python and Node), unchanged, against the real
//! server: every event of every type they send is stored as sent (docs/API.md). The SDKs are installed from the package registries, pinned, into the target
//! directory on first use (`pip install --target`, `npm install --prefix`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{Server, WRITE_KEY};
use serde_json::Value;

const PYTHON_PACKAGES: &[&str] = &[
    "rudder-sdk-python==2.1.9",
    "segment-analytics-python==2.4.0",
];
const NODE_PACKAGES: &[&str] = &[
    "@rudderstack/rudder-sdk-node@3.0.13",
    "@segment/analytics-node@3.1.0",
];

fn deps_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-compat")
}

/// Runs an install command once; the marker file records that it succeeded.
fn install(dir: &Path, marker: &str, cmd: &mut Command) -> Result<PathBuf, String> {
    let done = dir.join(marker);
    if done.exists() {
        return Ok(dir.to_path_buf());
    }
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::write(&done, marker).map_err(|e| e.to_string())?;
    Ok(dir.to_path_buf())
}

fn python_deps() -> &'static Path {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = deps_dir().join("python");
    let r = DIR.get_or_init(|| {
        install(
            &dir,
            ".installed-2.1.9-2.4.0",
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .arg("--target")
                .arg(&dir)
                .args(PYTHON_PACKAGES),
        )
    });
    r.as_deref()
        .unwrap_or_else(|e| panic!("installing the Python SDKs: {e}"))
}

fn node_deps() -> &'static Path {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = deps_dir().join("node");
    let r = DIR.get_or_init(|| {
        install(
            &dir,
            ".installed-3.0.13-3.1.0",
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
                .arg(&dir)
                .args(NODE_PACKAGES),
        )
    });
    r.as_deref()
        .unwrap_or_else(|e| panic!("installing the Node SDKs: {e}"))
}

/// Runs a compat script (bounded: 90 s) and returns the messageIds it says it sent.
fn run_script(mut cmd: Command) -> Vec<String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{stdout}\n{stderr}",
        out.status
    );
    serde_json::from_str(stdout.trim().lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{cmd:?} printed no id list ({e}):\n{stdout}\n{stderr}"))
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/compat")
        .join(name)
}

/// Every id sent is stored exactly once, with the type its suffix names, the user it
/// was sent for, and the SDK's own library name in its context.
fn check_stored(server: &Server, sent: &[String], user: &str, library: &str) {
    assert_eq!(sent.len(), 7, "{sent:?}");
    let stored = server.dump();
    for id in sent {
        let found: Vec<&Value> = stored.iter().filter(|e| e["messageId"] == **id).collect();
        assert_eq!(found.len(), 1, "{id}: {found:?}\nstored: {stored:#?}");
        let e = found[0];
        let kind = id.rsplit('-').next().unwrap();
        let want_type = if kind == "anon" { "track" } else { kind };
        assert_eq!(e["type"], want_type, "{e}");
        if kind == "anon" {
            assert!(
                e["anonymousId"]
                    .as_str()
                    .is_some_and(|a| a.ends_with("anon-2")),
                "{e}"
            );
        } else {
            assert_eq!(e["userId"], user, "{e}");
        }
        let lib = e["context"]["library"]["name"].as_str().unwrap_or_default();
        assert!(lib.contains(library), "library {lib:?} in {e}");
        assert!(e["receivedAt"].is_string(), "{e}");
    }
    let track = stored.iter().find(|e| e["messageId"] == sent[1]).unwrap();
    assert_eq!(track["event"], "Song Played");
    assert_eq!(track["properties"]["n"], 1);
    let group = stored.iter().find(|e| e["messageId"] == sent[4]).unwrap();
    assert_eq!(group["groupId"], "g-1");
}

fn python_sdk(sdk: &str, library: &str) {
    let deps = python_deps();
    let server = Server::start(&common::config(""));
    let mut cmd = Command::new("python3");
    cmd.arg(script("python_sdk.py"))
        .args([sdk, &server.base, WRITE_KEY, &format!("py-{sdk}")])
        .env("PYTHONPATH", deps)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let sent = run_script(cmd);
    check_stored(&server, &sent, "py-user", library);
}

fn node_sdk(sdk: &str, library: &str) {
    let deps = node_deps();
    let server = Server::start(&common::config(""));
    let mut cmd = Command::new("node");
    cmd.arg(script("node_sdk.js"))
        .args([sdk, &server.base, WRITE_KEY, &format!("js-{sdk}")])
        .env("NODE_PATH", deps.join("node_modules"));
    let sent = run_script(cmd);
    check_stored(&server, &sent, "js-user", library);
}

#[test]
fn rudderstack_python_sdk_works_unchanged() {
    python_sdk("rudderstack", "analytics-python");
}

#[test]
fn segment_python_sdk_works_unchanged() {
    python_sdk("segment", "analytics-python");
}

#[test]
fn rudderstack_node_sdk_works_unchanged() {
    node_sdk("rudderstack", "analytics-node");
}

#[test]
fn segment_node_sdk_works_unchanged() {
    node_sdk("segment", "analytics-node");
}
