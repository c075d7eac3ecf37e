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
        /// Force the running mode at start (durable; `normal` clears the crash history).
        #[arg(long, value_parser = ["normal", "degraded"])]
        mode: Option<String>,
    },
    /// Print the running mode, or change it: `ballast mode set normal|degraded`.
    Mode {
        #[command(subcommand)]
        command: Option<ModeCommand>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Validate a configuration file (with the environment applied).
    CheckConfig { config: PathBuf },
    /// Inspect the embedded event log.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// Print the running server's status: mode, storage, per-destination backlog,
    /// in-flight, retrying, delivered and aborted counts and rates.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and replay events a destination gave up on.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// User transformations: `ballast transform test` runs one over events from a file.
    Transform {
        #[command(subcommand)]
        command: TransformCommand,
    },
    /// A transformation worker: started by the server, speaks the framed protocol on
    /// stdin/stdout (see `transform::protocol`).
    #[command(hide = true)]
    TransformWorker,
}

#[derive(Subcommand, Debug)]
enum TransformCommand {
    /// Runs a transformation over events (JSON lines) and prints what would be sent: one
    /// JSON line per event out; drops, failures and `log` lines as `//` comments.
    Test {
        #[arg(long, short)]
        config: PathBuf,
        /// The transformation's id.
        #[arg(long)]
        transformation: String,
        /// A file of events, one JSON object a line.
        #[arg(long)]
        events: PathBuf,
        /// The destination id `metadata()` reports.
        #[arg(long, default_value = "test")]
        destination: String,
    },
}

#[derive(Subcommand, Debug)]
enum ModeCommand {
    /// Switch the running server's mode (durable; `normal` clears the crash history and
    /// starts delivering the backlog).
    Set {
        #[arg(value_parser = ["normal", "degraded"])]
        mode: String,
    },
}

