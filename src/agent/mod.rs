//! The host side of the agent protocol: listens on the host socket the guest's agent connects
//! to, sends it the run spec, relays the process's streams and signals, and returns how the
//! process ended; [`exec`] does the same for further processes in a running VM.

pub mod exec;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use microvm_agent_protocol::{self as proto, ExitStatus, Message, RunSpec, StartFailure, Stream};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use thiserror::Error;

/// How long the agent may take to say hello on a connection it opened.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Control messages from the agent queued on the host at most (each at most
/// [`proto::MAX_CONTROL_FRAME`] long).
const CONTROL_QUEUE: usize = 4;

/// Characters of a guest's message quoted in an error at most.
const MAX_QUOTED: usize = 200;

/// Errors of an agent session.
#[derive(Debug, Error)]
pub enum Error {
    /// The listening socket could not be set up.
    #[error("cannot listen for the guest agent on {path}: {source}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The VM ended before the agent reported an exit status.
    #[error("the guest ended before its agent reported the command's exit status")]
    GuestEnded,
    /// Host and guest speak different protocol versions.
    #[error("the guest agent speaks protocol version {guest}, this microvm speaks {host}: rebuild microvm and its guest image together")]
    VersionMismatch {
        /// The agent's version.
        guest: u32,
        /// Ours.
        host: u32,
    },
    /// The agent broke the protocol.
    #[error("guest agent: {0}")]
    Protocol(String),
    /// Local I/O failed.
    #[error("guest agent connection: {0}")]
    Io(#[from] std::io::Error),
}

impl From<proto::Error> for Error {
    fn from(e: proto::Error) -> Self {
        Error::Protocol(e.to_string())
    }
}

/// The socket the agent connects to, bound before the guest boots.
pub struct Listener {
    inner: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// Binds `path` (a stale socket there is replaced).
    pub fn bind(path: &Path) -> Result<Self, Error> {
        let err = |source| Error::Listen {
            path: path.to_owned(),
            source,
        };
        if std::fs::symlink_metadata(path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        {
            std::fs::remove_file(path).map_err(err)?;
        }
        let inner = UnixListener::bind(path).map_err(err)?;
        Ok(Listener {
            inner,
            path: path.to_owned(),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Becomes readable (end of file) when the VM has ended: its other end is held by whoever waits
/// for the VM and dropped when the VM is gone.
pub struct VmWatch(pub UnixStream);

impl VmWatch {
    /// A watch and the guard whose drop signals the VM's end.
    pub fn new() -> std::io::Result<(VmWatch, UnixStream)> {
        let (a, b) = UnixStream::pair()?;
        Ok((VmWatch(a), b))
    }

    fn ended(&self) -> bool {
        let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
    }
}

/// The host's ends of the process's standard streams.
pub struct HostIo {
    /// Source of the process's stdin (read only when the spec asks for stdin).
    pub stdin: Box<dyn Read + Send>,
    /// Destination of its stdout.
    pub stdout: Box<dyn Write + Send>,
    /// Destination of its stderr.
    pub stderr: Box<dyn Write + Send>,
}

impl HostIo {
    /// This process's own standard streams.
    pub fn terminal() -> HostIo {
        HostIo {
            stdin: Box::new(std::io::stdin()),
            stdout: Box::new(std::io::stdout()),
            stderr: Box::new(std::io::stderr()),
        }
    }
}

/// How the process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It ran and ended.
    Exited(ExitStatus),
    /// It could not start.
    StartFailed {
        /// Docker's classification.
        kind: StartFailure,
        /// One line for the user.
        message: String,
    },
}

/// What the agent reports of the process before it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Ready, waiting for [`Message::Start`] (a spec with `wait_start`).
    Created,
    /// Running as this pid in the guest.
    Started(i32),
}

/// Sends control messages (signals, resizes, shutdown) from any thread.
#[derive(Clone)]
pub struct Control(Arc<Mutex<UnixStream>>);

impl Control {
    fn new(conn: UnixStream) -> Control {
        Control(Arc::new(Mutex::new(conn)))
    }

    /// Sends one message; errors mean the agent is gone and are left to the session to notice.
    pub fn send(&self, msg: &Message) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = proto::send(&mut *s, msg);
    }
}

/// When the process started and when its end (and all its output) arrived, as time since
/// microvm started.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessTimes {
    /// The agent reported the process started.
    pub started: Option<Duration>,
    /// The exit status and every stream's end arrived.
    pub ended: Option<Duration>,
    /// The agent's own stage times before the process started (guest clock).
    pub guest: Option<proto::StartStages>,
}

/// A session that has handed the spec to the agent and relays the streams.
pub struct Session {
    ready: Duration,
    boot: proto::BootStages,
    control: Control,
    events: mpsc::Receiver<Message>,
    pumps: Vec<JoinHandle<Result<u64, proto::Error>>>,
}

impl Session {
    /// Waits for the agent, checks its version, sends `spec` and starts relaying `io`.
    pub fn start(
        listener: &Listener,
        watch: &VmWatch,
        spec: RunSpec,
        io: HostIo,
    ) -> Result<Session, Error> {
        let wants_stdin = spec.stdin;
        Session::start_with(listener, watch, Message::Run(spec), wants_stdin, io)
    }

