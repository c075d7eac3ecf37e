//! The PostgreSQL backend: the same semantics as the embedded log, on a shared database
//! that several replicas use at once.
//!
//! - **Partitions.** Users are hashed by ordering key into `partitions` partitions (fixed
//!   in `ballast_settings` when the database is first used). Each partition has its own
//!   row in `ballast_partition` (next sequence number, bytes stored), its own sequence of
//!   positions and its own cursors, so appends of different partitions never wait for
//!   each other. A position is the partition in the top bits and the sequence number
//!   below (see `store::partition_of`).
//! - **Chunks.** Events are stored in `ballast_chunk(part, end_seq, first_seq, data,
//!   codec)`: one row holds every event one group commit wrote to one partition, LZ4
//!   compressed by ballast when that makes it smaller (codec 1; 0: as written) (records framed
//!   by their length), so that an append costs a row per partition touched, not a row
//!   per event.
//! - **Order.** Each chunk is written by one statement that bumps its partition's row
//!   (`UPDATE … RETURNING next_seq`) and inserts the chunk: the row lock is held until
//!   the statement's transaction commits, so a partition's chunks become visible in the
//!   order of their positions, whichever replica wrote them, and a reader never steps
//!   over a position that commits later (a rolled-back statement leaves no gap).
//! - **Group commit.** `WRITERS` writer tasks per process (partition `p` is written by
//!   writer `p % WRITERS`), each with its own connection: a writer takes everything
//!   submitted while its last commit ran and writes one chunk per partition in one
//!   transaction (one WAL flush, one round trip: `BEGIN`, the statements in ascending
//!   partition order and `COMMIT` pipelined). A request is acknowledged once every chunk
//!   holding one of its events committed. An error — even one where the outcome is
//!   unknown — acknowledges nothing (the client retries; at worst an event is stored
//!   twice, never lost).
//! - **Cursors** `ballast_cursor(name, part, cursor, done)`: per consumer and partition,
//!   the cursor and the ranges finished above it (`store::Progress`), so a replica that
//!   takes a partition over re-sends only what was unfinished. Chunks every consumer of
//!   their partition is past are deleted (by one replica at a time) and their bytes given
//!   back to the quota.
//! - **Leases** per (consumer, partition): PostgreSQL advisory locks held by one session
//!   per process, which also holds a *member* lock; the member locks count the live
//!   replicas, and a replica takes a partition only while it holds fewer than
//!   `ceil(partitions / replicas)` of that consumer's, and asks its leases beyond that
//!   share back (so a joining replica gets its share). When a replica dies its session
//!   ends, its locks go with it, and the others take its partitions within seconds.
//!   Acknowledgements are fenced: they only count while the lock is still held by the
//!   session that took it.
//! - **Failover.** Every connection is made again, with backoff, when it fails; with a
//!   multi-host URL and `target_session_attrs=read-write` that finds the new primary.
//!   While none answers, appends fail (503) and the store reports itself not writable.
//! - Appends by other replicas are seen by polling the partitions' rows (every 100 ms).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::Client;

use super::{
    envelope, partition_base, partition_for_meta, partition_of, Appended, EventBatch, LeaseState,
    Position, Progress, ReadEvents, Store, StoreError, StoreStatus, StoredEvent, PARTITION_SHIFT,
};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS ballast_settings (
    id int PRIMARY KEY CHECK (id = 1),
    partitions int NOT NULL
);
CREATE TABLE IF NOT EXISTS ballast_partition (
    part int PRIMARY KEY,
    next_seq bigint NOT NULL,
    bytes bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS ballast_chunk (
    part int NOT NULL,
    end_seq bigint NOT NULL,
    first_seq bigint NOT NULL,
    data bytea NOT NULL,
    codec smallint NOT NULL DEFAULT 0,
    PRIMARY KEY (part, end_seq)
);
CREATE TABLE IF NOT EXISTS ballast_cursor (
    name text NOT NULL,
    part int NOT NULL,
    cursor bigint NOT NULL,
    done bytea NOT NULL DEFAULT '\x',
    PRIMARY KEY (name, part)
);
"#;

/// Held (per transaction) by the replica deleting what every consumer is past.
const CLEANUP_LOCK: i64 = 0x6261_6c6c_6173_7402;
/// First key of the member locks (second key: a random id per process).
const MEMBER_CLASS: i32 = 0x6261_6c6d;

/// Writer tasks (and connections) per process, at most one per partition. Each commits
/// one transaction at a time, so more writers mean more, smaller transactions.
const WRITERS: u32 = 4;
/// Connections for reads and acknowledgements (queries pipelined on each).
const READERS: usize = 2;
/// Bytes one group commit gathers at most.
const MAX_GROUP_BYTES: usize = 8 << 20;
/// Chunks one read fetches at most.
const READ_CHUNKS: i64 = 8;
const POLL_EVERY: Duration = Duration::from_millis(100);
/// How long a request waits for its events' commit before it is answered 503 (not
/// acknowledged: a commit that lands later only stores a retried event twice). A database
/// that stops answering (SIGSTOP, a partition without a reset) gives fast 503s, not
/// requests hanging for the 30-second statement timeout.
const APPEND_DEADLINE: Duration = Duration::from_secs(3);
/// The poll of the partitions' rows (every 100 ms) fails after this long: the store is
/// then not writable, so readiness follows a database that stopped answering within
/// about this.
const POLL_DEADLINE: Duration = Duration::from_millis(1500);
/// How often a full tablespace is probed for room while appends are refused for it.
const FULL_PROBE_EVERY: Duration = Duration::from_secs(1);
/// Reads, acknowledgements and consumer registration give up after this long (the
/// connection is made again): a read of eight chunks answers in milliseconds on a
/// database that answers at all.
const CALL_DEADLINE: Duration = Duration::from_secs(10);
const CURSORS_EVERY: Duration = Duration::from_secs(1);
const CLEANUP_EVERY: Duration = Duration::from_secs(2);
/// How often the lease session is checked, shares recomputed, and a replica waiting for
/// a lease tries again.
const LEASE_TICK: Duration = Duration::from_secs(1);
/// How often a lease request looks again while the lease session is not open yet.
const SESSION_WAIT: Duration = Duration::from_millis(50);

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    // The database's own message (with its detail), not only the driver's summary.
    StoreError::Other(crate::pg::error_text(&e))
}

fn seq_of(pos: Position) -> i64 {
    (pos & ((1u64 << PARTITION_SHIFT) - 1)) as i64
}

/// Events of one request bound for one partition, framed as they are stored.
struct Piece {
    partition: u32,
    data: Vec<u8>,
    events: u64,
    done: oneshot::Sender<Result<u64, StoreError>>,
}

#[derive(Default)]
struct Counters {
    appends: AtomicU64,
    events: AtomicU64,
    commits: AtomicU64,
    commit_nanos: AtomicU64,
    quota_rejections: AtomicU64,
    bytes_used: AtomicU64,
}

struct Shared {
    url: String,
    quota: u64,
    partitions: u32,
    counters: Counters,
    quota_blocked: AtomicBool,
    /// The last append failed for lack of space in the database (SQLSTATE 53100, a full
    /// tablespace): refused as "disk full" until an append or a probe finds room again
    /// (the poll's success does not clear it: the database answers, it is just full).
    disk_full: AtomicBool,
    /// The durable end of each partition.
    ends: Vec<watch::Sender<Position>>,
    failure: Mutex<Option<String>>,
    /// (consumer, partition) → cursor, as this process last knew it.
    cursors: Mutex<HashMap<(String, u32), Position>>,
    /// Stored bytes when an append was last refused for the quota.
    bytes_at_refusal: AtomicU64,
    leases: Leases,
    /// When the poll loop last read the partitions' rows (the status figures' age).
    polled_at: Mutex<Instant>,
    /// Progress whose acknowledgement failed (the database went away, the lease with
    /// it), per (consumer, partition): what was delivered meanwhile stays known, and is
    /// saved as soon as this process holds that lease again (on the new primary after a
    /// failover, fenced by the new lease), so that only what was in flight is sent again.
    pending: Mutex<HashMap<(String, u32), Progress>>,
    /// What this process committed last (see [`TailCache`]).
    tail: Mutex<TailCache>,
}

impl Shared {
    fn advance(&self, partition: u32, end: Position) {
        if let Some(tx) = self.ends.get(partition as usize) {
            tx.send_if_modified(|e| {
                let grew = end > *e;
                if grew {
                    *e = end;
                }
                grew
            });
        }
    }
}

