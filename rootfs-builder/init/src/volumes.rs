//! Volumes: host directories and single host files shared over virtio-fs, mounted into the
//! container's root before the process starts. A single-file share holds one file
//! ([`SHARED_FILE_NAME`]); it is mounted out of the container's sight and the file bound in.

use std::path::{Component, Path, PathBuf};

use microvm_agent_protocol::{MountSpec, SHARED_FILE_NAME};
use nix::mount::{mount, MsFlags};

/// Where single-file shares are mounted, outside the container's root.
const FILE_SHARES: &str = "/run/microvm/files";
/// Symbolic links followed while resolving one target, as the kernel's own limit.
const MAX_LINKS: usize = 40;

/// Mounts every volume under `root` (the container's root, before it is entered), in order.
pub fn mount_all(root: &Path, mounts: &[MountSpec]) -> Result<(), String> {
    for (i, m) in mounts.iter().enumerate() {
        mount_one(root, i, m).map_err(|e| format!("volume {}: {e}", m.target))?;
    }
    Ok(())
}

fn mount_one(root: &Path, index: usize, m: &MountSpec) -> Result<(), String> {
    let mut flags = MsFlags::empty();
    if m.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    let target = resolve_in_root(root, Path::new(&m.target))?;
    // A directory share is mounted on its target; a file share out of the container's sight,
    // its one file then bound onto the target.
    let mount_point = if m.file {
        let dir = Path::new(FILE_SHARES).join(index.to_string());
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        dir
    } else {
        create_missing(&target, true)?;
        target.clone()
    };
    mount(
        Some(m.tag.as_str()),
        &mount_point,
        Some("virtiofs"),
        flags,
        None::<&str>,
    )
    .map_err(|e| format!("mount virtio-fs share {}: {e}", m.tag))?;
    if m.file {
        create_missing(&target, false)?;
        bind(&mount_point.join(SHARED_FILE_NAME), &target, m.read_only)?;
    }
    Ok(())
}

/// Binds `source` at `target`, read-only if asked (a bind mount takes MS_RDONLY only on a
/// remount).
fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), String> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("bind {}: {e}", source.display()))?;
    if read_only {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
            .map_err(|e| format!("make {} read-only: {e}", target.display()))?;
    }
    Ok(())
}

/// Creates the mount point if it does not exist (a directory, or an empty file), with its parents.
pub fn create_missing(target: &Path, dir: bool) -> Result<(), String> {
    if target.symlink_metadata().is_ok() {
        return Ok(());
    }
    let err = |e: std::io::Error| format!("create {}: {e}", target.display());
    if dir {
        return std::fs::create_dir_all(target).map_err(err);
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(target)
        .map(drop)
        .map_err(err)
}

/// The host-side path of `target` (absolute, inside the container) under `root`, following the
/// container's symbolic links as the container would see them: an absolute link restarts at
/// `root`, and `..` never climbs above it. Components that do not exist yet are kept as named.
pub fn resolve_in_root(root: &Path, target: &Path) -> Result<PathBuf, String> {
    let mut pending: Vec<PathBuf> = target
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(PathBuf::from(n)),
            Component::ParentDir => Some(PathBuf::from("..")),
            _ => None,
        })
        .collect();
    let mut resolved: Vec<PathBuf> = Vec::new();
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == Path::new("..") {
            resolved.pop();
            continue;
        }
        let here: PathBuf = root.join(resolved.iter().collect::<PathBuf>()).join(&name);
        match std::fs::read_link(&here) {
            Ok(link) => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(format!("too many symbolic links in {}", target.display()));
                }
                if link.is_absolute() {
                    resolved.clear();
                }
                for c in link.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(PathBuf::from(n)),
                        Component::ParentDir => pending.push(PathBuf::from("..")),
                        _ => {}
                    }
                }
            }
            // Not a link (or not there yet): take the name as it is.
            Err(_) => resolved.push(name),
        }
    }
    Ok(root.join(resolved.iter().collect::<PathBuf>()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn links_resolve_inside_the_root() {
        let root = std::env::temp_dir().join(format!("init-vol-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("run/lock")).unwrap();
        std::fs::create_dir_all(root.join("var")).unwrap();
        symlink("/run", root.join("var/run")).unwrap();
        symlink("../../..", root.join("run/up")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        let r = |t: &str| resolve_in_root(&root, Path::new(t)).unwrap();
        assert_eq!(r("/var/run/lock"), root.join("run/lock"));
        assert_eq!(r("/var/run/new/dir"), root.join("run/new/dir"));
        assert_eq!(r("/run/up/etc"), root.join("etc"), "never above the root");
        assert_eq!(r("/a/../../b"), root.join("b"));
        assert!(resolve_in_root(&root, Path::new("/loop/x")).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
