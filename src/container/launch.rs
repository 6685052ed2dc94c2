//! One run of a container: its VM plan made from the container's record (layers as read-only
//! disks, its own sandbox layer, volumes, vsock), the VM started on the chosen backend, the
//! agent session driven to the process's end, and how it ended. Callers (a foreground `run`, a
//! detached supervisor) decide where the streams go and what to do with the end.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use microvm_agent_protocol::{self as proto, Message, MountSpec, RootSpec, RunSpec, SharedRoot};

use super::config::RootSource;
use super::store::Container;
use crate::agent::{self, Control, HostIo, Listener, Outcome, Progress, Session};
use crate::backend::{self, Hypervisor, RunningVm, Stopper, VmEnd};
use crate::network::{Mode, Network, NetworkConfig};
use crate::plan::{Console, DiskPlan, FsPlan, VmPlan, VsockPlan, GUEST_CID};
use crate::volumes::{self, Kind, Staged, Volume};

/// Kernel options every run uses: console on COM1 (kept for crash reports), quiet, and no
/// reboot loop on panic: the VM ends and the host reports the crash.
const BASE_CMDLINE: &str = "console=ttyS0 quiet panic=-1";
/// Console lines shown when the guest crashes.
const CONSOLE_TAIL: usize = 20;
/// Serial of the scratch disk (the container's sandbox layer).
const SCRATCH_SERIAL: &str = "scratch";
/// Exit status when microvm itself fails (docker's convention).
pub const EXIT_MICROVM_ERROR: i32 = 125;
/// Exit status when the guest outlived `--timeout` (as timeout(1)).
pub const EXIT_TIMEOUT: i32 = 124;

/// Hears of a run's progress, to act on it from other threads (signals, `stop`, state).
pub trait Observer: Sync {
    /// The VM runs; `stopper` ends it without the guest's say.
    fn vm_started(&self, _stopper: Stopper) {}
    /// The agent has the process spec; `control` reaches it (signals, resizes).
    fn session_ready(&self, _control: Control) {}
    /// The process is ready and waits for a start (a launch with `wait_start`).
    fn process_created(&self) {}
    /// The process runs, as `pid` in the guest.
    fn process_started(&self, _pid: i32) {}
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Docker's exit status: the process's own, 126/127 when it could not start, 124 after
    /// `--timeout`, 125 when microvm failed.
    pub code: i32,
    /// `code` is the process's own exit status.
    pub process_exited: bool,
    /// What microvm has to say about it (one line), when it ended other than by itself.
    pub error: Option<String>,
    /// Further lines that explain `error` (the guest console's last lines after a crash).
    pub details: Vec<String>,
    /// When each phase ended, for `--timings`.
    pub timings: String,
}

/// A run with everything resolved and its run directory made.
pub struct Launch {
    hypervisor: Hypervisor,
    plan: VmPlan,
    /// What the agent is told first: run the process, or write the sandbox layer's diff.
    first: Message,
    wants_stdin: bool,
    /// Volumes, one virtiofsd each, in the order of `plan.shares`.
    volumes: Vec<Volume>,
    /// The network, set up when the run starts.
    network: NetworkConfig,
    run_dir: RunDir,
    t_root: Duration,
    /// Keeps the image's layer images from `microvm prune` while the VM runs.
    _lease: Option<crate::image::LayerLease>,
}

/// The per-run directory (sockets, console log, initrd parts), removed at the end.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The virtio-fs tag of volume `i`.
fn share_tag(i: usize) -> String {
    format!("microvm{i}")
}

/// Device slots a backend has for virtio devices.
pub fn device_slots(h: Hypervisor) -> usize {
    match h {
        Hypervisor::Qemu => backend::qemu::TRANSPORTS,
        _ => crate::vmm::virtio::MAX_DEVICES as usize,
    }
}

/// Checks that `volumes` volumes fit the backend beside vsock, the network device when there is
/// one and, for an image, the scratch disk and at least one layer; before anything is created.
pub fn check_slots(h: Hypervisor, volumes: usize, image: bool, net: bool) -> Result<(), String> {
    let slots = device_slots(h);
    let fixed = if image { 3 } else { 1 } + usize::from(net);
    if volumes + fixed > slots {
        return Err(format!(
            "{volumes} volumes are more than this backend can attach (at most {})",
            slots - fixed
        ));
    }
    Ok(())
}

