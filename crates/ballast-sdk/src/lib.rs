//! ballast-sdk: send events to ballast (or any RudderStack-compatible data plane) from an
//! app, without losing them when the app or the server goes down.
//!
//! - Every event is written to a durable queue on the device before the call returns
//!   (a [`ballast_log`] in `Config::queue_dir`, fsynced; concurrent calls share fsyncs).
//! - A background thread sends the queue in order, in `/v1/batch` requests of up to
//!   `max_batch_events` events / `max_batch_bytes` bytes, waiting up to `flush_interval`
//!   to fill a batch.
//! - 5xx, 408, 429, network errors and timeouts, and 401/404 (a key or source that is
//!   wrong *now* may be fixed on the server): retried with exponential backoff and full
//!   jitter, never sooner than `Retry-After`. Events stay queued meanwhile, across app
//!   restarts.
//! - 400 and 413: the batch is split to find the events the server refuses; a single
//!   event the server refuses is dropped (logged, counted in [`Stats::rejected`]) —
//!   retrying it could never succeed and would block everything after it.
//! - The queue is bounded (`max_queue_bytes`). **Drop policy:** when it is full a new event
//!   is refused with [`Error::QueueFull`] and nothing already queued is dropped; the
//!   caller decides what to do with the event it still holds.
//! - [`Client::flush`] waits until everything queued so far is sent; [`Client::shutdown`]
//!   flushes (bounded) and stops. Whatever is not sent stays queued for the next start.

mod backoff;
mod queue;
mod sender;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

pub use backoff::{delay as backoff_delay, parse_retry_after};

/// Settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct Config {
    /// The data plane, e.g. `https://ingest.example.com` (requests go to `/v1/batch`).
    pub data_plane_url: String,
    pub write_key: String,
    /// Where the queue lives; one client per directory at a time.
    pub queue_dir: PathBuf,
    /// Bound of the queue on disk (default 64 MiB, at least 256 KiB).
    pub max_queue_bytes: u64,
    /// Events per request (default 100).
    pub max_batch_events: usize,
    /// Bytes of events per request (default 500 KB, well under servers' 4 MB limit).
    pub max_batch_bytes: usize,
    /// How long a partly filled batch waits for more events (default 1 s).
    pub flush_interval: Duration,
    /// Backoff after failures: from `min_backoff` (default 1 s) doubling up to
    /// `max_backoff` (default 5 min), with full jitter.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Timeout of one request (default 30 s).
    pub timeout: Duration,
}

