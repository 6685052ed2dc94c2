//! The slow smoke test: our own kernel and agent under our own VMM (`--hypervisor kvm`), with
//! real Linux drivers on our boot path, MP table, virtio-mmio transport, virtio-blk (the image's
//! layers and the scratch disk) and virtio-vsock (the agent). On a PVM host this takes minutes
//! (the guest kernel's ring-0 code is emulated; see `vmm::pvm`); on hardware KVM, well under a
//! second. A functional test only: its time is no performance figure. The first also fetches a
//! page from the host through our virtio-net device, Linux's driver and passt; the second adds a
//! volume: our vhost-user-fs frontend with a real virtiofsd and Linux's virtio-fs driver.

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Stdio;

/// `microvm run --hypervisor kvm [flags] IMAGE ARGS...` with the test images' private store
/// (IMAGE: `demo` or `box`).
fn run_kvm(name: &str, image: &str, flags: &[String], args: &[&str]) -> Option<(i32, String)> {
    let kernel = kvm_kernel_or_skip(name)?;
    let (images, store) = test_images("kvm-linux");
    let o = microvm()
        .args(["run", "--hypervisor", "kvm", "--rm", "--timings"])
        // Generous: a PVM host needs a minute and more to boot and each guest syscall costs
        // about a millisecond; the timeout only keeps a wedged guest from hanging CI.
        .args(["--timeout", "900", "--kernel"])
        .arg(&kernel)
        .args(flags)
        .arg(format!("oci:{}", images.join(image).display()))
        .args(args)
        .env("MICROVM_ROOT", store)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    // The phase timings, for the record (visible with --nocapture).
    eprintln!("{name}: {stderr}");
    Some((
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned() + &stderr,
    ))
}

#[test]
fn real_linux_under_our_vmm_runs_echo_hi_and_reaches_the_host() {
    let name = "real_linux_under_our_vmm_runs_echo_hi_and_reaches_the_host";
    let port = http_server("0.0.0.0:0", "through-our-virtio-net");
    let script = format!("echo hi; wget -q -O - http://{}:{port}/", host_address());
    let Some((code, out)) = run_kvm(name, "box", &[], &["sh", "-c", &script]) else {
        return;
    };
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("hi\nthrough-our-virtio-net"), "{out}");
}

#[test]
fn real_linux_under_our_vmm_writes_through_virtio_fs() {
    let base = temp_dir("kvm-linux-fs");
    let share = base.0.join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::set_permissions(&share, std::fs::Permissions::from_mode(0o777)).unwrap();
    // The image's shell and user 1000; `echo` is built in, so no fork under emulation.
    let flags = [format!("--volume={}:/data", share.display())];
    let Some((code, out)) = run_kvm(
        "real_linux_under_our_vmm_writes_through_virtio_fs",
        "demo",
        &flags,
        &["echo through our virtio-fs > /data/out"],
    ) else {
        return;
    };
    assert_eq!(code, 0, "{out}");
    let file = share.join("out");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "through our virtio-fs\n"
    );
    assert_eq!(std::fs::metadata(&file).unwrap().uid(), 1000);
}
