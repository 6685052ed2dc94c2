//! Moving packets between a vsock device's two rings and its muxer. The same code serves our
//! VMM's MMIO device and the vhost-user backend QEMU uses; each caller owns its queues and tells
//! the guest in its own way (an MMIO interrupt, a vhost-user call eventfd).

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::chain::{read_tx_packet, RxBuffer};
use super::muxer::Muxer;

/// A queue broke its contract (e.g. an available index running ahead by more than the queue
/// size); the device stops until the driver resets it.
#[derive(Debug)]
pub struct QueueBroken(pub virtio_queue::Error);

impl std::fmt::Display for QueueBroken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the guest driver broke a queue ({})", self.0)
    }
}

/// The receive and transmit rings of one device and the memory they live in.
pub struct Rings<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// Host-to-guest packets.
    pub rx: &'a mut Queue,
    /// Guest-to-host packets.
    pub tx: &'a mut Queue,
}

/// Which rings got used buffers and need the guest told (per their notification settings).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Notify {
    /// The receive ring.
    pub rx: bool,
    /// The transmit ring.
    pub tx: bool,
}

type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;

fn pop<'m>(q: &mut Queue, mem: &'m GuestMemoryMmap) -> Result<Option<Chain<'m>>, QueueBroken> {
    q.iter(mem).map(|mut it| it.next()).map_err(QueueBroken)
}

/// Moves packets both ways until neither ring makes progress. TX waits while too many replies
/// are queued; RX drains them, which lets TX go on. `tx_payload` is a reusable buffer.
pub fn move_packets(
    muxer: &mut Muxer,
    tx_payload: &mut Vec<u8>,
    rings: Rings<'_>,
) -> Result<Notify, QueueBroken> {
    let Rings { mem, rx, tx } = rings;
    let (mut rx_used, mut tx_used) = (false, false);
    loop {
        rx_used |= process_rx(muxer, mem, rx)?;
        if !process_tx(muxer, tx_payload, mem, tx)? {
            break;
        }
        tx_used = true;
    }
    Ok(Notify {
        rx: rx_used && rx.needs_notification(mem).map_err(QueueBroken)?,
        tx: tx_used && tx.needs_notification(mem).map_err(QueueBroken)?,
    })
}

/// Fills guest receive buffers with whatever the muxer has; returns whether any was used.
fn process_rx(
    muxer: &mut Muxer,
    mem: &GuestMemoryMmap,
    rx: &mut Queue,
) -> Result<bool, QueueBroken> {
    let mut used = false;
    while muxer.has_rx_work() {
        let Some(chain) = pop(rx, mem)? else {
            break;
        };
        let head = chain.head_index();
        let len = match RxBuffer::new(mem, chain) {
            Err(e) => {
                tracing::debug!("vsock: returning an unusable receive buffer: {e}");
                0
            }
            Ok(buf) => match muxer.next_rx(buf.max_payload()) {
                None => {
                    // Nothing after all (a host socket had no data): the buffer stays.
                    rx.go_to_previous_position();
                    break;
                }
                Some((hdr, n)) => match buf.write_packet(&hdr, &muxer.scratch()[..n]) {
                    Ok(len) => len,
                    // Cannot happen (the buffer was checked), but never panic.
                    Err(e) => {
                        crate::guest_warn!("vsock: packet lost writing guest memory: {e}");
                        0
                    }
                },
            },
        };
        rx.add_used(mem, head, len).map_err(QueueBroken)?;
        used = true;
    }
    Ok(used)
}

/// Takes the guest's packets; returns whether any was taken.
fn process_tx(
    muxer: &mut Muxer,
    payload: &mut Vec<u8>,
    mem: &GuestMemoryMmap,
    tx: &mut Queue,
) -> Result<bool, QueueBroken> {
    let mut used = false;
    while !muxer.replies_full() {
        let Some(chain) = pop(tx, mem)? else {
            break;
        };
        let head = chain.head_index();
        match read_tx_packet(mem, chain, payload) {
            Ok(hdr) => muxer.guest_packet(&hdr, payload),
            Err(e) => {
                tracing::debug!("vsock: dropping a guest packet: {}", e.error);
                if let Some(hdr) = e.header {
                    muxer.guest_packet_failed(&hdr);
                }
            }
        }
        tx.add_used(mem, head, 0).map_err(QueueBroken)?;
        used = true;
    }
    Ok(used)
}
