//! The `[storage]` section: which backend, the quota, the embedded log's segments, the
//! PostgreSQL database and its partitions.

use serde::Deserialize;

use crate::units::size;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    Embedded,
    Postgres,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    /// Quota: beyond it new events get 503. Nothing stored is removed to make room.
    #[serde(deserialize_with = "size")]
    pub max_bytes: u64,
    #[serde(deserialize_with = "size")]
    pub segment_bytes: u64,
    /// Zero-fill the active segment ahead of the records (fewer metadata writes per fsync).
    pub preallocate: bool,
    /// With `backend = "postgres"`: the database, e.g. `postgres://ballast@db/ballast`
    /// (secrets from `BALLAST_STORAGE__POSTGRES_URL`). Several hosts and
    /// `target_session_attrs=read-write` follow a failover to the new primary.
    pub postgres_url: Option<String>,
    /// With `backend = "postgres"`: how many partitions users are hashed into (positions,
    /// cursors and delivery leases are per partition). Fixed when the database is first
    /// used; a different value later is ignored with a warning.
    pub partitions: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: StorageBackend::Embedded,
            max_bytes: 10 << 30,
            segment_bytes: 64 << 20,
            preallocate: true,
            postgres_url: None,
            partitions: 16,
        }
    }
}