impl Launch {
    /// Plans a run of `c`: its image's layers (converted on first use) under its sandbox layer
    /// (made on its first start, kept after), or its `--rootfs` directory packed afresh.
    pub fn prepare(c: &Container, winsize: Option<(u16, u16)>) -> Result<Launch, String> {
        let cfg = &c.config;
        let hypervisor = cfg.hypervisor;
        let image = matches!(cfg.root, RootSource::Image { .. });
        // A bundle's root and binds are one more share, ahead of the volumes.
        let mut volumes = Vec::with_capacity(cfg.volumes.len() + 1);
        let mut shared_root = None;
        if let RootSource::Bundle {
            rootfs,
            read_only,
            binds,
        } = &cfg.root
        {
            let (volume, root) = bundle_share(rootfs, *read_only, binds);
            volumes.push(volume);
            shared_root = Some(root);
        }
        let first_volume = volumes.len();
        volumes.extend(cfg.volumes.iter().cloned());
        let net = cfg.network.mode != Mode::None;
        check_slots(hypervisor, volumes.len(), image, net)?;
        let run_dir = new_run_dir()?;
        let base = crate::initramfs::base()
            .map_err(|e| format!("cannot write the boot initramfs: {e}"))?;
        let mut initrd = vec![base];
        let mut disks = Vec::new();
        let (root, lease) = match &cfg.root {
            RootSource::Bundle { rootfs, .. } => {
                if !rootfs.is_dir() {
                    return Err(format!(
                        "the bundle's root {}: not a directory",
                        rootfs.display()
                    ));
                }
                (None, None)
            }
            RootSource::Directory(dir) => {
                if !dir.is_dir() {
                    return Err(format!("--rootfs {}: not a directory", dir.display()));
                }
                initrd.push(pack_rootfs(dir, &run_dir.0, cfg.memory_mib)?);
                (None, None)
            }
            RootSource::Image { reference, digest } => {
                // Device slots left for layers once vsock, the scratch disk, the network
                // device and the volumes have theirs.
                let max_layers =
                    device_slots(hypervisor).saturating_sub(2 + usize::from(net) + volumes.len());
                let scratch = (c.scratch(), cfg.sandbox_size());
                let (root, lease) = image_root(reference, digest, scratch, max_layers, &mut disks)?;
                (Some(root), Some(lease))
            }
        };
        let t_root = crate::timing::since_start();
        let p = &cfg.process;
        let spec = RunSpec {
            argv: p.argv.clone(),
            env: p.env.clone(),
            cwd: p.cwd.clone(),
            user: p.user.clone(),
            hostname: cfg.hostname.clone(),
            tty: p.tty,
            stdin: p.stdin,
            winsize: if p.tty { winsize } else { None },
            root,
            mounts: cfg
                .volumes
                .iter()
                .enumerate()
                .map(|(i, v)| MountSpec {
                    tag: share_tag(first_volume + i),
                    target: v.target.clone(),
                    read_only: v.read_only,
                    file: v.kind == Kind::File,
                })
                .collect(),
            shared_root,
            guest_mounts: cfg.guest_mounts.clone(),
            devices: cfg.devices.clone(),
            options: p.options.clone(),
            wait_start: cfg.wait_start,
            // Filled in when the network is set up, just before the VM starts.
            network: None,
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
            kernel: cfg.kernel.clone(),
            initrd,
            cmdline,
            cpus: cfg.cpus,
            memory_mib: cfg.memory_mib,
            timeout: cfg.timeout.map(Duration::from_secs_f64),
            console: Console::File(run_dir.0.join("console.log")),
            vsock: Some(VsockPlan {
                guest_cid: GUEST_CID,
                uds_path: run_dir.0.join("vsock.sock"),
            }),
            disks,
            net: None,
            shares,
        };
        Ok(Launch {
            hypervisor,
            plan,
            wants_stdin: spec.stdin,
            first: Message::Run(spec),
            volumes,
            network: cfg.network.clone(),
            run_dir,
            t_root,
            _lease: lease,
        })
    }

    /// Plans a short VM that mounts `c`'s sandbox layer read-only and writes its changes as a
    /// layer tar (`commit` of a container that is not running): nothing of the container runs.
    pub fn diff(c: &Container) -> Result<Launch, String> {
        let cfg = &c.config;
        let run_dir = new_run_dir()?;
        let base = crate::initramfs::base()
            .map_err(|e| format!("cannot write the boot initramfs: {e}"))?;
        let cmdline = format!(
            "{BASE_CMDLINE} {} {}",
            proto::cmdline_args(proto::DEFAULT_PORT),
            backend::cmdline_extra(cfg.hypervisor)
        );
        let plan = VmPlan {
            kernel: cfg.kernel.clone(),
            initrd: vec![base],
            cmdline,
            cpus: 1,
            memory_mib: cfg.memory_mib.min(512),
            timeout: None,
            console: Console::File(run_dir.0.join("console.log")),
            vsock: Some(VsockPlan {
                guest_cid: GUEST_CID,
                uds_path: run_dir.0.join("vsock.sock"),
            }),
            // Writable for the kernel alone: a journal left by a VM that was powered off must
            // be replayed before the read-only mount can read the layer.
            disks: vec![DiskPlan {
                path: c.scratch(),
                read_only: false,
                serial: SCRATCH_SERIAL.into(),
            }],
            net: None,
            shares: Vec::new(),
        };
        Ok(Launch {
            hypervisor: cfg.hypervisor,
            plan,
            first: Message::Diff {
                scratch: SCRATCH_SERIAL.into(),
            },
            wants_stdin: false,
            volumes: Vec::new(),
            network: NetworkConfig::default(),
            run_dir,
            t_root: crate::timing::since_start(),
            _lease: None,
        })
    }

