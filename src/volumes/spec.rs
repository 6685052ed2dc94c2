//! Parsing and checking volume flags, before anything starts.

use std::path::{Component, Path, PathBuf};

use super::Error;

/// What a volume shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A host directory.
    Dir,
    /// A single host file.
    File,
    /// A private directory of host files and directories bound by name ([`Staged`]): an OCI
    /// bundle's root and bind mounts, all behind one file server.
    Staged,
}

/// One entry of a [`Kind::Staged`] share: `source` bound at `name` in the share's directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Staged {
    /// One path component, unique in the share.
    pub name: String,
    /// Absolute host path (a file or a directory).
    pub source: PathBuf,
    /// The bind is read-only on the host: the guest cannot write through it whatever it does.
    pub read_only: bool,
    /// Bind the source's submounts too.
    pub recursive: bool,
}

/// One volume, checked: the source exists, the target is a clean absolute path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Volume {
    /// Absolute host path.
    pub source: PathBuf,
    /// Absolute container path, normalised (no `.`, `..` or trailing `/`).
    pub target: String,
    /// Mounted read-only (enforced by virtiofsd).
    pub read_only: bool,
    /// Directory or file.
    pub kind: Kind,
    /// What a [`Kind::Staged`] share holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub staged: Vec<Staged>,
}

/// Parses `-v` and `--mount` values, checks each, and refuses two volumes on one target.
pub fn parse_all(volumes: &[String], mounts: &[String]) -> Result<Vec<Volume>, Error> {
    let mut all = Vec::with_capacity(volumes.len() + mounts.len());
    for v in volumes {
        all.push(parse_volume(v)?);
    }
    for m in mounts {
        all.push(parse_mount(m)?);
    }
    for (i, a) in all.iter().enumerate() {
        if all[..i].iter().any(|b| b.target == a.target) {
            return Err(Error::Target {
                path: a.target.clone(),
                why: "two volumes mount here".into(),
            });
        }
    }
    Ok(all)
}

fn syntax(flag: &'static str, value: &str, why: impl Into<String>) -> Error {
    Error::Syntax {
        flag,
        value: value.into(),
        why: why.into(),
    }
}

/// `HOST:GUEST[:OPTIONS]`, OPTIONS being `ro` or `rw`.
fn parse_volume(value: &str) -> Result<Volume, Error> {
    let parts: Vec<&str> = value.split(':').collect();
    let (source, target, options) = match parts.as_slice() {
        [_] => {
            return Err(syntax(
                "-v",
                value,
                "anonymous volumes are not supported: use -v /HOST/PATH:/CONTAINER/PATH",
            ))
        }
        [s, t] => (*s, *t, ""),
        [s, t, o] => (*s, *t, *o),
        _ => {
            return Err(syntax(
                "-v",
                value,
                "expected HOST:CONTAINER[:ro|rw] (paths with ':' need --mount)",
            ))
        }
    };
    let mut read_only = false;
    for opt in options.split(',').filter(|o| !o.is_empty()) {
        match opt {
            "ro" | "readonly" => read_only = true,
            "rw" => read_only = false,
            other => {
                return Err(syntax(
                    "-v",
                    value,
                    format!("unsupported option {other:?} (ro or rw)"),
                ))
            }
        }
    }
    check(source, target, read_only)
}

/// `type=bind,source=HOST,target=GUEST[,readonly]`, with docker's aliases.
fn parse_mount(value: &str) -> Result<Volume, Error> {
    let (mut kind, mut source, mut target, mut read_only) = (None, None, None, false);
    for field in value.split(',') {
        let (key, val) = match field.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (field, None),
        };
        match key {
            "type" => kind = val,
            "source" | "src" => source = val,
            "destination" | "dst" | "target" => target = val,
            "readonly" | "ro" => {
                read_only = match val {
                    None | Some("true") | Some("1") => true,
                    Some("false") | Some("0") => false,
                    Some(v) => {
                        return Err(syntax(
                            "--mount",
                            value,
                            format!("readonly={v}: expected true or false"),
                        ))
                    }
                }
            }
            other => {
                return Err(syntax(
                    "--mount",
                    value,
                    format!("unsupported option {other:?}"),
                ))
            }
        }
    }
    match kind {
        Some("bind") => {}
        Some(other) => {
            return Err(syntax(
                "--mount",
                value,
                format!("type={other} is not supported (only type=bind)"),
            ))
        }
        None => return Err(syntax("--mount", value, "type=bind is required")),
    }
    let source = source.ok_or_else(|| syntax("--mount", value, "source= is required"))?;
    let target = target.ok_or_else(|| syntax("--mount", value, "target= is required"))?;
    check(source, target, read_only)
}

