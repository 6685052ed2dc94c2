//! Descriptor chains to checked frames and receive buffers. Every length, address and flag here
//! comes from the guest and is checked before use; a chain that breaks a rule is refused whole.
//! No host I/O happens here.

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::{ETH_HLEN, MAX_FRAME_LEN, QUEUE_SIZE, VNET_HDR_LEN};

/// Most descriptors in one chain: a direct chain cannot have more than the queue size; only an
/// indirect table could, and Linux never needs that many.
pub const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;
/// Most bytes of one transmit chain: a header and the largest frame.
pub const MAX_TX_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;

/// A chain the guest handed us that we cannot use.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    /// The head leads nowhere (an index beyond the queue, a broken indirect table).
    #[error("the chain has no usable descriptor")]
    Empty,
    /// The chain ends on a descriptor that says more follow: a loop, a next index beyond the
    /// queue, or a nested or misaligned indirect table.
    #[error("the chain is cut short (a loop or a bad next index)")]
    Truncated,
    /// More descriptors than any frame needs.
    #[error("the chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// A transmit chain must be all device-readable.
    #[error("a device-writable descriptor in a transmit chain")]
    WritableInTx,
    /// A receive chain must be all device-writable.
    #[error("a device-readable descriptor in a receive chain")]
    ReadableInRx,
    /// A buffer lies (partly) outside guest RAM.
    #[error("a {len}-byte buffer at {addr:#x} lies outside guest RAM")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Fewer bytes than the virtio-net header.
    #[error("{0} bytes cannot hold the {VNET_HDR_LEN}-byte virtio-net header")]
    ShortHeader(usize),
    /// A frame too short to be Ethernet.
    #[error("a {0}-byte frame is shorter than an Ethernet header")]
    ShortFrame(usize),
    /// A transmit chain longer than a header and the largest frame.
    #[error("a transmit chain of {0} bytes or more exceeds the {MAX_TX_LEN}-byte limit")]
    TooLong(usize),
}

