//! `microvm exec [-i] [-t] [-d] [-e K=V] [-w DIR] [-u USER] CONTAINER CMD...`: another process
//! in a running container's VM, its exit status as ours.

use clap::Args;

use super::foreground;
use super::{error_line, EXIT_MICROVM_ERROR};
use crate::agent::Outcome;
use crate::container::{self, exec::ExecRequest};

/// Flags of `microvm exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Keep stdin open and relay it.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the process a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// Start it in the background and return.
    #[arg(short, long)]
    pub detach: bool,
    /// Set an environment variable (KEY=VALUE, or KEY to take it from here).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// User to run as.
    #[arg(short, long, value_name = "USER")]
    pub user: Option<String>,
    /// The container (name, id or unique id prefix).
    #[arg(value_name = "CONTAINER")]
    pub container: String,
    /// The command and its arguments.
    #[arg(
        value_name = "COMMAND",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<String>,
}

/// Runs `microvm exec`.
pub fn exec(args: ExecArgs) -> i32 {
    let signals = match foreground::block_signals() {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let c = match container::containers().and_then(|s| s.resolve(&args.container)) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let env = args
        .env
        .into_iter()
        .flat_map(|e| match e.split_once('=') {
            Some(_) => Some(e),
            None => std::env::var(&e).ok().map(|v| format!("{e}={v}")),
        })
        .collect();
    let tty = args.tty && !args.detach;
    let req = ExecRequest {
        argv: args.command,
        env,
        workdir: args.workdir,
        user: args.user,
        tty,
        stdin: args.interactive,
        detach: args.detach,
        winsize: None,
        options: None,
    };
    let outcome = foreground::exec_here(&c, req, signals, |_| {});
    match outcome {
        Ok(Outcome::Exited(status)) => status.as_shell_code(),
        Ok(Outcome::StartFailed { kind, message }) => {
            error_line(message);
            kind.shell_code(EXIT_MICROVM_ERROR)
        }
        Err(e) => fail(e),
    }
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    error_line(msg);
    EXIT_MICROVM_ERROR
}
