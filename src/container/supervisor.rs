//! A container's supervisor: the one process that owns a run of the container (its VM, the VM's
//! helpers, its control socket, its log) and records its state. It is microvm itself: either
//! the foreground `run`/`start -a` process, or a detached copy of microvm (`microvm supervise`,
//! its own session, no terminal, its messages in `supervisor.log`) that outlives the command that
//! started it. It holds the container's supervisor lock for as long as it lives, so a killed
//! supervisor is seen at once (see [`Container::state`]).

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use microvm_agent_protocol::Message;
use serde::{Deserialize, Serialize};

use super::control::{self, Reply, Request};
use super::error::Error;
use super::launch::{Ended, Launch, Observer, EXIT_MICROVM_ERROR};
use super::logs::{self, LogWriter};
use super::ready;
use super::state::{now, State, Status};
use super::store::{Container, SUPERVISOR_LOG};
use crate::agent::{Control, HostIo};
use crate::backend::Stopper;
use crate::signals::{terminal_size, HostSignals};

/// How long a start request waits for the process to be reported running.
const START_WAIT: Duration = Duration::from_secs(10);
/// How long `stop` waits after SIGKILL before it powers the VM off.
const KILL_GRACE: Duration = Duration::from_secs(1);

/// How a start went, as the supervisor tells the command that started it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Started {
    /// The process runs.
    Running,
    /// The process is ready and waits for a start request (a container with `wait_start`).
    Created,
    /// It did not start (or ended before it was reported): docker's status and why.
    Failed {
        /// Exit status for the command (125, 126, 127, ...).
        code: i32,
        /// One line (more lines follow, for a crashed guest).
        message: String,
    },
}

/// Where the process's streams go besides the log.
pub enum Streams {
    /// The user's terminal (foreground run): stdin relayed, output shown and logged.
    Foreground(HostIo),
    /// Nowhere but the log (a detached supervisor).
    Detached,
    /// Streams an engine gave us (`microvm-runtime`: conmon's pipes, a terminal), not logged:
    /// the engine keeps the container's log.
    Inherited(HostIo),
}

/// Hears once how the start went.
pub type ReadyFn = Box<dyn FnOnce(Started) + Send>;

/// What the supervisor shares with the threads acting on the run.
struct Live {
    container: Container,
    stopper: Mutex<Option<Stopper>>,
    control: Mutex<Option<Control>>,
    ended: AtomicBool,
    /// The process is created and waits for its start (cleared by the start).
    created: AtomicBool,
    /// `stop` or a host signal had to power the VM off: the run ended by that signal
    /// ([`Live::forced_by`]), not by a crash.
    forced: AtomicBool,
    /// The signal the run is reported killed by when forced: SIGKILL for `stop`, the host's
    /// SIGINT, SIGTERM or SIGHUP when one of those powered it off; 0 until then.
    forced_by: AtomicI32,
    state: Mutex<State>,
    ready: Mutex<Option<ReadyFn>>,
}

