//! Loading rows: the tables' columns kept in step with what arrives (`ALTER TABLE ... ADD
//! COLUMN IF NOT EXISTS`, the database's own types winning), then one transaction per
//! `deliver`: per table, COPY into a temporary staging table and merge into the table by
//! `id` (`ON CONFLICT (id) DO NOTHING`; `users` keeps the latest value of each column).
//! Committed means delivered; nothing is acknowledged before.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::load::{self, Batch, Column};
use super::schema::{ColType, Discard, Why, DISCARDS, STANDARD_TABLES};
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
/// Loads sent with `ON CONFLICT` straight away after a plain insert met an id its table
/// had (see [`PostgresSink::load_on`]).
pub(super) const CAREFUL_LOADS: u32 = 64;

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

/// Concurrent identical DDL (another loader creating the same table or column): a
/// unique violation in the catalog, "relation", "column", "schema" or "type" already
/// exists (`CREATE TABLE IF NOT EXISTS` racing another makes the table's row type first,
/// 42710), or a deadlock between the two.
fn ddl_race(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        matches!(
            db.code().code(),
            "23505" | "42P07" | "42701" | "42P06" | "42710" | "40P01"
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
    tables: Mutex<HashMap<String, Arc<HashMap<String, Column>>>>,
    ready: AtomicBool,
    /// Loads left that go straight to `ON CONFLICT` since a plain insert met an id the
    /// table had (see [`PostgresSink::load_on`]).
    careful: AtomicU32,
    /// The destination's id (the metrics' `destination` label).
    destination: String,
    max_tables: usize,
    max_shared_columns: usize,
    /// Event tables not created because the schema had `max_tables` (asked again once
    /// the column cache is dropped).
    capped: Mutex<HashSet<String>>,
}

/// Whether `table` is one of the tables every source shares (capped at
/// `max_shared_columns`).
fn shared(table: &str) -> bool {
    table != DISCARDS && STANDARD_TABLES.contains(&table)
}

impl PostgresSink {
    pub fn new(c: &PostgresConfig) -> Result<PostgresSink, super::config::PostgresConfigError> {
        PostgresSink::named(c, "")
    }

    /// The sink of the destination `id`.
    pub fn named(
        c: &PostgresConfig,
        id: &str,
    ) -> Result<PostgresSink, super::config::PostgresConfigError> {
        let mut config = c.check()?;
        crate::pg::configure(&mut config, &[SESSION_OPTIONS]);
        Ok(PostgresSink {
            config,
            schema: c.schema.clone(),
            pool: (0..POOL).map(|_| tokio::sync::Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            tables: Mutex::new(HashMap::new()),
            ready: AtomicBool::new(false),
            careful: AtomicU32::new(0),
            destination: id.to_string(),
            max_tables: c.max_tables,
            max_shared_columns: c.max_shared_columns,
            capped: Mutex::new(HashSet::new()),
        })
    }

    /// Loads left that skip the plain insert.
    #[cfg(test)]
    pub(super) fn careful_loads(&self) -> u32 {
        self.careful.load(Ordering::Relaxed)
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

    /// Turns `events` into rows and loads them in one transaction on a pooled connection
    /// (dropped on failure).
    async fn load(&self, events: &[Event]) -> Result<(), LoadError> {
        let events = events.to_vec();
        let batch = blocking(move || load::group(&events)).await?;
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
                Some(client) => self.load_on(client, batch).await,
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
        self.capped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The most columns the loader gives `table`.
    fn column_limit(&self, table: &str) -> usize {
        if shared(table) {
            self.max_shared_columns
        } else {
            MAX_COLUMNS
        }
    }

    /// Whether another event table may be created: fewer than `max_tables` in the schema.
    async fn room_for_a_table(&self, client: &Client) -> Result<bool, LoadError> {
        let standard: Vec<&str> = STANDARD_TABLES.to_vec();
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND c.relname <> ALL($2)",
                &[&self.schema, &standard],
            )
            .await
            .map_err(load_err)?
            .try_get(0)
            .map_err(load_err)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX) < self.max_tables)
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
    ) -> Result<Arc<HashMap<String, Column>>, LoadError> {
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, NULL), \
                 format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                 JOIN pg_class c ON c.oid = a.attrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p') \
                 AND a.attnum > 0 AND NOT a.attisdropped",
                &[&self.schema, &table],
            )
            .await
            .map_err(load_err)?;
        let mut cols = HashMap::with_capacity(rows.len());
        for r in rows {
            let name: String = r.try_get(0).map_err(load_err)?;
            let base: String = r.try_get(1).map_err(load_err)?;
            let full: String = r.try_get(2).map_err(load_err)?;
            cols.insert(name, Column::of_type(&base, &full));
        }
        let cols = Arc::new(cols);
        self.tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(table.to_string(), cols.clone());
        Ok(cols)
    }

    /// Makes `table` have the columns `wanted` names (as many as fit under its limit,
    /// [`Self::column_limit`]); returns its columns as the database has them, or None for
    /// an event table that does not exist and may not be created (`max_tables`).
    async fn ensure_columns(
        &self,
        client: &Client,
        table: &str,
        wanted: &BTreeMap<String, ColType>,
    ) -> Result<Option<Arc<HashMap<String, Column>>>, LoadError> {
        if self
            .capped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(table)
        {
            return Ok(None);
        }
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
            if !STANDARD_TABLES.contains(&table) && !self.room_for_a_table(client).await? {
                let mut capped = self.capped.lock().unwrap_or_else(|p| p.into_inner());
                if capped.len() >= 100_000 {
                    capped.clear();
                }
                capped.insert(table.to_string());
                return Ok(None);
            }
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {} (id text COLLATE \"C\" PRIMARY KEY, \
                 received_at timestamp with time zone, uuid_ts timestamp with time zone)",
                self.table(table)
            );
            self.ddl(client, &sql).await.map_err(ddl_err)?;
            metrics::counter!("ballast_warehouse_tables_added_total", "destination" => self.destination.clone())
                .increment(1);
            known = self.read_columns(client, table).await?;
        }
        let room = self.column_limit(table).saturating_sub(known.len());
        // The row's own columns first: they are never the ones left out; then the
        // context's, then properties and traits.
        let mut new: Vec<_> = wanted
            .iter()
            .filter(|(c, _)| !known.contains_key(*c))
            .collect();
        new.sort_by_key(|(c, _)| {
            let own = load::fixed_type(c).is_some()
                || matches!(c.as_str(), "name" | "group_id" | "previous_id");
            let rank = if own {
                0
            } else if c.starts_with("context_") {
                1
            } else {
                2
            };
            (rank, *c)
        });
        new.truncate(room);
        if new.is_empty() {
            return Ok(Some(known));
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
        metrics::counter!("ballast_warehouse_columns_added_total", "destination" => self.destination.clone())
            .increment(new.len() as u64);
        self.read_columns(client, table).await.map(Some)
    }

    async fn load_on(&self, client: &mut Client, batch: Batch) -> Result<(), LoadError> {
        self.setup(client).await?;
        let mut known = Vec::with_capacity(batch.tables.len());
        for t in &batch.tables {
            known.push(self.ensure_columns(client, &t.table, &t.wanted).await?);
        }
        let targets: Vec<String> = batch.tables.iter().map(|t| self.table(&t.table)).collect();
        let limits: Vec<usize> = batch
            .tables
            .iter()
            .map(|t| self.column_limit(&t.table))
            .collect();
        let discards_table = self.table(DISCARDS);
        let max_tables = self.max_tables;
        let (statements, rows, discards, capped) = blocking(move || {
            let mut discards = batch.discards;
            let mut statements = Vec::new();
            let mut rows = 0;
            let mut capped = 0;
            let (made, not_made): (Vec<_>, Vec<_>) = batch
                .tables
                .into_iter()
                .zip(known)
                .zip(targets.into_iter().zip(limits))
                .partition(|((_, known), _)| known.is_some());
            // Event tables not created: their rows' columns that `tracks` does not have
            // (the properties) go to the discards.
            let tracks = made.iter().find(|((t, _), _)| t.table == "tracks");
            for ((t, _), _) in not_made {
                capped += t.rows.len();
                for row in t.rows {
                    let in_tracks = tracks.and_then(|((tracks, _), _)| {
                        tracks
                            .rows
                            .binary_search_by(|r| r.id.cmp(&row.id))
                            .ok()
                            .map(|i| &tracks.rows[i])
                    });
                    for (c, v) in row.cols.iter() {
                        if in_tracks.is_some_and(|r| r.cols.contains_key(c)) {
                            continue;
                        }
                        discards.push(Discard {
                            table: t.table.clone(),
                            row_id: row.id.clone(),
                            column: c.to_string(),
                            value: super::schema::discard_text(&v.text()),
                            received_at: row.received_at.clone(),
                            reason: format!(
                                "the schema has max_tables ({max_tables}) event tables: this \
                                 event is in tracks only"
                            ),
                            why: Why::TableLimit,
                        });
                    }
                }
            }
            for ((t, known), (target, limit)) in made {
                rows += t.rows.len();
                let known = known.unwrap_or_default();
                statements.extend(load::encode(t, &known, limit, &target, &mut discards));
            }
            load::dedup_discards(&mut discards);
            statements.extend(load::encode_discards(&discards, &discards_table));
            let mut per_why: BTreeMap<Why, u64> = BTreeMap::new();
            for d in &discards {
                *per_why.entry(d.why).or_default() += 1;
            }
            (statements, rows, per_why, capped)
        })
        .await?;
        // Rows whose id a table has are skipped (`ON CONFLICT`), which costs PostgreSQL a
        // second index descent per row (about a quarter of its CPU in a load). So a load
        // first goes as plain inserts, and when one meets an id the table has (a
        // re-delivery, a client's retry) it is rolled back and sent again with `ON
        // CONFLICT`; the next CAREFUL_LOADS loads then go with it straight away, so a
        // stream with duplicates in it pays a wasted attempt once in that many loads.
        let plain_first = self
            .careful
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_err();
        let conflicted = plain_first
            && match run(client, &statements, true).await {
                Ok(()) => false,
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    self.careful.store(CAREFUL_LOADS, Ordering::Relaxed);
                    metrics::counter!("ballast_postgres_plain_insert_conflicts_total").increment(1);
                    true
                }
                Err(e) => return Err(statement_err(e)),
            };
        if !plain_first || conflicted {
            run(client, &statements, false)
                .await
                .map_err(statement_err)?;
        }
        metrics::counter!("ballast_postgres_rows_loaded_total").increment(rows as u64);
        let total: u64 = discards.values().sum();
        metrics::counter!("ballast_postgres_discards_total").increment(total);
        for (why, n) in discards {
            metrics::counter!("ballast_warehouse_discards_total",
                "destination" => self.destination.clone(), "reason" => why.label())
            .increment(n);
        }
        if capped > 0 {
            metrics::counter!("ballast_warehouse_events_without_table_total",
                "destination" => self.destination.clone())
            .increment(capped as u64);
        }
        Ok(())
    }
}

