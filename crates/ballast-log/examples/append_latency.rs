//! Append latency of the log alone (no HTTP): N threads, each appending one record of
//! about 700 bytes at a time and waiting until it is durable, as N connections sending
//! single events do. Prints throughput and latency percentiles, and the `fdatasync`s.
//!
//! `cargo run --release -p ballast-log --example append_latency -- [DIR] [THREADS] [SECONDS] [prealloc|noprealloc]`

use std::time::{Duration, Instant};

use ballast_log::{Batch, Log, LogConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("ballast-append-latency"));
    let threads: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
    let seconds: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    let preallocate = args.get(4).is_none_or(|s| s != "noprealloc");
    let _ = std::fs::remove_dir_all(&dir);
    let (log, _) = match Log::open(LogConfig {
        preallocate,
        ..LogConfig::new(&dir)
    }) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("opening {}: {e}", dir.display());
            std::process::exit(1);
        }
    };
    let log = std::sync::Arc::new(log);
    let record = vec![b'x'; 700];
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let log = log.clone();
            let record = record.clone();
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let mut b = Batch::new();
                    if b.push(&record).is_err() {
                        break;
                    }
                    let t = Instant::now();
                    if log.append_wait(b).is_err() {
                        break;
                    }
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_default())
        .collect();
    all.sort();
    let q = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    let s = log.stats();
    println!(
        "{} appends/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms; {} fsyncs ({:.2} ms mean)",
        all.len() as u64 / seconds.max(1),
        q(0.5),
        q(0.99),
        q(0.999),
        q(1.0),
        s.fsyncs,
        s.fsync_nanos as f64 / 1e6 / s.fsyncs.max(1) as f64
    );
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
}
