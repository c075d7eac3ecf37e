//! Reading the log into the queues: new events of the destination's sources (within the
//! body budget, read ahead while the loop delivers), the bodies of a queue's head when it comes near delivery (one read of the
//! log at most), and replayed dead letters.

use std::sync::Arc;

use bytestring::ByteString;

use super::queue::{Origin, Pending, UserState};
use super::{ReadFuture, Worker, MAX_ENTRIES, READ_BATCH};
use crate::destinations::Event;
use crate::event::identify;
use crate::router::state::from_ms;
use crate::store::{Position, ReadEvents, StoredEvent};

/// A stored event's user (its ordering key), source and body.
pub(super) fn to_event(e: StoredEvent) -> (ByteString, Arc<str>, Event) {
    // Recorded at ingest when the record has it; else found in the JSON.
    let (user, message_id) = match e.ident {
        Some(ident) => ident,
        None => identify(&e.event),
    };
    let event = Event {
        json: e.event,
        message_id,
    };
    (user, e.source, event)
}

/// The body of a stored event read again (for an entry queued without it).
pub(super) fn body_of(e: &StoredEvent) -> Event {
    Event {
        json: e.event.clone(),
        message_id: match &e.ident {
            Some((_, message_id)) => message_id.clone(),
            None => identify(&e.event).1,
        },
    }
}

impl Worker {
    /// The user's name as the queues key it: the key already there when the user has a
    /// queue (no allocation for each event read), else a new one.
    pub(super) fn user_key(&self, name: &str) -> Arc<str> {
        match self.users.get_key_value(name) {
            Some((key, _)) => key.clone(),
            None => Arc::from(name),
        }
    }

    /// May the loop read the log from `from` now: something new there, room in the body
    /// budget, under the cap on queue entries, and not far ahead of the bodies.
    pub(super) fn may_read(&self, from: Position, end: Position) -> bool {
        from < end
            && self.loaded < self.max_loaded
            && self.unfinished.len() < MAX_ENTRIES
            && !self.ahead_of_bodies()
    }

    /// Has the tail read run ahead of the bodies: more than one read's worth of entries
    /// queued without a body while no user waits for a retry? Those entries are read
    /// again for their bodies, a few of one user's per read, so reading on would only
    /// make more of them; while they are loaded (refills, heads) and delivered, the
    /// others' bodies free the budget they need. A user at its share of the budget (one
    /// user with most of a backlog) made them: its later entries go without a body to
    /// keep its order. While a user waits for a retry, its entries go without a body so
    /// that the others go on: reading does not pause for them.
    pub(super) fn ahead_of_bodies(&self) -> bool {
        self.waiting_users == 0 && self.bodiless.len() > READ_BATCH
    }

    /// Bodies are slices of the chunk they were read in: a few kept out of a large read
    /// would pin the whole chunk, so those (user, index in its queue) are copied out.
    fn copy_out_if_few(&mut self, attached: &[(Arc<str>, usize)], read: usize) {
        if attached.len() * 4 >= read {
            return;
        }
        for (user, i) in attached {
            if let Some(p) = self.users.get_mut(user).and_then(|u| u.q.get_mut(*i)) {
                p.copy_out();
            }
        }
    }

    /// Starts reading the log from `from` ahead of need: the loop polls the read beside
    /// its other work (the embedded store reads on a blocking thread meanwhile) while it
    /// dispatches and judges outcomes, and [`Worker::take_read`] queues the events when
    /// the read is back. Not a task of its own: a spawned task waited for a worker thread
    /// to start it, and then the loop waited for its wake-up.
    pub(super) fn start_read(&mut self, from: Position) {
        let store = self.store.clone();
        let mut read: ReadFuture = Box::pin(async move { store.read(from, READ_BATCH).await });
        // Futures are lazy: polled once now, the store hands the read to its blocking
        // thread at once, so it overlaps this turn's queueing and dispatching instead of
        // starting at the loop's next wait. The loop's own poll later registers its waker.
        let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
        if let std::task::Poll::Ready(r) = read.as_mut().poll(&mut cx) {
            read = Box::pin(std::future::ready(r));
        }
        self.reading = Some(read);
    }

