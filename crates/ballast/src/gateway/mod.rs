//! The public HTTP API (RudderStack-compatible): auth, decode, validate, enrich, store,
//! answer. A request is answered `200 OK` only after every event of it is durable; a
//! request that gets an error stores nothing.

mod auth;
mod body;
mod dedup;
pub mod enrich;
#[cfg(test)]
mod fuzz_tests;
mod health;
mod pixel;
mod ratelimit;
mod sdk;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::{Config, SourceConfig};
use crate::readiness::ServerState;
use crate::store::{EventBatch, Store, StoreError};
use enrich::{BatchBody, Enrichment, EventError, Shallow};

/// A configured source, looked up by write key.
pub struct Source {
    pub id: Arc<str>,
    pub config: SourceConfig,
    limiter: Option<ratelimit::TokenBucket>,
    events: metrics::Counter,
    /// messageIds stored within `dedup_window` (none when it is `0s`).
    dedup: Option<dedup::Dedup>,
}

pub struct Gateway {
    sources: HashMap<String, Arc<Source>>,
    store: Arc<dyn Store>,
    state: Arc<ServerState>,
    max_request_bytes: usize,
    requests: RequestCounters,
    /// Requests refused because the store could not take them, by reason.
    rejections: StorageRejections,
    /// Time from the request's head to the answer of every POST ingest request.
    latency: metrics::Histogram,
}

/// An error answer: status and the exact plain-text body SDKs key on.
#[derive(Debug, Clone, Copy)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: &'static str,
    pub retry_after: Option<u64>,
}

impl ApiError {
    const fn new(status: StatusCode, body: &'static str) -> ApiError {
        ApiError {
            status,
            body,
            retry_after: None,
        }
    }
}

pub const NO_WRITE_KEY: ApiError = ApiError::new(
    StatusCode::UNAUTHORIZED,
    "failed to read writekey from header",
);
pub const INVALID_WRITE_KEY: ApiError =
    ApiError::new(StatusCode::UNAUTHORIZED, "invalid write key");
pub const SOURCE_DISABLED: ApiError = ApiError::new(StatusCode::NOT_FOUND, "source is disabled");
pub const INVALID_JSON: ApiError = ApiError::new(StatusCode::BAD_REQUEST, "invalid json");
pub const NOT_AN_EVENT: ApiError =
    ApiError::new(StatusCode::BAD_REQUEST, "event is not a valid rudder event");
pub const EMPTY_BATCH: ApiError = ApiError::new(StatusCode::BAD_REQUEST, "empty batch payload");
pub const NO_IDENTITY: ApiError = ApiError::new(
    StatusCode::BAD_REQUEST,
    "request neither has anonymousId nor userId",
);
pub const TOO_LARGE: ApiError = ApiError::new(
    StatusCode::PAYLOAD_TOO_LARGE,
    "request size exceeds max limit",
);
/// The body did not arrive in time (`server.body_read_timeout`, `server.body_min_rate`).
pub const BODY_TIMEOUT: ApiError =
    ApiError::new(StatusCode::REQUEST_TIMEOUT, "request body read timeout");
