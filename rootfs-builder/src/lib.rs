//! Builds the guest's boot initramfs: cpio "newc" archives the Linux kernel unpacks into its
//! root filesystem. The base archive holds microvm's init and the few nodes the kernel needs
//! before devtmpfs is mounted; further archives (a directory tree) may be concatenated after it,
//! which the kernel unpacks on top.
#![warn(missing_docs)]

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const S_IFBLK: u32 = 0o060000;
const S_IFIFO: u32 = 0o010000;
const TRAILER: &str = "TRAILER!!!";

/// A cpio newc archive being written in memory.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    next_ino: u32,
    limit: Option<u64>,
}

/// Ownership and timestamp of an entry.
#[derive(Debug, Clone, Copy, Default)]
pub struct Owner {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Modification time (seconds since the epoch).
    pub mtime: u32,
}

impl Cpio {
    /// An empty archive.
    pub fn new() -> Self {
        Cpio {
            buf: Vec::new(),
            next_ino: 1,
            limit: None,
        }
    }

    /// An empty archive that [`Cpio::tree`] refuses to grow past `max` bytes, with an error of
    /// kind [`io::ErrorKind::FileTooLarge`], checked before a file is read: the archive lives in
    /// memory, so a tree such as `/` must fail early rather than be read whole.
    pub fn with_limit(max: u64) -> Self {
        Cpio {
            limit: Some(max),
            ..Cpio::new()
        }
    }

    fn entry(&mut self, path: &str, mode: u32, owner: Owner, rdev: (u32, u32), data: &[u8]) {
        let name = path.trim_start_matches('/');
        let name = if name.is_empty() { "." } else { name };
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & 0o170000 == S_IFDIR { 2 } else { 1 };
        let fields = [
            ino,
            mode,
            owner.uid,
            owner.gid,
            nlink,
            owner.mtime,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str, perm: u32, owner: Owner) {
        self.entry(path, S_IFDIR | (perm & 0o7777), owner, (0, 0), &[]);
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, perm: u32, owner: Owner, data: &[u8]) {
        self.entry(path, S_IFREG | (perm & 0o7777), owner, (0, 0), data);
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str, owner: Owner) {
        self.entry(path, S_IFLNK | 0o777, owner, (0, 0), target.as_bytes());
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.entry(
            path,
            S_IFCHR | (perm & 0o7777),
            Owner::default(),
            (major, minor),
            &[],
        );
    }

    /// Adds the tree under `root` (not following symlinks) at `prefix` in the archive, keeping
    /// modes, owners, timestamps, symlinks, device nodes and FIFOs. Sockets are skipped.
    pub fn tree(&mut self, root: &Path, prefix: &str) -> io::Result<()> {
        let meta = std::fs::symlink_metadata(root)?;
        self.node(root, prefix, &meta)?;
        if meta.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(root)?.collect::<Result<_, _>>()?;
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let name = e.file_name();
                let name = name.to_str().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: file name is not UTF-8", e.path().display()),
                    )
                })?;
                self.tree(
                    &e.path(),
                    &format!("{}/{name}", prefix.trim_end_matches('/')),
                )?;
            }
        }
        Ok(())
    }

    fn node(&mut self, path: &Path, name: &str, m: &std::fs::Metadata) -> io::Result<()> {
        let owner = Owner {
            uid: m.uid(),
            gid: m.gid(),
            mtime: m.mtime().clamp(0, u32::MAX as i64) as u32,
        };
        let perm = m.mode() & 0o7777;
        let ft = m.file_type();
        let dev = (libc_major(m.rdev()), libc_minor(m.rdev()));
        if ft.is_dir() {
            self.entry(name, S_IFDIR | perm, owner, (0, 0), &[]);
        } else if ft.is_file() {
            self.check_room(path, name, m.len())?;
            let data = std::fs::read(path)?;
            if data.len() as u64 != m.len() {
                // Changed while we packed it: the size we checked no longer holds.
                self.check_room(path, name, data.len() as u64)?;
            }
            self.entry(name, S_IFREG | perm, owner, (0, 0), &data);
        } else if ft.is_symlink() {
            let target = std::fs::read_link(path)?;
            let target = target.to_str().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: link target is not UTF-8", path.display()),
                )
            })?;
            self.entry(name, S_IFLNK | 0o777, owner, (0, 0), target.as_bytes());
        } else if ft.is_char_device() {
            self.entry(name, S_IFCHR | perm, owner, dev, &[]);
        } else if ft.is_block_device() {
            self.entry(name, S_IFBLK | perm, owner, dev, &[]);
        } else if ft.is_fifo() {
            self.entry(name, S_IFIFO | perm, owner, (0, 0), &[]);
        }
        Ok(())
    }

    /// Fails unless a file of `len` bytes fits: newc sizes are 32-bit, and the limit if any.
    fn check_room(&self, path: &Path, name: &str, len: u64) -> io::Result<()> {
        // Header (110 bytes), name, NUL and padding: a bound, not the exact figure.
        let after = self.buf.len() as u64 + 110 + name.len() as u64 + 4 + len + 3;
        match self.limit {
            Some(max) if after > max => Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!(
                    "more than {} MiB (reached at {})",
                    max.div_ceil(1 << 20),
                    path.display()
                ),
            )),
            _ if len > u32::MAX as u64 => Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!(
                    "{}: larger than 4 GiB, the most a cpio archive holds",
                    path.display()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Ends the archive and returns its bytes (a multiple of 4 long, so archives concatenate).
    pub fn finish(mut self) -> Vec<u8> {
        self.entry(TRAILER, 0, Owner::default(), (0, 0), &[]);
        self.buf
    }
}