pub struct PgStore {
    shared: Arc<Shared>,
    /// Reads (the writers have their own connections).
    readers: Arc<Pool>,
    /// Acknowledgements and consumer registration: never behind a read.
    control: Arc<Pool>,
    writers: Mutex<Option<Vec<mpsc::Sender<Piece>>>>,
    writer_tasks: tokio::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    stop: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A query's future, owning what it uses (it runs on a task of its own).
type QueryFuture<T> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'static>,
>;

/// Counts a store call that ran out of time (`ballast_storage_timeouts_total`, by
/// operation): on a database that answers, it stays 0.
fn timed_out(op: &'static str) {
    metrics::counter!("ballast_storage_timeouts_total", "operation" => op).increment(1);
}

/// The operations `ballast_storage_timeouts_total` counts (registered at 0 when the store
/// opens, so that a scrape shows them before the first timeout).
const TIMED_OPERATIONS: [&str; 6] = ["read", "ack", "consumer", "append", "poll", "lease"];

/// Connections of one use (reads; acknowledgements and consumers), each shared by the
/// queries of that use, which tokio-postgres pipelines on it.
///
/// A shared connection reads its socket only while the query at the head of its pipeline
/// takes its rows: tokio-postgres hands a query's rows over a channel of one message, so
/// a query whose future is not being polled stops every query behind it on that
/// connection. The router's loop starts a read ahead of need and polls it only between
/// its other awaits (an acknowledgement, a retry-state save…); with the read and the
/// acknowledgement on one connection, the acknowledgement waited for the read's rows to
/// be taken and the read for the loop to come back from the acknowledgement, until the
/// 30-second timeout failed both. Here every query runs on a
/// task of its own, which takes its rows whatever its caller does (polled, dropped or
/// busy), no lock is held across an await, and acknowledgements have their own
/// connection, so one never queues behind megabytes of a read.
struct Pool {
    url: String,
    slots: Vec<Mutex<Option<Arc<Client>>>>,
    next: AtomicUsize,
}

impl Pool {
    fn new(url: &str, size: usize, first: Option<Client>) -> Pool {
        let mut first = first.map(Arc::new);
        Pool {
            url: url.to_string(),
            slots: (0..size.max(1)).map(|_| Mutex::new(first.take())).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Slot `i`'s connection, made again when there is none or it closed. Connecting
    /// happens outside the slot's lock: two callers may both connect, the later one's
    /// connection stays, the other serves its one query and goes.
    async fn client(&self, i: usize) -> Result<Arc<Client>, StoreError> {
        if let Some(c) = lock(&self.slots[i]).as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = Arc::new(connect(&self.url).await?);
        *lock(&self.slots[i]) = Some(c.clone());
        Ok(c)
    }

    /// Forgets slot `i`'s connection if it is still `client` (it hung).
    fn forget(&self, i: usize, client: &Arc<Client>) {
        let mut slot = lock(&self.slots[i]);
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, client)) {
            *slot = None;
        }
    }

    /// Runs `f` on one of the connections (in turn), on a task of its own, within
    /// `deadline` (connecting included). On a timeout the connection is dropped (a new
    /// session next time) and the timeout counted.
    async fn run<T: Send + 'static>(
        self: Arc<Self>,
        op: &'static str,
        deadline: Duration,
        f: impl FnOnce(Arc<Client>) -> QueryFuture<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let task = tokio::spawn(async move {
            let until = tokio::time::Instant::now() + deadline;
            let client = match tokio::time::timeout_at(until, self.client(i)).await {
                Ok(c) => c?,
                Err(_) => {
                    timed_out(op);
                    return Err(StoreError::Other(format!(
                        "postgres: connecting for the {op} timed out"
                    )));
                }
            };
            match tokio::time::timeout_at(until, f(client.clone())).await {
                Ok(r) => r.map_err(pg_err),
                Err(_) => {
                    self.forget(i, &client);
                    timed_out(op);
                    Err(StoreError::Other(format!(
                        "postgres: the {op} query timed out"
                    )))
                }
            }
        });
        task.await
            .map_err(|e| StoreError::Other(format!("postgres: the {op} query failed: {e}")))?
    }
}

pub(crate) use crate::pg::{SCHEMA_LOCK, STATEMENT_TIMEOUT};

/// A lease's session also ends when idle this long: its holder pings every second, so
/// only a dead or cut-off holder lets it expire (PostgreSQL 14 and later).
const LEASE_SESSION_OPTIONS: &str = "-c idle_session_timeout=10s";

async fn connect(url: &str) -> Result<Client, StoreError> {
    connect_with(url, "").await
}

async fn connect_with(url: &str, extra_options: &str) -> Result<Client, StoreError> {
    crate::pg::connect(url, extra_options)
        .await
        .map_err(|e| StoreError::Other(e.to_string()))
}

/// The lease session of this process and what it holds.
#[derive(Default)]
struct Leases {
    /// Set once anything asked for a lease: only then is this process a member.
    wanted: AtomicBool,
    wake: tokio::sync::Notify,
    session: tokio::sync::RwLock<Option<LeaseSession>>,
    /// Until the holder drops it, a lost lease stays here (marked lost).
    held: Mutex<HashMap<(String, u32), HeldLease>>,
    /// Every (consumer, partition) this process ever leased: its acknowledgements are
    /// always fenced, also once the lease is gone.
    ever: Mutex<std::collections::HashSet<(String, u32)>>,
    /// Serialises taking leases in this process (a share is checked, then taken).
    taking: tokio::sync::Mutex<()>,
    /// Live replicas (member locks) at the last check.
    live: AtomicU64,
    /// The lease session's backend pid (0 while there is none), for status.
    pid: AtomicI32,
}

#[derive(Clone)]
struct LeaseSession {
    client: Arc<Client>,
    pid: i32,
    generation: u64,
}

struct HeldLease {
    generation: u64,
    pid: i32,
    state: watch::Sender<LeaseState>,
}

/// The first advisory-lock key of a consumer's leases (FNV-1a of its name; stable across
/// versions and processes); the second is the partition.
fn lease_class(consumer: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in b"ballast-lease:".iter().chain(consumer.as_bytes()) {
        h ^= *b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    // Never the member class.
    if h as i32 == MEMBER_CLASS {
        h ^= 1;
    }
    h as i32
}

/// A replica's share of a consumer's partitions.
fn fair_share(partitions: u32, live: u64) -> usize {
    (partitions as u64).div_ceil(live.max(1)) as usize
}

impl Leases {
    fn mark_all(&self, state: LeaseState) {
        for h in lock(&self.held).values() {
            let _ = h.state.send(state);
        }
    }
}

/// Opens the lease session and takes a member lock on it.
async fn open_lease_session(url: &str, generation: u64) -> Result<LeaseSession, StoreError> {
    let client = connect_with(url, LEASE_SESSION_OPTIONS).await?;
    for _ in 0..16 {
        let id: i32 = rand::random();
        let row = tokio::time::timeout(
            STATEMENT_TIMEOUT,
            client.query_one(
                "SELECT pg_try_advisory_lock($1::int4, $2::int4), pg_backend_pid()",
                &[&MEMBER_CLASS, &id],
            ),
        )
        .await
        .map_err(|_| StoreError::Other("postgres: taking the member lock timed out".into()))?
        .map_err(pg_err)?;
        if row.get::<_, bool>(0) {
            return Ok(LeaseSession {
                client: Arc::new(client),
                pid: row.get(1),
                generation,
            });
        }
    }
    Err(StoreError::Other(
        "postgres: no free member id for this replica".into(),
    ))
}

/// Keeps the lease session alive (a new one when it fails, every lease then lost), counts
/// the live replicas and asks back the leases beyond this replica's share.
async fn lease_keeper(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let leases = &shared.leases;
    let mut generation = 0u64;
    let mut failing_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LEASE_TICK) => {}
            _ = leases.wake.notified() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        if !leases.wanted.load(Ordering::Acquire) {
            continue;
        }
        let current = leases.session.read().await.clone();
        let alive = match &current {
            Some(s) if !s.client.is_closed() => {
                tokio::time::timeout(LEASE_TICK * 3, s.client.simple_query("SELECT 1"))
                    .await
                    .is_ok_and(|r| r.is_ok())
            }
            _ => false,
        };
        if !alive {
            if current.is_some() {
                tracing::warn!(
                    "the lease session failed: every delivery lease of this replica is lost"
                );
                *leases.session.write().await = None;
                leases.pid.store(0, Ordering::Relaxed);
                leases.mark_all(LeaseState::Lost);
            }
            generation += 1;
            match open_lease_session(&shared.url, generation).await {
                Ok(s) => {
                    tracing::info!(pid = s.pid, "lease session open");
                    leases.pid.store(s.pid, Ordering::Relaxed);
                    *leases.session.write().await = Some(s);
                    failing_since = None;
                }
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() < LEASE_TICK * 2 {
                        tracing::warn!(error = %e, "opening the lease session failed; retrying every second");
                    }
                    continue;
                }
            }
        }
        let Some(session) = leases.session.read().await.clone() else {
            continue;
        };
        let counted = tokio::time::timeout(
            STATEMENT_TIMEOUT,
            session.client.query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
                 AND classid = $1::oid AND objsubid = 2 AND granted",
                &[&(MEMBER_CLASS as u32)],
            ),
        )
        .await;
        let Ok(Ok(row)) = counted else { continue };
        let live = row.get::<_, i64>(0).max(1) as u64;
        leases.live.store(live, Ordering::Relaxed);
        // Ask back what is beyond the share (the highest partitions first).
        let share = fair_share(shared.partitions, live);
        let held = lock(&leases.held);
        let mut by_consumer: HashMap<&str, Vec<(u32, &HeldLease)>> = HashMap::new();
        for ((consumer, partition), h) in held.iter() {
            if *h.state.borrow() == LeaseState::Held {
                by_consumer
                    .entry(consumer.as_str())
                    .or_default()
                    .push((*partition, h));
            }
        }
        for (consumer, mut mine) in by_consumer {
            if mine.len() > share {
                mine.sort_by_key(|(p, _)| *p);
                for (partition, h) in &mine[share..] {
                    tracing::info!(
                        consumer,
                        partition,
                        live,
                        share,
                        "giving a lease back to even out the replicas"
                    );
                    let _ = h.state.send(LeaseState::Yield);
                }
            }
        }
    }
    // Stopping: the session ends with the last handle (its locks with it).
    leases.mark_all(LeaseState::Lost);
    *leases.session.write().await = None;
}

