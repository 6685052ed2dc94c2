//! `exec` and `top` in the running container: the agent listens on [`proto::EXEC_PORT`] and
//! serves each host connection by its first frame. An exec's control connection gets a process
//! number; its three stream connections name it; once all three are in, the process starts
//! like the container's own (same user, program and stream rules) and its status is reported
//! when the reaper hands it over. Every wait here is bounded, and a connection that breaks the
//! protocol is dropped without touching anything else.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use microvm_agent_protocol::{self as proto, ExecSpec, Message, StartFailure, Stream};
use nix::sys::socket::{accept, bind, Backlog, VsockAddr};

use crate::process::{self, Proc, Streams};

/// How long a new connection may take to say what it is, and an exec to get its streams.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Execs accepted, waiting for their stream connections.
struct Pending {
    streams: [Option<UnixStream>; 3],
}

struct Registry {
    next: u32,
    /// Accepted and not yet ended.
    live: usize,
    pending: Option<HashMap<u32, Pending>>,
}

impl Registry {
    fn pending(&mut self) -> &mut HashMap<u32, Pending> {
        self.pending.get_or_insert_with(HashMap::new)
    }
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next: 1,
    live: 0,
    pending: None,
});
static ARRIVED: Condvar = Condvar::new();

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn slot(stream: Stream) -> usize {
    match stream {
        Stream::Stdin => 0,
        Stream::Stdout => 1,
        Stream::Stderr => 2,
    }
}

