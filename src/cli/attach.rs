//! `microvm attach CONTAINER`: follow a running container's output from now on, forward this
//! terminal's signals to its process (docker's --sig-proxy), and exit with its status. The
//! output comes from the container's log, so attaching and detaching (Ctrl-C is forwarded, so
//! kill the attach itself to detach) never disturb the container. A detached container's stdin
//! is not kept open, so nothing is relayed to it.

use clap::Args;

use super::{error_line, foreground, EXIT_MICROVM_ERROR};
use crate::container::control::{self, Request};
use crate::container::{self, logs};

/// Flags of `microvm attach`.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Forward this terminal's signals to the process (false: do not).
    #[arg(long = "sig-proxy", default_value_t = true, action = clap::ArgAction::Set)]
    pub sig_proxy: bool,
    /// The container (name, id or unique id prefix).
    #[arg(value_name = "CONTAINER")]
    pub container: String,
}

/// Runs `microvm attach`.
pub fn attach(args: AttachArgs) -> i32 {
    let signals = match foreground::block_signals() {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let c = match container::containers().and_then(|s| s.resolve(&args.container)) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    if !c.is_running() {
        return fail(format!(
            "cannot attach to container {}: it is not running (start it with start -a)",
            c.config.name
        ));
    }
    if args.sig_proxy {
        let target = c.clone();
        std::thread::spawn(move || {
            while let Some(signal) = signals.wait() {
                if signal != libc::SIGWINCH {
                    let _ = control::request(&target, &Request::Kill { signal });
                }
            }
        });
    }
    let opts = logs::PrintOptions {
        follow: true,
        tail: Some(0),
        timestamps: false,
    };
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    if let Err(e) = logs::print(c.dir(), &opts, &mut out, &mut err, &|| c.is_running()) {
        drop(err);
        return fail(e);
    }
    drop(err);
    match c.state() {
        Ok(s) => s.exit_code.unwrap_or(0),
        Err(e) => fail(e),
    }
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    error_line(msg);
    EXIT_MICROVM_ERROR
}
