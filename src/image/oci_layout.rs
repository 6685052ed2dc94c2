//! OCI image layouts (a directory, or the same in a tar): picking the image a reference means
//! from `index.json` by its `org.opencontainers.image.ref.name`, then the linux/amd64 manifest
//! through any nesting of image indexes.

use oci_spec::image::{Arch, Descriptor, ImageIndex, Os};

use super::digest::{verify_bytes, Digest};
use super::source::Source;
use super::Error;

/// The annotation naming an image in a layout.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// containerd's (and docker's) annotation holding the full image name.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// Largest JSON document (index, manifest, config) read into memory.
pub(crate) const MAX_JSON: u64 = 8 << 20;
/// Deepest nesting of indexes followed.
const MAX_DEPTH: usize = 4;

/// Media types of image manifests.
pub(crate) const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
/// Media types of image indexes.
pub(crate) const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// The manifest chosen in a layout.
pub(crate) struct Selected {
    /// Its digest.
    pub digest: Digest,
    /// Its verified bytes.
    pub bytes: Vec<u8>,
    /// The ref name (or containerd image name) of the top-level entry chosen, if any.
    pub ref_name: Option<String>,
}

/// The path of a blob inside a layout.
pub(crate) fn blob_path(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// Reads and verifies a small blob of a layout.
pub(crate) fn read_blob(
    src: &Source,
    d: &Digest,
    size: Option<u64>,
    what: &'static str,
) -> Result<Vec<u8>, Error> {
    let bytes = src
        .read_small(&blob_path(d), MAX_JSON)?
        .ok_or_else(|| Error::MissingBlob {
            container: src.name(),
            what,
            digest: d.to_string(),
        })?;
    verify_bytes(&bytes, d, size)?;
    Ok(bytes)
}

/// Picks the manifest `tag` names (or the only image, or `latest`) for linux/amd64.
pub(crate) fn select(src: &Source, tag: Option<&str>) -> Result<Selected, Error> {
    if src.read_small("oci-layout", 4096)?.is_none() {
        return Err(Error::format(
            src.name(),
            "not an OCI image layout (no oci-layout file); for `docker save` output use docker-archive:",
        ));
    }
    let index_bytes = src
        .read_small("index.json", MAX_JSON)?
        .ok_or_else(|| Error::format(src.name(), "OCI layout without index.json"))?;
    let index = ImageIndex::from_reader(&index_bytes[..])
        .map_err(|e| Error::format(format!("index.json of {}", src.name()), e.to_string()))?;
    let entries = index.manifests();
    let names = |d: &Descriptor| -> Vec<String> {
        let a = d.annotations().as_ref();
        [REF_NAME, CONTAINERD_NAME]
            .iter()
            .filter_map(|k| a.and_then(|a| a.get(*k)).cloned())
            .collect()
    };
    let available = || {
        let mut v: Vec<String> = entries
            .iter()
            .flat_map(|d| names(d).into_iter().take(1))
            .collect();
        v.dedup();
        if v.is_empty() {
            "no tagged images".to_string()
        } else {
            v.join(", ")
        }
    };
    let candidates: Vec<&Descriptor> = match tag {
        Some(t) => entries
            .iter()
            .filter(|d| names(d).iter().any(|n| n == t))
            .collect(),
        None => {
            let distinct: std::collections::BTreeSet<Vec<String>> =
                entries.iter().map(names).collect();
            if distinct.len() <= 1 {
                entries.iter().collect()
            } else {
                entries
                    .iter()
                    .filter(|d| names(d).first().map(String::as_str) == Some("latest"))
                    .collect()
            }
        }
    };
    if candidates.is_empty() {
        let problem = match tag {
            Some(t) => format!("no image tagged {t:?}"),
            None if entries.is_empty() => "the layout holds no image".to_string(),
            None => "several images and none tagged latest: name one as oci:DIR:TAG".to_string(),
        };
        return Err(Error::SelectImage {
            source_name: src.name(),
            problem,
            available: available(),
        });
    }
    // A full name (containerd's annotation, or a ref name like `busybox:1.36`) beats a bare tag.
    let found = names(candidates[0]);
    let ref_name = found
        .iter()
        .find(|n| n.contains(':') || n.contains('/'))
        .or(found.first())
        .cloned();
    let chosen = choose_platform(&src.name(), &candidates)?;
    let (digest, bytes) = resolve(src, chosen, 0)?;
    Ok(Selected {
        digest,
        bytes,
        ref_name,
    })
}

/// Follows a descriptor through image indexes to a manifest, verifying each document.
fn resolve(src: &Source, d: &Descriptor, depth: usize) -> Result<(Digest, Vec<u8>), Error> {
    let digest = Digest::parse(d.digest().as_ref())?;
    let media = d.media_type().to_string();
    let bytes = read_blob(src, &digest, Some(d.size()), "manifest")?;
    let is_index = if INDEX_TYPES.contains(&media.as_str()) {
        true
    } else if MANIFEST_TYPES.contains(&media.as_str()) {
        false
    } else {
        // Sniff documents whose descriptor names an unexpected type.
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|source| Error::Json {
                what: format!("document {digest} in {}", src.name()),
                source,
            })?;
        match (v.get("manifests").is_some(), v.get("layers").is_some()) {
            (true, _) => true,
            (false, true) => false,
            _ => {
                return Err(Error::Unsupported(format!(
                    "{digest} in {} has media type {media}, which is neither an image manifest nor an index",
                    src.name()
                )))
            }
        }
    };
    if !is_index {
        return Ok((digest, bytes));
    }
    if depth >= MAX_DEPTH {
        return Err(Error::format(src.name(), "image indexes nested too deeply"));
    }
    let index = ImageIndex::from_reader(&bytes[..]).map_err(|e| {
        Error::format(
            format!("image index {digest} in {}", src.name()),
            e.to_string(),
        )
    })?;
    let entries: Vec<&Descriptor> = index.manifests().iter().collect();
    let chosen = choose_platform(&src.name(), &entries)?;
    resolve(src, chosen, depth + 1)
}

/// The linux/amd64 entry; an entry without a platform is taken when it is the only one (or all
/// others are attestations, `unknown/unknown`).
pub(crate) fn choose_platform<'a>(
    source_name: &str,
    entries: &[&'a Descriptor],
) -> Result<&'a Descriptor, Error> {
    if let Some(d) = entries.iter().find(|d| {
        d.platform()
            .as_ref()
            .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
    }) {
        return Ok(d);
    }
    let unplatformed: Vec<&&Descriptor> =
        entries.iter().filter(|d| d.platform().is_none()).collect();
    if unplatformed.len() == 1 {
        return Ok(unplatformed[0]);
    }
    let available: Vec<String> = entries
        .iter()
        .map(|d| match d.platform() {
            Some(p) => format!("{}/{}", p.os(), p.architecture()),
            None => "unspecified".to_string(),
        })
        .collect();
    Err(Error::NoPlatform {
        source_name: source_name.to_string(),
        available: if available.is_empty() {
            "nothing".into()
        } else {
            available.join(", ")
        },
    })
}
