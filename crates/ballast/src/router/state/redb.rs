//! The router's state in `<data_dir>/router.redb` (embedded store): dead letters, the
//! replay queue, per-event retry state and poison strikes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition};

use super::{e, to_ms, DbError, DeadLetter, RetryInfo, RouterState};
use crate::store::Position;

const DEAD: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dead_letters");
const REPLAY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("replay_queue");
const RETRY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("retry_state");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Strikes by (destination, strike key): the messageId, so a resent copy of a poison
/// event shares its strikes.
const STRIKES: TableDefinition<(&str, &str), u32> = TableDefinition::new("strikes_by_id");

pub struct RouterDb {
    db: Database,
}

impl RouterDb {
    pub fn open(path: &Path) -> Result<RouterDb, DbError> {
        let db = Database::create(path).map_err(e)?;
        let txn = db.begin_write().map_err(e)?;
        {
            txn.open_table(DEAD).map_err(e)?;
            txn.open_table(REPLAY).map_err(e)?;
            txn.open_table(RETRY).map_err(e)?;
            txn.open_table(META).map_err(e)?;
            txn.open_table(STRIKES).map_err(e)?;
        }
        txn.commit().map_err(e)?;
        Ok(RouterDb { db })
    }

    /// Stores dead letters durably (ids are assigned here).
    pub fn add_dead_letters(&self, letters: Vec<DeadLetter>) -> Result<Vec<u64>, DbError> {
        let txn = self.db.begin_write().map_err(e)?;
        let mut ids = Vec::with_capacity(letters.len());
        {
            let mut meta = txn.open_table(META).map_err(e)?;
            let mut next = meta
                .get("next_id")
                .map_err(e)?
                .map(|v| v.value())
                .unwrap_or(1);
            let mut dead = txn.open_table(DEAD).map_err(e)?;
            let mut retry = txn.open_table(RETRY).map_err(e)?;
            for mut l in letters {
                l.id = next;
                next += 1;
                let bytes = serde_json::to_vec(&l).map_err(e)?;
                dead.insert((l.destination.as_str(), l.id), bytes.as_slice())
                    .map_err(e)?;
                if let Some(p) = l.position {
                    retry.remove((l.destination.as_str(), p)).map_err(e)?;
                }
                ids.push(l.id);
            }
            meta.insert("next_id", next).map_err(e)?;
        }
        txn.commit().map_err(e)?;
        Ok(ids)
    }

