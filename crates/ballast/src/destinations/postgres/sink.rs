//! Loading rows: the tables' columns kept in step with what arrives (`ALTER TABLE ... ADD
//! COLUMN IF NOT EXISTS`, the database's own types winning), then one transaction per
//! `deliver`: per table, COPY into a temporary staging table and merge into the table by
//! `id` (`ON CONFLICT (id) DO NOTHING`; `users` keeps the latest value of each column).
//! Committed means delivered; nothing is acknowledged before.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::SinkExt;
use tokio_postgres::Client;

use super::schema::{self, ColType, Discard, Row, Rows, Val, DISCARDS};
use super::PostgresConfig;
use crate::destinations::{Destination, Event, Outcome};

/// PostgreSQL's limit on a table's columns; past it new keys go to the discards.
pub const MAX_COLUMNS: usize = 1600;
/// Connections a sink keeps (its loads run in parallel up to this).
const POOL: usize = 4;
/// Bounds one load, connecting included: past it the connection is dropped and the
/// batch retried.
const LOAD_TIMEOUT: Duration = Duration::from_secs(180);
const SESSION_OPTIONS: &str = "-c statement_timeout=120s -c lock_timeout=60s \
     -c idle_in_transaction_session_timeout=60s -c TimeZone=UTC";
/// DDL that races another loader's identical DDL is tried this many times.
const DDL_ATTEMPTS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The connection, a timeout, a conflict, the server shutting down: try again.
    #[error("postgres: {0}")]
    Temporary(String),
    /// The database refused this data (SQLSTATE classes 22 data exception, 23 integrity,
    /// 54 limits: a value its column cannot take, a row too big).
    #[error("postgres refused the data: {0}")]
    Refused(String),
    /// Anything else the database refuses (privileges, a schema it cannot make or
    /// change): nothing can be loaded until an operator acts.
    #[error("postgres refused: {0}")]
    Denied(String),
}

/// Whether an error is worth retrying as it is (connection, timeout, conflict, server
/// shutting down or out of resources, a table or column dropped under us).
fn temporary(e: &tokio_postgres::Error) -> bool {
    let Some(db) = e.as_db_error() else {
        return true;
    };
    let code = db.code().code();
    matches!(
        code.get(..2).unwrap_or(""),
        "08" | "40" | "53" | "55" | "57" | "58" | "XX"
    ) || matches!(code, "42703" | "42P01" | "3F000")
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

fn load_err(e: tokio_postgres::Error) -> LoadError {
    if temporary(&e) {
        return LoadError::Temporary(describe(&e));
    }
    let data = e
        .as_db_error()
        .is_some_and(|db| matches!(db.code().code().get(..2).unwrap_or(""), "22" | "23" | "54"));
    if data {
        LoadError::Refused(describe(&e))
    } else {
        LoadError::Denied(describe(&e))
    }
}

/// DDL refused for a reason other than a passing one: never the data's fault (names and
/// types are ours), so an operator's.
fn ddl_err(e: tokio_postgres::Error) -> LoadError {
    if temporary(&e) {
        LoadError::Temporary(describe(&e))
    } else {
        LoadError::Denied(describe(&e))
    }
}

/// Concurrent identical DDL (another loader creating the same table or column).
fn ddl_race(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        matches!(
            db.code().code(),
            "23505" | "42P07" | "42701" | "42P06" | "40P01"
        )
    })
}

pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub struct PostgresSink {
    config: tokio_postgres::Config,
    schema: String,
    pool: Vec<tokio::sync::Mutex<Option<Client>>>,
    next: AtomicUsize,
    /// Known columns and types per table (what the database said last).
    tables: Mutex<HashMap<String, Arc<HashMap<String, ColType>>>>,
    ready: AtomicBool,
}

