//! The image a `run` or `create` uses, pulled first when docker's `--pull` policy says so.

use super::{pull, Error, Options, Reference};
use crate::image::{self, reference::parse_transport, Image, Store};

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
        PullPolicy::Never => Ok(store.resolve(name)?),
        PullPolicy::Always => pull(store, name, opts, progress),
        PullPolicy::Missing => match store.resolve(name) {
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
