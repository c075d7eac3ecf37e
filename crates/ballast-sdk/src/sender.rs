//! The sender thread: reads the queue in order and sends it in batches; see the crate
//! documentation for what it does with each answer.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;

use crate::{backoff, lock, Shared};

/// What became of one request.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Sent,
    /// Try again later (at least after the given time, if the server said).
    Retry(Option<Duration>),
    /// The server will never take this request as it is (400, 413).
    Refused,
}

pub(crate) fn run(shared: Arc<Shared>) {
    let c = &shared.config;
    let client = match reqwest::blocking::Client::builder()
        .timeout(c.timeout)
        .connect_timeout(c.timeout.min(Duration::from_secs(10)))
        .gzip(true)
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "ballast-sdk: cannot build the HTTP client; events stay queued");
            return;
        }
    };
    let url = format!("{}/v1/batch", c.data_plane_url.trim_end_matches('/'));
    let mut failures: u32 = 0;
    // Events a request may carry; halved while the server refuses a batch, to find the
    // events it refuses.
    let mut limit = c.max_batch_events.max(1);
    // When the oldest unsent event was first seen waiting for a fuller batch.
    let mut waiting_since: Option<Instant> = None;
    loop {
        let from = {
            let st = lock(&shared.state);
            if st.stop {
                return;
            }
            st.sent_upto
        };
        let pending = match shared.queue.peek(from, limit, c.max_batch_bytes) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "ballast-sdk: reading the queue failed");
                if sleep(&shared, c.max_backoff.min(Duration::from_secs(5))) {
                    return;
                }
                continue;
            }
        };
        if pending.events.is_empty() {
            if pending.next > from {
                // Only padding (a damaged record set aside at open) was there.
                advance(&shared, pending.next);
                continue;
            }
            waiting_since = None;
            wait_for_events(&shared, from);
            continue;
        }
        // Wait a little for a fuller batch, unless someone is flushing.
        let full = pending.events.len() >= limit;
        let flushing = lock(&shared.state).flushing > 0;
        if !full && !flushing {
            let since = *waiting_since.get_or_insert_with(Instant::now);
            let left = c.flush_interval.saturating_sub(since.elapsed());
            if !left.is_zero() {
                if sleep_unless_more(&shared, left) {
                    return;
                }
                continue;
            }
        }
        waiting_since = None;
        let n = pending.events.len();
        let answer = send(&client, &url, &c.write_key, &pending.events);
        match answer {
            Answer::Sent => {
                failures = 0;
                limit = c.max_batch_events.max(1);
                shared.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
                advance(&shared, pending.next);
            }
            Answer::Refused if n > 1 => {
                limit = (n / 2).max(1);
            }
            Answer::Refused => {
                let (pos, body) = &pending.events[0];
                tracing::warn!(position = pos, event = %String::from_utf8_lossy(body), "ballast-sdk: the server refuses this event; dropped");
                shared.counters.rejected.fetch_add(1, Ordering::Relaxed);
                advance(&shared, pending.next);
            }
            Answer::Retry(retry_after) => {
                failures = failures.saturating_add(1);
                shared
                    .counters
                    .failed_requests
                    .fetch_add(1, Ordering::Relaxed);
                let wait = backoff::delay(c.min_backoff, c.max_backoff, failures, retry_after);
                tracing::debug!(failures, ?wait, "ballast-sdk: send failed; retrying later");
                if sleep(&shared, wait) {
                    return;
                }
            }
        }
    }
}

/// One `/v1/batch` request with these events, in order.
fn send(
    client: &reqwest::blocking::Client,
    url: &str,
    write_key: &str,
    events: &[(u64, bytes::Bytes)],
) -> Answer {
    let mut body = Vec::with_capacity(events.iter().map(|(_, e)| e.len() + 1).sum::<usize>() + 64);
    body.extend_from_slice(b"{\"sentAt\":");
    let sent_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    body.extend_from_slice(format!("\"{sent_at}\"").as_bytes());
    body.extend_from_slice(b",\"batch\":[");
    for (i, (_, e)) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        // Queued by this crate as JSON objects; a damaged one is sent as null (the
        // server refuses it, and the split finds it).
        if serde_json::from_slice::<&RawValue>(e).is_ok() {
            body.extend_from_slice(e);
        } else {
            body.extend_from_slice(b"null");
        }
    }
    body.extend_from_slice(b"]}");
    let result = client
        .post(url)
        .basic_auth(write_key, Some(""))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send();
    match result {
        Ok(r) => classify(
            r.status().as_u16(),
            r.headers().get(reqwest::header::RETRY_AFTER),
        ),
        Err(e) => {
            tracing::debug!(error = %e, "ballast-sdk: request failed");
            Answer::Retry(None)
        }
    }
}

fn classify(status: u16, retry_after: Option<&reqwest::header::HeaderValue>) -> Answer {
    match status {
        200..=299 => Answer::Sent,
        400 | 413 => Answer::Refused,
        _ => Answer::Retry(
            retry_after
                .and_then(|v| v.to_str().ok())
                .and_then(backoff::parse_retry_after),
        ),
    }
}

/// Everything before `upto` is done: acknowledge it in the queue and tell `flush`.
fn advance(shared: &Shared, upto: u64) {
    if let Err(e) = shared.queue.ack(upto) {
        tracing::warn!(error = %e, "ballast-sdk: saving the send position failed; events may be sent again");
    }
    lock(&shared.state).sent_upto = upto;
    shared.changed.notify_all();
}

/// Sleeps until an event is queued after `from`, a flush or a stop (or a second passed).
fn wait_for_events(shared: &Shared, from: u64) {
    let st = lock(&shared.state);
    if st.stop || st.flushing > 0 && shared.queue.end() > from {
        return;
    }
    let seen = st.enqueued;
    let _ = shared
        .changed
        .wait_timeout_while(st, Duration::from_secs(1), |s| {
            !s.stop && s.enqueued == seen && s.flushing == 0
        });
}

/// Sleeps `d`, cut short by a flush or a stop; true if stopping.
fn sleep_unless_more(shared: &Shared, d: Duration) -> bool {
    let st = lock(&shared.state);
    let (st, _) = shared
        .changed
        .wait_timeout_while(st, d, |s| !s.stop && s.flushing == 0)
        .unwrap_or_else(|p| p.into_inner());
    st.stop
}

/// Sleeps `d` (a backoff), cut short only by a stop; true if stopping.
fn sleep(shared: &Shared, d: Duration) -> bool {
    let st = lock(&shared.state);
    let (st, _) = shared
        .changed
        .wait_timeout_while(st, d, |s| !s.stop)
        .unwrap_or_else(|p| p.into_inner());
    st.stop
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_by_status() {
        assert_eq!(classify(200, None), Answer::Sent);
        assert_eq!(classify(400, None), Answer::Refused);
        assert_eq!(classify(413, None), Answer::Refused);
        for s in [401, 404, 408, 429, 500, 502, 503] {
            assert!(matches!(classify(s, None), Answer::Retry(_)), "{s}");
        }
        let ra = reqwest::header::HeaderValue::from_static("7");
        assert_eq!(
            classify(429, Some(&ra)),
            Answer::Retry(Some(Duration::from_secs(7)))
        );
    }
}
