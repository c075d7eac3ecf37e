//! `ballast serve`: wires store, gateway and admin API together, and runs until SIGTERM
//! or SIGINT (graceful: readiness off, drain, in-flight requests finish, the writer
//! flushes, exit 0) or a fatal storage failure (exit non-zero; the next start recovers
//! from the log).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::alerts::{Action, Alerts, Severity};
use crate::config::Config;
use crate::gateway::Gateway;
use crate::readiness::ServerState;
use crate::recovery::journal::Journal;
use crate::recovery::{Mode, Recovery};
use crate::router::{Router, RouterDb, RouterState};
use crate::store::embedded::EmbeddedStore;
use crate::store::postgres::PgStore;
use crate::store::StorageBackend;
use crate::store::Store;

/// Addresses the server bound, written to `<data_dir>/server.json` once it listens (and
/// removed on a clean exit), so that tools and tests can find a server started on port 0.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Addresses {
    pub pid: u32,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
}

/// What a shutdown may take beyond `server.shutdown_timeout`: the listeners get the timeout
/// itself, delivery and the store what is left of it plus this margin (delivery loops
/// finish what is in flight and save their cursors; the store commits what it took).
pub const SHUTDOWN_MARGIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The exit code when a shutdown ran past `server.shutdown_timeout` + [`SHUTDOWN_MARGIN`].
pub const EXIT_SHUTDOWN_TIMEOUT: i32 = 3;

pub fn addresses_path(data_dir: &Path) -> PathBuf {
    data_dir.join("server.json")
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        r = tokio::signal::ctrl_c() => match r {
            Ok(()) => "SIGINT",
            Err(_) => std::future::pending().await,
        },
    }
}

