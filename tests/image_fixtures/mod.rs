//! Test images made in-process: layer tars (hostile ones too, from raw headers), OCI layouts,
//! oci-archives and docker archives, plus helpers to read a produced squashfs back.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under cargo's test scratch space.
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("image-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// A path inside.
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `sha256:<hex>` of bytes.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// Builds a layer tar entry by entry, with raw names (absolute, `..`, non-UTF-8 all allowed).
#[derive(Default)]
pub struct Layer {
    buf: Vec<u8>,
}

/// Entry kinds for [`Layer::entry`].
pub enum Kind<'a> {
    /// A regular file with its data.
    File(&'a [u8]),
    /// A directory.
    Dir,
    /// A symlink to a target.
    Symlink(&'a [u8]),
    /// A hard link to a path.
    Hardlink(&'a [u8]),
    /// A character device.
    Char(u32, u32),
    /// A block device.
    Block(u32, u32),
    /// A FIFO.
    Fifo,
}

impl Layer {
    /// A new, empty layer.
    pub fn new() -> Layer {
        Layer::default()
    }

    /// A regular file, mode 0644.
    pub fn file(self, path: &str, data: &[u8]) -> Layer {
        self.entry(path.as_bytes(), Kind::File(data), 0o644, &[])
    }

    /// A directory, mode 0755.
    pub fn dir(self, path: &str) -> Layer {
        self.entry(path.as_bytes(), Kind::Dir, 0o755, &[])
    }

    /// A symlink.
    pub fn symlink(self, path: &str, target: &str) -> Layer {
        self.entry(
            path.as_bytes(),
            Kind::Symlink(target.as_bytes()),
            0o777,
            &[],
        )
    }

    /// Any entry; `xattrs` go in a PAX header before it; a long name in a GNU long-name entry.
    pub fn entry(
        mut self,
        path: &[u8],
        kind: Kind<'_>,
        mode: u32,
        xattrs: &[(&str, &[u8])],
    ) -> Layer {
        if !xattrs.is_empty() {
            let mut pax = Vec::new();
            for (k, v) in xattrs {
                let key = format!("SCHILY.xattr.{k}");
                let body = key.len() + v.len() + 3;
                let mut len = body + 1;
                while len != body + len.to_string().len() {
                    len = body + len.to_string().len();
                }
                pax.extend_from_slice(format!("{len} {key}=").as_bytes());
                pax.extend_from_slice(v);
                pax.push(b'\n');
            }
            self.raw(
                b"././@PaxHeader",
                tar::EntryType::XHeader,
                0o644,
                &pax,
                b"",
                (0, 0),
            );
        }
        if path.len() > 100 {
            let mut name = path.to_vec();
            name.push(0);
            self.raw(
                b"././@LongLink",
                tar::EntryType::GNULongName,
                0o644,
                &name,
                b"",
                (0, 0),
            );
        }
        let (t, data, link, dev): (tar::EntryType, &[u8], &[u8], (u32, u32)) = match kind {
            Kind::File(d) => (tar::EntryType::Regular, d, b"", (0, 0)),
            Kind::Dir => (tar::EntryType::Directory, b"", b"", (0, 0)),
            Kind::Symlink(l) => (tar::EntryType::Symlink, b"", l, (0, 0)),
            Kind::Hardlink(l) => (tar::EntryType::Link, b"", l, (0, 0)),
            Kind::Char(a, b) => (tar::EntryType::Char, b"", b"", (a, b)),
            Kind::Block(a, b) => (tar::EntryType::Block, b"", b"", (a, b)),
            Kind::Fifo => (tar::EntryType::Fifo, b"", b"", (0, 0)),
        };
        let short = &path[..path.len().min(100)];
        self.raw(short, t, mode, data, link, dev);
        self
    }

    fn raw(
        &mut self,
        name: &[u8],
        t: tar::EntryType,
        mode: u32,
        data: &[u8],
        link: &[u8],
        dev: (u32, u32),
    ) {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len().min(100)]
            .copy_from_slice(&link[..link.len().min(100)]);
        h.set_entry_type(t);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        if matches!(t, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(dev.0).unwrap();
            h.set_device_minor(dev.1).unwrap();
        }
        h.set_cksum();
        self.buf.extend_from_slice(h.as_bytes());
        self.buf.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.buf.extend(std::iter::repeat_n(0u8, pad));
    }

    /// The finished tar.
    pub fn tar(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&[0; 1024]);
        self.buf
    }
}

/// gzip of bytes.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// zstd of bytes.
pub fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 1).unwrap()
}

