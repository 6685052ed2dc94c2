//! The whole device driven as a (sometimes hostile) guest would, through rings in in-process
//! guest memory, against a stream backend whose other end the test holds.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_bindings::virtio_net as n;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_USED_F_NO_NOTIFY,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::Backend;
use super::config::{BASE_FEATURES, CONFIG_SIZE};
use super::stream::{prefix, Stream};
use super::{Net, MAX_FRAME_LEN, QUEUE_SIZE, VNET_HDR_LEN};
use crate::devices::virtio::test_utils::{guest_memory, Buf, DriverQueue};
use crate::devices::virtio::{
    device_type, ActivateError, Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const MTU: u16 = 1500;
const MEM: usize = 0x100_0000;
const RX_RING: u64 = 0x1_0000;
const TX_RING: u64 = 0x2_0000;
const BUFS: u64 = 0x10_0000;
const MRG: u64 = 1 << n::VIRTIO_NET_F_MRG_RXBUF;
const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

/// An Ethernet frame of `len` bytes: broadcast, from MAC, ethertype 0x88b5, then a pattern.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend((0..len.saturating_sub(14)).map(|i| (i as u8).wrapping_mul(31) ^ seed));
    f.truncate(len);
    f
}

fn framed(f: &[u8]) -> Vec<u8> {
    let mut v = prefix(f.len()).to_vec();
    v.extend_from_slice(f);
    v
}

/// A guest driver with its rings and buffers, the device, and the backend's other end.
struct Guest<'m> {
    mem: &'m GuestMemoryMmap,
    rxq: DriverQueue<'m>,
    txq: DriverQueue<'m>,
    dev: Net,
    irq: Interrupt,
    peer: UnixStream,
    failures: Arc<Mutex<Vec<String>>>,
    next_buf: u64,
}

impl<'m> Guest<'m> {
    fn new(mem: &'m GuestMemoryMmap, features: u64) -> Self {
        let mut g = Self::inactive(mem);
        g.activate(features).unwrap();
        g
    }

    fn inactive(mem: &'m GuestMemoryMmap) -> Self {
        let (ours, peer) = UnixStream::pair().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let backend =
            Backend::Stream(Stream::new(ours, Some(Path::new("/run/test-passt.sock"))).unwrap());
        let failures = Arc::new(Mutex::new(Vec::new()));
        let seen = failures.clone();
        let dev = Net::with_backend(
            MAC,
            MTU,
            backend,
            Box::new(move |msg| seen.lock().unwrap().push(msg)),
        )
        .unwrap();
        Guest {
            mem,
            rxq: DriverQueue::new(mem, RX_RING, QUEUE_SIZE),
            txq: DriverQueue::new(mem, TX_RING, QUEUE_SIZE),
            dev,
            irq: Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            peer,
            failures,
            next_buf: BUFS,
        }
    }

    fn activate(&mut self, features: u64) -> Result<(), ActivateError> {
        self.dev.activate(Activation {
            mem: self.mem.clone(),
            queues: vec![
                self.rxq.device_queue(QUEUE_SIZE),
                self.txq.device_queue(QUEUE_SIZE),
            ],
            interrupt: self.irq.clone(),
            acked_features: VIRTIO_F_VERSION_1 | features,
        })?;
        // What the loop does on the wake the activation wrote.
        assert_eq!(self.dev.wake.read().unwrap(), 1);
        self.dev.process_tx();
        self.dev.process_rx();
        Ok(())
    }

    fn alloc(&mut self, len: usize) -> u64 {
        let at = self.next_buf;
        self.next_buf += (len as u64).next_multiple_of(0x1000);
        at
    }

    /// Puts `bytes` in guest memory as one readable buffer.
    fn readable(&mut self, bytes: &[u8]) -> Buf {
        let at = self.alloc(bytes.len());
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
        Buf::read(at, bytes.len() as u32)
    }

