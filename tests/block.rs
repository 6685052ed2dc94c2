//! virtio-blk on this host's KVM: the bare-metal test guest (`mode=blk`) finds every disk from
//! the `virtio_mmio.device=` entries, reads its serial, first and last sectors, writes to the
//! writable one and is refused by the read-only one. The VMM is driven as a library (no CLI flag
//! attaches disks yet); the host then checks what landed in the image files.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use microvm::backend::VmEnd;
use microvm::plan::{Console, DiskPlan, VmPlan, VsockPlan, GUEST_CID};
use microvm::vmm::Vm;

fn plan(dir: &Path, disks: Vec<DiskPlan>) -> VmPlan {
    VmPlan {
        kernel: guest("pvh.elf"),
        initrd: Vec::new(),
        cmdline: "mode=blk".into(),
        cpus: 1,
        memory_mib: 64,
        timeout: Some(Duration::from_secs(30)),
        console: Console::File(dir.join("console.log")),
        vsock: None,
        disks,
        net: None,
        shares: Vec::new(),
    }
}

fn disk(path: &Path, read_only: bool, serial: &str) -> DiskPlan {
    DiskPlan {
        path: path.to_owned(),
        read_only,
        serial: serial.into(),
    }
}

fn hex16(bytes: &[u8]) -> String {
    bytes[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// What the guest writes to sector 1.
fn guest_pattern() -> Vec<u8> {
    (0..512u32).map(|i| (i * 7 + 3) as u8).collect()
}

/// Builds and runs the VM; returns its console output.
fn boot(plan: &VmPlan) -> Run {
    let vm = Vm::build(plan).unwrap_or_else(|e| panic!("building the VM: {e}"));
    let end = vm.run().unwrap_or_else(|e| panic!("running the VM: {e}"));
    let Console::File(log) = &plan.console else {
        unreachable!()
    };
    let console = std::fs::read_to_string(log).unwrap();
    assert_eq!(end, VmEnd::GuestStopped, "{console}");
    Run {
        code: Some(0),
        stderr: console,
    }
}

#[test]
fn bare_metal_guest_reads_writes_and_is_refused_by_read_only_disks() {
    if !kvm_or_skip("bare_metal_guest_reads_writes_and_is_refused_by_read_only_disks") {
        return;
    }
    let dir = temp_dir("blk");
    let rw_path = dir.0.join("rw.img");
    let ro_path = dir.0.join("ro.img");
    let mut rw = pattern(128 * 512, 7);
    rw[..16].copy_from_slice(b"first sector rw!");
    rw[127 * 512..127 * 512 + 16].copy_from_slice(b"last sector rw!!");
    // 16 whole sectors and a tail the guest must not see.
    let ro = pattern(16 * 512 + 100, 9);
    std::fs::write(&rw_path, &rw).unwrap();
    std::fs::write(&ro_path, &ro).unwrap();

    let mut p = plan(
        &dir.0,
        vec![
            disk(&rw_path, false, "data"),
            disk(&ro_path, true, "exactly-twenty-bytes"),
        ],
    );
    // The vsock device takes the first slot; the disks follow it.
    p.vsock = Some(VsockPlan {
        guest_cid: GUEST_CID,
        uds_path: dir.0.join("v.sock"),
    });
    let run = boot(&p);

    assert_eq!(run.line("blk: 2 devices"), "blk: 2 devices");
    let devices = run.lines("blk: device at");
    assert_eq!(
        devices,
        vec![
            "blk: device at 0xd0001000 ro=0 blk_size=512 seg_max=254",
            "blk: device at 0xd0002000 ro=1 blk_size=512 seg_max=254",
        ],
        "{}",
        run.stderr
    );
    assert_eq!(
        run.line("blk: serial=data capacity"),
        format!(
            "blk: serial=data capacity=128 first={} last={}",
            hex16(&rw),
            hex16(&rw[127 * 512..])
        )
    );
    assert_eq!(
        run.line("blk: serial=data write"),
        "blk: serial=data write status=0 readback=ok"
    );
    assert_eq!(
        run.line("blk: serial=data flush"),
        "blk: serial=data flush status=0"
    );
    assert_eq!(
        run.line("blk: serial=exactly-twenty-bytes capacity"),
        format!(
            "blk: serial=exactly-twenty-bytes capacity=16 first={} last={}",
            hex16(&ro),
            hex16(&ro[15 * 512..])
        )
    );
    assert_eq!(
        run.line("blk: serial=exactly-twenty-bytes read-only write"),
        "blk: serial=exactly-twenty-bytes read-only write status=1"
    );
    for serial in ["data", "exactly-twenty-bytes"] {
        assert_eq!(
            run.line(&format!("blk: serial={serial} read past end")),
            format!("blk: serial={serial} read past end status=1")
        );
        assert_eq!(
            run.line(&format!("blk: serial={serial} unknown type")),
            format!("blk: serial={serial} unknown type status=2")
        );
    }
    assert!(run.lines("done").len() == 1, "{}", run.stderr);

    // The write landed in sector 1 of the writable image and nowhere else.
    let after = std::fs::read(&rw_path).unwrap();
    let mut want = rw.clone();
    want[512..1024].copy_from_slice(&guest_pattern());
    assert!(after == want, "the writable image is not as expected");
    assert!(
        std::fs::read(&ro_path).unwrap() == ro,
        "the read-only image changed"
    );
}

/// Builds the VM and returns the error it must fail with.
fn build_error(plan: &VmPlan) -> String {
    match Vm::build(plan) {
        Ok(_) => panic!("the VM was built"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_disks_are_refused_before_the_guest_runs() {
    if !kvm_or_skip("bad_disks_are_refused_before_the_guest_runs") {
        return;
    }
    let dir = temp_dir("blk-bad");
    let img = dir.0.join("disk.img");
    std::fs::write(&img, [0u8; 4096]).unwrap();
    let missing = dir.0.join("missing.img");

    let e = build_error(&plan(&dir.0, vec![disk(&missing, true, "x")]));
    assert!(e.contains(missing.to_str().unwrap()), "{e}");
    assert!(e.contains("No such file"), "{e}");

    let e = build_error(&plan(&dir.0, vec![disk(&img, false, &"s".repeat(21))]));
    assert!(e.contains("at most 20 bytes"), "{e}");
    let e = build_error(&plan(&dir.0, vec![disk(&img, false, "a\0b")]));
    assert!(e.contains("NUL"), "{e}");
    let e = build_error(&plan(&dir.0, vec![disk(&dir.0, true, "dir")]));
    assert!(e.contains("is a directory"), "{e}");

    // 19 slots: GSIs 5 to 23.
    let many = (0..20)
        .map(|i| disk(&img, true, &format!("d{i}")))
        .collect();
    let e = build_error(&plan(&dir.0, many));
    assert!(e.contains("20 virtio devices"), "{e}");
    assert!(e.contains("only 19 fit"), "{e}");
    let mut p = plan(
        &dir.0,
        (0..19)
            .map(|i| disk(&img, true, &format!("d{i}")))
            .collect(),
    );
    p.vsock = Some(VsockPlan {
        guest_cid: GUEST_CID,
        uds_path: dir.0.join("v.sock"),
    });
    let e = build_error(&p);
    assert!(e.contains("only 19 fit"), "{e}");
    assert_eq!(std::fs::read(&img).unwrap(), [0u8; 4096]);
}

#[test]
fn nineteen_disks_fit_and_are_all_found() {
    if !kvm_or_skip("nineteen_disks_fit_and_are_all_found") {
        return;
    }
    let dir = temp_dir("blk-many");
    let img = dir.0.join("disk.img");
    std::fs::write(&img, pattern(4096, 3)).unwrap();
    let mut p = plan(
        &dir.0,
        (0..19)
            .map(|i| disk(&img, true, &format!("d{i}")))
            .collect(),
    );
    // The guest drives at most 8; it still sees every entry.
    p.cmdline = "mode=info".into();
    let run = boot(&p);
    let entries = run.line("cmdline:").matches("virtio_mmio.device=").count();
    assert_eq!(entries, 19, "{}", run.stderr);
    assert!(run
        .line("cmdline:")
        .contains("virtio_mmio.device=4K@0xd0012000:23"));
}
