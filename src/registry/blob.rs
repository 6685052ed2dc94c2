//! A blob download as a reader that survives dropped connections: when the body ends early or
//! fails, the rest is asked for again with `Range: bytes=N-` (or, from a registry that ignores
//! ranges, the whole blob again with the first N bytes skipped), a bounded number of times.
//! The reader never checks content: the store hashes every byte it is given.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ureq::http::Method;

use super::client::{header, Client, Payload};
use super::Error;
use crate::image::BlobRef;

/// Times one blob's download is resumed before the pull fails.
pub(crate) const MAX_RESUMES: u32 = 5;
/// A download slower than this many bytes in [`STALL_WINDOW`] is treated as broken off (and
/// resumed): a registry trickling a byte a minute cannot hold a pull forever.
const STALL_BYTES: u64 = 64 << 10;
/// See [`STALL_BYTES`].
const STALL_WINDOW: Duration = Duration::from_secs(120);

/// The blob `blob` of `repository`, read from the registry.
pub(crate) struct BlobReader<'a> {
    client: &'a Client,
    path: String,
    size: u64,
    offset: u64,
    body: Option<ureq::BodyReader<'static>>,
    resumes: u32,
    cancel: &'a AtomicBool,
    /// The registry's own answer, when that is what stopped the download (the reader can only
    /// return an `io::Error`).
    error: Option<Error>,
    /// Start of the current throughput window and the offset then.
    window: (Instant, u64),
}

impl<'a> BlobReader<'a> {
    /// A reader of `blob`; it stops with an error once `cancel` is set (another layer failed).
    pub(crate) fn new(
        client: &'a Client,
        repository: &str,
        blob: &BlobRef,
        cancel: &'a AtomicBool,
    ) -> BlobReader<'a> {
        BlobReader {
            client,
            path: format!("/v2/{repository}/blobs/{}", blob.digest),
            size: blob.size,
            offset: 0,
            body: None,
            resumes: 0,
            cancel,
            error: None,
            window: (Instant::now(), 0),
        }
    }

    /// The registry's answer that stopped the download, if that is what did.
    pub(crate) fn take_error(&mut self) -> Option<Error> {
        self.error.take()
    }

    /// How many times the download was resumed.
    pub(crate) fn resumes(&self) -> u32 {
        self.resumes
    }

    fn open(&mut self) -> Result<(), Error> {
        let mut headers = Vec::new();
        if self.offset > 0 {
            headers.push(("range", format!("bytes={}-", self.offset)));
        }
        let resp = self
            .client
            .request(&Method::GET, &self.path, &headers, Payload::Empty)?;
        let what = || format!("blob {}", self.path.rsplit('/').next().unwrap_or_default());
        let mut skip = 0;
        match resp.status().as_u16() {
            200 => skip = self.offset, // the range was ignored: the whole blob again
            206 if self.offset > 0 => {
                let start = header(&resp, "content-range").and_then(|v| {
                    let v = v.trim().strip_prefix("bytes ")?;
                    v.split('-').next()?.trim().parse::<u64>().ok()
                });
                if start != Some(self.offset) {
                    return Err(Error::Protocol {
                        registry: self.client.registry().to_string(),
                        what: what(),
                        reason: format!(
                            "asked for bytes from {}, got a range starting at {start:?}",
                            self.offset
                        ),
                    });
                }
            }
            _ => return Err(self.client.status_error(resp, &what())),
        }
        let mut body = resp.into_body().into_reader();
        if skip > 0 {
            let skipped = io::copy(&mut (&mut body).take(skip), &mut io::sink())
                .map_err(|e| self.client.unreachable(ureq::Error::Io(e)))?;
            if skipped < skip {
                return Err(self
                    .client
                    .unreachable(ureq::Error::Io(io::ErrorKind::UnexpectedEof.into())));
            }
        }
        self.body = Some(body);
        self.window = (Instant::now(), self.offset);
        Ok(())
    }

    /// Counts a resume, failing once there were too many.
    fn resume(&mut self, why: String) -> io::Result<()> {
        self.body = None;
        self.resumes += 1;
        if self.resumes > MAX_RESUMES {
            return Err(io::Error::other(format!(
                "the download broke off {} times, the last at byte {} of {}: {why}",
                self.resumes, self.offset, self.size
            )));
        }
        tracing::info!(
            path = self.path,
            offset = self.offset,
            why,
            "resuming a blob download"
        );
        std::thread::sleep(Duration::from_millis(250 * u64::from(self.resumes)));
        Ok(())
    }
}

impl Read for BlobReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(io::Error::other("stopped: another layer failed"));
            }
            if self.offset >= self.size || buf.is_empty() {
                return Ok(0);
            }
            if self.body.is_none() {
                match self.open() {
                    Ok(()) => {}
                    Err(e @ Error::Unreachable { .. }) => {
                        self.resume(e.to_string())?;
                        continue;
                    }
                    Err(e) => {
                        let io = io::Error::other(e.to_string());
                        self.error = Some(e);
                        return Err(io);
                    }
                }
            }
            let Some(body) = self.body.as_mut() else {
                continue;
            };
            let room = buf.len().min((self.size - self.offset) as usize);
            match body.read(&mut buf[..room]) {
                Ok(0) => self.resume("the connection closed early".into())?,
                Ok(n) => {
                    self.offset += n as u64;
                    let (since, at) = self.window;
                    if since.elapsed() >= STALL_WINDOW {
                        let slow = self.offset - at < STALL_BYTES;
                        self.window = (Instant::now(), self.offset);
                        if slow {
                            // Keep what came; ask again for the rest on a new connection.
                            self.body = None;
                            self.resumes += 1;
                            if self.resumes > MAX_RESUMES {
                                return Err(io::Error::other(format!(
                                    "the download stalled (under {STALL_BYTES} bytes in {STALL_WINDOW:?}) {} times",
                                    self.resumes
                                )));
                            }
                        }
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.resume(e.to_string())?,
            }
        }
    }
}
