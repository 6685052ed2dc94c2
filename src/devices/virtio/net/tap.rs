//! The tap backend: a tap interface (an existing one, or a new one that lives exactly as long
//! as its descriptor, the VM's), opened through /dev/net/tun (inside a network
//! namespace if asked) with the 12-byte virtio-net header on, so the guest's checksum and
//! segmentation offloads pass through the kernel unchanged.
//!
//! [`open`] and [`set_offload`] are public because the QEMU backend hands the same kind of fd to
//! QEMU (`-netdev tap,fd=N`).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::backend::Sent;
use super::{Error, MAX_FRAME_LEN, VNET_HDR_LEN};

/// Longest interface name (IFNAMSIZ less the NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Every offload flag we might ask of a tap, best first when probing.
const PROBES: [libc::c_uint; 4] = [
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN | libc::TUN_F_UFO,
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN,
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6,
    libc::TUN_F_CSUM,
];

fn where_(netns: Option<&Path>) -> String {
    match netns {
        Some(p) => format!("the network namespace {}", p.display()),
        None => "our network namespace".into(),
    }
}

/// Opens the tap `name` (in the network namespace file `netns`, if given; made there if missing,
/// and then gone with the last descriptor, so a killed VM leaves none behind) and returns
/// its queue fd: non-blocking, close-on-exec, with the 12-byte `virtio_net_hdr_v1` before every
/// frame both ways, and no offloads until [`set_offload`] turns some on.
///
/// A tap fd belongs to the namespace it was opened in, so for `netns` a short-lived thread
/// enters the namespace, opens the tap and ends; the rest of the process never moves.
pub fn open(name: &str, netns: Option<&Path>) -> Result<OwnedFd, Error> {
    check_name(name)?;
    let Some(ns_path) = netns else {
        return open_here(name, &where_(None));
    };
    let ns = File::open(ns_path).map_err(|source| Error::Netns {
        path: ns_path.to_owned(),
        source,
    })?;
    let name = name.to_owned();
    let place = where_(netns);
    let path = ns_path.to_owned();
    let thread = std::thread::Builder::new()
        .name("tap-open".into())
        .spawn(move || {
            // SAFETY: setns only changes this thread's network namespace; the fd is a valid
            // namespace file we own for the duration of the call.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(Error::Netns {
                    path,
                    source: io::Error::last_os_error(),
                });
            }
            open_here(&name, &place)
        })
        .map_err(Error::Thread)?;
    thread
        .join()
        .unwrap_or_else(|_| Err(Error::Thread(io::Error::other("the thread panicked"))))
}

fn check_name(name: &str) -> Result<(), Error> {
    let bad = name.is_empty()
        || name.len() > MAX_NAME_LEN
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace() || b == b':');
    if bad {
        return Err(Error::BadTapName(name.into()));
    }
    Ok(())
}

/// Opens the tap in the calling thread's network namespace.
fn open_here(name: &str, place: &str) -> Result<OwnedFd, Error> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(Error::OpenTun)?;

    // SAFETY: ifreq is plain old data; all zeros is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads (and may update) the ifreq we pass, which lives across the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } != 0 {
        let e = io::Error::last_os_error();
        let why = match e.raw_os_error() {
            Some(libc::EINVAL) => format!(
                "it is not a tap device (a tun device, a multi-queue tap or another kind of \
                 interface) ({e})"
            ),
            Some(libc::EBUSY) => format!("another process already has it open ({e})"),
            Some(libc::EPERM) => format!(
                "permission denied: it belongs to another user or group (give it to this user \
                 with `ip tuntap add mode tap vnet_hdr user USER name {name}`) ({e})"
            ),
            _ => e.to_string(),
        };
        return Err(Error::Attach {
            name: name.into(),
            where_: place.into(),
            why,
        });
    }
    let hdr_len = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which is valid during the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } != 0 {
        return Err(Error::TapSetup {
            name: name.into(),
            what: "setting a 12-byte virtio-net header (TUNSETVNETHDRSZ)",
            source: io::Error::last_os_error(),
        });
    }
    Ok(file.into())
}

