//! The connection table: routes checked guest packets to connections (opening host sockets for
//! guest REQUESTs), runs host handshakes (`CONNECT <port>`), and picks the next packet for the
//! guest in round-robin order. It never touches guest memory or event registration: the device
//! feeds it packets and reads `fd_changes` back, so tests can drive it with plain sockets.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use vmm_sys_util::epoll::EventSet;

use super::connection::{Connection, Kill, Next};
use super::handshake::LineReader;
use super::packet::{check_guest_header, Header, Op, MAX_PAYLOAD};
use super::unix;

/// Most host sockets (open connections plus pending handshakes) at once; more are refused, so
/// neither side can make us hold unbounded buffers (each connection may hold
/// [`super::connection::CONN_BUF_ALLOC`] bytes).
pub const MAX_CONNECTIONS: usize = 128;
/// Stateless replies (RSTs to stray packets) we queue before we stop taking guest TX packets
/// until the guest gives us receive buffers: back-pressure instead of unbounded memory.
pub const MAX_REPLIES: usize = 128;
/// Tokens below this are the device's own event sources.
pub const FIRST_CONN_TOKEN: u32 = 16;
/// Host-side ports for host-initiated connections start here, above the usual service ports.
const FIRST_HOST_PORT: u32 = 1 << 30;

/// (guest port, host port).
type Key = (u32, u32);

/// What a muxer's sockets are watched for, in either event loop: edge-triggered readability,
/// writability (credit to flush) and the peer's hang-up.
pub fn socket_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

/// The event loop a muxer's sockets are watched by (event-manager for our VMM's device, a plain
/// epoll for the vhost-user backend).
pub trait SocketWatch {
    /// Starts watching `fd` for [`socket_events`] under `token`.
    fn watch(&mut self, fd: RawFd, token: u32) -> io::Result<()>;
    /// Stops watching `stream`, which is closed right after.
    fn unwatch(&mut self, stream: &UnixStream) -> io::Result<()>;
}

/// Sockets the event loop must start or stop watching.
#[derive(Default)]
pub struct FdChanges {
    /// New sockets and their tokens: watch edge-triggered for reading and writing.
    pub added: Vec<(RawFd, u32)>,
    /// Sockets to stop watching, then close (they stay open until unregistered, so their fd
    /// numbers cannot be reused under the event loop).
    pub removed: Vec<UnixStream>,
}

struct Handshake {
    stream: UnixStream,
    line: LineReader,
}

enum Target {
    Handshake,
    Conn(Key),
}

/// All connections of one vsock device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    conns: HashMap<Key, Connection>,
    handshakes: HashMap<u32, Handshake>,
    tokens: HashMap<u32, Target>,
    rx_order: VecDeque<Key>,
    replies: VecDeque<Header>,
    next_token: u32,
    next_host_port: u32,
    scratch: Vec<u8>,
    /// Registration work for the event loop, drained after every event.
    pub fd_changes: FdChanges,
}

impl Muxer {
    /// A muxer for a guest at `guest_cid` whose host sockets live at `uds_path` (and
    /// `uds_path_<port>`).
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Self {
        Muxer {
            guest_cid,
            uds_path,
            conns: HashMap::new(),
            handshakes: HashMap::new(),
            tokens: HashMap::new(),
            rx_order: VecDeque::new(),
            replies: VecDeque::new(),
            next_token: FIRST_CONN_TOKEN,
            next_host_port: FIRST_HOST_PORT,
            scratch: vec![0; MAX_PAYLOAD as usize],
            fd_changes: FdChanges::default(),
        }
    }

    fn full(&self) -> bool {
        self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS
    }

    fn new_token(&mut self) -> u32 {
        loop {
            let t = self.next_token;
            self.next_token = self.next_token.checked_add(1).unwrap_or(FIRST_CONN_TOKEN);
            if !self.tokens.contains_key(&t) {
                return t;
            }
        }
    }

    fn watch(&mut self, stream: &UnixStream, token: u32, target: Target) {
        self.tokens.insert(token, target);
        self.fd_changes.added.push((stream.as_raw_fd(), token));
    }

    fn unwatch(&mut self, token: u32, stream: UnixStream) {
        self.tokens.remove(&token);
        // A socket opened and dropped within one event was never registered.
        match self.fd_changes.added.iter().position(|&(_, t)| t == token) {
            Some(i) => {
                self.fd_changes.added.swap_remove(i);
            }
            None => self.fd_changes.removed.push(stream),
        }
    }