fn libc_major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)) as u32
}

fn libc_minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0xff)) as u32
}

/// The base initramfs: `/init` (microvm's agent) plus the directories and the console node the
/// kernel and the agent need before anything is mounted.
pub fn base_initramfs(init: &[u8]) -> Vec<u8> {
    let root = Owner::default();
    let mut cpio = Cpio::new();
    for (dir, perm) in [
        ("/", 0o755),
        ("/dev", 0o755),
        ("/proc", 0o555),
        ("/sys", 0o555),
        ("/run", 0o755),
        ("/tmp", 0o1777),
        ("/etc", 0o755),
        ("/root", 0o700),
    ] {
        cpio.dir(dir, perm, root);
    }
    cpio.char_device("/dev/console", 0o600, 5, 1);
    cpio.char_device("/dev/null", 0o666, 1, 3);
    cpio.file("/init", 0o755, root, init);
    cpio.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal newc reader: (name, mode, rdev major, data) per entry, trailer excluded.
    fn parse(mut b: &[u8]) -> Vec<(String, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let hex = |s: &[u8]| u32::from_str_radix(std::str::from_utf8(s).unwrap(), 16).unwrap();
        let align = |n: usize| (n + 3) & !3;
        loop {
            assert_eq!(&b[..6], b"070701");
            let field = |i: usize| hex(&b[6 + 8 * i..14 + 8 * i]);
            let (mode, size, major, namesize) =
                (field(1), field(6) as usize, field(9), field(11) as usize);
            let name = std::str::from_utf8(&b[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            let data_at = align(110 + namesize);
            let data = b[data_at..data_at + size].to_vec();
            b = &b[align(data_at + size)..];
            if name == TRAILER {
                assert!(b.is_empty());
                return out;
            }
            out.push((name, mode, major, data));
        }
    }

    #[test]
    fn base_archive_has_init_and_console() {
        let bytes = base_initramfs(b"\x7fELF-init");
        assert_eq!(bytes.len() % 4, 0);
        let entries = parse(&bytes);
        let init = entries.iter().find(|e| e.0 == "init").unwrap();
        assert_eq!(
            (init.1, &init.3[..]),
            (S_IFREG | 0o755, &b"\x7fELF-init"[..])
        );
        let console = entries.iter().find(|e| e.0 == "dev/console").unwrap();
        assert_eq!((console.1, console.2), (S_IFCHR | 0o600, 5));
        assert_eq!(entries[0].0, ".");
    }

    #[test]
    fn trees_keep_files_links_and_modes() {
        let dir = std::env::temp_dir().join(format!("rootfs-builder-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("bin/tool"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            dir.join("bin/tool"),
            std::os::unix::fs::PermissionsExt::from_mode(0o751),
        )
        .unwrap();
        std::os::unix::fs::symlink("tool", dir.join("bin/alias")).unwrap();
        let mut cpio = Cpio::new();
        cpio.tree(&dir, "/").unwrap();
        let entries = parse(&cpio.finish());
        std::fs::remove_dir_all(&dir).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, [".", "bin", "bin/alias", "bin/tool"]);
        assert_eq!(
            (entries[2].1, &entries[2].3[..]),
            (S_IFLNK | 0o777, &b"tool"[..])
        );
        assert_eq!(entries[3].1, S_IFREG | 0o751);
    }

    #[test]
    fn a_limit_stops_a_tree_before_reading_what_does_not_fit() {
        let dir = std::env::temp_dir().join(format!("rootfs-builder-limit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("small"), [7u8; 1000]).unwrap();
        let mut cpio = Cpio::with_limit(1 << 20);
        cpio.tree(&dir, "/").unwrap();
        // A sparse 8 GiB file: checked by its size, never read (that would take long).
        let big = std::fs::File::create(dir.join("z-big")).unwrap();
        big.set_len(8 << 30).unwrap();
        let err = Cpio::with_limit(1 << 20).tree(&dir, "/").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::FileTooLarge);
        assert!(err.to_string().contains("more than 1 MiB"), "{err}");
        let err = Cpio::new().tree(&dir, "/").unwrap_err();
        assert!(err.to_string().contains("larger than 4 GiB"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
