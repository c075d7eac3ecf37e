//! Baseline 2: the "naive durable server".
//!
//! What a straightforward, correct implementation of the same contract looks
//! like: parse every body into a `serde_json::Value`, enrich each event
//! (`messageId` when missing, `receivedAt`), serialize it again, append the
//! lines to one file through a group-commit writer (one `fdatasync` per group
//! of concurrent requests), and answer `200 OK` only after the data is on
//! stable storage. System allocator, no zero-copy tricks.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use crate::server::{serve, text};

/// Same default request size limit as ballast (4000 KB).
const MAX_REQUEST_BYTES: usize = 4_096_000;

struct Submission {
    data: Vec<u8>,
    done: oneshot::Sender<Result<(), String>>,
}

/// Appends submissions to one file; a dedicated thread writes everything
/// pending, calls `fdatasync` once, then acknowledges the whole group.
pub struct GroupCommitWriter {
    tx: mpsc::Sender<Submission>,
    stats: Arc<WriterStats>,
}

/// Counters served on `GET /metrics`.
#[derive(Default)]
pub struct WriterStats {
    /// Successful `fdatasync` calls (one per group).
    pub fsyncs: AtomicU64,
    /// Submissions (requests) acknowledged as durable.
    pub requests: AtomicU64,
}

impl GroupCommitWriter {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(WriterStats::default());
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("naive-writer".into())
            .spawn(move || writer_loop(file, rx, &thread_stats))
            .context("spawning the writer thread")?;
        Ok(GroupCommitWriter { tx, stats })
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Resolves once `data` has been written and `fdatasync`ed.
    pub async fn append(&self, data: Vec<u8>) -> Result<(), String> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Submission { data, done })
            .map_err(|_| "writer stopped".to_string())?;
        wait.await.map_err(|_| "writer stopped".to_string())?
    }
}

fn writer_loop(mut file: File, rx: mpsc::Receiver<Submission>, stats: &WriterStats) {
    let mut pending = Vec::new();
    let mut buf = Vec::new();
    // After a failed write or fsync nothing is acknowledged any more.
    let mut failed: Option<String> = None;
    while let Ok(first) = rx.recv() {
        pending.push(first);
        while let Ok(more) = rx.try_recv() {
            pending.push(more);
        }
        let result = match &failed {
            Some(err) => Err(err.clone()),
            None => {
                buf.clear();
                for s in &pending {
                    buf.extend_from_slice(&s.data);
                }
                let res = file
                    .write_all(&buf)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| format!("cannot persist: {e}"));
                match &res {
                    Ok(()) => {
                        stats.fsyncs.fetch_add(1, Ordering::Relaxed);
                        stats
                            .requests
                            .fetch_add(pending.len() as u64, Ordering::Relaxed);
                    }
                    Err(err) => {
                        eprintln!("naive-server: {err}; refusing all further writes");
                        failed = Some(err.clone());
                    }
                }
                res
            }
        };
        for s in pending.drain(..) {
            let _ = s.done.send(result.clone());
        }
    }
}

/// Adds `messageId` (UUID v4) when missing or blank and sets `receivedAt`.
pub fn enrich_event(event: &mut Map<String, Value>, received_at: &str) {
    let has_id = matches!(event.get("messageId"), Some(Value::String(s)) if !s.trim().is_empty());
    if !has_id {
        event.insert(
            "messageId".into(),
            Value::String(uuid::Uuid::new_v4().to_string()),
        );
    }
    event.insert("receivedAt".into(), Value::String(received_at.to_owned()));
}

/// Turns a request body into newline-terminated enriched JSON lines.
/// Errors are the RudderStack error strings.
pub fn enrich_body(
    body: Value,
    is_batch: bool,
    received_at: &str,
) -> Result<Vec<u8>, &'static str> {
    let events = if is_batch {
        match body {
            Value::Object(mut obj) => match obj.remove("batch") {
                Some(Value::Array(items)) if items.is_empty() => return Err("empty batch payload"),
                Some(Value::Array(items)) => items,
                _ => return Err("invalid json"),
            },
            _ => return Err("invalid json"),
        }
    } else {
        vec![body]
    };
    let mut out = Vec::with_capacity(events.len() * 700);
    for event in events {
        let Value::Object(mut event) = event else {
            return Err("event is not a valid rudder event");
        };
        enrich_event(&mut event, received_at);
        serde_json::to_writer(&mut out, &event).map_err(|_| "invalid json")?;
        out.push(b'\n');
    }
    Ok(out)
}

