//! Container lifecycle benchmark on the `qemu` backend (the one that boots Linux at speed on
//! this fleet): medians and p90 of `run -d` to running (the command returns once the process
//! runs), `exec true` into a running container, `stop` of a cooperative container (SIGTERM
//! ends it); and `podman exec true` beside it when podman is installed (Debian's, vfs storage,
//! no network), for scale.
//!
//! Run: `cargo bench --bench lifecycle` (BENCH_RUNS=N, default 10). Needs the guest kernel,
//! umoci and busybox-static.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use common::report;

struct Mv {
    store: PathBuf,
    kernel: PathBuf,
}

impl Mv {
    fn run(&self, args: &[&str]) -> Output {
        common::microvm()
            .args(args)
            .env("MICROVM_ROOT", &self.store)
            .env("MICROVM_HYPERVISOR", "qemu")
            .env("MICROVM_KERNEL", &self.kernel)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn timed(&self, args: &[&str]) -> f64 {
        let t = Instant::now();
        let o = self.run(args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        t.elapsed().as_secs_f64() * 1e3
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some(kernel) = common::kernel_or_skip("bench lifecycle") else {
        return;
    };
    let runs = common::env_number("BENCH_RUNS", 10);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-lifecycle");
    // A run that failed midway may have left containers running there: remove them first.
    let _ = common::microvm()
        .env("MICROVM_ROOT", dir.join("store"))
        .args(["rm", "-f", "bench-exec", "bench-commit"])
        .args((0..runs).map(|i| format!("bench{i}")))
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    common::make_test_images(&dir.join("images"));
    let image = format!("oci:{}", dir.join("images/demo").display());
    let mv = Mv {
        store: dir.join("store"),
        kernel,
    };
    let loop_forever = "trap 'exit 0' TERM; while true; do busybox sleep 0.2; done";
    // Load and convert once, outside the figures.
    mv.timed(&["run", "--rm", &image, "true"]);

    let mut starts = Vec::new();
    let mut stops = Vec::new();
    for i in 0..runs {
        let name = format!("bench{i}");
        starts.push(mv.timed(&["run", "-d", "--name", &name, &image, loop_forever]));
        stops.push(mv.timed(&["stop", &name]));
        mv.timed(&["rm", &name]);
    }
    report("run -d to running", starts);
    report("stop (cooperative, SIGTERM)", stops);

    mv.timed(&["run", "-d", "--name", "bench-exec", &image, loop_forever]);
    let execs: Vec<f64> = (0..runs * 3)
        .map(|_| mv.timed(&["exec", "bench-exec", "true"]))
        .collect();
    report("exec true", execs);
    mv.timed(&["rm", "-f", "bench-exec"]);

    podman_exec(runs * 3, &dir);
    commit_100mb(&mv, &image, &dir);
}

/// `commit` of 100 MB of changes (a stopped container: the diff comes from a short VM) beside
/// `tar` of the same amount on the host, plain and through `gzip -1` (commit stores gzip).
fn commit_100mb(mv: &Mv, image: &str, dir: &Path) {
    let script = "busybox dd if=/dev/urandom of=/big bs=1M count=100 2>/dev/null; busybox sync";
    mv.timed(&["run", "-u", "0", "--name", "bench-commit", image, script]);
    let commit = mv.timed(&["commit", "bench-commit", "bench:committed"]);
    mv.timed(&["rm", "bench-commit"]);
    report("commit of 100 MB (stopped container)", vec![commit]);
    let data = dir.join("host-100mb");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("big"), common::pattern(100 << 20, 9)).unwrap();
    for (what, pipeline) in [
        (
            "tar of 100 MB on the host",
            // Through cat: GNU tar skips reading file data when it writes to /dev/null itself.
            "tar -C \"$1\" -cf - . | cat > /dev/null",
        ),
        (
            "tar | gzip -1 of 100 MB on the host",
            "tar -C \"$1\" -cf - . | gzip -1 > /dev/null",
        ),
    ] {
        let t = Instant::now();
        let ok = Command::new("sh")
            .args(["-c", pipeline, "sh"])
            .arg(&data)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "{what}");
        report(what, vec![t.elapsed().as_secs_f64() * 1e3]);
    }
}

/// `podman exec true` into a running podman container of the same image, when podman is here.
fn podman_exec(runs: usize, dir: &Path) {
    let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
    if !ok(Command::new("podman")
        .arg("--version")
        .stdout(Stdio::null()))
    {
        common::skip(
            "podman exec",
            "podman is not installed (apt-get install podman)",
        );
        return;
    }
    let base = ["--storage-driver", "vfs", "--root"];
    let root = dir.join("podman");
    let podman = |args: &[&str]| {
        let mut c = Command::new("podman");
        c.args(base)
            .arg(&root)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    let layout = format!("oci:{}:latest", dir.join("images/demo").display());
    if !ok(&mut podman(&["pull", &layout])) {
        common::skip("podman exec", "podman cannot load the test image here");
        return;
    }
    let mut c = podman(&["run", "-d", "--name", "bench"]);
    c.args(common::PODMAN_RUN_FLAGS)
        .args(["--entrypoint", "/bin/sh"])
        .args([&layout, "-c", "while true; do busybox sleep 1; done"]);
    if !ok(&mut c) {
        common::skip("podman exec", "podman cannot run a container here");
        return;
    }
    let times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            ok(&mut podman(&["exec", "bench", "true"]));
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    report("podman exec true (for scale)", times);
    ok(&mut podman(&["rm", "-f", "-t", "0", "bench"]));
}