impl PostgresSink {
    pub fn new(c: &PostgresConfig) -> Result<PostgresSink, super::config::PostgresConfigError> {
        let mut config = c.check()?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        let options = [config.get_options().unwrap_or(""), SESSION_OPTIONS]
            .iter()
            .filter(|o| !o.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        config.options(&options);
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        Ok(PostgresSink {
            config,
            schema: c.schema.clone(),
            pool: (0..POOL).map(|_| tokio::sync::Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            tables: Mutex::new(HashMap::new()),
            ready: AtomicBool::new(false),
        })
    }

    fn table(&self, name: &str) -> String {
        format!("{}.{}", quote(&self.schema), quote(name))
    }

    async fn connect(&self) -> Result<Client, LoadError> {
        let tls = crate::pg::tls().map_err(LoadError::Temporary)?;
        let (client, connection) = self
            .config
            .connect(tls)
            .await
            .map_err(|e| LoadError::Temporary(format!("connecting: {}", describe(&e))))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres destination connection closed");
            }
        });
        Ok(client)
    }

    /// Loads `rows` in one transaction on a pooled connection (dropped on failure).
    async fn load(&self, rows: &Rows) -> Result<(), LoadError> {
        let mut slot = None;
        for s in &self.pool {
            if let Ok(g) = s.try_lock() {
                slot = Some(g);
                break;
            }
        }
        let mut slot = match slot {
            Some(g) => g,
            None => {
                self.pool[self.next.fetch_add(1, Ordering::Relaxed) % POOL]
                    .lock()
                    .await
            }
        };
        let run = async {
            if slot.as_ref().is_none_or(|c| c.is_closed()) {
                *slot = Some(self.connect().await?);
            }
            match slot.as_mut() {
                Some(client) => self.load_on(client, rows).await,
                None => Err(LoadError::Temporary("no connection".into())),
            }
        };
        let r = match tokio::time::timeout(LOAD_TIMEOUT, run).await {
            Ok(r) => r,
            Err(_) => Err(LoadError::Temporary(format!(
                "load timed out after {LOAD_TIMEOUT:?}"
            ))),
        };
        if let Err(e) = &r {
            // Its state is unknown (a transaction may be open): start afresh.
            *slot = None;
            if matches!(e, LoadError::Temporary(_)) {
                // A table or column may be gone: ask the database again.
                self.forget_tables();
            }
        }
        r
    }

    fn forget_tables(&self) {
        self.tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    async fn ddl(&self, client: &Client, sql: &str) -> Result<(), tokio_postgres::Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match client.batch_execute(sql).await {
                Ok(()) => return Ok(()),
                Err(e) if ddl_race(&e) && attempt < DDL_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(20 * attempt as u64)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn setup(&self, client: &Client) -> Result<(), LoadError> {
        if self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let sql = format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {d} (table_name text, row_id text, column_name text,
                 column_value text, received_at timestamp with time zone,
                 uuid_ts timestamp with time zone, reason text);
             CREATE INDEX IF NOT EXISTS rudder_discards_row_id ON {d} (row_id);",
            schema = quote(&self.schema),
            d = self.table(DISCARDS),
        );
        self.ddl(client, &sql).await.map_err(|e| match ddl_err(e) {
            LoadError::Denied(m) => {
                LoadError::Denied(format!("setting up schema {:?}: {m}", self.schema))
            }
            other => other,
        })?;
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    async fn read_columns(
        &self,
        client: &Client,
        table: &str,
    ) -> Result<Arc<HashMap<String, ColType>>, LoadError> {
        let rows = client
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns \
                 WHERE table_schema = $1 AND table_name = $2",
                &[&self.schema, &table],
            )
            .await
            .map_err(load_err)?;
        let mut cols = HashMap::with_capacity(rows.len());
        for r in rows {
            let name: String = r.try_get(0).map_err(load_err)?;
            let t: String = r.try_get(1).map_err(load_err)?;
            cols.insert(name, ColType::from_information_schema(&t));
        }
        let cols = Arc::new(cols);
        self.tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(table.to_string(), cols.clone());
        Ok(cols)
    }

    /// Makes `table` have the columns `wanted` names (as many as fit under
    /// [`MAX_COLUMNS`]); returns its columns as the database has them.
    async fn ensure_columns(
        &self,
        client: &Client,
        table: &str,
        wanted: &BTreeMap<String, ColType>,
    ) -> Result<Arc<HashMap<String, ColType>>, LoadError> {
        let cached = self
            .tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(table)
            .cloned();
        let mut known = match cached {
            Some(c) => c,
            None => self.read_columns(client, table).await?,
        };
        if known.is_empty() {
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {} (id text PRIMARY KEY, \
                 received_at timestamp with time zone, uuid_ts timestamp with time zone)",
                self.table(table)
            );
            self.ddl(client, &sql).await.map_err(ddl_err)?;
            known = self.read_columns(client, table).await?;
        }
        let room = MAX_COLUMNS.saturating_sub(known.len());
        // The row's own columns first: they are never the ones left out.
        let mut new: Vec<_> = wanted
            .iter()
            .filter(|(c, _)| !known.contains_key(*c))
            .collect();
        new.sort_by_key(|(c, _)| (fixed_type(c).is_none() && !c.starts_with("context_"), *c));
        new.truncate(room);
        if new.is_empty() {
            return Ok(known);
        }
        let adds = new
            .iter()
            .map(|(c, t)| format!("ADD COLUMN IF NOT EXISTS {} {}", quote(c), t.sql()))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!("ALTER TABLE {} {adds}", self.table(table));
        if let Err(e) = self.ddl(client, &sql).await {
            // Another loader may have filled the table up meanwhile: what is there is
            // used, the rest goes to the discards.
            let too_many = e.as_db_error().is_some_and(|d| d.code().code() == "54011");
            if !too_many {
                return Err(ddl_err(e));
            }
        }
        metrics::counter!("ballast_postgres_columns_added_total").increment(new.len() as u64);
        self.read_columns(client, table).await
    }

    async fn load_on(&self, client: &mut Client, rows: &Rows) -> Result<(), LoadError> {
        self.setup(client).await?;
        let mut discards: Vec<Discard> = rows.discards.clone();
        // Per table, one row per id (users: merged, later values win).
        let mut tables: BTreeMap<&str, Vec<Row>> = BTreeMap::new();
        let mut seen: HashSet<(&str, &str)> = HashSet::new();
        for (table, row) in &rows.rows {
            let list = tables.entry(table.as_str()).or_default();
            if table == "users" {
                if let Some(prev) = list.iter_mut().find(|r| r.id == row.id) {
                    // The later identify (by receivedAt; by order when unknown) wins
                    // column by column.
                    let newer = match (
                        prev.received_at.as_deref().and_then(schema::timestamp_key),
                        row.received_at.as_deref().and_then(schema::timestamp_key),
                    ) {
                        (Some(p), Some(r)) => r >= p,
                        _ => true,
                    };
                    for (k, v) in &row.cols {
                        if newer || !prev.cols.contains_key(k) {
                            prev.cols.insert(k.clone(), v.clone());
                        }
                    }
                    if newer {
                        prev.received_at = row.received_at.clone();
                    }
                    continue;
                }
            } else if !seen.insert((table.as_str(), row.id.as_str())) {
                continue;
            }
            list.push(row.clone());
        }
        let mut loads = Vec::with_capacity(tables.len());
        for (table, rows) in tables {
            let mut wanted: BTreeMap<String, ColType> = BTreeMap::new();
            for r in &rows {
                for (c, v) in &r.cols {
                    let t = fixed_type(c).unwrap_or(v.natural());
                    let e = wanted.entry(c.clone()).or_insert(t);
                    if (*e == ColType::BigInt && t == ColType::Numeric)
                        || (*e == ColType::Numeric && t == ColType::BigInt)
                    {
                        *e = ColType::Numeric;
                    }
                }
            }
            let known = self.ensure_columns(client, table, &wanted).await?;
            let mut typed_rows = Vec::with_capacity(rows.len());
            let mut columns: BTreeMap<String, ()> = BTreeMap::new();
            for r in rows {
                let mut cols = BTreeMap::new();
                for (c, v) in r.cols {
                    let reason = match known.get(&c) {
                        None => format!("table has {MAX_COLUMNS} columns, the most it can"),
                        Some(&t) => match v.clone().coerce(t) {
                            Ok(v) => {
                                columns.insert(c.clone(), ());
                                cols.insert(c, v);
                                continue;
                            }
                            Err(reason) => reason,
                        },
                    };
                    discards.push(Discard {
                        table: table.to_string(),
                        row_id: r.id.clone(),
                        column: c,
                        value: schema::cut(&v.text(), schema::MAX_DISCARD_VALUE),
                        received_at: r.received_at.clone(),
                        reason,
                    });
                }
                cols.insert("id".to_string(), Val::Text(r.id.clone()));
                columns.insert("id".to_string(), ());
                typed_rows.push(cols);
            }
            loads.push((table, columns, typed_rows));
        }
        let mut seen = HashSet::new();
        discards.retain(|d| seen.insert((d.table.clone(), d.row_id.clone(), d.column.clone())));

        let tx = client.transaction().await.map_err(load_err)?;
        for (i, (table, columns, rows)) in loads.iter().enumerate() {
            let stage = format!("ballast_stage_{i}");
            let names: Vec<&String> = columns.keys().collect();
            let list = names
                .iter()
                .map(|c| quote(c))
                .collect::<Vec<_>>()
                .join(", ");
            // The staging table has the table's own column types (an operator's too).
            tx.batch_execute(&format!(
                "CREATE TEMP TABLE {stage} ON COMMIT DROP AS SELECT {list} FROM {} WITH NO DATA",
                self.table(table)
            ))
            .await
            .map_err(load_err)?;
            let mut buf = Vec::with_capacity(rows.len() * 256);
            for r in rows {
                for (k, c) in names.iter().enumerate() {
                    if k > 0 {
                        buf.push(b'\t');
                    }
                    match r.get(*c) {
                        None => buf.extend_from_slice(b"\\N"),
                        Some(v) => copy_value(&mut buf, v),
                    }
                }
                buf.push(b'\n');
            }
            copy(&tx, &format!("COPY {stage} ({list}) FROM STDIN"), buf).await?;
            let target = self.table(table);
            let conflict = if *table == "users" {
                let sets = names
                    .iter()
                    .filter(|c| c.as_str() != "id")
                    .map(|c| {
                        let c = quote(c);
                        if c == "\"received_at\"" {
                            format!("{c} = GREATEST(t.{c}, EXCLUDED.{c})")
                        } else {
                            format!(
                                "{c} = CASE WHEN t.received_at IS NULL OR EXCLUDED.received_at \
                                 >= t.received_at THEN COALESCE(EXCLUDED.{c}, t.{c}) \
                                 ELSE COALESCE(t.{c}, EXCLUDED.{c}) END"
                            )
                        }
                    })
                    .chain(std::iter::once("uuid_ts = EXCLUDED.uuid_ts".to_string()))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("DO UPDATE SET {sets}")
            } else {
                "DO NOTHING".to_string()
            };
            // In id order: concurrent loads lock rows in the same order.
            tx.batch_execute(&format!(
                "INSERT INTO {target} AS t ({list}, uuid_ts) SELECT {list}, now() FROM {stage} \
                 ORDER BY id ON CONFLICT (id) {conflict}"
            ))
            .await
            .map_err(load_err)?;
        }
        if !discards.is_empty() {
            tx.batch_execute(
                "CREATE TEMP TABLE ballast_stage_discards (table_name text, row_id text, \
                 column_name text, column_value text, received_at timestamp with time zone, \
                 reason text) ON COMMIT DROP",
            )
            .await
            .map_err(load_err)?;
            let mut buf = Vec::new();
            for d in &discards {
                let received = d
                    .received_at
                    .as_deref()
                    .filter(|r| schema::looks_like_timestamp(r));
                for (k, v) in [
                    Some(d.table.as_str()),
                    Some(d.row_id.as_str()),
                    Some(d.column.as_str()),
                    Some(d.value.as_str()),
                    received,
                    Some(d.reason.as_str()),
                ]
                .into_iter()
                .enumerate()
                {
                    if k > 0 {
                        buf.push(b'\t');
                    }
                    match v {
                        None => buf.extend_from_slice(b"\\N"),
                        Some(s) => copy_text(&mut buf, s),
                    }
                }
                buf.push(b'\n');
            }
            copy(&tx, "COPY ballast_stage_discards FROM STDIN", buf).await?;
            tx.batch_execute(&format!(
                "INSERT INTO {d} (table_name, row_id, column_name, column_value, received_at, \
                 uuid_ts, reason) SELECT s.table_name, s.row_id, s.column_name, s.column_value, \
                 s.received_at, now(), s.reason FROM ballast_stage_discards s \
                 WHERE NOT EXISTS (SELECT 1 FROM {d} x WHERE x.row_id = s.row_id \
                 AND x.table_name = s.table_name AND x.column_name = s.column_name)",
                d = self.table(DISCARDS)
            ))
            .await
            .map_err(load_err)?;
        }
        tx.commit().await.map_err(load_err)?;
        let n: usize = loads.iter().map(|(_, _, r)| r.len()).sum();
        metrics::counter!("ballast_postgres_rows_loaded_total").increment(n as u64);
        metrics::counter!("ballast_postgres_discards_total").increment(discards.len() as u64);
        Ok(())
    }

    /// An event the database refuses even alone: kept whole in the discards (column
    /// `*`), so that it is not lost and blocks nobody.
    async fn discard_event(&self, e: &Event, reason: &str) -> Result<(), LoadError> {
        let text = String::from_utf8_lossy(&e.json);
        let received = serde_json::from_slice::<serde_json::Value>(&e.json)
            .ok()
            .and_then(|v| v["receivedAt"].as_str().map(str::to_string));
        let rows = Rows {
            rows: Vec::new(),
            discards: vec![Discard {
                table: String::new(),
                row_id: e.message_id.to_string(),
                column: "*".into(),
                value: schema::cut(&text.replace('\0', ""), schema::MAX_TEXT),
                received_at: received,
                reason: format!("the database refused the event: {reason}"),
            }],
        };
        self.load(&rows).await
    }
}

