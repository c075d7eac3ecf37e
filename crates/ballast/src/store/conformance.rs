//! The behaviour every `Store` backend must show. Each backend's test module calls
//! `run_all` with a factory that opens a fresh (or reopens the same) store.

use std::future::Future;
use std::sync::Arc;

use super::{partition_base, partition_of, EventBatch, Progress, Store, StoreError};

/// Opens the backend's store for a given test directory/database; called again with the
/// same argument to simulate a restart.
pub trait Factory {
    type Fut: Future<Output = Box<dyn Store>>;
    fn open(&self, quota: u64) -> Self::Fut;
}

fn batch(source: &str, events: &[&str]) -> EventBatch {
    let mut b = EventBatch::new(Arc::from(source), 0);
    for e in events {
        b.push(e.as_bytes());
    }
    b
}

async fn read_all(store: &dyn Store, from: u64) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pos = from;
    loop {
        let r = store.read(pos, 3).await.unwrap();
        if r.events.is_empty() {
            return out;
        }
        for e in &r.events {
            out.push((
                e.source.to_string(),
                String::from_utf8(e.event.to_vec()).unwrap(),
            ));
        }
        pos = r.next;
    }
}

pub async fn appends_are_read_back_in_order<F: Factory>(f: &F) {
    let store = f.open(1 << 30).await;
    let a = store
        .append(batch("web", &[r#"{"n":1}"#, r#"{"n":2}"#]))
        .await
        .unwrap();
    assert_eq!(a.events, 2);
    let b = store.append(batch("app", &[r#"{"n":3}"#])).await.unwrap();
    assert!(b.first >= a.end);
    assert_eq!(*store.subscribe(0).borrow(), b.end);
    let all = read_all(&*store, 0).await;
    assert_eq!(
        all,
        vec![
            ("web".into(), r#"{"n":1}"#.into()),
            ("web".into(), r#"{"n":2}"#.into()),
            ("app".into(), r#"{"n":3}"#.into())
        ]
    );
    assert_eq!(read_all(&*store, b.first).await.len(), 1);
    store.close().await;
    drop(store);
    // Survives a restart.
    let store = f.open(1 << 30).await;
    assert_eq!(read_all(&*store, 0).await.len(), 3);
    store.close().await;
}

pub async fn cursors_persist<F: Factory>(f: &F) {
    let store = f.open(1 << 30).await;
    let start = store.register_consumer("dest-a", 0).await.unwrap();
    let a = store.append(batch("web", &[r#"{"n":1}"#])).await.unwrap();
    assert!(start.cursor <= a.first);
    store.ack("dest-a", &Progress::at(a.end)).await.unwrap();
    assert_eq!(store.cursor("dest-a", 0), Some(a.end));
    assert!(store.ack("nobody", &Progress::at(a.end)).await.is_err());
    store.close().await;
    drop(store);
    let store = f.open(1 << 30).await;
    assert_eq!(store.cursor("dest-a", 0), Some(a.end));
    assert_eq!(
        store.register_consumer("dest-a", 0).await.unwrap().cursor,
        a.end
    );
    store.close().await;
}

/// Events with an ordering key (a meta block) are spread over the partitions by it: each
/// partition reads back its users' events, every event once, each user's in order.
pub async fn partitions_keep_each_users_order<F: Factory>(f: &F) {
    let store = f.open(1 << 30).await;
    let partitions = store.partitions();
    assert!(partitions >= 1);
    let mut sent: Vec<(String, u32)> = Vec::new();
    for round in 0..6u32 {
        let mut b = EventBatch::new(Arc::from("web"), 0);
        for u in 0..9u32 {
            let user = format!("user-{u}");
            let mid = format!("{user}-{round}");
            b.push_with::<()>(|json, meta| {
                json.extend_from_slice(format!(r#"{{"userId":"{user}","n":{round}}}"#).as_bytes());
                super::envelope::encode_meta(meta, "u:", &user, &mid);
                Ok(())
            })
            .unwrap();
            sent.push((user, round));
        }
        assert_eq!(store.append(b).await.unwrap().events, 9);
    }
    let mut got: Vec<(String, u32)> = Vec::new();
    for p in 0..partitions {
        let mut pos = partition_base(p);
        let mut last = None;
        loop {
            let r = store.read(pos, 4).await.unwrap();
            if r.events.is_empty() {
                break;
            }
            for e in &r.events {
                assert_eq!(partition_of(e.position), p);
                assert!(last.is_none_or(|l| e.position > l), "positions increase");
                last = Some(e.position);
                let (key, _) = e.ident.clone().unwrap();
                assert_eq!(super::partition_for_key(key.as_bytes(), partitions), p);
                let v: serde_json::Value = serde_json::from_slice(&e.event).unwrap();
                got.push((
                    v["userId"].as_str().unwrap().to_string(),
                    v["n"].as_u64().unwrap() as u32,
                ));
            }
            pos = r.next;
        }
        assert!(
            *store.subscribe(p).borrow() >= partition_base(p),
            "a partition's end is in its range"
        );
    }
    assert_eq!(got.len(), sent.len(), "every event once");
    for u in 0..9u32 {
        let user = format!("user-{u}");
        let rounds: Vec<u32> = got
            .iter()
            .filter(|(w, _)| *w == user)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(rounds, (0..6).collect::<Vec<_>>(), "{user}'s order");
    }
    store.close().await;
}

/// An acknowledgement with finished ranges above the cursor: the cursor and the ranges
/// are kept exactly, across a reopen (a restart skips them instead of re-sending them).
pub async fn progress_is_kept<F: Factory>(f: &F) {
    let store = f.open(1 << 30).await;
    store.register_consumer("dest", 0).await.unwrap();
    let mut ends = Vec::new();
    for n in 0..6 {
        let a = store
            .append(batch("web", &[&format!(r#"{{"n":{n}}}"#)]))
            .await
            .unwrap();
        ends.push((a.first, a.end));
    }
    let progress = Progress {
        cursor: ends[1].0,
        done: vec![(ends[2].0, ends[3].1), (ends[5].0, ends[5].1)],
    };
    store.ack("dest", &progress).await.unwrap();
    store.close().await;
    drop(store);
    let store = f.open(1 << 30).await;
    let back = store.register_consumer("dest", 0).await.unwrap();
    assert_eq!(back, progress, "the finished ranges survive a reopen");
    // The cursor never moves back.
    store
        .ack("dest", &Progress::at(ends[0].0))
        .await
        .unwrap_or(());
    assert_eq!(store.cursor("dest", 0), Some(progress.cursor));
    store.close().await;
}

pub async fn quota_refuses_and_keeps_what_is_stored<F: Factory>(f: &F) {
    let store = f.open(4096).await;
    let event = format!(r#"{{"pad":"{}"}}"#, "x".repeat(300));
    let mut stored = 0;
    let mut refused = 0;
    for _ in 0..40 {
        match store.append(batch("web", &[&event])).await {
            Ok(_) => stored += 1,
            Err(StoreError::QuotaExceeded) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(stored > 0 && refused > 0);
    let st = store.status();
    assert!(st.full() || st.bytes_used + 300 > st.quota_bytes);
    assert_eq!(read_all(&*store, 0).await.len(), stored);
    store.close().await;
}

/// One step of the model test.
#[derive(Debug, Clone)]
pub enum Op {
    /// Appends this many events (1..) from source `web` or `app`.
    Append(usize, bool),
    /// Reads everything from the start in chunks of this size and compares with the model.
    ReadAll(usize),
    /// Acknowledges consumer `dest` up to just after the n-th stored event (modulo).
    Ack(usize),
    /// Closes and reopens the store.
    Restart,
}

pub fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (1usize..6, any::<bool>()).prop_map(|(n, b)| Op::Append(n, b)),
        2 => (1usize..7).prop_map(Op::ReadAll),
        2 => (0usize..40).prop_map(Op::Ack),
        1 => Just(Op::Restart),
    ]
}

/// Runs `ops` against the store and an in-memory model (the events in order): reads
/// return exactly the model's events, in order, with increasing positions; `end` and
/// `subscribe` follow appends; a cursor is what was acknowledged, across restarts. A
/// second consumer that never acknowledges keeps everything readable.
pub async fn matches_the_model<F: Factory>(f: &F, ops: &[Op]) {
    let mut store = f.open(1 << 30).await;
    store.register_consumer("keeper", 0).await.unwrap();
    store.register_consumer("dest", 0).await.unwrap();
    let mut model: Vec<(String, String)> = Vec::new();
    let mut cursor = store.cursor("dest", 0);
    let mut n = 0usize;
    for op in ops {
        match op {
            Op::Append(count, app) => {
                let source = if *app { "app" } else { "web" };
                let events: Vec<String> = (0..*count)
                    .map(|_| {
                        n += 1;
                        format!(r#"{{"n":{n}}}"#)
                    })
                    .collect();
                let refs: Vec<&str> = events.iter().map(String::as_str).collect();
                let a = store.append(batch(source, &refs)).await.unwrap();
                assert_eq!(a.events, *count);
                assert!(a.end > a.first);
                assert!(*store.subscribe(0).borrow() >= a.end);
                assert!(store.status().end >= a.end);
                model.extend(events.into_iter().map(|e| (source.to_string(), e)));
            }
            Op::ReadAll(chunk) => {
                let mut got = Vec::new();
                let mut pos = 0;
                let mut last: Option<u64> = None;
                loop {
                    let r = store.read(pos, *chunk).await.unwrap();
                    if r.events.is_empty() {
                        break;
                    }
                    assert!(r.events.len() <= *chunk);
                    for e in &r.events {
                        assert!(last.is_none_or(|l| e.position > l), "positions increase");
                        last = Some(e.position);
                        got.push((
                            e.source.to_string(),
                            String::from_utf8(e.event.to_vec()).unwrap(),
                        ));
                    }
                    assert!(r.next > pos);
                    pos = r.next;
                }
                assert_eq!(got, model);
            }
            Op::Ack(k) => {
                if model.is_empty() {
                    continue;
                }
                let k = k % model.len();
                // The position just after the k-th event.
                let mut pos = 0;
                let mut seen = 0;
                let upto = loop {
                    let r = store.read(pos, 1).await.unwrap();
                    assert!(!r.events.is_empty(), "the k-th event");
                    if seen == k {
                        break r.next;
                    }
                    seen += 1;
                    // Positions are opaque (byte offsets in the embedded log): read on
                    // from where the store says.
                    pos = r.next;
                };
                store.ack("dest", &Progress::at(upto)).await.unwrap();
                let want = cursor.map_or(upto, |c| c.max(upto));
                assert_eq!(store.cursor("dest", 0), Some(want));
                cursor = Some(want);
            }
            Op::Restart => {
                store.close().await;
                drop(store);
                store = f.open(1 << 30).await;
                assert_eq!(store.cursor("dest", 0), cursor, "the cursor survives");
            }
        }
    }
    store.close().await;
}

pub async fn run_all<F: Factory>(fresh: impl Fn() -> F) {
    appends_are_read_back_in_order(&fresh()).await;
    cursors_persist(&fresh()).await;
    quota_refuses_and_keeps_what_is_stored(&fresh()).await;
    partitions_keep_each_users_order(&fresh()).await;
    progress_is_kept(&fresh()).await;
}

mod embedded {
    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use std::path::PathBuf;
    use std::pin::Pin;

    struct Embedded {
        dir: PathBuf,
        _tmp: Arc<tempfile::TempDir>,
    }

    impl Factory for Embedded {
        type Fut = Pin<Box<dyn Future<Output = Box<dyn Store>>>>;
        fn open(&self, quota: u64) -> Self::Fut {
            let dir = self.dir.clone();
            Box::pin(async move {
                let (s, _) = EmbeddedStore::open(&dir, 4096, quota, true).unwrap();
                Box::new(s) as Box<dyn Store>
            })
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        #[test]
        fn embedded_store_matches_the_model(ops in proptest::collection::vec(op(), 1..30)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let tmp = tempfile::tempdir().unwrap();
            let f = Embedded { dir: tmp.path().join("log"), _tmp: Arc::new(tmp) };
            rt.block_on(matches_the_model(&f, &ops));
        }
    }

    #[tokio::test]
    async fn embedded_store_conforms() {
        run_all(|| {
            let tmp = tempfile::tempdir().unwrap();
            Embedded {
                dir: tmp.path().join("log"),
                _tmp: Arc::new(tmp),
            }
        })
        .await;
    }
}

mod postgres {
    use super::*;
    use crate::pgtest::PgCluster;
    use crate::store::postgres::PgStore;
    use std::pin::Pin;

    /// One database of the shared test cluster; reopening it is a restart.
    struct Postgres {
        url: String,
    }

    impl Factory for Postgres {
        type Fut = Pin<Box<dyn Future<Output = Box<dyn Store>>>>;
        fn open(&self, quota: u64) -> Self::Fut {
            let url = self.url.clone();
            Box::pin(async move {
                let s = PgStore::open(&url, quota, 4).await.unwrap();
                Box::new(s) as Box<dyn Store>
            })
        }
    }

    /// The model test against PostgreSQL: one cluster, a fresh database per case.
    #[test]
    fn postgres_store_matches_the_model() {
        use proptest::test_runner::{Config, TestRunner};
        let cluster = PgCluster::start();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let case = std::cell::Cell::new(0usize);
        let mut runner = TestRunner::new(Config::with_cases(12));
        runner
            .run(&proptest::collection::vec(op(), 1..30), |ops| {
                case.set(case.get() + 1);
                let db = format!("model_{}", case.get());
                rt.block_on(async {
                    cluster.create_db(&db).await;
                    matches_the_model(
                        &Postgres {
                            url: cluster.url(&db),
                        },
                        &ops,
                    )
                    .await;
                });
                Ok(())
            })
            .unwrap();
    }

    #[tokio::test]
    async fn postgres_store_conforms() {
        let cluster = PgCluster::start();
        let n = std::sync::atomic::AtomicUsize::new(0);
        let mut dbs = Vec::new();
        for i in 0..5 {
            let db = format!("conformance_{i}");
            cluster.create_db(&db).await;
            dbs.push(cluster.url(&db));
        }
        run_all(|| Postgres {
            url: dbs[n.fetch_add(1, std::sync::atomic::Ordering::SeqCst)].clone(),
        })
        .await;
    }
}
