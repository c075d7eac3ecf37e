//! The programmable HTTP receiver: records every request (method, path, headers, body,
//! events) and answers each by a rule (a status, 429 + `Retry-After`, a delay, a hang).
//! Runs axum on its own runtime thread on 127.0.0.1; stops when dropped.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::mid;

/// An axum app served on 127.0.0.1 from its own runtime thread; stops when dropped. The
/// receivers of the tests (this one, the alert mocks, the browser test's static site)
/// all run on it.
pub struct Background {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    /// Serves `app` on `listener` (bound, any mode).
    pub fn serve(listener: std::net::TcpListener, app: axum::Router) -> Background {
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("bound listener").port();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                tokio::select! {
                    _ = async { let _ = axum::serve(listener, app).await; } => {}
                    _ = rx => {}
                }
            });
            rt.shutdown_background();
        });
        Background {
            port,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Serves `app` on a free loopback port.
    pub fn start(app: axum::Router) -> Background {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        Background::serve(listener, app)
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the receiver answers to one request.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    Status(u16),
    /// The status with `Retry-After: <secs>`.
    RetryAfter(u16, u64),
    /// The status with `Retry-After: <text>` (an HTTP date, garbage, ...).
    RetryAfterText(u16, &'static str),
    /// Waits, then answers the status (keep it below the webhook's timeout).
    Delay(Duration, u16),
    /// Waits, then answers 503; meant to outlast the webhook's timeout (recorded as 0).
    Hang(Duration),
    /// The status (a 3xx) with `Location: http://127.0.0.1:<port>/redirected`.
    Redirect(u16, u16),
    /// The status with a body of this many bytes, made as it is sent (64 KiB pieces of
    /// `x`), never held whole in memory.
    HugeBody(u16, u64),
}

/// One request as the rule sees it.
pub struct Hit<'a> {
    /// The request's path.
    pub path: &'a str,
    pub events: &'a [Value],
    /// How many requests (this one included) carried the same first messageId.
    pub attempt: usize,
}

impl Hit<'_> {
    pub fn mid(&self) -> &str {
        self.events.first().map(mid).unwrap_or("")
    }
}

pub type Rule = Arc<dyn Fn(&Hit) -> Reply + Send + Sync>;

pub fn rule(f: impl Fn(&Hit) -> Reply + Send + Sync + 'static) -> Rule {
    Arc::new(f)
}

pub fn always(status: u16) -> Rule {
    rule(move |_| Reply::Status(status))
}

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: Value,
    /// The body's events: the body itself, or the elements of an array body.
    pub events: Vec<Value>,
    /// The status answered (0: the request was left hanging).
    pub status: u16,
}

#[derive(Default)]
pub struct Log {
    requests: Vec<Received>,
    /// Events in requests answered 200.
    ok: usize,
    seen: HashMap<String, usize>,
}

pub struct Shared {
    log: Mutex<Log>,
    rule: Mutex<Rule>,
}

pub struct Receiver {
    shared: Arc<Shared>,
    server: Background,
}

