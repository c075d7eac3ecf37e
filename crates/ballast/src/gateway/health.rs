//! `/health` (RudderStack's shape, real values), `/livez`, `/readyz`, `/version`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::Gateway;

pub async fn health(State(gw): State<Arc<Gateway>>) -> Response {
    let refusal = gw.store.refusal();
    let accepting = refusal.is_none() && !gw.state.shutting_down();
    // The store cannot write: failed for good, or unavailable (a database that does not
    // answer); a full disk or the quota is not "down".
    let failed = matches!(
        refusal,
        Some(crate::store::Refusal::Failed(_) | crate::store::Refusal::Unavailable(_))
    );
    let flag = |b: bool| if b { "TRUE" } else { "FALSE" };
    let body = serde_json::json!({
        "appType": "EMBEDDED",
        "server": "UP",
        "db": if failed { "DOWN" } else { "UP" },
        "acceptingEvents": flag(accepting),
        // False in degraded mode and when no destination is configured.
        "routingEvents": flag(gw.state.routing()),
        "mode": gw.state.mode().as_health_str(),
        "backendConfigMode": "STATIC",
        "goroutines": "",
        "lastSync": "",
        "lastRegulationSync": "",
    });
    axum::Json(body).into_response()
}

/// Live unless the server's watchdog found a part wedged (no progress for
/// `server.liveness_timeout` while work waits: the accept loop, the log writer): then 503
/// with the reason, so that an orchestrator restarts the process. A storage or database
/// outage, a full disk or the quota do not count: those are readiness.
pub async fn livez(State(gw): State<Arc<Gateway>>) -> Response {
    match gw.state.stalled() {
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stalled: {reason}"),
        )
            .into_response(),
        None => (StatusCode::OK, "OK").into_response(),
    }
}

/// Ready while it can accept and persist events (also in degraded mode); else 503 with
/// the reason (`disk full`, `storage quota exceeded`, `storage failed`, `shutting down`,
/// ...). Liveness (`livez`) fails only for a wedged process (see [`livez`]): a storage or
/// database outage must not get the process restarted.
pub async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.state.stopping() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    match gw.store.refusal() {
        Some(refusal) => (StatusCode::SERVICE_UNAVAILABLE, refusal.describe()).into_response(),
        None => (StatusCode::OK, "OK").into_response(),
    }
}

pub async fn version() -> Response {
    axum::Json(serde_json::json!({
        "name": "ballast",
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response()
}
