//! How the embedded backend stores one event in one log record:
//! - version 2: `[2][source id length: u8][source id][meta length: u16 LE][meta][event JSON]`
//!   where meta (possibly empty) is `[key length: u16 LE][ordering key][messageId length:
//!   u16 LE][messageId]`;
//! - version 1 (read only): `[1][source id length: u8][source id][event JSON]`.

const VERSION: u8 = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("record is empty")]
    Empty,
    #[error("unknown record version {0}")]
    Version(u8),
    #[error("record is truncated")]
    Truncated,
    #[error("source id is not UTF-8")]
    Source,
}

/// Appends a meta block naming the event's ordering key and messageId; writes nothing
/// when either is too long to record (delivery then reads them from the JSON).
pub fn encode_meta(out: &mut Vec<u8>, key_prefix: &str, key: &str, message_id: &str) {
    let key_len = key_prefix.len() + key.len();
    if key_len > u16::MAX as usize || message_id.len() > u16::MAX as usize {
        return;
    }
    out.extend_from_slice(&(key_len as u16).to_le_bytes());
    out.extend_from_slice(key_prefix.as_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&(message_id.len() as u16).to_le_bytes());
    out.extend_from_slice(message_id.as_bytes());
}

/// Reads a meta block: (ordering key, messageId).
pub fn decode_meta(meta: &[u8]) -> Option<(&str, &str)> {
    let take = |b: &[u8], at: usize| -> Option<(usize, usize)> {
        let len = u16::from_le_bytes([*b.get(at)?, *b.get(at + 1)?]) as usize;
        (b.len() >= at + 2 + len).then_some((at + 2, at + 2 + len))
    };
    let (ks, ke) = take(meta, 0)?;
    let (ms, me) = take(meta, ke)?;
    Some((
        std::str::from_utf8(&meta[ks..ke]).ok()?,
        std::str::from_utf8(&meta[ms..me]).ok()?,
    ))
}

/// The ordering key and messageId of a meta block found in `record` (`meta` is a slice
/// of it), as slices of the record's bytes: no allocation per event read (two per event
/// were a tenth of a delivery's CPU).
pub fn ident_of(
    record: &bytes::Bytes,
    meta: &[u8],
) -> Option<(bytestring::ByteString, bytestring::ByteString)> {
    let (key, message_id) = decode_meta(meta)?;
    Some((text_in(record, key), text_in(record, message_id)))
}

/// `text`, a slice of `record`, as a string sharing the record's bytes.
fn text_in(record: &bytes::Bytes, text: &str) -> bytestring::ByteString {
    let bytes = record.slice_ref(text.as_bytes());
    // Valid UTF-8 (it was a `str`): the conversion only checks it again.
    bytestring::ByteString::try_from(bytes).unwrap_or_else(|_| text.into())
}

/// Appends the envelope of one event to `out`. `source` is at most 255 bytes
/// (configuration validation guarantees it).
pub fn encode_into(out: &mut Vec<u8>, source: &str, meta: &[u8], event: &[u8]) {
    let src = &source.as_bytes()[..source.len().min(255)];
    let meta = if meta.len() > u16::MAX as usize {
        &[][..]
    } else {
        meta
    };
    out.reserve(4 + src.len() + meta.len() + event.len());
    out.push(VERSION);
    out.push(src.len() as u8);
    out.extend_from_slice(src);
    out.extend_from_slice(&(meta.len() as u16).to_le_bytes());
    out.extend_from_slice(meta);
    out.extend_from_slice(event);
}

/// Splits a record into source id, meta block (empty for version 1) and event JSON.
pub fn decode(record: &[u8]) -> Result<(&str, &[u8], &[u8]), EnvelopeError> {
    let (&version, rest) = record.split_first().ok_or(EnvelopeError::Empty)?;
    if version != 1 && version != 2 {
        return Err(EnvelopeError::Version(version));
    }
    let (&len, rest) = rest.split_first().ok_or(EnvelopeError::Truncated)?;
    let len = len as usize;
    if rest.len() < len {
        return Err(EnvelopeError::Truncated);
    }
    let source = std::str::from_utf8(&rest[..len]).map_err(|_| EnvelopeError::Source)?;
    let rest = &rest[len..];
    if version == 1 {
        return Ok((source, &[], rest));
    }
    if rest.len() < 2 {
        return Err(EnvelopeError::Truncated);
    }
    let meta_len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
    if rest.len() < 2 + meta_len {
        return Err(EnvelopeError::Truncated);
    }
    Ok((source, &rest[2..2 + meta_len], &rest[2 + meta_len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ident_of_shares_the_records_bytes() {
        let mut meta = Vec::new();
        encode_meta(&mut meta, "u:", "user-1", "m-1");
        let mut out = Vec::new();
        encode_into(&mut out, "web", &meta, br#"{"a":1}"#);
        let record = bytes::Bytes::from(out);
        let (_, meta, _) = decode(&record).unwrap();
        let (key, message_id) = ident_of(&record, meta).unwrap();
        assert_eq!((&*key, &*message_id), ("u:user-1", "m-1"));
        let within = |s: &str| record.as_ptr_range().contains(&s.as_ptr());
        assert!(within(&key) && within(&message_id), "slices, not copies");
        assert_eq!(ident_of(&record, b""), None);
    }

    #[test]
    fn roundtrip() {
        let mut meta = Vec::new();
        encode_meta(&mut meta, "u:", "user-1", "m-1");
        assert_eq!(decode_meta(&meta), Some(("u:user-1", "m-1")));
        let mut out = Vec::new();
        encode_into(&mut out, "web", &meta, br#"{"a":1}"#);
        assert_eq!(
            decode(&out).unwrap(),
            ("web", &meta[..], &br#"{"a":1}"#[..])
        );
        let mut plain = Vec::new();
        encode_into(&mut plain, "web", &[], b"{}");
        assert_eq!(decode(&plain).unwrap(), ("web", &[][..], &b"{}"[..]));
        assert_eq!(decode_meta(&[]), None);
        // Version 1 records (no meta) still read.
        assert_eq!(
            decode(&[1, 1, b'w', b'{', b'}']).unwrap(),
            ("w", &[][..], &b"{}"[..])
        );
        assert_eq!(decode(&[]), Err(EnvelopeError::Empty));
        assert_eq!(decode(&[3, 0]), Err(EnvelopeError::Version(3)));
        assert_eq!(decode(&[2, 5, b'a']), Err(EnvelopeError::Truncated));
    }
}
