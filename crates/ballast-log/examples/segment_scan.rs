//! Descriptors a log of many segments holds, and how fast a full scan reads it back:
//! writes SEGMENTS segments of SEGMENT_KIB KiB (records of 500 bytes), reopens the log,
//! counts the descriptors the process holds on files in the log directory, then times
//! full scans (`read` of up to 1,000 records / 4 MiB at a time, as the server's store
//! does) by one reader, and by READERS readers at once.
//!
//! `cargo run --release -p ballast-log --example segment_scan -- [DIR] [SEGMENTS] [SEGMENT_KIB] [READERS]`

use std::path::Path;
use std::time::Instant;

use ballast_log::{Batch, Log, LogConfig};

fn fds_into(dir: &Path) -> usize {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return 0;
    };
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|t| t.starts_with(&dir))
                .count()
        })
        .unwrap_or(0)
}

/// Reads every record once; returns (records, bytes).
fn scan(log: &Log) -> (u64, u64) {
    let (mut n, mut bytes) = (0u64, 0u64);
    let mut pos = log.start();
    loop {
        let b = match log.read(pos, 1000, 4 << 20) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("read at {pos}: {e}");
                std::process::exit(1);
            }
        };
        if b.records.is_empty() && b.next == pos {
            return (n, bytes);
        }
        n += b.records.len() as u64;
        bytes += b
            .records
            .iter()
            .map(|r| r.payload.len() as u64)
            .sum::<u64>();
        pos = b.next;
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("ballast-segment-scan"));
    let segments: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let kib: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(64);
    let readers: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(4);
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = LogConfig::new(&dir);
    config.segment_bytes = kib << 10;
    config.preallocate = false;
    {
        let (log, _) = Log::open(config.clone()).unwrap_or_else(|e| {
            eprintln!("opening {}: {e}", dir.display());
            std::process::exit(1);
        });
        let record = vec![b'x'; 500];
        let per_batch = ((kib << 10) / 512 / 4).max(1);
        while (log.stats().segments as u64) <= segments {
            let mut b = Batch::new();
            for _ in 0..per_batch {
                let _ = b.push(&record);
            }
            if let Err(e) = log.append_wait(b) {
                eprintln!("append: {e}");
                std::process::exit(1);
            }
        }
    }
    let (log, report) = Log::open(config).unwrap_or_else(|e| {
        eprintln!("reopening {}: {e}", dir.display());
        std::process::exit(1);
    });
    println!(
        "{} segments of {kib} KiB, {} records: {} descriptors on the log directory after open",
        report.segments,
        report.records,
        fds_into(&dir)
    );
    let mut single = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let (n, bytes) = scan(&log);
        let s = t.elapsed().as_secs_f64();
        single.push(bytes as f64 / s / 1e6);
        assert_eq!(n, report.records);
    }
    single.sort_by(|a, b| a.total_cmp(b));
    println!(
        "1 reader, full scan: median {:.0} MB/s (of 5: {:.0}..{:.0}); descriptors after: {}",
        single[2],
        single[0],
        single[4],
        fds_into(&dir)
    );
    let log = std::sync::Arc::new(log);
    let t = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..readers)
            .map(|_| {
                let log = log.clone();
                s.spawn(move || scan(&log).1)
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    println!(
        "{readers} readers at once, a full scan each: {:.0} MB/s together; descriptors after: {}",
        total as f64 / t.elapsed().as_secs_f64() / 1e6,
        fds_into(&dir)
    );
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
}
