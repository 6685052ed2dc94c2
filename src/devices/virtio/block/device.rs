//! The virtio-blk device: its virtio face (device id 2, one request queue, capacity and block
//! size as configuration) and the queue processing that runs checked requests against the disk.

use std::path::Path;

use virtio_bindings::virtio_blk as blk;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::disk::DiskFile;
use super::request::{
    parse, DiskLimits, ParseError, Request, RequestType, Segment, MAX_SEGMENTS, SECTOR_SIZE,
};
use super::serial::{serial_id, SERIAL_BYTES};
use super::Error;
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice,
};

/// Entries in the request queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Requests served per event before the loop gets a turn for other devices.
const BATCH: usize = QUEUE_SIZE as usize;
/// virtio_blk_config up to `blk_size`: capacity, size_max, seg_max, geometry, blk_size.
const CONFIG_SIZE: usize = 24;

/// Feature bits offered (besides VIRTIO_F_VERSION_1, which the transport adds).
fn offered_features(read_only: bool) -> u64 {
    let bit = |b: u32| 1u64 << b;
    let mut f = bit(blk::VIRTIO_BLK_F_SEG_MAX)
        | bit(blk::VIRTIO_BLK_F_BLK_SIZE)
        | bit(blk::VIRTIO_BLK_F_FLUSH);
    if read_only {
        f |= bit(blk::VIRTIO_BLK_F_RO);
    }
    f
}

fn config_bytes(sectors: u64) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    c[0..8].copy_from_slice(&sectors.to_le_bytes());
    // size_max (8..12) stays 0: not offered. Geometry (16..20) stays 0: not offered.
    c[12..16].copy_from_slice(&(MAX_SEGMENTS as u32).to_le_bytes());
    c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
    c
}

/// What the device runs on once the driver is ready.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Interrupt,
    /// The driver negotiated VIRTIO_BLK_F_FLUSH, so the cache is write-back and it flushes when
    /// it needs to; otherwise every write is made durable before it completes (virtio 1.2,
    /// 5.2.5).
    write_back: bool,
}

/// A queue broke its contract (e.g. an available index running ahead by more than the queue
/// size); the device stops until the driver resets it.
struct QueueBroken(virtio_queue::Error);

type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;

fn pop<'m>(q: &mut Queue, mem: &'m GuestMemoryMmap) -> Result<Option<Chain<'m>>, QueueBroken> {
    q.iter(mem).map(|mut it| it.next()).map_err(QueueBroken)
}

/// A virtio-blk device backed by a raw image file.
pub struct Block {
    disk: DiskFile,
    serial: [u8; SERIAL_BYTES],
    config: [u8; CONFIG_SIZE],
    features: u64,
    queue_events: [EventFd; 1],
    /// Wakes the device loop after activation, or to go on with a long queue.
    pub(super) wake: EventFd,
    active: Option<Active>,
    /// Data buffers of the request at hand, kept to save an allocation per request.
    segments: Vec<Segment>,
    /// Chains dropped for having no usable status byte.
    dropped: u64,
}

