//! Pull of a realistic image (bookworm minbase + python3, pip and numpy: three layers, about
//! 125 MB compressed, 330 MB unpacked; bench/make-python-image.sh) from Debian's
//! docker-registry on 127.0.0.1, into an empty store each run, side by side with
//! - the same blobs downloaded alone (curl, three at a time as microvm does, to files):
//!   the floor a pull that converts layers as they arrive is measured against;
//! - `skopeo copy docker://... oci:DIR` (download and store, no unpacking);
//! - `podman pull` (download and unpack; vfs storage, this fleet's only podman driver).
//!
//! Then again over a link of BENCH_PULL_RATE (tc's spelling, default 400mbit: a fast
//! registry link), a second docker-registry on the same storage in a network namespace behind
//! a veth whose egress tbf limits: there the download, not the conversion, is the bound, and a
//! pull that converts as bytes arrive should end about when the last byte does.
//!
//! Run: `cargo bench --bench pull` (BENCH_RUNS=N, default 5). Builds the image once into
//! target/bench-images (about 1.5 minutes; needs debootstrap and deb.debian.org) unless
//! BENCH_PYTHON_IMAGE names an OCI layout with a `latest` tag.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{env_number, median, report};

struct Registry(Child);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(c: &mut Command, what: &str) {
    let o = c.stdin(Stdio::null()).output().expect(what);
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn image() -> PathBuf {
    if let Some(p) = std::env::var_os("BENCH_PYTHON_IMAGE") {
        return PathBuf::from(p);
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-images");
    let layout = out.join("python");
    if !layout.join("index.json").is_file() {
        eprintln!(
            "building the python image into {} (about 1.5 minutes)",
            out.display()
        );
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/make-python-image.sh");
        run(
            Command::new("bash").arg(script).arg(&out),
            "make-python-image.sh",
        );
    }
    layout
}

/// The digests of the image's manifest, config and layers.
fn blobs(layout: &Path) -> Vec<String> {
    let read = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&fs::read(p).unwrap()).unwrap()
    };
    let index = read(layout.join("index.json"));
    let md = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let m = read(layout.join("blobs/sha256").join(&md[7..]));
    let mut out = vec![m["config"]["digest"].as_str().unwrap().to_string()];
    for l in m["layers"].as_array().unwrap() {
        out.push(l["digest"].as_str().unwrap().to_string());
    }
    out
}

fn timed(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1000.0
}

