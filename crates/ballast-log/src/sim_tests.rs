//! Power loss, simulated: the whole log on the simulated disk of `sim.rs`, crashed at a
//! random operation, its unsynced writes and directory changes kept, torn or lost at
//! random, then opened again and checked:
//! - every acknowledged record is there, at its position, byte for byte, in order (and
//!   every record seen since, acknowledged or not, stays so through later crashes);
//! - nothing else is visible: every record read is one that was appended, whole;
//! - no cursor points past the durable end, a saved cursor never moves back, the ranges a
//!   consumer saved as finished are still saved and never cover a record it did not
//!   finish; no segment a consumer still needs is deleted;
//! - the log opens after every crash (a crash during recovery included) without error.
//!
//! The workload: bursts of appends submitted together (group commit: completion
//! callbacks), small segments (rolls, the prepared-segment rename when preallocating),
//! two consumers' cursor and finished-range files, a consumer removed and added again,
//! and a state file replaced with `write_atomically` (the server's `state.json`), which
//! must read as its last content written or the one being written, whole.
//!
//! `BALLAST_SIM_SEED` (first seed, default 1) and `BALLAST_SIM_RUNS` (runs of
//! [`CYCLES`] crashes each, default 60) choose what runs; a failure prints its seed. A
//! seed replays the same workload, crash points and power-loss choices; how the writer
//! thread groups a burst of appends depends on timing, so a failure at a crash point
//! inside a burst may need a few runs of its seed to show again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::sim::SimFs;
use crate::{Batch, ConsumerProgress, Log, LogConfig, Position, HEADER_LEN};

/// Crashes (each a power loss and a recovery) per run.
const CYCLES: usize = 50;

