//! The PostgreSQL backend: the same semantics as the embedded log, on a shared database.
//!
//! - `ballast_events(pos, source, meta, payload)`: one row per event; `pos` is the
//!   event's position (0, 1, 2, … in acceptance order).
//! - `ballast_meta`: one row with the next position and the bytes stored. Every append
//!   transaction takes its positions with `UPDATE ballast_meta … RETURNING`, which holds
//!   that row's lock until the transaction commits. So positions are committed in the
//!   order they were handed out, whichever replica wrote them: a reader that sees
//!   position `p` committed also sees every position below `p` that will ever exist (a
//!   rolled-back transaction leaves no gap, as the counter rolls back with it).
//! - `ballast_consumers(name, cursor)`: consumer cursors; rows every consumer is past are
//!   deleted (and their bytes given back to the quota).
//! - Group commit: one writer task per process takes every batch submitted while the
//!   previous transaction ran and stores them in one transaction (one WAL flush). An
//!   append is acknowledged once its transaction committed. An error — even during
//!   `COMMIT`, where the outcome is unknown — acknowledges nothing (the client retries;
//!   at worst the event is stored twice, never lost).
//! - Appends by other replicas are seen by polling the next position (every 100 ms).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::Client;

use super::{
    envelope, Appended, EventBatch, Position, ReadEvents, Store, StoreError, StoreStatus,
    StoredEvent,
};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS ballast_meta (
    id int PRIMARY KEY CHECK (id = 1),
    next_pos bigint NOT NULL,
    bytes bigint NOT NULL
);
INSERT INTO ballast_meta (id, next_pos, bytes) VALUES (1, 0, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS ballast_events (
    pos bigint PRIMARY KEY,
    source text NOT NULL,
    meta bytea NOT NULL,
    payload bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS ballast_consumers (
    name text PRIMARY KEY,
    cursor bigint NOT NULL
);
"#;

/// Serialises schema creation between replicas starting at once.
const SCHEMA_LOCK: i64 = 0x6261_6c6c_6173_7401;

/// Bytes one group commit gathers at most.
const MAX_GROUP_BYTES: usize = 8 << 20;
const POLL_EVERY: Duration = Duration::from_millis(100);
const CLEANUP_EVERY: Duration = Duration::from_secs(2);

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    StoreError::Other(format!("postgres: {e}"))
}

struct Submission {
    batch: EventBatch,
    done: oneshot::Sender<Result<Appended, StoreError>>,
}

#[derive(Default)]
struct Counters {
    appends: AtomicU64,
    events: AtomicU64,
    commits: AtomicU64,
    commit_nanos: AtomicU64,
    quota_rejections: AtomicU64,
    bytes_used: AtomicU64,
    start: AtomicU64,
}

struct Shared {
    url: String,
    quota: u64,
    counters: Counters,
    quota_blocked: AtomicBool,
    durable: watch::Sender<Position>,
    failure: Mutex<Option<String>>,
    cursors: Mutex<HashMap<String, Position>>,
    /// Leases this process took: consumer → (advisory-lock key, holding backend's pid).
    /// An acknowledgement of a leased consumer only counts while that backend still
    /// holds the lock (fencing: a replica that lost the lease cannot move the cursor).
    leases: Mutex<HashMap<String, (i64, i32)>>,
    /// Stored bytes when an append was last refused for the quota.
    bytes_at_refusal: AtomicU64,
}

pub struct PgStore {
    shared: Arc<Shared>,
    /// Reads, acknowledgements and cleanup (the writer has its own connection).
    reader: tokio::sync::Mutex<Option<Client>>,
    tx: Mutex<Option<mpsc::Sender<Submission>>>,
    writer: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    stop: watch::Sender<bool>,
    last_cleanup: Mutex<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// TLS for connections whose URL asks for it (`sslmode=require`, or `prefer`, the
/// default, when the server offers it), verified against the Mozilla roots.
fn tls() -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
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
        Err(e) => Err(StoreError::Other(format!("postgres TLS: {e}"))),
    }
}

