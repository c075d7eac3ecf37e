//! A simulated disk for tests: the log's file operations (`vfs::Vfs`) on memory, with
//! power loss.
//!
//! Each file keeps its *durable* bytes (as of its last completed `sync_data`) and the
//! operations since (writes, length changes). Each directory keeps the changes to its
//! entries (creations, renames, removals) made since its last `sync_dir`. A power loss
//! ([`SimFs::power_loss`]) then keeps, per file, each unsynced operation whole, torn at a
//! random byte, or not at all (chosen at random), and per directory a random number of
//! its oldest unsynced changes (a rename whole or not at all), undoing the rest; what is
//! left is the disk the next open finds. A file whose entry was undone is gone, and so is
//! everything in a directory whose own entry was undone.
//!
//! A crash can be armed at the n-th operation from now ([`SimFs::crash_after`]): that
//! operation and every later one fail (`EIO`), as if the machine stopped there, so that
//! nothing is acknowledged after it. Every choice comes from one seeded generator.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::vfs::{DirLock, Mode, VFile, Vfs};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    File(u64),
    Dir,
}

#[derive(Debug, Clone)]
enum FileOp {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Debug, Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<FileOp>,
}

/// Unsynced changes of one directory's entries, undone together: each name with what it
/// was before.
#[derive(Debug)]
struct DirOp {
    parent: PathBuf,
    before: Vec<(PathBuf, Option<Node>)>,
}

struct State {
    rng: StdRng,
    /// Operations that change or sync something, counted since the disk was made.
    ops: u64,
    crash_at: Option<u64>,
    crashed: bool,
    /// Bumped at every power loss: handles opened before it fail.
    boot: u64,
    next_ino: u64,
    inodes: HashMap<u64, Inode>,
    names: BTreeMap<PathBuf, Node>,
    pending_dirs: Vec<DirOp>,
}

/// The simulated disk; clones share it.
#[derive(Clone)]
pub(crate) struct SimFs(Arc<Mutex<State>>);

struct SimFile {
    fs: SimFs,
    ino: u64,
    boot: u64,
    writable: bool,
}

fn eio() -> io::Error {
    io::Error::other("simulated crash: the machine is down")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}", path.display()))
}

impl State {
    /// Counts a changing operation; fails it (and all later ones) at the armed crash.
    fn step(&mut self) -> io::Result<()> {
        if self.crashed {
            return Err(eio());
        }
        self.ops += 1;
        if self.crash_at.is_some_and(|at| self.ops >= at) {
            self.crashed = true;
            return Err(eio());
        }
        Ok(())
    }

    fn alive(&self) -> io::Result<()> {
        if self.crashed {
            Err(eio())
        } else {
            Ok(())
        }
    }

    fn parent_is_dir(&self, path: &Path) -> io::Result<PathBuf> {
        let parent = path.parent().ok_or_else(|| not_found(path))?;
        match self.names.get(parent) {
            Some(Node::Dir) => Ok(parent.to_path_buf()),
            _ => Err(not_found(parent)),
        }
    }

    fn set_name(&mut self, path: &Path, node: Option<Node>, op: &mut Vec<(PathBuf, Option<Node>)>) {
        let before = match node {
            Some(n) => self.names.insert(path.to_path_buf(), n),
            None => self.names.remove(path),
        };
        op.push((path.to_path_buf(), before));
    }

    fn new_inode(&mut self) -> u64 {
        self.next_ino += 1;
        self.inodes.insert(self.next_ino, Inode::default());
        self.next_ino
    }
}

fn apply(data: &mut Vec<u8>, op: &FileOp) {
    match op {
        FileOp::Write(at, bytes) => {
            let at = *at as usize;
            if data.len() < at + bytes.len() {
                data.resize(at + bytes.len(), 0);
            }
            data[at..at + bytes.len()].copy_from_slice(bytes);
        }
        FileOp::SetLen(n) => data.resize(*n as usize, 0),
    }
}

