//! The driver's queues as the backend needs them: checked (every queue ready, every ring inside
//! one region of guest RAM) and translated to our addresses, before anything is sent to the
//! backend, so a bad driver fails its own activation and nothing else.

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::backend::{Vring, NUM_QUEUES};
use crate::devices::virtio::ActivateError;

/// Our address of `len` bytes of guest RAM at `addr`, if they lie in one region.
fn host_address(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Option<u64> {
    let addr = GuestAddress(addr);
    mem.get_slice(addr, len).ok()?;
    mem.get_host_address(addr).ok().map(|p| p as u64)
}

/// Checks and translates the driver's queues, hiprio first.
pub fn vrings(
    mem: &GuestMemoryMmap,
    queues: &[Queue],
) -> Result<[Vring; NUM_QUEUES], ActivateError> {
    let got = queues.len();
    let queues: &[Queue; NUM_QUEUES] =
        queues.try_into().map_err(|_| ActivateError::QueueCount {
            expected: NUM_QUEUES,
            got,
        })?;
    let mut out = [Vring {
        size: 0,
        next_avail: 0,
        desc: 0,
        avail: 0,
        used: 0,
    }; NUM_QUEUES];
    for (i, (q, ring)) in queues.iter().zip(&mut out).enumerate() {
        if !q.ready() {
            return Err(ActivateError::QueueNotReady(i));
        }
        // Split-ring sizes (virtio 1.2, 2.7): 16-byte descriptors; flags, idx, the ring and
        // used_event / avail_event.
        let n = usize::from(q.size());
        let at =
            |addr, len| host_address(mem, addr, len).ok_or(ActivateError::RingOutsideMemory(i));
        *ring = Vring {
            size: q.size(),
            next_avail: q.next_avail(),
            desc: at(q.desc_table(), 16 * n)?,
            avail: at(q.avail_ring(), 6 + 2 * n)?,
            used: at(q.used_ring(), 6 + 8 * n)?,
        };
    }
    Ok(out)
}