/// Checks both paths and finds out what the source is.
fn check(source: &str, target: &str, read_only: bool) -> Result<Volume, Error> {
    let src = |why: &str| Error::Source {
        path: source.into(),
        why: why.into(),
    };
    if source.is_empty() {
        return Err(src("empty host path"));
    }
    if !Path::new(source).is_absolute() {
        return Err(src(
            "not an absolute path (named volumes are not supported; give a host path)",
        ));
    }
    // Refused rather than created, unlike docker's -v: a typo would otherwise share a fresh
    // empty directory and the container's writes would land where nobody looks.
    let meta = std::fs::metadata(source).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => src("does not exist"),
        _ => src(&e.to_string()),
    })?;
    let kind = if meta.is_dir() {
        Kind::Dir
    } else if meta.is_file() {
        Kind::File
    } else {
        return Err(src("neither a directory nor a regular file"));
    };
    let source = std::fs::canonicalize(source).map_err(|e| src(&e.to_string()))?;
    let target = clean_target(target)?;
    Ok(Volume {
        source,
        target,
        read_only,
        kind,
        staged: Vec::new(),
    })
}

/// The container path, absolute and without `.`, `..` or repeated and trailing slashes.
fn clean_target(target: &str) -> Result<String, Error> {
    let bad = |why: &str| Error::Target {
        path: target.into(),
        why: why.into(),
    };
    if !target.starts_with('/') {
        return Err(bad("not an absolute path"));
    }
    let mut parts = Vec::new();
    for c in Path::new(target).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => parts.push(n.to_string_lossy().into_owned()),
            Component::ParentDir => return Err(bad("'..' is not allowed")),
            Component::Prefix(_) => return Err(bad("not a container path")),
        }
    }
    match parts.first().map(String::as_str) {
        None => return Err(bad("cannot mount over the container's root")),
        Some("proc") | Some("sys") => {
            return Err(bad(
                "inside /proc or /sys, which belong to the kernel's own filesystems",
            ))
        }
        _ => {}
    }
    Ok(format!("/{}", parts.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("microvm-volspec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("app.conf");
        std::fs::write(&file, "x").unwrap();
        (dir, file)
    }

    fn err(v: &[&str], m: &[&str]) -> String {
        let v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        let m: Vec<String> = m.iter().map(|s| s.to_string()).collect();
        parse_all(&v, &m).unwrap_err().to_string()
    }

    #[test]
    fn docker_spellings_parse() {
        let (dir, file) = tmp();
        let d = dir.display();
        let f = file.display();
        let all = parse_all(
            &[format!("{d}:/data"), format!("{f}:/etc/app.conf:ro")],
            &[format!("type=bind,src={d},dst=/mnt//x/./y/,readonly")],
        )
        .unwrap();
        assert_eq!(
            all[0],
            Volume {
                source: std::fs::canonicalize(&dir).unwrap(),
                target: "/data".into(),
                read_only: false,
                kind: Kind::Dir,
                staged: Vec::new()
            }
        );
        assert_eq!((all[1].kind, all[1].read_only), (Kind::File, true));
        assert_eq!(
            (all[2].target.as_str(), all[2].read_only),
            ("/mnt/x/y", true)
        );
        let rw = parse_all(
            &[],
            &[format!("type=bind,source={d},target=/t,readonly=false")],
        );
        assert!(!rw.unwrap()[0].read_only);
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let (dir, _) = tmp();
        let d = dir.display().to_string();
        let cases: Vec<(Vec<String>, Vec<String>, &str)> = vec![
            (vec!["data:/data".into()], vec![], "not an absolute path"),
            (vec![format!("{d}/missing:/data")], vec![], "does not exist"),
            (vec![format!("{d}:data")], vec![], "not an absolute path"),
            (vec![format!("{d}:/proc/x")], vec![], "/proc or /sys"),
            (vec![format!("{d}:/sys")], vec![], "/proc or /sys"),
            (vec![format!("{d}:/")], vec![], "root"),
            (vec![format!("{d}:/a/../b")], vec![], "'..'"),
            (vec![format!("{d}:/a:z")], vec![], "unsupported option"),
            (vec!["/data".into()], vec![], "anonymous"),
            (
                vec![format!("{d}:/a"), format!("{d}:/a/")],
                vec![],
                "two volumes",
            ),
            (
                vec![],
                vec![format!("src={d},dst=/a")],
                "type=bind is required",
            ),
            (
                vec![],
                vec![format!("type=volume,src={d},dst=/a")],
                "only type=bind",
            ),
            (
                vec![],
                vec![format!("type=bind,dst=/a")],
                "source= is required",
            ),
            (
                vec![],
                vec![format!("type=bind,src={d}")],
                "target= is required",
            ),
            (
                vec![],
                vec![format!("type=bind,src={d},dst=/a,z=1")],
                "unsupported option",
            ),
            (vec!["/dev/null:/x".into()], vec![], "neither a directory"),
        ];
        for (v, m, want) in cases {
            let v: Vec<&str> = v.iter().map(String::as_str).collect();
            let m: Vec<&str> = m.iter().map(String::as_str).collect();
            let e = err(&v, &m);
            assert!(e.contains(want), "{v:?} {m:?}: {e}");
        }
    }
}