impl Live {
    fn update(&self, f: impl FnOnce(&mut State)) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
        if let Err(e) = self.container.write_state(&s) {
            tracing::warn!("{e}");
        }
    }

    fn report(&self, started: Started) {
        let ready = self.ready.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(ready) = ready {
            ready(started);
        }
    }

    fn control(&self) -> Option<Control> {
        self.control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Powers the VM off now, or as soon as it has started.
    fn stop_vm(&self) {
        self.stop_vm_by(libc::SIGKILL)
    }

    /// [`Live::stop_vm`], the run reported as ended by `signal`.
    fn stop_vm_by(&self, signal: i32) {
        // Only the first reason counts.
        let _ = self
            .forced_by
            .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
        self.forced.store(true, Ordering::SeqCst);
        if let Some(s) = &*self.stopper.lock().unwrap_or_else(|e| e.into_inner()) {
            s.stop();
        }
    }

    /// Waits up to `d` for the run to end.
    fn wait_end(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        while !self.ended.load(Ordering::SeqCst) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    fn status(&self) -> Status {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).status
    }

    fn stopper(&self) -> Option<Stopper> {
        self.stopper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// An OCI runtime's `start`: lets the created process run.
    fn start(&self) -> Reply {
        let name = &self.container.config.name;
        if !self.container.config.wait_start {
            return Reply::Error(format!(
                "container {name} was not created to wait for a start"
            ));
        }
        if self.created.swap(false, Ordering::SeqCst) {
            if let Some(control) = self.control() {
                control.send(&Message::Start);
                // Answer once it runs (or ended): an engine reads the state right after.
                let deadline = Instant::now() + START_WAIT;
                while self.status() == Status::Created
                    && !self.ended.load(Ordering::SeqCst)
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return Reply::Ok;
            }
        }
        Reply::Error(match self.status() {
            Status::Created => format!("container {name} is still being created"),
            _ => format!("cannot start container {name}: it is not in the created state"),
        })
    }

    /// docker pause / unpause.
    fn pause(&self, pause: bool) -> Reply {
        let name = &self.container.config.name;
        let (from, to) = match pause {
            true => (Status::Running, Status::Paused),
            false => (Status::Paused, Status::Running),
        };
        let status = self.status();
        if status != from {
            return Reply::Error(match (pause, status) {
                (true, Status::Paused) => format!("container {name} is already paused"),
                (false, _) => format!("container {name} is not paused"),
                _ => format!("container {name} is not running"),
            });
        }
        let Some(stopper) = self.stopper() else {
            return Reply::Error(format!("container {name} is not running"));
        };
        let done = if pause {
            stopper.pause()
        } else {
            stopper.resume()
        };
        match done {
            Ok(()) => {
                self.update(|s| s.status = to);
                Reply::Ok
            }
            Err(e) => Reply::Error(format!("container {name}: {e}")),
        }
    }

    /// docker stop: the stop signal, SIGKILL after `timeout`, then the VM powered off. A paused
    /// VM is resumed first, so that its process can take the signal.
    fn stop(self: &Arc<Self>, timeout: Duration) {
        if self.status() == Status::Paused {
            if let Some(s) = self.stopper() {
                let _ = s.resume();
            }
            self.update(|s| s.status = Status::Running);
        }
        self.update(|s| s.stopping = true);
        let live = self.clone();
        std::thread::spawn(move || {
            let Some(control) = live.control() else {
                // Still booting: there is no process to ask.
                live.stop_vm();
                return;
            };
            let signal = live.container.config.stop_signal;
            control.send(&Message::Signal { signal });
            if live.wait_end(timeout) {
                return;
            }
            control.send(&Message::Signal {
                signal: libc::SIGKILL,
            });
            if !live.wait_end(KILL_GRACE) {
                live.stop_vm();
            }
        });
    }

    fn handle(self: &Arc<Self>, req: Request) -> Reply {
        if self.ended.load(Ordering::SeqCst) {
            return Reply::Error(format!(
                "container {} is not running",
                self.container.config.name
            ));
        }
        match req {
            Request::Stop { timeout } if timeout.is_finite() && timeout >= 0.0 => {
                self.stop(Duration::from_secs_f64(timeout.min(1e6)));
                Reply::Ok
            }
            Request::Stop { timeout } => Reply::Error(format!("invalid stop timeout {timeout}")),
            Request::KillAll { signal } if (1..=64).contains(&signal) => match self.control() {
                Some(control) => {
                    control.send(&Message::SignalAll { signal });
                    Reply::Ok
                }
                // Still booting: nothing runs in it yet, so every process ends with the VM.
                None => {
                    self.stop_vm();
                    Reply::Ok
                }
            },
            Request::Kill { signal } if (1..=64).contains(&signal) => match self.control() {
                Some(control) => {
                    control.send(&Message::Signal { signal });
                    Reply::Ok
                }
                None if signal == libc::SIGKILL => {
                    self.stop_vm();
                    Reply::Ok
                }
                None => Reply::Error(format!(
                    "container {} is still starting: its process cannot take signal {signal} yet",
                    self.container.config.name
                )),
            },
            Request::Kill { signal } | Request::KillAll { signal } => {
                Reply::Error(format!("invalid signal {signal}"))
            }
            Request::Start => self.start(),
            Request::Pause => self.pause(true),
            Request::Unpause => self.pause(false),
        }
    }
}

impl Observer for Arc<Live> {
    fn vm_started(&self, stopper: Stopper) {
        *self.stopper.lock().unwrap_or_else(|e| e.into_inner()) = Some(stopper.clone());
        // A `stop` that came while the VM was being built takes effect now (set before the
        // stopper was looked at there, read after it was stored here: one of us stops it).
        if self.forced.load(Ordering::SeqCst) {
            stopper.stop();
        }
    }

    fn session_ready(&self, control: Control) {
        *self.control.lock().unwrap_or_else(|e| e.into_inner()) = Some(control);
    }

    fn process_created(&self) {
        self.created.store(true, Ordering::SeqCst);
        self.report(Started::Created);
    }

    fn process_started(&self, pid: i32) {
        self.update(|s| {
            s.status = Status::Running;
            s.guest_pid = Some(pid);
        });
        self.report(Started::Running);
    }
}

/// A writer that copies into the log and then to the user.
struct Tee<W: Write> {
    log: logs::LogSink,
    user: W,
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.user.write(buf)?;
        self.log.write_all(&buf[..n])?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.user.flush()
    }
}

