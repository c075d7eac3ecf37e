//! Command line: `serve`, `check-config`, `log dump`, `status`, `version`.

mod client;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};

#[derive(Parser, Debug)]
#[command(
    name = "ballast",
    version,
    about = "Event data plane speaking RudderStack's HTTP API"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server.
    Serve {
        /// TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Overrides server.data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Overrides server.listen (e.g. 127.0.0.1:0 for any free port).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Overrides server.admin_listen.
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
    },
    /// Validate a configuration file (with the environment applied).
    CheckConfig { config: PathBuf },
    /// Inspect the embedded event log.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// Print the running server's status.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand, Debug)]
enum LogCommand {
    /// Print every stored event, one JSON object a line, in log order. Safe to run while
    /// a server writes the same directory (it changes nothing).
    Dump {
        /// The server's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Wrap each event as {"position":…,"source":…,"event":…}.
        #[arg(long)]
        meta: bool,
    },
}

#[derive(clap::Args, Debug)]
struct AdminArgs {
    /// Admin API of the running server.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    admin: String,
    /// Bearer token of the admin API.
    #[arg(long, env = "BALLAST_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BALLAST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Runs the command line; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ballast")
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve {
            config,
            data_dir,
            listen,
            admin_listen,
        } => {
            let mut cfg = Config::load(&config)?;
            if let Some(d) = data_dir {
                cfg.server.data_dir = d;
            }
            if let Some(l) = listen {
                cfg.server.listen = l;
            }
            if let Some(l) = admin_listen {
                cfg.server.admin_listen = l;
            }
            init_tracing(cfg.server.log_format);
            runtime()?.block_on(crate::server::run(cfg))
        }
        Command::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            println!(
                "{}: OK ({} source(s), storage {:?} in {})",
                config.display(),
                cfg.sources.len(),
                cfg.storage.backend,
                cfg.server.data_dir.display()
            );
            Ok(0)
        }
        Command::Log {
            command: LogCommand::Dump { data_dir, meta },
        } => dump(&data_dir, meta),
        Command::Status { admin } => {
            let body = runtime()?.block_on(client::get(
                &admin.admin,
                "/v1/status",
                admin.token.as_deref(),
            ))?;
            let v: serde_json::Value = serde_json::from_slice(&body).context("reading status")?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(0)
        }
    }
}

fn dump(data_dir: &std::path::Path, meta: bool) -> anyhow::Result<i32> {
    let log_dir = data_dir.join("log");
    if !log_dir.is_dir() {
        anyhow::bail!(
            "no event log in {} (expected {})",
            data_dir.display(),
            log_dir.display()
        );
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut write_err: Option<std::io::Error> = None;
    let bad = std::cell::Cell::new(0u64);
    ballast_log::scan_dir(
        &log_dir,
        |position, payload| {
            if write_err.is_some() {
                return;
            }
            let r = match crate::store::envelope::decode(payload) {
                Ok((source, event)) => {
                    if meta {
                        write!(out, "{{\"position\":{position},\"source\":")
                            .and_then(|_| {
                                serde_json::to_writer(&mut out, source)
                                    .map_err(std::io::Error::other)
                            })
                            .and_then(|_| out.write_all(b",\"event\":"))
                            .and_then(|_| out.write_all(event))
                            .and_then(|_| out.write_all(b"}\n"))
                    } else {
                        out.write_all(event).and_then(|_| out.write_all(b"\n"))
                    }
                }
                Err(e) => {
                    bad.set(bad.get() + 1);
                    eprintln!("position {position}: unreadable record: {e}");
                    Ok(())
                }
            };
            if let Err(e) = r {
                write_err = Some(e);
            }
        },
        |position, len| {
            bad.set(bad.get() + 1);
            eprintln!("position {position}: {len} damaged bytes (not yet quarantined)");
        },
    )?;
    if let Some(e) = write_err {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("writing to stdout");
        }
        return Ok(0);
    }
    out.flush().context("writing to stdout")?;
    Ok(if bad.get() > 0 { 2 } else { 0 })
}
