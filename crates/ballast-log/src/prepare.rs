//! The next segment, zero-filled and synced ahead of time on a thread of its own.
//!
//! Preallocating the active segment on the writer thread (writing zeros ahead of the
//! records, then syncing them with the next group) made every few megabytes one group
//! commit write and sync megabytes of zeros: a 3-12 ms stall for every request in flight,
//! several times a second under load, which set the single-event p99 (docs/BENCHMARKS.md,
//! "Single-event tail latency"). Now a segment arrives at a roll already zero-filled and
//! synced (as PostgreSQL recycles WAL segments), and the writer only overwrites zeros: its
//! `fdatasync`s never change a file's size, never journal metadata, never flush zeros.
//!
//! The file is prepared under [`PREPARED_NAME`] (not a segment name: recovery never reads
//! it, [`crate::Log::open`] deletes a leftover) and renamed to the segment's name at the
//! roll, before the directory's fsync. A crash between the two leaves either the temporary
//! file (deleted) or an empty segment of zeros (recovery trims zeros after the records).
//!
//! The preparer only works on request (one per roll), writes the zeros out in small pieces
//! with pauses between them (a flush of megabytes would queue ahead of the writer's own
//! `fdatasync` on the device), syncs once at the end, and leaves the disk alone when it
//! has little free space: near a full disk the writer extends segments itself, with its
//! careful disk-full handling, and no prepared file can hold back space that the records
//! need.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use crate::vfs::{Mode, VFile, Vfs};

/// File name of the segment being prepared.
pub(crate) const PREPARED_NAME: &str = "next-segment.zeros";

/// Zeros written (and written out to the device) at a time.
const PIECE: usize = 1 << 20;

/// Longest pause between two pieces.
const MAX_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

/// Largest prepared file; past it the writer extends the segment itself.
const MAX_PREPARED: u64 = 256 << 20;

/// A file is only prepared while the file system keeps at least this many times its
/// size free besides it.
const FREE_FACTOR: u64 = 4;

static ZEROS: [u8; PIECE] = [0u8; PIECE];

/// A zero-filled, synced file waiting under [`PREPARED_NAME`].
pub(crate) struct Prepared {
    pub(crate) file: Arc<dyn VFile>,
    pub(crate) len: u64,
    pub(crate) path: PathBuf,
}

/// The handle the writer keeps: asks for the next segment, takes it when it is ready.
pub(crate) struct Preparer {
    requests: Option<mpsc::Sender<()>>,
    results: mpsc::Receiver<Option<Prepared>>,
    /// A request is out and its answer not yet taken.
    asked: bool,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
    fs: Arc<dyn Vfs>,
    /// Preparing on the caller's thread (a simulation that must replay exactly): the
    /// length to prepare, and the answer to the last request.
    inline: Option<(u64, Option<Option<Prepared>>)>,
}

/// Size of the file prepared for segments of `segment_bytes` bytes: the segment plus a
/// margin for the last group, which may pass the segment size.
pub(crate) fn prepared_len(segment_bytes: u64) -> u64 {
    segment_bytes
        .saturating_add((segment_bytes / 4).min(4 << 20))
        .clamp(4096, MAX_PREPARED)
}

impl Preparer {
    /// Starts the thread; `None` if it cannot be started (the writer then extends every
    /// segment itself, as it does when a prepared file is not ready).
    pub(crate) fn start(fs: Arc<dyn Vfs>, dir: &Path, len: u64) -> Option<Preparer> {
        let path = dir.join(PREPARED_NAME);
        let (req_tx, req_rx) = mpsc::channel::<()>();
        let (res_tx, res_rx) = mpsc::channel();
        if fs.prepare_inline() {
            return Some(Preparer {
                requests: None,
                results: res_rx,
                asked: false,
                thread: None,
                path,
                fs,
                inline: Some((len, None)),
            });
        }
        let thread_path = path.clone();
        let thread_fs = fs.clone();
        let thread = std::thread::Builder::new()
            .name("ballast-log-prep".into())
            .spawn(move || {
                for () in req_rx {
                    let prepared = prepare_or_not(&*thread_fs, &thread_path, len);
                    if res_tx.send(prepared).is_err() {
                        return;
                    }
                }
            });
        match thread {
            Ok(t) => Some(Preparer {
                requests: Some(req_tx),
                results: res_rx,
                asked: false,
                thread: Some(t),
                path,
                fs,
                inline: None,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "no thread to prepare segments ahead");
                None
            }
        }
    }

