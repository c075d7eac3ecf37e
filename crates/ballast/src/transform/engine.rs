//! The JavaScript engine a transformation worker runs: QuickJS through `rquickjs`, one
//! runtime holding every configured transformation as an ES module. Runs only in a
//! worker process (`ballast transform-worker`) or the `transform test` command, never in
//! the server.
//!
//! Limits: the runtime's memory (`set_memory_limit`: an allocation past it throws
//! "out of memory"), and a deadline per call (`transformEvent` for one event, or
//! `transformBatch` once), enforced by the interrupt handler, which QuickJS calls while
//! it executes: past the deadline it raises an exception the code cannot catch. QuickJS
//! has no network or file access unless given (no `std`/`os` modules are loaded).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rquickjs::{Context, Ctx, Function, Module, Object, Runtime, Value};

use super::protocol::{Failure, FailureKind, Output, RunReply, RunRequest, Source, Stats};

/// Lines one batch may log (the rest are counted, not kept), and the length of one line.
const MAX_LOG_LINES: usize = 100;
const MAX_LOG_LINE: usize = 2_000;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot start the JavaScript runtime: {0}")]
    Runtime(String),
    #[error("transformation {id:?}: {message}")]
    Compile { id: String, message: String },
}

/// Runs in the runtime before the transformations: `log`, and the `metadata` function
/// each call is given.
const PRELUDE: &str = r#"
globalThis.log = (...args) => __ballast_log(args.map((a) => {
  if (typeof a === "string") return a;
  try { const s = JSON.stringify(a); return s === undefined ? String(a) : s; } catch (e) { return String(a); }
}).join(" "));
globalThis.console = { log: globalThis.log, info: globalThis.log, warn: globalThis.log, error: globalThis.log };
globalThis.__ballast_metadata = (sourceId, destinationId) => (event) => ({
  sourceId, destinationId,
  messageId: event && typeof event === "object" ? event.messageId : undefined,
});
"#;

/// Runs one call under the deadline and turns what it returned into events.
struct Guard<'a> {
    deadline: &'a AtomicU64,
    base: Instant,
    timeout: Duration,
    id: &'a str,
}

impl Guard<'_> {
    fn fail(&self, kind: FailureKind, message: String, stack: Option<String>) -> Failure {
        Failure {
            transformation: self.id.to_string(),
            kind,
            message,
            stack,
        }
    }

    /// What a call threw, or that it ran out of time or memory.
    fn failure_of(&self, ctx: &Ctx<'_>, e: rquickjs::Error, timed_out: bool) -> Failure {
        let (message, stack) = match e {
            rquickjs::Error::Exception => exception_text(ctx),
            rquickjs::Error::WouldBlock => (
                "the returned promise never settled (nothing left to run)".into(),
                None,
            ),
            e => (e.to_string(), None),
        };
        if timed_out {
            self.fail(
                FailureKind::Timeout,
                format!("timed out after {:?} (the limit per call)", self.timeout),
                stack,
            )
        } else if message.contains("out of memory") {
            self.fail(FailureKind::Memory, message, stack)
        } else if message == "thrown: null" {
            // When the limit leaves no room for the error object either, QuickJS throws
            // null (so a `throw null` is taken for this too).
            self.fail(
                FailureKind::Memory,
                "out of memory: the memory limit was reached (QuickJS threw null)".into(),
                stack,
            )
        } else {
            self.fail(FailureKind::Error, message, stack)
        }
    }

    fn call<'js>(
        &self,
        ctx: &Ctx<'js>,
        f: &Function<'js>,
        arg: Value<'js>,
        meta: &Value<'js>,
    ) -> Result<Vec<Value<'js>>, Failure> {
        let d = self.base.elapsed() + self.timeout;
        self.deadline
            .store(d.as_nanos().max(1) as u64, Ordering::Relaxed);
        let r: rquickjs::Result<Value<'js>> = f.call((arg, meta.clone()));
        let r = r.and_then(|v| match v.as_promise() {
            Some(p) => p.finish::<Value<'js>>(),
            None => Ok(v),
        });
        let late = self.base.elapsed().as_nanos() as u64 > d.as_nanos() as u64;
        self.deadline.store(0, Ordering::Relaxed);
        let v = r.map_err(|e| self.failure_of(ctx, e, late))?;
        if v.is_null() || v.is_undefined() {
            return Ok(Vec::new());
        }
        if let Some(a) = v.as_array() {
            let mut out = Vec::with_capacity(a.len());
            for x in a.iter::<Value<'js>>() {
                let x = x.map_err(|e| self.failure_of(ctx, e, false))?;
                if x.is_null() || x.is_undefined() {
                    continue;
                }
                if !x.is_object() || x.is_array() || x.is_function() {
                    return Err(self.fail(
                        FailureKind::Invalid,
                        format!(
                            "returned an array holding a {}: expected event objects",
                            x.type_name()
                        ),
                        None,
                    ));
                }
                out.push(x);
            }
            return Ok(out);
        }
        if v.is_object() && !v.is_function() {
            return Ok(vec![v]);
        }
        Err(self.fail(
            FailureKind::Invalid,
            format!(
                "returned a {}: expected an event object, an array of them, null or undefined",
                v.type_name()
            ),
            None,
        ))
    }
}

