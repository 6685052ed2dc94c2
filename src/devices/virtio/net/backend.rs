//! The host end of the device, whichever it is: frames go out with [`Backend::send`] and come
//! in with [`Backend::rx_frame`], always as the virtio-net header plus the Ethernet frame. The
//! tap takes and gives the header as is; for the stream it is dropped on the way out and zeroed
//! on the way in.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use super::stream::Stream;
use super::tap::{self, Tap};
use super::{config, Error, VNET_HDR_LEN};
use crate::plan::NetBackend;

/// What became of a frame handed to the backend.
#[derive(Debug)]
pub enum Sent {
    /// Gone to the host.
    Done,
    /// The backend kept it (all or part) until its fd is writable: send no more until
    /// [`Backend::flush`] says it is through.
    Queued,
    /// The backend refused this frame alone (the tap rejected its header, say); go on.
    Dropped(io::Error),
}

/// A received frame: its virtio-net header and the Ethernet frame.
pub struct RxFrame<'a> {
    /// The header as the host gave it (a tap fills it in; a stream has none: zeros).
    pub hdr: [u8; VNET_HDR_LEN],
    /// The Ethernet frame.
    pub frame: &'a [u8],
}

/// The host end of the device.
pub enum Backend {
    /// A tap device.
    Tap(Tap),
    /// A stream socket to passt.
    Stream(Stream),
}

impl Backend {
    /// Opens what the plan names: attaches to the tap, connects to the socket, or takes its own
    /// descriptor for the socket pair handed over.
    pub fn open(plan: &NetBackend) -> Result<Self, Error> {
        match plan {
            NetBackend::Tap { name, netns } => {
                let fd = tap::open(name, netns.as_deref())?;
                Ok(Backend::Tap(Tap::new(fd, name)))
            }
            NetBackend::OpenTap { name, fd } => {
                let fd = fd.0.try_clone().map_err(Error::Dup)?;
                Ok(Backend::Tap(Tap::new(fd, name)))
            }
            NetBackend::Stream { socket } => Ok(Backend::Stream(Stream::connect(socket)?)),
            NetBackend::Connected(shared) => {
                // Our own descriptor for it: the plan keeps its copy, and may be used again.
                let sock = UnixStream::from(shared.0.try_clone().map_err(Error::Dup)?);
                Ok(Backend::Stream(
                    Stream::new(sock, None).map_err(Error::SocketPair)?,
                ))
            }
        }
    }

    /// The fd the device loop watches.
    pub fn fd(&self) -> RawFd {
        match self {
            Backend::Tap(t) => t.fd().as_raw_fd(),
            Backend::Stream(s) => s.fd().as_raw_fd(),
        }
    }

    /// The feature bits the device offers with this backend.
    pub fn features(&self) -> u64 {
        match self {
            Backend::Tap(t) => config::offered_features(Some(t.offloads())),
            Backend::Stream(_) => config::offered_features(None),
        }
    }

    /// Tells the host which offloads the driver `acked` (only a tap cares).
    pub fn set_guest_offloads(&self, acked: u64) -> io::Result<()> {
        match self {
            Backend::Tap(t) => tap::set_offload(t.fd(), config::tun_offloads(acked)),
            Backend::Stream(_) => Ok(()),
        }
    }

    /// Names the backend in messages: `tap "tap0"`, `passt socket /run/x.sock` or `passt socket
    /// pair`.
    pub fn describe(&self) -> String {
        match self {
            Backend::Tap(t) => format!("tap {:?}", t.name()),
            Backend::Stream(s) => format!("passt {}", s.socket_name()),
        }
    }

    /// What to report when the fd hangs up or errs.
    pub fn hang_up_message(&self) -> String {
        match self {
            Backend::Tap(t) => format!("the tap device {:?} went away (was it deleted?)", t.name()),
            Backend::Stream(s) => s.closed_message(),
        }
    }

    /// Sends one frame given as the guest wrote it: the header, then the Ethernet frame. An
    /// `Err` is fatal: the backend is unusable.
    pub fn send(&mut self, packet: &[u8]) -> Result<Sent, String> {
        match self {
            Backend::Tap(t) => t.send(packet),
            Backend::Stream(s) => s.send(&packet[VNET_HDR_LEN.min(packet.len())..]),
        }
    }

    /// Sends what is left of a queued frame; returns whether nothing is left.
    pub fn flush(&mut self) -> Result<bool, String> {
        match self {
            Backend::Tap(t) => t.flush(),
            Backend::Stream(s) => s.flush(),
        }
    }

    /// Whether a frame waits for the backend to take it.
    pub fn tx_pending(&self) -> bool {
        match self {
            Backend::Tap(t) => t.tx_pending(),
            Backend::Stream(s) => s.tx_pending(),
        }
    }

    /// The next received frame, kept until [`Backend::rx_consume`]; `None` when the host has
    /// nothing now. An `Err` is fatal.
    pub fn rx_frame(&mut self) -> Result<Option<RxFrame<'_>>, String> {
        match self {
            Backend::Tap(t) => Ok(t.rx_frame()?.map(|packet| {
                let (hdr, frame) = packet.split_at(VNET_HDR_LEN);
                let mut h = [0u8; VNET_HDR_LEN];
                h.copy_from_slice(hdr);
                RxFrame { hdr: h, frame }
            })),
            Backend::Stream(s) => Ok(s.rx_frame()?.map(|frame| RxFrame {
                hdr: [0; VNET_HDR_LEN],
                frame,
            })),
        }
    }

    /// Forgets the frame [`Backend::rx_frame`] returned (delivered or dropped).
    pub fn rx_consume(&mut self) {
        match self {
            Backend::Tap(t) => t.rx_consume(),
            Backend::Stream(s) => s.rx_consume(),
        }
    }

    /// Whether this is a stream socket (which reports its peer's shutdown).
    pub fn is_stream(&self) -> bool {
        matches!(self, Backend::Stream(_))
    }
}
