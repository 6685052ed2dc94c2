//! `podman run --rm IMAGE true` with microvm-runtime (qemu backend: this fleet's KVM boots
//! Linux only slowly) beside the same with runc and crun, medians and p90; and where a
//! microvm-runtime run spends its time, from a wrapper that timestamps each runtime call and
//! the supervisor's own timings (`--debug` writes them to the runtime's log):
//! - `create` (to the pid file), and within it the guest's boot (VM started to agent ready);
//!   the rest of `create` is microvm-runtime, virtiofsd and QEMU starting on the host;
//! - `start` (to the process running), and `start` to `delete` (the process's run and exit as
//!   podman sees it).
//!
//! Run: `cargo bench --bench runtime` (BENCH_RUNS=N, default 10). Needs podman, runc, the
//! guest kernel, umoci and busybox-static; crun is measured where it runs (it refuses hybrid
//! cgroup hosts such as this fleet's).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const RUNTIME: &str = env!("CARGO_BIN_EXE_microvm-runtime");

use common::report;

struct Podman {
    root: PathBuf,
    runroot: PathBuf,
}

impl Podman {
    fn cmd(&self, runtime: &str) -> Command {
        let mut c = Command::new("podman");
        c.args(["--storage-driver", "vfs", "--root"])
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .args(["--runtime", runtime])
            .stdin(Stdio::null());
        c
    }

    /// One `run --rm box true`: its wall time, or why it failed.
    fn run_true(&self, runtime: &str, extra: &[&str]) -> Result<f64, String> {
        let t = Instant::now();
        let o = self
            .cmd(runtime)
            .arg("run")
            .arg("--rm")
            .args(common::PODMAN_RUN_FLAGS)
            .args(extra)
            .args(["localhost/box", "true"])
            .output()
            .unwrap();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if o.status.success() {
            Ok(ms)
        } else {
            Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
        }
    }
}

/// A runtime wrapper that logs `<ns> begin|end <command>` around each call and runs
/// microvm-runtime with `--debug` and a JSON log.
fn wrapper(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let calls = dir.join("calls.log");
    let log = dir.join("runtime.log");
    let script = dir.join("microvm-runtime-timed");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncmd=$1; for a in \"$@\"; do case $a in create|start|delete|kill) cmd=$a; break;; esac; done\n\
             echo \"$(date +%s%N) begin $cmd\" >> {calls}\n\
             {RUNTIME} --debug --log {log} --log-format json \"$@\"\nrc=$?\n\
             echo \"$(date +%s%N) end $cmd\" >> {calls}\nexit $rc\n",
            calls = calls.display(),
            log = log.display()
        ),
    )
    .unwrap();
    let _ = Command::new("chmod").arg("+x").arg(&script).status();
    (script, calls, log)
}

/// Milliseconds of `name` in a timings line ("..., agent ready 812.3 ms, ...").
fn timing(line: &str, name: &str) -> Option<f64> {
    let rest = &line[line.find(&format!("{name} "))? + name.len() + 1..];
    rest.split(" ms").next()?.trim().parse().ok()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some(kernel) = common::kernel_or_skip("bench runtime") else {
        return;
    };
    if Command::new("podman").arg("--version").output().is_err() {
        common::skip("bench runtime", "podman is not installed");
        return;
    }
    let runs = common::env_number("BENCH_RUNS", 10);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-runtime");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    common::make_test_images(&dir.join("images"));
    let podman = Podman {
        root: dir.join("storage"),
        runroot: PathBuf::from(format!("/tmp/mvbench-{}", std::process::id())),
    };
    common::podman_load_box(|| podman.cmd("runc"), &dir.join("images"));

    println!(
        "podman run --rm box true, {runs} runs each (vfs storage, no network; {} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let (script, calls, log) = wrapper(&dir);
    let kernel_annotation = format!("io.microvm.kernel={}", kernel.display());
    let vm_flags = [
        "--annotation",
        "io.microvm.hypervisor=qemu",
        "--annotation",
        kernel_annotation.as_str(),
    ];
    // One run of each first: image and layer caches warm, kernel in the page cache.
    let _ = podman.run_true(script.to_str().unwrap(), &vm_flags);
    let _ = podman.run_true("runc", &[]);
    let _ = std::fs::remove_file(&calls);
    let _ = std::fs::remove_file(&log);

    let mut totals = Vec::new();
    for _ in 0..runs {
        match podman.run_true(script.to_str().unwrap(), &vm_flags) {
            Ok(ms) => totals.push(ms),
            Err(e) => panic!("microvm-runtime: {e}"),
        }
    }
    report("microvm-runtime (qemu backend), whole run", totals);

    // The wrapper's calls: create, start, delete per run, in order.
    let text = std::fs::read_to_string(&calls).unwrap_or_default();
    let mut begun: Vec<(String, f64)> = Vec::new();
    let (mut create, mut start, mut start_to_delete) = (Vec::new(), Vec::new(), Vec::new());
    let mut last_start = None;
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(ns), Some(what), Some(cmd)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let ms = ns.parse::<f64>().unwrap_or(0.0) / 1e6;
        match what {
            "begin" => {
                if cmd == "delete" {
                    if let Some(s) = last_start.take() {
                        start_to_delete.push(ms - s);
                    }
                }
                if cmd == "start" {
                    last_start = Some(ms);
                }
                begun.push((cmd.to_string(), ms));
            }
            _ => {
                if let Some(i) = begun.iter().rposition(|(c, _)| c == cmd) {
                    let (_, b) = begun.remove(i);
                    match cmd {
                        "create" => create.push(ms - b),
                        "start" => start.push(ms - b),
                        _ => {}
                    }
                }
            }
        }
    }
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let mut boot = Vec::new();
    for line in logged.lines().filter(|l| l.contains("supervisor timings")) {
        if let (Some(vm), Some(ready)) = (timing(line, "VM started"), timing(line, "agent ready")) {
            boot.push(ready - vm);
        }
    }
    let host_part: Vec<f64> = create.iter().zip(&boot).map(|(c, b)| c - b).collect();
    report("  create (to the pid file)", create);
    report(
        "    of which the guest's boot (VM started to agent ready)",
        boot,
    );
    report(
        "    the rest: runtime, virtiofsd, QEMU start, guest mounts",
        host_part,
    );
    report("  start (to the process running)", start);
    report(
        "  start to podman's delete (run, exit, report)",
        start_to_delete,
    );

    for runtime in ["runc", "crun"] {
        let mut v = Vec::new();
        for _ in 0..runs {
            match podman.run_true(runtime, &[]) {
                Ok(ms) => v.push(ms),
                Err(e) => {
                    println!(
                        "{runtime:<58} does not run here: {}",
                        e.lines().last().unwrap_or("")
                    );
                    break;
                }
            }
        }
        report(runtime, v);
    }
    let _ = podman.cmd("runc").args(["rmi", "-a", "-f"]).output();
    let _ = std::fs::remove_dir_all(&podman.runroot);
}
