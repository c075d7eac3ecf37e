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
}

fn flush_interval() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, thiserror::Error)]
pub enum PostgresConfigError {
    #[error("invalid url: {0}")]
    Url(String),
    #[error("schema {0:?}: use 1-63 lowercase letters, digits or '_', not starting with a digit")]
    Schema(String),
    #[error("flush_interval must be between 1ms and 24h")]
    FlushInterval,
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
        Ok(std::sync::Arc::new(
            super::PostgresSink::new(self).map_err(|e| e.to_string())?,
        ))
    }

    fn flush_interval(&self) -> Option<Duration> {
        Some(self.flush_interval)
    }
}