impl Config {
    pub fn new(
        data_plane_url: impl Into<String>,
        write_key: impl Into<String>,
        queue_dir: impl Into<PathBuf>,
    ) -> Config {
        Config {
            data_plane_url: data_plane_url.into(),
            write_key: write_key.into(),
            queue_dir: queue_dir.into(),
            max_queue_bytes: 64 << 20,
            max_batch_events: 100,
            max_batch_bytes: 500_000,
            flush_interval: Duration::from_secs(1),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the event queue is full ({0} bytes); the event was not queued")]
    QueueFull(u64),
    #[error("invalid event: {0}")]
    Invalid(String),
    #[error("the client is shut down")]
    Closed,
    /// The log's error is in the message, not a `source()` (it would print twice).
    #[error("event queue: {0}")]
    Queue(ballast_log::LogError),
    #[error("invalid data plane url {0:?}: {1}")]
    Url(String, String),
    #[error("starting the sender thread: {0}")]
    Thread(std::io::Error),
}

impl From<ballast_log::LogError> for Error {
    fn from(e: ballast_log::LogError) -> Error {
        Error::Queue(e)
    }
}

/// Who an event is about: a user id, an anonymous id, or both.
#[derive(Debug, Clone, Default)]
pub struct User {
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
}

impl User {
    pub fn id(user_id: impl Into<String>) -> User {
        User {
            user_id: Some(user_id.into()),
            anonymous_id: None,
        }
    }

    pub fn anonymous(anonymous_id: impl Into<String>) -> User {
        User {
            user_id: None,
            anonymous_id: Some(anonymous_id.into()),
        }
    }
}

/// Counters since the client opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub queued: u64,
    pub sent: u64,
    /// Events the server refused (400/413 alone) and that were dropped.
    pub rejected: u64,
    /// Requests that failed and were retried.
    pub failed_requests: u64,
    /// Bytes of the queue on disk.
    pub queue_bytes: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub queued: AtomicU64,
    pub sent: AtomicU64,
    pub rejected: AtomicU64,
    pub failed_requests: AtomicU64,
}

/// What the sender and the callers share.
pub(crate) struct Shared {
    pub config: Config,
    pub queue: queue::Queue,
    pub counters: Counters,
    pub state: Mutex<State>,
    /// Woken on every change of `state` (new event, flush asked, progress, stop).
    pub changed: Condvar,
}

#[derive(Default)]
pub(crate) struct State {
    /// Position up to which everything is sent (or given up).
    pub sent_upto: u64,
    /// Callers waiting in `flush`: send without waiting for fuller batches.
    pub flushing: usize,
    pub stop: bool,
    /// Bumped on every enqueue.
    pub enqueued: u64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends events; see the crate documentation.
pub struct Client {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Client {
    /// Opens (or creates) the queue in `config.queue_dir`, recovering what a previous run
    /// left in it, and starts sending.
    pub fn open(config: Config) -> Result<Client, Error> {
        let url = reqwest::Url::parse(&config.data_plane_url)
            .map_err(|e| Error::Url(config.data_plane_url.clone(), e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::Url(
                config.data_plane_url.clone(),
                "scheme must be http or https".into(),
            ));
        }
        let (queue, sent_upto) = queue::Queue::open(&config.queue_dir, config.max_queue_bytes)?;
        let shared = Arc::new(Shared {
            config,
            queue,
            counters: Counters::default(),
            state: Mutex::new(State {
                sent_upto,
                ..State::default()
            }),
            changed: Condvar::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("ballast-sdk-sender".into())
                .spawn(move || sender::run(shared))
                .map_err(Error::Thread)?
        };
        Ok(Client {
            shared,
            thread: Some(thread),
        })
    }

    pub fn track(&self, user: &User, event: &str, properties: Value) -> Result<String, Error> {
        self.enqueue(
            user,
            json!({ "type": "track", "event": event, "properties": properties }),
        )
    }

    pub fn identify(&self, user: &User, traits: Value) -> Result<String, Error> {
        self.enqueue(
            user,
            json!({ "type": "identify", "context": { "traits": traits } }),
        )
    }

    pub fn page(&self, user: &User, name: &str, properties: Value) -> Result<String, Error> {
        self.enqueue(
            user,
            json!({ "type": "page", "name": name, "properties": properties }),
        )
    }

    pub fn screen(&self, user: &User, name: &str, properties: Value) -> Result<String, Error> {
        self.enqueue(
            user,
            json!({ "type": "screen", "name": name, "properties": properties }),
        )
    }

    pub fn group(&self, user: &User, group_id: &str, traits: Value) -> Result<String, Error> {
        self.enqueue(
            user,
            json!({ "type": "group", "groupId": group_id, "traits": traits }),
        )
    }

    pub fn alias(&self, user: &User, previous_id: &str) -> Result<String, Error> {
        self.enqueue(user, json!({ "type": "alias", "previousId": previous_id }))
    }

    /// Queues any message of RudderStack's shape (`type` required) for `user`; fills in
    /// `messageId` (when missing), `originalTimestamp` and `context.library`. Returns the
    /// messageId once the event is on disk.
    pub fn enqueue(&self, user: &User, message: Value) -> Result<String, Error> {
        let event = build(user, message)?;
        let message_id = event["messageId"].as_str().unwrap_or_default().to_string();
        let bytes = serde_json::to_vec(&event).map_err(|e| Error::Invalid(e.to_string()))?;
        if lock(&self.shared.state).stop {
            return Err(Error::Closed);
        }
        match self.shared.queue.push(&bytes) {
            Ok(_) => {}
            Err(ballast_log::LogError::QuotaExceeded { limit, .. }) => {
                return Err(Error::QueueFull(limit))
            }
            Err(e) => return Err(e.into()),
        }
        self.shared.counters.queued.fetch_add(1, Ordering::Relaxed);
        lock(&self.shared.state).enqueued += 1;
        self.shared.changed.notify_all();
        Ok(message_id)
    }

    /// Sends everything queued so far without waiting for fuller batches; true once it
    /// is all sent, false if `timeout` passed first (it stays queued).
    pub fn flush(&self, timeout: Duration) -> bool {
        let target = self.shared.queue.end();
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.state);
        st.flushing += 1;
        self.shared.changed.notify_all();
        let done = loop {
            if st.sent_upto >= target {
                break true;
            }
            let now = Instant::now();
            if now >= deadline || st.stop {
                break st.sent_upto >= target;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        };
        st.flushing -= 1;
        done
    }

    /// Flushes (waiting at most `timeout`), then stops the sender and closes the queue.
    /// True when nothing was left unsent.
    pub fn shutdown(mut self, timeout: Duration) -> bool {
        let flushed = self.flush(timeout);
        self.stop();
        flushed
    }

    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        Stats {
            queued: c.queued.load(Ordering::Relaxed),
            sent: c.sent.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            failed_requests: c.failed_requests.load(Ordering::Relaxed),
            queue_bytes: self.shared.queue.bytes_used(),
        }
    }

