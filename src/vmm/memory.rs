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

/// Maps guest RAM of `size` bytes as one file shared with whoever else maps it: each region is
/// that file at its own offset (what vhost-user's SET_MEM_TABLE hands a backend). The file is on
/// a private huge-page tmpfs where we may make one ([`huge_tmpfs_file`]), a memfd otherwise
/// (which costs a few ms of start-up over [`create`]), so this is only for VMs with vhost-user
/// devices. The file is close-on-exec, and the mapping, as in [`create`], is not inherited by
/// forked children.
pub fn create_shared(size: u64) -> Result<GuestMemoryMmap, Error> {
    let memfd_err = |source| Error::Memfd { size, source };
    let file = match huge_tmpfs_file(size) {
        Ok(file) => file,
        Err(e) => {
            tracing::debug!("guest RAM in a memfd (no tmpfs with huge pages: {e})");
            let fd = memfd_create(GUEST_RAM_NAME, MFdFlags::MFD_CLOEXEC)
                .map_err(|e| memfd_err(e.into()))?;
            File::from(fd)
        }
    };
    let file = Arc::new(file);
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

/// The name shared guest RAM carries in /proc/PID/maps (either kind of file).
const GUEST_RAM_NAME: &std::ffi::CStr = c"microvm-guest-ram";

/// A file for shared guest RAM on a tmpfs instance of its own that serves transparent huge
/// pages (`huge=always`), for a privileged caller.
///
/// Why not a memfd: shmem objects follow the host's `shmem_enabled`, which is `never` on many
/// hosts, so a memfd takes a 4 KiB fault per page: copying a Linux kernel and initramfs into it
/// cost about 7 ms more than into anonymous huge pages (MADV_COLLAPSE on a memfd is refused). A
/// tmpfs's own `huge=` option applies whatever `shmem_enabled` is (short of `deny`), and KVM
/// maps such pages into the guest as 2 MiB pages too.
///
/// The instance is made with the new mount API and never attached anywhere: no mount appears in
/// any namespace, nothing is left behind if we die, and it is gone once the file (and every
/// mapping of it, virtiofsd's included) is closed. Its size is the guest's RAM, so it can hold
/// nothing else. The file is unlinked at once; it keeps its name only for /proc/PID/maps.
/// Fails without CAP_SYS_ADMIN, on kernels older than 5.2 or without THP; callers use a memfd.
fn huge_tmpfs_file(size: u64) -> std::io::Result<File> {
    use rustix::fs::{openat, unlinkat, AtFlags, Mode, OFlags};
    use rustix::mount::{
        fsconfig_create, fsconfig_set_string, fsmount, fsopen, FsMountFlags, FsOpenFlags,
        MountAttrFlags,
    };
    let fs = fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_set_string(&fs, "huge", "always")?;
    fsconfig_set_string(&fs, "size", size.next_multiple_of(HUGE_PAGE).to_string())?;
    fsconfig_set_string(&fs, "mode", "0700")?;
    fsconfig_create(&fs)?;
    let attrs = MountAttrFlags::MOUNT_ATTR_NOEXEC
        | MountAttrFlags::MOUNT_ATTR_NOSUID
        | MountAttrFlags::MOUNT_ATTR_NODEV;
    let mount = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)?;
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC;
    let fd = openat(&mount, GUEST_RAM_NAME, flags, Mode::from_raw_mode(0o600))?;
    unlinkat(&mount, GUEST_RAM_NAME, AtFlags::empty())?;
    Ok(File::from(fd))
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
        // (For a memfd this only takes effect where the host's shmem_enabled allows "advise";
        // the huge tmpfs serves huge pages unasked, so there the first 2 MiB are told not to.)
        let skip = if region.start_addr().0 == 0 {
            HUGE_PAGE.min(region.len())
        } else {
            0
        };
        // SAFETY: as below, on the first `skip` bytes of the same mapping. Refused without THP,
        // which is harmless.
        let _ =
            unsafe { libc::madvise(region.as_ptr().cast(), skip as usize, libc::MADV_NOHUGEPAGE) };
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

    #[test]
    fn privileged_shared_memory_is_a_huge_tmpfs_file() {
        use std::os::fd::AsRawFd;
        use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: shared guest RAM on a huge tmpfs needs root (memfd otherwise)");
            return;
        }
        let mem = create_shared(64 * MIB).unwrap();
        let region = mem.iter().next().unwrap();
        let fd = region.file_offset().unwrap().file().as_raw_fd();
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        assert_eq!(link.to_str(), Some("/microvm-guest-ram (deleted)"));
        // Touching one byte above the first 2 MiB maps a whole huge page; below, a small one.
        mem.write_obj(1u8, GuestAddress(16 * MIB)).unwrap();
        mem.write_obj(1u8, GuestAddress(MIB)).unwrap();
        let huge = smaps_field(
            region.as_ptr().wrapping_add(HUGE_PAGE as usize),
            "ShmemPmdMapped:",
        );
        assert_eq!(huge, 2048, "huge page at 16 MiB");
        assert_eq!(
            smaps_field(region.as_ptr(), "Rss:"),
            4,
            "the first 2 MiB take 4 KiB pages"
        );
        // The instance is as big as the guest's RAM: once that is all in use, nothing more fits.
        let file = region.file_offset().unwrap().file();
        rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, 64 * MIB).unwrap();
        let past = std::os::unix::fs::FileExt::write_all_at(file, &[1], 64 * MIB + HUGE_PAGE);
        let err = past.expect_err("wrote past the guest's RAM");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    }

    /// The kernel's VmFlags for the mapping starting at `ptr` (/proc/self/smaps).
    fn vm_flags(ptr: *const u8) -> Vec<String> {
        smaps_line(ptr, "VmFlags:")
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// A kB figure of the mapping starting at `ptr` (/proc/self/smaps).
    fn smaps_field(ptr: *const u8, field: &str) -> u64 {
        let line = smaps_line(ptr, field);
        line.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// The rest of the `field` line of the mapping starting at `ptr` (/proc/self/smaps).
    fn smaps_line(ptr: *const u8, field: &str) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", ptr as usize);
        smaps
            .split_inclusive('\n')
            .skip_while(|l| !l.starts_with(&start))
            .find_map(|l| l.strip_prefix(field))
            .unwrap()
            .to_owned()
    }
}
