//! Starting deliveries and judging their outcomes.
//!
//! A request carries the heads of one or more ready users (up to `batch_size` events);
//! suspects (events with strikes) go alone, with nothing else of the destination in
//! flight. A delivered request finishes its events; an aborted one dead-letters them; a
//! failed one counts an attempt on each event and puts its user to wait for the retry
//! (or dead-letters the head whose attempts are exhausted). A failed request of several
//! users blames nobody yet: its users go again in two halves, each on its own, split
//! again while they fail, down to one user (see `UserQueue::cohort`).

use std::cmp::Reverse;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::queue::{Origin, UserState};
use super::{InFlight, Unit, Worker};
use crate::destinations::{Event, Outcome};
use crate::router::retry;
use crate::router::state::{to_ms, RetryInfo};
use crate::store::Position;

/// Refills tried for one head without a body before it is loaded on its own.
const MAX_REFILLS: usize = 4;

/// The next request to start: whose events it carries and the events.
struct Request {
    units: Vec<Unit>,
    events: Vec<Event>,
    /// The events' log positions (for the crash journal).
    positions: Vec<Position>,
    /// It holds a suspect: nothing else starts until it finishes.
    isolate: bool,
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

impl Worker {
    /// Starts deliveries while there is capacity and a user ready.
    ///
    /// Suspects (events with strikes) are delivered alone, with nothing else of this
    /// destination in flight, so that if they crash the process again the journal names
    /// them and nothing else.
    pub(super) async fn dispatch(&mut self) {
        while self.isolating.is_none() && self.tasks.len() < self.concurrency {
            if self.hold_for_fuller_batch() {
                break;
            }
            let Some(request) = self.next_request().await else {
                break;
            };
            self.start(request);
        }
    }

    /// Takes ready users' heads into one request (None: nothing to send now).
    async fn next_request(&mut self) -> Option<Request> {
        let max = self.config.batch_size;
        let mut units: Vec<Unit> = Vec::new();
        let mut events: Vec<Event> = Vec::new();
        let mut positions = Vec::new();
        let mut isolate = false;
        // The cohort of the request (its first user's): a request holds users of one
        // cohort, or of none.
        let mut cohort = None;
        while events.len() < max {
            let Some(user) = self.ready.pop_front() else {
                break;
            };
            // One look at the user for its state, its head and the head's strikes.
            let strikes = &self.strikes;
            let strikes_of = |key: &str| {
                if strikes.is_empty() {
                    0
                } else {
                    strikes.get(key).copied().unwrap_or(0)
                }
            };
            let (take, user_cohort, poison, suspect) = match self.users.get(&user) {
                Some(uq) if uq.state == UserState::Idle => match uq.q.front() {
                    Some(head) => {
                        let struck = strikes_of(head.key());
                        (
                            (max - events.len()).min(uq.q.len()),
                            uq.cohort,
                            head.poison || (!strikes.is_empty() && struck >= self.poison_threshold),
                            struck > 0,
                        )
                    }
                    None => continue,
                },
                _ => continue,
            };
            if poison {
                self.quarantine(&user).await;
                continue;
            }
            if !units.is_empty() && (suspect || user_cohort != cohort) {
                // It goes first in the next request (alone if a suspect).
                self.ready.push_front(user);
                break;
            }
            if suspect && !self.tasks.is_empty() {
                // Let what is in flight finish first (nothing was taken into this request:
                // see above).
                self.ready.push_front(user);
                return None;
            }
            let take = if suspect { 1 } else { take };
            // A head without a body: refills first (each gives bodies to many users'
            // entries in one read), then, if still without, one read for this user.
            for _ in 0..MAX_REFILLS {
                // Only a head at or past where refills read can be reached by one.
                let reachable = self
                    .users
                    .get(&user)
                    .and_then(|u| u.q.front())
                    .is_some_and(|p| {
                        p.event.is_none()
                            && matches!(p.origin, Origin::Log(pos) if pos >= self.refill_from)
                    });
                if !reachable || self.refill().await == 0 {
                    break;
                }
            }
            // One read of the log at most, whatever the length of the queue, and none when
            // the head has its body and reading on would not pay.
            let loaded = if self.head_read_pays(&user, take) {
                self.load_head(&user, take).await
            } else {
                take
            };
            let mut n = 0;
            if let Some(uq) = self.users.get_mut(&user) {
                let now = SystemTime::now();
                for (i, p) in uq.q.iter_mut().take(loaded).enumerate() {
                    let struck = p.poison
                        || (!self.strikes.is_empty()
                            && self.strikes.get(p.key()).copied().unwrap_or(0) > 0);
                    if i > 0 && struck {
                        break;
                    }
                    let Some(e) = &p.event else { break };
                    events.push(e.clone());
                    if let Origin::Log(pos) = p.origin {
                        positions.push(pos);
                    }
                    p.first_attempt.get_or_insert(now);
                    n += 1;
                }
                if n > 0 {
                    uq.state = UserState::InFlight;
                }
            }
            if n == 0 {
                // Could not load its head now; try again on the next round.
                self.ready.push_back(user);
                break;
            }
            if units.is_empty() {
                cohort = user_cohort;
            }
            units.push(Unit { user, count: n });
            if suspect {
                isolate = true;
                break;
            }
        }
        if units.is_empty() {
            return None;
        }
        Some(Request {
            units,
            events,
            positions,
            isolate,
        })
    }

