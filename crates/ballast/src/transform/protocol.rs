//! The protocol between the server and a transformation worker, over the worker's stdin
//! and stdout: frames of a 4-byte big-endian length and that many bytes of JSON. The
//! server sends `Init` once (the transformations and the limits), the worker answers
//! `Ready` (or `InitFailed` and exits); then each `Run` gets one `Done`. A worker that
//! ran out of time or memory answers, then exits (`tainted`); the server starts another.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// Largest frame either side accepts (a batch of 10,000 events of 32 KB each fits).
pub const MAX_FRAME: usize = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the other side closed the pipe")]
    Closed,
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("pipe: {0}")]
    Io(#[from] std::io::Error),
    #[error("undecodable frame: {0}")]
    Decode(#[from] serde_json::Error),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Source {
    pub id: String,
    pub code: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToWorker {
    Init {
        transformations: Vec<Source>,
        memory_limit: usize,
        timeout_ms: u64,
    },
    Run(RunRequest),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRequest {
    /// Indexes into the `Init` transformations, applied in this order.
    pub chain: Vec<usize>,
    pub destination_id: String,
    pub source_id: Option<String>,
    /// The events, as JSON text.
    pub events: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromWorker {
    Ready,
    InitFailed { message: String },
    Done(RunReply),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Output {
    pub json: String,
    pub message_id: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum FailureKind {
    /// The code threw (or a returned promise rejected).
    Error,
    /// A call ran past the time limit.
    Timeout,
    /// The runtime's memory limit was hit.
    Memory,
    /// The code returned something that is not an event, an array of events or nothing.
    Invalid,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Error => "error",
            FailureKind::Timeout => "timeout",
            FailureKind::Memory => "memory",
            FailureKind::Invalid => "invalid",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Failure {
    /// The transformation that failed (empty when no transformation is to blame).
    pub transformation: String,
    pub kind: FailureKind,
    pub message: String,
    pub stack: Option<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "transformation {:?} failed ({}): {}",
            self.transformation,
            self.kind.as_str(),
            self.message
        )?;
        if let Some(s) = &self.stack {
            write!(f, "\n{}", s.trim_end())?;
        }
        Ok(())
    }
}

/// What one transformation of a chain did in one batch.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    pub transformation: String,
    pub events_in: u64,
    pub events_out: u64,
    /// Events it returned nothing for.
    pub dropped: u64,
    pub failed: u64,
    pub nanos: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReply {
    /// Per event of the request, in order: what it became (zero, one or more events), or
    /// why it failed.
    pub results: Vec<Result<Vec<Output>, Failure>>,
    /// (transformation id, line) for every `log(...)` call.
    pub logs: Vec<(String, String)>,
    pub stats: Vec<Stats>,
    /// A call ran out of time or memory: the worker exits after this reply.
    pub tainted: bool,
}

/// Writes one frame (blocking).
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    w.write_all(&(body.len() as u32).to_be_bytes())?;
    w.write_all(&body)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame (blocking). `Closed` at a clean end of the pipe before a frame.
pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Closed
        } else {
            e.into()
        }
    })?;
    Ok(serde_json::from_slice(&body)?)
}

/// The body of a frame to send (for the async side, which writes it itself).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_a_cut_frame_is_closed() {
        let msg = ToWorker::Run(RunRequest {
            chain: vec![1, 0],
            destination_id: "d".into(),
            source_id: None,
            events: vec![r#"{"a":"\u00e9\n"}"#.into()],
        });
        let mut buf = Vec::new();
        write_frame(&mut buf, &msg).unwrap();
        assert_eq!(buf, encode(&msg).unwrap());
        let back: ToWorker = read_frame(&mut &buf[..]).unwrap();
        match back {
            ToWorker::Run(r) => {
                assert_eq!(r.chain, vec![1, 0]);
                assert_eq!(r.events[0], r#"{"a":"\u00e9\n"}"#);
            }
            other => panic!("{other:?}"),
        }
        // Nothing: closed; a cut body: closed too; a huge length: refused unread.
        assert!(matches!(
            read_frame::<ToWorker>(&mut &[][..]),
            Err(FrameError::Closed)
        ));
        assert!(matches!(
            read_frame::<ToWorker>(&mut &buf[..buf.len() - 1]),
            Err(FrameError::Closed)
        ));
        let huge = u32::MAX.to_be_bytes();
        assert!(matches!(
            read_frame::<ToWorker>(&mut &huge[..]),
            Err(FrameError::TooLarge(_))
        ));
    }
}
