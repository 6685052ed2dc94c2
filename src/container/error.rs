//! Errors of container commands, worded as docker words them where docker has a word.

use std::path::PathBuf;

/// What went wrong with a container.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No container has this name or id prefix.
    #[error("no such container: {0}")]
    NotFound(String),
    /// Several containers' ids start with this.
    #[error("multiple containers match the id prefix {0:?}: give more of the id, or the name")]
    Ambiguous(String),
    /// `--name` is taken.
    #[error("the container name {name:?} is already in use by container {id}: remove (microvm rm) that container to reuse the name")]
    NameInUse {
        /// The name.
        name: String,
        /// Who has it.
        id: String,
    },
    /// The command needs a running container.
    #[error("container {0} is not running")]
    NotRunning(String),
    /// The command needs a container that is not running.
    #[error("container {name} is {state}: {hint}")]
    Busy {
        /// The container.
        name: String,
        /// Its state.
        state: &'static str,
        /// What to do.
        hint: &'static str,
    },
    /// A file of the container store could not be used.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A record of the store does not parse.
    #[error(
        "container record {path} is damaged: {why} (remove the directory to drop the container)"
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The supervisor could not be reached or did not answer.
    #[error("container {name}: its supervisor {why}")]
    Supervisor {
        /// The container.
        name: String,
        /// What happened.
        why: String,
    },
    /// Anything else, already worded for the user.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// An I/O error on `path` while doing `what`.
    pub fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { what, path, source }
    }
}

impl From<String> for Error {
    fn from(s: String) -> Self {
        Error::Other(s)
    }
}
