//! Address buses for port I/O and MMIO: map a guest access to the device that owns the range.
//!
//! The bus is built before any vCPU runs and is read-only afterwards, so vCPU threads look devices
//! up without a lock; each device carries its own mutex.

use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A device register window. Accesses arrive on the vCPU thread and must return quickly.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors building a bus.
#[derive(Debug, Error)]
pub enum Error {
    /// Two devices claim overlapping ranges.
    #[error("device range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// A zero-length or wrapping range.
    #[error("invalid device range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Base of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

struct Range {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping device ranges, sorted by base.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives `device` the range `base..base + len`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), Error> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Error::InvalidRange { base, len })?;
        let at = self.ranges.partition_point(|r| r.base < base);
        let overlaps_prev = at > 0 && self.ranges[at - 1].base + self.ranges[at - 1].len > base;
        let overlaps_next = at < self.ranges.len() && self.ranges[at].base < end;
        if overlaps_prev || overlaps_next {
            return Err(Error::Overlap { base, len });
        }
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    /// The device owning `addr`, and the offset of `addr` in its range; the whole access of `len`
    /// bytes must fit in the range.
    fn find(&self, addr: u64, len: usize) -> Option<(&Range, u64)> {
        let at = self
            .ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        let r = &self.ranges[at];
        let offset = addr - r.base;
        (offset.checked_add(len as u64)? <= r.len).then_some((r, offset))
    }

    /// Dispatches a read; returns false (and fills `data` with ones, as an empty bus would) when no
    /// device answers.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((r, offset)) => {
                lock(&r.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device takes it (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((r, offset)) => {
                lock(&r.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, carrying on if a previous holder panicked: register state stays usable.
fn lock<'a>(
    device: &'a Mutex<dyn BusDevice + 'static>,
) -> std::sync::MutexGuard<'a, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_offset() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(b.clone(), 0x3f8, 8).unwrap();
        bus.insert(a.clone(), 0x60, 1).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fb, &mut data));
        assert_eq!(data, [3]);
        assert!(bus.write(0x60, &[0xfe]));
        assert_eq!(a.lock().unwrap().writes, vec![(0, vec![0xfe])]);
        assert!(b.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn misses_read_as_ones_and_drop_writes() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x3f8, 8)
            .unwrap();
        let mut data = [0u8; 2];
        assert!(!bus.read(0x2f8, &mut data));
        assert_eq!(data, [0xff, 0xff]);
        // An access straddling the end of a range belongs to no device.
        assert!(!bus.read(0x3ff, &mut data));
        assert!(!bus.write(u64::MAX, &[1, 2]));
    }

    #[test]
    fn overlaps_and_empty_ranges_are_rejected() {
        let dev = || -> Arc<Mutex<dyn BusDevice>> { Arc::new(Mutex::new(Recorder::default())) };
        let mut bus = Bus::new();
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(dev(), 0x10f, 1),
            Err(Error::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0xf8, 9),
            Err(Error::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0x200, 0),
            Err(Error::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), u64::MAX, 2),
            Err(Error::InvalidRange { .. })
        ));
        bus.insert(dev(), 0xf0, 0x10).unwrap();
        bus.insert(dev(), 0x110, 0x10).unwrap();
    }
}
