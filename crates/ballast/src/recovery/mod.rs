//! Keeping events flowing when processing crashes: running modes, the crash-loop
//! detector, the crash journal and poison strikes.
//!
//! - `state.json` in the data directory (written atomically: write, fsync, rename, fsync
//!   the directory) records the mode, whether the server is running, and recent crashes.
//!   A start that finds `running: true` follows an unclean exit: a crash. Clean restarts
//!   never count. `crash_threshold` crashes within `crash_window` start the server
//!   degraded (accept and store, forward nothing) and raise an alert.
//! - The crash journal (`journal.rs`) names the events each destination was processing;
//!   after a crash each of them gets a strike, and at `poison_threshold` strikes the
//!   event is quarantined to the dead letters while the server stays in normal mode.

mod config;
pub mod journal;
mod mode;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ballast_log::write_atomically;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

use crate::alerts::{Action, Alerts, Severity};
use crate::time::{from_ms, to_ms};

pub use config::RecoveryConfig;
pub use mode::{Mode, UnknownMode};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    /// "normal" | "degraded"
    mode: String,
    /// Who or what set the mode: "operator", "crash-loop", "start-flag", "quiet-period".
    mode_reason: String,
    mode_since_ms: u64,
    /// True from start to clean shutdown.
    running: bool,
    /// Times of recent crashes (ms since the Unix epoch), within the crash window.
    crashes: Vec<u64>,
    /// Counts mode transitions; names the alerts they raise (idempotency).
    transitions: u64,
    last_start_ms: u64,
}

/// What the start found.
#[derive(Debug, Clone)]
pub struct StartReport {
    /// The previous run ended without a clean shutdown.
    pub crashed: bool,
    pub crashes_in_window: usize,
    pub mode: Mode,
}

pub struct Recovery {
    path: PathBuf,
    config: RecoveryConfig,
    state: Mutex<StateFile>,
    mode: watch::Sender<Mode>,
    alerts: Arc<Alerts>,
}

fn mode_of(s: &StateFile) -> Mode {
    if s.mode == "degraded" {
        Mode::Degraded
    } else {
        Mode::Normal
    }
}

