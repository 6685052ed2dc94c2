//! Host memory per idle container: the proportional set size (PSS, so shared pages count once
//! across processes) of every host process one `microvm run -d IMAGE sleep` costs, per backend
//! (`qemu`; `kvm` too, whose guest boots slowly on this fleet's PVM but idles the same), with
//! guest RAM counted as the pages the guest touched; the guest's own view of that RAM (kernel,
//! page cache, processes) from its /proc/meminfo; and podman + runc's per-container cost (conmon
//! and the container's processes) for the same image beside it.
//!
//! Each configuration runs BENCH_RUNS containers (default 3; BENCH_KVM_RUNS, default 1, for the
//! kvm backend, whose guest takes minutes to boot on PVM) one after the other, measured after
//! BENCH_SETTLE seconds at rest (default 3); medians are reported. `--network none` and the
//! default passt network are measured apart, passt being a process of its own.
//!
//! Run: `cargo bench --bench memory`. Needs the guest kernel, umoci and busybox-static; podman
//! for the comparison. BENCH_KVM=0 leaves out the kvm backend (minutes on PVM).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const MIB: f64 = 1024.0 * 1024.0;
/// Guest RAM of every microvm container here (microvm's default).
const GUEST_MIB: u64 = 256;

/// PSS of one process in bytes, split into guest RAM (the mapping that backs it) and the rest.
#[derive(Debug, Default, Clone, Copy)]
struct Pss {
    guest: u64,
    own: u64,
}

/// One smaps entry: address range, permissions, name, PSS in bytes.
struct Vma {
    start: u64,
    end: u64,
    writable: bool,
    name: String,
    pss: u64,
}

fn vmas(pid: u32) -> Vec<Vma> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut out: Vec<Vma> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
            else {
                continue;
            };
            // perms, offset, dev, inode, then the name (if any).
            let writable = words.next().is_some_and(|p| p.starts_with("rw"));
            let name = words.nth(3).unwrap_or("").to_string();
            out.push(Vma {
                start,
                end,
                writable,
                name,
                pss: 0,
            });
        } else if first == "Pss:" {
            if let (Some(v), Some(kb)) = (out.last_mut(), words.next()) {
                v.pss = kb.parse::<u64>().unwrap_or(0) * 1024;
            }
        }
    }
    out
}

/// PSS of `pid`: guest RAM is QEMU's memory-backend memfd, our VMM's shared guest-RAM file
/// (`microvm-guest-ram`: a memfd, or a file on its private huge-page tmpfs), or (our VMM without
/// volumes) the adjacent writable anonymous mappings that together span exactly the
/// guest's RAM (a malloc arena's reserve beside them is not writable).
fn pss(pid: u32, guest_bytes: u64) -> Pss {
    let all = vmas(pid);
    let mut result = Pss::default();
    let mut run: Vec<&Vma> = Vec::new();
    let mut anon_runs: Vec<Vec<&Vma>> = Vec::new();
    for v in &all {
        let named_guest =
            v.name.contains("memory-backend-memfd") || v.name.contains("microvm-guest-ram");
        if named_guest {
            result.guest += v.pss;
            continue;
        }
        if v.name.is_empty() && v.writable {
            if run.last().is_some_and(|l| l.end != v.start) {
                anon_runs.push(std::mem::take(&mut run));
            }
            run.push(v);
        } else {
            if !run.is_empty() {
                anon_runs.push(std::mem::take(&mut run));
            }
            result.own += v.pss;
        }
    }
    anon_runs.push(run);
    let mut guest_found = result.guest > 0;
    for r in anon_runs {
        // Guest RAM is a stretch of the run (a malloc arena may sit right before or after it).
        let stretch = (0..r.len()).find_map(|i| {
            let j = (i..r.len()).find(|&j| r[j].end - r[i].start >= guest_bytes)?;
            (r[j].end - r[i].start == guest_bytes).then_some(i..=j)
        });
        for (k, v) in r.iter().enumerate() {
            match &stretch {
                Some(s) if !guest_found && s.contains(&k) => result.guest += v.pss,
                _ => result.own += v.pss,
            }
        }
        guest_found |= stretch.is_some();
    }
    result
}

