//! One serde model of the TOML configuration, `BALLAST_*` environment overrides and
//! validation.
//!
//! Every key can be set from the environment as `BALLAST_<SECTION>__<KEY>` (nested with
//! further `__`, array elements by index: `BALLAST_SOURCES__0__WRITE_KEY`). Unknown keys,
//! in the file or the environment, are errors that name the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

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
}

/// Crash-loop detection and poison events (see docs/OPERATIONS.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecoveryConfig {
    /// This many crashes within `crash_window` put the server in degraded mode at start.
    pub crash_threshold: u32,
    #[serde(deserialize_with = "duration")]
    pub crash_window: Duration,
    /// An event in flight at this many crashes (or worker panics) is quarantined.
    pub poison_threshold: u32,
    /// Leave degraded mode by itself after this long without a crash (off by default).
    #[serde(default, deserialize_with = "optional_duration")]
    pub degraded_quiet_period: Option<Duration>,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            crash_threshold: 5,
            crash_window: Duration::from_secs(300),
            poison_threshold: 3,
            degraded_quiet_period: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// A destination's "aborting events" alert resolves once the destination has
    /// delivered again and aborted nothing for this long (default 1h).
    #[serde(default = "aborts_clear_after", deserialize_with = "duration")]
    pub aborts_clear_after: Duration,
    /// Names this server in alerts (default: the host name).
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub pagerduty: Option<crate::alerts::pagerduty::PagerDutyConfig>,
    #[serde(default)]
    pub victorops: Option<crate::alerts::victorops::VictorOpsConfig>,
    #[serde(default)]
    pub slack: Option<crate::alerts::slack::SlackConfig>,
    #[serde(default)]
    pub webhook: Vec<crate::alerts::webhook::WebhookAlertConfig>,
}

fn aborts_clear_after() -> Duration {
    Duration::from_secs(3600)
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            aborts_clear_after: aborts_clear_after(),
            source: None,
            pagerduty: None,
            victorops: None,
            slack: None,
            webhook: Vec::new(),
        }
    }
}

/// A destination: the keys every type shares, and its type's own settings (checked
/// against that type's keys, so a misspelt key is still an error that names it).
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    pub id: String,
    pub sources: Vec<String>,
    pub enabled: bool,
    /// Deliveries in flight at once (default 16).
    pub concurrency: usize,
    /// Events per delivery (default 1; webhook sends a JSON array when > 1).
    pub batch_size: usize,
    pub retry: RetryConfig,
    pub kind: DestinationKind,
}

#[derive(Debug, Clone)]
pub enum DestinationKind {
    Webhook(crate::destinations::webhook::WebhookConfig),
    File(crate::destinations::file::FileConfig),
}

impl DestinationKind {
    pub fn name(&self) -> &'static str {
        match self {
            DestinationKind::Webhook(_) => "webhook",
            DestinationKind::File(_) => "file",
        }
    }
}

/// When to give up on an event: after at least `max_attempts` failures *and* once its
/// first attempt is older than `retry_window`. Backoff doubles from `min_backoff` to
/// `max_backoff`, with jitter; a `Retry-After` answer is honoured.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub max_attempts: u32,
    #[serde(deserialize_with = "duration")]
    pub retry_window: Duration,
    #[serde(deserialize_with = "duration")]
    pub min_backoff: Duration,
    #[serde(deserialize_with = "duration")]
    pub max_backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 3,
            retry_window: Duration::from_secs(180 * 60),
            min_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(300),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommonDestination {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    sources: Vec<String>,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    concurrency: Option<usize>,
    #[serde(default)]
    batch_size: Option<usize>,
    #[serde(default)]
    retry: RetryConfig,
}

const COMMON_DESTINATION_KEYS: [&str; 7] = [
    "id",
    "type",
    "sources",
    "enabled",
    "concurrency",
    "batch_size",
    "retry",
];

