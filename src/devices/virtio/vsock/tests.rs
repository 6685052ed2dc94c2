//! The whole device driven as a (sometimes hostile) guest would: packets go in through a TX ring
//! in in-process guest memory, come out of the RX ring, and meet real host Unix sockets.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::connection::CONN_BUF_ALLOC;
use super::muxer::MAX_REPLIES;
use super::packet::{Header, Op, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::unix::port_path;
use super::Vsock;
use crate::devices::virtio::test_utils::{guest_memory, Buf, DriverQueue, TempDir};
use crate::devices::virtio::{Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// The guest's CID in these tests (and the vhost-user backend's).
pub(super) const CID: u64 = 3;
const QSIZE: u16 = 256;
const BUFS: u64 = 0x10_0000;

/// A guest driver with its rings, its buffers and the device under test.
struct Guest<'m> {
    mem: &'m GuestMemoryMmap,
    rxq: DriverQueue<'m>,
    txq: DriverQueue<'m>,
    dev: Vsock,
    irq: Interrupt,
    next_buf: u64,
    rx_bufs: HashMap<u32, u64>,
    /// Host-socket tokens in registration order.
    tokens: Vec<u32>,
    uds: PathBuf,
}

fn memory() -> GuestMemoryMmap {
    guest_memory(0x100_0000)
}

impl<'m> Guest<'m> {
    fn new(mem: &'m GuestMemoryMmap, dir: &TempDir) -> Self {
        let uds = dir.0.join("v.sock");
        let mut dev = Vsock::new(CID, &uds).unwrap();
        let rxq = DriverQueue::new(mem, 0x1_0000, QSIZE);
        let txq = DriverQueue::new(mem, 0x4_0000, QSIZE);
        let evq = DriverQueue::new(mem, 0x7_0000, QSIZE);
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        dev.activate(Activation {
            mem: mem.clone(),
            queues: vec![
                rxq.device_queue(QSIZE),
                txq.device_queue(QSIZE),
                evq.device_queue(QSIZE),
            ],
            interrupt: irq.clone(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
        Guest {
            mem,
            rxq,
            txq,
            dev,
            irq,
            next_buf: BUFS,
            rx_bufs: HashMap::new(),
            tokens: Vec::new(),
            uds,
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let at = self.next_buf;
        self.next_buf += len.next_multiple_of(0x100);
        at
    }

    /// What the event loop would do after an event: process, then (un)register sockets.
    fn settle(&mut self) {
        self.dev.process_queues();
        let changes = std::mem::take(&mut self.dev.muxer.fd_changes);
        self.tokens.extend(changes.added.iter().map(|&(_, t)| t));
    }

    fn give_rx(&mut self, count: usize, size: u32) {
        for _ in 0..count {
            let at = self.alloc(size as u64);
            let head = self.rxq.add_chain(&[Buf::write(at, size)]);
            self.rx_bufs.insert(head as u32, at);
        }
        self.settle();
    }

    fn send_raw(&mut self, bufs: &[Buf]) {
        self.txq.add_chain(bufs);
        self.settle();
    }

    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let at = self.alloc(44 + payload.len() as u64);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(at))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(at + 44))
            .unwrap();
        self.send_raw(&[Buf::read(at, 44 + payload.len() as u32)]);
    }

    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        for (id, len) in self.rxq.take_used() {
            let at = self.rx_bufs[&id];
            if len == 0 {
                out.push((Header::default(), Vec::new()));
                continue;
            }
            let mut b = [0u8; 44];
            self.mem.read_slice(&mut b, GuestAddress(at)).unwrap();
            let h = Header::from_bytes(&b);
            assert_eq!(h.len + 44, len, "used length covers header and payload");
            let mut p = vec![0u8; h.len as usize];
            self.mem.read_slice(&mut p, GuestAddress(at + 44)).unwrap();
            out.push((h, p));
        }
        out
    }

    fn host_event(&mut self, token: u32, set: EventSet) {
        self.dev.muxer.host_event(token, set);
        self.settle();
    }

    fn tx_used(&mut self) -> usize {
        self.txq.take_used().len()
    }
}

/// A stream packet from the guest's `src_port` to the host's `dst_port`.
pub(super) fn hdr(op: Op, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: 2,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op: op as u16,
        buf_alloc: 65536,
        ..Header::default()
    }
}

