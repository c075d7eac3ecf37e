//! The router's state in the shared PostgreSQL database (with the PostgreSQL store), so
//! that every replica sees the same dead letters (list and replay from any of them),
//! and a replica that takes a partition over knows the retry state and strikes of its
//! events. Dead letters keep their JSON as the redb backend does; ids come from a
//! sequence.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use tokio_postgres::Client;

use super::{to_ms, DbError, DeadLetter, RetryInfo, RouterState};
use crate::pg::{SCHEMA_LOCK, STATEMENT_TIMEOUT};

async fn connect(url: &str) -> Result<Client, crate::pg::ConnectError> {
    crate::pg::connect(url, "").await
}
use crate::store::Position;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS ballast_dead_letter (
    id bigserial PRIMARY KEY,
    destination text NOT NULL,
    dead_at_ms bigint NOT NULL,
    replay boolean NOT NULL DEFAULT false,
    letter bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS ballast_dead_letter_by_destination
    ON ballast_dead_letter (destination, replay, id);
CREATE TABLE IF NOT EXISTS ballast_retry (
    destination text NOT NULL,
    pos bigint NOT NULL,
    attempts int NOT NULL,
    first_attempt_ms bigint NOT NULL,
    PRIMARY KEY (destination, pos)
);
CREATE TABLE IF NOT EXISTS ballast_strike (
    destination text NOT NULL,
    key text NOT NULL,
    strikes int NOT NULL,
    PRIMARY KEY (destination, key)
);
"#;

fn db_err(e: tokio_postgres::Error) -> DbError {
    DbError(crate::pg::error_text(&e))
}

pub struct PgRouterState {
    url: String,
    /// Single statements (shared, pipelined).
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
    /// Transactions (one at a time).
    tx_client: tokio::sync::Mutex<Option<Client>>,
}

impl PgRouterState {
    /// Connects and creates the tables if needed (under the store's schema lock).
    pub async fn open(url: &str) -> Result<PgRouterState, DbError> {
        let client = connect(url).await.map_err(|e| DbError(e.to_string()))?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(db_err)?;
        let created = client.batch_execute(SCHEMA).await.map_err(db_err);
        client
            .execute("SELECT pg_advisory_unlock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(db_err)?;
        created?;
        Ok(PgRouterState {
            url: url.to_string(),
            client: tokio::sync::Mutex::new(Some(Arc::new(client))),
            tx_client: tokio::sync::Mutex::new(None),
        })
    }

    /// The connection (made again when it was lost).
    async fn client(&self) -> Result<Arc<Client>, DbError> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = Arc::new(
            connect(&self.url)
                .await
                .map_err(|e| DbError(e.to_string()))?,
        );
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Runs `f` (a transaction) on the connection kept for transactions, within the
    /// statement timeout.
    async fn run<T>(
        &self,
        f: impl for<'c> FnOnce(
            &'c mut Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>,
        >,
    ) -> Result<T, DbError> {
        let mut guard = self.tx_client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(
                connect(&self.url)
                    .await
                    .map_err(|e| DbError(e.to_string()))?,
            );
        }
        let Some(client) = guard.as_mut() else {
            return Err(DbError("postgres: not connected".into()));
        };
        match tokio::time::timeout(STATEMENT_TIMEOUT, f(client)).await {
            Ok(r) => r.map_err(db_err),
            Err(_) => {
                *guard = None; // hung: a new session next time
                Err(DbError("postgres: the query timed out".into()))
            }
        }
    }
}

fn decode(id: i64, letter: &[u8]) -> Result<DeadLetter, DbError> {
    let mut l: DeadLetter = serde_json::from_slice(letter).map_err(super::e)?;
    l.id = id as u64;
    Ok(l)
}

#[async_trait]
impl RouterState for PgRouterState {
    async fn add_dead_letters(&self, letters: Vec<DeadLetter>) -> Result<Vec<u64>, DbError> {
        let mut rows = Vec::with_capacity(letters.len());
        for l in &letters {
            rows.push((
                l.destination.clone(),
                l.dead_at_ms as i64,
                serde_json::to_vec(l).map_err(super::e)?,
                l.position.map(|p| p as i64),
            ));
        }
        self.run(|c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                let mut ids = Vec::with_capacity(rows.len());
                for (dest, dead_at, bytes, pos) in &rows {
                    let id: i64 = tx
                        .query_one(
                            "INSERT INTO ballast_dead_letter (destination, dead_at_ms, letter)
                             VALUES ($1, $2, $3) RETURNING id",
                            &[dest, dead_at, bytes],
                        )
                        .await?
                        .get(0);
                    if let Some(p) = pos {
                        tx.execute(
                            "DELETE FROM ballast_retry WHERE destination = $1 AND pos = $2",
                            &[dest, p],
                        )
                        .await?;
                    }
                    ids.push(id as u64);
                }
                tx.commit().await?;
                Ok(ids)
            })
        })
        .await
    }

    async fn list(
        &self,
        destination: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DbError> {
        let dest = destination.map(str::to_string);
        let limit = limit.min(1_000_000) as i64;
        let c = self.client().await?;
        let rows = tokio::time::timeout(
            STATEMENT_TIMEOUT,
            c.query(
                "SELECT id, letter FROM ballast_dead_letter
                 WHERE NOT replay AND ($1::text IS NULL OR destination = $1)
                 ORDER BY id LIMIT $2",
                &[&dest, &limit],
            ),
        )
        .await
        .map_err(|_| DbError("postgres: the query timed out".into()))?
        .map_err(db_err)?;
        rows.iter().map(|r| decode(r.get(0), r.get(1))).collect()
    }

    async fn count(&self, destination: &str) -> Result<u64, DbError> {
        let c = self.client().await?;
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM ballast_dead_letter WHERE destination = $1 AND NOT replay",
                &[&destination],
            )
            .await
            .map_err(db_err)?
            .get(0);
        Ok(n.max(0) as u64)
    }

    async fn replay(&self, destination: &str, since: Option<SystemTime>) -> Result<usize, DbError> {
        let since_ms = since.map(to_ms).unwrap_or(0) as i64;
        let c = self.client().await?;
        let n = c
            .execute(
                "UPDATE ballast_dead_letter SET replay = true
                 WHERE destination = $1 AND NOT replay AND dead_at_ms >= $2",
                &[&destination, &since_ms],
            )
            .await
            .map_err(db_err)?;
        Ok(n as usize)
    }

    async fn replay_queue(&self, destination: &str) -> Result<Vec<DeadLetter>, DbError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT id, letter FROM ballast_dead_letter
                 WHERE destination = $1 AND replay ORDER BY id",
                &[&destination],
            )
            .await
            .map_err(db_err)?;
        rows.iter().map(|r| decode(r.get(0), r.get(1))).collect()
    }

    async fn replay_done(&self, destination: &str, ids: &[u64]) -> Result<(), DbError> {
        let ids: Vec<i64> = ids.iter().map(|i| *i as i64).collect();
        let c = self.client().await?;
        c.execute(
            "DELETE FROM ballast_dead_letter WHERE destination = $1 AND replay AND id = ANY($2)",
            &[&destination, &ids],
        )
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn add_strikes(&self, events: &[(String, String)]) -> Result<Vec<u32>, DbError> {
        let events = events.to_vec();
        self.run(|c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                let mut counts = Vec::with_capacity(events.len());
                for (dest, key) in &events {
                    let n: i32 = tx
                        .query_one(
                            "INSERT INTO ballast_strike (destination, key, strikes) VALUES ($1, $2, 1)
                             ON CONFLICT (destination, key)
                             DO UPDATE SET strikes = ballast_strike.strikes + 1
                             RETURNING strikes",
                            &[dest, key],
                        )
                        .await?
                        .get(0);
                    counts.push(n.max(0) as u32);
                }
                tx.commit().await?;
                Ok(counts)
            })
        })
        .await
    }

    async fn load_strikes(&self, destination: &str) -> Result<HashMap<String, u32>, DbError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT key, strikes FROM ballast_strike WHERE destination = $1",
                &[&destination],
            )
            .await
            .map_err(db_err)?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i32>(1).max(0) as u32))
            .collect())
    }

    async fn clear_strikes(&self, destination: &str, keys: &[String]) -> Result<(), DbError> {
        let c = self.client().await?;
        c.execute(
            "DELETE FROM ballast_strike WHERE destination = $1 AND key = ANY($2)",
            &[&destination, &keys],
        )
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn load_retry(&self, destination: &str) -> Result<HashMap<Position, RetryInfo>, DbError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT pos, attempts, first_attempt_ms FROM ballast_retry WHERE destination = $1",
                &[&destination],
            )
            .await
            .map_err(db_err)?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, i64>(0) as u64,
                    RetryInfo {
                        attempts: r.get::<_, i32>(1).max(0) as u32,
                        first_attempt_ms: r.get::<_, i64>(2).max(0) as u64,
                    },
                )
            })
            .collect())
    }

    async fn save_retry(
        &self,
        destination: &str,
        changes: &[(Position, Option<RetryInfo>)],
    ) -> Result<(), DbError> {
        let (mut set_pos, mut set_attempts, mut set_first, mut gone) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (p, info) in changes {
            match info {
                Some(i) => {
                    set_pos.push(*p as i64);
                    set_attempts.push(i.attempts as i32);
                    set_first.push(i.first_attempt_ms as i64);
                }
                None => gone.push(*p as i64),
            }
        }
        let dest = destination.to_string();
        self.run(|c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                tx.execute(
                    "DELETE FROM ballast_retry WHERE destination = $1 AND pos = ANY($2)",
                    &[&dest, &gone],
                )
                .await?;
                tx.execute(
                    "INSERT INTO ballast_retry (destination, pos, attempts, first_attempt_ms)
                     SELECT $1, * FROM unnest($2::bigint[], $3::int[], $4::bigint[])
                     ON CONFLICT (destination, pos) DO UPDATE
                     SET attempts = excluded.attempts, first_attempt_ms = excluded.first_attempt_ms",
                    &[&dest, &set_pos, &set_attempts, &set_first],
                )
                .await?;
                tx.commit().await
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgtest::PgCluster;

    /// What one replica writes, another sees: dead letters, replay, retry state, strikes.
    #[tokio::test]
    async fn replicas_share_dead_letters_retry_state_and_strikes() {
        let cluster = PgCluster::start();
        cluster.create_db("state").await;
        let url = cluster.url("state");
        let a = PgRouterState::open(&url).await.unwrap();
        let b = PgRouterState::open(&url).await.unwrap();
        super::super::conformance::dead_letters_retry_state_and_strikes(&a, &b).await;
    }
}
