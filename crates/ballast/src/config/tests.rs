use super::*;

const BASE: &str = r#"
[server]
listen = "127.0.0.1:9999"
data_dir = "/tmp/x"

[storage]
max_bytes = "1GiB"
segment_bytes = "64MiB"

[[sources]]
id = "web"
write_key = "k1"
"#;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn parses_sizes_and_defaults() {
    let c = Config::from_toml(BASE, "t", env(&[])).unwrap();
    assert_eq!(c.storage.max_bytes, 1 << 30);
    assert_eq!(c.storage.segment_bytes, 64 << 20);
    assert_eq!(c.server.max_request_bytes, 4_096_000);
    assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:8081");
    assert!(c.sources[0].enabled);
}

#[test]
fn unknown_key_names_the_key() {
    let text = format!("{BASE}\n[storage2]\nx = 1\n");
    let e = Config::from_toml(&text, "t", env(&[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("storage2"), "{e}");
    let text = BASE.replace("data_dir", "data_dri");
    let e = Config::from_toml(&text, "t", env(&[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("data_dri"), "{e}");
    let e = Config::from_toml(BASE, "t", env(&[("BALLAST_SERVER__LISTN", "x")]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("listn") && e.contains("BALLAST_SERVER__LISTN"),
        "{e}"
    );
}

#[test]
fn environment_overrides() {
    let c = Config::from_toml(
        BASE,
        "t",
        env(&[
            ("BALLAST_SERVER__LISTEN", "127.0.0.1:1234"),
            ("BALLAST_STORAGE__MAX_BYTES", "2GiB"),
            ("BALLAST_SERVER__MAX_REQUEST_BYTES", "1000"),
            ("BALLAST_SOURCES__0__WRITE_KEY", "123"),
            ("BALLAST_SOURCES__1__ID", "app"),
            ("BALLAST_SOURCES__1__WRITE_KEY", "k2"),
            ("BALLAST_SOURCES__1__ENABLED", "false"),
            ("BALLAST_ADMIN_TOKEN", "not-a-config-key"),
            ("PATH", "/bin"),
        ]),
    )
    .unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:1234");
    assert_eq!(c.storage.max_bytes, 2 << 30);
    assert_eq!(c.server.max_request_bytes, 1000);
    assert_eq!(c.sources[0].write_key, "123");
    assert_eq!(c.sources[1].id, "app");
    assert!(!c.sources[1].enabled);
    let c = Config::from_toml(
        BASE,
        "t",
        env(&[("BALLAST_SERVER__MAX_REQUEST_BYTES", "4MiB")]),
    )
    .unwrap();
    assert_eq!(c.server.max_request_bytes, 4 << 20);
}

#[test]
fn connection_limits_have_defaults_and_come_from_file_or_environment() {
    let c = Config::from_toml(BASE, "t", env(&[])).unwrap();
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(c.server.idle_timeout, Duration::from_secs(75));
    assert_eq!(c.server.body_read_timeout, Duration::from_secs(10));
    assert_eq!(c.server.body_min_rate, 1024);
    assert_eq!(c.server.max_connections, 10_000);
    assert_eq!(c.server.fd_reserve, 256);
    let text = BASE.replace(
        "data_dir = \"/tmp/x\"",
        "data_dir = \"/tmp/x\"\nheader_read_timeout = \"2s\"\nbody_min_rate = \"4KiB\"",
    );
    let c = Config::from_toml(
        &text,
        "t",
        env(&[
            ("BALLAST_SERVER__IDLE_TIMEOUT", "30s"),
            ("BALLAST_SERVER__MAX_CONNECTIONS", "500"),
            ("BALLAST_SERVER__BODY_READ_TIMEOUT", "3"),
            ("BALLAST_SERVER__FD_RESERVE", "64"),
        ]),
    )
    .unwrap();
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(2));
    assert_eq!(c.server.body_min_rate, 4096);
    assert_eq!(c.server.idle_timeout, Duration::from_secs(30));
    assert_eq!(c.server.max_connections, 500);
    assert_eq!(c.server.body_read_timeout, Duration::from_secs(3));
    assert_eq!(c.server.fd_reserve, 64);
    let e = Config::from_toml(BASE, "t", env(&[("BALLAST_SERVER__MAX_CONNECTIONS", "0")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_connections"), "{e}");
    let e = Config::from_toml(BASE, "t", env(&[("BALLAST_SERVER__IDLE_TIMEOUT", "0s")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("idle_timeout"), "{e}");
}

/// Secrets come from the environment whatever they look like, also when the file
/// does not set them (no string there to take the type from).
#[test]
fn text_settings_from_the_environment_stay_text() {
    let vars = [
        ("BALLAST_SERVER__ADMIN_TOKEN", "12345678"),
        ("BALLAST_SOURCES__1__ID", "2024"),
        ("BALLAST_SOURCES__1__WRITE_KEY", "true"),
        ("BALLAST_ALERTS__PAGERDUTY__ROUTING_KEY", "1979-05-27"),
    ];
    // With an unknown key besides: the error names it.
    let with_typo = [&vars[..], &[("BALLAST_ALERTS__VICTORIA__X", "1")]].concat();
    let err = Config::from_toml(BASE, "t", env(&with_typo))
        .unwrap_err()
        .to_string();
    assert!(err.contains("victoria"), "{err}");
    let c = Config::from_toml(BASE, "t", env(&vars)).unwrap();
    assert_eq!(c.server.admin_token.as_deref(), Some("12345678"));
    assert_eq!(c.sources[1].id, "2024");
    assert_eq!(c.sources[1].write_key, "true");
    assert_eq!(
        c.alerts.pagerduty.as_ref().map(|p| p.routing_key.as_str()),
        Some("1979-05-27")
    );
}

#[test]
fn validation() {
    let dup = format!("{BASE}\n[[sources]]\nid = \"web\"\nwrite_key = \"k2\"\n");
    assert!(Config::from_toml(&dup, "t", env(&[]))
        .unwrap_err()
        .to_string()
        .contains("duplicate"));
    let bad = BASE.replace("\"1GiB\"", "\"lots\"");
    assert!(Config::from_toml(&bad, "t", env(&[]))
        .unwrap_err()
        .to_string()
        .contains("lots"));
}

#[test]
fn destinations_parse_and_check_their_own_keys() {
    let text = format!(
        r#"{BASE}
[[destinations]]
id = "hook"
type = "webhook"
sources = ["web"]
url = "http://127.0.0.1:9000/x"
headers = {{ "X-Token" = "s" }}
concurrency = 4
retry = {{ max_attempts = 5, retry_window = "1m", min_backoff = "1s", max_backoff = "2s" }}

[[destinations]]
id = "archive"
type = "file"
sources = ["web"]
path = "/tmp/out.jsonl"
"#
    );
    let c = Config::from_toml(&text, "t", env(&[])).unwrap();
    assert_eq!(c.destinations.len(), 2);
    assert_eq!(c.destinations[0].concurrency, 4);
    assert_eq!(c.destinations[0].retry.max_attempts, 5);
    assert_eq!(c.destinations[1].retry.max_attempts, 3);
    assert_eq!(c.destinations[1].kind.name(), "file");
    let typo = text.replace("url =", "ulr =");
    let e = Config::from_toml(&typo, "t", env(&[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("ulr") && e.contains("hook"), "{e}");
    let unknown_src = text.replace("sources = [\"web\"]\npath", "sources = [\"nope\"]\npath");
    let e = Config::from_toml(&unknown_src, "t", env(&[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope"), "{e}");
    let bad_type = text.replace("type = \"file\"", "type = \"ftp\"");
    let e = Config::from_toml(&bad_type, "t", env(&[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("ftp"), "{e}");
}

#[test]
fn a_postgres_destination_has_its_own_defaults_and_env_overrides() {
    let text = format!(
        r#"{BASE}
[[destinations]]
id = "warehouse"
type = "postgres"
sources = ["web"]
url = "postgres://loader@db:5432/analytics"
schema = "web_prod"
"#
    );
    let c = Config::from_toml(&text, "t", env(&[])).unwrap();
    assert_eq!(c.destinations[0].kind.name(), "postgres");
    assert_eq!(c.destinations[0].batch_size, 10_000);
    let c = Config::from_toml(
        &text,
        "t",
        env(&[
            ("BALLAST_DESTINATIONS__0__URL", "postgres://other@db2/x"),
            ("BALLAST_DESTINATIONS__0__SCHEMA", "s2024"),
            ("BALLAST_DESTINATIONS__0__BATCH_SIZE", "500"),
        ]),
    )
    .unwrap();
    assert_eq!(c.destinations[0].batch_size, 500);
    let e = Config::from_toml(
        &text,
        "t",
        env(&[("BALLAST_DESTINATIONS__0__URL", "not a url")]),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("warehouse") && e.contains("url"), "{e}");
    let e = Config::from_toml(&text.replace("schema =", "schemas ="), "t", env(&[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("schemas") && e.contains("warehouse"), "{e}");
    let e = Config::from_toml(&text.replace("web_prod", "Web Prod"), "t", env(&[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("schema"), "{e}");
}

#[test]
fn admin_api_off_loopback_needs_a_token() {
    let open = BASE.replace(
        "data_dir = \"/tmp/x\"",
        "data_dir = \"/tmp/x\"\nadmin_listen = \"0.0.0.0:8081\"",
    );
    let e = Config::from_toml(&open, "t", env(&[]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("admin_token") && e.contains("0.0.0.0:8081"),
        "{e}"
    );
    let c = Config::from_toml(
        &open,
        "t",
        env(&[("BALLAST_SERVER__ADMIN_TOKEN", "s3cret")]),
    )
    .unwrap();
    assert_eq!(c.server.admin_token.as_deref(), Some("s3cret"));
    assert!(c.server.metrics_require_token);
    let e = Config::from_toml(&open, "t", env(&[("BALLAST_SERVER__ADMIN_TOKEN", " ")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty"), "{e}");
    let ipv6 = open.replace("0.0.0.0:8081", "[::]:8081");
    assert!(Config::from_toml(&ipv6, "t", env(&[])).is_err());
    // Loopback (v4 or v6) needs none.
    let local = open.replace("0.0.0.0:8081", "[::1]:8081");
    Config::from_toml(&local, "t", env(&[])).unwrap();
    Config::from_toml(BASE, "t", env(&[])).unwrap();
    let c = Config::from_toml(
        BASE,
        "t",
        env(&[("BALLAST_SERVER__METRICS_REQUIRE_TOKEN", "false")]),
    )
    .unwrap();
    assert!(!c.server.metrics_require_token);
}

#[test]
fn example_config_is_valid() {
    let text = include_str!("../../../../examples/ballast.toml");
    Config::from_toml(text, "examples/ballast.toml", env(&[])).unwrap();
}
