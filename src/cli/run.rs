//! `microvm run`: run a command in its own VM, docker-style. Until image support lands, the
//! container's root is a host directory given with `--rootfs DIR` (as podman spells it), copied
//! into the guest's initramfs: changes inside stay inside.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use microvm_agent_protocol::{self as proto, Message, MountSpec, RootSpec, RunSpec, StartFailure};
use nix::sys::signal::Signal;

use super::signals::HostSignals;
use super::vm_args::VmArgs;
use super::{error_line, EXIT_MICROVM_ERROR, EXIT_TIMEOUT};
use crate::agent::{self, HostIo, Listener, Outcome, Session};
use crate::backend::{self, Hypervisor, RunningVm, VmEnd};
use crate::container;
use crate::plan::{Console, DiskPlan, FsPlan, VmPlan, VsockPlan, GUEST_CID};
use crate::volumes::{self, Kind, Volume};

/// Kernel options every run uses: console on COM1 (kept for crash reports), quiet, and no
/// reboot loop on panic: the VM ends and the host reports the crash.
const BASE_CMDLINE: &str = "console=ttyS0 quiet panic=-1";
/// Console lines shown when the guest crashes.
const CONSOLE_TAIL: usize = 20;

/// Flags of `microvm run`.
#[derive(Debug, Args)]
#[command(trailing_var_arg = true)]
pub struct RunArgs {
    /// The first argument is a directory to use as the container's root (copied into the VM)
    /// instead of an image.
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
    /// Kernel, vCPUs, memory, timeout.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Override the image's entrypoint ("" clears it).
    #[arg(long, value_name = "CMD")]
    pub entrypoint: Option<String>,
    /// Mount a host directory or file: /HOST/PATH:/CONTAINER/PATH[:ro|rw]. The host path must
    /// exist.
    #[arg(short, long = "volume", value_name = "HOST:CONTAINER[:ro]")]
    pub volume: Vec<String>,
    /// Mount a host directory or file, docker's way: type=bind,source=/HOST,target=/CONTAINER
    /// [,readonly].
    #[arg(long, value_name = "type=bind,source=...,target=...")]
    pub mount: Vec<String>,
    /// Read environment variables from a file (KEY=VALUE lines).
    #[arg(long, value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Accepted for docker compatibility: the container's sandbox layer is always discarded.
    #[arg(long)]
    pub rm: bool,
    /// Print how long each phase took (image, plan, boot, agent ready, exec, exit) on stderr.
    #[arg(long)]
    pub timings: bool,
    /// IMAGE (a stored name or a transport reference such as oci:DIR:TAG) or, with --rootfs,
    /// a directory; then the command and its arguments.
    #[arg(value_name = "IMAGE [COMMAND [ARG...]]", allow_hyphen_values = true)]
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
    /// Volumes, one virtiofsd each, in the order of `plan.shares`.
    volumes: Vec<Volume>,
    run_dir: RunDir,
    /// With `--timings`: when the image (or root directory) was ready, since start.
    timings: Option<Duration>,
    /// Keeps the image's layer images from `microvm prune` while the VM runs.
    _lease: Option<crate::image::LayerLease>,
}

/// Process defaults, root to assemble, and the layer lease of an image.
type ImageRoot = (
    container::ImageDefaults,
    Option<RootSpec>,
    Option<crate::image::LayerLease>,
);

/// Serial of the scratch disk (the container's sandbox layer).
const SCRATCH_SERIAL: &str = "scratch";