/// Columns whose type is fixed whatever the first value looks like.
fn fixed_type(column: &str) -> Option<ColType> {
    match column {
        "received_at" | "sent_at" | "timestamp" | "original_timestamp" | "uuid_ts" => {
            Some(ColType::Timestamp)
        }
        "id" | "anonymous_id" | "user_id" | "context_request_ip" | "event" | "event_text"
        | "channel" => Some(ColType::Text),
        _ => None,
    }
}

async fn copy(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &str,
    buf: Vec<u8>,
) -> Result<(), LoadError> {
    let sink = tx.copy_in::<_, bytes::Bytes>(sql).await.map_err(load_err)?;
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from(buf)).await.map_err(load_err)?;
    sink.finish().await.map_err(load_err)?;
    Ok(())
}

/// A value in COPY's text format.
fn copy_value(buf: &mut Vec<u8>, v: &Val) {
    match v {
        Val::Int(i) => buf.extend_from_slice(i.to_string().as_bytes()),
        Val::Bool(b) => buf.push(if *b { b't' } else { b'f' }),
        Val::Num(s) | Val::Ts(s) | Val::Text(s) => copy_text(buf, s),
    }
}

fn copy_text(buf: &mut Vec<u8>, s: &str) {
    for &b in s.as_bytes() {
        match b {
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            0 => {}
            _ => buf.push(b),
        }
    }
}

