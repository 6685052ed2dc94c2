//! A new image from a container's changes (`commit`): the diff tar, written by a guest and so
//! hostile, streams once through the same checks as any loaded layer (paths, links, devices,
//! names) while it is hashed (its diff ID) and gzip-compressed into a blob; then a config with
//! the new layer's diff ID, a history entry and the `-c` changes, and a manifest naming base
//! layers plus the new one. Blobs go through temporary files and the name is written last, so
//! a failure (a bad entry, a full disk) leaves nothing named and nothing half-stored.

use std::io::{self, Read, Write};

use flate2::write::GzEncoder;
use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};

use super::digest::{Digest, HashingWriter};
use super::error::{Error, IoContext};
use super::layer_rewrite::{self, RewriteError};
use super::lock::Mode;
use super::names::{self, Record};
use super::reference::normalize_name;
use super::store::{now, unique, TempFile};
use super::{Image, Store};

const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// One `-c` instruction, docker's subset for commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `CMD`.
    Cmd(Vec<String>),
    /// `ENTRYPOINT`.
    Entrypoint(Vec<String>),
    /// `ENV KEY=VALUE...` or `ENV KEY VALUE`.
    Env(Vec<(String, String)>),
    /// `WORKDIR`.
    Workdir(String),
    /// `USER`.
    User(String),
    /// `LABEL KEY=VALUE...`.
    Label(Vec<(String, String)>),
    /// `EXPOSE PORT[/PROTO]...`.
    Expose(Vec<String>),
    /// `STOPSIGNAL`.
    StopSignal(String),
}

/// What a commit adds besides the layer.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// `-c` instructions, in order.
    pub changes: Vec<Change>,
    /// `-m`: the history entry's comment.
    pub message: Option<String>,
    /// `-a`: the author.
    pub author: Option<String>,
    /// The history entry's `created_by` (what made the layer).
    pub created_by: String,
}

/// Parses one `-c` value as docker does (`CMD ["a","b"]` or `CMD a b` in shell form).
pub fn parse_change(s: &str) -> Result<Change, String> {
    let s = s.trim();
    let (word, rest) = s
        .split_once(char::is_whitespace)
        .map(|(w, r)| (w, r.trim()))
        .unwrap_or((s, ""));
    let bad = |why: &str| format!("-c {s:?}: {why}");
    if rest.is_empty() {
        return Err(bad("the instruction needs an argument"));
    }
    // JSON form, else shell form (run by /bin/sh -c), as in a Dockerfile.
    let command = || -> Vec<String> {
        serde_json::from_str::<Vec<String>>(rest)
            .unwrap_or_else(|_| vec!["/bin/sh".into(), "-c".into(), rest.to_string()])
    };
    let pairs = |what: &str| -> Result<Vec<(String, String)>, String> {
        if !rest.contains('=') {
            return match rest.split_once(char::is_whitespace) {
                Some((k, v)) => Ok(vec![(k.to_string(), v.trim().to_string())]),
                None => Err(bad(&format!("{what} needs KEY=VALUE"))),
            };
        }
        rest.split_whitespace()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| bad(&format!("{what} needs KEY=VALUE, not {kv:?}")))
            })
            .collect()
    };
    match word.to_ascii_uppercase().as_str() {
        "CMD" => Ok(Change::Cmd(command())),
        "ENTRYPOINT" => Ok(Change::Entrypoint(command())),
        "ENV" => pairs("ENV").map(Change::Env),
        "LABEL" => pairs("LABEL").map(Change::Label),
        "WORKDIR" => Ok(Change::Workdir(rest.to_string())),
        "USER" => Ok(Change::User(rest.to_string())),
        "STOPSIGNAL" => Ok(Change::StopSignal(rest.to_string())),
        "EXPOSE" => rest
            .split_whitespace()
            .map(|p| {
                let (port, proto) = p.split_once('/').unwrap_or((p, "tcp"));
                let ok = port.parse::<u16>().is_ok_and(|n| n > 0)
                    && matches!(proto, "tcp" | "udp" | "sctp");
                ok.then(|| format!("{port}/{proto}"))
                    .ok_or_else(|| bad(&format!("{p:?} is not PORT[/tcp|udp|sctp]")))
            })
            .collect::<Result<_, _>>()
            .map(Change::Expose),
        other => Err(bad(&format!(
            "{other} cannot be changed by commit (CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, STOPSIGNAL, USER and WORKDIR can)"
        ))),
    }
}

