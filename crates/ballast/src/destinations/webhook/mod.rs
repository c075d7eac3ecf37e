//! `webhook`: POSTs each event as JSON (or a JSON array of up to `batch_size` events) to a
//! URL, with configured headers, a timeout, and the messageId in `Idempotency-Key`.

pub mod config;
pub mod sink;
#[cfg(test)]
mod tests;

pub use config::{WebhookConfig, WebhookError};
pub use sink::WebhookSink;