impl<'de> Deserialize<'de> for DestinationConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = toml::Table::deserialize(d)?;
        let mut common = toml::Table::new();
        for k in COMMON_DESTINATION_KEYS {
            if let Some(v) = table.remove(k) {
                common.insert(k.to_string(), v);
            }
        }
        let c = CommonDestination::deserialize(toml::Value::Table(common))
            .map_err(|e| D::Error::custom(format!("destination: {}", e.to_string().trim())))?;
        let own = toml::Value::Table(table);
        let context = |e: toml::de::Error| {
            D::Error::custom(format!(
                "destination {:?} (type {}): {}",
                c.id,
                c.kind,
                e.to_string().trim()
            ))
        };
        let kind = match c.kind.as_str() {
            "webhook" => DestinationKind::Webhook(
                crate::destinations::webhook::WebhookConfig::deserialize(own).map_err(context)?,
            ),
            "file" => DestinationKind::File(
                crate::destinations::file::FileConfig::deserialize(own).map_err(context)?,
            ),
            other => {
                return Err(D::Error::custom(format!(
                    "destination {:?}: unknown type {other:?} (known: webhook, file)",
                    c.id
                )))
            }
        };
        Ok(DestinationConfig {
            id: c.id,
            sources: c.sources,
            enabled: c.enabled,
            concurrency: c.concurrency.unwrap_or(16),
            // A file takes many lines per write and fsync at no cost to anyone; a
            // webhook receiver may expect one event per request.
            batch_size: c.batch_size.unwrap_or(match kind {
                DestinationKind::File(_) => 100,
                DestinationKind::Webhook(_) => 1,
            }),
            retry: c.retry,
            kind,
        })
    }
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

/// Accepts `"10s"`, `"5m"`, `"1h 30m"` (humantime) or a number of seconds.
pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Secs(u64),
    }
    match Raw::deserialize(d)? {
        Raw::Text(s) => humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}"))),
        Raw::Secs(n) => Ok(Duration::from_secs(n)),
    }
}

pub(crate) fn optional_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// Accepts `"64MiB"`, `"10GiB"`, `"500 MB"` or a number of bytes.
pub(crate) fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Bytes(u64),
    }
    match Raw::deserialize(d)? {
        Raw::Text(s) => s
            .trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| b.as_u64())
            .map_err(|e| serde::de::Error::custom(format!("invalid size {s:?}: {e}"))),
        Raw::Bytes(n) => Ok(n),
    }
}

fn size_usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = size(d)?;
    usize::try_from(n).map_err(|_| serde::de::Error::custom(format!("size {n} is too large")))
}

impl Config {
    /// Reads a file, applies the environment, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Config::from_toml(&text, &path.display().to_string(), std::env::vars())
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
        let mut from_env = Vec::new();
        for (var, raw) in env {
            let Some(rest) = var.strip_prefix("BALLAST_") else {
                continue;
            };
            if !rest.contains("__") {
                continue; // e.g. BALLAST_ADMIN_TOKEN, read by the CLI
            }
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            set_path(&mut value, &path, &raw).map_err(|message| ConfigError::Env {
                var: var.clone(),
                message,
            })?;
            from_env.push(var);
        }
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
            let kind = match &d.kind {
                DestinationKind::Webhook(c) => c.check().map(|_| ()).map_err(|e| e.to_string()),
                DestinationKind::File(c) => c.check(),
            };
            if let Err(e) = kind {
                return Err(ConfigError::Invalid(format!("destination {:?}: {e}", d.id)));
            }
        }
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

/// Sets `path` in `table` to the environment value `raw`. The value is typed like the
/// value it replaces (a string stays a string); new values are read as a TOML boolean,
/// integer, float, array or inline table when they parse as one, else as a string.
fn set_path(table: &mut toml::Table, path: &[String], raw: &str) -> Result<(), String> {
    set_path_in(table, path, raw, is_text_key(path))
}