/// OCI layer media types.
pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// gzip layer.
pub const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// zstd layer.
pub const TAR_ZST: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Manifest.
pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Index.
pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// An image config document with a run configuration.
pub fn config_json(arch: &str, diff_ids: &[String], entrypoint: &[&str], cmd: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "created": "2024-01-02T03:04:05Z",
        "architecture": arch,
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "Cmd": cmd, "Env": ["PATH=/bin", "A=b"], "WorkingDir": "/w", "User": "1:2"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

/// An OCI layout being written.
pub struct Layout {
    pub dir: PathBuf,
    entries: Vec<serde_json::Value>,
}

impl Layout {
    /// Starts a layout at `dir`.
    pub fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir: dir.to_path_buf(),
            entries: Vec::new(),
        }
    }

    /// Stores a blob; returns its descriptor.
    pub fn blob(&self, media_type: &str, bytes: &[u8]) -> serde_json::Value {
        let d = digest(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(&d[7..]), bytes).unwrap();
        serde_json::json!({"mediaType": media_type, "digest": d, "size": bytes.len()})
    }

    /// Stores an image (layers as (uncompressed tar, media type)); returns its manifest's
    /// descriptor.
    pub fn image(
        &self,
        arch: &str,
        layers: &[(Vec<u8>, &str)],
        entrypoint: &[&str],
    ) -> serde_json::Value {
        let diff_ids: Vec<String> = layers.iter().map(|(t, _)| digest(t)).collect();
        let descs: Vec<serde_json::Value> = layers
            .iter()
            .map(|(t, mt)| {
                let bytes = match *mt {
                    TAR_GZ => gzip(t),
                    TAR_ZST => zstd(t),
                    _ => t.clone(),
                };
                self.blob(mt, &bytes)
            })
            .collect();
        let cfg = self.blob(
            "application/vnd.oci.image.config.v1+json",
            &config_json(arch, &diff_ids, entrypoint, &["hi"]),
        );
        let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg, "layers": descs});
        self.blob(MANIFEST, &serde_json::to_vec(&manifest).unwrap())
    }

    /// Adds an index.json entry, with a ref name and a platform if given.
    pub fn add(
        &mut self,
        mut desc: serde_json::Value,
        tag: Option<&str>,
        platform: Option<(&str, &str)>,
    ) {
        if let Some(t) = tag {
            desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": t});
        }
        if let Some((os, arch)) = platform {
            desc["platform"] = serde_json::json!({"os": os, "architecture": arch});
        }
        self.entries.push(desc);
    }

    /// Writes index.json.
    pub fn finish(&self) {
        let index =
            serde_json::json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": self.entries});
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }
}

/// A tar of a directory's content (an oci-archive from a layout).
pub fn tar_dir(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.finish().unwrap();
}

/// Writes a tar of named members.
pub fn tar_members(out: &Path, members: &[(&str, &[u8])], symlinks: &[(&str, &str)]) {
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, *data).unwrap();
    }
    for (name, target) in symlinks {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, name, target).unwrap();
    }
    b.finish().unwrap();
}

/// True when `tool` is on PATH; otherwise prints a loud skip line for `test`.
pub fn tool_or_skip(test: &str, tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIPPED {test}: {tool} missing (scripts/setup-host installs it)");
    }
    found
}

/// `unsquashfs -lls` of an image: one line per entry (type+mode, owner, size or dev, path).
pub fn listing(img: &Path) -> String {
    let out = Command::new("unsquashfs")
        .args(["-n", "-lls"])
        .arg(img)
        .output()
        .expect("unsquashfs (squashfs-tools)");
    assert!(
        out.status.success(),
        "unsquashfs {}: {}",
        img.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The listing line of `path` (relative to the image root).
pub fn line_of(listing: &str, path: &str) -> Option<String> {
    let want = format!("squashfs-root/{path}");
    listing
        .lines()
        .find(|l| l.ends_with(&format!(" {want}")) || l.contains(&format!(" {want} -> ")))
        .map(str::to_string)
}

/// The xattrs of `path` in the image, as `name=value` lines (rdsquashfs).
pub fn xattrs(img: &Path, path: &str) -> String {
    let out = Command::new("rdsquashfs")
        .args(["-x", path])
        .arg(img)
        .output()
        .expect("rdsquashfs (squashfs-tools-ng)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A file's content in the image.
pub fn cat(img: &Path, path: &str) -> Vec<u8> {
    let out = Command::new("rdsquashfs")
        .args(["-c", path])
        .arg(img)
        .output()
        .expect("rdsquashfs");
    assert!(
        out.status.success(),
        "rdsquashfs -c {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
