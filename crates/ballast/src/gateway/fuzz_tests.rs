//! Fuzzing of the ingest path that runs on stable Rust: property tests (proptest) over
//! decode → validate → enrich (`parse_body` + `build_batch`, what `Gateway::ingest` does
//! before it stores), and the checked-in corpus of nasty bodies in `tests/corpus/`.
//!
//! Every input must give either a batch whose every event is valid JSON, holds each of
//! the input's top-level values byte for byte (the last one of a repeated key) plus the
//! enrichment, and a meta block that agrees with the router's reading of it; or an error
//! and no batch at all. Never a panic. Case counts: `PROPTEST_CASES` (default below),
//! bounded so that the whole module runs in a few seconds in CI.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use serde::de::IgnoredAny;

use super::enrich::{Enrichment, Shallow};
use super::{build_batch, parse_body, ApiError};
use crate::store::EventBatch;

const E: Enrichment<'static> = Enrichment {
    received_at: "2026-11-29T08:00:00.000Z",
    request_ip: "10.0.0.1",
    route_type: None,
    header_anonymous_id: None,
};

/// The ingest path up to the store, as `Gateway::ingest` runs it with a known source.
fn ingest(body: &[u8], single: bool) -> Result<EventBatch, ApiError> {
    let e = Enrichment {
        route_type: single.then_some("track"),
        ..E
    };
    let parsed = parse_body(body, single, true)?;
    build_batch(&parsed, Arc::from("src"), &e, body.len())
}

/// The top-level fields of a JSON object as (name, raw value), last one per name; None
/// if `json` is not an object.
fn last_fields(json: &[u8]) -> Option<BTreeMap<String, String>> {
    match serde_json::from_slice::<Shallow>(json) {
        Ok(Shallow::Object(fields)) => Some(
            fields
                .into_iter()
                .map(|(k, v)| (k.0.into_owned(), v.get().to_string()))
                .collect(),
        ),
        _ => None,
    }
}

/// Checks what `ingest` made of `body`: see the module's doc.
fn check(body: &[u8], single: bool) -> Result<Option<usize>, TestCaseError> {
    let batch = match ingest(body, single) {
        Ok(b) => b,
        Err(_) => return Ok(None),
    };
    // The events as sent: the body itself, or the elements of its `batch` array.
    let sent: Vec<BTreeMap<String, String>> = if single {
        vec![last_fields(body).ok_or_else(|| TestCaseError::fail("accepted a non-object"))?]
    } else {
        let top = last_fields(body).ok_or_else(|| TestCaseError::fail("batch not an object"))?;
        let arr = top
            .get("batch")
            .ok_or_else(|| TestCaseError::fail("accepted without a batch"))?;
        let elements: Vec<&serde_json::value::RawValue> =
            serde_json::from_str(arr).map_err(|e| TestCaseError::fail(e.to_string()))?;
        elements
            .iter()
            .map(|r| last_fields(r.get().as_bytes()))
            .collect::<Option<_>>()
            .ok_or_else(|| TestCaseError::fail("accepted a non-object element"))?
    };
    prop_assert_eq!(batch.len(), sent.len());
    for ((json, meta), sent) in batch.events().zip(&sent) {
        // Valid JSON, fully (serde_json checks every byte of it).
        prop_assert!(serde_json::from_slice::<IgnoredAny>(json).is_ok());
        let stored = last_fields(json).ok_or_else(|| TestCaseError::fail("stored a non-object"))?;
        // One occurrence of each name: duplicates were resolved (last wins).
        let Ok(Shallow::Object(all)) = serde_json::from_slice::<Shallow>(json) else {
            return Err(TestCaseError::fail("stored a non-object"));
        };
        prop_assert_eq!(all.len(), stored.len(), "a name stored twice");
        for (k, v) in sent {
            match k.as_str() {
                "receivedAt" | "request_ip" | "messageId" | "type" | "anonymousId" => {}
                _ => prop_assert_eq!(stored.get(k), Some(v), "value of {} changed", k),
            }
        }
        prop_assert_eq!(
            stored.get("receivedAt").map(String::as_str),
            Some("\"2026-11-29T08:00:00.000Z\"")
        );
        prop_assert_eq!(
            stored.get("request_ip").map(String::as_str),
            Some("\"10.0.0.1\"")
        );
        prop_assert!(stored.contains_key("messageId"));
        for k in stored.keys() {
            let added = [
                "receivedAt",
                "request_ip",
                "messageId",
                "type",
                "anonymousId",
            ];
            prop_assert!(
                sent.contains_key(k) || added.contains(&k.as_str()),
                "{} appeared",
                k
            );
        }
        // The meta block says what the router would find in the stored JSON.
        let (key, mid) = crate::store::envelope::decode_meta(meta)
            .ok_or_else(|| TestCaseError::fail("no meta block"))?;
        let (k2, m2) = crate::event::identify(json);
        prop_assert_eq!((key, mid), (&*k2, &*m2));
        prop_assert!(!key.is_empty());
    }
    Ok(Some(batch.len()))
}

