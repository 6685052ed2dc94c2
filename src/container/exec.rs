//! `exec` and `top` on a running container: another process in its VM, or the VM's process
//! list, through the agent (never on the host). The exec inherits the container's environment,
//! user and working directory, as docker's does, unless told otherwise.

use std::path::PathBuf;

use microvm_agent_protocol::{ExecSpec, ProcessOptions};

use super::error::Error;
use super::state::Status;
use super::store::Container;
use crate::agent::{self, Control, HostIo, Outcome};

/// What `exec` was asked for.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ExecRequest {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// `-e` values, `KEY=VALUE`, over the container's environment.
    pub env: Vec<String>,
    /// `-w` (default: the container's working directory).
    pub workdir: Option<String>,
    /// `-u` (default: the container's user).
    pub user: Option<String>,
    /// `-t`.
    pub tty: bool,
    /// `-i`.
    pub stdin: bool,
    /// `-d`.
    pub detach: bool,
    /// The terminal's size with `-t`.
    pub winsize: Option<(u16, u16)>,
    /// Umask, limits, capabilities (default: the container process's).
    pub options: Option<ProcessOptions>,
}

/// The VM's vsock socket of a running container.
fn vm_socket(c: &Container) -> Result<PathBuf, Error> {
    let state = c.state()?;
    match (state.status, state.run_dir) {
        (Status::Running, Some(dir)) => Ok(dir.join("vsock.sock")),
        (Status::Paused, _) => Err(Error::Busy {
            name: c.config.name.clone(),
            state: "paused",
            hint: "unpause it first",
        }),
        _ => Err(Error::NotRunning(c.config.name.clone())),
    }
}

/// `env` with `over` applied key by key, later values winning (docker's rule).
fn merge_env(env: &[String], over: &[String]) -> Vec<String> {
    let key = |kv: &str| kv.split_once('=').map_or(kv, |(k, _)| k).to_string();
    let mut out: Vec<String> = Vec::with_capacity(env.len() + over.len());
    for kv in env.iter().chain(over) {
        out.retain(|e| key(e) != key(kv));
        out.push(kv.clone());
    }
    out
}

/// Runs `req` in `c`'s VM with its streams on `io`; returns how it ended.
pub fn exec(
    c: &Container,
    req: ExecRequest,
    io: HostIo,
    on_control: impl FnOnce(Control),
) -> Result<Outcome, Error> {
    exec_observed(c, req, io, on_control, |_| {})
}

/// [`exec`], also calling `on_started` with the guest pid once the process runs.
pub fn exec_observed(
    c: &Container,
    req: ExecRequest,
    io: HostIo,
    on_control: impl FnOnce(Control),
    on_started: impl FnOnce(i32),
) -> Result<Outcome, Error> {
    if req.argv.is_empty() {
        return Err(Error::Other("exec needs a command".into()));
    }
    let socket = vm_socket(c)?;
    let p = &c.config.process;
    let spec = ExecSpec {
        argv: req.argv,
        env: merge_env(&p.env, &req.env),
        cwd: req.workdir.unwrap_or_else(|| p.cwd.clone()),
        user: req.user.unwrap_or_else(|| p.user.clone()),
        tty: req.tty && !req.detach,
        stdin: req.stdin && !req.detach,
        winsize: req.winsize,
        detach: req.detach,
        options: req.options.unwrap_or_else(|| p.options.clone()),
    };
    let name = c.config.name.clone();
    agent::exec::run_observed(&socket, spec, io, on_control, on_started).map_err(|e| match e {
        agent::Error::GuestEnded => Error::Other(format!(
            "container {name} stopped before the exec's exit status arrived"
        )),
        e => Error::Other(format!("exec in {name}: {e}")),
    })
}

/// The processes in `c`'s VM.
pub fn top(c: &Container) -> Result<(Vec<String>, Vec<Vec<String>>), Error> {
    let socket = vm_socket(c)?;
    agent::exec::top(&socket).map_err(|e| Error::Other(format!("top of {}: {e}", c.config.name)))
}

#[cfg(test)]
mod tests {
    use super::merge_env;

    #[test]
    fn exec_env_overrides_the_containers_by_key() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            merge_env(&v(&["PATH=/bin", "A=1", "B=2"]), &v(&["A=9", "C=3"])),
            v(&["PATH=/bin", "B=2", "A=9", "C=3"])
        );
    }
}
