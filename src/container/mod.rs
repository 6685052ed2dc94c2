//! Containers that outlive the command that made them: a record per container under the data
//! directory ([`store`]), what it was created with ([`config`]) and what it is doing
//! ([`state`]), one run of it in a VM ([`launch`]), the process that owns a run
//! ([`supervisor`]) and the socket other commands reach it by ([`control`]), its output
//! ([`logs`]), and docker's rules for the process ([`rules`]). Both CLIs call this module; it
//! knows nothing of their flags.

pub mod commit;
pub mod config;
pub mod control;
pub mod error;
pub mod exec;
pub mod launch;
pub mod logs;
pub mod names;
pub mod ready;
pub mod rules;
pub mod state;
pub mod store;
pub mod supervisor;

pub use config::{ContainerConfig, ProcessConfig, RootSource};
pub use error::Error;
pub use rules::{parse_env_file, process, ImageDefaults, Overrides, Process, DEFAULT_PATH};
pub use state::{State, Status};
pub use store::{Container, Containers};

/// The container records of the data directory in use.
pub fn containers() -> Result<Containers, Error> {
    Containers::open(&crate::host::data_dir())
}
