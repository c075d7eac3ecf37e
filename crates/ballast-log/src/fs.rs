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
