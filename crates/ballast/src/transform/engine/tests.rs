use std::time::{Duration, Instant};

use super::*;
use crate::transform::protocol::{FailureKind, RunRequest, Source};

fn engine(code: &str) -> Engine {
    Engine::new(
        &[Source {
            id: "t".into(),
            code: code.into(),
        }],
        16 << 20,
        Duration::from_millis(200),
    )
    .unwrap()
}

fn run(e: &mut Engine, events: &[&str]) -> RunReply {
    e.run(&RunRequest {
        chain: vec![0],
        destination_id: "dest".into(),
        source_id: Some("src".into()),
        events: events.iter().map(|s| s.to_string()).collect(),
    })
}

fn jsons(r: &Result<Vec<Output>, Failure>) -> Vec<serde_json::Value> {
    r.as_ref()
        .unwrap()
        .iter()
        .map(|o| serde_json::from_str(&o.json).unwrap())
        .collect()
}

#[test]
fn event_map_drop_and_fan_out() {
    let mut e = engine(
        r#"
        export function transformEvent(event, metadata) {
          if (event.context && event.context.userAgent === "bot") return null;
          if (event.event === "split") return [{ ...event, messageId: event.messageId + "-a" }, { ...event, messageId: event.messageId + "-b" }];
          const m = metadata(event);
          event.properties = { ...event.properties, email: "***", dest: m.destinationId, src: m.sourceId, mid: m.messageId };
          log("masked", event.messageId, { n: 1 });
          return event;
        }"#,
    );
    let r = run(
        &mut e,
        &[
            r#"{"messageId":"m1","properties":{"email":"a@b.c"}}"#,
            r#"{"messageId":"m2","context":{"userAgent":"bot"}}"#,
            r#"{"messageId":"m3","event":"split"}"#,
        ],
    );
    assert_eq!(r.results.len(), 3);
    let first = jsons(&r.results[0]);
    assert_eq!(first[0]["properties"]["email"], "***");
    assert_eq!(first[0]["properties"]["dest"], "dest");
    assert_eq!(first[0]["properties"]["src"], "src");
    assert_eq!(first[0]["properties"]["mid"], "m1");
    assert!(jsons(&r.results[1]).is_empty());
    let split = r.results[2].as_ref().unwrap();
    assert_eq!(split.len(), 2);
    assert_eq!(split[0].message_id.as_deref(), Some("m3-a"));
    assert_eq!(split[1].message_id.as_deref(), Some("m3-b"));
    assert_eq!(
        r.logs,
        vec![("t".to_string(), r#"masked m1 {"n":1}"#.to_string())]
    );
    assert_eq!(r.stats[0].events_in, 3);
    assert_eq!(r.stats[0].events_out, 3);
    assert_eq!(r.stats[0].dropped, 1);
    assert!(!r.tainted);
}

#[test]
fn a_throw_fails_only_its_event_with_the_stack() {
    let mut e = engine(
        r#"
        function check(event) { if (event.bad) throw new Error("bad event " + event.messageId); }
        export function transformEvent(event) { check(event); return event; }"#,
    );
    let r = run(
        &mut e,
        &[
            r#"{"messageId":"1"}"#,
            r#"{"messageId":"2","bad":true}"#,
            r#"{"messageId":"3"}"#,
        ],
    );
    assert_eq!(jsons(&r.results[0]).len(), 1);
    assert_eq!(jsons(&r.results[2]).len(), 1);
    let f = r.results[1].as_ref().unwrap_err();
    assert_eq!(f.kind, FailureKind::Error);
    assert_eq!(f.transformation, "t");
    assert!(f.message.contains("bad event 2"), "{f:?}");
    assert!(f.stack.as_deref().unwrap_or("").contains("check"), "{f:?}");
    assert_eq!(r.stats[0].failed, 1);
}

#[test]
fn async_functions_are_awaited_and_rejections_fail() {
    let mut e = engine(
        r#"
        const later = (v) => new Promise((resolve) => resolve(v));
        export async function transformEvent(event) {
          const x = await later(event.n * 2);
          if (x > 10) throw new Error("too big");
          return { ...event, doubled: x };
        }"#,
    );
    let r = run(&mut e, &[r#"{"n":2}"#, r#"{"n":9}"#]);
    assert_eq!(jsons(&r.results[0])[0]["doubled"], 4);
    assert!(r.results[1]
        .as_ref()
        .unwrap_err()
        .message
        .contains("too big"));
}

#[test]
fn invalid_return_values_fail_the_event() {
    let mut e = engine(
        r#"export function transformEvent(event) { return event.kind === "s" ? "a string" : [event, 3]; }"#,
    );
    let r = run(&mut e, &[r#"{"kind":"s"}"#, r#"{"kind":"a"}"#]);
    for x in &r.results {
        assert_eq!(x.as_ref().unwrap_err().kind, FailureKind::Invalid, "{x:?}");
    }
}

#[test]
fn an_infinite_loop_times_out_and_the_batch_goes_on() {
    let mut e = engine(
        r#"export function transformEvent(event) { if (event.loop) { while (true) {} } return event; }"#,
    );
    let started = Instant::now();
    let r = run(&mut e, &[r#"{"loop":true}"#, r#"{"a":1}"#]);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        r.results[0].as_ref().unwrap_err().kind,
        FailureKind::Timeout
    );
    assert_eq!(jsons(&r.results[1]).len(), 1);
    assert!(r.tainted);
}

#[test]
fn a_memory_bomb_hits_the_limit() {
    let mut e = Engine::new(
        &[Source {
            id: "t".into(),
            code: r#"export function transformEvent(event) {
             if (event.bomb) { const a = []; while (true) a.push("x".repeat(4096) + a.length); }
             return event; }"#
                .into(),
        }],
        4 << 20,
        Duration::from_secs(30),
    )
    .unwrap();
    let r = run(&mut e, &[r#"{"bomb":true}"#, r#"{"a":1}"#]);
    let f = r.results[0].as_ref().unwrap_err();
    assert_eq!(f.kind, FailureKind::Memory, "{f:?}");
    assert!(f.message.contains("memory"), "{f:?}");
    assert_eq!(jsons(&r.results[1]).len(), 1);
    assert!(r.tainted);
}

#[test]
fn transform_batch_is_used_when_exported() {
    let mut e = engine(
        r#"export function transformBatch(events, metadata) {
             return events.filter((e) => !e.drop).map((e) => ({ ...e, d: metadata(e).destinationId }));
           }"#,
    );
    let r = run(
        &mut e,
        &[r#"{"messageId":"a"}"#, r#"{"messageId":"b","drop":true}"#],
    );
    assert_eq!(jsons(&r.results[0])[0]["d"], "dest");
    assert!(jsons(&r.results[1]).is_empty());
    assert_eq!(r.stats[0].dropped, 1);
}

#[test]
fn no_network_or_files() {
    let mut e = engine(
        r#"export function transformEvent(event) {
             return { fetch: typeof fetch, require: typeof require, std: typeof std, os: typeof os, xhr: typeof XMLHttpRequest };
           }"#,
    );
    let r = run(&mut e, &[r#"{}"#]);
    let v = &jsons(&r.results[0])[0];
    for k in ["fetch", "require", "std", "os", "xhr"] {
        assert_eq!(v[k], "undefined", "{k}");
    }
}

#[test]
fn compile_errors_name_the_transformation() {
    let err = Engine::new(
        &[Source {
            id: "broken".into(),
            code: "export function transformEvent( {".into(),
        }],
        16 << 20,
        Duration::from_secs(1),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("broken"), "{err}");
    let err = Engine::new(
        &[Source {
            id: "empty".into(),
            code: "export const x = 1;".into(),
        }],
        16 << 20,
        Duration::from_secs(1),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("neither"), "{err}");
}

#[test]
fn a_batch_larger_than_the_memory_limit_goes_through_one_event_at_a_time() {
    let mut e = Engine::new(
        &[Source {
            id: "t".into(),
            code: "export function transformEvent(event) { return event; }".into(),
        }],
        4 << 20,
        Duration::from_secs(5),
    )
    .unwrap();
    // 20,000 events of about 600 bytes: some 12 MB of JSON, more as objects.
    let events: Vec<String> = (0..20_000)
        .map(|i| {
            format!(
                r#"{{"messageId":"m-{i}","properties":{{"pad":"{}"}}}}"#,
                "x".repeat(560)
            )
        })
        .collect();
    let r = e.run(&RunRequest {
        chain: vec![0, 0],
        destination_id: "d".into(),
        source_id: None,
        events,
    });
    assert!(r
        .results
        .iter()
        .all(|x| x.as_ref().is_ok_and(|o| o.len() == 1)));
    assert_eq!(r.stats.len(), 1);
    assert_eq!(r.stats[0].events_in, 40_000);
    assert!(!r.tainted);
}
