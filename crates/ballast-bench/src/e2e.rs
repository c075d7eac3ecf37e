//! The `e2e` mode of `run`: end-to-end delivery.
//!
//! 1. ballast without destinations (the config of the other modes) is loaded
//!    as usual: the ingest-only rate.
//! 2. The sink server (`sink.rs`) and a ballast whose config adds a webhook
//!    destination delivering to it are started; the same load runs for the same
//!    time (the with-delivery ingest rate). Then ballast's admin `/v1/status` is
//!    polled until every accepted event was delivered (bounded by
//!    `--e2e-drain-timeout`).
//!
//! End-to-end rate = events delivered / (time from the start of the load,
//! warm-up included, to the last delivery the sink saw); it is compared with
//! the ingest-only rate. Delivery lag (arrival at the sink − `receivedAt`)
//! comes from the sink.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::time::{sleep, timeout, Instant};

use crate::args::RunArgs;
use crate::harness::{
    ballast_config, cpu_delta, cpu_jiffies, cpu_seconds, dir_size, fetch_metrics, free_port,
    http_get, machine_cores, wait_ready, ServerProcess, WebhookDestination, DESTINATION_ID,
};
use crate::load::{self, ms, Mode};
use crate::measure::{Bench, Outcome, Server};
use crate::sink::SinkStats;
use crate::stats::{median, ratio};

/// The end-to-end rate should be at least this share of the ingest-only rate.
pub(crate) const TARGET_RATIO: f64 = 0.70;
/// How often `/v1/status` is sampled during the load and the drain.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// How often `/v1/status` is polled while waiting for the last deliveries.
const POLL_EVERY: Duration = Duration::from_millis(100);

pub(crate) fn check_args(args: &RunArgs) -> anyhow::Result<()> {
    if !(1..=10_000).contains(&args.e2e_concurrency) {
        bail!("--e2e-concurrency must be 1..=10000");
    }
    if !(1..=10_000).contains(&args.e2e_batch_size) {
        bail!("--e2e-batch-size must be 1..=10000");
    }
    Ok(())
}

/// The fields of one destination in ballast's `GET /v1/status` used here.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub(crate) struct DestStatus {
    pub delivered: u64,
    pub backlog_bytes: u64,
    pub aborted: u64,
    pub retries: u64,
    pub in_flight: u64,
    pub buffered_events: u64,
}

#[derive(Deserialize)]
struct StatusDoc {
    #[serde(default)]
    destinations: Vec<DestEntry>,
}

#[derive(Deserialize)]
struct DestEntry {
    #[serde(default)]
    id: String,
    #[serde(flatten)]
    status: DestStatus,
}

async fn dest_status(admin: SocketAddr) -> anyhow::Result<DestStatus> {
    let (status, body) = timeout(Duration::from_secs(5), http_get(admin, "/v1/status"))
        .await
        .context("GET /v1/status timed out")??;
    if status != StatusCode::OK {
        bail!("GET {admin}/v1/status answered {status}");
    }
    let doc: StatusDoc = serde_json::from_slice(&body).context("parsing /v1/status")?;
    doc.destinations
        .into_iter()
        .find(|d| d.id == DESTINATION_ID)
        .map(|d| d.status)
        .with_context(|| format!("/v1/status lists no destination {DESTINATION_ID:?}"))
}

async fn sink_stats(addr: SocketAddr) -> anyhow::Result<SinkStats> {
    let (status, body) = timeout(Duration::from_secs(5), http_get(addr, "/stats"))
        .await
        .context("GET /stats timed out")??;
    if status != StatusCode::OK {
        bail!("GET {addr}/stats answered {status}");
    }
    serde_json::from_slice(&body).context("parsing the sink's /stats")
}

/// One reading of the destination's progress.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Sample {
    /// Seconds since the load started (warm-up included).
    pub t_s: f64,
    pub delivered: u64,
    pub backlog_bytes: u64,
}

/// CPU time in seconds (user + system) during a phase.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct PhaseCpu {
    pub wall_s: f64,
    pub ballast_s: Option<f64>,
    pub sink_s: Option<f64>,
    pub loadgen_s: Option<f64>,
    /// Cores busy on the whole machine (other processes included).
    pub machine_cores: Option<f64>,
}

