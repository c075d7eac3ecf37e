//! One destination's delivery loop.
//!
//! Events of the destination's sources are read from the log in order and queued per
//! user. A user's queue delivers one unit at a time (its head event, or its first few
//! events in a batch), so the user's order holds; while its head waits for a retry, only
//! that user waits. The cursor saved in the store is the position of the oldest event
//! not yet finished (delivered or dead-lettered), so a restart re-delivers at most what
//! was unfinished (at least once).
//!
//! Memory: at most `MAX_LOADED` event bodies are kept (or enough for a few loads in flight
//! of a destination with large batches: `max_loaded`), at most a quarter of that per user,
//! and a user waiting for a retry keeps only its head's; other queue entries keep only
//! their position and are re-read from the log (in bulk) when they come near the head.
//! Reading stops while the body budget is used up: deliveries free it.
//!
//! Cost: what a turn of the loop does is bounded by the batch size, the concurrency and
//! `READ_BATCH`, never by the length of a queue: a user's log entries with a body are the
//! front of its queue (an entry read while its user has entries without one gets none), so
//! reloading reads the log once from the first entry without a body and fills the entries
//! after it; the retrying-users gauge is a counter, not a walk; poison is judged at the
//! head, not marked over every queue.
//!
//! Files: this one the loop (`run`), its state and the acknowledgements; `queue.rs` the
//! per-user queues; `read.rs` reading the log into them; `unfinished.rs` the positions
//! read and not finished (the cursor and the ranges done above it); `deliver.rs` starting
//! deliveries and judging their outcomes; `dead_letters.rs`; `poison.rs` strikes and
//! quarantine; `abort_alert.rs` the "aborting events" alert.

mod abort_alert;
mod dead_letters;
mod deliver;
mod except;
mod flush;
mod poison;
mod queue;
mod read;
mod unfinished;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use super::state::{RetryInfo, RouterState};
use super::{consumer_name, DestinationStats};
use crate::alerts::Alerts;
use crate::destinations::DestinationConfig;
use crate::destinations::{Destination, Outcome};
use crate::recovery::journal::Journal;
use crate::store::{Position, Progress, ReadEvents, Store, StoreError};
use abort_alert::{abort_alert_key, AbortAlert};
use queue::UserQueue;
use unfinished::Unfinished;

pub(crate) use poison::strike_key_of;

/// Maps on the delivery hot path: foldhash (fast, seeded per process) instead of SipHash.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

const MAX_LOADED: usize = 20_000;
/// Loads in flight a destination's body budget is sized for (with its batch size).
const LOADS_IN_BUDGET: usize = 4;
/// The share of the body budget one user keeps at most (`per_user_loaded`), so that one
/// user's backlog (a slow one) leaves the rest to the others: a quarter. Users who share
/// a backlog do not reach it: at a fixed 256 a hundred users did, and ten did at 2,048;
/// every entry of theirs read after that went without its body and was read again.
const USER_SHARE: usize = 4;
/// Queue entries (with or without bodies) beyond which reading pauses.
const MAX_ENTRIES: usize = 1_000_000;
const READ_BATCH: usize = 1_000;
const ACK_EVERY: Duration = Duration::from_millis(200);
/// Finished ranges an acknowledgement records above the cursor at most (beyond them a
/// takeover re-sends; the cost of an acknowledgement stays bounded whatever the backlog).
const MAX_DONE_RANGES: usize = 4096;
const SAVE_RETRY_EVERY: Duration = Duration::from_secs(1);
const REPLAY_CHECK_EVERY: Duration = Duration::from_secs(5);

/// A read of the log, polled by the loop.
type ReadFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<ReadEvents, StoreError>> + Send>>;

/// A user's share of a delivery: its first `count` queue entries.
struct Unit {
    user: Arc<str>,
    count: usize,
}

/// One delivery in flight.
struct InFlight {
    /// The users whose heads it carries.
    units: Vec<Unit>,
    /// Their log positions, as written to the crash journal.
    begun: crate::recovery::journal::Begun,
}

