//! `microvm wait CONTAINER...`: blocks until each container stops, then prints its exit code.

use clap::Args;

use super::{error_line, EXIT_MICROVM_ERROR};
use crate::container;

/// Flags of `microvm wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Containers (name, id or unique id prefix).
    #[arg(value_name = "CONTAINER", required = true)]
    pub containers: Vec<String>,
}

/// Runs `microvm wait`.
pub fn wait(args: WaitArgs) -> i32 {
    let mut status = 0;
    for name in &args.containers {
        let result = container::containers()
            .and_then(|s| s.resolve(name))
            .and_then(|c| {
                c.wait_supervisor(None);
                c.state()
            });
        match result {
            Ok(state) => println!("{}", state.exit_code.unwrap_or(0)),
            Err(e) => {
                error_line(e);
                status = EXIT_MICROVM_ERROR;
            }
        }
    }
    status
}
