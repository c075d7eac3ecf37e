//! Per-user queues: a user's events in log order (replayed dead letters too), the state
//! of its queue (idle, one delivery in flight, waiting for a retry), the ready list of
//! users that may deliver, the retry timers, and what finishing a queue's head does
//! (forget its retry state and strikes, free its body, make the user ready again).

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytestring::ByteString;

use super::Worker;
use crate::destinations::Event;
use crate::store::Position;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    Log(Position),
    Replay(u64),
}

pub(super) struct Pending {
    pub(super) origin: Origin,
    pub(super) source: Arc<str>,
    /// None while not loaded (see `max_loaded`).
    pub(super) event: Option<Event>,
    pub(super) attempts: u32,
    pub(super) first_attempt: Option<SystemTime>,
    /// Struck out as a poison event: quarantined instead of delivered.
    pub(super) poison: bool,
    /// Names the event's strikes (see [`Pending::key`]): `None` while it is the body's
    /// messageId (nothing to copy or count per event); else a string of its own (no
    /// messageId: `@position`; a replay; an entry without its body, which must not keep
    /// the chunk it was read in, hundreds of events, alive for the few bytes of a key).
    pub(super) own_key: Option<ByteString>,
}

impl Pending {
    /// The key of the event's strikes: its messageId, so that a copy sent again shares
    /// them.
    pub(super) fn key(&self) -> &str {
        match (&self.own_key, &self.event) {
            (Some(k), _) => k,
            (None, Some(e)) => &e.message_id,
            (None, None) => "",
        }
    }

    /// The key for an entry read from the log at `position` (`keep`: with its body).
    pub(super) fn key_for(event: &Event, position: Position, keep: bool) -> Option<ByteString> {
        if event.message_id.is_empty() {
            Some(super::poison::strike_key("", position).into())
        } else if keep {
            None
        } else {
            Some(ByteString::from(&*event.message_id))
        }
    }

    /// Drops the body (to be read again later), keeping its key.
    pub(super) fn drop_body(&mut self) -> Option<Event> {
        if self.own_key.is_none() {
            self.own_key = Some(ByteString::from(self.key()));
        }
        self.event.take()
    }

    /// Copies the body out of the chunk it was read in, which a few kept events of a
    /// large read would otherwise pin whole.
    pub(super) fn copy_out(&mut self) {
        if let Some(e) = &mut self.event {
            e.json = bytes::Bytes::copy_from_slice(&e.json);
            e.message_id = ByteString::from(&*e.message_id);
        }
    }
}

/// Where a user's queue stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum UserState {
    /// Nothing in flight, not waiting: may deliver its head (when it has one).
    #[default]
    Idle,
    /// One delivery of its head (or first few events) in flight.
    InFlight,
    /// Its head failed; waiting for the retry timer.
    Waiting,
}

#[derive(Default)]
pub(super) struct UserQueue {
    pub(super) q: VecDeque<Pending>,
    pub(super) state: UserState,
    /// Entries of `q` whose body is in memory.
    pub(super) loaded: usize,
    /// A batch holding this user's events together with other users' failed: its users
    /// were split in two halves, each a cohort sent without anyone else (and split again
    /// if it fails), down to one user, whose failure is then its own. A passing failure
    /// costs two requests, not one per user (a 10,000-event warehouse load of 2,000 users
    /// that failed once came back as 2,000 loads); one bad event among n users costs
    /// about 2 log2(n).
    pub(super) cohort: Option<u64>,
}

impl UserQueue {
    /// Its delivery finished (whatever the outcome): no longer in flight.
    pub(super) fn landed(&mut self) {
        if self.state == UserState::InFlight {
            self.state = UserState::Idle;
        }
    }
}

impl Worker {
    pub(super) fn enqueue(&mut self, user: Arc<str>, p: Pending) {
        if let Some(f) = &mut self.filling {
            f.add(1);
        }
        let uq = self.users.entry(user.clone()).or_default();
        if p.event.is_some() {
            uq.loaded += 1;
            self.loaded += 1;
        }
        let was_empty = uq.q.is_empty();
        uq.q.push_back(p);
        if was_empty && uq.state == UserState::Idle {
            self.ready.push_back(user);
        }
    }

