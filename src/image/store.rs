//! The store itself: loading images (copying and verifying blobs), naming them, listing,
//! removing, pruning, and handing out converted layer images.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use oci_spec::image::{Arch, ImageConfiguration, ImageManifest, Os};

use super::digest::{verify_bytes, Digest, HashingWriter};
use super::docker_archive;
use super::error::{Error, IoContext};
use super::layer_convert::{self, detect_compression, Compression};
use super::layer_rewrite::Summary;
use super::lock::{self, FileLock, Mode};
use super::names::{self, Record};
use super::oci_layout::{self, MAX_JSON};
use super::progress;
use super::reference::{
    normalize_name, parse_transport, split_name, stored_name, Transport, TransportRef,
};
use super::source::Source;
use super::{Image, ImageSummary, PruneReport, RunConfig};

/// Prefix of temporary files; never trusted, removed by the next conversion of the same layer
/// or by `prune`.
pub(super) const TMP_PREFIX: &str = ".tmp-";
/// Prefix of merged layer images (`layers/merged-<key>.sqfs`, see [`merge_key`]).
const MERGED_PREFIX: &str = "merged-";
/// Blobs smaller than this get no progress bar.
const BAR_MIN: u64 = 4 << 20;
const COPY_BUF: usize = 256 << 10;

const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];
const CONFIG_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// The image store rooted at one directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    progress: bool,
}

/// Converted layer images held for a running VM: while it lives, `prune` keeps them.
#[derive(Debug)]
pub struct LayerLease {
    paths: Vec<PathBuf>,
    _locks: Vec<FileLock>,
}

impl LayerLease {
    /// The layer images, bottom layer first.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }
}

impl Store {
    /// Opens (creating) the store at `root`. Progress bars are drawn when standard error is a
    /// terminal.
    pub fn open(root: &Path) -> Result<Store, Error> {
        for dir in ["blobs/sha256", "layers", "locks", "tmp"] {
            let d = root.join(dir);
            fs::create_dir_all(&d).map_err(|source| Error::StoreUnusable {
                path: root.to_path_buf(),
                source,
            })?;
        }
        use std::io::IsTerminal;
        Ok(Store {
            root: root.to_path_buf(),
            progress: io::stderr().is_terminal(),
        })
    }

    /// Turns progress bars on or off.
    pub fn with_progress(mut self, on: bool) -> Store {
        self.progress = on;
        self
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(super) fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    pub(super) fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    /// Where blob `d` lives.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.blobs_dir().join(d.hex())
    }

    /// Where the converted image of layer blob `d` lives.
    pub fn layer_image_path(&self, d: &Digest) -> PathBuf {
        self.layers_dir().join(format!("{}.sqfs", d.hex()))
    }

    pub(super) fn gc_lock(&self, mode: Mode) -> Result<FileLock, Error> {
        lock::lock(&self.root.join("store.lock"), mode)
    }

    /// Loads an image from a transport reference (`oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`,
    /// `docker-archive:FILE[:NAME:TAG]`), or from a bare path to a layout directory or an
    /// archive, and names it.
    pub fn load(&self, reference: &str) -> Result<Image, Error> {
        let tr = match parse_transport(reference) {
            Some(r) => r?,
            None => guess_transport(reference)?,
        };
        let _gc = self.gc_lock(Mode::Shared)?;
        let tmp = self.root.join("tmp");
        let src = match tr.transport {
            Transport::OciDir => Source::dir(&tr.path)?,
            Transport::OciArchive | Transport::DockerArchive => Source::archive(&tr.path, &tmp)?,
        };
        // A bare archive path is docker's when it has a manifest.json (docker 25+ archives also
        // hold an OCI layout, but only manifest.json carries RepoTags).
        let bare = parse_transport(reference).is_none();
        let docker = match tr.transport {
            Transport::DockerArchive => true,
            Transport::OciArchive if bare => src.open("manifest.json")?.is_some(),
            _ => false,
        };
        let (name, digest) = if docker {
            self.load_docker(&src, &tr)?
        } else {
            self.load_oci(&src, &tr)?
        };
        sync_dir(&self.blobs_dir()).ctx(|| format!("syncing {}", self.blobs_dir().display()))?;
        names::update(&self.root, |images| {
            images.insert(
                name.clone(),
                Record {
                    manifest: digest.to_string(),
                    loaded: now(),
                },
            );
            Ok(())
        })?;
        self.image(&name, &digest)
    }

