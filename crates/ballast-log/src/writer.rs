//! The single writer thread: group commit.
//!
//! It blocks for one submission, then takes every submission already queued (up to
//! `max_group_bytes`), copies them into one buffer, writes it with one positional write,
//! calls `fdatasync` once and completes them all. While it syncs, new submissions queue up
//! and form the next group, so fsyncs per second stay bounded by the disk while throughput
//! grows with concurrency.
//!
//! Segments are *preallocated*: zeros are written ahead of the data (as PostgreSQL does for
//! its WAL), so that an `fdatasync` does not change the file's size and has no metadata to
//! journal, which roughly halves its latency on ext4. A new segment normally arrives
//! zero-filled and synced from the preparer thread (see [`crate::prepare`]), so group
//! commits never write or sync zeros; only when none is ready (the segment active at
//! opening, a disk with little room) does the writer extend the segment itself, 1 MiB at
//! a time. Zeros past the last record are recognised as unused space by recovery, and
//! trimmed on roll and on close.

use std::io::ErrorKind;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::error::{io_err, LogError};
use crate::fs::segment_path;
use crate::prepare::{prepared_len, Prepared, Preparer};
use crate::shared::{lock, write_lock, Appended, LogConfig, Position, Segment, Shared, Submission};
use crate::vfs::{Mode, VFile, Vfs};

macro_rules! failpoint {
    ($name:literal) => {{
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |_| Err(std::io::Error::other(concat!(
            "failpoint ",
            $name
        ))));
    }};
}

static ZEROS: [u8; 64 << 10] = [0u8; 64 << 10];

/// While the disk is full or a new segment cannot be created, how often an idle writer
/// checks whether it can write again (so that readiness comes back with no traffic).
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// A full disk counts as having room again once this much (at least) can be written:
/// the size of the last refused group, within these bounds.
const MIN_PROBE_BYTES: u64 = 64 << 10;
const MAX_PROBE_BYTES: u64 = 16 << 20;

/// Injected ENOSPC for tests: `ballast_log::disk_full=return(PATH)` makes every write
/// fail with "No space left on device" while the file PATH exists (always without PATH).
fn injected_disk_full() -> std::io::Result<()> {
    #[cfg(feature = "failpoints")]
    if let Some(full) = fail::eval("ballast_log::disk_full", |arg| match arg {
        Some(p) => std::path::Path::new(&p).exists(),
        None => true,
    }) {
        if full {
            return Err(std::io::Error::from(ErrorKind::StorageFull));
        }
    }
    Ok(())
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    file: Arc<dyn VFile>,
    /// Base position of the active segment.
    base: Position,
    /// Bytes of records in the active segment (all synced).
    len: u64,
    /// Size of the active segment file (records, then zeros).
    allocated: u64,
    /// How far ahead to preallocate when the writer extends a segment itself (0: never).
    chunk: u64,
    /// Prepares the next segment ahead (with preallocation on).
    preparer: Option<Preparer>,
    /// A prepared segment taken from the preparer but not yet in use (its roll failed).
    spare: Option<Prepared>,
    segment_bytes: u64,
    max_bytes: Option<u64>,
    max_group_bytes: usize,
    /// The group being formed: its bytes, and the submissions they came from.
    buf: Vec<u8>,
    pending: Vec<(Submission, Appended)>,
    /// Latency of each fdatasync, for the application's metrics recorder (if any).
    fsync_seconds: metrics::Histogram,
    /// How much a space probe writes (see [`MIN_PROBE_BYTES`]).
    probe_bytes: u64,
}

fn write_at(file: &dyn VFile, buf: &[u8], offset: u64) -> std::io::Result<()> {
    failpoint!("ballast_log::write");
    injected_disk_full()?;
    file.write_all_at(buf, offset)
}

fn sync(file: &dyn VFile) -> std::io::Result<()> {
    failpoint!("ballast_log::fsync");
    file.sync_data()
}

