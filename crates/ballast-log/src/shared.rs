//! What the `Log` handle and the writer thread share: the settings, the segment list,
//! the durable end, counters and flags, and the submissions the writer takes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use crate::cursor::Consumer;
use crate::error::LogError;
use crate::frame::Batch;
use crate::handles::Handles;
use crate::vfs::{VFile, Vfs};

/// A byte offset in the whole log.
pub type Position = u64;

/// Settings of a log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub dir: PathBuf,
    /// A segment is closed and a new one started once it holds at least this many bytes.
    pub segment_bytes: u64,
    /// Total size of all segments beyond which appends fail with `QuotaExceeded`.
    pub max_bytes: Option<u64>,
    /// Upper bound of bytes one group commit gathers before it syncs.
    pub max_group_bytes: usize,
    /// Write zeros ahead of the records so that most fsyncs do not change the file size
    /// (cheaper on ext4/xfs: no metadata to journal), at the cost of writing that space
    /// twice.
    pub preallocate: bool,
    /// Sealed segments kept open for reads at most (least recently used closed first):
    /// what the log's descriptors cost, whatever the number of segments.
    pub read_handles: usize,
}

impl LogConfig {
    pub fn new(dir: impl Into<PathBuf>) -> LogConfig {
        LogConfig {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            max_bytes: None,
            max_group_bytes: 16 << 20,
            preallocate: true,
            read_handles: crate::handles::DEFAULT_READ_HANDLES,
        }
    }
}

/// The result of a durable append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Position of the batch's first record.
    pub first: Position,
    /// Position just after the batch's last record.
    pub end: Position,
    pub records: usize,
    /// The durable end of the log when the batch completed (the end of its group
    /// commit, `>= end`): one notification per group is enough for readers.
    pub durable: Position,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) appends: AtomicU64,
    pub(crate) records: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) fsyncs: AtomicU64,
    pub(crate) fsync_nanos: AtomicU64,
    pub(crate) shared_fsyncs: AtomicU64,
    pub(crate) rejected_quota: AtomicU64,
    pub(crate) rejected_disk_full: AtomicU64,
    pub(crate) rejected_unavailable: AtomicU64,
}

pub(crate) struct Segment {
    pub(crate) base: Position,
    /// Valid (durable) end of the segment.
    pub(crate) end: Position,
    /// Data records in it (durable).
    pub(crate) records: u64,
    pub(crate) path: PathBuf,
}

pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) cursor_dir: PathBuf,
    /// The file system under the log (the real one but in simulation tests).
    pub(crate) fs: Arc<dyn Vfs>,
    pub(crate) segments: RwLock<Vec<Segment>>,
    /// Open read handles: the active segment's and a few sealed ones'.
    pub(crate) handles: Mutex<Handles>,
    pub(crate) durable: Mutex<Position>,
    pub(crate) durable_cv: Condvar,
    pub(crate) bytes_on_disk: AtomicU64,
    /// Set when an append was refused for the quota; cleared by a successful append or
    /// when space is freed.
    pub(crate) quota_blocked: AtomicBool,
    /// Set when a write failed with ENOSPC; cleared by the next write that succeeds
    /// (the writer probes for space while it is set).
    pub(crate) disk_full: AtomicBool,
    /// Set while a new segment cannot be created (the reason); the writer retries.
    pub(crate) unavailable: Mutex<Option<String>>,
    pub(crate) failed: AtomicBool,
    pub(crate) failure: Mutex<Option<String>>,
    pub(crate) counters: Counters,
    pub(crate) cursors: Mutex<BTreeMap<String, Consumer>>,
    pub(crate) quarantined_records: u64,
    pub(crate) torn_tail_bytes: u64,
    /// Bytes a frame took on average in the last read that returned any: sizes the next
    /// read's chunk (a guess; a short chunk is followed by another read).
    pub(crate) frame_len_hint: AtomicUsize,
}

pub(crate) type Done = Box<dyn FnOnce(Result<Appended, LogError>) + Send + 'static>;

pub(crate) struct Submission {
    pub(crate) batch: Batch,
    pub(crate) done: Done,
}

impl Shared {
    /// Records whether the quota refuses appends; logs each change once.
    pub(crate) fn set_quota_blocked(&self, on: bool) {
        if self.quota_blocked.swap(on, Ordering::AcqRel) != on {
            if on {
                tracing::warn!(
                    dir = %self.dir.display(),
                    "storage quota reached: new events are refused (503) until delivered segments are deleted"
                );
            } else {
                tracing::info!(dir = %self.dir.display(), "storage below its quota again: accepting events");
            }
        }
    }

    /// Records whether the disk is full; logs each change once.
    pub(crate) fn set_disk_full(&self, on: bool, detail: &str) {
        if self.disk_full.swap(on, Ordering::AcqRel) != on {
            if on {
                tracing::warn!(dir = %self.dir.display(), error = detail, "disk full: new events are refused (503) until space returns");
            } else {
                tracing::info!(dir = %self.dir.display(), "disk space is available again: accepting events");
            }
        }
    }

    /// Records why a new segment cannot be created (None: it can again); logs each
    /// change once.
    pub(crate) fn set_unavailable(&self, reason: Option<String>) {
        let mut cur = lock(&self.unavailable);
        match (&*cur, &reason) {
            (None, Some(r)) => {
                tracing::warn!(error = %r, "cannot start a new log segment: new events are refused (503); retrying")
            }
            (Some(_), None) => tracing::info!("log segment created: accepting events again"),
            _ => {}
        }
        *cur = reason;
    }

    /// The handle to read `seg` with (see `handles.rs`). Running out of descriptors is
    /// `Unavailable`: transient, nothing lost, the reader retries later.
    pub(crate) fn read_handle(&self, seg: &Segment) -> Result<Arc<dyn VFile>, LogError> {
        lock(&self.handles)
            .get(&*self.fs, seg.base, &seg.path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EMFILE) | Some(libc::ENFILE) => LogError::Unavailable(format!(
                    "opening segment {} for reading: {e}",
                    seg.path.display()
                )),
                _ => LogError::Io {
                    context: "opening segment",
                    path: seg.path.clone(),
                    error: e,
                },
            })
    }

    pub(crate) fn failure_error(&self) -> LogError {
        LogError::WriterFailed(
            lock(&self.failure)
                .clone()
                .unwrap_or_else(|| "unknown failure".into()),
        )
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
pub(crate) fn read_lock<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}
pub(crate) fn write_lock<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}
