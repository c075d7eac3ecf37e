//! Reading a request body within the size limit, gunzipping it when it says so.

use std::io::Read;

use axum::http::{header, HeaderMap};
use bytes::Bytes;
use http_body_util::BodyExt;

use super::{ApiError, INVALID_GZIP, TOO_LARGE};

/// The body, decoded, at most `limit` bytes both before and after decompression.
pub async fn read(
    headers: &HeaderMap,
    body: axum::body::Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(TOO_LARGE);
        }
    }
    let limited = http_body_util::Limited::new(body, limit);
    let raw = match limited.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(TOO_LARGE),
        // The client went away or sent a broken body: nothing to store.
        Err(_) => return Err(super::INVALID_JSON),
    };
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().eq_ignore_ascii_case("gzip"))
        .unwrap_or(false);
    if !gzip {
        return Ok(raw);
    }
    gunzip(&raw, limit)
}

fn gunzip(raw: &[u8], limit: usize) -> Result<Bytes, ApiError> {
    let mut out = Vec::with_capacity((raw.len() * 4).min(limit));
    // A gzip body may be a series of members (RFC 1952); read them all.
    let mut decoder = flate2::read::MultiGzDecoder::new(raw).take(limit as u64 + 1);
    decoder.read_to_end(&mut out).map_err(|_| INVALID_GZIP)?;
    if out.len() > limit {
        return Err(TOO_LARGE);
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn gunzip_limits() {
        let data = vec![b'a'; 10_000];
        assert_eq!(gunzip(&gz(&data), 10_000).unwrap().len(), 10_000);
        assert_eq!(gunzip(&gz(&data), 9_999).unwrap_err().status, 413);
        assert_eq!(
            gunzip(b"not gzip", 100).unwrap_err().body,
            "invalid gzip body"
        );
    }
}