/// Runs a container to its end in this process: takes the supervisor lock, serves the control
/// socket, boots the VM, relays the streams into the log (and to the user in the foreground),
/// records the state at each step, and removes the container at the end under `--rm`.
/// `ready` hears once whether the process started. `signals`, when given, are the host signals
/// this process takes for the run (see [`relay_signals`]).
pub fn supervise(
    c: &Container,
    streams: Streams,
    winsize: Option<(u16, u16)>,
    ready: ReadyFn,
    signals: Option<HostSignals>,
) -> Result<Ended, Error> {
    let _lock = c.become_supervisor()?;
    let server = control::Server::bind(c)?;
    let io = logged(c, streams)?;
    let mut state = c.state()?;
    state.status = Status::Created;
    state.exit_code = None;
    state.error = None;
    state.finished_at = None;
    state.guest_pid = None;
    state.stopping = false;
    state.started_at = Some(now());
    state.supervisor_pid = Some(std::process::id());
    let live = Arc::new(Live {
        container: c.clone(),
        stopper: Mutex::new(None),
        control: Mutex::new(None),
        ended: AtomicBool::new(false),
        created: AtomicBool::new(false),
        forced: AtomicBool::new(false),
        forced_by: AtomicI32::new(0),
        state: Mutex::new(state),
        ready: Mutex::new(Some(ready)),
    });
    if let Some(signals) = signals {
        relay_signals(live.clone(), signals);
    }
    let ended = match Launch::prepare(c, winsize) {
        Ok(launch) => {
            let run_dir = launch.run_dir().to_owned();
            live.update(|s| s.run_dir = Some(run_dir));
            {
                let live = live.clone();
                server.serve(move |req| live.handle(req))?;
            }
            launch.execute(io, &live)
        }
        Err(message) => Ended {
            code: EXIT_MICROVM_ERROR,
            process_exited: false,
            error: Some(message),
            details: Vec::new(),
            timings: String::new(),
        },
    };
    let mut ended = ended;
    if live.forced.load(Ordering::SeqCst) && !ended.process_exited {
        // `stop` or a host signal powered the VM off: docker reports such a container as
        // killed (by SIGKILL, or 130 for a Ctrl-C).
        let signal = match live.forced_by.load(Ordering::SeqCst) {
            0 => libc::SIGKILL,
            s => s,
        };
        ended.code = 128 + signal;
        ended.error = None;
        ended.details.clear();
    }
    live.ended.store(true, Ordering::SeqCst);
    live.update(|s| {
        s.status = Status::Exited;
        s.exit_code = Some(ended.code);
        s.finished_at = Some(now());
        s.error = ended.error.clone();
        s.run_dir = None;
        s.guest_pid = None;
    });
    live.report(Started::Failed {
        code: ended.code,
        message: ended.error.clone().unwrap_or_else(|| {
            format!(
                "the process exited with status {} before it was reported running",
                ended.code
            )
        }),
    });
    drop(server);
    if c.config.auto_remove {
        if let Err(e) = c.remove() {
            tracing::warn!("--rm: {e}");
        }
    }
    Ok(ended)
}

