//! The last hour of the server's state in memory, for the status page's charts
//! (`GET /v1/history`): a ring buffer sampled every `server.history_interval` (10 s by
//! default). Each sample is a few counters per destination, read from the router's and
//! the store's in-memory status, so memory is bounded (slots × destinations) and the
//! cost of a sample does not depend on the backlog.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;

use crate::readiness::ServerState;
use crate::router::Router;
use crate::store::Store;
use crate::time::to_ms;

/// How far back the history goes.
pub const WINDOW: Duration = Duration::from_secs(3600);
/// At most this many samples are kept, whatever the interval.
pub const MAX_SLOTS: usize = 3600;

/// One destination in one sample.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Default)]
pub struct DestinationSample {
    pub backlog: u64,
    pub buffered: u64,
    pub in_flight: u64,
    pub delivered: u64,
    pub retries: u64,
    pub dead_letters: u64,
    /// Delivery request latency (`ballast_destination_request_seconds`) since the
    /// previous sample: median and 99th percentile in seconds, when requests were made.
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    /// Delivery lag (`ballast_destination_lag_seconds`: accepted → delivered) since the
    /// previous sample, median and 99th percentile in seconds.
    pub lag_p50: Option<f64>,
    pub lag_p99: Option<f64>,
}

/// The state at one time.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub t: u64,
    pub mode: &'static str,
    pub ready: bool,
    pub bytes_used: u64,
    pub events_appended: u64,
    /// In the order of [`HistoryView::destinations`].
    pub d: Vec<DestinationSample>,
}

/// What `GET /v1/history` answers.
#[derive(Debug, Serialize)]
pub struct HistoryView {
    pub interval_s: f64,
    pub capacity: usize,
    pub quota_bytes: u64,
    pub destinations: Vec<String>,
    pub samples: Vec<Sample>,
}

pub struct History {
    interval: Duration,
    capacity: usize,
    destinations: Vec<String>,
    samples: Mutex<VecDeque<Sample>>,
    quota_bytes: std::sync::atomic::AtomicU64,
    /// Each destination's cumulative request latency buckets at the previous sample.
    last_buckets: Mutex<Vec<Vec<(f64, f64)>>>,
    /// The same for the delivery lag.
    last_lag_buckets: Mutex<Vec<Vec<(f64, f64)>>>,
}

/// Slots for an hour at `interval` (at least one, at most [`MAX_SLOTS`]).
pub fn slots_for(interval: Duration) -> usize {
    let secs = interval.as_secs_f64().max(0.001);
    ((WINDOW.as_secs_f64() / secs).ceil() as usize).clamp(1, MAX_SLOTS)
}

