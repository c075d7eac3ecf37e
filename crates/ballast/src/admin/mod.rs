//! Admin API (default 127.0.0.1:8081): Prometheus `/metrics`, `/v1/status`, the running
//! mode and the dead letters, behind a bearer token when one is configured. The config
//! refuses an admin address other hosts can reach without a token, so every call that
//! changes state (mode set, replay) or shows events (dead letters) needs it there;
//! `/metrics` alone can be left open with `server.metrics_require_token = false`.
//!
//! `GET /` is the status page (`ui.rs`): static files compiled into the binary, served
//! without the token because they hold no data; the page reads and acts through the same
//! API as the CLI (`/v1/status`, `/v1/mode`, `/v1/history`, `/v1/alerts`,
//! `/v1/dead-letters`), sending the token the operator typed in.

pub mod history;
mod ui;

use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Buckets of every `*_seconds` histogram (fsync, ingest request, delivery request):
/// 100 µs to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

use crate::readiness::ServerState;
use crate::router::Router as EventRouter;
use crate::store::Store;

#[derive(Clone)]
pub struct AdminState {
    pub store: Arc<dyn Store>,
    pub state: Arc<ServerState>,
    pub prometheus: PrometheusHandle,
    pub token: Option<String>,
    /// Whether `GET /metrics` needs the token (when there is one).
    pub metrics_require_token: bool,
    pub router: Arc<EventRouter>,
    pub recovery: Arc<crate::recovery::Recovery>,
    pub alerts: Arc<crate::alerts::Alerts>,
    /// The last hour, sampled in memory (`/v1/history`).
    pub history: Arc<history::History>,
    /// When each destination's oldest waiting event was received, read in the background
    /// (`/v1/status` never waits for the store).
    pub oldest: Arc<OldestEvents>,
}

/// How often the oldest waiting event of each destination is looked up for the status.
const OLDEST_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// When each destination's oldest waiting event was received (`None`: none waits or it
/// could not be told), and when that was last looked up. Filled by
/// [`OldestEvents::run`]; `/v1/status` reads only this.
#[derive(Default)]
pub struct OldestEvents {
    by_destination: std::sync::Mutex<
        std::collections::HashMap<String, (Option<std::time::SystemTime>, std::time::Instant)>,
    >,
}

impl OldestEvents {
    /// Looks the oldest events up every `OLDEST_EVERY` (each round within
    /// `OLDEST_AGE_BUDGET`) until `stop`.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        router: Arc<EventRouter>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let deadline = tokio::time::Instant::now() + OLDEST_AGE_BUDGET;
            for d in router.status() {
                let oldest = if d.backlog_bytes > 0 {
                    tokio::time::timeout_at(deadline, oldest_received(&*store, &d.id))
                        .await
                        .ok()
                        .flatten()
                } else {
                    None
                };
                self.by_destination
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(d.id.clone(), (oldest, std::time::Instant::now()));
            }
            tokio::select! {
                _ = tokio::time::sleep(OLDEST_EVERY) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// (age of the oldest waiting event in seconds, seconds since it was looked up).
    fn get(&self, destination: &str) -> (Option<f64>, Option<f64>) {
        let by = self
            .by_destination
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match by.get(destination) {
            Some((oldest, at)) => (
                oldest
                    .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
                    .map(|a| a.as_secs_f64()),
                Some(at.elapsed().as_secs_f64()),
            ),
            None => (None, None),
        }
    }
}

/// Buckets of the delivery lag (accepted → delivered): 10 ms to 6 h, as a backlog can be.
const LAG_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0,
    3600.0, 10800.0, 21600.0,
];

pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("ballast_destination_lag_seconds".into()),
            LAG_BUCKETS,
        )
        .context("setting histogram buckets")?
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .context("setting histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(ui::index))
        .route("/ui/app.js", get(ui::app_js))
        .route("/ui/app.css", get(ui::app_css))
        .route("/metrics", get(metrics))
        .route("/v1/history", get(history))
        .route("/v1/alerts", get(open_alerts))
        .route("/v1/status", get(status))
        .route("/v1/mode", get(get_mode).post(set_mode))
        .route("/v1/dead-letters", get(dead_letters))
        .route("/v1/dead-letters/replay", axum::routing::post(replay))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

async fn auth(State(s): State<AdminState>, req: Request, next: Next) -> Response {
    if let Err(why) = browser_guard(s.token.is_some(), &req) {
        tracing::warn!(path = %req.uri().path(), why, "admin request refused");
        return (StatusCode::FORBIDDEN, why).into_response();
    }
    let get = req.method() == axum::http::Method::GET || req.method() == axum::http::Method::HEAD;
    let open_metrics = !s.metrics_require_token && req.uri().path() == "/metrics" && get;
    // The page and its assets hold no data: every call they make needs the token.
    let open_page = get && ui::is_static(req.uri().path());
    if let (Some(token), false) = (&s.token, open_metrics || open_page) {
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

/// Without a token (a loopback admin address), what a web browser could be made to send
/// by another site is refused: a state-changing call from another origin (a browser
/// sends `Origin` with every cross-origin POST; the CLI sends none, the status page its
/// own), and any call whose `Host` is not a loopback name (another site's name resolved
/// to 127.0.0.1: DNS rebinding). With a token there is nothing to forge: a browser never
/// adds the bearer header by itself.
fn browser_guard(has_token: bool, req: &Request) -> Result<(), &'static str> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !has_token && !host.is_empty() && !is_loopback_host(host) {
        return Err("without an admin token only loopback host names are served");
    }
    let safe = matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    if !has_token && !safe {
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let same = origin
                .to_str()
                .ok()
                .and_then(|o| o.split_once("://"))
                .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host));
            if !same {
                return Err("cross-origin admin call refused");
            }
        }
    }
    Ok(())
}

/// `127.0.0.1:8081`, `localhost`, `[::1]:8081`, ...
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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
    metrics::counter!("ballast_log_quarantined_records_total").absolute(st.quarantined_records);
    metrics::counter!("ballast_log_torn_tail_bytes_total").absolute(st.torn_tail_bytes);
    metrics::counter!("ballast_storage_quota_rejections_total").absolute(st.quota_rejections);
    metrics::gauge!("ballast_storage_bytes_used").set(st.bytes_used as f64);
    metrics::gauge!("ballast_storage_quota_bytes").set(st.quota_bytes as f64);
    metrics::gauge!("ballast_log_segments").set(st.segments as f64);
    // Writable: the store takes new events now (not failed, not full, not refusing).
    let refusal = s.store.refusal();
    metrics::gauge!("ballast_storage_writable").set(if refusal.is_none() { 1.0 } else { 0.0 });
    for reason in ["storage_failed", "disk_full", "unavailable", "quota"] {
        let on = refusal.as_ref().is_some_and(|r| r.reason() == reason);
        metrics::gauge!("ballast_storage_refusing", "reason" => reason).set(if on {
            1.0
        } else {
            0.0
        });
    }
    for d in s.router.status() {
        let id = d.id.clone();
        metrics::counter!("ballast_destination_delivered_total", "destination" => id.clone())
            .absolute(d.delivered);
        metrics::counter!("ballast_destination_retries_total", "destination" => id.clone())
            .absolute(d.retries);
        metrics::gauge!("ballast_destination_backlog_bytes", "destination" => id.clone())
            .set(d.backlog_bytes as f64);
        metrics::gauge!("ballast_destination_buffered_events", "destination" => id.clone())
            .set(d.buffered_events as f64);
        metrics::gauge!("ballast_destination_in_flight", "destination" => id.clone())
            .set(d.in_flight as f64);
        metrics::gauge!("ballast_destination_retrying_users", "destination" => id.clone())
            .set(d.retrying_users as f64);
        metrics::gauge!("ballast_destination_dead_letters", "destination" => id)
            .set(d.dead_letters as f64);
    }
    let mode = s.state.mode();
    for m in [
        crate::recovery::Mode::Normal,
        crate::recovery::Mode::Degraded,
    ] {
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
    // Everything here is in memory: nothing waits for the store (figures the store
    // refreshes in the background carry their age).
    let st = s.store.status();
    let refusal = s.store.refusal();
    axum::Json(serde_json::json!({
        "mode": s.state.mode().as_health_str(),
        // As `/readyz` on the public port: accepting and persisting events.
        "ready": !s.state.stopping() && st.writable && !st.full(),
        "routing": s.state.routing(),
        "storage": {
            // False while new events are refused: failed, disk full, quota, unavailable.
            "writable": refusal.is_none(),
            "refusing": refusal.as_ref().map(|r| r.reason()),
            "reason": refusal.as_ref().map(|r| r.describe()),
            "failure": st.failure,
            "bytes_used": st.bytes_used,
            "quota_bytes": st.quota_bytes,
            "segments": st.segments,
            "start": st.start,
            "end": st.end,
            "events_appended": st.events_appended,
            // Held in the store now, counted from its files (null: the backend does not say).
            "events_stored": s.store.events_stored(),
            "appends": st.appends,
            "fsyncs": st.fsyncs,
            "quarantined_records": st.quarantined_records,
            // Seconds since the store last confirmed these figures (the PostgreSQL store
            // polls the database; null: the embedded store's own counters, always current).
            "figures_age_s": s.store.figures_age().map(|a| a.as_secs_f64()),
        },
        "destinations": destinations_with_age(&s),
    }))
    .into_response()
}

