//! What a container is made of, fixed when it is created (`config.json` in its directory): the
//! image, the resolved process, volumes and the VM's size and backend. Every start of the
//! container boots a VM from this and nothing else.

use std::path::PathBuf;

use crate::network::NetworkConfig;
use serde::{Deserialize, Serialize};

use microvm_agent_protocol::{DeviceSpec, GuestMount, ProcessOptions};

use crate::backend::Hypervisor;
use crate::volumes::{Staged, Volume};

/// The container's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootSource {
    /// A stored image, pinned by manifest digest: a tag that moves later does not change the
    /// layers under this container's sandbox layer.
    Image {
        /// The name the user gave, as stored (`demo:latest`).
        reference: String,
        /// The manifest digest (`sha256:...`).
        digest: String,
    },
    /// A host directory copied into the VM's initramfs at each start (`--rootfs`): it has no
    /// sandbox layer, so nothing written inside outlives a run.
    Directory(PathBuf),
    /// An OCI bundle's root (`microvm-runtime`): a host directory the engine prepared, shared
    /// over virtio-fs together with the bundle's bind mounts, all behind one file server.
    Bundle {
        /// The bundle's `root.path`, absolute.
        rootfs: PathBuf,
        /// `root.readonly`: enforced by the host's bind of it.
        read_only: bool,
        /// The bundle's bind mounts, as entries of the same share
        /// ([`microvm_agent_protocol::GuestMountSource::Shared`] names them).
        binds: Vec<Staged>,
    },
}

/// The process to run, as docker's rules resolved it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessConfig {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// User spec, resolved in the guest.
    pub user: String,
    /// Give the process a terminal.
    pub tty: bool,
    /// Keep stdin open (`-i`).
    pub stdin: bool,
    /// Umask, limits, capabilities, exact groups (an OCI bundle's `process`).
    #[serde(default)]
    pub options: ProcessOptions,
}

/// Everything `create` fixed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerConfig {
    /// 64 hex digits.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// When it was created, seconds since the Unix epoch.
    pub created: f64,
    /// Its root.
    pub root: RootSource,
    /// Its process.
    pub process: ProcessConfig,
    /// Hostname inside the VM (empty: `microvm`).
    pub hostname: String,
    /// Volumes, in order.
    pub volumes: Vec<Volume>,
    /// Backend, resolved (never `auto`).
    pub hypervisor: Hypervisor,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// vCPUs.
    pub cpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// `--timeout`: the VM is stopped after this many seconds of a run.
    pub timeout: Option<f64>,
    /// The signal `stop` sends first (the image's StopSignal, else SIGTERM), as a number.
    pub stop_signal: i32,
    /// `--rm`: removed when its process exits.
    pub auto_remove: bool,
    /// Mounts made in the guest after the root (an OCI bundle's `mounts`).
    #[serde(default)]
    pub guest_mounts: Vec<GuestMount>,
    /// Device nodes made in the guest (an OCI bundle's `linux.devices`).
    #[serde(default)]
    pub devices: Vec<DeviceSpec>,
    /// A start stops once the process is ready and runs it on a `start` request (an OCI
    /// runtime's `create`).
    #[serde(default)]
    pub wait_start: bool,
    /// Its network (records from before networking have none).
    #[serde(default)]
    pub network: NetworkConfig,
    /// `--storage-size`: the sandbox layer's size in bytes (default
    /// [`crate::scratch::DEFAULT_SIZE`]).
    #[serde(default)]
    pub storage_size: Option<u64>,
}

impl ContainerConfig {
    /// The sandbox layer's size in bytes.
    pub fn sandbox_size(&self) -> u64 {
        self.storage_size.unwrap_or(crate::scratch::DEFAULT_SIZE)
    }

    /// The first 12 hex digits, as `ps` shows them.
    pub fn short_id(&self) -> &str {
        &self.id[..12.min(self.id.len())]
    }

    /// The image reference, or the directory for `--rootfs`.
    pub fn image_name(&self) -> String {
        match &self.root {
            RootSource::Image { reference, .. } => reference.clone(),
            RootSource::Directory(d) => d.display().to_string(),
            RootSource::Bundle { rootfs, .. } => rootfs.display().to_string(),
        }
    }
}

/// Parses a signal as docker does: `SIGTERM`, `TERM`, `term` or a number (1 to 64).
pub fn parse_signal(s: &str) -> Result<i32, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        return Err(format!("invalid signal: {s} (signals are 1 to 64)"));
    }
    let upper = t.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let full = format!("SIG{name}");
    full.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| format!("invalid signal: {s}"))
}

#[cfg(test)]
mod tests {
    use super::parse_signal;

    #[test]
    fn signals_parse_like_docker() {
        for (s, n) in [
            ("SIGTERM", 15),
            ("TERM", 15),
            ("kill", 9),
            ("9", 9),
            ("sigquit", 3),
        ] {
            assert_eq!(parse_signal(s), Ok(n), "{s}");
        }
        for bad in ["", "0", "65", "SIGNOPE", "-1", "1.5"] {
            assert!(parse_signal(bad).is_err(), "{bad}");
        }
    }
}