    /// The run's directory of sockets and console log (gone when the run ends).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir.0
    }

    /// Boots the VM, runs the process with its streams on `io`, and waits for its end. Call on
    /// the thread that outlives the VM: helper processes are tied to it.
    pub fn execute(mut self, io: HostIo, observer: &dyn Observer) -> Ended {
        let fail = |msg: String| Ended {
            code: EXIT_MICROVM_ERROR,
            process_exited: false,
            error: Some(msg),
            details: Vec::new(),
            timings: String::new(),
        };
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
            Err(e) => return fail(e.to_string()),
        };
        let sockets: Vec<_> = self
            .plan
            .shares
            .iter()
            .map(|s| s.socket.as_path())
            .collect();
        let shares =
            match volumes::ListeningShares::listen(&self.volumes, &sockets, &self.run_dir.0) {
                Ok(s) => s,
                Err(e) => return fail(e.to_string()),
            };
        let network = match Network::prepare(&self.network, &self.run_dir.0) {
            Ok(n) => n,
            Err(e) => return fail(e.to_string()),
        };
        self.plan.net = network.plan.clone();
        if let Message::Run(spec) = &mut self.first {
            spec.network = network.spec.clone();
            // An engine's bundle comes with its own /etc/resolv.conf and /etc/hosts mounts.
            if let (Some(net), true) = (&mut spec.network, spec.shared_root.is_some()) {
                net.write_etc = false;
            }
        }
        let t_plan = crate::timing::since_start();
        // virtiofsd starts while the VM is built; its sockets already listen.
        let started = RunningVm::start(self.hypervisor, &self.plan, &self.run_dir.0, || {
            shares.spawn().map_err(|e| e.to_string())
        });
        let (vm, watch, shares) = match started {
            Ok(started) => started,
            Err(e) => {
                network.abandon();
                return fail(e);
            }
        };
        observer.vm_started(vm.stopper());
        // A volume server or passt that dies ends the VM with its reason, never a hung file
        // request or a dead link; the first reason is the one reported.
        let helper_failure = Arc::new(Mutex::new(None::<String>));
        let on_failure = || {
            let (failure, stopper) = (helper_failure.clone(), vm.stopper());
            move |why| {
                failure
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(why);
                stopper.stop();
            }
        };
        let network = network.vm_started(on_failure());
        let shares = shares.watch(on_failure());
        let t_vm = crate::timing::since_start();
        let (mut t_ready, mut boot) = (None, None);
        let mut t_process = agent::ProcessTimes::default();
        let outcome =
            Session::start_with(&listener, &watch, self.first.clone(), self.wants_stdin, io)
                .and_then(|session| {
                    t_ready = Some(session.ready_at());
                    boot = Some(session.boot_stages());
                    observer.session_ready(session.control());
                    let (outcome, times) =
                        session.finish_observed(&watch, &mut |progress| match progress {
                            Progress::Created => observer.process_created(),
                            Progress::Started(pid) => observer.process_started(pid),
                        })?;
                    t_process = times;
                    Ok(outcome)
                });
        if outcome.is_err() {
            vm.stop();
        }
        let end = vm.wait(Duration::from_secs(10));
        shares.finish();
        network.finish();
        let ms = |d: Option<Duration>| {
            d.map_or("-".to_string(), |d| {
                format!("{:.1} ms", d.as_secs_f64() * 1e3)
            })
        };
        let timings = format!(
            "timings since start: image {}, plan {}, VM started {}, agent ready {}, process started {}, process ended {}, exit {}{}",
            ms(Some(self.t_root)),
            ms(Some(t_plan)),
            ms(Some(t_vm)),
            ms(t_ready),
            ms(t_process.started),
            ms(t_process.ended),
            ms(Some(crate::timing::since_start())),
            guest_timings(boot, t_process.guest)
        );
        let ended = |code, error: Option<String>, process_exited| Ended {
            code,
            process_exited,
            error,
            details: Vec::new(),
            timings: timings.clone(),
        };
        // A volume server's or passt's failure explains a run that ended without the
        // command's status.
        let helper_failure = helper_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let (Err(_), Some(why)) = (&outcome, helper_failure) {
            return ended(EXIT_MICROVM_ERROR, Some(why), false);
        }
        match (outcome, end) {
            (_, Ok(VmEnd::TimedOut)) => {
                let secs = self.plan.timeout.map_or(0.0, |t| t.as_secs_f64());
                ended(
                    EXIT_TIMEOUT,
                    Some(format!(
                        "the guest was still running after {secs} s (--timeout); stopped it"
                    )),
                    false,
                )
            }
            (Ok(Outcome::Exited(status)), _) => ended(status.as_shell_code(), None, true),
            (Ok(Outcome::StartFailed { kind, message }), _) => {
                let code = kind.shell_code(EXIT_MICROVM_ERROR);
                ended(code, Some(message), false)
            }
            (Err(agent::Error::GuestEnded), end) => {
                let why = match end {
                    Err(e) => format!(": {e}"),
                    Ok(_) => String::new(),
                };
                let lines =
                    crate::console_log::tail(&self.run_dir.0.join("console.log"), CONSOLE_TAIL);
                let mut e = ended(
                    EXIT_MICROVM_ERROR,
                    Some(format!("the guest crashed before the command's exit status arrived{why}; last console lines:")),
                    false,
                );
                e.details = lines.iter().map(|l| format!("  {l}")).collect();
                e
            }
            (Err(e), _) => ended(EXIT_MICROVM_ERROR, Some(e.to_string()), false),
        }
    }
}

