use super::*;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

fn cfg(dir: &Path, segment_bytes: u64) -> LogConfig {
    LogConfig {
        segment_bytes,
        ..LogConfig::new(dir)
    }
}

fn batch(payloads: &[Vec<u8>]) -> Batch {
    let mut b = Batch::new();
    for p in payloads {
        b.push(p).unwrap();
    }
    b
}

fn read_all(log: &Log, from: Position) -> Vec<Record> {
    let mut out = Vec::new();
    let mut pos = from;
    loop {
        let b = log.read(pos, 7, 1000).unwrap();
        if b.records.is_empty() && b.next == pos {
            return out;
        }
        out.extend(b.records);
        pos = b.next;
    }
}

fn payload(i: usize) -> Vec<u8> {
    format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(i % 50)).into_bytes()
}

#[test]
fn append_read_roll_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut positions = Vec::new();
    {
        let (log, report) = Log::open(cfg(dir.path(), 300)).unwrap();
        assert_eq!(report.records, 0);
        for chunk in (0..50).collect::<Vec<_>>().chunks(5) {
            let ps: Vec<_> = chunk.iter().map(|&i| payload(i)).collect();
            let a = log.append_wait(batch(&ps)).unwrap();
            assert_eq!(a.records, 5);
            positions.push(a.first);
        }
        assert!(log.stats().segments > 3, "segments roll");
        assert_eq!(log.stats().stored_records, 50);
        let all = read_all(&log, 0);
        assert_eq!(all.len(), 50);
        for (i, r) in all.iter().enumerate() {
            assert_eq!(r.payload, payload(i));
        }
    }
    let (log, report) = Log::open(cfg(dir.path(), 300)).unwrap();
    assert_eq!(report.records, 50);
    // Counted from the files after a restart, not from this run's appends.
    assert_eq!(log.stats().stored_records, 50);
    assert_eq!(report.torn_tail_bytes, 0);
    let all = read_all(&log, 0);
    assert_eq!(all.len(), 50);
    // Positions are stable and reading from one starts exactly there.
    let from = read_all(&log, positions[3]);
    assert_eq!(from.len(), 50 - 15);
    assert_eq!(from[0].payload, payload(15));
    let more = log.append_wait(batch(&[b"after".to_vec()])).unwrap();
    assert_eq!(log.stats().stored_records, 51);
    assert!(more.first >= all.last().unwrap().position);
    assert_eq!(read_all(&log, more.first)[0].payload, &b"after"[..]);
}

#[test]
fn cursors_delete_segments_only_when_every_consumer_is_past() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(cfg(dir.path(), 200)).unwrap();
    assert_eq!(log.register_consumer("a").unwrap(), 0);
    assert_eq!(log.register_consumer("b").unwrap(), 0);
    let mut firsts = Vec::new();
    for i in 0..40 {
        firsts.push(log.append_wait(batch(&[payload(i)])).unwrap().first);
    }
    let half = firsts[20];
    let segments = log.stats().segments;
    assert!(segments > 4);
    let end = log.durable_end();
    let bytes = log.stats().bytes_on_disk;
    log.ack("a", end).unwrap();
    assert_eq!(log.stats().segments, segments, "b still holds them");
    log.ack("b", half).unwrap();
    let mid = log.stats();
    assert!(mid.segments < segments && mid.segments > 1);
    assert!(mid.bytes_on_disk < bytes);
    // Everything from b's cursor on is still readable.
    let rest = read_all(&log, log.cursor("b").unwrap());
    assert_eq!(rest.len(), 20);
    // Deleted segments take their records out of the count.
    assert_eq!(mid.stored_records, read_all(&log, log.start()).len() as u64);
    assert!(mid.stored_records < 40);
    assert_eq!(rest[0].payload, payload(20));
    log.ack("b", end).unwrap();
    assert_eq!(log.stats().segments, 1, "the active segment stays");
    assert!(matches!(
        log.ack("b", end + 1),
        Err(LogError::AckBeyondEnd { .. })
    ));
    assert!(matches!(
        log.ack("zz", 1),
        Err(LogError::UnknownConsumer(_))
    ));
    assert!(matches!(
        log.register_consumer("../x"),
        Err(LogError::BadConsumerName(_))
    ));
    drop(log);
    let (log, _) = Log::open(cfg(dir.path(), 200)).unwrap();
    assert_eq!(log.cursor("a"), Some(end));
    assert_eq!(log.register_consumer("c").unwrap(), log.start());
}

