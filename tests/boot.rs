//! `microvm boot` on this host's KVM with bare-metal test guests (tests/guests/): each guest
//! reports what it found from the inside, and the tests compare it with what we handed over.

mod common;

use common::*;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GAP_START: u64 = 0xc000_0000;

/// The memory map lines a guest with `mib` MiB of RAM must print.
fn expected_map(mib: u64) -> Vec<String> {
    let size = mib * MIB;
    let low = size.min(GAP_START);
    let mut map: Vec<(u64, u64, u32)> = vec![
        (0, 0x9fc00, 1),
        (0x9fc00, 0x400, 2),
        (0x10_0000, low - 0x10_0000, 1),
    ];
    if size > low {
        map.push((0x1_0000_0000, size - low, 1));
    }
    let mut lines = vec![format!("mem: entries={}", map.len())];
    for (i, (addr, len, kind)) in map.iter().enumerate() {
        lines.push(format!(
            "mem[{i}]: addr={addr:#x} size={len:#x} type={kind}"
        ));
    }
    let ram: u64 = map.iter().filter(|e| e.2 == 1).map(|e| e.1).sum();
    lines.push(format!("ram: total={ram:#x}"));
    lines
}

/// Boots `kernel` in `info` mode with an initrd and checks every fact the guest reports.
fn check_boot_info(test: &str, kernel: &str, boot_line: &str, mib: u64) {
    if !kvm_or_skip(test) {
        return;
    }
    let data = pattern(300_000, 7);
    let initrd = TempFile::new(&format!("{test}-initrd"), &data);
    let cmdline = "mode=info console=ttyS0 some.flag=1 quoted=\"a b\"";
    let run = boot(&[
        "--kernel",
        guest(kernel).to_str().unwrap(),
        "--initrd",
        initrd.path(),
        "--cmdline",
        cmdline,
        "--memory",
        &mib.to_string(),
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.line("guest: "), boot_line);
    assert_eq!(run.line("cmdline: "), format!("cmdline: {cmdline}"));
    let mut map: Vec<&str> = run.lines("mem");
    map.push(run.line("ram: "));
    assert_eq!(map, expected_map(mib));
    let initrd_line = run.line("initrd: ");
    let expected = format!("size={} fnv1a={:#010x}", data.len(), fnv1a(&data));
    assert!(
        initrd_line.ends_with(&expected),
        "{initrd_line} should end with {expected}"
    );
    let addr = initrd_line
        .split("addr=0x")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .unwrap();
    let addr = u64::from_str_radix(addr, 16).unwrap();
    assert_eq!(addr % 4096, 0, "initrd must be page aligned");
    assert!(
        addr + data.len() as u64 <= (mib * MIB).min(GAP_START),
        "initrd inside low RAM"
    );
    assert!(run.lines("done").len() == 1, "{}", run.stderr);
}

#[test]
fn linux_64bit_boot_protocol_with_elf_vmlinux() {
    check_boot_info(
        "linux_64bit_boot_protocol_with_elf_vmlinux",
        "linux64.elf",
        "guest: boot=linux64",
        128,
    );
}

#[test]
fn linux_64bit_boot_protocol_with_bzimage() {
    check_boot_info(
        "linux_64bit_boot_protocol_with_bzimage",
        "bzimage",
        "guest: boot=linux64",
        256,
    );
}

#[test]
fn pvh_boot_protocol() {
    check_boot_info("pvh_boot_protocol", "pvh.elf", "guest: boot=pvh", 64);
}

#[test]
fn zero_page_is_valid() {
    if !kvm_or_skip("zero_page_is_valid") {
        return;
    }
    let run = boot(&[
        "--kernel",
        guest("linux64.elf").to_str().unwrap(),
        "--cmdline",
        "mode=info",
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        run.line("zeropage: "),
        "zeropage: boot_flag=ok header=ok loader=0xff"
    );
    assert_eq!(run.line("initrd: "), "initrd: none");
}

#[test]
fn pvh_start_info_without_initrd() {
    if !kvm_or_skip("pvh_start_info_without_initrd") {
        return;
    }
    let run = boot(&[
        "--kernel",
        guest("pvh.elf").to_str().unwrap(),
        "--cmdline",
        "mode=info",
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.line("pvh: "), "pvh: magic=ok version=1 nr_modules=0");
    assert_eq!(run.line("initrd: "), "initrd: none");
}

#[test]
fn ram_above_the_mmio_gap() {
    // 4 GiB of guest RAM: 3 GiB below the gap, 1 GiB above 4 GiB; nothing is touched up front,
    // but microvm refuses more guest RAM than the host has.
    let host_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    });
    if host_kib.is_some_and(|kib| kib / 1024 < 4096) {
        let line = "SKIPPED ram_above_the_mmio_gap: this host has less than 4 GiB of RAM\n";
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        return;
    }
    check_boot_info(
        "ram_above_the_mmio_gap",
        "linux64.elf",
        "guest: boot=linux64",
        4096,
    );
    check_boot_info("ram_above_the_mmio_gap", "pvh.elf", "guest: boot=pvh", 3200);
}

#[test]
fn longest_command_line_arrives_intact() {
    if !kvm_or_skip("longest_command_line_arrives_intact") {
        return;
    }
    let cmdline = format!("mode=info pad={}", "x".repeat(2047 - 14));
    assert_eq!(cmdline.len(), 2047);
    let run = boot(&[
        "--kernel",
        guest("pvh.elf").to_str().unwrap(),
        "--cmdline",
        &cmdline,
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.line("cmdline: "), format!("cmdline: {cmdline}"));
}

#[test]
fn serial_console_boot_marker_and_i8042_reset() {
    if !kvm_or_skip("serial_console_boot_marker_and_i8042_reset") {
        return;
    }
    let out = microvm()
        .args([
            "boot",
            "--kernel",
            guest("marker.elf").to_str().unwrap(),
            "--memory",
            "128",
            "--timeout",
            "30",
        ])
        .env("MICROVM_LOG", "info")
        .output()
        .unwrap();
    let run = Run::from(out);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.lines("microvm-marker").len(), 1, "{}", run.stderr);
    let marker = run
        .stderr
        .lines()
        .find(|l| l.contains("guest boot marker 0x7b at"))
        .unwrap_or_else(|| {
            panic!("no boot marker line in:\n{}", run.stderr);
        });
    assert!(marker.contains("KVM ioctls"), "{marker}");
}

#[test]
fn console_log_goes_to_a_file() {
    if !kvm_or_skip("console_log_goes_to_a_file") {
        return;
    }
    let log = TempFile::new("console.log", b"old contents");
    let run = boot(&[
        "--kernel",
        guest("pvh.elf").to_str().unwrap(),
        "--cmdline",
        "mode=reset",
        "--console-log",
        log.path(),
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stderr.is_empty(),
        "console must not reach stderr: {}",
        run.stderr
    );
    let text = std::fs::read_to_string(&log.0).unwrap();
    assert_eq!(
        text.replace('\r', ""),
        "guest: boot=pvh\nmode: reset\nhello from guest\n"
    );
}

#[test]
fn mp_table_lists_every_cpu_and_irq_and_aps_start() {
    if !kvm_or_skip("mp_table_lists_every_cpu_and_irq_and_aps_start") {
        return;
    }
    for (kernel, cpus) in [("pvh.elf", 4), ("linux64.elf", 2), ("pvh.elf", 1)] {
        let run = boot(&[
            "--kernel",
            guest(kernel).to_str().unwrap(),
            "--cmdline",
            "mode=smp",
            "--cpus",
            &cpus.to_string(),
        ]);
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        // One package of `cpus` cores: KVM's own leaf 0xb has no core level, so we add it.
        let shift = 32 - (cpus as u32 - 1).leading_zeros();
        assert_eq!(
            run.line("cpuid: leaf 0xb"),
            format!("cpuid: leaf 0xb core level type=2 count={cpus} shift={shift}")
        );
        assert_eq!(
            run.line("cpuid: leaf1"),
            format!("cpuid: leaf1 apic_id=0 logical={cpus}")
        );
        assert!(
            run.line("mptable: found=").ends_with("checksum=ok"),
            "{}",
            run.stderr
        );
        assert_eq!(run.line("mptable: lapic="), "mptable: lapic=0xfee00000");
        let ids: Vec<String> = (0..cpus).map(|i| i.to_string()).collect();
        assert_eq!(
            run.line("mptable: cpus="),
            format!("mptable: cpus={cpus} bsp=0 apic_ids={}", ids.join(","))
        );
        assert_eq!(
            run.line("mptable: ioapic"),
            format!("mptable: ioapic id={cpus} addr=0xfec00000 enabled=1")
        );
        assert_eq!(run.line("mptable: irqs="), "mptable: irqs=24 identity=yes");
        assert_eq!(
            run.line("mptable: lint0="),
            "mptable: lint0=extint lint1=nmi"
        );
        assert_eq!(run.line("mptable: bus="), "mptable: bus=ISA");
        // INIT/SIPI and a real-mode trampoline work on this KVM: every AP checks in.
        assert_eq!(
            run.line("smp: "),
            format!("smp: aps_started={} expected={}", cpus - 1, cpus - 1)
        );
    }
}

#[test]
fn triple_fault_is_a_clear_error() {
    if !kvm_or_skip("triple_fault_is_a_clear_error") {
        return;
    }
    for kernel in ["pvh.elf", "linux64.elf"] {
        let run = boot(&[
            "--kernel",
            guest(kernel).to_str().unwrap(),
            "--cmdline",
            "mode=triple",
        ]);
        assert_eq!(run.code, Some(125), "{}", run.stderr);
        assert_eq!(run.lines("triple: still alive").len(), 0);
        let err = run.line("microvm: ");
        assert!(
            err.starts_with("microvm: the guest triple-faulted on vCPU 0 at rip 0x"),
            "{err}"
        );
        assert!(err.ends_with("(KVM_EXIT_SHUTDOWN)"), "{err}");
    }
}

#[test]
fn timeout_stops_a_halted_and_a_spinning_guest() {
    if !kvm_or_skip("timeout_stops_a_halted_and_a_spinning_guest") {
        return;
    }
    for (mode, cpus) in [("hang", "1"), ("spin", "1"), ("spin", "3")] {
        let started = Instant::now();
        let run = boot(&[
            "--kernel",
            guest("pvh.elf").to_str().unwrap(),
            "--cmdline",
            &format!("mode={mode}"),
            "--timeout",
            "1",
            "--cpus",
            cpus,
        ]);
        assert_eq!(run.code, Some(124), "{}", run.stderr);
        assert_eq!(
            run.line("microvm: "),
            "microvm: the guest was still running after 1 s (--timeout); stopped it"
        );
        // A wedged vCPU would keep the process alive indefinitely; this only guards that.
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}

#[test]
fn sigterm_and_sigint_stop_the_vm() {
    if !kvm_or_skip("sigterm_and_sigint_stop_the_vm") {
        return;
    }
    use std::io::{BufRead, BufReader};
    for (signal, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let mut child = microvm()
            .args([
                "boot",
                "--kernel",
                guest("pvh.elf").to_str().unwrap(),
                "--cmdline",
                "mode=hang",
                "--timeout",
                "60",
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        assert!(lines.any(|l| l.unwrap().starts_with("hang: halting forever")));
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code));
    }
}

#[test]
fn bad_input_gives_one_line_and_status_125() {
    if !kvm_or_skip("bad_input_gives_one_line_and_status_125") {
        return;
    }
    let garbage = TempFile::new("garbage-kernel", &pattern(64 * 1024, 3));
    let mut truncated_elf = std::fs::read(guest("pvh.elf")).unwrap();
    truncated_elf.truncate(100);
    let truncated = TempFile::new("truncated-kernel", &truncated_elf);
    let big_initrd = TempFile::new("big-initrd", &vec![1u8; 20 << 20]);
    let pvh = guest("pvh.elf");
    let pvh = pvh.to_str().unwrap();
    let long_cmdline = "x".repeat(2048);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--kernel", "/nonexistent/vmlinux"],
            "cannot open the kernel /nonexistent/vmlinux",
        ),
        (
            vec!["--kernel", garbage.path()],
            "neither an ELF vmlinux nor a bzImage",
        ),
        (vec!["--kernel", truncated.path()], "cannot load the kernel"),
        (
            vec!["--kernel", pvh, "--initrd", "/nonexistent/initrd"],
            "cannot open the initrd",
        ),
        (
            vec![
                "--kernel",
                pvh,
                "--initrd",
                big_initrd.path(),
                "--memory",
                "16",
            ],
            "does not fit in guest RAM",
        ),
        (
            vec!["--kernel", pvh, "--memory", "0"],
            "--memory must be at least 16 MiB",
        ),
        (
            vec!["--kernel", pvh, "--memory", "100000000"],
            "more than this host's",
        ),
        (
            vec!["--kernel", pvh, "--cpus", "0"],
            "--cpus must be between 1 and 32",
        ),
        (
            vec!["--kernel", pvh, "--cpus", "33"],
            "--cpus must be between 1 and 32",
        ),
        (
            vec!["--kernel", pvh, "--cmdline", &long_cmdline],
            "the limit is 2047",
        ),
        (
            vec!["--kernel", pvh, "--timeout=0"],
            "--timeout must be a positive number",
        ),
        (
            vec!["--kernel", pvh, "--console-log", "/nonexistent/dir/log"],
            "cannot open the console log",
        ),
    ];
    for (args, expected) in cases {
        let run = boot(&args);
        assert_eq!(run.code, Some(125), "{args:?}: {}", run.stderr);
        assert_eq!(
            run.stderr.lines().count(),
            1,
            "{args:?}: one line expected: {}",
            run.stderr
        );
        assert!(
            run.stderr.starts_with("microvm: ") && run.stderr.contains(expected),
            "{args:?}: {}",
            run.stderr
        );
    }
    // Usage errors are clap's, also status 125.
    let run: Run = microvm()
        .args(["boot", "--cpus", "many"])
        .output()
        .unwrap()
        .into();
    assert_eq!(run.code, Some(125), "{}", run.stderr);
}

#[test]
fn info_reports_kvm() {
    let out = microvm().arg("info").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("kvm boots linux"), "{text}");
    if std::path::Path::new("/dev/kvm").exists() {
        assert!(text.contains("kvm api version        12"), "{text}");
        let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
        assert_eq!(text.contains("PVM"), pvm, "{text}");
    }
}

