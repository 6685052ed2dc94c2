//! The log of a container's process output, as `microvm logs` reads it.
//!
//! This module owns the files `<dir>/container.log` and `<dir>/container.log.1`
//! of a container directory: their format, the writing side ([`LogWriter`],
//! used by the supervisor that relays the container's stdout and stderr) and
//! the reading side ([`print()`], used by `microvm logs [-f] [--tail N] [-t]`).
//!
//! # On-disk format
//!
//! A log file is a sequence of records with no file header:
//!
//! ```text
//! offset  size  field
//! 0       1     stream: 1 = stdout, 2 = stderr
//! 1       8     time written, nanoseconds since the Unix epoch (UTC), little endian
//! 9       4     payload length N, little endian, at most 65536 (MAX_RECORD)
//! 13      N     payload: the bytes exactly as the container wrote them
//! ```
//!
//! Payloads are raw bytes (never converted to UTF-8), so the log is lossless.
//! A write bigger than [`MAX_RECORD`] becomes several records with the same
//! time. Every record is appended with a single `write` on an `O_APPEND` file
//! descriptor, so only the very end of the current file can hold an
//! incomplete record (the writer is still writing it, or was killed); a reader
//! treats that as "not there yet". A header with an unknown stream byte or a
//! length over the cap is corruption: the reader reports it with the file and
//! offset instead of guessing.
//!
//! # Size bound
//!
//! The guest decides what and how much it prints, so the writer bounds the
//! disk use: when appending a record would make `container.log` pass the
//! limit ([`DEFAULT_MAX_FILE`] by default), the file is renamed to
//! `container.log.1` (replacing the previous one) and a new `container.log` is
//! started. A container's log therefore takes at most about twice the limit.
//! The reader needs memory independent of the log size (`--tail` reads the
//! files twice instead of holding lines).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Default size at which the current log file is rotated (8 MiB); one rotated
/// file is kept, so a container's log takes at most about twice this on disk.
pub const DEFAULT_MAX_FILE: u64 = 8 << 20;

/// Largest payload of one record (64 KiB); bigger writes are split.
pub const MAX_RECORD: usize = 64 << 10;

/// Size of a record header: stream byte, 8-byte time, 4-byte length.
pub const HEADER_LEN: usize = 13;

/// Name of the current log file inside the container directory.
pub const LOG_FILE: &str = "container.log";

/// Name of the rotated (previous) log file inside the container directory.
pub const ROTATED_LOG_FILE: &str = "container.log.1";

/// How often `print` with `follow` looks for new records.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// After the log file could not be (re)opened, how long the writer drops data
/// before trying again, so a broken disk does not cost syscalls on every
/// write of a chatty guest.
const REOPEN_BACKOFF: Duration = Duration::from_secs(1);

/// How much the reader asks the kernel for at once.
const READ_CHUNK: usize = 64 << 10;

/// How often `print` retries to open the two files consistently while a
/// rotation races with it, before it takes what it got.
const SNAPSHOT_TRIES: usize = 5;

/// Which stream a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The container's standard output.
    Stdout,
    /// The container's standard error.
    Stderr,
}

impl Stream {
    /// The stream byte of a record header.
    fn tag(self) -> u8 {
        match self {
            Stream::Stdout => 1,
            Stream::Stderr => 2,
        }
    }

    fn from_tag(tag: u8) -> Option<Stream> {
        match tag {
            1 => Some(Stream::Stdout),
            2 => Some(Stream::Stderr),
            _ => None,
        }
    }

