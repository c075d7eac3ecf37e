//! `run`: the whole comparison in one command.
//!
//! For each mode, each server (null, naive, ballast) is started as a child
//! process on a free loopback port, waited for, loaded for the same duration
//! with the same number of connections, and stopped before the next one
//! starts, so the servers never compete with each other for the two cores.
//!
//! The `e2e` mode (see `e2e.rs`) measures ballast with a webhook destination
//! delivering to the sink server, against ballast without destinations.

use std::fmt::Write as _;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::HOST;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};

use crate::e2e::{self, E2eOutcome};
use crate::load::{self, ms, LoadConfig, LoadReport, Mode};

/// Metric lines reported from ballast's admin `/metrics` (and the naive
/// server's `/metrics`), when present.
const METRIC_PREFIXES: &[&str] = &[
    "ballast_log_fsyncs_total",
    "ballast_ingest_requests_total",
    "ballast_log_events_total",
    "ballast_destination_delivered_total",
    "ballast_destination_retries_total",
    "naive_fsyncs_total",
    "naive_requests_total",
];
const WRITE_KEY: &str = "bench-write-key";

#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// The ballast binary (e.g. target/release/ballast).
    #[arg(long)]
    pub ballast_bin: Option<PathBuf>,
    /// Compare only the null and naive baselines.
    #[arg(long)]
    pub skip_ballast: bool,
    /// Concurrent connections for every load test.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Measured time per server and mode.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unmeasured load before each measurement.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Modes to run, comma-separated: `single` and `batch` load null, naive
    /// and ballast; `e2e` measures ballast's end-to-end delivery to a webhook
    /// sink (ballast only).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "single,batch"
    )]
    pub modes: Vec<RunMode>,
    /// Also run the `e2e` mode (same as adding `e2e` to --modes).
    #[arg(long)]
    pub e2e: bool,
    /// e2e: the load sent to ballast, in both the ingest-only and the delivery run.
    #[arg(long, value_enum, default_value_t = Mode::Batch)]
    pub e2e_load: Mode,
    /// e2e: the webhook destination's `concurrency` (deliveries in flight).
    #[arg(long, default_value_t = 64)]
    pub e2e_concurrency: usize,
    /// e2e: the webhook destination's `batch_size` (events per delivery).
    #[arg(long, default_value_t = 100)]
    pub e2e_batch_size: usize,
    /// e2e: how long to wait after the load for ballast to deliver everything.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub e2e_drain_timeout: Duration,
    /// Events per request in batch mode.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Distinct userIds the events of every load are drawn from (1: one hot user, whose
    /// events the router must deliver one request at a time, in order).
    #[arg(long, default_value_t = crate::events::USER_POOL)]
    pub users: u32,
    /// Repeat the whole sequence this many times and report medians (the
    /// servers are interleaved, so slow drifts of the machine hit all alike).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Also write the report to FILE (JSON when FILE ends in .json, else Markdown).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where the temporary data directories go (default: the system temp dir, /tmp).
    #[arg(long)]
    pub tmp_dir: Option<PathBuf>,
    /// Keep the temporary directory (server logs, configs, data) for inspection.
    #[arg(long)]
    pub keep_tmp: bool,
    /// How long to wait for a server to answer after starting it.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub startup_timeout: Duration,
}

/// What `--modes` accepts: a load shape, or the end-to-end benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RunMode {
    /// One event per request, POST /v1/track (null, naive, ballast).
    Single,
    /// `{"batch":[...]}` of --batch-size events per request (null, naive, ballast).
    Batch,
    /// ballast ingest-only vs ballast delivering to a webhook sink.
    E2e,
}

impl RunArgs {
    /// The load modes null, naive and ballast are compared in.
    fn load_modes(&self) -> Vec<Mode> {
        let mut modes = Vec::new();
        for m in &self.modes {
            let mode = match m {
                RunMode::Single => Mode::Single,
                RunMode::Batch => Mode::Batch,
                RunMode::E2e => continue,
            };
            if !modes.contains(&mode) {
                modes.push(mode);
            }
        }
        modes
    }

