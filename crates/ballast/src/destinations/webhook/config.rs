use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::Method;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    /// POST (default), PUT or PATCH.
    #[serde(default = "post")]
    pub method: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default = "timeout", deserialize_with = "crate::units::duration")]
    pub timeout: Duration,
}

fn post() -> String {
    "POST".into()
}

fn timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("invalid url {0:?}: {1}")]
    Url(String, String),
    #[error("unsupported method {0:?} (use POST, PUT or PATCH)")]
    Method(String),
    #[error("invalid header {0:?}")]
    Header(String),
    #[error("timeout must be positive")]
    Timeout,
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// A checked webhook config: what `check-config` validates and the sink sends with.
pub struct Checked {
    pub url: reqwest::Url,
    pub method: Method,
    pub headers: HeaderMap,
}

impl WebhookConfig {
    pub fn check(&self) -> Result<Checked, WebhookError> {
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| WebhookError::Url(self.url.clone(), e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(WebhookError::Url(
                self.url.clone(),
                "scheme must be http or https".into(),
            ));
        }
        let method = match self.method.to_ascii_uppercase().as_str() {
            "POST" => Method::POST,
            "PUT" => Method::PUT,
            "PATCH" => Method::PATCH,
            _ => return Err(WebhookError::Method(self.method.clone())),
        };
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (k, v) in &self.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| WebhookError::Header(k.clone()))?;
            let value = HeaderValue::from_str(v).map_err(|_| WebhookError::Header(k.clone()))?;
            headers.insert(name, value);
        }
        if self.timeout.is_zero() {
            return Err(WebhookError::Timeout);
        }
        Ok(Checked {
            url,
            method,
            headers,
        })
    }
}

impl crate::destinations::registry::TypeConfig for WebhookConfig {
    fn check(&self) -> Result<(), String> {
        WebhookConfig::check(self)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn build(&self) -> Result<std::sync::Arc<dyn crate::destinations::Destination>, String> {
        Ok(std::sync::Arc::new(
            super::WebhookSink::new(self).map_err(|e| e.to_string())?,
        ))
    }
}
