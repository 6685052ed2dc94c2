//! The image a `run` or `create` uses, pulled first when docker's `--pull` policy says so.

use super::{pull, Error, Options, Reference};
use crate::image::{self, reference::parse_transport, Image, Store};

/// The stored image `name` names: as the store resolves it (names, IDs), else under the name a
/// pull of it would have stored (`docker://busybox`, `busybox:1.36@sha256:...`).
fn find(store: &Store, name: &str) -> Result<Image, image::Error> {
    match store.resolve(name) {
        Err(image::Error::NotFound(n)) => {
            match Reference::parse(name).and_then(|r| r.stored_name()) {
                Ok(stored) if stored != name => store.resolve(&stored).map_err(|e| match e {
                    image::Error::NotFound(_) => image::Error::NotFound(n),
                    e => e,
                }),
                _ => Err(image::Error::NotFound(n)),
            }
        }
        other => other,
    }
}

/// When `run` and `create` pull the image (docker's `--pull`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PullPolicy {
    /// Pull when no image of that name is stored.
    #[default]
    Missing,
    /// Pull every time (the registry's current image of that name).
    Always,
    /// Never pull: use the stored image or fail.
    Never,
}

/// The image `name` names, pulled from its registry first as `policy` says. Transport
/// references (`oci:DIR`, archives) are loaded, never pulled. `announce` is called before a
/// pull that was not asked for explicitly (docker's "Unable to find image" line).
pub fn image_for_run(
    store: &Store,
    name: &str,
    policy: PullPolicy,
    opts: &Options,
    progress: bool,
    announce: impl FnOnce(&str),
) -> Result<Image, Error> {
    if parse_transport(name).is_some() {
        return Ok(store.resolve(name)?);
    }
    match policy {
        PullPolicy::Never => Ok(find(store, name)?),
        PullPolicy::Always => pull(store, name, opts, progress),
        PullPolicy::Missing => match find(store, name) {
            Err(image::Error::NotFound(n)) => {
                if Reference::parse(name).is_err() {
                    return Err(image::Error::NotFound(n).into());
                }
                announce(name);
                pull(store, name, opts, progress).map_err(|e| Error::NotPulled {
                    name: name.to_string(),
                    source: Box::new(e),
                })
            }
            other => Ok(other?),
        },
    }
}
