//! The file destination's writer: group commit on one dedicated thread.
//!
//! `deliver` hands its events to the writer thread and waits. The thread takes every
//! delivery waiting at that moment, writes all their lines with one `write`, calls
//! `fdatasync` once, then answers all of them; while it syncs, the next group forms. So
//! the router's concurrent deliveries (`concurrency` of them, `batch_size` events each)
//! share one fsync instead of queueing behind a lock for one fsync each.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::FileConfig;
use crate::destinations::{Destination, Event, Outcome};

/// One delivery waiting for the writer: its events and where to send the result.
struct Job {
    events: Vec<Event>,
    done: oneshot::Sender<Result<(), String>>,
}

pub struct FileSink {
    /// To the writer thread; the thread ends when the sink is dropped.
    jobs: mpsc::Sender<Job>,
    stats: Arc<WriterStats>,
}

/// What the writer did (for tests and the group-commit check).
#[derive(Default)]
pub struct WriterStats {
    pub syncs: AtomicU64,
    pub deliveries: AtomicU64,
}

struct Inner {
    path: PathBuf,
    max_bytes: u64,
    file: Option<File>,
    size: u64,
}

impl FileSink {
    pub fn new(c: &FileConfig) -> std::io::Result<FileSink> {
        if let Some(dir) = c.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut inner = Inner {
            path: c.path.clone(),
            max_bytes: c.max_file_bytes.max(1),
            file: None,
            size: 0,
        };
        let stats = Arc::new(WriterStats::default());
        let (tx, rx) = mpsc::channel::<Job>();
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("ballast-file-sink".into())
            .spawn(move || inner.run(rx, &thread_stats))?;
        Ok(FileSink { jobs: tx, stats })
    }

    /// Fsyncs and deliveries so far.
    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)?.sync_all(),
        None => File::open(".")?.sync_all(),
    }
}

impl Inner {
    /// The writer thread: one group of waiting deliveries at a time, one write and one
    /// fsync each.
    fn run(&mut self, rx: mpsc::Receiver<Job>, stats: &WriterStats) {
        let mut buf = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            while let Ok(more) = rx.try_recv() {
                group.push(more);
            }
            buf.clear();
            for job in &group {
                for e in &job.events {
                    buf.extend_from_slice(&e.json);
                    buf.push(b'\n');
                }
            }
            let r = self.write(&buf);
            stats.syncs.fetch_add(1, Ordering::Relaxed);
            stats
                .deliveries
                .fetch_add(group.len() as u64, Ordering::Relaxed);
            let r = r.map_err(|e| {
                // Reopen next time; a partial group may remain, the retry writes it whole.
                self.file = None;
                e.to_string()
            });
            for job in group {
                // A delivery that stopped waiting (cancelled) needs no answer.
                let _ = job.done.send(r.clone());
            }
            // A large group's buffer is not kept for ever.
            if buf.capacity() > 16 << 20 {
                buf = Vec::new();
            }
        }
    }

    fn open(&mut self) -> std::io::Result<&mut File> {
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.size = f.metadata()?.len();
            sync_parent(&self.path)?;
            self.file = Some(f);
        }
        match self.file.as_mut() {
            Some(f) => Ok(f),
            None => Err(std::io::Error::other("file not open")),
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let mut rotated = self.path.as_os_str().to_owned();
        rotated.push(format!(".{stamp}"));
        std::fs::rename(&self.path, &rotated)?;
        sync_parent(&self.path)?;
        self.size = 0;
        Ok(())
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if self.size >= self.max_bytes && self.path.exists() {
            self.rotate()?;
        }
        let f = self.open()?;
        f.write_all(buf)?;
        f.sync_data()?;
        self.size += buf.len() as u64;
        Ok(())
    }
}

#[async_trait]
impl Destination for FileSink {
    async fn deliver(&self, events: &[Event]) -> Outcome {
        let (done, answer) = oneshot::channel();
        let job = Job {
            events: events.to_vec(),
            done,
        };
        if self.jobs.send(job).is_err() {
            return Outcome::Retry {
                status: None,
                reason: "the file writer stopped".into(),
                retry_after: None,
            };
        }
        match answer.await {
            Ok(Ok(())) => Outcome::Delivered,
            Ok(Err(e)) => Outcome::Retry {
                status: None,
                reason: format!("writing the file failed: {e}"),
                retry_after: None,
            },
            Err(_) => Outcome::Retry {
                status: None,
                reason: "the file writer stopped".into(),
                retry_after: None,
            },
        }
    }
}
