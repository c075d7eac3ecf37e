//! Slack incoming webhook: `{"text": …}`.

use serde::Deserialize;
use serde_json::json;

use super::{Action, Alert, Notifier, Request};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    pub webhook_url: String,
}

pub struct Slack {
    config: SlackConfig,
}

impl Slack {
    pub fn new(config: SlackConfig) -> Slack {
        Slack { config }
    }
}

impl Notifier for Slack {
    fn name(&self) -> String {
        "slack".into()
    }

    fn request(&self, alert: &Alert) -> Request {
        let head = match alert.action {
            Action::Trigger => ":rotating_light: ALERT",
            Action::Resolve => ":white_check_mark: RESOLVED",
        };
        Request {
            url: self.config.webhook_url.clone(),
            body: json!({
                "text": format!("{head} [ballast {}] {} ({})", alert.source, alert.summary, alert.key),
            }),
        }
    }
}