/// Arrays and objects nested deeper than [`enrich::MAX_DEPTH`] levels.
pub const TOO_DEEP: ApiError = ApiError::new(
    StatusCode::BAD_REQUEST,
    "json nested deeper than 100 levels",
);
pub const INVALID_GZIP: ApiError = ApiError::new(StatusCode::BAD_REQUEST, "invalid gzip body");
/// A `Content-Encoding` other than `gzip` or `identity`.
pub const UNSUPPORTED_ENCODING: ApiError = ApiError::new(
    StatusCode::UNSUPPORTED_MEDIA_TYPE,
    "unsupported content encoding (use gzip or none)",
);
pub const RATE_LIMITED: ApiError = ApiError {
    status: StatusCode::TOO_MANY_REQUESTS,
    body: "max requests limit reached",
    retry_after: Some(1),
};
pub const QUOTA: ApiError =
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage quota exceeded");
pub const DISK_FULL: ApiError = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "disk full");
pub const STORE_DOWN: ApiError =
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable");
pub const SHUTTING_DOWN: ApiError =
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server is shutting down");

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, self.body).into_response();
        if self.status == StatusCode::PAYLOAD_TOO_LARGE
            || self.status == StatusCode::REQUEST_TIMEOUT
        {
            // The body may not have been read to its end: the connection cannot be reused.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

fn ok() -> Response {
    (StatusCode::OK, "OK").into_response()
}

/// Single-event routes and the `type` they set.
const SINGLE_ROUTES: [&str; 6] = ["track", "identify", "page", "screen", "group", "alias"];

impl Gateway {
    pub fn new(
        config: &Config,
        store: Arc<dyn Store>,
        state: Arc<ServerState>,
    ) -> Result<Gateway, dedup::DedupError> {
        let dedup_root = config.server.data_dir.join("dedup");
        let sources = config
            .sources
            .iter()
            .map(|s| {
                let id: Arc<str> = Arc::from(s.id.as_str());
                let source = Source {
                    id: id.clone(),
                    config: s.clone(),
                    limiter: s.rate_limit.map(ratelimit::TokenBucket::new),
                    events: metrics::counter!("ballast_ingest_events_total", "source" => s.id.clone()),
                    dedup: dedup::Dedup::open(&dedup_root, &s.id, s.dedup_window, s.dedup_max_ids)?,
                };
                Ok((s.write_key.clone(), Arc::new(source)))
            })
            .collect::<Result<_, dedup::DedupError>>()?;
        Ok(Gateway {
            sources,
            store,
            state,
            max_request_bytes: config.server.max_request_bytes,
            requests: RequestCounters::default(),
            rejections: StorageRejections::new(),
            latency: metrics::histogram!("ballast_ingest_request_seconds"),
        })
    }

    pub fn router(self: Arc<Self>) -> Router {
        let cors = CorsLayer::new()
            .allow_origin(AllowOrigin::mirror_request())
            .allow_credentials(true)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers(
                [
                    "authorization",
                    "content-type",
                    "content-encoding",
                    "anonymousid",
                    "sentat",
                    "rsa-retry-attempt",
                    "rsa-since-last-attempt",
                    "rsa-since-first-attempt",
                    "rsa-retry-reason",
                    "rsa-recovered",
                ]
                .map(HeaderName::from_static),
            )
            // The browser SDK honours Retry-After, which a cross-origin page reads only if exposed.
            .expose_headers([header::RETRY_AFTER])
            .max_age(Duration::from_secs(900));
        Router::new()
            .route("/v1/batch", post(batch))
            .route("/v1/import", post(batch))
            .route("/v1/b", post(batch))
            .route("/v1/{kind}", post(single))
            .route("/beacon/v1/batch", post(beacon))
            .route("/pixel/v1/{kind}", get(pixel::pixel))
            .route("/sourceConfig", get(source_config))
            .route("/sourceConfig/", get(source_config))
            .route("/health", get(health::health))
            .route("/livez", get(health::livez))
            .route("/readyz", get(health::readyz))
            .route("/version", get(health::version))
            .route("/sdk/v1/ballast.min.js", get(sdk::bundle))
            .layer(cors)
            .with_state(self)
    }

    /// Resolves a write key to an enabled source.
    fn source(&self, key: Option<&str>) -> Result<&Arc<Source>, ApiError> {
        let key = key.filter(|k| !k.is_empty()).ok_or(NO_WRITE_KEY)?;
        let source = self.sources.get(key).ok_or(INVALID_WRITE_KEY)?;
        if !source.config.enabled {
            return Err(SOURCE_DISABLED);
        }
        Ok(source)
    }

    /// Everything after the body is read: auth, parse, validate, enrich, store.
    async fn ingest(&self, req: Ingest<'_>) -> Result<Response, ApiError> {
        if self.state.shutting_down() {
            return Err(SHUTTING_DOWN);
        }
        let received_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let header_anon = req
            .headers
            .get("anonymousid")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty());
        let ip = request_ip(req.headers, req.peer);
        let enrichment = Enrichment {
            received_at: &received_at,
            request_ip: &ip,
            route_type: req.route_type,
            header_anonymous_id: header_anon,
        };
        let mut key = req.key.map(Cow::Borrowed);
        // A key from the header or the query is judged before the body is read (by the
        // caller, which passes the source it found): a wrong key is a 401 whatever the
        // body holds.
        let known = match (req.source, key.as_deref().filter(|k| !k.is_empty())) {
            (Some(source), _) => Some(source),
            (None, Some(k)) => Some(self.source(Some(k))?),
            (None, None) => None,
        };

        let parsed = parse_body(req.body, req.route_type.is_some(), key.is_some())?;
        if key.is_none() {
            key = parsed.body_key.clone();
        }
        let source = match known {
            Some(source) => source,
            None => self.source(key.as_deref())?,
        };
        let batch = build_batch(&parsed, source.id.clone(), &enrichment, req.body.len())?;
        if let Some(limiter) = &source.limiter {
            if !limiter.try_take() {
                return Err(RATE_LIMITED);
            }
        }
        let (batch, reserved) = match &source.dedup {
            Some(d) => {
                let f = d.filter(batch);
                (f.batch, Some((d, f.reserved)))
            }
            None => (batch, None),
        };
        if batch.is_empty() {
            // Every event is a copy of one stored within the window.
            return Ok(ok());
        }
        let n = batch.len() as u64;
        let appended = self.store.append(batch).await;
        if let Some((d, ids)) = reserved {
            if appended.is_ok() {
                if let Err(e) = d.commit(ids) {
                    // Stored: answered 200 all the same; copies of these may be stored again.
                    tracing::error!(error = %e, "could not record messageIds for de-duplication");
                }
            } else {
                d.release(ids);
            }
        }
        match appended {
            Ok(_) => {
                source.events.increment(n);
                Ok(ok())
            }
            Err(StoreError::QuotaExceeded) => {
                self.rejections.quota.increment(1);
                Err(QUOTA)
            }
            Err(StoreError::DiskFull) => {
                self.rejections.disk_full.increment(1);
                Err(DISK_FULL)
            }
            Err(StoreError::TooLarge(_)) => Err(TOO_LARGE),
            Err(e @ StoreError::Fatal(_)) => {
                self.rejections.failed.increment(1);
                tracing::error!(error = %e, "could not store events");
                Err(STORE_DOWN)
            }
            Err(e) => {
                // Transient: logged at most once a second, so that a burst of refused
                // requests does not flood the log (the metric counts every one).
                self.rejections.unavailable.increment(1);
                if self.rejections.log_now() {
                    tracing::error!(error = %e, "could not store events");
                }
                Err(STORE_DOWN)
            }
        }
    }
}

