//! Admin API (default 127.0.0.1:8081): Prometheus `/metrics` and `/v1/status`, behind a
//! bearer token when one is configured.

use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::server::ServerState;
use crate::store::Store;

#[derive(Clone)]
pub struct AdminState {
    pub store: Arc<dyn Store>,
    pub state: Arc<ServerState>,
    pub prometheus: PrometheusHandle,
    pub token: Option<String>,
}

pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

async fn auth(State(s): State<AdminState>, req: Request, next: Next) -> Response {
    if let Some(token) = &s.token {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| constant_time_eq(t.trim().as_bytes(), token.as_bytes()))
            .unwrap_or(false);
        if !ok {
            return (StatusCode::UNAUTHORIZED, "missing or wrong bearer token").into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Copies the store's counters into the registry, then renders it.
async fn metrics(State(s): State<AdminState>) -> Response {
    let st = s.store.status();
    metrics::counter!("ballast_log_fsyncs_total").absolute(st.fsyncs);
    metrics::counter!("ballast_log_appends_total").absolute(st.appends);
    metrics::counter!("ballast_log_events_total").absolute(st.events_appended);
    metrics::gauge!("ballast_log_fsync_seconds_total").set(st.fsync_seconds);
    metrics::counter!("ballast_log_quarantined_records_total").absolute(st.quarantined_records);
    metrics::counter!("ballast_log_torn_tail_bytes_total").absolute(st.torn_tail_bytes);
    metrics::counter!("ballast_storage_quota_rejections_total").absolute(st.quota_rejections);
    metrics::gauge!("ballast_storage_bytes_used").set(st.bytes_used as f64);
    metrics::gauge!("ballast_storage_quota_bytes").set(st.quota_bytes as f64);
    metrics::gauge!("ballast_log_segments").set(st.segments as f64);
    metrics::gauge!("ballast_storage_writable").set(if st.writable { 1.0 } else { 0.0 });
    let mode = s.state.mode();
    for m in [crate::server::Mode::Normal, crate::server::Mode::Degraded] {
        metrics::gauge!("ballast_mode", "mode" => m.as_health_str()).set(if m == mode {
            1.0
        } else {
            0.0
        });
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.prometheus.render(),
    )
        .into_response()
}

async fn status(State(s): State<AdminState>) -> Response {
    let st = s.store.status();
    axum::Json(serde_json::json!({
        "mode": s.state.mode().as_health_str(),
        "routing": s.state.routing(),
        "storage": {
            "writable": st.writable,
            "failure": st.failure,
            "bytes_used": st.bytes_used,
            "quota_bytes": st.quota_bytes,
            "segments": st.segments,
            "start": st.start,
            "end": st.end,
            "events_appended": st.events_appended,
            "appends": st.appends,
            "fsyncs": st.fsyncs,
            "quarantined_records": st.quarantined_records,
        },
        "destinations": [],
    }))
    .into_response()
}
