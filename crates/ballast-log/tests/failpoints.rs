//! Fault injection: a process of its own, because failpoints are process-wide.
#![cfg(feature = "failpoints")]

use ballast_log::{Batch, Log, LogConfig, LogError};

fn batch(p: &[u8]) -> Batch {
    let mut b = Batch::new();
    b.push(p).unwrap();
    b
}

fn payloads(log: &Log) -> Vec<Vec<u8>> {
    log.read(0, usize::MAX, usize::MAX)
        .unwrap()
        .records
        .into_iter()
        .map(|r| r.payload.to_vec())
        .collect()
}

#[test]
fn failed_fsync_stops_the_writer_and_the_next_open_recovers() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = Log::open(LogConfig::new(dir.path())).unwrap();
        log.append_wait(batch(b"before")).unwrap();
        fail::cfg("ballast_log::fsync", "return").unwrap();
        assert!(matches!(
            log.append_wait(batch(b"during")),
            Err(LogError::WriterFailed(_))
        ));
        fail::remove("ballast_log::fsync");
        // Never retried as if nothing happened: the writer stays stopped.
        assert!(matches!(
            log.append_wait(batch(b"after")),
            Err(LogError::WriterFailed(_))
        ));
        assert!(log.has_failed());
    }
    let (log, _) = Log::open(LogConfig::new(dir.path())).unwrap();
    let got = payloads(&log);
    // "during" was written but its fsync failed: it may or may not be there; "after" never.
    assert_eq!(got[0], b"before");
    assert!(!got.iter().any(|p| p == b"after"));
    log.append_wait(batch(b"again")).unwrap();
    scenario.teardown();
}

#[test]
fn a_segment_that_cannot_be_created_refuses_the_batch_and_the_writer_goes_on() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 4096,
        ..LogConfig::new(dir.path())
    };
    let (log, _) = Log::open(config.clone()).unwrap();
    let big = vec![b'x'; 5000];
    log.append_wait(batch(&big)).unwrap();
    // The next append needs a new segment: creating it fails like EMFILE would.
    fail::cfg("ballast_log::create_segment", "return").unwrap();
    for _ in 0..3 {
        match log.append_wait(batch(b"refused")) {
            Err(e @ LogError::Unavailable(_)) => assert!(!e.is_fatal()),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
    let stats = log.stats();
    assert!(!stats.failed, "a failed segment creation is not fatal");
    assert_eq!(stats.rejected_unavailable, 3);
    assert!(stats.unavailable.is_some());
    fail::remove("ballast_log::create_segment");
    // The writer retries the roll by itself (no traffic needed) ...
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while log.stats().unavailable.is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the roll was not retried"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // ... and appends are acknowledged again.
    log.append_wait(batch(b"after")).unwrap();
    assert_eq!(log.stats().segments, 2);
    drop(log);
    let (log, _) = Log::open(config).unwrap();
    let got = payloads(&log);
    assert_eq!(got, vec![big, b"after".to_vec()]);
    scenario.teardown();
}

#[test]
fn a_full_disk_refuses_writes_and_the_writer_notices_when_space_returns() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("disk-is-full");
    let (log, _) = Log::open(LogConfig::new(dir.path().join("log"))).unwrap();
    log.append_wait(batch(b"before")).unwrap();
    fail::cfg(
        "ballast_log::disk_full",
        &format!("return({})", flag.display()),
    )
    .unwrap();
    std::fs::write(&flag, b"").unwrap();
    // Past the preallocated space, so that the write needs new blocks.
    let big = vec![b'y'; 5 << 20];
    assert!(matches!(
        log.append_wait(batch(&big)),
        Err(LogError::DiskFull(_))
    ));
    let stats = log.stats();
    assert!(stats.disk_full && !stats.failed);
    assert_eq!(stats.rejected_disk_full, 1);
    // Space returns: the writer's probe sees it without any append.
    std::fs::remove_file(&flag).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while log.stats().disk_full {
        assert!(std::time::Instant::now() < deadline, "no probe cleared it");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    log.append_wait(batch(b"after")).unwrap();
    assert_eq!(payloads(&log), vec![b"before".to_vec(), b"after".to_vec()]);
    scenario.teardown();
}
