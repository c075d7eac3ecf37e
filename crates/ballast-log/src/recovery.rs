//! Opening a segment: finding its valid end, setting aside what is damaged.
//!
//! Nothing is ever silently dropped. Damaged bytes are first copied to the quarantine
//! directory (and fsynced there), and only then is the segment changed:
//! - a complete record whose payload fails its checksum, or a damaged stretch followed by a
//!   valid record, is overwritten in place by a *padding* frame of the same length (readers
//!   skip it, positions of everything after it stay as they were);
//! - bytes after the last valid record with no valid record after them (a torn tail: a write
//!   the crash interrupted, never acknowledged) are truncated.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{io_err, LogError};
use crate::frame::{self, Kind, Scan, HEADER_LEN};
use crate::fs::{create_dir_durably, sync_dir};
use crate::vfs::{Mode, VFile, Vfs};

/// What recovery found and did in one segment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SegmentRecovery {
    /// Data records that are intact.
    pub records: u64,
    /// Damaged records (or damaged stretches) set aside in the middle of the segment.
    pub corrupt_records: u64,
    pub corrupt_bytes: u64,
    /// Bytes after the last valid record, set aside and truncated.
    pub torn_tail_bytes: u64,
    /// Valid length of the segment after recovery.
    pub valid_len: u64,
    pub quarantine_files: Vec<PathBuf>,
}

#[derive(Debug, PartialEq, Eq)]
enum Action {
    Keep { records: u64 },
    Pad { start: usize, end: usize },
    Truncate { at: usize },
}

/// Walks `buf`, returning what to do with each part of it.
fn plan(buf: &[u8]) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut at = 0usize;
    let mut records = 0u64;
    while at < buf.len() {
        match frame::scan_at(buf, at) {
            Scan::Valid { header, frame_len } => {
                if header.kind == Kind::Data {
                    records += 1;
                }
                at += frame_len;
            }
            Scan::BadPayload { frame_len } => {
                if frame::resync(buf, at + frame_len).is_none() {
                    // Nothing valid after it: the last write was interrupted (its header
                    // reached the disk, not all of its payload; in a preallocated segment
                    // the rest reads as zeros).
                    actions.push(Action::Truncate { at });
                    at = buf.len();
                } else {
                    actions.push(Action::Pad {
                        start: at,
                        end: at + frame_len,
                    });
                    at += frame_len;
                }
            }
            Scan::Incomplete | Scan::BadHeader => match frame::resync(buf, at + 1) {
                Some(next) if next - at >= HEADER_LEN => {
                    actions.push(Action::Pad {
                        start: at,
                        end: next,
                    });
                    at = next;
                }
                // A "valid frame" fewer than HEADER_LEN bytes after a frame start can only
                // be a coincidence inside damaged bytes; keep scanning after it.
                Some(next) => match frame::resync(buf, next + 1) {
                    Some(n2) => {
                        actions.push(Action::Pad { start: at, end: n2 });
                        at = n2;
                    }
                    None => {
                        actions.push(Action::Truncate { at });
                        at = buf.len();
                    }
                },
                None => {
                    actions.push(Action::Truncate { at });
                    at = buf.len();
                }
            },
        }
    }
    actions.push(Action::Keep { records });
    actions
}

/// Copies damaged bytes to the quarantine directory, durably (the file, its directory
/// entry, and the directory's own entry), before the segment is changed.
fn quarantine(
    fs: &dyn Vfs,
    qdir: &Path,
    base: u64,
    offset: usize,
    what: &str,
    bytes: &[u8],
) -> Result<PathBuf, LogError> {
    create_dir_durably(fs, qdir)?;
    let path = qdir.join(format!("{:020}-{:020}.{what}", base, base + offset as u64));
    let f = fs
        .open(&path, Mode::CreateTruncate)
        .map_err(io_err("creating quarantine file", &path))?;
    f.write_all_at(bytes, 0)
        .and_then(|_| f.sync_data())
        .map_err(io_err("writing quarantine file", &path))?;
    sync_dir(fs, qdir)?;
    Ok(path)
}