    /// Asks for the next segment unless a request is out already.
    pub(crate) fn ask(&mut self) {
        if let Some((len, answer)) = &mut self.inline {
            if answer.is_none() {
                *answer = Some(prepare_or_not(&*self.fs, &self.path, *len));
            }
            return;
        }
        if !self.asked {
            if let Some(tx) = &self.requests {
                self.asked = tx.send(()).is_ok();
            }
        }
    }

    /// The prepared segment if it is ready (never waits).
    pub(crate) fn take(&mut self) -> Option<Prepared> {
        if let Some((_, answer)) = &mut self.inline {
            return answer.take().flatten();
        }
        if !self.asked {
            return None;
        }
        match self.results.try_recv() {
            Ok(result) => {
                self.asked = false;
                result
            }
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                self.asked = false;
                None
            }
        }
    }

    /// Stops the thread and deletes a prepared file nobody took.
    pub(crate) fn stop(&mut self) {
        drop(self.requests.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some((_, answer)) = &mut self.inline {
            *answer = None;
        }
        if self.fs.exists(&self.path) {
            let _ = self.fs.remove_file(&self.path);
        }
    }
}

impl Drop for Preparer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// [`prepare`], with a failure logged (the writer then extends the segment itself).
fn prepare_or_not(fs: &dyn Vfs, path: &Path, len: u64) -> Option<Prepared> {
    match prepare(fs, path, len) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "could not prepare the next segment; the writer extends it itself");
            let _ = fs.remove_file(path);
            None
        }
    }
}

/// Writes `len` zeros to a new file at `path`, written out piece by piece, then synced. `Ok(None)`: the
/// disk has too little room to spare.
fn prepare(fs: &dyn Vfs, path: &Path, len: u64) -> std::io::Result<Option<Prepared>> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if fs.free_bytes(dir)? < len.saturating_mul(FREE_FACTOR) {
        return Ok(None);
    }
    let file = fs.open(path, Mode::CreateTruncate)?;
    let mut at = 0u64;
    while at < len {
        let n = ((len - at) as usize).min(PIECE);
        let started = std::time::Instant::now();
        file.write_all_at(&ZEROS[..n], at)?;
        file.write_out(at, n as u64)?;
        at += n as u64;
        // Leave the device to the writer a third of the time: its syncs queue behind
        // these writes.
        std::thread::sleep((started.elapsed() / 2).min(MAX_PAUSE));
    }
    // One sync for the whole file: its size and block allocation (one journal commit),
    // and a device cache flush.
    file.sync_data()?;
    Ok(Some(Prepared {
        file,
        len,
        path: path.to_path_buf(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepares_a_synced_file_of_zeros_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Preparer::start(Arc::new(crate::vfs::Real), dir.path(), 10_000).unwrap();
        assert!(p.take().is_none(), "nothing before a request");
        p.ask();
        let prepared = loop {
            if let Some(f) = p.take() {
                break f;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(prepared.len, 10_000);
        let path = prepared.path.clone();
        assert_eq!(path, dir.path().join(PREPARED_NAME));
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 10_000);
        assert!(bytes.iter().all(|&b| b == 0));
        p.stop();
        assert!(!path.exists(), "a file nobody took is deleted");
    }

    #[test]
    fn prepared_length_covers_the_segment_and_a_margin() {
        assert_eq!(prepared_len(64 << 20), (64 << 20) + (4 << 20));
        assert_eq!(prepared_len(1 << 20), (1 << 20) + (256 << 10));
        assert_eq!(prepared_len(1), 4096);
        assert_eq!(prepared_len(1 << 40), MAX_PREPARED);
    }
}
