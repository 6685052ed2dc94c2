//! What a registry pull or push asks of the store: checking a fetched manifest and config as
//! `load` checks them, storing each layer blob and its layer image in one streaming pass as it
//! downloads, and handing out an image's blobs to upload.

use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::path::PathBuf;

use super::digest::{Digest, HashingWriter};
use super::error::{Error, IoContext};
use super::layer_convert;
use super::lock::Mode;
use super::oci_layout::MAX_JSON;
use super::store::{
    check_image, parse_config, parse_manifest, sync_dir, unique, TempFile, TMP_PREFIX,
};
use super::{Image, Store};

/// A blob a manifest names: its digest and declared size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobRef {
    /// The blob's digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
}

/// What a push uploads: blobs first (bottom layer first, then the config), then the manifest.
#[derive(Clone, Debug)]
pub struct PushPlan {
    /// The layer and config blobs, with where each is stored.
    pub blobs: Vec<(BlobRef, PathBuf)>,
    /// The manifest's bytes, exactly as stored (so its digest stays the same).
    pub manifest: Vec<u8>,
    /// Its media type.
    pub media_type: String,
    /// Its digest.
    pub digest: Digest,
}

/// Keeps `prune` away while held: what a pull has stored but not named yet stays.
#[derive(Debug)]
pub struct StoreHold {
    _lock: super::lock::FileLock,
}

/// Largest JSON document (manifest, index, config) a pull reads.
pub const MAX_DOCUMENT: u64 = MAX_JSON;

impl Store {
    /// Holds the store for a pull: until the hold is dropped, `prune` waits, so layers stored
    /// (or found stored) early in the pull are still there when the image is named.
    pub fn hold(&self) -> Result<StoreHold, Error> {
        Ok(StoreHold {
            _lock: self.gc_lock(Mode::Shared)?,
        })
    }

