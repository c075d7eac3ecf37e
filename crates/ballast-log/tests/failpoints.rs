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
