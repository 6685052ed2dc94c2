//! Reads a layer tar member by member with every size bounded before anything is read.
//!
//! The tar crate, left to itself, reads a GNU long name or a PAX header whole at whatever size
//! the archive claims (a 512 MiB PAX header of zeros cost 770 MiB), and expands a GNU sparse
//! entry to its claimed size (2^60 bytes from a 1.5 KB tar). So the crate only splits the
//! stream into raw entries here, and the extensions are applied by this module: long names
//! and link names up to [`MAX_LONG_NAME`], PAX headers up to [`MAX_PAX`], sparse files refused.

use std::cell::RefCell;
use std::io::{self, Read};
use std::rc::Rc;

use tar::EntryType;

use super::{hostile, RewriteError};

/// Largest PAX header (its records: long paths, ids, times, xattrs). Linux caps one xattr value
/// at 64 KiB, so this leaves room for many.
pub(super) const MAX_PAX: u64 = 1 << 20;
/// Largest GNU long name or link name. A path longer than [`MAX_PATH`](super::MAX_PATH) once normalised is
/// refused later, naming it; this only bounds what is read to get there.
pub(super) const MAX_LONG_NAME: u64 = 64 << 10;
/// The tar block size.
const BLOCK: u64 = 512;

/// One member of the layer, its extension headers applied.
#[derive(Debug)]
pub(super) struct Member {
    /// The raw path (not yet normalised).
    pub path: Vec<u8>,
    /// Symlink or hard link target.
    pub link: Option<Vec<u8>>,
    /// The entry type.
    pub etype: EntryType,
    /// Permission bits (with setuid, setgid, sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time, whole seconds.
    pub mtime: u64,
    /// `SCHILY.xattr.*` records, in order.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Device numbers of a character or block device.
    pub dev: (u32, u32),
    /// Bytes of data.
    pub size: u64,
}