    /// Takes every host connection waiting on the (non-blocking) listening socket.
    pub fn accept_all(&mut self, listener: &UnixListener) {
        loop {
            match listener.accept() {
                Ok((stream, _)) => match stream.set_nonblocking(true) {
                    Ok(()) => self.add_host_stream(stream),
                    Err(e) => tracing::warn!("vsock: cannot use a host connection: {e}"),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // E.g. out of descriptors: the listener is edge-triggered, so the next
                // connection attempt retries rather than this loop spinning.
                Err(e) => {
                    tracing::warn!("vsock: cannot accept a host connection: {e}");
                    break;
                }
            }
        }
    }

    /// Registers new sockets with the event loop and unregisters (then closes) dead ones.
    pub fn apply_fd_changes(&mut self, loop_: &mut impl SocketWatch) {
        loop {
            let changes = std::mem::take(&mut self.fd_changes);
            if changes.added.is_empty() && changes.removed.is_empty() {
                return;
            }
            for stream in changes.removed {
                // Unregister before closing: event loops track fds by number.
                if let Err(e) = loop_.unwatch(&stream) {
                    tracing::debug!("vsock: unwatching a socket: {e}");
                }
            }
            for (fd, token) in changes.added {
                if let Err(e) = loop_.watch(fd, token) {
                    tracing::warn!("vsock: cannot watch a host socket: {e}");
                    self.watch_failed(token);
                }
            }
        }
    }

    /// A host process connected to the listening socket; it must now send `CONNECT <port>`.
    pub fn add_host_stream(&mut self, stream: UnixStream) {
        if self.full() {
            tracing::warn!("vsock: {MAX_CONNECTIONS} connections open; refusing a host connection");
            return;
        }
        let token = self.new_token();
        self.watch(&stream, token, Target::Handshake);
        let line = LineReader::default();
        self.handshakes.insert(token, Handshake { stream, line });
    }

    /// Readiness of a host socket.
    pub fn host_event(&mut self, token: u32, set: EventSet) {
        match self.tokens.get(&token) {
            Some(Target::Handshake) => self.continue_handshake(token),
            Some(&Target::Conn(key)) => {
                if let Some(conn) = self.conns.get_mut(&key) {
                    let r = conn.on_host_event(set).map(|()| Next::Keep);
                    self.settle(key, r);
                }
            }
            None => tracing::debug!("vsock: event for a closed socket"),
        }
    }

    fn continue_handshake(&mut self, token: u32) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        // One byte at a time: whatever follows the newline is stream data for the guest.
        let port = loop {
            match hs.stream.read(&mut byte) {
                Ok(0) => break Err("closed before `CONNECT <port>`".to_string()),
                Ok(_) => match hs.line.push(byte[0]) {
                    Ok(Some(port)) => break Ok(port),
                    Ok(None) => {}
                    Err(e) => break Err(e.to_string()),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e.to_string()),
            }
        };
        let Some(hs) = self.handshakes.remove(&token) else {
            return;
        };
        match port {
            Ok(port) => {
                let host_port = self.new_host_port(port);
                let key = (port, host_port);
                let conn = Connection::host_initiated(hs.stream, token, port, host_port);
                self.tokens.insert(token, Target::Conn(key));
                self.conns.insert(key, conn);
                self.schedule(key);
            }
            Err(why) => {
                tracing::debug!("vsock: closing a host connection: {why}");
                self.unwatch(token, hs.stream);
            }
        }
    }

