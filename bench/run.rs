//! `microvm run --rm ROOT true` benchmark, per backend that can boot Linux here and per root (an
//! OCI image made with scripts/demo-image, already converted; a `--rootfs` directory): medians
//! and p90 of spawn to the guest agent's hello (boot-to-agent-ready) and to the end of `true`,
//! and the medians of the agent's own stage times (guest clock, from `--timings`); and, for the
//! `kvm` backend, the host work from spawn to the VM's start (from `--timings`) without and with
//! one volume, which this host can measure even though its KVM cannot boot Linux at speed.
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
    println!("microvm run --rm ROOT true, {runs} runs each, 256 MiB, 1 vCPU, passt network\n");
    println!(
        "{:<8} {:<8} {:>26} {:>26}   guest clock medians (ms): agent started, hello, root ready, process started",
        "backend", "root", "agent ready ms (p90)", "total ms (p90)"
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
            let mut guest: [Vec<f64>; 4] = Default::default();
            for _ in 0..runs {
                let start = Instant::now();
                let out = common::microvm()
                    .args(["run", "--rm", "--timings", "--hypervisor", backend])
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
                // The agent's stages follow the host's on the same line.
                if let Some((_, stages)) = err.split_once("guest clock since its kernel began:") {
                    for (v, key) in guest.iter_mut().zip([
                        "agent started ",
                        "hello ",
                        "root ready ",
                        "process started ",
                    ]) {
                        v.extend(figure(stages, key));
                    }
                }
            }
            let m = |v: &Vec<f64>| {
                if v.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.0}", common::median(v.clone()))
                }
            };
            println!(
                "{backend:<8} {label:<8} {:>26} {:>26}   {}, {}, {}, {}",
                format!(
                    "{:.1} ({:.1})",
                    common::median(ready.clone()),
                    common::p90(ready)
                ),
                format!(
                    "{:.1} ({:.1})",
                    common::median(total.clone()),
                    common::p90(total)
                ),
                m(&guest[0]),
                m(&guest[1]),
                m(&guest[2]),
                m(&guest[3]),
            );
        }
    }

    if Path::new("/dev/kvm").exists() {
        // Host work only: the run ends at --timeout long before a PVM guest could boot.
        let volume = dir.join("volume");
        std::fs::create_dir_all(&volume).unwrap();
        let volume_arg = format!("{}:/data", volume.display());
        println!("\nkvm backend, image, --network none: host work from start to the VM's start (time since main)");
        for (label, extra) in [
            ("no volume", vec![]),
            ("one volume", vec!["-v", volume_arg.as_str()]),
        ] {
            let mut started = Vec::new();
            for _ in 0..runs {
                let out = common::microvm()
                    .args(["run", "--rm", "--hypervisor", "kvm", "--network", "none"])
                    .args(["--timeout", "0.2", "--timings"])
                    .args(&extra)
                    .args([&image, "true"])
                    .env("MICROVM_ROOT", &store)
                    .stdin(Stdio::null())
                    .output()
                    .unwrap();
                let err = String::from_utf8_lossy(&out.stderr);
                started.push(
                    figure(&err, "VM started ").unwrap_or_else(|| panic!("no timings in {err}")),
                );
            }
            println!(
                "  {label:<12} median {:.1} ms, p90 {:.1} ms",
                common::median(started.clone()),
                common::p90(started)
            );
        }
    }
}
