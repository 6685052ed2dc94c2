//! `microvm create`: a container made from an image (or a `--rootfs` directory) and flags,
//! stored but not started. `run` uses the same flags and the same checks: all bad input fails
//! here, before anything exists.

use std::path::{Path, PathBuf};

use clap::Args;

use super::registry::RegistryArgs;
use super::vm_args::VmArgs;
use super::{error_line, EXIT_MICROVM_ERROR};
use crate::backend::{self, Hypervisor};
use crate::container::{
    self, config::parse_signal, launch::check_slots, Container, ContainerConfig, ProcessConfig,
    RootSource,
};
use crate::network::{self, NetworkConfig};
use crate::registry::PullPolicy;
use crate::volumes;

/// The flags that make a container (`create`, and `run` on top of them).
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Name of the container (unique; generated when not given).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// The image argument is a directory to use as the container's root (copied into the VM at
    /// each start; nothing written inside is kept) instead of an image.
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
    /// Signal that `stop` sends first [default: the image's StopSignal, else SIGTERM].
    #[arg(long, value_name = "SIGNAL")]
    pub stop_signal: Option<String>,
    /// Network: passt (the default: user-mode networking, outbound access, -p), none
    /// (loopback only), or ns:PATH (take over the veth of an existing network namespace).
    #[arg(long = "network", alias = "net", value_name = "MODE")]
    pub network: Option<String>,
    /// Publish a container port on the host: [IP:][HOST_PORT:]CONTAINER_PORT[/tcp|/udp].
    #[arg(short = 'p', long = "publish", value_name = "[IP:]HOST:CONTAINER")]
    pub publish: Vec<String>,
    /// A name server for the container's /etc/resolv.conf (instead of the host's, forwarded).
    #[arg(long, value_name = "IP")]
    pub dns: Vec<String>,
    /// Remove the container (and its sandbox layer) when its process exits.
    #[arg(long)]
    pub rm: bool,
    /// Size of the container's writable sandbox layer (a sparse disk in the store: only what
    /// is written takes space): MiB, or with a k, m, g or t suffix [default: 8g].
    #[arg(long, value_name = "SIZE", value_parser = parse_storage_size)]
    pub storage_size: Option<u64>,
    /// Pull the image from its registry: when it is not stored (missing), every time
    /// (always), or never.
    #[arg(long, value_enum, default_value = "missing", value_name = "POLICY")]
    pub pull: PullPolicy,
    /// How to reach the registry, when pulling.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// IMAGE: a stored name, a registry reference (pulled when missing, as --pull says), or a
    /// transport reference such as oci:DIR:TAG (or, with --rootfs, a directory).
    #[arg(value_name = "IMAGE")]
    pub image: String,
    /// The command and its arguments (replacing the image's Cmd).
    #[arg(
        value_name = "COMMAND",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<String>,
}

/// The image `name`, pulled first as `policy` says; a pull not asked for explicitly is
/// announced as docker does, and draws progress bars on a terminal.
fn image_for_run(
    store: &crate::image::Store,
    name: &str,
    policy: PullPolicy,
    opts: &crate::registry::Options,
) -> Result<crate::image::Image, crate::registry::Error> {
    use std::io::IsTerminal;
    let progress = std::io::stderr().is_terminal();
    crate::registry::image_for_run(store, name, policy, opts, progress, |name| {
        eprintln!("Unable to find image '{name}' locally")
    })
}

