//! PagerDuty Events API v2: `POST {base}/v2/enqueue` with `trigger` (and a stable
//! `dedup_key` per condition), `resolve` when it clears.

use serde::Deserialize;
use serde_json::json;

use super::{Action, Alert, Notifier, Request, Severity};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PagerDutyConfig {
    pub routing_key: String,
    #[serde(default = "base_url")]
    pub base_url: String,
}

fn base_url() -> String {
    "https://events.pagerduty.com".into()
}

pub struct PagerDuty {
    config: PagerDutyConfig,
}

impl PagerDuty {
    pub fn new(config: PagerDutyConfig) -> PagerDuty {
        PagerDuty { config }
    }
}

/// Stable per server and condition.
pub fn dedup_key(alert: &Alert) -> String {
    format!("ballast/{}/{}", alert.source, alert.key)
}

impl Notifier for PagerDuty {
    fn name(&self) -> String {
        "pagerduty".into()
    }

    fn request(&self, alert: &Alert) -> Request {
        let url = format!("{}/v2/enqueue", self.config.base_url.trim_end_matches('/'));
        let body = match alert.action {
            Action::Trigger => json!({
                "routing_key": self.config.routing_key,
                "event_action": "trigger",
                "dedup_key": dedup_key(alert),
                "payload": {
                    "summary": alert.summary,
                    "source": alert.source,
                    "severity": match alert.severity {
                        Severity::Critical => "critical",
                        Severity::Error => "error",
                        Severity::Warning => "warning",
                        Severity::Info => "info",
                    },
                    "timestamp": humantime::format_rfc3339_millis(crate::time::from_ms(alert.at_ms)).to_string(),
                    "component": "ballast",
                    "group": "ballast",
                    "class": alert.class(),
                    "custom_details": alert.details,
                },
            }),
            Action::Resolve => json!({
                "routing_key": self.config.routing_key,
                "event_action": "resolve",
                "dedup_key": dedup_key(alert),
            }),
        };
        Request { url, body }
    }
}
