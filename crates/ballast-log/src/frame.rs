//! On-disk record framing.
//!
//! Every record is a 16-byte header followed by its payload:
//!
//! ```text
//! offset  size  field
//!      0     4  magic        0xB1A5_7E0D (little endian); helps re-synchronise after corruption
//!      4     4  len_kind     payload length (low 24 bits) | kind (high 8 bits)
//!      8     4  payload_crc  CRC32C of the payload
//!     12     4  header_crc   CRC32C of bytes 0..12
//! ```
//!
//! The header has its own checksum so that recovery can tell a record whose *payload* is
//! damaged (its extent is still known: quarantine exactly those bytes) from a damaged or
//! partially written *header* (scan forward for the next valid frame).

use crate::error::LogError;
/// Largest payload one record may carry (the length field has 24 bits; defined beside
/// the error that names it).
pub use crate::error::MAX_RECORD_BYTES;

pub(crate) const MAGIC: u32 = 0xB1A5_7E0D;
pub const HEADER_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// An application record.
    Data = 1,
    /// Bytes that recovery set aside (their original content is in the quarantine
    /// directory); readers skip them.
    Padding = 2,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::Data),
            2 => Some(Kind::Padding),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: Kind,
    pub len: usize,
    pub payload_crc: u32,
}

pub(crate) fn encode_header(kind: Kind, payload: &[u8]) -> [u8; HEADER_LEN] {
    encode_header_with_crc(kind, payload.len(), crc32c::crc32c(payload))
}

pub(crate) fn encode_header_with_crc(kind: Kind, len: usize, payload_crc: u32) -> [u8; HEADER_LEN] {
    debug_assert!(len <= MAX_RECORD_BYTES);
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    let len_kind = (len as u32) | ((kind as u32) << 24);
    h[4..8].copy_from_slice(&len_kind.to_le_bytes());
    h[8..12].copy_from_slice(&payload_crc.to_le_bytes());
    let hcrc = crc32c::crc32c(&h[0..12]);
    h[12..16].copy_from_slice(&hcrc.to_le_bytes());
    h
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// Decodes a header; `None` when the bytes are not a valid header.
pub(crate) fn decode_header(b: &[u8]) -> Option<Header> {
    if b.len() < HEADER_LEN || u32_at(b, 0) != MAGIC {
        return None;
    }
    if crc32c::crc32c(&b[0..12]) != u32_at(b, 12) {
        return None;
    }
    let len_kind = u32_at(b, 4);
    let kind = Kind::from_u8((len_kind >> 24) as u8)?;
    Some(Header {
        kind,
        len: (len_kind & 0x00FF_FFFF) as usize,
        payload_crc: u32_at(b, 8),
    })
}

/// What is found at one offset of a segment's bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Scan {
    /// A complete frame whose checksums both match.
    Valid { header: Header, frame_len: usize },
    /// A valid header whose payload does not match its checksum.
    BadPayload { frame_len: usize },
    /// A valid header whose payload runs past the end of the bytes.
    Incomplete,
    /// Not a valid header (or fewer than HEADER_LEN bytes left).
    BadHeader,
}

pub(crate) fn scan_at(buf: &[u8], at: usize) -> Scan {
    let Some(header) = decode_header(&buf[at.min(buf.len())..]) else {
        return Scan::BadHeader;
    };
    let frame_len = HEADER_LEN + header.len;
    if buf.len() - at < frame_len {
        return Scan::Incomplete;
    }
    let payload = &buf[at + HEADER_LEN..at + frame_len];
    if crc32c::crc32c(payload) != header.payload_crc {
        return Scan::BadPayload { frame_len };
    }
    Scan::Valid { header, frame_len }
}