#[derive(Subcommand, Debug)]
enum DeadLetterCommand {
    /// List dead letters (one JSON object a line).
    List {
        #[arg(long)]
        destination: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Re-enqueue a destination's dead letters for delivery.
    Replay {
        #[arg(long)]
        destination: String,
        /// Only events that died at or after this time: RFC 3339 ("2026-11-26T10:00:00Z")
        /// or an age ("30m" = in the last 30 minutes).
        #[arg(long)]
        since: Option<String>,
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
    #[arg(long, global = true, default_value = "http://127.0.0.1:8081")]
    admin: String,
    /// Bearer token of the admin API.
    #[arg(
        long,
        global = true,
        env = "BALLAST_ADMIN_TOKEN",
        hide_env_values = true
    )]
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
            mode,
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
            cfg.server.check_admin_access()?;
            init_tracing(cfg.server.log_format);
            let forced = mode
                .as_deref()
                .map(str::parse::<crate::recovery::Mode>)
                .transpose()?;
            let rt = runtime()?;
            let code = rt.block_on(crate::server::run(cfg, forced));
            // Blocking work still running (a hung database call of a blocking client)
            // must not hold the exit up: the shutdown already waited what it may.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            code
        }
        Command::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            if !cfg.transformations.is_empty() {
                // Compiled here, in this command's process, as a worker would.
                let sources = crate::transform::sources(&cfg.transformations)?;
                crate::transform::engine::Engine::new(
                    &sources,
                    cfg.transform.memory_limit,
                    cfg.transform.timeout,
                )?;
            }
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
        Command::Status { admin, json } => status(&admin, json),
        Command::TransformWorker => Ok(crate::transform::worker::main()),
        Command::Transform {
            command:
                TransformCommand::Test {
                    config,
                    transformation,
                    events,
                    destination,
                },
        } => transform_test(&config, &transformation, &events, &destination),
        Command::Mode { command, admin } => {
            let rt = runtime()?;
            let body = match command {
                None => rt.block_on(client::get(
                    &admin.admin,
                    "/v1/mode",
                    admin.token.as_deref(),
                ))?,
                Some(ModeCommand::Set { mode }) => rt.block_on(client::post_json(
                    &admin.admin,
                    "/v1/mode",
                    admin.token.as_deref(),
                    serde_json::json!({ "mode": mode }),
                ))?,
            };
            let v: serde_json::Value = serde_json::from_slice(&body).context("reading answer")?;
            println!(
                "{} (since {}, {}; {} crash(es) in the last {} s, threshold {})",
                v["mode"].as_str().unwrap_or("?"),
                v["since"].as_str().unwrap_or("?"),
                v["reason"].as_str().unwrap_or("?"),
                v["crashes_in_window"],
                v["crash_window_s"],
                v["crash_threshold"]
            );
            Ok(0)
        }
        Command::DeadLetters {
            command:
                DeadLetterCommand::List {
                    destination,
                    limit,
                    admin,
                },
        } => {
            let mut path = format!("/v1/dead-letters?limit={limit}");
            if let Some(d) = destination {
                path.push_str(&format!("&destination={}", encode(&d)));
            }
            let body =
                runtime()?.block_on(client::get(&admin.admin, &path, admin.token.as_deref()))?;
            let list: Vec<serde_json::Value> =
                serde_json::from_slice(&body).context("reading dead letters")?;
            for l in list {
                println!("{l}");
            }
            Ok(0)
        }
        Command::DeadLetters {
            command:
                DeadLetterCommand::Replay {
                    destination,
                    since,
                    admin,
                },
        } => {
            let mut path = format!(
                "/v1/dead-letters/replay?destination={}",
                encode(&destination)
            );
            if let Some(s) = since {
                let t = parse_since(&s)?;
                path.push_str(&format!(
                    "&since={}",
                    encode(&humantime::format_rfc3339_millis(t).to_string())
                ));
            }
            let body =
                runtime()?.block_on(client::post(&admin.admin, &path, admin.token.as_deref()))?;
            let v: serde_json::Value = serde_json::from_slice(&body).context("reading answer")?;
            println!(
                "{} dead letter(s) of {destination} re-enqueued",
                v["replayed"]
            );
            Ok(0)
        }
    }
}

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// An RFC 3339 time, or an age such as "30m" (that long ago).
fn parse_since(s: &str) -> anyhow::Result<std::time::SystemTime> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    let age = humantime::parse_duration(s)
        .with_context(|| format!("--since {s:?}: not an RFC 3339 time nor a duration"))?;
    std::time::SystemTime::now()
        .checked_sub(age)
        .context("--since is too far back")
}

