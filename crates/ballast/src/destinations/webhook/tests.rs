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