    /// [`Session::start`] with another first message (a [`Message::Diff`]).
    pub fn start_with(
        listener: &Listener,
        watch: &VmWatch,
        first: Message,
        wants_stdin: bool,
        io: HostIo,
    ) -> Result<Session, Error> {
        let mut control = accept(listener, watch)?;
        let boot = match proto::recv(&mut control)? {
            Message::Hello { version, boot } if version == proto::VERSION => boot,
            Message::Hello { version, .. } => {
                let reason = format!("host speaks protocol {}, agent {version}", proto::VERSION);
                let _ = proto::send(&mut control, &Message::Refused { reason });
                return Err(Error::VersionMismatch {
                    guest: version,
                    host: proto::VERSION,
                });
            }
            other => {
                return Err(Error::Protocol(format!(
                    "expected a hello, got {}",
                    quoted(&other)
                )))
            }
        };
        control.set_read_timeout(None)?;
        let ready = crate::timing::since_start();
        tracing::info!(
            "guest agent ready {:.1} ms after start",
            ready.as_secs_f64() * 1e3
        );
        proto::send(&mut control, &first)?;

        let (mut stdin_conn, mut stdout_conn, mut stderr_conn) = (None, None, None);
        for _ in 0..3 {
            let mut conn = accept(listener, watch)?;
            let hello = proto::recv_stream_hello(&mut conn)?;
            conn.set_read_timeout(None)?;
            let slot = match hello.stream {
                Stream::Stdin => &mut stdin_conn,
                Stream::Stdout => &mut stdout_conn,
                Stream::Stderr => &mut stderr_conn,
            };
            if slot.replace(conn).is_some() {
                return Err(Error::Protocol(format!(
                    "two connections for {:?}",
                    hello.stream
                )));
            }
        }
        let missing = || Error::Protocol("a stream connection is missing".into());
        let (stdin_conn, stdout_conn, stderr_conn) = (
            stdin_conn.ok_or_else(missing)?,
            stdout_conn.ok_or_else(missing)?,
            stderr_conn.ok_or_else(missing)?,
        );

        let pumps = relay(io, wants_stdin, [stdin_conn, stdout_conn, stderr_conn]);

        // Bounded: a guest that floods the control connection waits on its own socket buffer
        // once these few messages are queued, instead of growing host memory. The reader stops
        // at the first message after which the protocol allows no more (an end, or one that
        // does not belong), so nothing is read past that point at all.
        let (tx, events) = mpsc::sync_channel(CONTROL_QUEUE);
        let mut reader = control.try_clone()?;
        std::thread::spawn(move || {
            while let Ok(msg) = proto::recv(&mut reader) {
                let more = matches!(msg, Message::Created | Message::Started { .. });
                if tx.send(msg).is_err() || !more {
                    return;
                }
            }
        });
        Ok(Session {
            ready,
            boot,
            control: Control(Arc::new(Mutex::new(control))),
            events,
            pumps,
        })
    }

    /// When the agent's hello arrived, as time since microvm started.
    pub fn ready_at(&self) -> Duration {
        self.ready
    }

    /// When the guest's kernel handed over to the agent and the agent said hello (guest clock).
    pub fn boot_stages(&self) -> proto::BootStages {
        self.boot
    }

    /// A sender for signals and terminal resizes.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Waits until the process has ended and all its output has arrived, then tells the agent to
    /// power off. Fails if the VM ends first.
    pub fn finish(self, watch: &VmWatch) -> Result<Outcome, Error> {
        self.finish_timed(watch).map(|(outcome, _)| outcome)
    }

