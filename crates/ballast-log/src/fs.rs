//! File-system steps every part of the log shares: segment file names and listing,
//! directory fsync, and atomic file replacement.

use std::path::{Path, PathBuf};

use crate::error::{io_err, LogError};
/// A byte offset in the whole log (`shared::Position`, which sits above this module).
type Position = u64;
use crate::vfs::{Mode, Vfs};

pub(crate) const SEGMENT_SUFFIX: &str = ".seg";

pub(crate) fn sync_dir(fs: &dyn Vfs, dir: &Path) -> Result<(), LogError> {
    fs.sync_dir(dir).map_err(io_err("syncing directory", dir))
}

/// Creates `dir` when missing and makes its entry durable in its parent (a directory
/// created and never synced into its parent can vanish with everything in it at a power
/// loss).
pub(crate) fn create_dir_durably(fs: &dyn Vfs, dir: &Path) -> Result<(), LogError> {
    if fs.exists(dir) {
        return Ok(());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        create_dir_durably(fs, parent)?;
    }
    fs.create_dir_all(dir)
        .map_err(io_err("creating directory", dir))?;
    if let Some(parent) = parent {
        sync_dir(fs, parent)?;
    }
    Ok(())
}

pub(crate) fn segment_path(dir: &Path, base: Position) -> PathBuf {
    dir.join(format!("{base:020}{SEGMENT_SUFFIX}"))
}

/// Segment files of a directory, sorted by base position.
pub(crate) fn list_segments(
    fs: &dyn Vfs,
    dir: &Path,
) -> Result<Vec<(Position, PathBuf)>, LogError> {
    let mut out = Vec::new();
    for (name, is_dir) in fs.list(dir).map_err(io_err("listing log directory", dir))? {
        if is_dir {
            continue;
        }
        let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) else {
            continue;
        };
        if let Ok(base) = stem.parse::<u64>() {
            out.push((base, dir.join(&name)));
        }
    }
    out.sort();
    Ok(out)
}

/// Write to a temporary file (`path` with the extension `tmp`), fsync it, rename it over
/// `path`, fsync the directory: a reader sees the old contents or the new, never a part.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically_on(&crate::vfs::Real, path, bytes)
}

/// [`write_atomically`] on a given file system (the power-loss simulation checks it).
pub(crate) fn write_atomically_on(fs: &dyn Vfs, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let f = fs.open(&tmp, Mode::CreateTruncate)?;
    f.write_all_at(bytes, 0)?;
    f.sync_data()?;
    fs.rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs.sync_dir(dir)?;
    }
    Ok(())
}
