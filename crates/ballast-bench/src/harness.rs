//! What every measurement needs around the server it measures: child processes
//! (spawn, wait until ready, stop, read their CPU time), free loopback ports, a plain
//! HTTP GET, ballast's config for a run, selected `/metrics` lines, and how busy the
//! whole machine is.

use std::fmt::Write as _;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::HOST;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};

/// The destination's id in ballast's config (the e2e mode).
pub(crate) const DESTINATION_ID: &str = "sink";

/// Metric lines reported from ballast's admin `/metrics` (and the naive
/// server's `/metrics`), when present.
const METRIC_PREFIXES: &[&str] = &[
    "ballast_log_fsyncs_total",
    "ballast_ingest_requests_total",
    "ballast_log_events_total",
    "ballast_destination_delivered_total",
    "ballast_destination_retries_total",
    "ballast_destination_read_events_total",
    "naive_fsyncs_total",
    "naive_requests_total",
];
pub(crate) const WRITE_KEY: &str = "bench-write-key";

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
    /// JavaScript of a user transformation the destination applies (`--e2e-transformation`).
    pub transformation: Option<String>,
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
            id = DESTINATION_ID,
            url = toml_string(&d.url)?,
            concurrency = d.concurrency,
            batch_size = d.batch_size,
        );
        if let Some(code) = &d.transformation {
            let _ = write!(
                config,
                "transformations = [\"bench\"]\n\n[[transformations]]\nid = \"bench\"\ncode = {}\n",
                toml_string(code)?
            );
        }
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
pub(crate) async fn cpu_busy(window: Duration) -> Option<f64> {
    let (b0, t0) = cpu_jiffies()?;
    sleep(window).await;
    let (b1, t1) = cpu_jiffies()?;
    let total = t1.checked_sub(t0).filter(|&t| t > 0)?;
    Some(b1.saturating_sub(b0) as f64 / total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

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
                transformation: None,
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
    fn e2e_config_with_a_transformation() {
        let cfg = ballast_config(
            "127.0.0.1:1000".parse().unwrap(),
            "127.0.0.1:1001".parse().unwrap(),
            Path::new("/tmp/d"),
            Some(&WebhookDestination {
                url: "http://127.0.0.1:1002/in".into(),
                concurrency: 64,
                batch_size: 100,
                transformation: Some("export function transformEvent(e) {\n  return e;\n}".into()),
            }),
        )
        .unwrap();
        let (_, dest) = cfg.split_once("\n[[destinations]]\n").unwrap();
        assert!(
            dest.contains("batch_size = 100\ntransformations = [\"bench\"]\n"),
            "{dest}"
        );
        assert!(
            cfg.ends_with(
                "\n[[transformations]]\nid = \"bench\"\ncode = \"export function transformEvent(e) {\\n  return e;\\n}\"\n"
            ),
            "{cfg}"
        );
    }

    #[test]
    fn cpu_seconds_of_this_process() {
        let t = cpu_seconds(None).unwrap();
        assert!(t >= 0.0);
    }
}
