//! The sink: a null webhook receiver for the end-to-end benchmark.
//!
//! Every POST (any path but `/reset`) is read whole and answered `200 OK` at
//! once. The body is one JSON event or a JSON array of events (what ballast's
//! webhook destination sends with `batch_size` 1 or more).
//!
//! It stands for a destination on another machine, so it spends as little of the
//! benchmark's CPU as it can while still checking what it gets:
//! - an array body's events are counted from the request's `idempotency-key`
//!   (`<first messageId>+<count>`, what ballast's webhook sends with a batch); a body
//!   without that key is counted by a structural scan (strings skipped with `memchr`,
//!   values not decoded) that also refuses a body that is not one JSON object or array;
//! - one body in [`PARSE_EVERY`] is parsed whole: its count must match the one above
//!   (else it is a bad body), and for each of its events the delivery lag, arrival
//!   time − the event's `receivedAt` (set by ballast at ingest, RFC 3339 with
//!   milliseconds), goes into an HDR histogram. The lag percentiles are those of that
//!   sample (tens of thousands of events in a benchmark run), and a sender whose keys
//!   lied would show as bad bodies.
//!
//! - `GET /stats`: `{events, lag_p50_ms, lag_p99_ms, lag_max_ms,
//!   first_arrival_unix_ms, last_arrival_unix_ms, ...}`
//! - `POST /reset`: forget everything recorded so far.
//!
//! `receivedAt` is truncated to the millisecond, so a lag reads up to 1 ms
//! high; lags are recorded in microseconds.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::server::{serve, text};

/// Highest lag the histogram records (larger values are clamped): one hour.
const MAX_LAG_US: u64 = 3_600_000_000;
/// One body in this many is parsed whole (the first one always).
pub const PARSE_EVERY: u64 = 8;

/// The only field of an event the sink looks at; serde skips the rest.
#[derive(Deserialize)]
struct Lite<'a> {
    #[serde(rename = "receivedAt", borrow, default)]
    received_at: Option<Cow<'a, str>>,
}

/// What `GET /stats` answers.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SinkStats {
    /// Events received (duplicates of retried deliveries included).
    pub events: u64,
    /// POST requests with an event body.
    pub requests: u64,
    /// Bodies that were not a JSON object or array of objects.
    pub bad_bodies: u64,
    /// Events of the parsed bodies without a parseable `receivedAt` (no lag recorded).
    pub no_received_at: u64,
    /// Events of the parsed bodies (the lag sample).
    #[serde(default)]
    pub lag_sampled_events: u64,
    pub lag_p50_ms: f64,
    pub lag_p90_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    pub lag_mean_ms: f64,
    /// Wall-clock time of the first and last event body, ms since the Unix epoch
    /// (0 when nothing arrived).
    pub first_arrival_unix_ms: u64,
    pub last_arrival_unix_ms: u64,
}

pub struct Recorder {
    hist: Histogram<u64>,
    events: u64,
    requests: u64,
    bad_bodies: u64,
    no_received_at: u64,
    sampled: u64,
    first_arrival_us: u64,
    last_arrival_us: u64,
    /// The last `receivedAt` text parsed and its value in µs: the events of one
    /// delivery usually come from the same ingest request and share it.
    last_stamp: (String, u64),
}

fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl Recorder {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Recorder {
            hist: Histogram::new_with_bounds(1, MAX_LAG_US, 3)?,
            events: 0,
            requests: 0,
            bad_bodies: 0,
            no_received_at: 0,
            sampled: 0,
            first_arrival_us: 0,
            last_arrival_us: 0,
            last_stamp: (String::new(), 0),
        })
    }

    fn reset(&mut self) {
        self.hist.reset();
        self.events = 0;
        self.requests = 0;
        self.bad_bodies = 0;
        self.no_received_at = 0;
        self.sampled = 0;
        self.first_arrival_us = 0;
        self.last_arrival_us = 0;
    }

    fn stamp_us(&mut self, text: &str) -> Option<u64> {
        if self.last_stamp.0 != text {
            let t = humantime::parse_rfc3339_weak(text).ok()?;
            self.last_stamp = (text.to_owned(), unix_us(t));
        }
        Some(self.last_stamp.1)
    }

    fn record_lag(&mut self, received_at: Option<&str>, arrival_us: u64) {
        self.sampled += 1;
        match received_at.and_then(|t| self.stamp_us(t)) {
            Some(at) => {
                let lag = arrival_us.saturating_sub(at);
                self.hist.saturating_record(lag.clamp(1, MAX_LAG_US));
            }
            None => self.no_received_at += 1,
        }
    }

    /// Parses a body whole and records the lag of each of its events; returns how many
    /// events it holds (None: not JSON of the expected shape).
    fn parse_and_record(&mut self, body: &[u8], arrival_us: u64) -> Option<usize> {
        let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
        if body[start] == b'[' {
            let v = serde_json::from_slice::<Vec<Lite>>(body).ok()?;
            for e in &v {
                self.record_lag(e.received_at.as_deref(), arrival_us);
            }
            Some(v.len())
        } else {
            let e = serde_json::from_slice::<Lite>(body).ok()?;
            self.record_lag(e.received_at.as_deref(), arrival_us);
            Some(1)
        }
    }

    /// Records one body that arrived at `arrival` (µs since the epoch); `declared`: the
    /// count of events its sender declared for an array body (see the module's doc).
    pub fn record_body(&mut self, body: &[u8], arrival_us: u64, declared: Option<usize>) {
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        let counted = match (first, declared) {
            (Some(b'['), Some(n)) => Some(n),
            _ => count_events(body),
        };
        let Some(n) = counted else {
            self.bad_bodies += 1;
            return;
        };
        if n == 0 {
            return;
        }
        if self.requests % PARSE_EVERY == 0 && self.parse_and_record(body, arrival_us) != Some(n) {
            self.bad_bodies += 1;
            return;
        }
        self.requests += 1;
        self.events += n as u64;
        if self.first_arrival_us == 0 {
            self.first_arrival_us = arrival_us;
        }
        self.last_arrival_us = self.last_arrival_us.max(arrival_us);
    }

    pub fn stats(&self) -> SinkStats {
        let ms = |us: u64| us as f64 / 1000.0;
        let q = |quantile| {
            if self.hist.is_empty() {
                0.0
            } else {
                ms(self.hist.value_at_quantile(quantile))
            }
        };
        SinkStats {
            events: self.events,
            requests: self.requests,
            bad_bodies: self.bad_bodies,
            no_received_at: self.no_received_at,
            lag_sampled_events: self.sampled,
            lag_p50_ms: q(0.50),
            lag_p90_ms: q(0.90),
            lag_p99_ms: q(0.99),
            lag_max_ms: if self.hist.is_empty() {
                0.0
            } else {
                ms(self.hist.max())
            },
            lag_mean_ms: if self.hist.is_empty() {
                0.0
            } else {
                self.hist.mean() / 1000.0
            },
            first_arrival_unix_ms: self.first_arrival_us / 1000,
            last_arrival_unix_ms: self.last_arrival_us / 1000,
        }
    }
}

