//! The guest's serial console kept in a file of bounded size: a guest writing its console
//! without end must not fill the host's disk, or its RAM where run directories live on tmpfs
//! (/run). Past [`MAX`] bytes the file is renamed to `<name>.1` (replacing the one there) and
//! begun again, so the two hold the last [`MAX`] to twice that of the output.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Bytes kept in one console log file. A Linux boot writes a few tens of KiB.
pub const MAX: u64 = 1 << 20;

/// A console log file that rotates at `max` bytes (see the module comment). A path that is
/// not a regular file (`--console-log /dev/null`, a FIFO, /dev/stdout) is written as it is,
/// never renamed.
pub struct ConsoleLog {
    path: PathBuf,
    file: File,
    written: u64,
    /// `None` for a path that is not a regular file.
    max: Option<u64>,
}

impl ConsoleLog {
    /// Creates (or truncates) `path`, rotating at [`MAX`].
    pub fn create(path: &Path) -> io::Result<ConsoleLog> {
        Self::with_max(path, MAX)
    }

    /// [`ConsoleLog::create`] rotating at `max` bytes.
    pub fn with_max(path: &Path, max: u64) -> io::Result<ConsoleLog> {
        let file = File::create(path)?;
        let regular = file.metadata()?.is_file();
        Ok(ConsoleLog {
            path: path.to_owned(),
            file,
            written: 0,
            max: regular.then_some(max.max(1)),
        })
    }

    fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(&self.path, older(&self.path))?;
        self.file = File::create(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(max) = self.max else {
            return self.file.write(buf);
        };
        if self.written >= max {
            self.rotate()?;
        }
        let room = (max - self.written).min(buf.len() as u64) as usize;
        let n = self.file.write(&buf[..room])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Where [`ConsoleLog`] moves the older output of `path`.
pub fn older(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// The last `n` lines of the console log at `path` (its older file included), lossily decoded.
pub fn tail(path: &Path, n: usize) -> Vec<String> {
    let mut text = std::fs::read(older(path)).unwrap_or_default();
    text.extend(std::fs::read(path).unwrap_or_default());
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_console_without_end_takes_at_most_twice_the_cap_and_keeps_the_latest() {
        let dir = std::env::temp_dir().join(format!("microvm-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let mut log = ConsoleLog::with_max(&path, 1000).unwrap();
        for i in 0..10_000 {
            writeln!(log, "line {i}").unwrap();
        }
        let sizes = [&path, &older(&path)].map(|p| std::fs::metadata(p).unwrap().len());
        assert!(sizes.iter().all(|&s| s <= 1000), "{sizes:?}");
        assert_eq!(tail(&path, 2), ["line 9998", "line 9999"]);
        // The older file continues where the newer one begins.
        let both = tail(&path, 1000);
        assert!(both.len() > 100, "{}", both.len());
        assert!(both.windows(2).skip(1).all(|w| {
            let n = |l: &str| l.trim_start_matches("line ").parse::<u32>().unwrap_or(0);
            n(&w[1]) == n(&w[0]) + 1
        }));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_device_or_fifo_is_written_through_never_renamed() {
        let mut null = ConsoleLog::with_max(Path::new("/dev/null"), 10).unwrap();
        for _ in 0..100 {
            null.write_all(b"0123456789").unwrap();
        }
        assert!(Path::new("/dev/null").exists());
        assert!(
            !older(Path::new("/dev/null")).exists(),
            "/dev/null was rotated"
        );
    }
}
