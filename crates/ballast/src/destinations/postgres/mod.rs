//! `postgres`: a warehouse in PostgreSQL with RudderStack's warehouse schema (tables per
//! event type and per track event, flattened columns, reserved columns, `users` with the
//! latest traits, `rudder_discards`), loaded idempotently by `id`. `schema.rs` turns
//! events into rows (names, flattening, types: pure, no database), with `names.rs` (a
//! row's columns; the column names a thread made, so each is made once); `load.rs` groups the
//! rows per table and encodes them into `INSERT ... SELECT ... FROM unnest(...) ON
//! CONFLICT (id)` statements (pure, on a blocking thread); `sink.rs` keeps the tables'
//! columns in step and runs the statements, one transaction per `deliver`. See docs/DESTINATIONS.md, "postgres".

pub mod config;
pub mod json;
pub mod load;
pub mod names;
pub mod schema;
pub mod sink;
#[cfg(test)]
pub(crate) mod tests;

pub use config::PostgresConfig;
pub use sink::PostgresSink;
