//! Devices the guest reaches through port I/O or MMIO exits.

pub mod bus;
pub mod legacy;
pub mod virtio;

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// A new eventfd for the VMM: non-blocking, and close-on-exec, so that a helper spawned while
/// the VM is built (virtiofsd) never inherits a device's interrupt, kick or stop event.
pub fn event_fd() -> std::io::Result<EventFd> {
    EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
}

pub use bus::{Bus, BusDevice};
