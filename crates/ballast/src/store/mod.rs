//! The event store: durable append for the gateway, per-consumer read and acknowledge
//! for the router. One trait, so that a PostgreSQL backend can sit beside the embedded
//! one and pass the same conformance suite (`conformance.rs`).

mod config;
pub mod embedded;
pub mod envelope;
pub mod postgres;

#[cfg(test)]
mod conformance;
/// The test cluster, where the store's tests have always found it.
#[cfg(test)]
pub(crate) use crate::pgtest;

use std::sync::Arc;

use async_trait::async_trait;
use ballast_log::{get_varint, put_varint};
use tokio::sync::watch;

pub use config::{StorageBackend, StorageConfig};

/// Where an event sits in the store; increases with acceptance order within its
/// partition. The partition is in the top bits (see [`partition_of`]), so a position
/// names one event in the whole store, and anything keyed by position (retry state, the
/// crash journal) needs no partition beside it.
pub type Position = u64;

/// Bits of a position below the partition number.
pub const PARTITION_SHIFT: u32 = 48;
/// The most partitions a store may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// The partition a position belongs to.
pub fn partition_of(pos: Position) -> u32 {
    (pos >> PARTITION_SHIFT) as u32
}

/// The first position of a partition.
pub fn partition_base(partition: u32) -> Position {
    (partition as u64) << PARTITION_SHIFT
}

/// The partition of an ordering key (userId, else anonymousId, as the meta block records
/// it): FNV-1a, stable across versions, processes and machines, since it decides where a
/// user's events are stored for as long as the database lives.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    if partitions <= 1 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % partitions as u64) as u32
}

/// The partition of one event, from its meta block: events without one (no ordering key
/// recorded) all go to partition 0, so that they keep their order among themselves.
pub fn partition_for_meta(meta: &[u8], partitions: u32) -> u32 {
    match envelope::decode_meta(meta) {
        Some((key, _)) if partitions > 1 => partition_for_key(key.as_bytes(), partitions),
        _ => 0,
    }
}

/// How far a consumer got in one partition: everything before `cursor` is finished, and
/// so is every position inside one of the `done` ranges (half-open, ascending, above the
/// cursor). A consumer finishes events out of order (per-user queues), so the cursor alone
/// lags behind what was delivered; the ranges let a replica that takes over skip what its
/// predecessor already finished, so that it re-sends only what was unfinished.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub cursor: Position,
    pub done: Vec<(Position, Position)>,
}

impl Progress {
    pub fn at(cursor: Position) -> Progress {
        Progress {
            cursor,
            done: Vec::new(),
        }
    }

    /// Compact bytes: LEB128 varints of the gaps and lengths of the ranges, relative to the
    /// cursor (a few bytes a range).
    pub fn encode_done(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.done.len() * 4);
        let mut prev = self.cursor;
        for &(start, end) in &self.done {
            if start < prev || end <= start {
                break;
            }
            put_varint(&mut out, start - prev);
            put_varint(&mut out, end - start);
            prev = end;
        }
        out
    }

    /// Reads what [`Progress::encode_done`] wrote; damaged bytes end the list early (the
    /// ranges lost are only re-delivered, never skipped).
    pub fn decode_done(cursor: Position, bytes: &[u8]) -> Progress {
        let mut done = Vec::new();
        let mut prev = cursor;
        let mut at = 0;
        while at < bytes.len() {
            let (Some(gap), Some(len)) = (get_varint(bytes, &mut at), get_varint(bytes, &mut at))
            else {
                break;
            };
            let (Some(start), Some(end)) = (
                prev.checked_add(gap),
                prev.checked_add(gap).and_then(|s| s.checked_add(len)),
            ) else {
                break;
            };
            if len == 0 {
                break;
            }
            done.push((start, end));
            prev = end;
        }
        Progress { cursor, done }
    }
}

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
    /// Position of the first event (in the partition of the batch's first event).
    pub first: Position,
    /// Position after the batch's last event in that partition: a consumer of a
    /// one-partition store that acknowledges it is past the batch.
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
    /// Slices of the record read (see `envelope::ident_of`).
    pub ident: Option<(bytestring::ByteString, bytestring::ByteString)>,
}

/// Events read for a consumer, and where its next read starts.
#[derive(Debug, Clone, Default)]
pub struct ReadEvents {
    pub events: Vec<StoredEvent>,
    pub next: Position,
}

/// The right to consume one partition as one consumer alone among the processes sharing
/// a store. Dropping it gives it up.
pub struct Lease {
    state: watch::Receiver<LeaseState>,
    _held: Box<dyn Send + Sync>,
}

/// What a lease holder is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    Held,
    /// Another replica needs it to even out the load: finish what is in flight,
    /// acknowledge, then drop the lease (it is still held until then).
    Yield,
    /// Lost (its session died): another replica may already hold it.
    Lost,
}

impl Lease {
    pub fn new(state: watch::Receiver<LeaseState>, held: Box<dyn Send + Sync>) -> Lease {
        Lease { state, _held: held }
    }