/// The image's layers as read-only disks (converted on first use) plus a fresh scratch disk, the
/// image's defaults for the process, and the lease that keeps the layer images from pruning.
fn image_root(
    name: &str,
    run_dir: &std::path::Path,
    max_layers: usize,
    disks: &mut Vec<DiskPlan>,
) -> Result<ImageRoot, String> {
    let store = crate::image::Store::open(&crate::host::data_dir()).map_err(|e| e.to_string())?;
    let image = store.resolve(name).map_err(|e| e.to_string())?;
    // Held until the run ends, so that `microvm prune` leaves these layer images alone. Layers
    // beyond what the backend can attach are merged, lowest first.
    let lease = store
        .lease_layer_images_at_most(&image, max_layers)
        .map_err(|e| e.to_string())?;
    let mut serials = Vec::with_capacity(lease.paths().len());
    for (i, path) in lease.paths().iter().enumerate() {
        let serial = format!("layer{i}");
        disks.push(DiskPlan {
            path: path.clone(),
            read_only: true,
            serial: serial.clone(),
        });
        serials.push(serial);
    }
    let scratch = run_dir.join("scratch.img");
    crate::scratch::create(&scratch).map_err(|e| format!("cannot make the scratch disk: {e}"))?;
    disks.push(DiskPlan {
        path: scratch,
        read_only: false,
        serial: SCRATCH_SERIAL.into(),
    });
    let c = image.config;
    let defaults = container::ImageDefaults {
        entrypoint: c.entrypoint,
        cmd: c.cmd,
        env: c.env,
        working_dir: c.working_dir,
        user: c.user,
    };
    let root = RootSpec {
        layers: serials,
        scratch: SCRATCH_SERIAL.into(),
    };
    Ok((defaults, Some(root), Some(lease)))
}

