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
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<String>,
    pub data_dir: PathBuf,
    pub max_request_bytes: usize,
    /// "text" or "json".
    pub log_format: LogFormat,
    /// How long a graceful shutdown waits for in-flight requests.
    #[serde(deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            admin_token: None,
            data_dir: PathBuf::from("./ballast-data"),
            max_request_bytes: 4_096_000,
            log_format: LogFormat::Text,
            shutdown_timeout: Duration::from_secs(30),
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
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: StorageBackend::Embedded,
            max_bytes: 10 << 30,
            segment_bytes: 64 << 20,
            preallocate: true,
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
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
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

/// Accepts `"64MiB"`, `"10GiB"`, `"500 MB"` or a number of bytes.
fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
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

impl Config {
    /// Reads a file, applies the environment, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
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
        if self.server.max_request_bytes == 0 {
            return Err(ConfigError::Invalid(
                "server.max_request_bytes must be positive".into(),
            ));
        }
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
    let (first, rest) = path.split_first().ok_or("empty key")?;
    if first.is_empty() {
        return Err("empty key segment".into());
    }
    if rest.is_empty() {
        let typed = typed_value(table.get(first.as_str()), raw);
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
    set_in_value(entry, rest, raw)
}

fn set_in_value(value: &mut toml::Value, path: &[String], raw: &str) -> Result<(), String> {
    match value {
        toml::Value::Table(t) => set_path(t, path, raw),
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
                items[idx] = typed_value(Some(&items[idx]), raw);
                return Ok(());
            }
            set_in_value(&mut items[idx], rest, raw)
        }
        _ => Err("a plain value cannot have sub-keys".into()),
    }
}

fn typed_value(existing: Option<&toml::Value>, raw: &str) -> toml::Value {
    if let Some(toml::Value::String(_)) = existing {
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
    fn example_config_is_valid() {
        let text = include_str!("../../../examples/ballast.toml");
        Config::from_toml(text, "examples/ballast.toml", env(&[])).unwrap();
    }
}
