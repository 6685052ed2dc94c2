//! The host processes engines wait on: a container's supervisor (`create`) and an exec's
//! relay (`exec --detach`). Each is a child of the runtime call that starts it and outlives
//! it, so that it is re-parented to the engine's subreaper (conmon, the containerd shim),
//! which reaps it and takes its exit status as the container's or the exec's. It reports over
//! an inherited pipe whether its process started; the caller then writes the pid file.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};

use super::Error;
use crate::container::ready;
use crate::container::supervisor::Started;

/// How long a container's VM may take to boot and prepare its process, or an exec to start:
/// generous for emulated and PVM boots, but a guest that never answers cannot hang an engine.
pub const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Starts this binary with `args` as a helper in a session of its own, its stdio the caller's
/// (the engine's pipes) or `terminal` (made its controlling terminal), and waits until it says
/// whether its process started. Returns its pid and the report.
pub fn helper(args: &[OsString], terminal: Option<OwnedFd>) -> Result<(u32, Started), Error> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Other(format!("cannot find our own binary: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.args(args);
    let tty = terminal.is_some();
    if let Some(t) = terminal {
        let dup = |fd: &OwnedFd| {
            fd.try_clone()
                .map_err(|e| Error::Other(format!("cannot duplicate the terminal: {e}")))
        };
        cmd.stdin(Stdio::from(dup(&t)?))
            .stdout(Stdio::from(dup(&t)?))
            .stderr(Stdio::from(t));
    }
    match ready::spawn_and_wait_for(cmd, tty, Some(READY_TIMEOUT)) {
        Ok((pid, Some(started))) => Ok((pid, started)),
        Ok((_, None)) => Err(Error::Other(
            "the container's supervisor ended before it reported".into(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err(Error::Other(format!(
            "the container's VM did not become ready within {} s: stopped it",
            READY_TIMEOUT.as_secs()
        ))),
        Err(e) => Err(Error::Other(format!(
            "cannot start the container's supervisor: {e}"
        ))),
    }
}

/// Writes `pid` to `path` as runc does: whole or not at all (a temporary file renamed).
pub fn write_pid_file(path: &Path, pid: u32) -> Result<(), Error> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::Other(format!("pid file {}: not a file name", path.display())))?;
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, pid.to_string())
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::Other(format!("cannot write pid file {}: {e}", path.display()))
        })
}
