//! Flags every command that starts a VM shares: kernel, vCPUs, memory, timeout.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// The VM's size and kernel.
#[derive(Debug, Args)]
pub struct VmArgs {
    /// Guest kernel: ELF vmlinux (PVH entry used when present) or bzImage [default:
    /// $MICROVM_KERNEL, then the kernel scripts/build-kernel made].
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u8,
    /// Guest RAM: MiB, or with a k, m or g suffix.
    #[arg(long, value_name = "SIZE", default_value = "256", value_parser = super::parse_memory_mib)]
    pub memory: u64,
    /// Stop the VM after this many seconds (exit status 124).
    #[arg(long, value_name = "S")]
    pub timeout: Option<f64>,
}

impl VmArgs {
    /// `--timeout` as a duration; a one-line error for a nonsensical value.
    pub fn timeout(&self) -> Result<Option<Duration>, String> {
        match self.timeout {
            None => Ok(None),
            Some(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Some(Duration::from_secs_f64(s))),
            Some(s) => Err(format!(
                "--timeout must be a positive number of seconds, not {s}"
            )),
        }
    }

    /// `--cpus` within what every backend runs (the same bound for both, checked before
    /// anything starts).
    pub fn check_cpus(&self) -> Result<(), String> {
        if self.cpus == 0 || self.cpus > crate::plan::MAX_CPUS {
            return Err(format!(
                "--cpus must be between 1 and {}, not {}",
                crate::plan::MAX_CPUS,
                self.cpus
            ));
        }
        Ok(())
    }

    /// `--kernel`, else the default guest kernel; checked to be a file, so a typo fails before
    /// any work (packing a root, starting helpers) is done.
    pub fn kernel(&self) -> Result<PathBuf, String> {
        let path = self.kernel.clone().or_else(crate::host::default_kernel).ok_or_else(|| {
            "no guest kernel found: build it with scripts/build-kernel, or pass --kernel PATH (or set MICROVM_KERNEL)".to_string()
        })?;
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(path),
            Ok(_) => Err(format!(
                "cannot open the kernel {}: not a file",
                path.display()
            )),
            Err(e) => Err(format!("cannot open the kernel {}: {e}", path.display())),
        }
    }
}