fn sync_dir(fs: &dyn Vfs, dir: &std::path::Path) -> std::io::Result<()> {
    failpoint!("ballast_log::fsync");
    fs.sync_dir(dir)
}

/// A failure that ends the writer: nothing may be acknowledged after it.
struct Fatal(String);

/// Why a segment roll did not happen.
enum RollError {
    /// Sealing the old segment failed (its fsync): fatal.
    Fatal(Fatal),
    /// The new segment could not be created (no file descriptor, no space for the
    /// directory entry, ...): nothing was written, the roll is retried later.
    Transient(std::io::Error, String),
}

fn create_segment(fs: &dyn Vfs, path: &std::path::Path) -> std::io::Result<Arc<dyn VFile>> {
    failpoint!("ballast_log::create_segment");
    // Not `create_new`: an earlier attempt may have left the (empty) file behind; the
    // file's name is the end of the log, so nothing of value can be in it.
    fs.open(path, Mode::CreateTruncate)
}

/// Puts a prepared (zero-filled, synced) segment under the name `path`; the caller
/// syncs the directory.
fn adopt_segment(fs: &dyn Vfs, prepared: &Prepared, path: &std::path::Path) -> std::io::Result<()> {
    failpoint!("ballast_log::create_segment");
    fs.rename(&prepared.path, path)
}

impl Writer {
    pub(crate) fn new(shared: Arc<Shared>, config: &LogConfig) -> Result<Writer, LogError> {
        let (base, len, path) = {
            let segs = crate::shared::read_lock(&shared.segments);
            let last = segs
                .last()
                .ok_or_else(|| LogError::Unrecoverable("no segment".into()))?;
            (last.base, last.end - last.base, last.path.clone())
        };
        let file = shared
            .fs
            .open(&path, Mode::ReadWrite)
            .map_err(io_err("opening active segment", &path))?;
        lock(&shared.handles).set_active(base, file.clone());
        let allocated = file
            .len()
            .map_err(io_err("reading segment size", &path))?
            .max(len);
        let segment_bytes = config.segment_bytes.max(1);
        let mut preparer = if config.preallocate {
            Preparer::start(shared.fs.clone(), &shared.dir, prepared_len(segment_bytes))
        } else {
            None
        };
        if let Some(p) = &mut preparer {
            p.ask();
        }
        Ok(Writer {
            shared,
            file,
            base,
            len,
            allocated,
            chunk: if config.preallocate {
                segment_bytes.clamp(4096, 1 << 20)
            } else {
                0
            },
            preparer,
            spare: None,
            segment_bytes,
            max_bytes: config.max_bytes,
            max_group_bytes: config.max_group_bytes.max(1),
            buf: Vec::new(),
            pending: Vec::new(),
            fsync_seconds: metrics::histogram!("ballast_log_fsync_seconds"),
            probe_bytes: MIN_PROBE_BYTES,
        })
    }

