//! ballast-log: a segmented, checksummed, group-committed append-only log.
//!
//! - Records are framed with their length and CRC32C (see [`frame`]) and appended to
//!   segment files named by the log position of their first byte (`<base>.seg`).
//! - One writer thread *group-commits*: it takes every batch submitted since its last
//!   write, writes them, calls `fdatasync` once, then completes all of them. A batch is
//!   durable when its completion reports `Ok`.
//! - A position is a byte offset in the whole log; it never changes for a record, across
//!   segment rolls, restarts and recovery.
//! - Readers read durable records from a position; named consumers acknowledge up to a
//!   position (persisted atomically); a segment is deleted once every consumer is past it.
//! - A failed `fdatasync` is fatal for the writer: it completes that group and every later
//!   batch with an error and never writes again. The next open recovers from the files.
//!   A full disk (ENOSPC) and a segment that cannot be created (e.g. no file descriptor
//!   left) are not fatal: the batches concerned are refused (`DiskFull`, `Unavailable`),
//!   the writer goes on, and probes by itself until it can write again.
//! - Only the active segment keeps a file open; sealed segments are opened when read,
//!   through a small cache of read handles (`handles.rs`), so the descriptors a log holds
//!   do not grow with its backlog.
//!
//! No HTTP, no configuration formats, no async runtime: the server wraps it, and an SDK's
//! on-device queue can reuse it.

mod cursor;
mod error;
pub mod frame;
mod fs;
mod handles;
mod prepare;
mod recovery;
mod shared;
mod vfs;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, RwLock};

/// What a read guesses a frame takes before any read has measured it.
const FIRST_FRAME_LEN_HINT: usize = 2048;
use std::thread::JoinHandle;
use std::time::Duration;

pub use cursor::{get_varint, put_varint, ConsumerProgress, MAX_DONE_RANGES};
pub use error::LogError;
pub use frame::{Batch, PushError, HEADER_LEN, MAX_RECORD_BYTES};
pub use fs::write_atomically;
pub use recovery::SegmentRecovery;
pub use shared::{Appended, LogConfig, Position};

use cursor::valid_consumer_name;
use error::io_err;
use fs::{list_segments, segment_path, sync_dir};
use shared::{lock, read_lock, write_lock, Counters, Segment, Shared, Submission};
use vfs::Vfs;

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub position: Position,
    /// A slice of the chunk it was read in (no copy of its own).
    pub payload: bytes::Bytes,
}

/// Records read from a position, and where the next read starts.
#[derive(Debug, Clone, Default)]
pub struct ReadBatch {
    pub records: Vec<Record>,
    pub next: Position,
}

/// What opening the log found.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    pub corrupt_records: u64,
    pub corrupt_bytes: u64,
    pub torn_tail_bytes: u64,
    pub quarantine_files: Vec<PathBuf>,
    /// Consumers whose saved cursor was past the end of what the log holds (records it
    /// had made durable are missing); each was moved back to the end. Always 0 unless
    /// the disk lost synced data.
    pub cursors_past_end: u64,
}

/// Counters of a running log.
#[derive(Debug, Clone, Default)]
pub struct LogStats {
    /// Batches submitted and made durable.
    pub appends: u64,
    pub records: u64,
    pub bytes_written: u64,
    /// `fdatasync` calls on segments (group commits plus segment rolls).
    pub fsyncs: u64,
    pub fsync_nanos: u64,
    /// Number of groups whose fsync covered more than one batch.
    pub shared_fsyncs: u64,
    pub rejected_quota: u64,
    /// Batches refused because the disk was full (ENOSPC).
    pub rejected_disk_full: u64,
    /// Batches refused because a new segment could not be created (transient).
    pub rejected_unavailable: u64,
    /// The last write ran out of disk space and no write or probe has succeeded since.
    pub disk_full: bool,
    /// Why the writer cannot start a new segment right now (it retries), if it cannot.
    pub unavailable: Option<String>,
    /// The last append that needed space was refused for the quota (nothing was freed
    /// since): the log is full for practical purposes.
    pub quota_blocked: bool,
    pub bytes_on_disk: u64,
    /// Data records in the retained segments (recovered at open, appended since, minus
    /// deleted segments).
    pub stored_records: u64,
    pub segments: usize,
    pub start: Position,
    pub durable_end: Position,
    pub quarantined_records: u64,
    pub torn_tail_bytes: u64,
    pub failed: bool,
    /// Sealed segments open for reads now (at most `LogConfig::read_handles`; the active
    /// segment's file is the writer's).
    pub read_handles: usize,
    /// Times a sealed segment was opened for a read (the handle was not cached).
    pub segment_opens: u64,
}

