//! The destination types ballast knows: one [`TypeSpec`] line each in [`REGISTRY`].
//!
//! A type owns its settings (a serde struct with `deny_unknown_fields`), their checks
//! (what `check-config` and `serve` refuse) and its builder, through [`TypeConfig`]. The
//! configuration loader only knows the keys every destination shares (see
//! `config::DestinationConfig`); everything else in a `[[destinations]]` entry is handed
//! to the type's `parse`.

use std::fmt::Debug;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use super::Destination;

/// A destination type's own settings, parsed and ready to check and build.
pub trait TypeConfig: Debug + Send + Sync + 'static {
    /// What `check-config` and `serve` refuse, as a message for the operator (the caller
    /// prefixes the destination's id).
    fn check(&self) -> Result<(), String>;
    /// The sink. Must not need the target to be reachable (a target that is down at start
    /// is a delivery failure to retry, not a configuration error).
    fn build(&self) -> Result<Arc<dyn Destination>, String>;
    /// [`Self::build`] for the destination `id` (a type may label its metrics with it).
    fn build_named(&self, id: &str) -> Result<Arc<dyn Destination>, String> {
        let _ = id;
        self.build()
    }
    /// How long the router may hold the oldest ready event back to hand `deliver` a
    /// fuller batch (up to `batch_size`); None (the default): never, each batch is what
    /// is ready.
    fn flush_interval(&self) -> Option<std::time::Duration> {
        None
    }
}

/// One registered type.
pub struct TypeSpec {
    /// The value of `type = "..."`.
    pub name: &'static str,
    /// `batch_size` when the entry does not set one.
    pub default_batch_size: usize,
    /// Parses the type's own keys (everything but the shared ones).
    pub parse: fn(toml::Value) -> Result<Arc<dyn TypeConfig>, toml::de::Error>,
}

/// Every destination type. Adding one: a folder beside `webhook/` and one line here.
pub static REGISTRY: &[TypeSpec] = &[
    TypeSpec {
        name: "webhook",
        default_batch_size: 1,
        parse: parse::<super::webhook::WebhookConfig>,
    },
    TypeSpec {
        name: "file",
        // A file takes many lines per write and fsync at no cost to anyone.
        default_batch_size: 100,
        parse: parse::<super::file::FileConfig>,
    },
    TypeSpec {
        name: "postgres",
        default_batch_size: 10_000,
        parse: parse::<super::postgres::PostgresConfig>,
    },
];

/// The registered type called `name`.
pub fn lookup(name: &str) -> Option<&'static TypeSpec> {
    REGISTRY.iter().find(|t| t.name == name)
}

/// The names of every registered type, for error messages.
pub fn names() -> String {
    REGISTRY
        .iter()
        .map(|t| t.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `parse` for a settings struct that deserializes itself.
pub fn parse<T: TypeConfig + DeserializeOwned>(
    value: toml::Value,
) -> Result<Arc<dyn TypeConfig>, toml::de::Error> {
    Ok(Arc::new(T::deserialize(value)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_defaults_sane() {
        let mut seen = std::collections::HashSet::new();
        for t in REGISTRY {
            assert!(seen.insert(t.name), "{} registered twice", t.name);
            assert!((1..=10_000).contains(&t.default_batch_size), "{}", t.name);
        }
        assert!(lookup("webhook").is_some() && lookup("nope").is_none());
    }
}
