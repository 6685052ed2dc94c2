//! The virtio-vsock packet header (virtio 1.2, 5.10.6): 44 little-endian bytes in front of every
//! packet, and the checks a guest packet must pass before the device acts on it. Pure data: no
//! guest memory, no sockets.

use thiserror::Error;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;
/// The host's context id: guests reach the host (us) at CID 2.
pub const HOST_CID: u64 = 2;
/// The only socket type we support: byte streams.
pub const TYPE_STREAM: u16 = 1;
/// Largest payload we accept from or send to the guest in one packet (Linux's
/// VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Packet operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Open a connection.
    Request = 1,
    /// Accept a connection.
    Response = 2,
    /// Abort a connection, or refuse a packet.
    Rst = 3,
    /// Close one or both directions.
    Shutdown = 4,
    /// Stream data.
    Rw = 5,
    /// The sender's receive buffer state changed.
    CreditUpdate = 6,
    /// Please send a credit update.
    CreditRequest = 7,
}

impl Op {
    fn from_u16(op: u16) -> Option<Op> {
        Some(match op {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// `struct virtio_vsock_hdr`, field for field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Sender's context id.
    pub src_cid: u64,
    /// Receiver's context id.
    pub dst_cid: u64,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Payload length (RW only).
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation, see [`Op`].
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

fn le<const N: usize>(b: &[u8; HDR_SIZE], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

impl Header {
    /// Decodes the wire layout.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        Header {
            src_cid: u64::from_le_bytes(le(b, 0)),
            dst_cid: u64::from_le_bytes(le(b, 8)),
            src_port: u32::from_le_bytes(le(b, 16)),
            dst_port: u32::from_le_bytes(le(b, 20)),
            len: u32::from_le_bytes(le(b, 24)),
            type_: u16::from_le_bytes(le(b, 28)),
            op: u16::from_le_bytes(le(b, 30)),
            flags: u32::from_le_bytes(le(b, 32)),
            buf_alloc: u32::from_le_bytes(le(b, 36)),
            fwd_cnt: u32::from_le_bytes(le(b, 40)),
        }
    }

    /// Encodes the wire layout.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The operation, if it is one we know.
    pub fn op(&self) -> Option<Op> {
        Op::from_u16(self.op)
    }

    /// A host-to-guest stream packet between `host_port` and `guest_port`.
    pub fn to_guest(guest_cid: u64, host_port: u32, guest_port: u32, op: Op) -> Self {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: host_port,
            dst_port: guest_port,
            type_: TYPE_STREAM,
            op: op as u16,
            ..Header::default()
        }
    }

    /// The RST answering this (guest) packet: addresses swapped, no credit information.
    pub fn reset_reply(&self) -> Self {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: Op::Rst as u16,
            ..Header::default()
        }
    }
}

/// Why a guest packet is not acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Rejection {
    /// Not from our guest's CID: no valid address to answer to, so it is dropped.
    #[error("source CID {0} is not the guest's")]
    WrongSource(u64),
    /// Addressed to someone other than the host: answered with RST.
    #[error("destination CID {0} is not the host")]
    WrongDestination(u64),
    /// Not a stream packet (e.g. SEQPACKET, which we do not offer): answered with RST.
    #[error("unsupported socket type {0}")]
    WrongType(u16),
    /// An operation code we do not know: answered with RST.
    #[error("unknown operation {0}")]
    UnknownOp(u16),
    /// An RW payload longer than any packet may be: answered with RST.
    #[error("payload of {0} bytes is larger than {MAX_PAYLOAD}")]
    TooLong(u32),
}

impl Rejection {
    /// Whether the guest should get an RST back (never for RSTs, which would ping-pong).
    pub fn wants_reset(&self, hdr: &Header) -> bool {
        !matches!(self, Rejection::WrongSource(_)) && hdr.op != Op::Rst as u16
    }
}

/// Checks a header the guest sent from `guest_cid` before anything else looks at it.
pub fn check_guest_header(hdr: &Header, guest_cid: u64) -> Result<Op, Rejection> {
    if hdr.src_cid != guest_cid {
        return Err(Rejection::WrongSource(hdr.src_cid));
    }
    if hdr.dst_cid != HOST_CID {
        return Err(Rejection::WrongDestination(hdr.dst_cid));
    }
    if hdr.type_ != TYPE_STREAM {
        return Err(Rejection::WrongType(hdr.type_));
    }
    let op = hdr.op().ok_or(Rejection::UnknownOp(hdr.op))?;
    if op == Op::Rw && hdr.len > MAX_PAYLOAD {
        return Err(Rejection::TooLong(hdr.len));
    }
    Ok(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 1234,
            len: 17,
            type_: TYPE_STREAM,
            op: Op::Rw as u16,
            flags: 0,
            buf_alloc: 0x4_0000,
            fwd_cnt: 99,
        }
    }

    #[test]
    fn wire_layout_is_little_endian_and_packed() {
        let b = sample().to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[8..16], &2u64.to_le_bytes());
        assert_eq!(&b[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[20..24], &1234u32.to_le_bytes());
        assert_eq!(&b[24..28], &17u32.to_le_bytes());
        assert_eq!(&b[28..30], &[1, 0]);
        assert_eq!(&b[30..32], &[5, 0]);
        assert_eq!(&b[36..40], &0x4_0000u32.to_le_bytes());
        assert_eq!(&b[40..44], &99u32.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), sample());
    }

    #[test]
    fn any_bytes_decode_and_round_trip() {
        let b: [u8; HDR_SIZE] = std::array::from_fn(|i| (i * 37 + 11) as u8);
        assert_eq!(Header::from_bytes(&b).to_bytes(), b);
    }

    #[test]
    fn guest_headers_are_checked() {
        assert_eq!(check_guest_header(&sample(), 3), Ok(Op::Rw));
        let mut h = sample();
        h.src_cid = 4;
        assert_eq!(check_guest_header(&h, 3), Err(Rejection::WrongSource(4)));
        assert!(!Rejection::WrongSource(4).wants_reset(&h));
        let mut h = sample();
        h.dst_cid = 1;
        assert_eq!(
            check_guest_header(&h, 3),
            Err(Rejection::WrongDestination(1))
        );
        let mut h = sample();
        h.type_ = 2;
        assert_eq!(check_guest_header(&h, 3), Err(Rejection::WrongType(2)));
        for op in [0u16, 8, 0xffff] {
            let mut h = sample();
            h.op = op;
            assert_eq!(check_guest_header(&h, 3), Err(Rejection::UnknownOp(op)));
            assert!(Rejection::UnknownOp(op).wants_reset(&h));
        }
        let mut h = sample();
        h.len = MAX_PAYLOAD + 1;
        assert_eq!(
            check_guest_header(&h, 3),
            Err(Rejection::TooLong(MAX_PAYLOAD + 1))
        );
        // Only RW carries a payload; a length on other ops is ignored.
        h.op = Op::CreditRequest as u16;
        assert_eq!(check_guest_header(&h, 3), Ok(Op::CreditRequest));
    }

    #[test]
    fn never_reset_a_reset() {
        let mut h = sample();
        h.op = Op::Rst as u16;
        h.dst_cid = 7;
        assert!(!Rejection::WrongDestination(7).wants_reset(&h));
    }

    #[test]
    fn reset_reply_swaps_addresses() {
        let r = sample().reset_reply();
        assert_eq!((r.src_cid, r.dst_cid), (2, 3));
        assert_eq!((r.src_port, r.dst_port), (1234, 0x1122_3344));
        assert_eq!(r.op(), Some(Op::Rst));
        assert_eq!(r.len, 0);
    }
}
