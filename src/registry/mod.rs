//! Registries: `pull`, `push`, `login` and `logout` over the OCI distribution protocol, with
//! each layer converted into its layer image as it downloads.
//!
//! - [`reference`]: docker's reference grammar (`busybox` is `docker.io/library/busybox:latest`);
//! - [`auth`]: credentials in podman's and docker's files, `WWW-Authenticate` challenges;
//! - [`tls`]: rustls with the system's CAs and certs.d directories;
//! - [`client`]: HTTP to one registry (ureq): handshake, tokens, retries, redirects;
//! - [`url`]: locations resolved, origins compared (credentials stay on the registry's);
//! - [`pull`] and [`push`]: the protocol's two directions over the image store;
//! - [`image_for_run`]: docker's `--pull` policy for `run` and `create`.

pub mod auth;
mod blob;
mod client;
mod policy;
mod pull;
mod push;
pub mod reference;
mod tls;
mod url;

use std::io;

pub use client::Options;
pub use policy::{image_for_run, PullPolicy};
pub use pull::pull;
pub use push::{push, Pushed};
pub use reference::Reference;

use auth::Credentials;

/// A registry operation's failure, each message saying what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A reference or registry name microvm cannot read.
    #[error("invalid reference {reference:?}: {why}")]
    BadReference {
        /// What was given.
        reference: String,
        /// What is wrong with it.
        why: String,
    },
    /// The registry could not be reached, or the connection failed.
    #[error("cannot reach registry {registry}: {reason}{hint}")]
    Unreachable {
        /// The registry.
        registry: String,
        /// What failed.
        reason: String,
        /// What to try.
        hint: &'static str,
    },
    /// TLS failed: an unknown certificate, or no TLS on the other end.
    #[error("cannot reach registry {registry}: {reason}{hint}")]
    TlsFailed {
        /// The registry.
        registry: String,
        /// What failed.
        reason: String,
        /// What to try.
        hint: &'static str,
    },
    /// The registry (or its token service) refused us.
    #[error("registry {registry}: authentication failed: {detail}; log in with `microvm login {registry}`")]
    Unauthorized {
        /// The registry.
        registry: String,
        /// What was refused.
        detail: String,
    },
    /// The registry answered a request with an error.
    #[error("registry {registry}: {what}: {detail} (HTTP {status})")]
    Registry {
        /// The registry.
        registry: String,
        /// What was asked.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The registry's error code and message.
        detail: String,
    },
    /// The registry answered something that breaks the protocol.
    #[error("registry {registry}: {what}: {reason}")]
    Protocol {
        /// The registry.
        registry: String,
        /// What was being read.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An image or manifest kind microvm does not handle.
    #[error("{0}")]
    Unsupported(String),
    /// Certificates could not be read.
    #[error("TLS set-up: {0}")]
    Tls(String),
    /// The credentials files could not be read or written.
    #[error("credentials: {0}")]
    Credentials(String),
    /// A local file could not be read.
    #[error("{what}: {source}")]
    Local {
        /// The operation and the file.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// `run` found no stored image and could not pull one.
    #[error("no image named {name:?} here, and pulling it failed: {source}")]
    NotPulled {
        /// The name given.
        name: String,
        /// Why the pull failed.
        source: Box<Error>,
    },
    /// The image store refused or failed.
    #[error(transparent)]
    Image(#[from] crate::image::Error),
}

/// Logs in to `registry` (`HOST[:PORT]`, or docker's spellings of Docker Hub): checks the
/// credentials against it, then stores them. Returns the registry's name and the file written.
pub fn login(
    registry: &str,
    creds: Credentials,
    opts: &Options,
) -> Result<(String, std::path::PathBuf), Error> {
    let (name, api) = reference::registry_host(registry)?;
    client::Client::connect(
        &name,
        &api,
        reference::is_loopback(&name),
        None,
        Some(creds.clone()),
        opts,
    )?;
    let path = auth::store(&name, &creds)?;
    Ok((name, path))
}

/// Forgets `registry`'s stored credentials; returns the files changed (none: there were none).
pub fn logout(registry: &str) -> Result<Vec<std::path::PathBuf>, Error> {
    let (name, _) = reference::registry_host(registry)?;
    auth::remove(&name)
}