/// Applies `changes` to an image config's `config` object.
fn apply(config: &mut Map<String, Value>, changes: &[Change]) {
    for c in changes {
        match c {
            Change::Cmd(v) => {
                config.insert("Cmd".into(), json!(v));
            }
            Change::Entrypoint(v) => {
                config.insert("Entrypoint".into(), json!(v));
                // As in a Dockerfile, a new entrypoint drops the inherited Cmd.
                config.remove("Cmd");
            }
            Change::Env(pairs) => {
                let mut env: Vec<String> = config
                    .get("Env")
                    .and_then(|e| serde_json::from_value(e.clone()).ok())
                    .unwrap_or_default();
                for (k, v) in pairs {
                    env.retain(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) != k);
                    env.push(format!("{k}={v}"));
                }
                config.insert("Env".into(), json!(env));
            }
            Change::Workdir(w) => {
                config.insert("WorkingDir".into(), json!(w));
            }
            Change::User(u) => {
                config.insert("User".into(), json!(u));
            }
            Change::StopSignal(s) => {
                config.insert("StopSignal".into(), json!(s));
            }
            Change::Label(pairs) => {
                let labels = config.entry("Labels").or_insert_with(|| json!({}));
                if !labels.is_object() {
                    *labels = json!({});
                }
                if let Some(m) = labels.as_object_mut() {
                    for (k, v) in pairs {
                        m.insert(k.clone(), json!(v));
                    }
                }
            }
            Change::Expose(ports) => {
                let exposed = config.entry("ExposedPorts").or_insert_with(|| json!({}));
                if !exposed.is_object() {
                    *exposed = json!({});
                }
                if let Some(m) = exposed.as_object_mut() {
                    for p in ports {
                        m.insert(p.clone(), json!({}));
                    }
                }
            }
        }
    }
}

/// Reads through to `inner`, copying every byte into the diff ID's hash and the compressor.
struct Tee<'a, R, W: Write> {
    inner: R,
    hash: &'a mut Sha256,
    gz: &'a mut GzEncoder<W>,
    failed: &'a mut Option<io::Error>,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        if let Err(e) = self.gz.write_all(&buf[..n]) {
            // The blob's file failed (a full disk): stop reading, report it as that.
            let kind = e.kind();
            *self.failed = Some(e);
            return Err(io::Error::new(kind, "cannot write the layer blob"));
        }
        Ok(n)
    }
}

/// Checks an image name (docker's `IMAGE[:TAG]`) before any work is done for it; a digest is
/// what an image has, not a name to give it.
pub fn check_name(name: &str) -> Result<String, Error> {
    if name.contains('@') {
        return Err(Error::BadName(name.chars().take(200).collect()));
    }
    normalize_name(name)
}

fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

