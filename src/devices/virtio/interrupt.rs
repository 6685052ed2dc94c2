//! A virtio device's interrupt line: an eventfd that KVM injects as the device's GSI (irqfd), and
//! the InterruptStatus bits the driver reads to learn why it was interrupted.
//!
//! The device sets bits and writes the eventfd from the device loop; the transport reads and
//! acknowledges bits from vCPU threads. Atomics keep both sides lock-free.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use vmm_sys_util::eventfd::EventFd;

struct Line {
    irqfd: EventFd,
    status: AtomicU32,
    needs_reset: AtomicBool,
}

/// Shared handle on one device's interrupt line; clones raise the same line.
#[derive(Clone)]
pub struct Interrupt(Arc<Line>);

impl Interrupt {
    /// Wraps `irqfd`, which the caller has registered with KVM for the device's GSI.
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt(Arc::new(Line {
            irqfd,
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
        }))
    }

    /// The eventfd KVM listens on.
    pub fn irqfd(&self) -> &EventFd {
        &self.0.irqfd
    }

    /// Tells the driver that a used ring has new entries.
    pub fn signal_used_queue(&self) {
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// Marks the device broken (DEVICE_NEEDS_RESET) and tells the driver through a
    /// configuration-change interrupt, as virtio 1.2 (2.1.2) asks.
    pub fn signal_needs_reset(&self) {
        self.0.needs_reset.store(true, Ordering::SeqCst);
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.0.status.fetch_or(bit, Ordering::SeqCst);
        // A full counter (2^64 - 2 pending writes) still has the line raised, so the error is
        // harmless; anything else means KVM's side is gone, which teardown reports.
        if let Err(e) = self.0.irqfd.write(1) {
            tracing::debug!("virtio interrupt: {e}");
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.0.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: the driver has handled `bits`.
    pub fn ack(&self, bits: u32) {
        self.0.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Whether the device asked for a reset since the last [`Interrupt::reset`].
    pub fn needs_reset(&self) -> bool {
        self.0.needs_reset.load(Ordering::SeqCst)
    }

    /// Device reset: no pending causes, no reset request.
    pub fn reset(&self) {
        self.0.status.store(0, Ordering::SeqCst);
        self.0.needs_reset.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn bits_are_set_acked_and_the_line_raised() {
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        irq.signal_used_queue();
        assert_eq!(irq.status(), 1);
        assert_eq!(irq.irqfd().read().unwrap(), 1);
        irq.signal_needs_reset();
        assert_eq!(irq.status(), 3);
        assert!(irq.needs_reset());
        irq.ack(1);
        assert_eq!(irq.status(), 2);
        irq.reset();
        assert_eq!(irq.status(), 0);
        assert!(!irq.needs_reset());
    }
}
