//! virtio-fs shares on this host's KVM, with the bare-metal test guest (which has no virtio-fs
//! driver: the guest side is tested elsewhere) and a real virtiofsd: a VM with a share boots on
//! shared memfd RAM and stops normally, a missing backend fails the build naming the share, and
//! a backend dying under a running VM ends it with an error naming the share, not a hang.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use microvm::backend::VmEnd;
use microvm::plan::{Console, FsPlan, VmPlan};
use microvm::vmm::{Error, Vm};
use microvm::volumes::{Kind, Virtiofsd, Volume, VIRTIOFSD_HINT};

fn plan(dir: &Path, mode: &str, socket: PathBuf) -> VmPlan {
    VmPlan {
        kernel: guest("pvh.elf"),
        initrd: Vec::new(),
        cmdline: format!("mode={mode}"),
        cpus: 1,
        memory_mib: 64,
        timeout: Some(Duration::from_secs(30)),
        console: Console::File(dir.join("console.log")),
        vsock: None,
        disks: Vec::new(),
        net: None,
        shares: vec![FsPlan {
            tag: "hostdata".into(),
            socket,
        }],
    }
}

/// A virtiofsd serving `dir/shared` on `dir/vfs.sock`, started as `microvm run` starts one (on
/// a socket already listening), or `None` after a loud skip line.
fn virtiofsd(test: &str, dir: &Path) -> Option<(Virtiofsd, PathBuf)> {
    if microvm::helpers::find("virtiofsd", VIRTIOFSD_HINT).is_err() {
        skip(test, "virtiofsd is not installed (cargo install virtiofsd)");
        return None;
    }
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let socket = dir.join("vfs.sock");
    let volume = Volume {
        source: shared,
        target: "/data".into(),
        read_only: false,
        kind: Kind::Dir,
        staged: Vec::new(),
    };
    let server = Virtiofsd::start(&volume, &socket, dir).unwrap_or_else(|e| panic!("{e}"));
    Some((server, socket))
}

#[test]
fn a_vm_with_a_share_boots_and_stops_normally() {
    let test = "a_vm_with_a_share_boots_and_stops_normally";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = temp_dir("fs-boot");
    let Some((mut backend, socket)) = virtiofsd(test, &dir.0) else {
        return;
    };
    let vm = Vm::build(&plan(&dir.0, "info", socket)).unwrap_or_else(|e| panic!("build: {e}"));
    let end = vm.run().unwrap_or_else(|e| panic!("run: {e}"));
    assert_eq!(end, VmEnd::GuestStopped);
    let console = std::fs::read_to_string(dir.0.join("console.log")).unwrap();
    assert!(console.contains("mode: info"), "{console}");
    backend.kill();
}

#[test]
fn a_missing_backend_fails_the_build_naming_the_share() {
    if !kvm_or_skip("a_missing_backend_fails_the_build_naming_the_share") {
        return;
    }
    let dir = temp_dir("fs-missing");
    let socket = dir.0.join("nobody.sock");
    let err = match Vm::build(&plan(&dir.0, "info", socket)) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("built a VM without its virtio-fs backend"),
    };
    assert!(err.contains("\"hostdata\""), "{err}");
    assert!(err.contains("nobody.sock"), "{err}");
}

#[test]
fn a_dying_backend_ends_the_vm_naming_the_share() {
    let test = "a_dying_backend_ends_the_vm_naming_the_share";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = temp_dir("fs-dying");
    let Some((mut backend, socket)) = virtiofsd(test, &dir.0) else {
        return;
    };
    let vm = Vm::build(&plan(&dir.0, "hang", socket)).unwrap_or_else(|e| panic!("build: {e}"));
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        backend.kill();
    });
    let started = Instant::now();
    let result = vm.run();
    killer.join().unwrap();
    match result {
        Err(Error::Device(msg)) => {
            assert!(
                msg.contains("\"hostdata\"") && msg.contains("hung up"),
                "{msg}"
            );
            assert!(!msg.contains('\n'), "one line: {msg}");
        }
        other => panic!("expected the share's failure, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped by the hang-up, not the timeout"
    );
}
