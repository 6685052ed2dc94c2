//! Image references: skopeo's transport syntax (`oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`,
//! `docker-archive:FILE[:NAME:TAG]`) and docker-style image names (`busybox` is `busybox:latest`).

use std::path::{Path, PathBuf};

use super::Error;

/// Where an image is loaded from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// An OCI image layout directory.
    OciDir,
    /// A tar of an OCI image layout.
    OciArchive,
    /// What `docker save` / `podman save` write.
    DockerArchive,
}

impl Transport {
    /// The prefix skopeo uses for it.
    pub fn prefix(self) -> &'static str {
        match self {
            Transport::OciDir => "oci",
            Transport::OciArchive => "oci-archive",
            Transport::DockerArchive => "docker-archive",
        }
    }
}

/// A parsed transport reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportRef {
    /// Which transport.
    pub transport: Transport,
    /// The directory or archive file.
    pub path: PathBuf,
    /// The tag (OCI: a `org.opencontainers.image.ref.name`) or name (docker-archive: one of its
    /// RepoTags, or `@N` for the N-th image), if given.
    pub selector: Option<String>,
}

/// Parses `TRANSPORT:PATH[:SELECTOR]`; `None` when `s` names no known transport. As skopeo does,
/// the path ends at its first colon.
pub fn parse_transport(s: &str) -> Option<Result<TransportRef, Error>> {
    let (prefix, rest) = s.split_once(':')?;
    let transport = match prefix {
        "oci" => Transport::OciDir,
        "oci-archive" => Transport::OciArchive,
        "docker-archive" => Transport::DockerArchive,
        _ => return None,
    };
    let (path, selector) = match rest.split_once(':') {
        Some((p, sel)) => (p, Some(sel)),
        None => (rest, None),
    };
    if path.is_empty() || selector == Some("") {
        return Some(Err(Error::BadReference(s.to_string())));
    }
    Some(Ok(TransportRef {
        transport,
        path: PathBuf::from(path),
        selector: selector.map(str::to_string),
    }))
}

/// Normalises a docker-style name: adds `:latest` when no tag is given and drops docker.io's
/// implicit prefixes, so `docker.io/library/busybox` is `busybox:latest`; `REPO@sha256:...`
/// stays pinned to its digest.
pub fn normalize_name(s: &str) -> Result<String, Error> {
    let bad = || Error::BadName(s.chars().take(200).collect());
    if let Some((name, digest)) = s.split_once('@') {
        // `REPO@sha256:...`: an image pulled by digest alone; a tag beside the digest is
        // dropped, as docker does.
        let digest = super::Digest::parse(digest).map_err(|_| bad())?;
        let (repo, _) = split_name(name);
        let repo = normalize_name(repo)?;
        let repo = repo.strip_suffix(":latest").unwrap_or(&repo);
        return Ok(format!("{repo}@{digest}"));
    }
    if s.is_empty() || s.len() > 255 {
        return Err(bad());
    }
    let (repo, tag) = split_name(s);
    let tag = tag.unwrap_or("latest");
    let mut repo = repo;
    for prefix in [
        "docker.io/library/",
        "index.docker.io/library/",
        "docker.io/",
        "index.docker.io/",
    ] {
        if let Some(r) = repo.strip_prefix(prefix) {
            repo = r;
            break;
        }
    }
    if !valid_repository(repo) || !valid_tag(tag) {
        return Err(bad());
    }
    Ok(format!("{repo}:{tag}"))
}

/// Splits `repo[:tag]` (`repo@digest` has no tag); a colon before the last `/` belongs to a registry host's port.
pub fn split_name(s: &str) -> (&str, Option<&str>) {
    if let Some((repo, _digest)) = s.split_once('@') {
        return (repo, None);
    }
    match s.rfind(':') {
        Some(i) if !s[i..].contains('/') => (&s[..i], Some(&s[i + 1..])),
        _ => (s, None),
    }
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_repository(r: &str) -> bool {
    let parts: Vec<&str> = r.split('/').collect();
    parts.iter().enumerate().all(|(i, p)| {
        let host =
            i == 0 && parts.len() > 1 && (p.contains('.') || p.contains(':') || *p == "localhost");
        if host {
            !p.is_empty()
                && p.bytes().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':' | b'[' | b']')
                })
        } else {
            let b = p.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
        }
    })
}