/// Bounds every statement and transaction: a database that stops answering (a
/// partition without a reset) fails the request instead of hanging it.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Server-side limits on every session: a replica that dies (or is cut off) while it holds
/// the position row's lock in a transaction, or a lease, must not hold it for the
/// operating system's keepalive time (hours). All are settable by an ordinary user.
const SESSION_OPTIONS: &str = "-c idle_in_transaction_session_timeout=10s -c lock_timeout=20s \
     -c statement_timeout=25s -c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 \
     -c tcp_keepalives_count=3 -c tcp_user_timeout=10000";

/// A lease's session also ends when idle this long: its holder pings every second, so
/// only a dead or cut-off holder lets it expire (PostgreSQL 14 and later).
const LEASE_SESSION_OPTIONS: &str = "-c idle_session_timeout=10s";

async fn connect(url: &str) -> Result<Client, StoreError> {
    connect_with(url, "").await
}

async fn connect_with(url: &str, extra_options: &str) -> Result<Client, StoreError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| StoreError::Other(format!("postgres url: {e}")))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    let options = [
        config.get_options().unwrap_or(""),
        SESSION_OPTIONS,
        extra_options,
    ]
    .iter()
    .filter(|o| !o.is_empty())
    .copied()
    .collect::<Vec<_>>()
    .join(" ");
    config.options(&options);
    // Notice a dead peer on an idle connection (the lease's session above all).
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(10));
    let (client, connection) = tokio::time::timeout(STATEMENT_TIMEOUT, config.connect(tls()?))
        .await
        .map_err(|_| StoreError::Other("postgres: connecting timed out".into()))?
        .map_err(pg_err)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

