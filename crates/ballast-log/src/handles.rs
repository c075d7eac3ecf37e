//! The open read handles of segments: the active segment's (the writer's own file,
//! shared) and at most a fixed number of sealed segments', least recently used closed
//! first. A sealed segment holds no descriptor of its own: a log of thousands of segments
//! (a backlog no destination consumes) costs as many descriptors as a log of one.
//!
//! Below `shared.rs`; knows only files (`vfs.rs`) and the segments' base positions.

use std::path::Path;
use std::sync::Arc;

use crate::vfs::{Mode, VFile, Vfs};

/// Open handles of sealed segments kept at most, by default.
pub const DEFAULT_READ_HANDLES: usize = 32;

pub(crate) struct Handles {
    cap: usize,
    /// The segment being written: its base and the writer's file.
    active: Option<(u64, Arc<dyn VFile>)>,
    /// Sealed segments' handles: (base, handle, last use), at most `cap`.
    open: Vec<(u64, Arc<dyn VFile>, u64)>,
    tick: u64,
    opened: u64,
}

impl Handles {
    pub(crate) fn new(cap: usize) -> Handles {
        let cap = cap.max(1);
        Handles {
            cap,
            active: None,
            open: Vec::with_capacity(cap),
            tick: 0,
            opened: 0,
        }
    }

    /// The handle to read the segment at `base` with: the active one, a cached one, or
    /// one opened now (read only; the least recently used is closed to make room). An
    /// error is the open's (e.g. EMFILE: nothing is cached, the next read tries again).
    pub(crate) fn get(
        &mut self,
        fs: &dyn Vfs,
        base: u64,
        path: &Path,
    ) -> std::io::Result<Arc<dyn VFile>> {
        if let Some((b, f)) = &self.active {
            if *b == base {
                return Ok(f.clone());
            }
        }
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.open.iter_mut().find(|e| e.0 == base) {
            e.2 = tick;
            return Ok(e.1.clone());
        }
        let f = fs.open(path, Mode::Read)?;
        self.opened += 1;
        self.insert(base, f.clone());
        Ok(f)
    }

    /// Makes `file` the active segment's handle; the previous active one, now sealed,
    /// joins the cache as the most recently used (a reader near the end of the log reads
    /// it next).
    pub(crate) fn set_active(&mut self, base: u64, file: Arc<dyn VFile>) {
        if let Some((old, f)) = self.active.replace((base, file)) {
            if old != base {
                self.tick += 1;
                self.insert(old, f);
            }
        }
    }

    /// Drops the handle of a deleted segment.
    pub(crate) fn remove(&mut self, base: u64) {
        self.open.retain(|e| e.0 != base);
        if self.active.as_ref().is_some_and(|(b, _)| *b == base) {
            self.active = None;
        }
    }

    /// Handles of sealed segments held now.
    pub(crate) fn cached(&self) -> usize {
        self.open.len()
    }

    /// Sealed segments opened for reads so far (cache misses).
    pub(crate) fn opened(&self) -> u64 {
        self.opened
    }

    fn insert(&mut self, base: u64, f: Arc<dyn VFile>) {
        self.open.retain(|e| e.0 != base);
        while self.open.len() >= self.cap {
            let Some(lru) = self
                .open
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.2)
                .map(|(i, _)| i)
            else {
                break;
            };
            // A reader still holding it keeps the descriptor until its read returns.
            self.open.swap_remove(lru);
        }
        self.open.push((base, f, self.tick));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_at_most_cap_handles_and_closes_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let fs = crate::vfs::Real;
        let paths: Vec<_> = (0..5u64)
            .map(|i| {
                let p = dir.path().join(format!("{i}.seg"));
                std::fs::write(&p, [i as u8; 8]).unwrap();
                p
            })
            .collect();
        let mut h = Handles::new(2);
        h.get(&fs, 0, &paths[0]).unwrap();
        h.get(&fs, 1, &paths[1]).unwrap();
        h.get(&fs, 0, &paths[0]).unwrap(); // 0 used last: 1 goes first
        h.get(&fs, 2, &paths[2]).unwrap();
        assert_eq!(h.cached(), 2);
        assert_eq!(h.opened(), 3);
        h.get(&fs, 0, &paths[0]).unwrap();
        assert_eq!(h.opened(), 3, "0 was kept");
        h.get(&fs, 1, &paths[1]).unwrap();
        assert_eq!(h.opened(), 4, "1 was closed");
        let f = h.get(&fs, 1, &paths[1]).unwrap();
        assert_eq!(f.read_exact_at(8, 0).unwrap(), vec![1u8; 8]);
        h.remove(1);
        assert_eq!(h.cached(), 1);
        // The active segment's handle is the writer's, never opened again.
        let active = fs.open(&paths[4], Mode::ReadWrite).unwrap();
        h.set_active(4, active);
        h.get(&fs, 4, &paths[4]).unwrap();
        assert_eq!(h.opened(), 4);
        // Once sealed it joins the cache.
        let next = fs.open(&paths[3], Mode::ReadWrite).unwrap();
        h.set_active(3, next);
        h.get(&fs, 4, &paths[4]).unwrap();
        assert_eq!(h.opened(), 4);
        // A file that cannot be opened is an error, and nothing is cached for it.
        let before = h.cached();
        assert!(h.get(&fs, 9, &dir.path().join("missing.seg")).is_err());
        assert_eq!(h.cached(), before);
    }
}
