//! The protocol between microvm (host) and its agent, the guest's PID 1.
//!
//! Transport: virtio-vsock stream connections that the agent opens to the host (CID 2) on the
//! port named on the kernel command line; the host listens before the guest boots, so there is
//! no connect race. One connection carries control messages; each standard stream gets a
//! connection of its own, so a stream that is not being read holds back only itself.
//!
//! Every message is framed (`u32` little-endian length, then the body): some vsock transports
//! do not carry a half-close, so nothing here waits for end-of-file.
//!
//! - Control connection: JSON [`Message`]s. The agent starts with [`Message::Hello`]; the host
//!   answers with [`Message::Run`] (or [`Message::Refused`] on a version mismatch).
//! - Stream connections: the agent opens one per stream with a [`StreamHello`] frame; then data
//!   frames, an empty frame meaning end of stream.
//!
//! With [`RunSpec::wait_start`] the agent prepares the process (root, mounts, program, user),
//! answers [`Message::Created`] and runs the program only on [`Message::Start`], as an OCI
//! runtime's `create` and `start` split a container's start.
//!
//! More processes in the running container (`exec`, `top`) come the other way: once the
//! container's process runs, the agent listens on [`EXEC_PORT`] and the host connects to it.
//! The first frame of such a connection says what it is for: [`Message::Exec`] (its control
//! connection; the agent answers [`Message::ExecAccepted`] with a process number, then
//! `Started`/`StartFailed` and `Exited` as for the container's process), [`Message::ExecStream`]
//! (one of that process's streams, framed as above), or [`Message::Top`] (answered with one
//! [`Message::Processes`]). Each carries the host's protocol version, checked like the hello.
#![warn(missing_docs)]

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Protocol version; both sides must agree exactly.
pub const VERSION: u32 = 7;
/// Kernel command-line key carrying the protocol version the host speaks.
pub const CMDLINE_VERSION_KEY: &str = "microvm.proto";
/// Kernel command-line key carrying the host vsock port the agent connects to.
pub const CMDLINE_PORT_KEY: &str = "microvm.port";
/// The vsock port microvm listens on by default.
pub const DEFAULT_PORT: u32 = 1024;
/// The guest vsock port the agent listens on for `exec` and `top` while the container runs.
pub const EXEC_PORT: u32 = 1025;
/// Most `exec` processes the agent runs at once (each holds threads and connections).
pub const MAX_EXECS: usize = 64;
/// Largest control message body.
pub const MAX_CONTROL_FRAME: usize = 1 << 20;
/// Largest data frame body.
pub const MAX_DATA_FRAME: usize = 64 << 10;

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection failed.
    #[error("agent connection: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection where a frame was expected.
    #[error("agent connection closed unexpectedly")]
    Closed,
    /// A frame announced more than the limit.
    #[error("agent sent a {0}-byte frame, more than allowed")]
    TooLarge(usize),
    /// A control frame is not a valid message.
    #[error("agent sent a malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Which standard stream a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Host to guest.
    Stdin,
    /// Guest to host.
    Stdout,
    /// Guest to host.
    Stderr,
}

/// First frame of a stream connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHello {
    /// The stream.
    pub stream: Stream,
}

/// What to run, as the host resolved it from the command line and the image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Program and arguments; the program is looked up in `PATH` from `env` when it has no `/`.
    pub argv: Vec<String>,
    /// Environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// Working directory (created if missing, as docker does).
    pub cwd: String,
    /// `user`, `uid`, `user:group` or `uid:gid`, resolved in the guest root's /etc/passwd and
    /// /etc/group; empty means root.
    pub user: String,
    /// Hostname of the guest.
    pub hostname: String,
    /// Give the process a terminal (stdout and stderr merge into it).
    pub tty: bool,
    /// Keep stdin open (docker's `-i`); otherwise the process reads /dev/null.
    pub stdin: bool,
    /// Initial terminal size (rows, columns), when `tty`.
    pub winsize: Option<(u16, u16)>,
    /// The container's root, assembled from disks; `None` runs in the initramfs root.
    pub root: Option<RootSpec>,
    /// Volumes to mount in the container's root before the process starts, in order.
    pub mounts: Vec<MountSpec>,
    /// A root shared from the host over virtio-fs (an OCI bundle's rootfs), instead of `root`.
    #[serde(default)]
    pub shared_root: Option<SharedRoot>,
    /// Mounts made in the root after it is assembled, in order (an OCI bundle's `mounts`).
    #[serde(default)]
    pub guest_mounts: Vec<GuestMount>,
    /// Device nodes to create in the root's /dev (an OCI bundle's `linux.devices`).
    #[serde(default)]
    pub devices: Vec<DeviceSpec>,
    /// What the process gets besides its identity (umask, limits, capabilities).
    #[serde(default)]
    pub options: ProcessOptions,
    /// Prepare everything, report [`Message::Created`], and run the program only on
    /// [`Message::Start`] (an OCI runtime's `create`, then `start`).
    #[serde(default)]
    pub wait_start: bool,
    /// The guest's network interface and name service; `None` leaves only loopback.
    #[serde(default)]
    pub network: Option<NetworkSpec>,
}

