//! `postgres` against a throwaway PostgreSQL cluster: read back from the `tracks` table.
//! The sink logs in as `loader` (not a superuser). A temporary failure is the database
//! refusing it connections (CONNECT revoked, its sessions ended); a refusal is a role
//! that may not create the schema.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use super::Target;
use crate::destinations::postgres::tests::{admin, sink};
use crate::destinations::Destination;
use crate::pgtest::PgCluster;

struct Pg {
    pg: PgCluster,
    refused: AtomicBool,
}

#[async_trait]
impl Target for Pg {
    async fn sink(&self) -> Arc<dyn Destination> {
        if self.refused.load(Ordering::SeqCst) {
            let url = format!("postgres://reader@127.0.0.1:{}/wh", self.pg.port);
            Arc::new(sink(&url, "not_mine"))
        } else {
            let url = format!("postgres://loader@127.0.0.1:{}/wh", self.pg.port);
            Arc::new(sink(&url, "conformance"))
        }
    }

    async fn stored(&self) -> Vec<String> {
        let c = admin(&self.pg.url("wh")).await;
        match c.query("SELECT id FROM conformance.tracks", &[]).await {
            Ok(rows) => rows.into_iter().map(|r| r.get(0)).collect(),
            Err(_) => Vec::new(), // no table yet
        }
    }

    async fn break_temporarily(&self) -> bool {
        let c = admin(&self.pg.url("wh")).await;
        c.batch_execute(
            "REVOKE CONNECT ON DATABASE wh FROM PUBLIC;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'loader';",
        )
        .await
        .unwrap();
        true
    }

    async fn refuse(&self) -> bool {
        let c = admin(&self.pg.url("wh")).await;
        c.batch_execute("CREATE ROLE reader LOGIN").await.unwrap();
        self.refused.store(true, Ordering::SeqCst);
        true
    }

    async fn heal(&self) {
        self.refused.store(false, Ordering::SeqCst);
        let c = admin(&self.pg.url("wh")).await;
        c.batch_execute("GRANT CONNECT ON DATABASE wh TO PUBLIC")
            .await
            .unwrap();
    }

    fn deduplicates(&self) -> bool {
        true
    }
}

#[tokio::test]
async fn postgres_conforms() {
    let pg = PgCluster::start();
    pg.create_db("wh").await;
    admin(&pg.url("wh"))
        .await
        .batch_execute("CREATE ROLE loader LOGIN; GRANT CREATE ON DATABASE wh TO loader")
        .await
        .unwrap();
    let target = Pg {
        pg,
        refused: AtomicBool::new(false),
    };
    super::run(&target).await;
}