    /// Sends `f` with a zero header, split into pieces of at most `piece` bytes.
    fn send(&mut self, f: &[u8], piece: usize) -> Vec<(u32, u32)> {
        let mut packet = vec![0u8; VNET_HDR_LEN];
        packet.extend_from_slice(f);
        let bufs: Vec<Buf> = packet.chunks(piece).map(|c| self.readable(c)).collect();
        self.txq.add_chain(&bufs);
        self.dev.process_tx();
        self.txq.take_used()
    }

    /// Posts one receive chain of writable buffers of the given sizes; returns their addresses.
    fn post_rx(&mut self, sizes: &[u32]) -> Vec<Buf> {
        let bufs: Vec<Buf> = sizes
            .iter()
            .map(|&len| {
                let at = self.alloc(len as usize);
                self.mem
                    .write_slice(&vec![0xee; len as usize], GuestAddress(at))
                    .unwrap();
                Buf::write(at, len)
            })
            .collect();
        self.rxq.add_chain(&bufs);
        bufs
    }

    /// Reads `len` bytes the device wrote across `bufs`.
    fn gather(&self, bufs: &[Buf], len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for b in bufs {
            let n = (len - out.len()).min(b.len as usize);
            let mut v = vec![0u8; n];
            self.mem.read_slice(&mut v, GuestAddress(b.addr)).unwrap();
            out.extend_from_slice(&v);
        }
        out
    }

    /// One frame from the backend's side of the socket.
    fn peer_frame(&mut self) -> Vec<u8> {
        let mut len = [0u8; 4];
        self.peer.read_exact(&mut len).unwrap();
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        self.peer.read_exact(&mut f).unwrap();
        f
    }

    /// Whether the backend's side has nothing to read.
    fn peer_idle(&self) -> bool {
        self.peer.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let r = (&self.peer).read(&mut b);
        self.peer.set_nonblocking(false).unwrap();
        matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    fn interrupted(&self) -> bool {
        self.irq.irqfd().read().is_ok()
    }

    fn used_flags(&self) -> u16 {
        let (_, _, used) = self.rxq.addresses();
        self.mem.read_obj(GuestAddress(used)).unwrap()
    }

    fn tx_avail_event(&self) -> u16 {
        let (_, _, used) = self.txq.addresses();
        let at = used + 4 + 8 * u64::from(QUEUE_SIZE);
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }
}

#[test]
fn a_frame_across_descriptors_reaches_the_stream_framed() {
    let mem = guest_memory(MEM);
    let mut g = Guest::new(&mem, 0);
    let f = frame(100, 1);
    // The header split over two descriptors, the frame over four.
    let used = g.send(&f, 7);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, 0, "nothing written to a transmit chain");
    assert!(g.interrupted());
    assert_eq!(g.peer_frame(), f, "no virtio-net header on the wire");
    assert!(g.peer_idle());
}

#[test]
fn frames_leave_in_order_and_each_once() {
    let mem = guest_memory(MEM);
    let mut g = Guest::new(&mem, 0);
    let frames: Vec<Vec<u8>> = (0..5).map(|i| frame(60 + i * 100, i as u8)).collect();
    for f in &frames {
        let mut packet = vec![0u8; VNET_HDR_LEN];
        packet.extend_from_slice(f);
        let b = g.readable(&packet);
        g.txq.add_chain(&[b]);
    }
    g.dev.process_tx();
    assert_eq!(g.txq.take_used().len(), 5);
    for f in &frames {
        assert_eq!(&g.peer_frame(), f);
    }
    assert!(g.peer_idle());
}

#[test]
fn a_received_frame_lands_in_one_chain_with_a_zeroed_header() {
    let mem = guest_memory(MEM);
    let mut g = Guest::new(&mem, 0);
    let bufs = g.post_rx(&[20, 2000]);
    let f = frame(60, 2);
    g.peer.write_all(&framed(&f)).unwrap();
    g.dev.process_rx();
    let used = g.rxq.take_used();
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1 as usize, VNET_HDR_LEN + 60);
    let got = g.gather(&bufs, VNET_HDR_LEN + 60);
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[10] = 1; // num_buffers
    assert_eq!(got[..VNET_HDR_LEN], hdr);
    assert_eq!(got[VNET_HDR_LEN..], f[..]);
    assert!(g.interrupted());
}

