//! Assembles the container's root: read-only squashfs layer disks stacked by overlayfs under
//! an upper directory on the writable scratch disk, then switches into it (a chroot: the
//! initramfs root cannot be pivoted away from).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use microvm_agent_protocol::RootSpec;
use nix::mount::{mount, MsFlags};

const BASE: &str = "/run/microvm";

/// Maps virtio-blk serials to their device nodes, from /sys/block/*/serial.
fn disks_by_serial() -> Result<HashMap<String, PathBuf>, String> {
    let mut map = HashMap::new();
    let entries = std::fs::read_dir("/sys/block").map_err(|e| format!("/sys/block: {e}"))?;
    for e in entries.flatten() {
        let name = e.file_name();
        if let Ok(serial) = std::fs::read_to_string(e.path().join("serial")) {
            map.insert(
                serial.trim_end_matches(['\n', '\0']).to_string(),
                Path::new("/dev").join(&name),
            );
        }
    }
    Ok(map)
}

fn mkdir(p: &Path) -> Result<(), String> {
    std::fs::create_dir_all(p).map_err(|e| format!("mkdir {}: {e}", p.display()))
}

/// Mounts the layers and the scratch disk, stacks them at a new root and mounts the kernel
/// filesystems inside it; returns the root, which [`enter`] switches to.
pub fn assemble(spec: &RootSpec) -> Result<PathBuf, String> {
    if spec.layers.is_empty() {
        return Err("the image has no layers".into());
    }
    let disks = disks_by_serial()?;
    let find = |serial: &str| {
        disks.get(serial).cloned().ok_or_else(|| {
            format!(
                "no disk with serial {serial:?} (have {:?})",
                disks.keys().collect::<Vec<_>>()
            )
        })
    };
    let base = Path::new(BASE);
    let mut lowers = Vec::with_capacity(spec.layers.len());
    for (i, serial) in spec.layers.iter().enumerate() {
        let dir = base.join(format!("layers/{i}"));
        mkdir(&dir)?;
        let flags = MsFlags::MS_RDONLY | MsFlags::MS_NODEV;
        mount(
            Some(&find(serial)?),
            &dir,
            Some("squashfs"),
            flags,
            None::<&str>,
        )
        .map_err(|e| format!("mount layer {serial}: {e}"))?;
        lowers.push(dir);
    }
    let scratch = base.join("scratch");
    mkdir(&scratch)?;
    mount(
        Some(&find(&spec.scratch)?),
        &scratch,
        Some("ext4"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| format!("mount scratch disk: {e}"))?;
    let (upper, work, root) = (
        scratch.join("upper"),
        scratch.join("work"),
        base.join("root"),
    );
    for d in [&upper, &work, &root] {
        mkdir(d)?;
    }
    // overlayfs lists the topmost lower layer first.
    let lowerdir: Vec<String> = lowers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowerdir.join(":"),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        &root,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| format!("mount overlay root: {e}"))?;
    // `commit` reads the container's changes from here after the chroot.
    crate::diff::keep_upper(&upper)?;

    crate::system::mount_kernel_filesystems(&root)?;
    Ok(root)
}

/// Mounts the scratch disk with this serial read-only (a journal left by a VM that was powered
/// off is replayed: the disk itself is writable) and keeps its upper directory for a diff.
pub fn mount_scratch_read_only(serial: &str) -> Result<(), String> {
    let disks = disks_by_serial()?;
    let dev = disks
        .get(serial)
        .ok_or_else(|| format!("no disk with serial {serial:?}"))?;
    let scratch = Path::new(BASE).join("scratch");
    mkdir(&scratch)?;
    mount(
        Some(dev),
        &scratch,
        Some("ext4"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("mount scratch disk read-only: {e}"))?;
    let upper = scratch.join("upper");
    if !upper.is_dir() {
        // Never started: no changes.
        return Err("the container has never run: it has no changes".into());
    }
    crate::diff::keep_upper(&upper)
}

/// Makes `root` the process's root directory (and working directory).
pub fn enter(root: &Path) -> Result<(), String> {
    nix::unistd::chroot(root).map_err(|e| format!("chroot {}: {e}", root.display()))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))
}
