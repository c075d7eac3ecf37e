//! `file`: appends events as JSON lines, fsynced before they count as delivered; the file
//! is rotated (renamed with a timestamp suffix) once it reaches `max_file_bytes`.

pub mod config;
pub mod sink;
#[cfg(test)]
mod tests;

pub use config::FileConfig;
pub use sink::FileSink;