impl Store {
    /// Stores `diff` (an OCI layer tar) as a new layer on top of `base`, with its config and
    /// manifest, but names nothing: the caller names it ([`Store::name_image`]) once it knows
    /// the diff is complete. Returns the new manifest's digest.
    pub fn commit(
        &self,
        base: &Image,
        diff: impl Read,
        opts: &CommitOptions,
    ) -> Result<Digest, Error> {
        let _gc = self.gc_lock(Mode::Shared)?;
        let (layer_digest, layer_size, diff_id) = self.put_diff(diff)?;

        let base_manifest = Digest::parse(&base.digest)?;
        let manifest_bytes = self.read_json_blob(&base_manifest, "manifest")?;
        let cfg_digest = Digest::parse(&base.config_digest)?;
        let cfg_bytes = self.read_json_blob(&cfg_digest, "config")?;
        let json_err = |what: &str| {
            let what = what.to_string();
            move |source| Error::Json { what, source }
        };
        let mut config: Value =
            serde_json::from_slice(&cfg_bytes).map_err(json_err("the base image's config"))?;
        let mut manifest: Value = serde_json::from_slice(&manifest_bytes)
            .map_err(json_err("the base image's manifest"))?;
        let created = rfc3339_now();
        let Some(cfg) = config.as_object_mut() else {
            return Err(Error::format(
                "the base image's config",
                "not a JSON object",
            ));
        };
        cfg.insert("created".into(), json!(created));
        if let Some(a) = &opts.author {
            cfg.insert("author".into(), json!(a));
        }
        let run = cfg.entry("config").or_insert_with(|| json!({}));
        if !run.is_object() {
            *run = json!({});
        }
        if let Some(run) = run.as_object_mut() {
            apply(run, &opts.changes);
        }
        let rootfs = cfg
            .entry("rootfs")
            .or_insert_with(|| json!({"type": "layers", "diff_ids": []}));
        match rootfs.get_mut("diff_ids").and_then(Value::as_array_mut) {
            Some(ids) => ids.push(json!(diff_id.as_str())),
            None => {
                return Err(Error::format(
                    "the base image's config",
                    "rootfs has no diff_ids",
                ))
            }
        }
        let mut entry = json!({"created": created, "created_by": opts.created_by});
        if let Some(m) = &opts.message {
            entry["comment"] = json!(m);
        }
        if let Some(a) = &opts.author {
            entry["author"] = json!(a);
        }
        match cfg.get_mut("history").and_then(Value::as_array_mut) {
            Some(h) => h.push(entry),
            None => {
                cfg.insert("history".into(), json!([entry]));
            }
        }
        let new_cfg = serde_json::to_vec(&config).map_err(json_err("the new config"))?;
        let new_cfg_digest = Digest::of(&new_cfg);

        let Some(m) = manifest.as_object_mut() else {
            return Err(Error::format(
                "the base image's manifest",
                "not a JSON object",
            ));
        };
        m.insert("mediaType".into(), json!(OCI_MANIFEST));
        m.insert(
            "config".into(),
            json!({"mediaType": OCI_CONFIG, "digest": new_cfg_digest.as_str(), "size": new_cfg.len()}),
        );
        match m.get_mut("layers").and_then(Value::as_array_mut) {
            Some(layers) => layers.push(json!({
                "mediaType": GZIP_LAYER,
                "digest": layer_digest.as_str(),
                "size": layer_size,
            })),
            None => {
                return Err(Error::format(
                    "the base image's manifest",
                    "it has no layers",
                ))
            }
        }
        m.remove("annotations");
        let new_manifest = serde_json::to_vec(&manifest).map_err(json_err("the new manifest"))?;
        let new_manifest_digest = Digest::of(&new_manifest);
        self.put_bytes(&new_cfg, &new_cfg_digest)?;
        self.put_bytes(&new_manifest, &new_manifest_digest)?;
        super::store::sync_dir(&self.blobs_dir())
            .ctx(|| format!("syncing {}", self.blobs_dir().display()))?;
        Ok(new_manifest_digest)
    }

    /// Names the stored image whose manifest is `manifest` `name`: docker's `IMAGE[:TAG]`
    /// (what `commit` gives, checked by [`check_name`] first), or `IMAGE@sha256:...` for a
    /// pull by digest.
    pub fn name_image(&self, name: &str, manifest: &Digest) -> Result<Image, Error> {
        let name = normalize_name(name)?;
        let _gc = self.gc_lock(Mode::Shared)?;
        names::update(self.root(), |images| {
            images.insert(
                name.clone(),
                Record {
                    manifest: manifest.to_string(),
                    loaded: now(),
                },
            );
            Ok(())
        })?;
        self.image(&name, manifest)
    }

