//! What the HTTP front ends share about the server's condition: stopping (readiness off
//! from SIGTERM on), the running mode as last set, whether events are being routed, and
//! whether the process is wedged (liveness off). Set by `server`, read by `gateway`
//! (`/health`, `/livez`, `/readyz`) and `admin`.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use crate::recovery::Mode;

/// State shared by the HTTP front ends.
pub struct ServerState {
    /// From SIGTERM on while `server.shutdown_delay` runs: not ready, still serving.
    draining: AtomicBool,
    shutting_down: AtomicBool,
    mode: AtomicU8,
    routing: AtomicBool,
    /// Why the process counts as wedged (`/livez` 503), if it does.
    stalled: std::sync::Mutex<Option<String>>,
}

impl Default for ServerState {
    fn default() -> Self {
        ServerState {
            draining: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            mode: AtomicU8::new(Mode::Normal as u8),
            routing: AtomicBool::new(false),
            stalled: std::sync::Mutex::new(None),
        }
    }
}

impl ServerState {
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
    /// True once a stop was asked for (readiness is off), also while requests are still
    /// served during `server.shutdown_delay`.
    pub fn stopping(&self) -> bool {
        self.draining.load(Ordering::Acquire) || self.shutting_down()
    }
    pub fn mode(&self) -> Mode {
        match self.mode.load(Ordering::Acquire) {
            1 => Mode::Degraded,
            _ => Mode::Normal,
        }
    }
    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Release);
    }

    /// From SIGTERM on, during `server.shutdown_delay`: readiness off, still serving.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
    /// The listeners are closing.
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }
    pub fn set_routing(&self, on: bool) {
        self.routing.store(on, Ordering::Release);
    }

    /// True while events are being forwarded to destinations.
    pub fn routing(&self) -> bool {
        self.routing.load(Ordering::Acquire)
    }

    /// Why the process counts as wedged: a part that has made no progress for
    /// `server.liveness_timeout` while work waits (None: live).
    pub fn stalled(&self) -> Option<String> {
        self.stalled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets (or clears) why the process counts as wedged; true if that changed.
    pub fn set_stalled(&self, reason: Option<String>) -> bool {
        let mut cur = self.stalled.lock().unwrap_or_else(|p| p.into_inner());
        let changed = cur.is_some() != reason.is_some();
        *cur = reason;
        changed
    }
}