impl Recovery {
    /// Records this start; decides the mode (`forced` is `serve --mode`).
    pub fn start(
        data_dir: &Path,
        config: RecoveryConfig,
        forced: Option<Mode>,
        alerts: Arc<Alerts>,
    ) -> anyhow::Result<(Arc<Recovery>, StartReport)> {
        let path = data_dir.join("state.json");
        let mut state: StateFile = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile {
                version: 1,
                mode: "normal".into(),
                mode_reason: "first start".into(),
                ..Default::default()
            },
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
        };
        let now = SystemTime::now();
        let now_ms = to_ms(now);
        if state.mode_since_ms == 0 {
            state.mode_since_ms = now_ms;
        }
        let crashed = state.running;
        if crashed {
            state.crashes.push(now_ms);
        }
        let window_ms = config.crash_window.as_millis() as u64;
        state
            .crashes
            .retain(|&t| now_ms.saturating_sub(t) <= window_ms);
        let (tx, _) = watch::channel(mode_of(&state));
        let recovery = Arc::new(Recovery {
            path,
            config,
            state: Mutex::new(state),
            mode: tx,
            alerts,
        });
        let crashes = recovery.lock().crashes.len();
        if crashed {
            tracing::warn!(
                crashes_in_window = crashes,
                threshold = recovery.config.crash_threshold,
                "the previous run did not stop cleanly"
            );
        }
        match forced {
            Some(m) => recovery.transition(m, "start-flag", true)?,
            None => {
                let current = mode_of(&recovery.lock());
                if crashed
                    && current == Mode::Normal
                    && crashes as u32 >= recovery.config.crash_threshold
                {
                    recovery.transition(Mode::Degraded, "crash-loop", false)?;
                }
            }
        }
        {
            let mut s = recovery.lock();
            s.running = true;
            s.last_start_ms = now_ms;
        }
        recovery.save()?;
        let mode = *recovery.mode.borrow();
        Ok((
            recovery,
            StartReport {
                crashed,
                crashes_in_window: crashes,
                mode,
            },
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StateFile> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(&*self.lock())?;
        write_atomically(&self.path, &bytes)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", self.path.display()))
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Mode> {
        self.mode.subscribe()
    }

    /// Changes the mode: the alert goes to the outbox first, then the state file, then
    /// the running server. Going to normal by an operator clears the crash history.
    fn transition(&self, to: Mode, reason: &str, clear_crashes: bool) -> anyhow::Result<()> {
        let (from, seq, crashes) = {
            let s = self.lock();
            (mode_of(&s), s.transitions + 1, s.crashes.len())
        };
        if from != to {
            let alert = match to {
                Mode::Degraded => self.alerts.alert(
                    "degraded",
                    Action::Trigger,
                    Severity::Critical,
                    format!("ballast on {} is in degraded mode ({reason}): events are stored but not forwarded", self.alerts.source()),
                    json!({ "reason": reason, "crashes_in_window": crashes, "crash_window_s": self.config.crash_window.as_secs() }),
                ),
                Mode::Normal => self.alerts.alert(
                    "degraded",
                    Action::Resolve,
                    Severity::Critical,
                    format!("ballast on {} is back in normal mode ({reason})", self.alerts.source()),
                    json!({ "reason": reason }),
                ),
            };
            let key = format!("degraded:{to}:{seq}");
            self.alerts.raise_local(&key, alert)?;
        }
        {
            let mut s = self.lock();
            if from != to {
                s.transitions = seq;
                s.mode_since_ms = to_ms(SystemTime::now());
            }
            s.mode = to.to_string();
            s.mode_reason = reason.into();
            if clear_crashes && to == Mode::Normal {
                s.crashes.clear();
            }
        }
        self.save()?;
        self.mode.send_replace(to);
        if from != to {
            match to {
                Mode::Degraded => tracing::error!(
                    reason,
                    "entered DEGRADED mode: accepting and storing events, forwarding none"
                ),
                Mode::Normal => tracing::info!(reason, "entered NORMAL mode: forwarding events"),
            }
        }
        Ok(())
    }

    /// An operator's switch (admin API). Normal clears the crash history.
    pub fn set_mode(&self, to: Mode) -> anyhow::Result<()> {
        self.transition(to, "operator", true)
    }

    /// Records a clean shutdown.
    pub fn clean_shutdown(&self) -> anyhow::Result<()> {
        self.lock().running = false;
        self.save()
    }

    /// What `/v1/mode` shows.
    pub fn describe(&self) -> serde_json::Value {
        let s = self.lock();
        json!({
            "mode": mode_of(&s).as_health_str(),
            "reason": s.mode_reason,
            "since": humantime::format_rfc3339_millis(from_ms(s.mode_since_ms)).to_string(),
            "crashes_in_window": s.crashes.len(),
            "crashes": s.crashes.iter().map(|&ms| humantime::format_rfc3339_millis(from_ms(ms)).to_string()).collect::<Vec<_>>(),
            "crash_threshold": self.config.crash_threshold,
            "crash_window_s": self.config.crash_window.as_secs(),
        })
    }

    /// With `degraded_quiet_period` set: returns to normal by itself once that long has
    /// passed without a crash.
    pub async fn run_quiet_period(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let Some(quiet) = self.config.degraded_quiet_period else {
            return;
        };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1).min(quiet)) => {}
                _ = stop.changed() => return,
            }
            let (degraded, last_event) = {
                let s = self.lock();
                let last_crash = s.crashes.iter().copied().max().unwrap_or(0);
                (
                    mode_of(&s) == Mode::Degraded,
                    last_crash.max(s.mode_since_ms),
                )
            };
            let quiet_for = to_ms(SystemTime::now()).saturating_sub(last_event);
            if degraded && quiet_for >= quiet.as_millis() as u64 {
                if let Err(e) = self.transition(Mode::Normal, "quiet-period", true) {
                    tracing::error!(error = %e, "leaving degraded mode failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
