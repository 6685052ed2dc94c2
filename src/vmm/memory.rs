//! Guest RAM: one region below the MMIO gap and, for large guests, one above 4 GiB.
//!
//! Memory is mapped `MAP_NORESERVE` and never touched up front: the host commits a page only
//! when the guest (or a device) first touches it. It is private anonymous memory unless a
//! vhost-user backend must map it too ([`create_shared`]).

use std::fs::File;
use std::sync::Arc;

use nix::sys::memfd::{memfd_create, MFdFlags};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use super::layout::{EBDA_END, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, MPTABLE_START};

/// Size of a transparent huge page on x86-64.
const HUGE_PAGE: u64 = 2 << 20;

/// An E820 / PVH memory type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// Usable RAM (E820 type 1).
    Ram = 1,
    /// Reserved (E820 type 2).
    Reserved = 2,
}

/// One entry of the memory map handed to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type.
    pub kind: MemoryKind,
}

/// Splits `size` bytes of RAM into the ranges below and above the MMIO gap.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), (size - low) as usize));
    }
    ranges
}

/// Errors mapping guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The mapping failed.
    #[error("cannot map guest memory: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
    /// madvise failed.
    #[error("cannot advise guest memory: {0}")]
    Advise(std::io::Error),
    /// The memfd behind shared guest RAM.
    #[error("cannot create {size} bytes of shared guest memory (memfd): {source}")]
    Memfd {
        /// Bytes asked for.
        size: u64,
        /// Why.
        source: std::io::Error,
    },
}

/// Maps guest RAM of `size` bytes (no page is touched). The mapping is not inherited by forked
/// children: the teardown keeper needs none of it, and copying its page tables would be slow.
pub fn create(size: u64) -> Result<GuestMemoryMmap, Error> {
    let memory = GuestMemoryMmap::from_ranges(&ram_ranges(size))?;
    advise(&memory)?;
    Ok(memory)
}

/// Maps guest RAM of `size` bytes as one memfd shared with whoever else maps it: each region is
/// that file at its own offset (what vhost-user's SET_MEM_TABLE hands a backend). Costs a little
/// start-up time over [`create`], so it is only for VMs with vhost-user devices. The memfd is
/// close-on-exec, and the mapping, as in [`create`], is not inherited by forked children.
pub fn create_shared(size: u64) -> Result<GuestMemoryMmap, Error> {
    let memfd_err = |source| Error::Memfd { size, source };
    let fd = memfd_create(c"microvm-guest-ram", MFdFlags::MFD_CLOEXEC)
        .map_err(|e| memfd_err(e.into()))?;
    let file = Arc::new(File::from(fd));
    // Sparse: no page exists until it is touched.
    file.set_len(size).map_err(memfd_err)?;
    let ranges: Vec<_> = ram_ranges(size)
        .into_iter()
        .scan(0u64, |offset, (addr, len)| {
            let at = FileOffset::from_arc(file.clone(), *offset);
            *offset += len as u64;
            Some((addr, len, Some(at)))
        })
        .collect();
    let memory = GuestMemoryMmap::from_ranges_with_files(&ranges)?;
    advise(&memory)?;
    Ok(memory)
}

/// Advice common to both kinds of guest RAM: not inherited over fork, huge pages above 2 MiB.
fn advise(memory: &GuestMemoryMmap) -> Result<(), Error> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for region in memory.iter() {
        // SAFETY: advises on exactly the live mapping `region` owns; MADV_DONTFORK changes no
        // contents and no permissions in this process.
        let rc = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_DONTFORK,
            )
        };
        if rc != 0 {
            return Err(Error::Advise(std::io::Error::last_os_error()));
        }
        // Transparent huge pages above the first 2 MiB: loading a Linux kernel (at 16 MiB) then
        // takes a handful of faults instead of thousands (about 5 ms less to VM start), and KVM
        // can map the guest with 2 MiB pages. The first 2 MiB, where boot structures and small
        // guests live, stays on 4 KiB pages so a tiny guest does not pay for zeroing 2 MiB.
        // (For a memfd this only takes effect where the host's shmem_enabled allows "advise".)
        let skip = if region.start_addr().0 == 0 {
            HUGE_PAGE.min(region.len())
        } else {
            0
        };
        // SAFETY: as above, on a sub-range of the same mapping; MADV_HUGEPAGE only changes how
        // later faults are served. A kernel without THP refuses it, which is harmless.
        let _ = unsafe {
            libc::madvise(
                region.as_ptr().add(skip as usize).cast(),
                (region.len() - skip) as usize,
                libc::MADV_HUGEPAGE,
            )
        };
    }
    Ok(())
}