    fn stop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.shared.queue.close();
    }
}

impl Drop for Client {
    /// Stops without flushing: what is queued stays on disk for the next start.
    fn drop(&mut self) {
        self.stop();
    }
}

const TYPES: [&str; 6] = ["track", "identify", "page", "screen", "group", "alias"];

/// The event as queued: the message with the user, a messageId, a timestamp and the
/// library in its context.
fn build(user: &User, message: Value) -> Result<Value, Error> {
    let Value::Object(mut m) = message else {
        return Err(Error::Invalid("a message is a JSON object".into()));
    };
    match m.get("type").and_then(Value::as_str) {
        Some(t) if TYPES.contains(&t) => {}
        Some(t) => return Err(Error::Invalid(format!("unknown type {t:?}"))),
        None => return Err(Error::Invalid("a message needs a \"type\"".into())),
    }
    let non_empty = |s: &Option<String>| {
        s.as_deref()
            .filter(|s| !s.trim().is_empty())
            .map(str::to_string)
    };
    let (uid, aid) = (non_empty(&user.user_id), non_empty(&user.anonymous_id));
    if uid.is_none() && aid.is_none() {
        return Err(Error::Invalid(
            "a userId or an anonymousId is required".into(),
        ));
    }
    if let Some(u) = uid {
        m.insert("userId".into(), Value::String(u));
    }
    if let Some(a) = aid {
        m.insert("anonymousId".into(), Value::String(a));
    }
    let has_id = m
        .get("messageId")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.trim().is_empty());
    if !has_id {
        m.insert(
            "messageId".into(),
            Value::String(uuid::Uuid::new_v4().to_string()),
        );
    }
    m.entry("originalTimestamp").or_insert_with(|| {
        Value::String(humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string())
    });
    let context = m
        .entry("context")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(ctx) = context {
        ctx.entry("library").or_insert_with(
            || json!({ "name": "ballast-sdk-rust", "version": env!("CARGO_PKG_VERSION") }),
        );
    }
    Ok(Value::Object(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_fills_ids_timestamp_and_library() {
        let e = build(&User::id("u1"), json!({"type": "track", "event": "x"})).unwrap();
        assert_eq!(e["userId"], "u1");
        assert_eq!(e["messageId"].as_str().unwrap().len(), 36);
        assert!(e["originalTimestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(e["context"]["library"]["name"], "ballast-sdk-rust");
        let e = build(
            &User::anonymous("a"),
            json!({"type": "page", "messageId": "m-1", "context": {"library": {"name": "app"}}}),
        )
        .unwrap();
        assert_eq!(e["messageId"], "m-1");
        assert_eq!(e["anonymousId"], "a");
        assert_eq!(e["context"]["library"]["name"], "app");
    }

    #[test]
    fn build_refuses_what_a_server_would() {
        for (user, msg) in [
            (User::id("u"), json!({"event": "no type"})),
            (User::id("u"), json!({"type": "nope"})),
            (User::default(), json!({"type": "track"})),
            (User::id(" "), json!({"type": "track"})),
            (User::id("u"), json!([1])),
        ] {
            assert!(matches!(build(&user, msg), Err(Error::Invalid(_))));
        }
    }
}
