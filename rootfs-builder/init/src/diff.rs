//! The container's changes as one OCI layer (`commit`): a tar of the overlay's upper directory on
//! the sandbox layer, with overlayfs's own markers turned back into OCI's (a 0:0 character
//! device is a deleted name, `.wh.NAME`; a directory marked opaque gets `.wh..wh..opq`), written
//! as data frames to the host, which checks it like any layer before it stores it.
//!
//! The upper directory lies outside the container's root once the agent has entered it, so it is
//! kept open from before the chroot and reached through `/proc/self/fd/N`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use microvm_agent_protocol as proto;
use tar::{EntryType, Header};

/// The overlay's upper directory, opened before the agent entered the container's root.
static UPPER: OnceLock<OwnedFd> = OnceLock::new();

/// Remembers the upper directory at `path` for later diffs.
pub fn keep_upper(path: &Path) -> Result<(), String> {
    let fd = nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("open {}: {e}", path.display()))?;
    let _ = UPPER.set(fd);
    Ok(())
}

/// Where the upper directory is reachable now.
fn upper() -> Result<PathBuf, String> {
    let fd = UPPER
        .get()
        .ok_or("this container has no sandbox layer (it runs from a --rootfs directory)")?;
    Ok(PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())))
}

/// Batches bytes into data frames on the host connection; [`FrameWriter::finish`] ends the
/// stream.
pub struct FrameWriter<W: Write> {
    out: W,
    buf: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    /// Frames to `out`.
    pub fn new(out: W) -> Self {
        FrameWriter {
            out,
            buf: Vec::with_capacity(proto::MAX_DATA_FRAME),
        }
    }

    /// Sends what is left and the end-of-stream frame.
    pub fn finish(mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            proto::write_frame(&mut self.out, &self.buf)?;
        }
        proto::write_frame(&mut self.out, &[])
    }
}

impl<W: Write> Write for FrameWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = proto::MAX_DATA_FRAME - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == proto::MAX_DATA_FRAME {
            proto::write_frame(&mut self.out, &self.buf)?;
            self.buf.clear();
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes the diff of the kept upper directory as a tar to `out`.
pub fn write_diff(out: impl Write) -> Result<(), String> {
    let upper = upper()?;
    let mut b = tar::Builder::new(out);
    let mut links = HashMap::new();
    walk(&mut b, &upper, Path::new(""), &mut links)?;
    b.finish().map_err(|e| format!("writing the diff: {e}"))
}

/// Appends everything under `base/rel`, sorted by name so that a diff is reproducible.
fn walk<W: Write>(
    b: &mut tar::Builder<W>,
    base: &Path,
    rel: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<(), String> {
    let dir = base.join(rel);
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| format!("reading {}: {e}", shown(rel)))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("reading {}: {e}", shown(rel)))?;
    names.sort();
    for name in names {
        let path = rel.join(&name);
        let full = base.join(&path);
        let m = std::fs::symlink_metadata(&full).map_err(|e| format!("{}: {e}", shown(&path)))?;
        let ft = m.file_type();
        let w = |e: io::Error| format!("writing the diff at {}: {e}", shown(&path));
        for key in ["trusted.overlay.redirect", "trusted.overlay.metacopy"] {
            if xattr(&full, key).is_some() {
                return Err(format!(
                    "{} carries {key}, which a layer cannot express",
                    shown(&path)
                ));
            }
        }
        if ft.is_char_device() && m.rdev() == 0 {
            // overlayfs's whiteout: the name was deleted.
            let mut wh = OsStr::new(".wh.").to_os_string();
            wh.push(&name);
            let mut h = header(&m, EntryType::Regular);
            h.set_mode(0o644);
            b.append_data(&mut h, rel.join(wh), io::empty())
                .map_err(w)?;
            continue;
        }
        pax_xattrs(b, &full, &path).map_err(w)?;
        if ft.is_dir() {
            let mut h = header(&m, EntryType::Directory);
            b.append_data(&mut h, &path, io::empty()).map_err(w)?;
            if xattr(&full, "trusted.overlay.opaque").as_deref() == Some(b"y") {
                let mut h = header(&m, EntryType::Regular);
                h.set_mode(0o644);
                b.append_data(&mut h, path.join(".wh..wh..opq"), io::empty())
                    .map_err(w)?;
            }
            walk(b, base, &path, links)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&full).map_err(w)?;
            let mut h = header(&m, EntryType::Symlink);
            b.append_link(&mut h, &path, target).map_err(w)?;
        } else if ft.is_file() {
            let key = (m.dev(), m.ino());
            if m.nlink() > 1 {
                if let Some(first) = links.get(&key) {
                    let mut h = header(&m, EntryType::Link);
                    b.append_link(&mut h, &path, first).map_err(w)?;
                    continue;
                }
                links.insert(key, path.clone());
            }
            let file = std::fs::File::open(&full).map_err(w)?;
            let mut h = header(&m, EntryType::Regular);
            h.set_size(m.len());
            // The file may change size under an unpaused container: send exactly what the
            // header says, padded or cut.
            let data = io::Read::take(
                io::Read::chain(io::Read::take(file, m.len()), io::repeat(0)),
                m.len(),
            );
            b.append_data(&mut h, &path, data).map_err(w)?;
        } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            let kind = if ft.is_char_device() {
                EntryType::Char
            } else if ft.is_block_device() {
                EntryType::Block
            } else {
                EntryType::Fifo
            };
            let mut h = header(&m, kind);
            let (major, minor) = (
                nix::sys::stat::major(m.rdev()),
                nix::sys::stat::minor(m.rdev()),
            );
            h.set_device_major(major as u32).map_err(w)?;
            h.set_device_minor(minor as u32).map_err(w)?;
            b.append_data(&mut h, &path, io::empty()).map_err(w)?;
        }
        // Sockets have no place in a layer.
    }
    Ok(())
}