    pub(crate) fn run(mut self, rx: mpsc::Receiver<Submission>) {
        let mut group: Vec<Submission> = Vec::new();
        loop {
            let first = if self.blocked() {
                // Check now and then whether the log can be written again, so that
                // readiness comes back without waiting for traffic.
                match rx.recv_timeout(PROBE_INTERVAL) {
                    Ok(sub) => sub,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if let Err(Fatal(msg)) = self.probe() {
                            self.fail(msg, &mut group, &rx);
                            return;
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(sub) => sub,
                    Err(_) => break,
                }
            };
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
            if let Err(Fatal(msg)) = self.commit(&mut group) {
                self.fail(msg, &mut group, &rx);
                return;
            }
        }
        // Closed: trim the preallocated zeros so the file holds exactly its records.
        if self.allocated > self.len
            && self
                .file
                .set_len(self.len)
                .and_then(|_| sync(&*self.file))
                .is_err()
        {
            tracing::warn!("could not trim the preallocated end of the active segment");
        }
    }

    /// Writes and syncs one group. Recoverable failures (quota, disk full) complete their
    /// submissions with an error; fatal ones are returned, with every submission not yet
    /// completed put back into `group`.
    fn commit(&mut self, group: &mut Vec<Submission>) -> Result<(), Fatal> {
        let mut used = self.shared.bytes_on_disk.load(Ordering::Acquire);
        let mut subs = std::mem::take(group).into_iter();
        while let Some(sub) = subs.next() {
            let n = sub.batch.buf.len() as u64;
            if sub.batch.records == 0 {
                let at = self.base + self.len + self.buf.len() as u64;
                let empty = Appended {
                    first: at,
                    end: at,
                    records: 0,
                    durable: self.base + self.len,
                };
                (sub.done)(Ok(empty));
                continue;
            }
            if let Some(limit) = self.max_bytes {
                if used + n > limit {
                    self.shared
                        .counters
                        .rejected_quota
                        .fetch_add(1, Ordering::Relaxed);
                    self.shared.set_quota_blocked(true);
                    (sub.done)(Err(LogError::QuotaExceeded {
                        used,
                        limit,
                        needed: n,
                    }));
                    continue;
                }
            }
            let at = self.len + self.buf.len() as u64;
            if at >= self.segment_bytes && at > 0 {
                if let Err(e) = self.flush() {
                    group.push(sub);
                    group.extend(subs);
                    return Err(e);
                }
                match self.roll() {
                    Ok(()) => {}
                    Err(RollError::Fatal(e)) => {
                        group.push(sub);
                        group.extend(subs);
                        return Err(e);
                    }
                    Err(RollError::Transient(e, msg)) => {
                        // Refuse this batch and the rest of the group; the next group
                        // tries again. Nothing is lost: none of them was acknowledged.
                        let refused = std::iter::once(sub).chain(subs);
                        for s in refused {
                            self.refuse(s, &e, &msg);
                        }
                        return Ok(());
                    }
                }
            }
            let first = self.base + self.len + self.buf.len() as u64;
            self.buf.extend_from_slice(&sub.batch.buf);
            used += n;
            let records = sub.batch.records;
            self.pending.push((
                sub,
                Appended {
                    first,
                    end: first + n,
                    records,
                    durable: first + n, // the group's end, set once it is synced
                },
            ));
        }
        self.flush()
    }

    /// Writes the pending group at the end of the records, syncs, completes it.
    fn flush(&mut self) -> Result<(), Fatal> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let need = self.len + self.buf.len() as u64;
        if self.chunk > 0 && need > self.allocated {
            if let Err(e) = self.preallocate(need) {
                if e.kind() != ErrorKind::StorageFull {
                    return Err(self.fatal(format!("preallocating the segment failed: {e}")));
                }
                // No room to preallocate ahead: give those zeros back and write just the
                // records, so that the last free space is still used.
                if let Err(te) = self.file.set_len(self.allocated.max(self.len)) {
                    return Err(self.fatal(format!("disk full, then truncating failed: {te}")));
                }
            }
        }
        if let Err(e) = write_at(&*self.file, &self.buf, self.len) {
            if e.kind() == ErrorKind::StorageFull {
                // Cut off what part of the group reached the file; the records before it
                // are intact and synced. The group is refused, the writer goes on.
                if let Err(te) = self.file.set_len(self.allocated.max(self.len)) {
                    return Err(self.fatal(format!("disk full, then truncating failed: {te}")));
                }
                self.refuse_pending_disk_full(&e);
                return Ok(());
            }
            return Err(self.fatal(format!("write failed: {e}")));
        }
        let t = Instant::now();
        if let Err(e) = sync(&*self.file) {
            return Err(self.fatal(format!("fdatasync failed: {e}")));
        }
        let took = t.elapsed();
        self.fsync_seconds.record(took.as_secs_f64());
        let c = &self.shared.counters;
        c.fsync_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        c.fsyncs.fetch_add(1, Ordering::Relaxed);
        if self.pending.len() > 1 {
            c.shared_fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        let new_bytes = self.buf.len() as u64;
        let records: u64 = self.pending.iter().map(|(_, a)| a.records as u64).sum();
        c.appends
            .fetch_add(self.pending.len() as u64, Ordering::Relaxed);
        c.records.fetch_add(records, Ordering::Relaxed);
        c.bytes_written.fetch_add(new_bytes, Ordering::Relaxed);
        self.len += new_bytes;
        self.allocated = self.allocated.max(self.len);
        self.buf.clear();
        self.shared
            .bytes_on_disk
            .fetch_add(new_bytes, Ordering::AcqRel);
        self.shared.set_quota_blocked(false);
        self.shared.set_disk_full(false, "");
        let end = self.base + self.len;
        if let Some(last) = write_lock(&self.shared.segments).last_mut() {
            last.end = end;
            last.records += records;
        }
        *lock(&self.shared.durable) = end;
        self.shared.durable_cv.notify_all();
        for (sub, appended) in self.pending.drain(..) {
            (sub.done)(Ok(Appended {
                durable: end,
                ..appended
            }));
        }
        Ok(())
    }

    /// Extends the active segment with zeros to at least `need` bytes.
    fn preallocate(&mut self, need: u64) -> std::io::Result<()> {
        let target = need.max(self.allocated + self.chunk);
        let mut at = self.allocated;
        while at < target {
            let n = ((target - at) as usize).min(ZEROS.len());
            write_at(&*self.file, &ZEROS[..n], at)?;
            at += n as u64;
        }
        self.allocated = target;
        Ok(())
    }

    /// Seals the active segment (trimmed to its records, synced) and starts a new one.
    /// Creating the new segment can fail for reasons that pass (no file descriptor left,
    /// no space for the directory entry): that failure is transient and the active
    /// segment stays as it is (sealed, and still appendable).
    fn roll(&mut self) -> Result<(), RollError> {
        if let Err(e) = self.file.set_len(self.len).and_then(|_| sync(&*self.file)) {
            return Err(RollError::Fatal(Fatal(format!(
                "sealing the segment failed: {e}"
            ))));
        }
        self.allocated = self.len;
        self.shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        let base = self.base + self.len;
        let path = segment_path(&self.shared.dir, base);
        let transient = |e: std::io::Error, what: &str| RollError::Transient(e, what.to_string());
        // The prepared segment when one is ready, else a new empty file.
        let prepared = self
            .spare
            .take()
            .or_else(|| self.preparer.as_mut().and_then(Preparer::take));
        let fs = &*self.shared.fs;
        let (file, allocated) = match prepared {
            Some(p) => match adopt_segment(fs, &p, &path) {
                Ok(()) => (p.file, p.len),
                Err(e) => {
                    self.spare = Some(p);
                    return Err(transient(e, &format!("creating {}", path.display())));
                }
            },
            None => (
                create_segment(fs, &path)
                    .map_err(|e| transient(e, &format!("creating {}", path.display())))?,
                0,
            ),
        };
        // Opening the directory can fail for want of a descriptor (transient); its fsync
        // failing is as fatal as any other.
        if let Err(e) = sync_dir(fs, &self.shared.dir) {
            if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) {
                return Err(transient(
                    e,
                    &format!("opening {}", self.shared.dir.display()),
                ));
            }
            return Err(RollError::Fatal(Fatal(format!(
                "syncing {} failed: {e}",
                self.shared.dir.display()
            ))));
        }
        {
            let mut segs = write_lock(&self.shared.segments);
            segs.push(Segment {
                base,
                end: base,
                records: 0,
                path,
            });
            // Readers read the new segment through the writer's own file; the sealed
            // one's descriptor joins the bounded cache of read handles (`handles.rs`).
            lock(&self.shared.handles).set_active(base, file.clone());
        }
        self.file = file;
        self.base = base;
        self.len = 0;
        self.allocated = allocated;
        self.shared.set_unavailable(None);
        if let Some(p) = &mut self.preparer {
            p.ask();
        }
        Ok(())
    }