    fn load_oci(&self, src: &Source, tr: &TransportRef) -> Result<(String, Digest), Error> {
        let sel = oci_layout::select(src, tr.selector.as_deref())?;
        let name = stored_name(&tr.path, tr.selector.as_deref(), sel.ref_name.as_deref())?;
        let manifest = parse_manifest(&sel.bytes, &sel.digest)?;
        let cfg = manifest.config();
        let cfg_digest = Digest::parse(cfg.digest().as_ref())?;
        let cfg_bytes = oci_layout::read_blob(src, &cfg_digest, Some(cfg.size()), "config")?;
        let config = parse_config(&cfg_bytes, &cfg_digest)?;
        check_image(&manifest, &config, &cfg_digest)?;
        self.put_bytes(&cfg_bytes, &cfg_digest)?;
        for layer in manifest.layers() {
            let d = Digest::parse(layer.digest().as_ref())?;
            let rel = oci_layout::blob_path(&d);
            let blob = self.blob_path(&d);
            if fs::metadata(&blob).is_ok_and(|m| m.len() == layer.size()) {
                continue; // already stored, verified when it was written
            }
            let (reader, _) = src.open(&rel)?.ok_or_else(|| Error::MissingBlob {
                container: src.name(),
                what: "layer",
                digest: d.to_string(),
            })?;
            self.put_stream(
                reader,
                Some(&d),
                Some(layer.size()),
                &format!("copying {}", progress::short(d.as_str())),
            )?;
        }
        self.put_bytes(&sel.bytes, &sel.digest)?;
        Ok((name, sel.digest))
    }

