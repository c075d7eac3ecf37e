//! `BALLAST_<SECTION>__<KEY>` overrides: each variable sets one key of the parsed TOML
//! table before it is deserialized (nested with further `__`, array elements by index).

use super::ConfigError;

/// Applies every `BALLAST_*__*` variable of `env` to `table`; returns the names applied.
pub(super) fn apply(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, ConfigError> {
    let mut from_env = Vec::new();
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix("BALLAST_") else {
            continue;
        };
        if !rest.contains("__") {
            continue; // e.g. BALLAST_ADMIN_TOKEN, read by the CLI
        }
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        set_path(table, &path, &raw).map_err(|message| ConfigError::Env {
            var: var.clone(),
            message,
        })?;
        from_env.push(var);
    }
    Ok(from_env)
}

/// Sets `path` in `table` to the environment value `raw`. The value is typed like the
/// value it replaces (a string stays a string); new values are read as a TOML boolean,
/// integer, float, array or inline table when they parse as one, else as a string.
fn set_path(table: &mut toml::Table, path: &[String], raw: &str) -> Result<(), String> {
    set_path_in(table, path, raw, is_text_key(path))
}

fn set_path_in(
    table: &mut toml::Table,
    path: &[String],
    raw: &str,
    text: bool,
) -> Result<(), String> {
    let (first, rest) = path.split_first().ok_or("empty key")?;
    if first.is_empty() {
        return Err("empty key segment".into());
    }
    if rest.is_empty() {
        let typed = typed_value(table.get(first.as_str()), raw, text);
        table.insert(first.clone(), typed);
        return Ok(());
    }
    let next_is_index = rest[0].parse::<usize>().is_ok();
    let entry = table.entry(first.clone()).or_insert_with(|| {
        if next_is_index {
            toml::Value::Array(Vec::new())
        } else {
            toml::Value::Table(toml::Table::new())
        }
    });
    set_in_value(entry, rest, raw, text)
}

fn set_in_value(
    value: &mut toml::Value,
    path: &[String],
    raw: &str,
    text: bool,
) -> Result<(), String> {
    match value {
        toml::Value::Table(t) => set_path_in(t, path, raw, text),
        toml::Value::Array(items) => {
            let (first, rest) = path.split_first().ok_or("empty key")?;
            let idx: usize = first
                .parse()
                .map_err(|_| format!("{first:?} is not an array index"))?;
            if idx > items.len() {
                return Err(format!(
                    "index {idx} skips elements (array has {})",
                    items.len()
                ));
            }
            if idx == items.len() {
                items.push(toml::Value::Table(toml::Table::new()));
            }
            if rest.is_empty() {
                items[idx] = typed_value(Some(&items[idx]), raw, text);
                return Ok(());
            }
            set_in_value(&mut items[idx], rest, raw, text)
        }
        _ => Err("a plain value cannot have sub-keys".into()),
    }
}

/// Settings that are text whatever they look like (a token of digits is still a token),
/// by their key; every key under a `headers` table is text too.
const TEXT_KEYS: &[&str] = &[
    "id",
    "write_key",
    "admin_token",
    "routing_key",
    "api_key",
    "url",
    "base_url",
    "source",
    "method",
    "path",
    "data_dir",
    "postgres_url",
    "schema",
    "listen",
    "admin_listen",
    "name",
];

fn is_text_key(path: &[String]) -> bool {
    let leaf = path.last().map(String::as_str).unwrap_or_default();
    TEXT_KEYS.contains(&leaf) || path.iter().rev().skip(1).any(|s| s == "headers")
}

fn typed_value(existing: Option<&toml::Value>, raw: &str, text: bool) -> toml::Value {
    if text || matches!(existing, Some(toml::Value::String(_))) {
        return toml::Value::String(raw.to_string());
    }
    let parsed: Result<toml::Table, _> = toml::from_str(&format!("v = {raw}"));
    match parsed.ok().and_then(|mut t| t.remove("v")) {
        Some(v) => v,
        None => toml::Value::String(raw.to_string()),
    }
}
