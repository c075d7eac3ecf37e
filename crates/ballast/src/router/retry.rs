//! Retry policy: exponential backoff with jitter, `Retry-After`, and when to give up.

use std::time::{Duration, SystemTime};

use rand::Rng;

use crate::destinations::RetryConfig;

/// Delay before the next attempt after `attempts` failures (1 = first failure):
/// `min_backoff · 2^(attempts-1)` plus up to half of it again at random, kept within
/// `min_backoff..=max_backoff` (at the cap, up to a quarter below it, so that events that
/// failed together do not retry together forever). A `Retry-After` the destination asked
/// for replaces it, kept within `min_backoff..=max_backoff`: a destination cannot park a
/// user past the retry rule (`Retry-After: 99999999`, a date in 9999).
pub fn backoff(c: &RetryConfig, attempts: u32, retry_after: Option<Duration>) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    let max = c.max_backoff.max(Duration::from_millis(1));
    let min = c.min_backoff.min(max);
    let base = min.saturating_mul(1u32 << exp).min(max);
    let mut rng = rand::thread_rng();
    let mut delay = base.saturating_add(rng.gen_range(Duration::ZERO..=base / 2));
    if delay > max {
        delay = max
            .saturating_sub(rng.gen_range(Duration::ZERO..=max / 4))
            .max(min);
    }
    match retry_after {
        Some(ra) => ra.clamp(min, max),
        None => delay,
    }
}

/// The longest a deadline may lie ahead: a year (a configured or answered duration past
/// it would overflow `Instant` on some platforms, and no retry waits that long).
pub const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// `now + d`, at most [`MAX_WAIT`] ahead, never overflowing.
pub fn deadline_after(now: std::time::Instant, d: Duration) -> std::time::Instant {
    now.checked_add(d.min(MAX_WAIT)).unwrap_or(now)
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
                d1 >= Duration::from_secs(10) && d1 <= Duration::from_secs(15),
                "{d1:?}"
            );
            let d3 = backoff(&c, 3, None);
            assert!(
                d3 >= Duration::from_secs(40) && d3 <= Duration::from_secs(60),
                "{d3:?}"
            );
            let d20 = backoff(&c, 20, None);
            assert!(
                d20 >= Duration::from_secs(225) && d20 <= Duration::from_secs(300),
                "{d20:?}"
            );
        }
        assert_eq!(
            backoff(&c, 1, Some(Duration::from_secs(120))),
            Duration::from_secs(120)
        );
        assert_eq!(
            backoff(&c, 1, Some(Duration::ZERO)),
            Duration::from_secs(10),
            "never sooner than min_backoff"
        );
        for ra in [
            Duration::from_secs(99_999_999),
            Duration::from_secs(u64::MAX),
            Duration::MAX,
        ] {
            assert_eq!(
                backoff(&c, 1, Some(ra)),
                Duration::from_secs(300),
                "a Retry-After past max_backoff waits max_backoff"
            );
        }
    }

    #[test]
    fn any_backoff_fits_an_instant() {
        let c = RetryConfig {
            max_backoff: Duration::MAX,
            ..cfg()
        };
        for attempts in [1, 2, 31, u32::MAX] {
            for ra in [None, Some(Duration::MAX)] {
                let d = backoff(&c, attempts, ra);
                assert!(deadline_after(std::time::Instant::now(), d) > std::time::Instant::now());
            }
        }
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