    fn load_docker(&self, src: &Source, tr: &TransportRef) -> Result<(String, Digest), Error> {
        let entry = docker_archive::select(src, tr.selector.as_deref())?;
        let selector_name = tr.selector.as_deref().filter(|s| !s.starts_with('@'));
        let fallback = entry
            .repo_tags
            .as_ref()
            .and_then(|t| t.first())
            .map(String::as_str);
        let name = stored_name(&tr.path, selector_name, fallback)?;
        let cfg_bytes = src.read_small(&entry.config, MAX_JSON)?.ok_or_else(|| {
            Error::format(
                src.name(),
                format!(
                    "manifest.json names config {:?}, which is not in the archive",
                    entry.config
                ),
            )
        })?;
        let cfg_digest = match docker_archive::digest_in_name(&entry.config) {
            Some(d) => {
                verify_bytes(&cfg_bytes, &d, None)?;
                d
            }
            None => Digest::of(&cfg_bytes),
        };
        let config = parse_config(&cfg_bytes, &cfg_digest)?;
        check_platform(&config, &cfg_digest)?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != entry.layers.len() {
            return Err(Error::format(
                src.name(),
                format!(
                    "manifest.json lists {} layers but the config {} has {}",
                    entry.layers.len(),
                    cfg_digest,
                    diff_ids.len()
                ),
            ));
        }
        self.put_bytes(&cfg_bytes, &cfg_digest)?;
        let mut layers = Vec::new();
        for (member, diff_id) in entry.layers.iter().zip(diff_ids) {
            let (reader, size) = src.open(member)?.ok_or_else(|| {
                Error::format(
                    src.name(),
                    format!("manifest.json names layer {member:?}, which is not in the archive"),
                )
            })?;
            let mut reader = BufReader::with_capacity(COPY_BUF, reader);
            let compression = detect_compression(&mut reader)
                .ctx(|| format!("reading {member} in {}", src.name()))?;
            // The name promises a digest (newer archives); a legacy uncompressed layer must hash
            // to its diff ID, which the config (itself hashed) vouches for.
            let expected = match docker_archive::digest_in_name(member) {
                Some(d) => Some(d),
                None if compression == Compression::None => Some(Digest::parse(diff_id)?),
                None => None,
            };
            let label = format!(
                "copying {}",
                progress::short(member.trim_start_matches("blobs/sha256/"))
            );
            let (digest, size) = self.put_stream(reader, expected.as_ref(), Some(size), &label)?;
            layers.push(serde_json::json!({
                "mediaType": compression.layer_media_type(),
                "digest": digest.as_str(),
                "size": size,
            }));
        }
        // The archive has no OCI manifest: write one, so every stored image is manifest ->
        // config + layers.
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cfg_digest.as_str(),
                "size": cfg_bytes.len(),
            },
            "layers": layers,
        });
        let bytes = serde_json::to_vec(&manifest).map_err(|source| Error::Json {
            what: "the manifest written for a docker archive".into(),
            source,
        })?;
        let digest = Digest::of(&bytes);
        self.put_bytes(&bytes, &digest)?;
        Ok((name, digest))
    }

    /// Stores a small verified blob.
    pub(super) fn put_bytes(&self, bytes: &[u8], digest: &Digest) -> Result<(), Error> {
        if fs::metadata(self.blob_path(digest)).is_ok_and(|m| m.len() == bytes.len() as u64) {
            return Ok(());
        }
        self.put_stream(bytes, Some(digest), Some(bytes.len() as u64), "")?;
        Ok(())
    }

    /// Copies a blob into the store through a temporary file, hashing as it goes; renamed into
    /// place only when digest (and size, if known) match. Returns its digest and size.
    pub(super) fn put_stream(
        &self,
        reader: impl Read,
        expected: Option<&Digest>,
        size: Option<u64>,
        label: &str,
    ) -> Result<(Digest, u64), Error> {
        let tmp = TempFile::create(self.blobs_dir().join(format!("{TMP_PREFIX}{}", unique())))?;
        let bar = progress::bar(
            self.progress && size.unwrap_or(0) >= BAR_MIN,
            size.unwrap_or(0),
            label.to_string(),
        );
        let limit = size.map_or(u64::MAX, |s| s + 1);
        let mut reader = bar.wrap_read(reader.take(limit));
        let mut w = HashingWriter::new(io::BufWriter::with_capacity(COPY_BUF, tmp.file()?));
        let mut buf = vec![0u8; COPY_BUF];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    let shown = expected.map_or_else(|| label.to_string(), |d| d.to_string());
                    return Err(Error::ArchiveTruncated(format!(
                        "the source of blob {shown}"
                    )));
                }
                Err(e) => return Err(Error::io(format!("reading {label}"), e)),
            };
            w.write_all(&buf[..n])
                .ctx(|| format!("writing {}", tmp.path.display()))?;
        }
        bar.finish_and_clear();
        let (actual, len, bufw) = w.finish();
        let file = bufw
            .into_inner()
            .map_err(|e| Error::io(format!("writing {}", tmp.path.display()), e.into_error()))?;
        if let Some(expected_size) = size {
            if len != expected_size {
                return Err(Error::SizeMismatch {
                    digest: expected.unwrap_or(&actual).to_string(),
                    expected: expected_size,
                    actual: len,
                });
            }
        }
        if let Some(d) = expected {
            if *d != actual {
                return Err(Error::DigestMismatch {
                    digest: d.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        file.sync_all()
            .ctx(|| format!("syncing {}", tmp.path.display()))?;
        tmp.persist(&self.blob_path(&actual))?;
        Ok((actual, len))
    }

    /// A stored image by name (`busybox` means `busybox:latest`), by image ID or digest
    /// (prefix), or a transport reference, which is loaded first.
    pub fn resolve(&self, name_or_ref: &str) -> Result<Image, Error> {
        if parse_transport(name_or_ref).is_some() {
            return self.load(name_or_ref);
        }
        let found = self.find(name_or_ref)?;
        let (name, record) = found
            .into_iter()
            .next()
            .ok_or_else(|| Error::NotFound(name_or_ref.to_string()))?;
        self.image(&name, &Digest::parse(&record.manifest)?)
    }

    /// Names matching `s`: its normalised name, else images whose ID or manifest digest starts
    /// with it.
    fn find(&self, s: &str) -> Result<Vec<(String, Record)>, Error> {
        let images = names::read(&self.root)?;
        if let Ok(n) = normalize_name(s) {
            if let Some(r) = images.get(&n) {
                return Ok(vec![(n, r.clone())]);
            }
        }
        let prefix = s.strip_prefix("sha256:").unwrap_or(s);
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) || prefix.len() > 64
        {
            return Ok(Vec::new());
        }
        let mut hits = Vec::new();
        for (name, record) in images {
            let Ok(md) = Digest::parse(&record.manifest) else {
                continue;
            };
            let config_hex = self
                .read_manifest(&md)
                .ok()
                .and_then(|m| Digest::parse(m.config().digest().as_ref()).ok())
                .map(|d| d.hex().to_string())
                .unwrap_or_default();
            if config_hex.starts_with(prefix) || md.hex().starts_with(prefix) {
                hits.push((name, record));
            }
        }
        Ok(hits)
    }

    pub(super) fn read_json_blob(&self, d: &Digest, what: &'static str) -> Result<Vec<u8>, Error> {
        let path = self.blob_path(d);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::MissingBlob {
                    container: format!("the image store {}", self.root.display()),
                    what,
                    digest: d.to_string(),
                })
            }
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        verify_bytes(&bytes, d, None)?;
        Ok(bytes)
    }

    pub(super) fn read_manifest(&self, d: &Digest) -> Result<ImageManifest, Error> {
        parse_manifest(&self.read_json_blob(d, "manifest")?, d)
    }

    /// The stored image `name` whose manifest is `digest`.
    pub(super) fn image(&self, name: &str, digest: &Digest) -> Result<Image, Error> {
        let manifest = self.read_manifest(digest)?;
        let cfg_digest = Digest::parse(manifest.config().digest().as_ref())?;
        let config = parse_config(&self.read_json_blob(&cfg_digest, "config")?, &cfg_digest)?;
        let c = config.config().as_ref();
        let run = RunConfig {
            entrypoint: c.and_then(|c| c.entrypoint().clone()).unwrap_or_default(),
            cmd: c.and_then(|c| c.cmd().clone()).unwrap_or_default(),
            env: c.and_then(|c| c.env().clone()).unwrap_or_default(),
            working_dir: c.and_then(|c| c.working_dir().clone()).unwrap_or_default(),
            user: c.and_then(|c| c.user().clone()).unwrap_or_default(),
            stop_signal: c.and_then(|c| c.stop_signal().clone()).unwrap_or_default(),
        };
        Ok(Image {
            name: name.to_string(),
            digest: digest.to_string(),
            config_digest: cfg_digest.to_string(),
            config: run,
            layers: manifest
                .layers()
                .iter()
                .map(|l| l.digest().to_string())
                .collect(),
            diff_ids: config.rootfs().diff_ids().clone(),
        })
    }

    /// Every named image, sorted by name.
    pub fn list(&self) -> Result<Vec<ImageSummary>, Error> {
        let mut out = Vec::new();
        for (name, record) in names::read(&self.root)? {
            let digest = Digest::parse(&record.manifest)?;
            let manifest = self.read_manifest(&digest)?;
            let cfg_digest = Digest::parse(manifest.config().digest().as_ref())?;
            let config = parse_config(&self.read_json_blob(&cfg_digest, "config")?, &cfg_digest)?;
            let (repo, tag) = split_name(&name);
            out.push(ImageSummary {
                repository: repo.to_string(),
                // `REPO@sha256:...`: pulled by digest alone, untagged as docker shows it.
                tag: tag.unwrap_or("<none>").to_string(),
                name: name.clone(),
                id: cfg_digest.to_string(),
                digest: digest.to_string(),
                created: config.created().clone(),
                size: manifest.config().size()
                    + manifest.layers().iter().map(|l| l.size()).sum::<u64>(),
            });
        }
        Ok(out)
    }

    /// Removes the name `name` (or the one name an image ID stands for); blobs and layer images
    /// stay until [`Store::prune`]. Returns the name removed.
    pub fn remove(&self, name: &str) -> Result<String, Error> {
        let hits = self.find(name)?;
        let key = match hits.as_slice() {
            [] => return Err(Error::NoSuchImage(name.to_string())),
            [(n, _)] => n.clone(),
            many => {
                let all: Vec<&str> = many.iter().map(|(n, _)| n.as_str()).collect();
                return Err(Error::SelectImage {
                    source_name: format!("image {name:?}"),
                    problem: "matches several names: remove them by name".into(),
                    available: all.join(", "),
                });
            }
        };
        names::update(&self.root, |images| {
            images
                .remove(&key)
                .map(|_| ())
                .ok_or_else(|| Error::NoSuchImage(key.clone()))
        })?;
        Ok(key)
    }

    /// Removes blobs and layer images that no named image uses, and temporary files left by
    /// interrupted loads and conversions. Waits for loads and conversions in progress; keeps
    /// layer images that a running VM holds ([`Store::lease_layer_images`]).
    pub fn prune(&self) -> Result<PruneReport, Error> {
        let _gc = self.gc_lock(Mode::Exclusive)?;
        let mut keep_blobs = HashSet::new();
        let mut keep_layers = HashSet::new();
        for (name, record) in names::read(&self.root)? {
            let d = Digest::parse(&record.manifest)?;
            let manifest = self.read_manifest(&d).map_err(|e| {
                Error::format(
                    format!("image {name}"),
                    format!(
                        "is damaged ({e}): remove it with `microvm rmi {name}`, then prune again"
                    ),
                )
            })?;
            keep_blobs.insert(d.hex().to_string());
            keep_blobs.insert(
                Digest::parse(manifest.config().digest().as_ref())?
                    .hex()
                    .to_string(),
            );
            let mut layers = Vec::new();
            for l in manifest.layers() {
                let l = Digest::parse(l.digest().as_ref())?;
                keep_blobs.insert(l.hex().to_string());
                keep_layers.insert(format!("{}.sqfs", l.hex()));
                layers.push(l);
            }
            // Any run may merge any run of lowest layers, depending on its backend.
            for k in 2..=layers.len() {
                keep_layers.insert(format!(
                    "{MERGED_PREFIX}{}.sqfs",
                    merge_key(&layers[..k]).hex()
                ));
            }
        }
        let mut report = PruneReport::default();
        // Nobody holds the shared store lock now: every temporary file is abandoned.
        for (dir, keep) in [
            (self.blobs_dir(), &keep_blobs),
            (self.layers_dir(), &keep_layers),
        ] {
            for (name, path, len) in list_dir(&dir)? {
                if name.starts_with(TMP_PREFIX) {
                    remove(&path)?;
                    report.temp_files_removed += 1;
                    report.bytes_freed += len;
                } else if !keep.contains(&name) {
                    if dir == self.layers_dir() {
                        let file =
                            File::open(&path).ctx(|| format!("opening {}", path.display()))?;
                        let Some(_held) = lock::try_lock(file, Mode::Exclusive, &path)? else {
                            report.layer_images_in_use += 1;
                            continue;
                        };
                        remove(&path)?;
                        report.layer_images_removed += 1;
                    } else {
                        remove(&path)?;
                        report.blobs_removed += 1;
                    }
                    report.bytes_freed += len;
                }
            }
        }
        for sub in ["locks", "tmp"] {
            for (_, path, _) in list_dir(&self.root.join(sub))? {
                remove(&path)?;
            }
        }
        for (name, path, _) in list_dir(&self.root)? {
            if name.starts_with(TMP_PREFIX) {
                remove(&path)?;
                report.temp_files_removed += 1;
            }
        }
        Ok(report)
    }

    /// The image's layers as read-only squashfs images, bottom layer first, converting those
    /// not converted yet. Concurrent callers share one conversion per layer.
    pub fn layer_images(&self, image: &Image) -> Result<Vec<PathBuf>, Error> {
        let _gc = self.gc_lock(Mode::Shared)?;
        image
            .layers
            .iter()
            .map(|l| self.layer_image(&Digest::parse(l)?))
            .collect()
    }

    /// As [`Store::layer_images`], and holds them (a shared lock on each file) until the lease
    /// is dropped, so that `prune` leaves them alone while a VM runs.
    pub fn lease_layer_images(&self, image: &Image) -> Result<LayerLease, Error> {
        let _gc = self.gc_lock(Mode::Shared)?;
        let mut paths = Vec::new();
        for l in &image.layers {
            paths.push(self.layer_image(&Digest::parse(l)?)?);
        }
        lease(paths)
    }

    /// As [`Store::lease_layer_images`], but hands out at most `max` images (at least 1): when
    /// the image has more layers, its lowest ones are merged into one image (what overlayfs
    /// would show of them stacked), cached and shared by every image with the same base
    /// layers, so that the image fits the disks a VM can attach.
    pub fn lease_layer_images_at_most(
        &self,
        image: &Image,
        max: usize,
    ) -> Result<LayerLease, Error> {
        let n = image.layers.len();
        if n <= max {
            return self.lease_layer_images(image);
        }
        if max == 0 {
            return Err(Error::Unsupported(
                "no disk is left for the image's layers: the VM needs at least one".into(),
            ));
        }
        let _gc = self.gc_lock(Mode::Shared)?;
        let digests = image
            .layers
            .iter()
            .map(|l| Digest::parse(l))
            .collect::<Result<Vec<_>, _>>()?;
        let (base, top) = digests.split_at(n - max + 1);
        let mut paths = vec![self.merged_image(base)?];
        for d in top {
            paths.push(self.layer_image(d)?);
        }
        lease(paths)
    }

    /// Where the merge of layer blobs `layers` (bottom first) lives.
    pub fn merged_image_path(&self, layers: &[Digest]) -> PathBuf {
        self.layers_dir()
            .join(format!("{MERGED_PREFIX}{}.sqfs", merge_key(layers).hex()))
    }

    /// Converts one layer unless done already; the caller holds the shared store lock.
    pub(super) fn layer_image(&self, d: &Digest) -> Result<PathBuf, Error> {
        let blob = self.blob_path(d);
        self.cached_image(
            d.hex(),
            &self.layer_image_path(d),
            &[(blob.clone(), d.clone())],
            format!("converting {}", progress::short(d.as_str())),
            |tmp, bar| layer_convert::convert(&blob, d, tmp, bar),
        )
    }

    /// Merges layers `base` (bottom first) unless done already; the caller holds the shared
    /// store lock.
    fn merged_image(&self, base: &[Digest]) -> Result<PathBuf, Error> {
        let key = format!("{MERGED_PREFIX}{}", merge_key(base).hex());
        let blobs: Vec<(PathBuf, Digest)> = base
            .iter()
            .map(|d| (self.blob_path(d), d.clone()))
            .collect();
        self.cached_image(
            &key,
            &self.merged_image_path(base),
            &blobs,
            format!("merging the {} lowest layers", base.len()),
            |tmp, bar| layer_convert::convert_merged(&blobs, tmp, bar),
        )
    }

    /// Makes the layer image `target` from `blobs` with `convert` unless it exists, under the
    /// lock `key` and through a temporary file, so that concurrent callers share one conversion
    /// and a killed one leaves only a temporary file.
    fn cached_image(
        &self,
        key: &str,
        target: &Path,
        blobs: &[(PathBuf, Digest)],
        label: String,
        convert: impl FnOnce(&Path, &indicatif::ProgressBar) -> Result<Summary, Error>,
    ) -> Result<PathBuf, Error> {
        if target.exists() {
            return Ok(target.to_path_buf());
        }
        let _one = self.conversion_lock(key)?;
        if target.exists() {
            return Ok(target.to_path_buf()); // another process converted it while we waited
        }
        let mut len = 0;
        for (blob, d) in blobs {
            len += fs::metadata(blob)
                .map_err(|_| Error::MissingBlob {
                    container: format!("the image store {}", self.root.display()),
                    what: "layer",
                    digest: d.to_string(),
                })?
                .len();
        }
        let tmp = self.fresh_image_temp(key)?;
        // A merge reads its blobs twice.
        let len = if blobs.len() > 1 { 2 * len } else { len };
        let bar = progress::bar(self.progress && len >= BAR_MIN, len, label);
        let summary = convert(&tmp.path, &bar)?;
        bar.finish_and_clear();
        tracing::debug!(image = %target.display(), ?summary, "layer image made");
        tmp.file()?
            .sync_all()
            .ctx(|| format!("syncing {}", tmp.path.display()))?;
        tmp.persist(target)?;
        sync_dir(&self.layers_dir()).ctx(|| format!("syncing {}", self.layers_dir().display()))?;
        Ok(target.to_path_buf())
    }
}

