//! The virtio-vsock device: its virtio face (device id 19, three queues, the guest CID as
//! configuration) and the queue processing that moves packets between the rings and the muxer.

use std::path::Path;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::rings::{move_packets, Rings};
use super::unix::Listener;
use super::Error;
use crate::devices::virtio::{
    device_type, read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice,
};

/// Queue order, fixed by the spec.
pub const RX_QUEUE: usize = 0;
/// Guest-to-host packets.
pub const TX_QUEUE: usize = 1;
/// Device events (transport reset); we never send any.
pub const EVENT_QUEUE: usize = 2;
const QUEUE_SIZES: [u16; 3] = [256; 3];

/// What the device runs on once the driver is ready.
struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Interrupt,
}

/// A virtio-vsock device whose guest ports meet host Unix sockets.
pub struct Vsock {
    guest_cid: u64,
    queue_events: Vec<EventFd>,
    /// Wakes the device loop after activation or reset (which happen on vCPU threads).
    pub(super) wake: EventFd,
    pub(super) listener: Listener,
    pub(super) muxer: Muxer,
    active: Option<Active>,
    tx_payload: Vec<u8>,
}

impl Vsock {
    /// A device for a guest at `guest_cid`, listening at `uds_path` (bound now, before the guest
    /// runs, so host processes may connect at once).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, Error> {
        let listener = Listener::bind(uds_path)?;
        let evt = || crate::devices::event_fd().map_err(Error::EventFd);
        Ok(Vsock {
            guest_cid,
            queue_events: vec![evt()?, evt()?, evt()?],
            wake: evt()?,
            listener,
            muxer: Muxer::new(guest_cid, uds_path.to_owned()),
            active: None,
            tx_payload: Vec::new(),
        })
    }

    /// The eventfd of queue `index`.
    pub(super) fn queue_event(&self, index: usize) -> &EventFd {
        &self.queue_events[index]
    }

    /// Moves packets both ways (see [`move_packets`]) and interrupts the guest if it is owed.
    pub(super) fn process_queues(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let rings = Rings {
            mem: &a.mem,
            rx: &mut a.rx,
            tx: &mut a.tx,
        };
        match move_packets(&mut self.muxer, &mut self.tx_payload, rings) {
            Ok(notify) => {
                if notify.rx || notify.tx {
                    a.interrupt.signal_used_queue();
                }
            }
            Err(e) => {
                crate::guest_warn!("vsock: {e}; the device needs a reset");
                a.interrupt.signal_needs_reset();
                self.active = None;
                self.muxer.clear();
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn features(&self) -> u64 {
        // Streams only: with no feature bits, virtio 1.2 (5.10.3) implies VIRTIO_VSOCK_F_STREAM.
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("vsock: ignoring a write to read-only configuration at {offset:#x}");
    }

    fn activate(&mut self, mut a: Activation) -> Result<(), ActivateError> {
        // The event queue must be set up, though nothing is ever sent on it (no transport reset).
        let [rx, tx, _event] = a.ready_queues()?;
        self.active = Some(Active {
            mem: a.mem,
            rx,
            tx,
            interrupt: a.interrupt,
        });
        // Packets may already wait (host connections made before the driver came up).
        self.wake.write(1).map_err(ActivateError::Wake)
    }

    fn reset(&mut self) {
        // The guest forgot its connections, so we drop ours; the loop closes the sockets. A
        // device never activated has none the guest knew of: host connections made before the
        // driver's first reset keep waiting for it.
        if self.active.take().is_some() {
            self.muxer.clear();
        }
        let _ = self.wake.write(1);
    }
}