/// Runs `statements` in one transaction, sent at once (pipelined), and commits it; as
/// plain inserts where a statement has that form, if `plain`. Dropped on failure, the
/// transaction is rolled back.
async fn run(
    client: &mut Client,
    statements: &[load::Statement],
    plain: bool,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let results = futures::future::join_all(statements.iter().map(|s| {
        let sql = match &s.plain {
            Some(p) if plain => p.as_str(),
            _ => s.sql.as_str(),
        };
        let tx = &tx;
        async move { tx.execute(sql, &s.params()).await }
    }))
    .await;
    if let Some(e) = first_error(results) {
        return Err(e);
    }
    tx.commit().await
}

/// What a failed statement of a load means: only "the transaction is aborted" with no
/// cause seen is passing.
fn statement_err(e: tokio_postgres::Error) -> LoadError {
    if e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) {
        LoadError::Temporary(describe(&e))
    } else {
        load_err(e)
    }
}

/// The error of a pipelined transaction: the first that is not "the transaction is
/// aborted" (25P02, what every statement after a failed one gets), else that one.
fn first_error(results: Vec<Result<u64, tokio_postgres::Error>>) -> Option<tokio_postgres::Error> {
    let mut aborted = None;
    for r in results {
        match r {
            Ok(_) => {}
            Err(e) if e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) => {
                aborted.get_or_insert(e);
            }
            Err(e) => return Some(e),
        }
    }
    aborted
}