#[test]
fn mergeable_buffers_take_a_frame_across_chains_and_say_how_many() {
    let mem = guest_memory(MEM);
    let mut g = Guest::new(&mem, MRG);
    let chains: Vec<Vec<Buf>> = (0..4).map(|_| g.post_rx(&[40, 60])).collect();
    let f = frame(250, 3);
    g.peer.write_all(&framed(&f)).unwrap();
    g.dev.process_rx();
    let used = g.rxq.take_used();
    // 262 bytes: 100 + 100 + 62; the fourth chain stays with the device.
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        vec![100, 100, 62]
    );
    let mut got = Vec::new();
    for (c, u) in chains.iter().zip(&used) {
        got.extend(g.gather(c, u.1 as usize));
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(got[..10], [0; 10]);
    assert_eq!(got[VNET_HDR_LEN..], f[..]);

    // The next frame starts in the chain left over.
    let f2 = frame(30, 4);
    g.peer.write_all(&framed(&f2)).unwrap();
    g.dev.process_rx();
    let used = g.rxq.take_used();
    assert_eq!(used.len(), 1);
    let got = g.gather(&chains[3], used[0].1 as usize);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    assert_eq!(got[VNET_HDR_LEN..], f2[..]);
}

#[test]
fn frames_wait_for_receive_buffers_and_none_is_lost() {
    let mem = guest_memory(MEM);
    let mut g = Guest::new(&mem, 0);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(64 + i, i as u8)).collect();
    for f in &frames[..2] {
        g.peer.write_all(&framed(f)).unwrap();
    }
    // The backend is readable, the guest has no buffers.
    g.dev.backend_event(EventSet::IN);
    assert!(g.rxq.take_used().is_empty());
    assert!(!g.interrupted());
    let interest = g.dev.backend_interest().unwrap();
    assert!(!interest.contains(EventSet::IN), "stop reading the backend");
    assert_eq!(g.used_flags(), 0, "kicks asked for");
    g.peer.write_all(&framed(&frames[2])).unwrap();

    // One buffer: one frame, then waiting again.
    let b1 = g.post_rx(&[2048]);
    g.dev.process_rx();
    let used = g.rxq.take_used();
    assert_eq!(used.len(), 1);
    assert_eq!(
        g.gather(&b1, used[0].1 as usize)[VNET_HDR_LEN..],
        frames[0][..]
    );
    assert!(!g.dev.backend_interest().unwrap().contains(EventSet::IN));

    // Enough buffers: the rest, in order, and reading resumes.
    let b2 = g.post_rx(&[2048]);
    let b3 = g.post_rx(&[2048]);
    let b4 = g.post_rx(&[2048]);
    g.dev.process_rx();
    let used = g.rxq.take_used();
    assert_eq!(used.len(), 2);
    assert_eq!(
        g.gather(&b2, used[0].1 as usize)[VNET_HDR_LEN..],
        frames[1][..]
    );
    assert_eq!(
        g.gather(&b3, used[1].1 as usize)[VNET_HDR_LEN..],
        frames[2][..]
    );
    assert!(g.dev.backend_interest().unwrap().contains(EventSet::IN));
    assert_eq!(
        g.used_flags(),
        VRING_USED_F_NO_NOTIFY as u16,
        "no kicks wanted while frames flow"
    );
    let f = frame(70, 9);
    g.peer.write_all(&framed(&f)).unwrap();
    g.dev.backend_event(EventSet::IN);
    let used = g.rxq.take_used();
    assert_eq!(g.gather(&b4, used[0].1 as usize)[VNET_HDR_LEN..], f[..]);
    assert!(g.failures().is_empty());
}

#[test]
fn a_frame_too_big_for_a_single_buffer_is_dropped_and_the_buffer_kept() {
    let mem = guest_memory(MEM);
    let mut g = Guest::new(&mem, 0);
    let b = g.post_rx(&[200]);
    let big = frame(1000, 5);
    let small = frame(100, 6);
    g.peer.write_all(&framed(&big)).unwrap();
    g.peer.write_all(&framed(&small)).unwrap();
    g.dev.process_rx();
    let used = g.rxq.take_used();
    assert_eq!(used.len(), 1);
    assert_eq!(g.gather(&b, used[0].1 as usize)[VNET_HDR_LEN..], small[..]);
}