use std::borrow::Cow;

fn body_write_key(fields: &[(enrich::Key<'_>, &serde_json::value::RawValue)]) -> Option<String> {
    // The last one, as for every duplicate top-level key.
    fields
        .iter()
        .rev()
        .find(|(k, _)| k.0 == "writeKey")
        .and_then(|(_, v)| serde_json::from_str::<String>(v.get()).ok())
}

/// A batch body must be a JSON object (serde's derive would also take an array).
fn parse_batch(body: &[u8]) -> Result<BatchBody<'_>, ()> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => serde_json::from_slice(body).map_err(|_| ()),
        _ => Err(()),
    }
}

/// A request body decoded: its events' top-level fields, and the write key it names.
pub(crate) struct Parsed<'a> {
    /// One event (single-event routes) or a batch's elements.
    events: Vec<Shallow<'a>>,
    /// `writeKey` in the body (used when the request named no key).
    pub(crate) body_key: Option<Cow<'a, str>>,
}

/// Decodes a body (before the source is known): the nesting limit, then the JSON.
/// `single`: the body is one event (the routes with a type); `have_key`: the request
/// named a write key (without one, an unreadable body is a 401, as RudderStack answers).
pub(crate) fn parse_body(
    body: &[u8],
    single: bool,
    have_key: bool,
) -> Result<Parsed<'_>, ApiError> {
    if enrich::nested_deeper_than(body, enrich::MAX_DEPTH) {
        return Err(TOO_DEEP);
    }
    if single {
        let fields = match serde_json::from_slice::<Shallow>(body) {
            Ok(Shallow::Object(fields)) => fields,
            Ok(Shallow::NotObject) | Err(_) if !have_key => return Err(NO_WRITE_KEY),
            Ok(Shallow::NotObject) | Err(_) => return Err(INVALID_JSON),
        };
        let body_key = body_write_key(&fields).map(Cow::Owned);
        Ok(Parsed {
            events: vec![Shallow::Object(fields)],
            body_key,
        })
    } else {
        let body = match parse_batch(body) {
            Ok(b) => b,
            Err(_) if !have_key => return Err(NO_WRITE_KEY),
            Err(_) => return Err(INVALID_JSON),
        };
        Ok(Parsed {
            events: body.batch.unwrap_or_default(),
            body_key: body.write_key,
        })
    }
}

