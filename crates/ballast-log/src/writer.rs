//! The single writer thread: group commit.
//!
//! It blocks for one submission, then takes every submission already queued (up to
//! `max_group_bytes`), writes them all, calls `fdatasync` once and completes them. While
//! it syncs, new submissions queue up and form the next group, so the number of fsyncs
//! per second stays bounded by the disk while throughput grows with concurrency.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use crate::{
    io_err, lock, segment_path, sync_dir, write_lock, Appended, LogConfig, LogError, Position,
    Segment, Shared, Submission,
};

macro_rules! failpoint {
    ($name:literal) => {{
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |_| Err(std::io::Error::other(concat!(
            "failpoint ",
            $name
        ))));
    }};
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    file: File,
    /// Base position of the active segment.
    base: Position,
    /// Length of the active segment (everything written to it, synced or not).
    len: u64,
    segment_bytes: u64,
    max_bytes: Option<u64>,
    max_group_bytes: usize,
}

fn write_all(file: &mut File, buf: &[u8]) -> std::io::Result<()> {
    failpoint!("ballast_log::write");
    file.write_all(buf)
}

fn sync(file: &File) -> std::io::Result<()> {
    failpoint!("ballast_log::fsync");
    file.sync_data()
}

impl Writer {
    pub(crate) fn new(shared: Arc<Shared>, config: &LogConfig) -> Result<Writer, LogError> {
        let (base, len, path) = {
            let segs = crate::read_lock(&shared.segments);
            let last = segs
                .last()
                .ok_or_else(|| LogError::Unrecoverable("no segment".into()))?;
            (last.base, last.end - last.base, last.path.clone())
        };
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err("opening active segment", &path))?;
        Ok(Writer {
            shared,
            file,
            base,
            len,
            segment_bytes: config.segment_bytes.max(1),
            max_bytes: config.max_bytes,
            max_group_bytes: config.max_group_bytes.max(1),
        })
    }

    pub(crate) fn run(mut self, rx: mpsc::Receiver<Submission>) {
        let mut group: Vec<Submission> = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut bytes = first.batch.buf.len();
            group.push(first);
            while bytes < self.max_group_bytes {
                match rx.try_recv() {
                    Ok(sub) => {
                        bytes += sub.batch.buf.len();
                        group.push(sub);
                    }
                    Err(_) => break,
                }
            }
            if let Err(fatal) = self.commit(&mut group) {
                self.fail(fatal, &mut group, &rx);
                return;
            }
        }
    }

    /// Writes and syncs one group. Returns `Err` only for fatal failures (after which
    /// nothing may be acknowledged); recoverable ones complete their submissions with an
    /// error and return `Ok`.
    fn commit(&mut self, group: &mut Vec<Submission>) -> Result<(), String> {
        let mut written: Vec<(Submission, Appended)> = Vec::with_capacity(group.len());
        let mut used = self.shared.bytes_on_disk.load(Ordering::Acquire);
        let mut pending = std::mem::take(group).into_iter();
        while let Some(sub) = pending.next() {
            let n = sub.batch.buf.len() as u64;
            if sub.batch.records == 0 {
                let at = self.base + self.len;
                written.push((
                    sub,
                    Appended {
                        first: at,
                        end: at,
                        records: 0,
                    },
                ));
                continue;
            }
            if let Some(limit) = self.max_bytes {
                if used + n > limit {
                    self.shared
                        .counters
                        .rejected_quota
                        .fetch_add(1, Ordering::Relaxed);
                    self.shared.quota_blocked.store(true, Ordering::Release);
                    (sub.done)(Err(LogError::QuotaExceeded {
                        used,
                        limit,
                        needed: n,
                    }));
                    continue;
                }
            }
            if self.len >= self.segment_bytes {
                if let Err(e) = self.roll() {
                    match e {
                        RollError::Fatal(msg) => {
                            group.push(sub);
                            group.extend(written.into_iter().map(|(s, _)| s));
                            group.extend(pending);
                            return Err(msg);
                        }
                        RollError::Recoverable(err) => {
                            (sub.done)(Err(err));
                            continue;
                        }
                    }
                }
            }
            match write_all(&mut self.file, &sub.batch.buf) {
                Ok(()) => {
                    let first = self.base + self.len;
                    self.len += n;
                    used += n;
                    let records = sub.batch.records;
                    written.push((
                        sub,
                        Appended {
                            first,
                            end: first + n,
                            records,
                        },
                    ));
                }
                Err(e) if e.kind() == ErrorKind::StorageFull => {
                    // Undo the partial write; what was written before it is still good.
                    if let Err(te) = self.file.set_len(self.len) {
                        group.push(sub);
                        group.extend(written.into_iter().map(|(s, _)| s));
                        group.extend(pending);
                        return Err(format!(
                            "disk full, then truncating the segment failed: {te}"
                        ));
                    }
                    (sub.done)(Err(LogError::DiskFull(e.to_string())));
                }
                Err(e) => {
                    group.push(sub);
                    group.extend(written.into_iter().map(|(s, _)| s));
                    group.extend(pending);
                    return Err(format!("write failed: {e}"));
                }
            }
        }
        if written.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        if let Err(e) = sync(&self.file) {
            group.extend(written.into_iter().map(|(s, _)| s));
            return Err(format!("fdatasync failed: {e}"));
        }
        let c = &self.shared.counters;
        c.fsync_nanos
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        c.fsyncs.fetch_add(1, Ordering::Relaxed);
        if written.len() > 1 {
            c.shared_fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        let end = self.base + self.len;
        let new_bytes = written.iter().map(|(_, a)| a.end - a.first).sum::<u64>();
        let records = written.iter().map(|(_, a)| a.records as u64).sum::<u64>();
        c.appends.fetch_add(written.len() as u64, Ordering::Relaxed);
        c.records.fetch_add(records, Ordering::Relaxed);
        c.bytes_written.fetch_add(new_bytes, Ordering::Relaxed);
        self.shared
            .bytes_on_disk
            .fetch_add(new_bytes, Ordering::AcqRel);
        self.shared.quota_blocked.store(false, Ordering::Release);
        {
            let mut segs = write_lock(&self.shared.segments);
            if let Some(last) = segs.last_mut() {
                last.end = end;
            }
        }
        {
            let mut durable = lock(&self.shared.durable);
            *durable = end;
        }
        self.shared.durable_cv.notify_all();
        for (sub, appended) in written {
            (sub.done)(Ok(appended));
        }
        Ok(())
    }

    /// Closes the active segment (already synced by the last commit) and starts a new one.
    fn roll(&mut self) -> Result<(), RollError> {
        // Everything in the old segment was synced before its submissions were answered;
        // sync once more in case a previous group wrote and then failed recoverably.
        sync(&self.file).map_err(|e| RollError::Fatal(format!("fdatasync failed: {e}")))?;
        self.shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        let base = self.base + self.len;
        let path = segment_path(&self.shared.dir, base);
        let file = match OpenOptions::new().create_new(true).append(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::StorageFull => {
                return Err(RollError::Recoverable(LogError::DiskFull(e.to_string())))
            }
            Err(e) => {
                return Err(RollError::Fatal(format!(
                    "creating {}: {e}",
                    path.display()
                )))
            }
        };
        if let Err(e) = sync_dir(&self.shared.dir) {
            return Err(RollError::Fatal(e.to_string()));
        }
        let read = File::open(&path)
            .map_err(|e| RollError::Fatal(format!("opening {}: {e}", path.display())))?;
        {
            let mut segs = write_lock(&self.shared.segments);
            segs.push(Segment {
                base,
                end: base,
                file: Arc::new(read),
                path,
            });
        }
        self.file = file;
        self.base = base;
        self.len = 0;
        Ok(())
    }

    /// After a fatal failure: fail this group and everything submitted later.
    fn fail(&self, msg: String, group: &mut Vec<Submission>, rx: &mpsc::Receiver<Submission>) {
        tracing::error!(error = %msg, "log writer failed; no further writes will be acknowledged");
        *lock(&self.shared.failure) = Some(msg.clone());
        self.shared.failed.store(true, Ordering::Release);
        for sub in group.drain(..) {
            (sub.done)(Err(LogError::WriterFailed(msg.clone())));
        }
        self.shared.durable_cv.notify_all();
        while let Ok(sub) = rx.recv() {
            (sub.done)(Err(LogError::WriterFailed(msg.clone())));
        }
    }
}

enum RollError {
    Fatal(String),
    Recoverable(LogError),
}
