//! `ballast-bench drain`: a burst, then delivery of its backlog, for each store in one
//! run (the embedded log and PostgreSQL), and end-to-end delivery under load.
//!
//! For each store:
//! 1. **Burst**: ballast without destinations takes `--duration` of load (ingest-only
//!    rate), then stops (SIGTERM).
//! 2. **Drain**: the same data (directory or database) is served again with a webhook
//!    destination to the sink; from the moment it answers until every accepted event is
//!    delivered: the drain rate. The longest time without progress (sampled every
//!    second) and `ballast_storage_timeouts_total` show stalls.
//! 3. **Under load** (`--e2e`): a fresh ballast with the destination takes the same load
//!    and then delivers what is left: events / (first request → last delivery), compared
//!    with the store's ingest-only rate.
//!
//! The PostgreSQL runs use a new database per server (created from `--postgres-url`,
//! which names a database the user may create others from, and dropped afterwards).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use hyper::StatusCode;
use serde::Serialize;
use tokio::time::{sleep, timeout, Instant};

use crate::harness::{
    free_port, http_get, wait_ready, ServerProcess, WebhookDestination, DESTINATION_ID, WRITE_KEY,
};
use crate::load::{self, LoadConfig, Mode};

#[derive(Clone, Debug, clap::Args)]
pub struct DrainArgs {
    /// The ballast binary (e.g. target/release/ballast).
    #[arg(long)]
    pub ballast_bin: PathBuf,
    /// A PostgreSQL database URL to create the runs' databases from (e.g.
    /// postgres://ballast@127.0.0.1:5432/postgres). Without it only the embedded store runs.
    #[arg(long)]
    pub postgres_url: Option<String>,
    /// Length of the burst (and of the load of the under-load run).
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Concurrent connections of the load.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Events per request.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Distinct userIds.
    #[arg(long, default_value_t = 100)]
    pub users: u32,
    /// The webhook destination's `batch_size`.
    #[arg(long, default_value_t = 100)]
    pub webhook_batch_size: usize,
    /// The webhook destination's `concurrency`.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// `storage.partitions` of the PostgreSQL store.
    #[arg(long, default_value_t = 16)]
    pub partitions: u32,
    /// Also measure end-to-end delivery under load.
    #[arg(long)]
    pub e2e: bool,
    /// Give up waiting for a drain after this long.
    #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Where the temporary data directories go (default: the system temp dir).
    #[arg(long)]
    pub tmp_dir: Option<PathBuf>,
    /// Also write the results (JSON) to FILE.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Store {
    Embedded,
    Postgres,
}

#[derive(Debug, Default, Serialize)]
struct StoreOutcome {
    store: String,
    /// Events accepted in the burst.
    events: u64,
    ingest_events_per_sec: f64,
    drained: bool,
    drain_seconds: f64,
    drain_events_per_sec: f64,
    /// The longest time without any delivery during the drain.
    longest_stall_s: f64,
    /// `ballast_storage_timeouts_total` at the end of the drain.
    store_timeouts: u64,
    /// Under load (`--e2e`).
    e2e_events: Option<u64>,
    e2e_events_per_sec: Option<f64>,
    /// `e2e_events_per_sec` / `ingest_events_per_sec`.
    e2e_ratio: Option<f64>,
    samples: Vec<(f64, u64)>,
}

pub async fn run(args: DrainArgs) -> anyhow::Result<()> {
    if !args.ballast_bin.is_file() {
        bail!("ballast binary {} not found", args.ballast_bin.display());
    }
    let exe = std::env::current_exe().context("locating the ballast-bench executable")?;
    let tmp = args.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let root = tempfile::Builder::new()
        .prefix("ballast-drain-")
        .tempdir_in(&tmp)
        .with_context(|| format!("creating a temporary directory in {}", tmp.display()))?;
    let sink_addr = free_port()?;
    let mut cmd = Command::new(&exe);
    cmd.arg("sink-server")
        .arg("--listen")
        .arg(sink_addr.to_string());
    let mut sink = ServerProcess::spawn("sink".into(), cmd, root.path().join("sink.log"))?;
    wait_ready(
        &mut sink,
        sink_addr,
        "/stats",
        true,
        Duration::from_secs(30),
    )
    .await?;

    let mut stores = vec![Store::Embedded];
    if args.postgres_url.is_some() {
        stores.push(Store::Postgres);
    }
    let mut outcomes = Vec::new();
    for store in stores {
        outcomes.push(one_store(&args, root.path(), sink_addr, store).await?);
    }
    let text = report(&args, &outcomes);
    println!("\n{text}");
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&outcomes)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

