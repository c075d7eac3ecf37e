//! Realistic RudderStack `track` events and pre-generated request bodies.
//!
//! Bodies are generated once, before the timed phase, as templates. Each time a
//! body is sent its `messageId`s are overwritten in place with fresh UUIDs (a
//! 36-byte copy per event), so every event on the wire has a unique
//! `messageId` while the cost of generating JSON is not measured.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Number of distinct user ids events are drawn from, unless `--users` says otherwise.
pub const USER_POOL: u32 = 10_000;

const MESSAGE_ID_KEY: &[u8] = b"\"messageId\":\"";
const UUID_LEN: usize = 36;

const EVENT_NAMES: &[&str] = &[
    "Product Viewed",
    "Product Added",
    "Checkout Started",
    "Order Completed",
    "Cart Viewed",
    "Product List Filtered",
    "Promotion Clicked",
    "Signed Up",
];

const CATEGORIES: &[&str] = &["Audio", "Books", "Kitchen", "Outdoors", "Toys", "Apparel"];

const PRODUCT_NAMES: &[&str] = &[
    "Headphones",
    "Trail Shoes",
    "Skillet",
    "Keyboard",
    "Lantern",
    "Box Set",
];

const OSES: &[(&str, &str)] = &[
    ("Mac OS X", "14.4"),
    ("Windows", "10.0"),
    ("Android", "14"),
    ("iOS", "17.4"),
    ("Linux", "6.5"),
];

const USER_AGENTS: &[&str] = &[
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Firefox/125.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) Mobile/15E148",
    "Dalvik/2.1.0 (Linux; U; Android 14; Pixel 8)",
];

const LOCALES: &[&str] = &["en-US", "en-GB", "de-DE", "fr-FR", "es-ES", "pt-BR"];

const REFERRERS: &[&str] = &["https://google.com/", "https://bing.com/", "$direct"];

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.gen_range(0..items.len())]
}

fn uuid_with(rng: &mut StdRng) -> String {
    uuid::Builder::from_random_bytes(rng.gen())
        .into_uuid()
        .to_string()
}

/// One realistic RudderStack `track` event (about 700 bytes as compact JSON), from one
/// of `users` distinct user ids (`user-00000` … ; at least one).
pub fn track_event(rng: &mut StdRng, now: SystemTime, users: u32) -> Value {
    let user = rng.gen_range(0..users.max(1));
    let sku = rng.gen_range(10_000..100_000u32);
    let product = *pick(rng, PRODUCT_NAMES);
    let (os_name, os_version) = *pick(rng, OSES);
    let original = now - Duration::from_millis(rng.gen_range(0..5_000));
    let price = f64::from(rng.gen_range(199..49_999u32)) / 100.0;
    json!({
        "type": "track",
        "event": pick(rng, EVENT_NAMES),
        "userId": format!("user-{user:05}"),
        "anonymousId": uuid_with(rng),
        "messageId": uuid_with(rng),
        "originalTimestamp": humantime::format_rfc3339_millis(original).to_string(),
        "sentAt": humantime::format_rfc3339_millis(now).to_string(),
        "properties": {
            "sku": format!("P-{sku}"),
            "name": product,
            "category": pick(rng, CATEGORIES),
            "price": price,
            "quantity": rng.gen_range(1..5u32),
            "currency": "USD",
            "in_stock": rng.gen_bool(0.9),
            "position": rng.gen_range(1..40u32),
        },
        "context": {
            "library": { "name": "rudder-js", "version": "3.7.1" },
            "os": { "name": os_name, "version": os_version },
            "page": {
                "path": format!("/p/{sku}"),
                "url": format!("https://example.com/p/{sku}"),
                "title": product,
                "referrer": pick(rng, REFERRERS),
            },
            "ip": format!("203.0.113.{}", rng.gen_range(1..255u32)),
            "userAgent": pick(rng, USER_AGENTS),
            "locale": pick(rng, LOCALES),
        },
    })
}

/// A request body whose `messageId` values can be refreshed cheaply.
#[derive(Debug, Clone)]
pub struct BodyTemplate {
    bytes: Vec<u8>,
    /// Byte offsets of the 36-character `messageId` values.
    id_offsets: Vec<usize>,
}