    /// Dead letters of one destination (or all), oldest first.
    pub fn list(
        &self,
        destination: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DbError> {
        let txn = self.db.begin_read().map_err(e)?;
        let t = txn.open_table(DEAD).map_err(e)?;
        let mut out = Vec::new();
        let iter: Box<dyn Iterator<Item = _>> = match destination {
            Some(d) => Box::new(t.range((d, 0u64)..=(d, u64::MAX)).map_err(e)?),
            None => Box::new(t.iter().map_err(e)?),
        };
        for item in iter {
            let (_, v) = item.map_err(e)?;
            out.push(serde_json::from_slice(v.value()).map_err(e)?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    pub fn count(&self, destination: &str) -> Result<u64, DbError> {
        let txn = self.db.begin_read().map_err(e)?;
        let t = txn.open_table(DEAD).map_err(e)?;
        let n = t
            .range((destination, 0u64)..=(destination, u64::MAX))
            .map_err(e)?
            .count();
        Ok(n as u64)
    }

    /// Moves a destination's dead letters (that died at or after `since`) to its replay
    /// queue, atomically. Returns how many.
    pub fn replay(&self, destination: &str, since: Option<SystemTime>) -> Result<usize, DbError> {
        let since_ms = since.map(to_ms).unwrap_or(0);
        let txn = self.db.begin_write().map_err(e)?;
        let mut moved = 0;
        {
            let mut dead = txn.open_table(DEAD).map_err(e)?;
            let mut replay = txn.open_table(REPLAY).map_err(e)?;
            let mut picked = Vec::new();
            for item in dead
                .range((destination, 0u64)..=(destination, u64::MAX))
                .map_err(e)?
            {
                let (k, v) = item.map_err(e)?;
                let l: DeadLetter = serde_json::from_slice(v.value()).map_err(e)?;
                if l.dead_at_ms >= since_ms {
                    picked.push((k.value().1, v.value().to_vec()));
                }
            }
            for (id, bytes) in picked {
                dead.remove((destination, id)).map_err(e)?;
                replay
                    .insert((destination, id), bytes.as_slice())
                    .map_err(e)?;
                moved += 1;
            }
        }
        txn.commit().map_err(e)?;
        Ok(moved)
    }

    /// The replay queue of a destination, oldest first.
    pub fn replay_queue(&self, destination: &str) -> Result<Vec<DeadLetter>, DbError> {
        let txn = self.db.begin_read().map_err(e)?;
        let t = txn.open_table(REPLAY).map_err(e)?;
        let mut out = Vec::new();
        for item in t
            .range((destination, 0u64)..=(destination, u64::MAX))
            .map_err(e)?
        {
            let (_, v) = item.map_err(e)?;
            out.push(serde_json::from_slice(v.value()).map_err(e)?);
        }
        Ok(out)
    }

    /// Replayed events that are done (delivered, or dead again under a new id).
    pub fn replay_done(&self, destination: &str, ids: &[u64]) -> Result<(), DbError> {
        let txn = self.db.begin_write().map_err(e)?;
        {
            let mut t = txn.open_table(REPLAY).map_err(e)?;
            for id in ids {
                t.remove((destination, *id)).map_err(e)?;
            }
        }
        txn.commit().map_err(e)
    }

    /// Adds one strike to each event, named by its strike key (it was being processed
    /// when the process died, or when its worker panicked); returns the new counts.
    pub fn add_strikes(&self, events: &[(String, String)]) -> Result<Vec<u32>, DbError> {
        let txn = self.db.begin_write().map_err(e)?;
        let mut counts = Vec::with_capacity(events.len());
        {
            let mut t = txn.open_table(STRIKES).map_err(e)?;
            for (dest, key) in events {
                let n = t
                    .get((dest.as_str(), key.as_str()))
                    .map_err(e)?
                    .map(|v| v.value())
                    .unwrap_or(0)
                    + 1;
                t.insert((dest.as_str(), key.as_str()), n).map_err(e)?;
                counts.push(n);
            }
        }
        txn.commit().map_err(e)?;
        Ok(counts)
    }

    /// Strikes of a destination's events, by strike key.
    pub fn load_strikes(&self, destination: &str) -> Result<HashMap<String, u32>, DbError> {
        let txn = self.db.begin_read().map_err(e)?;
        let t = txn.open_table(STRIKES).map_err(e)?;
        let mut out = HashMap::new();
        for item in t.iter().map_err(e)? {
            let (k, v) = item.map_err(e)?;
            let (dest, key) = k.value();
            if dest == destination {
                out.insert(key.to_string(), v.value());
            }
        }
        Ok(out)
    }

    /// Forgets strikes of events that are finished.
    pub fn clear_strikes(&self, destination: &str, keys: &[String]) -> Result<(), DbError> {
        let txn = self.db.begin_write().map_err(e)?;
        {
            let mut t = txn.open_table(STRIKES).map_err(e)?;
            for k in keys {
                t.remove((destination, k.as_str())).map_err(e)?;
            }
        }
        txn.commit().map_err(e)
    }

    pub fn load_retry(&self, destination: &str) -> Result<HashMap<Position, RetryInfo>, DbError> {
        let txn = self.db.begin_read().map_err(e)?;
        let t = txn.open_table(RETRY).map_err(e)?;
        let mut out = HashMap::new();
        for item in t
            .range((destination, 0u64)..=(destination, u64::MAX))
            .map_err(e)?
        {
            let (k, v) = item.map_err(e)?;
            out.insert(k.value().1, serde_json::from_slice(v.value()).map_err(e)?);
        }
        Ok(out)
    }

    /// Applies retry-state changes (None removes) in one transaction.
    pub fn save_retry(
        &self,
        destination: &str,
        changes: &[(Position, Option<RetryInfo>)],
    ) -> Result<(), DbError> {
        let txn = self.db.begin_write().map_err(e)?;
        {
            let mut t = txn.open_table(RETRY).map_err(e)?;
            for (p, info) in changes {
                match info {
                    Some(i) => {
                        let bytes = serde_json::to_vec(i).map_err(e)?;
                        t.insert((destination, *p), bytes.as_slice()).map_err(e)?;
                    }
                    None => {
                        t.remove((destination, *p)).map_err(e)?;
                    }
                }
            }
        }
        txn.commit().map_err(e)
    }
}

/// Runs a redb call off the async runtime's threads.
async fn blocking<T: Send + 'static>(
    db: &Arc<RouterDb>,
    f: impl FnOnce(&RouterDb) -> Result<T, DbError> + Send + 'static,
) -> Result<T, DbError> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || f(&db))
        .await
        .map_err(|e| DbError(format!("router state task failed: {e}")))?
}

#[async_trait]
impl RouterState for Arc<RouterDb> {
    async fn add_dead_letters(&self, letters: Vec<DeadLetter>) -> Result<Vec<u64>, DbError> {
        blocking(self, move |db| db.add_dead_letters(letters)).await
    }
    async fn list(
        &self,
        destination: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DbError> {
        let d = destination.map(str::to_string);
        blocking(self, move |db| db.list(d.as_deref(), limit)).await
    }
    async fn count(&self, destination: &str) -> Result<u64, DbError> {
        let d = destination.to_string();
        blocking(self, move |db| db.count(&d)).await
    }
    async fn replay(&self, destination: &str, since: Option<SystemTime>) -> Result<usize, DbError> {
        let d = destination.to_string();
        blocking(self, move |db| db.replay(&d, since)).await
    }
    async fn replay_queue(&self, destination: &str) -> Result<Vec<DeadLetter>, DbError> {
        let d = destination.to_string();
        blocking(self, move |db| db.replay_queue(&d)).await
    }
    async fn replay_done(&self, destination: &str, ids: &[u64]) -> Result<(), DbError> {
        let (d, ids) = (destination.to_string(), ids.to_vec());
        blocking(self, move |db| db.replay_done(&d, &ids)).await
    }
    async fn add_strikes(&self, events: &[(String, String)]) -> Result<Vec<u32>, DbError> {
        let events = events.to_vec();
        blocking(self, move |db| db.add_strikes(&events)).await
    }
    async fn load_strikes(&self, destination: &str) -> Result<HashMap<String, u32>, DbError> {
        let d = destination.to_string();
        blocking(self, move |db| db.load_strikes(&d)).await
    }
    async fn clear_strikes(&self, destination: &str, keys: &[String]) -> Result<(), DbError> {
        let (d, keys) = (destination.to_string(), keys.to_vec());
        blocking(self, move |db| db.clear_strikes(&d, &keys)).await
    }
    async fn load_retry(&self, destination: &str) -> Result<HashMap<Position, RetryInfo>, DbError> {
        let d = destination.to_string();
        blocking(self, move |db| db.load_retry(&d)).await
    }
    async fn save_retry(
        &self,
        destination: &str,
        changes: &[(Position, Option<RetryInfo>)],
    ) -> Result<(), DbError> {
        let (d, changes) = (destination.to_string(), changes.to_vec());
        blocking(self, move |db| db.save_retry(&d, &changes)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared behaviour, then: it survives reopening the file.
    #[tokio::test]
    async fn dead_letters_replay_and_retry_state_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("router.redb");
        {
            let db = Arc::new(RouterDb::open(&path).unwrap());
            super::super::conformance::dead_letters_retry_state_and_strikes(&db, &db).await;
        }
        let db = RouterDb::open(&path).unwrap();
        assert_eq!(db.count("a").unwrap(), 1);
        assert_eq!(db.count("b").unwrap(), 1);
    }
}