#[test]
fn second_open_is_refused_while_locked() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, _) = Log::open(cfg(dir.path(), 1 << 20)).unwrap();
    assert!(matches!(
        Log::open(cfg(dir.path(), 1 << 20)),
        Err(LogError::Locked(_))
    ));
}

#[test]
fn quota_rejects_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path(), 1 << 20);
    c.max_bytes = Some(1000);
    let (log, _) = Log::open(c).unwrap();
    let mut accepted = 0;
    let mut rejected = 0;
    for i in 0..100 {
        match log.append_wait(batch(&[payload(i)])) {
            Ok(_) => accepted += 1,
            Err(LogError::QuotaExceeded { limit, .. }) => {
                assert_eq!(limit, 1000);
                rejected += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(accepted > 5 && rejected > 0);
    assert!(log.stats().bytes_on_disk <= 1000);
    assert_eq!(read_all(&log, 0).len(), accepted);
    assert_eq!(log.stats().rejected_quota, rejected);
    assert!(log.stats().quota_blocked);
}

#[test]
fn truncated_tail_at_every_offset_keeps_every_complete_record() {
    let dir = tempfile::tempdir().unwrap();
    let seg_path = dir.path().join(format!("{:020}.seg", 0));
    let mut ends = Vec::new();
    {
        let (log, _) = Log::open(cfg(dir.path(), 1 << 20)).unwrap();
        for i in 0..20 {
            ends.push(log.append_wait(batch(&[payload(i)])).unwrap().end);
        }
    }
    let full = std::fs::read(&seg_path).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut cuts: Vec<usize> = (0..40).map(|_| rng.gen_range(0..full.len())).collect();
    cuts.extend([
        0,
        1,
        full.len() - 1,
        ends[10] as usize,
        ends[10] as usize + 1,
    ]);
    for cut in cuts {
        std::fs::write(&seg_path, &full[..cut]).unwrap();
        let _ = std::fs::remove_dir_all(dir.path().join("quarantine"));
        let (log, report) = Log::open(cfg(dir.path(), 1 << 20)).unwrap();
        let complete = ends.iter().filter(|&&e| e as usize <= cut).count();
        let records = read_all(&log, 0);
        assert_eq!(records.len(), complete, "cut at {cut}");
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.payload, payload(i));
        }
        let kept = if complete == 0 {
            0
        } else {
            ends[complete - 1] as usize
        };
        assert_eq!(report.torn_tail_bytes as usize, cut - kept);
        assert_eq!(report.corrupt_records, 0);
        // The log accepts appends after the cut, at the cut.
        let a = log.append_wait(batch(&[b"next".to_vec()])).unwrap();
        assert_eq!(a.first as usize, kept);
    }
}

#[test]
fn flipped_byte_is_quarantined_and_the_rest_stays_readable() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for trial in 0..30 {
        let dir = tempfile::tempdir().unwrap();
        let seg_path = dir.path().join(format!("{:020}.seg", 0));
        let mut firsts = Vec::new();
        {
            let (log, _) = Log::open(cfg(dir.path(), 1 << 20)).unwrap();
            for i in 0..10 {
                firsts.push(log.append_wait(batch(&[payload(i)])).unwrap().first);
            }
        }
        let mut bytes = std::fs::read(&seg_path).unwrap();
        // Flip a byte in a record that is not the last one (the last one's damage may look
        // like a torn tail and is then quarantined as such).
        let victim = rng.gen_range(0..9);
        let at = rng.gen_range(firsts[victim] as usize..firsts[victim + 1] as usize);
        bytes[at] ^= 1 << rng.gen_range(0..8);
        std::fs::write(&seg_path, &bytes).unwrap();
        let (log, report) = Log::open(cfg(dir.path(), 1 << 20)).unwrap();
        assert_eq!(report.corrupt_records, 1, "trial {trial}");
        assert_eq!(log.stats().quarantined_records, 1);
        let q = std::fs::read(&report.quarantine_files[0]).unwrap();
        let original_len = (firsts[victim + 1] - firsts[victim]) as usize;
        assert_eq!(
            q.len(),
            original_len,
            "the whole damaged record is set aside"
        );
        let records = read_all(&log, 0);
        let expected: Vec<_> = (0..10).filter(|&i| i != victim).map(payload).collect();
        let got: Vec<_> = records.iter().map(|r| r.payload.clone()).collect();
        assert_eq!(got, expected, "trial {trial}");
        drop(log);
        // Reopening again does not count it twice.
        let (_log, report) = Log::open(cfg(dir.path(), 1 << 20)).unwrap();
        assert_eq!(report.corrupt_records, 0);
        assert_eq!(report.records, 9);
    }
}

