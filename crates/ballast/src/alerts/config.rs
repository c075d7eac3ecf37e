//! The `[alerts]` section: the outbox's settings and one optional table per notifier
//! (each notifier's file owns its own type).

use std::time::Duration;

use serde::Deserialize;

use crate::units::duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// A destination's "aborting events" alert resolves once the destination has
    /// delivered again and aborted nothing for this long (default 1h).
    #[serde(default = "aborts_clear_after", deserialize_with = "duration")]
    pub aborts_clear_after: Duration,
    /// Names this server in alerts (default: the host name).
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub pagerduty: Option<super::pagerduty::PagerDutyConfig>,
    #[serde(default)]
    pub victorops: Option<super::victorops::VictorOpsConfig>,
    #[serde(default)]
    pub slack: Option<super::slack::SlackConfig>,
    #[serde(default)]
    pub webhook: Vec<super::webhook::WebhookAlertConfig>,
}

fn aborts_clear_after() -> Duration {
    Duration::from_secs(3600)
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            aborts_clear_after: aborts_clear_after(),
            source: None,
            pagerduty: None,
            victorops: None,
            slack: None,
            webhook: Vec::new(),
        }
    }
}
