//! Boot benchmark: `microvm boot` against QEMU's microvm machine on the same tiny PVH guest
//! (tests/guests/marker.S: boot marker, one line on COM1, reset), interleaved in one run because
//! these machines are noisy. Reports medians of: spawn to the guest's COM1 line, spawn to exit,
//! our own start-up split (KVM ioctls vs microvm code), non-guest RSS at the marker, and boots per
//! second with 2 in parallel.
//!
//! Run: `cargo bench --bench boot` (BENCH_RUNS=N to change the sample count, default 30).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MEMORY_MIB: u64 = 128;
const MARKER_LINE: &str = "microvm-marker";

#[derive(Clone, Copy, PartialEq)]
enum Vmm {
    Microvm,
    /// microvm waiting for the kernel's VM teardown before exiting.
    MicrovmSync,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Microvm => "microvm",
            Vmm::MicrovmSync => "microvm*",
            Vmm::Qemu => "qemu",
        }
    }

    /// The command booting `guest` with `cmdline`, and whether the console comes on stdout.
    fn command(self, guest: &Path, cmdline: &str) -> (Command, bool) {
        match self {
            Vmm::Microvm | Vmm::MicrovmSync => {
                let mut c = common::microvm();
                if self == Vmm::MicrovmSync {
                    c.env("MICROVM_SYNC_TEARDOWN", "1");
                }
                c.args(["boot", "--memory", &MEMORY_MIB.to_string(), "--kernel"])
                    .arg(guest)
                    .args(["--cmdline", cmdline])
                    .env("MICROVM_LOG", "info");
                (c, false)
            }
            Vmm::Qemu => {
                let mut c = Command::new("qemu-system-x86_64");
                c.args([
                    "-M",
                    "microvm",
                    "-accel",
                    "kvm",
                    "-cpu",
                    "host,-arch-capabilities",
                    "-m",
                ])
                .arg(MEMORY_MIB.to_string())
                .args(["-nodefaults", "-nographic", "-serial", "stdio"])
                .args([
                    "-device",
                    "isa-debug-exit,iobase=0xf4,iosize=0x04",
                    "-kernel",
                ])
                .arg(guest)
                .args(["-append", cmdline]);
                (c, true)
            }
        }
    }
}

struct Sample {
    marker: Duration,
    exit: Duration,
    /// Our own log line: (set-up ms, KVM ioctl ms, microvm ms).
    breakdown: Option<(f64, f64, f64)>,
}

/// Spawns, waits for the console line, then for the exit.
fn boot_once(vmm: Vmm, guest: &Path) -> Sample {
    let (mut cmd, console_on_stdout) = vmm.command(guest, "mode=reset");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn");
    let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let (mut console, mut other): (Box<dyn Read + Send>, Box<dyn Read + Send>) =
        if console_on_stdout {
            (Box::new(out), Box::new(err))
        } else {
            (Box::new(err), Box::new(out))
        };
    let other = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = other.read_to_string(&mut s);
        s
    });
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let mut marker = None;
    loop {
        let n = console.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if marker.is_none() && String::from_utf8_lossy(&seen).contains(MARKER_LINE) {
            marker = Some(start.elapsed());
        }
    }
    let status = child.wait().unwrap();
    let exit = start.elapsed();
    let other = other.join().unwrap();
    let all = format!("{}{}", String::from_utf8_lossy(&seen), other);
    let marker = marker
        .unwrap_or_else(|| panic!("{}: no marker line (status {status}):\n{all}", vmm.name()));
    Sample {
        marker,
        exit,
        breakdown: parse_breakdown(&all),
    }
}

/// "set-up 1.2 ms: KVM ioctls 0.9 ms, microvm 0.3 ms" from our boot-marker log line.
fn parse_breakdown(text: &str) -> Option<(f64, f64, f64)> {
    let line = text.lines().find(|l| l.contains("guest boot marker"))?;
    let num = |key: &str| -> Option<f64> {
        line.split(key)
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((num("set-up ")?, num("KVM ioctls ")?, num("microvm ")?))
}

/// Non-guest RSS in KiB: total RSS minus the guest-RAM mappings, read while the guest is halted
/// right after its boot marker.
fn non_guest_rss(vmm: Vmm, guest: &Path) -> u64 {
    let (mut cmd, console_on_stdout) = vmm.command(guest, "mode=hang");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut console = if console_on_stdout {
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read>
    } else {
        Box::new(child.stderr.take().unwrap())
    };
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("hang: halting forever") {
        let n = console.read(&mut buf).unwrap();
        assert!(n > 0, "{}: guest never reached its halt", vmm.name());
        seen.extend_from_slice(&buf[..n]);
    }
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let (mut total, mut guest_ram, mut size) = (0u64, 0u64, 0u64);
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("Size:") => size = f.next().unwrap().parse().unwrap(),
            Some("Rss:") => {
                let rss: u64 = f.next().unwrap().parse().unwrap();
                total += rss;
                // Guest RAM is the one mapping at least as large as the guest's memory.
                if size >= MEMORY_MIB * 1024 {
                    guest_ram += rss;
                }
            }
            _ => {}
        }
    }
    total - guest_ram
}

