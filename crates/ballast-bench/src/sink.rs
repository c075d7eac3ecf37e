//! The sink: a null webhook receiver for the end-to-end benchmark.
//!
//! Every POST (any path but `/reset`) is read whole and answered `200 OK` at
//! once. The body is one JSON event or a JSON array of events (what ballast's
//! webhook destination sends with `batch_size` 1 or more); for each event the
//! delivery lag, arrival time − the event's `receivedAt` (set by ballast at
//! ingest, RFC 3339 with milliseconds), goes into an HDR histogram.
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
    /// Events without a parseable `receivedAt` (counted, no lag recorded).
    pub no_received_at: u64,
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

    fn record_event(&mut self, received_at: Option<&str>, arrival_us: u64) {
        self.events += 1;
        match received_at.and_then(|t| self.stamp_us(t)) {
            Some(at) => {
                let lag = arrival_us.saturating_sub(at);
                self.hist.saturating_record(lag.clamp(1, MAX_LAG_US));
            }
            None => self.no_received_at += 1,
        }
    }

    /// Records one body that arrived at `arrival` (µs since the epoch).
    pub fn record_body(&mut self, body: &[u8], arrival_us: u64) {
        let start = body.iter().position(|b| !b.is_ascii_whitespace());
        let parsed = match start.map(|i| body[i]) {
            Some(b'[') => serde_json::from_slice::<Vec<Lite>>(body).map(|v| {
                for e in &v {
                    self.record_event(e.received_at.as_deref(), arrival_us);
                }
                v.len()
            }),
            _ => serde_json::from_slice::<Lite>(body).map(|e| {
                self.record_event(e.received_at.as_deref(), arrival_us);
                1
            }),
        };
        match parsed {
            Ok(0) => {}
            Ok(_) => {
                self.requests += 1;
                if self.first_arrival_us == 0 {
                    self.first_arrival_us = arrival_us;
                }
                self.last_arrival_us = self.last_arrival_us.max(arrival_us);
            }
            Err(_) => self.bad_bodies += 1,
        }
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
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return text(StatusCode::BAD_REQUEST, "could not read body"),
            };
            let arrival = unix_us(SystemTime::now());
            lock().record_body(&body, arrival);
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
    fn records_objects_and_arrays() {
        let mut r = Recorder::new().unwrap();
        let at = us("2026-01-02T03:04:05.100Z");
        r.record_body(
            br#"{"type":"track","receivedAt":"2026-01-02T03:04:05.090Z","properties":{"receivedAt":1}}"#,
            at,
        );
        r.record_body(
            br#" [{"receivedAt":"2026-01-02T03:04:05.080Z","x":[1,{"y":"z"}]},
                 {"receivedAt":"2026-01-02T03:04:05.080Z"},
                 {"messageId":"no-stamp"}]"#,
            at + 5_000,
        );
        r.record_body(b"not json", at);
        let s = r.stats();
        assert_eq!(s.events, 4);
        assert_eq!(s.requests, 2);
        assert_eq!(s.bad_bodies, 1);
        assert_eq!(s.no_received_at, 1);
        // Lags: 10 ms, 25 ms, 25 ms (within the histogram's 3 significant digits).
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
    fn lag_from_the_future_counts_as_zero() {
        let mut r = Recorder::new().unwrap();
        let at = us("2026-01-02T03:04:05.100Z");
        r.record_body(br#"{"receivedAt":"2026-01-02T03:04:06.000Z"}"#, at);
        let s = r.stats();
        assert_eq!(s.events, 1);
        assert!(s.lag_max_ms < 0.01, "{s:?}");
    }
}
