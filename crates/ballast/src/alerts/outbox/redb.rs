//! The outbox in `<data_dir>/alerts.redb` (embedded store): each `raise` is one redb
//! write transaction (fsynced at commit).

use std::path::Path;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{Entry, Outbox, Raise, READ_LIMIT};
use crate::alerts::{e, Action, AlertError};

const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const SEEN: TableDefinition<&str, u64> = TableDefinition::new("seen");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Conditions triggered and not yet resolved: key → when triggered (ms). Lets a later
/// run resolve what an earlier one raised (fsync failure, full storage).
const OPEN: TableDefinition<&str, u64> = TableDefinition::new("open");

pub struct RedbOutbox {
    db: Database,
}

impl RedbOutbox {
    pub fn open(path: &Path) -> Result<RedbOutbox, AlertError> {
        let db = Database::create(path).map_err(e)?;
        let txn = db.begin_write().map_err(e)?;
        {
            txn.open_table(OUTBOX).map_err(e)?;
            txn.open_table(SEEN).map_err(e)?;
            txn.open_table(META).map_err(e)?;
            txn.open_table(OPEN).map_err(e)?;
        }
        txn.commit().map_err(e)?;
        Ok(RedbOutbox { db })
    }
}

impl Outbox for RedbOutbox {
    fn raise(&self, r: &Raise<'_>) -> Result<bool, AlertError> {
        let txn = self.db.begin_write().map_err(e)?;
        let fresh;
        {
            let mut seen = txn.open_table(SEEN).map_err(e)?;
            fresh = seen.get(r.idempotency).map_err(e)?.is_none();
            if fresh {
                let mut meta = txn.open_table(META).map_err(e)?;
                let mut next = meta.get("next").map_err(e)?.map(|v| v.value()).unwrap_or(1);
                let mut outbox = txn.open_table(OUTBOX).map_err(e)?;
                for entry in r.entries {
                    let bytes = serde_json::to_vec(entry).map_err(e)?;
                    outbox.insert(next, bytes.as_slice()).map_err(e)?;
                    next += 1;
                }
                meta.insert("next", next).map_err(e)?;
                seen.insert(r.idempotency, r.at_ms).map_err(e)?;
                let mut open = txn.open_table(OPEN).map_err(e)?;
                match r.action {
                    Action::Trigger => {
                        open.insert(r.condition, r.at_ms).map_err(e)?;
                    }
                    Action::Resolve => {
                        open.remove(r.condition).map_err(e)?;
                    }
                }
            }
        }
        txn.commit().map_err(e)?;
        Ok(fresh)
    }

    fn open_since(&self, condition: &str) -> Result<Option<u64>, AlertError> {
        let txn = self.db.begin_read().map_err(e)?;
        let t = txn.open_table(OPEN).map_err(e)?;
        Ok(t.get(condition).map_err(e)?.map(|v| v.value()))
    }

    fn open_conditions(&self) -> Result<Vec<(String, u64)>, AlertError> {
        let txn = self.db.begin_read().map_err(e)?;
        let t = txn.open_table(OPEN).map_err(e)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(e)? {
            let (k, v) = item.map_err(e)?;
            out.push((k.value().to_string(), v.value()));
        }
        Ok(out)
    }

    fn pending(&self) -> Result<usize, AlertError> {
        let txn = self.db.begin_read().map_err(e)?;
        let t = txn.open_table(OUTBOX).map_err(e)?;
        Ok(t.len().map_err(e)? as usize)
    }

    fn entries(&self) -> Result<Vec<(u64, Entry)>, AlertError> {
        let txn = self.db.begin_read().map_err(e)?;
        let t = txn.open_table(OUTBOX).map_err(e)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(e)?.take(READ_LIMIT) {
            let (k, v) = item.map_err(e)?;
            out.push((k.value(), serde_json::from_slice(v.value()).map_err(e)?));
        }
        Ok(out)
    }

    fn finish(&self, id: u64) -> Result<(), AlertError> {
        let txn = self.db.begin_write().map_err(e)?;
        txn.open_table(OUTBOX).map_err(e)?.remove(id).map_err(e)?;
        txn.commit().map_err(e)
    }

    fn reschedule(&self, id: u64, entry: &Entry) -> Result<(), AlertError> {
        let txn = self.db.begin_write().map_err(e)?;
        {
            let bytes = serde_json::to_vec(entry).map_err(e)?;
            txn.open_table(OUTBOX)
                .map_err(e)?
                .insert(id, bytes.as_slice())
                .map_err(e)?;
        }
        txn.commit().map_err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_the_outbox_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.redb");
        {
            let outbox = RedbOutbox::open(&path).unwrap();
            super::super::conformance::raise_send_and_conditions(&outbox, &outbox);
        }
        // Durable: what was written is there after reopening.
        let outbox = RedbOutbox::open(&path).unwrap();
        super::super::conformance::after_reopen(&outbox);
    }
}
