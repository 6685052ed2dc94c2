//! `microvm exec [-i] [-t] [-d] [-e K=V] [-w DIR] [-u USER] CONTAINER CMD...`: another process
//! in a running container's VM, its exit status as ours.

use std::sync::Mutex;

use clap::Args;
use microvm_agent_protocol::StartFailure;

use super::foreground::{self, RawTerminal};
use super::{error_line, EXIT_MICROVM_ERROR};
use crate::agent::{Control, HostIo, Outcome};
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
        winsize: if tty {
            foreground::terminal_size()
        } else {
            None
        },
        options: None,
    };
    let raw = tty.then(RawTerminal::enable).flatten();
    let io = HostIo::terminal();
    let signals = Mutex::new(Some(signals));
    let outcome = container::exec::exec(&c, req, io, |control: Control| {
        if let Some(signals) = signals.lock().unwrap_or_else(|e| e.into_inner()).take() {
            foreground::forward_signals(signals, control);
        }
    });
    drop(raw);
    match outcome {
        Ok(Outcome::Exited(status)) => status.as_shell_code(),
        Ok(Outcome::StartFailed { kind, message }) => {
            error_line(message);
            match kind {
                StartFailure::NotFound => 127,
                StartFailure::NotExecutable => 126,
                StartFailure::Other => EXIT_MICROVM_ERROR,
            }
        }
        Err(e) => fail(e),
    }
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    error_line(msg);
    EXIT_MICROVM_ERROR
}
