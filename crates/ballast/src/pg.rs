//! What every PostgreSQL connection of the server shares (the store, the router's state,
//! the alert outbox, the warehouse destination): TLS for URLs that ask for it
//! (`sslmode=require`, or `prefer`, the default, when the server offers it), verified
//! against the Mozilla roots; and, for the connections to the store's database, the
//! session limits and timeouts (`connect`) and the lock that serialises schema creation.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

/// Bounds every statement and transaction: a database that stops answering (a
/// partition without a reset) fails the request instead of hanging it.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Serialises schema creation between replicas starting at once (an advisory lock).
pub const SCHEMA_LOCK: i64 = 0x6261_6c6c_6173_7401;

/// Server-side limits on every session: a replica that dies (or is cut off) while it holds
/// a partition row's lock in a transaction, or a lease, must not hold it for the
/// operating system's keepalive time (hours). All are settable by an ordinary user.
const SESSION_OPTIONS: &str = "-c idle_in_transaction_session_timeout=10s -c lock_timeout=20s \
     -c statement_timeout=25s -c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 \
     -c tcp_keepalives_count=3 -c tcp_user_timeout=10000";

/// A connection that could not be made, with the database's own words when it answered.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConnectError(String);

/// The database's message (with its detail) when it answered, else the driver's.
pub fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("postgres: {}", db.message()),
        None => format!("postgres: {e}"),
    }
}

/// Settings every connection gets: a connect timeout of 10 s unless the URL sets one,
/// `options` (`-c name=value` pairs) after the URL's own, and TCP keepalives so that a
/// dead peer is noticed on an idle connection (a lease's session above all).
pub fn configure(config: &mut tokio_postgres::Config, options: &[&str]) {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    let joined = std::iter::once(config.get_options().unwrap_or(""))
        .chain(options.iter().copied())
        .filter(|o| !o.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    config.options(&joined);
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(10));
}

/// Connects with the session limits above (plus `extra_options`, `-c name=value` pairs),
/// a connect timeout of 10 s unless the URL sets one, and TCP keepalives; the
/// connection's task runs on the current runtime.
pub async fn connect(url: &str, extra_options: &str) -> Result<Client, ConnectError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| ConnectError(format!("postgres url: {e}")))?;
    configure(&mut config, &[SESSION_OPTIONS, extra_options]);
    let (client, connection) = tokio::time::timeout(
        STATEMENT_TIMEOUT,
        config.connect(tls().map_err(ConnectError)?),
    )
    .await
    .map_err(|_| ConnectError("postgres: connecting timed out".into()))?
    .map_err(|e| ConnectError(error_text(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

pub fn tls() -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    static TLS: std::sync::OnceLock<Result<rustls::ClientConfig, String>> =
        std::sync::OnceLock::new();
    let config = TLS.get_or_init(|| {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .map_err(|e| e.to_string())
    });
    match config {
        Ok(c) => Ok(tokio_postgres_rustls::MakeRustlsConnect::new(c.clone())),
        Err(e) => Err(format!("postgres TLS: {e}")),
    }
}