impl BodyTemplate {
    fn new(bytes: Vec<u8>) -> Self {
        let id_offsets = bytes
            .windows(MESSAGE_ID_KEY.len())
            .enumerate()
            .filter(|(_, w)| *w == MESSAGE_ID_KEY)
            .map(|(i, _)| i + MESSAGE_ID_KEY.len())
            .filter(|&off| bytes.get(off + UUID_LEN) == Some(&b'"'))
            .collect();
        BodyTemplate { bytes, id_offsets }
    }

    /// Number of events in this body.
    pub fn events(&self) -> usize {
        self.id_offsets.len()
    }

    /// A copy of the body with a fresh UUID v4 as every `messageId`.
    pub fn render(&self) -> Bytes {
        let mut out = self.bytes.clone();
        for &off in &self.id_offsets {
            uuid::Uuid::new_v4()
                .as_hyphenated()
                .encode_lower(&mut out[off..off + UUID_LEN]);
        }
        Bytes::from(out)
    }

    /// The template bytes as generated.
    #[cfg(test)]
    pub fn raw(&self) -> &[u8] {
        &self.bytes
    }
}

/// Pre-generates `count` bodies: single events, or `{"batch":[...]}` of
/// `batch_size` events when `batch_size` is `Some`; events come from `users` user ids.
pub fn generate_pool(
    count: usize,
    batch_size: Option<usize>,
    seed: u64,
    users: u32,
) -> Vec<BodyTemplate> {
    let mut rng = StdRng::seed_from_u64(seed);
    let now = SystemTime::now();
    (0..count.max(1))
        .map(|_| {
            let body = match batch_size {
                None => track_event(&mut rng, now, users),
                Some(n) => {
                    let batch: Vec<Value> = (0..n.max(1))
                        .map(|_| track_event(&mut rng, now, users))
                        .collect();
                    json!({ "batch": batch })
                }
            };
            // Serializing a `Value` cannot fail: all map keys are strings.
            BodyTemplate::new(serde_json::to_vec(&body).unwrap_or_default())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_events_are_about_700_bytes_with_required_fields() {
        let pool = generate_pool(500, None, 7, USER_POOL);
        let total: usize = pool.iter().map(|t| t.raw().len()).sum();
        let avg = total / pool.len();
        assert!((620..=730).contains(&avg), "average event size {avg}");
        for t in &pool {
            assert_eq!(t.events(), 1);
            let v: Value = serde_json::from_slice(&t.render()).unwrap();
            assert_eq!(v["type"], "track");
            for key in [
                "event",
                "userId",
                "anonymousId",
                "messageId",
                "originalTimestamp",
                "sentAt",
            ] {
                assert!(v[key].is_string(), "{key} missing");
            }
            assert_eq!(v["properties"].as_object().unwrap().len(), 8);
            let ctx = &v["context"];
            for key in ["library", "os", "page"] {
                assert!(ctx[key].is_object(), "context.{key} missing");
            }
            for key in ["path", "url", "title", "referrer"] {
                assert!(ctx["page"][key].is_string(), "context.page.{key} missing");
            }
            for key in ["ip", "userAgent", "locale"] {
                assert!(ctx[key].is_string(), "context.{key} missing");
            }
            let ts = v["sentAt"].as_str().unwrap();
            assert!(humantime::parse_rfc3339(ts).is_ok(), "bad timestamp {ts}");
        }
    }

    #[test]
    fn users_bounds_the_distinct_user_ids() {
        for (users, want) in [(1, 1), (3, 3)] {
            let pool = generate_pool(20, Some(50), 3, users);
            let ids: std::collections::HashSet<String> = pool
                .iter()
                .flat_map(|t| {
                    let v: Value = serde_json::from_slice(&t.render()).unwrap();
                    v["batch"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|e| e["userId"].as_str().unwrap().to_owned())
                        .collect::<Vec<_>>()
                })
                .collect();
            assert_eq!(ids.len(), want, "{ids:?}");
        }
    }

    #[test]
    fn render_gives_fresh_unique_message_ids() {
        let pool = generate_pool(2, Some(100), 1, USER_POOL);
        let mut seen = std::collections::HashSet::new();
        for t in &pool {
            assert_eq!(t.events(), 100);
            for _ in 0..3 {
                let v: Value = serde_json::from_slice(&t.render()).unwrap();
                let batch = v["batch"].as_array().unwrap();
                assert_eq!(batch.len(), 100);
                for e in batch {
                    let id = e["messageId"].as_str().unwrap();
                    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 4);
                    assert!(seen.insert(id.to_owned()), "duplicate messageId {id}");
                }
            }
        }
    }
}
