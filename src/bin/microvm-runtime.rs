//! The `microvm-runtime` binary: an OCI runtime with runc's command line (see
//! [`microvm::runtime`]).

use clap::Parser;
use microvm::runtime::cli::{self, Cli, EXIT_FAILURE};

fn main() {
    microvm::timing::mark_process_start();
    microvm::logging::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_FAILURE } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    std::process::exit(cli::run(cli));
}
