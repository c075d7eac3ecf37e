//! Reading a request body within the size limit, gunzipping it when it says so, and
//! draining what is left of a refused one (lingering close).

use std::io::Read;
use std::time::Duration;

use axum::http::{header, HeaderMap};
use bytes::Bytes;
use http_body_util::BodyExt;

use super::{ApiError, BODY_TIMEOUT, INVALID_GZIP, TOO_LARGE, UNSUPPORTED_ENCODING};

/// A lingering close reads at most this many times the request limit ...
const LINGER_LIMIT_FACTOR: usize = 8;
/// ... for at most this long.
const LINGER_TIME: Duration = Duration::from_secs(5);

/// Why a body was not read.
#[derive(Debug)]
pub enum Refused {
    /// Over the limit (declared or read): the rest of the body is still unread.
    TooLarge,
    /// It did not arrive in time (see [`crate::listener::TimedBody`]).
    TimedOut,
    /// The client went away or sent a broken body.
    Broken,
    /// Read whole, but not valid gzip, or over the limit once decompressed.
    Decoded(ApiError),
}

impl Refused {
    pub fn answer(&self) -> ApiError {
        match self {
            Refused::TooLarge => TOO_LARGE,
            Refused::TimedOut => BODY_TIMEOUT,
            // Nothing to store; the client is probably gone anyway.
            Refused::Broken => super::INVALID_JSON,
            Refused::Decoded(e) => *e,
        }
    }
}

/// A `Content-Length` over the limit is refused before reading anything.
pub fn check_declared_length(headers: &HeaderMap, limit: usize) -> Result<(), ApiError> {
    match declared_length(headers) {
        Some(len) if len > limit as u64 => Err(TOO_LARGE),
        _ => Ok(()),
    }
}

/// Whether the body is gzip (`Content-Encoding: gzip`) or plain (no `Content-Encoding`, or
/// `identity`). Any other (`deflate`, `br`, `x-gzip`, `gzip, gzip`, two headers, ...) is
/// refused (415) from the head, never guessed or read as plain JSON.
pub fn gzipped(headers: &HeaderMap) -> Result<bool, ApiError> {
    let mut values = headers.get_all(header::CONTENT_ENCODING).iter();
    let Some(value) = values.next() else {
        return Ok(false);
    };
    if values.next().is_some() {
        return Err(UNSUPPORTED_ENCODING);
    }
    match value.to_str().map(str::trim) {
        Ok(v) if v.eq_ignore_ascii_case("gzip") => Ok(true),
        Ok(v) if v.eq_ignore_ascii_case("identity") => Ok(false),
        _ => Err(UNSUPPORTED_ENCODING),
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// The body, decoded, at most `limit` bytes both before and after decompression. On
/// [`Refused::TooLarge`] the rest of the body is left in `body` (for [`linger`]).
pub async fn read(
    headers: &HeaderMap,
    body: &mut axum::body::Body,
    limit: usize,
) -> Result<Bytes, Refused> {
    check_declared_length(headers, limit).map_err(|_| Refused::TooLarge)?;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if crate::listener::is_body_timeout(&e) {
                Refused::TimedOut
            } else {
                Refused::Broken
            }
        })?;
        if let Ok(data) = frame.into_data() {
            len += data.len();
            if len > limit {
                return Err(Refused::TooLarge);
            }
            if !data.is_empty() {
                chunks.push(data);
            }
        }
    }
    let raw = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => {
            let mut all = Vec::with_capacity(len);
            for c in &chunks {
                all.extend_from_slice(c);
            }
            Bytes::from(all)
        }
    };
    if !gzipped(headers).map_err(Refused::Decoded)? {
        return Ok(raw);
    }
    gunzip(&raw, limit).map_err(Refused::Decoded)
}

/// Reads and discards what is left of a refused request's body, so that a client that
/// writes its whole body before it reads (Python's `urllib`, and so `requests` and the
/// SDKs on it) reads the answer instead of a connection reset. Bounded: at most
/// 8 × `limit` bytes and 5 s; nothing when the client waits for `100 Continue` (it has
/// not sent the body and reads the answer now). True when the body was read to its end
/// (the connection can then be reused).
pub async fn linger(headers: &HeaderMap, body: &mut axum::body::Body, limit: usize) -> bool {
    if http_body::Body::is_end_stream(body) {
        return true;
    }
    let expects_continue = headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"));
    let max = limit.saturating_mul(LINGER_LIMIT_FACTOR);
    if expects_continue || declared_length(headers).is_some_and(|n| n > max as u64) {
        return false;
    }
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut seen = 0usize;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(None) => return true,
            Ok(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    seen += d.len();
                    if seen > max {
                        return false;
                    }
                }
            }
            Ok(Some(Err(_))) | Err(_) => return false,
        }
    }
}

pub(super) fn gunzip(raw: &[u8], limit: usize) -> Result<Bytes, ApiError> {
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
    fn only_gzip_and_identity_are_decoded() {
        use axum::http::HeaderValue;
        let with = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::CONTENT_ENCODING, HeaderValue::from_static(v));
            }
            gzipped(&h).map_err(|e| e.status.as_u16())
        };
        assert_eq!(with(&[]), Ok(false));
        assert_eq!(with(&["identity"]), Ok(false));
        assert_eq!(with(&["gzip"]), Ok(true));
        assert_eq!(with(&[" GZIP "]), Ok(true));
        for bad in [
            "deflate",
            "br",
            "x-gzip",
            "gzip, gzip",
            "gzip,identity",
            "",
            "zstd",
        ] {
            assert_eq!(with(&[bad]), Err(415), "{bad:?}");
        }
        assert_eq!(with(&["gzip", "gzip"]), Err(415));
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
