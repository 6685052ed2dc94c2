//! Runs processes in the container: resolves user, program and working directory, wires their
//! standard streams to the host's stream connections, forwards signals and terminal sizes, and
//! reports how they ended. The container's process ([`run`]) ends the VM when it ends; `exec`
//! processes ([`crate::exec`]) use the same [`start`].

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use microvm_agent_protocol::{
    self as proto, ExecSpec, Message, ProcessOptions, RunSpec, StartFailure,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{privileges, reaper, users};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The three stream connections to the host.
pub struct Streams {
    /// Host to process.
    pub stdin: UnixStream,
    /// Process to host.
    pub stdout: UnixStream,
    /// Process to host (empty when the process has a terminal).
    pub stderr: UnixStream,
}

/// A process to start, from the host's [`RunSpec`] or [`ExecSpec`].
pub struct Proc {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Environment.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// User spec.
    pub user: String,
    /// The VM's hostname, for `HOSTNAME`.
    pub hostname: String,
    /// Give it a terminal.
    pub tty: bool,
    /// Relay stdin.
    pub stdin: bool,
    /// Initial terminal size.
    pub winsize: Option<(u16, u16)>,
    /// Create a missing working directory (docker does for the container, not for exec).
    pub create_cwd: bool,
    /// Umask, limits, capabilities, groups.
    pub options: ProcessOptions,
}

impl Proc {
    /// The container's process.
    pub fn container(spec: &RunSpec) -> Proc {
        Proc {
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
            user: spec.user.clone(),
            hostname: spec.hostname.clone(),
            tty: spec.tty,
            stdin: spec.stdin,
            winsize: spec.winsize,
            create_cwd: true,
            options: spec.options.clone(),
        }
    }

    /// An exec process.
    pub fn exec(spec: &ExecSpec, hostname: &str) -> Proc {
        Proc {
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
            user: spec.user.clone(),
            hostname: hostname.to_string(),
            tty: spec.tty,
            stdin: spec.stdin,
            winsize: spec.winsize,
            create_cwd: false,
            options: spec.options.clone(),
        }
    }
}

/// Where a watched process's exit status arrives.
pub type ExitReceiver = mpsc::Receiver<proto::ExitStatus>;

/// A started process.
pub struct Running {
    /// Its pid.
    pub pid: i32,
    /// Its terminal's master side, when it has a terminal.
    pub master: Option<OwnedFd>,
    pumps: Vec<JoinHandle<std::io::Result<u64>>>,
}

impl Running {
    /// Waits until its output has all been relayed (its end of the streams is closed once it
    /// and everything holding them have exited).
    pub fn join_output(self) {
        for p in self.pumps {
            if let Ok(Err(e)) = p.join() {
                crate::log(&format!("output relay: {e}"));
            }
        }
    }
}

/// Runs the container's process to its end and reports it on `control`, then waits for the
/// host's go-ahead to power off.
pub fn run(
    spec: &RunSpec,
    streams: Streams,
    control: &mut UnixStream,
    mut stages: proto::StartStages,
) -> Result<(), String> {
    let mut proc = Proc::container(spec);
    if spec.wait_start {
        if let Err((kind, message)) = prepare(&proc) {
            crate::log(&message);
            end_streams(Some(streams));
            send(control, &Message::StartFailed { kind, message })?;
            return wait_shutdown(control);
        }
        send(control, &Message::Created)?;
        if let Some(signal) = wait_for_start(control, &mut proc)? {
            // Signalled before it ran: it ends as a process that took the signal would.
            end_streams(Some(streams));
            send(control, &Message::Exited(proto::ExitStatus::Signal(signal)))?;
            return wait_shutdown(control);
        }
    }
    let (shutdown_tx, shutdown_rx) = mpsc::channel();
    match start(&proc, Some(streams), false) {
        Err((kind, message)) => {
            crate::log(&message);
            send(control, &Message::StartFailed { kind, message })?;
            spawn_control_reader(control, None, Some(shutdown_tx))?;
        }
        Ok((running, _)) => {
            let pid = running.pid;
            stages.started = crate::boot_ms();
            send(
                control,
                &Message::Started {
                    pid,
                    stages: Some(stages),
                },
            )?;
            spawn_control_reader(
                control,
                Some((pid, running.master.as_ref().map(dup).transpose()?)),
                Some(shutdown_tx),
            )?;
            let status = reaper::reap_until(pid);
            // The container ends with its main process, as with docker: nothing may outlive
            // it and hold its output open (exec processes included).
            let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
            reaper::reap_all();
            running.join_output();
            send(control, &Message::Exited(status))?;
        }
    }
    // Everything is on its way; the host confirms before the VM disappears under it.
    let _ = shutdown_rx.recv_timeout(Duration::from_secs(10));
    Ok(())
}

/// Waits for the host's `Start` (with [`RunSpec::wait_start`]), taking resizes meanwhile;
/// `Some(signal)` if a signal that ends a process came instead.
fn wait_for_start(control: &mut UnixStream, proc: &mut Proc) -> Result<Option<i32>, String> {
    loop {
        match proto::recv(control).map_err(|e| e.to_string())? {
            Message::Start => return Ok(None),
            Message::Resize { rows, cols } => proc.winsize = Some((rows, cols)),
            Message::Signal { signal } | Message::SignalAll { signal } => {
                // Signals whose default action is not to end a process do nothing here.
                let harmless = [libc::SIGCHLD, libc::SIGCONT, libc::SIGURG, libc::SIGWINCH];
                if !harmless.contains(&signal) {
                    return Ok(Some(signal));
                }
            }
            Message::Shutdown => {
                return Err("the host stopped the container before it started".into())
            }
            other => crate::log(&format!("ignoring unexpected message {other:?}")),
        }
    }
}

/// Reports that the container's process cannot run (its root or a mount could not be made),
/// then waits for the host's go-ahead to power off.
pub fn fail(streams: Streams, control: &mut UnixStream, message: String) -> Result<(), String> {
    crate::log(&message);
    end_streams(Some(streams));
    let kind = StartFailure::Other;
    send(control, &Message::StartFailed { kind, message })?;
    wait_shutdown(control)
}

/// Waits (bounded) for the host to say the VM may go.
fn wait_shutdown(control: &mut UnixStream) -> Result<(), String> {
    let _ = control.set_read_timeout(Some(Duration::from_secs(10)));
    while let Ok(msg) = proto::recv(control) {
        if msg == Message::Shutdown {
            break;
        }
    }
    Ok(())
}

struct Prepared {
    program: PathBuf,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    identity: users::Identity,
}

/// Everything that can fail before fork, with docker's classification of the failure.
fn prepare(spec: &Proc) -> Result<Prepared, (StartFailure, String)> {
    let other = |m: String| (StartFailure::Other, m);
    let argv0 = spec
        .argv
        .first()
        .ok_or_else(|| other("no command given".into()))?;
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let identity = users::resolve(&spec.user, &passwd, &group).map_err(other)?;

    let mut env: Vec<(String, String)> = spec
        .env
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.clone(), String::new()),
        })
        .collect();
    let mut default = |key: &str, value: &str| {
        if !env.iter().any(|(k, _)| k == key) {
            env.push((key.to_string(), value.to_string()));
        }
    };
    default("PATH", DEFAULT_PATH);
    default("HOME", &identity.home);
    default(
        "HOSTNAME",
        if spec.hostname.is_empty() {
            "microvm"
        } else {
            &spec.hostname
        },
    );
    if spec.tty {
        default("TERM", "xterm");
    }

    let cwd = PathBuf::from(if spec.cwd.is_empty() { "/" } else { &spec.cwd });
    if !cwd.is_dir() && !spec.create_cwd {
        return Err(other(format!(
            "working directory {}: no such directory",
            cwd.display()
        )));
    }
    if !cwd.is_dir() {
        std::fs::create_dir_all(&cwd)
            .map_err(|e| other(format!("working directory {}: {e}", cwd.display())))?;
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let program = find_program(argv0, &path, &cwd)?;
    Ok(Prepared {
        program,
        env,
        cwd,
        identity,
    })
}

