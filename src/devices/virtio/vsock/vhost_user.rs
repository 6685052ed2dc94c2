//! The same vsock device served to QEMU as a vhost-user backend (QEMU's
//! `vhost-user-vsock-device`), for the `qemu` backend: one connection table, one packet path and
//! one hybrid Unix-socket convention for both backends, with no helper process.
//!
//! rust-vmm's `vhost-user-backend` runs the protocol on a thread of its own and the rings on a
//! worker thread, which calls [`VhostUserVsock::handle_event`] for queue kicks and for our own
//! epoll set (the listening socket and every connection's socket), watched as one descriptor.
//! Everything that touches the muxer runs under one mutex, on that worker thread.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use thiserror::Error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::muxer::{socket_events, Muxer, SocketWatch, FIRST_CONN_TOKEN};
use super::rings::{move_packets, Rings};
use super::unix::Listener;

/// Queues QEMU's device declares; it hands us the first two (the event queue stays in QEMU).
const NUM_QUEUES: usize = 3;
/// Largest ring QEMU may set up (it uses 128).
const MAX_QUEUE_SIZE: usize = 1024;
/// The event number of our socket set: the library keeps `0..=NUM_QUEUES` for the queues and
/// its exit event.
const SOCKETS: u16 = NUM_QUEUES as u16 + 1;
/// The listening socket's token in our socket set (connection tokens start higher).
const LISTENER: u64 = 1;
const _: () = assert!((FIRST_CONN_TOKEN as u64) > LISTENER);
/// Socket events taken per wake-up; more stay pending and wake the worker again.
const EVENTS_PER_WAKE: usize = 64;

/// Errors starting the backend.
#[derive(Debug, Error)]
pub enum Error {
    /// The hybrid vsock's listening socket.
    #[error("vsock: {0}")]
    Listen(#[from] super::unix::ListenError),
    /// The vhost-user socket QEMU connects to.
    #[error("cannot listen for QEMU's vhost-user connection on {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// An epoll set, eventfd or thread.
    #[error("vsock backend: {0}")]
    Io(#[from] io::Error),
    /// The vhost-user library refused to start.
    #[error("vsock backend: {0}")]
    Daemon(String),
}

/// What the worker thread changes.
struct State {
    muxer: Muxer,
    listener: Listener,
    tx_payload: Vec<u8>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// The guest broke a ring: nothing moves until the device is reset.
    broken: bool,
}

/// A vsock device for a guest at one CID, served over vhost-user.
pub struct VhostUserVsock {
    guest_cid: u64,
    state: Mutex<State>,
    /// Our socket set; the library's worker watches its descriptor as event [`SOCKETS`].
    sockets: Epoll,
}

/// Our epoll set as the muxer's socket watch.
struct EpollWatch<'a>(&'a Epoll);

impl SocketWatch for EpollWatch<'_> {
    fn watch(&mut self, fd: RawFd, token: u32) -> io::Result<()> {
        self.0.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(socket_events(), token.into()),
        )
    }

    fn unwatch(&mut self, stream: &UnixStream) -> io::Result<()> {
        self.0.ctl(
            ControlOperation::Delete,
            stream.as_raw_fd(),
            EpollEvent::default(),
        )
    }
}