    /// Checks the diff as a layer while storing it gzip-compressed: returns the blob's digest,
    /// its size and the diff ID.
    fn put_diff(&self, diff: impl Read) -> Result<(Digest, u64, Digest), Error> {
        let tmp = TempFile::create(self.blobs_dir().join(format!(".tmp-{}", unique())))?;
        let file = io::BufWriter::with_capacity(256 << 10, tmp.file()?);
        let mut gz = GzEncoder::new(HashingWriter::new(file), flate2::Compression::fast());
        let mut hash = Sha256::new();
        let mut failed = None;
        let checked = {
            let mut tee = Tee {
                inner: diff,
                hash: &mut hash,
                gz: &mut gz,
                failed: &mut failed,
            };
            // Validation only: the layer image is made from the stored blob on first use.
            layer_rewrite::rewrite(&mut tee, io::sink()).and_then(|_| {
                // Whatever follows the end-of-archive blocks is part of the blob too.
                io::copy(&mut tee, &mut io::sink())
                    .map(|_| ())
                    .map_err(RewriteError::Input)
            })
        };
        let write_err = |e: io::Error| Error::io(format!("writing {}", tmp.path.display()), e);
        if let Some(e) = failed {
            return Err(write_err(e));
        }
        match checked {
            Ok(()) => {}
            Err(RewriteError::Hostile(reason)) => {
                return Err(Error::HostileLayer {
                    digest: "(the container's changes)".into(),
                    reason,
                })
            }
            Err(RewriteError::Input(e)) | Err(RewriteError::Output(e)) => {
                return Err(Error::io("reading the container's changes", e))
            }
            Err(RewriteError::Setting(reason)) => return Err(Error::Unsupported(reason)),
        }
        let hashing = gz.finish().map_err(write_err)?;
        let (digest, size, file) = hashing.finish();
        let file = file.into_inner().map_err(|e| write_err(e.into_error()))?;
        file.sync_all().map_err(write_err)?;
        tmp.persist(&self.blob_path(&digest))?;
        let diff_id = Digest::parse(&format!("sha256:{:x}", hash.finalize()))?;
        Ok((digest, size, diff_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_given_to_commits_are_not_digests() {
        assert_eq!(check_name("app").unwrap(), "app:latest");
        let pinned = format!("app@sha256:{}", "ab".repeat(32));
        assert!(check_name(&pinned).is_err());
    }

    #[test]
    fn changes_parse_like_docker() {
        assert_eq!(
            parse_change(r#"CMD ["echo", "hi"]"#),
            Ok(Change::Cmd(vec!["echo".into(), "hi".into()]))
        );
        assert_eq!(
            parse_change("cmd echo hi"),
            Ok(Change::Cmd(vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo hi".into()
            ]))
        );
        assert_eq!(
            parse_change("ENV A=1 B=2"),
            Ok(Change::Env(vec![
                ("A".into(), "1".into()),
                ("B".into(), "2".into())
            ]))
        );
        assert_eq!(
            parse_change("ENV A one two"),
            Ok(Change::Env(vec![("A".into(), "one two".into())]))
        );
        assert_eq!(
            parse_change("EXPOSE 80 53/udp"),
            Ok(Change::Expose(vec!["80/tcp".into(), "53/udp".into()]))
        );
        for bad in [
            "RUN make",
            "CMD",
            "EXPOSE 0",
            "EXPOSE 80/xyz",
            "LABEL =x",
            "ENV A",
        ] {
            assert!(parse_change(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn changes_apply_to_the_config() {
        let mut c = json!({"Cmd": ["old"], "Env": ["PATH=/bin", "A=1"]})
            .as_object()
            .unwrap()
            .clone();
        apply(
            &mut c,
            &[
                Change::Env(vec![("A".into(), "2".into())]),
                Change::Entrypoint(vec!["/e".into()]),
                Change::Label(vec![("k".into(), "v".into())]),
                Change::Expose(vec!["80/tcp".into()]),
                Change::Workdir("/w".into()),
                Change::User("1:1".into()),
            ],
        );
        assert_eq!(c["Env"], json!(["PATH=/bin", "A=2"]));
        assert_eq!(c["Entrypoint"], json!(["/e"]));
        assert!(c.get("Cmd").is_none());
        assert_eq!(c["Labels"], json!({"k": "v"}));
        assert_eq!(c["ExposedPorts"], json!({"80/tcp": {}}));
        assert_eq!(
            (c["WorkingDir"].clone(), c["User"].clone()),
            (json!("/w"), json!("1:1"))
        );
    }
}
