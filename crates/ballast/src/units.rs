//! Readers for the units configuration values are written in: durations (`"10s"`, `"1h
//! 30m"` or seconds) and sizes (`"64MiB"` or bytes), for `#[serde(deserialize_with)]` in
//! every part's config types.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Accepts `"10s"`, `"5m"`, `"1h 30m"` (humantime) or a number of seconds.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Secs(u64),
    }
    match Raw::deserialize(d)? {
        Raw::Text(s) => humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}"))),
        Raw::Secs(n) => Ok(Duration::from_secs(n)),
    }
}

pub fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// Accepts `"64MiB"`, `"10GiB"`, `"500 MB"` or a number of bytes.
pub fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Bytes(u64),
    }
    match Raw::deserialize(d)? {
        Raw::Text(s) => s
            .trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| b.as_u64())
            .map_err(|e| serde::de::Error::custom(format!("invalid size {s:?}: {e}"))),
        Raw::Bytes(n) => Ok(n),
    }
}

pub fn size_usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = size(d)?;
    usize::try_from(n).map_err(|_| serde::de::Error::custom(format!("size {n} is too large")))
}