/// Runs the server; returns the process exit code. `forced_mode` is `serve --mode`.
///
/// Phases: storage and the alert outbox (every later state change writes its alert first);
/// the running mode; the router's state and the crash journal's strikes; delivery; the
/// listeners (then `server.json`); serving until a signal or a fatal storage failure;
/// shutting down in order.
pub async fn run(config: Config, forced_mode: Option<Mode>) -> anyhow::Result<i32> {
    let data_dir = config.server.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let prometheus = crate::admin::install_recorder()?;

    let (store, mut fatal, report) = open_store(&config, &data_dir).await?;
    let state = Arc::new(ServerState::default());
    // Alerts first: every state change below writes its alert to the outbox before it
    // takes effect. With the PostgreSQL store the outbox is shared by every replica.
    let alerts = open_alerts(&config, &data_dir, report.as_ref()).await?;
    let (recovery, start) = Recovery::start(
        &data_dir,
        config.recovery.clone(),
        forced_mode,
        alerts.clone(),
    )
    .context("recording the start")?;
    state.set_mode(start.mode);

    let db = open_router_state(&config, &data_dir).await?;
    let journal = open_journal(&config, &data_dir, start.crashed, &*store, &db).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let router = start_delivery(
        &config, &store, db, journal, &alerts, &recovery, &state, start.mode, &stop_rx,
    )
    .await?;
    tokio::spawn(alerts.clone().run_sender(stop_rx.clone()));
    tokio::spawn(recovery.clone().run_quiet_period(stop_rx.clone()));
    tokio::spawn(storage_alerts(
        store.clone(),
        alerts.clone(),
        stop_rx.clone(),
    ));

    let gateway = Arc::new(
        Gateway::new(&config, store.clone(), state.clone())
            .context("opening the de-duplication journals")?,
    );
    let history = Arc::new(crate::admin::history::History::new(
        config.server.history_interval,
        router.status().into_iter().map(|d| d.id).collect(),
    ));
    tokio::spawn(history.clone().run(
        store.clone(),
        router.clone(),
        state.clone(),
        Some(prometheus.clone()),
        stop_rx.clone(),
    ));
    let oldest = Arc::new(crate::admin::OldestEvents::default());
    tokio::spawn(
        oldest
            .clone()
            .run(store.clone(), router.clone(), stop_rx.clone()),
    );
    let admin_app = crate::admin::router(crate::admin::AdminState {
        store: store.clone(),
        state: state.clone(),
        prometheus,
        token: config.server.admin_token.clone(),
        metrics_require_token: config.server.metrics_require_token,
        router: router.clone(),
        recovery: recovery.clone(),
        alerts: alerts.clone(),
        history,
        oldest,
    });
    let (public, admin) = bind(&config, &data_dir).await?;
    let fd_budget =
        crate::listener::FdBudget::new(crate::listener::raise_fd_limit(), config.server.fd_reserve);
    tokio::spawn(watch_liveness(
        config.server.liveness_timeout,
        store.clone(),
        fd_budget.clone(),
        state.clone(),
        stop_rx.clone(),
    ));
    tracing::info!(listen = %public.local_addr()?, admin = %admin.local_addr()?, mode = state.mode().as_health_str(), crashes_in_window = start.crashes_in_window, "ballast is accepting events");
    let servers = serve(
        &config,
        fd_budget,
        public,
        gateway.router(),
        admin,
        admin_app,
        &stop_rx,
    );

    let exit_code = wait_for_stop(&config, &state, &alerts, fatal.as_mut()).await;

    // Shutting down: listeners first (in-flight requests finish), then delivery, then the
    // store (the writer flushes). The whole is bounded by shutdown_timeout plus
    // SHUTDOWN_MARGIN, whatever the store, the destinations or clients do.
    state.set_shutting_down();
    let _ = stop_tx.send(true);
    let shutdown_started = tokio::time::Instant::now();
    if tokio::time::timeout(config.server.shutdown_timeout, servers)
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within shutdown_timeout");
    }
    state.set_routing(false);
    let waiting = std::sync::Mutex::new(
        "delivery (destinations finishing what is in flight, saving cursors)",
    );
    let rest = async {
        router.join().await;
        *waiting.lock().unwrap_or_else(|p| p.into_inner()) =
            "the store (committing appends, closing connections)";
        store.close().await;
    };
    let until = shutdown_started + config.server.shutdown_timeout + SHUTDOWN_MARGIN;
    if tokio::time::timeout_at(until, rest).await.is_err() {
        let still = *waiting.lock().unwrap_or_else(|p| p.into_inner());
        let in_flight: Vec<String> = router
            .status()
            .iter()
            .filter(|d| d.in_flight > 0 || d.buffered_events > 0)
            .map(|d| {
                format!(
                    "{}: {} in flight, {} read",
                    d.id, d.in_flight, d.buffered_events
                )
            })
            .collect();
        tracing::error!(
            waiting_for = still,
            destinations = ?in_flight,
            limit = ?(config.server.shutdown_timeout + SHUTDOWN_MARGIN),
            "shutdown did not finish within server.shutdown_timeout plus its margin; exiting \
             anyway (acknowledged events are in the store; what was in flight is sent again)"
        );
        let _ = std::fs::remove_file(addresses_path(&data_dir));
        return Ok(EXIT_SHUTDOWN_TIMEOUT);
    }
    let _ = std::fs::remove_file(addresses_path(&data_dir));
    if exit_code == 0 {
        recovery
            .clean_shutdown()
            .context("recording the clean shutdown")?;
        tracing::info!("stopped cleanly");
    }
    Ok(exit_code)
}

/// Opens the alert outbox (beside the log, or in the shared database with the PostgreSQL
/// store) and resolves the failed-fsync condition a previous run left open.
async fn open_alerts(
    config: &Config,
    data_dir: &Path,
    report: Option<&ballast_log::RecoveryReport>,
) -> anyhow::Result<Arc<Alerts>> {
    let settings = config.alerts.clone();
    let opened = match (&config.storage.backend, &config.storage.postgres_url) {
        (StorageBackend::Postgres, Some(url)) => {
            let url = url.clone();
            tokio::task::spawn_blocking(move || Alerts::open_postgres(&url, &settings)).await
        }
        _ => {
            let path = data_dir.join("alerts.redb");
            tokio::task::spawn_blocking(move || Alerts::open(&path, &settings)).await
        }
    };
    let alerts = opened
        .context("opening the alert outbox")?
        .context("opening the alert outbox")?;
    // A failed fsync stopped the previous run; the log has been recovered and the
    // writer is running again, so that condition has cleared.
    if let Some(since) = alerts.open_since_local(FSYNC_ALERT)? {
        let alert = alerts.alert(
            FSYNC_ALERT,
            Action::Resolve,
            Severity::Info,
            format!(
                "ballast on {}: the event log was recovered after the failed write and accepts events again",
                alerts.source()
            ),
            serde_json::json!({ "recovered": report.map(|r| r.records), "torn_tail_bytes": report.map(|r| r.torn_tail_bytes), "corrupt_records": report.map(|r| r.corrupt_records) }),
        );
        alerts.raise_local(&format!("{FSYNC_ALERT}:resolved:{since}"), alert)?;
    }
    Ok(alerts)
}

