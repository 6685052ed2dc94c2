//! `microvm run` benchmark, per backend that can boot Linux here and per root (an OCI image
//! made with scripts/demo-image, already converted; a `--rootfs` directory): medians of spawn to
//! the guest agent's hello (boot-to-agent-ready) and to the end of `true`; and, for the `kvm`
//! backend, the host work from spawn to the VM's start (from `--timings`), which this host can
//! measure even though its KVM cannot boot Linux at speed.
//!
//! Run: `cargo bench --bench run` (BENCH_RUNS=N, default 15). Needs the guest kernel
//! (scripts/build-kernel), busybox-static and umoci.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The number after `key` in `text` (e.g. "agent ready 812.3 ms").
fn figure(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.split(key).nth(1)?.split_whitespace().next()?.parse().ok())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs = common::env_number("BENCH_RUNS", 15);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-run");
    let (root, layout, store) = (dir.join("rootfs"), dir.join("demo"), dir.join("store"));
    let script = |name: &str| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scripts")
            .join(name)
    };
    let made = Command::new(script("busybox-rootfs"))
        .arg(&root)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(script("demo-image"))
            .arg(&layout)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !made {
        println!("SKIPPED run benchmark: cannot make the busybox root or image (install busybox-static, umoci)");
        return;
    }
    let image = format!("oci:{}", layout.display());
    // Load and convert once: the figures are for an image already converted.
    let loaded = common::microvm()
        .args(["load", &image])
        .env("MICROVM_ROOT", &store)
        .output()
        .unwrap();
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );

    let kvm_boots_linux =
        Path::new("/dev/kvm").exists() && !Path::new("/sys/module/kvm_pvm").exists();
    let mut backends = vec!["qemu"];
    if kvm_boots_linux {
        backends.insert(0, "kvm");
    } else {
        println!("NOTE: kvm backend boot not measured: this host's KVM cannot boot Linux at speed (PVM) or is missing");
    }
    println!("microvm run ROOT true, {runs} runs each, 256 MiB, 1 vCPU; medians\n");
    println!(
        "{:<8} {:<8} {:>18} {:>12}",
        "backend", "root", "agent ready (ms)", "total (ms)"
    );
    for backend in &backends {
        for (label, root_args) in [
            ("image", vec![image.clone()]),
            (
                "rootfs",
                vec!["--rootfs".into(), root.display().to_string()],
            ),
        ] {
            let (mut ready, mut total) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                let start = Instant::now();
                let out = common::microvm()
                    .args(["run", "--hypervisor", backend])
                    .args(&root_args)
                    .arg("true")
                    .env("MICROVM_LOG", "info")
                    .env("MICROVM_ROOT", &store)
                    .stdin(Stdio::null())
                    .output()
                    .unwrap();
                total.push(start.elapsed().as_secs_f64() * 1e3);
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(out.status.success(), "{backend} {label}: {err}");
                ready.push(
                    figure(&err, "guest agent ready ")
                        .unwrap_or_else(|| panic!("no agent-ready line in {err}")),
                );
            }
            println!(
                "{backend:<8} {label:<8} {:>18.1} {:>12.1}",
                common::median(ready),
                common::median(total)
            );
        }
    }

    if Path::new("/dev/kvm").exists() {
        // Host work only: the run ends at --timeout long before a PVM guest could boot.
        let mut started = Vec::new();
        for _ in 0..runs {
            let out = common::microvm()
                .args([
                    "run",
                    "--hypervisor",
                    "kvm",
                    "--timeout",
                    "0.2",
                    "--timings",
                    &image,
                    "true",
                ])
                .env("MICROVM_ROOT", &store)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            started
                .push(figure(&err, "VM started ").unwrap_or_else(|| panic!("no timings in {err}")));
        }
        println!("\nkvm backend, image: host work from start to the VM's start: {:.1} ms (median, time since main)", common::median(started));
    }
}