/// An address on the guest's interface, with its prefix length (`10.0.2.15`, 24).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IfAddress {
    /// IPv4 or IPv6 address.
    pub address: std::net::IpAddr,
    /// Prefix length.
    pub prefix_len: u8,
}

/// A route of the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteSpec {
    /// Destination network; `None` is the default route of the gateway's family.
    pub destination: Option<IfAddress>,
    /// Next hop; `None` for a network reached on the link itself.
    pub gateway: Option<std::net::IpAddr>,
}

/// A MAC address as Linux and iproute2 print it: `52:54:00:12:34:56`.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// How the agent sets up the guest's network, all static (no DHCP wait on the boot path).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// The MAC address of the interface to configure (the agent finds it by this address).
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u16,
    /// Its addresses.
    pub addresses: Vec<IfAddress>,
    /// Routes, in order (on-link routes before the ones through a gateway).
    pub routes: Vec<RouteSpec>,
    /// Name servers for /etc/resolv.conf; with `search`, written only when not empty.
    pub dns: Vec<std::net::IpAddr>,
    /// Search domains for /etc/resolv.conf.
    pub search: Vec<String>,
    /// Write /etc/resolv.conf and /etc/hosts into the container's root (an engine mounts its
    /// own instead).
    pub write_etc: bool,
}

/// A root shared by the host over virtio-fs: directory `path` of the share `tag`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedRoot {
    /// The virtio-fs tag.
    pub tag: String,
    /// The directory in the share that becomes the root (one path component).
    pub path: String,
    /// Mount it read-only (the host's bind of it is read-only as well).
    pub read_only: bool,
}

/// What a [`GuestMount`] mounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestMountSource {
    /// A filesystem the guest kernel makes (proc, sysfs, tmpfs, devpts, mqueue, cgroup2).
    Kernel {
        /// Filesystem type.
        fstype: String,
        /// Mount source (shown in /proc/mounts).
        source: String,
    },
    /// An entry (one path component) of the root's share: a host file or directory the host
    /// bound there, read-only on the host if the mount is.
    Shared {
        /// The entry's name in the share.
        entry: String,
        /// Bind the entry's submounts too (`rbind`).
        recursive: bool,
    },
}

/// A mount made in the container's root, as an OCI runtime makes a bundle's `mounts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMount {
    /// Absolute path inside the container.
    pub target: String,
    /// What is mounted.
    pub source: GuestMountSource,
    /// mount(8) options: flags (`ro`, `nosuid`, `nodev`, `noexec`, ...) and filesystem data
    /// (`mode=755`, `size=65536k`, ...).
    pub options: Vec<String>,
}

/// A device node in the container's /dev.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec {
    /// Absolute path inside the container.
    pub path: String,
    /// `c` (character), `b` (block) or `p` (FIFO).
    pub kind: char,
    /// Major number (the guest kernel's numbering).
    pub major: u64,
    /// Minor number.
    pub minor: u64,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// A resource limit (setrlimit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// The resource's number (`RLIMIT_NOFILE` is 7).
    pub resource: u32,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// Capability sets, one bit per capability number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Bounding set.
    pub bounding: u64,
    /// Effective set.
    pub effective: u64,
    /// Permitted set.
    pub permitted: u64,
    /// Inheritable set.
    pub inheritable: u64,
    /// Ambient set.
    pub ambient: u64,
}

