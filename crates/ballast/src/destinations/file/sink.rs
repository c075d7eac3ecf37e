use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::FileConfig;
use crate::destinations::{Destination, Event, Outcome};

pub struct FileSink {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    path: PathBuf,
    max_bytes: u64,
    file: Option<File>,
    size: u64,
}

impl FileSink {
    pub fn new(c: &FileConfig) -> std::io::Result<FileSink> {
        if let Some(dir) = c.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        Ok(FileSink {
            inner: Arc::new(Mutex::new(Inner {
                path: c.path.clone(),
                max_bytes: c.max_file_bytes.max(1),
                file: None,
                size: 0,
            })),
        })
    }
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)?.sync_all(),
        None => File::open(".")?.sync_all(),
    }
}

impl Inner {
    fn open(&mut self) -> std::io::Result<&mut File> {
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.size = f.metadata()?.len();
            sync_parent(&self.path)?;
            self.file = Some(f);
        }
        match self.file.as_mut() {
            Some(f) => Ok(f),
            None => Err(std::io::Error::other("file not open")),
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let mut rotated = self.path.as_os_str().to_owned();
        rotated.push(format!(".{stamp}"));
        std::fs::rename(&self.path, &rotated)?;
        sync_parent(&self.path)?;
        self.size = 0;
        Ok(())
    }

    fn write(&mut self, events: &[Event]) -> std::io::Result<()> {
        if self.size >= self.max_bytes && self.path.exists() {
            self.rotate()?;
        }
        let mut buf = Vec::with_capacity(events.iter().map(|e| e.json.len() + 1).sum());
        for e in events {
            buf.extend_from_slice(&e.json);
            buf.push(b'\n');
        }
        let f = self.open()?;
        f.write_all(&buf)?;
        f.sync_data()?;
        self.size += buf.len() as u64;
        Ok(())
    }
}

#[async_trait]
impl Destination for FileSink {
    async fn deliver(&self, events: &[Event]) -> Outcome {
        let inner = self.inner.clone();
        let events = events.to_vec();
        let r = tokio::task::spawn_blocking(move || {
            let mut guard = inner.lock().unwrap_or_else(|p| p.into_inner());
            let r = guard.write(&events);
            if r.is_err() {
                // Reopen next time; a partial line may remain, the retry writes it whole.
                guard.file = None;
            }
            r
        })
        .await;
        match r {
            Ok(Ok(())) => Outcome::Delivered,
            Ok(Err(e)) => Outcome::Retry {
                status: None,
                reason: format!("writing the file failed: {e}"),
                retry_after: None,
            },
            Err(e) => Outcome::Retry {
                status: None,
                reason: format!("file task failed: {e}"),
                retry_after: None,
            },
        }
    }
}
