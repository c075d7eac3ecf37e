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

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

struct Inner {
    file: File,
    len: u64,
    /// Per destination, the deliveries begun and not ended: their positions, by ticket.
    /// One insert and one removal a delivery, whatever its size (a set of positions cost
    /// a hundred of each for a delivery of a hundred events).
    open: HashMap<String, FastMap<u64, Vec<u64>>>,
    next_ticket: u64,
}

/// A delivery begun in the journal, to be ended with [`Journal::end`] (not `Clone`: it
/// ends once).
#[derive(Debug)]
#[must_use = "a delivery begun must be ended"]
pub struct Begun {
    /// None: nothing was begun (no positions).
    ticket: Option<u64>,
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
                    next_ticket: 0,
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

    /// Appends one record (under the lock held by the caller).
    fn record(&self, g: &mut Inner, op: u8, dest: &str, positions: &[u64]) {
        if positions.is_empty() {
            return;
        }
        let mut buf = Vec::with_capacity(4 + dest.len() + positions.len() * 8);
        encode(&mut buf, op, dest, positions);
        if let Err(e) = g.file.write_all(&buf) {
            tracing::warn!(error = %e, "writing the crash journal failed");
            return;
        }
        g.len += buf.len() as u64;
        if g.len >= COMPACT_AT {
            if let Err(e) = self.compact(g) {
                tracing::warn!(error = %e, "compacting the crash journal failed");
            }
        }
    }

    fn compact(&self, g: &mut Inner) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for (dest, begun) in &g.open {
            let positions: Vec<u64> = begun.values().flatten().copied().collect();
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
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut open = Vec::new();
        if let Some(begun) = g.open.get_mut(dest) {
            begun.retain(|_, positions| {
                positions.retain(|&p| {
                    let take = keep(p);
                    if take {
                        open.push(p);
                    }
                    !take
                });
                !positions.is_empty()
            });
        }
        open.sort_unstable();
        self.record(&mut g, END, dest, &open);
        open
    }

    /// Records that `dest` is about to deliver the events at `positions`.
    pub fn begin(&self, dest: &str, positions: Vec<u64>) -> Begun {
        if positions.is_empty() {
            return Begun { ticket: None };
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.record(&mut g, BEGIN, dest, &positions);
        let ticket = g.next_ticket;
        g.next_ticket += 1;
        let begun = match g.open.get_mut(dest) {
            Some(begun) => begun,
            None => g.open.entry(dest.to_string()).or_default(),
        };
        begun.insert(ticket, positions);
        Begun {
            ticket: Some(ticket),
        }
    }

    /// Records that a delivery begun is over (whatever its outcome): what of it
    /// [`Journal::take_open`] did not take already.
    pub fn end(&self, dest: &str, begun: Begun) {
        let Some(ticket) = begun.ticket else {
            return;
        };
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let positions = g.open.get_mut(dest).and_then(|b| b.remove(&ticket));
        if let Some(positions) = positions {
            self.record(&mut g, END, dest, &positions);
        }
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
            let a = j.begin("a", vec![1, 3]);
            let _ = j.begin("a", vec![2]);
            j.end("a", a);
            let _ = j.begin("b", vec![7]);
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
        let five = j.begin("a", vec![5, 6]);
        let one = j.begin("a", vec![1]);
        let _ = j.begin("b", vec![2]);
        j.end("a", one);
        assert_eq!(j.take_open("a"), vec![5, 6]);
        assert!(j.take_open("a").is_empty());
        // Taken already: ending it records nothing more.
        let len = std::fs::metadata(&path).unwrap().len();
        j.end("a", five);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        assert!(j.begin("a", Vec::new()).ticket.is_none());
        let mixed = j.begin("a", vec![10, 11, 12]);
        assert_eq!(j.take_open_where("a", |p| p != 11), vec![10, 12]);
        j.end("a", mixed);
        drop(j);
        let (_, left) = Journal::open(&path).unwrap();
        assert_eq!(left, vec![("b".to_string(), 2)]);
    }

    #[test]
    fn compaction_keeps_open_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (j, _) = Journal::open(&path).unwrap();
        let _ = j.begin("keep", vec![42]);
        let many: Vec<u64> = (0..1000).collect();
        for _ in 0..1100 {
            let begun = j.begin("x", many.clone());
            j.end("x", begun);
        }
        assert!(std::fs::metadata(&path).unwrap().len() < COMPACT_AT);
        drop(j);
        let (_, left) = Journal::open(&path).unwrap();
        assert_eq!(left, vec![("keep".to_string(), 42)]);
    }
}