/// One checked, device-writable piece of a receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest address, checked to lie in guest RAM for `len` bytes.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// Walks `chain`, handing each descriptor to `f`, and checks the rules every chain follows: at
/// least one descriptor, at most [`MAX_DESCRIPTORS`], not cut short, every buffer in guest RAM
/// and open to the device's `access`.
fn walk(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    access: Permissions,
    mut f: impl FnMut(&Descriptor) -> Result<(), ChainError>,
) -> Result<(), ChainError> {
    let mut count = 0;
    let mut more = false;
    for desc in chain {
        count += 1;
        if count > MAX_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        if !mem.check_range(desc.addr(), desc.len() as usize, access) {
            return Err(ChainError::OutsideMemory {
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        f(&desc)?;
        more = desc.has_next();
    }
    match (count, more) {
        (0, _) => Err(ChainError::Empty),
        (_, true) => Err(ChainError::Truncated),
        _ => Ok(()),
    }
}

/// Gathers a transmit chain (header then frame, as one byte string) into `buf`, which holds at
/// least [`MAX_TX_LEN`] bytes; returns its length.
pub fn read_tx_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
) -> Result<usize, ChainError> {
    let limit = buf.len().min(MAX_TX_LEN);
    let mut len = 0usize;
    walk(mem, chain, Permissions::Read, |d| {
        if d.is_write_only() {
            return Err(ChainError::WritableInTx);
        }
        let n = d.len() as usize;
        let end = len.checked_add(n).filter(|e| *e <= limit);
        let Some(end) = end else {
            return Err(ChainError::TooLong(len.saturating_add(n)));
        };
        // Checked to lie in guest RAM by `walk`.
        mem.read_slice(&mut buf[len..end], d.addr())
            .map_err(|_| ChainError::OutsideMemory {
                addr: d.addr().0,
                len: d.len(),
            })?;
        len = end;
        Ok(())
    })?;
    if len < VNET_HDR_LEN {
        return Err(ChainError::ShortHeader(len));
    }
    if len - VNET_HDR_LEN < ETH_HLEN {
        return Err(ChainError::ShortFrame(len - VNET_HDR_LEN));
    }
    Ok(len)
}

/// Checks a receive chain and appends its buffers to `segments` (nothing is appended if it is
/// refused); returns how many bytes it holds. Zero-length descriptors are skipped.
pub fn parse_rx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    segments: &mut Vec<Segment>,
) -> Result<usize, ChainError> {
    let start = segments.len();
    let mut capacity = 0usize;
    let walked = walk(mem, chain, Permissions::Write, |d| {
        if !d.is_write_only() {
            return Err(ChainError::ReadableInRx);
        }
        if d.len() > 0 {
            segments.push(Segment {
                addr: d.addr(),
                len: d.len(),
            });
            capacity += d.len() as usize;
        }
        Ok(())
    });
    // With or without mergeable buffers, a buffer must hold at least the header
    // (virtio 1.2, 5.1.6.3).
    let result = walked.and(if capacity < VNET_HDR_LEN {
        Err(ChainError::ShortHeader(capacity))
    } else {
        Ok(capacity)
    });
    if result.is_err() {
        segments.truncate(start);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{guest_memory, Buf, DriverQueue};
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::{Queue, QueueT};

    const MEM: usize = 0x10_0000;
    const DATA: u64 = 0x8_0000;

    fn pop<'m>(q: &mut Queue, mem: &'m GuestMemoryMmap) -> DescriptorChain<&'m GuestMemoryMmap> {
        q.pop_descriptor_chain(mem).expect("a chain")
    }

    fn tx(mem: &GuestMemoryMmap, bufs: &[Buf]) -> Result<Vec<u8>, ChainError> {
        let mut dq = DriverQueue::new(mem, 0, 16);
        let mut q = dq.device_queue(16);
        dq.add_chain(bufs);
        let mut buf = vec![0u8; MAX_TX_LEN];
        let n = read_tx_frame(mem, pop(&mut q, mem), &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    fn rx(mem: &GuestMemoryMmap, bufs: &[Buf]) -> (Result<usize, ChainError>, Vec<Segment>) {
        let mut dq = DriverQueue::new(mem, 0, 16);
        let mut q = dq.device_queue(16);
        dq.add_chain(bufs);
        let mut segs = Vec::new();
        let r = parse_rx_chain(mem, pop(&mut q, mem), &mut segs);
        (r, segs)
    }

    #[test]
    fn a_frame_is_gathered_across_descriptors() {
        let mem = guest_memory(MEM);
        let frame: Vec<u8> = (0..100u8).collect();
        mem.write_slice(&[7u8; 12], GuestAddress(DATA)).unwrap();
        mem.write_slice(&frame[..30], GuestAddress(DATA + 0x100))
            .unwrap();
        mem.write_slice(&frame[30..], GuestAddress(DATA + 0x200))
            .unwrap();
        let got = tx(
            &mem,
            &[
                Buf::read(DATA, 12),
                Buf::read(DATA + 0x100, 30),
                Buf::read(DATA + 0x200, 70),
            ],
        )
        .unwrap();
        assert_eq!(got[..12], [7u8; 12]);
        assert_eq!(got[12..], frame[..]);
    }

    #[test]
    fn hostile_transmit_chains_are_refused() {
        let mem = guest_memory(MEM);
        let e = tx(&mem, &[Buf::read(DATA, 12), Buf::write(DATA + 12, 64)]).unwrap_err();
        assert_eq!(e, ChainError::WritableInTx);
        assert_eq!(
            tx(&mem, &[Buf::read(DATA, 11)]).unwrap_err(),
            ChainError::ShortHeader(11)
        );
        assert_eq!(
            tx(&mem, &[Buf::read(DATA, 12 + 13)]).unwrap_err(),
            ChainError::ShortFrame(13)
        );
        for bufs in [
            vec![Buf::read(MEM as u64, 64)],
            vec![Buf::read(MEM as u64 - 10, 64)],
            vec![Buf::read(DATA, 12), Buf::read(u64::MAX - 8, 64)],
        ] {
            let e = tx(&mem, &bufs).unwrap_err();
            assert!(
                matches!(e, ChainError::OutsideMemory { .. }),
                "{bufs:?}: {e:?}"
            );
        }
        let e = tx(&mem, &[Buf::read(DATA, MAX_TX_LEN as u32 + 1)]).unwrap_err();
        assert!(matches!(e, ChainError::TooLong(_)), "{e:?}");
        let e = tx(&mem, &[Buf::read(DATA, 40_000), Buf::read(DATA, 40_000)]).unwrap_err();
        assert_eq!(e, ChainError::TooLong(80_000));
    }

    #[test]
    fn looping_and_dangling_chains_are_refused() {
        let mem = guest_memory(MEM);
        let mut dq = DriverQueue::new(&mem, 0, 16);
        let mut q = dq.device_queue(16);
        let mut buf = vec![0u8; MAX_TX_LEN];
        // 0 -> 1 -> 0 -> ...
        dq.set_desc(0, DATA, 100, VRING_DESC_F_NEXT as u16, 1);
        dq.set_desc(1, DATA, 100, VRING_DESC_F_NEXT as u16, 0);
        dq.publish(0);
        // A next index beyond the queue.
        dq.set_desc(2, DATA, 100, VRING_DESC_F_NEXT as u16, 999);
        dq.publish(2);
        // A head beyond the queue.
        dq.publish(999);
        for want in [
            ChainError::Truncated,
            ChainError::Truncated,
            ChainError::Empty,
        ] {
            let e = read_tx_frame(&mem, pop(&mut q, &mem), &mut buf).unwrap_err();
            assert_eq!(e, want);
        }
    }

    #[test]
    fn indirect_tables_are_followed_but_bounded() {
        let mem = guest_memory(MEM);
        let mut dq = DriverQueue::new(&mem, 0, 16);
        let mut q = dq.device_queue(16);
        let mut buf = vec![0u8; MAX_TX_LEN];
        // A 300-entry indirect table of 1-byte descriptors, each linked to the next.
        let table = 0x4_0000u64;
        for i in 0..300u16 {
            let next = if i + 1 < 300 {
                VRING_DESC_F_NEXT as u16
            } else {
                0
            };
            let d = Descriptor::new(DATA, 1, next, i + 1);
            mem.write_obj(d, GuestAddress(table + 16 * u64::from(i)))
                .unwrap();
        }
        dq.set_desc(0, table, 300 * 16, VRING_DESC_F_INDIRECT as u16, 0);
        dq.publish(0);
        let e = read_tx_frame(&mem, pop(&mut q, &mem), &mut buf).unwrap_err();
        assert_eq!(e, ChainError::TooManyDescriptors);
    }

    #[test]
    fn receive_chains_give_their_writable_segments() {
        let mem = guest_memory(MEM);
        let (r, segs) = rx(
            &mem,
            &[
                Buf::write(DATA, 10),
                Buf::write(DATA + 0x100, 0),
                Buf::write(DATA + 0x200, 100),
            ],
        );
        assert_eq!(r, Ok(110));
        assert_eq!(
            segs,
            vec![
                Segment {
                    addr: GuestAddress(DATA),
                    len: 10
                },
                Segment {
                    addr: GuestAddress(DATA + 0x200),
                    len: 100
                }
            ]
        );
    }

    #[test]
    fn hostile_receive_chains_are_refused_and_leave_no_segments() {
        let mem = guest_memory(MEM);
        let cases = [
            (
                vec![Buf::write(DATA, 100), Buf::read(DATA + 0x100, 100)],
                ChainError::ReadableInRx,
            ),
            (vec![Buf::write(DATA, 11)], ChainError::ShortHeader(11)),
            (
                vec![Buf::write(MEM as u64 - 8, 4096)],
                ChainError::OutsideMemory {
                    addr: MEM as u64 - 8,
                    len: 4096,
                },
            ),
        ];
        for (bufs, want) in cases {
            let (r, segs) = rx(&mem, &bufs);
            assert_eq!(r, Err(want), "{bufs:?}");
            assert!(segs.is_empty());
        }
        // A loop of writable descriptors.
        let mut dq = DriverQueue::new(&mem, 0, 16);
        let mut q = dq.device_queue(16);
        let flags = (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16;
        dq.set_desc(0, DATA, 100, flags, 1);
        dq.set_desc(1, DATA, 100, flags, 0);
        dq.publish(0);
        let mut segs = Vec::new();
        let r = parse_rx_chain(&mem, pop(&mut q, &mem), &mut segs);
        assert_eq!(r, Err(ChainError::Truncated));
        assert!(segs.is_empty());
    }
}
