//! Virtio devices: the contract between a transport and a device ([`VirtioDevice`]), the
//! interrupt a device raises ([`Interrupt`]), the virtio-mmio transport ([`mmio`]) and the devices
//! themselves ([`vsock`], [`block`], [`fs`], [`net`]).
//!
//! Register accesses run on vCPU threads inside the transport; queue processing and host I/O run
//! on the device loop, which each device joins as an event-manager subscriber.

pub mod block;
pub mod fs;
pub mod interrupt;
pub mod mmio;
pub mod net;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_utils;

use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use interrupt::Interrupt;

/// VIRTIO_F_VERSION_1: the device follows virtio 1.x (modern) rules. Every transport offers it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Device status bits (virtio 1.2, 2.1), as the driver writes them.
pub mod status {
    use virtio_bindings::virtio_config as c;

    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is set up; the device may run.
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is over.
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// Device ids (virtio 1.2, 5).
pub mod device_type {
    /// virtio-net.
    pub const NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
    /// virtio-vsock.
    pub const VSOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
    /// virtio-fs.
    pub const FS: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_FS;
}

/// Why a device refused to start when the driver set DRIVER_OK.
#[derive(Debug, Error)]
pub enum ActivateError {
    /// The transport handed over the wrong number of queues.
    #[error("the device needs {expected} queues, the transport has {got}")]
    QueueCount {
        /// Queues the device uses.
        expected: usize,
        /// Queues it got.
        got: usize,
    },
    /// The driver did not enable a queue the device needs.
    #[error("the driver did not set up queue {0}")]
    QueueNotReady(usize),
    /// A queue's rings do not each lie inside one region of guest RAM.
    #[error("queue {0}'s rings do not lie inside guest RAM")]
    RingOutsideMemory(usize),
    /// The driver did not accept VIRTIO_F_VERSION_1; we only speak modern virtio.
    #[error("the driver did not accept VIRTIO_F_VERSION_1 (legacy virtio is not supported)")]
    LegacyDriver,
    /// Waking the device loop failed.
    #[error("cannot wake the device loop: {0}")]
    Wake(std::io::Error),
    /// The process serving the device (a vhost-user backend) failed; already worded for the
    /// user.
    #[error("{0}")]
    Backend(String),
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest RAM, for the queues and their buffers.
    pub mem: GuestMemoryMmap,
    /// The queues, in device order, as the driver configured them (already checked to lie in
    /// guest RAM if marked ready).
    pub queues: Vec<Queue>,
    /// The device's interrupt line.
    pub interrupt: Interrupt,
    /// The feature bits the driver accepted.
    pub acked_features: u64,
}

impl Activation {
    /// Checks that the driver speaks modern virtio and made all `N` queues of the device ready,
    /// and takes them, in device order, leaving the rest of the activation to the caller.
    pub fn ready_queues<const N: usize>(&mut self) -> Result<[Queue; N], ActivateError> {
        if self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(ActivateError::LegacyDriver);
        }
        let got = self.queues.len();
        let queues: [Queue; N] = std::mem::take(&mut self.queues)
            .try_into()
            .map_err(|_| ActivateError::QueueCount { expected: N, got })?;
        if let Some(i) = queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::QueueNotReady(i));
        }
        Ok(queues)
    }
}

/// A virtio device as its transport sees it. Methods run on vCPU threads with the device locked,
/// so they must be quick; real work belongs on the device loop.
pub trait VirtioDevice: Send {
    /// The virtio device id, e.g. [`device_type::VSOCK`].
    fn device_type(&self) -> u32;
    /// Device-specific feature bits offered; the transport adds [`VIRTIO_F_VERSION_1`].
    fn features(&self) -> u64;
    /// Largest size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// One eventfd per queue, written when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd];
    /// Reads `data.len()` bytes of configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the device and forgets the queues (the driver wrote 0 to the status register).
    fn reset(&mut self);
}

/// Copies the part of `config` at `offset` into `data`, zero-filling whatever lies outside it:
/// the guest picks offset and width, so nothing here may index out of bounds.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_never_go_out_of_bounds() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, 4, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