/// How long the reads for the age of the oldest event may take, all destinations
/// together (a slow database must not hold the lookup up).
const OLDEST_AGE_BUDGET: std::time::Duration = std::time::Duration::from_secs(1);

/// The router's destination status, each with `oldest_age_s`: how long ago the oldest
/// event the destination has not passed was received (its `receivedAt`), over the
/// partitions; null when there is none or it could not be told in time; and
/// `oldest_checked_s`, how long ago that was looked up (every 2 s in the background).
fn destinations_with_age(s: &AdminState) -> Vec<serde_json::Value> {
    let status = s.router.status();
    let discards = warehouse_discards(&s.prometheus.render());
    let mut out = Vec::with_capacity(status.len());
    for d in status {
        let (age, checked) = if d.backlog_bytes > 0 {
            s.oldest.get(&d.id)
        } else {
            (None, None)
        };
        let mut v = serde_json::to_value(&d).unwrap_or(serde_json::Value::Null);
        if let Some(o) = v.as_object_mut() {
            o.insert("oldest_age_s".into(), serde_json::json!(age));
            o.insert("oldest_checked_s".into(), serde_json::json!(checked));
            if let Some(d) = discards.get(&d.id) {
                o.insert("warehouse_discards".into(), serde_json::json!(d));
            }
        }
        out.push(v);
    }
    out
}

/// Values a warehouse destination loaded into `rudder_discards`, per destination and
/// reason, from `ballast_warehouse_discards_total` in the metrics' text.
fn warehouse_discards(
    metrics: &str,
) -> std::collections::HashMap<String, std::collections::BTreeMap<String, f64>> {
    let mut out: std::collections::HashMap<String, std::collections::BTreeMap<String, f64>> =
        Default::default();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("ballast_warehouse_discards_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels.split(',').find_map(|kv| {
                kv.strip_prefix(name)
                    .and_then(|v| v.strip_prefix("=\""))
                    .and_then(|v| v.strip_suffix('"'))
            })
        };
        if let (Some(d), Some(r), Ok(n)) = (
            label("destination"),
            label("reason"),
            value.trim().parse::<f64>(),
        ) {
            out.entry(d.to_string())
                .or_default()
                .insert(r.to_string(), n);
        }
    }
    out
}

/// When the oldest event at a cursor of the destination was received.
async fn oldest_received(store: &dyn Store, destination: &str) -> Option<std::time::SystemTime> {
    #[derive(serde::Deserialize)]
    struct Received<'a> {
        #[serde(rename = "receivedAt", borrow)]
        received_at: Option<std::borrow::Cow<'a, str>>,
    }
    let consumer = crate::router::consumer_name(destination);
    let mut oldest: Option<std::time::SystemTime> = None;
    for p in 0..store.partitions() {
        let end = *store.subscribe(p).borrow();
        let Some(cursor) = store.cursor(&consumer, p) else {
            continue;
        };
        if cursor >= end {
            continue;
        }
        let read = match store.read(cursor, 1).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(destination, partition = p, error = %e, "reading the oldest event for the status failed");
                continue;
            }
        };
        let Some(ev) = read.events.first() else {
            continue;
        };
        let t = serde_json::from_slice::<Received>(&ev.event)
            .ok()
            .and_then(|r| r.received_at)
            .and_then(|t| humantime::parse_rfc3339_weak(&t).ok());
        if let Some(t) = t {
            oldest = Some(oldest.map_or(t, |o| o.min(t)));
        }
    }
    oldest
}

async fn history(State(s): State<AdminState>) -> Response {
    axum::Json(s.history.view()).into_response()
}