#[test]
fn group_commit_shares_fsyncs_under_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(cfg(dir.path(), 64 << 20)).unwrap();
    let log = Arc::new(log);
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut results = Vec::new();
                for i in 0..50 {
                    results.push(log.append_wait(batch(&[payload(t * 100 + i)])).unwrap());
                }
                results
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in threads {
        results.extend(t.join().unwrap());
    }
    // Each batch learns its group's durable end: past its own end when it shared the
    // fsync with later batches, never past what is durable.
    let end = log.durable_end();
    assert!(results
        .iter()
        .all(|a| a.end <= a.durable && a.durable <= end));
    assert!(results.iter().any(|a| a.durable > a.end));
    let s = log.stats();
    assert_eq!(s.appends, 800);
    assert_eq!(s.records, 800);
    assert!(
        s.fsyncs < s.appends,
        "fsyncs {} appends {}",
        s.fsyncs,
        s.appends
    );
    assert!(s.shared_fsyncs > 0);
}

#[test]
fn scan_dir_reads_without_changing_anything() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = Log::open(cfg(dir.path(), 200)).unwrap();
        for i in 0..12 {
            log.append_wait(batch(&[payload(i)])).unwrap();
        }
    }
    let seg = list_segments(&vfs::Real, dir.path())
        .unwrap()
        .pop()
        .unwrap()
        .1;
    recovery::append_raw(&seg, &[0xB1, 0, 0]);
    let before = std::fs::read(&seg).unwrap();
    let mut seen = Vec::new();
    scan_dir(
        dir.path(),
        |_, p| seen.push(p.to_vec()),
        |_, _| panic!("no damage"),
    )
    .unwrap();
    assert_eq!(seen, (0..12).map(payload).collect::<Vec<_>>());
    assert_eq!(std::fs::read(&seg).unwrap(), before);
}