fn ops(packets: &[(Header, Vec<u8>)]) -> Vec<Option<Op>> {
    packets.iter().map(|(h, _)| h.op()).collect()
}

/// A guest connection from port 1000 to host port 1234, accepted by a host listener.
fn connected(g: &mut Guest, listener: &UnixListener) -> UnixStream {
    g.send(hdr(Op::Request, 1000, 1234), &[]);
    let got = g.recv();
    assert_eq!(ops(&got), vec![Some(Op::Response)]);
    let (s, _) = listener.accept().unwrap();
    s
}

#[test]
fn guest_connects_and_data_flows_both_ways() {
    let dir = TempDir::new("vsock-flow");
    let mem = memory();
    let mut g = Guest::new(&mem, &dir);
    let listener = UnixListener::bind(port_path(&g.uds, 1234)).unwrap();
    g.give_rx(8, 4096);
    let mut host = connected(&mut g, &listener);
    assert!(g.recv().is_empty(), "nothing more yet");
    assert!(g.irq.status() & 1 == 1, "used-ring interrupt raised");

    g.send(hdr(Op::Rw, 1000, 1234).with_len(17), b"hello from guest\n");
    let mut b = [0u8; 64];
    let n = host.read(&mut b).unwrap();
    assert_eq!(&b[..n], b"hello from guest\n");
    assert_eq!(g.tx_used(), 2);

    host.write_all(b"hi").unwrap();
    let token = g.tokens[0];
    g.host_event(token, EventSet::IN);
    let got = g.recv();
    assert_eq!(ops(&got), vec![Some(Op::Rw)]);
    let (h, data) = &got[0];
    assert_eq!(data, b"hi");
    assert_eq!(
        (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (2, CID, 1234, 1000)
    );
    assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
    assert_eq!(h.fwd_cnt, 17, "the guest learns what reached the host");
}

trait WithLen {
    fn with_len(self, len: u32) -> Self;
}

impl WithLen for Header {
    fn with_len(mut self, len: u32) -> Self {
        self.len = len;
        self
    }
}

#[test]
fn host_data_is_split_to_fit_guest_buffers_and_credit() {
    let dir = TempDir::new("vsock-split");
    let mem = memory();
    let mut g = Guest::new(&mem, &dir);
    let listener = UnixListener::bind(port_path(&g.uds, 1234)).unwrap();
    g.give_rx(1, 4096);
    let mut host = connected(&mut g, &listener);
    let token = g.tokens[0];
    // The guest offers 1000 bytes of credit and 300-byte buffers.
    let mut update = hdr(Op::CreditUpdate, 1000, 1234);
    update.buf_alloc = 1000;
    g.send(update, &[]);
    host.write_all(&[5u8; 5000]).unwrap();
    g.host_event(token, EventSet::IN);
    g.give_rx(10, 300);
    let got = g.recv();
    let data: usize = got
        .iter()
        .filter(|(h, _)| h.op() == Some(Op::Rw))
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(data, 1000, "exactly the credit, never more");
    assert!(got.iter().all(|(_, d)| d.len() <= 300 - 44));
    assert_eq!(got.last().unwrap().0.op(), Some(Op::CreditRequest));
    // More credit: the rest follows.
    update.fwd_cnt = 1000;
    update.buf_alloc = 100_000;
    g.send(update, &[]);
    g.give_rx(30, 4096);
    let more: usize = g
        .recv()
        .iter()
        .filter(|(h, _)| h.op() == Some(Op::Rw))
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(more, 4000);
}

#[test]
fn guest_with_zero_credit_gets_no_data() {
    let dir = TempDir::new("vsock-zero");
    let mem = memory();
    let mut g = Guest::new(&mem, &dir);
    let listener = UnixListener::bind(port_path(&g.uds, 1234)).unwrap();
    g.give_rx(8, 4096);
    let mut req = hdr(Op::Request, 1000, 1234);
    req.buf_alloc = 0;
    g.send(req, &[]);
    assert_eq!(ops(&g.recv()), vec![Some(Op::Response)]);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(b"data").unwrap();
    let token = g.tokens[0];
    g.host_event(token, EventSet::IN);
    g.host_event(token, EventSet::IN);
    assert_eq!(ops(&g.recv()), vec![Some(Op::CreditRequest)]);
}

#[test]
fn refused_and_stray_packets_get_rst() {
    let dir = TempDir::new("vsock-stray");
    let mem = memory();
    let mut g = Guest::new(&mem, &dir);
    g.give_rx(16, 4096);
    // Nobody listens on 4321.
    g.send(hdr(Op::Request, 1000, 4321), &[]);
    let got = g.recv();
    assert_eq!(ops(&got), vec![Some(Op::Rst)]);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (4321, 1000));
    // Data, shutdowns and credit traffic for connections that do not exist.
    for op in [
        Op::Rw,
        Op::Shutdown,
        Op::CreditUpdate,
        Op::CreditRequest,
        Op::Response,
    ] {
        g.send(hdr(op, 7, 8), &[]);
    }
    assert_eq!(ops(&g.recv()), vec![Some(Op::Rst); 5]);
    // An RST is never answered; neither is a packet from another CID.
    g.send(hdr(Op::Rst, 7, 8), &[]);
    let mut spoofed = hdr(Op::Request, 7, 8);
    spoofed.src_cid = 99;
    g.send(spoofed, &[]);
    assert!(g.recv().is_empty());
    // Wrong destination, unknown op, SEQPACKET: RST.
    let mut other = hdr(Op::Request, 7, 8);
    other.dst_cid = 5;
    g.send(other, &[]);
    let mut unknown = hdr(Op::Rw, 7, 8);
    unknown.op = 42;
    g.send(unknown, &[]);
    let mut seqpacket = hdr(Op::Request, 7, 8);
    seqpacket.type_ = 2;
    g.send(seqpacket, &[]);
    assert_eq!(ops(&g.recv()), vec![Some(Op::Rst); 3]);
    assert_eq!(g.dev.muxer.connection_count(), 0);
}

