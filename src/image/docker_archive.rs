//! `docker save` / `podman save` archives: docker's own `manifest.json` (Config, RepoTags,
//! Layers) naming members of the tar, in the legacy form (`<id>/layer.tar`, `<hex>.json`) or the
//! newer one with an OCI layout inside (`blobs/sha256/<hex>`).

use serde::Deserialize;

use super::digest::{is_sha256_hex, Digest};
use super::oci_layout::MAX_JSON;
use super::reference::normalize_name;
use super::source::Source;
use super::Error;

/// One image of `manifest.json`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Entry {
    /// The config member.
    pub config: String,
    /// Names given at save time.
    #[serde(default)]
    pub repo_tags: Option<Vec<String>>,
    /// Layer members, bottom first.
    pub layers: Vec<String>,
}

/// Reads `manifest.json` and picks the image `selector` names: one of its RepoTags, or `@N`
/// for the N-th image; without a selector, the only image. With a single image, a selector that
/// matches no RepoTag still picks it (and becomes its name).
pub(crate) fn select(src: &Source, selector: Option<&str>) -> Result<Entry, Error> {
    let bytes = src.read_small("manifest.json", MAX_JSON)?.ok_or_else(|| {
        Error::format(
            src.name(),
            "not a docker archive (no manifest.json); for an OCI layout use oci-archive:",
        )
    })?;
    let entries: Vec<Entry> = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        what: format!("manifest.json of {}", src.name()),
        source,
    })?;
    let available = || {
        let tags: Vec<String> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| match e.repo_tags.as_deref() {
                Some([first, ..]) => first.clone(),
                _ => format!("@{i}"),
            })
            .collect();
        if tags.is_empty() {
            "nothing".to_string()
        } else {
            tags.join(", ")
        }
    };
    let fail = |problem: String| Error::SelectImage {
        source_name: src.name(),
        problem,
        available: available(),
    };
    if let Some(n) = selector.and_then(|s| s.strip_prefix('@')) {
        let i: usize = n
            .parse()
            .map_err(|_| fail(format!("{n:?} is not an image number")))?;
        return entries
            .get(i)
            .cloned()
            .ok_or_else(|| fail(format!("no image number {i}")));
    }
    match selector {
        None if entries.len() == 1 => Ok(entries[0].clone()),
        None if entries.is_empty() => Err(fail("the archive holds no image".into())),
        None => Err(fail(
            "several images: name one as docker-archive:FILE:NAME:TAG or docker-archive:FILE:@N"
                .into(),
        )),
        Some(sel) => {
            let want = normalize_name(sel)?;
            let hit = entries.iter().find(|e| {
                e.repo_tags
                    .iter()
                    .flatten()
                    .any(|t| normalize_name(t).is_ok_and(|t| t == want))
            });
            match hit {
                Some(e) => Ok(e.clone()),
                None if entries.len() == 1 => Ok(entries[0].clone()),
                None => Err(fail(format!("no image named {sel:?}"))),
            }
        }
    }
}

/// The digest a member's name promises: `blobs/sha256/<hex>` or a legacy `<hex>.json` config.
pub(crate) fn digest_in_name(member: &str) -> Option<Digest> {
    let clean = member.trim_start_matches("./");
    let hex = clean
        .strip_prefix("blobs/sha256/")
        .or_else(|| clean.strip_suffix(".json"))?;
    if is_sha256_hex(hex) {
        Digest::parse(&format!("sha256:{hex}")).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_promise_digests() {
        let hex = "0".repeat(64);
        assert!(digest_in_name(&format!("blobs/sha256/{hex}")).is_some());
        assert!(digest_in_name(&format!("{hex}.json")).is_some());
        assert!(digest_in_name(&format!("{hex}/layer.tar")).is_none());
        assert!(digest_in_name("blobs/sha256/../../x").is_none());
    }
}