// ---- property test against an in-memory model -----------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<Vec<u8>>),
    Read { consumer: usize, max: usize },
    Ack { consumer: usize },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => prop::collection::vec(prop::collection::vec(any::<u8>(), 0..120), 1..6).prop_map(Op::Append),
        3 => (0..2usize, 1..20usize).prop_map(|(consumer, max)| Op::Read { consumer, max }),
        2 => (0..2usize).prop_map(|consumer| Op::Ack { consumer }),
        1 => Just(Op::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
    #[test]
    fn log_matches_model(ops in prop::collection::vec(op(), 1..60), segment_bytes in 64u64..600) {
        let dir = tempfile::tempdir().unwrap();
        let names = ["r0", "r1"];
        // Model: every record ever appended; per consumer its read position and acked
        // position (as an index into the records).
        let mut model: Vec<(Position, Vec<u8>)> = Vec::new();
        let mut read_pos = [0usize; 2];
        let mut acked = [0usize; 2];
        let mut log = Some(Log::open(cfg(dir.path(), segment_bytes)).unwrap().0);
        for n in names { log.as_ref().unwrap().register_consumer(n).unwrap(); }
        for op in ops {
            let l = log.as_ref().unwrap();
            match op {
                Op::Append(ps) => {
                    let a = l.append_wait(batch(&ps)).unwrap();
                    let mut p = a.first;
                    for payload in ps {
                        let len = (HEADER_LEN + payload.len()) as u64;
                        model.push((p, payload));
                        p += len;
                    }
                    prop_assert_eq!(p, a.end);
                }
                Op::Read { consumer, max } => {
                    let from = if read_pos[consumer] < model.len() {
                        model[read_pos[consumer]].0
                    } else {
                        l.durable_end()
                    };
                    let b = l.read(from, max, usize::MAX).unwrap();
                    let expect: Vec<_> = model[read_pos[consumer]..].iter().take(max).cloned().collect();
                    let got: Vec<_> = b.records.iter().map(|r| (r.position, r.payload.to_vec())).collect();
                    prop_assert_eq!(got, expect);
                    read_pos[consumer] += b.records.len();
                }
                Op::Ack { consumer } => {
                    let upto = if read_pos[consumer] < model.len() {
                        model[read_pos[consumer]].0
                    } else {
                        l.durable_end()
                    };
                    l.ack(names[consumer], upto).unwrap();
                    acked[consumer] = read_pos[consumer];
                }
                Op::Restart => {
                    drop(log.take());
                    let (l2, report) = Log::open(cfg(dir.path(), segment_bytes)).unwrap();
                    prop_assert_eq!(report.torn_tail_bytes, 0);
                    prop_assert_eq!(report.corrupt_records, 0);
                    log = Some(l2);
                    // Readers resume from their acknowledged position.
                    read_pos = acked;
                }
            }
            // Invariants: everything not acknowledged by every consumer is readable, in
            // order, from the slowest consumer's cursor.
            let l = log.as_ref().unwrap();
            let slowest = acked[0].min(acked[1]);
            let from = if slowest < model.len() { model[slowest].0 } else { l.durable_end() };
            prop_assert!(l.start() <= from);
            let all = read_all(l, from);
            let got: Vec<_> = all.into_iter().map(|r| (r.position, r.payload.to_vec())).collect();
            prop_assert_eq!(&got[..], &model[slowest..]);
        }
    }
}

/// The I/O error shows once in a printed chain (`{:#}` walks `source()`): it is in the
/// message, and not a source as well.
#[test]
fn an_io_error_is_printed_once() {
    let e = crate::io_err("opening segment", std::path::Path::new("/x/0.seg"))(
        std::io::Error::from(std::io::ErrorKind::PermissionDenied),
    );
    let text = e.to_string();
    assert!(text.starts_with("opening segment /x/0.seg: "), "{text}");
    assert_eq!(text.matches("ermission denied").count(), 1, "{text}");
    assert!(std::error::Error::source(&e).is_none());
}

/// Waits (bounded) until the preparer has written a zero-filled next segment.
fn wait_for_prepared(dir: &Path, len: u64) {
    let path = dir.join(crate::prepare::PREPARED_NAME);
    for _ in 0..1000 {
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == len) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("no prepared segment after 5 s");
}

#[test]
fn a_roll_takes_the_prepared_segment_and_recovery_trims_its_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let seg = 8192;
    let len = crate::prepare::prepared_len(seg);
    let big = |i: usize| vec![b'a' + (i % 26) as u8; 5000];
    let mut appended = 0;
    {
        let (log, _) = Log::open(cfg(dir.path(), seg)).unwrap();
        // Every append rolls (two 5000-byte records pass the segment size). A roll takes
        // the prepared segment when it is ready; one that comes too early (the preparer
        // still syncing) creates an empty segment, and the next roll takes it.
        let mut adopted = 0;
        while adopted < 3 && appended < 40 {
            wait_for_prepared(dir.path(), len);
            log.append_wait(batch(&[big(appended), big(appended + 1)]))
                .unwrap();
            appended += 2;
            let segs = list_segments(&vfs::Real, dir.path()).unwrap();
            let (_, active) = segs.last().unwrap();
            if std::fs::metadata(active).unwrap().len() == len {
                adopted += 1;
            }
        }
        assert_eq!(adopted, 3, "prepared segments taken");
        // Sealed segments hold exactly their records.
        let segs = list_segments(&vfs::Real, dir.path()).unwrap();
        for (b, p) in &segs[..segs.len() - 1] {
            let n = std::fs::metadata(p).unwrap().len();
            assert!(n < len && n >= seg, "segment {b}: {n} bytes");
        }
        assert_eq!(read_all(&log, 0).len(), appended);
    }
    // Closed: the active segment is trimmed and no prepared file is left behind.
    assert!(!dir.path().join(crate::prepare::PREPARED_NAME).exists());
    let (log, report) = Log::open(cfg(dir.path(), seg)).unwrap();
    assert_eq!(report.records, appended as u64);
    assert_eq!(report.torn_tail_bytes, 0);
    let all = read_all(&log, 0);
    assert_eq!(all.len(), appended);
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.payload, big(i), "record {i}");
    }
}

