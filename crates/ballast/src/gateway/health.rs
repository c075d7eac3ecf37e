//! `/health` (RudderStack's shape, real values), `/livez`, `/readyz`, `/version`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::Gateway;

pub async fn health(State(gw): State<Arc<Gateway>>) -> Response {
    let store = gw.store.status();
    let accepting = store.writable && !store.full() && !gw.state.shutting_down();
    let flag = |b: bool| if b { "TRUE" } else { "FALSE" };
    let body = serde_json::json!({
        "appType": "EMBEDDED",
        "server": "UP",
        "db": if store.writable { "UP" } else { "DOWN" },
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

pub async fn livez() -> Response {
    (StatusCode::OK, "OK").into_response()
}

/// Ready while it can accept and persist events (also in degraded mode), and not once a
/// stop was asked for. Liveness (`livez`) depends on nothing: a storage or database
/// outage must not get the process restarted.
pub async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.state.stopping() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let store = gw.store.status();
    if !store.writable {
        return (StatusCode::SERVICE_UNAVAILABLE, "storage failed").into_response();
    }
    if store.full() {
        return (StatusCode::SERVICE_UNAVAILABLE, "storage quota exceeded").into_response();
    }
    (StatusCode::OK, "OK").into_response()
}

pub async fn version() -> Response {
    axum::Json(serde_json::json!({
        "name": "ballast",
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response()
}