/// Gives the advisory lock back when a lease is dropped.
struct Held {
    shared: Arc<Shared>,
    consumer: String,
    partition: u32,
    generation: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        let key = (std::mem::take(&mut self.consumer), self.partition);
        let ours = {
            let mut held = lock(&self.shared.leases.held);
            match held.get(&key) {
                Some(h) if h.generation == self.generation => held.remove(&key).is_some(),
                _ => false,
            }
        };
        if !ours {
            return;
        }
        let shared = self.shared.clone();
        let generation = self.generation;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let session = shared.leases.session.read().await.clone();
                if let Some(s) = session.filter(|s| s.generation == generation) {
                    let _ = tokio::time::timeout(
                        STATEMENT_TIMEOUT,
                        s.client.execute(
                            "SELECT pg_advisory_unlock($1::int4, $2::int4)",
                            &[&lease_class(&key.0), &(key.1 as i32)],
                        ),
                    )
                    .await;
                }
            });
        }
    }
}

impl PgStore {
    /// Connects, creates the schema if needed, and starts the writers. `quota` bounds the
    /// bytes of stored events; `partitions` is used when the database is new (else the
    /// database's own number stands).
    pub async fn open(url: &str, quota: u64, partitions: u32) -> Result<PgStore, StoreError> {
        let client = connect(url).await?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(pg_err)?;
        let prepared = prepare_schema(&client, partitions).await;
        client
            .execute("SELECT pg_advisory_unlock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(pg_err)?;
        let partitions = prepared?;
        let mut ends = Vec::with_capacity(partitions as usize);
        let mut bytes = 0i64;
        let rows = client
            .query(
                "SELECT part, next_seq, bytes FROM ballast_partition ORDER BY part",
                &[],
            )
            .await
            .map_err(pg_err)?;
        for r in &rows {
            let (part, next, b): (i32, i64, i64) = (r.get(0), r.get(1), r.get(2));
            if part as usize != ends.len() {
                return Err(StoreError::Other(format!(
                    "postgres: ballast_partition lacks partition {}",
                    ends.len()
                )));
            }
            ends.push(watch::channel(partition_base(part as u32) + next.max(0) as u64).0);
            bytes += b.max(0);
        }
        if ends.len() != partitions as usize {
            return Err(StoreError::Other(format!(
                "postgres: ballast_partition has {} rows for {partitions} partitions",
                ends.len()
            )));
        }
        let mut cursors = HashMap::new();
        for r in client
            .query("SELECT name, part, cursor FROM ballast_cursor", &[])
            .await
            .map_err(pg_err)?
        {
            let (name, part, cursor): (String, i32, i64) = (r.get(0), r.get(1), r.get(2));
            cursors.insert(
                (name, part as u32),
                partition_base(part as u32) + cursor.max(0) as u64,
            );
        }
        let shared = Arc::new(Shared {
            url: url.to_string(),
            quota,
            partitions,
            counters: Counters::default(),
            quota_blocked: AtomicBool::new(false),
            disk_full: AtomicBool::new(false),
            ends,
            failure: Mutex::new(None),
            cursors: Mutex::new(cursors),
            bytes_at_refusal: AtomicU64::new(0),
            leases: Leases::default(),
            polled_at: Mutex::new(Instant::now()),
            pending: Mutex::new(HashMap::new()),
            tail: Mutex::new(TailCache::default()),
        });
        shared
            .counters
            .bytes_used
            .store(bytes as u64, Ordering::Relaxed);
        let (stop, stop_rx) = watch::channel(false);
        let mut senders = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..partitions.min(WRITERS) {
            let (tx, rx) = mpsc::channel(4096);
            senders.push(tx);
            tasks.push(tokio::spawn(write_loop(shared.clone(), rx)));
        }
        tokio::spawn(poll_loop(shared.clone(), stop_rx.clone()));
        tokio::spawn(lease_keeper(shared.clone(), stop_rx));
        for op in TIMED_OPERATIONS {
            metrics::counter!("ballast_storage_timeouts_total", "operation" => op).increment(0);
        }
        Ok(PgStore {
            shared,
            readers: Arc::new(Pool::new(url, READERS, None)),
            control: Arc::new(Pool::new(url, 1, Some(client))),
            writers: Mutex::new(Some(senders)),
            writer_tasks: tokio::sync::Mutex::new(tasks),
            stop,
        })
    }

    /// Live replicas as the lease session last counted them (0 before it did).
    pub fn live_replicas(&self) -> u64 {
        self.shared.leases.live.load(Ordering::Relaxed)
    }

    /// Runs `f` on a connection of `pool` (made again when it was lost), bounded by
    /// `deadline`. See [`Pool::run`].
    async fn on<T: Send + 'static>(
        &self,
        pool: &Arc<Pool>,
        op: &'static str,
        deadline: Duration,
        f: impl FnOnce(Arc<Client>) -> QueryFuture<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        pool.clone().run(op, deadline, f).await
    }

    /// Saves `progress` (fenced by the lease when this process ever held one).
    async fn ack_once(&self, consumer: &str, progress: &Progress) -> Result<(), StoreError> {
        let partition = partition_of(progress.cursor);
        let name = consumer.to_string();
        let part = partition as i32;
        let cursor = seq_of(progress.cursor);
        let done = progress.encode_done();
        let key = (name.clone(), partition);
        let fence = match lock(&self.shared.leases.held).get(&key) {
            Some(h) if *h.state.borrow() != LeaseState::Lost => Some(h.pid),
            Some(_) => None,
            None => None,
        };
        if fence.is_none() && lock(&self.shared.leases.ever).contains(&key) {
            return Err(StoreError::Other(format!(
                "consumer {consumer:?}: this process no longer holds the lease of partition {partition}"
            )));
        }
        let class = lease_class(consumer) as u32;
        let updated = self
            .on(&self.control, "ack", CALL_DEADLINE, move |c| {
                Box::pin(async move {
                    match fence {
                        None => {
                            c.execute(
                                "UPDATE ballast_cursor SET cursor = greatest(cursor, $3),
                                     done = CASE WHEN $3 >= cursor THEN $4 ELSE done END
                                 WHERE name = $1 AND part = $2",
                                &[&name, &part, &cursor, &done],
                            )
                            .await
                        }
                        Some(pid) => {
                            // Fenced: counts only while the lease's session holds its lock.
                            c.execute(
                                "UPDATE ballast_cursor SET cursor = greatest(cursor, $3),
                                     done = CASE WHEN $3 >= cursor THEN $4 ELSE done END
                                 WHERE name = $1 AND part = $2 AND EXISTS (
                                     SELECT 1 FROM pg_locks
                                     WHERE locktype = 'advisory' AND classid = $5::oid
                                       AND objid = $6::oid AND objsubid = 2 AND pid = $7
                                       AND granted)",
                                &[&name, &part, &cursor, &done, &class, &(partition), &pid],
                            )
                            .await
                        }
                    }
                })
            })
            .await?;
        if updated == 0 {
            return Err(match fence {
                Some(_) => StoreError::Other(format!(
                    "consumer {consumer:?}: this process no longer holds the lease of partition {partition}"
                )),
                None => StoreError::Other(format!("unknown consumer {consumer:?}")),
            });
        }
        let mut cursors = lock(&self.shared.cursors);
        let c = cursors
            .entry((consumer.to_string(), partition))
            .or_insert(progress.cursor);
        *c = (*c).max(progress.cursor);
        Ok(())
    }

    fn writer_for(&self, partition: u32) -> Option<mpsc::Sender<Piece>> {
        let writers = lock(&self.writers);
        let w = writers.as_ref()?;
        w.get(partition as usize % w.len()).cloned()
    }
}

/// Creates the schema if needed (under the schema lock) and returns the partitions of
/// the database.
async fn prepare_schema(client: &Client, partitions: u32) -> Result<u32, StoreError> {
    let old_layout: bool = client
        .query_one("SELECT to_regclass('ballast_events') IS NOT NULL", &[])
        .await
        .map_err(pg_err)?
        .get(0);
    if old_layout {
        let left: bool = client
            .query_one("SELECT EXISTS (SELECT 1 FROM ballast_events)", &[])
            .await
            .map_err(pg_err)?
            .get(0);
        if left {
            return Err(StoreError::Other(
                "postgres: this database still holds undelivered events in the layout of an \
                 earlier ballast (table ballast_events); let that version deliver them first"
                    .into(),
            ));
        }
    }
    client.batch_execute(SCHEMA).await.map_err(pg_err)?;
    // A database made by a version without compression: its chunks are codec 0. (Looked
    // up first: ALTER TABLE takes the table's strongest lock even when it changes nothing.)
    let has_codec = client
        .query_opt(
            "SELECT 1 FROM pg_attribute
             WHERE attrelid = 'ballast_chunk'::regclass AND attname = 'codec' AND NOT attisdropped",
            &[],
        )
        .await
        .map_err(pg_err)?
        .is_some();
    if !has_codec {
        client
            .batch_execute(
                "ALTER TABLE ballast_chunk ADD COLUMN IF NOT EXISTS codec smallint NOT NULL DEFAULT 0",
            )
            .await
            .map_err(pg_err)?;
    }
    // Chunks come compressed (or too small to matter) and are read whole: PostgreSQL
    // does not compress them again.
    let storage: Option<i8> = client
        .query_opt(
            "SELECT attstorage FROM pg_attribute
             WHERE attrelid = 'ballast_chunk'::regclass AND attname = 'data'",
            &[],
        )
        .await
        .map_err(pg_err)?
        .map(|r| r.get(0));
    if storage != Some(b'e' as i8) {
        client
            .batch_execute("ALTER TABLE ballast_chunk ALTER COLUMN data SET STORAGE EXTERNAL")
            .await
            .map_err(pg_err)?;
    }
    let wanted = partitions.clamp(1, super::MAX_PARTITIONS) as i32;
    client
        .execute(
            "INSERT INTO ballast_settings (id, partitions) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
            &[&wanted],
        )
        .await
        .map_err(pg_err)?;
    let fixed: i32 = client
        .query_one("SELECT partitions FROM ballast_settings WHERE id = 1", &[])
        .await
        .map_err(pg_err)?
        .get(0);
    if fixed != wanted {
        tracing::warn!(
            configured = wanted,
            database = fixed,
            "storage.partitions differs from the number fixed when this database was first used; using the database's"
        );
    }
    client
        .execute(
            "INSERT INTO ballast_partition (part, next_seq, bytes)
             SELECT g, 0, 0 FROM generate_series(0, $1 - 1) AS g ON CONFLICT (part) DO NOTHING",
            &[&fixed],
        )
        .await
        .map_err(pg_err)?;
    Ok(fixed.max(1) as u32)
}

