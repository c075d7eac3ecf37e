//! The outbox in the shared database (PostgreSQL store): every replica raises into it,
//! one sends it.
//!
//! - `ballast_alert_outbox(id, entry)`: entries in the order raised (a sequence).
//! - `ballast_alert_seen(idempotency)`: transitions already written; the insert into it
//!   decides, in the raise's transaction, whether the raise writes anything, so two
//!   replicas raising the same transition (a poison event struck on both) write it once.
//! - `ballast_alert_open(condition, since_ms)`: the open conditions of every replica.
//! - The sender is whichever replica holds the advisory lock `SENDER_LOCK` on its outbox
//!   session: one at a time, so each notifier still gets a condition's alerts in the
//!   order raised; when it dies its session ends and another replica takes the lock
//!   within its next look (`POLL`). An alert is sent at least once: a sender that dies
//!   between the notifier's answer and the delete leaves it for the next.
//!
//! The outbox's API is synchronous (see `mod.rs`), so the connection lives on a thread
//! of its own with a single-threaded runtime; callers wait for its answer (bounded by
//! the statement timeout), never for a task of the server's runtime.

use std::sync::mpsc;
use std::time::Duration;

use tokio_postgres::Client;

use super::{Entry, Outbox, Raise, READ_LIMIT};
use crate::alerts::{e, Action, AlertError};
use crate::pg::{connect, SCHEMA_LOCK, STATEMENT_TIMEOUT};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS ballast_alert_outbox (
    id bigserial PRIMARY KEY,
    entry bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS ballast_alert_seen (
    idempotency text PRIMARY KEY,
    at_ms bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS ballast_alert_open (
    condition text PRIMARY KEY,
    since_ms bigint NOT NULL
);
"#;

/// Held by the replica that sends the outbox.
const SENDER_LOCK: i64 = 0x6261_6c6c_6173_7403;
/// How often the sender looks for what other replicas raised.
const POLL: Duration = Duration::from_millis(500);

fn pg(err: tokio_postgres::Error) -> AlertError {
    AlertError(crate::pg::error_text(&err))
}

type Job = Box<dyn FnOnce(&mut Session) + Send>;

/// The outbox's connection, on its own thread.
struct Session {
    rt: tokio::runtime::Runtime,
    url: String,
    client: Option<Client>,
    /// This session holds `SENDER_LOCK`.
    sender: bool,
}

impl Session {
    /// Runs `f` on the connection (made again when it was lost), within the statement
    /// timeout. A failed or hung connection is dropped (and the sender lock with it).
    fn run<T>(
        &mut self,
        f: impl for<'c> FnOnce(
            &'c mut Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>,
        >,
    ) -> Result<T, AlertError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.sender = false;
            let url = self.url.clone();
            self.client = Some(self.rt.block_on(connect(&url, "")).map_err(e)?);
        }
        let Some(client) = self.client.as_mut() else {
            return Err(AlertError("postgres: not connected".into()));
        };
        let done = self
            .rt
            .block_on(async { tokio::time::timeout(STATEMENT_TIMEOUT, f(client)).await });
        match done {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(err)) => {
                if self.client.as_ref().is_some_and(|c| c.is_closed()) {
                    self.client = None;
                    self.sender = false;
                }
                Err(pg(err))
            }
            Err(_) => {
                self.client = None;
                self.sender = false;
                Err(AlertError("postgres: the query timed out".into()))
            }
        }
    }
}

pub struct PgOutbox {
    jobs: mpsc::Sender<Job>,
}

impl PgOutbox {
    /// Starts the outbox's thread, connects and creates the tables if needed (under the
    /// store's schema lock). Blocks until done.
    pub fn open(url: &str) -> Result<PgOutbox, AlertError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(e)?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let mut session = Session {
            rt,
            url: url.to_string(),
            client: None,
            sender: false,
        };
        std::thread::Builder::new()
            .name("alert-outbox".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&mut session);
                }
            })
            .map_err(e)?;
        let outbox = PgOutbox { jobs };
        outbox.call(|s| {
            s.run(|c| {
                Box::pin(async move {
                    c.execute("SELECT pg_advisory_lock($1)", &[&SCHEMA_LOCK])
                        .await?;
                    let created = c.batch_execute(SCHEMA).await;
                    c.execute("SELECT pg_advisory_unlock($1)", &[&SCHEMA_LOCK])
                        .await?;
                    created
                })
            })
        })?;
        Ok(outbox)
    }

    /// Runs `f` on the outbox's thread and waits for its answer.
    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Session) -> Result<T, AlertError> + Send + 'static,
    ) -> Result<T, AlertError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Box::new(move |s| {
                let _ = tx.send(f(s));
            }))
            .map_err(|_| AlertError("the outbox's thread stopped".into()))?;
        rx.recv()
            .map_err(|_| AlertError("the outbox's thread stopped".into()))?
    }
}

fn decode(id: i64, bytes: &[u8]) -> Result<(u64, Entry), AlertError> {
    Ok((id as u64, serde_json::from_slice(bytes).map_err(e)?))
}

