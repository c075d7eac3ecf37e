//! One measurement: one server (null, naive or ballast) started on a free port, loaded
//! for the run's duration in one mode, its figures, metrics and CPU time collected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use serde::Serialize;

use crate::args::RunArgs;
use crate::harness::{
    ballast_config, cpu_delta, cpu_jiffies, cpu_seconds, dir_size, fetch_metrics, free_port,
    machine_cores, wait_ready, ServerProcess, WRITE_KEY,
};
use crate::load::{self, ms, LoadConfig, LoadReport, Mode};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Server {
    Null,
    Naive,
    Ballast,
}

impl Server {
    pub(crate) fn name(self) -> &'static str {
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
            rate: 0,
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