/// Looks `name` up like execvp: a name with a slash is a path, anything else is searched in PATH.
fn find_program(name: &str, path: &str, cwd: &Path) -> Result<PathBuf, (StartFailure, String)> {
    let not_found = || {
        (
            StartFailure::NotFound,
            format!("exec: \"{name}\": executable file not found in $PATH"),
        )
    };
    let candidates: Vec<PathBuf> = if name.contains('/') {
        vec![cwd.join(name)]
    } else {
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(name))
            .collect()
    };
    let mut found_unexecutable = None;
    for c in candidates {
        match std::fs::metadata(&c) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => return Ok(c),
            Ok(_) => found_unexecutable = Some(c),
            Err(_) => {}
        }
    }
    match found_unexecutable {
        Some(c) => Err((
            StartFailure::NotExecutable,
            format!("exec: \"{}\": permission denied", c.display()),
        )),
        None if name.contains('/') => Err((
            StartFailure::NotFound,
            format!("exec: \"{name}\": no such file or directory"),
        )),
        None => Err(not_found()),
    }
}

/// Starts `spec` with its streams on `streams` (none: all three on /dev/null, for `exec -d`);
/// `watched` registers it with the reaper (exec processes: the receiver gets its status), else
/// the caller reaps it. On failure both output streams are ended and the failure is classified
/// as docker would.
pub fn start(
    spec: &Proc,
    streams: Option<Streams>,
    watched: bool,
) -> Result<(Running, Option<ExitReceiver>), (StartFailure, String)> {
    let p = match prepare(spec) {
        Ok(p) => p,
        Err(e) => {
            end_streams(streams);
            return Err(e);
        }
    };
    let mut cmd = Command::new(&p.program);
    cmd.arg0(&spec.argv[0])
        .args(&spec.argv[1..])
        .env_clear()
        .envs(p.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&p.cwd);
    let setup = (|| -> Result<Option<OwnedFd>, String> {
        if streams.is_none() {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            Ok(None)
        } else if spec.tty {
            let size = spec.winsize.map(|(rows, cols)| nix::pty::Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            });
            let pty =
                nix::pty::openpty(size.as_ref(), None).map_err(|e| format!("openpty: {e}"))?;
            let slave = pty.slave;
            cmd.stdin(Stdio::from(dup(&slave)?))
                .stdout(Stdio::from(dup(&slave)?))
                .stderr(Stdio::from(slave));
            Ok(Some(pty.master))
        } else {
            cmd.stdin(if spec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            Ok(None)
        }
    })();
    let master = match setup {
        Ok(m) => m,
        Err(e) => {
            end_streams(streams);
            return Err((StartFailure::Other, e));
        }
    };
    let groups = spec
        .options
        .groups
        .clone()
        .unwrap_or_else(|| p.identity.groups.clone());
    let (uid, gid, tty) = (
        p.identity.uid,
        p.identity.gid,
        spec.tty && streams.is_some(),
    );
    let privileges = privileges::Plan::new(&spec.options);
    // SAFETY: the closure runs in the forked child before exec and only makes raw syscalls
    // (setsid, ioctl, setgroups, setgid, setuid, and those of `Plan::apply_*`), which are
    // async-signal-safe; `groups` and `privileges` were made before fork and are only read.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            privileges.apply_before_setuid()?;
            if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setgid(gid) < 0
                || libc::setuid(uid) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            privileges.apply_after_setuid()
        });
    }

    let spawned = if watched {
        reaper::spawn_watched(|| {
            cmd.spawn().map(|c| {
                let pid = c.id() as i32;
                (c, pid)
            })
        })
        .map(|(c, rx)| (c, Some(rx)))
    } else {
        cmd.spawn().map(|c| (c, None))
    };
    let (mut child, exit) = match spawned {
        Ok(c) => c,
        Err(e) => {
            let kind = match e.kind() {
                std::io::ErrorKind::NotFound => StartFailure::NotFound,
                std::io::ErrorKind::PermissionDenied => StartFailure::NotExecutable,
                _ if e.raw_os_error() == Some(libc::ENOEXEC) => StartFailure::NotExecutable,
                _ => StartFailure::Other,
            };
            end_streams(streams);
            return Err((kind, format!("exec {}: {e}", spec.argv[0])));
        }
    };
    let pid = child.id() as i32;
    // Drop our copies of the terminal's slave side so that the master sees EOF (EIO) when the
    // process and its children are gone.
    drop(cmd);

    let mut pumps = Vec::new();
    let relay = match streams {
        None => Ok(()),
        Some(Streams {
            stdin,
            mut stdout,
            mut stderr,
        }) => (|| -> Result<(), String> {
            match &master {
                Some(master) => {
                    let mut reader = std::fs::File::from(dup(master)?);
                    pumps.push(std::thread::spawn(move || {
                        proto::pump_to_frames(&mut reader, &mut stdout)
                    }));
                    end_stream(stderr);
                    let writer = std::fs::File::from(dup(master)?);
                    relay_stdin(stdin, writer);
                }
                None => {
                    let mut out = child.stdout.take().ok_or("no stdout pipe")?;
                    let mut err = child.stderr.take().ok_or("no stderr pipe")?;
                    pumps.push(std::thread::spawn(move || {
                        proto::pump_to_frames(&mut out, &mut stdout)
                    }));
                    pumps.push(std::thread::spawn(move || {
                        proto::pump_to_frames(&mut err, &mut stderr)
                    }));
                    match child.stdin.take() {
                        Some(w) => relay_stdin(stdin, w),
                        None => relay_stdin(stdin, std::io::sink()),
                    }
                }
            }
            Ok(())
        })(),
    };
    if let Err(e) = relay {
        crate::log(&format!("process {pid}: {e}"));
    }
    Ok((Running { pid, master, pumps }, exit))
}

