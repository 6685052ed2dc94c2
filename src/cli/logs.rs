//! `microvm logs [-f] [--tail N] [-t] CONTAINER`: the process's output, stdout and stderr kept
//! apart, also after the container exited.

use clap::Args;

use super::{error_line, EXIT_MICROVM_ERROR};
use crate::container::{self, logs};

/// Flags of `microvm logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Keep printing new output until the container stops.
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N lines ("all" for every line).
    #[arg(short = 'n', long, value_name = "N", default_value = "all")]
    pub tail: String,
    /// Prefix each line with its time (RFC 3339, nanoseconds).
    #[arg(short, long)]
    pub timestamps: bool,
    /// The container (name, id or unique id prefix).
    #[arg(value_name = "CONTAINER")]
    pub container: String,
}

/// Runs `microvm logs`.
pub fn logs(args: LogsArgs) -> i32 {
    let tail = match args.tail.as_str() {
        "all" => None,
        n => match n.parse::<usize>() {
            Ok(n) => Some(n),
            Err(_) => {
                error_line(format!("--tail {n:?}: a number of lines, or all"));
                return EXIT_MICROVM_ERROR;
            }
        },
    };
    let c = match container::containers().and_then(|s| s.resolve(&args.container)) {
        Ok(c) => c,
        Err(e) => {
            error_line(e);
            return EXIT_MICROVM_ERROR;
        }
    };
    let opts = logs::PrintOptions {
        follow: args.follow,
        tail,
        timestamps: args.timestamps,
    };
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    match logs::print(c.dir(), &opts, &mut out, &mut err, &|| c.is_running()) {
        Ok(()) => 0,
        Err(e) => {
            drop(err);
            error_line(e);
            EXIT_MICROVM_ERROR
        }
    }
}
