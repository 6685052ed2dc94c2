//! Turns one layer blob into one read-only squashfs image, streaming: decompress (gzip, zstd
//! or none, told by magic bytes, not the media type) -> rewrite the tar ([`super::layer_rewrite`])
//! -> `tar2sqfs` on a pipe -> temporary file -> rename. Nothing of the layer is unpacked on the
//! host, and tar2sqfs only reads its standard input and writes the one image file.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use super::digest::{Digest, HashingReader};
use super::error::{Error, IoContext};
use super::layer_rewrite::{self, Merge, MergeWriter, RewriteError, Summary};

/// The squashfs compressor: zstd at level 1 is the fastest one the guest kernel reads
/// (CONFIG_SQUASHFS_ZSTD); tar2sqfs stores a block raw whenever compressing does not shrink it.
/// tar2sqfs 1.2 cannot turn compression off altogether.
pub const SQUASHFS_COMPRESSOR: &[&str] = &["--compressor", "zstd", "--comp-extra", "level=1"];

/// Read buffer in front of the decompressor.
const READ_BUF: usize = 256 << 10;
/// How much of tar2sqfs's standard error is kept for messages.
const STDERR_KEEP: usize = 4096;

/// How a layer (or archive) is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (one or more members).
    Gzip,
    /// zstd (one or more frames).
    Zstd,
}

impl Compression {
    /// Wraps `r` in the matching decompressor.
    pub(crate) fn decoder<'a>(self, r: Box<dyn BufRead + 'a>) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::None => r,
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
        })
    }

    /// The OCI layer media type for a layer compressed this way.
    pub fn layer_media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// Tells the compression from the first bytes, without consuming them. Formats other than gzip
/// and zstd (xz, bzip2) are refused rather than misread as tar.
pub(crate) fn detect_compression<R: BufRead>(r: &mut R) -> io::Result<Compression> {
    let head = r.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) || head.starts_with(b"BZh") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "xz and bzip2 compression are not supported: recompress with gzip or zstd",
        ));
    } else {
        Compression::None
    })
}

/// The setting for how long converting one layer may take, in minutes (default
/// [`DEFAULT_TIME_LIMIT_MIN`]): a conversion past it fails and lets go of the layer's lock.
pub const TIME_LIMIT_VAR: &str = "MICROVM_CONVERT_TIMEOUT_MIN";
const DEFAULT_TIME_LIMIT_MIN: u64 = 60;

/// How long converting one layer may take ([`TIME_LIMIT_VAR`]).
pub(crate) fn time_limit() -> Result<Duration, Error> {
    super::env_setting(
        TIME_LIMIT_VAR,
        DEFAULT_TIME_LIMIT_MIN,
        7 * 24 * 60,
        "minutes",
    )
    .map(|min| Duration::from_secs(min * 60))
    .map_err(Error::Unsupported)
}

/// A reader that fails once `deadline` has passed.
struct Deadline<R> {
    inner: R,
    deadline: Instant,
    limit: Duration,
}

impl<R: Read> Read for Deadline<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if Instant::now() > self.deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "converting took longer than {} minutes ({TIME_LIMIT_VAR})",
                    self.limit.as_secs() / 60
                ),
            ));
        }
        self.inner.read(buf)
    }
}

/// Finds tar2sqfs on PATH.
pub(crate) fn tar2sqfs() -> Result<PathBuf, Error> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("tar2sqfs"))
        .find(|p| p.is_file())
        .ok_or(Error::Tar2sqfsMissing)
}

/// Converts the layer blob at `blob` (whose digest is `digest`) into a squashfs image at `tmp`,
/// which must be a fresh file the caller owns; the blob is re-hashed on the way, so a blob
/// damaged in the store is caught. `progress` sees the compressed bytes read.
pub(crate) fn convert(
    blob: &Path,
    digest: &Digest,
    tmp: &Path,
    progress: &indicatif::ProgressBar,
) -> Result<Summary, Error> {
    run_tar2sqfs(tmp, digest.as_str(), |stdin| {
        read_layer(blob, digest, progress, |r| layer_rewrite::rewrite(r, stdin))
    })
}

