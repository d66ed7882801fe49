//! A size-rotated log file for the agent service (`%ProgramData%\Tenon\logs\tenon-agent.log`):
//! `tenon-agent.log` is the live file; at the size limit it becomes `.1`, `.1` becomes `.2`, ...,
//! and the oldest beyond `keep` is deleted. Usable directly as a `tracing_subscriber` writer.
//!
//! Rotation happens between writes, never inside one (tracing hands over one formatted event per
//! write), so an event never straddles two files. Platform-independent, so it is tested on Linux.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// 5 MiB per file, as the service uses it.
pub const DEFAULT_MAX_BYTES: u64 = 5 * 1024 * 1024;
/// Rotated files kept besides the live one.
pub const DEFAULT_KEEP: usize = 5;

pub struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    state: Mutex<Live>,
}

struct Live {
    /// `None` only between closing the full file and opening its successor.
    file: Option<File>,
    size: u64,
}

impl RotatingLog {
    /// Opens (appending) or creates `dir/name`, creating `dir` if needed.
    pub fn open(dir: &Path, name: &str, max_bytes: u64, keep: usize) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(name);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(Self { path, max_bytes: max_bytes.max(1), keep, state: Mutex::new(Live { file: Some(file), size }) })
    }

    /// The live file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate(&self, live: &mut Live) -> io::Result<()> {
        // Close the live file before renaming it: Windows refuses to rename files that are open
        // without FILE_SHARE_DELETE (a log viewer may hold one), and a closed file always moves.
        if let Some(mut f) = live.file.take() {
            f.flush()?;
        }
        let shifted = self.shift_files();
        // Whatever happened, keep a live file: appending to the old one beats losing events.
        let file = OpenOptions::new().create(true).append(true).open(&self.path)?;
        live.size = file.metadata()?.len();
        live.file = Some(file);
        shifted
    }

    fn shift_files(&self) -> io::Result<()> {
        if self.keep == 0 {
            return std::fs::remove_file(&self.path);
        }
        let _ = std::fs::remove_file(self.rotated(self.keep));
        for n in (1..self.keep).rev() {
            let from = self.rotated(n);
            if from.exists() {
                std::fs::rename(&from, self.rotated(n + 1))?;
            }
        }
        std::fs::rename(&self.path, self.rotated(1))
    }

    fn write_record(&self, buf: &[u8]) -> io::Result<usize> {
        let mut live = self.state.lock().map_err(|_| io::Error::other("log writer lock poisoned"))?;
        if live.size > 0 && live.size + buf.len() as u64 > self.max_bytes {
            // A failed rotation (say, an antivirus holding `.1`) must not lose the event: keep
            // appending to the live file and try again at the next write.
            let _ = self.rotate(&mut live);
        }
        let file = match live.file.as_mut() {
            Some(f) => f,
            None => live.file.insert(OpenOptions::new().create(true).append(true).open(&self.path)?),
        };
        file.write_all(buf)?;
        live.size += buf.len() as u64;
        Ok(buf.len())
    }
}

/// One borrowed handle per event, as `tracing_subscriber::fmt` asks for.
pub struct RotatingLogWriter<'a>(&'a RotatingLog);

impl Write for RotatingLogWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_record(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut live = self.0.state.lock().map_err(|_| io::Error::other("log writer lock poisoned"))?;
        match live.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Write for &RotatingLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_record(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        RotatingLogWriter(self).flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RotatingLog {
    type Writer = RotatingLogWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        RotatingLogWriter(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::MakeWriter;

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap_or_default()
    }

    #[test]
    fn rotates_at_the_limit_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let log = RotatingLog::open(dir.path(), "agent.log", 10, 2).unwrap();
        for line in ["aaaaaaaa\n", "bbbbbbbb\n", "cccccccc\n", "dddddddd\n"] {
            log.make_writer().write_all(line.as_bytes()).unwrap();
        }
        // Each 9-byte line fits alone but not with another: every write after the first rotates.
        assert_eq!(read(&dir.path().join("agent.log")), "dddddddd\n");
        assert_eq!(read(&dir.path().join("agent.log.1")), "cccccccc\n");
        assert_eq!(read(&dir.path().join("agent.log.2")), "bbbbbbbb\n");
        assert!(!dir.path().join("agent.log.3").exists(), "only `keep` rotated files stay");
    }

    #[test]
    fn appends_to_an_existing_file_and_counts_its_size() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("agent.log"), "old-old-\n").unwrap();
        let log = RotatingLog::open(dir.path(), "agent.log", 12, 5).unwrap();
        (&log).write_all(b"new\n").unwrap();
        assert_eq!(read(&dir.path().join("agent.log")), "new\n");
        assert_eq!(read(&dir.path().join("agent.log.1")), "old-old-\n");
    }

    #[test]
    fn an_event_larger_than_the_limit_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let log = RotatingLog::open(dir.path(), "agent.log", 4, 1).unwrap();
        (&log).write_all(b"0123456789\n").unwrap();
        assert_eq!(read(log.path()), "0123456789\n");
    }

    #[test]
    fn works_as_a_tracing_writer() {
        let dir = tempfile::tempdir().unwrap();
        let log = RotatingLog::open(dir.path(), "agent.log", DEFAULT_MAX_BYTES, DEFAULT_KEEP).unwrap();
        let path = log.path().to_path_buf();
        let subscriber = tracing_subscriber::fmt().with_writer(log).with_ansi(false).finish();
        tracing::subscriber::with_default(subscriber, || tracing::info!(answer = 42, "sync finished"));
        let text = read(&path);
        assert!(text.contains("sync finished") && text.contains("answer=42"), "{text}");
    }
}