    /// True while the writer cannot write (disk full, or a segment roll failing): it
    /// then probes now and then even without submissions.
    fn blocked(&self) -> bool {
        self.shared.disk_full.load(Ordering::Acquire) || lock(&self.shared.unavailable).is_some()
    }

    /// Checks whether the log can be written again: retries a pending segment roll, and
    /// writes zeros past the records to see whether there is space.
    fn probe(&mut self) -> Result<(), Fatal> {
        if lock(&self.shared.unavailable).is_some() {
            if self.len >= self.segment_bytes {
                match self.roll() {
                    Ok(()) => {}
                    Err(RollError::Fatal(f)) => return Err(f),
                    Err(RollError::Transient(e, msg)) => {
                        self.shared.set_unavailable(Some(format!("{msg}: {e}")));
                    }
                }
            } else {
                self.shared.set_unavailable(None);
            }
        }
        if self.shared.disk_full.load(Ordering::Acquire) {
            // Zeros past the records are unused space to recovery: writing them is safe.
            let n = self.probe_bytes;
            let mut at = self.allocated;
            let written = loop {
                if at >= self.allocated + n {
                    break Ok(());
                }
                let len = ((self.allocated + n - at) as usize).min(ZEROS.len());
                if let Err(e) = write_at(&*self.file, &ZEROS[..len], at) {
                    break Err(e);
                }
                at += len as u64;
            };
            match written {
                Ok(()) => {
                    if self.chunk > 0 {
                        self.allocated += n; // keep it as preallocated space
                    } else if let Err(e) = self.file.set_len(self.allocated) {
                        tracing::warn!(error = %e, "could not trim the space probe");
                    }
                    self.shared.set_disk_full(false, "");
                }
                Err(e) => {
                    if let Err(te) = self.file.set_len(self.allocated.max(self.len)) {
                        return Err(Fatal(format!(
                            "disk full, then truncating the space probe failed: {te}"
                        )));
                    }
                    if e.kind() != ErrorKind::StorageFull {
                        tracing::warn!(error = %e, "probing for free space failed");
                    }
                }
            }
        }
        Ok(())
    }

