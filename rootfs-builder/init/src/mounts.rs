//! An OCI bundle's mounts, made in the container's root as runc makes them: kernel filesystems
//! made by the guest kernel, host files and directories bound from the root's share (the host
//! bound each one there, read-only on the host when the mount is), mount options split into
//! flags and filesystem data, and the device nodes a container's /dev holds.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use microvm_agent_protocol::{DeviceSpec, GuestMount, GuestMountSource};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use crate::volumes::{create_missing, resolve_in_root};

/// Where the root's share is mounted, outside the container's root.
pub const SHARE: &str = "/run/microvm/share";

/// The devices every container's /dev has (runc's defaults): name, major, minor.
const DEFAULT_DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Flags and data of a mount, from its options.
#[derive(Debug, PartialEq, Eq)]
struct Options {
    flags: MsFlags,
    data: String,
}

/// Splits mount(8) options into mount flags and filesystem data; propagation options are
/// dropped (nothing in the guest shares mounts with anything else).
fn parse_options(options: &[String]) -> Options {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "bind" | "rbind" | "defaults" | "private" | "rprivate" | "shared" | "rshared"
            | "slave" | "rslave" | "unbindable" | "runbindable" | "tmpcopyup" | "notmpcopyup"
            | "copy-symlink" | "idmap" | "ridmap" | "z" | "Z" | "U" => {
                (MsFlags::empty(), MsFlags::empty())
            }
            other => {
                data.push(other.to_string());
                (MsFlags::empty(), MsFlags::empty())
            }
        };
        flags = (flags | set) & !clear;
    }
    Options {
        flags,
        data: data.join(","),
    }
}

/// Makes every mount under `root` in order, then the devices. Device nodes are only ever made
/// in a /dev the guest mounted itself (engines mount a tmpfs there): in a /dev of the shared
/// root they would be made on the host's disk.
pub fn apply_all(root: &Path, mounts: &[GuestMount], devices: &[DeviceSpec]) -> Result<(), String> {
    for m in mounts {
        apply(root, m)
            .map_err(|e| crate::system::with_kernel_message(format!("mount {}: {e}", m.target)))?;
    }
    let own_dev = mounts
        .iter()
        .any(|m| m.target == "/dev" && matches!(m.source, GuestMountSource::Kernel { .. }));
    if !own_dev {
        if !devices.is_empty() {
            crate::log("the bundle mounts no /dev of its own: its devices are not made");
        }
        return Ok(());
    }
    for d in devices {
        device(root, d).map_err(|e| format!("device {}: {e}", d.path))?;
    }
    Ok(())
}

fn apply(root: &Path, m: &GuestMount) -> Result<(), String> {
    let target = resolve_in_root(root, Path::new(&m.target))?;
    let Options { flags, data } = parse_options(&m.options);
    match &m.source {
        GuestMountSource::Kernel { fstype, source } => {
            // The guest runs cgroup v2 alone: a bundle asking for "cgroup" gets its hierarchy.
            let fstype = if fstype == "cgroup" {
                "cgroup2"
            } else {
                fstype
            };
            create_missing(&target, true)?;
            let data = (!data.is_empty()).then_some(data.as_str());
            mount(Some(source.as_str()), &target, Some(fstype), flags, data)
                .map_err(|e| format!("{fstype}: {e}"))?;
            if m.target == "/dev" {
                default_devices(&target);
            }
            Ok(())
        }
        GuestMountSource::Shared { entry, recursive } => {
            if entry.is_empty() || entry.contains('/') || entry == "." || entry == ".." {
                return Err(format!("bad share entry {entry:?}"));
            }
            let source = Path::new(SHARE).join(entry);
            let is_dir = source
                .metadata()
                .map_err(|e| format!("{}: {e}", source.display()))?
                .is_dir();
            create_missing(&target, is_dir)?;
            let mut bind = MsFlags::MS_BIND;
            if *recursive {
                bind |= MsFlags::MS_REC;
            }
            mount(Some(&source), &target, None::<&str>, bind, None::<&str>)
                .map_err(|e| format!("bind: {e}"))?;
            // A bind takes its flags only on a remount.
            if !flags.is_empty() {
                mount(
                    None::<&str>,
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
                    None::<&str>,
                )
                .map_err(|e| format!("remount with {flags:?}: {e}"))?;
            }
            Ok(())
        }
    }
}

/// runc's default devices and /dev links in `dev`, where missing; failures (a read-only /dev)
/// are logged only.
fn default_devices(dev: &Path) {
    for (name, major, minor) in DEFAULT_DEVICES {
        let path = dev.join(name);
        if path.symlink_metadata().is_ok() {
            continue;
        }
        let made = mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .and_then(|()| {
            // mknod's mode passes through the umask.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
                .map_err(|_| nix::errno::Errno::EPERM)
        });
        if let Err(e) = made {
            crate::log(&format!("mknod {}: {e}", path.display()));
        }
    }
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let link = dev.join(link);
        if link.symlink_metadata().is_err() {
            let _ = std::os::unix::fs::symlink(to, &link);
        }
    }
}

/// One device node from the bundle.
fn device(root: &Path, d: &DeviceSpec) -> Result<(), String> {
    let path: PathBuf = resolve_in_root(root, Path::new(&d.path))?;
    let kind = match d.kind {
        'c' | 'u' => SFlag::S_IFCHR,
        'b' => SFlag::S_IFBLK,
        'p' => SFlag::S_IFIFO,
        other => return Err(format!("unknown device type {other:?}")),
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("mkdir: {e}"))?;
    }
    let _ = std::fs::remove_file(&path);
    mknod(
        &path,
        kind,
        Mode::from_bits_truncate(d.mode & 0o7777),
        makedev(d.major, d.minor),
    )
    .map_err(|e| format!("mknod: {e}"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(d.mode & 0o7777))
        .map_err(|e| format!("chmod: {e}"))?;
    nix::unistd::chown(
        &path,
        Some(nix::unistd::Uid::from_raw(d.uid)),
        Some(nix::unistd::Gid::from_raw(d.gid)),
    )
    .map_err(|e| format!("chown: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let o = |s: &[&str]| parse_options(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        assert_eq!(
            o(&["nosuid", "strictatime", "mode=755", "size=65536k"]),
            Options {
                flags: MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
                data: "mode=755,size=65536k".into()
            }
        );
        assert_eq!(
            o(&["rbind", "rprivate", "ro", "rw", "nodev"]).flags,
            MsFlags::MS_NODEV
        );
        assert_eq!(o(&["bind", "ro"]).data, "");
    }
}
