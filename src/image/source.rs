//! Read access to the files of an image source: an OCI layout directory, or a tar archive
//! (oci-archive, docker-archive) indexed once so that each member is read in place by offset.
//! Member names are normalised; links between members are followed inside the archive only.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::error::{Error, IoContext};
use super::layer_convert::{detect_compression, Compression};

/// Most link hops followed inside an archive.
const MAX_LINK_HOPS: usize = 16;

/// An open member and its size.
pub(crate) type Member<'a> = (Box<dyn Read + 'a>, u64);

/// A directory or an indexed tar archive.
pub(crate) enum Source {
    /// An OCI layout directory.
    Dir(PathBuf),
    /// A tar archive read in place.
    Archive(Archive),
}

/// A tar archive's members by normalised path.
pub(crate) struct Archive {
    name: String,
    file: File,
    members: HashMap<String, Entry>,
}

enum Entry {
    File { offset: u64, size: u64 },
    Link(String),
}

impl Source {
    /// A layout directory.
    pub(crate) fn dir(path: &Path) -> Result<Source, Error> {
        if !path.is_dir() {
            return Err(Error::io(
                format!("opening OCI layout {}", path.display()),
                io::Error::new(io::ErrorKind::NotFound, "not a directory"),
            ));
        }
        Ok(Source::Dir(path.to_path_buf()))
    }

    /// Indexes the tar archive at `path`; a gzip or zstd compressed archive is first
    /// decompressed into an anonymous file in `scratch`.
    pub(crate) fn archive(path: &Path, scratch: &Path) -> Result<Source, Error> {
        let name = path.display().to_string();
        let file = File::open(path).ctx(|| format!("opening archive {name}"))?;
        let mut reader = BufReader::new(file);
        let compression = detect_compression(&mut reader).ctx(|| format!("reading {name}"))?;
        let file = match compression {
            Compression::None => {
                let mut f = reader.into_inner();
                f.rewind().ctx(|| format!("reading {name}"))?;
                f
            }
            c => decompress_to_scratch(reader, c, scratch, &name)?,
        };
        Archive::index(name, file).map(Source::Archive)
    }

    /// How to name this source in messages.
    pub(crate) fn name(&self) -> String {
        match self {
            Source::Dir(p) => p.display().to_string(),
            Source::Archive(a) => a.name.clone(),
        }
    }

    /// Opens a member (a relative path) for reading, with its size; `None` when it does not
    /// exist.
    pub(crate) fn open(&self, rel: &str) -> Result<Option<Member<'_>>, Error> {
        match self {
            Source::Dir(root) => {
                let Some(clean) = normalize(rel) else {
                    return Ok(None);
                };
                let path = root.join(clean);
                match File::open(&path) {
                    Ok(f) => {
                        let meta = f.metadata().ctx(|| format!("reading {}", path.display()))?;
                        if !meta.is_file() {
                            return Ok(None);
                        }
                        Ok(Some((Box::new(f), meta.len())))
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(Error::io(format!("opening {}", path.display()), e)),
                }
            }
            Source::Archive(a) => Ok(a.open(rel).map(|(r, n)| (Box::new(r) as Box<dyn Read>, n))),
        }
    }