pub async fn handle(
    axum::extract::State(s): axum::extract::State<Arc<Shared>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let body: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    let events = match &body {
        Value::Array(items) => items.clone(),
        other => vec![other.clone()],
    };
    let rule = s.rule.lock().unwrap().clone();
    let reply = {
        let mut log = s.log.lock().unwrap();
        let key = events.first().map(mid).unwrap_or("").to_string();
        let attempt = {
            let n = log.seen.entry(key).or_insert(0);
            *n += 1;
            *n
        };
        let reply = rule(&Hit {
            path: uri.path(),
            events: &events,
            attempt,
        });
        let status = match reply {
            Reply::Status(s)
            | Reply::RetryAfter(s, _)
            | Reply::RetryAfterText(s, _)
            | Reply::Delay(_, s)
            | Reply::Redirect(s, _)
            | Reply::HugeBody(s, _) => s,
            Reply::Hang(_) => 0,
        };
        if status == 200 {
            log.ok += events.len();
        }
        log.requests.push(Received {
            at: Instant::now(),
            method: method.to_string(),
            path: uri.path().to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body,
            events,
            status,
        });
        reply
    };
    let code = |s: u16| axum::http::StatusCode::from_u16(s).unwrap();
    let text = |s: u16| match s {
        200..=299 => "ok",
        400 => "bad event",
        500 => "boom",
        _ => "unavailable",
    };
    match reply {
        Reply::Status(s) => (code(s), text(s)).into_response(),
        Reply::RetryAfter(s, secs) => (
            code(s),
            [(axum::http::header::RETRY_AFTER, secs.to_string())],
            text(s),
        )
            .into_response(),
        Reply::RetryAfterText(s, text) => (
            code(s),
            [(axum::http::header::RETRY_AFTER, text)],
            "unavailable",
        )
            .into_response(),
        Reply::Delay(d, s) => {
            tokio::time::sleep(d).await;
            (code(s), text(s)).into_response()
        }
        Reply::Hang(d) => {
            tokio::time::sleep(d).await;
            (code(503), "hung").into_response()
        }
        Reply::Redirect(s, port) => (
            code(s),
            [(
                axum::http::header::LOCATION,
                format!("http://127.0.0.1:{port}/redirected"),
            )],
            "moved",
        )
            .into_response(),
        Reply::HugeBody(s, len) => {
            static PIECE: [u8; 64 << 10] = [b'x'; 64 << 10];
            let pieces = futures::stream::unfold(len, |left| async move {
                if left == 0 {
                    return None;
                }
                let n = left.min(PIECE.len() as u64);
                let piece = bytes::Bytes::from_static(&PIECE[..n as usize]);
                Some((Ok::<_, std::convert::Infallible>(piece), left - n))
            });
            (code(s), axum::body::Body::from_stream(pieces)).into_response()
        }
    }
}

impl Receiver {
    pub fn start(rule: Rule) -> Receiver {
        Receiver::start_on(0, rule)
    }

    /// Listens on 127.0.0.1:`port` (0: any free port), retrying the bind for a while.
    pub fn start_on(port: u16, rule: Rule) -> Receiver {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match std::net::TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "binding port {port}: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        let shared = Arc::new(Shared {
            log: Mutex::new(Log::default()),
            rule: Mutex::new(rule),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        Receiver {
            shared,
            server: Background::serve(listener, app),
        }
    }

    pub fn url(&self) -> String {
        url_for(self.port())
    }

    /// `http://127.0.0.1:<port>`, for a URL with a path of one's own.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    pub fn set_rule(&self, rule: Rule) {
        *self.shared.rule.lock().unwrap() = rule;
    }

    pub fn requests(&self) -> Vec<Received> {
        self.shared.log.lock().unwrap().requests.clone()
    }

    /// The events of the requests answered 200, in arrival order.
    pub fn ok_events(&self) -> Vec<Value> {
        self.shared
            .log
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.status == 200)
            .flat_map(|r| r.events.iter().cloned())
            .collect()
    }

    /// The messageIds answered 200.
    pub fn ok_ids(&self) -> HashSet<String> {
        self.ok_events()
            .iter()
            .map(|e| mid(e).to_string())
            .collect()
    }

    /// How many events were answered 200 (duplicates included).
    pub fn ok_count(&self) -> usize {
        self.shared.log.lock().unwrap().ok
    }

    /// How many distinct messageIds were answered 200.
    pub fn ok_distinct(&self) -> usize {
        let log = self.shared.log.lock().unwrap();
        log.requests
            .iter()
            .filter(|r| r.status == 200)
            .flat_map(|r| r.events.iter().map(mid))
            .collect::<HashSet<_>>()
            .len()
    }

    /// True once every messageId in `ids` was answered 200.
    pub fn has_all(&self, ids: &HashSet<String>) -> bool {
        let log = self.shared.log.lock().unwrap();
        let got: HashSet<&str> = log
            .requests
            .iter()
            .filter(|r| r.status == 200)
            .flat_map(|r| r.events.iter().map(mid))
            .collect();
        ids.iter().all(|i| got.contains(i.as_str()))
    }

    /// How many requests carried this messageId (any answer).
    pub fn attempts_of(&self, id: &str) -> Vec<Received> {
        self.requests()
            .into_iter()
            .filter(|r| r.events.iter().any(|e| mid(e) == id))
            .collect()
    }
}

pub fn url_for(port: u16) -> String {
    format!("http://127.0.0.1:{port}/ingest")
}
