//! One serde model of the TOML configuration, `BALLAST_*` environment overrides and
//! validation. Each part below this module owns its section's types
//! (`recovery::RecoveryConfig`, `alerts::AlertsConfig`, `destinations::DestinationConfig`,
//! `store::StorageConfig`); this module aggregates them, holds the sections of the parts
//! above it (server, sources), and checks what spans sections. The override engine is
//! `env.rs`.
//!
//! Every key can be set from the environment as `BALLAST_<SECTION>__<KEY>` (nested with
//! further `__`, array elements by index: `BALLAST_SOURCES__0__WRITE_KEY`). Unknown keys,
//! in the file or the environment, are errors that name the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::alerts::AlertsConfig;
use crate::destinations::DestinationConfig;
use crate::recovery::RecoveryConfig;
use crate::store::{StorageBackend, StorageConfig};
use crate::transform::{TransformSettings, TransformationConfig};
use crate::units::{duration, size, size_usize};

mod env;
#[cfg(test)]
mod tests;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The I/O error is in the message, not a `source()` (it would print twice).
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    #[serde(default)]
    pub destinations: Vec<DestinationConfig>,
    #[serde(default)]
    pub recovery: RecoveryConfig,
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// The worker pool running user transformations, and its limits.
    #[serde(default)]
    pub transform: TransformSettings,
    /// User transformations (JavaScript) that destinations name.
    #[serde(default)]
    pub transformations: Vec<TransformationConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Bearer token of the admin API. Required when `admin_listen` is not a loopback
    /// address (see [`ServerConfig::check_admin_access`]).
    pub admin_token: Option<String>,
    /// Whether `GET /metrics` on the admin port needs the token too (default true). Set
    /// it to false to let Prometheus scrape without one; every other admin call, reading
    /// or changing state, still needs the token.
    pub metrics_require_token: bool,
    pub data_dir: PathBuf,
    #[serde(deserialize_with = "size_usize")]
    pub max_request_bytes: usize,
    /// "text" or "json".
    pub log_format: LogFormat,
    /// How long a graceful shutdown waits for in-flight requests.
    #[serde(deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
    /// After SIGTERM, keep serving this long with `/readyz` answering 503 before the
    /// listeners close (for load balancers that go by readiness; default 0: Kubernetes
    /// takes the pod out of its Services itself, the chart pauses in preStop).
    #[serde(deserialize_with = "duration")]
    pub shutdown_delay: Duration,
    /// From the first byte of a request to the end of its headers (slowloris).
    #[serde(deserialize_with = "duration")]
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in progress is closed after this.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// A request body must arrive within this, extended by one second per
    /// `body_min_rate` bytes received (a minimum rate); else 408 and the connection closes.
    #[serde(deserialize_with = "duration")]
    pub body_read_timeout: Duration,
    /// Bytes per second that extend `body_read_timeout` (0: a fixed whole-body deadline).
    #[serde(deserialize_with = "size")]
    pub body_min_rate: u64,
    /// Open connections on the public listener at most; past it new clients wait in the
    /// kernel's accept queue. Lowered at start to fit `RLIMIT_NOFILE` minus `fd_reserve`.
    pub max_connections: usize,
    /// The same for the admin listener.
    pub admin_max_connections: usize,
    /// File descriptors kept for the event log, the alert outbox and the destinations:
    /// the connection caps leave this many free beyond those open at start.
    pub fd_reserve: u64,
    /// How often the status page's history (the last hour, in memory) is sampled.
    #[serde(deserialize_with = "duration")]
    pub history_interval: Duration,
    /// `/livez` answers 503 once the accept loop or the log writer has made no progress
    /// for this long while work waits (0: never).
    #[serde(deserialize_with = "duration")]
    pub liveness_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            admin_token: None,
            metrics_require_token: true,
            data_dir: PathBuf::from("./ballast-data"),
            max_request_bytes: 4_096_000,
            log_format: LogFormat::Text,
            shutdown_timeout: Duration::from_secs(30),
            shutdown_delay: Duration::ZERO,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            body_read_timeout: Duration::from_secs(10),
            body_min_rate: 1024,
            max_connections: 10_000,
            admin_max_connections: 64,
            fd_reserve: 256,
            history_interval: Duration::from_secs(10),
            liveness_timeout: Duration::from_secs(60),
        }
    }
}

impl ServerConfig {
    /// The admin API changes state (running mode, dead-letter replay) and shows event
    /// payloads (dead letters): reachable from other hosts, it must have a token. A
    /// token that is set must not be blank. Checked at load and again by `serve` after
    /// its `--admin-listen` override.
    pub fn check_admin_access(&self) -> Result<(), ConfigError> {
        match self.admin_token.as_deref() {
            Some(t) if t.trim().is_empty() => Err(ConfigError::Invalid(
                "server.admin_token is set but empty (set a real token, or remove it)".into(),
            )),
            None if !self.admin_listen.ip().is_loopback() => Err(ConfigError::Invalid(format!(
                "server.admin_listen = \"{}\" is not a loopback address, so other hosts can \
                 reach the admin API: set server.admin_token (or BALLAST_SERVER__ADMIN_TOKEN)",
                self.admin_listen
            ))),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub id: String,
    pub write_key: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Optional display name (shown in `/sourceConfig`).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// An event whose messageId this source stored within this window is answered 200
    /// and not stored again (`"0s"`: off). Default 1 h.
    #[serde(default = "dedup_window", deserialize_with = "duration")]
    pub dedup_window: Duration,
    /// At most this many messageIds remembered for the window (about 170 bytes each);
    /// beyond it the oldest are forgotten early. Default 1,000,000.
    #[serde(default = "dedup_max_ids")]
    pub dedup_max_ids: usize,
}

fn dedup_window() -> Duration {
    Duration::from_secs(3600)
}

fn dedup_max_ids() -> usize {
    1_000_000
}

/// Token bucket per source: requests beyond it get 429.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_second: f64,
    #[serde(default)]
    pub burst: Option<f64>,
}

fn yes() -> bool {
    true
}

impl Config {
    /// Reads a file, applies the environment, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let mut config = Config::from_toml(&text, &path.display().to_string(), std::env::vars())?;
        if let Some(dir) = path.parent() {
            crate::transform::resolve_files(&mut config.transformations, dir);
        }
        Ok(config)
    }