impl Store {
    /// The lock that makes one process at a time build the layer image `key` (a layer's hex
    /// digest, or a merge's key): a conversion from a stored blob, or a pull's streaming one.
    /// A conversion ends within its time limit, so a holder past it (and a minute's grace) is
    /// stuck and waiting on it is given up.
    pub(super) fn conversion_lock(&self, key: &str) -> Result<FileLock, Error> {
        lock::lock_within(
            &self.root.join("locks").join(format!("{key}.lock")),
            Mode::Exclusive,
            super::layer_convert::time_limit()? + Duration::from_secs(60),
        )
    }

    /// A new temporary file for the layer image `key`, after removing that image's earlier
    /// ones: the caller holds [`Store::conversion_lock`], so those are dead conversions'.
    pub(super) fn fresh_image_temp(&self, key: &str) -> Result<TempFile, Error> {
        let stale = format!("{TMP_PREFIX}{key}-");
        for (name, path, _) in list_dir(&self.layers_dir())? {
            if name.starts_with(&stale) {
                remove(&path)?;
            }
        }
        TempFile::create(self.layers_dir().join(format!("{stale}{}.sqfs", unique())))
    }
}

/// Holds `paths` (a shared lock on each) for a [`LayerLease`].
fn lease(paths: Vec<PathBuf>) -> Result<LayerLease, Error> {
    let mut locks = Vec::new();
    for path in &paths {
        let file = File::open(path).ctx(|| format!("opening {}", path.display()))?;
        let held = lock::try_lock(file, Mode::Shared, path)?.ok_or_else(|| {
            Error::io(
                format!("locking {}", path.display()),
                io::ErrorKind::WouldBlock.into(),
            )
        })?;
        locks.push(held);
    }
    Ok(LayerLease {
        paths,
        _locks: locks,
    })
}