impl PgStore {
    /// Connects, creates the schema if needed, and starts the writer. `quota` bounds the
    /// bytes of stored events (payload and meta).
    pub async fn open(url: &str, quota: u64) -> Result<PgStore, StoreError> {
        let client = connect(url).await?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(pg_err)?;
        let created = client.batch_execute(SCHEMA).await.map_err(pg_err);
        client
            .execute("SELECT pg_advisory_unlock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(pg_err)?;
        created?;
        let row = client
            .query_one("SELECT next_pos, bytes FROM ballast_meta WHERE id = 1", &[])
            .await
            .map_err(pg_err)?;
        let (next, bytes): (i64, i64) = (row.get(0), row.get(1));
        let start: Option<i64> = client
            .query_one("SELECT min(pos) FROM ballast_events", &[])
            .await
            .map_err(pg_err)?
            .get(0);
        let mut cursors = HashMap::new();
        for r in client
            .query("SELECT name, cursor FROM ballast_consumers", &[])
            .await
            .map_err(pg_err)?
        {
            let (name, cursor): (String, i64) = (r.get(0), r.get(1));
            cursors.insert(name, cursor as u64);
        }
        let (durable, _) = watch::channel(next as u64);
        let shared = Arc::new(Shared {
            url: url.to_string(),
            quota,
            counters: Counters::default(),
            quota_blocked: AtomicBool::new(false),
            durable,
            failure: Mutex::new(None),
            cursors: Mutex::new(cursors),
            leases: Mutex::new(HashMap::new()),
            bytes_at_refusal: AtomicU64::new(0),
        });
        shared
            .counters
            .bytes_used
            .store(bytes.max(0) as u64, Ordering::Relaxed);
        shared
            .counters
            .start
            .store(start.unwrap_or(next) as u64, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(4096);
        let (stop, stop_rx) = watch::channel(false);
        let writer = tokio::spawn(write_loop(shared.clone(), rx));
        tokio::spawn(poll_loop(shared.clone(), stop_rx));
        Ok(PgStore {
            shared,
            reader: tokio::sync::Mutex::new(Some(client)),
            tx: Mutex::new(Some(tx)),
            writer: tokio::sync::Mutex::new(Some(writer)),
            stop,
            last_cleanup: Mutex::new(Instant::now()),
        })
    }

    /// Runs `f` with the reader connection, reconnecting once if it was lost.
    async fn with_reader<T>(
        &self,
        f: impl for<'c> Fn(
            &'c Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>,
        >,
    ) -> Result<T, StoreError> {
        let mut guard = self.reader.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(connect(&self.shared.url).await?);
        }
        let Some(client) = guard.as_ref() else {
            return Err(StoreError::Other("postgres: not connected".into()));
        };
        match tokio::time::timeout(STATEMENT_TIMEOUT, f(client)).await {
            Ok(r) => r.map_err(pg_err),
            Err(_) => {
                *guard = None;
                Err(StoreError::Other("postgres: the query timed out".into()))
            }
        }
    }

    /// Deletes what every consumer is past (at most every few seconds).
    async fn cleanup(&self) -> Result<(), StoreError> {
        {
            let mut last = lock(&self.last_cleanup);
            if last.elapsed() < CLEANUP_EVERY {
                return Ok(());
            }
            *last = Instant::now();
        }
        let freed: (i64, i64) = self
            .with_reader(|c| {
                Box::pin(async move {
                    let row = c
                        .query_one(
                            "WITH horizon AS (SELECT min(cursor) AS h FROM ballast_consumers),
                                  gone AS (DELETE FROM ballast_events
                                           WHERE pos < (SELECT h FROM horizon)
                                           RETURNING octet_length(payload) + octet_length(meta) AS b),
                                  freed AS (SELECT coalesce(sum(b), 0)::bigint AS n FROM gone)
                             UPDATE ballast_meta SET bytes = greatest(bytes - (SELECT n FROM freed), 0)
                             WHERE id = 1
                             RETURNING (SELECT n FROM freed), bytes",
                            &[],
                        )
                        .await?;
                    Ok((row.get::<_, i64>(0), row.get::<_, i64>(1)))
                })
            })
            .await?;
        let (freed, now_used) = freed;
        // The database's figure, not local arithmetic: other replicas add and free too.
        self.shared
            .counters
            .bytes_used
            .store(now_used.max(0) as u64, Ordering::Relaxed);
        if freed > 0 {
            self.shared.quota_blocked.store(false, Ordering::Release);
        }
        let start: Option<i64> = self
            .with_reader(|c| {
                Box::pin(async move {
                    Ok(c.query_one("SELECT min(pos) FROM ballast_events", &[])
                        .await?
                        .get(0))
                })
            })
            .await?;
        if let Some(s) = start {
            self.shared
                .counters
                .start
                .store(s as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// How often a replica waiting for a lease tries again, and how often the holder checks
/// that its session (and so its advisory lock) is still alive.
const LEASE_RETRY: Duration = Duration::from_secs(1);

/// The advisory-lock key of a consumer's lease (FNV-1a of its name; stable across
/// versions and processes).
fn lease_key(consumer: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"ballast-lease:".iter().chain(consumer.as_bytes()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// Keeps the session that holds the advisory lock open, and reports the lease lost as
/// soon as that session fails (then another replica may already hold it).
fn hold_lease(client: Client, consumer: String, shared: Arc<Shared>) -> super::Lease {
    let (lost_tx, lost_rx) = watch::channel(false);
    let name = consumer.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(LEASE_RETRY).await;
            let alive = tokio::time::timeout(LEASE_RETRY * 3, client.simple_query("SELECT 1"))
                .await
                .is_ok_and(|r| r.is_ok());
            if !alive {
                tracing::warn!(consumer, "lease lost: its database session failed");
                let _ = lost_tx.send(true);
                return;
            }
        }
    });
    /// Ends the session (releasing the lock) when the lease is dropped.
    struct Held(tokio::task::JoinHandle<()>, Arc<Shared>, String);
    impl Drop for Held {
        fn drop(&mut self) {
            self.0.abort();
            lock(&self.1.leases).remove(&self.2);
        }
    }
    super::Lease::new(lost_rx, Box::new(Held(task, shared, name)))
}

/// The group-commit writer: one transaction for everything submitted meanwhile.
async fn write_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<Submission>) {
    let mut client: Option<Client> = None;
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        let mut bytes = group[0].batch.bytes();
        while bytes < MAX_GROUP_BYTES {
            match rx.try_recv() {
                Ok(s) => {
                    bytes += s.batch.bytes();
                    group.push(s);
                }
                Err(_) => break,
            }
        }
        // The quota, per submission in order: what does not fit is refused, the rest goes.
        let mut used = shared.counters.bytes_used.load(Ordering::Relaxed);
        let mut accepted = Vec::with_capacity(group.len());
        for s in group {
            let b = s.batch.bytes() as u64;
            if used + b > shared.quota {
                shared.bytes_at_refusal.store(used, Ordering::Relaxed);
                shared.quota_blocked.store(true, Ordering::Release);
                shared
                    .counters
                    .quota_rejections
                    .fetch_add(1, Ordering::Relaxed);
                let _ = s.done.send(Err(StoreError::QuotaExceeded));
            } else {
                used += b;
                accepted.push(s);
            }
        }
        if accepted.is_empty() {
            continue;
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = match connect(&shared.url).await {
                Ok(c) => Some(c),
                Err(e) => {
                    fail_all(&shared, accepted, &e);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
        }
        let Some(c) = client.as_mut() else {
            continue;
        };
        let started = Instant::now();
        let result = match tokio::time::timeout(STATEMENT_TIMEOUT, commit_group(c, &accepted)).await
        {
            Ok(r) => r.map_err(pg_err),
            Err(_) => {
                // The transaction's outcome is unknown: nothing is acknowledged, and the
                // connection is replaced (the server rolls back what did not commit).
                client = None;
                Err(StoreError::Other(
                    "postgres: the append transaction timed out".into(),
                ))
            }
        };
        match result {
            Ok((first, now_used)) => {
                let c = &shared.counters;
                c.commits.fetch_add(1, Ordering::Relaxed);
                c.commit_nanos
                    .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                c.bytes_used.store(now_used, Ordering::Relaxed);
                let mut pos = first;
                for s in accepted {
                    let n = s.batch.len() as u64;
                    c.appends.fetch_add(1, Ordering::Relaxed);
                    c.events.fetch_add(n, Ordering::Relaxed);
                    let _ = s.done.send(Ok(Appended {
                        first: pos,
                        end: pos + n,
                        events: n as usize,
                    }));
                    pos += n;
                }
                shared.durable.send_if_modified(|end| {
                    let grew = pos > *end;
                    if grew {
                        *end = pos;
                    }
                    grew
                });
                *lock(&shared.failure) = None;
            }
            Err(err) => {
                tracing::error!(error = %err, "storing events in postgres failed; nothing of this group is acknowledged");
                fail_all(&shared, accepted, &err);
            }
        }
    }
}

fn fail_all(shared: &Shared, group: Vec<Submission>, err: &StoreError) {
    *lock(&shared.failure) = Some(err.to_string());
    for s in group {
        let _ = s.done.send(Err(StoreError::Other(err.to_string())));
    }
}

/// One transaction: take positions, insert every event. Returns the first position and
/// the bytes stored in all (by every replica) after it.
async fn commit_group(
    client: &mut Client,
    group: &[Submission],
) -> Result<(u64, u64), tokio_postgres::Error> {
    let n: i64 = group.iter().map(|s| s.batch.len() as i64).sum();
    let bytes: i64 = group.iter().map(|s| s.batch.bytes() as i64).sum();
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            "UPDATE ballast_meta SET next_pos = next_pos + $1, bytes = bytes + $2
             WHERE id = 1 RETURNING next_pos - $1, bytes",
            &[&n, &bytes],
        )
        .await?;
    let first: i64 = row.get(0);
    let now_used: i64 = row.get(1);
    let mut positions = Vec::with_capacity(n as usize);
    let mut sources = Vec::with_capacity(n as usize);
    let mut metas: Vec<&[u8]> = Vec::with_capacity(n as usize);
    let mut payloads: Vec<&[u8]> = Vec::with_capacity(n as usize);
    let mut pos = first;
    for s in group {
        for (event, meta) in s.batch.events() {
            positions.push(pos);
            sources.push(&*s.batch.source);
            metas.push(meta);
            payloads.push(event);
            pos += 1;
        }
    }
    tx.execute(
        "INSERT INTO ballast_events (pos, source, meta, payload)
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::bytea[], $4::bytea[])",
        &[&positions, &sources, &metas, &payloads],
    )
    .await?;
    tx.commit().await?;
    Ok((first as u64, now_used.max(0) as u64))
}

/// Follows what other replicas commit (and the bytes they add).
async fn poll_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut client: Option<Client> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL_EVERY) => {}
            _ = stop.changed() => return,
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = match connect(&shared.url).await {
                Ok(c) => Some(c),
                Err(e) => {
                    // No primary reachable: not ready (readiness follows `failure`), even
                    // while no append is there to find out.
                    *lock(&shared.failure) = Some(format!("postgres unreachable: {e}"));
                    continue;
                }
            };
        }
        let Some(c) = client.as_ref() else { continue };
        let polled = tokio::time::timeout(
            STATEMENT_TIMEOUT,
            c.query_one("SELECT next_pos, bytes FROM ballast_meta WHERE id = 1", &[]),
        )
        .await;
        let Ok(polled) = polled else {
            client = None; // hung: a new session next time
            *lock(&shared.failure) = Some("postgres: the poll query timed out".into());
            continue;
        };
        if let Err(e) = &polled {
            if c.is_closed() {
                *lock(&shared.failure) = Some(format!("postgres connection lost: {e}"));
            }
        }
        if let Ok(row) = polled {
            let (next, bytes): (i64, i64) = (row.get(0), row.get(1));
            // The database answers again: let the next append try (readiness follows).
            *lock(&shared.failure) = None;
            shared
                .counters
                .bytes_used
                .store(bytes.max(0) as u64, Ordering::Relaxed);
            // Space was freed (by any replica) since the last refusal.
            if (bytes.max(0) as u64) < shared.bytes_at_refusal.load(Ordering::Relaxed) {
                shared.quota_blocked.store(false, Ordering::Release);
            }
            let next = next as u64;
            shared.durable.send_if_modified(|end| {
                let grew = next > *end;
                if grew {
                    *end = next;
                }
                grew
            });
        }
    }
}