#[test]
fn a_crash_leaves_a_prepared_file_that_the_next_open_deletes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = Log::open(cfg(dir.path(), 4096)).unwrap();
        log.append_wait(batch(&[b"kept".to_vec()])).unwrap();
        wait_for_prepared(dir.path(), crate::prepare::prepared_len(4096));
        // Keep a copy, as a crash would have left it.
        std::fs::copy(
            dir.path().join(crate::prepare::PREPARED_NAME),
            dir.path().join("copy"),
        )
        .unwrap();
    }
    std::fs::rename(
        dir.path().join("copy"),
        dir.path().join(crate::prepare::PREPARED_NAME),
    )
    .unwrap();
    let (log, report) = Log::open(LogConfig {
        preallocate: false,
        ..cfg(dir.path(), 4096)
    })
    .unwrap();
    assert_eq!(report.records, 1);
    assert!(!dir.path().join(crate::prepare::PREPARED_NAME).exists());
    assert_eq!(read_all(&log, 0)[0].payload, &b"kept"[..]);
}

#[test]
fn reads_sized_by_the_last_frames_seen_still_return_every_record_whole() {
    // Small frames teach the read a small chunk size; large ones that follow are longer
    // than the chunk, then small again: every read returns whole records in order.
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(cfg(dir.path(), 8 << 20)).unwrap();
    let sizes: Vec<usize> = (0..300)
        .map(|i| match i / 100 {
            1 => 20_000 + i,
            _ => 10 + i % 7,
        })
        .collect();
    let payloads: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| vec![(i % 251) as u8; n])
        .collect();
    for chunk in payloads.chunks(30) {
        log.append_wait(batch(chunk)).unwrap();
    }
    let mut pos = 0;
    let mut got = Vec::new();
    loop {
        let b = log.read(pos, 40, 4 << 20).unwrap();
        if b.records.is_empty() && b.next == pos {
            break;
        }
        assert!(b.records.len() <= 40);
        got.extend(b.records.into_iter().map(|r| r.payload));
        pos = b.next;
    }
    assert_eq!(got.len(), payloads.len());
    for (g, p) in got.iter().zip(&payloads) {
        assert_eq!(g, p);
    }
    // After the last (small) frames, the hint is small: a read of one record stays small.
    assert!(log.shared.frame_len_hint.load(Ordering::Relaxed) < 1024);
}