fn report(args: &DrainArgs, outcomes: &[StoreOutcome]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "burst: {} of /v1/batch ({} events per request, {} users, {} connections); webhook batch_size {}, concurrency {}\n",
        humantime::format_duration(args.duration),
        args.batch_size,
        args.users,
        args.connections,
        args.webhook_batch_size,
        args.concurrency
    );
    let _ = writeln!(
        t,
        "| store | events | ingest ev/s | drain s | drain ev/s | longest stall s | store timeouts | e2e ev/s | e2e / ingest |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for o in outcomes {
        let _ = writeln!(
            t,
            "| {} | {} | {:.0} | {:.1}{} | {:.0} | {:.1} | {} | {} | {} |",
            o.store,
            o.events,
            o.ingest_events_per_sec,
            o.drain_seconds,
            if o.drained { "" } else { " (not drained)" },
            o.drain_events_per_sec,
            o.longest_stall_s,
            o.store_timeouts,
            o.e2e_events_per_sec
                .map_or("-".into(), |r| format!("{r:.0}")),
            o.e2e_ratio.map_or("-".into(), |r| format!("{r:.2}")),
        );
    }
    if let [e, p] = outcomes {
        if e.drain_events_per_sec > 0.0 {
            let _ = writeln!(
                t,
                "\nPostgreSQL drain / embedded drain: {:.2}",
                p.drain_events_per_sec / e.drain_events_per_sec
            );
        }
    }
    t
}

/// A database for one server, dropped when done.
struct Database {
    admin_url: String,
    name: String,
}

impl Database {
    async fn create(admin_url: &str, tag: &str) -> anyhow::Result<Database> {
        let name = format!("ballast_drain_{}_{tag}", std::process::id());
        let (c, conn) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {admin_url}"))?;
        let driver = tokio::spawn(conn);
        c.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
            .await?;
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .context("creating the benchmark's database")?;
        drop(c);
        let _ = driver.await;
        Ok(Database {
            admin_url: admin_url.to_string(),
            name,
        })
    }

    /// The database's URL: `admin_url` with this database's name.
    fn url(&self) -> anyhow::Result<String> {
        let (base, query) = match self.admin_url.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (self.admin_url.as_str(), None),
        };
        let Some(slash) = base.rfind('/').filter(|&i| i > "postgres://".len()) else {
            bail!("--postgres-url must name a database (postgres://user@host:port/db)");
        };
        let mut url = format!("{}/{}", &base[..slash], self.name);
        if let Some(q) = query {
            url.push('?');
            url.push_str(q);
        }
        Ok(url)
    }

    async fn drop_it(self) {
        if let Ok((c, conn)) = tokio_postgres::connect(&self.admin_url, tokio_postgres::NoTls).await
        {
            let driver = tokio::spawn(conn);
            let _ = c
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await;
            drop(c);
            let _ = driver.await;
        }
    }
}

fn config(
    listen: SocketAddr,
    admin: SocketAddr,
    data_dir: &Path,
    storage: &str,
    destination: Option<&WebhookDestination>,
) -> String {
    let mut c = format!(
        "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\ndata_dir = {}\n\n[storage]\n{storage}\n\n\
         [[sources]]\nid = \"bench\"\nwrite_key = \"{WRITE_KEY}\"\nenabled = true\n",
        serde_json::to_string(&data_dir.to_string_lossy()).unwrap_or_default()
    );
    if let Some(d) = destination {
        let _ = write!(
            c,
            "\n[[destinations]]\nid = \"{DESTINATION_ID}\"\ntype = \"webhook\"\nsources = [\"bench\"]\nurl = {}\nconcurrency = {}\nbatch_size = {}\n",
            serde_json::to_string(&d.url).unwrap_or_default(),
            d.concurrency,
            d.batch_size
        );
    }
    c
}

