//! Block requests as descriptor chains (virtio 1.2, 5.2.6): a 16-byte header the device reads,
//! data, and a status byte the device writes last. This file turns a chain into a checked
//! [`Request`] (or says why it cannot) and never touches the disk, so hostile chains can be
//! tested here alone.
//!
//! Framing is free, as the spec asks: the header may be split over descriptors and share one
//! with write data, and the status byte is the last byte of the last descriptor, whatever else
//! that descriptor holds.

use thiserror::Error;
use virtio_bindings::virtio_blk as blk;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Bytes per sector: the unit of `sector` and of capacity, whatever `blk_size` says.
pub const SECTOR_SIZE: u64 = 512;
/// The request header: type (le32), reserved (le32), sector (le64).
pub const HEADER_SIZE: usize = 16;
/// Most data buffers in one request; offered to the driver as `seg_max` (a 256-entry queue less
/// the header and status descriptors, as Linux sizes its requests).
pub const MAX_SEGMENTS: usize = 254;

/// What the driver asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into guest buffers (VIRTIO_BLK_T_IN).
    In,
    /// Write guest buffers to sectors (VIRTIO_BLK_T_OUT).
    Out,
    /// Make earlier writes durable (VIRTIO_BLK_T_FLUSH).
    Flush,
    /// Read the device serial (VIRTIO_BLK_T_GET_ID).
    GetId,
}

/// One data buffer of a request, checked to lie in guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes (never 0).
    pub len: u32,
}

/// A request that passed every check: its data buffers go the right way, lie in guest RAM, are
/// whole sectors and stay within the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestType,
    /// First sector (reads and writes only; 0 otherwise).
    pub sector: u64,
    /// Total bytes of the data buffers.
    pub data_len: u32,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// What the disk allows, for the range and read-only checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLimits {
    /// Capacity in sectors.
    pub sectors: u64,
    /// Writes are refused.
    pub read_only: bool,
}

/// A request the device refuses but can answer: the status byte says IOERR or UNSUPP.
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
pub enum RequestError {
    /// An unknown request type (VIRTIO_BLK_S_UNSUPP).
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// A descriptor points outside guest RAM.
    #[error("a {len}-byte buffer at {addr:#x} lies outside guest RAM")]
    OutsideRam {
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// Not enough device-readable bytes for the header.
    #[error("the chain has {0} device-readable bytes, fewer than a {HEADER_SIZE}-byte header")]
    ShortHeader(u64),
    /// Device-readable after device-writable, which virtio forbids (2.7.4.2).
    #[error("a device-readable buffer follows a device-writable one")]
    ReadableAfterWritable,
    /// Data the device would have to read on a request that has none to read.
    #[error("a {0:?} request carries {1} device-readable data bytes")]
    UnexpectedReadable(RequestType, u64),
    /// Device-writable data on a request that returns none.
    #[error("a {0:?} request carries {1} device-writable data bytes")]
    UnexpectedWritable(RequestType, u64),
    /// More data buffers than `seg_max`.
    #[error("more than {MAX_SEGMENTS} data buffers")]
    TooManySegments,
    /// Reads and writes move whole sectors.
    #[error("{0} data bytes are not a whole number of {SECTOR_SIZE}-byte sectors")]
    PartialSector(u32),
    /// The request reaches past the end of the disk (or overflows trying).
    #[error("{count} sectors from sector {sector} reach past the disk's {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sectors asked for.
        count: u64,
        /// Disk capacity in sectors.
        capacity: u64,
    },
    /// A write to a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
}

impl RequestError {
    /// The status byte the driver gets.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => blk::VIRTIO_BLK_S_UNSUPP as u8,
            _ => blk::VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A chain with no usable status byte: nothing can be reported, so the request is dropped
/// (the chain still goes back to the driver, empty, so the queue keeps moving).
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
pub enum ChainError {
    /// The head index led nowhere.
    #[error("the chain has no descriptors")]
    Empty,
    /// The last descriptor we could follow still says NEXT: a loop, a next index past the
    /// queue, an unreadable indirect table, or more than 4 GiB in total.
    #[error(
        "the chain does not end (a descriptor loop, a bad next index or table, or over 4 GiB)"
    )]
    Unterminated,
    /// The last descriptor is device-readable.
    #[error("the status descriptor is device-readable")]
    StatusReadOnly,
    /// The last descriptor is empty.
    #[error("the status descriptor is empty")]
    StatusEmpty,
    /// The status byte is not in guest RAM.
    #[error("the status byte at {0:#x} lies outside guest RAM")]
    StatusOutsideRam(u64),
}

/// Why a chain is not a request.
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
pub enum ParseError {
    /// Answered with `error.status()` at `status`.
    #[error("{error}")]
    Failed {
        /// Where the status byte goes.
        status: GuestAddress,
        /// What was wrong.
        error: RequestError,
    },
    /// Not answerable.
    #[error("{0}")]
    Dropped(#[from] ChainError),
}

/// Walks the chain's buffers in order, gathering the header and the data segments.
struct Gather<'a> {
    mem: &'a GuestMemoryMmap,
    header: [u8; HEADER_SIZE],
    header_len: usize,
    readable: u64,
    writable: u64,
    seen_writable: bool,
    error: Option<RequestError>,
    segments: &'a mut Vec<Segment>,
}