#[test]
fn partial_length_prefixes_and_bodies_are_reassembled() {
    let mem = guest_memory(MEM);
    let mut g = Guest::new(&mem, 0);
    let b = g.post_rx(&[2048]);
    let f = frame(300, 7);
    let bytes = framed(&f);
    for piece in [&bytes[..2], &bytes[2..3], &bytes[3..100]] {
        g.peer.write_all(piece).unwrap();
        g.dev.backend_event(EventSet::IN);
        assert!(g.rxq.take_used().is_empty());
    }
    g.peer.write_all(&bytes[100..]).unwrap();
    g.dev.backend_event(EventSet::IN);
    let used = g.rxq.take_used();
    assert_eq!(used.len(), 1);
    assert_eq!(g.gather(&b, used[0].1 as usize)[VNET_HDR_LEN..], f[..]);
}

#[test]
fn hostile_transmit_chains_are_returned_unsent() {
    let mem = guest_memory(MEM);
    let mut g = Guest::new(&mem, 0);
    let good = {
        let mut p = vec![0u8; VNET_HDR_LEN];
        p.extend_from_slice(&frame(60, 8));
        p
    };
    let hdr = g.readable(&good[..VNET_HDR_LEN]);
    let body = g.readable(&good[VNET_HDR_LEN..]);
    let writable = Buf::write(body.addr, body.len);
    let short = Buf::read(hdr.addr, 11);
    let outside = Buf::read(MEM as u64 - 16, 64);
    let huge = Buf::read(hdr.addr, (MAX_FRAME_LEN + VNET_HDR_LEN + 1) as u32);
    for chain in [
        vec![hdr, writable],
        vec![short],
        vec![hdr, outside],
        vec![huge],
        vec![Buf::read(hdr.addr, 12)],
    ] {
        g.txq.add_chain(&chain);
    }
    // A looping chain.
    g.txq
        .set_desc(100, hdr.addr, 12, VRING_DESC_F_NEXT as u16, 101);
    g.txq
        .set_desc(101, body.addr, body.len, VRING_DESC_F_NEXT as u16, 100);
    g.txq.publish(100);
    g.dev.process_tx();
    let used = g.txq.take_used();
    assert_eq!(used.len(), 6);
    assert!(used.iter().all(|u| u.1 == 0));
    assert!(g.peer_idle(), "nothing reached the backend");
    assert!(g.failures().is_empty());
    // The device goes on.
    let f = frame(60, 9);
    assert_eq!(g.send(&f, 4096).len(), 1);
    assert_eq!(g.peer_frame(), f);
}

#[test]
fn hostile_receive_chains_are_returned_empty_and_the_frame_goes_on() {
    let mem = guest_memory(MEM);
    let mut g = Guest::new(&mem, 0);
    let readable = g.readable(&[0u8; 2048]);
    g.rxq
        .add_chain(&[Buf::write(BUFS + 0x10_0000, 100), readable]);
    g.rxq.add_chain(&[Buf::write(MEM as u64 - 100, 2048)]);
    g.rxq.add_chain(&[Buf::write(BUFS + 0x10_0000, 11)]);
    let good = g.post_rx(&[2048]);
    let f = frame(80, 10);
    g.peer.write_all(&framed(&f)).unwrap();
    g.dev.process_rx();
    let used = g.rxq.take_used();
    assert_eq!(used.len(), 4);
    assert_eq!(used[..3].iter().map(|u| u.1).collect::<Vec<_>>(), [0, 0, 0]);
    assert_eq!(used[3].1 as usize, VNET_HDR_LEN + 80);
    assert_eq!(g.gather(&good, used[3].1 as usize)[VNET_HDR_LEN..], f[..]);
    assert!(g.failures().is_empty());
}

