//! Registry credentials, kept in the files podman and docker keep them in (never printed, never
//! passed on a command line), and the `WWW-Authenticate` challenges registries answer with.
//!
//! Read, first match wins: `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`
//! (podman; `/run/containers/UID/auth.json` without XDG_RUNTIME_DIR),
//! `$XDG_CONFIG_HOME/containers/auth.json` (default `~/.config`), then
//! `$DOCKER_CONFIG/config.json` (default `~/.docker/config.json`). `login` writes the first of
//! `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`, `~/.docker/config.json`.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::{Map, Value};

use super::reference::DOCKER_HUB;
use super::Error;

/// Largest credentials file read.
const MAX_AUTH_FILE: u64 = 4 << 20;

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or access token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the password, not even in a debug log.
        write!(f, "Credentials({:?}, <redacted>)", self.username)
    }
}

impl Credentials {
    /// The value of an `Authorization: Basic` header.
    pub fn basic(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    fn from_entry(entry: &Value) -> Option<Credentials> {
        let auth = entry.get("auth").and_then(Value::as_str)?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (username, password) = raw.split_once(':')?;
        (!username.is_empty()).then(|| Credentials {
            username: username.to_string(),
            password: password.to_string(),
        })
    }
}

fn env_path(key: &str) -> Option<PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn home() -> Option<PathBuf> {
    env_path("HOME")
}

/// The files credentials are read from, in order.
pub fn read_paths() -> Vec<PathBuf> {
    let mut out = Vec::new();
    out.extend(env_path("REGISTRY_AUTH_FILE"));
    match env_path("XDG_RUNTIME_DIR") {
        Some(d) => out.push(d.join("containers/auth.json")),
        None => out.push(PathBuf::from(format!(
            "/run/containers/{}/auth.json",
            nix::unistd::getuid()
        ))),
    }
    match env_path("XDG_CONFIG_HOME") {
        Some(d) => out.push(d.join("containers/auth.json")),
        None => out.extend(home().map(|h| h.join(".config/containers/auth.json"))),
    }
    match env_path("DOCKER_CONFIG") {
        Some(d) => out.push(d.join("config.json")),
        None => out.extend(home().map(|h| h.join(".docker/config.json"))),
    }
    out
}

/// The file `login` writes.
pub fn write_path() -> Result<PathBuf, Error> {
    env_path("REGISTRY_AUTH_FILE")
        .or_else(|| env_path("XDG_RUNTIME_DIR").map(|d| d.join("containers/auth.json")))
        .or_else(|| home().map(|h| h.join(".docker/config.json")))
        .ok_or_else(|| {
            Error::Credentials(
                "no place to keep credentials: set REGISTRY_AUTH_FILE or HOME".into(),
            )
        })
}

/// The keys a registry's credentials may be stored under, most specific first:
/// `REGISTRY/REPO/PATH` prefixes (podman's per-namespace entries), the registry, and the
/// spellings docker uses for it.
fn keys(registry: &str, repository: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(repo) = repository {
        let parts: Vec<&str> = repo.split('/').collect();
        for n in (1..=parts.len()).rev() {
            out.push(format!("{registry}/{}", parts[..n].join("/")));
        }
    }
    out.push(registry.to_string());
    out.push(format!("https://{registry}"));
    out.push(format!("http://{registry}"));
    if registry == DOCKER_HUB {
        for alias in [
            "https://index.docker.io/v1/",
            "index.docker.io",
            "registry-1.docker.io",
        ] {
            out.push(alias.to_string());
        }
    }
    out
}

fn read_file(path: &Path) -> Result<Option<Map<String, Value>>, Error> {
    let io = |e: std::io::Error| Error::Credentials(format!("reading {}: {e}", path.display()));
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    if meta.len() > MAX_AUTH_FILE {
        return Err(Error::Credentials(format!(
            "{} is larger than {MAX_AUTH_FILE} bytes: it is not a credentials file",
            path.display()
        )));
    }
    let bytes = fs::read(path).map_err(io)?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        _ => Err(Error::Credentials(format!(
            "{} is not a JSON object: fix or remove it",
            path.display()
        ))),
    }
}

