//! Write keys from the `Authorization` header (HTTP Basic, the key as user name).

use axum::http::{header, HeaderMap};
use base64::Engine;

use super::{ApiError, NO_WRITE_KEY};

/// The Basic-auth user name, `None` when there is no `Authorization` header, and an
/// error when there is one that carries no key.
pub fn basic_user(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| NO_WRITE_KEY)?.trim();
    let (scheme, rest) = text.split_once(' ').ok_or(NO_WRITE_KEY)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(NO_WRITE_KEY);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .map_err(|_| NO_WRITE_KEY)?;
    let decoded = String::from_utf8(decoded).map_err(|_| NO_WRITE_KEY)?;
    let user = decoded.split_once(':').map(|(u, _)| u).unwrap_or(&decoded);
    if user.is_empty() {
        return Err(NO_WRITE_KEY);
    }
    Ok(Some(user.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn h(v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        m
    }

    #[test]
    fn basic() {
        // "key:" and "key:secret" and "key"
        assert_eq!(
            basic_user(&h("Basic a2V5Og==")).unwrap().as_deref(),
            Some("key")
        );
        assert_eq!(
            basic_user(&h("basic a2V5OnNlY3JldA==")).unwrap().as_deref(),
            Some("key")
        );
        assert_eq!(
            basic_user(&h("Basic a2V5")).unwrap().as_deref(),
            Some("key")
        );
        assert_eq!(basic_user(&HeaderMap::new()).unwrap(), None);
        assert!(basic_user(&h("Bearer x")).is_err());
        assert!(basic_user(&h("Basic !!!")).is_err());
        assert!(basic_user(&h("Basic Og==")).is_err(), "empty user");
    }
}
