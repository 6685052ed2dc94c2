//! The host side of a disk: a raw image file, its capacity in whole sectors, and reads and
//! writes that move bytes straight between the file and guest pages (pread/pwrite on the mapped
//! guest memory, no bounce buffer). The segments come from [`super::request`], already checked;
//! guest memory is still reached only through vm-memory's checked slices.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use super::request::{Segment, SECTOR_SIZE};
use super::Error;

/// An open disk image.
pub struct DiskFile {
    file: File,
    path: PathBuf,
    sectors: u64,
    read_only: bool,
}

impl DiskFile {
    /// Opens `path` read-only or read-write and sizes it (block devices too). Bytes past the
    /// last whole sector stay invisible to the guest.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, Error> {
        let mode = if read_only {
            "read-only"
        } else {
            "for reading and writing"
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_owned(),
                mode,
                source,
            })?;
        let size_err = |source| Error::Size {
            path: path.to_owned(),
            source,
        };
        // A read-only open of a directory succeeds; its "size" means nothing.
        if file.metadata().map_err(size_err)?.is_dir() {
            return Err(Error::Directory(path.to_owned()));
        }
        // Seeking, unlike metadata, also sizes block devices; all I/O is positioned anyway.
        let size = (&file).seek(SeekFrom::End(0)).map_err(size_err)?;
        let tail = size % SECTOR_SIZE;
        if tail != 0 {
            tracing::warn!(
                "disk image {}: its last {tail} bytes are not a whole sector; the guest will not see them",
                path.display()
            );
        }
        Ok(DiskFile {
            file,
            path: path.to_owned(),
            sectors: size / SECTOR_SIZE,
            read_only,
        })
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether the image was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The image's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads from `sector` on into `segments`, in order. Bytes past the end of the file (it
    /// shrank since it was opened) read as zeros.
    pub fn read(&self, mem: &GuestMemoryMmap, sector: u64, segments: &[Segment]) -> io::Result<()> {
        let mut offset = byte_offset(sector)?;
        for slice in slices(mem, segments) {
            let slice = slice?;
            read_full(&self.file, &slice, offset)?;
            offset += slice.len() as u64;
        }
        Ok(())
    }

    /// Writes `segments`, in order, from `sector` on.
    pub fn write(
        &self,
        mem: &GuestMemoryMmap,
        sector: u64,
        segments: &[Segment],
    ) -> io::Result<()> {
        let mut offset = byte_offset(sector)?;
        for slice in slices(mem, segments) {
            let slice = slice?;
            write_full(&self.file, &slice, offset)?;
            offset += slice.len() as u64;
        }
        Ok(())
    }

    /// Makes written data durable (fdatasync); a no-op for read-only images.
    pub fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }
}

fn byte_offset(sector: u64) -> io::Result<u64> {
    sector
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "sector out of range"))
}

/// The guest memory behind `segments`, region by region.
fn slices<'m>(
    mem: &'m GuestMemoryMmap,
    segments: &'m [Segment],
) -> impl Iterator<Item = io::Result<VolatileSlice<'m, impl BitmapSlice + 'm>>> + 'm {
    segments.iter().flat_map(move |s| {
        GuestMemoryBackend::get_slices(mem, s.addr, s.len as usize)
            .map(|r| r.map_err(io::Error::other))
    })
}

fn file_offset(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset past the largest file"))
}

