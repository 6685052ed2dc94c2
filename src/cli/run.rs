//! `microvm run`: create a container and start it, in the foreground (this process supervises
//! it, streams and exit status as the process's) or with `-d` in the background (a detached
//! supervisor; the id is printed once the process runs).

use clap::Args;

use super::create::{self, CreateArgs};
use super::{error_line, foreground, start, EXIT_MICROVM_ERROR};

/// Flags of `microvm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Run in the background and print the container's id once its process has started.
    #[arg(short, long)]
    pub detach: bool,
    /// Print how long each phase took (image, plan, boot, agent ready, exec, exit) on stderr.
    #[arg(long)]
    pub timings: bool,
    /// The container.
    #[command(flatten)]
    pub create: CreateArgs,
}

/// Runs `microvm run`; returns the exit status.
pub fn run(args: RunArgs) -> i32 {
    if args.detach {
        if args.timings {
            error_line("--timings applies to foreground runs only");
            return EXIT_MICROVM_ERROR;
        }
        return match create::make(args.create) {
            Ok(c) => start::detached(&c, true),
            Err(e) => fail(e),
        };
    }
    let mut args = args;
    if let Err(e) = create::pull_first(&mut args.create) {
        return fail(e);
    }
    // Signals go to the container's process; block them before any thread starts.
    let signals = match foreground::block_signals() {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    match create::make(args.create) {
        Ok(c) => foreground::run(&c, signals, args.timings),
        Err(e) => fail(e),
    }
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    error_line(msg);
    EXIT_MICROVM_ERROR
}