/// Finished ranges above a cursor survive a reopen; a cursor directory written by the
/// releases before them (the cursor alone, as text) opens as it is; a damaged ranges
/// file is ignored, never trusted; ranges past the durable end are refused.
#[test]
fn finished_ranges_survive_a_reopen_and_old_cursor_files_still_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut ends = Vec::new();
    {
        let (log, _) = Log::open(cfg(dir.path(), 300)).unwrap();
        log.register_consumer("dest.a").unwrap();
        log.register_consumer("old").unwrap();
        for i in 0..20 {
            let a = log.append_wait(batch(&[payload(i)])).unwrap();
            ends.push((a.first, a.end));
        }
        let done = vec![(ends[3].0, ends[5].1), (ends[9].0, ends[9].1)];
        log.ack_progress("dest.a", ends[1].0, &done).unwrap();
        assert!(matches!(
            log.ack_progress("dest.a", ends[1].0, &[(ends[19].0, ends[19].1 + 1)]),
            Err(LogError::AckBeyondEnd { .. })
        ));
        assert_eq!(log.progress("dest.a").unwrap().done, done);
        log.ack("old", ends[4].0).unwrap();
    }
    // "old" as the previous release wrote it: a text cursor, nothing else.
    let cursors = dir.path().join("cursors");
    assert_eq!(
        std::fs::read_to_string(cursors.join("old")).unwrap(),
        format!("{}\n", ends[4].0)
    );
    assert!(!cursors.join("old+done").exists(), "no ranges, no file");
    std::fs::write(cursors.join("legacy"), format!("{}\n", ends[2].1)).unwrap();
    {
        let (log, report) = Log::open(cfg(dir.path(), 300)).unwrap();
        assert_eq!(report.cursors_past_end, 0);
        let p = log.progress("dest.a").unwrap();
        assert_eq!(p.cursor, ends[1].0);
        assert_eq!(p.done, vec![(ends[3].0, ends[5].1), (ends[9].0, ends[9].1)]);
        assert_eq!(
            log.progress("old").unwrap(),
            ConsumerProgress {
                cursor: ends[4].0,
                done: vec![]
            }
        );
        assert_eq!(log.cursor("legacy"), Some(ends[2].1));
        // The cursor passes the first range: what is left of them above it is kept.
        log.ack("dest.a", ends[4].0).unwrap();
        assert_eq!(log.progress("dest.a").unwrap().done, vec![]);
    }
    {
        let (log, _) = Log::open(cfg(dir.path(), 300)).unwrap();
        // The ranges file still says what was finished above the new cursor: true.
        assert_eq!(
            log.progress("dest.a").unwrap(),
            ConsumerProgress {
                cursor: ends[4].0,
                done: vec![(ends[4].0, ends[5].1), (ends[9].0, ends[9].1)]
            }
        );
    }
    // A damaged ranges file is ignored: the cursor alone.
    let f = cursors.join("dest.a+done");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 6] ^= 1;
    std::fs::write(&f, bytes).unwrap();
    let (log, _) = Log::open(cfg(dir.path(), 300)).unwrap();
    assert_eq!(
        log.progress("dest.a").unwrap(),
        ConsumerProgress {
            cursor: ends[4].0,
            done: vec![]
        }
    );
    // Removing a consumer removes both of its files.
    log.remove_consumer("dest.a").unwrap();
    assert!(!f.exists() && !cursors.join("dest.a").exists());
}

/// A cursor past the end of what the log holds (records lost that it had made durable)
/// is brought back to the end and counted, so that new records are not skipped.
#[test]
fn a_cursor_past_the_end_is_brought_back_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = Log::open(cfg(dir.path(), 1 << 20)).unwrap();
        log.register_consumer("c").unwrap();
        log.append_wait(batch(&[payload(1)])).unwrap();
    }
    std::fs::write(dir.path().join("cursors/c"), "999999\n").unwrap();
    let (log, report) = Log::open(cfg(dir.path(), 1 << 20)).unwrap();
    assert_eq!(report.cursors_past_end, 1);
    let end = log.durable_end();
    assert_eq!(log.cursor("c"), Some(end));
    let a = log.append_wait(batch(&[payload(2)])).unwrap();
    assert_eq!(a.first, end, "the next record is read by the consumer");
}

/// Descriptors this process holds on files in `dir` (from `/proc/self/fd`).
fn fds_into(dir: &Path) -> usize {
    let dir = std::fs::canonicalize(dir).unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(&dir))
        .count()
}

