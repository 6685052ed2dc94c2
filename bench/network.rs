//! Container-to-host networking: iperf3 TCP throughput both ways and ping round trips, from a
//! container on the qemu backend through passt (this fleet's KVM boots Linux only slowly), and
//! from the same image under podman + runc with slirp4netns where podman's networking runs;
//! and what networking adds to a start: the host's work up to "VM started" (`--timings`) on
//! the kvm backend with the default network against `--network none`.
//!
//! Both reach the host at its own address, as containers do (not its loopback).
//!
//! Run: `cargo bench --bench network` (BENCH_RUNS=N, default 5). Needs iperf3, passt, umoci,
//! busybox-static and the guest kernel; widens net.ipv4.ping_group_range while it runs (passt
//! pings with ICMP sockets) and puts it back.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{env_number, median, p90, report};

const PING_RANGE: &str = "/proc/sys/net/ipv4/ping_group_range";

/// A host iperf3 server for one test on `port`.
struct Server(Child);

impl Server {
    fn start(port: u16) -> Server {
        let child = Command::new("iperf3")
            .args(["-s", "-1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3");
        std::thread::sleep(std::time::Duration::from_millis(200));
        Server(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The receiver's throughput in Gbit/s from iperf3's JSON.
fn gbits(json: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    Some(v["end"]["sum_received"]["bits_per_second"].as_f64()? / 1e9)
}

/// Round-trip times in ms from ping's output.
fn rtts(out: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect()
}

fn microvm(store: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_microvm"));
    c.env("MICROVM_ROOT", store).stdin(Stdio::null());
    c
}

/// One container on the qemu backend running `script`: its stdout.
fn in_vm(store: &Path, kernel: &Path, image: &str, script: &str) -> Result<String, String> {
    let o = microvm(store)
        .args(["run", "--rm", "--hypervisor", "qemu", "--kernel"])
        .arg(kernel)
        .args([image, "sh", "-c", script])
        .output()
        .unwrap();
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn podman(dir: &Path) -> Command {
    let mut c = Command::new("podman");
    c.args(["--storage-driver", "vfs", "--root"])
        .arg(dir.join("storage"))
        .arg("--runroot")
        .arg(format!("/tmp/mvbn-{}", std::process::id()))
        .args(["--runtime", "runc"])
        .stdin(Stdio::null());
    c
}

/// One `podman run` of the image with slirp4netns running `script`.
fn in_podman(dir: &Path, script: &str) -> Result<String, String> {
    let o = podman(dir)
        .args(["run", "--rm", "--network", "slirp4netns"])
        // busybox ping opens a raw socket, which podman drops by default.
        .args(["--cap-add", "NET_RAW"])
        .args(common::PODMAN_RUN_FLAGS.iter().skip(2))
        .args(["localhost/iperf", "sh", "-c", script])
        .output()
        .unwrap();
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Throughput both ways and ping through `run`, to the host at its own address `host`.
fn measure(label: &str, runs: usize, host: &str, run: &dyn Fn(&str) -> Result<String, String>) {
    for (dir, flag) in [("container to host", ""), ("host to container", " -R")] {
        let mut v = Vec::new();
        for i in 0..runs {
            let port = 15300 + i as u16;
            let _server = Server::start(port);
            let script = format!("iperf3 -c {host} -p {port} -t 5 -J{flag}");
            match run(&script).map(|out| gbits(&out)) {
                Ok(Some(g)) => v.push(g),
                Ok(None) => println!("{label}: iperf3 printed no result"),
                Err(e) => {
                    println!("{label}: not measured: {e}");
                    return;
                }
            }
        }
        println!(
            "{label}: TCP {dir}: median {:.2} Gbit/s, p90 {:.2} (n={})",
            median(v.clone()),
            p90(v.clone()),
            v.len()
        );
    }
    match run(&format!("ping -c 20 -i 0.2 {host}")) {
        Ok(out) => report(&format!("{label}: ping to the host"), rtts(&out)),
        Err(e) => println!("{label}: ping not measured: {e}"),
    }
}

/// "VM started" from `--timings`, in ms.
fn vm_started(stderr: &str) -> Option<f64> {
    stderr
        .split("VM started ")
        .nth(1)?
        .split(" ms")
        .next()?
        .parse()
        .ok()
}

fn main() {
    let runs = env_number("BENCH_RUNS", 5);
    let Some(kernel) = common::kernel_or_skip("bench network") else {
        return;
    };
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bench-network-{}", std::process::id()));
    let images = base.join("images");
    let store = base.join("store");
    common::make_test_images(&images);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/make-iperf-image.sh");
    let ok = Command::new("bash")
        .arg(script)
        .arg(&images)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "building the iperf3 image failed (install iperf3 and umoci)"
    );
    let old_range = std::fs::read_to_string(PING_RANGE).unwrap_or_default();
    let _ = std::fs::write(PING_RANGE, "0 2147483647");

    let image = format!("oci:{}", images.join("iperf").display());
    // Loaded once, so the runs measure the network and not the conversion.
    let _ = in_vm(&store, &kernel, &image, "true");
    println!(
        "bench network: {runs} runs each; iperf3 -t 5 against a host iperf3 at the host's address"
    );
    let host_ip = common::host_address();
    measure("microvm qemu backend, passt", runs, &host_ip, &|s| {
        in_vm(&store, &kernel, &image, s)
    });

    // podman + runc + slirp4netns beside it, where podman's networking runs here.
    let pdir = base.join("podman");
    let have = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let loaded = have("podman") && have("slirp4netns");
    if loaded {
        common::podman_load(|| podman(&pdir), &images, "iperf");
        measure("podman + runc, slirp4netns", runs, &host_ip, &|s| {
            in_podman(&pdir, s)
        });
    } else {
        println!(
            "podman + runc: not measured: podman or slirp4netns is missing (scripts/setup-host)"
        );
    }
    let _ = podman(&pdir).args(["rmi", "-a", "-f"]).status();

    // What networking adds to the host's part of a start, on the kvm backend: the VM is
    // stopped by --timeout once it runs (PVM boots Linux slowly; the host's work is done).
    if Path::new("/dev/kvm").exists() {
        let box_image = format!("oci:{}", images.join("box").display());
        for (label, flags) in [
            (
                "kvm backend, --network none: VM started",
                vec!["--network", "none"],
            ),
            ("kvm backend, passt: VM started", vec![]),
            (
                "kvm backend, passt and -p 18090:80: VM started",
                vec!["-p", "127.0.0.1:18090:80"],
            ),
        ] {
            let mut v = Vec::new();
            for _ in 0..runs.max(5) {
                let o = microvm(&store)
                    .args([
                        "run",
                        "--rm",
                        "--hypervisor",
                        "kvm",
                        "--timings",
                        "--timeout",
                        "1",
                        "--kernel",
                    ])
                    .arg(&kernel)
                    .args(&flags)
                    .args([box_image.as_str(), "true"])
                    .output()
                    .unwrap();
                if let Some(ms) = vm_started(&String::from_utf8_lossy(&o.stderr)) {
                    v.push(ms);
                }
            }
            report(label, v);
        }
    }
    let _ = std::fs::write(PING_RANGE, old_range.trim().replace('\t', " "));
    let _ = std::fs::remove_dir_all(&base);
}