/// Runs CPU-bound work (turning events into rows, encoding them) on a blocking thread,
/// off the async threads that serve ingestion; a panic in it is the caller's.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, LoadError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(t) => Ok(t),
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => Err(LoadError::Temporary(format!("shutting down: {e}"))),
        },
    }
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
        let r = match self.load(events).await {
            Err(LoadError::Refused(reason)) => {
                tracing::warn!(%reason, events = events.len(), "postgres refused a load; splitting it to find the events it refuses");
                self.split(events).await
            }
            Ok(()) => Ok(Vec::new()),
            Err(e) => Err(e),
        };
        metrics::histogram!("ballast_postgres_load_seconds")
            .record(started.elapsed().as_secs_f64());
        match r {
            Ok(refused) if refused.is_empty() => Outcome::Delivered,
            Ok(refused) => Outcome::DeliveredExcept { refused },
            Err(e) => {
                tracing::debug!(error = %e, "postgres load failed");
                outcome(e)
            }
        }
    }
}

impl PostgresSink {
    /// One event's data (most likely) made the database refuse a load: the events are
    /// loaded in halves, in order, each half in its own transaction, halves refused
    /// split again, down to the events the database refuses alone. Returns those (index,
    /// reason): the router dead-letters them; everything else is loaded.
    async fn split(&self, events: &[Event]) -> Result<Vec<(usize, String)>, LoadError> {
        let mut refused = Vec::new();
        let mut todo: VecDeque<std::ops::Range<usize>> = VecDeque::new();
        let half = events.len() / 2;
        todo.extend([0..half, half..events.len()]);
        while let Some(range) = todo.pop_front() {
            if range.is_empty() {
                continue;
            }
            // A column's type may have been changed under us: ask the database again.
            self.forget_tables();
            match self.load(&events[range.clone()]).await {
                Ok(()) => {}
                Err(LoadError::Refused(reason)) if range.len() == 1 => {
                    let e = &events[range.start];
                    tracing::warn!(message_id = %e.message_id, %reason, "postgres refused an event; it goes to the dead letters");
                    refused.push((range.start, format!("postgres refused the event: {reason}")));
                }
                Err(LoadError::Refused(_)) => {
                    let mid = range.start + range.len() / 2;
                    todo.push_front(mid..range.end);
                    todo.push_front(range.start..mid);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(refused)
    }
}
