//! `microvm top CONTAINER`: the processes running in a container's VM, from its agent.

use clap::Args;

use super::{error_line, EXIT_MICROVM_ERROR};
use crate::container;

/// Flags of `microvm top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// The container (name, id or unique id prefix).
    #[arg(value_name = "CONTAINER")]
    pub container: String,
}

/// Runs `microvm top`.
pub fn top(args: TopArgs) -> i32 {
    let result = container::containers()
        .and_then(|s| s.resolve(&args.container))
        .and_then(|c| container::exec::top(&c));
    let (titles, rows) = match result {
        Ok(t) => t,
        Err(e) => {
            error_line(e);
            return EXIT_MICROVM_ERROR;
        }
    };
    super::table::print(&titles, &rows);
    0
}
