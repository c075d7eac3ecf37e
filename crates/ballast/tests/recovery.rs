//! Recovery of the embedded store, through the real binary: torn tails, damaged records,
//! a full quota, a failed fsync.

mod common;

use std::sync::Arc;

use common::{metric, Server, WRITE_KEY};
use serde_json::json;

fn send(server: &Server, n: usize) -> Vec<String> {
    let http = common::client();
    (0..n)
        .map(|i| {
            let id = format!("m-{i}");
            let r = http
                .post(server.url("/v1/track"))
                .basic_auth(WRITE_KEY, Some(""))
                .json(&json!({"userId": "u", "messageId": id, "properties": {"i": i}}))
                .send()
                .unwrap();
            assert_eq!(r.status(), 200);
            id
        })
        .collect()
}

fn segment(server: &Server) -> std::path::PathBuf {
    let dir = server.data_dir().join("log");
    let mut segs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().map(|e| e == "seg").unwrap_or(false))
        .collect();
    segs.sort();
    segs.pop().unwrap()
}

#[test]
fn torn_tail_is_truncated_and_complete_records_kept() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = common::config("");
    let mut server = Server::start_in(dir.clone(), &config, &[]);
    let ids = send(&server, 20);
    assert!(server.terminate().success());
    let seg = segment(&server);
    let bytes = std::fs::read(&seg).unwrap();
    // Cut into the last record: 19 complete records remain.
    let cut = bytes.len() - 7;
    std::fs::write(&seg, &bytes[..cut]).unwrap();
    let mut server = Server::start_in(dir.clone(), &config, &[]);
    let stored = server.dump();
    let got: Vec<_> = stored
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, ids[..19]);
    assert!(
        metric(&server, "ballast_log_torn_tail_bytes_total")
            .expect("ballast_log_torn_tail_bytes_total")
            > 0.0
    );
    // And it accepts events again, after the kept ones (a new messageId: `m-0` again
    // would be a copy of a stored event, which the gateway does not store twice).
    let r = common::client()
        .post(server.url("/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({"userId": "u", "messageId": "after-recovery"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(server.dump().len(), 20);
    assert!(server.terminate().success());
}

#[test]
fn damaged_record_is_quarantined_counted_and_the_rest_readable() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = common::config("");
    let mut server = Server::start_in(dir.clone(), &config, &[]);
    let ids = send(&server, 10);
    assert!(server.terminate().success());
    let seg = segment(&server);
    let mut bytes = std::fs::read(&seg).unwrap();
    let victim = bytes.windows(5).position(|w| w == b"m-4\",").unwrap();
    bytes[victim] ^= 0x20;
    std::fs::write(&seg, &bytes).unwrap();
    let mut server = Server::start_in(dir.clone(), &config, &[]);
    let got: Vec<_> = server
        .dump()
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<_> = ids.iter().filter(|i| *i != "m-4").cloned().collect();
    assert_eq!(got, expected);
    assert_eq!(
        metric(&server, "ballast_log_quarantined_records_total")
            .expect("ballast_log_quarantined_records_total"),
        1.0
    );
    let q = server.data_dir().join("log").join("quarantine");
    let files: Vec<_> = std::fs::read_dir(&q).unwrap().collect();
    assert_eq!(files.len(), 1);
    assert!(server.stderr().contains("quarantine"));
    assert!(server.terminate().success());
}

#[test]
fn full_quota_answers_503_and_keeps_everything() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut server = Server::start_in(
        dir.clone(),
        &common::config(""),
        &[("BALLAST_STORAGE__MAX_BYTES", "8KiB")],
    );
    let http = common::client();
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0..200 {
        let id = format!("q-{i}");
        let r = http
            .post(server.url("/v1/track"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&json!({"userId": "u", "messageId": id, "properties": {"pad": "p".repeat(100)}}))
            .send()
            .unwrap();
        match r.status().as_u16() {
            200 => acked.push(id),
            503 => {
                assert_eq!(r.text().unwrap(), "storage quota exceeded");
                refused += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert!(!acked.is_empty() && refused > 0);
    let ready = http.get(server.url("/readyz")).send().unwrap();
    assert_eq!(ready.status(), 503);
    let health: serde_json::Value = http
        .get(server.url("/health"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(health["acceptingEvents"], "FALSE");
    let got: Vec<_> = server
        .dump()
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        got, acked,
        "everything acknowledged is stored, nothing else"
    );
    assert!(
        metric(&server, "ballast_storage_quota_rejections_total")
            .expect("ballast_storage_quota_rejections_total")
            >= refused as f64
    );
    assert!(server.terminate().success());
}

#[cfg(feature = "failpoints")]
#[test]
fn failed_fsync_acknowledges_nothing_and_exits_non_zero() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = common::config("");
    let mut server = Server::start_in(dir.clone(), &config, &[]);
    let before = send(&server, 3);
    assert!(server.terminate().success());
    let mut server = Server::start_in(
        dir.clone(),
        &config,
        &[("FAILPOINTS", "ballast_log::fsync=return")],
    );
    let r = common::client()
        .post(server.url("/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({"userId": "u", "messageId": "during"}))
        .send();
    if let Ok(r) = r {
        assert_eq!(r.status(), 503, "never acknowledged");
    }
    let status = server.wait_exit(std::time::Duration::from_secs(30));
    assert!(!status.success(), "exits non-zero after a failed fsync");
    assert!(server.stderr().contains("fdatasync failed"));
    // The next start recovers from the log.
    let mut server = Server::start_in(dir.clone(), &config, &[]);
    let got: Vec<_> = server
        .dump()
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .filter(|id| id != "during")
        .collect();
    assert_eq!(got, before);
    send(&server, 1);
    assert!(server.terminate().success());
}