/// Appends one event, framed by its length, to a chunk's bytes.
fn frame_into(buf: &mut Vec<u8>, source: &str, meta: &[u8], event: &[u8]) {
    let at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    envelope::encode_into(buf, source, meta, event);
    let len = (buf.len() - at - 4) as u32;
    buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// The records of a chunk, in order.
fn unframe(data: &bytes::Bytes) -> impl Iterator<Item = Result<bytes::Bytes, StoreError>> + '_ {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= data.len() {
            return None;
        }
        let Some(len) = data
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        else {
            at = data.len();
            return Some(Err(StoreError::Other(
                "postgres: a chunk is truncated".into(),
            )));
        };
        let (start, end) = (at + 4, at + 4 + len);
        if end > data.len() {
            at = data.len();
            return Some(Err(StoreError::Other(
                "postgres: a chunk is truncated".into(),
            )));
        }
        at = end;
        Some(Ok(data.slice(start..end)))
    })
}

const WRITE_CHUNK: &str = "WITH bumped AS (
        UPDATE ballast_partition SET next_seq = next_seq + $2, bytes = bytes + $3
        WHERE part = $1 RETURNING next_seq
    )
    INSERT INTO ballast_chunk (part, end_seq, first_seq, data, codec)
    SELECT $1, next_seq, next_seq - $2, $4, $5 FROM bumped
    RETURNING first_seq";

/// What one group commit writes for one partition.
struct Chunk {
    part: u32,
    events: i64,
    /// Bytes stored (after compression): what the quota counts.
    bytes: i64,
    data: Vec<u8>,
    codec: i16,
    /// The records as written (uncompressed), for the tail cache.
    raw: bytes::Bytes,
}

/// `codec` of a chunk stored as written.
const CODEC_NONE: i16 = 0;
/// `codec` of a chunk compressed with LZ4 (block format, uncompressed size first).
const CODEC_LZ4: i16 = 1;
/// Smaller chunks are stored as they are.
const COMPRESS_FROM: usize = 512;

/// Compresses a chunk's records with LZ4 when that makes it smaller. Events are JSON
/// with repeated keys (a 100-event batch shrinks to about a quarter): fewer bytes to
/// send, to write to the WAL and to TOAST, for about a millisecond of CPU per megabyte.
#[cfg(test)]
fn compress(data: Vec<u8>) -> (i16, Vec<u8>) {
    if data.len() < COMPRESS_FROM {
        return (CODEC_NONE, data);
    }
    let packed = lz4_flex::block::compress_prepend_size(&data);
    if packed.len() < data.len() {
        (CODEC_LZ4, packed)
    } else {
        (CODEC_NONE, data)
    }
}

/// [`compress`] from a slice: the chunk's bytes to store (a copy when not compressed).
fn compress_slice(data: &[u8]) -> (i16, Vec<u8>) {
    if data.len() < COMPRESS_FROM {
        return (CODEC_NONE, data.to_vec());
    }
    let packed = lz4_flex::block::compress_prepend_size(data);
    if packed.len() < data.len() {
        (CODEC_LZ4, packed)
    } else {
        (CODEC_NONE, data.to_vec())
    }
}

/// The chunks this process committed last, per partition, as written (uncompressed),
/// bounded in bytes. A delivery loop that follows the end of its partition reads what was
/// just appended: served from here, PostgreSQL neither reads, de-TOASTs nor sends it again
/// and ballast does not decompress it. Only a run of chunks that follow each other is
/// served (a chunk another replica committed in between is not here: the read goes to the
/// database from there), so nothing is ever stepped over.
#[derive(Default)]
struct TailCache {
    /// partition → (end_seq → (first_seq, records)).
    parts: HashMap<u32, BTreeMap<i64, (i64, bytes::Bytes)>>,
    bytes: usize,
}

/// Bytes the tail cache holds at most (all partitions together).
const TAIL_CACHE_BYTES: usize = 64 << 20;

impl TailCache {
    fn insert(&mut self, part: u32, first_seq: i64, end_seq: i64, raw: bytes::Bytes) {
        self.bytes += raw.len();
        if let Some(old) = self
            .parts
            .entry(part)
            .or_default()
            .insert(end_seq, (first_seq, raw))
        {
            self.bytes -= old.1.len();
        }
        // Over the bound: drop the oldest chunk of the partition holding the most.
        while self.bytes > TAIL_CACHE_BYTES {
            let Some((&p, _)) = self
                .parts
                .iter()
                .max_by_key(|(_, m)| m.values().map(|(_, b)| b.len()).sum::<usize>())
            else {
                break;
            };
            let Some(m) = self.parts.get_mut(&p) else {
                break;
            };
            match m.pop_first() {
                Some((_, (_, b))) => self.bytes -= b.len(),
                None => {
                    self.parts.remove(&p);
                }
            }
        }
    }

    /// The cached chunks holding `from_seq` and those following it without a gap, up to
    /// `max_events` events: (first_seq, records).
    fn get(&self, part: u32, from_seq: i64, max_events: usize) -> Vec<(i64, bytes::Bytes)> {
        let mut out = Vec::new();
        let Some(m) = self.parts.get(&part) else {
            return out;
        };
        let mut at = from_seq;
        let mut events = 0usize;
        for (&end, (first, raw)) in m.range(from_seq + 1..) {
            if *first > at || events >= max_events {
                break;
            }
            out.push((*first, raw.clone()));
            events += (end - at.max(*first)) as usize;
            at = end;
        }
        out
    }
}

/// A chunk's records as written, whatever its codec.
fn decompress(codec: i16, data: Vec<u8>) -> Result<Vec<u8>, StoreError> {
    match codec {
        CODEC_NONE => Ok(data),
        CODEC_LZ4 => {
            let damaged = |why: String| {
                StoreError::Other(format!("postgres: a compressed chunk is damaged: {why}"))
            };
            let size = data
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .ok_or_else(|| damaged("no size".into()))?;
            let out = lz4_flex::block::decompress_size_prepended(&data)
                .map_err(|e| damaged(e.to_string()))?;
            // A cut block can decode to fewer bytes without an error of its own.
            if out.len() != size as usize {
                return Err(damaged(format!("{} bytes of {size}", out.len())));
            }
            Ok(out)
        }
        other => Err(StoreError::Other(format!(
            "postgres: a chunk has codec {other}, unknown to this version"
        ))),
    }
}

/// A writer's connection and its prepared statement.
struct WriterConn {
    client: Client,
    write_chunk: tokio_postgres::Statement,
}