    /// Reads a whole member of at most `limit` bytes; `None` when it does not exist.
    pub(crate) fn read_small(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>, Error> {
        let Some((r, size)) = self.open(rel)? else {
            return Ok(None);
        };
        if size > limit {
            return Err(Error::format(
                format!("{} in {}", rel, self.name()),
                format!("is {size} bytes, more than the {limit} allowed for a JSON document"),
            ));
        }
        let mut buf = Vec::with_capacity(size as usize);
        r.take(limit + 1)
            .read_to_end(&mut buf)
            .ctx(|| format!("reading {rel} in {}", self.name()))?;
        if (buf.len() as u64) < size {
            return Err(Error::ArchiveTruncated(self.name()));
        }
        Ok(Some(buf))
    }
}

impl Archive {
    fn index(name: String, file: File) -> Result<Archive, Error> {
        let file_len = file.metadata().ctx(|| format!("reading {name}"))?.len();
        let mut members = HashMap::new();
        {
            let mut archive = tar::Archive::new(&file);
            let entries = archive
                .entries_with_seek()
                .ctx(|| format!("reading archive {name}"))?;
            for entry in entries {
                let entry = entry.map_err(|e| truncated_or(&name, e))?;
                let Some(path) = std::str::from_utf8(&entry.path_bytes())
                    .ok()
                    .and_then(normalize)
                else {
                    continue;
                };
                let header = entry.header();
                let member = match header.entry_type() {
                    tar::EntryType::Regular | tar::EntryType::Continuous => {
                        let offset = entry.raw_file_position();
                        let size = entry.size();
                        if offset.checked_add(size).is_none_or(|end| end > file_len) {
                            return Err(Error::ArchiveTruncated(name));
                        }
                        Entry::File { offset, size }
                    }
                    tar::EntryType::Symlink => {
                        let Some(target) = link_target(&entry) else {
                            continue;
                        };
                        // A symlink's target is relative to the link's own directory.
                        let base = path.rsplit_once('/').map_or("", |(d, _)| d);
                        Entry::Link(if target.starts_with('/') {
                            target
                        } else {
                            format!("{base}/{target}")
                        })
                    }
                    tar::EntryType::Link => {
                        let Some(target) = link_target(&entry) else {
                            continue;
                        };
                        Entry::Link(target)
                    }
                    _ => continue,
                };
                members.insert(path, member);
            }
        }
        Ok(Archive {
            name,
            file,
            members,
        })
    }

    fn open(&self, rel: &str) -> Option<(Section<'_>, u64)> {
        let mut path = normalize(rel)?;
        for _ in 0..MAX_LINK_HOPS {
            match self.members.get(&path)? {
                Entry::File { offset, size } => {
                    return Some((
                        Section {
                            file: &self.file,
                            pos: *offset,
                            end: offset + size,
                        },
                        *size,
                    ))
                }
                Entry::Link(target) => path = normalize(target)?,
            }
        }
        None
    }
}

fn link_target(entry: &tar::Entry<'_, &File>) -> Option<String> {
    let bytes = entry.link_name_bytes()?;
    std::str::from_utf8(&bytes).ok().map(str::to_string)
}

fn truncated_or(name: &str, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof || e.to_string().contains("entire block") {
        Error::ArchiveTruncated(name.to_string())
    } else {
        Error::format(
            format!("archive {name}"),
            format!("not a readable tar file: {e}"),
        )
    }
}

fn decompress_to_scratch(
    reader: BufReader<File>,
    compression: Compression,
    scratch: &Path,
    name: &str,
) -> Result<File, Error> {
    let tmp = scratch.join(format!(
        "archive-{}-{}",
        std::process::id(),
        super::store::unique()
    ));
    let mut out = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .ctx(|| format!("creating {}", tmp.display()))?;
    // Unlinked at once: the space is freed when the file is closed, however the process ends.
    let _ = std::fs::remove_file(&tmp);
    let mut decoder = compression
        .decoder(Box::new(reader) as Box<dyn BufRead>)
        .ctx(|| format!("decompressing {name}"))?;
    io::copy(&mut decoder, &mut out).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::ArchiveTruncated(name.to_string())
        } else {
            Error::io(format!("decompressing {name}"), e)
        }
    })?;
    out.rewind().ctx(|| format!("decompressing {name}"))?;
    Ok(out)
}

/// Normalises an archive member path: no leading `/` or `./`, no `.` or empty components, `..`
/// resolved; `None` when `..` climbs above the root.
pub(crate) fn normalize(p: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

/// A byte range of the archive, read with pread so several may be open at once.
pub(crate) struct Section<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for Section<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.end - self.pos).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive member ends early",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_keeps_paths_inside() {
        assert_eq!(normalize("./a//b/./c").as_deref(), Some("a/b/c"));
        assert_eq!(
            normalize("/blobs/sha256/x").as_deref(),
            Some("blobs/sha256/x")
        );
        assert_eq!(normalize("a/../b").as_deref(), Some("b"));
        assert_eq!(normalize("../etc/passwd"), None);
        assert_eq!(normalize("a/../../b"), None);
    }
}
