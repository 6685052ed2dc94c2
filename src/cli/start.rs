//! `microvm start [-a] [-i] CONTAINER...`: boot a fresh VM for a created or exited container,
//! over the same sandbox layer (what it wrote before is still there).

use clap::Args;

use super::{error_line, foreground, EXIT_MICROVM_ERROR};
use crate::container::supervisor::{self, Started};
use crate::container::{self, Container, Error};

/// Flags of `microvm start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// Attach the terminal: stream the output, forward signals, exit with the process's status.
    #[arg(short, long)]
    pub attach: bool,
    /// Attach stdin too (implies -a; the container must have been created with -i).
    #[arg(short, long)]
    pub interactive: bool,
    /// Containers (name, id or unique id prefix).
    #[arg(value_name = "CONTAINER", required = true)]
    pub containers: Vec<String>,
}

/// Runs `microvm start`.
pub fn start(args: StartArgs) -> i32 {
    if args.attach || args.interactive {
        let [one] = args.containers.as_slice() else {
            error_line("you cannot start and attach multiple containers at once");
            return EXIT_MICROVM_ERROR;
        };
        let signals = match foreground::block_signals() {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        let c = match resolve_stopped(one) {
            Ok(c) => c,
            Err(e) => return fail(e),
        };
        return foreground::run(&c, signals, false);
    }
    let mut status = 0;
    for name in &args.containers {
        let code = match container::containers().and_then(|s| s.resolve(name)) {
            Ok(c) => detached(&c, false),
            Err(e) => fail(e),
        };
        if code == 0 {
            println!("{name}");
        } else {
            status = code;
        }
    }
    status
}

fn resolve_stopped(name: &str) -> Result<Container, Error> {
    let c = container::containers()?.resolve(name)?;
    if c.is_running() {
        return Err(already_running(&c));
    }
    Ok(c)
}

fn already_running(c: &Container) -> Error {
    Error::Busy {
        name: c.config.name.clone(),
        state: "running",
        hint: "it is already started",
    }
}

/// Starts `c` under a detached supervisor and waits until its process runs; prints the id
/// when `print_id` (as `run -d` does). Returns docker's status for the start.
pub fn detached(c: &Container, print_id: bool) -> i32 {
    let result = c.lock().and_then(|_lock| {
        if c.is_running() {
            return Err(already_running(c));
        }
        foreground::warn_if_emulated(c);
        supervisor::spawn_detached(c)
    });
    match result {
        Ok(Started::Running | Started::Created) => {
            if print_id {
                println!("{}", c.config.id);
            }
            0
        }
        Ok(Started::Failed { code, message }) => {
            error_line(message);
            code
        }
        Err(e) => fail(e),
    }
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    error_line(msg);
    EXIT_MICROVM_ERROR
}
