//! Rewrites one OCI layer tar into the tar that tar2sqfs packs into the layer's read-only image,
//! in one streaming pass, never touching the host file system.
//!
//! - Paths are normalised: a leading `/`, `.` and empty components go; `..` is resolved, and a
//!   layer whose `..` would climb above the root is rejected (as docker does), as are names
//!   longer than 255 bytes (squashfs cannot hold them) and paths longer than 4095.
//! - OCI whiteouts become overlayfs ones: `dir/.wh.NAME` a 0:0 character device `dir/NAME`,
//!   `dir/.wh..wh..opq` the xattr `trusted.overlay.opaque=y` on `dir`. tar2sqfs refuses an entry
//!   given twice, but applies a directory's attributes when its entry comes after its children,
//!   so directories and whiteouts (metadata only, a few bytes each) are held back and written
//!   once, at the end, each with everything the layer said about it; file data streams through.
//! - The layer's own `trusted.overlay.*`/`user.overlay.*` xattrs are dropped: only whiteouts may
//!   steer the guest's overlayfs.
//! - A layer is rejected when it puts an entry beneath a symlink or other non-directory of its
//!   own ("symlink out, then write through it"), names a path twice, or hard-links to anything
//!   but an earlier non-directory of the same layer (e.g. a host path).
//! - [`merge`] runs the same checks over several layers to write them as one (what overlayfs
//!   shows of them stacked), for VMs with fewer disk slots than the image has layers.
//!
//! Ownership, modes (setuid included), mtimes, xattrs, symlinks (targets kept verbatim: they
//! resolve inside the guest), hard links and device nodes are kept.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{self, Read, Write};

use tar::{EntryType, Header};

/// Longest name of one path component (squashfs and Linux's NAME_MAX).
const MAX_NAME: usize = 255;
/// Longest path (Linux's PATH_MAX less the terminating NUL).
const MAX_PATH: usize = 4095;
/// Largest value the ustar octal fields hold.
const MAX_OCTAL_ID: u64 = 0o7_777_777;
const MAX_OCTAL_SIZE: u64 = 0o77_777_777_777;
/// Copy buffer for file data.
const COPY_BUF: usize = 256 << 10;
/// Memory one layer's checks may hold until its end (paths, their ancestors, held-back
/// directories' attributes). A million files with 100-byte paths take about 170 MiB.
const MAX_HELD: usize = 256 << 20;
/// What one held key costs beyond its own bytes (hash table slot, allocation), roughly.
const HELD_OVERHEAD: usize = 64;
/// The setting for the most file data one layer may hold, in GiB (default
/// [`DEFAULT_MAX_LAYER_GIB`]): a small compressed layer can claim any amount.
pub(crate) const MAX_LAYER_SIZE_VAR: &str = "MICROVM_MAX_LAYER_GIB";
const DEFAULT_MAX_LAYER_GIB: u64 = 64;

/// Why a layer could not be rewritten.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RewriteError {
    /// The layer stream could not be read: corrupt compression or tar.
    #[error("cannot read the layer: {0}")]
    Input(io::Error),
    /// The output (tar2sqfs's stdin) could not be written.
    #[error("cannot write the layer image: {0}")]
    Output(io::Error),
    /// A setting of ours is not valid.
    #[error("{0}")]
    Setting(String),
    /// The layer holds something that cannot be represented safely.
    #[error("{0}")]
    Hostile(String),
}

/// What a rewrite did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Summary {
    /// Entries written (files, links, devices, directories, whiteouts).
    pub entries: u64,
    /// Whiteouts written as 0:0 character devices.
    pub whiteouts: u64,
    /// Directories marked opaque.
    pub opaque_dirs: u64,
    /// `*.overlay.*` xattrs dropped from the layer's own entries.
    pub dropped_overlay_xattrs: u64,
}

#[derive(Clone, Debug, Default)]
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: Vec<(String, Vec<u8>)>,
}

#[derive(Default)]
struct Dir {
    /// What the layer said about it; `None` for a directory only implied by its children.
    meta: Option<Meta>,
    opaque: bool,
}

/// Rewrites the layer tar read from `input` into `output` (see the module comment).
pub(crate) fn rewrite<R: Read, W: Write>(input: R, output: W) -> Result<Summary, RewriteError> {
    let mut out = TarWriter::new(output);
    let mut rw = Rewriter::new(&mut out, None);
    rw.run(input)?;
    rw.finish()
}