/// `pid` and every process below it.
fn tree(pid: u32) -> Vec<u32> {
    let mut parents: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        if let Some(ppid) = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
        {
            parents.entry(ppid).or_default().push(p);
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        if let Some(kids) = parents.get(&out[i]) {
            out.extend(kids);
        }
        i += 1;
    }
    out
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// What one idle container costs, by process kind (MiB).
#[derive(Default)]
struct Sample {
    by_kind: BTreeMap<String, f64>,
    guest: f64,
    meminfo: BTreeMap<String, f64>,
}

impl Sample {
    fn total(&self) -> f64 {
        self.by_kind.values().sum::<f64>() + self.guest
    }
}

/// The process kinds a container's tree holds, named for the report.
fn kind(pid: u32) -> String {
    let c = comm(pid);
    if c.starts_with("qemu-system") {
        "QEMU".into()
    } else if c.starts_with("passt") {
        "passt".into()
    } else if c.starts_with("virtiofsd") {
        "virtiofsd".into()
    } else if c == "microvm" {
        "microvm (supervisor, VMM)".into()
    } else {
        c
    }
}

struct Mv {
    store: PathBuf,
    kernel: PathBuf,
}

impl Mv {
    fn cmd(&self) -> Command {
        let mut c = common::microvm();
        c.env("MICROVM_ROOT", &self.store)
            .env("MICROVM_KERNEL", &self.kernel)
            .stdin(Stdio::null());
        c
    }

    fn ok(&self, args: &[&str]) -> Output {
        let o = self.cmd().args(args).output().unwrap();
        assert!(
            o.status.success(),
            "microvm {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }
}

/// The guest's /proc/meminfo, in MiB per field.
fn parse_meminfo(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let kb: f64 = v.split_whitespace().next()?.parse().ok()?;
            Some((k.to_string(), kb / 1024.0))
        })
        .collect()
}

fn measure_microvm(mv: &Mv, image: &str, backend: &str, network: &str, settle: u64) -> Sample {
    let name = format!("bench-mem-{backend}-{network}");
    let _ = mv.cmd().args(["rm", "-f", &name]).output();
    mv.ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "--hypervisor",
        backend,
        "--network",
        network,
        image,
        // The demo image's entrypoint is `/bin/sh -c`.
        "sleep 100000",
    ]);
    std::thread::sleep(Duration::from_secs(settle));
    let inspect = String::from_utf8(mv.ok(&["inspect", &name]).stdout).unwrap();
    let pid: u32 = inspect
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("\"SupervisorPid\": ")?
                .trim_end_matches(',')
                .parse()
                .ok()
        })
        .expect("inspect names the supervisor");
    let mut sample = Sample::default();
    for p in tree(pid) {
        let pss = pss(p, GUEST_MIB << 20);
        sample.guest += pss.guest as f64 / MIB;
        *sample.by_kind.entry(kind(p)).or_default() += pss.own as f64 / MIB;
    }
    // The guest's own view; an exec into a guest this host runs very slowly (kvm on PVM) may
    // time out, which costs the sample its guest view only.
    for _ in 0..3 {
        let o = mv
            .cmd()
            .args(["exec", &name, "cat", "/proc/meminfo"])
            .output()
            .unwrap();
        if o.status.success() {
            sample.meminfo = parse_meminfo(&String::from_utf8_lossy(&o.stdout));
            break;
        }
        eprintln!(
            "NOTE: exec into {name} failed ({}); trying again",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    mv.ok(&["rm", "-f", &name]);
    sample
}

/// podman + runc: conmon and the container's processes (podman itself has exited).
fn measure_podman(podman: &dyn Fn() -> Command, settle: u64) -> Option<Sample> {
    let _ = podman().args(["rm", "-f", "-t", "0", "bench-mem"]).output();
    let o = podman()
        .args(["run", "-d", "--name", "bench-mem", "--runtime", "runc"])
        .args(common::PODMAN_RUN_FLAGS)
        .args(["localhost/demo:latest", "sleep 100000"])
        .output()
        .ok()?;
    if !o.status.success() {
        eprintln!("podman run: {}", String::from_utf8_lossy(&o.stderr));
        return None;
    }
    std::thread::sleep(Duration::from_secs(settle));
    let o = podman()
        .args(["inspect", "--format", "{{.State.ConmonPid}}", "bench-mem"])
        .output()
        .ok()?;
    let conmon: u32 = String::from_utf8_lossy(&o.stdout).trim().parse().ok()?;
    let mut sample = Sample::default();
    for p in tree(conmon) {
        let k = if p == conmon {
            "conmon".to_string()
        } else {
            "container processes".to_string()
        };
        *sample.by_kind.entry(k).or_default() += pss(p, u64::MAX).own as f64 / MIB;
    }
    let _ = podman().args(["rm", "-f", "-t", "0", "bench-mem"]).output();
    Some(sample)
}

fn report(label: &str, samples: &[Sample]) {
    let med = |f: &dyn Fn(&Sample) -> f64| common::median(samples.iter().map(f).collect());
    println!(
        "\n{label}: {:.1} MiB per idle container (median of {})",
        med(&|s| s.total()),
        samples.len()
    );
    let kinds: Vec<String> = samples[0].by_kind.keys().cloned().collect();
    for k in kinds {
        println!(
            "  {k:<40} {:>7.1} MiB",
            med(&|s| s.by_kind.get(&k).copied().unwrap_or(0.0))
        );
    }
    if samples[0].guest > 0.0 || !samples[0].meminfo.is_empty() {
        println!(
            "  {:<40} {:>7.1} MiB",
            "guest RAM touched",
            med(&|s| s.guest)
        );
    }
    if !samples[0].meminfo.is_empty() {
        let f = |k: &str| med(&|s| s.meminfo.get(k).copied().unwrap_or(0.0));
        let used = f("MemTotal") - f("MemFree");
        println!(
            "  guest's view (MiB): MemTotal {:.1}, in use {:.1}: page cache {:.1} (shmem {:.1}), slab {:.1}, \
             kernel stacks {:.1}, page tables {:.1}, processes' anon {:.1}, the rest (kernel image, \
             vmalloc, per-cpu, early allocations) {:.1}",
            f("MemTotal"),
            used,
            f("Cached") + f("Buffers"),
            f("Shmem"),
            f("Slab"),
            f("KernelStack"),
            f("PageTables"),
            f("AnonPages"),
            used - (f("Cached") + f("Buffers") + f("Slab") + f("KernelStack") + f("PageTables") + f("AnonPages"))
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some(kernel) = common::kernel_or_skip("bench memory") else {
        return;
    };
    let runs = common::env_number("BENCH_RUNS", 3);
    let settle = common::env_number("BENCH_SETTLE", 3) as u64;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-memory");
    let _ = std::fs::remove_dir_all(&dir);
    common::make_test_images(&dir.join("images"));
    let image = format!("oci:{}", dir.join("images/demo").display());
    let mv = Mv {
        store: dir.join("store"),
        kernel,
    };
    // Load and convert once, outside the figures.
    mv.ok(&["run", "--rm", "--hypervisor", "qemu", &image, "true"]);
    println!(
        "host memory per idle `run -d IMAGE sleep` (busybox image, {GUEST_MIB} MiB guest RAM, 1 vCPU), PSS"
    );

    let mut backends = vec!["qemu"];
    let kvm_wanted = std::env::var("BENCH_KVM").map_or(true, |v| v != "0");
    if kvm_wanted && Path::new("/dev/kvm").exists() {
        backends.push("kvm");
    }
    for backend in backends {
        for network in ["none", "passt"] {
            let started = Instant::now();
            let n = if backend == "kvm" {
                common::env_number("BENCH_KVM_RUNS", 1)
            } else {
                runs
            };
            let samples: Vec<Sample> = (0..n)
                .map(|_| measure_microvm(&mv, &image, backend, network, settle))
                .collect();
            report(
                &format!(
                    "microvm, {backend} backend, --network {network} ({:.0} s)",
                    started.elapsed().as_secs_f64()
                ),
                &samples,
            );
        }
    }

    let root = dir.join("podman");
    let podman = || {
        let mut c = Command::new("podman");
        c.args(["--storage-driver", "vfs", "--root"])
            .arg(&root)
            .stdin(Stdio::null());
        c
    };
    if !Command::new("podman")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        common::skip("podman memory", "podman is not installed");
        return;
    }
    common::podman_load(podman, &dir.join("images"), "demo");
    let samples: Vec<Sample> = (0..runs)
        .filter_map(|_| measure_podman(&podman, settle))
        .collect();
    if samples.is_empty() {
        common::skip("podman memory", "podman cannot run a container here");
        return;
    }
    report(
        "podman 4.3 + runc, --network none (conmon and the container's processes)",
        &samples,
    );
}