/// What a process gets besides its program, environment and user (the defaults: none of it,
/// as for a `microvm run` process).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessOptions {
    /// File mode creation mask.
    #[serde(default)]
    pub umask: Option<u32>,
    /// Resource limits.
    #[serde(default)]
    pub rlimits: Vec<Rlimit>,
    /// Capabilities (none given: root keeps all, others none).
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    /// Set no_new_privs.
    #[serde(default)]
    pub no_new_privileges: bool,
    /// Supplementary groups exactly (none given: the user's groups in /etc/group).
    #[serde(default)]
    pub groups: Option<Vec<u32>>,
}

/// A further process in the running container (`exec`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    /// Program and arguments, looked up in `PATH` from `env` when the program has no `/`.
    pub argv: Vec<String>,
    /// Environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// Working directory (must exist).
    pub cwd: String,
    /// `user`, `uid`, `user:group` or `uid:gid`; empty means root.
    pub user: String,
    /// Give the process a terminal (stdout and stderr merge into it).
    pub tty: bool,
    /// Keep stdin open; otherwise the process reads /dev/null.
    pub stdin: bool,
    /// Initial terminal size (rows, columns), when `tty`.
    pub winsize: Option<(u16, u16)>,
    /// Start it with no streams and report only that it started (`exec -d`).
    #[serde(default)]
    pub detach: bool,
    /// Umask, limits, capabilities.
    #[serde(default)]
    pub options: ProcessOptions,
}

/// Name of the one file a single-file share holds: the host stages the file under this name in
/// a directory of its own, so nothing else of the host directory is shared.
pub const SHARED_FILE_NAME: &str = "file";

/// A volume: a host directory, or a single host file, shared over virtio-fs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// The virtio-fs tag of the share.
    pub tag: String,
    /// Absolute path inside the container (no `.` or `..` components).
    pub target: String,
    /// Mount read-only (the host's file server refuses writes as well).
    pub read_only: bool,
    /// The share holds just [`SHARED_FILE_NAME`], to be bound at `target`.
    pub file: bool,
}

/// A container root the agent assembles before running the process: read-only layer disks
/// stacked with overlayfs under a writable scratch disk (the container's sandbox layer). Disks
/// are found by their virtio-blk serial, never by device order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootSpec {
    /// Serials of the read-only layer disks (squashfs), bottom layer first.
    pub layers: Vec<String>,
    /// Serial of the writable scratch disk (ext4), holding the overlay's upper and work dirs.
    pub scratch: String,
}

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// The shell's (and docker's) number for it: the code, or 128 + the signal.
    pub fn as_shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => s.saturating_add(128),
        }
    }

    /// Whether a Linux process can end this way: a code of 0 to 255, or a signal of 1 to 64.
    /// The host checks what an agent (part of the guest, so hostile) reports.
    pub fn is_possible(self) -> bool {
        match self {
            ExitStatus::Code(c) => (0..=255).contains(&c),
            ExitStatus::Signal(s) => (1..=64).contains(&s),
        }
    }
}

/// Why a process could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartFailure {
    /// The program does not exist (docker: 127).
    NotFound,
    /// It exists but cannot be run (docker: 126).
    NotExecutable,
    /// Anything else (bad user, bad working directory, ...): a runtime error (docker: 125... or 126).
    Other,
}

impl StartFailure {
    /// The shell's (and docker's) status for it: 127, 126, or `other` for the rest, which
    /// callers number their own way (docker's 125, runc's 1).
    pub fn shell_code(self, other: i32) -> i32 {
        match self {
            StartFailure::NotFound => 127,
            StartFailure::NotExecutable => 126,
            StartFailure::Other => other,
        }
    }
}

/// The agent's start-up stages as milliseconds of the guest's boot clock (`CLOCK_BOOTTIME`,
/// which starts with the guest kernel), for `--timings`: where the guest's own time went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootStages {
    /// The agent (PID 1) began: the kernel's own boot is over.
    pub init: u64,
    /// Its basic filesystems are mounted and it is connected to the host (saying hello).
    pub hello: u64,
}

/// The container process's set-up stages, on the same guest clock as [`BootStages`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartStages {
    /// The host's [`Message::Run`] arrived.
    pub run: u64,
    /// The root, network and volumes were ready (stream connections opened next).
    pub root: u64,
    /// The process was started.
    pub started: u64,
}