    /// Checks a fetched image manifest and config as `load` does (media types, platform, layer
    /// count) and returns the config's and layers' descriptors.
    pub fn check_fetched(
        &self,
        manifest: &[u8],
        manifest_digest: &Digest,
    ) -> Result<(BlobRef, Vec<BlobRef>), Error> {
        let m = parse_manifest(manifest, manifest_digest)?;
        let config = BlobRef {
            digest: Digest::parse(m.config().digest().as_ref())?,
            size: m.config().size(),
        };
        let layers = m
            .layers()
            .iter()
            .map(|l| {
                Ok(BlobRef {
                    digest: Digest::parse(l.digest().as_ref())?,
                    size: l.size(),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok((config, layers))
    }

    /// Checks the config fetched for `manifest` against it as `load` does: media types,
    /// platform, layer count.
    pub fn check_fetched_config(
        &self,
        manifest: &[u8],
        manifest_digest: &Digest,
        config: &[u8],
    ) -> Result<Digest, Error> {
        let m = parse_manifest(manifest, manifest_digest)?;
        let cfg_digest = Digest::parse(m.config().digest().as_ref())?;
        let cfg = parse_config(config, &cfg_digest)?;
        check_image(&m, &cfg, &cfg_digest)?;
        Ok(cfg_digest)
    }

    /// Checks the config fetched for `manifest` against it, then stores both.
    pub fn put_fetched(
        &self,
        manifest: &[u8],
        manifest_digest: &Digest,
        config: &[u8],
    ) -> Result<(), Error> {
        let cfg_digest = self.check_fetched_config(manifest, manifest_digest, config)?;
        let _gc = self.gc_lock(Mode::Shared)?;
        self.put_bytes(config, &cfg_digest)?;
        self.put_bytes(manifest, manifest_digest)?;
        sync_dir(&self.blobs_dir()).ctx(|| format!("syncing {}", self.blobs_dir().display()))
    }

    /// Whether layer `layer` is stored, blob and layer image both.
    pub fn has_layer(&self, layer: &BlobRef) -> bool {
        fs::metadata(self.blob_path(&layer.digest)).is_ok_and(|m| m.len() == layer.size)
            && self.layer_image_path(&layer.digest).exists()
    }

    /// Stores the layer blob `source` streams and converts it into its layer image in the
    /// same pass: bytes go to the blob's temporary file and through the conversion as they
    /// arrive; both are kept only if the stream is exactly `layer.size` bytes hashing to
    /// `layer.digest`. Holds the layer's conversion lock, so a `run` converting the same
    /// layer waits for this one instead of doing it twice.
    pub fn put_layer(
        &self,
        source: &mut dyn Read,
        layer: &BlobRef,
        progress: &indicatif::ProgressBar,
    ) -> Result<(), Error> {
        let d = &layer.digest;
        let _gc = self.gc_lock(Mode::Shared)?;
        let one = self.conversion_lock(d.hex())?;
        if self.has_layer(layer) {
            return Ok(());
        }
        if fs::metadata(self.blob_path(d)).is_ok_and(|m| m.len() == layer.size) {
            // The blob came another way (load, an earlier pull with --no-convert): convert
            // that instead of downloading again.
            drop(one);
            self.layer_image(d)?;
            return Ok(());
        }
        let image_tmp = self.fresh_image_temp(d.hex())?;
        let blob_tmp =
            TempFile::create(self.blobs_dir().join(format!("{TMP_PREFIX}{}", unique())))?;
        let mut tee = Tee {
            source: source.take(layer.size.saturating_add(1)),
            copy: HashingWriter::new(BufWriter::with_capacity(256 << 10, blob_tmp.file()?)),
            failed: None,
        };
        let converted = layer_convert::convert_stream(&mut tee, d, &image_tmp.path, progress);
        if let Some((what, e)) = tee.failed.take() {
            // The download or the disk failed: say that, not what the conversion made of it.
            return Err(Error::io(format!("{what} layer {d}"), e));
        }
        converted?;
        let (_, len, writer) = tee.copy.finish();
        if len != layer.size {
            return Err(Error::SizeMismatch {
                digest: d.to_string(),
                expected: layer.size,
                actual: len,
            });
        }
        let file = writer.into_inner().map_err(|e| {
            Error::io(
                format!("writing {}", blob_tmp.path.display()),
                e.into_error(),
            )
        })?;
        file.sync_all()
            .ctx(|| format!("syncing {}", blob_tmp.path.display()))?;
        image_tmp
            .file()?
            .sync_all()
            .ctx(|| format!("syncing {}", image_tmp.path.display()))?;
        blob_tmp.persist(&self.blob_path(d))?;
        image_tmp.persist(&self.layer_image_path(d))?;
        sync_dir(&self.blobs_dir()).ctx(|| format!("syncing {}", self.blobs_dir().display()))?;
        let layers_dir = self.layers_dir();
        sync_dir(&layers_dir).ctx(|| format!("syncing {}", layers_dir.display()))?;
        Ok(())
    }

    /// What pushing `image` uploads, each blob checked to be present first.
    pub fn push_plan(&self, image: &Image) -> Result<PushPlan, Error> {
        let digest = Digest::parse(&image.digest)?;
        let manifest = self.read_json_blob(&digest, "manifest")?;
        let media_type = serde_json::from_slice::<serde_json::Value>(&manifest)
            .ok()
            .and_then(|v| v.get("mediaType")?.as_str().map(str::to_string))
            .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".to_string());
        let (config, layers) = self.check_fetched(&manifest, &digest)?;
        let mut blobs = Vec::new();
        for b in layers.into_iter().chain([config]) {
            let path = self.blob_path(&b.digest);
            match fs::metadata(&path) {
                Ok(m) if m.len() == b.size => blobs.push((b, path)),
                _ => {
                    return Err(Error::MissingBlob {
                        container: format!("the image store {}", self.root().display()),
                        what: "blob",
                        digest: b.digest.to_string(),
                    })
                }
            }
        }
        Ok(PushPlan {
            blobs,
            manifest,
            media_type,
            digest,
        })
    }
}

/// Copies what it reads into the blob's temporary file (hashing it), and remembers the first
/// failure of the source or of the copy, so that it is reported as what it was.
struct Tee<R: Read, W: Write> {
    source: io::Take<R>,
    copy: HashingWriter<W>,
    failed: Option<(&'static str, io::Error)>,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some((_, e)) = &self.failed {
            return Err(io::Error::new(e.kind(), e.to_string()));
        }
        let n = match self.source.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            Err(e) => {
                let copy = io::Error::new(e.kind(), e.to_string());
                self.failed = Some(("downloading", e));
                return Err(copy);
            }
        };
        if let Err(e) = self.copy.write_all(&buf[..n]) {
            let copy = io::Error::new(e.kind(), e.to_string());
            self.failed = Some(("storing", e));
            return Err(copy);
        }
        Ok(n)
    }
}