fn rows_of_all(events: &[Event]) -> Rows {
    let mut all = Rows::default();
    for e in events {
        let r = schema::rows_of(&e.json, &e.message_id);
        all.rows.extend(r.rows);
        all.discards.extend(r.discards);
    }
    all
}

fn outcome(e: LoadError) -> Outcome {
    match e {
        LoadError::Temporary(reason) => Outcome::Retry {
            status: None,
            reason,
            retry_after: None,
        },
        e => Outcome::Abort {
            status: None,
            reason: e.to_string(),
        },
    }
}

#[async_trait]
impl Destination for PostgresSink {
    async fn deliver(&self, events: &[Event]) -> Outcome {
        let started = Instant::now();
        let r = match self.load(&rows_of_all(events)).await {
            Err(LoadError::Refused(reason)) => {
                // A column's type may have been changed under us: ask the database again.
                self.forget_tables();
                // One event's data (most likely) made the database refuse the load: load
                // them one by one; one refused alone is kept whole in the discards.
                tracing::warn!(%reason, events = events.len(), "postgres refused a load; loading its events one by one");
                let mut r = Ok(());
                for e in events {
                    match self.load(&rows_of_all(std::slice::from_ref(e))).await {
                        Ok(()) => {}
                        Err(LoadError::Refused(reason)) => {
                            // A column's type may have been changed under us: ask the database again.
                            self.forget_tables();
                            tracing::warn!(message_id = %e.message_id, %reason, "postgres refused an event; it goes to rudder_discards whole");
                            if let Err(err) = self.discard_event(e, &reason).await {
                                r = Err(err);
                                break;
                            }
                        }
                        Err(err) => {
                            r = Err(err);
                            break;
                        }
                    }
                }
                r
            }
            r => r,
        };
        metrics::histogram!("ballast_postgres_load_seconds")
            .record(started.elapsed().as_secs_f64());
        match r {
            Ok(()) => Outcome::Delivered,
            Err(e) => {
                tracing::debug!(error = %e, "postgres load failed");
                outcome(e)
            }
        }
    }
}