    fn wants_e2e(&self) -> bool {
        self.e2e || self.modes.contains(&RunMode::E2e)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Server {
    Null,
    Naive,
    Ballast,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Null => "null",
            Server::Naive => "naive",
            Server::Ballast => "ballast",
        }
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct Outcome {
    pub round: usize,
    pub server: Server,
    pub mode: Mode,
    pub report: LoadReport,
    /// Selected lines of the server's /metrics after the run (warm-up included).
    pub metrics: Vec<String>,
    /// Bytes the naive server wrote to its file (warm-up included).
    pub data_bytes: Option<u64>,
    /// CPU time (user + system) of the server and of the load generator during
    /// the load (warm-up included), in seconds.
    pub server_cpu_s: Option<f64>,
    pub loadgen_cpu_s: Option<f64>,
    /// Cores busy on the whole machine during the load (other processes included).
    pub machine_cores: Option<f64>,
}

/// CPU time (user + system) of a process so far, in seconds (Linux).
pub(crate) fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which is in parentheses: state is the
    // first, utime the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (tick > 0).then(|| (utime + stime) as f64 / tick as f64)
}

/// CPU time used between two readings.
pub(crate) fn cpu_delta(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    Some(after? - before?)
}

/// A child server process, stopped (SIGTERM, then SIGKILL) when dropped.
pub(crate) struct ServerProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ServerProcess {
    pub(crate) fn spawn(name: String, mut cmd: Command, log: PathBuf) -> anyhow::Result<Self> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // If this process dies without running destructors, take the
            // server down with it.
            // SAFETY: prctl is async-signal-safe and touches no memory of ours.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(ServerProcess { name, child, log })
    }

    /// Last lines of the server's output, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!("--- last lines of {} ---\n{tail}", self.log.display())
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Errors if the process has exited.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status})\n{}", self.name, self.log_tail());
        }
        Ok(())
    }

    pub(crate) fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: plain syscall on the pid of our own, not yet reaped, child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let until = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < until {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!(
                "{} did not stop within 10s of SIGTERM; killing it",
                self.name
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub(crate) fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}

/// One GET over a fresh connection. Returns the status and the body.
pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, Bytes)> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get(path)
        .header(HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let result = async {
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    }
    .await;
    drop(sender);
    driver.abort();
    result
}

/// Waits until the server answers `path` (with 200 when `need_ok`).
pub(crate) async fn wait_ready(
    proc: &mut ServerProcess,
    addr: SocketAddr,
    path: &str,
    need_ok: bool,
    limit: Duration,
) -> anyhow::Result<()> {
    let until = Instant::now() + limit;
    loop {
        proc.check_alive()?;
        let last = match timeout(Duration::from_secs(1), http_get(addr, path)).await {
            Ok(Ok((status, _))) if !need_ok || status == StatusCode::OK => return Ok(()),
            Ok(Ok((status, _))) => format!("GET {path} answered {status}"),
            Ok(Err(err)) => format!("GET {path}: {err:#}"),
            Err(_) => format!("GET {path} timed out"),
        };
        if Instant::now() >= until {
            bail!(
                "{} not ready on {addr} after {}: {last}\n{}",
                proc.name,
                humantime::format_duration(limit),
                proc.log_tail()
            );
        }
        sleep(Duration::from_millis(100)).await;
    }
}

fn toml_string(s: &str) -> anyhow::Result<String> {
    // A JSON string literal is a valid TOML basic string.
    Ok(serde_json::to_string(s)?)
}

/// A webhook destination for ballast's config (the e2e mode).
pub(crate) struct WebhookDestination {
    pub url: String,
    pub concurrency: usize,
    pub batch_size: usize,
}