/// Extension headers seen since the last member.
#[derive(Default)]
struct Pending {
    name: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

/// The decompressed layer, shared between the tar crate and [`each`]: when a PAX `size`
/// replaces a header's zero, the data is read here, behind the crate's back (it expects none).
struct Shared<R>(Rc<RefCell<R>>);

impl<R: Read> Read for Shared<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

/// Calls `f` with each member of the tar `input` and a reader of exactly its data. Data `f`
/// leaves unread is skipped.
pub(super) fn each<R: Read>(
    input: R,
    mut f: impl FnMut(Member, &mut dyn Read) -> Result<(), RewriteError>,
) -> Result<(), RewriteError> {
    let input = Rc::new(RefCell::new(input));
    let mut archive = tar::Archive::new(Shared(input.clone()));
    let entries = archive.entries().map_err(RewriteError::Input)?.raw(true);
    let mut pending = Pending::default();
    for entry in entries {
        let mut entry = entry.map_err(RewriteError::Input)?;
        let etype = entry.header().entry_type();
        let at = entry.raw_header_position();
        let slot = match etype {
            EntryType::GNULongName => Some((&mut pending.name, "GNU long name", MAX_LONG_NAME)),
            EntryType::GNULongLink => Some((&mut pending.link, "GNU long link", MAX_LONG_NAME)),
            EntryType::XHeader => Some((&mut pending.pax, "PAX header", MAX_PAX)),
            // Global PAX records (a comment, a charset) describe nothing we keep; their data is
            // skipped unread.
            EntryType::XGlobalHeader => continue,
            _ => None,
        };
        if let Some((slot, what, max)) = slot {
            if slot.is_some() {
                return Err(hostile(format!(
                    "two {what}s for one entry (at byte {at} of the tar)"
                )));
            }
            *slot = Some(read_bounded(&mut entry, what, max, at)?);
            continue;
        }
        let ext = std::mem::take(&mut pending);
        let member = member(&entry, etype, ext)?;
        if etype == EntryType::GNUSparse {
            return Err(sparse(&member.path));
        }
        let header_size = entry.size();
        if member.size == header_size {
            f(member, &mut entry)?;
            continue;
        }
        // A PAX size replaces a header size that could not hold it; writers put zero there
        // (Go's archive/tar, Python's tarfile), and anything else is two different files.
        if header_size != 0 {
            return Err(hostile(format!(
                "{} has a PAX size of {} bytes but a header size of {header_size}",
                super::show(&member.path),
                member.size
            )));
        }
        let size = member.size;
        let mut data = Shared(input.clone()).take(size);
        f(member, &mut data)?;
        skip(&mut data)?;
        let mut padding = Shared(input.clone()).take((BLOCK - size % BLOCK) % BLOCK);
        skip(&mut padding)?;
    }
    if pending.name.is_some() || pending.link.is_some() || pending.pax.is_some() {
        return Err(hostile(
            "the tar ends with extension headers that describe no entry".into(),
        ));
    }
    Ok(())
}

/// The member `entry` describes, with its extension headers `ext` applied.
fn member<R: Read>(
    entry: &tar::Entry<'_, R>,
    etype: EntryType,
    ext: Pending,
) -> Result<Member, RewriteError> {
    let h = entry.header();
    let corrupt = RewriteError::Input;
    let mut m = Member {
        path: match ext.name {
            Some(n) => until_nul(n),
            None => h.path_bytes().into_owned(),
        },
        link: match ext.link {
            Some(l) => Some(until_nul(l)),
            None => h.link_name_bytes().map(|l| l.into_owned()),
        },
        etype,
        mode: h.mode().map_err(corrupt)? & 0o7777,
        uid: h.uid().map_err(corrupt)?,
        gid: h.gid().map_err(corrupt)?,
        mtime: h.mtime().unwrap_or(0),
        xattrs: Vec::new(),
        dev: (
            h.device_major().ok().flatten().unwrap_or(0),
            h.device_minor().ok().flatten().unwrap_or(0),
        ),
        size: entry.size(),
    };
    let Some(pax) = ext.pax else {
        return Ok(m);
    };
    for record in tar::PaxExtensions::new(&pax) {
        let record = record.map_err(RewriteError::Input)?;
        let Ok(key) = record.key() else { continue };
        let value = record.value_bytes();
        let number = || {
            std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.split('.').next()?.parse::<u64>().ok())
        };
        match key {
            "path" => m.path = value.to_vec(),
            "linkpath" => m.link = Some(value.to_vec()),
            "size" => {
                m.size = number().ok_or_else(|| {
                    hostile(format!("{} has a bad PAX size", super::show(&m.path)))
                })?
            }
            "uid" => m.uid = number().unwrap_or(m.uid),
            "gid" => m.gid = number().unwrap_or(m.gid),
            "mtime" => m.mtime = number().unwrap_or(0),
            k if k.starts_with("GNU.sparse.") => return Err(sparse(&m.path)),
            k => {
                if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                    if !name.is_empty() {
                        m.xattrs.push((name.to_string(), value.to_vec()));
                    }
                }
            }
        }
    }
    Ok(m)
}

fn sparse(path: &[u8]) -> RewriteError {
    hostile(format!(
        "{} is a sparse file (GNU sparse format), which microvm does not convert: rebuild the \
         layer without sparse files (tar without --sparse)",
        super::show(path)
    ))
}

/// An extension header's data, refused beyond `max` bytes before any of it is read.
fn read_bounded<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    what: &str,
    max: u64,
    at: u64,
) -> Result<Vec<u8>, RewriteError> {
    let size = entry.size();
    if size > max {
        return Err(hostile(format!(
            "a {what} of {size} bytes (at byte {at} of the tar) is longer than the {max} allowed"
        )));
    }
    let mut data = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut data).map_err(RewriteError::Input)?;
    if data.len() as u64 != size {
        return Err(RewriteError::Input(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the tar ends inside a {what}"),
        )));
    }
    Ok(data)
}

/// A GNU long name without its terminating NUL(s); a NUL inside is left for the path checks
/// to refuse.
fn until_nul(mut name: Vec<u8>) -> Vec<u8> {
    while name.last() == Some(&0) {
        name.pop();
    }
    name
}

/// Reads `r` to its end, keeping nothing; its end must come where it claims.
fn skip(r: &mut io::Take<impl Read>) -> Result<(), RewriteError> {
    let want = r.limit();
    let got = io::copy(r, &mut io::sink()).map_err(RewriteError::Input)?;
    if got != want {
        return Err(RewriteError::Input(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the tar ends inside an entry's data",
        )));
    }
    Ok(())
}