#[test]
fn a_bad_frame_length_from_the_backend_stops_the_vm() {
    for len in [0u32, MAX_FRAME_LEN as u32 + 1] {
        let mem = guest_memory(MEM);
        let mut g = Guest::new(&mem, 0);
        g.post_rx(&[2048]);
        g.peer.write_all(&len.to_be_bytes()).unwrap();
        g.dev.backend_event(EventSet::IN);
        let failures = g.failures();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(
            failures[0].contains("broke the frame protocol"),
            "{failures:?}"
        );
        assert!(
            failures[0].contains(&format!("length of {len} bytes")),
            "{failures:?}"
        );
        assert_eq!(
            g.dev.backend_interest(),
            None,
            "the backend is no longer watched"
        );
        // And never reported twice.
        g.dev.process_rx();
        g.dev.backend_event(EventSet::IN | EventSet::HANG_UP);
        assert_eq!(g.failures().len(), 1);
    }
}

#[test]
fn the_backend_closing_its_socket_stops_the_vm() {
    let mem = guest_memory(MEM);
    let mut g = Guest::new(&mem, 0);
    g.post_rx(&[2048]);
    g.peer.shutdown(std::net::Shutdown::Both).unwrap();
    g.dev.backend_event(EventSet::IN);
    assert_eq!(
        g.failures(),
        vec!["virtio-net: the network backend (passt) closed its socket /run/test-passt.sock"]
    );
    // A hang-up seen by the loop (no read needed) says the same.
    let mem = guest_memory(MEM);
    let mut g = Guest::new(&mem, 0);
    g.dev.backend_event(EventSet::HANG_UP);
    assert_eq!(g.failures().len(), 1);
    assert!(g.failures()[0].contains("closed its socket"));
    // The guest's frames are still taken (and dropped) so it does not stall.
    assert_eq!(g.send(&frame(60, 1), 4096).len(), 1);
}

#[test]
fn a_backend_that_pushes_back_holds_one_frame_and_stops_the_queue() {
    let mem = guest_memory(MEM);
    let (ours, mut peer) = UnixStream::pair().unwrap();
    nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::SndBuf, &4096).unwrap();
    let mut g = Guest::inactive(&mem);
    g.dev = Net::with_backend(
        MAC,
        MTU,
        Backend::Stream(Stream::new(ours, None).unwrap()),
        Box::new(|_| {}),
    )
    .unwrap();
    g.activate(0).unwrap();
    let frames: Vec<Vec<u8>> = (0..4).map(|i| frame(60_000, i)).collect();
    for f in &frames {
        let mut p = vec![0u8; VNET_HDR_LEN];
        p.extend_from_slice(f);
        let b = g.readable(&p);
        g.txq.add_chain(&[b]);
    }
    g.dev.process_tx();
    let taken = g.txq.take_used().len();
    assert!(
        taken < 4,
        "the queue stops while a frame waits ({taken} taken)"
    );
    assert!(g.dev.backend_interest().unwrap().contains(EventSet::OUT));

    // The backend drains; each writable event moves things on.
    peer.set_nonblocking(true).unwrap();
    let mut wire = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut taken_total = taken;
    for _ in 0..10_000 {
        match peer.read(&mut buf) {
            Ok(n) => wire.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        if g.dev.backend_interest().unwrap().contains(EventSet::OUT) {
            g.dev.backend_event(EventSet::OUT);
        }
        taken_total += g.txq.take_used().len();
        if wire.len() == 4 * (4 + 60_000) {
            break;
        }
    }
    assert_eq!(taken_total, 4);
    let want: Vec<u8> = frames.iter().flat_map(|f| framed(f)).collect();
    assert!(wire == want, "every frame whole and in order");
    assert!(!g.dev.backend_interest().unwrap().contains(EventSet::OUT));
}