impl History {
    pub fn new(interval: Duration, destinations: Vec<String>) -> History {
        let capacity = slots_for(interval);
        History {
            interval,
            capacity,
            destinations,
            samples: Mutex::new(VecDeque::with_capacity(capacity)),
            quota_bytes: std::sync::atomic::AtomicU64::new(0),
            last_buckets: Mutex::new(Vec::new()),
            last_lag_buckets: Mutex::new(Vec::new()),
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Adds a sample, dropping the oldest when full.
    pub fn push(&self, sample: Sample) {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        while s.len() >= self.capacity {
            s.pop_front();
        }
        s.push_back(sample);
    }

    pub fn len(&self) -> usize {
        self.samples.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn view(&self) -> HistoryView {
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        HistoryView {
            interval_s: self.interval.as_secs_f64(),
            capacity: self.capacity,
            quota_bytes: self.quota_bytes.load(std::sync::atomic::Ordering::Relaxed),
            destinations: self.destinations.clone(),
            samples,
        }
    }

    /// Takes one sample of the running server; `metrics` is the rendered Prometheus
    /// registry (for the request latency histograms), if at hand.
    pub fn sample(
        &self,
        store: &dyn Store,
        router: &Router,
        state: &ServerState,
        metrics: Option<&str>,
    ) {
        let st = store.status();
        self.quota_bytes
            .store(st.quota_bytes, std::sync::atomic::Ordering::Relaxed);
        let status = router.status();
        let latency = metrics
            .map(|m| {
                self.quantiles(
                    m,
                    "ballast_destination_request_seconds_bucket",
                    &self.last_buckets,
                )
            })
            .unwrap_or_default();
        let lag = metrics
            .map(|m| {
                self.quantiles(
                    m,
                    "ballast_destination_lag_seconds_bucket",
                    &self.last_lag_buckets,
                )
            })
            .unwrap_or_default();
        let d = self
            .destinations
            .iter()
            .map(|id| {
                status
                    .iter()
                    .find(|s| &s.id == id)
                    .map(|s| DestinationSample {
                        backlog: s.backlog_bytes,
                        buffered: s.buffered_events,
                        in_flight: s.in_flight,
                        delivered: s.delivered,
                        retries: s.retries,
                        dead_letters: s.dead_letters,
                        p50: None,
                        p99: None,
                        lag_p50: None,
                        lag_p99: None,
                    })
                    .unwrap_or_default()
            })
            .zip(latency.into_iter().chain(std::iter::repeat((None, None))))
            .map(|(mut d, (p50, p99))| {
                d.p50 = p50;
                d.p99 = p99;
                d
            })
            .zip(lag.into_iter().chain(std::iter::repeat((None, None))))
            .map(|(mut d, (p50, p99))| {
                d.lag_p50 = p50;
                d.lag_p99 = p99;
                d
            })
            .collect();
        self.push(Sample {
            t: to_ms(SystemTime::now()),
            mode: state.mode().as_health_str(),
            ready: !state.stopping() && st.writable && !st.full(),
            bytes_used: st.bytes_used,
            events_appended: st.events_appended,
            d,
        });
    }

    /// Per destination, p50 and p99 of a histogram (`metric`: its `_bucket` series) since
    /// the previous call, from the cumulative buckets in the rendered registry.
    fn quantiles(
        &self,
        metrics: &str,
        metric: &str,
        last: &Mutex<Vec<Vec<(f64, f64)>>>,
    ) -> Vec<(Option<f64>, Option<f64>)> {
        let now: Vec<Vec<(f64, f64)>> = self
            .destinations
            .iter()
            .map(|id| buckets(metrics, metric, id))
            .collect();
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        let out = now
            .iter()
            .enumerate()
            .map(|(i, cur)| {
                let prev = last.get(i).map(Vec::as_slice).unwrap_or(&[]);
                let window: Vec<(f64, f64)> = cur
                    .iter()
                    .map(|&(le, n)| {
                        let before = prev
                            .iter()
                            .find(|(l, _)| *l == le)
                            .map(|(_, c)| *c)
                            .unwrap_or(0.0);
                        (le, (n - before).max(0.0))
                    })
                    .collect();
                (quantile(&window, 0.5), quantile(&window, 0.99))
            })
            .collect();
        *last = now;
        out
    }

    /// Samples now, then every interval, until `stop`.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        router: Arc<Router>,
        state: Arc<ServerState>,
        prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let rendered = prometheus.as_ref().map(|p| p.render());
            self.sample(&*store, &router, &state, rendered.as_deref());
        }
    }
}

/// The cumulative buckets (upper bound, count) of a histogram for one destination in a
/// rendered Prometheus registry, by increasing bound (`+Inf` last).
fn buckets(metrics: &str, name: &str, destination: &str) -> Vec<(f64, f64)> {
    let want = format!("destination=\"{destination}\"");
    let mut out: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|rest| {
            let (labels, value) = rest.rsplit_once("} ")?;
            let ours = labels.split(',').any(|l| l == want);
            if !ours {
                return None;
            }
            let le = labels
                .split(',')
                .find_map(|l| l.strip_prefix("le=\""))?
                .trim_end_matches('"');
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, value.trim().parse().ok()?))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The q-quantile of cumulative buckets, interpolated linearly within the bucket (as
/// Prometheus's `histogram_quantile`); None without observations.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, n) in buckets {
        if n >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let span = n - prev.1;
            let frac = if span > 0.0 {
                (rank - prev.1) / span
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, n);
    }
    Some(prev.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: u64) -> Sample {
        Sample {
            t,
            mode: "NORMAL",
            ready: true,
            bytes_used: t,
            events_appended: t,
            d: vec![],
        }
    }

    #[test]
    fn request_latency_quantiles_from_the_registry() {
        let text = "\
ballast_destination_request_seconds_bucket{destination=\"a\",le=\"0.01\"} 50
ballast_destination_request_seconds_bucket{destination=\"a\",le=\"0.1\"} 99
ballast_destination_request_seconds_bucket{destination=\"a\",le=\"1\"} 100
ballast_destination_request_seconds_bucket{destination=\"a\",le=\"+Inf\"} 100
ballast_destination_request_seconds_bucket{destination=\"ab\",le=\"+Inf\"} 7
ballast_destination_request_seconds_sum{destination=\"a\"} 3
";
        let b = buckets(text, "ballast_destination_request_seconds_bucket", "a");
        assert_eq!(b.len(), 4);
        assert_eq!(quantile(&b, 0.5), Some(0.01));
        let p99 = quantile(&b, 0.99).unwrap();
        assert!((p99 - 0.1).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(&[(1.0, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
        // Since the previous sample: the first call sees everything, the next nothing new.
        let h = History::new(Duration::from_secs(10), vec!["a".into(), "none".into()]);
        let first = h.quantiles(
            text,
            "ballast_destination_request_seconds_bucket",
            &h.last_buckets,
        );
        assert_eq!(first[0].0, Some(0.01));
        assert_eq!(first[1], (None, None));
        assert_eq!(
            h.quantiles(
                text,
                "ballast_destination_request_seconds_bucket",
                &h.last_buckets
            )[0],
            (None, None)
        );
    }

    #[test]
    fn keeps_an_hour_at_most() {
        assert_eq!(slots_for(Duration::from_secs(10)), 360);
        assert_eq!(slots_for(Duration::from_secs(7)), 515);
        assert_eq!(slots_for(Duration::from_millis(1)), MAX_SLOTS);
        assert_eq!(slots_for(Duration::from_secs(7200)), 1);
        let h = History::new(Duration::from_secs(10), vec!["a".into()]);
        for t in 0..1000 {
            h.push(sample(t));
        }
        let v = h.view();
        assert_eq!(v.samples.len(), 360);
        assert_eq!(v.samples.first().map(|s| s.t), Some(640));
        assert_eq!(v.samples.last().map(|s| s.t), Some(999));
        assert_eq!(v.destinations, vec!["a".to_string()]);
    }
}
