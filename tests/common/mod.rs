//! Shared harness for integration tests: builds the bare-metal test guests once, runs
//! `microvm`, and skips KVM tests loudly where /dev/kvm is missing.
#![allow(dead_code)]

pub mod registry;

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The `microvm` binary under test.
pub fn microvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_microvm"))
}

/// The number in the environment variable `key` (e.g. BENCH_RUNS), else `default`.
pub fn env_number(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Prints a loud line saying `test` is skipped and why.
pub fn skip(test: &str, why: &str) {
    // Straight to fd 2: libtest captures eprintln! of passing tests, and a skip must be seen.
    let line = format!("SKIPPED {test}: {why}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}

/// True when /dev/kvm exists; otherwise prints a loud skip line for `test`.
pub fn kvm_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    skip(
        test,
        "/dev/kvm is missing on this host, so this test cannot boot a guest",
    );
    false
}

/// The guest kernel ($MICROVM_KERNEL, else the one scripts/build-kernel made), or `None`
/// after a loud skip line for `test`.
pub fn kernel_or_skip(test: &str) -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("MICROVM_KERNEL").map(PathBuf::from),
        Some(PathBuf::from("/var/lib/microvm/kernel/vmlinux")),
    ];
    let found = candidates.into_iter().flatten().find(|p| p.is_file());
    if found.is_none() {
        skip(test, "no guest kernel (run scripts/build-kernel)");
    }
    found
}

/// The guest kernel when /dev/kvm exists too (tests that run real Linux under our VMM), or
/// `None` after a loud skip line for `test`.
pub fn kvm_kernel_or_skip(test: &str) -> Option<PathBuf> {
    if !kvm_or_skip(test) {
        return None;
    }
    kernel_or_skip(test)
}

/// What `podman run` needs on this fleet's hosts (no networking, limits the host's defaults
/// would refuse), for tests and benchmarks that run Debian's podman beside microvm.
pub const PODMAN_RUN_FLAGS: [&str; 6] = [
    "--network",
    "none",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
];

/// Prints a benchmark line: the median and p90 of `v` (milliseconds) under `what`; nothing for
/// an empty sample.
pub fn report(what: &str, v: Vec<f64>) {
    if v.is_empty() {
        return;
    }
    println!(
        "{what:<58} median {:>8.1} ms   p90 {:>8.1} ms   ({} runs)",
        median(v.clone()),
        p90(v.clone()),
        v.len()
    );
}

/// Loads the test image `box` of make-test-images.sh (in `images`) into the podman whose
/// command line `podman` starts, as `localhost/box:latest`.
pub fn podman_load_box(podman: impl Fn() -> Command, images: &Path) {
    podman_load(podman, images, "box");
}

/// Loads the OCI layout `images/NAME` into podman as `localhost/NAME`.
pub fn podman_load(podman: impl Fn() -> Command, images: &Path, name: &str) {
    let layout = format!("oci:{}:latest", images.join(name).display());
    let o = podman().args(["pull", "-q", &layout]).output().unwrap();
    let err = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(0), "podman pull: {}", err(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let o = podman()
        .args(["tag", &id, &format!("localhost/{name}:latest")])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "podman tag: {}", err(&o));
}

/// 90th percentile of a sample (nearest rank).
pub fn p90(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * 0.9).ceil() as usize).clamp(1, v.len()) - 1]
}

/// Median of a sample (benchmarks report medians).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
/// Directory holding the built test guests (pvh.elf, linux64.elf, bzimage, marker.elf).
///
/// Test binaries run in parallel processes, so the build is serialised with a file lock and
/// `make` itself is incremental.
pub fn guests() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guests");
        std::fs::create_dir_all(&out).unwrap();
        let lock = File::create(out.join(".lock")).unwrap();
        lock.lock().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests");
        let status = Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(&src)
            .arg(format!("OUT={}", out.display()))
            .status()
            .expect("cannot run make: install make and gcc");
        assert!(status.success(), "building the test guests failed");
        lock.unlock().unwrap();
        out
    })
}

/// Path of one test guest.
pub fn guest(name: &str) -> PathBuf {
    guests().join(name)
}

/// Everything a finished run left behind.
pub struct Run {
    /// Exit status code (None if killed by a signal).
    pub code: Option<i32>,
    /// Standard error: the guest console and microvm's own messages.
    pub stderr: String,
}

