//! The embedded backend: the event log of `ballast-log` in `<data_dir>/log`.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use ballast_log::{Batch, Log, LogConfig, LogError, PushError, RecoveryReport};
use tokio::sync::{oneshot, watch};

use super::{
    envelope, Appended, EventBatch, LeaseState, Position, Progress, ReadEvents, Refusal, Store,
    StoreError, StoreStatus, StoredEvent,
};

pub struct EmbeddedStore {
    log: Arc<Log>,
    quota: u64,
    durable: watch::Sender<Position>,
    /// Set once a fatal failure happened; the server watches it and stops.
    fatal: watch::Sender<Option<String>>,
    /// Saving cursors fails (a cursor file that cannot be written: EMFILE, ENOSPC).
    cursor_failure: super::Failing,
    /// Appends submitted to the log writer and not completed yet, for [`Store::stalled`].
    pending: Arc<Pending>,
    /// Since when the log has been unable to start a new segment (as last looked at).
    unavailable_since: std::sync::Mutex<Option<std::time::Instant>>,
}

/// Appends in the writer's hands, and when it last completed one (or got the first of a
/// new run of work): milliseconds since `epoch`.
struct Pending {
    epoch: std::time::Instant,
    count: std::sync::atomic::AtomicU64,
    progress_ms: std::sync::atomic::AtomicU64,
}

impl Pending {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn submitted(&self) {
        use std::sync::atomic::Ordering;
        // Work arriving at an idle writer starts its clock now.
        if self.count.fetch_add(1, Ordering::AcqRel) == 0 {
            self.progress_ms.store(self.now_ms(), Ordering::Release);
        }
    }

    fn completed(&self) {
        use std::sync::atomic::Ordering;
        self.progress_ms.store(self.now_ms(), Ordering::Release);
        self.count.fetch_sub(1, Ordering::AcqRel);
    }

    /// How long appends have waited with none completed.
    fn stuck_for(&self) -> Option<std::time::Duration> {
        use std::sync::atomic::Ordering;
        if self.count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let since = self.progress_ms.load(Ordering::Acquire);
        Some(std::time::Duration::from_millis(
            self.now_ms().saturating_sub(since),
        ))
    }
}

impl EmbeddedStore {
    /// Opens (recovering) the log in `dir`.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        quota: u64,
        preallocate: bool,
    ) -> Result<(EmbeddedStore, RecoveryReport), LogError> {
        let config = LogConfig {
            segment_bytes,
            max_bytes: Some(quota),
            preallocate,
            ..LogConfig::new(dir)
        };
        let (log, report) = Log::open(config)?;
        let (durable, _) = watch::channel(log.durable_end());
        let (fatal, _) = watch::channel(None);
        Ok((
            EmbeddedStore {
                log: Arc::new(log),
                quota,
                durable,
                fatal,
                cursor_failure: super::Failing::default(),
                pending: Arc::new(Pending {
                    epoch: std::time::Instant::now(),
                    count: Default::default(),
                    progress_ms: Default::default(),
                }),
                unavailable_since: std::sync::Mutex::new(None),
            },
            report,
        ))
    }

    /// Notified with the reason when the store failed fatally.
    pub fn fatal_failures(&self) -> watch::Receiver<Option<String>> {
        self.fatal.subscribe()
    }

    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }
}

fn map_err(e: LogError) -> StoreError {
    match e {
        LogError::QuotaExceeded { .. } => StoreError::QuotaExceeded,
        LogError::DiskFull(_) => StoreError::DiskFull,
        LogError::RecordTooLarge(n) => StoreError::TooLarge(format!("{n} bytes")),
        LogError::WriterFailed(m) => StoreError::Fatal(m),
        // Transient (a segment could not be created): 503, the writer retries.
        LogError::Unavailable(m) => StoreError::Other(m),
        LogError::Closed => StoreError::Fatal("store is closed".into()),
        other => StoreError::Other(other.to_string()),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LogError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Other(format!("store task failed: {e}")))?
        .map_err(map_err)
}

/// A read's records as events: source, ordering key and messageId out of each envelope,
/// the event's JSON a slice of the chunk read (no copy).
fn decode_records(batch: ballast_log::ReadBatch) -> Result<ReadEvents, StoreError> {
    let mut events = Vec::with_capacity(batch.records.len());
    // Runs of records share a source: one allocation a run.
    let mut last_source: Option<Arc<str>> = None;
    for r in batch.records {
        let (source, meta, event) = envelope::decode(&r.payload)
            .map_err(|e| StoreError::Other(format!("record at position {}: {e}", r.position)))?;
        let source = match &last_source {
            Some(s) if **s == *source => s.clone(),
            _ => last_source.insert(Arc::from(source)).clone(),
        };
        let start = event.as_ptr() as usize - r.payload.as_ptr() as usize;
        let event = r.payload.slice(start..start + event.len());
        events.push(StoredEvent {
            position: r.position,
            source,
            event,
            ident: envelope::ident_of(&r.payload, meta),
        });
    }
    Ok(ReadEvents {
        events,
        next: batch.next,
    })
}

#[async_trait]
impl Store for EmbeddedStore {
    fn partitions(&self) -> u32 {
        1
    }

