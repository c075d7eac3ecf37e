//! One destination's delivery loop.
//!
//! Events of the destination's sources are read from the log in order and queued per
//! user. A user's queue delivers one unit at a time (its head event, or its first few
//! events in a batch), so the user's order holds; while its head waits for a retry, only
//! that user waits. The cursor saved in the store is the position of the oldest event
//! not yet finished (delivered or dead-lettered), so a restart re-delivers at most what
//! was unfinished (at least once).
//!
//! Memory: at most `MAX_LOADED` event bodies are kept, at most `PER_USER_LOADED` per user,
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

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};

/// Maps on the delivery hot path: foldhash (fast, seeded per process) instead of SipHash.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::value::RawValue;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use super::state::{from_ms, to_ms, DeadLetter, RetryInfo, RouterState};
use super::{consumer_name, retry, DestinationStats};
use crate::alerts::{Action, Alerts, Severity};
use crate::destinations::DestinationConfig;
use crate::destinations::{Destination, Event, Outcome};
use crate::event::identify;
use crate::recovery::journal::Journal;
use crate::store::{Position, Progress, Store, StoredEvent};

const MAX_LOADED: usize = 20_000;
const PER_USER_LOADED: usize = 256;
/// Queue entries (with or without bodies) beyond which reading pauses.
const MAX_ENTRIES: usize = 1_000_000;
/// Log reads per turn of the loop, so that delivery keeps its share while ingest runs.
const FILL_READS_PER_TURN: usize = 4;
const READ_BATCH: usize = 1_000;
const ACK_EVERY: Duration = Duration::from_millis(200);
/// Finished ranges an acknowledgement records above the cursor at most (beyond them a
/// takeover re-sends; the cost of an acknowledgement stays bounded whatever the backlog).
const MAX_DONE_RANGES: usize = 4096;
const SAVE_RETRY_EVERY: Duration = Duration::from_secs(1);
const REPLAY_CHECK_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Log(Position),
    Replay(u64),
}

struct Pending {
    origin: Origin,
    source: Arc<str>,
    /// None while not loaded (see MAX_LOADED).
    event: Option<Event>,
    attempts: u32,
    first_attempt: Option<SystemTime>,
    /// Struck out as a poison event: quarantined instead of delivered.
    poison: bool,
    /// Names the event's strikes: its messageId (so a resent copy shares them).
    key: Arc<str>,
}

/// One delivery in flight: (user, events of that user) units, their log positions (as
/// journaled) and their strike keys.
type InFlight = (Vec<(Arc<str>, usize)>, Vec<Position>, Vec<Arc<str>>);

#[derive(Default)]
struct UserQueue {
    q: VecDeque<Pending>,
    busy: bool,
    waiting: bool,
    /// Entries of `q` whose body is in memory.
    loaded: usize,
    /// A batch holding this user's events together with other users' failed: send this
    /// user's events on their own next time, so that a failure is judged per user.
    solo: bool,
}

pub(super) struct Worker {
    config: DestinationConfig,
    consumer: String,
    /// The store partition this loop delivers (one loop per partition it holds).
    partition: u32,
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
    sink: Arc<dyn Destination>,
    store: Arc<dyn Store>,
    db: Arc<dyn RouterState>,
    stats: Arc<DestinationStats>,
    replay: Arc<Notify>,
    sources: HashSet<String>,
    read_pos: Position,
    acked: Position,
    unfinished: BTreeSet<Position>,
    users: FastMap<Arc<str>, UserQueue>,
    ready: VecDeque<Arc<str>>,
    timers: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
    loaded: usize,
    /// Users waiting for a retry (`UserQueue::waiting`), for the gauge.
    waiting_users: u64,
    /// Deliveries in flight: the users whose heads they carry, how many events each, and
    /// their log positions (as written to the crash journal).
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
}

/// An open "destination is aborting events" alert: it resolves once the destination has
/// delivered again and aborted nothing for `alerts.aborts_clear_after`.
struct AbortAlert {
    /// When this episode's first trigger was raised (ms): names its alerts.
    since_ms: u64,
    last_abort: Instant,
    delivered_since: bool,
}

/// The condition key of a destination's "aborting events" alert.
fn abort_alert_key(destination: &str) -> String {
    format!("aborts:{destination}")
}

