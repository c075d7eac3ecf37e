use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub path: PathBuf,
    /// Rotate once the file holds this much (default 100MiB).
    #[serde(default = "max_file_bytes", deserialize_with = "crate::units::size")]
    pub max_file_bytes: u64,
}

fn max_file_bytes() -> u64 {
    100 << 20
}

impl FileConfig {
    /// The path must name a file (not end in a separator or `..`); its directory is
    /// created at start.
    pub fn check(&self) -> Result<(), String> {
        let named = self.path.file_name().is_some_and(|n| !n.is_empty())
            && !self.path.as_os_str().to_string_lossy().ends_with('/');
        if !named {
            return Err(format!("path {:?} does not name a file", self.path));
        }
        if self.max_file_bytes == 0 {
            return Err("max_file_bytes must be positive".into());
        }
        Ok(())
    }
}

impl crate::destinations::registry::TypeConfig for FileConfig {
    fn check(&self) -> Result<(), String> {
        FileConfig::check(self)
    }

    fn build(&self) -> Result<std::sync::Arc<dyn crate::destinations::Destination>, String> {
        Ok(std::sync::Arc::new(
            super::FileSink::new(self).map_err(|e| e.to_string())?,
        ))
    }
}
