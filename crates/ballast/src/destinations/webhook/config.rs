use std::collections::BTreeMap;
use std::time::Duration;

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
    #[serde(default = "timeout", deserialize_with = "crate::config::duration")]
    pub timeout: Duration,
}

fn post() -> String {
    "POST".into()
}

fn timeout() -> Duration {
    Duration::from_secs(30)
}
