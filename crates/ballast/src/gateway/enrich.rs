//! Validation and enrichment of events without building a JSON tree.
//!
//! An event is read *shallowly*: its top-level keys, each with its value kept as the raw
//! JSON text (serde_json still checks all of it). The enriched event is written by copying
//! every original key and raw value, except the ones ballast sets, then appending those.
//! Nothing else in the event changes, not even the spacing inside values.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

pub use crate::event::{Key, Shallow};

/// The body of a batch call.
#[derive(Debug, Deserialize)]
pub struct BatchBody<'a> {
    #[serde(borrow, default)]
    pub batch: Option<Vec<Shallow<'a>>>,
    #[serde(rename = "writeKey", borrow, default)]
    pub write_key: Option<Cow<'a, str>>,
}

/// Why an event was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum EventError {
    NotAnObject,
    NoIdentity,
}

/// What enrichment adds, the same for every event of a request.
pub struct Enrichment<'a> {
    /// RFC 3339 with milliseconds.
    pub received_at: &'a str,
    pub request_ip: &'a str,
    /// `type` from the route, for single-event calls.
    pub route_type: Option<&'a str>,
    /// The `AnonymousId` request header, used when the event has no anonymousId.
    pub header_anonymous_id: Option<&'a str>,
}

/// The text of an identity field when it counts as present: a non-blank string
/// (decoded), or any other value but null as its JSON text (numbers are common user ids).
/// A string that does not decode to Unicode (a lone surrogate escape, `"\ud800"`, which
/// JSON's grammar allows) is present too, as its JSON text: RudderStack's gateway accepts
/// it. The router's ordering key uses the same rule (`event::identify`).
fn text(v: &RawValue) -> Option<Cow<'_, str>> {
    let raw = v.get();
    match raw.as_bytes().first() {
        Some(b'"') => {
            let s = match serde_json::from_str::<&str>(raw) {
                Ok(s) => Cow::Borrowed(s),
                // Escapes need an owned string.
                Err(_) => match serde_json::from_str::<String>(raw) {
                    Ok(s) => Cow::Owned(s),
                    Err(_) => Cow::Borrowed(raw),
                },
            };
            (!s.trim().is_empty()).then_some(s)
        }
        Some(b'n') => None, // null
        Some(_) => Some(Cow::Borrowed(raw)),
        None => None,
    }
}

fn write_key_json(out: &mut Vec<u8>, key: &Key<'_>) {
    match &key.0 {
        // Borrowed means the key had no escapes: its text is exactly the original.
        Cow::Borrowed(k) => {
            out.push(b'"');
            out.extend_from_slice(k.as_bytes());
            out.push(b'"');
        }
        Cow::Owned(k) => write_str_json(out, k),
    }
}