    /// Journals the request's positions and spawns its delivery.
    fn start(&mut self, request: Request) {
        let Request {
            units,
            events,
            positions,
            isolate,
        } = request;
        let begun = self.journal.begin(&self.config.id, positions);
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
        self.inflight.insert(handle.id(), InFlight { units, begun });
    }

    /// A delivery finished with `outcome`.
    pub(super) async fn complete(&mut self, id: tokio::task::Id, outcome: Outcome) {
        let Some(InFlight { units, begun }) = self.inflight.remove(&id) else {
            return;
        };
        self.journal.end(&self.config.id, begun);
        if self.isolating == Some(id) {
            self.isolating = None;
        }
        if units.len() > 1 && !outcome.delivered() {
            self.split_and_resend(units);
            return;
        }
        match outcome {
            Outcome::Delivered => self.delivered(units).await,
            Outcome::DeliveredExcept { refused } => self.delivered_except(units, refused).await,
            Outcome::Abort { status, reason } => {
                for unit in units {
                    self.dead_letter(&unit.user, unit.count, status, &reason, "aborted")
                        .await;
                }
            }
            Outcome::Retry {
                status,
                reason,
                retry_after,
            } => {
                for unit in units {
                    self.retry_later(unit, status, &reason, retry_after).await;
                }
            }
        }
    }

    /// Several users in one failed request: nobody is blamed yet; the users go again in
    /// two halves, each a cohort of its own (`UserQueue::cohort`), without an attempt
    /// counted. Made ready one half after the other, a cohort's users are neighbours in
    /// the ready list, so each half goes in one request (or a few, past `batch_size`).
    fn split_and_resend(&mut self, units: Vec<Unit>) {
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        let half = units.len().div_ceil(2);
        let first = self.next_cohort;
        self.next_cohort += 2;
        for (i, unit) in units.into_iter().enumerate() {
            if let Some(uq) = self.users.get_mut(&unit.user) {
                uq.landed();
                uq.cohort = Some(if i < half { first } else { first + 1 });
            }
            self.make_ready(&unit.user);
        }
    }

    async fn delivered(&mut self, units: Vec<Unit>) {
        if let Some(a) = &mut self.abort_alert {
            a.delivered_since = true;
        }
        let first = units
            .first()
            .and_then(|unit| self.users.get(&unit.user))
            .and_then(|u| u.q.front())
            .and_then(|p| p.event.as_ref())
            .and_then(|e| received_at(&e.json));
        if let Some(lag) = first.and_then(|t| SystemTime::now().duration_since(t).ok()) {
            self.lag_seconds.record(lag.as_secs_f64());
        }
        for unit in units {
            let (count, replays) = self.finish(&unit.user, unit.count, true);
            self.stats
                .delivered
                .fetch_add(count as u64, Ordering::Relaxed);
            self.replays_done(replays).await;
        }
    }

    /// One user's delivery failed: an attempt on each of its events; the head is
    /// dead-lettered when its attempts are exhausted, else the user waits for the retry.
    async fn retry_later(
        &mut self,
        unit: Unit,
        status: Option<u16>,
        reason: &str,
        retry_after: Option<Duration>,
    ) {
        let Unit { user, count: n } = unit;
        let now = SystemTime::now();
        let exhausted = {
            let Some(uq) = self.users.get_mut(&user) else {
                return;
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
            // Only the head exhausted its attempts; dead-letter the head, the rest of the
            // unit goes back to the queue.
            let reason = format!("retries exhausted: {reason}");
            self.dead_letter(&user, 1, status, &reason, "aborted").await;
            if let Some(uq) = self.users.get_mut(&user) {
                uq.landed();
            }
            self.make_ready(&user);
            return;
        }
        let attempts = self
            .users
            .get(&user)
            .and_then(|u| u.q.front())
            .map(|p| p.attempts)
            .unwrap_or(1);
        let delay = retry::backoff(&self.config.retry, attempts, retry_after);
        tracing::debug!(destination = %self.config.id, ?status, %reason, ?delay, "delivery failed; will retry");
        self.wait(user, delay);
    }

    /// The user waits `delay` for its retry; meanwhile only its head keeps its body in
    /// memory.
    fn wait(&mut self, user: Arc<str>, delay: Duration) {
        if let Some(uq) = self.users.get_mut(&user) {
            uq.landed();
            if uq.state != UserState::Waiting {
                self.waiting_users += 1;
            }
            uq.state = UserState::Waiting;
            // Log entries with a body are the front of the queue: stop at the first
            // without.
            let mut freed = 0;
            for p in uq.q.iter_mut().skip(1) {
                if let Origin::Log(pos) = p.origin {
                    if p.drop_body().is_none() {
                        break;
                    }
                    self.bodiless.insert(pos, user.clone());
                    freed += 1;
                }
            }
            uq.loaded -= freed;
            self.loaded -= freed;
        }
        // Never an overflow, whatever the delay (a destination's `Retry-After` is already
        // capped at `max_backoff`, which the configuration may set to anything).
        let at = retry::deadline_after(Instant::now(), delay);
        self.timers.push(Reverse((at, user)));
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