/// The memory map the guest sees (E820 for Linux, the PVH memmap for PVH).
pub fn memory_map(size: u64) -> Vec<MapEntry> {
    let ram = |addr, size| MapEntry {
        addr,
        size,
        kind: MemoryKind::Ram,
    };
    let mut map = vec![
        ram(0, MPTABLE_START),
        MapEntry {
            addr: MPTABLE_START,
            size: EBDA_END - MPTABLE_START,
            kind: MemoryKind::Reserved,
        },
    ];
    for (start, len) in ram_ranges(size) {
        let (start, len) = (start.0, len as u64);
        if start == 0 {
            map.push(ram(HIMEM_START, len - HIMEM_START));
        } else {
            map.push(ram(start, len));
        }
    }
    map
}

/// End of the RAM below the MMIO gap.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_guest_has_one_region() {
        assert_eq!(
            ram_ranges(128 * MIB),
            vec![(GuestAddress(0), (128 * MIB) as usize)]
        );
        let map = memory_map(128 * MIB);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[2],
            MapEntry {
                addr: HIMEM_START,
                size: 127 * MIB,
                kind: MemoryKind::Ram
            }
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let size = 4096 * MIB;
        let ranges = ram_ranges(size);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(
            ranges[1],
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize)
        );
        let ram: u64 = memory_map(size)
            .iter()
            .filter(|e| e.kind == MemoryKind::Ram)
            .map(|e| e.size)
            .sum();
        // Everything but the reserved EBDA tail and the legacy hole below 1 MiB is RAM.
        assert_eq!(ram, size - (HIMEM_START - MPTABLE_START));
        for e in memory_map(size) {
            assert!(e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END);
        }
    }

    fn assert_untouched(mem: &GuestMemoryMmap) {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let region = mem.iter().next().unwrap();
        let pages = (region.len() / 4096) as usize;
        let mut resident = vec![0u8; pages];
        // SAFETY: the range is the region's live mapping and `resident` has one byte per page.
        let rc = unsafe {
            libc::mincore(
                region.as_ptr().cast(),
                region.len() as usize,
                resident.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        assert_eq!(
            resident.iter().filter(|r| *r & 1 != 0).count(),
            0,
            "no page may be resident"
        );
    }

    #[test]
    fn memory_is_not_touched_up_front() {
        assert_untouched(&create(64 * MIB).unwrap());
        assert_untouched(&create_shared(64 * MIB).unwrap());
    }

    #[test]
    fn shared_memory_is_one_memfd_at_consecutive_offsets() {
        use std::os::fd::AsRawFd;
        use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
        // Large enough to have a region above the MMIO gap; nothing is touched but two bytes.
        let size = MMIO_GAP_START + 64 * MIB;
        let mem = create_shared(size).unwrap();
        let regions: Vec<_> = mem.iter().collect();
        assert_eq!(regions.len(), 2);
        let (low, high) = (regions[0], regions[1]);
        let (lo, hi) = (low.file_offset().unwrap(), high.file_offset().unwrap());
        assert_eq!(lo.file().as_raw_fd(), hi.file().as_raw_fd(), "one memfd");
        assert_eq!((lo.start(), hi.start()), (0, low.len()));
        assert_eq!(lo.file().metadata().unwrap().len(), size);
        // SAFETY: F_GETFD only reads the descriptor's flags.
        let flags = unsafe { libc::fcntl(lo.file().as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        // A write through the mapping lands in the file at the region's offset.
        mem.write_obj(0xabu8, GuestAddress(MMIO_GAP_END)).unwrap();
        let mut byte = [0u8];
        std::os::unix::fs::FileExt::read_exact_at(hi.file(), &mut byte, hi.start()).unwrap();
        assert_eq!(byte, [0xab]);
        for region in regions {
            // "dc": not copied on fork (MADV_DONTFORK); "sh": MAP_SHARED.
            let flags = vm_flags(region.as_ptr());
            for flag in ["dc", "sh"] {
                assert!(flags.iter().any(|f| f == flag), "{flag} missing: {flags:?}");
            }
        }
    }

    /// The kernel's VmFlags for the mapping starting at `ptr` (/proc/self/smaps).
    fn vm_flags(ptr: *const u8) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", ptr as usize);
        let mapping = smaps
            .split_inclusive('\n')
            .skip_while(|l| !l.starts_with(&start))
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .unwrap();
        mapping.split_whitespace().map(str::to_owned).collect()
    }
}