/// Bytes of record `id` after its id: 1 to 600, a pattern of its own.
fn body_len(id: u64) -> usize {
    (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize % 600 + 1
}

fn payload(id: u64) -> Vec<u8> {
    let mut p = id.to_le_bytes().to_vec();
    let salt = id.wrapping_mul(31) as u8;
    p.extend((0..body_len(id)).map(|i| salt ^ (i as u8).wrapping_mul(17) ^ (i >> 8) as u8));
    p
}

fn frame_len(id: u64) -> u64 {
    (HEADER_LEN + 8 + body_len(id)) as u64
}

#[derive(Debug, Clone, PartialEq)]
enum Second {
    /// Registered (the registration returned), with the last cursor saved.
    At(Position),
    /// Removed (the removal returned).
    Gone,
    /// An operation on it failed at the crash: either state may have been kept.
    Unsure,
}

struct Model {
    /// Durable records: position → id.
    records: BTreeMap<Position, u64>,
    next_id: u64,
    /// Records consumer "c1" finished (they stay finished).
    finished: BTreeSet<Position>,
    /// What c1 last saved (an acknowledgement that returned Ok, or what recovery found).
    c1: Option<ConsumerProgress>,
    c2: Second,
    /// A state file replaced with `write_atomically` (as the server's `state.json`): its
    /// last content written (Ok), and one whose write failed at the crash since.
    state: Option<Vec<u8>>,
    state_try: Option<Vec<u8>>,
    state_writes: u64,
}

const STATE: &str = "/sim/data/state.json";

fn covered(p: &ConsumerProgress, pos: Position) -> bool {
    pos < p.cursor || p.done.iter().any(|r| r.0 <= pos && pos < r.1)
}

struct Run {
    rng: StdRng,
    fs: SimFs,
    config: LogConfig,
    model: Model,
    crashes: usize,
}

impl Run {
    fn new(seed: u64) -> Run {
        let mut rng = StdRng::seed_from_u64(seed);
        let root = PathBuf::from("/sim/data");
        let fs = SimFs::new(rng.gen(), &root);
        let config = LogConfig {
            segment_bytes: [1024, 2048, 4096][rng.gen_range(0..3)],
            preallocate: rng.gen_bool(0.7),
            ..LogConfig::new(root.join("log"))
        };
        Run {
            rng,
            fs,
            config,
            model: Model {
                records: BTreeMap::new(),
                next_id: 0,
                finished: BTreeSet::new(),
                c1: None,
                c2: Second::Gone,
                state: None,
                state_try: None,
                state_writes: 0,
            },
            crashes: 0,
        }
    }

    /// One cycle: open (recover), check, work until the armed crash, power loss.
    fn cycle(&mut self) {
        let budget = self.rng.gen_range(1..=400);
        self.fs.crash_after(budget);
        let opened = Log::open_with(self.config.clone(), Arc::new(self.fs.clone()));
        let (log, report) = match opened {
            Ok(x) => x,
            Err(e) => {
                assert!(
                    self.fs.crashed(),
                    "the log did not open after a power loss: {e}"
                );
                self.power_loss();
                return;
            }
        };
        if self.fs.crashed() {
            // The crash hit while the next segment was prepared at open.
            drop(log);
            self.power_loss();
            return;
        }
        assert_eq!(
            report.cursors_past_end, 0,
            "a cursor pointed past the durable end"
        );
        self.check(&log);
        let steps = self.rng.gen_range(1..80);
        for _ in 0..steps {
            if self.fs.crashed() {
                break;
            }
            self.step(&log);
        }
        self.fs.crash_now();
        drop(log);
        self.power_loss();
    }

    fn power_loss(&mut self) {
        self.fs.power_loss();
        self.crashes += 1;
    }

    /// What recovery found against what was acknowledged; then the model takes it as
    /// the durable state.
    fn check(&mut self, log: &Log) {
        let m = &mut self.model;
        let mut found = BTreeMap::new();
        let mut pos = log.start();
        loop {
            let b = log.read(pos, 64, 1 << 20).expect("reading after recovery");
            for r in &b.records {
                let id = u64::from_le_bytes(r.payload[..8].try_into().expect("an id"));
                assert!(
                    id < m.next_id,
                    "record {id} at {} was never appended",
                    r.position
                );
                assert_eq!(
                    r.payload,
                    payload(id),
                    "record {id} at {} is not whole",
                    r.position
                );
                if let Some((_, last)) = found.last_key_value() {
                    assert!(id > *last, "record {id} at {} is out of order", r.position);
                }
                found.insert(r.position, id);
            }
            if b.next == pos {
                break;
            }
            pos = b.next;
        }
        assert_eq!(
            pos,
            log.durable_end(),
            "the records read end where the log ends"
        );
        let cursors = log.cursors();
        let keep_from = cursors.values().copied().min().unwrap_or(0);
        for (&p, &id) in m.records.range(keep_from..) {
            assert_eq!(
                found.get(&p),
                Some(&id),
                "acknowledged record {id} at {p} is missing (cursors {cursors:?}, log start {})",
                log.start()
            );
        }
        // Consumer c1: its saved progress survived; it claims nothing unfinished.
        let now = log.progress("c1");
        if let Some(saved) = &m.c1 {
            let now = now.clone().expect("c1's registration was saved");
            assert!(
                now.cursor >= saved.cursor,
                "c1's cursor moved back: {} < {}",
                now.cursor,
                saved.cursor
            );
            for &p in m.records.keys() {
                if covered(saved, p) {
                    assert!(
                        covered(&now, p),
                        "c1's finished record at {p} is no longer saved as such"
                    );
                }
            }
        }
        if let Some(now) = &now {
            assert!(now.cursor <= log.durable_end());
            for &p in found.keys() {
                if covered(now, p) {
                    assert!(
                        m.finished.contains(&p),
                        "c1's saved progress {now:?} covers the record at {p}, never finished"
                    );
                }
            }
            for r in &now.done {
                assert!(r.0 >= now.cursor && r.1 <= log.durable_end(), "range {r:?}");
            }
        }
        match m.c2 {
            Second::At(c) => {
                let now = log.cursor("c2").expect("c2's registration was saved");
                assert!(now >= c, "c2's cursor moved back: {now} < {c}");
                m.c2 = Second::At(now);
            }
            Second::Gone => assert_eq!(log.cursor("c2"), None, "c2's removal was saved"),
            Second::Unsure => {
                m.c2 = log.cursor("c2").map_or(Second::Gone, Second::At);
            }
        }
        m.records = found;
        m.c1 = now;
        // The state file: the last one written, or the one being written, whole.
        let state = self.fs.file(Path::new(STATE));
        let tried = m.state_try.take();
        assert!(
            state == m.state || (tried.is_some() && state == tried),
            "the state file is {state:?}, written {:?}, being written {tried:?}",
            m.state
        );
        m.state = state;
    }

    fn step(&mut self, log: &Log) {
        match self.rng.gen_range(0..100) {
            0..=54 => self.appends(log),
            55..=79 => self.ack_c1(log),
            80..=89 => self.ack_c2(log),
            90..=94 => self.write_state(),
            _ => self.flip_c2(log),
        }
    }

    /// A burst of batches submitted together; the acknowledged ones join the model.
    fn appends(&mut self, log: &Log) {
        let k = self.rng.gen_range(1..=4);
        let (tx, rx) = mpsc::channel();
        let mut batches = Vec::new();
        for b in 0..k {
            let n = self.rng.gen_range(1..=5);
            let ids: Vec<u64> = (0..n)
                .map(|_| {
                    self.model.next_id += 1;
                    self.model.next_id - 1
                })
                .collect();
            let mut batch = Batch::new();
            for &id in &ids {
                batch.push(&payload(id)).expect("a small record");
            }
            batches.push(ids);
            let tx = tx.clone();
            log.append(batch, move |r| {
                let _ = tx.send((b, r));
            });
        }
        for _ in 0..k {
            let (b, r) = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("every append completes");
            match r {
                Ok(a) => {
                    let mut pos = a.first;
                    for &id in &batches[b] {
                        self.model.records.insert(pos, id);
                        pos += frame_len(id);
                    }
                    assert_eq!(pos, a.end);
                    assert!(a.durable >= a.end);
                }
                Err(e) => assert!(self.fs.crashed(), "append failed without a crash: {e}"),
            }
        }
    }

    /// c1 finishes some records out of order and saves its progress.
    fn ack_c1(&mut self, log: &Log) {
        let m = &mut self.model;
        if m.c1.is_none() {
            match log.register_consumer("c1") {
                Ok(c) => {
                    m.c1 = Some(ConsumerProgress {
                        cursor: c,
                        done: vec![],
                    })
                }
                Err(e) => assert!(self.fs.crashed(), "registering failed without a crash: {e}"),
            }
            return;
        }
        let from = m.c1.as_ref().map_or(0, |p| p.cursor);
        let open: Vec<Position> = m
            .records
            .range(from..)
            .map(|(&p, _)| p)
            .filter(|p| !m.finished.contains(p))
            .collect();
        for p in open {
            if self.rng.gen_bool(0.4) {
                m.finished.insert(p);
            }
        }
        // The cursor: the first record not finished (or the end); the ranges: runs of
        // finished records above it.
        let end = m
            .records
            .last_key_value()
            .map_or(from, |(&p, &id)| p + frame_len(id))
            .max(from);
        let cursor = m
            .records
            .range(from..)
            .map(|(&p, _)| p)
            .find(|p| !m.finished.contains(p))
            .unwrap_or(end);
        let mut done: Vec<(Position, Position)> = Vec::new();
        for (&p, &id) in m.records.range(cursor..) {
            if !m.finished.contains(&p) {
                continue;
            }
            let e = p + frame_len(id);
            match done.last_mut() {
                Some(last) if last.1 == p => last.1 = e,
                _ => done.push((p, e)),
            }
        }
        match log.ack_progress("c1", cursor, &done) {
            Ok(()) => m.c1 = Some(ConsumerProgress { cursor, done }),
            Err(e) => assert!(self.fs.crashed(), "saving c1 failed without a crash: {e}"),
        }
    }

    /// c2 moves its cursor to a random record boundary ahead of it.
    fn ack_c2(&mut self, log: &Log) {
        let Second::At(c) = self.model.c2 else {
            return;
        };
        let ahead: Vec<Position> = self.model.records.range(c..).map(|(&p, _)| p).collect();
        if ahead.is_empty() {
            return;
        }
        let to = ahead[self.rng.gen_range(0..ahead.len())];
        match log.ack("c2", to) {
            Ok(()) => self.model.c2 = Second::At(to.max(c)),
            Err(e) => {
                assert!(self.fs.crashed(), "saving c2 failed without a crash: {e}");
                // The cursor file may be saved; the segment deletion after it failed.
            }
        }
    }

    /// Replaces the state file (of a length of its own each time).
    fn write_state(&mut self) {
        let m = &mut self.model;
        m.state_writes += 1;
        let content = format!(
            "state {} {}",
            m.state_writes,
            "x".repeat((m.state_writes % 97) as usize)
        )
        .into_bytes();
        match crate::fs::write_atomically_on(&self.fs, Path::new(STATE), &content) {
            Ok(()) => m.state = Some(content),
            Err(e) => {
                assert!(
                    self.fs.crashed(),
                    "writing the state failed without a crash: {e}"
                );
                m.state_try = Some(content);
            }
        }
    }

    /// Removes c2, or registers it again.
    fn flip_c2(&mut self, log: &Log) {
        let r = match self.model.c2 {
            Second::At(_) => log.remove_consumer("c2").map(|()| Second::Gone),
            _ => log.register_consumer("c2").map(Second::At),
        };
        match r {
            Ok(s) => self.model.c2 = s,
            Err(e) => {
                assert!(self.fs.crashed(), "c2 failed without a crash: {e}");
                self.model.c2 = Second::Unsure;
            }
        }
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn acknowledged_records_and_saved_cursors_survive_simulated_power_loss() {
    let first = env("BALLAST_SIM_SEED", 1);
    let runs = env("BALLAST_SIM_RUNS", 60);
    let started = Instant::now();
    let mut crashes = 0;
    for seed in first..first + runs {
        let result = std::panic::catch_unwind(|| {
            let mut run = Run::new(seed);
            for _ in 0..CYCLES {
                run.cycle();
            }
            (run.crashes, run.fs.ops())
        });
        match result {
            Ok((n, _)) => crashes += n,
            Err(e) => {
                eprintln!(
                    "power-loss simulation failed at seed {seed}: rerun with \
                     BALLAST_SIM_SEED={seed} BALLAST_SIM_RUNS=1"
                );
                std::panic::resume_unwind(e);
            }
        }
    }
    eprintln!(
        "power-loss simulation: {runs} runs from seed {first}, {crashes} crashes and recoveries in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(crashes as u64, runs * CYCLES as u64);
}

/// The simulated disk itself: what a sync covers survives, a rename not synced into its
/// directory may be undone, a file never synced may come back empty, torn or whole.
#[test]
fn the_simulated_disk_keeps_only_what_was_synced() {
    use crate::vfs::{Mode, Vfs};
    let root = Path::new("/sim/d");
    for seed in 0..200 {
        let fs = SimFs::new(seed, root);
        let a = root.join("a");
        let f = fs.open(&a, Mode::CreateTruncate).unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        f.sync_data().unwrap();
        fs.sync_dir(root).unwrap();
        f.write_all_at(b" world", 5).unwrap();
        let tmp = root.join("b.tmp");
        let g = fs.open(&tmp, Mode::CreateTruncate).unwrap();
        g.write_all_at(b"new", 0).unwrap();
        g.sync_data().unwrap();
        fs.sync_dir(root).unwrap();
        fs.rename(&tmp, &root.join("b")).unwrap();
        fs.power_loss();
        let a_now = fs.file(&a).expect("a synced file and entry stay");
        assert!(a_now.starts_with(b"hello") && b"hello world".starts_with(&a_now[..]));
        // The rename is whole or undone: exactly one of the names holds the bytes.
        let b = fs.file(&root.join("b"));
        let t = fs.file(&tmp);
        assert!(b.is_some() != t.is_some(), "seed {seed}: {b:?} {t:?}");
        assert_eq!(b.or(t).unwrap(), b"new");
        assert!(
            f.write_all_at(b"x", 0).is_err(),
            "a handle from before the power loss"
        );
    }
}