pub(crate) fn ballast_config(
    listen: SocketAddr,
    admin: SocketAddr,
    data_dir: &Path,
    destination: Option<&WebhookDestination>,
) -> anyhow::Result<String> {
    let data_dir = data_dir
        .to_str()
        .context("temporary directory path is not UTF-8")?;
    let mut config = format!(
        r#"[server]
listen = "{listen}"
admin_listen = "{admin}"
data_dir = {data_dir}

[storage]
backend = "embedded"

[[sources]]
id = "bench"
write_key = "{WRITE_KEY}"
enabled = true
"#,
        data_dir = toml_string(data_dir)?
    );
    if let Some(d) = destination {
        let _ = write!(
            config,
            r#"
[[destinations]]
id = "{id}"
type = "webhook"
sources = ["bench"]
url = {url}
concurrency = {concurrency}
batch_size = {batch_size}
"#,
            id = e2e::DESTINATION_ID,
            url = toml_string(&d.url)?,
            concurrency = d.concurrency,
            batch_size = d.batch_size,
        );
    }
    Ok(config)
}

/// Selected lines of a server's `/metrics` (see `METRIC_PREFIXES`).
pub(crate) async fn fetch_metrics(addr: SocketAddr, label: &str) -> Vec<String> {
    match timeout(Duration::from_secs(5), http_get(addr, "/metrics")).await {
        Ok(Ok((StatusCode::OK, body))) => String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| METRIC_PREFIXES.iter().any(|p| l.starts_with(p)))
            .map(str::to_owned)
            .collect(),
        Ok(Ok((status, _))) => {
            eprintln!("[{label}] GET {addr}/metrics answered {status}");
            Vec::new()
        }
        Ok(Err(err)) => {
            eprintln!("[{label}] GET {addr}/metrics: {err:#}");
            Vec::new()
        }
        Err(_) => {
            eprintln!("[{label}] GET {addr}/metrics timed out");
            Vec::new()
        }
    }
}

pub(crate) fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

pub(crate) struct Bench<'a> {
    pub args: &'a RunArgs,
    pub exe: PathBuf,
    pub root: &'a Path,
}

