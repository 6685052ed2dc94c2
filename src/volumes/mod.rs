//! Volumes: host directories and single host files mounted into the container, docker's
//! `-v HOST:GUEST[:ro]` and `--mount type=bind,...`. Each is one virtio-fs share served by a
//! `virtiofsd` of its own (its `--readonly` and `--shared-dir` apply to the whole instance).

mod spec;
mod virtiofsd;
mod watch;

pub use spec::{parse_all, Kind, Staged, Volume};
pub use virtiofsd::{Virtiofsd, VIRTIOFSD_HINT};
pub use watch::{ListeningShares, Shares, Watch};

/// Errors with volumes, worded for the person who typed the flag.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The flag does not parse.
    #[error("{flag} {value:?}: {why}")]
    Syntax {
        /// `-v` or `--mount`.
        flag: &'static str,
        /// What was given.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// The host path cannot be used.
    #[error("volume source {path}: {why}")]
    Source {
        /// The host path.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The container path cannot be used.
    #[error("volume target {path}: {why}")]
    Target {
        /// The container path.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// virtiofsd could not be started.
    #[error("cannot start virtiofsd for the volume {target}: {why}")]
    Start {
        /// The volume's container path.
        target: String,
        /// Why.
        why: String,
    },
}
