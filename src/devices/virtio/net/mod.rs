//! virtio-net: the guest's Ethernet interface (virtio 1.2, 5.1), one receive and one transmit
//! queue, whose frames go to a tap device or to a user-mode network stack (passt) on a Unix
//! stream socket.
//!
//! Layers, each testable alone: [`chain`] (descriptor chains to checked frames and receive
//! buffers, no I/O), [`rx`] (a frame written into one or, with mergeable buffers, several
//! receive chains), [`config`] (feature bits and configuration space), [`tap`] and [`stream`]
//! (the two host ends, with the framing and the partial reads and writes of each), [`backend`]
//! (the one face the device sees of either), [`device`] (the queues and the virtio face) and the
//! event-loop glue in `event_handler`.
//!
//! Frames are moved on the device loop thread; the virtio register callbacks (activate, reset,
//! configuration reads) run on a vCPU thread under the same device mutex. Nothing grows without
//! bound: at most one transmit frame waits for the backend, and frames received while the guest
//! has no buffers wait in a fixed-size buffer while the backend is no longer read.

pub mod backend;
pub mod chain;
pub mod config;
pub mod device;
mod event_handler;
pub mod rx;
pub mod stream;
pub mod tap;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

use thiserror::Error;

pub use device::Net;

/// Size of `struct virtio_net_hdr_v1`, which precedes every frame in the queues: VERSION_1 is
/// always negotiated, so `num_buffers` is always there (virtio 1.2, 5.1.6).
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// Length of an Ethernet header; shorter frames are refused.
pub const ETH_HLEN: usize = 14;
/// Length of a VLAN tag, which a frame may carry on top of the MTU.
pub const VLAN_HLEN: usize = 4;
/// Largest Ethernet frame either way: a 64 KiB segmentation-offload packet (the IP length field
/// is 16 bits) behind an Ethernet header and a VLAN tag.
pub const MAX_FRAME_LEN: usize = 65_535 + ETH_HLEN + VLAN_HLEN;
/// Entries in each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Least MTU a guest accepts (Linux ignores a smaller one): IPv4's minimum datagram.
pub const MIN_MTU: u16 = 68;

/// Told once, with a one-line message naming the backend, when the backend fails while the VM
/// runs (passt exits, a bad frame length on its socket, the tap vanishes); the VMM stops the VM
/// with it.
pub type FailureHook = Box<dyn Fn(String) + Send>;

/// Errors creating a network device; each says which host resource and what to do about it.
#[derive(Debug, Error)]
pub enum Error {
    /// The MAC is a multicast (or broadcast) address, or all zeros, which no interface may own.
    #[error(
        "the MAC address {0} is not a unicast address (its first byte must be even and it \
         must not be all zeros): pick another MAC"
    )]
    BadMac(String),
    /// The MTU is below what any guest accepts.
    #[error("an MTU of {0} is too small: the guest needs at least {MIN_MTU}")]
    MtuTooSmall(u16),
    /// The network namespace file cannot be opened or entered.
    #[error("cannot enter the network namespace {path}: {source}")]
    Netns {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The name cannot be an interface name.
    #[error("{0:?} is not a valid interface name (1 to 15 bytes, no '/', no whitespace)")]
    BadTapName(String),
    /// /dev/net/tun cannot be opened.
    #[error("cannot open /dev/net/tun: {0} (a tap needs the tun module and CAP_NET_ADMIN, or a tap owned by this user)")]
    OpenTun(std::io::Error),
    /// The kernel refused to attach to the tap.
    #[error("cannot attach to the tap device {name:?} in {where_}: {why}")]
    Attach {
        /// The interface name.
        name: String,
        /// Where it is.
        where_: String,
        /// The kernel's refusal, explained.
        why: String,
    },
    /// Turning on the virtio-net header or non-blocking mode failed.
    #[error("cannot set up the tap device {name:?}: {what}: {source}")]
    TapSetup {
        /// The interface name.
        name: String,
        /// Which step.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The user-mode network stack is not listening.
    #[error("cannot connect to the network backend socket {path} (is passt running?): {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The socket pair to the backend cannot be used.
    #[error("cannot use the socket pair to the network backend: {0}")]
    SocketPair(std::io::Error),
    /// The descriptor handed over in the plan cannot be duplicated.
    #[error("cannot duplicate the network backend's descriptor: {0}")]
    Dup(std::io::Error),
    /// The helper thread that enters the namespace could not run.
    #[error("cannot start a thread to open the tap device: {0}")]
    Thread(std::io::Error),
    /// An eventfd for the device.
    #[error("virtio-net: cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
}