struct Loaded {
    id: String,
    has_batch: bool,
}

/// One runtime with the transformations compiled in.
pub struct Engine {
    // Dropped after the context.
    ctx: Context,
    rt: Runtime,
    transformations: Vec<Loaded>,
    /// Nanoseconds after `base` past which the interrupt handler stops the code; 0: none.
    deadline: Arc<AtomicU64>,
    base: Instant,
    timeout: Duration,
    logs: Rc<RefCell<Vec<String>>>,
}

fn exception_text(ctx: &Ctx<'_>) -> (String, Option<String>) {
    let v = ctx.catch();
    if let Some(ex) = v.as_exception() {
        let message = ex.message().unwrap_or_default();
        let name: Option<String> = ex.as_object().get("name").ok();
        let message = match name {
            Some(n) if !n.is_empty() => format!("{n}: {message}"),
            _ => message,
        };
        return (message, ex.stack().filter(|s| !s.is_empty()));
    }
    if let Some(s) = v.as_string().and_then(|s| s.to_string().ok()) {
        return (s, None);
    }
    let text = ctx
        .json_stringify(v.clone())
        .ok()
        .flatten()
        .and_then(|s| s.to_string().ok())
        .unwrap_or_else(|| format!("{:?}", v.type_of()));
    (format!("thrown: {text}"), None)
}

