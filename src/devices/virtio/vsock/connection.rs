//! One vsock stream between a guest port and a host Unix socket: its state, its flow control and
//! its host-side I/O. The socket is non-blocking and watched edge-triggered, so the connection
//! remembers whether it is readable or writable until a call says otherwise (EWOULDBLOCK).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

use super::credit::Credit;
use super::handshake::ok_line;
use super::packet::{Header, Op, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Receive buffer we advertise per connection: the most guest-to-host data we hold for a host
/// socket that is not reading.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;

/// The connection must end with an RST to the guest; the reason is for the debug log.
#[derive(Debug)]
pub struct Kill(pub String);

/// What the muxer does with a connection after a guest packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Keep it.
    Keep,
    /// Drop it without a word to the guest (it sent RST).
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated: our REQUEST is queued or sent, the guest has not answered.
    Requesting,
    /// Data may flow.
    Established,
}

/// Control packets owed to the guest, each at most once: repeated causes coalesce, so a chatty
/// guest cannot make us queue without bound.
#[derive(Debug, Default)]
struct Owed {
    request: bool,
    response: bool,
    credit_update: bool,
    credit_request: bool,
}

impl Owed {
    fn any(&self) -> bool {
        self.request || self.response || self.credit_update || self.credit_request
    }
}

/// One connection.
pub struct Connection {
    stream: UnixStream,
    /// Event-loop token of `stream`.
    pub token: u32,
    /// The guest's port.
    pub guest_port: u32,
    /// Our (host-side) port.
    pub host_port: u32,
    state: State,
    credit: Credit,
    /// Guest bytes (and, first, our `OK` line) waiting for the host socket.
    to_host: VecDeque<u8>,
    /// How many bytes at the front of `to_host` are our `OK` line rather than guest data.
    greeting: usize,
    owed: Owed,
    readable: bool,
    writable: bool,
    /// The host closed its socket entirely (EPOLLHUP).
    host_hup: bool,
    /// The host socket hit end-of-file and the guest was told (SHUTDOWN SEND).
    host_eof: bool,
    /// The guest will send no more (SHUTDOWN SEND).
    guest_done_sending: bool,
    /// The guest will receive no more (SHUTDOWN RCV).
    guest_done_receiving: bool,
    host_write_shut: bool,
    /// A CREDIT_REQUEST went out and the guest has not spoken since.
    credit_requested: bool,
    /// Whether the muxer has this connection in its RX round-robin.
    pub queued: bool,
}

fn kill(what: &str, e: io::Error) -> Kill {
    Kill(format!("{what}: {e}"))
}

