//! A minimal HTTP client for the admin API.

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub async fn get(base: &str, path: &str, token: Option<&str>) -> anyhow::Result<Vec<u8>> {
    call(hyper::Method::GET, base, path, token, None).await
}

pub async fn post(base: &str, path: &str, token: Option<&str>) -> anyhow::Result<Vec<u8>> {
    call(hyper::Method::POST, base, path, token, None).await
}

pub async fn post_json(
    base: &str,
    path: &str,
    token: Option<&str>,
    body: serde_json::Value,
) -> anyhow::Result<Vec<u8>> {
    call(hyper::Method::POST, base, path, token, Some(body)).await
}

async fn call(
    method: hyper::Method,
    base: &str,
    path: &str,
    token: Option<&str>,
    json: Option<serde_json::Value>,
) -> anyhow::Result<Vec<u8>> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = hyper::Request::builder().method(method).uri(&url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = match json {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Bytes::from(serde_json::to_vec(&v)?)
        }
        None => Bytes::new(),
    };
    let req = req.body(Full::new(body)).context("building request")?;
    let resp = tokio::time::timeout(std::time::Duration::from_secs(10), client.request(req))
        .await
        .with_context(|| format!("{url}: timed out"))?
        .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("reading answer")?
        .to_bytes();
    if !status.is_success() {
        anyhow::bail!("{url}: {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(body.to_vec())
}
