//! `microvm pause` and `microvm unpause`: stop a running container's vCPUs (no guest code runs
//! while paused) and let them run again.

use clap::Args;

use super::stop::each;
use crate::container::control::{self, Request};
use crate::container::Error;

/// Flags of `microvm pause` and `microvm unpause`.
#[derive(Debug, Args)]
pub struct PauseArgs {
    /// Containers (name, id or unique id prefix).
    #[arg(value_name = "CONTAINER", required = true)]
    pub containers: Vec<String>,
}

/// Runs `microvm pause` (`pause` true) or `microvm unpause`.
pub fn pause(args: PauseArgs, pause: bool) -> i32 {
    each(&args.containers, |c| {
        let _lock = c.lock()?;
        if !c.is_running() {
            return Err(Error::NotRunning(c.config.name.clone()));
        }
        let req = if pause {
            Request::Pause
        } else {
            Request::Unpause
        };
        control::request(c, &req)
    })
}
