//! The `microvm` command line: docker-style flags and exit codes.

mod boot;
mod image;
mod run;
mod signals;

use clap::{Parser, Subcommand};

/// Exit status when microvm itself fails (docker's convention).
pub const EXIT_MICROVM_ERROR: i32 = 125;
/// Exit status when the guest outlived `--timeout` (as timeout(1)).
pub const EXIT_TIMEOUT: i32 = 124;

/// microvm: run each container in its own small KVM virtual machine.
#[derive(Debug, Parser)]
#[command(name = "microvm", version, about, propagate_version = true)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest kernel directly and exit with the guest.
    Boot(boot::BootArgs),
    /// Run a command in its own VM.
    Run(run::RunArgs),
    /// Show what this host offers: KVM, its flavour, the default guest kernel.
    Info,
    /// Load an image from an OCI layout or archive, or a docker archive, into the image store.
    Load(image::LoadArgs),
    /// List loaded images.
    Images(image::ImagesArgs),
    /// Remove image names (their data goes at the next `prune`).
    Rmi(image::RmiArgs),
    /// Remove image data (blobs, converted layers) that no image uses.
    Prune,
}

/// Runs the parsed command; returns the process exit status.
pub fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::Boot(args) => boot::run(args),
        Command::Run(args) => run::run(args),
        Command::Info => {
            print!("{}", crate::host::info_report());
            0
        }
        Command::Load(args) => image::load(args),
        Command::Images(args) => image::images(args),
        Command::Rmi(args) => image::rmi(args),
        Command::Prune => image::prune(),
    }
}

/// Prints a one-line error the way every command does.
pub fn error_line(msg: impl std::fmt::Display) {
    eprintln!("microvm: {msg}");
}