impl Engine {
    pub fn new(
        sources: &[Source],
        memory_limit: usize,
        timeout: Duration,
    ) -> Result<Engine, EngineError> {
        let rt = Runtime::new().map_err(|e| EngineError::Runtime(e.to_string()))?;
        let ctx = Context::full(&rt).map_err(|e| EngineError::Runtime(e.to_string()))?;
        let deadline = Arc::new(AtomicU64::new(0));
        let base = Instant::now();
        {
            let deadline = deadline.clone();
            rt.set_interrupt_handler(Some(Box::new(move || {
                let d = deadline.load(Ordering::Relaxed);
                d != 0 && base.elapsed().as_nanos() as u64 > d
            })));
        }
        let logs: Rc<RefCell<Vec<String>>> = Rc::default();
        let mut transformations = Vec::new();
        ctx.with(|ctx| -> Result<(), EngineError> {
            let rt_err = |e: rquickjs::Error| EngineError::Runtime(e.to_string());
            let sink = logs.clone();
            let log = Function::new(ctx.clone(), move |line: String| {
                let mut l = sink.borrow_mut();
                if l.len() < MAX_LOG_LINES {
                    let mut line = line;
                    if line.len() > MAX_LOG_LINE {
                        let mut cut = MAX_LOG_LINE;
                        while !line.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        line.truncate(cut);
                        line.push('…');
                    }
                    l.push(line);
                }
            })
            .map_err(rt_err)?;
            ctx.globals().set("__ballast_log", log).map_err(rt_err)?;
            ctx.eval::<(), _>(PRELUDE).map_err(rt_err)?;
            let table = Object::new(ctx.clone()).map_err(rt_err)?;
            for (i, s) in sources.iter().enumerate() {
                let compile = |message: String| EngineError::Compile {
                    id: s.id.clone(),
                    message,
                };
                let caught = |ctx: &Ctx<'_>, e: rquickjs::Error| match e {
                    rquickjs::Error::Exception => {
                        let (m, stack) = exception_text(ctx);
                        compile(match stack {
                            Some(st) => format!("{m}\n{st}"),
                            None => m,
                        })
                    }
                    e => compile(e.to_string()),
                };
                let declared = Module::declare(ctx.clone(), s.id.as_str(), s.code.as_str())
                    .map_err(|e| caught(&ctx, e))?;
                let (module, promise) = declared.eval().map_err(|e| caught(&ctx, e))?;
                promise.finish::<()>().map_err(|e| caught(&ctx, e))?;
                let ns = module.namespace().map_err(|e| caught(&ctx, e))?;
                let te: Value = ns.get("transformEvent").map_err(|e| caught(&ctx, e))?;
                let tb: Value = ns.get("transformBatch").map_err(|e| caught(&ctx, e))?;
                let has_event = te.is_function();
                let has_batch = tb.is_function();
                if !has_event && !has_batch {
                    return Err(compile(
                        "exports neither transformEvent nor transformBatch".into(),
                    ));
                }
                let entry = Object::new(ctx.clone()).map_err(rt_err)?;
                entry.set("event", te).map_err(rt_err)?;
                entry.set("batch", tb).map_err(rt_err)?;
                table.set(i as u32, entry).map_err(rt_err)?;
                transformations.push(Loaded {
                    id: s.id.clone(),
                    has_batch,
                });
            }
            ctx.globals()
                .set("__ballast_transformations", table)
                .map_err(rt_err)?;
            Ok(())
        })?;
        rt.set_memory_limit(memory_limit);
        Ok(Engine {
            ctx,
            rt,
            transformations,
            deadline,
            base,
            timeout,
            logs,
        })
    }

    /// The index of the transformation with this id.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.transformations.iter().position(|t| t.id == id)
    }

    /// Runs the request's chain over its events. Never fails as a whole: each event gets
    /// its outputs or the failure of the transformation that failed on it.
    ///
    /// A chain of `transformEvent`s takes the events one at a time through the whole
    /// chain, so that only one event (and what it became) is alive in the runtime: a large
    /// batch must not fill the memory limit with the batch itself. A chain with a
    /// `transformBatch` holds the batch.
    pub fn run(&mut self, req: &RunRequest) -> RunReply {
        let batch = req
            .chain
            .iter()
            .any(|&t| self.transformations.get(t).is_some_and(|l| l.has_batch));
        let reply = if batch || req.events.len() <= 1 {
            self.run_part(req, &req.events)
        } else {
            let mut all = RunReply {
                results: Vec::with_capacity(req.events.len()),
                logs: Vec::new(),
                stats: Vec::new(),
                tainted: false,
            };
            for e in &req.events {
                let one = self.run_part(req, std::slice::from_ref(e));
                all.results.extend(one.results);
                all.logs.extend(one.logs);
                all.tainted |= one.tainted;
                for s in one.stats {
                    match all
                        .stats
                        .iter_mut()
                        .find(|x| x.transformation == s.transformation)
                    {
                        Some(x) => {
                            x.events_in += s.events_in;
                            x.events_out += s.events_out;
                            x.dropped += s.dropped;
                            x.failed += s.failed;
                            x.nanos += s.nanos;
                        }
                        None => all.stats.push(s),
                    }
                }
            }
            all
        };
        self.rt.run_gc();
        reply
    }

    fn run_part(&self, req: &RunRequest, events: &[String]) -> RunReply {
        let n = events.len();
        let mut failures: Vec<Option<Failure>> = vec![None; n];
        let mut stats: Vec<Stats> = Vec::new();
        let mut logs = Vec::new();
        let mut tainted = false;
        let mut outputs: Vec<Vec<Output>> = vec![Vec::new(); n];
        let transformations = &self.transformations;
        let deadline = &self.deadline;
        let base = self.base;
        let timeout = self.timeout;
        let log_sink = &self.logs;
        self.ctx.with(|ctx| {
            // Each item: (origin index, the event as a JS value).
            let mut items: Vec<(usize, Value)> = Vec::with_capacity(n);
            for (i, e) in events.iter().enumerate() {
                match ctx.json_parse(e.as_bytes()) {
                    Ok(v) => items.push((i, v)),
                    Err(_) => {
                        let _ = ctx.catch();
                        failures[i] = Some(Failure {
                            transformation: String::new(),
                            kind: FailureKind::Invalid,
                            message: "the stored event is not valid JSON".into(),
                            stack: None,
                        });
                    }
                }
            }
            let table: Object = match ctx.globals().get("__ballast_transformations") {
                Ok(t) => t,
                Err(_) => return,
            };
            let make_meta: Function = match ctx.globals().get("__ballast_metadata") {
                Ok(f) => f,
                Err(_) => return,
            };
            let meta: Value = make_meta
                .call((req.source_id.clone(), req.destination_id.clone()))
                .unwrap_or_else(|_| Value::new_undefined(ctx.clone()));
            for &t in &req.chain {
                let Some(spec) = transformations.get(t) else {
                    for (i, _) in items.drain(..) {
                        failures[i] = Some(Failure {
                            transformation: format!("#{t}"),
                            kind: FailureKind::Invalid,
                            message: "no such transformation in this worker".into(),
                            stack: None,
                        });
                    }
                    break;
                };
                let started = Instant::now();
                let mut st = Stats {
                    transformation: spec.id.clone(),
                    events_in: items.len() as u64,
                    ..Stats::default()
                };
                let entry: Object = match table.get(t as u32) {
                    Ok(e) => e,
                    Err(_) => break,
                };
                let guard = Guard {
                    deadline,
                    base,
                    timeout,
                    id: &spec.id,
                };
                let mut next: Vec<(usize, Value)> = Vec::with_capacity(items.len());
                if spec.has_batch {
                    let f: Function = match entry.get("batch") {
                        Ok(f) => f,
                        Err(_) => break,
                    };
                    let origins: Vec<usize> = items.iter().map(|(i, _)| *i).collect();
                    let arr = match rquickjs::Array::new(ctx.clone()) {
                        Ok(a) => a,
                        Err(_) => break,
                    };
                    // messageId → origin, to give each output back to the event it came from.
                    let mut by_id = std::collections::HashMap::new();
                    for (k, (i, v)) in items.drain(..).enumerate() {
                        if let Some(mid) = v
                            .as_object()
                            .and_then(|o| o.get::<_, String>("messageId").ok())
                        {
                            by_id.entry(mid).or_insert(i);
                        }
                        let _ = arr.set(k, v);
                    }
                    match guard.call(&ctx, &f, arr.into_value(), &meta) {
                        Ok(outs) => {
                            let mut last = origins.first().copied().unwrap_or(0);
                            for v in outs {
                                let origin = v
                                    .as_object()
                                    .and_then(|o| o.get::<_, String>("messageId").ok())
                                    .and_then(|m| by_id.get(&m).copied())
                                    .unwrap_or(last);
                                last = origin;
                                next.push((origin, v));
                            }
                            // Stable: outputs grouped by origin, origins in input order.
                            next.sort_by_key(|(o, _)| *o);
                            st.events_out = next.len() as u64;
                            let kept: std::collections::HashSet<usize> =
                                next.iter().map(|(o, _)| *o).collect();
                            st.dropped =
                                origins.iter().filter(|o| !kept.contains(o)).count() as u64;
                        }
                        Err(f) => {
                            tainted |= matches!(f.kind, FailureKind::Timeout | FailureKind::Memory);
                            st.failed = origins.len() as u64;
                            for o in origins {
                                failures[o] = Some(f.clone());
                            }
                        }
                    }
                } else {
                    let f: Function = match entry.get("event") {
                        Ok(f) => f,
                        Err(_) => break,
                    };
                    for (i, v) in items.drain(..) {
                        match guard.call(&ctx, &f, v, &meta) {
                            Ok(outs) => {
                                if outs.is_empty() {
                                    st.dropped += 1;
                                }
                                st.events_out += outs.len() as u64;
                                next.extend(outs.into_iter().map(|v| (i, v)));
                            }
                            Err(f) => {
                                tainted |=
                                    matches!(f.kind, FailureKind::Timeout | FailureKind::Memory);
                                st.failed += 1;
                                failures[i] = Some(f);
                            }
                        }
                    }
                }
                st.nanos = started.elapsed().as_nanos() as u64;
                stats.push(st);
                for line in log_sink.borrow_mut().drain(..) {
                    logs.push((spec.id.clone(), line));
                }
                items = next;
            }
            for (i, v) in items {
                let mid = v
                    .as_object()
                    .and_then(|o| o.get::<_, String>("messageId").ok());
                match ctx.json_stringify(v) {
                    Ok(Some(s)) => match s.to_string() {
                        Ok(json) => outputs[i].push(Output {
                            json,
                            message_id: mid,
                        }),
                        Err(_) => {
                            failures[i] = Some(Failure {
                                transformation: String::new(),
                                kind: FailureKind::Invalid,
                                message: "an output is not valid UTF-8".into(),
                                stack: None,
                            })
                        }
                    },
                    _ => {
                        let (message, stack) = exception_text(&ctx);
                        failures[i] = Some(Failure {
                            transformation: String::new(),
                            kind: FailureKind::Invalid,
                            message: format!("an output cannot be written as JSON: {message}"),
                            stack,
                        });
                    }
                }
            }
        });
        let results = failures
            .into_iter()
            .zip(outputs)
            .map(|(f, o)| match f {
                Some(f) => Err(f),
                None => Ok(o),
            })
            .collect();
        RunReply {
            results,
            logs,
            stats,
            tainted,
        }
    }
}

#[cfg(test)]
mod tests;