/// Validates and enriches the decoded events into what is stored: all of them, or an
/// error and nothing.
pub(crate) fn build_batch(
    parsed: &Parsed<'_>,
    source: Arc<str>,
    enrichment: &Enrichment<'_>,
    body_len: usize,
) -> Result<EventBatch, ApiError> {
    if parsed.events.is_empty() {
        return Err(EMPTY_BATCH);
    }
    let mut batch = EventBatch::new(source, body_len + parsed.events.len() * 160);
    for event in &parsed.events {
        let Shallow::Object(fields) = event else {
            return Err(NOT_AN_EVENT);
        };
        batch
            .push_with(|out, meta| enrich::enrich(fields, enrichment, out, meta))
            .map_err(event_error)?;
    }
    Ok(batch)
}

fn event_error(e: EventError) -> ApiError {
    match e {
        EventError::NotAnObject => NOT_AN_EVENT,
        EventError::NoIdentity => NO_IDENTITY,
    }
}

/// The client's address: the first `X-Forwarded-For` entry, else the peer.
fn request_ip(headers: &HeaderMap, peer: SocketAddr) -> String {
    headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| peer.ip().to_string())
}

struct Ingest<'a> {
    headers: &'a HeaderMap,
    peer: SocketAddr,
    key: Option<&'a str>,
    /// The source `key` names, when the caller has looked it up already.
    source: Option<&'a Arc<Source>>,
    route_type: Option<&'static str>,
    body: &'a [u8],
}

#[derive(Deserialize)]
struct KeyQuery {
    #[serde(rename = "writeKey")]
    write_key: Option<String>,
}

/// `ballast_storage_rejections_total{reason}`: requests the store refused (503), by
/// reason; registered at start so that they read 0 until something is refused.
struct StorageRejections {
    quota: metrics::Counter,
    disk_full: metrics::Counter,
    unavailable: metrics::Counter,
    failed: metrics::Counter,
    /// When a transient store error was last logged (ms since the Unix epoch).
    last_logged_ms: std::sync::atomic::AtomicU64,
}

