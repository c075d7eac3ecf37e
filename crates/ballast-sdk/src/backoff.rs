//! When to try again after a failed send: exponential backoff with full jitter, and
//! never sooner than a `Retry-After` the server asked for.

use std::time::Duration;

use rand::Rng;

/// The longest `Retry-After` obeyed: a server that asks for more is asked again then.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);

/// Delay before attempt `failures + 1` (`failures` ≥ 1): a random time in
/// `[min, min · 2^(failures-1)]`, capped at `max` — "full jitter", so that many devices
/// that lost the server at the same moment do not come back at the same moment.
pub fn delay(
    min: Duration,
    max: Duration,
    failures: u32,
    retry_after: Option<Duration>,
) -> Duration {
    let max = max.max(min);
    let exp = failures.saturating_sub(1).min(30);
    let ceiling = min.saturating_mul(1u32 << exp).min(max);
    let d = if ceiling > min {
        rand::thread_rng().gen_range(min..=ceiling)
    } else {
        min
    };
    match retry_after {
        Some(ra) => d.max(ra.min(RETRY_AFTER_CAP)),
        None => d,
    }
}

/// A `Retry-After` header: seconds, or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_within_bounds_with_jitter() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..200 {
            assert_eq!(delay(min, max, 1, None), min);
            let d = delay(min, max, 4, None);
            assert!(d >= min && d <= Duration::from_secs(8), "{d:?}");
            let d = delay(min, max, 40, None);
            assert!(d >= min && d <= max, "{d:?}");
        }
        let spread: std::collections::HashSet<_> =
            (0..50).map(|_| delay(min, max, 10, None)).collect();
        assert!(spread.len() > 10, "jittered");
    }

    #[test]
    fn retry_after_is_a_floor() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(60));
        assert!(delay(min, max, 1, Some(Duration::from_secs(30))) >= Duration::from_secs(30));
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
