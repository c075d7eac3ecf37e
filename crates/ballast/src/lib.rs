//! ballast: an event data plane that speaks RudderStack's HTTP API, stores every
//! accepted event durably and forwards it in order per user to its destinations.
//!
//! Data flow: [`gateway`] → [`store`] → [`router`] → [`destinations`]; see docs/ARCHITECTURE.md.

// Unit tests (and the benchmarks among them) use the binary's allocator.
#[cfg(test)]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod admin;
pub mod alerts;
pub mod cli;
pub mod config;
pub mod destinations;
pub mod event;
pub mod gateway;
pub mod listener;
pub mod pg;
#[cfg(any(test, feature = "test-support"))]
pub mod pgtest;
pub mod readiness;
pub mod recovery;
pub mod router;
pub mod server;
pub mod store;
pub mod time;
pub mod transform;
pub mod units;
