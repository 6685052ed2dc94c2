//! The host processes engines wait on: a container's supervisor (`create`) and an exec's
//! relay (`exec --detach`). Each is a child of the runtime call that starts it and outlives
//! it, so that it is re-parented to the engine's subreaper (conmon, the containerd shim),
//! which reaps it and takes its exit status as the container's or the exec's. It reports over
//! an inherited pipe whether its process started; the caller then writes the pid file.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use super::Error;
use crate::container::supervisor::Started;

/// The environment variable naming the descriptor a helper reports its start on.
pub const READY_FD_ENV: &str = "MICROVM_RUNTIME_READY_FD";

/// Starts this binary with `args` as a helper in a session of its own, its stdio the caller's
/// (the engine's pipes) or `terminal` (made its controlling terminal), and waits until it says
/// whether its process started. Returns its pid and the report.
pub fn helper(args: &[OsString], terminal: Option<OwnedFd>) -> Result<(u32, Started), Error> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Other(format!("cannot find our own binary: {e}")))?;
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::Other(format!("cannot make a pipe: {e}")))?;
    let write_raw = write_end.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(args).env(READY_FD_ENV, "3");
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
    // SAFETY: runs in the forked child before exec, calling only setsid, ioctl and dup2, which
    // are async-signal-safe; `write_raw` is open in the child (inherited; dup2 puts it on fd 3
    // without close-on-exec).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::dup2(write_raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error::Other(format!("cannot start the container's supervisor: {e}")))?;
    let pid = child.id();
    drop(write_end);
    drop(cmd);
    let mut line = String::new();
    let _ = BufReader::new(std::fs::File::from(read_end)).read_line(&mut line);
    // Not waited for: it outlives us, and the engine's subreaper reaps it.
    drop(child);
    match serde_json::from_str::<Started>(&line) {
        Ok(started) => Ok((pid, started)),
        Err(_) => Err(Error::Other(
            "the container's supervisor ended before it reported".into(),
        )),
    }
}

/// The report pipe a helper was started with, taken out of the environment.
pub fn ready_pipe() -> Option<OwnedFd> {
    use std::os::fd::FromRawFd;
    let fd = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .filter(|fd| *fd >= 3);
    std::env::remove_var(READY_FD_ENV);
    // SAFETY: the starter put the pipe's write end on this descriptor for us alone; nothing
    // else in this process owns it.
    fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `started` on the report pipe.
pub fn report(pipe: OwnedFd, started: &Started) {
    use std::io::Write;
    let mut f = std::fs::File::from(pipe);
    if let Ok(mut bytes) = serde_json::to_vec(started) {
        bytes.push(b'\n');
        let _ = f.write_all(&bytes);
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
