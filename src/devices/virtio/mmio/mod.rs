//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2): one 4 KiB register window per device.
//!
//! The guest finds a window through a `virtio_mmio.device=4K@BASE:GSI` kernel parameter. Queue
//! notifications normally never reach us: KVM turns writes to QueueNotify into eventfd signals
//! (ioeventfd) that the device loop reads.

mod registers;
mod transport;

pub use registers::{MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
pub use transport::{Error, MmioTransport};