    /// Resolves once the holder must stop: the lease was lost or is asked back (never
    /// for a lease that cannot be lost). Returns which.
    pub async fn ended(&self) -> LeaseState {
        let mut state = self.state.clone();
        let ended = match state.wait_for(|s| *s != LeaseState::Held).await {
            Ok(s) => Some(*s),
            Err(_) => None,
        };
        match ended {
            Some(s) => s,
            None => std::future::pending().await,
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

/// The first failure of a run of failures of one operation, cleared by its next
/// success: how long it has been failing, and why.
#[derive(Debug, Default)]
pub struct Failing(std::sync::Mutex<Option<(std::time::Instant, String)>>);

impl Failing {
    pub fn record<T, E: std::fmt::Display>(&self, result: &Result<T, E>) {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(_) => *state = None,
            Err(e) => {
                if state.is_none() {
                    *state = Some((std::time::Instant::now(), e.to_string()));
                }
            }
        }
    }

    pub fn since(&self) -> Option<(std::time::Duration, String)> {
        let state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        state.as_ref().map(|(at, why)| (at.elapsed(), why.clone()))
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
    /// How many partitions events are spread over (by ordering key; see
    /// [`partition_for_meta`]). The embedded log has one.
    fn partitions(&self) -> u32;

    /// Stores the batch; returns once every event of it is on stable storage.
    async fn append(&self, batch: EventBatch) -> Result<Appended, StoreError>;

    /// Registers a consumer of one partition (idempotent) and returns how far it got.
    async fn register_consumer(
        &self,
        consumer: &str,
        partition: u32,
    ) -> Result<Progress, StoreError>;

    /// Reads up to `max_events` stored events at or after `from`, in `from`'s partition.
    async fn read(&self, from: Position, max_events: usize) -> Result<ReadEvents, StoreError>;

    /// Records how far the consumer got in the partition of `progress.cursor`: the
    /// cursor only moves forward; the finished ranges above it replace the last ones
    /// (a backend may keep none of them: then more is re-delivered, never less).
    async fn ack(&self, consumer: &str, progress: &Progress) -> Result<(), StoreError>;

    /// The consumer's cursor in a partition, if registered (as this process last knew).
    fn cursor(&self, consumer: &str, partition: u32) -> Option<Position>;

    /// Follows the end of what is durable in a partition.
    fn subscribe(&self, partition: u32) -> watch::Receiver<Position>;

    fn status(&self) -> StoreStatus;

    /// Events held in the store now (after a restart too), when the backend knows it.
    fn events_stored(&self) -> Option<u64> {
        None
    }

    /// How long ago the figures of [`Store::status`] were last confirmed by the backend
    /// (the PostgreSQL store polls its database; None: they are the process's own,
    /// always current).
    fn figures_age(&self) -> Option<std::time::Duration> {
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

    /// Saving cursors has failed since this long ago, with this error (cleared by the
    /// next save that works). Delivery goes on meanwhile; what a restart would re-send
    /// grows. The server alerts on it.
    fn cursor_failure(&self) -> Option<(std::time::Duration, String)> {
        None
    }

    /// How long the store has made no progress while work waits, and why: a log writer
    /// that completes none of the appends submitted to it, or that cannot start a new
    /// segment (embedded). Not an outage that passes by itself elsewhere (a database
    /// down, a full disk, the quota): those are readiness, not liveness. The server's
    /// liveness watchdog fails `/livez` past `server.liveness_timeout`.
    fn stalled(&self) -> Option<(std::time::Duration, String)> {
        None
    }

    /// What a consumer has not passed yet, summed over the partitions: bytes of the log
    /// (embedded) or events (PostgreSQL).
    fn backlog(&self, consumer: &str) -> u64 {
        (0..self.partitions())
            .map(|p| {
                let end = *self.subscribe(p).borrow();
                end.saturating_sub(self.cursor(consumer, p).unwrap_or(end))
            })
            .sum()
    }

    /// Waits until this process may consume `consumer`'s partition alone (the embedded
    /// log has one process per data directory: at once; PostgreSQL: an advisory lock,
    /// taken only while this replica holds fewer than its share of the partitions, which
    /// another replica gets within seconds when this one dies).
    async fn lease(&self, consumer: &str, partition: u32) -> Result<Lease, StoreError>;

    /// Finishes what was submitted and stops writing.
    async fn close(&self);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_carry_their_partition() {
        let p = partition_base(5) + 42;
        assert_eq!(partition_of(p), 5);
        assert_eq!(partition_of(42), 0);
        assert_eq!(partition_for_key(b"u:alice", 1), 0);
        // Stable across versions: the hash decides where stored users live.
        assert_eq!(
            partition_for_key(b"u:alice", 16),
            partition_for_key(b"u:alice", 16)
        );
        let spread: std::collections::HashSet<u32> = (0..200)
            .map(|i| partition_for_key(format!("u:{i}").as_bytes(), 16))
            .collect();
        assert_eq!(spread.len(), 16);
    }

    #[test]
    fn progress_round_trips_and_stops_at_damage() {
        let p = Progress {
            cursor: 1_000,
            done: vec![(1_002, 1_010), (1_011, 1_012), (5_000_000, 5_000_300)],
        };
        let bytes = p.encode_done();
        assert!(bytes.len() < 16);
        assert_eq!(Progress::decode_done(1_000, &bytes), p);
        // A truncated list keeps the ranges before the damage.
        let cut = Progress::decode_done(1_000, &bytes[..bytes.len() - 1]);
        assert_eq!(cut.done, p.done[..2].to_vec());
        assert_eq!(Progress::decode_done(7, &[]), Progress::at(7));
    }
}