pub(super) struct Worker {
    config: DestinationConfig,
    consumer: String,
    /// The store partition this loop delivers (one loop per partition it holds).
    partition: u32,
    /// Saving the cursor failed last time: logged once per run of failures (the store
    /// counts each and the server alerts on it), not every 200 ms.
    ack_failing: bool,
    /// Deliveries in flight at most: the destination's concurrency shared out over its
    /// partitions.
    concurrency: usize,
    /// Ranges an earlier holder finished above the cursor, not read past yet: skipped.
    skip: VecDeque<(Position, Position)>,
    /// Below this, an event read that is not skipped may have been sent by an earlier
    /// holder (counted as a re-delivery).
    takeover_mark: Position,
    last_progress: Progress,
    /// This loop delivers the destination's replayed dead letters (partition 0's).
    replays: bool,
    /// What this loop last added to the destination's shared gauges.
    published: (u64, u64, u64),
    redelivered: metrics::Counter,
    /// Events read from the log (new ones and bodies read again): over what is
    /// delivered, what reading costs.
    read_events: metrics::Counter,
    sink: Arc<dyn Destination>,
    store: Arc<dyn Store>,
    db: Arc<dyn RouterState>,
    stats: Arc<DestinationStats>,
    replay: Arc<Notify>,
    sources: FastSet<String>,
    read_pos: Position,
    acked: Position,
    unfinished: Unfinished,
    users: FastMap<Arc<str>, UserQueue>,
    ready: VecDeque<Arc<str>>,
    timers: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
    loaded: usize,
    /// Users waiting for a retry (`UserState::Waiting`), for the gauge.
    waiting_users: u64,
    /// Deliveries in flight, by task.
    inflight: FastMap<tokio::task::Id, InFlight>,
    journal: Arc<Journal>,
    alerts: Arc<Alerts>,
    strikes: HashMap<String, u32>,
    strike_clears: Vec<String>,
    poison_threshold: u32,
    /// A suspect (an event with strikes) is being delivered alone: nothing else starts
    /// until it finishes, so that a crash now names it and only it.
    isolating: Option<tokio::task::Id>,
    tasks: JoinSet<Outcome>,
    known_retry: HashMap<Position, RetryInfo>,
    retry_changes: Vec<(Position, Option<RetryInfo>)>,
    replaying: FastSet<u64>,
    /// The open "destination is aborting events" alert, if any.
    abort_alert: Option<AbortAlert>,
    /// How long each delivery request takes, whatever its outcome.
    request_seconds: metrics::Histogram,
    /// From acceptance (`receivedAt`) to delivery, of the first event of each delivered
    /// request (one parse-free look per request, not per event).
    lag_seconds: metrics::Histogram,
    /// Waiting for fuller batches, for a destination with a `flush_interval`.
    filling: Option<flush::Filling>,
    /// The read of the log in progress (see `read.rs`).
    reading: Option<ReadFuture>,
    /// Event bodies kept in memory at most: `MAX_LOADED`, or for a destination with large
    /// batches (the warehouse: 10,000) what a few loads in flight and the next one need.
    max_loaded: usize,
    /// Bodies one user keeps at most: `max_loaded / USER_SHARE`.
    per_user_loaded: usize,
    /// Log entries queued without a body (their user past its share of the budget, or
    /// waiting for a retry), by position: whose they are. `refill` gives them bodies in
    /// log order, many users' in one read.
    bodiless: BTreeMap<Position, Arc<str>>,
    /// Where the next refill reads from (at least): refills move forward through the log,
    /// so the entries of a user they had to pass (at its cap, waiting) are never read
    /// again for nothing; such a user's head is loaded on its own (`load_head`).
    refill_from: Position,
    /// How far through the log one event goes, as the last read of many saw it (0:
    /// unknown); see `read.rs`, `head_read_pays`.
    span_per_event: u64,
    /// The next cohort number (see `queue.rs`, `UserQueue::cohort`).
    next_cohort: u64,
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn new(
        config: DestinationConfig,
        sink: Arc<dyn Destination>,
        store: Arc<dyn Store>,
        db: Arc<dyn RouterState>,
        stats: Arc<DestinationStats>,
        replay: Arc<Notify>,
        journal: Arc<Journal>,
        alerts: Arc<Alerts>,
        poison_threshold: u32,
        partition: u32,
    ) -> anyhow::Result<Worker> {
        let consumer = consumer_name(&config.id);
        let progress = store.register_consumer(&consumer, partition).await?;
        let start = progress.cursor;
        let takeover_mark = progress.done.last().map_or(start, |r| r.1);
        let partitions = store.partitions().max(1) as usize;
        let concurrency = config.concurrency.div_ceil(partitions).max(1);
        let known_retry = db.load_retry(&config.id).await?;
        let strikes = db.load_strikes(&config.id).await?;
        // An episode an earlier run left open: it must stay quiet for a whole period of
        // this run before it resolves.
        let abort_alert = alerts
            .open_since(&abort_alert_key(&config.id))?
            .map(|since_ms| AbortAlert {
                since_ms,
                last_abort: Instant::now(),
                delivered_since: false,
            });
        let request_seconds = metrics::histogram!("ballast_destination_request_seconds", "destination" => config.id.clone());
        let lag_seconds = metrics::histogram!("ballast_destination_lag_seconds", "destination" => config.id.clone());
        let redelivered = metrics::counter!("ballast_destination_redelivered_total", "destination" => config.id.clone());
        let read_events = metrics::counter!("ballast_destination_read_events_total", "destination" => config.id.clone());
        let max_loaded = MAX_LOADED.max(config.batch_size * (concurrency.min(LOADS_IN_BUDGET) + 1));
        Ok(Worker {
            filling: flush::Filling::new(config.kind.settings().flush_interval()),
            sources: config.sources.iter().cloned().collect(),
            consumer,
            partition,
            concurrency,
            skip: progress.done.iter().copied().collect(),
            takeover_mark,
            last_progress: progress,
            ack_failing: false,
            replays: false,
            published: (0, 0, 0),
            redelivered,
            read_events,
            config,
            sink,
            store,
            db,
            stats,
            replay,
            read_pos: start,
            acked: start,
            unfinished: Unfinished::default(),
            users: FastMap::default(),
            ready: VecDeque::new(),
            timers: BinaryHeap::new(),
            loaded: 0,
            waiting_users: 0,
            inflight: FastMap::default(),
            tasks: JoinSet::new(),
            known_retry,
            retry_changes: Vec::new(),
            replaying: FastSet::default(),
            abort_alert,
            request_seconds,
            lag_seconds,
            journal,
            alerts,
            strikes,
            strike_clears: Vec::new(),
            poison_threshold,
            isolating: None,
            reading: None,
            max_loaded,
            per_user_loaded: max_loaded / USER_SHARE,
            bodiless: BTreeMap::new(),
            refill_from: start,
            span_per_event: 0,
            next_cohort: 0,
        })
    }