    /// Refuses one submission because a segment could not be created.
    fn refuse(&self, sub: Submission, e: &std::io::Error, what: &str) {
        let msg = format!("{what}: {e}");
        if e.kind() == ErrorKind::StorageFull {
            self.shared.set_disk_full(true, &msg);
            self.shared
                .counters
                .rejected_disk_full
                .fetch_add(1, Ordering::Relaxed);
            (sub.done)(Err(LogError::DiskFull(msg)));
        } else {
            self.shared
                .counters
                .rejected_unavailable
                .fetch_add(1, Ordering::Relaxed);
            self.shared.set_unavailable(Some(msg.clone()));
            (sub.done)(Err(LogError::Unavailable(msg)));
        }
    }

    /// Refuses the pending group: the disk is full.
    fn refuse_pending_disk_full(&mut self, e: &std::io::Error) {
        let msg = e.to_string();
        self.shared.set_disk_full(true, &msg);
        // The probe checks for room for a group of this size, so that readiness does
        // not come back for space that the next such group would not fit in.
        self.probe_bytes = (self.buf.len() as u64).clamp(MIN_PROBE_BYTES, MAX_PROBE_BYTES);
        self.buf.clear();
        for (sub, _) in self.pending.drain(..) {
            self.shared
                .counters
                .rejected_disk_full
                .fetch_add(1, Ordering::Relaxed);
            (sub.done)(Err(LogError::DiskFull(msg.clone())));
        }
    }

    /// Fails every pending submission and returns the fatal error.
    fn fatal(&mut self, msg: String) -> Fatal {
        self.buf.clear();
        for (sub, _) in self.pending.drain(..) {
            (sub.done)(Err(LogError::WriterFailed(msg.clone())));
        }
        Fatal(msg)
    }

    /// After a fatal failure: fail the rest of this group and everything submitted later.
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