impl VhostUserVsock {
    /// A device for a guest at `guest_cid` whose host sockets live at `uds_path` (listening now,
    /// so host processes may connect before the guest is up) and `uds_path_<port>`.
    pub fn new(
        guest_cid: u64,
        uds_path: &Path,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> Result<Self, Error> {
        let listener = Listener::bind(uds_path)?;
        let sockets = Epoll::new()?;
        sockets.ctl(
            ControlOperation::Add,
            listener.socket.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, LISTENER),
        )?;
        Ok(VhostUserVsock {
            guest_cid,
            state: Mutex::new(State {
                muxer: Muxer::new(guest_cid, uds_path.to_owned()),
                listener,
                tx_payload: Vec::new(),
                mem,
                broken: false,
            }),
            sockets,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere left the state as it was between two events: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes what our sockets have to say (without waiting).
    fn poll_sockets(&self, s: &mut State) {
        let mut events = [EpollEvent::default(); EVENTS_PER_WAKE];
        let n = match self.sockets.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(e) => {
                tracing::warn!("vsock: cannot read socket events: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                LISTENER => {
                    let State {
                        muxer, listener, ..
                    } = s;
                    muxer.accept_all(&listener.socket);
                }
                token => match u32::try_from(token) {
                    Ok(token) => s.muxer.host_event(token, ev.event_set()),
                    Err(_) => tracing::debug!("vsock: event for an unknown token {token}"),
                },
            }
        }
    }

    /// Moves packets between the rings and the muxer once both rings run.
    fn process(s: &mut State, vrings: &[VringRwLock]) {
        let [rx, tx, ..] = vrings else {
            return;
        };
        if s.broken {
            return;
        }
        let mem = s.mem.memory();
        let (mut rx, mut tx) = (rx.get_mut(), tx.get_mut());
        let running = |v: &vhost_user_backend::VringState| v.is_enabled() && v.get_queue().ready();
        if !running(&rx) || !running(&tx) {
            return;
        }
        let rings = Rings {
            mem: &mem,
            rx: rx.get_queue_mut(),
            tx: tx.get_queue_mut(),
        };
        match move_packets(&mut s.muxer, &mut s.tx_payload, rings) {
            Ok(notify) => {
                for (owed, vring) in [(notify.rx, &rx), (notify.tx, &tx)] {
                    if owed {
                        if let Err(e) = vring.signal_used_queue() {
                            tracing::warn!("vsock: cannot notify QEMU: {e}");
                        }
                    }
                }
            }
            Err(e) => {
                crate::guest_warn!("vsock: {e}; the device stops until the guest resets it");
                s.broken = true;
                s.muxer.clear();
            }
        }
    }

    /// The guest's driver went away: the connections it knew are gone.
    fn forget_guest(&self) {
        let mut s = self.lock();
        s.muxer.clear();
        s.broken = false;
        s.muxer.apply_fd_changes(&mut EpollWatch(&self.sockets));
    }
}

impl VhostUserBackend for VhostUserVsock {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // Streams only (no feature bit needed, virtio 1.2 5.10.3); no EVENT_IDX, so every used
        // buffer is signalled and every avail buffer kicked: vsock here carries a control
        // channel and a few streams, where simplicity beats saved notifications.
        (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG: QEMU reads the guest CID from us; MQ: it asks how many queues we have.
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&self, enabled: bool) {
        // Never offered, so never acknowledged by a well-behaved frontend.
        if enabled {
            tracing::debug!("vsock: QEMU turned on EVENT_IDX, which we did not offer");
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // struct virtio_vsock_config { le64 guest_cid; }
        let config = self.guest_cid.to_le_bytes();
        let (offset, size) = (offset as usize, size as usize);
        match offset.checked_add(size) {
            Some(end) if end <= config.len() => config[offset..end].to_vec(),
            _ => Vec::new(),
        }
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.lock().mem = mem;
        Ok(())
    }

    fn reset_device(&self) {
        self.forget_guest();
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // QEMU stops the rings when the guest resets the device or the VM stops; either way the
        // guest's side of every connection is gone.
        if queue_index == 0 {
            self.forget_guest();
        }
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::warn!("vsock: cannot create the worker's exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let mut s = self.lock();
        // Queue kicks were read by the library; we look at the whole rings either way.
        if device_event == SOCKETS {
            self.poll_sockets(&mut s);
        }
        // Any event may have made packets possible either way (guest buffers, host data, credit).
        Self::process(&mut s, vrings);
        s.muxer.apply_fd_changes(&mut EpollWatch(&self.sockets));
        Ok(())
    }
}

/// The backend serving one QEMU, on threads of its own, until QEMU goes.
pub struct Server {
    thread: JoinHandle<Result<(), String>>,
    /// A second descriptor of the vhost-user listening socket, to wake an `accept` that QEMU
    /// never answered.
    listener: OwnedFd,
}

impl Server {
    /// Listens on `socket` for QEMU's vhost-user connection (before QEMU starts, so it finds
    /// the socket) and serves a guest at `guest_cid` with host sockets at `uds_path`.
    pub fn start(guest_cid: u64, uds_path: &Path, socket: &Path) -> Result<Server, Error> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(VhostUserVsock::new(guest_cid, uds_path, mem.clone())?);
        let sockets = backend.sockets.as_raw_fd();
        let mut daemon = VhostUserDaemon::new("microvm-vsock".into(), backend, mem)
            .map_err(|e| Error::Daemon(e.to_string()))?;
        for handler in daemon.get_epoll_handlers() {
            handler
                .register_listener(sockets, EventSet::IN, SOCKETS.into())
                .map_err(Error::Io)?;
        }
        let bind_err = |source| Error::Socket {
            path: socket.to_owned(),
            source,
        };
        // A socket left by a run killed before it could clean up: ours to replace.
        let _ = std::fs::remove_file(socket);
        let unix = UnixListener::bind(socket).map_err(bind_err)?;
        let listener = unix.as_fd().try_clone_to_owned().map_err(bind_err)?;
        let mut vhost_listener = vhost::vhost_user::Listener::from(unix);
        let thread = std::thread::Builder::new()
            .name("vsock-vhost-user".into())
            .spawn(move || {
                let served = daemon
                    .start(&mut vhost_listener)
                    .and_then(|()| daemon.wait());
                for handler in daemon.get_epoll_handlers() {
                    handler.send_exit_event();
                }
                match served {
                    Ok(()) => Ok(()),
                    // QEMU went (the usual end) or never came (we stopped listening).
                    Err(vhost_user_backend::Error::HandleRequest(
                        vhost::vhost_user::Error::Disconnected
                        | vhost::vhost_user::Error::PartialMessage,
                    )) => Ok(()),
                    Err(vhost_user_backend::Error::CreateBackendListener(_)) => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            })?;
        Ok(Server { thread, listener })
    }

    /// Whether the backend has ended (QEMU went, or it failed).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Ends the backend once QEMU has gone: an `accept` still waiting is woken, and the
    /// threads are joined. Returns the backend's own failure, if it had one.
    pub fn stop(self) -> Result<(), String> {
        // A blocked accept on a shut-down listening socket returns EINVAL.
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        self.thread
            .join()
            .map_err(|_| "the vsock backend thread panicked".to_string())?
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::test_utils::{guest_memory, Buf, DriverQueue, TempDir};
    use crate::devices::virtio::vsock::packet::{Header, Op, HDR_SIZE};
    use crate::devices::virtio::vsock::tests::{hdr, CID};
    use crate::devices::virtio::vsock::unix::port_path;

    const QSIZE: u16 = 128;

    /// QEMU's side: guest memory, the two rings it hands over, and where it hears calls.
    struct Frontend<'m> {
        mem: &'m GuestMemoryMmap,
        rxq: DriverQueue<'m>,
        txq: DriverQueue<'m>,
        vrings: Vec<VringRwLock>,
        calls: std::io::PipeReader,
        next_buf: u64,
    }

    impl<'m> Frontend<'m> {
        fn new(mem: &'m GuestMemoryMmap, atomic: &GuestMemoryAtomic<GuestMemoryMmap>) -> Self {
            let rxq = DriverQueue::new(mem, 0x1_0000, QSIZE);
            let txq = DriverQueue::new(mem, 0x4_0000, QSIZE);
            let (calls, call_writer) = std::io::pipe().unwrap();
            let vrings: Vec<VringRwLock> = (0..NUM_QUEUES)
                .map(|_| VringRwLock::new(atomic.clone(), MAX_QUEUE_SIZE as u16).unwrap())
                .collect();
            for (v, q) in vrings.iter().zip([&rxq, &txq]) {
                let (desc, avail, used) = q.addresses();
                v.set_queue_size(QSIZE);
                v.set_queue_info(desc, avail, used).unwrap();
                v.set_call(Some(File::from(OwnedFd::from(
                    call_writer.try_clone().unwrap(),
                ))));
            }
            Frontend {
                mem,
                rxq,
                txq,
                vrings,
                calls,
                next_buf: 0x10_0000,
            }
        }

        fn start(&self) {
            for v in &self.vrings[..2] {
                v.set_queue_ready(true);
                v.set_enabled(true);
            }
        }

        fn alloc(&mut self, len: u64) -> u64 {
            let at = self.next_buf;
            self.next_buf += len.next_multiple_of(0x100);
            at
        }

        fn give_rx(&mut self, count: usize) {
            for _ in 0..count {
                let at = self.alloc(4096);
                self.rxq.add_chain(&[Buf::write(at, 4096)]);
            }
        }

        fn send(&mut self, hdr: Header) {
            let at = self.alloc(HDR_SIZE as u64);
            self.mem
                .write_slice(&hdr.to_bytes(), GuestAddress(at))
                .unwrap();
            self.txq.add_chain(&[Buf::read(at, HDR_SIZE as u32)]);
        }

        /// Headers of the packets the device put in the receive ring since the last look.
        fn received(&mut self) -> Vec<Header> {
            let (desc, _, _) = self.rxq.addresses();
            self.rxq
                .take_used()
                .into_iter()
                .map(|(id, _)| {
                    let addr: u64 = self
                        .mem
                        .read_obj(GuestAddress(desc + 16 * u64::from(id)))
                        .unwrap();
                    let mut b = [0u8; HDR_SIZE];
                    self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                    Header::from_bytes(&b)
                })
                .collect()
        }

        fn event(&self, dev: &VhostUserVsock, event: u16) {
            dev.handle_event(event, EventSet::IN, &self.vrings, 0)
                .unwrap();
        }
    }

    fn setup(name: &str) -> (TempDir, GuestMemoryMmap, GuestMemoryAtomic<GuestMemoryMmap>) {
        let mem = guest_memory(0x100_0000);
        let atomic = GuestMemoryAtomic::new(mem.clone());
        (TempDir::new(name), mem, atomic)
    }

    #[test]
    fn config_is_the_guest_cid_and_reads_past_it_are_empty() {
        let (dir, _mem, atomic) = setup("vu-config");
        let dev =
            VhostUserVsock::new(0x1122_3344_5566_7788, &dir.0.join("v.sock"), atomic).unwrap();
        assert_eq!(dev.get_config(0, 8), 0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(dev.get_config(4, 4), [0x44, 0x33, 0x22, 0x11]);
        assert!(dev.get_config(6, 4).is_empty());
        assert!(dev.get_config(u32::MAX, 2).is_empty(), "no overflow");
    }

    #[test]
    fn a_guest_connection_reaches_the_host_socket_and_qemu_is_called() {
        let (dir, mem, atomic) = setup("vu-guest-connects");
        let uds = dir.0.join("v.sock");
        let dev = VhostUserVsock::new(CID, &uds, atomic.clone()).unwrap();
        let host = UnixListener::bind(port_path(&uds, 1024)).unwrap();
        let mut fe = Frontend::new(&mem, &atomic);
        fe.give_rx(4);
        fe.send(hdr(Op::Request, 5000, 1024));
        // Not running yet: nothing moves, nothing breaks.
        fe.event(&dev, 1);
        assert!(fe.received().is_empty());
        fe.start();
        fe.event(&dev, 1);
        let got = fe.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].op(), Some(Op::Response));
        assert_eq!((got[0].src_port, got[0].dst_port), (1024, 5000));
        host.accept().expect("the host socket got the connection");
        let mut call = [0u8; 8];
        fe.calls.read_exact(&mut call).unwrap();
        assert_eq!(
            u64::from_ne_bytes(call),
            1,
            "QEMU was told of the used buffers"
        );
    }

    #[test]
    fn a_host_connection_becomes_a_request_to_the_guest() {
        let (dir, mem, atomic) = setup("vu-host-connects");
        let uds = dir.0.join("v.sock");
        let dev = VhostUserVsock::new(CID, &uds, atomic.clone()).unwrap();
        let mut fe = Frontend::new(&mem, &atomic);
        fe.start();
        fe.give_rx(4);
        let mut client = UnixStream::connect(&uds).unwrap();
        client.write_all(b"CONNECT 52\n").unwrap();
        // The listener's event, then the new socket's (registered by the first).
        fe.event(&dev, SOCKETS);
        fe.event(&dev, SOCKETS);
        let got = fe.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].op(), Some(Op::Request));
        assert_eq!((got[0].dst_cid, got[0].dst_port), (CID, 52));
    }

    #[test]
    fn a_broken_ring_stops_the_device_until_the_guest_resets_it() {
        let (dir, mem, atomic) = setup("vu-broken");
        let uds = dir.0.join("v.sock");
        let dev = VhostUserVsock::new(CID, &uds, atomic.clone()).unwrap();
        let _host = UnixListener::bind(port_path(&uds, 1024)).unwrap();
        let mut fe = Frontend::new(&mem, &atomic);
        fe.start();
        fe.give_rx(4);
        // An available index a whole ring ahead of what was published.
        fe.txq.set_avail_idx(QSIZE * 2);
        fe.event(&dev, 1);
        assert!(dev.lock().broken);
        assert!(fe.received().is_empty());
        dev.stop_vring(0).unwrap();
        assert!(!dev.lock().broken, "a reset starts afresh");
    }
}
