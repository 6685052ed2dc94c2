//! The `microvm` binary.

use clap::Parser;
use microvm::cli::{self, Cli, EXIT_MICROVM_ERROR};

fn main() {
    microvm::timing::mark_process_start();
    microvm::logging::init();
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
