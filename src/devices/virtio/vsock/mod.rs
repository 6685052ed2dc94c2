//! virtio-vsock in Firecracker's "hybrid" style: the guest's vsock ports meet host Unix sockets.
//!
//! - Host to guest: a host process connects to `uds_path` and writes `CONNECT <port>\n`; once the
//!   guest accepts, it reads `OK <host port>\n` and the socket is the stream.
//! - Guest to host: the guest connects to CID 2 port P; we connect to `<uds_path>_P`, answering
//!   RESPONSE on success and RST otherwise.
//!
//! Layers, each testable alone: [`packet`] (header codec and checks), [`chain`] (packets in
//! descriptor chains), [`credit`] (flow control), [`handshake`] (the CONNECT line),
//! [`connection`] (one stream and its host socket), [`muxer`] (the connection table),
//! [`rings`] (packets between the rings and the muxer), [`device`] (the virtio face on our
//! VMM) and its event-loop glue in `event_handler`, and [`vhost_user`] (the same device served
//! to QEMU, for the `qemu` backend).
//!
//! On our VMM all of it runs on the device loop thread, except the virtio register callbacks
//! (activate, reset, configuration reads), which run on a vCPU thread under the same device
//! mutex; under QEMU it runs on the vhost-user library's worker thread.

pub mod chain;
pub mod connection;
pub mod credit;
pub mod device;
mod event_handler;
pub mod handshake;
pub mod muxer;
pub mod packet;
pub mod rings;
pub mod unix;
pub mod vhost_user;

#[cfg(test)]
mod tests;

use thiserror::Error;

pub use device::Vsock;

/// Errors creating the vsock device.
#[derive(Debug, Error)]
pub enum Error {
    /// The listening socket.
    #[error("vsock: {0}")]
    Listen(#[from] unix::ListenError),
    /// An eventfd for the device.
    #[error("vsock: cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
}