    /// [`Session::finish`], also returning when the process started and ended.
    pub fn finish_timed(self, watch: &VmWatch) -> Result<(Outcome, ProcessTimes), Error> {
        self.finish_observed(watch, &mut |_| {})
    }

    /// [`Session::finish_timed`], calling `on_progress` when the agent reports the process
    /// created (ready to start) or started.
    pub fn finish_observed(
        self,
        watch: &VmWatch,
        on_progress: &mut dyn FnMut(Progress),
    ) -> Result<(Outcome, ProcessTimes), Error> {
        let (mut started, mut guest, mut created) = (None, None, false);
        let outcome = loop {
            match self.events.recv_timeout(Duration::from_millis(50)) {
                Ok(Message::Exited(status)) if status.is_possible() => {
                    break Outcome::Exited(status)
                }
                Ok(Message::StartFailed { kind, message }) => {
                    break Outcome::StartFailed { kind, message }
                }
                // Each once, creation first.
                Ok(Message::Started { pid, stages }) if started.is_none() => {
                    started = Some(crate::timing::since_start());
                    guest = stages;
                    on_progress(Progress::Started(pid));
                }
                Ok(Message::Created) if !created && started.is_none() => {
                    created = true;
                    on_progress(Progress::Created);
                }
                Ok(other) => {
                    return Err(Error::Protocol(format!(
                        "unexpected message {}",
                        quoted(&other)
                    )))
                }
                Err(mpsc::RecvTimeoutError::Timeout) if !watch.ended() => {}
                Err(_) => return Err(Error::GuestEnded),
            }
        };
        // Nothing more is read from the control connection (see `start_with`).
        drop(self.events);
        // The agent ends each stream before reporting the exit, so these finish promptly.
        join_pumps(self.pumps)?;
        let ended = Some(crate::timing::since_start());
        self.control.send(&Message::Shutdown);
        Ok((
            outcome,
            ProcessTimes {
                started,
                ended,
                guest,
            },
        ))
    }
}

/// `msg` for an error message, cut short: a hostile agent's message may be a megabyte.
fn quoted(msg: &Message) -> String {
    let text = format!("{msg:?}");
    match text.char_indices().nth(MAX_QUOTED) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// The relay threads of one process's streams (stdin, stdout, stderr connections, in that
/// order): output pumps to be joined; stdin's pump, which may block on the user's terminal
/// forever, is never joined.
fn relay(
    io: HostIo,
    wants_stdin: bool,
    conns: [UnixStream; 3],
) -> Vec<JoinHandle<Result<u64, proto::Error>>> {
    let HostIo {
        mut stdin,
        mut stdout,
        mut stderr,
    } = io;
    let [mut stdin_conn, mut stdout_conn, mut stderr_conn] = conns;
    std::thread::spawn(move || {
        if wants_stdin {
            let _ = proto::pump_to_frames(&mut stdin, &mut stdin_conn);
        } else {
            let _ = proto::write_frame(&mut stdin_conn, &[]);
        }
    });
    vec![
        std::thread::spawn(move || proto::pump_from_frames(&mut stdout_conn, &mut stdout)),
        std::thread::spawn(move || proto::pump_from_frames(&mut stderr_conn, &mut stderr)),
    ]
}

/// Joins output pumps; the first failure is the result.
fn join_pumps(pumps: Vec<JoinHandle<Result<u64, proto::Error>>>) -> Result<(), Error> {
    for p in pumps {
        match p.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(Error::Protocol("a stream relay panicked".into())),
        }
    }
    Ok(())
}

/// Accepts the agent's next connection, unless the VM ends first.
fn accept(listener: &Listener, watch: &VmWatch) -> Result<UnixStream, Error> {
    loop {
        let mut fds = [
            PollFd::new(listener.inner.as_fd(), PollFlags::POLLIN),
            PollFd::new(watch.0.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Error::Io(e.into())),
        }
        if fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN))
        {
            let (conn, _) = listener.inner.accept()?;
            conn.set_read_timeout(Some(HELLO_TIMEOUT))?;
            return Ok(conn);
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return Err(Error::GuestEnded);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn socket_path() -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        std::env::temp_dir().join(format!(
            "microvm-agent-test-{}-{n}.sock",
            std::process::id()
        ))
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn io(out: &Sink, err: &Sink) -> HostIo {
        HostIo {
            stdin: Box::new(std::io::empty()),
            stdout: Box::new(out.clone()),
            stderr: Box::new(err.clone()),
        }
    }

    /// Connects as the agent would and says hello with `version`.
    fn fake_agent_hello(path: &Path, version: u32) -> UnixStream {
        let mut control = UnixStream::connect(path).unwrap();
        let boot = proto::BootStages {
            init: 700,
            hello: 750,
        };
        proto::send(&mut control, &Message::Hello { version, boot }).unwrap();
        control
    }

    /// The host's side of a VM: the agent's socket, the VM's watch and its guard (dropped, the VM
    /// has ended), with a fake agent running `agent` on its own thread (given the socket).
    struct FakeVm<T> {
        listener: Listener,
        watch: VmWatch,
        guard: UnixStream,
        agent: JoinHandle<T>,
    }

    fn fake_vm<T: Send + 'static>(agent: impl FnOnce(&Path) -> T + Send + 'static) -> FakeVm<T> {
        let path = socket_path();
        let listener = Listener::bind(&path).unwrap();
        let (watch, guard) = VmWatch::new().unwrap();
        let agent = std::thread::spawn(move || agent(&path));
        FakeVm {
            listener,
            watch,
            guard,
            agent,
        }
    }

