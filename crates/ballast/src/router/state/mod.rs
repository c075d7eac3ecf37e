//! The router's durable state beside the event log: dead letters, the replay queue,
//! per-event retry state (attempt counts and first-attempt times survive restarts and
//! takeovers) and poison strikes. One trait, two backends: `redb.rs` in the data
//! directory (embedded store: one process owns it), `postgres.rs` in the shared
//! database (PostgreSQL store: any replica lists and replays dead letters, and a
//! replica that takes a partition over knows its retry state and strikes).

#[cfg(test)]
mod conformance;
pub mod postgres;
pub mod redb;

use std::collections::HashMap;
use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::store::Position;

pub use self::redb::RouterDb;
pub use crate::time::{from_ms, to_ms};

#[derive(Debug, thiserror::Error)]
#[error("router state: {0}")]
pub struct DbError(pub(crate) String);

pub(crate) fn e<E: std::fmt::Display>(x: E) -> DbError {
    DbError(x.to_string())
}

/// An event the router gave up on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: u64,
    pub destination: String,
    /// Its position in the event log (absent for events that were already replays).
    pub position: Option<Position>,
    pub source: String,
    pub event: Box<RawValue>,
    pub attempts: u32,
    /// Milliseconds since the Unix epoch.
    pub first_attempt_ms: u64,
    pub dead_at_ms: u64,
    pub status: Option<u16>,
    pub reason: String,
    /// "aborted" (a permanent error or retries exhausted) or "poison".
    pub kind: String,
}

/// What the router remembers of an event that failed and will be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryInfo {
    pub attempts: u32,
    pub first_attempt_ms: u64,
}

#[async_trait]
pub trait RouterState: Send + Sync + 'static {
    /// Stores dead letters durably (ids are assigned here); clears their retry state.
    async fn add_dead_letters(&self, letters: Vec<DeadLetter>) -> Result<Vec<u64>, DbError>;
    /// Dead letters of one destination (or all), oldest first.
    async fn list(
        &self,
        destination: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DbError>;
    async fn count(&self, destination: &str) -> Result<u64, DbError>;
    /// Moves a destination's dead letters (that died at or after `since`) to its replay
    /// queue, atomically. Returns how many.
    async fn replay(&self, destination: &str, since: Option<SystemTime>) -> Result<usize, DbError>;
    /// The replay queue of a destination, oldest first.
    async fn replay_queue(&self, destination: &str) -> Result<Vec<DeadLetter>, DbError>;
    /// Replayed events that are done (delivered, or dead again under a new id).
    async fn replay_done(&self, destination: &str, ids: &[u64]) -> Result<(), DbError>;
    /// Adds one strike to each (destination, strike key); returns the new counts.
    async fn add_strikes(&self, events: &[(String, String)]) -> Result<Vec<u32>, DbError>;
    /// Strikes of a destination's events, by strike key.
    async fn load_strikes(&self, destination: &str) -> Result<HashMap<String, u32>, DbError>;
    /// Forgets strikes of events that are finished.
    async fn clear_strikes(&self, destination: &str, keys: &[String]) -> Result<(), DbError>;
    async fn load_retry(&self, destination: &str) -> Result<HashMap<Position, RetryInfo>, DbError>;
    /// Applies retry-state changes (None removes) at once.
    async fn save_retry(
        &self,
        destination: &str,
        changes: &[(Position, Option<RetryInfo>)],
    ) -> Result<(), DbError>;
}