impl Gather<'_> {
    fn fail(&mut self, e: RequestError) {
        // The first problem is the one worth reporting.
        self.error.get_or_insert(e);
    }

    fn buffer(&mut self, addr: GuestAddress, len: u32, writable: bool) {
        if len == 0 || self.error.is_some() {
            return;
        }
        if !GuestMemoryBackend::check_range(self.mem, addr, len as usize) {
            return self.fail(RequestError::OutsideRam { addr: addr.0, len });
        }
        let mut seg = Segment { addr, len };
        if writable {
            self.seen_writable = true;
            self.writable += u64::from(len);
        } else {
            if self.seen_writable {
                return self.fail(RequestError::ReadableAfterWritable);
            }
            let take = (HEADER_SIZE - self.header_len).min(len as usize);
            if take > 0 {
                let dst = &mut self.header[self.header_len..self.header_len + take];
                if self.mem.read_slice(dst, addr).is_err() {
                    return self.fail(RequestError::OutsideRam { addr: addr.0, len });
                }
                self.header_len += take;
                // In range: `take` <= len, and the whole buffer was checked above.
                seg = Segment {
                    addr: GuestAddress(addr.0 + take as u64),
                    len: len - take as u32,
                };
            }
            self.readable += u64::from(seg.len);
        }
        if seg.len == 0 {
            return;
        }
        if self.segments.len() == MAX_SEGMENTS {
            return self.fail(RequestError::TooManySegments);
        }
        self.segments.push(seg);
    }
}

/// Checks a chain and fills `segments` (cleared first) with its data buffers, in order.
pub fn parse(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    disk: DiskLimits,
    segments: &mut Vec<Segment>,
) -> Result<Request, ParseError> {
    segments.clear();
    let mut g = Gather {
        mem,
        header: [0; HEADER_SIZE],
        header_len: 0,
        readable: 0,
        writable: 0,
        seen_writable: false,
        error: None,
        segments,
    };
    // One descriptor behind, so the last one is held back for the status byte.
    let mut last: Option<Descriptor> = None;
    for desc in chain {
        if let Some(prev) = last.replace(desc) {
            g.buffer(prev.addr(), prev.len(), prev.is_write_only());
        }
    }
    let last = last.ok_or(ChainError::Empty)?;
    if last.has_next() {
        return Err(ChainError::Unterminated.into());
    }
    if !last.is_write_only() {
        return Err(ChainError::StatusReadOnly.into());
    }
    let data_in_last = last.len().checked_sub(1).ok_or(ChainError::StatusEmpty)?;
    let status = last
        .addr()
        .0
        .checked_add(u64::from(data_in_last))
        .map(GuestAddress)
        .filter(|&a| GuestMemoryBackend::check_range(mem, a, 1))
        .ok_or(ChainError::StatusOutsideRam(
            last.addr().0.wrapping_add(u64::from(data_in_last)),
        ))?;
    g.buffer(last.addr(), data_in_last, true);

    let fail = |error| ParseError::Failed { status, error };
    if let Some(e) = g.error {
        return Err(fail(e));
    }
    if g.header_len < HEADER_SIZE {
        return Err(fail(RequestError::ShortHeader(g.header_len as u64)));
    }
    let kind_raw = u32::from_le_bytes(g.header[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(g.header[8..16].try_into().unwrap_or_default());
    let kind = match kind_raw {
        blk::VIRTIO_BLK_T_IN => RequestType::In,
        blk::VIRTIO_BLK_T_OUT => RequestType::Out,
        blk::VIRTIO_BLK_T_FLUSH => RequestType::Flush,
        blk::VIRTIO_BLK_T_GET_ID => RequestType::GetId,
        other => return Err(fail(RequestError::Unsupported(other))),
    };
    // Which way the data must go; the other way must carry none.
    let (data, stray) = match kind {
        RequestType::Out => (g.readable, g.writable),
        RequestType::In | RequestType::GetId => (g.writable, g.readable),
        RequestType::Flush => (0, g.readable.max(g.writable)),
    };
    if stray != 0 {
        return Err(fail(match kind {
            RequestType::Out => RequestError::UnexpectedWritable(kind, stray),
            RequestType::Flush if g.writable != 0 => RequestError::UnexpectedWritable(kind, stray),
            _ => RequestError::UnexpectedReadable(kind, stray),
        }));
    }
    // The chain iterator stops at 4 GiB in total, so this fits; were it not to, u32::MAX is not
    // whole sectors and the request fails below.
    let data_len = u32::try_from(data).unwrap_or(u32::MAX);
    let sector = match kind {
        RequestType::In | RequestType::Out => {
            check_range(sector, data_len, disk).map_err(fail)?;
            sector
        }
        RequestType::Flush | RequestType::GetId => 0,
    };
    if kind == RequestType::Out && disk.read_only {
        return Err(fail(RequestError::ReadOnly));
    }
    Ok(Request {
        kind,
        sector,
        data_len,
        status,
    })
}

fn check_range(sector: u64, len: u32, disk: DiskLimits) -> Result<(), RequestError> {
    if u64::from(len) % SECTOR_SIZE != 0 {
        return Err(RequestError::PartialSector(len));
    }
    let count = u64::from(len) / SECTOR_SIZE;
    match sector.checked_add(count) {
        Some(end) if end <= disk.sectors => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            count,
            capacity: disk.sectors,
        }),
    }
}

#[cfg(test)]
mod tests;