    /// Opens the agent's stdin, stdout and stderr connections, in that order.
    fn fake_agent_streams(path: &Path) -> [UnixStream; 3] {
        [Stream::Stdin, Stream::Stdout, Stream::Stderr].map(|s| {
            let mut c = UnixStream::connect(path).unwrap();
            proto::send_stream_hello(&mut c, s).unwrap();
            c
        })
    }

    #[test]
    fn a_whole_session_against_a_fake_agent() {
        let vm = fake_vm(|agent_path| {
            let mut control = fake_agent_hello(agent_path, proto::VERSION);
            let Message::Run(spec) = proto::recv(&mut control).unwrap() else {
                panic!("no spec")
            };
            let [mut stdin, mut stdout, mut stderr] = fake_agent_streams(agent_path);
            proto::pump_to_frames(&mut &b"hello out"[..], &mut stdout).unwrap();
            proto::pump_to_frames(&mut &b"hello err"[..], &mut stderr).unwrap();
            let mut received = Vec::new();
            proto::pump_from_frames(&mut stdin, &mut received).unwrap();
            let stages = proto::StartStages {
                run: 751,
                root: 760,
                started: 770,
            };
            let started = Message::Started {
                pid: 7,
                stages: Some(stages),
            };
            proto::send(&mut control, &started).unwrap();
            proto::send(&mut control, &Message::Exited(ExitStatus::Code(3))).unwrap();
            (spec, received, proto::recv(&mut control).unwrap())
        });
        let (out, err) = (Sink::default(), Sink::default());
        let spec = RunSpec {
            argv: vec!["x".into()],
            ..Default::default()
        };
        let session =
            Session::start(&vm.listener, &vm.watch, spec.clone(), io(&out, &err)).unwrap();
        assert_eq!(session.boot_stages().init, 700);
        let (outcome, times) = session.finish_timed(&vm.watch).unwrap();
        assert_eq!(outcome, Outcome::Exited(ExitStatus::Code(3)));
        assert_eq!(times.guest.map(|g| g.root), Some(760));
        assert_eq!(&*out.0.lock().unwrap(), b"hello out");
        assert_eq!(&*err.0.lock().unwrap(), b"hello err");
        let (got_spec, stdin, last) = vm.agent.join().unwrap();
        assert_eq!(got_spec, spec);
        assert!(stdin.is_empty(), "no -i: the agent gets an empty stdin");
        assert_eq!(last, Message::Shutdown);
    }

    #[test]
    fn a_guest_flooding_control_messages_after_its_exit_is_not_read() {
        let vm = fake_vm(|agent_path| {
            let mut control = fake_agent_hello(agent_path, proto::VERSION);
            proto::recv(&mut control).unwrap();
            let [_stdin, mut stdout, mut stderr] = fake_agent_streams(agent_path);
            proto::write_frame(&mut stderr, &[]).unwrap();
            proto::send(&mut control, &Message::Exited(ExitStatus::Code(0))).unwrap();
            // stdout stays open while megabyte messages follow: the host must stop reading
            // (the unbounded queue grew by a megabyte for each, about 2 GB for 2,000).
            control
                .set_write_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let big = Message::StartFailed {
                kind: StartFailure::Other,
                message: "x".repeat(proto::MAX_CONTROL_FRAME - 100),
            };
            let sent = (0..64)
                .take_while(|_| proto::send(&mut control, &big).is_ok())
                .count();
            proto::write_frame(&mut stdout, &[]).unwrap();
            sent
        });
        let (out, err) = (Sink::default(), Sink::default());
        let session =
            Session::start(&vm.listener, &vm.watch, RunSpec::default(), io(&out, &err)).unwrap();
        let outcome = session.finish(&vm.watch).unwrap();
        assert_eq!(outcome, Outcome::Exited(ExitStatus::Code(0)));
        let sent = vm.agent.join().unwrap();
        assert!(
            sent < 8,
            "the host read {sent} MiB of messages after the exit"
        );
    }

