//! De-duplication by messageId, per source, within a window (`dedup_window`, default 1 h;
//! `"0s"` turns it off): an event whose messageId the source stored within the window is
//! answered 200 and not stored again (`ballast_ingest_duplicates_total`). SDKs that keep an
//! event until they read a 2xx (ballast's browser SDK, RudderStack's) send copies when an
//! answer is lost; this keeps one.
//!
//! - **Exact.** The messageIds themselves are kept (a hash table of the strings), never a
//!   probabilistic filter: a distinct event is never taken for a copy.
//! - **Only what is stored counts.** A request's ids are remembered after its append is
//!   durable; a refused append remembers nothing. A copy that arrives while the first is
//!   still being stored is stored too (a duplicate, never a loss).
//! - **Bounded.** At most `dedup_max_ids` ids per source (default 1,000,000). A 36-byte
//!   UUID costs about 170 bytes (its `Arc<str>` allocation, a hash-table slot with the
//!   table's spare room, a queue slot; 172 measured as the growth of the resident set
//!   over 1,000,000 UUIDs with glibc's malloc): ~165 MiB at the cap, reached only by a
//!   source storing over a million events per window. Beyond it the oldest are forgotten before their
//!   window ends (`ballast_ingest_dedup_forgotten_total`): copies of those are stored again.
//! - **Survives restarts and kill -9.** Each remembered id is appended (`<ms> <id>`) to a
//!   journal in `<data_dir>/dedup/<source>/<bucket>.ids` with a plain write before the
//!   request is answered: the kernel keeps it if the process dies. Journals are not
//!   fsynced, so a power loss can forget the last ids (their copies are then stored). A
//!   journal covers one window's time (`bucket` = ms / window); those older than two
//!   windows are deleted. At start the ids younger than the window are read back.
//!
//! Per process: in `postgres` mode each replica remembers what it stored itself.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::store::envelope::decode_meta;
use crate::store::EventBatch;

#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    #[error("de-duplication journal {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DedupError + '_ {
    move |error| DedupError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// One source's remembered messageIds.
pub struct Dedup {
    window_ms: u64,
    cap: usize,
    dir: PathBuf,
    inner: Mutex<Inner>,
    duplicates: metrics::Counter,
    forgotten: metrics::Counter,
    remembered: metrics::Gauge,
}

struct Inner {
    /// messageId → when it was stored (ms).
    seen: HashMap<Arc<str>, u64, foldhash::fast::RandomState>,
    /// The same ids in the order they were stored (expiry and the cap pop from the front).
    order: VecDeque<(u64, Arc<str>)>,
    /// Ids of requests still being stored.
    pending: HashSet<Arc<str>, foldhash::fast::RandomState>,
    journal: Option<(u64, File)>,
}

/// What `filter` decided for a request: the events to store (copies left out), and the
/// ids to remember once stored (`commit`) or to let go (`release`).
pub struct Filtered {
    pub batch: EventBatch,
    pub reserved: Vec<Arc<str>>,
}

fn now_ms() -> u64 {
    crate::time::to_ms(std::time::SystemTime::now())
}

/// A directory name for a source id: itself when plain, else hex.
fn dir_name(source: &str) -> String {
    if !source.is_empty()
        && source
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        source.to_string()
    } else {
        source.bytes().map(|b| format!("{b:02x}")).collect()
    }
}

impl Dedup {
    /// Opens (creating) the source's journals under `root` and reads back the ids younger
    /// than the window. `None` when the window is zero (off).
    pub fn open(
        root: &Path,
        source: &str,
        window: Duration,
        cap: usize,
    ) -> Result<Option<Dedup>, DedupError> {
        let window_ms = window.as_millis() as u64;
        if window_ms == 0 {
            return Ok(None);
        }
        let dir = root.join(dir_name(source));
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let dedup = Dedup {
            window_ms,
            cap: cap.max(1),
            dir,
            inner: Mutex::new(Inner {
                seen: HashMap::default(),
                order: VecDeque::new(),
                pending: HashSet::default(),
                journal: None,
            }),
            duplicates: metrics::counter!("ballast_ingest_duplicates_total", "source" => source.to_string()),
            forgotten: metrics::counter!("ballast_ingest_dedup_forgotten_total", "source" => source.to_string()),
            remembered: metrics::gauge!("ballast_ingest_dedup_ids", "source" => source.to_string()),
        };
        dedup.load(now_ms())?;
        Ok(Some(dedup))
    }