impl Bench<'_> {
    /// The load every test of this run sends, in `mode`, to `addr`.
    pub(crate) fn load_config(&self, addr: SocketAddr, mode: Mode) -> LoadConfig {
        LoadConfig {
            url: format!("http://{addr}"),
            write_key: WRITE_KEY.into(),
            connections: self.args.connections,
            duration: self.args.duration,
            mode,
            batch_size: self.args.batch_size,
            warmup: self.args.warmup,
            pool: None,
            users: self.args.users,
        }
    }

    pub(crate) fn ballast_bin(&self) -> anyhow::Result<&Path> {
        self.args
            .ballast_bin
            .as_deref()
            .context("--ballast-bin is required for ballast and the e2e mode")
    }

    pub(crate) async fn one(
        &self,
        round: usize,
        server: Server,
        mode: Mode,
    ) -> anyhow::Result<Outcome> {
        let tag = format!("{}-{mode}-{round}", server.name());
        self.one_tagged(round, server, mode, tag).await
    }

    /// As `one`; `tag` names the server's directory and log under the root.
    pub(crate) async fn one_tagged(
        &self,
        round: usize,
        server: Server,
        mode: Mode,
        tag: String,
    ) -> anyhow::Result<Outcome> {
        let addr = free_port()?;
        let dir = self.root.join(&tag);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = self.root.join(format!("{tag}.log"));
        // Where /metrics is served: ballast's admin listener, the naive server itself.
        let mut metrics_addr = None;
        let mut data_file = None;
        let (mut cmd, ready_path, need_ok) = match server {
            Server::Null => {
                let mut cmd = Command::new(&self.exe);
                cmd.arg("null-server").arg("--listen").arg(addr.to_string());
                (cmd, "/", false)
            }
            Server::Naive => {
                let file = dir.join("events.jsonl");
                let mut cmd = Command::new(&self.exe);
                cmd.arg("naive-server")
                    .arg("--listen")
                    .arg(addr.to_string())
                    .arg("--file")
                    .arg(&file);
                data_file = Some(file);
                metrics_addr = Some(addr);
                (cmd, "/", false)
            }
            Server::Ballast => {
                let bin = self.ballast_bin()?;
                let admin_addr = free_port()?;
                let config = dir.join("ballast.toml");
                std::fs::write(
                    &config,
                    ballast_config(addr, admin_addr, &dir.join("data"), None)?,
                )
                .with_context(|| format!("writing {}", config.display()))?;
                let mut cmd = Command::new(bin);
                cmd.arg("serve").arg("--config").arg(&config);
                metrics_addr = Some(admin_addr);
                (cmd, "/livez", true)
            }
        };
        cmd.current_dir(&dir);
        eprintln!("[{mode}] starting {} on {addr}", server.name());
        let mut proc = ServerProcess::spawn(tag.clone(), cmd, log)?;
        wait_ready(
            &mut proc,
            addr,
            ready_path,
            need_ok,
            self.args.startup_timeout,
        )
        .await?;

        let config = self.load_config(addr, mode);
        eprintln!(
            "[{mode}] loading {} for {} + {} warm-up with {} connections",
            server.name(),
            humantime::format_duration(self.args.duration),
            humantime::format_duration(self.args.warmup),
            self.args.connections
        );
        let cpu0 = (
            cpu_seconds(Some(proc.pid())),
            cpu_seconds(None),
            cpu_jiffies(),
        );
        let report = load::run(&config).await?;
        let cpu1 = (
            cpu_seconds(Some(proc.pid())),
            cpu_seconds(None),
            cpu_jiffies(),
        );
        proc.check_alive()
            .context("the server died during the load test")?;

        let mut metrics = Vec::new();
        if let Some(admin) = metrics_addr {
            metrics = fetch_metrics(admin, &mode.to_string()).await;
        }
        proc.stop();
        let data_bytes = match (&data_file, server) {
            (Some(file), _) => Some(std::fs::metadata(file).map(|m| m.len()).unwrap_or(0)),
            (None, Server::Ballast) => Some(dir_size(&dir.join("data"))),
            _ => None,
        };
        eprintln!(
            "[{mode}] {}: {:.0} req/s, {:.0} events/s, p50 {}, p99 {}, non-200 {}, errors {}",
            server.name(),
            report.requests_per_sec,
            report.events_per_sec,
            ms(report.latency.p50_us),
            ms(report.latency.p99_us),
            report.non_200,
            report.errors
        );
        if !self.args.keep_tmp {
            // Free the disk space before the next server runs.
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(Outcome {
            round,
            server,
            mode,
            report,
            metrics,
            data_bytes,
            server_cpu_s: cpu_delta(cpu0.0, cpu1.0),
            loadgen_cpu_s: cpu_delta(cpu0.1, cpu1.1),
            machine_cores: machine_cores(cpu0.2, cpu1.2),
        })
    }
}

/// (busy, total) jiffies over all CPUs from /proc/stat (Linux).
pub(crate) fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = fields.iter().sum();
    // idle + iowait
    let idle = fields.get(3)? + fields.get(4)?;
    Some((total - idle, total))
}

/// Cores the whole machine kept busy between two `cpu_jiffies` readings.
pub(crate) fn machine_cores(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((b0, t0), (b1, t1)) = (before?, after?);
    let total = t1.checked_sub(t0).filter(|&t| t > 0)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some(b1.saturating_sub(b0) as f64 / total as f64 * cpus as f64)
}

/// Fraction of CPU time other processes use right now, to flag runs on a
/// busy machine (a concurrent build makes every figure low).
async fn cpu_busy(window: Duration) -> Option<f64> {
    let (b0, t0) = cpu_jiffies()?;
    sleep(window).await;
    let (b1, t1) = cpu_jiffies()?;
    let total = t1.checked_sub(t0).filter(|&t| t > 0)?;
    Some(b1.saturating_sub(b0) as f64 / total as f64)
}

