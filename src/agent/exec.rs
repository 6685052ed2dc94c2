//! The host side of `exec` and `top`: connects to the running guest's agent through the VM's
//! hybrid vsock socket (`CONNECT <port>`, then `OK <port>`), asks for another process or the
//! process list, and relays the exec's streams like the container's own.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use microvm_agent_protocol::{self as proto, ExecSpec, Message, Stream};

use super::{join_pumps, quoted, relay, Control, Error, HostIo, Outcome};

/// How long connecting and the agent's first answers may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to guest vsock port `port` through the VM's socket `uds`.
pub fn connect_guest(uds: &Path, port: u32) -> Result<UnixStream, Error> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(SETUP_TIMEOUT))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // One byte at a time: what follows the line is the agent's.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 32 {
        match s.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => {
                if line.starts_with(b"OK ") {
                    return Ok(s);
                }
                break;
            }
            _ => line.push(byte[0]),
        }
    }
    Err(Error::Protocol(format!(
        "the guest did not accept a connection to port {port} (is the container's agent serving exec?): {:?}",
        String::from_utf8_lossy(&line)
    )))
}

/// Runs `spec` in the VM whose vsock socket is `uds`, with its streams on `io`, and waits for
/// its end. `on_control` gets the handle that forwards signals and resizes to it. A detached
/// spec returns once it started.
pub fn run(
    uds: &Path,
    spec: ExecSpec,
    io: HostIo,
    on_control: impl FnOnce(Control),
) -> Result<Outcome, Error> {
    run_observed(uds, spec, io, on_control, |_| {})
}

/// [`run`], also calling `on_started` with the process's guest pid once it runs.
pub fn run_observed(
    uds: &Path,
    spec: ExecSpec,
    io: HostIo,
    on_control: impl FnOnce(Control),
    on_started: impl FnOnce(i32),
) -> Result<Outcome, Error> {
    let (wants_stdin, detach) = (spec.stdin, spec.detach);
    let first = Message::Exec {
        version: proto::VERSION,
        spec,
    };
    run_first(uds, first, wants_stdin, detach, io, on_control, on_started)
}

/// The running container's changes as a layer tar on `io`'s stdout (its processes stopped
/// meanwhile when `pause`); the outcome says whether it is complete (exit 0).
pub fn diff(uds: &Path, pause: bool, io: HostIo) -> Result<Outcome, Error> {
    let first = Message::Commit {
        version: proto::VERSION,
        pause,
    };
    run_first(uds, first, false, false, io, |_| {}, |_| {})
}

/// Runs an exec-like job that `first` asks for.
fn run_first(
    uds: &Path,
    first: Message,
    wants_stdin: bool,
    detach: bool,
    io: HostIo,
    on_control: impl FnOnce(Control),
    on_started: impl FnOnce(i32),
) -> Result<Outcome, Error> {
    let mut on_started = Some(on_started);
    let mut control = connect_guest(uds, proto::EXEC_PORT)?;
    proto::send(&mut control, &first)?;
    let process = match proto::recv(&mut control)? {
        Message::ExecAccepted { process } => process,
        Message::StartFailed { kind, message } => {
            return Ok(Outcome::StartFailed { kind, message })
        }
        Message::Refused { reason } => return Err(Error::Protocol(format!("refused: {reason}"))),
        other => {
            return Err(Error::Protocol(format!(
                "expected an exec answer, got {}",
                quoted(&other)
            )))
        }
    };
    let pumps = if detach {
        Vec::new()
    } else {
        let conns = [Stream::Stdin, Stream::Stdout, Stream::Stderr].map(|stream| {
            let mut c = connect_guest(uds, proto::EXEC_PORT)?;
            proto::send(
                &mut c,
                &Message::ExecStream {
                    version: proto::VERSION,
                    process,
                    stream,
                },
            )?;
            c.set_read_timeout(None)?;
            Ok::<_, Error>(c)
        });
        let [a, b, c] = conns;
        relay(io, wants_stdin, [a?, b?, c?])
    };
    // The process may run for as long as it likes.
    control.set_read_timeout(None)?;
    let mut reader = control.try_clone()?;
    on_control(Control::new(control));
    loop {
        match proto::recv(&mut reader) {
            // Once only.
            Ok(Message::Started { pid, .. }) if on_started.is_some() => {
                tracing::debug!("exec started as guest pid {pid}");
                if let Some(f) = on_started.take() {
                    f(pid);
                }
                if detach {
                    return Ok(Outcome::Exited(proto::ExitStatus::Code(0)));
                }
            }
            Ok(Message::StartFailed { kind, message }) => {
                join_pumps(pumps)?;
                return Ok(Outcome::StartFailed { kind, message });
            }
            Ok(Message::Exited(status)) if status.is_possible() => {
                join_pumps(pumps)?;
                return Ok(Outcome::Exited(status));
            }
            Ok(other) => {
                return Err(Error::Protocol(format!(
                    "unexpected message {}",
                    quoted(&other)
                )))
            }
            Err(proto::Error::Closed) => return Err(Error::GuestEnded),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The processes in the VM whose vsock socket is `uds`: column titles and rows.
pub fn top(uds: &Path) -> Result<(Vec<String>, Vec<Vec<String>>), Error> {
    let mut c = connect_guest(uds, proto::EXEC_PORT)?;
    proto::send(
        &mut c,
        &Message::Top {
            version: proto::VERSION,
        },
    )?;
    match proto::recv(&mut c)? {
        Message::Processes { titles, rows } => Ok((titles, rows)),
        Message::Refused { reason } => Err(Error::Protocol(format!("refused: {reason}"))),
        other => Err(Error::Protocol(format!(
            "expected the process list, got {}",
            quoted(&other)
        ))),
    }
}
