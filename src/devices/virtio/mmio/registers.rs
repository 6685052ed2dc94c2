//! Register offsets of the virtio-mmio window (virtio 1.2, 4.2.2), as offsets into the window.

use virtio_bindings::virtio_mmio as m;

/// Size of one device's register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// "virt", little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// The modern (non-legacy) register layout.
pub const VERSION: u32 = 2;
/// Our vendor id: none in particular, as Firecracker and Cloud Hypervisor do.
pub const VENDOR_ID: u32 = 0;

pub const MAGIC_VALUE: u64 = m::VIRTIO_MMIO_MAGIC_VALUE as u64;
pub const VERSION_REG: u64 = m::VIRTIO_MMIO_VERSION as u64;
pub const DEVICE_ID: u64 = m::VIRTIO_MMIO_DEVICE_ID as u64;
pub const VENDOR_ID_REG: u64 = m::VIRTIO_MMIO_VENDOR_ID as u64;
pub const DEVICE_FEATURES: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES as u64;
pub const DEVICE_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
pub const DRIVER_FEATURES: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES as u64;
pub const DRIVER_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
pub const QUEUE_SEL: u64 = m::VIRTIO_MMIO_QUEUE_SEL as u64;
pub const QUEUE_NUM_MAX: u64 = m::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
pub const QUEUE_NUM: u64 = m::VIRTIO_MMIO_QUEUE_NUM as u64;
pub const QUEUE_READY: u64 = m::VIRTIO_MMIO_QUEUE_READY as u64;
/// QueueNotify: KVM matches writes here against each queue's ioeventfd.
pub const QUEUE_NOTIFY_OFFSET: u64 = m::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
pub const INTERRUPT_STATUS: u64 = m::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
pub const INTERRUPT_ACK: u64 = m::VIRTIO_MMIO_INTERRUPT_ACK as u64;
pub const STATUS: u64 = m::VIRTIO_MMIO_STATUS as u64;
pub const QUEUE_DESC_LOW: u64 = m::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
pub const QUEUE_DESC_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
pub const QUEUE_AVAIL_LOW: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
pub const QUEUE_AVAIL_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
pub const QUEUE_USED_LOW: u64 = m::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
pub const QUEUE_USED_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
pub const CONFIG_GENERATION: u64 = m::VIRTIO_MMIO_CONFIG_GENERATION as u64;
/// Device-specific configuration space starts here.
pub const CONFIG: u64 = m::VIRTIO_MMIO_CONFIG as u64;
