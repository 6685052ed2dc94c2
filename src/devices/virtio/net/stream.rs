//! The stream backend: a Unix stream socket to a user-mode network stack (passt), connected to
//! its listening path or handed over already connected, each frame a 32-bit big-endian length
//! then the Ethernet frame, with no virtio-net header (passt's and QEMU's `-netdev stream`
//! framing).
//!
//! Both directions are non-blocking and survive partial transfers: [`FrameReader`] reassembles
//! frames from reads of any size, and a frame the socket takes only in part keeps its tail until
//! the socket is writable again.

use std::io::{self, IoSlice, Read};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::sys::socket::{sendmsg, MsgFlags};

use super::backend::Sent;
use super::{Error, MAX_FRAME_LEN};

/// Bytes of the length before each frame.
pub const LEN_PREFIX: usize = 4;
/// Longest frame sent: passt takes no more (its L2_MAX_LEN_PASST) and resets the connection on
/// a longer one, which would end the VM; such a frame is dropped instead.
pub const MAX_SEND_LEN: usize = u16::MAX as usize;
/// Size of the receive buffer: room for the largest frame even with the start of the next one
/// in front of it, so one read often brings several small frames.
pub const READ_BUFFER: usize = 2 * (LEN_PREFIX + MAX_FRAME_LEN);

/// The peer broke the framing; nothing after it can be trusted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FramingError {
    /// A length of 0, or more than any Ethernet frame.
    #[error("it sent a frame length of {0} bytes (allowed: 1 to {MAX_FRAME_LEN})")]
    BadLength(u32),
}

/// The length prefix of a `len`-byte frame.
pub fn prefix(len: usize) -> [u8; LEN_PREFIX] {
    (len as u32).to_be_bytes()
}

/// Reassembles frames from a byte stream read in pieces of any size.
pub struct FrameReader {
    buf: Box<[u8]>,
    /// `buf[start..end]` holds bytes read and not yet consumed.
    start: usize,
    end: usize,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader {
            buf: vec![0u8; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }
}

impl FrameReader {
    /// Where the complete frame at the front lies in the buffer, if one is there.
    fn frame_range(&self) -> Result<Option<Range<usize>>, FramingError> {
        let have = &self.buf[self.start..self.end];
        let Some(len) = have.first_chunk::<LEN_PREFIX>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*len);
        if len == 0 || len as usize > MAX_FRAME_LEN {
            return Err(FramingError::BadLength(len));
        }
        let body = self.start + LEN_PREFIX;
        let end = body + len as usize;
        Ok((end <= self.end).then_some(body..end))
    }

    /// The complete frame at the front, if one has arrived.
    pub fn frame(&self) -> Result<Option<&[u8]>, FramingError> {
        Ok(self.frame_range()?.map(|r| &self.buf[r]))
    }

    /// Drops the frame at the front (if there is a complete one).
    pub fn consume(&mut self) {
        if let Ok(Some(r)) = self.frame_range() {
            self.start = r.end;
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            }
        }
    }

    /// Bytes read and not consumed.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Reads once from `src` into the free space; returns what `read` returned (0 at end of
    /// stream). Call only when no complete frame is at the front: the buffer then holds less
    /// than a frame, so there is always room.
    pub fn fill(&mut self, mut src: impl Read) -> io::Result<usize> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = src.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }
}

/// A connected stream socket as the device uses it.
pub struct Stream {
    sock: UnixStream,
    /// Where it was connected to; `None` for one end of a socket pair handed over.
    path: Option<PathBuf>,
    reader: FrameReader,
    /// What is left of a frame (prefix included) the socket took only in part.
    pending: Vec<u8>,
    pending_off: usize,
}

impl Stream {
    /// Connects to the backend listening on `path`.
    pub fn connect(path: &Path) -> Result<Self, Error> {
        let err = |source| Error::Connect {
            path: path.to_owned(),
            source,
        };
        let sock = UnixStream::connect(path).map_err(err)?;
        Stream::new(sock, Some(path)).map_err(err)
    }

