//! The file operations the log does, behind one small trait, so that a test can put a
//! simulated disk under the whole log (`sim.rs`: power loss drops what no sync covered)
//! while production runs on the real file system (`Real`).
//!
//! The file system is chosen once, when the log opens (`Log::open` takes `Real`); every
//! file handle is then an `Arc<dyn VFile>`. A virtual call costs nanoseconds beside the
//! system call behind it, so the real path pays nothing measurable.
//!
//! At the bottom of the crate: it knows nothing of segments, frames or cursors.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// How a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Read only; the file must exist.
    Read,
    /// Read and write; the file must exist.
    ReadWrite,
    /// Read and write; created when missing, emptied otherwise.
    CreateTruncate,
}

/// One open file.
pub(crate) trait VFile: Send + Sync {
    /// Exactly `len` bytes at `offset` (an error at the end of the file, like
    /// `read_exact_at`).
    fn read_exact_at(&self, len: usize, offset: u64) -> io::Result<Vec<u8>>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// `fdatasync`: the file's data and what is needed to read it back (its size).
    fn sync_data(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    /// Starts writing `len` bytes at `offset` out to the device and waits for it, without
    /// a cache flush (a hint: durability still needs `sync_data`).
    fn write_out(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
}

/// A held directory lock; dropping it releases the lock.
pub(crate) type DirLock = Box<dyn Send + Sync>;

/// The file system under one log.
pub(crate) trait Vfs: Send + Sync {
    fn open(&self, path: &Path, mode: Mode) -> io::Result<Arc<dyn VFile>>;
    /// Reads a whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Renames within one directory (the new name's directory entry is durable once the
    /// directory is synced).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Creates the directory (and its parents) when missing.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Names in a directory, with whether each is a directory.
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, bool)>>;
    fn exists(&self, path: &Path) -> bool;
    /// Free bytes for an unprivileged writer on the file system of `dir`.
    fn free_bytes(&self, dir: &Path) -> io::Result<u64>;
    /// Takes the exclusive lock of the file at `path` (created when missing); `Ok(None)`
    /// when another process holds it.
    fn lock(&self, path: &Path) -> io::Result<Option<DirLock>>;
    /// True when the next segment is to be prepared on the writer's thread, when asked,
    /// instead of on a thread of its own (a simulation that must replay exactly).
    fn prepare_inline(&self) -> bool {
        false
    }
}

/// The real file system.
pub(crate) struct Real;

struct RealFile(File);

impl VFile for RealFile {
    fn read_exact_at(&self, len: usize, offset: u64) -> io::Result<Vec<u8>> {
        read_exact_at_new(&self.0, len, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn write_out(&self, offset: u64, len: u64) -> io::Result<()> {
        write_out(&self.0, offset, len)
    }
}

impl Vfs for Real {
    fn open(&self, path: &Path, mode: Mode) -> io::Result<Arc<dyn VFile>> {
        let mut o = OpenOptions::new();
        o.read(true);
        match mode {
            Mode::Read => {}
            Mode::ReadWrite => {
                o.write(true);
            }
            Mode::CreateTruncate => {
                o.write(true).create(true).truncate(true);
            }
        }
        Ok(Arc::new(RealFile(o.open(path)?)))
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, bool)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            out.push((name, is_dir));
        }
        Ok(out)
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn free_bytes(&self, dir: &Path) -> io::Result<u64> {
        free_bytes(dir)
    }
    fn lock(&self, path: &Path) -> io::Result<Option<DirLock>> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        match f.try_lock() {
            Ok(()) => Ok(Some(Box::new(f))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

/// Free bytes on the file system of `dir` for an unprivileged writer.
fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path; statvfs only writes into `st`.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Writes a piece of `file` out to the device and waits for it, without a journal
/// commit or a cache flush (Linux `sync_file_range`): dirty zeros never pile up for one
/// large flush. Where the call is not supported, the final `fdatasync` does it all.
fn write_out(file: &File, offset: u64, len: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: plain syscall on a descriptor this function borrows.
        let r =
            unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, flags) };
        if r != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::ESPIPE) => Ok(()),
                _ => Err(e),
            };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
    Ok(())
}

/// Reads exactly `len` bytes at `offset` into a new buffer that is not zeroed first
/// (`vec![0; len]` then `read_exact_at` wrote every byte twice: the memset of a
/// megabyte chunk cost as much as the copy out of the page cache). An error, or the end
/// of the file before `len` bytes, fails like `read_exact_at`.
pub(crate) fn read_exact_at_new(file: &File, len: usize, offset: u64) -> io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let done = buf.len();
        let spare = buf.spare_capacity_mut();
        let want = (len - done).min(spare.len());
        let at = i64::try_from(offset + done as u64)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the pointer and length describe `want` bytes of `buf`'s spare capacity,
        // which `pread` only writes to; `set_len` below covers only the bytes it reported
        // as written (n ≤ want).
        let n = unsafe { libc::pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), want, at) };
        match n {
            n if n > 0 => unsafe { buf.set_len(done + n as usize) },
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    #[test]
    fn reads_exactly_at_an_offset_or_fails_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        let f = std::fs::File::open(&path).unwrap();
        assert_eq!(
            super::read_exact_at_new(&f, 70_000, 1234).unwrap(),
            &data[1234..71_234]
        );
        assert_eq!(
            super::read_exact_at_new(&f, 0, 5).unwrap(),
            Vec::<u8>::new()
        );
        let e = super::read_exact_at_new(&f, 10, 99_995).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
