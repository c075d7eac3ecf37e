//! The report of a run: the comparison table (medians over the rounds of each server
//! and mode) and the e2e section, as Markdown.

use std::fmt::Write as _;
use std::time::SystemTime;

use crate::args::RunArgs;
use crate::e2e::{self, E2eOutcome};
use crate::load::{ms, LoadReport, Mode};
use crate::measure::{Outcome, Server};
use crate::stats::{median, ratio};

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

pub(crate) fn markdown(
    args: &RunArgs,
    outcomes: &[Outcome],
    e2e_outcomes: &[E2eOutcome],
) -> String {
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
