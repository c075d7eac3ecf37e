//! VictorOps (Splunk On-Call) REST endpoint: `CRITICAL` (or `WARNING`) when a condition
//! starts, `RECOVERY` with the same `entity_id` when it clears.

use serde::Deserialize;
use serde_json::json;

use super::{Action, Alert, Notifier, Request, Severity};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VictorOpsConfig {
    pub api_key: String,
    pub routing_key: String,
    #[serde(default = "base_url")]
    pub base_url: String,
}

fn base_url() -> String {
    "https://alert.victorops.com".into()
}

pub struct VictorOps {
    config: VictorOpsConfig,
}

impl VictorOps {
    pub fn new(config: VictorOpsConfig) -> VictorOps {
        VictorOps { config }
    }
}

impl Notifier for VictorOps {
    fn name(&self) -> String {
        "victorops".into()
    }

    fn request(&self, alert: &Alert) -> Request {
        let url = format!(
            "{}/integrations/generic/20131114/alert/{}/{}",
            self.config.base_url.trim_end_matches('/'),
            self.config.api_key,
            self.config.routing_key
        );
        let message_type = match (alert.action, alert.severity) {
            (Action::Resolve, _) => "RECOVERY",
            (Action::Trigger, Severity::Critical | Severity::Error) => "CRITICAL",
            (Action::Trigger, Severity::Warning) => "WARNING",
            (Action::Trigger, Severity::Info) => "INFO",
        };
        let body = json!({
            "message_type": message_type,
            "entity_id": super::pagerduty::dedup_key(alert),
            "entity_display_name": alert.summary,
            "state_message": format!("{}\n{}", alert.summary, alert.details),
            "timestamp": alert.at_ms / 1000,
            "monitoring_tool": "ballast",
        });
        Request { url, body }
    }
}
