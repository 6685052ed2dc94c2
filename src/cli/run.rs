//! `microvm run`: run a command in its own VM, docker-style. Until image support lands, the
//! container's root is a host directory given with `--rootfs DIR` (as podman spells it), copied
//! into the guest's initramfs: changes inside stay inside.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use microvm_agent_protocol::{self as proto, Message, RunSpec, StartFailure};
use nix::sys::signal::Signal;

use super::signals::HostSignals;
use super::{error_line, EXIT_MICROVM_ERROR, EXIT_TIMEOUT};
use crate::agent::{self, HostIo, Listener, Outcome, Session};
use crate::backend::{self, Hypervisor, RunningVm, VmEnd};
use crate::plan::{Console, VmPlan, VsockPlan, GUEST_CID};

/// Kernel options every run uses: console on COM1 (kept for crash reports), quiet, and no
/// reboot loop on panic: the VM ends and the host reports the crash.
const BASE_CMDLINE: &str = "console=ttyS0 quiet panic=-1";
/// Environment every process starts with, as docker gives it.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Console lines shown when the guest crashes.
const CONSOLE_TAIL: usize = 20;

/// Flags of `microvm run`.
#[derive(Debug, Args)]
#[command(trailing_var_arg = true)]
pub struct RunArgs {
    /// The first argument is a directory to use as the container's root (copied into the VM).
    #[arg(long)]
    pub rootfs: bool,
    /// Keep stdin open and relay it to the process.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the process a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable (KEY=VALUE, or KEY to take it from here).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// User to run as: name, uid, name:group or uid:gid (from the container's /etc/passwd).
    #[arg(short, long, value_name = "USER")]
    pub user: Option<String>,
    /// Hostname inside the VM.
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Backend: auto (kvm where it boots the guest at full speed), kvm, or qemu (emulated).
    #[arg(long, value_enum, env = "MICROVM_HYPERVISOR", default_value = "auto")]
    pub hypervisor: Hypervisor,
    /// Guest kernel [default: $MICROVM_KERNEL, then the built kernel].
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u8,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 256)]
    pub memory: u64,
    /// Stop the VM after this many seconds (exit status 124).
    #[arg(long, value_name = "S")]
    pub timeout: Option<f64>,
    /// With --rootfs: the root directory, then the command and its arguments.
    #[arg(value_name = "ROOTFS COMMAND", allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// Runs `microvm run`; returns the exit status.
pub fn run(args: RunArgs) -> i32 {
    // Signals go to the container's process (docker's --sig-proxy); block them before any thread.
    let forwarded = [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGWINCH,
    ];
    let signals = match HostSignals::block(&forwarded) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    match Run::prepare(args) {
        Ok(run) => run.execute(signals),
        Err(e) => fail(e),
    }
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    error_line(msg);
    EXIT_MICROVM_ERROR
}

/// A run with everything resolved and the per-run directory made.
struct Run {
    hypervisor: Hypervisor,
    plan: VmPlan,
    spec: RunSpec,
    run_dir: RunDir,
}

