//! microvm: run OCI container images, each in its own small KVM virtual machine.
//!
//! The flow goes one way: CLI ([`cli`]) -> VM plan ([`plan`]) -> backend ([`backend`]) -> exit
//! status. The KVM backend is our own VMM ([`vmm`]) with its devices ([`devices`]).
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod agent;
pub mod backend;
pub mod cli;
pub mod console_log;
pub mod container;
pub mod devices;
pub mod fuzz;
pub mod helpers;
pub mod host;
pub mod image;
pub mod initramfs;
pub mod logging;
pub mod network;
pub mod plan;
pub mod registry;
pub mod runtime;
pub mod scratch;
pub mod signals;
pub mod timing;
pub mod vmm;
pub mod volumes;