/// One group-commit writer: everything submitted to it while its last commit ran, one
/// chunk per partition, the statements pipelined on its connection.
async fn write_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<Piece>) {
    let mut conn: Option<WriterConn> = None;
    let mut backoff = Duration::from_millis(100);
    let mut last_logged: Option<Instant> = None;
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        let mut bytes = group[0].data.len();
        while bytes < MAX_GROUP_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.data.len();
                    group.push(p);
                }
                Err(_) => break,
            }
        }
        // A request that stopped waiting (answered 503 at its deadline while this writer
        // was stuck) is not written late: its client retries it.
        group.retain(|p| !p.done.is_closed());
        // The quota, per piece in order: what does not fit is refused, the rest goes.
        let mut used = shared.counters.bytes_used.load(Ordering::Relaxed);
        let mut by_part: BTreeMap<u32, Vec<Piece>> = BTreeMap::new();
        for p in group {
            let b = p.data.len() as u64;
            if used + b > shared.quota {
                shared.bytes_at_refusal.store(used, Ordering::Relaxed);
                shared.quota_blocked.store(true, Ordering::Release);
                shared
                    .counters
                    .quota_rejections
                    .fetch_add(1, Ordering::Relaxed);
                let _ = p.done.send(Err(StoreError::QuotaExceeded));
            } else {
                used += b;
                by_part.entry(p.partition).or_default().push(p);
            }
        }
        if by_part.is_empty() {
            continue;
        }
        if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            conn = match connect_writer(&shared.url).await {
                Ok(c) => {
                    backoff = Duration::from_millis(100);
                    Some(c)
                }
                Err(e) => {
                    fail_all(&shared, by_part.into_values().flatten(), &e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
        }
        let Some(c) = conn.as_ref() else { continue };
        let chunks: Vec<Chunk> = by_part
            .iter()
            .map(|(part, pieces)| {
                let n: u64 = pieces.iter().map(|p| p.events).sum();
                let mut data = Vec::with_capacity(pieces.iter().map(|p| p.data.len()).sum());
                for p in pieces {
                    data.extend_from_slice(&p.data);
                }
                let raw = bytes::Bytes::from(data);
                let (codec, data) = compress_slice(&raw);
                Chunk {
                    part: *part,
                    events: n as i64,
                    bytes: data.len() as i64,
                    data,
                    codec,
                    raw,
                }
            })
            .collect();
        let started = Instant::now();
        let firsts = match tokio::time::timeout(STATEMENT_TIMEOUT, commit_chunks(c, &chunks)).await
        {
            Ok(Ok(firsts)) => firsts,
            outcome => {
                // The outcome may be unknown: nothing is acknowledged (the server rolls
                // back what did not commit; a retried event is at worst stored twice).
                let err = match outcome {
                    Ok(Err(e)) if e.code() == Some(&tokio_postgres::error::SqlState::DISK_FULL) => {
                        StoreError::DiskFull
                    }
                    Ok(Err(e)) => pg_err(e),
                    _ => {
                        conn = None; // hung: a new session next time
                        timed_out("append");
                        StoreError::Other("postgres: the append timed out".into())
                    }
                };
                if conn.as_ref().is_some_and(|c| c.client.is_closed()) {
                    conn = None;
                }
                // Once a second at most: under load every group fails alike.
                if last_logged.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(1)) {
                    last_logged = Some(Instant::now());
                    tracing::error!(error = %err, "storing events in postgres failed; nothing of this group is acknowledged");
                }
                if matches!(err, StoreError::DiskFull) {
                    // Full, not failed: refused steadily as such until there is room.
                    shared.disk_full.store(true, Ordering::Release);
                    for p in by_part.into_values().flatten() {
                        let _ = p.done.send(Err(StoreError::DiskFull));
                    }
                } else {
                    fail_all(&shared, by_part.into_values().flatten(), &err);
                }
                continue;
            }
        };
        let counters = &shared.counters;
        counters.commits.fetch_add(1, Ordering::Relaxed);
        counters
            .commit_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        for ((part, pieces), (first_seq, chunk)) in
            by_part.into_iter().zip(firsts.into_iter().zip(&chunks))
        {
            let n = chunk.events;
            counters
                .bytes_used
                .fetch_add(chunk.bytes as u64, Ordering::Relaxed);
            let mut seq = first_seq as u64;
            for p in pieces {
                counters.appends.fetch_add(1, Ordering::Relaxed);
                counters.events.fetch_add(p.events, Ordering::Relaxed);
                let _ = p.done.send(Ok(seq));
                seq += p.events;
            }
            lock(&shared.tail).insert(part, first_seq, first_seq + n, chunk.raw.clone());
            shared.advance(part, partition_base(part) + first_seq as u64 + n as u64);
        }
        *lock(&shared.failure) = None;
        shared.disk_full.store(false, Ordering::Release);
    }
}

/// One transaction writing one chunk per partition, everything pipelined (`BEGIN`, the
/// statements, `COMMIT` go out without waiting for each other: one round trip). They run
/// in ascending partition order (`chunks` comes from a BTreeMap): every replica's
/// transactions lock partition rows in one order, so they never deadlock. A statement
/// that fails aborts the transaction (its `COMMIT` rolls back) and fails the whole group.
/// One chunk needs no transaction block: its statement commits alone.
async fn commit_chunks(
    c: &WriterConn,
    chunks: &[Chunk],
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let writes = chunks.iter().map(|chunk| {
        let part = chunk.part as i32;
        async move {
            c.client
                .query_one(
                    &c.write_chunk,
                    &[
                        &part,
                        &chunk.events,
                        &chunk.bytes,
                        &chunk.data,
                        &chunk.codec,
                    ],
                )
                .await
                .map(|r| r.get::<_, i64>(0))
        }
    });
    if chunks.len() == 1 {
        return futures::future::try_join_all(writes).await;
    }
    let (begin, firsts, commit) = futures::join!(
        c.client.batch_execute("BEGIN"),
        futures::future::join_all(writes),
        c.client.batch_execute("COMMIT"),
    );
    begin?;
    let firsts = firsts.into_iter().collect::<Result<Vec<i64>, _>>()?;
    commit?;
    Ok(firsts)
}

async fn connect_writer(url: &str) -> Result<WriterConn, StoreError> {
    let client = connect(url).await?;
    let write_chunk = tokio::time::timeout(STATEMENT_TIMEOUT, client.prepare(WRITE_CHUNK))
        .await
        .map_err(|_| StoreError::Other("postgres: preparing the append timed out".into()))?
        .map_err(pg_err)?;
    Ok(WriterConn {
        client,
        write_chunk,
    })
}

fn fail_all(shared: &Shared, pieces: impl Iterator<Item = Piece>, err: &StoreError) {
    *lock(&shared.failure) = Some(err.to_string());
    for p in pieces {
        let _ = p.done.send(Err(StoreError::Other(err.to_string())));
    }
}

const CLEANUP: &str =
    "WITH horizon AS (SELECT part, min(cursor) AS h FROM ballast_cursor GROUP BY part),
     gone AS (DELETE FROM ballast_chunk c USING horizon
              WHERE c.part = horizon.part AND c.end_seq <= horizon.h
              RETURNING c.part, octet_length(c.data)::bigint AS b),
     freed AS (SELECT part, sum(b)::bigint AS n FROM gone GROUP BY part)
UPDATE ballast_partition p SET bytes = greatest(p.bytes - freed.n, 0)
FROM freed WHERE p.part = freed.part";

/// Deletes the chunks every consumer of their partition is past (one replica at a time).
async fn cleanup(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let ours: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&CLEANUP_LOCK])
        .await?
        .get(0);
    if ours {
        tx.execute(CLEANUP, &[]).await?;
    }
    tx.commit().await
}

/// Whether a chunk fits in the database again after it was full: a chunk-sized row of
/// noise (it cannot be compressed away) inserted where chunks go and rolled back.
async fn probe_room(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    let mut x = rand::random::<u64>() | 1;
    let noise: Vec<u8> = (0..256 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO ballast_chunk (part, end_seq, first_seq, data, codec) VALUES (-1, -1, -1, $1, 0)",
        &[&noise],
    )
    .await?;
    tx.rollback().await
}

/// Follows what other replicas commit (and the bytes they add), refreshes the cursors
/// (for status) and deletes what every consumer is past. Its failures are the store's
/// readiness while nothing is appended.
async fn poll_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut client: Option<Client> = None;
    let mut last_cursors = Instant::now();
    let mut last_cleanup = Instant::now();
    let mut last_probe = Instant::now();
    let mut backoff = POLL_EVERY;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            match connect(&shared.url).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    *lock(&shared.failure) = Some(e.to_string());
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        let polled = tokio::time::timeout(
            POLL_DEADLINE,
            c.query("SELECT part, next_seq, bytes FROM ballast_partition", &[]),
        )
        .await;
        let rows = match polled {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                *lock(&shared.failure) = Some(pg_err(e).to_string());
                client = None;
                continue;
            }
            Err(_) => {
                timed_out("poll");
                *lock(&shared.failure) = Some("postgres: the database does not answer".into());
                client = None; // hung: a new session next time
                continue;
            }
        };
        backoff = POLL_EVERY;
        *lock(&shared.polled_at) = Instant::now();
        // The database answers again: let the next append try (readiness follows).
        *lock(&shared.failure) = None;
        let mut bytes = 0u64;
        for r in rows {
            let (part, next, b): (i32, i64, i64) = (r.get(0), r.get(1), r.get(2));
            bytes += b.max(0) as u64;
            shared.advance(
                part as u32,
                partition_base(part as u32) + next.max(0) as u64,
            );
        }
        shared.counters.bytes_used.store(bytes, Ordering::Relaxed);
        // Space was freed (by any replica) since the last refusal.
        if bytes < shared.bytes_at_refusal.load(Ordering::Relaxed) {
            shared.quota_blocked.store(false, Ordering::Release);
        }
        if last_cursors.elapsed() >= CURSORS_EVERY {
            last_cursors = Instant::now();
            if let Ok(Ok(rows)) = tokio::time::timeout(
                STATEMENT_TIMEOUT,
                c.query("SELECT name, part, cursor FROM ballast_cursor", &[]),
            )
            .await
            {
                let mut cursors = lock(&shared.cursors);
                for r in rows {
                    let (name, part, cursor): (String, i32, i64) = (r.get(0), r.get(1), r.get(2));
                    let pos = partition_base(part as u32) + cursor.max(0) as u64;
                    let c = cursors.entry((name, part as u32)).or_insert(pos);
                    *c = (*c).max(pos);
                }
            }
        }
        if shared.disk_full.load(Ordering::Acquire) && last_probe.elapsed() >= FULL_PROBE_EVERY {
            last_probe = Instant::now();
            match tokio::time::timeout(STATEMENT_TIMEOUT, probe_room(c)).await {
                Ok(Ok(())) => {
                    tracing::info!("the database has room for events again");
                    shared.disk_full.store(false, Ordering::Release);
                }
                Ok(Err(e)) => tracing::debug!(error = %pg_err(e), "still no room in the database"),
                Err(_) => client = None,
            }
        }
        if client.is_none() {
            continue;
        }
        let Some(c) = client.as_mut() else { continue };
        if last_cleanup.elapsed() >= CLEANUP_EVERY {
            last_cleanup = Instant::now();
            match tokio::time::timeout(STATEMENT_TIMEOUT, cleanup(c)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %pg_err(e), "deleting delivered events failed")
                }
                Err(_) => client = None,
            }
        }
    }
}

