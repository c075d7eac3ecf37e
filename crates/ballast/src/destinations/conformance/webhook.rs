//! `webhook` against an HTTP receiver on loopback that records what it answers 2xx to.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::Target;
use crate::destinations::registry::TypeConfig;
use crate::destinations::webhook::WebhookConfig;
use crate::destinations::Destination;

struct Receiver {
    url: String,
    status: Arc<AtomicU16>,
    got: Arc<Mutex<Vec<String>>>,
}

async fn start() -> Receiver {
    let status = Arc::new(AtomicU16::new(200));
    let got = Arc::new(Mutex::new(Vec::new()));
    let (s, g) = (status.clone(), got.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: bytes::Bytes| {
            let (s, g) = (s.clone(), g.clone());
            async move {
                let code = s.load(Ordering::SeqCst);
                if (200..300).contains(&code) {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    let items = match v {
                        serde_json::Value::Array(items) => items,
                        one => vec![one],
                    };
                    let mut g = g.lock().unwrap_or_else(|p| p.into_inner());
                    for e in items {
                        g.push(e["messageId"].as_str().unwrap_or_default().to_string());
                    }
                }
                axum::http::StatusCode::from_u16(code)
                    .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Receiver {
        url: format!("http://{addr}/hook"),
        status,
        got,
    }
}

#[async_trait]
impl Target for Receiver {
    async fn sink(&self) -> Arc<dyn Destination> {
        let c = WebhookConfig {
            url: self.url.clone(),
            method: "POST".into(),
            headers: Default::default(),
            timeout: Duration::from_secs(5),
        };
        c.check().unwrap();
        TypeConfig::build(&c).unwrap()
    }

    async fn stored(&self) -> Vec<String> {
        self.got.lock().unwrap().clone()
    }

    async fn break_temporarily(&self) -> bool {
        self.status.store(503, Ordering::SeqCst);
        true
    }

    async fn refuse(&self) -> bool {
        self.status.store(400, Ordering::SeqCst);
        true
    }

    async fn heal(&self) {
        self.status.store(200, Ordering::SeqCst);
    }

    fn deduplicates(&self) -> bool {
        false
    }
}

#[tokio::test]
async fn webhook_conforms() {
    let r = start().await;
    super::run(&r).await;
}