    fn journals(&self) -> Result<Vec<(u64, PathBuf)>, DedupError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let path = entry.map_err(io(&self.dir))?.path();
            let bucket = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ids"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(b) = bucket {
                out.push((b, path));
            }
        }
        out.sort();
        Ok(out)
    }

    fn load(&self, now: u64) -> Result<(), DedupError> {
        let mut inner = self.lock();
        for (bucket, path) in self.journals()? {
            if (bucket + 2) * self.window_ms <= now {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let file = File::open(&path).map_err(io(&path))?;
            for line in BufReader::new(file).split(b'\n') {
                let line = line.map_err(io(&path))?;
                // A line torn by a crash does not parse (or has no id): skipped.
                let Some((at, id)) = std::str::from_utf8(&line)
                    .ok()
                    .and_then(|l| l.split_once(' '))
                    .and_then(|(at, id)| Some((at.parse::<u64>().ok()?, id)))
                else {
                    continue;
                };
                if at + self.window_ms > now && !id.is_empty() {
                    self.remember(&mut inner, at, Arc::from(id));
                }
            }
        }
        self.expire(&mut inner, now);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding it leaves consistent (if partial) state: keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remember(&self, inner: &mut Inner, at: u64, id: Arc<str>) {
        if inner.seen.insert(id.clone(), at).is_none() {
            inner.order.push_back((at, id));
        }
        while inner.seen.len() > self.cap {
            let Some((_, old)) = inner.order.pop_front() else {
                break;
            };
            inner.seen.remove(&old);
            self.forgotten.increment(1);
        }
    }

    fn expire(&self, inner: &mut Inner, now: u64) {
        while let Some((at, id)) = inner.order.front() {
            if at + self.window_ms > now {
                break;
            }
            // Remembered again later (a copy stored during a race): keep the newer entry.
            if inner.seen.get(id).is_some_and(|&t| t == *at) {
                inner.seen.remove(id);
            }
            inner.order.pop_front();
        }
        self.remembered.set(inner.seen.len() as f64);
    }

    /// Drops the events whose messageId was stored within the window (and repeats within
    /// the request), and reserves the others' ids.
    pub fn filter(&self, batch: EventBatch) -> Filtered {
        let now = now_ms();
        let mut inner = self.lock();
        self.expire(&mut inner, now);
        let mut reserved: Vec<Arc<str>> = Vec::new();
        let mut here: HashSet<&str, foldhash::fast::RandomState> = HashSet::default();
        let mut keep = Vec::with_capacity(batch.len());
        let mut duplicates = 0;
        for (_, meta) in batch.events() {
            let Some((_, mid)) = decode_meta(meta) else {
                keep.push(true);
                continue;
            };
            let copy = !here.insert(mid)
                || inner
                    .seen
                    .get(mid)
                    .is_some_and(|&at| at + self.window_ms > now);
            if copy {
                duplicates += 1;
                keep.push(false);
                continue;
            }
            keep.push(true);
            if !inner.pending.contains(mid) {
                let id: Arc<str> = Arc::from(mid);
                inner.pending.insert(id.clone());
                reserved.push(id);
            }
        }
        drop(inner);
        if duplicates > 0 {
            self.duplicates.increment(duplicates as u64);
        }
        let batch = if duplicates == 0 {
            batch
        } else {
            let mut kept = EventBatch::new(batch.source.clone(), batch.bytes());
            for ((event, meta), k) in batch.events().zip(&keep) {
                if *k {
                    let _ = kept.push_with(|out, m| {
                        out.extend_from_slice(event);
                        m.extend_from_slice(meta);
                        Ok::<(), ()>(())
                    });
                }
            }
            kept
        };
        Filtered { batch, reserved }
    }

    /// The request's events are durable: remembers their ids (memory, then the journal).
    pub fn commit(&self, reserved: Vec<Arc<str>>) -> Result<(), DedupError> {
        if reserved.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut text = String::with_capacity(reserved.len() * 52);
        let at = now.to_string();
        let mut inner = self.lock();
        for id in reserved {
            inner.pending.remove(&id);
            text.push_str(&at);
            text.push(' ');
            text.push_str(&id);
            text.push('\n');
            self.remember(&mut inner, now, id);
        }
        self.remembered.set(inner.seen.len() as f64);
        let bucket = now / self.window_ms;
        if inner.journal.as_ref().is_none_or(|(b, _)| *b != bucket) {
            let path = self.dir.join(format!("{bucket}.ids"));
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io(&path))?;
            inner.journal = Some((bucket, file));
            // Journals older than two windows hold nothing the window still needs.
            for (b, old) in self.journals()? {
                if b + 2 <= bucket {
                    let _ = std::fs::remove_file(old);
                }
            }
        }
        if let Some((_, file)) = inner.journal.as_mut() {
            file.write_all(text.as_bytes())
                .map_err(io(&self.dir.join(format!("{bucket}.ids"))))?;
        }
        Ok(())
    }

    /// The request's events were not stored: nothing is remembered.
    pub fn release(&self, reserved: Vec<Arc<str>>) {
        if reserved.is_empty() {
            return;
        }
        let mut inner = self.lock();
        for id in reserved {
            inner.pending.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::envelope::encode_meta;

    fn batch(ids: &[&str]) -> EventBatch {
        let mut b = EventBatch::new(Arc::from("web"), 0);
        for id in ids {
            b.push_with(|out, meta| {
                out.extend_from_slice(format!("{{\"messageId\":\"{id}\"}}").as_bytes());
                encode_meta(meta, "a:", "u", id);
                Ok::<(), ()>(())
            })
            .unwrap();
        }
        b
    }

    fn ids(b: &EventBatch) -> Vec<String> {
        b.events()
            .map(|(_, m)| decode_meta(m).unwrap().1.to_string())
            .collect()
    }

    fn open(dir: &Path, window: u64, cap: usize) -> Dedup {
        Dedup::open(dir, "web", Duration::from_secs(window), cap)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn a_zero_window_is_off() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Dedup::open(dir.path(), "web", Duration::ZERO, 10)
            .unwrap()
            .is_none());
    }

    #[test]
    fn copies_of_stored_events_and_repeats_in_a_request_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(dir.path(), 3600, 100);
        let f = d.filter(batch(&["a", "b", "a"]));
        assert_eq!(ids(&f.batch), ["a", "b"]);
        d.commit(f.reserved).unwrap();
        let f = d.filter(batch(&["b", "c"]));
        assert_eq!(ids(&f.batch), ["c"]);
    }

    #[test]
    fn a_refused_append_remembers_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(dir.path(), 3600, 100);
        let f = d.filter(batch(&["a"]));
        d.release(f.reserved);
        let f = d.filter(batch(&["a"]));
        assert_eq!(ids(&f.batch), ["a"], "not stored: a resend must be stored");
    }

    #[test]
    fn ids_survive_a_reopen_without_a_clean_close() {
        let dir = tempfile::tempdir().unwrap();
        {
            let d = open(dir.path(), 3600, 100);
            let f = d.filter(batch(&["a", "b"]));
            d.commit(f.reserved).unwrap();
            // Dropped without any flush or close step, as a killed process would.
            std::mem::forget(d);
        }
        // A torn last line (a crash mid-write) is skipped.
        let journal = std::fs::read_dir(dir.path().join("web"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut f = OpenOptions::new().append(true).open(&journal).unwrap();
        f.write_all(b"12").unwrap();
        let d = open(dir.path(), 3600, 100);
        let f = d.filter(batch(&["a", "c", "b"]));
        assert_eq!(ids(&f.batch), ["c"]);
    }

    #[test]
    fn ids_older_than_the_window_are_forgotten_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(dir.path(), 3600, 100);
        let old = now_ms() - 2 * 3_600_000;
        let path = dir
            .path()
            .join("web")
            .join(format!("{}.ids", old / 3_600_000));
        std::fs::write(&path, format!("{old} gone\n")).unwrap();
        drop(d);
        let d = open(dir.path(), 3600, 100);
        assert_eq!(ids(&d.filter(batch(&["gone"])).batch), ["gone"]);
    }

    #[test]
    fn the_cap_forgets_the_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(dir.path(), 3600, 3);
        let f = d.filter(batch(&["a", "b", "c", "d"]));
        d.commit(f.reserved).unwrap();
        assert_eq!(d.lock().seen.len(), 3);
        assert_eq!(ids(&d.filter(batch(&["a", "d"])).batch), ["a"]);
    }

    #[test]
    fn source_ids_become_safe_directory_names() {
        assert_eq!(dir_name("web-1_x"), "web-1_x");
        assert_eq!(dir_name("../x"), "2e2e2f78");
    }
}