    /// Index into per-stream arrays.
    fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

/// Errors of writing or reading a container log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A log file could not be opened or created.
    #[error("cannot open container log {}: {source}", path.display())]
    Open {
        /// The log file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Appending to the log failed (disk full, I/O error).
    #[error("cannot write container log {}: {source}", path.display())]
    Write {
        /// The log file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Renaming the full log file to the rotated name failed.
    #[error("cannot rotate container log {} to {}: {source}", from.display(), to.display())]
    Rotate {
        /// The current log file.
        from: PathBuf,
        /// The rotated file name it was to be renamed to.
        to: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Reading a log file failed.
    #[error("cannot read container log {}: {source}", path.display())]
    Read {
        /// The log file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A log file holds something that is not a valid record.
    #[error(
        "container log {} is corrupt at byte {offset}: {reason} (output after it cannot be shown; move the file away to discard it)",
        path.display()
    )]
    Corrupt {
        /// The log file.
        path: PathBuf,
        /// Offset of the bad record header in the file.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// Writing the log to the caller's output failed (e.g. a closed pipe).
    #[error("cannot print container log: {0}")]
    Output(#[source] io::Error),
}

/// Appends records to `<dir>/container.log`, rotating to
/// `<dir>/container.log.1` (replacing an older one) when the current file
/// would pass the size limit.
///
/// Cloneable and shareable between threads: clones append to the same file.
/// Each record is written whole with one `write` call, so a reader never sees
/// half a record except at the very end of the current file.
#[derive(Debug, Clone)]
pub struct LogWriter {
    inner: Arc<Mutex<WriterState>>,
}

#[derive(Debug)]
struct WriterState {
    current: PathBuf,
    rotated: PathBuf,
    max_file: u64,
    /// `None` after the file could not be opened or repaired; see `retry_at`.
    file: Option<File>,
    /// Bytes of complete records in the current file: where the next record
    /// starts.
    size: u64,
    /// While the file is `None`, no reopen is tried before this.
    retry_at: Option<Instant>,
    /// First error since the last `take_error`.
    error: Option<Error>,
}

impl LogWriter {
    /// Opens (creating if needed) the log of the container directory `dir`,
    /// rotating at [`DEFAULT_MAX_FILE`]. See [`LogWriter::with_limit`].
    pub fn open(dir: &Path) -> Result<LogWriter, Error> {
        LogWriter::with_limit(dir, DEFAULT_MAX_FILE)
    }

    /// Opens (creating if needed) the log of the container directory `dir`,
    /// which must exist, rotating when the current file would pass
    /// `max_file` bytes (raised to at least one header plus one byte).
    ///
    /// An existing log is appended to (a restarted container keeps its
    /// history). An incomplete record at its end, left by a writer that was
    /// killed, is cut off so that new records start at a record boundary; a
    /// corrupt file is rotated away so that it is kept for inspection but not
    /// appended to.
    pub fn with_limit(dir: &Path, max_file: u64) -> Result<LogWriter, Error> {
        let current = dir.join(LOG_FILE);
        let rotated = dir.join(ROTATED_LOG_FILE);
        let (file, size) = open_for_append(&current, &rotated)?;
        Ok(LogWriter {
            inner: Arc::new(Mutex::new(WriterState {
                current,
                rotated,
                max_file: max_file.max(HEADER_LEN as u64 + 1),
                file: Some(file),
                size,
                retry_at: None,
                error: None,
            })),
        })
    }

    /// A `Write` that records every write as one or more records of `stream`
    /// stamped with the current wall-clock time.
    ///
    /// The sink never fails: see [`LogSink`].
    pub fn sink(&self, stream: Stream) -> LogSink {
        LogSink {
            writer: self.clone(),
            stream,
        }
    }

    /// The first error the log met since the last call (data was dropped
    /// from then on until writing worked again), for the supervisor to
    /// report where the user can see it.
    pub fn take_error(&self) -> Option<Error> {
        self.lock().error.take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WriterState> {
        // A panic while holding the lock leaves the state consistent enough:
        // at worst `size` is stale, which only affects when we rotate.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `data` as records of `stream` stamped `time` (nanoseconds
    /// since the epoch). Errors are remembered, not returned.
    fn append(&self, stream: Stream, time: u64, data: &[u8]) {
        // One lock for the whole write keeps its records together.
        self.lock().append(stream, time, data);
    }
}

impl WriterState {
    fn append(&mut self, stream: Stream, time: u64, data: &[u8]) {
        if data.is_empty() || !self.ensure_open() {
            return;
        }
        // Records never exceed the file limit, so no file passes it.
        let limit = usize::try_from(self.max_file).unwrap_or(usize::MAX);
        let chunk = MAX_RECORD.min(limit - HEADER_LEN);
        let mut record = Vec::with_capacity(HEADER_LEN + chunk.min(data.len()));
        for part in data.chunks(chunk) {
            record.clear();
            record.push(stream.tag());
            record.extend_from_slice(&time.to_le_bytes());
            // `part.len()` <= MAX_RECORD, so it fits in u32.
            record.extend_from_slice(&(part.len() as u32).to_le_bytes());
            record.extend_from_slice(part);
            if let Err(e) = self.write_record(&record) {
                self.remember(e);
                if self.file.is_none() {
                    return;
                }
            }
        }
    }

    /// Makes sure there is a file to write to; false if the data is to be
    /// dropped.
    fn ensure_open(&mut self) -> bool {
        if self.file.is_some() {
            return true;
        }
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return false;
        }
        match open_for_append(&self.current, &self.rotated) {
            Ok((file, size)) => {
                self.file = Some(file);
                self.size = size;
                self.retry_at = None;
                true
            }
            Err(e) => {
                self.remember(e);
                self.retry_at = Some(Instant::now() + REOPEN_BACKOFF);
                false
            }
        }
    }

    fn write_record(&mut self, record: &[u8]) -> Result<(), Error> {
        let len = record.len() as u64;
        if self.size > 0 && self.size.saturating_add(len) > self.max_file {
            self.rotate()?;
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        // `write_all` is a single write() for a regular file unless the disk
        // fills up mid-record.
        match file.write_all(record) {
            Ok(()) => {
                self.size += len;
                Ok(())
            }
            Err(source) => {
                // Cut off whatever part of the record reached the file, so the
                // next record starts at a record boundary and readers do not
                // wait forever for the rest of this one.
                if file.set_len(self.size).is_err() {
                    self.file = None;
                    self.retry_at = Some(Instant::now() + REOPEN_BACKOFF);
                }
                Err(Error::Write {
                    path: self.current.clone(),
                    source,
                })
            }
        }
    }

    /// Renames the current file to the rotated name and starts a new one.
    /// If the rename fails the current file is kept and the record dropped
    /// (writing on would break the size bound); the next record tries again.
    fn rotate(&mut self) -> Result<(), Error> {
        fs::rename(&self.current, &self.rotated).map_err(|source| Error::Rotate {
            from: self.current.clone(),
            to: self.rotated.clone(),
            source,
        })?;
        self.file = None;
        self.retry_at = None;
        match open_for_append(&self.current, &self.rotated) {
            Ok((file, size)) => {
                self.file = Some(file);
                self.size = size;
                Ok(())
            }
            Err(e) => {
                self.retry_at = Some(Instant::now() + REOPEN_BACKOFF);
                Err(e)
            }
        }
    }

    fn remember(&mut self, e: Error) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }
}

/// Opens `current` for appending, creating it if needed, and returns it with
/// the offset where the next record goes. Cuts off an incomplete last record;
/// renames a corrupt file to `rotated` and starts a new one.
fn open_for_append(current: &Path, rotated: &Path) -> Result<(File, u64), Error> {
    let open_err = |source| Error::Open {
        path: current.to_path_buf(),
        source,
    };
    let open = || {
        OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            // The output of a container may hold secrets.
            .mode(0o600)
            .open(current)
            .map_err(open_err)
    };
    let file = open()?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.is_file() {
        // Appending to a device or FIFO would break the size bound and the
        // reader's assumptions.
        return Err(open_err(io::Error::other("not a regular file")));
    }
    if meta.len() == 0 {
        return Ok((file, 0));
    }
    let scan = file.try_clone().map_err(open_err)?;
    let mut reader = FileReader::new(scan, current.to_path_buf())?;
    loop {
        match reader.next_record() {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(Error::Corrupt { .. }) => {
                drop(file);
                fs::rename(current, rotated).map_err(|source| Error::Rotate {
                    from: current.to_path_buf(),
                    to: rotated.to_path_buf(),
                    source,
                })?;
                let file = open()?;
                let size = file.metadata().map_err(open_err)?.len();
                return Ok((file, size));
            }
            Err(e) => return Err(e),
        }
    }
    let valid = reader.offset;
    if valid < meta.len() {
        file.set_len(valid).map_err(|source| Error::Write {
            path: current.to_path_buf(),
            source,
        })?;
    }
    Ok((file, valid))
}

/// The `Write` end of a [`LogWriter`] for one stream (`Send + 'static`).
///
/// Every `write` becomes one or more records stamped with the current
/// wall-clock time; `flush` does nothing (records are not buffered).
///
/// A failing log (disk full, I/O error) must not stop the container: the
/// relay that writes here would otherwise stop forwarding output, or the
/// container would block on a full pipe. So `write` always returns
/// `Ok(buf.len())`; on error the data is dropped and the first error is kept
/// for [`LogWriter::take_error`] (not printed: stderr belongs to the user).
#[derive(Debug)]
pub struct LogSink {
    writer: LogWriter,
    stream: Stream,
}

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Deliberately infallible, see the type's doc.
        self.writer.append(self.stream, now_nanos(), buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Wall-clock time in nanoseconds since the epoch (0 before it, saturating
/// in the year 2554).
fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// How to print.
#[derive(Debug, Clone, Default)]
pub struct PrintOptions {
    /// Keep printing new output until `still_running` says the writer is gone
    /// and everything written has been printed (docker logs -f).
    pub follow: bool,
    /// Only the last N lines (counted over both streams together, in time
    /// order, as docker does); None = all.
    pub tail: Option<usize>,
    /// Prefix every line with its RFC 3339 timestamp with nanoseconds in UTC
    /// and a space (docker's -t: `2026-12-03T10:07:00.123456789Z hello`).
    pub timestamps: bool,
}

/// Prints the log of the container directory `dir`: the rotated file first,
/// then the current one; stdout records to `out`, stderr records to `err`,
/// byte-exact.
///
/// Lines (for `tail` and `timestamps`) are split at `\n` per stream; a line
/// keeps the time of the record where it started and is ordered by that
/// record's place in the log, which is write order. A final line without
/// `\n` counts as a line. While following, all new output is printed, also
/// when it continues a line that `tail` left out.
///
/// With `follow`, polls for new records, follows rotations (finishing the
/// renamed file, then reading the new one from its start), and returns once
/// `still_running()` is false and the files hold nothing more. Output is
/// flushed before every wait.
///
/// A missing log (container never started) prints nothing and is `Ok`. A
/// corrupt rotated file is reported after printing the rest; corruption in the
/// current file ends printing there with the error.
pub fn print(
    dir: &Path,
    opts: &PrintOptions,
    out: &mut dyn Write,
    err: &mut dyn Write,
    still_running: &dyn Fn() -> bool,
) -> Result<(), Error> {
    let current = dir.join(LOG_FILE);
    let rotated = dir.join(ROTATED_LOG_FILE);
    let mut printer = Printer::new(out, err, opts.timestamps);

    let (mut old, cur) = loop {
        // Asked before looking, so a writer that ended before we looked has
        // created whatever it was going to.
        let running = opts.follow && still_running();
        let files = snapshot(&current, &rotated)?;
        if files.1.is_some() || !running {
            break files;
        }
        thread::sleep(POLL_INTERVAL);
    };
    let Some(mut cur) = cur else {
        return Ok(());
    };

    // Corruption of the rotated file is reported at the end, after the
    // current file was printed.
    let mut deferred: Option<Error> = None;
    let cur_corrupt;
    if let Some(n) = opts.tail {
        // Two passes keep memory independent of the log size: count the
        // lines, then print from the first wanted one. The first pass fixes
        // where the second stops, so lines appended in between are not
        // counted twice or missed.
        let mut counter = LineCounter::default();
        let old_end = match old.as_mut() {
            Some(f) => {
                deferred = drain(f, &mut counter)?;
                Some(f.offset)
            }
            None => None,
        };
        cur_corrupt = drain(&mut cur, &mut counter)?;
        let cur_end = cur.offset;
        printer.first_shown = counter.lines.saturating_sub(n as u64);

        if let (Some(f), Some(end)) = (old.as_mut(), old_end) {
            f.rewind(Some(end));
            drain(f, &mut printer)?;
        }
        cur.rewind(Some(cur_end));
        drain(&mut cur, &mut printer)?;
        cur.end = None;
        // Output that arrives while following is new: show all of it, also
        // the rest of a line whose start was cut off by the tail.
        printer.show_all();
    } else {
        if let Some(f) = old.as_mut() {
            deferred = drain(f, &mut printer)?;
        }
        cur_corrupt = drain(&mut cur, &mut printer)?;
    }
    drop(old);

    if let Some(e) = cur_corrupt {
        printer.flush()?;
        return Err(e);
    }

    if opts.follow {
        loop {
            // Asked before reading: if the writer was gone already, this
            // read sees all it wrote.
            let running = still_running();
            // Looked for before reading: if `cur` was renamed away, the
            // writer has finished it, so this read gets all of its rest.
            let next = successor(&current, &rotated, cur.id)?;
            if let Some(e) = drain(&mut cur, &mut printer)? {
                deferred = Some(e);
                break;
            }
            if let Some(next) = next {
                cur = next;
                continue;
            }
            if !running {
                break;
            }
            printer.flush()?;
            thread::sleep(POLL_INTERVAL);
        }
    }
    printer.flush()?;
    match deferred {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Opens the log files as `(rotated, current)` such that the rotated one is
/// the file written just before the current one, retrying if a rotation
/// happens while opening them. If only the rotated file exists (the writer
/// is between rename and create, or died there), it is returned as current
/// so that following picks up its successor.
fn snapshot(
    current: &Path,
    rotated: &Path,
) -> Result<(Option<FileReader>, Option<FileReader>), Error> {
    let mut tries = 0;
    loop {
        tries += 1;
        let cur = FileReader::open(current)?;
        let old = FileReader::open(rotated)?;
        // If `current` still names the file we opened, no rotation happened
        // in between, so `old` is its predecessor.
        let stable = path_id(current)? == cur.as_ref().map(|c| c.id);
        if stable || tries >= SNAPSHOT_TRIES {
            return Ok(match (old, cur) {
                (Some(old), Some(cur)) if old.id == cur.id => (None, Some(cur)),
                (old, Some(cur)) => (old, Some(cur)),
                (Some(old), None) => (None, Some(old)),
                (None, None) => (None, None),
            });
        }
    }
}

/// The file to read after `cur_id` if that one was rotated away, else None.
fn successor(current: &Path, rotated: &Path, cur_id: FileId) -> Result<Option<FileReader>, Error> {
    if path_id(current)? == Some(cur_id) {
        return Ok(None);
    }
    // `cur` is no longer current. If the rotated name holds another file,
    // that one was current after `cur` (rotated again since): read it first.
    if let Some(r) = FileReader::open(rotated)? {
        if r.id != cur_id {
            return Ok(Some(r));
        }
    }
    // Otherwise the successor is the current file, once the writer created it.
    Ok(FileReader::open(current)?.filter(|r| r.id != cur_id))
}

/// Identity of a file (device, inode), to notice renames.
type FileId = (u64, u64);

fn path_id(path: &Path) -> Result<Option<FileId>, Error> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some((m.dev(), m.ino()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Feeds every complete record from the reader's position (up to its `end`)
/// to `f`. Returns the corruption that stopped it, if any; other errors
/// (reading, output) are returned as `Err`.
fn drain(reader: &mut FileReader, to: &mut impl Consume) -> Result<Option<Error>, Error> {
    loop {
        match reader.next_record() {
            Ok(Some(r)) => to.record(r.stream, r.time, r.data)?,
            Ok(None) => return Ok(None),
            Err(e @ Error::Corrupt { .. }) => return Ok(Some(e)),
            Err(e) => return Err(e),
        }
    }
}

/// What `drain` hands records to.
trait Consume {
    fn record(&mut self, stream: Stream, time: u64, data: &[u8]) -> Result<(), Error>;
}

/// One record, borrowed from the reader's buffer.
struct Record<'a> {
    stream: Stream,
    time: u64,
    data: &'a [u8],
}

/// Reads records from one log file by position (`pread`), so the file can be
/// renamed or grow while it is read.
struct FileReader {
    file: File,
    path: PathBuf,
    id: FileId,
    /// File offset of the next record.
    offset: u64,
    /// Do not read at or past this offset (`--tail`'s second pass).
    end: Option<u64>,
    /// Bytes of the file from `buf_start` on.
    buf: Vec<u8>,
    buf_start: u64,
}

impl FileReader {
    /// Opens `path`; `None` if it does not exist.
    fn open(path: &Path) -> Result<Option<FileReader>, Error> {
        match File::open(path) {
            Ok(file) => FileReader::new(file, path.to_path_buf()).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Open {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    fn new(file: File, path: PathBuf) -> Result<FileReader, Error> {
        let meta = file.metadata().map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        Ok(FileReader {
            file,
            path,
            id: (meta.dev(), meta.ino()),
            offset: 0,
            end: None,
            buf: Vec::new(),
            buf_start: 0,
        })
    }

    /// Starts over from the beginning of the file, reading up to `end`.
    fn rewind(&mut self, end: Option<u64>) {
        self.offset = 0;
        self.end = end;
        self.buf.clear();
        self.buf_start = 0;
    }

    /// The next complete record, or `None` if the file does not hold one
    /// (yet) at the current offset.
    fn next_record(&mut self) -> Result<Option<Record<'_>>, Error> {
        if !self.fill(HEADER_LEN)? {
            return Ok(None);
        }
        let start = self.buffered_start();
        let header = &self.buf[start..start + HEADER_LEN];
        let corrupt = |reason: String| Error::Corrupt {
            path: self.path.clone(),
            offset: self.offset,
            reason,
        };
        let Some(stream) = Stream::from_tag(header[0]) else {
            return Err(corrupt(format!("unknown stream byte {:#04x}", header[0])));
        };
        let mut time = [0u8; 8];
        time.copy_from_slice(&header[1..9]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&header[9..13]);
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_RECORD {
            return Err(corrupt(format!(
                "record length {len} is over the limit of {MAX_RECORD} bytes"
            )));
        }
        if !self.fill(HEADER_LEN + len)? {
            return Ok(None);
        }
        let start = self.buffered_start() + HEADER_LEN;
        self.offset += (HEADER_LEN + len) as u64;
        Ok(Some(Record {
            stream,
            time: u64::from_le_bytes(time),
            data: &self.buf[start..start + len],
        }))
    }

    /// Index of `offset` in `buf` (`buf_start <= offset` always holds).
    fn buffered_start(&self) -> usize {
        (self.offset - self.buf_start) as usize
    }

    /// Makes `need` bytes from `offset` on available in `buf`; false if the
    /// file (up to `end`) does not hold them yet. Then the partial bytes are
    /// forgotten: a writer whose write failed cuts them off and may write
    /// something else there.
    fn fill(&mut self, need: usize) -> Result<bool, Error> {
        let start = self.buffered_start();
        if self.buf.len() - start >= need {
            return Ok(true);
        }
        self.buf.drain(..start);
        self.buf_start = self.offset;
        let want = need.max(READ_CHUNK);
        while self.buf.len() < need {
            let have = self.buf.len();
            let pos = self.buf_start + have as u64;
            let mut room = (want - have) as u64;
            if let Some(end) = self.end {
                room = room.min(end.saturating_sub(pos));
            }
            if room == 0 {
                break;
            }
            // `room` <= `want`, a usize.
            self.buf.resize(have + room as usize, 0);
            match self.file.read_at(&mut self.buf[have..], pos) {
                Ok(0) => {
                    self.buf.truncate(have);
                    break;
                }
                Ok(n) => self.buf.truncate(have + n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.buf.truncate(have),
                Err(source) => {
                    self.buf.truncate(have);
                    return Err(Error::Read {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
        }
        if self.buf.len() < need {
            self.buf.clear();
            return Ok(false);
        }
        Ok(true)
    }
}

/// Splits data into pieces that each end with `\n`, except maybe the last.
fn line_pieces(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.split_inclusive(|&b| b == b'\n')
}

/// Counts lines the way `Printer` numbers them.
#[derive(Default)]
struct LineCounter {
    /// Per stream: the previous piece ended a line (false = at a line start,
    /// inverted so `Default` is right).
    in_line: [bool; 2],
    lines: u64,
}

impl Consume for LineCounter {
    fn record(&mut self, stream: Stream, _time: u64, data: &[u8]) -> Result<(), Error> {
        let in_line = &mut self.in_line[stream.index()];
        for piece in line_pieces(data) {
            if !*in_line {
                self.lines += 1;
            }
            *in_line = piece.last() != Some(&b'\n');
        }
        Ok(())
    }
}

/// Per-stream line state of the printer.
#[derive(Clone, Copy)]
struct LineState {
    in_line: bool,
    /// Whether the line in progress is printed.
    shown: bool,
}

/// Writes records to the right output, numbering lines for `--tail` and
/// stamping them for `-t`.
struct Printer<'w> {
    out: BufWriter<&'w mut dyn Write>,
    err: BufWriter<&'w mut dyn Write>,
    timestamps: bool,
    lines: [LineState; 2],
    /// Number of the next line to start, over both streams.
    next_line: u64,
    /// Lines numbered below this are not printed.
    first_shown: u64,
    /// Stream of the last record, to flush the other output when it changes
    /// so that stdout and stderr stay in order on a shared terminal.
    last: Option<Stream>,
}

impl<'w> Printer<'w> {
    fn new(out: &'w mut dyn Write, err: &'w mut dyn Write, timestamps: bool) -> Printer<'w> {
        Printer {
            out: BufWriter::new(out),
            err: BufWriter::new(err),
            timestamps,
            lines: [LineState {
                in_line: false,
                shown: true,
            }; 2],
            next_line: 0,
            first_shown: 0,
            last: None,
        }
    }

    fn show_all(&mut self) {
        self.first_shown = 0;
        for state in &mut self.lines {
            state.shown = true;
        }
    }

    fn output(&mut self, stream: Stream) -> &mut BufWriter<&'w mut dyn Write> {
        match stream {
            Stream::Stdout => &mut self.out,
            Stream::Stderr => &mut self.err,
        }
    }

    fn flush(&mut self) -> Result<(), Error> {
        self.out.flush().map_err(Error::Output)?;
        self.err.flush().map_err(Error::Output)
    }
}

impl Consume for Printer<'_> {
    fn record(&mut self, stream: Stream, time: u64, data: &[u8]) -> Result<(), Error> {
        if self.last != Some(stream) {
            if let Some(prev) = self.last {
                self.output(prev).flush().map_err(Error::Output)?;
            }
            self.last = Some(stream);
        }
        for piece in line_pieces(data) {
            let state = &mut self.lines[stream.index()];
            let starts = !state.in_line;
            if starts {
                state.shown = self.next_line >= self.first_shown;
                self.next_line += 1;
            }
            state.in_line = piece.last() != Some(&b'\n');
            if !state.shown {
                continue;
            }
            let timestamps = self.timestamps;
            let w = self.output(stream);
            if starts && timestamps {
                write!(w, "{} ", format_time(time)).map_err(Error::Output)?;
            }
            w.write_all(piece).map_err(Error::Output)?;
        }
        Ok(())
    }
}

/// RFC 3339 in UTC with 9 fraction digits, e.g. `2026-12-03T10:07:00.123456789Z`.
fn format_time(nanos: u64) -> humantime::Rfc3339Timestamp {
    // u64 nanoseconds end in 2554, well inside humantime's range (year 9999).
    humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_nanos(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "microvm-logs-test-{}-{}-{}-{}",
                name,
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::SeqCst),
                now_nanos()
            ));
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A `Write` whose contents another thread can look at.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl SharedBuf {
        fn contents(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }

        /// Waits until the contents are `want`; panics after 10 s.
        fn wait_for(&self, want: &[u8]) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.contents() != want {
                assert!(
                    Instant::now() < deadline,
                    "reader never printed {:?}, has {:?}",
                    String::from_utf8_lossy(want),
                    String::from_utf8_lossy(&self.contents())
                );
                thread::sleep(Duration::from_millis(5));
            }
        }
    }

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn print_all(dir: &Path, opts: &PrintOptions) -> Result<(Vec<u8>, Vec<u8>), Error> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        print(dir, opts, &mut out, &mut err, &|| false)?;
        Ok((out, err))
    }

    fn tail(n: usize) -> PrintOptions {
        PrintOptions {
            tail: Some(n),
            ..PrintOptions::default()
        }
    }

    /// All records of a file as (stream, time, data).
    fn records(path: &Path) -> Vec<(Stream, u64, Vec<u8>)> {
        let mut reader = FileReader::open(path).unwrap().unwrap();
        let mut all = Vec::new();
        while let Some(r) = reader.next_record().unwrap() {
            all.push((r.stream, r.time, r.data.to_vec()));
        }
        all
    }

    fn header(tag: u8, time: u64, len: u32) -> Vec<u8> {
        let mut h = vec![tag];
        h.extend_from_slice(&time.to_le_bytes());
        h.extend_from_slice(&len.to_le_bytes());
        h
    }

    fn append_raw(path: &Path, bytes: &[u8]) {
        OpenOptions::new()
            .append(true)
            .open(path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    }

    /// 2026-12-03T10:07:00Z in nanoseconds.
    const T0: u64 = 1_796_292_420 * 1_000_000_000;

    #[test]
    fn round_trip_keeps_streams_apart_byte_exact() {
        let dir = TempDir::new("roundtrip");
        let log = LogWriter::open(&dir.0).unwrap();
        let mut out = log.sink(Stream::Stdout);
        let mut err = log.sink(Stream::Stderr);
        assert_eq!(out.write(b"hello \xff\xfe world\n").unwrap(), 15);
        err.write_all(b"oops \x80\x00\n").unwrap();
        out.write_all(b"no newline").unwrap();
        assert_eq!(out.write(b"").unwrap(), 0);

        let recs = records(&dir.0.join(LOG_FILE));
        let streams: Vec<Stream> = recs.iter().map(|r| r.0).collect();
        assert_eq!(streams, [Stream::Stdout, Stream::Stderr, Stream::Stdout]);
        // Stamped with the wall-clock time of the write.
        assert!(now_nanos().abs_diff(recs[0].1) < 60_000_000_000);

        let (o, e) = print_all(&dir.0, &PrintOptions::default()).unwrap();
        assert_eq!(o, b"hello \xff\xfe world\nno newline");
        assert_eq!(e, b"oops \x80\x00\n");
        assert!(log.take_error().is_none());
    }

    #[test]
    fn big_write_is_split_into_records() {
        let dir = TempDir::new("split");
        let log = LogWriter::open(&dir.0).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(log.sink(Stream::Stderr).write(&data).unwrap(), data.len());

        let recs = records(&dir.0.join(LOG_FILE));
        let lens: Vec<usize> = recs.iter().map(|r| r.2.len()).collect();
        assert_eq!(lens, [65536, 65536, 65536, 3392]);
        assert!(recs
            .iter()
            .all(|r| r.0 == Stream::Stderr && r.1 == recs[0].1));

        let (o, e) = print_all(&dir.0, &PrintOptions::default()).unwrap();
        assert!(o.is_empty());
        assert_eq!(e, data);
    }

    #[test]
    fn rotation_keeps_newest_within_twice_the_limit() {
        let dir = TempDir::new("rotate");
        let log = LogWriter::with_limit(&dir.0, 1000).unwrap();
        let mut sink = log.sink(Stream::Stdout);
        let lines: Vec<String> = (0..100).map(|i| format!("line {i:03}\n")).collect();
        for line in &lines {
            sink.write_all(line.as_bytes()).unwrap();
        }
        let cur = fs::metadata(dir.0.join(LOG_FILE)).unwrap().len();
        let old = fs::metadata(dir.0.join(ROTATED_LOG_FILE)).unwrap().len();
        assert!(cur <= 1000 && old <= 1000, "{cur} {old}");
        // 22-byte records: 45 per file; 100 = 45 (gone) + 45 (.1) + 10.
        assert_eq!(old, 45 * 22);
        assert_eq!(cur, 10 * 22);

        let (o, _) = print_all(&dir.0, &PrintOptions::default()).unwrap();
        assert_eq!(o, lines[45..].concat().as_bytes());

        // A write bigger than the limit is split so no file passes it.
        sink.write_all(&[b'x'; 2500]).unwrap();
        let cur = fs::metadata(dir.0.join(LOG_FILE)).unwrap().len();
        let old = fs::metadata(dir.0.join(ROTATED_LOG_FILE)).unwrap().len();
        assert!(cur <= 1000 && old <= 1000, "{cur} {old}");
        let (o, _) = print_all(&dir.0, &PrintOptions::default()).unwrap();
        assert!(o.iter().all(|&b| b == b'x'));
        assert_eq!(o.len() as u64, cur + old - 13 * (records_in(&dir.0) as u64));
    }

    fn records_in(dir: &Path) -> usize {
        records(&dir.join(LOG_FILE)).len() + records(&dir.join(ROTATED_LOG_FILE)).len()
    }

    /// Lines in start order: a1 a2 partial e1 a3 e2 e3.
    fn mixed_log(dir: &Path) {
        let log = LogWriter::open(dir).unwrap();
        log.append(Stream::Stdout, T0 + 1, b"a1\na2\npar");
        log.append(Stream::Stderr, T0 + 2, b"e1\n");
        log.append(Stream::Stdout, T0 + 3, b"tial\na3\n");
        log.append(Stream::Stderr, T0 + 4, b"e2\ne3");
    }

    #[test]
    fn tail_counts_both_streams_in_time_order() {
        let dir = TempDir::new("tail");
        mixed_log(&dir.0);
        let (o, e) = print_all(&dir.0, &tail(3)).unwrap();
        assert_eq!((o.as_slice(), e.as_slice()), (&b"a3\n"[..], &b"e2\ne3"[..]));
        let (o, e) = print_all(&dir.0, &tail(5)).unwrap();
        assert_eq!(
            (o.as_slice(), e.as_slice()),
            (&b"partial\na3\n"[..], &b"e1\ne2\ne3"[..])
        );
        let (o, e) = print_all(&dir.0, &tail(6)).unwrap();
        assert_eq!(
            (o.as_slice(), e.as_slice()),
            (&b"a2\npartial\na3\n"[..], &b"e1\ne2\ne3"[..])
        );
        let (o, e) = print_all(&dir.0, &tail(100)).unwrap();
        assert_eq!(
            (o.as_slice(), e.as_slice()),
            (&b"a1\na2\npartial\na3\n"[..], &b"e1\ne2\ne3"[..])
        );
    }

    #[test]
    fn tail_spans_rotated_file() {
        let dir = TempDir::new("tailrot");
        let log = LogWriter::with_limit(&dir.0, 100).unwrap();
        // 13 + 30 bytes per record: two per file.
        for i in 0..5u8 {
            log.append(Stream::Stdout, T0 + u64::from(i), &[b'0' + i; 30]);
        }
        log.append(Stream::Stdout, T0 + 9, b"\n");
        let mut want = [b'3'; 30].to_vec();
        want.extend_from_slice(&[b'4'; 30]);
        want.push(b'\n');
        // The only line started in the lost first file; its rest is shown.
        let (o, _) = print_all(&dir.0, &tail(1)).unwrap();
        assert_eq!(o, [&[b'2'; 30][..], &want].concat());
    }

    #[test]
    fn tail_zero_prints_nothing_old_but_follows_new() {
        let dir = TempDir::new("tail0");
        mixed_log(&dir.0);
        let (o, e) = print_all(&dir.0, &tail(0)).unwrap();
        assert!(o.is_empty() && e.is_empty());

        // Following: the writer waits until the reader is past the
        // existing log (second still_running call), then writes.
        let log = LogWriter::open(&dir.0).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicBool::new(true));
        let writer = {
            let (calls, running) = (calls.clone(), running.clone());
            thread::spawn(move || {
                while calls.load(Ordering::SeqCst) < 2 {
                    thread::sleep(Duration::from_millis(5));
                }
                log.sink(Stream::Stdout).write_all(b"new\n").unwrap();
                log.sink(Stream::Stderr).write_all(b"e4\n").unwrap();
                running.store(false, Ordering::SeqCst);
            })
        };
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let opts = PrintOptions {
            follow: true,
            ..tail(0)
        };
        let still_running = || {
            calls.fetch_add(1, Ordering::SeqCst);
            running.load(Ordering::SeqCst)
        };
        print(&dir.0, &opts, &mut o, &mut e, &still_running).unwrap();
        writer.join().unwrap();
        assert_eq!(o, b"new\n");
        // New output is shown even where it continues a line left out.
        assert_eq!(e, b"e4\n");
    }

    #[test]
    fn timestamps_at_each_line_start() {
        let dir = TempDir::new("ts");
        let log = LogWriter::open(&dir.0).unwrap();
        log.append(Stream::Stdout, T0 + 123_456_789, b"hello\nwor");
        log.append(Stream::Stderr, T0 + 5, b"x");
        log.append(Stream::Stdout, T0 + 1_000_000_000, b"ld\nbye\n");
        log.append(Stream::Stderr, T0 + 7, b"y\n\nz\n");
        let opts = PrintOptions {
            timestamps: true,
            ..PrintOptions::default()
        };
        let (o, e) = print_all(&dir.0, &opts).unwrap();
        assert_eq!(
            String::from_utf8(o).unwrap(),
            "2026-12-03T10:07:00.123456789Z hello\n\
             2026-12-03T10:07:00.123456789Z world\n\
             2026-12-03T10:07:01.000000000Z bye\n"
        );
        assert_eq!(
            String::from_utf8(e).unwrap(),
            "2026-12-03T10:07:00.000000005Z xy\n\
             2026-12-03T10:07:00.000000007Z \n\
             2026-12-03T10:07:00.000000007Z z\n"
        );

        let opts = PrintOptions {
            timestamps: true,
            ..tail(2)
        };
        let (o, e) = print_all(&dir.0, &opts).unwrap();
        assert!(o.is_empty());
        assert_eq!(
            String::from_utf8(e).unwrap(),
            "2026-12-03T10:07:00.000000007Z \n2026-12-03T10:07:00.000000007Z z\n"
        );
    }

    #[test]
    fn follow_survives_rotations_and_returns_with_everything() {
        let dir = TempDir::new("follow");
        // 24-byte records ("follow NNN\n"): 8 per 200-byte file.
        let log = LogWriter::with_limit(&dir.0, 200).unwrap();
        let out = SharedBuf::default();
        let err = SharedBuf::default();
        let running = Arc::new(AtomicBool::new(true));
        let line = |i: usize| format!("follow {i:03}\n");
        let writer = {
            let (out, running) = (out.clone(), running.clone());
            thread::spawn(move || {
                let mut sink = log.sink(Stream::Stdout);
                let mut want = String::new();
                let mut next = 0;
                // 3: no rotation; 7: one rotation after the 8th record
                // (the reader has the old file open); 16: two rotations
                // before the reader looks again (the file it had open is
                // gone from the directory, the one after it is .1).
                for batch in [3, 7, 16] {
                    for _ in 0..batch {
                        sink.write_all(line(next).as_bytes()).unwrap();
                        want.push_str(&line(next));
                        next += 1;
                    }
                    out.wait_for(want.as_bytes());
                }
                log.sink(Stream::Stderr).write_all(b"bye\n").unwrap();
                sink.write_all(b"last").unwrap();
                assert!(log.take_error().is_none());
                running.store(false, Ordering::SeqCst);
            })
        };
        let opts = PrintOptions {
            follow: true,
            ..PrintOptions::default()
        };
        let (mut o, mut e) = (out.clone(), err.clone());
        print(&dir.0, &opts, &mut o, &mut e, &|| {
            running.load(Ordering::SeqCst)
        })
        .unwrap();
        writer.join().unwrap();
        let mut want: String = (0..26).map(line).collect();
        want.push_str("last");
        assert_eq!(String::from_utf8(out.contents()).unwrap(), want);
        assert_eq!(err.contents(), b"bye\n");
        // The size bound held throughout: .1 holds 8 records, the current file 2 + 2.
        assert_eq!(records_in(&dir.0), 8 + 4);
    }

    #[test]
    fn follow_without_log_returns_when_not_running() {
        let dir = TempDir::new("nolog");
        let opts = PrintOptions {
            follow: true,
            ..PrintOptions::default()
        };
        let (mut o, mut e) = (Vec::new(), Vec::new());
        print(&dir.0, &opts, &mut o, &mut e, &|| false).unwrap();
        print(&dir.0.join("missing"), &tail(3), &mut o, &mut e, &|| false).unwrap();
        assert!(o.is_empty() && e.is_empty());
    }

    #[test]
    fn corrupt_header_is_an_error_not_a_panic() {
        for (bad, reason) in [
            (header(7, T0, 1), "unknown stream byte 0x07"),
            (header(1, T0, u32::MAX), "record length 4294967295 is over"),
            (header(2, T0, 65537), "record length 65537 is over"),
        ] {
            let dir = TempDir::new("corrupt");
            LogWriter::open(&dir.0)
                .unwrap()
                .append(Stream::Stdout, T0, b"good\n");
            let path = dir.0.join(LOG_FILE);
            append_raw(&path, &bad);
            append_raw(&path, &[0; 100]);
            for opts in [PrintOptions::default(), tail(1)] {
                let (mut o, mut e) = (Vec::new(), Vec::new());
                let res = print(&dir.0, &opts, &mut o, &mut e, &|| false);
                match res {
                    Err(Error::Corrupt {
                        path: p, offset, ..
                    }) => {
                        assert_eq!((p, offset), (path.clone(), 18));
                    }
                    other => panic!("want Corrupt, got {other:?}"),
                }
                assert_eq!(o, b"good\n");
                let msg = print(&dir.0, &opts, &mut o, &mut e, &|| false)
                    .unwrap_err()
                    .to_string();
                assert!(msg.contains(&path.display().to_string()), "{msg}");
                assert!(msg.contains("at byte 18") && msg.contains(reason), "{msg}");
            }

            // A writer opened on a corrupt log moves it aside and starts a
            // new file; the reader prints the new file and reports the old.
            let log = LogWriter::open(&dir.0).unwrap();
            log.append(Stream::Stdout, T0 + 1, b"fresh\n");
            let (mut o, mut e) = (Vec::new(), Vec::new());
            let res = print(&dir.0, &PrintOptions::default(), &mut o, &mut e, &|| false);
            assert!(
                matches!(res, Err(Error::Corrupt { offset: 18, .. })),
                "{res:?}"
            );
            assert_eq!(o, b"good\nfresh\n");
        }
    }

    #[test]
    fn truncated_last_record_is_ignored_and_repaired_by_writer() {
        for partial in [header(1, T0, 10)[..5].to_vec(), {
            let mut h = header(2, T0, 10);
            h.extend_from_slice(b"abc");
            h
        }] {
            let dir = TempDir::new("trunc");
            LogWriter::open(&dir.0)
                .unwrap()
                .append(Stream::Stdout, T0, b"first\n");
            let path = dir.0.join(LOG_FILE);
            append_raw(&path, &partial);
            for opts in [PrintOptions::default(), tail(5)] {
                let (o, e) = print_all(&dir.0, &opts).unwrap();
                assert_eq!((o.as_slice(), e.as_slice()), (&b"first\n"[..], &b""[..]));
            }
            // A restarted writer cuts the partial record off and appends.
            let log = LogWriter::open(&dir.0).unwrap();
            log.sink(Stream::Stderr).write_all(b"after\n").unwrap();
            assert_eq!(fs::metadata(&path).unwrap().len(), 2 * 13 + 12);
            let (o, e) = print_all(&dir.0, &PrintOptions::default()).unwrap();
            assert_eq!(
                (o.as_slice(), e.as_slice()),
                (&b"first\n"[..], &b"after\n"[..])
            );
        }
    }

    #[test]
    fn write_errors_are_remembered_not_returned() {
        let dir = TempDir::new("full");
        let log = LogWriter::open(&dir.0).unwrap();
        let mut sink = log.sink(Stream::Stdout);
        sink.write_all(b"kept\n").unwrap();
        // Simulate a full disk: writes fail with ENOSPC, and cutting the
        // file back fails too, so the writer gives up on the file for now.
        log.lock().file = Some(OpenOptions::new().write(true).open("/dev/full").unwrap());
        assert_eq!(sink.write(b"lost\n").unwrap(), 5);
        assert!(log.lock().file.is_none());
        assert_eq!(sink.write(b"lost too\n").unwrap(), 9);
        let e = log.take_error().unwrap();
        assert!(matches!(&e, Error::Write { source, .. } if source.raw_os_error() == Some(28)));
        assert!(e.to_string().contains("container.log"), "{e}");
        assert!(log.take_error().is_none());

        // After the back-off the log is reopened and appended to.
        log.lock().retry_at = Some(Instant::now());
        sink.write_all(b"back\n").unwrap();
        let (o, _) = print_all(&dir.0, &PrintOptions::default()).unwrap();
        assert_eq!(o, b"kept\nback\n");
    }
}