#[test]
fn event_idx_is_honoured_for_kicks_and_interrupts() {
    let mem = guest_memory(MEM);
    let mut g = Guest::new(&mem, EVENT_IDX);
    // The driver wants an interrupt as soon as the first entry is used.
    g.txq.set_used_event(0);
    assert_eq!(g.send(&frame(60, 1), 4096).len(), 1);
    assert!(g.interrupted());
    assert_eq!(
        g.tx_avail_event(),
        1,
        "a kick for the next frame is asked for"
    );
    // Now it wants none until the used index passes 10.
    g.txq.set_used_event(10);
    assert_eq!(g.send(&frame(60, 2), 4096).len(), 1);
    assert!(!g.interrupted());
    assert_eq!(g.tx_avail_event(), 2);
    assert_eq!(g.peer_frame(), frame(60, 1));
    assert_eq!(g.peer_frame(), frame(60, 2));
}

#[test]
fn configuration_space_holds_mac_status_and_mtu() {
    let mem = guest_memory(MEM);
    let g = Guest::inactive(&mem);
    let read = |offset, len| {
        let mut d = vec![0u8; len];
        g.dev.read_config(offset, &mut d);
        d
    };
    assert_eq!(read(0, 6), MAC);
    assert_eq!(read(6, 2), [1, 0], "link up");
    assert_eq!(read(10, 2), MTU.to_le_bytes());
    assert_eq!(read(4, 4), [0x34, 0x56, 1, 0], "any width, any offset");
    assert_eq!(read(CONFIG_SIZE as u64, 4), [0; 4]);
    assert_eq!(g.dev.device_type(), device_type::NET);
    assert_eq!(g.dev.queue_max_sizes(), [256, 256]);
    assert_eq!(
        g.dev.features(),
        BASE_FEATURES,
        "a stream backend gets no offloads"
    );
}