#[test]
fn unemulated_instruction_names_the_guest_rip() {
    if !kvm_or_skip("unemulated_instruction_names_the_guest_rip") {
        return;
    }
    let run = boot(&[
        "--kernel",
        guest("pvh.elf").to_str().unwrap(),
        "--cmdline",
        "mode=cx16",
    ]);
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        // PVM emulates guest ring 0 and has no cmpxchg16b: a clear error, not a hang.
        assert_eq!(run.code, Some(125), "{}", run.stderr);
        let err = run.line("microvm: ");
        assert!(
            err.starts_with("microvm: the guest failed: vCPU 0: KVM internal error 1 (instruction emulation failed) at rip 0x"),
            "{err}"
        );
    } else {
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        assert_eq!(run.line("cx16: survived"), "cx16: survived pair=1,2");
    }
}

#[test]
fn string_port_io_reaches_the_device_access_by_access() {
    if !kvm_or_skip("string_port_io_reaches_the_device_access_by_access") {
        return;
    }
    let run = boot(&[
        "--kernel",
        guest("pvh.elf").to_str().unwrap(),
        "--cmdline",
        "mode=rep",
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.line("rep: outsb"), "rep: outsb works");
    // Line status: transmitter empty and idle (0x60), once per `insb`.
    assert_eq!(run.line("rep: insb"), "rep: insb lsr=60,60,60,60");
}