    /// Uses an already connected socket; `path`, if it has one, names it in messages.
    pub fn new(sock: UnixStream, path: Option<&Path>) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        Ok(Stream {
            sock,
            path: path.map(Path::to_owned),
            reader: FrameReader::default(),
            pending: Vec::new(),
            pending_off: 0,
        })
    }

    /// The socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// The socket in messages: `socket PATH`, or `socket pair` for one handed over.
    pub fn socket_name(&self) -> String {
        match &self.path {
            Some(p) => format!("socket {}", p.display()),
            None => "socket pair".into(),
        }
    }

    /// What the device reports when the peer is gone.
    pub fn closed_message(&self) -> String {
        format!(
            "the network backend (passt) closed its {}",
            self.socket_name()
        )
    }

    fn write_error(&self, e: &io::Error) -> String {
        match e.raw_os_error() {
            Some(libc::EPIPE | libc::ECONNRESET) => self.closed_message(),
            _ => format!(
                "writing to the network backend's {}: {e}",
                self.socket_name()
            ),
        }
    }

    /// Writes `parts` with one system call, never raising SIGPIPE.
    fn write_parts(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        loop {
            match sendmsg::<()>(
                self.sock.as_raw_fd(),
                parts,
                &[],
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            ) {
                Err(nix::errno::Errno::EINTR) => {}
                r => return r.map_err(io::Error::from),
            }
        }
    }

    /// Writes one frame (no virtio-net header) with its length; whatever the socket does not
    /// take now is kept for [`Stream::flush`].
    pub fn send(&mut self, frame: &[u8]) -> Result<Sent, String> {
        if frame.len() > MAX_SEND_LEN {
            return Ok(Sent::Dropped(io::Error::other(format!(
                "a {}-byte frame is longer than the {MAX_SEND_LEN} bytes passt takes",
                frame.len()
            ))));
        }
        let len = prefix(frame.len());
        let total = LEN_PREFIX + frame.len();
        let written = match self.write_parts(&[IoSlice::new(&len), IoSlice::new(frame)]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(self.write_error(&e)),
        };
        if written == total {
            return Ok(Sent::Done);
        }
        self.pending.clear();
        self.pending_off = 0;
        if written < LEN_PREFIX {
            self.pending.extend_from_slice(&len[written..]);
            self.pending.extend_from_slice(frame);
        } else {
            self.pending
                .extend_from_slice(&frame[written - LEN_PREFIX..]);
        }
        Ok(Sent::Queued)
    }

    /// Writes what is left of a partly sent frame; returns whether nothing is left.
    pub fn flush(&mut self) -> Result<bool, String> {
        while self.pending_off < self.pending.len() {
            let rest = &self.pending[self.pending_off..];
            match self.write_parts(&[IoSlice::new(rest)]) {
                Ok(n) => self.pending_off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(self.write_error(&e)),
            }
        }
        self.pending.clear();
        self.pending_off = 0;
        Ok(true)
    }

    /// Whether part of a frame waits for the socket.
    pub fn tx_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The next complete frame, reading as needed; `None` when the socket has no more now.
    pub fn rx_frame(&mut self) -> Result<Option<&[u8]>, String> {
        loop {
            match self.reader.frame_range() {
                Ok(Some(_)) => break,
                Ok(None) => {}
                Err(e) => {
                    return Err(format!(
                        "the network backend on its {} broke the frame protocol: {e}",
                        self.socket_name()
                    ))
                }
            }
            match self.reader.fill(&self.sock) {
                Ok(0) => return Err(self.closed_message()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => {
                    return Err(format!(
                        "reading from the network backend's {}: {e}",
                        self.socket_name()
                    ))
                }
            }
        }
        self.reader.frame().map_err(|e| e.to_string())
    }

    /// Forgets the frame [`Stream::rx_frame`] returned.
    pub fn rx_consume(&mut self) {
        self.reader.consume();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` to a reader `step` bytes per read; returns the frames seen.
    fn frames_in_steps(bytes: &[u8], step: usize) -> Result<Vec<Vec<u8>>, FramingError> {
        let mut r = FrameReader::default();
        let mut out = Vec::new();
        for chunk in bytes.chunks(step) {
            let n = r.fill(chunk).unwrap();
            assert_eq!(n, chunk.len());
            while let Some(f) = r.frame()? {
                out.push(f.to_vec());
                r.consume();
            }
        }
        assert_eq!(r.buffered(), 0, "nothing left over");
        Ok(out)
    }

    fn framed(frames: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for f in frames {
            v.extend_from_slice(&prefix(f.len()));
            v.extend_from_slice(f);
        }
        v
    }

    #[test]
    fn frames_arrive_whole_whatever_the_read_sizes() {
        let big = vec![0xabu8; 3000];
        let frames: [&[u8]; 3] = [b"first frame", &big, b"x"];
        let bytes = framed(&frames);
        for step in [1, 2, 3, 5, 7, 4096, bytes.len()] {
            let got = frames_in_steps(&bytes, step).unwrap();
            assert_eq!(got.len(), 3, "step {step}");
            for (g, want) in got.iter().zip(frames) {
                assert_eq!(g, want, "step {step}");
            }
        }
    }

    #[test]
    fn a_partial_length_prefix_is_not_a_frame() {
        let mut r = FrameReader::default();
        r.fill(&[0u8, 0][..]).unwrap();
        assert_eq!(r.frame(), Ok(None));
        r.fill(&[0u8, 3, b'a', b'b'][..]).unwrap();
        assert_eq!(r.frame(), Ok(None));
        r.fill(&[b'c'][..]).unwrap();
        assert_eq!(r.frame(), Ok(Some(&b"abc"[..])));
    }

    #[test]
    fn bad_lengths_are_protocol_errors() {
        for len in [0u32, MAX_FRAME_LEN as u32 + 1, u32::MAX] {
            let mut r = FrameReader::default();
            r.fill(&len.to_be_bytes()[..]).unwrap();
            assert_eq!(r.frame(), Err(FramingError::BadLength(len)));
        }
        let mut r = FrameReader::default();
        r.fill(&(MAX_FRAME_LEN as u32).to_be_bytes()[..]).unwrap();
        assert_eq!(r.frame(), Ok(None), "the largest frame is fine");
    }

    #[test]
    fn the_largest_frames_fit_back_to_back() {
        let big = vec![7u8; MAX_FRAME_LEN];
        let bytes = framed(&[&big, &big, b"tail"]);
        for step in [65_536, 100_000, READ_BUFFER] {
            let got = frames_in_steps(&bytes, step).unwrap();
            assert_eq!(got.len(), 3, "step {step}");
        }
    }

    #[test]
    fn a_frame_the_socket_takes_in_part_is_finished_by_flush() {
        let (a, mut b) = UnixStream::pair().unwrap();
        // A small send buffer, so a big frame cannot go in one write.
        nix::sys::socket::setsockopt(&a, nix::sys::socket::sockopt::SndBuf, &4096).unwrap();
        let mut s = Stream::new(a, Some(Path::new("test.sock"))).unwrap();
        let frame: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let frame = &frame[..MAX_SEND_LEN];
        assert!(matches!(s.send(frame), Ok(Sent::Queued)));
        assert!(s.tx_pending());
        b.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 8192];
        while got.len() < LEN_PREFIX + frame.len() {
            let _ = s.flush().unwrap();
            match b.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert!(s.flush().unwrap());
        assert!(!s.tx_pending());
        assert_eq!(got[..4], prefix(frame.len()));
        assert!(got[4..] == *frame);
    }

    #[test]
    fn frames_longer_than_passt_takes_are_dropped_not_sent() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut s = Stream::new(a, Some(Path::new("test.sock"))).unwrap();
        let e = match s.send(&vec![0u8; MAX_SEND_LEN + 1]) {
            Ok(Sent::Dropped(e)) => e.to_string(),
            other => panic!("{other:?}"),
        };
        assert!(e.contains("65536-byte frame"), "{e}");
        assert!(matches!(s.send(&vec![0u8; MAX_SEND_LEN]), Ok(Sent::Done)));
        b.set_nonblocking(true).unwrap();
        let mut got = vec![0u8; 4 + MAX_SEND_LEN + 1];
        let n = (&b).read(&mut got).unwrap();
        assert_eq!(
            got[..4],
            prefix(MAX_SEND_LEN),
            "only the second frame went out"
        );
        assert!(n <= 4 + MAX_SEND_LEN);
    }

    #[test]
    fn a_closed_peer_is_reported_both_ways() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut s = Stream::new(a, Some(Path::new("/run/passt.sock"))).unwrap();
        drop(b);
        let e = s.rx_frame().unwrap_err();
        assert_eq!(
            e,
            "the network backend (passt) closed its socket /run/passt.sock"
        );
        let e = s.send(b"0123456789abcdef").unwrap_err();
        assert_eq!(
            e,
            "the network backend (passt) closed its socket /run/passt.sock"
        );
    }
}