fn set_path_in(
    table: &mut toml::Table,
    path: &[String],
    raw: &str,
    text: bool,
) -> Result<(), String> {
    let (first, rest) = path.split_first().ok_or("empty key")?;
    if first.is_empty() {
        return Err("empty key segment".into());
    }
    if rest.is_empty() {
        let typed = typed_value(table.get(first.as_str()), raw, text);
        table.insert(first.clone(), typed);
        return Ok(());
    }
    let next_is_index = rest[0].parse::<usize>().is_ok();
    let entry = table.entry(first.clone()).or_insert_with(|| {
        if next_is_index {
            toml::Value::Array(Vec::new())
        } else {
            toml::Value::Table(toml::Table::new())
        }
    });
    set_in_value(entry, rest, raw, text)
}

fn set_in_value(
    value: &mut toml::Value,
    path: &[String],
    raw: &str,
    text: bool,
) -> Result<(), String> {
    match value {
        toml::Value::Table(t) => set_path_in(t, path, raw, text),
        toml::Value::Array(items) => {
            let (first, rest) = path.split_first().ok_or("empty key")?;
            let idx: usize = first
                .parse()
                .map_err(|_| format!("{first:?} is not an array index"))?;
            if idx > items.len() {
                return Err(format!(
                    "index {idx} skips elements (array has {})",
                    items.len()
                ));
            }
            if idx == items.len() {
                items.push(toml::Value::Table(toml::Table::new()));
            }
            if rest.is_empty() {
                items[idx] = typed_value(Some(&items[idx]), raw, text);
                return Ok(());
            }
            set_in_value(&mut items[idx], rest, raw, text)
        }
        _ => Err("a plain value cannot have sub-keys".into()),
    }
}

/// Settings that are text whatever they look like (a token of digits is still a token),
/// by their key; every key under a `headers` table is text too.
const TEXT_KEYS: &[&str] = &[
    "id",
    "write_key",
    "admin_token",
    "routing_key",
    "api_key",
    "url",
    "base_url",
    "source",
    "method",
    "path",
    "data_dir",
    "postgres_url",
    "listen",
    "admin_listen",
    "name",
];

fn is_text_key(path: &[String]) -> bool {
    let leaf = path.last().map(String::as_str).unwrap_or_default();
    TEXT_KEYS.contains(&leaf) || path.iter().rev().skip(1).any(|s| s == "headers")
}

