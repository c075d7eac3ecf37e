//! Pixel calls: `GET /pixel/v1/track|page?writeKey=…&…`. The query becomes the event
//! (dotted keys nest: `context.page.path=/x`), and the answer is always a 1×1 GIF, as
//! RudderStack's gateway does: an image tag cannot act on an error.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use super::{Gateway, Ingest};

/// A transparent 1×1 GIF.
pub const GIF: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

fn gif() -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "image/gif"),
            (header::CACHE_CONTROL, "no-cache, no-store, must-revalidate"),
        ],
        GIF,
    )
        .into_response()
}

/// Sets `a.b.c = value` in `obj`, creating objects on the way.
fn set_dotted(obj: &mut Map<String, Value>, key: &str, value: Value) {
    let mut parts = key.split('.').peekable();
    let mut cur = obj;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            cur.insert(part.to_string(), value);
            return;
        }
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        match entry {
            Value::Object(m) => cur = m,
            _ => return,
        }
    }
}

/// Builds the event of a pixel call from its query parameters (the first value of each).
pub fn event_from_query(kind: &str, query: &str, now: &str) -> Result<Value, &'static str> {
    let mut params: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        params
            .entry(k.into_owned())
            .or_insert_with(|| v.into_owned());
    }
    params.remove("writeKey");
    let mut obj = Map::new();
    obj.insert("channel".into(), Value::from("web"));
    obj.insert("integrations".into(), serde_json::json!({"All": true}));
    obj.insert("originalTimestamp".into(), Value::from(now));
    obj.insert("sentAt".into(), Value::from(now));
    for (k, v) in params {
        let v = if k == "anonymousId" {
            // Some pixels quote it.
            v.strip_prefix('"')
                .and_then(|s| s.strip_suffix('"'))
                .map(str::to_string)
                .unwrap_or(v)
        } else {
            v
        };
        set_dotted(&mut obj, &k, Value::from(v));
    }
    match kind {
        "page" => {
            if let Some(Value::String(name)) = obj.get("name") {
                if name.is_empty() {
                    obj.insert("name".into(), Value::from("Unknown Page"));
                }
            }
        }
        "track" => match obj.get("event") {
            Some(Value::String(e)) if !e.is_empty() => {}
            _ => return Err("track pixel without an event name"),
        },
        _ => {}
    }
    Ok(Value::Object(obj))
}

pub async fn pixel(
    State(gw): State<Arc<Gateway>>,
    Path(kind): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let route_type: &'static str = match kind.as_str() {
        "track" => "track",
        "page" => "page",
        _ => return (StatusCode::NOT_FOUND, "404 page not found").into_response(),
    };
    let query = query.unwrap_or_default();
    let key = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "writeKey")
        .map(|(_, v)| v.into_owned())
        .filter(|k| !k.is_empty());
    let Some(key) = key else {
        // RudderStack answers the GIF even then; nothing is stored.
        return gif();
    };
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let event = match event_from_query(route_type, &query, &now) {
        Ok(e) => e,
        Err(reason) => {
            tracing::debug!(reason, "pixel request not stored");
            return gif();
        }
    };
    let body = event.to_string();
    let result = gw
        .ingest(Ingest {
            headers: &headers,
            peer,
            key: Some(&key),
            source: None,
            route_type: Some(route_type),
            body: body.as_bytes(),
        })
        .await;
    let stored = gw.finish(result.map_err(IntoResponse::into_response), "pixel");
    if stored.status() != StatusCode::OK {
        tracing::debug!(status = %stored.status(), "pixel request not stored");
    }
    gif()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_becomes_event() {
        let v = event_from_query(
            "track",
            "writeKey=k&event=Signed%20Up&anonymousId=%22a1%22&context.page.path=/x&properties.plan=pro",
            "T",
        )
        .unwrap();
        assert_eq!(v["event"], "Signed Up");
        assert_eq!(v["anonymousId"], "a1");
        assert_eq!(v["context"]["page"]["path"], "/x");
        assert_eq!(v["properties"]["plan"], "pro");
        assert_eq!(v["channel"], "web");
        assert!(v.get("writeKey").is_none());
        assert!(event_from_query("track", "anonymousId=a", "T").is_err());
        let p = event_from_query("page", "anonymousId=a&name=", "T").unwrap();
        assert_eq!(p["name"], "Unknown Page");
    }
}