/// Boots per second with `parallel` workers sharing `total` boots.
fn throughput(vmm: Vmm, guest: &Path, total: usize, parallel: usize) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..parallel {
            s.spawn(|| {
                for _ in 0..total / parallel {
                    let (mut cmd, _) = vmm.command(guest, "mode=reset");
                    let st = cmd
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .unwrap();
                    // Ours resets through the i8042 (0); QEMU exits via isa-debug-exit (1).
                    let expected = if vmm == Vmm::Qemu { 1 } else { 0 };
                    assert_eq!(st.code(), Some(expected), "{} boot failed", vmm.name());
                }
            });
        }
    });
    // Keeper processes finish the kernel-side teardown after microvm exits: count them in
    // (bounded, in case a keeper of another run lingers).
    let cap = Instant::now() + Duration::from_secs(10);
    while keepers_running() && Instant::now() < cap {
        std::thread::sleep(Duration::from_micros(200));
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// Whether a teardown keeper (a fork of microvm named `microvm-keeper`) is still running. An
/// exited keeper waiting to be reaped (a zombie) has finished its work.
fn keepers_running() -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        comm.trim_end() == "microvm-keeper" && state != Some('Z')
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list tests; there are none.
    }
    if !Path::new("/dev/kvm").exists() {
        println!("SKIPPED boot benchmark: /dev/kvm is missing on this host");
        return;
    }
    let runs = common::env_number("BENCH_RUNS", 30);
    let guest: PathBuf = common::guest("marker.elf");
    let pvh = common::guest("pvh.elf");
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let mut vmms = vec![Vmm::Microvm, Vmm::MicrovmSync];
    if qemu {
        vmms.push(Vmm::Qemu);
    } else {
        println!("NOTE: qemu-system-x86_64 not found: no QEMU comparison (apt-get install qemu-system-x86)");
    }

    println!("boot benchmark: {} guest ({} bytes), {MEMORY_MIB} MiB, 1 vCPU, {runs} runs each, interleaved", guest.display(), std::fs::metadata(&guest).unwrap().len());
    let mut samples: Vec<Vec<Sample>> = vmms.iter().map(|_| Vec::new()).collect();
    for i in 0..runs {
        for k in 0..vmms.len() {
            // Alternate who goes first, so neither always runs on a warmer cache.
            let k = (k + i) % vmms.len();
            samples[k].push(boot_once(vmms[k], &guest));
        }
    }
    let rss: Vec<f64> = vmms
        .iter()
        .map(|v| {
            common::median(
                (0..5)
                    .map(|_| non_guest_rss(*v, &pvh) as f64 / 1024.0)
                    .collect(),
            )
        })
        .collect();
    let boots = (runs * 2).max(20);
    let tput: Vec<f64> = vmms
        .iter()
        .map(|v| common::median((0..3).map(|_| throughput(*v, &guest, boots, 2)).collect()))
        .collect();

    println!(
        "\n{:<9} {:>12} {:>12} {:>16} {:>14}",
        "vmm", "marker ms", "exit ms", "non-guest RSS", "boots/s (x2)"
    );
    let mut figures = Vec::new();
    for (k, v) in vmms.iter().enumerate() {
        let marker = common::median(samples[k].iter().map(|s| ms(s.marker)).collect());
        let exit = common::median(samples[k].iter().map(|s| ms(s.exit)).collect());
        println!(
            "{:<9} {:>12.2} {:>12.2} {:>12.2} MiB {:>14.1}",
            v.name(),
            marker,
            exit,
            rss[k],
            tput[k]
        );
        figures.push((marker, exit, rss[k], tput[k]));
    }
    let b: Vec<(f64, f64, f64)> = samples[0].iter().filter_map(|s| s.breakdown).collect();
    if !b.is_empty() {
        println!(
            "\nmicrovm start-up to first guest instruction (median): {:.3} ms = KVM ioctls {:.3} ms + microvm code {:.3} ms (time since main; spawn and exec come on top)",
            common::median(b.iter().map(|x| x.0).collect()),
            common::median(b.iter().map(|x| x.1).collect()),
            common::median(b.iter().map(|x| x.2).collect()),
        );
    }
    if figures.len() == 3 {
        let q = figures[2];
        println!("\nratios to QEMU (Firecracker 1.16.1 measured 0.20 marker, 0.53 exit, 1.56x throughput on this fleet):");
        for (k, m) in figures[..2].iter().enumerate() {
            println!(
                "  {:<9} marker {:.2}   exit {:.2}   throughput {:.2}x   RSS {:.2}x",
                vmms[k].name(),
                m.0 / q.0,
                m.1 / q.1,
                m.3 / q.3,
                m.2 / q.2
            );
        }
    }
    println!("\nmicrovm leaves the kernel's VM teardown to a keeper process and exits (src/vmm/teardown.rs); microvm* waits for it (MICROVM_SYNC_TEARDOWN=1). Throughput counts until every keeper is gone.");
}
