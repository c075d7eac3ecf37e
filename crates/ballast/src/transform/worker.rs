//! The worker process (`ballast transform-worker`, hidden): reads `Init` from stdin,
//! compiles the transformations, then answers each `Run` on stdout until stdin closes.
//! Diagnostics go to stderr (the server's, which the worker inherits).

use std::io::{BufReader, BufWriter};
use std::time::Duration;

use super::engine::Engine;
use super::protocol::{read_frame, write_frame, FrameError, FromWorker, ToWorker};

/// Runs the worker; its exit code.
pub fn main() -> i32 {
    // The server ends its workers (it closes their stdin, or kills them); a SIGTERM or
    // SIGINT sent to the whole group (systemd's stop, a terminal's Ctrl-C) must not kill
    // a worker under the batches the server is finishing before it stops.
    // SAFETY: signal(2) with SIG_IGN, before any other thread exists in this process.
    unsafe {
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let mut input = BufReader::new(stdin.lock());
    let mut output = BufWriter::new(stdout.lock());
    match serve(&mut input, &mut output) {
        Ok(()) => 0,
        Err(FrameError::Closed) => 0,
        Err(e) => {
            eprintln!("ballast transform-worker: {e}");
            1
        }
    }
}

fn serve(
    input: &mut impl std::io::Read,
    output: &mut impl std::io::Write,
) -> Result<(), FrameError> {
    let (sources, memory_limit, timeout_ms) = match read_frame(input)? {
        ToWorker::Init {
            transformations,
            memory_limit,
            timeout_ms,
        } => (transformations, memory_limit, timeout_ms),
        ToWorker::Run(_) => {
            write_frame(
                output,
                &FromWorker::InitFailed {
                    message: "the first message was not Init".into(),
                },
            )?;
            return Ok(());
        }
    };
    let mut engine = match Engine::new(&sources, memory_limit, Duration::from_millis(timeout_ms)) {
        Ok(e) => e,
        Err(e) => {
            write_frame(
                output,
                &FromWorker::InitFailed {
                    message: e.to_string(),
                },
            )?;
            return Ok(());
        }
    };
    write_frame(output, &FromWorker::Ready)?;
    loop {
        let req = match read_frame(input)? {
            ToWorker::Run(r) => r,
            ToWorker::Init { .. } => continue,
        };
        // Tests: the engine crashing on an event (a segfault or abort in QuickJS).
        #[cfg(feature = "failpoints")]
        if let Some(id) = fail::eval("transform::worker_abort", |a| a.unwrap_or_default()) {
            let needle = format!("\"messageId\":\"{id}\"");
            if req.events.iter().any(|e| e.contains(&needle)) {
                eprintln!("failpoint transform::worker_abort: aborting on {id}");
                std::process::abort();
            }
        }
        let reply = engine.run(&req);
        let tainted = reply.tainted;
        write_frame(output, &FromWorker::Done(reply))?;
        if tainted {
            // Out of time or memory: the runtime's state is suspect; a fresh worker takes over.
            return Ok(());
        }
    }
}
