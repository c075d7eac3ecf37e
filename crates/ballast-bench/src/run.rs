//! `run`: the whole comparison in one command.
//!
//! For each mode, each server (null, naive, ballast) is started as a child
//! process on a free loopback port, waited for, loaded for the same duration
//! with the same number of connections, and stopped before the next one
//! starts, so the servers never compete with each other for the two cores.
//!
//! The `e2e` mode (see `e2e.rs`) measures ballast with a webhook destination
//! delivering to the sink server, against ballast without destinations.

use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use tokio::time::sleep;

use crate::args::RunArgs;
use crate::e2e;
use crate::harness::cpu_busy;
use crate::measure::{Bench, Server};
use crate::report::markdown;

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