/// The events of a body without decoding them: 1 for a JSON object, the number of
/// elements for a JSON array. Strings are skipped with `memchr` (escapes honoured), and
/// only brackets, braces and the top level's commas are looked at, so a value is never
/// decoded. None when the body is not one object or array: unbalanced, an unterminated
/// string, or anything but whitespace after its end.
fn count_events(body: &[u8]) -> Option<usize> {
    let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
    let top = body[start];
    if top != b'[' && top != b'{' {
        return None;
    }
    let mut depth = 0usize;
    let mut commas = 0usize;
    // Something inside the top-level array (it is not `[]`).
    let mut any = false;
    let mut end = None;
    let mut i = start;
    while i < body.len() {
        match body[i] {
            b'"' => {
                let mut j = i + 1;
                loop {
                    let k = j + memchr::memchr2(b'"', b'\\', body.get(j..)?)?;
                    if body[k] == b'\\' {
                        j = k + 2;
                        continue;
                    }
                    j = k + 1;
                    break;
                }
                any |= depth == 1;
                i = j;
                continue;
            }
            b'[' | b'{' => {
                any |= depth == 1;
                depth += 1;
            }
            b']' | b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    end = Some(i);
                    break;
                }
            }
            b',' if depth == 1 => commas += 1,
            b if depth == 1 && !b.is_ascii_whitespace() => any = true,
            _ => {}
        }
        i += 1;
    }
    let end = end?;
    if !body[end + 1..].iter().all(|b| b.is_ascii_whitespace()) {
        return None;
    }
    Some(match (top, any) {
        (b'{', _) => 1,
        (_, true) => commas + 1,
        (_, false) => 0,
    })
}

/// The count of a batch's events its sender declared: the `<count>` of an
/// `idempotency-key: <first messageId>+<count>`.
fn declared_count(headers: &hyper::HeaderMap) -> Option<usize> {
    let key = headers.get("idempotency-key")?.to_str().ok()?;
    key.rsplit_once('+')?.1.parse().ok()
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

async fn handle(req: Request<Incoming>, rec: Arc<Mutex<Recorder>>) -> Response<Full<Bytes>> {
    let lock = || rec.lock().unwrap_or_else(|p| p.into_inner());
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/stats") => json(&lock().stats()),
        (&Method::POST, "/reset") => {
            lock().reset();
            text(StatusCode::OK, "OK")
        }
        (&Method::POST | &Method::PUT | &Method::PATCH, _) => {
            let declared = declared_count(req.headers());
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return text(StatusCode::BAD_REQUEST, "could not read body"),
            };
            let arrival = unix_us(SystemTime::now());
            lock().record_body(&body, arrival, declared);
            text(StatusCode::OK, "OK")
        }
        _ => text(StatusCode::OK, "OK"),
    }
}

