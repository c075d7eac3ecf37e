use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user@host:5432/db` (TLS with `sslmode=require`; secrets from
    /// `BALLAST_DESTINATIONS__<N>__URL`).
    pub url: String,
    /// The schema the tables go in; created if missing.
    pub schema: String,
    /// How long the oldest ready event waits for a fuller batch, at most: the router
    /// hands `deliver` a batch as soon as `batch_size` events are ready, else once the
    /// oldest of them has waited this long. See docs/DESTINATIONS.md.
    #[serde(
        default = "flush_interval",
        deserialize_with = "crate::units::duration"
    )]
    pub flush_interval: Duration,
    /// Event tables (one per track event name) the loader creates in the schema at most;
    /// the tracks of further names go to `tracks` only, their properties to the discards.
    #[serde(default = "max_tables")]
    pub max_tables: usize,
    /// Columns the loader lets the shared tables (`tracks`, `identifies`, `users`,
    /// `pages`, `screens`, `groups`, `aliases`) grow to, below PostgreSQL's 1,600 (which
    /// stays the limit of event tables): one event with thousands of context keys must
    /// not fill `tracks` for good. Values for columns past it go to the discards.
    #[serde(default = "max_shared_columns")]
    pub max_shared_columns: usize,
}

fn flush_interval() -> Duration {
    Duration::from_secs(30)
}

fn max_tables() -> usize {
    1000
}

fn max_shared_columns() -> usize {
    1000
}

#[derive(Debug, thiserror::Error)]
pub enum PostgresConfigError {
    #[error("invalid url: {0}")]
    Url(String),
    #[error("schema {0:?}: use 1-63 lowercase letters, digits or '_', not starting with a digit")]
    Schema(String),
    #[error("flush_interval must be between 1ms and 24h")]
    FlushInterval,
    #[error("max_shared_columns must be between 50 and 1600")]
    MaxSharedColumns,
    #[error("max_tables must be at most 100000")]
    MaxTables,
}

impl PostgresConfig {
    pub fn check(&self) -> Result<tokio_postgres::Config, PostgresConfigError> {
        let config: tokio_postgres::Config =
            self.url.parse().map_err(|e: tokio_postgres::Error| {
                PostgresConfigError::Url(format!("{e} (expected postgres://user@host:port/db)"))
            })?;
        if config.get_hosts().is_empty() {
            return Err(PostgresConfigError::Url("it names no host".into()));
        }
        let s = &self.schema;
        let ok = !s.is_empty()
            && s.len() <= 63
            && !s.starts_with(|c: char| c.is_ascii_digit())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !ok {
            return Err(PostgresConfigError::Schema(s.clone()));
        }
        if self.flush_interval.is_zero() || self.flush_interval > Duration::from_secs(86_400) {
            return Err(PostgresConfigError::FlushInterval);
        }
        if !(50..=super::sink::MAX_COLUMNS).contains(&self.max_shared_columns) {
            return Err(PostgresConfigError::MaxSharedColumns);
        }
        if self.max_tables > 100_000 {
            return Err(PostgresConfigError::MaxTables);
        }
        Ok(config)
    }
}

impl crate::destinations::registry::TypeConfig for PostgresConfig {
    fn check(&self) -> Result<(), String> {
        PostgresConfig::check(self)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn build(&self) -> Result<std::sync::Arc<dyn crate::destinations::Destination>, String> {
        self.build_named("")
    }

    fn build_named(
        &self,
        id: &str,
    ) -> Result<std::sync::Arc<dyn crate::destinations::Destination>, String> {
        Ok(std::sync::Arc::new(
            super::PostgresSink::named(self, id).map_err(|e| e.to_string())?,
        ))
    }

    fn flush_interval(&self) -> Option<Duration> {
        Some(self.flush_interval)
    }
}
