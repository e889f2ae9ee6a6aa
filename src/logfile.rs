//! The daemon's log file (`logs/daemon.log`): rotated by size while the daemon runs,
//! and quiet about repeats.
//!
//! Whatever floods the log (a client retrying in a loop, accept failures while the
//! process has no descriptor left) must neither fill the disk nor bury the line that
//! explains it. So the file is renamed to `daemon.log.1` (replacing the previous one)
//! whenever the next record would take it past its size bound, and a record identical
//! to the one before it (timestamps aside) is written at most once per
//! [`REPEAT_WINDOW`]; the next record written says how many were left out.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Identical records in a row are written at most once per this long.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(10);

/// The log's size bound unless the daemon is told otherwise.
pub const DEFAULT_MAX_BYTES: u64 = 10 << 20;

/// A log file shared by every thread of the daemon.
pub struct LogFile {
    state: Mutex<State>,
}

struct State {
    path: PathBuf,
    file: Option<File>,
    /// Bytes in the current file.
    size: u64,
    max_bytes: u64,
    last: Option<Last>,
}

/// The last record written, and how many identical ones were left out since.
struct Last {
    key: Vec<u8>,
    written_at: Instant,
    left_out: u64,
}

impl LogFile {
    /// Opens (appends to) `path`, rotating it once it would grow past `max_bytes`.
    pub fn open(path: &Path, max_bytes: u64) -> std::io::Result<LogFile> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(LogFile {
            state: Mutex::new(State {
                path: path.to_path_buf(),
                file: Some(file),
                size,
                max_bytes,
                last: None,
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes one record (one formatted event, ending in a newline).
    pub fn write_record(&self, record: &[u8]) {
        if record.is_empty() {
            return;
        }
        let mut state = self.state();
        let (stamp, key) = split_stamp(record);
        let now = Instant::now();
        if let Some(last) = &mut state.last
            && last.key == key
            && now.saturating_duration_since(last.written_at) < REPEAT_WINDOW
        {
            last.left_out = last.left_out.saturating_add(1);
            return;
        }
        if let Some(last) = state.last.take()
            && last.left_out > 0
        {
            let note = format!(
                "{} the previous message was repeated {} more time(s) within {} s and left out\n",
                String::from_utf8_lossy(stamp),
                last.left_out,
                REPEAT_WINDOW.as_secs()
            );
            state.append(note.as_bytes());
        }
        state.append(record);
        state.last = Some(Last {
            key: key.to_vec(),
            written_at: now,
            left_out: 0,
        });
    }
}

impl State {
    fn append(&mut self, bytes: &[u8]) {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        if self.size > 0 && self.size.saturating_add(len) > self.max_bytes {
            self.rotate();
        }
        if let Some(file) = &mut self.file
            && file.write_all(bytes).is_ok()
        {
            self.size = self.size.saturating_add(len);
        }
    }

    /// `daemon.log` becomes `daemon.log.1`; a fresh `daemon.log` takes its place.
    fn rotate(&mut self) {
        self.file = None;
        let _ = std::fs::rename(&self.path, rotated(&self.path));
        self.file = open_append(&self.path).ok();
        self.size = 0;
    }
}

/// `logs/daemon.log` → `logs/daemon.log.1`.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Opens for appending, creating it owner- and group-readable, never through a
/// symlink planted at the path.
/// Never through a symbolic link, never blocking on a FIFO planted at the path
/// (`files::open_state_log`); readable by the control group where `logs/` lets it in.
fn open_append(path: &Path) -> std::io::Result<File> {
    crate::files::open_state_log(path, 0o640).map_err(|e| std::io::Error::other(e.to_string()))
}

/// Splits a formatted record into its leading timestamp and the rest, which is what
/// makes two records "the same".
fn split_stamp(record: &[u8]) -> (&[u8], &[u8]) {
    match record.iter().position(|&b| b == b' ') {
        Some(space) => {
            let (stamp, rest) = record.split_at(space);
            (stamp, rest.trim_ascii_start())
        }
        None => (&[], record),
    }
}

/// What `tracing_subscriber` writes one event into: collects the event's bytes and
/// hands them to the log file as one record when dropped.
pub struct RecordWriter<'a> {
    log: &'a LogFile,
    buffer: Vec<u8>,
}

impl Write for RecordWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RecordWriter<'_> {
    fn drop(&mut self) {
        self.log.write_record(&self.buffer);
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogFile {
    type Writer = RecordWriter<'a>;

    fn make_writer(&'a self) -> RecordWriter<'a> {
        RecordWriter {
            log: self,
            buffer: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(stamp: &str, message: &str) -> Vec<u8> {
        format!("{stamp}  WARN darwin_vz_nix::control::server: {message}\n").into_bytes()
    }

    #[test]
    fn identical_records_in_a_row_are_written_once_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.log");
        let log = LogFile::open(&path, DEFAULT_MAX_BYTES).unwrap();
        for i in 0..1000 {
            log.write_record(&record(
                &format!("t{i}"),
                "accept failed: Too many open files",
            ));
        }
        log.write_record(&record("t1000", "something else"));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "t0  WARN darwin_vz_nix::control::server: accept failed: Too many open files",
                "t1000 the previous message was repeated 999 more time(s) within 10 s and left out",
                "t1000  WARN darwin_vz_nix::control::server: something else",
            ]
        );
    }

    #[test]
    fn the_file_is_rotated_by_size_while_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.log");
        let log = LogFile::open(&path, 1000).unwrap();
        for i in 0..100 {
            log.write_record(&record("t", &format!("line {i}")));
        }
        let current = std::fs::metadata(&path).unwrap().len();
        let previous = std::fs::metadata(rotated(&path)).unwrap().len();
        assert!(current <= 1000, "{current}");
        assert!(previous <= 1000 && previous > 900, "{previous}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("line 99\n"), "{text}");
    }

    #[test]
    fn a_symlink_at_the_log_path_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("victim");
        std::fs::write(&target, "keep\n").unwrap();
        let path = dir.path().join("daemon.log");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(LogFile::open(&path, DEFAULT_MAX_BYTES).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep\n");
    }
}