/// The per-run directory (sockets, console log, initrd parts), removed at the end.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Run {
    fn prepare(args: RunArgs) -> Result<Run, String> {
        let mut positional = args.args.into_iter();
        if !args.rootfs {
            return Err(
                "running images is not supported yet: give a root directory with --rootfs DIR"
                    .into(),
            );
        }
        let rootfs = PathBuf::from(positional.next().ok_or("--rootfs needs a directory")?);
        if !rootfs.is_dir() {
            return Err(format!("--rootfs {}: not a directory", rootfs.display()));
        }
        let argv: Vec<String> = positional.collect();
        if argv.is_empty() {
            return Err("no command given: microvm run --rootfs DIR COMMAND [ARG...]".into());
        }
        let timeout = match args.timeout {
            None => None,
            Some(s) if s.is_finite() && s > 0.0 && s < 1e9 => Some(Duration::from_secs_f64(s)),
            Some(s) => {
                return Err(format!(
                    "--timeout must be a positive number of seconds, not {s}"
                ))
            }
        };
        let hypervisor = backend::choose(args.hypervisor)?;
        let kernel = args.kernel.or_else(crate::host::default_kernel).ok_or(
            "no guest kernel found: build it with scripts/build-kernel, or pass --kernel PATH",
        )?;

        let run_dir = new_run_dir()?;
        let base = crate::initramfs::base()
            .map_err(|e| format!("cannot write the boot initramfs: {e}"))?;
        let root_archive = run_dir.0.join("rootfs.cpio");
        crate::initramfs::tree(&rootfs, &root_archive)
            .map_err(|e| format!("cannot pack --rootfs {}: {e}", rootfs.display()))?;

        let mut env = vec![DEFAULT_PATH.to_string()];
        for e in args.env {
            match e.split_once('=') {
                Some(_) => env.push(e),
                // docker: `-e KEY` passes the host's value, and nothing if it is unset.
                None => {
                    if let Ok(v) = std::env::var(&e) {
                        env.push(format!("{e}={v}"));
                    }
                }
            }
        }
        let tty = args.tty;
        let winsize = if tty { terminal_size() } else { None };
        let spec = RunSpec {
            argv,
            env,
            cwd: args.workdir.unwrap_or_else(|| "/".into()),
            user: args.user.unwrap_or_default(),
            hostname: args.hostname.unwrap_or_default(),
            tty,
            stdin: args.interactive,
            winsize,
        };
        let cmdline = format!(
            "{BASE_CMDLINE} {} {}",
            proto::cmdline_args(proto::DEFAULT_PORT),
            backend::cmdline_extra(hypervisor)
        );
        let plan = VmPlan {
            kernel,
            initrd: vec![base, root_archive],
            cmdline,
            cpus: args.cpus,
            memory_mib: args.memory,
            timeout,
            console: Console::File(run_dir.0.join("console.log")),
            vsock: Some(VsockPlan {
                guest_cid: GUEST_CID,
                uds_path: run_dir.0.join("vsock.sock"),
            }),
            disks: Vec::new(),
        };
        Ok(Run {
            hypervisor,
            plan,
            spec,
            run_dir,
        })
    }

    fn execute(self, signals: HostSignals) -> i32 {
        if self.hypervisor == Hypervisor::Qemu {
            error_line("warning: --hypervisor qemu emulates the guest (TCG), which is not a hardware isolation boundary");
        }
        let vsock = self
            .plan
            .vsock
            .as_ref()
            .map(|v| v.uds_path.clone())
            .unwrap_or_default();
        let listener = match Listener::bind(&PathBuf::from(format!(
            "{}_{}",
            vsock.display(),
            proto::DEFAULT_PORT
        ))) {
            Ok(l) => l,
            Err(e) => return fail(e),
        };
        let (vm, watch) = match RunningVm::start(self.hypervisor, &self.plan, &self.run_dir.0) {
            Ok(started) => started,
            Err(e) => return fail(e),
        };
        let raw = self.spec.tty.then(RawTerminal::enable).flatten();
        let io = HostIo {
            stdin: Box::new(std::io::stdin()),
            stdout: Box::new(std::io::stdout()),
            stderr: Box::new(std::io::stderr()),
        };
        let outcome =
            Session::start(&listener, &watch, self.spec.clone(), io).and_then(|session| {
                let control = session.control();
                std::thread::spawn(move || {
                    while let Some(sig) = signals.wait() {
                        if sig == libc::SIGWINCH {
                            if let Some((rows, cols)) = terminal_size() {
                                control.send(&Message::Resize { rows, cols });
                            }
                        } else {
                            control.send(&Message::Signal { signal: sig });
                        }
                    }
                });
                session.finish(&watch)
            });
        drop(raw);
        if outcome.is_err() {
            vm.stop();
        }
        let end = vm.wait(Duration::from_secs(10));
        match (outcome, end) {
            (_, Ok(VmEnd::TimedOut)) => {
                let secs = self.plan.timeout.map_or(0.0, |t| t.as_secs_f64());
                error_line(format!(
                    "the guest was still running after {secs} s (--timeout); stopped it"
                ));
                EXIT_TIMEOUT
            }
            (Ok(Outcome::Exited(status)), _) => status.as_shell_code(),
            (Ok(Outcome::StartFailed { kind, message }), _) => {
                error_line(message);
                match kind {
                    StartFailure::NotFound => 127,
                    StartFailure::NotExecutable => 126,
                    StartFailure::Other => EXIT_MICROVM_ERROR,
                }
            }
            (Err(agent::Error::GuestEnded), end) => {
                let why = match end {
                    Err(e) => format!(": {e}"),
                    Ok(_) => String::new(),
                };
                error_line(format!("the guest crashed before the command's exit status arrived{why}; last console lines:"));
                let console =
                    std::fs::read_to_string(self.run_dir.0.join("console.log")).unwrap_or_default();
                let lines: Vec<&str> = console.lines().collect();
                for l in &lines[lines.len().saturating_sub(CONSOLE_TAIL)..] {
                    eprintln!("  {l}");
                }
                EXIT_MICROVM_ERROR
            }
            (Err(e), _) => fail(e),
        }
    }
}

/// A fresh per-run directory named `<pid>-<nonce>`; directories left by runs that were killed
/// (their pid is gone) are removed on the way.
fn new_run_dir() -> Result<RunDir, String> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = crate::host::runtime_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&parent)
        .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    for entry in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .and_then(|(p, _)| p.parse::<i32>().ok());
        if pid.is_some_and(|p| nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_err())
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = parent.join(format!("{}-{nanos:08x}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(RunDir(dir))
}

/// The host terminal's size, if stdin is one.
fn terminal_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`, which is valid for writes.
    let rc = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// The host terminal in raw mode while a `-t` process owns it; restored on drop.
struct RawTerminal(nix::sys::termios::Termios);

impl RawTerminal {
    fn enable() -> Option<RawTerminal> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.0,
        );
    }
}