/// An open log. Dropping it stops the writer after it has finished what was submitted.
pub struct Log {
    shared: Arc<Shared>,
    tx: Mutex<Option<mpsc::Sender<Submission>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    _lock: vfs::DirLock,
}

impl Log {
    /// Opens (or creates) the log in `config.dir`, recovering it first.
    pub fn open(config: LogConfig) -> Result<(Log, RecoveryReport), LogError> {
        Log::open_with(config, Arc::new(vfs::Real))
    }

    /// Opens the log on a given file system (the real one, or a simulated disk in tests).
    pub(crate) fn open_with(
        config: LogConfig,
        fs: Arc<dyn Vfs>,
    ) -> Result<(Log, RecoveryReport), LogError> {
        let dir = config.dir.clone();
        fs::create_dir_durably(&*fs, &dir)?;
        let lock_path = dir.join("LOCK");
        let lock = match fs.lock(&lock_path) {
            Ok(Some(lock)) => lock,
            Ok(None) => return Err(LogError::Locked(dir)),
            Err(e) => return Err(io_err("locking", &lock_path)(e)),
        };
        // A segment that was being prepared when the last process stopped: never a
        // segment, never data.
        let stale = dir.join(prepare::PREPARED_NAME);
        if fs.exists(&stale) {
            fs.remove_file(&stale)
                .map_err(io_err("deleting unused prepared segment", &stale))?;
        }
        let cursor_dir = dir.join("cursors");
        fs::create_dir_durably(&*fs, &cursor_dir)?;
        let mut cursors = cursor::load(&*fs, &cursor_dir)?;
        let qdir = dir.join("quarantine");

        let mut listed = list_segments(&*fs, &dir)?;
        // Segments every consumer is past are deleted without being read again.
        let min_cursor = cursors.values().map(|c| c.cursor).min();
        if let Some(min) = min_cursor {
            while listed.len() > 1 && listed[1].0 <= min {
                let (_, path) = listed.remove(0);
                fs.remove_file(&path)
                    .map_err(io_err("deleting consumed segment", &path))?;
            }
        }
        let mut report = RecoveryReport::default();
        if listed.is_empty() {
            let path = segment_path(&dir, 0);
            fs.open(&path, vfs::Mode::CreateTruncate)
                .map_err(io_err("creating segment", &path))?;
            sync_dir(&*fs, &dir)?;
            listed.push((0, path));
        }
        let mut segments = Vec::with_capacity(listed.len());
        let mut bytes_on_disk = 0u64;
        let mut prev_end = 0u64;
        for (base, path) in listed {
            if base < prev_end {
                return Err(LogError::Unrecoverable(format!(
                    "segment {} starts at {base}, inside the previous segment (ends at {prev_end})",
                    path.display()
                )));
            }
            let r = recovery::recover_segment(&*fs, &path, base, &qdir)?;
            report.segments += 1;
            report.records += r.records;
            report.corrupt_records += r.corrupt_records;
            report.corrupt_bytes += r.corrupt_bytes;
            report.torn_tail_bytes += r.torn_tail_bytes;
            report.quarantine_files.extend(r.quarantine_files);
            // Recovery read the file and closed it: a sealed segment is opened again
            // only when read (`handles.rs`), so opening costs no descriptor per segment.
            bytes_on_disk += r.valid_len;
            prev_end = base + r.valid_len;
            segments.push(Segment {
                base,
                end: prev_end,
                records: r.records,
                path,
            });
        }
        // A cursor is saved only for durable records, so none can be past the end; one
        // that is (the log lost records it had made durable) would make the consumer skip
        // every record appended from now on until the log grows past it: it is brought
        // back to the end, and counted.
        for (name, c) in cursors.iter_mut() {
            if c.cursor > prev_end {
                tracing::error!(
                    consumer = %name, cursor = c.cursor, end = prev_end,
                    "a consumer's cursor is past the end of the log; moved back to the end"
                );
                report.cursors_past_end += 1;
                c.cursor = prev_end;
            }
            c.done.retain(|r| r.1 <= prev_end);
        }
        let durable_end = prev_end;
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            cursor_dir,
            fs,
            segments: RwLock::new(segments),
            handles: Mutex::new(handles::Handles::new(config.read_handles)),
            durable: Mutex::new(durable_end),
            durable_cv: Condvar::new(),
            bytes_on_disk: AtomicU64::new(bytes_on_disk),
            quota_blocked: AtomicBool::new(false),
            disk_full: AtomicBool::new(false),
            unavailable: Mutex::new(None),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            counters: Counters::default(),
            cursors: Mutex::new(cursors),
            quarantined_records: report.corrupt_records,
            torn_tail_bytes: report.torn_tail_bytes,
            frame_len_hint: AtomicUsize::new(FIRST_FRAME_LEN_HINT),
        });
        let (tx, rx) = mpsc::channel();
        let writer = writer::Writer::new(shared.clone(), &config)?;
        let handle = std::thread::Builder::new()
            .name("ballast-log-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err("starting writer thread", &dir))?;
        Ok((
            Log {
                shared,
                tx: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(handle)),
                _lock: lock,
            },
            report,
        ))
    }

    /// Submits a batch; `done` is called (on the writer thread) once it is durable or
    /// has failed. Keep `done` short: it runs before the next group commit.
    pub fn append(
        &self,
        batch: Batch,
        done: impl FnOnce(Result<Appended, LogError>) + Send + 'static,
    ) {
        if self.shared.failed.load(Ordering::Acquire) {
            done(Err(self.shared.failure_error()));
            return;
        }
        let sub = Submission {
            batch,
            done: Box::new(done),
        };
        let refused = match &*lock(&self.tx) {
            Some(tx) => tx.send(sub).err().map(|mpsc::SendError(sub)| sub),
            None => Some(sub),
        };
        if let Some(sub) = refused {
            (sub.done)(Err(LogError::Closed));
        }
    }

    /// Submits a batch and waits until it is durable.
    pub fn append_wait(&self, batch: Batch) -> Result<Appended, LogError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.append(batch, move |r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or(Err(LogError::Closed))
    }

    /// Position of the oldest retained record.
    pub fn start(&self) -> Position {
        let segs = read_lock(&self.shared.segments);
        segs.first().map(|s| s.base).unwrap_or(0)
    }

    /// Position just after the last durable record.
    pub fn durable_end(&self) -> Position {
        *lock(&self.shared.durable)
    }

    /// Waits until the durable end is beyond `pos` or `timeout` passed; returns the end.
    pub fn wait_beyond(&self, pos: Position, timeout: Duration) -> Position {
        let guard = lock(&self.shared.durable);
        let (guard, _) = self
            .shared
            .durable_cv
            .wait_timeout_while(guard, timeout, |end| *end <= pos)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }

    /// Reads durable records at or after `from`: at most `max_records`, and stopping
    /// after the record that reaches `max_bytes` of payload.
    pub fn read(
        &self,
        from: Position,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, LogError> {
        let durable = self.durable_end();
        let segs = read_lock(&self.shared.segments);
        let mut out = ReadBatch {
            records: Vec::new(),
            next: from,
        };
        let Some(first) = segs.first() else {
            return Ok(out);
        };
        let mut pos = from.max(first.base);
        let mut idx = segs.partition_point(|s| s.base <= pos).saturating_sub(1);
        let mut bytes = 0usize;
        let hint = self.shared.frame_len_hint.load(Ordering::Relaxed).max(64);
        let start = pos;
        // A frame larger than the chunk just read: read exactly that much next.
        let mut big = 0usize;
        'segments: while idx < segs.len() {
            let seg = &segs[idx];
            let seg_end = seg.end.min(durable);
            let file = if pos < seg_end {
                match self.shared.read_handle(seg) {
                    Ok(f) => Some(f),
                    Err(e) if out.records.is_empty() => return Err(e),
                    // What was read is returned; the next read tries this segment again.
                    Err(_) => break,
                }
            } else {
                None
            };
            while pos < seg_end {
                if out.records.len() >= max_records || bytes >= max_bytes {
                    break 'segments;
                }
                // Read a chunk, then take every complete frame in it.
                // Size the chunk by what was asked for (the frames the last read saw, a
                // quarter more), not only by the byte budget: a read of one record must
                // not read megabytes, and a chunk twice too large was copied twice over.
                let records_left = max_records - out.records.len();
                let per_frame = hint + hint / 4;
                let budget = max_bytes
                    .saturating_sub(bytes)
                    .min(records_left.saturating_mul(per_frame))
                    .max(4096);
                let want = match std::mem::take(&mut big) {
                    0 => ((seg_end - pos) as usize).min(budget),
                    frame_len => frame_len,
                };
                let Some(file) = &file else {
                    break;
                };
                let buf = file
                    .read_exact_at(want, pos - seg.base)
                    .map_err(io_err("reading segment", &seg.path))?;
                // The records are slices of this chunk: one allocation a chunk, no copy.
                let chunk = bytes::Bytes::from(buf);
                let mut at = 0usize;
                while at < chunk.len() {
                    let Some(h) = frame::decode_header(&chunk[at..]) else {
                        return Err(LogError::Corrupt {
                            position: pos + at as u64,
                            detail: "invalid record header".into(),
                        });
                    };
                    let frame_len = HEADER_LEN + h.len;
                    if at + frame_len > chunk.len() {
                        if at == 0 {
                            // One frame larger than the chunk: read exactly that frame.
                            big = frame_len;
                        }
                        break;
                    }
                    let payload = chunk.slice(at + HEADER_LEN..at + frame_len);
                    if crc32c::crc32c(&payload) != h.payload_crc {
                        return Err(LogError::Corrupt {
                            position: pos + at as u64,
                            detail: "payload checksum mismatch".into(),
                        });
                    }
                    if h.kind == frame::Kind::Data {
                        bytes += payload.len();
                        out.records.push(Record {
                            position: pos + at as u64,
                            payload,
                        });
                    }
                    at += frame_len;
                    if out.records.len() >= max_records || bytes >= max_bytes {
                        break;
                    }
                }
                pos += at as u64;
            }
            out.next = pos;
            if pos < seg_end {
                break;
            }
            idx += 1;
            match segs.get(idx) {
                Some(next) if next.base <= durable => pos = next.base,
                _ => break,
            }
        }
        out.next = pos;
        // Every frame read (data or not) was walked from `start` to `pos`, except across a
        // segment boundary's gap, which is rare enough not to skew the average.
        if !out.records.is_empty() && pos > start {
            let frames = out.records.len().max(1);
            let avg = usize::try_from((pos - start) / frames as u64).unwrap_or(usize::MAX);
            self.shared
                .frame_len_hint
                .store(avg.clamp(64, 1 << 20), Ordering::Relaxed);
        }
        Ok(out)
    }

    /// Registers a consumer (idempotent); returns its cursor. A new consumer starts at
    /// the oldest retained record.
    pub fn register_consumer(&self, name: &str) -> Result<Position, LogError> {
        if !valid_consumer_name(name) {
            return Err(LogError::BadConsumerName(name.to_string()));
        }
        let mut cursors = lock(&self.shared.cursors);
        if let Some(c) = cursors.get(name) {
            return Ok(c.cursor);
        }
        let start = self.start();
        cursor::save(
            &*self.shared.fs,
            &self.shared.cursor_dir,
            name,
            Some(start),
            None,
        )?;
        cursors.insert(
            name.to_string(),
            cursor::Consumer {
                cursor: start,
                ..Default::default()
            },
        );
        Ok(start)
    }

    /// Forgets a consumer (its cursor no longer holds segments back).
    pub fn remove_consumer(&self, name: &str) -> Result<(), LogError> {
        let mut cursors = lock(&self.shared.cursors);
        if cursors.remove(name).is_some() {
            cursor::remove(&*self.shared.fs, &self.shared.cursor_dir, name)?;
        }
        drop(cursors);
        self.delete_consumed_segments()
    }

    /// The consumer's cursor, if registered.
    pub fn cursor(&self, name: &str) -> Option<Position> {
        lock(&self.shared.cursors).get(name).map(|c| c.cursor)
    }

    /// The consumer's cursor and the ranges finished above it (as last acknowledged,
    /// across restarts), if registered.
    pub fn progress(&self, name: &str) -> Option<ConsumerProgress> {
        lock(&self.shared.cursors)
            .get(name)
            .map(|c| ConsumerProgress {
                cursor: c.cursor,
                done: c.done.clone(),
            })
    }

    /// All consumers and their cursors.
    pub fn cursors(&self) -> BTreeMap<String, Position> {
        lock(&self.shared.cursors)
            .iter()
            .map(|(n, c)| (n.clone(), c.cursor))
            .collect()
    }

    /// Moves the consumer's cursor to `upto` (everything before it is done), persists it
    /// atomically, and deletes segments every consumer is past. Moving backwards is
    /// ignored. Each call costs two fsyncs: call it for many records at a time.
    pub fn ack(&self, name: &str, upto: Position) -> Result<(), LogError> {
        self.ack_progress(name, upto, &[])
    }

    /// Like [`Log::ack`], and records the ranges finished above the cursor (half-open,
    /// ascending; at most [`MAX_DONE_RANGES`] are kept, the rest is dropped: handed out
    /// again after a restart, never skipped). They replace the last ones, unless the
    /// cursor is behind the saved one (then nothing changes). Ranges past the durable
    /// end are refused like such a cursor. An empty list leaves the saved ranges file as
    /// it is (what it says stays true) and costs nothing more than [`Log::ack`]; a
    /// changed list costs one more file write and fsync. A position acknowledged as
    /// finished must stay finished: after a restart, ranges saved earlier may come back.
    pub fn ack_progress(
        &self,
        name: &str,
        upto: Position,
        done: &[(Position, Position)],
    ) -> Result<(), LogError> {
        let durable = self.durable_end();
        let furthest = done.iter().map(|r| r.1).max().unwrap_or(0).max(upto);
        if furthest > durable {
            return Err(LogError::AckBeyondEnd {
                requested: furthest,
                durable,
            });
        }
        let moved = {
            let mut cursors = lock(&self.shared.cursors);
            let Some(cur) = cursors.get_mut(name) else {
                return Err(LogError::UnknownConsumer(name.to_string()));
            };
            if upto < cur.cursor {
                return Ok(());
            }
            let done = cursor::sanitize(upto, done);
            let new_cursor = (upto > cur.cursor).then_some(upto);
            // The ranges file is rewritten when it would say something new: the saved
            // ranges still above the cursor are not these.
            let saved_above = cur
                .saved
                .as_ref()
                .map(|(_, d)| cursor::above(upto, d))
                .unwrap_or_default();
            let new_done = (!done.is_empty() && done != saved_above).then_some((upto, &done[..]));
            if new_cursor.is_none() && new_done.is_none() {
                cur.done = done;
                return Ok(());
            }
            cursor::save(
                &*self.shared.fs,
                &self.shared.cursor_dir,
                name,
                new_cursor,
                new_done,
            )?;
            if new_done.is_some() {
                cur.saved = Some((upto, done.clone()));
            }
            cur.cursor = upto;
            cur.done = done;
            new_cursor.is_some()
        };
        if moved {
            self.delete_consumed_segments()?;
        }
        Ok(())
    }

    fn delete_consumed_segments(&self) -> Result<(), LogError> {
        let Some(min) = lock(&self.shared.cursors).values().map(|c| c.cursor).min() else {
            return Ok(());
        };
        let mut doomed = Vec::new();
        {
            let mut segs = write_lock(&self.shared.segments);
            let mut handles = lock(&self.shared.handles);
            while segs.len() > 1 && segs[1].base <= min {
                let seg = segs.remove(0);
                handles.remove(seg.base);
                doomed.push(seg);
            }
        }
        for seg in doomed {
            self.shared
                .fs
                .remove_file(&seg.path)
                .map_err(io_err("deleting segment", &seg.path))?;
            self.shared
                .bytes_on_disk
                .fetch_sub(seg.end - seg.base, Ordering::AcqRel);
            self.shared.set_quota_blocked(false);
            tracing::debug!(segment = %seg.path.display(), "deleted consumed segment");
        }
        Ok(())
    }

    /// Current counters.
    pub fn stats(&self) -> LogStats {
        let c = &self.shared.counters;
        let segs = read_lock(&self.shared.segments);
        let handles = lock(&self.shared.handles);
        LogStats {
            appends: c.appends.load(Ordering::Relaxed),
            records: c.records.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            fsync_nanos: c.fsync_nanos.load(Ordering::Relaxed),
            shared_fsyncs: c.shared_fsyncs.load(Ordering::Relaxed),
            rejected_quota: c.rejected_quota.load(Ordering::Relaxed),
            rejected_disk_full: c.rejected_disk_full.load(Ordering::Relaxed),
            rejected_unavailable: c.rejected_unavailable.load(Ordering::Relaxed),
            disk_full: self.shared.disk_full.load(Ordering::Acquire),
            unavailable: lock(&self.shared.unavailable).clone(),
            quota_blocked: self.shared.quota_blocked.load(Ordering::Acquire),
            bytes_on_disk: self.shared.bytes_on_disk.load(Ordering::Relaxed),
            stored_records: segs.iter().map(|s| s.records).sum(),
            segments: segs.len(),
            start: segs.first().map(|s| s.base).unwrap_or(0),
            durable_end: self.durable_end(),
            quarantined_records: self.shared.quarantined_records,
            torn_tail_bytes: self.shared.torn_tail_bytes,
            failed: self.shared.failed.load(Ordering::Relaxed),
            read_handles: handles.cached(),
            segment_opens: handles.opened(),
        }
    }

    /// The directory of the log.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// True once the writer has stopped after a failure.
    pub fn has_failed(&self) -> bool {
        self.shared.failed.load(Ordering::Acquire)
    }

    /// Stops the writer after everything submitted so far is written and synced; later
    /// appends fail with `Closed`. Reads keep working.
    pub fn close(&self) {
        drop(lock(&self.tx).take());
        let handle = lock(&self.writer).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        self.close();
    }
}

/// Reads every record of a log directory without changing anything, for inspection
/// while a server may be running: `visit(position, payload)` for each record, and
/// `damaged(position, len)` for each damaged stretch. A partly written tail is ignored.
pub fn scan_dir(
    dir: &Path,
    mut visit: impl FnMut(Position, &[u8]),
    mut damaged: impl FnMut(Position, usize),
) -> Result<(), LogError> {
    for (base, path) in list_segments(&vfs::Real, dir)? {
        let buf = match std::fs::read(&path) {
            Ok(b) => b,
            // Deleted by a running server since the listing: it was fully consumed.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("reading segment", &path)(e)),
        };
        recovery::scan_segment_readonly(&buf, |found| match found {
            recovery::Found::Record { offset, payload } => visit(base + offset as u64, payload),
            recovery::Found::Damaged { offset, len } => damaged(base + offset as u64, len),
        });
    }
    Ok(())
}

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod sim_tests;
#[cfg(test)]
mod tests;
