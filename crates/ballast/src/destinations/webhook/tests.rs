use super::sink::parse_retry_after;
use super::*;
use std::time::Duration;

#[test]
fn retry_after_forms() {
    assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
    assert_eq!(
        parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
        Some(Duration::ZERO)
    );
    assert!(parse_retry_after("soon").is_none());
    // Hostile values parse (the router caps them at max_backoff) or are ignored.
    assert_eq!(
        parse_retry_after("18446744073709551615"),
        Some(Duration::from_secs(u64::MAX))
    );
    assert!(parse_retry_after("99999999999999999999999").is_none());
    assert!(parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT").is_some());
}

#[test]
fn config_is_checked() {
    let c = |url: &str, method: &str| WebhookConfig {
        url: url.into(),
        method: method.into(),
        headers: [("X-Token".to_string(), "s".to_string())].into(),
        timeout: Duration::from_secs(1),
    };
    assert!(WebhookSink::new(&c("http://127.0.0.1:1/x", "post")).is_ok());
    assert!(WebhookSink::new(&c("ftp://x", "POST")).is_err());
    assert!(WebhookSink::new(&c("not a url", "POST")).is_err());
    assert!(WebhookSink::new(&c("http://127.0.0.1:1/x", "GET")).is_err());
}