/// Merges the layer blobs `layers` (bottom first, with their digests) into one squashfs image
/// at `tmp`, as [`convert`] does one: see [`layer_rewrite::Merge`]. Each blob is read (and
/// re-hashed) twice: once to work out what survives, once to write it.
pub(crate) fn convert_merged(
    layers: &[(PathBuf, Digest)],
    tmp: &Path,
    progress: &indicatif::ProgressBar,
) -> Result<Summary, Error> {
    let label = match (layers.first(), layers.last()) {
        (Some((_, bottom)), Some((_, top))) => format!("{bottom} to {top} (merged)"),
        _ => return Err(Error::Unsupported("no layers to merge".into())),
    };
    let tool = tar2sqfs()?;
    let mut merge = Merge::new();
    for (blob, digest) in layers {
        read_layer(blob, digest, progress, |r| merge.apply(r)).map_err(|f| f.into_error(None))?;
    }
    let plans = merge.plans();
    run_tar2sqfs_with(&tool, tmp, &label, |stdin| {
        let mut w = MergeWriter::new(stdin);
        for ((blob, digest), plan) in layers.iter().zip(&plans) {
            read_layer(blob, digest, progress, |r| w.layer(r, plan))?;
        }
        w.finish(&merge).map_err(|err| Failure::Layer {
            digest: label.clone(),
            err,
        })
    })
}

/// Why feeding tar2sqfs stopped.
enum Failure {
    /// Already a store error (I/O on the blob, a digest mismatch).
    Store(Error),
    /// Rewriting the layer `digest` failed.
    Layer { digest: String, err: RewriteError },
}

impl Failure {
    /// The store error; `tar2sqfs` is its exit status and standard error, when it ran.
    fn into_error(self, tar2sqfs: Option<(String, String)>) -> Error {
        match self {
            Failure::Store(e) => e,
            Failure::Layer {
                digest,
                err: RewriteError::Output(e),
            } => match tar2sqfs {
                Some((status, stderr)) => Error::Tar2sqfs {
                    digest,
                    status,
                    stderr,
                },
                None => Error::io(format!("writing the image of layer {digest}"), e),
            },
            Failure::Layer {
                digest,
                err: RewriteError::Input(e),
            } => Error::HostileLayer {
                digest,
                reason: if e.kind() == io::ErrorKind::TimedOut {
                    e.to_string()
                } else {
                    format!("not a readable tar after decompression: {e}")
                },
            },
            Failure::Layer {
                digest,
                err: RewriteError::Hostile(reason),
            } => Error::HostileLayer { digest, reason },
            Failure::Layer {
                err: RewriteError::Setting(reason),
                ..
            } => Error::Unsupported(reason),
        }
    }
}

/// Converts the layer whose blob `source` streams (a download, say) into a squashfs image at
/// `tmp`, as [`convert`] does a stored blob: `source` is hashed on the way and must match
/// `digest`. `progress` sees the compressed bytes read.
pub(crate) fn convert_stream(
    source: &mut dyn Read,
    digest: &Digest,
    tmp: &Path,
    progress: &indicatif::ProgressBar,
) -> Result<Summary, Error> {
    let name = format!("layer {digest}");
    run_tar2sqfs(tmp, digest.as_str(), |stdin| {
        read_from(source, &name, digest, progress, |r| {
            layer_rewrite::rewrite(r, stdin)
        })
    })
}

/// Streams the layer blob at `blob` through its decompressor into `f`, then checks the blob
/// against `digest`: a damaged blob is reported as that, whatever `f` made of it.
fn read_layer<T>(
    blob: &Path,
    digest: &Digest,
    progress: &indicatif::ProgressBar,
    f: impl FnOnce(&mut dyn Read) -> Result<T, RewriteError>,
) -> Result<T, Failure> {
    let file = File::open(blob)
        .ctx(|| format!("opening layer blob {}", blob.display()))
        .map_err(Failure::Store)?;
    let name = format!("layer blob {}", blob.display());
    read_from(file, &name, digest, progress, f)
}