    /// Queues the events of a read that came back (those of this destination's sources),
    /// and moves the read position past it.
    pub(super) fn take_read(&mut self, batch: ReadEvents) {
        self.note_span(&batch);
        self.read_events.increment(batch.events.len() as u64);
        {
            let read = batch.events.len();
            // The queue entries given a body from this read: (user, index in its queue).
            let mut kept: Vec<(Arc<str>, usize)> = Vec::new();
            // Where the record before this one starts (whatever its source): no finished
            // range lies between two unfinished records that follow each other.
            let mut previous: Option<Position> = None;
            for e in batch.events {
                let before = previous.replace(e.position);
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
                let (name, source, event) = to_event(e);
                // Only while every entry of the user's queue has its body: bodies stay the
                // front of the queue (see `load_head`). One lookup of the user for its key
                // (the queue's own: no allocation per event), its body and where the entry
                // goes. Not judged against the body budget: the read was started under it (at
                // most one read over). An entry left without a body for the budget's sake
                // left every later entry of its user without one, and the tail read, still
                // under the budget as deliveries freed it, queued the rest of a backlog of
                // a hundred users as positions that every delivery then read again.
                let (user, keep, at) = match self.users.get_key_value(&*name) {
                    Some((user, u)) => (
                        user.clone(),
                        u.loaded == u.q.len()
                            && u.loaded < self.per_user_loaded
                            && u.state != UserState::Waiting,
                        u.q.len(),
                    ),
                    None => (Arc::from(&*name), true, 0),
                };
                if keep {
                    kept.push((user.clone(), at));
                }
                let known = if self.known_retry.is_empty() {
                    None
                } else {
                    self.known_retry.get(&position).copied()
                };
                let mut entry = Pending {
                    origin: Origin::Log(position),
                    source,
                    own_key: Pending::key_for(&event, position, keep),
                    event: keep.then_some(event),
                    attempts: known.map(|k| k.attempts).unwrap_or(0),
                    first_attempt: known.map(|k| from_ms(k.first_attempt_ms)),
                    poison: false,
                };
                entry.poison = !self.strikes.is_empty()
                    && self.strikes.get(entry.key()).copied().unwrap_or(0) >= self.poison_threshold;
                self.unfinished.insert_after(position, before);
                if !keep {
                    self.bodiless.insert(position, user.clone());
                }
                self.enqueue(user, entry);
            }
            self.read_pos = self.read_pos.max(batch.next);
            if read > 0 {
                let oldest = self.unfinished.first();
                if let Some(f) = &mut self.filling {
                    f.note_read(batch.next, oldest);
                }
            }
            self.copy_out_if_few(&kept, read);
        }
    }

    /// Learns how far through the log one event goes (positions are byte offsets in the
    /// embedded log, numbers in PostgreSQL's), from a read of many.
    fn note_span(&mut self, read: &ReadEvents) {
        if let Some(first) = read.events.first() {
            if read.events.len() >= 16 && read.next > first.position {
                self.span_per_event = (read.next - first.position) / read.events.len() as u64;
            }
        }
    }

    /// Whether one read of the log for the user's first `want` entries pays: its head has
    /// no body (it must be read to be sent), or the read would give bodies to at least a
    /// quarter of what it reads. With thousands of users whose queues outgrew the body
    /// budget, a user's next entries lie far apart in the log: one read of `READ_BATCH`
    /// events for the three of theirs cost more than loading them, so the user sends the
    /// entries that have their body, and refills (many users' at once, in log order)
    /// bring the rest. One hot user's entries lie close together: they are read.
    pub(super) fn head_read_pays(&self, user: &str, want: usize) -> bool {
        const PAYS: usize = READ_BATCH / 4;
        let Some(uq) = self.users.get(user) else {
            return true;
        };
        // A head without a body must be read.
        if uq.q.front().is_none_or(|p| p.event.is_none()) {
            return true;
        }
        let mut rest = uq.q.iter().take(want).skip_while(|p| p.event.is_some());
        let start = match rest.next().map(|p| p.origin) {
            Some(Origin::Log(pos)) => pos,
            // Every entry wanted has its body (nothing is read), or a replayed one.
            _ => return true,
        };
        if self.span_per_event == 0 {
            return true;
        }
        let end = start.saturating_add(self.span_per_event.saturating_mul(READ_BATCH as u64));
        1 + rest
            .take(PAYS)
            .take_while(|p| matches!(p.origin, Origin::Log(pos) if pos < end))
            .count()
            >= PAYS
    }