#[test]
fn credit_abuse_resets_the_connection() {
    let dir = TempDir::new("vsock-abuse");
    let mem = memory();
    let mut g = Guest::new(&mem, &dir);
    let listener = UnixListener::bind(port_path(&g.uds, 1234)).unwrap();
    g.give_rx(64, 4096);
    let host = connected(&mut g, &listener);
    // The host never reads: once its socket and our buffer are full, more data is abuse.
    let chunk = vec![1u8; 60_000];
    for _ in 0..20 {
        g.send(hdr(Op::Rw, 1000, 1234).with_len(60_000), &chunk);
    }
    let got = g.recv();
    assert!(ops(&got).contains(&Some(Op::Rst)), "{:?}", ops(&got));
    assert_eq!(g.dev.muxer.connection_count(), 0);
    drop(host);
}

#[test]
fn malformed_chains_fail_alone() {
    let dir = TempDir::new("vsock-malformed");
    let mem = memory();
    let mut g = Guest::new(&mem, &dir);
    let listener = UnixListener::bind(port_path(&g.uds, 1234)).unwrap();
    g.give_rx(16, 4096);
    let mut host = connected(&mut g, &listener);
    let base = g.alloc(0x1000);
    // Short header, header outside RAM, device-writable "packet", payload longer than buffers.
    g.send_raw(&[Buf::read(base, 43)]);
    g.send_raw(&[Buf::read(0xfff_fff0, 44)]);
    g.send_raw(&[Buf::write(base, 4096)]);
    assert!(
        g.recv().is_empty(),
        "dropped without a word: no header to answer"
    );
    let lying = hdr(Op::Rw, 1000, 1234).with_len(1000);
    mem.write_slice(&lying.to_bytes(), GuestAddress(base))
        .unwrap();
    g.send_raw(&[Buf::read(base, 44 + 10)]);
    // The connection the lie was for is reset; everything was returned to the guest.
    assert_eq!(ops(&g.recv()), vec![Some(Op::Rst)]);
    assert_eq!(g.tx_used(), 5);
    let mut b = [0u8; 8];
    assert_eq!(host.read(&mut b).unwrap(), 0, "host socket closed");
    // The device still works.
    let _host2 = connected(&mut g, &listener);
}

