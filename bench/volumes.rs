//! Volume benchmark: sequential write and read (256 MiB, 1 MiB blocks) and metadata operations
//! (create, stat, unlink of 10,000 empty files) through a virtio-fs volume, against the same
//! on the host and in the guest's own tmpfs (which shows what the emulated CPU alone costs).
//! Per backend that boots Linux at speed here (`qemu`; `kvm` with BENCH_KVM=1, very slow on PVM)
//! and per virtiofsd cache policy (`auto`, the default, and `never`). Medians of BENCH_RUNS
//! rounds (default 3) inside one VM per configuration; timed in the guest from /proc/uptime.
//!
//! Run: `cargo bench --bench volumes`. Needs the guest kernel, virtiofsd, busybox-static, umoci.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MIB: u64 = 256;
const FILES: u64 = 10_000;

/// The benchmark script: for each round, one line `w r c s u` of seconds for write, read,
/// create, stat and unlink in directory $1. Root in the guest: drops its page cache so reads go
/// through the volume (on the host, reads come from the page cache, as virtiofsd's do).
fn script(dir: &str, rounds: usize, drop_caches: bool) -> String {
    let drop = if drop_caches {
        "sync; echo 3 > /proc/sys/vm/drop_caches"
    } else {
        "sync"
    };
    format!(
        r#"set -e; D={dir}; t() {{ read u _ < /proc/uptime; echo $u; }}
for r in $(seq {rounds}); do
a=$(t); dd if=/dev/zero of=$D/seq bs=1M count={MIB} conv=fsync 2>/dev/null; b=$(t)
{drop}
c=$(t); dd if=$D/seq of=/dev/null bs=1M 2>/dev/null; d=$(t); rm $D/seq
mkdir $D/m; e=$(t); i=0; while [ $i -lt {FILES} ]; do : > $D/m/f$i; i=$((i+1)); done; f=$(t)
ls -l $D/m > /dev/null; g=$(t); rm -r $D/m; h=$(t)
echo "$a $b $c $d $e $f $g $h"
done"#
    )
}

/// Medians per phase from the script's lines of uptime stamps.
fn phases(out: &str) -> Option<[f64; 5]> {
    let rows: Vec<Vec<f64>> = out
        .lines()
        .map(|l| {
            l.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .filter(|v: &Vec<f64>| v.len() == 8)
        .collect();
    if rows.is_empty() {
        return None;
    }
    let mut result = [0.0; 5];
    for (k, slot) in result.iter_mut().enumerate() {
        let (from, to) = [(0, 1), (2, 3), (4, 5), (5, 6), (6, 7)][k];
        *slot = common::median(rows.iter().map(|r| (r[to] - r[from]).max(0.005)).collect());
    }
    Some(result)
}

fn report(label: &str, p: [f64; 5]) {
    let mb = MIB as f64;
    let ops = FILES as f64;
    println!(
        "{label:<34} write {:>7.1} MB/s  read {:>7.1} MB/s  create {:>7.0}/s  stat {:>7.0}/s  unlink {:>7.0}/s",
        mb / p[0],
        mb / p[1],
        ops / p[2],
        ops / p[3],
        ops / p[4]
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds = common::env_number("BENCH_RUNS", 3);
    let Some(kernel) = common::kernel_or_skip("volumes benchmark") else {
        return;
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-volumes");
    let (layout, store, share) = (dir.join("demo"), dir.join("store"), dir.join("share"));
    let _ = std::fs::remove_dir_all(&share);
    std::fs::create_dir_all(&share).unwrap();
    let made = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/demo-image"))
        .arg(&layout)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !made {
        println!(
            "SKIPPED volumes benchmark: cannot make the demo image (install umoci, busybox-static)"
        );
        return;
    }

    let host = Command::new("busybox")
        .args(["sh", "-c", &script(share.to_str().unwrap(), rounds, false)])
        .output()
        .unwrap();
    match phases(&String::from_utf8_lossy(&host.stdout)) {
        Some(p) => report("host (same directory)", p),
        None => println!("host run failed: {}", String::from_utf8_lossy(&host.stderr)),
    }

    let mut backends = vec!["qemu"];
    if std::env::var_os("BENCH_KVM").is_some() {
        backends.push("kvm");
    }
    for backend in backends {
        for cache in ["auto", "never"] {
            for (where_, target) in [("guest tmpfs", "/tmp"), ("volume", "/data")] {
                let o = common::microvm()
                    .args(["run", "--hypervisor", backend, "--memory", "1g", "--kernel"])
                    .arg(&kernel)
                    .arg(format!("--volume={}:/data", share.display()))
                    .arg(format!("oci:{}", layout.display()))
                    .args(["sh", "-c", &script(target, rounds, true)])
                    .env("MICROVM_ROOT", &store)
                    .env("MICROVM_VIRTIOFS_CACHE", cache)
                    .stdin(Stdio::null())
                    .output()
                    .unwrap();
                let label = format!("{backend}, cache={cache}, {where_}");
                match phases(&String::from_utf8_lossy(&o.stdout)) {
                    Some(p) => report(&label, p),
                    None => println!("{label}: failed: {}", String::from_utf8_lossy(&o.stderr)),
                }
            }
        }
    }
}