    /// Parses TOML text, applies `BALLAST_*` variables from `env`, validates.
    pub fn from_toml(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut value: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        let from_env = env::apply(&mut value, env)?;
        let origin = if from_env.is_empty() {
            origin.to_string()
        } else {
            format!("{origin} (with {})", from_env.join(", "))
        };
        let config: Config =
            Config::deserialize(toml::Value::Table(value)).map_err(|e| ConfigError::Parse {
                path: origin,
                message: e.to_string().trim().to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.server.history_interval < Duration::from_millis(100) {
            return Err(ConfigError::Invalid(format!(
                "server.history_interval {:?} is below 100ms",
                self.server.history_interval
            )));
        }
        let mut ids = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        for s in &self.sources {
            if s.id.trim().is_empty() {
                return Err(ConfigError::Invalid("a source has an empty id".into()));
            }
            if s.write_key.trim().is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "source {:?} has an empty write_key",
                    s.id
                )));
            }
            if s.id.len() > 255 {
                return Err(ConfigError::Invalid(format!(
                    "source id {:?} is longer than 255 bytes",
                    s.id
                )));
            }
            if !ids.insert(&s.id) {
                return Err(ConfigError::Invalid(format!(
                    "duplicate source id {:?}",
                    s.id
                )));
            }
            if !keys.insert(&s.write_key) {
                return Err(ConfigError::Invalid(format!(
                    "source {:?} reuses another source's write_key",
                    s.id
                )));
            }
            if let Some(r) = s.rate_limit {
                if r.requests_per_second.is_nan() || r.requests_per_second <= 0.0 {
                    return Err(ConfigError::Invalid(format!(
                        "source {:?}: rate_limit.requests_per_second must be positive",
                        s.id
                    )));
                }
            }
        }
        let mut dest_ids = std::collections::HashSet::new();
        for d in &self.destinations {
            let ok_id = !d.id.is_empty()
                && d.id.len() <= 100
                && d.id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok_id {
                return Err(ConfigError::Invalid(format!(
                    "destination id {:?}: use 1-100 letters, digits, '-' or '_'",
                    d.id
                )));
            }
            if !dest_ids.insert(&d.id) {
                return Err(ConfigError::Invalid(format!(
                    "duplicate destination id {:?}",
                    d.id
                )));
            }
            if d.sources.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "destination {:?} has no sources",
                    d.id
                )));
            }
            for s in &d.sources {
                if !ids.contains(s) {
                    return Err(ConfigError::Invalid(format!(
                        "destination {:?} names unknown source {s:?}",
                        d.id
                    )));
                }
            }
            if d.concurrency == 0 || d.concurrency > 10_000 {
                return Err(ConfigError::Invalid(format!(
                    "destination {:?}: concurrency must be 1..=10000",
                    d.id
                )));
            }
            if d.batch_size == 0 || d.batch_size > 10_000 {
                return Err(ConfigError::Invalid(format!(
                    "destination {:?}: batch_size must be 1..=10000",
                    d.id
                )));
            }
            if d.retry.min_backoff > d.retry.max_backoff {
                return Err(ConfigError::Invalid(format!(
                    "destination {:?}: retry.min_backoff is above retry.max_backoff",
                    d.id
                )));
            }
            if let Err(e) = d.kind.settings().check() {
                return Err(ConfigError::Invalid(format!("destination {:?}: {e}", d.id)));
            }
        }
        crate::transform::validate(&self.transformations, &self.transform, &self.destinations)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.recovery.crash_threshold == 0 || self.recovery.poison_threshold == 0 {
            return Err(ConfigError::Invalid(
                "recovery.crash_threshold and recovery.poison_threshold must be at least 1".into(),
            ));
        }
        if self.server.max_request_bytes == 0 {
            return Err(ConfigError::Invalid(
                "server.max_request_bytes must be positive".into(),
            ));
        }
        if self.storage.partitions == 0 || self.storage.partitions > crate::store::MAX_PARTITIONS {
            return Err(ConfigError::Invalid(format!(
                "storage.partitions must be 1..={}",
                crate::store::MAX_PARTITIONS
            )));
        }
        let s = &self.server;
        for (name, d) in [
            ("header_read_timeout", s.header_read_timeout),
            ("idle_timeout", s.idle_timeout),
            ("body_read_timeout", s.body_read_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Invalid(format!(
                    "server.{name} must be positive"
                )));
            }
        }
        if s.max_connections == 0 || s.admin_max_connections == 0 {
            return Err(ConfigError::Invalid(
                "server.max_connections and server.admin_max_connections must be at least 1".into(),
            ));
        }
        if self.storage.backend == StorageBackend::Postgres && self.storage.postgres_url.is_none() {
            return Err(ConfigError::Invalid(
                "storage.backend = \"postgres\" needs storage.postgres_url".into(),
            ));
        }
        self.server.check_admin_access()?;
        if self.storage.segment_bytes < 4096 {
            return Err(ConfigError::Invalid(
                "storage.segment_bytes must be at least 4KiB".into(),
            ));
        }
        Ok(())
    }
}
