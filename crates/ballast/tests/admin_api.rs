//! Admin API safety, with the real binary: an admin address other hosts can reach needs
//! a token (`serve` and `check-config` refuse a config without one), every admin call
//! needs it then, and `/metrics` alone can be left open for Prometheus
//! (`server.metrics_require_token = false`).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::Server;

const TOKEN: &str = "admin-s3cret";

/// The config of `common::config` with the admin API on every interface.
fn open_admin(extra_server: &str) -> String {
    common::config("").replacen(
        "admin_listen = \"127.0.0.1:0\"",
        &format!("admin_listen = \"0.0.0.0:0\"\n{extra_server}"),
        1,
    )
}

/// Runs `ballast ARGS` to its end (at most 30 s): success and what it printed.
fn run(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(common::bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("BALLAST_SERVER__ADMIN_TOKEN")
        .env_remove("BALLAST_ADMIN_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn ballast");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("ballast {args:?} did not exit (it should have refused to start)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn an_admin_api_off_loopback_without_a_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    let data = dir.path().join("data");
    let (path_s, data_s) = (path.to_str().unwrap(), data.to_str().unwrap());

    std::fs::write(&path, open_admin("")).unwrap();
    let (ok, out) = run(&["check-config", path_s], &[]);
    assert!(!ok, "check-config accepted it:\n{out}");
    assert!(
        out.contains("admin_token") && out.contains("0.0.0.0:0"),
        "{out}"
    );
    let (ok, out) = run(&["serve", "--config", path_s, "--data-dir", data_s], &[]);
    assert!(!ok, "serve started:\n{out}");
    assert!(out.contains("admin_token"), "{out}");
    assert!(!data.join("server.json").exists());

    // The same config with the token from the environment (as in Kubernetes) is fine.
    let (ok, out) = run(
        &["check-config", path_s],
        &[("BALLAST_SERVER__ADMIN_TOKEN", TOKEN)],
    );
    assert!(ok, "{out}");
    // A blank token is no token.
    let (ok, out) = run(
        &["check-config", path_s],
        &[("BALLAST_SERVER__ADMIN_TOKEN", "  ")],
    );
    assert!(!ok && out.contains("empty"), "{out}");

    // A loopback config opened up by `serve --admin-listen` is refused as well.
    std::fs::write(&path, common::config("")).unwrap();
    let (ok, out) = run(&["check-config", path_s], &[]);
    assert!(ok, "{out}");
    let (ok, out) = run(
        &[
            "serve",
            "--config",
            path_s,
            "--data-dir",
            data_s,
            "--admin-listen",
            "0.0.0.0:0",
        ],
        &[],
    );
    assert!(!ok, "serve started:\n{out}");
    assert!(out.contains("admin_token"), "{out}");
}

/// The admin URL of a server that bound 0.0.0.0, reached over loopback.
fn admin_url(server: &Server, path: &str) -> String {
    format!("{}{path}", server.admin.replace("0.0.0.0", "127.0.0.1"))
}

#[test]
fn every_admin_call_needs_the_token_and_metrics_can_stay_open() {
    let server = Server::start_in(
        std::sync::Arc::new(tempfile::tempdir().unwrap()),
        &open_admin("metrics_require_token = false"),
        &[("BALLAST_SERVER__ADMIN_TOKEN", TOKEN)],
    );
    let http = common::client();
    let status = |rb: reqwest::blocking::RequestBuilder| rb.send().unwrap().status().as_u16();
    let set_mode = |token: Option<&str>| {
        let rb = http
            .post(admin_url(&server, "/v1/mode"))
            .json(&serde_json::json!({ "mode": "degraded" }));
        status(match token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        })
    };
    let replay = |token: Option<&str>| {
        let rb = http.post(admin_url(
            &server,
            "/v1/dead-letters/replay?destination=none",
        ));
        status(match token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        })
    };

    // State changes: refused without the token or with a wrong one.
    assert_eq!(set_mode(None), 401);
    assert_eq!(set_mode(Some("wrong")), 401);
    assert_eq!(replay(None), 401);
    assert_eq!(replay(Some("wrong")), 401);
    let h: serde_json::Value = http
        .get(server.url("/health"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(h["mode"], "NORMAL", "a refused call changed the mode");
    // Reading state (event payloads in the dead letters) needs it too.
    for path in ["/v1/status", "/v1/mode", "/v1/dead-letters"] {
        assert_eq!(status(http.get(admin_url(&server, path))), 401, "{path}");
    }
    // /metrics is open, by the setting; but only for reading.
    let r = http.get(admin_url(&server, "/metrics")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().unwrap().contains("ballast_storage_writable"));
    assert_eq!(status(http.post(admin_url(&server, "/metrics"))), 401);

    // With the token: allowed.
    assert_eq!(replay(Some(TOKEN)), 404); // authorised; no such destination
    assert_eq!(set_mode(Some(TOKEN)), 200);
    assert_eq!(
        status(
            http.get(admin_url(&server, "/v1/status"))
                .bearer_auth(TOKEN)
        ),
        200
    );
    // The CLI passes it from BALLAST_ADMIN_TOKEN.
    let admin = server.admin.replace("0.0.0.0", "127.0.0.1");
    let (ok, out) = run(&["mode", "--admin", &admin], &[]);
    assert!(!ok, "{out}");
    let (ok, out) = run(
        &["mode", "set", "normal", "--admin", &admin],
        &[("BALLAST_ADMIN_TOKEN", TOKEN)],
    );
    assert!(ok, "{out}");
    assert!(out.contains("NORMAL"), "{out}");
}

#[test]
fn metrics_need_the_token_by_default() {
    let server = Server::start_in(
        std::sync::Arc::new(tempfile::tempdir().unwrap()),
        &open_admin(""),
        &[("BALLAST_SERVER__ADMIN_TOKEN", TOKEN)],
    );
    let http = common::client();
    let r = http.get(admin_url(&server, "/metrics")).send().unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(admin_url(&server, "/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}