/// Writes as much of `data` to the host as it takes now; clears `writable` when it is full.
fn write_host(stream: &mut UnixStream, data: &[u8], writable: &mut bool) -> Result<usize, Kill> {
    let mut done = 0;
    while done < data.len() {
        // Rust ignores SIGPIPE, so a closed peer is an EPIPE error here, not a signal.
        match stream.write(&data[done..]) {
            Ok(0) => return Err(Kill("the host socket takes no more data".into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                *writable = false;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(kill("writing to the host socket", e)),
        }
    }
    Ok(done)
}

impl Connection {
    fn new(
        stream: UnixStream,
        token: u32,
        guest_port: u32,
        host_port: u32,
        state: State,
        readable: bool,
    ) -> Self {
        Connection {
            stream,
            token,
            guest_port,
            host_port,
            state,
            credit: Credit::new(CONN_BUF_ALLOC),
            to_host: VecDeque::new(),
            greeting: 0,
            owed: Owed::default(),
            readable,
            writable: true,
            host_hup: false,
            host_eof: false,
            guest_done_sending: false,
            guest_done_receiving: false,
            host_write_shut: false,
            credit_requested: false,
            queued: false,
        }
    }

    /// The guest asked for `host_port` and we connected `stream` to it: answer RESPONSE.
    pub fn guest_initiated(stream: UnixStream, token: u32, request: &Header) -> Self {
        // A fresh socket: registering it reports whatever is readable.
        let mut c = Connection::new(
            stream,
            token,
            request.src_port,
            request.dst_port,
            State::Established,
            false,
        );
        c.credit.update_peer(request.buf_alloc, request.fwd_cnt);
        c.owed.response = true;
        c
    }

    /// A host process asked for `guest_port`: send the guest a REQUEST from `host_port`.
    pub fn host_initiated(stream: UnixStream, token: u32, guest_port: u32, host_port: u32) -> Self {
        // Bytes may already wait behind the CONNECT line, and the edge-triggered watch (made
        // during the handshake) would not report them again: assume readable until EWOULDBLOCK.
        let mut c = Connection::new(
            stream,
            token,
            guest_port,
            host_port,
            State::Requesting,
            true,
        );
        c.owed.request = true;
        c
    }

    /// The host socket, to hand back for unregistering and closing.
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// The socket, for event registration.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// An RST for this connection.
    pub fn reset_header(&self, guest_cid: u64) -> Header {
        Header::to_guest(guest_cid, self.host_port, self.guest_port, Op::Rst)
    }

    fn wants_to_read(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_eof
            && !self.guest_done_receiving
    }

    /// Whether [`Connection::next_rx`] has something for the guest.
    pub fn has_rx_work(&self) -> bool {
        self.owed.any()
            || (self.wants_to_read() && (self.credit.peer_credit() > 0 || !self.credit_requested))
    }

    /// Both directions are over and everything the guest sent reached the host: time for the
    /// RST that ends a clean close (virtio 1.2, 5.10.6.6).
    pub fn is_finished(&self) -> bool {
        self.state == State::Established
            && self.guest_done_sending
            && self.to_host.is_empty()
            && (self.host_eof || self.guest_done_receiving)
    }

    /// Handles a checked packet from the guest for this connection.
    pub fn on_guest_packet(&mut self, op: Op, hdr: &Header, payload: &[u8]) -> Result<Next, Kill> {
        self.credit.update_peer(hdr.buf_alloc, hdr.fwd_cnt);
        self.credit_requested = false;
        match (self.state, op) {
            (_, Op::Rst) => return Ok(Next::Close),
            (State::Requesting, Op::Response) => {
                self.state = State::Established;
                let line = ok_line(self.host_port);
                self.greeting = line.len();
                self.to_host.extend(line.as_bytes());
                self.flush()?;
            }
            (State::Requesting, other) => {
                return Err(Kill(format!("guest sent {other:?} instead of RESPONSE")))
            }
            (State::Established, Op::Rw) => self.data_from_guest(payload)?,
            (State::Established, Op::CreditUpdate) => {}
            (State::Established, Op::CreditRequest) => self.owed.credit_update = true,
            (State::Established, Op::Shutdown) => self.guest_shutdown(hdr.flags),
            (State::Established, other @ (Op::Request | Op::Response)) => {
                return Err(Kill(format!("guest sent {other:?} on an open connection")))
            }
        }
        Ok(Next::Keep)
    }

    fn data_from_guest(&mut self, payload: &[u8]) -> Result<(), Kill> {
        if self.guest_done_sending {
            return Err(Kill("guest sent data after SHUTDOWN SEND".into()));
        }
        self.credit
            .receive_from_guest(payload.len() as u32)
            .map_err(|e| Kill(e.to_string()))?;
        let mut rest = payload;
        if self.to_host.is_empty() && self.writable {
            let n = write_host(&mut self.stream, rest, &mut self.writable)?;
            self.credit.forwarded(n as u32);
            rest = &rest[n..];
        }
        // Bounded: the credit check above keeps to_host within CONN_BUF_ALLOC (plus the OK line).
        self.to_host.extend(rest);
        self.after_host_write();
        Ok(())
    }

    fn guest_shutdown(&mut self, flags: u32) {
        if flags & SHUTDOWN_SEND != 0 {
            self.guest_done_sending = true;
        }
        if flags & SHUTDOWN_RCV != 0 && !self.guest_done_receiving {
            self.guest_done_receiving = true;
            // The host process gets EPIPE on its next write rather than writing into a void.
            let _ = self.stream.shutdown(Shutdown::Read);
        }
        self.after_host_write();
    }

    /// Handles readiness of the host socket.
    pub fn on_host_event(&mut self, set: EventSet) -> Result<(), Kill> {
        if set
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            self.readable = true;
        }
        if set.contains(EventSet::HANG_UP) {
            self.host_hup = true;
        }
        if self.state == State::Requesting && set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            return Err(Kill("the host closed before the guest answered".into()));
        }
        if set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            self.writable = true;
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Kill> {
        while !self.to_host.is_empty() && self.writable {
            let (front, _) = self.to_host.as_slices();
            let n = write_host(&mut self.stream, front, &mut self.writable)?;
            self.to_host.drain(..n);
            let ours = n.min(self.greeting);
            self.greeting -= ours;
            self.credit.forwarded((n - ours) as u32);
        }
        self.after_host_write();
        Ok(())
    }

    fn after_host_write(&mut self) {
        if self.to_host.is_empty() && self.guest_done_sending && !self.host_write_shut {
            self.host_write_shut = true;
            // The host process reads end-of-file once it has everything the guest sent.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.credit.update_due() && !self.guest_done_sending {
            self.owed.credit_update = true;
        }
    }

    /// The next packet for the guest, in a receive buffer taking up to `max_payload` bytes;
    /// RW data is read from the host socket into `scratch`. Returns the header and payload size.
    pub fn next_rx(
        &mut self,
        guest_cid: u64,
        max_payload: usize,
        scratch: &mut [u8],
    ) -> Result<Option<(Header, usize)>, Kill> {
        let mut flags = 0;
        let mut len = 0;
        let op = if std::mem::take(&mut self.owed.request) {
            Op::Request
        } else if std::mem::take(&mut self.owed.response) {
            Op::Response
        } else if std::mem::take(&mut self.owed.credit_update) {
            Op::CreditUpdate
        } else if std::mem::take(&mut self.owed.credit_request) {
            Op::CreditRequest
        } else if !self.wants_to_read() {
            return Ok(None);
        } else if self.credit.peer_credit() == 0 {
            if self.credit_requested {
                return Ok(None);
            }
            // Out of guest credit with data waiting: ask, once, rather than wait on luck.
            self.credit_requested = true;
            Op::CreditRequest
        } else {
            let want = max_payload
                .min(self.credit.peer_credit() as usize)
                .min(scratch.len());
            if want == 0 {
                return Ok(None);
            }
            match self.stream.read(&mut scratch[..want]) {
                Ok(0) => {
                    self.host_eof = true;
                    flags = SHUTDOWN_SEND;
                    if self.host_hup || self.guest_done_sending {
                        flags |= SHUTDOWN_RCV;
                    }
                    Op::Shutdown
                }
                Ok(n) => {
                    self.credit.sent_to_guest(n as u32);
                    len = n;
                    Op::Rw
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(None);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(None),
                Err(e) => return Err(kill("reading the host socket", e)),
            }
        };
        let mut hdr = Header::to_guest(guest_cid, self.host_port, self.guest_port, op);
        (hdr.buf_alloc, hdr.fwd_cnt) = self.credit.stamp();
        hdr.flags = flags;
        hdr.len = len as u32;
        Ok(Some((hdr, len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::packet::TYPE_STREAM;

    const CID: u64 = 3;

    fn guest(op: Op, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 1234,
            type_: TYPE_STREAM,
            op: op as u16,
            buf_alloc,
            fwd_cnt,
            ..Header::default()
        }
    }

    fn pair() -> (Connection, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        theirs.set_nonblocking(true).unwrap();
        (
            Connection::guest_initiated(ours, 16, &guest(Op::Request, 4096, 0)),
            theirs,
        )
    }

    fn rx(c: &mut Connection, max: usize) -> Option<(Header, Vec<u8>)> {
        let mut scratch = vec![0u8; 65536];
        c.next_rx(CID, max, &mut scratch)
            .unwrap()
            .map(|(h, n)| (h, scratch[..n].to_vec()))
    }

    #[test]
    fn guest_connection_answers_then_relays_data() {
        let (mut c, mut host) = pair();
        let (h, _) = rx(&mut c, 4096).unwrap();
        assert_eq!(h.op(), Some(Op::Response));
        assert_eq!((h.src_port, h.dst_port, h.dst_cid), (1234, 1000, CID));
        assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
        assert!(rx(&mut c, 4096).is_none());

        c.on_guest_packet(Op::Rw, &guest(Op::Rw, 4096, 0), b"ping")
            .unwrap();
        let mut b = [0u8; 16];
        assert_eq!(host.read(&mut b).unwrap(), 4);
        assert_eq!(&b[..4], b"ping");

        host.write_all(b"pong").unwrap();
        c.on_host_event(EventSet::IN).unwrap();
        assert!(c.has_rx_work());
        let (h, data) = rx(&mut c, 4096).unwrap();
        assert_eq!(
            (h.op(), h.len, data.as_slice()),
            (Some(Op::Rw), 4, &b"pong"[..])
        );
        assert!(rx(&mut c, 4096).is_none(), "drained: would block");
        assert!(!c.has_rx_work());
    }

    #[test]
    fn zero_guest_credit_means_nothing_is_read_and_credit_is_requested_once() {
        let (mut c, mut host) = pair();
        rx(&mut c, 4096); // RESPONSE
        c.on_guest_packet(Op::CreditUpdate, &guest(Op::CreditUpdate, 0, 0), &[])
            .unwrap();
        host.write_all(b"data").unwrap();
        c.on_host_event(EventSet::IN).unwrap();
        let (h, _) = rx(&mut c, 4096).unwrap();
        assert_eq!(h.op(), Some(Op::CreditRequest));
        assert!(!c.has_rx_work());
        assert!(rx(&mut c, 4096).is_none());
        // The guest grants 3 bytes: exactly 3 go out.
        c.on_guest_packet(Op::CreditUpdate, &guest(Op::CreditUpdate, 3, 0), &[])
            .unwrap();
        let (h, data) = rx(&mut c, 4096).unwrap();
        assert_eq!((h.op(), data.as_slice()), (Some(Op::Rw), &b"dat"[..]));
        // Credit used up again.
        assert!(matches!(rx(&mut c, 4096), Some((h, _)) if h.op() == Some(Op::CreditRequest)));
        assert!(rx(&mut c, 4096).is_none());
    }

    #[test]
    fn rx_respects_the_buffer_size() {
        let (mut c, mut host) = pair();
        rx(&mut c, 4096);
        host.write_all(&[7u8; 100]).unwrap();
        c.on_host_event(EventSet::IN).unwrap();
        let (_, data) = rx(&mut c, 10).unwrap();
        assert_eq!(data.len(), 10);
        assert!(
            rx(&mut c, 0).is_none(),
            "a header-only buffer carries no data"
        );
    }

    #[test]
    fn guest_sending_beyond_our_credit_is_killed() {
        let (mut c, host) = pair();
        // The host never reads: the first 256 KiB fit (socket buffer plus ours), then no more.
        let chunk = vec![1u8; 64 * 1024];
        let mut sent = 0u32;
        let err = loop {
            match c.on_guest_packet(Op::Rw, &guest(Op::Rw, 4096, 0), &chunk) {
                Ok(_) => sent += chunk.len() as u32,
                Err(e) => break e,
            }
            assert!(sent < 64 * 1024 * 1024, "never refused");
        };
        assert!(err.0.contains("credit"), "{err:?}");
        drop(host);
    }

    #[test]
    fn full_host_socket_buffers_and_flushes_with_a_credit_update() {
        let (mut c, mut host) = pair();
        rx(&mut c, 4096);
        let chunk = vec![9u8; 32 * 1024];
        // Fill the socket and part of our buffer, within credit.
        let mut total = 0;
        while c.to_host.is_empty() {
            c.on_guest_packet(Op::Rw, &guest(Op::Rw, 4096, 0), &chunk)
                .unwrap();
            total += chunk.len();
        }
        assert!(!c.writable);
        // The host drains everything; the edge makes us flush.
        let mut got = 0;
        let mut b = vec![0u8; 1 << 20];
        while got < total {
            match host.read(&mut b) {
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.on_host_event(EventSet::OUT).unwrap();
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(c.to_host.is_empty());
        let (h, _) = rx(&mut c, 4096).unwrap();
        assert_eq!(h.op(), Some(Op::CreditUpdate));
        assert_eq!(h.fwd_cnt as usize, total);
    }

    #[test]
    fn clean_close_from_the_guest() {
        let (mut c, mut host) = pair();
        rx(&mut c, 4096);
        c.on_guest_packet(Op::Rw, &guest(Op::Rw, 4096, 0), b"bye")
            .unwrap();
        let mut shut = guest(Op::Shutdown, 4096, 0);
        shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        c.on_guest_packet(Op::Shutdown, &shut, &[]).unwrap();
        assert!(c.is_finished());
        let mut b = Vec::new();
        host.set_nonblocking(false).unwrap();
        host.read_to_end(&mut b).unwrap();
        assert_eq!(b, b"bye", "data, then end-of-file");
        assert!(c
            .on_guest_packet(Op::Rw, &guest(Op::Rw, 4096, 0), b"x")
            .is_err());
    }

    #[test]
    fn host_eof_becomes_shutdown_and_then_finishes_with_the_guest() {
        let (mut c, host) = pair();
        rx(&mut c, 4096);
        host.shutdown(Shutdown::Write).unwrap();
        c.on_host_event(EventSet::IN | EventSet::READ_HANG_UP)
            .unwrap();
        let (h, _) = rx(&mut c, 4096).unwrap();
        assert_eq!((h.op(), h.flags), (Some(Op::Shutdown), SHUTDOWN_SEND));
        assert!(!c.is_finished());
        let mut shut = guest(Op::Shutdown, 4096, 0);
        shut.flags = SHUTDOWN_SEND;
        c.on_guest_packet(Op::Shutdown, &shut, &[]).unwrap();
        assert!(c.is_finished());
    }

    fn host_initiated() -> (Connection, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut c = Connection::host_initiated(ours, 16, 5678, 1 << 30);
        let (h, _) = rx(&mut c, 4096).unwrap();
        assert_eq!(h.op(), Some(Op::Request));
        assert_eq!((h.src_port, h.dst_port), (1 << 30, 5678));
        (c, host)
    }

    #[test]
    fn host_initiated_handshake_writes_ok_outside_the_credit() {
        let (mut c, mut host) = host_initiated();
        c.on_guest_packet(Op::Response, &guest(Op::Response, 4096, 0), &[])
            .unwrap();
        let mut b = [0u8; 32];
        let n = host.read(&mut b).unwrap();
        assert_eq!(&b[..n], b"OK 1073741824\n");
        assert!(!c.credit.update_due(), "the OK line is not guest data");
        assert_eq!(c.credit.stamp(), (CONN_BUF_ALLOC, 0));
    }

    #[test]
    fn host_initiated_refuses_anything_but_an_answer() {
        let (mut c, _host) = host_initiated();
        assert!(c
            .on_guest_packet(Op::Rw, &guest(Op::Rw, 4096, 0), b"x")
            .is_err());
        let (mut c, host) = host_initiated();
        drop(host);
        assert!(c.on_host_event(EventSet::IN | EventSet::HANG_UP).is_err());
    }

    #[test]
    fn protocol_violations_kill_and_rst_closes() {
        let (mut c, _host) = pair();
        assert!(c
            .on_guest_packet(Op::Request, &guest(Op::Request, 0, 0), &[])
            .is_err());
        let (mut c, _host) = pair();
        assert!(c
            .on_guest_packet(Op::Response, &guest(Op::Response, 0, 0), &[])
            .is_err());
        let (mut c, _host) = pair();
        assert_eq!(
            c.on_guest_packet(Op::Rst, &guest(Op::Rst, 0, 0), &[])
                .unwrap(),
            Next::Close
        );
    }
}