/// Control messages, both directions.
// A few messages per run, each serialized at once: the size of the largest variant costs
// nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Agent -> host, first message.
    Hello {
        /// The agent's protocol version.
        version: u32,
        /// When the guest reached the agent and the hello (absent: zero).
        #[serde(default)]
        boot: BootStages,
    },
    /// Host -> agent: versions differ; the agent powers off.
    Refused {
        /// Why, for the guest console.
        reason: String,
    },
    /// Host -> agent: run this process.
    Run(RunSpec),
    /// Agent -> host: the process started.
    Started {
        /// Its pid in the guest.
        pid: i32,
        /// For the container's own process: where the agent's time went before it started.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stages: Option<StartStages>,
    },
    /// Agent -> host: the process could not start.
    StartFailed {
        /// The kind of failure.
        kind: StartFailure,
        /// A one-line explanation.
        message: String,
    },
    /// Host -> agent: deliver a signal to the process.
    Signal {
        /// Signal number.
        signal: i32,
    },
    /// Host -> agent: deliver a signal to every process in the VM but the agent.
    SignalAll {
        /// Signal number.
        signal: i32,
    },
    /// Agent -> host (with [`RunSpec::wait_start`]): the process is ready to run.
    Created,
    /// Host -> agent: run the created process now.
    Start,
    /// Host -> agent: the terminal was resized.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Agent -> host: the process ended and its output streams are flushed.
    Exited(ExitStatus),
    /// Host -> agent: everything arrived; power off now.
    Shutdown,
    /// Host -> agent, first frame of a connection to [`EXEC_PORT`]: run another process in the
    /// container; this connection becomes its control connection.
    Exec {
        /// The host's protocol version.
        version: u32,
        /// The process.
        spec: ExecSpec,
    },
    /// Agent -> host: the exec is accepted as `process`; open its three stream connections.
    ExecAccepted {
        /// Number of the exec process, named by its stream connections.
        process: u32,
    },
    /// Host -> agent, first frame of a connection to [`EXEC_PORT`]: a stream of exec `process`.
    ExecStream {
        /// The host's protocol version.
        version: u32,
        /// The exec process it belongs to.
        process: u32,
        /// Which stream.
        stream: Stream,
    },
    /// Host -> agent, instead of [`Message::Run`]: write the changes on the sandbox layer
    /// (the scratch disk with this serial, mounted read-only) as an OCI layer tar on the stdout
    /// stream, errors on stderr, then report `Exited` (0: complete).
    Diff {
        /// Serial of the scratch disk.
        scratch: String,
    },
    /// Host -> agent, first frame of a connection to [`EXEC_PORT`]: like [`Message::Diff`] for
    /// the running container, answered like an exec (accepted, three streams, `Exited`).
    Commit {
        /// The host's protocol version.
        version: u32,
        /// Stop every process of the container (SIGSTOP) while the diff is taken.
        pause: bool,
    },
    /// Host -> agent, first frame of a connection to [`EXEC_PORT`]: list the processes.
    Top {
        /// The host's protocol version.
        version: u32,
    },
    /// Agent -> host: the processes in the VM, one row per process under `titles`.
    Processes {
        /// Column titles.
        titles: Vec<String>,
        /// One row per process.
        rows: Vec<Vec<String>>,
    },
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("frame too large"))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf)?;
    w.flush()
}