/// Copies the host's stdin frames into the process, closing its stdin at end of stream.
fn relay_stdin(mut from: UnixStream, mut to: impl Write + Send + 'static) {
    std::thread::spawn(move || {
        // An error here only means the process stopped reading (EPIPE) or the host went away.
        let _ = proto::pump_from_frames(&mut from, &mut to);
    });
}

/// Handles the host's control messages while the process runs and afterwards.
/// `shutdown_tx` is the container's: told when the host says to power off or goes away; an
/// exec's control connection has none.
pub fn spawn_control_reader(
    control: &UnixStream,
    process: Option<(i32, Option<OwnedFd>)>,
    shutdown_tx: Option<mpsc::Sender<()>>,
) -> Result<(), String> {
    let mut control = control
        .try_clone()
        .map_err(|e| format!("control connection: {e}"))?;
    std::thread::spawn(move || loop {
        match proto::recv(&mut control) {
            Ok(Message::Signal { signal }) => {
                if let (Some((pid, _)), Ok(sig)) = (&process, Signal::try_from(signal)) {
                    let _ = kill(Pid::from_raw(*pid), sig);
                }
            }
            Ok(Message::SignalAll { signal }) => {
                // Every process but the agent (kill(-1) from PID 1 spares itself).
                if let Ok(sig) = Signal::try_from(signal) {
                    let _ = kill(Pid::from_raw(-1), sig);
                }
            }
            Ok(Message::Resize { rows, cols }) => {
                if let Some((_, Some(master))) = &process {
                    let ws = libc::winsize {
                        ws_row: rows,
                        ws_col: cols,
                        ws_xpixel: 0,
                        ws_ypixel: 0,
                    };
                    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer; `master` is an
                    // open pty master.
                    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
                }
            }
            Ok(Message::Shutdown) if shutdown_tx.is_some() => {
                // The host asks to power off, also while the process runs: end every process
                // so the reaper returns; the exit record then says SIGKILL.
                if process.is_some() {
                    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
                }
                if let Some(tx) = &shutdown_tx {
                    let _ = tx.send(());
                }
                return;
            }
            Err(_) => {
                if let Some(tx) = &shutdown_tx {
                    let _ = tx.send(());
                }
                return;
            }
            Ok(other) => crate::log(&format!("ignoring unexpected message {other:?}")),
        }
    });
    Ok(())
}