impl Outbox for PgOutbox {
    fn raise(&self, r: &Raise<'_>) -> Result<bool, AlertError> {
        let idempotency = r.idempotency.to_string();
        let condition = r.condition.to_string();
        let trigger = r.action == Action::Trigger;
        let at_ms = r.at_ms as i64;
        let mut entries = Vec::with_capacity(r.entries.len());
        for entry in r.entries {
            entries.push(serde_json::to_vec(entry).map_err(e)?);
        }
        self.call(move |s| {
            s.run(move |c| {
                Box::pin(async move {
                    let tx = c.transaction().await?;
                    let fresh = tx
                        .execute(
                            "INSERT INTO ballast_alert_seen (idempotency, at_ms) VALUES ($1, $2) \
                             ON CONFLICT DO NOTHING",
                            &[&idempotency, &at_ms],
                        )
                        .await?
                        == 1;
                    if !fresh {
                        tx.rollback().await?;
                        return Ok(false);
                    }
                    for entry in &entries {
                        tx.execute(
                            "INSERT INTO ballast_alert_outbox (entry) VALUES ($1)",
                            &[entry],
                        )
                        .await?;
                    }
                    if trigger {
                        tx.execute(
                            "INSERT INTO ballast_alert_open (condition, since_ms) VALUES ($1, $2) \
                             ON CONFLICT (condition) DO UPDATE SET since_ms = EXCLUDED.since_ms",
                            &[&condition, &at_ms],
                        )
                        .await?;
                    } else {
                        tx.execute(
                            "DELETE FROM ballast_alert_open WHERE condition = $1",
                            &[&condition],
                        )
                        .await?;
                    }
                    tx.commit().await?;
                    Ok(true)
                })
            })
        })
    }

    fn open_since(&self, condition: &str) -> Result<Option<u64>, AlertError> {
        let condition = condition.to_string();
        self.call(move |s| {
            s.run(move |c| {
                Box::pin(async move {
                    let row = c
                        .query_opt(
                            "SELECT since_ms FROM ballast_alert_open WHERE condition = $1",
                            &[&condition],
                        )
                        .await?;
                    Ok(row.map(|r| r.get::<_, i64>(0) as u64))
                })
            })
        })
    }

    fn open_conditions(&self) -> Result<Vec<(String, u64)>, AlertError> {
        self.call(|s| {
            s.run(|c| {
                Box::pin(async move {
                    let rows = c
                        .query("SELECT condition, since_ms FROM ballast_alert_open", &[])
                        .await?;
                    Ok(rows
                        .iter()
                        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
                        .collect())
                })
            })
        })
    }

    fn pending(&self) -> Result<usize, AlertError> {
        self.call(|s| {
            s.run(|c| {
                Box::pin(async move {
                    let row = c
                        .query_one("SELECT count(*) FROM ballast_alert_outbox", &[])
                        .await?;
                    Ok(row.get::<_, i64>(0) as usize)
                })
            })
        })
    }

    fn entries(&self) -> Result<Vec<(u64, Entry)>, AlertError> {
        let rows = self.call(|s| {
            s.run(|c| {
                Box::pin(async move {
                    c.query(
                        "SELECT id, entry FROM ballast_alert_outbox ORDER BY id LIMIT $1",
                        &[&(READ_LIMIT as i64)],
                    )
                    .await
                })
            })
        })?;
        rows.iter()
            .map(|r| decode(r.get(0), r.get::<_, &[u8]>(1)))
            .collect()
    }

    fn finish(&self, id: u64) -> Result<(), AlertError> {
        let id = id as i64;
        self.call(move |s| {
            s.run(move |c| {
                Box::pin(async move {
                    c.execute("DELETE FROM ballast_alert_outbox WHERE id = $1", &[&id])
                        .await
                        .map(drop)
                })
            })
        })
    }

    fn reschedule(&self, id: u64, entry: &Entry) -> Result<(), AlertError> {
        let id = id as i64;
        let bytes = serde_json::to_vec(entry).map_err(e)?;
        self.call(move |s| {
            s.run(move |c| {
                Box::pin(async move {
                    c.execute(
                        "UPDATE ballast_alert_outbox SET entry = $2 WHERE id = $1",
                        &[&id, &bytes],
                    )
                    .await
                    .map(drop)
                })
            })
        })
    }

    /// Takes the sender lock if nobody holds it; keeps it while the session lives.
    fn is_sender(&self) -> bool {
        let held = self.call(|s| {
            let had = s.sender;
            // A statement either way: it finds out whether the session still lives
            // (and makes it again, without the lock, when it does not).
            let got = s.run(move |c| {
                Box::pin(async move {
                    if had {
                        c.execute("SELECT 1", &[]).await.map(|_| true)
                    } else {
                        let row = c
                            .query_one("SELECT pg_try_advisory_lock($1)", &[&SENDER_LOCK])
                            .await?;
                        Ok(row.get::<_, bool>(0))
                    }
                })
            })?;
            // `run` cleared the flag if it had to make a new session: the lock went
            // with the old one.
            s.sender = if had { s.sender && got } else { got };
            Ok(s.sender)
        });
        match held {
            Ok(held) => held,
            Err(err) => {
                tracing::warn!(error = %err, "the alert outbox's database is not reachable");
                false
            }
        }
    }

    fn poll_interval(&self) -> Option<Duration> {
        Some(POLL)
    }

    fn shared(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgtest::PgCluster;

    /// Two replicas' outboxes on one database pass the suite; one sender at a time, and
    /// another takes over when the sender's session ends.
    #[test]
    fn passes_the_outbox_conformance_suite_across_replicas() {
        let cluster = PgCluster::start();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(cluster.create_db("outbox"));
        let url = cluster.url("outbox");
        let a = PgOutbox::open(&url).unwrap();
        let b = PgOutbox::open(&url).unwrap();
        super::super::conformance::raise_send_and_conditions(&a, &b);
        let c = PgOutbox::open(&url).unwrap();
        super::super::conformance::after_reopen(&c);

        assert!(a.is_sender(), "the first to ask sends");
        assert!(a.is_sender(), "and keeps sending");
        assert!(!b.is_sender(), "one sender at a time");
        drop(a); // its thread ends, the session and the lock with it
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !b.is_sender() {
            assert!(
                std::time::Instant::now() < deadline,
                "the other replica takes the sender's place"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!c.is_sender());
    }
}