fn typed_value(existing: Option<&toml::Value>, raw: &str, text: bool) -> toml::Value {
    if text || matches!(existing, Some(toml::Value::String(_))) {
        return toml::Value::String(raw.to_string());
    }
    let parsed: Result<toml::Table, _> = toml::from_str(&format!("v = {raw}"));
    match parsed.ok().and_then(|mut t| t.remove("v")) {
        Some(v) => v,
        None => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[server]
listen = "127.0.0.1:9999"
data_dir = "/tmp/x"

[storage]
max_bytes = "1GiB"
segment_bytes = "64MiB"

[[sources]]
id = "web"
write_key = "k1"
"#;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn parses_sizes_and_defaults() {
        let c = Config::from_toml(BASE, "t", env(&[])).unwrap();
        assert_eq!(c.storage.max_bytes, 1 << 30);
        assert_eq!(c.storage.segment_bytes, 64 << 20);
        assert_eq!(c.server.max_request_bytes, 4_096_000);
        assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:8081");
        assert!(c.sources[0].enabled);
    }

    #[test]
    fn unknown_key_names_the_key() {
        let text = format!("{BASE}\n[storage2]\nx = 1\n");
        let e = Config::from_toml(&text, "t", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("storage2"), "{e}");
        let text = BASE.replace("data_dir", "data_dri");
        let e = Config::from_toml(&text, "t", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("data_dri"), "{e}");
        let e = Config::from_toml(BASE, "t", env(&[("BALLAST_SERVER__LISTN", "x")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("listn") && e.contains("BALLAST_SERVER__LISTN"),
            "{e}"
        );
    }

    #[test]
    fn environment_overrides() {
        let c = Config::from_toml(
            BASE,
            "t",
            env(&[
                ("BALLAST_SERVER__LISTEN", "127.0.0.1:1234"),
                ("BALLAST_STORAGE__MAX_BYTES", "2GiB"),
                ("BALLAST_SERVER__MAX_REQUEST_BYTES", "1000"),
                ("BALLAST_SOURCES__0__WRITE_KEY", "123"),
                ("BALLAST_SOURCES__1__ID", "app"),
                ("BALLAST_SOURCES__1__WRITE_KEY", "k2"),
                ("BALLAST_SOURCES__1__ENABLED", "false"),
                ("BALLAST_ADMIN_TOKEN", "not-a-config-key"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:1234");
        assert_eq!(c.storage.max_bytes, 2 << 30);
        assert_eq!(c.server.max_request_bytes, 1000);
        assert_eq!(c.sources[0].write_key, "123");
        assert_eq!(c.sources[1].id, "app");
        assert!(!c.sources[1].enabled);
        let c = Config::from_toml(
            BASE,
            "t",
            env(&[("BALLAST_SERVER__MAX_REQUEST_BYTES", "4MiB")]),
        )
        .unwrap();
        assert_eq!(c.server.max_request_bytes, 4 << 20);
    }

    #[test]
    fn connection_limits_have_defaults_and_come_from_file_or_environment() {
        let c = Config::from_toml(BASE, "t", env(&[])).unwrap();
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.server.idle_timeout, Duration::from_secs(75));
        assert_eq!(c.server.body_read_timeout, Duration::from_secs(10));
        assert_eq!(c.server.body_min_rate, 1024);
        assert_eq!(c.server.max_connections, 10_000);
        assert_eq!(c.server.fd_reserve, 256);
        let text = BASE.replace(
            "data_dir = \"/tmp/x\"",
            "data_dir = \"/tmp/x\"\nheader_read_timeout = \"2s\"\nbody_min_rate = \"4KiB\"",
        );
        let c = Config::from_toml(
            &text,
            "t",
            env(&[
                ("BALLAST_SERVER__IDLE_TIMEOUT", "30s"),
                ("BALLAST_SERVER__MAX_CONNECTIONS", "500"),
                ("BALLAST_SERVER__BODY_READ_TIMEOUT", "3"),
                ("BALLAST_SERVER__FD_RESERVE", "64"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(2));
        assert_eq!(c.server.body_min_rate, 4096);
        assert_eq!(c.server.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.server.max_connections, 500);
        assert_eq!(c.server.body_read_timeout, Duration::from_secs(3));
        assert_eq!(c.server.fd_reserve, 64);
        let e = Config::from_toml(BASE, "t", env(&[("BALLAST_SERVER__MAX_CONNECTIONS", "0")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_connections"), "{e}");
        let e = Config::from_toml(BASE, "t", env(&[("BALLAST_SERVER__IDLE_TIMEOUT", "0s")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("idle_timeout"), "{e}");
    }

    /// Secrets come from the environment whatever they look like, also when the file
    /// does not set them (no string there to take the type from).
    #[test]
    fn text_settings_from_the_environment_stay_text() {
        let vars = [
            ("BALLAST_SERVER__ADMIN_TOKEN", "12345678"),
            ("BALLAST_SOURCES__1__ID", "2024"),
            ("BALLAST_SOURCES__1__WRITE_KEY", "true"),
            ("BALLAST_ALERTS__PAGERDUTY__ROUTING_KEY", "1979-05-27"),
        ];
        // With an unknown key besides: the error names it.
        let with_typo = [&vars[..], &[("BALLAST_ALERTS__VICTORIA__X", "1")]].concat();
        let err = Config::from_toml(BASE, "t", env(&with_typo))
            .unwrap_err()
            .to_string();
        assert!(err.contains("victoria"), "{err}");
        let c = Config::from_toml(BASE, "t", env(&vars)).unwrap();
        assert_eq!(c.server.admin_token.as_deref(), Some("12345678"));
        assert_eq!(c.sources[1].id, "2024");
        assert_eq!(c.sources[1].write_key, "true");
        assert_eq!(
            c.alerts.pagerduty.as_ref().map(|p| p.routing_key.as_str()),
            Some("1979-05-27")
        );
    }

    #[test]
    fn validation() {
        let dup = format!("{BASE}\n[[sources]]\nid = \"web\"\nwrite_key = \"k2\"\n");
        assert!(Config::from_toml(&dup, "t", env(&[]))
            .unwrap_err()
            .to_string()
            .contains("duplicate"));
        let bad = BASE.replace("\"1GiB\"", "\"lots\"");
        assert!(Config::from_toml(&bad, "t", env(&[]))
            .unwrap_err()
            .to_string()
            .contains("lots"));
    }

    #[test]
    fn destinations_parse_and_check_their_own_keys() {
        let text = format!(
            r#"{BASE}
[[destinations]]
id = "hook"
type = "webhook"
sources = ["web"]
url = "http://127.0.0.1:9000/x"
headers = {{ "X-Token" = "s" }}
concurrency = 4
retry = {{ max_attempts = 5, retry_window = "1m", min_backoff = "1s", max_backoff = "2s" }}

[[destinations]]
id = "archive"
type = "file"
sources = ["web"]
path = "/tmp/out.jsonl"
"#
        );
        let c = Config::from_toml(&text, "t", env(&[])).unwrap();
        assert_eq!(c.destinations.len(), 2);
        assert_eq!(c.destinations[0].concurrency, 4);
        assert_eq!(c.destinations[0].retry.max_attempts, 5);
        assert_eq!(c.destinations[1].retry.max_attempts, 3);
        assert_eq!(c.destinations[1].kind.name(), "file");
        let typo = text.replace("url =", "ulr =");
        let e = Config::from_toml(&typo, "t", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ulr") && e.contains("hook"), "{e}");
        let unknown_src = text.replace("sources = [\"web\"]\npath", "sources = [\"nope\"]\npath");
        let e = Config::from_toml(&unknown_src, "t", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        let bad_type = text.replace("type = \"file\"", "type = \"ftp\"");
        let e = Config::from_toml(&bad_type, "t", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ftp"), "{e}");
    }

    #[test]
    fn admin_api_off_loopback_needs_a_token() {
        let open = BASE.replace(
            "data_dir = \"/tmp/x\"",
            "data_dir = \"/tmp/x\"\nadmin_listen = \"0.0.0.0:8081\"",
        );
        let e = Config::from_toml(&open, "t", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("admin_token") && e.contains("0.0.0.0:8081"),
            "{e}"
        );
        let c = Config::from_toml(
            &open,
            "t",
            env(&[("BALLAST_SERVER__ADMIN_TOKEN", "s3cret")]),
        )
        .unwrap();
        assert_eq!(c.server.admin_token.as_deref(), Some("s3cret"));
        assert!(c.server.metrics_require_token);
        let e = Config::from_toml(&open, "t", env(&[("BALLAST_SERVER__ADMIN_TOKEN", " ")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
        let ipv6 = open.replace("0.0.0.0:8081", "[::]:8081");
        assert!(Config::from_toml(&ipv6, "t", env(&[])).is_err());
        // Loopback (v4 or v6) needs none.
        let local = open.replace("0.0.0.0:8081", "[::1]:8081");
        Config::from_toml(&local, "t", env(&[])).unwrap();
        Config::from_toml(BASE, "t", env(&[])).unwrap();
        let c = Config::from_toml(
            BASE,
            "t",
            env(&[("BALLAST_SERVER__METRICS_REQUIRE_TOKEN", "false")]),
        )
        .unwrap();
        assert!(!c.server.metrics_require_token);
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../../../examples/ballast.toml");
        Config::from_toml(text, "examples/ballast.toml", env(&[])).unwrap();
    }
}
