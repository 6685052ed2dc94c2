//! The VM plan: plain data describing one virtual machine, built by the CLI and run by a backend.

use std::path::PathBuf;
use std::time::Duration;

/// Most vCPUs a VM may have: the MP table must fit in the last KiB of base memory.
pub const MAX_CPUS: u8 = 32;
/// Least guest RAM we accept, in MiB: room for the boot structures, a kernel and a stack.
pub const MIN_MEMORY_MIB: u64 = 16;

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    /// The host's standard error.
    Stderr,
    /// A log file, created or truncated, of bounded size (see [`crate::console_log`]).
    File(PathBuf),
}

/// Guest context id of every VM: each VM has its own vsock device, so they need not differ.
pub const GUEST_CID: u32 = 3;

/// A virtio-vsock device in Firecracker's hybrid style: the guest's vsock ports meet host Unix
/// sockets. The host connects to `uds_path` and writes `CONNECT <port>\n` to reach a guest port;
/// a guest connecting to CID 2 port P reaches the host socket `<uds_path>_P`.
#[derive(Debug, Clone)]
pub struct VsockPlan {
    /// The guest's context id.
    pub guest_cid: u32,
    /// Host-side Unix socket path (and prefix for guest-initiated connections).
    pub uds_path: PathBuf,
}

/// Longest virtio-blk serial (the field is 20 bytes).
pub const MAX_SERIAL: usize = 20;

/// A virtio-blk disk: a host file, read-only or writable, that the guest finds by its serial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlan {
    /// Backing file (raw image).
    pub path: PathBuf,
    /// Refuse guest writes (VIRTIO_BLK_F_RO, and the file opened read-only).
    pub read_only: bool,
    /// Serial the guest reads with VIRTIO_BLK_T_GET_ID; at most [`MAX_SERIAL`] bytes.
    pub serial: String,
}

/// A virtio-fs share: a vhost-user-fs backend (virtiofsd) already listening on `socket`, which
/// the guest mounts by `tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsPlan {
    /// The mount tag the guest sees (virtio-fs config `tag`, at most [`MAX_FS_TAG`] bytes).
    pub tag: String,
    /// The backend's vhost-user Unix socket.
    pub socket: PathBuf,
}

/// Longest virtio-fs tag (the config field is 36 bytes).
pub const MAX_FS_TAG: usize = 36;

/// Everything a backend needs to boot one VM.
#[derive(Debug, Clone)]
pub struct VmPlan {
    /// Guest kernel: an ELF vmlinux (with or without a PVH note) or a bzImage.
    pub kernel: PathBuf,
    /// Initial ramdisk, as parts laid end to end in guest memory (concatenated cpio archives
    /// unpack in turn); empty for none.
    pub initrd: Vec<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Stop the guest after this long.
    pub timeout: Option<Duration>,
    /// Where the serial console goes.
    pub console: Console,
    /// The vsock device, if any.
    pub vsock: Option<VsockPlan>,
    /// Block devices, in the order they are attached.
    pub disks: Vec<DiskPlan>,
    /// virtio-fs shares, attached after the disks. Guest RAM is a shared file when there is
    /// any, since the backends must map it.
    pub shares: Vec<FsPlan>,
    /// The network device, attached last; `None` leaves the guest only loopback.
    pub net: Option<NetPlan>,
}

/// A virtio-net device: the guest's Ethernet interface and the host end of its frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPlan {
    /// The MAC address the guest's interface takes (virtio-net config `mac`).
    pub mac: [u8; 6],
    /// The largest IP packet the backend carries (virtio-net config `mtu`).
    pub mtu: u16,
    /// Where the frames go.
    pub backend: NetBackend,
}

/// The host end of a virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// The tap device `name`, in the network namespace bound at `netns` (ours when `None`),
    /// opened with a virtio-net header so checksum and segmentation offloads pass through.
    /// Made if missing, and then gone with the VM's descriptor.
    Tap {
        /// The tap's interface name.
        name: String,
        /// A network namespace file (e.g. /run/netns/NAME or /proc/PID/ns/net).
        netns: Option<PathBuf>,
    },
    /// A Unix stream socket a user-mode network stack (passt) listens on, carrying frames
    /// with passt's and QEMU's `-netdev stream` framing: a 32-bit big-endian length, then the
    /// Ethernet frame.
    Stream {
        /// The socket's path.
        socket: PathBuf,
    },
    /// A tap already opened (with the virtio-net header, as the tap backend opens one) and set
    /// up by the caller, named `name`; each backend duplicates the descriptor. The tap lives
    /// as long as any copy does.
    OpenTap {
        /// The tap's interface name, for messages.
        name: String,
        /// Its queue descriptor.
        fd: SharedFd,
    },
    /// Our end of a connected Unix stream socket pair whose other end a user-mode network
    /// stack holds (`passt --fd`), with the same framing as [`NetBackend::Stream`]. Nothing to
    /// wait for or connect to; each backend duplicates it for its device.
    Connected(SharedFd),
}

/// A descriptor several owners hold (a plan is cloned); equal when it is the same one.
#[derive(Debug, Clone)]
pub struct SharedFd(pub std::sync::Arc<std::os::fd::OwnedFd>);

impl PartialEq for SharedFd {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SharedFd {}
