//! `ballast-bench run`'s command line: servers, modes, rounds, load shape.

use std::path::PathBuf;
use std::time::Duration;

use crate::load::Mode;

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
    /// e2e: a file of JavaScript the webhook destination applies as a user
    /// transformation (docs/TRANSFORMATIONS.md).
    #[arg(long)]
    pub e2e_transformation: Option<PathBuf>,
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

impl RunArgs {
    /// The load modes null, naive and ballast are compared in.
    pub(crate) fn load_modes(&self) -> Vec<Mode> {
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

    pub(crate) fn wants_e2e(&self) -> bool {
        self.e2e || self.modes.contains(&RunMode::E2e)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
