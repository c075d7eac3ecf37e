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

use crate::router::deadletters::to_ms;
use crate::router::Router;
use crate::server::ServerState;
use crate::store::Store;

/// How far back the history goes.
pub const WINDOW: Duration = Duration::from_secs(3600);
/// At most this many samples are kept, whatever the interval.
pub const MAX_SLOTS: usize = 3600;

/// One destination in one sample.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct DestinationSample {
    pub backlog: u64,
    pub buffered: u64,
    pub in_flight: u64,
    pub delivered: u64,
    pub retries: u64,
    pub dead_letters: u64,
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

    /// Takes one sample of the running server.
    pub fn sample(&self, store: &dyn Store, router: &Router, state: &ServerState) {
        let st = store.status();
        self.quota_bytes
            .store(st.quota_bytes, std::sync::atomic::Ordering::Relaxed);
        let status = router.status();
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
                    })
                    .unwrap_or(DestinationSample {
                        backlog: 0,
                        buffered: 0,
                        in_flight: 0,
                        delivered: 0,
                        retries: 0,
                        dead_letters: 0,
                    })
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

    /// Samples now, then every interval, until `stop`.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        router: Arc<Router>,
        state: Arc<ServerState>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            self.sample(&*store, &router, &state);
        }
    }
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