fn main() {
    let runs = env_number("BENCH_RUNS", 5);
    for tool in ["docker-registry", "skopeo", "podman", "curl"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            eprintln!("SKIPPED pull bench: {tool} is not installed (scripts/setup-host)");
            return;
        }
    }
    let layout = image();
    let dir = common::temp_dir("bench-pull");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let config = dir.0.join("registry.yml");
    fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.0.join("registry").display()
        ),
    )
    .unwrap();
    let _registry = Registry(
        Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    while TcpStream::connect(&addr).is_err() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let pushed = format!("{addr}/bench/python:latest");
    run(
        Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{pushed}")),
        "skopeo copy to the registry",
    );
    let digests = blobs(&layout);
    let bytes: u64 = digests
        .iter()
        .map(|d| {
            fs::metadata(layout.join("blobs/sha256").join(&d[7..]))
                .unwrap()
                .len()
        })
        .sum();
    println!(
        "image: {} blobs, {:.1} MB compressed, from docker-registry on {addr}",
        digests.len(),
        bytes as f64 / 1e6
    );

    let scratch = dir.0.join("scratch");
    round(runs, &addr, &digests, &scratch, true, "loopback");

    let rate = std::env::var("BENCH_PULL_RATE").unwrap_or_else(|_| "400mbit".into());
    let Some(ns) = Netns::new(&rate) else {
        eprintln!("SKIPPED the rate-limited round: cannot make a network namespace here");
        return;
    };
    let slow_addr = format!("{}:5000", Netns::REGISTRY_IP);
    let config = dir.0.join("registry-slow.yml");
    fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {slow_addr}\n",
            dir.0.join("registry").display()
        ),
    )
    .unwrap();
    let _slow = Registry(
        Command::new("ip")
            .args(["netns", "exec", Netns::NAME, "docker-registry", "serve"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    while TcpStream::connect(&slow_addr).is_err() {
        std::thread::sleep(Duration::from_millis(50));
    }
    round(
        runs,
        &slow_addr,
        &digests,
        &scratch,
        false,
        &format!("over {rate}"),
    );
    drop(ns);
}

/// A network namespace holding the rate-limited registry, reached over a veth.
struct Netns;

impl Netns {
    const NAME: &'static str = "mvbench-pull";
    const REGISTRY_IP: &'static str = "10.231.7.2";

    fn new(rate: &str) -> Option<Netns> {
        let _ = Command::new("ip")
            .args(["netns", "del", Self::NAME])
            .stderr(Stdio::null())
            .status();
        let ns = Netns;
        let steps: [&[&str]; 8] = [
            &["ip", "netns", "add", Self::NAME],
            &[
                "ip",
                "link",
                "add",
                "mvb-host",
                "type",
                "veth",
                "peer",
                "name",
                "mvb-reg",
                "netns",
                Self::NAME,
            ],
            &["ip", "addr", "add", "10.231.7.1/30", "dev", "mvb-host"],
            &["ip", "link", "set", "mvb-host", "up"],
            &[
                "ip",
                "-n",
                Self::NAME,
                "addr",
                "add",
                "10.231.7.2/30",
                "dev",
                "mvb-reg",
            ],
            &["ip", "-n", Self::NAME, "link", "set", "mvb-reg", "up"],
            &["ip", "-n", Self::NAME, "link", "set", "lo", "up"],
            &[
                "ip",
                "netns",
                "exec",
                Self::NAME,
                "tc",
                "qdisc",
                "add",
                "dev",
                "mvb-reg",
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "512kb",
                "latency",
                "100ms",
            ],
        ];
        for step in steps {
            let ok = Command::new(step[0])
                .args(&step[1..])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("{step:?} failed");
                return None;
            }
        }
        Some(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace takes the veth pair with it; the second is for a half set-up.
        for args in [
            &["netns", "del", Self::NAME][..],
            &["link", "del", "mvb-host"],
        ] {
            let _ = Command::new("ip").args(args).stderr(Stdio::null()).status();
        }
    }
}

/// `runs` pulls of the image from the registry at `addr` by each tool, interleaved.
fn round(
    runs: usize,
    addr: &str,
    digests: &[String],
    scratch: &Path,
    with_podman: bool,
    label: &str,
) {
    let reference = format!("{addr}/bench/python:latest");
    let (mut curl, mut pull, mut skopeo, mut podman) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let _ = fs::remove_dir_all(scratch);
        fs::create_dir_all(scratch).unwrap();
        curl.push(timed(|| {
            let mut c = Command::new("curl");
            c.args(["-sSf", "--parallel", "--parallel-max", "3"]);
            for d in digests {
                c.arg("-o").arg(scratch.join(&d[7..]));
                c.arg(format!("http://{addr}/v2/bench/python/blobs/{d}"));
            }
            run(&mut c, "curl");
        }));

        let store = scratch.join("store");
        pull.push(timed(|| {
            run(
                Command::new(env!("CARGO_BIN_EXE_microvm"))
                    .args(["pull", "-q", "--tls-verify=false", &reference])
                    .env("MICROVM_ROOT", &store),
                "microvm pull",
            )
        }));
        assert_eq!(
            fs::read_dir(store.join("layers")).unwrap().count(),
            3,
            "every layer converted"
        );

        skopeo.push(timed(|| {
            run(
                Command::new("skopeo")
                    .args(["copy", "-q", "--src-tls-verify=false"])
                    .arg(format!("docker://{reference}"))
                    .arg(format!("oci:{}:latest", scratch.join("oci").display())),
                "skopeo copy",
            )
        }));

        if !with_podman {
            continue;
        }
        let root = scratch.join("podman");
        podman.push(timed(|| {
            run(
                Command::new("podman")
                    .args(["--storage-driver", "vfs", "--root"])
                    .arg(root.join("root"))
                    .arg("--runroot")
                    .arg(root.join("run"))
                    .args(["pull", "-q", "--tls-verify=false", &reference]),
                "podman pull",
            )
        }));
        let _ = Command::new("podman")
            .args(["--storage-driver", "vfs", "--root"])
            .arg(root.join("root"))
            .arg("--runroot")
            .arg(root.join("run"))
            .args(["system", "reset", "-f"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let ratio = median(pull.clone()) / median(curl.clone());
    println!("{label}:");
    report("  blobs downloaded alone (curl, 3 at a time)", curl);
    report("  microvm pull (download + verify + convert)", pull);
    report("  skopeo copy docker:// -> oci: (no unpacking)", skopeo);
    report("  podman pull (vfs)", podman);
    println!("  microvm pull / download alone: {ratio:.2}x (medians)");
}
