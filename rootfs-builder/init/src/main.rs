//! microvm-init: PID 1 of every microvm guest.
//!
//! It mounts the basic filesystems, connects to the host over vsock (CID 2, the port named on the
//! kernel command line), runs the container's process the host asks for with its streams
//! relayed, serves `exec` and `top` while it runs, reaps every zombie, reports the exit status,
//! and reboots the VM (which ends it: the host VMM treats
//! a reset as the guest stopping). Any failure is printed on the console and ends the VM without
//! an exit record, which the host reports as a guest crash.

mod diff;
mod exec;
mod mounts;
mod network;
mod privileges;
mod process;
mod reaper;
mod root;
mod system;
mod users;
mod volumes;

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use microvm_agent_protocol as proto;
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};

/// Host CID for vsock.
const HOST_CID: u32 = 2;

fn main() {
    let init = boot_ms();
    if std::process::id() != 1 {
        eprintln!("microvm-init: must run as PID 1");
        std::process::exit(1);
    }
    if let Err(e) = run(init) {
        log(&format!("error: {e}"));
    }
    system::power_off();
}

/// Prints one line on the console.
pub fn log(msg: &str) {
    eprintln!("microvm-init: {msg}");
}

/// Milliseconds since the guest kernel started (its boot clock), for the host's `--timings`.
pub fn boot_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// `init`: [`boot_ms`] when PID 1 began.
fn run(init: u64) -> Result<(), String> {
    system::mount_basics()?;
    let cmdline =
        std::fs::read_to_string("/proc/cmdline").map_err(|e| format!("/proc/cmdline: {e}"))?;
    let (_, port) = proto::parse_cmdline(&cmdline)
        .ok_or("no microvm.proto/microvm.port on the kernel command line")?;

    let mut control = connect_host(port)?;
    proto::send(
        &mut control,
        &proto::Message::Hello {
            version: proto::VERSION,
            boot: proto::BootStages {
                init,
                hello: boot_ms(),
            },
        },
    )
    .map_err(|e| e.to_string())?;
    let spec = match proto::recv(&mut control).map_err(|e| e.to_string())? {
        proto::Message::Run(spec) => spec,
        proto::Message::Diff { scratch } => return diff_only(port, &scratch, &mut control),
        proto::Message::Refused { reason } => {
            return Err(format!("host refused the agent: {reason}"))
        }
        other => return Err(format!("unexpected first message from the host: {other:?}")),
    };
    let mut stages = proto::StartStages {
        run: boot_ms(),
        ..Default::default()
    };
    let hostname = if spec.hostname.is_empty() {
        "microvm".to_string()
    } else {
        spec.hostname.clone()
    };
    system::set_hostname(&hostname);
    if let Err(e) = network::loopback() {
        log(&e);
    }
    // A root, mount or network that cannot be made fails the start with its reason, as runc's
    // would.
    let setup = prepare_root(&spec, &hostname);
    stages.root = boot_ms();

    let streams = process::Streams {
        stdin: open_stream(port, proto::Stream::Stdin)?,
        stdout: open_stream(port, proto::Stream::Stdout)?,
        stderr: open_stream(port, proto::Stream::Stderr)?,
    };
    if let Err(e) = setup {
        return process::fail(streams, &mut control, e);
    }
    // Listening before the process starts: the host may exec the moment it hears `Started`.
    // Without it exec and top fail; the container itself runs on.
    if let Err(e) = exec::listen(hostname) {
        log(&e);
    }
    process::run(&spec, streams, &mut control, stages)
}

/// Assembles the container's root with its volumes, mounts and network (`hostname` named in
/// its /etc/hosts), and enters it.
fn prepare_root(spec: &proto::RunSpec, hostname: &str) -> Result<(), String> {
    let root = match (&spec.shared_root, &spec.root) {
        (Some(shared), _) => root::assemble_shared(shared)?,
        (None, Some(root)) => root::assemble(root)?,
        (None, None) => PathBuf::from("/"),
    };
    if let Some(net) = &spec.network {
        network::configure(net)?;
        if net.write_etc {
            network::write_etc(&root, net, hostname)?;
        }
    }
    volumes::mount_all(&root, &spec.mounts)?;
    if spec.shared_root.is_some() || !spec.guest_mounts.is_empty() {
        mounts::apply_all(&root, &spec.guest_mounts, &spec.devices)?;
    }
    if spec.shared_root.as_ref().is_some_and(|r| r.read_only) {
        root::make_read_only(&root)?;
    }
    if spec.root.is_some() || spec.shared_root.is_some() {
        root::enter(&root)?;
    }
    Ok(())
}

/// A VM booted only to read a stopped container's changes: the diff on stdout, an error on
/// stderr, `Exited` 0 when complete.
fn diff_only(port: u32, scratch: &str, control: &mut UnixStream) -> Result<(), String> {
    let mounted = root::mount_scratch_read_only(scratch);
    let _stdin = open_stream(port, proto::Stream::Stdin)?;
    let stdout = open_stream(port, proto::Stream::Stdout)?;
    let stderr = open_stream(port, proto::Stream::Stderr)?;
    let code = exec::send_diff(mounted, stdout, stderr);
    proto::send(
        control,
        &proto::Message::Exited(proto::ExitStatus::Code(code)),
    )
    .map_err(|e| e.to_string())?;
    // The host confirms before the VM goes.
    let _ = proto::recv(control);
    Ok(())
}

/// A new vsock stream socket (close-on-exec).
pub(crate) fn vsock_socket() -> Result<OwnedFd, String> {
    socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("vsock socket: {e}"))
}

/// Connects to the host's listening port; retried briefly in case the vsock device is still
/// being set up.
fn connect_host(port: u32) -> Result<UnixStream, String> {
    let mut last = String::new();
    for _ in 0..50 {
        let fd = vsock_socket()?;
        match connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &VsockAddr::new(HOST_CID, port),
        ) {
            // A connected vsock stream behaves like any stream socket; UnixStream gives us
            // Read/Write/try_clone/timeouts without unsafe code of our own beyond the fd move.
            Ok(()) => return Ok(stream_from(fd)),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "cannot connect to the host on vsock port {port}: {last}"
    ))
}

pub(crate) fn stream_from(fd: OwnedFd) -> UnixStream {
    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
    // SAFETY: `raw` is a connected stream socket we own (just taken out of an OwnedFd);
    // UnixStream only uses read/write/shutdown/setsockopt on it, which work on any stream socket.
    unsafe { UnixStream::from_raw_fd(raw) }
}

/// Opens one stream connection and announces which stream it carries.
fn open_stream(port: u32, stream: proto::Stream) -> Result<UnixStream, String> {
    let mut s = connect_host(port)?;
    proto::send_stream_hello(&mut s, stream).map_err(|e| e.to_string())?;
    Ok(s)
}