/// [`rewrite`] with at most `max_data` bytes of file data (fuzzing, tests).
pub(crate) fn rewrite_capped<R: Read, W: Write>(
    input: R,
    output: W,
    max_data: u64,
) -> Result<Summary, RewriteError> {
    let mut out = TarWriter::new(output);
    let mut rw = Rewriter::new(&mut out, None);
    rw.max_data = Some(max_data);
    rw.run(input)?;
    rw.finish()
}

struct Rewriter<'a, W: Write> {
    out: &'a mut TarWriter<W>,
    /// When merging layers: which of this layer's non-directories are written, and where.
    plan: Option<&'a merge::LayerPlan>,
    dirs: HashMap<Vec<u8>, Dir>,
    nondirs: HashSet<Vec<u8>>,
    whiteouts: Vec<Vec<u8>>,
    /// Hard links in layer order: (path, the non-link entry it finally names).
    links: Vec<(Vec<u8>, Vec<u8>)>,
    /// Hard link path -> the non-link entry it finally names (links may name links).
    link_roots: HashMap<Vec<u8>, Vec<u8>>,
    /// The last directory chain checked, to skip re-walking siblings' parents.
    last_parent: Option<Vec<u8>>,
    /// Memory held for checks so far (see [`Rewriter::hold`]).
    held: usize,
    /// File data so far, and the most allowed (from [`MAX_LAYER_SIZE_VAR`] unless set).
    data: u64,
    max_data: Option<u64>,
    summary: Summary,
}

impl<'a, W: Write> Rewriter<'a, W> {
    fn new(out: &'a mut TarWriter<W>, plan: Option<&'a merge::LayerPlan>) -> Self {
        let mut rw = Rewriter {
            out,
            plan,
            dirs: HashMap::new(),
            nondirs: HashSet::new(),
            whiteouts: Vec::new(),
            links: Vec::new(),
            link_roots: HashMap::new(),
            last_parent: None,
            held: 0,
            data: 0,
            max_data: None,
            summary: Summary::default(),
        };
        rw.dirs.insert(Vec::new(), Dir::default());
        rw
    }

    /// Checks and records every entry of the layer tar `input`, writing non-directories.
    fn run<R: Read>(&mut self, input: R) -> Result<(), RewriteError> {
        if self.max_data.is_none() {
            self.max_data = Some(max_layer_data()?);
        }
        members::each(input, |member, data| self.entry(member, data))
    }

    /// Counts `bytes` more of memory held for checks until the layer's end; a layer needing
    /// more than [`MAX_HELD`] is refused at `path`. (Deep paths are the way to it: every
    /// ancestor of a path is a key of its own.)
    fn hold(&mut self, bytes: usize, path: &[u8]) -> Result<(), RewriteError> {
        self.held += bytes + HELD_OVERHEAD;
        if self.held > MAX_HELD {
            return Err(hostile(format!(
                "the layer's paths need more than {} MiB of memory to check (at {}): too many \
                 entries, too deep or with too many attributes",
                MAX_HELD >> 20,
                show(path)
            )));
        }
        Ok(())
    }

    /// Where a non-directory of this layer is written: its own path unless merging, where it
    /// may go nowhere (hidden by a higher layer) or to a hard link's path (see [`merge`]).
    fn place(&self, path: &[u8]) -> Option<Vec<u8>> {
        match self.plan {
            None => Some(path.to_vec()),
            Some(plan) => plan.place(path),
        }
    }