#[async_trait]
impl Store for PgStore {
    fn partitions(&self) -> u32 {
        self.shared.partitions
    }

    async fn append(&self, batch: EventBatch) -> Result<Appended, StoreError> {
        if batch.is_empty() {
            let end = *self.shared.ends[0].borrow();
            return Ok(Appended {
                first: end,
                end,
                events: 0,
            });
        }
        // The batch's events by partition, framed as they are stored (in order).
        let mut pieces: BTreeMap<u32, (Vec<u8>, u64)> = BTreeMap::new();
        let mut first_partition = None;
        for (event, meta) in batch.events() {
            let p = partition_for_meta(meta, self.shared.partitions);
            first_partition.get_or_insert(p);
            let (buf, n) = pieces.entry(p).or_default();
            frame_into(buf, &batch.source, meta, event);
            *n += 1;
        }
        if self.shared.disk_full.load(Ordering::Acquire) {
            return Err(StoreError::DiskFull);
        }
        // Bounded: a database that stopped answering gets the request a 503 in
        // APPEND_DEADLINE, not when the statement times out.
        let until = tokio::time::Instant::now() + APPEND_DEADLINE;
        let late = || {
            timed_out("append");
            *lock(&self.shared.failure) = Some(format!(
                "postgres: no commit within {} s",
                APPEND_DEADLINE.as_secs()
            ));
            StoreError::Other(format!(
                "postgres: the events were not committed within {} s (not acknowledged)",
                APPEND_DEADLINE.as_secs()
            ))
        };
        let mut waits = Vec::with_capacity(pieces.len());
        for (partition, (data, events)) in pieces {
            let tx = self
                .writer_for(partition)
                .ok_or(StoreError::Other("the store is closed".into()))?;
            let (done, wait) = oneshot::channel();
            let piece = Piece {
                partition,
                data,
                events,
                done,
            };
            tokio::time::timeout_at(until, tx.send(piece))
                .await
                .map_err(|_| late())?
                .map_err(|_| StoreError::Other("the store is closed".into()))?;
            waits.push((partition, events, wait));
        }
        // Acknowledged only once every piece committed.
        let mut appended = None;
        let mut total = 0usize;
        let mut error = None;
        for (partition, events, wait) in waits {
            let Ok(outcome) = tokio::time::timeout_at(until, wait).await else {
                return Err(late());
            };
            match outcome {
                Ok(Ok(first_seq)) => {
                    total += events as usize;
                    if Some(partition) == first_partition {
                        let first = partition_base(partition) + first_seq;
                        appended = Some((first, first + events));
                    }
                }
                Ok(Err(e)) => {
                    // A quota refusal is what the client is told if any piece got one.
                    if error.is_none() || matches!(e, StoreError::QuotaExceeded) {
                        error = Some(e);
                    }
                }
                Err(_) => {
                    error.get_or_insert(StoreError::Other("the store is closed".into()));
                }
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        let (first, end) = appended.unwrap_or((0, 0));
        Ok(Appended {
            first,
            end,
            events: total,
        })
    }

    async fn register_consumer(
        &self,
        consumer: &str,
        partition: u32,
    ) -> Result<Progress, StoreError> {
        if partition >= self.shared.partitions {
            return Err(StoreError::Other(format!(
                "partition {partition} of {}",
                self.shared.partitions
            )));
        }
        let name = consumer.to_string();
        let part = partition as i32;
        let (cursor, done): (i64, Vec<u8>) = self
            .on(&self.control, "consumer", CALL_DEADLINE, move |c| {
                Box::pin(async move {
                    c.execute(
                        "INSERT INTO ballast_cursor (name, part, cursor)
                         VALUES ($1, $2, coalesce(
                             (SELECT first_seq FROM ballast_chunk WHERE part = $2
                              ORDER BY end_seq LIMIT 1),
                             (SELECT next_seq FROM ballast_partition WHERE part = $2)))
                         ON CONFLICT (name, part) DO NOTHING",
                        &[&name, &part],
                    )
                    .await?;
                    let row = c
                        .query_one(
                            "SELECT cursor, done FROM ballast_cursor WHERE name = $1 AND part = $2",
                            &[&name, &part],
                        )
                        .await?;
                    Ok((row.get(0), row.get(1)))
                })
            })
            .await?;
        let cursor = partition_base(partition) + cursor.max(0) as u64;
        lock(&self.shared.cursors).insert((consumer.to_string(), partition), cursor);
        let stored = Progress::decode_done(cursor, &done);
        // What this process delivered while its acknowledgements failed (a failover): saved
        // now, under the lease it holds again, and resumed from.
        let pending = lock(&self.shared.pending)
            .get(&(consumer.to_string(), partition))
            .cloned();
        if let Some(p) = pending.filter(|p| p.cursor >= stored.cursor) {
            match self.ack_once(consumer, &p).await {
                Ok(()) => {
                    lock(&self.shared.pending).remove(&(consumer.to_string(), partition));
                    tracing::info!(
                        consumer,
                        partition,
                        from = stored.cursor,
                        to = p.cursor,
                        "saved the delivery progress kept while the database was away"
                    );
                    return Ok(p);
                }
                Err(e) => {
                    tracing::warn!(consumer, partition, error = %e, "saving the delivery progress kept while the database was away failed")
                }
            }
        }
        Ok(stored)
    }

    async fn read(&self, from: Position, max_events: usize) -> Result<ReadEvents, StoreError> {
        let partition = partition_of(from);
        let base = partition_base(partition);
        let part = partition as i32;
        let from_seq = seq_of(from);
        let max_events = max_events.max(1);
        let cached = lock(&self.shared.tail).get(partition, from_seq, max_events);
        let chunks: Vec<(i64, bytes::Bytes)> = if !cached.is_empty() {
            metrics::counter!("ballast_storage_tail_reads_total").increment(1);
            cached
        } else {
            let rows = self
                .on(&self.readers, "read", CALL_DEADLINE, move |c| {
                    Box::pin(async move {
                        c.query(
                            "SELECT first_seq, data, codec FROM ballast_chunk
                             WHERE part = $1 AND end_seq > $2 ORDER BY end_seq LIMIT $3",
                            &[&part, &from_seq, &READ_CHUNKS],
                        )
                        .await
                    })
                })
                .await?;
            let mut chunks = Vec::with_capacity(rows.len());
            for r in rows {
                let first_seq: i64 = r.get(0);
                let data = decompress(r.get(2), r.get::<_, Vec<u8>>(1))?;
                chunks.push((first_seq, bytes::Bytes::from(data)));
            }
            chunks
        };
        let mut events = Vec::new();
        let mut next = from;
        let mut last_source: Option<Arc<str>> = None;
        'chunks: for (first_seq, data) in chunks {
            for (i, record) in unframe(&data).enumerate() {
                let seq = first_seq + i as i64;
                if seq < from_seq {
                    continue;
                }
                let record = record?;
                let position = base + seq as u64;
                let (source, meta, event) = envelope::decode(&record).map_err(|e| {
                    StoreError::Other(format!("record at position {position}: {e}"))
                })?;
                let source = match &last_source {
                    Some(s) if **s == *source => s.clone(),
                    _ => last_source.insert(Arc::from(source)).clone(),
                };
                let start = event.as_ptr() as usize - record.as_ptr() as usize;
                events.push(StoredEvent {
                    position,
                    source,
                    event: record.slice(start..start + event.len()),
                    ident: envelope::ident_of(&record, meta),
                });
                next = position + 1;
                if events.len() >= max_events {
                    break 'chunks;
                }
            }
        }
        Ok(ReadEvents { events, next })
    }

    async fn ack(&self, consumer: &str, progress: &Progress) -> Result<(), StoreError> {
        let acked = self.ack_once(consumer, progress).await;
        let key = (consumer.to_string(), partition_of(progress.cursor));
        let mut pending = lock(&self.shared.pending);
        match &acked {
            Ok(()) => {
                if pending
                    .get(&key)
                    .is_some_and(|p| p.cursor <= progress.cursor)
                {
                    pending.remove(&key);
                }
            }
            Err(_) => {
                if pending
                    .get(&key)
                    .is_none_or(|p| p.cursor <= progress.cursor)
                {
                    pending.insert(key, progress.clone());
                }
            }
        }
        acked
    }

    async fn lease(&self, consumer: &str, partition: u32) -> Result<super::Lease, StoreError> {
        let leases = &self.shared.leases;
        if !leases.wanted.swap(true, Ordering::AcqRel) {
            leases.wake.notify_one();
        }
        let key = (consumer.to_string(), partition);
        let class = lease_class(consumer);
        loop {
            {
                let _taking = leases.taking.lock().await;
                let session = leases.session.read().await.clone();
                if let Some(s) = session {
                    let share =
                        fair_share(self.shared.partitions, leases.live.load(Ordering::Relaxed));
                    let (mine, already) = {
                        let held = lock(&leases.held);
                        (
                            held.keys().filter(|(c, _)| c == consumer).count(),
                            held.contains_key(&key),
                        )
                    };
                    if mine < share && !already {
                        let tried = tokio::time::timeout(
                            STATEMENT_TIMEOUT,
                            s.client.query_one(
                                "SELECT pg_try_advisory_lock($1::int4, $2::int4)",
                                &[&class, &(partition as i32)],
                            ),
                        )
                        .await;
                        if let Ok(Ok(row)) = tried {
                            if row.get::<_, bool>(0) {
                                let (state, rx) = watch::channel(LeaseState::Held);
                                lock(&leases.held).insert(
                                    key.clone(),
                                    HeldLease {
                                        generation: s.generation,
                                        pid: s.pid,
                                        state,
                                    },
                                );
                                lock(&leases.ever).insert(key.clone());
                                tracing::info!(consumer, partition, "lease taken");
                                return Ok(super::Lease::new(
                                    rx,
                                    Box::new(Held {
                                        shared: self.shared.clone(),
                                        consumer: consumer.to_string(),
                                        partition,
                                        generation: s.generation,
                                    }),
                                ));
                            }
                        }
                    }
                }
            }
            if leases.session.read().await.is_none() {
                // The lease session is being opened (at the first lease asked for, or
                // again after it failed): try as soon as it is there, not a tick later
                // (a start spent its first second with every partition waiting).
                tokio::time::sleep(SESSION_WAIT).await;
                continue;
            }
            // Spread the replicas' attempts a little.
            let jitter = Duration::from_millis(rand::random::<u64>() % 250);
            tokio::time::sleep(LEASE_TICK + jitter).await;
        }
    }

    fn cursor(&self, consumer: &str, partition: u32) -> Option<Position> {
        lock(&self.shared.cursors)
            .get(&(consumer.to_string(), partition))
            .copied()
    }

    fn subscribe(&self, partition: u32) -> watch::Receiver<Position> {
        let i = (partition as usize).min(self.shared.ends.len() - 1);
        self.shared.ends[i].subscribe()
    }

    /// A database that does not answer is unavailable (transient: it comes back, or a
    /// failover finds the new primary), not the fatal "storage failed" of a failed fsync;
    /// a full tablespace is "disk full" until there is room.
    fn refusal(&self) -> Option<super::Refusal> {
        let st = self.status();
        if st.full() {
            Some(super::Refusal::Quota)
        } else if self.shared.disk_full.load(Ordering::Acquire) {
            Some(super::Refusal::DiskFull)
        } else if !st.writable {
            Some(super::Refusal::Unavailable(
                st.failure.unwrap_or_else(|| "the store is closed".into()),
            ))
        } else {
            None
        }
    }

    fn figures_age(&self) -> Option<Duration> {
        Some(lock(&self.shared.polled_at).elapsed())
    }

    fn status(&self) -> StoreStatus {
        let c = &self.shared.counters;
        let failure = lock(&self.shared.failure).clone();
        let closed = lock(&self.writers).is_none();
        // Events stored (ever) in all partitions: the sum of their sequence numbers.
        let end = self
            .shared
            .ends
            .iter()
            .enumerate()
            .map(|(p, e)| e.borrow().saturating_sub(partition_base(p as u32)))
            .sum();
        StoreStatus {
            writable: !closed
                && failure.is_none()
                && !self.shared.disk_full.load(Ordering::Acquire),
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
            start: 0,
            end,
        }
    }

    async fn close(&self) {
        lock(&self.writers).take();
        for w in std::mem::take(&mut *self.writer_tasks.lock().await) {
            let _ = w.await;
        }
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::pgtest::PgCluster;
    use crate::store::Lease;

    /// Chunks worth compressing come back byte for byte; small or incompressible ones
    /// are stored as written; a damaged or unknown chunk is an error, never events.
    #[test]
    fn chunks_are_compressed_when_it_pays_and_read_back_exactly() {
        let records: Vec<u8> = (0..200)
            .flat_map(|i| {
                format!(r#"{{"type":"track","event":"Order Completed","userId":"u{i}","properties":{{"revenue":{i}}}}}"#)
                    .into_bytes()
            })
            .collect();
        let (codec, packed) = compress(records.clone());
        assert_eq!(codec, CODEC_LZ4);
        assert!(
            packed.len() * 3 < records.len(),
            "{} of {}",
            packed.len(),
            records.len()
        );
        assert_eq!(decompress(codec, packed.clone()).unwrap(), records);

        let small = b"{\"a\":1}".to_vec();
        assert_eq!(compress(small.clone()), (CODEC_NONE, small.clone()));
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 56) as u8
            })
            .collect();
        assert_eq!(compress(noise.clone()).0, CODEC_NONE);
        assert_eq!(decompress(CODEC_NONE, noise.clone()).unwrap(), noise);

        let mut damaged = packed;
        damaged.truncate(damaged.len() / 2);
        assert!(decompress(CODEC_LZ4, damaged).is_err());
        assert!(decompress(7, small).is_err());
    }