#[test]
fn unusable_receive_buffers_are_returned_and_the_packet_waits() {
    let dir = TempDir::new("vsock-rxbad");
    let mem = memory();
    let mut g = Guest::new(&mem, &dir);
    g.send(hdr(Op::Request, 1, 2), &[]); // RST queued, no buffers yet
    let small = g.alloc(64);
    let head = g.rxq.add_chain(&[Buf::write(small, 43)]);
    g.rx_bufs.insert(head as u32, small);
    let ro = g.alloc(64);
    let head = g.rxq.add_chain(&[Buf::read(ro, 64)]);
    g.rx_bufs.insert(head as u32, ro);
    g.give_rx(1, 4096);
    let got = g.recv();
    assert_eq!(ops(&got), vec![None, None, Some(Op::Rst)]);
}

#[test]
fn reply_flood_stops_tx_until_the_guest_reads() {
    let dir = TempDir::new("vsock-flood");
    let mem = memory();
    let mut g = Guest::new(&mem, &dir);
    // No receive buffers: every stray packet wants an RST we cannot deliver.
    let count = MAX_REPLIES + 10;
    let at = g.alloc(44);
    mem.write_slice(&hdr(Op::Rw, 9, 9).to_bytes(), GuestAddress(at))
        .unwrap();
    for _ in 0..count {
        g.txq.add_chain(&[Buf::read(at, 44)]);
    }
    g.settle();
    assert_eq!(g.tx_used(), MAX_REPLIES, "TX paused at the reply limit");
    g.give_rx(QSIZE as usize - 1, 128);
    assert_eq!(g.tx_used(), 10, "and resumed once replies drained");
    assert_eq!(g.recv().len(), count);
}

#[test]
fn a_lying_available_index_stops_the_device_until_reset() {
    let dir = TempDir::new("vsock-avail");
    let mem = memory();
    let mut g = Guest::new(&mem, &dir);
    g.txq.set_avail_idx(QSIZE + 5);
    g.settle();
    assert!(g.irq.needs_reset());
    // Inert from now on, and no panic.
    g.send(hdr(Op::Request, 1, 2), &[]);
    g.give_rx(1, 4096);
    assert!(g.recv().is_empty());
}

#[test]
fn host_initiated_connection_with_handshake() {
    let dir = TempDir::new("vsock-hostinit");
    let mem = memory();
    let mut g = Guest::new(&mem, &dir);
    g.give_rx(8, 4096);
    let mut host = UnixStream::connect(&g.uds).unwrap();
    let (ours, _) = g.dev.listener.socket.accept().unwrap();
    ours.set_nonblocking(true).unwrap();
    g.dev.muxer.add_host_stream(ours);
    g.settle();
    let token = g.tokens[0];
    // Data right behind the line must not be lost.
    host.write_all(b"CONNECT 5678\nearly").unwrap();
    g.host_event(token, EventSet::IN);
    let got = g.recv();
    assert_eq!(ops(&got), vec![Some(Op::Request)]);
    let req = got[0].0;
    assert_eq!((req.dst_port, req.dst_cid), (5678, CID));
    let host_port = req.src_port;

    let mut resp = hdr(Op::Response, 5678, host_port);
    resp.buf_alloc = 4096;
    g.send(resp, &[]);
    let mut b = [0u8; 32];
    let n = host.read(&mut b).unwrap();
    assert_eq!(
        std::str::from_utf8(&b[..n]).unwrap(),
        format!("OK {host_port}\n")
    );
    let got = g.recv();
    assert_eq!(ops(&got), vec![Some(Op::Rw)]);
    assert_eq!(got[0].1, b"early");

    // Clean close from the guest: SHUTDOWN both ways, the host sees EOF, the guest an RST.
    let mut shut = hdr(Op::Shutdown, 5678, host_port);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(shut, &[]);
    assert_eq!(ops(&g.recv()), vec![Some(Op::Rst)]);
    assert_eq!(host.read(&mut b).unwrap(), 0);
}

