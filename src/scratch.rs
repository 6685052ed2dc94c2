//! The container's sandbox layer: one writable ext4 disk per container, copied sparsely from a
//! pre-formatted template (formatted once and cached), so no container pays for mkfs. It lives
//! in the container's directory until the container is removed.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Apparent size of a scratch disk unless `--storage-size` says otherwise; only what the
/// container writes takes host space.
pub const DEFAULT_SIZE: u64 = 8 << 30;
/// The smallest and largest `--storage-size`: an ext4 with its journal and a little room, and
/// what a sparse file on the store's file system can stand for.
pub const MIN_SIZE: u64 = 64 << 20;
/// See [`MIN_SIZE`].
pub const MAX_SIZE: u64 = 16 << 40;
/// Bump when the template's format options change.
const TEMPLATE_VERSION: u32 = 5;

/// The cached, formatted template of `size` bytes (a whole number of MiB), made on first use
/// (atomically, so concurrent runs agree).
pub fn template(size: u64) -> io::Result<PathBuf> {
    template_in(&crate::host::data_dir().join("scratch"), size)
}

/// [`template`] kept in `dir`.
pub fn template_in(dir: &Path, size: u64) -> io::Result<PathBuf> {
    if !(MIN_SIZE..=MAX_SIZE).contains(&size) || !size.is_multiple_of(1 << 20) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a sandbox layer of {size} bytes (whole MiB from 64 MiB to 16 TiB)"),
        ));
    }
    let path = dir.join(format!("ext4-{}m-v{TEMPLATE_VERSION}.img", size >> 20));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    File::create(&tmp)?.set_len(size)?;
    // A small journal (4 MiB, written now): the layer outlives its VM, and a VM powered off by
    // `stop`'s last resort or a killed supervisor must leave it mountable. No reserved blocks,
    // no room kept for online resizing, inode tables zeroed now so the guest kernel starts no
    // lazy-init thread writing them. mke2fs discards the file first, which leaves those zeroed
    // tables as holes: the template holds ~4.2 MiB of real data (the journal and ~200 KiB of
    // metadata), which is all a new container's copy moves.
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-O",
            "^resize_inode",
            "-J",
            "size=4",
            "-m",
            "0",
            "-L",
            "scratch",
        ])
        .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(&tmp)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("mkfs.ext4 (install e2fsprogs): {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io::Error::other(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Makes a fresh scratch disk of `size` bytes at `dst` from its template.
pub fn create(dst: &Path, size: u64) -> io::Result<()> {
    sparse_copy(&template(size)?, dst)
}

/// Copies `src` to `dst` keeping holes: only the data extents are copied.
pub fn sparse_copy(src: &Path, dst: &Path) -> io::Result<()> {
    let from = File::open(src)?;
    let to = File::create(dst)?;
    let len = from.metadata()?.len();
    to.set_len(len)?;
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a descriptor we own; no memory is involved.
        let data = unsafe { libc::lseek(from.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data after `pos`, the rest is a hole.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(from.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            // SAFETY: both descriptors are ours and the offsets point at valid locals.
            let n = unsafe {
                libc::copy_file_range(
                    from.as_raw_fd(),
                    &mut off_in,
                    to.as_raw_fd(),
                    &mut off_out,
                    (hole - off_in) as usize,
                    0,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                break;
            }
        }
        pos = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[test]
    fn template_is_ext4_and_nearly_all_holes() {
        let dir =
            std::env::temp_dir().join(format!("microvm-template-test-{}", std::process::id()));
        let t = template_in(&dir, DEFAULT_SIZE).unwrap();
        assert_eq!(std::fs::metadata(&t).unwrap().len(), DEFAULT_SIZE);
        let allocated = std::fs::metadata(&t).unwrap().blocks() * 512;
        // The 4 MiB journal and the metadata; the other 8 GiB are holes.
        assert!(allocated < 5 << 20, "template allocates {allocated} bytes");
        let mut magic = [0u8; 2];
        File::open(&t)
            .unwrap()
            .read_exact_at(&mut magic, 1024 + 56)
            .unwrap();
        assert_eq!(u16::from_le_bytes(magic), 0xef53, "ext4 superblock magic");
        let copy = dir.join("copy.img");
        let started = std::time::Instant::now();
        sparse_copy(&t, &copy).unwrap();
        eprintln!("scratch disk copy took {:?}", started.elapsed());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = std::env::temp_dir().join(format!("microvm-scratch-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (src, dst) = (dir.join("src"), dir.join("dst"));
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"middle", 32 << 20).unwrap();
        drop(f);
        sparse_copy(&src, &dst).unwrap();
        let copy = std::fs::read(&dst).unwrap();
        assert_eq!(copy.len(), 64 << 20);
        assert_eq!(&copy[..4], b"head");
        assert_eq!(&copy[32 << 20..(32 << 20) + 6], b"middle");
        assert!(copy[4..32 << 20].iter().all(|b| *b == 0));
        // Only the two data extents take space (a few blocks), not 64 MiB.
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 1 << 20);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
