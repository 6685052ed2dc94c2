//! `pull`: the manifest (an index resolved to its linux/amd64 image), the config, then the
//! layers, several at a time, each stored and converted as it downloads.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressDrawTarget};
use oci_spec::image::ImageIndex;
use ureq::http::Method;

use super::blob::BlobReader;
use super::client::{header, read_limited, Client, Options, Payload};
use super::reference::Reference;
use super::Error;
use crate::image::{self, BlobRef, Digest, Image, Store, INDEX_TYPES, MANIFEST_TYPES};

/// Layers downloaded at once (docker's default `max-concurrent-downloads`).
const PARALLEL: usize = 3;

/// What a manifest request accepts, most wanted first; schema 1 is not among them.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Pulls `reference` (docker's grammar, or `docker://...`) into `store` and names it; with
/// `progress`, draws a bar per layer on standard error. Nothing is named unless every blob
/// arrived whole and verified.
pub fn pull(
    store: &Store,
    reference: &str,
    opts: &Options,
    progress: bool,
) -> Result<Image, Error> {
    let r = Reference::parse(reference)?;
    let name = r.stored_name()?;
    let client = Client::for_reference(&r, false, opts)?;
    let _hold = store.hold()?;
    let (manifest, digest) = image_manifest(&client, &r)?;
    let (config_ref, layers) = store.check_fetched(&manifest, &digest)?;
    let config = small_blob(&client, &r, &config_ref, "config")?;
    // Checked before any layer is fetched: a wrong platform or layer type costs no download.
    store.check_fetched_config(&manifest, &digest, &config)?;
    fetch_layers(store, &client, &r, &layers, progress)?;
    store.put_fetched(&manifest, &digest, &config)?;
    Ok(store.name_image(&name, &digest)?)
}

/// The image manifest `r` names, through an index when it names one: its verified bytes and
/// digest.
fn image_manifest(client: &Client, r: &Reference) -> Result<(Vec<u8>, Digest), Error> {
    let (bytes, media_type, digest) = manifest(client, r, &r.manifest_ref(), r.digest.as_ref())?;
    if !INDEX_TYPES.contains(&media_type.as_str()) {
        return Ok((bytes, digest));
    }
    let index = ImageIndex::from_reader(bytes.as_slice()).map_err(|e| Error::Protocol {
        registry: client.registry().to_string(),
        what: format!("index {digest}"),
        reason: e.to_string(),
    })?;
    let entries: Vec<_> = index.manifests().iter().collect();
    let chosen = image::choose_platform(&r.to_string(), &entries)?;
    let chosen_digest = Digest::parse(chosen.digest().as_ref())?;
    let (bytes, media_type, digest) =
        manifest(client, r, chosen_digest.as_str(), Some(&chosen_digest))?;
    if INDEX_TYPES.contains(&media_type.as_str()) {
        return Err(Error::Unsupported(format!(
            "{r}: an index inside an index is not supported"
        )));
    }
    Ok((bytes, digest))
}