/// The router's state: beside the log in the data directory, or in the shared database
/// with the PostgreSQL store (so that every replica sees it).
async fn open_router_state(
    config: &Config,
    data_dir: &Path,
) -> anyhow::Result<Arc<dyn RouterState>> {
    Ok(
        match (&config.storage.backend, &config.storage.postgres_url) {
            (StorageBackend::Postgres, Some(url)) => Arc::new(
                crate::router::state::postgres::PgRouterState::open(url)
                    .await
                    .context("opening the router state in PostgreSQL")?,
            ),
            _ => {
                let db_path = data_dir.join("router.redb");
                Arc::new(Arc::new(
                    tokio::task::spawn_blocking(move || RouterDb::open(&db_path))
                        .await
                        .context("opening the router state")??,
                ))
            }
        },
    )
}

/// Opens the crash journal: events that were being delivered when the previous run died
/// get a strike; then it starts empty.
async fn open_journal(
    config: &Config,
    data_dir: &Path,
    crashed: bool,
    store: &dyn Store,
    db: &Arc<dyn RouterState>,
) -> anyhow::Result<Arc<Journal>> {
    let (journal, leftover) =
        Journal::open(&data_dir.join("inflight.journal")).context("opening the crash journal")?;
    if crashed && !leftover.is_empty() {
        for ((dest, key), n) in crate::router::strike(store, db, &leftover).await? {
            tracing::warn!(destination = %dest, event = %key, strikes = n, threshold = config.recovery.poison_threshold, "event was in flight when the process died");
        }
    }
    journal.reset().context("resetting the crash journal")?;
    Ok(Arc::new(journal))
}

/// Starts the delivery loops, and the task through which the running mode drives them.
#[allow(clippy::too_many_arguments)]
async fn start_delivery(
    config: &Config,
    store: &Arc<dyn Store>,
    db: Arc<dyn RouterState>,
    journal: Arc<Journal>,
    alerts: &Arc<Alerts>,
    recovery: &Arc<Recovery>,
    state: &Arc<ServerState>,
    mode: Mode,
    stop_rx: &watch::Receiver<bool>,
) -> anyhow::Result<Arc<Router>> {
    let mut mode_rx = recovery.subscribe();
    let (routing_tx, routing_rx) = watch::channel(mode == Mode::Normal);
    let router = Arc::new(
        Router::start(
            config,
            store.clone(),
            db,
            journal,
            alerts.clone(),
            routing_rx,
            stop_rx.clone(),
        )
        .await
        .context("starting delivery")?,
    );
    let has_destinations = !router.destinations.is_empty();
    state.set_routing(has_destinations && mode == Mode::Normal);
    let state = state.clone();
    tokio::spawn(async move {
        while mode_rx.changed().await.is_ok() {
            let mode = *mode_rx.borrow_and_update();
            state.set_mode(mode);
            state.set_routing(has_destinations && mode == Mode::Normal);
            let _ = routing_tx.send(mode == Mode::Normal);
        }
    });
    Ok(router)
}

/// Binds both listeners and writes the addresses to `server.json`.
async fn bind(config: &Config, data_dir: &Path) -> anyhow::Result<(TcpListener, TcpListener)> {
    let public = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("listening on {}", config.server.listen))?;
    let admin = TcpListener::bind(config.server.admin_listen)
        .await
        .with_context(|| format!("listening on {} (admin)", config.server.admin_listen))?;
    let addrs = Addresses {
        pid: std::process::id(),
        listen: public.local_addr()?,
        admin_listen: admin.local_addr()?,
    };
    ballast_log::write_atomically(
        &addresses_path(data_dir),
        &serde_json::to_vec_pretty(&addrs)?,
    )
    .context("writing server.json")?;
    Ok((public, admin))
}