impl StorageRejections {
    fn new() -> StorageRejections {
        let c = |reason: &'static str| {
            let c = metrics::counter!("ballast_storage_rejections_total", "reason" => reason);
            c.increment(0);
            c
        };
        StorageRejections {
            quota: c("quota"),
            disk_full: c("disk_full"),
            unavailable: c("unavailable"),
            failed: c("storage_failed"),
            last_logged_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// True at most once a second.
    fn log_now(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = crate::time::to_ms(SystemTime::now());
        let last = self.last_logged_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= 1000
            && self
                .last_logged_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Request counters by route and status, registered on first use and then cached (the
/// hot path does no registry lookup).
#[derive(Default)]
struct RequestCounters([[OnceLock<metrics::Counter>; STATUSES.len()]; ROUTES.len()]);

const ROUTES: [&str; 9] = [
    "track", "identify", "page", "screen", "group", "alias", "batch", "beacon", "pixel",
];
const STATUSES: [&str; 8] = ["200", "400", "401", "404", "413", "429", "503", "other"];

impl RequestCounters {
    fn count(&self, route: &'static str, status: StatusCode) {
        let r = ROUTES
            .iter()
            .position(|x| *x == route)
            .unwrap_or(ROUTES.len() - 1);
        let label = match status.as_u16() {
            200 => "200",
            400 => "400",
            401 => "401",
            404 => "404",
            413 => "413",
            429 => "429",
            503 => "503",
            _ => "other",
        };
        let st = STATUSES
            .iter()
            .position(|x| *x == label)
            .unwrap_or(STATUSES.len() - 1);
        self.0[r][st]
            .get_or_init(|| {
                metrics::counter!("ballast_ingest_requests_total", "route" => route, "status" => label)
            })
            .increment(1);
    }
}

impl Gateway {
    fn finish(&self, result: Result<Response, Response>, route: &'static str) -> Response {
        let response = result.unwrap_or_else(|e| e);
        self.requests.count(route, response.status());
        response
    }
}

/// The client's address as axum's connect info recorded it.
fn peer_of(parts: &axum::http::request::Parts) -> SocketAddr {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// The shared path of the POST routes: write key (query first when given, else Basic
/// auth) and declared length judged from the head, body within the limit, ingest,
/// count. A request refused before its body was read gets a lingering close (see
/// [`body::linger`]).
async fn post_events(
    gw: &Gateway,
    req: Request,
    query_key: Option<String>,
    route_type: Option<&'static str>,
    route: &'static str,
) -> Response {
    let started = std::time::Instant::now();
    let (parts, mut body) = req.into_parts();
    let (peer, headers) = (peer_of(&parts), &parts.headers);
    let limit = gw.max_request_bytes;
    // What the head alone decides: a malformed or unknown write key (a wrong key is a
    // 401 whatever the body holds), a declared length over the limit, an encoding it
    // cannot decode.
    let head = (|| {
        let key = match query_key.filter(|k| !k.is_empty()) {
            Some(k) => Some(k),
            None => auth::basic_user(headers)?,
        };
        let source = match key.as_deref() {
            Some(k) => Some(gw.source(Some(k))?),
            None => None,
        };
        body::check_declared_length(headers, limit)?;
        body::gzipped(headers)?;
        Ok::<_, ApiError>((key, source))
    })();
    let result = match head {
        Err(e) => Err(early(headers, &mut body, limit, e).await),
        Ok((key, source)) => match body::read(headers, &mut body, limit).await {
            Err(body::Refused::TooLarge) => Err(early(headers, &mut body, limit, TOO_LARGE).await),
            Err(refused) => Err(refused.answer().into_response()),
            Ok(bytes) => gw
                .ingest(Ingest {
                    headers,
                    peer,
                    key: key.as_deref(),
                    source,
                    route_type,
                    body: &bytes,
                })
                .await
                .map_err(IntoResponse::into_response),
        },
    };
    let response = gw.finish(result, route);
    gw.latency.record(started.elapsed().as_secs_f64());
    response
}

/// The answer to a request refused before its body was read: the rest of the body is
/// read and discarded first (bounded), then the connection closes unless the body was
/// read to its end.
async fn early(
    headers: &HeaderMap,
    body: &mut axum::body::Body,
    limit: usize,
    error: ApiError,
) -> Response {
    let drained = body::linger(headers, body, limit).await;
    let mut response = error.into_response();
    if !drained {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

async fn single(
    State(gw): State<Arc<Gateway>>,
    Path(kind): Path<String>,
    req: Request,
) -> Response {
    let Some(route_type) = SINGLE_ROUTES.iter().copied().find(|r| *r == kind) else {
        return (StatusCode::NOT_FOUND, "404 page not found").into_response();
    };
    post_events(&gw, req, None, Some(route_type), route_type).await
}

async fn batch(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    post_events(&gw, req, None, None, "batch").await
}

/// `navigator.sendBeacon`: text/plain body, write key in the query.
async fn beacon(
    State(gw): State<Arc<Gateway>>,
    Query(q): Query<KeyQuery>,
    req: Request,
) -> Response {
    post_events(&gw, req, q.write_key, None, "beacon").await
}

/// What RudderStack's JavaScript SDK fetches from its `configUrl`.
async fn source_config(
    State(gw): State<Arc<Gateway>>,
    Query(q): Query<KeyQuery>,
    headers: HeaderMap,
) -> Response {
    let key = match auth::basic_user(&headers) {
        Ok(Some(k)) => Some(k),
        Ok(None) => q.write_key,
        Err(e) => return e.into_response(),
    };
    let source = match gw.source(key.as_deref()) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let c = &source.config;
    let body = serde_json::json!({
        "isHosted": false,
        "source": {
            "id": c.id,
            "name": c.name.clone().unwrap_or_else(|| c.id.clone()),
            "writeKey": c.write_key,
            "enabled": c.enabled,
            "config": {},
            "deleted": false,
            "workspaceId": "ballast",
            "destinations": [],
        }
    });
    axum::Json(body).into_response()
}