/// JSON-ish text: mostly well-formed events with nasty values, repeated and escaped
/// names, deep nesting, and now and then a damaged byte.
fn value(depth: u32) -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        Just("1e400".to_string()),
        Just("-0.0e-0".to_string()),
        "[0-9]{1,60}".prop_map(|d| d),
        Just("\"\\ud800\"".to_string()),
        Just("\"\\u0000\"".to_string()),
        Just("\"\\ud83d\\ude00 \u{1F600}\"".to_string()),
        "\\PC{0,12}".prop_map(|s| serde_json::to_string(&s).unwrap_or_default()),
        "[ -~]{0,8}".prop_map(|s| format!("\"{s}\"")),
    ];
    leaf.prop_recursive(depth, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((name(), inner), 0..5).prop_map(|v| {
                let f: Vec<String> = v.into_iter().map(|(k, v)| format!("{k}:{v}")).collect();
                format!("{{{}}}", f.join(","))
            }),
        ]
    })
    .boxed()
}

fn name() -> BoxedStrategy<String> {
    prop_oneof![
        Just("\"userId\"".to_string()),
        Just("\"anonymousId\"".to_string()),
        Just("\"messageId\"".to_string()),
        Just("\"type\"".to_string()),
        Just("\"receivedAt\"".to_string()),
        Just("\"writeKey\"".to_string()),
        Just("\"user\\u0049d\"".to_string()),
        Just("\"batch\"".to_string()),
        "[a-c]{1,2}".prop_map(|s| format!("\"{s}\"")),
        "\\PC{0,6}".prop_map(|s| serde_json::to_string(&s).unwrap_or_default()),
    ]
    .boxed()
}

fn event() -> BoxedStrategy<String> {
    prop::collection::vec((name(), value(4)), 0..10)
        .prop_map(|fields| {
            let f: Vec<String> = fields
                .into_iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect();
            format!("{{{}}}", f.join(","))
        })
        .boxed()
}

/// A body: one event, or a batch of them; sometimes with one byte damaged.
fn body() -> BoxedStrategy<(Vec<u8>, bool)> {
    let whole = prop_oneof![
        event().prop_map(|e| (e.into_bytes(), true)),
        prop::collection::vec(event(), 0..6).prop_map(|v| (
            format!("{{\"batch\":[{}]}}", v.join(",")).into_bytes(),
            false
        )),
    ];
    (whole, any::<Option<(prop::sample::Index, u8)>>())
        .prop_map(|((mut b, single), damage)| {
            if let Some((at, byte)) = damage {
                if !b.is_empty() {
                    let i = at.index(b.len());
                    b[i] = byte;
                }
            }
            (b, single)
        })
        .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Structured, nasty, sometimes damaged bodies.
    #[test]
    fn ingest_path_structured((b, single) in body()) {
        check(&b, single)?;
    }

    /// Arbitrary bytes, on both kinds of route.
    #[test]
    fn ingest_path_arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..512), single in any::<bool>()) {
        check(&b, single)?;
    }
}

/// Every file of `tests/corpus/` gets the answer `tests/corpus/EXPECT` names, and what is
/// accepted passes `check`.
#[test]
fn corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let expect = std::fs::read_to_string(dir.join("EXPECT")).expect("tests/corpus/EXPECT");
    let mut seen = 0;
    let mut failures = Vec::new();
    for line in expect.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (file, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        let (status, text) = match rest.split_once(char::is_whitespace) {
            Some((s, t)) => (s, t.trim()),
            None => (rest, ""),
        };
        let status: u16 = status.parse().unwrap_or_else(|_| panic!("EXPECT: {line}"));
        let raw = std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let single = file.ends_with(".single.json");
        let got = if file.ends_with(".gz") {
            super::body::gunzip(&raw, 4_096_000).and_then(|b| ingest(&b, single).map(|_| ()))
        } else {
            ingest(&raw, single).map(|_| ())
        };
        let (got_status, got_text) = match &got {
            Ok(()) => (200, ""),
            Err(e) => (e.status.as_u16(), e.body),
        };
        if got_status != status || (status != 200 && got_text != text) {
            failures.push(format!(
                "{file}: expected {status} {text:?}, got {got_status} {got_text:?}"
            ));
        }
        if got.is_ok() && !file.ends_with(".gz") {
            if let Err(e) = check(&raw, single) {
                failures.push(format!("{file}: {e}"));
            }
        }
        seen += 1;
    }
    let files = std::fs::read_dir(&dir).expect("corpus dir").count() - 1;
    assert_eq!(seen, files, "every corpus file is listed in EXPECT");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Too big to check in: generated.
#[test]
fn generated_nasty_bodies() {
    // 200,000 levels: refused before any parser recurses.
    let deep = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
    assert_eq!(
        ingest(deep.as_bytes(), false).err().map(|e| e.body),
        Some("json nested deeper than 100 levels")
    );
    // A 3 MB string of escapes: stored byte for byte.
    let big = format!(
        r#"{{"batch":[{{"userId":"u","s":"{}"}}]}}"#,
        "x\\n\\u00e9".repeat(300_000)
    );
    assert_eq!(check(big.as_bytes(), false).ok(), Some(Some(1)));
}
