//! `postgres`: a warehouse in PostgreSQL with RudderStack's warehouse schema (tables per
//! event type and per track event, flattened columns, reserved columns, `users` with the
//! latest traits, `rudder_discards`), loaded idempotently by `id`. `schema.rs` turns
//! events into rows (names, flattening, types: pure, no database); `sink.rs` keeps the
//! tables' columns in step and loads (COPY into staging tables, merge, one transaction
//! per `deliver`). See docs/DESTINATIONS.md, "postgres".

pub mod config;
pub mod schema;
pub mod sink;
#[cfg(test)]
pub(crate) mod tests;

pub use config::PostgresConfig;
pub use sink::PostgresSink;
