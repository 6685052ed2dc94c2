//! Registry references in docker's grammar: `[HOST[:PORT]/]PATH[:TAG][@DIGEST]`, with
//! `docker.io` and `library/` implied as docker does (`busybox` is
//! `docker.io/library/busybox:latest`), and skopeo's `docker://` transport prefix.

use std::fmt;

use super::Error;
use crate::image::reference::normalize_name;
use crate::image::Digest;

/// The registry an unqualified name lives on.
pub const DOCKER_HUB: &str = "docker.io";
/// Other names of Docker Hub.
const HUB_ALIASES: &[&str] = &["index.docker.io", "registry-1.docker.io"];
/// The host docker.io's API is served from.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed image reference on a registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// The registry as named (`docker.io`, `localhost:5000`, `[::1]:5000`); also the key its
    /// credentials are stored under.
    pub registry: String,
    /// The repository path on it (`library/busybox`).
    pub repository: String,
    /// The tag, when there is one (`latest` when neither tag nor digest is given).
    pub tag: Option<String>,
    /// The manifest digest, when pinned.
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parses `s`, with or without the `docker://` prefix.
    pub fn parse(s: &str) -> Result<Reference, Error> {
        let bad = |why: &str| Error::BadReference {
            reference: s.chars().take(200).collect(),
            why: why.to_string(),
        };
        let rest = s.strip_prefix("docker://").unwrap_or(s);
        if rest.is_empty() || rest.len() > 512 {
            return Err(bad("it is empty or longer than 512 characters"));
        }
        let (name, digest) = match rest.split_once('@') {
            Some((n, d)) => (
                n,
                Some(
                    Digest::parse(d)
                        .map_err(|_| bad("the digest must be sha256:<64 hex digits>"))?,
                ),
            ),
            None => (rest, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), path)
            }
            _ => (DOCKER_HUB.to_string(), name),
        };
        if !valid_registry(&registry) {
            return Err(bad("the registry must be HOST or HOST:PORT, in lower case"));
        }
        // Docker Hub under its other names is Docker Hub: same credentials, library/ implied.
        let registry = if HUB_ALIASES.contains(&registry.as_str()) {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        let (path, tag) = match path.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p, Some(t.to_string())),
            _ => (path, None),
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        // The store's name rules are docker's: reuse them to check the repository and tag.
        let probe = format!(
            "{registry}/{repository}:{}",
            tag.as_deref().unwrap_or("latest")
        );
        normalize_name(&probe).map_err(|_| {
            bad("use lower-case letters, digits and . _ - in the repository; a tag of at most 128 of [A-Za-z0-9_.-]")
        })?;
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host (and port) the registry's API answers on.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What goes after `/manifests/` in a URL: the digest when pinned, else the tag.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The name the pulled image gets in the store: `busybox:latest`,
    /// `localhost:5000/demo:1`, or `REPO@sha256:...` when pulled by digest alone.
    pub fn stored_name(&self) -> Result<String, Error> {
        let repo = format!("{}/{}", self.registry, self.repository);
        // A digest pins the content: the name says so, and a tag beside it is dropped, as
        // docker does (a local `busybox:1.36` is not retagged to what the digest names).
        let name = match (&self.tag, &self.digest) {
            (_, Some(d)) => normalize_name(&format!("{repo}@{d}")),
            (Some(tag), None) => normalize_name(&format!("{repo}:{tag}")),
            (None, None) => normalize_name(&repo),
        };
        name.map_err(|e| Error::BadReference {
            reference: self.to_string(),
            why: e.to_string(),
        })
    }

    /// Whether docker treats this registry as insecure without being told: plain HTTP (or
    /// TLS without verification) is allowed to the loopback host.
    pub fn loopback(&self) -> bool {
        is_loopback(&self.registry)
    }

    /// The scope a bearer token is asked for (`repository:NAME:pull` or `...:pull,push`).
    pub fn scope(&self, push: bool) -> String {
        let actions = if push { "pull,push" } else { "pull" };
        format!("repository:{}:{actions}", self.repository)
    }
}

/// Whether `registry` (`HOST[:PORT]`) is one docker reaches without TLS verification unless
/// told otherwise: localhost, 127.0.0.1 or ::1.
pub fn is_loopback(registry: &str) -> bool {
    matches!(host_of(registry), "localhost" | "127.0.0.1" | "[::1]")
}

