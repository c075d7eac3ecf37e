//! The crash journal: which events each destination is processing right now.
//!
//! Before a delivery the router appends "begin <destination> <positions>", after it
//! "end …". Plain `write(2)` with no fsync: it only has to survive a crash of the process
//! (the page cache outlives it), not a power loss, so it costs one syscall per delivery.
//! At the next start, entries begun and not ended are the events in flight when the
//! process died. The file is compacted when it grows past `COMPACT_AT`.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const BEGIN: u8 = 1;
const END: u8 = 2;
const COMPACT_AT: u64 = 8 << 20;

struct Inner {
    file: File,
    len: u64,
    /// Per destination, the positions begun and not ended (foldhash: a delivery of 100
    /// events inserts and removes 100 positions).
    open: HashMap<String, HashSet<u64, foldhash::fast::RandomState>>,
}

pub struct Journal {
    path: PathBuf,
    inner: Mutex<Inner>,
}

fn encode(out: &mut Vec<u8>, op: u8, dest: &str, positions: &[u64]) {
    let d = &dest.as_bytes()[..dest.len().min(255)];
    for chunk in positions.chunks(u16::MAX as usize) {
        out.push(op);
        out.push(d.len() as u8);
        out.extend_from_slice(d);
        out.extend_from_slice(&(chunk.len() as u16).to_le_bytes());
        for p in chunk {
            out.extend_from_slice(&p.to_le_bytes());
        }
    }
}

/// Entries begun and not ended; a truncated last record is ignored.
fn replay(bytes: &[u8]) -> HashSet<(String, u64)> {
    let mut open = HashSet::new();
    let mut at = 0usize;
    while at + 2 <= bytes.len() {
        let op = bytes[at];
        let dl = bytes[at + 1] as usize;
        let head = at + 2 + dl + 2;
        if head > bytes.len() || (op != BEGIN && op != END) {
            break;
        }
        let Ok(dest) = std::str::from_utf8(&bytes[at + 2..at + 2 + dl]) else {
            break;
        };
        let n = u16::from_le_bytes([bytes[head - 2], bytes[head - 1]]) as usize;
        let end = head + n * 8;
        if end > bytes.len() {
            break;
        }
        for i in 0..n {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[head + i * 8..head + i * 8 + 8]);
            let key = (dest.to_string(), u64::from_le_bytes(w));
            if op == BEGIN {
                open.insert(key);
            } else {
                open.remove(&key);
            }
        }
        at = end;
    }
    open
}

impl Journal {
    /// Opens the journal: returns it (empty) and what the previous run left in flight.
    pub fn open(path: &Path) -> std::io::Result<(Journal, Vec<(String, u64)>)> {
        let leftover = match std::fs::read(path) {
            Ok(b) => replay(&b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(e),
        };
        let mut leftover: Vec<_> = leftover.into_iter().collect();
        leftover.sort();
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let len = file.metadata()?.len();
        Ok((
            Journal {
                path: path.to_path_buf(),
                inner: Mutex::new(Inner {
                    file,
                    len,
                    open: HashMap::new(),
                }),
            },
            leftover,
        ))
    }

    /// Starts afresh (after the leftovers have been turned into strikes).
    pub fn reset(&self) -> std::io::Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.file.set_len(0)?;
        g.len = 0;
        g.open.clear();
        Ok(())
    }

    fn record(&self, op: u8, dest: &str, positions: &[u64]) {
        if positions.is_empty() {
            return;
        }
        let mut buf = Vec::with_capacity(4 + dest.len() + positions.len() * 8);
        encode(&mut buf, op, dest, positions);
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if op == BEGIN {
            let set = match g.open.get_mut(dest) {
                Some(set) => set,
                None => g.open.entry(dest.to_string()).or_default(),
            };
            set.extend(positions.iter().copied());
        } else if let Some(set) = g.open.get_mut(dest) {
            for p in positions {
                set.remove(p);
            }
        }
        if let Err(e) = g.file.write_all(&buf) {
            tracing::warn!(error = %e, "writing the crash journal failed");
            return;
        }
        g.len += buf.len() as u64;
        if g.len >= COMPACT_AT {
            if let Err(e) = self.compact(&mut g) {
                tracing::warn!(error = %e, "compacting the crash journal failed");
            }
        }
    }

    fn compact(&self, g: &mut Inner) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for (dest, set) in &g.open {
            let positions: Vec<u64> = set.iter().copied().collect();
            encode(&mut buf, BEGIN, dest, &positions);
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, &buf)?;
        std::fs::rename(&tmp, &self.path)?;
        g.file = OpenOptions::new().append(true).open(&self.path)?;
        g.len = buf.len() as u64;
        Ok(())
    }

    /// The positions `dest` has begun and not ended, now ended: what a delivery loop
    /// that died inside this process held.
    pub fn take_open(&self, dest: &str) -> Vec<u64> {
        self.take_open_where(dest, |_| true)
    }

    /// Like [`Journal::take_open`], for the positions `keep` selects (one partition's, when
    /// a destination has a delivery loop per partition).
    pub fn take_open_where(&self, dest: &str, keep: impl Fn(u64) -> bool) -> Vec<u64> {
        let mut open: Vec<u64> = {
            let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            g.open
                .get(dest)
                .map(|set| set.iter().copied().filter(|p| keep(*p)).collect())
                .unwrap_or_default()
        };
        open.sort_unstable();
        self.end(dest, &open);
        open
    }

    pub fn begin(&self, dest: &str, positions: &[u64]) {
        self.record(BEGIN, dest, positions);
    }

    pub fn end(&self, dest: &str, positions: &[u64]) {
        self.record(END, dest, positions);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_are_begun_and_not_ended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let (j, left) = Journal::open(&path).unwrap();
            assert!(left.is_empty());
            j.begin("a", &[1, 2, 3]);
            j.end("a", &[1, 3]);
            j.begin("b", &[7]);
        }
        // A torn last record is ignored.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[BEGIN, 1, b'c', 1]).unwrap();
        let (j, left) = Journal::open(&path).unwrap();
        assert_eq!(left, vec![("a".to_string(), 2), ("b".to_string(), 7)]);
        j.reset().unwrap();
        drop(j);
        let (_, left) = Journal::open(&path).unwrap();
        assert!(left.is_empty());
    }

    #[test]
    fn take_open_ends_what_one_destination_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (j, _) = Journal::open(&path).unwrap();
        j.begin("a", &[5, 1]);
        j.begin("b", &[2]);
        j.end("a", &[1]);
        assert_eq!(j.take_open("a"), vec![5]);
        assert!(j.take_open("a").is_empty());
        drop(j);
        let (_, left) = Journal::open(&path).unwrap();
        assert_eq!(left, vec![("b".to_string(), 2)]);
    }

    #[test]
    fn compaction_keeps_open_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (j, _) = Journal::open(&path).unwrap();
        j.begin("keep", &[42]);
        let many: Vec<u64> = (0..1000).collect();
        for _ in 0..1100 {
            j.begin("x", &many);
            j.end("x", &many);
        }
        assert!(std::fs::metadata(&path).unwrap().len() < COMPACT_AT);
        drop(j);
        let (_, left) = Journal::open(&path).unwrap();
        assert_eq!(left, vec![("keep".to_string(), 42)]);
    }
}