/// `GET /v1/alerts`: the conditions raised and not resolved yet, and how many alert
/// notifications wait in the outbox.
async fn open_alerts(State(s): State<AdminState>) -> Response {
    let alerts = s.alerts.clone();
    let read = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::alerts::AlertError>((alerts.open_alerts()?, alerts.pending()?))
    })
    .await;
    match read {
        Ok(Ok((open, pending))) => {
            let open: Vec<_> = open
                .into_iter()
                .map(|(key, ms)| {
                    serde_json::json!({
                        "key": key,
                        "class": key.split([':', '@']).next().unwrap_or(&key),
                        "since": humantime::format_rfc3339_millis(
                            crate::time::from_ms(ms)
                        ).to_string(),
                        "since_ms": ms,
                    })
                })
                .collect();
            axum::Json(serde_json::json!({ "open": open, "outbox_pending": pending }))
                .into_response()
        }
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn get_mode(State(s): State<AdminState>) -> Response {
    axum::Json(s.recovery.describe()).into_response()
}

#[derive(serde::Deserialize)]
struct ModeBody {
    mode: String,
}

/// `POST /v1/mode {"mode":"normal"|"degraded"}`: durable; normal clears the crash history.
async fn set_mode(State(s): State<AdminState>, axum::Json(body): axum::Json<ModeBody>) -> Response {
    let mode = match body.mode.parse::<crate::recovery::Mode>() {
        Ok(mode) => mode,
        Err(e) => return bad_request(e.to_string()),
    };
    let recovery = s.recovery.clone();
    match tokio::task::spawn_blocking(move || recovery.set_mode(mode)).await {
        Ok(Ok(())) => axum::Json(s.recovery.describe()).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[derive(serde::Deserialize)]
struct DeadLetterQuery {
    destination: Option<String>,
    limit: Option<usize>,
    /// RFC 3339 time: replay only events that died at or after it.
    since: Option<String>,
}

fn bad_request(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, msg).into_response()
}

async fn dead_letters(
    State(s): State<AdminState>,
    axum::extract::Query(q): axum::extract::Query<DeadLetterQuery>,
) -> Response {
    let limit = q.limit.unwrap_or(1000);
    match s.router.db.list(q.destination.as_deref(), limit).await {
        Ok(list) => axum::Json(list).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn replay(
    State(s): State<AdminState>,
    axum::extract::Query(q): axum::extract::Query<DeadLetterQuery>,
) -> Response {
    let Some(dest) = q.destination else {
        return bad_request("destination is required".into());
    };
    if !s.router.has(&dest) {
        return (
            StatusCode::NOT_FOUND,
            format!("no enabled destination {dest:?}"),
        )
            .into_response();
    }
    let since = match q.since.as_deref().map(humantime::parse_rfc3339_weak) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => return bad_request(format!("since: {e}")),
    };
    match s.router.replay(&dest, since).await {
        Ok(n) => {
            axum::Json(serde_json::json!({ "destination": dest, "replayed": n })).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, host: &str, origin: Option<&str>) -> Request {
        let mut b = axum::http::Request::builder()
            .method(method)
            .uri("/v1/mode")
            .header(header::HOST, host);
        if let Some(o) = origin {
            b = b.header(header::ORIGIN, o);
        }
        b.body(axum::body::Body::empty())
            .unwrap_or_else(|_| Request::new(axum::body::Body::empty()))
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "127.0.0.1:8081",
            "localhost:8081",
            "LOCALHOST",
            "[::1]:8081",
            "127.1.2.3",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "evil.example:8081",
            "10.0.0.1:8081",
            "[2001:db8::1]:80",
            "0.0.0.0:8081",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn cross_origin_writes_and_rebound_names_are_refused() {
        // The CLI: no Origin.
        assert!(browser_guard(false, &req("POST", "127.0.0.1:8081", None)).is_ok());
        // The status page: its own origin.
        assert!(browser_guard(
            false,
            &req("POST", "127.0.0.1:8081", Some("http://127.0.0.1:8081"))
        )
        .is_ok());
        // Another site's page.
        assert!(browser_guard(
            false,
            &req("POST", "127.0.0.1:8081", Some("https://evil.example"))
        )
        .is_err());
        // With a token (behind a proxy that rewrites Host, say): the token decides.
        assert!(browser_guard(
            true,
            &req(
                "POST",
                "ballast-admin:8081",
                Some("https://ballast.example")
            )
        )
        .is_ok());
        // Reads from another origin are the browser's business (no CORS headers).
        assert!(browser_guard(
            false,
            &req("GET", "127.0.0.1:8081", Some("https://evil.example"))
        )
        .is_ok());
        // DNS rebinding without a token; with a token any name (e.g. a Service) is fine.
        assert!(browser_guard(false, &req("GET", "evil.example:8081", None)).is_err());
        assert!(browser_guard(true, &req("GET", "ballast-admin.ns.svc:8081", None)).is_ok());
    }
}