#[async_trait]
impl Store for PgStore {
    async fn append(&self, batch: EventBatch) -> Result<Appended, StoreError> {
        if batch.is_empty() {
            let end = *self.shared.durable.borrow();
            return Ok(Appended {
                first: end,
                end,
                events: 0,
            });
        }
        let tx = lock(&self.tx)
            .clone()
            .ok_or(StoreError::Other("the store is closed".into()))?;
        let (done, wait) = oneshot::channel();
        tx.send(Submission { batch, done })
            .await
            .map_err(|_| StoreError::Other("the store is closed".into()))?;
        wait.await
            .unwrap_or_else(|_| Err(StoreError::Other("the store is closed".into())))
    }

    async fn register_consumer(&self, consumer: &str) -> Result<Position, StoreError> {
        let name = consumer.to_string();
        let cursor: i64 = self
            .with_reader(|c| {
                let name = name.clone();
                Box::pin(async move {
                    c.execute(
                        "INSERT INTO ballast_consumers (name, cursor)
                         VALUES ($1, coalesce((SELECT min(pos) FROM ballast_events),
                                              (SELECT next_pos FROM ballast_meta WHERE id = 1)))
                         ON CONFLICT (name) DO NOTHING",
                        &[&name],
                    )
                    .await?;
                    Ok(c.query_one(
                        "SELECT cursor FROM ballast_consumers WHERE name = $1",
                        &[&name],
                    )
                    .await?
                    .get(0))
                })
            })
            .await?;
        lock(&self.shared.cursors).insert(name, cursor as u64);
        Ok(cursor as u64)
    }