#[test]
fn a_driver_that_skips_set_up_is_refused() {
    let mem = guest_memory(MEM);
    let mut g = Guest::inactive(&mem);
    let e = g
        .dev
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![
                g.rxq.device_queue(QUEUE_SIZE),
                g.txq.device_queue(QUEUE_SIZE),
            ],
            interrupt: g.irq.clone(),
            acked_features: 0,
        })
        .unwrap_err();
    assert!(matches!(e, ActivateError::LegacyDriver));
    let mut q = g.txq.device_queue(QUEUE_SIZE);
    virtio_queue::QueueT::set_ready(&mut q, false);
    let e = g
        .dev
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![g.rxq.device_queue(QUEUE_SIZE), q],
            interrupt: g.irq.clone(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap_err();
    assert!(matches!(e, ActivateError::QueueNotReady(1)));
    let e = g
        .dev
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![g.rxq.device_queue(QUEUE_SIZE)],
            interrupt: g.irq.clone(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap_err();
    assert!(matches!(
        e,
        ActivateError::QueueCount {
            expected: 2,
            got: 1
        }
    ));
}

#[test]
fn a_reset_forgets_the_buffers_but_not_the_frames() {
    let mem = guest_memory(MEM);
    let mut g = Guest::new(&mem, MRG);
    g.post_rx(&[40]);
    let f = frame(200, 11);
    g.peer.write_all(&framed(&f)).unwrap();
    g.dev.process_rx();
    // The chain is held for the frame that does not fit it.
    assert!(g.rxq.take_used().is_empty());
    g.dev.reset();
    assert!(!g.dev.backend_interest().unwrap().contains(EventSet::IN));
    // A new driver, new rings: the frame read before the reset reaches it.
    let _ = g.dev.wake.read();
    g.rxq = DriverQueue::new(&mem, RX_RING + 0x4_0000, QUEUE_SIZE);
    g.txq = DriverQueue::new(&mem, TX_RING + 0x4_0000, QUEUE_SIZE);
    let b = g.post_rx(&[2048]);
    g.activate(MRG).unwrap();
    let used = g.rxq.take_used();
    assert_eq!(used.len(), 1);
    assert_eq!(g.gather(&b, used[0].1 as usize)[VNET_HDR_LEN..], f[..]);
}

#[test]
fn a_busy_queue_yields_to_the_loop() {
    let mem = guest_memory(MEM);
    let mut g = Guest::new(&mem, 0);
    let mut p = vec![0u8; VNET_HDR_LEN];
    p.extend_from_slice(&frame(60, 0));
    let b = g.readable(&p);
    // More frames than a batch: the ring wraps while the guest keeps adding.
    for _ in 0..QUEUE_SIZE {
        g.txq.add_chain(&[b]);
    }
    let reader = std::thread::spawn({
        let mut peer = g.peer.try_clone().unwrap();
        move || {
            let mut sink = vec![0u8; 256 * (4 + 60)];
            peer.read_exact(&mut sink).unwrap();
        }
    });
    g.dev.process_tx();
    assert_eq!(g.txq.take_used().len(), QUEUE_SIZE as usize);
    assert_eq!(
        g.dev.wake.read().unwrap(),
        1,
        "rescheduled rather than looping on"
    );
    reader.join().unwrap();
}

#[test]
fn frames_longer_than_the_negotiated_mtu_are_dropped() {
    let mem = guest_memory(MEM);
    let mut g = Guest::new(&mem, 1 << n::VIRTIO_NET_F_MTU);
    let b = g.post_rx(&[4096]);
    // The MTU, an Ethernet header and a VLAN tag fit; one byte more does not.
    let long = frame(MTU as usize + 18 + 1, 1);
    let longest = frame(MTU as usize + 18, 2);
    g.peer.write_all(&framed(&long)).unwrap();
    g.peer.write_all(&framed(&longest)).unwrap();
    g.dev.process_rx();
    let used = g.rxq.take_used();
    assert_eq!(used.len(), 1);
    assert_eq!(
        g.gather(&b, used[0].1 as usize)[VNET_HDR_LEN..],
        longest[..]
    );
    assert!(g.failures().is_empty());
}

#[test]
fn on_the_device_loop_a_waiting_frame_does_not_spin_and_a_dead_backend_is_unwatched() {
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

    let mem = guest_memory(MEM);
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = failures.clone();
    let net = Net::with_backend(
        MAC,
        MTU,
        Backend::Stream(Stream::new(ours, Some(Path::new("/run/loop.sock"))).unwrap()),
        Box::new(move |msg| seen.lock().unwrap().push(msg)),
    )
    .unwrap();
    let net = Arc::new(Mutex::new(net));
    let mut manager = EventManager::<Subscriber>::new().unwrap();
    manager.add_subscriber(net.clone());
    let mut rxq = DriverQueue::new(&mem, RX_RING, QUEUE_SIZE);
    let txq = DriverQueue::new(&mem, TX_RING, QUEUE_SIZE);
    let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
    net.lock()
        .unwrap()
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![rxq.device_queue(QUEUE_SIZE), txq.device_queue(QUEUE_SIZE)],
            interrupt: irq.clone(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
    let settle = |m: &mut EventManager<Subscriber>| {
        while m.run_with_timeout(20).unwrap() > 0 {}
    };
    settle(&mut manager);

    // A frame with no buffer to go to: the loop goes quiet although the socket stays readable.
    let f = frame(100, 1);
    peer.write_all(&framed(&f)).unwrap();
    settle(&mut manager);
    assert_eq!(manager.run_with_timeout(50).unwrap(), 0, "no spinning");
    assert!(rxq.take_used().is_empty());

    // The driver adds a buffer and kicks: the frame lands.
    rxq.add_chain(&[Buf::write(BUFS, 2048)]);
    net.lock().unwrap().queue_events()[0].write(1).unwrap();
    settle(&mut manager);
    let used = rxq.take_used();
    assert_eq!(used.len(), 1);
    let mut got = vec![0u8; used[0].1 as usize];
    mem.read_slice(&mut got, GuestAddress(BUFS)).unwrap();
    assert_eq!(got[VNET_HDR_LEN..], f[..]);

    // passt goes away: reported once, and the dead socket no longer wakes the loop.
    drop(peer);
    settle(&mut manager);
    assert_eq!(
        *failures.lock().unwrap(),
        vec!["virtio-net: the network backend (passt) closed its socket /run/loop.sock"]
    );
    assert_eq!(manager.run_with_timeout(50).unwrap(), 0);
}