    fn entry(&mut self, member: Member, data: &mut dyn Read) -> Result<(), RewriteError> {
        let etype = member.etype;
        let path = sanitize(&member.path)?;
        // Every member's data counts, written or skipped: a whiteout or a directory can claim
        // (and a compressed layer can hold) as much as a file.
        self.data = self.data.saturating_add(member.size);
        let max = self.max_data.unwrap_or(u64::MAX);
        if self.data > max {
            return Err(hostile(format!(
                "the layer holds more than {max} bytes of data (at {}): set \
                 {MAX_LAYER_SIZE_VAR} higher (GiB) to convert it",
                show(&path)
            )));
        }
        let (parent, name) = split_parent(&path);
        if let Some(target) = name.strip_prefix(b".wh.") {
            return self.whiteout(&path, parent, target);
        }
        let meta = self.meta(&member);
        match etype {
            EntryType::Directory => {
                if self.nondirs.contains(&path) {
                    return Err(hostile(format!(
                        "{} is both a directory and a non-directory",
                        show(&path)
                    )));
                }
                self.ensure_dirs(&path, &path)?;
                // Held back to the end, attributes and all.
                let attrs = meta.xattrs.iter().map(|(k, v)| k.len() + v.len()).sum();
                self.hold(attrs, &path)?;
                if let Some(d) = self.dirs.get_mut(&path) {
                    d.meta = Some(meta);
                }
                Ok(())
            }
            EntryType::Regular | EntryType::Continuous => {
                self.claim(&path, parent)?;
                let size = member.size;
                let Some(dest) = self.place(&path) else {
                    return Ok(());
                };
                self.out.write(
                    &dest,
                    EntryType::Regular,
                    &meta,
                    None,
                    (0, 0),
                    size,
                    Some(data),
                )?;
                self.summary.entries += 1;
                Ok(())
            }
            EntryType::Symlink => {
                let target = member.link.clone().unwrap_or_default();
                if target.is_empty() || target.len() > MAX_PATH || target.contains(&0) {
                    return Err(hostile(format!(
                        "symlink {} has an empty or overlong target",
                        show(&path)
                    )));
                }
                self.claim(&path, parent)?;
                let Some(dest) = self.place(&path) else {
                    return Ok(());
                };
                self.out
                    .write(&dest, etype, &meta, Some(&target), (0, 0), 0, None)?;
                self.summary.entries += 1;
                Ok(())
            }
            EntryType::Link => {
                let raw_target = member.link.clone().unwrap_or_default();
                let target = sanitize(&raw_target)?;
                if !self.nondirs.contains(&target) {
                    return Err(hostile(format!(
                        "hard link {} points to {}, which is not an earlier file of this layer",
                        show(&path),
                        show(&raw_target)
                    )));
                }
                self.claim(&path, parent)?;
                let root = self
                    .link_roots
                    .get(&target)
                    .cloned()
                    .unwrap_or_else(|| target.clone());
                // The path and its root, kept twice (in order, and by path).
                self.hold(2 * (path.len() + root.len()), &path)?;
                self.link_roots.insert(path.clone(), root.clone());
                self.links.push((path.clone(), root.clone()));
                let Some(dest) = self.place(&path) else {
                    return Ok(());
                };
                // Unmerged, the link is kept as the layer wrote it; merged, it names where its
                // file's data went.
                let target = match self.plan {
                    None => target,
                    Some(plan) => plan.link_target(&root),
                };
                self.out
                    .write(&dest, etype, &meta, Some(&target), (0, 0), 0, None)?;
                self.summary.entries += 1;
                Ok(())
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let dev = member.dev;
                self.claim(&path, parent)?;
                let Some(dest) = self.place(&path) else {
                    return Ok(());
                };
                self.out.write(&dest, etype, &meta, None, dev, 0, None)?;
                self.summary.entries += 1;
                Ok(())
            }
            other => Err(hostile(format!(
                "{} has an unsupported tar entry type {:?}",
                show(&path),
                other.as_byte() as char
            ))),
        }
    }

    /// Records an OCI whiteout; written (or folded into a directory) at the end.
    fn whiteout(&mut self, path: &[u8], parent: &[u8], target: &[u8]) -> Result<(), RewriteError> {
        self.ensure_dirs(parent, path)?;
        if target == b".wh..opq" {
            if let Some(d) = self.dirs.get_mut(parent) {
                d.opaque = true;
            }
            return Ok(());
        }
        if target.starts_with(b".wh.") {
            // aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not content, as docker ignores it.
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." {
            return Err(hostile(format!("{} is not a valid whiteout", show(path))));
        }
        self.hold(path.len(), path)?;
        self.whiteouts.push(join(parent, target));
        Ok(())
    }

    /// Checks that a non-directory may be written at `path` and records it.
    fn claim(&mut self, path: &[u8], parent: &[u8]) -> Result<(), RewriteError> {
        if path.is_empty() {
            return Err(hostile("the layer's root is not a directory".into()));
        }
        if self.dirs.contains_key(path) {
            return Err(hostile(format!(
                "{} is both a directory and a non-directory",
                show(path)
            )));
        }
        self.ensure_dirs(parent, path)?;
        self.hold(path.len(), path)?;
        if !self.nondirs.insert(path.to_vec()) {
            return Err(hostile(format!(
                "{} appears twice in the layer",
                show(path)
            )));
        }
        Ok(())
    }

    /// Makes `dir` and its ancestors directories of this layer (implied ones if not yet seen);
    /// fails when one of them is a symlink or other non-directory of this layer.
    fn ensure_dirs(&mut self, dir: &[u8], for_path: &[u8]) -> Result<(), RewriteError> {
        if self.last_parent.as_deref() == Some(dir) {
            return Ok(());
        }
        let mut end = 0;
        loop {
            let next = dir[end..].iter().position(|&b| b == b'/').map(|i| end + i);
            let prefix = &dir[..next.unwrap_or(dir.len())];
            if self.nondirs.contains(prefix) {
                return Err(hostile(format!(
                    "{} lies beneath {}, which is not a directory in this layer",
                    show(for_path),
                    show(prefix)
                )));
            }
            if !self.dirs.contains_key(prefix) {
                self.hold(prefix.len(), for_path)?;
                self.dirs.insert(prefix.to_vec(), Dir::default());
            }
            match next {
                Some(i) => end = i + 1,
                None => break,
            }
        }
        self.last_parent = Some(dir.to_vec());
        Ok(())
    }