    async fn read(&self, from: Position, max_events: usize) -> Result<ReadEvents, StoreError> {
        let from_i = i64::try_from(from).map_err(|_| StoreError::Other("position".into()))?;
        let limit = max_events.clamp(1, 100_000) as i64;
        let rows = self
            .with_reader(|c| {
                Box::pin(async move {
                    c.query(
                        "SELECT pos, source, meta, payload FROM ballast_events
                         WHERE pos >= $1 ORDER BY pos LIMIT $2",
                        &[&from_i, &limit],
                    )
                    .await
                })
            })
            .await?;
        let mut events = Vec::with_capacity(rows.len());
        let mut next = from;
        let mut last_source: Option<Arc<str>> = None;
        for r in rows {
            let pos: i64 = r.get(0);
            let source: &str = r.get(1);
            let meta: &[u8] = r.get(2);
            let payload: Vec<u8> = r.get(3);
            let source = match &last_source {
                Some(s) if **s == *source => s.clone(),
                _ => last_source.insert(Arc::from(source)).clone(),
            };
            events.push(StoredEvent {
                position: pos as u64,
                source,
                event: bytes::Bytes::from(payload),
                ident: envelope::decode_meta(meta).map(|(k, m)| (Arc::from(k), Arc::from(m))),
            });
            next = pos as u64 + 1;
        }
        Ok(ReadEvents { events, next })
    }

