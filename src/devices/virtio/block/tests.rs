//! The whole device driven as a (sometimes hostile) guest would: requests go in through a ring
//! in in-process guest memory and meet a real image file on the host.

use virtio_bindings::virtio_blk as blk;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

use super::device::QUEUE_SIZE;
use super::Block;
use crate::devices::virtio::test_utils::{guest_memory, Buf, DriverQueue};
use crate::devices::virtio::{Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

const OK: u8 = blk::VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = blk::VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = blk::VIRTIO_BLK_S_UNSUPP as u8;
const SECTORS: u64 = 64;
const BUFS: u64 = 0x10_0000;
const FLUSH: u64 = 1 << blk::VIRTIO_BLK_F_FLUSH;

fn image_bytes() -> Vec<u8> {
    (0..SECTORS as usize * 512)
        .map(|i| (i / 512) as u8 ^ (i % 251) as u8)
        .collect()
}

fn image() -> TempFile {
    let t = TempFile::new().unwrap();
    std::fs::write(t.as_path(), image_bytes()).unwrap();
    t
}

/// A guest driver with its ring, its buffers and the device under test.
struct Guest<'m> {
    mem: &'m GuestMemoryMmap,
    q: DriverQueue<'m>,
    dev: Block,
    irq: Interrupt,
    next_buf: u64,
}

fn memory() -> GuestMemoryMmap {
    guest_memory(0x100_0000)
}

/// A request's outcome as the driver sees it.
#[derive(Debug, PartialEq, Eq)]
struct Done {
    status: u8,
    used_len: u32,
}

impl<'m> Guest<'m> {
    fn new(mem: &'m GuestMemoryMmap, image: &TempFile, read_only: bool, features: u64) -> Self {
        let mut g = Self::inactive(mem, image, read_only);
        g.activate(features);
        g
    }

    fn inactive(mem: &'m GuestMemoryMmap, image: &TempFile, read_only: bool) -> Self {
        Guest {
            mem,
            q: DriverQueue::new(mem, 0x1_0000, QUEUE_SIZE),
            dev: Block::new(image.as_path(), read_only, "test-serial").unwrap(),
            irq: Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            next_buf: BUFS,
        }
    }

    fn activate(&mut self, features: u64) {
        self.dev
            .activate(Activation {
                mem: self.mem.clone(),
                queues: vec![self.q.device_queue(QUEUE_SIZE)],
                interrupt: self.irq.clone(),
                acked_features: VIRTIO_F_VERSION_1 | features,
            })
            .unwrap();
        // What the loop does on the wake the activation wrote.
        assert_eq!(self.dev.wake.read().unwrap(), 1);
        self.dev.process_queue();
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let at = self.next_buf;
        self.next_buf += len.next_multiple_of(0x1000);
        at
    }

    fn header(&mut self, kind: u32, sector: u64) -> u64 {
        let at = self.alloc(16);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
        at
    }

    fn status_buf(&mut self) -> u64 {
        let at = self.alloc(1);
        self.mem.write_obj(0xffu8, GuestAddress(at)).unwrap();
        at
    }

    /// Makes the chain available, lets the device run, and returns the used entries.
    fn submit(&mut self, bufs: &[Buf]) -> Vec<(u32, u32)> {
        self.q.add_chain(bufs);
        self.dev.process_queue();
        self.q.take_used()
    }

