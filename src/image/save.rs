//! `save`: stored images (committed ones included) written as one archive that `docker load`,
//! `podman load`, `skopeo` and `microvm load` take: an OCI archive (an OCI layout in a tar, the
//! blobs as stored) or a docker archive (`manifest.json` with RepoTags, the config, and each layer
//! as an uncompressed `layer.tar`, as `docker save` writes them). Every blob is checked against
//! its digest on the way out.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read, Write};

use serde_json::json;
use tar::{EntryType, Header};

use super::digest::{Digest, HashingReader};
use super::error::{Error, IoContext};
use super::layer_convert::detect_compression;
use super::reference::split_name;
use super::{Image, Store};

/// Archive formats `save` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SaveFormat {
    /// An OCI image layout in a tar.
    OciArchive,
    /// docker's `docker save` format.
    DockerArchive,
}

fn header(path: &str, size: u64) -> Result<Header, Error> {
    let mut h = Header::new_ustar();
    h.set_entry_type(EntryType::Regular);
    h.set_path(path)
        .map_err(|e| Error::io(format!("naming {path} in the archive"), e))?;
    h.set_mode(0o644);
    h.set_size(size);
    h.set_mtime(0);
    h.set_cksum();
    Ok(h)
}

fn add_bytes<W: Write>(b: &mut tar::Builder<W>, path: &str, bytes: &[u8]) -> Result<(), Error> {
    let h = header(path, bytes.len() as u64)?;
    b.append(&h, bytes)
        .map_err(|e| Error::io(format!("writing {path} to the archive"), e))
}

impl Store {
    /// Writes `images` to `out` as `format`.
    pub fn save(&self, images: &[Image], format: SaveFormat, out: impl Write) -> Result<(), Error> {
        let mut b = tar::Builder::new(out);
        match format {
            SaveFormat::OciArchive => self.save_oci(images, &mut b)?,
            SaveFormat::DockerArchive => self.save_docker(images, &mut b)?,
        }
        b.into_inner()
            .and_then(|mut w| w.flush())
            .map_err(|e| Error::io("finishing the archive", e))
    }

    /// Copies blob `d` into the archive at `path`, verifying it as it goes.
    fn add_blob<W: Write>(
        &self,
        b: &mut tar::Builder<W>,
        d: &Digest,
        path: &str,
    ) -> Result<(), Error> {
        let blob = self.blob_path(d);
        let file = File::open(&blob).ctx(|| format!("opening {}", blob.display()))?;
        let size = file
            .metadata()
            .ctx(|| format!("reading {}", blob.display()))?
            .len();
        let mut reader = HashingReader::new(file);
        b.append(&header(path, size)?, &mut reader)
            .map_err(|e| Error::io(format!("writing {path} to the archive"), e))?;
        let (actual, _) = reader
            .drain_and_finish()
            .ctx(|| format!("reading {}", blob.display()))?;
        if actual != *d {
            return Err(Error::DigestMismatch {
                digest: d.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(())
    }

    fn save_oci<W: Write>(&self, images: &[Image], b: &mut tar::Builder<W>) -> Result<(), Error> {
        add_bytes(b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let mut done = HashSet::new();
        let mut manifests = Vec::new();
        for image in images {
            let md = Digest::parse(&image.digest)?;
            let blobs = std::iter::once(md.clone())
                .chain(std::iter::once(Digest::parse(&image.config_digest)?))
                .chain(
                    image
                        .layers
                        .iter()
                        .map(|l| Digest::parse(l))
                        .collect::<Result<Vec<_>, _>>()?,
                );
            for d in blobs {
                if done.insert(d.clone()) {
                    self.add_blob(b, &d, &format!("blobs/sha256/{}", d.hex()))?;
                }
            }
            let size = std::fs::metadata(self.blob_path(&md))
                .ctx(|| format!("reading {}", self.blob_path(&md).display()))?
                .len();
            // An image pulled by digest alone has no tag to name it by.
            let mut annotations = json!({"io.containerd.image.name": image.name});
            if let (_, Some(tag)) = split_name(&image.name) {
                annotations["org.opencontainers.image.ref.name"] = tag.into();
            }
            manifests.push(json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": md.as_str(),
                "size": size,
                "annotations": annotations,
            }));
        }
        let index = json!({"schemaVersion": 2, "manifests": manifests});
        add_bytes(b, "index.json", index.to_string().as_bytes())
    }

    fn save_docker<W: Write>(
        &self,
        images: &[Image],
        b: &mut tar::Builder<W>,
    ) -> Result<(), Error> {
        let mut done = HashSet::new();
        let mut entries = Vec::new();
        for image in images {
            if image.layers.len() != image.diff_ids.len() {
                return Err(Error::format(
                    format!("image {}", image.name),
                    "its config and manifest disagree on the layers",
                ));
            }
            let cfg = Digest::parse(&image.config_digest)?;
            let cfg_path = format!("{}.json", cfg.hex());
            if done.insert(cfg.clone()) {
                self.add_blob(b, &cfg, &cfg_path)?;
            }
            let mut layers = Vec::new();
            for (layer, diff_id) in image.layers.iter().zip(&image.diff_ids) {
                let (layer, diff_id) = (Digest::parse(layer)?, Digest::parse(diff_id)?);
                let path = format!("{}/layer.tar", diff_id.hex());
                if done.insert(diff_id.clone()) {
                    self.add_uncompressed(b, &layer, &diff_id, &path)?;
                }
                layers.push(path);
            }
            let tags: Vec<&str> = match split_name(&image.name) {
                (_, Some(_)) => vec![&image.name],
                (_, None) => Vec::new(),
            };
            entries.push(json!({
                "Config": cfg_path,
                "RepoTags": tags,
                "Layers": layers,
            }));
        }
        add_bytes(b, "manifest.json", json!(entries).to_string().as_bytes())
    }

    /// The layer blob `layer` decompressed into the archive at `path`, checked against its
    /// diff ID: one pass to learn the size the tar header needs, one to copy.
    fn add_uncompressed<W: Write>(
        &self,
        b: &mut tar::Builder<W>,
        layer: &Digest,
        diff_id: &Digest,
        path: &str,
    ) -> Result<(), Error> {
        let blob = self.blob_path(layer);
        let open = || -> Result<Box<dyn Read>, Error> {
            let file = File::open(&blob).ctx(|| format!("opening {}", blob.display()))?;
            let mut r = BufReader::with_capacity(256 << 10, file);
            let c = detect_compression(&mut r).ctx(|| format!("reading {}", blob.display()))?;
            c.decoder(Box::new(r))
                .ctx(|| format!("reading {}", blob.display()))
        };
        let (actual, size) = HashingReader::new(open()?)
            .drain_and_finish()
            .ctx(|| format!("decompressing {}", blob.display()))?;
        if actual != *diff_id {
            return Err(Error::DigestMismatch {
                digest: diff_id.to_string(),
                actual: actual.to_string(),
            });
        }
        // A blob that changed between the passes would not fit its header: `append` fails then.
        b.append(&header(path, size)?, open()?.take(size))
            .map_err(|e| Error::io(format!("writing {path} to the archive"), e))
    }
}
