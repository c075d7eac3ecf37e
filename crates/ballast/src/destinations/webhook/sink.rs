use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::Method;

use super::config::{Checked, WebhookError};
use super::WebhookConfig;
use crate::destinations::{Destination, Event, Outcome};

/// At most this much of a response body is read (for the dead letters' reason); the rest
/// is never read: the connection is dropped instead.
const MAX_BODY: usize = 4096;

/// Reading that much of an error answer's body may take at most this long (within the
/// request's `timeout`): a body that trickles in does not hold the delivery.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A redirect's target is quoted in the reason up to this many bytes.
const MAX_LOCATION: usize = 512;

pub struct WebhookSink {
    client: reqwest::Client,
    url: reqwest::Url,
    method: Method,
    headers: HeaderMap,
}

impl WebhookSink {
    pub fn new(c: &WebhookConfig) -> Result<WebhookSink, WebhookError> {
        let Checked {
            url,
            method,
            headers,
        } = c.check()?;
        let client = reqwest::Client::builder()
            .timeout(c.timeout)
            .connect_timeout(c.timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(64)
            // A redirect is never followed: reqwest would re-send a 301/302/303 as a GET
            // without the body (and count it delivered on the target's 200), and a 307/308
            // with the body and the configured headers to whatever origin it names.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| WebhookError::Client(e.to_string()))?;
        Ok(WebhookSink {
            client,
            url,
            method,
            headers,
        })
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// The start of a response body: at most [`MAX_BODY`] bytes, read within
/// [`BODY_READ_TIMEOUT`] (whatever arrived by then); the rest is never read.
pub(super) async fn body_start(resp: &mut reqwest::Response, limit: Duration) -> String {
    let mut buf: Vec<u8> = Vec::new();
    let read = async {
        while buf.len() < MAX_BODY {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_BODY - buf.len();
                    buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) | Err(_) => break,
            }
        }
    };
    let _ = tokio::time::timeout(limit, read).await;
    truncate(String::from_utf8_lossy(&buf).into_owned(), MAX_BODY)
}

/// Why a 3xx answer failed the delivery: the redirect is not followed.
fn redirect_reason(status: u16, resp: &reqwest::Response) -> String {
    let location = resp
        .headers()
        .get(reqwest::header::LOCATION)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    match location {
        Some(l) => format!(
            "redirect ({status}) to {} not followed",
            truncate(l, MAX_LOCATION)
        ),
        None => format!("redirect ({status}) not followed"),
    }
}

#[async_trait]
impl Destination for WebhookSink {
    async fn deliver(&self, events: &[Event]) -> Outcome {
        let (body, key) = match events {
            [one] => (one.json.to_vec(), one.message_id.to_string()),
            many => {
                let mut body =
                    Vec::with_capacity(many.iter().map(|e| e.json.len() + 1).sum::<usize>() + 2);
                body.push(b'[');
                for (i, e) in many.iter().enumerate() {
                    if i > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(&e.json);
                }
                body.push(b']');
                let key = format!(
                    "{}+{}",
                    many.first().map(|e| &*e.message_id).unwrap_or(""),
                    many.len()
                );
                (body, key)
            }
        };
        let mut req = self
            .client
            .request(self.method.clone(), self.url.clone())
            .headers(self.headers.clone())
            .body(body);
        if let Ok(v) = HeaderValue::from_str(&key) {
            req = req.header("idempotency-key", v);
        }
        match req.send().await {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after);
                if (200..300).contains(&status) {
                    return Outcome::Delivered;
                }
                if (300..400).contains(&status) {
                    // Not delivered, and not refused for good either: the target may stop
                    // redirecting (or the URL be corrected); retried like a 5xx.
                    return Outcome::Retry {
                        status: Some(status),
                        reason: redirect_reason(status, &resp),
                        retry_after,
                    };
                }
                let text = body_start(&mut resp, BODY_READ_TIMEOUT).await;
                Outcome::from_http(status, text, retry_after)
            }
            Err(e) => Outcome::Retry {
                status: None,
                reason: if e.is_timeout() {
                    format!("timed out: {e}")
                } else {
                    format!("request failed: {e}")
                },
                retry_after: None,
            },
        }
    }
}
