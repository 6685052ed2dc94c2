//! The guest system around the container process: filesystems, hostname, power.

use nix::mount::{mount, MsFlags};
use std::path::Path;

/// Mounts /proc, /sys, /dev (devtmpfs), /dev/pts, /dev/shm, /run, /tmp and the cgroup2
/// hierarchy, and adds the usual /dev links: the initramfs root the agent starts in.
pub fn mount_basics() -> Result<(), String> {
    let scratch_dirs = [
        (
            "run",
            "/run",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=0755",
        ),
        (
            "tmp",
            "/tmp",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=1777",
        ),
    ];
    mount_kernel_filesystems(Path::new("/"))?;
    for (source, target, flags, data) in scratch_dirs {
        mount_one(Path::new("/"), source, target, "tmpfs", flags, data)?;
    }
    Ok(())
}

/// Mounts the kernel's filesystems (/proc, /sys, /dev, /dev/pts, /dev/shm, cgroup2) under
/// `root`, as a container runtime would, and adds the usual /dev links.
pub fn mount_kernel_filesystems(root: &Path) -> Result<(), String> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mounts: [(&str, &str, &str, MsFlags, &str); 6] = [
        ("proc", "/proc", "proc", nodev, ""),
        ("sysfs", "/sys", "sysfs", nodev, ""),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            "mode=0755",
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620,gid=5",
        ),
        ("shm", "/dev/shm", "tmpfs", nodev, "mode=1777"),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", nodev, ""),
    ];
    for (source, target, fstype, flags, data) in mounts {
        mount_one(root, source, target, fstype, flags, data)?;
    }
    for (link, to) in [
        ("/dev/ptmx", "pts/ptmx"),
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let link = root.join(link.trim_start_matches('/'));
        if !link.exists() {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(to, &link)
                .map_err(|e| format!("symlink {}: {e}", link.display()))?;
        }
    }
    Ok(())
}

fn mount_one(
    root: &Path,
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: &str,
) -> Result<(), String> {
    let target = root.join(target.trim_start_matches('/'));
    std::fs::create_dir_all(&target).map_err(|e| format!("mkdir {}: {e}", target.display()))?;
    let data = (!data.is_empty()).then_some(data);
    mount(Some(source), &target, Some(fstype), flags, data)
        .map_err(|e| format!("mount {fstype} on {}: {e}", target.display()))
}

/// Sets the hostname; a failure is only logged.
pub fn set_hostname(name: &str) {
    if let Err(e) = nix::unistd::sethostname(name) {
        crate::log(&format!("sethostname {name}: {e}"));
    }
}

/// Ends the VM: a reboot, which the kernel turns into the reset its command line asks for
/// (`reboot=k`: i8042, `reboot=t`: triple fault) and the VMM into the VM's end. Power-off would
/// only halt: there is no ACPI to switch the machine off.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Unreachable in practice; never return from PID 1 (the kernel would panic).
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// The kernel's last log message, which often says why a mount failed where the errno does
/// not (read from /dev/kmsg without waiting; empty if there is none).
pub fn last_kernel_message() -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut kmsg) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return String::new();
    };
    let mut last = String::new();
    let mut record = vec![0u8; 8192];
    // One record per read, oldest first, until EAGAIN.
    while let Ok(n) = kmsg.read(&mut record) {
        if n == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&record[..n]);
        if let Some((_, msg)) = text.split_once(';') {
            last = msg.lines().next().unwrap_or_default().to_string();
        }
    }
    last
}

/// `error` with the kernel's last message appended, when there is one.
pub fn with_kernel_message(error: String) -> String {
    match last_kernel_message() {
        m if m.is_empty() => error,
        m => format!("{error} (kernel: {m})"),
    }
}