/// Recovers one segment file in place (read-write mode).
pub(crate) fn recover_segment(
    fs: &dyn Vfs,
    path: &Path,
    base: u64,
    qdir: &Path,
) -> Result<SegmentRecovery, LogError> {
    let buf = fs.read(path).map_err(io_err("reading segment", path))?;
    let actions = plan(&buf);
    let mut out = SegmentRecovery {
        valid_len: buf.len() as u64,
        ..Default::default()
    };
    let mut file: Option<Arc<dyn VFile>> = None;
    for action in actions {
        match action {
            Action::Keep { records } => out.records = records,
            Action::Pad { start, end } => {
                let q = quarantine(fs, qdir, base, start, "corrupt", &buf[start..end])?;
                tracing::error!(
                    segment = %path.display(), position = base + start as u64, bytes = end - start,
                    quarantine = %q.display(),
                    "damaged record found in the log; its bytes were moved to quarantine"
                );
                out.quarantine_files.push(q);
                out.corrupt_records += 1;
                out.corrupt_bytes += (end - start) as u64;
                let payload = &buf[start + HEADER_LEN..end];
                let header = frame::encode_header_with_crc(
                    Kind::Padding,
                    payload.len(),
                    crc32c::crc32c(payload),
                );
                let f = open_rw(fs, path, &mut file)?;
                f.write_all_at(&header, start as u64)
                    .map_err(io_err("padding damaged record", path))?;
            }
            Action::Truncate { at } if buf[at..].iter().all(|&b| b == 0) => {
                // Preallocated space that was never written: nothing to set aside.
                out.valid_len = at as u64;
                let f = open_rw(fs, path, &mut file)?;
                f.set_len(at as u64)
                    .map_err(io_err("truncating segment", path))?;
            }
            Action::Truncate { at } => {
                let q = quarantine(fs, qdir, base, at, "torn", &buf[at..])?;
                tracing::warn!(
                    segment = %path.display(), position = base + at as u64, bytes = buf.len() - at,
                    quarantine = %q.display(),
                    "incomplete write at the end of the log (interrupted, never acknowledged); set aside and truncated"
                );
                out.quarantine_files.push(q);
                out.torn_tail_bytes += (buf.len() - at) as u64;
                out.valid_len = at as u64;
                let f = open_rw(fs, path, &mut file)?;
                f.set_len(at as u64)
                    .map_err(io_err("truncating segment", path))?;
            }
        }
    }
    if let Some(f) = file {
        f.sync_data()
            .map_err(io_err("syncing recovered segment", path))?;
    }
    Ok(out)
}

fn open_rw<'a>(
    fs: &dyn Vfs,
    path: &Path,
    slot: &'a mut Option<Arc<dyn VFile>>,
) -> Result<&'a dyn VFile, LogError> {
    if slot.is_none() {
        let f = fs
            .open(path, Mode::ReadWrite)
            .map_err(io_err("opening segment", path))?;
        *slot = Some(f);
    }
    match slot {
        Some(f) => Ok(&**f),
        None => unreachable!("slot was just filled"),
    }
}

/// One record as found by [`scan_segment_readonly`].
pub(crate) enum Found<'a> {
    Record { offset: usize, payload: &'a [u8] },
    Damaged { offset: usize, len: usize },
}

