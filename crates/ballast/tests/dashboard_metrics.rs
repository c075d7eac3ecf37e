//! The Grafana dashboard (`docs/grafana/ballast.json`, shipped by the chart as
//! `charts/ballast/dashboards/ballast.json`) and the chart's alert rules
//! (`templates/prometheusrule.yaml`) name only metrics the real server exports: a server
//! with a destination takes one request, then its `/metrics` is compared with every
//! `ballast_*` name they use. (`scripts/check-chart` does the same on the rendered chart.)

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use common::{Server, WRITE_KEY};
use serde_json::{json, Value};

fn repo_file(path: &str) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The `ballast_*` metric names in a text; histogram series as the histogram's name.
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("ballast_") {
        let start = i + at;
        let boundary = start == 0 || {
            let c = bytes[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_')
        };
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            let name = &text[start..end];
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.insert(name.to_string());
        }
        i = end.max(start + 1);
    }
    out
}

fn exprs(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if let (true, Some(s)) =
                    (k == "expr" || k == "query" || k == "definition", x.as_str())
                {
                    out.push_str(s);
                    out.push('\n');
                }
                exprs(x, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| exprs(x, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_and_the_alert_rules_use_only_exported_metrics() {
    let out = tempfile::tempdir().unwrap();
    let server = Server::start(&common::config(&format!(
        r#"
[[destinations]]
id = "probe"
type = "file"
sources = ["web"]
path = "{}"
"#,
        out.path().join("probe.jsonl").display()
    )));
    let r = common::client()
        .post(server.url("/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({ "userId": "u", "event": "Probe" }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let metrics = common::client()
        .get(format!("{}/metrics", server.admin))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let exported: BTreeSet<String> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(names)
        .collect();
    assert!(exported.len() > 20, "{exported:?}");

    let dashboard_text = repo_file("docs/grafana/ballast.json");
    assert_eq!(
        dashboard_text,
        repo_file("charts/ballast/dashboards/ballast.json"),
        "the chart's dashboard differs from docs/grafana/ballast.json"
    );
    let dashboard: Value = serde_json::from_str(&dashboard_text).expect("dashboard JSON");
    let mut queries = String::new();
    exprs(&dashboard, &mut queries);
    let in_dashboard = names(&queries);
    let in_rules = names(&repo_file("charts/ballast/templates/prometheusrule.yaml"));
    eprintln!("exported: {exported:?}\ndashboard: {in_dashboard:?}\nrules: {in_rules:?}");
    assert!(in_dashboard.len() >= 15, "{in_dashboard:?}");
    assert!(in_rules.len() >= 6, "{in_rules:?}");
    let missing: Vec<_> = in_dashboard.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard uses metrics not exported: {missing:?}"
    );
    let missing: Vec<_> = in_rules.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the alert rules use metrics not exported: {missing:?}"
    );
    // The alerts the issue asks for are there.
    let rules = repo_file("charts/ballast/templates/prometheusrule.yaml");
    for alert in [
        "BallastDegradedMode",
        "BallastIngestionRefusing",
        "BallastBacklogGrowing",
        "BallastDeadLetters",
        "BallastStorageNearQuota",
        "BallastFsyncSlow",
    ] {
        assert!(
            rules.contains(&format!("alert: {alert}")),
            "{alert} missing"
        );
    }
}