/// Figures of one server in one mode, as medians over the rounds.
struct Summary {
    server: Server,
    mode: Mode,
    requests_per_sec: f64,
    events_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    /// Worst over the rounds.
    max_us: u64,
    /// Totals over the rounds.
    non_200: u64,
    errors: u64,
    rps_min: f64,
    rps_max: f64,
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Groups outcomes by (server, mode), in order of first appearance.
fn summarize(outcomes: &[Outcome]) -> Vec<Summary> {
    let mut keys: Vec<(Server, Mode)> = Vec::new();
    for o in outcomes {
        if !keys.contains(&(o.server, o.mode)) {
            keys.push((o.server, o.mode));
        }
    }
    keys.into_iter()
        .map(|(server, mode)| {
            let runs: Vec<&LoadReport> = outcomes
                .iter()
                .filter(|o| o.server == server && o.mode == mode)
                .map(|o| &o.report)
                .collect();
            let of = |f: fn(&LoadReport) -> f64| median(runs.iter().map(|r| f(r)).collect());
            let rps: Vec<f64> = runs.iter().map(|r| r.requests_per_sec).collect();
            Summary {
                server,
                mode,
                requests_per_sec: of(|r| r.requests_per_sec),
                events_per_sec: of(|r| r.events_per_sec),
                p50_us: of(|r| r.latency.p50_us as f64) as u64,
                p99_us: of(|r| r.latency.p99_us as f64) as u64,
                max_us: runs.iter().map(|r| r.latency.max_us).max().unwrap_or(0),
                non_200: runs.iter().map(|r| r.non_200).sum(),
                errors: runs.iter().map(|r| r.errors).sum(),
                rps_min: rps.iter().copied().fold(f64::INFINITY, f64::min),
                rps_max: rps.iter().copied().fold(0.0, f64::max),
            }
        })
        .collect()
}

pub(crate) fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        let r = a / b;
        if r < 0.1 {
            format!("{r:.3}×")
        } else {
            format!("{r:.2}×")
        }
    } else {
        "n/a".into()
    }
}

fn markdown(args: &RunArgs, outcomes: &[Outcome], e2e_outcomes: &[E2eOutcome]) -> String {
    let mut s = String::new();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(
        s,
        "ballast-bench run — {} — {cpus} CPUs — {} connections, {} measured after {} warm-up, batch size {}, {} user{}\n",
        humantime::format_rfc3339_seconds(SystemTime::now()),
        args.connections,
        humantime::format_duration(args.duration),
        humantime::format_duration(args.warmup),
        args.batch_size,
        args.users,
        if args.users == 1 { "" } else { "s" }
    );
    if !outcomes.is_empty() {
        comparison_markdown(&mut s, args, outcomes);
    }
    if !e2e_outcomes.is_empty() {
        e2e::markdown(&mut s, args, e2e_outcomes);
    }
    s
}