/// Serves both listeners with connection caps that leave file descriptors to the log and
/// the destinations; the future ends when both have closed (after `stop`).
fn serve(
    config: &Config,
    fd_budget: Arc<crate::listener::FdBudget>,
    public: TcpListener,
    public_app: axum::Router,
    admin: TcpListener,
    admin_app: axum::Router,
    stop_rx: &watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> {
    let fd_limit = fd_budget.limit();
    let (public_cap, admin_cap) =
        crate::listener::connection_caps(&config.server, fd_limit, crate::listener::open_fds());
    if public_cap < config.server.max_connections {
        tracing::info!(
            max_connections = public_cap,
            configured = config.server.max_connections,
            fd_limit,
            fd_reserve = config.server.fd_reserve,
            "connection cap lowered to fit the file descriptor limit"
        );
    }
    let public_limits = crate::listener::Limits::from_config(&config.server, public_cap);
    let admin_limits = crate::listener::Limits::from_config(&config.server, admin_cap);
    // ... and that stop accepting while what opens later (segments, sockets) needs them.
    tokio::spawn(fd_budget.clone().run_sampler(stop_rx.clone()));
    let public_server = tokio::spawn(crate::listener::serve(
        public,
        public_app,
        public_limits,
        fd_budget,
        "public",
        stop_rx.clone(),
    ));
    let admin_server = tokio::spawn(crate::listener::serve(
        admin,
        admin_app,
        admin_limits,
        // The admin listener has its own small cap, counted in the public budget: an
        // operator can still look in while the public listener waits for descriptors.
        crate::listener::FdBudget::unlimited(),
        "admin",
        stop_rx.clone(),
    ));
    async move {
        let _ = public_server.await;
        let _ = admin_server.await;
    }
}

/// How often the liveness watchdog looks.
const LIVENESS_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Fails liveness (`/livez` 503 with the reason) while the public accept loop or the
/// store has made no progress for `timeout` with work waiting (a connection in the accept
/// queue; appends submitted, or a segment that cannot be started), so that an
/// orchestrator restarts a wedged process; clears it when they move again.
async fn watch_liveness(
    timeout: std::time::Duration,
    store: Arc<dyn Store>,
    budget: Arc<crate::listener::FdBudget>,
    state: Arc<ServerState>,
    mut stop: watch::Receiver<bool>,
) {
    if timeout.is_zero() {
        return;
    }
    loop {
        let accept = budget.stalled_for().filter(|d| *d >= timeout).map(|d| {
            format!(
                "no connection accepted for {} s while clients wait (file descriptors near the limit)",
                d.as_secs()
            )
        });
        let stored = store
            .stalled()
            .filter(|(d, _)| *d >= timeout)
            .map(|(d, why)| format!("{why} for {} s", d.as_secs()));
        let reason = match (accept, stored) {
            (Some(a), Some(s)) => Some(format!("{a}; {s}")),
            (a, s) => a.or(s),
        };
        if state.set_stalled(reason.clone()) {
            match &reason {
                Some(r) => {
                    tracing::error!(reason = %r, "no progress: /livez fails (503) so that the process is restarted")
                }
                None => tracing::info!("progress again: /livez answers 200"),
            }
        }
        metrics::gauge!("ballast_stalled").set(if reason.is_some() { 1.0 } else { 0.0 });
        tokio::select! {
            _ = tokio::time::sleep(LIVENESS_CHECK_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Waits for SIGTERM/SIGINT or a fatal storage failure; returns the exit code. With
/// `server.shutdown_delay`, keeps serving that long with readiness off before returning.
async fn wait_for_stop(
    config: &Config,
    state: &ServerState,
    alerts: &Arc<Alerts>,
    mut fatal: Option<&mut watch::Receiver<Option<String>>>,
) -> i32 {
    let mut exit_code = tokio::select! {
        sig = shutdown_signal() => {
            tracing::info!(signal = sig, "shutting down: finishing in-flight requests");
            0
        }
        reason = fatal_failure(fatal.as_deref_mut()) => storage_failed(alerts, reason).await,
    };
    let delay = config.server.shutdown_delay;
    if exit_code == 0 && !delay.is_zero() {
        // Not ready, but still serving: load balancers that go by /readyz stop sending
        // before the listeners close. A second signal ends the wait.
        state.start_draining();
        tracing::info!(delay = ?delay, "not ready; still serving for server.shutdown_delay");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            sig = shutdown_signal() => tracing::info!(signal = sig, "second signal: not waiting longer"),
            reason = fatal_failure(fatal) => exit_code = storage_failed(alerts, reason).await,
        }
    }
    exit_code
}

/// A fatal storage failure: logged, alerted (sent now if the notifiers answer); exit 1.
async fn storage_failed(alerts: &Arc<Alerts>, reason: String) -> i32 {
    tracing::error!(error = %reason, "storage failed; stopping so that the next start recovers from the log");
    let alert = alerts.alert(
        FSYNC_ALERT,
        Action::Trigger,
        Severity::Critical,
        format!("ballast on {}: writing the event log failed; the server stops and recovers at its next start", alerts.source()),
        serde_json::json!({ "error": reason }),
    );
    let key = format!(
        "{FSYNC_ALERT}:{}",
        crate::time::to_ms(std::time::SystemTime::now())
    );
    if let Err(e) = alerts.raise_local(&key, alert) {
        tracing::error!(error = %e, "could not record the alert");
    }
    // Send it now if the notifiers answer (bounded): the next start may fail too.
    if !alerts.flush(FATAL_ALERT_FLUSH).await {
        tracing::warn!("alerts not yet delivered stay in the outbox for the next start");
    }
    1
}

/// Opens the configured store: the store, a channel that reports a fatal failure (the
/// embedded log's failed fsync; never for PostgreSQL, whose failures are per append),
/// and the embedded log's recovery report.
async fn open_store(
    config: &Config,
    data_dir: &Path,
) -> anyhow::Result<(
    Arc<dyn Store>,
    Option<watch::Receiver<Option<String>>>,
    Option<ballast_log::RecoveryReport>,
)> {
    match config.storage.backend {
        StorageBackend::Embedded => {
            let log_dir = data_dir.join("log");
            let storage = config.storage.clone();
            let (store, report) = tokio::task::spawn_blocking(move || {
                EmbeddedStore::open(
                    &log_dir,
                    storage.segment_bytes,
                    storage.max_bytes,
                    storage.preallocate,
                )
            })
            .await
            .context("opening the event log")?
            .context("opening the event log")?;
            tracing::info!(
                segments = report.segments,
                records = report.records,
                corrupt_records = report.corrupt_records,
                torn_tail_bytes = report.torn_tail_bytes,
                "event log opened"
            );
            if report.corrupt_records > 0 {
                tracing::error!(
                    corrupt_records = report.corrupt_records,
                    files = ?report.quarantine_files,
                    "damaged records were moved to the quarantine directory of the log"
                );
            }
            let fatal = store.fatal_failures();
            Ok((Arc::new(store), Some(fatal), Some(report)))
        }
        StorageBackend::Postgres => {
            let url = config
                .storage
                .postgres_url
                .as_deref()
                .context("storage.postgres_url is not set")?;
            let store = PgStore::open(url, config.storage.max_bytes, config.storage.partitions)
                .await
                .context("opening the PostgreSQL store")?;
            let st = store.status();
            tracing::info!(
                start = st.start,
                end = st.end,
                bytes = st.bytes_used,
                "PostgreSQL store opened"
            );
            Ok((Arc::new(store), None, None))
        }
    }
}

/// Resolves with the reason once the store reports a fatal failure; never for a store
/// that has none.
async fn fatal_failure(fatal: Option<&mut watch::Receiver<Option<String>>>) -> String {
    match fatal {
        Some(rx) => match rx.wait_for(|f| f.is_some()).await {
            Ok(f) => f.clone().unwrap_or_default(),
            Err(_) => "the store's writer stopped".to_string(),
        },
        None => std::future::pending().await,
    }
}

/// How long a server stopping on a storage failure waits for its alerts to go out.
const FATAL_ALERT_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// The condition key of the failed-write alert.
const FSYNC_ALERT: &str = "fsync";

/// The storage alerts' condition keys and what they say: at 90 % and at 100 %.
const STORAGE_ALERTS: [(&str, &str); 3] = [
    ("storage-90", "at 90 % of its quota"),
    ("storage-full", "refusing new events (503)"),
    ("storage-cursors", "failing to save delivery cursors"),
];

/// How long saving cursors must fail before it is alerted (a single failure is retried
/// 200 ms later by the router).
const CURSOR_FAILURE_ALERT_AFTER: Duration = Duration::from_secs(5);

/// How long a storage alert sent without the outbox may take per notifier.
const DIRECT_ALERT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the storage alerts look at the store.
const STORAGE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Raises (and resolves) the storage alerts: at 90 % of the quota, while the store
/// refuses new events (quota reached, disk full, a segment that cannot be created), and
/// while saving cursors fails.
async fn storage_alerts(
    store: Arc<dyn Store>,
    alerts: Arc<Alerts>,
    mut stop: watch::Receiver<bool>,
) {
    let started = crate::time::to_ms(std::time::SystemTime::now());
    // What an earlier run raised and nobody resolved yet (the quota may have been
    // raised, or the backlog drained, while the server was down).
    let mut raised =
        STORAGE_ALERTS.map(|(key, _)| matches!(alerts.open_since_local(key), Ok(Some(_))));
    let mut seq = 0u64;
    loop {
        let st = store.status();
        let ratio = st.bytes_used as f64 / st.quota_bytes.max(1) as f64;
        // A failed writer has its own alert (fsync) and stops the server.
        let refusal = store
            .refusal()
            .filter(|r| !matches!(r, crate::store::Refusal::Failed(_)));
        let cursors = store.cursor_failure();
        let levels = [
            ratio >= 0.9,
            refusal.is_some(),
            cursors
                .as_ref()
                .is_some_and(|(for_, _)| *for_ >= CURSOR_FAILURE_ALERT_AFTER),
        ];
        for (i, (&now_on, was_on)) in levels.iter().zip(raised.iter_mut()).enumerate() {
            if now_on == *was_on {
                continue;
            }
            seq += 1;
            let (key, what) = STORAGE_ALERTS[i];
            let action = if now_on {
                Action::Trigger
            } else {
                Action::Resolve
            };
            let alert = alerts.alert(
                key,
                action,
                match i {
                    0 => Severity::Warning,
                    1 => Severity::Critical,
                    _ => Severity::Error,
                },
                match (&refusal, i) {
                    (_, 2) => match &cursors {
                        Some((_, why)) => format!(
                            "ballast on {} is {what} ({why}): delivery goes on, but a restart would re-send what was delivered since",
                            alerts.source()
                        ),
                        None => format!("ballast on {} saves delivery cursors again", alerts.source()),
                    },
                    (Some(r), 1) => format!(
                        "ballast storage on {} is {what}: {}",
                        alerts.source(),
                        r.describe()
                    ),
                    (None, 1) => format!(
                        "ballast storage on {} accepts new events again",
                        alerts.source()
                    ),
                    _ => format!("ballast storage on {} is {what}", alerts.source()),
                },
                serde_json::json!({
                    "bytes_used": st.bytes_used,
                    "quota_bytes": st.quota_bytes,
                    "reason": refusal.as_ref().map(|r| r.reason()),
                    "cursor_error": cursors.as_ref().map(|(_, why)| why.clone()),
                }),
            );
            let id = format!("{key}:{started}:{seq}");
            let a = alerts.clone();
            let direct = alert.clone();
            match tokio::task::spawn_blocking(move || a.raise_local(&id, alert)).await {
                Ok(Ok(_)) => {}
                failed => {
                    // The outbox lives in the data directory: on a full disk it cannot
                    // be written. Send the alert directly, once, rather than not at all.
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                        Ok(Ok(_)) => String::new(),
                    };
                    tracing::warn!(alert = key, %error, "could not write the storage alert to the outbox; sending it directly");
                    alerts.send_direct(&direct, DIRECT_ALERT_TIMEOUT).await;
                }
            }
            *was_on = now_on;
        }
        tokio::select! {
            _ = tokio::time::sleep(STORAGE_CHECK_INTERVAL) => {}
            _ = stop.changed() => return,
        }
    }
}

/// How long a caller should wait for `server.json` after starting the process.
pub const STARTUP_GRACE: Duration = Duration::from_secs(30);
