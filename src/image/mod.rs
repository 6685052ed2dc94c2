//! The OCI image store: loads images from OCI layouts and docker archives into a
//! content-addressed store, and turns each layer into one read-only squashfs image that guests
//! stack with overlayfs.
//!
//! On disk, under [`crate::host::data_dir`]:
//! - `blobs/sha256/<hex>`: manifests, configs and layers, each verified against its digest
//!   while written to a temporary file beside it, then renamed into place;
//! - `images.json`: name -> manifest digest ([`names`]);
//! - `layers/<hex>.sqfs`: the layer blob `<hex>` converted ([`layer_convert`]), shared by every
//!   VM;
//! - `layers/merged-<key>.sqfs`: the lowest layers of an image merged into one, for VMs with
//!   fewer disk slots than the image has layers ([`Store::lease_layer_images_at_most`]); `<key>`
//!   is a sha256 over the merged layers' digests, so images sharing those layers share it;
//! - `store.lock`, `images.lock`, `locks/<hex>.lock`: flock files ordering writers.
//!
//! Flow: a reference ([`reference`]) names a source ([`source`]): an OCI layout
//! ([`oci_layout`]) or a docker archive ([`docker_archive`]); [`Store::load`] copies what the
//! chosen image needs, and [`Store::layer_images`] converts its layers on first use.

mod commit;
mod digest;
mod docker_archive;
mod error;
mod layer_convert;
mod layer_rewrite;
mod lock;
mod names;
mod oci_layout;
mod progress;
mod pulled;
pub mod reference;
mod save;
mod source;
mod store;

pub use commit::{check_name, parse_change, Change, CommitOptions};
pub(crate) use digest::verify_bytes;
pub use digest::Digest;
pub use error::Error;
pub use layer_convert::{Compression, SQUASHFS_COMPRESSOR};
pub(crate) use oci_layout::{choose_platform, INDEX_TYPES, MANIFEST_TYPES};
pub(crate) use progress::{bar as progress_bar, short as short_digest};
pub use pulled::{BlobRef, PushPlan, StoreHold, MAX_DOCUMENT};
pub use save::SaveFormat;
pub use store::{LayerLease, Store};

/// What a container runs by default, from the image config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`: arguments to the entrypoint, or the command when there is none.
    pub cmd: Vec<String>,
    /// `Env`, as `NAME=value`.
    pub env: Vec<String>,
    /// `WorkingDir` (empty: `/`).
    pub working_dir: String,
    /// `User` (empty: root): `user`, `uid`, `user:group` or `uid:gid`.
    pub user: String,
    /// `StopSignal` (empty: SIGTERM), as the image spells it (`SIGQUIT`, `QUIT` or `3`).
    pub stop_signal: String,
}

/// A loaded image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Its name, e.g. `busybox:latest`.
    pub name: String,
    /// Its manifest's digest.
    pub digest: String,
    /// Its config's digest (docker's image ID).
    pub config_digest: String,
    /// Its run configuration.
    pub config: RunConfig,
    /// Layer blob digests, bottom layer first.
    pub layers: Vec<String>,
    /// The layers' uncompressed digests from the config, bottom first.
    pub diff_ids: Vec<String>,
}

/// One line of `microvm images`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ImageSummary {
    /// `repository:tag`.
    pub name: String,
    /// The repository part of the name.
    pub repository: String,
    /// The tag part of the name.
    pub tag: String,
    /// The config digest (docker's image ID).
    pub id: String,
    /// The manifest digest.
    pub digest: String,
    /// The config's `created` time (RFC 3339), when it has one.
    pub created: Option<String>,
    /// Bytes of the config and layer blobs.
    pub size: u64,
}

/// What [`Store::prune`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Blobs removed (no image uses them).
    pub blobs_removed: usize,
    /// Layer images removed.
    pub layer_images_removed: usize,
    /// Unused layer images kept because a running VM holds them.
    pub layer_images_in_use: usize,
    /// Temporary files of interrupted loads and conversions removed.
    pub temp_files_removed: usize,
    /// Bytes freed.
    pub bytes_freed: u64,
}

/// The whole number the environment variable `var` holds (`default` when it is unset), from 1
/// to `max`; anything else is a message naming the variable and the `unit` it counts.
pub(crate) fn env_setting(var: &str, default: u64, max: u64, unit: &str) -> Result<u64, String> {
    let Some(value) = std::env::var_os(var) else {
        return Ok(default);
    };
    value
        .to_str()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| {
            format!("{var}={value:?} is not valid: give a whole number of {unit}, e.g. {default}")
        })
}

/// [`crate::fuzz::layer_tar`]: the layer rewrite with a file data cap of `max_data` bytes.
#[doc(hidden)]
pub fn fuzz_layer_rewrite(tar: &[u8], max_data: u64) -> Result<(), String> {
    layer_rewrite::rewrite_capped(tar, std::io::sink(), max_data)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// [`crate::fuzz::image_documents`]: a docker-archive manifest.json, and digests and names.
#[doc(hidden)]
pub fn fuzz_documents(data: &[u8]) {
    let _ = serde_json::from_slice::<Vec<docker_archive::Entry>>(data);
    let text = String::from_utf8_lossy(data);
    let _ = digest::Digest::parse(&text);
    let _ = reference::split_name(&text);
}
