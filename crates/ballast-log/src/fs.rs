//! File-system steps every part of the log shares: segment file names and listing,
//! directory fsync, and atomic file replacement.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{io_err, LogError};
use crate::shared::Position;

pub(crate) const SEGMENT_SUFFIX: &str = ".seg";

pub(crate) fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

pub(crate) fn segment_path(dir: &Path, base: Position) -> PathBuf {
    dir.join(format!("{base:020}{SEGMENT_SUFFIX}"))
}

/// Segment files of a directory, sorted by base position.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(Position, PathBuf)>, LogError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err("listing log directory", dir))? {
        let entry = entry.map_err(io_err("listing log directory", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) else {
            continue;
        };
        if let Ok(base) = stem.parse::<u64>() {
            out.push((base, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Write to a temporary file (`path` with the extension `tmp`), fsync it, rename it over
/// `path`, fsync the directory: a reader sees the old contents or the new, never a part.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Reads exactly `len` bytes at `offset` into a new buffer that is not zeroed first
/// (`vec![0; len]` then `read_exact_at` wrote every byte twice: the memset of a
/// megabyte chunk cost as much as the copy out of the page cache). An error, or the end
/// of the file before `len` bytes, fails like `read_exact_at`.
pub(crate) fn read_exact_at_new(file: &File, len: usize, offset: u64) -> std::io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let done = buf.len();
        let spare = buf.spare_capacity_mut();
        let want = (len - done).min(spare.len());
        let at = i64::try_from(offset + done as u64)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: the pointer and length describe `want` bytes of `buf`'s spare capacity,
        // which `pread` only writes to; `set_len` below covers only the bytes it reported
        // as written (n ≤ want).
        let n = unsafe { libc::pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), want, at) };
        match n {
            n if n > 0 => unsafe { buf.set_len(done + n as usize) },
            0 => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
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
