//! Where alerts wait until every notifier took them: one trait, two backends.
//!
//! - `redb.rs`: `<data_dir>/alerts.redb`, the embedded store's outbox (one process owns
//!   it).
//! - `postgres.rs`: tables in the shared database, the PostgreSQL store's outbox. Every
//!   replica writes into it, one replica at a time sends it (an advisory lock), so an
//!   alert raised by a replica that dies before sending it still goes out, a condition
//!   raised twice (a poison event struck on two replicas) goes out once, and
//!   `/v1/alerts` on any replica lists every open condition.
//!
//! The API is synchronous: alerts are raised from synchronous code (the running mode's
//! transitions) as well as from tasks (which call it on blocking threads). The
//! PostgreSQL backend keeps its connection on a thread of its own for that reason.

#[cfg(test)]
pub(crate) mod conformance;
pub mod postgres;
pub mod redb;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Action, Alert, AlertError};

/// One alert for one notifier, waiting to be sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub notifier: String,
    pub alert: Alert,
    pub attempts: u32,
    /// Not before this time (ms since the Unix epoch); 0: now.
    pub next_at_ms: u64,
}

/// What one `raise` writes, in one transaction.
pub struct Raise<'a> {
    /// Names the transition: a second raise with it writes nothing.
    pub idempotency: &'a str,
    /// The open condition it starts (`Trigger`) or clears (`Resolve`).
    pub condition: &'a str,
    pub action: Action,
    pub at_ms: u64,
    /// One per notifier.
    pub entries: &'a [Entry],
}

/// The most entries one look at the outbox reads (oldest first). An outbox holds a few
/// entries unless every notifier has been down for long.
pub const READ_LIMIT: usize = 10_000;

pub trait Outbox: Send + Sync {
    /// Writes the entries and the condition's change unless `idempotency` was written
    /// before; true when it wrote them.
    fn raise(&self, raise: &Raise<'_>) -> Result<bool, AlertError>;
    /// When the condition was triggered, if it has not been resolved since.
    fn open_since(&self, condition: &str) -> Result<Option<u64>, AlertError>;
    /// Every open condition (condition, since ms), in no particular order.
    fn open_conditions(&self) -> Result<Vec<(String, u64)>, AlertError>;
    /// Entries not yet sent.
    fn pending(&self) -> Result<usize, AlertError>;
    /// The oldest `READ_LIMIT` entries (id, entry), in the order they were raised.
    fn entries(&self) -> Result<Vec<(u64, Entry)>, AlertError>;
    /// The entry was sent (or dropped): removes it.
    fn finish(&self, id: u64) -> Result<(), AlertError>;
    /// Saves the entry's new attempt count and due time.
    fn reschedule(&self, id: u64, entry: &Entry) -> Result<(), AlertError>;
    /// Whether this process is the one that sends the outbox now.
    fn is_sender(&self) -> bool {
        true
    }
    /// How often the sender looks for entries raised by other processes (`None`: only
    /// this process raises, and it wakes the sender itself).
    fn poll_interval(&self) -> Option<Duration> {
        None
    }
    /// Conditions of this process are named with its source (shared outbox), so that
    /// one replica's resolve does not close another's trigger.
    fn shared(&self) -> bool {
        false
    }
}