fn header(m: &std::fs::Metadata, kind: EntryType) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(m.mode() & 0o7777);
    h.set_uid(m.uid().into());
    h.set_gid(m.gid().into());
    h.set_mtime(m.mtime().max(0) as u64);
    h.set_size(0);
    h
}

/// The entry's extended attributes (but overlayfs's own) as a PAX header before it.
fn pax_xattrs<W: Write>(b: &mut tar::Builder<W>, full: &Path, path: &Path) -> io::Result<()> {
    let names = match xattr_names(full) {
        Some(n) => n,
        None => return Ok(()),
    };
    let mut records = Vec::new();
    for name in names {
        if name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.") {
            continue;
        }
        let Ok(key) = std::str::from_utf8(&name) else {
            continue;
        };
        let Some(value) = xattr(full, key) else {
            continue;
        };
        let mut body = format!(" SCHILY.xattr.{key}=").into_bytes();
        body.extend_from_slice(&value);
        body.push(b'\n');
        // A PAX record's length counts its own digits.
        let mut len = body.len() + 1;
        while len.to_string().len() + body.len() != len {
            len += 1;
        }
        records.extend_from_slice(len.to_string().as_bytes());
        records.extend_from_slice(&body);
    }
    if records.is_empty() {
        return Ok(());
    }
    let mut h = Header::new_ustar();
    h.set_entry_type(EntryType::XHeader);
    h.set_mode(0o644);
    h.set_size(records.len() as u64);
    let mut pax_name = PathBuf::from("PaxHeaders");
    pax_name.push(path.file_name().unwrap_or(OsStr::new("x")));
    // Long names are fine here: the PAX entry's own name is informational.
    let short: Vec<u8> = pax_name
        .as_os_str()
        .as_bytes()
        .iter()
        .take(99)
        .copied()
        .collect();
    h.set_path(OsStr::from_bytes(&short))?;
    h.set_cksum();
    b.append(&h, &records[..])
}

fn xattr_names(path: &Path) -> Option<Vec<Vec<u8>>> {
    let raw = nix_listxattr(path)?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(<[u8]>::to_vec)
            .collect(),
    )
}

fn cpath(path: &Path) -> Option<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_bytes()).ok()
}

fn nix_listxattr(path: &Path) -> Option<Vec<u8>> {
    let p = cpath(path)?;
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: llistxattr writes at most `buf.len()` bytes into `buf`, which is valid for writes;
    // `p` is a NUL-terminated path.
    let n = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

/// The value of xattr `key` on `path` (not following a symlink), if set.
fn xattr(path: &Path, key: &str) -> Option<Vec<u8>> {
    let p = cpath(path)?;
    let k = std::ffi::CString::new(key).ok()?;
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: lgetxattr writes at most `buf.len()` bytes into `buf`, valid for writes; `p` and
    // `k` are NUL-terminated.
    let n = unsafe { libc::lgetxattr(p.as_ptr(), k.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

fn shown(rel: &Path) -> String {
    format!("/{}", rel.display())
}
