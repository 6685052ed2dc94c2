//! The slow smoke test: our own kernel and agent under our own VMM (`--hypervisor kvm`), with
//! real Linux drivers on our boot path, MP table, virtio-mmio transport, virtio-blk (the image's
//! layers and the scratch disk) and virtio-vsock (the agent). On a PVM host this takes minutes
//! (the guest kernel's ring-0 code is emulated; see `vmm::pvm`); on hardware KVM, well under a
//! second. A functional test only: its time is no performance figure.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The demo image (tests/make-test-images.sh) in a directory of its own.
fn demo_image(base: &Path) -> PathBuf {
    let out = base.join("images");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/make-test-images.sh");
    let st = Command::new("bash")
        .arg(script)
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(
        st.success(),
        "building the test images failed (install umoci and busybox-static)"
    );
    out.join("demo")
}

#[test]
fn real_linux_under_our_vmm_runs_echo_hi() {
    let name = "real_linux_under_our_vmm_runs_echo_hi";
    if !kvm_or_skip(name) {
        return;
    }
    let Some(kernel) = kernel_or_skip(name) else {
        return;
    };
    let base = temp_dir("kvm-linux");
    let image = demo_image(&base.0);
    let o = microvm()
        .args(["run", "--hypervisor", "kvm", "--rm", "--timings"])
        // Generous: a PVM host needs a minute and a half to boot and each guest syscall costs
        // about a millisecond; the timeout only keeps a wedged guest from hanging CI.
        .args(["--timeout", "900", "--kernel"])
        .arg(&kernel)
        .args(["--entrypoint", "/bin/echo"])
        .arg(format!("oci:{}", image.display()))
        .arg("hi")
        .env("MICROVM_ROOT", base.0.join("store"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    // The phase timings, for the record (visible with --nocapture).
    eprintln!("{stderr}");
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout).as_ref()),
        (Some(0), "hi\n"),
        "{stderr}"
    );
}