/// A registry as `login` and `logout` take it (`https://index.docker.io/v1/`, `docker.io`,
/// `localhost:5000/`) in the spelling credentials are stored under, and the host its API is on.
pub fn registry_host(s: &str) -> Result<(String, String), Error> {
    let bare = s
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let bare = bare.strip_suffix("/v1").unwrap_or(bare);
    let bare = bare.strip_suffix("/v2").unwrap_or(bare);
    let ok = !bare.is_empty()
        && bare.len() <= 255
        && !bare.contains('/')
        && bare
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':' | b'[' | b']'));
    if !ok {
        return Err(Error::BadReference {
            reference: s.chars().take(200).collect(),
            why: "name a registry as HOST[:PORT], e.g. localhost:5000 or docker.io".into(),
        });
    }
    let registry = bare.to_ascii_lowercase();
    if !valid_registry(&registry) {
        return Err(Error::BadReference {
            reference: s.chars().take(200).collect(),
            why: "name a registry as HOST[:PORT], e.g. localhost:5000 or docker.io".into(),
        });
    }
    if registry == DOCKER_HUB || HUB_ALIASES.contains(&registry.as_str()) {
        return Ok((DOCKER_HUB.to_string(), DOCKER_HUB_API.to_string()));
    }
    Ok((registry.clone(), registry))
}

/// `HOST` or `HOST:PORT`: a lower-case DNS name or IPv4 address, or an IPv6 address in
/// brackets; a port of 1 to 65535.
fn valid_registry(s: &str) -> bool {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return false;
        };
        if inside.is_empty()
            || !inside
                .bytes()
                .all(|c| c.is_ascii_hexdigit() || c == b':' || c == b'.')
        {
            return false;
        }
        match after {
            "" => (inside, None),
            p => match p.strip_prefix(':') {
                Some(p) => (inside, Some(p)),
                None => return false,
            },
        }
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let host_ok = s.starts_with('[')
        || (!host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            }));
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|c| c.is_ascii_digit())
            && p.parse::<u32>().is_ok_and(|n| (1..=65535).contains(&n))
    });
    host_ok && port_ok
}

/// `host:port` -> `host` (`[::1]:5000` -> `[::1]`).
pub fn host_of(registry: &str) -> &str {
    if registry.starts_with('[') {
        return registry.find(']').map_or(registry, |i| &registry[..=i]);
    }
    registry.split(':').next().unwrap_or(registry)
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn names_expand_like_docker() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/busybox");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.stored_name().unwrap(), "busybox:latest");
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");

        let r = Reference::parse("docker://docker.io/library/alpine:3.19").unwrap();
        assert_eq!(r.repository, "library/alpine");
        assert_eq!(r.stored_name().unwrap(), "alpine:3.19");

        let r = Reference::parse("user/app:v1").unwrap();
        assert_eq!(r.repository, "user/app");
        assert_eq!(r.stored_name().unwrap(), "user/app:v1");

        let r = Reference::parse("localhost:5000/team/demo").unwrap();
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repository, "team/demo");
        assert!(r.loopback());
        assert_eq!(r.stored_name().unwrap(), "localhost:5000/team/demo:latest");
        assert_eq!(r.scope(true), "repository:team/demo:pull,push");

        let r = Reference::parse("quay.io/x/y").unwrap();
        assert!(!r.loopback());
        let r = Reference::parse("index.docker.io/busybox").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "library/busybox")
        );
        assert_eq!(r.stored_name().unwrap(), "busybox:latest");
        let r = Reference::parse("[::1]:5000/y:t").unwrap();
        assert_eq!(r.registry, "[::1]:5000");
        assert!(r.loopback());
    }

    #[test]
    fn digests_pin_and_name_the_image() {
        let r = Reference::parse(&format!("127.0.0.1:5000/demo@{D}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.manifest_ref(), D);
        assert_eq!(r.stored_name().unwrap(), format!("127.0.0.1:5000/demo@{D}"));
        let r = Reference::parse(&format!("busybox:1.36@{D}")).unwrap();
        assert_eq!(r.manifest_ref(), D);
        assert_eq!(r.stored_name().unwrap(), format!("busybox@{D}"));
        let r = Reference::parse(&format!("busybox@{D}")).unwrap();
        assert_eq!(r.stored_name().unwrap(), format!("busybox@{D}"));
    }

    #[test]
    fn registries_for_login_take_docker_spellings() {
        let hub = ("docker.io".to_string(), "registry-1.docker.io".to_string());
        assert_eq!(registry_host("https://index.docker.io/v1/").unwrap(), hub);
        assert_eq!(registry_host("docker.io").unwrap(), hub);
        let local = ("localhost:5000".to_string(), "localhost:5000".to_string());
        assert_eq!(registry_host("http://LocalHost:5000/").unwrap(), local);
        assert!(registry_host("a/b").is_err());
        assert!(registry_host("").is_err());
        assert!(registry_host("x y").is_err());
    }

    #[test]
    fn bad_references_are_refused() {
        for bad in [
            "",
            "docker://",
            "Busybox",
            "busybox:",
            "busybox@sha256:12",
            "busybox@md5:0123",
            "a//b",
            "LOCALHOST:5000/x",
            "busybox:bad tag",
            "/abs",
            "[::1]evil.com:5000/x",
            "a..b:5000/x",
            "host:99999/x",
            "host:1:2/x",
            "-bad.io/x",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