    /// Makes sure the bodies of the user's first `want` queue entries are in memory, with
    /// one read of the log at most: from the first entry without a body, filling every
    /// entry of this user found in what was read (up to `per_user_loaded`, or `want`).
    /// Returns how many entries at the front of the queue have their body (≤ `want`).
    pub(super) async fn load_head(&mut self, user: &Arc<str>, want: usize) -> usize {
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
        self.note_span(&read);
        self.read_events.increment(read.events.len() as u64);
        let Some(uq) = self.users.get_mut(user) else {
            return 0;
        };
        let cap = self.per_user_loaded.max(want);
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
                    p.event = Some(body_of(e));
                    uq.loaded += 1;
                    attached.push(i);
                    self.bodiless.remove(&pos);
                }
                None => break,
            }
        }
        // A few events of a large read: copy them out rather than pin the whole chunk.
        if attached.len() * 4 < read.events.len() {
            for &i in &attached {
                if let Some(p) = uq.q.get_mut(i) {
                    p.copy_out();
                }
            }
        }
        self.loaded += attached.len();
        uq.q.iter()
            .take(want)
            .take_while(|p| p.event.is_some())
            .count()
    }

    /// Gives bodies to queued entries that have none, many users' in one read: reads the
    /// log from the oldest such entry at or after `refill_from` and attaches a body to
    /// every entry without one found in the read, in log order, while the body budget
    /// lasts (a user at its own cap or waiting for a retry is passed over; bodies stay the
    /// front of each queue). Without it each user's head cost one read of `READ_BATCH`
    /// events of which, with thousands of users, one was theirs. Returns how many entries
    /// got a body.
    pub(super) async fn refill(&mut self) -> usize {
        if self.loaded >= self.max_loaded {
            return 0;
        }
        let Some(from) = self
            .bodiless
            .range(self.refill_from..)
            .next()
            .map(|(p, _)| *p)
        else {
            return 0;
        };
        let read = match self.store.read(from, READ_BATCH).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(destination = %self.config.id, error = %e, "re-reading events failed");
                return 0;
            }
        };
        self.note_span(&read);
        self.read_events.increment(read.events.len() as u64);
        let mut next = read.next.max(from + 1);
        let mut passed: super::FastSet<Arc<str>> = super::FastSet::default();
        let mut attached: Vec<(Arc<str>, usize)> = Vec::new();
        for e in &read.events {
            let Some(user) = self.bodiless.get(&e.position).cloned() else {
                continue;
            };
            if self.loaded >= self.max_loaded {
                next = e.position;
                break;
            }
            if passed.contains(&user) {
                continue;
            }
            let Some(uq) = self.users.get_mut(&user) else {
                continue;
            };
            // Bodies are the front of a queue: this must be the user's first entry
            // without one.
            let first = uq.q.iter().position(|p| p.event.is_none());
            let fits = uq.loaded < self.per_user_loaded && uq.state != UserState::Waiting;
            match first.and_then(|i| uq.q.get_mut(i).map(|p| (i, p))) {
                Some((i, p)) if fits && p.origin == Origin::Log(e.position) => {
                    p.event = Some(body_of(e));
                    uq.loaded += 1;
                    self.loaded += 1;
                    self.bodiless.remove(&e.position);
                    attached.push((user, i));
                }
                _ => {
                    passed.insert(user);
                }
            }
        }
        self.refill_from = next;
        self.copy_out_if_few(&attached, read.events.len());
        attached.len()
    }

    pub(super) async fn load_replays(&mut self) {
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
            let user = self.user_key(&user);
            self.enqueue(
                user,
                Pending {
                    origin: Origin::Replay(l.id),
                    source: Arc::from(l.source.as_str()),
                    event: Some(Event {
                        json: bytes::Bytes::copy_from_slice(json),
                        message_id,
                    }),
                    attempts: 0,
                    first_attempt: None,
                    poison: false,
                    own_key: Some(format!("replay:{}", l.id).into()),
                },
            );
        }
    }
}
