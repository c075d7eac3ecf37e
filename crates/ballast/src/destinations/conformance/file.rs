//! `file` against a directory on disk: read back by reading the files (the current one
//! and the rotated ones). A temporary failure is a directory standing where the file
//! should be opened (the sink opens it at its first write).

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

use super::Target;
use crate::destinations::file::FileConfig;
use crate::destinations::registry::TypeConfig;
use crate::destinations::Destination;

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn path(&self) -> PathBuf {
        self.dir.path().join("out").join("events.jsonl")
    }

    fn aside(&self) -> PathBuf {
        self.dir.path().join("aside.jsonl")
    }
}

#[async_trait]
impl Target for Dir {
    async fn sink(&self) -> Arc<dyn Destination> {
        let c = FileConfig {
            path: self.path(),
            max_file_bytes: 1500,
        };
        TypeConfig::check(&c).unwrap();
        TypeConfig::build(&c).unwrap()
    }

    async fn stored(&self) -> Vec<String> {
        let mut ids = Vec::new();
        let dir = self.path().parent().unwrap().to_path_buf();
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for f in files.iter().chain(std::iter::once(&self.aside())) {
            let Ok(text) = std::fs::read_to_string(f) else {
                continue;
            };
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                ids.push(v["messageId"].as_str().unwrap().to_string());
            }
        }
        ids
    }

    async fn break_temporarily(&self) -> bool {
        let path = self.path();
        if path.exists() {
            std::fs::rename(&path, self.aside()).unwrap();
        }
        std::fs::create_dir(&path).unwrap();
        true
    }

    async fn refuse(&self) -> bool {
        false
    }

    async fn heal(&self) {
        let path = self.path();
        if path.is_dir() {
            std::fs::remove_dir(&path).unwrap();
        }
    }

    fn deduplicates(&self) -> bool {
        false
    }
}

#[tokio::test]
async fn file_conforms() {
    let d = Dir {
        dir: tempfile::tempdir().unwrap(),
    };
    super::run(&d).await;
}
