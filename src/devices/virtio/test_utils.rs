//! Test helpers: in-process guest memory, a driver-side view of a split virtqueue, so tests can
//! play a (possibly hostile) guest driver, and scratch directories.

use std::path::PathBuf;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM of `size` bytes at address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// Guest RAM of `size` bytes at address 0 in a shared file, as vhost-user backends need it.
pub fn shared_guest_memory(size: usize) -> GuestMemoryMmap {
    crate::vmm::memory::create_shared(size as u64).unwrap()
}

/// A fresh scratch directory, removed with everything in it when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Makes an empty directory named after `name` and this process.
    pub fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("microvm-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One buffer of a chain: where, how long, and whether the device writes it.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub fn read(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            write: false,
        }
    }

    /// A device-writable buffer.
    pub fn write(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            write: true,
        }
    }
}

/// The driver's side of a split queue laid out at `base`: descriptor table, then the available
/// ring, then the used ring, each on its own 4 KiB page.
pub struct DriverQueue<'a> {
    mem: &'a GuestMemoryMmap,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl<'a> DriverQueue<'a> {
    /// A queue of `size` entries whose rings start at `base`.
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        DriverQueue {
            mem,
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// A device-side queue set up as a driver would, ready.
    pub fn device_queue(&self, max_size: u16) -> Queue {
        let mut q = Queue::new(max_size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// The guest addresses of (descriptor table, available ring, used ring).
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// Writes raw descriptor `index` (tests craft loops and bad links with this).
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Descriptor::new(addr, len, flags, next);
        self.mem
            .write_obj(d, GuestAddress(self.desc + 16 * index as u64))
            .unwrap();
    }

    /// Writes `bufs` as a linked chain of fresh descriptors and makes it available; returns
    /// the head index.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.set_desc(index, b.addr, b.len, flags as u16, (index + 1) % self.size);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// Puts `head` in the available ring and bumps its index.
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * (self.avail_idx % self.size) as u64;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Writes the available ring's index as is (hostile tests lie with it).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Asks for an interrupt once the used ring's index passes `idx` (used_event, honoured by
    /// devices that negotiated VIRTIO_RING_F_EVENT_IDX).
    pub fn set_used_event(&self, idx: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(idx, GuestAddress(at)).unwrap();
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used entries the driver has not looked at yet, as (descriptor id, length).
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        while self.used_seen != self.used_idx() {
            let at = self.used + 4 + 8 * (self.used_seen % self.size) as u64;
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}
