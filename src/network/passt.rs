//! One `passt` per VM: a user-mode network stack on the host (Debian's package) that carries
//! the guest's frames over a socket pair, makes outbound TCP, UDP and ICMP from ordinary host
//! sockets, forwards DNS, and listens on the published ports.
//!
//! It gets one end of a connected socket pair (`--fd`) rather than a socket path: nothing to
//! wait for before the VM connects (frames queue in the socket until passt is ready), and when
//! the VM's end closes for any reason (the run is over, or microvm was killed) passt sees the
//! hang-up and exits (`--one-off`). A parent-death signal would not do: passt drops to `nobody`
//! when started as root, which clears it.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::ports::{PortMap, Protocol};
use super::user::{self, UserNet};
use super::Error;
use crate::helpers::{find, pass_fd};

/// How to install passt.
pub const PASST_HINT: &str = "install Debian's passt package (apt-get install passt)";

/// The fd number passt gets its end of the socket pair on.
const PASST_FD: i32 = 3;
/// passt's log, bounded by passt itself.
const LOG_SIZE: u64 = 1 << 20;

/// A running passt, before the VM starts.
pub struct Passt {
    /// Taken by [`Passt::watch`].
    child: Option<Child>,
    /// Signals passt without a pid that could be reused once it is reaped; taken by
    /// [`Passt::watch`].
    pidfd: Option<OwnedFd>,
    log: PathBuf,
}

impl Passt {
    /// Starts passt for `net` with `ports` published; returns it and the VM's end of its
    /// socket. Its log goes to `dir`.
    pub fn start(net: &UserNet, ports: &[PortMap], dir: &Path) -> Result<(Passt, OwnedFd), Error> {
        let bin = find("passt", PASST_HINT).map_err(|e| Error::Passt(e.to_string()))?;
        let (ours, theirs) = UnixStream::pair()
            .map_err(|e| Error::Passt(format!("cannot make a socket pair: {e}")))?;
        let log = dir.join("passt.log");
        let mut cmd = Command::new(bin);
        cmd.args(["--foreground", "--quiet", "--one-off"])
            .args(["--fd", &PASST_FD.to_string()])
            .arg("--log-file")
            .arg(&log)
            .args(["--log-size", &LOG_SIZE.to_string()])
            .args(["--mtu", &net.mtu.to_string()]);
        cmd.args(["-a", &user::GUEST_V4.to_string()])
            .args(["-n", &user::PREFIX_V4.to_string()])
            .args(["-g", &user::GATEWAY_V4.to_string()])
            .args(["--dns-forward", &user::DNS_V4.to_string()])
            // The gateway is not the host's loopback: a container reaches the host at the
            // host's own addresses, as under docker's bridge, and never the services the host
            // keeps to 127.0.0.1.
            .arg("--no-map-gw");
        if net.ipv6 {
            cmd.args(["-a", &user::GUEST_V6.to_string()])
                .args(["-g", &user::GATEWAY_V6.to_string()]);
        } else {
            cmd.arg("--ipv4-only");
        }
        for p in ports {
            let flag = match p.protocol {
                Protocol::Tcp => "-t",
                Protocol::Udp => "-u",
            };
            cmd.args([flag, &p.passt_spec()]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Out of the terminal's foreground group: Ctrl-C is the container's, and passt
            // ends when the VM's end of its socket closes.
            .process_group(0);
        pass_fd(&mut cmd, theirs.as_raw_fd(), PASST_FD);
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::Passt(format!("cannot start passt: {e}")))?;
        let pidfd = match pidfd_open(child.id()) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Passt(format!("pidfd_open: {e}")));
            }
        };
        Ok((
            Passt {
                child: Some(child),
                pidfd: Some(pidfd),
                log,
            },
            ours.into(),
        ))
    }

    /// Watches passt: `on_exit` gets a one-line reason if it exits while the VM runs.
    pub fn watch(mut self, on_exit: impl Fn(String) + Send + 'static) -> PasstWatch {
        let stopping = Arc::new(AtomicBool::new(false));
        // Always there: only `watch`, which takes `self`, takes it.
        let Some(mut child) = self.child.take() else {
            return PasstWatch {
                stopping,
                pidfd: None,
                thread: None,
            };
        };
        let log = std::mem::take(&mut self.log);
        let pidfd = self.pidfd.take();
        let flag = stopping.clone();
        let thread = std::thread::spawn(move || {
            let status = child.wait();
            if !flag.load(Ordering::SeqCst) {
                let why = last_log_line(&log)
                    .map(|l| format!(": {l}"))
                    .unwrap_or_default();
                on_exit(format!(
                    "passt (the container's network) exited while the VM ran ({}){why}",
                    status.map_or_else(|e| e.to_string(), |s| s.to_string())
                ));
            }
        });
        PasstWatch {
            stopping,
            pidfd,
            thread: Some(thread),
        }
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        // Not handed to a watch: the run failed before the VM started.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A watched passt; [`PasstWatch::finish`] ends it.
pub struct PasstWatch {
    stopping: Arc<AtomicBool>,
    pidfd: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl PasstWatch {
    /// Ends passt (the VM is done with it) and waits until it is reaped.
    pub fn finish(mut self) {
        self.end();
    }

    fn end(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // Through the pidfd: once reaped, the signal fails (ESRCH) instead of reaching
            // a process that reused the pid.
            if let Some(pidfd) = &self.pidfd {
                let _ = pidfd_kill(pidfd);
            }
            let _ = t.join();
        }
    }
}

impl Drop for PasstWatch {
    fn drop(&mut self) {
        self.end();
    }
}

/// A pidfd for our child `pid` (not yet reaped, so the pid is still its own).
fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// SIGKILL through a pidfd.
fn pidfd_kill(pidfd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal with a live pidfd, no siginfo (NULL) and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn last_log_line(log: &Path) -> Option<String> {
    let f = File::open(log).ok()?;
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter(|l| !l.trim().is_empty())
        .last()
        .map(|l| l.trim().to_owned())
}