/// A sealed segment holds no descriptor. A log of hundreds of segments (a
/// backlog nobody consumes) holds the active segment, the directory lock and at most
/// `read_handles` read handles, while it is written, read through, and reopened.
#[test]
fn hundreds_of_segments_hold_a_bounded_number_of_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 256,
        read_handles: 8,
        ..LogConfig::new(dir.path())
    };
    // The lock, the active segment, the cache, and a prepared segment being made.
    let bound = 8 + 4;
    let n = 2000;
    {
        let (log, _) = Log::open(config.clone()).unwrap();
        for chunk in (0..n).collect::<Vec<_>>().chunks(2) {
            let ps: Vec<_> = chunk.iter().map(|&i| payload(i)).collect();
            log.append_wait(batch(&ps)).unwrap();
        }
        let segments = log.stats().segments;
        assert!(segments >= 300, "{segments} segments");
        let held = fds_into(dir.path());
        assert!(held <= bound, "{held} descriptors for {segments} segments");
        let all = read_all(&log, 0);
        assert_eq!(all.len(), n);
        for (i, r) in all.iter().enumerate() {
            assert_eq!(r.payload, payload(i));
        }
        let held = fds_into(dir.path());
        assert!(held <= bound, "{held} descriptors after reading everything");
        let stats = log.stats();
        assert_eq!(stats.read_handles, 8);
        assert!(stats.segment_opens >= segments as u64 - 9, "{stats:?}");
    }
    let (log, report) = Log::open(config).unwrap();
    assert_eq!(report.records, n as u64);
    let held = fds_into(dir.path());
    assert!(held <= bound, "{held} descriptors after a reopen");
    let all = read_all(&log, 0);
    assert_eq!(all.len(), n);
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.payload, payload(i));
    }
    assert!(fds_into(dir.path()) <= bound);
    // Consuming deletes segments and closes their handles.
    log.register_consumer("c").unwrap();
    log.ack("c", log.durable_end()).unwrap();
    assert_eq!(log.stats().segments, 1);
    assert_eq!(log.stats().read_handles, 0);
    assert!(fds_into(dir.path()) <= 3);
}

/// The real file system, but opening a file for reading fails with EMFILE while `out`.
struct NoDescriptors {
    out: AtomicBool,
}

impl vfs::Vfs for NoDescriptors {
    fn open(&self, path: &Path, mode: vfs::Mode) -> std::io::Result<Arc<dyn vfs::VFile>> {
        if mode == vfs::Mode::Read && self.out.load(Ordering::Acquire) {
            return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
        }
        vfs::Real.open(path, mode)
    }
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        vfs::Real.read(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        vfs::Real.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        vfs::Real.remove_file(path)
    }
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        vfs::Real.create_dir_all(dir)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        vfs::Real.sync_dir(dir)
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<(String, bool)>> {
        vfs::Real.list(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        vfs::Real.exists(path)
    }
    fn free_bytes(&self, dir: &Path) -> std::io::Result<u64> {
        vfs::Real.free_bytes(dir)
    }
    fn lock(&self, path: &Path) -> std::io::Result<Option<vfs::DirLock>> {
        vfs::Real.lock(path)
    }
}

/// A read that cannot open a sealed segment for want of descriptors is `Unavailable`
/// (transient, nothing lost), returns what it read before that segment, and the same read
/// succeeds once descriptors are back.
#[test]
fn a_read_without_descriptors_is_unavailable_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(NoDescriptors {
        out: AtomicBool::new(false),
    });
    let config = LogConfig {
        segment_bytes: 256,
        read_handles: 2,
        ..LogConfig::new(dir.path())
    };
    let n = 100;
    {
        let (log, _) = Log::open_with(config.clone(), fs.clone()).unwrap();
        for chunk in (0..n).collect::<Vec<_>>().chunks(2) {
            let ps: Vec<_> = chunk.iter().map(|&i| payload(i)).collect();
            log.append_wait(batch(&ps)).unwrap();
        }
    }
    // Reopened: no sealed segment is open.
    let (log, _) = Log::open_with(config, fs.clone()).unwrap();
    assert!(log.stats().segments > 10);
    fs.out.store(true, Ordering::Release);
    match log.read(0, 1000, 1 << 20) {
        Err(LogError::Unavailable(m)) => assert!(m.contains("os error 24"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    fs.out.store(false, Ordering::Release);
    // The first segment is cached now; without descriptors a read returns it and stops
    // before the next one.
    let first = log.read(0, 1, 1 << 20).unwrap();
    assert_eq!(first.records.len(), 1);
    fs.out.store(true, Ordering::Release);
    let part = log.read(0, 1000, 1 << 20).unwrap();
    assert!(!part.records.is_empty() && part.records.len() < n);
    assert!(matches!(
        log.read(part.next, 1000, 1 << 20),
        Err(LogError::Unavailable(_))
    ));
    fs.out.store(false, Ordering::Release);
    let all = read_all(&log, 0);
    assert_eq!(all.len(), n);
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.payload, payload(i));
    }
}