/// Walks a segment's bytes without changing anything (for inspection while a server may
/// be writing): yields every valid data record and every damaged stretch; an incomplete
/// tail is ignored.
pub(crate) fn scan_segment_readonly(buf: &[u8], mut visit: impl FnMut(Found<'_>)) {
    let mut at = 0usize;
    while at < buf.len() {
        match frame::scan_at(buf, at) {
            Scan::Valid { header, frame_len } => {
                if header.kind == Kind::Data {
                    visit(Found::Record {
                        offset: at,
                        payload: &buf[at + HEADER_LEN..at + frame_len],
                    });
                }
                at += frame_len;
            }
            Scan::BadPayload { frame_len } => {
                if frame::resync(buf, at + frame_len).is_none() {
                    return; // a write in progress, or interrupted
                }
                visit(Found::Damaged {
                    offset: at,
                    len: frame_len,
                });
                at += frame_len;
            }
            Scan::Incomplete | Scan::BadHeader => match frame::resync(buf, at + 1) {
                Some(next) => {
                    visit(Found::Damaged {
                        offset: at,
                        len: next - at,
                    });
                    at = next;
                }
                None => return,
            },
        }
    }
}

/// Appends raw bytes to a file at its end (used by tests to build damaged segments).
#[cfg(test)]
pub(crate) fn append_raw(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(bytes).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Batch;

    fn frames(payloads: &[&[u8]]) -> (Vec<u8>, Vec<usize>) {
        let mut b = Batch::new();
        let mut starts = Vec::new();
        for p in payloads {
            starts.push(b.buf.len());
            b.push(p).unwrap();
        }
        (b.buf, starts)
    }

    #[test]
    fn plan_clean() {
        let (buf, _) = frames(&[b"a", b"bb", b"ccc"]);
        assert_eq!(plan(&buf), vec![Action::Keep { records: 3 }]);
    }

    #[test]
    fn plan_torn_tail() {
        let (buf, starts) = frames(&[b"a", b"bb", b"ccc"]);
        for cut in starts[2] + 1..buf.len() {
            assert_eq!(
                plan(&buf[..cut]),
                vec![
                    Action::Truncate { at: starts[2] },
                    Action::Keep { records: 2 }
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn plan_torn_last_payload_and_zero_tail() {
        let (mut buf, starts) = frames(&[b"aaaa", b"bbbb"]);
        let last = buf.len() - 1;
        buf[last] ^= 1;
        buf.extend_from_slice(&[0u8; 100]);
        assert_eq!(
            plan(&buf),
            vec![
                Action::Truncate { at: starts[1] },
                Action::Keep { records: 1 }
            ]
        );
    }

    #[test]
    fn zero_tail_is_dropped_without_quarantine() {
        let dir = tempfile::tempdir().unwrap();
        let seg = dir.path().join("seg");
        let (mut buf, _) = frames(&[b"aaaa", b"bbbb"]);
        let len = buf.len();
        buf.extend_from_slice(&[0u8; 4096]);
        std::fs::write(&seg, &buf).unwrap();
        let r = recover_segment(&crate::vfs::Real, &seg, 0, &dir.path().join("q")).unwrap();
        assert_eq!(
            (r.records, r.torn_tail_bytes, r.valid_len),
            (2, 0, len as u64)
        );
        assert!(r.quarantine_files.is_empty());
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), len as u64);
    }

    #[test]
    fn plan_bad_payload_in_middle() {
        let (mut buf, starts) = frames(&[b"aaaa", b"bbbb", b"cccc"]);
        buf[starts[1] + HEADER_LEN + 1] ^= 1;
        assert_eq!(
            plan(&buf),
            vec![
                Action::Pad {
                    start: starts[1],
                    end: starts[2]
                },
                Action::Keep { records: 2 }
            ]
        );
    }

    #[test]
    fn plan_bad_header_in_middle() {
        let (mut buf, starts) = frames(&[b"aaaa", b"bbbb", b"cccc"]);
        buf[starts[1] + 4] ^= 0x80;
        assert_eq!(
            plan(&buf),
            vec![
                Action::Pad {
                    start: starts[1],
                    end: starts[2]
                },
                Action::Keep { records: 2 }
            ]
        );
    }

    #[test]
    fn recover_pads_and_quarantines() {
        let dir = tempfile::tempdir().unwrap();
        let seg = dir.path().join("seg");
        let (mut buf, starts) = frames(&[b"aaaa", b"bbbb", b"cccc"]);
        buf[starts[1] + HEADER_LEN] ^= 1;
        std::fs::write(&seg, &buf).unwrap();
        append_raw(&seg, &[1, 2, 3]);
        let r = recover_segment(&crate::vfs::Real, &seg, 100, &dir.path().join("q")).unwrap();
        assert_eq!(r.records, 2);
        assert_eq!(r.corrupt_records, 1);
        assert_eq!(r.torn_tail_bytes, 3);
        assert_eq!(r.valid_len, buf.len() as u64);
        assert_eq!(r.quarantine_files.len(), 2);
        let q = std::fs::read(&r.quarantine_files[0]).unwrap();
        assert_eq!(q, buf[starts[1]..starts[2]]);
        // A second recovery finds a clean segment: the damage is counted once.
        let again = recover_segment(&crate::vfs::Real, &seg, 100, &dir.path().join("q")).unwrap();
        assert_eq!(again.corrupt_records, 0);
        assert_eq!(again.torn_tail_bytes, 0);
        assert_eq!(again.records, 2);
    }
}
