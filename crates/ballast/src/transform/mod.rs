//! User transformations: JavaScript functions in RudderStack's API
//! (`transformEvent(event, metadata)`, `transformBatch(events, metadata)`) that a
//! destination applies, in the order it lists them, to each batch right before
//! delivery. User code never runs in the server: `pool.rs` keeps worker processes (the
//! same binary, `ballast transform-worker`: `worker.rs`) that run it in QuickJS
//! (`engine.rs`) with a memory limit and a time limit per call, over a framed protocol
//! on their pipes (`protocol.rs`). [`Transformed`] wraps a destination: it sends the
//! batch through the chain, delivers what comes out, and names the events a
//! transformation failed on as refused (`Outcome::DeliveredExcept`), so the router
//! dead-letters them with the error and stack while the rest goes on. A worker that dies
//! or hangs on a batch makes the delivery panic, which the router turns into strikes for
//! the batch's events: an event that kills the worker every time is quarantined as
//! poison, like any event a delivery panics on. See docs/TRANSFORMATIONS.md.

pub mod engine;
pub mod pool;
pub mod protocol;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use crate::destinations::{Destination, DestinationConfig, Event, Outcome};
use crate::units::{duration, size_usize};
use pool::{Pool, PoolError};
use protocol::{RunRequest, Source};

/// A `[[transformations]]` entry: an id and its JavaScript, in a file or inline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformationConfig {
    pub id: String,
    /// A file of JavaScript (relative paths: from the configuration file's directory).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// The JavaScript itself.
    #[serde(default)]
    pub code: Option<String>,
}

/// The `[transform]` section: the worker pool and its limits.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransformSettings {
    /// Worker processes at most (each runs one batch at a time; default 2).
    pub workers: usize,
    /// Memory one worker's JavaScript runtime may use (default 64 MiB).
    #[serde(deserialize_with = "size_usize")]
    pub memory_limit: usize,
    /// Time one call may run: `transformEvent` for one event, `transformBatch` for a
    /// batch, a returned promise included (default 1 s).
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
}