/// One pread into `buf`.
fn pread_volatile<B: BitmapSlice>(
    file: &File,
    buf: &VolatileSlice<B>,
    offset: u64,
) -> io::Result<usize> {
    let offset = file_offset(offset)?;
    let guard = buf.ptr_guard_mut();
    // SAFETY: the guard points at `buf.len()` bytes of guest memory that stay mapped for the
    // call (the slice borrows the guest memory that owns the mapping, the guard keeps its
    // pointer valid), and the kernel writes at most that many bytes there. No Rust reference to
    // those bytes exists (guest memory is only reached through volatile slices), so the write
    // breaks no aliasing rule. The fd is open: `file` owns it.
    let n = unsafe { libc::pread(file.as_raw_fd(), guard.as_ptr().cast(), buf.len(), offset) };
    if n < 0 {
        // Some bytes may have landed before the error.
        buf.bitmap().mark_dirty(0, buf.len());
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    buf.bitmap().mark_dirty(0, n);
    Ok(n)
}

/// One pwrite from `buf`.
fn pwrite_volatile<B: BitmapSlice>(
    file: &File,
    buf: &VolatileSlice<B>,
    offset: u64,
) -> io::Result<usize> {
    let offset = file_offset(offset)?;
    let guard = buf.ptr_guard();
    // SAFETY: the guard points at `buf.len()` bytes of guest memory that stay mapped for the
    // call (the slice borrows the guest memory that owns the mapping, the guard keeps its
    // pointer valid), and the kernel only reads them. The fd is open: `file` owns it.
    let n = unsafe { libc::pwrite(file.as_raw_fd(), guard.as_ptr().cast(), buf.len(), offset) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn read_full<B: BitmapSlice>(
    file: &File,
    buf: &VolatileSlice<B>,
    mut offset: u64,
) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = buf.offset(done).map_err(io::Error::other)?;
        match pread_volatile(file, &rest, offset) {
            Ok(0) => return zero_fill(&rest),
            Ok(n) => {
                done += n;
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_full<B: BitmapSlice>(
    file: &File,
    buf: &VolatileSlice<B>,
    mut offset: u64,
) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = buf.offset(done).map_err(io::Error::other)?;
        match pwrite_volatile(file, &rest, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                done += n;
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn zero_fill<B: BitmapSlice>(buf: &VolatileSlice<B>) -> io::Result<()> {
    const ZEROS: [u8; SECTOR_SIZE as usize] = [0; SECTOR_SIZE as usize];
    let mut at = 0;
    while at < buf.len() {
        let n = (buf.len() - at).min(ZEROS.len());
        buf.write_slice(&ZEROS[..n], at).map_err(io::Error::other)?;
        at += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::guest_memory;
    use vm_memory::GuestAddress;
    use vmm_sys_util::tempfile::TempFile;

    fn image(bytes: &[u8]) -> TempFile {
        let t = TempFile::new().unwrap();
        std::fs::write(t.as_path(), bytes).unwrap();
        t
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
    }

    #[test]
    fn capacity_rounds_down_to_whole_sectors() {
        let t = image(&[1u8; 1000]);
        let d = DiskFile::open(t.as_path(), true).unwrap();
        assert_eq!(d.sectors(), 1);
        assert!(d.read_only());
        let t = image(&[]);
        assert_eq!(DiskFile::open(t.as_path(), false).unwrap().sectors(), 0);
    }

    #[test]
    fn reads_and_writes_scatter_across_segments_and_regions() {
        let data = pattern(4 * 512);
        let t = image(&data);
        let d = DiskFile::open(t.as_path(), false).unwrap();
        // Two regions back to back: a segment may straddle them.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
        ])
        .unwrap();
        let segs = [seg(0x100, 100), seg(0xff00, 924)];
        d.read(&mem, 1, &segs).unwrap();
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got[..100], GuestAddress(0x100))
            .unwrap();
        mem.read_slice(&mut got[100..], GuestAddress(0xff00))
            .unwrap();
        assert_eq!(got, data[512..1536]);

        mem.write_slice(&[0xab; 512], GuestAddress(0x2000)).unwrap();
        d.write(&mem, 3, &[seg(0x2000, 512)]).unwrap();
        d.flush().unwrap();
        let on_disk = std::fs::read(t.as_path()).unwrap();
        assert_eq!(on_disk[..3 * 512], data[..3 * 512]);
        assert_eq!(on_disk[3 * 512..], [0xab; 512]);
    }

    #[test]
    fn reads_past_a_shrunk_file_are_zeros() {
        let t = image(&pattern(2048));
        let d = DiskFile::open(t.as_path(), true).unwrap();
        // Someone truncates the image while the VM runs.
        std::fs::OpenOptions::new()
            .write(true)
            .open(t.as_path())
            .unwrap()
            .set_len(700)
            .unwrap();
        let mem = guest_memory(0x1_0000);
        mem.write_slice(&[0xff; 1024], GuestAddress(0x1000))
            .unwrap();
        d.read(&mem, 1, &[seg(0x1000, 1024)]).unwrap();
        let mut got = [0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(got[..188], pattern(700)[512..]);
        assert!(got[188..].iter().all(|&b| b == 0));
    }

    #[test]
    fn writes_to_a_read_only_file_fail_on_the_host_too() {
        let t = image(&[0u8; 512]);
        let d = DiskFile::open(t.as_path(), true).unwrap();
        let mem = guest_memory(0x1_0000);
        assert!(d.write(&mem, 0, &[seg(0, 512)]).is_err());
        assert_eq!(std::fs::read(t.as_path()).unwrap(), [0u8; 512]);
    }

    #[test]
    fn open_errors_name_the_file_and_the_mode() {
        let e = DiskFile::open(Path::new("/nonexistent/disk.img"), false)
            .err()
            .unwrap();
        let msg = e.to_string();
        assert!(msg.contains("/nonexistent/disk.img"), "{msg}");
        assert!(msg.contains("for reading and writing"), "{msg}");
        let dir = std::env::temp_dir();
        let e = DiskFile::open(&dir, true).err().unwrap();
        assert!(matches!(e, Error::Directory(_)), "{e}");
        let e = DiskFile::open(&dir, false).err().unwrap();
        assert!(matches!(e, Error::Open { .. }), "{e}");
    }
}
