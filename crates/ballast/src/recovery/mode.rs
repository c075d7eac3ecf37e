//! The running mode: normal (forward events) or degraded (accept and store, forward
//! nothing). Recovery decides it and keeps it in `state.json`; the admin API and the CLI
//! read and write it by name (`FromStr`, `Display`: "normal", "degraded").

use std::fmt;
use std::str::FromStr;

/// Running mode (see docs/OPERATIONS.md, "Running modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal = 0,
    Degraded = 1,
}

impl Mode {
    /// The name `/health`, `/v1/status` and the metrics use: "NORMAL", "DEGRADED".
    pub fn as_health_str(self) -> &'static str {
        match self {
            Mode::Normal => "NORMAL",
            Mode::Degraded => "DEGRADED",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::Degraded => "degraded",
        }
    }
}

/// "normal" or "degraded", as `state.json`, `serve --mode` and `/v1/mode` write it.
impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A mode name that is neither "normal" nor "degraded".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mode {0:?} (normal or degraded)")]
pub struct UnknownMode(pub String);

/// "normal" or "degraded", in any case.
impl FromStr for Mode {
    type Err = UnknownMode;
    fn from_str(s: &str) -> Result<Mode, UnknownMode> {
        match s.to_ascii_lowercase().as_str() {
            "normal" => Ok(Mode::Normal),
            "degraded" => Ok(Mode::Degraded),
            other => Err(UnknownMode(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_back_in_any_case_and_unknown_ones_are_refused() {
        for m in [Mode::Normal, Mode::Degraded] {
            assert_eq!(m.to_string().parse::<Mode>(), Ok(m));
            assert_eq!(m.to_string().to_uppercase().parse::<Mode>(), Ok(m));
        }
        assert_eq!(
            "Paused".parse::<Mode>().unwrap_err().to_string(),
            "unknown mode \"paused\" (normal or degraded)"
        );
    }
}
