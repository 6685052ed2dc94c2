//! Legacy PC devices on port I/O: COM1, the i8042 reset line and the boot-time marker.

mod boot_marker;
mod i8042;
mod serial;

pub use boot_marker::BootMarker;
pub use i8042::I8042;
pub use serial::Serial;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An interrupt line: an eventfd that KVM turns into a guest interrupt (irqfd).
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