struct Ballast {
    proc: ServerProcess,
    admin: SocketAddr,
    addr: SocketAddr,
}

async fn start(
    args: &DrainArgs,
    dir: &Path,
    name: &str,
    storage: &str,
    destination: Option<&WebhookDestination>,
) -> anyhow::Result<Ballast> {
    let addr = free_port()?;
    let admin = free_port()?;
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        config(addr, admin, &dir.join("data"), storage, destination),
    )?;
    let mut cmd = Command::new(&args.ballast_bin);
    cmd.arg("serve").arg("--config").arg(&path).current_dir(dir);
    let mut proc = ServerProcess::spawn(name.into(), cmd, dir.join(format!("{name}.log")))?;
    wait_ready(&mut proc, addr, "/livez", true, Duration::from_secs(60)).await?;
    Ok(Ballast { proc, admin, addr })
}

fn load_config(args: &DrainArgs, addr: SocketAddr) -> LoadConfig {
    LoadConfig {
        url: format!("http://{addr}"),
        write_key: WRITE_KEY.into(),
        connections: args.connections,
        duration: args.duration,
        mode: Mode::Batch,
        batch_size: args.batch_size,
        warmup: Duration::ZERO,
        pool: None,
        users: args.users,
        rate: 0,
    }
}

/// The destination's `delivered` + `aborted` from `/v1/status`.
async fn delivered(admin: SocketAddr) -> anyhow::Result<u64> {
    let (status, body) = timeout(Duration::from_secs(5), http_get(admin, "/v1/status"))
        .await
        .context("GET /v1/status timed out")??;
    if status != StatusCode::OK {
        bail!("GET /v1/status answered {status}");
    }
    let doc: serde_json::Value = serde_json::from_slice(&body)?;
    let d = doc["destinations"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["id"] == DESTINATION_ID))
        .context("no destination in /v1/status")?;
    Ok(d["delivered"].as_u64().unwrap_or(0) + d["aborted"].as_u64().unwrap_or(0))
}