    async fn append(&self, batch: EventBatch) -> Result<Appended, StoreError> {
        let mut records =
            Batch::with_capacity(batch.bytes() + batch.len() * (20 + batch.source.len()));
        for (event, meta) in batch.events() {
            records
                .push_with::<()>(|buf| {
                    envelope::encode_into(buf, &batch.source, meta, event);
                    Ok(())
                })
                .map_err(|e| match e {
                    PushError::Log(e) => map_err(e),
                    PushError::Fill(()) => StoreError::Other("encoding failed".into()),
                })?;
        }
        let (tx, rx) = oneshot::channel();
        let durable = self.durable.clone();
        let fatal = self.fatal.clone();
        let pending = self.pending.clone();
        pending.submitted();
        self.log.append(records, move |result| {
            pending.completed();
            match &result {
                Ok(a) => {
                    // The whole group is durable when its first batch completes: publish
                    // the group's end then, once, instead of once per batch (each would
                    // wake the router again).
                    let group_end = a.durable.max(a.end);
                    if *durable.borrow() < group_end {
                        durable.send_if_modified(|end| {
                            let moved = group_end > *end;
                            if moved {
                                *end = group_end;
                            }
                            moved
                        });
                    }
                }
                Err(e) if e.is_fatal() => {
                    fatal.send_if_modified(|f| {
                        let first = f.is_none();
                        if first {
                            *f = Some(e.to_string());
                        }
                        first
                    });
                }
                Err(_) => {}
            }
            let _ = tx.send(result);
        });
        let appended = rx
            .await
            .map_err(|_| StoreError::Fatal("log writer went away".into()))?
            .map_err(map_err)?;
        Ok(Appended {
            first: appended.first,
            end: appended.end,
            events: appended.records,
        })
    }

    async fn register_consumer(
        &self,
        consumer: &str,
        _partition: u32,
    ) -> Result<Progress, StoreError> {
        let log = self.log.clone();
        let name = consumer.to_string();
        blocking(move || {
            let cursor = log.register_consumer(&name)?;
            Ok(match log.progress(&name) {
                Some(p) => Progress {
                    cursor: p.cursor,
                    done: p.done,
                },
                None => Progress::at(cursor),
            })
        })
        .await
    }

    async fn read(&self, from: Position, max_events: usize) -> Result<ReadEvents, StoreError> {
        let log = self.log.clone();
        // The records are decoded on the blocking thread too, beside the read: off the
        // thread of the router's loop that waits for them.
        tokio::task::spawn_blocking(move || {
            let batch = log.read(from, max_events, 4 << 20).map_err(map_err)?;
            decode_records(batch)
        })
        .await
        .map_err(|e| StoreError::Other(format!("store task failed: {e}")))?
    }

    /// Keeps the cursor and the ranges finished above it (ballast-log's consumer files,
    /// at most `ballast_log::MAX_DONE_RANGES` of them, as many as the router sends), so
    /// a restart re-sends only what was in flight or finished since the last
    /// acknowledgement (200 ms), not everything a slow user held the cursor back from.
    async fn ack(&self, consumer: &str, progress: &Progress) -> Result<(), StoreError> {
        let log = self.log.clone();
        let name = consumer.to_string();
        let upto = progress.cursor;
        let done = progress.done.clone();
        let saved = blocking(move || log.ack_progress(&name, upto, &done)).await;
        if saved.is_err() {
            metrics::counter!("ballast_store_cursor_save_failures_total").increment(1);
        }
        self.cursor_failure.record(&saved);
        saved
    }

    fn cursor_failure(&self) -> Option<(std::time::Duration, String)> {
        self.cursor_failure.since()
    }

    fn stalled(&self) -> Option<(std::time::Duration, String)> {
        if let Some(d) = self.pending.stuck_for() {
            if d >= std::time::Duration::from_secs(1) {
                return Some((d, "the log writer completed no append".into()));
            }
        }
        let reason = self.log.stats().unavailable;
        let mut since = self
            .unavailable_since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match reason {
            Some(r) => {
                let at = *since.get_or_insert_with(std::time::Instant::now);
                Some((at.elapsed(), format!("cannot start a new log segment: {r}")))
            }
            None => {
                *since = None;
                None
            }
        }
    }

    fn cursor(&self, consumer: &str, _partition: u32) -> Option<Position> {
        self.log.cursor(consumer)
    }

    async fn lease(&self, _consumer: &str, _partition: u32) -> Result<super::Lease, StoreError> {
        // One process per data directory (the log's directory lock): never contended,
        // never lost.
        let (tx, rx) = watch::channel(LeaseState::Held);
        Ok(super::Lease::new(rx, Box::new(tx)))
    }

    fn subscribe(&self, _partition: u32) -> watch::Receiver<Position> {
        self.durable.subscribe()
    }

    fn status(&self) -> StoreStatus {
        let s = self.log.stats();
        StoreStatus {
            writable: !s.failed,
            failure: self.fatal.borrow().clone(),
            bytes_used: s.bytes_on_disk,
            quota_bytes: self.quota,
            events_appended: s.records,
            appends: s.appends,
            fsyncs: s.fsyncs,
            fsync_seconds: s.fsync_nanos as f64 / 1e9,
            quota_rejections: s.rejected_quota,
            quota_blocked: s.quota_blocked,
            quarantined_records: s.quarantined_records,
            torn_tail_bytes: s.torn_tail_bytes,
            segments: s.segments,
            start: s.start,
            end: s.durable_end,
        }
    }

    fn events_stored(&self) -> Option<u64> {
        Some(self.log.stats().stored_records)
    }

    fn refusal(&self) -> Option<Refusal> {
        let s = self.log.stats();
        if s.failed {
            Some(Refusal::Failed(
                self.fatal.borrow().clone().unwrap_or_default(),
            ))
        } else if s.disk_full {
            Some(Refusal::DiskFull)
        } else if let Some(m) = s.unavailable {
            Some(Refusal::Unavailable(m))
        } else if s.quota_blocked || s.bytes_on_disk >= self.quota {
            Some(Refusal::Quota)
        } else {
            None
        }
    }

    async fn close(&self) {
        let log = self.log.clone();
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
    }
}