async fn handle(req: Request<Incoming>, writer: Arc<GroupCommitWriter>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        if req.uri().path() == "/metrics" {
            let stats = writer.stats();
            return text(
                StatusCode::OK,
                format!(
                    "naive_fsyncs_total {}\nnaive_requests_total {}\n",
                    stats.fsyncs.load(Ordering::Relaxed),
                    stats.requests.load(Ordering::Relaxed)
                ),
            );
        }
        return text(StatusCode::OK, "OK");
    }
    let is_batch = req.uri().path() == "/v1/batch";
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request size exceeds max limit",
            )
        }
        Err(_) => return text(StatusCode::BAD_REQUEST, "could not read body"),
    };
    let Ok(value) = serde_json::from_slice::<Value>(&body) else {
        return text(StatusCode::BAD_REQUEST, "invalid json");
    };
    let received_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    let lines = match enrich_body(value, is_batch, &received_at) {
        Ok(lines) => lines,
        Err(msg) => return text(StatusCode::BAD_REQUEST, msg),
    };
    match writer.append(lines).await {
        Ok(()) => text(StatusCode::OK, "OK"),
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "cannot persist"),
    }
}

pub async fn run(listen: SocketAddr, file: &Path) -> anyhow::Result<()> {
    let writer = Arc::new(GroupCommitWriter::open(file)?);
    serve("naive-server", listen, move |req| {
        handle(req, writer.clone())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TS: &str = "2025-01-02T03:04:05.678Z";

    fn lines(out: &[u8]) -> Vec<Value> {
        out.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    #[test]
    fn keeps_existing_message_id_and_adds_received_at() {
        let body = json!({"type": "track", "messageId": "keep-me", "userId": "u1"});
        let out = lines(&enrich_body(body, false, TS).unwrap());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["messageId"], "keep-me");
        assert_eq!(out[0]["receivedAt"], TS);
        assert_eq!(out[0]["userId"], "u1");
    }

    #[test]
    fn adds_message_id_when_missing_or_blank() {
        let body = json!({"batch": [{"userId": "a"}, {"userId": "b", "messageId": "  "}]});
        let out = lines(&enrich_body(body, true, TS).unwrap());
        assert_eq!(out.len(), 2);
        for e in &out {
            let id = e["messageId"].as_str().unwrap();
            assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 4);
            assert_eq!(e["receivedAt"], TS);
        }
        assert_ne!(out[0]["messageId"], out[1]["messageId"]);
    }

    #[test]
    fn rejects_bad_batches() {
        assert_eq!(
            enrich_body(json!({"batch": []}), true, TS),
            Err("empty batch payload")
        );
        assert_eq!(
            enrich_body(json!({"batch": [1]}), true, TS),
            Err("event is not a valid rudder event")
        );
        assert_eq!(
            enrich_body(json!([1]), false, TS),
            Err("event is not a valid rudder event")
        );
    }

    #[tokio::test]
    async fn group_commit_writer_persists_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let writer = Arc::new(GroupCommitWriter::open(&path).unwrap());
        let mut tasks = Vec::new();
        for i in 0..50 {
            let w = writer.clone();
            tasks.push(tokio::spawn(async move {
                w.append(format!("{{\"n\":{i}}}\n").into_bytes()).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let content = std::fs::read_to_string(&path).unwrap();
        assert_eq!(content.lines().count(), 50);
        let stats = writer.stats();
        assert_eq!(stats.requests.load(Ordering::Relaxed), 50);
        let fsyncs = stats.fsyncs.load(Ordering::Relaxed);
        assert!((1..=50).contains(&fsyncs), "{fsyncs} fsyncs");
    }
}
