//! The on-device queue: a ballast-log in the app's directory. An event is queued once it
//! is on disk (group-committed fsync); a sent batch is acknowledged, and the log deletes
//! segments every send has passed.

use std::path::Path;

use ballast_log::{Batch, Log, LogConfig, LogError, Position};

const CONSUMER: &str = "sent";

/// The smallest queue bound taken.
pub const MIN_QUEUE_BYTES: u64 = 256 << 10;

pub struct Queue {
    log: Log,
}

/// Queued events from a position, and where the next read starts.
pub struct Pending {
    pub events: Vec<(Position, bytes::Bytes)>,
    pub next: Position,
}

impl Queue {
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Queue, Position), LogError> {
        let max_bytes = max_bytes.max(MIN_QUEUE_BYTES);
        let mut config = LogConfig::new(dir);
        // Small segments, so that space comes back soon after a send: whole segments
        // are deleted once sent.
        config.segment_bytes = (max_bytes / 8).clamp(32 << 10, 1 << 20);
        config.max_bytes = Some(max_bytes);
        // Devices pay for every byte written: no zero-filling ahead.
        config.preallocate = false;
        config.max_group_bytes = 4 << 20;
        let (log, _) = Log::open(config)?;
        let cursor = log.register_consumer(CONSUMER)?;
        Ok((Queue { log }, cursor))
    }

    /// Appends one event durably.
    pub fn push(&self, event: &[u8]) -> Result<Position, LogError> {
        let mut batch = Batch::with_capacity(event.len() + 64);
        batch.push(event)?;
        Ok(self.log.append_wait(batch)?.end)
    }

    /// Up to `max_events` queued events from `from`, at most `max_bytes` of them (but at
    /// least one, whatever its size).
    pub fn peek(
        &self,
        from: Position,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Pending, LogError> {
        let read = self.log.read(from, max_events, max_bytes)?;
        let mut events = Vec::with_capacity(read.records.len());
        let mut bytes = 0usize;
        let mut next = read.next;
        for r in read.records {
            if !events.is_empty() && bytes + r.payload.len() > max_bytes {
                next = r.position;
                break;
            }
            bytes += r.payload.len();
            events.push((r.position, r.payload));
        }
        Ok(Pending { events, next })
    }

    /// Everything before `upto` has been sent (or given up).
    pub fn ack(&self, upto: Position) -> Result<(), LogError> {
        self.log.ack(CONSUMER, upto)
    }

    pub fn end(&self) -> Position {
        self.log.durable_end()
    }

    pub fn bytes_used(&self) -> u64 {
        self.log.stats().bytes_on_disk
    }

    pub fn close(&self) {
        self.log.close();
    }
}