/// The name of the merge of layer blobs `layers` (bottom first): a hash of their digests.
fn merge_key(layers: &[Digest]) -> Digest {
    let list: Vec<&str> = layers.iter().map(Digest::as_str).collect();
    Digest::of(list.join("\n").as_bytes())
}

/// Reads a bare path as a reference: a directory is an OCI layout, a file an archive (docker's
/// when it has a manifest.json).
fn guess_transport(reference: &str) -> Result<TransportRef, Error> {
    let path = Path::new(reference);
    let transport = if path.is_dir() {
        Transport::OciDir
    } else if path.is_file() {
        Transport::OciArchive // refined by the caller once the archive is open
    } else {
        return Err(Error::BadReference(reference.to_string()));
    };
    Ok(TransportRef {
        transport,
        path: path.to_path_buf(),
        selector: None,
    })
}

pub(super) fn parse_manifest(bytes: &[u8], d: &Digest) -> Result<ImageManifest, Error> {
    ImageManifest::from_reader(bytes)
        .map_err(|e| Error::format(format!("manifest {d}"), e.to_string()))
}

pub(super) fn parse_config(bytes: &[u8], d: &Digest) -> Result<ImageConfiguration, Error> {
    ImageConfiguration::from_reader(bytes)
        .map_err(|e| Error::format(format!("image config {d}"), e.to_string()))
}

