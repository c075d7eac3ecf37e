//! Consumer cursors on disk, in `cursors/` of the log directory.
//!
//! - `cursors/<name>`: the cursor as text (`"<position>\n"`), as every release wrote it:
//!   everything before it is finished.
//! - `cursors/<name>+done`: the ranges finished above a cursor (a consumer finishes
//!   records out of order), so that a restart skips them instead of handing them out
//!   again. Binary and checksummed:
//!
//!   ```text
//!   "BLDR"  version (1 byte, 1)  cursor (u64 LE)  ranges (u32 LE)
//!   per range: LEB128 varints of the gap since the previous end (the cursor first) and
//!   of the length
//!   CRC32C (u32 LE) of everything before it
//!   ```
//!
//!   Releases before it skip the file (`+` is not allowed in a consumer name) and read
//!   the cursor alone; it is only ever an addition (a damaged or missing one re-delivers
//!   more, never less).
//!
//! Both are replaced atomically (written under a temporary name, synced, renamed, the
//! directory synced once for both). A position, once finished, stays finished: whichever
//! of the two renames a power loss keeps, what the files say is true.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{io_err, LogError};
use crate::fs::sync_dir;
/// A byte offset in the whole log (`shared::Position`, which sits above this module).
type Position = u64;
use crate::vfs::{Mode, Vfs};

/// Finished ranges kept per consumer at most (beyond them a restart re-delivers; a
/// save costs the same whatever the backlog). The server's router sends at most as many.
pub const MAX_DONE_RANGES: usize = 4096;

const MAGIC: &[u8; 4] = b"BLDR";
const VERSION: u8 = 1;
const DONE_SUFFIX: &str = "+done";

/// How far a consumer got: everything before `cursor` is finished, and so is every
/// position inside one of the `done` ranges (half-open, ascending, above the cursor).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerProgress {
    pub cursor: Position,
    pub done: Vec<(Position, Position)>,
}

/// A consumer as the log keeps it in memory.
#[derive(Debug, Clone, Default)]
pub(crate) struct Consumer {
    pub(crate) cursor: Position,
    /// The finished ranges last acknowledged (or loaded), above the cursor.
    pub(crate) done: Vec<(Position, Position)>,
    /// What the `+done` file holds (its cursor and ranges), to skip rewriting it.
    pub(crate) saved: Option<(Position, Vec<(Position, Position)>)>,
}

pub(crate) fn valid_consumer_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// The well-formed part of `done` for a cursor: ascending, non-empty, not below the
/// cursor, at most [`MAX_DONE_RANGES`]; it stops at the first range that is not.
pub(crate) fn sanitize(
    cursor: Position,
    done: &[(Position, Position)],
) -> Vec<(Position, Position)> {
    let mut out = Vec::with_capacity(done.len().min(MAX_DONE_RANGES));
    let mut prev = cursor;
    for &(start, end) in done {
        if out.len() >= MAX_DONE_RANGES || start < prev || end <= start {
            break;
        }
        out.push((start, end));
        prev = end;
    }
    out
}

/// The ranges above `cursor`, cut at it.
pub(crate) fn above(cursor: Position, done: &[(Position, Position)]) -> Vec<(Position, Position)> {
    done.iter()
        .filter(|r| r.1 > cursor)
        .map(|&(a, b)| (a.max(cursor), b))
        .collect()
}

