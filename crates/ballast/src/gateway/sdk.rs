//! `GET /sdk/v1/ballast.min.js`: the browser SDK (`sdk/js`, docs/SDK-JS.md), the built
//! bundle compiled in (`sdk/ballast.min.js`, committed; `scripts/check-sdk-js` rebuilds it
//! and fails when it differs), so the server needs no npm. An ETag (a hash of the file,
//! computed at compile time) and a short max-age, so sites pick up a new server's SDK
//! within minutes; CORS comes from the gateway's layer.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

pub const BUNDLE: &[u8] = include_bytes!("sdk/ballast.min.js");

/// How long a browser may use its copy without asking again.
const CACHE_CONTROL: &str = "public, max-age=300";

/// FNV-1a, 64 bits: enough to tell two builds apart, computed by the compiler.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

const HASH: u64 = fnv1a(BUNDLE);

fn etag() -> String {
    format!("\"{HASH:016x}\"")
}

/// Whether `If-None-Match` names this bundle (a list, `*`, or weak tags).
fn matches(headers: &HeaderMap, tag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == tag)
}

pub async fn bundle(headers: HeaderMap) -> Response {
    let tag = etag();
    let mut r = if matches(&headers, &tag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/javascript; charset=utf-8"),
            )],
            BUNDLE,
        )
            .into_response()
    };
    let h = r.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(CACHE_CONTROL),
    );
    if let Ok(v) = HeaderValue::from_str(&tag) {
        h.insert(header::ETAG, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundle_defines_window_ballast() {
        let text = std::str::from_utf8(BUNDLE).expect("UTF-8");
        assert!(
            text.starts_with("/* ballast browser SDK "),
            "{}",
            &text[..40]
        );
        assert!(text.contains("window.ballast"));
    }

    #[test]
    fn if_none_match_is_read_as_a_list_with_weak_tags() {
        let tag = etag();
        let mut h = HeaderMap::new();
        assert!(!matches(&h, &tag));
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(&format!("\"x\", W/{tag}")).unwrap(),
        );
        assert!(matches(&h, &tag));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert!(!matches(&h, &tag));
    }

    #[test]
    fn fnv_tells_builds_apart() {
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
    }
}