/// The stored credentials for `registry` (and `repository` on it), if any file has them.
pub fn lookup(registry: &str, repository: Option<&str>) -> Result<Option<Credentials>, Error> {
    lookup_in(&read_paths(), registry, repository)
}

fn lookup_in(
    paths: &[PathBuf],
    registry: &str,
    repository: Option<&str>,
) -> Result<Option<Credentials>, Error> {
    let keys = keys(registry, repository);
    let mut helper = None;
    for path in paths {
        let Some(file) = read_file(path)? else {
            continue;
        };
        let helpers = file.get("credHelpers").and_then(Value::as_object);
        if file.get("credsStore").is_some()
            || keys
                .iter()
                .any(|k| helpers.is_some_and(|h| h.contains_key(k)))
        {
            helper.get_or_insert_with(|| path.clone());
        }
        let Some(auths) = file.get("auths").and_then(Value::as_object) else {
            continue;
        };
        for key in &keys {
            if let Some(c) = auths.get(key).and_then(Credentials::from_entry) {
                tracing::debug!(file = %path.display(), key, "credentials found");
                return Ok(Some(c));
            }
        }
    }
    if let Some(path) = helper {
        // Helpers are programs handed the secret; microvm runs none, so it says so.
        tracing::warn!(
            "{} names a credential helper, which microvm does not run: `microvm login {registry}` stores the credentials it can use",
            path.display()
        );
    }
    Ok(None)
}

/// Stores `creds` for `registry` in [`write_path`]'s file (mode 0600), keeping its other
/// entries; returns the file.
pub fn store(registry: &str, creds: &Credentials) -> Result<PathBuf, Error> {
    let path = write_path()?;
    store_in(&path, registry, creds)?;
    Ok(path)
}

fn store_in(path: &Path, registry: &str, creds: &Credentials) -> Result<(), Error> {
    let mut file = read_file(path)?.unwrap_or_default();
    let auths = file
        .entry("auths")
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(auths) = auths else {
        return Err(Error::Credentials(format!(
            "{}: \"auths\" is not an object: fix or remove it",
            path.display()
        )));
    };
    let raw = format!("{}:{}", creds.username, creds.password);
    let auth = base64::engine::general_purpose::STANDARD.encode(raw);
    auths.insert(registry.to_string(), serde_json::json!({ "auth": auth }));
    write_file(path, &file)
}

/// Removes `registry`'s credentials from every file that has them; returns the files changed.
pub fn remove(registry: &str) -> Result<Vec<PathBuf>, Error> {
    remove_in(read_paths(), registry)
}

fn remove_in(paths: Vec<PathBuf>, registry: &str) -> Result<Vec<PathBuf>, Error> {
    let keys = keys(registry, None);
    let mut changed = Vec::new();
    for path in paths {
        let Some(mut file) = read_file(&path)? else {
            continue;
        };
        let Some(auths) = file.get_mut("auths").and_then(Value::as_object_mut) else {
            continue;
        };
        let before = auths.len();
        auths.retain(|k, _| !keys.contains(k));
        if auths.len() != before {
            write_file(&path, &file)?;
            changed.push(path);
        }
    }
    Ok(changed)
}

/// Removes every registry's credentials from the file `login` writes.
pub fn remove_all() -> Result<Option<PathBuf>, Error> {
    let path = write_path()?;
    let Some(mut file) = read_file(&path)? else {
        return Ok(None);
    };
    file.insert("auths".into(), Value::Object(Map::new()));
    write_file(&path, &file)?;
    Ok(Some(path))
}

/// Replaces `path` with `content` atomically, readable by its owner only.
fn write_file(path: &Path, content: &Map<String, Value>) -> Result<(), Error> {
    let err = |e: std::io::Error| Error::Credentials(format!("writing {}: {e}", path.display()));
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    // A fresh file only (create_new: O_EXCL, which also refuses a symlink), under a name no
    // one can guess ahead, so that a file planted beside it cannot receive the password.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{nanos:x}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut bytes = serde_json::to_vec_pretty(content)?;
        bytes.push(b'\n');
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        err(e)
    })
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// `bearer` or `basic` (lower case).
    pub scheme: String,
    /// Its parameters (`realm`, `service`, `scope`), keys in lower case.
    pub params: HashMap<String, String>,
}