    fn new_host_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let p = self.next_host_port;
            self.next_host_port = self
                .next_host_port
                .checked_add(1)
                .unwrap_or(FIRST_HOST_PORT);
            if !self.conns.contains_key(&(guest_port, p)) {
                return p;
            }
        }
    }

    /// A packet from the guest, header not yet checked; `payload` is its RW data.
    pub fn guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        let op = match check_guest_header(hdr, self.guest_cid) {
            Ok(op) => op,
            Err(why) => {
                tracing::debug!("vsock: refusing a guest packet: {why}");
                if why.wants_reset(hdr) {
                    self.reply_reset(hdr);
                }
                return;
            }
        };
        let key = (hdr.src_port, hdr.dst_port);
        match self.conns.get_mut(&key) {
            Some(conn) => {
                let r = conn.on_guest_packet(op, hdr, payload);
                self.settle(key, r);
            }
            None => match op {
                Op::Request => self.connect_to_host(hdr),
                Op::Rst => {}
                _ => self.reply_reset(hdr),
            },
        }
    }

    /// A guest packet whose payload could not be read: its connection, if any, is beyond repair.
    pub fn guest_packet_failed(&mut self, hdr: &Header) {
        if hdr.src_cid != self.guest_cid {
            return;
        }
        let key = (hdr.src_port, hdr.dst_port);
        if self.conns.contains_key(&key) {
            self.kill(key, "unreadable packet");
        } else if hdr.op != Op::Rst as u16 {
            self.reply_reset(hdr);
        }
    }

    fn connect_to_host(&mut self, hdr: &Header) {
        if self.full() {
            crate::guest_warn!("vsock: {MAX_CONNECTIONS} connections open; refusing the guest's");
            self.reply_reset(hdr);
            return;
        }
        let path = unix::port_path(&self.uds_path, hdr.dst_port);
        match unix::connect(&path) {
            Ok(stream) => {
                let token = self.new_token();
                let key = (hdr.src_port, hdr.dst_port);
                self.watch(&stream, token, Target::Conn(key));
                self.conns
                    .insert(key, Connection::guest_initiated(stream, token, hdr));
                self.schedule(key);
            }
            Err(e) => {
                tracing::debug!(
                    "vsock: guest port {} cannot reach {}: {e}",
                    hdr.src_port,
                    path.display()
                );
                self.reply_reset(hdr);
            }
        }
    }

    fn reply_reset(&mut self, hdr: &Header) {
        self.replies.push_back(hdr.reset_reply());
    }

    /// Applies what a connection operation decided.
    fn settle(&mut self, key: Key, result: Result<Next, Kill>) {
        match result {
            Ok(Next::Close) => self.remove(key),
            Err(Kill(why)) => self.kill(key, &why),
            Ok(Next::Keep) => match self.conns.get(&key) {
                Some(c) if c.is_finished() => self.kill(key, "closed on both sides"),
                Some(_) => self.schedule(key),
                None => {}
            },
        }
    }

    fn schedule(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.queued && c.has_rx_work() {
                c.queued = true;
                self.rx_order.push_back(key);
            }
        }
    }

    /// Ends a connection with an RST to the guest.
    fn kill(&mut self, key: Key, why: &str) {
        if let Some(c) = self.conns.get(&key) {
            tracing::debug!(
                "vsock: resetting guest port {} <-> host port {}: {why}",
                c.guest_port,
                c.host_port
            );
            let rst = c.reset_header(self.guest_cid);
            self.replies.push_back(rst);
            self.remove(key);
        }
    }

    /// Forgets a connection and closes its host socket.
    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            let token = c.token;
            self.unwatch(token, c.into_stream());
        }
    }

    /// The event loop could not watch `token`'s socket: give up on it.
    pub fn watch_failed(&mut self, token: u32) {
        match self.tokens.get(&token) {
            Some(&Target::Conn(key)) => self.kill(key, "cannot watch the host socket"),
            Some(Target::Handshake) => {
                if let Some(hs) = self.handshakes.remove(&token) {
                    self.unwatch(token, hs.stream);
                }
            }
            None => {}
        }
    }

    /// Whether the guest has packets coming.
    pub fn has_rx_work(&self) -> bool {
        !self.replies.is_empty() || !self.rx_order.is_empty()
    }

    /// Whether enough replies wait that guest TX should pause until the guest takes them.
    pub fn replies_full(&self) -> bool {
        self.replies.len() >= MAX_REPLIES
    }

    /// The next packet for the guest, for a receive buffer taking `max_payload` bytes; its
    /// payload is the first `len` bytes of [`Muxer::scratch`].
    pub fn next_rx(&mut self, max_payload: usize) -> Option<(Header, usize)> {
        if let Some(h) = self.replies.pop_front() {
            return Some((h, 0));
        }
        // Each queued connection gets one try per call: one that cannot use this buffer (too
        // small for its data) goes back in the queue without making us spin.
        for _ in 0..self.rx_order.len() {
            let Some(key) = self.rx_order.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            match conn.next_rx(self.guest_cid, max_payload, &mut self.scratch) {
                Ok(Some(packet)) => {
                    self.settle(key, Ok(Next::Keep));
                    return Some(packet);
                }
                Ok(None) => self.settle(key, Ok(Next::Keep)),
                Err(Kill(why)) => self.kill(key, &why),
            }
            if let Some(h) = self.replies.pop_front() {
                return Some((h, 0));
            }
        }
        None
    }

    /// Payload of the packet [`Muxer::next_rx`] returned.
    pub fn scratch(&self) -> &[u8] {
        &self.scratch
    }

    /// The guest reset the device: every connection it knew is gone. Host sockets still in the
    /// handshake stay; the guest has not heard of them.
    pub fn clear(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.replies.clear();
        self.rx_order.clear();
    }

    /// Number of open connections (not counting handshakes).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }
}