/// One manifest or index by tag or digest: bytes, media type and digest, checked against
/// `expected` and the registry's own `Docker-Content-Digest`.
fn manifest(
    client: &Client,
    r: &Reference,
    reference: &str,
    expected: Option<&Digest>,
) -> Result<(Vec<u8>, String, Digest), Error> {
    let what = format!("manifest {}:{reference}", r.repository);
    let path = format!("/v2/{}/manifests/{reference}", r.repository);
    let resp = client.request(
        &Method::GET,
        &path,
        &[("accept", ACCEPT.to_string())],
        Payload::Empty,
    )?;
    if resp.status().as_u16() != 200 {
        return Err(client.status_error(resp, &what));
    }
    let content_type = header(&resp, "content-type").unwrap_or_default();
    let said = header(&resp, "docker-content-digest");
    let bytes = read_limited(client, resp, image::MAX_DOCUMENT, &what)?;
    let digest = Digest::of(&bytes);
    for claimed in expected.map(Digest::to_string).into_iter().chain(said) {
        if claimed.trim() != digest.as_str() {
            return Err(Error::Image(image::Error::DigestMismatch {
                digest: claimed.trim().to_string(),
                actual: digest.to_string(),
            }));
        }
    }
    let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| Error::Protocol {
        registry: client.registry().to_string(),
        what: what.clone(),
        reason: format!("not JSON: {e}"),
    })?;
    let media_type = json
        .get("mediaType")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| {
            content_type
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        });
    let schema1 = json.get("schemaVersion").and_then(|v| v.as_u64()) == Some(1)
        || media_type.starts_with("application/vnd.docker.distribution.manifest.v1");
    if schema1 {
        return Err(Error::Unsupported(format!(
            "{r} is a Docker schema 1 image, which microvm (like current docker) does not pull: push it again with a current tool"
        )));
    }
    let media_type = if INDEX_TYPES.contains(&media_type.as_str())
        || MANIFEST_TYPES.contains(&media_type.as_str())
    {
        media_type
    } else if json.get("manifests").is_some() {
        INDEX_TYPES[0].to_string()
    } else if json.get("layers").is_some() && media_type.is_empty() {
        MANIFEST_TYPES[0].to_string()
    } else {
        return Err(Error::Unsupported(format!(
            "{what} has media type {media_type:?}: this is not a container image"
        )));
    };
    Ok((bytes, media_type, digest))
}

/// A small blob (the config) read whole and verified.
fn small_blob(
    client: &Client,
    r: &Reference,
    blob: &BlobRef,
    what: &str,
) -> Result<Vec<u8>, Error> {
    if blob.size > image::MAX_DOCUMENT {
        return Err(Error::Protocol {
            registry: client.registry().to_string(),
            what: format!("{what} {}", blob.digest),
            reason: format!("{} bytes is too large for a {what}", blob.size),
        });
    }
    let never = AtomicBool::new(false);
    let mut reader = BlobReader::new(client, &r.repository, blob, &never);
    let mut bytes = Vec::new();
    if let Err(e) = std::io::Read::read_to_end(&mut reader, &mut bytes) {
        return Err(reader.take_error().unwrap_or_else(|| Error::Unreachable {
            registry: client.registry().to_string(),
            reason: format!("reading {what} {}: {e}", blob.digest),
            hint: "",
        }));
    }
    image::verify_bytes(&bytes, &blob.digest, Some(blob.size))?;
    Ok(bytes)
}

/// Downloads and converts the layers not stored yet, [`PARALLEL`] at a time; the first
/// failure stops the others.
fn fetch_layers(
    store: &Store,
    client: &Client,
    r: &Reference,
    layers: &[BlobRef],
    progress: bool,
) -> Result<(), Error> {
    let mut todo: Vec<&BlobRef> = Vec::new();
    for l in layers {
        if !store.has_layer(l) && !todo.iter().any(|t| t.digest == l.digest) {
            todo.push(l);
        }
    }
    let multi = MultiProgress::with_draw_target(if progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let next = AtomicUsize::new(0);
    let cancel = AtomicBool::new(false);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..PARALLEL.min(todo.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= todo.len() || cancel.load(Ordering::Relaxed) {
                    break;
                }
                let layer = todo[i];
                let label = format!("pulling {}", image::short_digest(layer.digest.as_str()));
                let bar = multi.add(image::progress_bar(progress, layer.size, label));
                let mut reader = BlobReader::new(client, &r.repository, layer, &cancel);
                let result = store.put_layer(&mut reader, layer, &bar);
                bar.finish_and_clear();
                // The registry's own answer, if that is what stopped it, said as itself.
                let result = match (result, reader.take_error()) {
                    (Err(_), Some(registry_error)) => Err(registry_error),
                    (r, _) => r.map_err(Error::Image),
                };
                if reader.resumes() > 0 {
                    tracing::info!(layer = %layer.digest, resumes = reader.resumes(), "download resumed");
                }
                if let Err(e) = result {
                    let mut first = failure.lock().unwrap_or_else(|p| p.into_inner());
                    if first.is_none() {
                        *first = Some(e);
                    }
                    cancel.store(true, Ordering::Relaxed);
                    break;
                }
            });
        }
    });
    match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
