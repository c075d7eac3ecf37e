//! The router: reads the event log and drives one delivery loop per configured
//! destination (see `worker.rs`). Per destination: a concurrency limit, per-user order
//! (key: userId, else anonymousId), retries with backoff, dead letters, and a cursor in
//! the log that only moves over events that are finished. Destinations are independent:
//! one that is slow or down never holds back another, nor ingestion.

pub mod retry;
pub mod state;
mod worker;
pub(crate) use worker::strike_key_of;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::store::{Position, Store};
pub use state::{DeadLetter, RouterDb, RouterState};

/// Live counters of one destination.
#[derive(Default)]
pub struct DestinationStats {
    pub delivered: AtomicU64,
    pub aborted: AtomicU64,
    pub retries: AtomicU64,
    pub in_flight: AtomicU64,
    pub buffered: AtomicU64,
    pub retrying_users: AtomicU64,
    pub dead_letters: AtomicU64,
    pub replayed: AtomicU64,
    /// Partitions of the store whose lease this process holds for the destination (and
    /// whose delivery loop it runs).
    pub partitions_held: AtomicU64,
}

/// A snapshot of one destination for `/v1/status` and `/metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct DestinationStatus {
    pub id: String,
    pub kind: &'static str,
    pub enabled: bool,
    /// What the destination has not passed yet: bytes of the log between its cursor and
    /// the durable end (embedded store), or events (PostgreSQL store, all partitions).
    pub backlog_bytes: u64,
    pub buffered_events: u64,
    pub in_flight: u64,
    pub retrying_users: u64,
    pub delivered: u64,
    pub aborted: u64,
    pub retries: u64,
    pub dead_letters: u64,
    /// The cursor in the store's first partition.
    pub cursor: u64,
    /// This process delivers the destination (holds the lease of one of its partitions at
    /// least); with several replicas on PostgreSQL, they share its partitions.
    pub active: bool,
    /// Partitions of the destination this process delivers, of `partitions`.
    pub partitions_held: u64,
    pub partitions: u32,
}

pub struct DestinationHandle {
    pub id: String,
    pub kind: &'static str,
    pub stats: Arc<DestinationStats>,
    replay: Arc<Notify>,
}

pub struct Router {
    pub destinations: Vec<DestinationHandle>,
    pub db: Arc<dyn RouterState>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    store: Arc<dyn Store>,
}

/// What a destination's delivery loop is built from (again, after a panic).
#[derive(Clone)]
struct WorkerParts {
    config: crate::destinations::DestinationConfig,
    sink: Arc<dyn crate::destinations::Destination>,
    store: Arc<dyn Store>,
    db: Arc<dyn RouterState>,
    stats: Arc<DestinationStats>,
    replay: Arc<Notify>,
    journal: Arc<crate::recovery::journal::Journal>,
    alerts: Arc<crate::alerts::Alerts>,
    poison_threshold: u32,
    partition: u32,
}

impl WorkerParts {
    async fn build(&self) -> anyhow::Result<worker::Worker> {
        let p = self.clone();
        worker::Worker::new(
            p.config,
            p.sink,
            p.store,
            p.db,
            p.stats,
            p.replay,
            p.journal,
            p.alerts,
            p.poison_threshold,
            p.partition,
        )
        .await
    }

    /// A panic of the delivery loop counts like a crash of the process for this
    /// destination: every event it had in flight gets a strike (so that an event that
    /// keeps killing the loop is quarantined at `poison_threshold`).
    async fn strike_in_flight(&self) -> anyhow::Result<usize> {
        let partition = self.partition;
        let in_flight: Vec<(String, Position)> = self
            .journal
            .take_open_where(&self.config.id, |p| {
                crate::store::partition_of(p) == partition
            })
            .into_iter()
            .map(|p| (self.config.id.clone(), p))
            .collect();
        let struck = strike(&*self.store, &self.db, &in_flight).await?;
        for ((dest, key), strikes) in &struck {
            tracing::warn!(destination = %dest, event = %key, strikes, threshold = self.poison_threshold, "event was in flight when the delivery loop panicked");
        }
        Ok(struck.len())
    }
}

