//! Wall-clock times as milliseconds since the Unix epoch, as the server stores them
//! (dead letters, alerts, the running mode's history).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}