/// Pulls the image now when `--pull` says so, so that a foreground `run` can still be
/// interrupted while it downloads (it blocks its signals afterwards); [`make`] then finds it
/// stored.
pub fn pull_first(args: &mut CreateArgs) -> Result<(), String> {
    // Directories and transport references (oci:, archives) are never pulled: `make` loads them.
    if args.rootfs || crate::image::reference::parse_transport(&args.image).is_some() {
        return Ok(());
    }
    // The flags' own mistakes are said before a download, not after.
    check_flags(args)?;
    let store = crate::image::Store::open(&crate::host::data_dir()).map_err(|e| e.to_string())?;
    match image_for_run(&store, &args.image, args.pull, &args.registry.options()) {
        Ok(_) => {
            if args.pull == PullPolicy::Always {
                args.pull = PullPolicy::Missing;
            }
            Ok(())
        }
        // Said again, with the directory hint, by `make`.
        Err(crate::registry::Error::Image(crate::image::Error::NotFound(_))) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs `microvm create`: prints the new container's id.
pub fn create(args: CreateArgs) -> i32 {
    match make(args) {
        Ok(c) => {
            println!("{}", c.config.id);
            0
        }
        Err(e) => {
            error_line(e);
            EXIT_MICROVM_ERROR
        }
    }
}

/// The mistakes the flags alone show, found before any work: the VM's numbers, volumes, the
/// network flags (before the backend is chosen and warned about), the kernel.
fn check_flags(args: &CreateArgs) -> Result<(Vec<volumes::Volume>, NetworkConfig), String> {
    args.vm.timeout()?;
    args.vm.check_cpus()?;
    let volumes = volumes::parse_all(&args.volume, &args.mount).map_err(|e| e.to_string())?;
    let network = NetworkConfig::from_flags(args.network.as_deref(), &args.publish, &args.dns)
        .map_err(|e| e.to_string())?;
    args.vm.kernel()?;
    Ok((volumes, network))
}

/// Checks the flags, resolves the image and the process, and stores the container.
pub fn make(args: CreateArgs) -> Result<Container, String> {
    let (volumes, network) = check_flags(&args)?;
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
        cmd: args.command,
        env,
        workdir: args.workdir,
        user: args.user,
    };
    let hypervisor = backend::choose(args.hypervisor)?;
    let kernel = args.vm.kernel()?;
    // A later `start` may run from another directory.
    let kernel = kernel.canonicalize().unwrap_or(kernel);
    check_slots(
        hypervisor,
        volumes.len(),
        !args.rootfs,
        network.mode != network::Mode::None,
    )?;
    let given_stop_signal = args.stop_signal.as_deref().map(parse_signal).transpose()?;

    if args.rootfs && args.storage_size.is_some() {
        return Err(
            "--storage-size sizes an image's sandbox layer; a --rootfs container has none (what it writes lives in its RAM)".into(),
        );
    }
    let (root, defaults, image_stop_signal) = if args.rootfs {
        let dir = Path::new(&args.image);
        if !dir.is_dir() {
            return Err(format!("--rootfs {}: not a directory", args.image));
        }
        let dir = dir
            .canonicalize()
            .map_err(|e| format!("--rootfs {}: {e}", args.image))?;
        (
            RootSource::Directory(dir),
            container::ImageDefaults::default(),
            None,
        )
    } else {
        let store =
            crate::image::Store::open(&crate::host::data_dir()).map_err(|e| e.to_string())?;
        let image = image_for_run(&store, &args.image, args.pull, &args.registry.options()).map_err(|e| {
            let hint = Path::new(&args.image).is_dir().then(|| {
                format!(
                    " ({0} is a directory: oci:{0} runs the OCI layout there, --rootfs {0} uses it as the root)",
                    args.image
                )
            });
            format!("{e}{}", hint.unwrap_or_default())
        })?;
        let c = image.config;
        let stop = (!c.stop_signal.is_empty())
            .then(|| parse_signal(&c.stop_signal))
            .transpose()
            .map_err(|e| format!("the image's StopSignal: {e}"))?;
        let defaults = container::ImageDefaults {
            entrypoint: c.entrypoint,
            cmd: c.cmd,
            env: c.env,
            working_dir: c.working_dir,
            user: c.user,
        };
        let root = RootSource::Image {
            reference: image.name,
            digest: image.digest,
        };
        (root, defaults, stop)
    };
    let process = container::process(&defaults, &overrides)?;
    let stop_signal = given_stop_signal
        .or(image_stop_signal)
        .unwrap_or(libc::SIGTERM);
    let store = container::containers().map_err(|e| e.to_string())?;
    let made = store.create(args.name.as_deref(), |id, name| ContainerConfig {
        id,
        name,
        created: container::state::now(),
        root,
        process: ProcessConfig {
            argv: process.argv,
            env: process.env,
            cwd: process.cwd,
            user: process.user,
            tty: args.tty,
            stdin: args.interactive,
            options: Default::default(),
        },
        hostname: args.hostname.unwrap_or_default(),
        volumes,
        hypervisor,
        kernel,
        cpus: args.vm.cpus,
        memory_mib: args.vm.memory,
        timeout: args.vm.timeout,
        stop_signal,
        auto_remove: args.rm,
        guest_mounts: Vec::new(),
        devices: Vec::new(),
        wait_start: false,
        network,
        storage_size: args.storage_size,
    });
    made.map_err(|e| e.to_string())
}

/// `--storage-size`: a size (as `--memory` spells it, or with a t suffix) from 64 MiB to 16 TiB.
fn parse_storage_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let mib = match t.trim_end_matches(['b', 'i']).strip_suffix('t') {
        Some(tib) => tib
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(1 << 20))
            .ok_or_else(|| format!("{s:?} is not a size (e.g. 20g, 1t)"))?,
        None => super::parse_memory_mib(s)?,
    };
    let bytes = mib.saturating_mul(1 << 20);
    if !(crate::scratch::MIN_SIZE..=crate::scratch::MAX_SIZE).contains(&bytes) {
        return Err(format!("{s:?}: the sandbox layer must be from 64m to 16t"));
    }
    Ok(bytes)
}