fn comparison_markdown(s: &mut String, args: &RunArgs, outcomes: &[Outcome]) {
    let summaries = summarize(outcomes);
    if args.rounds > 1 {
        let _ = writeln!(
            s,
            "Medians of {} rounds (max, non-200 and errors: worst / total over the rounds).\n",
            args.rounds
        );
    }
    let _ = writeln!(
        s,
        "| server | mode | req/s | events/s | p50 | p99 | max | non-200 | errors |{}",
        if args.rounds > 1 {
            " req/s min–max |"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|{}",
        if args.rounds > 1 { "---:|" } else { "" }
    );
    for m in &summaries {
        let _ = write!(
            s,
            "| {} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} |",
            m.server.name(),
            m.mode,
            m.requests_per_sec,
            m.events_per_sec,
            ms(m.p50_us),
            ms(m.p99_us),
            ms(m.max_us),
            m.non_200,
            m.errors
        );
        if args.rounds > 1 {
            let _ = write!(s, " {:.0}–{:.0} |", m.rps_min, m.rps_max);
        }
        s.push('\n');
    }
    let find = |server, mode| {
        summaries
            .iter()
            .find(|m| m.server == server && m.mode == mode)
    };
    let _ = writeln!(
        s,
        "\n| mode | comparison | req/s ratio | events/s ratio |\n|---|---|---:|---:|"
    );
    for mode in args.load_modes() {
        let pairs = [
            (Server::Ballast, Server::Null),
            (Server::Ballast, Server::Naive),
            (Server::Naive, Server::Null),
        ];
        for (a, b) in pairs {
            if let (Some(ra), Some(rb)) = (find(a, mode), find(b, mode)) {
                let _ = writeln!(
                    s,
                    "| {mode} | {} vs {} | {} | {} |",
                    a.name(),
                    b.name(),
                    ratio(ra.requests_per_sec, rb.requests_per_sec),
                    ratio(ra.events_per_sec, rb.events_per_sec)
                );
            }
        }
    }
    if args.rounds > 1 {
        let _ = writeln!(
            s,
            "\n| round | server | mode | req/s | events/s | p50 | p99 |\n|---:|---|---|---:|---:|---:|---:|"
        );
        for o in outcomes {
            let r = &o.report;
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.0} | {:.0} | {} | {} |",
                o.round,
                o.server.name(),
                o.mode,
                r.requests_per_sec,
                r.events_per_sec,
                ms(r.latency.p50_us),
                ms(r.latency.p99_us)
            );
        }
    }
    s.push('\n');
    for o in outcomes {
        let label = if args.rounds > 1 {
            format!("{} ({}, round {})", o.server.name(), o.mode, o.round)
        } else {
            format!("{} ({})", o.server.name(), o.mode)
        };
        if let Some(bytes) = o.data_bytes {
            let _ = writeln!(
                s,
                "{label} wrote {:.1} MiB to disk (warm-up included)",
                bytes as f64 / (1024.0 * 1024.0)
            );
        }
        if !o.metrics.is_empty() {
            let _ = writeln!(s, "{label} /metrics after the run (warm-up included):");
            for line in &o.metrics {
                let _ = writeln!(s, "    {line}");
            }
        } else if o.server == Server::Ballast {
            let _ = writeln!(s, "{label} /metrics: no fsync/ingest counters found");
        }
        if let (Some(server), Some(loadgen)) = (o.server_cpu_s, o.loadgen_cpu_s) {
            let wall = o.report.duration_s + o.report.warmup_s;
            let _ = writeln!(
                s,
                "{label} CPU during the load (warm-up included): server {:.2} cores, load generator {:.2} cores{}",
                server / wall,
                loadgen / wall,
                o.machine_cores
                    .map(|m| format!(", whole machine {m:.2} cores"))
                    .unwrap_or_default()
            );
        }
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.modes.is_empty() {
        bail!("--modes is empty");
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if args.users == 0 {
        bail!("--users must be at least 1");
    }
    let load_modes = args.load_modes();
    let with_e2e = args.wants_e2e();
    if with_e2e && args.skip_ballast {
        bail!("the e2e mode measures ballast: drop --skip-ballast");
    }
    if with_e2e {
        e2e::check_args(&args)?;
    }
    let mut servers = vec![Server::Null, Server::Naive];
    if !args.skip_ballast {
        let Some(bin) = &args.ballast_bin else {
            bail!("pass --ballast-bin PATH (e.g. target/release/ballast), or --skip-ballast to compare the baselines only");
        };
        if !bin.is_file() {
            bail!(
                "ballast binary {} not found (build it with `cargo build --release -p ballast`, or pass --skip-ballast)",
                bin.display()
            );
        }
        servers.push(Server::Ballast);
    }
    if let Some(busy) = cpu_busy(Duration::from_millis(500))
        .await
        .filter(|&b| b > 0.2)
    {
        eprintln!(
            "warning: the CPUs are {:.0}% busy before the benchmark starts; other processes (a build?) will lower the figures",
            busy * 100.0
        );
    }
    let exe = std::env::current_exe().context("locating the ballast-bench executable")?;
    let tmp = args.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    // Declared before anything that holds child processes, so it is removed last.
    let root = tempfile::Builder::new()
        .prefix("ballast-bench-")
        .disable_cleanup(args.keep_tmp)
        .tempdir_in(&tmp)
        .with_context(|| format!("creating a temporary directory in {}", tmp.display()))?;
    if args.keep_tmp {
        eprintln!("keeping logs and data in {}", root.path().display());
    }
    let bench = Bench {
        args: &args,
        exe,
        root: root.path(),
    };

    let mut outcomes = Vec::new();
    let mut e2e_outcomes = Vec::new();
    let all = async {
        for round in 1..=args.rounds {
            if args.rounds > 1 {
                eprintln!("round {round}/{}", args.rounds);
            }
            for &mode in &load_modes {
                for &server in &servers {
                    outcomes.push(bench.one(round, server, mode).await?);
                    // Let the machine settle between servers.
                    sleep(Duration::from_secs(1)).await;
                }
            }
            if with_e2e {
                e2e_outcomes.push(e2e::run(&bench, round).await?);
                sleep(Duration::from_secs(1)).await;
            }
        }
        anyhow::Ok(())
    };
    tokio::select! {
        res = all => res?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }

    let text = markdown(&args, &outcomes, &e2e_outcomes);
    println!("\n{text}");
    if let Some(out) = &args.out {
        let content = if out.extension().is_some_and(|e| e == "json") {
            serde_json::to_string_pretty(&serde_json::json!({
                "date": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
                "connections": args.connections,
                "duration_s": args.duration.as_secs_f64(),
                "warmup_s": args.warmup.as_secs_f64(),
                "batch_size": args.batch_size,
                "users": args.users,
                "rounds": args.rounds,
                "results": outcomes,
                "e2e": e2e_outcomes,
            }))?
        } else {
            text
        };
        std::fs::write(out, content).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("report written to {}", out.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn ballast_config_has_the_contract_keys() {
        let cfg = ballast_config(
            "127.0.0.1:1000".parse().unwrap(),
            "127.0.0.1:1001".parse().unwrap(),
            Path::new("/tmp/x y/data"),
            None,
        )
        .unwrap();
        assert!(cfg.contains("listen = \"127.0.0.1:1000\""));
        assert!(cfg.contains("admin_listen = \"127.0.0.1:1001\""));
        assert!(cfg.contains("data_dir = \"/tmp/x y/data\""));
        assert!(cfg.contains("backend = \"embedded\""));
        assert!(cfg.contains("write_key = \"bench-write-key\""));
        assert!(!cfg.contains("[[destinations]]"));
    }

    #[test]
    fn e2e_config_adds_the_webhook_destination() {
        let cfg = ballast_config(
            "127.0.0.1:1000".parse().unwrap(),
            "127.0.0.1:1001".parse().unwrap(),
            Path::new("/tmp/d"),
            Some(&WebhookDestination {
                url: "http://127.0.0.1:1002/in".into(),
                concurrency: 64,
                batch_size: 100,
            }),
        )
        .unwrap();
        let (_, dest) = cfg.split_once("\n[[destinations]]\n").unwrap();
        let lines: Vec<&str> = dest.lines().collect();
        assert_eq!(
            lines,
            [
                "id = \"sink\"",
                "type = \"webhook\"",
                "sources = [\"bench\"]",
                "url = \"http://127.0.0.1:1002/in\"",
                "concurrency = 64",
                "batch_size = 100",
            ]
        );
    }

    #[test]
    fn modes_split_into_load_modes_and_e2e() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: RunArgs,
        }
        let args = Cli::parse_from(["x", "--modes", "e2e"]).args;
        assert!(args.wants_e2e());
        assert!(args.load_modes().is_empty());
        assert_eq!(args.e2e_load, Mode::Batch);
        let args = Cli::parse_from(["x", "--modes", "batch,single", "--e2e"]).args;
        assert!(args.wants_e2e());
        assert_eq!(args.load_modes(), vec![Mode::Batch, Mode::Single]);
        let args = Cli::parse_from(["x"]).args;
        assert!(!args.wants_e2e());
        assert_eq!(args.load_modes(), vec![Mode::Single, Mode::Batch]);
    }

    #[test]
    fn cpu_seconds_of_this_process() {
        let t = cpu_seconds(None).unwrap();
        assert!(t >= 0.0);
    }
}
