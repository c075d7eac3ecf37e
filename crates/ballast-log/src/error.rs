//! The log's error type, the helper that names the file an I/O error happened on, and
//! the record-size limit an error can name. At the bottom: positions in it are plain `u64`
//! (`Position` is an alias of it).

use std::path::{Path, PathBuf};

/// The largest record payload: a frame's length field has 24 bits.
pub const MAX_RECORD_BYTES: usize = (1 << 24) - 1;

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The I/O error is part of the message and deliberately not a `source()`: chains
    /// printed with `{:#}` would show it twice.
    #[error("{context} {path}: {error}")]
    Io {
        context: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("record of {0} bytes is larger than the limit of {MAX_RECORD_BYTES} bytes")]
    RecordTooLarge(usize),
    #[error("storage quota reached: {used} of {limit} bytes used, {needed} more needed")]
    QuotaExceeded { used: u64, limit: u64, needed: u64 },
    #[error("disk full: {0}")]
    DiskFull(String),
    #[error("log writer stopped after a failed write or fsync: {0}")]
    WriterFailed(String),
    /// The log cannot take this batch right now (a new segment could not be created,
    /// e.g. for want of file descriptors); nothing of it was written, the writer goes on
    /// and retries.
    #[error("log temporarily unavailable: {0}")]
    Unavailable(String),
    #[error("log is closed")]
    Closed,
    #[error("log directory {0} is in use by another process")]
    Locked(PathBuf),
    #[error("record at position {position} is damaged: {detail}")]
    Corrupt { position: u64, detail: String },
    #[error("invalid consumer name {0:?} (use letters, digits, '-', '_', '.')")]
    BadConsumerName(String),
    #[error("unknown consumer {0:?}")]
    UnknownConsumer(String),
    #[error("cannot acknowledge position {requested}: the durable end of the log is {durable}")]
    AckBeyondEnd { requested: u64, durable: u64 },
    #[error("unrecoverable log state: {0}")]
    Unrecoverable(String),
}

impl LogError {
    /// True when the log cannot accept writes any more in this process.
    pub fn is_fatal(&self) -> bool {
        matches!(self, LogError::WriterFailed(_) | LogError::Closed)
    }
}

pub(crate) fn io_err<'a>(
    context: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> LogError + 'a {
    move |error| LogError::Io {
        context,
        path: path.to_path_buf(),
        error,
    }
}
