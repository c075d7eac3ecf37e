//! The load generator: N tasks, each with one HTTP/1.1 keep-alive connection,
//! each sending one request at a time and waiting for the answer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use crate::events::{generate_pool, BodyTemplate};

/// Extra time after the deadline for a request in flight to finish before it
/// is abandoned (the loops never run past `deadline + GRACE`).
const GRACE: Duration = Duration::from_secs(5);
/// Highest latency the histogram records (larger values are clamped).
const MAX_LATENCY_US: u64 = 60_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One event per request, POST /v1/track.
    Single,
    /// `{"batch":[...]}` of --batch-size events per request, POST /v1/batch.
    Batch,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Single => "single",
            Mode::Batch => "batch",
        })
    }
}

/// What to send, where, and for how long.
#[derive(Clone, Debug, clap::Args)]
pub struct LoadConfig {
    /// Base URL of the server; must resolve to a loopback address.
    #[arg(long)]
    pub url: String,
    /// Write key, sent as the Basic-auth user name with an empty password.
    #[arg(long, default_value = "bench-write-key")]
    pub write_key: String,
    /// Concurrent connections (one task each, one request in flight each).
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Length of the measured phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// What each request carries.
    #[arg(long, value_enum, default_value_t = Mode::Single)]
    pub mode: Mode,
    /// Events per request in batch mode.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Load before the measured phase; its requests are not counted.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Number of distinct pre-generated bodies (default 2000 single, 200 batch).
    #[arg(long)]
    pub pool: Option<usize>,
    /// Distinct userIds the events are drawn from (1: every event from one hot user).
    #[arg(long, default_value_t = crate::events::USER_POOL)]
    pub users: u32,
    /// Events per second to offer over all connections together, warm-up included (0: as
    /// fast as the server answers). Requests are sent on a fixed schedule; a server that
    /// falls behind it gets the late ones at once, never a burst beyond --connections.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

/// Results of one load run. Only requests that started after the warm-up and
/// completed before the deadline are counted.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    pub url: String,
    pub mode: Mode,
    pub connections: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub events_per_request: usize,
    pub avg_body_bytes: usize,
    /// Requests answered 200.
    pub requests: u64,
    /// Events in requests answered 200.
    pub events: u64,
    pub requests_per_sec: f64,
    pub events_per_sec: f64,
    /// Requests answered with another status.
    pub non_200: u64,
    /// Status code → count for non-200 answers.
    pub statuses: BTreeMap<u16, u64>,
    /// Connection failures, I/O errors and timeouts.
    pub errors: u64,
    pub last_error: Option<String>,
    /// Latency of 200 answers.
    pub latency: Latency,
    /// Wall-clock start of the load (warm-up included) and end of the last
    /// request, in ms since the Unix epoch.
    pub started_unix_ms: u64,
    pub finished_unix_ms: u64,
    /// Requests and events answered 200 over the whole run: warm-up, measured
    /// phase and requests that completed after the deadline.
    pub accepted_requests_total: u64,
    pub accepted_events_total: u64,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

struct Shared {
    addr: SocketAddr,
    path: Uri,
    host: HeaderValue,
    auth: HeaderValue,
    pool: Vec<BodyTemplate>,
    measure_start: Instant,
    deadline: Instant,
    /// With `--rate`: the time between two requests of the schedule, which starts at
    /// `start`; `slot` hands out its places.
    pace: Option<(Instant, Duration)>,
    slot: std::sync::atomic::AtomicU64,
}

struct WorkerStats {
    /// 200 answers and their events, whatever the phase.
    all_ok: u64,
    all_events: u64,
    ok: u64,
    events: u64,
    non_200: u64,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    last_error: Option<String>,
    hist: Histogram<u64>,
}

/// Base64 (standard alphabet, padded), enough for a Basic-auth header.
pub fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Parses `url`, resolves it and checks that it is a loopback address.
/// Returns the socket address, the `Host` header value and the base path.
pub async fn resolve_loopback(url: &str) -> anyhow::Result<(SocketAddr, String, String)> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("invalid URL {url:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("only http:// URLs are supported: {url}");
    }
    let authority = uri
        .authority()
        .with_context(|| format!("URL has no host: {url}"))?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .collect();
    let Some(addr) = addrs.first().copied() else {
        bail!("{host} resolves to no address");
    };
    if addrs.iter().any(|a| !a.ip().is_loopback()) {
        bail!("refusing to send load to a non-loopback address ({addrs:?})");
    }
    let base = uri.path().trim_end_matches('/').to_owned();
    Ok((addr, authority.as_str().to_owned(), base))
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // Ends when the sender is dropped or the connection fails.
        let _ = conn.await;
    });
    Ok(sender)
}

async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> anyhow::Result<StatusCode> {
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    resp.into_body().collect().await?;
    Ok(status)
}