pub async fn run(listen: SocketAddr) -> anyhow::Result<()> {
    let rec = Arc::new(Mutex::new(Recorder::new()?));
    serve("sink-server", listen, move |req| handle(req, rec.clone())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(text: &str) -> u64 {
        unix_us(humantime::parse_rfc3339(text).unwrap())
    }

    #[test]
    fn counts_without_decoding() {
        assert_eq!(count_events(br#"{"a":[1,2,{"b":"],}"}]}"#), Some(1));
        assert_eq!(count_events(b" [ ] "), Some(0));
        assert_eq!(count_events(br#"[{"a":1}]"#), Some(1));
        assert_eq!(
            count_events(br#"[{"a":"x,\"],[{"},{"b":[1,2,3]}, {"c":{"d":[]}} ]"#),
            Some(3)
        );
        assert_eq!(count_events(br#"[1, "two", null]"#), Some(3));
        assert_eq!(count_events(b"[1,2] x"), None, "bytes after the end");
        assert_eq!(count_events(br#"[{"a":1}"#), None, "unbalanced");
        assert_eq!(count_events(br#"[{"a":"1}]"#), None, "unterminated string");
        assert_eq!(count_events(br#"[{"a":"1\"}]"#), None, "escaped quote");
        assert_eq!(count_events(b"not json"), None);
        assert_eq!(count_events(b""), None);
    }

    #[test]
    fn records_objects_and_arrays() {
        let mut r = Recorder::new().unwrap();
        let at = us("2026-01-02T03:04:05.100Z");
        // The first body is parsed: an object, lag 10 ms.
        r.record_body(
            br#"{"type":"track","receivedAt":"2026-01-02T03:04:05.090Z","properties":{"receivedAt":1}}"#,
            at,
            None,
        );
        // Counted, not parsed (bodies 2..PARSE_EVERY).
        for _ in 1..PARSE_EVERY {
            r.record_body(
                br#"[{"receivedAt":"2026-01-02T03:04:00.000Z"},{}]"#,
                at,
                None,
            );
        }
        // Parsed: three events, lags 25, 25 ms and one without a stamp.
        r.record_body(
            br#" [{"receivedAt":"2026-01-02T03:04:05.080Z","x":[1,{"y":"z"}]},
                 {"receivedAt":"2026-01-02T03:04:05.080Z"},
                 {"messageId":"no-stamp"}]"#,
            at + 5_000,
            None,
        );
        r.record_body(b"not json", at, None);
        let s = r.stats();
        assert_eq!(s.events, 1 + 2 * (PARSE_EVERY - 1) + 3);
        assert_eq!(s.requests, PARSE_EVERY + 1);
        assert_eq!(s.bad_bodies, 1);
        assert_eq!(s.lag_sampled_events, 4);
        assert_eq!(s.no_received_at, 1);
        // Lags: 10 ms, 25 ms, 25 ms (within the histogram's 3 significant digits); the
        // counted-only bodies' 5 s lags are not in the sample.
        assert!((s.lag_p50_ms - 25.0).abs() < 0.1, "{s:?}");
        assert!((s.lag_max_ms - 25.0).abs() < 0.1, "{s:?}");
        assert_eq!(s.first_arrival_unix_ms, at / 1000);
        assert_eq!(s.last_arrival_unix_ms, at / 1000 + 5);
        r.reset();
        let s = r.stats();
        assert_eq!((s.events, s.requests, s.last_arrival_unix_ms), (0, 0, 0));
        assert_eq!(s.lag_p99_ms, 0.0);
    }

    #[test]
    fn an_array_is_counted_from_its_declared_count_and_checked_when_parsed() {
        let mut r = Recorder::new().unwrap();
        let body = br#"[{"receivedAt":"2026-01-02T03:04:05.080Z"},{}]"#;
        // Parsed (the first body): the declared 3 disagrees with the 2 events in it.
        r.record_body(body, 1, Some(3));
        assert_eq!((r.stats().events, r.stats().bad_bodies), (0, 1));
        r.record_body(body, 1, Some(2));
        // Not parsed: the declared count is taken as it is.
        r.record_body(body, 1, Some(5));
        // An object is one event whatever was declared.
        r.record_body(br#"{"a":1}"#, 1, Some(7));
        let s = r.stats();
        assert_eq!((s.events, s.requests, s.bad_bodies), (2 + 5 + 1, 3, 1));
        let mut headers = hyper::HeaderMap::new();
        assert_eq!(declared_count(&headers), None);
        headers.insert("idempotency-key", HeaderValue::from_static("a+b+100"));
        assert_eq!(declared_count(&headers), Some(100));
        headers.insert("idempotency-key", HeaderValue::from_static("only-an-id"));
        assert_eq!(declared_count(&headers), None);
    }

    #[test]
    fn a_parsed_body_that_disagrees_with_the_scan_is_bad() {
        let mut r = Recorder::new().unwrap();
        // Balanced, so the scan counts it, but not JSON serde accepts.
        r.record_body(br#"[{"receivedAt" "x"}]"#, 1, None);
        let s = r.stats();
        assert_eq!((s.events, s.requests, s.bad_bodies), (0, 0, 1));
    }

    #[test]
    fn lag_from_the_future_counts_as_zero() {
        let mut r = Recorder::new().unwrap();
        let at = us("2026-01-02T03:04:05.100Z");
        r.record_body(br#"{"receivedAt":"2026-01-02T03:04:06.000Z"}"#, at, None);
        let s = r.stats();
        assert_eq!(s.events, 1);
        assert!(s.lag_max_ms < 0.01, "{s:?}");
    }
}
