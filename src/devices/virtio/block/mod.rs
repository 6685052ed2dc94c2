//! virtio-blk: a raw disk image on the host as a block device in the guest (virtio 1.2, 5.2).
//!
//! Layers, each testable alone: [`request`] (descriptor chains to checked requests, no I/O),
//! [`disk`] (the image file, read and written straight from guest memory), [`serial`] (the id
//! the guest reads), [`device`] (the queue and the virtio face) and the event-loop glue in
//! `event_handler`.
//!
//! Requests are served on the device loop thread when the driver notifies the queue; the virtio
//! register callbacks (activate, reset, configuration reads) run on a vCPU thread under the same
//! device mutex.

pub mod device;
pub mod disk;
mod event_handler;
pub mod request;
pub mod serial;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

use thiserror::Error;

pub use device::Block;
pub use serial::SERIAL_BYTES;

/// Errors creating a block device. Each names the disk, since a VM may have several.
#[derive(Debug, Error)]
pub enum Error {
    /// The image cannot be opened (missing, no permission, a directory opened for writing).
    #[error("cannot open the disk image {path} {mode}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// "read-only" or "for reading and writing".
        mode: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The path names a directory.
    #[error("the disk image {0} is a directory; pass a raw disk image file")]
    Directory(PathBuf),
    /// The image's size cannot be found.
    #[error("cannot find the size of the disk image {path}: {source}")]
    Size {
        /// The image.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The serial does not fit the 20-byte id field.
    #[error("the disk serial {serial:?} is {len} bytes; a virtio-blk serial is at most {SERIAL_BYTES} bytes")]
    SerialTooLong {
        /// The serial.
        serial: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A NUL would end the serial early for the guest.
    #[error("the disk serial {0:?} contains a NUL byte")]
    SerialNul(String),
    /// An eventfd for the device.
    #[error("virtio-blk: cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
}