async fn worker(id: usize, shared: Arc<Shared>) -> anyhow::Result<WorkerStats> {
    let mut stats = WorkerStats {
        all_ok: 0,
        all_events: 0,
        ok: 0,
        events: 0,
        non_200: 0,
        statuses: BTreeMap::new(),
        errors: 0,
        last_error: None,
        hist: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?,
    };
    let hard_deadline = shared.deadline + GRACE;
    let pool = &shared.pool;
    // Spread the tasks over the pool so they don't send identical bodies.
    let mut next = id.wrapping_mul(7919) % pool.len();
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    while Instant::now() < shared.deadline {
        if sender.is_none() {
            match timeout_at(hard_deadline, connect(shared.addr)).await {
                Ok(Ok(s)) => sender = Some(s),
                outcome => {
                    if Instant::now() >= shared.measure_start {
                        stats.errors += 1;
                    }
                    stats.last_error = Some(match outcome {
                        Ok(Err(err)) => format!("connect: {err:#}"),
                        _ => "connect: timed out".into(),
                    });
                    let pause = (Instant::now() + Duration::from_millis(50)).min(shared.deadline);
                    tokio::time::sleep_until(pause).await;
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else {
            continue;
        };
        if let Some((start, every)) = shared.pace {
            let k = shared
                .slot
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let at = start + every.saturating_mul(u32::try_from(k).unwrap_or(u32::MAX));
            if at >= shared.deadline {
                break;
            }
            tokio::time::sleep_until(at).await;
        }
        let template = &pool[next];
        next = (next + 1) % pool.len();
        let req = Request::builder()
            .method(Method::POST)
            .uri(shared.path.clone())
            .header(HOST, shared.host.clone())
            .header(AUTHORIZATION, shared.auth.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(template.render()))?;
        let start = Instant::now();
        let outcome = timeout_at(hard_deadline, send(s, req)).await;
        let end = Instant::now();
        let measured = start >= shared.measure_start;
        match outcome {
            Ok(Ok(StatusCode::OK)) => {
                stats.all_ok += 1;
                stats.all_events += template.events() as u64;
                if measured && end <= shared.deadline {
                    stats.ok += 1;
                    stats.events += template.events() as u64;
                    let us = u64::try_from((end - start).as_micros()).unwrap_or(u64::MAX);
                    stats.hist.saturating_record(us.clamp(1, MAX_LATENCY_US));
                }
            }
            Ok(Ok(status)) => {
                if measured {
                    stats.non_200 += 1;
                    *stats.statuses.entry(status.as_u16()).or_default() += 1;
                }
            }
            Ok(Err(err)) => {
                if measured {
                    stats.errors += 1;
                }
                stats.last_error = Some(format!("{err:#}"));
                sender = None;
            }
            Err(_) => {
                if measured {
                    stats.errors += 1;
                }
                stats.last_error = Some("request timed out".into());
                sender = None;
            }
        }
    }
    Ok(stats)
}

/// Runs one load test and returns its figures.
pub async fn run(cfg: &LoadConfig) -> anyhow::Result<LoadReport> {
    if cfg.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if cfg.duration.is_zero() {
        bail!("--duration must be positive");
    }
    if cfg.users == 0 {
        bail!("--users must be at least 1");
    }
    let (addr, host, base) = resolve_loopback(&cfg.url).await?;
    let (route, batch) = match cfg.mode {
        Mode::Single => ("/v1/track", None),
        Mode::Batch => ("/v1/batch", Some(cfg.batch_size.max(1))),
    };
    let pool_size = cfg.pool.unwrap_or(match cfg.mode {
        Mode::Single => 2000,
        Mode::Batch => 200,
    });
    let pool = generate_pool(pool_size, batch, 42, cfg.users);
    let avg_body_bytes = pool.iter().map(|t| t.render().len()).sum::<usize>() / pool.len();
    let events_per_request = pool.first().map_or(1, BodyTemplate::events);

    let started_unix_ms = unix_ms(SystemTime::now());
    let start = Instant::now();
    let measure_start = start + cfg.warmup;
    let shared = Arc::new(Shared {
        addr,
        path: format!("{base}{route}").parse()?,
        host: HeaderValue::from_str(&host)?,
        auth: HeaderValue::from_str(&format!(
            "Basic {}",
            base64(format!("{}:", cfg.write_key).as_bytes())
        ))?,
        pool,
        measure_start,
        deadline: measure_start + cfg.duration,
        pace: (cfg.rate > 0).then(|| {
            let per_second = cfg.rate as f64 / events_per_request.max(1) as f64;
            (start, Duration::from_secs_f64(1.0 / per_second.max(1e-3)))
        }),
        slot: std::sync::atomic::AtomicU64::new(0),
    });
    let tasks: Vec<_> = (0..cfg.connections)
        .map(|id| tokio::spawn(worker(id, shared.clone())))
        .collect();

    let mut total = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3)?;
    let mut report = LoadReport {
        url: cfg.url.clone(),
        mode: cfg.mode,
        connections: cfg.connections,
        duration_s: cfg.duration.as_secs_f64(),
        warmup_s: cfg.warmup.as_secs_f64(),
        events_per_request,
        avg_body_bytes,
        requests: 0,
        events: 0,
        requests_per_sec: 0.0,
        events_per_sec: 0.0,
        non_200: 0,
        statuses: BTreeMap::new(),
        errors: 0,
        last_error: None,
        latency: Latency {
            p50_us: 0,
            p90_us: 0,
            p99_us: 0,
            p999_us: 0,
            max_us: 0,
            mean_us: 0.0,
        },
        started_unix_ms,
        finished_unix_ms: 0,
        accepted_requests_total: 0,
        accepted_events_total: 0,
    };
    for task in tasks {
        let stats = task.await.context("load task panicked")??;
        report.accepted_requests_total += stats.all_ok;
        report.accepted_events_total += stats.all_events;
        report.requests += stats.ok;
        report.events += stats.events;
        report.non_200 += stats.non_200;
        report.errors += stats.errors;
        for (status, n) in stats.statuses {
            *report.statuses.entry(status).or_default() += n;
        }
        if stats.last_error.is_some() {
            report.last_error = stats.last_error;
        }
        total.add(&stats.hist)?;
    }
    report.finished_unix_ms = unix_ms(SystemTime::now());
    let secs = cfg.duration.as_secs_f64();
    report.requests_per_sec = report.requests as f64 / secs;
    report.events_per_sec = report.events as f64 / secs;
    if !total.is_empty() {
        report.latency = Latency {
            p50_us: total.value_at_quantile(0.50),
            p90_us: total.value_at_quantile(0.90),
            p99_us: total.value_at_quantile(0.99),
            p999_us: total.value_at_quantile(0.999),
            max_us: total.max(),
            mean_us: total.mean(),
        };
    }
    Ok(report)
}

/// Formats microseconds as milliseconds with two decimals.
pub fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

impl LoadReport {
    pub fn print_human(&self) {
        println!(
            "target     {} ({} mode, {} events/request, ~{} B/body, {} connections, {:.1}s measured after {:.1}s warm-up)",
            self.url,
            self.mode,
            self.events_per_request,
            self.avg_body_bytes,
            self.connections,
            self.duration_s,
            self.warmup_s
        );
        println!(
            "requests   {} ok = {:.1} req/s",
            self.requests, self.requests_per_sec
        );
        println!(
            "events     {} ok = {:.1} events/s",
            self.events, self.events_per_sec
        );
        println!(
            "latency    p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {:.2} ms",
            ms(self.latency.p50_us),
            ms(self.latency.p90_us),
            ms(self.latency.p99_us),
            ms(self.latency.p999_us),
            ms(self.latency.max_us),
            self.latency.mean_us / 1000.0
        );
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}×{n}"))
            .collect();
        println!(
            "failures   non-200 {}{}  errors {}{}",
            self.non_200,
            if statuses.is_empty() {
                String::new()
            } else {
                format!(" ({})", statuses.join(", "))
            },
            self.errors,
            self.last_error
                .as_deref()
                .map(|e| format!(" (last: {e})"))
                .unwrap_or_default()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(b"bench-write-key:"), "YmVuY2gtd3JpdGUta2V5Og==");
    }

    #[tokio::test]
    async fn a_rate_is_never_exceeded() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let server = tokio::spawn(crate::null::run(addr));
        let cfg = LoadConfig {
            url: format!("http://{addr}"),
            write_key: "k".into(),
            connections: 4,
            duration: Duration::from_millis(800),
            mode: Mode::Batch,
            batch_size: 10,
            warmup: Duration::from_millis(200),
            pool: Some(8),
            users: 100,
            rate: 1_000,
        };
        // The null server may not be listening yet: the first requests then fail to
        // connect and are retried.
        let report = run(&cfg).await.unwrap();
        server.abort();
        // 1,000 events/s for 1 s in requests of 10: 100 places on the schedule at most
        // (a server as fast as the null one would take thousands unpaced).
        assert!(report.accepted_events_total <= 1_000, "{report:?}");
        assert!(report.accepted_events_total > 0, "{report:?}");
    }

    #[tokio::test]
    async fn refuses_non_loopback_targets() {
        assert!(resolve_loopback("http://192.0.2.1:80").await.is_err());
        assert!(resolve_loopback("https://127.0.0.1:80").await.is_err());
        let (addr, host, base) = resolve_loopback("http://127.0.0.1:8080/").await.unwrap();
        assert_eq!(addr.to_string(), "127.0.0.1:8080");
        assert_eq!(host, "127.0.0.1:8080");
        assert_eq!(base, "");
    }
}