pub(super) fn check_image(
    m: &ImageManifest,
    config: &ImageConfiguration,
    cfg_digest: &Digest,
) -> Result<(), Error> {
    let cfg_type = m.config().media_type().to_string();
    if !CONFIG_TYPES.contains(&cfg_type.as_str()) {
        return Err(Error::Unsupported(format!(
            "manifest's config has media type {cfg_type}: this is not a container image"
        )));
    }
    for l in m.layers() {
        let t = l.media_type().to_string();
        if !LAYER_TYPES.contains(&t.as_str()) {
            let hint = if t.contains("encrypted") {
                " (encrypted layers are not supported)"
            } else {
                ""
            };
            return Err(Error::Unsupported(format!(
                "layer {} has media type {t}{hint}",
                l.digest()
            )));
        }
    }
    check_platform(config, cfg_digest)?;
    if config.rootfs().diff_ids().len() != m.layers().len() {
        return Err(Error::format(
            format!("image config {cfg_digest}"),
            format!(
                "lists {} layers but the manifest has {}",
                config.rootfs().diff_ids().len(),
                m.layers().len()
            ),
        ));
    }
    Ok(())
}

fn check_platform(config: &ImageConfiguration, d: &Digest) -> Result<(), Error> {
    if *config.os() != Os::Linux || *config.architecture() != Arch::Amd64 {
        return Err(Error::Unsupported(format!(
            "image {} is for {}/{}; microvm runs linux/amd64 images",
            progress::short(d.as_str()),
            config.os(),
            config.architecture()
        )));
    }
    Ok(())
}