impl SimFs {
    /// An empty disk with the directory `root` on it (durable).
    pub(crate) fn new(seed: u64, root: &Path) -> SimFs {
        let mut names = BTreeMap::new();
        for a in root.ancestors() {
            if !a.as_os_str().is_empty() {
                names.insert(a.to_path_buf(), Node::Dir);
            }
        }
        SimFs(Arc::new(Mutex::new(State {
            rng: StdRng::seed_from_u64(seed),
            ops: 0,
            crash_at: None,
            crashed: false,
            boot: 0,
            next_ino: 0,
            inodes: HashMap::new(),
            names,
            pending_dirs: Vec::new(),
        })))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arms a crash at the `n`-th changing operation from now (n ≥ 1).
    pub(crate) fn crash_after(&self, n: u64) {
        let mut s = self.state();
        s.crash_at = Some(s.ops + n.max(1));
    }

    /// Stops the machine now: every later operation fails.
    pub(crate) fn crash_now(&self) {
        self.state().crashed = true;
    }

    pub(crate) fn crashed(&self) -> bool {
        self.state().crashed
    }

    pub(crate) fn ops(&self) -> u64 {
        self.state().ops
    }

    /// Power loss: keeps what was synced and a random part of what was not (see the
    /// module's comment); the machine is up again afterwards, with nothing armed.
    pub(crate) fn power_loss(&self) {
        let mut guard = self.state();
        let s = &mut *guard;
        // Directory entries: per directory, its oldest `keep` unsynced changes stay.
        let mut per_dir: HashMap<PathBuf, usize> = HashMap::new();
        for op in &s.pending_dirs {
            *per_dir.entry(op.parent.clone()).or_default() += 1;
        }
        let mut keep: HashMap<PathBuf, usize> = HashMap::new();
        for (dir, n) in per_dir {
            let k = match s.rng.gen_range(0..3) {
                0 => 0,
                1 => n,
                _ => s.rng.gen_range(0..=n),
            };
            keep.insert(dir, k);
        }
        let mut index: HashMap<PathBuf, usize> = HashMap::new();
        let mut undo = Vec::new();
        for (i, op) in s.pending_dirs.iter().enumerate() {
            let seen = index.entry(op.parent.clone()).or_default();
            if *seen >= keep[&op.parent] {
                undo.push(i);
            }
            *seen += 1;
        }
        let pending = std::mem::take(&mut s.pending_dirs);
        for i in undo.into_iter().rev() {
            for (name, before) in pending[i].before.iter().rev() {
                match before {
                    Some(n) => {
                        s.names.insert(name.clone(), *n);
                    }
                    None => {
                        s.names.remove(name);
                    }
                }
            }
        }
        // Whatever lost its directory is gone with it.
        loop {
            let orphans: Vec<PathBuf> = s
                .names
                .keys()
                .filter(|p| {
                    p.parent().is_some_and(|parent| {
                        !parent.as_os_str().is_empty() && s.names.get(parent) != Some(&Node::Dir)
                    })
                })
                .cloned()
                .collect();
            if orphans.is_empty() {
                break;
            }
            for p in orphans {
                s.names.remove(&p);
            }
        }
        // File contents: each unsynced operation whole, torn, or lost.
        let live: std::collections::HashSet<u64> = s
            .names
            .values()
            .filter_map(|n| match n {
                Node::File(i) => Some(*i),
                Node::Dir => None,
            })
            .collect();
        s.inodes.retain(|ino, _| live.contains(ino));
        let mut inos: Vec<u64> = s.inodes.keys().copied().collect();
        inos.sort();
        for ino in inos {
            let Some(inode) = s.inodes.get_mut(&ino) else {
                continue;
            };
            let mut data = std::mem::take(&mut inode.durable);
            for op in std::mem::take(&mut inode.pending) {
                match s.rng.gen_range(0..10) {
                    0..=3 => apply(&mut data, &op),
                    4..=5 => {
                        if let FileOp::Write(at, bytes) = op {
                            let cut = s.rng.gen_range(0..=bytes.len());
                            apply(&mut data, &FileOp::Write(at, bytes[..cut].to_vec()));
                        }
                    }
                    _ => {}
                }
            }
            inode.durable = data.clone();
            inode.data = data;
        }
        s.crashed = false;
        s.crash_at = None;
        s.boot += 1;
    }

    /// A file's current bytes (for checks).
    #[allow(dead_code)]
    pub(crate) fn file(&self, path: &Path) -> Option<Vec<u8>> {
        let s = self.state();
        match s.names.get(path) {
            Some(Node::File(i)) => s.inodes.get(i).map(|n| n.data.clone()),
            _ => None,
        }
    }
}

impl SimFile {
    fn with<T>(&self, f: impl FnOnce(&mut State, &mut Inode) -> io::Result<T>) -> io::Result<T> {
        let mut guard = self.fs.state();
        let s = &mut *guard;
        if s.boot != self.boot {
            return Err(eio());
        }
        let mut inode = s.inodes.remove(&self.ino).ok_or_else(eio)?;
        let r = f(s, &mut inode);
        s.inodes.insert(self.ino, inode);
        r
    }
}

impl VFile for SimFile {
    fn read_exact_at(&self, len: usize, offset: u64) -> io::Result<Vec<u8>> {
        self.with(|s, n| {
            s.alive()?;
            let at = offset as usize;
            if at + len > n.data.len() {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            Ok(n.data[at..at + len].to_vec())
        })
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        self.with(|s, n| {
            s.step()?;
            let op = FileOp::Write(offset, buf.to_vec());
            apply(&mut n.data, &op);
            n.pending.push(op);
            Ok(())
        })
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        self.with(|s, n| {
            s.step()?;
            let op = FileOp::SetLen(len);
            apply(&mut n.data, &op);
            n.pending.push(op);
            Ok(())
        })
    }
    fn sync_data(&self) -> io::Result<()> {
        self.with(|s, n| {
            s.step()?;
            n.durable = n.data.clone();
            n.pending.clear();
            Ok(())
        })
    }
    fn len(&self) -> io::Result<u64> {
        self.with(|s, n| {
            s.alive()?;
            Ok(n.data.len() as u64)
        })
    }
}

impl Vfs for SimFs {
    fn open(&self, path: &Path, mode: Mode) -> io::Result<Arc<dyn VFile>> {
        let mut guard = self.state();
        let s = &mut *guard;
        let existing = s.names.get(path).copied();
        let ino = match (existing, mode) {
            (Some(Node::Dir), _) => {
                return Err(io::Error::other(format!(
                    "{} is a directory",
                    path.display()
                )))
            }
            (Some(Node::File(i)), Mode::Read | Mode::ReadWrite) => {
                s.alive()?;
                i
            }
            (None, Mode::Read | Mode::ReadWrite) => {
                s.alive()?;
                return Err(not_found(path));
            }
            (Some(Node::File(i)), Mode::CreateTruncate) => {
                s.step()?;
                if let Some(n) = s.inodes.get_mut(&i) {
                    n.data.clear();
                    n.pending.push(FileOp::SetLen(0));
                }
                i
            }
            (None, Mode::CreateTruncate) => {
                let parent = s.parent_is_dir(path)?;
                s.step()?;
                let i = s.new_inode();
                let mut before = Vec::new();
                s.set_name(path, Some(Node::File(i)), &mut before);
                s.pending_dirs.push(DirOp { parent, before });
                i
            }
        };
        Ok(Arc::new(SimFile {
            fs: self.clone(),
            ino,
            boot: s.boot,
            writable: mode != Mode::Read,
        }))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let s = self.state();
        s.alive()?;
        match s.names.get(path) {
            Some(Node::File(i)) => Ok(s.inodes.get(i).map(|n| n.data.clone()).unwrap_or_default()),
            Some(Node::Dir) => Err(io::Error::other("is a directory")),
            None => Err(not_found(path)),
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut guard = self.state();
        let s = &mut *guard;
        s.alive()?;
        let node = s.names.get(from).copied().ok_or_else(|| not_found(from))?;
        let parent = s.parent_is_dir(to)?;
        assert_eq!(
            from.parent(),
            to.parent(),
            "the log renames within a directory"
        );
        s.step()?;
        let mut before = Vec::new();
        s.set_name(to, Some(node), &mut before);
        s.set_name(from, None, &mut before);
        s.pending_dirs.push(DirOp { parent, before });
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut guard = self.state();
        let s = &mut *guard;
        s.alive()?;
        match s.names.get(path) {
            Some(Node::File(_)) => {}
            Some(Node::Dir) => return Err(io::Error::other("is a directory")),
            None => return Err(not_found(path)),
        }
        let parent = s.parent_is_dir(path)?;
        s.step()?;
        let mut before = Vec::new();
        s.set_name(path, None, &mut before);
        s.pending_dirs.push(DirOp { parent, before });
        Ok(())
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut guard = self.state();
        let s = &mut *guard;
        s.alive()?;
        let mut missing: Vec<&Path> = dir
            .ancestors()
            .filter(|a| !a.as_os_str().is_empty())
            .take_while(|a| !s.names.contains_key(*a))
            .collect();
        missing.reverse();
        for d in missing {
            let parent = s.parent_is_dir(d)?;
            s.step()?;
            let mut before = Vec::new();
            s.set_name(d, Some(Node::Dir), &mut before);
            s.pending_dirs.push(DirOp { parent, before });
        }
        match s.names.get(dir) {
            Some(Node::Dir) => Ok(()),
            _ => Err(io::Error::other("not a directory")),
        }
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut guard = self.state();
        let s = &mut *guard;
        if s.names.get(dir) != Some(&Node::Dir) {
            s.alive()?;
            return Err(not_found(dir));
        }
        s.step()?;
        s.pending_dirs.retain(|op| op.parent != dir);
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<(String, bool)>> {
        let s = self.state();
        s.alive()?;
        if s.names.get(dir) != Some(&Node::Dir) {
            return Err(not_found(dir));
        }
        Ok(s.names
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .filter_map(|(p, n)| {
                let name = p.file_name()?.to_str()?.to_string();
                Some((name, *n == Node::Dir))
            })
            .collect())
    }

    fn exists(&self, path: &Path) -> bool {
        self.state().names.contains_key(path)
    }

    fn free_bytes(&self, _dir: &Path) -> io::Result<u64> {
        Ok(1 << 40)
    }

    fn lock(&self, _path: &Path) -> io::Result<Option<DirLock>> {
        // One log per simulated disk at a time: the test drops a log before it opens the
        // next.
        Ok(Some(Box::new(())))
    }

    fn prepare_inline(&self) -> bool {
        true
    }
}
