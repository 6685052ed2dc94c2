//! `microvm rm [-f]` and `microvm container prune`: remove containers with their sandbox
//! layers and logs, leaving no process, socket or file behind.

use std::time::Duration;

use clap::{Args, Subcommand};

use super::stop::each;
use super::{error_line, EXIT_MICROVM_ERROR};
use crate::container::control::{self, Request};
use crate::container::{self, Container, Error};

/// How long `rm -f` waits for a killed container's supervisor before killing it outright.
const FORCE_WAIT: Duration = Duration::from_secs(10);

/// Flags of `microvm rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// Kill a running container first.
    #[arg(short, long)]
    pub force: bool,
    /// Containers (name, id or unique id prefix).
    #[arg(value_name = "CONTAINER", required = true)]
    pub containers: Vec<String>,
}

/// `microvm container ...`.
#[derive(Debug, Subcommand)]
pub enum ContainerCommand {
    /// Remove every container that is not running.
    Prune,
}

/// Removes `c`; a running one only with `force` (its process and VM killed first).
pub fn remove(c: &Container, force: bool) -> Result<(), Error> {
    let _lock = c.lock()?;
    if c.is_running() {
        if !force {
            return Err(Error::Busy {
                name: c.config.name.clone(),
                state: "running",
                hint: "stop it first, or use rm -f",
            });
        }
        let asked = control::request(c, &Request::Stop { timeout: 0.0 });
        if asked.is_err() || !c.wait_supervisor(Some(FORCE_WAIT)) {
            // A supervisor that cannot be reached or does not end goes the hard way; it still
            // holds its lock, so the recorded pid is still its own.
            if let Some(pid) = c.state()?.supervisor_pid {
                if c.is_running() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            if !c.wait_supervisor(Some(FORCE_WAIT)) {
                return Err(Error::Supervisor {
                    name: c.config.name.clone(),
                    why: "survived SIGKILL".into(),
                });
            }
        }
    }
    control::remove_stale(c);
    c.remove()
}

/// Runs `microvm rm`.
pub fn rm(args: RmArgs) -> i32 {
    each(&args.containers, |c| remove(c, args.force))
}

/// Runs `microvm container ...`.
pub fn container(cmd: ContainerCommand) -> i32 {
    match cmd {
        ContainerCommand::Prune => prune(),
    }
}

fn prune() -> i32 {
    let list = match container::containers().and_then(|s| s.list()) {
        Ok(l) => l,
        Err(e) => {
            error_line(e);
            return EXIT_MICROVM_ERROR;
        }
    };
    let mut status = 0;
    println!("Deleted Containers:");
    for c in list {
        if c.is_running() {
            continue;
        }
        match remove(&c, false) {
            Ok(()) => println!("{}", c.config.id),
            // Started meanwhile: not ours to remove.
            Err(Error::Busy { .. }) => {}
            Err(e) => {
                error_line(e);
                status = EXIT_MICROVM_ERROR;
            }
        }
    }
    status
}