pub(crate) fn encode(cursor: Position, done: &[(Position, Position)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(21 + done.len() * 4);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&cursor.to_le_bytes());
    out.extend_from_slice(&(done.len() as u32).to_le_bytes());
    let mut prev = cursor;
    for &(start, end) in done {
        put_varint(&mut out, start - prev);
        put_varint(&mut out, end - start);
        prev = end;
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Reads what [`encode`] wrote; `None` when the bytes are not such a file (damaged,
/// another version).
pub(crate) fn decode(bytes: &[u8]) -> Option<ConsumerProgress> {
    let body_len = bytes.len().checked_sub(4)?;
    let (body, crc) = bytes.split_at(body_len);
    if body.len() < 17 || &body[..4] != MAGIC || body[4] != VERSION {
        return None;
    }
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let cursor = u64::from_le_bytes(body[5..13].try_into().ok()?);
    let count = u32::from_le_bytes(body[13..17].try_into().ok()?) as usize;
    let mut at = 17;
    let mut prev = cursor;
    let mut done = Vec::with_capacity(count.min(MAX_DONE_RANGES));
    for _ in 0..count {
        let gap = get_varint(body, &mut at)?;
        let len = get_varint(body, &mut at)?;
        let start = prev.checked_add(gap)?;
        let end = start.checked_add(len)?;
        if len == 0 {
            return None;
        }
        done.push((start, end));
        prev = end;
    }
    (at == body.len()).then_some(ConsumerProgress { cursor, done })
}

/// Appends `v` as a LEB128 varint (7 bits a byte, low first); also the PostgreSQL store's
/// encoding of finished ranges.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a varint written by [`put_varint`] at `*at`, moving `*at` past it; `None` when
/// the bytes end first or it runs past 64 bits.
pub fn get_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn done_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}{DONE_SUFFIX}"))
}

/// Every consumer of the cursor directory. A cursor file that cannot be read is an
/// error (as it always was); a `+done` file that is not valid is ignored, with a warning.
pub(crate) fn load(fs: &dyn Vfs, dir: &Path) -> Result<BTreeMap<String, Consumer>, LogError> {
    let mut out = BTreeMap::new();
    let mut ranges = BTreeMap::new();
    for (name, is_dir) in fs.list(dir).map_err(io_err("listing cursors", dir))? {
        if is_dir {
            continue;
        }
        let path = dir.join(&name);
        if let Some(consumer) = name.strip_suffix(DONE_SUFFIX) {
            if !valid_consumer_name(consumer) {
                continue;
            }
            let bytes = fs.read(&path).map_err(io_err("reading cursor", &path))?;
            match decode(&bytes) {
                Some(p) => {
                    ranges.insert(consumer.to_string(), p);
                }
                None => tracing::warn!(
                    file = %path.display(),
                    "finished ranges of a consumer are damaged; ignored (what they covered is delivered again)"
                ),
            }
            continue;
        }
        if !valid_consumer_name(&name) {
            continue; // leftover temporary files
        }
        let bytes = fs.read(&path).map_err(io_err("reading cursor", &path))?;
        let pos = std::str::from_utf8(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|t| t.trim().parse::<u64>().map_err(|e| e.to_string()))
            .map_err(|e| LogError::Unrecoverable(format!("cursor file {}: {e}", path.display())))?;
        out.insert(
            name,
            Consumer {
                cursor: pos,
                ..Consumer::default()
            },
        );
    }
    for (name, p) in ranges {
        // Ranges of a consumer without a cursor file (removed): nothing to add them to.
        let Some(c) = out.get_mut(&name) else {
            continue;
        };
        // Both files are true whichever is newer: the cursor is the further of the two.
        c.cursor = c.cursor.max(p.cursor);
        c.done = above(c.cursor, &sanitize(p.cursor, &p.done));
        c.saved = Some((p.cursor, p.done));
    }
    Ok(out)
}

/// Replaces the consumer's files: the cursor file when `cursor` is given, the `+done`
/// file when `done` is; one directory sync for both.
pub(crate) fn save(
    fs: &dyn Vfs,
    dir: &Path,
    name: &str,
    cursor: Option<Position>,
    done: Option<(Position, &[(Position, Position)])>,
) -> Result<(), LogError> {
    let mut renames = Vec::with_capacity(2);
    if let Some((base, ranges)) = done {
        let tmp = dir.join(format!(".{name}{DONE_SUFFIX}.tmp"));
        write_synced(fs, &tmp, &encode(base, ranges))?;
        renames.push((tmp, done_path(dir, name)));
    }
    if let Some(pos) = cursor {
        let tmp = dir.join(format!(".{name}.tmp"));
        write_synced(fs, &tmp, format!("{pos}\n").as_bytes())?;
        renames.push((tmp, dir.join(name)));
    }
    if renames.is_empty() {
        return Ok(());
    }
    for (tmp, path) in &renames {
        fs.rename(tmp, path)
            .map_err(io_err("renaming cursor", path))?;
    }
    sync_dir(fs, dir)
}

fn write_synced(fs: &dyn Vfs, path: &Path, bytes: &[u8]) -> Result<(), LogError> {
    let f = fs
        .open(path, Mode::CreateTruncate)
        .map_err(io_err("writing cursor", path))?;
    f.write_all_at(bytes, 0)
        .and_then(|_| f.sync_data())
        .map_err(io_err("writing cursor", path))
}

/// Deletes a consumer's files.
pub(crate) fn remove(fs: &dyn Vfs, dir: &Path, name: &str) -> Result<(), LogError> {
    let path = dir.join(name);
    fs.remove_file(&path)
        .map_err(io_err("removing cursor", &path))?;
    let done = done_path(dir, name);
    if fs.exists(&done) {
        fs.remove_file(&done)
            .map_err(io_err("removing cursor", &done))?;
    }
    sync_dir(fs, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_files_round_trip_and_refuse_damage() {
        let done = vec![(105, 110), (111, 112), (5_000_000, 5_000_300)];
        let bytes = encode(100, &done);
        assert_eq!(
            decode(&bytes),
            Some(ConsumerProgress {
                cursor: 100,
                done: done.clone()
            })
        );
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert_eq!(decode(&b), None, "flipped byte {i}");
        }
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), None, "cut at {cut}");
        }
        assert_eq!(decode(&encode(7, &[])).map(|p| p.done.len()), Some(0));
    }

    #[test]
    fn sanitize_keeps_the_well_formed_prefix_and_the_bound() {
        assert_eq!(sanitize(10, &[(12, 14), (13, 20)]), vec![(12, 14)]);
        assert_eq!(sanitize(10, &[(5, 14)]), vec![]);
        assert_eq!(sanitize(10, &[(12, 12)]), vec![]);
        let many: Vec<_> = (0..10_000u64).map(|i| (20 + 3 * i, 21 + 3 * i)).collect();
        assert_eq!(sanitize(10, &many).len(), MAX_DONE_RANGES);
        assert_eq!(
            above(15, &[(10, 12), (13, 18), (20, 21)]),
            vec![(15, 18), (20, 21)]
        );
    }
}
