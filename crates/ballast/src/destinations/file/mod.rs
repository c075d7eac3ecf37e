//! `file`: appends events as JSON lines, fsynced before they count as delivered; the file
//! is rotated (renamed with a timestamp suffix) once it reaches `max_file_bytes`.
//! Concurrent deliveries are group-committed by one writer thread: one write and one
//! `fdatasync` for every delivery waiting (see `sink.rs`); `batch_size` defaults to 100.

pub mod config;
pub mod sink;
#[cfg(test)]
mod tests;

pub use config::FileConfig;
pub use sink::FileSink;