fn write_str_json(out: &mut Vec<u8>, s: &str) {
    // Writing a str to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Which fields a later field of the same (decoded) name overrides; None when no name is
/// repeated (the usual case, without allocating a map for small events).
fn shadowed(fields: &[(Key<'_>, &RawValue)]) -> Option<Vec<bool>> {
    let n = fields.len();
    let mut out: Option<Vec<bool>> = None;
    if n <= 32 {
        for i in 0..n {
            if fields[i + 1..].iter().any(|(k, _)| k.0 == fields[i].0 .0) {
                out.get_or_insert_with(|| vec![false; n])[i] = true;
            }
        }
    } else {
        let mut seen = std::collections::HashSet::with_capacity(n);
        for i in (0..n).rev() {
            if !seen.insert(&*fields[i].0 .0) {
                out.get_or_insert_with(|| vec![false; n])[i] = true;
            }
        }
    }
    out
}

/// Checks one event, writes its enriched JSON to `out` and its meta block (ordering key
/// and messageId, see `store::envelope::encode_meta`) to `meta`.
///
/// Duplicate top-level keys: the last value wins, as in RudderStack's gateway (which reads
/// each event into a Go map and writes the map out again). It is the one judged (userId,
/// anonymousId, messageId) and the only one stored and forwarded; earlier occurrences
/// are dropped. Values are copied byte for byte (nested objects are not rewritten).
pub fn enrich(
    fields: &[(Key<'_>, &RawValue)],
    e: &Enrichment<'_>,
    out: &mut Vec<u8>,
    meta: &mut Vec<u8>,
) -> Result<(), EventError> {
    // With duplicate keys the last value counts: judge that one (and store only it).
    let shadow = shadowed(fields);
    let mut user = None;
    let mut anon = None;
    let mut message_id = None;
    for (k, v) in fields {
        match &*k.0 {
            "userId" => user = Some(*v),
            "anonymousId" => anon = Some(*v),
            "messageId" => message_id = Some(*v),
            _ => {}
        }
    }
    let user_text = user.and_then(text);
    let anon_text = anon.and_then(text);
    let message_id_text = message_id.and_then(text);
    let has_user = user_text.is_some();
    let has_anon = anon_text.is_some();
    let has_message_id = message_id_text.is_some();
    let anon_from_header = match e.header_anonymous_id {
        Some(h) if !has_anon && !h.trim().is_empty() => Some(h),
        _ => None,
    };
    if !has_user && !has_anon && anon_from_header.is_none() {
        return Err(EventError::NoIdentity);
    }

    out.push(b'{');
    let mut first = true;
    let mut sep = |out: &mut Vec<u8>| {
        if !first {
            out.push(b',');
        }
        first = false;
    };
    for (i, (k, v)) in fields.iter().enumerate() {
        if shadow.as_ref().is_some_and(|s| s[i]) {
            continue;
        }
        let replaced = match &*k.0 {
            "receivedAt" | "request_ip" => true,
            "messageId" => !has_message_id,
            "type" => e.route_type.is_some(),
            "anonymousId" => anon_from_header.is_some(),
            _ => false,
        };
        if replaced {
            continue;
        }
        sep(out);
        write_key_json(out, k);
        out.push(b':');
        out.extend_from_slice(v.get().as_bytes());
    }
    let mut uuid_buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let generated = if has_message_id {
        None
    } else {
        let id: &str = uuid::Uuid::new_v4()
            .hyphenated()
            .encode_lower(&mut uuid_buf);
        sep(out);
        out.extend_from_slice(b"\"messageId\":\"");
        out.extend_from_slice(id.as_bytes());
        out.push(b'"');
        Some(id.to_string())
    };
    if let Some(anon) = anon_from_header {
        sep(out);
        out.extend_from_slice(b"\"anonymousId\":");
        write_str_json(out, anon);
    }
    if let Some(t) = e.route_type {
        sep(out);
        out.extend_from_slice(b"\"type\":");
        write_str_json(out, t);
    }
    sep(out);
    out.extend_from_slice(b"\"receivedAt\":\"");
    out.extend_from_slice(e.received_at.as_bytes());
    out.extend_from_slice(b"\",\"request_ip\":");
    write_str_json(out, e.request_ip);
    out.push(b'}');
    let (prefix, key) = match (&user_text, &anon_text, anon_from_header) {
        (Some(u), _, _) => ("u:", &**u),
        (None, Some(a), _) => ("a:", &**a),
        (None, None, Some(h)) => ("a:", h),
        (None, None, None) => ("", ""),
    };
    let mid = match (&message_id_text, &generated) {
        (Some(m), _) => &**m,
        (None, Some(g)) => g.as_str(),
        (None, None) => "",
    };
    crate::store::envelope::encode_meta(meta, prefix, key, mid);
    Ok(())
}

/// How deep arrays and objects may nest in a request body (the body's own object or
/// array is level 1). Deeper bodies get 400: consumers with recursive parsers crash on
/// them. Below serde_json's default limit of 128, with room for the envelopes events are
/// forwarded in (a webhook batch array, `log dump`'s line).
pub const MAX_DEPTH: usize = 100;

/// True when arrays and objects in `body` nest deeper than `max` (counted outside
/// strings; the JSON need not be valid).
///
/// Runs on every request body before it is parsed, so it skips the inside of strings
/// (most of an event's bytes) with `memchr`: about 4x faster than a byte-by-byte walk,
/// which cost more than serde_json's own parse of a 100-event batch.
pub fn nested_deeper_than(body: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0usize;
    while let Some(&b) = body.get(i) {
        match b {
            b'"' => {
                // To the closing quote: the next quote or backslash, skipping escapes.
                i += 1;
                loop {
                    let Some(off) = body
                        .get(i..)
                        .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
                    else {
                        return false; // an unterminated string: nothing after it counts
                    };
                    i += off;
                    if body.get(i) == Some(&b'"') {
                        break;
                    }
                    i += 2; // a backslash and the byte it escapes
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn run(input: &str, e: &Enrichment<'_>) -> Result<Value, EventError> {
        let Shallow::Object(fields) = serde_json::from_str::<Shallow>(input).unwrap() else {
            return Err(EventError::NotAnObject);
        };
        let mut out = Vec::new();
        let mut meta = Vec::new();
        enrich(&fields, e, &mut out, &mut meta)?;
        // The meta block names what the router would find in the JSON.
        let (key, mid) = crate::store::envelope::decode_meta(&meta).expect("meta written");
        let (k2, m2) = crate::event::identify(&out);
        assert_eq!((key, mid), (&*k2, &*m2), "meta matches the event");
        Ok(serde_json::from_slice(&out).expect("output is valid JSON"))
    }

    const E: Enrichment<'static> = Enrichment {
        received_at: "2026-11-26T10:00:00.123Z",
        request_ip: "10.1.2.3",
        route_type: None,
        header_anonymous_id: None,
    };

    #[test]
    fn adds_fields_and_keeps_the_rest() {
        let v = run(
            r#"{"userId":"u1","event":"x","properties":{"a":[1,2,{"b":null}]}}"#,
            &E,
        )
        .unwrap();
        assert_eq!(v["userId"], "u1");
        assert_eq!(v["properties"], json!({"a":[1,2,{"b":null}]}));
        assert_eq!(v["receivedAt"], "2026-11-26T10:00:00.123Z");
        assert_eq!(v["request_ip"], "10.1.2.3");
        let id = v["messageId"].as_str().unwrap();
        assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 4);
        assert!(v.get("type").is_none());
    }

    #[test]
    fn message_id_kept_unless_blank() {
        let v = run(r#"{"userId":"u","messageId":"m-1"}"#, &E).unwrap();
        assert_eq!(v["messageId"], "m-1");
        for blank in [r#""""#, r#""  ""#, "null"] {
            let v = run(&format!(r#"{{"userId":"u","messageId":{blank}}}"#), &E).unwrap();
            assert_eq!(v["messageId"].as_str().unwrap().len(), 36, "{blank}");
        }
    }

    #[test]
    fn identity_rules() {
        assert_eq!(run(r#"{"event":"x"}"#, &E), Err(EventError::NoIdentity));
        assert_eq!(
            run(r#"{"userId":"  ","anonymousId":null}"#, &E),
            Err(EventError::NoIdentity)
        );
        assert!(run(r#"{"userId":42}"#, &E).is_ok());
        assert!(run(r#"{"anonymousId":"a"}"#, &E).is_ok());
        // Duplicate keys: the last one counts, as for any JSON reader.
        assert_eq!(
            run(r#"{"userId":"u","userId":""}"#, &E),
            Err(EventError::NoIdentity)
        );
        let v = run(r#"{"userId":"u","messageId":"m","messageId":""}"#, &E).unwrap();
        assert_eq!(v["messageId"].as_str().unwrap().len(), 36);
        let h = Enrichment {
            header_anonymous_id: Some("from-header"),
            ..E
        };
        let v = run(r#"{"event":"x"}"#, &h).unwrap();
        assert_eq!(v["anonymousId"], "from-header");
        let v = run(r#"{"anonymousId":"body"}"#, &h).unwrap();
        assert_eq!(v["anonymousId"], "body", "the header is only a fallback");
        let v = run(r#"{"anonymousId":"","userId":"u"}"#, &h).unwrap();
        assert_eq!(v["anonymousId"], "from-header");
    }

    /// A lone surrogate escape is valid JSON grammar but no Unicode: such a userId is
    /// still an identity (RudderStack accepts it), keyed by its JSON text in the meta
    /// block and by the router alike, and the event's bytes are kept as sent.
    #[test]
    fn an_identity_with_a_lone_surrogate_counts() {
        for (input, want_key) in [
            (r#"{"userId":"\ud800","event":"x"}"#, r#"u:"\ud800""#),
            (r#"{"anonymousId":"a\udc00b"}"#, r#"a:"a\udc00b""#),
        ] {
            let Shallow::Object(fields) = serde_json::from_str::<Shallow>(input).unwrap() else {
                panic!("an object");
            };
            let (mut out, mut meta) = (Vec::new(), Vec::new());
            enrich(&fields, &E, &mut out, &mut meta).unwrap();
            let (key, _) = crate::store::envelope::decode_meta(&meta).expect("meta written");
            assert_eq!(key, want_key);
            assert_eq!(
                &*crate::event::identify(&out).0,
                want_key,
                "the router agrees"
            );
            let text = String::from_utf8(out).unwrap();
            let field = input.split(',').next().unwrap().trim_start_matches('{');
            assert!(text.contains(field.trim_end_matches('}')), "{text}");
        }
    }

    #[test]
    fn duplicate_keys_keep_only_the_last_value() {
        let fields_of = |input: &str| -> Vec<(String, String)> {
            let Shallow::Object(fields) = serde_json::from_str::<Shallow>(input).unwrap() else {
                panic!("not an object")
            };
            let mut out = Vec::new();
            let mut meta = Vec::new();
            enrich(&fields, &E, &mut out, &mut meta).unwrap();
            let text = String::from_utf8(out).unwrap();
            let Shallow::Object(stored) = serde_json::from_str::<Shallow>(&text).unwrap() else {
                panic!("not an object")
            };
            stored
                .iter()
                .map(|(k, v)| (k.0.to_string(), v.get().to_string()))
                .collect()
        };
        let stored = fields_of(
            r#"{"userId":"a","event":"x","userId":"b","p":{"k":1,"k":2},"event":  "y" }"#,
        );
        let names: Vec<&str> = stored.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "userId",
                "p",
                "event",
                "messageId",
                "receivedAt",
                "request_ip"
            ]
        );
        assert_eq!(stored[0].1, r#""b""#);
        // Nested objects are copied byte for byte, duplicates included.
        assert_eq!(stored[1].1, r#"{"k":1,"k":2}"#);
        assert_eq!(stored[2].1, r#""y""#);
        // Escaped spellings of one name are one key.
        let stored = fields_of(r#"{"user\u0049d":"a","userId":"b","x":1}"#);
        assert_eq!(stored[0], ("userId".into(), r#""b""#.into()));
        assert_eq!(stored.iter().filter(|(k, _)| k == "userId").count(), 1);
        // Many keys (the map path).
        let mut many: Vec<String> = (0..100).map(|i| format!(r#""k{i}":{i}"#)).collect();
        many.push(r#""k7":"last""#.into());
        many.push(r#""userId":"u""#.into());
        let stored = fields_of(&format!("{{{}}}", many.join(",")));
        let k7: Vec<_> = stored.iter().filter(|(k, _)| k == "k7").collect();
        assert_eq!(k7, [&("k7".to_string(), r#""last""#.to_string())]);
        assert_eq!(stored.len(), 100 + 1 + 3);
    }

    #[test]
    fn route_type_and_server_fields_override() {
        let r = Enrichment {
            route_type: Some("identify"),
            ..E
        };
        let v = run(
            r#"{"userId":"u","type":"track","receivedAt":"old","request_ip":"1.1.1.1"}"#,
            &r,
        )
        .unwrap();
        assert_eq!(v["type"], "identify");
        assert_eq!(v["receivedAt"], E.received_at);
        assert_eq!(v["request_ip"], "10.1.2.3");
        let text = serde_json::to_string(&v).unwrap();
        assert_eq!(text.matches("\"type\"").count(), 1);
    }

    #[test]
    fn escaped_keys_and_values_survive() {
        let v = run(r#"{"user\u0049d":"u","a\"b":"c\n\u00e9"}"#, &E).unwrap();
        assert_eq!(v["userId"], "u");
        assert_eq!(v["a\"b"], "c\né");
    }

    #[test]
    fn not_objects() {
        for s in ["1", "\"s\"", "[1,{}]", "null", "true"] {
            assert!(matches!(
                serde_json::from_str::<Shallow>(s).unwrap(),
                Shallow::NotObject
            ));
        }
        let b: BatchBody = serde_json::from_str(r#"{"batch":[{"a":1},2],"writeKey":"k"}"#).unwrap();
        let batch = b.batch.unwrap();
        assert!(matches!(batch[0], Shallow::Object(_)));
        assert!(matches!(batch[1], Shallow::NotObject));
        assert_eq!(b.write_key.as_deref(), Some("k"));
    }

    proptest! {
        /// Any JSON object with an identity comes out as the same object plus exactly the
        /// enrichment fields.
        #[test]
        fn enrichment_changes_nothing_else(
            extra in prop::collection::btree_map("[a-zA-Z_\"\\\\é]{1,8}", any::<i32>().prop_map(|n| json!(n)), 0..8),
            s in "\\PC{0,20}",
        ) {
            let mut obj = serde_json::Map::new();
            for (k, v) in &extra {
                if ["messageId", "receivedAt", "request_ip", "type", "userId", "anonymousId"].contains(&k.as_str()) { continue; }
                obj.insert(k.clone(), v.clone());
            }
            obj.insert("userId".into(), json!("user"));
            obj.insert("text".into(), json!(s));
            obj.insert("messageId".into(), json!("mid"));
            let input = serde_json::to_string(&Value::Object(obj.clone())).unwrap();
            let out = run(&input, &E).unwrap();
            let mut expect = obj;
            expect.insert("receivedAt".into(), json!(E.received_at));
            expect.insert("request_ip".into(), json!(E.request_ip));
            prop_assert_eq!(out, Value::Object(expect));
        }
    }

    /// The byte-by-byte walk the fast scan replaced: the reference it must agree with.
    fn nested_deeper_than_reference(body: &[u8], max: usize) -> bool {
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for &b in body {
            if in_string {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => {
                    depth += 1;
                    if depth > max {
                        return true;
                    }
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        false
    }

    proptest! {
        #[test]
        fn nesting_scan_agrees_with_the_byte_walk(
            bytes in proptest::collection::vec(
                proptest::sample::select(b"{}[]\"\\\\ax,:".to_vec()),
                0..200,
            ),
            max in 0usize..8,
        ) {
            prop_assert_eq!(
                nested_deeper_than(&bytes, max),
                nested_deeper_than_reference(&bytes, max)
            );
        }
    }

    #[test]
    fn nesting_scan_edge_cases_agree_with_the_byte_walk() {
        for s in [
            r#"{"a":"\\"}[[["#,
            r#""unterminated [[[["#,
            r#"{"a":"x\"#,
            "[[[[[",
            r#"{"k\\":[[{"x":"\\\"[["}]]}"#,
            "\"\\",
            "\"",
        ] {
            for max in 0..6 {
                assert_eq!(
                    nested_deeper_than(s.as_bytes(), max),
                    nested_deeper_than_reference(s.as_bytes(), max),
                    "{s} {max}"
                );
            }
        }
    }

    #[test]
    fn nesting_depth() {
        assert!(super::super::TOO_DEEP
            .body
            .contains(&format!(" {MAX_DEPTH} ")));
        assert!(!nested_deeper_than(br#"{"a":[1,{"b":2}]}"#, 3));
        assert!(nested_deeper_than(br#"{"a":[1,{"b":[]}]}"#, 3));
        // Brackets inside strings, escaped quotes included, do not count.
        assert!(!nested_deeper_than(br#"{"a":"[[[[\"{{{{"}"#, 1));
        let deep = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
        assert!(nested_deeper_than(deep.as_bytes(), MAX_DEPTH));
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(!nested_deeper_than(ok.as_bytes(), MAX_DEPTH));
    }
}
