//! Crash safety: clients send events while the server is killed with SIGKILL at random
//! moments and restarted; every event that got `200 OK` must be in the log afterwards,
//! exactly as it was acknowledged.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use common::{Server, WRITE_KEY};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const KILLS: usize = 12;
const CLIENTS: usize = 16;

fn event(client: usize, n: u64) -> Value {
    json!({
        "type": "track",
        "event": "Crash Test",
        "userId": format!("user-{client}"),
        "messageId": format!("c{client}-{n}"),
        "properties": {"client": client, "n": n, "text": "x".repeat((n % 200) as usize), "ü": "✓"},
        "context": {"library": {"name": "crash-test"}}
    })
}

#[test]
fn no_acknowledged_event_is_lost_across_kill_9() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = common::config("");
    let mut server = Server::start_in(dir.clone(), &config, &[]);
    let base = Arc::new(RwLock::new(server.base.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<Value>>> = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(120);

    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (base, stop, acked, refused) =
                (base.clone(), stop.clone(), acked.clone(), refused.clone());
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .no_proxy()
                    .build()
                    .unwrap();
                let mut n = 0u64;
                // Bounded: by the stop flag, by count and by time.
                while !stop.load(Ordering::Relaxed) && n < 200_000 && Instant::now() < deadline {
                    let url = base.read().unwrap().clone();
                    // Every 4th request is a batch of 5.
                    let (path, body, events) = if n % 4 == 3 {
                        let evs: Vec<Value> = (0..5).map(|i| event(c, n + i)).collect();
                        n += 5;
                        ("/v1/batch", json!({ "batch": evs }), evs)
                    } else {
                        let e = event(c, n);
                        n += 1;
                        ("/v1/track", e.clone(), vec![e])
                    };
                    match http
                        .post(format!("{url}{path}"))
                        .basic_auth(WRITE_KEY, Some(""))
                        .json(&body)
                        .send()
                    {
                        Ok(r) if r.status() == 200 => {
                            acked.lock().unwrap().extend(events);
                        }
                        _ => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
            })
        })
        .collect();

    let mut rng = rand::rngs::StdRng::seed_from_u64(0xBA11A57);
    let mut acked_at_kill = Vec::new();
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(rng.gen_range(150..600)));
        acked_at_kill.push(acked.lock().unwrap().len());
        server.kill9();
        server = Server::start_in(dir.clone(), &config, &[]);
        *base.write().unwrap() = server.base.clone();
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert!(server.terminate().success());

    let acked = acked.lock().unwrap();
    let stored = common::dump(&dir.path().join("data"));
    let mut by_id: HashMap<String, &Value> = HashMap::new();
    for e in &stored {
        let id = e["messageId"].as_str().unwrap().to_string();
        by_id.entry(id).or_insert(e);
    }
    let mut lost = Vec::new();
    for sent in acked.iter() {
        let id = sent["messageId"].as_str().unwrap();
        match by_id.get(id) {
            None => lost.push(id.to_string()),
            Some(got) => {
                for (k, v) in sent.as_object().unwrap() {
                    assert_eq!(&got[k], v, "field {k} of {id} differs");
                }
            }
        }
    }
    let unacked_stored = stored.len().saturating_sub(acked.len());
    eprintln!(
        "crash test: {KILLS} kills, {} events acknowledged, {} stored ({} stored without an acknowledgement: in flight at a kill), {} requests refused or failed; acknowledged before each kill: {:?}",
        acked.len(),
        stored.len(),
        unacked_stored,
        refused.load(Ordering::Relaxed),
        acked_at_kill
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged events lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(
        acked_at_kill.windows(2).filter(|w| w[1] > w[0]).count() >= KILLS - 2,
        "events were acknowledged between kills: {acked_at_kill:?}"
    );
}
