//! Helper programs microvm starts (QEMU, virtiofsd, passt): finding them and tying their lives
//! to ours.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;

/// A helper program that is not installed.
#[derive(Debug, thiserror::Error)]
#[error("{program} not found in PATH or ~/.cargo/bin: {hint}")]
pub struct Missing {
    /// The program.
    pub program: &'static str,
    /// How to install it.
    pub hint: &'static str,
}

/// Finds `program` in PATH or in cargo's bin directory (where `cargo install` puts helpers).
pub fn find(program: &'static str, hint: &'static str) -> Result<PathBuf, Missing> {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|p| p.join("bin"));
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(cargo_bin)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or(Missing { program, hint })
}

/// Makes a child die with us (PR_SET_PDEATHSIG fires when the spawning thread exits, so spawn
/// from the thread that lives as long as the process).
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Gives the child `fd` as descriptor number `target` (inherited across exec); `fd` must stay
/// open in the parent until the child is spawned.
pub fn pass_fd(cmd: &mut Command, fd: std::os::fd::RawFd, target: i32) {
    // SAFETY: dup2 and fcntl are async-signal-safe and touch no parent memory; `fd` is open in
    // the parent until spawn returns, so it is valid in the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // dup2 onto itself keeps FD_CLOEXEC, so clear it either way.
            if libc::fcntl(target, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A handle on a child process that signals that process and no other: a pid can be reused
/// once its process is reaped (by a watcher thread, say), a pidfd cannot.
#[derive(Clone, Debug)]
pub struct ProcessHandle(Arc<OwnedFd>);

impl ProcessHandle {
    /// A handle on `child`, which must not be reaped yet (we still hold it, so it is not).
    pub fn of(child: &Child) -> std::io::Result<ProcessHandle> {
        let pid = rustix::process::Pid::from_raw(child.id() as i32)
            .ok_or_else(|| std::io::Error::other("pid 0"))?;
        let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
        Ok(ProcessHandle(Arc::new(fd)))
    }

    /// Sends `signal` (a libc signal number); fails with ESRCH once the process is gone (then
    /// nothing is signalled).
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        let sig = rustix::process::Signal::from_named_raw(signal)
            .ok_or_else(|| std::io::Error::other(format!("no signal {signal}")))?;
        Ok(rustix::process::pidfd_send_signal(&*self.0, sig)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_never_signals_a_reaped_childs_successor() {
        let mut child = Command::new("sleep").arg("100").spawn().unwrap();
        let handle = ProcessHandle::of(&child).unwrap();
        handle.signal(libc::SIGKILL).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        // Reaped: its pid may belong to anyone now; the handle still names only that child.
        let gone = handle.signal(libc::SIGKILL).unwrap_err();
        assert_eq!(gone.raw_os_error(), Some(libc::ESRCH));
        let mut other = Command::new("sleep").arg("100").spawn().unwrap();
        assert!(handle.signal(libc::SIGKILL).is_err());
        assert!(
            other.try_wait().unwrap().is_none(),
            "another process was hit"
        );
        other.kill().unwrap();
        other.wait().unwrap();
    }
}
