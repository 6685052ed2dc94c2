//! Moving vsock packets between descriptor chains in guest memory and plain host buffers: a TX
//! chain becomes a checked header plus payload, a header plus payload becomes an RX chain. Every
//! length here comes from the guest and is checked before use; no host I/O happens here.

use std::io::{Read, Write};

use thiserror::Error;
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::packet::{Header, Op, HDR_SIZE, MAX_PAYLOAD};

/// A chain the guest handed us that we cannot use.
#[derive(Debug, Error)]
pub enum ChainError {
    /// A descriptor points outside guest RAM, or the chain is otherwise broken.
    #[error("unusable descriptor chain: {0}")]
    Chain(virtio_queue::Error),
    /// Fewer readable bytes than a header.
    #[error("the packet's {0} readable bytes cannot hold a {HDR_SIZE}-byte header")]
    ShortHeader(usize),
    /// The header claims more payload than the buffers hold.
    #[error("the header claims {claimed} payload bytes, the buffers hold {available}")]
    ShortPayload {
        /// The header's `len`.
        claimed: u32,
        /// Readable bytes after the header.
        available: usize,
    },
    /// More payload than any packet may carry.
    #[error("a payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLong(u32),
    /// Fewer writable bytes than a header.
    #[error("a receive buffer of {0} writable bytes cannot hold a {HDR_SIZE}-byte header")]
    SmallRxBuffer(usize),
    /// Copying to or from guest memory failed.
    #[error("guest memory access failed: {0}")]
    Io(std::io::Error),
}

/// A TX chain that could not be read, with its header when that much was readable (so the
/// connection it belongs to can be reset).
#[derive(Debug)]
pub struct TxError {
    /// What was wrong.
    pub error: ChainError,
    /// The header, if it was read.
    pub header: Option<Header>,
}

impl From<ChainError> for TxError {
    fn from(error: ChainError) -> Self {
        TxError {
            error,
            header: None,
        }
    }
}

/// Reads one guest packet from a TX chain: its header, and for RW its payload into `payload`
/// (cleared first). Writable descriptors in the chain are ignored, as virtio-queue's reader does.
pub fn read_tx_packet(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    payload: &mut Vec<u8>,
) -> Result<Header, TxError> {
    payload.clear();
    let mut reader: Reader<'_> = Reader::new(mem, chain).map_err(ChainError::Chain)?;
    let available = reader.available_bytes();
    if available < HDR_SIZE {
        return Err(ChainError::ShortHeader(available).into());
    }
    let mut bytes = [0u8; HDR_SIZE];
    reader.read_exact(&mut bytes).map_err(ChainError::Io)?;
    let header = Header::from_bytes(&bytes);
    if header.op != Op::Rw as u16 {
        return Ok(header);
    }
    let fail = |error| TxError {
        error,
        header: Some(header),
    };
    if header.len > MAX_PAYLOAD {
        return Err(fail(ChainError::TooLong(header.len)));
    }
    let available = reader.available_bytes();
    if available < header.len as usize {
        return Err(fail(ChainError::ShortPayload {
            claimed: header.len,
            available,
        }));
    }
    payload.resize(header.len as usize, 0);
    reader
        .read_exact(payload)
        .map_err(|e| fail(ChainError::Io(e)))?;
    Ok(header)
}

/// A receive buffer from the RX queue, checked to hold at least a header.
pub struct RxBuffer<'a> {
    writer: Writer<'a>,
}

impl<'a> RxBuffer<'a> {
    /// Checks the chain's writable part; read-only descriptors in it are ignored.
    pub fn new(
        mem: &'a GuestMemoryMmap,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
    ) -> Result<Self, ChainError> {
        let writer = Writer::new(mem, chain).map_err(ChainError::Chain)?;
        if writer.available_bytes() < HDR_SIZE {
            return Err(ChainError::SmallRxBuffer(writer.available_bytes()));
        }
        Ok(RxBuffer { writer })
    }

    /// Most payload bytes a packet in this buffer may carry.
    pub fn max_payload(&self) -> usize {
        (self.writer.available_bytes() - HDR_SIZE).min(MAX_PAYLOAD as usize)
    }

