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
//! [`device`] (queues and the virtio face) and the event-loop glue in `event_handler`.
//!
//! All of it runs on the device loop thread, except the virtio register callbacks (activate,
//! reset, configuration reads), which run on a vCPU thread under the same device mutex.

pub mod chain;
pub mod connection;
pub mod credit;
pub mod device;
mod event_handler;
pub mod handshake;
pub mod muxer;
pub mod packet;
pub mod unix;

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
