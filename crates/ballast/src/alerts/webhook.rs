//! Generic webhook: the alert as JSON.

use serde::Deserialize;
use serde_json::json;

use super::{Alert, Notifier, Request};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookAlertConfig {
    pub url: String,
}

pub struct WebhookNotifier {
    index: usize,
    config: WebhookAlertConfig,
}

impl WebhookNotifier {
    pub fn new(index: usize, config: WebhookAlertConfig) -> WebhookNotifier {
        WebhookNotifier { index, config }
    }
}

impl Notifier for WebhookNotifier {
    fn name(&self) -> String {
        format!("webhook.{}", self.index)
    }

    fn request(&self, alert: &Alert) -> Request {
        Request {
            url: self.config.url.clone(),
            body: json!({
                "source": alert.source,
                "key": alert.key,
                "class": alert.class(),
                "action": alert.action,
                "severity": alert.severity,
                "summary": alert.summary,
                "details": alert.details,
                "timestamp": humantime::format_rfc3339_millis(crate::time::from_ms(alert.at_ms)).to_string(),
            }),
        }
    }
}
