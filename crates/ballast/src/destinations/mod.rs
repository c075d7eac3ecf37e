//! Destinations: where the router delivers events. One folder per type, each with
//! `config.rs` (its TOML settings), `sink.rs` (the `Destination` implementation) and
//! `tests.rs`, registered by one line in [`registry::REGISTRY`] (see docs/DESTINATIONS.md).

mod config;
#[cfg(test)]
mod conformance;
pub mod file;
pub mod postgres;
pub mod registry;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use config::{DestinationConfig, DestinationKind, RetryConfig};

/// One event as a destination receives it.
#[derive(Debug, Clone)]
pub struct Event {
    /// The enriched event, as stored (a JSON object). Cheap to clone.
    pub json: bytes::Bytes,
    /// Its `messageId` (for idempotency headers); empty if it has none.
    pub message_id: bytestring::ByteString,
}

/// What became of one delivery attempt (of one event, or of one batch as a whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Temporary failure: 5xx, 408, 429, network error, timeout.
    Retry {
        status: Option<u16>,
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Permanent failure (other 4xx): no retry, straight to the dead letters.
    Abort {
        status: Option<u16>,
        reason: String,
    },
    /// Delivered, except the events at these indexes of the batch (ascending), which the
    /// target refused for good, each with why: those go to the dead letters, the others
    /// count as delivered. For a target that can tell which events it refuses (the
    /// `postgres` warehouse: one event's data the database cannot take).
    DeliveredExcept {
        refused: Vec<(usize, String)>,
    },
}

impl Outcome {
    /// Whether the target took the batch (all of it, or all but events it refused for
    /// good).
    pub fn delivered(&self) -> bool {
        matches!(self, Outcome::Delivered | Outcome::DeliveredExcept { .. })
    }

    /// The outcome an HTTP status means for a delivery.
    pub fn from_http(status: u16, body: String, retry_after: Option<Duration>) -> Outcome {
        match status {
            200..=299 => Outcome::Delivered,
            408 | 429 | 500..=599 => Outcome::Retry {
                status: Some(status),
                reason: body,
                retry_after,
            },
            _ => Outcome::Abort {
                status: Some(status),
                reason: body,
            },
        }
    }
}

#[async_trait]
pub trait Destination: Send + Sync + 'static {
    /// Delivers the events, in order, as one unit (a batch succeeds or fails whole).
    async fn deliver(&self, events: &[Event]) -> Outcome;
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("destination {id:?}: {message}")]
    Invalid { id: String, message: String },
}

/// Builds the destination a configuration describes.
pub fn build(config: &DestinationConfig) -> Result<Arc<dyn Destination>, BuildError> {
    let invalid = |message: String| BuildError::Invalid {
        id: config.id.clone(),
        message,
    };
    let settings = config.kind.settings();
    settings.check().map_err(invalid)?;
    settings.build_named(&config.id).map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_status_classes() {
        assert_eq!(
            Outcome::from_http(200, String::new(), None),
            Outcome::Delivered
        );
        assert_eq!(
            Outcome::from_http(204, String::new(), None),
            Outcome::Delivered
        );
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(
                matches!(
                    Outcome::from_http(s, String::new(), None),
                    Outcome::Retry { .. }
                ),
                "{s}"
            );
        }
        for s in [400, 401, 403, 404, 413, 422, 301] {
            assert!(
                matches!(
                    Outcome::from_http(s, String::new(), None),
                    Outcome::Abort { .. }
                ),
                "{s}"
            );
        }
    }
}