impl Default for TransformSettings {
    fn default() -> Self {
        TransformSettings {
            workers: 2,
            memory_limit: 64 << 20,
            timeout: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransformError {
    #[error("transformation {id:?}: {message}")]
    Invalid { id: String, message: String },
    #[error("destination {destination:?} names unknown transformation {id:?}")]
    Unknown { destination: String, id: String },
    #[error(transparent)]
    Pool(#[from] PoolError),
}

/// Checks the transformations and what destinations name (the configuration's
/// validation calls it).
pub fn validate(
    transformations: &[TransformationConfig],
    settings: &TransformSettings,
    destinations: &[DestinationConfig],
) -> Result<(), TransformError> {
    let mut ids = std::collections::HashSet::new();
    for t in transformations {
        let invalid = |message: &str| TransformError::Invalid {
            id: t.id.clone(),
            message: message.into(),
        };
        if t.id.trim().is_empty() {
            return Err(invalid("empty id"));
        }
        if !ids.insert(t.id.as_str()) {
            return Err(invalid("duplicate id"));
        }
        if t.file.is_some() == t.code.is_some() {
            return Err(invalid("set exactly one of `file` and `code`"));
        }
    }
    if settings.workers == 0 || settings.workers > 64 {
        return Err(TransformError::Invalid {
            id: "[transform]".into(),
            message: "workers must be 1..=64".into(),
        });
    }
    if settings.timeout.is_zero() || settings.memory_limit < (1 << 20) {
        return Err(TransformError::Invalid {
            id: "[transform]".into(),
            message: "timeout must be positive and memory_limit at least 1 MiB".into(),
        });
    }
    for d in destinations {
        for id in &d.transformations {
            if !ids.contains(id.as_str()) {
                return Err(TransformError::Unknown {
                    destination: d.id.clone(),
                    id: id.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Relative `file` paths made relative to `dir` (the configuration file's directory).
pub fn resolve_files(transformations: &mut [TransformationConfig], dir: &Path) {
    for t in transformations {
        if let Some(f) = &t.file {
            if f.is_relative() {
                t.file = Some(dir.join(f));
            }
        }
    }
}

/// The JavaScript of each transformation (files read now).
pub fn sources(transformations: &[TransformationConfig]) -> Result<Vec<Source>, TransformError> {
    transformations
        .iter()
        .map(|t| {
            let code = match (&t.code, &t.file) {
                (Some(c), _) => c.clone(),
                (None, Some(f)) => {
                    std::fs::read_to_string(f).map_err(|e| TransformError::Invalid {
                        id: t.id.clone(),
                        message: format!("cannot read {}: {e}", f.display()),
                    })?
                }
                (None, None) => {
                    return Err(TransformError::Invalid {
                        id: t.id.clone(),
                        message: "no `file` or `code`".into(),
                    })
                }
            };
            Ok(Source {
                id: t.id.clone(),
                code,
            })
        })
        .collect()
}

/// The transformations of a configuration, ready to wrap destinations.
pub struct Transformations {
    ids: Vec<String>,
    pool: Option<Arc<Pool>>,
}

impl Transformations {
    /// Starts the worker pool (this binary, as `transform-worker`) when some destination
    /// uses a transformation; compiles every transformation there first.
    pub async fn start(
        transformations: &[TransformationConfig],
        settings: &TransformSettings,
        destinations: &[DestinationConfig],
    ) -> Result<Transformations, TransformError> {
        let ids = transformations.iter().map(|t| t.id.clone()).collect();
        let used = destinations
            .iter()
            .any(|d| d.enabled && !d.transformations.is_empty());
        let pool = if used {
            let exe = std::env::current_exe().map_err(|e| {
                PoolError::Spawn(format!("cannot find this program's executable: {e}"))
            })?;
            let pool = Pool::start(
                exe,
                sources(transformations)?,
                settings.workers,
                settings.memory_limit,
                settings.timeout,
            )
            .await?;
            Some(Arc::new(pool))
        } else {
            None
        };
        Ok(Transformations { ids, pool })
    }

    /// `sink`, or `sink` behind the destination's transformations when it lists some.
    pub fn wrap(
        &self,
        config: &DestinationConfig,
        sink: Arc<dyn Destination>,
    ) -> Result<Arc<dyn Destination>, TransformError> {
        if config.transformations.is_empty() {
            return Ok(sink);
        }
        let chain = config
            .transformations
            .iter()
            .map(|id| {
                self.ids
                    .iter()
                    .position(|t| t == id)
                    .ok_or_else(|| TransformError::Unknown {
                        destination: config.id.clone(),
                        id: id.clone(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let Some(pool) = self.pool.clone() else {
            return Err(TransformError::Invalid {
                id: config.transformations.join(","),
                message: "no worker pool".into(),
            });
        };
        Ok(Arc::new(Transformed {
            inner: sink,
            pool,
            chain,
            destination_id: config.id.clone(),
            // With one source the events' source is known; the events handed to a
            // destination do not carry it otherwise.
            source_id: match config.sources.as_slice() {
                [one] => Some(one.clone()),
                _ => None,
            },
        }))
    }
}

/// A destination behind a chain of transformations.
pub struct Transformed {
    inner: Arc<dyn Destination>,
    pool: Arc<Pool>,
    chain: Vec<usize>,
    destination_id: String,
    source_id: Option<String>,
}

fn record(reply: &protocol::RunReply, destination: &str) {
    for (id, line) in &reply.logs {
        tracing::info!(transformation = %id, destination, "{line}");
    }
    for s in &reply.stats {
        let t = s.transformation.clone();
        metrics::counter!("ballast_transform_events_in_total", "transformation" => t.clone())
            .increment(s.events_in);
        metrics::counter!("ballast_transform_events_out_total", "transformation" => t.clone())
            .increment(s.events_out);
        metrics::counter!("ballast_transform_events_dropped_total", "transformation" => t.clone())
            .increment(s.dropped);
        metrics::counter!("ballast_transform_events_failed_total", "transformation" => t.clone())
            .increment(s.failed);
        metrics::histogram!("ballast_transform_batch_seconds", "transformation" => t)
            .record(s.nanos as f64 / 1e9);
    }
}

#[async_trait]
impl Destination for Transformed {
    async fn deliver(&self, events: &[Event]) -> Outcome {
        let mut refused: Vec<(usize, String)> = Vec::new();
        let mut texts = Vec::with_capacity(events.len());
        let mut index = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            match std::str::from_utf8(&e.json) {
                Ok(s) => {
                    texts.push(s.to_string());
                    index.push(i);
                }
                Err(_) => refused.push((i, "transformation: the event is not UTF-8".into())),
            }
        }
        let req = RunRequest {
            chain: self.chain.clone(),
            destination_id: self.destination_id.clone(),
            source_id: self.source_id.clone(),
            events: texts,
        };
        let reply = match self.pool.run(req).await {
            Ok(r) => r,
            Err(e @ (PoolError::Died(_) | PoolError::Hung(_))) => {
                // Like a crash of the processing: the router strikes this delivery's
                // events (an event that kills the worker every time becomes poison) and
                // sends them again, alone. resume_unwind: no panic hook, no backtrace.
                tracing::error!(destination = %self.destination_id, error = %e, "transformation worker lost a batch");
                std::panic::resume_unwind(Box::new(e.to_string()));
            }
            Err(e) => {
                return Outcome::Retry {
                    status: None,
                    reason: e.to_string(),
                    retry_after: None,
                }
            }
        };
        record(&reply, &self.destination_id);
        let mut out = Vec::new();
        let mut origin_of = Vec::new();
        for (k, result) in reply.results.into_iter().enumerate() {
            let Some(&i) = index.get(k) else { break };
            match result {
                Ok(outputs) => {
                    for o in outputs {
                        let message_id = o
                            .message_id
                            .map(bytestring::ByteString::from)
                            .unwrap_or_else(|| events[i].message_id.clone());
                        out.push(Event {
                            json: bytes::Bytes::from(o.json),
                            message_id,
                        });
                        origin_of.push(i);
                    }
                }
                Err(f) => {
                    tracing::warn!(destination = %self.destination_id, transformation = %f.transformation, kind = f.kind.as_str(), message_id = %events[i].message_id, error = %f.message, "transformation failed on an event: dead-lettered");
                    refused.push((i, f.to_string()));
                }
            }
        }
        refused.sort_by_key(|r| r.0);
        let outcome = if out.is_empty() {
            Outcome::Delivered
        } else {
            self.inner.deliver(&out).await
        };
        match outcome {
            Outcome::Delivered if refused.is_empty() => Outcome::Delivered,
            Outcome::Delivered => Outcome::DeliveredExcept { refused },
            Outcome::DeliveredExcept { refused: theirs } => {
                for (k, reason) in theirs {
                    if let Some(&i) = origin_of.get(k) {
                        refused.push((i, reason));
                    }
                }
                refused.sort_by_key(|r| r.0);
                // One event fanned out into several refused outputs: one reason.
                refused.dedup_by_key(|r| r.0);
                Outcome::DeliveredExcept { refused }
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests;