fn status(admin: &AdminArgs, json: bool) -> anyhow::Result<i32> {
    let rt = runtime()?;
    let fetch = || -> anyhow::Result<serde_json::Value> {
        let body = rt.block_on(client::get(
            &admin.admin,
            "/v1/status",
            admin.token.as_deref(),
        ))?;
        serde_json::from_slice(&body).context("reading status")
    };
    let first = fetch()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&first)?);
        return Ok(0);
    }
    // A second sample one second later gives the rates.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let second = fetch()?;
    let st = &second["storage"];
    println!("mode        {}", second["mode"].as_str().unwrap_or("?"));
    println!("routing     {}", second["routing"]);
    println!(
        "storage     {} of {} bytes used, {} events stored, writable {}{}",
        st["bytes_used"],
        st["quota_bytes"],
        // Held in the log (also after a restart); else what this run appended.
        if st["events_stored"].is_u64() {
            &st["events_stored"]
        } else {
            &st["events_appended"]
        },
        st["writable"],
        st["reason"]
            .as_str()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    println!();
    println!(
        "{:<20} {:>14} {:>10} {:>9} {:>9} {:>12} {:>10} {:>9} {:>8}  here",
        "destination",
        "backlog",
        "buffered",
        "in flight",
        "retrying",
        "delivered",
        "deliv/s",
        "aborted",
        "dead",
    );
    let empty = Vec::new();
    let before = first["destinations"].as_array().unwrap_or(&empty);
    for d in second["destinations"].as_array().unwrap_or(&empty) {
        let prev = before.iter().find(|p| p["id"] == d["id"]);
        let rate = prev
            .map(|p| {
                d["delivered"]
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(p["delivered"].as_u64().unwrap_or(0))
            })
            .unwrap_or(0);
        println!(
            "{:<20} {:>14} {:>10} {:>9} {:>9} {:>12} {:>10} {:>9} {:>8}  {}",
            d["id"].as_str().unwrap_or("?"),
            d["backlog_bytes"].to_string(),
            d["buffered_events"].to_string(),
            d["in_flight"].to_string(),
            d["retrying_users"].to_string(),
            d["delivered"].to_string(),
            rate,
            d["aborted"].to_string(),
            d["dead_letters"].to_string(),
            // With several replicas on PostgreSQL, they share each destination's
            // partitions.
            match (d["partitions_held"].as_u64(), d["partitions"].as_u64()) {
                (Some(0), _) => "standby".to_string(),
                (Some(h), Some(p)) if p > 1 => format!("delivering {h}/{p} partitions"),
                _ if d["active"] == true => "delivering".to_string(),
                _ => "standby".to_string(),
            }
        );
    }
    Ok(0)
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
                Ok((source, _meta, event)) => {
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

/// `ballast transform test`: the engine in this process (a command, not the server).
fn transform_test(
    config: &std::path::Path,
    id: &str,
    events: &std::path::Path,
    destination: &str,
) -> anyhow::Result<i32> {
    use crate::transform::{engine::Engine, protocol::RunRequest};
    let cfg = Config::load(config)?;
    let sources = crate::transform::sources(&cfg.transformations)?;
    let mut engine = Engine::new(&sources, cfg.transform.memory_limit, cfg.transform.timeout)?;
    let Some(index) = engine.index_of(id) else {
        anyhow::bail!("no transformation {id:?} in {}", config.display());
    };
    let text =
        std::fs::read_to_string(events).with_context(|| format!("reading {}", events.display()))?;
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    let reply = engine.run(&RunRequest {
        chain: vec![index],
        destination_id: destination.to_string(),
        source_id: None,
        events: lines,
    });
    let mut out = std::io::stdout().lock();
    for (t, line) in &reply.logs {
        writeln!(out, "// log [{t}]: {line}")?;
    }
    let mut failed = 0;
    for (n, r) in reply.results.iter().enumerate() {
        match r {
            Ok(outputs) if outputs.is_empty() => writeln!(out, "// event {}: dropped", n + 1)?,
            Ok(outputs) => {
                for o in outputs {
                    writeln!(out, "{}", o.json)?;
                }
            }
            Err(f) => {
                failed += 1;
                for (k, l) in f.to_string().lines().enumerate() {
                    if k == 0 {
                        writeln!(out, "// event {}: {l}", n + 1)?;
                    } else {
                        writeln!(out, "//   {l}")?;
                    }
                }
            }
        }
    }
    Ok(if failed > 0 { 2 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn admin_flags_go_before_or_after_subcommands() {
        Cli::command().debug_assert();
        for args in [
            vec!["ballast", "mode", "set", "normal", "--admin", "http://x"],
            vec!["ballast", "mode", "--admin", "http://x", "set", "normal"],
            vec!["ballast", "mode", "--admin", "http://x"],
            vec![
                "ballast",
                "dead-letters",
                "replay",
                "--destination",
                "d",
                "--admin",
                "http://x",
            ],
        ] {
            let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let admin = match cli.command {
                Command::Mode { admin, .. } => admin.admin,
                Command::DeadLetters {
                    command: DeadLetterCommand::Replay { admin, .. },
                } => admin.admin,
                other => panic!("{other:?}"),
            };
            assert_eq!(admin, "http://x", "{args:?}");
        }
    }
}