    /// `n` events, each of user `u{i % users}`, with their meta blocks (as the gateway
    /// writes them).
    fn batch(tag: &str, n: usize, users: usize) -> EventBatch {
        let mut b = EventBatch::new(Arc::from("web"), 0);
        for i in 0..n {
            let user = format!("{}", i % users.max(1));
            b.push_with::<()>(|json, meta| {
                json.extend_from_slice(format!(r#"{{"w":"{tag}","i":{i}}}"#).as_bytes());
                envelope::encode_meta(meta, "u:", &user, &format!("{tag}-{i}"));
                Ok(())
            })
            .unwrap();
        }
        b
    }

    async fn admin(url: &str) -> Client {
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c
    }

    /// Two stores (two replicas) append at once, each request spread over the partitions,
    /// while a third follows every partition from its start, reading whatever is there
    /// each time: it must never step over a position that becomes visible later, so what
    /// it saw is every event exactly once, each partition's positions dense and in order,
    /// and each user's events in one partition in the order they were appended.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_follower_never_skips_what_concurrent_writers_commit_later() {
        let cluster = PgCluster::start();
        cluster.create_db("writers").await;
        let url = cluster.url("writers");
        let a = Arc::new(PgStore::open(&url, u64::MAX, 4).await.unwrap());
        let b = Arc::new(PgStore::open(&url, u64::MAX, 8).await.unwrap());
        let follower = PgStore::open(&url, u64::MAX, 4).await.unwrap();
        assert_eq!(b.partitions(), 4, "fixed at first use");
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
                            .append(batch(&format!("{name}{task}-{k}"), n, 7))
                            .await
                            .unwrap();
                        total += n;
                    }
                    total
                }));
            }
        }
        let mut seen: Vec<Vec<u64>> = vec![Vec::new(); 4];
        let mut from: Vec<u64> = (0..4).map(partition_base).collect();
        // `a` follows too: what it wrote comes from its tail cache, b's chunks in between
        // from the database.
        let mut seen_a: Vec<Vec<u64>> = vec![Vec::new(); 4];
        let mut from_a: Vec<u64> = (0..4).map(partition_base).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut expected = None;
        loop {
            for p in 0..4 {
                let r = follower.read(from[p], 37).await.unwrap();
                for e in &r.events {
                    assert_eq!(partition_of(e.position), p as u32);
                    let (user, _) = e.ident.clone().unwrap();
                    assert_eq!(
                        crate::store::partition_for_key(user.as_bytes(), 4),
                        p as u32,
                        "a user's events are in its partition"
                    );
                    seen[p].push(e.position);
                }
                from[p] = r.next;
                let r = a.read(from_a[p], 37).await.unwrap();
                seen_a[p].extend(r.events.iter().map(|e| e.position));
                from_a[p] = r.next;
            }
            if expected.is_none() && writers.iter().all(|w| w.is_finished()) {
                let mut total = 0;
                for w in writers.drain(..) {
                    total += w.await.unwrap();
                }
                expected = Some(total as u64);
            }
            let got: usize = seen.iter().map(Vec::len).sum();
            let got_a: usize = seen_a.iter().map(Vec::len).sum();
            if let Some(total) = expected {
                if got as u64 >= total && got_a as u64 >= total {
                    assert_eq!(got as u64, total);
                    assert_eq!(got_a as u64, total);
                    break;
                }
            }
            assert!(Instant::now() < deadline, "follower stuck at {from:?}");
        }
        assert_eq!(seen_a, seen, "the writer's own follower saw the same");
        for (p, positions) in seen.iter().enumerate() {
            let base = partition_base(p as u32);
            let want: Vec<u64> = (base..base + positions.len() as u64).collect();
            assert_eq!(
                positions, &want,
                "partition {p}: every position once, in order"
            );
        }
        assert!(
            seen.iter().all(|s| !s.is_empty()),
            "users spread over partitions"
        );
        for s in [&*a, &*b, &follower] {
            s.close().await;
        }
    }

    /// The router's loop starts a read ahead of need and polls it only between
    /// its other awaits. A read started and then left unpolled while the loop saves its
    /// cursor must hold up neither that acknowledgement nor anything else: with both on
    /// one pipelined connection, the connection stopped taking the read's rows (nobody
    /// took them) and so never reached the acknowledgement's answer, until the 30-second
    /// timeout failed both. Two acknowledgements in a row, so that with queries shared
    /// out over the connections in turn one of them would meet the read.
    #[tokio::test]
    async fn a_read_left_unpolled_holds_up_no_acknowledgement() {
        let cluster = PgCluster::start();
        cluster.create_db("unpolled").await;
        let url = cluster.url("unpolled");
        let s = PgStore::open(&url, u64::MAX, 1).await.unwrap();
        // Eight chunks of ~200 KB that LZ4 cannot shrink much: a read's answer is far
        // more than the connection buffers for a query nobody reads.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for c in 0..8 {
            let mut b = EventBatch::new(Arc::from("web"), 0);
            for i in 0..200 {
                let noise: String = (0..1000)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        char::from(b'a' + (x % 26) as u8)
                    })
                    .collect();
                b.push_with::<()>(|json, meta| {
                    json.extend_from_slice(format!(r#"{{"i":{i},"p":"{noise}"}}"#).as_bytes());
                    envelope::encode_meta(meta, "u:", "u", &format!("{c}-{i}"));
                    Ok(())
                })
                .unwrap();
            }
            s.append(b).await.unwrap();
        }
        // Another replica reads and acknowledges (this one would serve the read from
        // what it just wrote, without a query).
        let s2 = s;
        let s = PgStore::open(&url, u64::MAX, 1).await.unwrap();
        s.register_consumer("dest.x", 0).await.unwrap();
        let mut read = Box::pin(s.read(0, 1000));
        let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
        assert!(std::future::Future::poll(read.as_mut(), &mut cx).is_pending());
        // The read's answer arrives meanwhile; nobody polls it.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for cursor in [1, 2] {
            let acked = tokio::time::timeout(
                Duration::from_secs(5),
                s.ack("dest.x", &Progress::at(cursor)),
            )
            .await;
            assert!(
                matches!(acked, Ok(Ok(()))),
                "acknowledgement {cursor} behind an unpolled read: {acked:?}"
            );
        }
        let r = tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("the read came back")
            .unwrap();
        assert_eq!(r.events.len(), 1000);
        s.close().await;
        s2.close().await;
    }

    /// The finished ranges above a cursor survive in the database for the next holder.
    #[tokio::test]
    async fn progress_keeps_the_finished_ranges() {
        let cluster = PgCluster::start();
        cluster.create_db("progress").await;
        let url = cluster.url("progress");
        let s = PgStore::open(&url, u64::MAX, 2).await.unwrap();
        s.append(batch("x", 40, 1)).await.unwrap();
        let p = crate::store::partition_for_key(b"u:0", 2);
        let base = partition_base(p);
        let start = s.register_consumer("dest.x", p).await.unwrap();
        assert_eq!(start, Progress::at(base));
        let progress = Progress {
            cursor: base + 3,
            done: vec![(base + 5, base + 9), (base + 12, base + 13)],
        };
        s.ack("dest.x", &progress).await.unwrap();
        s.close().await;
        let again = PgStore::open(&url, u64::MAX, 2).await.unwrap();
        assert_eq!(
            again.register_consumer("dest.x", p).await.unwrap(),
            progress
        );
        again.close().await;
    }

    /// One holder per (consumer, partition); a lease moves when its holder is gone; a
    /// holder whose session dies is told so, and its acknowledgements no longer count.
    #[tokio::test]
    async fn a_lease_has_one_holder_and_moves_when_it_is_gone() {
        let cluster = PgCluster::start();
        cluster.create_db("leases").await;
        let url = cluster.url("leases");
        let a = PgStore::open(&url, u64::MAX, 1).await.unwrap();
        let b = PgStore::open(&url, u64::MAX, 1).await.unwrap();
        let held = a.lease("dest.hook", 0).await.unwrap();
        // Another consumer's lease is independent.
        let other = b.lease("dest.other", 0).await.unwrap();
        let waiting =
            tokio::time::timeout(Duration::from_millis(2500), b.lease("dest.hook", 0)).await;
        assert!(waiting.is_err(), "a second holder while the first holds it");
        drop(held);
        let moved = tokio::time::timeout(Duration::from_secs(10), b.lease("dest.hook", 0))
            .await
            .expect("the lease moved within 10 s")
            .unwrap();
        // The holder's acknowledgements count.
        b.register_consumer("dest.hook", 0).await.unwrap();
        b.append(batch("x", 3, 1)).await.unwrap();
        b.ack("dest.hook", &Progress::at(2)).await.unwrap();
        assert_eq!(b.cursor("dest.hook", 0), Some(2));
        // The holder's session is killed (as when its replica dies or is cut off).
        admin(&url)
            .await
            .batch_execute(&format!(
                "SELECT pg_terminate_backend({})",
                b.shared.leases.pid.load(Ordering::Relaxed)
            ))
            .await
            .unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), moved.ended())
            .await
            .expect("the holder learns it lost the lease");
        assert_eq!(ended, LeaseState::Lost);
        // Fenced: a process that lost the lease cannot move the cursor any more.
        assert!(b.ack("dest.hook", &Progress::at(3)).await.is_err());
        let cursor: i64 = admin(&url)
            .await
            .query_one(
                "SELECT cursor FROM ballast_cursor WHERE name = 'dest.hook'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(cursor, 2);
        tokio::time::timeout(Duration::from_secs(10), other.ended())
            .await
            .expect("both leases were on the killed session");
        let again = tokio::time::timeout(Duration::from_secs(10), a.lease("dest.hook", 0))
            .await
            .expect("free again once its session is gone");
        assert!(again.is_ok());
        a.close().await;
        b.close().await;
    }

    /// Progress made while the database (and the lease with it) was away is
    /// not thrown away: the acknowledgement that failed is kept, and saved under the
    /// lease when this process holds it again, so the next loop resumes from it and
    /// re-sends only what was in flight.
    #[tokio::test]
    async fn progress_whose_acknowledgement_failed_is_saved_under_the_next_lease() {
        let cluster = PgCluster::start();
        cluster.create_db("kept").await;
        let url = cluster.url("kept");
        let a = PgStore::open(&url, u64::MAX, 1).await.unwrap();
        a.append(batch("x", 50, 3)).await.unwrap();
        let lease = a.lease("dest.hook", 0).await.unwrap();
        assert_eq!(
            a.register_consumer("dest.hook", 0).await.unwrap(),
            Progress::at(0)
        );
        a.ack("dest.hook", &Progress::at(10)).await.unwrap();
        // The lease session dies (as with the primary in a failover).
        admin(&url)
            .await
            .batch_execute(&format!(
                "SELECT pg_terminate_backend({})",
                a.shared.leases.pid.load(Ordering::Relaxed)
            ))
            .await
            .unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), lease.ended())
            .await
            .expect("the holder learns it lost the lease");
        assert_eq!(ended, LeaseState::Lost);
        // Delivered meanwhile: up to 30, and 35..40 above it. Not saved: no lease.
        let delivered = Progress {
            cursor: 30,
            done: vec![(35, 40)],
        };
        assert!(a.ack("dest.hook", &delivered).await.is_err());
        drop(lease);
        let again = tokio::time::timeout(Duration::from_secs(15), a.lease("dest.hook", 0))
            .await
            .expect("the lease again, on a new session")
            .unwrap();
        assert_eq!(
            a.register_consumer("dest.hook", 0).await.unwrap(),
            delivered,
            "the next loop resumes from what was delivered"
        );
        let cursor: i64 = admin(&url)
            .await
            .query_one(
                "SELECT cursor FROM ballast_cursor WHERE name = 'dest.hook'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(cursor, 30, "saved in the database under the new lease");
        drop(again);
        a.close().await;
    }

    /// Holds whatever leases of `consumer` a store is given, giving back what it is asked
    /// to, until `stop`; reports how many it holds.
    fn hold_all(
        store: Arc<PgStore>,
        consumer: &'static str,
        partitions: u32,
        stop: watch::Receiver<bool>,
    ) -> Arc<AtomicU64> {
        let holding = Arc::new(AtomicU64::new(0));
        for p in 0..partitions {
            let store = store.clone();
            let holding = holding.clone();
            let mut stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    let lease: Lease = tokio::select! {
                        l = store.lease(consumer, p) => l.unwrap(),
                        _ = stop.wait_for(|s| *s) => return,
                    };
                    holding.fetch_add(1, Ordering::SeqCst);
                    tokio::select! {
                        _ = lease.ended() => {}
                        _ = stop.wait_for(|s| *s) => {}
                    }
                    holding.fetch_sub(1, Ordering::SeqCst);
                    drop(lease);
                    if *stop.borrow() {
                        return;
                    }
                }
            });
        }
        holding
    }

    async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A replica alone takes every partition; a second one joining gets about half within
    /// seconds; when one goes away the other takes everything again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leases_are_shared_out_among_live_replicas() {
        let cluster = PgCluster::start();
        cluster.create_db("balance").await;
        let url = cluster.url("balance");
        let a = Arc::new(PgStore::open(&url, u64::MAX, 8).await.unwrap());
        let (stop_a, stop_a_rx) = watch::channel(false);
        let held_a = hold_all(a.clone(), "dest.hook", 8, stop_a_rx);
        wait_for("a alone holds all 8", || held_a.load(Ordering::SeqCst) == 8).await;
        let b = Arc::new(PgStore::open(&url, u64::MAX, 8).await.unwrap());
        let (stop_b, stop_b_rx) = watch::channel(false);
        let held_b = hold_all(b.clone(), "dest.hook", 8, stop_b_rx);
        wait_for("4 and 4", || {
            held_a.load(Ordering::SeqCst) == 4 && held_b.load(Ordering::SeqCst) == 4
        })
        .await;
        // a goes away (its leases end with its session).
        let _ = stop_a.send(true);
        a.close().await;
        drop(a);
        wait_for("b takes all 8", || held_b.load(Ordering::SeqCst) == 8).await;
        let _ = stop_b.send(true);
        b.close().await;
    }
}