impl Run {
    /// The guest's lines starting with `prefix`.
    pub fn lines(&self, prefix: &str) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect()
    }

    /// The single line starting with `prefix`; panics with the whole output otherwise.
    pub fn line(&self, prefix: &str) -> &str {
        let found = self.lines(prefix);
        assert_eq!(
            found.len(),
            1,
            "expected one line starting with {prefix:?} in:\n{}",
            self.stderr
        );
        found[0]
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs `microvm boot` with `args` (a 30 s guard against hangs is added).
pub fn boot(args: &[&str]) -> Run {
    let mut cmd = microvm();
    cmd.arg("boot").args(args);
    if !args.iter().any(|a| a.starts_with("--timeout")) {
        cmd.args(["--timeout", "30"]);
    }
    cmd.output().expect("cannot run microvm").into()
}

/// 32-bit FNV-1a, as the test guests compute it over the initrd.
pub fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ *b as u32).wrapping_mul(0x0100_0193)
    })
}

/// A scratch file with `bytes`, removed when the returned guard drops.
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// Writes `bytes` to a fresh file named after `name`.
    pub fn new(name: &str, bytes: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!("microvm-test-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        TempFile(path)
    }

    /// The path as a string.
    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A fresh scratch directory, removed with everything in it when dropped.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes an empty [`TempDir`] named after `name` and this process.
pub fn temp_dir(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("microvm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Builds the test images of tests/make-test-images.sh in `out` (the demo image is `out/demo`).
pub fn make_test_images(out: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/make-test-images.sh");
    let st = Command::new("bash")
        .arg(script)
        .arg(out)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(
        st.success(),
        "building the test images failed (install umoci and busybox-static)"
    );
}

/// The test images (`images/demo` and the rest of make-test-images.sh) and a private image
/// store, under the target's temporary directory, made once per test binary (`name` tells the
/// binaries' directories apart).
pub fn test_images(name: &str) -> &'static (PathBuf, PathBuf) {
    static DIRS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    DIRS.get_or_init(|| {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{name}-{}", std::process::id()));
        let out = base.join("images");
        make_test_images(&out);
        (out, base.join("store"))
    })
}

/// Adds `run --hypervisor qemu --timeout SECS --kernel KERNEL` to `c`: how the tests that boot
/// the real guest start a container; the root, flags and command follow.
pub fn qemu_run<'a>(c: &'a mut Command, kernel: &Path, secs: u32) -> &'a mut Command {
    c.args(["run", "--hypervisor", "qemu", "--timeout"])
        .arg(secs.to_string())
        .arg("--kernel")
        .arg(kernel)
}

/// The host's first global IPv4 address (passt answers pings to it, not to its gateway
/// alias).
pub fn host_address() -> String {
    let o = Command::new("ip")
        .args(["-o", "-4", "addr", "show", "scope", "global"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let addr = out
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_else(|| panic!("no global IPv4 address on this host: {out}"));
    addr.split('/').next().unwrap().to_string()
}

/// The host's first global IPv6 address, if it has one.
pub fn host_address6() -> Option<String> {
    let o = Command::new("ip")
        .args(["-o", "-6", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    let out = String::from_utf8_lossy(&o.stdout);
    let addr = out
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)?;
    Some(addr.split('/').next()?.to_string())
}

/// A host HTTP server answering every GET with `body`, on `addr`; returns its port.
pub fn http_server(addr: &str, body: &'static str) -> u16 {
    let l = TcpListener::bind(addr).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// A network namespace with a veth, made as CNI's bridge plugin or netavark make one: the
/// container end `eth0` inside with 10.NET.0.2/24 and a default route, the host end outside
/// with 10.NET.0.1/24. Removed when dropped.
pub struct EngineNetns {
    /// Its name under /run/netns.
    pub name: String,
    host_if: String,
}

impl EngineNetns {
    pub fn make(tag: &str, net: u8) -> Option<EngineNetns> {
        let name = format!("mvt-{tag}-{}", std::process::id());
        let host_if = format!("mvh{net}-{}", std::process::id() % 100000);
        let sh = |script: &str| {
            Command::new("sh")
                .args(["-ec", script])
                .status()
                .is_ok_and(|s| s.success())
        };
        let ns = EngineNetns { name, host_if };
        let ok = sh(&format!(
            "ip netns add {n}
             ip link add {h} type veth peer name eth0 netns {n}
             ip addr add 10.{net}.0.1/24 dev {h}
             ip link set {h} up
             ip -n {n} link set lo up
             ip -n {n} addr add 10.{net}.0.2/24 dev eth0
             ip -n {n} link set eth0 up
             ip -n {n} route add default via 10.{net}.0.1",
            n = ns.name,
            h = ns.host_if
        ));
        ok.then_some(ns)
    }

    /// Its file.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -o link` inside it.
    pub fn links(&self) -> String {
        let o = Command::new("ip")
            .args(["-n", &self.name, "-o", "link"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for EngineNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Fails unless what began at `started` ended within `limit` (a run that must not hang).
pub fn assert_ended_within(started: std::time::Instant, limit: std::time::Duration) {
    let took = started.elapsed();
    assert!(took < limit, "took {took:?}, more than {limit:?}");
}
