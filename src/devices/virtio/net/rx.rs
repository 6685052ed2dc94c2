//! Received frames into the guest's receive chains: one chain per frame, or with
//! VIRTIO_NET_F_MRG_RXBUF as many as the frame needs, with `num_buffers` in the header saying how
//! many (virtio 1.2, 5.1.6.4).
//!
//! Chains popped for a frame that does not fit yet are held here, not given back, until more
//! arrive (the driver cannot take them back without a reset); so a frame waits for buffers
//! without anything being undone in the ring. At most a queue's worth of chains is ever held.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use super::chain::{parse_rx_chain, Segment};
use super::{NUM_BUFFERS_OFFSET, VNET_HDR_LEN};

/// One receive chain, checked and waiting for a frame.
#[derive(Debug)]
struct Held {
    head: u16,
    /// Its buffers, as a range of [`RxChains::segments`].
    first: usize,
    count: usize,
    capacity: usize,
}

/// What became of a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Written and handed to the driver.
    Delivered,
    /// Not enough buffers yet: the frame must wait for the driver to add some.
    NoBuffers,
    /// More than the guest's buffers can ever hold (a single chain without mergeable buffers, a
    /// whole ring of chains with them): the frame must be dropped. Held chains stay for the next.
    TooBig,
}

/// The receive chains taken from the ring and not yet used.
#[derive(Debug, Default)]
pub struct RxChains {
    held: Vec<Held>,
    segments: Vec<Segment>,
    /// Used entries added since the last [`RxChains::take_added`], for the interrupt decision.
    added: usize,
    /// Chains refused for breaking the rules.
    malformed: u64,
}

type QueueResult<T> = Result<T, virtio_queue::Error>;

impl RxChains {
    /// Forgets held chains (the driver reset the device and took them back).
    pub fn clear(&mut self) {
        self.held.clear();
        self.segments.clear();
        self.added = 0;
    }

    /// Used entries added since the last call.
    pub fn take_added(&mut self) -> usize {
        std::mem::take(&mut self.added)
    }

    fn capacity(&self) -> usize {
        self.held.iter().map(|h| h.capacity).sum()
    }

    /// Takes the next usable chain from `q` into the held list; malformed chains are returned
    /// to the driver at once with nothing written. Returns false when the ring is empty (or
    /// held only malformed chains).
    fn take_chain(&mut self, mem: &GuestMemoryMmap, q: &mut Queue) -> QueueResult<bool> {
        // At most a ring's worth per call: a guest that keeps posting malformed chains from
        // another vCPU cannot hold the device loop here.
        for _ in 0..=q.size() {
            let Some(chain) = pop(q, mem)? else {
                return Ok(false);
            };
            let head = chain.head_index();
            let first = self.segments.len();
            match parse_rx_chain(mem, chain, &mut self.segments) {
                Ok(capacity) => {
                    self.held.push(Held {
                        head,
                        first,
                        count: self.segments.len() - first,
                        capacity,
                    });
                    return Ok(true);
                }
                Err(e) => {
                    self.malformed += 1;
                    // Powers of two only: a hostile guest cannot flood the log.
                    if self.malformed.is_power_of_two() {
                        tracing::warn!(
                            "virtio-net: returning an unusable receive buffer: {e} ({} so far)",
                            self.malformed
                        );
                    }
                    q.add_used(mem, head, 0)?;
                    self.added += 1;
                }
            }
        }
        Ok(false)
    }

    /// Writes `hdr` (its `num_buffers` set here) and `frame` into held chains, taking more from
    /// `q` as needed.
    pub fn deliver(
        &mut self,
        mem: &GuestMemoryMmap,
        q: &mut Queue,
        mut hdr: [u8; VNET_HDR_LEN],
        frame: &[u8],
        mergeable: bool,
    ) -> QueueResult<Delivery> {
        let needed = VNET_HDR_LEN + frame.len();
        if mergeable {
            while self.capacity() < needed {
                if self.held.len() >= usize::from(q.size()) {
                    return Ok(Delivery::TooBig);
                }
                if !self.take_chain(mem, q)? {
                    return Ok(Delivery::NoBuffers);
                }
            }
        } else {
            if self.held.is_empty() && !self.take_chain(mem, q)? {
                return Ok(Delivery::NoBuffers);
            }
            if self.held[0].capacity < needed {
                return Ok(Delivery::TooBig);
            }
        }
        // The first chains that together hold the frame; any after them stay for the next
        // frame (a ring's worth may be held after a frame too big for them all).
        let mut used = 0;
        let mut room = 0;
        for h in &self.held {
            if room >= needed {
                break;
            }
            room += h.capacity;
            used += 1;
        }
        if room < needed {
            // Cannot happen (checked above); never write past the buffers.
            return Ok(Delivery::NoBuffers);
        }
        hdr[NUM_BUFFERS_OFFSET..].copy_from_slice(&(used as u16).to_le_bytes());
        let mut src = Source {
            parts: [&hdr, frame],
        };
        for h in &self.held[..used] {
            let segments = &self.segments[h.first..h.first + h.count];
            let written = write_segments(mem, segments, &mut src);
            q.add_used(mem, h.head, written as u32)?;
            self.added += 1;
        }
        let consumed = self.held[used - 1].first + self.held[used - 1].count;
        self.held.drain(..used);
        self.segments.drain(..consumed);
        for h in &mut self.held {
            h.first -= consumed;
        }
        Ok(Delivery::Delivered)
    }
}

fn pop<'m>(
    q: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> QueueResult<Option<DescriptorChain<&'m GuestMemoryMmap>>> {
    q.iter(mem).map(|mut it| it.next())
}

/// The header and the frame, consumed front to back.
struct Source<'a> {
    parts: [&'a [u8]; 2],
}

impl<'a> Source<'a> {
    fn is_empty(&self) -> bool {
        self.parts.iter().all(|p| p.is_empty())
    }

    /// The next bytes to copy, at most `max`.
    fn next_chunk(&mut self, max: usize) -> &'a [u8] {
        let Some(part) = self.parts.iter_mut().find(|p| !p.is_empty()) else {
            return &[];
        };
        let whole: &'a [u8] = part;
        let (chunk, rest) = whole.split_at(max.min(whole.len()));
        *part = rest;
        chunk
    }
}

/// Fills `segments` in order from `src`; returns the bytes written.
fn write_segments(mem: &GuestMemoryMmap, segments: &[Segment], src: &mut Source) -> usize {
    let mut written = 0;
    for s in segments {
        let mut at = s.addr;
        let mut room = s.len as usize;
        while room > 0 && !src.is_empty() {
            let chunk = src.next_chunk(room);
            // Checked by the parser to lie in guest RAM, which never shrinks.
            if let Err(e) = mem.write_slice(chunk, at) {
                crate::guest_warn!("virtio-net: writing a received frame to guest memory: {e}");
                return written;
            }
            written += chunk.len();
            room -= chunk.len();
            at = at.unchecked_add(chunk.len() as u64);
        }
        if src.is_empty() {
            break;
        }
    }
    written
}