/// Parses the first challenge of a `WWW-Authenticate` value: `SCHEME k="v", k2=v2`, quoted
/// values may hold commas and backslash escapes.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, mut rest) = match header.split_once(char::is_whitespace) {
        Some((s, r)) => (s, r.trim_start()),
        None => (header, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = HashMap::new();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(q) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next().map(|(_, c)| c)),
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &q[end?..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        if key.is_empty() {
            return None;
        }
        params.insert(key, value);
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse_as_registries_send_them() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/busybox:pull,push");
        let c = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "Registry Realm");
        let c = parse_challenge(r#"Bearer realm=http://x/t, service = "a\"b""#).unwrap();
        assert_eq!(c.params["realm"], "http://x/t");
        assert_eq!(c.params["service"], "a\"b");
        assert_eq!(parse_challenge("Basic").unwrap().params.len(), 0);
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_none());
        assert!(parse_challenge("").is_none());
    }

    #[test]
    fn keys_cover_docker_spellings_and_namespaces() {
        let k = keys("docker.io", Some("library/busybox"));
        assert_eq!(k[0], "docker.io/library/busybox");
        assert_eq!(k[1], "docker.io/library");
        assert!(k.contains(&"https://index.docker.io/v1/".to_string()));
        let k = keys("localhost:5000", None);
        assert_eq!(
            k,
            [
                "localhost:5000",
                "https://localhost:5000",
                "http://localhost:5000"
            ]
        );
    }

    #[test]
    fn files_keep_their_other_entries_and_stay_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("microvm-auth-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let podman = dir.join("containers/auth.json");
        let docker = dir.join("docker/config.json");
        fs::create_dir_all(docker.parent().unwrap()).unwrap();
        fs::write(
            &docker,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"ZG9jOmh1Yg=="}},"credsStore":"x"}"#,
        )
        .unwrap();
        let alice = Credentials {
            username: "alice".into(),
            password: "pw".into(),
        };
        store_in(&podman, "localhost:5000", &alice).unwrap();
        assert_eq!(
            fs::metadata(&podman).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let paths = vec![podman.clone(), docker.clone()];
        let found = lookup_in(&paths, "localhost:5000", Some("a/b")).unwrap();
        assert_eq!(found, Some(alice));
        // docker's spelling of Docker Hub, from the second file.
        let hub = lookup_in(&paths, "docker.io", Some("library/busybox")).unwrap();
        assert_eq!(hub.map(|c| c.username), Some("doc".to_string()));
        assert_eq!(lookup_in(&paths, "quay.io", None).unwrap(), None);

        assert_eq!(
            remove_in(paths.clone(), "docker.io").unwrap(),
            vec![docker.clone()]
        );
        let left: Value = serde_json::from_slice(&fs::read(&docker).unwrap()).unwrap();
        assert_eq!(left["credsStore"], "x", "other settings are kept");
        assert!(remove_in(paths.clone(), "docker.io").unwrap().is_empty());

        fs::write(&podman, "[1,2]").unwrap();
        let e = lookup_in(&paths, "localhost:5000", None).unwrap_err();
        assert!(e.to_string().contains("not a JSON object"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn entries_decode_and_debug_hides_the_password() {
        let e = serde_json::json!({"auth": "dXNlcjpwYTpzcw=="}); // user:pa:ss
        let c = Credentials::from_entry(&e).unwrap();
        assert_eq!(c.username, "user");
        assert_eq!(c.password, "pa:ss");
        assert!(!format!("{c:?}").contains("pa:ss"));
        assert_eq!(c.basic(), "Basic dXNlcjpwYTpzcw==");
        assert!(Credentials::from_entry(&serde_json::json!({"auth": "!!"})).is_none());
        assert!(Credentials::from_entry(&serde_json::json!({"identitytoken": "x"})).is_none());
    }
}
