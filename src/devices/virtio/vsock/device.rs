//! The virtio-vsock device: its virtio face (device id 19, three queues, the guest CID as
//! configuration) and the queue processing that moves packets between the rings and the muxer.

use std::os::unix::net::UnixStream;
use std::path::Path;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::chain::{read_tx_packet, RxBuffer};
use super::muxer::Muxer;
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

type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;

/// A queue broke its contract (e.g. an available index running ahead by more than the queue
/// size); the device stops until the driver resets it.
struct QueueBroken(virtio_queue::Error);

fn pop<'m>(q: &mut Queue, mem: &'m GuestMemoryMmap) -> Result<Option<Chain<'m>>, QueueBroken> {
    q.iter(mem).map(|mut it| it.next()).map_err(QueueBroken)
}

impl Vsock {
    /// A device for a guest at `guest_cid`, listening at `uds_path` (bound now, before the guest
    /// runs, so host processes may connect at once).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, Error> {
        let listener = Listener::bind(uds_path)?;
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd);
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

    /// A host process connected to the listening socket.
    pub(super) fn accept(&mut self, stream: UnixStream) {
        self.muxer.add_host_stream(stream);
    }

    /// Moves packets both ways until neither queue makes progress. TX waits while too many
    /// replies are queued; RX drains them, which lets TX go on.
    pub(super) fn process_queues(&mut self) {
        let result = (|| loop {
            self.process_rx()?;
            if !self.process_tx()? {
                return Ok(());
            }
        })();
        if let Err(QueueBroken(e)) = result {
            tracing::warn!("vsock: the guest driver broke a queue ({e}); the device needs a reset");
            if let Some(a) = self.active.take() {
                a.interrupt.signal_needs_reset();
            }
            self.muxer.clear();
        }
    }

    /// Fills guest receive buffers with whatever the muxer has; returns whether any was used.
    fn process_rx(&mut self) -> Result<bool, QueueBroken> {
        let Some(a) = self.active.as_mut() else {
            return Ok(false);
        };
        let mut used = false;
        while self.muxer.has_rx_work() {
            let Some(chain) = pop(&mut a.rx, &a.mem)? else {
                break;
            };
            let head = chain.head_index();
            let len = match RxBuffer::new(&a.mem, chain) {
                Err(e) => {
                    tracing::debug!("vsock: returning an unusable receive buffer: {e}");
                    0
                }
                Ok(buf) => match self.muxer.next_rx(buf.max_payload()) {
                    None => {
                        // Nothing after all (a host socket had no data): the buffer stays.
                        a.rx.go_to_previous_position();
                        break;
                    }
                    Some((hdr, n)) => {
                        match buf.write_packet(&hdr, &self.muxer.scratch()[..n]) {
                            Ok(len) => len,
                            // Cannot happen (the buffer was checked), but never panic.
                            Err(e) => {
                                tracing::warn!("vsock: packet lost writing guest memory: {e}");
                                0
                            }
                        }
                    }
                },
            };
            a.rx.add_used(&a.mem, head, len).map_err(QueueBroken)?;
            used = true;
        }
        if used && a.rx.needs_notification(&a.mem).map_err(QueueBroken)? {
            a.interrupt.signal_used_queue();
        }
        Ok(used)
    }

    /// Takes the guest's packets; returns whether any was taken.
    fn process_tx(&mut self) -> Result<bool, QueueBroken> {
        let Some(a) = self.active.as_mut() else {
            return Ok(false);
        };
        let mut used = false;
        while !self.muxer.replies_full() {
            let Some(chain) = pop(&mut a.tx, &a.mem)? else {
                break;
            };
            let head = chain.head_index();
            match read_tx_packet(&a.mem, chain, &mut self.tx_payload) {
                Ok(hdr) => self.muxer.guest_packet(&hdr, &self.tx_payload),
                Err(e) => {
                    tracing::debug!("vsock: dropping a guest packet: {}", e.error);
                    if let Some(hdr) = e.header {
                        self.muxer.guest_packet_failed(&hdr);
                    }
                }
            }
            a.tx.add_used(&a.mem, head, 0).map_err(QueueBroken)?;
            used = true;
        }
        if used && a.tx.needs_notification(&a.mem).map_err(QueueBroken)? {
            a.interrupt.signal_used_queue();
        }
        Ok(used)
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