/// Ends both output streams of a process that will not run.
fn end_streams(streams: Option<Streams>) {
    if let Some(s) = streams {
        end_stream(s.stdout);
        end_stream(s.stderr);
    }
}

/// Sends the end-of-stream frame on a stream that will carry nothing (more).
fn end_stream(mut s: UnixStream) {
    let _ = proto::write_frame(&mut s, &[]);
}

pub fn send(control: &mut UnixStream, msg: &Message) -> Result<(), String> {
    proto::send(control, msg).map_err(|e| e.to_string())
}

pub fn dup(fd: &OwnedFd) -> Result<OwnedFd, String> {
    fd.try_clone().map_err(|e| format!("dup: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_lookup_follows_path_like_execvp() {
        let root = std::env::temp_dir().join(format!("microvm-init-test-{}", std::process::id()));
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(bin.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(bin.join("data"), "x").unwrap();
        let path = format!("/nonexistent:{}", bin.display());
        assert_eq!(
            find_program("tool", &path, &root).unwrap(),
            bin.join("tool")
        );
        assert_eq!(
            find_program("data", &path, &root).unwrap_err().0,
            StartFailure::NotExecutable
        );
        assert_eq!(
            find_program("nope", &path, &root).unwrap_err().0,
            StartFailure::NotFound
        );
        assert_eq!(
            find_program("bin/tool", "", &root).unwrap(),
            root.join("bin/tool")
        );
        assert_eq!(
            find_program("./missing", "", &root).unwrap_err().0,
            StartFailure::NotFound
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