/// When the gateway accepted an event: its `receivedAt`, which enrichment writes as the
/// event's last key (so the last occurrence is ours, whatever the client sent).
fn received_at(json: &[u8]) -> Option<SystemTime> {
    const KEY: &[u8] = br#""receivedAt":""#;
    let at = json.windows(KEY.len()).rposition(|w| w == KEY)? + KEY.len();
    let len = json[at..].iter().position(|b| *b == b'"')?;
    let text = std::str::from_utf8(&json[at..at + len]).ok()?;
    humantime::parse_rfc3339_weak(text).ok()
}

/// What names an event's strikes: its messageId, else its position.
pub(crate) fn strike_key(message_id: &str, position: Position) -> String {
    if message_id.is_empty() {
        format!("@{position}")
    } else {
        message_id.to_string()
    }
}

/// The strike key of a stored event.
pub(crate) fn strike_key_of(e: &StoredEvent) -> String {
    match &e.ident {
        Some((_, mid)) => strike_key(mid, e.position),
        None => strike_key(&identify(&e.event).1, e.position),
    }
}

fn to_event(e: StoredEvent) -> (Arc<str>, Event) {
    // Recorded at ingest when the record has it; else found in the JSON.
    let (user, message_id) = match e.ident {
        Some(ident) => ident,
        None => identify(&e.event),
    };
    let event = Event {
        json: e.event,
        message_id,
        source: e.source,
    };
    (user, event)
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
        Ok(Worker {
            sources: config.sources.iter().cloned().collect(),
            consumer,
            partition,
            concurrency,
            skip: progress.done.iter().copied().collect(),
            takeover_mark,
            last_progress: progress,
            replays: false,
            published: (0, 0, 0),
            redelivered,
            config,
            sink,
            store,
            db,
            stats,
            replay,
            read_pos: start,
            acked: start,
            unfinished: BTreeSet::new(),
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
        let replay = self.replay.clone();
        tracing::info!(destination = %self.config.id, partition = self.partition, cursor = self.read_pos, "delivery started");
        loop {
            if *stop.borrow() {
                break;
            }
            let routing_on = *routing.borrow();
            // Read more only while there is little ready to deliver: reading ahead of
            // delivery only costs CPU that ingestion needs.
            let hungry = self.ready.len() < 2 * self.concurrency;
            if hungry {
                if let Err(e) = self.fill(end).await {
                    tracing::error!(destination = %self.config.id, error = %e, "reading the log failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
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
            let sleep_until = next_timer
                .unwrap_or_else(|| Instant::now() + ACK_EVERY)
                .min(Instant::now() + ACK_EVERY);
            tokio::select! {
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
        }
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

    /// Reads new events of this destination's sources into the user queues (a few reads
    /// per turn; pauses while the body budget is used up).
    async fn fill(&mut self, end: Position) -> Result<(), crate::store::StoreError> {
        let mut reads = 0;
        while self.read_pos < end
            && reads < FILL_READS_PER_TURN
            && self.loaded < MAX_LOADED
            && self.unfinished.len() < MAX_ENTRIES
        {
            reads += 1;
            let batch = self.store.read(self.read_pos, READ_BATCH).await?;
            if batch.events.is_empty() && batch.next <= self.read_pos {
                break;
            }
            let read = batch.events.len();
            // The queue entries given a body from this read: (user, index in its queue).
            let mut kept: Vec<(Arc<str>, usize)> = Vec::new();
            for e in batch.events {
                if !self.sources.contains(&*e.source) {
                    continue;
                }
                let position = e.position;
                if position < self.takeover_mark {
                    // An earlier holder read this far: skip what it finished.
                    while self.skip.front().is_some_and(|r| r.1 <= position) {
                        self.skip.pop_front();
                    }
                    if self.skip.front().is_some_and(|r| r.0 <= position) {
                        continue;
                    }
                    self.redelivered.increment(1);
                }
                let (user, event) = to_event(e);
                // Only while every entry of the user's queue has its body: bodies stay the
                // front of the queue (see `load_head`).
                let keep = self.loaded < MAX_LOADED
                    && self.users.get(&user).is_none_or(|u| {
                        u.loaded == u.q.len() && u.loaded < PER_USER_LOADED && !u.waiting
                    });
                if keep {
                    let at = self.users.get(&user).map_or(0, |u| u.q.len());
                    kept.push((user.clone(), at));
                }
                let known = if self.known_retry.is_empty() {
                    None
                } else {
                    self.known_retry.get(&position).copied()
                };
                let key: Arc<str> = if event.message_id.is_empty() {
                    Arc::from(strike_key("", position))
                } else {
                    event.message_id.clone()
                };
                let poison = !self.strikes.is_empty()
                    && self.strikes.get(&*key).copied().unwrap_or(0) >= self.poison_threshold;
                self.unfinished.insert(position);
                self.enqueue(
                    user,
                    Pending {
                        origin: Origin::Log(position),
                        source: event.source.clone(),
                        event: keep.then_some(event),
                        attempts: known.map(|k| k.attempts).unwrap_or(0),
                        first_attempt: known.map(|k| from_ms(k.first_attempt_ms)),
                        poison,
                        key,
                    },
                );
            }
            self.read_pos = batch.next;
            // Bodies are slices of the chunk read: a few kept out of many would pin the
            // whole chunk, so those are copied out.
            if kept.len() * 4 < read {
                for (user, at) in kept {
                    if let Some(Some(e)) = self
                        .users
                        .get_mut(&user)
                        .and_then(|u| u.q.get_mut(at))
                        .map(|p| p.event.as_mut())
                    {
                        e.json = bytes::Bytes::copy_from_slice(&e.json);
                    }
                }
            }
        }
        Ok(())
    }

    fn enqueue(&mut self, user: Arc<str>, p: Pending) {
        let uq = self.users.entry(user.clone()).or_default();
        if p.event.is_some() {
            uq.loaded += 1;
            self.loaded += 1;
        }
        let was_empty = uq.q.is_empty();
        uq.q.push_back(p);
        if was_empty && !uq.busy && !uq.waiting {
            self.ready.push_back(user);
        }
    }

    async fn load_replays(&mut self) {
        let letters = match self.db.replay_queue(&self.config.id).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(destination = %self.config.id, error = %e, "reading the replay queue failed");
                return;
            }
        };
        for l in letters {
            if !self.replaying.insert(l.id) {
                continue;
            }
            let json = l.event.get().as_bytes();
            let (user, message_id) = identify(json);
            let source: Arc<str> = Arc::from(l.source.as_str());
            self.enqueue(
                user,
                Pending {
                    origin: Origin::Replay(l.id),
                    source: source.clone(),
                    event: Some(Event {
                        json: bytes::Bytes::copy_from_slice(json),
                        message_id,
                        source,
                    }),
                    attempts: 0,
                    first_attempt: None,
                    poison: false,
                    key: Arc::from(format!("replay:{}", l.id)),
                },
            );
        }
    }

    /// Makes sure the bodies of the user's first `want` queue entries are in memory, with
    /// one read of the log at most: from the first entry without a body, filling every
    /// entry of this user found in what was read (up to `PER_USER_LOADED`, or `want`).
    /// Returns how many entries at the front of the queue have their body (≤ `want`).
    async fn load_head(&mut self, user: &Arc<str>, want: usize) -> usize {
        let Some(uq) = self.users.get(user) else {
            return 0;
        };
        let want = want.min(uq.q.len());
        let Some(first) = uq.q.iter().take(want).position(|p| p.event.is_none()) else {
            return want;
        };
        let Some(Origin::Log(pos)) = uq.q.get(first).map(|p| p.origin) else {
            return first;
        };
        let read = match self.store.read(pos, READ_BATCH).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(destination = %self.config.id, error = %e, "re-reading events failed");
                return first;
            }
        };
        let Some(uq) = self.users.get_mut(user) else {
            return 0;
        };
        let cap = PER_USER_LOADED.max(want);
        // Queue entries and the read are both in log order: walk them side by side.
        let mut found = read.events.iter().peekable();
        let mut attached: Vec<usize> = Vec::new();
        for (i, p) in uq.q.iter_mut().enumerate().skip(first) {
            if p.event.is_some() {
                continue; // a replayed dead letter: always in memory
            }
            if uq.loaded >= cap && !attached.is_empty() {
                break;
            }
            let Origin::Log(pos) = p.origin else { continue };
            while found.next_if(|e| e.position < pos).is_some() {}
            match found.next_if(|e| e.position == pos) {
                Some(e) => {
                    p.event = Some(to_event(e.clone()).1);
                    uq.loaded += 1;
                    attached.push(i);
                }
                None => break,
            }
        }
        // A few events of a large read: copy them out rather than pin the whole chunk.
        if attached.len() * 4 < read.events.len() {
            for &i in &attached {
                if let Some(e) = uq.q.get_mut(i).and_then(|p| p.event.as_mut()) {
                    e.json = bytes::Bytes::copy_from_slice(&e.json);
                }
            }
        }
        self.loaded += attached.len();
        uq.q.iter()
            .take(want)
            .take_while(|p| p.event.is_some())
            .count()
    }

    /// True when the entry was struck out as poison (at the threshold of strikes).
    fn is_poison(&self, p: &Pending) -> bool {
        p.poison
            || (!self.strikes.is_empty()
                && self.strikes.get(&*p.key).copied().unwrap_or(0) >= self.poison_threshold)
    }

    /// True when the user's head has strikes (it was in flight at a crash or a panic).
    fn head_is_suspect(&self, user: &Arc<str>) -> bool {
        self.users
            .get(user)
            .and_then(|u| u.q.front())
            .is_some_and(|p| {
                !self.strikes.is_empty() && self.strikes.get(&*p.key).copied().unwrap_or(0) > 0
            })
    }

    /// Starts deliveries while there is capacity and a user ready.
    ///
    /// Suspects (events with strikes) are delivered alone, with nothing else of this
    /// destination in flight, so that if they crash the process again the journal names
    /// them and nothing else.
    async fn dispatch(&mut self) {
        let max = self.config.batch_size;
        'requests: while self.isolating.is_none() && self.tasks.len() < self.concurrency {
            let mut units: Vec<(Arc<str>, usize)> = Vec::new();
            let mut events: Vec<Event> = Vec::new();
            let mut isolate = false;
            while events.len() < max {
                let Some(user) = self.ready.pop_front() else {
                    break;
                };
                let (take, solo) = match self.users.get(&user) {
                    Some(uq) if !uq.busy && !uq.waiting && !uq.q.is_empty() => {
                        ((max - events.len()).min(uq.q.len()), uq.solo)
                    }
                    _ => continue,
                };
                if self
                    .users
                    .get(&user)
                    .and_then(|u| u.q.front())
                    .is_some_and(|p| self.is_poison(p))
                {
                    self.quarantine(&user).await;
                    continue;
                }
                let suspect = self.head_is_suspect(&user);
                if (solo || suspect) && !units.is_empty() {
                    // It goes first, alone, in the next request.
                    self.ready.push_front(user);
                    break;
                }
                if suspect && !self.tasks.is_empty() {
                    // Let what is in flight finish first.
                    self.ready.push_front(user);
                    break 'requests;
                }
                let take = if suspect { 1 } else { take };
                // One read of the log at most, whatever the length of the queue.
                let loaded = self.load_head(&user, take).await;
                let mut n = 0;
                if let Some(uq) = self.users.get(&user) {
                    for (i, p) in uq.q.iter().take(loaded).enumerate() {
                        let struck = p.poison
                            || (!self.strikes.is_empty()
                                && self.strikes.get(&*p.key).copied().unwrap_or(0) > 0);
                        if i > 0 && struck {
                            break;
                        }
                        let Some(e) = &p.event else { break };
                        events.push(e.clone());
                        n += 1;
                    }
                }
                if n == 0 {
                    // Could not load its head now; try again on the next round.
                    self.ready.push_back(user);
                    break;
                }
                if let Some(uq) = self.users.get_mut(&user) {
                    uq.busy = true;
                    let now = SystemTime::now();
                    for p in uq.q.iter_mut().take(n) {
                        p.first_attempt.get_or_insert(now);
                    }
                }
                units.push((user, n));
                if solo || suspect {
                    isolate = suspect;
                    break;
                }
            }
            if units.is_empty() {
                break;
            }
            let mut positions = Vec::new();
            let mut keys = Vec::new();
            for (user, n) in &units {
                if let Some(u) = self.users.get(user) {
                    for p in u.q.iter().take(*n) {
                        keys.push(p.key.clone());
                        if let Origin::Log(pos) = p.origin {
                            positions.push(pos);
                        }
                    }
                }
            }
            self.journal.begin(&self.config.id, &positions);
            #[cfg(feature = "failpoints")]
            if let Some(id) = fail::eval("router::loop_panic", |arg| arg.unwrap_or_default()) {
                if events.iter().any(|e| *e.message_id == id) {
                    panic!("failpoint router::loop_panic for {id}");
                }
            }
            let sink = self.sink.clone();
            let request_seconds = self.request_seconds.clone();
            let handle = self.tasks.spawn(async move {
                #[cfg(feature = "failpoints")]
                if let Some(id) = fail::eval("router::deliver", |arg| arg.unwrap_or_default()) {
                    if events.iter().any(|e| *e.message_id == id) {
                        tracing::error!(message_id = %id, "failpoint router::deliver: aborting the process");
                        std::process::abort();
                    }
                }
                #[cfg(feature = "failpoints")]
                if let Some(id) = fail::eval("router::deliver_panic", |arg| arg.unwrap_or_default()) {
                    if events.iter().any(|e| *e.message_id == id) {
                        panic!("failpoint router::deliver_panic for {id}");
                    }
                }
                let started = Instant::now();
                let outcome = sink.deliver(&events).await;
                request_seconds.record(started.elapsed().as_secs_f64());
                outcome
            });
            if isolate {
                self.isolating = Some(handle.id());
            }
            self.inflight.insert(handle.id(), (units, positions, keys));
        }
    }

    async fn complete(&mut self, id: tokio::task::Id, outcome: Outcome) {
        let Some((units, positions, _)) = self.inflight.remove(&id) else {
            return;
        };
        self.journal.end(&self.config.id, &positions);
        if self.isolating == Some(id) {
            self.isolating = None;
        }
        if units.len() > 1 && outcome != Outcome::Delivered {
            // Several users in one failed request: nobody is blamed yet; each user's
            // events go again on their own, without an attempt counted.
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            for (user, _) in units {
                if let Some(uq) = self.users.get_mut(&user) {
                    uq.busy = false;
                    uq.solo = true;
                }
                self.make_ready(&user);
            }
            return;
        }
        match outcome {
            Outcome::Delivered => {
                if let Some(a) = &mut self.abort_alert {
                    a.delivered_since = true;
                }
                let first = units
                    .first()
                    .and_then(|(user, _)| self.users.get(user))
                    .and_then(|u| u.q.front())
                    .and_then(|p| p.event.as_ref())
                    .and_then(|e| received_at(&e.json));
                if let Some(lag) = first.and_then(|t| SystemTime::now().duration_since(t).ok()) {
                    self.lag_seconds.record(lag.as_secs_f64());
                }
                for (user, n) in units {
                    if let Some(uq) = self.users.get_mut(&user) {
                        uq.solo = false;
                    }
                    let (count, replays) = self.finish(&user, n);
                    self.stats
                        .delivered
                        .fetch_add(count as u64, Ordering::Relaxed);
                    self.replays_done(replays).await;
                }
            }
            Outcome::Abort { status, reason } => {
                for (user, n) in units {
                    self.dead_letter(&user, n, status, &reason, "aborted").await;
                }
            }
            Outcome::Retry {
                status,
                reason,
                retry_after,
            } => {
                let now = SystemTime::now();
                for (user, n) in units {
                    let exhausted = {
                        let Some(uq) = self.users.get_mut(&user) else {
                            continue;
                        };
                        let mut exhausted = false;
                        for p in uq.q.iter_mut().take(n) {
                            p.attempts += 1;
                            let first = *p.first_attempt.get_or_insert(now);
                            if retry::exhausted(&self.config.retry, p.attempts, first, now) {
                                exhausted = true;
                            }
                            if let Origin::Log(pos) = p.origin {
                                let info = RetryInfo {
                                    attempts: p.attempts,
                                    first_attempt_ms: to_ms(first),
                                };
                                self.retry_changes.push((pos, Some(info)));
                                self.known_retry.insert(pos, info);
                            }
                        }
                        exhausted
                    };
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    if exhausted {
                        // Only the head exhausted its attempts; dead-letter the head, the
                        // rest of the unit goes back to the queue.
                        let reason = format!("retries exhausted: {reason}");
                        self.dead_letter(&user, 1, status, &reason, "aborted").await;
                        if let Some(uq) = self.users.get_mut(&user) {
                            uq.busy = false;
                        }
                        self.make_ready(&user);
                        continue;
                    }
                    let attempts = self
                        .users
                        .get(&user)
                        .and_then(|u| u.q.front())
                        .map(|p| p.attempts)
                        .unwrap_or(1);
                    let delay = retry::backoff(&self.config.retry, attempts, retry_after);
                    tracing::debug!(destination = %self.config.id, ?status, %reason, ?delay, "delivery failed; will retry");
                    if let Some(uq) = self.users.get_mut(&user) {
                        uq.busy = false;
                        if !uq.waiting {
                            self.waiting_users += 1;
                        }
                        uq.waiting = true;
                        // While it waits, only its head keeps its body in memory. Log
                        // entries with a body are the front of the queue: stop at the
                        // first without.
                        let mut freed = 0;
                        for p in uq.q.iter_mut().skip(1) {
                            if matches!(p.origin, Origin::Log(_)) {
                                if p.event.take().is_none() {
                                    break;
                                }
                                freed += 1;
                            }
                        }
                        uq.loaded -= freed;
                        self.loaded -= freed;
                    }
                    self.timers.push(Reverse((Instant::now() + delay, user)));
                }
            }
        }
    }

    /// Removes the first `n` events of the user's queue (they are done); returns how many
    /// it removed and the replay ids among them.
    fn finish(&mut self, user: &Arc<str>, n: usize) -> (usize, Vec<u64>) {
        let mut replays = Vec::new();
        let mut count = 0;
        if let Some(uq) = self.users.get_mut(user) {
            for _ in 0..n {
                let Some(p) = uq.q.pop_front() else { break };
                count += 1;
                if p.event.is_some() {
                    self.loaded = self.loaded.saturating_sub(1);
                    uq.loaded = uq.loaded.saturating_sub(1);
                }
                match p.origin {
                    Origin::Log(pos) => {
                        self.unfinished.remove(&pos);
                        if self.known_retry.remove(&pos).is_some() {
                            self.retry_changes.push((pos, None));
                        }
                        // A quarantined event keeps its strikes, so that a copy of it sent
                        // again (same messageId) is quarantined without new crashes.
                        if !p.poison && self.strikes.remove(&*p.key).is_some() {
                            self.strike_clears.push(p.key.to_string());
                        }
                    }
                    Origin::Replay(id) => {
                        self.replaying.remove(&id);
                        replays.push(id);
                    }
                }
            }
            uq.busy = false;
        }
        self.make_ready(user);
        (count, replays)
    }

    fn make_ready(&mut self, user: &Arc<str>) {
        match self.users.get(user) {
            Some(uq) if uq.q.is_empty() && !uq.busy => {
                self.users.remove(user);
            }
            Some(uq) if !uq.busy && !uq.waiting => self.ready.push_back(user.clone()),
            _ => {}
        }
    }

    async fn replays_done(&mut self, ids: Vec<u64>) {
        if ids.is_empty() {
            return;
        }
        self.stats
            .replayed
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        if let Err(e) = self.db.replay_done(&self.config.id, &ids).await {
            tracing::error!(destination = %self.config.id, error = %e, "recording replayed events failed");
        }
    }

    /// Stores the first `n` events of the user's queue as dead letters (durably), then
    /// finishes them.
    async fn dead_letter(
        &mut self,
        user: &Arc<str>,
        n: usize,
        status: Option<u16>,
        reason: &str,
        kind: &str,
    ) {
        let now = to_ms(SystemTime::now());
        let mut letters = Vec::new();
        if let Some(uq) = self.users.get(user) {
            for p in uq.q.iter().take(n) {
                let Some(e) = &p.event else { continue };
                let text = String::from_utf8_lossy(&e.json).into_owned();
                let event = RawValue::from_string(text)
                    .unwrap_or_else(|_| RawValue::from_string("null".into()).unwrap_or_default());
                letters.push(DeadLetter {
                    id: 0,
                    destination: self.config.id.clone(),
                    position: match p.origin {
                        Origin::Log(pos) => Some(pos),
                        Origin::Replay(_) => None,
                    },
                    source: p.source.to_string(),
                    event,
                    attempts: p.attempts.max(1),
                    first_attempt_ms: p.first_attempt.map(to_ms).unwrap_or(now),
                    dead_at_ms: now,
                    status,
                    reason: reason.to_string(),
                    kind: kind.to_string(),
                });
            }
        }
        let count = letters.len() as u64;
        loop {
            match self.db.add_dead_letters(letters.clone()).await {
                Ok(_) => break,
                Err(e) => {
                    // Never finish an event that is not durably dead-lettered.
                    tracing::error!(destination = %self.config.id, error = %e, "storing dead letters failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        tracing::warn!(destination = %self.config.id, events = count, ?status, reason, "events moved to the dead letters");
        if kind == "aborted" && count > 0 {
            let now_ms = to_ms(SystemTime::now());
            let episode = self.abort_alert.get_or_insert(AbortAlert {
                since_ms: now_ms,
                last_abort: Instant::now(),
                delivered_since: false,
            });
            episode.last_abort = Instant::now();
            episode.delivered_since = false;
            // Raised again each hour of the episode (an operator may have closed it).
            let hour = now_ms / 3_600_000;
            let since = episode.since_ms;
            let key = abort_alert_key(&self.config.id);
            let alert = self.alerts.alert(
                key.clone(),
                Action::Trigger,
                Severity::Warning,
                format!("destination {} is aborting events ({reason})", self.config.id),
                serde_json::json!({ "destination": self.config.id, "status": status, "reason": reason }),
            );
            let alerts = self.alerts.clone();
            let _ = tokio::task::spawn_blocking(move || {
                alerts.raise(&format!("{key}:{since}:{hour}"), alert)
            })
            .await;
        }
        self.stats.aborted.fetch_add(count, Ordering::Relaxed);
        self.stats.dead_letters.fetch_add(count, Ordering::Relaxed);
        metrics::counter!("ballast_destination_aborted_total", "destination" => self.config.id.clone()).increment(count);
        let (_, replays) = self.finish(user, n);
        self.replays_done(replays).await;
    }

    fn wake_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((t, _))) = self.timers.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((_, user))) = self.timers.pop() else {
                break;
            };
            if let Some(uq) = self.users.get_mut(&user) {
                if uq.waiting {
                    self.waiting_users = self.waiting_users.saturating_sub(1);
                }
                uq.waiting = false;
            }
            self.make_ready(&user);
        }
    }

    /// How far this loop got: the oldest unfinished event, and the ranges finished above
    /// it (what lies between unfinished events, up to what was read, and what an earlier
    /// holder finished beyond that).
    fn progress(&self) -> Progress {
        let mut unfinished = self.unfinished.iter().copied();
        let Some(cursor) = unfinished.next() else {
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
        for u in unfinished {
            if done.len() >= MAX_DONE_RANGES {
                complete = false;
                break;
            }
            if u > prev + 1 {
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
            }
            Err(e) => {
                tracing::error!(destination = %self.config.id, error = %e, "saving the cursor failed")
            }
        }
    }

    /// A worker panicked while holding these events: one strike each; at the threshold
    /// they are poison (quarantined when they reach the head again).
    async fn strike(&mut self, id: tokio::task::Id) {
        let Some((_, _, keys)) = self.inflight.get(&id) else {
            return;
        };
        let keys = keys.clone();
        let events: Vec<(String, String)> = keys
            .iter()
            .map(|k| (self.config.id.clone(), k.to_string()))
            .collect();
        let counts = match self.db.add_strikes(&events).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(destination = %self.config.id, error = %e, "recording strikes failed");
                return;
            }
        };
        // At the threshold an event is poison: judged when it reaches the head
        // (`is_poison`), not marked over every queue here.
        for (key, n) in keys.into_iter().zip(counts) {
            self.strikes.insert(key.to_string(), n);
        }
    }

    /// Moves the user's head (a poison event) to the dead letters and raises the alert.
    async fn quarantine(&mut self, user: &Arc<str>) {
        if self.load_head(user, 1).await == 0 {
            self.ready.push_back(user.clone());
            return;
        }
        // Marked, so that finishing it keeps its strikes (a copy sent again is
        // quarantined without new crashes).
        if let Some(p) = self.users.get_mut(user).and_then(|u| u.q.front_mut()) {
            p.poison = true;
        }
        let (pos, message_id, strikes) = match self.users.get(user).and_then(|u| u.q.front()) {
            Some(p) => {
                let pos = match p.origin {
                    Origin::Log(pos) => pos,
                    Origin::Replay(_) => 0,
                };
                let mid = p
                    .event
                    .as_ref()
                    .map(|e| e.message_id.to_string())
                    .unwrap_or_default();
                (pos, mid, self.strikes.get(&*p.key).copied().unwrap_or(0))
            }
            None => return,
        };
        let reason = format!("poison: in flight at {strikes} crashes");
        let alert = self.alerts.alert(
            format!("poison:{}:{pos}", self.config.id),
            Action::Trigger,
            Severity::Error,
            format!(
                "ballast quarantined event {message_id} of destination {}: it was being processed at {strikes} crashes",
                self.config.id
            ),
            serde_json::json!({ "destination": self.config.id, "position": pos, "messageId": message_id, "strikes": strikes }),
        );
        let alerts = self.alerts.clone();
        let key = format!("poison:{}:{pos}", self.config.id);
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || alerts.raise(&key, alert)).await {
            tracing::error!(error = %e, "raising the poison alert failed");
        }
        self.dead_letter(user, 1, None, &reason, "poison").await;
    }

    async fn save_retry_state(&mut self) {
        if !self.strike_clears.is_empty() {
            let clears = std::mem::take(&mut self.strike_clears);
            if let Err(e) = self.db.clear_strikes(&self.config.id, &clears).await {
                tracing::warn!(destination = %self.config.id, error = %e, "clearing strikes failed");
            }
        }
        if self.retry_changes.is_empty() {
            return;
        }
        let changes = std::mem::take(&mut self.retry_changes);
        if let Err(e) = self.db.save_retry(&self.config.id, &changes).await {
            tracing::warn!(destination = %self.config.id, error = %e, "saving retry state failed");
        }
    }

    /// Resolves the "aborting events" alert once the destination delivered again and
    /// aborted nothing for `alerts.aborts_clear_after`.
    async fn resolve_abort_alert(&mut self) {
        let clear = self.alerts.aborts_clear_after();
        let Some(a) = &self.abort_alert else {
            return;
        };
        if !a.delivered_since || a.last_abort.elapsed() < clear {
            return;
        }
        let key = abort_alert_key(&self.config.id);
        let idempotency = format!("{key}:{}:resolved", a.since_ms);
        let alert = self.alerts.alert(
            key,
            Action::Resolve,
            Severity::Info,
            format!(
                "destination {} delivers again: nothing aborted for {}",
                self.config.id,
                humantime::format_duration(clear)
            ),
            serde_json::json!({ "destination": self.config.id }),
        );
        let alerts = self.alerts.clone();
        match tokio::task::spawn_blocking(move || alerts.raise(&idempotency, alert)).await {
            Ok(Ok(_)) => self.abort_alert = None,
            Ok(Err(e)) => {
                tracing::warn!(destination = %self.config.id, error = %e, "recording the alert failed; will retry")
            }
            Err(_) => {}
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
            .flat_map(|(u, _, _)| u.iter())
            .map(|(_, n)| *n as u64)
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

#[cfg(test)]
mod tests {
    #[test]
    fn received_at_is_the_last_one_written() {
        let t = super::received_at(
            br#"{"receivedAt":"2001-01-01T00:00:00Z","x":1,"receivedAt":"2026-11-29T08:16:40.123Z"}"#,
        )
        .unwrap();
        assert_eq!(
            humantime::format_rfc3339_millis(t).to_string(),
            "2026-11-29T08:16:40.123Z"
        );
        assert!(super::received_at(br#"{"x":1}"#).is_none());
    }
}