impl Block {
    /// A device for the image at `path`, opened now (read-only if `read_only`), whose guest
    /// driver reads `serial` as its id.
    pub fn new(path: &Path, read_only: bool, serial: &str) -> Result<Self, Error> {
        let serial = serial_id(serial)?;
        let disk = DiskFile::open(path, read_only)?;
        let evt = || crate::devices::event_fd().map_err(Error::EventFd);
        Ok(Block {
            config: config_bytes(disk.sectors()),
            features: offered_features(read_only),
            disk,
            serial,
            queue_events: [evt()?],
            wake: evt()?,
            active: None,
            segments: Vec::with_capacity(MAX_SEGMENTS),
            dropped: 0,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.disk.sectors()
    }

    /// Serves requests until the queue is empty (or a batch is done), then interrupts the
    /// driver once for all of them.
    pub(super) fn process_queue(&mut self) {
        match self.serve_batch() {
            Ok(true) => {
                // More may wait: come back after the loop has served other devices.
                if let Err(e) = self.wake.write(1) {
                    tracing::warn!("virtio-blk: cannot reschedule the queue: {e}");
                }
            }
            Ok(false) => {}
            Err(QueueBroken(e)) => {
                crate::guest_warn!(
                    "virtio-blk {}: the guest driver broke the queue ({e}); the device needs a reset",
                    self.disk.path().display()
                );
                if let Some(a) = self.active.take() {
                    a.interrupt.signal_needs_reset();
                }
            }
        }
    }

    /// Returns whether the batch ended with requests possibly left.
    fn serve_batch(&mut self) -> Result<bool, QueueBroken> {
        let Block {
            disk,
            serial,
            active,
            segments,
            dropped,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return Ok(false);
        };
        let limits = DiskLimits {
            sectors: disk.sectors(),
            read_only: disk.read_only(),
        };
        let mut served = 0;
        while served < BATCH {
            let Some(chain) = pop(&mut a.queue, &a.mem)? else {
                break;
            };
            let head = chain.head_index();
            let used_len = match parse(&a.mem, chain, limits, segments) {
                Ok(req) => {
                    let (status, written) =
                        execute(disk, serial, &a.mem, &req, segments, a.write_back);
                    finish(&a.mem, req.status, status);
                    written + 1
                }
                Err(ParseError::Failed { status, error }) => {
                    tracing::debug!("virtio-blk: failing a request: {error}");
                    finish(&a.mem, status, error.status());
                    1
                }
                Err(ParseError::Dropped(e)) => {
                    *dropped += 1;
                    // Powers of two only: a hostile guest cannot flood the log.
                    if dropped.is_power_of_two() {
                        tracing::warn!(
                            "virtio-blk {}: dropping a request the guest cannot be told about: {e} ({dropped} so far)",
                            disk.path().display()
                        );
                    }
                    0
                }
            };
            a.queue
                .add_used(&a.mem, head, used_len)
                .map_err(QueueBroken)?;
            served += 1;
        }
        if served > 0 && a.queue.needs_notification(&a.mem).map_err(QueueBroken)? {
            a.interrupt.signal_used_queue();
        }
        Ok(served == BATCH)
    }
}

/// Runs a checked request; returns its status and the data bytes written to the guest.
fn execute(
    disk: &DiskFile,
    serial: &[u8; SERIAL_BYTES],
    mem: &GuestMemoryMmap,
    req: &Request,
    segments: &[Segment],
    write_back: bool,
) -> (u8, u32) {
    let result = match req.kind {
        RequestType::In => disk.read(mem, req.sector, segments).map(|()| req.data_len),
        RequestType::Out => disk
            .write(mem, req.sector, segments)
            .and_then(|()| if write_back { Ok(()) } else { disk.flush() })
            .map(|()| 0),
        RequestType::Flush => disk.flush().map(|()| 0),
        RequestType::GetId => Ok(copy_to_segments(mem, segments, serial)),
    };
    match result {
        Ok(written) => (blk::VIRTIO_BLK_S_OK as u8, written),
        Err(e) => {
            crate::guest_warn!(
                "virtio-blk {}: {:?} of {} bytes at sector {} failed: {e}",
                disk.path().display(),
                req.kind,
                req.data_len,
                req.sector
            );
            (blk::VIRTIO_BLK_S_IOERR as u8, 0)
        }
    }
}

/// Copies as much of `bytes` as the segments hold; returns how much.
fn copy_to_segments(mem: &GuestMemoryMmap, segments: &[Segment], bytes: &[u8]) -> u32 {
    let mut done = 0;
    for s in segments {
        if done == bytes.len() {
            break;
        }
        let n = (bytes.len() - done).min(s.len as usize);
        // Checked by the parser to lie in guest RAM; a failure would leave the rest unwritten.
        if let Err(e) = mem.write_slice(&bytes[done..done + n], s.addr) {
            crate::guest_warn!("virtio-blk: writing the id to guest memory failed: {e}");
            break;
        }
        done += n;
    }
    done as u32
}

fn finish(mem: &GuestMemoryMmap, at: vm_memory::GuestAddress, status: u8) {
    // Checked by the parser to lie in guest RAM.
    if let Err(e) = mem.write_obj(status, at) {
        crate::guest_warn!("virtio-blk: writing a request status failed: {e}");
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Only `writeback` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE, which we do not
        // offer.
        tracing::debug!("virtio-blk: ignoring a write to read-only configuration at {offset:#x}");
    }

    fn activate(&mut self, mut a: Activation) -> Result<(), ActivateError> {
        let [queue] = a.ready_queues()?;
        self.active = Some(Active {
            mem: a.mem,
            queue,
            interrupt: a.interrupt,
            write_back: a.acked_features & (1 << blk::VIRTIO_BLK_F_FLUSH) != 0,
        });
        // Requests made available before DRIVER_OK got no notification of their own.
        self.wake.write(1).map_err(ActivateError::Wake)
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_layout() {
        let c = config_bytes(0x1_0000_0001);
        assert_eq!(c[0..8], 0x1_0000_0001u64.to_le_bytes());
        assert_eq!(c[8..12], [0; 4], "size_max");
        assert_eq!(c[12..16], 254u32.to_le_bytes(), "seg_max");
        assert_eq!(c[16..20], [0; 4], "geometry");
        assert_eq!(c[20..24], 512u32.to_le_bytes(), "blk_size");
    }

    #[test]
    fn read_only_is_offered_only_for_read_only_disks() {
        let ro = 1 << blk::VIRTIO_BLK_F_RO;
        assert_eq!(offered_features(true) & ro, ro);
        assert_eq!(offered_features(false) & ro, 0);
        for f in [
            blk::VIRTIO_BLK_F_SEG_MAX,
            blk::VIRTIO_BLK_F_BLK_SIZE,
            blk::VIRTIO_BLK_F_FLUSH,
        ] {
            assert_ne!(offered_features(false) & 1 << f, 0);
        }
    }
}