struct CpuMark {
    at: Instant,
    ballast: Option<f64>,
    sink: Option<f64>,
    loadgen: Option<f64>,
    machine: Option<(u64, u64)>,
}

impl CpuMark {
    fn now(ballast: &ServerProcess, sink: &ServerProcess) -> Self {
        CpuMark {
            at: Instant::now(),
            ballast: cpu_seconds(Some(ballast.pid())),
            sink: cpu_seconds(Some(sink.pid())),
            loadgen: cpu_seconds(None),
            machine: cpu_jiffies(),
        }
    }

    fn since(&self, start: &CpuMark) -> PhaseCpu {
        PhaseCpu {
            wall_s: (self.at - start.at).as_secs_f64(),
            ballast_s: cpu_delta(start.ballast, self.ballast),
            sink_s: cpu_delta(start.sink, self.sink),
            loadgen_s: cpu_delta(start.loadgen, self.loadgen),
            machine_cores: machine_cores(start.machine, self.machine),
        }
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct E2eOutcome {
    pub round: usize,
    pub load_mode: Mode,
    /// The destination's `concurrency` and `batch_size`.
    pub concurrency: usize,
    pub batch_size: usize,
    /// ballast without destinations.
    pub ingest_only: Outcome,
    /// ballast delivering to the sink, under the same load.
    pub with_delivery: Outcome,
    /// Events answered 200 during the whole delivery run (warm-up included).
    pub accepted_events: u64,
    /// The destination's counters when the wait ended.
    pub final_status: DestStatus,
    /// Every accepted event was delivered (or dead-lettered) before the deadline.
    pub drained: bool,
    /// What the sink recorded.
    pub sink: SinkStats,
    /// From the start of the load (warm-up included) to the last delivery.
    pub e2e_seconds: f64,
    /// Events delivered / `e2e_seconds`.
    pub e2e_events_per_sec: f64,
    /// `e2e_events_per_sec` / ingest-only events/s.
    pub e2e_ratio: f64,
    /// Delivered when the load ended.
    pub delivered_at_load_end: u64,
    pub peak_backlog_bytes: u64,
    /// From the end of the load to the last delivery.
    pub drain_seconds: f64,
    pub load_cpu: PhaseCpu,
    pub drain_cpu: PhaseCpu,
    pub samples: Vec<Sample>,
}

/// Runs both halves of the e2e benchmark once.
pub(crate) async fn run(bench: &Bench<'_>, round: usize) -> anyhow::Result<E2eOutcome> {
    let args = bench.args;
    let mode = args.e2e_load;
    eprintln!("[e2e] ingest-only: ballast without destinations, {mode} load");
    let ingest_only = bench
        .one_tagged(round, Server::Ballast, mode, format!("e2e-ingest-{round}"))
        .await?;
    sleep(Duration::from_secs(1)).await;

    let tag = format!("e2e-delivery-{round}");
    let dir = bench.root.join(&tag);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let sink_addr = free_port()?;
    let mut cmd = Command::new(&bench.exe);
    cmd.arg("sink-server")
        .arg("--listen")
        .arg(sink_addr.to_string())
        .current_dir(&dir);
    eprintln!("[e2e] starting the sink on {sink_addr}");
    let mut sink = ServerProcess::spawn(
        format!("sink-{round}"),
        cmd,
        bench.root.join(format!("sink-{round}.log")),
    )?;
    wait_ready(&mut sink, sink_addr, "/stats", true, args.startup_timeout).await?;

    let addr = free_port()?;
    let admin = free_port()?;
    let destination = WebhookDestination {
        url: format!("http://{sink_addr}/in"),
        concurrency: args.e2e_concurrency,
        batch_size: args.e2e_batch_size,
        transformation: match &args.e2e_transformation {
            Some(f) => Some(std::fs::read_to_string(f)?),
            None => None,
        },
    };
    let config = dir.join("ballast.toml");
    std::fs::write(
        &config,
        ballast_config(addr, admin, &dir.join("data"), Some(&destination))?,
    )
    .with_context(|| format!("writing {}", config.display()))?;
    let mut cmd = Command::new(bench.ballast_bin()?);
    cmd.arg("serve")
        .arg("--config")
        .arg(&config)
        .current_dir(&dir);
    eprintln!(
        "[e2e] starting ballast on {addr} delivering to the sink (concurrency {}, batch_size {})",
        destination.concurrency, destination.batch_size
    );
    let mut ballast =
        ServerProcess::spawn(tag.clone(), cmd, bench.root.join(format!("{tag}.log")))?;
    wait_ready(&mut ballast, addr, "/livez", true, args.startup_timeout).await?;
    dest_status(admin)
        .await
        .with_context(|| format!("ballast's admin API on {admin}\n{}", ballast.log_tail()))?;

    let load_config = bench.load_config(addr, mode);
    eprintln!(
        "[e2e] loading ballast (with delivery) for {} + {} warm-up with {} connections",
        humantime::format_duration(args.duration),
        humantime::format_duration(args.warmup),
        args.connections
    );
    let mut samples = Vec::new();
    let mut peak_backlog = 0;
    let mut sample = |t0: Instant, st: &DestStatus, samples: &mut Vec<Sample>| {
        peak_backlog = st.backlog_bytes.max(peak_backlog);
        samples.push(Sample {
            t_s: t0.elapsed().as_secs_f64(),
            delivered: st.delivered,
            backlog_bytes: st.backlog_bytes,
        });
    };
    let cpu_start = CpuMark::now(&ballast, &sink);
    let t0 = Instant::now();
    let load_task = tokio::spawn(async move { load::run(&load_config).await });
    while !load_task.is_finished() {
        sleep(SAMPLE_EVERY).await;
        ballast
            .check_alive()
            .context("ballast died during the load test")?;
        sink.check_alive()
            .context("the sink died during the load test")?;
        if let Ok(st) = dest_status(admin).await {
            sample(t0, &st, &mut samples);
        }
    }
    let report = load_task.await.context("load task panicked")??;
    let cpu_load_end = CpuMark::now(&ballast, &sink);
    let at_load_end = dest_status(admin).await.unwrap_or_default();
    sample(t0, &at_load_end, &mut samples);
    let accepted = report.accepted_events_total;
    eprintln!(
        "[e2e] load done: {:.0} events/s accepted ({} in all, warm-up included), {} delivered so far; waiting for the rest (at most {})",
        report.events_per_sec,
        accepted,
        at_load_end.delivered,
        humantime::format_duration(args.e2e_drain_timeout)
    );

    let deadline = Instant::now() + args.e2e_drain_timeout;
    let mut last = at_load_end;
    let mut next_sample = Instant::now() + SAMPLE_EVERY;
    let drained = loop {
        let done = last.backlog_bytes == 0
            && last.in_flight == 0
            && last.delivered + last.aborted >= accepted;
        if done {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        sleep(POLL_EVERY).await;
        ballast
            .check_alive()
            .context("ballast died while delivering")?;
        match dest_status(admin).await {
            Ok(st) => last = st,
            Err(err) => eprintln!("[e2e] {err:#}"),
        }
        if Instant::now() >= next_sample {
            sample(t0, &last, &mut samples);
            next_sample += SAMPLE_EVERY;
        }
    };
    let cpu_end = CpuMark::now(&ballast, &sink);
    sample(t0, &last, &mut samples);
    if !drained {
        eprintln!(
            "[e2e] not everything was delivered within {}: {} of {accepted} delivered, {} bytes of backlog",
            humantime::format_duration(args.e2e_drain_timeout),
            last.delivered,
            last.backlog_bytes
        );
    }
    // Deliveries counted by ballast have all reached the sink by now.
    let sink_stats = sink_stats(sink_addr).await?;
    let metrics = fetch_metrics(admin, "e2e").await;
    ballast.stop();
    sink.stop();
    let data_bytes = dir_size(&dir.join("data"));
    if !args.keep_tmp {
        let _ = std::fs::remove_dir_all(&dir);
    }

    let e2e_seconds = sink_stats
        .last_arrival_unix_ms
        .saturating_sub(report.started_unix_ms) as f64
        / 1000.0;
    let e2e_events_per_sec = if e2e_seconds > 0.0 {
        last.delivered as f64 / e2e_seconds
    } else {
        0.0
    };
    let e2e_ratio = if ingest_only.report.events_per_sec > 0.0 {
        e2e_events_per_sec / ingest_only.report.events_per_sec
    } else {
        0.0
    };
    let drain_seconds = sink_stats
        .last_arrival_unix_ms
        .saturating_sub(report.finished_unix_ms) as f64
        / 1000.0;
    eprintln!(
        "[e2e] ingest-only {:.0} events/s; with delivery {:.0} events/s; end-to-end {:.0} events/s ({} of ingest-only); lag p50 {:.1} ms, p99 {:.1} ms",
        ingest_only.report.events_per_sec,
        report.events_per_sec,
        e2e_events_per_sec,
        ratio(e2e_events_per_sec, ingest_only.report.events_per_sec),
        sink_stats.lag_p50_ms,
        sink_stats.lag_p99_ms
    );
    let load_cpu = cpu_load_end.since(&cpu_start);
    Ok(E2eOutcome {
        round,
        load_mode: mode,
        concurrency: destination.concurrency,
        batch_size: destination.batch_size,
        ingest_only,
        with_delivery: Outcome {
            round,
            server: Server::Ballast,
            mode,
            report,
            metrics,
            data_bytes: Some(data_bytes),
            server_cpu_s: load_cpu.ballast_s,
            loadgen_cpu_s: load_cpu.loadgen_s,
            machine_cores: load_cpu.machine_cores,
        },
        accepted_events: accepted,
        final_status: last,
        drained,
        sink: sink_stats,
        e2e_seconds,
        e2e_events_per_sec,
        e2e_ratio,
        delivered_at_load_end: at_load_end.delivered,
        peak_backlog_bytes: peak_backlog,
        drain_seconds,
        load_cpu,
        drain_cpu: cpu_end.since(&cpu_load_end),
        samples,
    })
}

fn cores(cpu: Option<f64>, wall: f64) -> String {
    match cpu {
        Some(c) if wall > 0.0 => format!("{:.2}", c / wall),
        _ => "n/a".into(),
    }
}

/// CPU use of one phase in cores, or a note when it was too short to tell.
fn phase_cpu(p: &PhaseCpu) -> String {
    if p.wall_s < 1.0 {
        return format!("({:.2} s, too short to measure)", p.wall_s);
    }
    format!(
        "ballast {}, sink {}, load generator {}, whole machine {}",
        cores(p.ballast_s, p.wall_s),
        cores(p.sink_s, p.wall_s),
        cores(p.loadgen_s, p.wall_s),
        p.machine_cores.map_or("n/a".into(), |m| format!("{m:.2}"))
    )
}

/// What one e2e round spent, for [`delivery_cpu_us`].
struct Spent<'a> {
    /// ballast's CPU in its ingest-only run, and the events it accepted.
    ingest_only: (Option<f64>, u64),
    load: &'a PhaseCpu,
    /// Accepted and delivered during the load.
    accepted: u64,
    delivered: u64,
    drain: &'a PhaseCpu,
    drained: u64,
}

/// CPU per event delivered, in µs (None where a figure is missing or a phase was too
/// short to measure): ballast's while loading, less what its ingest-only run says
/// ingesting the events accepted meanwhile costs; ballast's after the load; the sink's
/// after the load. Process CPU per event is steadier than rates on a shared machine: it
/// compares delivery paths where the end-to-end ratio mostly shows the noise.
fn delivery_cpu_us(s: &Spent) -> [Option<f64>; 3] {
    let per = |cpu_s: Option<f64>, events: u64, wall_s: f64| {
        cpu_s
            .filter(|_| events > 0 && wall_s >= 1.0)
            .map(|c| c / events as f64 * 1e6)
    };
    let (ingest_cpu, ingest_events) = s.ingest_only;
    let ingest_per_event = ingest_cpu
        .filter(|_| ingest_events > 0)
        .map(|c| c / ingest_events as f64);
    let loading = match (s.load.ballast_s, ingest_per_event) {
        (Some(all), Some(ingest)) => per(
            Some((all - ingest * s.accepted as f64).max(0.0)),
            s.delivered,
            s.load.wall_s,
        ),
        _ => None,
    };
    [
        loading,
        per(s.drain.ballast_s, s.drained, s.drain.wall_s),
        per(s.drain.sink_s, s.drained, s.drain.wall_s),
    ]
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The e2e section of the report.
pub(crate) fn markdown(s: &mut String, args: &RunArgs, outcomes: &[E2eOutcome]) {
    let Some(first) = outcomes.first() else {
        return;
    };
    if !s.is_empty() && !s.ends_with("\n\n") {
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "End-to-end delivery: ballast without destinations (ingest-only), then ballast with a webhook \
         destination (concurrency {}, batch_size {}) delivering to the sink server, under the same \
         {} load; end-to-end = events delivered / (load start, warm-up included → last delivery).\n",
        first.concurrency, first.batch_size, first.load_mode
    );
    let round_col = args.rounds > 1;
    let (rc, rd) = if round_col {
        ("| round ", "|---:")
    } else {
        ("", "")
    };
    let _ = writeln!(
        s,
        "{rc}| server | mode | req/s | events/s | p50 | p99 | max | non-200 | errors | ballast CPU (cores) |\n\
         {rd}|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for o in outcomes {
        for (name, out) in [
            ("ballast (ingest-only)", &o.ingest_only),
            ("ballast + webhook", &o.with_delivery),
        ] {
            let r = &out.report;
            if round_col {
                let _ = write!(s, "| {} ", o.round);
            }
            let _ = writeln!(
                s,
                "| {name} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} |",
                out.mode,
                r.requests_per_sec,
                r.events_per_sec,
                ms(r.latency.p50_us),
                ms(r.latency.p99_us),
                ms(r.latency.max_us),
                r.non_200,
                r.errors,
                cores(out.server_cpu_s, r.duration_s + r.warmup_s),
            );
        }
    }
    let _ = writeln!(
        s,
        "\n{rc}| accepted | delivered | load start → last delivery | end-to-end events/s | vs ingest-only (target ≥ {TARGET_RATIO:.2}×) | lag p50 | lag p99 | lag max | drained |\n\
         {rd}|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for o in outcomes {
        if round_col {
            let _ = write!(s, "| {} ", o.round);
        }
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} s | {:.0} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {} |",
            o.accepted_events,
            o.final_status.delivered,
            o.e2e_seconds,
            o.e2e_events_per_sec,
            ratio(o.e2e_events_per_sec, o.ingest_only.report.events_per_sec),
            o.sink.lag_p50_ms,
            o.sink.lag_p99_ms,
            o.sink.lag_max_ms,
            if o.drained {
                "yes".to_owned()
            } else {
                format!(
                    "NO (within {})",
                    humantime::format_duration(args.e2e_drain_timeout)
                )
            }
        );
    }
    if outcomes.len() > 1 {
        let _ = writeln!(
            s,
            "\nMedians over {} rounds: ingest-only {:.0} events/s, with delivery {:.0} events/s, end-to-end {:.0} events/s, ratio {:.2}×, lag p50 {:.1} ms, p99 {:.1} ms",
            outcomes.len(),
            median(outcomes.iter().map(|o| o.ingest_only.report.events_per_sec).collect()),
            median(outcomes.iter().map(|o| o.with_delivery.report.events_per_sec).collect()),
            median(outcomes.iter().map(|o| o.e2e_events_per_sec).collect()),
            median(outcomes.iter().map(|o| o.e2e_ratio).collect()),
            median(outcomes.iter().map(|o| o.sink.lag_p50_ms).collect()),
            median(outcomes.iter().map(|o| o.sink.lag_p99_ms).collect()),
        );
    }
    s.push('\n');
    for o in outcomes {
        let label = if round_col {
            format!("e2e (round {})", o.round)
        } else {
            "e2e".to_owned()
        };
        let load_wall = o.load_cpu.wall_s;
        let during = if load_wall > 0.0 {
            o.delivered_at_load_end as f64 / load_wall
        } else {
            0.0
        };
        let after = o
            .final_status
            .delivered
            .saturating_sub(o.delivered_at_load_end);
        let _ = writeln!(
            s,
            "{label}: {} of {} accepted events delivered by the end of the load ({:.0} events/s while loading), \
             peak backlog {:.1} MiB; the other {after} took {:.2} s more ({:.0} events/s)",
            o.delivered_at_load_end,
            o.accepted_events,
            during,
            mib(o.peak_backlog_bytes),
            o.drain_seconds,
            if o.drain_seconds > 0.0 {
                after as f64 / o.drain_seconds
            } else {
                0.0
            }
        );
        let _ = writeln!(
            s,
            "{label}: CPU (cores) during the load: {}; after it: {}; ingest-only run: ballast {}, whole machine {}",
            phase_cpu(&o.load_cpu),
            phase_cpu(&o.drain_cpu),
            cores(
                o.ingest_only.server_cpu_s,
                o.ingest_only.report.duration_s + o.ingest_only.report.warmup_s
            ),
            o.ingest_only
                .machine_cores
                .map_or("n/a".into(), |m| format!("{m:.2}")),
        );
        let us = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.2} µs"));
        let [loading, drain, sink_drain] = delivery_cpu_us(&Spent {
            ingest_only: (
                o.ingest_only.server_cpu_s,
                o.ingest_only.report.accepted_events_total,
            ),
            load: &o.load_cpu,
            accepted: o.accepted_events,
            delivered: o.delivered_at_load_end,
            drain: &o.drain_cpu,
            drained: after,
        });
        let _ = writeln!(
            s,
            "{label}: CPU per event delivered: ballast {} while loading (less what ingest-only says ingest costs), \
             {} after it; sink {} after it",
            us(loading),
            us(drain),
            us(sink_drain),
        );
        let _ = writeln!(
            s,
            "{label}: sink got {} events in {} requests ({:.1} events/request), lag (of {} events parsed) mean {:.1} ms, \
             p90 {:.1} ms; retries {}, aborted {}{}",
            o.sink.events,
            o.sink.requests,
            if o.sink.requests > 0 {
                o.sink.events as f64 / o.sink.requests as f64
            } else {
                0.0
            },
            o.sink.lag_sampled_events,
            o.sink.lag_mean_ms,
            o.sink.lag_p90_ms,
            o.final_status.retries,
            o.final_status.aborted,
            if o.sink.bad_bodies + o.sink.no_received_at > 0 {
                format!(
                    "; {} unreadable bodies, {} events without receivedAt",
                    o.sink.bad_bodies, o.sink.no_received_at
                )
            } else {
                String::new()
            }
        );
        if !o.with_delivery.metrics.is_empty() {
            let _ = writeln!(s, "{label}: ballast /metrics after delivery:");
            for line in &o.with_delivery.metrics {
                let _ = writeln!(s, "    {line}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(wall_s: f64, ballast_s: f64, sink_s: f64) -> PhaseCpu {
        PhaseCpu {
            wall_s,
            ballast_s: Some(ballast_s),
            sink_s: Some(sink_s),
            ..PhaseCpu::default()
        }
    }

    #[test]
    fn delivery_cpu_is_what_is_left_after_ingest_per_event_delivered() {
        // Ingest-only: 2 s of CPU for 1M events (2 µs each). With delivery: 1.5M accepted
        // (3 s of ingest) and 1M delivered for 4.5 s of CPU: 1.5 µs each; then 0.5M
        // drained for 0.6 s of ballast and 0.2 s of the sink.
        let (load, drain) = (phase(10.0, 4.5, 1.0), phase(1.2, 0.6, 0.2));
        let spent = Spent {
            ingest_only: (Some(2.0), 1_000_000),
            load: &load,
            accepted: 1_500_000,
            delivered: 1_000_000,
            drain: &drain,
            drained: 500_000,
        };
        let got = delivery_cpu_us(&spent).map(|v| v.map(|v| (v * 100.0).round() / 100.0));
        assert_eq!(got, [Some(1.5), Some(1.2), Some(0.4)]);
        // A drain too short to measure, nothing delivered while loading, no CPU figure.
        let (load, drain) = (phase(10.0, 4.5, 1.0), phase(0.3, 0.1, 0.1));
        let spent = Spent {
            ingest_only: (None, 1_000_000),
            delivered: 0,
            load: &load,
            drain: &drain,
            ..spent
        };
        assert_eq!(delivery_cpu_us(&spent), [None, None, None]);
    }
}