    /// Writes `header` (its `len` set to the payload's) and `payload`; returns the bytes written,
    /// for the used ring. `payload` must fit [`RxBuffer::max_payload`].
    pub fn write_packet(mut self, header: &Header, payload: &[u8]) -> Result<u32, ChainError> {
        let mut header = *header;
        header.len = payload.len() as u32;
        self.writer
            .write_all(&header.to_bytes())
            .and_then(|()| self.writer.write_all(payload))
            .map_err(ChainError::Io)?;
        Ok(self.writer.bytes_written() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{guest_memory, Buf, DriverQueue};
    use crate::devices::virtio::vsock::packet::TYPE_STREAM;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    const MEM: usize = 0x10_0000;
    const DATA: u64 = 0x8_0000;

    fn rw_header(len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 1234,
            len,
            type_: TYPE_STREAM,
            op: Op::Rw as u16,
            ..Header::default()
        }
    }

    fn pop<'m>(q: &mut Queue, mem: &'m GuestMemoryMmap) -> DescriptorChain<&'m GuestMemoryMmap> {
        q.pop_descriptor_chain(mem).expect("a chain")
    }

    fn tx(mem: &GuestMemoryMmap, bufs: &[Buf]) -> Result<(Header, Vec<u8>), TxError> {
        let mut dq = DriverQueue::new(mem, 0, 16);
        let mut q = dq.device_queue(16);
        dq.add_chain(bufs);
        let mut payload = Vec::new();
        read_tx_packet(mem, pop(&mut q, mem), &mut payload).map(|h| (h, payload))
    }

    #[test]
    fn header_and_payload_in_one_buffer() {
        let mem = guest_memory(MEM);
        mem.write_slice(&rw_header(5).to_bytes(), GuestAddress(DATA))
            .unwrap();
        mem.write_slice(b"hello", GuestAddress(DATA + 44)).unwrap();
        let (h, p) = tx(&mem, &[Buf::read(DATA, 49)]).unwrap();
        assert_eq!(h, rw_header(5));
        assert_eq!(p, b"hello");
    }

    #[test]
    fn header_split_over_descriptors_and_payload_apart() {
        let mem = guest_memory(MEM);
        let b = rw_header(3).to_bytes();
        mem.write_slice(&b[..10], GuestAddress(DATA)).unwrap();
        mem.write_slice(&b[10..], GuestAddress(DATA + 0x100))
            .unwrap();
        mem.write_slice(b"abc", GuestAddress(DATA + 0x200)).unwrap();
        let bufs = [
            Buf::read(DATA, 10),
            Buf::read(DATA + 0x100, 34),
            Buf::read(DATA + 0x200, 100),
        ];
        let (h, p) = tx(&mem, &bufs).unwrap();
        assert_eq!(h.len, 3);
        assert_eq!(p, b"abc");
    }

    #[test]
    fn short_header_is_refused() {
        let mem = guest_memory(MEM);
        let e = tx(&mem, &[Buf::read(DATA, 43)]).unwrap_err();
        assert!(matches!(e.error, ChainError::ShortHeader(43)));
        assert!(e.header.is_none());
    }

    #[test]
    fn writable_descriptors_do_not_count_as_packet_bytes() {
        let mem = guest_memory(MEM);
        mem.write_slice(&rw_header(0).to_bytes(), GuestAddress(DATA))
            .unwrap();
        let e = tx(&mem, &[Buf::write(DATA, 44)]).unwrap_err();
        assert!(matches!(e.error, ChainError::ShortHeader(0)));
    }

    #[test]
    fn payload_longer_than_buffers_is_refused_with_its_header() {
        let mem = guest_memory(MEM);
        mem.write_slice(&rw_header(100).to_bytes(), GuestAddress(DATA))
            .unwrap();
        let e = tx(&mem, &[Buf::read(DATA, 44), Buf::read(DATA + 44, 99)]).unwrap_err();
        assert!(matches!(
            e.error,
            ChainError::ShortPayload {
                claimed: 100,
                available: 99
            }
        ));
        assert_eq!(e.header, Some(rw_header(100)));
    }

    #[test]
    fn huge_len_is_refused_before_any_copy() {
        let mem = guest_memory(MEM);
        mem.write_slice(&rw_header(u32::MAX).to_bytes(), GuestAddress(DATA))
            .unwrap();
        let e = tx(&mem, &[Buf::read(DATA, 44)]).unwrap_err();
        assert!(matches!(e.error, ChainError::TooLong(u32::MAX)));
    }

    #[test]
    fn descriptors_outside_memory_are_refused() {
        let mem = guest_memory(MEM);
        for bufs in [
            vec![Buf::read(MEM as u64, 64)],
            vec![Buf::read(MEM as u64 - 10, 64)],
            vec![Buf::read(DATA, 44), Buf::read(u64::MAX - 8, 64)],
        ] {
            let e = tx(&mem, &bufs).unwrap_err();
            assert!(matches!(e.error, ChainError::Chain(_)), "{bufs:?}: {e:?}");
        }
    }

    #[test]
    fn descriptor_loops_end_at_the_queue_size() {
        let mem = guest_memory(MEM);
        mem.write_slice(&rw_header(60_000).to_bytes(), GuestAddress(DATA))
            .unwrap();
        let mut dq = DriverQueue::new(&mem, 0, 16);
        let mut q = dq.device_queue(16);
        // 0 -> 1 -> 0 -> ...: the chain stops after 16 descriptors, 16 * 44 bytes.
        dq.set_desc(0, DATA, 44, VRING_DESC_F_NEXT as u16, 1);
        dq.set_desc(1, DATA, 44, VRING_DESC_F_NEXT as u16, 0);
        dq.publish(0);
        let mut payload = Vec::new();
        let e = read_tx_packet(&mem, pop(&mut q, &mem), &mut payload).unwrap_err();
        assert!(matches!(
            e.error,
            ChainError::ShortPayload {
                claimed: 60_000,
                available: 660
            }
        ));
    }

    #[test]
    fn next_index_beyond_the_queue_ends_the_chain() {
        let mem = guest_memory(MEM);
        mem.write_slice(&rw_header(4).to_bytes(), GuestAddress(DATA))
            .unwrap();
        let mut dq = DriverQueue::new(&mem, 0, 16);
        let mut q = dq.device_queue(16);
        dq.set_desc(0, DATA, 44, VRING_DESC_F_NEXT as u16, 999);
        dq.publish(0);
        let mut payload = Vec::new();
        let e = read_tx_packet(&mem, pop(&mut q, &mem), &mut payload).unwrap_err();
        assert!(matches!(e.error, ChainError::ShortPayload { .. }));
    }

    #[test]
    fn bogus_indirect_tables_are_refused() {
        let mem = guest_memory(MEM);
        let mut dq = DriverQueue::new(&mem, 0, 16);
        let mut q = dq.device_queue(16);
        // A table length that is not a whole number of descriptors, then one outside RAM.
        dq.set_desc(0, DATA, 17, VRING_DESC_F_INDIRECT as u16, 0);
        dq.publish(0);
        dq.set_desc(1, u64::MAX - 15, 16, VRING_DESC_F_INDIRECT as u16, 0);
        dq.publish(1);
        let mut payload = Vec::new();
        for _ in 0..2 {
            let e = read_tx_packet(&mem, pop(&mut q, &mem), &mut payload).unwrap_err();
            assert!(matches!(e.error, ChainError::ShortHeader(0)), "{e:?}");
        }
    }

    #[test]
    fn rx_buffers_take_header_and_payload_across_descriptors() {
        let mem = guest_memory(MEM);
        let mut dq = DriverQueue::new(&mem, 0, 16);
        let mut q = dq.device_queue(16);
        dq.add_chain(&[Buf::write(DATA, 20), Buf::write(DATA + 0x100, 100)]);
        let buf = RxBuffer::new(&mem, pop(&mut q, &mem)).unwrap();
        assert_eq!(buf.max_payload(), 76);
        let n = buf.write_packet(&rw_header(999), b"xyz").unwrap();
        assert_eq!(n, 47);
        let mut b = [0u8; HDR_SIZE];
        mem.read_slice(&mut b[..20], GuestAddress(DATA)).unwrap();
        mem.read_slice(&mut b[20..], GuestAddress(DATA + 0x100))
            .unwrap();
        assert_eq!(
            Header::from_bytes(&b),
            rw_header(3),
            "len follows the payload"
        );
        let mut p = [0u8; 3];
        mem.read_slice(&mut p, GuestAddress(DATA + 0x100 + 24))
            .unwrap();
        assert_eq!(&p, b"xyz");
    }

    #[test]
    fn rx_buffers_too_small_read_only_or_outside_are_refused() {
        let mem = guest_memory(MEM);
        let mut dq = DriverQueue::new(&mem, 0, 16);
        let mut q = dq.device_queue(16);
        dq.add_chain(&[Buf::write(DATA, 43)]);
        dq.add_chain(&[Buf::read(DATA, 4096)]);
        dq.add_chain(&[Buf::write(MEM as u64 - 8, 4096)]);
        assert!(matches!(
            RxBuffer::new(&mem, pop(&mut q, &mem)),
            Err(ChainError::SmallRxBuffer(43))
        ));
        assert!(matches!(
            RxBuffer::new(&mem, pop(&mut q, &mem)),
            Err(ChainError::SmallRxBuffer(0))
        ));
        assert!(matches!(
            RxBuffer::new(&mem, pop(&mut q, &mem)),
            Err(ChainError::Chain(_))
        ));
    }

    #[test]
    fn rx_payload_is_capped_at_the_packet_limit() {
        let mem = guest_memory(MEM);
        let mut dq = DriverQueue::new(&mem, 0, 16);
        let mut q = dq.device_queue(16);
        dq.add_chain(&[Buf::write(DATA, 0x2_0000)]);
        let buf = RxBuffer::new(&mem, pop(&mut q, &mem)).unwrap();
        assert_eq!(buf.max_payload(), MAX_PAYLOAD as usize);
    }
}