/// The virtio-fs tag of volume `i`.
fn share_tag(i: usize) -> String {
    format!("microvm{i}")
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
        let first = positional.next().ok_or(if args.rootfs {
            "--rootfs needs a directory: microvm run --rootfs DIR COMMAND [ARG...]"
        } else {
            "no image given: microvm run IMAGE [COMMAND [ARG...]]"
        })?;
        let cmd: Vec<String> = positional.collect();
        let timeout = args.vm.timeout()?;
        let volumes = volumes::parse_all(&args.volume, &args.mount).map_err(|e| e.to_string())?;
        let mut env = Vec::new();
        for e in args.env {
            match e.split_once('=') {
                Some(_) => env.push(e),
                // docker: `-e KEY` passes the host's value, and nothing if it is unset.
                None => env.extend(std::env::var(&e).ok().map(|v| format!("{e}={v}"))),
            }
        }
        for file in &args.env_file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("--env-file {}: {e}", file.display()))?;
            env.extend(container::parse_env_file(&text, |k| std::env::var(k).ok()));
        }
        let overrides = container::Overrides {
            entrypoint: args.entrypoint,
            cmd,
            env,
            workdir: args.workdir,
            user: args.user,
        };
        let hypervisor = backend::choose(args.hypervisor)?;
        let kernel = args.vm.kernel()?;

        let slots = match hypervisor {
            Hypervisor::Qemu => backend::qemu::TRANSPORTS,
            _ => crate::vmm::virtio::MAX_DEVICES as usize,
        };
        // vsock, and for an image the scratch disk and at least one layer.
        let fixed = if args.rootfs { 1 } else { 3 };
        if volumes.len() + fixed > slots {
            return Err(format!(
                "{} volumes are more than this backend can attach (at most {})",
                volumes.len(),
                slots - fixed
            ));
        }

        let run_dir = new_run_dir()?;
        let base = crate::initramfs::base()
            .map_err(|e| format!("cannot write the boot initramfs: {e}"))?;
        let mut initrd = vec![base];
        let mut disks = Vec::new();
        let (defaults, root, lease) = if args.rootfs {
            if !Path::new(&first).is_dir() {
                return Err(format!("--rootfs {first}: not a directory"));
            }
            (container::ImageDefaults::default(), None, None)
        } else {
            // Device slots left for layers once vsock, the scratch disk and the volumes have
            // theirs.
            let max_layers = slots.saturating_sub(2 + volumes.len());
            image_root(&first, &run_dir.0, max_layers, &mut disks)?
        };
        let process = container::process(&defaults, &overrides)?;
        if args.rootfs {
            initrd.push(pack_rootfs(Path::new(&first), &run_dir.0, args.vm.memory)?);
        }
        let t_root = crate::timing::since_start();
        let tty = args.tty;
        let spec = RunSpec {
            argv: process.argv,
            env: process.env,
            cwd: process.cwd,
            user: process.user,
            hostname: args.hostname.unwrap_or_default(),
            tty,
            stdin: args.interactive,
            winsize: if tty { terminal_size() } else { None },
            root,
            mounts: volumes
                .iter()
                .enumerate()
                .map(|(i, v)| MountSpec {
                    tag: share_tag(i),
                    target: v.target.clone(),
                    read_only: v.read_only,
                    file: v.kind == Kind::File,
                })
                .collect(),
        };
        let shares = (0..volumes.len())
            .map(|i| FsPlan {
                tag: share_tag(i),
                socket: run_dir.0.join(format!("fs{i}.sock")),
            })
            .collect();
        let cmdline = format!(
            "{BASE_CMDLINE} {} {}",
            proto::cmdline_args(proto::DEFAULT_PORT),
            backend::cmdline_extra(hypervisor)
        );
        let plan = VmPlan {
            kernel,
            initrd,
            cmdline,
            cpus: args.vm.cpus,
            memory_mib: args.vm.memory,
            timeout,
            console: Console::File(run_dir.0.join("console.log")),
            vsock: Some(VsockPlan {
                guest_cid: GUEST_CID,
                uds_path: run_dir.0.join("vsock.sock"),
            }),
            disks,
            shares,
        };
        Ok(Run {
            hypervisor,
            plan,
            spec,
            volumes,
            run_dir,
            timings: args.timings.then_some(t_root),
            _lease: lease,
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
        let sockets: Vec<_> = self
            .plan
            .shares
            .iter()
            .map(|s| s.socket.as_path())
            .collect();
        let shares = match volumes::Shares::start(&self.volumes, &sockets, &self.run_dir.0) {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        let t_plan = crate::timing::since_start();
        let (vm, watch) = match RunningVm::start(self.hypervisor, &self.plan, &self.run_dir.0) {
            Ok(started) => started,
            Err(e) => return fail(e),
        };
        // A volume server that dies ends the VM with its reason, never a hung file request.
        let share_failure = Arc::new(Mutex::new(None::<String>));
        let shares = {
            let (failure, stopper) = (share_failure.clone(), vm.stopper());
            shares.watch(move |why| {
                failure
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(why);
                stopper.stop();
            })
        };
        let raw = self.spec.tty.then(RawTerminal::enable).flatten();
        let io = HostIo {
            stdin: Box::new(std::io::stdin()),
            stdout: Box::new(std::io::stdout()),
            stderr: Box::new(std::io::stderr()),
        };
        let t_vm = crate::timing::since_start();
        let mut t_ready = None;
        let mut t_process = agent::ProcessTimes::default();
        let outcome =
            Session::start(&listener, &watch, self.spec.clone(), io).and_then(|session| {
                t_ready = Some(crate::timing::since_start());
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
                let (outcome, times) = session.finish_timed(&watch)?;
                t_process = times;
                Ok(outcome)
            });
        drop(raw);
        if outcome.is_err() {
            vm.stop();
        }
        let end = vm.wait(Duration::from_secs(10));
        shares.finish();
        // A volume server's failure explains a run that ended without the command's status.
        let share_failure = share_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let (Err(_), Some(why)) = (&outcome, share_failure) {
            return fail(why);
        }
        if let Some(t_root) = self.timings {
            let ms = |d: Option<Duration>| {
                d.map_or("-".to_string(), |d| {
                    format!("{:.1} ms", d.as_secs_f64() * 1e3)
                })
            };
            error_line(format!(
                "timings since start: image {}, plan {}, VM started {}, agent ready {}, process started {}, process ended {}, exit {}",
                ms(Some(t_root)),
                ms(Some(t_plan)),
                ms(Some(t_vm)),
                ms(t_ready),
                ms(t_process.started),
                ms(t_process.ended),
                ms(Some(crate::timing::since_start()))
            ));
        }
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

/// Packs a `--rootfs` directory as an initramfs archive in `run_dir`. The guest holds the archive
/// and its unpacked copy in RAM at once, so a tree over half of `memory_mib` cannot work: say so
/// before reading it all (`--rootfs /` must not read the host's disk into memory).
fn pack_rootfs(dir: &Path, run_dir: &Path, memory_mib: u64) -> Result<PathBuf, String> {
    let archive = run_dir.join("rootfs.cpio");
    crate::initramfs::tree(dir, &archive, (memory_mib << 20) / 2).map_err(|e| match e.kind() {
        std::io::ErrorKind::FileTooLarge => format!(
            "--rootfs {}: {e}, too much for a VM of {memory_mib} MiB (the tree is copied into its RAM): raise --memory, or run it as an image",
            dir.display()
        ),
        _ => format!("cannot pack --rootfs {}: {e}", dir.display()),
    })?;
    Ok(archive)
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
