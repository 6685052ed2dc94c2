//! The guest's boot initramfs: microvm's agent (built into this binary by build.rs) packed as
//! `/init`, cached on disk under a name derived from the agent's content.

use std::io;
use std::path::{Path, PathBuf};

/// The static guest agent.
const INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/microvm-init"));

/// The cached base initramfs, written on first use. Concurrent first uses each write their own
/// temporary file and rename it into place, so a reader never sees half an archive.
pub fn base() -> io::Result<PathBuf> {
    let dir = crate::host::data_dir().join("initramfs");
    let path = dir.join(format!("agent-{}.cpio", env!("MICROVM_INIT_HASH")));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir)?;
    write_atomically(&path, &microvm_rootfs_builder::base_initramfs(INIT))?;
    Ok(path)
}

/// Packs the directory `root` as an extra archive at `out`, unpacked by the kernel over the base;
/// an archive over `max` bytes fails with [`io::ErrorKind::FileTooLarge`] before it is read.
pub fn tree(root: &Path, out: &Path, max: u64) -> io::Result<()> {
    let mut cpio = microvm_rootfs_builder::Cpio::with_limit(max);
    cpio.tree(root, "/")?;
    write_atomically(out, &cpio.finish())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
