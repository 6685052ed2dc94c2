//! What this host offers: KVM presence and flavour, RAM, and the default guest kernel.

use std::path::{Path, PathBuf};

use kvm_ioctls::{Cap, Kvm};

/// Host RAM in MiB (from sysinfo).
pub fn total_ram_mib() -> u64 {
    nix::sys::sysinfo::sysinfo()
        .map(|i| i.ram_total() >> 20)
        .unwrap_or(u64::MAX)
}

/// Whether /dev/kvm is PVM, the shadow-paging KVM that runs inside cloud VMs without VMX/SVM.
pub fn is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The vendor module backing /dev/kvm, if any is loaded.
pub fn kvm_flavour() -> &'static str {
    if is_pvm() {
        "PVM (kvm_pvm: shadow paging, guest ring 0 emulated)"
    } else if Path::new("/sys/module/kvm_intel").exists() {
        "Intel VMX (kvm_intel)"
    } else if Path::new("/sys/module/kvm_amd").exists() {
        "AMD SVM (kvm_amd)"
    } else {
        "unknown"
    }
}

static ROOT_OVERRIDE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Sets the data directory for this process (`--root`); the first call wins.
pub fn set_data_dir(root: PathBuf) {
    let _ = ROOT_OVERRIDE.set(root);
}

/// microvm's data directory: `--root`, else `$MICROVM_ROOT`, else `/var/lib/microvm` for root, else
/// `$XDG_DATA_HOME/microvm` (default `~/.local/share/microvm`).
pub fn data_dir() -> PathBuf {
    if let Some(root) = ROOT_OVERRIDE.get() {
        return root.clone();
    }
    if let Some(root) = std::env::var_os("MICROVM_ROOT").filter(|r| !r.is_empty()) {
        return PathBuf::from(root);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/microvm");
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
                .join(".local/share")
        });
    base.join("microvm")
}

/// A private directory for one VM's sockets and logs: under `$XDG_RUNTIME_DIR/microvm` or
/// `/run/microvm` (root), else the temporary directory.
pub fn runtime_dir() -> PathBuf {
    // Empty counts as unset (conmon passes `XDG_RUNTIME_DIR=` to runtimes).
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("microvm");
    }
    if nix::unistd::geteuid().is_root() && Path::new("/run").is_dir() {
        return PathBuf::from("/run/microvm");
    }
    std::env::temp_dir().join(format!("microvm-{}", nix::unistd::geteuid()))
}

/// Makes `dir` (and its parents) if missing, then checks that it is a real directory (not a
/// symlink) owned by us that nobody else may enter: in a shared temporary directory, another
/// user could otherwise make it first and watch or replace our sockets and logs.
pub fn private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    let why = if !meta.file_type().is_dir() {
        Some("is not a directory (a symlink?)".to_string())
    } else if meta.uid() != me {
        Some(format!(
            "belongs to uid {}, not to us (uid {me})",
            meta.uid()
        ))
    } else if meta.permissions().mode() & 0o077 != 0 {
        Some(format!(
            "has mode {:o}: others may use it (chmod 700 it, or remove it)",
            meta.permissions().mode() & 0o7777
        ))
    } else {
        None
    };
    match why {
        Some(why) => Err(format!("{} {why}", dir.display())),
        None => Ok(()),
    }
}

/// Where microvm looks for a guest kernel when `--kernel` is not given, in order.
pub fn default_kernel_candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os("MICROVM_KERNEL") {
        v.push(PathBuf::from(p));
    }
    if let Some(cache) = std::env::var_os("MICROVM_KERNEL_CACHE") {
        v.push(PathBuf::from(cache).join("vmlinux"));
    }
    v.push(data_dir().join("kernel/vmlinux"));
    if data_dir() != Path::new("/var/lib/microvm") {
        v.push(PathBuf::from("/var/lib/microvm/kernel/vmlinux"));
    }
    v
}

/// The first default kernel that exists.
pub fn default_kernel() -> Option<PathBuf> {
    default_kernel_candidates()
        .into_iter()
        .find(|p| p.is_file())
}

/// A report for `microvm info`.
pub fn info_report() -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<22} {v}\n"));
    line("microvm", env!("CARGO_PKG_VERSION").to_string());
    let kvm_ok = match Kvm::new() {
        Ok(kvm) => {
            line("kvm", "/dev/kvm present".into());
            line("kvm api version", kvm.get_api_version().to_string());
            line("kvm flavour", kvm_flavour().into());
            let caps = [
                (Cap::Irqchip, "irqchip"),
                (Cap::Pit2, "pit2"),
                (Cap::ImmediateExit, "immediate-exit"),
                (Cap::TscDeadlineTimer, "tsc-deadline"),
                (Cap::Irqfd, "irqfd"),
                (Cap::Ioeventfd, "ioeventfd"),
            ];
            let have: Vec<_> = caps
                .iter()
                .map(|(c, n)| format!("{n}={}", if kvm.check_extension(*c) { "yes" } else { "no" }))
                .collect();
            line("kvm capabilities", have.join(" "));
            line("kvm max vcpus", kvm.get_max_vcpus().to_string());
            true
        }
        Err(e) => {
            line("kvm", format!("not usable: /dev/kvm: {e}"));
            false
        }
    };
    line("host ram", format!("{} MiB", total_ram_mib()));
    match default_kernel() {
        Some(k) => line("default guest kernel", k.display().to_string()),
        None => {
            let looked: Vec<_> = default_kernel_candidates()
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            line(
                "default guest kernel",
                format!("none (looked in {}); pass --kernel", looked.join(", ")),
            )
        }
    }
    let boots_linux = if !kvm_ok {
        "no: no usable KVM"
    } else if is_pvm() {
        "slowly (about 90 s to init): PVM emulates the guest kernel's ring-0 code; \
         `--hypervisor kvm` asks for it, `auto` does not pick it"
    } else {
        "yes"
    };
    line("kvm boots linux", boots_linux.into());
    if kvm_ok && is_pvm() {
        let hidden: Vec<_> = crate::vmm::pvm::HIDDEN.iter().map(|f| f.name).collect();
        line(
            "pvm compatibility",
            format!(
                "guest CPUID hides {}; kernel option {} (our kernel's patch guard); \
                 ELF vmlinux and an uncompressed initramfs",
                hidden.join(" "),
                crate::vmm::pvm::GUARD_PARAM
            ),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_run_directory_must_be_ours_alone() {
        let base = std::env::temp_dir().join(format!("microvm-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let mine = base.join("made/by/us");
        private_dir(&mine).unwrap();
        let mode = std::fs::metadata(&mine).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        private_dir(&mine).unwrap();

        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = private_dir(&open).unwrap_err();
        assert!(e.contains("others may use it"), "{e}");

        let link = base.join("link");
        std::os::unix::fs::symlink(&mine, &link).unwrap();
        let e = private_dir(&link).unwrap_err();
        assert!(e.contains("not a directory"), "{e}");

        if nix::unistd::geteuid().is_root() {
            let theirs = base.join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
            nix::unistd::chown(&theirs, Some(65534.into()), Some(65534.into())).unwrap();
            let e = private_dir(&theirs).unwrap_err();
            assert!(e.contains("belongs to uid 65534"), "{e}");
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