/// The process's streams with the container's log behind them, except an engine's, which keep
/// their own log (no log file is made for those).
fn logged(c: &Container, streams: Streams) -> Result<HostIo, Error> {
    let open = || LogWriter::open(c.dir()).map_err(|e| Error::Other(e.to_string()));
    Ok(match streams {
        Streams::Inherited(io) => io,
        Streams::Foreground(io) => {
            let log = open()?;
            HostIo {
                stdin: io.stdin,
                stdout: Box::new(Tee {
                    log: log.sink(logs::Stream::Stdout),
                    user: io.stdout,
                }),
                stderr: Box::new(Tee {
                    log: log.sink(logs::Stream::Stderr),
                    user: io.stderr,
                }),
            }
        }
        Streams::Detached => {
            let log = open()?;
            HostIo {
                stdin: Box::new(std::io::empty()),
                stdout: Box::new(log.sink(logs::Stream::Stdout)),
                stderr: Box::new(log.sink(logs::Stream::Stderr)),
            }
        }
    })
}

/// Host signals for a run supervised here (a foreground `run`, the runtime's supervisor under
/// an engine): each goes to the process once it runs (docker's --sig-proxy), a terminal resize
/// to its terminal. A terminating signal (SIGINT, SIGTERM, SIGHUP) that finds no process to
/// take it (the VM still being built or booting, its agent silent) powers the VM off at once,
/// and so does a second one whatever the process made of the first (it may ignore it, or have
/// ended with its output still held open): no phase of a run waits on an uncooperative guest
/// for ever, and the run is reported as ended by that signal (130 for Ctrl-C).
fn relay_signals(live: Arc<Live>, signals: HostSignals) {
    std::thread::spawn(move || {
        let mut terminating = 0u32;
        while let Some(sig) = signals.wait() {
            let control = live.control();
            if sig == libc::SIGWINCH {
                if let (Some(c), Some((rows, cols))) = (&control, terminal_size()) {
                    c.send(&Message::Resize { rows, cols });
                }
                continue;
            }
            if matches!(sig, libc::SIGINT | libc::SIGTERM | libc::SIGHUP) {
                terminating += 1;
                if control.is_none() || terminating > 1 {
                    live.stop_vm_by(sig);
                    continue;
                }
            }
            if let Some(c) = control {
                c.send(&Message::Signal { signal: sig });
            }
        }
    });
}

/// Starts a detached supervisor for `c` (a copy of microvm in its own session, stdio to its
/// log) and waits until it says whether the process started. The caller holds the container's
/// lock, so no other command starts it meanwhile.
pub fn spawn_detached(c: &Container) -> Result<Started, Error> {
    let exe = std::env::current_exe().map_err(Error::io("cannot find", "/proc/self/exe"))?;
    let log_path = c.dir().join(SUPERVISOR_LOG);
    let log = std::fs::File::create(&log_path).map_err(Error::io("cannot create", &log_path))?;
    let log2 = log
        .try_clone()
        .map_err(Error::io("cannot duplicate", &log_path))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--root")
        .arg(crate::host::data_dir())
        .arg("supervise")
        .arg(&c.config.id)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
    let (_, started) = ready::spawn_and_wait(cmd, false)
        .map_err(|e| Error::Other(format!("cannot start the supervisor: {e}")))?;
    started.ok_or_else(|| {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let last = text.lines().last().unwrap_or("no message").to_string();
        Error::Supervisor {
            name: c.config.name.clone(),
            why: format!("ended before the container started: {last}"),
        }
    })
}

/// The body of `microvm supervise ID`: the detached supervisor. Reports its start on the
/// descriptor the starter passed, then supervises until the process ends. SIGTERM and SIGINT
/// (a shutting-down host) stop the container as `microvm stop` would.
pub fn run_detached(c: &Container, signals: crate::signals::HostSignals) -> i32 {
    let ready_pipe = ready::take_pipe();
    let ready = Box::new(move |started: Started| {
        if let Some(pipe) = ready_pipe {
            ready::report(pipe, &started);
        }
    });
    let name = c.config.name.clone();
    let id = c.config.id.clone();
    let stop_container = c.clone();
    std::thread::spawn(move || {
        while let Some(sig) = signals.wait() {
            if sig == libc::SIGTERM || sig == libc::SIGINT {
                let _ = control::request(&stop_container, &Request::Stop { timeout: 10.0 });
            }
        }
    });
    match supervise(c, Streams::Detached, None, ready, None) {
        Ok(ended) => {
            if let Some(e) = &ended.error {
                eprintln!("microvm: container {name} ({id}): {e}");
                for l in &ended.details {
                    eprintln!("{l}");
                }
            }
            ended.code
        }
        Err(e) => {
            eprintln!("microvm: container {name}: {e}");
            EXIT_MICROVM_ERROR
        }
    }
}