/// Tells the tap which offloads the guest takes (TUNSETOFFLOAD with `TUN_F_*` flags): with
/// `TUN_F_CSUM` it may hand over partially checksummed frames, with `TUN_F_TSO4` large TCP
/// segments, and so on. 0 asks for whole, checksummed frames only.
pub fn set_offload(fd: BorrowedFd<'_>, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
    if unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The richest set of `TUN_F_*` offload flags the tap accepts (0 if none); leaves the tap with
/// none set.
pub fn supported_offloads(fd: BorrowedFd<'_>) -> libc::c_uint {
    let found = PROBES
        .into_iter()
        .find(|flags| set_offload(fd, *flags).is_ok())
        .unwrap_or(0);
    if let Err(e) = set_offload(fd, 0) {
        tracing::debug!("virtio-net: clearing the tap's offloads: {e}");
    }
    found
}

/// An open tap as the device uses it: one frame read ahead at most, one frame the tap would not
/// take yet at most.
pub struct Tap {
    file: File,
    name: String,
    offloads: libc::c_uint,
    /// The last frame read, header first; `rx_len` bytes of it are valid (0: none).
    rx: Box<[u8]>,
    rx_len: usize,
    /// A frame (header first) written when the tap said EAGAIN; empty when none.
    pending: Vec<u8>,
    /// Frames the tap refused (a header the guest filled in wrongly, say).
    refused: u64,
}

/// What the device reports when the tap stops working; `what` is "reading from" or "writing to".
fn fatal(name: &str, what: &str, e: &io::Error) -> String {
    format!("{what} the tap device {name:?} failed: {e} (was it deleted?)")
}

impl Tap {
    /// Wraps a fd from [`open`] for the interface `name`, and finds the offloads it accepts.
    pub fn new(fd: OwnedFd, name: &str) -> Self {
        let offloads = supported_offloads(fd.as_fd());
        Tap {
            file: File::from(fd),
            name: name.into(),
            offloads,
            rx: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN].into_boxed_slice(),
            rx_len: 0,
            pending: Vec::new(),
            refused: 0,
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `TUN_F_*` flags it accepted when probed.
    pub fn offloads(&self) -> libc::c_uint {
        self.offloads
    }

    /// The queue fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Writes one frame, header first; a frame the tap will not take yet is kept.
    pub fn send(&mut self, frame: &[u8]) -> Result<Sent, String> {
        loop {
            return match (&self.file).write(frame) {
                Ok(_) => Ok(Sent::Done),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.pending.clear();
                    self.pending.extend_from_slice(frame);
                    Ok(Sent::Queued)
                }
                Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                    Err(fatal(&self.name, "writing to", &e))
                }
                // The kernel refused this frame (a bad header, say): drop it and go on.
                Err(e) => Ok(Sent::Dropped(e)),
            };
        }
    }

    /// Retries the kept frame; returns whether nothing is left.
    pub fn flush(&mut self) -> Result<bool, String> {
        if self.pending.is_empty() {
            return Ok(true);
        }
        loop {
            match (&self.file).write(&self.pending) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                    return Err(fatal(&self.name, "writing to", &e))
                }
                Err(e) => {
                    self.refused += 1;
                    // Powers of two only: the guest decides what it sends, and may flood.
                    if self.refused.is_power_of_two() {
                        tracing::warn!(
                            "virtio-net: the tap {:?} refused a frame: {e} ({} so far)",
                            self.name,
                            self.refused
                        );
                    }
                    break;
                }
            }
        }
        self.pending.clear();
        Ok(true)
    }

    /// Whether a frame waits for the tap to take it.
    pub fn tx_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The next frame from the tap, header first, reading one if none is kept. It is longer
    /// than the header.
    pub fn rx_frame(&mut self) -> Result<Option<&[u8]>, String> {
        while self.rx_len == 0 {
            match (&self.file).read(&mut self.rx) {
                // Runts cannot come from the kernel; skip rather than trust them.
                Ok(n) if n <= VNET_HDR_LEN => {
                    tracing::debug!("virtio-net: skipping a {n}-byte read from the tap");
                }
                Ok(n) => self.rx_len = n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(fatal(&self.name, "reading from", &e)),
            }
        }
        Ok(Some(&self.rx[..self.rx_len]))
    }

    /// Forgets the frame [`Tap::rx_frame`] returned.
    pub fn rx_consume(&mut self) {
        self.rx_len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_system_call() {
        for name in [
            "",
            "a/b",
            "has space",
            "sixteen-bytes-xx",
            ".",
            "..",
            "a:b",
            "nul\0",
        ] {
            let e = open(name, None).unwrap_err();
            assert!(matches!(e, Error::BadTapName(_)), "{name:?}: {e}");
        }
    }

    #[test]
    fn a_missing_namespace_file_is_named() {
        let e = open("tap0", Some(Path::new("/nonexistent/netns/x"))).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Netns { .. }), "{msg}");
        assert!(msg.contains("/nonexistent/netns/x"), "{msg}");
    }
}
