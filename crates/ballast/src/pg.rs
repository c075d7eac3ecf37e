//! What every PostgreSQL connection of the server shares (the store, the router's state,
//! the warehouse destination): TLS for URLs that ask for it (`sslmode=require`, or
//! `prefer`, the default, when the server offers it), verified against the Mozilla roots.

use std::sync::Arc;

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
