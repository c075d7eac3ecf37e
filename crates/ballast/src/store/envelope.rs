//! How the embedded backend stores one event in one log record:
//! `[version = 1][source id length: u8][source id][event JSON]`.

const VERSION: u8 = 1;

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

/// Appends the envelope of one event to `out`. `source` is at most 255 bytes
/// (configuration validation guarantees it).
pub fn encode_into(out: &mut Vec<u8>, source: &str, event: &[u8]) {
    let src = &source.as_bytes()[..source.len().min(255)];
    out.reserve(2 + src.len() + event.len());
    out.push(VERSION);
    out.push(src.len() as u8);
    out.extend_from_slice(src);
    out.extend_from_slice(event);
}

/// Splits a record into source id and event JSON.
pub fn decode(record: &[u8]) -> Result<(&str, &[u8]), EnvelopeError> {
    let (&version, rest) = record.split_first().ok_or(EnvelopeError::Empty)?;
    if version != VERSION {
        return Err(EnvelopeError::Version(version));
    }
    let (&len, rest) = rest.split_first().ok_or(EnvelopeError::Truncated)?;
    let len = len as usize;
    if rest.len() < len {
        return Err(EnvelopeError::Truncated);
    }
    let source = std::str::from_utf8(&rest[..len]).map_err(|_| EnvelopeError::Source)?;
    Ok((source, &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let mut out = Vec::new();
        encode_into(&mut out, "web", br#"{"a":1}"#);
        assert_eq!(decode(&out).unwrap(), ("web", &br#"{"a":1}"#[..]));
        assert_eq!(decode(&[]), Err(EnvelopeError::Empty));
        assert_eq!(decode(&[2, 0]), Err(EnvelopeError::Version(2)));
        assert_eq!(decode(&[1, 5, b'a']), Err(EnvelopeError::Truncated));
    }
}