    async fn ack(&self, consumer: &str, upto: Position) -> Result<(), StoreError> {
        let name = consumer.to_string();
        let upto_i = i64::try_from(upto).map_err(|_| StoreError::Other("position".into()))?;
        let lease = lock(&self.shared.leases).get(consumer).copied();
        let updated = self
            .with_reader(|c| {
                let name = name.clone();
                Box::pin(async move {
                    match lease {
                        None => {
                            c.execute(
                                "UPDATE ballast_consumers SET cursor = greatest(cursor, $2)
                                 WHERE name = $1",
                                &[&name, &upto_i],
                            )
                            .await
                        }
                        Some((key, pid)) => {
                            // pg_locks shows a bigint advisory key as two oids.
                            let (hi, lo) = ((key as u64 >> 32) as u32, key as u64 as u32);
                            c.execute(
                                "UPDATE ballast_consumers SET cursor = greatest(cursor, $2)
                                 WHERE name = $1 AND EXISTS (
                                     SELECT 1 FROM pg_locks
                                     WHERE locktype = 'advisory' AND classid = $3
                                       AND objid = $4 AND objsubid = 1 AND pid = $5 AND granted)",
                                &[&name, &upto_i, &hi, &lo, &pid],
                            )
                            .await
                        }
                    }
                })
            })
            .await?;
        if updated == 0 {
            return Err(match lease {
                Some(_) => StoreError::Other(format!(
                    "consumer {consumer:?}: this process no longer holds its lease"
                )),
                None => StoreError::Other(format!("unknown consumer {consumer:?}")),
            });
        }
        {
            let mut cursors = lock(&self.shared.cursors);
            let c = cursors.entry(name).or_insert(upto);
            *c = (*c).max(upto);
        }
        self.cleanup().await
    }

    async fn lease(&self, consumer: &str) -> Result<super::Lease, StoreError> {
        let key = lease_key(consumer);
        loop {
            let client = connect_with(&self.shared.url, LEASE_SESSION_OPTIONS).await?;
            loop {
                let tried = tokio::time::timeout(
                    STATEMENT_TIMEOUT,
                    client.query_one("SELECT pg_try_advisory_lock($1), pg_backend_pid()", &[&key]),
                )
                .await;
                let row = match tried {
                    Ok(r) => r.map_err(pg_err)?,
                    Err(_) => break, // a new session
                };
                let (got, pid): (bool, i32) = (row.get(0), row.get(1));
                if got {
                    tracing::info!(consumer, "lease taken");
                    lock(&self.shared.leases).insert(consumer.to_string(), (key, pid));
                    return Ok(hold_lease(
                        client,
                        consumer.to_string(),
                        self.shared.clone(),
                    ));
                }
                if client.is_closed() {
                    break;
                }
                tokio::time::sleep(LEASE_RETRY).await;
            }
        }
    }

    fn cursor(&self, consumer: &str) -> Option<Position> {
        lock(&self.shared.cursors).get(consumer).copied()
    }

    fn subscribe(&self) -> watch::Receiver<Position> {
        self.shared.durable.subscribe()
    }

    fn status(&self) -> StoreStatus {
        let c = &self.shared.counters;
        let failure = lock(&self.shared.failure).clone();
        let closed = lock(&self.tx).is_none();
        StoreStatus {
            writable: !closed && failure.is_none(),
            failure,
            bytes_used: c.bytes_used.load(Ordering::Relaxed),
            quota_bytes: self.shared.quota,
            events_appended: c.events.load(Ordering::Relaxed),
            appends: c.appends.load(Ordering::Relaxed),
            fsyncs: c.commits.load(Ordering::Relaxed),
            fsync_seconds: c.commit_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            quota_rejections: c.quota_rejections.load(Ordering::Relaxed),
            quota_blocked: self.shared.quota_blocked.load(Ordering::Acquire),
            quarantined_records: 0,
            torn_tail_bytes: 0,
            segments: 0,
            start: c.start.load(Ordering::Relaxed),
            end: *self.shared.durable.borrow(),
        }
    }