/// Offset of the next complete, valid frame at or after `from`, if any.
pub(crate) fn resync(buf: &[u8], from: usize) -> Option<usize> {
    let magic = MAGIC.to_le_bytes();
    let mut at = from;
    while at + HEADER_LEN <= buf.len() {
        let pos = buf[at..].windows(4).position(|w| w == magic)?;
        at += pos;
        if let Scan::Valid { .. } = scan_at(buf, at) {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// A group of records encoded as frames, ready to be written in one go.
///
/// Encoding happens on the caller's thread (in parallel across request handlers); the
/// writer thread only copies the bytes into the file.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub(crate) buf: Vec<u8>,
    pub(crate) records: usize,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    pub fn with_capacity(bytes: usize) -> Batch {
        Batch {
            buf: Vec::with_capacity(bytes),
            records: 0,
        }
    }

    /// Appends one record.
    pub fn push(&mut self, payload: &[u8]) -> Result<(), LogError> {
        if payload.len() > MAX_RECORD_BYTES {
            return Err(LogError::RecordTooLarge(payload.len()));
        }
        self.buf
            .extend_from_slice(&encode_header(Kind::Data, payload));
        self.buf.extend_from_slice(payload);
        self.records += 1;
        Ok(())
    }

    /// Appends one record whose payload `fill` writes straight into the batch buffer
    /// (no intermediate allocation). If `fill` fails, the batch is left unchanged.
    pub fn push_with<E>(
        &mut self,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), PushError<E>> {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0u8; HEADER_LEN]);
        if let Err(e) = fill(&mut self.buf) {
            self.buf.truncate(start);
            return Err(PushError::Fill(e));
        }
        let len = self.buf.len() - start - HEADER_LEN;
        if len > MAX_RECORD_BYTES {
            self.buf.truncate(start);
            return Err(PushError::Log(LogError::RecordTooLarge(len)));
        }
        let header = encode_header(Kind::Data, &self.buf[start + HEADER_LEN..]);
        self.buf[start..start + HEADER_LEN].copy_from_slice(&header);
        self.records += 1;
        Ok(())
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Encoded size in bytes (what the batch adds to the log).
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }
}

/// Error of [`Batch::push_with`].
#[derive(Debug, thiserror::Error)]
pub enum PushError<E> {
    #[error("{0}")]
    Fill(E),
    #[error(transparent)]
    Log(LogError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut b = Batch::new();
        b.push(payload).unwrap();
        b.buf
    }

    #[test]
    fn roundtrip() {
        let f = frame(b"hello");
        assert_eq!(
            scan_at(&f, 0),
            Scan::Valid {
                header: Header {
                    kind: Kind::Data,
                    len: 5,
                    payload_crc: crc32c::crc32c(b"hello")
                },
                frame_len: 21
            }
        );
    }

    #[test]
    fn payload_flip_is_bad_payload_and_header_flip_is_bad_header() {
        let mut f = frame(b"hello world");
        f[HEADER_LEN + 3] ^= 0x10;
        assert_eq!(scan_at(&f, 0), Scan::BadPayload { frame_len: 27 });
        let mut f = frame(b"hello world");
        f[5] ^= 0x01;
        assert_eq!(scan_at(&f, 0), Scan::BadHeader);
    }

    #[test]
    fn short_tail_is_incomplete_or_bad_header() {
        let f = frame(b"hello world");
        assert_eq!(scan_at(&f[..20], 0), Scan::Incomplete);
        assert_eq!(scan_at(&f[..10], 0), Scan::BadHeader);
        assert_eq!(scan_at(&f, f.len()), Scan::BadHeader);
    }

    #[test]
    fn resync_finds_next_frame() {
        let mut f = frame(b"first");
        let second_at = f.len();
        f.extend(frame(b"second"));
        f[1] ^= 0xFF;
        assert_eq!(resync(&f, 0), Some(second_at));
        assert_eq!(resync(&f, second_at + 1), None);
    }

    #[test]
    fn push_with_failure_leaves_batch_unchanged() {
        let mut b = Batch::new();
        b.push(b"a").unwrap();
        let before = b.buf.clone();
        let r: Result<(), PushError<&str>> = b.push_with(|buf| {
            buf.extend_from_slice(b"partial");
            Err("nope")
        });
        assert!(matches!(r, Err(PushError::Fill("nope"))));
        assert_eq!(b.buf, before);
        assert_eq!(b.len(), 1);
        b.push_with::<()>(|buf| {
            buf.extend_from_slice(b"xyz");
            Ok(())
        })
        .unwrap();
        assert_eq!(b.len(), 2);
        assert!(matches!(scan_at(&b.buf, before.len()), Scan::Valid { .. }));
    }
}
