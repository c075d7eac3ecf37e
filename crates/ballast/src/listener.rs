//! The HTTP/1 accept loop of both listeners (public and admin), with connection hygiene:
//!
//! - a cap on open connections: past it the loop stops accepting, so further clients wait
//!   in the kernel's accept queue (and get refused there once it is full) instead of
//!   taking file descriptors the event log needs;
//! - a header read timeout (from a request's first byte to the end of its headers);
//! - an idle timeout (a keep-alive connection with no request in progress);
//! - a body read deadline with a minimum rate ([`TimedBody`]): the body must arrive
//!   within `body_read_timeout`, extended by one second per `body_min_rate` bytes read.
//!
//! axum's own `serve` has none of these; hyper's `header_read_timeout` starts when a
//! connection goes idle, so it cannot tell a slow header from an idle keep-alive
//! connection. Here a small per-connection watchdog does both.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http_body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tower::ServiceExt;

use crate::config::ServerConfig;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The limits one listener enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_read_timeout: Duration,
    /// Bytes per second that extend the body deadline (0: the deadline is fixed).
    pub body_min_rate: u64,
    pub max_connections: usize,
}

impl Limits {
    /// The public listener's limits, with the connection cap already fitted to the
    /// file descriptors (see [`connection_caps`]).
    pub fn from_config(c: &ServerConfig, max_connections: usize) -> Limits {
        Limits {
            header_read_timeout: c.header_read_timeout,
            idle_timeout: c.idle_timeout,
            body_read_timeout: c.body_read_timeout,
            body_min_rate: c.body_min_rate,
            max_connections: max_connections.max(1),
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (as Go's runtime does) and returns
/// the soft limit in effect, if it can be read.
pub fn raise_fd_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct passed by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    Some(lim.rlim_cur)
}

/// Descriptors this process has open now (Linux: `/proc/self/fd`).
pub fn open_fds() -> Option<u64> {
    std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64)
}

/// Connection caps (public, admin) that leave `fd_reserve` descriptors, beyond those
/// already open, to the event log, the alert outbox and the destinations.
pub fn connection_caps(
    c: &ServerConfig,
    fd_limit: Option<u64>,
    open: Option<u64>,
) -> (usize, usize) {
    let Some(limit) = fd_limit else {
        return (c.max_connections, c.admin_max_connections);
    };
    let budget = limit
        .saturating_sub(open.unwrap_or(64))
        .saturating_sub(c.fd_reserve);
    let budget = usize::try_from(budget).unwrap_or(usize::MAX).max(2);
    let admin = c.admin_max_connections.min(budget / 4).max(1);
    let public = c.max_connections.min(budget - admin).max(1);
    (public, admin)
}

/// Keeps file descriptors for the event log while the process runs: the public
/// listener stops accepting while its connections, plus every other descriptor the
/// process has open (the log's files, databases, sockets to destinations, admin
/// connections), plus the reserve would pass `RLIMIT_NOFILE`. The static cap
/// ([`connection_caps`]) is set at start; this follows what opens later (e.g. the log's
/// read handles, at most a few dozen whatever its backlog).
pub struct FdBudget {
    limit: Option<u64>,
    reserve: u64,
    /// Open connections of the listener this budget gates.
    connections: AtomicU64,
    /// Descriptors open besides those connections, as last sampled.
    others: AtomicU64,
    /// True while the budget is spent: idle connections are closed to give their
    /// descriptors back.
    pressure: watch::Sender<bool>,
    /// For the liveness watchdog: since when the accept loop has held new connections
    /// back (budget spent, or `accept` failing), as milliseconds since `epoch` plus one
    /// (0: it is not holding back).
    epoch: Instant,
    held_since: AtomicU64,
    /// The listening socket (-1: not listening).
    listen_fd: std::sync::atomic::AtomicI32,
}

/// Under descriptor pressure, connections idle at least this long are closed.
const SHED_IDLE_AFTER: Duration = Duration::from_secs(1);

/// How often [`FdBudget::run_sampler`] counts the open descriptors.
const FD_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

impl FdBudget {
    pub fn new(limit: Option<u64>, reserve: u64) -> Arc<FdBudget> {
        Arc::new(FdBudget {
            limit,
            reserve,
            connections: AtomicU64::new(0),
            others: AtomicU64::new(0),
            pressure: watch::channel(false).0,
            epoch: Instant::now(),
            held_since: AtomicU64::new(0),
            listen_fd: std::sync::atomic::AtomicI32::new(-1),
        })
    }

    /// The accept loop starts holding new connections back (kept from the first time).
    fn hold(&self) {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let _ = self
            .held_since
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The accept loop took a connection.
    fn accepted(&self) {
        self.held_since.store(0, Ordering::Release);
    }

    /// How long the accept loop has held new connections back while one waits in the
    /// kernel's accept queue (None: it accepts, or nobody waits). Waiting at
    /// `max_connections` is not holding back: that is the cap doing its job.
    pub fn stalled_for(&self) -> Option<Duration> {
        let since = self.held_since.load(Ordering::Acquire);
        if since == 0 || !pending_connection(self.listen_fd.load(Ordering::Acquire)) {
            return None;
        }
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        Some(Duration::from_millis(now.saturating_sub(since)))
    }

    /// The `RLIMIT_NOFILE` it keeps within (None: unknown, nothing held back).
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// A budget that never holds anything back (tests, admin).
    pub fn unlimited() -> Arc<FdBudget> {
        FdBudget::new(None, 0)
    }

    fn has_room(&self) -> bool {
        match self.limit {
            None => true,
            Some(limit) => {
                let used = self.connections.load(Ordering::Acquire)
                    + self.others.load(Ordering::Acquire)
                    + self.reserve;
                used < limit
            }
        }
    }

    fn sample(&self) {
        if let Some(open) = open_fds() {
            let conns = self.connections.load(Ordering::Acquire);
            self.others
                .store(open.saturating_sub(conns), Ordering::Release);
        }
        let spent = !self.has_room();
        self.pressure.send_if_modified(|p| {
            let changed = *p != spent;
            *p = spent;
            changed
        });
    }

    /// Counts the open descriptors now and then until `stop`.
    pub async fn run_sampler(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        if self.limit.is_none() {
            return;
        }
        loop {
            self.sample();
            tokio::select! {
                _ = tokio::time::sleep(FD_SAMPLE_INTERVAL) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

/// True when a connection waits in the accept queue of the listening socket `fd`.
fn pending_connection(fd: i32) -> bool {
    if fd < 0 {
        return false;
    }
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd passed, and returns at once (timeout 0).
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & libc::POLLIN != 0
}

/// Serves `app` on `listener` until `stop` turns true, then closes idle connections,
/// lets in-flight requests finish and returns once every connection is closed.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    budget: Arc<FdBudget>,
    name: &'static str,
    stop: watch::Receiver<bool>,
) {
    let permits = limits
        .max_connections
        .min(Semaphore::MAX_PERMITS)
        .min(u32::MAX as usize);
    let slots = Arc::new(Semaphore::new(permits));
    let open = metrics::gauge!("ballast_connections_open", "listener" => name);
    let accept_errors = metrics::counter!("ballast_accept_errors_total", "listener" => name);
    let mut last_error_log: Option<Instant> = None;
    let mut stopped = stop.clone();
    {
        use std::os::fd::AsRawFd;
        budget
            .listen_fd
            .store(listener.as_raw_fd(), Ordering::Release);
    }
    loop {
        if *stopped.borrow() {
            break;
        }
        // A slot first: at the cap, clients wait in the accept queue.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            // Err: the server is gone without saying so; stop as well.
            r = stopped.changed() => if r.is_err() { break } else { continue },
        };
        // Descriptors for the log first: wait while the budget is spent.
        let mut waited = false;
        while !budget.has_room() && !*stopped.borrow() {
            budget.hold();
            if !waited {
                waited = true;
                tracing::warn!(
                    listener = name,
                    connections = budget.connections.load(Ordering::Relaxed),
                    fd_limit = budget.limit,
                    fd_reserve = budget.reserve,
                    "file descriptors near the limit: new connections wait until some close"
                );
                metrics::counter!("ballast_accept_paused_total", "listener" => name).increment(1);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => budget.sample(),
                r = stopped.changed() => if r.is_err() { return },
            }
        }
        if waited {
            tracing::info!(listener = name, "accepting connections again");
        }
        if *stopped.borrow() {
            break;
        }
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE/ENFILE/ECONNABORTED...: never fatal; back off a little.
                    budget.hold();
                    accept_errors.increment(1);
                    if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(listener = name, error = %e, "accepting a connection failed; retrying");
                        last_error_log = Some(Instant::now());
                    }
                    drop(permit);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            r = stopped.changed() => if r.is_err() { break } else { continue },
        };
        budget.accepted();
        let _ = tcp.set_nodelay(true);
        open.increment(1.0);
        budget.connections.fetch_add(1, Ordering::AcqRel);
        let app = app.clone();
        let stop = stop.clone();
        let open = open.clone();
        let budget = budget.clone();
        tokio::spawn(async move {
            let pressure = budget.pressure.subscribe();
            connection(tcp, peer, app, limits, name, stop, pressure).await;
            open.decrement(1.0);
            budget.connections.fetch_sub(1, Ordering::AcqRel);
            drop(permit);
        });
    }
    budget.listen_fd.store(-1, Ordering::Release);
    drop(listener);
    // Every connection gives its slot back when it closes.
    let _ = slots.acquire_many(permits as u32).await;
}

/// What a connection is doing, for its watchdog.
struct Activity {
    epoch: Instant,
    /// Requests whose response is not yet sent.
    busy: AtomicUsize,
    /// When the first byte of the next request's head arrived (ms since `epoch`, +1; 0:
    /// none yet).
    head_started: AtomicU64,
    /// When the connection last became idle (ms since `epoch`).
    idle_since: AtomicU64,
    changed: Notify,
}

impl Activity {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// When the connection must close unless something happens first, and why.
    fn deadline(&self, l: &Limits) -> Option<(Instant, &'static str)> {
        if self.busy.load(Ordering::Acquire) > 0 {
            return None;
        }
        match self.head_started.load(Ordering::Acquire) {
            0 => Some((
                self.at(self.idle_since.load(Ordering::Acquire)) + l.idle_timeout,
                "idle_timeout",
            )),
            h => Some((self.at(h - 1) + l.header_read_timeout, "header_timeout")),
        }
    }
}

/// Marks a request in progress until its response body is dropped.
struct BusyGuard(Arc<Activity>);

impl BusyGuard {
    fn new(a: Arc<Activity>) -> BusyGuard {
        a.head_started.store(0, Ordering::Release);
        a.busy.fetch_add(1, Ordering::AcqRel);
        BusyGuard(a)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since.store(a.now_ms(), Ordering::Release);
        a.busy.fetch_sub(1, Ordering::AcqRel);
        a.changed.notify_one();
    }
}

/// The TCP stream, noting when a new request's head starts to arrive.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let a = &self.activity;
            if a.busy.load(Ordering::Acquire) == 0 && a.head_started.load(Ordering::Acquire) == 0 {
                a.head_started.store(a.now_ms() + 1, Ordering::Release);
                a.changed.notify_one();
            }
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A response body that keeps its request marked in progress until it is sent.
struct GuardedBody {
    inner: Body,
    _guard: BusyGuard,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    app: axum::Router,
    limits: Limits,
    name: &'static str,
    mut stop: watch::Receiver<bool>,
    pressure: watch::Receiver<bool>,
) {
    let mut pressure = pressure;
    let activity = Arc::new(Activity {
        epoch: Instant::now(),
        busy: AtomicUsize::new(0),
        head_started: AtomicU64::new(0),
        idle_since: AtomicU64::new(0),
        changed: Notify::new(),
    });
    let io = TokioIo::new(Tracked {
        inner: tcp,
        activity: activity.clone(),
    });
    let a = activity.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let guard = BusyGuard::new(a.clone());
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(ConnectInfo(peer));
        let req = hyper::Request::from_parts(parts, Body::new(TimedBody::new(body, &limits)));
        let app = app.clone();
        async move {
            let response = match app.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            Ok::<_, Infallible>(response.map(|inner| GuardedBody {
                inner,
                _guard: guard,
            }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        // A client that shuts its sending side after a whole request (shutdown(SHUT_WR))
        // still reads the answer; without it hyper dropped the request at the EOF,
        // after the events may have been stored.
        .half_close(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let mut closing = *stop.borrow();
    let mut budget_alive = true;
    if closing {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        let mut deadline = activity.deadline(&limits);
        // Out of descriptors: a connection idle for a while gives its own back to the log
        // (not one between two requests of a busy keep-alive client).
        if *pressure.borrow() && activity.busy.load(Ordering::Acquire) == 0 {
            let shed_at =
                activity.at(activity.idle_since.load(Ordering::Acquire)) + SHED_IDLE_AFTER;
            if shed_at <= Instant::now() {
                metrics::counter!("ballast_connections_timed_out_total", "listener" => name, "reason" => "fd_pressure").increment(1);
                tracing::debug!(listener = name, %peer, "closing an idle connection: file descriptors near the limit");
                return;
            }
            deadline = match deadline {
                Some((at, why)) if at <= shed_at => Some((at, why)),
                _ => Some((shed_at, "fd_pressure")),
            };
        }
        tokio::select! {
            r = pressure.changed(), if budget_alive => {
                // Err: the budget is gone (the server stops); stop watching it.
                budget_alive = r.is_ok();
            }
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(listener = name, %peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = sleep_until(deadline.map(|d| d.0)) => {
                if let Some((at, why)) = activity.deadline(&limits) {
                    if at <= Instant::now() {
                        metrics::counter!("ballast_connections_timed_out_total", "listener" => name, "reason" => why).increment(1);
                        tracing::debug!(listener = name, %peer, reason = why, "closing connection");
                        return; // dropping the connection closes the socket
                    }
                }
            }
            _ = activity.changed.notified() => {}
            r = stop.changed(), if !closing => {
                if r.is_err() || *stop.borrow() {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The body did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("request body read timeout")]
pub struct BodyTimeout;

/// True when `e` (or what caused it) is a [`BodyTimeout`].
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<BodyTimeout>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A request body that fails with [`BodyTimeout`] unless its bytes arrive by a deadline:
/// `body_read_timeout` after the request started, plus one second per `body_min_rate`
/// bytes received so far.
pub struct TimedBody<B> {
    inner: B,
    started: tokio::time::Instant,
    received: u64,
    grace: Duration,
    rate: u64,
    /// Created the first time the body has to be waited for.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    timed_out: bool,
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, limits: &Limits) -> TimedBody<B> {
        let started = tokio::time::Instant::now();
        TimedBody {
            inner,
            started,
            received: 0,
            grace: limits.body_read_timeout,
            rate: limits.body_min_rate,
            sleep: None,
            timed_out: false,
        }
    }

    fn deadline(&self) -> tokio::time::Instant {
        let extra = if self.rate == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(self.received as f64 / self.rate as f64)
        };
        self.started + self.grace + extra
    }
}

impl<B> http_body::Body for TimedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.timed_out {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.received += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                // The timer is only touched when the body has to be waited for (a body
                // that is already there costs no timer at all).
                let at = self.deadline();
                let sleep = match &mut self.sleep {
                    Some(sleep) => {
                        if sleep.deadline() != at {
                            sleep.as_mut().reset(at);
                        }
                        sleep
                    }
                    None => self.sleep.insert(Box::pin(tokio::time::sleep_until(at))),
                };
                if std::future::Future::poll(sleep.as_mut(), cx).is_ready() {
                    self.timed_out = true;
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn limits(grace_ms: u64, rate: u64) -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            body_read_timeout: Duration::from_millis(grace_ms),
            body_min_rate: rate,
            max_connections: 1,
        }
    }

    /// A body of `chunks` 10-byte pieces, one every `every`.
    struct Trickle(tokio::sync::mpsc::Receiver<Bytes>);

    impl http_body::Body for Trickle {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    fn trickle(chunks: usize, every: Duration) -> Trickle {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            for _ in 0..chunks {
                tokio::time::sleep(every).await;
                if tx.send(Bytes::from_static(b"0123456789")).await.is_err() {
                    return;
                }
            }
        });
        Trickle(rx)
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_within_the_deadline_is_read_whole() {
        let body = TimedBody::new(trickle(5, Duration::from_millis(100)), &limits(1000, 0));
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_body_times_out() {
        // 10 bytes a second; the deadline is 1 s plus 1 s per 100 bytes.
        let body = TimedBody::new(trickle(100, Duration::from_secs(1)), &limits(1000, 100));
        let e = body.collect().await.unwrap_err();
        assert!(is_body_timeout(&*e), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_minimum_rate_extends_the_deadline() {
        // 10 bytes every 50 ms = 200 B/s, above the 100 B/s minimum: 3 s in all, past
        // the 1 s grace.
        let body = TimedBody::new(trickle(60, Duration::from_millis(50)), &limits(1000, 100));
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), 600);
    }

    #[tokio::test]
    async fn a_waiting_connection_is_seen_in_the_accept_queue() {
        use std::os::fd::AsRawFd;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fd = l.as_raw_fd();
        assert!(!pending_connection(fd));
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(pending_connection(fd));
        let _ = l.accept().await.unwrap();
        assert!(!pending_connection(fd));
        assert!(!pending_connection(-1));
    }

    #[test]
    fn connection_caps_leave_the_reserve() {
        let mut c = ServerConfig {
            fd_reserve: 100,
            max_connections: 10_000,
            admin_max_connections: 64,
            ..Default::default()
        };
        assert_eq!(connection_caps(&c, None, None), (10_000, 64));
        // 1024 - 24 open - 100 reserve = 900: 64 for admin, 836 public.
        assert_eq!(connection_caps(&c, Some(1024), Some(24)), (836, 64));
        // Tiny limits still leave one of each.
        let (p, a) = connection_caps(&c, Some(50), Some(40));
        assert!(p >= 1 && a >= 1);
        c.max_connections = 10;
        assert_eq!(connection_caps(&c, Some(1 << 20), Some(24)).0, 10);
    }
}