/// [`read_layer`] over any reader; `name` says what it reads, in messages.
fn read_from<T>(
    source: impl Read,
    name: &str,
    digest: &Digest,
    progress: &indicatif::ProgressBar,
    f: impl FnOnce(&mut dyn Read) -> Result<T, RewriteError>,
) -> Result<T, Failure> {
    let hashing = HashingReader::new(progress.wrap_read(source));
    let mut buffered = BufReader::with_capacity(READ_BUF, hashing);
    let compression = detect_compression(&mut buffered).map_err(|e| {
        Failure::Store(Error::HostileLayer {
            digest: digest.to_string(),
            reason: e.to_string(),
        })
    })?;
    let limit = time_limit().map_err(Failure::Store)?;
    let result = (|| {
        let decoder = compression
            .decoder(Box::new(&mut buffered) as Box<dyn BufRead>)
            .map_err(RewriteError::Input)?;
        f(&mut Deadline {
            inner: decoder,
            deadline: Instant::now() + limit,
            limit,
        })
    })();
    let (actual, _) = buffered
        .into_inner()
        .drain_and_finish()
        .ctx(|| format!("reading {name}"))
        .map_err(Failure::Store)?;
    if &actual != digest {
        return Err(Failure::Store(Error::DigestMismatch {
            digest: digest.to_string(),
            actual: actual.to_string(),
        }));
    }
    result.map_err(|err| Failure::Layer {
        digest: digest.to_string(),
        err,
    })
}

/// Runs tar2sqfs writing `tmp` from what `feed` writes to its standard input. `label` names
/// the layer(s) in a tar2sqfs failure that `feed` did not see.
fn run_tar2sqfs(
    tmp: &Path,
    label: &str,
    feed: impl FnOnce(BufWriter<ChildStdin>) -> Result<Summary, Failure>,
) -> Result<Summary, Error> {
    run_tar2sqfs_with(&tar2sqfs()?, tmp, label, feed)
}

fn run_tar2sqfs_with(
    tool: &Path,
    tmp: &Path,
    label: &str,
    feed: impl FnOnce(BufWriter<ChildStdin>) -> Result<Summary, Failure>,
) -> Result<Summary, Error> {
    let mut child = spawn(tool, tmp)?;
    let piped = || Error::io("starting tar2sqfs", io::ErrorKind::BrokenPipe.into());
    let stdin = child.stdin.take().ok_or_else(piped)?;
    let stderr = child.stderr.take().ok_or_else(piped)?;
    // Drained on its own thread: a chatty tar2sqfs must never block on a full pipe while we
    // block writing to it.
    let stderr_thread = std::thread::spawn(move || keep_tail(stderr));
    let result = feed(BufWriter::with_capacity(READ_BUF, stdin));
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().ctx(|| "waiting for tar2sqfs".to_string())?;
    let stderr_text = stderr_thread.join().unwrap_or_default();
    let tar2sqfs_said = (status.to_string(), stderr_text.trim().to_string());
    let summary = result.map_err(|f| f.into_error(Some(tar2sqfs_said.clone())))?;
    if !status.success() {
        return Err(Error::Tar2sqfs {
            digest: label.to_string(),
            status: tar2sqfs_said.0,
            stderr: tar2sqfs_said.1,
        });
    }
    Ok(summary)
}

fn spawn(tool: &Path, tmp: &Path) -> Result<Child, Error> {
    let mut cmd = Command::new(tool);
    cmd.args(["--quiet", "--no-skip", "--force", "--num-jobs", &jobs()])
        .args(SQUASHFS_COMPRESSOR)
        .arg(tmp)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(dir) = tmp.parent() {
        cmd.current_dir(dir);
    }
    // tar2sqfs must not outlive us: a killed conversion then leaves only its temporary file.
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::Tar2sqfsMissing
        } else {
            Error::io(format!("starting {}", tool.display()), e)
        }
    })
}

/// tar2sqfs's compressor threads: one per CPU (its default is one in all), so that compressing
/// keeps up with our inflating and rewriting the layer on another core.
fn jobs() -> String {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8)
        .to_string()
}

fn keep_tail(mut r: impl Read) -> String {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                all.extend_from_slice(&buf[..n]);
                if all.len() > 2 * STDERR_KEEP {
                    all.drain(..all.len() - STDERR_KEEP);
                }
            }
        }
    }
    let start = all.len().saturating_sub(STDERR_KEEP);
    String::from_utf8_lossy(&all[start..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversion_past_its_time_limit_fails_saying_so() {
        let limit = Duration::from_secs(60);
        let mut late = Deadline {
            inner: io::repeat(0),
            deadline: Instant::now() - Duration::from_millis(1),
            limit,
        };
        let e = late.read(&mut [0; 16]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains(TIME_LIMIT_VAR), "{e}");
        let mut early = Deadline {
            inner: io::repeat(0),
            deadline: Instant::now() + limit,
            limit,
        };
        assert_eq!(early.read(&mut [1; 16]).unwrap(), 16);
    }
}
