//! `microvm run` benchmark: from spawn to the guest agent's hello (boot-to-agent-ready) and to
//! the end of `true`, per backend that can boot Linux here, as medians.
//!
//! Run: `cargo bench --bench run` (BENCH_RUNS=N, default 15). Needs the guest kernel
//! (scripts/build-kernel) and busybox-static.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-rootfs");
    let made = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/busybox-rootfs"
    ))
    .arg(&root)
    .status();
    if !made.is_ok_and(|s| s.success()) {
        println!("SKIPPED run benchmark: cannot make a busybox root (install busybox-static)");
        return;
    }
    let mut backends = vec!["qemu"];
    if std::path::Path::new("/dev/kvm").exists()
        && !std::path::Path::new("/sys/module/kvm_pvm").exists()
    {
        backends.insert(0, "kvm");
    } else {
        println!("NOTE: kvm backend not measured: this host's KVM cannot boot Linux at speed (PVM) or is missing");
    }
    println!("microvm run --rootfs <busybox> true, {runs} runs per backend, 256 MiB, 1 vCPU\n");
    println!(
        "{:<8} {:>22} {:>16}",
        "backend", "agent ready (ms)", "total (ms)"
    );
    for backend in backends {
        let (mut ready, mut total) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let start = Instant::now();
            let out = common::microvm()
                .args(["run", "--hypervisor", backend, "--rootfs"])
                .arg(&root)
                .arg("true")
                .env("MICROVM_LOG", "info")
                .stdin(Stdio::null())
                .output()
                .unwrap();
            total.push(start.elapsed().as_secs_f64() * 1e3);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{backend}: {err}");
            let ms = err
                .lines()
                .find_map(|l| {
                    l.split("guest agent ready ")
                        .nth(1)?
                        .split_whitespace()
                        .next()?
                        .parse::<f64>()
                        .ok()
                })
                .unwrap_or_else(|| panic!("{backend}: no agent-ready line in {err}"));
            ready.push(ms);
        }
        println!(
            "{backend:<8} {:>22.1} {:>16.1}",
            common::median(ready),
            common::median(total)
        );
    }
}
