//! How a helper process tells the command that started it whether its container's process
//! started: the starter passes a pipe's write end as descriptor 3 (named by an environment
//! variable), starts the helper in a session of its own, and reads one JSON line, a
//! [`Started`], or end-of-file if the helper died first. Used by microvm's detached supervisor
//! and by microvm-runtime's supervisor and exec relays.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::os::unix::process::CommandExt;
use std::process::Command;

use super::supervisor::Started;

/// The environment variable naming the report descriptor.
pub const READY_FD_ENV: &str = "MICROVM_READY_FD";

/// Spawns `cmd` in a session of its own with the report pipe on descriptor 3 (`terminal`: its
/// stdin becomes its controlling terminal) and waits for its report. Returns its pid and the
/// report, `None` if it ended without one. The child is not waited for: it outlives the
/// caller.
pub fn spawn_and_wait(cmd: Command, terminal: bool) -> std::io::Result<(u32, Option<Started>)> {
    spawn_and_wait_for(cmd, terminal, None)
}

/// [`spawn_and_wait`], giving up after `timeout`: the helper is killed (it is our unreaped
/// child, so its pid is still its own) and the error is of kind `TimedOut`.
pub fn spawn_and_wait_for(
    mut cmd: Command,
    terminal: bool,
    timeout: Option<Duration>,
) -> std::io::Result<(u32, Option<Started>)> {
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let write_raw = write_end.as_raw_fd();
    cmd.env(READY_FD_ENV, "3");
    // SAFETY: runs in the forked child before exec, calling only setsid, dup2 and ioctl, which
    // are async-signal-safe; `write_raw` is open in the child (inherited; dup2 puts it on fd 3
    // without close-on-exec).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::dup2(write_raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if terminal && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    drop(write_end);
    drop(cmd);
    if let Some(timeout) = timeout {
        if !readable_within(&read_end, timeout) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::ErrorKind::TimedOut.into());
        }
    }
    let mut line = String::new();
    let _ = BufReader::new(std::fs::File::from(read_end)).read_line(&mut line);
    // Not waited for: it lives on, and init (or the engine's subreaper) reaps it.
    drop(child);
    Ok((pid, serde_json::from_str::<Started>(&line).ok()))
}

/// Whether `fd` has something to read (or its writer is gone) within `timeout`.
fn readable_within(fd: &OwnedFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(n) if n > 0 => return true,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return true,
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// The report pipe this process was started with, taken out of the environment.
pub fn take_pipe() -> Option<OwnedFd> {
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
    let mut f = std::fs::File::from(pipe);
    if let Ok(mut bytes) = serde_json::to_vec(started) {
        bytes.push(b'\n');
        let _ = f.write_all(&bytes);
    }
}