    #[test]
    fn messages_out_of_order_end_the_session() {
        for script in [
            vec![
                Message::Started {
                    pid: 1,
                    stages: None,
                },
                Message::Created,
            ],
            vec![
                Message::Started {
                    pid: 1,
                    stages: None,
                },
                Message::Started {
                    pid: 2,
                    stages: None,
                },
            ],
            vec![Message::Created, Message::Created],
            vec![Message::Shutdown],
            // 128 + this overflowed.
            vec![Message::Exited(ExitStatus::Signal(i32::MAX))],
            vec![Message::Exited(ExitStatus::Code(-1))],
        ] {
            let sent = script.clone();
            let vm = fake_vm(move |agent_path| {
                let mut control = fake_agent_hello(agent_path, proto::VERSION);
                proto::recv(&mut control).unwrap();
                let conns = fake_agent_streams(agent_path);
                for m in &sent {
                    proto::send(&mut control, m).unwrap();
                }
                (control, conns)
            });
            let (out, err) = (Sink::default(), Sink::default());
            let session =
                Session::start(&vm.listener, &vm.watch, RunSpec::default(), io(&out, &err))
                    .unwrap();
            let e = session.finish(&vm.watch).err().unwrap();
            assert!(
                e.to_string().contains("unexpected message"),
                "{script:?}: {e}"
            );
            drop(vm.agent.join().unwrap());
        }
    }

    #[test]
    fn a_huge_unexpected_message_is_quoted_short() {
        let msg = Message::Refused {
            reason: "y".repeat(1 << 20),
        };
        let q = quoted(&msg);
        assert!(
            q.len() < MAX_QUOTED + 10 && q.ends_with("..."),
            "{}",
            q.len()
        );
        assert_eq!(quoted(&Message::Created), "Created");
    }

    #[test]
    fn a_version_mismatch_is_refused_clearly() {
        let vm = fake_vm(|agent_path| {
            let mut control = fake_agent_hello(agent_path, proto::VERSION + 1);
            proto::recv(&mut control).unwrap()
        });
        let (out, err) = (Sink::default(), Sink::default());
        let e = Session::start(&vm.listener, &vm.watch, RunSpec::default(), io(&out, &err))
            .err()
            .unwrap();
        assert!(
            matches!(e, Error::VersionMismatch { guest, host } if guest == proto::VERSION + 1 && host == proto::VERSION)
        );
        assert!(e.to_string().contains("rebuild"), "{e}");
        assert!(matches!(vm.agent.join().unwrap(), Message::Refused { .. }));
    }

    #[test]
    fn a_vm_that_ends_before_its_agent_is_reported() {
        let listener = Listener::bind(&socket_path()).unwrap();
        let (watch, guard) = VmWatch::new().unwrap();
        drop(guard);
        let (out, err) = (Sink::default(), Sink::default());
        let e = Session::start(&listener, &watch, RunSpec::default(), io(&out, &err))
            .err()
            .unwrap();
        assert!(matches!(e, Error::GuestEnded), "{e}");
    }

    #[test]
    fn an_agent_that_dies_mid_run_is_reported() {
        let vm = fake_vm(|agent_path| {
            let mut control = fake_agent_hello(agent_path, proto::VERSION);
            proto::recv(&mut control).unwrap();
            // The VM goes away: connections close, then the VM ends.
            drop(fake_agent_streams(agent_path));
            drop(control);
        });
        let (out, err) = (Sink::default(), Sink::default());
        let session =
            Session::start(&vm.listener, &vm.watch, RunSpec::default(), io(&out, &err)).unwrap();
        vm.agent.join().unwrap();
        drop(vm.guard);
        assert!(matches!(session.finish(&vm.watch), Err(Error::GuestEnded)));
    }
}