    async fn close(&self) {
        lock(&self.tx).take();
        if let Some(w) = self.writer.lock().await.take() {
            let _ = w.await;
        }
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::pgtest::PgCluster;

    fn batch(tag: &str, n: usize) -> EventBatch {
        let mut b = EventBatch::new(Arc::from("web"), 0);
        for i in 0..n {
            b.push(format!(r#"{{"w":"{tag}","i":{i}}}"#).as_bytes());
        }
        b
    }

    /// Two stores (two replicas) append at once while a third follows the log from its
    /// cursor, reading whatever is there each time: it must never step over a position
    /// that becomes visible later (the ordering `ballast_meta`'s row lock gives), so what
    /// it saw, in order, is every event exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_follower_never_skips_what_concurrent_writers_commit_later() {
        let cluster = PgCluster::start();
        cluster.create_db("writers").await;
        let url = cluster.url("writers");
        let a = Arc::new(PgStore::open(&url, u64::MAX).await.unwrap());
        let b = Arc::new(PgStore::open(&url, u64::MAX).await.unwrap());
        let follower = PgStore::open(&url, u64::MAX).await.unwrap();
        let mut writers = Vec::new();
        for (name, store) in [("a", a.clone()), ("b", b.clone())] {
            for task in 0..4 {
                let store = store.clone();
                writers.push(tokio::spawn(async move {
                    let mut total = 0;
                    // Bounded: 50 appends of 1..=5 events per task.
                    for k in 0..50 {
                        let n = 1 + (k + task) % 5;
                        store
                            .append(batch(&format!("{name}{task}-{k}"), n))
                            .await
                            .unwrap();
                        total += n;
                    }
                    total
                }));
            }
        }
        let mut seen: Vec<u64> = Vec::new();
        let mut from = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut expected = None;
        loop {
            let r = follower.read(from, 37).await.unwrap();
            for e in &r.events {
                seen.push(e.position);
            }
            from = r.next;
            if expected.is_none() && writers.iter().all(|w| w.is_finished()) {
                let mut total = 0;
                for w in writers.drain(..) {
                    total += w.await.unwrap();
                }
                expected = Some(total as u64);
            }
            if let Some(total) = expected {
                if seen.len() as u64 >= total {
                    assert_eq!(seen.len() as u64, total);
                    break;
                }
            }
            assert!(Instant::now() < deadline, "follower stuck at {from}");
        }
        let want: Vec<u64> = (0..seen.len() as u64).collect();
        assert_eq!(seen, want, "every position once, in order, none skipped");
        for s in [&*a, &*b, &follower] {
            s.close().await;
        }
    }

    /// One holder at a time; the next gets the lease once the holder gives it up or its
    /// session dies, and a holder whose session dies is told so.
    #[tokio::test]
    async fn a_lease_has_one_holder_and_moves_when_it_is_gone() {
        let cluster = PgCluster::start();
        cluster.create_db("leases").await;
        let url = cluster.url("leases");
        let a = PgStore::open(&url, u64::MAX).await.unwrap();
        let b = PgStore::open(&url, u64::MAX).await.unwrap();
        let held = a.lease("dest.hook").await.unwrap();
        // Another consumer's lease is independent.
        let other = b.lease("dest.other").await.unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(2500), b.lease("dest.hook")).await;
        assert!(waiting.is_err(), "a second holder while the first holds it");
        drop(held);
        let moved = tokio::time::timeout(Duration::from_secs(10), b.lease("dest.hook"))
            .await
            .expect("the lease moved within 10 s")
            .unwrap();
        // The holder's acknowledgements count.
        b.register_consumer("dest.hook").await.unwrap();
        b.append(batch("x", 3)).await.unwrap();
        b.ack("dest.hook", 2).await.unwrap();
        assert_eq!(b.cursor("dest.hook"), Some(2));
        // The holder's session is killed (as when its replica dies or is cut off).
        let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        admin
            .batch_execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks
                 WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()",
            )
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), moved.lost())
            .await
            .expect("the holder learns it lost the lease");
        // Fenced: a process that lost the lease cannot move the cursor any more.
        assert!(b.ack("dest.hook", 3).await.is_err());
        let (check, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let cursor: i64 = check
            .query_one(
                "SELECT cursor FROM ballast_consumers WHERE name = 'dest.hook'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(cursor, 2);
        tokio::time::timeout(Duration::from_secs(10), other.lost())
            .await
            .expect("both sessions were killed");
        let again = tokio::time::timeout(Duration::from_secs(10), a.lease("dest.hook"))
            .await
            .expect("free again once its session is gone");
        assert!(again.is_ok());
    }
}
