//! Retry policy: exponential backoff with jitter, `Retry-After`, and when to give up.

use std::time::{Duration, SystemTime};

use rand::Rng;

use crate::config::RetryConfig;

/// Delay before the next attempt after `attempts` failures (1 = first failure):
/// `min_backoff · 2^(attempts-1)` capped at `max_backoff`, "equal jitter" (between half
/// and all of it), and never sooner than a `Retry-After` the destination asked for.
pub fn backoff(c: &RetryConfig, attempts: u32, retry_after: Option<Duration>) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    let base = c
        .min_backoff
        .saturating_mul(1u32 << exp)
        .min(c.max_backoff)
        .max(Duration::from_millis(1));
    let half = base / 2;
    let jitter = rand::thread_rng().gen_range(Duration::ZERO..=half);
    let delay = half + jitter;
    match retry_after {
        Some(ra) => ra.max(delay.min(c.min_backoff)),
        None => delay,
    }
}

/// True once an event has failed at least `max_attempts` times *and* its first attempt
/// is older than `retry_window`.
pub fn exhausted(
    c: &RetryConfig,
    attempts: u32,
    first_attempt: SystemTime,
    now: SystemTime,
) -> bool {
    attempts >= c.max_attempts
        && now.duration_since(first_attempt).unwrap_or_default() >= c.retry_window
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RetryConfig {
        RetryConfig {
            max_attempts: 3,
            retry_window: Duration::from_secs(60),
            min_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(300),
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let c = cfg();
        for _ in 0..100 {
            let d1 = backoff(&c, 1, None);
            assert!(
                d1 >= Duration::from_secs(5) && d1 <= Duration::from_secs(10),
                "{d1:?}"
            );
            let d3 = backoff(&c, 3, None);
            assert!(
                d3 >= Duration::from_secs(20) && d3 <= Duration::from_secs(40),
                "{d3:?}"
            );
            let d20 = backoff(&c, 20, None);
            assert!(d20 >= Duration::from_secs(150) && d20 <= Duration::from_secs(300));
        }
        assert_eq!(
            backoff(&c, 1, Some(Duration::from_secs(120))),
            Duration::from_secs(120)
        );
        assert!(backoff(&c, 1, Some(Duration::ZERO)) <= Duration::from_secs(10));
    }

    #[test]
    fn gives_up_only_after_attempts_and_window() {
        let c = cfg();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert!(!exhausted(&c, 5, t0, t0 + Duration::from_secs(59)));
        assert!(!exhausted(&c, 2, t0, t0 + Duration::from_secs(600)));
        assert!(exhausted(&c, 3, t0, t0 + Duration::from_secs(60)));
    }
}
