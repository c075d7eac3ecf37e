//! `ballast-bench`: load generator and baselines for ballast.
//!
//! - `null-server`: HTTP only, answers 200 without doing anything (baseline 1).
//! - `naive-server`: parse, enrich, re-serialize, append + group fdatasync
//!   (baseline 2).
//! - `sink-server`: a null webhook receiver that records the delivery lag of
//!   each event (for the end-to-end benchmark).
//! - `load`: the load generator.
//! - `run`: starts null, naive and ballast one after another on free
//!   loopback ports, loads each, and prints a comparison; with `--e2e` it
//!   also measures ballast's end-to-end delivery to the sink.

mod args;
mod drain;
mod e2e;
mod events;
mod harness;
mod load;
mod measure;
mod naive;
mod null;
mod report;
mod run;
mod server;
mod sink;
mod stats;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ballast-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Baseline 1: read the whole body, answer 200 "OK".
    NullServer {
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: SocketAddr,
    },
    /// Baseline 2: parse + enrich + re-serialize + append to one file with
    /// group-committed fdatasync, answer 200 "OK" once durable.
    NaiveServer {
        #[arg(long, default_value = "127.0.0.1:9091")]
        listen: SocketAddr,
        /// Append-only file the events go to (created if missing).
        #[arg(long)]
        file: PathBuf,
    },
    /// Null webhook receiver: answers 200 to every POST and records each
    /// event's delivery lag (arrival − `receivedAt`); GET /stats, POST /reset.
    SinkServer {
        #[arg(long, default_value = "127.0.0.1:9092")]
        listen: SocketAddr,
    },
    /// Send load to one server and report throughput and latency.
    Load {
        #[command(flatten)]
        config: load::LoadConfig,
        /// Print one JSON line of results instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Benchmark null, naive and ballast one after another and compare (and,
    /// with --e2e, ballast's end-to-end delivery).
    Run(args::RunArgs),
    /// A burst of load, then the drain of its backlog, for the embedded store and (with
    /// --postgres-url) the PostgreSQL store in one run; with --e2e also delivery under
    /// load.
    Drain(drain::DrainArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    match dispatch(Cli::parse().command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the context chain without a backtrace.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::NullServer { listen } => null::run(listen).await,
        Command::NaiveServer { listen, file } => naive::run(listen, &file).await,
        Command::SinkServer { listen } => sink::run(listen).await,
        Command::Load { config, json } => {
            let report = load::run(&config).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                report.print_human();
            }
            Ok(())
        }
        Command::Run(args) => run::run(args).await,
        Command::Drain(args) => drain::run(args).await,
    }
}