/// Name of the bundle root's entry in its share.
const BUNDLE_ROOT_ENTRY: &str = "root";

/// The share of a bundle's root and binds (one file server for all), and the root the agent
/// mounts from it.
fn bundle_share(rootfs: &Path, read_only: bool, binds: &[Staged]) -> (Volume, SharedRoot) {
    let mut staged = Vec::with_capacity(binds.len() + 1);
    staged.push(Staged {
        name: BUNDLE_ROOT_ENTRY.into(),
        source: rootfs.to_owned(),
        read_only,
        recursive: true,
    });
    staged.extend(binds.iter().cloned());
    let volume = Volume {
        source: rootfs.to_owned(),
        target: "/".into(),
        read_only: false,
        kind: Kind::Staged,
        staged,
    };
    let root = SharedRoot {
        tag: share_tag(0),
        path: BUNDLE_ROOT_ENTRY.into(),
        read_only,
    };
    (volume, root)
}

/// The image's layers as read-only disks (converted on first use) and the container's sandbox
/// layer, made from the template on its first start and kept after; the root to assemble and
/// the lease that keeps the layer images from pruning.
fn image_root(
    reference: &str,
    digest: &str,
    (scratch, scratch_size): (PathBuf, u64),
    max_layers: usize,
    disks: &mut Vec<DiskPlan>,
) -> Result<(RootSpec, crate::image::LayerLease), String> {
    let store = crate::image::Store::open(&crate::host::data_dir()).map_err(|e| e.to_string())?;
    let image = store.resolve(digest).map_err(|_| {
        format!("the container's image {reference} ({digest}) is no longer in the image store: load it again, or remove the container")
    })?;
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
    if !scratch.exists() {
        let tmp = scratch.with_extension("img.tmp");
        crate::scratch::create(&tmp, scratch_size)
            .and_then(|()| std::fs::rename(&tmp, &scratch))
            .map_err(|e| format!("cannot make the sandbox layer {}: {e}", scratch.display()))?;
    }
    disks.push(DiskPlan {
        path: scratch.to_owned(),
        read_only: false,
        serial: SCRATCH_SERIAL.into(),
    });
    let root = RootSpec {
        layers: serials,
        scratch: SCRATCH_SERIAL.into(),
    };
    Ok((root, lease))
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
    crate::host::private_dir(&parent)?;
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

/// The agent's stage times for `--timings`, on the guest's own clock (from its kernel's start,
/// so they do not line up with the host's figures): empty when the agent sent none.
fn guest_timings(boot: Option<proto::BootStages>, start: Option<proto::StartStages>) -> String {
    let Some(boot) = boot else {
        return String::new();
    };
    let mut out = format!(
        "; guest clock since its kernel began: agent started {} ms, hello {} ms",
        boot.init, boot.hello
    );
    if let Some(s) = start {
        out.push_str(&format!(
            ", request {} ms, root ready {} ms, process started {} ms",
            s.run, s.root, s.started
        ));
    }
    out
}