/// The sum of `ballast_storage_timeouts_total` over its operations.
async fn store_timeouts(admin: SocketAddr) -> u64 {
    let Ok(Ok((StatusCode::OK, body))) =
        timeout(Duration::from_secs(5), http_get(admin, "/metrics")).await
    else {
        return 0;
    };
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.starts_with("ballast_storage_timeouts_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Waits until `want` events are delivered; returns (seconds, drained, longest stall,
/// samples).
async fn wait_drained(
    admin: SocketAddr,
    want: u64,
    limit: Duration,
    proc: &mut ServerProcess,
) -> anyhow::Result<(f64, bool, f64, Vec<(f64, u64)>)> {
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut last = (started, 0u64);
    let mut longest = 0f64;
    let mut next_sample = started;
    loop {
        proc.check_alive()?;
        let now = Instant::now();
        let d = delivered(admin).await.unwrap_or(last.1);
        if d > last.1 {
            longest = longest.max((now - last.0).as_secs_f64());
            last = (now, d);
        }
        if now >= next_sample {
            samples.push(((now - started).as_secs_f64(), d));
            next_sample += Duration::from_secs(1);
        }
        if d >= want {
            return Ok(((now - started).as_secs_f64(), true, longest, samples));
        }
        if now - started > limit {
            longest = longest.max((now - last.0).as_secs_f64());
            return Ok((limit.as_secs_f64(), false, longest, samples));
        }
        sleep(Duration::from_millis(50)).await;
    }
}

async fn one_store(
    args: &DrainArgs,
    root: &Path,
    sink: SocketAddr,
    store: Store,
) -> anyhow::Result<StoreOutcome> {
    let name = match store {
        Store::Embedded => "embedded",
        Store::Postgres => "postgres",
    };
    let destination = WebhookDestination {
        url: format!("http://{sink}/in"),
        concurrency: args.concurrency,
        batch_size: args.webhook_batch_size,
        transformation: None,
    };
    let dir = root.join(name);
    std::fs::create_dir_all(&dir)?;
    let mut databases = Vec::new();
    if store == Store::Postgres {
        let Some(url) = &args.postgres_url else {
            bail!("no --postgres-url");
        };
        databases.push(Database::create(url, "burst").await?);
    }
    let pg_storage = |db: &Database| -> anyhow::Result<String> {
        Ok(format!(
            "backend = \"postgres\"\npostgres_url = {}\npartitions = {}",
            serde_json::to_string(&db.url()?)?,
            args.partitions
        ))
    };
    let burst_storage = match databases.first() {
        Some(db) => pg_storage(db)?,
        None => "backend = \"embedded\"".into(),
    };

    // 1. The burst, ingest only.
    eprintln!(
        "[{name}] burst: {} of load",
        humantime::format_duration(args.duration)
    );
    let mut b = start(args, &dir, "burst", &burst_storage, None).await?;
    let report = load::run(&load_config(args, b.addr)).await?;
    b.proc.check_alive()?;
    b.proc.stop();
    let events = report.accepted_events_total;
    eprintln!(
        "[{name}] {events} events accepted ({:.0} events/s)",
        report.events_per_sec
    );
    let mut out = StoreOutcome {
        store: name.into(),
        events,
        ingest_events_per_sec: report.events_per_sec,
        ..Default::default()
    };

    // 2. The drain.
    let mut d = start(args, &dir, "drain", &burst_storage, Some(&destination)).await?;
    let (secs, drained, stall, samples) =
        wait_drained(d.admin, events, args.drain_timeout, &mut d.proc).await?;
    out.store_timeouts = store_timeouts(d.admin).await;
    d.proc.stop();
    out.drained = drained;
    out.drain_seconds = secs;
    // Not drained in time: the rate of what was delivered.
    let got = if drained {
        events
    } else {
        samples.last().map_or(0, |s| s.1)
    };
    out.drain_events_per_sec = if secs > 0.0 { got as f64 / secs } else { 0.0 };
    out.longest_stall_s = stall;
    out.samples = samples;
    eprintln!(
        "[{name}] drain: {events} events in {secs:.1} s ({:.0} events/s), longest stall {stall:.1} s, {} store timeouts{}",
        out.drain_events_per_sec,
        out.store_timeouts,
        if drained { "" } else { ", NOT DRAINED" }
    );
    for db in databases {
        db.drop_it().await;
    }
    let _ = std::fs::remove_dir_all(dir.join("data"));

    // 3. Under load.
    if args.e2e {
        let db = match store {
            Store::Postgres => match &args.postgres_url {
                Some(url) => Some(Database::create(url, "e2e").await?),
                None => None,
            },
            Store::Embedded => None,
        };
        let storage = match &db {
            Some(db) => pg_storage(db)?,
            None => "backend = \"embedded\"".into(),
        };
        let mut e = start(args, &dir, "e2e", &storage, Some(&destination)).await?;
        let started = Instant::now();
        let report = load::run(&load_config(args, e.addr)).await?;
        let accepted = report.accepted_events_total;
        let (_, drained, _, _) =
            wait_drained(e.admin, accepted, args.drain_timeout, &mut e.proc).await?;
        let secs = started.elapsed().as_secs_f64();
        e.proc.stop();
        if let Some(db) = db {
            db.drop_it().await;
        }
        if drained {
            let rate = accepted as f64 / secs;
            out.e2e_events = Some(accepted);
            out.e2e_events_per_sec = Some(rate);
            out.e2e_ratio = Some(rate / out.ingest_events_per_sec.max(1.0));
        }
        eprintln!(
            "[{name}] under load: {accepted} events delivered in {secs:.1} s from the first request{}",
            if drained { "" } else { " (NOT DRAINED)" }
        );
        let _ = std::fs::remove_dir_all(dir.join("data"));
    }
    Ok(out)
}
