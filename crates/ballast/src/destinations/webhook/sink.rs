use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::Method;

use super::config::{Checked, WebhookError};
use super::WebhookConfig;
use crate::destinations::{Destination, Event, Outcome};

/// Response bodies kept for the dead letters are cut to this size.
const MAX_BODY: usize = 4096;

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

fn truncate(mut s: String) -> String {
    if s.len() > MAX_BODY {
        let mut cut = MAX_BODY;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
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
            Ok(resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after);
                if (200..300).contains(&status) {
                    return Outcome::Delivered;
                }
                let text = resp.text().await.unwrap_or_default();
                Outcome::from_http(status, truncate(text), retry_after)
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