#[test]
fn bad_handshakes_are_closed() {
    let dir = TempDir::new("vsock-badhs");
    let mem = memory();
    let mut g = Guest::new(&mem, &dir);
    g.give_rx(8, 4096);
    for line in [&b"HELLO\n"[..], b"CONNECT -1\n", &[b'9'; 100]] {
        let mut host = UnixStream::connect(&g.uds).unwrap();
        let (ours, _) = g.dev.listener.socket.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        g.dev.muxer.add_host_stream(ours);
        g.settle();
        let token = *g.tokens.last().unwrap();
        host.write_all(line).unwrap();
        g.host_event(token, EventSet::IN);
        let mut b = [0u8; 8];
        // EOF, or ECONNRESET when we left some of the line unread.
        assert!(
            matches!(host.read(&mut b), Ok(0) | Err(_)),
            "{line:?}: closed"
        );
    }
    assert!(g.recv().is_empty(), "the guest never heard of them");
}

#[test]
fn host_eof_half_close_then_guest_close() {
    let dir = TempDir::new("vsock-eof");
    let mem = memory();
    let mut g = Guest::new(&mem, &dir);
    let listener = UnixListener::bind(port_path(&g.uds, 1234)).unwrap();
    g.give_rx(8, 4096);
    let host = connected(&mut g, &listener);
    let token = g.tokens[0];
    host.shutdown(std::net::Shutdown::Write).unwrap();
    g.host_event(token, EventSet::IN | EventSet::READ_HANG_UP);
    let got = g.recv();
    assert_eq!(ops(&got), vec![Some(Op::Shutdown)]);
    assert_eq!(got[0].0.flags, SHUTDOWN_SEND);
    // The guest can still send; the host still reads.
    g.send(hdr(Op::Rw, 1000, 1234).with_len(3), b"abc");
    let mut b = [0u8; 8];
    let n = (&host).read(&mut b).unwrap();
    assert_eq!(&b[..n], b"abc");
    let mut shut = hdr(Op::Shutdown, 1000, 1234);
    shut.flags = SHUTDOWN_SEND;
    g.send(shut, &[]);
    assert_eq!(ops(&g.recv()), vec![Some(Op::Rst)]);
    assert_eq!(g.dev.muxer.connection_count(), 0);
}

#[test]
fn reset_drops_connections_and_closes_host_sockets() {
    let dir = TempDir::new("vsock-reset");
    let mem = memory();
    let mut g = Guest::new(&mem, &dir);
    let listener = UnixListener::bind(port_path(&g.uds, 1234)).unwrap();
    g.give_rx(8, 4096);
    let mut host = connected(&mut g, &listener);
    assert_eq!(g.tx_used(), 1);
    g.dev.reset();
    let changes = std::mem::take(&mut g.dev.muxer.fd_changes);
    assert_eq!(changes.removed.len(), 1);
    drop(changes);
    let mut b = [0u8; 8];
    assert_eq!(host.read(&mut b).unwrap(), 0);
    assert_eq!(g.dev.muxer.connection_count(), 0);
    // Packets after reset are not processed (the device is inactive).
    g.send(hdr(Op::Request, 1000, 1234), &[]);
    assert_eq!(g.tx_used(), 0);
}

#[test]
fn several_connections_at_once() {
    let dir = TempDir::new("vsock-many");
    let mem = memory();
    let mut g = Guest::new(&mem, &dir);
    let listener = UnixListener::bind(port_path(&g.uds, 1234)).unwrap();
    g.give_rx(64, 4096);
    let mut hosts = Vec::new();
    for port in 0..5 {
        g.send(hdr(Op::Request, 2000 + port, 1234), &[]);
        hosts.push(listener.accept().unwrap().0);
    }
    assert_eq!(ops(&g.recv()), vec![Some(Op::Response); 5]);
    for (i, h) in hosts.iter_mut().enumerate() {
        h.write_all(format!("conn{i}").as_bytes()).unwrap();
    }
    for &t in &g.tokens.clone() {
        g.host_event(t, EventSet::IN);
    }
    let mut got: Vec<(u32, Vec<u8>)> = g.recv().into_iter().map(|(h, d)| (h.dst_port, d)).collect();
    got.sort();
    let want: Vec<(u32, Vec<u8>)> = (0..5)
        .map(|i| (2000 + i, format!("conn{i}").into_bytes()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(g.dev.muxer.connection_count(), 5);
}
