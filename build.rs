//! Builds the guest init (rootfs-builder/init) as a static binary for the guest and hands it to
//! the microvm crate, which packs it into the boot initramfs at run time.
//!
//! The init needs `+crt-static` on the gnu target; passing that through RUSTFLAGS without an
//! explicit `--target` would also hit proc-macros, so the init gets its own cargo invocation with
//! its own target directory. `MICROVM_INIT_BIN` may point at a prebuilt init instead.

use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    for dir in [
        "rootfs-builder/init/src",
        "rootfs-builder/init/Cargo.toml",
        "crates/agent-protocol/src",
        "crates/agent-protocol/Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={dir}");
    }
    println!("cargo:rerun-if-env-changed=MICROVM_INIT_BIN");

    let init = match std::env::var_os("MICROVM_INIT_BIN") {
        Some(prebuilt) => PathBuf::from(prebuilt),
        None => build_init(&manifest),
    };
    let bytes = std::fs::read(&init)
        .unwrap_or_else(|e| panic!("cannot read the guest init {}: {e}", init.display()));
    std::fs::write(out.join("microvm-init"), &bytes).unwrap();
    // A content hash names the cached initramfs, so a new init never meets a stale archive.
    println!("cargo:rustc-env=MICROVM_INIT_HASH={:016x}", fnv1a64(&bytes));
}

fn build_init(manifest: &Path) -> PathBuf {
    let target_root = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("target"));
    let target_dir = target_root.join("guest-init");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(manifest)
        .args([
            "build",
            "--release",
            "--package",
            "microvm-init",
            "--target",
            GUEST_TARGET,
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static");
    // Nothing of the outer build's configuration may leak in (clippy's wrapper, jobserver, flags).
    for var in [
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("cannot run cargo to build the guest init");
    assert!(
        status.success(),
        "building the guest init (rootfs-builder/init) failed"
    );
    target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join("microvm-init")
}

/// 64-bit FNV-1a: plenty to tell init builds apart.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
