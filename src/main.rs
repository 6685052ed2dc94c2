//! The `microvm` binary.

use clap::Parser;
use microvm::cli::{self, Cli, EXIT_MICROVM_ERROR};

fn main() {
    microvm::timing::mark_process_start();
    init_logging();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with status 0; usage errors are ours: 125.
            let code = if e.use_stderr() {
                EXIT_MICROVM_ERROR
            } else {
                0
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    std::process::exit(cli::run(cli));
}

/// Logs to stderr at the level in `MICROVM_LOG` (error, warn, info, debug, trace; default warn).
fn init_logging() {
    let level = std::env::var("MICROVM_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::WARN);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}
