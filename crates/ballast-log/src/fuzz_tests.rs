//! Fuzzing of the start-up recovery scan on stable Rust (proptest, bounded case counts):
//! a segment written by the log, then damaged at random (flipped bytes, a cut, garbage
//! appended), or a segment of arbitrary bytes, must open without a panic; every record
//! read back is byte for byte what was written at that position, every record before the
//! first damaged byte is still there, and a second open finds nothing new to repair.

use std::collections::BTreeMap;

use super::*;
use proptest::prelude::*;

fn cfg(dir: &Path) -> LogConfig {
    LogConfig {
        segment_bytes: 1 << 20,
        ..LogConfig::new(dir)
    }
}

fn read_all(log: &Log) -> Vec<Record> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let Ok(b) = log.read(pos, 64, 1 << 20) else {
            return out;
        };
        if b.records.is_empty() && b.next == pos {
            return out;
        }
        out.extend(b.records);
        pos = b.next;
    }
}

#[derive(Debug, Clone)]
enum Damage {
    Flip { at: prop::sample::Index, bit: u8 },
    Cut { at: prop::sample::Index },
    Garbage(Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        4 => (any::<prop::sample::Index>(), 0u8..8).prop_map(|(at, bit)| Damage::Flip { at, bit }),
        1 => any::<prop::sample::Index>().prop_map(|at| Damage::Cut { at }),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Damage::Garbage),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn recovery_of_a_damaged_segment(
        payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..24),
        damages in prop::collection::vec(damage(), 0..4),
    ) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let seg = dir.path().join(format!("{:020}.seg", 0));
        let mut written = BTreeMap::new();
        {
            let (log, _) = Log::open(cfg(dir.path())).map_err(|e| TestCaseError::fail(e.to_string()))?;
            for p in &payloads {
                let mut b = Batch::new();
                b.push(p).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let a = log.append_wait(b).map_err(|e| TestCaseError::fail(e.to_string()))?;
                written.insert(a.first, (a.end, p.clone()));
            }
        }
        let mut bytes = std::fs::read(&seg).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let end = written.values().map(|(e, _)| *e).max().unwrap_or(0) as usize;
        bytes.truncate(end);
        let mut first_damage = bytes.len();
        for d in &damages {
            match d {
                Damage::Flip { at, bit } if !bytes.is_empty() => {
                    let i = at.index(bytes.len());
                    bytes[i] ^= 1 << bit;
                    first_damage = first_damage.min(i);
                }
                Damage::Cut { at } if !bytes.is_empty() => {
                    let i = at.index(bytes.len());
                    bytes.truncate(i);
                    first_damage = first_damage.min(i);
                }
                Damage::Garbage(g) => bytes.extend_from_slice(g),
                _ => {}
            }
        }
        // The read-only scan of `log dump` never panics either.
        recovery::scan_segment_readonly(&bytes, |_| {});
        std::fs::write(&seg, &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let (log, _) = Log::open(cfg(dir.path())).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let records = read_all(&log);
        for r in &records {
            let Some((_, p)) = written.get(&r.position) else {
                return Err(TestCaseError::fail(format!("a record at {} that was never written", r.position)));
            };
            prop_assert_eq!(&r.payload[..], &p[..], "record at {} changed", r.position);
        }
        let intact = written.iter().filter(|(_, (e, _))| *e as usize <= first_damage).count();
        let kept = records.iter().filter(|r| written.get(&r.position).is_some_and(|(e, _)| *e as usize <= first_damage)).count();
        prop_assert_eq!(kept, intact, "records before the first damaged byte are all kept");
        drop(log);
        let (log, report) = Log::open(cfg(dir.path())).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(report.corrupt_records, 0, "nothing new to repair");
        prop_assert_eq!(report.torn_tail_bytes, 0);
        prop_assert_eq!(read_all(&log).len(), records.len());
    }

    #[test]
    fn recovery_of_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        std::fs::write(dir.path().join(format!("{:020}.seg", 0)), &bytes)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        recovery::scan_segment_readonly(&bytes, |_| {});
        let (log, _) = Log::open(cfg(dir.path())).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let _ = read_all(&log);
        // Whatever it made of them, the log takes appends afterwards.
        let mut b = Batch::new();
        b.push(b"after").map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(log.append_wait(b).is_ok());
    }
}
