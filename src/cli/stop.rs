//! `microvm stop [-t S]` and `microvm kill [-s SIG]`: ask a running container's supervisor to
//! end its process.

use std::time::Duration;

use clap::Args;

use super::{error_line, EXIT_MICROVM_ERROR};
use crate::container::config::parse_signal;
use crate::container::control::{self, Request};
use crate::container::{self, Container, Error};

/// Extra time `stop` gives the supervisor past the grace period (SIGKILL, power-off, records).
const STOP_SLACK: Duration = Duration::from_secs(15);

/// Flags of `microvm stop`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// Seconds to wait after the stop signal before SIGKILL.
    #[arg(short = 't', long = "time", value_name = "S", default_value_t = 10)]
    pub time: u32,
    /// Containers (name, id or unique id prefix).
    #[arg(value_name = "CONTAINER", required = true)]
    pub containers: Vec<String>,
}

/// Flags of `microvm kill`.
#[derive(Debug, Args)]
pub struct KillArgs {
    /// Signal to send (name or number).
    #[arg(short, long, value_name = "SIGNAL", default_value = "KILL")]
    pub signal: String,
    /// Containers (name, id or unique id prefix).
    #[arg(value_name = "CONTAINER", required = true)]
    pub containers: Vec<String>,
}

/// Stops `c`: the stop signal, SIGKILL after `grace`, the VM powered off if need be; returns
/// when its supervisor is gone. Stopping a container that is not running does nothing, as in
/// docker.
pub fn stop_container(c: &Container, grace: Duration) -> Result<(), Error> {
    let _lock = c.lock()?;
    if !c.is_running() {
        return Ok(());
    }
    control::request(
        c,
        &Request::Stop {
            timeout: grace.as_secs_f64(),
        },
    )?;
    if c.wait_supervisor(Some(grace + STOP_SLACK)) {
        Ok(())
    } else {
        Err(Error::Supervisor {
            name: c.config.name.clone(),
            why: format!(
                "did not end within {} s of the stop",
                (grace + STOP_SLACK).as_secs()
            ),
        })
    }
}

/// Runs `microvm stop`.
pub fn stop(args: StopArgs) -> i32 {
    each(&args.containers, |c| {
        stop_container(c, Duration::from_secs(args.time.into()))
    })
}

/// Runs `microvm kill`.
pub fn kill(args: KillArgs) -> i32 {
    let signal = match parse_signal(&args.signal) {
        Ok(s) => s,
        Err(e) => {
            error_line(e);
            return EXIT_MICROVM_ERROR;
        }
    };
    each(&args.containers, |c| {
        let _lock = c.lock()?;
        if !c.is_running() {
            return Err(Error::NotRunning(c.config.name.clone()));
        }
        control::request(c, &Request::Kill { signal })
    })
}

/// Applies `f` to each named container, printing each name done and each error; 125 if any
/// failed.
pub fn each(names: &[String], f: impl Fn(&Container) -> Result<(), Error>) -> i32 {
    let mut status = 0;
    for name in names {
        match container::containers()
            .and_then(|s| s.resolve(name))
            .and_then(|c| f(&c))
        {
            Ok(()) => println!("{name}"),
            Err(e) => {
                error_line(e);
                status = EXIT_MICROVM_ERROR;
            }
        }
    }
    status
}