/// A repository name made from a directory's or archive's file name: `/x/Demo.tar` is `demo`.
pub fn repository_from_path(path: &Path) -> String {
    let mut name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    for ext in [".oci.tar", ".tar.gz", ".tar.zst", ".tgz", ".tar", ".oci"] {
        if let Some(n) = name.strip_suffix(ext) {
            name = n.to_string();
            break;
        }
    }
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = cleaned.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if trimmed.is_empty() {
        "image".to_string()
    } else {
        trimmed.to_string()
    }
}

/// The stored name for an image loaded from `path`: `selector` when it is a full name
/// (`busybox:1.36`), `<path's name>:<selector>` when it is a bare tag, else `fallback` (the
/// archive's RepoTag or the layout's ref name, treated the same way), else `<path's name>:latest`.
pub fn stored_name(
    path: &Path,
    selector: Option<&str>,
    fallback: Option<&str>,
) -> Result<String, Error> {
    match selector.or(fallback) {
        Some(s) if s.contains(':') || s.contains('/') => normalize_name(s),
        Some(tag) => normalize_name(&format!("{}:{tag}", repository_from_path(path))),
        None => normalize_name(&repository_from_path(path)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_split_at_the_first_colon_like_skopeo() {
        let r = parse_transport("oci:/tmp/demo:latest").unwrap().unwrap();
        assert_eq!(
            (r.transport, r.path.as_path(), r.selector.as_deref()),
            (Transport::OciDir, Path::new("/tmp/demo"), Some("latest"))
        );
        let r = parse_transport("docker-archive:x.tar:busybox:1.36")
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.transport, r.selector.as_deref()),
            (Transport::DockerArchive, Some("busybox:1.36"))
        );
        let r = parse_transport("oci-archive:a.tar").unwrap().unwrap();
        assert_eq!((r.transport, r.selector), (Transport::OciArchive, None));
        assert!(parse_transport("busybox:latest").is_none());
        assert!(parse_transport("busybox").is_none());
        assert!(parse_transport("oci:").unwrap().is_err());
        assert!(parse_transport("oci:dir:").unwrap().is_err());
    }

    #[test]
    fn names_normalise_like_docker() {
        assert_eq!(normalize_name("busybox").unwrap(), "busybox:latest");
        assert_eq!(normalize_name("busybox:1.36").unwrap(), "busybox:1.36");
        assert_eq!(
            normalize_name("docker.io/library/alpine:3").unwrap(),
            "alpine:3"
        );
        assert_eq!(
            normalize_name("localhost:5000/a/b").unwrap(),
            "localhost:5000/a/b:latest"
        );
        assert_eq!(
            normalize_name("quay.io/x/y:v1.0").unwrap(),
            "quay.io/x/y:v1.0"
        );
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            normalize_name(&format!("docker.io/library/busybox:1@{d}")).unwrap(),
            format!("busybox@{d}")
        );
        assert_eq!(split_name(&format!("busybox@{d}")), ("busybox", None));
        for bad in [
            "",
            "Busybox",
            "a:b:c",
            "a@sha256:00",
            "a/../b",
            "-a",
            "a:-x",
            "a b",
        ] {
            assert!(normalize_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stored_names_follow_tag_then_fallback_then_path() {
        let p = Path::new("/x/My Image.tar");
        assert_eq!(repository_from_path(p), "my-image");
        assert_eq!(
            stored_name(p, Some("v2"), Some("other:1")).unwrap(),
            "my-image:v2"
        );
        assert_eq!(
            stored_name(p, Some("busybox:1"), None).unwrap(),
            "busybox:1"
        );
        assert_eq!(
            stored_name(p, None, Some("docker.io/library/demo:3")).unwrap(),
            "demo:3"
        );
        assert_eq!(stored_name(p, None, Some("edge")).unwrap(), "my-image:edge");
        assert_eq!(stored_name(p, None, None).unwrap(), "my-image:latest");
        assert_eq!(
            stored_name(Path::new("/"), None, None).unwrap(),
            "image:latest"
        );
    }
}