    pub(super) async fn run(
        mut self,
        mut routing: watch::Receiver<bool>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut durable = self.store.subscribe(self.partition);
        let mut end = *durable.borrow_and_update();
        let mut last_ack = Instant::now();
        let mut last_retry_save = Instant::now();
        // Replayed dead letters are delivered by the loop of partition 0: one loop in the
        // whole cluster, as its lease has one holder.
        self.replays = self.partition == 0;
        let mut load_replays = self.replays;
        let mut last_replay_check = Instant::now();
        // After a failed read of the log, the next waits until then.
        let mut read_again_at: Option<Instant> = None;
        let replay = self.replay.clone();
        tracing::info!(destination = %self.config.id, partition = self.partition, cursor = self.read_pos, "delivery started");
        loop {
            if *stop.borrow() {
                break;
            }
            let routing_on = *routing.borrow();
            // Read more only while there is little ready to deliver: reading ahead of
            // delivery only costs CPU that ingestion needs.
            if read_again_at.is_some_and(|t| Instant::now() >= t) {
                read_again_at = None;
            }
            if self.reading.is_none()
                && read_again_at.is_none()
                && self.hungry()
                && self.may_read(self.read_pos, end)
            {
                self.start_read(self.read_pos);
            }
            // Another replica may have asked for a replay (shared state): look again now
            // and then.
            if self.replays && last_replay_check.elapsed() >= REPLAY_CHECK_EVERY {
                load_replays = true;
            }
            if load_replays {
                load_replays = false;
                last_replay_check = Instant::now();
                self.load_replays().await;
            }
            if routing_on {
                #[cfg(feature = "failpoints")]
                if fail::eval("router::dispatch", |_| ()).is_some() {
                    tracing::error!("failpoint router::dispatch: aborting the process");
                    std::process::abort();
                }
                self.dispatch().await;
            }
            let periodic = last_ack.elapsed() >= ACK_EVERY;
            if periodic {
                self.ack().await;
                self.resolve_abort_alert().await;
                last_ack = Instant::now();
            }
            // Every turn (counters only), so that status never reports as idle work
            // already read.
            self.publish_stats();
            if last_retry_save.elapsed() >= SAVE_RETRY_EVERY {
                self.save_retry_state().await;
                last_retry_save = Instant::now();
            }
            let next_timer = self.timers.peek().map(|Reverse((t, _))| *t);
            let flush = self.filling.as_ref().and_then(|f| f.deadline());
            let sleep_until = next_timer
                .into_iter()
                .chain(flush)
                .chain(read_again_at)
                .fold(Instant::now() + ACK_EVERY, Instant::min);
            // The read in progress is awaited from a local (the branch futures borrow it,
            // the handlers then use `self`), and put back unless it came back.
            let mut reading = self.reading.take();
            tokio::select! {
                r = async {
                    match reading.as_mut() {
                        Some(read) => read.await,
                        None => std::future::pending().await,
                    }
                }, if reading.is_some() => {
                    reading = None;
                    match r {
                        Ok(batch) => {
                            read_again_at = None;
                            // Start the next read before queueing this one's events, so
                            // the two overlap (the budget is checked against the queues as
                            // they are: at most one read's worth over).
                            let next = batch.next;
                            if !batch.events.is_empty() && self.hungry() && self.may_read(next, end) {
                                self.start_read(next);
                            }
                            self.take_read(batch);
                        }
                        Err(e) => {
                            tracing::error!(destination = %self.config.id, error = %e, "reading the log failed; retrying");
                            read_again_at = Some(Instant::now() + Duration::from_secs(1));
                        }
                    }
                }
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.handle_done(done).await;
                    // Take every other delivery that finished meanwhile in this turn too.
                    while let Some(done) = self.tasks.try_join_next_with_id() {
                        self.handle_done(done).await;
                    }
                }
                r = durable.changed() => {
                    if r.is_ok() {
                        end = *durable.borrow_and_update();
                    } else {
                        tokio::time::sleep(ACK_EVERY).await;
                    }
                }
                _ = tokio::time::sleep_until(sleep_until.into()) => self.wake_timers(),
                _ = replay.notified(), if self.replays => load_replays = true,
                _ = routing.changed() => {}
                _ = stop.changed() => {}
            }
            if reading.is_some() {
                self.reading = reading;
            }
        }
        // A read still out is dropped (its blocking part finishes on its own).
        self.reading = None;
        // Stop: let what is in flight finish, then save the cursor.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.tasks.is_empty() {
            match tokio::time::timeout_at(deadline.into(), self.tasks.join_next_with_id()).await {
                Ok(Some(Ok((id, outcome)))) => self.complete(id, outcome).await,
                Ok(Some(Err(e))) => {
                    let outcome = Outcome::Retry {
                        status: None,
                        reason: "stopped".into(),
                        retry_after: None,
                    };
                    self.complete(e.id(), outcome).await;
                }
                Ok(None) => break,
                Err(_) => {
                    self.tasks.abort_all();
                    break;
                }
            }
        }
        self.ack().await;
        self.save_retry_state().await;
        // This loop's share of the gauges goes with it.
        self.unfinished.clear();
        self.bodiless.clear();
        self.replaying.clear();
        self.inflight.clear();
        self.users.clear();
        self.waiting_users = 0;
        self.publish_stats();
        tracing::info!(destination = %self.config.id, partition = self.partition, cursor = self.acked, "delivery stopped");
    }

    async fn handle_done(
        &mut self,
        done: Result<(tokio::task::Id, Outcome), tokio::task::JoinError>,
    ) {
        match done {
            Ok((id, outcome)) => self.complete(id, outcome).await,
            Err(e) => {
                let id = e.id();
                let reason = if e.is_panic() {
                    "destination panicked"
                } else {
                    "delivery task cancelled"
                };
                tracing::error!(destination = %self.config.id, "{reason}");
                if e.is_panic() {
                    self.strike(id).await;
                }
                self.complete(
                    id,
                    Outcome::Retry {
                        status: None,
                        reason: reason.into(),
                        retry_after: None,
                    },
                )
                .await;
            }
        }
    }

    /// Is there little ready to deliver, so that reading more is worth it? Few users
    /// ready, or fewer than half the body budget in memory: with many users a ready user
    /// often has one event, so a count of users alone let the queues run dry while a read
    /// was on its way. Reading further ahead would only queue entries without bodies,
    /// which cost a second read of the log when they come near delivery.
    fn hungry(&self) -> bool {
        self.ready.len() < 2 * self.concurrency
            || self.loaded < self.max_loaded / 2
            || self.filling.as_ref().is_some_and(|f| f.waiting())
    }

    /// How far this loop got: the oldest unfinished event, and the ranges finished above
    /// it (what lies between unfinished events, up to what was read, and what an earlier
    /// holder finished beyond that).
    fn progress(&self) -> Progress {
        let mut unfinished = self.unfinished.iter_with_previous();
        let Some((cursor, _)) = unfinished.next() else {
            let mut done: Vec<_> = self
                .skip
                .iter()
                .copied()
                .filter(|r| r.1 > self.read_pos)
                .collect();
            if let Some(first) = done.first_mut() {
                first.0 = first.0.max(self.read_pos);
            }
            return Progress {
                cursor: self.read_pos,
                done,
            };
        };
        let mut done = Vec::new();
        let mut prev = cursor;
        let mut complete = true;
        for (u, before) in unfinished {
            if done.len() >= MAX_DONE_RANGES {
                complete = false;
                break;
            }
            // Nothing lies between two unfinished records that follow each other in the
            // log (with byte positions, the rest of `prev`'s own record would be a range).
            if u > prev + 1 && before != Some(prev) {
                done.push((prev + 1, u));
            }
            prev = u;
        }
        if complete {
            if self.read_pos > prev + 1 {
                done.push((prev + 1, self.read_pos));
            }
            for &(a, b) in &self.skip {
                if b > self.read_pos && done.len() < MAX_DONE_RANGES {
                    done.push((a.max(self.read_pos), b));
                }
            }
        }
        Progress { cursor, done }
    }

    async fn ack(&mut self) {
        let progress = self.progress();
        if progress == self.last_progress || progress.cursor < self.acked {
            return;
        }
        match self.store.ack(&self.consumer, &progress).await {
            Ok(()) => {
                self.acked = progress.cursor;
                self.last_progress = progress;
                if std::mem::take(&mut self.ack_failing) {
                    tracing::info!(destination = %self.config.id, "the cursor is saved again");
                }
            }
            Err(e) if self.ack_failing => {
                tracing::debug!(destination = %self.config.id, error = %e, "saving the cursor failed again")
            }
            Err(e) => {
                self.ack_failing = true;
                tracing::error!(destination = %self.config.id, error = %e, "saving the cursor failed; retrying every 200 ms")
            }
        }
    }

    /// Adds this loop's change since it last published to the destination's gauges
    /// (several loops, one per partition held, share them).
    fn publish_stats(&mut self) {
        let s = &self.stats;
        let (buffered, in_flight, retrying) = self.published;
        let retrying_now = self.waiting_users;
        let buffered_now = self.unfinished.len() as u64 + self.replaying.len() as u64;
        let in_flight_now = self
            .inflight
            .values()
            .flat_map(|f| f.units.iter())
            .map(|u| u.count as u64)
            .sum();
        let shift = |gauge: &std::sync::atomic::AtomicU64, was: u64, now: u64| {
            if now >= was {
                gauge.fetch_add(now - was, Ordering::Relaxed);
            } else {
                gauge.fetch_sub(was - now, Ordering::Relaxed);
            }
        };
        shift(&s.buffered, buffered, buffered_now);
        shift(&s.in_flight, in_flight, in_flight_now);
        shift(&s.retrying_users, retrying, retrying_now);
        self.published = (buffered_now, in_flight_now, retrying_now);
    }
}