/// Starts listening for the host's exec and top connections.
pub fn listen(hostname: String) -> Result<(), String> {
    let fd = crate::vsock_socket()?;
    bind(
        fd.as_raw_fd(),
        &VsockAddr::new(libc::VMADDR_CID_ANY, proto::EXEC_PORT),
    )
    .map_err(|e| format!("vsock bind port {}: {e}", proto::EXEC_PORT))?;
    nix::sys::socket::listen(&fd, Backlog::new(16).unwrap_or(Backlog::MAXCONN))
        .map_err(|e| format!("vsock listen: {e}"))?;
    std::thread::spawn(move || loop {
        match accept(fd.as_raw_fd()) {
            Ok(raw) => {
                // SAFETY: accept returned a new descriptor that nothing else owns.
                let conn = crate::stream_from(unsafe {
                    <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw)
                });
                let hostname = hostname.clone();
                std::thread::spawn(move || serve(conn, &hostname));
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                crate::log(&format!("exec listener: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    Ok(())
}

fn serve(mut conn: UnixStream, hostname: &str) {
    let _ = conn.set_read_timeout(Some(SETUP_TIMEOUT));
    let first = match proto::recv(&mut conn) {
        Ok(m) => m,
        Err(_) => return,
    };
    let version = match &first {
        Message::Exec { version, .. }
        | Message::ExecStream { version, .. }
        | Message::Commit { version, .. }
        | Message::Top { version } => *version,
        _ => return,
    };
    if version != proto::VERSION {
        let reason = format!("agent speaks protocol {}, host {version}", proto::VERSION);
        let _ = proto::send(&mut conn, &Message::Refused { reason });
        return;
    }
    match first {
        Message::Exec { spec, .. } => exec(conn, Job::Process(&spec), hostname),
        Message::Commit { pause, .. } => exec(conn, Job::Diff { pause }, hostname),
        Message::ExecStream {
            process, stream, ..
        } => {
            let _ = conn.set_read_timeout(None);
            let mut reg = registry();
            if let Some(p) = reg.pending().get_mut(&process) {
                let s = &mut p.streams[slot(stream)];
                if s.is_none() {
                    *s = Some(conn);
                    ARRIVED.notify_all();
                }
            }
        }
        Message::Top { .. } => {
            let _ = proto::send(&mut conn, &top());
        }
        _ => {}
    }
}

/// What an exec connection runs.
enum Job<'a> {
    /// A process in the container.
    Process(&'a ExecSpec),
    /// The container's changes as a layer (`commit`), its processes stopped meanwhile if asked.
    Diff { pause: bool },
}

/// Writes the diff (if `ready`) as frames on `stdout`, or the error on `stderr`; returns the
/// exit code to report (0: the diff is complete).
pub fn send_diff(ready: Result<(), String>, stdout: UnixStream, stderr: UnixStream) -> i32 {
    let result = ready.and_then(|()| {
        let mut w = crate::diff::FrameWriter::new(stdout);
        crate::diff::write_diff(&mut w)?;
        w.finish().map_err(|e| format!("sending the diff: {e}"))
    });
    let mut err = crate::diff::FrameWriter::new(stderr);
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            crate::log(&format!("diff: {e}"));
            let _ = std::io::Write::write_all(&mut err, e.as_bytes());
            1
        }
    };
    let _ = err.finish();
    code
}

/// Serves one exec (or commit) on its control connection `conn`.
fn exec(mut conn: UnixStream, job: Job, hostname: &str) {
    let spec = match job {
        Job::Process(spec) => spec,
        Job::Diff { .. } => &ExecSpec::default(),
    };
    let process = {
        let mut reg = registry();
        if reg.live >= proto::MAX_EXECS {
            drop(reg);
            let message = format!(
                "too many exec processes at once (at most {})",
                proto::MAX_EXECS
            );
            let _ = proto::send(
                &mut conn,
                &Message::StartFailed {
                    kind: StartFailure::Other,
                    message,
                },
            );
            return;
        }
        reg.live += 1;
        let id = reg.next;
        reg.next = reg.next.wrapping_add(1).max(1);
        reg.pending().insert(
            id,
            Pending {
                streams: [None, None, None],
            },
        );
        id
    };
    let _guard = LiveGuard(process);
    if proto::send(&mut conn, &Message::ExecAccepted { process }).is_err() {
        return;
    }
    if spec.detach {
        // No streams, no status: it runs on by itself, and the reaper drops its status.
        let message = match process::start(&Proc::exec(spec, hostname), None, true) {
            Ok((running, _)) => Message::Started {
                pid: running.pid,
                stages: None,
            },
            Err((kind, message)) => Message::StartFailed { kind, message },
        };
        let _ = proto::send(&mut conn, &message);
        return;
    }
    let Some(streams) = wait_streams(process) else {
        let _ = proto::send(
            &mut conn,
            &Message::StartFailed {
                kind: StartFailure::Other,
                message: "the exec's stream connections did not arrive".into(),
            },
        );
        return;
    };
    let _ = conn.set_read_timeout(None);
    if let Job::Diff { pause } = job {
        let started = Message::Started {
            pid: 1,
            stages: None,
        };
        if proto::send(&mut conn, &started).is_err() {
            return;
        }
        let Streams { stdout, stderr, .. } = streams;
        // Every process but us (PID 1) stops; the diff sees one moment of the container.
        if pause {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(-1),
                nix::sys::signal::Signal::SIGSTOP,
            );
        }
        let code = send_diff(Ok(()), stdout, stderr);
        if pause {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(-1),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
        let _ = proto::send(&mut conn, &Message::Exited(proto::ExitStatus::Code(code)));
        return;
    }
    let (running, exit) = match process::start(&Proc::exec(spec, hostname), Some(streams), true) {
        Ok(r) => r,
        Err((kind, message)) => {
            let _ = proto::send(&mut conn, &Message::StartFailed { kind, message });
            return;
        }
    };
    let pid = running.pid;
    if process::send(&mut conn, &Message::Started { pid, stages: None }).is_err() {
        return;
    }
    let master = running.master.as_ref().and_then(|m| process::dup(m).ok());
    let _ = process::spawn_control_reader(&conn, Some((pid, master)), None);
    let status = match exit.map(|rx| rx.recv()) {
        Some(Ok(status)) => status,
        _ => proto::ExitStatus::Code(255),
    };
    running.join_output();
    let _ = proto::send(&mut conn, &Message::Exited(status));
}

/// Takes the exec's three stream connections once they are in, or gives up after the timeout.
fn wait_streams(process: u32) -> Option<Streams> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut reg = registry();
    loop {
        let complete = reg
            .pending()
            .get(&process)
            .is_some_and(|p| p.streams.iter().all(Option::is_some));
        if complete {
            let p = reg.pending().remove(&process)?;
            let [Some(stdin), Some(stdout), Some(stderr)] = p.streams else {
                return None;
            };
            return Some(Streams {
                stdin,
                stdout,
                stderr,
            });
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        reg = ARRIVED
            .wait_timeout(reg, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Frees an exec's place when it ends, however it ends.
struct LiveGuard(u32);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let mut reg = registry();
        reg.live = reg.live.saturating_sub(1);
        reg.pending().remove(&self.0);
    }
}

/// The processes in the VM, from /proc: user id, pid, parent, state, command line.
fn top() -> Message {
    let titles = ["UID", "PID", "PPID", "STAT", "CMD"]
        .map(String::from)
        .to_vec();
    let mut rows = Vec::new();
    let mut pids: Vec<i32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let dir = format!("/proc/{pid}");
        let Ok(stat) = std::fs::read_to_string(format!("{dir}/stat")) else {
            continue;
        };
        // comm may hold spaces and parentheses: the fields after it follow the last ')'.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map_or("", |(_, c)| c);
        let fields: Vec<&str> = tail.split_whitespace().collect();
        let (state, ppid) = (fields.first().copied(), fields.get(1).copied());
        let uid = std::fs::read_to_string(format!("{dir}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|v| v.split_whitespace().next().map(String::from))
            })
            .unwrap_or_default();
        let cmdline = std::fs::read(format!("{dir}/cmdline")).unwrap_or_default();
        let cmd = if cmdline.is_empty() {
            format!("[{comm}]")
        } else {
            String::from_utf8_lossy(&cmdline)
                .trim_end_matches('\0')
                .replace('\0', " ")
        };
        rows.push(vec![
            uid,
            pid.to_string(),
            ppid.unwrap_or("").to_string(),
            state.unwrap_or("").to_string(),
            cmd,
        ]);
    }
    Message::Processes { titles, rows }
}
