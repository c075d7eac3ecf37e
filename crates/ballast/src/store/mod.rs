//! The event store: durable append for the gateway, per-consumer read and acknowledge
//! for the router. One trait, so that a PostgreSQL backend can sit beside the embedded
//! one and pass the same conformance suite (`conformance.rs`).

pub mod embedded;
pub mod envelope;
pub mod postgres;

#[cfg(test)]
mod conformance;
#[cfg(test)]
pub(crate) mod pgtest;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

/// Where an event sits in the store; increases with acceptance order.
pub type Position = u64;

/// Events of one request (one source), each an enriched JSON object, stored together,
/// each with an optional small *meta* block (see [`envelope::encode_meta`]) that names its
/// ordering key and messageId so that delivery need not parse the event again.
#[derive(Debug, Default, Clone)]
pub struct EventBatch {
    pub source: Arc<str>,
    buf: Vec<u8>,
    ends: Vec<usize>,
    meta: Vec<u8>,
    meta_ends: Vec<usize>,
}

impl EventBatch {
    pub fn new(source: Arc<str>, capacity: usize) -> EventBatch {
        EventBatch {
            source,
            buf: Vec::with_capacity(capacity),
            ends: Vec::new(),
            meta: Vec::new(),
            meta_ends: Vec::new(),
        }
    }

    /// Adds one event: `write` appends its JSON to the first buffer and its meta block
    /// (possibly nothing) to the second.
    pub fn push_with<E>(
        &mut self,
        write: impl FnOnce(&mut Vec<u8>, &mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        let (start, meta_start) = (self.buf.len(), self.meta.len());
        match write(&mut self.buf, &mut self.meta) {
            Ok(()) => {
                self.ends.push(self.buf.len());
                self.meta_ends.push(self.meta.len());
                Ok(())
            }
            Err(e) => {
                self.buf.truncate(start);
                self.meta.truncate(meta_start);
                Err(e)
            }
        }
    }

    /// Adds one event without a meta block.
    pub fn push(&mut self, event: &[u8]) {
        self.buf.extend_from_slice(event);
        self.ends.push(self.buf.len());
        self.meta_ends.push(self.meta.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.buf.len() + self.meta.len()
    }

    /// The events, in order: (JSON, meta block).
    pub fn events(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let (mut start, mut meta_start) = (0, 0);
        self.ends
            .iter()
            .zip(&self.meta_ends)
            .map(move |(&end, &meta_end)| {
                let e = (&self.buf[start..end], &self.meta[meta_start..meta_end]);
                start = end;
                meta_start = meta_end;
                e
            })
    }
}

/// The result of a durable append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub first: Position,
    /// Position after the last event: a consumer that acknowledges it is past the batch.
    pub end: Position,
    pub events: usize,
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub position: Position,
    pub source: Arc<str>,
    /// The event's JSON (a slice of what the store read; cheap to clone).
    pub event: bytes::Bytes,
    /// Ordering key and messageId recorded at ingest, when the record has them.
    pub ident: Option<(Arc<str>, Arc<str>)>,
}

/// Events read for a consumer, and where its next read starts.
#[derive(Debug, Clone, Default)]
pub struct ReadEvents {
    pub events: Vec<StoredEvent>,
    pub next: Position,
}

/// The right to consume as one consumer alone among the processes sharing a store.
/// Dropping it gives it up.
pub struct Lease {
    lost: watch::Receiver<bool>,
    _held: Box<dyn Send + Sync>,
}

impl Lease {
    pub fn new(lost: watch::Receiver<bool>, held: Box<dyn Send + Sync>) -> Lease {
        Lease { lost, _held: held }
    }

    /// Resolves once the lease is lost (never for a lease that cannot be lost).
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        if lost.wait_for(|l| *l).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Point-in-time view of the store for health checks and metrics.
#[derive(Debug, Clone, Default)]
pub struct StoreStatus {
    /// False after a fatal write failure: nothing can be acknowledged any more.
    pub writable: bool,
    pub failure: Option<String>,
    pub bytes_used: u64,
    pub quota_bytes: u64,
    pub events_appended: u64,
    pub appends: u64,
    pub fsyncs: u64,
    pub fsync_seconds: f64,
    pub quota_rejections: u64,
    /// The last append was refused for the quota and no space was freed since.
    pub quota_blocked: bool,
    pub quarantined_records: u64,
    pub torn_tail_bytes: u64,
    pub segments: usize,
    pub start: Position,
    pub end: Position,
}

impl StoreStatus {
    pub fn full(&self) -> bool {
        self.quota_blocked || self.bytes_used >= self.quota_bytes
    }
}

/// Why a store refuses new events right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A fatal write failure: nothing will be acknowledged in this process any more.
    Failed(String),
    /// The disk (or the file system's quota) is full: ENOSPC.
    DiskFull,
    /// A transient failure (e.g. a new segment could not be created); retried.
    Unavailable(String),
    /// `storage.max_bytes` is reached.
    Quota,
}

impl Refusal {
    /// The metrics label and the short name in `/v1/status`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Failed(_) => "storage_failed",
            Refusal::DiskFull => "disk_full",
            Refusal::Unavailable(_) => "unavailable",
            Refusal::Quota => "quota",
        }
    }

    /// What `/readyz` answers.
    pub fn describe(&self) -> String {
        match self {
            Refusal::Failed(_) => "storage failed".into(),
            Refusal::DiskFull => "disk full".into(),
            Refusal::Unavailable(m) => format!("storage unavailable: {m}"),
            Refusal::Quota => "storage quota exceeded".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage quota exceeded")]
    QuotaExceeded,
    #[error("disk full")]
    DiskFull,
    /// The store cannot acknowledge anything any more in this process; the server must
    /// stop and recover from its files on the next start.
    #[error("storage failed: {0}")]
    Fatal(String),
    #[error("event too large: {0}")]
    TooLarge(String),
    #[error("storage error: {0}")]
    Other(String),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores the batch; returns once every event of it is on stable storage.
    async fn append(&self, batch: EventBatch) -> Result<Appended, StoreError>;

    /// Registers a consumer (idempotent) and returns its cursor.
    async fn register_consumer(&self, consumer: &str) -> Result<Position, StoreError>;

    /// Reads up to `max_events` stored events at or after `from`.
    async fn read(&self, from: Position, max_events: usize) -> Result<ReadEvents, StoreError>;

    /// Everything before `upto` is done for this consumer.
    async fn ack(&self, consumer: &str, upto: Position) -> Result<(), StoreError>;

    /// The consumer's cursor, if registered.
    fn cursor(&self, consumer: &str) -> Option<Position>;

    /// Follows the end of what is durable.
    fn subscribe(&self) -> watch::Receiver<Position>;

    fn status(&self) -> StoreStatus;

    /// Events held in the store now (after a restart too), when the backend knows it.
    fn events_stored(&self) -> Option<u64> {
        None
    }

    /// Why the store refuses new events right now, if it does. Backends that know more
    /// than [`StoreStatus`] tells (a full disk) say so.
    fn refusal(&self) -> Option<Refusal> {
        let st = self.status();
        if !st.writable {
            Some(Refusal::Failed(st.failure.unwrap_or_default()))
        } else if st.full() {
            Some(Refusal::Quota)
        } else {
            None
        }
    }

    /// Waits until this process may consume as `consumer` alone (the embedded log has
    /// one process per data directory: at once; PostgreSQL: an advisory lock, which
    /// another replica gets within seconds when this one dies).
    async fn lease(&self, consumer: &str) -> Result<Lease, StoreError>;

    /// Finishes what was submitted and stops writing.
    async fn close(&self);
}
