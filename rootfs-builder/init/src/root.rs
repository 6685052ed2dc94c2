//! Assembles the container's root: read-only squashfs layer disks stacked by overlayfs under
//! an upper directory on the writable scratch disk, then switches into it (a chroot: the
//! initramfs root cannot be pivoted away from).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use microvm_agent_protocol::{RootSpec, SharedRoot};
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
    mount_overlay(&lowerdir.join(":"), &upper, &work, &root)
        .map_err(|e| format!("mount overlay root: {e}"))?;
    // `commit` reads the container's changes from here after the chroot.
    crate::diff::keep_upper(&upper)?;

    crate::system::mount_kernel_filesystems(&root)?;
    Ok(root)
}

/// Mounts the host's share and binds its root directory at a new root (read-only when asked:
/// the host's bind is read-only as well, this makes the guest say so at once); the bundle's
/// mounts are made in it afterwards.
pub fn assemble_shared(spec: &SharedRoot) -> Result<PathBuf, String> {
    if spec.path.is_empty() || spec.path.contains('/') || spec.path == ".." {
        return Err(format!("bad shared root directory {:?}", spec.path));
    }
    let share = Path::new(crate::mounts::SHARE);
    mkdir(share)?;
    mount(
        Some(spec.tag.as_str()),
        share,
        Some("virtiofs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| format!("mount the root's share {}: {e}", spec.tag))?;
    let root = Path::new(BASE).join("root");
    mkdir(&root)?;
    let source = share.join(&spec.path);
    // The entry is a mount on the host, so a submount (an automount point) here: overlayfs
    // refuses one that has not been crossed yet, so cross it.
    std::fs::read_dir(&source).map_err(|e| format!("the shared root {}: {e}", source.display()))?;
    if spec.read_only {
        // The host's bind of a read-only root refuses writes, so mount points the bundle's
        // mounts need and the root lacks are made in a small overlay upper in guest memory;
        // [`make_read_only`] closes the root once the mounts are made (as runc does).
        let upper = Path::new(BASE).join("ro-upper");
        mkdir(&upper)?;
        mount(
            Some("tmpfs"),
            &upper,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("size=1m,mode=0755"),
        )
        .map_err(|e| format!("mount the read-only root's tmpfs: {e}"))?;
        let (up, work) = (upper.join("upper"), upper.join("work"));
        mkdir(&up)?;
        mkdir(&work)?;
        mount_overlay(&source.display().to_string(), &up, &work, &root).map_err(|e| {
            crate::system::with_kernel_message(format!("mount the read-only root: {e}"))
        })?;
    } else {
        mount(
            Some(&source),
            &root,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("bind the shared root: {e}"))?;
    }
    Ok(root)
}

/// Mounts an overlay of `lowerdir` (`:`-separated, topmost first) under `upper` at `target`.
fn mount_overlay(lowerdir: &str, upper: &Path, work: &Path, target: &Path) -> nix::Result<()> {
    let options = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
}

/// Makes the root mount itself read-only (its submounts keep their own flags).
pub fn make_read_only(root: &Path) -> Result<(), String> {
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    mount(None::<&str>, root, None::<&str>, flags, None::<&str>)
        .map_err(|e| format!("make the root read-only: {e}"))
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
