//! A `[[destinations]]` entry: the keys every type shares (here), the type's own
//! settings (parsed by the type named in `type`, see `registry.rs`), and the retry rule.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::units::duration;

/// A destination: the keys every type shares, and its type's own settings (checked
/// against that type's keys, so a misspelt key is still an error that names it).
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    pub id: String,
    pub sources: Vec<String>,
    pub enabled: bool,
    /// Deliveries in flight at once (default 16).
    pub concurrency: usize,
    /// Events per delivery (default: the type's, 1 for webhook and file; webhook sends a
    /// JSON array when > 1).
    pub batch_size: usize,
    pub retry: RetryConfig,
    /// Ids of `[[transformations]]` applied, in this order, to each batch before it is
    /// delivered (see `crate::transform`).
    pub transformations: Vec<String>,
    pub kind: DestinationKind,
}

/// A destination's type and its own settings (see `destinations::registry`).
#[derive(Debug, Clone)]
pub struct DestinationKind {
    name: &'static str,
    settings: std::sync::Arc<dyn super::registry::TypeConfig>,
}

impl DestinationKind {
    /// The `type` it was configured with.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The type's own settings.
    pub fn settings(&self) -> &dyn super::registry::TypeConfig {
        &*self.settings
    }
}

/// When to give up on an event: after at least `max_attempts` failures *and* once its
/// first attempt is older than `retry_window`. Backoff doubles from `min_backoff` to
/// `max_backoff`, with jitter; a `Retry-After` answer is honoured up to `max_backoff`.
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
    #[serde(default)]
    transformations: Vec<String>,
}

const COMMON_DESTINATION_KEYS: [&str; 8] = [
    "id",
    "type",
    "sources",
    "enabled",
    "concurrency",
    "batch_size",
    "retry",
    "transformations",
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
        let Some(spec) = super::registry::lookup(&c.kind) else {
            return Err(D::Error::custom(format!(
                "destination {:?}: unknown type {:?} (known: {})",
                c.id,
                c.kind,
                super::registry::names()
            )));
        };
        let kind = DestinationKind {
            name: spec.name,
            settings: (spec.parse)(own).map_err(context)?,
        };
        Ok(DestinationConfig {
            id: c.id,
            sources: c.sources,
            enabled: c.enabled,
            concurrency: c.concurrency.unwrap_or(16),
            batch_size: c.batch_size.unwrap_or(spec.default_batch_size),
            retry: c.retry,
            transformations: c.transformations,
            kind,
        })
    }
}

fn yes() -> bool {
    true
}