    /// Mode, owner, mtime and xattrs of a member, the layer's own overlay xattrs dropped.
    fn meta(&mut self, m: &Member) -> Meta {
        let mut xattrs = Vec::with_capacity(m.xattrs.len());
        for (name, value) in &m.xattrs {
            if name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.") {
                self.summary.dropped_overlay_xattrs += 1;
            } else {
                xattrs.push((name.clone(), value.clone()));
            }
        }
        Meta {
            mode: m.mode,
            uid: m.uid,
            gid: m.gid,
            mtime: m.mtime.min(u32::MAX as u64),
            xattrs,
        }
    }

    /// Writes the held-back whiteouts and directories, then the end of the archive.
    fn finish(mut self) -> Result<Summary, RewriteError> {
        let whiteouts = std::mem::take(&mut self.whiteouts);
        let mut seen = HashSet::new();
        for target in whiteouts {
            if !seen.insert(target.clone()) || self.nondirs.contains(&target) {
                // The layer itself puts something there: that hides the lower entry already.
                continue;
            }
            if let Some(d) = self.dirs.get_mut(&target) {
                // A new directory replacing a lower one must not show the lower one's content.
                d.opaque = true;
                continue;
            }
            let meta = Meta::default();
            self.out
                .write(&target, EntryType::Char, &meta, None, (0, 0), 0, None)?;
            self.summary.entries += 1;
            self.summary.whiteouts += 1;
        }
        let mut dirs: Vec<(Vec<u8>, Dir)> = self.dirs.drain().collect();
        dirs.sort_by(|a, b| a.0.cmp(&b.0));
        for (path, dir) in dirs {
            if dir.meta.is_none() && !dir.opaque {
                continue; // tar2sqfs creates implied directories the same way
            }
            let mut meta = dir.meta.unwrap_or(Meta {
                mode: 0o755,
                ..Meta::default()
            });
            if dir.opaque {
                meta.xattrs.retain(|(k, _)| k != "trusted.overlay.opaque");
                meta.xattrs
                    .push(("trusted.overlay.opaque".into(), b"y".to_vec()));
                self.summary.opaque_dirs += 1;
            }
            let p: &[u8] = if path.is_empty() { b"./" } else { &path };
            self.out
                .write(p, EntryType::Directory, &meta, None, (0, 0), 0, None)?;
            self.summary.entries += 1;
        }
        self.out.finish()?;
        Ok(self.summary)
    }
}

/// The most file data one layer may hold, from [`MAX_LAYER_SIZE_VAR`].
fn max_layer_data() -> Result<u64, RewriteError> {
    super::env_setting(
        MAX_LAYER_SIZE_VAR,
        DEFAULT_MAX_LAYER_GIB,
        (1 << 33) - 1,
        "GiB",
    )
    .map(|gib| gib << 30)
    .map_err(RewriteError::Setting)
}

fn hostile(msg: String) -> RewriteError {
    RewriteError::Hostile(msg)
}

/// The path for messages (lossy, bounded).
fn show(p: &[u8]) -> String {
    let s = String::from_utf8_lossy(p);
    let mut out: String = s.chars().take(200).collect();
    if s.chars().count() > 200 {
        out.push_str("...");
    }
    format!("{out:?}")
}

/// Normalises an archive path (see the module comment).
pub(crate) fn sanitize(raw: &[u8]) -> Result<Vec<u8>, RewriteError> {
    if raw.contains(&0) {
        // No file name holds a NUL; tools that cut the name there would see another file.
        return Err(hostile(format!("{} contains a NUL byte", show(raw))));
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if parts.pop().is_none() {
                    return Err(hostile(format!(
                        "{} climbs above the image's root",
                        show(raw)
                    )));
                }
            }
            c if c.len() > MAX_NAME => {
                return Err(hostile(format!(
                    "{} has a name longer than {MAX_NAME} bytes",
                    show(raw)
                )))
            }
            c => parts.push(c),
        }
    }
    let out = parts.join(&b'/');
    if out.len() > MAX_PATH {
        return Err(hostile(format!(
            "{} is longer than {MAX_PATH} bytes",
            show(raw)
        )));
    }
    Ok(out)
}

fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        [parent, b"/", name].concat()
    }
}

/// A minimal ustar+PAX writer: headers built exactly as given (no path rewriting), long paths,
/// link targets, large ids and xattrs in a PAX record.
struct TarWriter<W: Write> {
    w: W,
    buf: Vec<u8>,
}

impl<W: Write> TarWriter<W> {
    fn new(w: W) -> Self {
        TarWriter {
            w,
            buf: vec![0; COPY_BUF],
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        path: &[u8],
        etype: EntryType,
        meta: &Meta,
        link: Option<&[u8]>,
        dev: (u32, u32),
        size: u64,
        data: Option<&mut dyn Read>,
    ) -> Result<(), RewriteError> {
        let mut pax: Vec<u8> = Vec::new();
        if path.len() > 100 {
            pax_record(&mut pax, "path", path);
        }
        if let Some(l) = link.filter(|l| l.len() > 100) {
            pax_record(&mut pax, "linkpath", l);
        }
        if meta.uid > MAX_OCTAL_ID {
            pax_record(&mut pax, "uid", meta.uid.to_string().as_bytes());
        }
        if meta.gid > MAX_OCTAL_ID {
            pax_record(&mut pax, "gid", meta.gid.to_string().as_bytes());
        }
        if size > MAX_OCTAL_SIZE {
            pax_record(&mut pax, "size", size.to_string().as_bytes());
        }
        for (k, v) in &meta.xattrs {
            pax_record(&mut pax, &format!("SCHILY.xattr.{k}"), v);
        }
        if !pax.is_empty() {
            let mut h = Header::new_ustar();
            set_name(&mut h, b"././@PaxHeader");
            h.set_entry_type(EntryType::XHeader);
            h.set_mode(0o644);
            h.set_size(pax.len() as u64);
            h.set_mtime(0);
            h.set_cksum();
            self.w
                .write_all(h.as_bytes())
                .map_err(RewriteError::Output)?;
            self.w.write_all(&pax).map_err(RewriteError::Output)?;
            self.pad(pax.len() as u64)?;
        }
        let mut h = Header::new_ustar();
        set_name(&mut h, &path[..path.len().min(100)]);
        h.set_entry_type(etype);
        h.set_mode(meta.mode);
        h.set_uid(meta.uid.min(MAX_OCTAL_ID));
        h.set_gid(meta.gid.min(MAX_OCTAL_ID));
        h.set_mtime(meta.mtime);
        h.set_size(size.min(MAX_OCTAL_SIZE));
        if let Some(l) = link {
            let n = l.len().min(100);
            h.as_old_mut().linkname[..n].copy_from_slice(&l[..n]);
        }
        if matches!(etype, EntryType::Char | EntryType::Block) {
            h.set_device_major(dev.0).map_err(RewriteError::Output)?;
            h.set_device_minor(dev.1).map_err(RewriteError::Output)?;
        }
        h.set_cksum();
        self.w
            .write_all(h.as_bytes())
            .map_err(RewriteError::Output)?;
        if let Some(data) = data {
            let mut left = size;
            while left > 0 {
                let want = left.min(self.buf.len() as u64) as usize;
                let n = match data.read(&mut self.buf[..want]) {
                    Ok(0) => {
                        return Err(RewriteError::Input(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "a file's data ends early",
                        )))
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(RewriteError::Input(e)),
                };
                self.w
                    .write_all(&self.buf[..n])
                    .map_err(RewriteError::Output)?;
                left -= n as u64;
            }
            self.pad(size)?;
        }
        Ok(())
    }

    fn pad(&mut self, len: u64) -> Result<(), RewriteError> {
        let rem = (len % 512) as usize;
        if rem != 0 {
            self.w
                .write_all(&[0u8; 512][..512 - rem])
                .map_err(RewriteError::Output)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), RewriteError> {
        self.w
            .write_all(&[0u8; 1024])
            .map_err(RewriteError::Output)?;
        self.w.flush().map_err(RewriteError::Output)
    }
}

fn set_name(h: &mut Header, name: &[u8]) {
    let old = h.as_old_mut();
    old.name = [0; 100];
    old.name[..name.len()].copy_from_slice(name);
}

/// Appends one PAX record: `"<len> <key>=<value>\n"`, where len counts the whole record.
fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    let mut s = String::new();
    let _ = write!(s, "{len} {key}=");
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(value);
    out.push(b'\n');
}

mod members;
mod merge;
#[cfg(test)]
mod tests;

use members::Member;

pub(crate) use merge::{Merge, MergeWriter};
