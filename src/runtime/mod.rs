//! `microvm-runtime`: an OCI runtime with runc's command line, so that podman, docker and
//! containerd (and through it Kubernetes) can run a container in its own VM by naming this
//! binary as the container's runtime. Each container is a record of the same store `microvm`
//! uses ([`crate::container`]), kept under the runtime's `--root`, and runs under the same
//! supervisor; what is the runtime's own: reading a bundle ([`bundle`]), the OCI state
//! ([`oci_state`]), handing a terminal to the engine ([`console`]), starting the processes
//! engines wait on ([`spawn`]), and runc's error log ([`errlog`]).

pub mod bundle;
pub mod capabilities;
pub mod cli;
pub mod console;
pub mod errlog;
pub mod oci_state;
pub mod spawn;

use std::path::PathBuf;

/// Where container state lives when `--root` is not given (runc's is /run/runc).
pub const DEFAULT_ROOT: &str = "/run/microvm-runtime";

/// Errors of the runtime, worded as runc words them where engines match on the words.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No container has this id (containerd and podman match "does not exist").
    #[error("container \"{0}\" does not exist")]
    NotFound(String),
    /// The id is taken.
    #[error("container with id exists: {0}")]
    Exists(String),
    /// The id is not a valid container id.
    #[error("invalid container id format: {0:?} (letters, digits, '_', '+', '-', '.'; not starting with '.')")]
    BadId(String),
    /// The command needs a live container (containerd matches "container not running").
    #[error("container not running")]
    NotRunning,
    /// The bundle cannot be run.
    #[error("bundle {bundle}: {why}")]
    Bundle {
        /// The bundle directory.
        bundle: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A container record or its supervisor failed.
    #[error(transparent)]
    Container(#[from] crate::container::Error),
    /// Anything else, already worded.
    #[error("{0}")]
    Other(String),
}

impl From<String> for Error {
    fn from(s: String) -> Self {
        Error::Other(s)
    }
}

/// Checks a container id as runc does: one path component of `[A-Za-z0-9_+.-]`, not `.`-led.
pub fn check_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= 1024
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+-.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadId(id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::check_id;

    #[test]
    fn ids_are_single_safe_components() {
        for good in ["abc", "a-b_c.d+e", &"f".repeat(64)] {
            assert!(check_id(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "x\0",
            &"f".repeat(1025),
        ] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }
}
