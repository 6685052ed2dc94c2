//! Volumes (`-v`, `--mount`) through the real stack: virtiofsd per volume, the virtio-fs device,
//! the guest kernel and agent, run through the `qemu` backend with the demo image (busybox,
//! user 1000 by default). Bad flags are refused before anything starts.

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `microvm run --hypervisor qemu [flags] demo sh -c SCRIPT`.
fn command(kernel: &Path, flags: &[String], script: &str) -> Command {
    let (out, store) = test_images("volumes");
    let mut c = microvm();
    qemu_run(&mut c, kernel, 300)
        .args(flags)
        .arg(format!("oci:{}", out.join("demo").display()))
        .arg(script)
        .env("MICROVM_ROOT", store)
        .stdin(Stdio::null());
    c
}

fn run(kernel: &Path, flags: &[String], script: &str) -> Output {
    command(kernel, flags, script).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A host directory everyone (the container's user 1000 too) may write.
fn shared_dir(name: &str) -> TempDir {
    let d = temp_dir(name);
    std::fs::set_permissions(&d.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    d
}

fn vol(host: &Path, guest: &str) -> String {
    format!("--volume={}:{guest}", host.display())
}

fn wait_for(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `path` holds `want` (a file being written is seen empty or short first).
fn wait_for_content(path: &Path, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = std::fs::read_to_string(path).unwrap_or_default();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {} to hold {want:?}: {got:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn directory_volume_both_ways_with_the_containers_uid() {
    let Some(k) = kernel_or_skip("directory_volume_both_ways_with_the_containers_uid") else {
        return;
    };
    let d = shared_dir("vol-dir");
    std::fs::write(d.0.join("from-host"), "host says hi\n").unwrap();
    // The guest reads what the host wrote, writes a file, then waits for the host to change
    // its first file while it runs and reads it again.
    let script = "cat /data/from-host; echo guest > /data/from-guest; \
                  while [ ! -e /data/go ]; do busybox usleep 20000; done; cat /data/from-host";
    let child = command(&k, &[vol(&d.0, "/data")], script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The shell creates the file before it writes to it: wait for the content, not the name.
    wait_for_content(&d.0.join("from-guest"), "guest\n");
    let meta = std::fs::metadata(d.0.join("from-guest")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (1000, 1000),
        "created as the container's user"
    );
    std::fs::write(d.0.join("from-host"), "host changed it\n").unwrap();
    std::fs::write(d.0.join("go"), "").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        (o.status.code(), text(&o.stdout)),
        (Some(0), "host says hi\nhost changed it\n".into()),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn read_only_volume_refuses_writes_even_after_a_guest_remount() {
    let Some(k) = kernel_or_skip("read_only_volume_refuses_writes_even_after_a_guest_remount")
    else {
        return;
    };
    let d = shared_dir("vol-ro");
    std::fs::write(d.0.join("f"), "ro\n").unwrap();
    // As root in the guest: the guest's own mount is read-only; remounting it read-write
    // still leaves virtiofsd refusing (--readonly).
    let script = "cat /data/f; echo x > /data/new; echo rc=$?; \
                  busybox mount -o remount,rw /data && echo remounted; \
                  echo x > /data/new2; echo rc=$?";
    let o = run(
        &k,
        &[
            "--user=0".into(),
            format!("--volume={}:/data:ro", d.0.display()),
        ],
        script,
    );
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(out.starts_with("ro\nrc=1\n"), "{out}\n{err}");
    assert!(out.ends_with("rc=1\n"), "{out}\n{err}");
    assert_eq!(
        err.matches("Read-only file system").count(),
        2,
        "{out}\n{err}"
    );
    assert!(!d.0.join("new").exists() && !d.0.join("new2").exists());
}

#[test]
fn single_file_volume_shares_only_that_file() {
    let Some(k) = kernel_or_skip("single_file_volume_shares_only_that_file") else {
        return;
    };
    let d = shared_dir("vol-file");
    let file = d.0.join("app.conf");
    std::fs::write(&file, "setting=1\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::write(d.0.join("secret"), "sibling\n").unwrap();
    let mount = format!("--mount=type=bind,src={},dst=/etc/app.conf", file.display());
    // Reads it, writes through it, and cannot replace it by rename (it is a mount point).
    let script = "cat /etc/app.conf; echo setting=2 > /etc/app.conf; \
                  echo x > /tmp/other; busybox mv /tmp/other /etc/app.conf; echo mv=$?; \
                  busybox find / -xdev -name secret 2>/dev/null | busybox wc -l";
    let o = run(&k, &["--user=0".into(), mount], script);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(out, "setting=1\nmv=1\n0\n", "{err}");
    assert!(err.contains("busy"), "rename over the file: {err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "setting=2\n");

    // Read-only: writes fail, the host file stays.
    let ro = format!("--volume={}:/etc/app.conf:ro", file.display());
    let o = run(
        &k,
        &["--user=0".into(), ro],
        "cat /etc/app.conf; echo no > /etc/app.conf",
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "setting=2\n");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "setting=2\n");
}

#[test]
fn large_file_copies_in_and_out_intact() {
    let Some(k) = kernel_or_skip("large_file_copies_in_and_out_intact") else {
        return;
    };
    let d = shared_dir("vol-big");
    let data = pattern(200 << 20, 7);
    std::fs::write(d.0.join("big"), &data).unwrap();
    let want = fnv1a(&data);
    drop(data);
    let script = "busybox md5sum /data/big | busybox cut -d' ' -f1; cat /data/big > /data/copy";
    let o = run(&k, &[vol(&d.0, "/data")], script);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let md5 = Command::new("md5sum")
        .arg(d.0.join("big"))
        .output()
        .unwrap();
    let host_md5 = text(&md5.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(text(&o.stdout).trim(), host_md5, "read inside");
    let copy = std::fs::read(d.0.join("copy")).unwrap();
    assert_eq!(
        (copy.len(), fnv1a(&copy)),
        (200 << 20, want),
        "written back"
    );
}

#[test]
fn two_containers_see_each_others_writes() {
    let Some(k) = kernel_or_skip("two_containers_see_each_others_writes") else {
        return;
    };
    let d = shared_dir("vol-two");
    // Each file appears whole (written aside, then renamed): `-e` must not see it created but
    // not yet written.
    let script = |me: &str, other: &str| {
        format!(
            "echo {me} > /shared/.{me}; mv /shared/.{me} /shared/{me}; \
             while [ ! -e /shared/{other} ]; do busybox usleep 20000; done; cat /shared/{other}"
        )
    };
    let spawn = |me, other| {
        command(&k, &[vol(&d.0, "/shared")], &script(me, other))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b): (Child, Child) = (spawn("a", "b"), spawn("b", "a"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert_eq!(text(&a.stdout), "b\n", "{}", text(&a.stderr));
    assert_eq!(text(&b.stdout), "a\n", "{}", text(&b.stderr));
}

/// Pids of the virtiofsd processes below `root` in the process tree (virtiofsd forks its
/// sandboxed worker, so there are two per volume).
fn virtiofsd_descendants(root: u32) -> Vec<u32> {
    let mut procs = Vec::new(); // (pid, ppid, is virtiofsd)
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((comm, rest)) = stat.split_once(") ") else {
            continue;
        };
        if let Some(ppid) = rest.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok()) {
            procs.push((pid, ppid, comm.ends_with("(virtiofsd")));
        }
    }
    let mut below = vec![root];
    let mut i = 0;
    while i < below.len() {
        let parent = below[i];
        below.extend(procs.iter().filter(|p| p.1 == parent).map(|p| p.0));
        i += 1;
    }
    let mut pids: Vec<u32> = procs
        .iter()
        .filter(|p| p.2 && below.contains(&p.0))
        .map(|p| p.0)
        .collect();
    pids.sort_unstable();
    pids
}

/// Whether `pid` still runs (a zombie awaiting its reaper does not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.split_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

#[test]
fn kill_9_of_microvm_leaves_no_virtiofsd() {
    let Some(k) = kernel_or_skip("kill_9_of_microvm_leaves_no_virtiofsd") else {
        return;
    };
    let d = shared_dir("vol-kill");
    let file = d.0.join("f");
    std::fs::write(&file, "").unwrap();
    let flags = [vol(&d.0, "/a"), format!("--volume={}:/b", file.display())];
    let mut child = command(&k, &flags, "busybox touch /a/up; busybox sleep 600")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&d.0.join("up"), "the container to start");
    let pids = virtiofsd_descendants(child.id());
    // One virtiofsd per volume, and a sandboxed worker each unless it runs in a chroot.
    assert!(pids.len() >= 2, "{pids:?}");
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| running(*p)) {
        assert!(
            Instant::now() < deadline,
            "virtiofsd outlived microvm: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bad_volume_flags_fail_before_anything_starts() {
    let d = temp_dir("vol-bad");
    let missing = d.0.join("missing");
    let cases = [
        (
            vec!["-v".to_string(), "relative:/data".into()],
            "not an absolute path",
        ),
        (
            vec!["-v".into(), format!("{}:/data", missing.display())],
            "does not exist",
        ),
        (
            vec!["-v".into(), format!("{}:/proc/x", d.0.display())],
            "/proc or /sys",
        ),
        (
            vec![
                "-v".into(),
                format!("{}:/x", d.0.display()),
                "--mount".into(),
                format!("type=bind,src={},dst=/x/", d.0.display()),
            ],
            "two volumes",
        ),
    ];
    for (flags, want) in cases {
        let o = microvm()
            .args(["run", "--hypervisor", "qemu"])
            .args(&flags)
            .args(["no-such-image", "true"])
            .env("MICROVM_ROOT", d.0.join("store"))
            .output()
            .unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{flags:?}: {err}");
        assert!(err.contains(want), "{flags:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn a_dying_virtiofsd_ends_the_run_with_an_error() {
    let Some(k) = kernel_or_skip("a_dying_virtiofsd_ends_the_run_with_an_error") else {
        return;
    };
    let d = shared_dir("vol-crash");
    let child = command(
        &k,
        &[vol(&d.0, "/a")],
        "busybox touch /a/up; busybox sleep 600",
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for(&d.0.join("up"), "the container to start");
    let pids = virtiofsd_descendants(child.id());
    assert!(!pids.is_empty(), "no virtiofsd below microvm");
    for pid in &pids {
        // SAFETY: a signal to a process this test found below its own child.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    let started = Instant::now();
    let o = child.wait_with_output().unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains("virtiofsd for the volume /a exited while the VM ran"),
        "{err}"
    );
    assert_ended_within(started, Duration::from_secs(30));
}

#[test]
fn a_volume_server_that_cannot_start_stops_the_kvm_vm_built_meanwhile() {
    let name = "a_volume_server_that_cannot_start_stops_the_kvm_vm_built_meanwhile";
    let Some(k) = kvm_kernel_or_skip(name) else {
        return;
    };
    // virtiofsd is spawned while our VMM builds the VM on its own thread; when it cannot be
    // found, the VM (already built, perhaps running) is stopped and the run fails at once.
    let (out, store) = test_images("volumes");
    let d = shared_dir("vol-no-server");
    let started = Instant::now();
    let o = microvm()
        .args([
            "run",
            "--hypervisor",
            "kvm",
            "--network",
            "none",
            "--timeout",
            "300",
        ])
        .arg("--kernel")
        .arg(&k)
        .arg(vol(&d.0, "/data"))
        .arg(format!("oci:{}", out.join("demo").display()))
        .arg("true")
        .env("MICROVM_ROOT", store)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", &d.0)
        .env("CARGO_HOME", &d.0)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains("/data") && err.contains("cargo install virtiofsd"),
        "{err}"
    );
    assert_ended_within(started, Duration::from_secs(30));
}