/// Gives one strike to each (destination, position) that was being delivered when
/// processing died (the process, or one destination's loop); returns each struck
/// (destination, event key) with its strikes now. Strikes are named by messageId, so
/// that a copy of the event sent again (the client got no answer before the crash)
/// shares them; an event that cannot be read is named by its position.
pub(crate) async fn strike(
    store: &dyn Store,
    db: &Arc<dyn RouterState>,
    in_flight: &[(String, Position)],
) -> anyhow::Result<Vec<((String, String), u32)>> {
    let mut struck = Vec::with_capacity(in_flight.len());
    for (dest, pos) in in_flight {
        let key = match store.read(*pos, 1).await {
            Ok(r) => r
                .events
                .first()
                .filter(|e| e.position == *pos)
                .map(strike_key_of),
            Err(_) => None,
        };
        struck.push((dest.clone(), key.unwrap_or_else(|| format!("@{pos}"))));
    }
    let counts = db.add_strikes(&struck).await?;
    Ok(struck.into_iter().zip(counts).collect())
}

/// Runs a destination's delivery loop while this process holds the destination's lease
/// (at once with the embedded store; with PostgreSQL, one replica at a time, another
/// taking over within seconds when it dies). If the loop panics, strikes what it had in
/// flight and starts it again from the destination's cursor (the process, ingestion and
/// the other destinations go on); if the lease is lost, stops delivering and waits for
/// it again.
async fn supervise(
    parts: WorkerParts,
    routing: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
) {
    let id = parts.config.id.clone();
    let partition = parts.partition;
    let consumer = consumer_name(&id);
    let mut restarts: u32 = 0;
    loop {
        // The lease, then a worker built from the cursor as it is once the lease is ours.
        let acquired = async {
            let lease = parts.store.lease(&consumer, partition).await?;
            let worker = parts.build().await?;
            Ok::<_, anyhow::Error>((lease, worker))
        };
        let acquired = {
            let mut stop_rx = stop.clone();
            tokio::select! {
                r = acquired => r,
                _ = stop_rx.wait_for(|s| *s) => return,
            }
        };
        let (lease, worker) = match acquired {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(destination = %id, error = %e, "starting the delivery loop failed; trying again");
                if sleep_or_stop(std::time::Duration::from_secs(1), &stop).await {
                    return;
                }
                continue;
            }
        };
        parts.stats.partitions_held.fetch_add(1, Ordering::Relaxed);
        // This run ends on the global stop or when the lease is lost or asked back.
        let (run_stop_tx, run_stop_rx) = watch::channel(false);
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let mut stop = stop.clone();
            let lost = lost.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => {}
                    _ = lease.ended() => lost.store(true, Ordering::Release),
                }
                let _ = run_stop_tx.send(true);
                // The lease is held until the loop has stopped (this task is aborted
                // then), so that no other replica starts while this one still delivers.
                std::future::pending::<()>().await;
                drop(lease);
            })
        };
        let started = std::time::Instant::now();
        let outcome = tokio::spawn(worker.run(routing.clone(), run_stop_rx)).await;
        watcher.abort();
        parts.stats.partitions_held.fetch_sub(1, Ordering::Relaxed);
        match outcome {
            Ok(()) if lost.load(Ordering::Acquire) => {
                tracing::info!(destination = %id, partition, "delivery of the partition stopped: its lease was lost or given back");
            }
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                if started.elapsed() > std::time::Duration::from_secs(60) {
                    restarts = 0;
                }
                restarts += 1;
                metrics::counter!("ballast_destination_loop_panics_total", "destination" => id.clone())
                    .increment(1);
                tracing::error!(destination = %id, restarts, "the delivery loop panicked; restarting it from the destination's cursor");
                if let Err(e) = parts.strike_in_flight().await {
                    tracing::error!(destination = %id, error = %e, "recording strikes failed");
                }
                // Back off when it keeps panicking (at most 30 s), so that a loop that
                // dies at once does not spin.
                let wait = std::time::Duration::from_millis(100 << restarts.min(8))
                    .min(std::time::Duration::from_secs(30));
                if sleep_or_stop(wait, &stop).await {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// Sleeps; true if `stop` was raised meanwhile.
async fn sleep_or_stop(d: std::time::Duration, stop: &watch::Receiver<bool>) -> bool {
    let mut stop = stop.clone();
    if *stop.borrow() {
        return true;
    }
    let stopped = tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    stopped || *stop.borrow()
}

/// Consumer name of a destination in the store.
pub fn consumer_name(destination: &str) -> String {
    format!("dest.{destination}")
}

impl Router {
    /// Starts one delivery loop per enabled destination. `stop` ends them (they finish
    /// what is in flight, then save their cursor).
    pub async fn start(
        config: &Config,
        store: Arc<dyn Store>,
        db: Arc<dyn RouterState>,
        journal: Arc<crate::recovery::journal::Journal>,
        alerts: Arc<crate::alerts::Alerts>,
        routing: watch::Receiver<bool>,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Router> {
        let mut destinations = Vec::new();
        let mut tasks = Vec::new();
        let partitions = store.partitions().max(1);
        // User transformations run in worker processes of this same binary.
        let transformations = crate::transform::Transformations::start(
            &config.transformations,
            &config.transform,
            &config.destinations,
        )
        .await?;
        for d in config.destinations.iter().filter(|d| d.enabled) {
            // Every partition's cursor exists before anything is delivered, so that no
            // replica deletes what this destination has not read.
            for p in 0..partitions {
                store.register_consumer(&consumer_name(&d.id), p).await?;
            }
            let sink = transformations.wrap(d, crate::destinations::build(d)?)?;
            let stats = Arc::new(DestinationStats::default());
            let dead = db.count(&d.id).await?;
            stats.dead_letters.store(dead, Ordering::Relaxed);
            let replay = Arc::new(Notify::new());
            let parts = WorkerParts {
                config: d.clone(),
                sink,
                store: store.clone(),
                db: db.clone(),
                stats: stats.clone(),
                replay: replay.clone(),
                journal: journal.clone(),
                alerts: alerts.clone(),
                poison_threshold: config.recovery.poison_threshold,
                partition: 0,
            };
            for p in 0..partitions {
                tasks.push(tokio::spawn(supervise(
                    WorkerParts {
                        partition: p,
                        ..parts.clone()
                    },
                    routing.clone(),
                    stop.clone(),
                )));
            }
            destinations.push(DestinationHandle {
                id: d.id.clone(),
                kind: d.kind.name(),
                stats,
                replay,
            });
        }
        Ok(Router {
            destinations,
            db,
            tasks: std::sync::Mutex::new(tasks),
            store,
        })
    }

    pub fn status(&self) -> Vec<DestinationStatus> {
        let partitions = self.store.partitions();
        self.destinations
            .iter()
            .map(|d| {
                let s = &d.stats;
                let consumer = consumer_name(&d.id);
                let cursor = self.store.cursor(&consumer, 0).unwrap_or_default();
                let held = s.partitions_held.load(Ordering::Relaxed);
                DestinationStatus {
                    id: d.id.clone(),
                    kind: d.kind,
                    enabled: true,
                    backlog_bytes: self.store.backlog(&consumer),
                    buffered_events: s.buffered.load(Ordering::Relaxed),
                    in_flight: s.in_flight.load(Ordering::Relaxed),
                    retrying_users: s.retrying_users.load(Ordering::Relaxed),
                    delivered: s.delivered.load(Ordering::Relaxed),
                    aborted: s.aborted.load(Ordering::Relaxed),
                    retries: s.retries.load(Ordering::Relaxed),
                    dead_letters: s.dead_letters.load(Ordering::Relaxed),
                    cursor,
                    active: held > 0,
                    partitions_held: held,
                    partitions,
                }
            })
            .collect()
    }

    /// Moves a destination's dead letters to its replay queue and wakes its loop.
    pub async fn replay(
        &self,
        destination: &str,
        since: Option<std::time::SystemTime>,
    ) -> anyhow::Result<usize> {
        let Some(d) = self.destinations.iter().find(|d| d.id == destination) else {
            anyhow::bail!("no enabled destination {destination:?}");
        };
        let n = self.db.replay(destination, since).await?;
        d.stats.dead_letters.fetch_sub(n as u64, Ordering::Relaxed);
        d.replay.notify_one();
        Ok(n)
    }

    pub fn has(&self, destination: &str) -> bool {
        self.destinations.iter().any(|d| d.id == destination)
    }

    /// Waits for every loop to finish (after `stop`).
    pub async fn join(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
    }
}