    /// Removes the first `n` events of the user's queue (they are done); returns how many
    /// it removed and the replay ids among them. `delivered`: they were delivered, so the
    /// user no longer has to send alone. One lookup of the user does it all (this runs for
    /// every unit of every request).
    pub(super) fn finish(
        &mut self,
        user: &Arc<str>,
        n: usize,
        delivered: bool,
    ) -> (usize, Vec<u64>) {
        let mut replays = Vec::new();
        let mut count = 0;
        let Entry::Occupied(mut entry) = self.users.entry(user.clone()) else {
            return (count, replays);
        };
        let uq = entry.get_mut();
        if delivered {
            uq.cohort = None;
        }
        for _ in 0..n {
            let Some(p) = uq.q.pop_front() else { break };
            count += 1;
            if p.event.is_some() {
                self.loaded = self.loaded.saturating_sub(1);
                uq.loaded = uq.loaded.saturating_sub(1);
            }
            match p.origin {
                Origin::Log(pos) => {
                    self.unfinished.remove(pos);
                    if !self.bodiless.is_empty() {
                        self.bodiless.remove(&pos);
                    }
                    if !self.known_retry.is_empty() && self.known_retry.remove(&pos).is_some() {
                        self.retry_changes.push((pos, None));
                    }
                    // A quarantined event keeps its strikes, so that a copy of it sent
                    // again (same messageId) is quarantined without new crashes.
                    if !p.poison
                        && !self.strikes.is_empty()
                        && self.strikes.remove(p.key()).is_some()
                    {
                        self.strike_clears.push(p.key().to_string());
                    }
                }
                Origin::Replay(id) => {
                    self.replaying.remove(&id);
                    replays.push(id);
                }
            }
        }
        uq.landed();
        // What `make_ready` does, on the entry in hand.
        if uq.q.is_empty() && uq.state != UserState::InFlight {
            entry.remove();
        } else if uq.state == UserState::Idle {
            if let Some(f) = &mut self.filling {
                f.add(uq.q.len());
            }
            self.ready.push_back(user.clone());
        }
        (count, replays)
    }

    pub(super) fn make_ready(&mut self, user: &Arc<str>) {
        match self.users.get(user) {
            Some(uq) if uq.q.is_empty() && uq.state != UserState::InFlight => {
                self.users.remove(user);
            }
            Some(uq) if uq.state == UserState::Idle => {
                if let Some(f) = &mut self.filling {
                    f.add(uq.q.len());
                }
                self.ready.push_back(user.clone())
            }
            _ => {}
        }
    }

    pub(super) fn wake_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((t, _))) = self.timers.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((_, user))) = self.timers.pop() else {
                break;
            };
            if let Some(uq) = self.users.get_mut(&user) {
                if uq.state == UserState::Waiting {
                    self.waiting_users = self.waiting_users.saturating_sub(1);
                    uq.state = UserState::Idle;
                }
            }
            self.make_ready(&user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_entry(chunk: &bytes::Bytes, message_id: &str) -> Pending {
        let event = Event {
            json: chunk.slice(0..chunk.len()),
            message_id: ByteString::try_from(chunk.slice_ref(message_id.as_bytes())).unwrap(),
        };
        Pending {
            origin: Origin::Log(7),
            source: Arc::from("web"),
            own_key: Pending::key_for(&event, 7, true),
            event: Some(event),
            attempts: 0,
            first_attempt: None,
            poison: false,
        }
    }

    #[test]
    fn an_entry_without_its_body_keeps_its_key_but_not_the_chunk() {
        let chunk = bytes::Bytes::from(br#"{"messageId":"m-1"}"#.to_vec());
        let mut p = read_entry(&chunk, &std::str::from_utf8(&chunk).unwrap()[14..17]);
        assert_eq!(p.key(), "m-1");
        assert!(p.own_key.is_none(), "the body's messageId is the key");
        assert!(p.drop_body().is_some());
        assert_eq!(p.key(), "m-1");
        assert!(
            !chunk.as_ptr_range().contains(&p.key().as_ptr()),
            "a copy of its own"
        );
    }

    #[test]
    fn an_event_without_message_id_is_named_by_its_position() {
        let chunk = bytes::Bytes::from_static(b"{}");
        let mut p = read_entry(&chunk, "");
        assert_eq!(p.key(), "@7");
        p.drop_body();
        assert_eq!(p.key(), "@7");
        let e = p.event.get_or_insert(Event {
            json: chunk.clone(),
            message_id: ByteString::new(),
        });
        assert_eq!(Pending::key_for(e, 9, false).as_deref(), Some("@9"));
    }

    #[test]
    fn copied_out_bodies_leave_the_chunk() {
        let chunk = bytes::Bytes::from(br#"{"messageId":"m-2"}"#.to_vec());
        let mut p = read_entry(&chunk, &std::str::from_utf8(&chunk).unwrap()[14..17]);
        p.copy_out();
        let e = p.event.as_ref().unwrap();
        let within = |ptr: *const u8| chunk.as_ptr_range().contains(&ptr);
        assert!(!within(e.json.as_ptr()) && !within(e.message_id.as_ptr()));
        assert_eq!(p.key(), "m-2");
    }
}
