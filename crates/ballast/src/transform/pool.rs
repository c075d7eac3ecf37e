//! The server's side: a small pool of worker processes (the same binary, run as
//! `ballast transform-worker`), each handling one batch at a time over its pipes. A
//! worker that dies, overruns the hard deadline, or exits after running out of time or
//! memory is replaced by a new one when next needed.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Semaphore;

use super::protocol::{encode, FromWorker, RunReply, RunRequest, Source, ToWorker, MAX_FRAME};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot start a transformation worker: {0}")]
    Spawn(String),
    #[error("the transformations do not compile: {0}")]
    Init(String),
    /// The worker died (crashed, was killed) while it held the batch.
    #[error("the transformation worker died during the batch: {0}")]
    Died(String),
    /// The worker did not answer within the hard deadline and was killed.
    #[error("the transformation worker did not answer within {0:?} and was killed")]
    Hung(Duration),
}

struct Proc {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Proc {
    async fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.stdin.write_all(frame).await?;
        self.stdin.flush().await
    }

    async fn recv(&mut self) -> Result<FromWorker, String> {
        let len = self.stdout.read_u32().await.map_err(|e| e.to_string())? as usize;
        if len > MAX_FRAME {
            return Err(format!("frame of {len} bytes"));
        }
        let mut body = vec![0u8; len];
        self.stdout
            .read_exact(&mut body)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_slice(&body).map_err(|e| e.to_string())
    }

    /// Kills it and reaps it in the background (no zombie left).
    fn kill(mut self) {
        let _ = self.child.start_kill();
        tokio::spawn(async move {
            let _ = self.child.wait().await;
        });
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

pub struct Pool {
    exe: PathBuf,
    init: Vec<u8>,
    timeout: Duration,
    idle: Mutex<Vec<Proc>>,
    slots: Semaphore,
}

impl Pool {
    /// Starts one worker (so that code that does not compile stops the start); more are
    /// started as batches need them, up to `workers`.
    pub async fn start(
        exe: PathBuf,
        sources: Vec<Source>,
        workers: usize,
        memory_limit: usize,
        timeout: Duration,
    ) -> Result<Pool, PoolError> {
        let init = encode(&ToWorker::Init {
            transformations: sources,
            memory_limit,
            timeout_ms: timeout.as_millis() as u64,
        })
        .map_err(|e| PoolError::Spawn(e.to_string()))?;
        let pool = Pool {
            exe,
            init,
            timeout,
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(workers.max(1)),
        };
        let first = pool.spawn().await?;
        pool.lock_idle().push(first);
        Ok(pool)
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Proc>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn spawn(&self) -> Result<Proc, PoolError> {
        let mut child = Command::new(&self.exe)
            .arg("transform-worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| PoolError::Spawn(format!("{}: {e}", self.exe.display())))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(PoolError::Spawn("no pipes to the worker".into()));
        };
        let mut p = Proc {
            child,
            stdin,
            stdout: BufReader::with_capacity(1 << 16, stdout),
        };
        metrics::counter!("ballast_transform_workers_started_total").increment(1);
        let answer = async {
            p.send(&self.init).await.map_err(|e| e.to_string())?;
            p.recv().await
        };
        match tokio::time::timeout(Duration::from_secs(30), answer).await {
            Ok(Ok(FromWorker::Ready)) => {
                tracing::debug!(pid = ?p.pid(), "transformation worker started");
                Ok(p)
            }
            Ok(Ok(FromWorker::InitFailed { message })) => {
                p.kill();
                Err(PoolError::Init(message))
            }
            Ok(Ok(FromWorker::Done(_))) => {
                p.kill();
                Err(PoolError::Spawn("unexpected answer to Init".into()))
            }
            Ok(Err(e)) => {
                p.kill();
                Err(PoolError::Spawn(e))
            }
            Err(_) => {
                p.kill();
                Err(PoolError::Spawn("no answer to Init within 30 s".into()))
            }
        }
    }

    /// Runs one batch in a worker. The hard deadline is the time limit per call times the
    /// calls the batch may make, plus 5 s: the interrupt handler stops a call well before.
    /// A worker taken from the idle ones that dies on the batch may have died before it
    /// (killed while idle): the batch goes once more to a new worker, and only a second
    /// death is the batch's.
    pub async fn run(&self, req: RunRequest) -> Result<RunReply, PoolError> {
        let calls = (req.events.len().max(1) * req.chain.len().max(1)) as u32;
        let hard = self.timeout.saturating_mul(calls) + Duration::from_secs(5);
        let frame = encode(&ToWorker::Run(req)).map_err(|e| PoolError::Spawn(e.to_string()))?;
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|e| PoolError::Spawn(e.to_string()))?;
        let idle = self.lock_idle().pop();
        let was_idle = idle.is_some();
        let first = match idle {
            Some(p) => self.run_in(p, &frame, hard).await,
            None => self.run_in(self.spawn().await?, &frame, hard).await,
        };
        match first {
            Err(PoolError::Died(e)) if was_idle => {
                tracing::warn!(error = %e, "a transformation worker died on a batch; trying it once in a new worker");
                self.run_in(self.spawn().await?, &frame, hard).await
            }
            other => other,
        }
    }

    async fn run_in(
        &self,
        mut p: Proc,
        frame: &[u8],
        hard: Duration,
    ) -> Result<RunReply, PoolError> {
        let answer = async {
            p.send(frame).await.map_err(|e| e.to_string())?;
            p.recv().await
        };
        let result = tokio::time::timeout(hard, answer).await;
        match result {
            Ok(Ok(FromWorker::Done(reply))) => {
                if reply.tainted {
                    // It exits by itself after this answer.
                    metrics::counter!("ballast_transform_workers_replaced_total", "reason" => "limit").increment(1);
                    p.kill();
                } else {
                    self.lock_idle().push(p);
                }
                Ok(reply)
            }
            Ok(Ok(other)) => {
                p.kill();
                Err(PoolError::Died(format!("unexpected answer {other:?}")))
            }
            Ok(Err(e)) => {
                let status = p.child.try_wait().ok().flatten();
                metrics::counter!("ballast_transform_workers_replaced_total", "reason" => "died")
                    .increment(1);
                p.kill();
                Err(PoolError::Died(match status {
                    Some(s) => format!("{e} ({s})"),
                    None => e,
                }))
            }
            Err(_) => {
                metrics::counter!("ballast_transform_workers_replaced_total", "reason" => "hung")
                    .increment(1);
                p.kill();
                Err(PoolError::Hung(hard))
            }
        }
    }
}
