//! virtio-fs through vhost-user (virtio 1.2, 5.11): a host directory shared with the guest, served
//! by a separate backend process (virtiofsd) that reads the queues and guest memory itself.
//!
//! We are the vhost-user frontend: [`backend`] (the socket: negotiation, starting and stopping
//! the rings), [`rings`] (the driver's queues checked and translated for the backend),
//! [`config`] (the tag), [`device`] (the virtio face) and the event-loop glue in
//! `event_handler` (interrupt relay and hang-up watch).
//!
//! Guest RAM must be shared memory the backend can map (`vmm::memory::create_shared`).

pub mod backend;
pub mod config;
pub mod device;
mod event_handler;
pub mod rings;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod virtiofsd_tests;

use thiserror::Error;

pub use backend::BackendError;
pub use config::TAG_BYTES;
pub use device::Fs;

/// Told once, with a one-line message naming the share, when the backend fails while the VM
/// runs; the VMM stops the VM with it.
pub type FailureHook = Box<dyn Fn(String) + Send>;

/// Errors creating a virtio-fs device.
#[derive(Debug, Error)]
pub enum Error {
    /// The tag is empty.
    #[error("the tag is empty; the guest mounts a share by its tag")]
    TagEmpty,
    /// The tag does not fit the config field.
    #[error("the tag {tag:?} is {len} bytes; a virtio-fs tag is at most {TAG_BYTES} bytes")]
    TagTooLong {
        /// The tag.
        tag: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A NUL would end the tag early for the guest.
    #[error("the tag {0:?} contains a NUL byte")]
    TagNul(String),
    /// The backend could not be reached or refused to set up.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// An eventfd for the device.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
}