    fn status_at(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// A request with `data` buffers between header and status.
    fn request(&mut self, kind: u32, sector: u64, data: &[Buf]) -> Done {
        let hdr = self.header(kind, sector);
        let st = self.status_buf();
        let mut bufs = vec![Buf::read(hdr, 16)];
        bufs.extend_from_slice(data);
        bufs.push(Buf::write(st, 1));
        let used = self.submit(&bufs);
        assert_eq!(used.len(), 1, "one request, one used entry");
        Done {
            status: self.status_at(st),
            used_len: used[0].1,
        }
    }

    fn read(&mut self, sector: u64, len: u32) -> (Done, Vec<u8>) {
        let at = self.alloc(len as u64);
        self.mem
            .write_slice(&vec![0xee; len as usize], GuestAddress(at))
            .unwrap();
        let done = self.request(blk::VIRTIO_BLK_T_IN, sector, &[Buf::write(at, len)]);
        let mut data = vec![0u8; len as usize];
        self.mem.read_slice(&mut data, GuestAddress(at)).unwrap();
        (done, data)
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> Done {
        let at = self.alloc(data.len() as u64);
        self.mem.write_slice(data, GuestAddress(at)).unwrap();
        self.request(
            blk::VIRTIO_BLK_T_OUT,
            sector,
            &[Buf::read(at, data.len() as u32)],
        )
    }

    fn get_id(&mut self, len: u32) -> (Done, Vec<u8>) {
        let at = self.alloc(len as u64);
        self.mem
            .write_slice(&vec![0xee; len as usize], GuestAddress(at))
            .unwrap();
        let done = self.request(blk::VIRTIO_BLK_T_GET_ID, 0, &[Buf::write(at, len)]);
        let mut data = vec![0u8; len as usize];
        self.mem.read_slice(&mut data, GuestAddress(at)).unwrap();
        (done, data)
    }
}

#[test]
fn reads_return_the_image_sectors() {
    let img = image();
    let mem = memory();
    let mut g = Guest::new(&mem, &img, false, FLUSH);
    let want = image_bytes();
    let (done, data) = g.read(0, 512);
    assert_eq!(
        done,
        Done {
            status: OK,
            used_len: 513
        }
    );
    assert_eq!(data, want[..512]);
    let (done, data) = g.read(SECTORS - 3, 3 * 512);
    assert_eq!(done.status, OK);
    assert_eq!(data, want[want.len() - 3 * 512..]);
    assert_eq!(g.irq.status() & 1, 1, "used-ring interrupt");
}

#[test]
fn reads_scatter_over_several_buffers() {
    let img = image();
    let mem = memory();
    let mut g = Guest::new(&mem, &img, false, FLUSH);
    let (a, b) = (g.alloc(100), g.alloc(924));
    let done = g.request(
        blk::VIRTIO_BLK_T_IN,
        2,
        &[Buf::write(a, 100), Buf::write(b, 924)],
    );
    assert_eq!(done.status, OK);
    let mut got = vec![0u8; 1024];
    mem.read_slice(&mut got[..100], GuestAddress(a)).unwrap();
    mem.read_slice(&mut got[100..], GuestAddress(b)).unwrap();
    assert_eq!(got, image_bytes()[1024..2048]);
}

#[test]
fn writes_land_in_the_image_with_and_without_write_back() {
    for features in [FLUSH, 0] {
        let img = image();
        let mem = memory();
        let mut g = Guest::new(&mem, &img, false, features);
        let data: Vec<u8> = (0..1024).map(|i| (i % 13) as u8).collect();
        let done = g.write(5, &data);
        assert_eq!(
            done,
            Done {
                status: OK,
                used_len: 1
            }
        );
        let on_disk = std::fs::read(img.as_path()).unwrap();
        assert_eq!(on_disk[5 * 512..7 * 512], data[..]);
        assert_eq!(on_disk[..5 * 512], image_bytes()[..5 * 512]);
        let (_, back) = g.read(5, 1024);
        assert_eq!(back, data);
        let done = g.request(blk::VIRTIO_BLK_T_FLUSH, 0, &[]);
        assert_eq!(done.status, OK);
    }
}

#[test]
fn get_id_returns_the_padded_serial_within_the_buffer() {
    let img = image();
    let mem = memory();
    let mut g = Guest::new(&mem, &img, false, FLUSH);
    let (done, id) = g.get_id(20);
    assert_eq!(
        done,
        Done {
            status: OK,
            used_len: 21
        }
    );
    assert_eq!(&id[..], b"test-serial\0\0\0\0\0\0\0\0\0");
    let (done, id) = g.get_id(4);
    assert_eq!((done.status, done.used_len), (OK, 5));
    assert_eq!(&id[..], b"test");
    let (done, id) = g.get_id(32);
    assert_eq!(done.used_len, 21);
    assert_eq!(&id[20..], [0xee; 12], "nothing past the id");
}

#[test]
fn read_only_disks_refuse_writes_and_stay_unchanged() {
    let img = image();
    let mem = memory();
    let mut g = Guest::new(&mem, &img, true, FLUSH);
    assert_ne!(g.dev.features() & 1 << blk::VIRTIO_BLK_F_RO, 0);
    let done = g.write(0, &[0x55; 512]);
    assert_eq!(
        done,
        Done {
            status: IOERR,
            used_len: 1
        }
    );
    assert_eq!(std::fs::read(img.as_path()).unwrap(), image_bytes());
    assert_eq!(g.read(0, 512).0.status, OK);
    assert_eq!(g.request(blk::VIRTIO_BLK_T_FLUSH, 0, &[]).status, OK);
}

#[test]
fn out_of_range_and_partial_sectors_fail_with_ioerr() {
    let img = image();
    let mem = memory();
    let mut g = Guest::new(&mem, &img, false, FLUSH);
    assert_eq!(g.read(SECTORS, 512).0.status, IOERR);
    assert_eq!(g.read(SECTORS - 1, 1024).0.status, IOERR);
    assert_eq!(g.read(u64::MAX, 512).0.status, IOERR);
    assert_eq!(g.read(0, 100).0.status, IOERR);
    let (done, data) = g.read(SECTORS, 512);
    assert_eq!(done.used_len, 1);
    assert!(data.iter().all(|&b| b == 0xee), "nothing written");
    assert_eq!(g.write(SECTORS, &[1; 512]).status, IOERR);
    assert_eq!(std::fs::read(img.as_path()).unwrap(), image_bytes());
}

#[test]
fn unknown_types_are_unsupported() {
    let img = image();
    let mem = memory();
    let mut g = Guest::new(&mem, &img, false, FLUSH);
    let at = g.alloc(512);
    // DISCARD, WRITE_ZEROES and SECURE_ERASE are not offered.
    for kind in [11, 13, 14, 0x8000_0000] {
        let done = g.request(kind, 0, &[Buf::write(at, 512)]);
        assert_eq!(
            done,
            Done {
                status: UNSUPP,
                used_len: 1
            }
        );
    }
}

#[test]
fn hostile_chains_are_answered_or_dropped_and_the_queue_moves_on() {
    let img = image();
    let mem = memory();
    let mut g = Guest::new(&mem, &img, false, FLUSH);
    let end = 0x100_0000u64;

    // Data outside RAM: answered.
    let done = g.request(blk::VIRTIO_BLK_T_IN, 0, &[Buf::write(end - 256, 512)]);
    assert_eq!((done.status, done.used_len), (IOERR, 1));
    // Header split over three descriptors: served.
    let hdr = g.header(blk::VIRTIO_BLK_T_IN, 1);
    let (data, st) = (g.alloc(512), g.status_buf());
    let used = g.submit(&[
        Buf::read(hdr, 5),
        Buf::read(hdr + 5, 0),
        Buf::read(hdr + 5, 11),
        Buf::write(data, 512),
        Buf::write(st, 1),
    ]);
    assert_eq!(used[0].1, 513);
    assert_eq!(g.status_at(st), OK);

    // No usable status byte: dropped, but the chain comes back.
    let hdr = g.header(blk::VIRTIO_BLK_T_IN, 0);
    for bufs in [
        vec![Buf::read(hdr, 16), Buf::write(data, 512), Buf::read(st, 1)],
        vec![Buf::read(hdr, 16), Buf::write(data, 512), Buf::write(st, 0)],
        vec![Buf::read(hdr, 16), Buf::write(end, 1)],
        vec![Buf::read(hdr, 16)],
    ] {
        let used = g.submit(&bufs);
        assert_eq!(used.len(), 1, "{bufs:?}");
        assert_eq!(used[0].1, 0, "{bufs:?}");
    }
    // A descriptor loop: dropped.
    g.q.set_desc(
        200,
        hdr,
        16,
        virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16,
        200,
    );
    g.q.publish(200);
    g.dev.process_queue();
    assert_eq!(g.q.take_used(), vec![(200, 0)]);

    // And the device still works.
    let (done, got) = g.read(3, 512);
    assert_eq!(done.status, OK);
    assert_eq!(got, image_bytes()[3 * 512..4 * 512]);
}

#[test]
fn one_interrupt_per_batch() {
    let img = image();
    let mem = memory();
    let mut g = Guest::new(&mem, &img, false, FLUSH);
    let mut statuses = Vec::new();
    for sector in 0..3 {
        let hdr = g.header(blk::VIRTIO_BLK_T_IN, sector);
        let (data, st) = (g.alloc(512), g.status_buf());
        g.q.add_chain(&[Buf::read(hdr, 16), Buf::write(data, 512), Buf::write(st, 1)]);
        statuses.push(st);
    }
    let _ = g.irq.irqfd().read();
    g.dev.process_queue();
    assert_eq!(g.q.take_used().len(), 3);
    assert!(statuses.iter().all(|&st| g.status_at(st) == OK));
    assert_eq!(g.irq.irqfd().read().unwrap(), 1, "a single interrupt");
}

#[test]
fn a_full_batch_reschedules_itself() {
    let img = image();
    let mem = memory();
    let mut g = Guest::new(&mem, &img, false, FLUSH);
    let hdr = g.header(blk::VIRTIO_BLK_T_FLUSH, 0);
    let st = g.status_buf();
    for _ in 0..QUEUE_SIZE {
        g.q.add_chain(&[Buf::read(hdr, 16), Buf::write(st, 1)]);
    }
    g.dev.process_queue();
    assert_eq!(g.q.take_used().len(), QUEUE_SIZE as usize);
    assert_eq!(
        g.dev.wake.read().unwrap(),
        1,
        "the loop comes back for more"
    );
    g.dev.process_queue();
    assert!(g.dev.wake.read().is_err(), "an empty queue ends the round");
}

#[test]
fn requests_made_before_driver_ok_are_served_on_activation() {
    let img = image();
    let mem = memory();
    let mut g = Guest::inactive(&mem, &img, false);
    let hdr = g.header(blk::VIRTIO_BLK_T_IN, 0);
    let (data, st) = (g.alloc(512), g.status_buf());
    g.q.add_chain(&[Buf::read(hdr, 16), Buf::write(data, 512), Buf::write(st, 1)]);
    g.dev.process_queue();
    assert!(g.q.take_used().is_empty(), "not active yet");
    g.activate(FLUSH);
    assert_eq!(g.q.take_used().len(), 1);
    assert_eq!(g.status_at(st), OK);
}

#[test]
fn a_broken_queue_needs_a_reset_and_reset_stops_the_device() {
    let img = image();
    let mem = memory();
    let mut g = Guest::new(&mem, &img, false, FLUSH);
    // An available index running more than a queue ahead.
    g.q.set_avail_idx(QUEUE_SIZE + 1);
    g.dev.process_queue();
    assert!(g.irq.needs_reset());

    let mut g = Guest::new(&mem, &img, false, FLUSH);
    g.dev.reset();
    let hdr = g.header(blk::VIRTIO_BLK_T_IN, 0);
    let st = g.status_buf();
    assert!(g
        .submit(&[Buf::read(hdr, 16), Buf::write(st, 1)])
        .is_empty());
}

#[test]
fn activation_checks_the_driver() {
    let img = image();
    let mem = memory();
    let mut g = Guest::inactive(&mem, &img, false);
    let queue = || g.q.device_queue(QUEUE_SIZE);
    let act = |queues, acked_features| Activation {
        mem: mem.clone(),
        queues,
        interrupt: g.irq.clone(),
        acked_features,
    };
    let mut dev = Block::new(img.as_path(), false, "x").unwrap();
    assert!(dev.activate(act(vec![queue()], FLUSH)).is_err(), "legacy");
    assert!(dev.activate(act(vec![], VIRTIO_F_VERSION_1)).is_err());
    let mut not_ready = queue();
    virtio_queue::QueueT::set_ready(&mut not_ready, false);
    assert!(dev
        .activate(act(vec![not_ready], VIRTIO_F_VERSION_1))
        .is_err());
    assert!(dev.activate(act(vec![queue()], VIRTIO_F_VERSION_1)).is_ok());
    g.dev.reset();
}

#[test]
fn configuration_reports_capacity_and_block_size() {
    let img = image();
    let dev = Block::new(img.as_path(), false, "x").unwrap();
    assert_eq!(dev.device_type(), 2);
    assert_eq!(dev.queue_max_sizes(), &[256]);
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    let mut bs = [0u8; 4];
    dev.read_config(20, &mut bs);
    assert_eq!(u32::from_le_bytes(bs), 512);
    let mut past = [0xffu8; 4];
    dev.read_config(1000, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn bad_serials_and_missing_images_are_refused_before_anything_runs() {
    let img = image();
    let e = Block::new(img.as_path(), false, &"s".repeat(21))
        .err()
        .unwrap();
    assert!(e.to_string().contains("at most 20 bytes"), "{e}");
    let e = Block::new(std::path::Path::new("/no/such/image"), true, "x")
        .err()
        .unwrap();
    assert!(e.to_string().contains("/no/such/image"), "{e}");
}