/// Reads one frame of at most `max` bytes. `Ok(None)` is a clean end of connection before a
/// frame began.
pub fn read_frame(r: &mut impl Read, max: usize) -> Result<Option<Vec<u8>>, Error> {
    let mut len = [0u8; 4];
    if !read_exact_or_eof(r, &mut len)? {
        return Ok(None);
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(Error::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    if !read_exact_or_eof(r, &mut body)? && len > 0 {
        return Err(Error::Closed);
    }
    Ok(Some(body))
}

/// Fills `buf`; false if the stream ended before the first byte; an error if it ended midway.
fn read_exact_or_eof(r: &mut impl Read, buf: &mut [u8]) -> Result<bool, Error> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(Error::Closed),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Sends a control message.
pub fn send(w: &mut impl Write, msg: &Message) -> Result<(), Error> {
    write_frame(w, &serde_json::to_vec(msg)?)?;
    Ok(())
}

/// Receives a control message; [`Error::Closed`] at end of connection.
pub fn recv(r: &mut impl Read) -> Result<Message, Error> {
    let body = read_frame(r, MAX_CONTROL_FRAME)?.ok_or(Error::Closed)?;
    Ok(serde_json::from_slice(&body)?)
}

/// Sends the first frame of a stream connection.
pub fn send_stream_hello(w: &mut impl Write, stream: Stream) -> Result<(), Error> {
    write_frame(w, &serde_json::to_vec(&StreamHello { stream })?)?;
    Ok(())
}

/// Receives the first frame of a stream connection.
pub fn recv_stream_hello(r: &mut impl Read) -> Result<StreamHello, Error> {
    let body = read_frame(r, MAX_CONTROL_FRAME)?.ok_or(Error::Closed)?;
    Ok(serde_json::from_slice(&body)?)
}

/// Copies `from` to `to` as data frames, then an end-of-stream frame. Returns bytes copied.
pub fn pump_to_frames(from: &mut impl Read, to: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; MAX_DATA_FRAME];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A broken source (e.g. EIO from a pty whose other side closed) ends the stream.
            Err(_) => 0,
        };
        write_frame(to, &buf[..n])?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// Copies data frames from `from` to `to` until the end-of-stream frame. Returns bytes copied.
pub fn pump_from_frames(from: &mut impl Read, to: &mut impl Write) -> Result<u64, Error> {
    let mut total = 0;
    loop {
        match read_frame(from, MAX_DATA_FRAME)? {
            None => return Err(Error::Closed),
            Some(body) if body.is_empty() => return Ok(total),
            Some(body) => {
                to.write_all(&body)?;
                to.flush()?;
                total += body.len() as u64;
            }
        }
    }
}

/// The protocol settings the host puts on the kernel command line.
pub fn cmdline_args(port: u32) -> String {
    format!("{CMDLINE_VERSION_KEY}={VERSION} {CMDLINE_PORT_KEY}={port}")
}

/// Reads (version, port) from a kernel command line.
pub fn parse_cmdline(cmdline: &str) -> Option<(u32, u32)> {
    let get = |key: &str| {
        cmdline
            .split_whitespace()
            .find_map(|t| t.strip_prefix(key)?.strip_prefix('=')?.parse::<u32>().ok())
    };
    Some((get(CMDLINE_VERSION_KEY)?, get(CMDLINE_PORT_KEY)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let spec = RunSpec {
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            tty: true,
            mounts: vec![MountSpec {
                tag: "v0".into(),
                target: "/etc/app.conf".into(),
                read_only: true,
                file: true,
            }],
            ..Default::default()
        };
        let oci = RunSpec {
            argv: vec!["true".into()],
            shared_root: Some(SharedRoot {
                tag: "microvm0".into(),
                path: "root".into(),
                read_only: true,
            }),
            guest_mounts: vec![GuestMount {
                target: "/etc/hosts".into(),
                source: GuestMountSource::Shared {
                    entry: "m0".into(),
                    recursive: false,
                },
                options: vec!["ro".into()],
            }],
            options: ProcessOptions {
                umask: Some(0o22),
                rlimits: vec![Rlimit {
                    resource: 7,
                    soft: 1024,
                    hard: 1024,
                }],
                capabilities: Some(Capabilities {
                    bounding: 1,
                    ..Default::default()
                }),
                no_new_privileges: true,
                groups: Some(vec![10]),
            },
            wait_start: true,
            ..Default::default()
        };
        // A v4 host's spec (no OCI fields) still reads: they default to "none".
        let old: RunSpec = serde_json::from_str(
            r#"{"argv":["x"],"env":[],"cwd":"","user":"","hostname":"","tty":false,"stdin":false,"winsize":null,"root":null,"mounts":[]}"#,
        )
        .unwrap();
        assert_eq!(old.options, ProcessOptions::default());
        // A v6 agent's hello (no stages) still reads, so the host can refuse it by version.
        let hello: Message = serde_json::from_str(r#"{"Hello":{"version":6}}"#).unwrap();
        assert_eq!(
            hello,
            Message::Hello {
                version: 6,
                boot: BootStages::default()
            }
        );
        assert!(!old.wait_start && old.shared_root.is_none());
        let boot = BootStages {
            init: 700,
            hello: 740,
        };
        let stages = StartStages {
            run: 741,
            root: 780,
            started: 790,
        };
        let mut wire = Vec::new();
        for m in [
            Message::Hello {
                version: VERSION,
                boot,
            },
            Message::Started {
                pid: 7,
                stages: Some(stages),
            },
            Message::Started {
                pid: 8,
                stages: None,
            },
            Message::Run(spec),
            Message::Run(oci.clone()),
            Message::Created,
            Message::Start,
            Message::SignalAll { signal: 9 },
            Message::Exited(ExitStatus::Signal(9)),
        ] {
            send(&mut wire, &m).unwrap();
        }
        let mut r = &wire[..];
        assert_eq!(
            recv(&mut r).unwrap(),
            Message::Hello {
                version: VERSION,
                boot
            }
        );
        assert_eq!(
            recv(&mut r).unwrap(),
            Message::Started {
                pid: 7,
                stages: Some(stages)
            }
        );
        assert_eq!(
            recv(&mut r).unwrap(),
            Message::Started {
                pid: 8,
                stages: None
            }
        );
        assert!(matches!(recv(&mut r).unwrap(), Message::Run(s) if s.tty && s.argv.len() == 3));
        assert_eq!(recv(&mut r).unwrap(), Message::Run(oci));
        assert_eq!(recv(&mut r).unwrap(), Message::Created);
        assert_eq!(recv(&mut r).unwrap(), Message::Start);
        assert_eq!(recv(&mut r).unwrap(), Message::SignalAll { signal: 9 });
        assert_eq!(
            recv(&mut r).unwrap(),
            Message::Exited(ExitStatus::Signal(9))
        );
        assert!(matches!(recv(&mut r), Err(Error::Closed)));
    }

    #[test]
    fn data_pumps_carry_bytes_and_end_of_stream() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        let mut wire = Vec::new();
        assert_eq!(
            pump_to_frames(&mut &data[..], &mut wire).unwrap(),
            data.len() as u64
        );
        let mut out = Vec::new();
        assert_eq!(
            pump_from_frames(&mut &wire[..], &mut out).unwrap(),
            data.len() as u64
        );
        assert_eq!(out, data);
        // Missing end-of-stream frame: an error, not a silent success.
        let cut = &wire[..wire.len() - 4];
        assert!(matches!(
            pump_from_frames(&mut &cut[..], &mut Vec::new()),
            Err(Error::Closed)
        ));
    }

    #[test]
    fn hostile_frames_are_rejected() {
        let mut huge = Vec::new();
        huge.extend_from_slice(&(u32::MAX).to_le_bytes());
        assert!(matches!(recv(&mut &huge[..]), Err(Error::TooLarge(_))));
        let mut garbage = Vec::new();
        write_frame(&mut garbage, b"{not json").unwrap();
        assert!(matches!(recv(&mut &garbage[..]), Err(Error::Malformed(_))));
        let truncated = [5u8, 0, 0, 0, b'{'];
        assert!(matches!(recv(&mut &truncated[..]), Err(Error::Closed)));
    }

    #[test]
    fn cmdline_settings() {
        let line = format!("console=ttyS0 {} quiet", cmdline_args(1024));
        assert_eq!(parse_cmdline(&line), Some((VERSION, 1024)));
        assert_eq!(parse_cmdline("microvm.proto=1"), None);
        assert_eq!(parse_cmdline("microvm.proto=x microvm.port=3"), None);
    }

    #[test]
    fn shell_codes() {
        assert_eq!(ExitStatus::Code(7).as_shell_code(), 7);
        assert_eq!(ExitStatus::Signal(9).as_shell_code(), 137);
        assert_eq!(ExitStatus::Signal(i32::MAX).as_shell_code(), i32::MAX);
        for possible in [
            ExitStatus::Code(0),
            ExitStatus::Code(255),
            ExitStatus::Signal(64),
        ] {
            assert!(possible.is_possible(), "{possible:?}");
        }
        for absurd in [
            ExitStatus::Code(-1),
            ExitStatus::Code(256),
            ExitStatus::Signal(0),
            ExitStatus::Signal(65),
            ExitStatus::Signal(i32::MAX),
        ] {
            assert!(!absurd.is_possible(), "{absurd:?}");
        }
        assert_eq!(StartFailure::NotFound.shell_code(125), 127);
        assert_eq!(StartFailure::NotExecutable.shell_code(125), 126);
        assert_eq!(StartFailure::Other.shell_code(1), 1);
    }
}
