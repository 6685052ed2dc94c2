//! TLS for registries: rustls trusting the system's CA bundle, plus a registry's own CAs and
//! client certificate from a `certs.d` directory, as podman and docker read them
//! (`/etc/containers/certs.d/HOST:PORT/`, `/etc/docker/certs.d/HOST:PORT/`, or `--cert-dir`):
//! `*.crt` are CAs, `NAME.cert` + `NAME.key` a client certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ureq::tls::{parse_pem, Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};

use super::Error;

/// Debian's CA bundle (ca-certificates), the system's trust store.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Largest certificate or key file read.
const MAX_PEM: u64 = 1 << 20;

/// The TLS configuration for `registry`: verified against the system's CAs and the registry's
/// own (from `cert_dir`, else the standard certs.d directories), or not verified at all when
/// `verify` is false; a client certificate found there is offered.
pub(crate) fn config(
    registry: &str,
    verify: bool,
    cert_dir: Option<&Path>,
) -> Result<TlsConfig, Error> {
    let dirs = match cert_dir {
        Some(d) if !d.is_dir() => {
            return Err(Error::Tls(format!(
                "--cert-dir {}: not a directory",
                d.display()
            )))
        }
        Some(d) => vec![d.to_path_buf()],
        None => default_dirs(registry),
    };
    build(&dirs, verify)
}

/// Verified TLS against the system's CAs alone: for hosts other than the registry (token
/// services, blob storage), which its certs.d directory does not vouch for.
pub(crate) fn system() -> Result<TlsConfig, Error> {
    build(&[], true)
}

fn build(dirs: &[PathBuf], verify: bool) -> Result<TlsConfig, Error> {
    let mut cas = Vec::new();
    let mut client = None;
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        names.sort();
        for path in names {
            match path.extension().and_then(|e| e.to_str()) {
                Some("crt") => {
                    for item in read_pem(&path)? {
                        if let PemItem::Certificate(c) = item {
                            cas.push(c);
                        }
                    }
                }
                Some("cert") if client.is_none() => {
                    client = Some(client_cert(&path)?);
                }
                _ => {}
            }
        }
    }
    let mut builder = TlsConfig::builder().client_cert(client);
    if !verify {
        builder = builder.disable_verification(true);
    } else {
        let bundle = std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(SYSTEM_BUNDLE));
        let mut roots = Vec::new();
        if bundle.is_file() {
            for item in read_pem(&bundle)? {
                if let PemItem::Certificate(c) = item {
                    roots.push(c);
                }
            }
        }
        if roots.is_empty() && cas.is_empty() {
            tracing::warn!(
                "no CA certificates in {}: using the built-in Mozilla roots",
                bundle.display()
            );
        } else {
            roots.extend(cas);
            builder = builder.root_certs(RootCerts::Specific(Arc::new(roots)));
        }
    }
    Ok(builder.build())
}

/// podman's and docker's per-registry certificate directories.
fn default_dirs(registry: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(
            PathBuf::from(home)
                .join(".config/containers/certs.d")
                .join(registry),
        );
    }
    dirs.push(Path::new("/etc/containers/certs.d").join(registry));
    dirs.push(Path::new("/etc/docker/certs.d").join(registry));
    dirs
}

fn read_pem(path: &Path) -> Result<Vec<PemItem<'static>>, Error> {
    let bad = |why: String| Error::Tls(format!("{}: {why}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.len() > MAX_PEM {
        return Err(bad(format!("larger than {MAX_PEM} bytes")));
    }
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    parse_pem(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM: {e}")))
}

/// `NAME.cert` and its `NAME.key`.
fn client_cert(cert: &Path) -> Result<ClientCert, Error> {
    let key_path = cert.with_extension("key");
    let chain: Vec<Certificate<'static>> = read_pem(cert)?
        .into_iter()
        .filter_map(|i| match i {
            PemItem::Certificate(c) => Some(c),
            _ => None,
        })
        .collect();
    let key: Option<PrivateKey<'static>> = if key_path.is_file() {
        read_pem(&key_path)?.into_iter().find_map(|i| match i {
            PemItem::PrivateKey(k) => Some(k),
            _ => None,
        })
    } else {
        None
    };
    match (chain.is_empty(), key) {
        (false, Some(key)) => Ok(ClientCert::new_with_certs(&chain, key)),
        _ => Err(Error::Tls(format!(
            "{} needs a certificate and {} its private key",
            cert.display(),
            key_path.display()
        ))),
    }
}
