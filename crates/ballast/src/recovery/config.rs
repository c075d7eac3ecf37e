//! The `[recovery]` section.

use std::time::Duration;

use serde::Deserialize;

use crate::units::{duration, optional_duration};

/// Crash-loop detection and poison events (see docs/OPERATIONS.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecoveryConfig {
    /// This many crashes within `crash_window` put the server in degraded mode at start.
    pub crash_threshold: u32,
    #[serde(deserialize_with = "duration")]
    pub crash_window: Duration,
    /// An event in flight at this many crashes (or worker panics) is quarantined.
    pub poison_threshold: u32,
    /// Leave degraded mode by itself after this long without a crash (off by default).
    #[serde(default, deserialize_with = "optional_duration")]
    pub degraded_quiet_period: Option<Duration>,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            crash_threshold: 5,
            crash_window: Duration::from_secs(300),
            poison_threshold: 3,
            degraded_quiet_period: None,
        }
    }
}
