use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub path: PathBuf,
    /// Rotate once the file holds this much (default 100MiB).
    #[serde(default = "max_file_bytes", deserialize_with = "crate::config::size")]
    pub max_file_bytes: u64,
}

fn max_file_bytes() -> u64 {
    100 << 20
}
