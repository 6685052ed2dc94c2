//! What can go wrong in the image store, each message saying what failed and what to do.

use std::io;
use std::path::PathBuf;

/// An image-store failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An archive ended early or is damaged.
    #[error("{0} is truncated or damaged: fetch or save it again")]
    ArchiveTruncated(String),
    /// An image reference is not one microvm understands.
    #[error("invalid image reference {0:?}: use oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME[:TAG]] or a loaded image's name")]
    BadReference(String),
    /// An image name does not follow docker's rules.
    #[error("invalid image name {0:?}: use REPOSITORY[:TAG] in lower case, e.g. busybox:latest")]
    BadName(String),
    /// A digest string is malformed or uses an algorithm other than sha256.
    #[error("unsupported or malformed digest {0:?}: only sha256:<64 lower-case hex digits> is supported")]
    BadDigest(String),
    /// A blob's content does not hash to its digest.
    #[error(
        "blob {digest} is corrupt: its content hashes to {actual}; fetch or save the image again"
    )]
    DigestMismatch {
        /// The digest the blob should have.
        digest: String,
        /// What its content hashes to.
        actual: String,
    },
    /// A blob's size differs from the size its descriptor declares.
    #[error("blob {digest} is corrupt: expected {expected} bytes, found {actual}{more}; fetch or save the image again", more = if *.actual > *.expected { " or more" } else { "" })]
    SizeMismatch {
        /// The blob's digest.
        digest: String,
        /// The size its descriptor declares.
        expected: u64,
        /// The size found.
        actual: u64,
    },
    /// Valid JSON or tar that does not describe a usable image.
    #[error("{what}: {reason}")]
    Format {
        /// What was being read.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A layer holds something that cannot be put in a layer image safely.
    #[error("layer {digest} rejected: {reason}")]
    HostileLayer {
        /// The layer blob's digest.
        digest: String,
        /// The offending entry and why.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{what}: {source}")]
    Io {
        /// The operation and the file.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A JSON document could not be parsed.
    #[error("{what} is not valid: {source}")]
    Json {
        /// The document.
        what: String,
        /// The parser's complaint.
        source: serde_json::Error,
    },
    /// A referenced blob is not where it should be.
    #[error("{container} has no {what} {digest}: it is incomplete; fetch or save the image again")]
    MissingBlob {
        /// Where it was looked for.
        container: String,
        /// What the blob is (manifest, config, layer).
        what: &'static str,
        /// Its digest.
        digest: String,
    },
    /// No image in an index runs on this host.
    #[error("{source_name} has no linux/amd64 image (it has: {available})")]
    NoPlatform {
        /// The layout or archive.
        source_name: String,
        /// The platforms it offers.
        available: String,
    },
    /// No image with that name is loaded.
    #[error("no image named {0:?}: pull it with `microvm pull`, load it with `microvm load`, or see `microvm images`")]
    NotFound(String),
    /// `rmi` of a name the store does not have.
    #[error("no such image: {0} (see `microvm images`)")]
    NoSuchImage(String),
    /// The tag asked for is not in the layout or archive, or none was given where several exist.
    #[error("{source_name}: {problem} (it has: {available})")]
    SelectImage {
        /// The layout or archive.
        source_name: String,
        /// What went wrong.
        problem: String,
        /// The tags or names it offers.
        available: String,
    },
    /// The image store directory cannot be used.
    #[error(
        "cannot use the image store at {path}: {source}; set MICROVM_ROOT to a writable directory"
    )]
    StoreUnusable {
        /// The store root.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// tar2sqfs failed while converting a layer.
    #[error("converting layer {digest} with tar2sqfs failed ({status}): {stderr}")]
    Tar2sqfs {
        /// The layer blob's digest.
        digest: String,
        /// Its exit status.
        status: String,
        /// The last of what it printed.
        stderr: String,
    },
    /// tar2sqfs is not installed.
    #[error("tar2sqfs not found: install squashfs-tools-ng (apt-get install squashfs-tools-ng, or run scripts/setup-host)")]
    Tar2sqfsMissing,
    /// Media type or feature this store does not handle.
    #[error("{0}")]
    Unsupported(String),
}

impl Error {
    /// An I/O error with the operation and path that failed.
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// A format error.
    pub(crate) fn format(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Format {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// Adds "what failed" to an I/O result.
pub(crate) trait IoContext<T> {
    /// Wraps the error with a description of the operation.
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, Error>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(|e| Error::io(what(), e))
    }
}