/// A temporary file that is removed unless persisted.
pub(super) struct TempFile {
    pub(super) path: PathBuf,
    keep: bool,
}

impl TempFile {
    pub(super) fn create(path: PathBuf) -> Result<TempFile, Error> {
        File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .ctx(|| format!("creating {}", path.display()))?;
        Ok(TempFile { path, keep: false })
    }

    pub(super) fn file(&self) -> Result<File, Error> {
        File::options()
            .write(true)
            .open(&self.path)
            .ctx(|| format!("opening {}", self.path.display()))
    }

    pub(super) fn persist(mut self, to: &Path) -> Result<(), Error> {
        fs::rename(&self.path, to)
            .ctx(|| format!("renaming {} to {}", self.path.display(), to.display()))?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Names, paths and sizes of a directory's entries.
fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf, u64)>, Error> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    for e in rd {
        let e = e.ctx(|| format!("listing {}", dir.display()))?;
        let meta = e.metadata().ctx(|| format!("listing {}", dir.display()))?;
        if meta.is_dir() {
            continue;
        }
        out.push((
            e.file_name().to_string_lossy().into_owned(),
            e.path(),
            meta.len(),
        ));
    }
    Ok(out)
}

fn remove(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(Error::io(format!("removing {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

/// Flushes a directory's entries (after a rename into it) to disk.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A name part unique within this host: pid, a counter and the time.
pub(crate) fn unique() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}-{n}-{t:08x}", std::process::id())
}

pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
